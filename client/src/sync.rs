//! The local-first SDK: a replica of some namespaces, an outbox that survives
//! restarts, optimistic edits, and a background connection that keeps both in step
//! with the server.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use ultrasync_client::sync::{SyncClient, SyncOptions};
//! let client = SyncClient::start(SyncOptions {
//!     url: "ws://127.0.0.1:8080/v1/sync".into(),
//!     token: std::env::var("ULTRASYNC_TOKEN")?,
//!     org: "dev".into(),
//!     project: "demo".into(),
//!     client_id: "laptop-1".into(),
//!     namespaces: vec!["index".into()],
//!     store: "./.replica".into(),
//!     ca_file: None,
//! })?;
//! let mut changes = client.changes();
//! client.put("index", "greeting", serde_json::json!("hello"))?; // applied locally now
//! while let Ok(change) = changes.recv().await {
//!     println!("{change:?}"); // confirmed ops, rejections, presence, ...
//! }
//! # Ok(()) }
//! ```
//!
//! How it works:
//! - The replica holds, per namespace, the *confirmed* state (the server's, up to a
//!   cursor) and the *outbox* (edits not yet acknowledged). Reads see the confirmed
//!   state with the outbox applied on top (optimistic). Both live in one JSON file in
//!   `store`, written atomically (temp file, fsync, rename) after every change, so a
//!   process that dies loses nothing it accepted.
//! - The connection task connects, says `hello` with the confirmed cursors (none: a
//!   snapshot), applies catch-up ops (dropping outbox entries it recognises as its
//!   own), and once every namespace is `synced` sends the outbox in order. Commands
//!   keep their ids across restarts, so a resend of something the server already has
//!   is answered with the original ack (or `stale_base` when compacted: it was
//!   applied), never applied twice.
//! - A `reject` removes the edit from the outbox (rolling it back locally) and is
//!   reported as [`Change::Rejected`] with its code and `current_state`.
//! - Each edit is sent with `base_seq`, the namespace's cursor when it was made. When
//!   the server answers `stale_base` with a `current_state` (the edit was made on a
//!   state older than the compaction floor: nothing was written), the edit stays in
//!   the outbox, the namespace is bootstrapped again from a snapshot
//!   ([`Change::Snapshot`]), and the edit is sent again based on that snapshot: the
//!   application saw the state it now lands on, and a precondition it carries is
//!   checked against it. After [`MAX_REBASES`] such answers for one edit it is rolled
//!   back and reported as rejected. (A `stale_base` without `current_state` answers
//!   a resend whose op was compacted: it was applied, and is done.)
//! - After ops are applied and stored, a `cursor` report tells the server how far this
//!   replica durably is (the compactor keeps the log from there).
//! - On any disconnect it reconnects with exponential backoff (100 ms doubling to
//!   10 s) and jitter. A snapshot cut off by a disconnect is continued: the keys
//!   received so far are kept (in memory) with the last frame's `checkpoint`, which
//!   the next `hello` sends back; when the server answers `stale_base` (that
//!   snapshot was replaced meanwhile) the part is dropped and the namespace starts
//!   over.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::{AutoCommit, Automerge};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, broadcast};
use tracing::{debug, warn};
use ultrasync_shared::ErrorCode;
use ultrasync_shared::protocol::{ClientMessage, CommandFrame, CurrentState, ServerMessage};
use ultrasync_shared::state::{self, KeyEntry, NamespaceState};
use ultrasync_shared::{Op, OpType, Precondition};

use crate::{ClientError, Connection};

const STATE_FILE: &str = "replica.json";
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Times one edit is re-based on a fresh snapshot after `stale_base` before it is
/// rolled back.
pub const MAX_REBASES: u32 = 3;

pub struct SyncOptions {
    /// `ws://…/v1/sync` or `wss://…`.
    pub url: String,
    pub token: String,
    pub org: String,
    pub project: String,
    /// Stable per replica (device, tab, agent): commands and cursors are keyed by it.
    pub client_id: String,
    /// Namespaces to replicate (edits go only to these).
    pub namespaces: Vec<String>,
    /// Folder of the local store.
    pub store: PathBuf,
    /// A PEM CA trusted for `wss://` besides the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
}

/// What the application hears about.
#[derive(Debug, Clone)]
pub enum Change {
    /// A committed op, in server order; the confirmed state now includes it.
    Op {
        namespace: String,
        op: Op,
    },
    /// The namespace's confirmed state was replaced by a snapshot.
    Snapshot {
        namespace: String,
        last_server_seq: u64,
    },
    /// Catch-up done; live from here.
    Synced {
        namespace: String,
        server_seq: u64,
    },
    /// The server refused an edit; it is rolled back locally.
    Rejected {
        command_id: String,
        code: ErrorCode,
        reason: String,
        current_state: Option<CurrentState>,
    },
    Presence {
        actor_id: String,
        client_id: String,
        key: String,
        payload: Value,
    },
    Connected,
    Disconnected {
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("namespace {0} is not replicated by this client")]
    NotReplicated(String),
    #[error("the local store: {0}")]
    Store(String),
    #[error("{0}")]
    Invalid(String),
}

/// One edit waiting for the server.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    command_id: String,
    namespace: String,
    key: String,
    op_type: OpType,
    payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    precondition: Option<Precondition>,
    /// The namespace's confirmed cursor the edit was made on (`None` in stores
    /// written before it was kept: sent without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_seq: Option<u64>,
    /// Refused `stale_base`: held back until the namespace's next snapshot, which
    /// becomes its base.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    rebase: bool,
    /// How many times it was re-based.
    #[serde(default, skip_serializing_if = "is_zero")]
    rebases: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    value: Value,
    version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    doc: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredNamespace {
    last_seq: u64,
    keys: BTreeMap<String, StoredKey>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    client_id: String,
    next_id: u64,
    namespaces: BTreeMap<String, StoredNamespace>,
    outbox: Vec<Pending>,
}

struct Local {
    confirmed: BTreeMap<String, NamespaceState>,
    outbox: Vec<Pending>,
    next_id: u64,
    /// Namespaces to bootstrap again from a snapshot on the next connection (an
    /// edit of theirs waits to be re-based).
    resync: HashSet<String>,
}

struct Shared {
    opts: SyncOptions,
    /// Whom `wss://` believes (from `opts.ca_file`).
    trust: crate::Trust,
    local: Mutex<Local>,
    changes: broadcast::Sender<Change>,
    /// An edit was queued.
    edited: Notify,
    /// Drop the connection (it reconnects).
    kick: Notify,
    stop: Notify,
    stopped: std::sync::atomic::AtomicBool,
    /// Frames to send when connected (presence).
    extra: Mutex<Vec<ClientMessage>>,
    /// Snapshots received in part, per namespace: continued on the next connection.
    partial: Mutex<BTreeMap<String, Partial>>,
}

/// A snapshot received up to a checkpoint.
#[derive(Default)]
struct Partial {
    last_server_seq: u64,
    checkpoint: Option<String>,
    keys: BTreeMap<String, KeyEntry>,
}

/// A running replica. Dropping it stops the connection; the store stays.
pub struct SyncClient {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A key as this replica sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub value: Value,
    /// Version of the confirmed value (0: not on the server yet).
    pub version: u64,
    /// Edits of this key are still in the outbox.
    pub pending: bool,
}

fn load(path: &Path) -> Result<Option<Stored>, SyncError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SyncError::Store(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SyncError::Store(format!("{}: {e}", path.display()))),
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the replica to disk: temp file, fsync, rename, fsync the folder.
    fn persist(&self, local: &Local) -> Result<(), SyncError> {
        let stored = Stored {
            client_id: self.opts.client_id.clone(),
            next_id: local.next_id,
            namespaces: local
                .confirmed
                .iter()
                .map(|(ns, st)| {
                    let keys = st
                        .keys
                        .iter()
                        .map(|(k, e)| {
                            (
                                k.clone(),
                                StoredKey {
                                    value: e.value.clone(),
                                    version: e.version,
                                    doc: e.doc.as_ref().map(|d| B64.encode(d.save())),
                                },
                            )
                        })
                        .collect();
                    (
                        ns.clone(),
                        StoredNamespace {
                            last_seq: st.last_seq,
                            keys,
                        },
                    )
                })
                .collect(),
            outbox: local.outbox.clone(),
        };
        let bytes = serde_json::to_vec(&stored).map_err(|e| SyncError::Store(e.to_string()))?;
        let dir = &self.opts.store;
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(STATE_FILE))?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| SyncError::Store(format!("{}: {e}", dir.display())))
    }

    fn partials(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Partial>> {
        self.partial.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, change: Change) {
        let _ = self.changes.send(change);
    }
}

impl SyncClient {
    /// Opens (or creates) the store and starts syncing in the background.
    pub fn start(opts: SyncOptions) -> Result<Self, SyncError> {
        let trust = crate::Trust::from_ca_file(opts.ca_file.as_deref())
            .map_err(|e| SyncError::Invalid(e.to_string()))?;
        std::fs::create_dir_all(&opts.store)
            .map_err(|e| SyncError::Store(format!("{}: {e}", opts.store.display())))?;
        let mut local = Local {
            confirmed: BTreeMap::new(),
            outbox: Vec::new(),
            next_id: 1,
            resync: HashSet::new(),
        };
        if let Some(stored) = load(&opts.store.join(STATE_FILE))? {
            if stored.client_id != opts.client_id {
                return Err(SyncError::Store(format!(
                    "the store belongs to client {}, not {}",
                    stored.client_id, opts.client_id
                )));
            }
            local.next_id = stored.next_id;
            local.outbox = stored.outbox;
            for (ns, sn) in stored.namespaces {
                let mut keys = BTreeMap::new();
                for (k, sk) in sn.keys {
                    let doc = match sk.doc {
                        Some(b) => {
                            let raw = B64.decode(b).map_err(|e| SyncError::Store(e.to_string()))?;
                            Some(Box::new(
                                Automerge::load(&raw)
                                    .map_err(|e| SyncError::Store(e.to_string()))?,
                            ))
                        }
                        None => None,
                    };
                    keys.insert(
                        k,
                        KeyEntry {
                            value: sk.value,
                            version: sk.version,
                            doc,
                        },
                    );
                }
                local.confirmed.insert(
                    ns,
                    NamespaceState {
                        last_seq: sn.last_seq,
                        keys,
                    },
                );
            }
        }
        for ns in &opts.namespaces {
            local.confirmed.entry(ns.clone()).or_default();
        }
        local.resync = local
            .outbox
            .iter()
            .filter(|p| p.rebase)
            .map(|p| p.namespace.clone())
            .collect();
        let shared = Arc::new(Shared {
            opts,
            trust,
            local: Mutex::new(local),
            changes: broadcast::channel(16 * 1024).0,
            edited: Notify::new(),
            kick: Notify::new(),
            stop: Notify::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            extra: Mutex::new(Vec::new()),
            partial: Mutex::new(BTreeMap::new()),
        });
        let task = tokio::spawn(run(shared.clone()));
        Ok(Self {
            shared,
            task: Some(task),
        })
    }

    /// Changes as they happen (subscribe before editing to see everything).
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.shared.changes.subscribe()
    }

    fn enqueue(
        &self,
        namespace: &str,
        key: &str,
        op_type: OpType,
        payload: Value,
        precondition: Option<Precondition>,
    ) -> Result<String, SyncError> {
        if !self.shared.opts.namespaces.iter().any(|n| n == namespace) {
            return Err(SyncError::NotReplicated(namespace.to_owned()));
        }
        ultrasync_shared::validate_key(key).map_err(|e| SyncError::Invalid(e.to_string()))?;
        let mut local = self.shared.lock();
        let command_id = format!("{}-{}", self.shared.opts.client_id, local.next_id);
        local.next_id += 1;
        let base_seq = local.confirmed.get(namespace).map_or(0, |s| s.last_seq);
        local.outbox.push(Pending {
            command_id: command_id.clone(),
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            op_type,
            payload,
            precondition,
            base_seq: Some(base_seq),
            rebase: false,
            rebases: 0,
        });
        self.shared.persist(&local)?;
        drop(local);
        self.shared.edited.notify_one();
        Ok(command_id)
    }

    /// Sets `key`; returns the command id.
    pub fn put(&self, namespace: &str, key: &str, value: Value) -> Result<String, SyncError> {
        self.enqueue(namespace, key, OpType::Set, value, None)
    }

    /// Sets `key` only if its version is still `expected_version` (0: absent).
    pub fn put_if(
        &self,
        namespace: &str,
        key: &str,
        value: Value,
        expected_version: u64,
    ) -> Result<String, SyncError> {
        self.enqueue(
            namespace,
            key,
            OpType::Set,
            value,
            Some(Precondition { expected_version }),
        )
    }

    /// Merges `patch` (RFC 7386) into `key`.
    pub fn patch(&self, namespace: &str, key: &str, patch: Value) -> Result<String, SyncError> {
        self.enqueue(namespace, key, OpType::Patch, patch, None)
    }

    pub fn delete(&self, namespace: &str, key: &str) -> Result<String, SyncError> {
        self.enqueue(namespace, key, OpType::Del, Value::Null, None)
    }

    /// Edits the Automerge document at `key` (crdt namespaces): `edit` runs on the
    /// local document (confirmed + pending changes); the change it makes is queued.
    pub fn edit_doc(
        &self,
        namespace: &str,
        key: &str,
        edit: impl FnOnce(&mut AutoCommit) -> Result<(), automerge::AutomergeError>,
    ) -> Result<Option<String>, SyncError> {
        let mut doc = self.local_doc(namespace, key)?;
        edit(&mut doc).map_err(|e| SyncError::Invalid(e.to_string()))?;
        doc.commit();
        let Some(change) = doc.get_last_local_change() else {
            return Ok(None);
        };
        let payload = serde_json::json!({"change": B64.encode(change.raw_bytes())});
        self.enqueue(namespace, key, OpType::CrdtOp, payload, None)
            .map(Some)
    }

    /// The document at `key` as this replica has it (confirmed + pending changes).
    pub fn local_doc(&self, namespace: &str, key: &str) -> Result<AutoCommit, SyncError> {
        let local = self.shared.lock();
        let base = local
            .confirmed
            .get(namespace)
            .and_then(|s| s.keys.get(key))
            .and_then(|e| e.doc.as_ref())
            .map(|d| d.save());
        let mut doc = match base {
            Some(bytes) => {
                AutoCommit::load(&bytes).map_err(|e| SyncError::Invalid(e.to_string()))?
            }
            None => AutoCommit::new(),
        };
        for p in local
            .outbox
            .iter()
            .filter(|p| p.namespace == namespace && p.key == key && p.op_type == OpType::CrdtOp)
        {
            if let Ok(change) = state::decode_change(&p.payload) {
                let _ = doc.apply_changes([change]);
            }
        }
        Ok(doc)
    }

    /// `key` as seen locally: the confirmed value with pending edits applied.
    pub fn get(&self, namespace: &str, key: &str) -> Option<View> {
        let local = self.shared.lock();
        let confirmed = local.confirmed.get(namespace)?.keys.get(key).cloned();
        let version = confirmed.as_ref().map_or(0, |e| e.version);
        let mut entry = confirmed;
        let mut pending = false;
        for p in local
            .outbox
            .iter()
            .filter(|p| p.namespace == namespace && p.key == key)
        {
            pending = true;
            if let Ok(next) = state::next_entry(entry.as_ref(), p.op_type, &p.payload, version) {
                entry = next;
            }
        }
        entry.map(|e| View {
            value: e.value,
            version,
            pending,
        })
    }

    /// The confirmed state of a namespace (what the server has, up to the cursor).
    pub fn confirmed(&self, namespace: &str) -> Option<NamespaceState> {
        self.shared.lock().confirmed.get(namespace).cloned()
    }

    /// Edits not yet acknowledged.
    pub fn outbox_len(&self) -> usize {
        self.shared.lock().outbox.len()
    }

    /// Shows (or, with `null`, clears) this client's presence under `key`.
    pub fn presence(&self, key: &str, payload: Value) {
        self.shared
            .extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ClientMessage::Presence {
                key: key.to_owned(),
                payload,
            });
        self.shared.edited.notify_one();
    }

    /// Drops the current connection (it reconnects on its own): for tests and for
    /// applications that know the network changed.
    pub fn reconnect(&self) {
        self.shared.kick.notify_one();
    }

    /// Stops syncing; the store keeps everything.
    pub async fn close(mut self) {
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.stop.notify_one();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SyncClient {
    fn drop(&mut self) {
        self.shared
            .stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Jitter in [0.5, 1.5) from the clock's nanoseconds (no RNG needed for this).
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
}

async fn run(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_START;
    while !shared.stopped.load(std::sync::atomic::Ordering::SeqCst) {
        match Connection::connect_with(&shared.opts.url, &shared.opts.token, &shared.trust).await {
            Ok(conn) => {
                let reason = session(&shared, conn, &mut backoff).await;
                shared.emit(Change::Disconnected { reason });
            }
            Err(e) => {
                debug!(error = %e, "connect failed");
                shared.emit(Change::Disconnected {
                    reason: e.to_string(),
                });
            }
        }
        if shared.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(jitter(backoff)) => {}
            _ = shared.stop.notified() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: hello, catch-up, outbox, live. Returns why it ended.
async fn session(shared: &Shared, mut conn: Connection, backoff: &mut Duration) -> String {
    let opts = &shared.opts;
    let cursors: BTreeMap<String, Option<u64>> = {
        let local = shared.lock();
        opts.namespaces
            .iter()
            .map(|ns| {
                let seq = local.confirmed.get(ns).map_or(0, |s| s.last_seq);
                let resync = local.resync.contains(ns);
                (ns.clone(), (seq > 0 && !resync).then_some(seq))
            })
            .collect()
    };
    let checkpoints: BTreeMap<String, String> = shared
        .partials()
        .iter()
        .filter(|(ns, _)| cursors.get(*ns).is_some_and(Option::is_none))
        .filter_map(|(ns, p)| Some((ns.clone(), p.checkpoint.clone()?)))
        .collect();
    let resuming = !checkpoints.is_empty();
    if let Err(e) = conn
        .hello_resuming(
            &opts.org,
            &opts.project,
            &opts.client_id,
            cursors,
            checkpoints,
        )
        .await
    {
        return format!("hello: {e}");
    }
    *backoff = BACKOFF_START;
    shared.emit(Change::Connected);
    let mut unsynced: HashSet<String> = opts.namespaces.iter().cloned().collect();
    let mut sent: HashSet<String> = HashSet::new();
    loop {
        if unsynced.is_empty()
            && let Err(e) = flush(shared, &mut conn, &mut sent).await
        {
            return e.to_string();
        }
        let frame = tokio::select! {
            _ = shared.stop.notified() => {
                conn.close().await;
                return "stopped".into();
            }
            _ = shared.kick.notified() => return "reconnect requested".into(),
            _ = shared.edited.notified() => continue,
            f = conn.recv() => f,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(ClientError::Closed { code, reason }) => return format!("closed {code} {reason}"),
            Err(e) => return e.to_string(),
        };
        match frame {
            ServerMessage::Snapshot {
                namespace,
                last_server_seq,
                state: part,
                more,
                checkpoint,
                ..
            } => {
                let mut partials = shared.partials();
                let partial = partials.entry(namespace.clone()).or_default();
                if partial.last_server_seq != last_server_seq {
                    // Another snapshot than the one received in part: start over.
                    *partial = Partial {
                        last_server_seq,
                        ..Partial::default()
                    };
                }
                partial.checkpoint = checkpoint;
                let keys = &mut partial.keys;
                for (k, ks) in part {
                    let doc = ks
                        .doc
                        .and_then(|b| B64.decode(b).ok())
                        .and_then(|raw| Automerge::load(&raw).ok())
                        .map(Box::new);
                    keys.insert(
                        k,
                        KeyEntry {
                            value: ks.value,
                            version: ks.version,
                            doc,
                        },
                    );
                }
                let done = match more {
                    true => None,
                    false => partials.remove(&namespace),
                };
                drop(partials);
                if let Some(Partial { keys, .. }) = done {
                    let mut local = shared.lock();
                    local.confirmed.insert(
                        namespace.clone(),
                        NamespaceState {
                            last_seq: last_server_seq,
                            keys,
                        },
                    );
                    // Edits refused `stale_base` now stand on this snapshot.
                    local.resync.remove(&namespace);
                    for p in local
                        .outbox
                        .iter_mut()
                        .filter(|p| p.rebase && p.namespace == namespace)
                    {
                        p.rebase = false;
                        p.base_seq = Some(last_server_seq);
                    }
                    if let Err(e) = shared.persist(&local) {
                        return e.to_string();
                    }
                    drop(local);
                    shared.emit(Change::Snapshot {
                        namespace,
                        last_server_seq,
                    });
                }
            }
            ServerMessage::Ops { namespace, ops, .. } => {
                let mut applied = Vec::new();
                let last = {
                    let mut local = shared.lock();
                    let Local {
                        confirmed, outbox, ..
                    } = &mut *local;
                    let st = confirmed.entry(namespace.clone()).or_default();
                    for op in ops {
                        if op.server_seq <= st.last_seq {
                            continue;
                        }
                        if let Err(e) = state::apply(st, &op) {
                            return format!("op {} does not apply: {e}", op.server_seq);
                        }
                        if op.client_id == opts.client_id {
                            outbox.retain(|p| p.command_id != op.command_id);
                        }
                        applied.push(op);
                    }
                    let last = st.last_seq;
                    if let Err(e) = shared.persist(&local) {
                        return e.to_string();
                    }
                    last
                };
                // Durable locally: tell the server.
                if !applied.is_empty() {
                    let report = ClientMessage::Cursor {
                        namespace: namespace.clone(),
                        server_seq: last,
                    };
                    if let Err(e) = conn.send(&report).await {
                        return e.to_string();
                    }
                }
                for op in applied {
                    shared.emit(Change::Op {
                        namespace: namespace.clone(),
                        op,
                    });
                }
            }
            ServerMessage::Synced {
                namespace,
                server_seq,
            } => {
                unsynced.remove(&namespace);
                shared.emit(Change::Synced {
                    namespace,
                    server_seq,
                });
            }
            ServerMessage::Ack { command_id, .. } => {
                let mut local = shared.lock();
                local.outbox.retain(|p| p.command_id != command_id);
                if let Err(e) = shared.persist(&local) {
                    return e.to_string();
                }
            }
            ServerMessage::Reject {
                command_id,
                code,
                reason,
                current_state,
            } => {
                // Transient: keep it and send it again after a backoff.
                if matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
                    return format!("{code}: {reason}");
                }
                // The edit's base predates a purge (nothing written): keep it,
                // bootstrap the namespace again and send it on the new base.
                let stale_base = code == ErrorCode::StaleBase && current_state.is_some();
                if stale_base {
                    let mut local = shared.lock();
                    let rebased = match local
                        .outbox
                        .iter_mut()
                        .find(|p| p.command_id == command_id && p.rebases < MAX_REBASES)
                    {
                        Some(p) => {
                            p.rebase = true;
                            p.rebases += 1;
                            Some(p.namespace.clone())
                        }
                        None => None,
                    };
                    if let Some(ns) = rebased {
                        local.resync.insert(ns);
                        if let Err(e) = shared.persist(&local) {
                            return e.to_string();
                        }
                        return format!("{code}: {reason}");
                    }
                }
                {
                    let mut local = shared.lock();
                    local.outbox.retain(|p| p.command_id != command_id);
                    if let Err(e) = shared.persist(&local) {
                        return e.to_string();
                    }
                }
                // stale_base without current_state: a resend of something applied
                // long ago (compacted), so it is done; anything else is rolled back.
                if code != ErrorCode::StaleBase || stale_base {
                    shared.emit(Change::Rejected {
                        command_id,
                        code,
                        reason,
                        current_state,
                    });
                }
            }
            ServerMessage::Presence {
                actor_id,
                client_id,
                key,
                payload,
                ..
            } => shared.emit(Change::Presence {
                actor_id,
                client_id,
                key,
                payload,
            }),
            ServerMessage::Error { code, message } => {
                warn!(%code, %message, "server error");
                if resuming && code == ErrorCode::StaleBase {
                    // A snapshot being continued was replaced: start over.
                    shared.partials().clear();
                    return format!("{code}: {message}");
                }
            }
            _ => {}
        }
    }
}

/// Sends outbox entries not yet sent on this connection, and queued extra frames.
async fn flush(
    shared: &Shared,
    conn: &mut Connection,
    sent: &mut HashSet<String>,
) -> Result<(), ClientError> {
    let todo: Vec<Pending> = shared
        .lock()
        .outbox
        .iter()
        .filter(|p| !p.rebase && !sent.contains(&p.command_id))
        .cloned()
        .collect();
    for p in todo {
        conn.send(&ClientMessage::Command(CommandFrame {
            command_id: p.command_id.clone(),
            namespace: p.namespace,
            key: p.key,
            op_type: p.op_type,
            payload: p.payload,
            precondition: p.precondition,
            base_seq: p.base_seq,
        }))
        .await?;
        sent.insert(p.command_id);
    }
    let extra: Vec<ClientMessage> =
        std::mem::take(&mut *shared.extra.lock().unwrap_or_else(|p| p.into_inner()));
    for m in extra {
        conn.send(&m).await?;
    }
    Ok(())
}
