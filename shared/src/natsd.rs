//! A managed `nats-server` process: the one `ultrasync dev` runs and the test harness
//! starts. It writes a config file with JetStream and `sync_interval: always` (the
//! only setting under which a publish ack means "on disk", see NATS-NOTES.md), starts
//! the server, waits until it accepts connections, and stops it on request or drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Where to look for the binary, first match wins.
pub const NATS_SERVER_ENV: &str = "ULTRASYNC_NATS_SERVER_BIN";

/// Finds `nats-server`: `explicit`, then `$ULTRASYNC_NATS_SERVER_BIN`, then
/// `.tools/bin/nats-server` in the working directory, the executable's directory or
/// any of their parents (where `scripts/setup.sh` installs it), then `PATH`.
pub fn find_nats_server(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(NATS_SERVER_ENV) {
        return Ok(PathBuf::from(p));
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.push(exe);
    }
    if let Some(dir) = option_env!("CARGO_MANIFEST_DIR") {
        roots.push(PathBuf::from(dir));
    }
    for root in roots {
        for dir in root.ancestors() {
            let candidate = dir.join(".tools/bin/nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "nats-server not found: run ./scripts/setup.sh (installs it into .tools/bin) or set {NATS_SERVER_ENV}"
    )
}

/// Membership in a cluster of servers on loopback (tests, `dev --cluster 3`).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Cluster name (the same on every node).
    pub name: String,
    /// This node's name (JetStream in a cluster needs unique server names).
    pub server_name: String,
    /// This node's route port.
    pub port: u16,
    /// Route ports of the other nodes.
    pub routes: Vec<u16>,
    /// Route credentials: the `authorization` of this node's route port and the
    /// user:password its routes present. Without them anything that reaches the route
    /// port joins the cluster, past every permission.
    pub route_auth: Option<(String, String)>,
    /// TLS on the route port, verifying the peer node's certificate.
    pub route_tls: Option<TlsFiles>,
}

/// PEM files of a TLS block.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// A nats-server `tls { }` block that verifies peers.
    pub fn block(&self, indent: &str) -> String {
        format!(
            "{indent}tls {{\n{indent}  cert_file: {:?}\n{indent}  key_file: {:?}\n{indent}  ca_file: {:?}\n{indent}  verify: true\n{indent}  timeout: 2\n{indent}}}\n",
            self.cert, self.key, self.ca
        )
    }
}

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct NatsdOptions {
    pub bin: PathBuf,
    /// JetStream store; kept across restarts when the same folder is given.
    pub store_dir: PathBuf,
    /// Where the config, ports file and log go.
    pub run_dir: PathBuf,
    /// Client port; `None` picks a free one.
    pub port: Option<u16>,
    /// Extra config lines appended verbatim (leafnodes, accounts...).
    pub extra_conf: String,
    /// Cluster membership; a single server when `None`.
    pub cluster: Option<ClusterOptions>,
    /// A users/permissions file (the shipped `deploy/nats/users.conf`): copied next
    /// to the generated config unchanged and included.
    pub users_conf: Option<PathBuf>,
    /// Environment of the server process (the passwords `users_conf` reads).
    pub env: Vec<(String, String)>,
}

/// Go's processors for a managed single nats-server: half the machine's cores (at
/// least one), unless `GOMAXPROCS` is set. It shares the machine with the services (`dev`,
/// the tests, `bench`); with a processor per core, Go's scheduler spun up a second
/// thread whenever one sat in an fsync, for work the services needed that core for.
/// `ultrasync bench` on 2 cores: nats-server's CPU per op 10-17 % lower with 1.
fn gomaxprocs() -> Option<String> {
    if std::env::var_os("GOMAXPROCS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / 2).max(1).to_string())
}

/// Free loopback TCP ports (bound, then released: a port can in principle be taken
/// by someone else before it is used, which on loopback in tests is rare enough).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<Vec<_>>>()?)
}

/// A running nats-server, stopped when dropped.
pub struct Natsd {
    child: Child,
    pub url: String,
    pub port: u16,
    pub log_file: PathBuf,
}

impl Natsd {
    pub fn spawn(opts: &NatsdOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.store_dir)
            .with_context(|| format!("creating {}", opts.store_dir.display()))?;
        std::fs::create_dir_all(&opts.run_dir)
            .with_context(|| format!("creating {}", opts.run_dir.display()))?;
        let store = std::fs::canonicalize(&opts.store_dir)?;
        let run = std::fs::canonicalize(&opts.run_dir)?;
        let listen = match opts.port {
            Some(p) => format!("127.0.0.1:{p}"),
            None => "127.0.0.1:-1".to_owned(),
        };
        let mut conf = format!(
            "# Written by ultrasync; regenerated at every start.\n\
             listen: {listen}\n\
             ports_file_dir: {run:?}\n\
             max_payload: 4MB\n\
             jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n{}\n",
            opts.extra_conf,
        );
        if let Some(c) = &opts.cluster {
            let credentials = c
                .route_auth
                .as_ref()
                .map_or(String::new(), |(u, p)| format!("{u}:{p}@"));
            let routes: Vec<String> = c
                .routes
                .iter()
                .map(|p| format!("    nats-route://{credentials}127.0.0.1:{p}"))
                .collect();
            let authorization = c.route_auth.as_ref().map_or(String::new(), |(u, p)| {
                format!("  authorization {{\n    user: {u:?}\n    password: {p:?}\n  }}\n")
            });
            let tls = c
                .route_tls
                .as_ref()
                .map_or(String::new(), |t| t.block("  "));
            conf.push_str(&format!(
                "server_name: {}\ncluster {{\n  name: {}\n  listen: 127.0.0.1:{}\n{authorization}{tls}  routes: [\n{}\n  ]\n}}\n",
                c.server_name,
                c.name,
                c.port,
                routes.join("\n"),
            ));
        }
        if let Some(users) = &opts.users_conf {
            let copy = run.join("users.conf");
            std::fs::copy(users, &copy).with_context(|| format!("copying {}", users.display()))?;
            conf.push_str("include ./users.conf\n");
        }
        let conf_path = run.join("nats-server.conf");
        std::fs::write(&conf_path, conf)
            .with_context(|| format!("writing {}", conf_path.display()))?;
        let log_file = run.join("nats-server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)?;
        let mut command = Command::new(&opts.bin);
        // Measured on a single server; a loopback cluster keeps Go's default.
        if opts.cluster.is_none()
            && let Some(n) = gomaxprocs()
        {
            // `opts.env`, set after it, wins.
            command.env("GOMAXPROCS", n);
        }
        let child = command
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", opts.bin.display()))?;
        let pid = child.id();
        let mut server = Self {
            child,
            url: String::new(),
            port: 0,
            log_file: log_file.clone(),
        };
        let ports_file = |dir: &Path| -> Option<PathBuf> {
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.ends_with(&format!("_{pid}.ports")))
                })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait()? {
                let tail = std::fs::read_to_string(&log_file).unwrap_or_default();
                let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                bail!("nats-server exited ({status}); last log lines:\n{tail}");
            }
            if let Some(file) = ports_file(&run)
                && let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(url) = ports["nats"][0].as_str()
            {
                server.url = url.to_owned();
                server.port = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                if std::net::TcpStream::connect(("127.0.0.1", server.port)).is_ok() {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not come up within 30 s (log: {})",
                    log_file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Natsd {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}
