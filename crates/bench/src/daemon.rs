//! A private daemon for a benchmark: the `torpor` binary with its own data directory, port and
//! address pool.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use torpor_client::Client;

/// The `torpor` binary: `$TORPOR_BIN`, else the one next to this benchmark binary, else `torpor`
/// on the PATH.
fn torpor_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TORPOR_BIN") {
        return bin.into();
    }
    let sibling = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("torpor")));
    sibling.filter(|p| p.is_file()).unwrap_or_else(|| "torpor".into())
}

/// A private daemon for a benchmark; killed (with its sandboxes' VMs) when dropped.
pub struct BenchDaemon {
    child: Child,
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
        std::fs::write(home.path().join("config.toml"), config)?;
        let log = std::fs::File::create(home.path().join("server.log"))?;
        let child = Command::new(torpor_binary())
            .args(["server", "--config"])
            .arg(home.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a private torpor server")?;
        let mut daemon = Self { child, home };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("the private torpor server exited ({status}):\n{}", daemon.log());
            }
            if let Ok(key) = std::fs::read_to_string(daemon.home.path().join("api-key")) {
                let client = Client::new(&url, key.trim());
                if client.health().await.is_ok() {
                    return Ok((daemon, client));
                }
            }
            if Instant::now() > deadline {
                bail!("the private torpor server did not answer within 30 s:\n{}", daemon.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Sandboxes outlive their daemon by design; these are the benchmark's own.
        if let Ok(entries) = std::fs::read_dir(self.home.path().join("sandboxes")) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                let _ = Command::new("pkill").args(["-KILL", "-f", &format!("torpor-{id}")]).status();
                let _ = Command::new("ip").args(["link", "del", &format!("tv{id}")]).status();
                let _ = Command::new("ip").args(["netns", "del", &format!("torpor-{id}")]).status();
            }
        }
    }
}
