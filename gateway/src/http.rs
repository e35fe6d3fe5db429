//! HTTP reads of materialized state (SPEC §5): `GET /v1/{org}/{project}/{ns}/snapshot`
//! and `GET /v1/{org}/{project}/{ns}/keys/{key}`. Both ask a materializer over NATS
//! request-reply; `?min_seq=N` waits until it has applied op N (read-your-writes).

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
use ultrasync_shared::{ErrorCode, StreamKey, validate_key};

use crate::{AppState, TokenQuery, authenticate, http_error};

#[derive(Deserialize)]
pub struct ReadQuery {
    access_token: Option<String>,
    min_seq: Option<u64>,
}

/// Checks the token and that it may read `org/project/ns`; the stream key.
fn readable(
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
        Some(_) => Ok((principal, key)),
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
