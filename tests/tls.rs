//! TLS on the gateway: a `wss://` client trusting a test CA connects and syncs, HTTPS
//! answers, and a plain connection to the TLS port fails.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use ultrasync_testkit::Stack;

/// A test CA and a server certificate for localhost / 127.0.0.1 signed by it:
/// (CA cert DER, server cert PEM, server key PEM).
fn test_pki() -> (rustls_pki_types::CertificateDer<'static>, String, String) {
    let ca = ultrasync_testkit::pki::TestCa::new();
    let server = ca.localhost();
    (ca.der(), server.cert_pem, server.key_pem)
}

fn client_config(ca: rustls_pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("add ca");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_test_ca_and_no_plain_on_the_tls_port() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (ca, cert_pem, key_pem) = test_pki();
    std::fs::write(dir.path().join("cert.pem"), cert_pem).expect("write");
    std::fs::write(dir.path().join("key.pem"), key_pem).expect("write");
    let mut config = stack.config.clone();
    config.gateway.tls_cert_file = Some(dir.path().join("cert.pem"));
    config.gateway.tls_key_file = Some(dir.path().join("key.pem"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(ultrasync_gateway::run(config, listener, stop.clone()));
    let connector = tokio_rustls::TlsConnector::from(client_config(ca));
    let tls = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
        connector
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
    };

    // HTTPS (waiting for the listener to serve).
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = tls().await {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            body.clear();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            body = String::from_utf8_lossy(&buf).into_owned();
            if body.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.starts_with("HTTP/1.1 200"), "https /healthz: {body:?}");

    // wss://: hello, a write, its ack.
    let stream = tls().await.expect("tls handshake");
    let mut request = format!("wss://localhost:{}/v1/sync", addr.port())
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", stack.token("tess", "read write"))
            .parse()
            .expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("websocket over TLS");
    let hello = r#"{"type":"hello","protocol":1,"org_id":"acme","project_id":"web","client_id":"tess-1","cursors":{}}"#;
    ws.send(Message::text(hello)).await.expect("hello");
    let cmd = r#"{"type":"command","command_id":"t1","namespace":"index","key":"k","op_type":"set","payload":1}"#;
    ws.send(Message::text(cmd)).await.expect("command");
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("answer in time")
            .expect("frame")
            .expect("ok");
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            kinds.push(v["type"].as_str().unwrap_or("").to_owned());
        }
    }
    assert_eq!(kinds, ["welcome", "ack"]);

    // Plain WebSocket and plain HTTP to the TLS port fail.
    let plain = ultrasync_client::Connection::connect(
        &format!("ws://{addr}/v1/sync"),
        &stack.token("tess", "read"),
    )
    .await;
    assert!(plain.is_err(), "a plain socket got through the TLS port");
    let plain_http = ultrasync_testkit::http_get(&format!("http://{addr}/healthz")).await;
    assert!(
        !matches!(plain_http, Ok((200, _))),
        "plain HTTP answered on the TLS port"
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), gateway).await;
    stack.shutdown().await;
}

/// A gateway serving TLS with a certificate from `ca`, on the stack's NATS; its
/// address, stop token and task.
async fn tls_gateway(
    stack: &Stack,
    ca: &ultrasync_testkit::pki::TestCa,
    dir: &std::path::Path,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let files = ca.localhost().write(dir, "gateway");
    let mut config = stack.config.clone();
    config.gateway.tls_cert_file = Some(files.cert);
    config.gateway.tls_key_file = Some(files.key);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let task = tokio::spawn(ultrasync_gateway::run(config, listener, stop.clone()));
    (addr, stop, task)
}

/// The real binary's client command against `url` with `env`: (exit code, stdout,
/// stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args(args)
        .env_remove("ULTRASYNC_CA_FILE")
        .envs(env.iter().copied())
        .env("ULTRASYNC_LOG", "error")
        .output()
        .expect("run ultrasync");
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI over `https://` and the Rust SDK over `wss://`, trusting a private CA
/// given as a file (`--ca-file`, `ULTRASYNC_CA_FILE`, `Trust::with_ca_file`,
/// `SyncOptions::ca_file`): a put and a get, a write acked; without the CA both
/// fail saying the certificate is not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_sdk_over_https_and_wss_with_a_ca_file() {
    use ultrasync_client::http;
    use ultrasync_client::{ClientError, Connection, ServerMessage, Trust};
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let ca = ultrasync_testkit::pki::TestCa::new();
    let ca_file = ca.write_ca(dir.path());
    let (addr, stop, gateway) = tls_gateway(&stack, &ca, dir.path()).await;
    let https = format!("https://localhost:{}", addr.port());
    let wss = format!("wss://localhost:{}/v1/sync", addr.port());
    let trust = Trust::with_ca_file(&ca_file).expect("trust the CA");

    // The HTTP client of the CLI, once the listener serves.
    let client = http::Client::new(&https, &trust, Duration::from_secs(5)).expect("client");
    let mut ready = None;
    for _ in 0..100 {
        ready = Some(client.request("GET", "/readyz", &[], None).await);
        if matches!(&ready, Some(Ok(r)) if r.status == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(&ready, Some(Ok(r)) if r.status == 200),
        "https /readyz: {ready:?}"
    );

    // The CLI: a put with --ca-file, a get with ULTRASYNC_CA_FILE.
    let token = stack.token("cleo", "read write");
    let ca_path = ca_file.to_str().expect("utf-8 path");
    let env = [
        ("ULTRASYNC_TOKEN", token.as_str()),
        ("ULTRASYNC_PROJECT", "web"),
    ];
    let (code, out, err) = cli(
        &[
            "put",
            "index",
            "tls-key",
            r#""over https""#,
            "--url",
            &https,
            "--ca-file",
            ca_path,
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["server_seq"], serde_json::json!(1), "{out}");
    let with_ca = [
        ("ULTRASYNC_TOKEN", token.as_str()),
        ("ULTRASYNC_PROJECT", "web"),
        ("ULTRASYNC_URL", https.as_str()),
        ("ULTRASYNC_CA_FILE", ca_path),
    ];
    let mut got = (0, serde_json::Value::Null, String::new());
    for _ in 0..100 {
        got = cli(&["get", "index", "tls-key"], &with_ca);
        if got.0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(got.0, 0, "{}", got.2);
    assert_eq!(got.1["value"], serde_json::json!("over https"), "{}", got.1);

    // Without the CA: refused, and the error says why and what to do.
    let (code, _, err) = cli(&["get", "index", "tls-key", "--url", &https], &env);
    assert_ne!(code, 0);
    let err: serde_json::Value = serde_json::from_str(err.trim()).expect("json error");
    assert_eq!(
        err["error"]["code"],
        serde_json::json!("untrusted_certificate"),
        "{err}"
    );
    let message = err["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("--ca-file"), "{message}");

    // The SDK's connection over wss://: hello, a write, its ack.
    let mut conn = Connection::connect_with(&wss, &stack.token("sam", "read write"), &trust)
        .await
        .expect("wss trusting the CA");
    conn.hello("acme", "web", "sam-1", Default::default())
        .await
        .expect("hello");
    conn.command(
        "sam-c1",
        "index",
        "sdk-key",
        ultrasync_client::OpType::Set,
        serde_json::json!(1),
    )
    .await
    .expect("command");
    loop {
        match conn
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("ack")
        {
            ServerMessage::Ack { op, .. } => {
                assert_eq!(op.key, "sdk-key");
                break;
            }
            ServerMessage::Reject { reason, .. } => panic!("rejected: {reason}"),
            _ => {}
        }
    }
    conn.close().await;

    // The local-first SDK with `ca_file`: its edit is acked (the outbox empties).
    let replica = ultrasync_client::sync::SyncClient::start(ultrasync_client::sync::SyncOptions {
        url: wss.clone(),
        token: stack.token("sid", "read write"),
        org: "acme".into(),
        project: "web".into(),
        client_id: "sid-1".into(),
        namespaces: vec!["index".into()],
        store: dir.path().join("replica"),
        ca_file: Some(ca_file.clone()),
    })
    .expect("start");
    replica
        .put("index", "replica-key", serde_json::json!("over wss"))
        .expect("put");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while replica.outbox_len() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edit was never acked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(replica);

    // Without the CA, the SDK is refused the same way.
    let refused = Connection::connect(&wss, &stack.token("sam", "read")).await;
    assert!(
        matches!(&refused, Err(ClientError::Untrusted(_))),
        "{:?}",
        refused.as_ref().err()
    );

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), gateway).await;
    stack.shutdown().await;
}
