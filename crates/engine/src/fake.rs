//! An engine without VMs, for tests of the control plane that run without root or QEMU (feature
//! `fake`). Its "VMs" are records in memory; what it writes to disk is what the real backends
//! write and in the same format (a sparse RAM file, a sealed snapshot, a disk file), so the
//! daemon's own checks of those files run against it unchanged. Failures are scripted: the next
//! launch, restore, pause or capture fails with a given message, and a running VM can be made
//! to die.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    snapshot, Accel, BaseDisk, Capabilities, Engine, EngineError, SnapshotMeta, SnapshotSource, Vm, VmExit, VmSpec,
};

/// The name its snapshots carry: the real backends refuse them, and it refuses theirs.
pub const ENGINE: &str = "fake";
const DISK: &str = "disk.fake";

/// An operation whose next call can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Launch,
    Restore,
    Pause,
    Capture,
}

#[derive(Default)]
struct State {
    next_pid: u32,
    /// Running VMs by sandbox id: their pid and the sender that ends them.
    running: HashMap<String, (u32, watch::Sender<Option<VmExit>>)>,
    failures: HashMap<Step, String>,
    launches: u32,
    restores: u32,
}

#[derive(Clone, Default)]
pub struct FakeEngine {
    state: Arc<Mutex<State>>,
}

impl FakeEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next call of `step` fails with `message` (once).
    pub fn fail_next(&self, step: Step, message: &str) {
        self.lock().failures.insert(step, message.to_owned());
    }

    /// Ends sandbox `id`'s VM as if it had crashed; `false` if it has none.
    pub fn kill(&self, id: &str, why: &str) -> bool {
        self.find_vm(id).is_some_and(|pid| self.end(id, pid, why))
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.lock().running.contains_key(id)
    }

    /// Ends VM `pid` of sandbox `id`, if it is still the one running (a stale handle must not
    /// end its sandbox's next VM).
    fn end(&self, id: &str, pid: u32, why: &str) -> bool {
        let mut state = self.lock();
        if state.running.get(id).is_none_or(|(running, _)| *running != pid) {
            return false;
        }
        let (_, exit) = state.running.remove(id).expect("checked");
        exit.send_replace(Some(VmExit { description: why.to_owned() }));
        true
    }

    /// How many VMs were launched cold and restored from snapshots, in all.
    pub fn counts(&self) -> (u32, u32) {
        let state = self.lock();
        (state.launches, state.restores)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake engine poisoned")
    }

    fn scripted(&self, step: Step) -> Result<(), String> {
        match self.lock().failures.remove(&step) {
            Some(message) => Err(message),
            None => Ok(()),
        }
    }

    fn start(&self, spec: &VmSpec) -> Result<FakeVm, EngineError> {
        let mut state = self.lock();
        if state.running.contains_key(&spec.id) {
            return Err(EngineError::EarlyExit(format!("sandbox {} already has a VM", spec.id)));
        }
        state.next_pid += 1;
        let pid = 100_000 + state.next_pid;
        let (exit, watcher) = watch::channel(None);
        state.running.insert(spec.id.clone(), (pid, exit));
        Ok(FakeVm { pid, id: spec.id.clone(), engine: self.clone(), exit: watcher })
    }
}

/// The disk layer over `spec.base_disk`, as a backend makes it (only its existence matters).
fn prepare_disk(spec: &VmSpec) -> Result<(), EngineError> {
    let disk = spec.run_dir.join(DISK);
    if disk.exists() {
        return Ok(());
    }
    let base = match &spec.base_disk {
        BaseDisk::Image(rootfs) => rootfs.display().to_string(),
        BaseDisk::Template(dir) => dir.join(DISK).display().to_string(),
    };
    std::fs::write(&disk, base).map_err(crate::io(format!("creating {}", disk.display())))
}

#[async_trait]
impl Engine for FakeEngine {
    fn name(&self) -> &'static str {
        ENGINE
    }

    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { kvm_only: false, shared_ram_file: true, cow_disks: true }
    }

    fn extra_memory_mib(&self) -> u32 {
        0
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, EngineError> {
        self.scripted(Step::Launch).map_err(EngineError::EarlyExit)?;
        prepare_disk(spec)?;
        // Guest RAM in the run directory, as the QEMU backend keeps it: sparse, full size.
        let mem = snapshot::memory_file(&spec.run_dir);
        std::fs::File::create(&mem)
            .and_then(|f| f.set_len(u64::from(spec.memory_mib) << 20))
            .map_err(crate::io(format!("creating {}", mem.display())))?;
        let vm = self.start(spec)?;
        self.lock().launches += 1;
        Ok(Box::new(vm))
    }

    async fn adopt(&self, spec: &VmSpec, pid: u32) -> Result<Box<dyn Vm>, EngineError> {
        let state = self.lock();
        match state.running.get(&spec.id) {
            Some((running, exit)) if *running == pid => {
                Ok(Box::new(FakeVm { pid, id: spec.id.clone(), engine: self.clone(), exit: exit.subscribe() }))
            }
            _ => Err(EngineError::NotOurs { pid, id: spec.id.clone() }),
        }
    }

    async fn restore(&self, spec: &VmSpec, source: SnapshotSource<'_>) -> Result<Box<dyn Vm>, EngineError> {
        let from = match source {
            SnapshotSource::Own => spec.run_dir.clone(),
            SnapshotSource::Template(dir) => dir.to_owned(),
        };
        snapshot::verify(&from, ENGINE, spec.vcpus, spec.memory_mib)?;
        self.scripted(Step::Restore).map_err(EngineError::Load)?;
        if let SnapshotSource::Template(dir) = source {
            std::fs::copy(snapshot::memory_file(dir), snapshot::memory_file(&spec.run_dir))
                .map_err(crate::io("copying the template's memory"))?;
        }
        prepare_disk(spec)?;
        if matches!(source, SnapshotSource::Own) {
            snapshot::consume(&spec.run_dir)?;
        }
        let vm = self.start(spec)?;
        self.lock().restores += 1;
        Ok(Box::new(vm))
    }

    async fn capture_template(&self, run_dir: &Path, template_dir: &Path, _group: u32) -> Result<(), EngineError> {
        let fail = |reason: String| EngineError::Template { dir: template_dir.to_owned(), reason };
        self.scripted(Step::Capture).map_err(fail)?;
        if !snapshot::exists(run_dir) {
            return Err(fail(format!("{} holds no complete snapshot", run_dir.display())));
        }
        for file in snapshot::FILES.into_iter().chain([DISK]) {
            std::fs::rename(run_dir.join(file), template_dir.join(file))
                .map_err(|e| fail(format!("moving {file}: {e}")))?;
        }
        Ok(())
    }

    fn find_vm(&self, id: &str) -> Option<u32> {
        self.lock().running.get(id).map(|(pid, _)| *pid)
    }

    async fn kill_stale(&self, id: &str) -> usize {
        usize::from(self.kill(id, "killed as stale"))
    }

    fn release_run_dir(&self, _run_dir: &Path) {}
}

pub struct FakeVm {
    pid: u32,
    id: String,
    engine: FakeEngine,
    exit: watch::Receiver<Option<VmExit>>,
}

#[async_trait]
impl Vm for FakeVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn wait_exit(&self) -> VmExit {
        let mut exit = self.exit.clone();
        let ended = exit.wait_for(Option::is_some).await.map(|done| done.clone());
        ended.ok().flatten().unwrap_or_else(|| VmExit { description: "the fake engine is gone".into() })
    }

    async fn terminate(&self) {
        self.engine.end(&self.id, self.pid, "terminated");
    }

    async fn pause_to_snapshot(&self, spec: &VmSpec) -> Result<SnapshotMeta, EngineError> {
        self.engine.scripted(Step::Pause).map_err(EngineError::Save)?;
        let state = snapshot::state_temp_file(&spec.run_dir);
        std::fs::write(&state, format!("device state of {}", spec.id))
            .map_err(crate::io(format!("writing {}", state.display())))?;
        let meta = snapshot::seal(&spec.run_dir, ENGINE, spec.vcpus, spec.memory_mib)?;
        self.engine.end(&self.id, self.pid, "paused");
        Ok(meta)
    }

    async fn guest_running(&self) -> Result<bool, EngineError> {
        Ok(self.engine.find_vm(&self.id) == Some(self.pid))
    }

    async fn continue_guest(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// Where a test keeps a fake sandbox's files.
pub fn spec(run_dir: &Path, id: &str, base_disk: BaseDisk) -> VmSpec {
    VmSpec {
        id: id.to_owned(),
        vcpus: 1,
        memory_mib: 64,
        kernel: PathBuf::from("/nonexistent/vmlinuz"),
        initrd: PathBuf::from("/nonexistent/initrd.img"),
        base_disk,
        run_dir: run_dir.to_owned(),
        netns_path: PathBuf::from("/nonexistent/netns"),
        tap: "tap0".into(),
        mac: "02:00:00:00:00:01".into(),
        secret_file: run_dir.join("secret"),
        kernel_args_extra: String::new(),
        jail: crate::JailSpec { uid: 0, gid: 0, groups: vec![], max_file_bytes: 0, read_only: vec![] },
        limits: crate::Limits::new(1, 64, 64, 64, 100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn launch_pause_restore_and_capture_write_what_the_real_backends_write() {
        let dir = tempfile::tempdir().unwrap();
        let engine = FakeEngine::new();
        let spec = spec(dir.path(), "sb-a", BaseDisk::Image("/img/rootfs.ext4".into()));
        let vm = engine.launch(&spec).await.unwrap();
        assert!(engine.is_running("sb-a") && engine.find_vm("sb-a") == Some(vm.pid()));
        let meta = vm.pause_to_snapshot(&spec).await.unwrap();
        assert_eq!(meta.engine, ENGINE);
        assert_eq!(vm.wait_exit().await.description, "paused");
        // A real backend refuses the fake's snapshot, as it would another real one's.
        assert!(matches!(snapshot::verify(dir.path(), "qemu", 1, 64), Err(crate::SnapshotError::Engine { .. })));
        let vm = engine.restore(&spec, SnapshotSource::Own).await.unwrap();
        assert!(!snapshot::exists(dir.path()), "a restore consumes the snapshot");
        assert_eq!(engine.counts(), (1, 1));
        vm.pause_to_snapshot(&spec).await.unwrap();
        let template = tempfile::tempdir().unwrap();
        engine.capture_template(dir.path(), template.path(), 0).await.unwrap();
        let clone_dir = tempfile::tempdir().unwrap();
        let clone = super::spec(clone_dir.path(), "sb-b", BaseDisk::Template(template.path().into()));
        engine.restore(&clone, SnapshotSource::Template(template.path())).await.unwrap();
        assert!(snapshot::exists(template.path()), "a template is never consumed");
    }

    #[tokio::test]
    async fn scripted_failures_fail_once_and_a_killed_vm_reports_why() {
        let dir = tempfile::tempdir().unwrap();
        let engine = FakeEngine::new();
        let spec = spec(dir.path(), "sb-c", BaseDisk::Image("/img/rootfs.ext4".into()));
        engine.fail_next(Step::Launch, "no room");
        assert!(engine.launch(&spec).await.err().unwrap().to_string().contains("no room"));
        let vm = engine.launch(&spec).await.unwrap();
        engine.fail_next(Step::Pause, "disk full");
        assert!(vm.pause_to_snapshot(&spec).await.is_err());
        assert!(vm.guest_running().await.unwrap() && !snapshot::exists(dir.path()), "a failed pause runs on");
        assert!(engine.kill("sb-c", "out of memory"));
        assert_eq!(vm.wait_exit().await.description, "out of memory");
        assert!(!vm.guest_running().await.unwrap());
    }
}
