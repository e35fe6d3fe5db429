//! The materialized state in RocksDB, and the one writer that applies ops to it.
//!
//! Keys (one column family; `sk` is `org/project/ns`, which never holds a NUL):
//!
//! ```text
//! A                 → applied position: stream sequence of the last USYNC_OPS
//!                     message taken from the consumer (u64 BE)
//! H{sk}             → the stream key's head: last_seq, head_stream_seq (u64 BE each)
//! K{sk}\0{key}      → one key's entry (see `encode_entry`)
//! C{sk}\0{cmd}      → server_seq (u64 BE) and op id of the op a command made; `cmd`
//!                     is the hex of its command key (for snapshots: a retry after a
//!                     take-over gets its answer, a reused command id is refused)
//! O{sk}\0{op_id}    → server_seq of an op whose command key is not known (written by
//!                     older versions; read into snapshots, never written now)
//! ```
//!
//! Every apply is one `WriteBatch` holding the changed entries, the op ids, the heads
//! and the applied position, so after a crash at any point the store is at some batch
//! boundary and the consumer restarts right after it: nothing lost, nothing applied
//! twice. The WAL is written without fsync: a killed process loses nothing written;
//! an OS crash may lose the newest batches, and with them their position, so they are
//! read from the log again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use automerge::Automerge;
use rocksdb::{DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch};
use serde_json::Value;
use tracing::warn;
use ultrasync_shared::StreamKey;
use ultrasync_shared::log::LogEntry;
use ultrasync_shared::snapshot::Snapshot;
use ultrasync_shared::state::{self, ApplyError, KeyEntry, NamespaceState};

const APPLIED: &[u8] = b"A";
/// crdt documents kept loaded between batches (loading one is O(document)).
const DOC_CACHE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    #[error("op {server_seq} of {stream_key} cannot be decoded: {why}")]
    BadOp {
        stream_key: String,
        server_seq: u64,
        why: String,
    },
}

/// Where a stream key's state stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyHead {
    pub last_seq: u64,
    /// Stream sequence of the op at `last_seq`.
    pub head_stream_seq: u64,
}

/// Ops of a stream key are missing before `got`: the caller fills `expected..got`
/// from the log (or a snapshot) and applies the rest again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub stream_key: StreamKey,
    pub expected: u64,
    pub got: u64,
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries consumed (applied or skipped as already applied), from the front.
    pub taken: usize,
    /// Ops newly applied, per stream key.
    pub per_key: HashMap<StreamKey, u64>,
    /// Set when the entry at `taken` is ahead of its stream key's head.
    pub gap: Option<Gap>,
}

pub struct Store {
    db: DB,
}

fn sk_bytes(key: &StreamKey) -> Vec<u8> {
    key.to_string().into_bytes()
}

fn prefixed(tag: u8, key: &StreamKey, rest: Option<&[u8]>) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend(sk_bytes(key));
    if let Some(rest) = rest {
        k.push(0);
        k.extend_from_slice(rest);
    }
    k
}

fn head_key(key: &StreamKey) -> Vec<u8> {
    prefixed(b'H', key, None)
}

fn entry_key(key: &StreamKey, name: &str) -> Vec<u8> {
    prefixed(b'K', key, Some(name.as_bytes()))
}

fn op_id_key(key: &StreamKey, op_id: &str) -> Vec<u8> {
    prefixed(b'O', key, Some(op_id.as_bytes()))
}

fn command_key(key: &StreamKey, command: &str) -> Vec<u8> {
    prefixed(b'C', key, Some(command.as_bytes()))
}

/// `server_seq` (u64 BE), then the op id.
fn encode_command(server_seq: u64, op_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + op_id.len());
    v.extend_from_slice(&server_seq.to_be_bytes());
    v.extend_from_slice(op_id.as_bytes());
    v
}

/// `[from, to)` covering every `tag{sk}\0…` key.
fn range(tag: u8, key: &StreamKey) -> (Vec<u8>, Vec<u8>) {
    let mut from = prefixed(tag, key, None);
    let mut to = from.clone();
    from.push(0);
    to.push(1);
    (from, to)
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, StoreError> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("{} bytes where a u64 was due", bytes.len())))
}

fn encode_head(h: KeyHead) -> Vec<u8> {
    let mut v = h.last_seq.to_be_bytes().to_vec();
    v.extend(h.head_stream_seq.to_be_bytes());
    v
}

fn decode_head(bytes: &[u8]) -> Result<KeyHead, StoreError> {
    Ok(KeyHead {
        last_seq: u64_at(bytes, 0)?,
        head_stream_seq: u64_at(bytes, 8)?,
    })
}

/// `version (u64 BE) | doc length (u32 BE) | Automerge::save() | value JSON`.
fn encode_entry(e: &KeyEntry) -> Vec<u8> {
    let doc = e.doc.as_ref().map(|d| d.save()).unwrap_or_default();
    let mut v = e.version.to_be_bytes().to_vec();
    v.extend((doc.len() as u32).to_be_bytes());
    v.extend(doc);
    v.extend(serde_json::to_vec(&e.value).unwrap_or_default());
    v
}

fn decode_entry(bytes: &[u8]) -> Result<KeyEntry, StoreError> {
    let version = u64_at(bytes, 0)?;
    let doc_len = bytes
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("entry header".into()))? as usize;
    let doc_bytes = bytes
        .get(12..12 + doc_len)
        .ok_or_else(|| StoreError::Corrupt("entry document".into()))?;
    let doc = if doc_len == 0 {
        None
    } else {
        Some(Box::new(
            Automerge::load(doc_bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        ))
    };
    let value: Value = serde_json::from_slice(&bytes[12 + doc_len..])
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(KeyEntry {
        value,
        version,
        doc,
    })
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Corrupt(format!("creating {}: {e}", dir.display())))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        Ok(Self {
            db: DB::open(&opts, dir)?,
        })
    }

    /// Stream sequence of the last consumer message applied (0 = none).
    pub fn applied(&self) -> Result<u64, StoreError> {
        match self.db.get(APPLIED)? {
            Some(b) => u64_at(&b, 0),
            None => Ok(0),
        }
    }

    pub fn head(&self, key: &StreamKey) -> Result<KeyHead, StoreError> {
        match self.db.get(head_key(key))? {
            Some(b) => decode_head(&b),
            None => Ok(KeyHead::default()),
        }
    }

    /// Every stream key held, with its head.
    pub fn stream_keys(&self) -> Result<Vec<(StreamKey, KeyHead)>, StoreError> {
        let mut out = Vec::new();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(b"I".to_vec());
        for item in self
            .db
            .iterator_opt(IteratorMode::From(b"H", Direction::Forward), opts)
        {
            let (k, v) = item?;
            let text = String::from_utf8_lossy(&k[1..]).into_owned();
            let mut parts = text.splitn(3, '/');
            let key = match (parts.next(), parts.next(), parts.next()) {
                (Some(o), Some(p), Some(n)) => StreamKey::parse(o, p, n).ok(),
                _ => None,
            };
            match key {
                Some(key) => out.push((key, decode_head(&v)?)),
                None => return Err(StoreError::Corrupt(format!("head key {text:?}"))),
            }
        }
        Ok(out)
    }

    /// One key's entry, and the stream key's `last_seq` it is as of.
    pub fn entry(
        &self,
        key: &StreamKey,
        name: &str,
    ) -> Result<(u64, Option<KeyEntry>), StoreError> {
        let snap = self.db.snapshot();
        let head = match snap.get(head_key(key))? {
            Some(b) => decode_head(&b)?,
            None => KeyHead::default(),
        };
        let entry = match snap.get(entry_key(key, name))? {
            Some(b) => Some(decode_entry(&b)?),
            None => None,
        };
        Ok((head.last_seq, entry))
    }

    /// The whole state of a stream key and every command it remembers, read at one
    /// point in time.
    pub fn snapshot(&self, key: &StreamKey) -> Result<Snapshot, StoreError> {
        self.snapshot_for_log(key, 1)
    }

    /// The state of a stream key with the commands of the ops from `first_in_log`
    /// (the oldest op the log still holds) and of the newest
    /// [`RECENT_COMMANDS`](ultrasync_shared::snapshot::RECENT_COMMANDS): older ones
    /// were compacted, and the compactor wrote them to `usync-commands` before it
    /// purged them. Their records are deleted here, so the store and the snapshot
    /// stay the size of the live state and the log.
    pub fn snapshot_for_log(
        &self,
        key: &StreamKey,
        first_in_log: u64,
    ) -> Result<Snapshot, StoreError> {
        let snap = self.db.snapshot();
        let head = match snap.get(head_key(key))? {
            Some(b) => decode_head(&b)?,
            None => KeyHead::default(),
        };
        let mut keys = BTreeMap::new();
        let (from, to) = range(b'K', key);
        let skip = from.len();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to);
        for item in snap.iterator_opt(IteratorMode::From(&from, Direction::Forward), opts) {
            let (k, v) = item?;
            let name = String::from_utf8(k[skip..].to_vec())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            keys.insert(name, decode_entry(&v)?);
        }
        let keep_from = first_in_log.min(
            head.last_seq
                .saturating_sub(ultrasync_shared::snapshot::RECENT_COMMANDS)
                + 1,
        );
        let mut stale = WriteBatch::default();
        let mut commands = BTreeMap::new();
        let (from, to) = range(b'C', key);
        let skip = from.len();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to);
        for item in snap.iterator_opt(IteratorMode::From(&from, Direction::Forward), opts) {
            let (k, v) = item?;
            let command = String::from_utf8(k[skip..].to_vec())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let op_id = String::from_utf8(v.get(8..).unwrap_or_default().to_vec())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let seq = u64_at(&v, 0)?;
            if seq < keep_from {
                stale.delete(&k);
                continue;
            }
            commands.insert(command, (op_id, seq));
        }
        let mut op_ids = BTreeMap::new();
        let (from, to) = range(b'O', key);
        let skip = from.len();
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to);
        for item in snap.iterator_opt(IteratorMode::From(&from, Direction::Forward), opts) {
            let (k, v) = item?;
            let id = String::from_utf8(k[skip..].to_vec())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let seq = u64_at(&v, 0)?;
            if seq < keep_from {
                stale.delete(&k);
                continue;
            }
            op_ids.insert(id, seq);
        }
        if !stale.is_empty() {
            self.db.write(stale)?;
        }
        Ok(Snapshot {
            stream_key: key.to_string(),
            head_stream_seq: head.head_stream_seq,
            state: NamespaceState {
                last_seq: head.last_seq,
                keys,
            },
            commands,
            op_ids,
        })
    }
}

/// The single writer: applies ops in order, keeping crdt documents loaded.
pub struct Applier {
    store: std::sync::Arc<Store>,
    heads: HashMap<StreamKey, KeyHead>,
    docs: HashMap<(StreamKey, String), KeyEntry>,
}

impl Applier {
    pub fn new(store: std::sync::Arc<Store>) -> Self {
        Self {
            store,
            heads: HashMap::new(),
            docs: HashMap::new(),
        }
    }

    pub fn store(&self) -> &std::sync::Arc<Store> {
        &self.store
    }

    pub(crate) fn head(&mut self, key: &StreamKey) -> Result<KeyHead, StoreError> {
        if let Some(h) = self.heads.get(key) {
            return Ok(*h);
        }
        let h = self.store.head(key)?;
        self.heads.insert(key.clone(), h);
        Ok(h)
    }

    fn current(
        &self,
        overlay: &HashMap<(StreamKey, String), Option<KeyEntry>>,
        key: &StreamKey,
        name: &str,
    ) -> Result<Option<KeyEntry>, StoreError> {
        let id = (key.clone(), name.to_owned());
        if let Some(e) = overlay.get(&id) {
            return Ok(e.clone());
        }
        if let Some(e) = self.docs.get(&id) {
            return Ok(Some(e.clone()));
        }
        match self.store.db.get(entry_key(key, name))? {
            Some(b) => Ok(Some(decode_entry(&b)?)),
            None => Ok(None),
        }
    }

    /// Applies `entries` (each with its stream key) in order, in one atomic write, up
    /// to the first gap. With `record_position` the stream sequence of the last entry
    /// taken is stored as the consumer position (not for ops read from the log to
    /// fill a gap: those lie behind it).
    pub fn apply(
        &mut self,
        entries: &[(StreamKey, LogEntry)],
        record_position: bool,
    ) -> Result<Applied, StoreError> {
        let mut out = Applied::default();
        let mut overlay: HashMap<(StreamKey, String), Option<KeyEntry>> = HashMap::new();
        let mut heads: HashMap<StreamKey, KeyHead> = HashMap::new();
        let mut batch = WriteBatch::default();
        let mut last_position = None;
        for (key, entry) in entries {
            let mut head = match heads.get(key) {
                Some(h) => *h,
                None => self.head(key)?,
            };
            if entry.server_seq <= head.last_seq {
                // Already applied (redelivery, or a gap fill that overlapped).
            } else if entry.server_seq != head.last_seq + 1 {
                out.gap = Some(Gap {
                    stream_key: key.clone(),
                    expected: head.last_seq + 1,
                    got: entry.server_seq,
                });
                break;
            } else {
                let op = entry.op().map_err(|e| StoreError::BadOp {
                    stream_key: key.to_string(),
                    server_seq: entry.server_seq,
                    why: e.to_string(),
                })?;
                let current = self.current(&overlay, key, &op.key)?;
                match state::next_entry(current.as_ref(), op.op_type, &op.payload, op.server_seq) {
                    Ok(next) => {
                        overlay.insert((key.clone(), op.key.clone()), next);
                    }
                    Err(ApplyError::InvalidOp(why)) => {
                        // Committed ops always apply; if one does not, the sequencer
                        // skipped it the same way, so state stays equal.
                        warn!(stream_key = %key, seq = op.server_seq, %why, "a committed op does not apply; skipped");
                    }
                    Err(e) => {
                        return Err(StoreError::BadOp {
                            stream_key: key.to_string(),
                            server_seq: op.server_seq,
                            why: e.to_string(),
                        });
                    }
                }
                let command = ultrasync_shared::op::command_key_hex(&op.actor_id, &op.command_id);
                batch.put(
                    command_key(key, &command),
                    encode_command(entry.server_seq, &entry.op_id),
                );
                head = KeyHead {
                    last_seq: entry.server_seq,
                    head_stream_seq: entry.stream_seq,
                };
                heads.insert(key.clone(), head);
                *out.per_key.entry(key.clone()).or_default() += 1;
            }
            last_position = Some(entry.stream_seq);
            out.taken += 1;
        }
        for ((key, name), entry) in &overlay {
            match entry {
                Some(e) => batch.put(entry_key(key, name), encode_entry(e)),
                None => batch.delete(entry_key(key, name)),
            }
        }
        for (key, head) in &heads {
            batch.put(head_key(key), encode_head(*head));
        }
        if let (true, Some(p)) = (record_position, last_position) {
            let p = p.max(self.store.applied()?);
            batch.put(APPLIED, p.to_be_bytes());
        }
        if !batch.is_empty() {
            self.store.db.write(batch)?;
        }
        self.heads.extend(heads);
        if self.docs.len() > DOC_CACHE {
            self.docs.clear();
        }
        for ((key, name), entry) in overlay {
            match entry {
                Some(e) if e.doc.is_some() => {
                    self.docs.insert((key, name), e);
                }
                _ => {
                    self.docs.remove(&(key, name));
                }
            }
        }
        Ok(out)
    }

    /// Replaces a stream key's state with `snapshot` (its log before the snapshot is
    /// gone, so the snapshot is where it starts).
    pub fn install(&mut self, key: &StreamKey, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for tag in [b'K', b'O', b'C'] {
            let (from, to) = range(tag, key);
            batch.delete_range(from, to);
        }
        for (name, e) in &snapshot.state.keys {
            batch.put(entry_key(key, name), encode_entry(e));
        }
        for (id, seq) in &snapshot.op_ids {
            batch.put(op_id_key(key, id), seq.to_be_bytes());
        }
        for (command, (id, seq)) in &snapshot.commands {
            batch.put(command_key(key, command), encode_command(*seq, id));
        }
        let head = KeyHead {
            last_seq: snapshot.state.last_seq,
            head_stream_seq: snapshot.head_stream_seq,
        };
        batch.put(head_key(key), encode_head(head));
        self.store.db.write(batch)?;
        self.heads.insert(key.clone(), head);
        self.docs.retain(|(k, _), _| k != key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ultrasync_shared::op::{Op, OpType};

    fn entry(key: &StreamKey, seq: u64, name: &str, op_type: OpType, payload: Value) -> LogEntry {
        let op = Op {
            op_id: format!("id{seq}"),
            org_id: key.org.to_string(),
            project_id: key.project.to_string(),
            namespace: key.namespace.to_string(),
            actor_id: "a".into(),
            client_id: "c".into(),
            command_id: format!("c{seq}"),
            server_seq: seq,
            hlc_ts: "1".into(),
            key: name.into(),
            op_type,
            payload,
            precondition: None,
        };
        LogEntry {
            stream_seq: seq * 10,
            server_seq: seq,
            op_id: op.op_id.clone(),
            payload: serde_json::to_vec(&op).expect("encode").into(),
        }
    }

    #[test]
    fn applies_in_order_stops_at_gaps_and_skips_duplicates() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = std::sync::Arc::new(Store::open(dir.path()).expect("open"));
        let mut applier = Applier::new(store.clone());
        let k = StreamKey::parse("o", "p", "n").expect("key");
        let e = |seq, name: &str, t, p| (k.clone(), entry(&k, seq, name, t, p));
        let ops = vec![
            e(1, "a", OpType::Set, serde_json::json!({"x": 1})),
            e(2, "a", OpType::Patch, serde_json::json!({"y": 2})),
            e(3, "b", OpType::Set, serde_json::json!(3)),
            e(4, "b", OpType::Del, Value::Null),
        ];
        let done = applier.apply(&ops, true).expect("apply");
        assert_eq!(done.taken, 4);
        assert!(done.gap.is_none());
        assert_eq!(store.applied().expect("applied"), 40);
        // A redelivery changes nothing; a jump is a gap.
        let again = applier
            .apply(&[ops[3].clone(), e(6, "c", OpType::Set, Value::Null)], true)
            .expect("apply");
        assert_eq!(again.taken, 1);
        assert_eq!(
            again.gap,
            Some(Gap {
                stream_key: k.clone(),
                expected: 5,
                got: 6
            })
        );
        let snap = store.snapshot(&k).expect("snapshot");
        let mut model = NamespaceState::default();
        for (_, le) in &ops {
            state::apply(&mut model, &le.op().expect("op")).expect("apply");
        }
        assert_eq!(snap.state, model);
        assert_eq!(snap.head_stream_seq, 40);
        assert_eq!(snap.commands.len(), 4);
        let first = ultrasync_shared::op::command_key_hex("a", "c1");
        assert_eq!(snap.commands[&first], ("id1".to_owned(), 1));
        // Reopened, the same.
        drop(applier);
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            state::digest(&store.snapshot(&k).expect("s").state),
            state::digest(&model)
        );
        assert_eq!(
            store.stream_keys().expect("keys"),
            vec![(
                k.clone(),
                KeyHead {
                    last_seq: 4,
                    head_stream_seq: 40
                }
            )]
        );
    }
}
