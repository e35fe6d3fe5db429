//! Sequencer failover under load, with real processes: the active sequencer is killed
//! with SIGKILL three times (and once frozen with SIGSTOP, then resumed) while 8
//! writers send 20,000 commands. Afterwards every acked command is in the log exactly
//! once and `server_seq` is dense per stream key.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use ultrasync_client::{Op, OpType, ServerMessage};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_testkit::{SequencerProcess, Stack, StackOptions, read_subject};

const WRITERS: usize = 8;
const PER_WRITER: usize = 2500;
const WINDOW: usize = 250;
const NAMESPACES: [&str; 2] = ["index", "metadata"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_sequencer_killed_and_frozen_under_load() {
    let stack = Stack::start_with(StackOptions {
        sequencers: 0,
        ..Default::default()
    })
    .await;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"));
    let mut procs: Vec<SequencerProcess> = (0..2).map(|_| stack.sequencer_process(&bin)).collect();

    // Who is active: the pid in the `Usync-Sequencer` header of the latest answer.
    let active = Arc::new(AtomicU32::new(0));
    let nc = async_nats::connect(stack.nats.url()).await.expect("nats");
    let mut answers = nc.subscribe("usync.reply.>").await.expect("subscribe");
    let watcher = {
        let active = active.clone();
        tokio::spawn(async move {
            while let Some(m) = answers.next().await {
                let pid = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(ultrasync_sequencer::HDR_SEQUENCER))
                    .and_then(|v| v.as_str().split('-').next().and_then(|p| p.parse().ok()));
                if let Some(pid) = pid {
                    active.store(pid, Ordering::Relaxed);
                }
            }
        })
    };

    let progress = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let progress = progress.clone();
        let mut conn = stack
            .client(&format!("writer-{w}"), "web", &format!("w{w}"), &[])
            .await;
        writers.push(tokio::spawn(async move {
            let cmd = |i: usize| {
                (
                    format!("w{w}-{i}"),
                    NAMESPACES[i % 2],
                    format!("k{}", i % 13),
                    json!({"w": w, "i": i}),
                )
            };
            let mut acked: HashMap<String, Op> = HashMap::new();
            let mut in_flight: HashSet<String> = HashSet::new();
            let mut next = 0;
            let mut resent = 0usize;
            while acked.len() < PER_WRITER {
                while next < PER_WRITER && in_flight.len() < WINDOW {
                    let (id, ns, key, payload) = cmd(next);
                    conn.command(&id, ns, &key, OpType::Set, payload)
                        .await
                        .expect("send");
                    in_flight.insert(id);
                    next += 1;
                }
                match conn
                    .recv_timeout(Duration::from_secs(120))
                    .await
                    .expect("answer")
                {
                    ServerMessage::Ack { command_id, op, .. } => {
                        in_flight.remove(&command_id);
                        match acked.insert(command_id.clone(), op.clone()) {
                            Some(prev) => {
                                assert_eq!(prev, op, "two different acks for {command_id}")
                            }
                            None => {
                                progress.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    ServerMessage::Reject {
                        command_id,
                        code: ErrorCode::Unavailable,
                        ..
                    } => {
                        // The outcome is unknown: resend the same command (same id).
                        let i: usize = command_id
                            .rsplit('-')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .expect("id");
                        let (id, ns, key, payload) = cmd(i);
                        conn.command(&id, ns, &key, OpType::Set, payload)
                            .await
                            .expect("resend");
                        resent += 1;
                    }
                    ServerMessage::Reject {
                        command_id,
                        code,
                        reason,
                        ..
                    } => panic!("{command_id}: {code} {reason}"),
                    _ => {}
                }
            }
            (acked, resent)
        }));
    }

    // Chaos at fixed points of progress, so every action lands mid-load: SIGKILL the
    // active instance (and start a replacement) at 2k, 10k and 14k acked commands;
    // at 6k freeze it (SIGSTOP) long enough for another to take over, then thaw it
    // so a stale instance tries to write.
    let chaos = {
        let progress = progress.clone();
        let active = active.clone();
        let bin = bin.clone();
        let url = stack.nats.url().to_owned();
        tokio::spawn(async move {
            let (mut kills, mut freezes) = (0, 0);
            let mut dead: HashSet<u32> = HashSet::new();
            for (at, freeze) in [
                (2_000, false),
                (6_000, true),
                (10_000, false),
                (14_000, false),
            ] {
                // Wait for the point, and for an answer from a live instance.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                let i = loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tokio::time::Instant::now() > deadline {
                        return (kills, freezes, procs);
                    }
                    let pid = active.load(Ordering::Relaxed);
                    if progress.load(Ordering::Relaxed) >= at
                        && !dead.contains(&pid)
                        && let Some(i) = procs.iter().position(|p| p.pid() == pid)
                    {
                        break i;
                    }
                };
                if freeze {
                    procs[i].stop();
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    procs[i].cont();
                    freezes += 1;
                } else {
                    dead.insert(procs[i].pid());
                    procs[i].kill9();
                    procs.remove(i);
                    procs.push(SequencerProcess::spawn(&bin, &url));
                    kills += 1;
                }
            }
            (kills, freezes, procs)
        })
    };

    let mut acked: HashMap<String, Op> = HashMap::new();
    let mut resent = 0;
    for w in writers {
        let (a, r) = w.await.expect("writer");
        acked.extend(a);
        resent += r;
    }
    let (kills, freezes, procs) = chaos.await.expect("chaos");
    watcher.abort();
    assert!(
        kills == 3 && freezes == 1,
        "chaos did not happen: {kills} kills, {freezes} freezes"
    );
    eprintln!(
        "failover: {kills} kill -9, {freezes} SIGSTOP/SIGCONT, {resent} commands resent after `unavailable`"
    );
    assert_eq!(acked.len(), WRITERS * PER_WRITER);

    let js = stack.jetstream().await;
    let mut seen = HashSet::new();
    let mut total = 0;
    for ns in NAMESPACES {
        let entries = read_subject(
            &js,
            &ops_subject(&StreamKey::parse("acme", "web", ns).expect("key")),
        )
        .await;
        let seqs: Vec<u64> = entries.iter().map(|e| e.server_seq).collect();
        assert_eq!(
            seqs,
            (1..=entries.len() as u64).collect::<Vec<_>>(),
            "{ns}: server_seq not dense"
        );
        for e in &entries {
            let op = e.op().expect("op");
            assert!(
                seen.insert(op.command_id.clone()),
                "{} is in the log twice",
                op.command_id
            );
            assert_eq!(
                acked.get(&op.command_id),
                Some(&op),
                "log and ack differ for {}",
                op.command_id
            );
        }
        total += entries.len();
    }
    assert_eq!(
        total,
        WRITERS * PER_WRITER,
        "every acked command exactly once, nothing else"
    );
    drop(procs);
    stack.shutdown().await;
}
