//! Resumable bootstrap of a 200,000-key namespace: WebSocket snapshot frames carry a
//! checkpoint that `hello` sends back after the socket is killed mid-snapshot; the
//! HTTP snapshot streams NDJSON lines with checkpoints and `?checkpoint=` continues
//! a cut stream; the SDK resumes by itself through a proxy that cuts its connections;
//! every path ends at the same state and digest. A checkpoint naming a replaced
//! snapshot is answered `stale_base` and the client starts over cleanly; a forged or
//! foreign one is refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use ultrasync_client::sync::{Change, SyncClient, SyncOptions};
use ultrasync_client::{ClientMessage, Connection, ServerMessage};
use ultrasync_shared::nats::SNAPSHOTS_BUCKET;
use ultrasync_shared::protocol::KeyState;
use ultrasync_shared::state::{self, KeyEntry, NamespaceState};
use ultrasync_shared::{ErrorCode, StreamKey, reads};
use ultrasync_testkit::{Stack, StackOptions};

const KEYS: usize = 200_000;
const BATCH: usize = 1000;
const WRITERS: usize = 4;
const WAIT: Duration = Duration::from_secs(120);

fn key() -> StreamKey {
    StreamKey::parse("acme", "web", "index").expect("key")
}

/// Writes keys `from..to` (`k000000`…) in `POST …/commands` batches from a few
/// writers at once.
async fn write_keys(stack: &Stack, token: &str, from: usize, to: usize) {
    let next = AtomicUsize::new(from);
    let writer = |w: usize| {
        let next = &next;
        async move {
            loop {
                let start = next.fetch_add(BATCH, Ordering::SeqCst);
                if start >= to {
                    return;
                }
                let commands: Vec<Value> = (start..to.min(start + BATCH))
                    .map(|i| {
                        json!({"command_id": format!("c{i}"), "key": format!("k{i:06}"),
                               "op_type": "set", "payload": {"i": i}})
                    })
                    .collect();
                let body = json!({"client_id": format!("loader-{w}"), "commands": commands});
                let r = stack
                    .http(
                        "POST",
                        "/v1/acme/web/index/commands",
                        token,
                        &body.to_string(),
                    )
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
                let answer: Value = serde_json::from_str(&r.body).expect("json");
                for result in answer["results"].as_array().expect("results") {
                    assert_eq!(result["type"], "ack", "{result}");
                }
            }
        }
    };
    futures::future::join_all((0..WRITERS).map(writer)).await;
}

/// Asks a materializer to store a snapshot at `at_least` or later.
async fn store_snapshot(stack: &Stack, at_least: u64) -> u64 {
    let js = stack.jetstream().await;
    let store = js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .expect("snapshot store");
    let nc = stack.nats_client().await;
    let s = reads::stored_snapshot(&nc, &store, &key(), Some(at_least))
        .await
        .expect("stored snapshot")
        .expect("a snapshot");
    s.state.last_seq
}

/// What a client has of a snapshot: its seq, digest, keys and last checkpoint.
#[derive(Default)]
struct Received {
    last_server_seq: u64,
    digest: String,
    keys: BTreeMap<String, KeyEntry>,
    checkpoint: Option<String>,
    frames: usize,
    /// Bytes of state received (JSON), about what a whole transfer carries.
    bytes: usize,
    done: bool,
}

impl Received {
    /// Takes one `snapshot` frame (or NDJSON line); a frame continuing a transfer must
    /// be of the same snapshot and carry only keys after those already received.
    fn take(
        &mut self,
        seq: u64,
        digest: String,
        part: BTreeMap<String, KeyState>,
        more: bool,
        cp: Option<String>,
    ) {
        if self.frames > 0 {
            assert_eq!(
                (seq, &digest),
                (self.last_server_seq, &self.digest),
                "another snapshot"
            );
            if let (Some(last), Some(first)) = (self.keys.keys().next_back(), part.keys().next()) {
                assert!(
                    first > last,
                    "key {first} again after {last}: not continued"
                );
            }
        }
        self.last_server_seq = seq;
        self.digest = digest;
        self.bytes += serde_json::to_vec(&part).map_or(0, |v| v.len());
        for (k, ks) in part {
            self.keys.insert(
                k,
                KeyEntry {
                    value: ks.value,
                    version: ks.version,
                    doc: None,
                },
            );
        }
        self.checkpoint = cp;
        self.frames += 1;
        self.done = !more;
    }

    fn state(&self) -> NamespaceState {
        NamespaceState {
            last_seq: self.last_server_seq,
            keys: self.keys.clone(),
        }
    }
}

/// Receives `snapshot` frames of `index` into `r`: `limit` of them, or to the end.
async fn recv_frames(conn: &mut Connection, r: &mut Received, limit: Option<usize>) {
    let mut n = 0;
    while !r.done && limit.is_none_or(|l| n < l) {
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Snapshot {
                last_server_seq,
                state,
                digest,
                more,
                checkpoint,
                ..
            } => {
                r.take(last_server_seq, digest, state, more, checkpoint);
                n += 1;
            }
            ServerMessage::Error { code, message } => panic!("{code}: {message}"),
            _ => {}
        }
    }
}

async fn connect(stack: &Stack, checkpoint: Option<&str>) -> Connection {
    let mut c = Connection::connect(&stack.ws_url(), &stack.token("reader", "read"))
        .await
        .expect("connect");
    let cursors = BTreeMap::from([("index".to_owned(), None)]);
    let checkpoints = checkpoint
        .map(|cp| BTreeMap::from([("index".to_owned(), cp.to_owned())]))
        .unwrap_or_default();
    c.hello_resuming("acme", "web", "reader-1", cursors, checkpoints)
        .await
        .expect("hello");
    c
}

/// A streamed `GET …/snapshot` over a raw connection: status, and the body's lines
/// as they arrive (chunked transfer decoded), at most `limit`; the connection is
/// dropped after that (a cut stream).
async fn http_lines(stack: &Stack, query: &str, limit: Option<usize>) -> (u16, Vec<String>) {
    let mut tcp = TcpStream::connect(stack.http).await.expect("connect");
    let req = format!(
        "GET /v1/acme/web/index/snapshot{query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/x-ndjson\r\nConnection: close\r\n\r\n",
        stack.http,
        stack.token("reader", "read")
    );
    tcp.write_all(req.as_bytes()).await.expect("request");
    let mut rd = BufReader::new(tcp);
    let mut line = String::new();
    rd.read_line(&mut line).await.expect("status");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut chunked = false;
    loop {
        line.clear();
        rd.read_line(&mut line).await.expect("header");
        if line == "\r\n" {
            break;
        }
        chunked |= line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    let mut body = Vec::new();
    let mut lines = Vec::new();
    loop {
        if !chunked {
            rd.read_to_end(&mut body).await.expect("body");
            lines.push(String::from_utf8_lossy(&body).into_owned());
            return (status, lines);
        }
        line.clear();
        rd.read_line(&mut line).await.expect("chunk size");
        let size = usize::from_str_radix(line.trim(), 16).expect("chunk size");
        if size == 0 {
            return (status, lines);
        }
        let mut chunk = vec![0; size + 2];
        rd.read_exact(&mut chunk).await.expect("chunk");
        body.extend_from_slice(&chunk[..size]);
        while let Some(end) = body.iter().position(|b| *b == b'\n') {
            let rest = body.split_off(end + 1);
            lines.push(String::from_utf8_lossy(&body[..end]).into_owned());
            body = rest;
            if limit.is_some_and(|l| lines.len() >= l) {
                return (status, lines);
            }
        }
    }
}

fn take_line(r: &mut Received, line: &str) {
    match serde_json::from_str::<ServerMessage>(line).expect("a snapshot line") {
        ServerMessage::Snapshot {
            last_server_seq,
            state,
            digest,
            more,
            checkpoint,
            ..
        } => r.take(last_server_seq, digest, state, more, checkpoint),
        other => panic!("not a snapshot frame: {other:?}"),
    }
}

/// A loopback proxy to the gateway that cuts each of its first `cuts` connections
/// once `cut_after` bytes went to the client; counts every byte it sends the client.
async fn cutting_proxy(
    upstream: std::net::SocketAddr,
    cuts: usize,
    cut_after: u64,
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let down = Arc::new(AtomicU64::new(0));
    let counted = down.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((client, _)) = listener.accept().await {
            n += 1;
            let limit = (n <= cuts).then_some(cut_after);
            let down = counted.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut sent = 0u64;
                let mut buf = vec![0; 64 * 1024];
                while let Ok(k) = sr.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    let k = match limit {
                        Some(l) => (k as u64).min(l - sent) as usize,
                        None => k,
                    };
                    if cw.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                    sent += k as u64;
                    down.fetch_add(k as u64, Ordering::SeqCst);
                    if limit.is_some_and(|l| sent >= l) {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    (addr, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_key_bootstrap_resumes_after_cuts_to_the_same_digest() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            // Snapshots only when the test asks for them.
            c.materializer.snapshot_every_ops = 10_000_000;
            c.materializer.snapshot_interval_secs = 3600;
            // The loader writes as fast as the pipeline takes it.
            c.gateway.max_commands_per_sec_per_actor = 1_000_000;
        },
        ..Default::default()
    })
    .await;
    let token = stack.token("loader", "read write");
    let started = std::time::Instant::now();
    write_keys(&stack, &token, 0, KEYS).await;
    let seq = store_snapshot(&stack, KEYS as u64).await;
    assert_eq!(seq, KEYS as u64);
    eprintln!(
        "wrote and snapshotted {KEYS} keys in {:?}",
        started.elapsed()
    );
    let nc = stack.nats_client().await;
    let live = reads::digest(&nc, &key(), Some(seq)).await.expect("digest");

    // WebSocket: the socket is killed three times mid-snapshot; each new socket
    // continues from the last frame's checkpoint.
    let started = std::time::Instant::now();
    let mut ws = Received::default();
    let mut conn = connect(&stack, None).await;
    for _ in 0..3 {
        recv_frames(&mut conn, &mut ws, Some(2)).await;
        assert!(!ws.done, "the snapshot is smaller than expected");
        drop(conn);
        conn = connect(&stack, ws.checkpoint.as_deref()).await;
    }
    recv_frames(&mut conn, &mut ws, None).await;
    drop(conn);
    assert_eq!(ws.keys.len(), KEYS);
    assert_eq!(ws.last_server_seq, seq);
    assert_eq!(state::digest(&ws.state()), ws.digest);
    assert_eq!(ws.digest, live.digest);
    let mid_checkpoint = ws.checkpoint.clone().expect("checkpoint");
    eprintln!("websocket: {} frames in {:?}", ws.frames, started.elapsed());

    // HTTP: the NDJSON stream is cut three times; `?checkpoint=` continues it.
    let started = std::time::Instant::now();
    let mut http = Received::default();
    let (status, lines) = http_lines(&stack, "", Some(2)).await;
    assert_eq!(status, 200);
    for l in &lines {
        take_line(&mut http, l);
    }
    for cut in 0..3 {
        let cp = http.checkpoint.clone().expect("checkpoint");
        let limit = (cut < 2).then_some(2);
        let (status, lines) = http_lines(&stack, &format!("?checkpoint={cp}"), limit).await;
        assert_eq!(status, 200);
        for l in &lines {
            take_line(&mut http, l);
        }
    }
    assert!(http.done);
    assert_eq!(http.keys, ws.keys);
    assert_eq!(state::digest(&http.state()), live.digest);
    eprintln!("http: {} lines in {:?}", http.frames, started.elapsed());
    // The one-object form (older clients) streams the same state.
    let r = stack.get("/v1/acme/web/index/snapshot", &token).await;
    assert_eq!(r.status, 200);
    let whole: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(whole["digest"], json!(live.digest));
    assert_eq!(whole["state"].as_object().map(|m| m.len()), Some(KEYS));

    // Forged and foreign checkpoints are refused before anything is read.
    let (status, _) = http_lines(&stack, "?checkpoint=v1.bm9uc2Vuc2U", None).await;
    assert_eq!(status, 400);
    let r = stack
        .get(
            &format!("/v1/acme/web/metadata/snapshot?checkpoint={mid_checkpoint}"),
            &token,
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let (status, _) = http_lines(&stack, &format!("?checkpoint={}", "A".repeat(5000)), None).await;
    assert_eq!(status, 400);

    // The SDK, through a proxy that cuts its first three connections a quarter of
    // the way through: it resumes by itself and ends at the same state.
    let started = std::time::Instant::now();
    let full = ws.bytes as u64;
    let cut = full / 4;
    let (proxy, down) = cutting_proxy(stack.http, 3, cut).await;
    let dir = tempfile::tempdir().expect("tmp");
    let sdk = SyncClient::start(SyncOptions {
        url: format!("ws://{proxy}/v1/sync"),
        token: stack.token("reader", "read"),
        org: "acme".into(),
        project: "web".into(),
        client_id: "sdk-1".into(),
        namespaces: vec!["index".into()],
        store: dir.path().join("replica"),
        ca_file: None,
    })
    .expect("start");
    let mut changes = sdk.changes();
    let mut disconnects = 0;
    loop {
        match tokio::time::timeout(WAIT, changes.recv()).await {
            Ok(Ok(Change::Synced { .. })) => break,
            Ok(Ok(Change::Disconnected { .. })) => disconnects += 1,
            Ok(Ok(_)) => {}
            other => panic!("no sync: {other:?}"),
        }
    }
    let confirmed = sdk.confirmed("index").expect("index");
    assert_eq!(confirmed.keys.len(), KEYS);
    assert_eq!(state::digest(&confirmed), live.digest);
    assert!(disconnects >= 3, "{disconnects} disconnects");
    let sent = down.load(Ordering::SeqCst);
    eprintln!(
        "sdk: {sent} bytes over {disconnects} cuts in {:?}",
        started.elapsed()
    );
    // Starting over after each cut would take the three cut connections' bytes
    // plus a whole transfer; continuing loses at most a frame in flight per cut.
    assert!(
        sent < 3 * cut + full,
        "{sent} bytes for a {full}-byte snapshot: not continued"
    );
    sdk.close().await;

    // The snapshot is replaced by a newer one: the old checkpoint is stale_base,
    // and starting over gives the new state.
    write_keys(&stack, &token, KEYS, KEYS + 10).await;
    let newer = store_snapshot(&stack, KEYS as u64 + 10).await;
    let mut conn = connect(&stack, Some(&mid_checkpoint)).await;
    loop {
        match conn.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Error { code, .. } => {
                assert_eq!(code, ErrorCode::StaleBase);
                break;
            }
            ServerMessage::Snapshot { .. } => panic!("a replaced snapshot was continued"),
            _ => {}
        }
    }
    conn.send(&ClientMessage::Subscribe {
        namespace: "index".into(),
        last_server_seq: None,
        checkpoint: None,
    })
    .await
    .expect("subscribe");
    let mut again = Received::default();
    recv_frames(&mut conn, &mut again, None).await;
    assert_eq!(again.last_server_seq, newer);
    assert_eq!(again.keys.len(), KEYS + 10);
    let live = reads::digest(&nc, &key(), Some(newer))
        .await
        .expect("digest");
    assert_eq!(state::digest(&again.state()), live.digest);
    let (status, lines) = http_lines(&stack, &format!("?checkpoint={mid_checkpoint}"), None).await;
    assert_eq!(status, 410, "{lines:?}");
    assert!(lines.concat().contains("stale_base"), "{lines:?}");
    stack.shutdown().await;
}
