//! The API a sandbox reaches from inside: served on its gateway address (`$TORPOR_URL`), in its
//! own network namespace and nowhere else, so which sandbox is calling is known from the
//! listener, never from anything the guest sends.
//!
//! It is a router of its own, not the operator's: a guest may read its own record, usage and
//! egress policy, the key that signs device tokens, and use the model proxy. Nothing here
//! changes a policy, a limit, a grant, a template, a lifecycle state or another sandbox; those
//! routes do not exist on this listener, whatever token is presented.
//!
//! Everything the guest sends is bounded before any work is done for it: connections per
//! sandbox, time to send a request head (from the first byte of a connection, and between
//! requests on a kept-alive one), and body sizes. Only HTTP/1.1 is served: what guests use
//! (SDKs, curl), and no streams multiplexed past the connection cap.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::manager::Manager;
use torpor_api::{NetworkStatus, Sandbox, Usage};

/// Marks requests that arrived on a sandbox's own endpoint, inside its namespace.
#[derive(Clone)]
pub struct FromSandbox(pub String);

/// Connections one sandbox may hold open to its endpoint; more are closed as they arrive (the
/// namespace's firewall resets them before that, see `torpor_net`; this is the second line).
pub const MAX_CONNECTIONS: usize = torpor_net::GUEST_API_CONNECTIONS;
/// A connection that has not sent a whole request head within this is closed (idle keep-alive
/// connections too: the next head is awaited just the same).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies of the sandbox's own routes (all reads); the model proxy sets its own limit.
const MAX_BODY: usize = 64 << 10;

/// The routes served to every sandbox (the model proxy's among them). `FromSandbox` is added
/// per listener by `serve`.
pub fn router(manager: Arc<Manager>) -> Router {
    let own = Router::new()
        .route("/v1/sandboxes/{id}", get(own_record))
        .route("/v1/sandboxes/{id}/usage", get(own_usage))
        .route("/v1/sandboxes/{id}/network", get(own_network))
        .layer(axum::middleware::from_fn_with_state(manager.clone(), device_token))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let public = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/.well-known/jwks.json", get(jwks))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    public.merge(own).with_state(manager.clone()).merge(crate::proxy::router(manager)).fallback(
        |req: Request| async move {
            ApiError::not_found(format!(
                "{} {} is not part of the API sandboxes reach (read your own record, usage and network; the \
                 model proxy)",
                req.method(),
                req.uri().path()
            ))
        },
    )
}

/// The sandbox's device token (`$TORPOR_TOKEN`), issued to this very sandbox.
async fn device_token(
    State(manager): State<Arc<Manager>>,
    Extension(FromSandbox(own)): Extension<FromSandbox>,
    req: Request,
    next: Next,
) -> Response {
    match manager.tokens.verify(crate::api::bearer(req.headers())) {
        Ok(claims) if claims.sub == own => next.run(req).await,
        Ok(claims) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!("the device token of sandbox {} is not this sandbox's ({own})", claims.sub),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing, expired or wrong device token (Authorization: Bearer $TORPOR_TOKEN)",
        )
        .into_response(),
    }
}

fn only_own(id: &str, own: &str) -> Result<(), ApiError> {
    if id == own {
        Ok(())
    } else {
        Err(ApiError::new(StatusCode::FORBIDDEN, format!("a sandbox reads only its own record ({own}), not {id}")))
    }
}

async fn own_record(
    State(manager): State<Arc<Manager>>,
    Extension(FromSandbox(own)): Extension<FromSandbox>,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    only_own(&id, &own)?;
    Ok(Json(manager.get(&own).await?))
}

async fn own_usage(
    State(manager): State<Arc<Manager>>,
    Extension(FromSandbox(own)): Extension<FromSandbox>,
    Path(id): Path<String>,
) -> Result<Json<Usage>, ApiError> {
    only_own(&id, &own)?;
    Ok(Json(manager.usage(&own).await?))
}

async fn own_network(
    State(manager): State<Arc<Manager>>,
    Extension(FromSandbox(own)): Extension<FromSandbox>,
    Path(id): Path<String>,
) -> Result<Json<NetworkStatus>, ApiError> {
    only_own(&id, &own)?;
    Ok(Json(manager.network(&own).await?))
}

async fn health(State(manager): State<Arc<Manager>>) -> Json<torpor_api::Health> {
    Json(crate::api::health_of(&manager))
}

async fn jwks(State(manager): State<Arc<Manager>>) -> Json<jsonwebtoken::jwk::JwkSet> {
    Json(manager.tokens.jwks())
}

/// Serves `router` to sandbox `id` on `listener` until `stop`; open connections are then shut
/// down gracefully. At most `MAX_CONNECTIONS` at once: further ones are closed on accept.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, id: String, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let router = router.layer(Extension(FromSandbox(id.clone())));
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(%id, error = %e, "accepting a connection on the sandbox API");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%id, "sandbox API connection refused: {MAX_CONNECTIONS} open already");
            continue;
        };
        let service = router.clone().layer(Extension(axum::extract::ConnectInfo(peer)));
        let service = hyper_util::service::TowerToHyperService::new(service);
        let (builder, stop) = (builder.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
                }
            }
        });
    }
}
