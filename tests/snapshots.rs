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
