//! The bad-input table over real sockets: each row is sent by a client and must get
//! its documented code while the socket (or, for fatal rows, the server) stays
//! healthy, and nothing reaches the op log. Oversized frames, foreign Origins and
//! expired tokens have their own suites (`limits`, `auth`); they are listed in
//! `ARCHITECTURE.md` with the rest.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use ultrasync_client::{ClientError, Connection, ServerMessage};
use ultrasync_shared::ErrorCode;
use ultrasync_shared::nats::OPS_STREAM;
use ultrasync_testkit::{Stack, StackOptions};

const WAIT: Duration = Duration::from_secs(10);

/// The first `error` or `reject` after sending `frame` (pongs and acks skipped).
async fn answer_code(c: &mut Connection, frame: &str) -> ErrorCode {
    c.send_raw(frame).await.expect("send");
    loop {
        match c
            .recv_timeout(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{frame}: no answer ({e})"))
        {
            ServerMessage::Error { code, .. } | ServerMessage::Reject { code, .. } => {
                return code;
            }
            ServerMessage::Welcome { .. } => panic!("{frame}: accepted"),
            _ => {}
        }
    }
}

async fn ops_in_log(stack: &Stack) -> u64 {
    let js = stack.jetstream().await;
    let mut s = js.get_stream(OPS_STREAM).await.expect("ops");
    s.info().await.expect("info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_code_and_writes_nothing() {
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let hello = |org: &str, project: &str, client: &str| {
        json!({"type": "hello", "protocol": 1, "org_id": org, "project_id": project,
               "client_id": client, "cursors": {}})
        .to_string()
    };
    let command = |ns: &str, key: &str| {
        json!({"type": "command", "command_id": "c1", "namespace": ns, "key": key,
               "op_type": "set", "payload": 1})
        .to_string()
    };

    // Before hello: rows about the handshake itself, each on a fresh socket (a hello
    // that is refused ends its socket with 1008 after the error frame).
    let long = "x".repeat(65);
    let pre_rows: Vec<(String, String, ErrorCode)> = vec![
        (
            "invalid JSON".into(),
            "{not json".into(),
            ErrorCode::InvalidMessage,
        ),
        (
            "unknown type".into(),
            r#"{"type":"teleport"}"#.into(),
            ErrorCode::InvalidMessage,
        ),
        (
            "command before hello".into(),
            command("index", "k"),
            ErrorCode::InvalidMessage,
        ),
        (
            "org with .".into(),
            hello("ac.me", "web", "c"),
            ErrorCode::InvalidId,
        ),
        (
            "project with *".into(),
            hello("acme", "w*", "c"),
            ErrorCode::InvalidId,
        ),
        (
            "project with >".into(),
            hello("acme", "w>", "c"),
            ErrorCode::InvalidId,
        ),
        (
            "client with space".into(),
            hello("acme", "web", "a b"),
            ErrorCode::InvalidId,
        ),
        (
            "client with $".into(),
            hello("acme", "web", "$sys"),
            ErrorCode::InvalidId,
        ),
        (
            "over-long client id".into(),
            hello("acme", "web", &long),
            ErrorCode::InvalidId,
        ),
        (
            "another org in the body".into(),
            hello("globex", "web", "c"),
            ErrorCode::Forbidden,
        ),
    ];
    for (what, frame, want) in &pre_rows {
        let mut c = Connection::connect(&stack.ws_url(), &stack.token("pat", "read write"))
            .await
            .expect("connect");
        assert_eq!(answer_code(&mut c, frame).await, *want, "{what}");
    }
    let mut pre = Connection::connect(&stack.ws_url(), &stack.token("pat", "read write"))
        .await
        .expect("connect");
    pre.hello("acme", "web", "pat-1", BTreeMap::new())
        .await
        .expect("hello");

    // After hello: bad commands are rejected and the socket goes on.
    let post_rows: Vec<(&str, String, ErrorCode)> = vec![
        ("namespace with .", command("in.dex", "k"), ErrorCode::InvalidId),
        ("namespace with >", command(">", "k"), ErrorCode::InvalidId),
        ("unknown namespace", command("nowhere", "k"), ErrorCode::UnknownNamespace),
        ("empty key", command("index", ""), ErrorCode::InvalidKey),
        ("key with a control char", command("index", "a\u{1}b"), ErrorCode::InvalidKey),
        (
            "unknown op type",
            r#"{"type":"command","command_id":"c2","namespace":"index","key":"k","op_type":"drop","payload":1}"#.into(),
            ErrorCode::InvalidMessage,
        ),
        (
            "empty command id",
            r#"{"type":"command","command_id":"","namespace":"index","key":"k","op_type":"set","payload":1}"#.into(),
            ErrorCode::InvalidId,
        ),
        (
            "crdt change that is not base64",
            r#"{"type":"command","command_id":"c3","namespace":"collab","key":"k","op_type":"crdt_op","payload":{"change":"%%%"}}"#.into(),
            ErrorCode::InvalidOp,
        ),
    ];
    for (what, frame, want) in &post_rows {
        assert_eq!(answer_code(&mut pre, frame).await, *want, "{what}");
    }

    // A read token writing.
    let mut reader = stack.client_with_scope("rex", "web", "rex-1", "read").await;
    assert_eq!(
        answer_code(&mut reader, &command("index", "k")).await,
        ErrorCode::Forbidden,
        "read token writing"
    );
    assert_eq!(ops_in_log(&stack).await, 0, "a bad input was written");

    // A flood of 10,000 frames as fast as the socket takes them: refused with
    // rate_limited, then closed (1008); the server and other sockets carry on.
    let mut flood = stack.client("fl", "web", "fl-1", &[]).await;
    let mut calm = stack.client("ca", "web", "ca-1", &[]).await;
    let mut sent = 0;
    let started = std::time::Instant::now();
    for i in 0..10_000 {
        if flood
            .send_raw(&format!(r#"{{"type":"ping","nonce":{i}}}"#))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let took = started.elapsed().as_secs_f64();
    // Every frame is answered (pong, or rate_limited) until the server gives up on
    // the socket (1008, when a whole burst in a row was refused).
    let mut limited = 0;
    let mut other = 0;
    let mut closed = None;
    while limited + other < sent {
        match flood.recv_timeout(WAIT).await {
            Ok(ServerMessage::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::RateLimited);
                limited += 1;
            }
            Ok(_) => other += 1,
            Err(ClientError::Closed { code, .. }) => {
                closed = Some(code);
                break;
            }
            Err(e) => panic!("flood: {e} after {limited} refusals and {other} other frames"),
        }
    }
    assert!(limited > 0, "no rate_limited in a flood of {sent}");
    // At most the burst (2,000) plus 1,000 per second of sending got through.
    let allowed = 2000 + (1000.0 * (took + 0.5)) as usize;
    assert!(
        other <= allowed,
        "{other} of {sent} frames passed a limit of 1000/s in {took:.2} s"
    );
    match closed {
        Some(code) => assert!(code == 1008 || code == 1006, "flood closed with {code}"),
        // Not closed: once the bucket refills, the socket works again.
        None => {
            tokio::time::sleep(Duration::from_millis(2100)).await;
            flood
                .send_raw(r#"{"type":"ping","nonce":"after"}"#)
                .await
                .expect("ping");
            assert!(matches!(
                flood.recv_timeout(WAIT).await.expect("pong"),
                ServerMessage::Pong { .. }
            ));
        }
    }
    let (status, _) = ultrasync_testkit::http_get(&format!("http://{}/healthz", stack.http))
        .await
        .expect("healthz");
    assert_eq!(status, 200);
    calm.command("ok1", "index", "k", ultrasync_client::OpType::Set, json!(1))
        .await
        .expect("send");
    loop {
        match calm.recv_timeout(WAIT).await.expect("ack") {
            ServerMessage::Ack { server_seq, .. } => {
                assert_eq!(server_seq, 1);
                break;
            }
            ServerMessage::Reject { reason, .. } => panic!("{reason}"),
            _ => {}
        }
    }
    assert_eq!(ops_in_log(&stack).await, 1);
    stack.shutdown().await;
}
