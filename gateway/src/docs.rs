//! Durable Automerge documents for the automerge-repo door, one copy per gateway.
//!
//! A *space* is one `crdt` stream key some automerge-repo socket on this gateway
//! uses. It follows the key's hub topic (the same ordered consumer the WebSocket
//! door's followers share), and keeps, for each document a socket asked about, the
//! Automerge document **as the log has it**: loaded from a materializer at or past
//! the topic's head (`usync.mat.key` with the document), then every later change
//! the topic delivers for that key. Changes peers send never touch it; they go to
//! the sequencer as commands and come back through the log. So every heads value a
//! sync message generated from it advertises is durably stored (SPEC §11).
//!
//! Documents are held per org ([`OrgDocs`]): a socket takes a [`DocLease`] on each
//! document it syncs; a document no socket holds stays (following the log) for
//! [`IDLE_KEEP`], so a peer that reconnects finds it loaded. One org's documents on
//! this gateway are bounded by `gateway.automerge_docs_per_org`: at the bound the
//! least recently used idle document is dropped, and when every one is in use a new
//! one is refused. A space lives while a document holds it. Each socket registers an
//! [`Inbox`] with the documents it syncs: a document whose heads move marks itself
//! dirty there, so a socket generates one sync message per document however many
//! changes came.
//!
//! Ephemeral messages (cursors, selections) fan out over core NATS on
//! `usync.presence.{org}.{project}.am.{ns}` (inside the presence subjects, so the
//! shipped NATS users need no new permission), to every gateway with a socket on
//! the document, deduplicated by `senderId:sessionId:count`; never stored.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};
use ultrasync_shared::op::{Op, OpType};
use ultrasync_shared::{StreamKey, reads, state};

use crate::Metrics;
use crate::hub::{Hub, LiveOp, Topic};

/// Ephemeral messages remembered per space for deduplication.
const SEEN: usize = 8192;
/// Ephemeral messages waiting for one socket; more are dropped (they are lossy).
pub const EPHEMERAL_QUEUE: usize = 256;
/// Longest pause between two attempts to load a document.
const RELOAD_BACKOFF: Duration = Duration::from_secs(2);
/// How long a document no socket holds is kept (following the log) before it is
/// dropped.
pub const IDLE_KEEP: Duration = Duration::from_secs(60);
/// How often idle documents past [`IDLE_KEEP`] are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(5);

type Spaces = Mutex<HashMap<StreamKey, Weak<Space>>>;
/// (actor, stream key, peer id) of an automerge-repo socket.
type PeerSlot = (String, StreamKey, String);

/// A document of an org: its stream key and id.
type DocKey = (StreamKey, String);

/// The documents this gateway holds for one org.
#[derive(Default)]
struct OrgDocs {
    held: HashMap<DocKey, Held>,
    /// Documents no socket holds, least recently used first (by the tick they
    /// were left at).
    idle: BTreeMap<u64, DocKey>,
}

struct Held {
    doc: Arc<Doc>,
    /// Sockets holding it.
    users: usize,
    /// (tick, time) it was left at, while no socket holds it.
    idle_since: Option<(u64, Instant)>,
}

impl OrgDocs {
    /// Takes idle documents out: those left before `before`, then (oldest first)
    /// until fewer than `room` are held. Returned to be dropped outside the lock.
    fn evict(&mut self, before: Option<Instant>, room: usize) -> Vec<Arc<Doc>> {
        let mut out = Vec::new();
        while let Some((&tick, key)) = self.idle.first_key_value() {
            let expired = before.is_some_and(|b| {
                self.held
                    .get(key)
                    .and_then(|h| h.idle_since)
                    .is_some_and(|(_, at)| at < b)
            });
            if !expired && self.held.len() < room {
                break;
            }
            let key = key.clone();
            self.idle.remove(&tick);
            if let Some(h) = self.held.remove(&key) {
                out.push(h.doc);
            }
        }
        out
    }
}

/// What the automerge-repo door counts (rendered on `/metrics`).
#[derive(Default)]
pub struct DocMetrics {
    /// Open automerge-repo sockets.
    pub sockets: AtomicU64,
    /// Changes sent to the sequencer.
    pub changes_submitted: AtomicU64,
    /// Changes refused (by the gateway's checks or the sequencer).
    pub changes_refused: AtomicU64,
    /// Ephemeral messages queued for a socket.
    pub ephemeral_out: AtomicU64,
    /// Ephemeral messages dropped for a full socket queue.
    pub ephemeral_dropped: AtomicU64,
    /// Idle documents dropped (expired, or for room under the org's bound).
    pub docs_evicted: AtomicU64,
    /// Documents refused: the org's bound was reached and every one was in use.
    pub docs_refused: AtomicU64,
}

/// The gateway's spaces, by stream key.
pub struct Docs {
    nats: async_nats::Client,
    hub: Arc<Hub>,
    spaces: Arc<Spaces>,
    /// Live automerge-repo sockets by (actor, stream key, peer id): a second `join`
    /// of the same peer replaces the first socket.
    peers: Mutex<HashMap<PeerSlot, (u64, CancellationToken)>>,
    next_peer: AtomicU64,
    /// The documents held, per org.
    orgs: Mutex<HashMap<String, OrgDocs>>,
    /// Orders idle documents.
    tick: AtomicU64,
    /// `gateway.automerge_docs_per_org`.
    per_org: usize,
    pub metrics: DocMetrics,
}

/// A document of an org's bound was refused: every one held is in use.
#[derive(Debug)]
pub struct OrgFull {
    pub held: usize,
}

impl Docs {
    /// Must be called within a Tokio runtime (it starts the idle sweeper).
    pub fn new(nats: async_nats::Client, hub: Arc<Hub>, per_org: usize) -> Arc<Self> {
        let docs = Arc::new(Self {
            nats,
            hub,
            spaces: Arc::new(Mutex::new(HashMap::new())),
            peers: Mutex::new(HashMap::new()),
            next_peer: Default::default(),
            orgs: Mutex::new(HashMap::new()),
            tick: Default::default(),
            per_org,
            metrics: DocMetrics::default(),
        });
        let weak = Arc::downgrade(&docs);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(IDLE_SWEEP);
            loop {
                every.tick().await;
                let Some(docs) = weak.upgrade() else { return };
                docs.expire_idle();
            }
        });
        docs
    }

    fn orgs(&self) -> std::sync::MutexGuard<'_, HashMap<String, OrgDocs>> {
        self.orgs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops idle documents older than [`IDLE_KEEP`], in every org.
    fn expire_idle(&self) {
        let Some(before) = Instant::now().checked_sub(IDLE_KEEP) else {
            return;
        };
        let dropped: Vec<Arc<Doc>> = {
            let mut orgs = self.orgs();
            let mut dropped = Vec::new();
            for org in orgs.values_mut() {
                dropped.extend(org.evict(Some(before), usize::MAX));
            }
            orgs.retain(|_, o| !o.held.is_empty());
            dropped
        };
        self.metrics
            .docs_evicted
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
    }

    /// A lease on document `id` of `space` for one socket: the document is held
    /// (loaded, following the log) until every lease is dropped and it has been
    /// idle for [`IDLE_KEEP`] or the org needs the room. `Err` when the org holds
    /// `automerge_docs_per_org` documents here and every one is in use.
    pub fn lease(self: &Arc<Self>, space: &Arc<Space>, id: &str) -> Result<DocLease, OrgFull> {
        let key: DocKey = (space.key.clone(), id.to_owned());
        let mut dropped = Vec::new();
        let result = {
            let mut orgs = self.orgs();
            let org = orgs.entry(space.key.org.to_string()).or_default();
            if let Some(h) = org.held.get_mut(&key) {
                if let Some((tick, _)) = h.idle_since.take() {
                    org.idle.remove(&tick);
                }
                h.users += 1;
                Ok(h.doc.clone())
            } else {
                let before = Instant::now().checked_sub(IDLE_KEEP);
                dropped = org.evict(before, self.per_org);
                if org.held.len() >= self.per_org {
                    Err(OrgFull {
                        held: org.held.len(),
                    })
                } else {
                    let doc = space.doc(id);
                    org.held.insert(
                        key.clone(),
                        Held {
                            doc: doc.clone(),
                            users: 1,
                            idle_since: None,
                        },
                    );
                    Ok(doc)
                }
            }
        };
        self.metrics
            .docs_evicted
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        drop(dropped);
        match result {
            Ok(doc) => Ok(DocLease {
                docs: self.clone(),
                key,
                doc,
            }),
            Err(full) => {
                Metrics::inc(&self.metrics.docs_refused);
                Err(full)
            }
        }
    }

    fn unlease(&self, key: &DocKey) {
        let mut orgs = self.orgs();
        let Some(org) = orgs.get_mut(key.0.org.as_str()) else {
            return;
        };
        let Some(h) = org.held.get_mut(key) else {
            return;
        };
        h.users = h.users.saturating_sub(1);
        if h.users == 0 && h.idle_since.is_none() {
            let tick = self.tick.fetch_add(1, Ordering::Relaxed);
            h.idle_since = Some((tick, Instant::now()));
            org.idle.insert(tick, key.clone());
        }
    }

    /// (documents held, of which idle) over every org.
    pub fn held(&self) -> (usize, usize) {
        self.orgs().values().fold((0, 0), |(held, idle), o| {
            (held + o.held.len(), idle + o.idle.len())
        })
    }

    /// Renders the door's counters and sizes on `/metrics`.
    pub fn export(self: &Arc<Self>, metrics: &Metrics) {
        let probe = |name, kind, help, read: fn(&Self) -> u64| {
            let weak = Arc::downgrade(self);
            let value = move || weak.upgrade().map_or(0, |d| read(&d));
            metrics.probe(name, kind, help, Box::new(value));
        };
        fn get(c: &AtomicU64) -> u64 {
            c.load(Ordering::Relaxed)
        }
        probe(
            "ultrasync_gateway_automerge_sockets",
            "gauge",
            "Open automerge-repo sockets.",
            |d| get(&d.metrics.sockets),
        );
        probe(
            "ultrasync_gateway_automerge_documents",
            "gauge",
            "Automerge documents held for automerge-repo sockets (in use or idle).",
            |d| d.held().0 as u64,
        );
        probe(
            "ultrasync_gateway_automerge_documents_idle",
            "gauge",
            "Of those, documents no socket holds (kept up to a minute).",
            |d| d.held().1 as u64,
        );
        probe(
            "ultrasync_gateway_automerge_documents_evicted_total",
            "counter",
            "Idle documents dropped (expired, or for room under automerge_docs_per_org).",
            |d| get(&d.metrics.docs_evicted),
        );
        probe(
            "ultrasync_gateway_automerge_documents_refused_total",
            "counter",
            "Documents refused: the org held automerge_docs_per_org, all in use.",
            |d| get(&d.metrics.docs_refused),
        );
        probe(
            "ultrasync_gateway_automerge_changes_submitted_total",
            "counter",
            "Changes from automerge-repo peers sent to the sequencer.",
            |d| get(&d.metrics.changes_submitted),
        );
        probe(
            "ultrasync_gateway_automerge_changes_refused_total",
            "counter",
            "Changes from automerge-repo peers refused (by the gateway or the sequencer).",
            |d| get(&d.metrics.changes_refused),
        );
        probe(
            "ultrasync_gateway_automerge_ephemeral_out_total",
            "counter",
            "Ephemeral messages fanned out to automerge-repo sockets.",
            |d| get(&d.metrics.ephemeral_out),
        );
        probe(
            "ultrasync_gateway_automerge_ephemeral_dropped_total",
            "counter",
            "Ephemeral messages dropped for a socket whose queue was full.",
            |d| get(&d.metrics.ephemeral_dropped),
        );
    }

    /// The space of `key`, opened when nobody uses it yet; ready (following the
    /// log, listening for ephemeral messages) when this returns.
    pub async fn space(self: &Arc<Self>, key: &StreamKey) -> anyhow::Result<Arc<Space>> {
        let space = {
            let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
            match spaces.get(key).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    // Within the gateway's and the org's share of followed keys.
                    let topic = self
                        .hub
                        .follow(key)
                        .map_err(|r| anyhow::anyhow!(r.message))?;
                    let s = Space::open(
                        self.clone(),
                        topic,
                        key.clone(),
                        Arc::downgrade(&self.spaces),
                    );
                    spaces.insert(key.clone(), Arc::downgrade(&s));
                    s
                }
            }
        };
        let mut ready = space.ready.clone();
        match ready.wait_for(|r| r.is_some()).await.map(|r| r.clone()) {
            Ok(Some(Ok(()))) => Ok(space),
            Ok(Some(Err(e))) => Err(anyhow::anyhow!(e)),
            _ => Err(anyhow::anyhow!("the space closed while opening")),
        }
    }

    /// Spaces open on this gateway.
    pub fn space_count(&self) -> usize {
        let spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        spaces.values().filter(|s| s.strong_count() > 0).count()
    }

    /// Registers a socket of `peer`; the returned token is cancelled when a newer
    /// socket of the same actor and peer id joins. Drop the [`PeerGuard`] when the
    /// socket ends.
    pub fn join_peer(
        self: &Arc<Self>,
        actor: &str,
        key: &StreamKey,
        peer: &str,
    ) -> (PeerGuard, CancellationToken) {
        let id = self
            .next_peer
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        let slot = (actor.to_owned(), key.clone(), peer.to_owned());
        let old = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot.clone(), (id, token.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
        (
            PeerGuard {
                docs: self.clone(),
                slot,
                id,
            },
            token,
        )
    }
}

/// A socket's hold on a document (see [`Docs::lease`]); released on drop.
pub struct DocLease {
    docs: Arc<Docs>,
    key: DocKey,
    pub doc: Arc<Doc>,
}

impl Drop for DocLease {
    fn drop(&mut self) {
        self.docs.unlease(&self.key);
    }
}

/// A socket's place in the peer registry; leaves it on drop (unless replaced).
pub struct PeerGuard {
    docs: Arc<Docs>,
    slot: PeerSlot,
    id: u64,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut peers = self.docs.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.get(&self.slot).is_some_and(|(id, _)| *id == self.id) {
            peers.remove(&self.slot);
        }
    }
}

/// One ephemeral message as it travels between gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ephemeral {
    #[serde(rename = "documentId")]
    pub document_id: String,
    #[serde(rename = "senderId")]
    pub sender_id: String,
    #[serde(rename = "sessionId")]
    pub session_id: String,
    pub count: u64,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
}

mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as B64;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s).map_err(serde::de::Error::custom)
    }
}

/// What a socket listens to: documents whose durable heads moved, and ephemeral
/// messages for its documents.
pub struct Inbox {
    pub peer_id: String,
    dirty: Mutex<HashSet<String>>,
    pub notify: Notify,
    ephemeral: mpsc::Sender<Arc<Ephemeral>>,
}

impl Inbox {
    pub fn new(peer_id: String) -> (Arc<Self>, mpsc::Receiver<Arc<Ephemeral>>) {
        let (tx, rx) = mpsc::channel(EPHEMERAL_QUEUE);
        (
            Arc::new(Self {
                peer_id,
                dirty: Mutex::new(HashSet::new()),
                notify: Notify::new(),
                ephemeral: tx,
            }),
            rx,
        )
    }

    fn mark(&self, doc: &str) {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(doc.to_owned());
        self.notify.notify_one();
    }

    /// The documents marked since the last call.
    pub fn take_dirty(&self) -> Vec<String> {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }
}

/// The last ephemeral messages seen, for deduplication.
#[derive(Default)]
struct Seen {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Seen {
    /// Whether `id` is new (and remembers it).
    fn first(&mut self, id: String) -> bool {
        if self.set.contains(&id) {
            return false;
        }
        if self.order.len() == SEEN
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(id.clone());
        self.order.push_back(id);
        true
    }
}

/// One `crdt` stream key's documents on this gateway.
pub struct Space {
    pub key: StreamKey,
    docs_root: Arc<Docs>,
    topic: Arc<Topic>,
    docs: Mutex<HashMap<String, Weak<Doc>>>,
    seen: Mutex<Seen>,
    subject: String,
    ready: watch::Receiver<Option<Result<(), String>>>,
    registry: Weak<Spaces>,
    _stop: DropGuard,
}

impl Drop for Space {
    fn drop(&mut self) {
        let Some(spaces) = self.registry.upgrade() else {
            return;
        };
        let mut spaces = spaces.lock().unwrap_or_else(|p| p.into_inner());
        if spaces.get(&self.key).is_some_and(|s| s.strong_count() == 0) {
            spaces.remove(&self.key);
        }
    }
}

/// The core NATS subject of a stream key's ephemeral messages.
pub fn ephemeral_subject(key: &StreamKey) -> String {
    format!(
        "usync.presence.{}.{}.am.{}",
        key.org, key.project, key.namespace
    )
}

impl Space {
    fn open(
        root: Arc<Docs>,
        topic: Arc<Topic>,
        key: StreamKey,
        registry: Weak<Spaces>,
    ) -> Arc<Self> {
        let stop = CancellationToken::new();
        let (ready_tx, ready) = watch::channel(None);
        let space = Arc::new(Self {
            topic,
            subject: ephemeral_subject(&key),
            key,
            docs_root: root,
            docs: Mutex::new(HashMap::new()),
            seen: Mutex::new(Seen::default()),
            ready,
            registry,
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(follow(Arc::downgrade(&space), ready_tx, stop));
        space
    }

    fn docs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Doc>>> {
        self.docs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Document `id`, loading it from a materializer when nobody holds it yet
    /// (sockets get theirs through [`Docs::lease`]).
    fn doc(self: &Arc<Self>, id: &str) -> Arc<Doc> {
        let mut docs = self.docs();
        if let Some(d) = docs.get(id).and_then(Weak::upgrade) {
            return d;
        }
        docs.retain(|_, d| d.strong_count() > 0);
        let (loaded_tx, loaded) = watch::channel(false);
        let doc = Arc::new(Doc {
            id: id.to_owned(),
            space: self.clone(),
            inner: Mutex::new(DocInner {
                doc: Automerge::new(),
                load: Load::Loading(Vec::new()),
                exists: false,
                pending: HashSet::new(),
                watchers: Vec::new(),
            }),
            loaded,
            loaded_tx,
        });
        docs.insert(id.to_owned(), Arc::downgrade(&doc));
        tokio::spawn(load(Arc::downgrade(&doc)));
        doc
    }

    /// Sends an ephemeral message to every gateway (this one included).
    pub async fn publish_ephemeral(&self, e: &Ephemeral) -> Result<(), String> {
        let body = serde_json::to_vec(e).map_err(|e| e.to_string())?;
        self.docs_root
            .nats
            .publish(self.subject.clone(), body.into())
            .await
            .map_err(|e| e.to_string())
    }

    fn deliver_ephemeral(&self, e: Ephemeral) {
        let id = format!("{}:{}:{}", e.sender_id, e.session_id, e.count);
        if !self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first(id)
        {
            return;
        }
        let Some(doc) = self.docs().get(&e.document_id).and_then(Weak::upgrade) else {
            return;
        };
        let watchers: Vec<Arc<Inbox>> = doc
            .lock()
            .watchers
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let e = Arc::new(e);
        for w in watchers {
            if w.peer_id == e.sender_id {
                continue;
            }
            let counter = match w.ephemeral.try_send(e.clone()) {
                Ok(()) => &self.docs_root.metrics.ephemeral_out,
                Err(_) => &self.docs_root.metrics.ephemeral_dropped,
            };
            Metrics::inc(counter);
        }
    }

    /// Applies one op of the log to the document it names, if held here.
    fn apply(&self, op: &LiveOp) {
        let Ok(op) = serde_json::from_slice::<Op>(&op.body) else {
            return;
        };
        if op.op_type != OpType::CrdtOp {
            return;
        }
        let Some(doc) = self.docs().get(&op.key).and_then(Weak::upgrade) else {
            return;
        };
        match state::decode_change(&op.payload) {
            Ok(change) => doc.apply(change),
            Err(e) => {
                warn!(stream_key = %self.key, key = %op.key, error = %e, "an op in the log does not decode")
            }
        }
    }

    /// Ops were missed (the broadcast lagged past the ring): load every document again.
    fn reload_all(&self) {
        let docs: Vec<Arc<Doc>> = self.docs().values().filter_map(Weak::upgrade).collect();
        for d in docs {
            {
                let mut inner = d.lock();
                inner.load = Load::Loading(Vec::new());
            }
            let _ = d.loaded_tx.send(false);
            tokio::spawn(load(Arc::downgrade(&d)));
        }
    }
}

/// Follows the topic and the ephemeral subject for a space until it is dropped.
async fn follow(
    space: Weak<Space>,
    ready: watch::Sender<Option<Result<(), String>>>,
    stop: CancellationToken,
) {
    let Some((topic, nats, subject)) = space
        .upgrade()
        .map(|s| (s.topic.clone(), s.docs_root.nats.clone(), s.subject.clone()))
    else {
        return;
    };
    let mut ephemeral = match nats.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Some(Err(format!("subscribing to {subject}: {e}"))));
            return;
        }
    };
    let (mut rx, mut last) = topic.subscribe().await;
    let _ = ready.send(Some(Ok(())));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = ephemeral.next() => {
                let Some(msg) = msg else { return };
                let Some(s) = space.upgrade() else { return };
                match serde_json::from_slice::<Ephemeral>(&msg.payload) {
                    Ok(e) => s.deliver_ephemeral(e),
                    Err(e) => debug!(error = %e, "dropping a malformed ephemeral message"),
                }
            }
            op = rx.recv() => {
                let Some(s) = space.upgrade() else { return };
                match op {
                    Ok(op) => {
                        if op.server_seq <= last {
                            continue;
                        }
                        if op.server_seq > last + 1 {
                            match topic.recent(last + 1, op.server_seq - 1) {
                                Some(missed) => missed.iter().for_each(|m| s.apply(m)),
                                None => s.reload_all(),
                            }
                        }
                        s.apply(&op);
                        last = op.server_seq;
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let head = topic.head();
                        match topic.recent(last + 1, head) {
                            Some(missed) => missed.iter().for_each(|m| s.apply(m)),
                            None => s.reload_all(),
                        }
                        last = head;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

enum Load {
    /// Changes the log delivered while the document was being loaded.
    Loading(Vec<Change>),
    Ready,
    /// The document cannot be served here (too large for one message).
    Failed(String),
}

struct DocInner {
    doc: Automerge,
    load: Load,
    /// The key holds a document in the log.
    exists: bool,
    /// Changes sent to the sequencer from this gateway and not yet seen in the log.
    pending: HashSet<ChangeHash>,
    watchers: Vec<Weak<Inbox>>,
}

/// One document of a space, as the log has it.
pub struct Doc {
    pub id: String,
    pub space: Arc<Space>,
    inner: Mutex<DocInner>,
    loaded: watch::Receiver<bool>,
    loaded_tx: watch::Sender<bool>,
}

/// What a socket needs from a document to answer a peer.
pub enum Answer {
    /// A sync message (encoded) for the peer, or nothing to say.
    Sync(Option<Vec<u8>>),
    /// Neither the log nor anything in flight from this gateway has the document.
    Unavailable,
    Failed(String),
}

impl Doc {
    fn lock(&self) -> std::sync::MutexGuard<'_, DocInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the document is loaded (or found unservable).
    pub async fn loaded(&self) {
        let mut l = self.loaded.clone();
        let _ = l.wait_for(|l| *l).await;
    }

    pub fn watch(&self, inbox: &Arc<Inbox>) {
        let mut inner = self.lock();
        inner.watchers.retain(|w| w.strong_count() > 0);
        if !inner
            .watchers
            .iter()
            .any(|w| w.as_ptr() == Arc::as_ptr(inbox))
        {
            inner.watchers.push(Arc::downgrade(inbox));
        }
    }

    /// Whether the log (or this gateway's queue) already has change `hash`; if not,
    /// it is marked pending and the caller sends it.
    pub fn claim(&self, hash: &ChangeHash) -> bool {
        let mut inner = self.lock();
        if inner.doc.get_change_meta_by_hash(hash).is_some() || inner.pending.contains(hash) {
            return false;
        }
        inner.pending.insert(*hash);
        true
    }

    /// A claimed change will not reach the log (refused or timed out).
    pub fn release(&self, hash: &ChangeHash) {
        self.lock().pending.remove(hash);
    }

    /// Whether some of `heads` are neither in the log nor on their way to it from
    /// this gateway: changes a peer holds that the server has not seen.
    pub fn lacks_any(&self, heads: &[ChangeHash]) -> bool {
        let inner = self.lock();
        heads
            .iter()
            .any(|h| inner.doc.get_change_meta_by_hash(h).is_none() && !inner.pending.contains(h))
    }

    /// Takes a peer's sync message into `sync_state` without applying its changes
    /// (they go through the sequencer), then answers from the durable document.
    pub fn receive(
        &self,
        sync_state: &mut sync::State,
        message: sync::Message,
        can_write: bool,
        requested: bool,
    ) -> Answer {
        let mut inner = self.lock();
        if let Load::Failed(why) = &inner.load {
            return Answer::Failed(why.clone());
        }
        let brought_changes = !message.changes.is_empty();
        let answered_these_heads =
            sync_state.have_responded && sync_state.last_sent_heads == inner.doc.get_heads();
        sync_state.read_only = true;
        if let Err(e) = receive_sync(&mut inner.doc, sync_state, message) {
            return Answer::Failed(format!("the sync message does not apply: {e}"));
        }
        sync_state.read_only = !can_write;
        if requested && !inner.exists && !brought_changes && inner.pending.is_empty() {
            return Answer::Unavailable;
        }
        let Some(msg) = generate_message(&inner.doc, sync_state) else {
            return Answer::Sync(None);
        };
        // Nothing new to say: the peer already has these heads from here, there are
        // no changes for it, and what its heads have that the log lacks is on its
        // way to the log from this gateway. Automerge would answer anyway (the heads
        // differ), the peer would answer that, and so on for as long as changes are
        // in flight: with concurrent typists, without end. The next message goes out
        // when the durable document moves (`generate`).
        if !requested
            && answered_these_heads
            && msg.changes.is_empty()
            && msg.need.iter().all(|h| inner.pending.contains(h))
        {
            return Answer::Sync(None);
        }
        Answer::Sync(Some(msg.encode()))
    }

    /// A sync message for a peer after the durable document moved (or nothing).
    pub fn generate(&self, sync_state: &mut sync::State) -> Option<Vec<u8>> {
        let inner = self.lock();
        match inner.load {
            Load::Ready => generate(&inner.doc, sync_state),
            _ => None,
        }
    }

    /// Whether the log has the document.
    pub fn exists(&self) -> bool {
        self.lock().exists
    }

    fn apply(&self, change: Change) {
        let watchers = {
            let mut inner = self.lock();
            inner.pending.remove(&change.hash());
            if let Load::Loading(buffer) = &mut inner.load {
                buffer.push(change);
                return;
            }
            let before = inner.doc.get_heads();
            if let Err(e) = inner.doc.apply_changes([change]) {
                warn!(doc = %self.id, error = %e, "a change of the log does not apply");
                return;
            }
            inner.exists = true;
            if inner.doc.get_heads() == before {
                return;
            }
            inner.watchers.clone()
        };
        for w in watchers.iter().filter_map(Weak::upgrade) {
            w.mark(&self.id);
        }
    }
}

/// Takes a peer's sync message into `sync_state`, as automerge does, except for one
/// shortcut: automerge records a changeless message whose heads equal ours as if we
/// had sent the peer those heads (`last_sent_heads`), and then says nothing. But the
/// peer learns the server's heads (automerge-repo's sync info, the page's "saved")
/// only from a message sent from here, and its heads can equal the log's before the
/// log's announcement went out: its last change reached the log while its reply to
/// an older announcement was on the way. Neither the answer to that reply nor
/// `generate` would then ever tell it. So what was really sent is kept (a message
/// with empty heads, a peer that lost everything, still resets it).
fn receive_sync(
    doc: &mut Automerge,
    sync_state: &mut sync::State,
    message: sync::Message,
) -> Result<(), automerge::AutomergeError> {
    let sent_heads = (!message.heads.is_empty()).then(|| sync_state.last_sent_heads.clone());
    doc.receive_sync_message(sync_state, message)?;
    if let Some(sent) = sent_heads {
        sync_state.last_sent_heads = sent;
    }
    Ok(())
}

/// A sync message from the durable document, without the flags section: a peer
/// that sees flags assumes the v2 format and may send whole documents, which the
/// gateway refuses (only changes, each admitted on its own, reach the sequencer).
fn generate(doc: &Automerge, sync_state: &mut sync::State) -> Option<Vec<u8>> {
    generate_message(doc, sync_state).map(sync::Message::encode)
}

fn generate_message(doc: &Automerge, sync_state: &mut sync::State) -> Option<sync::Message> {
    // Without advertised flags the peer cannot be sent a sync-reset flag either:
    // a reset is then sent as empty heads, which peers of every version understand.
    sync_state.their_capabilities = None;
    let mut msg = doc.generate_sync_message(sync_state)?;
    msg.flags = None;
    Some(msg)
}

/// Loads a document from a materializer at or past the topic's head, retrying
/// while anyone holds the document.
async fn load(doc: Weak<Doc>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(d) = doc.upgrade() else { return };
        let space = d.space.clone();
        let head = space.topic.head();
        let read = reads::document(&space.docs_root.nats, &space.key, &d.id, Some(head)).await;
        let outcome = match read {
            Ok(reply) => match reply.doc {
                Some(b64) => {
                    let decoded = tokio::task::spawn_blocking(move || {
                        let bytes = B64.decode(b64).map_err(|e| e.to_string())?;
                        Automerge::load(&bytes).map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                    decoded.map(Some)
                }
                // The key is absent (or not a document): an empty one.
                None => Ok(None),
            },
            Err(reads::ReadError::Refused {
                code: ultrasync_shared::ErrorCode::PayloadTooLarge,
                message,
            }) => {
                warn!(doc = %d.id, %message, "a document too large to serve over the automerge-repo endpoint");
                let mut inner = d.lock();
                inner.load =
                    Load::Failed(format!("document {} is too large for this endpoint", d.id));
                drop(inner);
                let _ = d.loaded_tx.send(true);
                return;
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(loaded) => {
                let watchers = {
                    let mut inner = d.lock();
                    let buffered = match std::mem::replace(&mut inner.load, Load::Ready) {
                        Load::Loading(b) => b,
                        _ => Vec::new(),
                    };
                    inner.exists = loaded.is_some() || !buffered.is_empty();
                    let mut doc = loaded.unwrap_or_default();
                    for c in &buffered {
                        inner.pending.remove(&c.hash());
                    }
                    if let Err(e) = doc.apply_changes(buffered) {
                        warn!(doc = %d.id, error = %e, "changes of the log do not apply");
                    }
                    let pending: Vec<ChangeHash> = inner.pending.iter().copied().collect();
                    for h in pending {
                        if doc.get_change_meta_by_hash(&h).is_some() {
                            inner.pending.remove(&h);
                        }
                    }
                    inner.doc = doc;
                    inner.watchers.clone()
                };
                let _ = d.loaded_tx.send(true);
                for w in watchers.iter().filter_map(Weak::upgrade) {
                    w.mark(&d.id);
                }
                return;
            }
            Err(e) => {
                debug!(doc = %d.id, error = %e, "loading a document failed; retrying");
                drop(d);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RELOAD_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ROOT;
    use automerge::transaction::Transactable;

    fn edit(doc: &mut Automerge, n: i64) {
        let mut tx = doc.transaction();
        tx.put(ROOT, "n", n).expect("put");
        tx.commit();
    }

    #[test]
    fn a_peer_whose_change_reached_the_log_before_its_reply_is_told_the_heads() {
        // The log's document announces the peer's first change to it.
        let mut peer = Automerge::new();
        edit(&mut peer, 1);
        let mut log = Automerge::new();
        log.merge(&mut peer.clone()).expect("merge");
        let mut state = sync::State::new();
        state.read_only = true;
        let announced = generate_message(&log, &mut state).expect("an announcement");
        assert_eq!(announced.heads, log.get_heads());
        // The peer's next change reaches the log (through the sequencer, not this
        // sync state), and then its changeless reply to the older announcement
        // arrives, naming heads that are now the log's.
        edit(&mut peer, 2);
        log.merge(&mut peer.clone()).expect("merge");
        let mut reply = peer
            .generate_sync_message(&mut sync::State::new())
            .expect("a message");
        reply.changes = Vec::<Vec<u8>>::new().into();
        assert_eq!(reply.heads, log.get_heads());

        // Automerge's own receive takes the peer's heads as sent from here and has
        // nothing more to say: the peer would never hear the log's heads.
        let mut plain = state.clone();
        log.clone()
            .receive_sync_message(&mut plain, reply.clone())
            .expect("receive");
        assert!(generate_message(&log, &mut plain).is_none());

        receive_sync(&mut log, &mut state, reply).expect("receive");
        let told = generate_message(&log, &mut state).expect("the log's heads are sent");
        assert_eq!(told.heads, log.get_heads());
        assert!(told.changes.is_empty());
        assert!(
            generate_message(&log, &mut state).is_none(),
            "and only once"
        );
        // The same reply again (a peer repeating itself) gets no further answer.
        let mut again = peer
            .generate_sync_message(&mut sync::State::new())
            .expect("a message");
        again.changes = Vec::<Vec<u8>>::new().into();
        receive_sync(&mut log, &mut state, again).expect("receive");
        assert!(generate_message(&log, &mut state).is_none());
    }
}
