//! A raw automerge-repo peer for tests: one WebSocket to `/v1/automerge/...`
//! speaking the CBOR frames of automerge-repo-network-websocket 2.x by hand, so a
//! test can send what no well-behaved repo would. Included with
//! `#[path = "support/amrepo.rs"] mod amrepo;`.

#![allow(dead_code)]

use std::time::Duration;

use automerge::sync::{Message as SyncMessage, MessageVersion, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ROOT};
use ciborium::Value;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Longest a frame is waited for before the test fails (turns a hang into a failure).
pub const BOUND: Duration = Duration::from_secs(60);

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// A CBOR map of text keys.
pub fn cbor_map(fields: &[(&str, Value)]) -> Vec<u8> {
    let map = Value::Map(fields.iter().map(|(k, v)| (text(k), v.clone())).collect());
    let mut out = Vec::new();
    ciborium::ser::into_writer(&map, &mut out).expect("cbor");
    out
}

pub fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_text() == Some(name))
        .map(|(_, v)| v)
}

/// The `type` of a decoded frame.
pub fn kind(v: &Value) -> &str {
    field(v, "type").and_then(Value::as_text).unwrap_or("")
}

/// The `message` of an `error` frame.
pub fn message(v: &Value) -> &str {
    field(v, "message").and_then(Value::as_text).unwrap_or("")
}

/// The endpoint URL of `org/project/ns` on `http` (host:port) with `token`.
pub fn endpoint(http: &str, org: &str, project: &str, ns: &str, token: &str) -> String {
    format!("ws://{http}/v1/automerge/{org}/{project}/{ns}?access_token={token}")
}

/// The sync message of a document that has nothing (what a repo sends to ask).
pub fn empty_request() -> Vec<u8> {
    let mut empty = AutoCommit::new();
    let mut st = automerge::sync::State::new();
    empty
        .sync()
        .generate_sync_message(&mut st)
        .expect("a message")
        .encode()
}

/// A sync message carrying one new change (a document with `key` = `value`), and
/// the change's hash.
pub fn change_message(key: &str, value: i64) -> (Vec<u8>, ChangeHash) {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, key, value).expect("put");
    let change = doc.get_last_local_change().expect("a change");
    let message = SyncMessage {
        heads: doc.get_heads(),
        need: Vec::new(),
        have: Vec::new(),
        changes: vec![change.raw_bytes().to_vec()].into(),
        flags: None,
        version: MessageVersion::V1,
    }
    .encode();
    (message, change.hash())
}

/// The heads a `sync` frame's message advertises.
pub fn sync_heads(v: &Value) -> Vec<ChangeHash> {
    let Some(Value::Bytes(data)) = field(v, "data") else {
        return Vec::new();
    };
    SyncMessage::decode(data)
        .map(|m| m.heads)
        .unwrap_or_default()
}

pub struct Peer {
    pub id: String,
    pub ws: Ws,
}

impl Peer {
    /// Connects and joins as `id`; panics unless the server answers `peer`.
    pub async fn join(url: &str, id: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        let mut p = Self {
            id: id.to_owned(),
            ws,
        };
        p.send(&cbor_map(&[
            ("type", text("join")),
            ("senderId", text(id)),
            ("peerMetadata", Value::Map(Vec::new())),
            ("supportedProtocolVersions", Value::Array(vec![text("1")])),
        ]))
        .await;
        let answer = p.next().await;
        assert_eq!(kind(&answer), "peer", "{answer:?}");
        p
    }

    pub async fn send(&mut self, frame: &[u8]) {
        self.ws
            .send(Message::Binary(frame.to_vec().into()))
            .await
            .expect("send");
    }

    /// Sends without waiting for the write to finish being accepted (`false` once
    /// the socket is gone).
    pub async fn try_send(&mut self, frame: &[u8]) -> bool {
        self.ws
            .send(Message::Binary(frame.to_vec().into()))
            .await
            .is_ok()
    }

    /// A `request` or `sync` for `doc` with the sync message `data`.
    pub async fn sync(&mut self, kind: &str, doc: &str, data: Vec<u8>) {
        let frame = cbor_map(&[
            ("type", text(kind)),
            ("senderId", text(&self.id)),
            ("targetId", text("server")),
            ("documentId", text(doc)),
            ("data", Value::Bytes(data)),
        ]);
        self.send(&frame).await;
    }

    /// An `ephemeral` message for `doc`.
    pub async fn ephemeral(&mut self, doc: &str, session: &str, count: u64, data: Vec<u8>) -> bool {
        let frame = cbor_map(&[
            ("type", text("ephemeral")),
            ("senderId", text(&self.id)),
            ("targetId", text("server")),
            ("documentId", text(doc)),
            ("sessionId", text(session)),
            ("count", Value::Integer(count.into())),
            ("data", Value::Bytes(data)),
        ]);
        self.try_send(&frame).await
    }

    /// Asks for `doc` (as a repo that does not have it) and returns the answer.
    pub async fn request(&mut self, doc: &str) -> Value {
        self.sync("request", doc, empty_request()).await;
        self.next().await
    }

    /// The next binary frame, decoded; panics on a close.
    pub async fn next(&mut self) -> Value {
        match self.next_or_close().await {
            Ok(v) => v,
            Err(close) => panic!("peer {}: closed ({close:?})", self.id),
        }
    }

    /// The next binary frame, or the close code.
    pub async fn next_or_close(&mut self) -> Result<Value, Option<u16>> {
        loop {
            let m = tokio::time::timeout(BOUND, self.ws.next())
                .await
                .expect("a frame in time");
            match m {
                Some(Ok(Message::Binary(b))) => {
                    return Ok(ciborium::de::from_reader(&b[..]).expect("cbor"));
                }
                Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// Frames until one of type `want` (others are skipped).
    pub async fn until(&mut self, want: &str) -> Value {
        loop {
            let v = self.next().await;
            if kind(&v) == want {
                return v;
            }
        }
    }

    /// Frames until the server's heads for `doc` include `hash` (what it says the
    /// log stores).
    pub async fn until_heads(&mut self, doc: &str, hash: &ChangeHash) -> Value {
        loop {
            let v = self.next().await;
            let for_doc = field(&v, "documentId").and_then(Value::as_text) == Some(doc);
            if kind(&v) == "sync" && for_doc && sync_heads(&v).contains(hash) {
                return v;
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
