//! `torpor channel`: channels that bring messages to sandboxes' agents (HTTP, Telegram, Slack),
//! and sending a message on an HTTP channel with its reply streamed to the terminal.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use torpor_control::model::{ChannelKind, ChannelMessage, CreateChannel, SlackSecrets, TelegramSecrets};

use crate::client::Client;

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

pub async fn run(cmd: ChannelCommand, url: &str, api_key: Option<String>) -> Result<ExitCode> {
    let client = Client::new(url, api_key)?;
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
            let channel: Value = client.json(Method::POST, "/v1/channels", Some(&spec)).await?;
            println!("{} created; messages go to {}", spec.name, channel["webhook_path"].as_str().unwrap_or("?"));
        }
        ChannelCommand::List { json } => {
            let list: Value = client.json(Method::GET, "/v1/channels", None::<&()>).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list["channels"])?);
            } else {
                println!("{:<20} {:<9} {:<28} {:<12} WEBHOOK", "NAME", "KIND", "SANDBOX / TEMPLATE", "AGENT");
                for c in list["channels"].as_array().into_iter().flatten() {
                    let target = c["sandbox"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("template {}", c["template"].as_str().unwrap_or("base")));
                    println!(
                        "{:<20} {:<9} {:<28} {:<12} {}",
                        c["name"].as_str().unwrap_or(""),
                        c["kind"].as_str().unwrap_or(""),
                        target,
                        c["agent"]["adapter"].as_str().unwrap_or("(template's)"),
                        c["webhook_path"].as_str().unwrap_or("")
                    );
                }
            }
        }
        ChannelCommand::Rm { name } => {
            client.send(client.request(Method::DELETE, &format!("/v1/channels/{name}"))).await?;
            println!("{name} removed");
        }
        ChannelCommand::Send { name, text, conversation, idempotency_key } => {
            let msg = ChannelMessage { conversation: Some(conversation), text, idempotency_key };
            let resp =
                client.send(client.request(Method::POST, &format!("/v1/channels/{name}/messages")).json(&msg)).await?;
            return print_reply(resp).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints text as it streams, tool activity and waking on stderr; fails on an `error` event.
async fn print_reply(resp: reqwest::Response) -> Result<ExitCode> {
    let mut buffer = String::new();
    let mut stream = resp.bytes_stream();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
            let event: Value = serde_json::from_str(data.trim())?;
            match event["type"].as_str() {
                Some("waking") => eprintln!("(waking sandbox {})", event["sandbox"].as_str().unwrap_or("?")),
                Some("text") => {
                    print!("{}", event["text"].as_str().unwrap_or(""));
                    stdout.flush()?;
                }
                Some("tool") => {
                    eprintln!("[{}] {}", event["name"].as_str().unwrap_or(""), event["detail"].as_str().unwrap_or(""))
                }
                Some("done") => {
                    println!();
                    return Ok(ExitCode::SUCCESS);
                }
                Some("error") => bail!("{}", event["message"].as_str().unwrap_or("the agent failed")),
                _ => {}
            }
        }
    }
    bail!("the reply ended without finishing")
}
