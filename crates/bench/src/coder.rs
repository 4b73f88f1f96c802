//! `torpor bench coder`: what the `coder` template's snapshot buys. Side by side, from the
//! request until Chromium's DevTools endpoint answers and until the agent (Claude Code) has
//! answered a first message: a sandbox created from the template (everything already running),
//! and the same disk booted cold with the same processes started by hand. Also the host memory
//! and disk each sandbox takes.
//!
//! Self-contained: a private daemon, a fake Anthropic API on 127.0.0.1 (torpor-testkit) behind the
//! model proxy, and the shipped template built in it first (which fetches packages from the real
//! registries and takes minutes).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use torpor_api::{Sandbox, Usage};

use crate::common::{percentile, private_file, proc_kib};
use crate::daemon::BenchDaemon;
use torpor_client::Client;
use torpor_template::{Origin, TemplateFile};

const POOL: &str = "10.196.0.0/16";
const DEVTOOLS: &str = "curl -sf --max-time 2 http://127.0.0.1:9222/json/version";

pub struct Params {
    pub runs: usize,
    pub ca_certs: Vec<PathBuf>,
}

/// One sandbox's numbers, in ms from the create (or cold start) request.
struct Sample {
    devtools_ms: f64,
    agent_ms: f64,
    rss_mib: f64,
    disk_mib: f64,
}

pub async fn run(p: Params) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("torpor bench coder needs root: it runs its own daemon");
    }
    if p.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let models_url = format!("http://{}", listener.local_addr()?);
    let _models = torpor_testkit::FakeModels::start(listener, "sk-ant-bench", "sk-bench")?;
    let keys = tempfile::tempdir()?;
    let config = format!(
        "[models.anthropic]\nbase_url = \"{models_url}\"\nkey_file = \"{}\"\n[models.openai]\nbase_url = \"{models_url}\"\nkey_file = \"{}\"\n",
        private_file(keys.path(), "anthropic", "sk-ant-bench")?.display(),
        private_file(keys.path(), "openai", "sk-bench")?.display(),
    );
    eprintln!("==> a private daemon; fake model API at {models_url}");
    let (daemon, client) = BenchDaemon::start(None, POOL, &config).await?;
    let origin = Origin::shipped("coder")?;
    let spec = TemplateFile::parse(origin.text())?;
    eprintln!("==> building the coder template (packages from the real registries: minutes)");
    let started = Instant::now();
    torpor_template::build(&client, "coder", &origin, &p.ca_certs, &torpor_template::Quiet)
        .await
        .map(drop)
        .with_context(|| daemon.log())?;
    let build_s = started.elapsed().as_secs_f64();

    let (mut warm, mut cold) = (Vec::new(), Vec::new());
    for run in 1..=p.runs {
        let w = warm_run(&client, run).await.with_context(|| daemon.log())?;
        eprintln!(
            "run {run}/{}: from the template: DevTools {:.0} ms, agent {:.0} ms",
            p.runs, w.devtools_ms, w.agent_ms
        );
        warm.push(w);
        let c = cold_run(&client, run, &spec).await.with_context(|| daemon.log())?;
        eprintln!("run {run}/{}: cold boot: DevTools {:.0} ms, agent {:.0} ms", p.runs, c.devtools_ms, c.agent_ms);
        cold.push(c);
    }
    let template: Value = client.json(Method::GET, "/v1/templates", None::<&()>).await?;
    let size = template["templates"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "coder"))
        .and_then(|t| t["size_bytes"].as_u64())
        .unwrap_or(0);
    drop(daemon);

    let p50 = |s: &[Sample], f: fn(&Sample) -> f64| percentile(&s.iter().map(f).collect::<Vec<_>>(), 50.0);
    let p95 = |s: &[Sample], f: fn(&Sample) -> f64| percentile(&s.iter().map(f).collect::<Vec<_>>(), 95.0);
    let row = |name: &str, f: fn(&Sample) -> f64, unit: &str| {
        println!(
            "{name:<40} {:>10.0} / {:<10.0} {:>10.0} / {:<10.0} {:>6.1}x  {unit}",
            p50(&warm, f),
            p95(&warm, f),
            p50(&cold, f),
            p95(&cold, f),
            p50(&cold, f) / p50(&warm, f),
        );
    };
    println!(
        "\ntorpor bench coder ({} runs each; template built in {build_s:.0} s, its snapshot takes {:.0} MiB)",
        p.runs,
        size as f64 / 1048576.0
    );
    println!("{:<40} {:>23} {:>23} {:>7}", "p50 / p95", "from the template", "cold boot + start", "cold/tpl");
    row("request → Chromium DevTools answers", |s| s.devtools_ms, "ms");
    row("request → agent's first reply", |s| s.agent_ms, "ms");
    row("QEMU RSS once both are up", |s| s.rss_mib, "MiB");
    row("host disk of the sandbox", |s| s.disk_mib, "MiB");
    Ok(())
}

/// A sandbox from the template: Chromium and the supervisor are already running.
async fn warm_run(client: &Client, run: usize) -> Result<Sample> {
    let started = Instant::now();
    let sandbox: Sandbox = client
        .json(Method::POST, "/v1/sandboxes", Some(&json!({"template": "coder", "idle_timeout_secs": 0})))
        .await
        .context("creating a sandbox from coder")?;
    let result = measure(client, &sandbox.id, started, &format!("warm-{run}")).await;
    remove(client, &sandbox.id).await;
    result
}

/// The same disk, cold: a sandbox from the template is powered off (setup, not timed), then
/// booted and given the template's processes by hand.
async fn cold_run(client: &Client, run: usize, spec: &TemplateFile) -> Result<Sample> {
    let sandbox: Sandbox =
        client.json(Method::POST, "/v1/sandboxes", Some(&json!({"template": "coder", "idle_timeout_secs": 0}))).await?;
    let id = sandbox.id.clone();
    let result = async {
        let _: Value = client.json(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None::<&()>).await?;
        let started = Instant::now();
        let _: Value = client.json(Method::POST, &format!("/v1/sandboxes/{id}/start"), None::<&()>).await?;
        for process in &spec.processes {
            torpor_template::start_process(client, &id, process, &spec.env).await?;
        }
        measure(client, &id, started, &format!("cold-{run}")).await
    }
    .await;
    remove(client, &id).await;
    result
}

async fn measure(client: &Client, id: &str, started: Instant, channel: &str) -> Result<Sample> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while torpor_template::exec(client, id, torpor_template::shell(DEVTOOLS)).await?.0 != Some(0) {
        if Instant::now() > deadline {
            bail!("Chromium's DevTools did not answer within 300 s in {id}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let devtools_ms = started.elapsed().as_secs_f64() * 1e3;
    let _: Value = client
        .json(Method::POST, "/v1/channels", Some(&json!({"name": channel, "kind": "http", "sandbox": id})))
        .await?;
    let reply = client
        .send(
            client
                .request(Method::POST, &format!("/v1/channels/{channel}/messages"))
                .json(&json!({"text": "hello", "conversation": "bench"})),
        )
        .await?
        .text()
        .await?;
    let agent_ms = started.elapsed().as_secs_f64() * 1e3;
    if !reply.contains("event: done") {
        bail!("the agent did not answer: {reply}");
    }
    let _ = client.send(client.request(Method::DELETE, &format!("/v1/channels/{channel}"))).await;
    let sandbox: Sandbox = client.json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>).await?;
    let rss_kib = sandbox.pid.and_then(|pid| proc_kib(pid, "status", "VmRSS")).unwrap_or(0);
    let usage: Usage = client.json(Method::GET, &format!("/v1/sandboxes/{id}/usage"), None::<&()>).await?;
    Ok(Sample {
        devtools_ms,
        agent_ms,
        rss_mib: rss_kib as f64 / 1024.0,
        disk_mib: usage.storage_bytes as f64 / 1048576.0,
    })
}

async fn remove(client: &Client, id: &str) {
    let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}"))).await;
}
