//! The compactor's Prometheus metrics: passes, ops purged and the floor per stream
//! key, and each client's cursor lag, served on `compactor.metrics_listen`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::Plan;

#[derive(Default)]
struct Inner {
    passes: u64,
    failed_passes: u64,
    purged: BTreeMap<String, u64>,
    floor: BTreeMap<String, u64>,
    skipped: BTreeMap<String, u64>,
    /// (stream key, client) → (lag, live)
    lag: BTreeMap<(String, String), (u64, bool)>,
    /// Durable readers let go for lagging too far, by kind.
    let_go: BTreeMap<&'static str, u64>,
    /// Replica region (domain) → the last stream sequence its mirror was seen at.
    mirrors: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// A label value with `\` and `"` escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pass_done(&self) {
        self.lock().passes += 1;
    }

    pub fn pass_failed(&self) {
        self.lock().failed_passes += 1;
    }

    /// A replica region's mirror was read at stream sequence `seq`.
    pub fn mirror_seen(&self, domain: &str, seq: u64) {
        self.lock().mirrors.insert(domain.to_owned(), seq);
    }

    /// Where a replica region's mirror was last seen.
    pub fn mirror_last(&self, domain: &str) -> Option<u64> {
        self.lock().mirrors.get(domain).copied()
    }

    /// A durable reader was let go (past its ops or seconds lag bound).
    pub fn reader_let_go(&self, kind: &'static str) {
        *self.lock().let_go.entry(kind).or_default() += 1;
    }

    /// Takes in what a (non-dry) pass did to one stream key.
    pub fn record(&self, plan: &Plan) {
        let mut m = self.lock();
        *m.purged.entry(plan.stream_key.clone()).or_default() += plan.purged;
        m.floor.insert(plan.stream_key.clone(), plan.floor);
        if plan.skipped.is_some() {
            *m.skipped.entry(plan.stream_key.clone()).or_default() += 1;
        }
        m.lag.retain(|(k, _), _| k != &plan.stream_key);
        for (clients, live) in [(&plan.live_clients, true), (&plan.expired_clients, false)] {
            for c in clients {
                m.lag.insert(
                    (plan.stream_key.clone(), c.client_id.clone()),
                    (c.lag, live),
                );
            }
        }
    }

    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP usync_compactor_passes_total Compaction passes completed."
        );
        let _ = writeln!(out, "# TYPE usync_compactor_passes_total counter");
        let _ = writeln!(out, "usync_compactor_passes_total {}", m.passes);
        let _ = writeln!(
            out,
            "# HELP usync_compactor_readers_let_go_total Stream keys on which a durable reader (webhook, materializer, mirror) was let go for lagging past its max_lag_ops or max_lag_secs."
        );
        let _ = writeln!(out, "# TYPE usync_compactor_readers_let_go_total counter");
        for (kind, n) in &m.let_go {
            let _ = writeln!(
                out,
                "usync_compactor_readers_let_go_total{{kind=\"{kind}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP usync_compactor_failed_passes_total Passes that purged nothing because NATS, the cursors or the log could not be read."
        );
        let _ = writeln!(out, "# TYPE usync_compactor_failed_passes_total counter");
        let _ = writeln!(
            out,
            "usync_compactor_failed_passes_total {}",
            m.failed_passes
        );
        let _ = writeln!(
            out,
            "# HELP usync_compactor_ops_purged_total Ops purged from the log, per stream key."
        );
        let _ = writeln!(out, "# TYPE usync_compactor_ops_purged_total counter");
        for (k, v) in &m.purged {
            let _ = writeln!(
                out,
                "usync_compactor_ops_purged_total{{stream_key=\"{}\"}} {v}",
                label(k)
            );
        }
        let _ = writeln!(
            out,
            "# HELP usync_compactor_floor Highest server_seq that may be purged, per stream key."
        );
        let _ = writeln!(out, "# TYPE usync_compactor_floor gauge");
        for (k, v) in &m.floor {
            let _ = writeln!(
                out,
                "usync_compactor_floor{{stream_key=\"{}\"}} {v}",
                label(k)
            );
        }
        let _ = writeln!(
            out,
            "# HELP usync_compactor_skipped_total Passes that left a stream key alone (no sound snapshot)."
        );
        let _ = writeln!(out, "# TYPE usync_compactor_skipped_total counter");
        for (k, v) in &m.skipped {
            let _ = writeln!(
                out,
                "usync_compactor_skipped_total{{stream_key=\"{}\"}} {v}",
                label(k)
            );
        }
        let _ = writeln!(
            out,
            "# HELP usync_cursor_lag Ops between a client's cursor and the head (live=false: expired by TTL)."
        );
        let _ = writeln!(out, "# TYPE usync_cursor_lag gauge");
        for ((k, c), (lag, live)) in &m.lag {
            let _ = writeln!(
                out,
                "usync_cursor_lag{{stream_key=\"{}\",client_id=\"{}\",live=\"{live}\"}} {lag}",
                label(k),
                label(c)
            );
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    m.render(),
                )
                    .into_response()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}
