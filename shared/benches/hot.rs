//! The per-op hot path, in isolation: decode a command, validate it, apply it, encode
//! it for fan-out, and the state digest. `cargo bench -p ultrasync-shared`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use ultrasync_shared::namespaces::{NamespaceConfig, Namespaces};
use ultrasync_shared::op::{CommandEnvelope, Op, OpType};
use ultrasync_shared::protocol::encode_ops_frame;
use ultrasync_shared::snapshot::Snapshot;
use ultrasync_shared::state::{self, NamespaceState};
use ultrasync_shared::validate_key;

fn command_json() -> String {
    json!({
        "org_id": "acme", "project_id": "web", "namespace": "todos", "actor_id": "alice",
        "client_id": "tab-1", "command_id": "c-123456", "key": "todo:42",
        "op_type": "set", "payload": {"title": "buy milk", "done": false, "tags": ["home", "errand"]},
        "reply_to": "usync.reply.g1.s1"
    })
    .to_string()
}

fn op(seq: u64) -> Op {
    Op {
        op_id: format!("{seq:032x}"),
        org_id: "acme".into(),
        project_id: "web".into(),
        namespace: "todos".into(),
        actor_id: "alice".into(),
        client_id: "tab-1".into(),
        command_id: format!("c-{seq}"),
        server_seq: seq,
        hlc_ts: "7297000000000000000".into(),
        key: format!("todo:{}", seq % 1000),
        op_type: if seq.is_multiple_of(3) {
            OpType::Patch
        } else {
            OpType::Set
        },
        payload: json!({"title": "buy milk", "done": seq.is_multiple_of(2), "n": seq}),
        precondition: None,
    }
}

fn hot(c: &mut Criterion) {
    let text = command_json();
    c.bench_function("decode command", |b| {
        b.iter(|| serde_json::from_str::<CommandEnvelope>(black_box(&text)).expect("decode"))
    });

    let namespaces = Namespaces::new(&[NamespaceConfig {
        name: "todos".into(),
        mode: ultrasync_shared::namespaces::Mode::Lww,
        schema: Some(json!({"type": "object", "required": ["title"],
            "properties": {"title": {"type": "string"}, "done": {"type": "boolean"}}})),
        schema_file: None,
        max_value_bytes: Some(65536),
    }])
    .expect("namespaces");
    let cmd: CommandEnvelope = serde_json::from_str(&text).expect("decode");
    c.bench_function("validate command (ids, key, size, schema)", |b| {
        b.iter(|| {
            let spec = namespaces.get(black_box(&cmd.namespace)).expect("spec");
            validate_key(&cmd.key).expect("key");
            let size = serde_json::to_vec(&cmd.payload).map_or(0, |v| v.len());
            assert!(size <= spec.max_value_bytes);
            spec.check_schema(&cmd.payload).expect("schema");
        })
    });

    let ops: Vec<Op> = (1..=10_000).map(op).collect();
    c.bench_function("apply 10,000 ops (set/patch over 1,000 keys)", |b| {
        b.iter(|| {
            let mut st = NamespaceState::default();
            for o in &ops {
                state::apply(&mut st, o).expect("apply");
            }
            st
        })
    });

    let bodies: Vec<Vec<u8>> = ops[..100]
        .iter()
        .map(|o| serde_json::to_vec(o).expect("encode"))
        .collect();
    c.bench_function("encode an ops frame of 100 stored ops", |b| {
        b.iter(|| encode_ops_frame("todos", 1, bodies.iter().map(|v| v.as_slice())))
    });
    // What zstd would buy on catch-up: the ratio of a 100-op frame, and its cost.
    let frame = encode_ops_frame("todos", 1, bodies.iter().map(|v| v.as_slice()));
    let packed = zstd::bulk::compress(frame.as_bytes(), 1).expect("zstd");
    eprintln!(
        "a 100-op ops frame: {} bytes, zstd level 1: {} bytes (ratio {:.1})",
        frame.len(),
        packed.len(),
        frame.len() as f64 / packed.len() as f64
    );
    c.bench_function("zstd level 1 of a 100-op frame", |b| {
        b.iter(|| zstd::bulk::compress(black_box(frame.as_bytes()), 1).expect("zstd"))
    });
    c.bench_function("encode one op (JSON)", |b| {
        b.iter(|| serde_json::to_vec(black_box(&ops[7])).expect("encode"))
    });

    let mut st = NamespaceState::default();
    for o in &ops {
        state::apply(&mut st, o).expect("apply");
    }
    c.bench_function("digest of a 1,000-key state", |b| {
        b.iter(|| state::digest(black_box(&st)))
    });

    // A snapshot as the materializer writes one: 20,000 keys and the commands of
    // the newest ops.
    let mut st = NamespaceState::default();
    for seq in 1..=20_000 {
        let mut o = op(seq);
        o.key = format!("todo:{seq}");
        state::apply(&mut st, &o).expect("apply");
    }
    let snap = Snapshot {
        stream_key: "acme/web/todos".into(),
        head_stream_seq: 20_000,
        commands: (1..=4096u64)
            .map(|s| (format!("{s:032x}"), (format!("{s:032x}"), s)))
            .collect(),
        op_ids: Default::default(),
        state: st,
    };
    eprintln!("a 20,000-key snapshot: {} bytes", snap.encode().len());
    c.bench_function("encode a 20,000-key snapshot", |b| {
        b.iter(|| black_box(&snap).encode())
    });
}

criterion_group!(benches, hot);
criterion_main!(benches);
