//! QEMU `microvm` backend.

mod cmdline;
mod handoff;
mod qmp;
mod template;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;

use crate::cgroup::Cgroup;
use crate::jail;
use crate::process::ExitWatch;
use serde_json::json;

use crate::snapshot::{self, SnapshotMeta};
use crate::{io, Accel, BaseDisk, Capabilities, Engine, EngineError, SnapshotSource, Vm, VmExit, VmSpec};
pub use cmdline::process_name;
use qmp::Qmp;

/// The engine's name in snapshot metadata: another backend refuses its snapshots.
const ENGINE: &str = "qemu";
/// How long QEMU may take to open its control socket.
const QMP_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Where QEMU made its control socket before it was handed one (daemons of earlier versions).
const LEGACY_VMM_DIR: &str = "vmm";
/// Saving or loading a VM's device state.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `terminate` waits after `quit` before it kills.
const QUIT_GRACE: Duration = Duration::from_secs(5);

pub struct QemuEngine {
    binary: PathBuf,
    host: cmdline::HostSetup,
}

impl QemuEngine {
    /// `binary` is the QEMU executable (a name is looked up on `PATH`).
    /// `tcg_code_cache_mib`: see [`cmdline::HostSetup`].
    pub fn new(binary: &str, accel: Accel, tcg_code_cache_mib: u32) -> Result<Self, EngineError> {
        let missing = || EngineError::MissingBinary { binary: binary.to_owned(), package: "qemu-system-x86" };
        let path = which(binary).ok_or_else(missing)?;
        which("qemu-img").ok_or(EngineError::MissingBinary { binary: "qemu-img".into(), package: "qemu-utils" })?;
        let tsc_khz = match accel {
            Accel::Tcg => crate::tsc::host_tsc_khz(),
            Accel::Kvm => None,
        };
        Ok(Self { binary: path, host: cmdline::HostSetup { accel, tsc_khz, tcg_code_cache_mib } })
    }
}

impl QemuEngine {
    /// Creates the sandbox's copy-on-write disk unless it exists already.
    async fn prepare_disk(&self, spec: &VmSpec) -> Result<(), EngineError> {
        let disk = cmdline::disk(spec);
        if disk.exists() {
            return Ok(());
        }
        let (base, base_format) = match &spec.base_disk {
            BaseDisk::Image(rootfs) => (rootfs.clone(), "raw"),
            BaseDisk::Template(dir) => (dir.join(cmdline::DISK), "qcow2"),
        };
        // A qcow2 layer over the read-only base: creating it copies nothing.
        let tmp = disk.with_extension("qcow2.partial");
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"])
            .arg(&base)
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

    /// Starts QEMU for `spec` with `extra` arguments, jailed, in its cgroup; returns once QMP
    /// answers.
    async fn spawn(&self, spec: &VmSpec, extra: &[&str]) -> Result<QemuVm, EngineError> {
        let qmp_path = cmdline::qmp_socket(spec);
        // Left by a daemon of an earlier version, where QEMU made its own control socket.
        let _ = std::fs::remove_dir_all(spec.run_dir.join(LEGACY_VMM_DIR));
        let (handoff, output_reader) = handoff::Handoff::open(spec)?;
        let output = std::fs::File::from(handoff.output.try_clone().map_err(io("duplicating QEMU's output"))?);
        let output_err = output.try_clone().map_err(io("duplicating QEMU's output"))?;
        let cgroup = Cgroup::required(Path::new(crate::cgroup::ROOT), &process_name(&spec.id))?;
        cgroup.create(&spec.limits)?;

        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(cmdline::args(spec, &self.host, &handoff.fds()))
            .args(extra)
            // Nothing of the daemon's environment (keys an operator exported, say) reaches it.
            .env_clear()
            .current_dir(&spec.run_dir)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(output_err)
            .kill_on_drop(false);
        let pid_report = match self.prepare_jail(spec, &cgroup, &handoff, &mut cmd) {
            Ok(read_end) => read_end,
            Err(e) => {
                cgroup.remove();
                return Err(e);
            }
        };
        let spawned = cmd.spawn();
        // Closes the parent's copies of everything the child was handed.
        drop(cmd);
        drop(handoff);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                cgroup.remove();
                return Err(EngineError::EarlyExit(format!("{e}: {}", vmm_output(spec, output_reader).await)));
            }
        };
        // The child was the jail's intermediate process: it has reported QEMU's pid and exited
        // (tokio reaps it). QEMU is reparented to us.
        let pid = jail::read_pid(pid_report)?;
        drop(child);
        let exit = ExitWatch::pid(pid, Some(cgroup)).map_err(io(format!("watching pid {pid}")))?;
        let vm = QemuVm { pid, exit, qmp_path };
        if let Err(e) = vm.wait_for_qmp().await {
            vm.terminate().await;
            return Err(match e {
                EngineError::EarlyExit(why) => {
                    EngineError::EarlyExit(format!("{why}: {}", vmm_output(spec, output_reader).await))
                }
                other => other,
            });
        }
        tracing::debug!(id = %spec.id, pid, "VM process started");
        Ok(vm)
    }

    /// Readies the files the jailed VM works on and installs the jail (see `jail`); returns the
    /// read end of the pipe the jail reports QEMU's pid on.
    fn prepare_jail(
        &self,
        spec: &VmSpec,
        cgroup: &Cgroup,
        handoff: &handoff::Handoff,
        cmd: &mut tokio::process::Command,
    ) -> Result<std::os::fd::OwnedFd, EngineError> {
        // QEMU cannot create files in the run directory, so what it writes exists beforehand.
        let memory = snapshot::memory_file(&spec.run_dir);
        let ram = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&memory)
            .map_err(io(format!("opening {}", memory.display())))?;
        let size = u64::from(spec.memory_mib) << 20;
        if ram.metadata().map_err(io("stat of the RAM file"))?.len() < size {
            // Sparse: only the pages the guest touches are ever allocated.
            ram.set_len(size).map_err(io(format!("sizing {}", memory.display())))?;
        }
        jail::prepare_run_dir(
            &spec.run_dir,
            &spec.jail,
            &[cmdline::disk(spec), memory],
            std::slice::from_ref(&spec.secret_file),
        )?;
        let (read_end, write_end) = jail::pid_pipe()?;
        let fds = handoff.fds();
        let plan = jail::Plan::new(
            &spec.jail,
            &spec.run_dir,
            &cgroup.procs_files(),
            self.host.accel == Accel::Kvm,
            write_end,
            vec![fds.tap, fds.qmp, fds.console],
        )?;
        // SAFETY: `Plan::enter` makes only async-signal-safe calls on memory prepared here.
        unsafe {
            cmd.pre_exec(move || plan.enter());
        }
        Ok(read_end)
    }
}

/// The end of what QEMU printed, once it has all reached the log (QEMU is gone).
async fn vmm_output(spec: &VmSpec, reader: handoff::OutputReader) -> String {
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    crate::logs::VMM.tail(&spec.run_dir, 20)
}

/// Leave RAM that lives in a shared file out of the migration stream: the file already is the RAM.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Polls `query-migrate` until the migration ends; `Err` carries QEMU's reason. Only device
/// state is streamed (RAM is the shared file), a few hundred KiB: a minute means it is stuck.
async fn wait_for_migration(qmp: &mut Qmp) -> Result<(), String> {
    tokio::time::timeout(MIGRATION_TIMEOUT, poll_migration(qmp))
        .await
        .unwrap_or_else(|_| Err(format!("not finished within {} s", MIGRATION_TIMEOUT.as_secs())))
}

async fn poll_migration(qmp: &mut Qmp) -> Result<(), String> {
    loop {
        let info = qmp.execute("query-migrate", None).await.map_err(|e| e.to_string())?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(info["error-desc"].as_str().unwrap_or("no reason given").to_owned());
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
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
        ENGINE
    }

    fn accel(&self) -> Accel {
        self.host.accel
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { kvm_only: false, shared_ram_file: true, cow_disks: true }
    }

    fn extra_memory_mib(&self) -> u32 {
        match self.host.accel {
            Accel::Tcg => self.host.tcg_code_cache_mib,
            Accel::Kvm => 0,
        }
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        self.prepare_disk(spec).await?;
        Ok(Box::new(self.spawn(spec, &[]).await?))
    }

    async fn restore(&self, spec: &VmSpec, source: SnapshotSource<'_>) -> Result<Box<dyn Vm>, EngineError> {
        let (from, template) = match source {
            SnapshotSource::Own => (spec.run_dir.as_path(), None),
            SnapshotSource::Template(dir) => (dir, Some(dir)),
        };
        snapshot::verify(from, self.name(), spec.vcpus, spec.memory_mib)?;
        if let Some(dir) = template {
            template::copy_memory(dir, &spec.run_dir).await?;
        }
        self.prepare_disk(spec).await?;
        // -S: the CPUs stay stopped after the state is loaded until we say `cont`.
        let vm = self.spawn(spec, &["-incoming", "defer", "-S"]).await?;
        let loaded = async {
            let mut qmp = Qmp::connect(&vm.qmp_path).await?;
            qmp.execute("migrate-set-capabilities", Some(ignore_shared())).await?;
            let state_path = snapshot::state_file(from);
            let state = std::fs::File::open(&state_path).map_err(io(format!("opening {}", state_path.display())))?;
            qmp.send_fd("incoming", state.as_fd()).await?;
            qmp.execute("migrate-incoming", Some(json!({ "uri": "fd:incoming" }))).await?;
            wait_for_migration(&mut qmp).await.map_err(EngineError::Load)?;
            // From `cont` on the guest writes to mem.ram: the snapshot stops existing first, so
            // nothing can ever restore a half-used one. A template is never written.
            if template.is_none() {
                snapshot::consume(&spec.run_dir)?;
            }
            qmp.execute("cont", None).await?;
            Ok::<_, EngineError>(())
        };
        if let Err(e) = loaded.await {
            vm.terminate().await;
            return Err(e);
        }
        Ok(Box::new(vm))
    }

    async fn capture_template(
        &self,
        run_dir: &Path,
        template_dir: &Path,
        reader_group: u32,
    ) -> Result<(), EngineError> {
        template::capture(run_dir, template_dir, reader_group).await
    }

    fn find_vm(&self, id: &str) -> Option<u32> {
        vm_pids(id).first().copied()
    }

    fn release_run_dir(&self, run_dir: &Path) {
        let _ = std::fs::remove_file(run_dir.join(cmdline::QMP_SOCKET));
        let _ = std::fs::remove_dir_all(run_dir.join(LEGACY_VMM_DIR));
    }

    async fn kill_stale(&self, id: &str) -> usize {
        kill_stale_vms(id).await
    }

    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, EngineError> {
        if !is_vm_of(&spec.id, pid) {
            return Err(EngineError::NotOurs { pid, id: spec.id.clone() });
        }
        let cgroup = Cgroup::for_vm(&process_name(&spec.id));
        let exit = ExitWatch::pid(pid, cgroup).map_err(io(format!("watching pid {pid}")))?;
        // A VM started by a daemon from before descriptors were handed over (an upgrade) has
        // its socket in `vmm/` and writes its console itself; it gets the new layout at its next
        // start or resume.
        let legacy_qmp = spec.run_dir.join(LEGACY_VMM_DIR).join("qmp.sock");
        let qmp_path = if legacy_qmp.exists() { legacy_qmp } else { cmdline::qmp_socket(spec) };
        crate::logs::CONSOLE.reattach(&spec.run_dir)?;
        crate::logs::VMM.reattach(&spec.run_dir)?;
        let vm = QemuVm { pid, exit, qmp_path };
        let mut qmp = Qmp::connect(&vm.qmp_path).await?;
        qmp.execute("query-status", None).await?;
        Ok(Box::new(vm))
    }
}

/// Kills every VM process of sandbox `id` (every process in its cgroup, so a VM whose pid was
/// never recorded is found too) and waits for each to go. Returns how many it killed. Needs no
/// engine instance: usable even when QEMU has been uninstalled since.
pub async fn kill_stale_vms(id: &str) -> usize {
    let mut killed = 0;
    let cgroup = Cgroup::for_vm(&process_name(id));
    for pid in vm_pids(id) {
        let Ok(exit) = ExitWatch::pid(pid, cgroup.clone()) else { continue };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = tokio::time::timeout(QUIT_GRACE, exit.wait()).await;
        killed += 1;
    }
    if let Some(cgroup) = cgroup {
        cgroup.remove();
    }
    killed
}

/// The VM processes of sandbox `id`: those in its cgroup. Only root can put a process there,
/// so a process that merely names the sandbox on its command line is never taken for its VM.
fn vm_pids(id: &str) -> Vec<u32> {
    Cgroup::for_vm(&process_name(id)).map(|c| c.pids()).unwrap_or_default()
}

fn is_vm_of(id: &str, pid: u32) -> bool {
    vm_pids(id).contains(&pid)
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

    /// The control socket of a VM that is gone: nothing listens on it any more.
    fn forget_socket(&self) {
        if self.exit.exited() {
            let _ = std::fs::remove_file(&self.qmp_path);
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
        // The socket stays: whoever waits here (the VM monitor) holds no op lock, and by the time
        // it runs the same path may belong to the sandbox's next VM. The next spawn replaces it.
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
        self.forget_socket();
    }

    async fn pause_to_snapshot(&self, spec: &VmSpec) -> Result<SnapshotMeta, EngineError> {
        let tmp = snapshot::state_temp_file(&spec.run_dir);
        let _ = std::fs::remove_file(&tmp);
        let mut qmp = Qmp::connect(&self.qmp_path).await?;
        qmp.execute("migrate-set-capabilities", Some(ignore_shared())).await?;
        // 7.2's default of 32 MiB/s would make even the small device state crawl.
        qmp.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": 100u64 << 30 }))).await?;
        qmp.execute("stop", None).await?;
        let saved = async {
            let file = std::fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&tmp)
                .map_err(io(format!("creating {}", tmp.display())))?;
            qmp.send_fd("outgoing", file.as_fd()).await?;
            qmp.execute("migrate", Some(json!({ "uri": "fd:outgoing" }))).await?;
            wait_for_migration(&mut qmp).await.map_err(EngineError::Save)?;
            // Sealed while the guest is stopped but QEMU still alive: if sealing fails (disk
            // full), the guest simply runs on.
            Ok::<_, EngineError>(snapshot::seal(&spec.run_dir, ENGINE, spec.vcpus, spec.memory_mib)?)
        };
        let meta = match saved.await {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                qmp.execute("cont", None).await?;
                return Err(e);
            }
        };
        let _ = qmp.execute("quit", None).await;
        if tokio::time::timeout(QUIT_GRACE, self.exit.wait()).await.is_err() {
            self.kill();
            let _ = tokio::time::timeout(QUIT_GRACE, self.exit.wait()).await;
        }
        self.forget_socket();
        Ok(meta)
    }

    async fn guest_running(&self) -> Result<bool, EngineError> {
        let mut qmp = Qmp::connect(&self.qmp_path).await?;
        let status = qmp.execute("query-status", None).await?;
        Ok(status["running"].as_bool().unwrap_or(false))
    }

    async fn continue_guest(&self) -> Result<(), EngineError> {
        let mut qmp = Qmp::connect(&self.qmp_path).await?;
        qmp.execute("cont", None).await?;
        Ok(())
    }
}
