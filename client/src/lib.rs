//! The Rust client for ultrasync: [`Connection`] speaks the WebSocket protocol frame
//! by frame (the CLI, the tests and the benchmark use it); [`sync::SyncClient`] is the
//! local-first SDK on top (replica, persisted outbox, optimistic edits, reconnects).
//! Both speak `ws://` and `wss://`; [`Trust`] says which CAs `wss://` believes (the
//! system's roots, plus a private CA from a PEM file), the same for [`http::Client`].

pub mod http;
pub mod sync;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
pub use ultrasync_http_client::{Trust, TrustError};
pub use ultrasync_shared::protocol::{ClientMessage, CommandFrame, ServerMessage};
pub use ultrasync_shared::{Op, OpType, Precondition};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the upgrade with this HTTP status (401, 403...).
    #[error("server answered HTTP {0}")]
    Http(u16),
    #[error("websocket: {0}")]
    WebSocket(String),
    /// `wss://`: the server's certificate is not signed by a trusted CA (or names
    /// another host).
    #[error(
        "the server's certificate is not trusted ({0}); trust the CA that signed it (a CA file: `Trust::with_ca_file`, the CLI's --ca-file)"
    )]
    Untrusted(String),
    /// The server closed the socket.
    #[error("closed by server: {code} {reason}")]
    Closed { code: u16, reason: String },
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("timed out")]
    Timeout,
    #[error("invalid url or token: {0}")]
    Request(String),
}

/// One WebSocket connection to a gateway.
pub struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// Longest wait for the TCP connection, TLS and the WebSocket upgrade.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked of the socket per read. tungstenite zeroes this much of its buffer
/// before every read: its 128 KiB default made zeroing a quarter of the CPU of a
/// process reading 1,000 sockets of small frames (`ultrasync bench --scenario
/// fanout`). A large frame still arrives whole, over several reads.
const READ_BUFFER: usize = 16 * 1024;

impl Connection {
    /// Connects to `url` (`ws://` or `wss://host:port/v1/sync`) with a bearer token,
    /// trusting the system's roots for `wss://`.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, token, &Trust::system()).await
    }

    /// [`Connection::connect`] trusting `trust` for `wss://` (e.g. a private CA).
    pub async fn connect_with(url: &str, token: &str, trust: &Trust) -> Result<Self, ClientError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        request.headers_mut().insert("Authorization", auth);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let connector = tokio_tungstenite::Connector::Rustls(trust.rustls_config());
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        );
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Ok((ws, _))) => Ok(Self { ws }),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                Err(ClientError::Http(resp.status().as_u16()))
            }
            Ok(Err(e)) if ultrasync_http_client::is_untrusted_certificate(&e) => {
                Err(ClientError::Untrusted(e.to_string()))
            }
            Ok(Err(e)) => Err(ClientError::WebSocket(e.to_string())),
        }
    }

    pub async fn send(&mut self, msg: &ClientMessage) -> Result<(), ClientError> {
        let text = serde_json::to_string(msg).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.send_raw(&text).await
    }

    /// Sends a text frame as is (for testing the server with malformed frames).
    pub async fn send_raw(&mut self, text: &str) -> Result<(), ClientError> {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| ClientError::WebSocket(e.to_string()))
    }

    /// The next server frame; pings are answered and skipped.
    pub async fn recv(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            let msg = self.ws.next().await;
            match msg {
                None => {
                    return Err(ClientError::Closed {
                        code: 1006,
                        reason: "connection ended".into(),
                    });
                }
                Some(Err(e)) => return Err(ClientError::WebSocket(e.to_string())),
                Some(Ok(Message::Text(t))) => {
                    return ServerMessage::decode(t.as_str())
                        .map_err(|e| ClientError::Decode(format!("{e}: {t}")));
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                    return Err(ClientError::Closed { code, reason });
                }
                Some(Ok(_)) => {}
            }
        }
    }

    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<ServerMessage, ClientError> {
        tokio::time::timeout(limit, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Sends `hello` and returns the `welcome`.
    pub async fn hello(
        &mut self,
        org: &str,
        project: &str,
        client_id: &str,
        cursors: BTreeMap<String, Option<u64>>,
    ) -> Result<ServerMessage, ClientError> {
        self.hello_resuming(org, project, client_id, cursors, BTreeMap::new())
            .await
    }

    /// `hello` that continues interrupted snapshots: `checkpoints` maps a namespace
    /// whose cursor is null to the `checkpoint` of the last `snapshot` frame it got.
    pub async fn hello_resuming(
        &mut self,
        org: &str,
        project: &str,
        client_id: &str,
        cursors: BTreeMap<String, Option<u64>>,
        checkpoints: BTreeMap<String, String>,
    ) -> Result<ServerMessage, ClientError> {
        self.send(&ClientMessage::Hello {
            protocol: ultrasync_shared::protocol::PROTOCOL_VERSION,
            org_id: org.to_owned(),
            project_id: project.to_owned(),
            client_id: client_id.to_owned(),
            cursors,
            checkpoints,
        })
        .await?;
        match self.recv_timeout(Duration::from_secs(10)).await? {
            w @ ServerMessage::Welcome { .. } => Ok(w),
            ServerMessage::Error { code, message } => {
                Err(ClientError::WebSocket(format!("{code}: {message}")))
            }
            other => Err(ClientError::Decode(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    /// Sends a command (does not wait for the answer).
    pub async fn command(
        &mut self,
        command_id: &str,
        namespace: &str,
        key: &str,
        op_type: OpType,
        payload: serde_json::Value,
    ) -> Result<(), ClientError> {
        self.send(&ClientMessage::Command(CommandFrame {
            command_id: command_id.to_owned(),
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            op_type,
            payload,
            precondition: None,
            base_seq: None,
        }))
        .await
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
