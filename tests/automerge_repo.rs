//! The automerge-repo endpoint (SPEC §11) against unmodified automerge-repo peers:
//! `@automerge/automerge-repo` and `@automerge/automerge-repo-network-websocket`
//! from `clients/automerge-repo/package-lock.json`, run by Node
//! (`clients/automerge-repo/test/peer.mjs`, one process per peer, driven over
//! stdin/stdout), on a real stack. Every wait is for a condition; the bounds only
//! turn a hang into a failure.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_shared::auth;
use ultrasync_testkit::{ORG, Stack, StackOptions};

/// Longest a peer command may take before the test fails.
const BOUND: Duration = Duration::from_secs(60);

fn package_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/automerge-repo")
}

/// One automerge-repo peer (a Node process).
struct Peer {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn start(name: &str, url: &str) -> Self {
        let dir = package_dir();
        assert!(
            dir.join("node_modules/@automerge/automerge-repo").is_dir(),
            "the automerge-repo packages are missing: run ./scripts/setup.sh (npm ci in {})",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg("test/peer.mjs")
            .arg(url)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node (run ./scripts/setup.sh)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
        }
    }

    /// Runs one command: `Ok(answer)` or `Err(the peer's error)`.
    async fn try_call(&mut self, cmd: Value) -> Result<Value, String> {
        let line = format!("{cmd}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("write to the peer");
        let answer = tokio::time::timeout(BOUND, self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("peer {} did not answer {cmd} in {BOUND:?}", self.name))
            .expect("read from the peer")
            .unwrap_or_else(|| panic!("peer {} exited during {cmd}", self.name));
        let answer: Value = serde_json::from_str(&answer).expect("a JSON answer");
        match answer.get("ok") {
            Some(ok) => Ok(ok.clone()),
            None => Err(answer["error"].as_str().unwrap_or_default().to_owned()),
        }
    }

    async fn call(&mut self, cmd: Value) -> Value {
        let shown = cmd.to_string();
        self.try_call(cmd)
            .await
            .unwrap_or_else(|e| panic!("peer {}: {shown} failed: {e}", self.name))
    }

    async fn create(&mut self, value: Value) -> String {
        let r = self.call(json!({"cmd": "create", "value": value})).await;
        r["url"].as_str().expect("url").to_owned()
    }

    async fn change(&mut self, url: &str, key: &str, value: Value) {
        self.call(json!({"cmd": "change", "url": url, "key": key, "value": value}))
            .await;
    }

    async fn wait(&mut self, url: &str, key: &str, value: Value) -> Value {
        let r = self
            .call(json!({"cmd": "wait", "url": url, "key": key, "value": value}))
            .await;
        r["doc"].clone()
    }

    async fn find(&mut self, url: &str) -> Result<Value, String> {
        self.try_call(json!({"cmd": "find", "url": url}))
            .await
            .map(|r| r["doc"].clone())
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn endpoint(http: &std::net::SocketAddr, project: &str, token: &str) -> String {
    format!("ws://{http}/v1/automerge/{ORG}/{project}/collab?access_token={token}")
}

/// The document id of an `automerge:` URL (the key in the `collab` namespace).
fn doc_id(url: &str) -> &str {
    url.trim_start_matches("automerge:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_repos_sync_converge_and_a_third_loads_later() {
    let stack = Stack::start().await;
    let url = endpoint(&stack.http, "web", &stack.token("alice", "read write"));
    let mut a = Peer::start("a", &url);
    let mut b = Peer::start("b", &url);

    let doc = a.create(json!({"title": "hello"})).await;
    a.change(&doc, "count", json!(1)).await;
    // Another peer can find a document once the server stores it (as with any sync
    // server, one asked first answers that it does not have it).
    a.call(json!({"cmd": "wait_server_heads", "url": doc}))
        .await;
    let found = b.find(&doc).await.expect("b finds the document by URL");
    assert_eq!(found["title"], "hello");
    let seen = b.wait(&doc, "count", json!(1)).await;
    assert_eq!(seen["title"], "hello");

    // Concurrent edits from both sides converge.
    for i in 0..5 {
        a.change(&doc, &format!("a{i}"), json!(i)).await;
        b.change(&doc, &format!("b{i}"), json!(i)).await;
    }
    let on_a = a.wait(&doc, "b4", json!(4)).await;
    let on_b = b.wait(&doc, "a4", json!(4)).await;
    for i in 0..5 {
        assert_eq!(on_a[format!("b{i}")], json!(i));
        assert_eq!(on_b[format!("a{i}")], json!(i));
    }
    // Both land on the same document once each has the other's edits.
    let a_doc = a.wait(&doc, "a4", json!(4)).await;
    let b_doc = b.wait(&doc, "b4", json!(4)).await;
    assert_eq!(a_doc, b_doc);

    // A repo started later loads everything from the server alone.
    a.kill().await;
    b.kill().await;
    let mut c = Peer::start("c", &url);
    let loaded = c.find(&doc).await.expect("c finds it");
    assert_eq!(loaded, a_doc);

    // An id nobody has is unavailable.
    let missing = "automerge:4NMNnkMhL8jXrdJ9jamS58PAVdXu";
    let err = c.find(missing).await.expect_err("unknown document");
    assert!(err.contains("unavailable"), "{err}");
    c.kill().await;
    stack.shutdown().await;
}

/// Applies every change of the ops for `key` to `doc`.
fn apply_ops(doc: &mut AutoCommit, ops: &[ultrasync_shared::Op], key: &str) {
    for op in ops.iter().filter(|o| o.key == key) {
        let change = B64
            .decode(op.payload["change"].as_str().expect("change"))
            .expect("base64");
        doc.load_incremental(&change).expect("change applies");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_documents_through_every_door() {
    let stack = Stack::start().await;
    let token = stack.token("alice", "read write");
    let url = endpoint(&stack.http, "web", &token);
    let mut native = stack
        .client("bob", "web", "native-1", &[("collab", Some(0))])
        .await;
    let mut a = Peer::start("a", &url);
    let doc = a.create(json!({"title": "doors"})).await;
    a.change(&doc, "n", json!(7)).await;
    let id = doc_id(&doc).to_owned();

    // A repo peer's changes reach a native socket as `ops` (crdt_op on the document
    // id) and HTTP as JSON.
    let mut mirror = AutoCommit::new();
    let mut last = 0;
    loop {
        let msg = native
            .recv_timeout(BOUND)
            .await
            .expect("ops for the repo's change");
        if let ServerMessage::Ops { ops, .. } = msg {
            assert!(
                ops.iter()
                    .all(|o| o.op_type == OpType::CrdtOp && o.key == id)
            );
            last = ops.last().map_or(last, |o| o.server_seq);
            apply_ops(&mut mirror, &ops, &id);
            if mirror.get(automerge::ROOT, "n").expect("read").is_some() {
                break;
            }
        }
    }
    let http = stack
        .get(
            &format!("/v1/{ORG}/web/collab/keys/{id}?min_seq={last}"),
            &token,
        )
        .await;
    assert_eq!(http.status, 200, "{}", http.body);
    let body: Value = serde_json::from_str(&http.body).expect("json");
    assert_eq!(body["value"], json!({"title": "doors", "n": 7}));

    // A native crdt_op reaches the repo peer.
    mirror
        .put(automerge::ROOT, "from_native", "hi")
        .expect("put");
    let change = mirror
        .get_last_local_change()
        .expect("a change")
        .raw_bytes()
        .to_vec();
    native
        .command(
            "n-1",
            "collab",
            &id,
            OpType::CrdtOp,
            json!({"change": B64.encode(change)}),
        )
        .await
        .expect("send");
    loop {
        match native.recv_timeout(BOUND).await.expect("ack") {
            ServerMessage::Ack { .. } => break,
            ServerMessage::Reject { reason, .. } => panic!("native change refused: {reason}"),
            _ => {}
        }
    }
    let seen = a.wait(&doc, "from_native", json!("hi")).await;
    assert_eq!(seen["n"], 7);
    a.kill().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_the_server_advertises_survive_a_sigkill() {
    let dir = tempfile::tempdir().expect("tmp");
    let secret = ultrasync_testkit::random_secret();
    let stack = Stack::start_with(StackOptions {
        dir: Some(dir.path().to_path_buf()),
        secret: Some(secret.clone()),
        ..Default::default()
    })
    .await;
    let url = endpoint(&stack.http, "web", &stack.token("alice", "read write"));
    let mut a = Peer::start("a", &url);
    let doc = a.create(json!({"title": "durable"})).await;
    a.change(&doc, "last", json!("before the crash")).await;
    // The moment A learns the server has its heads, kill everything.
    a.call(json!({"cmd": "wait_server_heads", "url": doc}))
        .await;
    kill(Pid::from_raw(stack.nats.pid() as i32), Signal::SIGKILL).expect("SIGKILL nats-server");
    drop(stack);
    a.kill().await;

    let stack = Stack::start_with(StackOptions {
        dir: Some(dir.path().to_path_buf()),
        secret: Some(secret),
        ..Default::default()
    })
    .await;
    let url = endpoint(&stack.http, "web", &stack.token("alice", "read write"));
    let mut fresh = Peer::start("fresh", &url);
    let loaded = fresh.find(&doc).await.expect("found after the restart");
    assert_eq!(loaded["last"], "before the crash");
    fresh.kill().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_two_gateways_sync_and_share_ephemeral_messages() {
    let mut stack = Stack::start().await;
    let second = stack.add_gateway().await;
    let second_http = second
        .trim_start_matches("ws://")
        .trim_end_matches("/v1/sync")
        .to_owned();
    let token = stack.token("alice", "read write");
    let mut a = Peer::start("a", &endpoint(&stack.http, "web", &token));
    let mut b = Peer::start(
        "b",
        &format!("ws://{second_http}/v1/automerge/{ORG}/web/collab?access_token={token}"),
    );
    let doc = a.create(json!({"title": "two gateways"})).await;
    // Stored first: the other gateway answers from the log.
    a.call(json!({"cmd": "wait_server_heads", "url": doc}))
        .await;
    b.find(&doc)
        .await
        .expect("b finds it through the other gateway");
    a.change(&doc, "from_a", json!(1)).await;
    b.wait(&doc, "from_a", json!(1)).await;
    b.change(&doc, "from_b", json!(2)).await;
    a.wait(&doc, "from_b", json!(2)).await;

    b.call(json!({"cmd": "broadcast", "url": doc, "message": {"cursor": 5, "who": "b"}}))
        .await;
    a.call(json!({"cmd": "wait_ephemeral", "url": doc, "match": {"cursor": 5, "who": "b"}}))
        .await;
    a.call(json!({"cmd": "broadcast", "url": doc, "message": {"cursor": 9, "who": "a"}}))
        .await;
    b.call(json!({"cmd": "wait_ephemeral", "url": doc, "match": {"cursor": 9, "who": "a"}}))
        .await;
    // Ephemeral messages never reach the log: only the two changes and the
    // creation are there.
    let ops = ultrasync_testkit::read_subject(
        &stack.jetstream().await,
        &format!("usync.ops.{ORG}.web.collab"),
    )
    .await;
    assert!(
        ops.iter()
            .all(|e| e.op().expect("op").op_type == OpType::CrdtOp)
    );
    a.kill().await;
    b.kill().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_what_a_repo_peer_may_read_and_write() {
    let stack = Stack::start().await;
    // No token: 401 before the upgrade.
    let (status, _) = ultrasync_testkit::http_get(&format!(
        "http://{}/v1/automerge/{ORG}/web/collab",
        stack.http
    ))
    .await
    .expect("http");
    assert_eq!(status, 401);
    // A namespace that is not crdt is refused before the upgrade too.
    let bad = stack
        .get(
            &format!("/v1/automerge/{ORG}/web/index"),
            &stack.token("alice", "read write"),
        )
        .await;
    assert_eq!(bad.status, 400, "{}", bad.body);

    let writer = stack.token("alice", "read write");
    let mut a = Peer::start("a", &endpoint(&stack.http, "web", &writer));
    let doc = a.create(json!({"title": "guarded"})).await;
    a.change(&doc, "v", json!(1)).await;
    a.call(json!({"cmd": "wait_server_heads", "url": doc}))
        .await;

    // A token for another project sees nothing.
    let other = auth::mint_hs256(
        stack.secret.as_bytes(),
        &auth::claims(
            "eve",
            ORG,
            &["other"],
            "read write",
            3600,
            auth::DEFAULT_AUDIENCE,
        ),
    )
    .expect("mint");
    let mut eve = Peer::start("eve", &endpoint(&stack.http, "web", &other));
    let err = eve
        .find(&doc)
        .await
        .expect_err("another project's document");
    assert!(err.contains("unavailable"), "{err}");
    eve.kill().await;

    // A read-only token syncs down; its changes are refused with an error naming
    // the document, and never reach the log.
    let reader = stack.token("rita", "read");
    let mut r = Peer::start("r", &endpoint(&stack.http, "web", &reader));
    let seen = r.find(&doc).await.expect("a reader finds it");
    assert_eq!(seen["v"], 1);
    r.change(&doc, "sneaky", json!(true)).await;
    let msg = r
        .call(json!({"cmd": "wait_error", "contains": doc_id(&doc)}))
        .await;
    assert!(
        msg["message"]
            .as_str()
            .unwrap_or_default()
            .contains("refused"),
        "{msg}"
    );
    a.change(&doc, "after", json!(2)).await;
    let heads = a
        .call(json!({"cmd": "wait_server_heads", "url": doc}))
        .await;
    assert!(!heads["heads"].as_array().expect("heads").is_empty());
    r.wait(&doc, "after", json!(2)).await;
    let a_doc = a.wait(&doc, "after", json!(2)).await;
    assert!(
        a_doc.get("sneaky").is_none(),
        "a read-only change got through: {a_doc}"
    );
    a.kill().await;
    r.kill().await;
    stack.shutdown().await;
}

/// A CBOR map of text keys and text values.
fn cbor_map(fields: &[(&str, ciborium::Value)]) -> Vec<u8> {
    let map = ciborium::Value::Map(
        fields
            .iter()
            .map(|(k, v)| (ciborium::Value::Text((*k).to_owned()), v.clone()))
            .collect(),
    );
    let mut out = Vec::new();
    ciborium::ser::into_writer(&map, &mut out).expect("cbor");
    out
}

fn field<'a>(v: &'a ciborium::Value, name: &str) -> Option<&'a ciborium::Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn text(s: &str) -> ciborium::Value {
    ciborium::Value::Text(s.to_owned())
}

/// A `join` frame of an ephemeral peer offering `versions`.
fn join(peer: &str, versions: &[&str]) -> Vec<u8> {
    cbor_map(&[
        ("type", text("join")),
        ("senderId", text(peer)),
        (
            "peerMetadata",
            ciborium::Value::Map(vec![(text("isEphemeral"), ciborium::Value::Bool(true))]),
        ),
        (
            "supportedProtocolVersions",
            ciborium::Value::Array(versions.iter().map(|v| text(v)).collect()),
        ),
    ])
}

/// The next frame that is not a ping or a pong.
async fn next_frame(ws: &mut Socket) -> Message {
    loop {
        let m = tokio::time::timeout(BOUND, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

fn decode(m: Message) -> ciborium::Value {
    match m {
        Message::Binary(b) => ciborium::de::from_reader(&b[..]).expect("cbor"),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// A new socket to `url` that sent `join` as `peer` offering `versions`, and the
/// server's first frame.
async fn joined(url: &str, peer: &str, versions: &[&str]) -> (Socket, ciborium::Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws.send(Message::Binary(join(peer, versions).into()))
        .await
        .expect("send");
    let first = decode(next_frame(&mut ws).await);
    (ws, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_protocol_join_versions_and_replacement() {
    let stack = Stack::start().await;
    let url = endpoint(&stack.http, "web", &stack.token("alice", "read write"));
    // join → peer, with the server's id, a storage id and selectedProtocolVersion.
    let (mut one, peer) = joined(&url, "p1", &["1"]).await;
    assert_eq!(field(&peer, "type").and_then(|v| v.as_text()), Some("peer"));
    assert_eq!(
        field(&peer, "targetId").and_then(|v| v.as_text()),
        Some("p1")
    );
    assert_eq!(
        field(&peer, "selectedProtocolVersion").and_then(|v| v.as_text()),
        Some("1")
    );
    let meta = field(&peer, "peerMetadata").expect("peerMetadata");
    let storage = field(meta, "storageId")
        .and_then(|v| v.as_text())
        .expect("storageId");
    assert_eq!(
        field(meta, "isEphemeral"),
        Some(&ciborium::Value::Bool(false))
    );

    // The same peer id again on a new socket replaces the first one.
    let (mut two, again) = joined(&url, "p1", &["1"]).await;
    let meta2 = field(&again, "peerMetadata").expect("peerMetadata");
    assert_eq!(
        field(meta2, "storageId").and_then(|v| v.as_text()),
        Some(storage),
        "the storage id is stable"
    );
    assert!(matches!(next_frame(&mut one).await, Message::Close(_)));

    // An unsupported version: error, then close.
    let (mut three, err) = joined(&url, "p3", &["99"]).await;
    assert_eq!(field(&err, "type").and_then(|v| v.as_text()), Some("error"));
    assert!(matches!(next_frame(&mut three).await, Message::Close(_)));

    // A request for a document nobody has: doc-unavailable.
    let mut empty = AutoCommit::new();
    let mut st = automerge::sync::State::new();
    use automerge::sync::SyncDoc;
    let request = empty
        .sync()
        .generate_sync_message(&mut st)
        .expect("a message")
        .encode();
    two.send(Message::Binary(
        cbor_map(&[
            ("type", text("request")),
            ("senderId", text("p1")),
            ("targetId", text("server")),
            ("documentId", text("3Mx7dMZnw3SiFkRJzKPJeGrBv6zS")),
            ("data", ciborium::Value::Bytes(request)),
        ])
        .into(),
    ))
    .await
    .expect("send");
    let answer = decode(next_frame(&mut two).await);
    assert_eq!(
        field(&answer, "type").and_then(|v| v.as_text()),
        Some("doc-unavailable")
    );
    stack.shutdown().await;
}

/// A read-only peer whose heads name a change the server lacks, without the change
/// itself (its sync state holds it back when the server's Bloom filter claims to
/// have it), is told the change is refused, once for those heads; a read-only
/// server never asks for the change, so without this the peer would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_peer_is_told_of_changes_it_holds_back() {
    use automerge::sync::SyncDoc;
    let stack = Stack::start().await;
    let url = endpoint(&stack.http, "web", &stack.token("rita", "read"));
    let (mut ws, peer) = joined(&url, "ro", &["1"]).await;
    assert_eq!(field(&peer, "type").and_then(|v| v.as_text()), Some("peer"));

    let mut local = AutoCommit::new();
    local
        .put(automerge::ROOT, "sneaky", true)
        .expect("a local change");
    let mut st = automerge::sync::State::new();
    let mut msg = local
        .sync()
        .generate_sync_message(&mut st)
        .expect("a message");
    assert!(!msg.heads.is_empty());
    msg.changes = Vec::<Vec<u8>>::new().into();
    let heads_only = msg.encode();
    let doc = "3Mx7dMZnw3SiFkRJzKPJeGrBv6zS";
    let sync = |doc: &str, kind: &str, data: Vec<u8>| {
        cbor_map(&[
            ("type", text(kind)),
            ("senderId", text("ro")),
            ("targetId", text("server")),
            ("documentId", text(doc)),
            ("data", ciborium::Value::Bytes(data)),
        ])
    };
    ws.send(Message::Binary(
        sync(doc, "sync", heads_only.clone()).into(),
    ))
    .await
    .expect("send");
    let err = loop {
        let frame = decode(next_frame(&mut ws).await);
        if field(&frame, "type").and_then(|v| v.as_text()) == Some("error") {
            break frame;
        }
    };
    let message = field(&err, "message")
        .and_then(|v| v.as_text())
        .expect("a message");
    assert!(
        message.contains(doc) && message.contains("refused"),
        "{message}"
    );

    // The same heads again: no second error. A request for a document nobody has
    // comes after it on the socket, so the next error frame, if any, would come
    // before that answer.
    ws.send(Message::Binary(sync(doc, "sync", heads_only).into()))
        .await
        .expect("send");
    let mut empty = AutoCommit::new();
    let request = empty
        .sync()
        .generate_sync_message(&mut automerge::sync::State::new())
        .expect("a message")
        .encode();
    ws.send(Message::Binary(
        sync("4NMNnkMhL8jXrdJ9jamS58PAVdXu", "request", request).into(),
    ))
    .await
    .expect("send");
    loop {
        let frame = decode(next_frame(&mut ws).await);
        let kind = field(&frame, "type").and_then(|v| v.as_text());
        assert_ne!(kind, Some("error"), "{frame:?}");
        if kind == Some("doc-unavailable") {
            break;
        }
    }
    stack.shutdown().await;
}

#[path = "support/amrepo.rs"]
mod amrepo;

/// The value of one `/metrics` sample (`name value`).
async fn metric(stack: &Stack, name: &str) -> f64 {
    let (status, text) = ultrasync_testkit::http_get(&format!("http://{}/metrics", stack.http))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on /metrics"))
}

/// Waits until `/metrics` shows `name` at `value` (a socket's close is handled
/// after the client sees it).
async fn metric_reaches(stack: &Stack, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while metric(stack, name).await != value {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_orgs_documents_on_a_gateway_are_bounded() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.gateway.automerge_docs_per_org = 4;
            c.gateway.automerge_docs_per_socket = 3;
        },
        ..Default::default()
    })
    .await;
    let http = stack.http.to_string();
    let url =
        |sub: &str| amrepo::endpoint(&http, ORG, "web", "collab", &stack.token(sub, "read write"));
    let held = "ultrasync_gateway_automerge_documents";
    let idle = "ultrasync_gateway_automerge_documents_idle";
    let evicted = "ultrasync_gateway_automerge_documents_evicted_total";
    let refused = "ultrasync_gateway_automerge_documents_refused_total";

    // A document in the log, then idle: its socket left.
    let mut p0 = amrepo::Peer::join(&url("alice"), "p0").await;
    let (change, kept) = amrepo::change_message("k", 1);
    p0.sync("sync", "kept", change).await;
    p0.until_heads("kept", &kept).await;
    p0.close().await;
    metric_reaches(&stack, idle, 1.0).await;

    // Three more of the org's: the idle one is kept while there is room.
    let mut p1 = amrepo::Peer::join(&url("alice"), "p1").await;
    for d in ["a1", "a2", "a3"] {
        let answer = p1.request(d).await;
        assert_eq!(amrepo::kind(&answer), "doc-unavailable", "{answer:?}");
    }
    assert_eq!(metric(&stack, held).await, 4.0);
    // A fourth on the same socket: the socket's bound.
    let answer = p1.request("a4").await;
    assert_eq!(amrepo::kind(&answer), "error");
    assert!(
        amrepo::message(&answer).contains("automerge_docs_per_socket")
            && amrepo::message(&answer).contains("a4"),
        "{answer:?}"
    );

    // Another actor of the org: its first document takes the idle one's place...
    let mut p2 = amrepo::Peer::join(&url("bob"), "p2").await;
    let answer = p2.request("b1").await;
    assert_eq!(amrepo::kind(&answer), "doc-unavailable", "{answer:?}");
    assert_eq!(metric(&stack, evicted).await, 1.0);
    assert_eq!(metric(&stack, idle).await, 0.0);
    // ... and with all four in use, a fifth is refused, naming the bound.
    let answer = p2.request("b2").await;
    assert_eq!(amrepo::kind(&answer), "error");
    let why = amrepo::message(&answer);
    assert!(
        why.contains("automerge_docs_per_org") && why.contains("b2") && why.contains(ORG),
        "{why}"
    );
    assert_eq!(metric(&stack, refused).await, 1.0);
    // The socket still works: what it holds syncs on.
    let (change, hash) = amrepo::change_message("b", 2);
    p2.sync("sync", "b1", change).await;
    p2.until_heads("b1", &hash).await;

    // Another org is not bound by this one's documents.
    let claims = auth::claims(
        "olga",
        "other",
        &["*"],
        "read write",
        3600,
        auth::DEFAULT_AUDIENCE,
    );
    let other = auth::mint_hs256(stack.secret.as_bytes(), &claims).expect("mint");
    let mut p3 = amrepo::Peer::join(
        &amrepo::endpoint(&http, "other", "web", "collab", &other),
        "p3",
    )
    .await;
    let answer = p3.request("x1").await;
    assert_eq!(amrepo::kind(&answer), "doc-unavailable", "{answer:?}");
    assert_eq!(metric(&stack, held).await, 5.0);

    // Once bob leaves, b1 is idle; the evicted document comes back from the log.
    p2.close().await;
    metric_reaches(&stack, idle, 1.0).await;
    let mut p4 = amrepo::Peer::join(&url("carol"), "p4").await;
    p4.sync("request", "kept", amrepo::empty_request()).await;
    let answer = p4.next().await;
    assert_eq!(amrepo::kind(&answer), "sync", "{answer:?}");
    assert!(
        amrepo::sync_heads(&answer).contains(&kept),
        "the reloaded document lacks its change"
    );
    assert_eq!(metric(&stack, evicted).await, 2.0);
    assert_eq!(metric(&stack, held).await, 5.0);
    p1.close().await;
    p3.close().await;
    p4.close().await;
    stack.shutdown().await;
}
