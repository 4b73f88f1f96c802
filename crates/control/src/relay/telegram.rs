//! Telegram: updates arrive at the bot's webhook carrying the `secret_token` given to
//! `setWebhook`; the reply is a `sendMessage` in reply to the user's message, then edited with
//! `editMessageText` as the agent's text streams in, at most once a second (Telegram's limit for
//! one chat), with the whole reply in a last edit.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{with_retries, Attempt, Relay, RelayEvent};
use torpor_api::Channel;

/// Telegram refuses longer messages; a longer reply continues in further messages.
const MAX_MESSAGE_CHARS: usize = 4096;
/// The most of a reply kept and sent (16 messages at most); the rest is replaced by a note.
const MAX_REPLY_BYTES: usize = 64 << 10;
const CUT_NOTE: &str = "\n\n[… the rest of this reply was cut]";
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
                self.append(&text);
                if self.last_edit.is_none_or(|t| t.elapsed() >= EDIT_INTERVAL) {
                    self.show(false).await
                } else {
                    Ok(())
                }
            }
            RelayEvent::Done { text, .. } => {
                if !text.trim().is_empty() {
                    self.text.clear();
                    self.append(&text);
                }
                if self.text.trim().is_empty() {
                    self.text = "(the agent gave no answer)".into();
                }
                self.show(true).await
            }
            RelayEvent::Error { message } => {
                let message = if self.text.is_empty() { message } else { format!("\n\n⚠️ {message}") };
                self.append(&message);
                self.show(true).await
            }
            RelayEvent::Waking { .. } | RelayEvent::Tool { .. } => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(chat_id = self.chat_id, error = %e, "replying on Telegram failed; given up");
        }
    }

    /// Adds to the reply, within `MAX_REPLY_BYTES`.
    fn append(&mut self, text: &str) {
        let room = MAX_REPLY_BYTES.saturating_sub(self.text.len());
        if text.len() <= room {
            self.text.push_str(text);
        } else if !self.text.ends_with(CUT_NOTE) {
            self.text.push_str(torpor_engine::logs::cut(text, room.saturating_sub(CUT_NOTE.len())));
            self.text.push_str(CUT_NOTE);
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

#[cfg(test)]
mod tests {
    use super::*;
    use torpor_api::{ChannelKind, CreateChannel, TelegramSecrets};

    /// An agent that streams 100 MB of text and then finishes: the reply kept is bounded, and so
    /// is the number of messages it becomes.
    #[tokio::test]
    async fn an_endless_answer_is_cut_and_sent_in_few_messages() {
        let telegram = torpor_testkit::FakeTelegram::start("1:test").await.unwrap();
        let secrets = tempfile::tempdir().unwrap();
        let token = secrets.path().join("bot");
        std::fs::write(&token, "1:test").unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let (state, _dir) = crate::api::tests::state_with(|cfg| {
            cfg.telegram_api_url = telegram.url.clone();
            cfg.secrets.insert("BOT".into(), crate::config::SecretSource { file: token });
        })
        .await;
        let channel = Channel {
            spec: CreateChannel {
                name: "t".into(),
                kind: ChannelKind::Telegram,
                sandbox: None,
                template: None,
                agent: None,
                idle_timeout_secs: None,
                max_conversations: None,
                telegram: Some(TelegramSecrets {
                    bot_token: "BOT".into(),
                    webhook_secret: "HOOK".into(),
                    allowed_chats: vec![],
                }),
                slack: None,
            },
            webhook_path: String::new(),
            created_at: chrono::Utc::now(),
        };
        let mut sink = Sink::new(&state.relay, &channel, 7, 1).unwrap();
        let megabyte = "y".repeat(1 << 20);
        for _ in 0..100 {
            sink.event(RelayEvent::Text { text: megabyte.clone() }).await;
            assert!(sink.text.len() <= MAX_REPLY_BYTES + CUT_NOTE.len());
        }
        let done = RelayEvent::Done {
            text: String::new(),
            session: "s".into(),
            turn: 1,
            sandbox: "x".into(),
            woke: false,
            wake_ms: 0,
        };
        sink.event(done).await;
        let messages = telegram.messages();
        assert!(messages.len() <= MAX_REPLY_BYTES / MAX_MESSAGE_CHARS + 1, "{} messages", messages.len());
        assert!(messages.last().unwrap().text.ends_with(CUT_NOTE.trim_start()), "the reply says it was cut");
    }
}
