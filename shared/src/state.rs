//! The one deterministic state machine. `apply(state, op)` is pure (no IO, no clock,
//! no randomness): the sequencer uses it to validate and the materializer to persist,
//! so state is a function of the ordered ops (invariant 6) and `digest` is equal
//! wherever the same ops were applied.
//!
//! Op semantics (SPEC §3): `set` replaces the value, `del` removes the key, `patch`
//! applies an RFC 7386 merge patch to the current value (`{}` when absent), `crdt_op`
//! applies one Automerge change to the key's document. A key's `version` is the
//! `server_seq` of the last op that changed it; an absent key has version 0.

use std::collections::BTreeMap;

use automerge::{Automerge, Change};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::admission::{self, Limits};
use crate::op::{Op, OpType};

/// One key's state.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    /// The value (for crdt keys: the document as JSON).
    pub value: Value,
    pub version: u64,
    /// The Automerge document of a crdt key.
    pub doc: Option<Box<Automerge>>,
}

impl PartialEq for KeyEntry {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
            && self.version == other.version
            && self.doc.as_ref().map(|d| d.get_heads()) == other.doc.as_ref().map(|d| d.get_heads())
    }
}

impl KeyEntry {
    /// Hex change hashes of the document's heads, sorted (crdt keys only).
    pub fn heads(&self) -> Option<Vec<String>> {
        self.doc.as_ref().map(|d| {
            let mut h: Vec<String> = d.get_heads().iter().map(ToString::to_string).collect();
            h.sort();
            h
        })
    }
}

/// The state of one stream key (org, project, namespace).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamespaceState {
    /// `server_seq` of the last op applied (0 = none).
    pub last_seq: u64,
    pub keys: BTreeMap<String, KeyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("op {got} applied out of order (expected {expected})")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("{0}")]
    InvalidOp(String),
}

/// The Automerge change in a `crdt_op` payload `{"change": "<base64>"}`, decoded
/// under [`Limits::ceiling`]: ops in the log were admitted under tighter limits, and
/// nothing (a compressed chunk that inflates without end) can make a replay unbounded.
pub fn decode_change(payload: &Value) -> Result<Change, ApplyError> {
    admission::admit_change_payload(payload, &Limits::ceiling())
        .map_err(|(_, why)| ApplyError::InvalidOp(why))
}

/// The document as JSON.
pub fn doc_json(doc: &Automerge) -> Value {
    serde_json::to_value(automerge::AutoSerde::from(doc)).unwrap_or(Value::Null)
}

/// What an op does to one key's entry: the next entry, or `None` when the key is gone.
/// No admission rules (preconditions, schemas, sizes) here: those decide whether an
/// op is committed; once committed it must always apply.
pub fn next_entry(
    current: Option<&KeyEntry>,
    op_type: OpType,
    payload: &Value,
    seq: u64,
) -> Result<Option<KeyEntry>, ApplyError> {
    match op_type {
        OpType::Set => Ok(Some(KeyEntry {
            value: payload.clone(),
            version: seq,
            doc: None,
        })),
        OpType::Del => Ok(None),
        OpType::Patch => {
            let mut value = match current {
                Some(e) if e.doc.is_none() => e.value.clone(),
                Some(_) => {
                    return Err(ApplyError::InvalidOp(
                        "patch on an Automerge document; send crdt_op".into(),
                    ));
                }
                None => Value::Object(Default::default()),
            };
            json_patch::merge(&mut value, payload);
            Ok(Some(KeyEntry {
                value,
                version: seq,
                doc: None,
            }))
        }
        OpType::CrdtOp => apply_change(current, decode_change(payload)?, seq),
    }
}

/// What one decoded Automerge change does to a key's entry. A document nesting
/// deeper than [`Limits::ceiling`]'s value depth is refused before its JSON view is
/// built (building it recurses).
pub fn apply_change(
    current: Option<&KeyEntry>,
    change: Change,
    seq: u64,
) -> Result<Option<KeyEntry>, ApplyError> {
    let doc = merge_change(current, change)?;
    let max_depth = Limits::ceiling().max_value_depth;
    if admission::doc_depth_within(&doc, max_depth).is_none() {
        return Err(ApplyError::InvalidOp(format!(
            "the document would nest deeper than {max_depth} levels"
        )));
    }
    Ok(Some(KeyEntry {
        value: doc_json(&doc),
        version: seq,
        doc: Some(doc),
    }))
}

/// The key's document with `change` applied (a new one when the key is absent).
/// The JSON view is not built: check the document first (see
/// [`admission::check_doc`]), then [`doc_json`].
pub fn merge_change(
    current: Option<&KeyEntry>,
    change: Change,
) -> Result<Box<Automerge>, ApplyError> {
    let mut doc = match current {
        Some(KeyEntry { doc: Some(d), .. }) => d.clone(),
        Some(_) => {
            return Err(ApplyError::InvalidOp(
                "crdt_op on a key that holds a plain value".into(),
            ));
        }
        None => Box::new(Automerge::new()),
    };
    let missing: Vec<String> = change
        .deps()
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_none())
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(ApplyError::InvalidOp(format!(
            "change depends on changes the server does not have: {}",
            missing.join(", ")
        )));
    }
    doc.apply_changes([change])
        .map_err(|e| ApplyError::InvalidOp(format!("change does not apply: {e}")))?;
    Ok(doc)
}

/// Applies the next op. Ops must come in `server_seq` order, without gaps.
pub fn apply(state: &mut NamespaceState, op: &Op) -> Result<(), ApplyError> {
    if op.server_seq != state.last_seq + 1 {
        return Err(ApplyError::OutOfOrder {
            expected: state.last_seq + 1,
            got: op.server_seq,
        });
    }
    match next_entry(
        state.keys.get(&op.key),
        op.op_type,
        &op.payload,
        op.server_seq,
    )? {
        Some(e) => {
            state.keys.insert(op.key.clone(), e);
        }
        None => {
            state.keys.remove(&op.key);
        }
    }
    state.last_seq = op.server_seq;
    Ok(())
}

/// A digest of the state: SHA-256 over a canonical encoding (keys sorted, JSON object
/// members sorted, crdt keys by their heads), hex. Equal states give equal digests
/// whatever order their JSON maps were built in.
pub fn digest(state: &NamespaceState) -> String {
    let mut h = Sha256::new();
    h.update(b"ultrasync-state-v1\0");
    h.update(state.last_seq.to_le_bytes());
    for (key, entry) in &state.keys {
        h.update((key.len() as u64).to_le_bytes());
        h.update(key.as_bytes());
        h.update(entry.version.to_le_bytes());
        let mut canon = Vec::new();
        canonical_json(&entry.value, &mut canon);
        h.update((canon.len() as u64).to_le_bytes());
        h.update(&canon);
        match entry.heads() {
            Some(heads) => {
                h.update([1]);
                for head in heads {
                    h.update(head.as_bytes());
                }
            }
            None => h.update([0]),
        }
    }
    hex::encode(h.finalize())
}

/// JSON with object members sorted by key, no whitespace.
pub fn canonical_json(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            out.push(b'{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).unwrap_or_default());
                out.push(b':');
                canonical_json(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out);
            }
            out.push(b']');
        }
        other => out.extend(serde_json::to_vec(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use proptest::prelude::*;
    use serde_json::json;

    fn op(seq: u64, key: &str, op_type: OpType, payload: Value) -> Op {
        Op {
            op_id: format!("id{seq}"),
            org_id: "o".into(),
            project_id: "p".into(),
            namespace: "n".into(),
            actor_id: "a".into(),
            client_id: "c".into(),
            command_id: format!("c{seq}"),
            server_seq: seq,
            hlc_ts: "0".into(),
            key: key.into(),
            op_type,
            payload,
            precondition: None,
        }
    }

    #[test]
    fn merge_patch_edge_cases() {
        let mut s = NamespaceState::default();
        // Patch on an absent key patches {}.
        apply(
            &mut s,
            &op(1, "k", OpType::Patch, json!({"a": 1, "b": {"c": 2}})),
        )
        .expect("patch");
        assert_eq!(s.keys["k"].value, json!({"a": 1, "b": {"c": 2}}));
        // null removes a member, nested objects merge, arrays replace.
        apply(
            &mut s,
            &op(2, "k", OpType::Patch, json!({"a": null, "b": {"d": [1]}})),
        )
        .expect("patch");
        assert_eq!(s.keys["k"].value, json!({"b": {"c": 2, "d": [1]}}));
        // A non-object patch replaces the value.
        apply(&mut s, &op(3, "k", OpType::Patch, json!([1, 2]))).expect("patch");
        assert_eq!(s.keys["k"].value, json!([1, 2]));
        // Patching a scalar with an object starts from {}.
        apply(&mut s, &op(4, "k", OpType::Set, json!(5))).expect("set");
        apply(&mut s, &op(5, "k", OpType::Patch, json!({"x": 1}))).expect("patch");
        assert_eq!(s.keys["k"].value, json!({"x": 1}));
        assert_eq!(s.keys["k"].version, 5);
        apply(&mut s, &op(6, "k", OpType::Del, Value::Null)).expect("del");
        assert!(!s.keys.contains_key("k"));
        assert_eq!(
            apply(&mut s, &op(8, "k", OpType::Del, Value::Null)),
            Err(ApplyError::OutOfOrder {
                expected: 7,
                got: 8
            })
        );
    }

    fn change_b64(doc: &mut AutoCommit) -> Value {
        let change = doc.get_last_local_change().expect("a change");
        json!({"change": B64.encode(change.raw_bytes())})
    }

    #[test]
    fn crdt_changes_merge_and_bad_ones_are_refused() {
        let mut a = AutoCommit::new();
        a.put(ROOT, "title", "doc").expect("put");
        a.commit();
        let first = change_b64(&mut a);
        let mut b = a.fork();
        a.put(ROOT, "from_a", 1).expect("put");
        a.commit();
        b.put(ROOT, "from_b", 2).expect("put");
        b.commit();
        let mut s = NamespaceState::default();
        apply(&mut s, &op(1, "d", OpType::CrdtOp, first)).expect("first");
        apply(&mut s, &op(2, "d", OpType::CrdtOp, change_b64(&mut a))).expect("a");
        apply(&mut s, &op(3, "d", OpType::CrdtOp, change_b64(&mut b))).expect("b");
        assert_eq!(
            s.keys["d"].value,
            json!({"title": "doc", "from_a": 1, "from_b": 2})
        );
        assert_eq!(s.keys["d"].heads().map(|h| h.len()), Some(2));

        for bad in [
            json!({"change": "!!!"}),
            json!({"change": "AAAA"}),
            json!({}),
            json!("x"),
        ] {
            assert!(matches!(
                next_entry(s.keys.get("d"), OpType::CrdtOp, &bad, 4),
                Err(ApplyError::InvalidOp(_))
            ));
        }
        // A change whose dependencies the server never saw.
        let mut c = AutoCommit::new();
        c.put(ROOT, "x", 1).expect("put");
        c.commit();
        c.put(ROOT, "y", 2).expect("put");
        c.commit();
        let orphan = change_b64(&mut c);
        assert!(matches!(
            next_entry(None, OpType::CrdtOp, &orphan, 1),
            Err(ApplyError::InvalidOp(_))
        ));
        // Plain ops and crdt ops do not mix on one key.
        assert!(next_entry(s.keys.get("d"), OpType::Patch, &json!({}), 4).is_err());
    }

    #[test]
    fn digest_ignores_map_build_order() {
        let mut a = NamespaceState::default();
        let mut b = NamespaceState::default();
        apply(&mut a, &op(1, "k", OpType::Set, json!({"x": 1, "y": 2}))).expect("set");
        apply(&mut b, &op(1, "k", OpType::Set, json!({"y": 2, "x": 1}))).expect("set");
        assert_eq!(digest(&a), digest(&b));
        apply(&mut b, &op(2, "k", OpType::Patch, json!({"x": 3}))).expect("patch");
        assert_ne!(digest(&a), digest(&b));
    }

    /// A reference model of the plain ops: just a map.
    fn model_apply(model: &mut BTreeMap<String, (Value, u64)>, op: &Op) {
        match op.op_type {
            OpType::Set => {
                model.insert(op.key.clone(), (op.payload.clone(), op.server_seq));
            }
            OpType::Del => {
                model.remove(&op.key);
            }
            OpType::Patch => {
                let base = match model.get(&op.key) {
                    Some((v, _)) => v.clone(),
                    None => json!({}),
                };
                model.insert(
                    op.key.clone(),
                    (reference_merge(base, &op.payload), op.server_seq),
                );
            }
            OpType::CrdtOp => unreachable!(),
        }
    }

    /// RFC 7386 section 2, written out as the RFC's pseudo code.
    fn reference_merge(target: Value, patch: &Value) -> Value {
        let Value::Object(patch) = patch else {
            return patch.clone();
        };
        let mut target = match target {
            Value::Object(t) => t,
            _ => Default::default(),
        };
        for (name, value) in patch {
            if value.is_null() {
                target.remove(name);
            } else {
                let current = target.remove(name).unwrap_or(Value::Null);
                target.insert(name.clone(), reference_merge(current, value));
            }
        }
        Value::Object(target)
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-5i64..5).prop_map(|n| json!(n)),
            "[a-c]{0,2}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_ops() -> impl Strategy<Value = Vec<(String, OpType, Value)>> {
        prop::collection::vec(
            (
                "k[0-3]",
                prop_oneof![Just(OpType::Set), Just(OpType::Del), Just(OpType::Patch)],
                arb_json(),
            ),
            0..40,
        )
    }

    proptest! {
        #[test]
        fn apply_matches_the_model_and_replays_to_the_same_digest(ops in arb_ops()) {
            let ops: Vec<Op> = ops
                .into_iter()
                .enumerate()
                .map(|(i, (k, t, p))| op(i as u64 + 1, &k, t, p))
                .collect();
            let mut state = NamespaceState::default();
            let mut model = BTreeMap::new();
            for o in &ops {
                apply(&mut state, o).expect("apply");
                model_apply(&mut model, o);
            }
            let got: BTreeMap<String, (Value, u64)> =
                state.keys.iter().map(|(k, e)| (k.clone(), (e.value.clone(), e.version))).collect();
            prop_assert_eq!(&got, &model);
            // Versions are the seq of the last op that changed the key.
            for (k, e) in &state.keys {
                let last = ops.iter().rev().find(|o| &o.key == k).map(|o| o.server_seq);
                prop_assert_eq!(Some(e.version), last);
            }
            // Replaying the same ops gives the same state and digest.
            let mut again = NamespaceState::default();
            for o in &ops {
                apply(&mut again, o).expect("replay");
            }
            prop_assert_eq!(digest(&again), digest(&state));
            prop_assert_eq!(again, state);
        }
    }
}
