//! Webhooks: a local receiver gets every committed op (and `doc.updated` for crdt
//! keys) at least once, with signatures that verify, including the ops sent while it
//! was down; an endpoint that never answers ends in the dead-letter stream.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ultrasync_client::{OpType, ServerMessage};
use ultrasync_gateway::webhooks::{DLQ_STREAM, signature};
use ultrasync_shared::config::WebhookConfig;
use ultrasync_testkit::{Stack, StackOptions};

const SECRET: &str = "test-webhook-secret-0123456789";
static RECEIVER: OnceLock<String> = OnceLock::new();

/// One received POST.
#[derive(Debug, Clone)]
struct Received {
    event: String,
    delivery: String,
    body: Value,
    signed: bool,
}

/// A minimal HTTP receiver: answers 503 while `down`, else checks the signature,
/// records the event and answers 200.
async fn receiver(down: Arc<AtomicBool>, got: Arc<Mutex<Vec<Received>>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let down = down.clone();
            let got = got.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let (head, body) = loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse().ok())
                            })
                            .unwrap_or(0);
                        if rest.len() >= len {
                            break (head.to_owned(), rest[..len].to_owned());
                        }
                    }
                };
                if down.load(Ordering::Relaxed) {
                    let _ = s
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                let ts: u64 = header("usync-timestamp")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let signed = header("usync-signature")
                    == Some(signature(SECRET.as_bytes(), ts, body.as_bytes()));
                got.lock().expect("lock").push(Received {
                    event: header("usync-event").unwrap_or_default(),
                    delivery: header("usync-delivery").unwrap_or_default(),
                    body: serde_json::from_str(&body).unwrap_or(Value::Null),
                    signed,
                });
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    format!("http://{addr}/hook")
}

fn hooks(config: &mut ultrasync_shared::config::Config) {
    let base = |name: &str, url: &str, attempts: u32| WebhookConfig {
        name: name.to_owned(),
        url: url.to_owned(),
        secret: SECRET.to_owned(),
        org: "acme".to_owned(),
        project: Some("web".to_owned()),
        namespace: None,
        events: Vec::new(),
        max_attempts: attempts,
        backoff_ms: 100,
    };
    config.webhooks = vec![
        base("live", RECEIVER.get().expect("receiver"), 50),
        base("nowhere", "http://127.0.0.1:1/hook", 2),
    ];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_reaches_the_receiver_signed_even_after_it_was_down() {
    let down = Arc::new(AtomicBool::new(true));
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    RECEIVER
        .set(receiver(down.clone(), got.clone()).await)
        .expect("set once");
    let stack = Stack::start_with(StackOptions {
        configure: hooks,
        ..Default::default()
    })
    .await;
    let mut w = stack.client("wendy", "web", "wendy-1", &[]).await;
    let mut op_ids = HashSet::new();
    let mut crdt_ids = HashSet::new();
    let mut doc = AutoCommit::new();
    for i in 0..23 {
        let (ns, op, payload) = if i % 8 == 7 {
            doc.put(ROOT, "n", i as i64).expect("put");
            doc.commit();
            let change = B64.encode(doc.get_last_local_change().expect("change").raw_bytes());
            ("collab", OpType::CrdtOp, json!({"change": change}))
        } else {
            ("index", OpType::Set, json!({"i": i}))
        };
        let key = if ns == "collab" {
            "doc".to_owned()
        } else {
            format!("k{i}")
        };
        w.command(&format!("c{i}"), ns, &key, op, payload)
            .await
            .expect("send");
        loop {
            match w.recv_timeout(Duration::from_secs(10)).await.expect("ack") {
                ServerMessage::Ack { op, .. } => {
                    if ns == "collab" {
                        crdt_ids.insert(op.op_id.clone());
                    }
                    op_ids.insert(op.op_id);
                    break;
                }
                ServerMessage::Reject { reason, .. } => panic!("rejected: {reason}"),
                _ => {}
            }
        }
    }
    // The receiver was down for all of that; it comes back.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(got.lock().expect("lock").is_empty());
    down.store(false, Ordering::Relaxed);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let seen: Vec<Received> = got.lock().expect("lock").clone();
        let committed: HashSet<String> = seen
            .iter()
            .filter(|r| r.event == "op.committed")
            .filter_map(|r| r.body["op"]["op_id"].as_str().map(str::to_owned))
            .collect();
        let updated: HashSet<String> = seen
            .iter()
            .filter(|r| r.event == "doc.updated")
            .filter_map(|r| r.body["op_id"].as_str().map(str::to_owned))
            .collect();
        if committed == op_ids && updated == crdt_ids {
            assert!(seen.iter().all(|r| r.signed), "a signature did not verify");
            // A retry is the same delivery: ids name the op and the event.
            let mut per_delivery: HashMap<&str, usize> = HashMap::new();
            for r in &seen {
                *per_delivery.entry(r.delivery.as_str()).or_default() += 1;
            }
            assert_eq!(per_delivery.len(), op_ids.len() + crdt_ids.len());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "delivered {} of {} ops, {} of {} doc updates",
            committed.len(),
            op_ids.len(),
            updated.len(),
            crdt_ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The endpoint that never answers: every op ends in the dead-letter stream.
    let js = stack.jetstream().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut dlq = js.get_stream(DLQ_STREAM).await.expect("dlq");
        let n = dlq.info().await.expect("info").state.messages;
        if n >= op_ids.len() as u64 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = stack.get("/metrics", "").await.body;
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(value("ultrasync_webhook_deliveries_total") >= op_ids.len() as u64);
    assert!(value("ultrasync_webhook_failed_attempts_total") > 0);
    assert!(value("ultrasync_webhook_dead_lettered_total") >= op_ids.len() as u64);
    stack.shutdown().await;
}
