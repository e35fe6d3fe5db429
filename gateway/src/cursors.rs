//! Coalesced cursor writes. Sessions record cursors here; a flusher writes the newest
//! cursor of each client to KV `usync-cursors` every `cursor_flush_ms`, so a thousand
//! clients reporting often cost at most one KV write per client per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use ultrasync_shared::StreamKey;
use ultrasync_shared::cursors::{CursorRecord, kv_key, now_ms};

/// KV writes in flight at once during a flush.
const FLUSH_CONCURRENCY: usize = 64;

pub struct CursorWriter {
    pending: Mutex<HashMap<String, CursorRecord>>,
}

impl CursorWriter {
    /// Starts the flusher; it flushes once more when `shutdown` fires, then stops.
    pub fn start(kv: kv::Store, every: Duration, shutdown: CancellationToken) -> Arc<Self> {
        let writer = Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
        });
        let w = writer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                let stop = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tick.tick() => false,
                };
                w.flush(&kv).await;
                if stop {
                    return;
                }
            }
        });
        writer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CursorRecord>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `client_id`'s cursor on `key` (the newest report wins).
    pub fn record(&self, key: &StreamKey, client_id: &str, server_seq: u64) {
        self.lock().insert(
            kv_key(key, client_id),
            CursorRecord {
                server_seq,
                seen_at_ms: now_ms(),
            },
        );
    }

    async fn flush(&self, kv: &kv::Store) {
        let batch: Vec<(String, CursorRecord)> = self.lock().drain().collect();
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
