//! The materializer: applies `USYNC_OPS` into RocksDB with the shared state machine,
//! writes snapshots to `usync-snapshots`, and serves reads over NATS request-reply.
//!
//! Every instance is a full replica: it has its own RocksDB folder and its own durable
//! consumer `usync-materializer-{name}` over every `usync.ops.>` subject, and answers
//! reads in the queue group `materializers` (see [`ultrasync_shared::reads`]). Scale
//! reads by adding instances; each needs its own `name` and `data_dir`.
//!
//! Where an instance is lives in RocksDB, in the same write batch as the state (see
//! [`store`]): at start-up the durable consumer is created anew from that position,
//! so the store, not the server's ack floor, says what was applied.
//!
//! A stream key whose log no longer starts where the store stands (compacted while
//! this instance was away, or a new instance) is loaded from its snapshot, then the
//! log after it. A damaged snapshot is never used: the key is rebuilt from the log and
//! a sound snapshot written over the damaged one.
//!
//! In a replica region (`region.home_domain`) the log is a mirror, and a mirror the
//! home region let go (past `compactor.mirror_max_lag_*`) skips the ops the home
//! region purged before it copied them: the stream sequences are left as a hole. When
//! this region's own snapshot does not reach past the hole, the home region's does
//! (the home compactor never purges past its own snapshot); it is read across the
//! leafnode.

mod metrics;
pub mod rebuild;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::stream::Stream;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use ultrasync_shared::config::{Config, MaterializerConfig};
use ultrasync_shared::error::ErrorCode;
use ultrasync_shared::log::{self, LogEntry};
use ultrasync_shared::nats::{self, ops_subject};
use ultrasync_shared::reads::{self, ReadRequest, Verb};
use ultrasync_shared::{Id, StreamKey, snapshot, state};

use crate::metrics::Metrics;
use crate::store::{Applier, Store, StoreError};

/// Ops read from the log per step when filling a gap or rebuilding.
const FILL_CHUNK: u64 = 2000;
/// Messages applied in one write batch at most.
const APPLY_CHUNK: usize = 1000;

/// The durable consumer of instance `name`.
pub fn consumer_name(name: &str) -> String {
    format!("usync-materializer-{name}")
}

struct Shared {
    client: async_nats::Client,
    ops: Stream,
    snapshots: ObjectStore,
    /// The home region's JetStream domain, in a replica region.
    home_domain: Option<String>,
    store: Arc<Store>,
    /// Bumped after every applied batch; readers waiting for `min_seq` watch it.
    progress: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// Snapshots encoded for reads.
    on_demand: OnDemand,
}

/// Most bytes of snapshots encoded for reads kept for the next read of the same
/// state.
const ON_DEMAND_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// Snapshots encoded for reads (`usync.mat.snapshot.…`). Encoding one holds a copy
/// of the whole state and costs in proportion to it, and any reader with a token
/// may ask: at most as many are encoded at once as the machine has cores, in the
/// order asked (a flood of requests waits instead of holding a state copy each on
/// every blocking thread), and the newest of each stream key is kept while its
/// state has not moved, so asking again costs nothing.
///
/// An org's reads wait for its own earlier ones first: it holds at most one of the
/// turns, and the line for turns has at most one read of each org in it, so a
/// tenant flooding large reads slows its own and takes turns with the others
/// instead of making them wait behind its whole flood.
struct OnDemand {
    turn: tokio::sync::Semaphore,
    /// Org → its line; an entry lives while a read of the org waits or encodes.
    lines: std::sync::Mutex<HashMap<Id, Arc<tokio::sync::Mutex<()>>>>,
    kept: std::sync::Mutex<Kept>,
}

/// A read's turn to encode (see [`OnDemand::turn`]).
struct Turn<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    _place: Place<'a>,
}

/// A read's place in its org's line; leaving it last removes the line.
struct Place<'a> {
    lines: &'a std::sync::Mutex<HashMap<Id, Arc<tokio::sync::Mutex<()>>>>,
    org: Id,
    line: Arc<tokio::sync::Mutex<()>>,
    first: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.first = None;
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are taken under this lock: the map's and this one mean nobody
        // else is in the line.
        if Arc::strong_count(&self.line) == 2 {
            lines.remove(&self.org);
        }
    }
}

/// The encodings kept, and their bytes (a stream key's name counted with its blob).
#[derive(Default)]
struct Kept {
    /// Stream key → (`last_server_seq`, encoded snapshot).
    by_key: HashMap<StreamKey, (u64, Bytes)>,
    bytes: usize,
}

/// What keeping `blob` for `key` counts against [`ON_DEMAND_KEPT_BYTES`].
fn kept_size(key: &StreamKey, blob: &Bytes) -> usize {
    blob.len() + key.to_string().len() + 64
}

impl OnDemand {
    fn new() -> Self {
        Self::with_turns(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
    }

    fn with_turns(turns: usize) -> Self {
        Self {
            turn: tokio::sync::Semaphore::new(turns),
            lines: std::sync::Mutex::default(),
            kept: std::sync::Mutex::new(Kept::default()),
        }
    }

    /// Waits for `org`'s earlier reads, then for a turn.
    async fn turn(&self, org: &Id) -> Result<Turn<'_>, tokio::sync::AcquireError> {
        let line = {
            let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
            lines.entry(org.clone()).or_default().clone()
        };
        let mut place = Place {
            lines: &self.lines,
            org: org.clone(),
            line,
            first: None,
        };
        place.first = Some(place.line.clone().lock_owned().await);
        let permit = self.turn.acquire().await?;
        Ok(Turn {
            _permit: permit,
            _place: place,
        })
    }

    fn kept(&self, key: &StreamKey, seq: u64) -> Option<Bytes> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.by_key
            .get(key)
            .filter(|(at, _)| *at == seq)
            .map(|(_, b)| b.clone())
    }

    /// Keeps `blob`, replacing `key`'s; past the bound the others go first.
    fn keep(&self, key: &StreamKey, seq: u64, blob: &Bytes) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, old)) = kept.by_key.remove(key) {
            kept.bytes -= kept_size(key, &old);
        }
        let size = kept_size(key, blob);
        if kept.bytes + size > ON_DEMAND_KEPT_BYTES {
            *kept = Kept::default();
        }
        if size <= ON_DEMAND_KEPT_BYTES {
            kept.bytes += size;
            kept.by_key.insert(key.clone(), (seq, blob.clone()));
        }
    }
}

/// Runs one materializer until `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Bound before anything else, so a taken port stops the start at once.
    let metrics_listener =
        ultrasync_metrics::bind("materializer", config.materializer.metrics_listen).await?;
    run_with_metrics(config, metrics_listener, shutdown).await
}

/// [`run`] with the metrics listener bound already (`None`: no listener), as tests
/// bind it on port 0.
pub async fn run_with_metrics(
    config: Config,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let nats::ServiceNats {
        client,
        ops,
        snapshots,
        ..
    } = nats::connect_service(&config, "ultrasync-materializer").await?;
    let cfg = config.materializer.clone();
    let dir = cfg.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&dir))
        .await?
        .with_context(|| format!("opening RocksDB in {}", cfg.data_dir.display()))?;
    let shared = Arc::new(Shared {
        client,
        ops,
        snapshots,
        home_domain: config.region.home_domain.clone(),
        store: Arc::new(store),
        progress: watch::channel(0).0,
        metrics: Arc::new(Metrics::default()),
        on_demand: OnDemand::new(),
    });
    if let Some(listener) = metrics_listener {
        tokio::spawn(ultrasync_metrics::serve(
            "materializer",
            listener,
            shared.metrics.clone(),
            shutdown.clone(),
        ));
    }
    let reads = tokio::spawn(serve_reads(shared.clone(), shutdown.clone()));
    let result = apply_loop(shared.clone(), &cfg, shutdown.clone()).await;
    shutdown.cancel();
    let _ = reads.await;
    let _ = shared.client.flush().await;
    info!("materializer stopped");
    result
}

async fn apply_loop(
    shared: Arc<Shared>,
    cfg: &MaterializerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut applier = Applier::new(shared.store.clone());
    let mut snapshots = Snapshots::new(cfg);
    snapshots.check_stored(&shared).await?;
    let durable = consumer_name(&cfg.name);
    info!(name = %cfg.name, applied = shared.store.applied()?, "materializer running");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let apply_interval = Duration::from_millis(cfg.apply_interval_ms);
    let mut last_apply = Instant::now();
    'consumer: loop {
        let from = shared.store.applied()? + 1;
        let consumer = match start_consumer(&shared.ops, &durable, from).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "creating the materializer consumer failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'consumer,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'consumer,
                }
            }
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(APPLY_CHUNK)
            .max_bytes_per_batch(nats::PULL_MAX_BYTES)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .context("pulling ops")?;
        let mut messages = messages.ready_chunks(APPLY_CHUNK);
        let mut ended = false;
        loop {
            if ended {
                warn!("op consumer ended; starting it again");
                continue 'consumer;
            }
            let chunk = tokio::select! {
                _ = shutdown.cancelled() => break 'consumer,
                _ = tick.tick() => {
                    snapshots.write_due(&shared);
                    continue;
                }
                c = messages.next() => c,
            };
            let Some(mut chunk) = chunk else {
                warn!("op consumer ended; starting it again");
                continue 'consumer;
            };
            // Under load, the ops that arrive until `apply_interval` after the
            // previous apply began join this one: one write batch, one ack.
            let due = last_apply + apply_interval;
            while chunk.len() < APPLY_CHUNK {
                match tokio::time::timeout_at(due.into(), messages.next()).await {
                    Ok(Some(more)) => chunk.extend(more),
                    Ok(None) => {
                        ended = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            last_apply = Instant::now();
            let mut entries = Vec::with_capacity(chunk.len());
            let mut last = None;
            let mut failed = false;
            for m in chunk {
                match m {
                    Ok(m) => {
                        match (
                            nats::stream_key_from_subject(&m.subject),
                            log::consumer_message_entries(&m),
                        ) {
                            (Some(key), Ok(ops)) => {
                                entries.extend(ops.into_iter().map(|e| (key.clone(), e)))
                            }
                            (_, Err(e)) => {
                                warn!(subject = %m.subject, error = %e, "skipping a message that is not an op")
                            }
                            (None, _) => {
                                warn!(subject = %m.subject, "skipping an op on an unexpected subject")
                            }
                        }
                        last = Some(m);
                    }
                    Err(e) => {
                        warn!(error = %e, "pulling ops failed");
                        failed = true;
                    }
                }
            }
            if !entries.is_empty() {
                let started = Instant::now();
                let counts = apply_all(&mut applier, &shared, entries, true).await?;
                shared
                    .metrics
                    .applied(counts.values().sum(), started.elapsed());
                for (key, n) in counts {
                    snapshots.record(key, n);
                }
                shared.progress.send_modify(|n| *n += 1);
            }
            if let Some(m) = last
                && let Err(e) = m.ack().await
            {
                debug!(error = %e, "acking ops failed (the store holds the position)");
            }
            snapshots.write_due(&shared);
            if failed {
                // Start over from the store's position rather than trust the stream.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'consumer;
            }
        }
    }
    snapshots.finish().await;
    Ok(())
}

/// (Re)creates the durable consumer so it delivers from stream sequence `from`.
async fn start_consumer(
    ops: &Stream,
    durable: &str,
    from: u64,
) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
    let _ = ops.delete_consumer(durable).await;
    let consumer = ops
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            description: Some("ultrasync materializer (position kept in its RocksDB)".into()),
            filter_subject: "usync.ops.>".to_owned(),
            deliver_policy: if from <= 1 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                }
            },
            ack_policy: AckPolicy::All,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .context("creating the materializer consumer")?;
    Ok(consumer)
}

/// Applies `entries` in one or more write batches, filling gaps from the log or a
/// snapshot. Returns the ops newly applied per stream key.
async fn apply_all(
    applier: &mut Applier,
    shared: &Shared,
    mut entries: Vec<(StreamKey, LogEntry)>,
    record_position: bool,
) -> anyhow::Result<HashMap<StreamKey, u64>> {
    let mut counts: HashMap<StreamKey, u64> = HashMap::new();
    loop {
        let (done, rest) = apply_blocking(applier, entries, record_position).await?;
        for (k, n) in done.per_key {
            *counts.entry(k).or_default() += n;
        }
        let Some(gap) = done.gap else {
            return Ok(counts);
        };
        entries = rest;
        entries.drain(..done.taken);
        warn!(stream_key = %gap.stream_key, expected = gap.expected, got = gap.got, "ops missing before this one; filling from the log");
        let mut sources = vec![SnapshotSource::Local(&shared.snapshots)];
        if let Some(domain) = &shared.home_domain {
            sources.push(SnapshotSource::Home {
                client: &shared.client,
                domain,
            });
        }
        let filled = fill(
            applier,
            &shared.ops,
            &sources,
            &gap.stream_key,
            gap.got - 1,
            u64::MAX,
        )
        .await?;
        shared.metrics.rebuilt(filled.from_snapshot);
        *counts.entry(gap.stream_key).or_default() += filled.applied;
    }
}

/// Runs one `Applier::apply` off the async threads.
async fn apply_blocking(
    applier: &mut Applier,
    entries: Vec<(StreamKey, LogEntry)>,
    record_position: bool,
) -> anyhow::Result<(store::Applied, Vec<(StreamKey, LogEntry)>)> {
    let mut owned = std::mem::replace(applier, Applier::new(applier.store().clone()));
    let (owned, entries, result) = tokio::task::spawn_blocking(move || {
        let r = owned.apply(&entries, record_position);
        (owned, entries, r)
    })
    .await?;
    *applier = owned;
    Ok((result?, entries))
}

/// Where [`fill`] looks for a snapshot when the log no longer holds the next op.
#[derive(Clone, Copy)]
pub(crate) enum SnapshotSource<'a> {
    /// This region's `usync-snapshots`.
    Local(&'a ObjectStore),
    /// The home region's `usync-snapshots`, read across the leafnode: in a replica
    /// region whose mirror skipped ops the home region purged before it copied them.
    Home {
        client: &'a async_nats::Client,
        domain: &'a str,
    },
}

impl SnapshotSource<'_> {
    async fn fetch(&self, key: &StreamKey) -> anyhow::Result<Option<snapshot::Snapshot>> {
        match self {
            Self::Local(store) => Ok(snapshot::fetch(store, key).await?),
            Self::Home { client, domain } => {
                let store = async_nats::jetstream::with_domain((*client).clone(), domain)
                    .get_object_store(nats::SNAPSHOTS_BUCKET)
                    .await
                    .with_context(|| format!("opening the snapshot store of domain {domain}"))?;
                Ok(snapshot::fetch(&store, key).await?)
            }
        }
    }
}

impl std::fmt::Display for SnapshotSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(_) => f.write_str("this region"),
            Self::Home { domain, .. } => write!(f, "home domain {domain}"),
        }
    }
}

/// What [`fill`] did.
pub(crate) struct Filled {
    /// Ops applied (a snapshot counts as what it skipped).
    pub applied: u64,
    /// Whether a snapshot was loaded.
    pub from_snapshot: bool,
}

/// Brings `key` up to `to` from the log; where the log no longer holds the next op,
/// from the first sound snapshot of `sources` that reaches it (at most
/// `snapshot_limit`) and the log after it.
pub(crate) async fn fill(
    applier: &mut Applier,
    ops: &Stream,
    sources: &[SnapshotSource<'_>],
    key: &StreamKey,
    to: u64,
    snapshot_limit: u64,
) -> anyhow::Result<Filled> {
    let subject = ops_subject(key);
    let mut applied = 0;
    let mut from_snapshot = false;
    loop {
        let head = applier.head(key)?;
        if head.last_seq >= to {
            return Ok(Filled {
                applied,
                from_snapshot,
            });
        }
        let from = head.last_seq + 1;
        let chunk = log::read_range(ops, &subject, from, to.min(from + FILL_CHUNK - 1)).await?;
        if chunk.first().map(|e| e.server_seq) == Some(from) {
            let entries: Vec<_> = chunk.into_iter().map(|e| (key.clone(), e)).collect();
            let (done, _) = apply_blocking(applier, entries, false).await?;
            applied += done.per_key.values().sum::<u64>();
            if done.taken == 0 {
                anyhow::bail!("the log of {key} does not continue at {from}");
            }
            continue;
        }
        // The log does not hold `from`: only a snapshot past it can help.
        let oldest = chunk.first().map(|e| e.server_seq);
        let mut found = None;
        for source in sources {
            match source.fetch(key).await {
                Ok(Some(s))
                    if s.state.last_seq >= from
                        && s.state.last_seq <= snapshot_limit
                        && oldest.is_none_or(|o| s.state.last_seq + 1 >= o) =>
                {
                    found = Some((s, source));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(stream_key = %key, from = %source, error = %format!("{e:#}"), "cannot use the stored snapshot")
                }
            }
        }
        let Some((s, source)) = found else {
            anyhow::bail!(
                "ops {from}.. of {key} are no longer in the log (oldest: {}) and no sound snapshot covers them",
                oldest.map_or("none".to_owned(), |o| o.to_string())
            );
        };
        match source {
            SnapshotSource::Local(_) => {
                info!(stream_key = %key, seq = s.state.last_seq, "loading the stream key from its snapshot")
            }
            SnapshotSource::Home { domain, .. } => {
                warn!(stream_key = %key, seq = s.state.last_seq, home_domain = %domain, missing = %format!("{from}..={to}"), "the home region purged ops this region's mirror had not copied; loading the home region's snapshot")
            }
        }
        applied += s.state.last_seq - head.last_seq;
        from_snapshot = true;
        let mut owned = std::mem::replace(applier, Applier::new(applier.store().clone()));
        let k = key.clone();
        let (owned, result) = tokio::task::spawn_blocking(move || {
            let r = owned.install(&k, &s);
            (owned, r)
        })
        .await?;
        *applier = owned;
        result?;
    }
}

/// Keys in a state up to which its snapshots follow `snapshot_every_ops` and
/// `snapshot_interval_secs` as set; a larger state's are that many times further
/// apart as it holds this many keys (see [`Snapshots::is_due`]).
const SNAPSHOT_SCALE_KEYS: u64 = 10_000;

/// When each stream key's next snapshot is due, and the writes in flight.
struct Snapshots {
    enabled: bool,
    every_ops: u64,
    interval: Duration,
    /// Ops applied since the last snapshot, and when the first of them came.
    pending: HashMap<StreamKey, (u64, Instant)>,
    /// Keys whose stored snapshot is damaged: written again at once, over it.
    forced: HashSet<StreamKey>,
    /// The writes in flight; each ends with the keys of the state it wrote.
    writing: HashMap<StreamKey, tokio::task::JoinHandle<Option<u64>>>,
    /// Keys in the state of the last snapshot written, for the stream keys whose
    /// state was larger than [`SNAPSHOT_SCALE_KEYS`] (the others' is not needed).
    large: HashMap<StreamKey, u64>,
}

impl Snapshots {
    fn new(cfg: &MaterializerConfig) -> Self {
        Self {
            enabled: cfg.write_snapshots,
            every_ops: cfg.snapshot_every_ops,
            interval: Duration::from_secs(cfg.snapshot_interval_secs),
            pending: HashMap::new(),
            forced: HashSet::new(),
            writing: HashMap::new(),
            large: HashMap::new(),
        }
    }

    /// Whether a snapshot of a state of `keys` keys is due after `ops` ops, the
    /// first of them `waited` ago. Writing one costs in proportion to the state,
    /// so a state of more than [`SNAPSHOT_SCALE_KEYS`] keys waits that many times
    /// longer, in ops and in time: a tenant's large namespace written at a high
    /// rate costs the materializer about the same per op as a small one, instead of
    /// a whole state's encoding every `every_ops` ops. The log then holds about as
    /// many ops past the snapshot as the state has keys.
    fn is_due(&self, keys: u64, ops: u64, waited: Duration) -> bool {
        let scale = (keys / SNAPSHOT_SCALE_KEYS).max(1);
        let interval = self
            .interval
            .saturating_mul(u32::try_from(scale).unwrap_or(u32::MAX));
        ops >= self.every_ops.saturating_mul(scale) || waited >= interval
    }

    fn record(&mut self, key: StreamKey, ops: u64) {
        if ops > 0 {
            self.pending.entry(key).or_insert((0, Instant::now())).0 += ops;
        }
    }

    /// At start-up: any stored snapshot that is damaged or behind the store is due.
    async fn check_stored(&mut self, shared: &Shared) -> anyhow::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let store = shared.store.clone();
        let keys = tokio::task::spawn_blocking(move || store.stream_keys()).await??;
        for (key, head) in keys {
            if head.last_seq == 0 {
                continue;
            }
            match snapshot::fetch(&shared.snapshots, &key).await {
                Ok(Some(s)) if s.state.last_seq >= head.last_seq => {}
                Ok(Some(s)) => self.record(key, head.last_seq - s.state.last_seq),
                Ok(None) => self.record(key, head.last_seq),
                Err(snapshot::FetchError::Refused(why)) => {
                    warn!(stream_key = %key, %why, "the stored snapshot is damaged; writing a new one");
                    self.forced.insert(key);
                }
                Err(e) => warn!(stream_key = %key, error = %e, "cannot check the stored snapshot"),
            }
        }
        Ok(())
    }

    /// Starts the snapshot writes that are due (one at a time per stream key).
    fn write_due(&mut self, shared: &Arc<Shared>) {
        if !self.enabled {
            return;
        }
        let large = &mut self.large;
        self.writing.retain(|key, task| {
            if !task.is_finished() {
                return true;
            }
            match futures::FutureExt::now_or_never(task) {
                Some(Ok(Some(keys))) if keys > SNAPSHOT_SCALE_KEYS => {
                    large.insert(key.clone(), keys);
                }
                Some(Ok(Some(_))) => {
                    large.remove(key);
                }
                _ => {}
            }
            false
        });
        let due: Vec<(StreamKey, bool)> = self
            .pending
            .iter()
            .filter(|(k, (n, since))| {
                let keys = self.large.get(*k).copied().unwrap_or(0);
                self.is_due(keys, *n, since.elapsed())
            })
            .map(|(k, _)| (k.clone(), false))
            .chain(self.forced.iter().map(|k| (k.clone(), true)))
            .filter(|(k, _)| !self.writing.contains_key(k))
            .collect();
        for (key, force) in due {
            self.pending.remove(&key);
            self.forced.remove(&key);
            let shared = shared.clone();
            let task_key = key.clone();
            let task = tokio::spawn(async move {
                match write_snapshot(&shared, &task_key, force).await {
                    Ok(keys) => Some(keys),
                    Err(e) => {
                        shared.metrics.snapshot_failed();
                        warn!(stream_key = %task_key, error = %e, "writing a snapshot failed");
                        None
                    }
                }
            });
            self.writing.insert(key, task);
        }
    }

    async fn finish(&mut self) {
        for (_, t) in self.writing.drain() {
            let _ = t.await;
        }
    }
}

/// Encodes `key`'s state as stored now; returns the blob, its `last_server_seq` and
/// the keys in it.
async fn encode_snapshot(shared: &Shared, key: &StreamKey) -> anyhow::Result<(Vec<u8>, u64, u64)> {
    let first_in_log = log::next_at_or_after(&shared.ops, &nats::ops_subject(key), 1)
        .await?
        .map_or(1, |e| e.server_seq);
    let store = shared.store.clone();
    let key = key.clone();
    tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let s = store.snapshot_for_log(&key, first_in_log)?;
        Ok((s.encode(), s.state.last_seq, s.state.keys.len() as u64))
    })
    .await?
    .map_err(Into::into)
}

/// Writes `key`'s snapshot; returns the keys of the state it holds.
async fn write_snapshot(shared: &Shared, key: &StreamKey, force: bool) -> anyhow::Result<u64> {
    let started = Instant::now();
    let (bytes, seq, keys) = encode_snapshot(shared, key).await?;
    if seq == 0 {
        return Ok(keys);
    }
    let js = async_nats::jetstream::new(shared.client.clone());
    let put = snapshot::put(&js, &shared.snapshots, key, seq, &bytes, force)
        .await
        .map_err(anyhow::Error::msg)?;
    let written = matches!(put, snapshot::Put::Written);
    shared
        .metrics
        .snapshot_stored(written, bytes.len(), started.elapsed());
    match put {
        snapshot::Put::Written => {
            info!(stream_key = %key, seq, bytes = bytes.len(), "snapshot written")
        }
        snapshot::Put::Kept { stored_seq } => {
            debug!(stream_key = %key, seq, stored_seq, "a snapshot as new is stored already")
        }
    }
    Ok(keys)
}

async fn serve_reads(shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut sub = shared
        .client
        .queue_subscribe(reads::SUBSCRIPTION, reads::QUEUE.to_owned())
        .await
        .context("subscribing to reads")?;
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = sub.next() => m,
        };
        let Some(msg) = msg else { break };
        let shared = shared.clone();
        tokio::spawn(async move {
            let Some(reply) = msg.reply.clone() else {
                return;
            };
            let (headers, body) = match answer(&shared, &msg).await {
                Ok(body) => reads::ok_reply(body),
                Err((code, message)) => reads::error_reply(code, message),
            };
            if let Err(e) = shared
                .client
                .publish_with_headers(reply, headers, body)
                .await
            {
                debug!(error = %e, "answering a read failed");
            }
        });
    }
    let _ = sub.unsubscribe().await;
    Ok(())
}

type ReadResult = Result<Bytes, (ErrorCode, String)>;

fn internal(e: impl std::fmt::Display) -> (ErrorCode, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    warn!(error_id = %id, error = %e, "read failed");
    (ErrorCode::Internal, format!("internal error {id}"))
}

async fn answer(shared: &Shared, msg: &async_nats::Message) -> ReadResult {
    let (verb, key) = reads::parse_subject(&msg.subject).ok_or((
        ErrorCode::InvalidMessage,
        format!("not a read subject: {}", msg.subject),
    ))?;
    let req: ReadRequest = if msg.payload.is_empty() {
        ReadRequest::default()
    } else {
        serde_json::from_slice(&msg.payload)
            .map_err(|e| (ErrorCode::InvalidMessage, format!("bad read request: {e}")))?
    };
    if let Some(min) = req.min_seq {
        wait_for(shared, &key, min).await?;
    }
    match verb {
        Verb::Snapshot => {
            let started = Instant::now();
            let (bytes, seq) = snapshot_for_read(shared, &key).await?;
            if req.store && seq > 0 {
                let js = async_nats::jetstream::new(shared.client.clone());
                let put = snapshot::put(&js, &shared.snapshots, &key, seq, &bytes, true)
                    .await
                    .map_err(|e| {
                        shared.metrics.snapshot_failed();
                        internal(e)
                    })?;
                let written = matches!(put, snapshot::Put::Written);
                shared
                    .metrics
                    .snapshot_stored(written, bytes.len(), started.elapsed());
                match put {
                    snapshot::Put::Written => {
                        info!(stream_key = %key, seq, "snapshot written on request")
                    }
                    snapshot::Put::Kept { stored_seq } => {
                        debug!(stream_key = %key, seq, stored_seq, "asked to store a snapshot; a sound one as new is stored")
                    }
                }
            }
            let limit = shared
                .client
                .server_info()
                .max_payload
                .saturating_sub(64 * 1024);
            if bytes.len() > limit {
                return Err((
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the snapshot of {key} is {} bytes, more than one message carries; read it from {}",
                        bytes.len(),
                        nats::SNAPSHOTS_BUCKET
                    ),
                ));
            }
            Ok(bytes)
        }
        Verb::Key => {
            let name = req
                .key
                .ok_or((ErrorCode::InvalidMessage, "key is required".to_owned()))?;
            ultrasync_shared::validate_key(&name)
                .map_err(|e| (ErrorCode::InvalidKey, e.to_string()))?;
            let store = shared.store.clone();
            let k = key.clone();
            let (last, entry) = tokio::task::spawn_blocking(move || store.entry(&k, &name))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            // A crdt key's document, when asked for (the automerge-repo endpoint
            // syncs peers from it); saved off the runtime.
            let doc = match entry.as_ref().and_then(|e| e.doc.clone()) {
                Some(d) if req.doc => Some(
                    tokio::task::spawn_blocking(move || B64.encode(d.save()))
                        .await
                        .map_err(internal)?,
                ),
                _ => None,
            };
            let reply = reads::KeyReply {
                last_server_seq: last,
                heads: entry.as_ref().and_then(|e| e.heads()),
                version: entry.as_ref().map_or(0, |e| e.version),
                value: entry.map(|e| e.value),
                doc,
            };
            let body = serde_json::to_vec(&reply).map_err(internal)?;
            let limit = shared
                .client
                .server_info()
                .max_payload
                .saturating_sub(64 * 1024);
            if body.len() > limit {
                return Err((
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the answer for a key of {key} is {} bytes, more than one message carries",
                        body.len()
                    ),
                ));
            }
            Ok(body.into())
        }
        Verb::Digest => {
            let store = shared.store.clone();
            let k = key.clone();
            let s = tokio::task::spawn_blocking(move || store.snapshot(&k))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            let reply = reads::DigestReply {
                last_server_seq: s.state.last_seq,
                digest: state::digest(&s.state),
                keys: s.state.keys.len() as u64,
            };
            Ok(serde_json::to_vec(&reply).map_err(internal)?.into())
        }
    }
}

/// `key`'s snapshot for a read, as it is now: the kept one when the state has not
/// moved since, else encoded when its turn comes (see [`OnDemand`]).
async fn snapshot_for_read(
    shared: &Shared,
    key: &StreamKey,
) -> Result<(Bytes, u64), (ErrorCode, String)> {
    let _turn = tokio::time::timeout(reads::MAX_WAIT, shared.on_demand.turn(&key.org))
        .await
        .map_err(|_| {
            (
                ErrorCode::Unavailable,
                "this materializer is busy encoding other snapshots; retry later".to_owned(),
            )
        })?
        .map_err(internal)?;
    let head = shared.store.head(key).map_err(internal)?.last_seq;
    if let Some(bytes) = shared.on_demand.kept(key, head) {
        shared.metrics.snapshot_read(false);
        return Ok((bytes, head));
    }
    let (bytes, seq, _) = encode_snapshot(shared, key).await.map_err(internal)?;
    shared.metrics.snapshot_read(true);
    let bytes = Bytes::from(bytes);
    shared.on_demand.keep(key, seq, &bytes);
    Ok((bytes, seq))
}

/// Waits until `key` is applied up to `min`, for at most `reads::MAX_WAIT`.
async fn wait_for(shared: &Shared, key: &StreamKey, min: u64) -> Result<(), (ErrorCode, String)> {
    let deadline = tokio::time::Instant::now() + reads::MAX_WAIT;
    let mut progress = shared.progress.subscribe();
    loop {
        let head = shared.store.head(key).map_err(internal)?;
        if head.last_seq >= min {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, progress.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                return Err((
                    ErrorCode::Unavailable,
                    format!(
                        "this materializer has {key} up to {}, not yet {min}; retry later",
                        head.last_seq
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_encoded_for_a_read_is_kept_while_its_state_has_not_moved() {
        let on_demand = OnDemand::new();
        let a = StreamKey::parse("acme", "web", "a").expect("key");
        let b = StreamKey::parse("acme", "web", "b").expect("key");
        on_demand.keep(&a, 7, &Bytes::from_static(b"seven"));
        assert_eq!(on_demand.kept(&a, 7).as_deref(), Some(&b"seven"[..]));
        assert_eq!(on_demand.kept(&a, 8), None, "the state moved on");
        assert_eq!(on_demand.kept(&b, 7), None);
        on_demand.keep(&a, 8, &Bytes::from_static(b"eight"));
        assert_eq!(on_demand.kept(&a, 7), None, "one per stream key");
        // Bounded in bytes: a blob that would go past the bound drops the others.
        let big = Bytes::from(vec![0u8; ON_DEMAND_KEPT_BYTES - 100]);
        on_demand.keep(&b, 1, &big);
        assert_eq!(on_demand.kept(&a, 8), None);
        assert_eq!(on_demand.kept(&b, 1).map(|b| b.len()), Some(big.len()));
        on_demand.keep(&a, 9, &Bytes::from(vec![0u8; ON_DEMAND_KEPT_BYTES + 1]));
        assert_eq!(
            on_demand.kept(&a, 9),
            None,
            "larger than the bound: not kept"
        );
    }

    /// One turn, org `a` holding it with four more reads waiting, then one read of
    /// org `b`: `b` encodes next, not after `a`'s flood, and the lines are gone
    /// once everyone is through (also for a read that gave up waiting).
    #[tokio::test]
    async fn an_org_flooding_snapshot_reads_takes_turns_with_the_others() {
        let on_demand = Arc::new(OnDemand::with_turns(1));
        let (a, b) = (
            Id::parse("org", "a").expect("id"),
            Id::parse("org", "b").expect("id"),
        );
        let first = on_demand.turn(&a).await.expect("turn");
        let (order_tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut reads = Vec::new();
        for (org, name) in [(&a, "a2"), (&a, "a3"), (&a, "a4"), (&a, "a5"), (&b, "b1")] {
            let (on_demand, org, tx) = (on_demand.clone(), org.clone(), order_tx.clone());
            reads.push(tokio::spawn(async move {
                let turn = on_demand.turn(&org).await.expect("turn");
                tx.send(name).expect("send");
                drop(turn);
            }));
            // Each read gets in line before the next one asks.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        let gave_up =
            futures::FutureExt::now_or_never(on_demand.turn(&Id::parse("org", "c").expect("id")));
        assert!(gave_up.is_none(), "no turn is free");
        drop(first);
        for read in reads {
            read.await.expect("read");
        }
        drop(order_tx);
        let mut got = Vec::new();
        while let Some(name) = order.recv().await {
            got.push(name);
        }
        assert_eq!(got, ["b1", "a2", "a3", "a4", "a5"]);
        let lines = on_demand.lines.lock().expect("lines");
        assert!(lines.is_empty(), "{:?}", lines.keys().collect::<Vec<_>>());
    }

    #[test]
    fn a_large_state_is_snapshotted_further_apart() {
        let cfg = MaterializerConfig {
            snapshot_every_ops: 10_000,
            snapshot_interval_secs: 60,
            ..Default::default()
        };
        let s = Snapshots::new(&cfg);
        let min = |m: u64| Duration::from_secs(60 * m);
        // Up to the scale, as configured: by ops or by time.
        for keys in [0, 1_000, SNAPSHOT_SCALE_KEYS] {
            assert!(!s.is_due(keys, 9_999, min(0)));
            assert!(s.is_due(keys, 10_000, min(0)));
            assert!(s.is_due(keys, 1, min(1)));
        }
        // A million keys: a hundred times further apart, in ops and in time.
        let keys = 100 * SNAPSHOT_SCALE_KEYS;
        assert!(!s.is_due(keys, 10_000, min(0)));
        assert!(!s.is_due(keys, 999_999, min(99)));
        assert!(s.is_due(keys, 1_000_000, min(0)));
        assert!(s.is_due(keys, 1, min(100)));
    }
}
