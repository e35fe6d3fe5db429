//! Several sequencer instances against one NATS: `server_seq` stays dense and unique
//! per stream key, and every acked command is in the log exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_shared::StreamKey;
use ultrasync_shared::nats::ops_subject;
use ultrasync_testkit::{Stack, StackOptions, read_subject};

const NAMESPACES: [&str; 2] = ["index", "metadata"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sequencers_ten_writers_five_thousand_commands() {
    let stack = Stack::start_with(StackOptions {
        sequencers: 2,
        ..Default::default()
    })
    .await;
    const WRITERS: usize = 10;
    const PER_WRITER: usize = 500;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut conn = stack
            .client(&format!("writer-{w}"), "web", &format!("w{w}"), &[])
            .await;
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let ns = NAMESPACES[(w + i) % NAMESPACES.len()];
                conn.command(
                    &format!("w{w}-{i}"),
                    ns,
                    &format!("key-{}", i % 7),
                    OpType::Set,
                    json!({"w": w, "i": i}),
                )
                .await
                .expect("send");
            }
            let mut acks = HashMap::new();
            while acks.len() < PER_WRITER {
                match conn
                    .recv_timeout(Duration::from_secs(60))
                    .await
                    .expect("answer")
                {
                    ServerMessage::Ack { command_id, op, .. } => {
                        assert!(acks.insert(command_id, op).is_none(), "duplicate ack");
                    }
                    ServerMessage::Reject {
                        command_id,
                        code,
                        reason,
                        ..
                    } => {
                        panic!("{command_id} rejected: {code} {reason}")
                    }
                    _ => {}
                }
            }
            conn.close().await;
            acks
        }));
    }
    let mut acked = HashMap::new();
    for t in tasks {
        acked.extend(t.await.expect("writer"));
    }
    assert_eq!(acked.len(), WRITERS * PER_WRITER);

    // The log itself, read straight from JetStream.
    let js = stack.jetstream().await;
    let mut in_log = HashSet::new();
    let mut total = 0;
    for ns in NAMESPACES {
        let key = StreamKey::parse("acme", "web", ns).expect("key");
        let entries = read_subject(&js, &ops_subject(&key)).await;
        let seqs: Vec<u64> = entries.iter().map(|e| e.server_seq).collect();
        assert_eq!(
            seqs,
            (1..=entries.len() as u64).collect::<Vec<_>>(),
            "{ns}: Usync-Seq is not 1..N"
        );
        for e in &entries {
            let op = e.op().expect("op");
            assert_eq!(op.server_seq, e.server_seq, "header and body disagree");
            assert_eq!(op.op_id, e.op_id);
            assert!(
                in_log.insert(op.op_id.clone()),
                "op {} stored twice",
                op.op_id
            );
            let ack = &acked[&op.command_id];
            assert_eq!(ack, &op, "the stored op differs from its ack");
        }
        total += entries.len();
    }
    assert_eq!(
        total,
        WRITERS * PER_WRITER,
        "the log holds ops nobody was acked for, or misses some"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_command_is_answered_with_the_original_ack() {
    let stack = Stack::start().await;
    let mut conn = stack.client("rory", "web", "rory-1", &[]).await;
    let mut acks = Vec::new();
    for _ in 0..3 {
        conn.command("same-id", "index", "k", OpType::Set, json!({"v": 1}))
            .await
            .expect("send");
        loop {
            if let ServerMessage::Ack { op, .. } = conn
                .recv_timeout(Duration::from_secs(10))
                .await
                .expect("answer")
            {
                acks.push(op);
                break;
            }
        }
    }
    assert_eq!(acks[0], acks[1]);
    assert_eq!(acks[1], acks[2]);
    let js = stack.jetstream().await;
    let key = StreamKey::parse("acme", "web", "index").expect("key");
    assert_eq!(read_subject(&js, &ops_subject(&key)).await.len(), 1);
    stack.shutdown().await;
}
