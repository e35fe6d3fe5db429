//! The gateway: the only service that speaks WebSocket and HTTP. It authenticates
//! clients (JWT), turns their commands into `USYNC_CMDS` messages, routes the
//! sequencer's answers back to the right socket, and fans committed ops out to every
//! subscribed socket. Stateless: any number can run behind a load balancer.
//!
//! Layout: three front doors, `ws/` (WebSocket), `http/` (the HTTP API) and
//! `automerge/` (the automerge-repo WebSocket protocol), each only translating its
//! wire format; `rules/` below them holds what all obey (auth, access, command
//! checks, budgets); the modules beside it (`hub`, `publisher`, `presence`,
//! `cursors`, `docs`, `serve`, …) are the machinery they use. Arrows point down: no
//! door imports another, and `rules` imports none.

mod automerge;
mod credentials;
mod cursors;
mod demo;
mod docs;
pub mod hooks;
mod http;
mod hub;
mod metrics;
mod openapi;
mod presence;
mod publisher;
mod rules;
mod serve;
mod spans;
mod tls;
pub mod webhooks;
mod ws;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use axum::Router;
use axum::http::header;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use ultrasync_shared::auth::Verifier;
use ultrasync_shared::config::Config;
use ultrasync_shared::local::{Answers, Local};
use ultrasync_shared::nats::{self, CURSORS_BUCKET};

use crate::hub::Hub;
pub use crate::metrics::Metrics;

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

impl Answers for Routes {
    fn deliver(&self, session: &str, answers: Vec<Vec<u8>>) {
        Routes::deliver(self, session, answers);
    }
}

/// What every handler shares.
pub struct AppState {
    pub config: Config,
    pub verifier: Verifier,
    /// API keys and revoked tokens, followed from the bucket `usync-apikeys`.
    pub credentials: Arc<credentials::Credentials>,
    pub namespaces: ultrasync_shared::namespaces::Namespaces,
    pub gateway_id: String,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub hub: Arc<Hub>,
    /// Durable Automerge documents for the automerge-repo door.
    pub docs: Arc<docs::Docs>,
    pub presence: Arc<presence::Presence>,
    pub routes: Arc<Routes>,
    /// Commands on their way to `USYNC_CMDS`.
    pub publisher: Arc<publisher::Publisher>,
    pub cursors: Arc<cursors::CursorWriter>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// One permit per open socket (`max_connections`).
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    pub hooks: Arc<dyn hooks::Hooks>,
    /// Spans of commands (off unless `ULTRASYNC_OTLP_ENDPOINT` is set).
    pub tracer: ultrasync_shared::trace::Tracer,
    /// What each actor and org may hold and send, across both doors.
    pub(crate) budgets: rules::limits::Budgets,
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
    run_with(config, listener, shutdown, hooks, None, Local::default()).await
}

/// [`run`] beside the other services of this process (`ultrasync serve`, `ultrasync
/// dev`): answers of a sequencer registered in `local` come straight to this
/// gateway's sessions, and the demo app's files are served from `demo_dir` at
/// `/demo` when given.
pub async fn run_in_process(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    demo_dir: Option<std::path::PathBuf>,
    local: Local,
) -> anyhow::Result<()> {
    run_with(
        config,
        listener,
        shutdown,
        Arc::new(hooks::NoHooks),
        demo_dir,
        local,
    )
    .await
}

async fn run_with(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    hooks: Arc<dyn hooks::Hooks>,
    demo_dir: Option<std::path::PathBuf>,
    local: Local,
) -> anyhow::Result<()> {
    // HS256 from the secret, or RS256/EdDSA from a public key or JWKS file.
    let verifier = Verifier::from_config(&config.auth)?;
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
    let credentials = credentials::Credentials::start(&js, shutdown.clone()).await?;
    let gateway_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let routes = Routes::new(&gateway_id);
    let answers: Arc<dyn Answers> = routes.clone();
    let _in_process = local.add_gateway(&gateway_id, &answers);

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
    let config_gateway = config.gateway.clone();
    let presence = presence::Presence::with_limits(
        client.clone(),
        Duration::from_secs(config.gateway.presence_ttl_secs),
        presence::Limits::from_config(&config.gateway),
    );
    let hub = Hub::new(
        client.clone(),
        ops,
        snapshots,
        hub::FollowLimits {
            keys: config.gateway.max_followed_keys,
            keys_per_org: config.gateway.max_followed_keys_per_org,
        },
    );
    let state = Arc::new(AppState {
        namespaces: config.namespaces()?,
        config,
        verifier,
        credentials,
        gateway_id: gateway_id.clone(),
        nats: client.clone(),
        publisher: publisher::Publisher::with_limits(
            js.clone(),
            routes.clone(),
            publisher::OrgLimits::from_config(&config_gateway),
            local.clone(),
        ),
        js,
        docs: docs::Docs::new(
            client.clone(),
            hub.clone(),
            config_gateway.automerge_docs_per_org,
        ),
        hub,
        presence,
        routes,
        cursors: cursors::CursorWriter::start(
            cursors,
            cursor_flush,
            config_gateway.max_clients_per_actor,
            shutdown.clone(),
        ),
        metrics: Metrics::new(),
        shutdown: shutdown.clone(),
        started: Instant::now(),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        budgets: rules::limits::Budgets::new(&config_gateway),
        hooks,
        tracer: ultrasync_shared::trace::Tracer::for_service("gateway"),
    });
    state.presence.export(&state.metrics);
    state.publisher.export(&state.metrics);
    state.docs.export(&state.metrics);
    state.hub.export(&state.metrics);
    let started = state.started;
    state.metrics.probe(
        "ultrasync_gateway_uptime_seconds",
        "gauge",
        "Seconds since start.",
        Box::new(move || started.elapsed().as_secs()),
    );
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
    let limits = serve::Limits {
        max_connections: state.config.gateway.max_http_connections,
        header_read_timeout: Duration::from_secs(state.config.gateway.header_read_timeout_secs),
    };
    let app = router(state, demo_dir.as_deref());
    let plain = match (&tls, plain_listen) {
        (Some(_), Some(p)) => {
            let l = TcpListener::bind(p)
                .await
                .with_context(|| format!("binding the plain listener {p}"))?;
            info!(addr = %l.local_addr()?, "gateway plain listener");
            Some(tokio::spawn(serve::serve(
                l,
                None,
                app.clone(),
                limits.clone(),
                shutdown.clone(),
            )))
        }
        _ => None,
    };
    let kind = if tls.is_some() { "TLS" } else { "plain" };
    info!(%addr, gateway_id = %gateway_id, "gateway listening ({kind})");
    serve::serve(listener, tls, app, limits, shutdown.clone())
        .await
        .context("serving http")?;
    if let Some(p) = plain {
        let _ = p.await;
    }
    reply_task.abort();
    let _ = client.flush().await;
    info!("gateway stopped");
    Ok(())
}

fn router(state: Arc<AppState>, demo_dir: Option<&std::path::Path>) -> Router {
    let api = http::routes().layer(axum::middleware::from_fn_with_state(
        state.clone(),
        http::deadline,
    ));
    let mut router = Router::new()
        .merge(ws::routes())
        .merge(automerge::routes())
        .merge(api);
    if let Some(dir) = demo_dir {
        router = router.merge(demo::routes(dir));
    }
    let router = router
        .route(
            "/v1/openapi.json",
            axum::routing::get(openapi::openapi_json),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http::envelope,
        ))
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
