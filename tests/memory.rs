//! Bounded memory: with compaction running, the commands a sequencer remembers of a
//! stream key and those its snapshot carries are the log's and a recent window's,
//! not the key's whole history; retries of compacted ops are still recognised
//! (through `usync-commands`), and a take-over loads only the snapshot and the tail.
//!
//! `ULTRASYNC_MEMORY_OPS=1000000 cargo test --test memory -- --nocapture` runs the
//! long version and prints the sequencer's resident memory and the snapshot size
//! after every round.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_shared::snapshot::RECENT_COMMANDS;
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_testkit::{ServiceProcess, Stack, StackOptions, rss_kib, wait_for_snapshot};

const WAIT: Duration = Duration::from_secs(30);
/// Commands in flight on the writer's socket.
const WINDOW: usize = 500;
const ROUNDS: u64 = 10;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

/// Writes commands `from..to` (ids `m{i}`, 100 keys), `WINDOW` in flight; the
/// highest `server_seq` acked.
async fn write(c: &mut Connection, from: u64, to: u64) -> u64 {
    let mut last = 0;
    let mut next = from;
    while next < to {
        let end = (next + WINDOW as u64).min(to);
        for i in next..end {
            c.command(
                &format!("m{i}"),
                "index",
                &format!("k{}", i % 100),
                OpType::Set,
                json!({"n": i}),
            )
            .await
            .expect("send");
        }
        let mut acked = 0;
        while acked < end - next {
            match c.recv_timeout(WAIT).await.expect("answer") {
                ServerMessage::Ack { server_seq, .. } => {
                    acked += 1;
                    last = last.max(server_seq);
                }
                ServerMessage::Reject { code, reason, .. } => panic!("rejected: {code:?} {reason}"),
                _ => {}
            }
        }
        next = end;
    }
    last
}

async fn answer(c: &mut Connection, id: &str, payload: serde_json::Value) -> ServerMessage {
    c.command(id, "index", "k0", OpType::Set, payload)
        .await
        .expect("send");
    loop {
        if let m @ (ServerMessage::Ack { .. } | ServerMessage::Reject { .. }) =
            c.recv_timeout(WAIT).await.expect("answer")
        {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_what_a_key_remembers_the_size_of_its_log() {
    let total: u64 = std::env::var("ULTRASYNC_MEMORY_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let stack = Stack::start_with(StackOptions {
        sequencers: 0,
        configure: |c| {
            c.gateway.max_commands_per_sec_per_actor = 1_000_000;
            c.gateway.max_messages_per_sec = 1_000_000;
            c.materializer.snapshot_every_ops = 2_000;
            c.materializer.snapshot_interval_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let mut sequencer = ServiceProcess::spawn(&bin(), "sequencer", stack.nats.url(), &[]);
    let js = stack.jetstream().await;
    let store = js
        .get_object_store(ultrasync_shared::nats::SNAPSHOTS_BUCKET)
        .await
        .expect("store");
    let key = StreamKey::parse("acme", "web", "index").expect("key");
    let mut c = stack.client("mem", "web", "mem-1", &[]).await;
    let started = Instant::now();
    let per_round = total / ROUNDS;
    let mut sizes = Vec::new();
    let mut head = 0;
    // The log's first op after the previous round's compaction: every snapshot of
    // this round was written later, so it carries no command older than that
    // (but the recent window's).
    let mut first_before = 1;
    for round in 0..ROUNDS {
        head = write(&mut c, round * per_round, (round + 1) * per_round).await;
        let snapshot = wait_for_snapshot(&stack, "web", "index", head).await;
        let report = ultrasync_compactor::compact_once(&js, &stack.config.compactor, false, None)
            .await
            .expect("compaction");
        let first = report.stream_keys[0].floor + 1;
        let carried = (snapshot.commands.len() + snapshot.op_ids.len()) as u64;
        let bytes = store
            .info(ultrasync_shared::snapshot::object_name(&key))
            .await
            .expect("info")
            .size;
        assert!(
            carried <= snapshot.state.last_seq + 1 - first_before + RECENT_COMMANDS,
            "round {round}: the snapshot at {} carries {carried} commands, the log started at {first_before}",
            snapshot.state.last_seq,
        );
        first_before = first;
        eprintln!(
            "memory: round {round}: {head} ops, {:.0} ops/s, log from {first}, snapshot {} bytes with {} commands, sequencer RSS {} KiB",
            head as f64 / started.elapsed().as_secs_f64(),
            bytes,
            snapshot.commands.len(),
            rss_kib(sequencer.pid())
        );
        sizes.push(bytes);
    }
    // Flat: the last snapshot is no bigger than the one after the second round
    // (same keys, same live state; commands bounded by the log), give or take the
    // compression's noise.
    let baseline = sizes[1] as f64;
    let last = *sizes.last().expect("sizes") as f64;
    assert!(
        last <= baseline * 1.25,
        "the snapshot grew with history: {sizes:?}"
    );

    // A retry of the very first command, long compacted: its original server_seq.
    let retry = answer(&mut c, "m0", json!({"n": 0})).await;
    match &retry {
        ServerMessage::Reject { code, reason, .. } => {
            assert_eq!(*code, ErrorCode::StaleBase, "{retry:?}");
            assert!(reason.contains("server_seq 1,"), "{retry:?}");
        }
        other => panic!("expected stale_base, got {other:?}"),
    }
    // Its command id used for another body: refused.
    let reused = answer(&mut c, "m1", json!({"n": "other"})).await;
    assert!(
        matches!(
            &reused,
            ServerMessage::Reject {
                code: ErrorCode::InvalidMessage,
                ..
            }
        ),
        "{reused:?}"
    );

    // Take-over: kill -9, a new instance loads the snapshot and the tail.
    sequencer.kill9();
    let restarted = Instant::now();
    let _next = ServiceProcess::spawn(&bin(), "sequencer", stack.nats.url(), &[]);
    let after = answer(&mut c, "after", json!({"n": "after"})).await;
    match after {
        ServerMessage::Ack { server_seq, .. } => assert_eq!(server_seq, head + 1),
        other => panic!("expected an ack, got {other:?}"),
    }
    eprintln!(
        "memory: take-over after {head} ops: next write acked {} ms after kill -9",
        restarted.elapsed().as_millis()
    );
    // The retry is still recognised by the new instance.
    let retry = answer(&mut c, "m0", json!({"n": 0})).await;
    assert!(
        matches!(
            &retry,
            ServerMessage::Reject {
                code: ErrorCode::StaleBase,
                ..
            }
        ),
        "{retry:?}"
    );
    stack.shutdown().await;
}
