//! The gateway: the only service that speaks WebSocket and HTTP. It authenticates
//! clients (JWT), turns their commands into `USYNC_CMDS` messages, routes the
//! sequencer's answers back to the right socket, and fans committed ops out to every
//! subscribed socket. Stateless: any number can run behind a load balancer.

mod api;
mod cursors;
mod follow;
pub mod hooks;
mod http;
mod hub;
mod metrics;
mod openapi;
mod presence;
mod publisher;
mod session;
mod tls;
pub mod webhooks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use ultrasync_shared::ErrorCode;
use ultrasync_shared::auth::{Principal, Verifier};
use ultrasync_shared::config::Config;
use ultrasync_shared::nats::{self, CURSORS_BUCKET, OPS_STREAM};

use crate::hub::Hub;
pub use crate::metrics::Metrics;
use crate::session::Session;

/// Routes the sequencer's answers (published to
/// `usync.reply.{gateway_id}.{session_id}`) to the session that sent the command.
pub struct Routes {
    prefix: String,
    sessions: Mutex<HashMap<String, mpsc::Sender<Vec<Vec<u8>>>>>,
}

impl Routes {
    fn new(gateway_id: &str) -> Arc<Self> {
        Arc::new(Self {
            prefix: format!("usync.reply.{gateway_id}"),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Vec<Vec<u8>>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn reply_subject(&self, session_id: &str) -> String {
        format!("{}.{session_id}", self.prefix)
    }

    pub fn register(&self, session_id: &str) -> mpsc::Receiver<Vec<Vec<u8>>> {
        let (tx, rx) = mpsc::channel(4096);
        self.lock().insert(session_id.to_owned(), tx);
        rx
    }

    pub fn unregister(&self, session_id: &str) {
        self.lock().remove(session_id);
    }

    /// Hands answers (those that came in one message) to their session; ones the
    /// session cannot take are dropped (the client times out and retries, and the
    /// retry is answered from the log).
    pub fn deliver(&self, session_id: &str, answers: Vec<Vec<u8>>) {
        let tx = self.lock().get(session_id).cloned();
        if let Some(tx) = tx
            && tx.try_send(answers).is_err()
        {
            warn!(
                session = session_id,
                "dropping an answer for a full session"
            );
        }
    }
}

/// Per-socket read buffer (bytes); grows past this only while a frame is read.
const SOCKET_READ_BUFFER: usize = 4 * 1024;
/// Bytes gathered before a socket write (frames are flushed as they are sent anyway).
const SOCKET_WRITE_BUFFER: usize = 8 * 1024;

/// What every handler shares.
pub struct AppState {
    pub config: Config,
    pub verifier: Verifier,
    pub namespaces: ultrasync_shared::namespaces::Namespaces,
    pub gateway_id: String,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub hub: Arc<Hub>,
    pub presence: Arc<presence::Presence>,
    pub routes: Arc<Routes>,
    /// Commands on their way to `USYNC_CMDS`.
    pub publisher: Arc<publisher::Publisher>,
    pub cursors: Arc<cursors::CursorWriter>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// One permit per open socket (`max_connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    pub hooks: Arc<dyn hooks::Hooks>,
    /// Per-actor rate limits of the HTTP API.
    pub(crate) http_limits: Mutex<HashMap<String, session::RateLimit>>,
}

/// Serves on `listener` until `shutdown` fires, then closes every socket with 1013
/// and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_hooks(config, listener, shutdown, Arc::new(hooks::NoHooks)).await
}

/// [`run`] with an embedder's [`hooks::Hooks`].
pub async fn run_with_hooks(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    hooks: Arc<dyn hooks::Hooks>,
) -> anyhow::Result<()> {
    let secret = config.auth.secret()?;
    let verifier = Verifier::hs256(
        &secret,
        &config.auth.audience,
        config.auth.issuer.as_deref(),
    );
    let nats::ServiceNats {
        client,
        js,
        ops,
        snapshots,
    } = nats::connect_service(&config, "ultrasync-gateway").await?;
    let cursors = js
        .get_key_value(CURSORS_BUCKET)
        .await
        .context("opening the cursor bucket")?;
    let cursor_flush = Duration::from_millis(config.gateway.cursor_flush_ms);
    let gateway_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let routes = Routes::new(&gateway_id);

    let mut replies = client
        .subscribe(format!("usync.reply.{gateway_id}.*"))
        .await
        .context("subscribing to replies")?;
    let router_routes = routes.clone();
    let reply_task = tokio::spawn(async move {
        while let Some(msg) = replies.next().await {
            if let Some(session) = msg.subject.rsplit('.').next() {
                // Answers to one session may come several to a message; they stay
                // together up to the socket.
                let answers = nats::split_lines(msg.headers.as_ref(), &msg.payload)
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect();
                router_routes.deliver(session, answers);
            }
        }
    });

    let max_connections = config.gateway.max_connections;
    let presence = presence::Presence::new(
        client.clone(),
        Duration::from_secs(config.gateway.presence_ttl_secs),
    );
    let state = Arc::new(AppState {
        namespaces: config.namespaces()?,
        config,
        verifier,
        gateway_id: gateway_id.clone(),
        nats: client.clone(),
        publisher: publisher::Publisher::new(js.clone(), routes.clone()),
        js,
        hub: Hub::new(client.clone(), ops, snapshots),
        presence,
        routes,
        cursors: cursors::CursorWriter::start(cursors, cursor_flush, shutdown.clone()),
        metrics: Metrics::default(),
        shutdown: shutdown.clone(),
        started: Instant::now(),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        hooks,
        http_limits: Mutex::new(HashMap::new()),
    });
    // Webhooks are sent from the home region only: a replica region would deliver
    // every op a second time.
    let hooks_here: &[ultrasync_shared::config::WebhookConfig] =
        match state.config.region.is_replica() {
            true => &[],
            false => &state.config.webhooks,
        };
    webhooks::start(
        &state.js,
        hooks_here,
        state.config.namespaces()?,
        state.metrics.webhooks.clone(),
        shutdown.clone(),
    )
    .await?;
    let addr = listener.local_addr()?;
    let tls = tls::server_config(&state.config.gateway)?;
    let plain_listen = state.config.gateway.plain_listen;
    let app = router(state);
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => {
            info!(%addr, gateway_id = %gateway_id, "gateway listening (plain)");
            axum::serve(listener, make)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .await
                .context("serving http")?;
        }
        Some(tls) => {
            info!(%addr, gateway_id = %gateway_id, "gateway listening (TLS)");
            let plain = match plain_listen {
                Some(p) => {
                    let l = TcpListener::bind(p)
                        .await
                        .with_context(|| format!("binding the plain listener {p}"))?;
                    info!(addr = %l.local_addr()?, "gateway plain listener");
                    Some(tokio::spawn(
                        axum::serve(l, make.clone())
                            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                            .into_future(),
                    ))
                }
                None => None,
            };
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                stopper.graceful_shutdown(Some(Duration::from_secs(10)));
            });
            let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
            axum_server::from_tcp_rustls(listener.into_std()?, config)?
                .handle(handle)
                .serve(make)
                .await
                .context("serving https")?;
            if let Some(p) = plain {
                let _ = p.await;
            }
        }
    }
    reply_task.abort();
    let _ = client.flush().await;
    info!("gateway stopped");
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/v1/sync", get(sync_socket))
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi_json))
        .route("/v1/{org}/{project}/{ns}/snapshot", get(http::snapshot))
        .route(
            "/v1/{org}/{project}/{ns}/keys/{key}",
            get(http::key).put(api::put_key).delete(api::delete_key),
        )
        .route(
            "/v1/{org}/{project}/{ns}/keys/{key}/history",
            get(api::history),
        )
        .route(
            "/v1/{org}/{project}/{ns}/commands",
            axum::routing::post(api::commands),
        )
        .route("/v1/{org}/{project}/{ns}/ops", get(http::ops))
        .route(
            "/v1/{org}/{project}/cursors",
            axum::routing::post(http::cursor),
        )
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.gateway.max_frame_bytes,
        ));
    match cors(&state.config.gateway.cors_origins) {
        Some(layer) => router.layer(layer).with_state(state),
        None => router.with_state(state),
    }
}

/// CORS for the HTTP API: `["*"]` allows any origin, otherwise the listed ones; the
/// bearer token travels in `Authorization` (no cookies, so no credentials mode).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("x-client-id"),
            ])
            .expose_headers([header::ETAG])
            .max_age(Duration::from_secs(600)),
    )
}

/// An HTTP error in the shape of SPEC §5.
pub fn http_error(code: ErrorCode, message: impl Into<String>) -> Response {
    let status =
        StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::json!({"error": {"code": code, "message": message.into()}});
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct TokenQuery {
    access_token: Option<String>,
}

/// Checks the bearer token (header, or `access_token` for browsers).
fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<Principal, Response> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let token = from_header.or(query.access_token.as_deref());
    let Some(token) = token else {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        return Err(http_error(ErrorCode::Unauthorized, "missing bearer token"));
    };
    let principal = state.verifier.verify(token).map_err(|e| {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        http_error(ErrorCode::Unauthorized, e.to_string())
    })?;
    state.hooks.authenticate(principal, headers).map_err(|e| {
        state.metrics.auth_failures.fetch_add(1, Ordering::Relaxed);
        http_error(e.code, e.message)
    })
}

fn origin_allowed(state: &AppState, headers: &HeaderMap) -> bool {
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

/// The WebSocket endpoint (SPEC §4); 401 before the upgrade without a valid token,
/// 403 for an Origin outside the allow-list, 503 when the connection cap is reached.
#[utoipa::path(
    get,
    path = "/v1/sync",
    params(("access_token" = Option<String>, Query)),
    responses(
        (status = 101, description = "switching to the WebSocket protocol"),
        (status = 401, body = crate::openapi::ErrorBody),
        (status = 403, body = crate::openapi::ErrorBody),
        (status = 503, body = crate::openapi::ErrorBody)
    )
)]
async fn sync_socket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let principal = match authenticate(&state, &headers, &query) {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    if !origin_allowed(&state, &headers) {
        return http_error(ErrorCode::Forbidden, "origin not allowed");
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let Ok(slot) = state.connection_slots.clone().try_acquire_owned() else {
        return http_error(ErrorCode::Unavailable, "too many connections; retry later");
    };
    let max = state.config.gateway.max_frame_bytes;
    // Small socket buffers: tungstenite's 128 KiB read and write defaults cost
    // ~140 KiB per idle socket (measured with `ultrasync bench --scenario idle`).
    ws.max_frame_size(max)
        .max_message_size(max)
        .read_buffer_size(SOCKET_READ_BUFFER)
        .write_buffer_size(SOCKET_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            Session::run(state, socket, principal).await;
            drop(slot);
        })
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")), security(()))]
async fn healthz() -> &'static str {
    "ok"
}

#[utoipa::path(
    get,
    path = "/readyz",
    responses((status = 200, description = "NATS and the op log are reachable"), (status = 503, body = crate::openapi::ErrorBody)),
    security(())
)]
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let connected = state.nats.connection_state() == async_nats::connection::State::Connected;
    let streams = connected && state.js.get_stream_no_info(OPS_STREAM).await.is_ok();
    if connected && streams {
        (StatusCode::OK, "ready").into_response()
    } else {
        http_error(
            ErrorCode::Unavailable,
            "nats or the op log is not reachable",
        )
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text", content_type = "text/plain")), security(()))]
async fn prometheus(State(state): State<Arc<AppState>>) -> Response {
    let body = state
        .metrics
        .render(state.hub.topic_count(), state.started.elapsed());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

#[utoipa::path(get, path = "/v1/status", responses((status = 200, description = "version, uptime, connected clients, followed stream keys", body = Object)), security(()))]
async fn status(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    // Per followed stream key: the log head, what this gateway has fanned out, and
    // the difference (at most 100 keys, to keep the answer cheap).
    let mut lag = Vec::new();
    for (key, fanned) in state.hub.followed().into_iter().take(100) {
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
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gateway_id": state.gateway_id,
        "region": state.config.region.name,
        "home_domain": state.config.region.home_domain,
        "uptime_secs": state.started.elapsed().as_secs(),
        "connected_clients": state.metrics.connections.load(Ordering::Relaxed),
        "followed_stream_keys": state.hub.topic_count(),
        "stream_keys": lag,
        "slow_consumers_closed": state.metrics.slow_consumers.load(Ordering::Relaxed),
        "auth_failures": state.metrics.auth_failures.load(Ordering::Relaxed),
    }))
}

#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "this document", body = Object)), security(()))]
async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi::document())
}
