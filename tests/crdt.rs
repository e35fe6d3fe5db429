//! Three clients editing one Automerge document at once, each with its own replica
//! made with the `automerge` crate, converge to the document the server holds; a
//! fourth client that bootstraps from the materializer's snapshot loads the same
//! document with the `automerge` crate.

use std::sync::Arc;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;
use tokio::sync::Barrier;
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::state::{self, NamespaceState};
use ultrasync_shared::{Op, StreamKey};
use ultrasync_testkit::{Stack, read_subject};

const ROUNDS: usize = 30;
const KEY: &str = "board";

fn send_change(doc: &mut AutoCommit) -> serde_json::Value {
    doc.commit();
    let change = doc.get_last_local_change().expect("a local change");
    json!({"change": B64.encode(change.raw_bytes())})
}

fn absorb(doc: &mut AutoCommit, ops: &[Op]) -> u64 {
    let mut last = 0;
    for op in ops {
        let bytes = B64
            .decode(op.payload["change"].as_str().expect("change"))
            .expect("base64");
        let change = automerge::Change::from_bytes(bytes).expect("change");
        doc.apply_changes([change]).expect("apply");
        last = op.server_seq;
    }
    last
}

/// One editing client: its socket, its replica, and how far it has got.
struct Editor {
    conn: Connection,
    doc: AutoCommit,
    /// Last `server_seq` applied to `doc`.
    seen: u64,
    acks: usize,
}

impl Editor {
    /// Reads frames for up to `limit` each, applying ops and counting acks.
    async fn pump(&mut self, limit: Duration) {
        while let Ok(msg) = self.conn.recv_timeout(limit).await {
            match msg {
                ServerMessage::Ops { ops, seq_start, .. } => {
                    assert_eq!(seq_start, self.seen + 1, "ops out of order");
                    self.seen = absorb(&mut self.doc, &ops);
                }
                ServerMessage::Ack { .. } => self.acks += 1,
                ServerMessage::Reject { code, reason, .. } => {
                    panic!("change rejected: {code} {reason}")
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_automerge_clients_converge_with_the_server() {
    let stack = Arc::new(Stack::start().await);
    let barrier = Arc::new(Barrier::new(3));
    let mut tasks = Vec::new();
    for i in 0..3usize {
        let stack = stack.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let conn = stack
                .client(
                    &format!("editor-{i}"),
                    "web",
                    &format!("e{i}"),
                    &[("collab", Some(0))],
                )
                .await;
            let mut ed = Editor {
                conn,
                doc: AutoCommit::new(),
                seen: 0,
                acks: 0,
            };
            let mut sent = 0usize;
            if i == 0 {
                ed.doc.put(ROOT, "title", "shared board").expect("put");
                ed.doc
                    .put_object(ROOT, "items", ObjType::List)
                    .expect("list");
                let change = send_change(&mut ed.doc);
                ed.conn
                    .command("init", "collab", KEY, OpType::CrdtOp, change)
                    .await
                    .expect("send");
                sent += 1;
            }
            // Everyone starts editing once the list exists locally.
            while ed.seen == 0 {
                ed.pump(Duration::from_millis(50)).await;
            }
            barrier.wait().await;
            let items = match ed.doc.get(ROOT, "items").expect("get") {
                Some((_, id)) => id,
                None => panic!("no list"),
            };
            for r in 0..ROUNDS {
                ed.doc
                    .insert(&items, 0, format!("e{i}-r{r}"))
                    .expect("insert");
                ed.doc
                    .put(ROOT, format!("count_{i}"), r as i64)
                    .expect("put");
                // Everyone writes the same field: a real conflict, resolved by Automerge.
                ed.doc
                    .put(ROOT, "last_writer", format!("e{i}"))
                    .expect("put");
                let change = send_change(&mut ed.doc);
                ed.conn
                    .command(&format!("e{i}-{r}"), "collab", KEY, OpType::CrdtOp, change)
                    .await
                    .expect("send");
                sent += 1;
                ed.pump(Duration::from_millis(2)).await;
            }
            while ed.acks < sent {
                ed.pump(Duration::from_millis(50)).await;
            }
            barrier.wait().await;
            ed
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("editor"));
    }

    // The server's document: the log replayed with the shared state machine.
    let js = stack.jetstream().await;
    let entries = read_subject(
        &js,
        &ops_subject(&StreamKey::parse("acme", "web", "collab").expect("key")),
    )
    .await;
    assert_eq!(entries.len(), 1 + 3 * ROUNDS);
    let mut server = NamespaceState::default();
    for e in &entries {
        state::apply(&mut server, &e.op().expect("op")).expect("apply");
    }
    let server_entry = &server.keys[KEY];
    let server_heads = server_entry.heads().expect("crdt key has heads");
    let last = entries.last().map_or(0, |e| e.server_seq);

    for ed in &mut clients {
        while ed.seen < last {
            ed.pump(Duration::from_millis(200)).await;
        }
        let doc = &mut ed.doc;
        let json = serde_json::to_value(automerge::AutoSerde::from(&*doc)).expect("json");
        assert_eq!(
            json, server_entry.value,
            "a client's document differs from the server's"
        );
        let mut heads: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
        heads.sort();
        assert_eq!(heads, server_heads);
    }
    assert_eq!(
        server_entry.value["items"].as_array().map(Vec::len),
        Some(3 * ROUNDS)
    );
    for i in 0..3 {
        assert_eq!(server_entry.value[format!("count_{i}")], json!(ROUNDS - 1));
    }
    // A new client bootstraps from the snapshot: the saved document in it loads in
    // the automerge crate and is the editors' document.
    let key = StreamKey::parse("acme", "web", "collab").expect("key");
    let nc = stack.nats_client().await;
    let stored = ultrasync_shared::reads::snapshot(
        &nc,
        &key,
        &ultrasync_shared::reads::ReadRequest {
            min_seq: Some(last),
            store: true,
            ..Default::default()
        },
    )
    .await
    .expect("materialized snapshot");
    assert_eq!(stored.state.last_seq, last);
    let mut fresh = stack
        .client("nora", "web", "nora-1", &[("collab", None)])
        .await;
    let frames = ultrasync_testkit::recv_until(&mut fresh, Duration::from_secs(20), |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("bootstrap");
    let mut loaded = None;
    for frame in &frames {
        if let ServerMessage::Snapshot {
            last_server_seq,
            state,
            ..
        } = frame
        {
            assert_eq!(*last_server_seq, last);
            let ks = &state[KEY];
            let bytes = B64.decode(ks.doc.as_deref().expect("doc")).expect("base64");
            let doc = automerge::Automerge::load(&bytes).expect("the snapshot's document loads");
            let mut heads: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
            heads.sort();
            assert_eq!(Some(&heads), ks.heads.as_ref());
            assert_eq!(heads, server_heads);
            loaded = Some(doc);
        }
    }
    let loaded = loaded.expect("a snapshot frame");
    for ed in &clients {
        let theirs = serde_json::to_value(automerge::AutoSerde::from(&ed.doc)).expect("json");
        let ours = serde_json::to_value(automerge::AutoSerde::from(&loaded)).expect("json");
        assert_eq!(
            ours, theirs,
            "the bootstrapped document differs from an editor's"
        );
    }
    drop(clients);
    if let Ok(stack) = Arc::try_unwrap(stack) {
        stack.shutdown().await;
    }
}
