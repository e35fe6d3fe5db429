//! Two regions on loopback: a hub nats-server (JetStream domain `hub`) and a leaf
//! (domain `leaf`) joined by a leafnode connection. The hub runs the whole pipeline;
//! the leaf runs a gateway, a materializer and a compactor with
//! `region.home_domain = "hub"`, so its `USYNC_OPS` is a mirror of the hub's.
//!
//! Ops written in the hub reach the leaf's materialized state and a client on the
//! leaf's gateway; a write sent to the leaf's gateway is sequenced by the hub; each
//! region's compactor trims its own copy of the log; a leaf the hub lets go resyncs
//! from the hub's snapshot. Both regions run the shipped users (each service as its
//! own user), the leafnode link is TLS (a test CA) and the leaf logs in to the hub as
//! the dedicated `leaf` user of `deploy/nats/region/hub-users.conf`: all of the above
//! passes without a permission violation, and through the link a replica region
//! cannot purge the home log, delete a home consumer or write ops. The leaf's
//! materializer may read the hub's snapshots, and each region's snapshots stay in its
//! own store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_compactor::LagBound;
use ultrasync_shared::config::Config;
use ultrasync_shared::nats::SNAPSHOTS_BUCKET;
use ultrasync_shared::natsd::{Natsd, NatsdOptions, TlsFiles, find_nats_server};
use ultrasync_shared::{StreamKey, auth, reads, snapshot};
use ultrasync_testkit::pki::TestCa;
use ultrasync_testkit::{NatsUsers, shipped_users_conf};

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn region_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/nats/region")
}

/// Two regions' NATS as `deploy/nats/region/` ships them: the shipped users in both
/// (`hub-users.conf`, with the `leaf` user, in the hub), the leafnode link over TLS
/// (a test CA; each server presents a certificate for 127.0.0.1 and verifies the
/// other's), the leaf logging in as `leaf`.
struct Link {
    users: NatsUsers,
    leaf_password: String,
    leaf_port: u16,
    tls: TlsFiles,
}

impl Link {
    fn new(dir: &Path) -> Self {
        let ca = TestCa::new();
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("mkdir");
        let server = ca.localhost().write(&pki, "server");
        Self {
            users: NatsUsers::random(),
            leaf_password: hex::encode(rand::random::<[u8; 16]>()),
            leaf_port: free_port(),
            tls: TlsFiles {
                cert: server.cert,
                key: server.key,
                ca: ca.write_ca(&pki),
            },
        }
    }

    /// The hub: leafnode port with TLS (client certificate required) and no
    /// `authorization` block, users from `region/hub-users.conf` (which includes
    /// `users.conf`), as `region/hub.conf`.
    fn hub(&self, dir: &Path) -> Natsd {
        let run = dir.join("hub-run");
        std::fs::create_dir_all(run.join("region")).expect("mkdir");
        std::fs::copy(shipped_users_conf(), run.join("users.conf")).expect("copy users.conf");
        std::fs::copy(
            region_dir().join("hub-users.conf"),
            run.join("region/hub-users.conf"),
        )
        .expect("copy hub-users.conf");
        let mut env = self.users.server_env();
        env.push(("USYNC_LEAF_PASSWORD".to_owned(), self.leaf_password.clone()));
        natsd(
            dir,
            "hub",
            &format!(
                "leafnodes {{\n  listen: 127.0.0.1:{}\n{}}}\ninclude ./region/hub-users.conf\n",
                self.leaf_port,
                self.tls.block("  "),
            ),
            None,
            env,
        )
    }

    /// The leaf: the shipped users, a TLS leafnode remote to the hub as `leaf`.
    fn leaf(&self, dir: &Path) -> Natsd {
        self.leaf_as(dir, "leaf", &self.leaf_password)
    }

    /// A leaf logging in to the hub as `user`.
    fn leaf_as(&self, dir: &Path, user: &str, password: &str) -> Natsd {
        natsd(
            dir,
            "leaf",
            &leaf_remote(
                &format!("tls://{user}:{password}@127.0.0.1:{}", self.leaf_port),
                &self.tls,
            ),
            Some(&self.users),
            self.users.server_env(),
        )
    }

    /// `config` logged in as `user`.
    fn as_user(&self, config: &Config, user: &str) -> Config {
        let mut c = config.clone();
        c.nats_user = Some(user.to_owned());
        c.nats_password = Some(self.users.password(user).to_owned());
        c
    }

    async fn admin(&self, url: &str) -> async_nats::Client {
        self.users.connect(url, "admin").await
    }
}

/// A nats-server with JetStream domain `domain` (`sync_interval: always`); with
/// `users`, the shipped `deploy/nats/users.conf` included after `extra`.
fn natsd(
    dir: &Path,
    domain: &str,
    extra: &str,
    users: Option<&NatsUsers>,
    env: Vec<(String, String)>,
) -> Natsd {
    let store = dir.join(format!("{domain}-store"));
    Natsd::spawn(&NatsdOptions {
        bin: find_nats_server(None).expect("nats-server"),
        store_dir: store.clone(),
        run_dir: dir.join(format!("{domain}-run")),
        port: None,
        // A second `jetstream` block replaces the first: same store, plus the domain.
        extra_conf: format!(
            "jetstream {{\n  store_dir: {:?}\n  sync_interval: always\n  domain: {domain}\n}}\n{extra}\n",
            store.canonicalize().unwrap_or(store.clone()),
        ),
        users_conf: users.map(|_| shipped_users_conf()),
        env,
        ..Default::default()
    })
    .expect("start nats-server")
}

/// The leaf's leafnode remote to the hub at `url`, as `deploy/nats/region/leaf.conf`
/// has it: TLS with the leaf's certificate, and object-store subjects do not cross
/// the link (nats-server keeps `$KV.>` in its domain, not `$O.>`), so each region's
/// snapshot store holds only what its own materializers write.
fn leaf_remote(url: &str, tls: &TlsFiles) -> String {
    format!(
        "leafnodes {{\n  remotes: [\n    {{\n      url: \"{url}\"\n{}      deny_imports: [\"$O.>\"]\n      deny_exports: [\"$O.>\"]\n    }}\n  ]\n}}\n",
        tls.block("      ").replace("  verify: true\n", "")
    )
}

/// The hub's or the leaf's log lines about permission violations.
fn violations(server: &Natsd) -> Vec<String> {
    std::fs::read_to_string(&server.log_file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

struct Region {
    config: Config,
    ws: String,
    http: String,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Region {
    /// The region's services, each logged in as its own user.
    async fn start(link: &Link, config: Config, sequencer: bool) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        if sequencer {
            tasks.push(tokio::spawn(ultrasync_sequencer::run(
                link.as_user(&config, "sequencer"),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(ultrasync_materializer::run(
            link.as_user(&config, "materializer"),
            stop.clone(),
        )));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tasks.push(tokio::spawn(ultrasync_gateway::run(
            link.as_user(&config, "gateway"),
            listener,
            stop.clone(),
        )));
        let region = Self {
            config,
            ws: format!("ws://{addr}/v1/sync"),
            http: format!("http://{addr}"),
            stop,
            tasks,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(r) = ultrasync_client::http::request(
                "GET",
                &region.http,
                "/readyz",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
                && r.status == 200
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gateway at {} not ready",
                region.http
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        region
    }

    async fn client(&self, client_id: &str, cursor: Option<Option<u64>>) -> Connection {
        let secret = self.config.auth.jwt_secret.clone().expect("secret");
        let claims = auth::claims(
            client_id,
            "acme",
            &["web"],
            "read write",
            3600,
            auth::DEFAULT_AUDIENCE,
        );
        let token = auth::mint_hs256(secret.as_bytes(), &claims).expect("token");
        let mut c = Connection::connect(&self.ws, &token)
            .await
            .expect("connect");
        let mut cursors = BTreeMap::new();
        if let Some(c) = cursor {
            cursors.insert("index".to_owned(), c);
        }
        c.hello("acme", "web", client_id, cursors)
            .await
            .expect("hello");
        c
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

fn config(nats_url: &str, secret: &str, dir: &Path, name: &str) -> Config {
    let mut c = Config {
        nats_url: nats_url.to_owned(),
        ..Default::default()
    };
    c.auth.jwt_secret = Some(secret.to_owned());
    c.materializer.data_dir = dir.join(format!("{name}-materializer"));
    c.materializer.snapshot_every_ops = 10;
    c.compactor.retention_ops = 0;
    c.region.name = Some(name.to_owned());
    c
}

/// Writes `n` ops as `conn` and returns their server_seqs.
async fn write(conn: &mut Connection, prefix: &str, n: usize) -> Vec<u64> {
    write_seeing(conn, prefix, n).await.0
}

/// [`write`], also returning the seqs of the ops frames that came meanwhile (a
/// socket following `index` gets its own ops too, before or after their acks).
/// One command at a time: each op is then a log message of its own, so stream
/// sequences and compaction below fall on single ops.
async fn write_seeing(conn: &mut Connection, prefix: &str, n: usize) -> (Vec<u64>, Vec<u64>) {
    let mut seqs = Vec::new();
    let mut seen = Vec::new();
    for i in 0..n {
        conn.command(
            &format!("{prefix}-{i}"),
            "index",
            &format!("k{}", i % 7),
            OpType::Set,
            json!({"from": prefix, "i": i}),
        )
        .await
        .expect("send");
        while seqs.len() <= i {
            match conn.recv_timeout(WAIT).await.expect("answer") {
                ServerMessage::Ack { server_seq, .. } => seqs.push(server_seq),
                ServerMessage::Ops { ops, .. } => seen.extend(ops.iter().map(|o| o.server_seq)),
                ServerMessage::Reject {
                    command_id, reason, ..
                } => panic!("{command_id} refused: {reason}"),
                _ => {}
            }
        }
    }
    seqs.sort_unstable();
    (seqs, seen)
}

/// Reads ops frames until `last` has been seen; returns the seqs seen.
async fn read_until(conn: &mut Connection, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while seen.last().copied().unwrap_or(0) < last {
        assert!(
            Instant::now() < deadline,
            "ops up to {last} did not arrive: {seen:?}"
        );
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Ops { ops, .. } => seen.extend(ops.iter().map(|o| o.server_seq)),
            ServerMessage::Ack { .. } => {}
            _ => {}
        }
    }
    seen
}

/// Reads frames of namespace `index` until `synced`: its `server_seq` and the values
/// the client holds then (the snapshot's, with the `set` ops after it applied).
async fn bootstrap(conn: &mut Connection) -> (u64, BTreeMap<String, serde_json::Value>) {
    let mut values = BTreeMap::new();
    // Inside a snapshot sent in several frames.
    let mut more = false;
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no synced frame");
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Snapshot { state, more: m, .. } => {
                if !more {
                    values.clear();
                }
                values.extend(state.into_iter().map(|(k, s)| (k, s.value)));
                more = m;
            }
            ServerMessage::Ops { ops, .. } => {
                for op in ops {
                    assert_eq!(op.op_type, OpType::Set, "{op:?}");
                    values.insert(op.key, op.payload);
                }
            }
            ServerMessage::Synced { server_seq, .. } => return (server_seq, values),
            ServerMessage::Error { code, message } => {
                panic!("bootstrap refused: {code}: {message}")
            }
            _ => {}
        }
    }
}

/// Lowest stream sequence still held for `subject` in a region's `USYNC_OPS`.
async fn first_op(js: &jetstream::Context, subject: &str) -> u64 {
    let stream = js.get_stream("USYNC_OPS").await.expect("USYNC_OPS");
    let entry = ultrasync_shared::log::next_at_or_after(&stream, subject, 1)
        .await
        .expect("read log")
        .expect("an op");
    entry.server_seq
}

/// Runs compaction passes until the log of `subject` no longer starts at op 1
/// (cursors are flushed each second, snapshots follow the writes); returns the first
/// op left.
async fn compact_until_trimmed(js: &jetstream::Context, cfg: &Config, subject: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ultrasync_compactor::compact_once(js, &cfg.compactor, false, None)
            .await
            .expect("compaction pass");
        let first = first_op(js, subject).await;
        if first > 1 {
            return first;
        }
        assert!(Instant::now() < deadline, "the log was not trimmed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ops_flow_from_the_hub_to_a_leaf_region_and_writes_go_home() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = Link::new(dir.path());
    let hub = link.hub(dir.path());
    let mut leaf = link.leaf(dir.path());
    let secret = hex::encode(rand::random::<[u8; 32]>());

    // The hub first: its layout (USYNC_OPS) must exist for the leaf to mirror.
    let hub_nc = link.admin(&hub.url).await;
    let hub_js = jetstream::new(hub_nc.clone());
    let hub_cfg = config(&hub.url, &secret, dir.path(), "hub");
    ultrasync_shared::nats::ensure_layout(&hub_js, hub_cfg.layout())
        .await
        .expect("hub layout");
    let hub_region = Region::start(&link, hub_cfg.clone(), true).await;

    // Wait for the leafnode link: a request from the leaf reaches the hub's
    // JetStream API under its domain.
    let leaf_nc = link.admin(&leaf.url).await;
    let hub_from_leaf = jetstream::with_domain(leaf_nc.clone(), "hub");
    let deadline = Instant::now() + WAIT;
    while hub_from_leaf.get_stream("USYNC_OPS").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the leafnode link did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut leaf_cfg = config(&leaf.url, &secret, dir.path(), "leaf");
    leaf_cfg.region.home_domain = Some("hub".to_owned());
    leaf_cfg.validate().expect("valid leaf config");
    ultrasync_shared::nats::ensure_layout(&jetstream::new(leaf_nc.clone()), leaf_cfg.layout())
        .await
        .expect("leaf layout");
    let leaf_region = Region::start(&link, leaf_cfg.clone(), false).await;

    let status = ultrasync_client::http::request(
        "GET",
        &leaf_region.http,
        "/v1/status",
        &[],
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("status");
    let status: serde_json::Value = serde_json::from_str(&status.body).expect("json");
    assert_eq!(status["region"], json!("leaf"));
    assert_eq!(status["home_domain"], json!("hub"));

    // A replica region runs no sequencer.
    let refused = ultrasync_sequencer::run(
        link.as_user(&leaf_cfg, "sequencer"),
        CancellationToken::new(),
    )
    .await;
    assert!(refused.is_err(), "a sequencer started in the leaf region");

    let leaf_js = jetstream::new(leaf_nc.clone());
    let info = leaf_js
        .get_stream("USYNC_OPS")
        .await
        .expect("leaf USYNC_OPS")
        .get_info()
        .await
        .expect("info");
    assert!(
        info.config.mirror.is_some(),
        "the leaf's USYNC_OPS is not a mirror"
    );

    // 1. Written in the hub, seen in the leaf: live on a leaf socket and in the
    //    leaf's materialized state.
    let mut leaf_reader = leaf_region.client("leaf-reader", Some(Some(0))).await;
    let mut hub_writer = hub_region.client("hub-writer", Some(Some(0))).await;
    let hub_seqs = write(&mut hub_writer, "hub", 30).await;
    assert_eq!(hub_seqs, (1..=30).collect::<Vec<u64>>());
    let seen = read_until(&mut leaf_reader, 30).await;
    assert_eq!(seen, (1..=30).collect::<Vec<u64>>(), "leaf socket");

    // 2. Written to the leaf's gateway, sequenced by the hub: the ack names the next
    //    server_seq, the op is in the hub's log, and the hub's client gets it too.
    let (leaf_seqs, mut seen) = write_seeing(&mut leaf_reader, "leaf", 5).await;
    assert_eq!(leaf_seqs, (31..=35).collect::<Vec<u64>>());
    let hub_seen = read_until(&mut hub_writer, 35).await;
    assert!(hub_seen.ends_with(&[31, 32, 33, 34, 35]), "{hub_seen:?}");
    let key = StreamKey::parse("acme", "web", "index").expect("key");
    let subject = ultrasync_shared::nats::ops_subject(&key);
    let hub_ops = hub_js.get_stream("USYNC_OPS").await.expect("hub ops");
    let last = ultrasync_shared::log::head(&hub_ops, &subject)
        .await
        .expect("hub head")
        .expect("hub ops");
    assert_eq!(last.server_seq, 35);
    if seen.last() < Some(&35) {
        seen.extend(read_until(&mut leaf_reader, 35).await);
    }
    assert!(seen.ends_with(&[35]), "{seen:?}");

    // The leaf's materializer serves the same state as the hub's (reads go to the
    // materializers of the region the request is made in).
    let deadline = Instant::now() + WAIT;
    let (hub_digest, leaf_digest) = loop {
        let h = reads::digest(&hub_nc, &key, Some(35)).await;
        let l = reads::digest(&leaf_nc, &key, Some(35)).await;
        if let (Ok(h), Ok(l)) = (h, l) {
            break (h, l);
        }
        assert!(Instant::now() < deadline, "no digests at 35");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(hub_digest.last_server_seq, 35);
    assert_eq!(leaf_digest.last_server_seq, 35);
    assert_eq!(hub_digest.digest, leaf_digest.digest, "regions disagree");
    let bearer = format!(
        "Bearer {}",
        auth::mint_hs256(
            secret.as_bytes(),
            &auth::claims("r", "acme", &["web"], "read", 600, auth::DEFAULT_AUDIENCE),
        )
        .expect("token")
    );
    let r = ultrasync_client::http::request(
        "GET",
        &leaf_region.http,
        "/v1/acme/web/index/keys/k3",
        &[("authorization", bearer.as_str())],
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("leaf http read");
    assert_eq!(r.status, 200, "{}", r.body);

    // 3. Each region's compactor trims its own copy: cursors at the head in both
    //    regions, snapshots written by both regions' materializers.
    for c in [&mut hub_writer, &mut leaf_reader] {
        c.send_raw(&json!({"type": "cursor", "namespace": "index", "server_seq": 35}).to_string())
            .await
            .expect("cursor");
    }
    let hub_first = compact_until_trimmed(&hub_js, &hub_cfg, &subject).await;
    // Purges do not propagate: the leaf's mirror still holds every op until the
    // leaf's own compactor runs.
    assert_eq!(
        first_op(&leaf_js, &subject).await,
        1,
        "the hub's purge reached the leaf"
    );
    let leaf_first = compact_until_trimmed(&leaf_js, &leaf_cfg, &subject).await;
    assert_eq!(
        first_op(&hub_js, &subject).await,
        hub_first,
        "the leaf's purge reached the hub"
    );
    eprintln!("regions: hub log now from op {hub_first}, leaf log from op {leaf_first}");

    // 4. A partitioned replica region holds the home log where its mirror is: the
    //    leaf goes away, the hub writes on, and its compactor (told the leaf mirrors
    //    it) purges nothing the mirror has not copied; back, the mirror catches up
    //    and the log can go.
    leaf_reader.close().await;
    leaf_region.stop().await;
    leaf.kill();
    let mut mirrored = hub_cfg.compactor.clone();
    mirrored.mirror_domains = vec!["leaf".to_owned()];
    let hub_seqs = write(&mut hub_writer, "hub2", 20).await;
    assert_eq!(hub_seqs.last(), Some(&55));
    hub_writer
        .send_raw(&json!({"type": "cursor", "namespace": "index", "server_seq": 55}).to_string())
        .await
        .expect("cursor");
    let deadline = Instant::now() + WAIT;
    loop {
        let report = ultrasync_compactor::compact_once(&hub_js, &mirrored, false, None)
            .await
            .expect("compaction pass");
        let plan = report
            .stream_keys
            .iter()
            .find(|p| p.stream_key == "acme/web/index")
            .expect("plan");
        assert_eq!(
            plan.purged, 0,
            "purged what the partitioned mirror lacks: {plan:?}"
        );
        if plan.snapshot_seq >= Some(45) {
            assert_eq!(plan.held_by, "mirror:leaf", "{plan:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no snapshot at 45: {plan:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(first_op(&hub_js, &subject).await, hub_first);
    let mut leaf = link.leaf(dir.path());
    let leaf_js = jetstream::new(link.admin(&leaf.url).await);
    let deadline = Instant::now() + WAIT;
    loop {
        let ops = ultrasync_shared::log::head(
            &leaf_js.get_stream("USYNC_OPS").await.expect("leaf ops"),
            &subject,
        )
        .await;
        if matches!(ops, Ok(Some(h)) if h.server_seq == 55) {
            break;
        }
        assert!(Instant::now() < deadline, "the mirror did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + WAIT;
    while first_op(&hub_js, &subject).await == hub_first {
        ultrasync_compactor::compact_once(&hub_js, &mirrored, false, None)
            .await
            .expect("compaction pass");
        assert!(
            Instant::now() < deadline,
            "the hub's log was not trimmed after the mirror caught up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 5. A replica region let go: past `mirror_max_lag_ops` the partitioned leaf's
    //    mirror no longer holds the hub's log, and the hub purges ops it has not
    //    copied. Back, the mirror skips them (nats-server resumes at the hub's first
    //    op and leaves the stream sequences between as deleted), and the leaf's
    //    materializer, whose own log and snapshots do not reach past that hole,
    //    loads the hub's snapshot across the leafnode and goes on from its mirror.
    let mirror_has = 55;
    leaf.kill();
    let mut letting_go = mirrored.clone();
    letting_go.mirror_max_lag_ops = Some(5);
    let hub_seqs = write(&mut hub_writer, "hub3", 20).await;
    assert_eq!(hub_seqs.last(), Some(&75));
    hub_writer
        .send_raw(&json!({"type": "cursor", "namespace": "index", "server_seq": 75}).to_string())
        .await
        .expect("cursor");
    let deadline = Instant::now() + WAIT;
    let hub_first = loop {
        let report = ultrasync_compactor::compact_once(&hub_js, &letting_go, false, None)
            .await
            .expect("compaction pass");
        let plan = report
            .stream_keys
            .iter()
            .find(|p| p.stream_key == "acme/web/index")
            .expect("plan");
        let mirror = plan
            .readers
            .iter()
            .find(|r| r.kind == "mirror" && r.name == "leaf")
            .expect("the leaf's mirror reads the log");
        assert!(mirror.let_go, "the mirror still holds the log: {plan:?}");
        assert_eq!(mirror.let_go_by, Some(LagBound::Ops), "{plan:?}");
        assert_ne!(plan.held_by, "mirror:leaf", "{plan:?}");
        let first = first_op(&hub_js, &subject).await;
        if first > mirror_has + 1 {
            break first;
        }
        assert!(
            Instant::now() < deadline,
            "the hub did not purge past the mirror: {plan:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let leaf = link.leaf(dir.path());
    let leaf_nc = link.admin(&leaf.url).await;
    let leaf_js = jetstream::new(leaf_nc.clone());
    let deadline = Instant::now() + WAIT;
    let leaf_ops = loop {
        let ops = leaf_js.get_stream("USYNC_OPS").await.expect("leaf ops");
        if matches!(ultrasync_shared::log::head(&ops, &subject).await, Ok(Some(h)) if h.server_seq == 75)
        {
            break ops;
        }
        assert!(Instant::now() < deadline, "the mirror did not resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after = ultrasync_shared::log::next_at_or_after(&leaf_ops, &subject, mirror_has + 1)
        .await
        .expect("read the mirror")
        .expect("an op past the hole");
    assert_eq!(
        (after.stream_seq, after.server_seq),
        (hub_first, hub_first),
        "the mirror does not go on at the hub's first op"
    );
    let state = leaf_js
        .get_stream("USYNC_OPS")
        .await
        .expect("leaf ops")
        .get_info()
        .await
        .expect("info")
        .state;
    assert_eq!(state.last_sequence, 75);
    assert_eq!(state.deleted_count, Some(hub_first - mirror_has - 1));

    let mut leaf_cfg = leaf_cfg.clone();
    leaf_cfg.nats_url = leaf.url.clone();
    let leaf_region = Region::start(&link, leaf_cfg, false).await;
    // The leaf's materializer went past the hole: its own snapshot store, which
    // only it writes, moves past it. (Until it has started, reads made in the leaf
    // are answered by the hub's materializers; from now on by the leaf's.)
    let leaf_snapshots = leaf_js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .expect("leaf snapshots");
    let deadline = Instant::now() + WAIT;
    loop {
        let s = snapshot::fetch(&leaf_snapshots, &key).await;
        if matches!(&s, Ok(Some(s)) if s.state.last_seq + 1 >= hub_first) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leaf's snapshot stays behind the hole: {:?}",
            s.map(|s| s.map(|s| s.state.last_seq))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + WAIT;
    let (hub_digest, leaf_digest) = loop {
        let h = reads::digest(&hub_nc, &key, Some(75)).await;
        let l = reads::digest(&leaf_nc, &key, Some(75)).await;
        if let (Ok(h), Ok(l)) = (h, l) {
            break (h, l);
        }
        assert!(Instant::now() < deadline, "no digests at 75");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(leaf_digest.last_server_seq, 75);
    assert_eq!(hub_digest.digest, leaf_digest.digest, "regions disagree");
    // A new client of the leaf's gateway bootstraps with the whole state.
    let hub_state = reads::snapshot(
        &hub_nc,
        &key,
        &reads::ReadRequest {
            min_seq: Some(75),
            ..Default::default()
        },
    )
    .await
    .expect("hub state");
    let expected: BTreeMap<String, serde_json::Value> = hub_state
        .state
        .keys
        .iter()
        .map(|(k, e)| (k.clone(), e.value.clone()))
        .collect();
    let mut late = leaf_region.client("leaf-late", Some(None)).await;
    let (synced, values) = bootstrap(&mut late).await;
    assert_eq!(synced, 75);
    assert_eq!(values, expected, "the leaf bootstrapped another state");
    late.close().await;
    leaf_region.stop().await;

    // Everything above went through the `leaf` user's permissions without a refusal.
    for (region, server) in [("hub", &hub), ("leaf", &leaf)] {
        let v = violations(server);
        assert!(v.is_empty(), "{region}: {v:#?}");
    }

    // And the link carries nothing else: even an admin of the replica region cannot
    // purge the home log, delete a home consumer or write ops through it (the
    // `leaf` user may not publish those subjects into the hub).
    let from_leaf = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .api_prefix("$JS.hub.API")
        .build(leaf_nc.clone());
    let home_ops = from_leaf
        .get_stream("USYNC_OPS")
        .await
        .expect("the mirror's view of the home log");
    assert!(
        home_ops.purge().filter(subject.clone()).await.is_err(),
        "the leaf purged the home log"
    );
    assert!(
        from_leaf
            .delete_consumer_from_stream(
                ultrasync_shared::nats::partition_consumer(0),
                "USYNC_CMDS"
            )
            .await
            .is_err(),
        "the leaf deleted a home sequencer consumer"
    );
    leaf_nc
        .publish(subject.clone(), "forged".into())
        .await
        .expect("publish");
    leaf_nc.flush().await.expect("flush");
    let hub_ops = hub_js.get_stream("USYNC_OPS").await.expect("hub ops");
    let head = ultrasync_shared::log::head(&hub_ops, &subject)
        .await
        .expect("hub head")
        .expect("hub ops");
    assert_eq!(head.server_seq, 75, "a forged op crossed the link");
    assert_eq!(
        first_op(&hub_js, &subject).await,
        hub_first,
        "the leaf purged the home log"
    );
    assert!(
        hub_js
            .get_stream("USYNC_CMDS")
            .await
            .expect("cmds")
            .consumer_info(ultrasync_shared::nats::partition_consumer(0))
            .await
            .is_ok(),
        "the leaf deleted a home sequencer consumer"
    );
    // (nats-server drops what a leafnode may not send without logging it.)

    hub_writer.close().await;
    hub_region.stop().await;
}

/// The shipped users in both regions. A replica region's materializer, logged in as
/// `materializer`, reads the home region's snapshot across the leafnode (what a
/// mirror the home region let go resyncs from) without a permission violation, and
/// a snapshot it writes in its own region stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_regions_materializer_reads_the_home_snapshots_and_writes_only_its_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = Link::new(dir.path());
    let users = &link.users;
    let hub = link.hub(dir.path());
    let leaf = link.leaf(dir.path());
    let layout = Config::default();
    let mut leaf_layout = Config::default();
    leaf_layout.region.home_domain = Some("hub".to_owned());
    let hub_js = jetstream::new(users.connect(&hub.url, "admin").await);
    ultrasync_shared::nats::ensure_layout(&hub_js, layout.layout())
        .await
        .expect("hub layout");
    let key = StreamKey::parse("acme", "web", "index").expect("key");
    let stored = |seq: u64| {
        let mut s = snapshot::Snapshot {
            stream_key: key.to_string(),
            head_stream_seq: seq,
            state: Default::default(),
            commands: Default::default(),
            op_ids: Default::default(),
        };
        s.state.last_seq = seq;
        s
    };
    let hub_snapshots = hub_js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .expect("hub snapshots");
    let put = snapshot::put(
        &hub_js,
        &hub_snapshots,
        &key,
        40,
        &stored(40).encode(),
        false,
    )
    .await
    .expect("hub snapshot");
    assert_eq!(put, snapshot::Put::Written);

    let leaf_admin = users.connect(&leaf.url, "admin").await;
    let deadline = Instant::now() + WAIT;
    while jetstream::with_domain(leaf_admin.clone(), "hub")
        .get_stream("USYNC_OPS")
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the leafnode link did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ultrasync_shared::nats::ensure_layout(&jetstream::new(leaf_admin), leaf_layout.layout())
        .await
        .expect("leaf layout");

    // What the materializer's gap fill does (`SnapshotSource::Home`), as its user.
    let materializer = users.connect(&leaf.url, "materializer").await;
    let home = jetstream::with_domain(materializer.clone(), "hub")
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .expect("the home region's snapshot store");
    let s = snapshot::fetch(&home, &key)
        .await
        .expect("read the home region's snapshot")
        .expect("a snapshot");
    assert_eq!(s.state.last_seq, 40);

    // A snapshot written in the leaf is the leaf's only.
    let leaf_js = jetstream::new(materializer);
    let leaf_snapshots = leaf_js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .expect("leaf snapshots");
    let put = snapshot::put(
        &leaf_js,
        &leaf_snapshots,
        &key,
        30,
        &stored(30).encode(),
        false,
    )
    .await
    .expect("leaf snapshot");
    assert_eq!(put, snapshot::Put::Written);
    let in_hub = snapshot::fetch(&hub_snapshots, &key)
        .await
        .expect("hub snapshot")
        .expect("a snapshot");
    assert_eq!(
        in_hub.state.last_seq, 40,
        "the leaf's write reached the hub"
    );
    let objects = |js: jetstream::Context| async move {
        let mut stream = js
            .get_stream(format!("OBJ_{SNAPSHOTS_BUCKET}"))
            .await
            .expect("object stream");
        stream.info().await.expect("info").state.messages
    };
    // One chunk and one metadata message each.
    assert_eq!(
        objects(hub_js.clone()).await,
        2,
        "the leaf's chunks reached the hub"
    );
    assert_eq!(
        objects(leaf_js.clone()).await,
        2,
        "the hub's chunks reached the leaf"
    );

    for (region, server) in [("hub", &hub), ("leaf", &leaf)] {
        let v = violations(server);
        assert!(v.is_empty(), "{region}: {v:#?}");
    }
}
