//! `/metrics` reflects what happened on real sockets.

use std::time::Duration;

use serde_json::json;
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_testkit::{ORG, Stack, http_get};

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
        sample(&text, "ultrasync_webhook_dead_lettered_total"),
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
