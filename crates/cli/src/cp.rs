//! `torpor sandbox cp SRC DST`: one side is `ID:/absolute/path`, as in `docker cp`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use reqwest::Method;
use tokio::io::AsyncWriteExt;

use crate::client::Client;

#[derive(Debug, PartialEq)]
pub enum Endpoint {
    Local(PathBuf),
    Guest { id: String, path: String },
}

pub fn parse(arg: &str) -> Endpoint {
    match arg.split_once(':') {
        Some((id, path)) if torpor_api::is_valid_sandbox_id(id) => {
            Endpoint::Guest { id: id.to_owned(), path: path.to_owned() }
        }
        _ => Endpoint::Local(PathBuf::from(arg)),
    }
}

/// The mode a copy out of a sandbox gets, as `cp` without `-p` would give it: the guest's
/// permission bits (it may be hostile), never setuid, setgid or sticky, within the umask.
fn local_mode(reported: u32) -> u32 {
    // SAFETY: umask only swaps the process's mask; it is put back at once.
    let umask = unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old
    };
    reported & 0o777 & !(umask as u32)
}

fn file_name(path: &str) -> Option<&str> {
    Path::new(path).file_name().and_then(|n| n.to_str())
}

pub async fn run(client: &Client, src: &str, dst: &str) -> Result<()> {
    match (parse(src), parse(dst)) {
        (Endpoint::Local(local), Endpoint::Guest { id, mut path }) => {
            let meta = tokio::fs::metadata(&local).await.with_context(|| format!("reading {}", local.display()))?;
            if !meta.is_file() {
                bail!("{} is not a regular file", local.display());
            }
            if path.ends_with('/') {
                path.push_str(local.file_name().and_then(|n| n.to_str()).unwrap_or("file"));
            }
            let file = tokio::fs::File::open(&local).await?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
            let req = client
                .request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
                .query(&[("path", path.as_str()), ("mode", mode.as_str())])
                .header(reqwest::header::CONTENT_LENGTH, meta.len())
                .body(body);
            client.send(req).await?;
            Ok(())
        }
        (Endpoint::Guest { id, path }, Endpoint::Local(mut local)) => {
            if local.is_dir() {
                local.push(file_name(&path).unwrap_or("file"));
            }
            let req =
                client.request(Method::GET, &format!("/v1/sandboxes/{id}/files")).query(&[("path", path.as_str())]);
            let resp = client.send(req).await?;
            let reported = resp
                .headers()
                .get("x-torpor-mode")
                .and_then(|v| v.to_str().ok())
                .and_then(|m| u32::from_str_radix(m, 8).ok())
                .unwrap_or(0o644);
            let mode = local_mode(reported);
            // Write beside the target and rename, so a failed copy never leaves a partial file.
            let dir = local.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            let mut out = tokio::fs::File::from_std(tmp.reopen()?);
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.context("download interrupted")?).await?;
            }
            out.sync_all().await?;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))?;
            tmp.persist(&local).with_context(|| format!("writing {}", local.display()))?;
            Ok(())
        }
        (Endpoint::Guest { .. }, Endpoint::Guest { .. }) => {
            bail!("copying between two sandboxes is not supported; copy through the host")
        }
        (Endpoint::Local(_), Endpoint::Local(_)) => bail!("one side must be a sandbox path, ID:/absolute/path"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "daemon" whose guest reports a setuid, world-writable file.
    async fn serve_hostile_file() -> String {
        let app = axum::Router::new().route(
            "/v1/sandboxes/{id}/files",
            axum::routing::get(|| async { ([("x-torpor-mode", "6777")], "#!/bin/sh\necho owned\n") }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    #[tokio::test]
    async fn a_copy_out_never_gets_setuid_or_world_writable_bits() {
        use std::os::unix::fs::PermissionsExt;
        let client = Client::new(&serve_hostile_file().await, "key");
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("report.txt");
        // SAFETY: the conventional mask, set for this test process.
        unsafe { libc::umask(0o022) };
        run(&client, "sb-abcdefghjk:/tmp/report.txt", dst.to_str().unwrap()).await.unwrap();
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode();
        assert_eq!(mode & 0o7000, 0, "setuid/setgid/sticky: {mode:o}");
        assert_eq!(mode & 0o022, 0, "group or world writable: {mode:o}");
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn parses_both_sides() {
        assert_eq!(
            parse("sb-abcdefghjk:/etc/os-release"),
            Endpoint::Guest { id: "sb-abcdefghjk".into(), path: "/etc/os-release".into() }
        );
        assert_eq!(parse("./local:file"), Endpoint::Local("./local:file".into()));
        assert_eq!(parse("/tmp/x"), Endpoint::Local("/tmp/x".into()));
        // A relative guest path is passed through; the daemon refuses it with a clear error.
        assert_eq!(parse("sb-abcdefghjk:rel"), Endpoint::Guest { id: "sb-abcdefghjk".into(), path: "rel".into() });
    }
}
