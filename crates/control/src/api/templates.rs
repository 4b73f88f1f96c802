//! Template endpoints.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{json_body, AppState};
use crate::error::{ApiError, ErrorBody};
use crate::manager::Manager;
use crate::model::TemplateDefaults;
use torpor_api::{CreateTemplate, Template, TemplateList};

/// Captures a running sandbox (created with `cold_boot`) as a template: it is paused and its
/// snapshot and disk become the template; the sandbox itself is removed.
#[utoipa::path(post, path = "/v1/templates", request_body = CreateTemplate, responses(
    (status = 201, body = Template), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "the sandbox is not running, or was itself restored from a template")))]
pub async fn create(
    State(state): State<AppState>,
    body: Result<Json<CreateTemplate>, JsonRejection>,
) -> Result<(StatusCode, Json<Template>), ApiError> {
    let req = json_body(body)?;
    if req.sandbox.is_empty() {
        return Err(ApiError::invalid("sandbox: the id of the running sandbox to capture is required"));
    }
    let manager = state.manager.clone();
    let defaults = defaults(&req, &manager)?;
    let t = tokio::spawn(async move { manager.capture(&req.name, &req.sandbox, defaults).await })
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("capture task failed: {e}"))))?;
    Ok((StatusCode::CREATED, Json(Manager::to_api_template(&t))))
}

/// Checks a template's name and defaults (network, secrets, grants, agent) as a capture would,
/// without capturing anything: `torpor template build` asks before it boots its build VM, so a
/// mistake fails in a second rather than after the build.
#[utoipa::path(post, path = "/v1/templates/check", request_body = CreateTemplate, responses(
    (status = 204, description = "a capture would accept these defaults"), (status = 400, body = ErrorBody)))]
pub async fn check(
    State(state): State<AppState>,
    body: Result<Json<CreateTemplate>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let req = json_body(body)?;
    let defaults = defaults(&req, &state.manager)?;
    state.manager.check_template(&req.name, &defaults)?;
    Ok(StatusCode::NO_CONTENT)
}

fn defaults(req: &CreateTemplate, manager: &Manager) -> Result<TemplateDefaults, ApiError> {
    let cfg = &manager.cfg;
    Ok(TemplateDefaults {
        processes: req.processes.clone(),
        network: req.network.clone().unwrap_or_default(),
        secrets: req.secrets.clone(),
        github: req.github.clone().map(|g| crate::model::github_grant(g, cfg)).transpose()?,
        // Checked now, kept as given: omitted providers and budget mean the daemon's at each
        // create, so a provider configured after the build reaches the template's sandboxes.
        models: req.models.clone().map(|m| crate::model::model_grant(m.clone(), cfg).map(|_| m)).transpose()?,
        agent: req.agent.clone().map(|a| a.validate().map(|()| a)).transpose()?,
    })
}

#[utoipa::path(get, path = "/v1/templates", responses((status = 200, body = TemplateList)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<TemplateList>, ApiError> {
    Ok(Json(TemplateList { templates: state.manager.list_templates().await? }))
}

/// Removes a template no sandbox depends on any more.
#[utoipa::path(delete, path = "/v1/templates/{name}", params(("name" = String, Path)), responses(
    (status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "in use")))]
pub async fn delete(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    state.manager.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
