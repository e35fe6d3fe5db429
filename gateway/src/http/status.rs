//! Operator endpoints: `/v1/status`, `/healthz`, `/readyz` and `/metrics`. `/v1/status` shows gateway-wide figures to anyone; the lag of
//! each followed stream key only to an `admin` token, and only its own org's.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ultrasync_shared::ErrorCode;
use ultrasync_shared::nats::{self, OPS_STREAM};

use super::{ApiQuery, caller};
use crate::AppState;
use crate::rules::error_response;

/// Most stream keys `/v1/status` reports (each costs a log read).
const STATUS_KEYS: usize = 100;

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")), security(()))]
pub async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/readyz",
    responses((status = 200, description = "NATS and the op log are reachable"), (status = 503, body = super::schema::ErrorBody)),
    security(())
)]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    let streams = connected && state.js.get_stream_no_info(OPS_STREAM).await.is_ok();
    if connected && streams {
        (StatusCode::OK, "ready").into_response()
    } else {
        error_response(
            ErrorCode::Unavailable,
            "nats or the op log is not reachable",
        )
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text")), security(()))]
pub async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    ultrasync_metrics::response(state.metrics.render())
}

#[utoipa::path(
    get,
    path = "/v1/status",
    responses((status = 200, description = "version, uptime, connected clients; with an admin token, its org's followed stream keys and their lag", body = Object), (status = 401, body = super::schema::ErrorBody), (status = 403, body = super::schema::ErrorBody))
)]
pub async fn status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ApiQuery>,
) -> Response {
    let mut body = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gateway_id": state.gateway_id,
        "region": state.config.region.name,
        "home_domain": state.config.region.home_domain,
        "uptime_secs": state.started.elapsed().as_secs(),
        "connected_clients": state.metrics.connections.load(Ordering::Relaxed),
        "slow_consumers_closed": state.metrics.slow_consumers.load(Ordering::Relaxed),
        "auth_failures": state.metrics.auth_failures.load(Ordering::Relaxed),
    });
    let asks_for_more = headers.contains_key(header::AUTHORIZATION) || query.access_token.is_some();
    if !asks_for_more {
        return Json(body).into_response();
    }
    let principal = match caller(&state, &headers, &query) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if !principal.admin {
        return error_response(
            ErrorCode::Forbidden,
            "stream keys are shown to an admin token only",
        );
    }
    // Per followed stream key of the token's org: the log head, what this gateway
    // has fanned out, and the difference.
    let mut lag = Vec::new();
    let own = state
        .hub
        .followed()
        .into_iter()
        .filter(|(key, _)| key.org == principal.org)
        .take(STATUS_KEYS);
    for (key, fanned) in own {
        let head = ultrasync_shared::log::head(state.hub.ops_stream(), &nats::ops_subject(&key))
            .await
            .ok()
            .flatten()
            .map_or(fanned, |h| h.server_seq);
        lag.push(serde_json::json!({
            "stream_key": key.to_string(),
            "head": head,
            "fanned_out": fanned,
            "lag": head.saturating_sub(fanned),
        }));
    }
    body["followed_stream_keys"] = serde_json::json!(lag.len());
    body["stream_keys"] = serde_json::json!(lag);
    Json(body).into_response()
}
