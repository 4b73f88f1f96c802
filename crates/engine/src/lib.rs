//! The microVM engine. Everything backend-specific (QEMU command lines, QMP, process handling)
//! stays behind [`Engine`] and [`Vm`]; the control plane only sees [`VmSpec`] and [`VmExit`], so a
//! Firecracker backend can slot in later without touching it.

mod accel;
pub mod cgroup;
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

use std::path::PathBuf;

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

/// Everything needed to boot one sandbox. Paths are absolute; `run_dir` belongs to this sandbox.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Read-only base disk; the sandbox writes to a copy-on-write layer over it.
    pub base_disk: PathBuf,
    /// Format of `base_disk`: `raw` for an image, `qcow2` for a template's disk layer.
    pub base_disk_format: &'static str,

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

impl VmSpec {
    pub fn disk(&self) -> PathBuf {
        self.run_dir.join("disk.qcow2")
    }
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
    /// Memory each VM process needs on top of the guest's RAM and the configured VMM overhead
    /// (under TCG, QEMU's translated-code cache), in MiB: part of its cgroup's limit.
    fn extra_memory_mib(&self) -> u32;
    /// Creates the sandbox's copy-on-write disk unless it exists already.
    async fn prepare_disk(&self, spec: &VmSpec) -> Result<(), EngineError>;
    /// Starts the VM. Returns once the VMM answers on its control socket.
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError>;
    /// Takes over a VM started by an earlier daemon, after checking `pid` really is it.
    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, EngineError>;
    /// Boots the VM from a complete snapshot (see [`snapshot`]) and returns once the guest runs
    /// again. `template`: the directory of a template snapshot, which is only read; `None`: the
    /// sandbox's own snapshot in `spec.run_dir`, which is consumed.
    async fn restore(&self, spec: &VmSpec, template: Option<&std::path::Path>) -> Result<Box<dyn Vm>, EngineError>;
    /// The pid of a running VM process of sandbox `id`, found without any record of it.
    fn find_vm(&self, id: &str) -> Option<u32>;
    /// Kills every VM process of sandbox `id` that no live handle owns (left by an earlier
    /// daemon, or by an operation cut short before its pid was recorded). Returns how many.
    async fn kill_stale(&self, id: &str) -> usize;
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
