//! `ultrasync dev --tls` as a newcomer runs it: the real binary prints `wss://`,
//! `https://` and `tls://` URLs and the CA to trust; a client trusting that CA gets a
//! write acked over `wss://` and `/readyz` over `https://`; the managed nats-server
//! refuses a plain client and takes one trusting the CA. With `--cluster 3` the
//! routes speak TLS too (the streams on 3 replicas need them).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A running `ultrasync dev --tls` and what it printed.
struct Dev {
    child: Child,
    log: PathBuf,
    ws: String,
    http: String,
    nats: String,
    token: String,
    ca: PathBuf,
}

impl Drop for Dev {
    /// SIGTERM first, so `ultrasync dev` stops its nats-servers; SIGKILL if it hangs.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev(dir: &Path, extra: &[&str]) -> Dev {
    let log = dir.join("dev-stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ultrasync"))
        .args([
            "dev",
            "--tls",
            "--nats-port",
            "0",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .current_dir(dir)
        .env_remove("ULTRASYNC_JWT_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start ultrasync dev --tls");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (mut ws, mut http, mut nats, mut token, mut ca) = (None, None, None, None, None);
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["WebSocket", url, ..] => ws = Some((*url).to_owned()),
            ["HTTP", url, ..] => http = Some((*url).to_owned()),
            ["NATS", url, ..] => nats = Some((*url).to_owned()),
            ["dev", "token", t, ..] => token = Some((*t).to_owned()),
            ["CA", path, ..] => ca = Some(PathBuf::from(path)),
            ["Ctrl-C", ..] => break,
            _ => {}
        }
    }
    // Keep draining stdout so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let printed = |what: &str| -> String {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        format!("{what} not printed; ultrasync dev's log:\n{log}")
    };
    Dev {
        ws: ws.unwrap_or_else(|| panic!("{}", printed("WebSocket URL"))),
        http: http.unwrap_or_else(|| panic!("{}", printed("HTTP URL"))),
        nats: nats.unwrap_or_else(|| panic!("{}", printed("NATS URL"))),
        token: token.unwrap_or_else(|| panic!("{}", printed("dev token"))),
        ca: ca.unwrap_or_else(|| panic!("{}", printed("CA"))),
        child,
        log,
    }
}

fn stop_dev(dev: &mut Dev) {
    kill(Pid::from_raw(dev.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = dev.child.try_wait().expect("wait") {
            let log = std::fs::read_to_string(&dev.log).unwrap_or_default();
            assert!(
                status.success(),
                "ultrasync dev exited with {status}; its log:\n{log}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ultrasync dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TLS client trusting only `ca` (PEM file).
fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("the printed CA is a PEM certificate"))
        .expect("add the CA");
    tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    ))
}

/// `host:port` of a URL like `scheme://host:port/path`.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// TLS to the printed address, verifying the certificate for its host (127.0.0.1).
async fn tls_stream(
    dev: &Dev,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let addr = authority(&dev.http);
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector(&dev.ca)
        .connect(ServerName::try_from(host).expect("server name"), tcp)
        .await
}

/// `GET /readyz` over HTTPS until it answers 200 (the services may still be starting).
async fn https_ready(dev: &Dev) {
    let mut last = String::new();
    for _ in 0..200 {
        match tls_stream(dev).await {
            Ok(mut s) => {
                s.write_all(
                    b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                )
                .await
                .expect("write");
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                last = String::from_utf8_lossy(&buf).into_owned();
                if last.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            Err(e) => last = format!("TLS: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("https {}/readyz never answered 200: {last:?}", dev.http);
}

/// Over `wss://`, trusting the CA: hello, one write, its ack.
async fn wss_write_acked(dev: &Dev, client_id: &str) {
    let stream = tls_stream(dev)
        .await
        .expect("TLS handshake with the dev CA");
    let mut request = dev.ws.as_str().into_client_request().expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", dev.token).parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("WebSocket over TLS");
    let hello = format!(
        r#"{{"type":"hello","protocol":1,"org_id":"dev","project_id":"demo","client_id":"{client_id}","cursors":{{}}}}"#
    );
    ws.send(Message::text(hello)).await.expect("hello");
    let cmd = format!(
        r#"{{"type":"command","command_id":"{client_id}-c1","namespace":"index","key":"greeting","op_type":"set","payload":"hello over TLS"}}"#
    );
    ws.send(Message::text(cmd)).await.expect("command");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer")
            .expect("a frame")
            .expect("a good frame");
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            match v["type"].as_str() {
                Some("ack") => break,
                Some("welcome" | "ops" | "synced" | "presence") => {}
                _ => panic!("unexpected answer to the write: {t}"),
            }
        }
    }
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tls_serves_wss_and_https_and_nats_refuses_plain_clients() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut dev = start_dev(dir.path(), &[]);
    assert!(
        dev.ws.starts_with("wss://127.0.0.1:") && dev.ws.ends_with("/v1/sync"),
        "{}",
        dev.ws
    );
    assert!(dev.http.starts_with("https://127.0.0.1:"), "{}", dev.http);
    assert!(dev.nats.starts_with("tls://127.0.0.1:"), "{}", dev.nats);
    // The CA is in the data folder, by an absolute path a newcomer can copy.
    assert!(dev.ca.is_absolute(), "{}", dev.ca.display());
    assert_eq!(
        dev.ca,
        dir.path()
            .canonicalize()
            .expect("canonical")
            .join(".ultrasync/tls/ca.pem")
    );

    https_ready(&dev).await;
    wss_write_acked(&dev, "tls-1").await;

    // Plain WebSocket and HTTP to the gateway's TLS port get nothing.
    let plain_ws = ultrasync_client::Connection::connect(
        &format!("ws://{}/v1/sync", authority(&dev.ws)),
        &dev.token,
    )
    .await;
    assert!(plain_ws.is_err(), "a plain socket got through");
    let plain_http =
        ultrasync_testkit::http_get(&format!("http://{}/readyz", authority(&dev.http))).await;
    assert!(
        !matches!(plain_http, Ok((200, _))),
        "plain HTTP answered on the TLS port"
    );

    // The managed nats-server: a plain nats:// client without the CA is refused ...
    let nats_addr = authority(&dev.nats).to_owned();
    let plain = tokio::time::timeout(
        Duration::from_secs(20),
        async_nats::connect(format!("nats://{nats_addr}")),
    )
    .await;
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "a plain NATS client connected to the managed nats-server"
    );
    // ... and one trusting the printed CA gets in over TLS.
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(dev.ca.clone())
        .require_tls(true)
        .connect(dev.nats.as_str())
        .await
        .expect("a NATS client trusting the CA");
    assert!(client.server_info().tls_required, "the server requires TLS");
    client.flush().await.expect("flush over TLS");
    drop(client);

    let ca_before = std::fs::read(&dev.ca).expect("ca");
    stop_dev(&mut dev);

    // A second start keeps the certificates: a client trusting the CA still does.
    let mut dev2 = start_dev(dir.path(), &[]);
    assert_eq!(std::fs::read(&dev2.ca).expect("ca"), ca_before, "CA kept");
    https_ready(&dev2).await;
    wss_write_acked(&dev2, "tls-2").await;
    stop_dev(&mut dev2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tls_cluster_routes_speak_tls() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut dev = start_dev(dir.path(), &["--cluster", "3"]);
    let urls: Vec<&str> = dev.nats.split(',').collect();
    assert_eq!(urls.len(), 3, "{}", dev.nats);
    assert!(urls.iter().all(|u| u.starts_with("tls://")), "{}", dev.nats);
    // Streams on 3 replicas: a write is acked only once the routes (TLS, verifying
    // each other against the CA) carry it.
    https_ready(&dev).await;
    wss_write_acked(&dev, "tls-cluster").await;
    for i in 1..=3 {
        let conf = std::fs::read_to_string(
            dir.path()
                .join(format!(".ultrasync/nats-{i}/nats-server.conf")),
        )
        .expect("node config");
        let cluster = conf.split("cluster {").nth(1).expect("a cluster block");
        assert!(
            cluster.contains("tls {") && cluster.contains("verify: true"),
            "node {i}'s routes verify TLS peers:\n{conf}"
        );
    }
    stop_dev(&mut dev);
}
