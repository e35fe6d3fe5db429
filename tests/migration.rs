//! Upgrading a running deployment from the single sequencer consumer to partitions
//! (README "Upgrading to partitions"): the layout as the version before partitions
//! made it (`USYNC_CMDS` without a subject transform, one consumer
//! `usync-sequencer` reading every subject), a sequencer of this binary running on
//! it, then frozen so that commands queue up unacknowledged in that consumer (some
//! waiting, some taken) while writes go on; the real `ultrasync setup` run against
//! the running system; a new sequencer on the partitions that also drains the old
//! consumer, redeliveries included; the frozen one thawed with the commands it had
//! taken, switching to partitions in place; a third joining. Every command sent
//! before, during and after is in the log exactly once, `server_seq` dense per
//! stream key, each command id at one `server_seq` however often it was answered.
//!
//! Commands are published to `USYNC_CMDS` as a gateway does (JetStream publish,
//! `usync.cmd.{org}.{project}.{ns}`) and resent, unchanged, when unanswered, as a
//! client's outbox does; answers are read from `usync.reply.t.>`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use serde_json::json;
use ultrasync_client::{Op, ServerMessage};
use ultrasync_shared::nats::{self, cmd_subject, ops_subject};
use ultrasync_shared::{CommandEnvelope, OpType, StreamKey};
use ultrasync_testkit::{NatsServer, ServiceProcess, check_log_against_acks};

const KEYS: usize = 24;
const REPLY: &str = "usync.reply.t.migration";
const PHASES: [&str; 3] = ["before", "during", "after"];

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn key(i: usize) -> StreamKey {
    StreamKey::parse(&format!("o{i}"), "web", "index").expect("key")
}

/// The layout of a deployment set up before partitions: everything else as today's
/// `ensure_layout` makes it, but `USYNC_CMDS` as that version created it (no
/// subject transform, no partition metadata: `git show e9a7eca^:shared/src/nats.rs`),
/// no lease bucket, and the single consumer every sequencer shared.
async fn layout_before_partitions(js: &jetstream::Context) {
    nats::ensure_layout(js, nats::LayoutOptions::default())
        .await
        .expect("layout");
    js.delete_stream(nats::CMDS_STREAM)
        .await
        .expect("drop USYNC_CMDS");
    js.delete_key_value(nats::LEASES_BUCKET)
        .await
        .expect("drop the lease bucket");
    js.create_stream(stream::Config {
        name: nats::CMDS_STREAM.to_owned(),
        description: Some("ultrasync commands, gateway -> sequencer".to_owned()),
        subjects: vec!["usync.cmd.>".to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::Memory,
        max_bytes: 256 * 1024 * 1024,
        discard: stream::DiscardPolicy::New,
        max_messages_per_subject: nats::CMDS_PER_STREAM_KEY,
        discard_new_per_subject: true,
        max_message_size: nats::MAX_MSG_SIZE,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .expect("old USYNC_CMDS");
    // The consumer every sequencer shared then, as they created it (defaults:
    // failover 2 s, ack wait 5 s).
    let cmds = js.get_stream(nats::CMDS_STREAM).await.expect("cmds");
    cmds.create_consumer(consumer::pull::Config {
        durable_name: Some(nats::SEQUENCER_CONSUMER.to_owned()),
        description: Some("ultrasync sequencers (one pinned active instance)".to_owned()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(5),
        max_ack_pending: 50_000,
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec!["sequencers".to_owned()],
        priority_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .expect("the single sequencer consumer");
}

/// A command on its way: its body (resent unchanged), when it was last sent, and
/// the phase it was first sent in.
struct Sent {
    key: usize,
    body: bytes::Bytes,
    last: Instant,
    phase: u8,
}

#[derive(Default)]
struct Load {
    sent: Mutex<HashMap<String, Sent>>,
    /// Every command answered: its op (the first ack; later ones must equal it),
    /// and its phase.
    acked: Mutex<HashMap<String, (Op, u8)>>,
    /// Acks received, repeats included.
    answers: Mutex<usize>,
    /// Repeated acks (a command answered again), by the pid of the sequencer.
    repeats: Mutex<HashMap<u32, usize>>,
}

impl Load {
    fn command(&self, n: usize, phase: u8) -> (String, bytes::Bytes) {
        let k = n % KEYS;
        let key = key(k);
        let cmd = CommandEnvelope {
            org_id: key.org.to_string(),
            project_id: key.project.to_string(),
            namespace: key.namespace.to_string(),
            actor_id: "t".into(),
            client_id: "t".into(),
            command_id: format!("c{n}"),
            key: format!("k{}", n % 5),
            op_type: OpType::Set,
            payload: json!({"n": n}),
            precondition: None,
            reply_to: Some(REPLY.into()),
            base_seq: None,
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&cmd).expect("encode"));
        self.sent.lock().expect("lock").insert(
            cmd.command_id,
            Sent {
                key: k,
                body: body.clone(),
                last: Instant::now(),
                phase,
            },
        );
        (cmd_subject(&key), body)
    }

    /// Reads answers until the subscription ends. A command answered twice (a
    /// resend, a redelivery, both consumers) must get the same op both times.
    async fn answers(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(m) = sub.next().await {
            let pid = m
                .headers
                .as_ref()
                .and_then(|h| h.get(ultrasync_sequencer::HDR_SEQUENCER))
                .and_then(|v| v.as_str().split('-').next()?.parse().ok())
                .unwrap_or(0);
            for doc in nats::split_lines(m.headers.as_ref(), &m.payload) {
                match serde_json::from_slice(doc).expect("answer") {
                    ServerMessage::Ack { command_id, op, .. } => {
                        *self.answers.lock().expect("lock") += 1;
                        let sent = self.sent.lock().expect("lock").remove(&command_id);
                        let mut acked = self.acked.lock().expect("lock");
                        match (acked.get(&command_id), sent) {
                            (Some((first, _)), _) => {
                                assert_eq!(
                                    first, &op,
                                    "{command_id} answered with two different ops"
                                );
                                *self.repeats.lock().expect("lock").entry(pid).or_default() += 1;
                            }
                            (None, Some(sent)) => {
                                acked.insert(command_id, (op, sent.phase));
                            }
                            (None, None) => panic!("an ack for {command_id}, never sent"),
                        }
                    }
                    ServerMessage::Reject {
                        command_id,
                        code,
                        reason,
                        ..
                    } => {
                        use ultrasync_shared::ErrorCode::{RateLimited, Unavailable};
                        assert!(
                            matches!(code, Unavailable | RateLimited),
                            "{command_id}: {code} {reason}"
                        );
                        // Resent by the writer.
                    }
                    _ => {}
                }
            }
        }
    }

    /// Resends, unchanged, what has waited `after` since it was last sent.
    async fn resend(&self, js: &jetstream::Context, after: Duration) -> usize {
        let due: Vec<(usize, bytes::Bytes)> = self
            .sent
            .lock()
            .expect("lock")
            .values_mut()
            .filter(|s| s.last.elapsed() > after)
            .map(|s| {
                s.last = Instant::now();
                (s.key, s.body.clone())
            })
            .collect();
        for (k, body) in &due {
            // Not stored now: the next round sends it again.
            let _ = js.publish(cmd_subject(&key(*k)), body.clone()).await;
        }
        due.len()
    }
}

/// `usync-sequencer`'s commands not yet acknowledged: waiting, and delivered but
/// not acked. `None` once the consumer is gone.
async fn unpartitioned_backlog(js: &jetstream::Context) -> Option<(u64, usize, String)> {
    let cmds = js.get_stream(nats::CMDS_STREAM).await.expect("cmds");
    let info = cmds.consumer_info(nats::SEQUENCER_CONSUMER).await.ok()?;
    Some((
        info.num_pending,
        info.num_ack_pending,
        info.config.filter_subject.clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_on_a_running_deployment_moves_it_to_partitions_without_losing_or_resequencing_a_command()
 {
    let server = NatsServer::start();
    let url = server.url().to_owned();
    let nc = async_nats::connect(&url).await.expect("nats");
    let js = jetstream::new(nc.clone());
    layout_before_partitions(&js).await;

    // Today's sequencer on the old layout works as before: the single consumer.
    let first = ServiceProcess::spawn(&bin(), "sequencer", &url, &[]);
    let load = Arc::new(Load::default());
    let reader = tokio::spawn(
        load.clone()
            .answers(nc.subscribe("usync.reply.t.>").await.expect("sub")),
    );
    // Writes go on through every phase: 200 commands/s over 24 stream keys.
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (load, js, phase, stop) = (load.clone(), js.clone(), phase.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            let mut resent = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..2 {
                    let (subject, body) = load.command(n, phase.load(Ordering::Relaxed));
                    // A refused or lost publish is resent like an unanswered one.
                    let _ = js.publish(subject, body).await;
                    n += 1;
                }
                if n.is_multiple_of(200) {
                    resent += load.resend(&js, Duration::from_secs(8)).await;
                }
            }
            (n, resent)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.acked.lock().expect("lock").len() < 200 {
        assert!(
            Instant::now() < deadline,
            "the sequencer on the old layout answers nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cmds_cfg = js
        .get_stream(nats::CMDS_STREAM)
        .await
        .expect("cmds")
        .cached_info()
        .config
        .clone();
    assert_eq!(nats::partitions_of(&cmds_cfg), None, "still the old layout");

    // The running sequencer freezes: commands queue up, unacknowledged, in the
    // single consumer (waiting, or taken and not acked).
    first.stop();
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (waiting, in_flight, filter) = unpartitioned_backlog(&js).await.expect("consumer");
    assert_eq!(filter, "", "the old consumer reads every subject");
    assert!(waiting + in_flight as u64 > 0, "nothing queued");

    // The upgrade: `ultrasync setup`, the real binary, while writes go on.
    phase.store(1, Ordering::Relaxed);
    let setup = tokio::task::spawn_blocking({
        let url = url.clone();
        move || {
            std::process::Command::new(bin())
                .args(["setup", "--nats-url", &url])
                .env("ULTRASYNC_LOG", "warn")
                .output()
                .expect("run setup")
        }
    })
    .await
    .expect("setup");
    assert!(
        setup.status.success(),
        "setup: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let cmds_cfg = js
        .get_stream(nats::CMDS_STREAM)
        .await
        .expect("cmds")
        .cached_info()
        .config
        .clone();
    assert_eq!(
        nats::partitions_of(&cmds_cfg),
        Some(nats::DEFAULT_PARTITIONS)
    );
    js.get_key_value(nats::LEASES_BUCKET)
        .await
        .expect("setup made the lease bucket");
    // The old consumer keeps what it had, narrowed to the subjects stored before.
    let (waiting_after, in_flight_after, filter) =
        unpartitioned_backlog(&js).await.expect("consumer kept");
    assert_eq!(filter, nats::LEGACY_CMD_FILTER);
    let queued_at_setup = waiting_after + in_flight_after as u64;
    assert!(queued_at_setup > 0, "the queue vanished at setup");

    // A new sequencer starts on the partitions and drains the old consumer beside
    // them, including, once their ack wait (5 s) is over, the commands the frozen
    // one had taken.
    let second = ServiceProcess::spawn(&bin(), "sequencer", &url, &[]);
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(frozen_at.elapsed())).await;

    // The frozen one thaws holding those commands (sequenced meanwhile by the
    // other), finds the partitions in place, and takes its share; a third joins.
    first.cont();
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let third = ServiceProcess::spawn(&bin(), "sequencer", &url, &[]);
    tokio::time::sleep(Duration::from_secs(4)).await;

    stop.store(true, Ordering::Relaxed);
    let (sent_total, mut resent) = writer.await.expect("writer");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !load.sent.lock().expect("lock").is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} commands unanswered",
            load.sent.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        resent += load.resend(&js, Duration::from_secs(8)).await;
    }
    // Drained, the old consumer goes; the partition consumers carried the rest.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = unpartitioned_backlog(&js).await {
        assert!(
            Instant::now() < deadline,
            "the drained single consumer is still there: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cmds = js.get_stream(nats::CMDS_STREAM).await.expect("cmds");
    let mut by_partitions = 0;
    for p in 0..nats::DEFAULT_PARTITIONS {
        if let Ok(info) = cmds.consumer_info(nats::partition_consumer(p)).await {
            by_partitions += info.ack_floor.stream_sequence.min(1);
        }
    }
    assert!(by_partitions > 0, "no partition consumer took a command");

    // Every command exactly once, server_seq dense per stream key, each command at
    // the server_seq it was acked with.
    let acked: HashMap<String, (Op, u8)> = std::mem::take(&mut *load.acked.lock().expect("lock"));
    assert_eq!(acked.len(), sent_total, "every command answered");
    let mut per_phase = [0usize; 3];
    for (_, p) in acked.values() {
        per_phase[*p as usize] += 1;
    }
    let ops: HashMap<String, Op> = acked.into_iter().map(|(id, (op, _))| (id, op)).collect();
    let subjects: Vec<String> = (0..KEYS).map(|i| ops_subject(&key(i))).collect();
    let counts = check_log_against_acks(&js, &subjects, &ops).await;
    let total: usize = counts.iter().sum();
    let answers = *load.answers.lock().expect("lock");
    let repeats = std::mem::take(&mut *load.repeats.lock().expect("lock"));
    let thawed_repeats = repeats.get(&first.pid()).copied().unwrap_or(0);
    eprintln!(
        "migration: {sent_total} commands ({} before, {} during, {} after setup), {queued_at_setup} queued in the single consumer at setup ({waiting} waiting, {in_flight} in flight when frozen), {resent} resent, {answers} acks for them ({thawed_repeats} repeats from the thawed sequencer, answered from their op ids; all repeats by pid {repeats:?}), {by_partitions} partitions used",
        per_phase[0], per_phase[1], per_phase[2]
    );
    for (p, name) in per_phase.iter().zip(PHASES) {
        assert!(*p > 0, "no command sent {name} the upgrade");
    }
    assert_eq!(
        total, sent_total,
        "every command in the log exactly once, nothing else"
    );
    reader.abort();
    drop((first, second, third));
}
