//! Running iproute2 and nftables. Failures carry the command and its stderr.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::NetError;

async fn run(program: &str, args: &[&str], stdin: Option<String>) -> Result<(), NetError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn { command: command.clone(), source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|source| NetError::Spawn { command: command.clone(), source })?;
    }
    let out = child.wait_with_output().await.map_err(|source| NetError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(NetError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(())
}

pub async fn ip(args: &[&str]) -> Result<(), NetError> {
    run("ip", args, None).await
}

pub async fn ip_in_ns(ns: &str, args: &[&str]) -> Result<(), NetError> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full, None).await
}

pub async fn run_in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<String>) -> Result<(), NetError> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full, stdin).await
}
