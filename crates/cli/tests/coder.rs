//! The shipped `coder` template, built for real (Debian packages, Claude Code and Codex from
//! npm, Chromium) and used end to end: what its snapshot holds running is up the moment a
//! sandbox exists, and a real Claude Code, woken from pause by a relayed message, drives its
//! tools against a scripted model behind Torpor's model proxy.
//!
//! The build reaches the real package registries (the only network this machine has), so this
//! test takes minutes; it builds the template once and checks everything against it.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use common::channel::{create_channel, done, pause, send};
use common::{private_file, sh, Daemon, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use torpor_testkit::{FakeModels, ToolScript};

const MODELS_PORT: u16 = 8081;

/// CA certificates this host added to its own trust store (a TLS-intercepting proxy on the way to
/// the registries, where there is one): the build must trust them too.
fn host_local_cas() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![PathBuf::from("/usr/local/share/ca-certificates")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "crt") {
                found.push(path);
            }
        }
    }
    found
}

/// A process by the guest's own clock: its pid, its start (clock ticks after boot) and how long
/// it has run in seconds.
async fn process_start(d: &Daemon, id: &str, pid_command: &str) -> (u32, u64, f64) {
    let script = format!(
        "pid=$({pid_command}); test -n \"$pid\" || exit 1; hz=$(getconf CLK_TCK); \
         start=$(awk '{{print $22}}' /proc/$pid/stat); up=$(cut -d' ' -f1 /proc/uptime); \
         awk -v p=\"$pid\" -v s=\"$start\" -v hz=\"$hz\" -v up=\"$up\" 'BEGIN {{ printf \"%d %d %.2f\", p, s, up - s / hz }}'"
    );
    let out = sh(d, id, &script).await;
    let parts: Vec<&str> = out.split_whitespace().collect();
    (parts[0].parse().unwrap(), parts[1].parse().unwrap(), parts[2].parse().unwrap())
}

#[tokio::test]
async fn coder_template_starts_warm_and_runs_a_real_agent_through_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let anthropic_key = "sk-ant-real-coder-test-4f1c2a";
    let openai_key = "sk-real-coder-test-9d3e7b";
    let anthropic_file = private_file(dir.path(), "anthropic.key", anthropic_key);
    let openai_file = private_file(dir.path(), "openai.key", openai_key);
    let lab_config = move |lab: &torpor_testkit::Internet| {
        let models = format!("http://{}:{MODELS_PORT}", lab.addr(21));
        format!(
            "[models.anthropic]\nbase_url = \"{models}\"\nkey_file = \"{}\"\n\
             [models.openai]\nbase_url = \"{models}\"\nkey_file = \"{}\"\n",
            anthropic_file.display(),
            openai_file.display()
        )
    };
    let d = Daemon::start_with(Options {
        internet_ttl: Some(60),
        host_dns: true,
        lab_config: Some(Arc::new(lab_config)),
        ..Default::default()
    })
    .await;
    let models =
        FakeModels::start(d.internet.as_ref().unwrap().listen(MODELS_PORT).unwrap(), anthropic_key, openai_key)
            .unwrap();

    // Built by name: the template file ships inside the binary.
    let started = Instant::now();
    let mut args = vec!["template".to_owned(), "build".to_owned(), "coder".to_owned()];
    for ca in host_local_cas() {
        args.extend(["--ca-cert".to_owned(), ca.display().to_string()]);
    }
    let out = d.cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), b"");
    assert!(
        out.status.success(),
        "template build coder: {}{}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        d.server_log()
    );
    eprintln!("coder template built in {:.0} s", started.elapsed().as_secs_f64());

    let out = d.cli(&["template", "list"], b"");
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = listing.lines().find(|l| l.starts_with("coder ")).unwrap_or_else(|| panic!("{listing}"));
    for part in ["torpor-guest, chromium", "agent claude-code", "allowlist: @registries", "github.com"] {
        assert!(row.contains(part), "template list row lacks {part:?}: {row}");
    }
    assert!(row.contains("GiB") || row.contains("MiB"), "no size: {row}");

    // Everything the snapshot holds is up the moment the create returns.
    let create_began = Instant::now();
    let sandbox = d.create(json!({"template": "coder", "idle_timeout_secs": 0})).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let (code, out, err) = d.exec(&id, &["curl", "-sf", "--max-time", "5", "http://127.0.0.1:9222/json/version"]).await;
    let since_create = create_began.elapsed().as_secs_f64();
    assert_eq!(code, Some(0), "DevTools did not answer on the first try: {}", String::from_utf8_lossy(&err));
    let version: Value = serde_json::from_slice(&out).unwrap();
    assert!(version["Browser"].as_str().unwrap_or("").contains("Chrom"), "{version}");
    assert!(version["webSocketDebuggerUrl"].is_string(), "{version}");
    // Chromium and the supervisor have been running longer than this sandbox has existed (the
    // guest's clock goes on from the snapshot, and cannot have run longer than the host's since
    // the create began): they were started at build time, not by the create.
    let mut chromium = (0, 0, 0.0);
    for (what, pid) in [("chromium", "pgrep -o -x chromium"), ("torpor-guest", "echo 1")] {
        let started = process_start(&d, &id, pid).await;
        assert!(
            started.2 > since_create,
            "{what} has run {:.2} s, but the sandbox was created {since_create:.2} s ago: it was started by the create",
            started.2
        );
        if what == "chromium" {
            chromium = started;
        }
    }
    // The sandbox's policy is the template's, with @registries expanded.
    let (_, network) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/network"), None).await;
    let domains = network["allow_domains"].to_string();
    assert!(domains.contains("registry.npmjs.org") && !domains.contains("@registries"), "{network}");
    // Claude Code's program is already in the page cache (the template's `preload`).
    let cached =
        sh(&d, &id, "fincore --bytes --noheadings --output RES,SIZE \"$(readlink -f \"$(command -v claude)\")\"").await;
    let sizes: Vec<u64> = cached.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert!(sizes[1] > 1 << 20 && sizes[0] * 10 >= sizes[1] * 9, "claude is not in the page cache: {cached}");
    let versions = sh(&d, &id, "claude --version && codex --version").await;
    assert!(versions.contains("Claude Code") && versions.to_lowercase().contains("codex"), "{versions}");
    // The browser skill drives the running Chromium.
    let page = sh(
        &d,
        &id,
        "cd /tmp && printf '<title>Torpor page</title><p id=x>hello browser</p>' > p.html && torpor-browser text file:///tmp/p.html",
    )
    .await;
    assert!(page.contains("Torpor page") && page.contains("hello browser"), "{page}");
    // The run-tests skill finds pytest and passes its exit status on.
    let suite = "mkdir -p /tmp/proj/tests && cd /tmp/proj && printf 'def test_ok():\\n    assert 1 + 1 == 2\\n' > tests/test_a.py";
    sh(&d, &id, suite).await;
    let (code, _, err) = d.exec(&id, &["torpor-run-tests", "/tmp/proj"]).await;
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&err));
    sh(&d, &id, "printf 'def test_bad():\\n    assert False\\n' > /tmp/proj/tests/test_b.py").await;
    let (code, out, _) = d.exec(&id, &["torpor-run-tests", "/tmp/proj"]).await;
    assert_eq!(code, Some(1), "a failing suite must fail: {}", String::from_utf8_lossy(&out));
    let skills = sh(&d, &id, "ls /root/.claude/skills /root/.codex/skills/").await;
    assert!(skills.matches("browser").count() == 2 && skills.matches("run-tests").count() == 2, "{skills}");
    // The agents reach models only through the proxy: the real keys are nowhere in the guest.
    let env = sh(&d, &id, "env").await;
    assert!(env.contains("ANTHROPIC_BASE_URL=http://192.168.240.1:7070/anthropic"), "{env}");
    assert!(!env.contains(anthropic_key) && !env.contains(openai_key));

    // A real Claude Code run, woken by a message: write a file, run a command, answer.
    models.set_tool_script(ToolScript {
        trigger: "TORPOR-TASK".into(),
        steps: vec![
            (
                "Write".into(),
                json!({"file_path": "/root/work/hello.py", "content": "print('hello from the coder template')\n"}),
            ),
            (
                "Bash".into(),
                json!({"command": "cd /root/work && python3 hello.py > out.txt", "description": "Run hello.py"}),
            ),
        ],
        shell: vec![],
        done: "I wrote hello.py and ran it; its output is in out.txt.".into(),
    });
    create_channel(&d, json!({"name": "code", "kind": "http", "sandbox": id})).await;
    let (first, events) = wake_with(&d, &id, "code", "TORPOR-TASK: write hello.py and run it").await;
    assert!(first["text"].as_str().unwrap().contains("I wrote hello.py and ran it"), "{first}");
    let tools: Vec<&Value> = events.iter().filter(|e| e.0 == "tool").map(|e| &e.1).collect();
    assert!(tools.len() >= 2, "the tool calls were not relayed: {events:?}");
    assert_eq!(sh(&d, &id, "cat /root/work/hello.py").await, "print('hello from the coder template')");
    assert_eq!(sh(&d, &id, "cat /root/work/out.txt").await, "hello from the coder template");
    let requests = models.requests();
    let scripted = requests.iter().filter(|r| r.path == "/v1/messages" && r.body["tools"].is_array()).count();
    assert!(scripted >= 3, "{scripted} tool-offering requests");
    for r in &requests {
        let key = r.headers.iter().find(|(k, _)| k == "x-api-key").map(|(_, v)| v.as_str());
        assert_eq!(key, Some(anthropic_key), "the upstream must see the real key, set by the proxy");
    }
    let (_, usage) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/usage"), None).await;
    assert!(usage["model_requests"].as_u64().unwrap() >= requests.len() as u64, "{usage}");
    assert!(usage["model_output_tokens"].as_u64().unwrap() > 0, "{usage}");
    // Paused mid-conversation, "continue" wakes it and Claude Code resumes the same session.
    let (second, _) = wake_with(&d, &id, "code", "continue").await;
    assert_continued(&first, &second, "TORPOR-TASK");

    // Codex, in a sandbox from the same template, against the OpenAI Responses API.
    models.set_tool_script(ToolScript {
        trigger: "CODEX-TASK".into(),
        steps: vec![],
        shell: vec![
            "printf 'print(40 + 2)\\n' > /root/work/answer.py".into(),
            "cd /root/work && python3 answer.py > answer.txt".into(),
        ],
        done: "answer.txt holds the answer.".into(),
    });
    let before = models.requests().len();
    let codex = d.create(json!({"template": "coder", "agent": {"adapter": "codex"}, "idle_timeout_secs": 0})).await;
    let codex = codex["id"].as_str().unwrap().to_owned();
    // The same Chromium, down to its pid and its start tick: both clones have the one from the
    // snapshot.
    let (pid, start, _) = process_start(&d, &codex, "pgrep -o -x chromium").await;
    assert_eq!((pid, start), (chromium.0, chromium.1), "a clone has a Chromium of its own");
    create_channel(&d, json!({"name": "codex", "kind": "http", "sandbox": codex})).await;
    let (first, _) = wake_with(&d, &codex, "codex", "CODEX-TASK: compute the answer").await;
    assert!(first["text"].as_str().unwrap().contains("answer.txt holds the answer"), "{first}");
    assert_eq!(sh(&d, &codex, "cat /root/work/answer.txt").await, "42");
    let requests = &models.requests()[before..];
    let calls = requests.iter().filter(|r| r.path == "/v1/responses").count();
    assert!(calls >= 3, "{calls} Responses requests: {:?}", requests.iter().map(|r| &r.path).collect::<Vec<_>>());
    for r in requests {
        let auth = r.headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.as_str());
        assert_eq!(auth, Some(format!("Bearer {openai_key}").as_str()), "{}", r.path);
    }
    let (second, _) = wake_with(&d, &codex, "codex", "continue").await;
    assert_continued(&first, &second, "CODEX-TASK");
}

/// Pauses sandbox `id`, then sends `text` on its HTTP channel: the reply must wake it and finish.
async fn wake_with(d: &Daemon, id: &str, channel: &str, text: &str) -> (Value, Vec<(String, Value, Instant)>) {
    pause(d, id).await;
    let (status, events) = send(d, channel, json!({"text": text, "conversation": "task-1"})).await;
    assert_eq!(status, StatusCode::OK);
    let end = done(&events);
    assert_eq!(end["woke"], json!(true), "{end}");
    (end, events)
}

/// The second answer came from the same agent session, which still had the first task.
fn assert_continued(first: &Value, second: &Value, task: &str) {
    assert!(first["session"].as_str().is_some_and(|s| !s.is_empty()), "no session: {first}");
    assert_eq!(second["session"], first["session"], "not the same agent session");
    assert_eq!(second["turn"], json!(2), "{second}");
    let text = second["text"].as_str().unwrap();
    assert!(
        text.contains("You said: continue") && text.contains(&format!("began with: {task}")),
        "the history was lost: {text}"
    );
}
