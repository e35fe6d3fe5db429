//! The shapes of the HTTP API's bodies, for the OpenAPI document (`crate::openapi`).

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

pub use crate::rules::{ErrorBody, ErrorDetail};

/// A namespace's state for bootstrap.
#[derive(Serialize, ToSchema)]
pub struct SnapshotBody {
    pub last_server_seq: u64,
    /// `{key: {value, version, heads?, doc?}}` (crdt keys carry heads and a base64
    /// Automerge document).
    #[schema(value_type = Object)]
    pub state: Value,
    pub digest: String,
}

/// One key.
#[derive(Serialize, ToSchema)]
pub struct KeyBody {
    #[schema(value_type = Object)]
    pub value: Value,
    pub version: u64,
    pub heads: Option<Vec<String>>,
    pub last_server_seq: u64,
}

/// The answer to a committed write.
#[derive(Serialize, ToSchema)]
pub struct WriteAnswer {
    pub server_seq: u64,
    /// The key's new version (= `server_seq`), also in `ETag`.
    pub version: u64,
    #[schema(value_type = Object)]
    pub op: Value,
}

/// Answers to a command batch, in order: `ack` or `reject` frames as on the socket.
#[derive(Serialize, ToSchema)]
pub struct CommandsAnswer {
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<Value>,
}

/// A page of the log.
#[derive(Serialize, ToSchema)]
pub struct OpsPage {
    #[schema(value_type = Vec<Object>)]
    pub ops: Vec<Value>,
    /// `server_seq` of the last op in `ops` (or `since` when there is none).
    pub last_server_seq: u64,
    pub more: bool,
    /// The newest `server_seq` in the log.
    pub head: u64,
}

/// A key's ops still in the log, newest first.
#[derive(Serialize, ToSchema)]
pub struct HistoryBody {
    pub key: String,
    #[schema(value_type = Vec<Object>)]
    pub ops: Vec<Value>,
    pub head: u64,
}

#[derive(Serialize, ToSchema)]
pub struct OkBody {
    pub ok: bool,
}
