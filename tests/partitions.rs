//! Sequencing by partition, with real processes: three `ultrasync sequencer`
//! processes share the 16 partitions of `USYNC_CMDS` while 300 stream keys are
//! written; one is killed with SIGKILL (its partitions resume on the others, the
//! other partitions do not pause), one is frozen past the lease TTL and thawed (it
//! writes nothing until it holds a lease again, then rejoins). Afterwards every
//! acked command is in the log exactly once, `server_seq` dense per stream key.
//! A second test floods one stream key and checks that another key of the same
//! partition keeps its latency.
//!
//! Commands are published straight to `USYNC_CMDS` (as a gateway does) and answers
//! read from `usync.reply.t.>`, so the sequencers are all that is measured.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{Value, json};
use ultrasync_client::{Op, ServerMessage};
use ultrasync_shared::nats::{self, cmd_subject, ops_subject, partition_of};
use ultrasync_shared::{CommandEnvelope, OpType, StreamKey};
use ultrasync_testkit::{NatsServer, ServiceProcess, check_log_against_acks};

const PARTITIONS: u32 = 16;
const KEYS: usize = 300;
const REPLY: &str = "usync.reply.t.load";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn key(i: usize) -> StreamKey {
    StreamKey::parse(&format!("o{i}"), "web", "index").expect("key")
}

/// `ultrasync inspect partitions` through the binary.
fn inspect(url: &str) -> Value {
    ultrasync_testkit::inspect_partitions(&bin(), url)
}

/// Partitions held, by the pid in the instance id.
fn owners(v: &Value) -> HashMap<u32, Vec<u32>> {
    let mut by: HashMap<u32, Vec<u32>> = HashMap::new();
    for p in v["by_partition"].as_array().expect("partitions") {
        if let Some(owner) = p["owner"].as_str() {
            let pid = owner
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("pid");
            by.entry(pid)
                .or_default()
                .push(p["partition"].as_u64().expect("n") as u32);
        }
    }
    by
}

async fn wait_for(url: &str, what: &str, ok: impl Fn(&HashMap<u32, Vec<u32>>) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = inspect(url);
        if ok(&owners(&v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A command in flight.
struct Sent {
    key: usize,
    first: Instant,
    last: Instant,
    body: bytes::Bytes,
}

/// An answer: when it came, for which key, how long after the first send, from which pid.
struct Answer {
    at: Instant,
    at_ms: u64,
    key: usize,
    latency: Duration,
    pid: Option<u32>,
}

#[derive(Default)]
struct Load {
    sent: Mutex<HashMap<String, Sent>>,
    acked: Mutex<HashMap<String, Op>>,
    answers: Mutex<Vec<Answer>>,
}

impl Load {
    fn command(&self, n: usize, k: usize, payload: Value) -> (String, bytes::Bytes) {
        let key = key(k);
        let cmd = CommandEnvelope {
            org_id: key.org.to_string(),
            project_id: key.project.to_string(),
            namespace: key.namespace.to_string(),
            actor_id: "t".into(),
            client_id: "t".into(),
            command_id: format!("c{n}"),
            key: format!("k{}", n % 7),
            op_type: OpType::Set,
            payload,
            precondition: None,
            reply_to: Some(REPLY.into()),
            base_seq: None,
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&cmd).expect("encode"));
        let now = Instant::now();
        self.sent.lock().expect("lock").insert(
            cmd.command_id.clone(),
            Sent {
                key: k,
                first: now,
                last: now,
                body: body.clone(),
            },
        );
        (cmd_subject(&key), body)
    }

    /// Reads answers until the subscription ends.
    async fn answers(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(m) = sub.next().await {
            let pid = m
                .headers
                .as_ref()
                .and_then(|h| h.get(ultrasync_sequencer::HDR_SEQUENCER))
                .and_then(|v| v.as_str().split('-').next().and_then(|p| p.parse().ok()));
            for doc in nats::split_lines(m.headers.as_ref(), &m.payload) {
                let msg: ServerMessage = serde_json::from_slice(doc).expect("answer");
                match msg {
                    ServerMessage::Ack { command_id, op, .. } => {
                        let Some(sent) = self.sent.lock().expect("lock").remove(&command_id) else {
                            continue; // an answer to a resend
                        };
                        if let Some(prev) = self
                            .acked
                            .lock()
                            .expect("lock")
                            .insert(command_id.clone(), op.clone())
                        {
                            assert_eq!(prev, op, "two different acks for {command_id}");
                        }
                        self.answers.lock().expect("lock").push(Answer {
                            at: Instant::now(),
                            at_ms: unix_ms(),
                            key: sent.key,
                            latency: sent.first.elapsed(),
                            pid,
                        });
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
                        // Resent by the retry loop.
                    }
                    _ => {}
                }
            }
        }
    }

    /// Resends what has waited `after` since its last send (same command: the
    /// sequencer answers a repeat from the op id).
    async fn resend(&self, nc: &async_nats::Client, after: Duration) -> usize {
        let due: Vec<(usize, bytes::Bytes)> = {
            let mut sent = self.sent.lock().expect("lock");
            sent.values_mut()
                .filter(|s| s.last.elapsed() > after)
                .map(|s| {
                    s.last = Instant::now();
                    (s.key, s.body.clone())
                })
                .collect()
        };
        for (k, body) in &due {
            let _ = nc.publish(cmd_subject(&key(*k)), body.clone()).await;
        }
        due.len()
    }
}

/// p50, p99, max of latencies.
fn stats(mut l: Vec<Duration>) -> (Duration, Duration, Duration, usize) {
    assert!(!l.is_empty(), "no samples");
    l.sort();
    let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), at(1.0), l.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sequencers_share_partitions_through_kill_and_freeze() {
    let server = NatsServer::start();
    let url = server.url().to_owned();
    let nc = async_nats::connect(&url).await.expect("nats");
    let js = async_nats::jetstream::new(nc.clone());
    nats::ensure_layout(&js, nats::LayoutOptions::default())
        .await
        .expect("layout");

    // The server's partition mapping is the one the code computes.
    for i in [0, 1, 7, 42] {
        nc.publish(cmd_subject(&key(i)), "{}".into())
            .await
            .expect("publish");
    }
    nc.flush().await.expect("flush");
    let cmds = js.get_stream(nats::CMDS_STREAM).await.expect("cmds");
    // Core publishes are not acked: the stream may store them a moment after the
    // flush. Wait until it holds all four.
    let mut stored: HashSet<String> = HashSet::new();
    for _ in 0..100 {
        let mut c = cmds.clone();
        if c.info().await.expect("info").state.messages >= 4 {
            stored = futures::TryStreamExt::try_collect::<Vec<(String, usize)>>(
                cmds.info_with_subjects("usync.cmdp.>")
                    .await
                    .expect("subjects"),
            )
            .await
            .expect("subjects")
            .into_iter()
            .map(|(s, _)| s)
            .collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in [0, 1, 7, 42] {
        let k = key(i);
        let want = format!(
            "usync.cmdp.{}.{}.{}.{}",
            partition_of(&k, PARTITIONS),
            k.org,
            k.project,
            k.namespace
        );
        assert!(stored.contains(&want), "{want} not in {stored:?}");
    }
    cmds.purge().await.expect("purge");

    let mut procs: Vec<ServiceProcess> = (0..3)
        .map(|_| ServiceProcess::spawn(&bin(), "sequencer", &url, &[]))
        .collect();
    let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
    // Each instance active for some partitions, none for all: ceil(16 / 3) at most.
    let v = wait_for(&url, "three instances share the partitions", |o| {
        o.values().map(Vec::len).sum::<usize>() == PARTITIONS as usize
            && pids
                .iter()
                .all(|p| o.get(p).is_some_and(|v| (1..=6).contains(&v.len())))
    })
    .await;
    let shares: Vec<usize> = pids.iter().map(|p| owners(&v)[p].len()).collect();
    eprintln!("partitions: shares {shares:?}");
    assert!(shares.iter().all(|&n| n < PARTITIONS as usize));

    // Load: 400 commands/s over 300 stream keys, resends after 4 s without answer.
    let load = Arc::new(Load::default());
    let reader = tokio::spawn(
        load.clone()
            .answers(nc.subscribe("usync.reply.t.>").await.expect("sub")),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (load, nc, stop) = (load.clone(), nc.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0usize;
            let mut resent = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..4 {
                    let (subject, body) = load.command(n, n % KEYS, json!({"n": n}));
                    nc.publish(subject, body).await.expect("publish");
                    n += 1;
                }
                if n.is_multiple_of(200) {
                    resent += load.resend(&nc, Duration::from_secs(4)).await;
                }
            }
            (n, resent)
        })
    };
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;

    // kill -9 one instance.
    let victim = procs[0].pid();
    let victim_parts: HashSet<u32> = owners(&inspect(&url))[&victim].iter().copied().collect();
    let killed_at = Instant::now();
    procs[0].kill9();
    let survivors = [procs[1].pid(), procs[2].pid()];
    wait_for(
        &url,
        "the killed instance's partitions move to the others",
        |o| {
            !o.contains_key(&victim)
                && o.values().map(Vec::len).sum::<usize>() == PARTITIONS as usize
        },
    )
    .await;
    let moved_after = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(killed_at.elapsed())).await;

    // SIGSTOP one survivor past the lease TTL, then SIGCONT.
    let frozen = survivors[0];
    procs[1].stop();
    let frozen_at = Instant::now();
    let v = wait_for(
        &url,
        "the frozen instance's partitions move to the last one",
        |o| {
            o.get(&survivors[1])
                .is_some_and(|v| v.len() == PARTITIONS as usize)
        },
    )
    .await;
    assert!(!owners(&v).contains_key(&frozen));
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(frozen_at.elapsed())).await;
    procs[1].cont();
    let thawed_ms = unix_ms();
    let v = wait_for(&url, "the thawed instance rejoins", |o| {
        o.get(&frozen).is_some_and(|v| !v.is_empty())
    })
    .await;
    let rejoined_ms = v["by_partition"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| {
            p["owner"]
                .as_str()
                .is_some_and(|o| o.starts_with(&format!("{frozen}-")))
        })
        .filter_map(|p| p["owner_since_ms"].as_u64())
        .min()
        .expect("since");
    assert!(
        rejoined_ms > thawed_ms,
        "the thawed instance kept an old lease"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Stop the load; wait for every command to be answered.
    stop.store(true, Ordering::Relaxed);
    let (sent_total, mut resent) = sender.await.expect("sender");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !load.sent.lock().expect("lock").is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} commands unanswered",
            load.sent.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        resent += load.resend(&nc, Duration::from_secs(4)).await;
    }
    let answers = std::mem::take(&mut *load.answers.lock().expect("lock"));

    // The thawed instance answered nothing between its thaw (plus what it had on
    // the wire) and its new lease.
    let stale: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.pid == Some(frozen) && a.at_ms > thawed_ms + 300 && a.at_ms < rejoined_ms)
        .collect();
    assert!(
        stale.is_empty(),
        "{} answers from the thawed instance before it rejoined",
        stale.len()
    );

    // Writes to the partitions the kill did not touch kept their latency.
    let in_victim = |a: &&Answer| victim_parts.contains(&partition_of(&key(a.key), PARTITIONS));
    let sent_in = |a: &&Answer, from: Instant, to: Instant| {
        let sent = a.at - a.latency;
        sent >= from && sent < to
    };
    let baseline = stats(
        answers
            .iter()
            .filter(|a| sent_in(a, started + Duration::from_secs(2), killed_at))
            .map(|a| a.latency)
            .collect(),
    );
    let others = stats(
        answers
            .iter()
            .filter(|a| !in_victim(a) && sent_in(a, killed_at, killed_at + Duration::from_secs(5)))
            .map(|a| a.latency)
            .collect(),
    );
    let victims = stats(
        answers
            .iter()
            .filter(|a| in_victim(a) && sent_in(a, killed_at, killed_at + Duration::from_secs(5)))
            .map(|a| a.latency)
            .collect(),
    );
    eprintln!(
        "partitions: baseline p50 {:?} p99 {:?} max {:?} (n {}); after kill -9, other partitions p50 {:?} p99 {:?} max {:?} (n {}); the killed one's partitions p50 {:?} p99 {:?} max {:?} (n {}); moved in {moved_after:?}; {sent_total} commands, {resent} resent",
        baseline.0,
        baseline.1,
        baseline.2,
        baseline.3,
        others.0,
        others.1,
        others.2,
        others.3,
        victims.0,
        victims.1,
        victims.2,
        victims.3
    );
    // A pause would last as long as the killed instance's partitions took to move
    // (a lease TTL: seconds, measured above in this run); the usual latency is
    // milliseconds, a few times more when the machine is busy. Compared with the
    // move, not with the baseline alone, so a loaded machine does not read as a pause.
    assert!(
        others.1 * 4 < moved_after,
        "other partitions paused: p99 {:?} (baseline p99 {:?}) while the killed instance's partitions took {moved_after:?} to move",
        others.1,
        baseline.1
    );
    assert!(
        victims.2 > others.2,
        "the killed instance's partitions waited for a new owner"
    );

    // Every acked command in the log exactly once, server_seq dense per key.
    let acked = std::mem::take(&mut *load.acked.lock().expect("lock"));
    assert_eq!(acked.len(), sent_total);
    let subjects: Vec<String> = (0..KEYS).map(|i| ops_subject(&key(i))).collect();
    let total: usize = check_log_against_acks(&js, &subjects, &acked)
        .await
        .iter()
        .sum();
    assert_eq!(
        total, sent_total,
        "every acked command exactly once, nothing else"
    );
    reader.abort();
    drop(procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_stream_key_does_not_delay_another() {
    let server = NatsServer::start();
    let url = server.url().to_owned();
    let nc = async_nats::connect(&url).await.expect("nats");
    let js = async_nats::jetstream::new(nc.clone());
    nats::ensure_layout(&js, nats::LayoutOptions::default())
        .await
        .expect("layout");
    let procs = [ServiceProcess::spawn(&bin(), "sequencer", &url, &[])];
    wait_for(&url, "the instance holds every partition", |o| {
        o.values().map(Vec::len).sum::<usize>() == PARTITIONS as usize
    })
    .await;
    // The bystander shares the flooded key's partition: only the key may wait.
    let flooded = 0;
    let bystander = (1..KEYS)
        .find(|&i| partition_of(&key(i), PARTITIONS) == partition_of(&key(flooded), PARTITIONS))
        .expect("a key in the same partition");
    let load = Arc::new(Load::default());
    let reader = tokio::spawn(
        load.clone()
            .answers(nc.subscribe("usync.reply.t.>").await.expect("sub")),
    );

    // One bystander command at a time, each waiting for its ack.
    let mut n = 0usize;
    let mut bystand = |secs: u64| {
        let (load, nc) = (load.clone(), nc.clone());
        let start = n;
        n += 100_000;
        async move {
            let until = Instant::now() + Duration::from_secs(secs);
            let mut i = start;
            while Instant::now() < until {
                let id = format!("c{i}");
                let (subject, body) = load.command(i, bystander, json!({"i": i}));
                nc.publish(subject, body).await.expect("publish");
                let deadline = Instant::now() + Duration::from_secs(30);
                while load.sent.lock().expect("lock").contains_key(&id) {
                    assert!(Instant::now() < deadline, "bystander command unanswered");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    bystand(3).await;
    let of_bystander = |load: &Load| -> Vec<Duration> {
        let mut a = load.answers.lock().expect("lock");
        let l = a
            .iter()
            .filter(|a| a.key == bystander)
            .map(|a| a.latency)
            .collect();
        a.clear();
        l
    };
    let baseline = stats(of_bystander(&load));

    // The flood: 20,000 commands of 2 KB on one key, 200 to a message.
    let flood_start = Instant::now();
    let big = "x".repeat(2048);
    let mut docs = Vec::new();
    for i in 0..20_000usize {
        let (_, body) = load.command(1_000_000 + i, flooded, json!({"v": big}));
        docs.push(body);
        if docs.len() == 200 {
            let mut h = async_nats::HeaderMap::new();
            h.insert(nats::HDR_BATCH, "200");
            nc.publish_with_headers(
                cmd_subject(&key(flooded)),
                h,
                nats::join_lines(&docs).into(),
            )
            .await
            .expect("publish");
            docs.clear();
        }
    }
    nc.flush().await.expect("flush");
    bystand(4).await;
    let during = stats(of_bystander(&load));
    let v = inspect(&url);
    let pushed_back: u64 = v["by_partition"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter_map(|p| p["pushed_back"].as_u64())
        .sum();
    // Let the flood finish (resending what the stream refused or lost).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !load.sent.lock().expect("lock").is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} flood commands unanswered",
            load.sent.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        load.resend(&nc, Duration::from_secs(10)).await;
    }
    let drained = flood_start.elapsed();
    eprintln!(
        "flood: bystander baseline p50 {:?} p99 {:?} max {:?} (n {}); during the flood p50 {:?} p99 {:?} max {:?} (n {}); 20,000 flood commands answered in {drained:?}; {pushed_back} commands handed back",
        baseline.0, baseline.1, baseline.2, baseline.3, during.0, during.1, during.2, during.3
    );
    assert!(pushed_back > 0, "the flood never filled its key's queue");
    // Read before any resend: every command handed back so far came in a message of
    // 200, and a message goes to the queue whole or back whole (a message split
    // between the two would come back with the commands already taken, each decoded
    // and answered again).
    assert_eq!(
        pushed_back % 200,
        0,
        "a flood message was split between the queue and a hand-back"
    );
    // Not queued behind the flood: a bystander command sent right after the flood
    // and queued behind it would wait about as long as the flood took to drain;
    // its slowest ack is a small part of that, and its median stays near the
    // baseline's.
    assert!(during.2 * 2 < drained, "the bystander waited for the flood");
    assert!(
        during.0 <= baseline.1 * 5 + baseline.0 * 5,
        "bystander p50 {:?} against baseline p99 {:?}",
        during.0,
        baseline.1
    );
    let acked = std::mem::take(&mut *load.acked.lock().expect("lock"));
    let counts = check_log_against_acks(
        &js,
        &[ops_subject(&key(flooded)), ops_subject(&key(bystander))],
        &acked,
    )
    .await;
    assert_eq!(counts.iter().sum::<usize>(), acked.len());
    reader.abort();
    drop(procs);
}
