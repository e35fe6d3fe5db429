//! The OpenAPI document of the gateway's API, every door: generated from the
//! handlers' `#[utoipa::path]` annotations and the body types of `http::schema`,
//! served at `GET /v1/openapi.json`. It sits above the doors (it lists them all).

use axum::Json;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::schema::*;
use crate::http::{reads, status, writes};

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
        description = "HTTP API of the ultrasync gateway (SPEC §5), with its WebSocket routes (SPEC §4 and §11). Tokens: `Authorization: Bearer <jwt>` (`?access_token=` on the WebSocket routes only)."
    ),
    paths(
        crate::ws::sync_socket,
        crate::automerge::automerge_socket,
        reads::snapshot,
        reads::ops,
        reads::key,
        writes::put_key,
        writes::delete_key,
        writes::history,
        writes::commands,
        reads::cursor,
        status::status,
        status::healthz,
        status::readyz,
        status::prometheus,
        openapi_json,
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
        writes::CommandsBody,
        writes::HttpCommand,
        reads::CursorBody,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null)
}

#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "this document", body = Object)), security(()))]
pub async fn openapi_json() -> Json<Value> {
    Json(document())
}
