//! What a command may carry, checked before anything expensive is done with it.
//!
//! Pure functions over a [`Limits`]: the gateway calls [`check_command`] (cheap: depth,
//! size, the shape of a `crdt_op`, a bounded inflate of a compressed change) before it
//! queues a command in the shared `USYNC_CMDS`; the sequencer calls [`check_value`]
//! and [`admit_change`] again (a command may come from any gateway version) and
//! [`check_doc`] on the document a change produces. Every refusal is a code of SPEC §4
//! and a reason for the client.
//!
//! Automerge's own `Change::from_bytes` inflates a compressed change chunk (type 2,
//! raw deflate of the change body) with no bound: a 150 KB chunk can inflate to
//! 150 MiB. [`admit_change`] parses the chunk header itself and inflates with a hard
//! cap *before* automerge sees the bytes, so a bomb costs at most `max_change_inflated_bytes`.

use std::io::Read as _;

use automerge::{Automerge, Change, ObjType, ROOT, ReadDoc, ValueRef};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::ErrorCode;
use crate::op::OpType;
use crate::protocol::CommandFrame;

/// A refusal: the code of SPEC §4 and a reason for the client.
pub type Refused = (ErrorCode, String);

/// Default deepest JSON value (containers: `1` is 0 deep, `[]` 1, `{"a": []}` 2).
///
/// Every reader of the JSON we produce parses with serde_json's recursion limit of
/// 128, and values travel inside envelopes: the snapshot blob (`{"keys": [{"value":
/// …}]}`, 3 levels), a snapshot frame (`{"state": {key: {"value": …}}}`, 3), an
/// HTTP ops page or an ops frame (`{"ops": [{"payload": …}]}`, 3), an ack (`{"op":
/// {"payload": …}}`, 2). 64 plus the deepest envelope stays far below 128, with room
/// for an envelope or two more; [`MAX_VALUE_DEPTH_CEILING`] is the most a
/// configuration may allow.
pub const DEFAULT_MAX_VALUE_DEPTH: usize = 64;
/// The most `limits.max_value_depth` may be set to (see [`DEFAULT_MAX_VALUE_DEPTH`]).
pub const MAX_VALUE_DEPTH_CEILING: usize = 100;

/// Automerge's chunk magic.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;

/// The bounds a command is admitted under. One set per namespace: `max_value_bytes`
/// is the namespace's (SPEC §3), the rest come from the `[limits]` config section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Deepest JSON value (payloads and the values ops produce).
    pub max_value_depth: usize,
    /// Largest value (encoded JSON bytes), the namespace's `max_value_bytes`.
    pub max_value_bytes: usize,
    /// Largest Automerge change as sent (compressed or not), decoded from base64.
    pub max_change_bytes: usize,
    /// Largest Automerge change body after inflating a compressed chunk.
    pub max_change_inflated_bytes: usize,
    /// Most operations in one Automerge change.
    pub max_change_ops: usize,
    /// Largest Automerge document per key (its uncompressed saved form, history
    /// included).
    pub max_doc_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value_depth: DEFAULT_MAX_VALUE_DEPTH,
            max_value_bytes: crate::namespaces::DEFAULT_MAX_VALUE_BYTES,
            max_change_bytes: 256 * 1024,
            max_change_inflated_bytes: 4 * 1024 * 1024,
            max_change_ops: 100_000,
            max_doc_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// The most any configuration may allow. Applying an op that is already in the
    /// log (materializer, a sequencer replaying) uses these: whatever was admitted
    /// under a configuration still applies, and nothing can make a replay inflate
    /// without bound.
    pub fn ceiling() -> Self {
        Self {
            max_value_depth: MAX_VALUE_DEPTH_CEILING,
            max_value_bytes: 64 * 1024 * 1024,
            max_change_bytes: 64 * 1024 * 1024,
            max_change_inflated_bytes: 256 * 1024 * 1024,
            max_change_ops: 10_000_000,
            max_doc_bytes: 1024 * 1024 * 1024,
        }
    }

    /// The limits of a namespace: `config` with the namespace's `max_value_bytes`.
    pub fn for_namespace(config: &LimitsConfig, spec: &crate::namespaces::NamespaceSpec) -> Self {
        config.limits(spec.max_value_bytes)
    }

    /// Whether every bound is positive and within [`Limits::ceiling`].
    pub fn validate(&self) -> Result<(), String> {
        let c = Self::ceiling();
        for (name, v, max) in [
            ("max_value_depth", self.max_value_depth, c.max_value_depth),
            ("max_value_bytes", self.max_value_bytes, c.max_value_bytes),
            (
                "max_change_bytes",
                self.max_change_bytes,
                c.max_change_bytes,
            ),
            (
                "max_change_inflated_bytes",
                self.max_change_inflated_bytes,
                c.max_change_inflated_bytes,
            ),
            ("max_change_ops", self.max_change_ops, c.max_change_ops),
            ("max_doc_bytes", self.max_doc_bytes, c.max_doc_bytes),
        ] {
            if v == 0 || v > max {
                return Err(format!("limits.{name} must be 1-{max}, got {v}"));
            }
        }
        Ok(())
    }
}

/// The `[limits]` section of `ultrasync.toml`: what one command may carry, in every
/// namespace (the value size is per namespace, `max_value_bytes` of SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Deepest JSON value (1-100); see [`DEFAULT_MAX_VALUE_DEPTH`].
    pub max_value_depth: usize,
    /// Largest Automerge change as sent (bytes, after base64).
    pub max_change_bytes: usize,
    /// Largest Automerge change after inflating a compressed chunk (bytes).
    pub max_change_inflated_bytes: usize,
    /// Most operations in one Automerge change.
    pub max_change_ops: usize,
    /// Largest Automerge document per key (uncompressed saved bytes, history
    /// included); a change that would grow it further is refused.
    pub max_doc_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = Limits::default();
        Self {
            max_value_depth: d.max_value_depth,
            max_change_bytes: d.max_change_bytes,
            max_change_inflated_bytes: d.max_change_inflated_bytes,
            max_change_ops: d.max_change_ops,
            max_doc_bytes: d.max_doc_bytes,
        }
    }
}

impl LimitsConfig {
    /// The limits with a namespace's `max_value_bytes`.
    pub fn limits(&self, max_value_bytes: usize) -> Limits {
        Limits {
            max_value_depth: self.max_value_depth,
            max_value_bytes,
            max_change_bytes: self.max_change_bytes,
            max_change_inflated_bytes: self.max_change_inflated_bytes,
            max_change_ops: self.max_change_ops,
            max_doc_bytes: self.max_doc_bytes,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.limits(crate::namespaces::DEFAULT_MAX_VALUE_BYTES)
            .validate()
    }
}

/// How deeply `value` nests (containers), without recursion: `1` is 0, `[]` 1.
pub fn value_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        match v {
            Value::Array(items) => {
                deepest = deepest.max(depth + 1);
                stack.extend(items.iter().map(|i| (i, depth + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(depth + 1);
                stack.extend(map.values().map(|i| (i, depth + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// Whether `value` nests deeper than `max`, stopping at the first container past it.
fn deeper_than(value: &Value, max: usize) -> bool {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        if depth + 1 > max {
            return true;
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    false
}

/// Counts bytes written, so a value's encoded size is known without building it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The encoded JSON size of `value` (call after the depth check: encoding recurses).
pub fn encoded_len(value: &Value) -> usize {
    let mut c = Counter(0);
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

/// A value's depth and size: `payload_too_large` when it nests deeper than
/// `max_value_depth` or encodes to more than `max_value_bytes`.
pub fn check_value(value: &Value, limits: &Limits) -> Result<(), Refused> {
    if deeper_than(value, limits.max_value_depth) {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "the value nests deeper than {} levels",
                limits.max_value_depth
            ),
        ));
    }
    let size = encoded_len(value);
    if size > limits.max_value_bytes {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "the value is {size} bytes; at most {} allowed",
                limits.max_value_bytes
            ),
        ));
    }
    Ok(())
}

/// The checks a gateway makes before it queues a command (the namespace's mode and
/// everything that needs the key's state are the sequencer's): the payload's depth
/// and size (a `del`'s payload too: it is stored in the op), and for `crdt_op` the
/// shape of the payload and the change's sizes (a compressed change is inflated,
/// bounded, and dropped). Cheap: no Automerge decode.
pub fn check_command(op_type: OpType, payload: &Value, limits: &Limits) -> Result<(), Refused> {
    check_value(payload, limits)?;
    if op_type == OpType::CrdtOp {
        let bytes = change_bytes(payload, limits)?;
        inflate_change(&bytes, limits)?;
    }
    Ok(())
}

/// [`check_command`] over a client's command frame.
pub fn check_frame(frame: &CommandFrame, limits: &Limits) -> Result<(), Refused> {
    check_command(frame.op_type, &frame.payload, limits)
}

/// The change bytes of a `crdt_op` payload `{"change": "<base64>"}`, size-checked
/// before they are decoded.
pub fn change_bytes(payload: &Value, limits: &Limits) -> Result<Vec<u8>, Refused> {
    let b64 = payload
        .get("change")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            (
                ErrorCode::InvalidOp,
                "crdt_op payload must be {\"change\": \"<base64>\"}".to_owned(),
            )
        })?;
    // base64 is 4 characters per 3 bytes: refuse before decoding.
    if b64.len() / 4 * 3 > limits.max_change_bytes + 3 {
        return Err(too_big_change(b64.len() / 4 * 3, limits));
    }
    let bytes = B64
        .decode(b64)
        .map_err(|e| (ErrorCode::InvalidOp, format!("change is not base64: {e}")))?;
    if bytes.len() > limits.max_change_bytes {
        return Err(too_big_change(bytes.len(), limits));
    }
    Ok(bytes)
}

fn too_big_change(len: usize, limits: &Limits) -> Refused {
    (
        ErrorCode::PayloadTooLarge,
        format!(
            "the change is {len} bytes; at most {} allowed",
            limits.max_change_bytes
        ),
    )
}

/// A chunk header: checksum, type, and where the data is.
struct Header {
    checksum: [u8; 4],
    chunk_type: u8,
    data: std::ops::Range<usize>,
}

fn invalid(reason: impl Into<String>) -> Refused {
    (ErrorCode::InvalidOp, reason.into())
}

/// Parses `magic | checksum (4) | type (1) | uleb128 length | data`; the data must
/// end the input.
fn parse_header(bytes: &[u8]) -> Result<Header, Refused> {
    if bytes.len() < 10 || bytes[..4] != MAGIC {
        return Err(invalid("not an Automerge change"));
    }
    let mut checksum = [0u8; 4];
    checksum.copy_from_slice(&bytes[4..8]);
    let chunk_type = bytes[8];
    let mut len: u64 = 0;
    let mut at = 9;
    let mut shift = 0;
    loop {
        let Some(&b) = bytes.get(at) else {
            return Err(invalid("Automerge change header truncated"));
        };
        at += 1;
        if shift > 56 {
            return Err(invalid("Automerge change length out of range"));
        }
        len |= u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| at.checked_add(l))
        .ok_or_else(|| invalid("Automerge change length out of range"))?;
    if end != bytes.len() {
        return Err(invalid(format!(
            "Automerge change length says {len} bytes, {} follow",
            bytes.len() - at
        )));
    }
    Ok(Header {
        checksum,
        chunk_type,
        data: at..end,
    })
}

fn uleb128(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The change as an uncompressed change chunk (type 1): a compressed chunk (type 2)
/// is inflated with a hard cap, never past `max_change_inflated_bytes` (a chunk that
/// would inflate further is refused `payload_too_large` without allocating more).
/// The checksum is checked against the uncompressed body either way.
pub fn inflate_change(bytes: &[u8], limits: &Limits) -> Result<Vec<u8>, Refused> {
    if bytes.len() > limits.max_change_bytes {
        return Err(too_big_change(bytes.len(), limits));
    }
    let header = parse_header(bytes)?;
    let data = &bytes[header.data.clone()];
    let (body, chunk) = match header.chunk_type {
        CHUNK_CHANGE => (data, None),
        CHUNK_COMPRESSED => {
            let cap = limits.max_change_inflated_bytes;
            let mut inflated = Vec::with_capacity(cap.min(data.len().saturating_mul(4)));
            flate2::read::DeflateDecoder::new(data)
                .take(cap as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|_| invalid("the compressed change does not inflate"))?;
            if inflated.len() > cap {
                return Err((
                    ErrorCode::PayloadTooLarge,
                    format!("the change inflates to more than {cap} bytes"),
                ));
            }
            (&[][..], Some(inflated))
        }
        CHUNK_DOCUMENT => return Err(invalid("a whole Automerge document, not a change")),
        other => {
            return Err(invalid(format!(
                "Automerge chunk type {other} is not a change"
            )));
        }
    };
    let body = chunk.as_deref().unwrap_or(body);
    // The checksum is the first 4 bytes of SHA-256 over (type 1, length, body).
    let mut prefix = vec![CHUNK_CHANGE];
    uleb128(body.len() as u64, &mut prefix);
    let hash = Sha256::new()
        .chain_update(&prefix)
        .chain_update(body)
        .finalize();
    if hash[..4] != header.checksum {
        return Err(invalid("Automerge change checksum mismatch"));
    }
    let mut out = Vec::with_capacity(4 + 4 + prefix.len() + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&header.checksum);
    out.extend_from_slice(&prefix);
    out.extend_from_slice(body);
    Ok(out)
}

/// Admits one Automerge change: its size as sent, its size inflated (bounded, before
/// automerge sees it), its operation count; then decodes it. CPU and memory are
/// bounded by the limits; still, call it off the async runtime (`spawn_blocking`).
pub fn admit_change(bytes: &[u8], limits: &Limits) -> Result<Change, Refused> {
    let chunk = inflate_change(bytes, limits)?;
    let change =
        Change::from_bytes(chunk).map_err(|e| invalid(format!("not an Automerge change: {e}")))?;
    if change.len() > limits.max_change_ops {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "the change has {} operations; at most {} allowed",
                change.len(),
                limits.max_change_ops
            ),
        ));
    }
    Ok(change)
}

/// [`admit_change`] over a `crdt_op` payload `{"change": "<base64>"}`.
pub fn admit_change_payload(payload: &Value, limits: &Limits) -> Result<Change, Refused> {
    let bytes = change_bytes(payload, limits)?;
    admit_change(&bytes, limits)
}

/// How deeply the document's objects nest (the root map is 1, as `{}` is in JSON),
/// walked without recursion and stopping once past `max`: `Some(depth)` within
/// `max`, `None` deeper.
pub fn doc_depth_within(doc: &Automerge, max: usize) -> Option<usize> {
    let mut deepest = 1;
    let mut stack = vec![(ROOT, 1usize)];
    while let Some((obj, depth)) = stack.pop() {
        if depth > max {
            return None;
        }
        deepest = deepest.max(depth);
        let children: Vec<automerge::ObjId> = match doc.object_type(&obj) {
            Ok(ObjType::Map | ObjType::Table) => doc
                .map_range(&obj, ..)
                .filter(|i| matches!(i.value, ValueRef::Object(_)))
                .map(|i| i.id())
                .collect(),
            Ok(ObjType::List) => doc
                .list_range(&obj, ..)
                .filter(|i| matches!(i.value, ValueRef::Object(_)))
                .map(|i| i.id())
                .collect(),
            _ => Vec::new(),
        };
        stack.extend(children.into_iter().map(|c| (c, depth + 1)));
    }
    Some(deepest)
}

/// A document after a change: not nested deeper than `max_value_depth` (its JSON
/// view would be), and not larger than `max_doc_bytes` saved (history included).
pub fn check_doc(doc: &Automerge, limits: &Limits) -> Result<(), Refused> {
    if doc_depth_within(doc, limits.max_value_depth).is_none() {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "the document would nest deeper than {} levels",
                limits.max_value_depth
            ),
        ));
    }
    let size = doc.save_nocompress().len();
    if size > limits.max_doc_bytes {
        return Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "the document would be {size} bytes; at most {} allowed per key",
                limits.max_doc_bytes
            ),
        ));
    }
    Ok(())
}

/// Fuzzing and property tests: decodes one client frame and, for a command, runs the
/// gateway's checks under the default limits. Never panics; the answer is the code.
pub fn fuzz_command_frame(text: &str) -> Result<(), ErrorCode> {
    match crate::protocol::ClientMessage::decode(text) {
        Ok(crate::protocol::ClientMessage::Command(frame)) => {
            check_frame(&frame, &Limits::default()).map_err(|(code, _)| code)
        }
        Ok(_) => Ok(()),
        Err(_) => Err(ErrorCode::InvalidMessage),
    }
}

/// Fuzzing and property tests: admits change bytes under the default limits.
pub fn fuzz_change(bytes: &[u8]) -> Result<usize, ErrorCode> {
    admit_change(bytes, &Limits::default())
        .map(|c| c.len())
        .map_err(|(code, _)| code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::AutoCommit;
    use automerge::transaction::Transactable;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        v
    }

    #[test]
    fn depth_is_counted_in_containers() {
        assert_eq!(value_depth(&json!(1)), 0);
        assert_eq!(value_depth(&json!([])), 1);
        assert_eq!(value_depth(&json!({"a": [1, {"b": 2}]})), 3);
        assert_eq!(value_depth(&nested(126)), 126);
        let limits = Limits::default();
        assert!(check_value(&nested(64), &limits).is_ok());
        assert_eq!(
            check_value(&nested(65), &limits).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        assert_eq!(
            check_command(OpType::Set, &nested(126), &limits).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        assert!(check_command(OpType::Del, &json!(null), &limits).is_ok());
        assert_eq!(
            check_command(OpType::Del, &nested(126), &limits).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        let big = json!("x".repeat(limits.max_value_bytes));
        assert_eq!(
            check_value(&big, &limits).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
    }

    fn one_change(doc: &mut AutoCommit) -> Vec<u8> {
        doc.commit();
        doc.get_last_local_change()
            .expect("change")
            .raw_bytes()
            .to_vec()
    }

    #[test]
    fn plain_and_compressed_changes_are_admitted() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "title", "x").expect("put");
        let raw = one_change(&mut doc);
        let c = admit_change(&raw, &Limits::default()).expect("admitted");
        assert_eq!(c.len(), 1);
        // A change worth compressing: automerge's own compressed form is admitted and
        // decodes to the same change.
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "text", "abc".repeat(10_000)).expect("put");
        doc.commit();
        let mut change = doc.get_last_local_change().expect("change").clone();
        let compressed = change.bytes().to_vec();
        assert_eq!(compressed[8], CHUNK_COMPRESSED, "automerge compressed it");
        let back = admit_change(&compressed, &Limits::default()).expect("admitted");
        assert_eq!(back.hash(), change.hash());
    }

    #[test]
    fn bombs_and_junk_are_refused() {
        let limits = Limits::default();
        let bomb = crate::admission::test_support::compressed_bomb(8 * 1024 * 1024);
        assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
        assert_eq!(
            admit_change(&bomb, &limits)
                .map(|c| c.len())
                .map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        assert_eq!(
            check_command(
                OpType::CrdtOp,
                &json!({"change": B64.encode(&bomb)}),
                &limits
            )
            .map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        for junk in [
            &b""[..],
            b"\x85\x6f\x4a\x83",
            b"nope nope nope",
            &[0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2, 0xff, 0xff, 0xff],
        ] {
            assert_eq!(
                admit_change(junk, &limits)
                    .map(|c| c.len())
                    .map_err(|e| e.0),
                Err(ErrorCode::InvalidOp)
            );
        }
        // More operations than allowed.
        let mut doc = AutoCommit::new();
        for i in 0..20 {
            doc.put(ROOT, format!("k{i}"), i).expect("put");
        }
        let raw = one_change(&mut doc);
        let few = Limits {
            max_change_ops: 10,
            ..limits
        };
        assert_eq!(
            admit_change(&raw, &few).map(|c| c.len()).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        // A damaged checksum.
        let mut bad = raw.clone();
        bad[5] ^= 1;
        assert_eq!(
            admit_change(&bad, &limits)
                .map(|c| c.len())
                .map_err(|e| e.0),
            Err(ErrorCode::InvalidOp)
        );
    }

    #[test]
    fn limits_come_from_the_config_file() {
        let cfg =
            crate::config::Config::from_toml("[limits]\nmax_value_depth = 32\n").expect("config");
        assert_eq!(cfg.limits.max_value_depth, 32);
        assert_eq!(
            cfg.limits.max_change_inflated_bytes,
            Limits::default().max_change_inflated_bytes
        );
        assert!(crate::config::Config::from_toml("[limits]\nmax_value_depth = 101\n").is_err());
        assert!(crate::config::Config::from_toml("[limits]\nmax_change_ops = 0\n").is_err());
        assert!(crate::config::Config::from_toml("[limits]\nnope = 1\n").is_err());
    }

    #[test]
    fn deep_documents_are_refused() {
        let mut doc = AutoCommit::new();
        let mut obj = ROOT;
        for _ in 0..70 {
            obj = doc.put_object(&obj, "a", ObjType::Map).expect("map");
        }
        doc.commit();
        assert_eq!(doc_depth_within(doc.document(), 100), Some(71));
        assert_eq!(doc_depth_within(doc.document(), 70), None);
        assert_eq!(
            check_doc(doc.document(), &Limits::default()).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
        let small = Limits {
            max_doc_bytes: 10,
            max_value_depth: 100,
            ..Limits::default()
        };
        assert_eq!(
            check_doc(doc.document(), &small).map_err(|e| e.0),
            Err(ErrorCode::PayloadTooLarge)
        );
    }
}

/// Inputs for tests (here, in the sequencer and end to end): hostile changes built
/// byte by byte.
pub mod test_support {
    use std::io::Write as _;

    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    /// A compressed change chunk (type 2) whose body inflates to `inflated` zero
    /// bytes: about `inflated / 1000` bytes on the wire (deflate packs a run ~1000:1).
    /// Built in pieces, so making a 150 MiB bomb does not take 150 MiB. Automerge's
    /// `Change::from_bytes` inflates it whole before it finds the body is no change.
    pub fn compressed_bomb(inflated: usize) -> Vec<u8> {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 64 * 1024];
        let mut left = inflated;
        while left > 0 {
            let n = left.min(zeros.len());
            let _ = enc.write_all(&zeros[..n]);
            left -= n;
        }
        let deflated = enc.finish().unwrap_or_default();
        let mut out = Vec::with_capacity(deflated.len() + 16);
        out.extend_from_slice(&super::MAGIC);
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.push(super::CHUNK_COMPRESSED);
        super::uleb128(deflated.len() as u64, &mut out);
        out.extend_from_slice(&deflated);
        out
    }

    /// A real change putting a string of `len` bytes, compressed as automerge does
    /// (within the limits when `len` is).
    pub fn compressed_change(len: usize) -> Vec<u8> {
        let mut doc = AutoCommit::new();
        let _ = doc.put(ROOT, "text", "ab".repeat(len / 2));
        doc.commit();
        let raw = doc
            .get_last_local_change()
            .map(|c| c.raw_bytes().to_vec())
            .unwrap_or_default();
        compress_chunk(&raw)
    }

    /// Re-encodes an uncompressed change chunk as a compressed one (type 2: raw
    /// deflate of the body, the checksum of the uncompressed chunk), as automerge 0.10
    /// writes them.
    pub fn compress_chunk(raw: &[u8]) -> Vec<u8> {
        let Ok(header) = super::parse_header(raw) else {
            return Vec::new();
        };
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let _ = enc.write_all(&raw[header.data]);
        let deflated = enc.finish().unwrap_or_default();
        let mut out = Vec::with_capacity(deflated.len() + 16);
        out.extend_from_slice(&super::MAGIC);
        out.extend_from_slice(&header.checksum);
        out.push(super::CHUNK_COMPRESSED);
        super::uleb128(deflated.len() as u64, &mut out);
        out.extend_from_slice(&deflated);
        out
    }
}
