//! The shipped `deploy/docker-compose.yml`, run for real on a Docker engine: images
//! built from local parts (`scripts/compose-images.sh`: a debootstrap Debian base,
//! this test's `ultrasync` binary, the pinned nats-server), secrets from
//! `deploy/init-env.sh`, and the compose file as shipped with only image names and
//! host ports set through its variables. Driven from outside over the published
//! ports: writes acked through each gateway, fan-out from one gateway to the other,
//! R3 streams in `ultrasync inspect streams`; a NATS container and a sequencer
//! container killed under load lose nothing acked; `down` and `up` again keep the
//! data.
//!
//! Needs a Docker engine: the one of `DOCKER_HOST` or the default socket when it
//! answers, else (as root) a `dockerd` this test starts and stops, with its image
//! store in `ULTRASYNC_DOCKER_ROOT` (default `~/.cache/ultrasync/docker`) so the base
//! image is made once per machine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_testkit::{ORG, http_request, recv_until, token_for};

/// How long the stack may take to come up healthy (first start includes creating the
/// R3 streams on a fresh cluster).
const UP_WAIT: Duration = Duration::from_secs(240);
/// One command's answer, fail-over included (a sequencer's lease expires, a NATS
/// node's RAFT groups elect new leaders).
const ANSWER_WAIT: Duration = Duration::from_secs(30);

// --- the Docker engine ------------------------------------------------------------

/// The engine the test talks to, and the `dockerd` it started when none answered.
struct Engine {
    host: String,
    dockerd: Option<std::process::Child>,
    dir: Option<tempfile::TempDir>,
}

fn docker_answers(host: &str) -> bool {
    std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .env("DOCKER_HOST", host)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The effective user of this process (the owner of its /proc entry) is root.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl Engine {
    fn start() -> Engine {
        if let Ok(host) = std::env::var("DOCKER_HOST") {
            assert!(
                docker_answers(&host),
                "DOCKER_HOST={host} does not answer `docker version`"
            );
            return Engine {
                host,
                dockerd: None,
                dir: None,
            };
        }
        let default = "unix:///var/run/docker.sock".to_owned();
        if docker_answers(&default) {
            return Engine {
                host: default,
                dockerd: None,
                dir: None,
            };
        }
        assert!(
            is_root(),
            "no Docker engine answers and only root can start dockerd: run the test as \
             root, or set DOCKER_HOST to a running engine"
        );
        let data_root = std::env::var_os("ULTRASYNC_DOCKER_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                    .join(".cache/ultrasync/docker")
            });
        std::fs::create_dir_all(&data_root).expect("docker data root");
        // Short paths: containerd's sockets live under the exec root (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("usync-dockerd")
            .tempdir_in("/tmp")
            .expect("dockerd dir");
        let host = format!("unix://{}/docker.sock", dir.path().display());
        let log = std::fs::File::create(dir.path().join("dockerd.log")).expect("log");
        // No default bridge (compose makes its own network) and no masquerading:
        // containers reach each other and the host's published ports, nothing else.
        let child = std::process::Command::new("dockerd")
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("dockerd.pid"))
            .args(["-H", &host, "--bridge=none", "--ip-masq=false"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd (scripts/setup.sh installs Debian's docker.io)");
        let mut engine = Engine {
            host: host.clone(),
            dockerd: Some(child),
            dir: Some(dir),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !docker_answers(&host) {
            if let Some(status) = engine
                .dockerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("dockerd exited ({status}):\n{}", engine.log_tail());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not answer within 60 s:\n{}",
                engine.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        // Forwarded traffic from a container network may only go to another
        // container network: the stack stays on the network this test creates.
        let rule = ["DOCKER-USER", "-i", "br-+", "!", "-o", "br-+", "-j", "DROP"];
        let present = std::process::Command::new("iptables")
            .arg("-C")
            .args(rule)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            let added = std::process::Command::new("iptables")
                .arg("-I")
                .args(rule)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                added,
                "could not add the DOCKER-USER rule that keeps containers local"
            );
        }
        engine
    }

    fn log_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let log = std::fs::read_to_string(dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let Some(child) = self.dockerd.as_mut() else {
            return;
        };
        // SIGTERM: dockerd stops its containers and its containerd, then exits.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

// --- the compose project --------------------------------------------------------------

/// A copy of `deploy/` with fresh secrets, run as one compose project.
struct Project {
    deploy: PathBuf,
    _dir: tempfile::TempDir,
    name: String,
    env: Vec<(String, String)>,
    ports: Ports,
}

#[derive(Clone, Copy)]
struct Ports {
    gateway_1: u16,
    gateway_2: u16,
    nats: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn compose_program() -> Vec<String> {
    let v1 = std::process::Command::new("docker-compose")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if v1 {
        vec!["docker-compose".to_owned()]
    } else {
        vec!["docker".to_owned(), "compose".to_owned()]
    }
}

fn run_checked(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Project {
    fn new(engine: &Engine, images: &[(String, String)]) -> Project {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().expect("tempdir");
        let deploy = dir.path().join("deploy");
        run_checked(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(root.join("deploy"))
                .arg(&deploy),
            "copy deploy/",
        );
        // Secrets of a local run of init-env in the checkout are not this test's.
        for sub in ["env", "nats/secrets"] {
            let Ok(entries) = std::fs::read_dir(deploy.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".example") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        run_checked(
            &mut std::process::Command::new(deploy.join("init-env.sh")),
            "deploy/init-env.sh",
        );
        let ports = Ports {
            gateway_1: free_port(),
            gateway_2: free_port(),
            nats: free_port(),
        };
        let mut env: Vec<(String, String)> = images.to_vec();
        env.extend([
            ("DOCKER_HOST".to_owned(), engine.host.clone()),
            (
                "USYNC_GATEWAY_1_PORT".to_owned(),
                format!("127.0.0.1:{}", ports.gateway_1),
            ),
            (
                "USYNC_GATEWAY_2_PORT".to_owned(),
                format!("127.0.0.1:{}", ports.gateway_2),
            ),
            (
                "USYNC_NATS_PORT".to_owned(),
                format!("127.0.0.1:{}", ports.nats),
            ),
            (
                "USYNC_NATS_MONITOR_PORT".to_owned(),
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "USYNC_COMPACTOR_METRICS_PORT".to_owned(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ]);
        Project {
            deploy,
            _dir: dir,
            name: format!("usynctest{:08x}", rand::random::<u32>()),
            env,
            ports,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let program = compose_program();
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..])
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(self.deploy.join("docker-compose.yml"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true);
        cmd
    }

    /// Runs `docker-compose ARGS`, panicking with its output when it fails.
    async fn run(&self, args: &[&str]) -> String {
        let out = self
            .command(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("docker-compose {args:?}: {e}"));
        assert!(
            out.status.success(),
            "docker-compose {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", self.env_value("DOCKER_HOST"))
            .output()
            .await
            .unwrap_or_else(|e| panic!("docker {args:?}: {e}"));
        assert!(
            out.status.success(),
            "docker {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn env_value(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    async fn container(&self, service: &str) -> String {
        let id = self.run(&["ps", "-q", service]).await.trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// Every long-running service's container is running and healthy, and both
    /// gateways answer /readyz.
    async fn wait_healthy(&self) {
        let services = [
            "nats-1",
            "nats-2",
            "nats-3",
            "gateway-1",
            "gateway-2",
            "sequencer-1",
            "sequencer-2",
            "materializer-1",
            "materializer-2",
            "compactor",
        ];
        let deadline = tokio::time::Instant::now() + UP_WAIT;
        loop {
            let mut waiting = Vec::new();
            for s in services {
                let id = self.run(&["ps", "-q", s]).await.trim().to_owned();
                let health = if id.is_empty() {
                    "absent".to_owned()
                } else {
                    self.docker(&[
                        "inspect",
                        "--format",
                        "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                        &id,
                    ])
                    .await
                    .trim()
                    .to_owned()
                };
                if health != "running/healthy" {
                    waiting.push(format!("{s}: {health}"));
                }
            }
            for port in [self.ports.gateway_1, self.ports.gateway_2] {
                let ready =
                    http_request("GET", &format!("http://127.0.0.1:{port}/readyz"), &[], "")
                        .await
                        .is_ok_and(|(status, _)| status == 200);
                if !ready {
                    waiting.push(format!("gateway on {port}: not ready"));
                }
            }
            if waiting.is_empty() {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let logs = self.run(&["logs", "--tail", "20"]).await;
                panic!(
                    "the stack is not healthy after {} s: {waiting:?}\n{logs}",
                    UP_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Every secret value init-env wrote: the env files' passwords and JWT secret.
    fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.deploy.join("env"))
            .expect("env dir")
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "env") {
                let text = std::fs::read_to_string(entry.path()).expect("env file");
                out.extend(
                    text.lines()
                        .filter_map(|l| l.split_once('='))
                        .filter(|(k, _)| k.contains("PASSWORD") || k.contains("SECRET"))
                        .map(|(_, v)| v.to_owned()),
                );
            }
        }
        assert!(
            out.len() >= 6,
            "init-env wrote fewer secrets than expected: {}",
            out.len()
        );
        out.sort();
        out.dedup();
        out
    }

    fn jwt_secret(&self) -> String {
        let env =
            std::fs::read_to_string(self.deploy.join("env/gateway.env")).expect("gateway.env");
        env.lines()
            .find_map(|l| l.strip_prefix("ULTRASYNC_JWT_SECRET="))
            .expect("ULTRASYNC_JWT_SECRET in gateway.env")
            .to_owned()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let program = compose_program();
        let _ = std::process::Command::new(&program[0])
            .args(&program[1..])
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(self.deploy.join("docker-compose.yml"))
            .args(["down", "-v", "--remove-orphans", "--timeout", "20"])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// --- the images -----------------------------------------------------------------------

/// The `ultrasync` binary the images carry: this test's own build (the code under
/// test, debug info stripped by `scripts/compose-images.sh`), or `ULTRASYNC_IMAGE_BIN`.
fn ultrasync_binary() -> PathBuf {
    std::env::var_os("ULTRASYNC_IMAGE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_ultrasync")),
        PathBuf::from,
    )
}

fn build_images(engine: &Engine) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let nats = std::env::var("ULTRASYNC_NATS_SERVER_BIN")
        .unwrap_or_else(|_| root.join(".tools/bin/nats-server").display().to_string());
    let out = run_checked(
        std::process::Command::new(root.join("scripts/compose-images.sh"))
            .arg("--ultrasync-bin")
            .arg(ultrasync_binary())
            .args(["--nats-bin", &nats, "--tag", "test"])
            .env("DOCKER_HOST", &engine.host)
            .stderr(Stdio::inherit()),
        "scripts/compose-images.sh",
    );
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

// --- clients ----------------------------------------------------------------------------

async fn connect(
    port: u16,
    token: &str,
    project: &str,
    client_id: &str,
    follow: bool,
) -> anyhow::Result<Connection> {
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let mut conn = Connection::connect(&url, token).await?;
    let cursors: BTreeMap<String, Option<u64>> = if follow {
        [("index".to_owned(), Some(0))].into()
    } else {
        BTreeMap::new()
    };
    conn.hello(ORG, project, client_id, cursors).await?;
    Ok(conn)
}

/// Sends one command and waits for its answer.
async fn write(conn: &mut Connection, id: &str, key: &str, value: Value) -> anyhow::Result<u64> {
    conn.command(id, "index", key, OpType::Set, value).await?;
    let seen = recv_until(conn, ANSWER_WAIT, |m| {
        matches!(m, ServerMessage::Ack { command_id, .. } | ServerMessage::Reject { command_id, .. } if command_id == id)
    })
    .await?;
    match seen.last() {
        Some(ServerMessage::Ack { server_seq, .. }) => Ok(*server_seq),
        other => anyhow::bail!("command {id} answered {other:?}"),
    }
}

/// An acked write: what must survive.
#[derive(Debug, Clone)]
struct Acked {
    project: String,
    key: String,
    value: u64,
    seq: u64,
}

struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<Vec<Acked>>>,
    count: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `writers` clients, alternating between the two gateways, each in its own project
/// (so its own stream key and sequencer partition), writing a new key per command
/// one after the other. A command without an answer (its gateway lost NATS, its
/// sequencer died) is sent again with the same id on a new connection; only acks
/// are recorded.
fn start_load(ports: Ports, token: &str, writers: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let port = if w % 2 == 0 {
            ports.gateway_1
        } else {
            ports.gateway_2
        };
        let (stop, acked, count, token) =
            (stop.clone(), acked.clone(), count.clone(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            let project = format!("load{w}");
            let mut conn: Option<Connection> = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (id, key) = (format!("w{w}-{i}"), format!("k{i}"));
                for _attempt in 0..10 {
                    if conn.is_none() {
                        match connect(port, &token, &project, &format!("writer-{w}"), false).await {
                            Ok(c) => conn = Some(c),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                continue;
                            }
                        }
                    }
                    let c = conn.as_mut().expect("connection");
                    match write(c, &id, &key, json!(i)).await {
                        Ok(seq) => {
                            acked.lock().expect("acked").push(Acked {
                                project: project.clone(),
                                key: key.clone(),
                                value: i,
                                seq,
                            });
                            count.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(_) => conn = None,
                    }
                }
                i += 1;
            }
        }));
    }
    Load {
        stop,
        acked,
        count,
        tasks,
    }
}

impl Load {
    /// Waits until `n` more writes were acked than now.
    async fn wait_more(&self, n: usize, what: &str) {
        let target = self.count.load(Ordering::Relaxed) + n;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while self.count.load(Ordering::Relaxed) < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: fewer than {n} writes acked in 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer");
        }
        self.acked.lock().expect("acked").clone()
    }
}

/// Every acked write is in the materialized state served by the gateway on `port`
/// (waiting for the materializers to catch up with the highest acked seq), and no two
/// acks of a stream key share a server_seq.
async fn check_acked_present(port: u16, token: &str, acked: &[Acked]) {
    let mut by_project: BTreeMap<&str, Vec<&Acked>> = BTreeMap::new();
    for a in acked {
        by_project.entry(a.project.as_str()).or_default().push(a);
    }
    for (project, writes) in by_project {
        let seqs: BTreeSet<u64> = writes.iter().map(|a| a.seq).collect();
        assert_eq!(
            seqs.len(),
            writes.len(),
            "{project}: two acks share a server_seq"
        );
        let head = *seqs.last().expect("writes");
        let url = format!("http://127.0.0.1:{port}/v1/{ORG}/{project}/index/snapshot");
        let auth = format!("Bearer {token}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let state = loop {
            let answer = http_request("GET", &url, &[("Authorization", &auth)], "").await;
            if let Ok((200, body)) = &answer {
                let v: Value = serde_json::from_str(body).expect("snapshot json");
                if v["last_server_seq"].as_u64().unwrap_or(0) >= head {
                    break v["state"].clone();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{project}: the snapshot did not reach server_seq {head}: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        for a in writes {
            assert_eq!(
                state[&a.key]["value"],
                json!(a.value),
                "{project}/{}: acked at server_seq {} but not in the state",
                a.key,
                a.seq
            );
        }
    }
}

// --- the test ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_compose_stack_runs_survives_kills_and_keeps_its_data() {
    let engine = Engine::start();
    let images = build_images(&engine);
    let project = Project::new(&engine, &images);

    project.run(&["up", "-d", "--no-build"]).await;
    project.wait_healthy().await;
    let token = token_for(&project.jwt_secret(), "compose-tester", "read write");
    let ports = project.ports;

    // A write through each gateway is acked; the other gateway's follower gets it.
    for (from, to) in [
        (ports.gateway_1, ports.gateway_2),
        (ports.gateway_2, ports.gateway_1),
    ] {
        let mut follower = connect(to, &token, "fanout", &format!("follower-{to}"), true)
            .await
            .expect("follower");
        recv_until(&mut follower, ANSWER_WAIT, |m| {
            matches!(m, ServerMessage::Synced { .. })
        })
        .await
        .expect("follower synced");
        let mut writer = connect(from, &token, "fanout", &format!("writer-{from}"), false)
            .await
            .expect("writer");
        let key = format!("from-{from}");
        let seq = write(&mut writer, &format!("c-{from}"), &key, json!(from))
            .await
            .expect("write acked");
        recv_until(&mut follower, ANSWER_WAIT, |m| {
            matches!(m, ServerMessage::Ops { ops, .. } if ops.iter().any(|o| o.server_seq == seq && o.key == key))
        })
        .await
        .expect("the other gateway's follower received the op");
    }

    // The streams are R3 on the three nodes (as admin, from inside the network).
    let streams: Value = serde_json::from_str(
        &project
            .run(&[
                "run",
                "--rm",
                "-T",
                "--no-deps",
                "setup",
                "inspect",
                "streams",
            ])
            .await,
    )
    .expect("inspect streams json");
    for resource in [
        "USYNC_CMDS",
        "USYNC_OPS",
        "usync-cursors",
        "usync-snapshots",
    ] {
        let r = &streams["resources"][resource];
        assert_eq!(r["replicas"], json!(3), "{resource}: {r}");
        let followers = r["cluster"]["followers"].as_array().map_or(0, Vec::len);
        assert_eq!(
            followers, 2,
            "{resource} has a leader and two followers: {r}"
        );
    }

    // Under load: kill -9 a NATS node, then a sequencer; both come back.
    let load = start_load(ports, &token, 4);
    load.wait_more(200, "before the kills").await;
    let nats_2 = project.container("nats-2").await;
    project.docker(&["kill", "--signal", "KILL", &nats_2]).await;
    load.wait_more(200, "with nats-2 killed").await;
    let sequencer_1 = project.container("sequencer-1").await;
    project
        .docker(&["kill", "--signal", "KILL", &sequencer_1])
        .await;
    load.wait_more(200, "with sequencer-1 killed").await;
    project.run(&["start", "nats-2", "sequencer-1"]).await;
    project.wait_healthy().await;
    load.wait_more(200, "after the restarts").await;
    let acked = load.finish().await;
    eprintln!("compose: {} writes acked under load and kills", acked.len());
    check_acked_present(ports.gateway_2, &token, &acked).await;

    // Down and up again (the volumes stay): the data is still there, and writing
    // goes on after it.
    let logs_before_down = project.run(&["logs", "--no-color"]).await;
    project.run(&["down", "--timeout", "20"]).await;
    project.run(&["up", "-d", "--no-build"]).await;
    project.wait_healthy().await;
    check_acked_present(ports.gateway_1, &token, &acked).await;
    let last = acked
        .iter()
        .filter(|a| a.project == "load0")
        .map(|a| a.seq)
        .max()
        .expect("load0 writes");
    let mut writer = connect(ports.gateway_1, &token, "load0", "after-restart", false)
        .await
        .expect("connect after up");
    let seq = write(&mut writer, "after-up", "after-up", json!(true))
        .await
        .expect("write after up");
    assert!(
        seq > last,
        "a write after down/up got server_seq {seq} <= {last}"
    );

    // No container logged a secret: start-up, kills, reconnects, restarts.
    let logs = logs_before_down + &project.run(&["logs", "--no-color"]).await;
    assert!(
        logs.len() > 1000,
        "the services logged almost nothing: {logs}"
    );
    for secret in project.secrets() {
        assert!(
            !logs.contains(&secret),
            "a secret value of deploy/env appears in the containers' logs"
        );
    }
}
