//! What the daemon opens for QEMU and hands over as descriptors: the jailed VM has an empty
//! network namespace and may create no file, so it never opens a path of the host's.
//! - the sandbox's tap, attached in the sandbox's namespace;
//! - its control (QMP) socket, listening at a path in the root-owned run directory, where the
//!   daemon connects and the VM can neither replace it nor point it elsewhere;
//! - the write ends of its console's and its own output's FIFOs, read by the daemon into
//!   size-capped logs (`crate::logs`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::{io, EngineError, VmSpec};

/// Descriptors for one QEMU process; dropped (the daemon's copies closed) once it has started.
pub struct Handoff {
    pub tap: OwnedFd,
    pub qmp: OwnedFd,
    pub console: OwnedFd,
    /// QEMU's standard output and error.
    pub output: OwnedFd,
}

/// Copies QEMU's output into its log; ends once QEMU has exited (or never started).
pub type OutputReader = tokio::task::JoinHandle<()>;

/// Their numbers, as QEMU's command line names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedFds {
    pub tap: RawFd,
    pub qmp: RawFd,
    pub console: RawFd,
}

impl Handoff {
    pub fn open(spec: &VmSpec) -> Result<(Self, OutputReader), EngineError> {
        let tap = open_tap(&spec.netns_path, &spec.tap)?;
        let qmp_path = super::cmdline::qmp_socket(spec);
        let _ = std::fs::remove_file(&qmp_path);
        let listener = std::os::unix::net::UnixListener::bind(&qmp_path)
            .map_err(io(format!("creating the control socket {}", qmp_path.display())))?;
        let (console, _) = crate::logs::CONSOLE.open_writer(&spec.run_dir)?;
        let (output, output_reader) = crate::logs::VMM.open_writer(&spec.run_dir)?;
        Ok((Self { tap, qmp: listener.into(), console, output }, output_reader))
    }

    pub fn fds(&self) -> HandedFds {
        HandedFds { tap: self.tap.as_raw_fd(), qmp: self.qmp.as_raw_fd(), console: self.console.as_raw_fd() }
    }
}

/// `struct ifreq` as TUNSETIFF reads it: a name and flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to tap `name` in the namespace at `netns_path`, with the virtio-net header QEMU
/// would ask for itself (a snapshot's device state records it: a restore needs the same).
fn open_tap(netns_path: &Path, name: &str) -> Result<OwnedFd, EngineError> {
    let netns =
        std::fs::File::open(netns_path).map_err(io(format!("opening network namespace {}", netns_path.display())))?;
    let context = format!("attaching to tap {name} in {}", netns_path.display());
    let name = name.to_owned();
    // A thread of its own: entering the namespace must not move a runtime thread.
    let opened = std::thread::spawn(move || -> std::io::Result<OwnedFd> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
        if name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::other(format!("tap name {name:?} is too long")));
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is, laid out as the kernel's.
        let ret = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from(tun))
    })
    .join()
    .map_err(|_| EngineError::Io { context: "opening the tap".into(), source: std::io::Error::other("panicked") })?;
    opened.map_err(io(context))
}

/// For tests of the command line: numbers without descriptors behind them.
#[cfg(test)]
pub fn fake_fds() -> HandedFds {
    HandedFds { tap: 10, qmp: 11, console: 12 }
}
