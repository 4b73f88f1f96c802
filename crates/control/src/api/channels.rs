//! Channels: creating them, the HTTP channel's message endpoint (reply as server-sent events),
//! and the public webhooks Telegram and Slack call.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use super::{json_body, AppState};
use crate::error::{ApiError, ErrorBody};
use crate::relay::{verify_slack_signature, Reply, Submitted};
use torpor_api::{AgentConversation, AgentStatus, Channel, ChannelKind, ChannelList, ChannelMessage, CreateChannel};

/// Most text one message may carry.
const MAX_MESSAGE_CHARS: usize = 100_000;

fn webhook_path(spec: &CreateChannel) -> String {
    match spec.kind {
        ChannelKind::Http => format!("/v1/channels/{}/messages", spec.name),
        ChannelKind::Telegram => format!("/v1/hooks/telegram/{}", spec.name),
        ChannelKind::Slack => format!("/v1/hooks/slack/{}", spec.name),
    }
}

#[utoipa::path(post, path = "/v1/channels", request_body = CreateChannel, responses(
    (status = 201, body = Channel), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<CreateChannel>, JsonRejection>,
) -> Result<(StatusCode, Json<Channel>), ApiError> {
    let spec = json_body(body)?;
    let manager = &state.manager;
    crate::model::validate_channel(&spec, &manager.cfg)?;
    if let Some(id) = &spec.sandbox {
        manager.get(id).await?;
    }
    if let Some(template) = &spec.template {
        if template != torpor_api::BASE_TEMPLATE && manager.store().template(template).await?.is_none() {
            return Err(ApiError::not_found(format!("unknown template {template:?}")));
        }
    }
    let path = webhook_path(&spec);
    if !manager.store().insert_channel(&spec, &path).await? {
        return Err(ApiError::conflict(format!("a channel named {} exists", spec.name)));
    }
    let channel = manager.store().channel(&spec.name).await?.ok_or_else(|| ApiError::internal("channel vanished"))?;
    Ok((StatusCode::CREATED, Json(channel)))
}

#[utoipa::path(get, path = "/v1/channels", responses((status = 200, body = ChannelList)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<ChannelList>, ApiError> {
    Ok(Json(ChannelList { channels: state.manager.store().channels().await? }))
}

async fn channel(state: &AppState, name: &str) -> Result<Channel, ApiError> {
    state.manager.store().channel(name).await?.ok_or_else(|| ApiError::not_found(format!("no channel {name:?}")))
}

#[utoipa::path(get, path = "/v1/channels/{name}", responses((status = 200, body = Channel), (status = 404, body = ErrorBody)))]
pub async fn get_one(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Channel>, ApiError> {
    Ok(Json(channel(&state, &name).await?))
}

/// Removes the channel and its conversations' bindings (their sandboxes stay).
#[utoipa::path(delete, path = "/v1/channels/{name}", responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if state.manager.store().delete_channel(&name).await? {
        state.relay.forget_channel(&name);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no channel {name:?}")))
    }
}

/// Sends a message on an HTTP channel; the reply streams back as server-sent events: `waking`,
/// `text`, `tool`, then `done` (or `error`). A message with an idempotency key already seen
/// gets 409.
#[utoipa::path(post, path = "/v1/channels/{name}/messages", request_body = ChannelMessage, responses(
    (status = 200, description = "text/event-stream of the reply"), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "a duplicate, or not an HTTP channel")))]
pub async fn message(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ChannelMessage>, JsonRejection>,
) -> Result<Response, ApiError> {
    let msg = json_body(body)?;
    let channel = channel(&state, &name).await?;
    if channel.spec.kind != ChannelKind::Http {
        return Err(ApiError::conflict(format!(
            "{name} is a {} channel: its messages come from {}",
            channel.spec.kind.as_str(),
            channel.webhook_path
        )));
    }
    if msg.text.trim().is_empty() || msg.text.chars().count() > MAX_MESSAGE_CHARS {
        return Err(ApiError::invalid(format!("text must be 1 to {MAX_MESSAGE_CHARS} characters")));
    }
    let conversation = msg.conversation.unwrap_or_else(|| "default".into());
    if conversation.is_empty() || conversation.len() > 200 {
        return Err(ApiError::invalid("conversation must be 1 to 200 bytes"));
    }
    let key =
        msg.idempotency_key.or_else(|| headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned));
    let (tx, rx) = mpsc::channel(64);
    let submitted = state.relay.submit(&channel, &conversation, key.as_deref(), msg.text, Reply::Http(tx)).await?;
    if submitted == Submitted::Duplicate {
        return Err(ApiError::conflict("this idempotency key was delivered already"));
    }
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|event| {
        Ok::<_, Infallible>(Event::default().event(event.name()).json_data(&event).expect("events serialise"))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// A channel's secret for checking a webhook call. Its absence or emptiness (which would let
/// anyone through) is the host's misconfiguration: logged here, not told to the caller.
fn channel_secret(state: &AppState, channel: &str, secret: &str) -> Result<String, ApiError> {
    match state.manager.cfg.read_secret(secret) {
        Ok(value) if value.len() >= 8 => Ok(value),
        Ok(_) => {
            tracing::error!(%channel, %secret, "the secret is shorter than 8 characters; refusing every call");
            Err(ApiError::internal("the channel is misconfigured on the host"))
        }
        Err(e) => {
            tracing::error!(%channel, %secret, error = %e, "the channel's secret cannot be read");
            Err(ApiError::internal("the channel is misconfigured on the host"))
        }
    }
}

fn ok() -> Response {
    StatusCode::OK.into_response()
}

/// A Telegram update for a Telegram channel: checked against the webhook secret, queued, and
/// acknowledged at once (Telegram redelivers what is not acknowledged; `update_id` catches it).
#[utoipa::path(post, path = "/v1/hooks/telegram/{name}", params(("name" = String, Path)), security(()),
    request_body(content = String, content_type = "application/json", description = "a Telegram update"), responses(
    (status = 200, description = "taken or ignored"), (status = 401, body = ErrorBody, description = "wrong secret token")))]
pub async fn telegram(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let channel = channel(&state, &name).await?;
    let Some(secrets) = channel.spec.telegram.as_ref() else {
        return Err(ApiError::not_found(format!("{name} is not a Telegram channel")));
    };
    let expected = channel_secret(&state, &name, &secrets.webhook_secret)?;
    let given = headers.get("x-telegram-bot-api-secret-token").map(|v| v.as_bytes()).unwrap_or_default();
    if !bool::from(given.ct_eq(expected.as_bytes())) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong X-Telegram-Bot-Api-Secret-Token"));
    }
    let update: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("not a Telegram update: {e}")))?;
    let Some(update_id) = update["update_id"].as_i64() else {
        return Err(ApiError::invalid("not a Telegram update: no update_id"));
    };
    let message = &update["message"];
    // Edits, joins, stickers…: nothing for the agent. Acknowledged so Telegram stops sending.
    let (Some(chat_id), Some(message_id), Some(text)) =
        (message["chat"]["id"].as_i64(), message["message_id"].as_i64(), message["text"].as_str())
    else {
        return Ok(ok());
    };
    if !secrets.allowed_chats.is_empty() && !secrets.allowed_chats.contains(&chat_id) {
        tracing::info!(channel = %name, chat_id, "message from a chat the channel does not allow; ignored");
        return Ok(ok());
    }
    let reply = Reply::Telegram { chat_id, reply_to: message_id };
    let key = format!("update:{update_id}");
    state.relay.submit(&channel, &chat_id.to_string(), Some(&key), text.to_owned(), reply).await?;
    Ok(ok())
}

/// A Slack Events API request for a Slack channel: the signature is checked first, a
/// `url_verification` answered, an event queued and acknowledged at once (Slack retries what
/// is not acknowledged within 3 s; `event_id` catches the retries).
#[utoipa::path(post, path = "/v1/hooks/slack/{name}", params(("name" = String, Path)), security(()),
    request_body(content = String, content_type = "application/json", description = "a Slack Events API request"),
    responses(
    (status = 200, description = "taken, ignored, or a url_verification answer"),
    (status = 401, body = ErrorBody, description = "bad signature")))]
pub async fn slack(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let channel = channel(&state, &name).await?;
    let Some(secrets) = channel.spec.slack.as_ref() else {
        return Err(ApiError::not_found(format!("{name} is not a Slack channel")));
    };
    let secret = channel_secret(&state, &name, &secrets.signing_secret)?;
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    verify_slack_signature(&secret, &header("x-slack-request-timestamp"), &header("x-slack-signature"), &body)
        .map_err(|why| ApiError::new(StatusCode::UNAUTHORIZED, format!("Slack signature refused: {why}")))?;
    let payload: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("not a Slack event: {e}")))?;
    match payload["type"].as_str() {
        Some("url_verification") => {
            return Ok(Json(json!({"challenge": payload["challenge"]})).into_response());
        }
        Some("event_callback") => {}
        _ => return Ok(ok()),
    }
    let event = &payload["event"];
    // Bots' messages (ours among them) and edits are not for the agent: that way lie loops.
    let is_message = matches!(event["type"].as_str(), Some("message" | "app_mention"));
    if !is_message || event.get("bot_id").is_some_and(|b| !b.is_null()) || event.get("subtype").is_some() {
        return Ok(ok());
    }
    let (Some(slack_channel), Some(ts), Some(text)) =
        (event["channel"].as_str(), event["ts"].as_str(), event["text"].as_str())
    else {
        return Ok(ok());
    };
    let Some(event_id) = payload["event_id"].as_str() else {
        return Err(ApiError::invalid("not a Slack event: no event_id"));
    };
    let thread_ts = event["thread_ts"].as_str().unwrap_or(ts).to_owned();
    let conversation = format!("{slack_channel}/{thread_ts}");
    let reply = Reply::Slack { channel: slack_channel.to_owned(), thread_ts };
    let key = format!("event:{event_id}");
    state.relay.submit(&channel, &conversation, Some(&key), text.to_owned(), reply).await?;
    Ok(ok())
}

/// The conversations a sandbox's agent has had (wakes the sandbox if it is paused).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/agent", params(("id" = String, Path)), responses(
    (status = 200, body = AgentStatus), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn agent_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AgentStatus>, ApiError> {
    let live = state.manager.running(&id).await?;
    let status = crate::guest::within(live.guest.agent().status(torpor_proto::supervisor::AgentStatusRequest {}))
        .await
        .map_err(ApiError::from_guest)?
        .into_inner();
    let conversations = status
        .conversations
        .into_iter()
        .map(|c| AgentConversation { conversation: c.conversation, session: c.session, turns: c.turns, busy: c.busy })
        .collect();
    Ok(Json(AgentStatus { conversations }))
}

#[derive(serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelAgent {
    /// As `GET …/agent` names it.
    pub conversation: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Cancelled {
    /// Whether a run was in progress and was stopped (SIGTERM, SIGKILL 5 s later).
    pub cancelled: bool,
}

/// Stops the agent's run in progress in a conversation; its relayed message gets an error reply.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/agent/cancel", params(("id" = String, Path)), request_body = CancelAgent,
    responses((status = 200, body = Cancelled), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn agent_cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<CancelAgent>, JsonRejection>,
) -> Result<Json<Cancelled>, ApiError> {
    let req = json_body(body)?;
    let live = state.manager.running(&id).await?;
    let answer = crate::guest::within(
        live.guest.agent().cancel(torpor_proto::supervisor::CancelRequest { conversation: req.conversation }),
    )
    .await
    .map_err(ApiError::from_guest)?
    .into_inner();
    Ok(Json(Cancelled { cancelled: answer.cancelled }))
}
