//! Reads of materialized state over NATS request-reply.
//!
//! Every materializer instance is a full replica and listens in the queue group
//! `materializers` on `usync.mat.{verb}.{org}.{project}.{ns}`, so a request reaches one
//! of them. The request body is a JSON [`ReadRequest`]; `min_seq` makes the instance
//! wait (up to [`MAX_WAIT`]) until it has applied that far, which gives a reader its
//! own writes. Answers carry the header `Usync-Status: ok` or `error`; an error body is
//! `{"error": {"code", "message"}}` as on the HTTP API.
//!
//! | verb | answer |
//! | --- | --- |
//! | `snapshot` | the state as a snapshot blob (the `USNP` format of [`crate::snapshot`]) |
//! | `key` | [`KeyReply`] for `request.key` (with `request.doc`, a crdt key's document too) |
//! | `digest` | [`DigestReply`] |
//!
//! The sequencer answers `digest` too, on `usync.seqstate.{org}.{project}.{ns}`: its
//! own in-memory view, which must equal the materializer's.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::StreamKey;
use crate::error::ErrorCode;
use crate::snapshot::Snapshot;

/// Queue group of the materializers' read service.
pub const QUEUE: &str = "materializers";
/// Header on every answer: `ok` or `error`.
pub const HDR_STATUS: &str = "Usync-Status";
/// Longest a request waits for `min_seq`.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// How long a requester waits for an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Snapshot,
    Key,
    Digest,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Snapshot => "snapshot",
            Verb::Key => "key",
            Verb::Digest => "digest",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "snapshot" => Some(Verb::Snapshot),
            "key" => Some(Verb::Key),
            "digest" => Some(Verb::Digest),
            _ => None,
        }
    }
}

/// `usync.mat.{verb}.{org}.{project}.{ns}`.
pub fn subject(verb: Verb, key: &StreamKey) -> String {
    format!(
        "usync.mat.{}.{}.{}.{}",
        verb.as_str(),
        key.org,
        key.project,
        key.namespace
    )
}

/// What the materializers subscribe to.
pub const SUBSCRIPTION: &str = "usync.mat.*.*.*.*";

/// The sequencer's digest subject for `key`.
pub fn sequencer_subject(key: &StreamKey) -> String {
    format!(
        "usync.seqstate.{}.{}.{}",
        key.org, key.project, key.namespace
    )
}

/// What the sequencers subscribe to.
pub const SEQUENCER_SUBSCRIPTION: &str = "usync.seqstate.*.*.*";

/// Parses a request subject back into its verb and stream key.
pub fn parse_subject(subject: &str) -> Option<(Verb, StreamKey)> {
    let mut parts = subject.split('.');
    if parts.next()? != "usync" || parts.next()? != "mat" {
        return None;
    }
    let verb = Verb::parse(parts.next()?)?;
    let (org, project, ns) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((verb, StreamKey::parse(org, project, ns).ok()?))
}

/// Parses `usync.seqstate.{org}.{project}.{ns}`.
pub fn parse_sequencer_subject(subject: &str) -> Option<StreamKey> {
    let rest = subject.strip_prefix("usync.seqstate.")?;
    let mut parts = rest.split('.');
    let (org, project, ns) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    StreamKey::parse(org, project, ns).ok()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadRequest {
    /// Answer only once this `server_seq` is applied (up to [`MAX_WAIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
    /// The key, for `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// For `snapshot`: also store the answer in `usync-snapshots` (used when the stored
    /// one was found damaged).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub store: bool,
    /// For `key`: also send a crdt key's Automerge document ([`KeyReply::doc`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub doc: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyReply {
    /// `server_seq` the answer is as of.
    pub last_server_seq: u64,
    /// `None` when the key does not exist.
    pub value: Option<Value>,
    /// 0 when the key does not exist.
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<Vec<String>>,
    /// A crdt key's document (base64 of `Automerge::save()`), when asked for with
    /// [`ReadRequest::doc`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestReply {
    pub last_server_seq: u64,
    pub digest: String,
    pub keys: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ErrorDetail {
    code: ErrorCode,
    message: String,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No materializer (or sequencer) is listening.
    #[error("no instance is serving reads")]
    NoResponders,
    #[error("read timed out")]
    Timeout,
    #[error("{code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("bad answer: {0}")]
    Decode(String),
    #[error("nats: {0}")]
    Nats(String),
}

/// Builds an answer: headers + body.
pub fn ok_reply(body: impl Into<Bytes>) -> (async_nats::HeaderMap, Bytes) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(HDR_STATUS, "ok");
    (h, body.into())
}

pub fn error_reply(code: ErrorCode, message: impl Into<String>) -> (async_nats::HeaderMap, Bytes) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(HDR_STATUS, "error");
    let body = ErrorBody {
        error: ErrorDetail {
            code,
            message: message.into(),
        },
    };
    (h, serde_json::to_vec(&body).unwrap_or_default().into())
}

async fn request(
    client: &async_nats::Client,
    subject: String,
    req: &ReadRequest,
) -> Result<Bytes, ReadError> {
    use async_nats::RequestErrorKind;
    let body = serde_json::to_vec(req).map_err(|e| ReadError::Decode(e.to_string()))?;
    let ask = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(REQUEST_TIMEOUT));
    let msg = client
        .send_request(subject, ask)
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => ReadError::NoResponders,
            RequestErrorKind::TimedOut => ReadError::Timeout,
            _ => ReadError::Nats(e.to_string()),
        })?;
    let status = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(HDR_STATUS))
        .map(|v| v.as_str().to_owned());
    match status.as_deref() {
        Some("ok") => Ok(msg.payload),
        Some("error") => {
            let e: ErrorBody = serde_json::from_slice(&msg.payload)
                .map_err(|e| ReadError::Decode(e.to_string()))?;
            Err(ReadError::Refused {
                code: e.error.code,
                message: e.error.message,
            })
        }
        _ => Err(ReadError::Decode(format!(
            "answer without a {HDR_STATUS} header"
        ))),
    }
}

/// `key`'s state from a materializer, as a checked snapshot.
pub async fn snapshot(
    client: &async_nats::Client,
    key: &StreamKey,
    req: &ReadRequest,
) -> Result<Snapshot, ReadError> {
    let bytes = request(client, subject(Verb::Snapshot, key), req).await?;
    let snapshot = Snapshot::decode(&bytes).map_err(|e| ReadError::Decode(e.to_string()))?;
    if snapshot.stream_key != key.to_string() {
        return Err(ReadError::Decode(format!(
            "asked for {key}, got {}",
            snapshot.stream_key
        )));
    }
    Ok(snapshot)
}

/// A materializer's snapshot of `key` (at `min_seq` or later when given) that it
/// also stores in `store` (forward only, see [`crate::snapshot::put`]). One too big
/// for a message is read back from the store. `None` when no materializer answers or
/// the key is empty.
pub async fn stored_snapshot(
    client: &async_nats::Client,
    store: &async_nats::jetstream::object_store::ObjectStore,
    key: &StreamKey,
    min_seq: Option<u64>,
) -> Result<Option<Snapshot>, String> {
    let req = ReadRequest {
        store: true,
        min_seq,
        ..Default::default()
    };
    match snapshot(client, key, &req).await {
        Ok(s) if s.state.last_seq > 0 => Ok(Some(s)),
        Ok(_) | Err(ReadError::NoResponders) => Ok(None),
        Err(ReadError::Refused {
            code: ErrorCode::PayloadTooLarge,
            ..
        }) => crate::snapshot::fetch(store, key)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// One key from a materializer.
pub async fn key(
    client: &async_nats::Client,
    stream_key: &StreamKey,
    key: &str,
    min_seq: Option<u64>,
) -> Result<KeyReply, ReadError> {
    let req = ReadRequest {
        min_seq,
        key: Some(key.to_owned()),
        ..Default::default()
    };
    let bytes = request(client, subject(Verb::Key, stream_key), &req).await?;
    serde_json::from_slice(&bytes).map_err(|e| ReadError::Decode(e.to_string()))
}

/// One crdt key with its Automerge document from a materializer, as of `min_seq`
/// or later. A document too large for one message is refused `payload_too_large`
/// (read the namespace's snapshot instead).
pub async fn document(
    client: &async_nats::Client,
    stream_key: &StreamKey,
    key: &str,
    min_seq: Option<u64>,
) -> Result<KeyReply, ReadError> {
    let req = ReadRequest {
        min_seq,
        key: Some(key.to_owned()),
        doc: true,
        ..Default::default()
    };
    let bytes = request(client, subject(Verb::Key, stream_key), &req).await?;
    serde_json::from_slice(&bytes).map_err(|e| ReadError::Decode(e.to_string()))
}

/// The state digest from a materializer.
pub async fn digest(
    client: &async_nats::Client,
    key: &StreamKey,
    min_seq: Option<u64>,
) -> Result<DigestReply, ReadError> {
    let req = ReadRequest {
        min_seq,
        ..Default::default()
    };
    let bytes = request(client, subject(Verb::Digest, key), &req).await?;
    serde_json::from_slice(&bytes).map_err(|e| ReadError::Decode(e.to_string()))
}

/// The state digest as the active sequencer holds it.
pub async fn sequencer_digest(
    client: &async_nats::Client,
    key: &StreamKey,
) -> Result<DigestReply, ReadError> {
    let bytes = request(client, sequencer_subject(key), &ReadRequest::default()).await?;
    serde_json::from_slice(&bytes).map_err(|e| ReadError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let k = StreamKey::parse("acme", "web", "settings").expect("key");
        for verb in [Verb::Snapshot, Verb::Key, Verb::Digest] {
            assert_eq!(parse_subject(&subject(verb, &k)), Some((verb, k.clone())));
        }
        assert_eq!(parse_subject("usync.mat.nope.a.b.c"), None);
        assert_eq!(parse_subject("usync.mat.key.a.b"), None);
        assert_eq!(
            parse_sequencer_subject(&sequencer_subject(&k)),
            Some(k.clone())
        );
        assert_eq!(parse_sequencer_subject("usync.seqstate.a.b.c.d"), None);
    }
}
