//! `torpor image build`: kernel from apt, initramfs, root filesystem from mmdebstrap, then one
//! ext4 image. Each stage is cached under the image store by the hash of its inputs, so a rebuild
//! after changing only `torpor-guest` re-runs just the final assembly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::store::{write_atomic, GuestImage, ImageStore, Manifest};
use crate::{initramfs, io, ImageError};

/// Bump when the recipe changes in a way the hashed inputs do not capture.
const FORMAT: u32 = 1;
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

pub const DEFAULT_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "apt",
    "ca-certificates",
    "curl",
    "git",
    "python3",
    "iproute2",
    "procps",
    "kmod",
    "less",
    "netbase",
    "iputils-ping",
    "bind9-dnsutils",
];

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub guest_binary: PathBuf,
    pub suite: String,
    pub mirror: String,
    pub packages: Vec<String>,
    pub disk_size_mib: u64,
}

impl BuildOptions {
    pub fn new(guest_binary: PathBuf) -> Self {
        Self {
            guest_binary,
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            packages: DEFAULT_PACKAGES.iter().map(|s| s.to_string()).collect(),
            disk_size_mib: 4096,
        }
    }
}

/// Reports build progress; the CLI draws it as a progress bar.
pub trait Progress {
    fn stage(&self, index: usize, total: usize, message: &str);
    fn detail(&self, line: &str);
}

const STAGES: usize = 4;

/// Builds the image for `template` unless an identical one exists. Returns the image and whether
/// anything was built.
pub fn build(
    store: &ImageStore,
    template: &str,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<(GuestImage, bool), ImageError> {
    check_tools()?;
    std::fs::create_dir_all(store.root().join("cache")).map_err(io(format!("creating {}", store.root().display())))?;
    if !opts.guest_binary.is_file() {
        return Err(ImageError::GuestBinaryMissing(opts.guest_binary.clone()));
    }

    progress.stage(1, STAGES, "resolving the guest kernel package");
    let (kernel_package, kernel_version) = resolve_kernel()?;
    let busybox_sha = sha256_file(Path::new("/bin/busybox"))?;
    let kernel_key = hash(&[
        &FORMAT.to_string(),
        &kernel_package,
        &kernel_version,
        initramfs::INIT_SCRIPT,
        &initramfs::MODULES.join(","),
        &busybox_sha,
    ]);
    let rootfs_key = hash(&[&FORMAT.to_string(), &opts.suite, &opts.mirror, &opts.packages.join(",")]);
    let guest_sha256 = sha256_file(&opts.guest_binary)?;
    let image_key = hash(&[
        &kernel_key,
        &rootfs_key,
        &guest_sha256,
        &opts.disk_size_mib.to_string(),
        GIT_CREDENTIAL_HELPER,
        GIT_CONFIG,
    ]);
    let name = format!("{template}-{}", &image_key[..16]);
    let dir = store.root().join(&name);
    if let Ok(image) = store.open(&dir) {
        write_atomic(&store.pointer(template), format!("{name}\n").as_bytes())?;
        progress.stage(STAGES, STAGES, "up to date");
        return Ok((image, false));
    }

    progress.stage(2, STAGES, &format!("kernel {kernel_package} {kernel_version} and initramfs"));
    let kernel_dir = store.root().join("cache").join(format!("kernel-{}", &kernel_key[..16]));
    if !kernel_dir.join("initrd.img").is_file() {
        build_kernel(&kernel_dir, &kernel_package)?;
    }

    progress.stage(3, STAGES, &format!("root filesystem: Debian {} with mmdebstrap", opts.suite));
    let rootfs_tar = store.root().join("cache").join(format!("rootfs-{}.tar", &rootfs_key[..16]));
    if !rootfs_tar.is_file() {
        build_rootfs(&rootfs_tar, opts, progress)?;
    }

    progress.stage(4, STAGES, "assembling the ext4 disk image");
    let manifest = Manifest {
        format: FORMAT,
        hash: image_key.clone(),
        kernel_package,
        kernel_version,
        suite: opts.suite.clone(),
        packages: opts.packages.clone(),
        guest_sha256,
        disk_size_mib: opts.disk_size_mib,
        built_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    };
    assemble(store, &dir, &kernel_dir, &rootfs_tar, opts, &manifest)?;
    write_atomic(&store.pointer(template), format!("{name}\n").as_bytes())?;
    Ok((store.open(&dir)?, true))
}

/// Git asks this for credentials; it answers for the sandbox's GitHub host only, and always
/// with the token file's current content, which the daemon renews before it expires: a git
/// process that runs for hours never sees a stale token.
const GIT_CREDENTIAL_HELPER: &str = r#"#!/bin/sh
# Installed by Torpor. Answers git's credential requests for the GitHub host this sandbox
# holds an installation token for, with the token as it is now.
[ "$1" = get ] || exit 0
dir=/run/torpor/credentials
[ -r "$dir/GITHUB_TOKEN" ] && [ -r "$dir/GITHUB_HOST" ] || exit 0
protocol= host=
while IFS='=' read -r key value; do
  [ -n "$key" ] || break
  case "$key" in
    protocol) protocol=$value ;;
    host) host=$value ;;
  esac
done
[ "$protocol" = https ] && [ "$host" = "$(cat "$dir/GITHUB_HOST")" ] || exit 0
echo username=x-access-token
echo "password=$(cat "$dir/GITHUB_TOKEN")"
"#;

const GIT_CONFIG: &str =
    "# Installed by Torpor: GitHub tokens come from the sandbox's credentials.\n[credential]\n\thelper = torpor\n";

fn check_tools() -> Result<(), ImageError> {
    for (tool, package) in [
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("mmdebstrap", "mmdebstrap"),
        ("mke2fs", "e2fsprogs"),
        ("cpio", "cpio"),
        ("modinfo", "kmod"),
        ("gzip", "gzip"),
    ] {
        if !on_path(tool) {
            return Err(ImageError::MissingTool { tool, package });
        }
    }
    // A dynamically linked busybox cannot run in the initramfs, which has no libc.
    let static_busybox = Command::new("dpkg").args(["-s", "busybox-static"]).output();
    if !static_busybox.map(|o| o.status.success()).unwrap_or(false) || !Path::new("/bin/busybox").is_file() {
        return Err(ImageError::MissingTool { tool: "busybox (static)", package: "busybox-static" });
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").map(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file())).unwrap_or(false)
}

/// Runs `cmd`, returning its stdout; a failure carries the tail of its output.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String, ImageError> {
    let out = cmd.output().map_err(io(format!("starting {what}")))?;
    if !out.status.success() {
        return Err(ImageError::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: tail(&format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h).map_err(io(format!("reading {}", path.display())))?;
    Ok(hex::encode(h.finalize()))
}

/// The versioned kernel package the cloud meta-package points at, in its `-unsigned` flavour (we
/// boot it directly, so the signed EFI wrapper is of no use).
fn resolve_kernel() -> Result<(String, String), ImageError> {
    let depends = run(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]), "apt-cache depends")?;
    let image = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| ImageError::Command {
            what: format!("resolving {KERNEL_META_PACKAGE}"),
            status: "no kernel dependency".into(),
            output: "run `apt-get update` first".into(),
        })?;
    let package = format!("{image}-unsigned");
    let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &package]), "apt-cache show")?;
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .ok_or_else(|| ImageError::Command {
            what: format!("resolving {package}"),
            status: "no version".into(),
            output: "run `apt-get update` first".into(),
        })?
        .to_owned();
    Ok((package, version))
}

fn build_kernel(out_dir: &Path, package: &str) -> Result<(), ImageError> {
    let parent = out_dir.parent().expect("kernel dir has a parent");
    let work = tempfile::tempdir_in(parent).map_err(io("creating a temporary directory"))?;
    run(Command::new("apt-get").args(["download", package]).current_dir(work.path()), "apt-get download")?;
    let deb = std::fs::read_dir(work.path())
        .map_err(io("listing the download directory"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| ImageError::Command {
            what: "apt-get download".into(),
            status: "no .deb".into(),
            output: format!("{package} was not downloaded"),
        })?;
    let tree = work.path().join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree), "dpkg-deb -x")?;
    let find = |dir: &Path, prefix: &str| -> Result<PathBuf, ImageError> {
        std::fs::read_dir(dir)
            .map_err(io(format!("listing {}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
            .ok_or_else(|| ImageError::Command {
                what: "unpacking the kernel".into(),
                status: "missing file".into(),
                output: format!("no {prefix}* in {}", dir.display()),
            })
    };
    let vmlinuz = find(&tree.join("boot"), "vmlinuz-")?;
    let modules = find(&tree.join("lib/modules"), "")?;
    let stage = work.path().join("out");
    std::fs::create_dir(&stage).map_err(io("creating the kernel stage"))?;
    std::fs::copy(&vmlinuz, stage.join("vmlinuz")).map_err(io("copying vmlinuz"))?;
    initramfs::build(&modules, Path::new("/bin/busybox"), &stage.join("initrd.img"))?;
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::rename(&stage, out_dir).map_err(io(format!("renaming into {}", out_dir.display())))?;
    Ok(())
}

fn build_rootfs(out: &Path, opts: &BuildOptions, progress: &dyn Progress) -> Result<(), ImageError> {
    let tmp = out.with_extension("partial.tar");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut child = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--format=tar", "--components=main", "--verbose"])
        .arg(format!("--include={}", opts.packages.join(",")))
        .arg(&opts.suite)
        .arg(&tmp)
        .arg(&opts.mirror)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting mmdebstrap"))?;
    let mut last = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            progress.detail(&line);
            last.push(line);
            if last.len() > 15 {
                last.remove(0);
            }
        }
    }
    let status = child.wait().map_err(io("waiting for mmdebstrap"))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::Command {
            what: "mmdebstrap".into(),
            status: status.to_string(),
            output: last.join("\n"),
        });
    }
    std::fs::rename(&tmp, out).map_err(io(format!("renaming into {}", out.display())))?;
    Ok(())
}

fn assemble(
    store: &ImageStore,
    dir: &Path,
    kernel_dir: &Path,
    rootfs_tar: &Path,
    opts: &BuildOptions,
    manifest: &Manifest,
) -> Result<(), ImageError> {
    let work = tempfile::tempdir_in(store.root()).map_err(io("creating a temporary directory"))?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).map_err(io("creating the rootfs tree"))?;
    run(
        Command::new("tar").args(["--numeric-owner", "-xpf"]).arg(rootfs_tar).arg("-C").arg(&tree),
        "unpacking the root filesystem",
    )?;
    let guest = tree.join("usr/sbin/torpor-guest");
    std::fs::copy(&opts.guest_binary, &guest).map_err(io("installing torpor-guest"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod torpor-guest"))?;
    let helper = tree.join("usr/local/bin/git-credential-torpor");
    std::fs::create_dir_all(tree.join("usr/local/bin")).map_err(io("creating /usr/local/bin"))?;
    std::fs::write(&helper, GIT_CREDENTIAL_HELPER).map_err(io("installing git-credential-torpor"))?;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))
        .map_err(io("chmod git-credential-torpor"))?;
    std::fs::write(tree.join("etc/gitconfig"), GIT_CONFIG).map_err(io("writing /etc/gitconfig"))?;
    std::fs::write(tree.join("etc/fstab"), "/dev/vda / ext4 rw,relatime 0 1\n").map_err(io("writing fstab"))?;
    // The supervisor points it at the sandbox's resolver at boot.
    std::fs::write(tree.join("etc/resolv.conf"), "").map_err(io("writing resolv.conf"))?;

    let out = work.path().join("image");
    std::fs::create_dir(&out).map_err(io("creating the image directory"))?;
    let rootfs = out.join("rootfs.ext4");
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", "torpor-root", "-E", "root_owner=0:0", "-d"])
            .arg(&tree)
            .arg(&rootfs)
            .arg(format!("{}M", opts.disk_size_mib)),
        "mke2fs",
    )?;
    for file in ["vmlinuz", "initrd.img"] {
        std::fs::copy(kernel_dir.join(file), out.join(file)).map_err(io(format!("copying {file}")))?;
    }
    let json = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    write_atomic(&out.join("manifest.json"), &json)?;
    // Sandboxes' disks are copy-on-write layers over these files: nothing may change them.
    for file in ["rootfs.ext4", "vmlinuz", "initrd.img", "manifest.json"] {
        std::fs::set_permissions(out.join(file), std::fs::Permissions::from_mode(0o444))
            .map_err(io(format!("chmod {file}")))?;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&out, dir).map_err(io(format!("renaming into {}", dir.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_fields() {
        assert_ne!(hash(&["ab", "c"]), hash(&["a", "bc"]));
        assert_eq!(hash(&["x"]), hash(&["x"]));
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let t = tail(&text);
        assert!(t.starts_with("line 25") && t.ends_with("line 39"), "{t}");
    }
}
