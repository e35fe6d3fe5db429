//! A command's `base_seq` (the cursor the client edited on) against a compacted log:
//! below the floor it is refused `stale_base` and nothing is written, at the floor it
//! lands, a retry of an applied command keeps its original ack whatever base it
//! names, and the SDK resyncs an offline edit made on a purged state and lands it.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::sync::{Change, SyncClient, SyncOptions};
use ultrasync_compactor::compact_once;
use ultrasync_shared::nats::{OPS_STREAM, ops_subject};
use ultrasync_shared::{StreamKey, log};
use ultrasync_testkit::{Stack, StackOptions, wait_for_snapshot};

const WAIT: Duration = Duration::from_secs(60);

fn key() -> StreamKey {
    StreamKey::parse("acme", "web", "index").expect("key")
}

fn options(url: &str, token: &str, store: &Path) -> SyncOptions {
    SyncOptions {
        url: url.to_owned(),
        token: token.to_owned(),
        org: "acme".into(),
        project: "web".into(),
        client_id: "sam-1".into(),
        namespaces: vec!["index".into()],
        store: store.to_path_buf(),
        ca_file: None,
    }
}

/// `(oldest, newest)` `server_seq` in the log of `index`.
async fn log_bounds(stack: &Stack) -> (u64, u64) {
    let js = stack.jetstream().await;
    let ops = js.get_stream(OPS_STREAM).await.expect("ops");
    let subject = ops_subject(&key());
    let first = log::next_at_or_after(&ops, &subject, 1)
        .await
        .expect("log")
        .map_or(0, |e| e.server_seq);
    let head = log::head(&ops, &subject)
        .await
        .expect("log")
        .map_or(0, |h| h.server_seq);
    (first, head)
}

/// `POST …/index/commands` with one command per `(command_id, key, base_seq)`;
/// returns the results.
async fn post(stack: &Stack, token: &str, commands: &[(&str, &str, Option<u64>)]) -> Vec<Value> {
    let commands: Vec<Value> = commands
        .iter()
        .map(|(id, k, base)| {
            let mut c =
                json!({"command_id": id, "key": k, "op_type": "set", "payload": {"by": id}});
            if let Some(b) = base {
                c["base_seq"] = json!(b);
            }
            c
        })
        .collect();
    let body = json!({"client_id": "writer-1", "commands": commands}).to_string();
    let r = stack
        .http("POST", "/v1/acme/web/index/commands", token, &body)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer: Value = serde_json::from_str(&r.body).expect("json");
    answer["results"].as_array().expect("results").clone()
}

async fn settled(client: &SyncClient, head: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.outbox_len() > 0 || client.confirmed("index").map_or(0, |s| s.last_seq) < head {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_below_the_floor_is_refused_and_the_sdk_resyncs_first() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.materializer.snapshot_every_ops = 20;
            c.materializer.snapshot_interval_secs = 1;
            c.gateway.cursor_flush_ms = 50;
            c.compactor.cursor_ttl_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let token = stack.token("writer", "read write");
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("sam");

    // Sam's replica follows the first 20 ops, then goes away.
    let batch: Vec<(String, String)> = (1..=20)
        .map(|i| (format!("w{i}"), format!("k{}", i % 5)))
        .collect();
    let cmds: Vec<(&str, &str, Option<u64>)> = batch
        .iter()
        .map(|(id, k)| (id.as_str(), k.as_str(), None))
        .collect();
    post(&stack, &token, &cmds).await;
    {
        let sam = SyncClient::start(options(&stack.ws_url(), &token, &store)).expect("start");
        settled(&sam, 20).await;
        sam.close().await;
    }
    // Offline, Sam edits on his state at 20.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_url = format!("ws://{}/v1/sync", unused.local_addr().expect("addr"));
    drop(unused);
    {
        let sam = SyncClient::start(options(&dead_url, &token, &store)).expect("start");
        sam.put("index", "from-sam", json!("offline"))
            .expect("edit");
        sam.close().await;
    }

    // Meanwhile 40 more ops; Sam's cursor expires; the log is compacted to its head.
    // One request each: a batch of commands is stored as one log message, and the
    // compactor purges whole messages (what holds the floor + 1 stays).
    for i in 21..=60 {
        let (id, k) = (format!("w{i}"), format!("k{}", i % 5));
        post(&stack, &token, &[(id.as_str(), k.as_str(), None)]).await;
    }
    wait_for_snapshot(&stack, "web", "index", 60).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let js = stack.jetstream().await;
    let done = compact_once(&js, &stack.config.compactor, false, None)
        .await
        .expect("pass");
    assert_eq!(done.stream_keys[0].floor, 59, "{done:?}");
    assert_eq!(log_bounds(&stack).await, (60, 60));

    // The sequencer's worker loaded the key before the purge: its idea of the floor is
    // stale, and still a base one below the floor is refused, nothing written.
    let results = post(&stack, &token, &[("stale-1", "k1", Some(58))]).await;
    assert_eq!(results[0]["type"], "reject", "{results:?}");
    assert_eq!(results[0]["code"], "stale_base", "{results:?}");
    assert_eq!(
        results[0]["current_state"],
        json!({"key": "k1", "version": 56, "value": {"by": "w56"}}),
        "{results:?}"
    );
    assert_eq!(
        log_bounds(&stack).await,
        (60, 60),
        "a refused command wrote"
    );
    // At the floor the client saw everything purged: it lands. So does a command
    // without a base.
    let results = post(
        &stack,
        &token,
        &[("at-floor", "k1", Some(59)), ("no-base", "k2", None)],
    )
    .await;
    assert_eq!(
        (
            results[0]["server_seq"].clone(),
            results[1]["server_seq"].clone()
        ),
        (json!(61), json!(62)),
        "{results:?}"
    );
    // A retry of an applied command keeps its original ack, whatever base it names.
    let results = post(&stack, &token, &[("at-floor", "k1", Some(0))]).await;
    assert_eq!(results[0]["type"], "ack", "{results:?}");
    assert_eq!(results[0]["server_seq"], json!(61), "{results:?}");
    // In a batch, a stale command is refused and the others land.
    let results = post(
        &stack,
        &token,
        &[
            ("b1", "k3", Some(62)),
            ("b2", "k3", Some(3)),
            ("b3", "k4", Some(60)),
        ],
    )
    .await;
    let codes: Vec<Value> = results
        .iter()
        .map(|r| r.get("code").cloned().unwrap_or(r["server_seq"].clone()))
        .collect();
    assert_eq!(codes, vec![json!(63), json!("stale_base"), json!(64)]);
    assert_eq!(log_bounds(&stack).await, (60, 64));

    // Sam comes back with his offline edit based on 20: the server refuses it, his
    // replica resyncs from a snapshot and sends it again; it lands once.
    let sam = SyncClient::start(options(&stack.ws_url(), &token, &store)).expect("start");
    let mut changes = sam.changes();
    settled(&sam, 65).await;
    let (mut resyncs, mut snapshots) = (0, 0);
    while let Ok(change) = changes.try_recv() {
        match change {
            Change::Disconnected { reason } if reason.starts_with("stale_base") => resyncs += 1,
            Change::Snapshot { .. } => snapshots += 1,
            Change::Rejected { code, reason, .. } => panic!("rolled back: {code} {reason}"),
            _ => {}
        }
    }
    assert_eq!(resyncs, 1, "the edit was refused once, then re-based");
    assert!(snapshots >= 1, "no resync from a snapshot");
    let view = sam.get("index", "from-sam").expect("from-sam");
    assert_eq!(
        (view.value, view.version, view.pending),
        (json!("offline"), 65, false)
    );
    sam.close().await;
    let r = stack.get("/v1/acme/web/index/keys/from-sam", &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        serde_json::from_str::<Value>(&r.body).expect("json")["value"],
        json!("offline")
    );
    assert_eq!(log_bounds(&stack).await, (60, 65));
    stack.shutdown().await;
}
