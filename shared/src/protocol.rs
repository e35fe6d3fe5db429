//! WebSocket protocol v1 (SPEC §4): JSON text frames, each an object tagged by
//! `"type"`. These types own all (de)serialization of frames; an unknown or malformed
//! frame decodes to an error that the gateway answers with `invalid_message`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;
use crate::op::{Op, OpType, Precondition};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// A command as the client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandFrame {
    pub command_id: String,
    pub namespace: String,
    pub key: String,
    pub op_type: OpType,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precondition: Option<Precondition>,
    /// The cursor of `namespace` the client made this edit on. Below the stream
    /// key's compaction floor (the client's state predates a purge it never saw) the
    /// command is rejected `stale_base`, nothing written, so the client resyncs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_seq: Option<u64>,
}

/// Client → server frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Hello {
        protocol: u32,
        org_id: String,
        project_id: String,
        client_id: String,
        /// `{namespace: last_server_seq | null}`; null asks for a snapshot.
        #[serde(default)]
        cursors: BTreeMap<String, Option<u64>>,
        /// `{namespace: checkpoint}`: continue an interrupted snapshot of a namespace
        /// whose cursor is null from the last `snapshot` frame's `checkpoint`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        checkpoints: BTreeMap<String, String>,
    },
    Subscribe {
        namespace: String,
        #[serde(default)]
        last_server_seq: Option<u64>,
        /// With a null `last_server_seq`: continue an interrupted snapshot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<String>,
    },
    Unsubscribe {
        namespace: String,
    },
    Command(CommandFrame),
    Cursor {
        namespace: String,
        server_seq: u64,
    },
    Presence {
        key: String,
        #[serde(default)]
        payload: Value,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<Value>,
    },
}

impl ClientMessage {
    /// Decodes one text frame.
    ///
    /// A `command` (nearly every frame under load) is read straight into its struct:
    /// serde's tagged enum first buffers the whole object in an intermediate tree,
    /// which cost the gateway as much as the rest of decoding. Anything the direct
    /// read does not take (another type, a malformed command) goes the general way,
    /// so errors and every other frame decode as before. At worst a frame is read
    /// twice (a non-command whose `type` comes last), within the socket's frame size
    /// and rate limits.
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        match serde_json::from_str::<wire::Command>(text) {
            Ok(c) => Ok(Self::Command(c.into())),
            Err(_) => serde_json::from_str(text),
        }
    }
}

impl ServerMessage {
    /// Decodes one text frame, reading `ack` and `ops` (the frames a writing or
    /// following client gets most) straight into their fields, like
    /// [`ClientMessage::decode`].
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        // The server writes `type` first, so a frame of another type stops each
        // direct read at its first field.
        if let Ok(a) = serde_json::from_str::<wire::Ack>(text) {
            return Ok(Self::Ack {
                command_id: a.command_id,
                server_seq: a.server_seq,
                op: a.op,
            });
        }
        if let Ok(o) = serde_json::from_str::<wire::Ops>(text) {
            return Ok(Self::Ops {
                namespace: o.namespace,
                seq_start: o.seq_start,
                ops: o.ops,
            });
        }
        serde_json::from_str(text)
    }
}

/// The hot frames as plain structs with their `type` as a field: what
/// `decode` reads directly. Each must accept exactly what its variant accepts.
mod wire {
    use serde::Deserialize;
    use serde_json::Value;

    use super::CommandFrame;
    use crate::op::{Op, OpType, Precondition};

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum CommandTag {
        Command,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Command {
        #[serde(rename = "type")]
        _tag: CommandTag,
        command_id: String,
        namespace: String,
        key: String,
        op_type: OpType,
        #[serde(default)]
        payload: Value,
        #[serde(default)]
        precondition: Option<Precondition>,
        #[serde(default)]
        base_seq: Option<u64>,
    }

    impl From<Command> for CommandFrame {
        fn from(c: Command) -> Self {
            Self {
                command_id: c.command_id,
                namespace: c.namespace,
                key: c.key,
                op_type: c.op_type,
                payload: c.payload,
                precondition: c.precondition,
                base_seq: c.base_seq,
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum AckTag {
        Ack,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum OpsTag {
        Ops,
    }

    #[derive(Deserialize)]
    pub(super) struct Ack {
        #[serde(rename = "type")]
        _tag: AckTag,
        pub command_id: String,
        pub server_seq: u64,
        pub op: Op,
    }

    #[derive(Deserialize)]
    pub(super) struct Ops {
        #[serde(rename = "type")]
        _tag: OpsTag,
        pub namespace: String,
        pub seq_start: u64,
        pub ops: Vec<Op>,
    }
}

/// The state of a key as a reject reports it (`current_state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentState {
    pub key: String,
    pub version: u64,
    pub value: Value,
}

/// One key in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    pub value: Value,
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heads: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<String>,
}

impl KeyState {
    pub fn from_entry(entry: &crate::state::KeyEntry) -> Self {
        use base64::Engine as _;
        Self {
            value: entry.value.clone(),
            version: entry.version,
            heads: entry.heads(),
            doc: entry
                .doc
                .as_ref()
                .map(|d| base64::engine::general_purpose::STANDARD.encode(d.save())),
        }
    }
}

/// Server → client frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        protocol: u32,
        server_id: String,
        session_id: String,
        actor_id: String,
    },
    /// The namespace's state at `last_server_seq`; replaces what the client had.
    /// A large state comes in several frames: all but the last carry `more: true`,
    /// each holds a disjoint part of `state`, and `digest` is the whole state's.
    Snapshot {
        namespace: String,
        last_server_seq: u64,
        state: BTreeMap<String, KeyState>,
        digest: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
        /// Where this frame leaves the transfer ([`Checkpoint`], opaque to clients):
        /// sent back in `hello`'s `checkpoints` or `subscribe`'s `checkpoint`, the
        /// snapshot continues after this frame's keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<String>,
    },
    Ops {
        namespace: String,
        seq_start: u64,
        ops: Vec<Op>,
    },
    Synced {
        namespace: String,
        server_seq: u64,
    },
    Ack {
        command_id: String,
        server_seq: u64,
        op: Op,
    },
    Reject {
        command_id: String,
        code: ErrorCode,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        current_state: Option<CurrentState>,
    },
    Presence {
        actor_id: String,
        client_id: String,
        key: String,
        payload: Value,
        hlc_ts: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<Value>,
    },
}

/// Splits a snapshot into `snapshot` frames of about `max_bytes` of state each (a key
/// larger than that gets a frame of its own), each with its checkpoint. Always at
/// least one frame.
pub fn snapshot_frames(
    namespace: &str,
    snapshot: &crate::snapshot::Snapshot,
    max_bytes: usize,
) -> Vec<ServerMessage> {
    let mut parts = SnapshotParts::new(std::sync::Arc::new(snapshot.clone()), None);
    std::iter::from_fn(|| parts.next_frame(namespace, max_bytes)).collect()
}

/// Most bytes of an encoded [`Checkpoint`]: a key is at most 512 bytes, so a real
/// one is far below; anything longer is refused before it is decoded.
pub const MAX_CHECKPOINT_BYTES: usize = 2048;

/// Where a snapshot transfer stands: the stream key, the snapshot (its
/// `last_server_seq` and the start of its digest) and the last key sent. Encoded as
/// `v1.` + base64url(JSON): opaque to clients, checked by the server, which only
/// ever continues the one snapshot the checkpoint names (the stored one, when it is
/// still that snapshot) after `after`, so a forged checkpoint can cost no more than
/// one snapshot read, and only of the caller's own stream key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    #[serde(rename = "k")]
    pub stream_key: String,
    #[serde(rename = "s")]
    pub last_server_seq: u64,
    /// The first 16 hex digits of the snapshot's digest.
    #[serde(rename = "d")]
    pub digest: String,
    /// The last key sent; `None`: nothing yet.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// Why a checkpoint is refused (`invalid_message`).
#[derive(Debug, thiserror::Error)]
#[error("invalid checkpoint: {0}")]
pub struct CheckpointError(&'static str);

const CHECKPOINT_DIGEST_HEX: usize = 16;

impl Checkpoint {
    pub fn new(snapshot: &crate::snapshot::Snapshot, digest: &str, after: Option<String>) -> Self {
        Self {
            stream_key: snapshot.stream_key.clone(),
            last_server_seq: snapshot.state.last_seq,
            digest: digest.chars().take(CHECKPOINT_DIGEST_HEX).collect(),
            after,
        }
    }

    pub fn encode(&self) -> String {
        use base64::Engine as _;
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "v1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Decodes and checks a checkpoint sent for `stream_key`: bounded, well formed,
    /// a valid key, this stream key.
    pub fn decode(text: &str, stream_key: &crate::ids::StreamKey) -> Result<Self, CheckpointError> {
        use base64::Engine as _;
        if text.len() > MAX_CHECKPOINT_BYTES {
            return Err(CheckpointError("too long"));
        }
        let body = text
            .strip_prefix("v1.")
            .ok_or(CheckpointError("unknown version"))?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| CheckpointError("not base64url"))?;
        let cp: Self = serde_json::from_slice(&json).map_err(|_| CheckpointError("malformed"))?;
        if cp.stream_key != stream_key.to_string() {
            return Err(CheckpointError("it belongs to another namespace"));
        }
        if cp.digest.len() != CHECKPOINT_DIGEST_HEX
            || !cp.digest.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(CheckpointError("bad digest"));
        }
        if let Some(after) = &cp.after
            && crate::validate_key(after).is_err()
        {
            return Err(CheckpointError("bad key"));
        }
        Ok(cp)
    }

    /// Whether `snapshot` (with `digest`) is the one this checkpoint names.
    pub fn names(&self, snapshot: &crate::snapshot::Snapshot, digest: &str) -> bool {
        snapshot.stream_key == self.stream_key
            && snapshot.state.last_seq == self.last_server_seq
            && digest.starts_with(&self.digest)
    }
}

/// A snapshot cut into parts in key order, from a checkpoint on: what the WebSocket
/// `snapshot` frames and the HTTP snapshot stream are made of. Holds the decoded
/// snapshot and where it stands; each part is encoded when asked for, so what a
/// transfer holds beyond the snapshot is one part.
pub struct SnapshotParts {
    snapshot: std::sync::Arc<crate::snapshot::Snapshot>,
    digest: String,
    after: Option<String>,
    done: bool,
}

impl SnapshotParts {
    /// Parts of `snapshot` after the key `after` (all of it when `None`).
    pub fn new(snapshot: std::sync::Arc<crate::snapshot::Snapshot>, after: Option<String>) -> Self {
        let digest = snapshot.digest();
        Self {
            snapshot,
            digest,
            after,
            done: false,
        }
    }

    pub fn snapshot(&self) -> &crate::snapshot::Snapshot {
        &self.snapshot
    }

    /// The whole state's digest.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The next part of about `max_bytes` (at least one key; an empty last part
    /// when nothing is left at the start), whether more follow, and the checkpoint
    /// after it. `None` once the last part was given.
    pub fn next_part(
        &mut self,
        max_bytes: usize,
    ) -> Option<(BTreeMap<String, KeyState>, bool, Checkpoint)> {
        use std::ops::Bound;
        if self.done {
            return None;
        }
        let keys = &self.snapshot.state.keys;
        let from = match &self.after {
            Some(a) => Bound::Excluded(a.clone()),
            None => Bound::Unbounded,
        };
        let mut range = keys.range::<String, _>((from, Bound::Unbounded)).peekable();
        let mut part = BTreeMap::new();
        let mut size = 0;
        while let Some((key, entry)) = range.peek() {
            let state = KeyState::from_entry(entry);
            let bytes = key.len() + serde_json::to_vec(&state).map_or(0, |v| v.len());
            if size > 0 && size + bytes > max_bytes {
                break;
            }
            size += bytes;
            part.insert((*key).clone(), state);
            range.next();
        }
        let more = range.peek().is_some();
        if let Some(last) = part.keys().next_back() {
            self.after = Some(last.clone());
        }
        self.done = !more;
        let checkpoint = Checkpoint::new(&self.snapshot, &self.digest, self.after.clone());
        Some((part, more, checkpoint))
    }

    /// The next part as a `snapshot` frame of `namespace`.
    pub fn next_frame(&mut self, namespace: &str, max_bytes: usize) -> Option<ServerMessage> {
        let (state, more, checkpoint) = self.next_part(max_bytes)?;
        Some(ServerMessage::Snapshot {
            namespace: namespace.to_owned(),
            last_server_seq: self.snapshot.state.last_seq,
            state,
            digest: self.digest.clone(),
            more,
            checkpoint: Some(checkpoint.encode()),
        })
    }
}

impl ServerMessage {
    pub fn encode(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"encode failed"}"#.to_owned()
        })
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error {
            code,
            message: message.into(),
        }
    }

    pub fn reject(
        command_id: impl Into<String>,
        code: ErrorCode,
        reason: impl Into<String>,
    ) -> Self {
        Self::Reject {
            command_id: command_id.into(),
            code,
            reason: reason.into(),
            current_state: None,
        }
    }
}

/// Builds an `ops` frame from ops that are already JSON-encoded (as they sit in the
/// log), so fan-out to many sockets does not re-serialize each op per socket.
/// Decodes to the same [`ServerMessage::Ops`] as the serde path.
pub fn encode_ops_frame<'a>(
    namespace: &str,
    seq_start: u64,
    ops: impl IntoIterator<Item = &'a [u8]>,
) -> String {
    let ns = serde_json::to_string(namespace).unwrap_or_else(|_| "\"\"".to_owned());
    let mut out = format!(r#"{{"type":"ops","namespace":{ns},"seq_start":{seq_start},"ops":["#);
    for (i, op) in ops.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&String::from_utf8_lossy(op));
    }
    out.push_str("]}");
    out
}

/// Builds the `ack` of an op that is already JSON-encoded (as the sequencer stores
/// it), so the op is not serialized a second time. Decodes to the same
/// [`ServerMessage::Ack`] as the serde path.
pub fn encode_ack_frame(command_id: &str, server_seq: u64, op: &[u8]) -> String {
    use std::fmt::Write as _;
    let id = serde_json::to_string(command_id).unwrap_or_else(|_| "\"\"".to_owned());
    let op = String::from_utf8_lossy(op);
    let mut out = String::with_capacity(id.len() + op.len() + 64);
    out.push_str(r#"{"type":"ack","command_id":"#);
    out.push_str(&id);
    out.push_str(r#","server_seq":"#);
    let _ = write!(out, "{server_seq}");
    out.push_str(r#","op":"#);
    out.push_str(&op);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_frames_decode() {
        let hello = ClientMessage::decode(
            r#"{"type":"hello","protocol":1,"org_id":"acme","project_id":"web","client_id":"c1","cursors":{"settings":null,"index":4}}"#,
        )
        .expect("hello");
        match hello {
            ClientMessage::Hello { cursors, .. } => {
                assert_eq!(cursors.get("settings"), Some(&None));
                assert_eq!(cursors.get("index"), Some(&Some(4)));
            }
            other => panic!("decoded as {other:?}"),
        }
        let cmd = ClientMessage::decode(
            r#"{"type":"command","command_id":"c-1","namespace":"index","key":"k","op_type":"set","payload":{"a":1},"precondition":{"expected_version":0}}"#,
        )
        .expect("command");
        assert!(matches!(
            cmd,
            ClientMessage::Command(CommandFrame {
                op_type: OpType::Set,
                ..
            })
        ));
        assert!(ClientMessage::decode(r#"{"type":"nope"}"#).is_err());
        assert!(ClientMessage::decode(r#"{"type":"command"}"#).is_err());
        assert!(ClientMessage::decode("not json").is_err());
    }

    #[test]
    fn hot_frames_decode_as_the_tagged_enums_do() {
        let client = [
            r#"{"type":"command","command_id":"c-1","namespace":"index","key":"k","op_type":"set","payload":{"a":[1,{"b":null}]}}"#,
            r#"{"command_id":"c-1","namespace":"index","key":"k","op_type":"patch","payload":{"a":1},"type":"command","precondition":{"expected_version":3},"base_seq":7}"#,
            r#"{"type":"command","command_id":"c-1","namespace":"index","key":"k","op_type":"del"}"#,
            r#"{"type":"command","command_id":"c-1","namespace":"index","key":"k","op_type":"set","precondition":null,"base_seq":null}"#,
            r#"{"type":"command","command_id":"c-1","namespace":"index","key":"k","op_type":"set","extra":1}"#,
            r#"{"type":"command","command_id":"c-1","command_id":"c-2","namespace":"n","key":"k","op_type":"set"}"#,
            r#"{"type":"command","type":"command","command_id":"c-1","namespace":"n","key":"k","op_type":"set"}"#,
            r#"{"type":"command","command_id":"c-1","namespace":"n","key":"k","op_type":"nope"}"#,
            r#"{"type":"command","command_id":7,"namespace":"n","key":"k","op_type":"set"}"#,
            r#"{"type":"Command","command_id":"c-1","namespace":"n","key":"k","op_type":"set"}"#,
            r#"{"type":"cursor","namespace":"n","server_seq":4}"#,
            r#"{"type":"ping"}"#,
            r#"[1,2]"#,
            "",
        ];
        for text in client {
            let general = serde_json::from_str::<ClientMessage>(text);
            match (ClientMessage::decode(text), general) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{text}"),
                (a, b) => panic!("{text}: direct {a:?}, general {b:?}"),
            }
        }
        let op = r#"{"op_id":"x","org_id":"o","project_id":"p","namespace":"n","actor_id":"a","client_id":"c","command_id":"1","server_seq":5,"hlc_ts":"9","key":"k","op_type":"set","payload":{"v":[1,2]}}"#;
        let server = [
            format!(r#"{{"type":"ack","command_id":"1","server_seq":5,"op":{op}}}"#),
            format!(r#"{{"command_id":"1","server_seq":5,"op":{op},"type":"ack","more":true}}"#),
            format!(r#"{{"type":"ops","namespace":"n","seq_start":5,"ops":[{op},{op}]}}"#),
            r#"{"type":"ops","namespace":"n","seq_start":5,"ops":[]}"#.to_owned(),
            r#"{"type":"ack","command_id":"1","server_seq":5}"#.to_owned(),
            r#"{"type":"synced","namespace":"n","server_seq":5}"#.to_owned(),
            r#"{"type":"reject","command_id":"1","code":"invalid_op","reason":"no"}"#.to_owned(),
            r#"{"type":"pong"}"#.to_owned(),
            "{}".to_owned(),
        ];
        for text in &server {
            let general = serde_json::from_str::<ServerMessage>(text);
            match (ServerMessage::decode(text), general) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{text}"),
                (a, b) => panic!("{text}: direct {a:?}, general {b:?}"),
            }
        }
    }

    #[test]
    fn ops_frame_fast_path_matches_serde() {
        let op: Op = serde_json::from_value(json!({
            "op_id":"x","org_id":"o","project_id":"p","namespace":"n\"s","actor_id":"a",
            "client_id":"c","command_id":"1","server_seq":5,"hlc_ts":"9","key":"k",
            "op_type":"set","payload":{"v":[1,2]}
        }))
        .expect("op");
        let raw = serde_json::to_vec(&op).expect("encode");
        let fast = encode_ops_frame("n\"s", 5, [raw.as_slice(), raw.as_slice()]);
        let decoded: ServerMessage = serde_json::from_str(&fast).expect("decode");
        assert_eq!(
            decoded,
            ServerMessage::Ops {
                namespace: "n\"s".into(),
                seq_start: 5,
                ops: vec![op.clone(), op]
            }
        );
    }

    #[test]
    fn reject_encodes_code_in_snake_case() {
        let v: Value = serde_json::from_str(
            &ServerMessage::reject("c", ErrorCode::PreconditionFailed, "no").encode(),
        )
        .expect("json");
        assert_eq!(v["type"], "reject");
        assert_eq!(v["code"], "precondition_failed");
        assert!(v.get("current_state").is_none());
    }

    #[test]
    fn a_spliced_ack_decodes_like_the_serde_one() {
        let op: crate::Op = serde_json::from_value(json!({
            "op_id": "ab12", "org_id": "o", "project_id": "p", "namespace": "n",
            "actor_id": "a", "client_id": "c", "command_id": "c\"1", "server_seq": 9,
            "hlc_ts": "1", "key": "k\n", "op_type": "set", "payload": {"x": [1, "y"]},
        }))
        .expect("op");
        let body = serde_json::to_vec(&op).expect("json");
        let spliced = encode_ack_frame(&op.command_id, op.server_seq, &body);
        let serde = ServerMessage::Ack {
            command_id: op.command_id.clone(),
            server_seq: op.server_seq,
            op,
        };
        assert_eq!(spliced, serde.encode());
        assert_eq!(
            serde_json::from_str::<ServerMessage>(&spliced).expect("decodes"),
            serde
        );
    }
}
