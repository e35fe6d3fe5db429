//! Bounded gateway internals (SPEC invariant 9), against a real stack: presence keys
//! per client and bytes per entry, one org's share of the command queue, and the
//! gateway's maps (topics, presence tables, publisher keys) shrinking again once
//! nobody uses them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::{ClientMessage, Connection, OpType, ServerMessage};
use ultrasync_shared::{ErrorCode, auth};
use ultrasync_testkit::{ORG, Stack, StackOptions, http_get};

const WAIT: Duration = Duration::from_secs(10);

async fn join(stack: &Stack, who: &str, namespaces: &[&str]) -> Connection {
    let mut c = Connection::connect(&stack.ws_url(), &stack.token(who, "read write"))
        .await
        .expect("connect");
    let cursors: BTreeMap<String, Option<u64>> =
        namespaces.iter().map(|n| ((*n).to_owned(), None)).collect();
    c.hello(ORG, "web", &format!("{who}-1"), cursors)
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

/// Waits for the presence frame `actor`/`key` = `want` (`Ok`) or an error (`Err`),
/// skipping other frames.
async fn presence_or_error(
    c: &mut Connection,
    actor: &str,
    key: &str,
    want: Value,
) -> Result<(), ErrorCode> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await {
            Ok(ServerMessage::Presence {
                actor_id,
                key: k,
                payload,
                ..
            }) if actor_id == actor && k == key && payload == want => return Ok(()),
            Ok(ServerMessage::Error { code, .. }) => return Err(code),
            Ok(_) => {}
            Err(e) => panic!("no presence {actor}/{key} = {want} nor an error: {e}"),
        }
    }
}

/// The gauge `name` on `/metrics`.
async fn gauge(stack: &Stack, name: &str) -> u64 {
    let (status, body) = http_get(&format!("http://{}/metrics", stack.http))
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} on /metrics"))
}

/// Waits until the gauge `name` is `want`.
async fn gauge_becomes(stack: &Stack, name: &str, want: u64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = gauge(stack, name).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_bounded_per_client_and_per_entry() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.gateway.presence_keys_per_client = 4;
            c.gateway.presence_payload_bytes = 1024;
        },
        ..Default::default()
    })
    .await;
    let mut ann = join(&stack, "ann", &["presence"]).await;
    let mut bob = join(&stack, "bob", &["presence"]).await;

    // Ann shows as many keys as a client may; one more is refused, and not shown.
    for i in 0..4 {
        let key = format!("k{i}");
        show(&mut ann, &key, json!(i)).await;
        assert_eq!(
            presence_or_error(&mut ann, "ann", &key, json!(i)).await,
            Ok(())
        );
    }
    show(&mut ann, "k4", json!(4)).await;
    assert_eq!(
        presence_or_error(&mut ann, "ann", "k4", json!(4)).await,
        Err(ErrorCode::RateLimited)
    );
    // Refreshing a key she shows is no new key.
    show(&mut ann, "k0", json!("again")).await;
    assert_eq!(
        presence_or_error(&mut ann, "ann", "k0", json!("again")).await,
        Ok(())
    );
    // A payload over presence_payload_bytes (far below the namespace's value limit).
    let big = json!("x".repeat(2000));
    show(&mut ann, "k1", big.clone()).await;
    assert_eq!(
        presence_or_error(&mut ann, "ann", "k1", big).await,
        Err(ErrorCode::PayloadTooLarge)
    );

    // Bob, another client in the same room, is not affected.
    show(&mut bob, "cursor", json!({"x": 1})).await;
    assert_eq!(
        presence_or_error(&mut ann, "bob", "cursor", json!({"x": 1})).await,
        Ok(())
    );

    // Ann leaves one key: a new one fits again; Bob sees both.
    show(&mut ann, "k0", Value::Null).await;
    assert_eq!(
        presence_or_error(&mut bob, "ann", "k0", Value::Null).await,
        Ok(())
    );
    show(&mut ann, "k4", json!(4)).await;
    assert_eq!(
        presence_or_error(&mut bob, "ann", "k4", json!(4)).await,
        Ok(())
    );
    assert_eq!(
        gauge(&stack, "ultrasync_gateway_presence_shown_keys").await,
        5
    );
    assert_eq!(gauge(&stack, "ultrasync_gateway_presence_rooms").await, 1);

    // Everyone leaves: the table and what they showed go away.
    ann.close().await;
    bob.close().await;
    gauge_becomes(&stack, "ultrasync_gateway_presence_rooms", 0, WAIT).await;
    gauge_becomes(&stack, "ultrasync_gateway_presence_shown_keys", 0, WAIT).await;
    stack.shutdown().await;
}

/// POSTs `n` commands to `org`'s `index` namespace; returns each answer's type and code.
async fn batch(
    stack: &Stack,
    token: &str,
    org: &str,
    tag: &str,
    n: usize,
) -> Vec<(String, String)> {
    let commands: Vec<Value> = (0..n)
        .map(|i| json!({"command_id": format!("{tag}-{i}"), "key": format!("k{i}"), "op_type": "set", "payload": i}))
        .collect();
    let body = json!({"client_id": format!("{tag}-cli"), "commands": commands}).to_string();
    let r = stack
        .http(
            "POST",
            &format!("/v1/{org}/web/index/commands"),
            token,
            &body,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).expect("json");
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|m| {
            (
                m["type"].as_str().unwrap_or("").to_owned(),
                m["code"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_org_flooding_the_command_queue_does_not_stop_another() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| {
            c.gateway.org_max_inflight_commands = 4;
        },
        ..Default::default()
    })
    .await;
    let flooder = stack.token("flo", "read write");
    let other_org = "globex";
    let other = auth::mint_hs256(
        stack.secret.as_bytes(),
        &auth::claims(
            "gil",
            other_org,
            &["*"],
            "read write",
            3600,
            auth::DEFAULT_AUDIENCE,
        ),
    )
    .expect("mint");

    // acme floods over HTTP (three batches at once) and over a socket; globex writes
    // meanwhile.
    let floods: Vec<_> = (0..3)
        .map(|i| {
            let (stack, token) = (&stack, flooder.clone());
            async move { batch(stack, &token, ORG, &format!("h{i}"), 500).await }
        })
        .collect();
    let mut ws = join(&stack, "wes", &[]).await;
    let socket_flood = async {
        for i in 0..300 {
            ws.command(
                &format!("w{i}"),
                "index",
                &format!("w{i}"),
                OpType::Set,
                json!(i),
            )
            .await
            .expect("send");
        }
        let mut answers = Vec::new();
        while answers.len() < 300 {
            match ws.recv_timeout(WAIT).await.expect("answer") {
                ServerMessage::Ack { .. } => answers.push(("ack".to_owned(), String::new())),
                ServerMessage::Reject { code, .. } => {
                    answers.push(("reject".to_owned(), code.as_str().to_owned()))
                }
                _ => {}
            }
        }
        answers
    };
    let (http_answers, socket_answers, mine) = tokio::join!(
        futures::future::join_all(floods),
        socket_flood,
        batch(&stack, &other, other_org, "g", 1),
    );

    // The other org is acked.
    assert_eq!(mine, [("ack".to_owned(), String::new())]);
    // The flooder's commands are acked or refused with rate_limited, nothing else;
    // over HTTP (500 commands queued at once against a share of 4) some are refused.
    let all: Vec<&(String, String)> = http_answers
        .iter()
        .flatten()
        .chain(&socket_answers)
        .collect();
    for (kind, code) in &all {
        assert!(
            kind == "ack" || (kind == "reject" && code == "rate_limited"),
            "unexpected answer {kind} {code}"
        );
    }
    let refused =
        |answers: &[(String, String)]| answers.iter().filter(|(k, _)| k == "reject").count();
    assert!(
        http_answers.iter().map(|a| refused(a)).sum::<usize>() > 0,
        "no HTTP command was refused"
    );
    assert!(
        all.iter().any(|(k, _)| k == "ack"),
        "nothing of acme's went through"
    );

    // Nothing is left waiting, and acme can write again.
    gauge_becomes(&stack, "ultrasync_gateway_commands_waiting", 0, WAIT).await;
    assert_eq!(
        batch(&stack, &flooder, ORG, "after", 1).await,
        [("ack".to_owned(), String::new())]
    );
    ws.close().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_publisher_keys_go_away_when_unused() {
    let stack = Stack::start().await;
    let before = gauge(&stack, "ultrasync_gateway_followed_stream_keys").await;

    // Three namespaces followed, two written: three topics, two publisher keys.
    let mut c = join(&stack, "tia", &["index", "metadata", "settings"]).await;
    let mut synced = 0;
    while synced < 3 {
        if let ServerMessage::Synced { .. } = c.recv_timeout(WAIT).await.expect("synced") {
            synced += 1;
        }
    }
    assert_eq!(
        gauge(&stack, "ultrasync_gateway_followed_stream_keys").await,
        before + 3
    );
    for ns in ["index", "metadata"] {
        c.command(&format!("c-{ns}"), ns, "k", OpType::Set, json!(1))
            .await
            .expect("send");
    }
    let mut acked = 0;
    while acked < 2 {
        if let ServerMessage::Ack { .. } = c.recv_timeout(WAIT).await.expect("ack") {
            acked += 1;
        }
    }
    assert_eq!(
        gauge(&stack, "ultrasync_gateway_publisher_stream_keys").await,
        2
    );

    // The socket goes: its topics go at once, the publisher keys once idle (30 s).
    c.close().await;
    gauge_becomes(
        &stack,
        "ultrasync_gateway_followed_stream_keys",
        before,
        WAIT,
    )
    .await;
    gauge_becomes(
        &stack,
        "ultrasync_gateway_publisher_stream_keys",
        0,
        Duration::from_secs(45),
    )
    .await;

    // And they come back when used again.
    let mut c = join(&stack, "tia", &["index"]).await;
    c.command("again", "index", "k", OpType::Set, json!(2))
        .await
        .expect("send");
    loop {
        if let ServerMessage::Ack { .. } = c.recv_timeout(WAIT).await.expect("ack") {
            break;
        }
    }
    assert_eq!(
        gauge(&stack, "ultrasync_gateway_publisher_stream_keys").await,
        1
    );
    assert_eq!(
        gauge(&stack, "ultrasync_gateway_followed_stream_keys").await,
        before + 1
    );
    c.close().await;
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_key_holds_a_bounded_number_of_waiting_commands() {
    // No sequencer: what is queued stays queued.
    let stack = Stack::start_with(StackOptions {
        sequencers: 0,
        materializers: 0,
        configure: |c| c.gateway.command_timeout_secs = 1,
        ..Default::default()
    })
    .await;
    let js = stack.jetstream().await;
    let subject = "usync.cmd.acme.web.index";
    let mut acks = Vec::new();
    for i in 0..ultrasync_shared::nats::CMDS_PER_STREAM_KEY {
        acks.push(
            js.publish(subject, format!("filler {i}").into())
                .await
                .expect("publish"),
        );
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    // The key is full: the stream refuses the next one (and keeps the oldest) ...
    let refused = js
        .publish(subject, "one too many".into())
        .await
        .expect("publish")
        .await
        .expect_err("over the per-key bound");
    assert!(
        refused
            .to_string()
            .contains("maximum messages per subject exceeded"),
        "{refused}"
    );
    // ... and a client's command on that key is answered rate_limited at once,
    // while another key of the same project still takes commands.
    let token = stack.token("kim", "read write");
    assert_eq!(
        batch(&stack, &token, ORG, "full", 1).await,
        [("reject".to_owned(), "rate_limited".to_owned())]
    );
    let r = stack
        .http(
            "POST",
            "/v1/acme/web/metadata/commands",
            &token,
            &json!({"client_id": "kim-1", "commands": [
                {"command_id": "m1", "key": "k", "op_type": "set", "payload": 1}
            ]})
            .to_string(),
        )
        .await;
    // Stored but never sequenced (no sequencer): no answer in time.
    assert!(r.body.contains("unavailable"), "{}", r.body);
    let info = js
        .get_stream(ultrasync_shared::nats::CMDS_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(info, ultrasync_shared::nats::CMDS_PER_STREAM_KEY as u64 + 1);
    stack.shutdown().await;
}

/// Receives frames until `ns` is `synced` at `head`, returning every op's
/// `server_seq` and value in order.
async fn ops_until_synced(c: &mut Connection, ns: &str, head: u64) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(WAIT).await.expect("frame") {
            ServerMessage::Ops { namespace, ops, .. } if namespace == ns => {
                got.extend(ops.into_iter().map(|o| (o.server_seq, o.payload)));
                if got.last().is_some_and(|(s, _)| *s == head) {
                    return got;
                }
            }
            ServerMessage::Synced {
                namespace,
                server_seq,
            } if namespace == ns && server_seq == head => return got,
            ServerMessage::Error { code, message, .. } => panic!("{code:?}: {message}"),
            _ => {}
        }
    }
}

/// A topic's ring holds at most 8 MiB of ops (`hub::RING_BYTES`), not 4096 ops of
/// any size: a tenant writing large values does not make the gateway hold a GiB per
/// namespace. Ops past the bound leave the ring, and a socket catching up across it
/// still gets every op in order: the older ones from the log, the newer from the
/// ring; a live follower gets every op too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_ops_leave_a_topics_ring_and_followers_still_get_every_op() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.gateway.snapshot_after_ops = 1_000_000,
        ..Default::default()
    })
    .await;
    // A live follower keeps the topic (and its ring) while the ops are written.
    let mut live = stack
        .client("live", "web", "live", &[("index", Some(0))])
        .await;
    ops_until_synced(&mut live, "index", 0).await;
    let n = 48u64;
    // It reads as the ops come (one that does not read is closed as slow).
    let live = tokio::spawn(async move {
        let got = ops_until_synced(&mut live, "index", n).await;
        (live, got)
    });
    let mut writer = stack.client("writer", "web", "writer", &[]).await;
    // 48 values of 200 KiB: 9.6 MiB, more than the ring may hold.
    let value = |i: u64| json!(format!("{i}:{}", "x".repeat(200 * 1024)));
    for i in 1..=n {
        let id = format!("big-{i}");
        writer
            .command(&id, "index", &format!("k{}", i % 4), OpType::Set, value(i))
            .await
            .expect("send");
        loop {
            match writer.recv_timeout(WAIT).await.expect("answer") {
                ServerMessage::Ack { command_id, .. } if command_id == id => break,
                ServerMessage::Reject { code, reason, .. } => panic!("{code:?}: {reason}"),
                _ => {}
            }
        }
    }
    let want: Vec<(u64, Value)> = (1..=n).map(|i| (i, value(i))).collect();
    let (live, got) = live.await.expect("live follower");
    let held = gauge(&stack, "ultrasync_gateway_topic_ring_bytes").await;
    assert!(
        held > 7 << 20 && held <= 8 << 20,
        "the ring holds {held} bytes after 9.6 MiB of ops"
    );
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the live follower's ops differ");

    // A socket one op behind the start: ops 2..=48, across the ring's bound.
    let mut late = stack
        .client("late", "web", "late", &[("index", Some(1))])
        .await;
    let got = ops_until_synced(&mut late, "index", n).await;
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (2..=n).collect::<Vec<_>>());
    assert!(got[..] == want[1..], "the late socket's ops differ");
    for c in [live, late, writer] {
        c.close().await;
    }
    stack.shutdown().await;
}
