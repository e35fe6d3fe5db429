//! `ultrasync inspect streams|snapshot` through the binary, against a real stack.

use std::process::Command;

use serde_json::{Value, json};
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_testkit::{Stack, StackOptions, wait_for_snapshot};

/// Runs `ultrasync inspect ARGS` against the stack's NATS.
fn run_inspect(stack: &Stack, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args(["--nats-url", stack.nats.url(), "inspect"])
        .args(args)
        .output()
        .expect("run ultrasync inspect")
}

/// `run_inspect`, which must succeed, parsed as JSON.
fn inspect(stack: &Stack, args: &[&str]) -> Value {
    let out = run_inspect(stack, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

const SNAPSHOT_OF: [&str; 7] = ["snapshot", "--org", "acme", "--project", "web", "--ns", ""];

fn snapshot_args(ns: &str) -> Vec<&str> {
    let mut args = SNAPSHOT_OF.to_vec();
    args[6] = ns;
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_streams_heads_and_snapshots() {
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.materializer.snapshot_every_ops = 10,
        ..Default::default()
    })
    .await;
    let mut c = stack.client("ivy", "web", "ivy-1", &[]).await;
    for (ns, n) in [("index", 12), ("metadata", 3)] {
        for i in 0..n {
            c.command(
                &format!("{ns}-{i}"),
                ns,
                &format!("k{}", i % 4),
                OpType::Set,
                json!(i),
            )
            .await
            .expect("send");
            while !matches!(
                c.recv_timeout(std::time::Duration::from_secs(10))
                    .await
                    .expect("ack"),
                ServerMessage::Ack { .. }
            ) {}
        }
    }

    let streams = inspect(&stack, &["streams"]);
    assert_eq!(streams["resources"]["USYNC_OPS"]["messages"], 15);
    assert_eq!(
        streams["resources"]["USYNC_CMDS"]["messages"], 0,
        "acked commands leave the work queue"
    );
    for r in ["usync-cursors", "usync-snapshots"] {
        assert!(
            streams["resources"][r].get("missing").is_none(),
            "{r} missing"
        );
    }
    let keys = streams["stream_keys"].as_array().expect("keys");
    let head = |k: &str| {
        keys.iter()
            .find(|e| e["stream_key"] == k)
            .map(|e| (e["messages"].clone(), e["head_server_seq"].clone()))
    };
    assert_eq!(head("acme/web/index"), Some((json!(12), json!(12))));
    assert_eq!(head("acme/web/metadata"), Some((json!(3), json!(3))));

    let stored = wait_for_snapshot(&stack, "web", "index", 10).await;
    let snap = inspect(&stack, &snapshot_args("index"));
    assert_eq!(snap["last_server_seq"], stored.state.last_seq);
    assert_eq!(snap["digest"], stored.digest());
    assert_eq!(snap["state"].as_object().map(|m| m.len()), Some(4));

    // No snapshot: a clear error, non-zero exit.
    let out = run_inspect(&stack, &snapshot_args("metadata"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot"));
    stack.shutdown().await;
}
