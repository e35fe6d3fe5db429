//! `/metrics` reflects what happened on real sockets, every service serves
//! OpenMetrics, and the Grafana dashboard queries only what they serve.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use openmetrics_parser::openmetrics::parse_openmetrics;
use openmetrics_parser::{MetricFamily, MetricsExposition, OpenMetricsType, OpenMetricsValue};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_testkit::{ORG, Stack, StackOptions, http_exchange, http_get, wait_for_snapshot};

#[path = "support/amrepo.rs"]
mod amrepo;

/// The value of one sample line (`name{labels} value`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(series))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_acks_rejects_latency_and_connections() {
    let stack = Stack::start().await;
    let mut c = stack.client("mo", "web", "mo-1", &[]).await;
    c.command("ok-1", "index", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    // settings is cas: no precondition is an invalid_op reject from the sequencer.
    c.command("bad-1", "settings", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    // An unknown namespace is rejected by the gateway itself.
    c.command("bad-2", "nowhere", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    let mut answers = 0;
    while answers < 3 {
        if matches!(
            c.recv_timeout(Duration::from_secs(10))
                .await
                .expect("answer"),
            ServerMessage::Ack { .. } | ServerMessage::Reject { .. }
        ) {
            answers += 1;
        }
    }

    let (status, text) = http_get(&format!("http://{}/metrics", stack.http))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "ultrasync_gateway_connections"), Some(1.0));
    assert_eq!(sample(&text, "ultrasync_gateway_acks_total"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "ultrasync_gateway_rejects_total{code=\"invalid_op\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "ultrasync_gateway_rejects_total{code=\"unknown_namespace\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ultrasync_gateway_ack_latency_seconds_count"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "ultrasync_gateway_ack_latency_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(1.0)
    );
    // Queue depths: gauges present (the socket reads, so its queue is near empty).
    assert!(sample(&text, "ultrasync_gateway_outbound_queued_frames").is_some());
    assert!(
        sample(&text, "ultrasync_gateway_outbound_queue_max_frames").is_some_and(|v| v <= 1024.0)
    );
    assert_eq!(
        sample(&text, "ultrasync_gateway_webhook_dead_lettered_total"),
        Some(0.0)
    );
    // hello + 3 commands in; welcome + 3 answers out.
    assert!(sample(&text, "ultrasync_gateway_messages_in_total") >= Some(4.0));
    assert!(sample(&text, "ultrasync_gateway_messages_out_total") >= Some(4.0));

    // A refused token is counted.
    assert!(
        ultrasync_client::Connection::connect(&stack.ws_url(), "garbage")
            .await
            .is_err()
    );
    let (_, text) = http_get(&format!("http://{}/metrics", stack.http))
        .await
        .expect("metrics");
    assert_eq!(
        sample(&text, "ultrasync_gateway_auth_failures_total"),
        Some(1.0)
    );

    // The automerge-repo door: sockets, documents, changes, ephemeral messages.
    let http = stack.http.to_string();
    let url =
        |scope: &str| amrepo::endpoint(&http, ORG, "web", "collab", &stack.token("am", scope));
    let mut a = amrepo::Peer::join(&url("read write"), "am-a").await;
    let mut b = amrepo::Peer::join(&url("read write"), "am-b").await;
    let mut r = amrepo::Peer::join(&url("read"), "am-r").await;
    let (change, hash) = amrepo::change_message("k", 1);
    a.sync("sync", "mdoc", change).await;
    a.until_heads("mdoc", &hash).await;
    b.sync("request", "mdoc", amrepo::empty_request()).await;
    b.until_heads("mdoc", &hash).await;
    // A read-only token's change is refused.
    let (change, _) = amrepo::change_message("k", 2);
    r.sync("sync", "mdoc", change).await;
    let refused = r.until("error").await;
    assert!(amrepo::message(&refused).contains("mdoc"), "{refused:?}");
    // An ephemeral message from a reaches b (and r, also on the document).
    assert!(a.ephemeral("mdoc", "s1", 1, vec![1, 2, 3]).await);
    let e = b.until("ephemeral").await;
    assert_eq!(
        amrepo::field(&e, "data"),
        Some(&ciborium::Value::Bytes(vec![1, 2, 3]))
    );
    let (_, text) = http_get(&format!("http://{}/metrics", stack.http))
        .await
        .expect("metrics");
    for (series, want) in [
        ("ultrasync_gateway_automerge_sockets", 3.0),
        ("ultrasync_gateway_automerge_documents", 1.0),
        ("ultrasync_gateway_automerge_documents_idle", 0.0),
        ("ultrasync_gateway_automerge_changes_submitted_total", 1.0),
        ("ultrasync_gateway_automerge_changes_refused_total", 1.0),
        ("ultrasync_gateway_automerge_ephemeral_out_total", 2.0),
        ("ultrasync_gateway_automerge_ephemeral_dropped_total", 0.0),
        ("ultrasync_gateway_automerge_documents_evicted_total", 0.0),
        ("ultrasync_gateway_automerge_documents_refused_total", 0.0),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series}");
    }
    a.close().await;
    b.close().await;
    r.close().await;
    stack.shutdown().await;
}

/// Every service's `/metrics`, fetched over HTTP after real writes: OpenMetrics text
/// that a strict parser accepts, the families each service promises with their
/// types, and the counters and histograms the writes must have moved above zero
/// (counts only; no timing is asserted). Then the Grafana dashboard: every metric
/// its panels query is one of the families scraped, of a type that fits the suffix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_openmetrics_and_the_dashboard_queries_only_what_they_serve() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            let any_port = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            c.sequencer.metrics_listen = any_port;
            c.materializer.metrics_listen = any_port;
            c.materializer.snapshot_every_ops = 5;
            c.compactor.interval_secs = 1;
        },
        ..StackOptions::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let compactor_metrics = listener.local_addr().expect("addr");
    let stop_compactor = CancellationToken::new();
    let compactor = tokio::spawn(ultrasync_compactor::run_with_metrics(
        stack.config.clone(),
        Some(listener),
        stop_compactor.clone(),
    ));

    // Twelve writes (a snapshot is due after five), a reject from the sequencer
    // (settings is cas: no precondition) and one from the gateway.
    // The client resumes from a cursor, which the compactor then reports the lag of.
    let mut c = stack
        .client("mo", "web", "mo-1", &[("index", Some(0))])
        .await;
    for i in 0..12 {
        c.command(
            &format!("ok-{i}"),
            "index",
            &format!("k{i}"),
            OpType::Set,
            json!(i),
        )
        .await
        .expect("send");
    }
    c.command("bad-1", "settings", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    c.command("bad-2", "nowhere", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    let mut answers = 0;
    while answers < 14 {
        if matches!(
            c.recv_timeout(Duration::from_secs(10))
                .await
                .expect("answer"),
            ServerMessage::Ack { .. } | ServerMessage::Reject { .. }
        ) {
            answers += 1;
        }
    }
    wait_for_snapshot(&stack, "web", "index", 5).await;

    let services = [
        ("gateway", stack.http),
        (
            "sequencer",
            stack.sequencer_metrics(0).expect("sequencer metrics"),
        ),
        (
            "materializer",
            stack.materializer_metrics(0).expect("materializer metrics"),
        ),
        ("compactor", compactor_metrics),
    ];
    // The snapshot is counted once stored, the compactor's first pass ends a second
    // after its start and sees the cursor once the gateway has written it (every
    // second): scrape until all three show.
    let mut scrapes = Vec::new();
    for _ in 0..150 {
        scrapes.clear();
        for (service, addr) in services {
            scrapes.push((service, scrape(addr).await));
        }
        let moved = |family: &str| {
            scrapes
                .iter()
                .any(|(_, s)| s.families.get(family).is_some_and(|f| total(f) > 0.0))
        };
        if moved("ultrasync_materializer_snapshots_written")
            && moved("ultrasync_compactor_passes")
            && moved("ultrasync_compactor_cursor_lag")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    use OpenMetricsType::{Counter, Gauge, Histogram, Info};
    // (service, family, type, moved by the writes above)
    let expected = [
        ("gateway", "ultrasync_gateway_acks", Counter, true),
        ("gateway", "ultrasync_gateway_rejects", Counter, true),
        (
            "gateway",
            "ultrasync_gateway_ack_latency_seconds",
            Histogram,
            true,
        ),
        ("gateway", "ultrasync_gateway_messages_in", Counter, true),
        ("gateway", "ultrasync_gateway_messages_out", Counter, true),
        ("gateway", "ultrasync_gateway_connections", Gauge, true),
        (
            "gateway",
            "ultrasync_gateway_followed_stream_keys",
            Gauge,
            true,
        ),
        (
            "gateway",
            "ultrasync_gateway_outbound_queued_frames",
            Gauge,
            false,
        ),
        (
            "gateway",
            "ultrasync_gateway_outbound_queue_max_frames",
            Gauge,
            false,
        ),
        (
            "gateway",
            "ultrasync_gateway_slow_consumers",
            Counter,
            false,
        ),
        (
            "gateway",
            "ultrasync_gateway_webhook_deliveries",
            Counter,
            false,
        ),
        (
            "gateway",
            "ultrasync_gateway_webhook_dead_lettered",
            Counter,
            false,
        ),
        ("gateway", "ultrasync_gateway_presence_rooms", Gauge, false),
        ("gateway", "ultrasync_gateway_uptime_seconds", Gauge, false),
        ("sequencer", "ultrasync_sequencer", Info, true),
        ("sequencer", "ultrasync_sequencer_partitions", Gauge, true),
        (
            "sequencer",
            "ultrasync_sequencer_partition_owned",
            Gauge,
            true,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_partition_queue_depth",
            Gauge,
            false,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_partition_lease_expiry_seconds",
            Gauge,
            true,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_partition_commands",
            Counter,
            true,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_partition_ops_written",
            Counter,
            true,
        ),
        ("sequencer", "ultrasync_sequencer_commands", Counter, true),
        (
            "sequencer",
            "ultrasync_sequencer_retry_reads",
            Counter,
            false,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_ops_written",
            Counter,
            true,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_batch_commands",
            Histogram,
            true,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_batch_ops",
            Histogram,
            true,
        ),
        (
            "sequencer",
            "ultrasync_sequencer_commit_seconds",
            Histogram,
            true,
        ),
        (
            "materializer",
            "ultrasync_materializer_ops_applied",
            Counter,
            true,
        ),
        (
            "materializer",
            "ultrasync_materializer_apply_seconds",
            Histogram,
            true,
        ),
        (
            "materializer",
            "ultrasync_materializer_snapshots_written",
            Counter,
            true,
        ),
        (
            "materializer",
            "ultrasync_materializer_snapshot_seconds",
            Histogram,
            true,
        ),
        (
            "materializer",
            "ultrasync_materializer_snapshot_size_bytes",
            Histogram,
            true,
        ),
        (
            "materializer",
            "ultrasync_materializer_snapshot_failures",
            Counter,
            false,
        ),
        (
            "materializer",
            "ultrasync_materializer_rebuilds",
            Counter,
            false,
        ),
        (
            "materializer",
            "ultrasync_materializer_snapshot_reads",
            Counter,
            false,
        ),
        ("compactor", "ultrasync_compactor_passes", Counter, true),
        (
            "compactor",
            "ultrasync_compactor_pass_seconds",
            Histogram,
            true,
        ),
        (
            "compactor",
            "ultrasync_compactor_failed_passes",
            Counter,
            false,
        ),
        ("compactor", "ultrasync_compactor_floor", Gauge, false),
        (
            "compactor",
            "ultrasync_compactor_ops_purged",
            Counter,
            false,
        ),
        ("compactor", "ultrasync_compactor_cursor_lag", Gauge, false),
        (
            "compactor",
            "ultrasync_compactor_readers_let_go",
            Counter,
            false,
        ),
    ];
    for (service, name, kind, moved) in expected {
        let (_, scraped) = scrapes
            .iter()
            .find(|(s, _)| *s == service)
            .expect("scraped");
        let family = scraped
            .families
            .get(name)
            .unwrap_or_else(|| panic!("{service} has no {name}"));
        assert_eq!(family.family_type, kind, "{service}: {name}");
        if moved {
            assert!(total(family) > 0.0, "{service}: {name} did not move");
        }
    }
    // One naming scheme: every family starts with its service's prefix.
    for (service, scraped) in &scrapes {
        for name in scraped.families.keys() {
            assert!(
                name.starts_with(&format!("ultrasync_{service}")),
                "{service} serves {name}"
            );
        }
    }

    // The dashboard queries only what the services serve.
    let exposed: HashMap<String, OpenMetricsType> = scrapes
        .iter()
        .flat_map(|(_, s)| s.families.iter().map(|(n, f)| (n.clone(), f.family_type)))
        .collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/ultrasync.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard"))
            .expect("dashboard JSON");
    let targets = dashboard_targets(&dashboard);
    assert!(targets.len() >= 20, "{} queries", targets.len());
    for (panel, expr) in &targets {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{panel}: no metric in {expr}");
        for name in names {
            assert!(
                family_of(&exposed, &name).is_some(),
                "panel {panel:?} queries {name}, which no service serves ({expr})"
            );
        }
    }
    // The check catches a panel naming a metric nobody serves, or the wrong type.
    for (expr, missing) in [
        (
            "sum(rate(ultrasync_gateway_nope_total[$__rate_interval]))",
            "ultrasync_gateway_nope_total",
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(ultrasync_gateway_acks_bucket[5m])))",
            "ultrasync_gateway_acks_bucket",
        ),
        (
            "ultrasync_gateway_ack_latency_seconds",
            "ultrasync_gateway_ack_latency_seconds",
        ),
    ] {
        assert_eq!(
            metric_names(expr)
                .into_iter()
                .filter(|n| family_of(&exposed, n).is_none())
                .collect::<Vec<_>>(),
            vec![missing.to_owned()],
            "{expr}"
        );
    }

    stop_compactor.cancel();
    compactor
        .await
        .expect("the compactor's task")
        .expect("the compactor stopped");
    stack.shutdown().await;
}

/// `/metrics` of the service at `addr`: OpenMetrics text, parsed strictly.
async fn scrape(addr: SocketAddr) -> MetricsExposition<OpenMetricsType, OpenMetricsValue> {
    let r = http_exchange("GET", &format!("http://{addr}/metrics"), &[], "")
        .await
        .expect("scrape");
    assert_eq!(r.status, 200, "{addr}: {}", r.body);
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{addr}"
    );
    // openmetrics-parser 0.5 refuses a UNIT on a histogram, which OpenMetrics allows
    // (and Prometheus reads): those lines are checked here and left out of the parse.
    let histograms: HashSet<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram"))
        .collect();
    let mut text = String::with_capacity(r.body.len());
    for line in r.body.lines() {
        if let Some(unit) = line.strip_prefix("# UNIT ") {
            let (name, unit) = unit.split_once(' ').expect("a family and its unit");
            assert!(name.ends_with(&format!("_{unit}")), "{addr}: {line}");
            if histograms.contains(name) {
                continue;
            }
        }
        text.push_str(line);
        text.push('\n');
    }
    parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("{addr} serves what is not OpenMetrics ({e:?}):\n{}", r.body))
}

/// A family's counters summed, or its histograms' counts; gauges and infos: 1 when
/// the family has any sample.
fn total(family: &MetricFamily<OpenMetricsType, OpenMetricsValue>) -> f64 {
    family
        .iter_samples()
        .map(|s| match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Histogram(h) => h.count.unwrap_or(0) as f64,
            _ => 1.0,
        })
        .sum()
}

/// (panel title, expr) of every query in `dashboard`, rows' panels included.
fn dashboard_targets(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((title.to_owned(), expr.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// keywords, label names (matchers, `by`/`without`/`on`/`ignoring` lists) or inside
/// range brackets and strings.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: [&str; 9] = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "group_left",
        "group_right",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: [&str; 4] = ["by", "without", "on", "ignoring"];
    // Aggregations may put `by (…)` between their name and their parentheses.
    const AGGREGATIONS: [&str; 14] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    // Blank out label matchers, ranges and strings.
    let mut plain = String::with_capacity(expr.len());
    let (mut braces, mut brackets, mut quoted) = (0, 0, false);
    for ch in expr.chars() {
        match ch {
            '"' => quoted = !quoted,
            '{' if !quoted => braces += 1,
            '}' if !quoted => braces -= 1,
            '[' if !quoted => brackets += 1,
            ']' if !quoted => brackets -= 1,
            _ if !quoted && braces == 0 && brackets == 0 => {
                plain.push(ch);
                continue;
            }
            _ => {}
        }
        plain.push(' ');
    }
    let chars: Vec<char> = plain.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if ch.is_ascii_digit() || ch == '.' {
            // A number (0.99, 1e3): skip it whole.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !(ch.is_ascii_alphabetic() || ch == '_' || ch == ':') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
        {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let mut next = i;
        while next < chars.len() && chars[next] == ' ' {
            next += 1;
        }
        let calls = chars.get(next) == Some(&'(');
        if LABEL_LISTS.contains(&word.as_str()) || word == "group_left" || word == "group_right" {
            // Skip the label list that follows.
            if calls && let Some(end) = chars[next..].iter().position(|c| *c == ')') {
                i = next + end + 1;
            }
            continue;
        }
        if calls || KEYWORDS.contains(&word.as_str()) || AGGREGATIONS.contains(&word.as_str()) {
            continue;
        }
        names.push(word);
    }
    names
}

/// The family a PromQL metric name reads, when it is served with a type that has
/// such a sample: `_total` of a counter, `_bucket`/`_sum`/`_count` of a histogram,
/// `_info` of an info, the bare name of a gauge.
fn family_of(exposed: &HashMap<String, OpenMetricsType>, name: &str) -> Option<String> {
    let suffixes = [
        ("_total", OpenMetricsType::Counter),
        ("_bucket", OpenMetricsType::Histogram),
        ("_sum", OpenMetricsType::Histogram),
        ("_count", OpenMetricsType::Histogram),
        ("_info", OpenMetricsType::Info),
    ];
    for (suffix, kind) in suffixes {
        if let Some(family) = name.strip_suffix(suffix)
            && exposed.get(family) == Some(&kind)
        {
            return Some(family.to_owned());
        }
    }
    (exposed.get(name) == Some(&OpenMetricsType::Gauge)).then(|| name.to_owned())
}
