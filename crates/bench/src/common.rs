//! What every benchmark uses: percentiles, /proc readings, secrets for a private daemon.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use torpor_api::{ExecEvent, ExecRequest};
use torpor_client::Client;

pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (s.len() as f64 - 1.0)).round() as usize;
    s[rank.min(s.len() - 1)]
}

/// Writes `value` to a root-only file, as the daemon wants its secrets.
pub fn private_file(dir: &std::path::Path, name: &str, value: &str) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, value)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// The values of `field` (`ms`, `credentials_ms`…) in the daemon's "sandbox resumed" lines for `id`.
pub fn resumes_logged(log: &str, id: &str, field: &str) -> Vec<f64> {
    let prefix = format!("{field}=");
    log.lines()
        .filter(|l| l.contains("sandbox resumed") && l.contains(id))
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix(prefix.as_str())?.parse().ok()))
        .collect()
}

pub fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

pub fn proc_kib(pid: u32, file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

pub async fn exec_true(client: &Client, id: &str) -> Result<Duration> {
    let req = ExecRequest { argv: vec!["true".into()], ..Default::default() };
    let start = Instant::now();
    let exit = client.exec(id, &req).await?.exit;
    let took = start.elapsed();
    if exit != (ExecEvent::Exit { code: Some(0), signal: None, timed_out: false }) {
        bail!("`true` did not succeed: {exit:?}");
    }
    Ok(took)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let s = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(super::percentile(&s, 50.0), 3.0);
        assert_eq!(super::percentile(&s, 100.0), 5.0);
        assert_eq!(super::percentile(&s, 0.0), 1.0);
        assert!(super::percentile(&[], 50.0).is_nan());
    }
}
