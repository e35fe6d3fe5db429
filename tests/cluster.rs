//! ultrasync on a 3-node NATS cluster (R3 streams) on loopback, every service a
//! process: 2 gateways, 2 sequencers, 2 materializers. Writers send commands under
//! load while the node leading `USYNC_OPS` is killed (kill -9) and restarted, then
//! one gateway, the active sequencer and one materializer are killed. Writers
//! reconnect to the surviving gateway and resend what was not acked (same command
//! ids, SPEC §4). Afterwards: every acked op is in the log with the `server_seq` it
//! was acked with, exactly once; `server_seq` is dense per stream key; each
//! materializer, on its own, reports the digest of the log's state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use ultrasync_client::{ClientError, Connection, Op, OpType, ServerMessage};
use ultrasync_shared::nats::{OPS_STREAM, ops_subject};
use ultrasync_shared::state::{self, NamespaceState};
use ultrasync_shared::{ErrorCode, StreamKey, reads};
use ultrasync_testkit::{
    GatewayProcess, NatsCluster, ORG, ServiceProcess, check_log_against_acks, random_secret,
    read_subject, token_for,
};

const WRITERS: usize = 4;
const PER_WRITER: usize = 1500;
const WINDOW: usize = 50;
const NAMESPACES: [&str; 2] = ["index", "metadata"];
/// Acked-command counts at which the chaos acts, in order: kill the op log's leader
/// node, restart it, kill a gateway, kill the active sequencer, kill a materializer.
const CHAOS: [usize; 5] = [800, 1600, 2500, 3500, 4500];
/// How far past an action's point the writers may get before the action happens.
const SLACK: usize = 400;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn key(ns: &str) -> StreamKey {
    StreamKey::parse(ORG, "web", ns).expect("key")
}

fn command(w: usize, i: usize) -> (String, &'static str, String, serde_json::Value) {
    (
        format!("w{w}-{i}"),
        NAMESPACES[i % 2],
        format!("k{}", i % 7),
        json!({"w": w, "i": i}),
    )
}

/// Connects to the first gateway that answers, starting at `first`, and says hello.
async fn connect_any(
    gateways: &[String],
    first: usize,
    token: &str,
    client_id: &str,
) -> Connection {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = first;
    loop {
        let url = &gateways[i % gateways.len()];
        if let Ok(mut c) = Connection::connect(url, token).await
            && let Ok(ServerMessage::Welcome { .. }) =
                c.hello(ORG, "web", client_id, BTreeMap::new()).await
        {
            return c;
        }
        assert!(Instant::now() < deadline, "no gateway accepts {client_id}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One writer: `PER_WRITER` commands, `WINDOW` in flight, never more than its share
/// of `cap`; an outbox of what is unacked, resent after a reconnect or `unavailable`.
async fn write(
    w: usize,
    gateways: Arc<Vec<String>>,
    token: String,
    progress: Arc<AtomicUsize>,
    cap: Arc<AtomicUsize>,
) -> (HashMap<String, Op>, usize, usize) {
    let client_id = format!("w{w}");
    let mut conn = connect_any(&gateways, w, &token, &client_id).await;
    let mut acked: HashMap<String, Op> = HashMap::new();
    let mut outbox: HashSet<usize> = HashSet::new();
    let (mut next, mut resent, mut reconnects) = (0, 0, 0);
    let mut quiet_since = Instant::now();
    while acked.len() < PER_WRITER {
        let allowed = (cap.load(Ordering::Relaxed) / WRITERS).min(PER_WRITER);
        if next >= allowed && outbox.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let mut broken = false;
        while next < allowed && outbox.len() < WINDOW {
            let (id, ns, key, payload) = command(w, next);
            outbox.insert(next);
            next += 1;
            if conn
                .command(&id, ns, &key, OpType::Set, payload)
                .await
                .is_err()
            {
                broken = true;
                break;
            }
        }
        if !broken {
            match conn.recv_timeout(Duration::from_secs(2)).await {
                Ok(ServerMessage::Ack { command_id, op, .. }) => {
                    quiet_since = Instant::now();
                    let i: usize = command_id[format!("w{w}-").len()..]
                        .parse()
                        .expect("own id");
                    outbox.remove(&i);
                    match acked.insert(command_id.clone(), op.clone()) {
                        Some(prev) => assert_eq!(prev, op, "two different acks for {command_id}"),
                        None => {
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(ServerMessage::Reject {
                    command_id,
                    code: code @ (ErrorCode::Unavailable | ErrorCode::RateLimited),
                    ..
                }) => {
                    // Outcome unknown: resend the same command (same id).
                    quiet_since = Instant::now();
                    if code == ErrorCode::RateLimited {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let i: usize = command_id[format!("w{w}-").len()..]
                        .parse()
                        .expect("own id");
                    let (id, ns, key, payload) = command(w, i);
                    broken = conn
                        .command(&id, ns, &key, OpType::Set, payload)
                        .await
                        .is_err();
                    resent += 1;
                }
                Ok(ServerMessage::Reject {
                    command_id,
                    code,
                    reason,
                    ..
                }) => panic!("{command_id}: {code} {reason}"),
                Ok(_) => {}
                Err(ClientError::Timeout) => {
                    // A live gateway answers every command within its timeout; a
                    // long silence means the socket is dead without a close.
                    broken = quiet_since.elapsed() > Duration::from_secs(30);
                }
                Err(_) => broken = true,
            }
        }
        if broken {
            reconnects += 1;
            conn = connect_any(&gateways, w + reconnects, &token, &client_id).await;
            quiet_since = Instant::now();
            let mut pending: Vec<usize> = outbox.iter().copied().collect();
            pending.sort_unstable();
            for i in pending {
                let (id, ns, key, payload) = command(w, i);
                // A failure here shows up on the next receive.
                let _ = conn.command(&id, ns, &key, OpType::Set, payload).await;
                resent += 1;
            }
        }
    }
    (acked, resent, reconnects)
}

/// The state the log describes, applied with the shared state machine.
async fn model(js: &async_nats::jetstream::Context, ns: &str) -> NamespaceState {
    let mut st = NamespaceState::default();
    for e in read_subject(js, &ops_subject(&key(ns))).await {
        state::apply(&mut st, &e.op().expect("op")).expect("apply");
    }
    st
}

fn materializer(url: &str, dir: &std::path::Path, name: &str) -> ServiceProcess {
    let dir = dir.join(name).to_string_lossy().into_owned();
    ServiceProcess::spawn(
        &bin(),
        "materializer",
        url,
        &["--data-dir", &dir, "--name", name],
    )
}

/// Waits until `until` holds, polling; panics with `what` after `limit`.
async fn wait_for(limit: Duration, what: &str, mut until: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !until() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_loses_nothing_when_nodes_and_services_die() {
    ultrasync_testkit::init_tracing();
    let mut cluster = NatsCluster::start(3);
    cluster.wait_jetstream().await;
    let url = cluster.url();

    let setup = std::process::Command::new(bin())
        .args(["setup", "--replicas", "3", "--nats-url", &url])
        .env("ULTRASYNC_LOG", "warn")
        .output()
        .expect("run setup");
    let printed = String::from_utf8_lossy(&setup.stdout).into_owned();
    assert!(
        setup.status.success(),
        "setup: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    assert!(
        printed.contains("USYNC_OPS") && printed.contains("replicas 3"),
        "{printed}"
    );

    let secret = random_secret();
    let env = vec![("ULTRASYNC_JWT_SECRET".to_owned(), secret.clone())];
    let mut gateways = vec![
        GatewayProcess::start(&bin(), &url, &env).await,
        GatewayProcess::start(&bin(), &url, &env).await,
    ];
    let mut sequencers: Vec<ServiceProcess> = (0..2)
        .map(|_| ServiceProcess::spawn(&bin(), "sequencer", &url, &[]))
        .collect();
    let state_dir = tempfile::tempdir().expect("tmp");
    let mut materializers = [
        Some(materializer(&url, state_dir.path(), "m0")),
        Some(materializer(&url, state_dir.path(), "m1")),
    ];

    let nc = async_nats::ConnectOptions::new()
        .connect(ultrasync_shared::nats::server_addrs(&url).expect("urls"))
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(nc.clone());

    // Who is the active sequencer: when each instance last answered.
    let answered: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let mut answers = nc.subscribe("usync.reply.>").await.expect("subscribe");
    let watcher = {
        let answered = answered.clone();
        tokio::spawn(async move {
            while let Some(m) = answers.next().await {
                let pid = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(ultrasync_sequencer::HDR_SEQUENCER))
                    .and_then(|v| v.as_str().split('-').next()?.parse::<u32>().ok());
                if let Some(pid) = pid {
                    answered.lock().expect("lock").insert(pid, Instant::now());
                }
            }
        })
    };

    let ws: Arc<Vec<String>> = Arc::new(gateways.iter().map(GatewayProcess::ws_url).collect());
    let token = token_for(&secret, "writer", "read write");
    let progress = Arc::new(AtomicUsize::new(0));
    let cap = Arc::new(AtomicUsize::new(CHAOS[0] + SLACK));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(write(
                w,
                ws.clone(),
                token.clone(),
                progress.clone(),
                cap.clone(),
            ))
        })
        .collect();

    let reached = |at: usize| {
        let progress = progress.clone();
        move || progress.load(Ordering::Relaxed) >= at
    };
    let limit = Duration::from_secs(180);
    let raise = |k: usize| {
        let next = CHAOS
            .get(k + 1)
            .map_or(WRITERS * PER_WRITER, |at| at + SLACK);
        cap.store(next, Ordering::Relaxed);
    };

    // 1. kill -9 the node leading USYNC_OPS.
    wait_for(limit, "the first chaos point", reached(CHAOS[0])).await;
    let leader = js
        .get_stream(OPS_STREAM)
        .await
        .expect("ops stream")
        .cached_info()
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a leader");
    let victim: usize = leader
        .strip_prefix('n')
        .and_then(|n| n.parse().ok())
        .expect("node name");
    eprintln!(
        "cluster: kill -9 node {victim} (USYNC_OPS leader, pid {:?})",
        cluster.pid(victim)
    );
    cluster.kill9(victim);
    raise(0);

    // 2. ... and restart it with its store and ports while the load goes on.
    wait_for(limit, "progress with a node down", reached(CHAOS[1])).await;
    cluster.restart(victim);
    eprintln!("cluster: node {victim} restarted");
    raise(1);

    // 3. kill -9 a gateway: its writers move to the other one.
    wait_for(limit, "progress after the restart", reached(CHAOS[2])).await;
    gateways[0].process.kill9();
    eprintln!("cluster: gateway 0 killed");
    raise(2);

    // 4. kill -9 the active sequencer (the one that answered last).
    wait_for(limit, "progress after the gateway", reached(CHAOS[3])).await;
    let since = Instant::now();
    let mut active = None;
    wait_for(limit, "an answering sequencer", || {
        let answered = answered.lock().expect("lock");
        active = sequencers
            .iter()
            .position(|p| answered.get(&p.pid()).is_some_and(|t| *t > since));
        active.is_some()
    })
    .await;
    let active = active.expect("active");
    sequencers[active].kill9();
    eprintln!("cluster: active sequencer {active} killed");
    raise(3);

    // 5. kill -9 a materializer.
    wait_for(limit, "progress after the sequencer", reached(CHAOS[4])).await;
    if let Some(mut m) = materializers[0].take() {
        m.kill9();
    }
    eprintln!("cluster: materializer m0 killed");
    raise(4);

    let mut acked: HashMap<String, Op> = HashMap::new();
    let (mut resent, mut reconnects) = (0, 0);
    for w in writers {
        let (a, r, c) = w.await.expect("writer");
        acked.extend(a);
        resent += r;
        reconnects += c;
    }
    watcher.abort();
    eprintln!(
        "cluster: {} commands acked, {resent} resent, {reconnects} reconnects",
        acked.len()
    );
    assert_eq!(acked.len(), WRITERS * PER_WRITER);
    assert!(reconnects > 0, "the killed gateway's writers reconnected");

    // Every acked op is in the log, once, with its server_seq; dense per key.
    let subjects: Vec<String> = NAMESPACES.iter().map(|ns| ops_subject(&key(ns))).collect();
    let counts = check_log_against_acks(&js, &subjects, &acked).await;
    let total: usize = counts.iter().sum();
    let heads: BTreeMap<&str, u64> = NAMESPACES
        .iter()
        .copied()
        .zip(counts.iter().map(|c| *c as u64))
        .collect();
    assert_eq!(total, WRITERS * PER_WRITER, "every acked op exactly once");

    // Each materializer on its own (m0 restarted from its store after the kill)
    // reaches the head with the log's digest, as does the live sequencer.
    if let Some(mut m) = materializers[1].take() {
        m.kill9();
    }
    for name in ["m0", "m1"] {
        let mut m = materializer(&url, state_dir.path(), name);
        for ns in NAMESPACES {
            let expected = model(&js, ns).await;
            let head = heads[ns];
            assert_eq!(expected.last_seq, head);
            let deadline = Instant::now() + Duration::from_secs(60);
            let live = loop {
                match reads::digest(&nc, &key(ns), Some(head)).await {
                    Ok(d) if d.last_server_seq >= head => break d,
                    _ => {
                        assert!(
                            Instant::now() < deadline,
                            "{name} never reached {ns} {head}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            assert_eq!(
                live.digest,
                state::digest(&expected),
                "{name}/{ns}: materialized state differs from the log"
            );
        }
        m.kill9();
    }
    for ns in NAMESPACES {
        let seq = reads::sequencer_digest(&nc, &key(ns))
            .await
            .expect("sequencer digest");
        assert_eq!(seq.last_server_seq, heads[ns]);
        assert_eq!(seq.digest, state::digest(&model(&js, ns).await));
    }
    drop(gateways);
    drop(sequencers);
}

/// `ultrasync dev --cluster 3`: three managed nats-servers on loopback, streams on 3
/// replicas, the services on top; a write is acked; SIGTERM stops all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_runs_three_nodes_with_r3_streams() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(bin())
        .args([
            "dev",
            "--cluster",
            "3",
            "--nats-port",
            "0",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(dir.path())
        .env_remove("ULTRASYNC_JWT_SECRET")
        .env("ULTRASYNC_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ultrasync dev --cluster 3");
    // Killed on any panic below; SIGTERM is the normal way out.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let mut guard = Guard(child);
    let mut lines = BufReader::new(stdout).lines();
    let (mut ws, mut nats, mut token) = (None, None, None);
    while token.is_none() {
        let Some(Ok(line)) = lines.next() else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["WebSocket", url, ..] => ws = Some((*url).to_owned()),
            ["NATS", url, ..] => nats = Some((*url).to_owned()),
            ["dev", "token", t, ..] => token = Some((*t).to_owned()),
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (ws, nats, token) = (
        ws.expect("WebSocket URL printed"),
        nats.expect("NATS URLs printed"),
        token.expect("dev token printed"),
    );
    let urls = ultrasync_shared::nats::server_addrs(&nats).expect("NATS URLs");
    assert_eq!(urls.len(), 3, "three nodes: {nats}");

    let mut conn = Connection::connect(&ws, &token).await.expect("connect");
    conn.hello("dev", "demo", "term-1", BTreeMap::new())
        .await
        .expect("hello");
    conn.command("c1", "index", "greeting", OpType::Set, json!("hello"))
        .await
        .expect("send");
    match conn
        .recv_timeout(Duration::from_secs(30))
        .await
        .expect("answer")
    {
        ServerMessage::Ack { server_seq, .. } => assert_eq!(server_seq, 1),
        other => panic!("expected an ack, got {other:?}"),
    }

    let nc = async_nats::ConnectOptions::new()
        .connect(urls.clone())
        .await
        .expect("nats");
    let js = async_nats::jetstream::new(nc.clone());
    for name in [OPS_STREAM, ultrasync_shared::nats::CMDS_STREAM] {
        let info = js
            .get_stream(name)
            .await
            .expect("stream")
            .cached_info()
            .clone();
        assert_eq!(info.config.num_replicas, 3, "{name}");
        assert_eq!(
            info.cluster.expect("cluster info").replicas.len(),
            2,
            "{name}: a leader and two followers"
        );
    }
    drop(nc);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(guard.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = guard.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "dev exited with {status}");
    for u in &urls {
        let port = u.port();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "nats-server on {port} still running"
        );
    }
}

/// A cluster that has elected its meta leader before every node reported in: a
/// stream of 3 replicas finds no place yet. The set-up every service, `ultrasync
/// setup` and `ultrasync dev --cluster` run waits for the third node instead of
/// failing ("no suitable peers for placement").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_waits_for_a_forming_cluster_to_place_its_replicas() {
    use async_nats::jetstream::{self, stream};
    use ultrasync_shared::nats::{CMDS_STREAM, LayoutOptions, ensure_layout};

    let mut cluster = NatsCluster::start_without(3, 2);
    cluster.wait_jetstream().await;
    let client = async_nats::connect(cluster.node_url(0))
        .await
        .expect("connect");
    let js = jetstream::new(client);

    // The condition itself: two of three nodes cannot hold three replicas.
    let probe = js
        .create_stream(stream::Config {
            name: "PROBE".to_owned(),
            subjects: vec!["probe.>".to_owned()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect_err("three replicas on two nodes");
    assert!(
        matches!(probe.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::CLUSTER_NO_PEERS),
        "{probe}"
    );

    let setup = tokio::spawn({
        let js = js.clone();
        async move {
            ensure_layout(
                &js,
                LayoutOptions {
                    replicas: 3,
                    ..Default::default()
                },
            )
            .await
        }
    });
    // Let set-up meet the forming cluster before the third node starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!setup.is_finished(), "set-up gave up on a forming cluster");
    cluster.restart(2);
    setup
        .await
        .expect("join")
        .expect("layout once the third node is in");
    let cmds = js.get_stream(CMDS_STREAM).await.expect("USYNC_CMDS");
    assert_eq!(cmds.cached_info().config.num_replicas, 3);
}
