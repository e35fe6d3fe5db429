//! Limits at the edge, over real sockets: oversized frames (1009), foreign Origins
//! (403 before the upgrade), floods (`rate_limited`, then 1008), and a client that
//! stops reading (4001; it resumes from its cursor and gets every op).

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use ultrasync_client::{ClientError, Connection, OpType, ServerMessage};
use ultrasync_shared::ErrorCode;
use ultrasync_testkit::{Stack, StackOptions, http_get};

const WAIT: Duration = Duration::from_secs(30);

/// Reads until the server closes; returns the close code and the error codes seen.
async fn until_closed(c: &mut Connection, what: &str) -> (u16, Vec<ErrorCode>) {
    let mut codes = Vec::new();
    loop {
        match c.recv_timeout(WAIT).await {
            Ok(ServerMessage::Error { code, .. } | ServerMessage::Reject { code, .. }) => {
                codes.push(code)
            }
            Ok(_) => {}
            Err(ClientError::Closed { code, .. }) => return (code, codes),
            Err(e) => panic!("{what}: expected a close, got {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_foreign_origins_and_floods() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.gateway.allowed_origins = vec!["https://app.example".into()];
            c.gateway.max_messages_per_sec = 50;
            // Small enough that an oversize frame is read whole before the close (a
            // peer closed on with megabytes unread gets a TCP reset, not a frame).
            c.gateway.max_frame_bytes = 64 * 1024;
        },
        ..Default::default()
    })
    .await;

    // A frame over max_frame_bytes (1 MiB): 1009.
    let mut big = stack.client("bo", "web", "bo-1", &[]).await;
    let frame = format!(
        r#"{{"type":"ping","nonce":"{}"}}"#,
        "x".repeat(1024 * 1024 + 10)
    );
    big.send_raw(&frame).await.expect("send");
    let (code, _) = until_closed(&mut big, "oversized frame").await;
    assert_eq!(code, 1009);

    // A foreign Origin is refused before the upgrade; an allowed one is not.
    for (origin, want) in [
        ("https://evil.example", Some(403u16)),
        ("https://app.example", None),
    ] {
        let mut req = stack.ws_url().into_client_request().expect("request");
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", stack.token("o", "read"))
                .parse()
                .expect("header"),
        );
        req.headers_mut()
            .insert("Origin", origin.parse().expect("header"));
        match (tokio_tungstenite::connect_async(req).await, want) {
            (Err(tokio_tungstenite::tungstenite::Error::Http(resp)), Some(status)) => {
                assert_eq!(resp.status().as_u16(), status)
            }
            (Ok(_), None) => {}
            (other, _) => panic!("{origin}: unexpected {:?}", other.map(|_| ())),
        }
    }

    // A flood: 50 frames/s allowed (burst 100). 400 commands at once: the first
    // ones pass, the rest are refused with rate_limited, and the socket is closed.
    let mut flood = stack.client("fl", "web", "fl-1", &[]).await;
    for i in 0..400 {
        if flood
            .command(&format!("f{i}"), "index", "k", OpType::Set, json!(i))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, codes) = until_closed(&mut flood, "flood").await;
    assert_eq!(code, 1008);
    assert!(
        codes.contains(&ErrorCode::RateLimited),
        "no rate_limited before the close: {codes:?}"
    );

    // The server is fine: ready, and a new socket works.
    assert_eq!(
        http_get(&format!("http://{}/readyz", stack.http))
            .await
            .expect("readyz")
            .0,
        200
    );
    let mut ok = stack.client("ok", "web", "ok-1", &[]).await;
    ok.send_raw(r#"{"type":"ping","nonce":1}"#)
        .await
        .expect("send");
    assert!(matches!(
        ok.recv_timeout(WAIT).await.expect("pong"),
        ServerMessage::Pong { .. }
    ));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_resumes_without_loss() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.gateway.outbound_queue = 16,
        ..Default::default()
    })
    .await;
    let mut sleepy = stack
        .client("sleepy", "web", "sleepy-1", &[("index", Some(0))])
        .await;
    let mut steady = stack
        .client("steady", "web", "steady-1", &[("index", Some(0))])
        .await;
    let mut writer = stack.client("wr", "web", "wr-1", &[]).await;
    // 1,500 ops of 20 KiB (30 MB): far more than the socket buffers and 16 queued
    // frames of at most 512 KiB hold, at a pace a reading client keeps up with.
    const N: u64 = 1500;
    let blob = "b".repeat(20 * 1024);
    let steady_task = tokio::spawn(async move {
        let mut last = 0;
        while last < N {
            if let ServerMessage::Ops { seq_start, ops, .. } =
                steady.recv_timeout(WAIT).await.expect("steady reads")
            {
                assert_eq!(seq_start, last + 1);
                last += ops.len() as u64;
            }
        }
        last
    });
    // The writer reads its acks as it goes (at most 100 commands ahead): a client
    // that sends 30 MB without reading what comes back is itself a slow consumer.
    let mut acks = 0;
    for i in 0..N {
        writer
            .command(
                &format!("w{i}"),
                "index",
                &format!("k{i}"),
                OpType::Set,
                json!(blob),
            )
            .await
            .expect("send");
        while i + 1 - acks > 100 {
            if let ServerMessage::Ack { .. } = writer.recv_timeout(WAIT).await.expect("ack") {
                acks += 1;
            }
        }
    }
    while acks < N {
        if let ServerMessage::Ack { .. } = writer.recv_timeout(WAIT).await.expect("ack") {
            acks += 1;
        }
    }
    assert_eq!(
        steady_task.await.expect("steady"),
        N,
        "a reading client lost ops"
    );

    // The gateway gave up on the client that never read.
    let mut closed = false;
    for _ in 0..100 {
        let (_, body) = http_get(&format!("http://{}/v1/status", stack.http))
            .await
            .expect("status");
        let status: serde_json::Value = serde_json::from_str(&body).expect("json");
        if status["slow_consumers_closed"].as_u64() >= Some(1) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the slow consumer was not closed");
    // What it did receive is contiguous; then the socket ends (4001 if the close frame
    // got through, else the connection just drops).
    let mut last = 0;
    loop {
        match sleepy.recv_timeout(WAIT).await {
            Ok(ServerMessage::Ops { seq_start, ops, .. }) => {
                assert_eq!(seq_start, last + 1);
                last += ops.len() as u64;
            }
            Ok(_) => {}
            Err(ClientError::Closed { code, .. }) => {
                assert!(code == 4001 || code == 1006, "closed with {code}");
                break;
            }
            // The gateway closed its end with unread data in the socket's receive
            // buffer: the kernel answers with a reset, which is also "dropped".
            Err(ClientError::WebSocket(e)) if e.contains("Connection reset") => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        last < N,
        "the sleepy client got everything; it was not slow"
    );
    // It resumes from its cursor and gets every op after it.
    let mut again = stack
        .client("sleepy", "web", "sleepy-1", &[("index", Some(last))])
        .await;
    while last < N {
        if let ServerMessage::Ops { seq_start, ops, .. } =
            again.recv_timeout(WAIT).await.expect("resume")
        {
            assert_eq!(seq_start, last + 1, "gap after resume");
            last += ops.len() as u64;
        }
    }
    assert_eq!(last, N);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_hello_timeout() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.gateway.max_connections = 2;
            c.gateway.hello_timeout_secs = 1;
        },
        ..Default::default()
    })
    .await;
    let token = stack.token("cap", "read");
    // One socket says hello; another never does.
    let _greeted = stack.client("cap", "web", "cap-1", &[]).await;
    let mut silent = Connection::connect(&stack.ws_url(), &token)
        .await
        .expect("second socket");
    // The cap is reached: a third is refused before the upgrade.
    match Connection::connect(&stack.ws_url(), &token).await {
        Err(ClientError::Http(status)) => assert_eq!(status, 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    // The silent one is closed for sending no hello, which frees its slot.
    let (code, codes) = until_closed(&mut silent, "no hello").await;
    assert_eq!(code, 1008);
    assert!(codes.contains(&ErrorCode::InvalidMessage), "{codes:?}");
    let mut admitted = false;
    for _ in 0..100 {
        if Connection::connect(&stack.ws_url(), &token).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the freed slot was not reused");
    stack.shutdown().await;
}
