//! The shipped NATS users (`deploy/nats/users.conf`, unchanged, with random
//! passwords per test): services refuse to start before `ultrasync setup` and say
//! so; after it, a stack where every service logs in as its own user writes, acks,
//! fans out, snapshots, reads, delivers webhooks (to a receiver in the test, and to
//! an endpoint that never answers: dead letters) and compacts (the compactor purges
//! the ops below the floor and writes their commands to `usync-commands`) without a
//! single permission violation; and the limits hold: the gateway can neither write
//! (publish to `usync.ops.>`) nor purge the op log, the materializer and the
//! compactor cannot write it, only the compactor purges it; the gateway, the
//! sequencer and the compactor delete no consumer (not the materializer's, not a
//! webhook's) and purge no snapshot; no service creates a stream.
//!
//! Proven elsewhere: a server without the route credentials cannot join the
//! cluster as a route (`tests/nats_tls.rs`,
//! `a_cluster_with_tls_routes_runs_the_pipeline_and_admits_no_stranger`); the
//! reader of the op log starts over without deleting a consumer
//! (`tests/log_reader.rs`). Not enforceable, so not asserted (ARCHITECTURE.md,
//! "What subject permissions cannot enforce"): the materializer deleting a
//! webhook's consumer (a consumer name is one subject token), and the
//! materializer emptying the snapshot store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_gateway::webhooks::{DLQ_STREAM, signature};
use ultrasync_shared::nats::{COMMANDS_BUCKET, OPS_STREAM, command_kv_key, ops_subject};
use ultrasync_shared::op::command_key_hex;
use ultrasync_shared::{StreamKey, reads};
use ultrasync_testkit::{
    GatewayProcess, NatsServer, NatsUsers, ORG, ServiceProcess, http_request, random_secret,
    read_subject, recv_until, token_for,
};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ultrasync"))
}

fn key(ns: &str) -> StreamKey {
    StreamKey::parse(ORG, "web", ns).expect("key")
}

/// Runs `ultrasync {args}` as `user` to completion: (success, stdout + stderr).
async fn run_as(users: &NatsUsers, url: &str, user: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .args(["--nats-url", url])
        .envs(users.client_env(user))
        .env("ULTRASYNC_LOG", "warn");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run ultrasync");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A refused JetStream request gets no answer; wait 2 s for it, not the default 5.
fn short_timeout(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}

/// One POST received by [`receiver`]: its `Usync-Event`, its body, and whether
/// its signature verifies with `secret`.
#[derive(Debug, Clone)]
struct Received {
    event: String,
    body: Value,
    signed: bool,
}

/// A minimal webhook endpoint (as in `tests/webhooks.rs`): records each POST and
/// answers 200. Returns its URL.
async fn receiver(secret: String, got: Arc<Mutex<Vec<Received>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let got = got.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse().ok())
                            })
                            .unwrap_or(0);
                        if rest.len() >= len {
                            break (head.to_owned(), rest[..len].to_owned());
                        }
                    }
                };
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                let ts: u64 = header("usync-timestamp")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let signed = header("usync-signature")
                    == Some(signature(secret.as_bytes(), ts, body.as_bytes()));
                got.lock().expect("lock").push(Received {
                    event: header("usync-event").unwrap_or_default(),
                    body: serde_json::from_str(&body).unwrap_or(Value::Null),
                    signed,
                });
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    format!("http://{addr}/hook")
}

/// Polls `check` every 200 ms for up to `secs` seconds; whether it came true.
async fn eventually<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn violations(nats: &NatsServer) -> Vec<String> {
    std::fs::read_to_string(nats.log_file())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_as_their_users_and_only_within_their_permissions() {
    ultrasync_testkit::init_tracing();
    let users = NatsUsers::random();
    let nats = NatsServer::start_with_users(&users);
    let url = nats.url().to_owned();

    // No anonymous access.
    assert!(
        async_nats::connect(&url).await.is_err(),
        "users.conf must require a login"
    );

    // Before `setup`, a service user cannot create the layout and says what to do.
    let (ok, out) = run_as(&users, &url, "sequencer", &["sequencer"]).await;
    assert!(!ok, "a sequencer without a layout must not start: {out}");
    assert!(out.contains("ultrasync setup"), "unhelpful error: {out}");

    // The operator runs `setup` as admin.
    let (ok, out) = run_as(&users, &url, "admin", &["setup"]).await;
    assert!(ok, "setup failed: {out}");
    assert!(out.contains("USYNC_OPS"), "{out}");
    // Again: it is idempotent.
    let (ok, out) = run_as(&users, &url, "admin", &["setup"]).await;
    assert!(ok, "second setup failed: {out}");
    // The refused creation above is logged; what follows must add nothing.
    let refused_before = violations(&nats).len();
    assert!(refused_before > 0, "the refused stream creation is logged");

    // The stack, each service as its own user; the gateway delivers two webhooks:
    // one to a receiver here, one to an endpoint that never answers (its ops end
    // in the dead-letter stream).
    let secret = random_secret();
    let hook_secret = random_secret();
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let hook_url = receiver(hook_secret.clone(), received.clone()).await;
    let conf_dir = tempfile::tempdir().expect("tmp");
    let conf = conf_dir.path().join("ultrasync.toml");
    std::fs::write(
        &conf,
        format!(
            "[[webhooks]]\nname = \"live\"\nurl = \"{hook_url}\"\nsecret = \"{hook_secret}\"\n\
             org = \"{ORG}\"\nproject = \"web\"\nbackoff_ms = 100\n\n\
             [[webhooks]]\nname = \"nowhere\"\nurl = \"http://127.0.0.1:1/hook\"\n\
             secret = \"{hook_secret}\"\norg = \"{ORG}\"\nproject = \"web\"\n\
             max_attempts = 2\nbackoff_ms = 100\n"
        ),
    )
    .expect("gateway config");
    let with_secret = |user: &str| {
        let mut env = users.client_env(user);
        env.push(("ULTRASYNC_JWT_SECRET".to_owned(), secret.clone()));
        env.push((
            "ULTRASYNC_CONFIG".to_owned(),
            conf.to_string_lossy().into_owned(),
        ));
        env
    };
    let gateway = GatewayProcess::start(&bin(), &url, &with_secret("gateway")).await;
    let _sequencer = ServiceProcess::spawn_with_env(
        &bin(),
        "sequencer",
        &url,
        &[],
        &users.client_env("sequencer"),
    );
    let mat_dir = tempfile::tempdir().expect("tmp");
    let mat_path = mat_dir.path().to_string_lossy().into_owned();
    let _materializer = ServiceProcess::spawn_with_env(
        &bin(),
        "materializer",
        &url,
        &[
            "--data-dir",
            &mat_path,
            "--name",
            "m0",
            "--snapshot-every-ops",
            "2",
        ],
        &users.client_env("materializer"),
    );
    let _compactor = ServiceProcess::spawn_with_env(
        &bin(),
        "compactor",
        &url,
        // Everything below the floor goes, so that it purges during the test.
        &["--interval-secs", "1", "--retention-ops", "0"],
        &users.client_env("compactor"),
    );

    // Write, ack, live fan-out to a second client, cursor report.
    let token = token_for(&secret, "alice", "read write");
    let mut watcher = Connection::connect(&gateway.ws_url(), &token)
        .await
        .expect("connect");
    watcher
        .hello(
            ORG,
            "web",
            "watcher",
            BTreeMap::from([("index".to_owned(), Some(0))]),
        )
        .await
        .expect("hello");
    recv_until(&mut watcher, Duration::from_secs(10), |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("watcher synced");

    let mut writer = Connection::connect(&gateway.ws_url(), &token)
        .await
        .expect("connect");
    writer
        .hello(ORG, "web", "writer", BTreeMap::new())
        .await
        .expect("hello");
    let mut acked = Vec::new();
    for i in 1..=3u64 {
        writer
            .command(&format!("c{i}"), "index", "greeting", OpType::Set, json!(i))
            .await
            .expect("send");
        match writer
            .recv_timeout(Duration::from_secs(30))
            .await
            .expect("answer")
        {
            ServerMessage::Ack { server_seq, op, .. } => {
                assert_eq!(server_seq, i);
                acked.push(op);
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let mut seen = 0;
    recv_until(&mut watcher, Duration::from_secs(10), |m| {
        if let ServerMessage::Ops { ops, .. } = m {
            seen += ops.len();
        }
        seen >= 3
    })
    .await
    .expect("the watcher sees the ops live");
    writer
        .send(&ultrasync_shared::protocol::ClientMessage::Cursor {
            namespace: "index".to_owned(),
            server_seq: 3,
        })
        .await
        .expect("cursor");

    // Read it back through the gateway from the materializer (read-your-writes),
    // once the materializer process serves reads.
    let read_url = format!(
        "http://{}/v1/{ORG}/web/index/keys/greeting?min_seq=3",
        gateway.addr
    );
    let auth = format!("Bearer {token}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        let (status, body) = http_request("GET", &read_url, &[("Authorization", &auth)], "")
            .await
            .expect("http");
        if status != 503 || std::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"value\":3"), "{body}");

    // A snapshot is written (materializer) and served to a new client (gateway).
    let admin = users.connect(&url, "admin").await;
    let js_admin = async_nats::jetstream::new(admin.clone());
    let store = js_admin
        .get_object_store(ultrasync_shared::nats::SNAPSHOTS_BUCKET)
        .await
        .expect("snapshot store");
    let mut snapshotted = false;
    for _ in 0..100 {
        if let Ok(Some(s)) = ultrasync_shared::snapshot::fetch(&store, &key("index")).await
            && s.state.last_seq >= 2
        {
            snapshotted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(snapshotted, "the materializer wrote no snapshot");
    let mut fresh = Connection::connect(&gateway.ws_url(), &token)
        .await
        .expect("connect");
    fresh
        .hello(
            ORG,
            "web",
            "fresh",
            BTreeMap::from([("index".to_owned(), None)]),
        )
        .await
        .expect("hello");
    let frames = recv_until(&mut fresh, Duration::from_secs(10), |m| {
        matches!(m, ServerMessage::Synced { .. })
    })
    .await
    .expect("bootstrap");
    assert!(
        frames
            .iter()
            .any(|m| matches!(m, ServerMessage::Snapshot { .. })),
        "a null cursor gets the snapshot: {frames:?}"
    );
    let digest = reads::digest(&admin, &key("index"), Some(3))
        .await
        .expect("digest");
    assert_eq!(digest.last_server_seq, 3);

    // Every op reaches the receiver, signed (the gateway's webhook consumer, acks);
    // the endpoint that never answers gets its ops dead-lettered.
    let want: BTreeSet<String> = acked.iter().map(|op| op.op_id.clone()).collect();
    let (got, want) = (&received, &want);
    let delivered = eventually(60, || async move {
        let got = got.lock().expect("lock");
        let committed: BTreeSet<String> = got
            .iter()
            .filter(|r| r.event == "op.committed")
            .filter_map(|r| r.body["op"]["op_id"].as_str().map(str::to_owned))
            .collect();
        committed == *want
    })
    .await;
    assert!(
        delivered,
        "the webhook did not deliver every op: {:?}",
        received.lock().expect("lock")
    );
    assert!(
        received.lock().expect("lock").iter().all(|r| r.signed),
        "a webhook signature did not verify"
    );
    let js = &js_admin;
    let dead_lettered = eventually(60, || async move {
        let mut dlq = js.get_stream(DLQ_STREAM).await.expect("dlq");
        dlq.info().await.expect("info").state.messages >= 3
    })
    .await;
    assert!(
        dead_lettered,
        "the ops of the dead endpoint were not dead-lettered"
    );

    // Every client at the head: the compactor purges ops 1 and 2 (the snapshot is
    // at 2; the head is always kept), after writing their commands.
    for client in [&mut watcher, &mut fresh] {
        client
            .send(&ultrasync_shared::protocol::ClientMessage::Cursor {
                namespace: "index".to_owned(),
                server_seq: 3,
            })
            .await
            .expect("cursor");
    }
    let subject = ops_subject(&key("index"));
    let compacted = eventually(60, || {
        let subject = &subject;
        async move {
            let left = read_subject(js, subject).await;
            left.len() == 1 && left[0].server_seq == 3
        }
    })
    .await;
    assert!(
        compacted,
        "the compactor did not purge ops 1 and 2: {:?}",
        read_subject(&js_admin, &subject)
            .await
            .iter()
            .map(|e| e.server_seq)
            .collect::<Vec<_>>()
    );
    let commands = js_admin
        .get_key_value(COMMANDS_BUCKET)
        .await
        .expect("usync-commands");
    for op in &acked[..2] {
        let k = command_kv_key(
            &key("index"),
            &command_key_hex(&op.actor_id, &op.command_id),
        );
        let v = commands.get(&k).await.expect("kv get");
        assert_eq!(
            v.as_deref(),
            Some(format!("{} {}", op.server_seq, op.op_id).as_bytes()),
            "the command of purged op {} is remembered",
            op.server_seq
        );
    }

    // API keys: made by admin, followed by the gateway, which writes only their
    // last use; the same for a revoked token.
    let (ok, out) = run_as(
        &users,
        &url,
        "admin",
        &[
            "apikey", "create", "--org", ORG, "--name", "agent", "--scope", "read",
        ],
    )
    .await;
    assert!(ok, "apikey create as admin: {out}");
    let at = out.find("usk_").expect("the key is printed");
    let api_key = out[at..at + ultrasync_shared::apikeys::KEY_LEN].to_owned();
    let key_url = format!("http://{}/v1/{ORG}/web/index/ops?since=3", gateway.addr);
    let key_auth = format!("Bearer {api_key}");
    let (status, body) = http_request("GET", &key_url, &[("Authorization", &key_auth)], "")
        .await
        .expect("http");
    assert_eq!(status, 200, "{body}");
    let apikeys_admin = js_admin
        .get_key_value(ultrasync_shared::apikeys::APIKEYS_BUCKET)
        .await
        .expect("usync-apikeys");
    let hash = ultrasync_shared::apikeys::key_hash(&api_key).expect("hash");
    let used = ultrasync_shared::apikeys::used_entry(ORG, &hash);
    let (kv, used_key) = (&apikeys_admin, &used);
    assert!(
        eventually(30, || async move {
            kv.get(used_key).await.ok().flatten().is_some()
        })
        .await,
        "the gateway did not write the key's last use"
    );
    let (ok, out) = run_as(&users, &url, "admin", &["revoke-token", "--jti", "j-1"]).await;
    assert!(ok, "revoke-token as admin: {out}");

    let clean = violations(&nats).split_off(refused_before);
    assert!(
        clean.is_empty(),
        "the services hit permission violations:\n{}",
        clean.join("\n")
    );

    // The limits.
    let before = read_subject(&js_admin, &subject).await.len();
    assert_eq!(before, 1);

    let try_write = |user: &'static str| {
        let users = &users;
        let url = url.clone();
        let subject = subject.clone();
        async move {
            let js = short_timeout(users.connect(&url, user).await);
            match js.publish(subject, "forged".into()).await {
                Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack)
                    .await
                    .is_ok_and(|a| a.is_ok()),
                Err(_) => false,
            }
        }
    };
    let try_purge = |user: &'static str| {
        let users = &users;
        let url = url.clone();
        let subject = subject.clone();
        async move {
            let js = short_timeout(users.connect(&url, user).await);
            let ops = js.get_stream(OPS_STREAM).await.expect("stream info");
            ops.purge().filter(subject).sequence(3).await
        }
    };
    assert!(
        !try_write("gateway").await,
        "the gateway wrote to the op log"
    );
    assert!(
        !try_write("materializer").await,
        "the materializer wrote to the op log"
    );
    assert!(
        !try_write("compactor").await,
        "the compactor wrote to the op log"
    );
    assert!(
        try_purge("gateway").await.is_err(),
        "the gateway purged the op log"
    );
    assert!(
        try_purge("materializer").await.is_err(),
        "the materializer purged the op log"
    );
    assert!(
        try_purge("sequencer").await.is_err(),
        "the sequencer purged the op log"
    );
    assert_eq!(
        read_subject(&js_admin, &subject).await.len(),
        1,
        "nothing was written or purged by the refused attempts"
    );
    let denied = violations(&nats);
    assert!(
        denied
            .iter()
            .any(|l| l.contains("\"gateway\"") || l.contains("gateway")),
        "the server logs the gateway's violations: {denied:?}"
    );

    // Keys and revocations are admin's: the gateway may write a key's last use only.
    let gateway_kv = short_timeout(users.connect(&url, "gateway").await)
        .get_key_value(ultrasync_shared::apikeys::APIKEYS_BUCKET)
        .await
        .expect("the gateway opens usync-apikeys");
    for forged in [
        ultrasync_shared::apikeys::record_entry(ORG, &"f".repeat(64)),
        ultrasync_shared::apikeys::sub_entry(ORG, "alice"),
        ultrasync_shared::apikeys::record_entry(ORG, &hash),
    ] {
        let put =
            tokio::time::timeout(Duration::from_secs(5), gateway_kv.put(&forged, "{}".into()))
                .await;
        assert!(!matches!(put, Ok(Ok(_))), "the gateway wrote {forged}");
    }
    assert!(
        apikeys_admin
            .get(ultrasync_shared::apikeys::record_entry(
                ORG,
                &"f".repeat(64)
            ))
            .await
            .expect("get")
            .is_none()
    );

    // Another service's consumer: the materializer's and the webhooks' durables
    // cannot be deleted by the gateway, the sequencer or the compactor (they
    // delete no consumer on the op log at all). (The materializer may delete any:
    // not enforceable, see the header.)
    let ops_admin = js_admin.get_stream(OPS_STREAM).await.expect("ops");
    for durable in ["usync-materializer-m0", "usync-webhook-live"] {
        for user in ["gateway", "sequencer", "compactor"] {
            let js = short_timeout(users.connect(&url, user).await);
            assert!(
                js.delete_consumer_from_stream(durable, OPS_STREAM)
                    .await
                    .is_err(),
                "{user} deleted {durable}"
            );
        }
        assert!(
            ops_admin.consumer_info(durable).await.is_ok(),
            "{durable} is gone"
        );
    }
    // The snapshot store: only the materializer writes it; nobody else purges it.
    let snapshots_stream = format!("OBJ_{}", ultrasync_shared::nats::SNAPSHOTS_BUCKET);
    let stored = |js: async_nats::jetstream::Context| {
        let name = snapshots_stream.clone();
        async move {
            let mut s = js.get_stream(name).await.expect("snapshot stream");
            s.info().await.expect("info").state.messages
        }
    };
    let snapshot_messages = stored(js_admin.clone()).await;
    assert!(snapshot_messages > 0);
    for user in ["gateway", "sequencer", "compactor"] {
        let js = short_timeout(users.connect(&url, user).await);
        let stream = js
            .get_stream(snapshots_stream.clone())
            .await
            .expect("snapshot stream info");
        assert!(
            stream.purge().await.is_err(),
            "{user} purged the snapshot store"
        );
    }
    assert_eq!(
        stored(js_admin.clone()).await,
        snapshot_messages,
        "the snapshot store was purged"
    );
    // Streams are made by `setup` as admin, never by a service.
    for user in ["gateway", "sequencer", "materializer", "compactor"] {
        let js = short_timeout(users.connect(&url, user).await);
        assert!(
            js.create_stream(async_nats::jetstream::stream::Config {
                name: format!("FORGED_{user}"),
                subjects: vec![format!("forged.{user}.>")],
                ..Default::default()
            })
            .await
            .is_err(),
            "{user} created a stream"
        );
    }
    assert!(js_admin.get_stream("FORGED_gateway").await.is_err());

    // The compactor's purge is accepted (ops 1 and 2 are already gone).
    let purged = try_purge("compactor").await.expect("the compactor purges");
    assert_eq!(purged.purged, 0);
    let left = read_subject(&js_admin, &subject).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].server_seq, 3);
}
