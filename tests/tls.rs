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
