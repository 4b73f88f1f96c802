//! `torpor channel`: channels that bring messages to sandboxes' agents (HTTP, Telegram, Slack),
//! and sending a message on an HTTP channel with its reply streamed to the terminal.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;
use torpor_api::{ChannelKind, ChannelMessage, CreateChannel, RelayEvent, SlackSecrets, TelegramSecrets};

#[derive(Subcommand)]
pub enum ChannelCommand {
    /// Create a channel. Without --sandbox, each new conversation gets a sandbox of its own
    /// from --template.
    Create {
        name: String,
        #[arg(long, value_parser = ["http", "telegram", "slack"], default_value = "http")]
        kind: String,
        /// Send every conversation to this sandbox.
        #[arg(long, conflicts_with = "template")]
        sandbox: Option<String>,
        /// Template of the sandboxes made for new conversations (default base).
        #[arg(long)]
        template: Option<String>,
        /// Idle timeout of the sandboxes it makes, in seconds.
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Most conversations (each a sandbox) it starts (default 16).
        #[arg(long, value_name = "N")]
        max_conversations: Option<u32>,
        /// Telegram: a chat whose messages are taken (repeatable; default any chat).
        #[arg(long = "telegram-allow-chat", value_name = "CHAT_ID")]
        telegram_allow_chats: Vec<i64>,
        #[command(flatten)]
        agent: crate::grants::AgentArgs,
        /// Telegram: name of the daemon secret holding the bot token.
        #[arg(long, value_name = "SECRET")]
        telegram_bot_token: Option<String>,
        /// Telegram: name of the daemon secret holding the webhook's secret_token.
        #[arg(long, value_name = "SECRET")]
        telegram_webhook_secret: Option<String>,
        /// Slack: name of the daemon secret holding the bot token (xoxb-…).
        #[arg(long, value_name = "SECRET")]
        slack_bot_token: Option<String>,
        /// Slack: name of the daemon secret holding the app's signing secret.
        #[arg(long, value_name = "SECRET")]
        slack_signing_secret: Option<String>,
    },
    /// List channels.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a channel (its sandboxes stay).
    Rm { name: String },
    /// Send a message on an HTTP channel and print the reply as it streams in.
    Send {
        name: String,
        text: String,
        /// The conversation it continues.
        #[arg(long, default_value = "default")]
        conversation: String,
        /// Deliver at most once under this key.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

pub async fn run(cmd: ChannelCommand, url: &str, key_file: Option<&std::path::Path>) -> Result<ExitCode> {
    let client = crate::client::connect(url, key_file)?;
    match cmd {
        ChannelCommand::Create {
            name,
            kind,
            sandbox,
            template,
            idle_timeout,
            max_conversations,
            telegram_allow_chats,
            agent,
            telegram_bot_token,
            telegram_webhook_secret,
            slack_bot_token,
            slack_signing_secret,
        } => {
            let kind = match kind.as_str() {
                "telegram" => ChannelKind::Telegram,
                "slack" => ChannelKind::Slack,
                _ => ChannelKind::Http,
            };
            let telegram = match (telegram_bot_token, telegram_webhook_secret) {
                (Some(bot_token), Some(webhook_secret)) => {
                    Some(TelegramSecrets { bot_token, webhook_secret, allowed_chats: telegram_allow_chats })
                }
                (None, None) => None,
                _ => bail!("a Telegram channel needs both --telegram-bot-token and --telegram-webhook-secret"),
            };
            let slack = match (slack_bot_token, slack_signing_secret) {
                (Some(bot_token), Some(signing_secret)) => Some(SlackSecrets { bot_token, signing_secret }),
                (None, None) => None,
                _ => bail!("a Slack channel needs both --slack-bot-token and --slack-signing-secret"),
            };
            let spec = CreateChannel {
                name,
                kind,
                sandbox,
                template,
                agent: agent.agent(),
                idle_timeout_secs: idle_timeout,
                max_conversations,
                telegram,
                slack,
            };
            let channel = client.create_channel(&spec).await?;
            println!("{} created; messages go to {}", spec.name, channel.webhook_path);
        }
        ChannelCommand::List { json } => {
            let channels = client.channels().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&channels)?);
            } else {
                println!("{:<20} {:<9} {:<28} {:<12} WEBHOOK", "NAME", "KIND", "SANDBOX / TEMPLATE", "AGENT");
                for c in &channels {
                    let target = c.spec.sandbox.clone().unwrap_or_else(|| {
                        format!("template {}", c.spec.template.as_deref().unwrap_or(torpor_api::BASE_TEMPLATE))
                    });
                    println!(
                        "{:<20} {:<9} {:<28} {:<12} {}",
                        c.spec.name,
                        c.spec.kind.as_str(),
                        target,
                        c.spec.agent.as_ref().map_or("(template's)", |a| a.adapter.as_str()),
                        c.webhook_path
                    );
                }
            }
        }
        ChannelCommand::Rm { name } => {
            client.delete_channel(&name).await?;
            println!("{name} removed");
        }
        ChannelCommand::Send { name, text, conversation, idempotency_key } => {
            let msg = ChannelMessage { conversation: Some(conversation), text, idempotency_key };
            return print_reply(client.send_message(&name, &msg).await?).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints text as it streams, tool activity and waking on stderr; fails on an `error` event.
async fn print_reply(mut reply: torpor_client::RelayStream) -> Result<ExitCode> {
    let mut stdout = std::io::stdout();
    while let Some(event) = reply.next().await? {
        match event {
            RelayEvent::Waking { sandbox } => eprintln!("(waking sandbox {sandbox})"),
            RelayEvent::Text { text } => {
                print!("{text}");
                stdout.flush()?;
            }
            RelayEvent::Tool { name, detail } => eprintln!("[{name}] {detail}"),
            RelayEvent::Done { .. } => {
                println!();
                return Ok(ExitCode::SUCCESS);
            }
            RelayEvent::Error { message } => bail!("{message}"),
        }
    }
    bail!("the reply ended without finishing")
}
