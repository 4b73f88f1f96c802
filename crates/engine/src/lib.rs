//! The microVM engine. Everything backend-specific (command lines, control sockets, process
//! handling, how disks are layered, how guest RAM and the device state are kept, which files a
//! snapshot or a template is made of) stays behind [`Engine`] and [`Vm`]. The control plane
//! opens an engine with [`open`] and only sees [`VmSpec`], [`VmExit`], [`Capabilities`] and
//! directories it hands over; which backend runs is decided here, so a Firecracker backend
//! slots in beside `qemu/` without touching the control plane.

mod accel;
pub mod cgroup;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod jail;
pub mod logs;
mod process;
pub mod qemu;
pub mod snapshot;
mod tsc;

pub use accel::{choose as choose_accel, Accel, AccelChoice, AccelPreference, HostVirt};
pub use cgroup::Limits;
pub use jail::JailSpec;
pub use snapshot::{SnapshotError, SnapshotMeta};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{binary} was not found; run `apt-get install {package}`")]
    MissingBinary { binary: String, package: &'static str },
    #[error(
        "no cgroup hierarchy with the cpu, memory and pids controllers under {root}: a VM's limits could not be \
         enforced, so none is started (mount cgroup v2 with those controllers delegated, or the v1 controllers)"
    )]
    NoCgroups { root: PathBuf },
    #[error("accelerator {0} was requested but /dev/kvm is not usable on this host")]
    KvmUnavailable(String),
    #[error("creating the sandbox disk failed: {0}")]
    Disk(String),
    #[error("making template {dir}: {reason}")]
    Template { dir: PathBuf, reason: String },
    #[error("starting the VM process failed")]
    Spawn(#[source] std::io::Error),
    #[error("the VM process exited during start-up: {0}")]
    EarlyExit(String),
    #[error("VM control socket: {0}")]
    Qmp(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} is not the VM of sandbox {id}")]
    NotOurs { pid: u32, id: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("saving the VM state failed: {0}")]
    Save(String),
    #[error("loading the VM state failed: {0}")]
    Load(String),
}

/// Maps an I/O error to `EngineError::Io` with what was being done.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let context = context.into();
    move |source| EngineError::Io { context, source }
}

/// What a sandbox's disk starts as. The sandbox writes to a copy-on-write layer over it, which
/// the engine creates (and lays out as it likes) in the run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseDisk {
    /// A guest image's root filesystem (raw, read-only).
    Image(PathBuf),
    /// The disk of a template made by [`Engine::capture_template`] in this directory.
    Template(PathBuf),
}

/// Which snapshot [`Engine::restore`] boots from.
#[derive(Debug, Clone, Copy)]
pub enum SnapshotSource<'a> {
    /// The sandbox's own, in its run directory; consumed by the restore.
    Own,
    /// A template's, made by [`Engine::capture_template`] in this directory; only read.
    Template(&'a Path),
}

/// Everything needed to boot one sandbox. Paths are absolute; `run_dir` belongs to this sandbox.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub base_disk: BaseDisk,

    pub run_dir: PathBuf,
    /// Network namespace the VM process runs in, and the tap device it opens there.
    pub netns_path: PathBuf,
    pub tap: String,
    pub mac: String,
    /// File holding the sandbox secret, handed to the guest out of band.
    pub secret_file: PathBuf,
    /// Appended to the kernel command line (debugging, fault injection).
    pub kernel_args_extra: String,
    /// Who the VM process runs as and what it sees.
    pub jail: JailSpec,
    /// Its cgroup's limits.
    pub limits: Limits,
}

/// What differs between backends, for the control plane to ask rather than assume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Runs only with hardware virtualisation (no software emulation).
    pub kvm_only: bool,
    /// Guest RAM lives in a file in the run directory while the VM runs, so a pause writes no
    /// RAM and a paused sandbox stores exactly the pages its guest touched.
    pub shared_ram_file: bool,
    /// Clones of a template share its disk blocks until they write them.
    pub cow_disks: bool,
}

/// How to open the engine: the backend and its settings. Part of the daemon's configuration
/// file (top-level keys); the daemon takes these keys out by [`EngineConfig::KEYS`] and leaves
/// their meaning to this crate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// The QEMU executable (a name is looked up on `PATH`).
    pub qemu: String,
    /// `auto` (KVM where it can boot stock kernels, else TCG), `kvm` or `tcg`.
    pub accel: AccelPreference,
    /// Under TCG, the translated-code cache of each VM, in MiB, added to its memory limit.
    /// QEMU's own default (1 GiB) fills as the guest runs new code and would outgrow any
    /// sensible limit; smaller costs some speed when many different programs run.
    pub tcg_code_cache_mib: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { qemu: "qemu-system-x86_64".into(), accel: AccelPreference::Auto, tcg_code_cache_mib: 128 }
    }
}

impl EngineConfig {
    /// The configuration keys that are the engine's.
    pub const KEYS: &'static [&'static str] = &["qemu", "accel", "tcg_code_cache_mib"];

    /// `Err((key, why))` for a setting out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(16..=1024).contains(&self.tcg_code_cache_mib) {
            return Err(("tcg_code_cache_mib", "must be between 16 and 1024".into()));
        }
        if self.qemu.is_empty() {
            return Err(("qemu", "must name the QEMU executable".into()));
        }
        Ok(())
    }
}

/// An engine for this host, and a line for the operator if it had to settle for less than
/// asked (`auto` finding no usable KVM). The backend is chosen here: QEMU today.
pub fn open(cfg: &EngineConfig) -> Result<(Arc<dyn Engine>, Option<String>), EngineError> {
    let choice = choose_accel(cfg.accel, HostVirt::probe())?;
    become_subreaper();
    let engine = qemu::QemuEngine::new(&cfg.qemu, choice.accel, cfg.tcg_code_cache_mib)?;
    Ok((Arc::new(engine), choice.warning))
}

/// A jailed VM's parent is an intermediate process that exits at once; as a subreaper the
/// daemon inherits the VM, and so can reap it and learn how it ended, whatever the backend.
fn become_subreaper() {
    // SAFETY: prctl with these arguments only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::warn!("cannot become a child subreaper: exits of jailed VMs will lack their status");
    }
}

/// Kills every VM process of sandbox `id` whatever backend started it, without an engine (its
/// binary may have been uninstalled since the VM started). Returns how many it killed.
pub async fn kill_stale_vms(id: &str) -> usize {
    qemu::kill_stale_vms(id).await
}

/// Why a VM process is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub description: String,
}

#[async_trait]
pub trait Engine: Send + Sync {
    fn name(&self) -> &'static str;
    fn accel(&self) -> Accel;
    fn capabilities(&self) -> Capabilities;
    /// Memory each VM process needs on top of the guest's RAM and the configured VMM overhead
    /// (under TCG, QEMU's translated-code cache), in MiB: part of its cgroup's limit.
    fn extra_memory_mib(&self) -> u32;
    /// Starts the VM (creating its disk layer over `spec.base_disk` unless it exists). Returns
    /// once the VMM answers on its control socket.
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError>;
    /// Takes over a VM started by an earlier daemon, after checking `pid` really is it.
    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, EngineError>;
    /// Boots the VM from a complete snapshot (see [`snapshot`]) and returns once the guest runs
    /// again. From a template, the sandbox gets its own RAM and disk layer first (sharing the
    /// template's blocks where the filesystem can).
    async fn restore(&self, spec: &VmSpec, from: SnapshotSource<'_>) -> Result<Box<dyn Vm>, EngineError>;
    /// Turns the snapshot and disk of the paused sandbox in `run_dir` into a template in
    /// `template_dir` (which exists and is empty): they are moved, not copied. Afterwards the
    /// VMs of the template's clones, which have `reader_group` among their groups, can read it
    /// and nothing can write it.
    async fn capture_template(&self, run_dir: &Path, template_dir: &Path, reader_group: u32)
        -> Result<(), EngineError>;
    /// The pid of a running VM process of sandbox `id`, found without any record of it.
    fn find_vm(&self, id: &str) -> Option<u32>;
    /// Kills every VM process of sandbox `id` that no live handle owns (left by an earlier
    /// daemon, or by an operation cut short before its pid was recorded). Returns how many.
    async fn kill_stale(&self, id: &str) -> usize;
    /// Removes what a VM that is gone left in its run directory besides its disk and snapshot
    /// (its control socket, for QEMU), once the sandbox is stopped.
    fn release_run_dir(&self, run_dir: &Path);
}

#[async_trait]
pub trait Vm: Send + Sync {
    fn pid(&self) -> u32;
    /// Resolves when the VM process is gone, for whatever reason.
    async fn wait_exit(&self) -> VmExit;
    /// Asks the VMM to exit now (the guest gets no warning), then kills it if it lingers.
    async fn terminate(&self);
    /// Stops the guest, writes a complete snapshot to `spec.run_dir` and ends the VM process.
    /// On failure the guest is running again and nothing was sealed.
    async fn pause_to_snapshot(&self, spec: &VmSpec) -> Result<SnapshotMeta, EngineError>;
    /// Whether the guest's CPUs are running (not stopped, e.g. by a pause cut short).
    async fn guest_running(&self) -> Result<bool, EngineError>;
    /// Lets a stopped guest run again.
    async fn continue_guest(&self) -> Result<(), EngineError>;
}
