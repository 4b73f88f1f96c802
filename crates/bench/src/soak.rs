//! `torpor bench soak`: sandboxes of two sizes run code-churning work (many short processes,
//! Python, a C compile loop and npm/pip where the image has them, and memory the guest fills
//! and frees) for N minutes, while the host samples each VM process: its anonymous memory
//! (QEMU's own: heap, TCG code cache), its file pages (mostly guest RAM) and its cgroup's usage
//! against the limit. What must hold: the anonymous memory plateaus below the limit, no VM is
//! killed by the out-of-memory killer, every sandbox is still running at the end.
//!
//! Self-contained: a private daemon with the default configuration (or `--tcg-code-cache-mib`
//! to compare another code cache size).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use torpor_api::{CreateSandbox, ExecRequest, Sandbox};

use crate::common::proc_kib;
use crate::daemon::BenchDaemon;
use torpor_client::Client;

const POOL: &str = "10.195.0.0/16";

/// The guest's work, forever, in the background: each round starts dozens of processes and
/// runs what the image has. It counts rounds in /tmp/soak.rounds. `$1`: MiB the guest fills
/// and frees each round (its page cache and heap, so the guest's RAM is really used).
const WORK: &str = r#"
fill=$1
cat > /tmp/soak.c <<'C'
#include <stdio.h>
int main(void) { unsigned long s = 0; for (int i = 0; i < 100000; i++) s += i * 7 % 13; printf("%lu\n", s); return 0; }
C
n=0
while true; do
  for i in $(seq 30); do /bin/true; done
  python3 -c "import json, hashlib, random; print(hashlib.sha256(json.dumps([random.random() for _ in range(5000)]).encode()).hexdigest())" >/dev/null
  python3 -c "b = bytearray($fill << 20); b[::4096] = b'x' * len(b[::4096]); print(len(b))" >/dev/null 2>&1
  if command -v cc >/dev/null; then cc -O1 -o /tmp/soak /tmp/soak.c && /tmp/soak >/dev/null; fi
  if command -v npm >/dev/null; then npm --version >/dev/null 2>&1; node -e 'console.log([...Array(1e4).keys()].reduce((a, b) => a + b))' >/dev/null; fi
  if command -v pip3 >/dev/null; then pip3 --version >/dev/null 2>&1; fi
  git --version >/dev/null; curl --version >/dev/null; ls -laR /usr/lib/python3* >/dev/null 2>&1
  n=$((n + 1)); echo $n > /tmp/soak.rounds
done
"#;

pub struct Params {
    pub minutes: u64,
    pub sizes: Vec<u32>,
    pub template: String,
    pub sample_secs: u64,
    pub tcg_code_cache_mib: Option<u32>,
}

struct Subject {
    sandbox: Sandbox,
    pid: u32,
    limit_mib: f64,
    /// (minute, anon MiB, file MiB, cgroup MiB)
    samples: Vec<(f64, f64, f64, f64)>,
    rounds: Vec<(f64, u64)>,
    oom_kills: u64,
    end_state: String,
    end_reason: Option<String>,
    tools: String,
}

/// The cgroup counters of a VM: (usage MiB, out-of-memory kills).
fn cgroup_counters(id: &str) -> (f64, u64) {
    match torpor_engine::cgroup::Cgroup::for_vm(&torpor_engine::qemu::process_name(id)) {
        Some(cg) => (cg.memory_usage_bytes().unwrap_or(0) as f64 / 1048576.0, cg.oom_kills()),
        None => (0.0, 0),
    }
}

async fn shell(client: &Client, id: &str, script: &str) -> Result<String> {
    let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
    let torpor_client::ExecOutput { stdout: out, stderr: err, exit } = client.exec(id, &req).await?;
    match exit {
        torpor_api::ExecEvent::Exit { code: Some(0), .. } => Ok(String::from_utf8_lossy(&out).trim().into()),
        other => bail!("`{script}` failed in {id}: {other:?}: {}", String::from_utf8_lossy(&err)),
    }
}

pub async fn run(p: Params) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("torpor bench soak needs root: it runs its own daemon");
    }
    if p.minutes == 0 || p.sizes.is_empty() || p.sample_secs == 0 {
        bail!("--minutes, --sample-secs and --sizes must not be zero or empty");
    }
    let config = p.tcg_code_cache_mib.map(|mib| format!("tcg_code_cache_mib = {mib}\n")).unwrap_or_default();
    eprintln!("==> a private daemon (pool {POOL}); sandboxes of {:?} MiB from template {}", p.sizes, p.template);
    let (daemon, client) = BenchDaemon::start(None, POOL, &config).await?;
    let mut subjects = Vec::new();
    for &memory in &p.sizes {
        let req = CreateSandbox {
            template: Some(p.template.clone()),
            memory_mib: (p.template == "base").then_some(memory),
            idle_timeout_secs: Some(0),
            ..Default::default()
        };
        let sandbox: Sandbox = client
            .json(Method::POST, "/v1/sandboxes", Some(&req))
            .await
            .with_context(|| format!("creating a {memory} MiB sandbox"))?;
        let pid = sandbox.pid.context("the sandbox has no VM pid")?;
        let fill = sandbox.memory_mib * 6 / 10;
        let tools = shell(
            &client,
            &sandbox.id,
            "for t in python3 cc npm pip3; do command -v $t >/dev/null && printf '%s ' $t; done; true",
        )
        .await?;
        let script = format!("cat > /tmp/soak.sh <<'EOF'\n{WORK}\nEOF\nnohup sh /tmp/soak.sh {fill} >/dev/null 2>&1 &");
        shell(&client, &sandbox.id, &script).await?;
        let limit_mib = sandbox.limits.memory_bytes as f64 / 1048576.0;
        eprintln!(
            "    {} ({} MiB, limit {limit_mib:.0} MiB): running {}",
            sandbox.id,
            sandbox.memory_mib,
            tools.trim()
        );
        subjects.push(Subject {
            sandbox,
            pid,
            limit_mib,
            samples: vec![],
            rounds: vec![],
            oom_kills: 0,
            end_state: String::new(),
            end_reason: None,
            tools,
        });
    }
    let started = Instant::now();
    let total = Duration::from_secs(p.minutes * 60);
    println!(
        "{:>6}  {:<14} {:>9} {:>9} {:>10} {:>7} {:>4}",
        "min", "sandbox", "anon MiB", "file MiB", "cgroup MiB", "rounds", "oom"
    );
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(p.sample_secs).min(total.saturating_sub(started.elapsed()))).await;
        let minute = started.elapsed().as_secs_f64() / 60.0;
        for s in &mut subjects {
            let anon = proc_kib(s.pid, "status", "RssAnon").map(|k| k as f64 / 1024.0);
            let file = proc_kib(s.pid, "status", "RssFile").unwrap_or(0) as f64 / 1024.0;
            let (cgroup, oom) = cgroup_counters(&s.sandbox.id);
            s.oom_kills = s.oom_kills.max(oom);
            let rounds = match shell(&client, &s.sandbox.id, "cat /tmp/soak.rounds 2>/dev/null || echo 0").await {
                Ok(r) => r.parse().unwrap_or(0),
                Err(_) => s.rounds.last().map(|r| r.1).unwrap_or(0),
            };
            s.rounds.push((minute, rounds));
            match anon {
                Some(anon) => {
                    s.samples.push((minute, anon, file, cgroup));
                    println!(
                        "{minute:>6.1}  {:<14} {anon:>9.0} {file:>9.0} {cgroup:>10.0} {rounds:>7} {:>4}",
                        s.sandbox.id, s.oom_kills
                    );
                }
                None => println!("{minute:>6.1}  {:<14} VM process gone", s.sandbox.id),
            }
        }
    }
    for s in &mut subjects {
        let now: Sandbox = client.json(Method::GET, &format!("/v1/sandboxes/{}", s.sandbox.id), None::<&()>).await?;
        s.end_state = now.state.to_string();
        s.end_reason = now.reason.clone();
        let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{}", s.sandbox.id))).await;
    }
    drop(daemon);

    println!();
    println!("accelerator: {}   minutes: {}   template: {}", subjects[0].sandbox.accelerator, p.minutes, p.template);
    let mut all_good = true;
    for s in &subjects {
        let anon: Vec<f64> = s.samples.iter().map(|x| x.1).collect();
        let peak = anon.iter().copied().fold(0.0, f64::max);
        // Plateau: the last quarter of the run adds nothing (2 %) to the peak of the rest.
        let cut = anon.len() * 3 / 4;
        let (early, late) = anon.split_at(cut.max(1).min(anon.len()));
        let early_peak = early.iter().copied().fold(0.0, f64::max);
        let late_peak = late.iter().copied().fold(0.0, f64::max);
        let plateau = late.is_empty() || late_peak <= early_peak * 1.02;
        let rounds = s.rounds.last().map(|r| r.1).unwrap_or(0);
        let per_minute = rounds as f64 / p.minutes as f64;
        let running = s.end_state == "running";
        all_good &= plateau && s.oom_kills == 0 && running;
        println!(
            "{} {:>5} MiB: QEMU anon first {:.0} MiB, peak {:.0} MiB ({:.0}% of the {:.0} MiB limit), last quarter peak {:.0} MiB \
             → {}; out-of-memory kills {}; {}; {rounds} rounds ({per_minute:.1}/min) of: {}",
            s.sandbox.id,
            s.sandbox.memory_mib,
            anon.first().copied().unwrap_or(0.0),
            peak,
            100.0 * peak / s.limit_mib,
            s.limit_mib,
            late_peak,
            if plateau { "plateau" } else { "STILL GROWING" },
            s.oom_kills,
            if running { "still running".to_owned() } else { format!("{} ({})", s.end_state, s.end_reason.clone().unwrap_or_default()) },
            s.tools.trim(),
        );
    }
    if !all_good {
        bail!("a sandbox grew without bound, was killed, or stopped running (see above)");
    }
    Ok(())
}
