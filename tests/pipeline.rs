//! End to end over real sockets: WebSocket → gateway → USYNC_CMDS → sequencer →
//! USYNC_OPS → every subscribed socket, against a real nats-server.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;
use ultrasync_client::{Connection, Op, OpType, ServerMessage};
use ultrasync_testkit::{Stack, StackOptions, recv_until};

const WAIT: Duration = Duration::from_secs(30);

/// Sends `n` set commands from `conn` (ids `{prefix}-{i}`) and returns the acks by
/// command id.
async fn write_and_collect_acks(
    conn: &mut Connection,
    prefix: &str,
    ns: &str,
    n: usize,
) -> HashMap<String, Op> {
    for i in 0..n {
        conn.command(
            &format!("{prefix}-{i}"),
            ns,
            &format!("k{}", i % 50),
            OpType::Set,
            json!({"i": i}),
        )
        .await
        .expect("send");
    }
    let mut acks = HashMap::new();
    while acks.len() < n {
        match conn.recv_timeout(WAIT).await.expect("answer") {
            ServerMessage::Ack {
                command_id,
                server_seq,
                op,
            } => {
                assert_eq!(server_seq, op.server_seq);
                assert!(
                    acks.insert(command_id, op).is_none(),
                    "two acks for one command"
                );
            }
            ServerMessage::Reject {
                command_id,
                code,
                reason,
                ..
            } => panic!("{command_id} rejected: {code} {reason}"),
            _ => {}
        }
    }
    acks
}

/// Collects ops from `ops` frames until `last` is reached; checks contiguity as it
/// goes. Returns on reaching `until` or after `stop_after` ops.
async fn take_ops(conn: &mut Connection, got: &mut Vec<Op>, until: u64, stop_after: Option<usize>) {
    let start = got.len();
    loop {
        if got.last().is_some_and(|o| o.server_seq >= until) {
            return;
        }
        if stop_after.is_some_and(|n| got.len() - start >= n) {
            return;
        }
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Ops { seq_start, ops, .. } => {
                let expected = got.last().map_or(1, |o| o.server_seq + 1);
                assert_eq!(
                    seq_start, expected,
                    "ops frame does not continue the sequence"
                );
                for (i, op) in ops.into_iter().enumerate() {
                    assert_eq!(
                        op.server_seq,
                        seq_start + i as u64,
                        "hole inside an ops frame"
                    );
                    got.push(op);
                }
            }
            ServerMessage::Synced { .. } | ServerMessage::Pong { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_thousand_ops_with_resume() {
    let stack = Stack::start().await;
    let mut bob = stack
        .client("bob", "web", "bob-1", &[("index", Some(0))])
        .await;
    let synced = recv_until(&mut bob, WAIT, |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("synced");
    assert!(matches!(
        synced.last(),
        Some(ServerMessage::Synced { server_seq: 0, .. })
    ));

    let mut alice = stack.client("alice", "web", "alice-1", &[]).await;
    let writer = tokio::spawn(async move {
        let acks = write_and_collect_acks(&mut alice, "a", "index", 1000).await;
        alice.close().await;
        acks
    });

    // Bob takes part of the stream, drops the socket, and resumes from his cursor.
    let mut got = Vec::new();
    take_ops(&mut bob, &mut got, 1000, Some(400)).await;
    bob.close().await;
    let cursor = got.last().map_or(0, |o| o.server_seq);
    assert!(cursor >= 400);
    let mut bob = stack
        .client("bob", "web", "bob-1", &[("index", Some(cursor))])
        .await;
    take_ops(&mut bob, &mut got, 1000, None).await;

    let acks = writer.await.expect("writer");
    assert_eq!(acks.len(), 1000);
    let seqs: Vec<u64> = got.iter().map(|o| o.server_seq).collect();
    assert_eq!(
        seqs,
        (1..=1000).collect::<Vec<_>>(),
        "bob saw a gap or a duplicate"
    );
    for op in &got {
        let acked = &acks[&op.command_id];
        assert_eq!(acked, op, "bob's op differs from the ack alice got");
        assert_eq!(op.actor_id, "alice");
        assert_eq!(op.org_id, "acme");
    }
    // Alice's commands were sequenced in the order she sent them.
    for (i, op) in got.iter().enumerate() {
        assert_eq!(op.command_id, format!("a-{i}"));
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_gets_exactly_the_ops_after_the_cursor_then_synced_then_live() {
    let stack = Stack::start().await;
    let mut alice = stack.client("alice", "web", "alice-1", &[]).await;
    let acks = write_and_collect_acks(&mut alice, "a", "metadata", 20).await;
    assert_eq!(acks.len(), 20);

    let mut carol = stack
        .client("carol", "web", "carol-1", &[("metadata", Some(12))])
        .await;
    let frames = recv_until(&mut carol, WAIT, |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("catch-up");
    let mut seqs = Vec::new();
    for f in &frames {
        if let ServerMessage::Ops { namespace, ops, .. } = f {
            assert_eq!(namespace, "metadata");
            seqs.extend(ops.iter().map(|o| o.server_seq));
        }
    }
    assert_eq!(seqs, (13..=20).collect::<Vec<_>>());
    assert!(matches!(
        frames.last(),
        Some(ServerMessage::Synced { server_seq: 20, .. })
    ));

    // Live from here: the next op arrives as a push.
    alice
        .command("live-1", "metadata", "x", OpType::Del, json!(null))
        .await
        .expect("send");
    let acked = recv_until(&mut alice, WAIT, |m| matches!(m, ServerMessage::Ack { .. }))
        .await
        .expect("ack");
    assert!(matches!(
        acked.last(),
        Some(ServerMessage::Ack { server_seq: 21, .. })
    ));
    let live = recv_until(&mut carol, WAIT, |m| matches!(m, ServerMessage::Ops { .. }))
        .await
        .expect("live");
    match live.last() {
        Some(ServerMessage::Ops {
            seq_start: 21, ops, ..
        }) => {
            assert_eq!(ops.len(), 1);
            assert_eq!(ops[0].op_type, OpType::Del);
            assert_eq!(ops[0].command_id, "live-1");
        }
        other => panic!("expected op 21, got {other:?}"),
    }
    // Namespaces are independent sequences: another namespace starts at 1.
    let other = write_and_collect_acks(&mut alice, "b", "index", 3).await;
    let mut other_seqs: Vec<u64> = other.values().map(|o| o.server_seq).collect();
    other_seqs.sort_unstable();
    assert_eq!(other_seqs, vec![1, 2, 3]);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_ops_survive_a_restart_of_the_whole_stack() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = ultrasync_testkit::random_secret();
    let opts = || StackOptions {
        dir: Some(dir.path().to_path_buf()),
        secret: Some(secret.clone()),
        ..Default::default()
    };
    let stack = Stack::start_with(opts()).await;
    let mut alice = stack.client("alice", "web", "alice-1", &[]).await;
    let before = write_and_collect_acks(&mut alice, "a", "index", 50).await;
    alice.close().await;
    stack.shutdown().await;

    let stack = Stack::start_with(opts()).await;
    let mut bob = stack
        .client("bob", "web", "bob-1", &[("index", Some(0))])
        .await;
    let mut got = Vec::new();
    take_ops(&mut bob, &mut got, 50, None).await;
    assert_eq!(got.len(), 50);
    for op in &got {
        assert_eq!(
            &before[&op.command_id], op,
            "an acked op changed across the restart"
        );
    }
    // The sequence goes on where it stopped.
    let mut alice = stack.client("alice", "web", "alice-1", &[]).await;
    let after = write_and_collect_acks(&mut alice, "z", "index", 1).await;
    assert_eq!(after["z-0"].server_seq, 51);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_reported_not_fatal() {
    let stack = Stack::start().await;
    let mut conn = Connection::connect(&stack.ws_url(), &stack.token("dave", "read write"))
        .await
        .expect("connect");
    // Anything before hello is refused.
    conn.send_raw(r#"{"type":"ping"}"#).await.expect("send");
    assert!(matches!(
        conn.recv_timeout(WAIT).await.expect("frame"),
        ServerMessage::Error {
            code: ultrasync_shared::ErrorCode::InvalidMessage,
            ..
        }
    ));
    conn.hello("acme", "web", "dave-1", BTreeMap::new())
        .await
        .expect("hello");
    for bad in [
        "not json",
        r#"{"type":"teleport"}"#,
        r#"{"type":"command","command_id":"x"}"#,
    ] {
        conn.send_raw(bad).await.expect("send");
        assert!(matches!(
            conn.recv_timeout(WAIT).await.expect("frame"),
            ServerMessage::Error {
                code: ultrasync_shared::ErrorCode::InvalidMessage,
                ..
            }
        ));
    }
    conn.send_raw(r#"{"type":"ping","nonce":7}"#)
        .await
        .expect("send");
    assert_eq!(
        conn.recv_timeout(WAIT).await.expect("pong"),
        ServerMessage::Pong {
            nonce: Some(json!(7))
        }
    );
    stack.shutdown().await;
}
