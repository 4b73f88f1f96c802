//! Short-lived credentials and the model proxy, end to end, against local fakes of GitHub and of
//! the model APIs (torpor-testkit) that check what the real services check: GitHub App tokens
//! scoped, renewed on resume and before expiry, revoked when replaced, and reaching long-running
//! processes through git's credential helper; model calls through the proxy whole and streamed,
//! metered, cut off at the budget; and the real upstream key nowhere in the guest or the logs.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{private_file, sh, wait_for, Daemon, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use torpor_testkit::{FakeGitHub, FakeModels, GitHubApp};

const GITHUB_PORT: u16 = 8080;
const MODELS_PORT: u16 = 8081;
const MODEL_CALL: &str = include_str!("guest/modelcall.py");
const SCAN: &str = include_str!("guest/scan.py");

fn random_key(prefix: &str) -> String {
    let mut raw = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    format!("{prefix}{}", hex::encode(raw))
}

struct Lab {
    d: Daemon,
    github: FakeGitHub,
    models: FakeModels,
    /// Where sandboxes reach the fakes (host:port).
    github_addr: String,
    anthropic_key: String,
    openai_key: String,
    _app: GitHubApp,
}

/// A daemon with a GitHub App whose tokens live `token_lifetime`, and both model upstreams.
async fn lab(token_lifetime: Duration, extra_config: &str) -> Lab {
    let app = GitHubApp::generate("4242", 77).unwrap();
    let (anthropic_key, openai_key) = (random_key("sk-ant-real-"), random_key("sk-real-"));
    let anthropic_file = private_file(app.dir(), "anthropic.key", &anthropic_key);
    let openai_file = private_file(app.dir(), "openai.key", &openai_key);
    let key_file = app.private_key_file();
    let lab_config = move |lab: &torpor_testkit::Internet| {
        let github = format!("http://{}:{GITHUB_PORT}", lab.addr(20));
        let models = format!("http://{}:{MODELS_PORT}", lab.addr(21));
        format!(
            "[github]\napp_id = \"4242\"\ninstallation_id = 77\nprivate_key_file = \"{}\"\napi_url = \"{github}\"\ngit_host = \"github.test\"\n\
             [models.anthropic]\nbase_url = \"{models}\"\nkey_file = \"{}\"\n\
             [models.openai]\nbase_url = \"{models}\"\nkey_file = \"{}\"\n",
            key_file.display(),
            anthropic_file.display(),
            openai_file.display()
        )
    };
    let d = Daemon::start_with(Options {
        internet_ttl: Some(60),
        extra_config: extra_config.into(),
        lab_config: Some(Arc::new(lab_config)),
        ..Default::default()
    })
    .await;
    let internet = d.internet.as_ref().unwrap();
    let github =
        FakeGitHub::start(internet.listen(GITHUB_PORT).unwrap(), &app, &["torpor", "website"], token_lifetime).unwrap();
    let models = FakeModels::start(internet.listen(MODELS_PORT).unwrap(), &anthropic_key, &openai_key).unwrap();
    let github_addr = format!("{}:{GITHUB_PORT}", internet.addr(20));
    Lab { d, github, models, github_addr, anthropic_key, openai_key, _app: app }
}

/// The token a new exec finds, after checking the file holds the same (a renewal may land
/// between reading one and the other: then it asks again).
async fn github_token(d: &Daemon, id: &str) -> String {
    for _ in 0..5 {
        let out = sh(d, id, "printenv GITHUB_TOKEN; cat /run/torpor/credentials/GITHUB_TOKEN").await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        if lines[0] == lines[1] {
            return lines[0].to_owned();
        }
    }
    panic!("the environment and the file never agreed on GITHUB_TOKEN");
}

const FILL: &str = "printf 'protocol=https\\nhost=github.test\\n\\n' | GIT_TERMINAL_PROMPT=0 git credential fill";

#[tokio::test]
async fn github_tokens_are_scoped_fresh_after_resume_renewed_and_reach_running_processes() {
    let lab = lab(Duration::from_secs(6), "").await;
    let d = &lab.d;
    let github = json!({"repositories": ["torpor"], "permissions": {"contents": "read"}});
    let network =
        json!({"mode": "allowlist", "allow_cidrs": [format!("{}/32", lab.github_addr.split(':').next().unwrap())]});
    let sandbox = d.create(json!({"github": github, "network": network, "idle_timeout_secs": 0})).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    assert_eq!(sandbox["github"]["repositories"], json!(["torpor"]));

    // A fresh sandbox holds a valid token for the configured repository only.
    let first = github_token(d, &id).await;
    assert_eq!(lab.github.check(&first), Some(vec!["torpor".to_owned()]));
    assert_eq!(lab.github.permissions(&first).unwrap()["contents"], "read");
    assert_eq!(lab.github.refused_jwts(), 0, "the daemon's app JWT must verify with the app's public key");
    let repos = sh(
        d,
        &id,
        &format!(
            "curl -sf -H \"Authorization: Bearer $GITHUB_TOKEN\" http://{}/installation/repositories",
            lab.github_addr
        ),
    )
    .await;
    let repos: Value = serde_json::from_str(&repos).unwrap();
    assert_eq!(repos["repositories"].as_array().unwrap().len(), 1, "{repos}");
    // git's credential helper answers for the GitHub host, and only for it.
    let filled = sh(d, &id, FILL).await;
    assert!(filled.contains(&format!("password={first}")), "{filled}");
    let other = d.exec(&id, &["sh", "-c", &FILL.replace("github.test", "evil.test")]).await;
    assert!(!String::from_utf8_lossy(&other.1).contains("password=ghs_"), "the helper answered for another host");

    // A process started now asks git for credentials only after the resume.
    sh(
        d,
        &id,
        &format!(
            "setsid sh -c 'printenv GITHUB_TOKEN > /tmp/env-token.partial; mv /tmp/env-token.partial /tmp/env-token; \
             while [ ! -e /tmp/go ]; do sleep 0.1; done; {} > /tmp/filled' \
             >/dev/null 2>&1 </dev/null &",
            FILL.replace('\'', "\"")
        ),
    )
    .await;

    // What it started with: `first`, or a renewal of it if one fell due since (TCG is slow).
    let mut started_with = String::new();
    for _ in 0..300 {
        started_with = sh(d, &id, "cat /tmp/env-token 2>/dev/null || true").await;
        if !started_with.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started_with.starts_with("ghs_"), "the background process did not start: {started_with:?}");

    // Paused past the token's expiry, then resumed: the next exec has a fresh, valid token.
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for("the tokens of before the pause to expire", Duration::from_secs(20), || {
        lab.github.check(&first).is_none() && lab.github.check(&started_with).is_none()
    })
    .await;
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let second = github_token(d, &id).await;
    assert_ne!(second, first);
    assert!(lab.github.check(&second).is_some(), "the token after resume must be valid");
    assert!(lab.github.check(&first).is_none(), "the old token must be refused");
    let refused = d
        .exec(
            &id,
            &[
                "sh",
                "-c",
                &format!("curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {first}' http://{}/installation/repositories", lab.github_addr),
            ],
        )
        .await;
    assert_eq!(String::from_utf8_lossy(&refused.1), "401", "GitHub must refuse the expired token");

    // The process that was running all along gets the current token from git's helper, while
    // its own environment still holds the stale one.
    sh(d, &id, "touch /tmp/go").await;
    let filled = loop {
        let out = sh(d, &id, "cat /tmp/filled 2>/dev/null || true").await;
        if out.contains("password=") {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let from_helper = filled.lines().find_map(|l| l.strip_prefix("password=")).unwrap().to_owned();
    assert!(from_helper != first && from_helper != started_with, "the helper handed out an expired token");
    // Current, or replaced by a renewal since the helper ran.
    assert!(lab.github.check(&from_helper).is_some() || lab.github.revoked(&from_helper), "{filled}");
    assert_eq!(sh(d, &id, "cat /tmp/env-token").await, started_with);

    // While it runs, the token is renewed before it expires and the replaced one is revoked.
    let before = github_token(d, &id).await;
    let renewed = next_token(d, &id, &before).await;
    assert!(lab.github.check(&renewed).is_some());
    wait_for("the replaced token to be revoked", Duration::from_secs(5), || lab.github.revoked(&before)).await;

    // Removing the sandbox revokes its token too. Tokens issued from now on outlive the test,
    // so the one removed is the one held.
    lab.github.set_lifetime(Duration::from_secs(3600));
    let last = next_token(d, &id, &renewed).await;
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_for("the token of a removed sandbox to be revoked", Duration::from_secs(5), || lab.github.revoked(&last))
        .await;
}

/// Waits for the sandbox's token to be renewed (within 10 s: the tokens here live 6 s).
async fn next_token(d: &Daemon, id: &str, current: &str) -> String {
    let started = Instant::now();
    loop {
        let token = github_token(d, id).await;
        if token != current {
            return token;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no renewal within 10 s of a 6 s token");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_template_carries_no_credentials_of_the_sandbox_it_was_made_from() {
    let lab = lab(Duration::from_secs(3600), "").await;
    let d = &lab.d;
    let source = d
        .create(
            json!({"cold_boot": true, "github": {"repositories": ["torpor"]}, "models": {}, "idle_timeout_secs": 0}),
        )
        .await;
    let source = source["id"].as_str().unwrap().to_owned();
    let token = github_token(d, &source).await;
    let proxy_token = sh(d, &source, "printenv ANTHROPIC_API_KEY").await;
    let (status, body) =
        d.call(Method::POST, "/v1/templates", Some(json!({"name": "from-granted", "sandbox": source}))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    wait_for("the captured sandbox's token to be revoked", Duration::from_secs(5), || lab.github.revoked(&token)).await;

    let clone = d.create(json!({"template": "from-granted", "idle_timeout_secs": 0})).await;
    let clone = clone["id"].as_str().unwrap().to_owned();
    let seen = sh(
        d,
        &clone,
        "printenv GITHUB_TOKEN ANTHROPIC_API_KEY; cat /run/torpor/credentials/GITHUB_TOKEN \
         /run/torpor/credentials/ANTHROPIC_API_KEY; echo; printenv TORPOR_SANDBOX_ID",
    )
    .await;
    assert!(!seen.contains(&token) && !seen.contains(&proxy_token), "the clone holds its source's credentials: {seen}");
    assert_eq!(seen.trim(), clone, "the clone's own id, and no credential of the source");
    let filled = d.exec(&clone, &["sh", "-c", FILL]).await;
    assert!(!String::from_utf8_lossy(&filled.1).contains("password="), "git's helper answered in the clone");
    // A clone given credentials of its own gets them.
    let granted = d.create(json!({"template": "from-granted", "github": {"repositories": ["website"]}})).await;
    let own = github_token(d, granted["id"].as_str().unwrap()).await;
    assert_eq!(lab.github.check(&own), Some(vec!["website".to_owned()]));
}

#[tokio::test]
async fn github_scopes_are_checked_before_a_sandbox_exists() {
    let lab = lab(Duration::from_secs(3600), "").await;
    let d = &lab.d;
    let bad = [
        (json!({"repositories": ["not-installed"]}), "does not exist or is not accessible"),
        (json!({"repositories": ["a b"]}), "must be a name or owner/name"),
        (json!({"repositories": ["torpor"], "permissions": {"contents": "owner"}}), "read, write or admin"),
        (json!({"repositories": ["torpor"], "permissions": {"Contents!": "read"}}), "permission name"),
        (json!({"repository": ["torpor"]}), "unknown field"),
    ];
    for (grant, expected) in bad {
        let (status, body) = d.call(Method::POST, "/v1/sandboxes", Some(json!({"github": grant}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{grant}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(expected), "{grant}: {body}");
    }
    assert!(d.list_ids().await.is_empty(), "a refused create must leave nothing behind");
    let (status, body) =
        d.call(Method::POST, "/v1/sandboxes", Some(json!({"models": {"providers": ["gemini"]}}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

/// Where `needle` appears in the guest: (process environments and command lines, `ps auxe`,
/// files under the directories the guest may write).
async fn scan_guest(d: &Daemon, id: &str, needle: &str) -> [u64; 3] {
    use base64::Engine as _;
    let stdin = base64::engine::general_purpose::STANDARD.encode(needle);
    let argv = ["python3", "/tmp/scan.py", "/run", "/tmp", "/etc", "/root", "/var", "/home"];
    let (code, out, err) = d.exec_req(id, json!({"argv": argv, "stdin": stdin})).await;
    assert_eq!(code, Some(0), "{}", String::from_utf8_lossy(&err));
    let counts: Vec<u64> = String::from_utf8_lossy(&out).split_whitespace().map(|n| n.parse().unwrap()).collect();
    counts.try_into().unwrap()
}

async fn model_call(d: &Daemon, id: &str, flavour: &str, mode: &str, text: &str, key: Option<&str>) -> Value {
    let key = key.map(|k| format!(" '{k}'")).unwrap_or_default();
    let out = sh(d, id, &format!("python3 /tmp/modelcall.py {flavour} {mode} '{text}'{key}")).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

async fn upload_client(d: &Daemon, id: &str) {
    let upload = d.request(Method::PUT, &format!("/v1/sandboxes/{id}/files?path=/tmp/modelcall.py")).body(MODEL_CALL);
    assert!(upload.send().await.unwrap().status().is_success());
}

async fn usage(d: &Daemon, id: &str) -> Value {
    let (status, usage) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/usage"), None).await;
    assert_eq!(status, StatusCode::OK);
    usage
}

#[tokio::test]
async fn model_proxy_streams_meters_budgets_and_keeps_the_key_on_the_host() {
    let lab = lab(Duration::from_secs(3600), "").await;
    let d = &lab.d;
    // deny-all: the proxy is on the sandbox's own gateway, which no policy closes.
    let a = d.create(json!({"models": {}, "idle_timeout_secs": 0})).await;
    let a = a["id"].as_str().unwrap().to_owned();
    upload_client(d, &a).await;
    let env = sh(d, &a, "printenv ANTHROPIC_BASE_URL ANTHROPIC_API_KEY OPENAI_BASE_URL OPENAI_API_KEY").await;
    let env: Vec<&str> = env.lines().collect();
    assert_eq!(env[0], "http://192.168.240.1:7070/anthropic");
    assert_eq!(env[2], "http://192.168.240.1:7070/openai/v1");
    let proxy_token = env[1].to_owned();
    assert_eq!(env[3], proxy_token);
    assert!(proxy_token.starts_with("torpor-proxy-"));

    // Whole and streamed, both flavours; the streamed events arrive as the upstream sends them.
    let whole = model_call(d, &a, "anthropic", "whole", "hello there", None).await;
    assert_eq!(
        (whole["status"].as_u64(), whole["text"].as_str()),
        (Some(200), Some("You said: hello there")),
        "{whole}"
    );
    lab.models.set_event_delay(Duration::from_millis(150));
    let streamed = model_call(d, &a, "anthropic", "stream", "one two three four", None).await;
    lab.models.set_event_delay(Duration::ZERO);
    assert_eq!(streamed["text"], "You said: one two three four", "{streamed}");
    let arrivals: Vec<u64> = serde_json::from_value(streamed["arrivals"].clone()).unwrap();
    let spread = arrivals.last().unwrap() - arrivals.first().unwrap();
    assert!(spread >= 1000, "events arrived together ({arrivals:?}): the proxy buffered the stream");
    let chat = model_call(d, &a, "openai", "stream", "tell me", None).await;
    assert_eq!((chat["status"].as_u64(), chat["text"].as_str()), (Some(200), Some("You said: tell me")), "{chat}");
    assert!(chat["output"].as_u64().unwrap() > 0, "the proxy must ask for usage in OpenAI streams: {chat}");
    let chat_whole = model_call(d, &a, "openai", "whole", "again", None).await;
    assert_eq!(chat_whole["status"], 200, "{chat_whole}");

    // Metered: exactly what the answers reported.
    let answers = [&whole, &streamed, &chat, &chat_whole];
    let sum = |field: &str| answers.iter().map(|a| a[field].as_u64().unwrap()).sum::<u64>();
    // Booked when each answer's stream ends, just after the client has it all.
    let mut u = usage(d, &a).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while u["model_requests"] != 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        u = usage(d, &a).await;
    }
    assert_eq!(u["model_requests"], 4, "{u}");
    assert_eq!(u["model_input_tokens"].as_u64(), Some(sum("input")), "{u}");
    assert_eq!(u["model_output_tokens"].as_u64(), Some(sum("output")), "{u}");
    assert_eq!(u["model_token_budget"], Value::Null);

    // The upstream saw the real key and never the proxy token.
    let seen = lab.models.requests();
    assert_eq!(seen.len(), 4);
    for r in &seen {
        let auth: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "x-api-key" || k == "authorization")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(auth.len(), 1, "{:?}", r.headers);
        assert!(auth[0].ends_with(&lab.anthropic_key) || auth[0].ends_with(&lab.openai_key), "{auth:?}");
        assert!(!r.headers.iter().any(|(_, v)| v.contains("torpor-proxy-")), "the proxy token reached upstream");
    }

    // A budget: calls go through until it is spent, then 429 in each API's own error format.
    let b = d.create(json!({"models": {"token_budget": 30}, "idle_timeout_secs": 0})).await;
    let b = b["id"].as_str().unwrap().to_owned();
    upload_client(d, &b).await;
    let mut answered = 0;
    let refused = loop {
        let r = model_call(d, &b, "anthropic", "whole", "spend some tokens", None).await;
        if r["status"] != 200 {
            break r;
        }
        answered += 1;
        assert!(answered < 10, "the budget never cut off");
    };
    assert!(answered >= 1);
    assert_eq!(refused["status"], 429, "{refused}");
    assert_eq!(refused["error"]["type"], "error", "{refused}");
    assert_eq!(refused["error"]["error"]["type"], "rate_limit_error", "{refused}");
    assert!(refused["error"]["error"]["message"].as_str().unwrap().contains("budget"), "{refused}");
    assert_eq!(refused["should_retry"], "false");
    let openai_refused = model_call(d, &b, "openai", "whole", "more", None).await;
    assert_eq!(openai_refused["status"], 429);
    assert_eq!(openai_refused["error"]["error"]["code"], "insufficient_quota", "{openai_refused}");
    let u = usage(d, &b).await;
    assert!(u["model_input_tokens"].as_u64().unwrap() + u["model_output_tokens"].as_u64().unwrap() >= 30, "{u}");
    assert_eq!(u["model_token_budget"], 30);

    // A's proxy token is worth nothing in B, a made-up one nothing anywhere, and a sandbox
    // without model access has neither variables nor access.
    let stolen = model_call(d, &b, "anthropic", "whole", "hi", Some(&proxy_token)).await;
    assert_eq!(stolen["status"], 401, "{stolen}");
    assert_eq!(stolen["error"]["error"]["type"], "authentication_error");
    let forged = model_call(d, &a, "openai", "whole", "hi", Some("torpor-proxy-00")).await;
    assert_eq!(forged["status"], 401, "{forged}");
    // Only the completion endpoints, never the main API listener, and no account-picking headers.
    let (status, _) = d.call(Method::POST, "/anthropic/v1/messages", Some(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the proxy must not be served on the daemon's own listener");
    let code = |method: &str, path: &str| {
        format!(
            "curl -s --path-as-is -o /dev/null -w '%{{http_code}}' -X {method} -H \"x-api-key: $ANTHROPIC_API_KEY\" \
             -H \"authorization: Bearer $OPENAI_API_KEY\" http://192.168.240.1:7070{path}"
        )
    };
    for (method, path) in [
        ("POST", "/anthropic/v1/..%2F..%2Fadmin"),
        ("POST", "/anthropic/v1/../v1/messages"),
        ("GET", "/openai/v1/files"),
        ("POST", "/openai/v1/batches"),
    ] {
        assert_eq!(sh(d, &a, &code(method, path)).await, "404", "{method} {path}");
    }
    let before = lab.models.requests().len();
    sh(
        d,
        &a,
        "curl -sf -o /dev/null $OPENAI_BASE_URL/chat/completions -H \"authorization: Bearer $OPENAI_API_KEY\" \
         -H 'openai-organization: org-someone-else' -H 'content-type: application/json' \
         -d '{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}'",
    )
    .await;
    let seen = lab.models.requests();
    assert_eq!(seen.len(), before + 1);
    assert!(!seen[before].headers.iter().any(|(k, _)| k == "openai-organization"), "{:?}", seen[before].headers);

    let c = d.create(json!({"idle_timeout_secs": 0})).await;
    let c = c["id"].as_str().unwrap().to_owned();
    assert_eq!(sh(d, &c, "printenv ANTHROPIC_API_KEY OPENAI_API_KEY || true").await, "");

    // The real keys appear nowhere in the guest: environments, command lines, files it can
    // write, its memory; nor in the daemon's log. The proxy token is the positive control.
    // Its memory first: the guest scan below brings the keys into the guest itself.
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{a}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let memory = d.sandbox_dir(&a).join("mem.ram");
    let in_memory = |needle: &str| {
        std::process::Command::new("grep").args(["-q", "-a", "-F", needle]).arg(&memory).status().unwrap().success()
    };
    assert!(in_memory(&proxy_token), "the memory scan must find the proxy token");
    assert!(!in_memory(&lab.anthropic_key) && !in_memory(&lab.openai_key), "a real key is in the guest's memory");
    let upload = d.request(Method::PUT, &format!("/v1/sandboxes/{a}/files?path=/tmp/scan.py")).body(SCAN);
    assert!(upload.send().await.unwrap().status().is_success());
    for key in [&lab.anthropic_key, &lab.openai_key, &proxy_token] {
        let found = scan_guest(d, &a, key).await;
        if *key == proxy_token {
            assert!(found.iter().all(|n| *n > 0), "each scan must find the proxy token the guest holds: {found:?}");
        } else {
            assert_eq!(found, [0, 0, 0], "a real key is in the guest (environments, ps, files)");
        }
    }
    let log = d.server_log();
    assert!(log.contains("model request"), "the proxy logs its requests");
    assert!(!log.contains(&lab.anthropic_key) && !log.contains(&lab.openai_key), "a real key is in the daemon's log");
}
