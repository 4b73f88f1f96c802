//! The on-disk snapshot of a paused sandbox, beside its disk in the run directory:
//!
//! - `mem.ram`: guest RAM. It is the VM's memory backend while it runs (a shared file mapping),
//!   so pausing writes no RAM at all: only the pages the guest touched are ever allocated.
//! - `state.bin`: the device state stream (tens of KB).
//! - `snapshot.json`: format version, size and SHA-256 of `state.bin`, and the VM shape. It is
//!   written last, atomically: its presence means the snapshot is complete. Resuming removes it,
//!   because from then on the guest changes `mem.ram` and the snapshot no longer exists.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const FORMAT: u32 = 1;
const META: &str = "snapshot.json";
const STATE: &str = "state.bin";
const MEMORY: &str = "mem.ram";
/// Every file of a complete snapshot.
pub const FILES: [&str; 3] = [MEMORY, STATE, META];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub format: u32,
    pub engine: String,
    pub state_bytes: u64,
    pub state_sha256: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub created_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no complete snapshot in {0}")]
    Missing(PathBuf),
    #[error("snapshot {path} is unreadable: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("snapshot format {found} is not supported (this build reads format {FORMAT})")]
    Format { found: u32 },
    #[error("snapshot state {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot was taken by the {found} engine; this daemon runs {expected}")]
    Engine { found: String, expected: String },
    #[error("snapshot was taken with {found}, the sandbox now has {expected}")]
    Shape { found: String, expected: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn memory_file(run_dir: &Path) -> PathBuf {
    run_dir.join(MEMORY)
}
pub fn state_file(run_dir: &Path) -> PathBuf {
    run_dir.join(STATE)
}
pub fn state_temp_file(run_dir: &Path) -> PathBuf {
    run_dir.join("state.bin.partial")
}

pub fn exists(run_dir: &Path) -> bool {
    run_dir.join(META).is_file()
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { context, source }
}

fn sha256_file(path: &Path) -> Result<(u64, String), std::io::Error> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let n = std::io::copy(&mut file, &mut hasher)?;
    Ok((n, hex::encode(hasher.finalize())))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Seals a snapshot whose state stream was written to `state_temp_file`: fsyncs the state and
/// the RAM file, renames the state into place, then writes the metadata atomically.
pub fn seal(run_dir: &Path, engine: &str, vcpus: u32, memory_mib: u32) -> Result<SnapshotMeta, SnapshotError> {
    let tmp = state_temp_file(run_dir);
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(format!("syncing {}", tmp.display())))?;
    let (state_bytes, state_sha256) = sha256_file(&tmp).map_err(io(format!("reading {}", tmp.display())))?;
    if state_bytes == 0 {
        return Err(SnapshotError::Corrupt { path: tmp, reason: "the VM wrote an empty state stream".into() });
    }
    let mem = memory_file(run_dir);
    std::fs::File::open(&mem).and_then(|f| f.sync_all()).map_err(io(format!("syncing {}", mem.display())))?;
    std::fs::rename(&tmp, state_file(run_dir)).map_err(io(format!("renaming {}", tmp.display())))?;
    let meta = SnapshotMeta {
        format: FORMAT,
        engine: engine.to_owned(),
        state_bytes,
        state_sha256,
        vcpus,
        memory_mib,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
    };
    let path = run_dir.join(META);
    let partial = run_dir.join("snapshot.json.partial");
    let mut file = std::fs::File::create(&partial).map_err(io(format!("creating {}", partial.display())))?;
    file.write_all(&serde_json::to_vec_pretty(&meta).expect("metadata serialises"))
        .and_then(|_| file.sync_all())
        .map_err(io(format!("writing {}", partial.display())))?;
    std::fs::rename(&partial, &path).map_err(io(format!("renaming {}", partial.display())))?;
    sync_dir(run_dir);
    Ok(meta)
}

/// Reads the metadata and checks the state stream against it; the snapshot must be `engine`'s.
pub fn verify(run_dir: &Path, engine: &str, vcpus: u32, memory_mib: u32) -> Result<SnapshotMeta, SnapshotError> {
    let path = run_dir.join(META);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing(run_dir.to_path_buf()))
        }
        Err(e) => return Err(SnapshotError::Unreadable { path, reason: e.to_string() }),
    };
    let meta: SnapshotMeta = serde_json::from_str(&text)
        .map_err(|e| SnapshotError::Unreadable { path: path.clone(), reason: e.to_string() })?;
    if meta.format != FORMAT {
        return Err(SnapshotError::Format { found: meta.format });
    }
    if meta.engine != engine {
        return Err(SnapshotError::Engine { found: meta.engine, expected: engine.to_owned() });
    }
    if (meta.vcpus, meta.memory_mib) != (vcpus, memory_mib) {
        return Err(SnapshotError::Shape {
            found: format!("{} vCPUs / {} MiB", meta.vcpus, meta.memory_mib),
            expected: format!("{vcpus} vCPUs / {memory_mib} MiB"),
        });
    }
    let state = state_file(run_dir);
    let (bytes, sha) =
        sha256_file(&state).map_err(|e| SnapshotError::Corrupt { path: state.clone(), reason: e.to_string() })?;
    if bytes != meta.state_bytes {
        return Err(SnapshotError::Corrupt {
            path: state,
            reason: format!("{bytes} bytes, expected {} (truncated?)", meta.state_bytes),
        });
    }
    if sha != meta.state_sha256 {
        return Err(SnapshotError::Corrupt { path: state, reason: "SHA-256 checksum mismatch".into() });
    }
    let mem = memory_file(run_dir);
    let mem_len = std::fs::metadata(&mem).map(|m| m.len()).unwrap_or(0);
    if mem_len != u64::from(memory_mib) << 20 {
        return Err(SnapshotError::Corrupt {
            path: mem,
            reason: format!("{mem_len} bytes, expected {} MiB", memory_mib),
        });
    }
    Ok(meta)
}

/// Marks the snapshot used: from now on the guest writes to `mem.ram`. Fails if the metadata
/// could not be removed, in which case the guest must not run.
pub fn consume(run_dir: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(run_dir.join(META)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("removing {}", run_dir.join(META).display()))(e)),
    }
    let _ = std::fs::remove_file(state_file(run_dir));
    std::fs::File::open(run_dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", run_dir.display())))
}

/// Removes every snapshot file, RAM included (before a cold boot).
pub fn discard(run_dir: &Path) {
    let _ = consume(run_dir);
    let _ = std::fs::remove_file(state_temp_file(run_dir));
    let _ = std::fs::remove_file(memory_file(run_dir));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_paused(dir: &Path) {
        std::fs::write(memory_file(dir), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(state_temp_file(dir), b"device state").unwrap();
    }

    #[test]
    fn seal_then_verify_then_consume() {
        let dir = tempfile::tempdir().unwrap();
        fake_paused(dir.path());
        let meta = seal(dir.path(), "qemu", 1, 1).unwrap();
        assert_eq!(meta.state_bytes, 12);
        assert!(exists(dir.path()));
        assert_eq!(verify(dir.path(), "qemu", 1, 1).unwrap(), meta);
        assert!(matches!(verify(dir.path(), "qemu", 2, 1), Err(SnapshotError::Shape { .. })));
        // Another backend's snapshot is refused before anything reads it.
        let err = verify(dir.path(), "firecracker", 1, 1).unwrap_err();
        assert!(matches!(err, SnapshotError::Engine { .. }) && err.to_string().contains("qemu"), "{err}");
        consume(dir.path()).unwrap();
        assert!(!exists(dir.path()));
        assert!(matches!(verify(dir.path(), "qemu", 1, 1), Err(SnapshotError::Missing(_))));
        assert!(memory_file(dir.path()).exists(), "consume keeps the RAM file");
    }

    #[test]
    fn corruption_and_truncation_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        fake_paused(dir.path());
        seal(dir.path(), "qemu", 1, 1).unwrap();
        std::fs::write(state_file(dir.path()), b"device stAte").unwrap();
        let err = verify(dir.path(), "qemu", 1, 1).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        std::fs::write(state_file(dir.path()), b"device").unwrap();
        let err = verify(dir.path(), "qemu", 1, 1).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn empty_state_is_never_sealed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(memory_file(dir.path()), b"").unwrap();
        std::fs::write(state_temp_file(dir.path()), b"").unwrap();
        assert!(seal(dir.path(), "qemu", 1, 1).is_err());
        assert!(!exists(dir.path()));
    }
}
