//! `torpor-bench create`: how long a sandbox takes to become useful, what an exec round trip
//! costs, and what an idle sandbox costs the host. Runs against a live daemon on this host.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use torpor_api::CreateSandbox;

use crate::common::{exec_true, meminfo_kib, percentile, proc_kib};

pub struct Params {
    pub runs: usize,
    pub exec_runs: usize,
    pub vcpus: u32,
    pub memory: u32,
    pub json: bool,
}

pub async fn run(client: &torpor_client::Client, p: Params) -> Result<()> {
    let Params { runs, exec_runs, vcpus, memory, json } = p;
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (mut create_ms, mut exec_ms, mut rss_mib, mut pss_mib, mut host_mib) = (vec![], vec![], vec![], vec![], vec![]);
    let mut accel = String::new();
    for run in 1..=runs {
        let before = meminfo_kib("MemAvailable");
        let start = Instant::now();
        let req = CreateSandbox { vcpus: Some(vcpus), memory_mib: Some(memory), ..Default::default() };
        let sandbox = client.create_sandbox(&req).await.context("creating a sandbox")?;
        let first = exec_true(client, &sandbox.id).await;
        let created = start.elapsed();
        let result = async {
            first?;
            for _ in 0..exec_runs {
                exec_ms.push(exec_true(client, &sandbox.id).await?.as_secs_f64() * 1e3);
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
        let _ = client.delete_sandbox(&sandbox.id).await;
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
