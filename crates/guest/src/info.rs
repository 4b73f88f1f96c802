//! `Info`: what a user would ask `uptime`, `free`, `df /` and `uname -r`.

use anyhow::{Context, Result};
use torpor_proto::supervisor::InfoResponse;

pub fn collect() -> Result<InfoResponse> {
    let uptime = std::fs::read_to_string("/proc/uptime").context("reading /proc/uptime")?;
    let uptime_secs = uptime.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let disk = nix::sys::statvfs::statvfs("/").context("statvfs /")?;
    let uname = nix::sys::utsname::uname().context("uname")?;
    Ok(InfoResponse {
        uptime_secs,
        mem_total_bytes: meminfo_kib(&meminfo, "MemTotal") * 1024,
        mem_available_bytes: meminfo_kib(&meminfo, "MemAvailable") * 1024,
        disk_total_bytes: disk.blocks() * disk.fragment_size(),
        disk_free_bytes: disk.blocks_available() * disk.fragment_size(),
        kernel: uname.release().to_string_lossy().into_owned(),
        hostname: uname.nodename().to_string_lossy().into_owned(),
    })
}

fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_meminfo() {
        let text = "MemTotal:        2000 kB\nMemFree:  10 kB\nMemAvailable:     1500 kB\n";
        assert_eq!(super::meminfo_kib(text, "MemTotal"), 2000);
        assert_eq!(super::meminfo_kib(text, "MemAvailable"), 1500);
        assert_eq!(super::meminfo_kib(text, "Missing"), 0);
    }
}
