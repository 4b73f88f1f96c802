//! `SetIdentity`: what must differ between two clones of one template snapshot.

use std::io::Write;
use std::process::Command;

use anyhow::{bail, Context, Result};
use torpor_proto::supervisor::IdentityRequest;

/// `_IO('R', 0x07)`: make the kernel's CRNG reseed from its input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub fn apply(req: &IdentityRequest) -> Result<()> {
    if !req.machine_id.is_empty() {
        if req.machine_id.len() != 32 || !req.machine_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("machine id must be 32 hex digits");
        }
        std::fs::write("/etc/machine-id", format!("{}\n", req.machine_id)).context("writing /etc/machine-id")?;
    }
    if !req.hostname.is_empty() {
        crate::init::set_hostname(&req.hostname)?;
    }
    if !req.entropy.is_empty() {
        // Clones share the template's RNG state: mix in fresh host entropy and reseed, so no
        // two clones produce the same "random" numbers.
        let mut urandom =
            std::fs::OpenOptions::new().write(true).open("/dev/urandom").context("opening /dev/urandom")?;
        urandom.write_all(&req.entropy).context("writing entropy")?;
        use std::os::fd::AsRawFd;
        // SAFETY: a request-only ioctl on a descriptor we own.
        if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reseeding the kernel RNG");
        }
    }
    if !req.mac.is_empty() {
        let status = Command::new("/usr/sbin/ip")
            .args(["link", "set", "dev", "eth0", "address", &req.mac])
            .status()
            .context("running ip")?;
        if !status.success() {
            bail!("setting the MAC address to {} failed", req.mac);
        }
    }
    Ok(())
}
