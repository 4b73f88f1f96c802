//! The REST API (axum). Every route under `/v1` except `/v1/health` and `/v1/openapi.json`
//! needs `Authorization: Bearer <api key>`.

mod channels;
mod exec;
mod files;
mod network;
mod sandboxes;
mod templates;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;

use crate::error::{ApiError, ErrorBody, ErrorDetail};
use crate::manager::Manager;
use crate::model::*;

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub api_key: Arc<String>,
    pub auth_failures: Arc<AuthFailures>,
    pub relay: Arc<crate::relay::Relay>,
}

/// Failed authentications per client (its address; for a guest, its sandbox, since every guest
/// has the same address): past `AUTH_FAILURES_ALLOWED` within `AUTH_WINDOW`, that client gets
/// 429 until the window ends, so a key cannot be guessed at network speed.
#[derive(Default)]
pub struct AuthFailures(std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>);

/// Marks requests that arrived on a sandbox's own API endpoint, inside its namespace.
#[derive(Clone)]
pub struct FromSandbox(pub String);

const AUTH_FAILURES_ALLOWED: u32 = 10;
const AUTH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

impl AuthFailures {
    /// Seconds until `ip` may try again, if it is locked out.
    fn locked_out(&self, client: &str) -> Option<u64> {
        let table = self.0.lock().expect("auth table poisoned");
        let (count, since) = table.get(client)?;
        let left = AUTH_WINDOW.checked_sub(since.elapsed())?;
        (*count >= AUTH_FAILURES_ALLOWED).then(|| left.as_secs().max(1))
    }

    fn failed(&self, client: &str) {
        let mut table = self.0.lock().expect("auth table poisoned");
        // Forget windows that ended, so the table cannot grow without bound.
        table.retain(|_, (_, since)| since.elapsed() < AUTH_WINDOW);
        let entry = table.entry(client.to_owned()).or_insert((0, std::time::Instant::now()));
        entry.0 += 1;
    }

    fn succeeded(&self, client: &str) {
        self.0.lock().expect("auth table poisoned").remove(client);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Torpor API", description = "microVM sandboxes for AI agents"),
    paths(
        sandboxes::create, sandboxes::list, sandboxes::get_one, sandboxes::stop, sandboxes::delete, sandboxes::info,
        sandboxes::pause, sandboxes::resume, sandboxes::connect, sandboxes::start, sandboxes::usage,
        network::get_network, network::put_network,
        templates::create, templates::check, templates::list, templates::delete,
        channels::create, channels::list, channels::get_one, channels::delete, channels::message,
        channels::agent_status, channels::agent_cancel,
        exec::exec_post, exec::exec_ws, exec::signal, files::upload, files::download, health, jwks
    ),
    components(schemas(
        Sandbox, crate::model::State, NetworkInfo, Usage, CreateSandbox, ExecRequest, ExecEvent, SignalRequest, ErrorBody,
        ErrorDetail, Template, CreateTemplate, NetworkPolicy, NetworkMode, NetworkStatus, ResolvedAddress, templates::TemplateList, sandboxes::SandboxList, sandboxes::GuestInfo, files::Uploaded, Health,
        Channel, CreateChannel, ChannelKind, ChannelMessage, AgentConfig, TelegramSecrets, SlackSecrets, channels::ChannelList,
        channels::AgentStatus, channels::AgentConversation, channels::CancelAgent, channels::Cancelled
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security =
            Some(vec![utoipa::openapi::security::SecurityRequirement::new("api_key", Vec::<String>::new())]);
    }
}

pub fn router(state: AppState) -> Router {
    let authed = Router::new()
        .route("/v1/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/v1/sandboxes/{id}", get(sandboxes::get_one).delete(sandboxes::delete))
        .route("/v1/sandboxes/{id}/stop", post(sandboxes::stop))
        .route("/v1/sandboxes/{id}/info", get(sandboxes::info))
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/connect", post(sandboxes::connect))
        .route("/v1/sandboxes/{id}/start", post(sandboxes::start))
        .route("/v1/sandboxes/{id}/usage", get(sandboxes::usage))
        .route("/v1/sandboxes/{id}/network", get(network::get_network).put(network::put_network))
        .route("/v1/sandboxes/{id}/exec", post(exec::exec_post))
        .route("/v1/sandboxes/{id}/exec/ws", get(exec::exec_ws))
        .route("/v1/sandboxes/{id}/execs/{exec_id}/signal", post(exec::signal))
        .route("/v1/sandboxes/{id}/files", get(files::download).put(files::upload))
        .route("/v1/sandboxes/{id}/agent", get(channels::agent_status))
        .route("/v1/sandboxes/{id}/agent/cancel", post(channels::agent_cancel))
        .route("/v1/templates", post(templates::create).get(templates::list))
        .route("/v1/templates/check", post(templates::check))
        .route("/v1/templates/{name}", axum::routing::delete(templates::delete))
        .route("/v1/channels", post(channels::create).get(channels::list))
        .route("/v1/channels/{name}", get(channels::get_one).delete(channels::delete))
        .route("/v1/channels/{name}/messages", post(channels::message))
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/.well-known/jwks.json", get(jwks))
        .route("/v1/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        // Called by Telegram and Slack, which prove themselves with the channel's secrets.
        .route("/v1/hooks/telegram/{name}", post(channels::telegram))
        .route("/v1/hooks/slack/{name}", post(channels::slack))
        .merge(authed)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(state)
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// `kvm` or `tcg`; null when QEMU is missing.
    pub accelerator: Option<String>,
}

/// Liveness of the daemon itself; needs no API key.
#[utoipa::path(get, path = "/v1/health", security(()), responses((status = 200, body = Health)))]
async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        accelerator: state.manager.accelerator(),
    })
}

/// The public key that signs device tokens (JWKS), for anyone who checks them.
#[utoipa::path(get, path = "/v1/.well-known/jwks.json", responses((status = 200, description = "a JWK set")))]
async fn jwks(State(state): State<AppState>) -> Json<jsonwebtoken::jwk::JwkSet> {
    Json(state.manager.tokens.jwks())
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let client = match req.extensions().get::<FromSandbox>() {
        Some(FromSandbox(id)) => format!("sandbox {id}"),
        None => req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_else(|| "unknown".into()),
    };
    if let Some(secs) = state.auth_failures.locked_out(&client) {
        return ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from {client}; try again in {secs} s"),
        )
        .into_response();
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(state.api_key.as_bytes())) {
        state.auth_failures.succeeded(&client);
        next.run(req).await
    } else if let Ok(claims) = state.manager.tokens.verify(given) {
        state.auth_failures.succeeded(&client);
        // A device token opens its own sandbox and nothing else.
        let own = format!("/v1/sandboxes/{}", claims.sub);
        let path = req.uri().path();
        if path == own || path.starts_with(&format!("{own}/")) {
            next.run(req).await
        } else {
            ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                format!("a device token only opens its own sandbox ({}), not {path}", claims.sub),
            )
            .into_response()
        }
    } else {
        state.auth_failures.failed(&client);
        ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)")
            .into_response()
    }
}

/// Turns axum's JSON rejections into our error shape, keeping their explanation.
pub(crate) fn json_body<T>(body: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!("request body too large: {}", e.body_text()))
        } else {
            ApiError::invalid(format!("invalid JSON body: {}", e.body_text()))
        }
    })
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    #[test]
    fn openapi_documents_every_route() {
        let doc = serde_json::to_value(super::ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/stop",
            "/v1/sandboxes/{id}/info",
            "/v1/sandboxes/{id}/pause",
            "/v1/sandboxes/{id}/resume",
            "/v1/sandboxes/{id}/connect",
            "/v1/sandboxes/{id}/start",
            "/v1/sandboxes/{id}/usage",
            "/v1/sandboxes/{id}/network",
            "/v1/sandboxes/{id}/exec",
            "/v1/sandboxes/{id}/exec/ws",
            "/v1/sandboxes/{id}/execs/{exec_id}/signal",
            "/v1/sandboxes/{id}/files",
            "/v1/health",
            "/v1/templates",
            "/v1/templates/check",
            "/v1/templates/{name}",
        ] {
            assert!(paths.contains_key(path), "{path} missing from the OpenAPI document");
        }
        assert!(doc["components"]["schemas"]["Sandbox"]["properties"]["state"].is_object());
    }
}
