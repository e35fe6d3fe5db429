//! The materializer: RocksDB state that survives kill -9 without losing or repeating
//! an op, snapshots that are checked before use and repaired when damaged, reads over
//! request-reply, and `ultrasync rebuild --verify` / `inspect state` through the
//! binary.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_shared::nats::{SNAPSHOTS_BUCKET, ops_subject};
use ultrasync_shared::state::{self, NamespaceState};
use ultrasync_shared::{StreamKey, reads, snapshot};
use ultrasync_testkit::{ServiceProcess, Stack, StackOptions, read_subject, wait_for_snapshot};

const WRITERS: usize = 4;
const PER_WRITER: usize = 2500;
const WINDOW: usize = 200;
const NAMESPACES: [&str; 2] = ["index", "metadata"];
/// Acked-command counts at which the materializer is killed with SIGKILL.
const KILLS: [usize; 5] = [1_000, 2_800, 4_600, 6_400, 8_200];
/// How far past a kill point the writers may get before the kill happens: the load
/// is paced so every kill lands while ops are still flowing.
const SLACK: usize = 1_500;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn key(ns: &str) -> StreamKey {
    StreamKey::parse("acme", "web", ns).expect("key")
}

/// The state of whoever saw every op: the log replayed with the shared `apply`.
async fn model(stack: &Stack, ns: &str) -> NamespaceState {
    let js = stack.jetstream().await;
    let mut st = NamespaceState::default();
    for e in read_subject(&js, &ops_subject(&key(ns))).await {
        state::apply(&mut st, &e.op().expect("op")).expect("apply");
    }
    st
}

/// Runs the binary against the stack; (exit code, stdout).
fn run_cli(stack: &Stack, args: &[&str]) -> (i32, String) {
    stack.run_cli(&bin(), args)
}

/// `ultrasync inspect state` of namespace `ns` (org acme, project web) with `more`
/// arguments, which must succeed, parsed.
fn inspect_state(stack: &Stack, ns: &str, more: &[&str]) -> Value {
    let mut args = vec![
        "inspect",
        "state",
        "--org",
        "acme",
        "--project",
        "web",
        "--ns",
        ns,
    ];
    args.extend_from_slice(more);
    let (code, out) = run_cli(stack, &args);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).expect("json")
}

/// One writer: `PER_WRITER` commands (set, patch, del over 97 keys per namespace),
/// `WINDOW` in flight, never more than its share of `cap` sent; returns when all are
/// acked.
async fn write(
    stack: &Stack,
    w: usize,
    progress: Arc<AtomicUsize>,
    cap: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    let mut conn = stack
        .client(&format!("writer-{w}"), "web", &format!("w{w}"), &[])
        .await;
    tokio::spawn(async move {
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut acked = 0;
        let mut next = 0;
        while acked < PER_WRITER {
            let allowed = (cap.load(Ordering::Relaxed) / WRITERS).min(PER_WRITER);
            if next >= allowed && in_flight.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            while next < allowed && in_flight.len() < WINDOW {
                let (op, payload) = match next % 10 {
                    7 => (OpType::Del, Value::Null),
                    0 | 3 | 6 => (OpType::Patch, json!({format!("p{w}"): next})),
                    _ => (OpType::Set, json!({"w": w, "i": next})),
                };
                let id = format!("w{w}-{next}");
                conn.command(
                    &id,
                    NAMESPACES[next % 2],
                    &format!("k{}", next % 97),
                    op,
                    payload,
                )
                .await
                .expect("send");
                in_flight.insert(id);
                next += 1;
            }
            match conn
                .recv_timeout(Duration::from_secs(60))
                .await
                .expect("answer")
            {
                ServerMessage::Ack { command_id, .. } => {
                    if in_flight.remove(&command_id) {
                        acked += 1;
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                }
                other => panic!("writer {w}: unexpected {other:?}"),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materializer_killed_repeatedly_under_load_ends_equal_to_the_log() {
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        configure: |c| c.materializer.snapshot_every_ops = 700,
        ..Default::default()
    })
    .await;
    let mut mat: ServiceProcess = stack.materializer_process(&bin(), "chaos");
    let progress = Arc::new(AtomicUsize::new(0));
    let cap = Arc::new(AtomicUsize::new(KILLS[0] + SLACK));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(write(&stack, w, progress.clone(), cap.clone()).await);
    }
    let nc = stack.nats_client().await;
    for (n, at) in KILLS.into_iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while progress.load(Ordering::Relaxed) < at {
            assert!(
                tokio::time::Instant::now() < deadline,
                "writers stalled before {at}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Ops are flowing (the writers may go `SLACK` further): kill it mid-stream.
        mat.kill9();
        tokio::time::sleep(Duration::from_millis(50 * (n as u64 % 3))).await;
        mat = stack.materializer_process(&bin(), "chaos");
        // Up again (it answers reads once it runs) before the load goes on.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !matches!(reads::digest(&nc, &key("index"), None).await, Ok(d) if d.last_server_seq > 0)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the materializer never served"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let next = KILLS.get(n + 1).map_or(WRITERS * PER_WRITER, |k| k + SLACK);
        cap.store(next, Ordering::Relaxed);
    }
    for w in writers {
        w.await.expect("writer");
    }
    assert_eq!(progress.load(Ordering::Relaxed), WRITERS * PER_WRITER);

    for ns in NAMESPACES {
        let expected = model(&stack, ns).await;
        let head = expected.last_seq;
        assert_eq!(head as usize, WRITERS * PER_WRITER / 2);
        let live = reads::digest(&nc, &key(ns), Some(head))
            .await
            .expect("materializer digest");
        assert_eq!(
            live.last_server_seq, head,
            "{ns}: materializer not at the head"
        );
        assert_eq!(
            live.digest,
            state::digest(&expected),
            "{ns}: materializer state differs from the log"
        );
        let seq = reads::sequencer_digest(&nc, &key(ns))
            .await
            .expect("sequencer digest");
        assert_eq!(seq.last_server_seq, head);
        assert_eq!(
            seq.digest, live.digest,
            "{ns}: the sequencer's view differs"
        );
        // The materializer kept writing snapshots across the kills.
        wait_for_snapshot(&stack, "web", ns, 700).await;
    }
    // A fresh rebuild from snapshot + log (and from the log alone) agrees.
    let (code, out) = run_cli(
        &stack,
        &["rebuild", "--verify", "--org", "acme", "--sequencer"],
    );
    assert_eq!(code, 0, "rebuild --verify failed: {out}");
    let report: Value = serde_json::from_str(&out).expect("json report");
    assert_eq!(report["ok"], json!(true));
    assert_eq!(report["checked"], json!(2));
    for entry in report["stream_keys"].as_array().expect("keys") {
        assert_eq!(entry["rebuilt_digest"], entry["live_digest"]);
        assert_eq!(entry["log_only_digest"], entry["live_digest"]);
        assert!(
            entry["snapshot_seq"].as_u64().is_some_and(|s| s >= 700),
            "{entry}"
        );
        assert_eq!(entry["sequencer"]["digest"], entry["live_digest"]);
    }
    drop(mat);
    stack.shutdown().await;
}

async fn put_blob(stack: &Stack, ns: &str, bytes: &[u8], claimed_seq: u64) {
    let js = stack.jetstream().await;
    let store = js.get_object_store(SNAPSHOTS_BUCKET).await.expect("store");
    // Claim a far newer seq, so only a materializer that checks the blob replaces it.
    let meta = async_nats::jetstream::object_store::ObjectMetadata {
        name: snapshot::object_name(&key(ns)),
        metadata: [(snapshot::META_LAST_SEQ.to_owned(), claimed_seq.to_string())].into(),
        ..Default::default()
    };
    store.put(meta, &mut &bytes[..]).await.expect("put");
}

async fn fetch(
    stack: &Stack,
    ns: &str,
) -> Result<Option<snapshot::Snapshot>, snapshot::FetchError> {
    let js = stack.jetstream().await;
    let store = js.get_object_store(SNAPSHOTS_BUCKET).await.expect("store");
    snapshot::fetch(&store, &key(ns)).await
}

/// The first materializer's `/metrics` text.
async fn scrape(stack: &Stack) -> String {
    let addr = stack.materializer_metrics(0).expect("materializer metrics");
    let (status, body) = ultrasync_testkit::http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("scrape");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series named `name` (with its labels) in a `/metrics` text.
fn series(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{body}"))
}

async fn send_ops(stack: &Stack, ns: &str, from: usize, to: usize) {
    let mut w = stack
        .client("wes", "web", &format!("wes-{from}"), &[])
        .await;
    for i in from..to {
        w.command(
            &format!("c{i}"),
            ns,
            &format!("k{}", i % 7),
            OpType::Set,
            json!({"i": i}),
        )
        .await
        .expect("send");
        match w.recv_timeout(Duration::from_secs(10)).await.expect("ack") {
            ServerMessage::Ack { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshots_are_refused_and_replaced() {
    let mut stack = Stack::start_with(StackOptions {
        configure: |c| c.materializer.snapshot_every_ops = 20,
        ..Default::default()
    })
    .await;
    send_ops(&stack, "index", 0, 50).await;
    let good = wait_for_snapshot(&stack, "web", "index", 40).await;

    // 1. A flipped byte (checksum): the gateway refuses it, serves the
    //    materializer's state instead and has it stored over the damaged one.
    let mut bytes = good.encode();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    put_blob(&stack, "index", &bytes, 1_000_000).await;
    assert!(matches!(
        fetch(&stack, "index").await,
        Err(snapshot::FetchError::Refused(_))
    ));
    let (code, _) = run_cli(
        &stack,
        &[
            "inspect",
            "snapshot",
            "--org",
            "acme",
            "--project",
            "web",
            "--ns",
            "index",
        ],
    );
    assert_ne!(code, 0, "inspect printed a damaged snapshot");

    let mut fresh = stack
        .client("fay", "web", "fay-1", &[("index", None)])
        .await;
    let frames = ultrasync_testkit::recv_until(&mut fresh, Duration::from_secs(20), |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("bootstrap");
    let expected = model(&stack, "index").await;
    let mut got = None;
    for f in &frames {
        if let ServerMessage::Snapshot {
            digest,
            last_server_seq,
            ..
        } = f
        {
            got = Some((digest.clone(), *last_server_seq));
        }
    }
    let (digest, seq) = got.expect("a snapshot frame");
    assert_eq!(seq, expected.last_seq);
    assert_eq!(
        digest,
        state::digest(&expected),
        "the client was served a wrong state"
    );
    let repaired = fetch(&stack, "index")
        .await
        .expect("sound again")
        .expect("stored");
    assert_eq!(repaired.digest(), state::digest(&expected));

    // 2. A truncated blob found by a materializer at start-up: it writes a sound one.
    let bytes = repaired.encode();
    put_blob(&stack, "index", &bytes[..bytes.len() / 2], 1_000_000).await;
    assert!(matches!(
        fetch(&stack, "index").await,
        Err(snapshot::FetchError::Refused(_))
    ));
    stack.stop_materializer(0).await;
    stack.add_materializer("m0");
    let mut ok = None;
    for _ in 0..200 {
        if let Ok(Some(s)) = fetch(&stack, "index").await {
            ok = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = ok.expect("the materializer replaced the truncated snapshot");
    assert_eq!(ok.digest(), state::digest(&expected));

    // 3. A sequencer taking the key over with a damaged snapshot replays the log.
    put_blob(&stack, "index", b"USNP garbage", 1_000_000).await;
    stack.stop_sequencer(0).await;
    stack.add_sequencer();
    send_ops(&stack, "index", 50, 60).await;
    let after = model(&stack, "index").await;
    assert_eq!(after.last_seq, 60);
    let nc = stack.nats_client().await;
    let live = reads::digest(&nc, &key("index"), Some(60))
        .await
        .expect("digest");
    assert_eq!(live.digest, state::digest(&after));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_inspect_state_and_a_second_replica() {
    let mut stack = Stack::start().await;
    send_ops(&stack, "metadata", 0, 30).await;
    let nc = stack.nats_client().await;
    let k = reads::key(&nc, &key("metadata"), "k3", Some(30))
        .await
        .expect("key");
    assert_eq!(k.last_server_seq, 30);
    assert_eq!(k.value, Some(json!({"i": 24})));
    assert_eq!(k.version, 25);
    let missing = reads::key(&nc, &key("metadata"), "nope", Some(30))
        .await
        .expect("key");
    assert_eq!((missing.value, missing.version), (None, 0));
    match reads::key(&nc, &key("metadata"), "", None).await {
        Err(reads::ReadError::Refused { code, .. }) => {
            assert_eq!(code, ultrasync_shared::ErrorCode::InvalidKey)
        }
        other => panic!("empty key: {other:?}"),
    }

    let shown = inspect_state(&stack, "metadata", &[]);
    let expected = model(&stack, "metadata").await;
    assert_eq!(shown["last_server_seq"], json!(30));
    assert_eq!(shown["digest"], json!(state::digest(&expected)));
    assert_eq!(shown["state"]["k3"]["value"], json!({"i": 24}));
    let one = inspect_state(&stack, "metadata", &["--key", "k6"]);
    assert_eq!(one["value"], json!({"i": 27}));

    // The same over HTTP (SPEC §5).
    let token = stack.token("reader", "read");
    let path = "/v1/acme/web/metadata";
    let r = stack
        .get(&format!("{path}/keys/k3?min_seq=30"), &token)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("etag"), Some("\"25\""));
    let body: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(
        (body["value"].clone(), body["version"].clone()),
        (json!({"i": 24}), json!(25))
    );
    let r = stack.get(&format!("{path}/snapshot"), &token).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let body: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(body["last_server_seq"], json!(30));
    assert_eq!(body["digest"], json!(state::digest(&expected)));
    assert_eq!(body["state"]["k6"]["value"], json!({"i": 27}));
    for (url, token, status) in [
        (format!("{path}/keys/nope"), token.as_str(), 404),
        (format!("{path}/snapshot"), "", 401),
        (
            "/v1/other/web/metadata/snapshot".to_owned(),
            token.as_str(),
            403,
        ),
        (
            "/v1/acme/web/nosuch/snapshot".to_owned(),
            token.as_str(),
            404,
        ),
        (
            "/v1/acme/web/presence/snapshot".to_owned(),
            token.as_str(),
            404,
        ),
        (
            "/v1/acme/w.b/metadata/snapshot".to_owned(),
            token.as_str(),
            400,
        ),
    ] {
        let r = stack.get(&url, token).await;
        assert_eq!(r.status, status, "{url}: {}", r.body);
        let err: Value = serde_json::from_str(&r.body).expect("error json");
        assert!(err["error"]["code"].is_string(), "{url}: {}", r.body);
    }

    // Another replica, started after the first stopped, catches up from the log on
    // its own and serves the same state.
    stack.stop_materializer(0).await;
    stack.add_materializer("m1");
    let mut second = None;
    for _ in 0..200 {
        match reads::digest(&nc, &key("metadata"), Some(30)).await {
            Ok(d) => {
                second = Some(d);
                break;
            }
            Err(reads::ReadError::NoResponders) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("digest: {e}"),
        }
    }
    let second = second.expect("the second replica never served");
    assert_eq!(second.digest, state::digest(&expected));

    // No materializer at all: reads say so.
    stack.stop_materializer(0).await;
    assert!(matches!(
        reads::digest(&nc, &key("metadata"), None).await,
        Err(reads::ReadError::NoResponders)
    ));
    let r = stack.get(&format!("{path}/snapshot"), &token).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let (code, _) = run_cli(&stack, &["rebuild", "--verify"]);
    assert_ne!(
        code, 0,
        "rebuild --verify passed without a live state to compare"
    );
    stack.shutdown().await;
}

/// `materializer.apply_interval_ms`: the ops of log messages that arrive within the
/// interval after an apply began are applied together, in one write batch, and
/// every op is still applied, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_arriving_within_the_apply_interval_share_one_apply() {
    const OPS: usize = 40;
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.materializer.apply_interval_ms = 400;
            c.materializer.metrics_listen = Some(([127, 0, 0, 1], 0).into());
        },
        ..Default::default()
    })
    .await;
    // One command at a time, each acked before the next: one log message each.
    send_ops(&stack, "metadata", 0, OPS).await;
    let nc = stack.nats_client().await;
    let k = reads::key(&nc, &key("metadata"), "k3", Some(OPS as u64))
        .await
        .expect("key");
    assert_eq!(k.last_server_seq, OPS as u64);
    assert_eq!(k.value, Some(json!({"i": 38})));
    let shown = inspect_state(&stack, "metadata", &[]);
    let expected = model(&stack, "metadata").await;
    assert_eq!(shown["digest"], json!(state::digest(&expected)));

    let body = scrape(&stack).await;
    let ops = series(&body, "ultrasync_materializer_ops_applied_total");
    let applies = series(&body, "ultrasync_materializer_apply_seconds_count");
    assert_eq!(ops, OPS as f64);
    // The 40 messages came one acked command after another, so well within a few
    // intervals of each other: a handful of applies, not one per message.
    assert!(
        applies <= (OPS / 4) as f64,
        "{applies} applies for {OPS} log messages"
    );
    stack.shutdown().await;
}

/// Any reader may ask a materializer for a snapshot, which encodes the whole state:
/// 64 asking at once for a state that does not move get it encoded about once (at
/// most once per core, the reads encoding in turn), the others the encoding kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_snapshot_reads_encodes_a_standing_state_once() {
    const READS: usize = 64;
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.materializer.metrics_listen = Some(([127, 0, 0, 1], 0).into()),
        ..Default::default()
    })
    .await;
    send_ops(&stack, "index", 0, 30).await;
    let nc = stack.nats_client().await;
    let want = reads::ReadRequest {
        min_seq: Some(30),
        ..Default::default()
    };
    let snapshots = futures::future::join_all((0..READS).map(|_| {
        let (nc, want) = (nc.clone(), want.clone());
        async move { reads::snapshot(&nc, &key("index"), &want).await }
    }))
    .await;
    let expected = model(&stack, "index").await;
    for s in snapshots {
        let s = s.expect("snapshot read");
        assert_eq!(s.state.last_seq, 30);
        assert_eq!(s.digest(), state::digest(&expected));
    }

    let body = scrape(&stack).await;
    let reads = |answer: &str| {
        let name = format!(r#"ultrasync_materializer_snapshot_reads_total{{answer="{answer}"}}"#);
        series(&body, &name) as usize
    };
    let (encoded, kept) = (reads("encoded"), reads("kept"));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(encoded + kept, READS, "{body}");
    assert!(
        (1..=cores).contains(&encoded),
        "{encoded} encodings for {READS} reads of one state ({cores} cores)"
    );
    stack.shutdown().await;
}
