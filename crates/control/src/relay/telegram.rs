//! Telegram: updates arrive at the bot's webhook carrying the `secret_token` given to
//! `setWebhook`; the reply is a `sendMessage` in reply to the user's message, then edited with
//! `editMessageText` as the agent's text streams in, at most once a second (Telegram's limit for
//! one chat), with the whole reply in a last edit.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{with_retries, Attempt, Relay, RelayEvent};
use crate::model::Channel;

/// Telegram refuses longer messages; a longer reply continues in further messages.
const MAX_MESSAGE_CHARS: usize = 4096;
const EDIT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Sink {
    http: reqwest::Client,
    /// `{api}/bot{token}`: never logged.
    base: String,
    chat_id: i64,
    reply_to: i64,
    message_id: Option<i64>,
    text: String,
    shown: String,
    last_edit: Option<Instant>,
}

fn chunks(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(MAX_MESSAGE_CHARS).map(|c| c.iter().collect()).collect()
}

impl Sink {
    pub fn new(relay: &Relay, channel: &Channel, chat_id: i64, reply_to: i64) -> Result<Self, String> {
        let secrets = channel.spec.telegram.as_ref().ok_or("not a Telegram channel")?;
        let token = relay.manager.cfg.read_secret(&secrets.bot_token)?;
        let api = relay.manager.cfg.telegram_api_url.trim_end_matches('/');
        Ok(Self {
            http: relay.http.clone(),
            base: format!("{api}/bot{token}"),
            chat_id,
            reply_to,
            message_id: None,
            text: String::new(),
            shown: String::new(),
            last_edit: None,
        })
    }

    pub async fn event(&mut self, event: RelayEvent) {
        let result = match event {
            RelayEvent::Text { text } => {
                self.text.push_str(&text);
                if self.last_edit.is_none_or(|t| t.elapsed() >= EDIT_INTERVAL) {
                    self.show(false).await
                } else {
                    Ok(())
                }
            }
            RelayEvent::Done { text, .. } => {
                if !text.trim().is_empty() {
                    self.text = text;
                }
                if self.text.trim().is_empty() {
                    self.text = "(the agent gave no answer)".into();
                }
                self.show(true).await
            }
            RelayEvent::Error { message } => {
                self.text = if self.text.is_empty() { message } else { format!("{}\n\n⚠️ {message}", self.text) };
                self.show(true).await
            }
            RelayEvent::Waking { .. } | RelayEvent::Tool { .. } => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(chat_id = self.chat_id, error = %e, "replying on Telegram failed; given up");
        }
    }

    /// Brings the chat up to date: the first piece as the (edited) reply, and at the end any
    /// further pieces as messages of their own.
    async fn show(&mut self, last: bool) -> Result<(), String> {
        let pieces = chunks(self.text.trim_end());
        let Some(first) = pieces.first().cloned().filter(|p| !p.trim().is_empty()) else { return Ok(()) };
        self.last_edit = Some(Instant::now());
        match self.message_id {
            None => {
                let sent = self
                    .call(
                        "sendMessage",
                        json!({"chat_id": self.chat_id, "text": first, "reply_parameters": {"message_id": self.reply_to}}),
                    )
                    .await?;
                self.message_id = sent["message_id"].as_i64();
                self.shown = first;
            }
            Some(id) if first != self.shown => {
                self.call("editMessageText", json!({"chat_id": self.chat_id, "message_id": id, "text": first})).await?;
                self.shown = first;
            }
            Some(_) => {}
        }
        if last {
            for piece in pieces.iter().skip(1) {
                self.call("sendMessage", json!({"chat_id": self.chat_id, "text": piece})).await?;
            }
        }
        Ok(())
    }

    async fn call(&self, method: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}/{method}", self.base);
        with_retries(&format!("Telegram {method}"), || async {
            let response =
                self.http.post(&url).json(&body).send().await.map_err(|e| Attempt::from_reqwest(e.without_url()))?;
            let status = response.status();
            let answer: Value = response.json().await.map_err(|e| Attempt::from_reqwest(e.without_url()))?;
            if answer["ok"].as_bool() == Some(true) {
                return Ok(answer["result"].clone());
            }
            let description = answer["description"].as_str().unwrap_or("no description").to_owned();
            if description.contains("message is not modified") {
                return Ok(Value::Null);
            }
            if status.as_u16() == 429 || status.is_server_error() {
                let after = answer["parameters"]["retry_after"].as_u64().map(Duration::from_secs);
                return Err(Attempt::Retry { error: format!("{status}: {description}"), after });
            }
            Err(Attempt::Fatal(format!("{status}: {description}")))
        })
        .await
    }
}
