//! The shipped NATS users (`deploy/nats/users.conf`, unchanged, with random
//! passwords per test): services refuse to start before `ultrasync setup` and say
//! so; after it, a stack where every service logs in as its own user writes, acks,
//! fans out, snapshots, reads and compacts without a single permission violation;
//! and the limits hold: the gateway can neither write nor purge the op log, the
//! materializer cannot write it, only the compactor purges it; the gateway, the
//! sequencer and the compactor delete no consumer (not the materializer's) and
//! purge no snapshot; no service creates a stream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_shared::nats::{OPS_STREAM, ops_subject};
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

    // The stack, each service as its own user.
    let secret = random_secret();
    let with_secret = |user: &str| {
        let mut env = users.client_env(user);
        env.push(("ULTRASYNC_JWT_SECRET".to_owned(), secret.clone()));
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
        &["--interval-secs", "1"],
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
            ServerMessage::Ack { server_seq, .. } => assert_eq!(server_seq, i),
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
    // Let the compactor run a few passes (it reads cursors and snapshots).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let clean = violations(&nats).split_off(refused_before);
    assert!(
        clean.is_empty(),
        "the services hit permission violations:\n{}",
        clean.join("\n")
    );

    // The limits.
    let subject = ops_subject(&key("index"));
    let before = read_subject(&js_admin, &subject).await.len();
    assert_eq!(before, 3);

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
        3,
        "nothing was written or purged by the refused attempts"
    );
    let denied = violations(&nats);
    assert!(
        denied
            .iter()
            .any(|l| l.contains("\"gateway\"") || l.contains("gateway")),
        "the server logs the gateway's violations: {denied:?}"
    );

    // Another service's consumer: the materializer's durable cannot be deleted by
    // the gateway, the sequencer or the compactor (they delete no consumer on the
    // op log at all).
    let durable = "usync-materializer-m0";
    for user in ["gateway", "sequencer", "compactor"] {
        let js = short_timeout(users.connect(&url, user).await);
        assert!(
            js.delete_consumer_from_stream(durable, OPS_STREAM)
                .await
                .is_err(),
            "{user} deleted the materializer's consumer"
        );
    }
    let ops_admin = js_admin.get_stream(OPS_STREAM).await.expect("ops");
    assert!(
        ops_admin.consumer_info(durable).await.is_ok(),
        "the materializer's consumer is gone"
    );
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

    let purged = try_purge("compactor").await.expect("the compactor purges");
    assert_eq!(purged.purged, 2, "ops 1 and 2 purged, the head kept");
    let left = read_subject(&js_admin, &subject).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].server_seq, 3);
}
