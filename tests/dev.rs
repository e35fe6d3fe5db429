//! `ultrasync dev` as a user runs it: the real binary, a managed nats-server, Ctrl-C /
//! SIGTERM, and a second start that serves what the first one stored.

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
