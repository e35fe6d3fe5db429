//! The sequencer's metrics (`ultrasync_sequencer_…`), served on
//! `sequencer.metrics_listen`: for each partition whether this instance holds it,
//! its queue depth, live workers, commands taken, ops written and when its lease
//! runs out; the instance's own counters; and histograms of batch sizes and commit
//! times.
//!
//! Counters are kept per partition for as long as the process lives (a partition
//! that moves away and comes back continues its series), so they only grow. Queue
//! depths come from the partitions' consumers on NATS; they are read at most once per
//! [`DEPTH_REFRESH`] however often (and however many at once) scrapers ask, right
//! before the registry is encoded.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream::Stream;
use futures::future::join_all;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use ultrasync_metrics::{Exposition, counter, counters, gauge, gauges};
use ultrasync_shared::nats;

use crate::source::SourceStats;

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
    /// Queue depths as last read from NATS: partition → waiting + in flight.
    depths: BTreeMap<u32, u64>,
    /// The same for the consumer of before partitions, while drained here.
    unpartitioned_depth: Option<u64>,
    /// Retried ops read from the log: from a mark, and by a search of the stream.
    retry_reads: (u64, u64),
    /// Answer messages handed to a gateway of this process, and published to NATS.
    answer_messages: (u64, u64),
    /// Commands the gateway of this process offered and this instance took.
    commands_in_process: u64,
    /// Commands the gateway of this process offered that went to `USYNC_CMDS`.
    handed_back: u64,
}

/// What one instance counts; shared by the coordinator, the workers, the committer
/// and the metrics listener.
pub struct Metrics {
    inner: Mutex<Inner>,
    /// When the queue depths were last read; held across a read, so concurrent
    /// scrapes wait for one read of NATS.
    depths_read: tokio::sync::Mutex<Option<Instant>>,
    /// Commands a worker took into one batch.
    batch_commands: Histogram,
    /// Ops of one stream key's batch stored in one write.
    batch_ops: Histogram,
    /// One durable write of the committer, from its publish to the server's answer.
    commit: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            depths_read: tokio::sync::Mutex::default(),
            // 1 to 1,024: `batch_max` is at most 1,000.
            batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            batch_ops: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            commit: Histogram::new(ultrasync_metrics::SECONDS_BUCKETS),
        }
    }
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

    /// A worker took `commands` commands into one batch.
    pub fn batch_taken(&self, commands: usize) {
        self.batch_commands.observe(commands as f64);
    }

    /// A durable write took `took` from its publish to the server's answer.
    pub fn committed(&self, took: Duration) {
        self.commit.observe(took.as_secs_f64());
    }

    /// A retried command's op was read from the log: a few messages forward from a
    /// mark (`searched` false), or by a search of the stream.
    pub fn retry_read(&self, searched: bool) {
        let mut m = self.lock();
        if searched {
            m.retry_reads.1 += 1;
        } else {
            m.retry_reads.0 += 1;
        }
    }

    /// `n` commands offered by the gateway of this process were taken.
    pub fn taken_in_process(&self, n: usize) {
        self.lock().commands_in_process += n as u64;
    }

    /// `n` commands taken from the gateway of this process go to `USYNC_CMDS`.
    pub fn handed_back(&self, n: usize) {
        self.lock().handed_back += n as u64;
    }

    /// One message of answers went to its gateway: in this process (`local`), or
    /// through NATS.
    pub fn answered(&self, local: bool) {
        let mut m = self.lock();
        if local {
            m.answer_messages.0 += 1;
        } else {
            m.answer_messages.1 += 1;
        }
    }

    /// `ops` ops were stored on the op subject `subject` in one write.
    pub fn wrote(&self, subject: &str, ops: usize) {
        self.batch_ops.observe(ops as f64);
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

    /// Reads the queue depths of the partitions held (and of the consumer of before
    /// partitions while drained) from NATS, when the last read is older than
    /// [`DEPTH_REFRESH`].
    async fn refresh_depths(&self, cmds: &Stream) {
        let mut read_at = self.depths_read.lock().await;
        if read_at.is_some_and(|t| t.elapsed() < DEPTH_REFRESH) {
            return;
        }
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
        let by_partition = held
            .into_iter()
            .zip(infos)
            .filter_map(|(p, info)| {
                let i = info.ok()?;
                Some((p, i.num_pending + i.num_ack_pending as u64))
            })
            .collect();
        let unpartitioned = if draining {
            cmds.consumer_info(nats::SEQUENCER_CONSUMER)
                .await
                .ok()
                .map(|i| i.num_pending + i.num_ack_pending as u64)
        } else {
            None
        };
        self.store_depths(by_partition, unpartitioned);
        *read_at = Some(Instant::now());
    }

    fn store_depths(&self, by_partition: BTreeMap<u32, u64>, unpartitioned: Option<u64>) {
        let mut m = self.lock();
        m.depths = by_partition;
        m.unpartitioned_depth = unpartitioned;
    }

    /// The instance's registry: these metrics and `instance`'s id, with
    /// `dropped_replies` read at each scrape.
    pub fn registry(
        self: &Arc<Self>,
        instance: &str,
        dropped_replies: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Registry {
        let mut root = Registry::default();
        root.register(
            "ultrasync_sequencer",
            "This sequencer instance (its id is on every answer it sends, header Usync-Sequencer)",
            Info::new(vec![("sequencer".to_owned(), instance.to_owned())]),
        );
        let r = root.sub_registry_with_prefix("ultrasync_sequencer");
        r.register(
            "batch_commands",
            "Commands a worker took into one batch (one plan against the stream key's state)",
            self.batch_commands.clone(),
        );
        r.register(
            "batch_ops",
            "Ops of one stream key's batch stored in USYNC_OPS in one write",
            self.batch_ops.clone(),
        );
        r.register_with_unit(
            "commit",
            "One durable write of the committer (the batches of every stream key waiting, as one publish or atomic batch), from its publish to the server's answer",
            Unit::Seconds,
            self.commit.clone(),
        );
        r.register_collector(Box::new(Collected {
            metrics: self.clone(),
            dropped_replies,
        }));
        root
    }
}

/// Reads the partitions' figures at each scrape.
struct Collected {
    metrics: Arc<Metrics>,
    dropped_replies: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl fmt::Debug for Collected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sequencer metrics")
    }
}

impl Collector for Collected {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let m = self.metrics.lock();
        // One sample per partition this instance has sequenced.
        let per_source = |f: fn(&SourceStats) -> u64| {
            m.sources
                .iter()
                .map(|(p, s)| ([("partition", p.to_string())], f(s)))
                .collect::<Vec<_>>()
        };
        let partitions = m.partitions.unwrap_or(0);
        gauge(
            &mut e,
            "partitions",
            "Partitions of USYNC_CMDS (0: set up before partitions, one consumer for every stream key).",
            partitions,
        )?;
        gauges(
            &mut e,
            "partition_owned",
            "1 for each partition this instance holds the lease of and sequences, 0 for the others.",
            None,
            (0..partitions).map(|p| {
                (
                    [("partition", p.to_string())],
                    u64::from(m.held.contains_key(&p)),
                )
            }),
        )?;
        gauges(
            &mut e,
            "partition_lease_expiry",
            "When the lease of a partition held runs out unless renewed (unix seconds; renewed every quarter of the TTL).",
            Some(&Unit::Seconds),
            m.held
                .iter()
                .map(|(p, until)| ([("partition", p.to_string())], *until as f64 / 1000.0)),
        )?;
        gauges(
            &mut e,
            "partition_queue_depth",
            "Commands waiting or in flight on a held partition's consumer (num_pending + num_ack_pending, read at most every 2 s).",
            None,
            m.depths
                .iter()
                .filter(|(p, _)| m.held.contains_key(p))
                .map(|(p, n)| ([("partition", p.to_string())], *n)),
        )?;
        gauges(
            &mut e,
            "partition_workers",
            "Stream keys with a live worker, per partition (0 once the partition is let go).",
            None,
            per_source(|s| s.workers.load(Ordering::Relaxed) as u64),
        )?;
        counters(
            &mut e,
            "partition_commands",
            "Commands this instance took from a partition's consumer.",
            per_source(|s| s.commands.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut e,
            "partition_pushed_back",
            "Commands handed back for redelivery because their stream key's queue was full.",
            per_source(|s| s.pushed_back.load(Ordering::Relaxed)),
        )?;
        counters(
            &mut e,
            "partition_ops_written",
            "Ops this instance stored in USYNC_OPS, by the partition of their stream key.",
            m.ops_written
                .iter()
                .map(|(p, n)| ([("partition", p.to_string())], *n)),
        )?;
        let unpart = m.unpartitioned.as_ref();
        let sum = |f: fn(&SourceStats) -> u64| {
            m.sources.values().map(|s| f(s)).sum::<u64>() + unpart.map_or(0, |s| f(s))
        };
        counter(
            &mut e,
            "commands",
            "Commands this instance took, from every partition and the consumer of before partitions.",
            sum(|s| s.commands.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut e,
            "ops_written",
            "Ops this instance stored in USYNC_OPS.",
            m.ops_written_total,
        )?;
        gauge(
            &mut e,
            "workers",
            "Stream keys with a live worker on this instance.",
            sum(|s| s.workers.load(Ordering::Relaxed) as u64),
        )?;
        counters(
            &mut e,
            "retry_reads",
            "Retried commands whose op was read from the log (no longer among the key's recent ones): how=\"mark\" a few messages from a known position, how=\"search\" a search of the stream (a few dozen requests; at most two at once).",
            [
                ([("how", "mark".to_owned())], m.retry_reads.0),
                ([("how", "search".to_owned())], m.retry_reads.1),
            ],
        )?;
        counter(
            &mut e,
            "commands_in_process",
            "Commands the gateway of this process (`ultrasync serve`) handed to this instance directly, without USYNC_CMDS.",
            m.commands_in_process,
        )?;
        counter(
            &mut e,
            "commands_handed_back",
            "Commands the gateway of this process offered that this instance published to USYNC_CMDS instead of sequencing them (their stream key's queue was full, the partition was given up, a write is to be retried).",
            m.handed_back,
        )?;
        counters(
            &mut e,
            "answer_messages",
            "Messages of answers (a batch's answers to one socket or request): how=\"local\" handed to the gateway of this process (`ultrasync serve`), how=\"nats\" published to the gateway's reply subject.",
            [
                ([("how", "local".to_owned())], m.answer_messages.0),
                ([("how", "nats".to_owned())], m.answer_messages.1),
            ],
        )?;
        counter(
            &mut e,
            "dropped_replies",
            "Answers not sent because the command's reply_to was not a usync.reply subject.",
            (self.dropped_replies)(),
        )?;
        gauge(
            &mut e,
            "unpartitioned_draining",
            "1 while this instance pulls the single consumer of a deployment set up before partitions.",
            u64::from(m.draining_unpartitioned),
        )?;
        if let Some(n) = m.unpartitioned_depth {
            gauge(
                &mut e,
                "unpartitioned_queue_depth",
                "Commands waiting or in flight on the consumer of before partitions.",
                n,
            )?;
        }
        Ok(())
    }
}

/// What the listener shows: the queue depths read again when due, then the registry.
pub struct Exposed {
    pub metrics: Arc<Metrics>,
    pub registry: Registry,
    /// `USYNC_CMDS`, whose consumers hold the queue depths.
    pub cmds: Stream,
}

impl Exposition for Exposed {
    async fn render(&self) -> Result<String, fmt::Error> {
        self.metrics.refresh_depths(&self.cmds).await;
        ultrasync_metrics::render(&self.registry)
    }
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
        let m = Arc::new(Metrics::default());
        let registry = m.registry("i-1", Box::new(|| 2));
        m.set_layout(Some(4), Duration::from_secs(2));
        let s = m.source(1);
        s.commands.fetch_add(3, Ordering::Relaxed);
        m.lease_renewed(1, 10_000);
        let key = ultrasync_shared::StreamKey::parse("o", "p", "index").expect("key");
        let p = nats::partition_of(&key, 4);
        m.batch_taken(6);
        m.wrote(&nats::ops_subject(&key), 5);
        m.committed(Duration::from_millis(3));
        m.store_depths(BTreeMap::from([(1, 7), (2, 9)]), None);

        let text = ultrasync_metrics::render(&registry).expect("render");
        assert_eq!(
            value(&text, "ultrasync_sequencer_info{sequencer=\"i-1\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_owned{partition=\"1\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_owned{partition=\"0\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_lease_expiry_seconds{partition=\"1\"}"
            ),
            Some(12.0)
        );
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_queue_depth{partition=\"1\"}"
            ),
            Some(7.0)
        );
        // A depth of a partition not held (read before it was let go) is not shown.
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_queue_depth{partition=\"2\"}"
            ),
            None
        );
        assert_eq!(
            value(
                &text,
                &format!("ultrasync_sequencer_partition_ops_written_total{{partition=\"{p}\"}}")
            ),
            Some(5.0)
        );
        assert_eq!(
            value(&text, "ultrasync_sequencer_dropped_replies_total"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "ultrasync_sequencer_batch_commands_count"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_batch_commands_bucket{le=\"8.0\"}"
            ),
            Some(1.0)
        );
        assert_eq!(value(&text, "ultrasync_sequencer_batch_ops_sum"), Some(5.0));
        assert_eq!(
            value(&text, "ultrasync_sequencer_commit_seconds_count"),
            Some(1.0)
        );

        // Let go and taken again: the same counters, not a new series from zero.
        m.released(1);
        let text = ultrasync_metrics::render(&registry).expect("render");
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_owned{partition=\"1\"}"
            ),
            Some(0.0)
        );
        assert!(!text.contains("lease_expiry_seconds{partition=\"1\"}"));
        m.source(1).commands.fetch_add(1, Ordering::Relaxed);
        let text = ultrasync_metrics::render(&registry).expect("render");
        assert_eq!(
            value(
                &text,
                "ultrasync_sequencer_partition_commands_total{partition=\"1\"}"
            ),
            Some(4.0)
        );
        assert_eq!(
            value(&text, "ultrasync_sequencer_commands_total"),
            Some(4.0)
        );
        // Every family has its HELP and TYPE, and every sample belongs to one.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().expect("name");
            assert!(
                families.iter().any(|f| name.starts_with(f)),
                "{name} has no TYPE"
            );
        }
        for f in &families {
            assert!(text.contains(&format!("# HELP {f} ")), "{f} has no HELP");
        }
    }
}
