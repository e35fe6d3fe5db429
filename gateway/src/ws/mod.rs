//! The WebSocket door (SPEC §4): the upgrade, then one [`session::Session`] per
//! socket. It only speaks the wire format; what a socket may do is decided in
//! `rules`.

mod follow;
pub mod outbound;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use ultrasync_shared::ErrorCode;

use crate::AppState;
use crate::rules::auth::{self, Door};
use crate::rules::error_response;

/// Per-socket read buffer (bytes); grows past this only while a frame is read.
const SOCKET_READ_BUFFER: usize = 4 * 1024;
/// Bytes gathered before a socket write (frames are flushed as they are sent anyway).
const SOCKET_WRITE_BUFFER: usize = 8 * 1024;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/sync", get(sync_socket))
}

#[derive(Deserialize)]
pub struct TokenQuery {
    access_token: Option<String>,
}

/// The WebSocket endpoint (SPEC §4); 401 before the upgrade without a valid token
/// or API key, 403 for an Origin outside the allow-list (or the code of an embedder's
/// `on_connect` refusal), 429 when the actor or its org has its
/// share of sockets open, 503 when the gateway's connection cap is reached.
#[utoipa::path(
    get,
    path = "/v1/sync",
    params(("access_token" = Option<String>, Query)),
    responses(
        (status = 101, description = "switching to the WebSocket protocol"),
        (status = 401, body = crate::rules::ErrorBody),
        (status = 403, body = crate::rules::ErrorBody),
        (status = 429, body = crate::rules::ErrorBody),
        (status = 503, body = crate::rules::ErrorBody)
    )
)]
pub async fn sync_socket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<TokenQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let query_token = query.as_ref().ok().and_then(|q| q.access_token.as_deref());
    let principal = match auth::authenticate(&state, Door::WebSocket, &headers, query_token) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    if !auth::origin_allowed(&state, &headers) {
        return error_response(ErrorCode::Forbidden, "origin not allowed");
    }
    let (ws, slot, permit) = match admit(&state, ws, &principal) {
        Ok(admitted) => admitted,
        Err(r) => return r,
    };
    let connected = match auth::connect_socket(
        &state,
        &principal,
        crate::hooks::ConnectionKind::WebSocket,
        &headers,
    ) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    ws.on_upgrade(move |socket| async move {
        session::Session::run(state, socket, principal, slot, connected).await;
        drop(permit);
    })
}

/// What every WebSocket door (native and automerge-repo) checks before upgrading:
/// a valid upgrade request, a socket within the actor's and org's budgets, and a
/// free connection slot. Returns the upgrade bounded to the frame size, with small
/// socket buffers: tungstenite's 128 KiB read and write defaults cost ~140 KiB per
/// idle socket (measured with `ultrasync bench --scenario idle`).
pub(crate) fn admit(
    state: &AppState,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    principal: &ultrasync_shared::auth::Principal,
) -> Result<
    (
        WebSocketUpgrade,
        crate::rules::limits::SocketSlot,
        tokio::sync::OwnedSemaphorePermit,
    ),
    Response,
> {
    let ws =
        ws.map_err(|rejection| error_response(ErrorCode::InvalidMessage, rejection.body_text()))?;
    let slot = state
        .budgets
        .open_socket(principal)
        .map_err(IntoResponse::into_response)?;
    let Ok(permit) = state.connection_slots.clone().try_acquire_owned() else {
        return Err(error_response(
            ErrorCode::Unavailable,
            "too many connections; retry later",
        ));
    };
    let max = state.config.gateway.max_frame_bytes;
    let ws = ws
        .max_frame_size(max)
        .max_message_size(max)
        .read_buffer_size(SOCKET_READ_BUFFER)
        .write_buffer_size(SOCKET_WRITE_BUFFER);
    Ok((ws, slot, permit))
}
