//! Who the caller is: the bearer token (header everywhere; `?access_token=` on the
//! WebSocket routes only, where browsers cannot set headers), verified, then the
//! embedder's `authenticate` hook. Clients get a generic message; the reason a token
//! was refused goes to the log.

use std::sync::atomic::Ordering;

use axum::http::{HeaderMap, header};
use tracing::debug;
use ultrasync_shared::ErrorCode;
use ultrasync_shared::auth::Principal;

use super::Refusal;
use crate::AppState;

/// Where a request may carry its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// `Authorization` header or `?access_token=`.
    WebSocket,
    /// `Authorization` header only: a token in a URL ends up in proxy logs and
    /// `Referer` headers.
    Http,
}

/// The bearer token of `headers`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// Verifies the caller's token and runs the `authenticate` hook.
pub fn authenticate(
    state: &AppState,
    door: Door,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Principal, Refusal> {
    let refuse = |message: &str| {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        Refusal::new(ErrorCode::Unauthorized, message)
    };
    let token = match (bearer(headers), query_token, door) {
        (Some(t), _, _) => t,
        (None, Some(t), Door::WebSocket) => t,
        (None, Some(_), Door::Http) => {
            return Err(refuse(
                "access_token in the URL is accepted on WebSocket routes only; send Authorization: Bearer",
            ));
        }
        (None, None, _) => return Err(refuse("missing bearer token")),
    };
    let principal = state.verifier.verify(token).map_err(|e| {
        debug!(reason = %e, "token refused");
        refuse(e.client_message())
    })?;
    state.hooks.authenticate(principal, headers).map_err(|e| {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        Refusal::from(e)
    })
}

/// Whether the request's `Origin` (browsers send one) is allowed.
pub fn origin_allowed(state: &AppState, headers: &HeaderMap) -> bool {
    let allowed = &state.config.gateway.allowed_origins;
    if allowed.is_empty() {
        return true;
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // Non-browser clients send no Origin; the token is what protects them.
        None => true,
        Some(origin) => allowed.iter().any(|a| a == origin),
    }
}
