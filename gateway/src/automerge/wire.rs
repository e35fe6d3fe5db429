//! The wire format of `@automerge/automerge-repo-network-websocket` 2.x: one CBOR
//! map per binary frame, tagged by `type` (`join`, `peer`, `error`, `request`,
//! `sync`, `doc-unavailable`, `ephemeral`, and the remote-heads messages, which this
//! server ignores). Field names as in the package's `messages.ts` and
//! automerge-repo's `network/messages.ts`.
//!
//! Decoding is bounded: the frame size is the socket's limit, nesting is capped,
//! fields this server does not read are skipped without being built, byte strings
//! are the only allocation that follows a declared length (and it cannot pass the
//! frame). Automerge sync messages are checked by [`check_sync_message`] before the
//! automerge crate decodes them.

use serde::de;
use serde::{Deserialize, Serialize};

/// The only protocol version of the package (`ProtocolV1`).
pub const PROTOCOL_V1: &str = "1";
/// Deepest CBOR nesting accepted (the messages are two levels deep).
const RECURSION: usize = 16;
/// Protocol versions one `join` may list.
const MAX_VERSIONS: usize = 16;
/// Longest peer, session or document id.
pub const MAX_ID: usize = 512;

/// Change hashes one sync message may list in `heads` or `need`.
const MAX_HASHES: u64 = 1024;
/// `have` entries one sync message may carry (automerge sends at most one).
const MAX_HAVES: u64 = 1;
/// Bloom filter parameters: automerge uses 10 bits per entry and 7 probes; a
/// hostile filter with millions of probes would cost that much per change hash.
const MAX_BLOOM_BITS_PER_ENTRY: u64 = 32;
const MAX_BLOOM_PROBES: u64 = 32;
/// Changes one sync message may carry.
const MAX_CHANGES: u64 = 4096;

/// A frame from a peer: the fields this server reads.
#[derive(Debug, Default, Deserialize)]
pub struct Inbound {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(rename = "senderId", default)]
    pub sender_id: Option<String>,
    #[serde(rename = "targetId", default)]
    pub target_id: Option<String>,
    #[serde(rename = "documentId", default)]
    pub document_id: Option<String>,
    #[serde(default)]
    pub data: Option<ByteBuf>,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(rename = "sessionId", default)]
    pub session_id: Option<String>,
    #[serde(rename = "supportedProtocolVersions", default)]
    pub supported_protocol_versions: Option<Vec<String>>,
    // Everything else (`peerMetadata`, remote-heads fields) is skipped unread.
}

/// A CBOR byte string (never an array of numbers).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ByteBuf(pub Vec<u8>);

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Why a frame was not understood.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

/// Decodes one frame.
pub fn decode(frame: &[u8]) -> Result<Inbound, WireError> {
    let msg: Inbound = ciborium::de::from_reader_with_recursion_limit(frame, RECURSION)
        .map_err(|e| WireError(format!("not a CBOR message of this protocol: {e}")))?;
    for id in [
        &msg.sender_id,
        &msg.target_id,
        &msg.document_id,
        &msg.session_id,
    ]
    .into_iter()
    .flatten()
    {
        if id.len() > MAX_ID {
            return Err(WireError(format!("an id is longer than {MAX_ID} bytes")));
        }
    }
    if msg
        .supported_protocol_versions
        .as_ref()
        .is_some_and(|v| v.len() > MAX_VERSIONS)
    {
        return Err(WireError("too many protocol versions".into()));
    }
    Ok(msg)
}

/// Bytes CBOR encodes as a byte string (automerge-repo reads a `Uint8Array`).
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

#[derive(Serialize)]
struct PeerMetadata<'a> {
    #[serde(rename = "storageId")]
    storage_id: &'a str,
    #[serde(rename = "isEphemeral")]
    is_ephemeral: bool,
}

#[derive(Serialize)]
struct Outbound<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "senderId")]
    sender_id: &'a str,
    #[serde(rename = "targetId")]
    target_id: &'a str,
    #[serde(rename = "documentId", skip_serializing_if = "Option::is_none")]
    document_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Bytes<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(rename = "peerMetadata", skip_serializing_if = "Option::is_none")]
    peer_metadata: Option<PeerMetadata<'a>>,
    #[serde(
        rename = "selectedProtocolVersion",
        skip_serializing_if = "Option::is_none"
    )]
    selected_protocol_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(rename = "sessionId", skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
}

impl<'a> Outbound<'a> {
    fn new(kind: &'a str, sender_id: &'a str, target_id: &'a str) -> Self {
        Self {
            kind,
            sender_id,
            target_id,
            document_id: None,
            data: None,
            message: None,
            peer_metadata: None,
            selected_protocol_version: None,
            count: None,
            session_id: None,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.data.as_ref().map_or(0, |d| d.0.len()));
        // Writing into a Vec cannot fail.
        let _ = ciborium::ser::into_writer(self, &mut out);
        out
    }
}

/// `peer`: the answer to `join`.
pub fn peer(server: &str, target: &str, storage_id: &str) -> Vec<u8> {
    let mut m = Outbound::new("peer", server, target);
    m.peer_metadata = Some(PeerMetadata {
        storage_id,
        is_ephemeral: false,
    });
    m.selected_protocol_version = Some(PROTOCOL_V1);
    m.encode()
}

/// `error`, with a message for people.
pub fn error(server: &str, target: &str, message: &str) -> Vec<u8> {
    let mut m = Outbound::new("error", server, target);
    m.message = Some(message);
    m.encode()
}

/// `sync` with an Automerge sync message.
pub fn sync(server: &str, target: &str, document_id: &str, data: &[u8]) -> Vec<u8> {
    let mut m = Outbound::new("sync", server, target);
    m.document_id = Some(document_id);
    m.data = Some(Bytes(data));
    m.encode()
}

/// `doc-unavailable`.
pub fn doc_unavailable(server: &str, target: &str, document_id: &str) -> Vec<u8> {
    let mut m = Outbound::new("doc-unavailable", server, target);
    m.document_id = Some(document_id);
    m.encode()
}

/// `ephemeral`, relayed with its original sender, session and count.
pub fn ephemeral(e: &crate::docs::Ephemeral, target: &str) -> Vec<u8> {
    let mut m = Outbound::new("ephemeral", &e.sender_id, target);
    m.document_id = Some(&e.document_id);
    m.data = Some(Bytes(&e.data));
    m.count = Some(e.count);
    m.session_id = Some(&e.session_id);
    m.encode()
}

/// A reader over an Automerge sync message's bytes.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, WireError> {
        let (&b, rest) = self
            .0
            .split_first()
            .ok_or_else(|| WireError("sync message truncated".into()))?;
        self.0 = rest;
        Ok(b)
    }

    fn uleb(&mut self) -> Result<u64, WireError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError("sync message: LEB128 out of range".into()))
    }

    fn skip(&mut self, n: u64) -> Result<(), WireError> {
        let n = usize::try_from(n).map_err(|_| WireError("sync message truncated".into()))?;
        if n > self.0.len() {
            return Err(WireError("sync message truncated".into()));
        }
        self.0 = &self.0[n..];
        Ok(())
    }

    fn hashes(&mut self, what: &str) -> Result<(), WireError> {
        let n = self.uleb()?;
        if n > MAX_HASHES {
            return Err(WireError(format!(
                "sync message lists {n} {what}; at most {MAX_HASHES}"
            )));
        }
        self.skip(n * 32)
    }
}

/// Checks the parts of an Automerge sync message that the automerge crate trusts
/// (counts, bloom filter parameters) before it is decoded: a hostile message could
/// otherwise make the server compute a bloom filter with billions of probes or
/// compare every change against thousands of filters.
pub fn check_sync_message(bytes: &[u8]) -> Result<(), WireError> {
    let mut r = Reader(bytes);
    match r.byte()? {
        0x42 | 0x43 => {}
        other => {
            return Err(WireError(format!(
                "not an Automerge sync message (type byte {other:#x})"
            )));
        }
    }
    r.hashes("heads")?;
    r.hashes("needed changes")?;
    let haves = r.uleb()?;
    if haves > MAX_HAVES {
        return Err(WireError(format!(
            "sync message carries {haves} bloom filters; at most {MAX_HAVES}"
        )));
    }
    for _ in 0..haves {
        r.hashes("last-sync heads")?;
        let len = r.uleb()?;
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        if len_usize > r.0.len() {
            return Err(WireError("sync message truncated".into()));
        }
        let mut bloom = Reader(&r.0[..len_usize]);
        if len > 0 {
            let _entries = bloom.uleb()?;
            let bits = bloom.uleb()?;
            let probes = bloom.uleb()?;
            if bits > MAX_BLOOM_BITS_PER_ENTRY || probes > MAX_BLOOM_PROBES {
                return Err(WireError(format!(
                    "bloom filter with {bits} bits per entry and {probes} probes; at most {MAX_BLOOM_BITS_PER_ENTRY} and {MAX_BLOOM_PROBES}"
                )));
            }
        }
        r.skip(len)?;
    }
    let changes = r.uleb()?;
    if changes > MAX_CHANGES {
        return Err(WireError(format!(
            "sync message carries {changes} changes; at most {MAX_CHANGES}"
        )));
    }
    for _ in 0..changes {
        let len = r.uleb()?;
        r.skip(len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;

    #[test]
    fn frames_round_trip_and_unknown_fields_are_skipped() {
        let frame = peer("server", "client", "store-1");
        let back = decode(&frame).expect("decode");
        assert_eq!(back.kind, "peer");
        assert_eq!(back.sender_id.as_deref(), Some("server"));
        assert_eq!(back.target_id.as_deref(), Some("client"));
        let s = sync("server", "client", "doc", &[0x42, 0, 0, 0, 0]);
        let back = decode(&s).expect("decode");
        assert_eq!(back.data, Some(ByteBuf(vec![0x42, 0, 0, 0, 0])));
        assert_eq!(back.document_id.as_deref(), Some("doc"));
    }

    #[test]
    fn deep_or_odd_frames_are_refused() {
        // 100 nested arrays in an unknown field.
        let mut deep = vec![
            0xa2, 0x64, b't', b'y', b'p', b'e', 0x64, b'j', b'o', b'i', b'n',
        ];
        deep.extend([0x61, b'x']);
        deep.extend(std::iter::repeat_n(0x81, 100));
        deep.push(0x00);
        assert!(decode(&deep).is_err());
        // `data` as an array of numbers is not a byte string.
        let mut arr = vec![
            0xa2, 0x64, b't', b'y', b'p', b'e', 0x64, b's', b'y', b'n', b'c',
        ];
        arr.extend([0x64, b'd', b'a', b't', b'a', 0x82, 0x01, 0x02]);
        assert!(decode(&arr).is_err());
        assert!(decode(&[0xff, 0x00]).is_err());
    }

    #[test]
    fn real_sync_messages_pass_the_check_and_hostile_ones_do_not() {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "k", "v").expect("put");
        let mut st = automerge::sync::State::new();
        let msg = doc
            .sync()
            .generate_sync_message(&mut st)
            .expect("a message");
        check_sync_message(&msg.encode()).expect("real message");
        // A bloom filter claiming a billion probes.
        let mut bad = vec![0x42, 0, 0, 1, 0];
        let bloom = [1u8, 10, 0x80, 0x94, 0xeb, 0xdc, 0x03, 0xff, 0xff];
        bad.push(bloom.len() as u8);
        bad.extend(bloom);
        bad.push(0);
        assert!(check_sync_message(&bad).is_err());
        // A million heads.
        assert!(check_sync_message(&[0x42, 0x80, 0x89, 0x7a]).is_err());
        assert!(check_sync_message(&[0x99]).is_err());
    }
}
