//! A sequencer taking over a stream key starts from the key's snapshot and reads only
//! the log after it: shown by purging the log up to the snapshot and checking that a
//! new instance still knows every key's version, the Automerge document and the op
//! ids, and goes on with the next dense `server_seq`.

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use ultrasync_client::{
    ClientMessage, CommandFrame, Connection, OpType, Precondition, ServerMessage,
};
use ultrasync_shared::nats::{OPS_STREAM, ops_subject};
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_testkit::{Stack, StackOptions, read_subject, wait_for_snapshot};

const WAIT: Duration = Duration::from_secs(20);

async fn send(
    conn: &mut Connection,
    id: &str,
    ns: &str,
    key: &str,
    op: OpType,
    payload: Value,
    expected: Option<u64>,
) -> ServerMessage {
    conn.send(&ClientMessage::Command(CommandFrame {
        command_id: id.into(),
        namespace: ns.into(),
        key: key.into(),
        op_type: op,
        payload,
        precondition: expected.map(|v| Precondition {
            expected_version: v,
        }),
        base_seq: None,
    }))
    .await
    .expect("send");
    loop {
        if let m @ (ServerMessage::Ack { .. } | ServerMessage::Reject { .. }) =
            conn.recv_timeout(WAIT).await.expect("answer")
        {
            return m;
        }
    }
}

fn seq(m: &ServerMessage) -> u64 {
    match m {
        ServerMessage::Ack { server_seq, .. } => *server_seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn change(doc: &mut AutoCommit) -> Value {
    doc.commit();
    json!({"change": B64.encode(doc.get_last_local_change().expect("change").raw_bytes())})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sequencer_takes_over_from_the_snapshot_not_the_whole_log() {
    let mut stack = Stack::start_with(StackOptions {
        configure: |c| c.materializer.snapshot_every_ops = 50,
        ..Default::default()
    })
    .await;
    let mut c = stack.client("sam", "web", "sam-1", &[]).await;

    // 130 compare-and-set writes over 5 keys, and 60 Automerge changes to one doc.
    let mut versions = [0u64; 5];
    let mut first_ack = None;
    for i in 0..130 {
        let k = i % 5;
        let ack = send(
            &mut c,
            &format!("s{i}"),
            "settings",
            &format!("k{k}"),
            OpType::Set,
            json!(i),
            Some(versions[k]),
        )
        .await;
        versions[k] = seq(&ack);
        first_ack.get_or_insert(ack);
    }
    let mut doc = AutoCommit::new();
    for i in 0..60 {
        doc.put(ROOT, format!("f{}", i % 7), i as i64).expect("put");
        let payload = change(&mut doc);
        seq(&send(
            &mut c,
            &format!("d{i}"),
            "collab",
            "doc",
            OpType::CrdtOp,
            payload,
            None,
        )
        .await);
    }

    // Snapshots were written; drop the log up to them, as compaction would.
    let settings = wait_for_snapshot(&stack, "web", "settings", 100).await;
    let collab = wait_for_snapshot(&stack, "web", "collab", 50).await;
    let js = stack.jetstream().await;
    let ops = js.get_stream(OPS_STREAM).await.expect("ops");
    for (ns, snap) in [("settings", &settings), ("collab", &collab)] {
        let subject = ops_subject(&StreamKey::parse("acme", "web", ns).expect("key"));
        ops.purge()
            .filter(&subject)
            .sequence(snap.head_stream_seq + 1)
            .await
            .expect("purge");
        let left = read_subject(&js, &subject).await;
        assert!(
            left.first()
                .is_none_or(|e| e.server_seq == snap.state.last_seq + 1),
            "purge kept too much"
        );
    }

    // A new instance takes both keys over.
    stack.stop_sequencer(0).await;
    stack.add_sequencer();

    // It knows every version (compare-and-set still lines up) and continues densely.
    let k = 0;
    let ack = send(
        &mut c,
        "after-1",
        "settings",
        "k0",
        OpType::Set,
        json!("x"),
        Some(versions[k]),
    )
    .await;
    assert_eq!(seq(&ack), 131);
    let stale = send(
        &mut c,
        "after-2",
        "settings",
        "k1",
        OpType::Set,
        json!("y"),
        Some(versions[1] - 5),
    )
    .await;
    assert!(
        matches!(stale, ServerMessage::Reject { code: ErrorCode::PreconditionFailed, current_state: Some(ref cs), .. } if cs.version == versions[1])
    );

    // It has the Automerge document: a change that depends on all 60 applies.
    doc.put(ROOT, "after", true).expect("put");
    let payload = change(&mut doc);
    assert_eq!(
        seq(&send(
            &mut c,
            "d-after",
            "collab",
            "doc",
            OpType::CrdtOp,
            payload,
            None
        )
        .await),
        61
    );

    // It knows op ids: a retry of the newest command before the takeover gets its ack;
    // a retry of one whose op was compacted away is told so, not applied again.
    let last = send(
        &mut c,
        "s129",
        "settings",
        "k4",
        OpType::Set,
        json!(129),
        Some(versions[4] - 5),
    )
    .await;
    let ServerMessage::Ack {
        server_seq: 130, ..
    } = last
    else {
        panic!("expected the original ack, got {last:?}")
    };
    let first = send(
        &mut c,
        "s0",
        "settings",
        "k0",
        OpType::Set,
        json!(0),
        Some(0),
    )
    .await;
    assert!(
        matches!(
            first,
            ServerMessage::Reject {
                code: ErrorCode::StaleBase,
                ..
            }
        ),
        "{first:?}"
    );
    assert!(first_ack.is_some());
    stack.shutdown().await;
}

/// A snapshot replaced while it is read has its chunks purged under the reader: the
/// read gives up instead of waiting forever, and reading again gets the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_replaced_while_it_is_read_is_read_again_not_waited_for() {
    use async_nats::jetstream::object_store::ObjectMetadata;
    use ultrasync_shared::snapshot::{ReadError, read_object};
    let stack = Stack::start().await;
    let js = stack.jetstream().await;
    let store = js
        .get_object_store(ultrasync_shared::nats::SNAPSHOTS_BUCKET)
        .await
        .expect("store");
    let old = vec![1u8; 300 * 1024];
    let new = vec![2u8; 200 * 1024];
    let put = |bytes: Vec<u8>| {
        let store = store.clone();
        async move {
            let meta = ObjectMetadata {
                name: "acme.web.replaced".to_owned(),
                ..Default::default()
            };
            store.put(meta, &mut &bytes[..]).await.expect("put");
        }
    };
    put(old).await;
    let mut reading = store.get("acme.web.replaced").await.expect("get");
    put(new.clone()).await;
    match read_object(&mut reading, Duration::from_secs(1)).await {
        Err(ReadError::Stalled) => {}
        other => panic!("expected a stalled read, got {other:?}"),
    }
    let mut again = store.get("acme.web.replaced").await.expect("get");
    let bytes = read_object(&mut again, Duration::from_secs(10))
        .await
        .expect("the new object");
    assert_eq!(bytes, new);
    stack.shutdown().await;
}

/// Writes commands `{prefix}{from..to}` to `index` (keys `k0..k6`), one at a time;
/// the last `server_seq`.
async fn write_index(c: &mut Connection, prefix: &str, from: u64, to: u64) -> u64 {
    let mut last = 0;
    for i in from..to {
        let m = send(
            c,
            &format!("{prefix}{i}"),
            "index",
            &format!("k{}", i % 7),
            OpType::Set,
            json!(i),
            None,
        )
        .await;
        last = seq(&m);
    }
    last
}

/// Replaces the stack's sequencer with a new instance and writes one more op
/// through `c`; the answer.
async fn take_over_and_write(stack: &mut Stack, c: &mut Connection) -> ServerMessage {
    stack.stop_sequencer(0).await;
    stack.add_sequencer();
    send(c, "after", "index", "k0", OpType::Set, json!("after"), None).await
}

/// Every `last_server_seq` the snapshot store records for `acme/web/{ns}`, in the
/// order written, from now on.
async fn watch_snapshot_seqs(
    js: &async_nats::jetstream::Context,
    ns: &str,
) -> std::sync::Arc<std::sync::Mutex<Vec<u64>>> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    use base64::engine::general_purpose::URL_SAFE;
    use futures::StreamExt as _;
    let key = StreamKey::parse("acme", "web", ns).expect("key");
    let subject = format!(
        "$O.{}.M.{}",
        ultrasync_shared::nats::SNAPSHOTS_BUCKET,
        URL_SAFE.encode(ultrasync_shared::snapshot::object_name(&key))
    );
    let stream = js
        .get_stream(format!("OBJ_{}", ultrasync_shared::nats::SNAPSHOTS_BUCKET))
        .await
        .expect("snapshot stream");
    let mut messages = stream
        .create_consumer(OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .expect("consumer")
        .messages()
        .await
        .expect("messages");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = messages.next().await {
            let info: Value = serde_json::from_slice(&m.payload).expect("object info");
            if let Some(seq) = info["metadata"][ultrasync_shared::snapshot::META_LAST_SEQ]
                .as_str()
                .and_then(|s| s.parse().ok())
            {
                out.lock().expect("lock").push(seq);
            }
        }
    });
    seen
}

fn never_backwards(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[0] <= w[1])
}

/// Writers racing on one key's snapshot, one of them behind: the stored snapshot
/// only ever moves forward.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_snapshot_writers_never_move_the_stored_snapshot_backwards() {
    use ultrasync_shared::snapshot::{Put, put};
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let js = stack.jetstream().await;
    let store = js
        .get_object_store(ultrasync_shared::nats::SNAPSHOTS_BUCKET)
        .await
        .expect("store");
    let key = StreamKey::parse("acme", "web", "race").expect("key");
    let seen = watch_snapshot_seqs(&js, "race").await;
    // Two writers, each moving forward on its own; "behind" never catches up.
    let writer = |seqs: Vec<u64>| {
        let (js, store, key) = (js.clone(), store.clone(), key.clone());
        tokio::spawn(async move {
            let mut written = 0;
            for seq in seqs {
                let blob = vec![seq as u8; 200 * 1024];
                if put(&js, &store, &key, seq, &blob, false)
                    .await
                    .expect("put")
                    == Put::Written
                {
                    written += 1;
                }
            }
            written
        })
    };
    let ahead = writer((1..=40).map(|i| i * 10).collect());
    let behind = writer((1..=40).collect());
    let (ahead, behind) = (ahead.await.expect("ahead"), behind.await.expect("behind"));
    assert!(ahead > 0, "the writer ahead wrote nothing");
    let info = store
        .info(ultrasync_shared::snapshot::object_name(&key))
        .await
        .expect("info");
    assert_eq!(
        info.metadata[ultrasync_shared::snapshot::META_LAST_SEQ],
        "400"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock().expect("lock").clone();
    assert!(
        never_backwards(&seen),
        "the stored snapshot went backwards: {seen:?}"
    );
    assert_eq!(seen.len(), ahead + behind, "{seen:?}");
    // One object's chunks are left: the replaced ones were purged.
    let chunks = js
        .get_stream(format!("OBJ_{}", ultrasync_shared::nats::SNAPSHOTS_BUCKET))
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(
        chunks,
        2 + 1,
        "two chunks of 200 KiB and one metadata message"
    );
    stack.shutdown().await;
}

/// Two materializers, one stopped while the other snapshots ahead, then both
/// running while writes go on: the stored snapshot never goes backwards, and after
/// compaction a new sequencer takes the key from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_materializer_behind_never_replaces_a_newer_snapshot() {
    let mut stack = Stack::start_with(StackOptions {
        materializers: 2,
        configure: |c| {
            c.materializer.snapshot_every_ops = 1;
            c.materializer.snapshot_interval_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let js = stack.jetstream().await;
    let seen = watch_snapshot_seqs(&js, "index").await;
    stack.stop_materializer(1).await;
    let mut c = stack.client("mo", "web", "mo-1", &[]).await;
    let mut last = write_index(&mut c, "a", 0, 40).await;
    wait_for_snapshot(&stack, "web", "index", last).await;
    // m1 comes back 40 ops behind and snapshots as it catches up, while writes go on.
    stack.add_materializer("m1");
    last = write_index(&mut c, "a", 40, 80).await;
    wait_for_snapshot(&stack, "web", "index", last).await;
    let report = ultrasync_compactor::compact_once(&js, &stack.config.compactor, false, None)
        .await
        .expect("compaction");
    assert!(report.purged_total > 0, "{report:?}");
    let m = take_over_and_write(&mut stack, &mut c).await;
    assert_eq!(seq(&m), last + 1);
    let seen = seen.lock().expect("lock").clone();
    assert!(!seen.is_empty());
    assert!(
        never_backwards(&seen),
        "the stored snapshot went backwards: {seen:?}"
    );
    stack.shutdown().await;
}

/// The stored snapshot is unusable (damaged here) and the log was compacted past
/// the start: a sequencer taking the key asks a materializer for a snapshot instead
/// of stalling, and that one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequencer_without_a_usable_snapshot_asks_a_materializer_for_one() {
    let mut stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.materializer.snapshot_every_ops = 1_000_000;
            c.materializer.snapshot_interval_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let mut c = stack.client("sy", "web", "sy-1", &[]).await;
    let last = write_index(&mut c, "s", 0, 30).await;
    wait_for_snapshot(&stack, "web", "index", last).await;
    let js = stack.jetstream().await;
    ultrasync_compactor::compact_once(&js, &stack.config.compactor, false, None)
        .await
        .expect("compaction");
    // Damage the stored snapshot (as a disk or an operator might).
    let store = js
        .get_object_store(ultrasync_shared::nats::SNAPSHOTS_BUCKET)
        .await
        .expect("store");
    let name = ultrasync_shared::snapshot::object_name(
        &StreamKey::parse("acme", "web", "index").expect("key"),
    );
    store
        .put(name.as_str(), &mut &b"not a snapshot"[..])
        .await
        .expect("overwrite");
    let m = take_over_and_write(&mut stack, &mut c).await;
    assert_eq!(seq(&m), last + 1, "{m:?}");
    // The materializer's answer was stored, replacing the damaged one.
    let stored = wait_for_snapshot(&stack, "web", "index", last).await;
    assert!(stored.state.last_seq >= last);
    stack.shutdown().await;
}
