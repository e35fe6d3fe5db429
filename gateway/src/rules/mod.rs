//! What every front door of the gateway obeys: who the caller is ([`auth`]), what it
//! may touch ([`access`]), which commands and cursors are acceptable ([`commands`])
//! and how much it may hold or send ([`limits`]). The doors (`ws/`, `http/`) only
//! translate their wire format to and from these checks; nothing here imports a door.

pub mod access;
pub mod auth;
pub mod commands;
pub mod limits;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tracing::warn;
use ultrasync_shared::ErrorCode;

/// A refused request: a code of SPEC §4 and a message for the client. The WebSocket
/// door sends it as an `error`/`reject` frame, the HTTP door as the error envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A dependency (NATS, a materializer) failed: the client gets `unavailable` and
    /// an error id, the log gets the cause under that id. Raw NATS errors never reach
    /// a client.
    pub fn unavailable(what: &str, cause: impl std::fmt::Display) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        warn!(error_id = %id, %cause, "{what} failed");
        Self::new(
            ErrorCode::Unavailable,
            format!("{what} is unavailable; retry later (error id {id})"),
        )
    }
}

impl From<crate::hooks::HookError> for Refusal {
    fn from(e: crate::hooks::HookError) -> Self {
        Self::new(e.code, e.message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error_response(self.code, self.message)
    }
}

/// `{"error": {"code", "message"}}`, with the HTTP status of the code.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// One of SPEC §4's codes (`unauthorized`, `forbidden`, `invalid_id`, …).
    pub code: String,
    pub message: String,
}

/// An HTTP error in the shape of SPEC §5: `{"error": {"code", "message"}}` with the
/// code's status.
pub fn error_response(code: ErrorCode, message: impl Into<String>) -> Response {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, Json(body)).into_response()
}
