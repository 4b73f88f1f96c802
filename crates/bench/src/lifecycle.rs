//! `torpor bench lifecycle`: what pausing and resuming cost, and whether that grows with RAM.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use reqwest::Method;
use torpor_api::{CreateSandbox, Sandbox, Usage};

use crate::common::{exec_true, percentile};
use torpor_client::Client;

/// Creates a sandbox (`memory: None` = the base template's size, a restore; `cold` = boot the
/// image) and times create → first successful exec.
async fn create(client: &Client, memory: Option<u32>, cold: bool) -> Result<(Sandbox, f64)> {
    let start = Instant::now();
    let req = CreateSandbox { memory_mib: memory, idle_timeout_secs: Some(0), cold_boot: cold, ..Default::default() };
    let sandbox: Sandbox =
        client.json(Method::POST, "/v1/sandboxes", Some(&req)).await.context("creating a sandbox")?;
    exec_true(client, &sandbox.id).await?;
    Ok((sandbox, start.elapsed().as_secs_f64() * 1e3))
}

async fn pause(client: &Client, id: &str) -> Result<f64> {
    let start = Instant::now();
    let s: Sandbox = client.json(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None::<&()>).await?;
    if s.state.as_str() != "paused" {
        bail!("pause left {id} {}", s.state);
    }
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

async fn remove(client: &Client, id: &str) {
    let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}"))).await;
}

struct Cycles {
    pause_ms: Vec<f64>,
    resume_exec_ms: Vec<f64>,
    paused_bytes: Vec<f64>,
}

/// Pause, then wake with an exec, `cycles` times, on a guest of `memory` MiB that has touched
/// some memory of its own.
async fn cycles(client: &Client, memory: u32, cycles: usize) -> Result<Cycles> {
    let (sandbox, _) = create(client, Some(memory), true).await?;
    let id = sandbox.id.clone();
    let result = async {
        let mut out = Cycles { pause_ms: vec![], resume_exec_ms: vec![], paused_bytes: vec![] };
        for _ in 0..cycles {
            out.pause_ms.push(pause(client, &id).await?);
            let usage: Usage = client.json(Method::GET, &format!("/v1/sandboxes/{id}/usage"), None::<&()>).await?;
            out.paused_bytes.push(usage.paused_bytes as f64 / (1 << 20) as f64);
            out.resume_exec_ms.push(exec_true(client, &id).await?.as_secs_f64() * 1e3);
        }
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    remove(client, &id).await;
    result
}

fn line(name: &str, s: &[f64], unit: &str) {
    println!(
        "{name:<40} p50 {:>9.1} {unit:<4} p95 {:>9.1} {unit:<4} (n={})",
        percentile(s, 50.0),
        percentile(s, 95.0),
        s.len()
    );
}

pub async fn run(client: &Client, n: usize, paused: usize) -> Result<()> {
    if n == 0 {
        bail!("--cycles must be at least 1");
    }
    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for _ in 0..n.min(5) {
        let (s, ms) = create(client, None, true).await?;
        cold.push(ms);
        remove(client, &s.id).await;
    }
    // The first restore may build the base template (one cold boot); it is not counted.
    let (warm, _) = create(client, None, false).await?;
    remove(client, &warm.id).await;
    for _ in 0..n {
        let (s, ms) = create(client, None, false).await?;
        restored.push(ms);
        remove(client, &s.id).await;
    }
    eprintln!("cold creates done; cycling 256 MiB and 2 GiB guests");
    let small = cycles(client, 256, n).await?;
    let large = cycles(client, 2048, n).await?;

    eprintln!("creating and pausing {paused} sandboxes");
    let mut ids = Vec::new();
    let mut qemu_rss_kib = 0u64;
    let mut paused_disk = Vec::new();
    let outcome = async {
        for _ in 0..paused {
            let (s, _) = create(client, None, false).await?;
            ids.push(s.id.clone());
            pause(client, &s.id).await?;
            let usage: Usage = client.json(Method::GET, &format!("/v1/sandboxes/{}/usage", s.id), None::<&()>).await?;
            paused_disk.push(usage.paused_bytes as f64 / (1 << 20) as f64);
        }
        // Every process on this host that belongs to one of these sandboxes (found by the VM's
        // `-name torpor-<id>` argument, not by what the API reports): their resident memory.
        for entry in std::fs::read_dir("/proc").context("listing /proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let belongs =
                cmdline.split(|b| *b == 0).any(|arg| ids.iter().any(|id| arg == format!("torpor-{id}").as_bytes()));
            if belongs {
                qemu_rss_kib += crate::common::proc_kib(pid, "status", "VmRSS").unwrap_or(0);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    for id in &ids {
        remove(client, id).await;
    }
    outcome?;

    println!("cycles per size: {n}; paused sandboxes: {paused}");
    line("cold create → first exec (512 MiB)", &cold, "ms");
    line("create from template → first exec", &restored, "ms");
    line("pause, 256 MiB guest", &small.pause_ms, "ms");
    line("pause, 2 GiB guest", &large.pause_ms, "ms");
    line("resume → first exec, 256 MiB guest", &small.resume_exec_ms, "ms");
    line("resume → first exec, 2 GiB guest", &large.resume_exec_ms, "ms");
    line("bytes on disk while paused, 256 MiB", &small.paused_bytes, "MiB");
    line("bytes on disk while paused, 2 GiB", &large.paused_bytes, "MiB");
    line("bytes on disk while paused, 512 MiB", &paused_disk, "MiB");
    println!(
        "{:<40} {} KiB in VM processes for {} paused sandboxes",
        "host RSS of paused sandboxes",
        qemu_rss_kib,
        ids.len()
    );
    println!("ratio cold / from template: {:.1}x (p50)", percentile(&cold, 50.0) / percentile(&restored, 50.0));
    println!(
        "ratio 2 GiB / 256 MiB: pause {:.2}x, resume → exec {:.2}x (p50)",
        percentile(&large.pause_ms, 50.0) / percentile(&small.pause_ms, 50.0),
        percentile(&large.resume_exec_ms, 50.0) / percentile(&small.resume_exec_ms, 50.0)
    );
    Ok(())
}
