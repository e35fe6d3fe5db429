//! Bootstrap from a snapshot: a client without a cursor (or with one below the
//! compacted part of the log) gets `snapshot` frames, then the ops after it, then
//! `synced`, and ends with exactly the state of someone who saw every op.

use std::collections::BTreeMap;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ROOT};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_shared::StreamKey;
use ultrasync_shared::nats::{OPS_STREAM, ops_subject};
use ultrasync_shared::state::{self, KeyEntry, NamespaceState};
use ultrasync_testkit::{Stack, StackOptions, read_subject, wait_for_snapshot};

const WAIT: Duration = Duration::from_secs(20);

/// What a client holds for one namespace, rebuilt from the frames it got.
#[derive(Default)]
struct Replica {
    state: NamespaceState,
    snapshot_frames: usize,
    digest: Option<String>,
}

/// Follows `namespaces` until each is `synced`, building each state from snapshot
/// frames and ops (frames of different namespaces interleave on one socket).
async fn bootstrap(conn: &mut Connection, namespaces: &[&str]) -> BTreeMap<String, Replica> {
    let mut replicas: BTreeMap<String, Replica> = BTreeMap::new();
    let mut synced = 0;
    while synced < namespaces.len() {
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Snapshot {
                namespace,
                last_server_seq,
                state: part,
                digest,
                more,
                ..
            } => {
                let r = replicas.entry(namespace).or_default();
                if r.snapshot_frames == 0
                    || r.state.last_seq != last_server_seq
                    || r.digest.is_some()
                {
                    r.state = NamespaceState {
                        last_seq: last_server_seq,
                        keys: BTreeMap::new(),
                    };
                    r.digest = None;
                }
                for (k, ks) in part {
                    let doc = ks.doc.map(|b| {
                        Box::new(Automerge::load(&B64.decode(b).expect("b64")).expect("loads"))
                    });
                    r.state.keys.insert(
                        k,
                        KeyEntry {
                            value: ks.value,
                            version: ks.version,
                            doc,
                        },
                    );
                }
                r.snapshot_frames += 1;
                if !more {
                    assert_eq!(
                        state::digest(&r.state),
                        digest,
                        "snapshot frames do not add up to their digest"
                    );
                    r.digest = Some(digest);
                }
            }
            ServerMessage::Ops { namespace, ops, .. } => {
                let r = replicas.entry(namespace).or_default();
                for op in ops {
                    state::apply(&mut r.state, &op)
                        .expect("tail op applies on top of the snapshot");
                }
            }
            ServerMessage::Synced {
                namespace,
                server_seq,
            } => {
                let r = replicas.entry(namespace).or_default();
                assert_eq!(server_seq, r.state.last_seq);
                synced += 1;
            }
            _ => {}
        }
    }
    replicas
}

async fn ack(conn: &mut Connection, id: &str, ns: &str, key: &str, op: OpType, payload: Value) {
    conn.command(id, ns, key, op, payload).await.expect("send");
    loop {
        match conn.recv_timeout(WAIT).await.expect("answer") {
            ServerMessage::Ack { .. } => return,
            ServerMessage::Reject { code, reason, .. } => panic!("{id}: {code} {reason}"),
            _ => {}
        }
    }
}

/// The state someone who saw every op has: the whole log replayed.
async fn live_state(stack: &Stack, ns: &str) -> NamespaceState {
    let js = stack.jetstream().await;
    let mut st = NamespaceState::default();
    for e in read_subject(
        &js,
        &ops_subject(&StreamKey::parse("acme", "web", ns).expect("key")),
    )
    .await
    {
        state::apply(&mut st, &e.op().expect("op")).expect("apply");
    }
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_bootstrap_from_snapshot_and_tail() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.materializer.snapshot_every_ops = 50,
        ..Default::default()
    })
    .await;
    let mut writer = stack.client("wanda", "web", "wanda-1", &[]).await;
    // index: 120 ops over 10 keys (set, patch, del); metadata: 60 values of 20 KiB,
    // so its snapshot is over 1 MiB and must come in several frames; collab: 60
    // Automerge changes.
    for i in 0..120 {
        let (op, payload) = match i % 3 {
            0 => (OpType::Set, json!({"i": i})),
            1 => (OpType::Patch, json!({"p": i})),
            _ if i % 9 == 2 => (OpType::Del, Value::Null),
            _ => (OpType::Set, json!(i)),
        };
        ack(
            &mut writer,
            &format!("i{i}"),
            "index",
            &format!("k{}", i % 10),
            op,
            payload,
        )
        .await;
    }
    for i in 0..60 {
        ack(
            &mut writer,
            &format!("m{i}"),
            "metadata",
            &format!("blob{i}"),
            OpType::Set,
            json!("z".repeat(20 * 1024)),
        )
        .await;
    }
    let mut doc = AutoCommit::new();
    for i in 0..60 {
        doc.put(ROOT, format!("f{}", i % 5), i as i64).expect("put");
        doc.commit();
        let change = B64.encode(doc.get_last_local_change().expect("change").raw_bytes());
        ack(
            &mut writer,
            &format!("d{i}"),
            "collab",
            "doc",
            OpType::CrdtOp,
            json!({"change": change}),
        )
        .await;
    }
    let index_snap = wait_for_snapshot(&stack, "web", "index", 100).await;
    wait_for_snapshot(&stack, "web", "metadata", 50).await;
    wait_for_snapshot(&stack, "web", "collab", 50).await;

    // A new client asks for snapshots.
    let mut fresh = stack
        .client(
            "fred",
            "web",
            "fred-1",
            &[("index", None), ("metadata", None), ("collab", None)],
        )
        .await;
    let mut replicas = bootstrap(&mut fresh, &["index", "metadata", "collab"]).await;
    for ns in ["index", "metadata", "collab"] {
        let replica = replicas.remove(ns).expect("replica");
        assert!(replica.snapshot_frames >= 1, "{ns}: no snapshot frame");
        let live = live_state(&stack, ns).await;
        assert_eq!(
            replica.state, live,
            "{ns}: bootstrapped state differs from the live one"
        );
        assert_eq!(state::digest(&replica.state), state::digest(&live));
        if ns == "metadata" {
            assert!(
                replica.snapshot_frames >= 2,
                "a >1 MiB state came in one frame"
            );
        }
        if ns == "collab" {
            // The document from the snapshot + tail is the editor's document.
            let entry = &replica.state.keys["doc"];
            let mut heads: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
            heads.sort();
            assert_eq!(entry.heads(), Some(heads));
            assert_eq!(
                entry.value,
                serde_json::to_value(automerge::AutoSerde::from(&doc)).expect("json")
            );
        }
    }

    // Compact index up to its snapshot: a client whose cursor is below that gets the
    // snapshot and the tail instead of a gap.
    let js = stack.jetstream().await;
    let ops = js.get_stream(OPS_STREAM).await.expect("ops");
    let subject = ops_subject(&StreamKey::parse("acme", "web", "index").expect("key"));
    ops.purge()
        .filter(&subject)
        .sequence(index_snap.head_stream_seq + 1)
        .await
        .expect("purge");
    let mut late = stack
        .client("lou", "web", "lou-1", &[("index", Some(10))])
        .await;
    let replica = bootstrap(&mut late, &["index"])
        .await
        .remove("index")
        .expect("replica");
    assert!(
        replica.snapshot_frames >= 1,
        "a client below the floor got no snapshot"
    );
    assert_eq!(
        replica.digest.as_deref(),
        Some(index_snap.digest().as_str())
    );
    let mut expected = index_snap.state.clone();
    for e in read_subject(&js, &subject).await {
        state::apply(&mut expected, &e.op().expect("op")).expect("apply");
    }
    assert_eq!(replica.state, expected);
    stack.shutdown().await;
}
