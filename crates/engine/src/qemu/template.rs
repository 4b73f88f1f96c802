//! Templates and their clones, QEMU's way. A template is a paused sandbox's snapshot and disk
//! layer, moved into a directory of its own. A clone's disk is a qcow2 layer over the
//! template's; its RAM file is a reflink of the template's where the filesystem can (nothing
//! copied), else a sparse copy of the pages the template touched: the clone then owns a shared
//! RAM file like any sandbox, so even its first pause writes no RAM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::snapshot;
use crate::EngineError;

/// What a template is made of: the snapshot (RAM, device state, metadata) and the disk layer.
pub(super) const FILES: [&str; 4] = [snapshot::FILES[0], snapshot::FILES[1], snapshot::FILES[2], super::cmdline::DISK];

/// Moves the paused sandbox's files into `template_dir`, frees the zeroed blocks of its RAM
/// image and lets only `reader_group` read it.
pub(super) async fn capture(run_dir: &Path, template_dir: &Path, reader_group: u32) -> Result<(), EngineError> {
    let fail = |reason: String| EngineError::Template { dir: template_dir.to_owned(), reason };
    if !snapshot::exists(run_dir) {
        return Err(fail(format!("{} holds no complete snapshot", run_dir.display())));
    }
    for file in FILES {
        std::fs::rename(run_dir.join(file), template_dir.join(file))
            .map_err(|e| fail(format!("moving {file}: {e}")))?;
    }
    dig_holes(&snapshot::memory_file(template_dir)).await;
    // Root's, readable (never writable) by the VMs of its clones, which read its disk layer as
    // their backing file and its RAM as the start of theirs.
    let share = |p: &Path, mode: u32| {
        std::os::unix::fs::chown(p, Some(0), Some(reader_group))
            .and_then(|_| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| fail(format!("securing {}: {e}", p.display())))
    };
    share(template_dir, 0o750)?;
    for file in FILES {
        share(&template_dir.join(file), 0o640)?;
    }
    Ok(())
}

/// Frees the blocks of a template's memory image that hold only zeros. Every clone copies the
/// image's allocated blocks (where there is no reflink), so memory the guest zeroed before the
/// capture costs neither disk nor create time. Best effort: a template with its zeros still
/// allocated is only bigger.
async fn dig_holes(mem: &Path) {
    let out = tokio::process::Command::new("fallocate").arg("--dig-holes").arg(mem).output().await;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            tracing::warn!(file = %mem.display(), error = %String::from_utf8_lossy(&o.stderr).trim(), "fallocate --dig-holes failed")
        }
        Err(e) => tracing::warn!(file = %mem.display(), error = %e, "fallocate --dig-holes could not run"),
    }
}

/// The clone's own RAM file: a reflink where the filesystem supports one, else a copy of only
/// the allocated blocks.
pub(super) async fn copy_memory(template_dir: &Path, run_dir: &Path) -> Result<(), EngineError> {
    let (from, to) = (snapshot::memory_file(template_dir), snapshot::memory_file(run_dir));
    let out = tokio::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(&from)
        .arg(&to)
        .output()
        .await
        .map_err(crate::io("running cp"))?;
    if !out.status.success() {
        return Err(EngineError::Load(format!(
            "copying the memory of template {}: {}",
            template_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
