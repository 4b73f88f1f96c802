//! PID 1 duties: the file systems every Linux program expects, hostname, network, and a clean
//! power-off. Network settings are fixed (see `torpor_proto::GUEST_IP`); the sandbox id and the
//! secret come from the host (kernel command line and fw_cfg respectively).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use torpor_proto::{GUEST_GATEWAY, GUEST_IP, GUEST_PREFIX_LEN, SECRET_FW_CFG_NAME};

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const MOUNTS: &[Mount] = &[
    Mount { source: "proc", target: "/proc", fstype: "proc", flags: MsFlags::empty(), data: None },
    Mount { source: "sysfs", target: "/sys", fstype: "sysfs", flags: MsFlags::empty(), data: None },
    Mount { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::empty(), data: None },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::empty(),
        data: Some("gid=5,mode=620,ptmxmode=666"),
    },
    Mount { source: "tmpfs", target: "/dev/shm", fstype: "tmpfs", flags: MsFlags::empty(), data: Some("mode=1777") },
    Mount { source: "tmpfs", target: "/run", fstype: "tmpfs", flags: MsFlags::empty(), data: Some("mode=755") },
    Mount { source: "tmpfs", target: "/tmp", fstype: "tmpfs", flags: MsFlags::empty(), data: Some("mode=1777") },
    Mount { source: "cgroup2", target: "/sys/fs/cgroup", fstype: "cgroup2", flags: MsFlags::empty(), data: None },
];

pub fn mount_filesystems() -> Result<()> {
    for m in MOUNTS {
        std::fs::create_dir_all(m.target).with_context(|| format!("creating {}", m.target))?;
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => bail!("mounting {} on {}: {e}", m.fstype, m.target),
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {link}"))?;
        }
    }
    Ok(())
}

/// A `key=value` parameter from the kernel command line.
pub fn cmdline_param(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')).map(str::to_owned))
}

pub fn set_hostname(name: &str) -> Result<()> {
    nix::unistd::sethostname(name).context("sethostname")?;
    std::fs::write("/etc/hostname", format!("{name}\n")).context("writing /etc/hostname")?;
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    std::fs::write("/etc/hosts", hosts).context("writing /etc/hosts")?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("/usr/sbin/ip").args(args).status().context("running ip")?;
    if !status.success() {
        bail!("`ip {}` failed: {status}", args.join(" "));
    }
    Ok(())
}

pub fn configure_network() -> Result<()> {
    ip(&["link", "set", "lo", "up"])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new("/sys/class/net/eth0").exists() {
        if Instant::now() > deadline {
            bail!("eth0 did not appear within 10 s (is virtio_net loaded?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = format!("{GUEST_IP}/{GUEST_PREFIX_LEN}");
    ip(&["addr", "replace", &addr, "dev", "eth0"])?;
    ip(&["link", "set", "eth0", "up"])?;
    ip(&["route", "replace", "default", "via", GUEST_GATEWAY])?;
    // The host runs this sandbox's resolver on the gateway address; it is the only name server
    // the sandbox can reach. Short timeouts: a refused name fails fast rather than after retries.
    let resolv = format!("nameserver {GUEST_GATEWAY}\noptions timeout:2 attempts:2\n");
    std::fs::write("/etc/resolv.conf", resolv).context("writing /etc/resolv.conf")?;
    Ok(())
}

pub fn read_secret() -> Result<String> {
    let path = format!("/sys/firmware/qemu_fw_cfg/by_name/{SECRET_FW_CFG_NAME}/raw");
    let secret = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let secret = secret.trim().to_owned();
    if secret.len() < 32 {
        bail!("the sandbox secret in {path} is too short");
    }
    Ok(secret)
}

/// Stops every other process, flushes the disk and powers the VM off. Never returns.
pub fn power_off() -> ! {
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && other_processes_remain() {
        reap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap();
    nix::unistd::sync();
    let _ = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Power-off failed: halting is the next best thing; the host kills what remains.
    loop {
        std::thread::park();
    }
}

fn reap() {
    let mut status = 0;
    // SAFETY: plain waitpid with a valid out-pointer.
    while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
}

fn other_processes_remain() -> bool {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                // Kernel threads have an empty cmdline and cannot be killed anyway.
                name.chars().all(|c| c.is_ascii_digit())
                    && name != me
                    && std::fs::read(e.path().join("cmdline")).map(|c| !c.is_empty()).unwrap_or(false)
            })
        })
        .unwrap_or(false)
}
