//! `torpor bench create`: how long a sandbox takes to become useful, what an exec round trip
//! costs, and what an idle sandbox costs the host. Runs against a live daemon on this host.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use reqwest::Method;
use torpor_control::model::{CreateSandbox, ExecEvent, ExecRequest, Sandbox};

use crate::client::Client;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Create → first successful exec, exec round trip of `true`, VM memory per idle sandbox.
    Create {
        /// Sandboxes to create (one after another).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// `true` round trips per sandbox.
        #[arg(long, default_value_t = 20)]
        exec_runs: usize,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Print the raw samples as JSON too.
        #[arg(long)]
        json: bool,
    },
    /// Cold create, pause, resume → first exec (for 256 MiB and 2 GiB guests side by side),
    /// bytes on disk per paused sandbox, and host memory held by paused sandboxes.
    Lifecycle {
        /// Pause/resume cycles per guest size.
        #[arg(long, default_value_t = 10)]
        cycles: usize,
        /// Paused sandboxes to create for the host-memory measurement.
        #[arg(long, default_value_t = 50)]
        paused: usize,
    },
    /// What the egress policy costs: TCP connect latency and bulk throughput to an allowed host
    /// under `open` and `allowlist` side by side, and the sandbox resolver's answer latency.
    /// Builds its own lab network and runs a private daemon (needs root).
    Network {
        /// TCP connections to time per policy.
        #[arg(long, default_value_t = 200)]
        connects: usize,
        /// Size of each bulk download.
        #[arg(long, default_value_t = 64)]
        bulk_mib: u64,
        #[arg(long, default_value_t = 3)]
        bulk_runs: usize,
        /// DNS queries per kind (cached, first lookup, refused, direct); at most 200.
        #[arg(long, default_value_t = 100)]
        dns_queries: usize,
        /// Print the raw samples as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// A Telegram message to a sandbox's agent: webhook → reply at Telegram, for a paused and a
    /// running sandbox side by side, and the share of the paused case spent resuming. Runs a
    /// private daemon and a fake Telegram (needs root).
    Wake {
        /// Messages per case.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// What the credential broker and model proxy cost: model calls through the proxy vs
    /// straight to the upstream (first byte and total, whole and streamed), and resume → first
    /// exec with no credentials, with credentials to push, and with a GitHub token to mint.
    /// Builds its own lab network with fake GitHub and Anthropic APIs and runs a private daemon
    /// (needs root).
    Credentials {
        /// Model calls per path and kind.
        #[arg(long, default_value_t = 100)]
        calls: usize,
        /// Words in each prompt (the fake answers with as many).
        #[arg(long, default_value_t = 50)]
        words: usize,
        /// Pause/resume cycles per kind.
        #[arg(long, default_value_t = 10)]
        cycles: usize,
    },
    /// Sandboxes of two sizes running code-churning work for N minutes: QEMU's own memory over
    /// time (it must plateau), out-of-memory kills (there must be none) and whether each is
    /// still running. Runs a private daemon (needs root).
    Soak {
        #[arg(long, default_value_t = 20)]
        minutes: u64,
        /// Guest memory of each sandbox, MiB (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "512,2048")]
        sizes: Vec<u32>,
        /// Template to create them from (its size wins over --sizes unless it is `base`).
        #[arg(long, default_value = "base")]
        template: String,
        /// Seconds between samples.
        #[arg(long, default_value_t = 30)]
        sample_secs: u64,
        /// Run with this TCG code cache instead of the default (to compare sizes).
        #[arg(long)]
        tcg_code_cache_mib: Option<u32>,
    },
    /// The `coder` template against a cold boot of the same disk with the same processes
    /// started by hand: request → Chromium's DevTools answers, request → the agent's first
    /// reply, memory and disk per sandbox. Runs a private daemon with a fake model API and
    /// builds the template in it first (minutes; needs root and the package registries).
    Coder {
        /// Sandboxes per side.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A CA certificate (PEM) the template build trusts, as for `template build` (repeatable).
        #[arg(long = "ca-cert", value_name = "PEM")]
        ca_certs: Vec<std::path::PathBuf>,
    },
}

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

fn meminfo_kib(key: &str) -> Option<u64> {
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
    let (_, _, exit) = client.exec_collect(id, &req).await?;
    let took = start.elapsed();
    if exit != (ExecEvent::Exit { code: Some(0), signal: None, timed_out: false }) {
        bail!("`true` did not succeed: {exit:?}");
    }
    Ok(took)
}

pub async fn run(cmd: BenchCommand, url: &str, api_key: Option<String>) -> Result<()> {
    match cmd {
        BenchCommand::Create { runs, exec_runs, vcpus, memory, json } => {
            bench_create(runs, exec_runs, vcpus, memory, json, url, api_key).await
        }
        BenchCommand::Lifecycle { cycles, paused } => crate::bench_lifecycle::run(cycles, paused, url, api_key).await,
        BenchCommand::Network { connects, bulk_mib, bulk_runs, dns_queries, json } => {
            crate::bench_network::run(crate::bench_network::Params { connects, bulk_mib, bulk_runs, dns_queries, json })
                .await
        }
        BenchCommand::Wake { runs } => crate::bench_wake::run(runs).await,
        BenchCommand::Credentials { calls, words, cycles } => {
            crate::bench_credentials::run(crate::bench_credentials::Params { calls, words, cycles }).await
        }
        BenchCommand::Soak { minutes, sizes, template, sample_secs, tcg_code_cache_mib } => {
            crate::bench_soak::run(crate::bench_soak::Params {
                minutes,
                sizes,
                template,
                sample_secs,
                tcg_code_cache_mib,
            })
            .await
        }
        BenchCommand::Coder { runs, ca_certs } => {
            crate::bench_coder::run(crate::bench_coder::Params { runs, ca_certs }).await
        }
    }
}

async fn bench_create(
    runs: usize,
    exec_runs: usize,
    vcpus: u32,
    memory: u32,
    json: bool,
    url: &str,
    api_key: Option<String>,
) -> Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let client = Client::new(url, api_key)?;
    let (mut create_ms, mut exec_ms, mut rss_mib, mut pss_mib, mut host_mib) = (vec![], vec![], vec![], vec![], vec![]);
    let mut accel = String::new();
    for run in 1..=runs {
        let before = meminfo_kib("MemAvailable");
        let start = Instant::now();
        let req = CreateSandbox { vcpus: Some(vcpus), memory_mib: Some(memory), ..Default::default() };
        let sandbox: Sandbox =
            client.json(Method::POST, "/v1/sandboxes", Some(&req)).await.context("creating a sandbox")?;
        let first = exec_true(&client, &sandbox.id).await;
        let created = start.elapsed();
        let result = async {
            first?;
            for _ in 0..exec_runs {
                exec_ms.push(exec_true(&client, &sandbox.id).await?.as_secs_f64() * 1e3);
            }
            let pid = sandbox.pid.context("sandbox has no VM pid")?;
            rss_mib.push(proc_kib(pid, "status", "VmRSS").unwrap_or(0) as f64 / 1024.0);
            pss_mib.push(proc_kib(pid, "smaps_rollup", "Pss").unwrap_or(0) as f64 / 1024.0);
            if let (Some(b), Some(a)) = (before, meminfo_kib("MemAvailable")) {
                host_mib.push((b as f64 - a as f64) / 1024.0);
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        accel = sandbox.accelerator.clone();
        let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{}", sandbox.id))).await;
        result?;
        create_ms.push(created.as_secs_f64() * 1e3);
        eprintln!("run {run}/{runs}: create → first exec {:.0} ms", created.as_secs_f64() * 1e3);
    }
    let line = |name: &str, s: &[f64], unit: &str| {
        println!(
            "{name:<36} p50 {:>9.1} {unit:<4} p95 {:>9.1} {unit:<4} (n={})",
            percentile(s, 50.0),
            percentile(s, 95.0),
            s.len()
        );
    };
    println!("accelerator: {accel}   vcpus: {vcpus}   memory: {memory} MiB   runs: {runs}");
    line("create → first successful exec", &create_ms, "ms");
    line("exec round trip of `true`", &exec_ms, "ms");
    line("QEMU RSS per idle sandbox", &rss_mib, "MiB");
    line("QEMU PSS per idle sandbox", &pss_mib, "MiB");
    line("host MemAvailable drop per sandbox", &host_mib, "MiB");
    println!(
        "ratio: create → first exec is {:.0}x an exec round trip (p50); QEMU RSS is {:.0}% of guest memory",
        percentile(&create_ms, 50.0) / percentile(&exec_ms, 50.0),
        100.0 * percentile(&rss_mib, 50.0) / memory as f64
    );
    if json {
        let raw = serde_json::json!({
            "accelerator": accel, "create_ms": create_ms, "exec_ms": exec_ms,
            "rss_mib": rss_mib, "pss_mib": pss_mib, "host_mib": host_mib,
        });
        println!("{raw}");
    }
    Ok(())
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
