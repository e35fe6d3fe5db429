//! Gateway metrics, exported on `/metrics` in the Prometheus text format (and in part
//! on `/v1/status`). Plain atomics; no registry crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ultrasync_shared::ErrorCode;

/// Upper bounds (seconds) of the ack latency histogram.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

#[derive(Default)]
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
    rejects: Mutex<BTreeMap<&'static str, u64>>,
    /// Command received → ack sent, per bucket (cumulative counts are built when
    /// rendering), plus the sum in microseconds and the count.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
    pub webhooks: std::sync::Arc<crate::webhooks::WebhookMetrics>,
    /// Per socket: how many frames wait in its outbound queue (`None` once closed).
    queues: Mutex<BTreeMap<String, QueueProbe>>,
    /// Gauges read from their owner when rendering (sizes of the gateway's maps).
    gauges: Mutex<Vec<Gauge>>,
}

type QueueProbe = Box<dyn Fn() -> Option<usize> + Send + Sync>;

/// A gauge (or counter) read when rendering: (name, kind, help, probe).
type Gauge = (
    &'static str,
    &'static str,
    &'static str,
    Box<dyn Fn() -> u64 + Send + Sync>,
);

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reject(&self, code: ErrorCode) {
        let mut r = self.rejects.lock().unwrap_or_else(|p| p.into_inner());
        *r.entry(code.as_str()).or_default() += 1;
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

    /// Renders `name` with the value `probe` gives at the time (`kind`: `gauge` or
    /// `counter`).
    pub fn probe(
        &self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        probe: Box<dyn Fn() -> u64 + Send + Sync>,
    ) {
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, kind, help, probe));
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
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, followed_stream_keys: usize, uptime: Duration) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (queued, fullest) = self.queue_depths();
        metric(
            "ultrasync_gateway_outbound_queued_frames",
            "gauge",
            "Frames waiting in the outbound queues of all sockets.",
            queued,
        );
        metric(
            "ultrasync_gateway_outbound_queue_max_frames",
            "gauge",
            "Frames waiting in the fullest socket's outbound queue (the limit is outbound_queue).",
            fullest,
        );
        metric(
            "ultrasync_webhook_deliveries_total",
            "counter",
            "Ops delivered to webhook endpoints (every event answered 2xx).",
            get(&self.webhooks.delivered),
        );
        metric(
            "ultrasync_webhook_failed_attempts_total",
            "counter",
            "Webhook attempts that failed (retried with backoff).",
            get(&self.webhooks.failed_attempts),
        );
        metric(
            "ultrasync_webhook_dead_lettered_total",
            "counter",
            "Ops given up on after max_attempts and sent to USYNC_WEBHOOKS_DLQ.",
            get(&self.webhooks.dead_lettered),
        );
        metric(
            "ultrasync_gateway_connections",
            "gauge",
            "Open WebSocket connections.",
            get(&self.connections),
        );
        metric(
            "ultrasync_gateway_followed_stream_keys",
            "gauge",
            "Stream keys this gateway follows.",
            followed_stream_keys as u64,
        );
        metric(
            "ultrasync_gateway_uptime_seconds",
            "gauge",
            "Seconds since start.",
            uptime.as_secs(),
        );
        metric(
            "ultrasync_gateway_messages_in_total",
            "counter",
            "Frames received from clients.",
            get(&self.messages_in),
        );
        metric(
            "ultrasync_gateway_messages_out_total",
            "counter",
            "Frames written to clients.",
            get(&self.messages_out),
        );
        metric(
            "ultrasync_gateway_acks_total",
            "counter",
            "Commands acknowledged.",
            get(&self.acks),
        );
        metric(
            "ultrasync_gateway_slow_consumers_total",
            "counter",
            "Sockets closed as slow consumers (4001).",
            get(&self.slow_consumers),
        );
        metric(
            "ultrasync_gateway_auth_failures_total",
            "counter",
            "Connections refused for their token.",
            get(&self.auth_failures),
        );
        for (name, kind, help, probe) in
            self.gauges.lock().unwrap_or_else(|p| p.into_inner()).iter()
        {
            metric(name, kind, help, probe());
        }
        let _ = writeln!(
            out,
            "# HELP ultrasync_gateway_rejects_total Commands rejected, by code.\n# TYPE ultrasync_gateway_rejects_total counter"
        );
        for (code, n) in self
            .rejects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "ultrasync_gateway_rejects_total{{code=\"{code}\"}} {n}"
            );
        }
        let name = "ultrasync_gateway_ack_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From a command's arrival to its ack.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += get(&self.latency[i]);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += get(&self.latency[LATENCY_BUCKETS.len()]);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", get(&self.latency_sum_us) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", get(&self.latency_count));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        Metrics::inc(&m.acks);
        m.reject(ErrorCode::PreconditionFailed);
        m.reject(ErrorCode::PreconditionFailed);
        m.ack_latency(Duration::from_micros(1500));
        m.ack_latency(Duration::from_secs(9));
        let text = m.render(3, Duration::from_secs(5));
        assert!(text.contains("ultrasync_gateway_acks_total 1\n"));
        assert!(text.contains("ultrasync_gateway_rejects_total{code=\"precondition_failed\"} 2\n"));
        assert!(text.contains("ultrasync_gateway_ack_latency_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("ultrasync_gateway_ack_latency_seconds_bucket{le=\"0.002\"} 1\n"));
        assert!(text.contains("ultrasync_gateway_ack_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("ultrasync_gateway_ack_latency_seconds_count 2\n"));
        assert!(text.contains("ultrasync_gateway_followed_stream_keys 3\n"));
    }
}
