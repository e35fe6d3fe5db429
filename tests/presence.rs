//! Presence across gateways: LWW updates, the current set on join, `null` on leave,
//! on disconnect and on TTL expiry, and nothing in the op log.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::{ClientMessage, Connection, ServerMessage};
use ultrasync_shared::StreamKey;
use ultrasync_shared::nats::ops_subject;
use ultrasync_testkit::{ORG, Stack, StackOptions, read_subject};

const WAIT: Duration = Duration::from_secs(10);

async fn join(url: &str, stack: &Stack, who: &str) -> Connection {
    let mut c = Connection::connect(url, &stack.token(who, "read write"))
        .await
        .expect("connect");
    c.hello(
        ORG,
        "web",
        &format!("{who}-1"),
        BTreeMap::from([("presence".to_owned(), None)]),
    )
    .await
    .expect("hello");
    c
}

async fn show(c: &mut Connection, key: &str, payload: Value) {
    c.send(&ClientMessage::Presence {
        key: key.into(),
        payload,
    })
    .await
    .expect("send");
}

/// Waits for the presence frame `actor`/`key` with `payload`, skipping others (with
/// a 2 s TTL, entries nobody refreshes expire while a test waits for something else).
async fn expect(c: &mut Connection, actor: &str, key: &str, payload: Value) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = c
            .recv_timeout(left)
            .await
            .unwrap_or_else(|e| panic!("no presence {actor}/{key} = {payload}: {e}"));
        if let ServerMessage::Presence {
            actor_id,
            key: k,
            payload: p,
            ..
        } = frame
            && actor_id == actor
            && k == key
            && p == payload
        {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_spans_gateways_and_expires() {
    let mut stack = Stack::start_with(StackOptions {
        configure: |c| c.gateway.presence_ttl_secs = 2,
        ..Default::default()
    })
    .await;
    let second = stack.add_gateway().await;

    // Ann on gateway 1 shows her cursor; she gets her own update like everyone.
    let mut ann = join(&stack.ws_url(), &stack, "ann").await;
    show(&mut ann, "cursor", json!({"x": 1})).await;
    expect(&mut ann, "ann", "cursor", json!({"x": 1})).await;

    // Bob joins on gateway 2 and gets the current set, then live updates.
    let mut bob = join(&second, &stack, "bob").await;
    expect(&mut bob, "ann", "cursor", json!({"x": 1})).await;
    show(&mut ann, "cursor", json!({"x": 2})).await;
    expect(&mut bob, "ann", "cursor", json!({"x": 2})).await;

    // Explicit leave of one key.
    show(&mut ann, "status", json!("typing")).await;
    expect(&mut bob, "ann", "status", json!("typing")).await;
    show(&mut ann, "status", Value::Null).await;
    expect(&mut bob, "ann", "status", Value::Null).await;

    // Cid shows something and never refreshes: it expires after the TTL.
    let mut cid = join(&second, &stack, "cid").await;
    show(&mut cid, "cursor", json!({"x": 9})).await;
    expect(&mut bob, "cid", "cursor", json!({"x": 9})).await;
    let started = tokio::time::Instant::now();
    expect(&mut bob, "cid", "cursor", Value::Null).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "expired long before its TTL"
    );

    // Ann shows again, then disconnects: what she showed leaves, on both gateways.
    show(&mut ann, "cursor", json!({"x": 3})).await;
    expect(&mut bob, "ann", "cursor", json!({"x": 3})).await;
    ann.close().await;
    expect(&mut bob, "ann", "cursor", Value::Null).await;

    // A read-only token cannot show presence.
    let mut rita = Connection::connect(&stack.ws_url(), &stack.token("rita", "read"))
        .await
        .expect("connect");
    rita.hello(ORG, "web", "rita-1", BTreeMap::new())
        .await
        .expect("hello");
    show(&mut rita, "cursor", json!(1)).await;
    assert!(matches!(
        rita.recv_timeout(WAIT).await.expect("error"),
        ServerMessage::Error {
            code: ultrasync_shared::ErrorCode::Forbidden,
            ..
        }
    ));

    // Presence never reaches the op log.
    let js = stack.jetstream().await;
    let key = StreamKey::parse(ORG, "web", "presence").expect("key");
    assert!(read_subject(&js, &ops_subject(&key)).await.is_empty());
    drop((bob, cid));
    stack.shutdown().await;
}
