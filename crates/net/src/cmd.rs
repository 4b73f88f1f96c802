//! Running iproute2, nftables and conntrack. Failures carry the command and its stderr.

use std::os::fd::AsRawFd;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::NetError;

pub(crate) async fn run(mut cmd: Command, command: String, stdin: Option<String>) -> Result<String, NetError> {
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
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
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn ip(args: &[&str]) -> Result<(), NetError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(cmd, format!("ip {}", args.join(" ")), None).await.map(drop)
}

pub async fn ip_in_ns(ns: &str, args: &[&str]) -> Result<(), NetError> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full).await
}

/// Runs `program` inside the namespace `ns` and returns its stdout. The child enters the
/// namespace itself (`setns` before exec), which spares a fork and exec of `ip netns exec` on
/// the resolver's hot path.
pub async fn in_ns(ns: &str, program: &str, args: &[&str], stdin: Option<String>) -> Result<String, NetError> {
    let command = format!("{program} {} (in {ns})", args.join(" "));
    let handle = std::fs::File::open(crate::netns_path(ns))
        .map_err(|source| NetError::Spawn { command: command.clone(), source })?;
    let fd = handle.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: setns is async-signal-safe; `handle` stays open until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(std::os::fd::BorrowedFd::borrow_raw(fd), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let result = run(cmd, command, stdin).await;
    drop(handle);
    result
}

/// Runs `f` on a thread that has entered the namespace `ns`: sockets it creates belong to that
/// namespace for their whole life, wherever they are used afterwards.
pub fn with_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let handle = std::fs::File::open(crate::netns_path(ns))?;
    std::thread::spawn(move || {
        nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("namespace thread panicked"))?
}
