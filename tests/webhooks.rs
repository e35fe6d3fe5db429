//! Webhooks: a local receiver gets every committed op (and `doc.updated` for crdt
//! keys) at least once, with signatures that verify, including the ops sent while it
//! was down; an endpoint that never answers ends in the dead-letter stream. Over
//! HTTPS with a private CA: one kept-alive connection for many deliveries, and answers
//! that are huge or never end cut off without holding memory or a task.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
        timeout_ms: 10_000,
        ca_file: None,
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
    assert!(value("ultrasync_gateway_webhook_deliveries_total") >= op_ids.len() as u64);
    assert!(value("ultrasync_gateway_webhook_failed_attempts_total") > 0);
    assert!(value("ultrasync_gateway_webhook_dead_lettered_total") >= op_ids.len() as u64);
    stack.shutdown().await;
}

/// What an HTTPS receiver answers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    /// 200 with a two-byte body, connection kept.
    Ok,
    /// 200 announcing a 1 GiB body, sent until the client stops reading.
    Huge,
    /// 200 with a chunked body that never ends (16 bytes every 20 ms), until the client
    /// stops reading.
    Endless,
}

/// An HTTPS receiver's counts.
#[derive(Default)]
struct Counts {
    /// TCP connections accepted (each one TLS handshake).
    accepted: AtomicUsize,
    /// Requests read, over all connections.
    requests: AtomicUsize,
    /// Deliveries whose signature verified.
    signed: Mutex<HashSet<String>>,
    /// Answers the client cut off (the connection closed while the body was sent).
    cut_off: AtomicUsize,
    /// Answers that ran to the receiver's own cap instead (the client kept reading).
    ran_out: AtomicUsize,
    /// The most body bytes one cut-off answer got onto the socket.
    most_sent: AtomicU64,
}

/// Bytes of a [`Answer::Huge`] body.
const HUGE: u64 = 1 << 30;
/// An [`Answer::Endless`] body stops by itself after this long (the test's own bound).
const ENDLESS_CAP: Duration = Duration::from_secs(120);

/// An HTTP/1.1 keep-alive receiver over TLS on `[::1]` with a certificate of `ca`;
/// its `https://[::1]:port/hook` URL.
async fn tls_receiver(
    ca: &ultrasync_testkit::pki::TestCa,
    answer: Answer,
    counts: Arc<Counts>,
) -> String {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let issued = ca.localhost();
    let certs = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("[::1]:0")
        .await
        .expect("bind [::1]");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            counts.accepted.fetch_add(1, Ordering::Relaxed);
            let acceptor = acceptor.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve_keep_alive(tls, answer, &counts).await;
                }
            });
        }
    });
    format!("https://[::1]:{port}/hook")
}

/// Requests on one connection until it ends.
async fn serve_keep_alive<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: S,
    answer: Answer,
    counts: &Counts,
) {
    use tokio::io::AsyncBufReadExt;
    let (read, mut write) = tokio::io::split(stream);
    let mut read = tokio::io::BufReader::new(read);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match read.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => head.push(line),
            }
        }
        let header = |name: &str| {
            head.iter().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        counts.requests.fetch_add(1, Ordering::Relaxed);
        let ts: u64 = header("usync-timestamp")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if header("usync-signature") == Some(signature(SECRET.as_bytes(), ts, &body)) {
            counts
                .signed
                .lock()
                .expect("lock")
                .insert(header("usync-delivery").unwrap_or_default());
        }
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0u64;
        let outcome = match answer {
            Answer::Ok => {
                if write
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Answer::Huge => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n");
                let mut result = write.write_all(head.as_bytes()).await;
                while result.is_ok() && sent < HUGE {
                    result = write.write_all(&chunk).await;
                    if result.is_ok() {
                        sent += chunk.len() as u64;
                    }
                }
                result
            }
            Answer::Endless => {
                let until = tokio::time::Instant::now() + ENDLESS_CAP;
                let mut result = write
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                // Slowly (800 bytes a second): the deadline ends it, not the size.
                while result.is_ok() && tokio::time::Instant::now() < until {
                    result = write.write_all(b"10\r\n").await;
                    if result.is_ok() {
                        result = write.write_all(&chunk[..16]).await;
                    }
                    if result.is_ok() {
                        result = write.write_all(b"\r\n").await;
                        sent += 16;
                    }
                    if result.is_ok() {
                        result = write.flush().await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                result
            }
        };
        if outcome.is_err() {
            counts.cut_off.fetch_add(1, Ordering::Relaxed);
            counts.most_sent.fetch_max(sent, Ordering::Relaxed);
        } else {
            counts.ran_out.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
}

static TLS_HOOKS: OnceLock<Vec<WebhookConfig>> = OnceLock::new();

/// Webhooks over HTTPS to receivers on `[::1]` whose certificates a test CA signed
/// (trusted through each webhook's `ca_file`): the deliveries of one webhook reuse one
/// kept-alive connection (one TLS handshake for all of them); a receiver answering a
/// huge body or a body that never ends has its answer cut off (the connection
/// dropped), each attempt fails and, after `max_attempts`, the op is dead-lettered,
/// while the gateway's memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_reuse_one_connection_and_bound_what_they_read() {
    const OPS: usize = 12;
    let dir = tempfile::tempdir().expect("tmp");
    let ca = ultrasync_testkit::pki::TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let ok = Arc::new(Counts::default());
    let huge = Arc::new(Counts::default());
    let endless = Arc::new(Counts::default());
    let hook = |name: &str, url: String, attempts: u32, timeout_ms: u64| WebhookConfig {
        name: name.to_owned(),
        url,
        secret: SECRET.to_owned(),
        org: "acme".to_owned(),
        project: Some("tls".to_owned()),
        namespace: None,
        events: Vec::new(),
        max_attempts: attempts,
        backoff_ms: 100,
        timeout_ms,
        ca_file: Some(ca_file.clone()),
    };
    let hooks = vec![
        hook(
            "tls-ok",
            tls_receiver(&ca, Answer::Ok, ok.clone()).await,
            50,
            10_000,
        ),
        hook(
            "tls-huge",
            tls_receiver(&ca, Answer::Huge, huge.clone()).await,
            2,
            10_000,
        ),
        hook(
            "tls-endless",
            tls_receiver(&ca, Answer::Endless, endless.clone()).await,
            2,
            1_000,
        ),
    ];
    TLS_HOOKS.set(hooks).expect("set once");
    let stack = Stack::start_with(StackOptions {
        configure: |c| c.webhooks = TLS_HOOKS.get().expect("hooks").clone(),
        ..Default::default()
    })
    .await;
    let rss_before = ultrasync_testkit::rss_kib(std::process::id());

    let mut w = stack.client("wendy", "tls", "wendy-tls", &[]).await;
    for i in 0..OPS {
        w.command(
            &format!("t{i}"),
            "index",
            &format!("k{i}"),
            OpType::Set,
            json!({"i": i}),
        )
        .await
        .expect("send");
        loop {
            match w.recv_timeout(Duration::from_secs(10)).await.expect("ack") {
                ServerMessage::Ack { .. } => break,
                ServerMessage::Reject { reason, .. } => panic!("rejected: {reason}"),
                _ => {}
            }
        }
    }

    // Every op reached the good receiver, signed, over one connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while ok.signed.lock().expect("lock").len() < OPS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {OPS} deliveries signed",
            ok.signed.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ok.accepted.load(Ordering::Relaxed),
        1,
        "{} requests came over {} connections",
        ok.requests.load(Ordering::Relaxed),
        ok.accepted.load(Ordering::Relaxed)
    );
    assert!(ok.requests.load(Ordering::Relaxed) >= OPS);

    // The huge and the endless answers: every op dead-lettered after its attempts.
    let metrics = |body: &str, name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let body = stack.get("/metrics", "").await.body;
        let dead = metrics(&body, "ultrasync_gateway_webhook_dead_lettered_total");
        if dead >= 2 * OPS as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dead} of {} ops dead-lettered",
            2 * OPS
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let js = stack.jetstream().await;
    let mut dlq = js.get_stream(DLQ_STREAM).await.expect("dlq");
    assert!(dlq.info().await.expect("info").state.messages >= 2 * OPS as u64);

    // Each answer was cut off by the gateway, none ran on; the huge ones after little
    // more than what the socket buffers hold, not the gigabyte announced.
    for (what, counts) in [("huge", &huge), ("endless", &endless)] {
        let requests = counts.requests.load(Ordering::Relaxed);
        assert!(requests >= 2 * OPS, "{what}: {requests} attempts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while counts.cut_off.load(Ordering::Relaxed) < requests {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} of {requests} answers cut off, {} ran out",
                counts.cut_off.load(Ordering::Relaxed),
                counts.ran_out.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(counts.ran_out.load(Ordering::Relaxed), 0, "{what}");
    }
    let most = huge.most_sent.load(Ordering::Relaxed);
    assert!(most < 64 << 20, "a huge answer got {most} bytes out");
    // 24 answers announcing 1 GiB each: read whole, they would have taken gigabytes.
    let grown = ultrasync_testkit::rss_kib(std::process::id()).saturating_sub(rss_before);
    assert!(grown < 256 * 1024, "the process grew by {grown} KiB");
    stack.shutdown().await;
}
