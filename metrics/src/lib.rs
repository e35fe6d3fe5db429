//! How every service shows its metrics: one prometheus-client [`Registry`] per
//! service instance (tests run several services in one process, so nothing is
//! process-wide), rendered as OpenMetrics text and served on `/metrics`. The gateway
//! answers `/metrics` on its own HTTP listener with [`response`]; the sequencer,
//! materializer and compactor serve theirs on `metrics_listen` with [`serve`], which
//! also answers `/healthz`.
//!
//! Names follow one scheme, `ultrasync_<service>_…`: a service registers under
//! `Registry::with_prefix("ultrasync_<service>")`. Counters are registered without
//! `_total` (the encoder adds it), durations in seconds and sizes in bytes with their
//! unit. Values that are only known at scrape time (the sizes of a service's maps,
//! per-key figures, queue depths read from NATS) come from a `Collector` that writes
//! them with [`counters`] and [`gauges`]; an [`Exposition`] may refresh what such a
//! collector reads before it is encoded.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The content type of `/metrics`: OpenMetrics 1.0 text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of duration histograms: half a millisecond (a write to a
/// local nats-server) to ten seconds (a compaction pass over many keys).
pub const SECONDS_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// No labels: the label set of a single sample.
pub const NO_LABELS: [(&str, &str); 0] = [];

/// `registry` as OpenMetrics text, ending with `# EOF`. Fails only when a
/// collector does.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// The answer to `GET /metrics`: the text with its content type, or 500 when it
/// could not be rendered.
pub fn response(text: Result<String, fmt::Error>) -> Response {
    match text {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(_) => {
            warn!("rendering the metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// What a metrics listener shows: the text of one scrape.
pub trait Exposition: Send + Sync + 'static {
    fn render(&self) -> impl Future<Output = Result<String, fmt::Error>> + Send;
}

impl Exposition for Registry {
    fn render(&self) -> impl Future<Output = Result<String, fmt::Error>> + Send {
        std::future::ready(render(self))
    }
}

/// Binds `service`'s metrics listener on `addr`, when one is configured. Services
/// bind before anything else, so a taken port stops the start at once.
pub async fn bind(service: &str, addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {service}'s metrics to {addr}"))?;
    Ok(Some(listener))
}

/// Serves `/metrics` (what `exposition` renders at each scrape) and `/healthz` on
/// `listener` until `shutdown`.
pub async fn serve<E: Exposition>(
    service: &str,
    listener: TcpListener,
    exposition: Arc<E>,
    shutdown: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(service, %addr, "metrics listening");
    }
    let app = Router::new()
        .route("/metrics", get(scrape::<E>))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(exposition);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(service, error = %e, "the metrics listener stopped");
    }
}

async fn scrape<E: Exposition>(State(exposition): State<Arc<E>>) -> Response {
    response(exposition.render().await)
}

/// Writes a counter family whose values are read at scrape time (from a
/// `Collector`): `name` without `_total`, one sample per label set. A family without
/// samples is left out, as prometheus-client leaves out an empty registered family.
pub fn counters<S: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (S, u64)>,
) -> fmt::Result {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes a gauge family whose values are read at scrape time; `unit`, when given,
/// ends the name (`…_seconds`) as it does for registered metrics. A family without
/// samples is left out.
pub fn gauges<S: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (S, V)>,
) -> fmt::Result {
    let mut samples = samples.into_iter().peekable();
    if samples.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter without labels, read at scrape time.
pub fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    counters(encoder, name, help, [(NO_LABELS, value)])
}

/// One gauge without labels, read at scrape time.
pub fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> fmt::Result {
    gauges(encoder, name, help, None, [(NO_LABELS, value)])
}

#[cfg(test)]
mod tests {
    use prometheus_client::collector::Collector;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    #[derive(Debug)]
    struct Sizes;

    impl Collector for Sizes {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            gauge(&mut encoder, "rooms", "Rooms open.", 3u64)?;
            counters(
                &mut encoder,
                "purged",
                "Ops purged, per stream key.",
                [
                    ([("stream_key", "a/b/c")], 7),
                    ([("stream_key", "a\"b")], 1),
                ],
            )?;
            gauges(
                &mut encoder,
                "lease_expiry",
                "When the lease runs out.",
                Some(&Unit::Seconds),
                [([("partition", "2")], 12.5)],
            )?;
            counters(
                &mut encoder,
                "let_go",
                "Nothing yet.",
                Vec::<([(&str, &str); 1], u64)>::new(),
            )
        }
    }

    #[test]
    fn registered_and_collected_metrics_share_the_prefix_and_end_with_eof() {
        let mut registry = Registry::with_prefix("ultrasync_test");
        let acks = Counter::<u64>::default();
        registry.register("acks", "Commands acknowledged", acks.clone());
        let latency = Histogram::new(SECONDS_BUCKETS);
        registry.register_with_unit(
            "ack_latency",
            "From a command's arrival to its ack",
            Unit::Seconds,
            latency.clone(),
        );
        registry.register_collector(Box::new(Sizes));
        acks.inc();
        latency.observe(0.003);

        let text = render(&registry).expect("render");
        for line in [
            "# TYPE ultrasync_test_acks counter\n",
            "ultrasync_test_acks_total 1\n",
            "# TYPE ultrasync_test_ack_latency_seconds histogram\n",
            "# UNIT ultrasync_test_ack_latency_seconds seconds\n",
            "ultrasync_test_ack_latency_seconds_bucket{le=\"0.0025\"} 0\n",
            "ultrasync_test_ack_latency_seconds_bucket{le=\"0.005\"} 1\n",
            "ultrasync_test_ack_latency_seconds_bucket{le=\"+Inf\"} 1\n",
            "ultrasync_test_ack_latency_seconds_count 1\n",
            "# TYPE ultrasync_test_rooms gauge\n",
            "ultrasync_test_rooms 3\n",
            "ultrasync_test_purged_total{stream_key=\"a/b/c\"} 7\n",
            "ultrasync_test_purged_total{stream_key=\"a\\\"b\"} 1\n",
            "# TYPE ultrasync_test_lease_expiry_seconds gauge\n",
            "ultrasync_test_lease_expiry_seconds{partition=\"2\"} 12.5\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert!(!text.contains("let_go"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
