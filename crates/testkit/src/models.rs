//! A fake model upstream speaking the Anthropic Messages API (`POST /v1/messages`) and the
//! OpenAI chat completions API (`POST /v1/chat/completions`), whole or streamed as server-sent
//! events, with usage fields where the real ones put them. It checks the real key the way the
//! real APIs do and records every request for the test to inspect. Its answer repeats the last
//! user message, one event per word, optionally with a pause between events.
//!
//! With a [`ToolScript`] set, Anthropic requests that offer tools (what a coding agent such as
//! Claude Code sends), and OpenAI Responses requests (what Codex sends), are answered like a
//! model driving that agent: a task containing the
//! script's trigger gets the script's tool calls one turn at a time, each after the previous one's
//! `tool_result` came back, then the script's closing text.

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

/// Tool calls the fake makes, in order, for a task that contains `trigger`.
#[derive(Debug, Clone)]
pub struct ToolScript {
    pub trigger: String,
    /// Anthropic: (tool name, its input), one per model turn.
    pub steps: Vec<(String, Value)>,
    /// OpenAI Responses (Codex): shell commands, one per model turn, called through whichever
    /// shell tool the request offers.
    pub shell: Vec<String>,
    /// The answer once every step's result is in.
    pub done: String,
}

struct ModelsState {
    anthropic_key: String,
    openai_key: String,
    event_delay: Duration,
    requests: Vec<ModelRequest>,
    script: Option<ToolScript>,
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
            script: None,
        }));
        let router = Router::new()
            .route("/v1/messages", post(messages))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/responses", post(responses))
            .route("/v1/models", axum::routing::get(list_models))
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

    /// Answer tool-offering Anthropic requests with `script` from now on.
    pub fn set_tool_script(&self, script: ToolScript) {
        self.state.lock().unwrap().script = Some(script);
    }

    pub fn requests(&self) -> Vec<ModelRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

struct Seen {
    anthropic_key: String,
    openai_key: String,
    delay: Duration,
    script: Option<ToolScript>,
}

fn record(state: &Arc<Mutex<ModelsState>>, path: &str, headers: &HeaderMap, body: &Value) -> Seen {
    let mut s = state.lock().unwrap();
    let headers = headers.iter().map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()));
    s.requests.push(ModelRequest { path: path.into(), headers: headers.collect(), body: body.clone() });
    Seen {
        anthropic_key: s.anthropic_key.clone(),
        openai_key: s.openai_key.clone(),
        delay: s.event_delay,
        script: s.script.clone(),
    }
}

impl Seen {
    /// Whether the request carries the real Anthropic key, as the real API wants it.
    fn anthropic_ok(&self, headers: &HeaderMap) -> bool {
        headers.get("x-api-key").and_then(|v| v.to_str().ok()) == Some(self.anthropic_key.as_str())
    }

    /// Whether the request carries the real OpenAI key, as the real API wants it.
    fn openai_ok(&self, headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {}", self.openai_key).as_str())
    }
}

/// What each API answers a wrong key with.
fn anthropic_unauthorized() -> Response {
    let error = json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}});
    (StatusCode::UNAUTHORIZED, Json(error)).into_response()
}

fn openai_unauthorized() -> Response {
    let error = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
        "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, Json(error)).into_response()
}

/// The text blocks of a message (agents' `<system-reminder>` blocks left out).
fn message_text(message: &Value) -> Option<String> {
    match &message["content"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .filter(|t| !t.trim_start().starts_with("<system-reminder>"))
                .collect();
            (!texts.is_empty()).then(|| texts.join(" "))
        }
        _ => None,
    }
}

/// What a scripted model says next: a tool call, or text.
enum Turn {
    Tool { name: String, input: Value },
    Text(String),
}

/// The next turn of `script` for this request, or None when the request is not the script's
/// business (no tools offered).
fn scripted_turn(script: &ToolScript, body: &Value) -> Option<Turn> {
    let tools: Vec<&str> = body["tools"].as_array()?.iter().filter_map(|t| t["name"].as_str()).collect();
    let messages = body["messages"].as_array()?;
    let user_texts: Vec<(usize, String)> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m["role"] == "user")
        .filter_map(|(i, m)| message_text(m).map(|t| (i, t)))
        .collect();
    let (task_at, task) = user_texts.last()?.clone();
    if !task.contains(&script.trigger) {
        // Anything else: repeat it, and say how the conversation began (which shows whether an
        // agent resumed its session with its history).
        let first = &user_texts[0].1;
        return Some(Turn::Text(format!("You said: {task}. This conversation began with: {first}")));
    }
    let results = messages[task_at + 1..]
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
        .count();
    let Some((name, input)) = script.steps.get(results) else {
        return Some(Turn::Text(script.done.clone()));
    };
    if !tools.contains(&name.as_str()) {
        return Some(Turn::Text(format!("fake model: the script calls tool {name}, which is not offered: {tools:?}")));
    }
    Some(Turn::Tool { name: name.clone(), input: input.clone() })
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

async fn count_tokens(
    State(state): State<Arc<Mutex<ModelsState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let seen = record(&state, "/v1/messages/count_tokens", &headers, &body);
    if !seen.anthropic_ok(&headers) {
        return anthropic_unauthorized();
    }
    Json(json!({"input_tokens": input_tokens(&body)})).into_response()
}

async fn messages(
    State(state): State<Arc<Mutex<ModelsState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let seen = record(&state, "/v1/messages", &headers, &body);
    if !seen.anthropic_ok(&headers) {
        return anthropic_unauthorized();
    }
    if headers.get("anthropic-version").is_none() {
        let message = "anthropic-version: header is required";
        let error = json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    let model = body["model"].as_str().unwrap_or("claude-test").to_owned();
    let turn = seen.script.as_ref().and_then(|script| scripted_turn(script, &body));
    let turn = turn.unwrap_or_else(|| Turn::Text(reply_words(&body).concat().trim_end().to_owned()));
    let input = input_tokens(&body);
    let (content, stop_reason, output) = match &turn {
        Turn::Text(text) => {
            (json!([{"type": "text", "text": text}]), "end_turn", text.split_whitespace().count().max(1) as u64)
        }
        Turn::Tool { name, input } => (
            json!([{"type": "tool_use", "id": tool_use_id(&body), "name": name, "input": input}]),
            "tool_use",
            input.to_string().len() as u64 / 4 + 1,
        ),
    };
    if body["stream"] != Value::Bool(true) {
        return Json(json!({
            "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop_reason, "stop_sequence": null,
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
        event("ping", json!({"type": "ping"})),
    ];
    match &turn {
        Turn::Text(text) => {
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            for w in text.split_inclusive(' ') {
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
                ));
            }
        }
        Turn::Tool { name, input } => {
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use",
                    "id": tool_use_id(&body), "name": name, "input": {}}}),
            ));
            // The real API streams the input as JSON text in pieces.
            let json_text = input.to_string();
            let mid = json_text.char_indices().nth(json_text.chars().count() / 2).map_or(0, |(i, _)| i);
            for piece in [&json_text[..mid], &json_text[mid..]] {
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
        }
    }
    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse(events, seen.delay)
}

/// A tool call id unique within the conversation: numbered by the turns before it.
fn tool_use_id(body: &Value) -> String {
    format!("toolu_fake_{:04}", body["messages"].as_array().map_or(0, |m| m.len()))
}

async fn chat_completions(
    State(state): State<Arc<Mutex<ModelsState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let seen = record(&state, "/v1/chat/completions", &headers, &body);
    if !seen.openai_ok(&headers) {
        return openai_unauthorized();
    }
    let delay = seen.delay;
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

async fn list_models(State(state): State<Arc<Mutex<ModelsState>>>, headers: HeaderMap) -> Response {
    let seen = record(&state, "/v1/models", &headers, &Value::Null);
    if !seen.anthropic_ok(&headers) && !seen.openai_ok(&headers) {
        return openai_unauthorized();
    }
    Json(json!({"object": "list", "data": [{"id": "gpt-test", "object": "model", "created": 0, "owned_by": "lab"}]}))
        .into_response()
}

/// The text of a Responses input item, if it is a user message (instructions files that agents
/// send as user messages, such as AGENTS.md, are left out).
fn responses_user_text(item: &Value) -> Option<String> {
    if item["type"] != "message" || item["role"] != "user" {
        return None;
    }
    let text = match &item["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(" "),
        _ => return None,
    };
    let t = text.trim_start();
    let context = ["<environment_context>", "<user_instructions>", "# AGENTS.md", "<permissions"];
    (!context.iter().any(|c| t.starts_with(c))).then_some(text)
}

/// Every tool a Responses request offers, as (type, name, description): top-level `tools`, and
/// tools Codex sends inside its input (`additional_tools` items), namespaces flattened.
fn offered_tools(body: &Value) -> Vec<(String, String, String)> {
    fn walk(tools: &Value, out: &mut Vec<(String, String, String)>) {
        for t in tools.as_array().into_iter().flatten() {
            if let (Some(kind), Some(name)) = (t["type"].as_str(), t["name"].as_str()) {
                out.push((kind.to_owned(), name.to_owned(), t["description"].as_str().unwrap_or("").to_owned()));
            }
            walk(&t["tools"], out);
        }
    }
    let mut out = Vec::new();
    walk(&body["tools"], &mut out);
    for item in body["input"].as_array().into_iter().flatten() {
        walk(&item["tools"], &mut out);
    }
    out
}

/// A call the scripted model makes in a Responses turn.
enum ResponsesCall {
    Function {
        name: String,
        arguments: Value,
    },
    /// A freeform tool: Codex's `exec`, which runs JavaScript that calls its nested tools.
    Custom {
        name: String,
        input: String,
    },
}

/// The next turn for a Responses request: a shell call through the shell tool it offers, or text.
fn responses_turn(script: Option<&ToolScript>, body: &Value) -> (Option<ResponsesCall>, String) {
    let input = body["input"].as_array().cloned().unwrap_or_default();
    let users: Vec<(usize, String)> =
        input.iter().enumerate().filter_map(|(i, item)| responses_user_text(item).map(|t| (i, t))).collect();
    let Some((task_at, task)) = users.last().cloned() else {
        return (None, "You said nothing.".into());
    };
    let Some(script) = script.filter(|s| task.contains(&s.trigger)) else {
        return (None, format!("You said: {task}. This conversation began with: {}", users[0].1));
    };
    let outputs = input[task_at + 1..]
        .iter()
        .filter(|i| i["type"] == "function_call_output" || i["type"] == "custom_tool_call_output")
        .count();
    let Some(command) = script.shell.get(outputs) else {
        return (None, script.done.clone());
    };
    let offered = offered_tools(body);
    let has = |kind: &str, name: &str| offered.iter().any(|(k, n, _)| k == kind && n == name);
    let function = |name: &str, arguments: Value| ResponsesCall::Function { name: name.into(), arguments };
    // Codex's code mode: its shell is a nested tool of the JavaScript `exec` tool.
    let code_mode = offered.iter().any(|(k, n, d)| k == "custom" && n == "exec" && d.contains("exec_command("));
    // Codex has offered its shell in each of these shapes over time.
    let call = if code_mode {
        let cmd = serde_json::to_string(command).expect("a string serialises");
        let input = format!("const r = await tools.exec_command({{cmd: {cmd}}});\ntext(r.output ?? \"\");\n");
        ResponsesCall::Custom { name: "exec".into(), input }
    } else if has("function", "exec_command") {
        function("exec_command", json!({"cmd": command}))
    } else if has("function", "shell_command") {
        function("shell_command", json!({"command": command}))
    } else if has("function", "shell") {
        function("shell", json!({"command": ["bash", "-lc", command]}))
    } else {
        let names: Vec<&str> = offered.iter().map(|(_, n, _)| n.as_str()).collect();
        return (None, format!("fake model: no shell tool is offered: {names:?}"));
    };
    (Some(call), String::new())
}

/// `POST /v1/responses`, streamed (Codex always streams).
async fn responses(
    State(state): State<Arc<Mutex<ModelsState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let seen = record(&state, "/v1/responses", &headers, &body);
    if !seen.openai_ok(&headers) {
        return openai_unauthorized();
    }
    let model = body["model"].as_str().unwrap_or("gpt-test").to_owned();
    let n = body["input"].as_array().map_or(0, |i| i.len());
    let id = format!("resp_fake_{n:04}");
    let (call, text) = responses_turn(seen.script.as_ref(), &body);
    let input_tokens = body["input"].to_string().split_whitespace().count() as u64 + 10;
    let item = match &call {
        Some(ResponsesCall::Function { name, arguments }) => {
            json!({"type": "function_call", "id": format!("fc_{n:04}"),
            "call_id": format!("call_{n:04}"), "name": name, "arguments": arguments.to_string(), "status": "completed"})
        }
        Some(ResponsesCall::Custom { name, input }) => json!({"type": "custom_tool_call", "id": format!("ctc_{n:04}"),
            "call_id": format!("call_{n:04}"), "name": name, "input": input, "status": "completed"}),
        None => json!({"type": "message", "id": format!("msg_{n:04}"), "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}),
    };
    let output_tokens = item.to_string().len() as u64 / 4 + 1;
    let event = |data: Value| format!("event: {}\ndata: {data}\n\n", data["type"].as_str().unwrap_or(""));
    let mut events = vec![
        event(json!({"type": "response.created", "response": {"id": id, "object": "response", "model": model,
            "status": "in_progress", "output": []}})),
        event(json!({"type": "response.output_item.added", "output_index": 0, "item": item})),
    ];
    if call.is_none() {
        for piece in text.split_inclusive(' ') {
            events.push(event(json!({"type": "response.output_text.delta", "item_id": format!("msg_{n:04}"),
                "output_index": 0, "content_index": 0, "delta": piece})));
        }
    }
    events.push(event(json!({"type": "response.output_item.done", "output_index": 0, "item": item})));
    events.push(event(json!({"type": "response.completed", "response": {"id": id, "object": "response",
        "model": model, "status": "completed", "output": [item],
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}}})));
    sse(events, seen.delay)
}
