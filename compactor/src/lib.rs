//! The compactor: trims each stream key's op log below what every live client has
//! acknowledged and a durable snapshot covers (invariant 7).
//!
//! Per stream key and pass: the minimum cursor of the clients seen within
//! `cursor_ttl_secs` (older ones are listed as expired and no longer hold the log
//! back), capped at the stored snapshot's `last_server_seq`, minus `retention_ops`,
//! and never the newest op (the sequencer's expected-sequence fence needs it). Ops at
//! or below that floor are purged from `usync.ops.{org}.{project}.{ns}`. A key whose
//! snapshot is missing, damaged or unreadable is skipped; a pass that cannot read the
//! cursors purges nothing at all (fails safe).

mod metrics;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use ultrasync_shared::config::{CompactorConfig, Config};
use ultrasync_shared::cursors::{CursorRecord, now_ms, parse_kv_key};
use ultrasync_shared::nats::{self, CURSORS_BUCKET, OPS_STREAM, SNAPSHOTS_BUCKET};
use ultrasync_shared::{StreamKey, log, snapshot};

pub use crate::metrics::Metrics;

/// Ops with `server_seq` at or below the returned value may be purged: the lowest
/// cursor of the live clients (none: no limit), capped at the snapshot, minus the
/// retention, and always below the head so the newest op stays.
pub fn floor(min_cursor: Option<u64>, snapshot_seq: u64, head: u64, retention: u64) -> u64 {
    let cap = min_cursor.map_or(snapshot_seq, |c| c.min(snapshot_seq));
    cap.saturating_sub(retention).min(head.saturating_sub(1))
}

/// One client's cursor as the compactor sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCursor {
    pub client_id: String,
    pub server_seq: u64,
    /// `head - server_seq`.
    pub lag: u64,
    pub seen_secs_ago: u64,
}

/// What a pass did (or, dry, would do) to one stream key.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub stream_key: String,
    pub head: u64,
    /// Oldest `server_seq` in the log before the pass.
    pub first: Option<u64>,
    pub snapshot_seq: Option<u64>,
    pub min_cursor: Option<u64>,
    pub live_clients: Vec<ClientCursor>,
    pub expired_clients: Vec<ClientCursor>,
    /// Ops at or below this may go.
    pub floor: u64,
    /// Ops purged (or that would be).
    pub purged: u64,
    /// Why nothing was purged, when something kept it from even computing a floor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub stream_keys: Vec<Plan>,
    pub purged_total: u64,
}

/// Every cursor in `usync-cursors`, by stream key. Any read error fails the whole
/// read: a pass must not go on with a partial view.
pub async fn read_cursors(
    js: &jetstream::Context,
) -> anyhow::Result<BTreeMap<StreamKey, Vec<(String, CursorRecord)>>> {
    let kv = js
        .get_key_value(CURSORS_BUCKET)
        .await
        .context("opening the cursor bucket")?;
    let keys: Vec<String> = kv
        .keys()
        .await
        .context("listing cursors")?
        .try_collect()
        .await
        .context("listing cursors")?;
    let records: Vec<anyhow::Result<Option<(String, CursorRecord)>>> = futures::stream::iter(keys)
        .map(|k| {
            let kv = kv.clone();
            async move {
                let Some(bytes) = kv.get(&k).await.context("reading a cursor")? else {
                    return Ok(None);
                };
                let record: CursorRecord = serde_json::from_slice(&bytes)
                    .with_context(|| format!("cursor {k} is not a cursor record"))?;
                Ok(Some((k, record)))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut out: BTreeMap<StreamKey, Vec<(String, CursorRecord)>> = BTreeMap::new();
    for r in records {
        let Some((k, record)) = r? else { continue };
        match parse_kv_key(&k) {
            Some((key, client)) => out.entry(key).or_default().push((client, record)),
            None => warn!(key = %k, "ignoring a cursor under a foreign key"),
        }
    }
    for v in out.values_mut() {
        v.sort_by(|a, b| a.0.cmp(&b.0));
    }
    Ok(out)
}

/// One compaction pass over every stream key.
pub async fn compact_once(
    js: &jetstream::Context,
    cfg: &CompactorConfig,
    dry_run: bool,
    metrics: Option<&Metrics>,
) -> anyhow::Result<Report> {
    let ops = js
        .get_stream(OPS_STREAM)
        .await
        .context("opening USYNC_OPS")?;
    let store = js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .context("opening the snapshot store")?;
    // Cursors first: without them nothing may be purged.
    let cursors = read_cursors(js).await?;
    let now = now_ms();
    let ttl_ms = cfg.cursor_ttl_secs.saturating_mul(1000);
    let mut report = Report {
        dry_run,
        stream_keys: Vec::new(),
        purged_total: 0,
    };
    for key in log::stream_keys(&ops).await? {
        let subject = nats::ops_subject(&key);
        let head = log::head(&ops, &subject).await?.map_or(0, |h| h.server_seq);
        let first = log::next_at_or_after(&ops, &subject, 1)
            .await?
            .map(|e| e.server_seq);
        let mut plan = Plan {
            stream_key: key.to_string(),
            head,
            first,
            snapshot_seq: None,
            min_cursor: None,
            live_clients: Vec::new(),
            expired_clients: Vec::new(),
            floor: 0,
            purged: 0,
            skipped: None,
        };
        for (client_id, c) in cursors.get(&key).into_iter().flatten() {
            let seen_ms = now.saturating_sub(c.seen_at_ms);
            let entry = ClientCursor {
                client_id: client_id.clone(),
                server_seq: c.server_seq,
                lag: head.saturating_sub(c.server_seq),
                seen_secs_ago: seen_ms / 1000,
            };
            if seen_ms > ttl_ms {
                plan.expired_clients.push(entry);
            } else {
                plan.min_cursor = Some(
                    plan.min_cursor
                        .map_or(c.server_seq, |m| m.min(c.server_seq)),
                );
                plan.live_clients.push(entry);
            }
        }
        match snapshot::fetch(&store, &key).await {
            Ok(Some(s)) if s.state.last_seq > head => {
                plan.skipped = Some(format!(
                    "snapshot at {} is ahead of the log",
                    s.state.last_seq
                ));
            }
            Ok(Some(s)) if first.is_some_and(|f| s.state.last_seq + 1 < f) => {
                plan.skipped = Some(format!(
                    "snapshot at {} does not reach the oldest op {}",
                    s.state.last_seq,
                    first.unwrap_or(0)
                ));
            }
            Ok(Some(s)) => plan.snapshot_seq = Some(s.state.last_seq),
            Ok(None) => plan.skipped = Some("no snapshot".to_owned()),
            Err(e) => plan.skipped = Some(format!("snapshot unusable: {e}")),
        }
        if let (Some(snap), Some(first)) = (plan.snapshot_seq, first) {
            plan.floor = floor(plan.min_cursor, snap, head, cfg.retention_ops);
            if plan.floor >= first {
                plan.purged = plan.floor - first + 1;
                if !dry_run {
                    purge_below(&ops, &subject, plan.floor + 1).await?;
                    info!(stream_key = %key, floor = plan.floor, purged = plan.purged, min_cursor = ?plan.min_cursor, snapshot_seq = snap, "compacted");
                }
            }
        }
        if let Some(why) = &plan.skipped {
            info!(stream_key = %key, %why, "not compacted");
        }
        report.purged_total += plan.purged;
        if let (false, Some(m)) = (dry_run, metrics) {
            m.record(&plan);
        }
        report.stream_keys.push(plan);
    }
    Ok(report)
}

/// Purges every op of `subject` below `server_seq` `keep_from`.
async fn purge_below(
    ops: &jetstream::stream::Stream,
    subject: &str,
    keep_from: u64,
) -> anyhow::Result<()> {
    let Some(keep) = log::locate(ops, subject, keep_from).await? else {
        anyhow::bail!("op {keep_from} of {subject} is not in the log");
    };
    anyhow::ensure!(
        keep.server_seq == keep_from,
        "found op {} where {keep_from} was due",
        keep.server_seq
    );
    ops.purge()
        .filter(subject)
        .sequence(keep.stream_seq)
        .await
        .with_context(|| {
            format!(
                "purging {subject} below stream sequence {}",
                keep.stream_seq
            )
        })?;
    Ok(())
}

/// Runs the compactor until `shutdown` fires: a pass every `interval_secs`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = config.compactor.clone();
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the compactor's metrics to {addr}"))?;
        info!(addr = %listener.local_addr()?, "compactor metrics listening");
        tokio::spawn(metrics::serve(listener, metrics.clone(), shutdown.clone()));
    }
    let nats::ServiceNats { js, client, .. } =
        nats::connect_service(&config, "ultrasync-compactor").await?;
    info!(
        interval_secs = cfg.interval_secs,
        ttl_secs = cfg.cursor_ttl_secs,
        retention = cfg.retention_ops,
        "compactor running"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(cfg.interval_secs)) => {}
        }
        match compact_once(&js, &cfg, false, Some(&metrics)).await {
            Ok(r) => {
                metrics.pass_done();
                if r.purged_total > 0 {
                    info!(purged = r.purged_total, "compaction pass done");
                }
            }
            Err(e) => {
                metrics.pass_failed();
                warn!(error = %format!("{e:#}"), "compaction pass failed; nothing more purged");
            }
        }
    }
    let _ = client.flush().await;
    info!("compactor stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Against a model: the floor never passes the lowest live cursor, never the
        /// snapshot, keeps `retention` ops below both, and always keeps the newest op;
        /// and it is the largest value with those properties.
        #[test]
        fn floor_matches_the_model(
            cursors in proptest::collection::vec(0u64..2_000, 0..6),
            snapshot in 0u64..2_000,
            head in 0u64..2_000,
            retention in 0u64..300,
        ) {
            let min_cursor = cursors.iter().copied().min();
            let f = floor(min_cursor, snapshot, head, retention);
            let allowed = |x: u64| {
                cursors.iter().all(|&c| x + retention <= c)
                    && x + retention <= snapshot
                    && x < head
            };
            if f > 0 {
                prop_assert!(allowed(f), "floor {f} breaks a rule");
            }
            prop_assert!(!allowed(f + 1), "floor {f} is not the largest allowed");
        }
    }

    #[test]
    fn floor_examples() {
        assert_eq!(floor(Some(10), 80, 100, 0), 10);
        assert_eq!(floor(None, 80, 100, 0), 80);
        assert_eq!(floor(Some(90), 80, 100, 5), 75);
        assert_eq!(floor(None, 100, 100, 0), 99);
        assert_eq!(floor(Some(3), 80, 100, 5), 0);
        assert_eq!(floor(None, 0, 0, 0), 0);
    }
}
