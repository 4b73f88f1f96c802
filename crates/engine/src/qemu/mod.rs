//! QEMU `microvm` backend.

mod cmdline;
mod qmp;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::sched::CloneFlags;

use crate::process::{self, ExitWatch};
use crate::{Accel, Engine, EngineError, Vm, VmExit, VmSpec};
pub use cmdline::process_name;
use qmp::Qmp;

/// How long QEMU may take to open its control socket.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `terminate` waits after `quit` before it kills.
const QUIT_GRACE: Duration = Duration::from_secs(5);

pub struct QemuEngine {
    binary: PathBuf,
    accel: Accel,
    /// Host TSC frequency, measured once, for TCG guests (see `cmdline::kernel_cmdline`).
    tsc_khz: Option<u64>,
}

impl QemuEngine {
    /// `binary` is the QEMU executable (a name is looked up on `PATH`).
    pub fn new(binary: &str, accel: Accel) -> Result<Self, EngineError> {
        let missing = || EngineError::MissingBinary { binary: binary.to_owned(), package: "qemu-system-x86" };
        let path = which(binary).ok_or_else(missing)?;
        which("qemu-img").ok_or(EngineError::MissingBinary { binary: "qemu-img".into(), package: "qemu-utils" })?;
        let tsc_khz = match accel {
            Accel::Tcg => crate::tsc::host_tsc_khz(),
            Accel::Kvm => None,
        };
        Ok(Self { binary: path, accel, tsc_khz })
    }
}

fn which(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        return Path::new(binary).is_file().then(|| PathBuf::from(binary));
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|p| p.join(binary)).find(|p| p.is_file())
}

#[async_trait]
impl Engine for QemuEngine {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    async fn prepare_disk(&self, spec: &VmSpec) -> Result<(), EngineError> {
        let disk = spec.disk();
        if disk.exists() {
            return Ok(());
        }
        // A qcow2 layer over the read-only base: creating it copies nothing.
        let tmp = disk.with_extension("qcow2.partial");
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&spec.base_disk)
            .arg(&tmp)
            .output()
            .await
            .map_err(|e| EngineError::Disk(format!("running qemu-img: {e}")))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(EngineError::Disk(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        std::fs::rename(&tmp, &disk).map_err(|e| EngineError::Disk(format!("renaming {}: {e}", tmp.display())))?;
        Ok(())
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        let qmp_path = cmdline::qmp_socket(spec);
        let _ = std::fs::remove_file(&qmp_path);
        let log_path = spec.run_dir.join("qemu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| EngineError::Io { context: format!("opening {}", log_path.display()), source })?;
        let log_err = log.try_clone().map_err(|source| EngineError::Io { context: "duplicating log fd".into(), source })?;
        let netns = std::fs::File::open(&spec.netns_path).map_err(|source| EngineError::Io {
            context: format!("opening network namespace {}", spec.netns_path.display()),
            source,
        })?;
        let netns_fd = netns.as_raw_fd();

        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(cmdline::args(spec, self.accel, self.tsc_khz))
            .current_dir(&spec.run_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(false);
        // SAFETY: setns and setsid are async-signal-safe; the fd stays open until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                // The tap lives in the sandbox's namespace, so QEMU must be there to open it.
                nix::sched::setns(std::os::fd::BorrowedFd::borrow_raw(netns_fd), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                // Its own session: signals aimed at the daemon's terminal or group never reach it,
                // so sandboxes outlive a daemon restart.
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(EngineError::Spawn)?;
        drop(netns);
        let pid = child.id().ok_or_else(|| EngineError::EarlyExit("no pid".into()))?;
        let exit = ExitWatch::child(child);
        let vm = QemuVm { pid, exit, qmp_path };
        if let Err(e) = vm.wait_for_qmp().await {
            vm.terminate().await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(match e {
                EngineError::EarlyExit(why) => EngineError::EarlyExit(format!("{why}: {}", log.trim())),
                other => other,
            });
        }
        tracing::debug!(id = %spec.id, pid, "VM process started");
        Ok(Box::new(vm))
    }

    async fn kill_stale(&self, id: &str, pid: u32) -> bool {
        kill_stale_vm(id, pid).await
    }

    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, EngineError> {
        if !is_vm_of(&spec.id, pid) {
            return Err(EngineError::NotOurs { pid, id: spec.id.clone() });
        }
        let exit = ExitWatch::pid(pid).map_err(|source| EngineError::Io { context: format!("watching pid {pid}"), source })?;
        let vm = QemuVm { pid, exit, qmp_path: cmdline::qmp_socket(spec) };
        let mut qmp = Qmp::connect(&vm.qmp_path).await?;
        qmp.execute("query-status", None).await?;
        Ok(Box::new(vm))
    }
}

/// Kills `pid` if it is the QEMU process of sandbox `id` (checked by its `-name`), and waits for
/// it to go. Needs no engine instance: usable even when QEMU has been uninstalled since.
pub async fn kill_stale_vm(id: &str, pid: u32) -> bool {
    if !is_vm_of(id, pid) {
        return false;
    }
    let Ok(exit) = ExitWatch::pid(pid) else { return false };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = tokio::time::timeout(QUIT_GRACE, exit.wait()).await;
    true
}

fn is_vm_of(id: &str, pid: u32) -> bool {
    let name = process_name(id);
    process::cmdline(pid).is_some_and(|args| args.iter().any(|a| a == &name))
}

pub struct QemuVm {
    pid: u32,
    exit: ExitWatch,
    qmp_path: PathBuf,
}

impl QemuVm {
    async fn wait_for_qmp(&self) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + QMP_START_TIMEOUT;
        loop {
            if self.exit.exited() {
                return Err(EngineError::EarlyExit(self.exit.wait().await.description));
            }
            match Qmp::connect(&self.qmp_path).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(EngineError::Qmp(format!("QEMU did not open its control socket in time: {e}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn kill(&self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait_exit(&self) -> VmExit {
        self.exit.wait().await
    }

    async fn terminate(&self) {
        if self.exit.exited() {
            return;
        }
        if let Ok(mut qmp) = Qmp::connect(&self.qmp_path).await {
            let _ = qmp.execute("quit", None).await;
        }
        if tokio::time::timeout(QUIT_GRACE, self.exit.wait()).await.is_err() {
            self.kill();
            let _ = tokio::time::timeout(QUIT_GRACE, self.exit.wait()).await;
        }
    }

    fn rss_bytes(&self) -> Option<u64> {
        process::rss_bytes(self.pid)
    }
}
