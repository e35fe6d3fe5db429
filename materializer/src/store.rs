//! The materialized state in RocksDB, and the one writer that applies ops to it.
//!
//! Keys (one column family; `sk` is `org/project/ns`, which never holds a NUL):
//!
//! ```text
//! A                 → applied position: stream sequence of the last USYNC_OPS
//!                     message taken from the consumer (u64 BE)
//! H{sk}             → the stream key's head: last_seq, head_stream_seq (u64 BE each)
//! K{sk}\0{key}      → one key's entry (see `encode_entry`)
//! S{sk}\0{seq}      → the command key (hex, length u16 BE first) and the op id of
//!                     the op at server_seq `seq` (u64 BE), for snapshots: a retry
//!                     after a take-over gets its answer, a reused command id is
//!                     refused. Keyed by `seq` so that an apply appends to the
//!                     memtable's order instead of inserting at random places, and
//!                     records below a snapshot's floor go in one range delete.
//! C{sk}\0{cmd}      → server_seq (u64 BE) and op id of the op a command made (written
//!                     by older versions; read into snapshots, never written now)
//! O{sk}\0{op_id}    → server_seq of an op whose command key is not known (written by
//!                     older versions; read into snapshots, never written now)
//! ```
//!
//! Every apply is one `WriteBatch` holding the changed entries, the commands, the
//! heads and the applied position, its keys in order, so after a crash at any point the store is at some batch
//! boundary and the consumer restarts right after it: nothing lost, nothing applied
//! twice. The WAL is written without fsync: a killed process loses nothing written;
//! an OS crash may lose the newest batches, and with them their position, so they are
//! read from the log again.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use automerge::Automerge;
use rocksdb::{DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch};
use serde_json::Value;
use tracing::warn;
use ultrasync_shared::log::LogEntry;
use ultrasync_shared::snapshot::Snapshot;
use ultrasync_shared::state::{self, ApplyError, KeyEntry, NamespaceState};
use ultrasync_shared::{OpType, StreamKey};

const APPLIED: &[u8] = b"A";
/// Entries kept loaded between batches, at most: in all, in stored bytes, and
/// crdt documents (loading one is O(document), holding one takes more than its
/// stored bytes).
const CACHE_ENTRIES: usize = 65_536;
const CACHE_BYTES: usize = 64 << 20;
const DOC_CACHE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
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

/// `tag`, the stream key as `org/project/namespace` (its `Display`), then `0` and
/// `rest`: built in one allocation, as RocksDB keys are for every op applied.
fn prefixed(tag: u8, key: &StreamKey, rest: Option<&[u8]>) -> Vec<u8> {
    let (org, project, ns) = (
        key.org.as_str().as_bytes(),
        key.project.as_str().as_bytes(),
        key.namespace.as_str().as_bytes(),
    );
    let mut k = Vec::with_capacity(
        4 + org.len() + project.len() + ns.len() + rest.map_or(0, |r| 1 + r.len()),
    );
    k.push(tag);
    k.extend_from_slice(org);
    k.push(b'/');
    k.extend_from_slice(project);
    k.push(b'/');
    k.extend_from_slice(ns);
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

fn command_key(key: &StreamKey, server_seq: u64) -> Vec<u8> {
    prefixed(b'S', key, Some(&server_seq.to_be_bytes()))
}

/// The command key's length (u16 BE), the command key, then the op id.
fn encode_command(command: &str, op_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + command.len() + op_id.len());
    v.extend_from_slice(&(command.len() as u16).to_be_bytes());
    v.extend_from_slice(command.as_bytes());
    v.extend_from_slice(op_id.as_bytes());
    v
}

/// [`encode_command`] of a command key given as its 16 bytes (written as hex in
/// place, without a `String` of its own).
fn encode_command_key(command: &[u8; 16], op_id: &str) -> Vec<u8> {
    let mut hex = [0u8; 32];
    // 16 bytes always fit 32 hex digits, and hex digits are UTF-8.
    let _ = hex::encode_to_slice(command, &mut hex);
    encode_command(std::str::from_utf8(&hex).unwrap_or_default(), op_id)
}

fn decode_command(bytes: &[u8]) -> Result<(String, String), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("command record of {} bytes", bytes.len()));
    let len = u16::from_be_bytes([
        *bytes.first().ok_or_else(corrupt)?,
        *bytes.get(1).ok_or_else(corrupt)?,
    ]) as usize;
    let command = bytes.get(2..2 + len).ok_or_else(corrupt)?;
    let op_id = bytes.get(2 + len..).ok_or_else(corrupt)?;
    let text =
        |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()));
    Ok((text(command)?, text(op_id)?))
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
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
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
        // Commands by server_seq: the ones below `keep_from` are not read, and go in
        // one range delete.
        let (from, to) = range(b'S', key);
        let floor = command_key(key, keep_from);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(floor.clone());
        if snap
            .iterator_opt(IteratorMode::From(&from, Direction::Forward), opts)
            .next()
            .transpose()?
            .is_some()
        {
            stale.delete_range(&from, &floor);
        }
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(to);
        for item in snap.iterator_opt(IteratorMode::From(&floor, Direction::Forward), opts) {
            let (k, v) = item?;
            let seq = u64_at(&k, k.len().saturating_sub(8))?;
            let (command, op_id) = decode_command(&v)?;
            commands.insert(command, (op_id, seq));
        }
        // Written by older versions: by command.
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
            commands.entry(command).or_insert((op_id, seq));
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

/// One key's entry as the applier holds it: the entry (`None`: the key does not
/// exist) and the size of its stored form, by which the cache is bounded.
struct Held {
    entry: Option<KeyEntry>,
    bytes: usize,
}

/// The entries an [`Applier`] keeps between batches, so that a key written again
/// is not read back from RocksDB (and a crdt document not loaded again, which is
/// O(document)). Bounded in entries, stored bytes and documents; past a bound it
/// starts over empty.
#[derive(Default)]
struct EntryCache {
    entries: HashMap<(StreamKey, String), (KeyEntry, usize)>,
    bytes: usize,
    docs: usize,
}

impl EntryCache {
    fn take(&mut self, id: &(StreamKey, String)) -> Option<(KeyEntry, usize)> {
        let (entry, bytes) = self.entries.remove(id)?;
        self.bytes -= bytes;
        self.docs -= usize::from(entry.doc.is_some());
        Some((entry, bytes))
    }

    fn put(&mut self, id: (StreamKey, String), entry: KeyEntry, bytes: usize) {
        if let Some((old, old_bytes)) = self.entries.remove(&id) {
            self.bytes -= old_bytes;
            self.docs -= usize::from(old.doc.is_some());
        }
        let is_doc = entry.doc.is_some();
        if self.entries.len() >= CACHE_ENTRIES
            || self.bytes + bytes > CACHE_BYTES
            || (is_doc && self.docs >= DOC_CACHE)
        {
            *self = Self::default();
        }
        self.bytes += bytes;
        self.docs += usize::from(is_doc);
        self.entries.insert(id, (entry, bytes));
    }

    fn forget_stream_key(&mut self, key: &StreamKey) {
        self.entries.retain(|(k, _), _| k != key);
        self.bytes = self.entries.values().map(|(_, b)| b).sum();
        self.docs = self
            .entries
            .values()
            .filter(|(e, _)| e.doc.is_some())
            .count();
    }
}

/// What an apply reads of an op: the fields it uses, the strings borrowed from the
/// stored JSON where they hold no escapes (the rest of the op is skipped, not
/// decoded into a whole `Op` only to be dropped).
#[derive(serde::Deserialize)]
struct Applying<'a> {
    #[serde(borrow)]
    actor_id: Cow<'a, str>,
    #[serde(borrow)]
    command_id: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    op_type: OpType,
    #[serde(default)]
    payload: Value,
    server_seq: u64,
}

/// The single writer: applies ops in order, keeping recent entries loaded.
pub struct Applier {
    store: std::sync::Arc<Store>,
    heads: HashMap<StreamKey, KeyHead>,
    cache: EntryCache,
}

impl Applier {
    pub fn new(store: std::sync::Arc<Store>) -> Self {
        Self {
            store,
            heads: HashMap::new(),
            cache: EntryCache::default(),
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

    /// A key's entry as stored, from the cache (which it leaves: the batch holds it
    /// now) or from RocksDB.
    fn load(&mut self, id: &(StreamKey, String)) -> Result<Held, StoreError> {
        if let Some((entry, bytes)) = self.cache.take(id) {
            return Ok(Held {
                entry: Some(entry),
                bytes,
            });
        }
        Ok(match self.store.db.get(entry_key(&id.0, &id.1))? {
            Some(b) => Held {
                entry: Some(decode_entry(&b)?),
                bytes: b.len(),
            },
            None => Held {
                entry: None,
                bytes: 0,
            },
        })
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
        // The entries this batch read, and whether it changed them.
        let mut overlay: HashMap<(StreamKey, String), (Held, bool)> = HashMap::new();
        let mut heads: HashMap<StreamKey, KeyHead> = HashMap::new();
        // Every key written, put in the batch in order at the end: the memtable
        // then inserts each one next to the one before.
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
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
                let op: Applying =
                    serde_json::from_slice(&entry.payload).map_err(|e| StoreError::BadOp {
                        stream_key: key.to_string(),
                        server_seq: entry.server_seq,
                        why: e.to_string(),
                    })?;
                let slot = match overlay.entry((key.clone(), op.key.to_string())) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let held = self.load(v.key())?;
                        v.insert((held, false))
                    }
                };
                match state::next_entry(
                    slot.0.entry.as_ref(),
                    op.op_type,
                    &op.payload,
                    op.server_seq,
                ) {
                    Ok(next) => {
                        slot.0.entry = next;
                        slot.1 = true;
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
                let command = ultrasync_shared::op::command_key(&op.actor_id, &op.command_id);
                writes.push((
                    command_key(key, entry.server_seq),
                    Some(encode_command_key(&command, &entry.op_id)),
                ));
                head = KeyHead {
                    last_seq: entry.server_seq,
                    head_stream_seq: entry.stream_seq,
                };
                // The stream key is cloned once per batch, not once per op.
                match heads.get_mut(key) {
                    Some(h) => *h = head,
                    None => {
                        heads.insert(key.clone(), head);
                    }
                }
                match out.per_key.get_mut(key) {
                    Some(n) => *n += 1,
                    None => {
                        out.per_key.insert(key.clone(), 1);
                    }
                }
            }
            last_position = Some(entry.stream_seq);
            out.taken += 1;
        }
        for ((key, name), (held, changed)) in overlay.iter_mut() {
            if !*changed {
                continue;
            }
            match &held.entry {
                Some(e) => {
                    let bytes = encode_entry(e);
                    held.bytes = bytes.len();
                    writes.push((entry_key(key, name), Some(bytes)));
                }
                None => writes.push((entry_key(key, name), None)),
            }
        }
        for (key, head) in &heads {
            writes.push((head_key(key), Some(encode_head(*head))));
        }
        if let (true, Some(p)) = (record_position, last_position) {
            let p = p.max(self.store.applied()?);
            writes.push((APPLIED.to_vec(), Some(p.to_be_bytes().to_vec())));
        }
        if !writes.is_empty() {
            writes.sort_by(|a, b| a.0.cmp(&b.0));
            let mut batch = WriteBatch::default();
            for (k, v) in writes {
                match v {
                    Some(v) => batch.put(k, v),
                    None => batch.delete(k),
                }
            }
            self.store.db.write(batch)?;
        }
        self.heads.extend(heads);
        for (id, (held, _)) in overlay {
            if let Some(e) = held.entry {
                self.cache.put(id, e, held.bytes);
            }
        }
        Ok(out)
    }

    /// Replaces a stream key's state with `snapshot` (its log before the snapshot is
    /// gone, so the snapshot is where it starts).
    pub fn install(&mut self, key: &StreamKey, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for tag in [b'K', b'O', b'C', b'S'] {
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
            batch.put(command_key(key, *seq), encode_command(command, id));
        }
        let head = KeyHead {
            last_seq: snapshot.state.last_seq,
            head_stream_seq: snapshot.head_stream_seq,
        };
        batch.put(head_key(key), encode_head(head));
        self.store.db.write(batch)?;
        self.heads.insert(key.clone(), head);
        self.cache.forget_stream_key(key);
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

    /// A new store in a temporary folder, its applier and the stream key `o/p/n`
    /// (the folder lives as long as the first item).
    fn fresh() -> (tempfile::TempDir, std::sync::Arc<Store>, Applier, StreamKey) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = std::sync::Arc::new(Store::open(dir.path()).expect("open"));
        let applier = Applier::new(store.clone());
        let k = StreamKey::parse("o", "p", "n").expect("key");
        (dir, store, applier, k)
    }

    #[test]
    fn keys_and_command_records_keep_their_stored_form() {
        let k = StreamKey::parse("acme", "web-app", "todos").expect("key");
        assert_eq!(head_key(&k), b"Hacme/web-app/todos".to_vec());
        assert_eq!(entry_key(&k, "k1"), b"Kacme/web-app/todos\0k1".to_vec());
        let mut seq = b"Sacme/web-app/todos\0".to_vec();
        seq.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(command_key(&k, 7), seq);
        let (from, to) = range(b'K', &k);
        assert_eq!(
            (from, to),
            (
                b"Kacme/web-app/todos\0".to_vec(),
                b"Kacme/web-app/todos\x01".to_vec()
            )
        );
        let raw = ultrasync_shared::op::command_key("alice", "c1");
        let hex = ultrasync_shared::op::command_key_hex("alice", "c1");
        let record = encode_command_key(&raw, "op-9");
        assert_eq!(record, encode_command(&hex, "op-9"));
        assert_eq!(
            decode_command(&record).expect("decode"),
            (hex, "op-9".to_owned())
        );
    }

    #[test]
    fn applies_in_order_stops_at_gaps_and_skips_duplicates() {
        let (dir, store, mut applier, k) = fresh();
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

    #[test]
    fn commands_by_server_seq_are_read_into_snapshots_and_trimmed_in_one_range() {
        let (_dir, store, mut applier, k) = fresh();
        let other = StreamKey::parse("o", "p", "m").expect("key");
        let ops: Vec<_> = (1..=1100)
            .flat_map(|seq| {
                [
                    (
                        k.clone(),
                        entry(&k, seq, "a", OpType::Set, serde_json::json!(seq)),
                    ),
                    (
                        other.clone(),
                        entry(&other, seq, "a", OpType::Set, Value::Null),
                    ),
                ]
            })
            .collect();
        for chunk in ops.chunks(300) {
            applier.apply(chunk, true).expect("apply");
        }
        // Two ops recorded by an older version: by command, not by server_seq.
        let command = |seq: u64| ultrasync_shared::op::command_key_hex("a", &format!("c{seq}"));
        for seq in [5, 900] {
            store.db.delete(command_key(&k, seq)).expect("delete");
            let mut v = seq.to_be_bytes().to_vec();
            v.extend_from_slice(format!("id{seq}").as_bytes());
            store
                .db
                .put(prefixed(b'C', &k, Some(command(seq).as_bytes())), v)
                .expect("put");
        }
        let stored = |tag: u8, key: &StreamKey| {
            let (from, to) = range(tag, key);
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(to);
            store
                .db
                .iterator_opt(IteratorMode::From(&from, Direction::Forward), opts)
                .count()
        };
        assert_eq!(stored(b'S', &k), 1098);

        // The log holds 1050 on; the newest 1024 commands are kept anyway (from 77).
        let snap = store.snapshot_for_log(&k, 1050).expect("snapshot");
        assert_eq!(snap.commands.len(), 1024);
        for seq in [77, 900, 1100] {
            assert_eq!(snap.commands[&command(seq)], (format!("id{seq}"), seq));
        }
        assert!(!snap.commands.contains_key(&command(76)));
        assert!(!snap.commands.contains_key(&command(5)));
        assert_eq!(stored(b'S', &k), 1023);
        assert_eq!(stored(b'C', &k), 1);
        // Another stream key's records are not touched; a second snapshot agrees.
        assert_eq!(stored(b'S', &other), 1100);
        let again = store.snapshot_for_log(&k, 1050).expect("snapshot");
        assert_eq!(again.commands, snap.commands);

        // Installed elsewhere, the same commands come back.
        let dir2 = tempfile::tempdir().expect("tmp");
        let store2 = std::sync::Arc::new(Store::open(dir2.path()).expect("open"));
        Applier::new(store2.clone())
            .install(&k, &snap)
            .expect("install");
        assert_eq!(
            store2.snapshot_for_log(&k, 1050).expect("s").commands,
            snap.commands
        );
    }

    #[test]
    fn an_installed_snapshot_replaces_what_the_applier_holds() {
        let (_dir, store, mut applier, k) = fresh();
        let e = |seq, t, p| (k.clone(), entry(&k, seq, "a", t, p));
        applier
            .apply(&[e(1, OpType::Set, serde_json::json!({"x": 1}))], true)
            .expect("apply");
        let mut installed = store.snapshot(&k).expect("snapshot");
        installed.state.last_seq = 5;
        installed.head_stream_seq = 50;
        installed.state.keys.insert(
            "a".into(),
            KeyEntry {
                value: serde_json::json!({"x": 99}),
                version: 5,
                doc: None,
            },
        );
        applier.install(&k, &installed).expect("install");
        applier
            .apply(&[e(6, OpType::Patch, serde_json::json!({"y": 2}))], true)
            .expect("apply");
        let (seq, a) = store.entry(&k, "a").expect("entry");
        assert_eq!(seq, 6);
        assert_eq!(
            a.map(|a| a.value),
            Some(serde_json::json!({"x": 99, "y": 2}))
        );
    }

    #[test]
    fn the_entry_cache_stays_within_its_bounds() {
        let k = StreamKey::parse("o", "p", "n").expect("key");
        let value = |n: u64| KeyEntry {
            value: serde_json::json!(n),
            version: n,
            doc: None,
        };
        let mut cache = EntryCache::default();
        for n in 0..100u64 {
            cache.put((k.clone(), format!("k{n}")), value(n), 1 << 20);
            assert!(cache.bytes <= CACHE_BYTES);
            assert_eq!(cache.bytes, cache.entries.len() << 20);
        }
        assert!(cache.entries.len() < 100);
        // The newest is always held; taking it leaves the accounts right.
        let newest = (k.clone(), "k99".to_owned());
        assert_eq!(cache.take(&newest).map(|(e, _)| e.version), Some(99));
        assert_eq!(cache.bytes, cache.entries.len() << 20);
        for n in 0..(CACHE_ENTRIES as u64 + 10) {
            cache.put((k.clone(), format!("s{n}")), value(n), 1);
            assert!(cache.entries.len() <= CACHE_ENTRIES);
        }
        cache.forget_stream_key(&k);
        assert_eq!((cache.entries.len(), cache.bytes, cache.docs), (0, 0, 0));
    }
}
