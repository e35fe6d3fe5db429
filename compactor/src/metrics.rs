//! The compactor's metrics (`ultrasync_compactor_…`), served on
//! `compactor.metrics_listen`: passes and how long they took, ops purged and the
//! floor per stream key, durable readers let go, and each client's cursor lag.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use ultrasync_metrics::{Exposition, counter, counters, gauges};

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

pub struct Metrics {
    /// What the passes found; read by the registry's collector at each scrape.
    inner: Arc<Mutex<Inner>>,
    /// How long each pass took, failed ones too.
    pass: Histogram,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        // Every kind of reader has a series from the start, at 0.
        let let_go = ["webhook", "materializer", "mirror"]
            .into_iter()
            .map(|kind| (kind, 0))
            .collect();
        let inner = Arc::new(Mutex::new(Inner {
            let_go,
            ..Inner::default()
        }));
        let pass = Histogram::new(ultrasync_metrics::SECONDS_BUCKETS);
        let mut registry = Registry::with_prefix("ultrasync_compactor");
        registry.register_with_unit(
            "pass",
            "How long a compaction pass took (failed ones too)",
            Unit::Seconds,
            pass.clone(),
        );
        registry.register_collector(Box::new(Collected(inner.clone())));
        Self {
            inner,
            pass,
            registry,
        }
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// A pass completed in `took`.
    pub fn pass_done(&self, took: Duration) {
        self.lock().passes += 1;
        self.pass.observe(took.as_secs_f64());
    }

    /// A pass failed (purged nothing) after `took`.
    pub fn pass_failed(&self, took: Duration) {
        self.lock().failed_passes += 1;
        self.pass.observe(took.as_secs_f64());
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

    /// The OpenMetrics text of `/metrics`.
    pub fn render(&self) -> Result<String, fmt::Error> {
        ultrasync_metrics::render(&self.registry)
    }
}

impl Exposition for Metrics {
    async fn render(&self) -> Result<String, fmt::Error> {
        Metrics::render(self)
    }
}

/// Reads what the passes found at each scrape.
struct Collected(Arc<Mutex<Inner>>);

impl fmt::Debug for Collected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("compactor metrics")
    }
}

impl Collector for Collected {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let m = lock(&self.0);
        let per_key = |values: &BTreeMap<String, u64>| {
            values
                .iter()
                .map(|(k, v)| ([("stream_key", k.clone())], *v))
                .collect::<Vec<_>>()
        };
        counter(&mut e, "passes", "Compaction passes completed.", m.passes)?;
        counters(
            &mut e,
            "readers_let_go",
            "Stream keys on which a durable reader (webhook, materializer, mirror) was let go for lagging past its max_lag_ops or max_lag_secs.",
            m.let_go.iter().map(|(kind, n)| ([("kind", *kind)], *n)),
        )?;
        counter(
            &mut e,
            "failed_passes",
            "Passes that purged nothing because NATS, the cursors or the log could not be read.",
            m.failed_passes,
        )?;
        counters(
            &mut e,
            "ops_purged",
            "Ops purged from the log, per stream key.",
            per_key(&m.purged),
        )?;
        gauges(
            &mut e,
            "floor",
            "Highest server_seq that may be purged, per stream key.",
            None,
            per_key(&m.floor),
        )?;
        counters(
            &mut e,
            "skipped",
            "Passes that left a stream key alone (no sound snapshot).",
            per_key(&m.skipped),
        )?;
        gauges(
            &mut e,
            "cursor_lag",
            "Ops between a client's cursor and the head (live=false: expired by TTL).",
            None,
            m.lag.iter().map(|((k, c), (lag, live))| {
                (
                    [
                        ("stream_key", k.clone()),
                        ("client_id", c.clone()),
                        ("live", live.to_string()),
                    ],
                    *lag,
                )
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientCursor;

    fn plan(key: &str, purged: u64, floor: u64, clients: &[(&str, u64)]) -> Plan {
        Plan {
            stream_key: key.to_owned(),
            head: 100,
            first: Some(1),
            snapshot_seq: Some(90),
            min_cursor: clients.iter().map(|c| c.1).min(),
            live_clients: clients
                .iter()
                .map(|(id, lag)| ClientCursor {
                    client_id: (*id).to_owned(),
                    server_seq: 100 - lag,
                    lag: *lag,
                    seen_secs_ago: 1,
                })
                .collect(),
            expired_clients: Vec::new(),
            readers: Vec::new(),
            held_by: "snapshot".to_owned(),
            floor,
            purged,
            skipped: None,
        }
    }

    #[test]
    fn passes_purges_floors_and_lags_render_with_one_prefix() {
        let m = Metrics::default();
        m.record(&plan("acme/web/index", 10, 10, &[("carl\"1", 90)]));
        m.record(&plan("acme/web/index", 5, 15, &[]));
        m.reader_let_go("webhook");
        m.pass_done(Duration::from_millis(20));
        m.pass_failed(Duration::from_millis(3));
        let text = m.render().expect("render");
        for line in [
            "ultrasync_compactor_passes_total 1\n",
            "ultrasync_compactor_failed_passes_total 1\n",
            "ultrasync_compactor_ops_purged_total{stream_key=\"acme/web/index\"} 15\n",
            "ultrasync_compactor_floor{stream_key=\"acme/web/index\"} 15\n",
            "ultrasync_compactor_readers_let_go_total{kind=\"webhook\"} 1\n",
            "ultrasync_compactor_readers_let_go_total{kind=\"mirror\"} 0\n",
            "# TYPE ultrasync_compactor_pass_seconds histogram\n",
            "ultrasync_compactor_pass_seconds_count 2\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        // The key's second pass replaced its clients: carl's lag is gone.
        assert!(!text.contains("carl"), "{text}");
        m.record(&plan("acme/web/index", 0, 15, &[("carl\"1", 7)]));
        let text = m.render().expect("render");
        assert!(
            text.contains("# TYPE ultrasync_compactor_cursor_lag gauge\n"),
            "{text}"
        );
        assert!(
            text.contains("ultrasync_compactor_cursor_lag{stream_key=\"acme/web/index\",client_id=\"carl\\\"1\",live=\"true\"} 7\n"),
            "{text}"
        );
    }
}
