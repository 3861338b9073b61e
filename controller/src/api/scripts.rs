//! NodeScripts over HTTP: the operator stores, lists and reads them under `/api/v1/scripts`;
//! a node fetches the one a task leased to it names, under `/node_api/v1/scripts/{digest}`.
//! The rules are [`crate::service::scripts`].

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::Json;

use super::extract::{path_value, AuthedNode, JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::service::scripts::MAX_ADD_BODY;
use crate::wire::{AddScriptRequest, ErrorBody, Script, ScriptResponse};

/// `POST /api/v1/scripts {"script"}`: stores the script (once, however often it is added).
#[utoipa::path(
    post, path = "/api/v1/scripts", tag = "operator",
    security(("operator_token" = [])),
    request_body = AddScriptRequest,
    responses(
        (status = 200, description = "The stored script: digest, size, when first stored.", body = Script),
        (status = 400, description = "`malformed_json`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 413, description = "`script_too_large` (over 512 KiB), `body_too_large`.", body = ErrorBody),
    )
)]
pub async fn add(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<AddScriptRequest, MAX_ADD_BODY>,
) -> Result<Json<Script>, ApiError> {
    Ok(Json(state.service().add_script(&body.value.script).await?))
}

/// `GET /api/v1/scripts`: every stored script without its text, oldest first.
#[utoipa::path(
    get, path = "/api/v1/scripts", tag = "operator",
    security(("operator_token" = [])),
    responses(
        (status = 200, description = "Every script without its text, oldest first.", body = Vec<Script>),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn list(
    _: Operator,
    State(state): State<AppState>,
) -> Result<Json<Vec<Script>>, ApiError> {
    Ok(Json(state.service().list_scripts().await?))
}

/// `GET /api/v1/scripts/{digest}`: one script with its text.
#[utoipa::path(
    get, path = "/api/v1/scripts/{digest}", tag = "operator",
    security(("operator_token" = [])),
    params(("digest" = String, Path, description = "`sha256:` and 64 lowercase hex digits.")),
    responses(
        (status = 200, description = "The script with its text.", body = Script),
        (status = 400, description = "`invalid_digest`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn show(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Script>, ApiError> {
    let digest = path_value(path)?;
    Ok(Json(state.service().script(&digest).await?))
}

/// `GET /node_api/v1/scripts/{digest}`: the script's text, if a task leased to the calling
/// node names it.
#[utoipa::path(
    get, path = "/node_api/v1/scripts/{digest}", tag = "node",
    security(("node_certificate" = [])),
    params(("digest" = String, Path, description = "`sha256:` and 64 lowercase hex digits.")),
    responses(
        (status = 200, description = "The script's text.", body = ScriptResponse),
        (status = 400, description = "`invalid_digest`.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no task leased to this node names it (or it does not exist).", body = ErrorBody),
    )
)]
pub async fn fetch(
    State(state): State<AppState>,
    authed: AuthedNode,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ScriptResponse>, ApiError> {
    let digest = path_value(path)?;
    Ok(Json(
        state.service().fetch_script(&authed.node, &digest).await?,
    ))
}
