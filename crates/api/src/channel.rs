//! Channels: where messages for a sandbox's agent come from (HTTP, Telegram, Slack).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{validate_template_name, AgentConfig, Invalid};

pub const DEFAULT_MAX_CONVERSATIONS: u32 = 16;
pub const MAX_CONVERSATIONS: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, strum::IntoStaticStr)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ChannelKind {
    /// `POST /v1/channels/{name}/messages`, the reply streamed back as server-sent events.
    Http,
    /// A Telegram bot's webhook (`POST /v1/hooks/telegram/{name}`).
    Telegram,
    /// A Slack app's Events API endpoint (`POST /v1/hooks/slack/{name}`).
    Slack,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Names of the daemon's `[secrets]` a Telegram channel uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TelegramSecrets {
    /// The bot token from BotFather.
    pub bot_token: String,
    /// The `secret_token` given to `setWebhook`: every update must carry it.
    pub webhook_secret: String,
    /// Chats whose messages are taken (ids); empty: any chat. Anyone can message a bot, and
    /// each new chat gets a sandbox.
    #[serde(default)]
    pub allowed_chats: Vec<i64>,
}

/// Names of the daemon's `[secrets]` a Slack channel uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackSecrets {
    /// The bot token (`xoxb-…`).
    pub bot_token: String,
    /// The app's signing secret: every request must be signed with it.
    pub signing_secret: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    /// 1-40 of a-z, 0-9 and -; part of the channel's URLs.
    pub name: String,
    pub kind: ChannelKind,
    /// Every conversation goes to this sandbox. Without it, each new conversation gets a new
    /// sandbox from `template`.
    pub sandbox: Option<String>,
    /// Template of the sandboxes made for new conversations (default `base`).
    pub template: Option<String>,
    /// The agent, where the sandbox's template names none.
    pub agent: Option<AgentConfig>,
    /// Idle timeout of the sandboxes it makes (default: the daemon's).
    pub idle_timeout_secs: Option<u64>,
    /// Most conversations (so sandboxes) it makes (default 16, at most 1000); a new one past
    /// that gets an error reply.
    pub max_conversations: Option<u32>,
    pub telegram: Option<TelegramSecrets>,
    pub slack: Option<SlackSecrets>,
}

impl CreateChannel {
    /// Checks the request on its own and returns the names of the daemon's secrets it uses,
    /// which the daemon must have.
    pub fn validate(&self) -> Result<Vec<String>, Invalid> {
        validate_template_name(&self.name)
            .map_err(|_| Invalid(format!("channel name {:?} must be 1-40 of a-z, 0-9 and -", self.name)))?;
        if let Some(t) = &self.template {
            validate_template_name(t)?;
        }
        if self.sandbox.is_some() && self.template.is_some() {
            return Err(Invalid::new("give a channel either a sandbox or a template, not both"));
        }
        if let Some(agent) = &self.agent {
            agent.validate()?;
        }
        if self.max_conversations.is_some_and(|m| !(1..=MAX_CONVERSATIONS).contains(&m)) {
            return Err(Invalid(format!("max_conversations must be between 1 and {MAX_CONVERSATIONS}")));
        }
        match (self.kind, &self.telegram, &self.slack) {
            (ChannelKind::Http, None, None) => Ok(vec![]),
            (ChannelKind::Telegram, Some(t), None) => Ok(vec![t.bot_token.clone(), t.webhook_secret.clone()]),
            (ChannelKind::Slack, None, Some(s)) => Ok(vec![s.bot_token.clone(), s.signing_secret.clone()]),
            (kind, _, _) => Err(Invalid(format!(
                "a {} channel takes {}",
                kind.as_str(),
                match kind {
                    ChannelKind::Http => "neither `telegram` nor `slack`",
                    ChannelKind::Telegram =>
                        "`telegram` {bot_token, webhook_secret} (names of [secrets]) and no `slack`",
                    ChannelKind::Slack => "`slack` {bot_token, signing_secret} (names of [secrets]) and no `telegram`",
                }
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Channel {
    #[serde(flatten)]
    pub spec: CreateChannel,
    /// Where the platform must send its events (relative to the daemon's public URL).
    pub webhook_path: String,
    pub created_at: DateTime<Utc>,
}

/// A message for an HTTP channel.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelMessage {
    /// Which conversation it continues (default `default`); each has its own sandbox unless the
    /// channel names one, and its own agent session.
    pub conversation: Option<String>,
    pub text: String,
    /// Sent again with the same key, the message is not delivered twice (also as the
    /// `Idempotency-Key` header).
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChannelList {
    pub channels: Vec<Channel>,
}

/// One conversation of a sandbox's agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentConversation {
    /// `<channel>/<conversation>` for relayed messages.
    pub conversation: String,
    /// The agent's own session id (Claude Code session, Codex thread).
    pub session: String,
    pub turns: u64,
    /// A message of it is being answered now.
    pub busy: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentStatus {
    pub conversations: Vec<AgentConversation>,
}

/// What an HTTP channel streams back (as server-sent events, `event:` = the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayEvent {
    /// The sandbox is being woken (it was paused).
    Waking {
        sandbox: String,
    },
    Text {
        text: String,
    },
    Tool {
        name: String,
        detail: String,
    },
    Done {
        text: String,
        session: String,
        turn: u64,
        sandbox: String,
        woke: bool,
        wake_ms: u64,
    },
    Error {
        message: String,
    },
}

impl RelayEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Waking { .. } => "waking",
            Self::Text { .. } => "text",
            Self::Tool { .. } => "tool",
            Self::Done { .. } => "done",
            Self::Error { .. } => "error",
        }
    }
}
