//! The agent a sandbox runs, and the channels that bring it messages.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::Config;
use crate::error::ApiError;

/// How the supervisor runs the sandbox's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `echo`, `command` (a program speaking JSON lines), `claude-code` or `codex`.
    pub adapter: String,
    /// `command`: the program and its arguments; others: optionally the CLI's path.
    #[serde(default)]
    pub command: Vec<String>,
    /// Working directory of the agent (absolute; default /root).
    pub cwd: Option<String>,
    /// Environment of the agent, on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

pub const DEFAULT_MAX_CONVERSATIONS: u32 = 16;
pub const MAX_CONVERSATIONS: u32 = 1000;

pub const AGENT_ADAPTERS: [&str; 4] = ["echo", "command", "claude-code", "codex"];

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ApiError> {
        if !AGENT_ADAPTERS.contains(&self.adapter.as_str()) {
            return Err(ApiError::invalid(format!(
                "agent adapter {:?} is not one of {}",
                self.adapter,
                AGENT_ADAPTERS.join(", ")
            )));
        }
        if self.adapter == "command" && self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(ApiError::invalid("the command adapter needs `command`: the program and its arguments"));
        }
        if let Some(cwd) = &self.cwd {
            super::validate_guest_path(cwd)?;
        }
        for key in self.env.keys() {
            super::validate_env_name(key)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
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
        match self {
            Self::Http => "http",
            Self::Telegram => "telegram",
            Self::Slack => "slack",
        }
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
    pub fn validate(&self, cfg: &Config) -> Result<(), ApiError> {
        super::validate_template_name(&self.name)
            .map_err(|_| ApiError::invalid(format!("channel name {:?} must be 1-40 of a-z, 0-9 and -", self.name)))?;
        if let Some(t) = &self.template {
            super::validate_template_name(t)?;
        }
        if self.sandbox.is_some() && self.template.is_some() {
            return Err(ApiError::invalid("give a channel either a sandbox or a template, not both"));
        }
        if let Some(agent) = &self.agent {
            agent.validate()?;
        }
        if self.max_conversations.is_some_and(|m| !(1..=MAX_CONVERSATIONS).contains(&m)) {
            return Err(ApiError::invalid(format!("max_conversations must be between 1 and {MAX_CONVERSATIONS}")));
        }
        let secrets: Vec<String> = match (self.kind, &self.telegram, &self.slack) {
            (ChannelKind::Http, None, None) => vec![],
            (ChannelKind::Telegram, Some(t), None) => vec![t.bot_token.clone(), t.webhook_secret.clone()],
            (ChannelKind::Slack, None, Some(s)) => vec![s.bot_token.clone(), s.signing_secret.clone()],
            (kind, _, _) => {
                return Err(ApiError::invalid(format!(
                    "a {} channel takes {}",
                    kind.as_str(),
                    match kind {
                        ChannelKind::Http => "neither `telegram` nor `slack`",
                        ChannelKind::Telegram =>
                            "`telegram` {bot_token, webhook_secret} (names of [secrets]) and no `slack`",
                        ChannelKind::Slack =>
                            "`slack` {bot_token, signing_secret} (names of [secrets]) and no `telegram`",
                    }
                )))
            }
        };
        super::validate_secret_names(&secrets, cfg)
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
