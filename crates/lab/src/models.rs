//! A fake model upstream speaking the Anthropic Messages API (`POST /v1/messages`) and the
//! OpenAI chat completions API (`POST /v1/chat/completions`), whole or streamed as server-sent
//! events, with usage fields where the real ones put them. It checks the real key the way the
//! real APIs do and records every request for the test to inspect. Its answer repeats the last
//! user message, one event per word, optionally with a pause between events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

struct ModelsState {
    anthropic_key: String,
    openai_key: String,
    event_delay: Duration,
    requests: Vec<ModelRequest>,
}

#[derive(Clone)]
pub struct FakeModels {
    state: Arc<Mutex<ModelsState>>,
}

impl FakeModels {
    /// Serves on `listener` until the runtime it was started on ends; accepts only these keys.
    pub fn start(listener: std::net::TcpListener, anthropic_key: &str, openai_key: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(ModelsState {
            anthropic_key: anthropic_key.into(),
            openai_key: openai_key.into(),
            event_delay: Duration::ZERO,
            requests: Vec::new(),
        }));
        let router = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/chat/completions", post(chat_completions))
            .with_state(state.clone());
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Self { state })
    }

    /// Pause between streamed events from now on.
    pub fn set_event_delay(&self, delay: Duration) {
        self.state.lock().unwrap().event_delay = delay;
    }

    pub fn requests(&self) -> Vec<ModelRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn record(
    state: &Arc<Mutex<ModelsState>>,
    path: &str,
    headers: &HeaderMap,
    body: &Value,
) -> (String, String, Duration) {
    let mut s = state.lock().unwrap();
    let headers = headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()));
    s.requests.push(ModelRequest { path: path.into(), headers: headers.collect(), body: body.clone() });
    (s.anthropic_key.clone(), s.openai_key.clone(), s.event_delay)
}

/// The text of the last user message, whether content is a string or a list of blocks.
fn last_user_text(body: &Value) -> String {
    let Some(last) = body["messages"].as_array().and_then(|m| m.iter().rev().find(|m| m["role"] == "user")) else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join(" "),
        _ => String::new(),
    }
}

/// Input tokens: a stand-in count, one per word of every message, plus a fixed overhead.
fn input_tokens(body: &Value) -> u64 {
    let words: usize = body["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| m["content"].to_string().split_whitespace().count()).sum())
        .unwrap_or(0);
    words as u64 + 10
}

fn reply_words(body: &Value) -> Vec<String> {
    format!("You said: {}", last_user_text(body)).split_whitespace().map(|w| format!("{w} ")).collect()
}

fn sse(events: Vec<String>, delay: Duration) -> Response {
    let stream = futures::stream::unfold((events.into_iter(), true), move |(mut events, first)| async move {
        let event = events.next()?;
        if !first && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, std::convert::Infallible>(bytes::Bytes::from(event)), (events, false)))
    });
    Response::builder()
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn messages(
    State(state): State<Arc<Mutex<ModelsState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let (key, _, delay) = record(&state, "/v1/messages", &headers, &body);
    let error = |status: StatusCode, kind: &str, message: &str| {
        (status, Json(json!({"type": "error", "error": {"type": kind, "message": message}}))).into_response()
    };
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(key.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key");
    }
    if headers.get("anthropic-version").is_none() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "anthropic-version: header is required");
    }
    let model = body["model"].as_str().unwrap_or("claude-test").to_owned();
    let words = reply_words(&body);
    let (input, output) = (input_tokens(&body), words.len() as u64);
    if body["stream"] != Value::Bool(true) {
        return Json(json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": words.concat().trim_end()}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output},
        }))
        .into_response();
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for w in &words {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse(events, delay)
}

async fn chat_completions(
    State(state): State<Arc<Mutex<ModelsState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let (_, key, delay) = record(&state, "/v1/chat/completions", &headers, &body);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(format!("Bearer {key}").as_str()) {
        let error = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
            "param": null, "code": "invalid_api_key"}});
        return (StatusCode::UNAUTHORIZED, Json(error)).into_response();
    }
    let model = body["model"].as_str().unwrap_or("gpt-test").to_owned();
    let words = reply_words(&body);
    let (input, output) = (input_tokens(&body), words.len() as u64);
    let usage = json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output});
    if body["stream"] != Value::Bool(true) {
        return Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": words.concat().trim_end()},
                "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        let data = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {data}\n\n")
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for w in &words {
        events.push(chunk(json!({"content": w}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if body["stream_options"]["include_usage"] == Value::Bool(true) {
        let data = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [], "usage": usage});
        events.push(format!("data: {data}\n\n"));
    }
    events.push("data: [DONE]\n\n".into());
    sse(events, delay)
}
