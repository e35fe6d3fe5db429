//! The automerge-repo door (SPEC §11): `GET /v1/automerge/{org}/{project}/{ns}`, a
//! WebSocket speaking the binary CBOR protocol of
//! `@automerge/automerge-repo-network-websocket` 2.x, so an unmodified
//! automerge-repo app syncs its documents through ultrasync. Each document id is a
//! key of the `crdt` namespace `{ns}`. It only translates the wire format: tokens,
//! access, command checks and budgets are `rules`, the durable documents `docs`.

mod session;
pub mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use ultrasync_shared::namespaces::Mode;
use ultrasync_shared::{ErrorCode, StreamKey};

use crate::AppState;
use crate::rules::auth::{self, Door};
use crate::rules::error_response;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/v1/automerge/{org}/{project}/{ns}", get(automerge_socket))
}

#[derive(Deserialize)]
pub struct TokenQuery {
    access_token: Option<String>,
}

/// The storage id this server presents for a stream key: stable across restarts
/// and gateways (every gateway serves the same durable documents), different per
/// namespace (the same document id in two namespaces is two documents). A UUID's
/// shape, from SHA-256.
pub fn storage_id(key: &StreamKey) -> String {
    let h = Sha256::new()
        .chain_update(b"ultrasync automerge-repo storage\0")
        .chain_update(key.to_string().as_bytes())
        .finalize();
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The automerge-repo endpoint (SPEC §11). 401 before the upgrade without a valid
/// token, 403 for an Origin outside the allow-list, 404 for a namespace that is not
/// declared, 400 for one that is not `crdt`, 429/503 as on `/v1/sync`. A token that
/// does not cover the org or project is let in, and every document it asks for is
/// `doc-unavailable` (what an automerge-repo peer expects of a server without it).
#[utoipa::path(
    get,
    path = "/v1/automerge/{org}/{project}/{ns}",
    params(
        ("org" = String, Path),
        ("project" = String, Path),
        ("ns" = String, Path, description = "a crdt namespace"),
        ("access_token" = Option<String>, Query)
    ),
    responses(
        (status = 101, description = "switching to the WebSocket protocol (binary CBOR frames of automerge-repo-network-websocket 2.x)"),
        (status = 400, body = crate::rules::ErrorBody),
        (status = 401, body = crate::rules::ErrorBody),
        (status = 403, body = crate::rules::ErrorBody),
        (status = 404, body = crate::rules::ErrorBody),
        (status = 429, body = crate::rules::ErrorBody),
        (status = 503, body = crate::rules::ErrorBody)
    )
)]
pub async fn automerge_socket(
    State(state): State<Arc<AppState>>,
    Path((org, project, ns)): Path<(String, String, String)>,
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
    let key = match StreamKey::parse(&org, &project, &ns) {
        Ok(k) => k,
        Err(e) => return error_response(ErrorCode::InvalidId, e.to_string()),
    };
    match state.namespaces.get(&ns).map(|s| s.mode) {
        None => {
            return error_response(
                ErrorCode::UnknownNamespace,
                format!("namespace {ns} is not declared for this project"),
            );
        }
        Some(Mode::Crdt) => {}
        Some(other) => {
            return error_response(
                ErrorCode::InvalidOp,
                format!(
                    "namespace {ns} is {}; automerge-repo documents live in a crdt namespace",
                    other.as_str()
                ),
            );
        }
    }
    let (ws, slot, permit) = match crate::ws::admit(&state, ws, &principal) {
        Ok(admitted) => admitted,
        Err(r) => return r,
    };
    let connected = match auth::connect_socket(
        &state,
        &principal,
        crate::hooks::ConnectionKind::AutomergeRepo,
        &headers,
    ) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    ws.on_upgrade(move |socket| async move {
        session::Session::run(state, socket, principal, key, slot, connected).await;
        drop(permit);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_ids_are_stable_and_per_namespace() {
        let a = StreamKey::parse("acme", "web", "collab").expect("key");
        let b = StreamKey::parse("acme", "web", "notes").expect("key");
        assert_eq!(storage_id(&a), storage_id(&a));
        assert_ne!(storage_id(&a), storage_id(&b));
        assert_eq!(storage_id(&a).len(), 36);
    }
}
