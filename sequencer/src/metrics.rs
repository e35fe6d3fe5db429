//! The sequencer's Prometheus metrics, served on `sequencer.metrics_listen`: for each
//! partition whether this instance holds it, its queue depth, live workers, commands
//! taken, ops written and when its lease runs out; and the instance's own counters.
//!
//! Counters are kept per partition for as long as the process lives (a partition
//! that moves away and comes back continues its series), so they only grow. Queue
//! depths come from the partitions' consumers on NATS; they are read at most once per
//! [`DEPTH_REFRESH`] however often (and however many at once) scrapers ask.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Stream;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use ultrasync_shared::nats;

use crate::source::SourceStats;
use crate::worker::WorkerShared;

/// Queue depths are read from NATS at most this often.
pub const DEPTH_REFRESH: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Inner {
    /// Partitions of `USYNC_CMDS` (`None`: set up before partitions).
    partitions: Option<u32>,
    /// Lease TTL, as the coordinator uses it.
    lease_ttl: Duration,
    /// Every partition this instance has sequenced, with its counters.
    sources: BTreeMap<u32, Arc<SourceStats>>,
    /// Partitions held now → when the lease runs out unless renewed (unix ms).
    held: BTreeMap<u32, u64>,
    /// The consumer of a deployment set up before partitions, while drained here.
    unpartitioned: Option<Arc<SourceStats>>,
    draining_unpartitioned: bool,
    /// Ops stored, by the partition of their stream key.
    ops_written: BTreeMap<u32, u64>,
    /// Ops stored in all (also before partitions exist).
    ops_written_total: u64,
}

/// Queue depths as last read from NATS.
#[derive(Default)]
struct Depths {
    read_at: Option<Instant>,
    /// Partition → waiting + in flight.
    by_partition: BTreeMap<u32, u64>,
    unpartitioned: Option<u64>,
}

/// What one instance counts; shared by the coordinator, the committer and the
/// metrics listener.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Held across a refresh, so concurrent scrapes wait for one read of NATS.
    depths: tokio::sync::Mutex<Depths>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layout: `partitions` of `USYNC_CMDS`, leases living `lease_ttl`.
    pub fn set_layout(&self, partitions: Option<u32>, lease_ttl: Duration) {
        let mut m = self.lock();
        m.partitions = partitions;
        m.lease_ttl = lease_ttl;
    }

    /// The counters of partition `p`'s source: the same ones every time this
    /// instance takes it, so its series only grow.
    pub fn source(&self, p: u32) -> Arc<SourceStats> {
        self.lock().sources.entry(p).or_default().clone()
    }

    /// The counters of the consumer of before partitions.
    pub fn unpartitioned_source(&self) -> Arc<SourceStats> {
        let mut m = self.lock();
        m.draining_unpartitioned = true;
        m.unpartitioned.get_or_insert_default().clone()
    }

    /// The consumer of before partitions is no longer pulled here.
    pub fn unpartitioned_stopped(&self) {
        self.lock().draining_unpartitioned = false;
    }

    /// Partition `p` is held, its lease renewed (or created) at `renewed_ms` (unix).
    pub fn lease_renewed(&self, p: u32, renewed_ms: u64) {
        let mut m = self.lock();
        let until = renewed_ms + m.lease_ttl.as_millis() as u64;
        m.held.insert(p, until);
    }

    /// Partition `p` is no longer held.
    pub fn released(&self, p: u32) {
        self.lock().held.remove(&p);
    }

    /// `ops` ops were stored on the op subject `subject`.
    pub fn wrote(&self, subject: &str, ops: usize) {
        let mut m = self.lock();
        m.ops_written_total += ops as u64;
        if let Some(p) = m.partitions
            && let Some(key) = nats::stream_key_from_subject(subject)
        {
            *m.ops_written
                .entry(nats::partition_of(&key, p))
                .or_default() += ops as u64;
        }
    }

    /// Queue depths of the partitions held (and the consumer of before partitions
    /// while drained), read from NATS when the last read is older than
    /// [`DEPTH_REFRESH`].
    async fn refresh_depths(&self, cmds: &Stream) -> (BTreeMap<u32, u64>, Option<u64>) {
        let mut d = self.depths.lock().await;
        if d.read_at.is_none_or(|t| t.elapsed() >= DEPTH_REFRESH) {
            let (held, draining) = {
                let m = self.lock();
                (
                    m.held.keys().copied().collect::<Vec<u32>>(),
                    m.draining_unpartitioned,
                )
            };
            let infos = join_all(
                held.iter()
                    .map(|p| cmds.consumer_info(nats::partition_consumer(*p))),
            )
            .await;
            d.by_partition = held
                .into_iter()
                .zip(infos)
                .filter_map(|(p, info)| {
                    let i = info.ok()?;
                    Some((p, i.num_pending + i.num_ack_pending as u64))
                })
                .collect();
            d.unpartitioned = if draining {
                cmds.consumer_info(nats::SEQUENCER_CONSUMER)
                    .await
                    .ok()
                    .map(|i| i.num_pending + i.num_ack_pending as u64)
            } else {
                None
            };
            d.read_at = Some(Instant::now());
        }
        (d.by_partition.clone(), d.unpartitioned)
    }

    /// Prometheus text. `depths`: the queue depths to show; `dropped_replies`: the
    /// instance's counter of answers it could not send.
    fn render(
        &self,
        instance: &str,
        depths: &(BTreeMap<u32, u64>, Option<u64>),
        dropped_replies: u64,
    ) -> String {
        let m = self.lock();
        let mut out = String::new();
        fn head(out: &mut String, name: &str, kind: &str, help: &str) {
            let _ = writeln!(out, "# HELP usync_sequencer_{name} {help}");
            let _ = writeln!(out, "# TYPE usync_sequencer_{name} {kind}");
        }
        head(
            &mut out,
            "info",
            "gauge",
            "This sequencer instance (its id is on every answer it sends, header Usync-Sequencer).",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_info{{sequencer=\"{}\"}} 1",
            label(instance)
        );
        head(
            &mut out,
            "partitions",
            "gauge",
            "Partitions of USYNC_CMDS (0: set up before partitions, one consumer for every stream key).",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_partitions {}",
            m.partitions.unwrap_or(0)
        );
        head(
            &mut out,
            "partition_owned",
            "gauge",
            "1 for each partition this instance holds the lease of and sequences, 0 for the others.",
        );
        for p in 0..m.partitions.unwrap_or(0) {
            let owned = u8::from(m.held.contains_key(&p));
            let _ = writeln!(
                out,
                "usync_sequencer_partition_owned{{partition=\"{p}\"}} {owned}"
            );
        }
        head(
            &mut out,
            "partition_lease_expiry_seconds",
            "gauge",
            "When the lease of a partition held runs out unless renewed (unix seconds; renewed every quarter of the TTL).",
        );
        for (p, until) in &m.held {
            let _ = writeln!(
                out,
                "usync_sequencer_partition_lease_expiry_seconds{{partition=\"{p}\"}} {:.3}",
                *until as f64 / 1000.0
            );
        }
        head(
            &mut out,
            "partition_queue_depth",
            "gauge",
            "Commands waiting or in flight on a held partition's consumer (num_pending + num_ack_pending, read at most every 2 s).",
        );
        for (p, n) in &depths.0 {
            if m.held.contains_key(p) {
                let _ = writeln!(
                    out,
                    "usync_sequencer_partition_queue_depth{{partition=\"{p}\"}} {n}"
                );
            }
        }
        head(
            &mut out,
            "partition_workers",
            "gauge",
            "Stream keys with a live worker, per partition (0 once the partition is let go).",
        );
        for (p, s) in &m.sources {
            let _ = writeln!(
                out,
                "usync_sequencer_partition_workers{{partition=\"{p}\"}} {}",
                s.workers.load(Ordering::Relaxed)
            );
        }
        head(
            &mut out,
            "partition_commands_total",
            "counter",
            "Commands this instance took from a partition's consumer.",
        );
        for (p, s) in &m.sources {
            let _ = writeln!(
                out,
                "usync_sequencer_partition_commands_total{{partition=\"{p}\"}} {}",
                s.commands.load(Ordering::Relaxed)
            );
        }
        head(
            &mut out,
            "partition_pushed_back_total",
            "counter",
            "Commands handed back for redelivery because their stream key's queue was full.",
        );
        for (p, s) in &m.sources {
            let _ = writeln!(
                out,
                "usync_sequencer_partition_pushed_back_total{{partition=\"{p}\"}} {}",
                s.pushed_back.load(Ordering::Relaxed)
            );
        }
        head(
            &mut out,
            "partition_ops_written_total",
            "counter",
            "Ops this instance stored in USYNC_OPS, by the partition of their stream key.",
        );
        for (p, n) in &m.ops_written {
            let _ = writeln!(
                out,
                "usync_sequencer_partition_ops_written_total{{partition=\"{p}\"}} {n}"
            );
        }
        let unpart = m.unpartitioned.as_ref();
        let sum = |f: fn(&SourceStats) -> u64| {
            m.sources.values().map(|s| f(s)).sum::<u64>() + unpart.map_or(0, |s| f(s))
        };
        head(
            &mut out,
            "commands_total",
            "counter",
            "Commands this instance took, from every partition and the consumer of before partitions.",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_commands_total {}",
            sum(|s| s.commands.load(Ordering::Relaxed))
        );
        head(
            &mut out,
            "ops_written_total",
            "counter",
            "Ops this instance stored in USYNC_OPS.",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_ops_written_total {}",
            m.ops_written_total
        );
        head(
            &mut out,
            "workers",
            "gauge",
            "Stream keys with a live worker on this instance.",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_workers {}",
            sum(|s| s.workers.load(Ordering::Relaxed) as u64)
        );
        head(
            &mut out,
            "dropped_replies_total",
            "counter",
            "Answers not sent because the command's reply_to was not a usync.reply subject.",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_dropped_replies_total {dropped_replies}"
        );
        head(
            &mut out,
            "unpartitioned_draining",
            "gauge",
            "1 while this instance pulls the single consumer of a deployment set up before partitions.",
        );
        let _ = writeln!(
            out,
            "usync_sequencer_unpartitioned_draining {}",
            u8::from(m.draining_unpartitioned)
        );
        if let Some(n) = depths.1 {
            head(
                &mut out,
                "unpartitioned_queue_depth",
                "gauge",
                "Commands waiting or in flight on the consumer of before partitions.",
            );
            let _ = writeln!(out, "usync_sequencer_unpartitioned_queue_depth {n}");
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What the listener reads.
#[derive(Clone)]
struct Exporter {
    metrics: Arc<Metrics>,
    shared: Arc<WorkerShared>,
    cmds: Stream,
}

impl Exporter {
    async fn text(&self) -> String {
        let depths = self.metrics.refresh_depths(&self.cmds).await;
        self.metrics.render(
            &self.shared.instance,
            &depths,
            self.shared.dropped_replies.load(Ordering::Relaxed),
        )
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shared: Arc<WorkerShared>,
    cmds: Stream,
    shutdown: CancellationToken,
) {
    let exporter = Exporter {
        metrics,
        shared,
        cmds,
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(e): State<Exporter>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    e.text().await,
                )
                    .into_response()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(exporter);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_follow_a_partition_that_comes_back() {
        let m = Metrics::default();
        m.set_layout(Some(4), Duration::from_secs(2));
        let s = m.source(1);
        s.commands.fetch_add(3, Ordering::Relaxed);
        m.lease_renewed(1, 10_000);
        let key = ultrasync_shared::StreamKey::parse("o", "p", "index").expect("key");
        let p = nats::partition_of(&key, 4);
        m.wrote(&nats::ops_subject(&key), 5);

        let depths = (BTreeMap::from([(1, 7), (2, 9)]), None);
        let text = m.render("i-1", &depths, 2);
        assert_eq!(
            value(&text, "usync_sequencer_partition_owned{partition=\"1\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "usync_sequencer_partition_owned{partition=\"0\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "usync_sequencer_partition_lease_expiry_seconds{partition=\"1\"}"
            ),
            Some(12.0)
        );
        assert_eq!(
            value(
                &text,
                "usync_sequencer_partition_queue_depth{partition=\"1\"}"
            ),
            Some(7.0)
        );
        // A depth of a partition not held (read before it was let go) is not shown.
        assert_eq!(
            value(
                &text,
                "usync_sequencer_partition_queue_depth{partition=\"2\"}"
            ),
            None
        );
        assert_eq!(
            value(
                &text,
                &format!("usync_sequencer_partition_ops_written_total{{partition=\"{p}\"}}")
            ),
            Some(5.0)
        );
        assert_eq!(
            value(&text, "usync_sequencer_dropped_replies_total"),
            Some(2.0)
        );

        // Let go and taken again: the same counters, not a new series from zero.
        m.released(1);
        let text = m.render("i-1", &depths, 2);
        assert_eq!(
            value(&text, "usync_sequencer_partition_owned{partition=\"1\"}"),
            Some(0.0)
        );
        assert!(!text.contains("lease_expiry_seconds{partition=\"1\"}"));
        m.source(1).commands.fetch_add(1, Ordering::Relaxed);
        let text = m.render("i-1", &depths, 2);
        assert_eq!(
            value(
                &text,
                "usync_sequencer_partition_commands_total{partition=\"1\"}"
            ),
            Some(4.0)
        );
        assert_eq!(value(&text, "usync_sequencer_commands_total"), Some(4.0));
        // Every series has its HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().expect("name");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
        }
    }
}
