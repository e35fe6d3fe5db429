//! The entry points of the cargo-fuzz targets in `fuzz/` (the WebSocket frame decoder,
//! the command checks, the snapshot decoder, Automerge change admission), run here as
//! short seeded property tests over random and mutated valid inputs: none may panic,
//! and every answer stays bounded. Every input that once crashed or hurt the server
//! is kept in `tests/crash_inputs/` and replayed by [`crash_inputs_replay`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ROOT};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use ultrasync_shared::admission::{self, Limits, test_support};
use ultrasync_shared::protocol::ClientMessage;
use ultrasync_shared::snapshot::{self, Snapshot};
use ultrasync_shared::state::{self, NamespaceState};
use ultrasync_shared::{ErrorCode, Op, OpType};

/// Each property runs at most this long (and this many cases).
const BUDGET: Duration = Duration::from_secs(3);
const CASES: u32 = 2000;

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        rng_seed: RngSeed::Fixed(0x0075_6c74_7261),
        failure_persistence: None,
        ..Config::default()
    })
}

/// One edit of a valid input: flip, insert, delete or truncate at a position.
fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 0..6)
}

fn mutate(base: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(kind, pos, byte) in edits {
        if v.is_empty() {
            v.push(byte);
            continue;
        }
        let at = pos % v.len();
        match kind {
            0 => v[at] ^= byte | 1,
            1 => v.insert(at, byte),
            2 => {
                v.remove(at);
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// Random bytes or a mutated seed.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (prop::sample::select(seeds), edits()).prop_map(|(s, e)| mutate(&s, &e)),
    ]
}

fn run(name: &str, strategy: impl Strategy<Value = Vec<u8>>, check: impl Fn(&[u8])) {
    let start = Instant::now();
    let mut runner = runner();
    let result = runner.run(&strategy, |input| {
        if start.elapsed() < BUDGET {
            check(&input);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

fn change_bytes(doc: &mut AutoCommit) -> Vec<u8> {
    doc.commit();
    doc.get_last_local_change()
        .map(|c| c.raw_bytes().to_vec())
        .unwrap_or_default()
}

fn seed_changes() -> Vec<Vec<u8>> {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "title", "x").expect("put");
    let list = doc.put_object(ROOT, "items", ObjType::List).expect("list");
    doc.insert(&list, 0, 1).expect("insert");
    vec![
        change_bytes(&mut doc),
        test_support::compressed_change(20_000),
        test_support::compressed_bomb(1024 * 1024),
    ]
}

fn seed_frames() -> Vec<Vec<u8>> {
    let change = B64.encode(&seed_changes()[0]);
    [
        json!({"type": "hello", "protocol": 1, "org_id": "o", "project_id": "p", "client_id": "c", "cursors": {"index": 3, "collab": null}}),
        json!({"type": "subscribe", "namespace": "index", "last_server_seq": 2}),
        json!({"type": "command", "command_id": "c1", "namespace": "index", "key": "k", "op_type": "set", "payload": {"a": [1, 2, {"b": null}]}}),
        json!({"type": "command", "command_id": "c2", "namespace": "settings", "key": "k", "op_type": "patch", "payload": {"a": 1}, "precondition": {"expected_version": 0}}),
        json!({"type": "command", "command_id": "c3", "namespace": "collab", "key": "d", "op_type": "crdt_op", "payload": {"change": change}}),
        json!({"type": "command", "command_id": "c4", "namespace": "index", "key": "k", "op_type": "set", "payload": nested(70)}),
        json!({"type": "presence", "key": "cursor", "payload": {"x": 1}}),
        json!({"type": "ping", "nonce": 7}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

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
        hlc_ts: "1".into(),
        key: key.into(),
        op_type,
        payload,
        precondition: None,
    }
}

fn sample_snapshot(deep: usize) -> Snapshot {
    let mut st = NamespaceState::default();
    let change = json!({"change": B64.encode(&seed_changes()[0])});
    for (i, (t, k, p)) in [
        (OpType::Set, "a", json!({"n": 1})),
        (OpType::Set, "deep", nested(deep)),
        (OpType::CrdtOp, "d", change),
    ]
    .into_iter()
    .enumerate()
    {
        state::apply(&mut st, &op(i as u64 + 1, k, t, p)).expect("apply");
    }
    Snapshot {
        stream_key: "o/p/n".into(),
        head_stream_seq: 3,
        state: st,
        op_ids: [("legacy1".to_owned(), 1)].into(),
        commands: [("c1".to_owned(), ("id1".to_owned(), 1))].into(),
    }
}

/// A blob around an arbitrary body, with a correct header and checksum, so the
/// decoder's body parsing is what gets exercised.
fn blob_around(json: &[u8]) -> Vec<u8> {
    let compressed = zstd::encode_all(json, 1).expect("zstd");
    let mut out = Vec::new();
    out.extend_from_slice(snapshot::MAGIC);
    out.extend_from_slice(&snapshot::VERSION.to_le_bytes());
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(compressed.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&compressed));
    out.extend_from_slice(&compressed);
    out
}

fn body_of(blob: &[u8]) -> Vec<u8> {
    zstd::decode_all(&blob[48..]).expect("body")
}

fn check_frame(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let _ = ClientMessage::decode(text);
    if let Err(code) = admission::fuzz_command_frame(text) {
        assert!(
            matches!(
                code,
                ErrorCode::InvalidMessage | ErrorCode::InvalidOp | ErrorCode::PayloadTooLarge
            ),
            "{code}"
        );
    }
}

fn check_change(input: &[u8]) {
    match admission::fuzz_change(input) {
        Ok(ops) => assert!(ops <= Limits::default().max_change_ops),
        Err(code) => assert!(
            matches!(code, ErrorCode::InvalidOp | ErrorCode::PayloadTooLarge),
            "{code}"
        ),
    }
}

fn check_snapshot(input: &[u8]) {
    if let Ok(keys) = snapshot::fuzz_decode(input) {
        // Every key is at least a few bytes of the (compressed) input.
        assert!(keys <= 64 * 1024 * 1024);
    }
}

#[test]
fn frame_decoder_and_command_checks() {
    run("frames", inputs(seed_frames()), check_frame);
}

#[test]
fn change_admission() {
    run("changes", inputs(seed_changes()), check_change);
}

#[test]
fn snapshot_decoder() {
    let blob = sample_snapshot(10).encode();
    let body = body_of(&blob);
    // Mutated blobs (mostly refused by the checksum) and mutated bodies wrapped in a
    // sound header (the JSON and the documents inside get parsed).
    run("snapshot blobs", inputs(vec![blob]), check_snapshot);
    run(
        "snapshot bodies",
        (Just(body), edits()).prop_map(|(b, e)| blob_around(&mutate(&b, &e))),
        check_snapshot,
    );
}

#[test]
fn the_deepest_admitted_value_round_trips_and_older_deeper_ones_still_load() {
    let limits = Limits::default();
    let deepest = nested(limits.max_value_depth);
    assert!(admission::check_value(&deepest, &limits).is_ok());
    let s = sample_snapshot(limits.max_value_depth);
    let back = Snapshot::decode(&s.encode()).expect("decodes");
    assert_eq!(back, s);
    // 126 deep: refused at admission now; a snapshot holding one (written before the
    // limit existed) still decodes, with the same digest.
    assert_eq!(
        admission::check_value(&nested(126), &limits).map_err(|e| e.0),
        Err(ErrorCode::PayloadTooLarge)
    );
    let old = sample_snapshot(126);
    let blob = old.encode();
    // Read whole, the body nests past serde_json's limit (what made such a key
    // unreadable before values were read raw).
    assert!(serde_json::from_slice::<Value>(&body_of(&blob)).is_err());
    let back = Snapshot::decode(&blob).expect("decodes");
    assert_eq!(back.digest(), old.digest());
    assert_eq!(back.state.keys["deep"].value, nested(126));
}

/// The expected answer of each kept input; files not listed only must not panic.
fn expected(kind: &str, name: &str) -> Option<Result<(), ErrorCode>> {
    Some(match (kind, name) {
        ("change", "bomb-150mib.bin") | ("change", "too-many-ops.bin") => {
            Err(ErrorCode::PayloadTooLarge)
        }
        ("change", "bad-chunk-length.bin") | ("change", "document-chunk.bin") => {
            Err(ErrorCode::InvalidOp)
        }
        ("frame", "deep-126.json") | ("frame", "crdt-bomb.json") => Err(ErrorCode::PayloadTooLarge),
        ("frame", "deep-200.json") => Err(ErrorCode::InvalidMessage),
        ("snapshot", "deep-126.usnp") => Ok(()),
        ("snapshot", "truncated-header.usnp") | ("snapshot", "truncated-body.usnp") => {
            Err(ErrorCode::Unavailable)
        }
        _ => return None,
    })
}

fn crash_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crash_inputs")
}

/// What the entry point of `kind` makes of `bytes` (checking its invariants too).
fn answer(kind: &str, bytes: &[u8]) -> Result<(), ErrorCode> {
    match kind {
        "frame" => {
            check_frame(bytes);
            admission::fuzz_command_frame(std::str::from_utf8(bytes).unwrap_or("")).map(drop)
        }
        "change" => {
            check_change(bytes);
            admission::fuzz_change(bytes).map(drop)
        }
        _ => {
            check_snapshot(bytes);
            snapshot::fuzz_decode(bytes)
                .map(drop)
                .map_err(|_| ErrorCode::Unavailable)
        }
    }
}

#[test]
fn crash_inputs_replay() {
    let mut replayed = 0;
    for kind in ["frame", "change", "snapshot"] {
        let dir = crash_dir().join(kind);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("{} is missing", dir.display());
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            let bytes = std::fs::read(&path).expect("read");
            let got = answer(kind, &bytes);
            if let Some(want) = expected(kind, &name) {
                assert_eq!(got, want, "{kind}/{name}");
            }
            replayed += 1;
        }
    }
    assert!(replayed >= 10, "only {replayed} inputs");
}

/// The kept inputs are made here: regenerated on every run, each must get the answer
/// its kept copy gets and have a kept copy; `ULTRASYNC_BLESS=1` rewrites the copies
/// (when adding one; Automerge changes carry random actor ids, so the bytes differ
/// from run to run while the answers do not).
#[test]
fn kept_inputs_are_made_here_and_answer_alike() {
    let bless = std::env::var_os("ULTRASYNC_BLESS").is_some();
    let mut made = 0;
    let mut write = |kind: &str, name: &str, bytes: &[u8]| {
        let dir = crash_dir().join(kind);
        if bless {
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join(name), bytes).expect("write");
        }
        assert!(
            dir.join(name).exists(),
            "{kind}/{name} is not kept; run with ULTRASYNC_BLESS=1"
        );
        if let Some(want) = expected(kind, name) {
            assert_eq!(answer(kind, bytes), want, "{kind}/{name} as made now");
        }
        made += 1;
    };
    let bomb = test_support::compressed_bomb(150 * 1024 * 1024);
    write("change", "bomb-150mib.bin", &bomb);
    // One op per character: a text splice past max_change_ops.
    let mut doc = AutoCommit::new();
    let text = doc.put_object(ROOT, "t", ObjType::Text).expect("text");
    doc.splice_text(
        &text,
        0,
        0,
        &"a".repeat(Limits::default().max_change_ops + 1),
    )
    .expect("splice");
    write(
        "change",
        "too-many-ops.bin",
        &test_support::compress_chunk(&change_bytes(&mut doc)),
    );
    let mut bad = seed_changes()[0].clone();
    bad[9] = 0x7f;
    write("change", "bad-chunk-length.bin", &bad);
    let mut d = AutoCommit::new();
    d.put(ROOT, "x", 1).expect("put");
    write("change", "document-chunk.bin", &d.save());
    write(
        "change",
        "compressed-ok.bin",
        &test_support::compressed_change(20_000),
    );
    let frame = |payload: Value, op_type: &str| {
        json!({"type": "command", "command_id": "c", "namespace": "collab", "key": "k", "op_type": op_type, "payload": payload})
            .to_string()
    };
    write(
        "frame",
        "deep-126.json",
        frame(nested(126), "set").as_bytes(),
    );
    write(
        "frame",
        "deep-200.json",
        format!(
            r#"{{"type":"command","command_id":"c","namespace":"index","key":"k","op_type":"set","payload":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        )
        .as_bytes(),
    );
    write(
        "frame",
        "crdt-bomb.json",
        frame(json!({"change": B64.encode(&bomb)}), "crdt_op").as_bytes(),
    );
    write(
        "frame",
        "many-cursors.json",
        json!({"type": "hello", "protocol": 1, "org_id": "o", "project_id": "p", "client_id": "c",
               "cursors": (0..2000).map(|i| (format!("ns{i}"), json!(null))).collect::<serde_json::Map<_, _>>()})
            .to_string()
            .as_bytes(),
    );
    let deep = sample_snapshot(126).encode();
    write("snapshot", "deep-126.usnp", &deep);
    write("snapshot", "truncated-header.usnp", &deep[..20]);
    write("snapshot", "truncated-body.usnp", &deep[..deep.len() / 2]);
    assert!(made >= 10, "only {made} inputs made");
}
