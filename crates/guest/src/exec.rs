//! `Exec` and `Signal`: run a process, stream its output, report how it ended.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Pid, User};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};
use torpor_proto::supervisor::{
    exec_exited, exec_input, exec_output, ExecExited, ExecInput, ExecOutput, ExecStart, ExecStarted,
};

use crate::reaper::Reaper;

/// How long output may keep flowing after the process itself exited (a background child that
/// inherited the pipes would otherwise hold the exec open forever).
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);
const CHUNK: usize = 64 * 1024;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Process groups of running execs, by the caller's exec id, so `Signal` can reach them.
#[derive(Clone, Default)]
pub struct Running {
    groups: Arc<Mutex<HashMap<String, i32>>>,
}

impl Running {
    pub fn signal(&self, exec_id: &str, signal: i32) -> Result<(), Status> {
        let pgid = *self
            .groups
            .lock()
            .expect("exec table poisoned")
            .get(exec_id)
            .filter(|pgid| **pgid > 0)
            .ok_or_else(|| Status::not_found(format!("no running exec with id {exec_id:?}")))?;
        let signal = Signal::try_from(signal)
            .map_err(|_| Status::invalid_argument(format!("unknown signal number {signal}")))?;
        killpg(Pid::from_raw(pgid), signal).map_err(|e| Status::internal(format!("signalling exec {exec_id}: {e}")))
    }

    fn insert(&self, exec_id: &str, pgid: i32) -> Result<(), Status> {
        let mut groups = self.groups.lock().expect("exec table poisoned");
        if groups.contains_key(exec_id) {
            return Err(Status::already_exists(format!("exec id {exec_id:?} is already running")));
        }
        groups.insert(exec_id.to_owned(), pgid);
        Ok(())
    }

    fn set_group(&self, exec_id: &str, pgid: i32) {
        self.groups.lock().expect("exec table poisoned").insert(exec_id.to_owned(), pgid);
    }

    /// Sends `signal` to every running exec (used before power-off).
    pub fn signal_all(&self, signal: Signal) {
        for pgid in self.groups.lock().expect("exec table poisoned").values() {
            if *pgid > 0 {
                let _ = killpg(Pid::from_raw(*pgid), signal);
            }
        }
    }

    fn remove(&self, exec_id: &str) {
        self.groups.lock().expect("exec table poisoned").remove(exec_id);
    }
}

pub type OutputStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<ExecOutput, Status>> + Send>>;

/// Starts the exec described by the first message of `input` and returns its output stream.
pub async fn start(
    reaper: &Reaper,
    running: &Running,
    default_env: &HashMap<String, String>,
    mut input: Streaming<ExecInput>,
) -> Result<OutputStream, Status> {
    let start = match input.next().await {
        Some(Ok(ExecInput { kind: Some(exec_input::Kind::Start(start)) })) => start,
        Some(Err(e)) => return Err(e),
        _ => return Err(Status::invalid_argument("the first Exec message must be `start`")),
    };
    if start.argv.is_empty() || start.argv[0].is_empty() {
        return Err(Status::invalid_argument("argv must name a program"));
    }
    let mut cmd = build_command(&start, default_env)?;
    let exec_id =
        if start.exec_id.is_empty() { format!("anon-{}", rand::random::<u64>()) } else { start.exec_id.clone() };
    // Reserve the id first: a duplicate must be refused before anything runs.
    running.insert(&exec_id, 0)?;
    let (mut child, exit_rx) = match reaper.spawn(&mut cmd) {
        Ok(spawned) => spawned,
        Err(e) => {
            running.remove(&exec_id);
            return Err(Status::failed_precondition(format!("cannot start {:?}: {e}", start.argv[0])));
        }
    };
    let pid = child.id() as i32;
    running.set_group(&exec_id, pid);

    let stdin = child.stdin.take().map(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)));
    let stdout = child.stdout.take().map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)));
    let stderr = child.stderr.take().map(|s| pipe::Receiver::from_owned_fd(OwnedFd::from(s)));
    let (tx, rx) = mpsc::channel::<Result<ExecOutput, Status>>(16);
    let _ = tx.send(Ok(output(exec_output::Kind::Started(ExecStarted { pid: pid as u32 })))).await;

    if let Some(Ok(stdin)) = stdin {
        tokio::spawn(forward_stdin(input, stdin));
    }
    let (exited_tx, exited_rx) = tokio::sync::watch::channel(false);
    let out_task = stdout.map(|r| tokio::spawn(forward_output(r.ok(), tx.clone(), false, exited_rx.clone())));
    let err_task = stderr.map(|r| tokio::spawn(forward_output(r.ok(), tx.clone(), true, exited_rx)));

    let running = running.clone();
    let timeout = (start.timeout_ms > 0).then(|| Duration::from_millis(start.timeout_ms));
    tokio::spawn(async move {
        let deadline = async {
            match timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline, exit_rx);
        let mut timed_out = false;
        let status = tokio::select! {
            status = &mut exit_rx => status,
            _ = &mut deadline => {
                timed_out = true;
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                exit_rx.await
            }
            // Nobody is listening any more: do not leave the process running unobserved.
            _ = tx.closed() => {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                exit_rx.await
            }
        };
        running.remove(&exec_id);
        let _ = exited_tx.send(true);
        for task in [out_task, err_task].into_iter().flatten() {
            let _ = task.await;
        }
        let exited = match status {
            Ok(status) => ExecExited {
                status: Some(match (status.code(), status.signal()) {
                    (Some(code), _) => exec_exited::Status::Code(code),
                    (None, Some(sig)) => exec_exited::Status::Signal(sig),
                    (None, None) => exec_exited::Status::Code(-1),
                }),
                timed_out,
            },
            Err(_) => {
                let _ = tx.send(Err(Status::internal("lost the exit status of the exec"))).await;
                return;
            }
        };
        let _ = tx.send(Ok(output(exec_output::Kind::Exited(exited)))).await;
    });

    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn output(kind: exec_output::Kind) -> ExecOutput {
    ExecOutput { kind: Some(kind) }
}

fn build_command(start: &ExecStart, default_env: &HashMap<String, String>) -> Result<Command, Status> {
    let user = resolve_user(&start.user)?;
    let mut cmd = Command::new(&start.argv[0]);
    cmd.args(&start.argv[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm-256color")
        .env("HOME", &user.dir)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .envs(default_env)
        .envs(&start.env)
        .current_dir(if !start.cwd.is_empty() {
            start.cwd.clone().into()
        } else if user.dir.is_dir() {
            user.dir.clone()
        } else {
            // e.g. nobody's home, /nonexistent: a missing home must not look like a missing program.
            "/".into()
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        // Own process group, so a signal or a timeout reaches everything the exec started.
        .process_group(0);
    if !start.cwd.is_empty() && !std::path::Path::new(&start.cwd).is_dir() {
        return Err(Status::invalid_argument(format!("working directory {:?} does not exist", start.cwd)));
    }
    Ok(cmd)
}

fn resolve_user(spec: &str) -> Result<User, Status> {
    let spec = if spec.is_empty() { "root" } else { spec };
    let found = match spec.parse::<u32>() {
        Ok(uid) => User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => User::from_name(spec),
    };
    match found {
        Ok(Some(user)) => Ok(user),
        Ok(None) if spec.parse::<u32>().is_ok() => {
            // A bare uid without a passwd entry is still a valid identity to run as.
            let uid: u32 = spec.parse().unwrap_or_default();
            Ok(User {
                name: spec.to_owned(),
                passwd: Default::default(),
                uid: nix::unistd::Uid::from_raw(uid),
                gid: nix::unistd::Gid::from_raw(uid),
                gecos: Default::default(),
                dir: "/".into(),
                shell: "/bin/sh".into(),
            })
        }
        Ok(None) => Err(Status::invalid_argument(format!("no such user {spec:?}"))),
        Err(e) => Err(Status::internal(format!("looking up user {spec:?}: {e}"))),
    }
}

async fn forward_stdin(mut input: Streaming<ExecInput>, mut stdin: pipe::Sender) {
    while let Some(Ok(msg)) = input.next().await {
        match msg.kind {
            Some(exec_input::Kind::Stdin(data)) if stdin.write_all(&data).await.is_err() => {
                return;
            }
            Some(exec_input::Kind::StdinEof(_)) => return,
            _ => {}
        }
    }
    // The caller went away or ended its stream: either way the process sees end of input.
}

/// Forwards one pipe until end of file. Once the process has exited, a read that waits longer
/// than the grace period ends it (time spent waiting for a slow consumer does not count).
async fn forward_output(
    reader: Option<pipe::Receiver>,
    tx: mpsc::Sender<Result<ExecOutput, Status>>,
    is_stderr: bool,
    exited: tokio::sync::watch::Receiver<bool>,
) {
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = async {
            let mut exited = exited.clone();
            tokio::select! {
                r = reader.read(&mut buf) => Some(r),
                _ = async {
                    let _ = exited.wait_for(|e| *e).await;
                    tokio::time::sleep(OUTPUT_DRAIN_GRACE).await;
                } => None,
            }
        };
        match read.await {
            None | Some(Ok(0)) | Some(Err(_)) => return,
            Some(Ok(n)) => {
                let data = buf[..n].to_vec();
                let kind = if is_stderr { exec_output::Kind::Stderr(data) } else { exec_output::Kind::Stdout(data) };
                if tx.send(Ok(output(kind))).await.is_err() {
                    return;
                }
            }
        }
    }
}
