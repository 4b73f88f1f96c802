//! Sandbox lifecycle endpoints.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{json_body, AppState};
use crate::error::{ApiError, ErrorBody};
use torpor_api::{CreateSandbox, GuestInfo, Sandbox, SandboxList, Usage};

/// Runs a lifecycle operation to completion even if the client goes away: axum drops a handler
/// whose connection closes, which would strand the sandbox halfway between two states.
pub(super) async fn detached<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(op).await.unwrap_or_else(|e| Err(ApiError::internal(format!("lifecycle task failed: {e}"))))
}

/// Creates a sandbox and returns once its supervisor answers.
#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox, responses(
    (status = 201, body = Sandbox),
    (status = 400, body = ErrorBody, description = "invalid request"),
    (status = 404, body = ErrorBody, description = "unknown template"),
    (status = 503, body = ErrorBody, description = "the VMM or the guest image is missing"),
    (status = 500, body = ErrorBody, description = "the VM did not boot; the message has the console tail"),
))]
pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let req = crate::model::validate_create(json_body(body)?, &state.manager.cfg)?;
    let manager = state.manager.clone();
    let sandbox = detached(async move { manager.create(req).await }).await?;
    Ok((StatusCode::CREATED, Json(sandbox)))
}

#[utoipa::path(get, path = "/v1/sandboxes", responses((status = 200, body = SandboxList)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<SandboxList>, ApiError> {
    Ok(Json(SandboxList { sandboxes: state.manager.list().await? }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get_one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(state.manager.get(&id).await?))
}

/// Powers the sandbox off cleanly; its disk is kept.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/stop", params(("id" = String, Path)), responses(
    (status = 200, body = Sandbox), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "not running")))]
pub async fn stop(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    let manager = state.manager.clone();
    Ok(Json(detached(async move { manager.stop(&id).await }).await?))
}

/// Removes the sandbox: VM, network, disk and record.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", params(("id" = String, Path)), responses(
    (status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let manager = state.manager.clone();
    detached(async move { manager.delete(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the guest itself reports: uptime, memory, root disk, kernel.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/info", params(("id" = String, Path)), responses(
    (status = 200, body = GuestInfo), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn info(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<GuestInfo>, ApiError> {
    let live = state.manager.running(&id).await?;
    let i = live.guest.info().await.map_err(ApiError::from_guest)?;
    Ok(Json(GuestInfo {
        uptime_secs: i.uptime_secs,
        mem_total_bytes: i.mem_total_bytes,
        mem_available_bytes: i.mem_available_bytes,
        disk_total_bytes: i.disk_total_bytes,
        disk_free_bytes: i.disk_free_bytes,
        kernel: i.kernel,
        hostname: i.hostname,
    }))
}

/// Snapshots the sandbox (memory, devices, disk) and ends its VM process.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", params(("id" = String, Path)), responses(
    (status = 200, body = Sandbox), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "not running"),
    (status = 500, body = ErrorBody, description = "the pause failed; the sandbox keeps running")))]
pub async fn pause(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    let manager = state.manager.clone();
    Ok(Json(detached(async move { manager.pause(&id).await }).await?))
}

/// Restores a paused sandbox exactly as it was.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", params(("id" = String, Path)), responses(
    (status = 200, body = Sandbox), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "not paused"),
    (status = 500, body = ErrorBody, description = "the snapshot was refused (e.g. corrupt); the sandbox stays paused")))]
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    let manager = state.manager.clone();
    Ok(Json(detached(async move { manager.resume(&id).await }).await?))
}

/// Makes sure the sandbox runs: resumes it if paused, does nothing if running.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/connect", params(("id" = String, Path)), responses(
    (status = 200, body = Sandbox), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "stopped or failed")))]
pub async fn connect(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    let manager = state.manager.clone();
    Ok(Json(
        detached(async move {
            manager.running(&id).await?;
            manager.get(&id).await
        })
        .await?,
    ))
}

/// Cold-boots a stopped (or failed) sandbox from its disk.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/start", params(("id" = String, Path)), responses(
    (status = 200, body = Sandbox), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "not stopped or failed")))]
pub async fn start(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Sandbox>, ApiError> {
    let manager = state.manager.clone();
    Ok(Json(detached(async move { manager.start(&id).await }).await?))
}

/// Running time, vCPU and memory use, and bytes stored while paused: what a bill is made of.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/usage", params(("id" = String, Path)), responses(
    (status = 200, body = Usage), (status = 404, body = ErrorBody)))]
pub async fn usage(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Usage>, ApiError> {
    Ok(Json(state.manager.usage(&id).await?))
}
