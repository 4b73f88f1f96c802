//! The operator's REST API (axum). Every route except the few in `public_routes` needs
//! `Authorization: Bearer <api key>`. Sandboxes never reach it; theirs is `guest_api`.

mod channels;
mod exec;
mod files;
mod network;
mod sandboxes;
mod templates;

use std::sync::Arc;
use torpor_api::Health;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ErrorBody, ErrorDetail};
use crate::manager::Manager;

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    pub api_key: Arc<String>,
    pub auth_failures: Arc<AuthFailures>,
    pub relay: Arc<crate::relay::Relay>,
}

/// Failed authentications per client address: past `AUTH_FAILURES_ALLOWED` within
/// `AUTH_WINDOW`, further failures from that address are answered 429 instead of 401. The right
/// key is always accepted, from any address, so nobody can lock the operator out by failing on
/// purpose; keys are 256 random bits, so the limit is about noise, not guessing.
#[derive(Default)]
pub struct AuthFailures(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>);

const AUTH_FAILURES_ALLOWED: u32 = 10;
const AUTH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses tracked at once; past that the table is cleared (it only ever slows failures).
const AUTH_CLIENTS_TRACKED: usize = 10_000;

impl AuthFailures {
    /// Counts a failure; returns the seconds until `client` is allowed to fail quietly again if
    /// it is past its allowance.
    fn failed(&self, client: std::net::IpAddr) -> Option<u64> {
        let mut table = self.0.lock().expect("auth table poisoned");
        table.retain(|_, (_, since)| since.elapsed() < AUTH_WINDOW);
        if table.len() >= AUTH_CLIENTS_TRACKED {
            table.clear();
        }
        let (count, since) = table.entry(client).or_insert((0, std::time::Instant::now()));
        *count += 1;
        let left = AUTH_WINDOW.checked_sub(since.elapsed())?;
        (*count > AUTH_FAILURES_ALLOWED).then(|| left.as_secs().max(1))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Torpor API", description = "microVM sandboxes for AI agents"),
    components(schemas(torpor_api::State, ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

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

/// Routes anyone may call: health, the token-signing key, this document, and the webhooks
/// Telegram and Slack call (they prove themselves with the channel's secrets).
fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(jwks))
        .routes(routes!(openapi_json))
        .routes(routes!(channels::telegram))
        .routes(routes!(channels::slack))
}

/// Every route that needs the API key. The router and the OpenAPI document are both made from
/// this one list, so neither has a route the other lacks (the route tests rely on it).
fn operator_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(sandboxes::create, sandboxes::list))
        .routes(routes!(sandboxes::get_one, sandboxes::delete))
        .routes(routes!(sandboxes::stop))
        .routes(routes!(sandboxes::info))
        .routes(routes!(sandboxes::pause))
        .routes(routes!(sandboxes::resume))
        .routes(routes!(sandboxes::connect))
        .routes(routes!(sandboxes::start))
        .routes(routes!(sandboxes::usage))
        .routes(routes!(network::get_network, network::put_network))
        .routes(routes!(exec::exec_post))
        .routes(routes!(exec::exec_ws))
        .routes(routes!(exec::signal))
        .routes(routes!(files::download, files::upload))
        .routes(routes!(channels::agent_status))
        .routes(routes!(channels::agent_cancel))
        .routes(routes!(templates::create, templates::list))
        .routes(routes!(templates::check))
        .routes(routes!(templates::delete))
        .routes(routes!(channels::create, channels::list))
        .routes(routes!(channels::get_one, channels::delete))
        .routes(routes!(channels::message))
}

/// The OpenAPI document of the operator API, as served at `/v1/openapi.json`.
pub fn openapi() -> &'static utoipa::openapi::OpenApi {
    static DOC: std::sync::LazyLock<utoipa::openapi::OpenApi> = std::sync::LazyLock::new(|| {
        OpenApiRouter::with_openapi(ApiDoc::openapi())
            .merge(public_routes())
            .merge(operator_routes())
            .split_for_parts()
            .1
    });
    &DOC
}

/// The operator API, served on the daemon's own listener. Guests never reach it: they have
/// their own router (`guest_api`), inside their namespace.
pub fn router(state: AppState) -> Router {
    let (public, _) = public_routes().split_for_parts();
    let (operator, _) = operator_routes().split_for_parts();
    // `layer`, not `route_layer`: a method a route does not have is refused to a caller without
    // the key too, so nothing about the API is learnt without it.
    let operator = operator.layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key));
    public.merge(operator).fallback(|| async { ApiError::not_found("no such endpoint") }).with_state(state)
}

/// Liveness of the daemon itself; needs no API key.
#[utoipa::path(get, path = "/v1/health", security(()), responses((status = 200, body = Health)))]
async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(health_of(&state.manager))
}

pub(crate) fn health_of(manager: &Manager) -> Health {
    Health { status: "ok".into(), version: env!("CARGO_PKG_VERSION").into(), accelerator: manager.accelerator() }
}

/// The public key that signs device tokens (JWKS), for anyone who checks them.
#[utoipa::path(get, path = "/v1/.well-known/jwks.json", security(()), responses((status = 200, description = "a JWK set")))]
async fn jwks(State(state): State<AppState>) -> Json<jsonwebtoken::jwk::JwkSet> {
    Json(state.manager.tokens.jwks())
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", security(()), responses((status = 200, description = "OpenAPI 3.1")))]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// The token of an `Authorization: Bearer …` header; empty if there is none.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> &str {
    headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("")
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = bearer(req.headers());
    if bool::from(given.as_bytes().ct_eq(state.api_key.as_bytes())) {
        return next.run(req).await;
    }
    if state.manager.tokens.verify(given).is_ok() {
        // A device token is a sandbox's, and sandboxes have an API of their own: it changes
        // nothing here, whatever route it is presented to.
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "a device token is accepted only by the sandbox's own API ($TORPOR_URL inside the sandbox), not by the \
             operator API",
        )
        .into_response();
    }
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    match state.auth_failures.failed(client) {
        Some(secs) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from {client}; wrong keys are refused for {secs} s more"),
        )
        .into_response(),
        None => ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)")
            .into_response(),
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
pub(crate) mod tests;
