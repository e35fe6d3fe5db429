//! `ultrasync dev` as a user runs it: the real binary, a managed nats-server, Ctrl-C /
//! SIGTERM, and a second start that serves what the first one stored; and `ultrasync
//! serve`, the same services in one process against a nats-server of its own.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use ultrasync_client::{Connection, OpType, ServerMessage};

struct Dev {
    child: Child,
    log: std::path::PathBuf,
    ws: String,
    http: String,
    nats: String,
    token: String,
}

impl Drop for Dev {
    /// SIGTERM first, so `ultrasync dev` stops its nats-server; SIGKILL only if it hangs.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev(dir: &Path) -> Dev {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args(["dev", "--nats-port", "0", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env_remove("ULTRASYNC_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("dev-stderr.log")).expect("log file"))
        .spawn()
        .expect("start ultrasync dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut ws, mut http, mut nats, mut token) = (None, None, None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while token.is_none() && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["WebSocket", url, ..] => ws = Some((*url).to_owned()),
            ["HTTP", url, ..] => http = Some((*url).to_owned()),
            ["NATS", url, ..] => nats = Some((*url).to_owned()),
            ["dev", "token", t, ..] => token = Some((*t).to_owned()),
            _ => {}
        }
    }
    // Keep draining stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Dev {
        child,
        log: dir.join("dev-stderr.log"),
        ws: ws.expect("WebSocket URL printed"),
        http: http.expect("HTTP URL printed"),
        nats: nats.expect("NATS URL printed"),
        token: token.expect("dev token printed"),
    }
}

fn stop_dev(dev: &mut Dev) {
    kill(Pid::from_raw(dev.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = dev.child.try_wait().expect("wait") {
            let log = std::fs::read_to_string(&dev.log).unwrap_or_default();
            assert!(
                status.success(),
                "ultrasync dev exited with {status}; its log:\n{log}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ultrasync dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_everything_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut dev = start_dev(dir.path());
    assert!(dev.ws.starts_with("ws://127.0.0.1:") && dev.ws.ends_with("/v1/sync"));
    let (status, _) = ultrasync_testkit::http_get(&format!("{}/readyz", dev.http))
        .await
        .expect("readyz");
    assert_eq!(status, 200);

    let mut conn = Connection::connect(&dev.ws, &dev.token)
        .await
        .expect("connect with the printed token");
    conn.hello("dev", "demo", "term-1", BTreeMap::new())
        .await
        .expect("hello");
    for i in 0..10 {
        conn.command(
            &format!("c{i}"),
            "index",
            "greeting",
            OpType::Set,
            json!(format!("hello {i}")),
        )
        .await
        .expect("send");
    }
    let mut acked = Vec::new();
    while acked.len() < 10 {
        if let ServerMessage::Ack { op, .. } = conn
            .recv_timeout(Duration::from_secs(20))
            .await
            .expect("ack")
        {
            acked.push(op);
        }
    }
    conn.close().await;
    let nats_addr = dev.nats.trim_start_matches("nats://").to_owned();
    stop_dev(&mut dev);
    // The managed nats-server went down with it.
    assert!(
        std::net::TcpStream::connect(&nats_addr).is_err(),
        "nats-server still running after SIGTERM"
    );
    assert!(
        dir.path().join(".ultrasync/nats").is_dir(),
        "store not under ./.ultrasync/"
    );

    // Second start: same data, same dev secret (the old token still works).
    let dev2 = start_dev(dir.path());
    let mut conn = Connection::connect(&dev2.ws, &dev.token)
        .await
        .expect("old token still valid");
    conn.hello(
        "dev",
        "demo",
        "term-2",
        BTreeMap::from([("index".to_owned(), Some(0))]),
    )
    .await
    .expect("hello");
    let mut got = Vec::new();
    loop {
        match conn
            .recv_timeout(Duration::from_secs(20))
            .await
            .expect("frame")
        {
            ServerMessage::Ops { ops, .. } => got.extend(ops),
            ServerMessage::Synced { server_seq, .. } => {
                assert_eq!(server_seq, 10);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    acked.sort_by_key(|o| o.server_seq);
    assert_eq!(
        got, acked,
        "ops acked before the restart are not served after it"
    );
    let mut dev2 = dev2;
    stop_dev(&mut dev2);
}

/// `ultrasync serve` against a nats-server it does not manage: the gateway acks
/// writes (the sequencer runs), a read waits for the materializer, the compactor
/// makes passes, SIGTERM stops everything cleanly; and a service that fails to
/// start takes the process down with an error instead of running on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_every_service_in_one_process() {
    let nats = ultrasync_testkit::NatsServer::start();
    let dir = tempfile::tempdir().expect("tmp");
    let secret = ultrasync_testkit::random_secret();
    let compactor_metrics = ultrasync_shared::natsd::free_ports(1).expect("port")[0];
    let config = dir.path().join("ultrasync.toml");
    std::fs::write(
        &config,
        format!(
            "[compactor]\ninterval_secs = 1\nmetrics_listen = \"127.0.0.1:{compactor_metrics}\"\n"
        ),
    )
    .expect("config");
    let env = vec![
        ("ULTRASYNC_JWT_SECRET".to_owned(), secret.clone()),
        (
            "ULTRASYNC_CONFIG".to_owned(),
            config.to_string_lossy().into_owned(),
        ),
    ];
    let bin = Path::new(env!("CARGO_BIN_EXE_ultrasync"));
    let state = dir.path().join("state");
    let mut serve = ultrasync_testkit::GatewayProcess::start_as(
        bin,
        "serve",
        &["--data-dir", &state.to_string_lossy()],
        nats.url(),
        &env,
    )
    .await;

    let token = ultrasync_testkit::token_for(&secret, "ana", "read write");
    let mut conn = Connection::connect(&serve.ws_url(), &token)
        .await
        .expect("connect");
    conn.hello("acme", "web", "c1", BTreeMap::new())
        .await
        .expect("hello");
    conn.command("c1", "index", "greeting", OpType::Set, json!("hello"))
        .await
        .expect("send");
    let seq = loop {
        if let ServerMessage::Ack { op, .. } = conn
            .recv_timeout(Duration::from_secs(20))
            .await
            .expect("ack")
        {
            break op.server_seq;
        }
    };
    conn.close().await;
    let auth = format!("Bearer {token}");
    // The gateway may take requests before the materializer subscribed to reads:
    // those are answered 503 "retry later", as a client is told to.
    let read_url = format!(
        "http://{}/v1/acme/web/index/keys/greeting?min_seq={seq}",
        serve.addr
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = loop {
        let read =
            ultrasync_testkit::http_exchange("GET", &read_url, &[("Authorization", &auth)], "")
                .await
                .expect("read");
        if read.status != 503 || Instant::now() > deadline {
            break read;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(read.status, 200, "{}", read.body);
    let value: serde_json::Value = serde_json::from_str(&read.body).expect("json");
    assert_eq!(value["value"], json!("hello"), "{value}");
    let passes = async {
        loop {
            let url = format!("http://127.0.0.1:{compactor_metrics}/metrics");
            if let Ok((200, body)) = ultrasync_testkit::http_get(&url).await
                && body.lines().any(|l| {
                    l.strip_prefix("ultrasync_compactor_passes_total ")
                        .and_then(|n| n.trim().parse::<f64>().ok())
                        .is_some_and(|n| n >= 1.0)
                })
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), passes)
        .await
        .expect("the compactor made no pass");
    let status = serve
        .process
        .terminate(Duration::from_secs(30))
        .expect("serve did not stop on SIGTERM");
    assert!(status.success(), "serve exited with {status}");

    // The materializer cannot open its state (a file where its folder goes).
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, "not a folder").expect("file");
    let mut failing = ultrasync_testkit::ServiceProcess::spawn_with_env(
        bin,
        "serve",
        nats.url(),
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &blocked.to_string_lossy(),
        ],
        &env,
    );
    let status = failing
        .wait_exit(Duration::from_secs(60))
        .expect("serve ran on without its materializer");
    assert!(!status.success(), "serve exited with {status}");
}
