//! The jail a VM process runs in: if the guest escapes into the VMM, what it gets must be
//! worth nothing.
//!
//! Between `fork` and `exec` of QEMU (all of it async-signal-safe: every path and buffer is
//! prepared before the fork) the child:
//! 1. starts a session of its own;
//! 2. unshares network, mount, PID and IPC namespaces and forks once more, so QEMU is PID 1 of a
//!    PID namespace of its own (the intermediate process reports QEMU's host pid and exits; QEMU
//!    is reparented to the daemon, a child subreaper). The network namespace is empty: QEMU's
//!    only way to any network is the tap descriptor it is handed, which carries the guest's
//!    frames through the sandbox's firewall; a socket of its own reaches nothing;
//! 3. joins its cgroup;
//! 4. builds a root of its own on a tmpfs holding only: /usr and the loader cache (read-only),
//!    the kernel/image and template directories (read-only), its own run directory, and the
//!    device nodes QEMU needs; mounts a fresh /proc for its PID namespace; and pivots into it;
//! 5. caps the size of any file it writes at the sandbox's disk quota (the copy-on-write disk
//!    layer cannot outgrow it; the guest sees an I/O error);
//! 6. drops every capability, including from the bounding set, switches to the sandbox's own
//!    unprivileged uid and gid, and sets `no_new_privs`.
//!
//! QEMU then enables its own seccomp filter (`-sandbox on,…`, see `cmdline`). It inherits no
//! environment and the descriptors it is handed (tap, control socket, console) are its only
//! way out: the run directory is root's, so it can create no file and replace none.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{io, EngineError};

/// Where each VM's private root is mounted, inside its own mount namespace.
pub const JAIL_ROOT: &str = "/run/torpor-jail";

/// Who a VM runs as and what it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the group that may read templates.
    pub groups: Vec<u32>,
    /// Largest file the VM process may write (RLIMIT_FSIZE): the disk quota.
    pub max_file_bytes: u64,
    /// Directories visible read-only at their own path (image, template).
    pub read_only: Vec<PathBuf>,
}

enum Op {
    Mkdir(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Touch(CString),
    Bind {
        src: CString,
        dst: CString,
        read_only: bool,
    },
    /// A device node of the VM's own on the jail's tmpfs: the host's may be root-only (e.g.
    /// /dev/net/tun 0600), and the VM needs no more than these few.
    Device {
        path: CString,
        rdev: libc::dev_t,
        mode: libc::mode_t,
        owner: Option<libc::uid_t>,
    },
}

/// Everything the child needs, made before the fork.
pub struct Plan {
    /// Descriptors QEMU is handed by number: kept open across `exec`.
    handed: Vec<std::os::fd::RawFd>,
    cgroup_procs: Vec<OwnedFd>,
    pid_pipe_write: OwnedFd,
    root: CString,
    ops: Vec<Op>,
    proc_dir: CString,
    workdir: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    max_file_bytes: u64,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL bytes")
}

/// Host paths every VM needs read-only: QEMU, its libraries and data.
const SYSTEM_DIRS: &[&str] = &["/usr"];
/// On merged-/usr systems these are symlinks into /usr; elsewhere they are bound too.
const SYSTEM_LINKS: &[&str] = &["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache"];
/// Harmless to anyone: world read/write.
const SHARED_DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];
/// The VM's alone, where the host has hardware virtualisation.
const KVM_DEVICE: &str = "/dev/kvm";

impl Plan {
    /// `pid_pipe_write`: the intermediate process writes QEMU's host pid there. `handed`: open
    /// descriptors QEMU finds under the same numbers.
    pub fn new(
        jail: &JailSpec,
        run_dir: &Path,
        cgroup_procs: &[PathBuf],
        kvm: bool,
        pid_pipe_write: OwnedFd,
        handed: Vec<std::os::fd::RawFd>,
    ) -> Result<Self, EngineError> {
        let cgroup_procs = cgroup_procs
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map(OwnedFd::from)
                    .map_err(io(format!("opening {}", p.display())))
            })
            .collect::<Result<_, _>>()?;
        let root = Path::new(JAIL_ROOT);
        std::fs::create_dir_all(root).map_err(io(format!("creating {JAIL_ROOT}")))?;
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let mut ops = Vec::new();
        let mut made: Vec<PathBuf> = Vec::new();
        let mut mkdir_p = |ops: &mut Vec<Op>, dir: &Path| {
            let mut chain: Vec<PathBuf> =
                dir.ancestors().map(Path::to_path_buf).filter(|a| a.starts_with(root) && a != root).collect();
            chain.reverse();
            for d in chain {
                if !made.contains(&d) {
                    ops.push(Op::Mkdir(cstr(&d)));
                    made.push(d);
                }
            }
        };
        let mut bind_dir = |ops: &mut Vec<Op>, src: &Path, read_only: bool| {
            mkdir_p(ops, &inside(src));
            ops.push(Op::Bind { src: cstr(src), dst: cstr(&inside(src)), read_only });
        };
        for dir in SYSTEM_DIRS {
            bind_dir(&mut ops, Path::new(dir), true);
        }
        for link in SYSTEM_LINKS {
            let path = Path::new(link);
            match std::fs::read_link(path) {
                Ok(target) => ops.push(Op::Symlink { target: cstr(&target), link: cstr(&inside(path)) }),
                Err(_) if path.is_dir() => bind_dir(&mut ops, path, true),
                Err(_) => {}
            }
        }
        for dir in &jail.read_only {
            bind_dir(&mut ops, dir, true);
        }
        bind_dir(&mut ops, run_dir, false);
        let mut mkdir_parent = |ops: &mut Vec<Op>, p: &Path| {
            if let Some(parent) = inside(p).parent() {
                mkdir_p(ops, parent);
            }
        };
        for file in SYSTEM_FILES.iter().map(Path::new).filter(|f| f.exists()) {
            mkdir_parent(&mut ops, file);
            ops.push(Op::Touch(cstr(&inside(file))));
            ops.push(Op::Bind { src: cstr(file), dst: cstr(&inside(file)), read_only: true });
        }
        let vm_devices: Vec<&str> = if kvm { vec![KVM_DEVICE] } else { Vec::new() };
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        for (dev, vm_only) in SHARED_DEVICES.iter().map(|d| (d, false)).chain(vm_devices.iter().map(|d| (d, true))) {
            let path = Path::new(dev);
            let Ok(meta) = std::fs::metadata(path) else { continue };
            if !meta.file_type().is_char_device() {
                continue;
            }
            mkdir_parent(&mut ops, path);
            ops.push(Op::Device {
                path: cstr(&inside(path)),
                rdev: meta.rdev(),
                mode: if vm_only { 0o600 } else { 0o666 },
                owner: vm_only.then_some(jail.uid),
            });
        }
        let proc_dir = inside(Path::new("/proc"));
        mkdir_p(&mut ops, &proc_dir);
        Ok(Self {
            handed,
            cgroup_procs,
            pid_pipe_write,
            root: cstr(root),
            ops,
            proc_dir: cstr(&proc_dir),
            workdir: cstr(run_dir),
            uid: jail.uid,
            gid: jail.gid,
            groups: jail.groups.clone(),
            max_file_bytes: jail.max_file_bytes,
        })
    }

    /// Runs in the forked child, before `exec`. Only async-signal-safe calls; no allocation.
    ///
    /// # Safety
    /// Must only be called between `fork` and `exec` (from `Command::pre_exec`).
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on memory prepared before the fork (see the module header),
        // made between fork and exec as the caller guarantees.
        unsafe {
            // Its own session: signals aimed at the daemon's terminal or group never reach it, so
            // sandboxes outlive a daemon restart.
            check(libc::setsid())?;
            check(libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC))?;
            match check(libc::fork())? {
                0 => {}
                qemu => {
                    // The intermediate: report QEMU's pid and go. QEMU is reparented to the daemon.
                    let bytes = (qemu as u32).to_ne_bytes();
                    libc::write(self.pid_pipe_write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                    libc::_exit(0);
                }
            }
            for fd in &self.cgroup_procs {
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for fd in &self.handed {
                check(libc::fcntl(*fd, libc::F_SETFD, 0))?;
            }
            // The daemon's umask (077) would make the jail's directories untraversable by the VM.
            libc::umask(0o022);
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=1m".as_ptr().cast(),
            ))?;
            for op in &self.ops {
                match op {
                    Op::Mkdir(dir) => {
                        if libc::mkdir(dir.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Op::Symlink { target, link } => {
                        check(libc::symlink(target.as_ptr(), link.as_ptr()))?;
                    }
                    Op::Touch(file) => {
                        let fd =
                            check(libc::open(file.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644))?;
                        libc::close(fd);
                    }
                    Op::Device { path, rdev, mode, owner } => {
                        check(libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, *rdev))?;
                        // mknod honours the umask; the mode must be exact.
                        check(libc::chmod(path.as_ptr(), *mode))?;
                        if let Some(uid) = owner {
                            check(libc::chown(path.as_ptr(), *uid, *uid))?;
                        }
                    }
                    Op::Bind { src, dst, read_only } => {
                        check(libc::mount(
                            src.as_ptr(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ))?;
                        if *read_only {
                            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
                            check(libc::mount(
                                std::ptr::null(),
                                dst.as_ptr(),
                                std::ptr::null(),
                                flags,
                                std::ptr::null(),
                            ))?;
                        }
                    }
                }
            }
            let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            check(libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                proc_flags,
                std::ptr::null(),
            ))?;
            // pivot_root(".", "."), then detach the old root stacked under the new one.
            check(libc::chdir(self.root.as_ptr()))?;
            check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(self.workdir.as_ptr()))?;

            let limit = libc::rlimit { rlim_cur: self.max_file_bytes, rlim_max: self.max_file_bytes };
            check(libc::setrlimit(libc::RLIMIT_FSIZE, &limit))?;
            // Past the limit a write fails with EFBIG (an I/O error in the guest) instead of
            // killing the VM.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);

            for cap in 0..64 {
                // EINVAL past the last capability this kernel knows.
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && *libc::__errno_location() != libc::EINVAL {
                    return Err(std::io::Error::last_os_error());
                }
            }
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            // Leaving uid 0 clears the permitted, effective and ambient capability sets.
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            Ok(())
        }
    }
}

fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A pipe for the intermediate process's report: (read end, write end), both close-on-exec.
pub fn pid_pipe() -> Result<(OwnedFd, OwnedFd), EngineError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| EngineError::Io { context: "creating a pipe".into(), source: std::io::Error::from(e) })?;
    Ok((r, w))
}

/// QEMU's host pid, as the intermediate process reported it.
pub fn read_pid(read_end: OwnedFd) -> Result<u32, EngineError> {
    use std::io::Read;
    let mut buf = [0u8; 4];
    std::fs::File::from(read_end)
        .read_exact(&mut buf)
        .map_err(io("reading the VM's pid from the jail (it failed before starting QEMU)"))?;
    Ok(u32::from_ne_bytes(buf))
}

/// Gives the VM's uid the files it works on, and nothing else of the run directory: the
/// directory itself is the daemon's, entered (not listed) through the VM's group.
pub fn prepare_run_dir(
    run_dir: &Path,
    jail: &JailSpec,
    owned: &[PathBuf],
    group_readable: &[PathBuf],
) -> Result<(), EngineError> {
    use std::os::unix::fs::PermissionsExt;
    let chown = |p: &Path, uid: u32, gid: u32| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io(format!("chown {}", p.display())))
    };
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", p.display())))
    };
    chown(run_dir, 0, jail.gid)?;
    chmod(run_dir, 0o710)?;
    for file in owned {
        chown(file, jail.uid, jail.gid)?;
        chmod(file, if file.is_dir() { 0o700 } else { 0o600 })?;
    }
    for file in group_readable {
        chown(file, 0, jail.gid)?;
        chmod(file, 0o640)?;
    }
    Ok(())
}
