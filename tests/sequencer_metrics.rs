//! The sequencer's Prometheus listener, with real processes: three `ultrasync
//! sequencer --metrics-listen` processes share the 16 partitions; their `/metrics`,
//! scraped over real sockets, add up to the partition count (each partition owned by
//! exactly one of them), and after commands are written their counters agree with
//! what was sent and with the op log, partition by partition. When one is killed,
//! the survivors' metrics show its partitions moving to them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use ultrasync_client::ServerMessage;
use ultrasync_shared::nats::{self, cmd_subject, partition_of};
use ultrasync_shared::natsd::free_ports;
use ultrasync_shared::{CommandEnvelope, OpType, StreamKey};
use ultrasync_testkit::{NatsServer, ServiceProcess, http_get, init_tracing};

const PARTITIONS: u32 = 16;
const KEYS: usize = 40;
const COMMANDS: usize = 400;
/// Commands whose answer cannot be sent (reply_to outside `usync.reply.`).
const DROPPED: usize = 3;
const REPLY: &str = "usync.reply.t.metrics";

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn key(i: usize) -> StreamKey {
    StreamKey::parse(&format!("m{i}"), "web", "index").expect("key")
}

/// One scrape: series name → (labels → value).
type Scrape = HashMap<String, BTreeMap<String, f64>>;

async fn scrape(port: u16) -> Option<Scrape> {
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let mut out: Scrape = HashMap::new();
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        out.entry(name.to_owned())
            .or_default()
            .insert(labels.to_owned(), value.parse().expect("a number"));
    }
    Some(out)
}

fn partition_label(labels: &str) -> u32 {
    labels
        .strip_prefix("partition=\"")
        .and_then(|l| l.strip_suffix('"'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a partition label: {labels}"))
}

/// Partitions an instance reports owned.
fn owned(s: &Scrape) -> HashSet<u32> {
    s.get("ultrasync_sequencer_partition_owned")
        .map(|m| {
            m.iter()
                .filter(|(_, v)| **v == 1.0)
                .map(|(l, _)| partition_label(l))
                .collect()
        })
        .unwrap_or_default()
}

fn total(s: &Scrape, name: &str) -> f64 {
    s.get(name).map_or(0.0, |m| m.values().sum())
}

fn by_partition(s: &Scrape, name: &str) -> BTreeMap<u32, f64> {
    s.get(name)
        .map(|m| m.iter().map(|(l, v)| (partition_label(l), *v)).collect())
        .unwrap_or_default()
}

async fn scrape_all(ports: &[u16]) -> Vec<Scrape> {
    let mut out = Vec::new();
    for p in ports {
        out.push(scrape(*p).await.unwrap_or_default());
    }
    out
}

/// Scrapes `ports` until `ok` holds (30 s at most).
async fn wait_for(ports: &[u16], what: &str, ok: impl Fn(&[Scrape]) -> bool) -> Vec<Scrape> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = scrape_all(ports).await;
        if ok(&all) {
            return all;
        }
        let owned: Vec<HashSet<u32>> = all.iter().map(owned).collect();
        assert!(Instant::now() < deadline, "{what}: owned {owned:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every partition owned by exactly one of the instances scraped, each holding its
/// even share at most (so nothing moves any more while they all live).
fn shared_exactly(all: &[Scrape]) -> bool {
    let sets: Vec<HashSet<u32>> = all.iter().map(owned).collect();
    let sum: usize = sets.iter().map(HashSet::len).sum();
    let union: HashSet<u32> = sets.iter().flatten().copied().collect();
    let share = (PARTITIONS as usize).div_ceil(all.len().max(1));
    sum == PARTITIONS as usize
        && union.len() == PARTITIONS as usize
        && sets.iter().all(|s| (1..=share).contains(&s.len()))
}

fn command(n: usize, reply_to: &str) -> (String, bytes::Bytes) {
    let key = key(n % KEYS);
    let cmd = CommandEnvelope {
        org_id: key.org.to_string(),
        project_id: key.project.to_string(),
        namespace: key.namespace.to_string(),
        actor_id: "t".into(),
        client_id: "t".into(),
        command_id: format!("c{n}"),
        key: format!("k{}", n % 5),
        op_type: OpType::Set,
        payload: serde_json::json!({"n": n}),
        precondition: None,
        reply_to: Some(reply_to.into()),
        base_seq: None,
    };
    let body = serde_json::to_vec(&cmd).expect("encode");
    (cmd_subject(&key), body.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sequencers_report_their_partitions_and_counters() {
    init_tracing();
    let server = NatsServer::start();
    let url = server.url().to_owned();
    let nc = async_nats::connect(&url).await.expect("nats");
    let js = async_nats::jetstream::new(nc.clone());
    nats::ensure_layout(&js, nats::LayoutOptions::default())
        .await
        .expect("layout");

    let ports = free_ports(3).expect("ports");
    let mut procs: Vec<ServiceProcess> = ports
        .iter()
        .map(|p| {
            let listen = format!("127.0.0.1:{p}");
            ServiceProcess::spawn(&bin(), "sequencer", &url, &["--metrics-listen", &listen])
        })
        .collect();

    // The owned partitions add up to the partition count, each owned once.
    let all = wait_for(&ports, "three instances share the partitions", |all| {
        all.len() == 3 && shared_exactly(all)
    })
    .await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for s in &all {
        assert_eq!(
            total(s, "ultrasync_sequencer_partitions"),
            f64::from(PARTITIONS)
        );
        // Every partition has an owned series (1 or 0) on every instance.
        assert_eq!(
            s["ultrasync_sequencer_partition_owned"].len(),
            PARTITIONS as usize
        );
        let mine = owned(s);
        assert!(mine.len() < PARTITIONS as usize, "one instance holds all");
        // A lease expiry and a queue depth for each partition held, no other.
        let expiry = by_partition(s, "ultrasync_sequencer_partition_lease_expiry_seconds");
        assert_eq!(expiry.keys().copied().collect::<HashSet<_>>(), mine);
        for (p, at) in expiry {
            // Renewed every quarter TTL (2 s): in the future, within a TTL, give or
            // take the scrape's own age.
            assert!(
                at > now - 5.0 && at < now + 10.0,
                "partition {p}: lease expiry {at} against now {now}"
            );
        }
        let depth = by_partition(s, "ultrasync_sequencer_partition_queue_depth");
        assert!(
            depth.keys().all(|p| mine.contains(p)),
            "depth of a partition not held: {depth:?} {mine:?}"
        );
    }

    // Write: COMMANDS answered normally, DROPPED whose answers cannot be sent.
    let mut answers = nc.subscribe("usync.reply.t.>").await.expect("sub");
    for n in 0..COMMANDS {
        let (subject, body) = command(n, REPLY);
        nc.publish(subject, body).await.expect("publish");
    }
    for n in COMMANDS..COMMANDS + DROPPED {
        let (subject, body) = command(n, "elsewhere.t");
        nc.publish(subject, body).await.expect("publish");
    }
    nc.flush().await.expect("flush");
    let mut acked = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < COMMANDS {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, answers.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {COMMANDS} acked", acked.len()))
            .expect("answers");
        for doc in nats::split_lines(m.headers.as_ref(), &m.payload) {
            match serde_json::from_slice::<ServerMessage>(doc).expect("answer") {
                ServerMessage::Ack { command_id, .. } => {
                    acked.insert(command_id);
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    // What each partition was sent.
    let mut sent: BTreeMap<u32, f64> = BTreeMap::new();
    for n in 0..COMMANDS + DROPPED {
        *sent
            .entry(partition_of(&key(n % KEYS), PARTITIONS))
            .or_default() += 1.0;
    }
    let ops = js.get_stream(nats::OPS_STREAM).await.expect("ops");

    // Counters moved and agree with what was sent and stored; the dropped answers
    // are counted; queues drain to zero (read at most every 2 s: wait for it).
    let all = wait_for(&ports, "counters settle", |all| {
        let written: f64 = all
            .iter()
            .map(|s| total(s, "ultrasync_sequencer_ops_written_total"))
            .sum();
        let dropped: f64 = all
            .iter()
            .map(|s| total(s, "ultrasync_sequencer_dropped_replies_total"))
            .sum();
        let depth: f64 = all
            .iter()
            .map(|s| total(s, "ultrasync_sequencer_partition_queue_depth"))
            .sum();
        let depth_series: usize = all
            .iter()
            .map(|s| by_partition(s, "ultrasync_sequencer_partition_queue_depth").len())
            .sum();
        written == (COMMANDS + DROPPED) as f64
            && dropped == DROPPED as f64
            && depth == 0.0
            && depth_series == PARTITIONS as usize
    })
    .await;
    // Ops in the log (a message may carry several): every key's head, as nothing
    // was compacted.
    let mut stored = 0;
    for key in ultrasync_shared::log::stream_keys(&ops)
        .await
        .expect("keys")
    {
        stored += ultrasync_shared::log::head(&ops, &ultrasync_shared::nats::ops_subject(&key))
            .await
            .expect("head")
            .map_or(0, |h| h.server_seq);
    }
    assert_eq!(stored, (COMMANDS + DROPPED) as u64, "the op log");
    let mut written: BTreeMap<u32, f64> = BTreeMap::new();
    let mut commands: BTreeMap<u32, f64> = BTreeMap::new();
    for s in &all {
        // Per partition and instance-wide agree.
        let per = by_partition(s, "ultrasync_sequencer_partition_ops_written_total");
        assert_eq!(
            per.values().sum::<f64>(),
            total(s, "ultrasync_sequencer_ops_written_total")
        );
        let took = by_partition(s, "ultrasync_sequencer_partition_commands_total");
        assert_eq!(
            took.values().sum::<f64>(),
            total(s, "ultrasync_sequencer_commands_total")
        );
        // Only the partitions held wrote (nothing moved during the run).
        let mine = owned(s);
        for (p, n) in &per {
            assert!(
                *n == 0.0 || mine.contains(p),
                "partition {p} not held wrote {n}"
            );
            *written.entry(*p).or_default() += n;
        }
        for (p, n) in took {
            *commands.entry(p).or_default() += n;
        }
    }
    assert_eq!(written, sent, "ops written per partition");
    for (p, n) in &sent {
        let took = commands.get(p).copied().unwrap_or(0.0);
        // At least once: a redelivered command is taken again (and answered from
        // its op id), never written again.
        assert!(took >= *n, "partition {p}: took {took} of {n} commands");
    }
    eprintln!(
        "metrics: shares {:?}; ops written per partition {written:?}",
        all.iter().map(|s| owned(s).len()).collect::<Vec<_>>()
    );

    // kill -9 one: the survivors' metrics show its partitions taken over.
    let victim = owned(&all[0]);
    procs[0].kill9();
    let survivors = &ports[1..];
    let after = wait_for(
        survivors,
        "the killed instance's partitions move to the others",
        |all| all.len() == 2 && shared_exactly(all),
    )
    .await;
    let now_owned: HashSet<u32> = after.iter().flat_map(owned).collect();
    assert!(victim.is_subset(&now_owned));
    // The survivors' counters continue (they are counters: they never go down).
    for (before, s) in all[1..].iter().zip(&after) {
        assert!(
            total(s, "ultrasync_sequencer_ops_written_total")
                >= total(before, "ultrasync_sequencer_ops_written_total")
        );
    }
    drop(procs);
}
