//! Watching a VM process through a pidfd: one of ours (jailed VMs are reparented to the daemon,
//! a subreaper, so its exit status is known) or one adopted from an earlier daemon.

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::cgroup::Cgroup;
use crate::VmExit;

#[derive(Clone)]
pub struct ExitWatch {
    rx: watch::Receiver<Option<VmExit>>,
}

impl ExitWatch {
    /// Watches `pid` through a pidfd. When it exits it is reaped if it is our child (a jailed VM
    /// is reparented to the daemon, a subreaper), which also tells how it ended; then its
    /// `cgroup`, if any, is removed.
    pub fn pid(pid: u32, cgroup: Option<Cgroup>) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: we own the descriptor and it stays open for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let _ = fd.readable().await;
            let mut description = reap(pid).unwrap_or_else(|| format!("the VM process (pid {pid}) exited"));
            if let Some(cgroup) = cgroup {
                // Read before the cgroup goes: a SIGKILL alone does not say who sent it.
                if let Some(limit) = cgroup.oom_killed() {
                    description = format!("killed by the out-of-memory killer (memory limit {} MiB)", limit >> 20);
                }
                remove_when_empty(&cgroup).await;
            }
            let _ = tx.send(Some(VmExit { description }));
        });
        Ok(Self { rx })
    }

    pub async fn wait(&self) -> VmExit {
        let mut rx = self.rx.clone();
        loop {
            if let Some(exit) = rx.borrow_and_update().clone() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return VmExit { description: "the VM watcher stopped".into() };
            }
        }
    }

    pub fn exited(&self) -> bool {
        self.rx.borrow().is_some()
    }
}

/// Reaps `pid` if it is our child and says how it ended; `None` if it is not ours to reap.
fn reap(pid: u32) -> Option<String> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes into `info`; the pid is a zombie we may reap (it cannot be reused
    // before it is reaped).
    let ret = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG) };
    // SAFETY: si_pid/si_status are valid to read after waitid filled a SIGCHLD siginfo.
    if ret != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    // SAFETY: as above, waitid filled it.
    let status = unsafe { info.si_status() };
    Some(match info.si_code {
        libc::CLD_EXITED if status == 0 => "the VM process exited".into(),
        libc::CLD_EXITED => format!("the VM process exited with status {status}"),
        _ => format!(
            "the VM process was killed by signal {status} ({})",
            nix::sys::signal::Signal::try_from(status).map(|s| s.as_str()).unwrap_or("unknown")
        ),
    })
}

/// An exited process leaves its cgroup a moment after it is gone.
async fn remove_when_empty(cgroup: &Cgroup) {
    for _ in 0..200 {
        if !cgroup.populated() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    cgroup.remove();
}
