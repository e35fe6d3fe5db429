//! The materializer's metrics (`ultrasync_materializer_…`), served on
//! `materializer.metrics_listen`: ops applied and how long each pulled chunk took,
//! stream keys brought up outside the live stream, and the snapshots written, their
//! time and size.

use std::fmt;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use ultrasync_metrics::Exposition;

/// Where a gap in the live stream was filled from.
type FilledFrom = [(&'static str, &'static str); 1];

const FROM_LOG: FilledFrom = [("from", "log")];
const FROM_SNAPSHOT: FilledFrom = [("from", "snapshot")];

/// How a snapshot read was answered.
type ReadAnswer = [(&'static str, &'static str); 1];

const READ_ENCODED: ReadAnswer = [("answer", "encoded")];
const READ_KEPT: ReadAnswer = [("answer", "kept")];

pub struct Metrics {
    ops_applied: Counter,
    /// One chunk pulled from the consumer, applied (gaps filled included).
    apply: Histogram,
    rebuilds: Family<FilledFrom, Counter>,
    snapshots_written: Counter,
    snapshot_failures: Counter,
    /// Making a snapshot (reading the state, encoding) and storing it.
    snapshot: Histogram,
    snapshot_bytes: Histogram,
    snapshot_reads: Family<ReadAnswer, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let ops_applied = Counter::default();
        let apply = Histogram::new(ultrasync_metrics::SECONDS_BUCKETS);
        let rebuilds = Family::<FilledFrom, Counter>::default();
        // Both series exist from the start, at 0.
        drop(rebuilds.get_or_create(&FROM_LOG));
        drop(rebuilds.get_or_create(&FROM_SNAPSHOT));
        let snapshots_written = Counter::default();
        let snapshot_failures = Counter::default();
        let snapshot = Histogram::new(ultrasync_metrics::SECONDS_BUCKETS);
        // 1 KiB to 1 GiB.
        let snapshot_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 11));
        let snapshot_reads = Family::<ReadAnswer, Counter>::default();
        drop(snapshot_reads.get_or_create(&READ_ENCODED));
        drop(snapshot_reads.get_or_create(&READ_KEPT));
        let mut registry = Registry::with_prefix("ultrasync_materializer");
        registry.register(
            "ops_applied",
            "Ops applied to the store (a snapshot loaded counts as the ops it covers)",
            ops_applied.clone(),
        );
        registry.register_with_unit(
            "apply",
            "Applying one chunk of ops pulled from the log, in write batches, gaps filled included",
            Unit::Seconds,
            apply.clone(),
        );
        registry.register(
            "rebuilds",
            "Gaps in the live stream (compacted while away, a new instance, a mirror's hole) filled by reading the log (from=log) or by loading a snapshot (from=snapshot)",
            rebuilds.clone(),
        );
        registry.register(
            "snapshots_written",
            "Snapshots stored in usync-snapshots",
            snapshots_written.clone(),
        );
        registry.register(
            "snapshot_failures",
            "Snapshot writes that failed (retried when next due)",
            snapshot_failures.clone(),
        );
        registry.register_with_unit(
            "snapshot",
            "Making a snapshot (reading and encoding the state) and storing it",
            Unit::Seconds,
            snapshot.clone(),
        );
        registry.register_with_unit(
            "snapshot_size",
            "Size of the snapshots stored",
            Unit::Bytes,
            snapshot_bytes.clone(),
        );
        registry.register(
            "snapshot_reads",
            "Snapshot reads answered by encoding the state (answer=encoded) or with the encoding kept from an earlier read of the same state (answer=kept)",
            snapshot_reads.clone(),
        );
        Self {
            ops_applied,
            apply,
            rebuilds,
            snapshots_written,
            snapshot_failures,
            snapshot,
            snapshot_bytes,
            snapshot_reads,
            registry,
        }
    }
}

impl Metrics {
    /// A pulled chunk brought `ops` ops into the store in `took`.
    pub fn applied(&self, ops: u64, took: Duration) {
        self.ops_applied.inc_by(ops);
        self.apply.observe(took.as_secs_f64());
    }

    /// A gap was filled, from a snapshot or from the log alone.
    pub fn rebuilt(&self, from_snapshot: bool) {
        let from = if from_snapshot {
            &FROM_SNAPSHOT
        } else {
            &FROM_LOG
        };
        self.rebuilds.get_or_create(from).inc();
    }

    /// A snapshot of `bytes` was made and handed to the store in `took`; `written`:
    /// stored (not kept back for a newer one already there).
    pub fn snapshot_stored(&self, written: bool, bytes: usize, took: Duration) {
        self.snapshot.observe(took.as_secs_f64());
        if written {
            self.snapshots_written.inc();
            self.snapshot_bytes.observe(bytes as f64);
        }
    }

    /// A snapshot read was answered; `encoded`: by encoding the state.
    pub fn snapshot_read(&self, encoded: bool) {
        let answer = if encoded { &READ_ENCODED } else { &READ_KEPT };
        self.snapshot_reads.get_or_create(answer).inc();
    }

    pub fn snapshot_failed(&self) {
        self.snapshot_failures.inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_applies_rebuilds_and_snapshots() {
        let m = Metrics::default();
        let text = m.render().expect("render");
        // Before anything happened: the families and both rebuild series, at 0.
        for line in [
            "ultrasync_materializer_ops_applied_total 0\n",
            "ultrasync_materializer_rebuilds_total{from=\"log\"} 0\n",
            "ultrasync_materializer_rebuilds_total{from=\"snapshot\"} 0\n",
            "ultrasync_materializer_snapshot_seconds_count 0\n",
            "ultrasync_materializer_snapshot_reads_total{answer=\"encoded\"} 0\n",
            "ultrasync_materializer_snapshot_reads_total{answer=\"kept\"} 0\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        m.applied(12, Duration::from_millis(2));
        m.applied(3, Duration::from_millis(1));
        m.rebuilt(true);
        m.snapshot_stored(true, 5000, Duration::from_millis(4));
        m.snapshot_stored(false, 5000, Duration::from_millis(4));
        m.snapshot_failed();
        m.snapshot_read(true);
        m.snapshot_read(false);
        m.snapshot_read(false);
        let text = m.render().expect("render");
        for line in [
            "ultrasync_materializer_ops_applied_total 15\n",
            "ultrasync_materializer_apply_seconds_count 2\n",
            "ultrasync_materializer_rebuilds_total{from=\"snapshot\"} 1\n",
            "ultrasync_materializer_snapshots_written_total 1\n",
            "ultrasync_materializer_snapshot_failures_total 1\n",
            "ultrasync_materializer_snapshot_reads_total{answer=\"encoded\"} 1\n",
            "ultrasync_materializer_snapshot_reads_total{answer=\"kept\"} 2\n",
            "ultrasync_materializer_snapshot_seconds_count 2\n",
            "# UNIT ultrasync_materializer_snapshot_size_bytes bytes\n",
            "ultrasync_materializer_snapshot_size_bytes_bucket{le=\"4096.0\"} 0\n",
            "ultrasync_materializer_snapshot_size_bytes_bucket{le=\"16384.0\"} 1\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
