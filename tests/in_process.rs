//! `ultrasync serve` hands its gateway's commands to the sequencer of its own
//! process, and that sequencer's answers back, without NATS, for the partitions it
//! holds. Real processes: a second `ultrasync sequencer` joins while 24 stream keys
//! are written (it takes partitions over: the commands of those keys go through
//! `USYNC_CMDS` to it, and what the first had taken but not sequenced is handed
//! back there), then is killed with SIGKILL (its partitions come back after the
//! lease TTL, and the keys' commands to the direct path). Every command is acked once, and the log holds exactly the acked
//! ops, `server_seq` dense per stream key. A second test floods one stream key
//! while nats-server is frozen: what the key's queue cannot hold is handed back to
//! `USYNC_CMDS`, and still every command is acked once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use ultrasync_client::{Connection, Op, OpType, ServerMessage};
use ultrasync_shared::nats::{self, ops_subject};
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_testkit::{GatewayProcess, NatsServer, ServiceProcess, read_subject};

const PROJECTS: usize = 24;
/// Commands each writer keeps in flight.
const WINDOW: usize = 8;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

/// The value of metric `name` (with its labels, as written) on `/metrics` at `addr`.
async fn metric(addr: &str, name: &str) -> f64 {
    let (status, body) = ultrasync_testkit::http_get(&format!("http://{addr}/metrics"))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

/// `ultrasync serve` on a fresh nats-server, its sequencer's `/metrics` at the
/// returned address; the config dir and secret come back too.
async fn start_serve(url: &str) -> (GatewayProcess, String, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = ultrasync_testkit::random_secret();
    let seq_metrics = ultrasync_shared::natsd::free_ports(1).expect("port")[0];
    let seq_metrics = format!("127.0.0.1:{seq_metrics}");
    let config = dir.path().join("ultrasync.toml");
    std::fs::write(
        &config,
        format!("[sequencer]\nmetrics_listen = \"{seq_metrics}\"\n"),
    )
    .expect("config");
    let env = vec![
        ("ULTRASYNC_JWT_SECRET".to_owned(), secret.clone()),
        (
            "ULTRASYNC_CONFIG".to_owned(),
            config.to_string_lossy().into_owned(),
        ),
    ];
    let state = dir.path().join("state");
    let serve = GatewayProcess::start_as(
        &bin(),
        "serve",
        &["--data-dir", &state.to_string_lossy()],
        url,
        &env,
    )
    .await;
    wait_partitions(
        url,
        serve.process.pid(),
        "serve holds every partition",
        |n| n == nats::DEFAULT_PARTITIONS as usize,
    )
    .await;
    (serve, seq_metrics, dir, secret)
}

/// Partitions held by the instance whose pid is `pid`.
fn partitions_of(nats_url: &str, pid: u32) -> usize {
    let v = ultrasync_testkit::inspect_partitions(&bin(), nats_url);
    v["by_partition"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| {
            p["owner"]
                .as_str()
                .is_some_and(|o| o.starts_with(&format!("{pid}-")))
        })
        .count()
}

/// Waits (up to 30 s) until `ok` holds for the partitions of `pid`.
async fn wait_partitions(nats_url: &str, pid: u32, what: &str, ok: impl Fn(usize) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = partitions_of(nats_url, pid);
        if ok(n) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {n} partitions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Command `i` of writer `w`.
async fn send(conn: &mut Connection, w: usize, id: &str, i: usize) {
    let payload = json!({"w": w, "i": i});
    conn.command(id, "index", &format!("k{}", i % 5), OpType::Set, payload)
        .await
        .expect("send");
}

/// One socket writing one stream key (`acme/p{w}/index`) until `stop`, `WINDOW`
/// commands in flight; a command refused with `unavailable` or `rate_limited` is
/// sent again, as an outbox does. Returns each command's ack.
async fn writer(
    ws: String,
    token: String,
    w: usize,
    stop: Arc<AtomicBool>,
    progress: Arc<Vec<AtomicUsize>>,
) -> HashMap<String, Op> {
    let mut conn = Connection::connect(&ws, &token).await.expect("connect");
    let project = format!("p{w}");
    conn.hello("acme", &project, &format!("c{w}"), BTreeMap::new())
        .await
        .expect("hello");
    let mut acks: HashMap<String, Op> = HashMap::new();
    let mut waiting: HashSet<String> = HashSet::new();
    let mut sent = 0usize;
    loop {
        while waiting.len() < WINDOW && !stop.load(Ordering::Relaxed) {
            let id = format!("w{w}-{sent}");
            send(&mut conn, w, &id, sent).await;
            waiting.insert(id);
            sent += 1;
        }
        if waiting.is_empty() {
            break;
        }
        match conn.recv_timeout(Duration::from_secs(60)).await {
            Ok(ServerMessage::Ack { command_id, op, .. }) => {
                if waiting.remove(&command_id) {
                    assert!(acks.insert(command_id, op).is_none(), "acked twice");
                    progress[w].fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(ServerMessage::Reject {
                command_id,
                code: ErrorCode::Unavailable | ErrorCode::RateLimited,
                ..
            }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let i: usize = command_id
                    .rsplit('-')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .expect("own id");
                send(&mut conn, w, &command_id, i).await;
            }
            Ok(ServerMessage::Reject {
                command_id,
                code,
                reason,
                ..
            }) => panic!("{command_id} rejected: {code} {reason}"),
            Ok(_) => {}
            Err(e) => panic!("writer {w}: {} unanswered: {e}", waiting.len()),
        }
    }
    conn.close().await;
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_its_gateways_commands_directly_and_loses_none_when_partitions_move() {
    let server = NatsServer::start();
    let url = server.url().to_owned();
    let (mut serve, seq_metrics, _dir, secret) = start_serve(&url).await;
    let serve_pid = serve.process.pid();

    let token = ultrasync_testkit::token_for(&secret, "writer", "read write");
    let stop = Arc::new(AtomicBool::new(false));
    let progress: Arc<Vec<AtomicUsize>> =
        Arc::new((0..PROJECTS).map(|_| AtomicUsize::new(0)).collect());
    let writers: Vec<_> = (0..PROJECTS)
        .map(|w| {
            let (stop, progress) = (stop.clone(), progress.clone());
            tokio::spawn(writer(serve.ws_url(), token.clone(), w, stop, progress))
        })
        .collect();

    // Alone, serve's sequencer takes every command from its gateway: nothing
    // reaches USYNC_CMDS, and every answer goes back in the process.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let nc = async_nats::connect(&url).await.expect("nats");
    let js = async_nats::jetstream::new(nc);
    let stored = |js: async_nats::jetstream::Context| async move {
        let mut cmds = js.get_stream(nats::CMDS_STREAM).await.expect("cmds");
        cmds.info().await.expect("info").state.last_sequence
    };
    assert_eq!(
        stored(js.clone()).await,
        0,
        "commands went through USYNC_CMDS"
    );
    let taken = metric(
        &seq_metrics,
        "ultrasync_sequencer_commands_in_process_total",
    )
    .await;
    assert!(taken > 0.0, "no command was taken in process");
    let local_answers = metric(
        &seq_metrics,
        "ultrasync_sequencer_answer_messages_total{how=\"local\"}",
    )
    .await;
    assert!(local_answers > 0.0, "no answer was handed over in process");
    assert_eq!(
        metric(
            &seq_metrics,
            "ultrasync_sequencer_answer_messages_total{how=\"nats\"}"
        )
        .await,
        0.0
    );

    // A second sequencer takes partitions over while the writers go on.
    let mut other = ServiceProcess::spawn(&bin(), "sequencer", &url, &[]);
    wait_partitions(
        &url,
        other.pid(),
        "the second sequencer takes partitions",
        |n| n > 0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let through_stream = stored(js.clone()).await;
    assert!(
        through_stream > 0,
        "the partitions the second sequencer holds take commands through USYNC_CMDS"
    );
    // It dies; its partitions come back to serve after the lease TTL.
    other.kill9();
    wait_partitions(&url, serve_pid, "serve takes every partition back", |n| {
        n == nats::DEFAULT_PARTITIONS as usize
    })
    .await;
    // The keys that went through USYNC_CMDS come back to the direct path once the
    // stream holds none of their commands: every writer goes on, and USYNC_CMDS
    // stops growing.
    let acked_by = |p: &Vec<AtomicUsize>| -> Vec<usize> {
        p.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut before) = (stored(js.clone()).await, acked_by(&progress));
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (now, after) = (stored(js.clone()).await, acked_by(&progress));
        let all_went_on = before.iter().zip(&after).all(|(b, a)| a > b);
        if now == last && all_went_on {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "commands still go through USYNC_CMDS ({last} → {now}), or writers stall ({before:?} → {after:?})"
        );
        (last, before) = (now, after);
    }
    stop.store(true, Ordering::Relaxed);

    let mut acked: HashMap<String, Op> = HashMap::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    let handed_back = metric(
        &seq_metrics,
        "ultrasync_sequencer_commands_handed_back_total",
    )
    .await;
    eprintln!(
        "acked {}, through USYNC_CMDS {through_stream} messages, handed back {handed_back}",
        acked.len()
    );

    // The log holds exactly the acked ops, dense per stream key.
    let mut in_log = 0;
    for w in 0..PROJECTS {
        let key = StreamKey::parse("acme", &format!("p{w}"), "index").expect("key");
        let entries = read_subject(&js, &ops_subject(&key)).await;
        let seqs: Vec<u64> = entries.iter().map(|e| e.server_seq).collect();
        assert_eq!(
            seqs,
            (1..=entries.len() as u64).collect::<Vec<_>>(),
            "p{w}: server_seq is not 1..N"
        );
        for e in &entries {
            let op = e.op().expect("op");
            let ack = acked
                .get(&op.command_id)
                .unwrap_or_else(|| panic!("{} is in the log but was not acked", op.command_id));
            assert_eq!(ack, &op, "the stored op differs from its ack");
        }
        in_log += entries.len();
    }
    assert_eq!(in_log, acked.len(), "an acked op is missing from the log");

    let status = serve
        .process
        .terminate(Duration::from_secs(30))
        .expect("serve did not stop on SIGTERM");
    assert!(status.success(), "serve exited with {status}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_hands_commands_back_through_usync_cmds() {
    const REQUESTS: usize = 16;
    const PER_REQUEST: usize = 500;
    let server = NatsServer::start();
    let url = server.url().to_owned();
    let (mut serve, seq_metrics, _dir, secret) = start_serve(&url).await;
    let path = "/v1/acme/flood/index/commands";

    // One write first, so the key's worker has its state and is waiting for more.
    let post = |token: String, body: String| {
        let url = format!("http://{}{path}", serve.addr);
        async move {
            let auth = format!("Bearer {token}");
            let r = ultrasync_testkit::http_exchange(
                "POST",
                &url,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                &body,
            )
            .await
            .expect("post");
            assert_eq!(r.status, 200, "{}", r.body);
            let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
            v["results"]
                .as_array()
                .expect("results")
                .iter()
                .map(|m| serde_json::from_value::<ServerMessage>(m.clone()).expect("answer"))
                .collect::<Vec<_>>()
        }
    };
    let batch = |r: usize, ids: &[usize]| {
        let commands: Vec<serde_json::Value> = ids
            .iter()
            .map(|i| json!({"command_id": format!("f{i}"), "key": format!("k{}", i % 50), "op_type": "set", "payload": i}))
            .collect();
        json!({"client_id": format!("flood{r}"), "commands": commands}).to_string()
    };
    let token = |r: usize| {
        ultrasync_testkit::token_for(&secret, &format!("flooder{}", r % 4), "read write")
    };
    let first = post(token(0), batch(0, &[REQUESTS * PER_REQUEST])).await;
    assert!(matches!(first[0], ServerMessage::Ack { .. }), "{first:?}");

    // nats-server frozen: the worker's write cannot finish, and the commands the
    // gateway offers pile up in the key's queue until it is full.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    let requests: Vec<_> = (0..REQUESTS)
        .map(|r| {
            let ids: Vec<usize> = (r * PER_REQUEST..(r + 1) * PER_REQUEST).collect();
            tokio::spawn(post(token(r), batch(r, &ids)))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");

    // Every command is answered; the ones refused for a while are sent again.
    let mut acked: HashMap<String, Op> = HashMap::new();
    let mut again: Vec<usize> = Vec::new();
    for r in requests {
        for answer in r.await.expect("request") {
            match answer {
                ServerMessage::Ack { command_id, op, .. } => {
                    assert!(acked.insert(command_id, op).is_none(), "acked twice");
                }
                ServerMessage::Reject {
                    command_id,
                    code: ErrorCode::Unavailable | ErrorCode::RateLimited,
                    ..
                } => again.push(command_id[1..].parse().expect("own id")),
                other => panic!("{other:?}"),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !again.is_empty() {
        assert!(Instant::now() < deadline, "{} never acked", again.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut still = Vec::new();
        for ids in again.chunks(PER_REQUEST) {
            for answer in post(token(0), batch(0, ids)).await {
                match answer {
                    ServerMessage::Ack { command_id, op, .. } => {
                        if let Some(before) = acked.insert(command_id, op.clone()) {
                            assert_eq!(before, op, "a retry got another op");
                        }
                    }
                    ServerMessage::Reject { command_id, .. } => {
                        still.push(command_id[1..].parse().expect("own id"))
                    }
                    _ => {}
                }
            }
        }
        again = still;
    }
    assert_eq!(acked.len(), REQUESTS * PER_REQUEST);
    let handed_back = metric(
        &seq_metrics,
        "ultrasync_sequencer_commands_handed_back_total",
    )
    .await;
    assert!(handed_back > 0.0, "nothing was handed back");
    eprintln!("handed back {handed_back}");

    // The log: the first write and every flood command once, dense.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let key = StreamKey::parse("acme", "flood", "index").expect("key");
    let entries = read_subject(&js, &ops_subject(&key)).await;
    let seqs: Vec<u64> = entries.iter().map(|e| e.server_seq).collect();
    assert_eq!(seqs, (1..=entries.len() as u64).collect::<Vec<_>>());
    assert_eq!(entries.len(), REQUESTS * PER_REQUEST + 1);
    let mut ids = HashSet::new();
    for e in &entries[1..] {
        let op = e.op().expect("op");
        assert!(ids.insert(op.command_id.clone()), "{} twice", op.command_id);
        assert_eq!(
            acked.get(&op.command_id),
            Some(&op),
            "the stored op differs from its ack"
        );
    }

    let status = serve
        .process
        .terminate(Duration::from_secs(30))
        .expect("serve did not stop on SIGTERM");
    assert!(status.success(), "serve exited with {status}");
}
