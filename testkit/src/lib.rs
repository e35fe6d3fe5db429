//! Test harness: real dependencies behind RAII guards. `NatsServer` runs a real
//! nats-server on an ephemeral port with a temporary store; `Stack` adds the gateway
//! (port 0), sequencers and materializers, in-process, and tears all down on drop. Nothing here
//! mocks NATS.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use ultrasync_client::{ClientError, Connection, ServerMessage};
use ultrasync_shared::auth;
use ultrasync_shared::config::Config;
use ultrasync_shared::log::LogEntry;
use ultrasync_shared::natsd::{ClusterOptions, Natsd, NatsdOptions, find_nats_server, free_ports};

pub mod pki;

/// The org every harness token is for.
pub const ORG: &str = "acme";

/// Log output for tests: `ULTRASYNC_LOG=debug cargo test ...` to see it.
pub fn init_tracing() {
    start_watchdog();
    if std::env::var_os("ULTRASYNC_LOG").is_some() {
        ultrasync_shared::telemetry::init(false);
    }
}

/// How long one test binary may run its harness, unless `ULTRASYNC_TEST_LIMIT_SECS`
/// says otherwise. A test that hangs then fails the suite, naming the limit, instead
/// of holding it until an outer timeout.
const BINARY_LIMIT: Duration = Duration::from_secs(900);

/// Started with the first nats-server of a test binary: past the limit, it kills the
/// processes this binary started (nats-servers, services) and exits with a failure.
fn start_watchdog() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let limit = std::env::var("ULTRASYNC_TEST_LIMIT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(BINARY_LIMIT, Duration::from_secs);
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            // Straight to the file descriptor: `eprintln!` in a thread a test
            // started is captured with that test's output and lost on exit.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "error: this test binary has run for more than {} s (ULTRASYNC_TEST_LIMIT_SECS); a test hangs. Stopping it.",
                limit.as_secs()
            );
            kill_children();
            std::process::exit(1);
        });
    });
}

/// SIGKILLs every process whose parent is this one.
fn kill_children() {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A nats-server with JetStream (`sync_interval: always`) on a free loopback port.
pub struct NatsServer {
    server: Natsd,
    store: PathBuf,
    /// Holds the temporary folder when the harness made it.
    _tmp: Option<tempfile::TempDir>,
}

impl NatsServer {
    /// A server with a fresh temporary store.
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = tmp.path().to_path_buf();
        let mut s = Self::start_in(&store);
        s._tmp = Some(tmp);
        s
    }

    /// A server whose store lives in `dir` (kept by the caller across restarts).
    pub fn start_in(dir: &Path) -> Self {
        Self::start_in_with(dir, String::new())
    }

    /// A server whose store lives in `dir`, with `extra_conf` added to its config.
    pub fn start_in_with(dir: &Path, extra_conf: String) -> Self {
        start_watchdog();
        let bin = find_nats_server(None).expect("nats-server (run ./scripts/setup.sh)");
        let server = Natsd::spawn(&NatsdOptions {
            bin,
            store_dir: dir.join("store"),
            run_dir: dir.join("run"),
            port: None,
            extra_conf,
            ..Default::default()
        })
        .expect("start nats-server");
        Self {
            server,
            store: dir.to_path_buf(),
            _tmp: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.server.url
    }

    pub fn dir(&self) -> &Path {
        &self.store
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Stops the server cleanly (SIGTERM).
    pub fn stop(&mut self) {
        self.server.terminate(Duration::from_secs(10));
    }

    /// A server with a fresh temporary store, the shipped `deploy/nats/users.conf`
    /// (unchanged) and `users`' passwords in its environment: every client must log
    /// in, and each user has exactly the shipped permissions.
    pub fn start_with_users(users: &NatsUsers) -> Self {
        start_watchdog();
        let tmp = tempfile::tempdir().expect("temp dir");
        let bin = find_nats_server(None).expect("nats-server (run ./scripts/setup.sh)");
        let server = Natsd::spawn(&NatsdOptions {
            bin,
            store_dir: tmp.path().join("store"),
            run_dir: tmp.path().join("run"),
            users_conf: Some(shipped_users_conf()),
            env: users.server_env(),
            ..Default::default()
        })
        .expect("start nats-server with users.conf");
        Self {
            server,
            store: tmp.path().to_path_buf(),
            _tmp: Some(tmp),
        }
    }

    /// The server's log file.
    pub fn log_file(&self) -> &Path {
        &self.server.log_file
    }
}

/// The shipped users and permissions file.
pub fn shipped_users_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/users.conf")
}

/// Random passwords for the users of `deploy/nats/users.conf`, new for every test.
pub struct NatsUsers {
    passwords: BTreeMap<&'static str, String>,
}

impl NatsUsers {
    pub const NAMES: [&'static str; 5] =
        ["admin", "gateway", "sequencer", "materializer", "compactor"];

    pub fn random() -> Self {
        Self {
            passwords: Self::NAMES
                .iter()
                .map(|n| (*n, hex::encode(rand::random::<[u8; 16]>())))
                .collect(),
        }
    }

    pub fn password(&self, user: &str) -> &str {
        self.passwords.get(user).expect("a known user")
    }

    /// `USYNC_{USER}_PASSWORD` for the nats-server process.
    pub fn server_env(&self) -> Vec<(String, String)> {
        self.passwords
            .iter()
            .map(|(u, p)| (format!("USYNC_{}_PASSWORD", u.to_uppercase()), p.clone()))
            .collect()
    }

    /// `ULTRASYNC_NATS_USER` / `ULTRASYNC_NATS_PASSWORD` for an ultrasync process.
    pub fn client_env(&self, user: &str) -> Vec<(String, String)> {
        vec![
            ("ULTRASYNC_NATS_USER".to_owned(), user.to_owned()),
            (
                "ULTRASYNC_NATS_PASSWORD".to_owned(),
                self.password(user).to_owned(),
            ),
        ]
    }

    /// A client logged in as `user`.
    pub async fn connect(&self, url: &str, user: &str) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .user_and_password(user.to_owned(), self.password(user).to_owned())
            .connect(url)
            .await
            .expect("nats connect with a user")
    }
}

/// A cluster of nats-servers on loopback: fixed (pre-picked) client and route ports
/// and one store per node, so a node can be killed and restarted as itself.
pub struct NatsCluster {
    nodes: Vec<Option<Natsd>>,
    opts: Vec<NatsdOptions>,
    ports: Vec<u16>,
    route_ports: Vec<u16>,
    /// With the folder holding its files.
    tls: Option<(ClusterTls, tempfile::TempDir)>,
    _tmp: tempfile::TempDir,
}

/// The TLS side of [`NatsCluster::start_secure`]: what a client needs.
pub struct ClusterTls {
    pub ca: PathBuf,
    pub client: pki::Files,
    /// The nodes' own certificate (a node presents it on routes too).
    pub node: ultrasync_shared::natsd::TlsFiles,
    pub route_user: String,
    pub route_password: String,
}

impl NatsCluster {
    /// `n` nodes, plain client and route ports, routes unauthenticated.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, None, None)
    }

    /// `n` nodes configured, all but node `absent` started ([`Self::restart`]
    /// starts it): a cluster still forming.
    pub fn start_without(n: usize, absent: usize) -> Self {
        Self::start_with(n, None, Some(absent))
    }

    /// `n` nodes with TLS on client and route ports (verifying the peer's
    /// certificate, signed by a test CA) and route credentials.
    pub fn start_secure(n: usize) -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = pki::TestCa::new();
        let node = ca.localhost().write(tmp.path(), "node");
        let client = ca.client("ultrasync").write(tmp.path(), "client");
        let ca_file = ca.write_ca(tmp.path());
        let tls = ClusterTls {
            node: ultrasync_shared::natsd::TlsFiles {
                cert: node.cert,
                key: node.key,
                ca: ca_file.clone(),
            },
            ca: ca_file,
            client,
            route_user: "route".to_owned(),
            route_password: random_secret(),
        };
        Self::start_with(n, Some((tls, tmp)), None)
    }

    fn start_with(
        n: usize,
        tls: Option<(ClusterTls, tempfile::TempDir)>,
        absent: Option<usize>,
    ) -> Self {
        start_watchdog();
        let tmp = tempfile::tempdir().expect("temp dir");
        let bin = find_nats_server(None).expect("nats-server (run ./scripts/setup.sh)");
        let ports = free_ports(2 * n).expect("free ports");
        let (client, route) = ports.split_at(n);
        let opts: Vec<NatsdOptions> = (0..n)
            .map(|i| NatsdOptions {
                bin: bin.clone(),
                store_dir: tmp.path().join(format!("n{i}/store")),
                run_dir: tmp.path().join(format!("n{i}/run")),
                port: Some(client[i]),
                extra_conf: tls
                    .as_ref()
                    .map_or(String::new(), |(t, _)| t.node.block("")),
                cluster: Some(ClusterOptions {
                    name: "usync-test".to_owned(),
                    server_name: format!("n{i}"),
                    port: route[i],
                    routes: (0..n).filter(|j| *j != i).map(|j| route[j]).collect(),
                    route_auth: tls
                        .as_ref()
                        .map(|(t, _)| (t.route_user.clone(), t.route_password.clone())),
                    route_tls: tls.as_ref().map(|(t, _)| t.node.clone()),
                }),
                ..Default::default()
            })
            .collect();
        let nodes = opts
            .iter()
            .enumerate()
            .map(|(i, o)| (absent != Some(i)).then(|| Natsd::spawn(o).expect("start cluster node")))
            .collect();
        Self {
            nodes,
            opts,
            ports: client.to_vec(),
            route_ports: route.to_vec(),
            tls,
            _tmp: tmp,
        }
    }

    /// The TLS files and route credentials of a [`Self::start_secure`] cluster.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref().map(|(t, _)| t)
    }

    /// Route port of node `i`.
    pub fn route_port(&self, i: usize) -> u16 {
        self.route_ports[i]
    }

    /// Every node's URL, comma separated (what `nats_url` takes).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[i])
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].as_ref().map(Natsd::pid)
    }

    /// SIGKILL node `i` (its store stays).
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            n.kill();
        }
    }

    /// Starts node `i` (again) with its store and ports.
    pub fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        self.nodes[i] = Some(Natsd::spawn(&self.opts[i]).expect("restart cluster node"));
    }

    /// Waits (up to 30 s) until JetStream answers through the cluster.
    pub async fn wait_jetstream(&self) {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(t) = self.tls() {
            opts = opts
                .add_root_certificates(t.ca.clone())
                .add_client_certificate(t.client.cert.clone(), t.client.key.clone())
                .require_tls(true);
        }
        let client = opts
            .connect(ultrasync_shared::nats::server_addrs(&self.url()).expect("server list"))
            .await
            .expect("nats connect");
        let js = jetstream::new(client);
        for _ in 0..300 {
            if js.query_account().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("JetStream never became ready on the cluster");
    }
}

/// Resident memory of process `pid` in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A fresh random HS256 secret for one test.
pub fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// What a `Stack` runs.
pub struct StackOptions {
    pub sequencers: usize,
    /// In-process materializers (each a full replica with its own RocksDB folder).
    pub materializers: usize,
    /// Reuse this folder for the NATS store (restart tests); a temp dir otherwise.
    pub dir: Option<PathBuf>,
    /// Reuse this secret (restart tests).
    pub secret: Option<String>,
    /// Namespaces beyond the defaults.
    pub namespaces: Vec<ultrasync_shared::namespaces::NamespaceConfig>,
    /// Last word on the config before anything starts.
    pub configure: fn(&mut Config),
    /// NATS with TLS that verifies clients: every service connects with the stack's
    /// test CA (`nats_tls_ca`) and a client certificate.
    pub nats_tls: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            sequencers: 1,
            materializers: 1,
            dir: None,
            secret: None,
            namespaces: Vec::new(),
            configure: |_| {},
            nats_tls: false,
        }
    }
}

struct Service {
    /// "gateway", "sequencer", "materializer": named when it does not stop.
    name: &'static str,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// Where its `/metrics` is served (the config's `metrics_listen`, bound here).
    metrics: Option<SocketAddr>,
}

/// Binds a service's metrics listener when the config asks for one (port 0 too), so
/// the stack knows where it is.
fn bind_metrics(addr: Option<SocketAddr>) -> (Option<tokio::net::TcpListener>, Option<SocketAddr>) {
    let Some(addr) = addr else {
        return (None, None);
    };
    let listener = std::net::TcpListener::bind(addr).expect("bind a metrics listener");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let bound = listener.local_addr().expect("addr");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    (Some(listener), Some(bound))
}

impl Service {
    async fn shutdown(self) {
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(15), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("the {} failed: {e:#}", self.name),
            Ok(Err(e)) => panic!("the {} panicked: {e}", self.name),
            Err(_) => panic!("the {} did not stop within 15 s", self.name),
        }
    }
}

/// nats-server + gateway + sequencer(s), all real, on loopback.
pub struct Stack {
    pub nats: NatsServer,
    pub secret: String,
    pub config: Config,
    pub http: SocketAddr,
    gateway: Option<Service>,
    extra_gateways: Vec<Service>,
    sequencers: Vec<Service>,
    materializers: Vec<Service>,
    /// Holds the materializers' folders when the harness made them.
    state_dir: tempfile::TempDir,
    /// Holds the test CA's files (`StackOptions::nats_tls`).
    _pki: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(opts: StackOptions) -> Self {
        init_tracing();
        let pki = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        let mut extra_conf = String::new();
        if opts.nats_tls {
            let ca = pki::TestCa::new();
            let server = ca.localhost().write(pki.path(), "server");
            let client = ca.client("ultrasync").write(pki.path(), "client");
            let ca_file = ca.write_ca(pki.path());
            extra_conf = format!(
                "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
                server.cert, server.key, ca_file
            );
            config.nats_tls_ca = Some(ca_file);
            config.nats_tls_cert = Some(client.cert);
            config.nats_tls_key = Some(client.key);
        }
        let nats = match &opts.dir {
            Some(d) => NatsServer::start_in_with(d, extra_conf),
            None => {
                let tmp = tempfile::tempdir().expect("temp dir");
                let mut s = NatsServer::start_in_with(tmp.path(), extra_conf);
                s._tmp = Some(tmp);
                s
            }
        };
        let secret = opts.secret.unwrap_or_else(random_secret);
        config.nats_url = nats.url().to_owned();
        config.auth.jwt_secret = Some(secret.clone());
        config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.namespaces = opts.namespaces;
        (opts.configure)(&mut config);
        config.validate().expect("valid test config");

        let mut stack = Self {
            nats,
            secret,
            config,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway: None,
            extra_gateways: Vec::new(),
            sequencers: Vec::new(),
            materializers: Vec::new(),
            state_dir: tempfile::tempdir().expect("temp dir"),
            _pki: pki,
        };
        stack.start_gateway().await;
        for _ in 0..opts.sequencers {
            stack.add_sequencer();
        }
        for i in 0..opts.materializers {
            stack.add_materializer(&format!("m{i}"));
        }
        if opts.materializers > 0 {
            stack.wait_for_reads().await;
        }
        stack
    }

    async fn start_gateway(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.config.gateway.listen)
            .await
            .expect("bind gateway");
        self.http = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(ultrasync_gateway::run(
            self.config.clone(),
            listener,
            stop.clone(),
        ));
        self.gateway = Some(Service {
            name: "gateway",
            stop,
            task,
            metrics: Some(self.http),
        });
        self.wait_ready().await;
    }

    /// Starts one more gateway on the same NATS; returns its WebSocket URL.
    pub async fn add_gateway(&mut self) -> String {
        let listener = tokio::net::TcpListener::bind(self.config.gateway.listen)
            .await
            .expect("bind gateway");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let task = tokio::spawn(ultrasync_gateway::run(
            self.config.clone(),
            listener,
            stop.clone(),
        ));
        self.extra_gateways.push(Service {
            name: "gateway",
            stop,
            task,
            metrics: Some(addr),
        });
        let url = format!("http://{addr}/readyz");
        for _ in 0..300 {
            if matches!(http_get(&url).await, Ok((200, _))) {
                return format!("ws://{addr}/v1/sync");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("extra gateway never became ready");
    }

    /// Stops the gateway gracefully and starts a new one (on a new port).
    pub async fn restart_gateway(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        self.start_gateway().await;
    }

    /// Starts `ultrasync sequencer` (binary `bin`) as its own process.
    pub fn sequencer_process(&self, bin: &Path) -> SequencerProcess {
        ServiceProcess::spawn(bin, "sequencer", self.nats.url(), &[])
    }

    /// Starts one more in-process sequencer instance (its own NATS connection), with
    /// its metrics listener when `sequencer.metrics_listen` is set.
    pub fn add_sequencer(&mut self) {
        let stop = CancellationToken::new();
        let (listener, metrics) = bind_metrics(self.config.sequencer.metrics_listen);
        let task = tokio::spawn(ultrasync_sequencer::run_with_metrics(
            self.config.clone(),
            listener,
            stop.clone(),
        ));
        self.sequencers.push(Service {
            name: "sequencer",
            stop,
            task,
            metrics,
        });
    }

    /// Where sequencer `i` (in start order) serves `/metrics`.
    pub fn sequencer_metrics(&self, i: usize) -> Option<SocketAddr> {
        self.sequencers.get(i)?.metrics
    }

    /// Where materializer `i` (in start order) serves `/metrics`.
    pub fn materializer_metrics(&self, i: usize) -> Option<SocketAddr> {
        self.materializers.get(i)?.metrics
    }

    /// The RocksDB folder of materializer `name` (kept for the stack's life).
    pub fn materializer_dir(&self, name: &str) -> PathBuf {
        self.state_dir.path().join(format!("materializer-{name}"))
    }

    /// Starts one more in-process materializer named `name`, with its metrics
    /// listener when `materializer.metrics_listen` is set.
    pub fn add_materializer(&mut self, name: &str) {
        let mut config = self.config.clone();
        config.materializer.name = name.to_owned();
        config.materializer.data_dir = self.materializer_dir(name);
        let stop = CancellationToken::new();
        let (listener, metrics) = bind_metrics(config.materializer.metrics_listen);
        let task = tokio::spawn(ultrasync_materializer::run_with_metrics(
            config,
            listener,
            stop.clone(),
        ));
        self.materializers.push(Service {
            name: "materializer",
            stop,
            task,
            metrics,
        });
    }

    /// Stops materializer `i` (in start order) gracefully.
    pub async fn stop_materializer(&mut self, i: usize) {
        let s = self.materializers.remove(i);
        s.shutdown().await;
    }

    /// Starts `ultrasync materializer` (binary `bin`) as its own process, named
    /// `name`, with its folder under the stack's.
    pub fn materializer_process(&self, bin: &Path, name: &str) -> ServiceProcess {
        let dir = self.materializer_dir(name);
        let dir = dir.to_string_lossy().into_owned();
        let mut args = vec!["--data-dir", dir.as_str(), "--name", name];
        let every = self.config.materializer.snapshot_every_ops.to_string();
        args.extend(["--snapshot-every-ops", every.as_str()]);
        ServiceProcess::spawn(bin, "materializer", self.nats.url(), &args)
    }

    /// Waits (up to 15 s) until a materializer answers reads.
    pub async fn wait_for_reads(&self) {
        let nc = self.nats_client().await;
        let key = ultrasync_shared::StreamKey::parse(ORG, "web", "index").expect("key");
        for _ in 0..300 {
            if ultrasync_shared::reads::digest(&nc, &key, None)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no materializer answered reads");
    }

    /// A NATS client for request-reply reads, connected as the services are.
    pub async fn nats_client(&self) -> async_nats::Client {
        ultrasync_shared::nats::connect(&self.config, "test", Duration::from_secs(10))
            .await
            .expect("nats connect")
    }

    /// Stops sequencer `i` gracefully.
    pub async fn stop_sequencer(&mut self, i: usize) {
        let s = self.sequencers.remove(i);
        s.shutdown().await;
    }

    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.http);
        for _ in 0..300 {
            if let Ok(body) = http_get(&url).await
                && body.0 == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gateway never became ready");
    }

    /// `GET http://{gateway}{path}` with `token` as the bearer (none when empty).
    pub async fn get(&self, path: &str, token: &str) -> HttpResponse {
        self.http("GET", path, token, "").await
    }

    /// A request to the gateway with `token` as the bearer (none when empty) and a
    /// JSON body.
    pub async fn http(&self, method: &str, path: &str, token: &str, body: &str) -> HttpResponse {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Content-Type", "application/json")];
        if !token.is_empty() {
            headers.push(("Authorization", auth.as_str()));
        }
        http_exchange(
            method,
            &format!("http://{}{path}", self.http),
            &headers,
            body,
        )
        .await
        .expect("http")
    }

    /// Runs the `ultrasync` binary `bin` with `args` against this stack's NATS:
    /// (exit code, stdout).
    pub fn run_cli(&self, bin: &Path, args: &[&str]) -> (i32, String) {
        let out = std::process::Command::new(bin)
            .args(args)
            .args(["--nats-url", self.nats.url()])
            .env("ULTRASYNC_LOG", "warn")
            .output()
            .expect("run ultrasync");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/sync", self.http)
    }

    /// A token for `sub` in org `acme`, all projects.
    pub fn token(&self, sub: &str, scope: &str) -> String {
        let claims = auth::claims(sub, ORG, &["*"], scope, 3600, auth::DEFAULT_AUDIENCE);
        auth::mint_hs256(self.secret.as_bytes(), &claims).expect("mint")
    }

    /// Connects and says hello as `client_id` in project `project`.
    pub async fn client(
        &self,
        sub: &str,
        project: &str,
        client_id: &str,
        cursors: &[(&str, Option<u64>)],
    ) -> Connection {
        let mut c = Connection::connect(&self.ws_url(), &self.token(sub, "read write"))
            .await
            .expect("connect");
        let cursors: BTreeMap<String, Option<u64>> =
            cursors.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect();
        c.hello(ORG, project, client_id, cursors)
            .await
            .expect("hello");
        c
    }

    /// Connects with a token of `scope` and says hello without cursors.
    pub async fn client_with_scope(
        &self,
        sub: &str,
        project: &str,
        client_id: &str,
        scope: &str,
    ) -> Connection {
        let mut c = Connection::connect(&self.ws_url(), &self.token(sub, scope))
            .await
            .expect("connect");
        c.hello(ORG, project, client_id, BTreeMap::new())
            .await
            .expect("hello");
        c
    }

    /// A JetStream context on the stack's NATS, connected as the services are (TLS
    /// included).
    pub async fn jetstream(&self) -> jetstream::Context {
        let client = ultrasync_shared::nats::connect(&self.config, "test", Duration::from_secs(10))
            .await
            .expect("nats connect");
        jetstream::new(client)
    }

    /// Stops the services gracefully, then the nats-server (SIGTERM).
    pub async fn shutdown(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        for g in self.extra_gateways.drain(..) {
            g.shutdown().await;
        }
        for s in self.sequencers.drain(..) {
            s.shutdown().await;
        }
        for s in self.materializers.drain(..) {
            s.shutdown().await;
        }
        // Blocking for the few milliseconds nats-server takes to exit is fine here.
        self.nats.stop();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(g) = &self.gateway {
            g.stop.cancel();
            g.task.abort();
        }
        for s in self
            .sequencers
            .iter()
            .chain(&self.extra_gateways)
            .chain(&self.materializers)
        {
            s.stop.cancel();
            s.task.abort();
        }
    }
}

/// A GET through the workspace's HTTP client (`http://` or `https://` with the
/// system's roots): (status, body).
pub async fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    http_request("GET", url, &[], "").await
}

/// A request through the workspace's HTTP client (`ultrasync-http-client`; a fresh
/// connection each time, no proxy, 30 s in all): (status, body). Tests that need the
/// exact bytes on the wire use [`http_exchange`].
pub async fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    use ultrasync_http_client::{Trust, describe, read_bounded, reqwest};
    let failed = |e: &(dyn std::error::Error + 'static)| std::io::Error::other(describe(e));
    let client = ultrasync_http_client::builder(
        &Trust::system(),
        "ultrasync-testkit",
        Duration::from_secs(30),
    )
    .no_proxy()
    .pool_max_idle_per_host(0)
    .build()
    .map_err(|e| failed(&e))?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| failed(&e))?;
    let mut req = client.request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if !body.is_empty() {
        req = req.body(body.to_owned());
    }
    let answer = req.send().await.map_err(|e| failed(&e))?;
    let status = answer.status().as_u16();
    let body = read_bounded(answer, 256 << 20)
        .await
        .map_err(|e| failed(&e))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP response as [`http_exchange`] read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 request written by hand over a real socket, `Connection: close`:
/// the method, path and headers go on the wire exactly as given (no URL normalizing,
/// no added headers), for tests that probe the gateway's edges.
pub async fn http_exchange(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = match chunked {
        true => String::from_utf8_lossy(&dechunk(body.as_bytes())).into_owned(),
        false => body.to_owned(),
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// The payload of a `Transfer-Encoding: chunked` body (what is there of it).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
        let after = &rest[eol + 2..];
        match size {
            Some(0) | None => break,
            Some(size) if after.len() < size => {
                out.extend_from_slice(after);
                break;
            }
            Some(size) => {
                out.extend_from_slice(&after[..size]);
                rest = after[size..]
                    .strip_prefix(b"\r\n")
                    .unwrap_or(&after[size..]);
            }
        }
    }
    out
}

/// Checks the log of each `subject` against what clients were acked: `server_seq`
/// dense from 1, every op once, each op equal to its ack. Returns the number of ops
/// per subject, in the order given.
pub async fn check_log_against_acks(
    js: &jetstream::Context,
    subjects: &[String],
    acked: &std::collections::HashMap<String, ultrasync_client::Op>,
) -> Vec<usize> {
    let mut seen = std::collections::HashSet::new();
    let mut counts = Vec::new();
    for subject in subjects {
        let entries = read_subject(js, subject).await;
        let seqs: Vec<u64> = entries.iter().map(|e| e.server_seq).collect();
        assert_eq!(
            seqs,
            (1..=entries.len() as u64).collect::<Vec<_>>(),
            "{subject}: server_seq not dense"
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
        counts.push(entries.len());
    }
    counts
}

/// Every op on `subject` in `USYNC_OPS`, in stream order, straight from JetStream.
pub async fn read_subject(js: &jetstream::Context, subject: &str) -> Vec<LogEntry> {
    let stream = js
        .get_stream(ultrasync_shared::nats::OPS_STREAM)
        .await
        .expect("ops stream");
    let Some(head) = ultrasync_shared::log::head(&stream, subject)
        .await
        .expect("head")
    else {
        return Vec::new();
    };
    let mut entries = Box::pin(
        ultrasync_shared::log::read_from(&stream, subject, 1)
            .await
            .expect("read"),
    );
    let mut out = Vec::new();
    while let Some(e) = entries.next().await {
        let e = e.expect("entry");
        let done = e.server_seq >= head.server_seq;
        out.push(e);
        if done {
            break;
        }
    }
    out
}

/// Waits (up to 10 s) for a sound snapshot of `acme/{project}/{ns}` at `at_least` or
/// later, as a materializer writes them in the background.
pub async fn wait_for_snapshot(
    stack: &Stack,
    project: &str,
    ns: &str,
    at_least: u64,
) -> ultrasync_shared::snapshot::Snapshot {
    let js = stack.jetstream().await;
    let store = js
        .get_object_store(ultrasync_shared::nats::SNAPSHOTS_BUCKET)
        .await
        .expect("snapshot store");
    let key = ultrasync_shared::StreamKey::parse(ORG, project, ns).expect("key");
    for _ in 0..200 {
        if let Some(s) = ultrasync_shared::snapshot::fetch(&store, &key)
            .await
            .expect("a sound snapshot")
            && s.state.last_seq >= at_least
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no snapshot of {key} at {at_least} or later");
}

/// Receives frames until `pred` says stop, failing after `limit`.
pub async fn recv_until(
    conn: &mut Connection,
    limit: Duration,
    mut pred: impl FnMut(&ServerMessage) -> bool,
) -> Result<Vec<ServerMessage>, ClientError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = conn.recv_timeout(left).await?;
        let stop = pred(&msg);
        seen.push(msg);
        if stop {
            return Ok(seen);
        }
    }
}

/// A service (`ultrasync sequencer`, `ultrasync materializer`) as its own process,
/// for kill -9 and SIGSTOP tests. Killed (SIGKILL, after SIGCONT) on drop.
pub struct ServiceProcess {
    child: std::process::Child,
}

pub type SequencerProcess = ServiceProcess;

impl ServiceProcess {
    pub fn spawn(bin: &Path, service: &str, nats_url: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(bin, service, nats_url, args, &[])
    }

    /// As [`ServiceProcess::spawn`], with extra environment (NATS user, secrets).
    pub fn spawn_with_env(
        bin: &Path,
        service: &str,
        nats_url: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let child = std::process::Command::new(bin)
            .args([service, "--nats-url", nats_url])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(
                "ULTRASYNC_LOG",
                std::env::var("ULTRASYNC_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn service");
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn stop(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGTERM, then waits up to `limit` for the process to exit; its status, or
    /// `None` if it is still running.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(limit)
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn cont(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.cont();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ultrasync inspect partitions` against `nats_url`, run through the binary `bin`.
pub fn inspect_partitions(bin: &Path, nats_url: &str) -> serde_json::Value {
    let out = std::process::Command::new(bin)
        .args(["inspect", "partitions", "--nats-url", nats_url])
        .output()
        .expect("inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `ultrasync gateway` as its own process on a free loopback port.
pub struct GatewayProcess {
    pub process: ServiceProcess,
    pub addr: SocketAddr,
}

impl GatewayProcess {
    /// Starts it and waits (up to 30 s) until `/readyz` answers 200.
    pub async fn start(bin: &Path, nats_url: &str, env: &[(String, String)]) -> Self {
        Self::start_as(bin, "gateway", &[], nats_url, env).await
    }

    /// [`GatewayProcess::start`] for any command that runs a gateway (`gateway`,
    /// `serve`), with `args` added.
    pub async fn start_as(
        bin: &Path,
        command: &str,
        args: &[&str],
        nats_url: &str,
        env: &[(String, String)],
    ) -> Self {
        let port = free_ports(1).expect("free port")[0];
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listen = addr.to_string();
        let mut all = vec!["--listen", &listen];
        all.extend_from_slice(args);
        let mut process = ServiceProcess::spawn_with_env(bin, command, nats_url, &all, env);
        let url = format!("http://{addr}/readyz");
        for _ in 0..600 {
            if matches!(http_get(&url).await, Ok((200, _))) {
                return Self { process, addr };
            }
            if let Some(status) = process.exited() {
                panic!("{command} exited before it was ready: {status}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{command} at {addr} never became ready");
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }
}

/// A token for `sub` in org `acme`, all projects, signed with `secret`.
pub fn token_for(secret: &str, sub: &str, scope: &str) -> String {
    let claims = auth::claims(sub, ORG, &["*"], scope, 3600, auth::DEFAULT_AUDIENCE);
    auth::mint_hs256(secret.as_bytes(), &claims).expect("mint")
}
