//! Device tokens, end to end: what a sandbox finds in its environment and files, what the API
//! accepts it for, and that a resume or the refresher always leaves it a valid one.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

async fn sh(d: &Daemon, id: &str, script: &str) -> String {
    let (code, out, err) = d.exec(id, &["sh", "-c", script]).await;
    assert_eq!(code, Some(0), "{script}: {}", String::from_utf8_lossy(&err));
    String::from_utf8_lossy(&out).trim().to_owned()
}

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
    assert_eq!(sh(&d, &a, &code(&format!("/v1/sandboxes/{b}"))).await, "403", "A's token opened B");
    assert_eq!(sh(&d, &a, &code("/v1/sandboxes")).await, "403", "a device token listed every sandbox");
    assert_eq!(sh(&d, &a, &code("/v1/templates")).await, "403");
    // The same holds on the host's API address.
    assert_eq!(status_with(&d, &token, &format!("/v1/sandboxes/{b}")).await, StatusCode::FORBIDDEN);
    assert_eq!(status_with(&d, &token, &format!("/v1/sandboxes/{a}/usage")).await, StatusCode::OK);
    assert_eq!(status_with(&d, "not-a-token", &format!("/v1/sandboxes/{a}")).await, StatusCode::UNAUTHORIZED);

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
