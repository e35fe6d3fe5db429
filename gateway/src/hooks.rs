//! Hook points for embedders: business rules without forking the gateway.
//!
//! Implement [`Hooks`] (every method has a default that changes nothing) and start
//! the gateway with [`crate::run_with_hooks`]. Hooks run on the request path, so they
//! should be quick; anything slow belongs on a channel to a task of the embedder's.
//!
//! | hook | when | may |
//! | --- | --- | --- |
//! | `identify` | first, with the request's raw credential (bearer or `?access_token=`), before the server's own checks | accept a credential the server does not know (its own tokens, sessions, keys), refuse, or leave it to the server (JWT, API key) |
//! | `authenticate` | after the server's checks (or `identify`'s acceptance), before the upgrade / HTTP handler | refuse (401/403) or change the principal |
//! | `on_connect` | a socket is about to open (before the upgrade), and before each HTTP request is handled | refuse with a code (the HTTP status of the code; the socket never opens) |
//! | `authorize` | every read or write the token allows (socket frames and HTTP) | refuse (`forbidden` or another code) |
//! | `before_apply` | before a command goes to the sequencer | refuse (reject with a code) or rewrite it |
//! | `after_apply` | when the command's answer (ack or reject) arrives | observe |
//! | `on_disconnect` | a socket that `on_connect` let in closes (HTTP requests have none) | observe |
//!
//! `examples/embed.rs` in this crate is a runnable gateway with hooks that accept a
//! credential of their own and refuse connections.

pub use axum::http::HeaderMap;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::protocol::ServerMessage;
use ultrasync_shared::{CommandEnvelope, ErrorCode, StreamKey};

/// A hook's refusal: the code and message the client gets.
#[derive(Debug, Clone)]
pub struct HookError {
    pub code: ErrorCode,
    pub message: String,
}

impl HookError {
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }
}

impl HookError {
    /// `unauthorized` (401): the credential is not accepted.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::Unauthorized,
            message: message.into(),
        }
    }
}

/// What [`Hooks::identify`] makes of a request's credential.
#[derive(Debug)]
pub enum Identity {
    /// Not the embedder's to decide: the server verifies it (a JWT or an API key).
    Verify,
    /// The embedder vouches for the caller: the server's own verification (and
    /// revocation) is skipped; `authenticate` and every other hook still run. Give the
    /// principal an `exp`: a socket closes (1008) when it passes.
    Accept(Principal),
    /// Refused with this code (`unauthorized`, `forbidden`, …).
    Refuse(HookError),
}

/// Which door a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A socket of the native protocol (`/v1/sync`).
    WebSocket,
    /// A socket of the automerge-repo endpoint (`/v1/automerge/…`).
    AutomergeRepo,
    /// One HTTP API request.
    Http,
}

/// A connection about to be served ([`Hooks::on_connect`]).
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The socket's session id (given again to `on_disconnect`); a fresh id for each
    /// HTTP request.
    pub session_id: &'a str,
    pub kind: ConnectionKind,
    pub headers: &'a HeaderMap,
}

/// What a principal is about to do to a stream key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// hello cursors, subscribe, cursor reports, HTTP reads.
    Read,
    /// commands (socket or HTTP), presence.
    Write,
}

pub trait Hooks: Send + Sync + 'static {
    /// Decides about a credential before the server does. `credential` is the bearer
    /// of `Authorization`, or `?access_token=` on the WebSocket routes (`None` when the
    /// request has neither; the headers are there for cookies or other schemes). The
    /// default leaves every credential to the server.
    fn identify(&self, _credential: Option<&str>, _headers: &HeaderMap) -> Identity {
        Identity::Verify
    }

    fn authenticate(
        &self,
        principal: Principal,
        _headers: &HeaderMap,
    ) -> Result<Principal, HookError> {
        Ok(principal)
    }

    fn authorize(
        &self,
        _principal: &Principal,
        _key: &StreamKey,
        _access: Access,
    ) -> Result<(), HookError> {
        Ok(())
    }

    fn before_apply(
        &self,
        _principal: &Principal,
        _command: &mut CommandEnvelope,
    ) -> Result<(), HookError> {
        Ok(())
    }

    fn after_apply(&self, _principal: &Principal, _answer: &ServerMessage) {}

    /// Whether [`Hooks::after_apply`] wants to be called: answers are decoded for it
    /// on the hot path only when it does.
    fn observes_answers(&self) -> bool {
        true
    }

    /// A socket is about to open, or an HTTP request to be handled: an error refuses
    /// it with its code (before the upgrade: the client gets the code's HTTP status and
    /// the error body).
    fn on_connect(
        &self,
        _principal: &Principal,
        _connection: &Connection<'_>,
    ) -> Result<(), HookError> {
        Ok(())
    }

    fn on_disconnect(&self, _principal: &Principal, _session_id: &str) {}
}

/// The default: no business rules.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn observes_answers(&self) -> bool {
        false
    }
}
