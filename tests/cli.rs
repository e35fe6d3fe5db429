//! The client commands through the real binary: JSON out, exit codes that tell a
//! precondition failure from an auth failure from an outage, and `watch` seeing a put
//! made by another process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use ultrasync_testkit::{Stack, StackOptions};

struct Run {
    code: i32,
    stdout: Value,
    stderr: String,
}

fn cli(stack: &Stack, token: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args(args)
        .env("ULTRASYNC_URL", format!("http://{}", stack.http))
        .env("ULTRASYNC_TOKEN", token)
        .env("ULTRASYNC_PROJECT", "web")
        .env("ULTRASYNC_LOG", "error")
        .output()
        .expect("run");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_patch_del_history_with_exit_codes() {
    let stack = Stack::start().await;
    let token = stack.token("agent", "read write");

    let r = cli(&stack, &token, &["put", "index", "greeting", r#""hello""#]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout["server_seq"], json!(1));
    let r = cli(&stack, &token, &["patch", "index", "cfg", r#"{"a":1}"#]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout["type"], json!("ack"));

    // Compare-and-set: the first create wins, the second is a precondition failure
    // (exit 3) that prints the current state.
    let r = cli(
        &stack,
        &token,
        &["put", "settings", "theme", r#""dark""#, "--if-version", "0"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = cli(
        &stack,
        &token,
        &[
            "put",
            "settings",
            "theme",
            r#""light""#,
            "--if-version",
            "0",
        ],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    let err: Value = serde_json::from_str(r.stderr.trim()).expect("json error");
    assert_eq!(err["error"]["code"], json!("precondition_failed"));
    assert_eq!(err["current_state"]["value"], json!("dark"));
    assert_eq!(err["current_state"]["version"], json!(1));

    // Reads (the materializer answers; wait for it to apply).
    let mut got = Value::Null;
    for _ in 0..100 {
        let r = cli(&stack, &token, &["get", "index", "cfg"]);
        if r.code == 0 {
            got = r.stdout;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got["value"], json!({"a": 1}));
    let r = cli(&stack, &token, &["get", "index", "missing"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let r = cli(&stack, &token, &["history", "index", "greeting"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout["ops"][0]["payload"], json!("hello"));
    let r = cli(
        &stack,
        &token,
        &["del", "index", "greeting", "--if-version", "1"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);

    // Bad input, bad token, no server.
    let r = cli(&stack, &token, &["put", "index", "k", "not json"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let reader = stack.token("agent", "read");
    let r = cli(&stack, &reader, &["put", "index", "k", "1"]);
    assert_eq!(r.code, 6, "{}", r.stderr);
    let r = cli(
        &stack,
        "not-a-token",
        &["get", "index", "cfg", "--org", "acme"],
    );
    assert_eq!(r.code, 6, "{}", r.stderr);
    let out = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args([
            "get",
            "index",
            "cfg",
            "--url",
            "http://127.0.0.1:1",
            "--project",
            "web",
        ])
        .env("ULTRASYNC_TOKEN", &token)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(7));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_a_put_from_another_process() {
    let stack = Stack::start_with(StackOptions {
        materializers: 0,
        ..Default::default()
    })
    .await;
    let token = stack.token("agent", "read write");
    let r = cli(&stack, &token, &["put", "index", "before", "0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let mut watch = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args(["watch", "index"])
        .env("ULTRASYNC_URL", format!("http://{}", stack.http))
        .env("ULTRASYNC_TOKEN", &token)
        .env("ULTRASYNC_PROJECT", "web")
        .env("ULTRASYNC_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Puts from other processes until the watcher prints one (it starts "from now",
    // so the first put may land before it subscribed).
    let mut seen = None;
    for i in 0..50 {
        let r = cli(&stack, &token, &["put", "index", "live", &i.to_string()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            seen = Some(line);
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let line = seen.expect("watch printed nothing");
    let op: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(op["key"], json!("live"));
    assert_ne!(op["key"], json!("before"), "watch replayed history");
    stack.shutdown().await;
}
