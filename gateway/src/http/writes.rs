//! The HTTP write API of SPEC §5: `POST …/{ns}/commands` (a batch, answered in
//! order), `PUT` / `DELETE …/keys/{key}` (`If-Match: "<version>"` becomes a
//! precondition; a mismatch is 409 with the current state) and `GET
//! …/keys/{key}/history` (the key's ops still in the log, newest first). Commands take
//! the same path as WebSocket commands: `USYNC_CMDS`, the sequencer, an answer on the
//! gateway's reply subject.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::protocol::{CommandFrame, ServerMessage};
use ultrasync_shared::trace::Span;
use ultrasync_shared::{ErrorCode, Id, OpType, Precondition, StreamKey, log};

use super::{ApiQuery, body_error, resolve};
use crate::rules::access::Access;
use crate::rules::{Refusal, commands, error_response};
use crate::{AppState, Metrics, spans};

/// Most commands in one `POST …/commands`.
const MAX_BATCH: usize = 1000;
/// Most history entries returned.
const MAX_HISTORY: usize = 1000;
/// Log bytes one step of a history scan reads (what it holds at once).
const HISTORY_PAGE_BYTES: usize = 1024 * 1024;

/// Sends `frames` as `client_id` and waits for every answer (in the order sent).
async fn run_commands(
    state: &AppState,
    principal: &Principal,
    key: &StreamKey,
    client_id: &str,
    frames: Vec<CommandFrame>,
) -> Vec<ServerMessage> {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let mut answers = state.routes.register(&request_id);
    let reply_to = state.routes.reply_subject(&request_id);
    let mut results: Vec<Option<ServerMessage>> = vec![None; frames.len()];
    let mut waiting: HashMap<String, Vec<usize>> = HashMap::new();
    // Each command's `gateway.command` span, ended with its answer.
    let mut traced: Vec<Span> = Vec::new();
    for (i, frame) in frames.into_iter().enumerate() {
        let span = spans::command(&state.tracer, "http", &frame);
        spans::addressed(&span, key, principal.actor_id.as_str(), client_id);
        let checked = match commands::check_frame(state, &frame) {
            Ok(()) => commands::admit(state, &frame).await,
            Err(r) => Err(r),
        };
        if let Err(r) = checked {
            spans::rejected(&span, r.code, &r.message);
            state.metrics.reject(r.code);
            results[i] = Some(ServerMessage::reject(frame.command_id, r.code, r.message));
            continue;
        }
        let command_id = frame.command_id.clone();
        let mut envelope = commands::envelope(principal, key, client_id, frame, reply_to.clone());
        if let Err(e) = state.hooks.before_apply(principal, &mut envelope) {
            spans::rejected(&span, e.code, &e.message);
            state.metrics.reject(e.code);
            results[i] = Some(ServerMessage::reject(command_id, e.code, e.message));
            continue;
        }
        match serde_json::to_vec(&envelope) {
            Ok(body) => {
                waiting.entry(command_id.clone()).or_default().push(i);
                let publishing = spans::publish(&span);
                if span.is_on() {
                    traced.resize_with(i, Span::off);
                    traced.push(span);
                }
                state.publisher.submit(
                    ultrasync_shared::nats::cmd_subject(key),
                    crate::publisher::Queued {
                        body: body.into(),
                        route: request_id.clone(),
                        command_id,
                        span: publishing,
                    },
                );
            }
            Err(e) => {
                state.metrics.reject(ErrorCode::InvalidMessage);
                results[i] = Some(ServerMessage::reject(
                    command_id,
                    ErrorCode::InvalidMessage,
                    format!("command does not encode: {e}"),
                ));
            }
        }
    }
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(state.config.gateway.command_timeout_secs);
    while !waiting.is_empty() {
        let Ok(Some(bodies)) = tokio::time::timeout_at(deadline, answers.recv()).await else {
            break;
        };
        for body in bodies {
            let Ok(msg) = serde_json::from_slice::<ServerMessage>(&body) else {
                continue;
            };
            let id = match &msg {
                ServerMessage::Ack { command_id, .. }
                | ServerMessage::Reject { command_id, .. } => command_id.clone(),
                _ => continue,
            };
            if let Some(slots) = waiting.remove(&id) {
                // Counted as they come, like a socket's: a refusal shows on
                // `/metrics` while the rest of the batch still waits.
                match &msg {
                    ServerMessage::Reject { code, .. } => state.metrics.reject(*code),
                    _ => Metrics::inc(&state.metrics.acks),
                }
                for i in slots {
                    if let Some(span) = traced.get_mut(i) {
                        spans::answered(span, &msg);
                        std::mem::take(span).end();
                    }
                    results[i] = Some(msg.clone());
                }
            }
        }
    }
    state.routes.unregister(&request_id);
    for msg in results.iter().flatten() {
        state.hooks.after_apply(principal, msg);
    }
    for (id, slots) in waiting {
        for i in slots {
            if let Some(span) = traced.get(i) {
                spans::rejected(span, ErrorCode::Unavailable, "no answer in time");
            }
            state.metrics.reject(ErrorCode::Unavailable);
            results[i] = Some(ServerMessage::reject(
                id.clone(),
                ErrorCode::Unavailable,
                "no answer in time; retry with the same command_id",
            ));
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| ServerMessage::reject("", ErrorCode::Internal, "lost answer")))
        .collect()
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct CommandsBody {
    client_id: String,
    commands: Vec<HttpCommand>,
}

/// A command in a `POST …/commands` body (the namespace comes from the path).
#[derive(Deserialize, utoipa::ToSchema)]
pub struct HttpCommand {
    command_id: String,
    key: String,
    /// `set`, `del`, `patch` or `crdt_op`.
    #[schema(value_type = String)]
    op_type: OpType,
    #[serde(default)]
    #[schema(value_type = Object)]
    payload: Value,
    /// `{"expected_version": N}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    precondition: Option<Precondition>,
    /// The `server_seq` the client's state was at when it made this edit: below the
    /// compaction floor the command is rejected `stale_base` (nothing written) and the
    /// client resyncs before sending it again.
    #[serde(default)]
    base_seq: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/v1/{org}/{project}/{ns}/commands",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path)),
    request_body = CommandsBody,
    responses((status = 200, body = super::schema::CommandsAnswer), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "A batch of commands, answered in order with ack or reject."
)]
pub async fn commands(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns)): Path<(String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
    body: Result<Json<CommandsBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (principal, key) = match resolve(
        &state,
        &headers,
        &query,
        (&org, &project, &ns),
        Access::Write,
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    if let Err(e) = Id::parse("client_id", &body.client_id) {
        return error_response(ErrorCode::InvalidId, e.to_string());
    }
    if body.commands.is_empty() || body.commands.len() > MAX_BATCH {
        return error_response(
            ErrorCode::InvalidMessage,
            format!("send 1-{MAX_BATCH} commands"),
        );
    }
    // A batch costs what its commands would cost one by one.
    if let Err(r) = state.budgets.commands(&principal, body.commands.len()) {
        return r.into_response();
    }
    let frames = body
        .commands
        .into_iter()
        .map(|c| CommandFrame {
            command_id: c.command_id,
            namespace: ns.clone(),
            key: c.key,
            op_type: c.op_type,
            payload: c.payload,
            precondition: c.precondition,
            base_seq: c.base_seq,
        })
        .collect();
    let results = run_commands(&state, &principal, &key, &body.client_id, frames).await;
    Json(serde_json::json!({"results": results})).into_response()
}

/// `"<n>"` (or `W/"<n>"`) → n.
fn parse_etag(v: &HeaderValue) -> Option<u64> {
    let s = v.to_str().ok()?.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

/// One write through the command path; the HTTP answer of SPEC §5.
async fn write_key(
    state: Arc<AppState>,
    (org, project, ns, name): (String, String, String, String),
    headers: HeaderMap,
    query: ApiQuery,
    op_type: OpType,
    payload: Value,
) -> Response {
    let (principal, key) = match resolve(
        &state,
        &headers,
        &query,
        (&org, &project, &ns),
        Access::Write,
    ) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Err(r) = state.budgets.commands(&principal, 1) {
        return r.into_response();
    }
    let precondition = match headers.get(header::IF_MATCH) {
        None => None,
        Some(v) => match parse_etag(v) {
            Some(expected_version) => Some(Precondition { expected_version }),
            None => {
                return error_response(
                    ErrorCode::InvalidMessage,
                    "If-Match must be a quoted version, e.g. \"12\"",
                );
            }
        },
    };
    let client_id = headers
        .get("x-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http")
        .to_owned();
    if let Err(e) = Id::parse("client_id", &client_id) {
        return error_response(ErrorCode::InvalidId, e.to_string());
    }
    // A client that retries sends the same Idempotency-Key and gets the first answer.
    let command_id = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let frame = CommandFrame {
        command_id,
        namespace: ns,
        key: name,
        op_type,
        payload,
        precondition,
        base_seq: None,
    };
    let answer = run_commands(&state, &principal, &key, &client_id, vec![frame])
        .await
        .into_iter()
        .next();
    match answer {
        Some(ServerMessage::Ack { server_seq, op, .. }) => {
            let mut resp = Json(serde_json::json!({
                "server_seq": server_seq,
                "version": server_seq,
                "op": op,
            }))
            .into_response();
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{server_seq}\"")) {
                resp.headers_mut().insert(header::ETAG, etag);
            }
            resp
        }
        Some(ServerMessage::Reject {
            code,
            reason,
            current_state,
            ..
        }) => {
            let status = StatusCode::from_u16(code.reject_http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut body = serde_json::json!({"error": {"code": code, "message": reason}});
            if let Some(cs) = current_state {
                body["current_state"] = serde_json::to_value(cs).unwrap_or(Value::Null);
            }
            (status, Json(body)).into_response()
        }
        _ => error_response(ErrorCode::Internal, "no answer"),
    }
}

#[utoipa::path(
    put,
    path = "/v1/{org}/{project}/{ns}/keys/{key}",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("key" = String, Path), ("If-Match" = Option<String>, Header), ("Idempotency-Key" = Option<String>, Header), ("X-Client-Id" = Option<String>, Header)),
    request_body = Object,
    responses((status = 200, body = super::schema::WriteAnswer, headers(("ETag" = String))), (status = 409, body = super::schema::ErrorBody), (status = 410, body = super::schema::ErrorBody), (status = 413, body = super::schema::ErrorBody), (status = 422, body = super::schema::ErrorBody), (status = 429, body = super::schema::ErrorBody), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "Set the key's value; If-Match makes it conditional (409 with current_state on mismatch)."
)]
pub async fn put_key(
    State(state): State<Arc<AppState>>,
    Path(path): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(value) = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    write_key(state, path, headers, query, OpType::Set, value).await
}

#[utoipa::path(
    delete,
    path = "/v1/{org}/{project}/{ns}/keys/{key}",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("key" = String, Path), ("If-Match" = Option<String>, Header), ("Idempotency-Key" = Option<String>, Header), ("X-Client-Id" = Option<String>, Header)),
    responses((status = 200, body = super::schema::WriteAnswer), (status = 409, body = super::schema::ErrorBody), (status = 410, body = super::schema::ErrorBody), (status = 422, body = super::schema::ErrorBody), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "Delete the key; If-Match makes it conditional."
)]
pub async fn delete_key(
    State(state): State<Arc<AppState>>,
    Path(path): Path<(String, String, String, String)>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
) -> Response {
    write_key(state, path, headers, query, OpType::Del, Value::Null).await
}

#[utoipa::path(
    get,
    path = "/v1/{org}/{project}/{ns}/keys/{key}/history",
    params(("org" = String, Path), ("project" = String, Path), ("ns" = String, Path), ("key" = String, Path), ("limit" = Option<usize>, Query)),
    responses((status = 200, body = super::schema::HistoryBody), (status = 400, body = super::schema::ErrorBody), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody), (status = 404, body = super::schema::ErrorBody), (status = 503, body = super::schema::ErrorBody)),
    description = "The key's ops still in the log, newest first."
)]
pub async fn history(
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
    if let Err(e) = ultrasync_shared::validate_key(&name) {
        return error_response(ErrorCode::InvalidKey, e.to_string());
    }
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_HISTORY);
    let subject = ultrasync_shared::nats::ops_subject(&key);
    let ops_stream = state.hub.ops_stream();
    let head = match log::head(ops_stream, &subject).await {
        Ok(Some(h)) => h,
        Ok(None) => return Json(serde_json::json!({"ops": [], "key": name})).into_response(),
        Err(e) => return Refusal::unavailable("reading the log", e).into_response(),
    };
    // The log has no per-key index: scan what is left of it (compaction bounds it).
    // What is kept is bounded by `limit` and by `max_page_bytes`: the newest ops
    // that fit.
    let max_bytes = state.config.gateway.max_page_bytes;
    let mut found: std::collections::VecDeque<Value> = std::collections::VecDeque::new();
    let mut found_bytes: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let mut bytes = 0usize;
    // Read a page at a time with direct gets: no consumer is left behind per request.
    // After the first page, each goes on from where the one before ended (no search
    // of the stream for its start).
    let mut after: Option<(u64, u64)> = None;
    loop {
        let turn = state.budgets.log_read(key.org.as_str()).await;
        let (client, to) = (state.hub.client(), head.server_seq);
        let page = match after {
            None => {
                log::read_range_direct(client, ops_stream, &subject, 1, to, HISTORY_PAGE_BYTES)
                    .await
            }
            Some(after) => {
                log::continue_range_direct(
                    client,
                    ops_stream,
                    &subject,
                    after,
                    to,
                    HISTORY_PAGE_BYTES,
                )
                .await
            }
        };
        let page = match page {
            Ok(p) => p,
            Err(e) => return Refusal::unavailable("reading the log", e).into_response(),
        };
        drop(turn);
        let Some(last) = page.last().map(|e| (e.server_seq, e.stream_seq)) else {
            break;
        };
        for entry in page {
            if let Ok(op) = serde_json::from_slice::<Value>(&entry.payload)
                && op.get("key").and_then(Value::as_str) == Some(name.as_str())
            {
                found.push_front(op);
                found_bytes.push_front(entry.payload.len());
                bytes += entry.payload.len();
                while found.len() > limit || (found.len() > 1 && bytes > max_bytes) {
                    found.pop_back();
                    bytes -= found_bytes.pop_back().unwrap_or(0);
                }
            }
        }
        if last.0 >= head.server_seq {
            break;
        }
        after = Some(last);
    }
    Json(serde_json::json!({"key": name, "ops": found, "head": head.server_seq})).into_response()
}
