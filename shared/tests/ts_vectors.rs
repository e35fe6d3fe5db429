//! The optimistic-apply test vectors shared with the TypeScript SDK: cases of
//! (key entry, ops) → key entry computed by `shared::state::next_entry`, the function
//! the sequencer and the materializer apply. The TS SDK replays every case with its
//! own apply (`clients/typescript/test/unit/vectors.test.mjs`) and must produce the
//! same canonical JSON byte for byte, so a browser's optimistic view agrees with what
//! the server will commit.
//!
//! This test regenerates the cases and compares them with the committed file; after
//! a deliberate change to the state machine, bless the new file with
//! `ULTRASYNC_BLESS=1 cargo test -p ultrasync-shared --test ts_vectors`.

use std::path::PathBuf;

use serde_json::{Value, json};
use ultrasync_shared::OpType;
use ultrasync_shared::state::{KeyEntry, canonical_json, next_entry};

fn vectors_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/typescript/test/vectors.json")
}

/// A small deterministic generator (xorshift64*): the file must not change between
/// runs, so no system randomness.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// JSON values whose text is the same in Rust and JavaScript: integers well
    /// inside 2^53, short decimals, short strings (some non-ASCII), nesting ≤ `depth`.
    fn value(&mut self, depth: u32) -> Value {
        let kinds = if depth == 0 { 5 } else { 7 };
        match self.below(kinds) {
            0 => Value::Null,
            1 => Value::Bool(self.below(2) == 0),
            2 => json!(self.below(200) as i64 - 100),
            3 => json!([0.5, -2.25, 1.125, 3.75][self.below(4) as usize]),
            4 => json!(["", "a", "b", "héllo", "✓ done", "x\"y"][self.below(6) as usize]),
            5 => {
                let n = self.below(3);
                Value::Array((0..n).map(|_| self.value(depth - 1)).collect())
            }
            _ => self.object(depth - 1),
        }
    }

    fn object(&mut self, depth: u32) -> Value {
        let n = self.below(4);
        let mut map = serde_json::Map::new();
        for _ in 0..n {
            let k = ["a", "b", "c", "title", "done"][self.below(5) as usize];
            map.insert(k.to_owned(), self.value(depth));
        }
        Value::Object(map)
    }

    /// A patch: mostly objects (some members null, which removes them), sometimes a
    /// scalar or an array (which replaces the whole value).
    fn patch(&mut self) -> Value {
        if self.below(6) == 0 {
            return self.value(1);
        }
        let mut p = self.object(2);
        if let Value::Object(m) = &mut p
            && self.below(2) == 0
        {
            let k = ["a", "b", "c", "title", "done"][self.below(5) as usize];
            m.insert(k.to_owned(), Value::Null);
        }
        p
    }
}

fn op_type_name(t: OpType) -> &'static str {
    match t {
        OpType::Set => "set",
        OpType::Del => "del",
        OpType::Patch => "patch",
        OpType::CrdtOp => "crdt_op",
    }
}

fn canonical(v: &Value) -> String {
    let mut out = Vec::new();
    canonical_json(v, &mut out);
    String::from_utf8(out).expect("canonical JSON is UTF-8")
}

fn entry_json(e: Option<&KeyEntry>) -> Value {
    match e {
        Some(e) => {
            json!({"value": e.value, "version": e.version, "canonical": canonical(&e.value)})
        }
        None => Value::Null,
    }
}

/// One case: a starting entry (or none), ops applied in order at versions
/// `before.version + 1, + 2, …`, the resulting entry.
fn case(name: String, before: Option<(Value, u64)>, ops: Vec<(OpType, Value)>) -> Value {
    let start = before.map(|(value, version)| KeyEntry {
        value,
        version,
        doc: None,
    });
    let mut seq = start.as_ref().map_or(0, |e| e.version);
    let mut entry = start.clone();
    let mut steps = Vec::new();
    for (t, payload) in ops {
        seq += 1;
        entry = next_entry(entry.as_ref(), t, &payload, seq).expect("plain ops always apply");
        steps.push(json!({"op_type": op_type_name(t), "payload": payload, "seq": seq}));
    }
    json!({
        "name": name,
        "before": entry_json(start.as_ref()).as_object().map(|m| {
            let mut m = m.clone();
            m.remove("canonical");
            Value::Object(m)
        }).unwrap_or(Value::Null),
        "ops": steps,
        "after": entry_json(entry.as_ref()),
    })
}

fn vectors() -> Value {
    let mut cases = Vec::new();
    // RFC 7386 appendix A, each as a patch on an existing value.
    let rfc = [
        (json!({"a": "b"}), json!({"a": "c"})),
        (json!({"a": "b"}), json!({"b": "c"})),
        (json!({"a": "b"}), json!({"a": null})),
        (json!({"a": "b", "b": "c"}), json!({"a": null})),
        (json!({"a": ["b"]}), json!({"a": "c"})),
        (json!({"a": "c"}), json!({"a": ["b"]})),
        (
            json!({"a": {"b": "c"}}),
            json!({"a": {"b": "d", "c": null}}),
        ),
        (json!({"a": [{"b": "c"}]}), json!({"a": [1]})),
        (json!(["a", "b"]), json!(["c", "d"])),
        (json!({"a": "b"}), json!(["c"])),
        (json!({"a": "foo"}), json!(null)),
        (json!({"a": "foo"}), json!("bar")),
        (json!({"e": null}), json!({"a": 1})),
        (json!([1, 2]), json!({"a": "b", "c": null})),
        (json!({}), json!({"a": {"bb": {"ccc": null}}})),
    ];
    for (i, (target, patch)) in rfc.into_iter().enumerate() {
        cases.push(case(
            format!("rfc7386 appendix A #{}", i + 1),
            Some((target, 3)),
            vec![(OpType::Patch, patch)],
        ));
    }
    // The edges the SDK's view meets: absent keys, deletes, set after delete.
    cases.push(case(
        "patch on an absent key starts from {}".into(),
        None,
        vec![(OpType::Patch, json!({"a": 1, "b": null}))],
    ));
    cases.push(case(
        "set on an absent key".into(),
        None,
        vec![(OpType::Set, json!({"title": "milk", "done": false}))],
    ));
    cases.push(case(
        "del on an absent key".into(),
        None,
        vec![(OpType::Del, Value::Null)],
    ));
    cases.push(case(
        "del then patch".into(),
        Some((json!({"a": 1}), 7)),
        vec![(OpType::Del, Value::Null), (OpType::Patch, json!({"b": 2}))],
    ));
    cases.push(case(
        "set then patch then patch".into(),
        Some((json!("scalar"), 1)),
        vec![
            (OpType::Set, json!({"title": "a", "done": false})),
            (OpType::Patch, json!({"done": true})),
            (OpType::Patch, json!({"title": "b", "order": 2})),
        ],
    ));
    cases.push(case(
        "patch on a scalar starts from {}".into(),
        Some((json!(5), 2)),
        vec![(OpType::Patch, json!({"x": 1}))],
    ));
    // Generated: random starts and 1–4 random ops.
    let mut g = Gen(0x5eed_0001_u64);
    for i in 0..240 {
        let before = match g.below(4) {
            0 => None,
            1 => Some((g.value(3), 1 + g.below(50))),
            _ => Some((g.object(3), 1 + g.below(50))),
        };
        let n = 1 + g.below(4);
        let ops = (0..n)
            .map(|_| match g.below(8) {
                0 => (OpType::Del, Value::Null),
                1 | 2 => (OpType::Set, g.value(3)),
                _ => (OpType::Patch, g.patch()),
            })
            .collect();
        cases.push(case(format!("generated #{i}"), before, ops));
    }
    json!({
        "about": "generated by shared/tests/ts_vectors.rs from ultrasync_shared::state::next_entry; do not edit by hand",
        "format": 1,
        "cases": cases,
    })
}

#[test]
fn the_typescript_vectors_are_up_to_date() {
    let mut text = serde_json::to_string_pretty(&vectors()).expect("encode");
    text.push('\n');
    let path = vectors_path();
    if std::env::var_os("ULTRASYNC_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &text).expect("write vectors");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "{} is out of date with shared::state; regenerate it with \
         `ULTRASYNC_BLESS=1 cargo test -p ultrasync-shared --test ts_vectors`",
        path.display()
    );
}
