//! Presence (the `ephemeral` namespace): who is here and what they show, never in the
//! op log. Entries travel over core NATS on `usync.presence.{org}.{project}` so every
//! gateway sees every update; each gateway keeps a table per (org, project) that at
//! least one of its sockets has joined. Updates are last-writer-wins by `hlc_ts`, live
//! for a TTL unless refreshed, and a `null` payload removes an entry (sent on leave,
//! on disconnect, and on expiry). A gateway opening a table asks the others for theirs
//! on `usync.presence.{org}.{project}.sync`, so a joining client gets the current set.
//!
//! What a client can make the tables hold is bounded (SPEC invariant 9): keys per
//! client, payload bytes per entry and entries per (org, project). An update from this
//! gateway's sockets over a bound is refused before anything is published; a table
//! also drops (and counts) what arrives from other gateways beyond its bounds, so a
//! gateway configured otherwise cannot grow it. A table lives while one of this
//! gateway's sockets has joined it and leaves the map with its last member.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};
use ultrasync_shared::config::GatewayConfig;
use ultrasync_shared::nats::presence_subject;
use ultrasync_shared::protocol::ServerMessage;
use ultrasync_shared::{ErrorCode, Id};

/// How long a new table waits for other gateways' tables.
const SYNC_WAIT: Duration = Duration::from_millis(150);
const BROADCAST: usize = 1024;
/// Bytes of one answer to a sync request; a larger table answers in several messages
/// (a full table is far above NATS's largest message).
const SYNC_CHUNK: usize = 256 * 1024;
/// What an event carries beside its payload, at most: two ids, a key of up to 512
/// bytes, a timestamp, the TTL and the JSON around them. A message from another
/// gateway longer than this plus the payload bound is dropped before it is parsed.
const EVENT_OVERHEAD: usize = 1024;
/// How often the keys this gateway's clients show are swept for expired ones.
const SWEEP: Duration = Duration::from_secs(1);

/// What presence may hold (`gateway.presence_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Keys one client (org, project, actor, client) shows at once.
    pub keys_per_client: usize,
    /// Encoded JSON bytes of one entry's payload.
    pub payload_bytes: usize,
    /// Entries one (org, project) table holds.
    pub entries_per_room: usize,
}

impl Limits {
    pub fn from_config(config: &GatewayConfig) -> Self {
        Self {
            keys_per_client: config.presence_keys_per_client,
            payload_bytes: config.presence_payload_bytes,
            entries_per_room: config.presence_entries_per_room,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_config(&GatewayConfig::default())
    }
}

/// A refused update: the code and message for the client.
pub type Refused = (ErrorCode, String);

/// (org, project).
type RoomId = (Id, Id);
/// (actor, client, key).
type Slot = (String, String, String);
type Rooms = Mutex<HashMap<RoomId, Weak<Room>>>;
/// Per (actor, client) of one room: each key shown, until when.
type RoomShown = HashMap<(String, String), HashMap<String, Instant>>;

/// One presence update as it travels between gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub actor_id: String,
    pub client_id: String,
    pub key: String,
    /// `null` removes the entry.
    pub payload: Value,
    /// uhlc timestamp, decimal.
    pub hlc_ts: String,
    /// Milliseconds the entry lives after it arrives.
    pub ttl_ms: u64,
}

impl Event {
    fn hlc(&self) -> u64 {
        self.hlc_ts.parse().unwrap_or(0)
    }

    fn slot(&self) -> (String, String, String) {
        (
            self.actor_id.clone(),
            self.client_id.clone(),
            self.key.clone(),
        )
    }

    pub fn frame(&self) -> ServerMessage {
        ServerMessage::Presence {
            actor_id: self.actor_id.clone(),
            client_id: self.client_id.clone(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            hlc_ts: self.hlc_ts.clone(),
        }
    }
}

struct Entry {
    event: Arc<Event>,
    expires: Instant,
}

/// The keys this gateway's own clients show, per room and (actor, client), with when
/// each expires. The per-client bound counts here, since the room's table need not
/// be open on this gateway; empty clients and rooms leave the map.
#[derive(Default)]
struct Shown {
    rooms: HashMap<RoomId, RoomShown>,
    swept: Option<Instant>,
}

impl Shown {
    /// Records that the client shows `key` until `expires`, unless that is one key
    /// too many for the client or (as far as this gateway knows) for the room.
    fn admit(
        &mut self,
        room: &RoomId,
        client: (&str, &str),
        key: &str,
        now: Instant,
        expires: Instant,
        limits: &Limits,
    ) -> Result<(), Refused> {
        if self.swept.is_none_or(|t| now.duration_since(t) >= SWEEP) {
            self.sweep(now);
        }
        let clients = self.rooms.entry(room.clone()).or_default();
        let id = (client.0.to_owned(), client.1.to_owned());
        let keys = clients.entry(id.clone()).or_default();
        keys.retain(|_, t| *t > now);
        let known = keys.contains_key(key);
        let mine = keys.len();
        let refusal = if known {
            None
        } else if mine >= limits.keys_per_client {
            Some(format!(
                "a client may show {} presence keys at once; remove one (null payload) first",
                limits.keys_per_client
            ))
        } else if clients.values().map(HashMap::len).sum::<usize>() >= limits.entries_per_room {
            Some(format!(
                "this project shows {} presence entries, the most it may",
                limits.entries_per_room
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            if clients.get(&id).is_some_and(HashMap::is_empty) {
                clients.remove(&id);
            }
            if clients.is_empty() {
                self.rooms.remove(room);
            }
            return Err((ErrorCode::RateLimited, message));
        }
        clients
            .entry(id)
            .or_default()
            .insert(key.to_owned(), expires);
        Ok(())
    }

    /// The client no longer shows `key`.
    fn forget(&mut self, room: &RoomId, client: (&str, &str), key: &str) {
        let Some(clients) = self.rooms.get_mut(room) else {
            return;
        };
        let id = (client.0.to_owned(), client.1.to_owned());
        if let Some(keys) = clients.get_mut(&id) {
            keys.remove(key);
            if keys.is_empty() {
                clients.remove(&id);
            }
        }
        if clients.is_empty() {
            self.rooms.remove(room);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.swept = Some(now);
        self.rooms.retain(|_, clients| {
            clients.retain(|_, keys| {
                keys.retain(|_, t| *t > now);
                !keys.is_empty()
            });
            !clients.is_empty()
        });
    }

    fn entries(&self) -> usize {
        self.rooms
            .values()
            .flat_map(HashMap::values)
            .map(HashMap::len)
            .sum()
    }
}

/// The presence tables of one gateway.
pub struct Presence {
    nats: async_nats::Client,
    hlc: uhlc::HLC,
    ttl: Duration,
    limits: Limits,
    rooms: Arc<Rooms>,
    shown: Mutex<Shown>,
    /// Entries from other gateways that a table dropped for a bound.
    dropped: Arc<AtomicU64>,
}

impl Presence {
    /// Presence with the default [`Limits`].
    pub fn new(nats: async_nats::Client, ttl: Duration) -> Arc<Self> {
        Self::with_limits(nats, ttl, Limits::default())
    }

    pub fn with_limits(nats: async_nats::Client, ttl: Duration, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            nats,
            hlc: uhlc::HLC::default(),
            ttl,
            limits,
            rooms: Arc::new(Mutex::new(HashMap::new())),
            shown: Mutex::new(Shown::default()),
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Publishes an update from one of this gateway's sockets. Refused, before
    /// anything is published, with `payload_too_large` when the payload is over
    /// `presence_payload_bytes`, and with `rate_limited` when a new key is one too
    /// many for the client or for the room. A `null` payload (leaving) always goes.
    pub async fn publish(
        &self,
        org: &Id,
        project: &Id,
        actor_id: &str,
        client_id: &str,
        key: &str,
        payload: Value,
    ) -> Result<(), Refused> {
        let room_id = (org.clone(), project.clone());
        let client = (actor_id, client_id);
        if payload.is_null() {
            self.shown().forget(&room_id, client, key);
        } else {
            let size = serde_json::to_vec(&payload).map_or(usize::MAX, |v| v.len());
            if size > self.limits.payload_bytes {
                return Err((
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "presence payload is {size} bytes; the limit is {}",
                        self.limits.payload_bytes
                    ),
                ));
            }
            let open = self.lock().get(&room_id).and_then(Weak::upgrade);
            let slot = (actor_id.to_owned(), client_id.to_owned(), key.to_owned());
            if open.is_some_and(|room| !room.has_space_for(&slot)) {
                return Err((
                    ErrorCode::RateLimited,
                    format!(
                        "this project shows {} presence entries, the most it may",
                        self.limits.entries_per_room
                    ),
                ));
            }
            let now = Instant::now();
            self.shown()
                .admit(&room_id, client, key, now, now + self.ttl, &self.limits)?;
        }
        let event = Event {
            actor_id: actor_id.to_owned(),
            client_id: client_id.to_owned(),
            key: key.to_owned(),
            payload,
            hlc_ts: self.hlc.new_timestamp().get_time().as_u64().to_string(),
            ttl_ms: self.ttl.as_millis() as u64,
        };
        let body = serde_json::to_vec(&event).unwrap_or_default();
        if let Err(e) = self
            .nats
            .publish(
                presence_subject(org.as_str(), project.as_str()),
                body.into(),
            )
            .await
        {
            warn!(error = %e, "publishing presence failed");
        }
        Ok(())
    }

    /// The table for (org, project), opened (and filled from the other gateways)
    /// when no local socket has joined it yet.
    pub async fn room(&self, org: &Id, project: &Id) -> anyhow::Result<Arc<Room>> {
        let id = (org.clone(), project.clone());
        if let Some(room) = self.lock().get(&id).and_then(Weak::upgrade) {
            return Ok(room);
        }
        let room = Room::open(
            &self.nats,
            id.clone(),
            self.limits,
            self.dropped.clone(),
            Arc::downgrade(&self.rooms),
        )
        .await?;
        // Another socket may have opened it meanwhile: keep the first. (The loser is
        // dropped after the lock is released: dropping a room takes the lock.)
        let existing = {
            let mut rooms = self.lock();
            let existing = rooms.get(&id).and_then(Weak::upgrade);
            if existing.is_none() {
                rooms.insert(id, Arc::downgrade(&room));
            }
            existing
        };
        Ok(existing.unwrap_or(room))
    }

    /// Tables open on this gateway.
    pub fn room_count(&self) -> usize {
        self.lock().len()
    }

    /// Entries in the open tables.
    pub fn entry_count(&self) -> usize {
        let rooms: Vec<Arc<Room>> = self.lock().values().filter_map(Weak::upgrade).collect();
        rooms.iter().map(|r| r.lock().len()).sum()
    }

    /// Keys this gateway's own clients show.
    pub fn shown_count(&self) -> usize {
        self.shown().entries()
    }

    /// Entries from other gateways dropped for a bound, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Renders the tables' sizes on `/metrics`.
    pub fn export(self: &Arc<Self>, metrics: &crate::Metrics) {
        let probe = |name, kind, help, read: fn(&Self) -> u64| {
            let weak = Arc::downgrade(self);
            let value = move || weak.upgrade().map_or(0, |p| read(&p));
            metrics.probe(name, kind, help, Box::new(value));
        };
        probe(
            "ultrasync_gateway_presence_rooms",
            "gauge",
            "Presence tables open on this gateway.",
            |p| p.room_count() as u64,
        );
        probe(
            "ultrasync_gateway_presence_entries",
            "gauge",
            "Entries in the open presence tables.",
            |p| p.entry_count() as u64,
        );
        probe(
            "ultrasync_gateway_presence_shown_keys",
            "gauge",
            "Presence keys this gateway's clients show.",
            |p| p.shown_count() as u64,
        );
        probe(
            "ultrasync_gateway_presence_dropped_total",
            "counter",
            "Presence entries from other gateways dropped for a bound.",
            Self::dropped,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoomId, Weak<Room>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shown(&self) -> std::sync::MutexGuard<'_, Shown> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One (org, project)'s presence table on this gateway.
pub struct Room {
    id: RoomId,
    table: Mutex<HashMap<Slot, Entry>>,
    tx: broadcast::Sender<Arc<Event>>,
    limits: Limits,
    dropped: Arc<AtomicU64>,
    /// The map this room is listed in; the room leaves it when dropped.
    registry: Weak<Rooms>,
    _stop: DropGuard,
}

impl Room {
    async fn open(
        nats: &async_nats::Client,
        id: RoomId,
        limits: Limits,
        dropped: Arc<AtomicU64>,
        registry: Weak<Rooms>,
    ) -> anyhow::Result<Arc<Self>> {
        let subject = presence_subject(id.0.as_str(), id.1.as_str());
        let sync_subject = format!("{subject}.sync");
        let mut events = nats.subscribe(subject.clone()).await?;
        let mut sync_requests = nats.subscribe(sync_subject.clone()).await?;
        let stop = CancellationToken::new();
        let (tx, _) = broadcast::channel(BROADCAST);
        let room = Arc::new(Self {
            id,
            table: Mutex::new(HashMap::new()),
            tx,
            limits,
            dropped,
            registry,
            _stop: stop.clone().drop_guard(),
        });

        // Ask the other gateways for what they know; take every answer that comes
        // within the wait (a large table answers in several messages).
        let inbox = nats.new_inbox();
        let mut answers = nats.subscribe(inbox.clone()).await?;
        nats.publish_with_reply(sync_subject, inbox, Vec::new().into())
            .await?;
        let deadline = tokio::time::Instant::now() + SYNC_WAIT;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
            if let Ok(list) = serde_json::from_slice::<Vec<Event>>(&msg.payload) {
                for e in list {
                    room.apply(Arc::new(e));
                }
            }
        }
        drop(answers);

        let weak = Arc::downgrade(&room);
        let nats = nats.clone();
        let longest = limits.payload_bytes.saturating_add(EVENT_OVERHEAD);
        debug!(subject = %subject, "presence table open");
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    msg = events.next() => {
                        let Some(msg) = msg else { break };
                        let Some(room) = weak.upgrade() else { break };
                        if msg.payload.len() > longest {
                            room.refuse("too long");
                            continue;
                        }
                        match serde_json::from_slice::<Event>(&msg.payload) {
                            Ok(e) => room.apply(Arc::new(e)),
                            Err(e) => debug!(error = %e, "ignoring a malformed presence event"),
                        }
                    }
                    req = sync_requests.next() => {
                        let Some(req) = req else { break };
                        let Some(room) = weak.upgrade() else { break };
                        if let Some(reply) = req.reply {
                            for body in sync_chunks(&room.current(), SYNC_CHUNK) {
                                let _ = nats.publish(reply.clone(), body.into()).await;
                            }
                        }
                    }
                    _ = sweep.tick() => {
                        let Some(room) = weak.upgrade() else { break };
                        room.expire();
                    }
                }
            }
            debug!(subject = %subject, "presence table closed");
        });
        Ok(room)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Slot, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Last writer wins by `hlc_ts`; a `null` payload removes the entry. An entry
    /// over a bound (from another gateway) is dropped and counted.
    fn apply(&self, event: Arc<Event>) {
        if !event.payload.is_null()
            && serde_json::to_vec(&event.payload).map_or(usize::MAX, |v| v.len())
                > self.limits.payload_bytes
        {
            return self.refuse("payload too large");
        }
        let mut table = self.lock();
        let slot = event.slot();
        if table
            .get(&slot)
            .is_some_and(|cur| cur.event.hlc() >= event.hlc())
        {
            return;
        }
        if event.payload.is_null() {
            if table.remove(&slot).is_none() {
                return;
            }
        } else {
            if !self.fits(&mut table, &slot) {
                drop(table);
                return self.refuse("room full");
            }
            table.insert(
                slot,
                Entry {
                    event: event.clone(),
                    expires: Instant::now() + Duration::from_millis(event.ttl_ms),
                },
            );
        }
        let _ = self.tx.send(event);
    }

    fn refuse(&self, why: &'static str) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        debug!(org = %self.id.0, project = %self.id.1, why, "dropping a presence entry over a bound");
    }

    /// True when the table has room for `slot` (it holds it already, or holds fewer
    /// than `presence_entries_per_room` once expired entries are out).
    fn has_space_for(&self, slot: &Slot) -> bool {
        let mut table = self.lock();
        self.fits(&mut table, slot)
    }

    fn fits(&self, table: &mut HashMap<Slot, Entry>, slot: &Slot) -> bool {
        if table.contains_key(slot) || table.len() < self.limits.entries_per_room {
            return true;
        }
        self.expire_in(table);
        table.len() < self.limits.entries_per_room
    }

    /// Entries whose TTL ran out leave, as if their client had sent `null`.
    fn expire(&self) {
        let mut table = self.lock();
        self.expire_in(&mut table);
    }

    fn expire_in(&self, table: &mut HashMap<Slot, Entry>) {
        let now = Instant::now();
        let gone: Vec<_> = table
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(slot, _)| slot.clone())
            .collect();
        for slot in gone {
            if let Some(entry) = table.remove(&slot) {
                let mut leave = (*entry.event).clone();
                leave.payload = Value::Null;
                let _ = self.tx.send(Arc::new(leave));
            }
        }
    }

    /// The current set.
    pub fn current(&self) -> Vec<Event> {
        self.lock().values().map(|e| (*e.event).clone()).collect()
    }

    /// A receiver for every update after the current set returned with it.
    pub fn join(&self) -> (broadcast::Receiver<Arc<Event>>, Vec<Event>) {
        let table = self.lock();
        let rx = self.tx.subscribe();
        (rx, table.values().map(|e| (*e.event).clone()).collect())
    }
}

impl Drop for Room {
    /// The last member left: the room leaves the map (unless a new table for the
    /// same room took its place meanwhile).
    fn drop(&mut self) {
        let Some(rooms) = self.registry.upgrade() else {
            return;
        };
        let mut rooms = rooms.lock().unwrap_or_else(|p| p.into_inner());
        if rooms.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
            rooms.remove(&self.id);
        }
    }
}

/// `events` as JSON arrays of at most about `chunk` bytes each (one event larger than
/// that goes alone); always at least one, so an empty table answers `[]`.
fn sync_chunks(events: &[Event], chunk: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = vec![b'['];
    for e in events {
        let Ok(body) = serde_json::to_vec(e) else {
            continue;
        };
        if cur.len() > 1 && cur.len() + body.len() + 2 > chunk {
            cur.push(b']');
            out.push(std::mem::replace(&mut cur, vec![b'[']));
        }
        if cur.len() > 1 {
            cur.push(b',');
        }
        cur.extend_from_slice(&body);
    }
    cur.push(b']');
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            keys_per_client: 2,
            payload_bytes: 16,
            entries_per_room: 3,
        }
    }

    fn room_id(org: &str) -> RoomId {
        (
            Id::parse("org", org).expect("id"),
            Id::parse("project", "p").expect("id"),
        )
    }

    fn event(client: &str, key: &str, payload: Value, hlc: u64) -> Arc<Event> {
        Arc::new(Event {
            actor_id: "a".into(),
            client_id: client.into(),
            key: key.into(),
            payload,
            hlc_ts: hlc.to_string(),
            ttl_ms: 60_000,
        })
    }

    fn room(registry: Weak<Rooms>, dropped: Arc<AtomicU64>) -> Arc<Room> {
        Arc::new(Room {
            id: room_id("acme"),
            table: Mutex::new(HashMap::new()),
            tx: broadcast::channel(16).0,
            limits: limits(),
            dropped,
            registry,
            _stop: CancellationToken::new().drop_guard(),
        })
    }

    #[test]
    fn keys_per_client_are_bounded_and_freed_by_null_or_expiry() {
        let mut shown = Shown::default();
        let (r, l, now) = (room_id("acme"), limits(), Instant::now());
        let later = now + Duration::from_secs(30);
        shown
            .admit(&r, ("a", "c1"), "k1", now, later, &l)
            .expect("first");
        shown
            .admit(&r, ("a", "c1"), "k2", now, later, &l)
            .expect("second");
        let (code, _) = shown
            .admit(&r, ("a", "c1"), "k3", now, later, &l)
            .expect_err("third key");
        assert_eq!(code, ErrorCode::RateLimited);
        // Refreshing a shown key is no new key.
        shown
            .admit(&r, ("a", "c1"), "k2", now, later, &l)
            .expect("refresh");
        // Another client of the same actor has its own share.
        shown
            .admit(&r, ("a", "c2"), "k1", now, later, &l)
            .expect("other client");
        shown.forget(&r, ("a", "c1"), "k1");
        shown
            .admit(&r, ("a", "c1"), "k3", now, later, &l)
            .expect("after a leave");
        // Expired keys no longer count.
        let after = later + Duration::from_secs(1);
        shown
            .admit(
                &r,
                ("a", "c1"),
                "k4",
                after,
                after + Duration::from_secs(30),
                &l,
            )
            .expect("after expiry");
    }

    #[test]
    fn entries_per_room_are_bounded_per_room() {
        let mut shown = Shown::default();
        let (r, l, now) = (room_id("acme"), limits(), Instant::now());
        let later = now + Duration::from_secs(30);
        shown
            .admit(&r, ("a", "c1"), "k1", now, later, &l)
            .expect("1");
        shown
            .admit(&r, ("a", "c1"), "k2", now, later, &l)
            .expect("2");
        shown
            .admit(&r, ("b", "c1"), "k1", now, later, &l)
            .expect("3");
        let (code, _) = shown
            .admit(&r, ("c", "c1"), "k1", now, later, &l)
            .expect_err("room full");
        assert_eq!(code, ErrorCode::RateLimited);
        shown
            .admit(&room_id("other"), ("c", "c1"), "k1", now, later, &l)
            .expect("another org's room");
    }

    #[test]
    fn shown_keys_leave_the_map() {
        let mut shown = Shown::default();
        let (r, l, now) = (room_id("acme"), limits(), Instant::now());
        let later = now + Duration::from_secs(30);
        shown
            .admit(&r, ("a", "c1"), "k1", now, later, &l)
            .expect("k1");
        shown
            .admit(&r, ("b", "c1"), "k1", now, later, &l)
            .expect("k1");
        shown.forget(&r, ("a", "c1"), "k1");
        assert_eq!(shown.entries(), 1);
        shown.sweep(later);
        assert_eq!(shown.entries(), 0);
        assert!(shown.rooms.is_empty(), "no empty rooms or clients are kept");
    }

    #[test]
    fn a_table_drops_what_other_gateways_send_over_its_bounds() {
        let dropped = Arc::new(AtomicU64::new(0));
        let room = room(Weak::new(), dropped.clone());
        for (i, client) in ["c1", "c2", "c3", "c4"].iter().enumerate() {
            room.apply(event(client, "k", serde_json::json!(1), i as u64 + 1));
        }
        assert_eq!(room.current().len(), 3);
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        // An update of a held entry still applies when full.
        room.apply(event("c1", "k", serde_json::json!(2), 10));
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
        // A payload over the bound is dropped.
        room.apply(event("c1", "k", serde_json::json!("x".repeat(64)), 11));
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        // A leave makes room.
        room.apply(event("c2", "k", Value::Null, 12));
        room.apply(event("c4", "k", serde_json::json!(1), 13));
        assert_eq!(room.current().len(), 3);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_room_leaves_the_map_with_its_last_member() {
        let rooms: Arc<Rooms> = Arc::new(Mutex::new(HashMap::new()));
        let room = room(Arc::downgrade(&rooms), Arc::new(AtomicU64::new(0)));
        rooms
            .lock()
            .expect("lock")
            .insert(room_id("acme"), Arc::downgrade(&room));
        let member = room.clone();
        drop(room);
        assert_eq!(rooms.lock().expect("lock").len(), 1);
        drop(member);
        assert!(rooms.lock().expect("lock").is_empty());
    }

    #[test]
    fn sync_answers_come_in_chunks() {
        let events: Vec<Event> = (0..100)
            .map(|i| (*event(&format!("c{i}"), "k", serde_json::json!("x".repeat(100)), 1)).clone())
            .collect();
        let chunks = sync_chunks(&events, 2048);
        assert!(chunks.len() > 1);
        let mut back = Vec::new();
        for c in &chunks {
            assert!(c.len() <= 2048);
            back.extend(serde_json::from_slice::<Vec<Event>>(c).expect("json array"));
        }
        assert_eq!(back, events);
        assert_eq!(sync_chunks(&[], 2048), vec![b"[]".to_vec()]);
    }
}
