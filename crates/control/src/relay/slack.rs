//! Slack: the Events API posts to the app's request URL, signed with its signing secret
//! (`v0=` HMAC-SHA256 of `v0:{timestamp}:{body}`, timestamp within five minutes). The relay
//! answers `url_verification` itself, acknowledges events at once (Slack wants an answer within
//! three seconds) and replies with `chat.postMessage` in the message's thread.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::{with_retries, Attempt, Relay, RelayEvent};
use torpor_api::Channel;

/// Slack's own bound on replayed requests.
const MAX_SKEW_SECS: i64 = 300;

/// Checks a request's `X-Slack-Signature` against the signing secret; the reason if it fails.
pub fn verify_slack_signature(secret: &str, timestamp: &str, signature: &str, body: &[u8]) -> Result<(), String> {
    let ts: i64 = timestamp.parse().map_err(|_| "X-Slack-Request-Timestamp is not a number".to_owned())?;
    let now = chrono::Utc::now().timestamp();
    if now.abs_diff(ts) > MAX_SKEW_SECS as u64 {
        return Err("the request timestamp is more than five minutes off".into());
    }
    let given = signature.strip_prefix("v0=").ok_or("X-Slack-Signature is not a v0 signature")?;
    let given = hex::decode(given).map_err(|_| "X-Slack-Signature is not hex".to_owned())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    mac.verify_slice(&given).map_err(|_| "the signature does not match".to_owned())
}

pub struct Sink {
    http: reqwest::Client,
    url: String,
    token: String,
    channel: String,
    thread_ts: String,
}

impl Sink {
    pub fn new(relay: &Relay, channel: &Channel, slack_channel: &str, thread_ts: &str) -> Result<Self, String> {
        let secrets = channel.spec.slack.as_ref().ok_or("not a Slack channel")?;
        let token = relay.manager.cfg.read_secret(&secrets.bot_token)?;
        Ok(Self {
            http: relay.http.clone(),
            url: format!("{}/chat.postMessage", relay.manager.cfg.slack_api_url.trim_end_matches('/')),
            token,
            channel: slack_channel.to_owned(),
            thread_ts: thread_ts.to_owned(),
        })
    }

    pub async fn event(&mut self, event: RelayEvent) {
        let text = match event {
            RelayEvent::Done { text, .. } if text.trim().is_empty() => "(the agent gave no answer)".to_owned(),
            RelayEvent::Done { text, .. } => text,
            RelayEvent::Error { message } => format!(":warning: {message}"),
            _ => return,
        };
        if let Err(e) = self.post(cut(&text)).await {
            tracing::error!(channel = %self.channel, error = %e, "replying on Slack failed; given up");
        }
    }

    async fn post(&self, text: String) -> Result<(), String> {
        let body = json!({"channel": self.channel, "text": text, "thread_ts": self.thread_ts});
        with_retries("Slack chat.postMessage", || async {
            let response = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await
                .map_err(|e| Attempt::from_reqwest(e.without_url()))?;
            let status = response.status();
            let after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs);
            if status.as_u16() == 429 || status.is_server_error() {
                return Err(Attempt::Retry { error: status.to_string(), after });
            }
            let answer: Value = response.json().await.map_err(|e| Attempt::from_reqwest(e.without_url()))?;
            match (answer["ok"].as_bool(), answer["error"].as_str()) {
                (Some(true), _) => Ok(()),
                (_, Some("ratelimited")) => Err(Attempt::Retry { error: "ratelimited".into(), after }),
                (_, error) => Err(Attempt::Fatal(error.unwrap_or("no error given").to_owned())),
            }
        })
        .await
    }
}

/// Slack refuses messages past 40 000 characters: a longer reply is cut, and says so.
fn cut(text: &str) -> String {
    const MAX_BYTES: usize = 39_000;
    let kept = torpor_engine::logs::cut(text, MAX_BYTES);
    if kept.len() == text.len() {
        return text.to_owned();
    }
    format!("{kept}\n\n[… the rest of this reply was cut]")
}
