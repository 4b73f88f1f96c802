//! Child-process bookkeeping for a supervisor that may be PID 1.
//!
//! As PID 1 we must reap every orphan that the kernel reparents to us, which means calling
//! `waitpid(-1)`. That would steal the exit status of our own execs from anyone waiting on a specific
//! pid, so all waiting goes through here: spawns register a waiter under the same lock the reaper
//! holds while it reaps, so no exit can be reaped before its waiter exists.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

#[derive(Default)]
struct Waiters {
    by_pid: HashMap<i32, oneshot::Sender<ExitStatus>>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

impl Reaper {
    /// Starts the background task that reaps children on every SIGCHLD.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Reaper::default();
        let mut sigchld = signal(SignalKind::child())?;
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawns `cmd` and returns the child with a receiver for its exit status.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.waiters.lock().expect("reaper lock poisoned");
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.by_pid.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        let mut waiters = self.waiters.lock().expect("reaper lock poisoned");
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid out-pointer; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(tx) = waiters.by_pid.remove(&pid) {
                let _ = tx.send(ExitStatus::from_raw(status));
            }
        }
    }
}
