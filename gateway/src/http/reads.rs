//! HTTP reads (SPEC §5): `GET /v1/{org}/{project}/{ns}/snapshot` and `…/keys/{key}` ask
//! a materializer over NATS request-reply (`?min_seq=N` waits until it has applied op
//! N: read-your-writes); `…/ops?since=N&limit=M` reads the log (410 `stale_base` below
//! the compacted floor); `POST /v1/{org}/{project}/cursors` stores a polling client's
//! cursor.
//!
//! The snapshot answer is streamed (chunked), encoded one part at a time as the
//! connection takes it. With `Accept: application/x-ndjson` it is the stored snapshot
//! as lines, each a `snapshot` frame as on the WebSocket with its `checkpoint`; with
//! `?checkpoint=` either form continues after that checkpoint, or answers 410
//! `stale_base` when the snapshot it names was replaced.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::Deserialize;
use ultrasync_shared::protocol::{Checkpoint, SnapshotParts};
use ultrasync_shared::reads::{self, ReadError, ReadRequest};
use ultrasync_shared::snapshot::Snapshot;
use ultrasync_shared::{ErrorCode, StreamKey, log, validate_key};

use super::{ApiQuery, body_error, resolve};
use crate::AppState;
use crate::rules::access::Access;
use crate::rules::{Refusal, commands, error_response};

/// Most ops one `ops` answer carries.
const MAX_OPS_LIMIT: usize = 1000;

/// `?min_seq=N` above the head of the log cannot be waited for (no write the caller
/// saw is that far): answered at once instead of parking a request and a
/// materializer task. A replica region's mirror may trail the home region by a
/// little, so there the materializer waits as usual.
async fn check_min_seq(
    state: &AppState,
    key: &StreamKey,
    min_seq: Option<u64>,
) -> Result<(), Response> {
    let Some(min_seq) = min_seq else {
        return Ok(());
    };
    if state.config.region.is_replica() {
        return Ok(());
    }
    let head = state
        .hub
        .head(key)
        .await
        .map_err(|e| Refusal::unavailable("reading the log", e).into_response())?;
    if min_seq > head {
        return Err(error_response(
            ErrorCode::InvalidMessage,
            format!(
                "min_seq {min_seq} is above the head {head} of {}",
                key.namespace
            ),
        ));
    }
    Ok(())
}

fn read_error(e: ReadError) -> Response {
    match e {
        ReadError::NoResponders => error_response(
            ErrorCode::Unavailable,
            "no materializer is serving reads; retry later",
        ),
        ReadError::Timeout => error_response(ErrorCode::Unavailable, "the read timed out; retry"),
        ReadError::Refused { code, message } => error_response(code, message),
        other => Refusal::unavailable("a materializer read", other).into_response(),
    }
}

/// About how much state one part of a streamed snapshot carries.
const SNAPSHOT_PART_BYTES: usize = 512 * 1024;

/// `GET …/snapshot`'s own query parameter.
#[derive(Deserialize, Default)]
pub struct SnapshotQuery {
    /// Continue after this checkpoint (from an NDJSON line of an earlier answer).
    checkpoint: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/{org}/{project}/{ns}/snapshot",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("min_seq" = Option<u64>, Query), ("checkpoint" = Option<String>, Query, description = "continue an interrupted transfer after this checkpoint (410 stale_base when its snapshot was replaced)")),
    responses((status = 200, body = super::schema::SnapshotBody, description = "streamed; with Accept: application/x-ndjson, lines of snapshot frames with checkpoints"), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 410, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "The namespace's state (bootstrap), streamed; resumable with checkpoints."
)]
pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
    Query(snapshot_query): Query<SnapshotQuery>,
) -> Response {
    let key = match resolve(
        &state,
        &headers,
        &query,
        (&org, &project, &ns),
        Access::Read,
    ) {
        Ok((_, key)) => key,
        Err(r) => return r,
    };
    if let Err(r) = check_min_seq(&state, &key, query.min_seq).await {
        return r;
    }
    let checkpoint = match snapshot_query.checkpoint.as_deref() {
        None => None,
        Some(text) => match Checkpoint::decode(text, &key) {
            Ok(cp) => Some(cp),
            Err(e) => return error_response(ErrorCode::InvalidMessage, e.to_string()),
        },
    };
    let lines = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/x-ndjson"));
    // A transfer that may be continued is of the stored snapshot: a checkpoint can
    // name it again later (until it is replaced).
    let stored = match (lines || checkpoint.is_some(), query.min_seq) {
        (false, _) => None,
        (true, min_seq) => match state.hub.snapshot(&key).await {
            Ok(s) => s.filter(|s| min_seq.is_none_or(|m| s.state.last_seq >= m)),
            Err(e) => return Refusal::unavailable("reading the snapshot", e).into_response(),
        },
    };
    let snapshot = match stored {
        Some(s) => s,
        None if checkpoint.is_some() => return replaced(&key),
        None => match fresh_snapshot(&state, &key, query.min_seq).await {
            Ok(s) => s,
            Err(r) => return r,
        },
    };
    let parts = SnapshotParts::new(
        Arc::new(snapshot),
        checkpoint.as_ref().and_then(|c| c.after.clone()),
    );
    if let Some(cp) = &checkpoint
        && !cp.names(parts.snapshot(), parts.digest())
    {
        return replaced(&key);
    }
    let (body, content_type) = match lines {
        true => (ndjson_body(parts, ns), "application/x-ndjson"),
        false => (json_body(parts), "application/json"),
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// 410 `stale_base`: the checkpoint's snapshot is gone; start over without it.
fn replaced(key: &StreamKey) -> Response {
    error_response(
        ErrorCode::StaleBase,
        format!(
            "the snapshot of {} that the checkpoint names was replaced; start over without a checkpoint",
            key.namespace
        ),
    )
}

/// The newest state a materializer has (at least `min_seq`), else the stored
/// snapshot when the state is too big for one NATS message.
async fn fresh_snapshot(
    state: &AppState,
    key: &StreamKey,
    min_seq: Option<u64>,
) -> Result<Snapshot, Response> {
    let req = ReadRequest {
        min_seq,
        ..Default::default()
    };
    match reads::snapshot(&state.nats, key, &req).await {
        Ok(s) => Ok(s),
        // Too big for one NATS message: the stored snapshot (older, but sound; the
        // client reads the ops after `last_server_seq`).
        Err(ReadError::Refused {
            code: ErrorCode::PayloadTooLarge,
            ..
        }) => match state.hub.snapshot(key).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(error_response(
                ErrorCode::Unavailable,
                "no snapshot stored yet",
            )),
            Err(e) => Err(Refusal::unavailable("reading the snapshot", e).into_response()),
        },
        Err(e) => Err(read_error(e)),
    }
}

/// Lines of `snapshot` frames, each encoded when the connection takes the previous.
fn ndjson_body(parts: SnapshotParts, namespace: String) -> Body {
    let lines = futures::stream::unfold((parts, namespace), |(mut parts, ns)| async move {
        let frame = parts.next_frame(&ns, SNAPSHOT_PART_BYTES)?;
        let mut line = frame.encode().into_bytes();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
            (parts, ns),
        ))
    });
    Body::from_stream(lines)
}

/// `{last_server_seq, digest, state}` as one JSON object, its `state` encoded one
/// part at a time.
fn json_body(parts: SnapshotParts) -> Body {
    let head = format!(
        r#"{{"last_server_seq":{},"digest":{},"state":{{"#,
        parts.snapshot().state.last_seq,
        serde_json::Value::from(parts.digest())
    );
    let state = futures::stream::unfold((parts, true), |(mut parts, first)| async move {
        let (part, _, _) = parts.next_part(SNAPSHOT_PART_BYTES)?;
        let mut chunk = Vec::new();
        for (i, (k, v)) in part.iter().enumerate() {
            if !(first && i == 0) {
                chunk.push(b',');
            }
            let _ = serde_json::to_writer(&mut chunk, k);
            chunk.push(b':');
            let _ = serde_json::to_writer(&mut chunk, v);
        }
        let first = first && part.is_empty();
        Some((bytes::Bytes::from(chunk), (parts, first)))
    });
    let all = futures::stream::once(async move { bytes::Bytes::from(head) })
        .chain(state)
        .chain(futures::stream::once(async {
            bytes::Bytes::from_static(b"}}")
        }))
        .map(Ok::<_, std::convert::Infallible>);
    Body::from_stream(all)
}

#[utoipa::path(
    get,
    path = "/v1/{org}/{project}/{ns}/keys/{key}",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("key" = String, Path), ("min_seq" = Option<u64>, Query)),
    responses((status = 200, body = super::schema::KeyBody, headers(("ETag" = String))), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "One key; ETag is its version."
)]
pub async fn key(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns, name)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
) -> Response {
    let key = match resolve(
        &state,
        &headers,
        &query,
        (&org, &project, &ns),
        Access::Read,
    ) {
        Ok((_, key)) => key,
        Err(r) => return r,
    };
    if let Err(e) = validate_key(&name) {
        return error_response(ErrorCode::InvalidKey, e.to_string());
    }
    if let Err(r) = check_min_seq(&state, &key, query.min_seq).await {
        return r;
    }
    let reply = match reads::key(&state.nats, &key, &name, query.min_seq).await {
        Ok(r) => r,
        Err(e) => return read_error(e),
    };
    let Some(value) = reply.value else {
        return error_response(
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
    responses((status = 200, body = super::schema::OpsPage), (status = 410, body = super::schema::ErrorBody), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "Ops after `since`, at most `limit`; 410 stale_base below the compacted floor."
)]
pub async fn ops(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
) -> Response {
    let (principal, key) = match resolve(
        &state,
        &headers,
        &query,
        (&org, &project, &ns),
        Access::Read,
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let since = query.since.unwrap_or(0);
    // A polling client that names itself holds the log at what it has (seed 001:
    // cursors on every pull), like a cursor report.
    if let Some(client_id) = &query.client_id {
        if let Err(e) = ultrasync_shared::Id::parse("client_id", client_id) {
            return error_response(ErrorCode::InvalidId, e.to_string());
        }
        if let Err(r) = commands::report_cursor(&state, &principal, &key, client_id, since).await {
            return r.into_response();
        }
    }
    let limit = query.limit.unwrap_or(500).min(MAX_OPS_LIMIT);
    let subject = ultrasync_shared::nats::ops_subject(&key);
    let ops_stream = state.hub.ops_stream();
    let head = match log::head(ops_stream, &subject).await {
        Ok(h) => h.map_or(0, |h| h.server_seq),
        Err(e) => return Refusal::unavailable("reading the log", e).into_response(),
    };
    if since > head {
        return error_response(
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
    // At most a page of bytes is read and answered; `more` says where to go on.
    let max_bytes = state.config.gateway.max_page_bytes;
    let _turn = state.budgets.log_read(key.org.as_str()).await;
    let entries = match log::read_range_direct(
        state.hub.client(),
        ops_stream,
        &subject,
        since + 1,
        to,
        max_bytes,
    )
    .await
    {
        Ok(e) => e,
        Err(e) => return Refusal::unavailable("reading the log", e).into_response(),
    };
    if since < to && entries.first().map(|e| e.server_seq) != Some(since + 1) {
        return error_response(
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
        if e.server_seq != last + 1 || (last > since && body.len() + e.payload.len() > max_bytes) {
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
    responses((status = 200, body = super::schema::OkBody), (status = 410, body = super::schema::ErrorBody), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "A polling client's cursor: it has applied everything up to server_seq."
)]
pub async fn cursor(
    State(state): State<Arc<AppState>>,
    Path((org, project)): Path<(String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
    body: Result<Json<CursorBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let (principal, key) = match resolve(
        &state,
        &headers,
        &query,
        (&org, &project, &body.namespace),
        Access::Read,
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(e) = ultrasync_shared::Id::parse("client_id", &body.client_id) {
        return error_response(ErrorCode::InvalidId, e.to_string());
    }
    if let Err(r) =
        commands::report_cursor(&state, &principal, &key, &body.client_id, body.server_seq).await
    {
        return r.into_response();
    }
    Json(serde_json::json!({"ok": true})).into_response()
}
