//! A small initramfs: busybox, the virtio modules the Debian cloud kernel builds as modules, and a
//! script that loads them, mounts the root disk and hands over to `torpor-guest` as PID 1.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::run;
use crate::{io, ImageError};

/// Modules needed before the root disk can be mounted and the supervisor can talk: the mmio
/// transport, disk, network, console, and fw_cfg (which carries the sandbox secret).
pub const MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "qemu_fw_cfg"];

pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# torpor initramfs: load virtio modules, mount the root disk, exec the supervisor as PID 1.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m.ko" || echo "torpor-initramfs: cannot load $m"
done
root=/dev/vda
init=/usr/sbin/torpor-guest
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    torpor.init=*) init="${arg#torpor.init=}" ;;
  esac
done
i=0
while [ ! -b "$root" ]; do
  i=$((i + 1))
  if [ "$i" -gt 1000 ]; then echo "torpor-initramfs: $root never appeared"; poweroff -f; fi
  sleep 0.01
done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "torpor-initramfs: cannot mount $root"; poweroff -f
fi
umount /proc
umount /dev
echo "torpor-initramfs: starting $init"
exec switch_root /newroot "$init" "$@"
"#;

/// Finds every module file under `modules_dir` by module name (`-` and `_` are the same).
fn index_modules(modules_dir: &Path) -> Result<HashMap<String, PathBuf>, ImageError> {
    let mut found = HashMap::new();
    let mut stack = vec![modules_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))? {
            let path = entry.map_err(io(format!("listing {}", dir.display())))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                found.insert(name.replace('-', "_"), path);
            }
        }
    }
    Ok(found)
}

fn depends(module: &Path) -> Result<Vec<String>, ImageError> {
    let out = run(Command::new("modinfo").args(["-F", "depends"]).arg(module), "modinfo")?;
    Ok(out.split([',', '\n']).map(str::trim).filter(|s| !s.is_empty()).map(|s| s.replace('-', "_")).collect())
}

/// Orders `wanted` and everything they depend on so that each module follows its dependencies.
pub fn load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let index = index_modules(modules_dir)?;
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ImageError> {
        if done.contains(name) {
            return Ok(());
        }
        done.insert(name.to_owned());
        let path = index.get(name).ok_or_else(|| ImageError::Command {
            what: "finding kernel module".into(),
            status: "not found".into(),
            output: format!("module {name} is not in the kernel package"),
        })?;
        for dep in depends(path)? {
            visit(&dep, index, done, order)?;
        }
        order.push((name.to_owned(), path.clone()));
        Ok(())
    }
    for name in wanted {
        visit(name, &index, &mut done, &mut order)?;
    }
    Ok(order)
}

/// Builds a gzip-compressed newc cpio archive at `out`.
pub fn build(modules_dir: &Path, busybox: &Path, out: &Path) -> Result<(), ImageError> {
    let tree = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
    let root = tree.path();
    for dir in ["bin", "lib/modules", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(root.join(dir)).map_err(io(format!("creating {dir} in the initramfs")))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(io(format!("copying {}", busybox.display())))?;
    let order = load_order(modules_dir, MODULES)?;
    let mut names = String::new();
    for (name, path) in &order {
        std::fs::copy(path, root.join(format!("lib/modules/{name}.ko")))
            .map_err(io(format!("copying {}", path.display())))?;
        names.push_str(name);
        names.push('\n');
    }
    std::fs::write(root.join("modules.order"), names).map_err(io("writing modules.order"))?;
    let init = root.join("init");
    std::fs::write(&init, INIT_SCRIPT).map_err(io("writing init"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod init"))?;
    let script = format!(
        "cd {} && find . -print0 | sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -9 > {}",
        shell_quote(root),
        shell_quote(out)
    );
    run(Command::new("sh").args(["-c", &script]), "packing the initramfs with cpio")?;
    Ok(())
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}
