//! `torpor bench credentials`: what the credential broker and the model proxy cost. Model calls
//! from a sandbox through the proxy against the same calls straight to the upstream (time to
//! first byte and total, whole and streamed answers), and resume → first exec for a sandbox
//! without credentials, with credentials that only need pushing, and with a GitHub token that
//! must be minted on the way.
//!
//! Self-contained: a lab internet (torpor-testkit) with fakes of GitHub and the Anthropic API on
//! it, and a private daemon configured for them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde::Deserialize;
use torpor_api::{CreateSandbox, ExecEvent, ExecRequest, GitHubGrant, ModelGrant, NetworkPolicy, Sandbox};

use crate::common::{exec_true, percentile, private_file, resumes_logged};
use crate::daemon::BenchDaemon;
use torpor_client::Client;

const LAB: u8 = 101;
const POOL: &str = "10.198.0.0/16";
const GITHUB_PORT: u16 = 8080;
const MODELS_PORT: u16 = 8081;

/// Runs in the guest: alternates proxied and direct calls on one kept-alive connection each,
/// as the SDKs do, and prints the samples as JSON.
const PROBE: &str = r#"
import http.client, json, sys, time
proxy_token, direct_host, direct_port, real_key, n, words = sys.argv[1:7]
n, prompt = int(n), " ".join("word%d" % i for i in range(int(words)))
targets = {
    "proxy": (http.client.HTTPConnection("192.168.240.1", 7070), "/anthropic/v1/messages", proxy_token),
    "direct": (http.client.HTTPConnection(direct_host, int(direct_port)), "/v1/messages", real_key),
}
out = {t: {"stream_ttfb": [], "stream_total": [], "whole_ttfb": [], "whole_total": []} for t in targets}
for i in range(n):
    for name, (conn, path, key) in targets.items():
        for stream in (True, False):
            body = json.dumps({"model": "claude-bench", "max_tokens": 1024, "stream": stream,
                               "messages": [{"role": "user", "content": prompt}]})
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
            t = time.perf_counter()
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            if r.status != 200:
                sys.exit("%s: HTTP %d %s" % (name, r.status, r.read()))
            first = None
            if stream:
                while True:
                    line = r.readline()
                    if not line:
                        break
                    if first is None and line.startswith(b"data:"):
                        first = time.perf_counter()
            else:
                first = time.perf_counter()
                r.read()
            end = time.perf_counter()
            kind = "stream" if stream else "whole"
            out[name][kind + "_ttfb"].append((first - t) * 1e3)
            out[name][kind + "_total"].append((end - t) * 1e3)
print(json.dumps(out))
"#;

#[derive(Deserialize)]
struct Samples {
    stream_ttfb: Vec<f64>,
    stream_total: Vec<f64>,
    whole_ttfb: Vec<f64>,
    whole_total: Vec<f64>,
}

#[derive(Deserialize)]
struct Probe {
    proxy: Samples,
    direct: Samples,
}

pub struct Params {
    pub calls: usize,
    pub words: usize,
    pub cycles: usize,
}

pub async fn run(p: Params) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("torpor bench credentials needs root: it builds a lab network and runs its own daemon");
    }
    if p.calls == 0 || p.cycles == 0 || !(1..=2000).contains(&p.words) {
        bail!("--calls and --cycles must be at least 1, --words between 1 and 2000");
    }
    eprintln!("==> lab internet 198.18.{LAB}.0/24 with fake GitHub and Anthropic APIs, and a private daemon");
    let lab = torpor_testkit::Internet::start(LAB, 60)?;
    let app = torpor_testkit::GitHubApp::generate("1", 1)?;
    let real_key = "sk-ant-bench-key";
    let key_file = private_file(app.dir(), "anthropic.key", real_key)?;
    let github =
        torpor_testkit::FakeGitHub::start(lab.listen(GITHUB_PORT)?, &app, &["bench"], Duration::from_secs(3600))?;
    let _models = torpor_testkit::FakeModels::start(lab.listen(MODELS_PORT)?, real_key, "unused")?;
    let (github_host, models_host) = (lab.addr(20), lab.addr(21));
    let config = format!(
        "[github]\napp_id = \"1\"\ninstallation_id = 1\nprivate_key_file = \"{}\"\napi_url = \"http://{github_host}:{GITHUB_PORT}\"\n\
         [models.anthropic]\nbase_url = \"http://{models_host}:{MODELS_PORT}\"\nkey_file = \"{}\"\n",
        app.private_key_file().display(),
        key_file.display()
    );
    let (daemon, client) = BenchDaemon::start(Some(lab.dns_server()), POOL, &config).await?;

    let granted = CreateSandbox {
        idle_timeout_secs: Some(0),
        github: Some(GitHubGrant { repositories: vec!["bench".into()], ..Default::default() }),
        models: Some(ModelGrant::default()),
        network: Some(NetworkPolicy {
            mode: torpor_api::NetworkMode::Allowlist,
            allow_domains: vec![],
            allow_cidrs: vec![format!("{models_host}/32:{MODELS_PORT}")],
        }),
        ..Default::default()
    };
    let sandbox: Sandbox = client
        .json(Method::POST, "/v1/sandboxes", Some(&granted))
        .await
        .with_context(|| format!("creating a sandbox:\n{}", daemon.log()))?;
    let accel = sandbox.accelerator.clone();
    eprintln!("==> {} model calls each way, whole and streamed, {} words in and out", p.calls, p.words);
    let token_req = ExecRequest { argv: vec!["printenv".into(), "ANTHROPIC_API_KEY".into()], ..Default::default() };
    let torpor_client::ExecOutput { stdout: token, .. } = client.exec(&sandbox.id, &token_req).await?;
    let token = String::from_utf8_lossy(&token).trim().to_owned();
    let argv = [
        "python3",
        "-c",
        PROBE,
        &token,
        &models_host.to_string(),
        &MODELS_PORT.to_string(),
        real_key,
        &p.calls.to_string(),
        &p.words.to_string(),
    ];
    let req = ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    let torpor_client::ExecOutput { stdout: out, stderr: err, exit } = client.exec(&sandbox.id, &req).await?;
    if !matches!(exit, ExecEvent::Exit { code: Some(0), .. }) {
        bail!("the probe failed in the guest ({exit:?}): {}", String::from_utf8_lossy(&err));
    }
    let probe: Probe =
        serde_json::from_slice(&out).with_context(|| format!("probe output: {}", String::from_utf8_lossy(&out)))?;

    eprintln!("==> {} pause/resume cycles per kind", p.cycles);
    let _: Sandbox = client.json(Method::POST, &format!("/v1/sandboxes/{}/pause", sandbox.id), None::<&()>).await?;
    let bare: Sandbox = client
        .json(Method::POST, "/v1/sandboxes", Some(&CreateSandbox { idle_timeout_secs: Some(0), ..Default::default() }))
        .await?;
    // Every kind stays paused equally long: long enough for a 2 s token to be due for renewal.
    let short = Duration::from_secs(2);
    let idle = short / 2 + Duration::from_millis(200);
    let plain = resume_cycles(&client, &bare.id, p.cycles, idle).await?;
    let _: Sandbox = client.json(Method::POST, &format!("/v1/sandboxes/{}/resume", sandbox.id), None::<&()>).await?;
    let pushed = resume_cycles(&client, &sandbox.id, p.cycles, idle).await?;
    // A sandbox whose tokens live 2 s: each is due by the next resume, which mints a new one.
    github.set_lifetime(short);
    let due: Sandbox = client.json(Method::POST, "/v1/sandboxes", Some(&granted)).await?;
    let minted_before = github.issued();
    let minted = resume_cycles(&client, &due.id, p.cycles, idle).await?;
    let mints = github.issued() - minted_before;
    for id in [&sandbox.id, &bare.id, &due.id] {
        let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{id}"))).await;
    }
    let log = daemon.log();
    let pushes = |id: &str| resumes_logged(&log, id, "credentials_ms");
    let (plain_push, pushed_push, minted_push) = (pushes(&bare.id), pushes(&sandbox.id), pushes(&due.id));
    drop(daemon);
    drop(lab);

    println!("\ntorpor bench credentials ({accel} guests; fake upstreams on a lab veth; ratio = proxy / direct)");
    println!(
        "{:<40} {:>18} {:>18} {:>7} {:>9}",
        "model call, ms (p50 / p95)", "direct", "via proxy", "ratio", "+p50 ms"
    );
    let row = |what: &str, direct: &[f64], proxy: &[f64]| {
        let (d50, p50) = (percentile(direct, 50.0), percentile(proxy, 50.0));
        println!(
            "{what:<40} {:>18} {:>18} {:>7.2} {:>9.2}",
            format!("{d50:.2} / {:.2}", percentile(direct, 95.0)),
            format!("{p50:.2} / {:.2}", percentile(proxy, 95.0)),
            p50 / d50,
            p50 - d50
        );
    };
    row("streamed: time to first event", &probe.direct.stream_ttfb, &probe.proxy.stream_ttfb);
    row("streamed: total", &probe.direct.stream_total, &probe.proxy.stream_total);
    row("whole: time to response headers", &probe.direct.whole_ttfb, &probe.proxy.whole_ttfb);
    row("whole: total", &probe.direct.whole_total, &probe.proxy.whole_total);
    println!("\n{:<52} {:>20} {:>20}", "resume, ms (p50 / p95)", "credential refresh", "resume → first exec");
    let line = |what: &str, push: &[f64], s: &[f64]| {
        let pair = |s: &[f64]| format!("{:.1} / {:.1}", percentile(s, 50.0), percentile(s, 95.0));
        println!("{what:<52} {:>20} {:>20}", pair(push), pair(s));
    };
    line("device token only", &plain_push, &plain);
    line("GitHub + model proxy, token still fresh (push only)", &pushed_push, &pushed);
    line(&format!("GitHub + model proxy, token minted ({mints} mints)"), &minted_push, &minted);
    println!("\ncredential refresh = issuing and pushing every credential, from the daemon's own timing (it runs");
    println!("alongside the guest clock sync); the GitHub here is a local fake, a real one adds its round trip.");
    Ok(())
}

/// Pause, stay paused until `idle` after the last resume, resume, time until an exec
/// succeeds; `cycles` times. The sandbox must be running, and is paused afterwards.
async fn resume_cycles(client: &Client, id: &str, cycles: usize, idle: Duration) -> Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..cycles {
        let resumed_at = Instant::now();
        let _: Sandbox = client.json(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None::<&()>).await?;
        tokio::time::sleep(idle.saturating_sub(resumed_at.elapsed())).await;
        let start = Instant::now();
        let _: Sandbox = client.json(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None::<&()>).await?;
        exec_true(client, id).await?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    // Left paused: an idle TCG guest still takes CPU from the next one measured.
    let _: Sandbox = client.json(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None::<&()>).await?;
    Ok(samples)
}
