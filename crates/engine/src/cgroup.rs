//! One cgroup per VM process: CPU time from its vCPUs, memory from its RAM plus the VMM's
//! overhead (no swap), a process count, and a disk I/O weight.
//!
//! cgroup v2 (the unified hierarchy, Debian 12's default) is used where its controllers are
//! available; hosts still on the legacy v1 hierarchies get the same limits through the v1
//! controllers (`cpu`, `memory`, `pids`, `blkio`). A host offering neither cannot enforce the
//! limits, and then no VM starts: limits that are reported but not enforced would be a lie.
//!
//! The cgroup is also how a VM is recognised: its `cgroup.procs` is root's to write, so a
//! process found there is the VM, whatever its command line says.

use std::path::{Path, PathBuf};

use crate::{io, EngineError};

/// Where the hierarchies are mounted on a normal host.
pub const ROOT: &str = "/sys/fs/cgroup";
/// CFS period: the quota is `vcpus` periods per period.
const CPU_PERIOD_US: u64 = 100_000;
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// CPU time per 100 ms period, in µs (vCPUs × 100 000).
    pub cpu_quota_us: u64,
    /// RAM and swap together (swap is not allowed).
    pub memory_bytes: u64,
    pub pids: u64,
    /// Disk I/O weight, 1–1000 (100 is the default share); applied where the host's I/O
    /// scheduler supports weights.
    pub io_weight: u16,
}

impl Limits {
    pub fn new(vcpus: u32, memory_mib: u32, overhead_mib: u32, pids: u64, io_weight: u16) -> Self {
        Self {
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            memory_bytes: (u64::from(memory_mib) + u64::from(overhead_mib)) << 20,
            pids,
            io_weight,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    V2,
    V1,
}

impl Hierarchy {
    /// Which hierarchy this host offers the controllers in, if any.
    pub fn detect() -> Option<Self> {
        Self::detect_at(Path::new(ROOT))
    }

    pub fn detect_at(root: &Path) -> Option<Self> {
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if CONTROLLERS.iter().all(|c| controllers.split_whitespace().any(|w| w == *c)) {
            return Some(Hierarchy::V2);
        }
        if CONTROLLERS.iter().all(|c| root.join(c).join("cgroup.procs").exists()) {
            return Some(Hierarchy::V1);
        }
        None
    }
}

/// The cgroup(s) of one VM: one directory on v2, one per controller on v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub hierarchy: Hierarchy,
    root: PathBuf,
    dirs: Vec<PathBuf>,
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), EngineError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io(format!("writing {value:?} to {}", path.display())))
}

/// `key value` lines (memory.events, memory.oom_control): the value of `key`.
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Cgroup {
    /// The cgroup of VM `name` on this host, if the host has a usable hierarchy.
    pub fn for_vm(name: &str) -> Option<Self> {
        Self::for_vm_at(Path::new(ROOT), name)
    }

    /// The same, with the hierarchies mounted at `root`.
    pub fn for_vm_at(root: &Path, name: &str) -> Option<Self> {
        let hierarchy = Hierarchy::detect_at(root)?;
        let dirs = match hierarchy {
            Hierarchy::V2 => vec![root.join("torpor").join(name)],
            Hierarchy::V1 => ["cpu", "memory", "pids", "blkio"]
                .iter()
                .map(|c| root.join(c))
                .filter(|c| c.exists())
                .map(|c| c.join("torpor").join(name))
                .collect(),
        };
        Some(Self { hierarchy, root: root.to_path_buf(), dirs })
    }

    /// The cgroup a VM with `limits` runs in. With no usable hierarchy this is an error, not a
    /// VM without limits.
    pub fn required(root: &Path, name: &str) -> Result<Self, EngineError> {
        Self::for_vm_at(root, name).ok_or_else(|| EngineError::NoCgroups { root: root.to_path_buf() })
    }

    /// Creates the cgroup with `limits`. A leftover of the same name (a crash) is reused.
    pub fn create(&self, limits: &Limits) -> Result<(), EngineError> {
        if self.hierarchy == Hierarchy::V2 {
            // Controllers must be enabled on every level above the one that uses them.
            let parent = self.root.join("torpor");
            std::fs::create_dir_all(&parent).map_err(io(format!("creating {}", parent.display())))?;
            let available = std::fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
            for level in [self.root.as_path(), parent.as_path()] {
                for c in ["cpu", "memory", "pids", "io"] {
                    if available.split_whitespace().any(|w| w == c) {
                        write(level, "cgroup.subtree_control", &format!("+{c}"))?;
                    }
                }
            }
        }
        for dir in &self.dirs {
            std::fs::create_dir_all(dir).map_err(io(format!("creating cgroup {}", dir.display())))?;
        }
        let memory = limits.memory_bytes.to_string();
        match self.hierarchy {
            Hierarchy::V2 => {
                let dir = &self.dirs[0];
                write(dir, "cpu.max", &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us))?;
                write(dir, "memory.max", &memory)?;
                // No swap: a VM over its limit reclaims (its RAM is a file it can write back)
                // rather than push the host into swap.
                if dir.join("memory.swap.max").exists() {
                    write(dir, "memory.swap.max", "0")?;
                }
                write(dir, "pids.max", &limits.pids.to_string())?;
                self.write_io_weight(dir, &["io.bfq.weight", "io.weight"], limits.io_weight);
            }
            Hierarchy::V1 => {
                for dir in &self.dirs {
                    match controller_of(dir) {
                        "cpu" => {
                            write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                            write(dir, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
                        }
                        "memory" => write_v1_memory(dir, &memory)?,
                        "pids" => write(dir, "pids.max", &limits.pids.to_string())?,
                        "blkio" => self.write_io_weight(dir, &["blkio.bfq.weight", "blkio.weight"], limits.io_weight),
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The weight applies only under an I/O scheduler that honours weights; elsewhere it is
    /// recorded but has no effect, so failure to set it is not an error.
    fn write_io_weight(&self, dir: &Path, files: &[&str], weight: u16) {
        for file in files {
            if dir.join(file).exists() {
                let value =
                    if file.starts_with("io.weight") { format!("default {weight}") } else { weight.to_string() };
                if write(dir, file, &value).is_ok() {
                    return;
                }
            }
        }
    }

    /// `cgroup.procs` of every directory: a process writing "0" to each joins the cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The processes in the cgroup (from its first directory: a VM joins all of them at once).
    pub fn pids(&self) -> Vec<u32> {
        let Some(procs) = self.procs_files().into_iter().next() else { return Vec::new() };
        std::fs::read_to_string(procs)
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes the cgroup; its processes must have exited. Idempotent.
    pub fn remove(&self) {
        for dir in &self.dirs {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir(dir) {
                    tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove a VM's cgroup");
                }
            }
        }
    }

    /// Whether any process is still in it.
    pub fn populated(&self) -> bool {
        !self.pids().is_empty()
    }

    fn memory_dir(&self) -> Option<&Path> {
        match self.hierarchy {
            Hierarchy::V2 => self.dirs.first().map(PathBuf::as_path),
            Hierarchy::V1 => self.dirs.iter().find(|d| controller_of(d) == "memory").map(PathBuf::as_path),
        }
    }

    fn memory_file(&self, v2: &str, v1: &str) -> Option<String> {
        let file = match self.hierarchy {
            Hierarchy::V2 => v2,
            Hierarchy::V1 => v1,
        };
        std::fs::read_to_string(self.memory_dir()?.join(file)).ok()
    }

    /// Processes of this cgroup the out-of-memory killer has killed.
    pub fn oom_kills(&self) -> u64 {
        self.memory_file("memory.events", "memory.oom_control").and_then(|t| keyed_value(&t, "oom_kill")).unwrap_or(0)
    }

    /// Memory charged to the cgroup now (its processes' anonymous memory and page cache).
    pub fn memory_usage_bytes(&self) -> Option<u64> {
        self.memory_file("memory.current", "memory.usage_in_bytes")?.trim().parse().ok()
    }

    /// If the out-of-memory killer has killed a process of this cgroup: its memory limit.
    pub fn oom_killed(&self) -> Option<u64> {
        if self.oom_kills() == 0 {
            return None;
        }
        self.memory_file("memory.max", "memory.limit_in_bytes")?.trim().parse().ok()
    }
}

/// v1 keeps swap apart: `memsw` (RAM + swap) gets the same limit, so none of it is swap. Each
/// must stay at least the other while they change, so the order depends on the direction.
fn write_v1_memory(dir: &Path, bytes: &str) -> Result<(), EngineError> {
    let memsw = dir.join("memory.memsw.limit_in_bytes").exists();
    if !memsw {
        return write(dir, "memory.limit_in_bytes", bytes);
    }
    if write(dir, "memory.limit_in_bytes", bytes).is_ok() {
        return write(dir, "memory.memsw.limit_in_bytes", bytes);
    }
    write(dir, "memory.memsw.limit_in_bytes", bytes)?;
    write(dir, "memory.limit_in_bytes", bytes)
}

fn controller_of(dir: &Path) -> &str {
    // <root>/<controller>/torpor/<name>
    dir.parent().and_then(Path::parent).and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_machine() {
        let l = Limits::new(2, 512, 256, 512, 100);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.memory_bytes, 768 << 20);
    }

    /// A v1 layout like this host's, in a plain directory.
    fn fake_v1(root: &Path) {
        for c in ["cpu", "memory", "pids", "blkio"] {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::write(root.join(c).join("cgroup.procs"), "").unwrap();
        }
    }

    #[test]
    fn no_hierarchy_means_no_vm() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(Cgroup::required(root.path(), "torpor-sb-x"), Err(EngineError::NoCgroups { .. })));
        // v2 mounted without the controllers (this host) is no hierarchy either.
        std::fs::write(root.path().join("cgroup.controllers"), "cpuset io\n").unwrap();
        assert!(Cgroup::required(root.path(), "torpor-sb-x").is_err());
    }

    #[test]
    fn v1_limits_memory_and_swap_together() {
        let root = tempfile::tempdir().unwrap();
        fake_v1(root.path());
        let cg = Cgroup::required(root.path(), "torpor-sb-x").unwrap();
        assert_eq!(cg.hierarchy, Hierarchy::V1);
        let memory = root.path().join("memory/torpor/torpor-sb-x");
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::write(memory.join("memory.memsw.limit_in_bytes"), "").unwrap();
        cg.create(&Limits::new(1, 512, 256, 512, 100)).unwrap();
        let read = |f: &str| std::fs::read_to_string(memory.join(f)).unwrap();
        assert_eq!(read("memory.limit_in_bytes"), (768u64 << 20).to_string());
        assert_eq!(read("memory.memsw.limit_in_bytes"), (768u64 << 20).to_string(), "swap must not be allowed");
        assert_eq!(
            std::fs::read_to_string(root.path().join("cpu/torpor/torpor-sb-x/cpu.cfs_quota_us")).unwrap(),
            "100000"
        );
    }

    #[test]
    fn out_of_memory_kills_are_read_with_the_limit() {
        let root = tempfile::tempdir().unwrap();
        fake_v1(root.path());
        let cg = Cgroup::required(root.path(), "torpor-sb-x").unwrap();
        cg.create(&Limits::new(1, 512, 256, 512, 100)).unwrap();
        let memory = root.path().join("memory/torpor/torpor-sb-x");
        std::fs::write(memory.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").unwrap();
        assert_eq!(cg.oom_killed(), None);
        std::fs::write(memory.join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n").unwrap();
        assert_eq!(cg.oom_killed(), Some(768 << 20));
    }

    #[test]
    fn v1_directories_name_their_controller() {
        assert_eq!(controller_of(Path::new("/sys/fs/cgroup/memory/torpor/sb-x")), "memory");
    }
}
