//! One cgroup per VM process: CPU time from its vCPUs, memory from its RAM plus the VMM's
//! overhead, a process count, and a disk I/O weight.
//!
//! cgroup v2 (the unified hierarchy, Debian 12's default) is used where its controllers are
//! available; hosts still on the legacy v1 hierarchies get the same limits through the v1
//! controllers (`cpu`, `memory`, `pids`, `blkio`).

use std::path::{Path, PathBuf};

use crate::EngineError;

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period: the quota is `vcpus` periods per period.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// CPU time per 100 ms period, in µs (vCPUs × 100 000).
    pub cpu_quota_us: u64,
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
        let controllers = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers")).unwrap_or_default();
        if ["cpu", "memory", "pids"].iter().all(|c| controllers.split_whitespace().any(|w| w == *c)) {
            return Some(Hierarchy::V2);
        }
        if ["cpu", "memory", "pids"].iter().all(|c| Path::new(ROOT).join(c).join("cgroup.procs").exists()) {
            return Some(Hierarchy::V1);
        }
        None
    }
}

/// The cgroup(s) of one VM: one directory on v2, one per controller on v1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub hierarchy: Hierarchy,
    dirs: Vec<PathBuf>,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io { context, source }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), EngineError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(io_err(format!("writing {value:?} to {}", path.display())))
}

impl Cgroup {
    /// The cgroup of VM `name` (it may not exist yet).
    pub fn for_vm(hierarchy: Hierarchy, name: &str) -> Self {
        let dirs = match hierarchy {
            Hierarchy::V2 => vec![Path::new(ROOT).join("torpor").join(name)],
            Hierarchy::V1 => ["cpu", "memory", "pids", "blkio"]
                .iter()
                .map(|c| Path::new(ROOT).join(c))
                .filter(|c| c.exists())
                .map(|c| c.join("torpor").join(name))
                .collect(),
        };
        Self { hierarchy, dirs }
    }

    /// Creates the cgroup with `limits`. A leftover of the same name (a crash) is reused.
    pub fn create(&self, limits: &Limits) -> Result<(), EngineError> {
        if self.hierarchy == Hierarchy::V2 {
            // Controllers must be enabled on every level above the one that uses them.
            let parent = Path::new(ROOT).join("torpor");
            std::fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
            let available = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers")).unwrap_or_default();
            for level in [Path::new(ROOT), parent.as_path()] {
                for c in ["cpu", "memory", "pids", "io"] {
                    if available.split_whitespace().any(|w| w == c) {
                        write(level, "cgroup.subtree_control", &format!("+{c}"))?;
                    }
                }
            }
        }
        for dir in &self.dirs {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating cgroup {}", dir.display())))?;
        }
        match self.hierarchy {
            Hierarchy::V2 => {
                let dir = &self.dirs[0];
                write(dir, "cpu.max", &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us))?;
                write(dir, "memory.max", &limits.memory_bytes.to_string())?;
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
                        "memory" => write(dir, "memory.limit_in_bytes", &limits.memory_bytes.to_string())?,
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
        self.procs_files().iter().any(|f| std::fs::read_to_string(f).is_ok_and(|s| !s.trim().is_empty()))
    }
}

fn controller_of(dir: &Path) -> &str {
    // <ROOT>/<controller>/torpor/<name>
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

    #[test]
    fn v1_directories_name_their_controller() {
        let cg = Cgroup { hierarchy: Hierarchy::V1, dirs: vec![PathBuf::from("/sys/fs/cgroup/memory/torpor/sb-x")] };
        assert_eq!(controller_of(&cg.dirs[0]), "memory");
    }
}
