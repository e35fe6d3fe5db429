//! Gateway metrics, in the gateway's own registry (names `ultrasync_gateway_…`),
//! rendered as OpenMetrics text on `/metrics` (and in part shown on `/v1/status`).
//!
//! Counters bumped on the sockets' hot paths are plain atomics, and the sizes of the
//! gateway's maps are probes handed in by their owners; both are read by the
//! registry's collector at each scrape. The ack latency is a histogram and rejects
//! a counter family by code.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use ultrasync_metrics::{counter, gauge};
use ultrasync_shared::ErrorCode;

/// Upper bounds (seconds) of the ack latency histogram.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// The label set of a reject: its code.
type RejectCode = [(&'static str, &'static str); 1];

pub struct Metrics {
    /// Open sockets (gauge).
    pub connections: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub auth_failures: AtomicU64,
    /// Text frames received from clients.
    pub messages_in: AtomicU64,
    /// Frames written to clients.
    pub messages_out: AtomicU64,
    pub acks: AtomicU64,
    rejects: Family<RejectCode, Counter>,
    /// Command received → ack sent.
    ack_latency: Histogram,
    pub webhooks: Arc<crate::webhooks::WebhookMetrics>,
    /// Per socket: how many frames wait in its outbound queue (`None` once closed).
    queues: Mutex<BTreeMap<String, QueueProbe>>,
    /// Values read from their owner at each scrape (sizes of the gateway's maps).
    probes: Mutex<Vec<Probe>>,
    /// What `/metrics` renders: the histogram, the rejects and a collector reading
    /// the rest of this struct.
    registry: Registry,
}

type QueueProbe = Box<dyn Fn() -> Option<usize> + Send + Sync>;

/// A gauge (or counter) read at each scrape.
struct Probe {
    name: &'static str,
    /// `gauge` or `counter`.
    kind: &'static str,
    help: &'static str,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Self>| {
            let rejects = Family::<RejectCode, Counter>::default();
            let ack_latency = Histogram::new(LATENCY_BUCKETS);
            let mut registry = Registry::default();
            registry.register(
                "ultrasync_gateway_rejects",
                "Commands rejected, by code",
                rejects.clone(),
            );
            registry.register_with_unit(
                "ultrasync_gateway_ack_latency",
                "From a command's arrival to its ack",
                Unit::Seconds,
                ack_latency.clone(),
            );
            registry.register_collector(Box::new(Collected(me.clone())));
            Self {
                connections: AtomicU64::new(0),
                slow_consumers: AtomicU64::new(0),
                auth_failures: AtomicU64::new(0),
                messages_in: AtomicU64::new(0),
                messages_out: AtomicU64::new(0),
                acks: AtomicU64::new(0),
                rejects,
                ack_latency,
                webhooks: Default::default(),
                queues: Mutex::default(),
                probes: Mutex::default(),
                registry,
            }
        })
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reject(&self, code: ErrorCode) {
        self.rejects.get_or_create(&[("code", code.as_str())]).inc();
    }

    /// Tracks socket `id`'s outbound queue until [`Metrics::untrack_queue`].
    pub fn track_queue(&self, id: &str, probe: QueueProbe) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), probe);
    }

    pub fn untrack_queue(&self, id: &str) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Shows `name` with the value `read` gives at each scrape (`kind`: `gauge` or
    /// `counter`; a counter's name ends with `_total`).
    pub fn probe(
        &self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        read: Box<dyn Fn() -> u64 + Send + Sync>,
    ) {
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Probe {
                name,
                kind,
                help,
                read,
            });
    }

    /// (frames queued over all sockets, the fullest socket's queue).
    pub fn queue_depths(&self) -> (u64, u64) {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .values()
            .filter_map(|probe| probe())
            .fold((0, 0), |(sum, max), d| (sum + d as u64, max.max(d as u64)))
    }

    pub fn ack_latency(&self, d: Duration) {
        self.ack_latency.observe(d.as_secs_f64());
    }

    /// The OpenMetrics text of `/metrics`.
    pub fn render(&self) -> Result<String, fmt::Error> {
        ultrasync_metrics::render(&self.registry)
    }
}

/// Reads the atomics and probes of the gateway's [`Metrics`] at each scrape.
struct Collected(Weak<Metrics>);

impl fmt::Debug for Collected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("gateway metrics")
    }
}

impl Collector for Collected {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let Some(m) = self.0.upgrade() else {
            return Ok(());
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (queued, fullest) = m.queue_depths();
        gauge(
            &mut e,
            "ultrasync_gateway_outbound_queued_frames",
            "Frames waiting in the outbound queues of all sockets.",
            queued,
        )?;
        gauge(
            &mut e,
            "ultrasync_gateway_outbound_queue_max_frames",
            "Frames waiting in the fullest socket's outbound queue (the limit is outbound_queue).",
            fullest,
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_webhook_deliveries",
            "Ops delivered to webhook endpoints (every event answered 2xx).",
            get(&m.webhooks.delivered),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_webhook_failed_attempts",
            "Webhook attempts that failed (retried with backoff).",
            get(&m.webhooks.failed_attempts),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_webhook_dead_lettered",
            "Ops given up on after max_attempts and sent to USYNC_WEBHOOKS_DLQ.",
            get(&m.webhooks.dead_lettered),
        )?;
        gauge(
            &mut e,
            "ultrasync_gateway_connections",
            "Open WebSocket connections.",
            get(&m.connections),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_messages_in",
            "Frames received from clients.",
            get(&m.messages_in),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_messages_out",
            "Frames written to clients.",
            get(&m.messages_out),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_acks",
            "Commands acknowledged.",
            get(&m.acks),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_slow_consumers",
            "Sockets closed as slow consumers (4001).",
            get(&m.slow_consumers),
        )?;
        counter(
            &mut e,
            "ultrasync_gateway_auth_failures",
            "Connections refused for their token.",
            get(&m.auth_failures),
        )?;
        for p in m.probes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let value = (p.read)();
            match p.kind {
                "counter" => {
                    let name = p.name.strip_suffix("_total").unwrap_or(p.name);
                    counter(&mut e, name, p.help, value)?
                }
                _ => gauge(&mut e, p.name, p.help, value)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_probes_and_a_cumulative_histogram() {
        let m = Metrics::new();
        Metrics::inc(&m.acks);
        m.reject(ErrorCode::PreconditionFailed);
        m.reject(ErrorCode::PreconditionFailed);
        m.ack_latency(Duration::from_micros(1500));
        m.ack_latency(Duration::from_secs(9));
        m.probe(
            "ultrasync_gateway_followed_stream_keys",
            "gauge",
            "Stream keys this gateway follows.",
            Box::new(|| 3),
        );
        m.probe(
            "ultrasync_gateway_presence_dropped_total",
            "counter",
            "Presence entries from other gateways dropped for a bound.",
            Box::new(|| 4),
        );
        let text = m.render().expect("render");
        for line in [
            "# TYPE ultrasync_gateway_acks counter\n",
            "ultrasync_gateway_acks_total 1\n",
            "ultrasync_gateway_rejects_total{code=\"precondition_failed\"} 2\n",
            "# TYPE ultrasync_gateway_ack_latency_seconds histogram\n",
            "ultrasync_gateway_ack_latency_seconds_bucket{le=\"0.001\"} 0\n",
            "ultrasync_gateway_ack_latency_seconds_bucket{le=\"0.002\"} 1\n",
            "ultrasync_gateway_ack_latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "ultrasync_gateway_ack_latency_seconds_count 2\n",
            "# TYPE ultrasync_gateway_followed_stream_keys gauge\n",
            "ultrasync_gateway_followed_stream_keys 3\n",
            "# TYPE ultrasync_gateway_presence_dropped counter\n",
            "ultrasync_gateway_presence_dropped_total 4\n",
            "ultrasync_gateway_webhook_dead_lettered_total 0\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
