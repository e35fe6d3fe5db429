//! HTTP reads (SPEC §5): `GET /v1/{org}/{project}/{ns}/snapshot` and `…/keys/{key}` ask
//! a materializer over NATS request-reply (`?min_seq=N` waits until it has applied op
//! N: read-your-writes); `…/ops?since=N&limit=M` reads the log (410 `stale_base` below
//! the compacted floor); `POST /v1/{org}/{project}/cursors` stores a polling client's
//! cursor.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::namespaces::Mode;
use ultrasync_shared::protocol::KeyState;
use ultrasync_shared::reads::{self, ReadError, ReadRequest};
use ultrasync_shared::{ErrorCode, StreamKey, log, validate_key};

use crate::{AppState, TokenQuery, authenticate, http_error};

#[derive(Deserialize)]
pub struct ReadQuery {
    pub(crate) access_token: Option<String>,
    pub(crate) min_seq: Option<u64>,
    pub(crate) since: Option<u64>,
    pub(crate) limit: Option<usize>,
}

/// Most ops one `ops` answer carries.
const MAX_OPS_LIMIT: usize = 1000;

/// A cursor may not be above the head of its stream key (it would hold a state this
/// log never had).
pub async fn check_cursor(
    state: &AppState,
    key: &StreamKey,
    server_seq: u64,
) -> Result<(), (ErrorCode, String)> {
    let head = state.hub.head(key).await.map_err(|e| {
        (
            ErrorCode::Unavailable,
            format!("reading the log failed: {e}"),
        )
    })?;
    if server_seq > head {
        return Err((
            ErrorCode::StaleBase,
            format!(
                "cursor {server_seq} of {} is above the head {head}; resync from a snapshot",
                key.namespace
            ),
        ));
    }
    Ok(())
}

/// A JSON body that did not parse: 413 when it was too big, else 400.
pub(crate) fn body_error(e: axum::extract::rejection::JsonRejection) -> Response {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        http_error(ErrorCode::PayloadTooLarge, e.body_text())
    } else {
        http_error(ErrorCode::InvalidMessage, e.body_text())
    }
}

/// HTTP requests per actor: the socket rate (`max_messages_per_sec`, burst twice
/// that) applies to each token's actor across its HTTP requests on this gateway.
fn rate_limited(state: &AppState, principal: &Principal) -> bool {
    let mut limits = state.http_limits.lock().unwrap_or_else(|p| p.into_inner());
    if limits.len() > 100_000 {
        limits.clear();
    }
    !limits
        .entry(format!("{}/{}", principal.org, principal.actor_id))
        .or_insert_with(|| {
            crate::session::RateLimit::new(state.config.gateway.max_messages_per_sec)
        })
        .take()
}

/// Checks the token and that it may read `org/project/ns`; the stream key.
pub(crate) fn readable(
    state: &AppState,
    headers: &HeaderMap,
    query: &ReadQuery,
    (org, project, ns): (&str, &str, &str),
) -> Result<(Principal, StreamKey), Response> {
    let principal = authenticate(
        state,
        headers,
        &TokenQuery {
            access_token: query.access_token.clone(),
        },
    )?;
    if rate_limited(state, &principal) {
        return Err(http_error(
            ErrorCode::RateLimited,
            "too many requests; slow down",
        ));
    }
    let key = StreamKey::parse(org, project, ns)
        .map_err(|e| http_error(ErrorCode::InvalidId, e.to_string()))?;
    if principal.org != key.org || !principal.allows_project(project) {
        return Err(http_error(
            ErrorCode::Forbidden,
            format!("the token does not cover {org}/{project}"),
        ));
    }
    if !principal.read {
        return Err(http_error(
            ErrorCode::Forbidden,
            "the token lacks the read scope",
        ));
    }
    if !principal.allows_namespace(ns) {
        return Err(http_error(
            ErrorCode::Forbidden,
            format!("the token does not cover namespace {ns}"),
        ));
    }
    match state.namespaces.get(ns) {
        None => Err(http_error(
            ErrorCode::UnknownNamespace,
            format!("unknown namespace {ns}"),
        )),
        Some(spec) if spec.mode == Mode::Ephemeral => Err(http_error(
            ErrorCode::UnknownNamespace,
            format!("{ns} is ephemeral: it has no stored state"),
        )),
        Some(_) => {
            state
                .hooks
                .authorize(&principal, &key, crate::hooks::Access::Read)
                .map_err(|e| http_error(e.code, e.message))?;
            Ok((principal, key))
        }
    }
}

fn read_error(e: ReadError) -> Response {
    match e {
        ReadError::NoResponders => http_error(
            ErrorCode::Unavailable,
            "no materializer is serving reads; retry later",
        ),
        ReadError::Timeout => http_error(ErrorCode::Unavailable, "the read timed out; retry"),
        ReadError::Refused { code, message } => http_error(code, message),
        other => http_error(ErrorCode::Unavailable, other.to_string()),
    }
}

#[utoipa::path(
    get,
    path = "/v1/{org}/{project}/{ns}/snapshot",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("min_seq" = Option<u64>, Query)),
    responses((status = 200, body = crate::openapi::SnapshotBody), (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)),
    description = "The namespace's state (bootstrap), from a materializer."
)]
pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ReadQuery>,
) -> Response {
    let key = match readable(&state, &headers, &query, (&org, &project, &ns)) {
        Ok((_, key)) => key,
        Err(r) => return r,
    };
    let req = ReadRequest {
        min_seq: query.min_seq,
        ..Default::default()
    };
    let snapshot = match reads::snapshot(&state.nats, &key, &req).await {
        Ok(s) => s,
        // Too big for one NATS message: the stored snapshot (older, but sound; the
        // client reads the ops after `last_server_seq`).
        Err(ReadError::Refused {
            code: ErrorCode::PayloadTooLarge,
            ..
        }) => match state.hub.snapshot(&key).await {
            Ok(Some(s)) => s,
            Ok(None) => return http_error(ErrorCode::Unavailable, "no snapshot stored yet"),
            Err(e) => return http_error(ErrorCode::Unavailable, e),
        },
        Err(e) => return read_error(e),
    };
    let body: BTreeMap<String, KeyState> = snapshot
        .state
        .keys
        .iter()
        .map(|(k, e)| (k.clone(), KeyState::from_entry(e)))
        .collect();
    Json(serde_json::json!({
        "last_server_seq": snapshot.state.last_seq,
        "state": body,
        "digest": snapshot.digest(),
    }))
    .into_response()
}

#[utoipa::path(
    get,
    path = "/v1/{org}/{project}/{ns}/keys/{key}",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("key" = String, Path), ("min_seq" = Option<u64>, Query)),
    responses((status = 200, body = crate::openapi::KeyBody, headers(("ETag" = String))), (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)),
    description = "One key; ETag is its version."
)]
pub async fn key(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ReadQuery>,
) -> Response {
    let key = match readable(&state, &headers, &query, (&org, &project, &ns)) {
        Ok((_, key)) => key,
        Err(r) => return r,
    };
    if let Err(e) = validate_key(&name) {
        return http_error(ErrorCode::InvalidKey, e.to_string());
    }
    let reply = match reads::key(&state.nats, &key, &name, query.min_seq).await {
        Ok(r) => r,
        Err(e) => return read_error(e),
    };
    let Some(value) = reply.value else {
        return http_error(
            ErrorCode::NotFound,
            format!(
                "{name} does not exist in {ns} (as of server_seq {})",
                reply.last_server_seq
            ),
        );
    };
    let mut resp = Json(serde_json::json!({
        "value": value,
        "version": reply.version,
        "heads": reply.heads,
        "last_server_seq": reply.last_server_seq,
    }))
    .into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", reply.version)) {
        resp.headers_mut().insert(header::ETAG, etag);
    }
    resp
}

#[utoipa::path(
    get,
    path = "/v1/{org}/{project}/{ns}/ops",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("since" = Option<u64>, Query), ("limit" = Option<usize>, Query)),
    responses((status = 200, body = crate::openapi::OpsPage), (status = 410, body = crate::openapi::ErrorBody), (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)),
    description = "Ops after `since`, at most `limit`; 410 stale_base below the compacted floor."
)]
pub async fn ops(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ReadQuery>,
) -> Response {
    let key = match readable(&state, &headers, &query, (&org, &project, &ns)) {
        Ok((_, key)) => key,
        Err(r) => return r,
    };
    let since = query.since.unwrap_or(0);
    let limit = query.limit.unwrap_or(500).min(MAX_OPS_LIMIT);
    let subject = ultrasync_shared::nats::ops_subject(&key);
    let ops_stream = state.hub.ops_stream();
    let head = match log::head(ops_stream, &subject).await {
        Ok(h) => h.map_or(0, |h| h.server_seq),
        Err(e) => return http_error(ErrorCode::Unavailable, format!("reading the log: {e}")),
    };
    if since > head {
        return http_error(
            ErrorCode::StaleBase,
            format!("since={since} is above the head {head}; resync from the snapshot"),
        );
    }
    if limit == 0 {
        // Just the head (e.g. to follow from now on).
        return Json(serde_json::json!({
            "ops": [], "last_server_seq": since, "more": since < head, "head": head,
        }))
        .into_response();
    }
    let to = head.min(since + limit as u64);
    let entries = match log::read_range(ops_stream, &subject, since + 1, to).await {
        Ok(e) => e,
        Err(e) => return http_error(ErrorCode::Unavailable, format!("reading the log: {e}")),
    };
    if since < to && entries.first().map(|e| e.server_seq) != Some(since + 1) {
        return http_error(
            ErrorCode::StaleBase,
            format!(
                "ops after {since} of {ns} are compacted (oldest is {}); GET the snapshot and read from its last_server_seq",
                entries
                    .first()
                    .map_or("gone".to_owned(), |e| e.server_seq.to_string())
            ),
        );
    }
    // Contiguous ops only, each as stored.
    let mut last = since;
    let mut body = String::from("{\"ops\":[");
    for e in &entries {
        if e.server_seq != last + 1 {
            break;
        }
        if last > since {
            body.push(',');
        }
        body.push_str(&String::from_utf8_lossy(&e.payload));
        last = e.server_seq;
    }
    body.push_str(&format!(
        "],\"last_server_seq\":{last},\"more\":{},\"head\":{head}}}",
        last < head
    ));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct CursorBody {
    client_id: String,
    namespace: String,
    server_seq: u64,
}

#[utoipa::path(
    post,
    path = "/v1/{org}/{project}/cursors",
    params(("org" = String, Path), ("project" = String, Path)),
    request_body = CursorBody,
    responses((status = 200, body = crate::openapi::OkBody), (status = 410, body = crate::openapi::ErrorBody), (status = 400, body = crate::openapi::ErrorBody), (status = 401, body = crate::openapi::ErrorBody), (status = 403, body = crate::openapi::ErrorBody), (status = 404, body = crate::openapi::ErrorBody), (status = 503, body = crate::openapi::ErrorBody)),
    description = "A polling client's cursor: it has applied everything up to server_seq."
)]
pub async fn cursor(
    State(state): State<Arc<AppState>>,
    Path((org, project)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<ReadQuery>,
    body: Result<Json<CursorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let key = match readable(&state, &headers, &query, (&org, &project, &body.namespace)) {
        Ok((_, key)) => key,
        Err(r) => return r,
    };
    if let Err(e) = ultrasync_shared::Id::parse("client_id", &body.client_id) {
        return http_error(ErrorCode::InvalidId, e.to_string());
    }
    if let Err((code, message)) = check_cursor(&state, &key, body.server_seq).await {
        return http_error(code, message);
    }
    state.cursors.record(&key, &body.client_id, body.server_seq);
    Json(serde_json::json!({"ok": true})).into_response()
}
