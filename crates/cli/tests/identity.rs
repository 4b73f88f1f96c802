//! Device tokens, end to end: what a sandbox finds in its environment and files, what the API
//! accepts it for, and that a resume or the refresher always leaves it a valid one.

mod common;

use std::time::{Duration, Instant};

use common::{sh, Daemon, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Checks `token` against the daemon's published key; returns its claims.
async fn verify(d: &Daemon, token: &str) -> Result<Value, String> {
    let jwks: jsonwebtoken::jwk::JwkSet =
        reqwest::get(format!("{}/v1/.well-known/jwks.json", d.url)).await.unwrap().json().await.unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["torpor-device"]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &validation).map(|t| t.claims).map_err(|e| e.to_string())
}

async fn status_with(d: &Daemon, token: &str, path: &str) -> StatusCode {
    reqwest::Client::new().get(format!("{}{path}", d.url)).bearer_auth(token).send().await.unwrap().status()
}

#[tokio::test]
async fn device_tokens_are_scoped_fresh_after_resume_and_renewed_before_expiry() {
    let d =
        Daemon::start_with(Options { extra_config: "device_token_ttl_secs = 5\n".into(), ..Default::default() }).await;
    let a = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let b = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let (a, b) = (a["id"].as_str().unwrap().to_owned(), b["id"].as_str().unwrap().to_owned());

    // A new exec finds the token in its environment and in a file, and they agree.
    let out =
        sh(&d, &a, "printenv TORPOR_TOKEN; cat /run/torpor/credentials/TORPOR_TOKEN; echo; printenv TORPOR_URL").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let token = lines[0].to_owned();
    assert_eq!(lines[1], token, "the file and the environment must hold the same token");
    assert_eq!(lines[2], "http://192.168.240.1:7070");
    let claims = verify(&d, &token).await.expect("the token must verify against the published key");
    assert_eq!(claims["sub"], a.as_str());
    assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 5);

    // From inside the guest, through its namespace's API endpoint: its own sandbox only.
    let code = |target: &str| {
        format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $TORPOR_TOKEN\" $TORPOR_URL{target}"
        )
    };
    assert_eq!(sh(&d, &a, &code(&format!("/v1/sandboxes/{a}"))).await, "200");
    assert_eq!(sh(&d, &a, &code(&format!("/v1/sandboxes/{a}/usage"))).await, "200");
    assert_eq!(sh(&d, &a, &code(&format!("/v1/sandboxes/{b}"))).await, "403", "A's token opened B");
    // The operator API refuses it everywhere, even for its own sandbox.
    assert_eq!(status_with(&d, &token, &format!("/v1/sandboxes/{a}")).await, StatusCode::FORBIDDEN);
    assert_eq!(status_with(&d, &token, &format!("/v1/sandboxes/{b}")).await, StatusCode::FORBIDDEN);
    assert_eq!(status_with(&d, "not-a-token", &format!("/v1/sandboxes/{a}")).await, StatusCode::UNAUTHORIZED);

    // From inside, every route of the operator API (as its own document lists them), with every
    // method and the sandbox's own id: only its reads answer, and its policy stays deny-all.
    let doc: Value = reqwest::get(format!("{}/v1/openapi.json", d.url)).await.unwrap().json().await.unwrap();
    // The token from its file each time: with a 5 s lifetime it is renewed during the walk.
    let mut script =
        String::from("TOKEN=/run/torpor/credentials/TORPOR_TOKEN\nfor m in GET POST PUT DELETE PATCH; do\n");
    for path in doc["paths"].as_object().unwrap().keys() {
        let path = path.replace("{id}", &a).replace("{name}", "x").replace("{exec_id}", "e1");
        script.push_str(&format!(
            "  c=$(curl -s -o /dev/null -w '%{{http_code}}' -X $m -H \"Authorization: Bearer $(cat $TOKEN)\" \
             -H 'content-type: application/json' -d '{{\"mode\":\"open\",\"allow_cidrs\":[\"0.0.0.0/0\"]}}' \
             \"$TORPOR_URL{path}\"); echo \"$m {path} $c\"\n"
        ));
    }
    script.push_str("done");
    let answered: Vec<String> = sh(&d, &a, &script)
        .await
        .lines()
        .filter(|l| !l.ends_with(" 404") && !l.ends_with(" 405"))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
        .collect();
    let own = [
        format!("GET /v1/sandboxes/{a}"),
        format!("GET /v1/sandboxes/{a}/usage"),
        format!("GET /v1/sandboxes/{a}/network"),
        "GET /v1/health".into(),
        "GET /v1/.well-known/jwks.json".into(),
    ];
    let mut answered_sorted = answered.clone();
    answered_sorted.sort();
    let mut own_sorted = own.to_vec();
    own_sorted.sort();
    assert_eq!(answered_sorted, own_sorted, "routes a sandbox reached with its device token");
    let network = d.call(Method::GET, &format!("/v1/sandboxes/{a}/network"), None).await.1;
    assert_eq!(network["mode"], "deny-all", "the guest changed its own policy: {network}");

    // Pause, wait past the token's expiry: it is refused. Resume: a fresh one is there.
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{a}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let expiry = std::time::UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64().unwrap() + 1);
    if let Ok(left) = expiry.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    assert_eq!(
        status_with(&d, &token, &format!("/v1/sandboxes/{a}")).await,
        StatusCode::UNAUTHORIZED,
        "an expired token"
    );
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{a}/resume"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fresh = sh(&d, &a, "printenv TORPOR_TOKEN").await;
    assert_ne!(fresh, token);
    assert_eq!(verify(&d, &fresh).await.expect("the resumed sandbox's token must be valid")["sub"], a.as_str());
    assert_eq!(sh(&d, &a, &code(&format!("/v1/sandboxes/{a}"))).await, "200");

    // While it runs, the file is renewed before the token in it expires: a long-running process
    // that rereads it never holds an expired one.
    let first = sh(&d, &a, "cat /run/torpor/credentials/TORPOR_TOKEN").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        let now = sh(&d, &a, "cat /run/torpor/credentials/TORPOR_TOKEN").await;
        if now != first {
            break now;
        }
        assert!(Instant::now() < deadline, "the token file was not renewed within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let renewed = verify(&d, &renewed).await.expect("a renewed token must be valid");
    let first = verify(&d, &first).await.unwrap_or_else(|_| claims_unchecked(&first));
    assert!(
        renewed["iat"].as_u64() < first["exp"].as_u64(),
        "renewed before the old token expired, not after: {renewed} vs {first}"
    );
}

/// The claims of a token without checking it (its expiry may have passed by now).
fn claims_unchecked(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn secret_file(dir: &std::path::Path, value: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("demo-secret");
    std::fs::write(&path, value).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[tokio::test]
async fn static_secrets_reach_the_sandboxes_that_name_them_and_follow_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_file(dir.path(), "s3cret-value\n", 0o600);
    let config = format!("[secrets.DEMO_SECRET]\nfile = \"{}\"\n", path.display());
    let d = Daemon::start_with(Options { extra_config: config, ..Default::default() }).await;

    let with = d.create(json!({ "idle_timeout_secs": 0, "secrets": ["DEMO_SECRET"] })).await;
    let without = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let (with, without) = (with["id"].as_str().unwrap().to_owned(), without["id"].as_str().unwrap().to_owned());
    let shown = d.get(&with).await;
    assert_eq!(shown["secrets"], json!(["DEMO_SECRET"]));
    assert!(!shown.to_string().contains("s3cret"), "the API must never show a secret's value");

    let out = sh(&d, &with, "printenv DEMO_SECRET; cat /run/torpor/credentials/DEMO_SECRET").await;
    assert_eq!(out, "s3cret-value\ns3cret-value");
    let (code, out, _) = d.exec(&without, &["printenv", "DEMO_SECRET"]).await;
    assert!(code != Some(0) && out.is_empty(), "a sandbox that did not name the secret got it");

    let (status, body) = d.call(Method::POST, "/v1/sandboxes", Some(json!({ "secrets": ["NOT_CONFIGURED"] }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("unknown secret") && body.to_string().contains("DEMO_SECRET"), "{body}");

    // Rotated on the host: the sandbox has the new value after its next resume.
    secret_file(dir.path(), "rotated-value", 0o600);
    let (status, _) = d.call(Method::POST, &format!("/v1/sandboxes/{with}/pause"), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = d.call(Method::POST, &format!("/v1/sandboxes/{with}/resume"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sh(&d, &with, "printenv DEMO_SECRET").await, "rotated-value");
    let log = d.server_log();
    assert!(!log.contains("s3cret-value") && !log.contains("rotated-value"), "a secret value reached the log");
}

#[test]
fn a_secret_file_others_can_read_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_file(dir.path(), "value", 0o644);
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:17998\"\n[secrets.DEMO]\nfile = \"{}\"\n",
            dir.path().display(),
            path.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::TORPOR).args(["server", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success(), "the daemon started with a world-readable secret");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600") && err.contains("DEMO"), "{err}");
}
