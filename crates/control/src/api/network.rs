//! `GET/PUT /v1/sandboxes/{id}/network`: a sandbox's egress policy.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;

use super::{json_body, AppState};
use crate::error::{ApiError, ErrorBody};
use torpor_api::{NetworkPolicy, NetworkStatus};

/// The sandbox's egress policy, whether it is in force, and the addresses its resolver has let
/// it reach.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/network", params(("id" = String, Path)), responses(
    (status = 200, body = NetworkStatus), (status = 404, body = ErrorBody)))]
pub async fn get_network(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<NetworkStatus>, ApiError> {
    Ok(Json(state.manager.network(&id).await?))
}

/// Replaces the egress policy. It is in force when this returns (running or paused sandboxes;
/// a stopped one gets it when it starts), and open connections it denies have been cut.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/network", params(("id" = String, Path)), request_body = NetworkPolicy,
    responses((status = 200, body = NetworkStatus), (status = 400, body = ErrorBody, description = "invalid policy"),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the sandbox is stopping")))]
pub async fn put_network(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<NetworkPolicy>, JsonRejection>,
) -> Result<Json<NetworkStatus>, ApiError> {
    let policy = json_body(body)?;
    let manager = state.manager.clone();
    Ok(Json(super::sandboxes::detached(async move { manager.set_network(&id, policy).await }).await?))
}
