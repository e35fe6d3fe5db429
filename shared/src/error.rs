//! The closed set of reject / error codes of SPEC §4. Every error a client can see maps
//! to exactly one of these; extend only by adding.

use serde::{Deserialize, Serialize};

/// A reject or protocol error code, serialized in snake_case on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    InvalidMessage,
    InvalidId,
    InvalidKey,
    UnknownNamespace,
    InvalidOp,
    SchemaInvalid,
    PreconditionFailed,
    PayloadTooLarge,
    RateLimited,
    StaleBase,
    SlowConsumer,
    Unavailable,
    Internal,
    /// HTTP only: the key does not exist (404). Added after SPEC §4's set.
    NotFound,
}

impl ErrorCode {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::InvalidMessage => "invalid_message",
            Self::InvalidId => "invalid_id",
            Self::InvalidKey => "invalid_key",
            Self::UnknownNamespace => "unknown_namespace",
            Self::InvalidOp => "invalid_op",
            Self::SchemaInvalid => "schema_invalid",
            Self::PreconditionFailed => "precondition_failed",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RateLimited => "rate_limited",
            Self::StaleBase => "stale_base",
            Self::SlowConsumer => "slow_consumer",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::NotFound => "not_found",
        }
    }

    /// The HTTP status the HTTP API answers this code with (SPEC §5).
    pub fn http_status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::InvalidMessage
            | Self::InvalidId
            | Self::InvalidKey
            | Self::InvalidOp
            | Self::SchemaInvalid => 400,
            Self::UnknownNamespace | Self::NotFound => 404,
            Self::PreconditionFailed => 409,
            Self::StaleBase => 410,
            Self::PayloadTooLarge => 413,
            Self::RateLimited => 429,
            Self::SlowConsumer | Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }
}

impl ErrorCode {
    /// The HTTP status of a command's reject. A command that reached the sequencer
    /// well-formed is refused with `invalid_message` for one reason only: its
    /// `(actor_id, command_id)` was used before for another body (SPEC invariant 5),
    /// which is 422; everything else as [`Self::http_status`].
    pub fn reject_http_status(self) -> u16 {
        match self {
            Self::InvalidMessage => 422,
            other => other.http_status(),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes of SPEC §4.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const SLOW_CONSUMER: u16 = 4001;
    pub const PROTOCOL_MISMATCH: u16 = 4002;
}
