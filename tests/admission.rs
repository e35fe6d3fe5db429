//! Hostile commands against a real stack (nats-server, gateway, sequencer,
//! materializer): an Automerge change that is a compressed chunk inflating to
//! 150 MiB, and a value nested 126 deep, are each refused with `payload_too_large`;
//! the stack keeps serving, another tenant's write is acked, and the namespace's
//! snapshot still answers 200. A value at the deepest allowed depth round-trips
//! through the snapshot. A command whose `reply_to` is not a reply subject gets no
//! answer there.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use serde_json::{Value, json};
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_shared::admission::{Limits, test_support};
use ultrasync_shared::{CommandEnvelope, ErrorCode, auth};
use ultrasync_testkit::{Stack, StackOptions, http_get};

const WAIT: Duration = Duration::from_secs(30);

fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

/// Reads until the answer to `command_id`: `Ok(server_seq)` or `Err(code)`.
async fn answer(c: &mut Connection, command_id: &str) -> Result<u64, ErrorCode> {
    loop {
        match c.recv_timeout(WAIT).await {
            Ok(ServerMessage::Ack {
                command_id: id,
                server_seq,
                ..
            }) if id == command_id => return Ok(server_seq),
            Ok(ServerMessage::Reject {
                command_id: id,
                code,
                ..
            }) if id == command_id => return Err(code),
            Ok(ServerMessage::Error { code, message }) => {
                panic!("{command_id}: protocol error {code}: {message}")
            }
            Ok(_) => {}
            Err(e) => panic!("{command_id}: no answer: {e}"),
        }
    }
}

/// A socket of another org (`globex`), with its own token.
async fn other_tenant(stack: &Stack) -> Connection {
    let claims = auth::claims(
        "bob",
        "globex",
        &["*"],
        "read write",
        3600,
        auth::DEFAULT_AUDIENCE,
    );
    let token = auth::mint_hs256(stack.secret.as_bytes(), &claims).expect("mint");
    let mut c = Connection::connect(&stack.ws_url(), &token)
        .await
        .expect("connect");
    c.hello("globex", "web", "bob-1", Default::default())
        .await
        .expect("hello");
    c
}

async fn still_serves(stack: &Stack, other: &mut Connection, n: usize, ns: &str) {
    let (status, _) = http_get(&format!("http://{}/healthz", stack.http))
        .await
        .expect("healthz");
    assert_eq!(status, 200, "healthz");
    let id = format!("other-{n}");
    other
        .command(&id, "index", "k", OpType::Set, json!({"n": n}))
        .await
        .expect("send");
    assert!(
        answer(other, &id).await.is_ok(),
        "the other tenant's write is acked"
    );
    let token = stack.token("reader", "read");
    let snap = stack
        .get(&format!("/v1/acme/web/{ns}/snapshot"), &token)
        .await;
    assert_eq!(snap.status, 200, "snapshot of {ns}: {}", snap.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_commands_are_refused_and_the_stack_keeps_serving() {
    let stack = Stack::start().await;
    let mut other = other_tenant(&stack).await;
    let mut c = stack.client("mallory", "web", "m-1", &[]).await;

    // Something in both namespaces first, so their snapshots have state to encode.
    let doc_change = {
        use automerge::transaction::Transactable;
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "title", "x").expect("put");
        doc.commit();
        B64.encode(doc.get_last_local_change().expect("change").raw_bytes())
    };
    c.command(
        "doc",
        "collab",
        "d",
        OpType::CrdtOp,
        json!({ "change": doc_change }),
    )
    .await
    .expect("send");
    assert!(answer(&mut c, "doc").await.is_ok());

    // The decompression bomb: ~150 KB on the wire, 150 MiB inflated. Several at
    // once: before admission inflated them whole, a few ran the sequencer out of
    // memory.
    let bomb = test_support::compressed_bomb(150 * 1024 * 1024);
    assert!(bomb.len() < 200 * 1024, "bomb is {} bytes", bomb.len());
    let payload = json!({ "change": B64.encode(&bomb) });
    for i in 0..4 {
        c.command(
            &format!("bomb-{i}"),
            "collab",
            "d",
            OpType::CrdtOp,
            payload.clone(),
        )
        .await
        .expect("send");
    }
    for i in 0..4 {
        assert_eq!(
            answer(&mut c, &format!("bomb-{i}")).await,
            Err(ErrorCode::PayloadTooLarge),
            "bomb {i}"
        );
    }
    still_serves(&stack, &mut other, 1, "collab").await;

    // 126 deep: refused; the namespace's snapshot still reads.
    c.command("deep", "index", "deep", OpType::Set, nested(126))
        .await
        .expect("send");
    assert_eq!(
        answer(&mut c, "deep").await,
        Err(ErrorCode::PayloadTooLarge)
    );
    still_serves(&stack, &mut other, 2, "index").await;

    // The deepest allowed value is stored and comes back through the snapshot.
    let depth = Limits::default().max_value_depth;
    c.command("deepest", "index", "deepest", OpType::Set, nested(depth))
        .await
        .expect("send");
    let seq = answer(&mut c, "deepest").await.expect("stored");
    // Read-your-writes: the materializer's state at least as of the ack.
    let snap = stack
        .get(
            &format!("/v1/acme/web/index/snapshot?min_seq={seq}"),
            &stack.token("reader", "read"),
        )
        .await;
    assert_eq!(snap.status, 200, "{}", snap.body);
    let body: Value = serde_json::from_str(&snap.body).expect("json");
    assert_eq!(body["state"]["deepest"]["value"], nested(depth));
    still_serves(&stack, &mut other, 3, "index").await;

    stack.shutdown().await;
}

/// A command straight into `USYNC_CMDS`, as any gateway (or anything allowed to
/// publish there) could queue it.
fn envelope(id: &str, org: &str, ns: &str, op_type: OpType, payload: Value) -> CommandEnvelope {
    CommandEnvelope {
        org_id: org.into(),
        project_id: "web".into(),
        namespace: ns.into(),
        actor_id: "a".into(),
        client_id: "c".into(),
        command_id: id.into(),
        key: format!("k-{id}"),
        op_type,
        payload,
        precondition: None,
        reply_to: Some(format!("usync.reply.test.{org}")),
        base_seq: None,
    }
}

async fn queue(js: &async_nats::jetstream::Context, cmd: &CommandEnvelope) {
    js.publish(
        format!("usync.cmd.{}.web.{}", cmd.org_id, cmd.namespace),
        serde_json::to_vec(cmd).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The sequencer admits on its own (a command may skip a gateway's checks), and an
/// expensive tenant slows only itself: another tenant's writes keep their latency
/// while the sequencer decodes a flood of large Automerge changes. Each is decoded
/// and answered once: with a 1 s ack wait, planning the flood outlasts it, and the
/// sequencer keeps the messages in progress instead of getting them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequencer_refuses_bombs_and_heavy_input_delays_only_its_tenant() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.sequencer.ack_wait_secs = 1,
        ..Default::default()
    })
    .await;
    let nc = stack.nats_client().await;
    let mut heavy_answers = nc
        .subscribe("usync.reply.test.acme")
        .await
        .expect("subscribe");
    nc.flush().await.expect("flush");
    let js = stack.jetstream().await;

    let bomb = json!({ "change": B64.encode(test_support::compressed_bomb(150 * 1024 * 1024)) });
    queue(
        &js,
        &envelope("bomb", "acme", "collab", OpType::CrdtOp, bomb),
    )
    .await;
    queue(
        &js,
        &envelope("deep", "acme", "index", OpType::Set, nested(126)),
    )
    .await;
    // Two stream keys: the answers come in either order.
    let mut refused = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(WAIT, heavy_answers.next())
            .await
            .expect("an answer")
            .expect("message");
        match serde_json::from_slice::<ServerMessage>(&msg.payload).expect("answer") {
            ServerMessage::Reject {
                command_id, code, ..
            } => refused.push((command_id, code)),
            other => panic!("{other:?}"),
        }
    }
    refused.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        refused,
        [
            ("bomb".to_owned(), ErrorCode::PayloadTooLarge),
            ("deep".to_owned(), ErrorCode::PayloadTooLarge)
        ]
    );

    // Another tenant's write latency: alone, then while acme floods the sequencer
    // with changes that inflate to 3 MiB each (within the limits, so decoded).
    let mut other = other_tenant(&stack).await;
    let timed = async |other: &mut Connection, round: &str| {
        let mut took = Vec::new();
        for i in 0..15 {
            let id = format!("{round}-{i}");
            let t = std::time::Instant::now();
            other
                .command(&id, "index", "k", OpType::Set, json!(i))
                .await
                .expect("send");
            assert!(answer(other, &id).await.is_ok());
            took.push(t.elapsed());
        }
        median(took)
    };
    let alone = timed(&mut other, "alone").await;
    let heavy = test_support::compressed_change(3 * 1024 * 1024);
    let heavy = json!({ "change": B64.encode(&heavy) });
    let flood = {
        let js = js.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let cmd = envelope(
                    &format!("h{i}"),
                    "acme",
                    "collab",
                    OpType::CrdtOp,
                    heavy.clone(),
                );
                queue(&js, &cmd).await;
            }
        })
    };
    let during = timed(&mut other, "during").await;
    flood.await.expect("flood");
    let mut answered = 0;
    while answered < 40 {
        match tokio::time::timeout(WAIT, heavy_answers.next()).await {
            // Answers of one batch to one route travel in one message.
            Ok(Some(m)) => {
                answered +=
                    ultrasync_shared::nats::split_lines(m.headers.as_ref(), &m.payload).len()
            }
            _ => panic!("the heavy tenant got {answered} of 40 answers"),
        }
    }
    // Nothing is answered twice (a redelivered command would be).
    let mut again = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), heavy_answers.next()).await
    {
        again += ultrasync_shared::nats::split_lines(m.headers.as_ref(), &m.payload).len();
    }
    assert_eq!(
        again, 0,
        "{again} of the 40 heavy commands were answered again"
    );
    eprintln!("other tenant's write p50: alone {alone:?}, during the flood {during:?}");
    assert!(
        during <= alone * 10 + Duration::from_millis(250),
        "alone {alone:?}, during {during:?}"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_go_to_reply_subjects_only() {
    let stack = Stack::start().await;
    let nc = stack.nats_client().await;
    let mut stolen = nc.subscribe("usync.ops.>").await.expect("subscribe");
    let mut elsewhere = nc.subscribe("victim.inbox").await.expect("subscribe");
    let mut replies = nc
        .subscribe("usync.reply.test.s1")
        .await
        .expect("subscribe");
    nc.flush().await.expect("flush");
    let js = stack.jetstream().await;
    let cmd = |id: &str, reply_to: &str| CommandEnvelope {
        org_id: "acme".into(),
        project_id: "web".into(),
        namespace: "index".into(),
        actor_id: "a".into(),
        client_id: "c".into(),
        command_id: id.into(),
        key: "k".into(),
        op_type: OpType::Set,
        payload: json!(1),
        precondition: None,
        reply_to: Some(reply_to.into()),
        base_seq: None,
    };
    for (id, to) in [
        ("c1", "victim.inbox"),
        ("c2", "usync.ops.acme.web.index"),
        ("c3", "usync.reply.>"),
        ("c4", "usync.reply.test.s1"),
    ] {
        js.publish(
            "usync.cmd.acme.web.index",
            serde_json::to_vec(&cmd(id, to)).expect("json").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }
    // The good one is answered (after the others: one stream key, in order)...
    let msg = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("an answer")
        .expect("message");
    let answer: ServerMessage = serde_json::from_slice(&msg.payload).expect("answer");
    assert!(
        matches!(&answer, ServerMessage::Ack { command_id, .. } if command_id == "c4"),
        "{answer:?}"
    );
    // ...and nothing reached the other subjects.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), elsewhere.next())
            .await
            .is_err(),
        "an answer was published to a foreign subject"
    );
    // The op subjects carry the four ops (JetStream publishes them, one or several to
    // a message), never an answer.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), stolen.next()).await {
        for line in ultrasync_shared::nats::split_lines(m.headers.as_ref(), &m.payload) {
            let v: Value = serde_json::from_slice(line).expect("json");
            assert!(v.get("type").is_none(), "an answer on {}: {v}", m.subject);
        }
    }
    stack.shutdown().await;
}
