//! The OpenAPI document of the HTTP API, generated from the handlers' `#[utoipa::path]`
//! annotations and the body types below, served at `GET /v1/openapi.json`.

use serde::Serialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

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

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ultrasync",
        description = "HTTP API of the ultrasync gateway (SPEC §5). Tokens: `Authorization: Bearer <jwt>` (`?access_token=` on the WebSocket route only)."
    ),
    paths(
        crate::ws::sync_socket,
        super::reads::snapshot,
        super::reads::ops,
        super::reads::key,
        super::writes::put_key,
        super::writes::delete_key,
        super::writes::history,
        super::writes::commands,
        super::reads::cursor,
        super::status::status,
        super::status::healthz,
        super::status::readyz,
        super::status::prometheus,
        super::status::openapi_json,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        SnapshotBody,
        KeyBody,
        WriteAnswer,
        CommandsAnswer,
        OpsPage,
        HistoryBody,
        OkBody,
        super::writes::CommandsBody,
        super::writes::HttpCommand,
        super::reads::CursorBody,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null)
}
