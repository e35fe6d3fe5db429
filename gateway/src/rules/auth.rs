//! Who the caller is: the bearer credential (header everywhere; `?access_token=` on
//! the WebSocket routes only, where browsers cannot set headers), offered to the
//! embedder's `identify` hook first, then verified — an API key (`usk_…`) against the
//! gateway's in-memory copy of the key bucket, anything else as a JWT, refused when
//! revoked —, then the embedder's `authenticate` hook; and whether the embedder lets
//! it connect (`on_connect`). Clients get a generic message; the reason a credential
//! was refused goes to the log.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::{HeaderMap, header};
use tracing::debug;
use ultrasync_shared::ErrorCode;
use ultrasync_shared::apikeys;
use ultrasync_shared::auth::{AuthError, Principal};

use super::Refusal;
use crate::AppState;
use crate::credentials::Registration;
use crate::hooks::{Connection, ConnectionKind, Identity};

/// Longest credential looked at; a longer one is refused unread (no JWT is this big).
pub const MAX_CREDENTIAL_BYTES: usize = 8 * 1024;

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

/// Identifies the caller (see the module documentation) and runs the
/// `authenticate` hook.
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
    let credential = match (bearer(headers), query_token, door) {
        (Some(t), _, _) => Some(t),
        (None, Some(t), Door::WebSocket) => Some(t),
        (None, Some(_), Door::Http) => {
            return Err(refuse(
                "access_token in the URL is accepted on WebSocket routes only; send Authorization: Bearer",
            ));
        }
        (None, None, _) => None,
    };
    if credential.is_some_and(|c| c.len() > MAX_CREDENTIAL_BYTES) {
        return Err(refuse(AuthError::Invalid(String::new()).client_message()));
    }
    let principal = match state.hooks.identify(credential, headers) {
        Identity::Accept(p) => p,
        Identity::Refuse(e) => {
            state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::from(e));
        }
        Identity::Verify => {
            let Some(token) = credential else {
                return Err(refuse(AuthError::Missing.client_message()));
            };
            verify(state, token).map_err(|e| {
                debug!(reason = %e, "credential refused");
                refuse(e.client_message())
            })?
        }
    };
    state.hooks.authenticate(principal, headers).map_err(|e| {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        Refusal::from(e)
    })
}

/// The server's own check of a credential: an API key from memory, or a JWT
/// verified and not revoked.
fn verify(state: &AppState, token: &str) -> Result<Principal, AuthError> {
    if apikeys::is_api_key(token) {
        return state.credentials.api_key(token);
    }
    let principal = state.verifier.verify(token)?;
    state.credentials.check(&principal)?;
    Ok(principal)
}

/// An accepted socket, from before its upgrade to its end: its credential is
/// registered (`revoked` fires when it is revoked) and the embedder's `on_connect`
/// let it in; dropping it (the socket ended, or the upgrade never happened) calls
/// `on_disconnect`.
pub struct Connected {
    state: Arc<AppState>,
    principal: Principal,
    pub session_id: String,
    pub registration: Registration,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.state
            .hooks
            .on_disconnect(&self.principal, &self.session_id);
    }
}

/// Asks the embedder whether this socket may open, and registers its credential.
pub fn connect_socket(
    state: &Arc<AppState>,
    principal: &Principal,
    kind: ConnectionKind,
    headers: &HeaderMap,
) -> Result<Connected, Refusal> {
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    state.hooks.on_connect(
        principal,
        &Connection {
            session_id: &session_id,
            kind,
            headers,
        },
    )?;
    Ok(Connected {
        registration: state.credentials.register(&session_id, principal),
        state: state.clone(),
        principal: principal.clone(),
        session_id,
    })
}

/// Asks the embedder whether this HTTP request may be handled.
pub fn connect_request(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let session_id = uuid::Uuid::new_v4().simple().to_string();
    state.hooks.on_connect(
        principal,
        &Connection {
            session_id: &session_id,
            kind: ConnectionKind::Http,
            headers,
        },
    )?;
    Ok(())
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
