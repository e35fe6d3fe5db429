//! The HTTP door (SPEC §5): reads ([`reads`]), writes ([`writes`]), the operator
//! endpoints ([`status`]); [`schema`] has the bodies' shapes for the OpenAPI
//! document. It only speaks HTTP; what a request may do is decided in `rules`. Every error, including those
//! of axum's own extractors and unknown routes, leaves in the `{"error": {...}}`
//! envelope.

pub(crate) mod reads;
pub(crate) mod schema;
pub(crate) mod status;
pub(crate) mod writes;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::{ErrorCode, Id, StreamKey};

use crate::AppState;
use crate::rules::access::{self, Access};
use crate::rules::auth::{self, Door};
use crate::rules::error_response;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/status", get(status::status))
        .route("/v1/{org}/{project}/{ns}/snapshot", get(reads::snapshot))
        .route(
            "/v1/{org}/{project}/{ns}/keys/{key}",
            get(reads::key)
                .put(writes::put_key)
                .delete(writes::delete_key),
        )
        .route(
            "/v1/{org}/{project}/{ns}/keys/{key}/history",
            get(writes::history),
        )
        .route("/v1/{org}/{project}/{ns}/commands", post(writes::commands))
        .route("/v1/{org}/{project}/{ns}/ops", get(reads::ops))
        .route("/v1/{org}/{project}/cursors", post(reads::cursor))
        .route("/metrics", get(status::prometheus))
        .route("/healthz", get(status::healthz))
        .route("/readyz", get(status::readyz))
}

/// The query parameters of the API (each route reads the ones it knows).
#[derive(Deserialize, Default)]
pub struct ApiQuery {
    /// Refused here (WebSocket routes only); kept to say so.
    pub(crate) access_token: Option<String>,
    pub(crate) min_seq: Option<u64>,
    pub(crate) since: Option<u64>,
    pub(crate) limit: Option<usize>,
    /// A polling client's id: `GET …/ops?since=N&client_id=X` records X's cursor at N.
    pub(crate) client_id: Option<String>,
}

/// The caller of an HTTP request, within its request budget.
pub(crate) fn caller(
    state: &AppState,
    headers: &HeaderMap,
    query: &ApiQuery,
) -> Result<Principal, Response> {
    let principal = auth::authenticate(state, Door::Http, headers, query.access_token.as_deref())
        .map_err(IntoResponse::into_response)?;
    auth::connect_request(state, &principal, headers).map_err(IntoResponse::into_response)?;
    state
        .budgets
        .request(&principal)
        .map_err(IntoResponse::into_response)?;
    Ok(principal)
}

/// The caller and the stream key of `org/project/ns`, for `access`. Ephemeral
/// namespaces have no stored state: not found over HTTP.
pub(crate) fn resolve(
    state: &AppState,
    headers: &HeaderMap,
    query: &ApiQuery,
    (org, project, ns): (&str, &str, &str),
    access: Access,
) -> Result<(Principal, StreamKey), Response> {
    let principal = caller(state, headers, query)?;
    let ids = (Id::parse("org", org), Id::parse("project", project));
    let (Ok(org), Ok(project)) = ids else {
        return Err(error_response(
            ErrorCode::InvalidId,
            "org and project must match [A-Za-z0-9_-]{1,64}",
        ));
    };
    let key = access::stream_key(state, &principal, (&org, &project, ns), access)
        .map_err(IntoResponse::into_response)?;
    if access::mode(state, ns) == Some(ultrasync_shared::namespaces::Mode::Ephemeral) {
        return Err(error_response(
            ErrorCode::UnknownNamespace,
            format!("{ns} is ephemeral: it has no stored state"),
        ));
    }
    Ok((principal, key))
}

/// A JSON body that did not parse: 413 when it was too big, else 400.
pub(crate) fn body_error(e: axum::extract::rejection::JsonRejection) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error_response(ErrorCode::PayloadTooLarge, e.body_text())
    } else {
        error_response(ErrorCode::InvalidMessage, e.body_text())
    }
}

/// Puts every error answer that is not already JSON (axum's extractor rejections —
/// a bad `?since=`, a path segment that is not UTF-8 —, 404 for an unknown route,
/// 405, timeouts) in the error envelope, with the code its status stands for.
pub async fn envelope(State(_): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::PreconditionFailed,
        413 => ErrorCode::PayloadTooLarge,
        429 => ErrorCode::RateLimited,
        408 | 502..=504 => ErrorCode::Unavailable,
        500..=599 => ErrorCode::Internal,
        _ => ErrorCode::InvalidMessage,
    };
    // The rejection texts are short; anything longer is cut.
    let body = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let message = match body.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        text => text.to_owned(),
    };
    let mut out = error_response(code, message);
    *out.status_mut() = status;
    out
}

/// Answers a request that took longer than `request_timeout_secs` with 503.
pub async fn deadline(
    State(state): State<Arc<AppState>>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let limit = std::time::Duration::from_secs(state.config.gateway.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => error_response(
            ErrorCode::Unavailable,
            format!("the request took longer than {}s; retry", limit.as_secs()),
        ),
    }
}
