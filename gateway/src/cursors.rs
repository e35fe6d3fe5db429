//! Coalesced cursor writes. Sessions and HTTP requests record cursors here; a flusher
//! writes the newest cursor of each client to KV `usync-cursors` every
//! `cursor_flush_ms`, so a thousand clients reporting often cost at most one KV write
//! per client per interval.
//!
//! A client id belongs to the actor that first used it: a cursor of another actor's
//! client is refused `forbidden`, so nobody can push someone else's cursor up (which
//! would let the compactor purge what that client still needs) or pin it (which would
//! hold the log back). Owners are looked up in KV once and then kept in a bounded
//! cache.
//!
//! Every client id a cursor is recorded for holds the log until the compactor's
//! `cursor_ttl_secs`, so one actor may only have `max_clients_per_actor` of them on a
//! gateway at a time; more are refused `rate_limited` (a tenant cannot pin the log or
//! fill the bucket by inventing client ids).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use ultrasync_shared::cursors::{CursorRecord, kv_key, now_ms};
use ultrasync_shared::{ErrorCode, StreamKey};

use crate::rules::Refusal;

/// KV writes in flight at once during a flush.
const FLUSH_CONCURRENCY: usize = 64;
/// Owners remembered before the cache starts over.
const OWNER_CACHE: usize = 100_000;

pub struct CursorWriter {
    kv: kv::Store,
    pending: Mutex<HashMap<String, CursorRecord>>,
    /// KV key → the actor it belongs to.
    owners: Mutex<HashMap<String, String>>,
    /// Actor → the client ids it recorded cursors for (emptied with `owners`).
    clients: Mutex<HashMap<String, std::collections::HashSet<String>>>,
    max_clients_per_actor: usize,
}

impl CursorWriter {
    /// Starts the flusher; it flushes once more when `shutdown` fires, then stops.
    pub fn start(
        kv: kv::Store,
        every: Duration,
        max_clients_per_actor: usize,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let writer = Arc::new(Self {
            kv,
            pending: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            max_clients_per_actor,
        });
        let w = writer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                let stop = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tick.tick() => false,
                };
                w.flush().await;
                if stop {
                    return;
                }
            }
        });
        writer
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, CursorRecord>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who `kv_key` belongs to: the cache, else the stored record.
    async fn owner(&self, kv_key: &str) -> Result<Option<String>, Refusal> {
        if let Some(a) = self.owners().get(kv_key) {
            return Ok(Some(a.clone()));
        }
        let stored = self
            .kv
            .get(kv_key)
            .await
            .map_err(|e| Refusal::unavailable("reading a cursor", e))?;
        Ok(stored
            .and_then(|b| serde_json::from_slice::<CursorRecord>(&b).ok())
            .and_then(|r| r.actor_id))
    }

    /// Records `client_id`'s cursor on `key` for `actor` (the newest report wins);
    /// `forbidden` when the client id belongs to another actor.
    pub async fn record(
        &self,
        key: &StreamKey,
        client_id: &str,
        actor: &str,
        server_seq: u64,
    ) -> Result<(), Refusal> {
        let k = kv_key(key, client_id);
        if let Some(owner) = self.owner(&k).await?
            && owner != actor
        {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("client id {client_id} belongs to another actor"),
            ));
        }
        {
            let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
            let mut owners = self.owners();
            if owners.len() >= OWNER_CACHE {
                owners.clear();
                clients.clear();
            }
            let mine = clients.entry(actor.to_owned()).or_default();
            if !mine.contains(client_id) && mine.len() >= self.max_clients_per_actor {
                return Err(Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "this actor already has cursors for {} client ids; reuse one",
                        mine.len()
                    ),
                ));
            }
            mine.insert(client_id.to_owned());
            owners.insert(k.clone(), actor.to_owned());
        }
        self.pending().insert(
            k,
            CursorRecord {
                server_seq,
                seen_at_ms: now_ms(),
                actor_id: Some(actor.to_owned()),
            },
        );
        Ok(())
    }

    async fn flush(&self) {
        let batch: Vec<(String, CursorRecord)> = self.pending().drain().collect();
        let kv = &self.kv;
        futures::stream::iter(batch)
            .for_each_concurrent(FLUSH_CONCURRENCY, |(key, record)| async move {
                let body = serde_json::to_vec(&record).unwrap_or_default();
                if let Err(e) = kv.put(key.as_str(), body.into()).await {
                    warn!(key = %key, error = %e, "storing a cursor failed");
                }
            })
            .await;
    }
}
