//! API keys and token revocation (issue 22) against a real nats-server and real
//! gateways: keys created with the CLI work over WebSocket and HTTP with the scopes
//! and allow-lists of a JWT; the bucket holds hashes only; a revoked key, or a JWT
//! revoked by `jti` or subject, is refused at once and its open sockets on every
//! gateway are closed with 1008; hostile credentials are refused from memory.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::time::Instant;
use ultrasync_client::{ClientError, ClientMessage, Connection, OpType, ServerMessage};
use ultrasync_shared::ErrorCode;
use ultrasync_shared::apikeys::{self, APIKEYS_BUCKET, NewKey};
use ultrasync_shared::auth;
use ultrasync_testkit::{HttpResponse, Stack, http_exchange};

const WAIT: Duration = Duration::from_secs(10);
/// An authenticated read any credential of org `acme` with `read` may do.
const OPS: &str = "/v1/acme/web/index/ops?since=0";
/// How long a revoked credential's socket may take to be closed. The gateways close
/// it as soon as their watch sees the change (milliseconds); 5 s leaves room for a
/// loaded 2-core machine, and the measured time is printed.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ultrasync"))
}

fn cli(stack: &Stack, args: &[&str]) -> Value {
    let (code, out) = stack.run_cli(bin(), args);
    assert_eq!(code, 0, "ultrasync {args:?} failed: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// `ultrasync {args}` (a client command) against the gateway at `addr` with `key`:
/// (exit code, stdout and stderr).
fn client_cli(addr: &str, key: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .args([
            "--url",
            &format!("http://{addr}"),
            "--org",
            "acme",
            "--project",
            "web",
        ])
        .env("ULTRASYNC_TOKEN", key)
        .env("ULTRASYNC_LOG", "error")
        .output()
        .expect("run ultrasync");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn http_on(addr: &str, method: &str, path: &str, bearer: &str, body: &str) -> HttpResponse {
    let auth = format!("Bearer {bearer}");
    http_exchange(
        method,
        &format!("http://{addr}{path}"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await
    .expect("http")
}

async fn answer(c: &mut Connection, id: &str) -> ServerMessage {
    loop {
        let m = c.recv_timeout(WAIT).await.expect("answer");
        match &m {
            ServerMessage::Ack { command_id, .. } | ServerMessage::Reject { command_id, .. }
                if command_id == id =>
            {
                return m;
            }
            _ => {}
        }
    }
}

/// Waits (up to [`CLOSE_DEADLINE`] from `since`) for the server to close `c`; returns
/// the close code and how long it took.
async fn closed(c: &mut Connection, since: Instant) -> (u16, Duration) {
    loop {
        let left = CLOSE_DEADLINE.saturating_sub(since.elapsed());
        match c.recv_timeout(left).await {
            Err(ClientError::Closed { code, .. }) => return (code, since.elapsed()),
            Err(ClientError::Timeout) => {
                panic!("socket still open {CLOSE_DEADLINE:?} after the revocation")
            }
            Err(e) => panic!("socket ended without a close frame: {e}"),
            Ok(_) => {}
        }
    }
}

async fn connect(url: &str, bearer: &str) -> Connection {
    let mut c = Connection::connect(url, bearer).await.expect("connect");
    c.hello(
        "acme",
        "web",
        &format!("c-{}", rand::random::<u32>()),
        BTreeMap::new(),
    )
    .await
    .expect("hello");
    c
}

/// The socket is still served: a ping is answered.
async fn ping(c: &mut Connection) {
    c.send(&ClientMessage::Ping {
        nonce: Some(json!(7)),
    })
    .await
    .expect("ping");
    loop {
        if let ServerMessage::Pong { .. } = c.recv_timeout(WAIT).await.expect("pong") {
            return;
        }
    }
}

async fn refused_ws(url: &str, bearer: &str) -> u16 {
    match Connection::connect(url, bearer).await {
        Err(ClientError::Http(status)) => status,
        Ok(_) => panic!("credential accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn bucket(stack: &Stack) -> async_nats::jetstream::kv::Store {
    stack
        .jetstream()
        .await
        .get_key_value(APIKEYS_BUCKET)
        .await
        .expect("bucket")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_work_like_tokens_and_revocation_closes_sockets_everywhere() {
    let mut stack = Stack::start().await;
    let gw1 = stack.http.to_string();
    let ws2 = stack.add_gateway().await;
    let gw2 = ws2
        .trim_start_matches("ws://")
        .trim_end_matches("/v1/sync")
        .to_owned();

    let created = cli(
        &stack,
        &[
            "apikey",
            "create",
            "--org",
            "acme",
            "--name",
            "agent-1",
            "--scope",
            "read write",
        ],
    );
    let key = created["key"].as_str().expect("key").to_owned();
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(
        key.starts_with("usk_") && key.len() == apikeys::KEY_LEN,
        "{key}"
    );
    assert_eq!(created["actor_id"], "agent-1");

    // Over WebSocket (both gateways) and HTTP, like a token.
    let mut on1 = connect(&stack.ws_url(), &key).await;
    on1.command("c1", "index", "k", OpType::Set, json!("from a key"))
        .await
        .expect("send");
    match answer(&mut on1, "c1").await {
        ServerMessage::Ack { op, .. } => assert_eq!(op.actor_id, "agent-1"),
        other => panic!("{other:?}"),
    }
    let mut on2 = connect(&ws2, &key).await;
    let r = http_on(
        &gw1,
        "PUT",
        "/v1/acme/web/index/keys/h",
        &key,
        "\"over http\"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    stack.wait_for_reads().await;
    let r = http_on(&gw2, "GET", "/v1/acme/web/index/keys/h?min_seq=2", &key, "").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // ?access_token= on the WebSocket route: past authentication (the request is then
    // refused only for not being an upgrade), not on HTTP routes.
    let q = http_exchange(
        "GET",
        &format!("http://{gw1}/v1/sync?access_token={key}"),
        &[],
        "",
    )
    .await
    .expect("http");
    assert_ne!(q.status, 401, "{}", q.body);
    let q = http_exchange(
        "GET",
        &format!("http://{gw1}/v1/status?access_token={key}"),
        &[],
        "",
    )
    .await
    .expect("http");
    assert_eq!(q.status, 401, "{}", q.body);

    // The CLI's client commands take the key as --token (the org from --org).
    let (code, out) = client_cli(&gw1, &key, &["put", "index", "cli", "\"from the cli\""]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = client_cli(&gw2, &key, &["get", "index", "cli"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("from the cli"), "{out}");

    // The bucket holds the hash, never the key.
    let hash = apikeys::key_hash(&key).expect("hash");
    let js = stack.jetstream().await;
    let mut kv_stream = js
        .get_stream(format!("KV_{APIKEYS_BUCKET}"))
        .await
        .expect("stream");
    let last = kv_stream.info().await.expect("info").state.last_sequence;
    let secret_part = &key[apikeys::KEY_PREFIX.len()..];
    let mut saw_record = false;
    for seq in 1..=last {
        let Ok(m) = kv_stream.get_raw_message(seq).await else {
            continue;
        };
        let payload = String::from_utf8_lossy(&m.payload);
        for text in [m.subject.as_str(), &payload] {
            assert!(
                !text.contains(secret_part),
                "the key is in the bucket: {text}"
            );
        }
        saw_record |= m.subject.as_str().ends_with(&hash);
    }
    assert!(saw_record, "no record under the key's hash");
    let listed = cli(&stack, &["apikey", "list", "--org", "acme"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert!(!listed.to_string().contains(secret_part));

    // Revoked: refused at once, and the sockets on both gateways closed with 1008.
    let t0 = Instant::now();
    let revoked = cli(&stack, &["apikey", "revoke", &id]);
    assert_eq!(revoked["name"], "agent-1");
    let (code2, took2) = closed(&mut on2, t0).await;
    let (code1, took1) = closed(&mut on1, t0).await;
    eprintln!("sockets closed {took1:?} / {took2:?} after the revoke command started");
    assert_eq!((code1, code2), (1008, 1008));
    let r = http_on(&gw2, "GET", "/v1/acme/web/index/keys/h", &key, "").await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(refused_ws(&ws2, &key).await, 401);
    assert_eq!(refused_ws(&stack.ws_url(), &key).await, 401);
    let (code, out) = client_cli(&gw1, &key, &["get", "index", "cli"]);
    assert_eq!(code, 6, "a revoked key is refused (exit code 6): {out}");
    let listed = cli(&stack, &["apikey", "list"]);
    assert_eq!(listed, json!([]));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_have_the_scopes_and_allow_lists_of_tokens() {
    let stack = Stack::start_with(ultrasync_testkit::StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let kv = bucket(&stack).await;
    let new = |name: &str, scope: &str, ns: Option<Vec<String>>| NewKey {
        name: name.into(),
        org: "acme".into(),
        actor_id: name.into(),
        projects: vec!["web".into()],
        scope: scope.into(),
        ns,
        ttl_secs: Some(600),
    };
    let (reader, _, _) = apikeys::create(&kv, new("reader", "read", None), 10)
        .await
        .expect("create");
    let (limited, _, _) = apikeys::create(
        &kv,
        new("limited", "read write", Some(vec!["index".into()])),
        10,
    )
    .await
    .expect("create");
    let gw = stack.http.to_string();

    // read: follows, may not write; another project is refused.
    let mut c = connect(&stack.ws_url(), &reader).await;
    c.command("w1", "index", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    match answer(&mut c, "w1").await {
        ServerMessage::Reject { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    let r = http_on(&gw, "PUT", "/v1/acme/web/index/keys/k", &reader, "1").await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_on(&gw, "GET", "/v1/acme/api/index/ops?since=0", &reader, "").await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_on(&gw, "GET", "/v1/globex/web/index/ops?since=0", &reader, "").await;
    assert_eq!(r.status, 403, "{}", r.body);
    let mut other_org = Connection::connect(&stack.ws_url(), &reader)
        .await
        .expect("connect");
    assert!(
        other_org
            .hello("globex", "web", "x-1", BTreeMap::new())
            .await
            .is_err()
    );

    // ns allow-list: index only.
    let mut c = connect(&stack.ws_url(), &limited).await;
    c.command("i1", "index", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    assert!(matches!(
        answer(&mut c, "i1").await,
        ServerMessage::Ack { .. }
    ));
    c.command("o1", "metadata", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    match answer(&mut c, "o1").await {
        ServerMessage::Reject { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    let r = http_on(&gw, "PUT", "/v1/acme/web/metadata/keys/k", &limited, "1").await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_on(
        &gw,
        "GET",
        "/v1/acme/web/metadata/ops?since=0",
        &limited,
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_on(&gw, "GET", "/v1/acme/web/index/ops?since=0", &limited, "").await;
    assert_eq!(r.status, 200, "{}", r.body);

    // An expired key is refused.
    let (expired, short, _) = apikeys::create(&kv, new("old", "read", None), 10)
        .await
        .expect("create");
    let entry = kv
        .entry(format!(
            "key.acme.{}",
            apikeys::key_hash(&expired).expect("hash")
        ))
        .await
        .expect("entry")
        .expect("there");
    let mut record: apikeys::ApiKeyRecord = serde_json::from_slice(&entry.value).expect("json");
    assert!(entry.key.contains(&short));
    record.expires_at = Some(auth::now_secs() - 1);
    kv.put(
        &entry.key,
        serde_json::to_vec(&record).expect("json").into(),
    )
    .await
    .expect("put");
    let deadline = Instant::now() + WAIT;
    loop {
        let r = http_on(&gw, "GET", OPS, &expired, "").await;
        if r.status == 401 {
            break;
        }
        assert!(Instant::now() < deadline, "an expired key still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_revoked_by_jti_and_by_subject() {
    let mut stack = Stack::start_with(ultrasync_testkit::StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let ws2 = stack.add_gateway().await;
    let gw = stack.http.to_string();
    let token = |sub: &str, jti: Option<&str>| {
        let mut c = auth::claims(sub, "acme", &["*"], "read write", 600, "ultrasync");
        c.jti = jti.map(str::to_owned);
        auth::mint_hs256(stack.secret.as_bytes(), &c).expect("mint")
    };
    let doomed = token("tom", Some("t-1"));
    let spared = token("tom", Some("t-2"));
    let mut on2 = connect(&ws2, &doomed).await;
    let mut kept = connect(&ws2, &spared).await;
    assert_eq!(http_on(&gw, "GET", OPS, &doomed, "").await.status, 200);

    // A revocation past every token it could name is deleted by the next one.
    let kv = bucket(&stack).await;
    let moot = apikeys::Revocation {
        jti: Some("old".into()),
        org: None,
        sub: None,
        revoked_at: 1,
        until: auth::now_secs() - 1,
    };
    kv.put(
        apikeys::jti_entry("old"),
        serde_json::to_vec(&moot).expect("json").into(),
    )
    .await
    .expect("put");
    let t0 = Instant::now();
    let r = cli(&stack, &["revoke-token", "--jti", "t-1"]);
    assert_eq!(r["jti"], "t-1");
    let (code, took) = closed(&mut on2, t0).await;
    eprintln!("socket closed {took:?} after the revoke-token command started");
    assert_eq!(
        kv.get(apikeys::jti_entry("old")).await.expect("get"),
        None,
        "a moot revocation was kept"
    );
    assert_eq!(code, 1008);
    assert_eq!(http_on(&gw, "GET", OPS, &doomed, "").await.status, 401);
    assert_eq!(refused_ws(&stack.ws_url(), &doomed).await, 401);
    // The other token of the same subject is untouched.
    ping(&mut kept).await;
    assert_eq!(http_on(&gw, "GET", OPS, &spared, "").await.status, 200);

    // By subject: every token issued until now (and without iat), on every gateway.
    let mut no_iat = auth::claims("tom", "acme", &["*"], "read", 600, "ultrasync");
    no_iat.iat = None;
    let no_iat = auth::mint_hs256(stack.secret.as_bytes(), &no_iat).expect("mint");
    let mut other = connect(&stack.ws_url(), &token("una", None)).await;
    let t0 = Instant::now();
    cli(&stack, &["revoke-token", "--org", "acme", "--sub", "tom"]);
    let (code, _) = closed(&mut kept, t0).await;
    assert_eq!(code, 1008);
    for t in [&spared, &no_iat] {
        assert_eq!(http_on(&gw, "GET", OPS, t, "").await.status, 401);
    }
    // Another subject's socket stays.
    ping(&mut other).await;
    // Tokens minted after the revocation work again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = token("tom", None);
    assert_eq!(http_on(&gw, "GET", OPS, &fresh, "").await.status, 200);
    connect(&ws2, &fresh).await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_credentials_are_refused_from_memory() {
    let stack = Stack::start_with(ultrasync_testkit::StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let gw = stack.http.to_string();
    let kv = bucket(&stack).await;
    let good = NewKey {
        name: "good".into(),
        org: "acme".into(),
        actor_id: "good".into(),
        projects: vec!["*".into()],
        scope: "read".into(),
        ns: None,
        ttl_secs: None,
    };
    let (key, _, _) = apikeys::create(&kv, good.clone(), 3).await.expect("create");

    // Malformed keys: too short, too long, outside the alphabet, the prefix alone.
    let malformed = [
        "usk_".to_owned(),
        "usk_short".to_owned(),
        format!("{key}A"),
        format!("{}*", &key[..key.len() - 1]),
        format!("{}\u{e9}", &key[..key.len() - 2]),
        key.to_uppercase(),
    ];
    for bad in &malformed {
        let r = http_on(&gw, "GET", OPS, bad, "").await;
        assert_eq!(r.status, 401, "{bad}: {}", r.body);
        assert!(r.body.contains("unauthorized"), "{}", r.body);
    }
    assert_eq!(refused_ws(&stack.ws_url(), "usk_short").await, 401);

    // Huge Authorization headers: refused unread, or by the server's header bound.
    let big = format!("usk_{}", "A".repeat(20_000));
    let r = http_on(&gw, "GET", OPS, &big, "").await;
    assert_eq!(r.status, 401, "{}", r.body);
    let huge = "e".repeat(1_000_000);
    // A cut-off connection (Err) is not served either.
    if let Ok(r) = http_exchange(
        "GET",
        &format!("http://{gw}/v1/status"),
        &[("Authorization", &format!("Bearer {huge}"))],
        "",
    )
    .await
    {
        assert!(r.status == 401 || r.status == 431, "{}", r.status);
    }
    // The gateway still serves.
    assert_eq!(http_on(&gw, "GET", OPS, &key, "").await.status, 200);

    // Unknown keys are answered from memory: no request reaches the bucket.
    let spy = stack.nats_client().await;
    let mut api = spy.subscribe("$JS.API.>").await.expect("subscribe");
    let mut kv_writes = spy.subscribe("$KV.>").await.expect("subscribe");
    spy.flush().await.expect("flush");
    for _ in 0..200 {
        let unknown = apikeys::generate();
        let r = http_on(&gw, "GET", OPS, &unknown, "").await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    assert_eq!(refused_ws(&stack.ws_url(), &apikeys::generate()).await, 401);
    spy.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), api.next()).await {
        seen.push(m.subject.to_string());
    }
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), kv_writes.next()).await
    {
        seen.push(m.subject.to_string());
    }
    // Reads of the bucket (a direct or stored-message get) or writes to it; not the
    // watch's upkeep, nor the good key's coalesced last-use write, which may fall in
    // this window.
    let good_used = apikeys::used_entry("acme", &apikeys::key_hash(&key).expect("hash"));
    let bucket_requests: Vec<&String> = seen
        .iter()
        .filter(|s| {
            s.contains("GET.KV_usync-apikeys")
                || (s.starts_with("$KV.usync-apikeys.") && !s.ends_with(&good_used))
        })
        .collect();
    assert!(bucket_requests.is_empty(), "{bucket_requests:?}");
    // The spy does see a read of the bucket when there is one.
    let _ = kv.get("key.acme.none").await;
    let read = tokio::time::timeout(WAIT, async {
        while let Some(m) = api.next().await {
            if m.subject.contains("GET.KV_usync-apikeys") {
                return;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the spy missed a read of the bucket");

    // At most 3 keys per org here; another org has its own count; a revoked key frees
    // its place.
    let (second, _, _) = apikeys::create(&kv, good.clone(), 3).await.expect("2nd");
    apikeys::create(&kv, good.clone(), 3).await.expect("3rd");
    let err = apikeys::create(&kv, good.clone(), 3)
        .await
        .expect_err("a 4th key");
    assert!(err.to_string().contains("at most 3"), "{err}");
    let globex = NewKey {
        org: "globex".into(),
        ..good.clone()
    };
    apikeys::create(&kv, globex, 3).await.expect("another org");
    apikeys::revoke(&kv, &second).await.expect("revoke");
    apikeys::create(&kv, good, 3)
        .await
        .expect("after a revocation");
    stack.shutdown().await;
}
