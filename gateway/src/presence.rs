//! Presence (the `ephemeral` namespace): who is here and what they show, never in the
//! op log. Entries travel over core NATS on `usync.presence.{org}.{project}` so every
//! gateway sees every update; each gateway keeps a table per (org, project) that at
//! least one of its sockets has joined. Updates are last-writer-wins by `hlc_ts`, live
//! for a TTL unless refreshed, and a `null` payload removes an entry (sent on leave,
//! on disconnect, and on expiry). A gateway opening a table asks the others for theirs
//! on `usync.presence.{org}.{project}.sync`, so a joining client gets the current set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, warn};
use ultrasync_shared::Id;
use ultrasync_shared::nats::presence_subject;
use ultrasync_shared::protocol::ServerMessage;

/// How long a new table waits for other gateways' tables.
const SYNC_WAIT: Duration = Duration::from_millis(150);
const BROADCAST: usize = 1024;

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

/// The presence tables of one gateway.
pub struct Presence {
    nats: async_nats::Client,
    hlc: uhlc::HLC,
    ttl: Duration,
    rooms: Mutex<HashMap<(Id, Id), Weak<Room>>>,
}

impl Presence {
    pub fn new(nats: async_nats::Client, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            nats,
            hlc: uhlc::HLC::default(),
            ttl,
            rooms: Mutex::new(HashMap::new()),
        })
    }

    /// Publishes an update from one of this gateway's sockets.
    pub async fn publish(
        &self,
        org: &Id,
        project: &Id,
        actor_id: &str,
        client_id: &str,
        key: &str,
        payload: Value,
    ) {
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
    }

    /// The table for (org, project), opened (and filled from the other gateways)
    /// when no local socket has joined it yet.
    pub async fn room(&self, org: &Id, project: &Id) -> anyhow::Result<Arc<Room>> {
        let id = (org.clone(), project.clone());
        if let Some(room) = self.lock().get(&id).and_then(Weak::upgrade) {
            return Ok(room);
        }
        let room = Room::open(&self.nats, org, project).await?;
        let mut rooms = self.lock();
        // Another socket may have opened it meanwhile: keep the first.
        if let Some(existing) = rooms.get(&id).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        rooms.retain(|_, r| r.strong_count() > 0);
        rooms.insert(id, Arc::downgrade(&room));
        Ok(room)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Id, Id), Weak<Room>>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One (org, project)'s presence table on this gateway.
pub struct Room {
    table: Mutex<HashMap<(String, String, String), Entry>>,
    tx: broadcast::Sender<Arc<Event>>,
    _stop: DropGuard,
}

impl Room {
    async fn open(nats: &async_nats::Client, org: &Id, project: &Id) -> anyhow::Result<Arc<Self>> {
        let subject = presence_subject(org.as_str(), project.as_str());
        let sync_subject = format!("{subject}.sync");
        let mut events = nats.subscribe(subject.clone()).await?;
        let mut sync_requests = nats.subscribe(sync_subject.clone()).await?;
        let stop = CancellationToken::new();
        let (tx, _) = broadcast::channel(BROADCAST);
        let room = Arc::new(Self {
            table: Mutex::new(HashMap::new()),
            tx,
            _stop: stop.clone().drop_guard(),
        });

        // Ask the other gateways for what they know; take every answer that comes
        // within the wait.
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
        debug!(subject = %subject, "presence table open");
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    msg = events.next() => {
                        let Some(msg) = msg else { break };
                        let Some(room) = weak.upgrade() else { break };
                        match serde_json::from_slice::<Event>(&msg.payload) {
                            Ok(e) => room.apply(Arc::new(e)),
                            Err(e) => debug!(error = %e, "ignoring a malformed presence event"),
                        }
                    }
                    req = sync_requests.next() => {
                        let Some(req) = req else { break };
                        let Some(room) = weak.upgrade() else { break };
                        if let Some(reply) = req.reply {
                            let body = serde_json::to_vec(&room.current()).unwrap_or_default();
                            let _ = nats.publish(reply, body.into()).await;
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Last writer wins by `hlc_ts`; a `null` payload removes the entry.
    fn apply(&self, event: Arc<Event>) {
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

    /// Entries whose TTL ran out leave, as if their client had sent `null`.
    fn expire(&self) {
        let now = Instant::now();
        let mut table = self.lock();
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
