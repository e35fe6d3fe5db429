//! Hook points for embedders: business rules without forking the gateway.
//!
//! Implement [`Hooks`] (every method has a default that changes nothing) and start
//! the gateway with [`crate::run_with_hooks`]. Hooks run on the request path, so they
//! should be quick; anything slow belongs on a channel to a task of the embedder's.
//!
//! | hook | when | may |
//! | --- | --- | --- |
//! | `authenticate` | after the JWT checks, before the upgrade / HTTP handler | refuse (401/403) or change the principal |
//! | `authorize` | every read or write the token allows (socket frames and HTTP) | refuse (`forbidden` or another code) |
//! | `before_apply` | before a command goes to the sequencer | refuse (reject with a code) or rewrite it |
//! | `after_apply` | when the command's answer (ack or reject) arrives | observe |
//! | `on_connect` / `on_disconnect` | a socket opens / closes | observe |

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

/// What a principal is about to do to a stream key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// hello cursors, subscribe, cursor reports, HTTP reads.
    Read,
    /// commands (socket or HTTP), presence.
    Write,
}

pub trait Hooks: Send + Sync + 'static {
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

    fn on_connect(&self, _principal: &Principal, _session_id: &str) {}

    fn on_disconnect(&self, _principal: &Principal, _session_id: &str) {}
}

/// The default: no business rules.
pub struct NoHooks;

impl Hooks for NoHooks {
    fn observes_answers(&self) -> bool {
        false
    }
}
