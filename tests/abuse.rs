//! One tenant cannot hurt another (SPEC invariant 9), tried as a hostile tenant would
//! with a valid token, against real processes: nats-server, `ultrasync gateway`,
//! `ultrasync sequencer` and `ultrasync materializer`, each its own process.
//!
//! The table below has one row per abuse. After every row the gateway's `/healthz`
//! answers 200, every process is still running, and a bystander in another org gets
//! its write acked within a multiple of the latency measured for it before any row
//! ran (a baseline of the same run, not an absolute time).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use ultrasync_client::{ClientError, Connection};
use ultrasync_shared::auth;
use ultrasync_shared::protocol::{ClientMessage, ServerMessage};
use ultrasync_shared::{ErrorCode, OpType};
use ultrasync_testkit::{GatewayProcess, NatsServer, ServiceProcess, http_exchange, rss_kib};

const ORG: &str = "acme";
/// The bystander's org: none of the rows touch it.
const OTHER_ORG: &str = "bystander";

/// The limits the rows run into, small so each row is quick.
const CONFIG: &str = r#"
[gateway]
max_sockets_per_actor = 8
max_sockets_per_org = 40
max_commands_per_sec_per_actor = 200
max_requests_per_sec_per_org = 100
max_followed_keys_per_org = 6
max_subscriptions_per_socket = 3
max_outbound_bytes = 2097152
max_messages_per_sec = 500
header_read_timeout_secs = 2
request_timeout_secs = 20
presence_keys_per_client = 4
org_max_inflight_commands = 300
max_clients_per_actor = 20
automerge_docs_per_socket = 32
automerge_docs_per_org = 64

[materializer]
snapshot_every_ops = 50
snapshot_interval_secs = 1

[[namespaces]]
name = "todos"
mode = "lww"
schema = { type = "object", required = ["title"] }
"#;

struct Hub {
    /// Kept for its lifetime: dropping it stops nats-server.
    _nats: NatsServer,
    gateway: GatewayProcess,
    sequencer: ServiceProcess,
    materializer: ServiceProcess,
    secret: String,
    _dir: tempfile::TempDir,
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ultrasync"))
}

impl Hub {
    async fn start() -> Self {
        ultrasync_testkit::init_tracing();
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("ultrasync.toml");
        std::fs::write(&config, CONFIG).expect("config");
        let secret = ultrasync_testkit::random_secret();
        let env = vec![
            ("ULTRASYNC_JWT_SECRET".to_owned(), secret.clone()),
            (
                "ULTRASYNC_CONFIG".to_owned(),
                config.to_string_lossy().into_owned(),
            ),
        ];
        let gateway = GatewayProcess::start(bin(), nats.url(), &env).await;
        let sequencer = ServiceProcess::spawn_with_env(bin(), "sequencer", nats.url(), &[], &env);
        let data = dir.path().join("m0");
        let materializer = ServiceProcess::spawn_with_env(
            bin(),
            "materializer",
            nats.url(),
            &["--name", "m0", "--data-dir", &data.to_string_lossy()],
            &env,
        );
        Self {
            _nats: nats,
            gateway,
            sequencer,
            materializer,
            secret,
            _dir: dir,
        }
    }

    fn token_in(&self, org: &str, sub: &str, scope: &str) -> String {
        let claims = auth::claims(sub, org, &["*"], scope, 3600, auth::DEFAULT_AUDIENCE);
        auth::mint_hs256(self.secret.as_bytes(), &claims).expect("mint")
    }

    fn token(&self, sub: &str) -> String {
        self.token_in(ORG, sub, "read write")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    async fn http(&self, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Content-Type", "application/json")];
        if !token.is_empty() {
            headers.push(("Authorization", auth.as_str()));
        }
        let r = http_exchange(method, &self.url(path), &headers, body)
            .await
            .expect("http");
        let body = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body));
        (r.status, body)
    }

    async fn connect(&self, org: &str, sub: &str, client: &str) -> Connection {
        let mut c = Connection::connect(
            &self.gateway.ws_url(),
            &self.token_in(org, sub, "read write"),
        )
        .await
        .expect("connect");
        c.hello(org, "web", client, BTreeMap::new())
            .await
            .expect("hello");
        c
    }

    /// The bystander's write, acked: how long it took.
    async fn bystander_write(&self, n: usize) -> Duration {
        let mut c = self.connect(OTHER_ORG, "calm", &format!("calm-{n}")).await;
        let started = Instant::now();
        c.command(&format!("b-{n}"), "index", "k", OpType::Set, json!(n))
            .await
            .expect("send");
        loop {
            match c.recv_timeout(Duration::from_secs(20)).await {
                Ok(ServerMessage::Ack { .. }) => break,
                Ok(ServerMessage::Reject { code, reason, .. }) => {
                    panic!("the bystander's write was refused: {code:?} {reason}")
                }
                Ok(_) => {}
                Err(e) => panic!("the bystander's write got no ack: {e}"),
            }
        }
        let took = started.elapsed();
        c.close().await;
        took
    }

    /// After a row: everything up, and the bystander served as before.
    async fn check_unharmed(&mut self, row: &str, baseline: Duration, n: usize) {
        for (name, p) in [
            ("gateway", &mut self.gateway.process),
            ("sequencer", &mut self.sequencer),
            ("materializer", &mut self.materializer),
        ] {
            assert!(p.exited().is_none(), "{row}: the {name} exited");
        }
        let (status, _) = self.http("GET", "/healthz", "", "").await;
        assert_eq!(status, 200, "{row}: /healthz");
        // The best of three: one slow write on a busy 2-core machine is noise; three
        // slow ones are harm.
        let mut best = Duration::MAX;
        for i in 0..3 {
            best = best.min(self.bystander_write(n * 10 + i).await);
        }
        let allowed = baseline * 20 + Duration::from_millis(100).min(baseline * 50);
        assert!(
            best <= allowed,
            "{row}: the bystander's write took {best:?}, its baseline is {baseline:?}"
        );
    }
}

/// A raw WebSocket (binary frames, pings, a reader that never reads).
async fn raw_socket(
    hub: &Hub,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = hub.gateway.ws_url().into_client_request().expect("request");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("connect");
    ws
}

fn hello(org: &str, client: &str, cursors: BTreeMap<String, Option<u64>>) -> String {
    serde_json::to_string(&ClientMessage::Hello {
        protocol: ultrasync_shared::protocol::PROTOCOL_VERSION,
        org_id: org.to_owned(),
        project_id: "web".to_owned(),
        client_id: client.to_owned(),
        cursors,
        checkpoints: Default::default(),
    })
    .expect("hello")
}

/// Reads frames until the socket closes; the close code.
async fn closed_with(conn: &mut Connection, limit: Duration) -> (u16, Vec<ServerMessage>) {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv_timeout(left).await {
            Ok(m) => seen.push(m),
            Err(ClientError::Closed { code, .. }) => return (code, seen),
            Err(e) => panic!("expected a close, got {e} after {seen:?}"),
        }
    }
}

fn error_codes(frames: &[ServerMessage]) -> Vec<ErrorCode> {
    frames
        .iter()
        .filter_map(|f| match f {
            ServerMessage::Error { code, .. } | ServerMessage::Reject { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

/// The codes of the next `n` errors and rejects `conn` gets.
async fn next_codes(conn: &mut Connection, n: usize) -> Vec<ErrorCode> {
    let mut codes = Vec::new();
    while codes.len() < n {
        let m = conn
            .recv_timeout(Duration::from_secs(20))
            .await
            .expect("answer");
        codes.extend(error_codes(&[m]));
    }
    codes
}

/// Every row: a name and the abuse. Each asserts the documented answer itself.
const ROWS: &[&str] = &[
    "hello with 1,000 cursors",
    "1,000 subscribes to undeclared namespaces",
    "more subscriptions than a socket may hold",
    "one actor opens more sockets than its share",
    "an HTTP batch costs a token per command",
    "commands across sockets share the actor's rate",
    "binary frames and pings are rate limited",
    "a frame over the size limit",
    "commands to an undeclared namespace",
    "a slow reader of a large namespace",
    "slowloris: headers trickled line by line",
    "min_seq far above the head",
    "access_token in an HTTP URL",
    "/v1/status without admin, and of another org",
    "malformed query and path: the error envelope",
    "invalid ids, keys and messages",
    "a decompression bomb as an Automerge change",
    "a value nested 126 deep, then a snapshot round trip",
    "presence beyond the client's keys and payload bytes",
    "many actors of one org flood the command queue",
    "tokens: not yet valid, too long lived, no write scope",
    "conflicts, schema and stale cursors: their codes",
    "one actor invents client ids to pin the log",
    "automerge-repo: documents per socket, sockets x documents per org",
    "automerge-repo: huge and deep CBOR",
    "automerge-repo: sync messages with huge heads, bloom filters and change counts",
    "automerge-repo: an ephemeral flood at a peer that does not read",
    "many actors of one org flood HTTP reads",
    "one org follows more stream keys than its share",
    "one org resends old commands in bulk",
];

#[path = "support/amrepo.rs"]
mod amrepo;

/// An Automerge sync message (v1 layout) from its parts, as a hostile peer would
/// write it: `heads` and `need` counts of 32-byte hashes, `haves` as (last-sync
/// count, bloom bytes), then `changes` (declared count, bodies).
fn raw_sync(
    heads: u64,
    need: u64,
    haves: &[(u64, Vec<u8>)],
    changes: (u64, &[Vec<u8>]),
) -> Vec<u8> {
    fn uleb(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    let mut out = vec![0x42];
    for n in [heads, need] {
        uleb(&mut out, n);
        out.extend(std::iter::repeat_n(7u8, n as usize * 32));
    }
    uleb(&mut out, haves.len() as u64);
    for (last_sync, bloom) in haves {
        uleb(&mut out, *last_sync);
        out.extend(std::iter::repeat_n(9u8, *last_sync as usize * 32));
        uleb(&mut out, bloom.len() as u64);
        out.extend(bloom);
    }
    uleb(&mut out, changes.0);
    for c in changes.1 {
        uleb(&mut out, c.len() as u64);
        out.extend(c);
    }
    out
}

/// A bloom filter's bytes: entries, bits per entry, probes, then the bits.
fn bloom(entries: u64, bits: u64, probes: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for mut v in [entries, bits, probes] {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }
    out.extend(std::iter::repeat_n(0xa5u8, len));
    out
}

/// The automerge-repo endpoint of `org` for `sub`.
fn am_url(hub: &Hub, org: &str, sub: &str) -> String {
    amrepo::endpoint(
        &hub.gateway.addr.to_string(),
        org,
        "web",
        "collab",
        &hub.token_in(org, sub, "read write"),
    )
}

/// Subscribes `conn` to `namespace` from the start: the frame that ends it, `synced`
/// or an error.
async fn subscribe_from_start(conn: &mut Connection, namespace: &str) -> ServerMessage {
    conn.send(&ClientMessage::Subscribe {
        namespace: namespace.into(),
        last_server_seq: Some(0),
        checkpoint: None,
    })
    .await
    .expect("send");
    let frames = ultrasync_testkit::recv_until(conn, Duration::from_secs(20), |m| {
        matches!(
            m,
            ServerMessage::Synced { .. } | ServerMessage::Error { .. }
        )
    })
    .await
    .expect("frames");
    frames.into_iter().last().expect("a frame")
}

/// One counter of the gateway's `/metrics`.
async fn gateway_metric(hub: &Hub, name: &str) -> f64 {
    metric_on(hub, name)
        .await
        .unwrap_or_else(|| panic!("no {name} on /metrics"))
}

/// A counter of the gateway's `/metrics`, 0 before it first counts.
async fn gateway_metric_or_zero(hub: &Hub, name: &str) -> f64 {
    metric_on(hub, name).await.unwrap_or(0.0)
}

async fn metric_on(hub: &Hub, name: &str) -> Option<f64> {
    let r = http_exchange("GET", &hub.url("/metrics"), &[], "")
        .await
        .expect("metrics");
    r.body
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// A process stopped with SIGSTOP until this is dropped (SIGCONT).
struct Paused(nix::unistd::Pid);

impl Paused {
    fn stop(pid: u32) -> Self {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// `[v]` nested `depth` deep.
fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

/// Sends a command and waits for its answer: `Ok(server_seq)` or `Err(code)`.
async fn write(
    c: &mut Connection,
    id: &str,
    ns: &str,
    key: &str,
    op: OpType,
    payload: Value,
) -> Result<u64, ErrorCode> {
    c.command(id, ns, key, op, payload).await.expect("send");
    loop {
        let (command_id, answer) = next_answer(c).await;
        if command_id == id {
            return answer;
        }
    }
}

/// The next ack or reject `c` gets: its command id, and `Ok(server_seq)` or
/// `Err(code)`.
async fn next_answer(c: &mut Connection) -> (String, Result<u64, ErrorCode>) {
    loop {
        match c
            .recv_timeout(Duration::from_secs(20))
            .await
            .expect("answer")
        {
            ServerMessage::Ack {
                command_id,
                server_seq,
                ..
            } => return (command_id, Ok(server_seq)),
            ServerMessage::Reject {
                command_id, code, ..
            } => return (command_id, Err(code)),
            _ => {}
        }
    }
}

/// Sends commands `r{a}-0` to `r{a}-149` of actor `a` (values 0 to 149 on 20 keys of
/// `index`), sending again those refused for the actor's rate: their acks' server_seq
/// by command id.
async fn send_numbered(c: &mut Connection, a: usize) -> BTreeMap<String, u64> {
    let send = |i: usize| (format!("r{a}-{i}"), format!("k{}", i % 20), json!(i));
    for i in 0..150 {
        let (id, key, value) = send(i);
        c.command(&id, "index", &key, OpType::Set, value)
            .await
            .expect("send");
    }
    let mut acks = BTreeMap::new();
    while acks.len() < 150 {
        match next_answer(c).await {
            (command_id, Ok(server_seq)) => {
                acks.insert(command_id, server_seq);
            }
            (command_id, Err(ErrorCode::RateLimited)) => {
                // Over the actor's rate: sent again after a pause.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let i = command_id
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a numbered id");
                let (id, key, value) = send(i);
                c.command(&id, "index", &key, OpType::Set, value)
                    .await
                    .expect("send");
            }
            (command_id, Err(code)) => panic!("{command_id}: expected an ack, got {code:?}"),
        }
    }
    acks
}

async fn run_row(hub: &mut Hub, row: &str) {
    match row {
        "hello with 1,000 cursors" => {
            let mut c = Connection::connect(&hub.gateway.ws_url(), &hub.token("mallory"))
                .await
                .expect("connect");
            let cursors = (0..1000).map(|i| (format!("ns{i}"), Some(0))).collect();
            c.send_raw(&hello(ORG, "many", cursors))
                .await
                .expect("send");
            let (code, frames) = closed_with(&mut c, Duration::from_secs(10)).await;
            assert_eq!(code, 1008);
            assert_eq!(error_codes(&frames), vec![ErrorCode::RateLimited]);
        }
        "1,000 subscribes to undeclared namespaces" => {
            let mut c = hub.connect(ORG, "mallory", "subs").await;
            for i in 0..1000 {
                let frame = json!({"type": "subscribe", "namespace": format!("made-up-{i}"), "last_server_seq": 0});
                c.send_raw(&frame.to_string()).await.expect("send");
                // Stay under the frame rate.
                if i % 200 == 199 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            let mut unknown = 0;
            while unknown < 1000 {
                match c
                    .recv_timeout(Duration::from_secs(10))
                    .await
                    .expect("answer")
                {
                    ServerMessage::Error {
                        code: ErrorCode::UnknownNamespace,
                        ..
                    } => unknown += 1,
                    other => panic!("expected unknown_namespace, got {other:?}"),
                }
            }
            c.close().await;
        }
        "more subscriptions than a socket may hold" => {
            let mut c = hub.connect(ORG, "mallory", "cap").await;
            for ns in ["index", "settings", "metadata", "collab"] {
                c.send(&ClientMessage::Subscribe {
                    namespace: ns.into(),
                    last_server_seq: Some(0),
                    checkpoint: None,
                })
                .await
                .expect("send");
            }
            let frames = ultrasync_testkit::recv_until(&mut c, Duration::from_secs(10), |m| {
                matches!(m, ServerMessage::Error { .. })
            })
            .await
            .expect("frames");
            assert_eq!(error_codes(&frames), vec![ErrorCode::RateLimited]);
            // Unsubscribing makes room again.
            c.send(&ClientMessage::Unsubscribe {
                namespace: "index".into(),
            })
            .await
            .expect("send");
            c.send(&ClientMessage::Subscribe {
                namespace: "collab".into(),
                last_server_seq: Some(0),
                checkpoint: None,
            })
            .await
            .expect("send");
            ultrasync_testkit::recv_until(
                &mut c,
                Duration::from_secs(10),
                |m| matches!(m, ServerMessage::Synced { namespace, .. } if namespace == "collab"),
            )
            .await
            .expect("collab followed after an unsubscribe");
            c.close().await;
        }
        "one actor opens more sockets than its share" => {
            let token = hub.token("hog");
            let mut open = Vec::new();
            for _ in 0..8 {
                open.push(
                    Connection::connect(&hub.gateway.ws_url(), &token)
                        .await
                        .expect("within the share"),
                );
            }
            match Connection::connect(&hub.gateway.ws_url(), &token).await {
                Err(ClientError::Http(429)) => {}
                Err(e) => panic!("expected 429, got {e}"),
                Ok(_) => panic!("a ninth socket was accepted"),
            }
            // Another actor of the same org still connects.
            let other = Connection::connect(&hub.gateway.ws_url(), &hub.token("someone"))
                .await
                .expect("another actor");
            other.close().await;
            for c in open {
                c.close().await;
            }
            // Closed sockets give the share back.
            tokio::time::sleep(Duration::from_millis(300)).await;
            Connection::connect(&hub.gateway.ws_url(), &token)
                .await
                .expect("the share is back")
                .close()
                .await;
        }
        "an HTTP batch costs a token per command" => {
            let commands: Vec<Value> = (0..1000)
                .map(|i| json!({"command_id": format!("h{i}"), "key": "k", "op_type": "set", "payload": i}))
                .collect();
            let body = json!({"client_id": "batcher", "commands": commands}).to_string();
            let (status, answer) = hub
                .http(
                    "POST",
                    "/v1/acme/web/index/commands",
                    &hub.token("batcher"),
                    &body,
                )
                .await;
            assert_eq!(status, 429, "{answer}");
            assert_eq!(answer["error"]["code"], json!("rate_limited"));
        }
        "commands across sockets share the actor's rate" => {
            // 3 sockets of one actor, 300 commands each, as fast as they go: the
            // actor's budget (200/s, bursts of 400) refuses part of them.
            let mut sockets = Vec::new();
            for i in 0..3 {
                sockets.push(hub.connect(ORG, "sprinter", &format!("s{i}")).await);
            }
            let mut refused = 0;
            let mut acked = 0;
            for (i, c) in sockets.iter_mut().enumerate() {
                for j in 0..300 {
                    c.command(
                        &format!("c{i}-{j}"),
                        "index",
                        "sprint",
                        OpType::Set,
                        json!(j),
                    )
                    .await
                    .expect("send");
                }
            }
            for c in &mut sockets {
                let mut answered = 0;
                while answered < 300 {
                    match c
                        .recv_timeout(Duration::from_secs(20))
                        .await
                        .expect("answer")
                    {
                        ServerMessage::Ack { .. } => {
                            acked += 1;
                            answered += 1;
                        }
                        ServerMessage::Reject {
                            code: ErrorCode::RateLimited,
                            ..
                        } => {
                            refused += 1;
                            answered += 1;
                        }
                        ServerMessage::Reject { code, reason, .. } => panic!("{code:?}: {reason}"),
                        _ => {}
                    }
                }
            }
            assert!(
                refused > 0,
                "900 commands at once all passed an actor budget of 400"
            );
            assert!(acked >= 100, "only {acked} acked");
            for c in sockets {
                c.close().await;
            }
        }
        "binary frames and pings are rate limited" => {
            let mut ws = raw_socket(hub, &hub.token("pinger")).await;
            ws.send(Message::Text(hello(ORG, "pinger", BTreeMap::new()).into()))
                .await
                .expect("hello");
            let (mut sink, mut stream) = ws.split();
            // Flood while reading what comes back, as a client that reads would.
            let flood = tokio::spawn(async move {
                for i in 0..5000 {
                    let frame = match i % 2 {
                        0 => Message::Binary(vec![0u8; 16].into()),
                        _ => Message::Ping(vec![1u8; 4].into()),
                    };
                    if sink.send(frame).await.is_err() {
                        break;
                    }
                }
            });
            let mut code = None;
            let mut seen = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                    Ok(Some(Ok(Message::Close(f)))) => {
                        code = f.map(|f| u16::from(f.code));
                        break;
                    }
                    Ok(Some(Ok(m))) => {
                        if seen.len() < 3 {
                            seen.push(format!("{m:?}"));
                        }
                    }
                    other => {
                        seen.push(format!("{other:?}"));
                        break;
                    }
                }
            }
            flood.abort();
            assert_eq!(
                code,
                Some(1008),
                "a binary/ping flood was not closed: {seen:?}"
            );
        }
        "a frame over the size limit" => {
            let mut c = hub.connect(ORG, "mallory", "big").await;
            let payload = "x".repeat(2 << 20);
            let frame = json!({"type": "command", "command_id": "big", "namespace": "index", "key": "k", "op_type": "set", "payload": payload});
            let _ = c.send_raw(&frame.to_string()).await;
            let (code, frames) = closed_with(&mut c, Duration::from_secs(10)).await;
            assert_eq!(code, 1009);
            assert_eq!(error_codes(&frames), vec![ErrorCode::PayloadTooLarge]);
        }
        "commands to an undeclared namespace" => {
            let mut c = hub.connect(ORG, "mallory", "undeclared").await;
            c.command("u1", "nope", "k", OpType::Set, json!(1))
                .await
                .expect("send");
            let frames = ultrasync_testkit::recv_until(&mut c, Duration::from_secs(10), |m| {
                matches!(m, ServerMessage::Reject { .. })
            })
            .await
            .expect("reject");
            assert_eq!(error_codes(&frames), vec![ErrorCode::UnknownNamespace]);
            let (status, body) = hub
                .http(
                    "PUT",
                    "/v1/acme/web/nope/keys/k",
                    &hub.token("mallory"),
                    "1",
                )
                .await;
            assert_eq!(
                (status, body["error"]["code"].clone()),
                (404, json!("unknown_namespace"))
            );
        }
        "a slow reader of a large namespace" => {
            // ~48 MB in the log: 480 ops of 100 KB (over HTTP batches under the body
            // limit, by three writers within their actors' rates).
            let writers = [hub.token("bulk0"), hub.token("bulk1"), hub.token("bulk2")];
            let value = "v".repeat(100_000);
            for batch in 0..60 {
                let writer = &writers[batch % 3];
                let commands: Vec<Value> = (0..8)
                    .map(|i| json!({"command_id": format!("bulk-{batch}-{i}"), "key": format!("k{}", batch * 8 + i), "op_type": "set", "payload": value}))
                    .collect();
                let body = json!({"client_id": "bulk", "commands": commands}).to_string();
                let (status, answer) = hub
                    .http("POST", "/v1/acme/web/metadata/commands", writer, &body)
                    .await;
                assert_eq!(status, 200, "{answer}");
                assert!(
                    answer["results"]
                        .as_array()
                        .is_some_and(|r| r.iter().all(|r| r["type"] == json!("ack"))),
                    "{answer}"
                );
            }
            let pid = hub.gateway.process.pid();
            let before = rss_kib(pid);
            // Five readers ask for all of it and never read.
            let mut readers = Vec::new();
            for i in 0..5 {
                let mut ws = raw_socket(hub, &hub.token(&format!("sloth{i}"))).await;
                let cursors = BTreeMap::from([("metadata".to_owned(), Some(0))]);
                ws.send(Message::Text(
                    hello(ORG, &format!("sloth{i}"), cursors).into(),
                ))
                .await
                .expect("hello");
                readers.push(ws);
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            let grown = rss_kib(pid).saturating_sub(before);
            eprintln!("gateway RSS grew by {grown} KiB for 5 readers of a 48 MB namespace");
            // Without a byte bound each reader pins what it was sent and has not read,
            // up to the whole namespace (5 x 48 MB). With it, each holds its queue
            // (2 MiB here), a frame being written and a log read in hand, about 10 MB
            // with the allocator's slack, whatever the namespace's size.
            assert!(
                grown < 96 * 1024,
                "the gateway grew by {grown} KiB for 5 readers that do not read"
            );
            drop(readers);
        }
        "slowloris: headers trickled line by line" => {
            let mut tcp = tokio::net::TcpStream::connect(hub.gateway.addr)
                .await
                .expect("connect");
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
            let started = Instant::now();
            let mut cut = false;
            // The server's header deadline is 2 s; the trickle would last 20 s.
            for i in 0..20 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tcp
                    .write_all(format!("X-Trickle-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    cut = true;
                    break;
                }
                let mut buf = [0u8; 256];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(10), tcp.read(&mut buf)).await
                {
                    // EOF or the server's 408: either way it gave up on us.
                    let _ = n;
                    cut = true;
                    break;
                }
            }
            assert!(
                cut,
                "a trickling client was kept for {:?}",
                started.elapsed()
            );
        }
        "min_seq far above the head" => {
            let (status, body) = hub
                .http(
                    "GET",
                    "/v1/acme/web/index/keys/k?min_seq=1000000000",
                    &hub.token("mallory"),
                    "",
                )
                .await;
            // A 400 naming the head is the gateway's own answer: a request parked
            // for the materializer would end in 503 (its wait timing out) instead.
            assert_eq!(
                (status, body["error"]["code"].clone()),
                (400, json!("invalid_message"))
            );
        }
        "access_token in an HTTP URL" => {
            let token = hub.token("mallory");
            let (status, body) = hub
                .http(
                    "GET",
                    &format!("/v1/acme/web/index/ops?access_token={token}"),
                    "",
                    "",
                )
                .await;
            assert_eq!(
                (status, body["error"]["code"].clone()),
                (401, json!("unauthorized"))
            );
            // The WebSocket route takes it (browsers cannot set headers).
            let url = format!("{}?access_token={token}", hub.gateway.ws_url());
            let req = url.into_client_request().expect("request");
            tokio_tungstenite::connect_async(req)
                .await
                .expect("ws with a query token");
        }
        "/v1/status without admin, and of another org" => {
            let (status, body) = hub.http("GET", "/v1/status", "", "").await;
            assert_eq!(status, 200);
            assert!(
                body.get("stream_keys").is_none(),
                "anonymous status lists stream keys"
            );
            let (status, _) = hub
                .http("GET", "/v1/status", &hub.token("mallory"), "")
                .await;
            assert_eq!(status, 403);
            let admin = hub.token_in("intruder", "root", "read write admin");
            let (status, body) = hub.http("GET", "/v1/status", &admin, "").await;
            assert_eq!(status, 200);
            assert!(
                body["stream_keys"]
                    .as_array()
                    .expect("stream keys")
                    .iter()
                    .all(|k| k["stream_key"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("intruder/"))),
                "another org's stream keys shown: {body}"
            );
        }
        "malformed query and path: the error envelope" => {
            let token = hub.token("mallory");
            for path in [
                "/v1/acme/web/index/ops?since=-1",
                "/v1/acme/web/index/ops?limit=lots",
                "/v1/acme/web/index/keys/%FF%FE",
                "/v1/acme/web/index/nothing-here",
            ] {
                let (status, body) = hub.http("GET", path, &token, "").await;
                assert!((400..500).contains(&status), "{path}: {status}");
                assert!(
                    body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                    "{path}: not in the envelope: {body}"
                );
            }
            let (status, body) = hub
                .http("PATCH", "/v1/acme/web/index/keys/k", &token, "{}")
                .await;
            assert_eq!(status, 405);
            assert!(body["error"]["code"].is_string(), "{body}");
        }
        "invalid ids, keys and messages" => {
            let mut c = hub.connect(ORG, "mallory", "garbage").await;
            c.send_raw("{not json").await.expect("send");
            c.command("", "index", "k", OpType::Set, json!(1))
                .await
                .expect("send");
            c.command("bad-key", "index", "", OpType::Set, json!(1))
                .await
                .expect("send");
            c.send_raw(
                &json!({"type": "subscribe", "namespace": "a.b", "last_server_seq": 0}).to_string(),
            )
            .await
            .expect("send");
            let codes = next_codes(&mut c, 4).await;
            assert_eq!(
                codes,
                vec![
                    ErrorCode::InvalidMessage,
                    ErrorCode::InvalidId,
                    ErrorCode::InvalidKey,
                    ErrorCode::InvalidId
                ]
            );
            c.close().await;
        }
        "a decompression bomb as an Automerge change" => {
            // ~150 KB on the wire, 150 MiB once inflated; three at once.
            let bomb = ultrasync_shared::admission::test_support::compressed_bomb(150 << 20);
            let payload = json!({"change": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bomb)});
            let mut c = hub.connect(ORG, "mallory", "bomber").await;
            for i in 0..3 {
                c.command(
                    &format!("bomb-{i}"),
                    "collab",
                    "doc",
                    OpType::CrdtOp,
                    payload.clone(),
                )
                .await
                .expect("send");
            }
            let codes = next_codes(&mut c, 3).await;
            assert_eq!(codes, vec![ErrorCode::PayloadTooLarge; 3]);
            c.close().await;
        }
        "a value nested 126 deep, then a snapshot round trip" => {
            let mut c = hub.connect(ORG, "mallory", "deep").await;
            assert_eq!(
                write(
                    &mut c,
                    "deep-126",
                    "metadata",
                    "deep",
                    OpType::Set,
                    nested(126)
                )
                .await,
                Err(ErrorCode::PayloadTooLarge)
            );
            // The deepest value allowed is stored, snapshotted and read back.
            let depth = ultrasync_shared::admission::Limits::default().max_value_depth - 1;
            let seq = write(
                &mut c,
                "deep-ok",
                "metadata",
                "deep",
                OpType::Set,
                nested(depth),
            )
            .await
            .expect("the deepest allowed value is acked");
            let token = hub.token("mallory");
            let (status, body) = hub
                .http(
                    "GET",
                    &format!("/v1/acme/web/metadata/snapshot?min_seq={seq}"),
                    &token,
                    "",
                )
                .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["state"]["deep"]["value"], nested(depth));
            // Once the materializer has stored a snapshot (every second here), a new
            // client bootstraps from it.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let mut fresh = Connection::connect(&hub.gateway.ws_url(), &token)
                .await
                .expect("connect");
            let cursors = BTreeMap::from([("metadata".to_owned(), None)]);
            fresh
                .hello(ORG, "web", "fresh", cursors)
                .await
                .expect("hello");
            let frames = ultrasync_testkit::recv_until(&mut fresh, Duration::from_secs(20), |m| {
                matches!(
                    m,
                    ServerMessage::Synced { .. } | ServerMessage::Error { .. }
                )
            })
            .await
            .expect("bootstrap");
            assert!(
                error_codes(&frames).is_empty(),
                "bootstrap failed: {frames:?}"
            );
            fresh.close().await;
            c.close().await;
        }
        "presence beyond the client's keys and payload bytes" => {
            let mut c = hub.connect(ORG, "mallory", "ghost").await;
            for i in 0..6 {
                c.send(&ClientMessage::Presence {
                    key: format!("cursor-{i}"),
                    payload: json!({"x": i}),
                })
                .await
                .expect("send");
            }
            c.send(&ClientMessage::Presence {
                key: "cursor-0".into(),
                payload: json!("x".repeat(8192)),
            })
            .await
            .expect("send");
            let codes = next_codes(&mut c, 3).await;
            assert_eq!(
                codes,
                vec![
                    ErrorCode::RateLimited,
                    ErrorCode::RateLimited,
                    ErrorCode::PayloadTooLarge
                ]
            );
            // Another client's presence still goes through.
            let mut other = hub.connect(ORG, "alice", "alice").await;
            other
                .send(&ClientMessage::Subscribe {
                    namespace: "presence".into(),
                    last_server_seq: None,
                    checkpoint: None,
                })
                .await
                .expect("send");
            other
                .send(&ClientMessage::Presence {
                    key: "here".into(),
                    payload: json!(true),
                })
                .await
                .expect("send");
            ultrasync_testkit::recv_until(
                &mut other,
                Duration::from_secs(10),
                |m| matches!(m, ServerMessage::Presence { key, .. } if key == "here"),
            )
            .await
            .expect("alice's presence");
            other.close().await;
            c.close().await;
        }
        "many actors of one org flood the command queue" => {
            // 6 actors, each within its own rate, 150 commands each. NATS is paused
            // meanwhile, so nothing is stored and the org's share of the queue (300
            // in flight here) stays taken: whatever the machine's speed, 300 wait
            // and the other 600 are refused at once.
            let rejects = "ultrasync_gateway_rejects_total{code=\"rate_limited\"}";
            let refused_before = gateway_metric_or_zero(hub, rejects).await;
            let paused = Paused::stop(hub._nats.pid());
            let mut tasks = Vec::new();
            for a in 0..6 {
                let token = hub.token(&format!("flood{a}"));
                let url = hub.url("/v1/acme/web/index/commands");
                tasks.push(tokio::spawn(async move {
                    let commands: Vec<Value> = (0..150)
                        .map(|i| json!({"command_id": format!("f{a}-{i}"), "key": format!("f{a}"), "op_type": "set", "payload": i}))
                        .collect();
                    let body = json!({"client_id": format!("flood{a}"), "commands": commands}).to_string();
                    let auth = format!("Bearer {token}");
                    let r = http_exchange("POST", &url, &[("Content-Type", "application/json"), ("Authorization", &auth)], &body)
                        .await
                        .expect("http");
                    let answer: Value = serde_json::from_str(&r.body).expect("json");
                    answer["results"].as_array().cloned().unwrap_or_default()
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let waiting = gateway_metric(hub, "ultrasync_gateway_commands_waiting").await;
                let refused = gateway_metric_or_zero(hub, rejects).await - refused_before;
                if waiting >= 300.0 && refused >= 600.0 {
                    assert_eq!(
                        (waiting, refused),
                        (300.0, 600.0),
                        "the org's share of 300 commands in flight"
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the flood was not taken in: {waiting} waiting, {refused} refused"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(paused);
            let mut results = Vec::new();
            for t in tasks {
                results.extend(t.await.expect("join"));
            }
            let refused: Vec<&Value> = results
                .iter()
                .filter(|r| r["code"] == json!("rate_limited"))
                .collect();
            assert_eq!(refused.len(), 600, "refused of 900: {results:?}");
            assert!(
                refused.iter().all(|r| r["reason"]
                    .as_str()
                    .is_some_and(|m| m.contains("commands waiting to be queued"))),
                "refused for another reason: {refused:?}"
            );
            let acked = results.iter().filter(|r| r["type"] == json!("ack")).count();
            assert_eq!(
                acked, 300,
                "the 300 that waited are stored once NATS is back"
            );
        }
        "tokens: not yet valid, too long lived, no write scope" => {
            let mut claims = auth::claims(
                "mallory",
                ORG,
                &["*"],
                "read write",
                3600,
                auth::DEFAULT_AUDIENCE,
            );
            claims.nbf = Some(auth::now_secs() + 3600);
            let early = auth::mint_hs256(hub.secret.as_bytes(), &claims).expect("mint");
            let forever = auth::mint_hs256(
                hub.secret.as_bytes(),
                &auth::claims(
                    "mallory",
                    ORG,
                    &["*"],
                    "read write",
                    10 * 365 * 86_400,
                    auth::DEFAULT_AUDIENCE,
                ),
            )
            .expect("mint");
            for (what, token) in [("nbf in the future", &early), ("ten-year token", &forever)] {
                let (status, body) = hub.http("GET", "/v1/acme/web/index/ops", token, "").await;
                assert_eq!(status, 401, "{what}: {body}");
                assert_eq!(
                    body["error"]["message"],
                    json!("invalid or expired token"),
                    "{what}"
                );
                assert!(matches!(
                    Connection::connect(&hub.gateway.ws_url(), token).await,
                    Err(ClientError::Http(401))
                ));
            }
            let reader = hub.token_in(ORG, "reader", "read");
            let (status, body) = hub
                .http("PUT", "/v1/acme/web/index/keys/k", &reader, "1")
                .await;
            assert_eq!(
                (status, body["error"]["code"].clone()),
                (403, json!("forbidden"))
            );
            let (status, _) = hub
                .http("GET", "/v1/bystander/web/index/ops", &reader, "")
                .await;
            assert_eq!(status, 403, "another org's log");
        }
        "conflicts, schema and stale cursors: their codes" => {
            let mut c = hub.connect(ORG, "mallory", "codes").await;
            // settings is a cas namespace: a write without the right version.
            c.send(&ClientMessage::Command(
                ultrasync_shared::protocol::CommandFrame {
                    command_id: "cas-1".into(),
                    namespace: "settings".into(),
                    key: "theme".into(),
                    op_type: OpType::Set,
                    payload: json!("dark"),
                    precondition: Some(ultrasync_shared::Precondition {
                        expected_version: 99,
                    }),
                    base_seq: None,
                },
            ))
            .await
            .expect("send");
            let frames = ultrasync_testkit::recv_until(&mut c, Duration::from_secs(10), |m| {
                matches!(m, ServerMessage::Reject { .. })
            })
            .await
            .expect("reject");
            assert_eq!(error_codes(&frames), vec![ErrorCode::PreconditionFailed]);
            assert_eq!(
                write(&mut c, "crdt-set", "collab", "doc", OpType::Set, json!(1)).await,
                Err(ErrorCode::InvalidOp)
            );
            assert_eq!(
                write(&mut c, "no-title", "todos", "t1", OpType::Set, json!({})).await,
                Err(ErrorCode::SchemaInvalid)
            );
            // A cursor above the head of the log.
            c.send(&ClientMessage::Cursor {
                namespace: "index".into(),
                server_seq: 1 << 40,
            })
            .await
            .expect("send");
            let frames = ultrasync_testkit::recv_until(&mut c, Duration::from_secs(10), |m| {
                matches!(m, ServerMessage::Error { .. })
            })
            .await
            .expect("error");
            assert_eq!(error_codes(&frames), vec![ErrorCode::StaleBase]);
            c.close().await;
        }
        "one actor invents client ids to pin the log" => {
            // Each client id with a cursor holds the log until it expires: polling
            // pulls under made-up ids stop at the actor's share.
            let token = hub.token("pinner");
            let mut refused = 0;
            for i in 0..40 {
                let (status, body) = hub
                    .http(
                        "GET",
                        &format!("/v1/acme/web/index/ops?since=0&limit=0&client_id=pin{i}"),
                        &token,
                        "",
                    )
                    .await;
                match status {
                    200 => {}
                    429 => {
                        assert_eq!(body["error"]["code"], json!("rate_limited"));
                        refused += 1;
                    }
                    other => panic!("pull {i}: {other} {body}"),
                }
            }
            assert_eq!(refused, 20, "client ids past the actor's share of 20");
            // A known client id still reports.
            let (status, _) = hub
                .http(
                    "GET",
                    "/v1/acme/web/index/ops?since=0&limit=0&client_id=pin0",
                    &token,
                    "",
                )
                .await;
            assert_eq!(status, 200);
        }
        "automerge-repo: documents per socket, sockets x documents per org" => {
            // Documents a peer asks for are loaded and held by the gateway (even
            // absent ones: the peer may send them next). 8 sockets ask for 200 each;
            // a socket holds 32, the org 64 (idle ones dropped first), the rest are
            // refused with an error naming the bound.
            let pid = hub.gateway.process.pid();
            let before = rss_kib(pid);
            let mut sockets = Vec::new();
            let (mut per_socket, mut per_org, mut held) = (0, 0, 0);
            for s in 0..8 {
                let mut p =
                    amrepo::Peer::join(&am_url(hub, ORG, &format!("hoarder{s}")), &format!("h{s}"))
                        .await;
                for d in 0..200 {
                    let answer = p.request(&format!("hoard-{s}-{d}")).await;
                    match amrepo::kind(&answer) {
                        "doc-unavailable" => held += 1,
                        "error"
                            if amrepo::message(&answer).contains("automerge_docs_per_socket") =>
                        {
                            per_socket += 1
                        }
                        "error" if amrepo::message(&answer).contains("automerge_docs_per_org") => {
                            per_org += 1
                        }
                        _ => panic!("unexpected answer {answer:?}"),
                    }
                }
                sockets.push(p);
            }
            let grown = rss_kib(pid).saturating_sub(before);
            eprintln!(
                "automerge-repo: {held} documents held, {per_socket} refused per socket, {per_org} per org; gateway RSS grew by {grown} KiB"
            );
            assert_eq!(held, 64, "the org's bound");
            assert_eq!(per_socket, 2 * (200 - 32));
            assert_eq!(per_org, 6 * 200);
            assert!(
                gateway_metric(hub, "ultrasync_gateway_automerge_documents").await <= 64.0 + 2.0,
                "documents past the org's bound"
            );
            // 1,600 document requests leave no more than 64 documents' worth behind.
            assert!(grown < 32 * 1024, "the gateway grew by {grown} KiB");
            // Another org's peers are not bound by this one's documents.
            let mut other = amrepo::Peer::join(&am_url(hub, OTHER_ORG, "calm"), "calm").await;
            let answer = other.request("their-own").await;
            assert_eq!(amrepo::kind(&answer), "doc-unavailable", "{answer:?}");
            other.close().await;
            for p in sockets {
                p.close().await;
            }
        }
        "automerge-repo: huge and deep CBOR" => {
            let pid = hub.gateway.process.pid();
            let before = rss_kib(pid);
            let mut p = amrepo::Peer::join(&am_url(hub, ORG, "cbor"), "cbor").await;
            // 100,000 nested arrays in a field nobody reads.
            let mut deep = amrepo::cbor_map(&[("type", amrepo::text("sync"))]);
            deep[0] = 0xa2;
            deep.extend([0x61, b'x']);
            deep.extend(std::iter::repeat_n(0x81, 100_000));
            deep.push(0);
            p.send(&deep).await;
            let answer = p.next().await;
            assert_eq!(amrepo::kind(&answer), "error", "{answer:?}");
            // A byte string and a map declaring 2^62 bytes and 2^32 entries.
            for lie in [
                [
                    &[0xa1, 0x64, b'd', b'a', b't', b'a', 0x5b][..],
                    &(1u64 << 62).to_be_bytes()[..],
                    &[1, 2, 3][..],
                ]
                .concat(),
                [
                    &[0xba][..],
                    &u32::MAX.to_be_bytes()[..],
                    &[0x61, b'a', 0x01][..],
                ]
                .concat(),
            ] {
                p.send(&lie).await;
                let answer = p.next().await;
                assert_eq!(amrepo::kind(&answer), "error", "{answer:?}");
            }
            // The socket still serves.
            let answer = p.request("after-cbor").await;
            assert_eq!(amrepo::kind(&answer), "doc-unavailable", "{answer:?}");
            // A frame over the size limit: an error, then 1009.
            // (the write may fail once the server has closed).
            let _ = p.try_send(&vec![0u8; 2 << 20]).await;
            let mut code = None;
            for _ in 0..4 {
                match p.next_or_close().await {
                    Ok(v) => assert_eq!(amrepo::kind(&v), "error", "{v:?}"),
                    Err(c) => {
                        code = c;
                        break;
                    }
                }
            }
            assert_eq!(code, Some(1009));
            let grown = rss_kib(pid).saturating_sub(before);
            eprintln!("automerge-repo: hostile CBOR grew the gateway by {grown} KiB");
            assert!(grown < 32 * 1024, "the gateway grew by {grown} KiB");
        }
        "automerge-repo: sync messages with huge heads, bloom filters and change counts" => {
            let mut p = amrepo::Peer::join(&am_url(hub, ORG, "syncer"), "syncer").await;
            let big_bloom = bloom(700_000, 10, 7, 875_000);
            let cases: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
                (
                    "30,000 heads",
                    raw_sync(30_000, 0, &[], (0, &[])),
                    Some("heads"),
                ),
                (
                    "30,000 needs",
                    raw_sync(0, 30_000, &[], (0, &[])),
                    Some("needed changes"),
                ),
                (
                    "two bloom filters",
                    raw_sync(
                        0,
                        0,
                        &[(0, bloom(1, 10, 7, 2)), (0, bloom(1, 10, 7, 2))],
                        (0, &[]),
                    ),
                    Some("bloom filters"),
                ),
                (
                    "a billion probes",
                    raw_sync(0, 0, &[(0, bloom(1, 10, 1_000_000_000, 2))], (0, &[])),
                    Some("probes"),
                ),
                (
                    "a million bits per entry",
                    raw_sync(0, 0, &[(0, bloom(1, 1_000_000, 7, 2))], (0, &[])),
                    Some("bits per entry"),
                ),
                (
                    "5,000 changes declared",
                    raw_sync(0, 0, &[], (5_000, &[])),
                    Some("changes"),
                ),
                // Legal parameters, as large as a frame allows: answered.
                (
                    "a 875 KB bloom filter",
                    raw_sync(0, 0, &[(0, big_bloom)], (0, &[])),
                    None,
                ),
            ];
            for (what, data, refused) in cases {
                p.sync("sync", "sync-abuse", data).await;
                let answer = p.next().await;
                match refused {
                    Some(word) => {
                        assert_eq!(amrepo::kind(&answer), "error", "{what}: {answer:?}");
                        assert!(
                            amrepo::message(&answer).contains(word),
                            "{what}: {answer:?}"
                        );
                    }
                    None => assert_ne!(amrepo::kind(&answer), "error", "{what}: {answer:?}"),
                }
            }
            p.close().await;
        }
        "automerge-repo: an ephemeral flood at a peer that does not read" => {
            let pid = hub.gateway.process.pid();
            let before = rss_kib(pid);
            let dropped =
                gateway_metric(hub, "ultrasync_gateway_automerge_ephemeral_dropped_total").await;
            // The victim is on the document and never reads again.
            let mut victim = amrepo::Peer::join(&am_url(hub, ORG, "victim"), "victim").await;
            victim.request("room").await;
            // Four flooders, each under the frame rate, 1,500 messages of 4,000
            // bytes (24 MB in all); they read what they get.
            let mut tasks = Vec::new();
            for f in 0..4 {
                let mut p = amrepo::Peer::join(
                    &am_url(hub, ORG, &format!("flood{f}")),
                    &format!("flood{f}"),
                )
                .await;
                p.request("room").await;
                let (mut sink, mut stream) = p.ws.split();
                let drain =
                    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
                let id = format!("flood{f}");
                tasks.push(tokio::spawn(async move {
                    for count in 0..1500u64 {
                        let frame = amrepo::cbor_map(&[
                            ("type", amrepo::text("ephemeral")),
                            ("senderId", amrepo::text(&id)),
                            ("targetId", amrepo::text("server")),
                            ("documentId", amrepo::text("room")),
                            ("sessionId", amrepo::text("s")),
                            ("count", ciborium::Value::Integer(count.into())),
                            ("data", ciborium::Value::Bytes(vec![7u8; 4000])),
                        ]);
                        if sink.send(Message::Binary(frame.into())).await.is_err() {
                            break;
                        }
                        if count % 100 == 99 {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                    let _ = sink.close().await;
                    drain.abort();
                }));
            }
            for t in tasks {
                t.await.expect("flooder");
            }
            let grown = rss_kib(pid).saturating_sub(before);
            let now_dropped =
                gateway_metric(hub, "ultrasync_gateway_automerge_ephemeral_dropped_total").await;
            eprintln!(
                "automerge-repo: ephemeral flood: {} dropped for the victim; gateway RSS grew by {grown} KiB",
                now_dropped - dropped
            );
            // The victim's queue is bounded: what it cannot take is dropped, counted.
            assert!(
                now_dropped > dropped,
                "nothing was dropped for a peer that does not read"
            );
            assert!(grown < 64 * 1024, "the gateway grew by {grown} KiB");
            drop(victim);
            // Over the frame rate: refused, then closed (1008).
            let fast = amrepo::Peer::join(&am_url(hub, ORG, "sprinter"), "sprinter").await;
            let (mut sink, mut stream) = fast.ws.split();
            let flood = tokio::spawn(async move {
                for count in 0..5000u64 {
                    let frame = amrepo::cbor_map(&[
                        ("type", amrepo::text("ephemeral")),
                        ("senderId", amrepo::text("sprinter")),
                        ("documentId", amrepo::text("room")),
                        ("sessionId", amrepo::text("s")),
                        ("count", ciborium::Value::Integer(count.into())),
                        ("data", ciborium::Value::Bytes(vec![1])),
                    ]);
                    if sink.send(Message::Binary(frame.into())).await.is_err() {
                        break;
                    }
                }
            });
            // The gateway closes with 1008. The close frame may not get through: the
            // gateway shuts a socket with the flood still unread in its receive
            // buffer, and the kernel then answers with a reset. Either way the
            // socket ends; a timeout means it was left open.
            let mut ended = None;
            loop {
                match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(Message::Close(f)))) => {
                        ended = Some(format!("close {:?}", f.map(|f| u16::from(f.code))));
                        break;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(e))) => {
                        ended = Some(format!("dropped: {e}"));
                        break;
                    }
                    Ok(None) => {
                        ended = Some("dropped".to_owned());
                        break;
                    }
                }
            }
            flood.abort();
            let ended = ended.expect("an ephemeral flood over the frame rate was not closed");
            assert!(
                ended == "close Some(1008)" || ended.starts_with("dropped"),
                "an ephemeral flood over the frame rate ended with {ended}"
            );
        }
        "many actors of one org flood HTTP reads" => {
            // Ten actors, each within its own rate, in waves until the org's rate
            // refuses (the acme rows before this one stay far below it).
            let tokens: Vec<String> = (0..10).map(|i| hub.token(&format!("reader-{i}"))).collect();
            let hub = &*hub;
            let mut org_refusals = 0;
            for _wave in 0..100 {
                let answers = futures::future::join_all((0..200).map(|i| {
                    hub.http(
                        "GET",
                        "/v1/acme/web/index/ops?since=0&limit=20",
                        &tokens[i % 10],
                        "",
                    )
                }))
                .await;
                for (status, body) in answers {
                    match status {
                        200 => {}
                        429 => {
                            assert_eq!(body["error"]["code"], json!("rate_limited"), "{body}");
                            let message = body["error"]["message"].as_str().unwrap_or_default();
                            if message.contains("org") {
                                org_refusals += 1;
                            }
                        }
                        other => panic!("an HTTP read answered {other}: {body}"),
                    }
                }
                if org_refusals > 0 {
                    break;
                }
            }
            assert!(org_refusals > 0, "the org's request rate never refused");
            // Another org's reads are not charged to it.
            let calm = hub.token_in(OTHER_ORG, "calm", "read write");
            let (status, body) = hub
                .http("GET", "/v1/bystander/web/index/ops", &calm, "")
                .await;
            assert_eq!(status, 200, "{body}");
        }
        "one org follows more stream keys than its share" => {
            // Three sockets in three projects, three namespaces each: nine stream
            // keys, each a consumer on the op log while followed; the org's share
            // on this gateway is six.
            let token = hub.token("mallory");
            let mut sockets = Vec::new();
            let (mut synced, mut refused) = (0, 0);
            for p in 0..3 {
                let mut c = Connection::connect(&hub.gateway.ws_url(), &token)
                    .await
                    .expect("connect");
                let project = format!("follow-{p}");
                c.hello(ORG, &project, &project, BTreeMap::new())
                    .await
                    .expect("hello");
                for ns in ["index", "settings", "metadata"] {
                    match subscribe_from_start(&mut c, ns).await {
                        ServerMessage::Synced { .. } => synced += 1,
                        ServerMessage::Error { code, message, .. } => {
                            assert_eq!(code, ErrorCode::RateLimited, "{message}");
                            assert!(message.contains("org"), "{message}");
                            refused += 1;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                sockets.push(c);
            }
            // Earlier rows may leave a key of the org followed a while (a document
            // stays loaded for a minute): at most six in all.
            assert!(
                synced <= 6 && refused >= 3 && synced + refused == 9,
                "followed within the org's share: {synced} followed, {refused} refused"
            );
            // Another org follows as before.
            let mut calm = hub.connect(OTHER_ORG, "calm", "calm-follow").await;
            let answer = subscribe_from_start(&mut calm, "index").await;
            assert!(matches!(answer, ServerMessage::Synced { .. }), "{answer:?}");
            calm.close().await;
            // The org's keys are released with its sockets (their followers stop as
            // their tasks end).
            for c in sockets {
                c.close().await;
            }
            let mut again = Connection::connect(&hub.gateway.ws_url(), &token)
                .await
                .expect("connect");
            again
                .hello(ORG, "follow-9", "follow-9", BTreeMap::new())
                .await
                .expect("hello");
            let mut followed = false;
            for _ in 0..100 {
                if matches!(
                    subscribe_from_start(&mut again, "index").await,
                    ServerMessage::Synced { .. }
                ) {
                    followed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                followed,
                "the org's share came back when its sockets closed"
            );
            again.close().await;
        }
        "one org resends old commands in bulk" => {
            // 1,200 ops on one stream key from 8 actors (more than the 1,024 recent
            // ops a sequencer keeps), then every command sent again, three times:
            // each retry is acked with its op as first stored, and writes nothing.
            let mut actors = Vec::new();
            for a in 0..8 {
                actors.push(
                    hub.connect(ORG, &format!("again-{a}"), &format!("again-{a}"))
                        .await,
                );
            }
            let mut first = Vec::new();
            for (a, c) in actors.iter_mut().enumerate() {
                first.push(send_numbered(c, a).await);
            }
            let head = first
                .iter()
                .flat_map(|m| m.values())
                .max()
                .copied()
                .unwrap_or(0);
            assert!(head >= 1200, "the key holds {head} ops");
            for _ in 0..3 {
                let rounds = actors
                    .iter_mut()
                    .enumerate()
                    .map(|(a, c)| send_numbered(c, a));
                let again = futures::future::join_all(rounds).await;
                assert_eq!(again, first, "a retry was answered with another op");
            }
            let after = write(
                &mut actors[0],
                "after",
                "index",
                "k0",
                OpType::Set,
                json!(0),
            )
            .await
            .expect("a new write after the retries");
            assert_eq!(after, head + 1, "a retry wrote an op");
            for c in actors {
                c.close().await;
            }
        }
        other => panic!("no such row: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tenant_can_hurt_another() {
    let mut hub = Hub::start().await;
    // The bystander's usual latency, measured before any abuse (the first write
    // creates its stream key's state and is left out).
    hub.bystander_write(0).await;
    let mut samples = Vec::new();
    for i in 1..=7 {
        samples.push(hub.bystander_write(i).await);
    }
    samples.sort();
    let baseline = samples[samples.len() / 2];
    for (n, row) in ROWS.iter().enumerate() {
        eprintln!("abuse row: {row}");
        run_row(&mut hub, row).await;
        hub.check_unharmed(row, baseline, 100 + n).await;
    }
}
