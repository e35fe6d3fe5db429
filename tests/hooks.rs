//! Embedder hooks on a real gateway: authenticate, authorize, before/after apply,
//! connect/disconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use ultrasync_client::{ClientError, Connection, OpType, ServerMessage};
use ultrasync_gateway::hooks::{
    Access, Connection as Connect, ConnectionKind, HeaderMap, HookError, Hooks,
};
use ultrasync_shared::auth::Principal;
use ultrasync_shared::{CommandEnvelope, ErrorCode, StreamKey};
use ultrasync_testkit::{Stack, StackOptions, http_exchange};

#[derive(Default)]
struct Rules {
    connects: AtomicUsize,
    disconnects: AtomicUsize,
    acks: AtomicUsize,
}

impl Hooks for Rules {
    fn authenticate(&self, p: Principal, _h: &HeaderMap) -> Result<Principal, HookError> {
        if p.actor_id.as_str() == "banned" {
            return Err(HookError::forbidden("banned"));
        }
        Ok(p)
    }

    fn authorize(&self, _p: &Principal, key: &StreamKey, access: Access) -> Result<(), HookError> {
        if access == Access::Write && key.namespace.as_str() == "metadata" {
            return Err(HookError::forbidden("metadata is read-only here"));
        }
        Ok(())
    }

    fn before_apply(&self, _p: &Principal, cmd: &mut CommandEnvelope) -> Result<(), HookError> {
        if cmd.key == "locked" {
            return Err(HookError {
                code: ErrorCode::PreconditionFailed,
                message: "locked by policy".into(),
            });
        }
        if cmd.key == "shout"
            && let Value::String(s) = &cmd.payload
        {
            cmd.payload = Value::String(s.to_uppercase());
        }
        Ok(())
    }

    fn after_apply(&self, _p: &Principal, answer: &ServerMessage) {
        if matches!(answer, ServerMessage::Ack { .. }) {
            self.acks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_connect(&self, _p: &Principal, c: &Connect<'_>) -> Result<(), HookError> {
        if c.kind != ConnectionKind::Http {
            self.connects.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn on_disconnect(&self, _p: &Principal, _s: &str) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
    }
}

async fn answer(c: &mut Connection, id: &str) -> ServerMessage {
    loop {
        let m = c
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("answer");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_refuse_rewrite_and_observe() {
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let rules = Arc::new(Rules::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(ultrasync_gateway::run_with_hooks(
        stack.config.clone(),
        listener,
        stop.clone(),
        rules.clone(),
    ));
    let url = format!("ws://{addr}/v1/sync");
    let mut c = None;
    for _ in 0..100 {
        if let Ok(conn) = Connection::connect(&url, &stack.token("hana", "read write")).await {
            c = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut c = c.expect("connect");
    c.hello("acme", "web", "hana-1", Default::default())
        .await
        .expect("hello");

    // authenticate
    let banned = Connection::connect(&url, &stack.token("banned", "read write")).await;
    assert!(banned.is_err(), "a banned actor got a socket");
    let r = http_exchange(
        "GET",
        &format!("http://{addr}/v1/acme/web/index/ops"),
        &[(
            "Authorization",
            &format!("Bearer {}", stack.token("banned", "read")),
        )],
        "",
    )
    .await
    .expect("http");
    assert_eq!(r.status, 403, "{}", r.body);

    // authorize: writes to metadata refused, nothing written
    c.command("m1", "metadata", "k", OpType::Set, json!(1))
        .await
        .expect("send");
    match answer(&mut c, "m1").await {
        ServerMessage::Reject { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("{other:?}"),
    }
    // before_apply: refuse one key, rewrite another
    c.command("l1", "index", "locked", OpType::Set, json!(1))
        .await
        .expect("send");
    match answer(&mut c, "l1").await {
        ServerMessage::Reject { code, reason, .. } => {
            assert_eq!(code, ErrorCode::PreconditionFailed);
            assert_eq!(reason, "locked by policy");
        }
        other => panic!("{other:?}"),
    }
    c.command("s1", "index", "shout", OpType::Set, json!("hello"))
        .await
        .expect("send");
    match answer(&mut c, "s1").await {
        ServerMessage::Ack { op, server_seq, .. } => {
            assert_eq!(op.payload, json!("HELLO"));
            assert_eq!(server_seq, 1, "a refused command was written");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rules.acks.load(Ordering::Relaxed), 1);
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rules.disconnects.load(Ordering::Relaxed) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no disconnect hook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rules.connects.load(Ordering::Relaxed), 1);
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), gateway).await;
    stack.shutdown().await;
}

/// The runnable example's hooks (`gateway/examples/embed.rs`), compiled here too.
#[path = "../gateway/examples/embed.rs"]
#[allow(dead_code)]
mod embed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deciding_hooks_accept_their_own_credentials_and_refuse_connections() {
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(ultrasync_gateway::run_with_hooks(
        stack.config.clone(),
        listener,
        stop.clone(),
        Arc::new(embed::TeamHooks::demo()),
    ));
    let url = format!("ws://{addr}/v1/sync");
    let get = |bearer: String| async move {
        http_exchange(
            "GET",
            &format!("http://{addr}/v1/acme/web/index/ops?since=0"),
            &[("Authorization", &format!("Bearer {bearer}"))],
            "",
        )
        .await
        .expect("http")
    };
    let mut alice = None;
    for _ in 0..100 {
        if let Ok(conn) = Connection::connect(&url, "team_s3cret").await {
            alice = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A credential the server does not know, accepted by the hook: WebSocket, HTTP.
    let mut alice = alice.expect("the hook's credential opens a socket");
    alice
        .hello("acme", "web", "alice-1", Default::default())
        .await
        .expect("hello");
    alice
        .command("a1", "index", "k", OpType::Set, json!("hi"))
        .await
        .expect("send");
    match answer(&mut alice, "a1").await {
        ServerMessage::Ack { op, .. } => assert_eq!(op.actor_id, "alice"),
        other => panic!("{other:?}"),
    }
    let r = get("team_s3cret".into()).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // One the hook refuses: 401 on both doors, whatever the server would say.
    let r = get("team_unknown".into()).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(matches!(
        Connection::connect(&url, "team_unknown").await,
        Err(ClientError::Http(401))
    ));

    // on_connect refuses a blocked actor with its code (429 here), before the upgrade
    // and before an HTTP request is handled; the same for a JWT of that actor.
    for bearer in [
        "team_b4nned".to_owned(),
        stack.token("mallory", "read write"),
    ] {
        assert!(matches!(
            Connection::connect(&url, &bearer).await,
            Err(ClientError::Http(429))
        ));
        let r = get(bearer).await;
        assert_eq!(r.status, 429, "{}", r.body);
        assert!(r.body.contains("rate_limited"), "{}", r.body);
    }

    // Everything else is still the server's: JWTs verified, garbage refused.
    let r = get(stack.token("bob", "read")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    Connection::connect(&url, &stack.token("bob", "read"))
        .await
        .expect("a JWT")
        .close()
        .await;
    assert_eq!(get("not-a-jwt".into()).await.status, 401);

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), gateway).await;
    stack.shutdown().await;
}
