//! Every reader of the log holds the compaction floor (SPEC invariant 7): a webhook
//! whose receiver is down keeps its ops in the log until it has them, a reader past
//! `reader_max_lag_ops` or `*_max_lag_secs` is let go on purpose (a webhook is told
//! exactly which ops it missed); clients' cursors come from every pull
//! and resume (hello cursors, `GET …/ops?since=&client_id=`), a client id belongs to
//! the actor that first used it, and expired cursors are deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ultrasync_client::{ClientMessage, OpType, ServerMessage};
use ultrasync_compactor::{LagBound, Metrics, compact_once, read_cursors};
use ultrasync_shared::config::WebhookConfig;
use ultrasync_shared::nats::{OPS_STREAM, ops_subject};
use ultrasync_shared::{ErrorCode, StreamKey, log};
use ultrasync_testkit::{Stack, StackOptions, wait_for_snapshot};

const SECRET: &str = "compaction-test-secret-0123456789";
const WAIT: Duration = Duration::from_secs(20);

fn key() -> StreamKey {
    StreamKey::parse("acme", "web", "index").expect("key")
}

/// A receiver that answers 503 while `down`, else 200, recording the `server_seq`
/// of every op it accepted.
async fn receiver(down: Arc<AtomicBool>, got: Arc<Mutex<BTreeSet<u64>>>) -> String {
    receiver_with_resets(down, got, Arc::default()).await
}

/// [`receiver`], also recording `stream.reset` events as `(from, to)`.
async fn receiver_with_resets(
    down: Arc<AtomicBool>,
    got: Arc<Mutex<BTreeSet<u64>>>,
    resets: Arc<Mutex<Vec<(u64, u64)>>>,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let down = down.clone();
            let got = got.clone();
            let resets = resets.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let body = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse().ok())
                            })
                            .unwrap_or(0);
                        if rest.len() >= len {
                            break rest[..len].to_owned();
                        }
                    }
                };
                let status = if down.load(Ordering::Relaxed) {
                    "503 Service Unavailable"
                } else {
                    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    if let Some(seq) = v["op"]["server_seq"].as_u64() {
                        got.lock().expect("lock").insert(seq);
                    }
                    if v["type"] == json!("stream.reset") {
                        let range = (
                            v["from_server_seq"].as_u64().unwrap_or(0),
                            v["to_server_seq"].as_u64().unwrap_or(0),
                        );
                        resets.lock().expect("lock").push(range);
                    }
                    "200 OK"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    format!("http://{addr}/hook")
}

/// Writes `n` ops one command at a time (each op is then a log message of its own,
/// so compaction floors fall on single ops); returns the last `server_seq`.
async fn write_n(stack: &Stack, n: u64) -> u64 {
    let mut c = stack.client("writer", "web", "writer", &[]).await;
    let mut last = 0;
    for i in 0..n {
        c.command(
            &format!("w{i}"),
            "index",
            &format!("k{}", i % 10),
            OpType::Set,
            json!(i),
        )
        .await
        .expect("send");
        loop {
            if let ServerMessage::Ack { server_seq, .. } = c.recv_timeout(WAIT).await.expect("ack")
            {
                last = last.max(server_seq);
                break;
            }
        }
    }
    c.close().await;
    last
}

/// Starts a second gateway that sends `index` ops to `url` as webhook `name`, then
/// writes 60 ops; the head.
async fn with_webhook(stack: &mut Stack, name: &str, url: String) -> u64 {
    stack.config.webhooks = vec![WebhookConfig {
        name: name.to_owned(),
        url,
        secret: SECRET.to_owned(),
        org: "acme".to_owned(),
        project: None,
        namespace: Some("index".to_owned()),
        events: vec!["op.committed".to_owned()],
        max_attempts: 1000,
        backoff_ms: 100,
        timeout_ms: 10_000,
        ca_file: None,
    }];
    stack.add_gateway().await;
    write_n(stack, 60).await
}

async fn first_in_log(stack: &Stack) -> Option<u64> {
    let js = stack.jetstream().await;
    let ops = js.get_stream(OPS_STREAM).await.expect("ops");
    log::next_at_or_after(&ops, &ops_subject(&key()), 1)
        .await
        .expect("log")
        .map(|e| e.server_seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_is_down_holds_the_log_until_it_has_every_op() {
    let down = Arc::new(AtomicBool::new(true));
    let got = Arc::new(Mutex::new(BTreeSet::new()));
    let url = receiver(down.clone(), got.clone()).await;
    let mut stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.materializer.snapshot_every_ops = 10;
            c.materializer.snapshot_interval_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let head = with_webhook(&mut stack, "slow", url).await;
    let js = stack.jetstream().await;
    wait_for_snapshot(&stack, "web", "index", head).await;

    // Down: the webhook's consumer holds every op it has not delivered.
    let cfg = stack.config.compactor.clone();
    let report = compact_once(&js, &cfg, false, None).await.expect("pass");
    let plan = report
        .stream_keys
        .iter()
        .find(|p| p.stream_key == "acme/web/index")
        .expect("plan");
    assert_eq!(plan.held_by, "webhook:usync-webhook-slow", "{plan:?}");
    assert_eq!(plan.purged, 0, "{plan:?}");
    assert_eq!(first_in_log(&stack).await, Some(1));

    // A reader let go on purpose (over its lag bound) no longer holds the log; the
    // dry run says so and purges nothing.
    let mut strict = cfg.clone();
    strict.reader_max_lag_ops = 10;
    let dry = compact_once(&js, &strict, true, None)
        .await
        .expect("dry pass");
    let plan = &dry.stream_keys[0];
    assert!(
        plan.readers.iter().any(|r| r.kind == "webhook" && r.let_go),
        "{plan:?}"
    );
    assert!(plan.purged > 0, "{plan:?}");
    assert_eq!(first_in_log(&stack).await, Some(1), "a dry run purged");

    // Up again: every op arrives, then the log may go.
    down.store(false, Ordering::Relaxed);
    for _ in 0..400 {
        if got.lock().expect("lock").len() as u64 >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered: Vec<u64> = got.lock().expect("lock").iter().copied().collect();
    assert_eq!(
        delivered,
        (1..=head).collect::<Vec<_>>(),
        "every op reached the receiver"
    );
    let mut purged = 0;
    for _ in 0..100 {
        let report = compact_once(&js, &cfg, false, None).await.expect("pass");
        purged += report.purged_total;
        if purged > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        purged > 0,
        "nothing was purged once the webhook had everything"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_come_from_every_pull_belong_to_their_actor_and_expire() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.gateway.cursor_flush_ms = 50;
        },
        ..Default::default()
    })
    .await;
    write_n(&stack, 10).await;
    let js = stack.jetstream().await;

    // A resuming client's hello cursor is its cursor.
    let alice = stack
        .client("alice", "web", "tab-a", &[("index", Some(4))])
        .await;
    // A polling client's pull is its cursor.
    let r = stack
        .get(
            "/v1/acme/web/index/ops?since=7&client_id=poller",
            &stack.token("bob", "read"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut seen = BTreeMap::new();
    for _ in 0..200 {
        seen = read_cursors(&js)
            .await
            .expect("cursors")
            .remove(&key())
            .unwrap_or_default()
            .into_iter()
            .map(|(c, r)| (c, r.server_seq))
            .collect();
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        seen,
        BTreeMap::from([("poller".to_owned(), 7), ("tab-a".to_owned(), 4)])
    );

    // Another actor cannot move alice's client's cursor, over either door.
    let mut mallory = stack.client("mallory", "web", "tab-a", &[]).await;
    mallory
        .send(&ClientMessage::Cursor {
            namespace: "index".into(),
            server_seq: 10,
        })
        .await
        .expect("send");
    match mallory.recv_timeout(WAIT).await.expect("answer") {
        ServerMessage::Error { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
    let r = stack
        .http(
            "POST",
            "/v1/acme/web/cursors",
            &stack.token("mallory", "read"),
            &json!({"client_id": "tab-a", "namespace": "index", "server_seq": 10}).to_string(),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = stack
        .get(
            "/v1/acme/web/index/ops?since=9&client_id=tab-a",
            &stack.token("mallory", "read"),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stored = read_cursors(&js).await.expect("cursors");
    assert_eq!(
        stored[&key()]
            .iter()
            .find(|(c, _)| c == "tab-a")
            .map(|(_, r)| r.server_seq),
        Some(4),
        "a foreign actor moved the cursor"
    );

    // Clients unseen for longer than the TTL are deleted by the compactor.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut cfg = stack.config.compactor.clone();
    cfg.cursor_ttl_secs = 1;
    compact_once(&js, &cfg, false, None).await.expect("pass");
    let left = read_cursors(&js).await.expect("cursors");
    assert!(
        left.get(&key()).is_none_or(|v| v.is_empty()),
        "expired cursors left: {left:?}"
    );
    alice.close().await;
    mallory.close().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_cursor_always_gets_a_snapshot_and_a_far_behind_one_a_snapshot_and_the_tail() {
    // No materializer, no stored snapshot: the empty state at 0, then the log.
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    write_n(&stack, 5).await;
    let mut c = stack
        .client("fresh", "web", "fresh", &[("index", None)])
        .await;
    let frames =
        ultrasync_testkit::recv_until(&mut c, WAIT, |m| matches!(m, ServerMessage::Synced { .. }))
            .await
            .expect("bootstrap");
    match &frames[0] {
        ServerMessage::Snapshot {
            last_server_seq,
            state,
            ..
        } => assert_eq!((*last_server_seq, state.len()), (0, 0)),
        other => panic!("the first frame is not a snapshot: {other:?}"),
    }
    assert!(matches!(
        frames.last(),
        Some(ServerMessage::Synced { server_seq: 5, .. })
    ));
    c.close().await;
    stack.shutdown().await;

    // A stored snapshot and a cursor far behind it: the snapshot, then the tail.
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.materializer.snapshot_every_ops = 20;
            c.materializer.snapshot_interval_secs = 1;
            c.gateway.snapshot_after_ops = 10;
        },
        ..Default::default()
    })
    .await;
    let head = write_n(&stack, 40).await;
    let snap = wait_for_snapshot(&stack, "web", "index", 20).await;
    let mut c = stack
        .client("late", "web", "late", &[("index", Some(2))])
        .await;
    let frames =
        ultrasync_testkit::recv_until(&mut c, WAIT, |m| matches!(m, ServerMessage::Synced { .. }))
            .await
            .expect("catch-up");
    // The materializer may store a newer snapshot (40) between the wait and the
    // connection; the gateway serves the newest, so any snapshot at least as new as
    // the one awaited is right.
    let served = match &frames[0] {
        ServerMessage::Snapshot {
            last_server_seq, ..
        } => *last_server_seq,
        other => panic!("a cursor 38 behind got {other:?} first, not a snapshot"),
    };
    assert!(
        (snap.state.last_seq..=head).contains(&served),
        "served the snapshot at {served}, awaited {} (head {head})",
        snap.state.last_seq
    );
    let first_op = frames.iter().find_map(|f| match f {
        ServerMessage::Ops { seq_start, .. } => Some(*seq_start),
        _ => None,
    });
    assert!(
        first_op.is_none_or(|s| s == served + 1),
        "the tail starts at {first_op:?} after the snapshot at {served}"
    );
    assert!(
        matches!(frames.last(), Some(ServerMessage::Synced { server_seq, .. }) if *server_seq == head)
    );
    c.close().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_materializer_holds_the_log_until_it_is_back() {
    let mut stack = Stack::start_with(StackOptions {
        materializers: 2,
        configure: |c| {
            c.materializer.snapshot_every_ops = 10;
            c.materializer.snapshot_interval_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    write_n(&stack, 10).await;
    wait_for_snapshot(&stack, "web", "index", 10).await;
    stack.stop_materializer(1).await;
    let head = write_n(&stack, 40).await;
    wait_for_snapshot(&stack, "web", "index", head).await;
    let js = stack.jetstream().await;
    let cfg = stack.config.compactor.clone();
    let report = compact_once(&js, &cfg, false, None).await.expect("pass");
    let plan = &report.stream_keys[0];
    assert_eq!(
        plan.held_by, "materializer:usync-materializer-m1",
        "{plan:?}"
    );
    let held_at = plan
        .readers
        .iter()
        .find(|r| r.name == "usync-materializer-m1")
        .map(|r| r.position)
        .expect("m1 holds");
    assert!(held_at < head);
    // Exactly what it has processed may go, nothing after.
    assert_eq!(first_in_log(&stack).await, Some(held_at + 1));
    // Back: it catches up from the log it held, then the log can go.
    stack.add_materializer("m1");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let report = compact_once(&js, &cfg, false, None).await.expect("pass");
        if first_in_log(&stack).await.is_some_and(|f| f > held_at + 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the log stayed held: {:?}",
            report.stream_keys[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.shutdown().await;
}

/// A webhook whose receiver is down, on a stack that snapshots every 10 ops and keeps
/// no retention below the floor; 60 ops written and snapshotted.
struct DownWebhook {
    stack: Stack,
    down: Arc<AtomicBool>,
    got: Arc<Mutex<BTreeSet<u64>>>,
    resets: Arc<Mutex<Vec<(u64, u64)>>>,
    head: u64,
}

impl DownWebhook {
    async fn start(name: &str) -> Self {
        let down = Arc::new(AtomicBool::new(true));
        let got = Arc::new(Mutex::new(BTreeSet::new()));
        let resets = Arc::new(Mutex::new(Vec::new()));
        let url = receiver_with_resets(down.clone(), got.clone(), resets.clone()).await;
        let mut stack = Stack::start_with(StackOptions {
            configure: |c| {
                c.materializer.snapshot_every_ops = 10;
                c.materializer.snapshot_interval_secs = 1;
                c.compactor.retention_ops = 0;
            },
            ..Default::default()
        })
        .await;
        let head = with_webhook(&mut stack, name, url).await;
        wait_for_snapshot(&stack, "web", "index", head).await;
        Self {
            stack,
            down,
            got,
            resets,
            head,
        }
    }

    /// Brings the receiver up after a pass let the webhook go and purged up to
    /// `floor`: every op left in the log arrives; ops the webhook had already fetched
    /// when they were purged may arrive too (at least once), and the rest is named
    /// by exactly one reset.
    async fn comes_back_told_what_was_purged(self, floor: u64) {
        self.down.store(false, Ordering::Relaxed);
        let head = self.head;
        for _ in 0..400 {
            let got = self.got.lock().expect("lock").clone();
            if (floor + 1..=head).all(|s| got.contains(&s))
                && !self.resets.lock().expect("lock").is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let delivered = self.got.lock().expect("lock").clone();
        assert!(
            (floor + 1..=head).all(|s| delivered.contains(&s)),
            "ops left in the log missing: {delivered:?}"
        );
        assert_eq!(
            self.resets.lock().expect("lock").clone(),
            vec![(1, floor)],
            "the reset names exactly what was purged"
        );
        self.stack.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_let_go_is_told_exactly_which_ops_were_purged() {
    let mut w = DownWebhook::start("late").await;
    w.stack.config.compactor.reader_max_lag_ops = 10;
    let js = w.stack.jetstream().await;
    let report = compact_once(&js, &w.stack.config.compactor, false, None)
        .await
        .expect("pass");
    let plan = &report.stream_keys[0];
    assert!(
        plan.readers
            .iter()
            .any(|r| r.kind == "webhook" && r.let_go_by == Some(LagBound::Ops)),
        "{plan:?}"
    );
    let floor = plan.floor;
    assert!(floor > 0 && plan.purged > 0, "{plan:?}");
    w.comes_back_told_what_was_purged(floor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_down_past_its_time_bound_is_let_go_and_told_exactly_which_ops_were_purged() {
    let mut w = DownWebhook::start("stale").await;
    // Far from the ops bound; 1 s of age is the webhook's bound.
    w.stack.config.compactor.reader_max_lag_ops = 1_000_000;
    w.stack.config.compactor.webhook_max_lag_secs = Some(1);
    let cfg = w.stack.config.compactor.clone();
    let js = w.stack.jetstream().await;
    let webhook = |plan: &ultrasync_compactor::Plan| {
        plan.readers
            .iter()
            .find(|r| r.name == "usync-webhook-stale")
            .cloned()
            .unwrap_or_else(|| panic!("the webhook is not among the readers: {plan:?}"))
    };

    // Without the time bound it holds the log: only that bound can let it go.
    let mut untimed = cfg.clone();
    untimed.webhook_max_lag_secs = Some(0);
    let dry = compact_once(&js, &untimed, true, None)
        .await
        .expect("dry pass");
    let plan = &dry.stream_keys[0];
    assert_eq!(plan.held_by, "webhook:usync-webhook-stale", "{plan:?}");
    assert!(!webhook(plan).let_go, "{plan:?}");

    // Once its oldest undelivered op is older than the bound, it is let go, and the
    // dry run says by which bound.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let dry = compact_once(&js, &cfg, true, None).await.expect("dry pass");
    let plan = &dry.stream_keys[0];
    let r = webhook(plan);
    eprintln!(
        "dry run: {}",
        serde_json::to_string(&r).expect("the plan's reader")
    );
    assert_eq!(r.let_go_by, Some(LagBound::Secs), "{plan:?}");
    assert!(r.let_go && r.age_secs >= 2 && r.lag <= w.head, "{plan:?}");
    assert_ne!(plan.held_by, "webhook:usync-webhook-stale", "{plan:?}");
    assert!(plan.purged > 0, "{plan:?}");
    assert_eq!(first_in_log(&w.stack).await, Some(1), "a dry run purged");

    // The pass: purged, counted, and the webhook gets the reset.
    let metrics = Metrics::default();
    let report = compact_once(&js, &cfg, false, Some(&metrics))
        .await
        .expect("pass");
    let plan = &report.stream_keys[0];
    assert_eq!(webhook(plan).let_go_by, Some(LagBound::Secs), "{plan:?}");
    let floor = plan.floor;
    assert!(floor > 0 && plan.purged > 0, "{plan:?}");
    assert_eq!(first_in_log(&w.stack).await, Some(floor + 1));
    let text = metrics.render().expect("render");
    assert!(
        text.contains("ultrasync_compactor_readers_let_go_total{kind=\"webhook\"} 1"),
        "{text}"
    );
    w.comes_back_told_what_was_purged(floor).await;
}
