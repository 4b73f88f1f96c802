//! A private daemon for a benchmark: the `torpor` binary with its own data directory, port and
//! address pool.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use torpor_client::Client;

/// The `torpor` binary: `$TORPOR_BIN`, else the one beside this benchmark binary (both come out
/// of one `cargo build`), else `torpor` on the PATH. Said on stderr, with its version: a
/// benchmark of the wrong build is worse than none.
fn torpor_binary() -> PathBuf {
    let binary = std::env::var_os("TORPOR_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let sibling = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("torpor")));
        sibling.filter(|p| p.is_file()).unwrap_or_else(|| "torpor".into())
    });
    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("cannot run it: {e}"));
    eprintln!("==> daemon: {} ({version})", binary.display());
    binary
}

/// A private daemon for a benchmark; killed (with its sandboxes' VMs) when dropped.
pub struct BenchDaemon {
    server: torpor_testkit::Server,
    home: tempfile::TempDir,
}

impl BenchDaemon {
    /// `upstream`: the sandboxes' DNS upstream (None: the host's). `extra`: more config,
    /// appended last (it may open tables).
    pub async fn start(upstream: Option<std::net::Ipv4Addr>, pool: &str, extra: &str) -> Result<(Self, Client)> {
        let home = tempfile::Builder::new().prefix("torpor-bench-").tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let image_dir = std::env::var_os("TORPOR_IMAGES").unwrap_or_else(|| "/var/cache/torpor/images".into());
        let upstream = upstream.map(|u| format!("dns_upstreams = [\"{u}\"]\n")).unwrap_or_default();
        let config = format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nimage_dir = \"{}\"\naddress_pool = \"{pool}\"\n{upstream}{extra}\n",
            home.path().display(),
            Path::new(&image_dir).display(),
        );
        let config_path = home.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let url = format!("http://127.0.0.1:{port}");
        let server = torpor_testkit::Server::start(&torpor_binary(), &config_path, home.path(), &url, &[])
            .await
            .map_err(anyhow::Error::msg)
            .context("starting a private torpor server")?;
        let client = Client::new(&url, server.api_key.clone());
        Ok((Self { server, home }, client))
    }

    pub fn log(&self) -> String {
        self.server.log()
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        self.server.kill();
        // Sandboxes outlive their daemon by design; these are the benchmark's own.
        torpor_testkit::remove_sandboxes_of(self.home.path());
    }
}
