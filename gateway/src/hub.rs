//! Fan-out. Each gateway follows every stream key that at least one of its sockets
//! subscribes to with exactly one ordered JetStream consumer (a *topic*), keeps the
//! newest ops in a ring, and broadcasts new ops to the sockets' followers. Sockets
//! never get a consumer of their own for live ops, so a thousand sockets on one
//! namespace cost one consumer. A follower that falls behind the broadcast fills the
//! hole from the ring or, failing that, from the log, so nothing is ever skipped.
//!
//! Memory is bounded per topic in ops and in bytes: the ring holds the newest
//! [`RING`] ops but no more than [`RING_BYTES`] of them (at least the newest op), and
//! the broadcast carries weak references, so an op leaves memory when it leaves the
//! ring. A follower that receives one already gone treats it as a lag and reads the
//! log: a tenant writing large ops costs the gateway a few MiB per topic, not 4096
//! times its largest op.
//!
//! A topic lives while someone follows it: when its last follower drops it, its
//! consumer task stops and it leaves the map, so the map holds the stream keys
//! followed now, never every namespace ever followed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::stream::Stream;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};
use ultrasync_shared::log::{self, LogEntry};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::snapshot::{self, Snapshot};
use ultrasync_shared::{ErrorCode, StreamKey};
use ultrasync_shared::{protocol, reads};

use crate::rules::Refusal;

/// Ops a topic keeps for followers that are slightly behind.
const RING: usize = 4096;
/// Bytes of encoded ops a topic's ring may hold (it always holds the newest op).
pub const RING_BYTES: usize = 8 << 20;
/// Ops a broadcast may hold for its slowest follower before it lags.
const BROADCAST: usize = 4096;

/// One committed op, encoded as stored.
#[derive(Debug)]
pub struct LiveOp {
    pub server_seq: u64,
    /// The op's JSON as stored (a view into `frame` when it is valid UTF-8, as
    /// everything the sequencer writes is).
    pub body: Bytes,
    /// The `ops` frame carrying this op alone: what a live socket is sent, encoded
    /// once per topic and shared by every socket.
    frame: Utf8Bytes,
}

impl LiveOp {
    /// `entry` of a topic on `namespace`, with its frame.
    pub fn new(entry: LogEntry, namespace: &str) -> Self {
        let frame: Utf8Bytes =
            protocol::encode_ops_frame(namespace, entry.server_seq, [entry.payload.as_ref()])
                .into();
        // The frame ends with `BODY]}` when the body went in unchanged.
        let end = frame.len().saturating_sub(2);
        let start = end.saturating_sub(entry.payload.len());
        let body = match frame.as_bytes().get(start..end) {
            Some(inside) if inside == entry.payload.as_ref() => {
                Bytes::from(frame.clone()).slice(start..end)
            }
            _ => entry.payload,
        };
        Self {
            server_seq: entry.server_seq,
            body,
            frame,
        }
    }

    /// The `ops` frame carrying only this op.
    pub fn frame(&self) -> Utf8Bytes {
        self.frame.clone()
    }

    /// Bytes this op holds: its frame, and its body when that is not a view into it.
    fn held_bytes(&self) -> usize {
        let frame = self.frame.as_bytes().as_ptr_range();
        let inside = frame.contains(&self.body.as_ptr()) || self.body.is_empty();
        self.frame.len() + if inside { 0 } else { self.body.len() }
    }
}

/// A follower's end of a topic's broadcast. The broadcast holds weak references,
/// so an op the ring let go of is gone for a follower that had not taken it yet:
/// that reads as a lag, and the follower fills the hole from the ring or the log.
pub struct LiveRx(broadcast::Receiver<Weak<LiveOp>>);

impl LiveRx {
    /// The next op; `Lagged` when ops were missed (overrun, or let go of by the ring).
    pub async fn recv(&mut self) -> Result<Arc<LiveOp>, broadcast::error::RecvError> {
        let op = self.0.recv().await?;
        op.upgrade().ok_or(broadcast::error::RecvError::Lagged(1))
    }

    /// The next op if one is queued; `Lagged` as for [`recv`](Self::recv).
    pub fn try_recv(&mut self) -> Result<Arc<LiveOp>, broadcast::error::TryRecvError> {
        let op = self.0.try_recv()?;
        op.upgrade()
            .ok_or(broadcast::error::TryRecvError::Lagged(1))
    }
}

type Topics = Mutex<TopicMap>;

/// The topics by stream key, and how many each org has.
#[derive(Default)]
struct TopicMap {
    by_key: HashMap<StreamKey, Weak<Topic>>,
    per_org: HashMap<ultrasync_shared::Id, usize>,
}

impl TopicMap {
    fn get(&self, key: &StreamKey) -> Option<&Weak<Topic>> {
        self.by_key.get(key)
    }

    /// Lists `topic` for `key` (in place of a dropped one, if any).
    fn insert(&mut self, key: StreamKey, topic: Weak<Topic>) {
        let org = key.org.clone();
        if self.by_key.insert(key, topic).is_none() {
            *self.per_org.entry(org).or_default() += 1;
        }
    }

    /// Takes `key` out when its topic is gone.
    fn remove_dropped(&mut self, key: &StreamKey) {
        if self.by_key.get(key).is_some_and(|t| t.strong_count() == 0) {
            self.by_key.remove(key);
            if let Some(n) = self.per_org.get_mut(&key.org) {
                *n -= 1;
                if *n == 0 {
                    self.per_org.remove(&key.org);
                }
            }
        }
    }

    fn of_org(&self, org: &ultrasync_shared::Id) -> usize {
        self.per_org.get(org).copied().unwrap_or(0)
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// How many stream keys a gateway follows (a consumer on `USYNC_OPS` each): in all,
/// and per org.
#[derive(Debug, Clone, Copy)]
pub struct FollowLimits {
    pub keys: usize,
    pub keys_per_org: usize,
}

/// The gateway's topics, by stream key.
pub struct Hub {
    client: async_nats::Client,
    ops: Stream,
    snapshots: async_nats::jetstream::object_store::ObjectStore,
    topics: Arc<Topics>,
    limits: FollowLimits,
}

impl Hub {
    pub fn new(
        client: async_nats::Client,
        ops: Stream,
        snapshots: async_nats::jetstream::object_store::ObjectStore,
        limits: FollowLimits,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            ops,
            snapshots,
            topics: Arc::default(),
            limits,
        })
    }

    pub fn ops_stream(&self) -> &Stream {
        &self.ops
    }

    /// The gateway's NATS connection (batched direct gets of the log).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The newest `server_seq` of `key`: from its topic when this gateway follows it,
    /// else from the log.
    pub async fn head(&self, key: &StreamKey) -> Result<u64, log::LogError> {
        let followed = self
            .topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .and_then(Weak::upgrade);
        if let Some(topic) = followed {
            let head = topic.head();
            if head > 0 {
                return Ok(head);
            }
        }
        Ok(log::head(&self.ops, &ops_subject(key))
            .await?
            .map_or(0, |h| h.server_seq))
    }

    /// The newest sound snapshot of `key`, if any. A damaged one is never served: a
    /// materializer is asked for the state instead, and to store it over the damaged
    /// one.
    pub async fn snapshot(&self, key: &StreamKey) -> Result<Option<Snapshot>, String> {
        match snapshot::fetch(&self.snapshots, key).await {
            Ok(s) => Ok(s),
            Err(snapshot::FetchError::Refused(why)) => {
                warn!(stream_key = %key, %why, "refusing a damaged snapshot; asking a materializer");
                self.materialized(key, true).await
            }
            Err(e) => {
                warn!(stream_key = %key, error = %e, "snapshot store unreadable; asking a materializer");
                self.materialized(key, false)
                    .await
                    .map_err(|_| e.to_string())
            }
        }
    }

    /// `key`'s state from a materializer, as of what it has applied (`None` when it
    /// holds nothing, or no materializer runs). With `store`, it also writes that
    /// state to the snapshot store.
    pub async fn materialized(
        &self,
        key: &StreamKey,
        store: bool,
    ) -> Result<Option<Snapshot>, String> {
        if store {
            return reads::stored_snapshot(&self.client, &self.snapshots, key, None).await;
        }
        match reads::snapshot(&self.client, key, &reads::ReadRequest::default()).await {
            Ok(s) if s.state.last_seq > 0 => Ok(Some(s)),
            Ok(_) | Err(reads::ReadError::NoResponders) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Every followed stream key with the newest `server_seq` this gateway has fanned
    /// out, sorted.
    pub fn followed(&self) -> Vec<(StreamKey, u64)> {
        let mut out: Vec<(StreamKey, u64)> = self
            .live_topics()
            .iter()
            .map(|t| (t.key.clone(), t.head()))
            .collect();
        out.sort();
        out
    }

    /// The topics followed now. Upgraded under the map's lock, to be read (and
    /// possibly dropped: dropping a topic takes that lock) after it.
    fn live_topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The topic for `key`. A key nobody follows yet is started only within the
    /// gateway's and the org's share of followed keys ([`FollowLimits`]). Each is a
    /// consumer on the op log, which every reader of the log shares: one org
    /// following keys without end would leave none for the others.
    pub fn follow(&self, key: &StreamKey) -> Result<Arc<Topic>, Refusal> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = topics.get(key).and_then(Weak::upgrade) {
            return Ok(t);
        }
        if topics.len() >= self.limits.keys {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "this gateway follows as many stream keys as it may; retry later",
            ));
        }
        if topics.of_org(&key.org) >= self.limits.keys_per_org {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                "this org follows as many stream keys on this gateway as it may; unsubscribe from some",
            ));
        }
        let topic = Topic::start(key.clone(), self.ops.clone(), Arc::downgrade(&self.topics));
        topics.insert(key.clone(), Arc::downgrade(&topic));
        Ok(topic)
    }

    /// Stream keys followed right now.
    pub fn topic_count(&self) -> usize {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics
            .by_key
            .values()
            .filter(|t| t.strong_count() > 0)
            .count()
    }

    /// Bytes of ops the followed topics' rings hold.
    pub fn ring_bytes(&self) -> usize {
        self.live_topics().iter().map(|t| t.lock().ring_bytes).sum()
    }

    /// Shows the number of topics and what their rings hold on `/metrics`.
    pub fn export(self: &Arc<Self>, metrics: &crate::Metrics) {
        let hub = Arc::downgrade(self);
        metrics.probe(
            "ultrasync_gateway_followed_stream_keys",
            "gauge",
            "Stream keys this gateway follows.",
            Box::new(move || hub.upgrade().map_or(0, |h| h.topic_count() as u64)),
        );
        let hub = Arc::downgrade(self);
        metrics.probe(
            "ultrasync_gateway_topic_ring_bytes",
            "gauge",
            "Bytes of recent ops the followed stream keys' rings hold (at most 8 MiB each).",
            Box::new(move || hub.upgrade().map_or(0, |h| h.ring_bytes() as u64)),
        );
    }
}

struct TopicState {
    /// Newest `server_seq` seen (the head when the topic started, then live).
    last_seq: u64,
    /// The newest ops, dense; at most [`RING`] of them and [`RING_BYTES`] (or one).
    ring: VecDeque<Arc<LiveOp>>,
    /// Bytes the ring's ops hold.
    ring_bytes: usize,
}

/// One followed stream key.
pub struct Topic {
    pub key: StreamKey,
    pub subject: String,
    state: Mutex<TopicState>,
    tx: broadcast::Sender<Weak<LiveOp>>,
    ready: watch::Receiver<bool>,
    /// The map this topic is listed in; the topic leaves it when dropped.
    registry: Weak<Topics>,
    /// Stops the follower task when the last follower drops the topic.
    _stop: DropGuard,
}

impl Drop for Topic {
    /// The last follower left: out of the map (unless a new topic for the same key
    /// took its place meanwhile).
    fn drop(&mut self) {
        let Some(topics) = self.registry.upgrade() else {
            return;
        };
        let mut topics = topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.remove_dropped(&self.key);
    }
}

impl Topic {
    fn start(key: StreamKey, ops: Stream, registry: Weak<Topics>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(BROADCAST);
        let (ready_tx, ready) = watch::channel(false);
        let stop = CancellationToken::new();
        let topic = Arc::new(Self {
            subject: ops_subject(&key),
            key,
            state: Mutex::new(TopicState {
                last_seq: 0,
                ring: VecDeque::with_capacity(64),
                ring_bytes: 0,
            }),
            tx,
            ready,
            registry,
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(follow_log(Arc::downgrade(&topic), ops, ready_tx, stop));
        topic
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TopicState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver for every op after the returned head.
    pub async fn subscribe(&self) -> (LiveRx, u64) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
        let st = self.lock();
        (LiveRx(self.tx.subscribe()), st.last_seq)
    }

    pub fn head(&self) -> u64 {
        self.lock().last_seq
    }

    /// Ops `from..=to` if the ring still holds all of them.
    pub fn recent(&self, from: u64, to: u64) -> Option<Vec<Arc<LiveOp>>> {
        let st = self.lock();
        let first = st.ring.front()?.server_seq;
        let last = st.ring.back()?.server_seq;
        if from < first || to > last || to < from {
            return None;
        }
        let start = (from - first) as usize;
        let end = (to - first) as usize;
        Some(st.ring.range(start..=end).cloned().collect())
    }

    fn push(&self, entry: LogEntry) {
        let mut st = self.lock();
        if entry.server_seq <= st.last_seq {
            return;
        }
        if entry.server_seq != st.last_seq + 1 && st.last_seq != 0 {
            // Only possible if the log itself has a hole; the ring must stay dense.
            warn!(stream_key = %self.key, expected = st.last_seq + 1, got = entry.server_seq, "op log is not dense");
            st.ring.clear();
            st.ring_bytes = 0;
        }
        st.last_seq = entry.server_seq;
        let op = Arc::new(LiveOp::new(entry, self.key.namespace.as_str()));
        st.ring_bytes += op.held_bytes();
        st.ring.push_back(op.clone());
        while st.ring.len() > RING || (st.ring_bytes > RING_BYTES && st.ring.len() > 1) {
            let Some(old) = st.ring.pop_front() else {
                break;
            };
            st.ring_bytes -= old.held_bytes();
        }
        // Sent under the lock, after the ring let go of older ops: a follower that
        // finds an op gone always finds a newer one queued behind it. No receivers
        // is fine: followers come and go.
        let _ = self.tx.send(Arc::downgrade(&op));
    }

    /// Ops and bytes the ring holds.
    #[cfg(test)]
    fn ring_size(&self) -> (usize, usize) {
        let st = self.lock();
        (st.ring.len(), st.ring_bytes)
    }
}

/// Follows the log for one topic until the topic is dropped.
async fn follow_log(
    topic: Weak<Topic>,
    ops: Stream,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let Some(subject) = topic.upgrade().map(|t| t.subject.clone()) else {
        return;
    };
    let mut next_stream_seq: Option<u64> = None;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let start = match next_stream_seq {
            Some(s) => s,
            None => match log::head(&ops, &subject).await {
                Ok(head) => {
                    if let Some(t) = topic.upgrade() {
                        let mut st = t.lock();
                        st.last_seq = st.last_seq.max(head.map_or(0, |h| h.server_seq));
                    }
                    let _ = ready.send(true);
                    head.map_or(1, |h| h.stream_seq + 1)
                }
                Err(e) => {
                    warn!(subject = %subject, error = %e, "reading the head failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            },
        };
        let entries = match log::read_from(&ops, &subject, start).await {
            Ok(e) => e,
            Err(e) => {
                warn!(subject = %subject, error = %e, "following the log failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let mut entries = std::pin::pin!(entries);
        next_stream_seq = Some(start);
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => {
                    debug!(subject = %subject, "topic closed");
                    return;
                }
                item = entries.next() => item,
            };
            match item {
                Some(Ok(entry)) => {
                    next_stream_seq = Some(entry.stream_seq + 1);
                    match topic.upgrade() {
                        Some(t) => t.push(entry),
                        None => return,
                    }
                }
                Some(Err(
                    log::LogError::MissingSeq { stream_seq }
                    | log::LogError::BadBatch { stream_seq, .. },
                )) => {
                    warn!(subject = %subject, stream_seq, "skipping a message that is not ops");
                    next_stream_seq = Some(stream_seq + 1);
                }
                Some(Err(e)) => {
                    warn!(subject = %subject, error = %e, "op log read failed; resuming");
                    break;
                }
                None => break,
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str) -> StreamKey {
        StreamKey {
            org: ultrasync_shared::Id::parse("org", "acme").expect("id"),
            project: ultrasync_shared::Id::parse("project", "p").expect("id"),
            namespace: ultrasync_shared::Id::parse("namespace", ns).expect("id"),
        }
    }

    /// A topic without its log follower (that needs a stream).
    fn topic(key: StreamKey, registry: Weak<Topics>) -> Arc<Topic> {
        topic_with(key, registry, 4)
    }

    fn topic_with(key: StreamKey, registry: Weak<Topics>, broadcast: usize) -> Arc<Topic> {
        let (tx, _) = broadcast::channel(broadcast);
        let (_, ready) = watch::channel(true);
        Arc::new(Topic {
            subject: ops_subject(&key),
            key,
            state: Mutex::new(TopicState {
                last_seq: 0,
                ring: VecDeque::new(),
                ring_bytes: 0,
            }),
            tx,
            ready,
            registry,
            _stop: CancellationToken::new().drop_guard(),
        })
    }

    fn entry(server_seq: u64, bytes: usize) -> LogEntry {
        LogEntry {
            stream_seq: server_seq,
            server_seq,
            op_id: format!("op{server_seq}"),
            payload: format!("\"{}\"", "x".repeat(bytes)).into(),
        }
    }

    /// Large ops: the ring keeps what fits in its bytes, an op it let go of is gone
    /// from the broadcast too (a follower sees a lag), and the newest op is always
    /// there.
    #[tokio::test]
    async fn the_ring_is_bounded_in_bytes_and_lets_go_of_what_it_drops() {
        let topics: Arc<Topics> = Arc::default();
        let t = topic_with(key("big"), Arc::downgrade(&topics), BROADCAST);
        let (mut rx, head) = t.subscribe().await;
        assert_eq!(head, 0);
        let op_bytes = 256 * 1024;
        let n = 4 * RING_BYTES / op_bytes;
        for seq in 1..=n as u64 {
            t.push(entry(seq, op_bytes));
            let (ops, bytes) = t.ring_size();
            assert!(bytes <= RING_BYTES, "{ops} ops, {bytes} bytes");
        }
        let (ops, bytes) = t.ring_size();
        assert!(
            ops < n && ops >= RING_BYTES / (op_bytes + 200) - 1,
            "{ops} ops"
        );
        assert!(bytes >= RING_BYTES - op_bytes - 200 && bytes <= RING_BYTES);
        // The ring is dense and ends at the head; older ops come from the log.
        let first = n as u64 - ops as u64 + 1;
        assert_eq!(t.recent(first, n as u64).map(|o| o.len()), Some(ops));
        assert!(t.recent(first - 1, n as u64).is_none());
        // The broadcast still has a slot for every op, but the ops the ring let go of
        // are gone: the follower sees a lag for each, then the ring's ops.
        let mut got = Vec::new();
        loop {
            match rx.try_recv() {
                Ok(op) => got.push(op.server_seq),
                Err(broadcast::error::TryRecvError::Lagged(_)) => got.push(0),
                Err(_) => break,
            }
        }
        let expected: Vec<u64> = (1..=n as u64)
            .map(|s| if s < first { 0 } else { s })
            .collect();
        assert_eq!(got, expected);
        // An op bigger than the whole budget is still kept, alone.
        t.push(entry(n as u64 + 1, RING_BYTES + 1));
        assert_eq!(t.ring_size().0, 1);
        assert_eq!(rx.try_recv().map(|o| o.server_seq).ok(), Some(n as u64 + 1));
        // Ops of normal size: the count bound.
        let small = topic(key("small"), Arc::downgrade(&topics));
        for seq in 1..=(RING as u64 + 10) {
            small.push(entry(seq, 10));
        }
        assert_eq!(small.ring_size().0, RING);
    }

    #[test]
    fn followed_keys_are_counted_per_org_as_topics_come_and_go() {
        let topics: Arc<Topics> = Arc::default();
        let lock = || topics.lock().expect("lock");
        let org = |o: &str| ultrasync_shared::Id::parse("org", o).expect("org");
        let other = StreamKey::parse("other", "web", "a").expect("key");
        let a = topic(key("a"), Arc::downgrade(&topics));
        let b = topic(key("b"), Arc::downgrade(&topics));
        let c = topic(other.clone(), Arc::downgrade(&topics));
        lock().insert(key("a"), Arc::downgrade(&a));
        lock().insert(key("b"), Arc::downgrade(&b));
        lock().insert(other, Arc::downgrade(&c));
        assert_eq!(lock().of_org(&key("a").org), 2);
        assert_eq!(lock().of_org(&org("other")), 1);
        // A replacement of a dropped topic is the same key, counted once.
        let a2 = topic(key("a"), Arc::downgrade(&topics));
        lock().insert(key("a"), Arc::downgrade(&a2));
        drop(a);
        assert_eq!(lock().of_org(&key("a").org), 2);
        drop((a2, b, c));
        assert_eq!(lock().of_org(&key("a").org), 0);
        assert!(lock().per_org.is_empty() && lock().is_empty());
    }

    #[test]
    fn a_topic_leaves_the_map_with_its_last_follower() {
        let topics: Arc<Topics> = Arc::default();
        let lock = || topics.lock().expect("lock");
        let a = topic(key("a"), Arc::downgrade(&topics));
        let b = topic(key("b"), Arc::downgrade(&topics));
        lock().insert(key("a"), Arc::downgrade(&a));
        lock().insert(key("b"), Arc::downgrade(&b));
        let follower = a.clone();
        drop(a);
        assert_eq!(lock().len(), 2);
        drop(follower);
        assert_eq!(lock().len(), 1);
        // A replacement listed before the old topic is dropped stays.
        let b2 = topic(key("b"), Arc::downgrade(&topics));
        lock().insert(key("b"), Arc::downgrade(&b2));
        drop(b);
        assert_eq!(lock().len(), 1);
        drop(b2);
        assert!(lock().is_empty());
    }
}
