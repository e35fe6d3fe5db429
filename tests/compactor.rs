//! Cursors and the compactor: the log is trimmed only below what every live client
//! has acknowledged and a snapshot covers; an expired client comes back to a snapshot
//! resync, never a silent skip; nothing is purged when the compactor cannot see the
//! cursors or a snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_compactor::{Metrics, compact_once, read_cursors};
use ultrasync_shared::config::CompactorConfig;
use ultrasync_shared::nats::{CURSORS_BUCKET, OPS_STREAM, ops_subject};
use ultrasync_shared::state::{self, KeyEntry, NamespaceState};
use ultrasync_shared::{ErrorCode, StreamKey, log, reads};
use ultrasync_testkit::{Stack, StackOptions, wait_for_snapshot};

const WAIT: Duration = Duration::from_secs(20);

fn key() -> StreamKey {
    StreamKey::parse("acme", "web", "index").expect("key")
}

/// Follows `index` on `conn` until `target` is applied (ops past it are left out),
/// building the state from `snapshot` frames and `ops`; returns how many snapshot
/// frames came.
async fn follow(conn: &mut Connection, st: &mut NamespaceState, target: u64) -> usize {
    let mut snapshots = 0;
    while st.last_seq < target {
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Snapshot {
                last_server_seq,
                state: part,
                ..
            } => {
                snapshots += 1;
                *st = NamespaceState {
                    last_seq: last_server_seq,
                    keys: part
                        .into_iter()
                        .map(|(k, ks)| {
                            (
                                k,
                                KeyEntry {
                                    value: ks.value,
                                    version: ks.version,
                                    doc: None,
                                },
                            )
                        })
                        .collect::<BTreeMap<_, _>>(),
                };
            }
            ServerMessage::Ops { ops, .. } => {
                for op in &ops {
                    if op.server_seq > st.last_seq && op.server_seq <= target {
                        state::apply(st, op).expect("ops follow on");
                    }
                }
            }
            ServerMessage::Error { code, message } => panic!("error {code}: {message}"),
            _ => {}
        }
    }
    snapshots
}

async fn cursor(conn: &mut Connection, seq: u64) {
    conn.send(&ultrasync_client::ClientMessage::Cursor {
        namespace: "index".into(),
        server_seq: seq,
    })
    .await
    .expect("cursor");
}

/// Waits until the stored cursors of `index` are exactly `want` (client → seq).
async fn cursors_are(stack: &Stack, want: &[(&str, u64)]) {
    let js = stack.jetstream().await;
    let want: BTreeMap<String, u64> = want.iter().map(|(c, s)| ((*c).to_owned(), *s)).collect();
    let mut got = BTreeMap::new();
    for _ in 0..200 {
        got = read_cursors(&js)
            .await
            .expect("cursors")
            .remove(&key())
            .unwrap_or_default()
            .into_iter()
            .map(|(c, r)| (c, r.server_seq))
            .collect();
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cursors {got:?}, wanted {want:?}");
}

async fn first_in_log(stack: &Stack) -> Option<u64> {
    let js = stack.jetstream().await;
    let ops = js.get_stream(OPS_STREAM).await.expect("ops");
    log::next_at_or_after(&ops, &ops_subject(&key()), 1)
        .await
        .expect("log")
        .map(|e| e.server_seq)
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn run_cli(stack: &Stack, args: &[&str]) -> (i32, String) {
    stack.run_cli(&bin(), args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_client_holds_the_log_until_it_expires_then_resyncs() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.materializer.snapshot_every_ops = 20;
            c.materializer.snapshot_interval_secs = 1;
            c.gateway.cursor_flush_ms = 50;
            c.compactor.cursor_ttl_secs = 2;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let mut alice = stack
        .client("alice", "web", "alice-1", &[("index", Some(0))])
        .await;
    let mut bob = stack
        .client("bob", "web", "bob-1", &[("index", Some(0))])
        .await;
    let mut carl = stack
        .client("carl", "web", "carl-1", &[("index", Some(0))])
        .await;
    // Carl writes once (this command stays in his outbox as far as he knows), reads
    // up to 10, acknowledges that and goes away.
    carl.command(
        "carl-offline",
        "index",
        "from-carl",
        OpType::Set,
        json!("hi"),
    )
    .await
    .expect("send");
    let mut carl_state = NamespaceState::default();
    follow(&mut carl, &mut carl_state, 1).await;
    // One command at a time: each op is then a log message of its own, and the
    // compactor (which purges whole messages) purges exactly up to the floors below.
    let mut alice_state = NamespaceState::default();
    for i in 1..100 {
        alice
            .command(
                &format!("a{i}"),
                "index",
                &format!("k{}", i % 7),
                OpType::Set,
                json!({"i": i}),
            )
            .await
            .expect("send");
        follow(&mut alice, &mut alice_state, i + 1).await;
    }
    let mut bob_state = NamespaceState::default();
    follow(&mut carl, &mut carl_state, 10).await;
    cursor(&mut carl, 10).await;
    follow(&mut alice, &mut alice_state, 100).await;
    follow(&mut bob, &mut bob_state, 100).await;
    cursor(&mut alice, 100).await;
    cursor(&mut bob, 100).await;
    cursors_are(&stack, &[("alice-1", 100), ("bob-1", 100), ("carl-1", 10)]).await;
    drop(carl);
    wait_for_snapshot(&stack, "web", "index", 100).await;

    // A dry run says what would go and purges nothing.
    let js = stack.jetstream().await;
    let cfg = stack.config.compactor.clone();
    // Until the test lets Carl expire, passes run with a TTL no slow moment can reach:
    // with the stack's 2 s, a loaded machine could expire him before the pass that
    // checks he holds the log.
    let holding = CompactorConfig {
        cursor_ttl_secs: 3600,
        ..cfg.clone()
    };
    let dry = compact_once(&js, &holding, true, None)
        .await
        .expect("dry run");
    let plan = &dry.stream_keys[0];
    assert_eq!(
        (plan.floor, plan.purged, plan.min_cursor),
        (10, 10, Some(10))
    );
    assert_eq!(first_in_log(&stack).await, Some(1));
    let (code, out) = run_cli(&stack, &["compact", "--dry-run", "--retention-ops", "0"]);
    assert_eq!(code, 0, "{out}");
    let printed: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(printed["stream_keys"][0]["floor"], json!(10));
    assert_eq!(first_in_log(&stack).await, Some(1));

    // Carl holds the log at his cursor.
    let metrics = Metrics::default();
    let done = compact_once(&js, &holding, false, Some(&metrics))
        .await
        .expect("pass");
    assert_eq!(done.purged_total, 10);
    assert_eq!(first_in_log(&stack).await, Some(11));
    let text = metrics.render().expect("render");
    assert!(
        text.contains("ultrasync_compactor_ops_purged_total{stream_key=\"acme/web/index\"} 10"),
        "{text}"
    );
    assert!(
        text.contains("ultrasync_compactor_floor{stream_key=\"acme/web/index\"} 10"),
        "{text}"
    );
    assert!(
        text.contains(
            "ultrasync_compactor_cursor_lag{stream_key=\"acme/web/index\",client_id=\"carl-1\",live=\"true\"} 90"
        ),
        "{text}"
    );
    let (code, out) = run_cli(&stack, &["inspect", "cursors"]);
    assert_eq!(code, 0, "{out}");
    let shown: Value = serde_json::from_str(&out).expect("json");
    let carl_row = shown["cursors"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["client_id"] == json!("carl-1"))
        .cloned()
        .expect("carl's cursor");
    assert_eq!(
        (carl_row["server_seq"].clone(), carl_row["lag"].clone()),
        (json!(10), json!(90))
    );

    // Over HTTP: below the floor is 410 stale_base, above it reads.
    let token = stack.token("poller", "read");
    let path = "/v1/acme/web";
    let r = stack
        .get(&format!("{path}/index/ops?since=5"), &token)
        .await;
    assert_eq!(r.status, 410, "{}", r.body);
    assert!(r.body.contains("stale_base"), "{}", r.body);
    let r = stack
        .get(&format!("{path}/index/ops?since=95&limit=3"), &token)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let page: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(page["ops"].as_array().map(Vec::len), Some(3));
    assert_eq!(page["ops"][0]["server_seq"], json!(96));
    assert_eq!(
        (page["last_server_seq"].clone(), page["more"].clone()),
        (json!(98), json!(true))
    );
    let r = stack
        .http(
            "POST",
            &format!("{path}/cursors"),
            &token,
            r#"{"client_id":"poller-1","namespace":"index","server_seq":1000}"#,
        )
        .await;
    assert_eq!(r.status, 410, "a cursor above the head: {}", r.body);

    // Alice and Bob stay; Carl's cursor expires; then the log goes up to the snapshot
    // (keeping the newest op).
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        cursor(&mut alice, 100).await;
        cursor(&mut bob, 100).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let done = compact_once(&js, &cfg, false, Some(&metrics))
        .await
        .expect("pass");
    let plan = &done.stream_keys[0];
    assert_eq!(plan.expired_clients.len(), 1);
    assert_eq!(plan.expired_clients[0].client_id, "carl-1");
    assert_eq!(plan.live_clients.len(), 2);
    assert_eq!(plan.floor, 99, "{plan:?}");
    assert_eq!(first_in_log(&stack).await, Some(100));

    // Carl returns with cursor 10: a snapshot, then the tail; the same state as the
    // others. His outbox still holds "carl-offline": resent, it is not applied again.
    let mut carl = stack
        .client("carl", "web", "carl-1", &[("index", Some(10))])
        .await;
    let snapshots = follow(&mut carl, &mut carl_state, 100).await;
    assert!(snapshots >= 1, "carl was not resynced from a snapshot");
    assert_eq!(carl_state, alice_state);
    assert_eq!(state::digest(&carl_state), state::digest(&bob_state));
    carl.command(
        "carl-offline",
        "index",
        "from-carl",
        OpType::Set,
        json!("hi"),
    )
    .await
    .expect("resend");
    loop {
        match carl.recv_timeout(WAIT).await.expect("answer") {
            ServerMessage::Ack {
                command_id,
                server_seq,
                ..
            } if command_id == "carl-offline" => {
                assert!(server_seq <= 10, "applied twice at {server_seq}");
                break;
            }
            ServerMessage::Reject {
                command_id, code, ..
            } if command_id == "carl-offline" => {
                assert_eq!(code, ErrorCode::StaleBase);
                break;
            }
            _ => {}
        }
    }
    let nc = stack.nats_client().await;
    let live = reads::digest(&nc, &key(), Some(100)).await.expect("digest");
    assert_eq!(
        live.last_server_seq, 100,
        "the resent command was applied again"
    );
    assert_eq!(live.digest, state::digest(&alice_state));

    // The compacted log still rebuilds to the live state.
    let (code, out) = run_cli(&stack, &["rebuild", "--verify"]);
    assert_eq!(code, 0, "rebuild --verify after compaction: {out}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_snapshot_or_the_cursors_nothing_is_purged() {
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        configure: |c| {
            c.gateway.cursor_flush_ms = 50;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let mut w = stack
        .client("wes", "web", "wes-1", &[("index", Some(0))])
        .await;
    for i in 0..30 {
        w.command(&format!("c{i}"), "index", "k", OpType::Set, json!(i))
            .await
            .expect("send");
    }
    let mut st = NamespaceState::default();
    follow(&mut w, &mut st, 30).await;
    cursor(&mut w, 30).await;
    cursors_are(&stack, &[("wes-1", 30)]).await;

    // No materializer, so no snapshot: nothing goes.
    let js = stack.jetstream().await;
    let cfg = stack.config.compactor.clone();
    let r = compact_once(&js, &cfg, false, None).await.expect("pass");
    assert_eq!(r.purged_total, 0);
    assert_eq!(r.stream_keys[0].skipped.as_deref(), Some("no snapshot"));
    assert_eq!(first_in_log(&stack).await, Some(1));

    // Cursors unreadable: the pass fails and purges nothing.
    js.delete_key_value(CURSORS_BUCKET)
        .await
        .expect("delete bucket");
    assert!(compact_once(&js, &cfg, false, None).await.is_err());
    assert_eq!(first_in_log(&stack).await, Some(1));

    // NATS unreachable: the command fails, having touched nothing.
    let out = std::process::Command::new(PathBuf::from(env!("CARGO_BIN_EXE_ultrasync")))
        .args(["compact", "--nats-url", "nats://127.0.0.1:1"])
        .env("ULTRASYNC_LOG", "error")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach nats"));
    assert_eq!(first_in_log(&stack).await, Some(1));
    stack.shutdown().await;
}
