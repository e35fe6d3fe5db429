//! The materializer's write path, in isolation: an apply of a log message's ops to
//! RocksDB (entries, heads, command records; one write batch). `cargo bench -p
//! ultrasync-materializer`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use ultrasync_materializer::store::{Applier, Store};
use ultrasync_shared::StreamKey;
use ultrasync_shared::log::LogEntry;
use ultrasync_shared::op::{Op, OpType};

/// Ops per apply: what one log message of the closed loop 8 × 16 carries.
const BATCH: u64 = 12;

fn entry(key: &StreamKey, seq: u64) -> (StreamKey, LogEntry) {
    let op = Op {
        op_id: format!("{seq:032x}"),
        org_id: key.org.to_string(),
        project_id: key.project.to_string(),
        namespace: key.namespace.to_string(),
        actor_id: "alice".into(),
        client_id: "tab-1".into(),
        command_id: format!("c-{seq}"),
        server_seq: seq,
        hlc_ts: "7297000000000000000".into(),
        key: format!("todo:{}", seq % 1000),
        op_type: OpType::Set,
        payload: json!({"title": "buy milk", "done": seq.is_multiple_of(2), "n": seq}),
        precondition: None,
    };
    let payload = serde_json::to_vec(&op).map(bytes::Bytes::from);
    (
        key.clone(),
        LogEntry {
            stream_seq: seq,
            server_seq: seq,
            op_id: op.op_id,
            payload: payload.unwrap_or_default(),
        },
    )
}

fn apply(c: &mut Criterion) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let Ok(store) = Store::open(dir.path()) else {
        return;
    };
    let mut applier = Applier::new(Arc::new(store));
    let Ok(key) = StreamKey::parse("acme", "web", "todos") else {
        return;
    };
    let mut next = 1u64;
    c.bench_function("apply a log message of 12 ops (set over 1,000 keys)", |b| {
        b.iter_batched(
            || {
                let batch: Vec<_> = (next..next + BATCH).map(|s| entry(&key, s)).collect();
                next += BATCH;
                batch
            },
            |batch| black_box(applier.apply(&batch, true).map(|a| a.taken)),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, apply);
criterion_main!(benches);
