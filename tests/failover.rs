//! Sequencer failover under load, with real processes: the active sequencer is killed
//! with SIGKILL three times (and once frozen with SIGSTOP, then resumed) while 8
//! writers send 20,000 commands. Afterwards every acked command is in the log exactly
//! once and `server_seq` is dense per stream key.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use ultrasync_client::{Op, OpType, ServerMessage};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_testkit::{SequencerProcess, Stack, StackOptions, check_log_against_acks};

const WRITERS: usize = 8;
const PER_WRITER: usize = 2500;
const WINDOW: usize = 250;
const NAMESPACES: [&str; 2] = ["index", "metadata"];
/// Acked-command counts at which the active sequencer is killed (false) or frozen (true).
const CHAOS: [(usize, bool); 4] = [
    (2_000, false),
    (6_000, true),
    (10_000, false),
    (14_000, false),
];
/// How far past an action's point the writers may get before the action happens.
const SLACK: usize = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_sequencer_killed_and_frozen_under_load() {
    let stack = Stack::start_with(StackOptions {
        sequencers: 0,
        ..Default::default()
    })
    .await;
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"));
    let mut procs: Vec<SequencerProcess> = (0..2).map(|_| stack.sequencer_process(&bin)).collect();

    // Who is active: when each instance last answered (the `Usync-Sequencer` header).
    let answered: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let nc = async_nats::connect(stack.nats.url()).await.expect("nats");
    let mut answers = nc.subscribe("usync.reply.>").await.expect("subscribe");
    let watcher = {
        let answered = answered.clone();
        tokio::spawn(async move {
            while let Some(m) = answers.next().await {
                let pid = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(ultrasync_sequencer::HDR_SEQUENCER))
                    .and_then(|v| {
                        v.as_str()
                            .split('-')
                            .next()
                            .and_then(|p| p.parse::<u32>().ok())
                    });
                if let Some(pid) = pid {
                    answered.lock().expect("lock").insert(pid, Instant::now());
                }
            }
        })
    };
    // The writers may send only up to `cap` commands in all; the chaos raises it
    // after each action, so every action is followed by fresh load (and the load can
    // never run out before the chaos is done).
    let cap = Arc::new(AtomicUsize::new(CHAOS[0].0 + SLACK));

    let progress = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let progress = progress.clone();
        let cap = cap.clone();
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
                let allowed = (cap.load(Ordering::Relaxed) / WRITERS).min(PER_WRITER);
                if next >= allowed && in_flight.is_empty() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                while next < allowed && in_flight.len() < WINDOW {
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
        let answered = answered.clone();
        let cap = cap.clone();
        let bin = bin.clone();
        let url = stack.nats.url().to_owned();
        tokio::spawn(async move {
            let (mut kills, mut freezes) = (0, 0);
            let mut last_action = Instant::now();
            for (k, &(at, freeze)) in CHAOS.iter().enumerate() {
                // Wait for the point, and for an instance that has answered since the
                // last action (the active one).
                let deadline = Instant::now() + Duration::from_secs(120);
                let i = loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    assert!(
                        Instant::now() < deadline,
                        "no live active sequencer at {at}"
                    );
                    if progress.load(Ordering::Relaxed) < at {
                        continue;
                    }
                    let answered = answered.lock().expect("lock").clone();
                    let newest = procs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, p)| {
                            answered
                                .get(&p.pid())
                                .filter(|t| **t > last_action)
                                .map(|t| (i, *t))
                        })
                        .max_by_key(|(_, t)| *t);
                    if let Some((i, _)) = newest {
                        break i;
                    }
                };
                if freeze {
                    procs[i].stop();
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    procs[i].cont();
                    freezes += 1;
                } else {
                    procs[i].kill9();
                    procs.remove(i);
                    procs.push(SequencerProcess::spawn(&bin, "sequencer", &url, &[]));
                    kills += 1;
                }
                last_action = Instant::now();
                let next = CHAOS
                    .get(k + 1)
                    .map_or(WRITERS * PER_WRITER, |(at, _)| at + SLACK);
                cap.store(next, Ordering::Relaxed);
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
    let subjects: Vec<String> = NAMESPACES
        .iter()
        .map(|ns| ops_subject(&StreamKey::parse("acme", "web", ns).expect("key")))
        .collect();
    let total: usize = check_log_against_acks(&js, &subjects, &acked)
        .await
        .iter()
        .sum();
    assert_eq!(
        total,
        WRITERS * PER_WRITER,
        "every acked command exactly once, nothing else"
    );
    drop(procs);
    stack.shutdown().await;
}
