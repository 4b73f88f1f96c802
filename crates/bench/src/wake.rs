//! `torpor bench wake`: a Telegram message to a sandbox's agent, from the webhook call to the
//! reply arriving at Telegram, for a paused sandbox and a running one side by side, and how much
//! of the paused case is the resume itself.
//!
//! Self-contained: a fake Telegram Bot API on 127.0.0.1 (torpor-testkit) and a private daemon with
//! a Telegram channel whose sandbox runs the `echo` agent.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{percentile, private_file, resumes_logged};
use crate::daemon::BenchDaemon;

const POOL: &str = "10.197.0.0/16";
const BOT_TOKEN: &str = "1:bench";
const HOOK_SECRET: &str = "bench-hook";

pub async fn run(runs: usize) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("torpor bench wake needs root: it runs its own daemon");
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let telegram = torpor_testkit::FakeTelegram::start(BOT_TOKEN).await?;
    let secrets = tempfile::tempdir()?;
    let config = format!(
        "telegram_api_url = \"{}\"\n[secrets.BOT]\nfile = \"{}\"\n[secrets.HOOK]\nfile = \"{}\"\n",
        telegram.url,
        private_file(secrets.path(), "bot", BOT_TOKEN)?.display(),
        private_file(secrets.path(), "hook", HOOK_SECRET)?.display(),
    );
    eprintln!("==> a private daemon with a Telegram channel (echo agent) and a fake Telegram at {}", telegram.url);
    let (daemon, client) = BenchDaemon::start(Some(std::net::Ipv4Addr::LOCALHOST), POOL, &config).await?;
    let channel = json!({"name": "bench", "kind": "telegram", "agent": {"adapter": "echo"}, "idle_timeout_secs": 0,
        "telegram": {"bot_token": "BOT", "webhook_secret": "HOOK"}});
    let _: Value = client.json(Method::POST, "/v1/channels", Some(&channel)).await?;
    let http = reqwest::Client::new();
    let hook = format!("{}/v1/hooks/telegram/bench", client.base());
    let mut update_id = 0i64;
    let mut message = |text: &str| {
        update_id += 1;
        json!({"update_id": update_id, "message": {"message_id": update_id, "date": 0,
            "chat": {"id": 1, "type": "private"}, "text": text}})
    };
    // The webhook call, until the reply is at Telegram.
    let round_trip = |update: Value| {
        let (http, hook, telegram) = (http.clone(), hook.clone(), telegram.clone());
        async move {
            let before = telegram.messages().len();
            let started = Instant::now();
            let status = http
                .post(&hook)
                .header("X-Telegram-Bot-Api-Secret-Token", HOOK_SECRET)
                .json(&update)
                .send()
                .await?
                .status();
            if !status.is_success() {
                bail!("the webhook answered {status}");
            }
            if !telegram.wait_for_messages(before + 1, Duration::from_secs(120)).await {
                bail!("no reply within 120 s");
            }
            Ok::<_, anyhow::Error>(started.elapsed().as_secs_f64() * 1e3)
        }
    };
    eprintln!("==> first message (creates the conversation's sandbox)");
    let first = round_trip(message("hello")).await.with_context(|| daemon.log())?;
    let list: Value = client.json(Method::GET, "/v1/sandboxes", None::<&()>).await?;
    let id = list["sandboxes"][0]["id"].as_str().context("no sandbox was made")?.to_owned();

    eprintln!("==> {runs} messages to the running sandbox, {runs} to it paused");
    let (mut running, mut paused) = (Vec::new(), Vec::new());
    for i in 0..runs {
        running.push(round_trip(message(&format!("running {i}"))).await?);
        let _: Value = client.json(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None::<&()>).await?;
        paused.push(round_trip(message(&format!("paused {i}"))).await?);
    }
    let resumes = resumes_logged(&daemon.log(), &id, "ms");
    drop(daemon);

    let pair = |s: &[f64]| format!("{:.1} / {:.1}", percentile(s, 50.0), percentile(s, 95.0));
    println!("\ntorpor bench wake (Telegram webhook → reply at Telegram; echo agent; fake Telegram on loopback)");
    println!("{:<44} {:>20}", "ms (p50 / p95)", "");
    println!("{:<44} {:>20}", "first message (creates the sandbox)", format!("{first:.1}"));
    println!("{:<44} {:>20}", "sandbox running", pair(&running));
    println!("{:<44} {:>20}", "sandbox paused (woken by the message)", pair(&paused));
    println!("{:<44} {:>20}", "  of which the resume (daemon's timing)", pair(&resumes));
    let (p50_run, p50_paused, p50_resume) =
        (percentile(&running, 50.0), percentile(&paused, 50.0), percentile(&resumes, 50.0));
    println!(
        "\npaused / running: {:.1}x at p50; the resume is {:.0} % of the paused round trip.",
        p50_paused / p50_run,
        100.0 * p50_resume / p50_paused
    );
    Ok(())
}
