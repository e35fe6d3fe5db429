//! The sequencer as the authority: namespace modes, preconditions, schemas, size
//! limits, and exactly-once answers to retries.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_client::{
    ClientMessage, CommandFrame, Connection, OpType, Precondition, ServerMessage,
};
use ultrasync_shared::namespaces::{Mode, NamespaceConfig};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_testkit::{Stack, StackOptions, read_subject};

const WAIT: Duration = Duration::from_secs(20);

fn todos() -> NamespaceConfig {
    NamespaceConfig {
        name: "todos".into(),
        mode: Mode::Lww,
        schema: Some(json!({
            "type": "object",
            "required": ["title"],
            "properties": {"title": {"type": "string"}, "done": {"type": "boolean"}}
        })),
        schema_file: None,
        max_value_bytes: Some(200),
    }
}

async fn stack() -> Stack {
    Stack::start_with(StackOptions {
        namespaces: vec![todos()],
        ..Default::default()
    })
    .await
}

fn frame(
    id: &str,
    ns: &str,
    key: &str,
    op_type: OpType,
    payload: Value,
    expected: Option<u64>,
) -> ClientMessage {
    ClientMessage::Command(CommandFrame {
        command_id: id.into(),
        namespace: ns.into(),
        key: key.into(),
        op_type,
        payload,
        precondition: expected.map(|v| Precondition {
            expected_version: v,
        }),
        base_seq: None,
    })
}

/// Sends one command and returns its answer (ack or reject).
async fn send(conn: &mut Connection, msg: ClientMessage) -> ServerMessage {
    conn.send(&msg).await.expect("send");
    loop {
        match conn.recv_timeout(WAIT).await.expect("answer") {
            m @ (ServerMessage::Ack { .. }
            | ServerMessage::Reject { .. }
            | ServerMessage::Error { .. }) => return m,
            _ => continue,
        }
    }
}

fn acked(m: &ServerMessage) -> u64 {
    match m {
        ServerMessage::Ack { server_seq, .. } => *server_seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

fn code(m: &ServerMessage) -> ErrorCode {
    match m {
        ServerMessage::Reject { code, .. } | ServerMessage::Error { code, .. } => *code,
        other => panic!("expected a reject, got {other:?}"),
    }
}

async fn log_len(stack: &Stack, ns: &str) -> usize {
    let js = stack.jetstream().await;
    read_subject(
        &js,
        &ops_subject(&StreamKey::parse("acme", "web", ns).expect("key")),
    )
    .await
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_and_merge_patch() {
    let stack = stack().await;
    let mut c = stack.client("carla", "web", "carla-1", &[]).await;

    // cas: create-if-absent, then compare-and-set on the returned version.
    let v1 = acked(
        &send(
            &mut c,
            frame(
                "s1",
                "settings",
                "theme",
                OpType::Set,
                json!({"color": "dark"}),
                Some(0),
            ),
        )
        .await,
    );
    let again = send(
        &mut c,
        frame(
            "s2",
            "settings",
            "theme",
            OpType::Set,
            json!({"color": "light"}),
            Some(0),
        ),
    )
    .await;
    match again {
        ServerMessage::Reject {
            code,
            current_state: Some(cs),
            ..
        } => {
            assert_eq!(code, ErrorCode::PreconditionFailed);
            assert_eq!(cs.key, "theme");
            assert_eq!(cs.version, v1);
            assert_eq!(cs.value, json!({"color": "dark"}));
        }
        other => panic!("expected precondition_failed with current_state, got {other:?}"),
    }
    let v2 = acked(
        &send(
            &mut c,
            frame(
                "s3",
                "settings",
                "theme",
                OpType::Patch,
                json!({"font": "mono"}),
                Some(v1),
            ),
        )
        .await,
    );
    assert!(v2 > v1);
    let stale = send(
        &mut c,
        frame(
            "s4",
            "settings",
            "theme",
            OpType::Del,
            Value::Null,
            Some(v1),
        ),
    )
    .await;
    assert_eq!(code(&stale), ErrorCode::PreconditionFailed);
    acked(
        &send(
            &mut c,
            frame(
                "s5",
                "settings",
                "theme",
                OpType::Del,
                Value::Null,
                Some(v2),
            ),
        )
        .await,
    );
    // Deleted: version 0 again, so create-if-absent works.
    acked(
        &send(
            &mut c,
            frame("s6", "settings", "theme", OpType::Set, json!(1), Some(0)),
        )
        .await,
    );

    // lww: precondition optional but enforced when given; patch merges.
    acked(
        &send(
            &mut c,
            frame(
                "i1",
                "index",
                "doc",
                OpType::Patch,
                json!({"a": 1, "b": {"c": 2}}),
                None,
            ),
        )
        .await,
    );
    let ack = send(
        &mut c,
        frame(
            "i2",
            "index",
            "doc",
            OpType::Patch,
            json!({"a": null, "b": {"d": 3}}),
            None,
        ),
    )
    .await;
    let ServerMessage::Ack { op, .. } = &ack else {
        panic!("{ack:?}")
    };
    assert_eq!(op.op_type, OpType::Patch);
    assert_eq!(
        code(
            &send(
                &mut c,
                frame("i3", "index", "doc", OpType::Set, json!(0), Some(1))
            )
            .await
        ),
        ErrorCode::PreconditionFailed
    );
    acked(
        &send(
            &mut c,
            frame("i4", "index", "doc", OpType::Set, json!(0), Some(2)),
        )
        .await,
    );

    // The state the log describes: replay it with the shared state machine.
    let js = stack.jetstream().await;
    let entries = read_subject(
        &js,
        &ops_subject(&StreamKey::parse("acme", "web", "index").expect("key")),
    )
    .await;
    let mut state = ultrasync_shared::state::NamespaceState::default();
    for e in &entries {
        ultrasync_shared::state::apply(&mut state, &e.op().expect("op")).expect("apply");
    }
    assert_eq!(state.keys["doc"].value, json!(0));
    assert_eq!(state.keys["doc"].version, 3);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_get_the_right_code_and_write_nothing() {
    let stack = stack().await;
    let mut c = stack.client("bea", "web", "bea-1", &[]).await;
    // Something valid in each namespace first, so rejects have state to hit.
    acked(
        &send(
            &mut c,
            frame(
                "ok1",
                "todos",
                "t1",
                OpType::Set,
                json!({"title": "buy milk"}),
                None,
            ),
        )
        .await,
    );
    acked(
        &send(
            &mut c,
            frame("ok2", "settings", "s", OpType::Set, json!(1), Some(0)),
        )
        .await,
    );
    let before = (
        log_len(&stack, "todos").await,
        log_len(&stack, "settings").await,
        log_len(&stack, "collab").await,
    );

    let big = "x".repeat(300);
    let cases: Vec<(&str, ClientMessage, ErrorCode)> = vec![
        (
            "namespace id with a dot",
            frame("b1", "to.dos", "k", OpType::Set, json!(1), None),
            ErrorCode::InvalidId,
        ),
        (
            "unknown namespace",
            frame("b2", "nowhere", "k", OpType::Set, json!(1), None),
            ErrorCode::UnknownNamespace,
        ),
        (
            "empty key",
            frame("b3", "todos", "", OpType::Set, json!({"title": "x"}), None),
            ErrorCode::InvalidKey,
        ),
        (
            "control char in key",
            frame(
                "b4",
                "todos",
                "a\u{7}",
                OpType::Set,
                json!({"title": "x"}),
                None,
            ),
            ErrorCode::InvalidKey,
        ),
        (
            "empty command id",
            frame("", "todos", "k", OpType::Set, json!({"title": "x"}), None),
            ErrorCode::InvalidId,
        ),
        (
            "schema: missing title",
            frame(
                "b5",
                "todos",
                "t2",
                OpType::Set,
                json!({"done": true}),
                None,
            ),
            ErrorCode::SchemaInvalid,
        ),
        (
            "schema after patch",
            frame(
                "b6",
                "todos",
                "t1",
                OpType::Patch,
                json!({"title": 5}),
                None,
            ),
            ErrorCode::SchemaInvalid,
        ),
        (
            "value too large",
            frame(
                "b7",
                "todos",
                "t3",
                OpType::Set,
                json!({"title": big}),
                None,
            ),
            ErrorCode::PayloadTooLarge,
        ),
        (
            "cas without precondition",
            frame("b8", "settings", "s", OpType::Set, json!(2), None),
            ErrorCode::InvalidOp,
        ),
        (
            "cas with a stale version",
            frame("b9", "settings", "s", OpType::Set, json!(2), Some(99)),
            ErrorCode::PreconditionFailed,
        ),
        (
            "crdt_op in an lww namespace",
            frame(
                "b10",
                "todos",
                "t1",
                OpType::CrdtOp,
                json!({"change": "AA=="}),
                None,
            ),
            ErrorCode::InvalidOp,
        ),
        (
            "set in a crdt namespace",
            frame("b11", "collab", "d", OpType::Set, json!(1), None),
            ErrorCode::InvalidOp,
        ),
        (
            "malformed Automerge bytes",
            frame(
                "b12",
                "collab",
                "d",
                OpType::CrdtOp,
                json!({"change": "bm90IGEgY2hhbmdl"}),
                None,
            ),
            ErrorCode::InvalidOp,
        ),
        (
            "crdt payload not base64",
            frame(
                "b13",
                "collab",
                "d",
                OpType::CrdtOp,
                json!({"change": "%%%"}),
                None,
            ),
            ErrorCode::InvalidOp,
        ),
        (
            "crdt payload shape",
            frame("b14", "collab", "d", OpType::CrdtOp, json!([1]), None),
            ErrorCode::InvalidOp,
        ),
        (
            "command in an ephemeral namespace",
            frame("b15", "presence", "me", OpType::Set, json!(1), None),
            ErrorCode::InvalidOp,
        ),
    ];
    for (what, msg, want) in cases {
        let answer = send(&mut c, msg).await;
        assert_eq!(code(&answer), want, "{what}: {answer:?}");
    }
    // A frame that is not a command at all is a protocol error.
    c.send_raw(r#"{"type":"command","command_id":"b16","namespace":"todos","key":"k","op_type":"explode"}"#)
        .await
        .expect("send");
    assert_eq!(
        code(&c.recv_timeout(WAIT).await.expect("error")),
        ErrorCode::InvalidMessage
    );

    // A read-only token cannot write at all.
    let mut reader = Connection::connect(&stack.ws_url(), &stack.token("rob", "read"))
        .await
        .expect("connect");
    reader
        .hello("acme", "web", "rob-1", BTreeMap::new())
        .await
        .expect("hello");
    let answer = send(
        &mut reader,
        frame(
            "r1",
            "todos",
            "t9",
            OpType::Set,
            json!({"title": "x"}),
            None,
        ),
    )
    .await;
    assert_eq!(code(&answer), ErrorCode::Forbidden);

    let after = (
        log_len(&stack, "todos").await,
        log_len(&stack, "settings").await,
        log_len(&stack, "collab").await,
    );
    assert_eq!(before, after, "a rejected command reached the log");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_gets_the_original_ack_across_restarts_and_past_the_dedupe_window() {
    let mut stack = stack().await;
    let cmd = || {
        frame(
            "pay-1",
            "todos",
            "invoice",
            OpType::Set,
            json!({"title": "pay rent"}),
            Some(0),
        )
    };
    let mut c = stack.client("ria", "web", "ria-1", &[]).await;
    let first = send(&mut c, cmd()).await;
    acked(&first);

    // 1. Right away.
    assert_eq!(send(&mut c, cmd()).await, first);

    // 2. After the gateway restarts (new socket, new gateway id).
    c.close().await;
    stack.restart_gateway().await;
    let mut c = stack.client("ria", "web", "ria-1", &[]).await;
    assert_eq!(send(&mut c, cmd()).await, first);

    // 3. After JetStream's own duplicate window has passed and a new sequencer
    //    instance has taken the key: the op id is known from the log, not from NATS.
    let js = stack.jetstream().await;
    let mut cfg = ultrasync_shared::nats::ops_stream_config(&stack.config.layout());
    cfg.duplicate_window = Duration::from_secs(1);
    js.update_stream(cfg)
        .await
        .expect("shrink the duplicate window");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.stop_sequencer(0).await;
    stack.add_sequencer();
    assert_eq!(send(&mut c, cmd()).await, first);

    // Other writes in between do not matter: the retry still is no new op.
    acked(
        &send(
            &mut c,
            frame(
                "pay-2",
                "todos",
                "other",
                OpType::Set,
                json!({"title": "x"}),
                None,
            ),
        )
        .await,
    );
    assert_eq!(send(&mut c, cmd()).await, first);
    assert_eq!(log_len(&stack, "todos").await, 2);
    stack.shutdown().await;
}

/// A retry of a command whose op is no longer among the key's recent ones (1,024 of
/// them are kept in memory) still gets its original ack, read from the log: the
/// first op, one inside a log message, and ones near the end. And a socket catching
/// up on those ops from the log gets each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_an_old_command_gets_its_original_ack() {
    let stack = Stack::start_with(StackOptions {
        namespaces: vec![todos()],
        configure: |c| {
            c.sequencer.metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        },
        ..Default::default()
    })
    .await;
    let mut c = stack.client("olga", "web", "olga-1", &[]).await;
    let write = |i: usize| {
        frame(
            &format!("w{i}"),
            "todos",
            &format!("k{}", i % 50),
            OpType::Set,
            json!({"title": format!("t{i}")}),
            None,
        )
    };
    let total = 1300;
    let mut first = BTreeMap::new();
    // Windows of 100 in flight: the key's ops span many log messages of several ops.
    for window in 0..total / 100 {
        for i in window * 100..(window + 1) * 100 {
            c.send(&write(i)).await.expect("send");
        }
        let mut answered = 0;
        while answered < 100 {
            match c.recv_timeout(WAIT).await.expect("answer") {
                m @ ServerMessage::Ack { .. } => {
                    let ServerMessage::Ack { command_id, .. } = &m else {
                        continue;
                    };
                    first.insert(command_id.clone(), m.clone());
                    answered += 1;
                }
                other @ (ServerMessage::Reject { .. } | ServerMessage::Error { .. }) => {
                    panic!("expected an ack, got {other:?}")
                }
                _ => {}
            }
        }
    }
    for i in [0, 1, 7, 150, 640, 1000, 1299] {
        let again = send(&mut c, write(i)).await;
        assert_eq!(Some(&again), first.get(&format!("w{i}")), "retry of w{i}");
    }
    assert_eq!(log_len(&stack, "todos").await, total, "a retry wrote an op");
    // A new socket from cursor 0 (no gateway followed the key, so all of it comes
    // from the log, a frame of ops at a time, each read going on from the last):
    // every op once, in order, then `synced`.
    let mut reader = stack
        .client("olga", "web", "olga-2", &[("todos", Some(0))])
        .await;
    let mut seen = Vec::new();
    loop {
        match reader.recv_timeout(WAIT).await.expect("catch-up") {
            ServerMessage::Ops { ops, .. } => seen.extend(ops.iter().map(|o| o.server_seq)),
            ServerMessage::Synced { server_seq, .. } => {
                assert_eq!(server_seq, total as u64);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (1..=total as u64).collect::<Vec<_>>());
    reader.close().await;
    // Each was read from a mark the worker noted while writing, not searched for.
    let url = format!(
        "http://{}/metrics",
        stack.sequencer_metrics(0).expect("sequencer metrics")
    );
    let (status, text) = ultrasync_testkit::http_get(&url).await.expect("metrics");
    assert_eq!(status, 200);
    let reads = |how: &str| {
        let line = format!("ultrasync_sequencer_retry_reads_total{{how=\"{how}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    // w0, w1, w7 and w150 are older than the 1,024 recent ops (w1 and w7 may share
    // w0's log message, read once).
    assert_eq!(reads("search"), Some(0), "{text}");
    assert!(
        reads("mark").is_some_and(|n| (2..=4).contains(&n)),
        "{text}"
    );
    stack.shutdown().await;
}

fn reason(m: &ServerMessage) -> &str {
    match m {
        ServerMessage::Reject { reason, .. } => reason,
        other => panic!("expected a reject, got {other:?}"),
    }
}

/// SPEC invariant 5: a command id used again by the same actor for another body is
/// refused (`invalid_message`, HTTP 422) and writes nothing, also after the log was
/// compacted and a new sequencer took the key from a snapshot; the same body is
/// still the same command (`stale_base` naming its `server_seq` once compacted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_id_reused_for_another_body_is_refused_before_and_after_a_take_over() {
    let mut stack = Stack::start_with(StackOptions {
        namespaces: vec![todos()],
        configure: |c| {
            c.materializer.snapshot_every_ops = 1;
            c.materializer.snapshot_interval_secs = 1;
            c.compactor.retention_ops = 0;
        },
        ..Default::default()
    })
    .await;
    let rent = |title: &str| {
        frame(
            "pay-1",
            "todos",
            "invoice",
            OpType::Set,
            json!({"title": title}),
            None,
        )
    };
    let mut c = stack.client("rex", "web", "rex-1", &[]).await;
    let first = send(&mut c, rent("pay rent")).await;
    let seq = acked(&first);
    let reused = send(&mut c, rent("pay less rent")).await;
    assert_eq!(code(&reused), ErrorCode::InvalidMessage, "{reused:?}");
    assert!(
        reason(&reused).contains(&format!("server_seq {seq}")),
        "{reused:?}"
    );
    assert_eq!(send(&mut c, rent("pay rent")).await, first);
    // Command ids belong to their actor: another actor's pay-1 is its own.
    let mut d = stack.client("rae", "web", "rae-1", &[]).await;
    acked(&send(&mut d, rent("pay less rent")).await);

    // HTTP: the Idempotency-Key is the command id.
    let token = stack.token("rex", "read write");
    let put = |body: &'static str| {
        let url = format!("http://{}/v1/acme/web/todos/keys/bill", stack.http);
        let auth = format!("Bearer {token}");
        async move {
            ultrasync_testkit::http_exchange(
                "PUT",
                &url,
                &[
                    ("Authorization", auth.as_str()),
                    ("Content-Type", "application/json"),
                    ("Idempotency-Key", "bill-1"),
                ],
                body,
            )
            .await
            .expect("PUT")
        }
    };
    let r = put(r#"{"title":"water"}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r2 = put(r#"{"title":"gas"}"#).await;
    assert_eq!(r2.status, 422, "{}", r2.body);
    assert!(r2.body.contains("invalid_message"), "{}", r2.body);
    let r3 = put(r#"{"title":"water"}"#).await;
    assert_eq!((r3.status, r3.header("etag")), (200, r.header("etag")));
    assert_eq!(log_len(&stack, "todos").await, 3);

    // Snapshot, compaction, a new sequencer: the commands come from the snapshot.
    ultrasync_testkit::wait_for_snapshot(&stack, "web", "todos", 3).await;
    let js = stack.jetstream().await;
    let report = ultrasync_compactor::compact_once(&js, &stack.config.compactor, false, None)
        .await
        .expect("compaction");
    let plan = report
        .stream_keys
        .iter()
        .find(|p| p.stream_key == "acme/web/todos")
        .expect("a plan for todos");
    // The head op always stays.
    assert_eq!(plan.floor, 2, "{plan:?}");
    assert_eq!(log_len(&stack, "todos").await, 1);
    stack.stop_sequencer(0).await;
    stack.add_sequencer();
    let reused = send(&mut c, rent("pay less rent")).await;
    assert_eq!(code(&reused), ErrorCode::InvalidMessage, "{reused:?}");
    let retry = send(&mut c, rent("pay rent")).await;
    assert_eq!(code(&retry), ErrorCode::StaleBase, "{retry:?}");
    assert!(
        reason(&retry).contains(&format!("server_seq {seq}")),
        "{retry:?}"
    );
    // Nothing was written for any of them: the next op is 4.
    let next = send(
        &mut c,
        frame(
            "pay-2",
            "todos",
            "invoice",
            OpType::Set,
            json!({"title": "done"}),
            None,
        ),
    )
    .await;
    assert_eq!(acked(&next), 4);
    stack.shutdown().await;
}
