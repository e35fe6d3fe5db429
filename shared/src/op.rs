//! The op envelope (SPEC §2) and the command envelope that travels from a gateway to
//! the sequencer over `USYNC_CMDS`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ids::StreamKey;

/// What an op does to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpType {
    /// Payload is the new JSON value.
    Set,
    /// Payload is ignored; the key is removed.
    Del,
    /// Payload is an RFC 7386 merge patch applied to the current value.
    Patch,
    /// Payload is `{"change": "<base64 Automerge change>"}`.
    CrdtOp,
}

impl OpType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::Del => "del",
            Self::Patch => "patch",
            Self::CrdtOp => "crdt_op",
        }
    }
}

/// A compare-and-set guard carried by a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Precondition {
    /// The key's version the writer based its edit on; `0` = create only if absent.
    pub expected_version: u64,
}

/// A committed op, exactly as stored in `USYNC_OPS` and sent to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub op_id: String,
    pub org_id: String,
    pub project_id: String,
    pub namespace: String,
    pub actor_id: String,
    pub client_id: String,
    pub command_id: String,
    pub server_seq: u64,
    /// uhlc timestamp as a decimal string: the u64 is above 2^53 and would lose
    /// precision as a JSON number in browsers.
    pub hlc_ts: String,
    pub key: String,
    pub op_type: OpType,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precondition: Option<Precondition>,
}

/// An [`Op`] borrowed from the command it commits (the sequencer encodes ops
/// through it): the same fields in the same order, so the same JSON.
#[derive(Debug, Serialize)]
pub struct OpRef<'a> {
    pub op_id: &'a str,
    pub org_id: &'a str,
    pub project_id: &'a str,
    pub namespace: &'a str,
    pub actor_id: &'a str,
    pub client_id: &'a str,
    pub command_id: &'a str,
    pub server_seq: u64,
    pub hlc_ts: &'a str,
    pub key: &'a str,
    pub op_type: OpType,
    pub payload: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precondition: Option<Precondition>,
}

/// A client's command after the gateway has authenticated and validated it: org,
/// project and actor come from the verified token, never from the client's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandEnvelope {
    pub org_id: String,
    pub project_id: String,
    pub namespace: String,
    pub actor_id: String,
    pub client_id: String,
    pub command_id: String,
    pub key: String,
    pub op_type: OpType,
    #[serde(default)]
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precondition: Option<Precondition>,
    /// The cursor the client edited on ([`crate::protocol::CommandFrame::base_seq`]):
    /// the sequencer refuses the command `stale_base` when it is below the key's
    /// compaction floor. Not part of the op id (a retry is the same command whatever
    /// base it names) nor of the op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_seq: Option<u64>,
    /// Core NATS subject the sequencer publishes the ack or reject to. `None` for
    /// commands whose submitter does not wait (the op still reaches subscribers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

impl CommandEnvelope {
    /// The op id: a hash of who sent the command, its id and what it does. A retry of
    /// the same command hashes to the same id (invariant 5).
    pub fn op_id(&self) -> String {
        op_id(
            &self.actor_id,
            &self.command_id,
            &self.key,
            self.op_type,
            &self.payload,
            self.precondition,
        )
    }

    /// The stream key, validated.
    pub fn stream_key(&self) -> Result<StreamKey, crate::IdError> {
        StreamKey::parse(&self.org_id, &self.project_id, &self.namespace)
    }

    /// The op the command commits as, borrowed from it: it encodes to the same JSON
    /// as [`Self::into_op`]'s without copying the command.
    pub fn op_ref<'a>(&'a self, op_id: &'a str, server_seq: u64, hlc_ts: &'a str) -> OpRef<'a> {
        OpRef {
            op_id,
            org_id: &self.org_id,
            project_id: &self.project_id,
            namespace: &self.namespace,
            actor_id: &self.actor_id,
            client_id: &self.client_id,
            command_id: &self.command_id,
            server_seq,
            hlc_ts,
            key: &self.key,
            op_type: self.op_type,
            payload: &self.payload,
            precondition: self.precondition,
        }
    }

    /// Turns the command into the op it commits as.
    pub fn into_op(self, op_id: String, server_seq: u64, hlc_ts: String) -> Op {
        Op {
            op_id,
            org_id: self.org_id,
            project_id: self.project_id,
            namespace: self.namespace,
            actor_id: self.actor_id,
            client_id: self.client_id,
            command_id: self.command_id,
            server_seq,
            hlc_ts,
            key: self.key,
            op_type: self.op_type,
            payload: self.payload,
            precondition: self.precondition,
        }
    }
}

/// `hash(actor_id, command_id, payload)` where "payload" is everything the command
/// asks for (key, op type, value, precondition), so a reused command id with a
/// different body is told apart from a retry. 128 bits of SHA-256, 32 hex chars.
pub fn op_id(
    actor_id: &str,
    command_id: &str,
    key: &str,
    op_type: OpType,
    payload: &Value,
    precondition: Option<Precondition>,
) -> String {
    let mut h = Sha256::new();
    for part in [actor_id, command_id, key, op_type.as_str()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    // serde_json's map is ordered by key, so this is canonical for equal values.
    let body = serde_json::to_vec(payload).unwrap_or_default();
    h.update((body.len() as u64).to_le_bytes());
    h.update(&body);
    match precondition {
        Some(p) => {
            h.update([1]);
            h.update(p.expected_version.to_le_bytes());
        }
        None => h.update([0]),
    }
    hex::encode(&h.finalize()[..16])
}

/// Who sent a command, without what it asked for: 128 bits of
/// SHA-256(actor_id, command_id). Two commands with the same key are the same
/// command: a retry when their [`op_id`]s match, a reused command id otherwise.
pub fn command_key(actor_id: &str, command_id: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    for part in [actor_id, command_id] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize()[..16]);
    out
}

/// [`command_key`] as 32 hex digits (how snapshots and stores name it).
pub fn command_key_hex(actor_id: &str, command_id: &str) -> String {
    encode_command_key(&command_key(actor_id, command_id))
}

/// A command key as 32 hex digits.
pub fn encode_command_key(key: &[u8; 16]) -> String {
    hex::encode(key)
}

/// A command key from its 32 hex digits.
pub fn parse_command_key(hex_digits: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex_digits, &mut out)
        .ok()
        .map(|()| out)
}

/// An op id as 16 bytes: its 32 hex digits, or (for an id not written by this
/// code) 128 bits of its SHA-256.
pub fn op_id_bytes(op_id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    if op_id.len() == 32 && hex::decode_to_slice(op_id, &mut out).is_ok() {
        return out;
    }
    out.copy_from_slice(&Sha256::digest(op_id.as_bytes())[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The log holds what `op_ref` encodes; clients and the materializer decode it
    /// as an `Op`: both must give the same bytes.
    #[test]
    fn an_op_ref_encodes_as_its_op() {
        let base = CommandEnvelope {
            org_id: "acme".into(),
            project_id: "web".into(),
            namespace: "index".into(),
            actor_id: "u\"1".into(),
            client_id: "c-1".into(),
            command_id: "cmd \u{1F600} \n".into(),
            key: "k/é".into(),
            op_type: OpType::Patch,
            payload: json!({"b": [1, 2.5, null], "a": {"x": "\u{0}"}}),
            precondition: Some(Precondition {
                expected_version: 7,
            }),
            base_seq: Some(3),
            reply_to: Some("usync.reply.x".into()),
        };
        let del = CommandEnvelope {
            op_type: OpType::Del,
            payload: Value::Null,
            precondition: None,
            base_seq: None,
            reply_to: None,
            ..base.clone()
        };
        for cmd in [base, del] {
            let id = cmd.op_id();
            let by_ref = serde_json::to_vec(&cmd.op_ref(&id, 42, "7399")).expect("ref");
            let op = cmd.clone().into_op(id, 42, "7399".into());
            assert_eq!(by_ref, serde_json::to_vec(&op).expect("op"));
            let back: Op = serde_json::from_slice(&by_ref).expect("decodes as an op");
            assert_eq!(back, op);
        }
    }

    #[test]
    fn op_id_is_stable_and_distinguishes() {
        let a = op_id("u", "c1", "k", OpType::Set, &json!({"a":1,"b":2}), None);
        let b = op_id("u", "c1", "k", OpType::Set, &json!({"b":2,"a":1}), None);
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        assert_ne!(
            a,
            op_id("u", "c2", "k", OpType::Set, &json!({"a":1,"b":2}), None)
        );
        assert_ne!(
            a,
            op_id("v", "c1", "k", OpType::Set, &json!({"a":1,"b":2}), None)
        );
        assert_ne!(a, op_id("u", "c1", "k", OpType::Set, &json!({"a":1}), None));
        assert_eq!(op_id_bytes(&a).to_vec(), hex::decode(&a).expect("hex"));
        assert_ne!(op_id_bytes("legacy-id"), op_id_bytes("legacy-id2"));
        assert_eq!(command_key("u", "c1"), command_key("u", "c1"));
        assert_ne!(command_key("u", "c1"), command_key("u1", "c"));
        assert_eq!(
            parse_command_key(&command_key_hex("u", "c1")),
            Some(command_key("u", "c1"))
        );
        assert_eq!(parse_command_key("zz"), None);
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert_ne!(
            op_id("ab", "c", "k", OpType::Del, &Value::Null, None),
            op_id("a", "bc", "k", OpType::Del, &Value::Null, None)
        );
    }

    #[test]
    fn op_round_trips_with_spec_field_names() {
        let op = Op {
            op_id: "ab".into(),
            org_id: "acme".into(),
            project_id: "web".into(),
            namespace: "settings".into(),
            actor_id: "user-42".into(),
            client_id: "laptop-1".into(),
            command_id: "c-17".into(),
            server_seq: 18,
            hlc_ts: "7235619847381123072".into(),
            key: "theme".into(),
            op_type: OpType::Set,
            payload: json!({"color":"dark"}),
            precondition: Some(Precondition {
                expected_version: 17,
            }),
        };
        let v = serde_json::to_value(&op).expect("serialize");
        assert_eq!(v["op_type"], "set");
        assert_eq!(v["precondition"]["expected_version"], 17);
        let back: Op = serde_json::from_value(v).expect("deserialize");
        assert_eq!(back, op);
    }
}
