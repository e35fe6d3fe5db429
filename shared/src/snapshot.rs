//! The snapshot blob: one stream key's state at a `server_seq`, plus the command keys
//! and op ids of the ops up to there, so whoever loads it (a sequencer taking over the key, a
//! materializer, a client bootstrap) needs only the log after it.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic    4  b"USNP"
//! version  2  1
//! codec    1  1 = zstd-compressed JSON body
//! reserved 1  0
//! length   8  length of the compressed body
//! sha256  32  of the compressed body
//! body     length bytes
//! ```
//!
//! A blob that is truncated, has a bad checksum, an unknown version or codec, or whose
//! state does not reproduce its recorded digest is refused; callers then rebuild from
//! the log. Decoders for older versions stay when the format moves on.
//!
//! Decoding is bounded and never hits serde_json's recursion limit for a value that
//! was once admitted: the body is inflated up to [`MAX_BODY_BYTES`], the envelope is
//! read with each value left raw (serde_json skips raw values without a depth limit),
//! and each value is then parsed on its own, so a value as deep as the parser allows
//! at top level (127, the deepest any build could have admitted) still loads; a crdt
//! key whose value is deeper than that is rebuilt from its document.

use std::collections::BTreeMap;

use automerge::Automerge;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::state::{self, KeyEntry, NamespaceState};

pub const MAGIC: &[u8; 4] = b"USNP";
pub const VERSION: u16 = 1;
const CODEC_ZSTD_JSON: u8 = 1;
const HEADER_LEN: usize = 4 + 2 + 1 + 1 + 8 + 32;
/// zstd level: fast, still small for JSON.
const ZSTD_LEVEL: i32 = 3;
/// Bytes of JSON handed to the compressor at a time when encoding.
const ENCODE_CHUNK: usize = 128 * 1024;
/// Largest inflated body [`Snapshot::decode`] accepts (a damaged or hostile blob
/// must not inflate without end).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024 * 1024;

/// A decoded snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `org/project/namespace`, for sanity checks.
    pub stream_key: String,
    /// Stream sequence of the op at `state.last_seq` (where to resume reading).
    pub head_stream_seq: u64,
    pub state: NamespaceState,
    /// Command key (hex of [`crate::op::command_key`]) → (op id, `server_seq`) of
    /// the ops up to `state.last_seq`: a retry gets its original answer and a reused
    /// command id with another body is refused, also after a take-over.
    pub commands: BTreeMap<String, (String, u64)>,
    /// Op id → `server_seq` of ops whose command key is not known (snapshots written
    /// before command keys were kept): retries of those are still recognised.
    pub op_ids: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a snapshot (bad magic)")]
    Magic,
    #[error("snapshot version {0} is newer than this build understands")]
    Version(u16),
    #[error("unknown snapshot codec {0}")]
    Codec(u8),
    #[error("snapshot truncated: {0}")]
    Truncated(String),
    #[error("snapshot checksum mismatch")]
    Checksum,
    #[error("snapshot body invalid: {0}")]
    Body(String),
    #[error("snapshot state does not match its digest")]
    Digest,
}

/// What a snapshot's body holds, borrowed from the [`Snapshot`] it encodes.
#[derive(Serialize)]
struct Body<'a> {
    stream_key: &'a str,
    last_seq: u64,
    head_stream_seq: u64,
    digest: String,
    keys: Vec<BodyKey<'a>>,
    op_ids: Vec<(&'a str, u64)>,
    commands: Vec<(&'a str, &'a str, u64)>,
}

/// [`Body`] as read: values left raw, parsed one by one (see the module doc).
#[derive(Deserialize)]
struct BodyIn {
    stream_key: String,
    last_seq: u64,
    head_stream_seq: u64,
    digest: String,
    keys: Vec<BodyKeyIn>,
    #[serde(default)]
    op_ids: Vec<(String, u64)>,
    #[serde(default)]
    commands: Vec<(String, String, u64)>,
}

#[derive(Deserialize)]
struct BodyKeyIn {
    key: String,
    value: Box<serde_json::value::RawValue>,
    version: u64,
    #[serde(default)]
    doc: Option<String>,
}

#[derive(Serialize)]
struct BodyKey<'a> {
    key: &'a str,
    value: &'a Value,
    version: u64,
    /// `Automerge::save()` of a crdt key's document, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    doc: Option<String>,
}

/// The object name of a stream key's snapshot in `usync-snapshots`.
pub fn object_name(key: &crate::StreamKey) -> String {
    format!("{}.{}.{}", key.org, key.project, key.namespace)
}

/// Why a stored snapshot could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The store could not be read (retry later).
    #[error("reading the snapshot store: {0}")]
    Store(String),
    /// The blob is damaged or belongs elsewhere: never serve it; rebuild instead.
    #[error("snapshot refused: {0}")]
    Refused(String),
}

/// How long a snapshot read may go without a byte before it is given up. An
/// object replaced while it is being read has its chunks purged, and a reader
/// still on the old chunks would otherwise wait for them forever.
pub const READ_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// How many times [`fetch`] starts over on a stalled read (each time on the object
/// stored by then).
const READ_ATTEMPTS: usize = 3;

/// Reads and checks `key`'s snapshot; `Ok(None)` when there is none.
///
/// A read that stalls for [`READ_STALL`] (the object was replaced under it) starts
/// over on the current object, at most [`READ_ATTEMPTS`] times; then it is a
/// [`FetchError::Store`] and the caller retries later.
pub async fn fetch(
    store: &async_nats::jetstream::object_store::ObjectStore,
    key: &crate::StreamKey,
) -> Result<Option<Snapshot>, FetchError> {
    for _ in 0..READ_ATTEMPTS {
        match read_named(store, &object_name(key), READ_STALL).await {
            Ok(None) => return Ok(None),
            Ok(Some(bytes)) => {
                let snapshot =
                    Snapshot::decode(&bytes).map_err(|e| FetchError::Refused(e.to_string()))?;
                if snapshot.stream_key != key.to_string() {
                    return Err(FetchError::Refused(format!(
                        "it is {}'s",
                        snapshot.stream_key
                    )));
                }
                return Ok(Some(snapshot));
            }
            Err(ReadError::Stalled) => {}
            Err(ReadError::Store(e)) => return Err(FetchError::Store(e)),
        }
    }
    Err(FetchError::Store(format!(
        "the snapshot was replaced while it was read, {READ_ATTEMPTS} times"
    )))
}

/// Why [`read_object`] gave up.
#[derive(Debug)]
pub enum ReadError {
    /// No byte for the stall limit: the object was most likely replaced.
    Stalled,
    Store(String),
}

async fn read_named(
    store: &async_nats::jetstream::object_store::ObjectStore,
    name: &str,
    stall: std::time::Duration,
) -> Result<Option<Vec<u8>>, ReadError> {
    use async_nats::jetstream::object_store::GetErrorKind;
    let mut object = match tokio::time::timeout(stall, store.get(name)).await {
        Err(_) => return Err(ReadError::Stalled),
        Ok(Ok(o)) => o,
        Ok(Err(e)) if e.kind() == GetErrorKind::NotFound => return Ok(None),
        Ok(Err(e)) => return Err(ReadError::Store(e.to_string())),
    };
    read_object(&mut object, stall).await.map(Some)
}

/// The rest of `object`, giving up when no byte arrives for `stall`.
pub async fn read_object(
    object: &mut async_nats::jetstream::object_store::Object,
    stall: std::time::Duration,
) -> Result<Vec<u8>, ReadError> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(stall, object.read(&mut chunk)).await {
            Err(_) => return Err(ReadError::Stalled),
            Ok(Err(e)) => return Err(ReadError::Store(e.to_string())),
            Ok(Ok(0)) => return Ok(bytes),
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The commands of the newest ops kept (by a sequencer in memory, in a snapshot)
/// even once those ops are compacted; older ones are in `usync-commands`.
pub const RECENT_COMMANDS: u64 = 1024;

/// Object metadata entry holding the snapshot's `last_server_seq`, so writers can
/// compare without downloading the blob.
pub const META_LAST_SEQ: &str = "last_server_seq";

/// What [`put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Written,
    /// The stored snapshot was as new or newer (by its metadata), and sound when
    /// that was asked: nothing written.
    Kept {
        stored_seq: u64,
    },
}

/// Chunk size of snapshot objects (the object store's default).
const CHUNK_BYTES: usize = 128 * 1024;
/// Writers racing on one key: how often [`put`] reads the stored metadata again
/// after losing the compare-and-set.
const PUT_ATTEMPTS: usize = 8;

/// Stores an encoded snapshot of `key` at `last_seq` in `store` (whose stream `js`
/// reaches), unless the store already holds one at `last_seq` or later: snapshots
/// only move forward.
///
/// The object's metadata message is published with the stream sequence of the
/// metadata it replaces as the expected last sequence of its subject, so of two
/// writers racing, the one that read older metadata loses, reads again, and keeps
/// the newer snapshot. With `check_stored`, a stored snapshot that is as new but does
/// not decode (damaged) is replaced; otherwise metadata alone decides.
pub async fn put(
    js: &async_nats::jetstream::Context,
    store: &async_nats::jetstream::object_store::ObjectStore,
    key: &crate::StreamKey,
    last_seq: u64,
    bytes: &[u8],
    check_stored: bool,
) -> Result<Put, String> {
    use async_nats::jetstream::context::PublishErrorKind;
    use base64::engine::general_purpose::URL_SAFE;
    let name = object_name(key);
    let stream_name = format!("OBJ_{}", crate::nats::SNAPSHOTS_BUCKET);
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| format!("opening {stream_name}: {e}"))?;
    let meta_subject = format!(
        "$O.{}.M.{}",
        crate::nats::SNAPSHOTS_BUCKET,
        URL_SAFE.encode(&name)
    );
    for _ in 0..PUT_ATTEMPTS {
        let stored = stored_meta(&stream, &meta_subject).await?;
        if let Some((_, info)) = &stored
            && let Some(stored_seq) = info
                .metadata
                .get(META_LAST_SEQ)
                .and_then(|v| v.parse::<u64>().ok())
            && stored_seq >= last_seq
        {
            let damaged = check_stored
                && match fetch(store, key).await {
                    Ok(Some(_)) | Ok(None) => false,
                    Err(FetchError::Refused(_)) => true,
                    Err(FetchError::Store(e)) => return Err(e),
                };
            if !damaged {
                return Ok(Put::Kept { stored_seq });
            }
        }
        let nuid = uuid::Uuid::new_v4().simple().to_string();
        let chunk_subject = format!("$O.{}.C.{nuid}", crate::nats::SNAPSHOTS_BUCKET);
        let mut chunks = 0;
        for chunk in bytes.chunks(CHUNK_BYTES) {
            js.publish(chunk_subject.clone(), bytes::Bytes::copy_from_slice(chunk))
                .await
                .map_err(|e| format!("writing a snapshot chunk: {e}"))?
                .await
                .map_err(|e| format!("writing a snapshot chunk: {e}"))?;
            chunks += 1;
        }
        let info = async_nats::jetstream::object_store::ObjectInfo {
            name: name.clone(),
            description: Some(format!("ultrasync snapshot of {key}")),
            metadata: [(META_LAST_SEQ.to_owned(), last_seq.to_string())].into(),
            headers: None,
            options: Some(async_nats::jetstream::object_store::ObjectOptions {
                link: None,
                max_chunk_size: Some(CHUNK_BYTES),
            }),
            bucket: crate::nats::SNAPSHOTS_BUCKET.to_owned(),
            nuid,
            size: bytes.len(),
            chunks,
            modified: Some(async_nats::datetime::now()),
            digest: Some(format!(
                "SHA-256={}",
                URL_SAFE.encode(Sha256::digest(bytes))
            )),
            deleted: false,
        };
        let body = serde_json::to_vec(&info).map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let expected = stored.as_ref().map_or(0, |(seq, _)| *seq);
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let published = match js
            .publish_with_headers(meta_subject.clone(), headers, body.into())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match published {
            Ok(_) => {
                // The replaced object's chunks; a reader still on them starts over
                // (see `fetch`).
                if let Some((_, old)) = stored {
                    let _ = stream
                        .purge()
                        .filter(format!(
                            "$O.{}.C.{}",
                            crate::nats::SNAPSHOTS_BUCKET,
                            old.nuid
                        ))
                        .await;
                }
                return Ok(Put::Written);
            }
            Err(e) => {
                let _ = stream.purge().filter(chunk_subject).await;
                if e.kind() != PublishErrorKind::WrongLastSequence {
                    return Err(format!("writing snapshot metadata: {e}"));
                }
                // Another writer got there first: read what it stored and decide again.
            }
        }
    }
    Err(format!(
        "{PUT_ATTEMPTS} writers in a row stored a snapshot of {key} first"
    ))
}

/// The stored metadata message of an object: its stream sequence and info; `None`
/// when there is none or it marks a deleted object.
async fn stored_meta(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<(u64, async_nats::jetstream::object_store::ObjectInfo)>, String> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => {
            let info: async_nats::jetstream::object_store::ObjectInfo =
                serde_json::from_slice(&m.payload)
                    .map_err(|e| format!("snapshot metadata does not decode: {e}"))?;
            Ok(Some((m.sequence, info)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("reading snapshot metadata: {e}")),
    }
}

impl Snapshot {
    pub fn digest(&self) -> String {
        state::digest(&self.state)
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = Body {
            stream_key: &self.stream_key,
            last_seq: self.state.last_seq,
            head_stream_seq: self.head_stream_seq,
            digest: self.digest(),
            keys: self
                .state
                .keys
                .iter()
                .map(|(k, e)| BodyKey {
                    key: k,
                    value: &e.value,
                    version: e.version,
                    doc: e.doc.as_ref().map(|d| B64.encode(d.save())),
                })
                .collect(),
            op_ids: self.op_ids.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            commands: self
                .commands
                .iter()
                .map(|(k, (id, seq))| (k.as_str(), id.as_str(), *seq))
                .collect(),
        };
        // The JSON goes through the compressor as it is written: no copy of the
        // whole body is held uncompressed. The header's length and checksum are
        // filled in once the compressed body is complete.
        // The JSON writer's many small writes are gathered first: each write into
        // the compressor is a compression call of its own.
        let mut out = vec![0u8; HEADER_LEN];
        let written = zstd::stream::Encoder::new(&mut out, ZSTD_LEVEL).and_then(|z| {
            let mut w = std::io::BufWriter::with_capacity(ENCODE_CHUNK, z);
            serde_json::to_writer(&mut w, &body)?;
            w.into_inner()
                .map_err(std::io::IntoInnerError::into_error)?
                .finish()
                .map(|_| ())
        });
        if written.is_err() {
            // Writing into memory fails only when the compressor cannot be set up;
            // an empty body then fails the reader's checks instead of passing them.
            out.truncate(HEADER_LEN);
        }
        let compressed_len = (out.len() - HEADER_LEN) as u64;
        let digest = Sha256::digest(&out[HEADER_LEN..]);
        out[..4].copy_from_slice(MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6] = CODEC_ZSTD_JSON;
        out[7] = 0;
        out[8..16].copy_from_slice(&compressed_len.to_le_bytes());
        out[16..48].copy_from_slice(&digest);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        Self::decode_limited(bytes, MAX_BODY_BYTES)
    }

    /// [`Snapshot::decode`], refusing a body that inflates past `max_body` bytes.
    pub fn decode_limited(bytes: &[u8], max_body: usize) -> Result<Self, SnapshotError> {
        if bytes.len() < HEADER_LEN {
            return Err(SnapshotError::Truncated(format!(
                "{} bytes, header is {HEADER_LEN}",
                bytes.len()
            )));
        }
        if &bytes[..4] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        if bytes[6] != CODEC_ZSTD_JSON {
            return Err(SnapshotError::Codec(bytes[6]));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[8..16]);
        let len = u64::from_le_bytes(len) as usize;
        let body = &bytes[HEADER_LEN..];
        if body.len() != len {
            return Err(SnapshotError::Truncated(format!(
                "body is {} bytes, header says {len}",
                body.len()
            )));
        }
        if Sha256::digest(body)[..] != bytes[16..48] {
            return Err(SnapshotError::Checksum);
        }
        let json = inflate(body, max_body)?;
        let body: BodyIn =
            serde_json::from_slice(&json).map_err(|e| SnapshotError::Body(e.to_string()))?;
        drop(json);
        let mut keys = BTreeMap::new();
        for k in body.keys {
            let doc = match k.doc {
                Some(b64) => {
                    let raw = B64
                        .decode(b64)
                        .map_err(|e| SnapshotError::Body(e.to_string()))?;
                    Some(Box::new(
                        Automerge::load(&raw).map_err(|e| SnapshotError::Body(e.to_string()))?,
                    ))
                }
                None => None,
            };
            let value = match (serde_json::from_str(k.value.get()), &doc) {
                (Ok(v), _) => v,
                // Deeper than the parser goes: a document's JSON view is rebuilt from
                // the document (the digest then says whether it is the same).
                (Err(_), Some(d))
                    if crate::admission::doc_depth_within(
                        d,
                        crate::admission::MAX_VALUE_DEPTH_CEILING,
                    )
                    .is_some() =>
                {
                    state::doc_json(d)
                }
                (Err(e), _) => {
                    return Err(SnapshotError::Body(format!("key {:?}: {e}", k.key)));
                }
            };
            keys.insert(
                k.key,
                KeyEntry {
                    value,
                    version: k.version,
                    doc,
                },
            );
        }
        let snapshot = Self {
            stream_key: body.stream_key,
            head_stream_seq: body.head_stream_seq,
            state: NamespaceState {
                last_seq: body.last_seq,
                keys,
            },
            op_ids: body.op_ids.into_iter().collect(),
            commands: body
                .commands
                .into_iter()
                .map(|(k, id, seq)| (k, (id, seq)))
                .collect(),
        };
        if snapshot.digest() != body.digest {
            return Err(SnapshotError::Digest);
        }
        Ok(snapshot)
    }
}

/// zstd-inflates `body`, refusing more than `max` bytes.
fn inflate(body: &[u8], max: usize) -> Result<Vec<u8>, SnapshotError> {
    use std::io::Read as _;
    let decoder =
        zstd::stream::read::Decoder::new(body).map_err(|e| SnapshotError::Body(e.to_string()))?;
    let mut out = Vec::new();
    decoder
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| SnapshotError::Body(e.to_string()))?;
    if out.len() > max {
        return Err(SnapshotError::Body(format!(
            "the body inflates to more than {max} bytes"
        )));
    }
    Ok(out)
}

/// Fuzzing and property tests: decodes a blob with a 64 MiB body cap. Never panics.
pub fn fuzz_decode(bytes: &[u8]) -> Result<usize, SnapshotError> {
    Snapshot::decode_limited(bytes, 64 * 1024 * 1024).map(|s| s.state.keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Op, OpType};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};
    use serde_json::json;

    fn sample() -> Snapshot {
        let mut st = NamespaceState::default();
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "title", "x").expect("put");
        doc.commit();
        let change = doc.get_last_local_change().expect("change");
        let ops = [
            (OpType::Set, "a", json!({"n": 1})),
            (OpType::Patch, "a", json!({"m": 2})),
            (
                OpType::CrdtOp,
                "d",
                json!({"change": B64.encode(change.raw_bytes())}),
            ),
        ];
        for (i, (t, k, p)) in ops.into_iter().enumerate() {
            let op = Op {
                op_id: format!("id{i}"),
                org_id: "o".into(),
                project_id: "p".into(),
                namespace: "n".into(),
                actor_id: "a".into(),
                client_id: "c".into(),
                command_id: format!("c{i}"),
                server_seq: i as u64 + 1,
                hlc_ts: "1".into(),
                key: k.into(),
                op_type: t,
                payload: p,
                precondition: None,
            };
            state::apply(&mut st, &op).expect("apply");
        }
        Snapshot {
            stream_key: "o/p/n".into(),
            head_stream_seq: 42,
            state: st,
            op_ids: [("legacy0".to_owned(), 1)].into(),
            commands: [
                ("c1".to_owned(), ("id1".to_owned(), 2)),
                ("c2".to_owned(), ("id2".to_owned(), 3)),
            ]
            .into(),
        }
    }

    #[test]
    fn round_trips_with_the_same_digest() {
        let s = sample();
        let bytes = s.encode();
        let back = Snapshot::decode(&bytes).expect("decode");
        assert_eq!(back.digest(), s.digest());
        assert_eq!(back, s);
        assert_eq!(back.state.keys["d"].value, json!({"title": "x"}));
    }

    #[test]
    fn damage_is_detected() {
        let bytes = sample().encode();
        assert!(matches!(
            Snapshot::decode(&bytes[..10]),
            Err(SnapshotError::Truncated(_))
        ));
        assert!(matches!(
            Snapshot::decode(&bytes[..bytes.len() - 1]),
            Err(SnapshotError::Truncated(_))
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert_eq!(Snapshot::decode(&flipped), Err(SnapshotError::Checksum));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(Snapshot::decode(&magic), Err(SnapshotError::Magic));
        let mut version = bytes.clone();
        version[4] = 9;
        assert_eq!(Snapshot::decode(&version), Err(SnapshotError::Version(9)));
        let mut codec = bytes;
        codec[6] = 7;
        assert_eq!(Snapshot::decode(&codec), Err(SnapshotError::Codec(7)));
    }
}
