//! Fakes of the chat platforms' outgoing APIs, checking what the real ones check: the Telegram
//! Bot API (`sendMessage`, `editMessageText`: the bot token in the path, a chat, a non-empty
//! text of at most 4096 characters, "message is not modified" on an identical edit) and the
//! Slack Web API (`chat.postMessage`: the bot token as a bearer, a channel, a text). Both
//! record what they were sent, and can be told to answer the next calls with 429.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// One message as the chat shows it now.
#[derive(Debug, Clone)]
pub struct TelegramMessage {
    pub chat_id: i64,
    pub message_id: i64,
    pub reply_to: Option<i64>,
    pub text: String,
    pub sent_at: Instant,
    /// Times it was edited.
    pub edits: u32,
}

struct TelegramState {
    token: String,
    messages: Vec<TelegramMessage>,
    refuse_next: u32,
    refused: u32,
}

#[derive(Clone)]
pub struct FakeTelegram {
    state: Arc<Mutex<TelegramState>>,
    /// Woken at every message sent.
    sent: Arc<tokio::sync::Notify>,
    pub url: String,
}

fn telegram_error(status: StatusCode, description: &str, retry_after: Option<u64>) -> Response {
    let mut body = json!({"ok": false, "error_code": status.as_u16(), "description": description});
    if let Some(after) = retry_after {
        body["parameters"] = json!({"retry_after": after});
    }
    (status, Json(body)).into_response()
}

impl FakeTelegram {
    /// Serves on a fresh port of 127.0.0.1, accepting `token` only. Needs a Tokio runtime.
    pub async fn start(token: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(TelegramState {
            token: token.into(),
            messages: Vec::new(),
            refuse_next: 0,
            refused: 0,
        }));
        let sent = Arc::new(tokio::sync::Notify::new());
        let router =
            Router::new().route("/{bot}/{method}", post(telegram_call)).with_state((state.clone(), sent.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Self { state, sent, url })
    }

    /// Waits until `n` messages have been sent in all; false if `timeout` passes first.
    pub async fn wait_for_messages(&self, n: usize, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.sent.notified();
            if self.state.lock().unwrap().messages.len() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    pub fn messages(&self) -> Vec<TelegramMessage> {
        self.state.lock().unwrap().messages.clone()
    }

    /// Answers the next `n` calls with 429 and `retry_after: 1`.
    pub fn refuse_next(&self, n: u32) {
        self.state.lock().unwrap().refuse_next = n;
    }

    pub fn refused(&self) -> u32 {
        self.state.lock().unwrap().refused
    }
}

async fn telegram_call(
    State((state, sent)): State<(Arc<Mutex<TelegramState>>, Arc<tokio::sync::Notify>)>,
    Path((bot, method)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let mut s = state.lock().unwrap();
    if bot.strip_prefix("bot") != Some(s.token.as_str()) {
        return telegram_error(StatusCode::UNAUTHORIZED, "Unauthorized", None);
    }
    if s.refuse_next > 0 {
        s.refuse_next -= 1;
        s.refused += 1;
        return telegram_error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests: retry after 1", Some(1));
    }
    let Some(chat_id) = body["chat_id"].as_i64() else {
        return telegram_error(StatusCode::BAD_REQUEST, "Bad Request: chat_id is empty", None);
    };
    let text = body["text"].as_str().unwrap_or_default().to_owned();
    if text.trim().is_empty() {
        return telegram_error(StatusCode::BAD_REQUEST, "Bad Request: message text is empty", None);
    }
    if text.chars().count() > 4096 {
        return telegram_error(StatusCode::BAD_REQUEST, "Bad Request: message is too long", None);
    }
    match method.as_str() {
        "sendMessage" => {
            let message_id = s.messages.len() as i64 + 1;
            let reply_to = body["reply_parameters"]["message_id"].as_i64();
            s.messages.push(TelegramMessage {
                chat_id,
                message_id,
                reply_to,
                text: text.clone(),
                sent_at: Instant::now(),
                edits: 0,
            });
            sent.notify_waiters();
            Json(json!({"ok": true, "result": {"message_id": message_id, "chat": {"id": chat_id}, "text": text}}))
                .into_response()
        }
        "editMessageText" => {
            let id = body["message_id"].as_i64().unwrap_or(0);
            let Some(m) = s.messages.iter_mut().find(|m| m.message_id == id && m.chat_id == chat_id) else {
                return telegram_error(StatusCode::BAD_REQUEST, "Bad Request: message to edit not found", None);
            };
            if m.text == text {
                return telegram_error(
                    StatusCode::BAD_REQUEST,
                    "Bad Request: message is not modified: specified new message content and reply markup are exactly the same",
                    None,
                );
            }
            m.text = text.clone();
            m.edits += 1;
            Json(json!({"ok": true, "result": {"message_id": id, "chat": {"id": chat_id}, "text": text}}))
                .into_response()
        }
        _ => telegram_error(StatusCode::NOT_FOUND, "Not Found: method not found", None),
    }
}

/// One `chat.postMessage` as received.
#[derive(Debug, Clone)]
pub struct SlackPost {
    pub channel: String,
    pub thread_ts: Option<String>,
    pub text: String,
    pub at: Instant,
}

struct SlackState {
    token: String,
    posts: Vec<SlackPost>,
    refuse_next: u32,
}

#[derive(Clone)]
pub struct FakeSlack {
    state: Arc<Mutex<SlackState>>,
    pub url: String,
}

impl FakeSlack {
    /// Serves the Web API on a fresh port of 127.0.0.1, accepting `token` only.
    pub async fn start(token: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(SlackState { token: token.into(), posts: Vec::new(), refuse_next: 0 }));
        let router = Router::new().route("/chat.postMessage", post(slack_post)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, router).await });
        Ok(Self { state, url })
    }

    pub fn posts(&self) -> Vec<SlackPost> {
        self.state.lock().unwrap().posts.clone()
    }

    /// Answers the next `n` calls with HTTP 429 and `Retry-After: 1`.
    pub fn refuse_next(&self, n: u32) {
        self.state.lock().unwrap().refuse_next = n;
    }
}

async fn slack_post(
    State(state): State<Arc<Mutex<SlackState>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut s = state.lock().unwrap();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if auth != format!("Bearer {}", s.token) {
        return Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    if s.refuse_next > 0 {
        s.refuse_next -= 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            Json(json!({"ok": false, "error": "ratelimited"})),
        )
            .into_response();
    }
    let Some(channel) = body["channel"].as_str().filter(|c| !c.is_empty()) else {
        return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
    };
    let Some(text) = body["text"].as_str().filter(|t| !t.trim().is_empty()) else {
        return Json(json!({"ok": false, "error": "no_text"})).into_response();
    };
    let ts = format!("1700000000.{:06}", s.posts.len() + 1);
    s.posts.push(SlackPost {
        channel: channel.into(),
        thread_ts: body["thread_ts"].as_str().map(str::to_owned),
        text: text.into(),
        at: Instant::now(),
    });
    Json(json!({"ok": true, "channel": channel, "ts": ts, "message": {"text": text}})).into_response()
}

/// `X-Slack-Signature` for `body` sent at `timestamp`, as Slack computes it.
pub fn slack_signature(signing_secret: &str, timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(signing_secret.as_bytes()).expect("any key length");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}
