//! The compactor: trims each stream key's op log below what every reader of it has
//! processed and a durable snapshot covers (invariant 7).
//!
//! Per stream key and pass: the minimum over the cursors of the clients seen within
//! `cursor_ttl_secs` (older ones are listed as expired, no longer hold the log back,
//! and are deleted) and the positions of the durable readers of the log — each
//! webhook's and each materializer's consumer on `USYNC_OPS` — capped at the stored
//! snapshot's `last_server_seq`, minus `retention_ops`, and never the newest op (the
//! sequencer's expected-sequence fence needs it). A durable reader more than
//! `reader_max_lag_ops` behind the head, or whose oldest unprocessed op was stored
//! more than `reader_max_lag_secs` ago (or its kind's own bounds), is let go on
//! purpose: logged, counted, and it resyncs (a materializer from a snapshot, a
//! webhook told what it missed). Ops at or below that floor are purged
//! from `usync.ops.{org}.{project}.{ns}`. A key whose snapshot is missing, damaged or
//! unreadable is skipped; a pass that cannot read the cursors or the readers purges
//! nothing at all (fails safe).

mod commands;
mod metrics;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Which bound let a durable reader go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LagBound {
    /// More than its `max_lag_ops` behind the head.
    Ops,
    /// The oldest op it has not processed was stored more than its `max_lag_secs` ago.
    Secs,
}

/// How far behind a durable reader may fall before it is let go (0: no bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LagBounds {
    pub max_ops: u64,
    pub max_secs: u64,
}

impl LagBounds {
    /// The bounds of a reader of `kind` (`webhook`, `materializer`, `mirror`).
    pub fn of(cfg: &CompactorConfig, kind: &str) -> Self {
        Self {
            max_ops: cfg.max_lag_ops(kind),
            max_secs: cfg.max_lag_secs(kind),
        }
    }

    /// Whether a reader `lag` ops behind the head, the oldest op it has not
    /// processed stored `age_secs` ago, is let go, and by which bound (ops first
    /// when it passes both).
    pub fn let_go(&self, lag: u64, age_secs: u64) -> Option<LagBound> {
        if self.max_ops > 0 && lag > self.max_ops {
            Some(LagBound::Ops)
        } else if self.max_secs > 0 && age_secs > self.max_secs {
            Some(LagBound::Secs)
        } else {
            None
        }
    }
}

/// Something that holds one stream key's log at `position`: it has processed
/// every op up to that `server_seq` and needs the ones after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub position: u64,
    /// `client:{id}` or `{kind}:{name}`.
    pub who: String,
    /// A durable reader: its bounds, and the age in seconds of the oldest op it has
    /// not processed (0 when it has them all). `None`: a live client (its cursor
    /// TTL is applied when the cursors are read).
    pub reader: Option<(LagBounds, u64)>,
}

impl Hold {
    pub fn client(position: u64, who: String) -> Self {
        Self {
            position,
            who,
            reader: None,
        }
    }

    /// Whether this hold is let go with the log at `head`, and by which bound.
    pub fn let_go(&self, head: u64) -> Option<LagBound> {
        let (bounds, age_secs) = self.reader?;
        bounds.let_go(head.saturating_sub(self.position), age_secs)
    }
}

/// The floor of one stream key and what holds it there: the lowest of `holds`
/// (live clients, and durable readers within their lag bounds: [`Hold::let_go`]);
/// see [`floor`] for the rest.
pub fn decide(holds: &[Hold], snapshot_seq: u64, head: u64, retention: u64) -> (u64, String) {
    let lowest = holds
        .iter()
        .filter(|h| h.let_go(head).is_none())
        .min_by_key(|h| h.position);
    let f = floor(lowest.map(|h| h.position), snapshot_seq, head, retention);
    let held_by = match lowest {
        Some(h) if h.position <= snapshot_seq && h.position < head => h.who.clone(),
        _ if snapshot_seq < head => "snapshot".to_owned(),
        _ => "head".to_owned(),
    };
    (f, held_by)
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

/// A durable reader of the log (a consumer on `USYNC_OPS`) as one stream key sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ReaderHold {
    /// `webhook`, `materializer` or `mirror`.
    pub kind: &'static str,
    /// The consumer's name (a mirror: its region's domain).
    pub name: String,
    /// Ops at or below this `server_seq` it has processed (it needs the ones after).
    pub position: u64,
    /// `head - position`.
    pub lag: u64,
    /// Seconds since the oldest op it has not processed was stored.
    pub age_secs: u64,
    /// Past one of its lag bounds: no longer holds the log.
    pub let_go: bool,
    /// Which bound let it go: `ops` (`max_lag_ops`) or `secs` (`max_lag_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub let_go_by: Option<LagBound>,
}

/// A durable consumer on `USYNC_OPS` and what it has acknowledged.
#[derive(Debug, Clone)]
pub struct Reader {
    pub kind: &'static str,
    pub name: String,
    /// Subjects it reads (NATS wildcards).
    pub filters: Vec<String>,
    /// Every stream sequence at or below this is processed.
    pub ack_floor: u64,
}

/// The durable readers of `USYNC_OPS` whose progress holds the log: webhooks
/// (`usync-webhook-*`) and materializers (`usync-materializer-*`).
pub async fn read_readers(ops: &jetstream::stream::Stream) -> anyhow::Result<Vec<Reader>> {
    let infos: Vec<jetstream::consumer::Info> = ops
        .consumers()
        .try_collect()
        .await
        .context("listing the op log's consumers")?;
    let mut readers = Vec::new();
    for info in infos {
        let Some(name) = info.config.durable_name.clone() else {
            continue;
        };
        let kind = if name.starts_with("usync-webhook-") {
            "webhook"
        } else if name.starts_with("usync-materializer-") {
            "materializer"
        } else {
            continue;
        };
        let mut filters = info.config.filter_subjects.clone();
        if !info.config.filter_subject.is_empty() {
            filters.push(info.config.filter_subject.clone());
        }
        if filters.is_empty() {
            filters.push(">".to_owned());
        }
        readers.push(Reader {
            kind,
            name,
            filters,
            ack_floor: info.ack_floor.stream_sequence,
        });
    }
    readers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(readers)
}

/// How far the mirror of `USYNC_OPS` in region `domain` has copied (a stream
/// sequence: mirrors keep the home region's), read across the leafnode link.
pub async fn mirror_position(js: &jetstream::Context, domain: &str) -> anyhow::Result<u64> {
    let remote = jetstream::with_domain(js.client(), domain);
    let read = async {
        let mut stream = remote.get_stream(OPS_STREAM).await?;
        anyhow::Ok(stream.info().await?.state.last_sequence)
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| anyhow::anyhow!("region {domain} did not answer"))?
}

/// Whether NATS subject `filter` (with `*` and `>`) matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
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
    /// Durable readers of this key's ops (webhooks, materializers).
    pub readers: Vec<ReaderHold>,
    /// What holds the floor where it is: `snapshot`, `client:{id}`,
    /// `{kind}:{name}`, or `head` (the newest op always stays).
    pub held_by: String,
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
                if ultrasync_shared::cursors::is_reset_kv_key(&k) {
                    return Ok(None);
                }
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
        if ultrasync_shared::cursors::is_reset_kv_key(&k) {
            continue;
        }
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
    // Cursors and readers first: without them nothing may be purged.
    let cursors = read_cursors(js).await?;
    let mut readers = read_readers(&ops).await?;
    // Replica regions' mirrors read the whole log.
    for domain in &cfg.mirror_domains {
        let position = match mirror_position(js, domain).await {
            Ok(p) => {
                if let Some(m) = metrics {
                    m.mirror_seen(domain, p);
                }
                p
            }
            Err(e) => {
                let last = metrics.and_then(|m| m.mirror_last(domain)).unwrap_or(0);
                warn!(region = %domain, error = %format!("{e:#}"), last, "a replica region cannot be reached; it holds the log where it was last seen");
                last
            }
        };
        readers.push(Reader {
            kind: "mirror",
            name: domain.clone(),
            filters: vec![">".to_owned()],
            ack_floor: position,
        });
    }
    let cursor_kv = js
        .get_key_value(CURSORS_BUCKET)
        .await
        .context("opening the cursor bucket")?;
    let commands_kv = js
        .get_key_value(ultrasync_shared::nats::COMMANDS_BUCKET)
        .await
        .context("opening the bucket of compacted commands")?;
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
            readers: Vec::new(),
            held_by: String::new(),
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
        // The durable readers: where each is in this key's ops.
        let mut holds: Vec<Hold> = plan
            .live_clients
            .iter()
            .map(|c| Hold::client(c.server_seq, format!("client:{}", c.client_id)))
            .collect();
        for r in readers
            .iter()
            .filter(|r| r.filters.iter().any(|f| subject_matches(f, &subject)))
        {
            // The first op it has not processed; none: it has everything.
            let Some((next, stored_ms)) = next_stored(&ops, &subject, r.ack_floor + 1).await?
            else {
                continue;
            };
            let age_secs = now.saturating_sub(stored_ms) / 1000;
            let hold = Hold {
                position: next.server_seq.saturating_sub(1),
                who: format!("{}:{}", r.kind, r.name),
                reader: Some((LagBounds::of(cfg, r.kind), age_secs)),
            };
            let lag = head.saturating_sub(hold.position);
            let let_go_by = hold.let_go(head);
            if let Some(bound) = let_go_by {
                warn!(stream_key = %key, reader = %r.name, lag, age_secs, bound = ?bound, "a reader this far behind no longer holds the log; it resyncs from a snapshot");
                if let (false, Some(m)) = (dry_run, metrics) {
                    m.reader_let_go(r.kind);
                }
            }
            plan.readers.push(ReaderHold {
                kind: r.kind,
                name: r.name.clone(),
                position: hold.position,
                lag,
                age_secs,
                let_go: let_go_by.is_some(),
                let_go_by,
            });
            holds.push(hold);
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
            (plan.floor, plan.held_by) = decide(&holds, snap, head, cfg.retention_ops);
            if plan.floor >= first {
                plan.purged = plan.floor - first + 1;
                if !dry_run {
                    // The log is purged by whole messages: what goes is everything
                    // before the message that holds floor + 1 (its first ops, at or
                    // below the floor, stay).
                    let (cut, keep) = message_start(&ops, &subject, plan.floor + 1).await?;
                    plan.purged = cut.saturating_sub(first);
                    // Webhooks let go lose what is purged past their position: they
                    // are told which ops before their next one (`stream.reset`).
                    for r in plan
                        .readers
                        .iter()
                        .filter(|r| r.let_go && r.kind == "webhook")
                    {
                        if cut > r.position + 1 {
                            let name = r.name.trim_start_matches("usync-webhook-");
                            record_reset(&cursor_kv, &key, name, r.position + 1, cut - 1).await?;
                        }
                    }
                    if cut > first {
                        commands::remember(&ops, &commands_kv, &key, &subject, first, cut - 1)
                            .await?;
                        purge_below(&ops, &subject, keep).await?;
                    }
                    info!(stream_key = %key, floor = plan.floor, purged = plan.purged, min_cursor = ?plan.min_cursor, snapshot_seq = snap, "compacted");
                }
            }
        }
        if let Some(why) = &plan.skipped {
            info!(stream_key = %key, %why, "not compacted");
        }
        // Clients gone for longer than the TTL no longer count: their cursors go.
        if !dry_run {
            for c in &plan.expired_clients {
                let kv_key = ultrasync_shared::cursors::kv_key(&key, &c.client_id);
                if let Err(e) = cursor_kv.delete(&kv_key).await {
                    warn!(key = %kv_key, error = %e, "deleting an expired cursor failed");
                }
            }
        }
        report.purged_total += plan.purged;
        if let (false, Some(m)) = (dry_run, metrics) {
            m.record(&plan);
        }
        report.stream_keys.push(plan);
    }
    Ok(report)
}

/// The first op of `subject` at stream sequence `from` or later, and when JetStream
/// stored it (ms since the epoch): one direct get, as [`log::next_at_or_after`].
async fn next_stored(
    ops: &jetstream::stream::Stream,
    subject: &str,
    from: u64,
) -> anyhow::Result<Option<(log::LogEntry, u64)>> {
    use jetstream::stream::LastRawMessageErrorKind;
    let res = ops
        .raw_message_builder()
        .sequence(from.max(1))
        .next_by_subject(subject.to_owned())
        .send()
        .await;
    match res {
        Ok(m) => {
            let stored_ms = std::time::SystemTime::from(m.time)
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            Ok(log::stream_message_entries(&m)?
                .into_iter()
                .next()
                .map(|first| (first, stored_ms)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {subject} from {from}: {e}")),
    }
}

/// Records that webhook `name` never got ops `from..=to` of `key` (merged with
/// what is already recorded), before they are purged.
async fn record_reset(
    kv: &jetstream::kv::Store,
    key: &StreamKey,
    name: &str,
    from: u64,
    to: u64,
) -> anyhow::Result<()> {
    use ultrasync_shared::cursors::{ResetRecord, reset_kv_key};
    let k = reset_kv_key(key, name);
    let mut record = ResetRecord { from, to };
    if let Some(old) = kv
        .get(&k)
        .await
        .context("reading a webhook reset")?
        .and_then(|b| serde_json::from_slice::<ResetRecord>(&b).ok())
    {
        record.from = record.from.min(old.from);
        record.to = record.to.max(old.to);
    }
    kv.put(&k, serde_json::to_vec(&record)?.into())
        .await
        .context("recording a webhook reset")?;
    warn!(stream_key = %key, webhook = name, from = record.from, to = record.to, "ops purged before a lagging webhook got them; it will be sent stream.reset");
    Ok(())
}

/// Where the log message that holds op `server_seq` of `subject` starts: its
/// first op and its stream sequence.
async fn message_start(
    ops: &jetstream::stream::Stream,
    subject: &str,
    server_seq: u64,
) -> anyhow::Result<(u64, u64)> {
    let Some(at) = log::locate(ops, subject, server_seq).await? else {
        anyhow::bail!("op {server_seq} of {subject} is not in the log");
    };
    anyhow::ensure!(
        at.server_seq == server_seq,
        "found op {} where {server_seq} was due",
        at.server_seq
    );
    let first = log::next_at_or_after(ops, subject, at.stream_seq)
        .await?
        .map_or(at.server_seq, |e| e.server_seq.min(at.server_seq));
    Ok((first, at.stream_seq))
}

/// Purges every message of `subject` before stream sequence `keep` (the start of
/// the message that holds the floor + 1, [`message_start`]).
async fn purge_below(
    ops: &jetstream::stream::Stream,
    subject: &str,
    keep: u64,
) -> anyhow::Result<()> {
    ops.purge()
        .filter(subject)
        .sequence(keep)
        .await
        .with_context(|| format!("purging {subject} below stream sequence {keep}"))?;
    Ok(())
}

/// Runs the compactor until `shutdown` fires: a pass every `interval_secs`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = config.compactor.clone();
    let listener = ultrasync_metrics::bind("compactor", cfg.metrics_listen).await?;
    run_with_metrics(config, listener, shutdown).await
}

/// [`run`] with the metrics listener bound already (`None`: no listener), as tests
/// bind it on port 0.
pub async fn run_with_metrics(
    config: Config,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = config.compactor.clone();
    let metrics = Arc::new(Metrics::default());
    if let Some(listener) = metrics_listener {
        tokio::spawn(ultrasync_metrics::serve(
            "compactor",
            listener,
            metrics.clone(),
            shutdown.clone(),
        ));
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
        let started = Instant::now();
        match compact_once(&js, &cfg, false, Some(&metrics)).await {
            Ok(r) => {
                metrics.pass_done(started.elapsed());
                if r.purged_total > 0 {
                    info!(purged = r.purged_total, "compaction pass done");
                }
            }
            Err(e) => {
                metrics.pass_failed(started.elapsed());
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

    /// One step of the world the compactor runs in.
    #[derive(Debug, Clone)]
    enum Step {
        Write(u64),
        Cursor(usize, u64),
        Reader(usize, u64),
        Snapshot(u64),
        Time(u64),
        Compact,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1u64..20).prop_map(Step::Write),
            (0usize..3, 0u64..1_000).prop_map(|(i, s)| Step::Cursor(i, s)),
            (0usize..2, 0u64..1_000).prop_map(|(i, s)| Step::Reader(i, s)),
            (0u64..1_000).prop_map(Step::Snapshot),
            (0u64..5).prop_map(Step::Time),
            Just(Step::Compact),
        ]
    }

    proptest! {
        /// Random interleavings of writes, cursor reports, reader progress,
        /// snapshots, time and passes, against a model of who needs what: each
        /// reader has an ops bound and a seconds bound (0 = none) and the model knows
        /// when every op was stored. After every pass, each live client and each
        /// reader within both its bounds still finds every op after its position,
        /// the floor is the highest those, the snapshot and the head allow (a
        /// reader past a bound holds nothing), the snapshot reaches what is left,
        /// and the newest op stays.
        #[test]
        fn nothing_a_reader_needs_is_purged(
            steps in proptest::collection::vec(step(), 1..80),
            retention in 0u64..5,
            max_ops in proptest::collection::vec(0u64..50, 2),
            max_secs in proptest::collection::vec(0u64..10, 2),
            ttl in 1u64..4,
        ) {
            let mut head = 0u64;
            let mut stored_at: Vec<u64> = Vec::new(); // op n was stored at stored_at[n - 1]
            let mut first = 1u64; // oldest op left (first > head: none)
            let mut cursors: [Option<(u64, u64)>; 3] = [None; 3]; // (seq, seen at)
            let mut readers = [0u64; 2];
            let mut snapshot: Option<u64> = None;
            let mut now = 0u64;
            for s in steps {
                match s {
                    Step::Write(n) => {
                        head += n;
                        stored_at.resize(head as usize, now);
                    }
                    // Nobody has more than the head.
                    Step::Cursor(i, seq) => cursors[i] = Some((seq.min(head), now)),
                    Step::Reader(i, seq) => readers[i] = readers[i].max(seq.min(head)),
                    Step::Snapshot(seq) => snapshot = Some(snapshot.unwrap_or(0).max(seq.min(head))),
                    Step::Time(t) => now += t,
                    Step::Compact => {
                        let Some(snap) = snapshot else { continue };
                        if first > head || snap + 1 < first {
                            continue;
                        }
                        // The age of the oldest op a reader at `r` has not processed.
                        let age = |r: u64| if r < head { now - stored_at[r as usize] } else { 0 };
                        // The model's own reading of the bounds.
                        let within = |i: usize, r: u64| {
                            (max_ops[i] == 0 || head - r <= max_ops[i])
                                && (max_secs[i] == 0 || age(r) <= max_secs[i])
                        };
                        let mut holds = Vec::new();
                        let mut needed = Vec::new();
                        for (i, c) in cursors.iter().enumerate() {
                            if let Some((seq, seen)) = c && now - seen <= ttl {
                                holds.push(Hold::client(*seq, format!("client:{i}")));
                                needed.push(*seq);
                            }
                        }
                        for (i, r) in readers.iter().enumerate() {
                            let bounds = LagBounds { max_ops: max_ops[i], max_secs: max_secs[i] };
                            holds.push(Hold {
                                position: *r,
                                who: format!("reader:{i}"),
                                reader: Some((bounds, age(*r))),
                            });
                            if within(i, *r) {
                                needed.push(*r);
                            }
                        }
                        let (f, held_by) = decide(&holds, snap, head, retention);
                        let allowed = |x: u64| {
                            needed.iter().all(|&p| x + retention <= p)
                                && x + retention <= snap
                                && x < head
                        };
                        if f > 0 {
                            prop_assert!(allowed(f), "floor {f} breaks a rule");
                        }
                        prop_assert!(!allowed(f + 1), "floor {f} is not the highest allowed");
                        prop_assert!(
                            held_by == "snapshot"
                                || held_by == "head"
                                || holds.iter().any(|h| h.who == held_by && h.let_go(head).is_none()),
                            "held by {held_by}, which does not hold"
                        );
                        if f >= first {
                            first = f + 1;
                        }
                        prop_assert!(first <= head, "the newest op went");
                        prop_assert!(first <= snap + 1, "purged past the snapshot");
                        for (i, c) in cursors.iter().enumerate() {
                            if let Some((seq, seen)) = c && now - seen <= ttl {
                                prop_assert!(first <= seq + 1, "client {i} at {seq} lost ops (first {first})");
                            }
                        }
                        for (i, r) in readers.iter().enumerate() {
                            if within(i, *r) {
                                prop_assert!(first <= r + 1, "reader {i} at {r} lost ops (first {first})");
                            }
                        }
                    }
                }
                // Anyone behind what is left resyncs from the snapshot (as clients and
                // let-go readers do).
                for c in cursors.iter_mut().flatten() {
                    if c.0 + 1 < first {
                        c.0 = snapshot.unwrap_or(0);
                    }
                }
                for r in readers.iter_mut() {
                    if *r + 1 < first {
                        *r = snapshot.unwrap_or(0);
                    }
                }
            }
        }
    }

    #[test]
    fn lag_bounds_name_the_bound_passed() {
        let b = LagBounds {
            max_ops: 100,
            max_secs: 60,
        };
        assert_eq!(b.let_go(100, 60), None);
        assert_eq!(b.let_go(101, 0), Some(LagBound::Ops));
        assert_eq!(b.let_go(5, 61), Some(LagBound::Secs));
        assert_eq!(b.let_go(101, 61), Some(LagBound::Ops));
        assert_eq!(LagBounds::default().let_go(u64::MAX, u64::MAX), None);
        let secs_only = LagBounds {
            max_ops: 0,
            max_secs: 2,
        };
        assert_eq!(secs_only.let_go(1_000_000, 2), None);
        assert_eq!(secs_only.let_go(1, 3), Some(LagBound::Secs));
        // A reader let go by time holds nothing; the next hold (here the snapshot) does.
        let holds = [Hold {
            position: 3,
            who: "webhook:w".to_owned(),
            reader: Some((secs_only, 3)),
        }];
        assert_eq!(decide(&holds, 40, 50, 0), (40, "snapshot".to_owned()));
        let holds = [Hold {
            reader: Some((secs_only, 2)),
            ..holds[0].clone()
        }];
        assert_eq!(decide(&holds, 40, 50, 0), (3, "webhook:w".to_owned()));
    }

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches(">", "usync.ops.a.b.c"));
        assert!(subject_matches("usync.ops.>", "usync.ops.a.b.c"));
        assert!(subject_matches("usync.ops.a.*.c", "usync.ops.a.b.c"));
        assert!(subject_matches("usync.ops.a.b.c", "usync.ops.a.b.c"));
        assert!(!subject_matches("usync.ops.a.*", "usync.ops.a.b.c"));
        assert!(!subject_matches("usync.ops.a.b.c.>", "usync.ops.a.b.c"));
        assert!(!subject_matches("usync.ops.x.>", "usync.ops.a.b.c"));
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
