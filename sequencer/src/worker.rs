//! The per-stream-key worker: gathers a batch, plans it against the key's state,
//! writes it, answers. One worker per key per instance; across instances the
//! expected-sequence check on the write is the fence.
//!
//! A worker holds the namespace's state (built with the shared `apply`, so it is the
//! same state the materializer builds) and the op ids of every op in the log, so it
//! can check preconditions, merge patches and Automerge changes, validate schemas, and
//! answer a retried command with its original ack however late the retry comes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, stream::Stream};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use ultrasync_shared::admission::{self, Limits, LimitsConfig};
use ultrasync_shared::config::SequencerConfig;
use ultrasync_shared::ids::is_valid_id;
use ultrasync_shared::log::{self, Head, LogError};
use ultrasync_shared::namespaces::{Mode, NamespaceSpec, Namespaces};
use ultrasync_shared::nats::{
    HDR_BATCH, command_kv_key, is_reply_subject, join_lines, ops_subject,
};
use ultrasync_shared::op::{command_key, encode_command_key, op_id_bytes, parse_command_key};
use ultrasync_shared::protocol::{CurrentState, ServerMessage};
use ultrasync_shared::reads::DigestReply;
use ultrasync_shared::snapshot::{self, Snapshot};
use ultrasync_shared::state::{self, ApplyError, KeyEntry, NamespaceState};
use ultrasync_shared::trace::{self, Span, SpanKind, Tracer};
use ultrasync_shared::{CommandEnvelope, ErrorCode, OpType, StreamKey, validate_key};

use crate::HDR_SEQUENCER;
use crate::writer::{Outgoing, WriteError};

/// A worker with nothing to do for this long exits; the next command starts a new one.
const IDLE: Duration = Duration::from_secs(300);
/// Most bytes of answers in one message to a gateway (NATS' max_payload is 4 MiB;
/// a single larger answer still goes, alone).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Conflicts in a row before a batch is handed back for redelivery.
const MAX_CONFLICTS: u32 = 64;
/// A worker of an undeclared namespace holds nothing worth keeping: it exits after
/// this long without commands.
const IDLE_UNKNOWN: Duration = Duration::from_secs(1);
/// Bytes of command documents in a batch above which it is planned off the async
/// runtime (a batch with any `crdt_op` always is).
const INLINE_PLAN_BYTES: usize = 64 * 1024;
/// Newest ops a worker keeps (as stored), so a retry of a recent command is answered
/// without reading the log...
const RECENT_OPS: usize = 1024;
/// ...within this many bytes of op bodies.
const RECENT_BYTES: usize = 4 * 1024 * 1024;
/// A worker trims its commands to the log once it holds this many (and then twice
/// what it kept).
const TRIM_MIN: usize = 4096;
/// `usync-commands` lookups in flight for one batch.
const LOOKUPS_IN_FLIGHT: usize = 32;
/// Longest a batch stays open while the committer is writing (a write takes a few
/// milliseconds; this only bounds a write that hangs).
const BUSY_LINGER_MAX: Duration = Duration::from_millis(20);

/// What every worker of an instance shares.
pub struct WorkerShared {
    pub client: async_nats::Client,
    pub ops: Stream,
    pub snapshots: jetstream::object_store::ObjectStore,
    pub hlc: uhlc::HLC,
    pub config: SequencerConfig,
    pub namespaces: Namespaces,
    /// What a command may carry (`[limits]`).
    pub limits: LimitsConfig,
    /// Batches planned off the async runtime at once (decoding Automerge changes,
    /// large JSON): one heavy tenant takes at most these threads, never the
    /// runtime's.
    pub heavy: Arc<tokio::sync::Semaphore>,
    /// Searches of the whole log for a retried command's op (one no longer among a
    /// key's recent ops, nor after one of its [`Marks`]) running at once, across
    /// every key: each is a few dozen requests to nats-server, which every tenant
    /// shares, so a flood of retries of old commands waits here instead.
    pub searches: Arc<tokio::sync::Semaphore>,
    /// Answers not sent because their `reply_to` was not a `usync.reply.…` subject.
    pub dropped_replies: AtomicU64,
    /// This instance's id, sent on every answer.
    pub instance: String,
    /// The gateways of this process (`ultrasync serve`), answered without NATS.
    pub local: ultrasync_shared::local::Local,
    /// Commands from the gateway of this process.
    pub intake: Arc<crate::intake::Intake>,
    /// Group commit of every worker's writes.
    pub committer: crate::committer::Committer,
    /// The instance's metrics (batch sizes).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `usync-commands`: the commands of compacted ops.
    pub commands: jetstream::kv::Store,
    /// Continues the traces gateways send with commands (off unless
    /// `ULTRASYNC_OTLP_ENDPOINT` is set).
    pub tracer: Tracer,
}

/// What a worker is handed.
pub enum Job {
    Command(Pending),
    /// Report the key's state digest as this worker holds it (after catching up
    /// with the log).
    Digest(oneshot::Sender<Result<DigestReply, String>>),
}

/// A message taken from `USYNC_CMDS`: one command, or several of one stream key
/// ([`ultrasync_shared::nats::HDR_BATCH`]). It is acked once every command in it is
/// answered, and handed back for redelivery when any of them must be retried (the
/// ones already answered are then answered again from their op ids). A message
/// offered by the gateway of this process has no `msg`: nothing to ack, and each
/// command to retry is handed back on its own ([`Pending::retry_after`]).
pub struct Delivery {
    msg: Option<jetstream::Message>,
    open: AtomicUsize,
    /// Longest redelivery delay asked for (ms); 0 = ack.
    retry_ms: AtomicU64,
}

impl Delivery {
    async fn finish(&self, retry: Option<Duration>) {
        if let Some(d) = retry {
            self.retry_ms
                .fetch_max((d.as_millis() as u64).max(1), Ordering::AcqRel);
        }
        if self.open.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let Some(msg) = &self.msg else { return };
        let result = match self.retry_ms.load(Ordering::Acquire) {
            0 => msg.ack().await,
            ms => {
                msg.ack_with(AckKind::Nak(Some(Duration::from_millis(ms))))
                    .await
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "acking a command message failed; it will be redelivered and deduped");
        }
    }
}

/// A command taken from `USYNC_CMDS`, decoded.
pub struct Pending {
    delivery: Arc<Delivery>,
    cmd: Result<CommandEnvelope, String>,
    /// Known even when the body does not decode, so a reject can still be sent.
    /// Only ever a `usync.reply.…` subject (see [`is_reply_subject`]).
    reply_to: Option<String>,
    /// A `reply_to` that was refused (logged and counted once answered).
    bad_reply_to: bool,
    command_id: String,
    /// Size of the command document (decides where the batch is planned).
    bytes: usize,
    /// `sequencer.command`, when the gateway sent the command's trace: from its
    /// delivery here to its answer (ends when the command is dropped).
    span: Span,
    /// Offered by the gateway of this process: handed back unless answered.
    offered: Option<crate::intake::Taken>,
}

impl Pending {
    /// The commands of one message, in order.
    pub fn from_message(msg: jetstream::Message, tracer: &Tracer) -> Vec<Self> {
        let decoded: Vec<(Decoded, usize)> =
            ultrasync_shared::nats::split_lines(msg.headers.as_ref(), &msg.payload)
                .into_iter()
                .map(|doc| (decode(doc), doc.len()))
                .collect();
        let mut traces = match tracer.is_on() {
            true => trace::lines_of(msg.headers.as_ref(), decoded.len()),
            false => Default::default(),
        };
        // Only traced commands need the delivery count and the arrival time.
        let (delivered, arrived) = match traces.is_empty() {
            true => (0, std::time::UNIX_EPOCH),
            false => (
                msg.info().map_or(1, |i| i.delivered),
                std::time::SystemTime::now(),
            ),
        };
        let delivery = Arc::new(Delivery {
            msg: Some(msg),
            open: AtomicUsize::new(decoded.len()),
            retry_ms: AtomicU64::new(0),
        });
        decoded
            .into_iter()
            .enumerate()
            .map(|(line, (decoded, bytes))| {
                let traced = traces.remove(&line);
                let span = command_span(tracer, traced.as_deref(), &decoded.2, delivered, arrived);
                Self::new(delivery.clone(), decoded, bytes, span, None)
            })
            .collect()
    }

    fn new(
        delivery: Arc<Delivery>,
        (cmd, reply_to, command_id): Decoded,
        bytes: usize,
        span: Span,
        offered: Option<crate::intake::Taken>,
    ) -> Self {
        let bad_reply_to = reply_to.as_deref().is_some_and(|r| !is_reply_subject(r));
        Self {
            delivery,
            cmd,
            reply_to: reply_to.filter(|_| !bad_reply_to),
            bad_reply_to,
            command_id,
            bytes,
            span,
            offered,
        }
    }

    /// The commands of one message the gateway of this process offered, in order.
    pub fn from_offered(
        offered: crate::intake::Offered,
        intake: &Arc<crate::intake::Intake>,
        tracer: &Tracer,
    ) -> Vec<Self> {
        let delivery = Arc::new(Delivery {
            msg: None,
            open: AtomicUsize::new(offered.commands.len()),
            retry_ms: AtomicU64::new(0),
        });
        let arrived = match tracer.is_on() {
            true => std::time::SystemTime::now(),
            false => std::time::UNIX_EPOCH,
        };
        offered
            .commands
            .into_iter()
            .map(|c| {
                let decoded = decode(&c.body);
                let span = command_span(tracer, c.traceparent.as_deref(), &decoded.2, 1, arrived);
                let bytes = c.body.len();
                let taken = crate::intake::Taken::new(intake.clone(), offered.subject.clone(), c);
                Self::new(delivery.clone(), decoded, bytes, span, Some(taken))
            })
            .collect()
    }

    async fn ack(&self) {
        if let Some(taken) = &self.offered {
            taken.answered();
        }
        self.delivery.finish(None).await;
    }

    /// Has the command sequenced again after `delay`: its message redelivered, or,
    /// offered by the gateway of this process, the command published to
    /// `USYNC_CMDS`.
    pub(crate) async fn retry_after(&self, delay: Duration) {
        match &self.offered {
            Some(taken) => {
                taken.hand_back(delay);
                self.delivery.finish(None).await;
            }
            None => self.delivery.finish(Some(delay)).await,
        }
    }
}

/// `sequencer.command` for a command whose gateway span is `traceparent` (off when
/// it has none or tracing is off), delivered `deliveries` times, here since `arrived`.
fn command_span(
    tracer: &Tracer,
    traceparent: Option<&str>,
    command_id: &str,
    deliveries: i64,
    arrived: std::time::SystemTime,
) -> Span {
    let Some(tp) = traceparent.filter(|_| tracer.is_on()) else {
        return Span::off();
    };
    let span = tracer.continue_from("sequencer.command", SpanKind::Consumer, tp, arrived);
    span.set("ultrasync.command_id", command_id.to_owned());
    span.set("ultrasync.deliveries", deliveries);
    span
}

/// A command document decoded: the envelope or why not, the reply route, the id.
type Decoded = (Result<CommandEnvelope, String>, Option<String>, String);

/// One command document: the envelope, or why not, with the reply route and id
/// (read loosely so a malformed command can still be answered).
fn decode(doc: &[u8]) -> Decoded {
    match serde_json::from_slice::<CommandEnvelope>(doc) {
        Ok(cmd) => {
            let reply_to = cmd.reply_to.clone();
            let id = cmd.command_id.clone();
            (Ok(cmd), reply_to, id)
        }
        Err(e) => {
            let loose: Value = serde_json::from_slice(doc).unwrap_or(Value::Null);
            let reply_to = loose
                .get("reply_to")
                .and_then(Value::as_str)
                .map(str::to_owned);
            let id = loose
                .get("command_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            (Err(e.to_string()), reply_to, id)
        }
    }
}

/// The key's state as of the log head this worker last saw.
struct Loaded {
    /// Stream sequence of the newest op (0 = the subject is empty).
    head_stream_seq: u64,
    state: NamespaceState,
    /// The commands of the ops still in the log (and of the newest
    /// [`snapshot::RECENT_COMMANDS`]), with their `server_seq`; older ones are in
    /// `usync-commands`.
    commands: Commands,
    /// `server_seq` of the oldest op in the log when last looked: ops below it were
    /// compacted, and their commands are looked up in `usync-commands`.
    first_in_log: u64,
    /// Trim `commands` to the log once it holds more than this many.
    trim_at: usize,
    /// The newest ops as stored, with their `server_seq`, contiguous up to
    /// `state.last_seq` (retries answered from memory).
    recent: VecDeque<(u64, Bytes)>,
    recent_bytes: usize,
    /// Where older ops are in the log.
    marks: Marks,
}

/// Ops between two [`Marks`], at least.
const MARK_EVERY: u64 = 8;
/// Marks kept per key (16 bytes each): with [`MARK_EVERY`], the last 32,768 ops or
/// more.
const MARKS: usize = 4096;

/// Where a key's ops are in the log, sparsely: pairs of an op's `server_seq` and a
/// stream sequence at or below the message holding it, oldest first, at least
/// [`MARK_EVERY`] ops apart. A retry of an op no longer among the recent ones reads
/// a few messages forward from the mark below it instead of searching the stream.
#[derive(Default)]
struct Marks(VecDeque<(u64, u64)>);

impl Marks {
    /// Op `server_seq` is in the message at stream sequence `stream_seq` or after it.
    fn note(&mut self, server_seq: u64, stream_seq: u64) {
        if self
            .0
            .back()
            .is_some_and(|&(last, _)| server_seq < last.saturating_add(MARK_EVERY))
        {
            return;
        }
        self.0.push_back((server_seq, stream_seq));
        if self.0.len() > MARKS {
            self.0.pop_front();
        }
    }

    /// The stream sequence to read forward from for op `server_seq`, when a mark is
    /// at or below it.
    fn below(&self, server_seq: u64) -> Option<u64> {
        let after = self.0.partition_point(|&(s, _)| s <= server_seq);
        let (_, stream_seq) = self.0.get(after.checked_sub(1)?)?;
        Some(*stream_seq)
    }
}

impl Loaded {
    fn apply_entry(&mut self, key: &StreamKey, entry: &log::LogEntry) -> Result<(), LogError> {
        let op = entry
            .op()
            .map_err(|e| LogError::Nats(format!("op {} does not decode: {e}", entry.server_seq)))?;
        match state::apply(&mut self.state, &op) {
            Ok(()) => {}
            Err(ApplyError::InvalidOp(why)) => {
                // Cannot happen for ops this code admitted; keep the sequence moving
                // exactly as the materializer does.
                warn!(stream_key = %key, seq = op.server_seq, %why, "a committed op does not apply; skipped");
                self.state.last_seq = op.server_seq;
            }
            Err(e @ ApplyError::OutOfOrder { .. }) => return Err(LogError::Nats(e.to_string())),
        }
        self.commands.insert(
            command_key(&op.actor_id, &op.command_id),
            &entry.op_id,
            entry.server_seq,
        );
        self.head_stream_seq = entry.stream_seq;
        self.marks.note(entry.server_seq, entry.stream_seq);
        // A copy: the entry's bytes may be a view into a larger log message.
        self.remember(entry.server_seq, Bytes::copy_from_slice(&entry.payload));
        Ok(())
    }

    /// Keeps the op stored at `server_seq` (the newest) among the recent ones.
    fn remember(&mut self, server_seq: u64, body: Bytes) {
        if self
            .recent
            .back()
            .is_some_and(|(last, _)| last + 1 != server_seq)
        {
            // Not contiguous (cannot happen when ops come in order): start over.
            self.recent.clear();
            self.recent_bytes = 0;
        }
        self.recent_bytes += body.len();
        self.recent.push_back((server_seq, body));
        while self.recent.len() > RECENT_OPS || self.recent_bytes > RECENT_BYTES {
            match self.recent.pop_front() {
                Some((_, b)) => self.recent_bytes -= b.len(),
                None => break,
            }
        }
    }

    /// The op stored at `server_seq` if it is among the recent ones.
    fn recent_op(&self, server_seq: u64) -> Option<&Bytes> {
        let first = self.recent.front()?.0;
        let i = usize::try_from(server_seq.checked_sub(first)?).ok()?;
        self.recent.get(i).map(|(_, body)| body)
    }
}

/// How one command of a batch is answered.
/// The commands applied to a key: who sent each (its [`command_key`]) and what it
/// asked for (its op id), with the `server_seq` it got.
#[derive(Default)]
struct Commands {
    by_key: HashMap<[u8; 16], ([u8; 16], u64)>,
    /// Op ids of ops whose command key is not known (from snapshots written before
    /// command keys were kept).
    legacy: HashMap<String, u64>,
}

/// What [`Commands::seen`] knows of a command.
enum Seen {
    New,
    /// The same command again: answered with the op at this `server_seq`.
    Retry(u64),
    /// The command id was used for another body, applied at this `server_seq`.
    Reused(u64),
}

impl Commands {
    fn from_snapshot(
        key: &StreamKey,
        commands: std::collections::BTreeMap<String, (String, u64)>,
        legacy: std::collections::BTreeMap<String, u64>,
    ) -> Self {
        let mut by_key = HashMap::with_capacity(commands.len());
        for (command, (op_id, seq)) in commands {
            let Some(k) = parse_command_key(&command) else {
                warn!(stream_key = %key, %command, "a snapshot's command key is not 32 hex digits; ignored");
                continue;
            };
            by_key.insert(k, (op_id_bytes(&op_id), seq));
        }
        Self {
            by_key,
            legacy: legacy.into_iter().collect(),
        }
    }

    fn insert(&mut self, command: [u8; 16], op_id: &str, server_seq: u64) {
        self.by_key
            .insert(command, (op_id_bytes(op_id), server_seq));
    }

    fn len(&self) -> usize {
        self.by_key.len() + self.legacy.len()
    }

    /// Forgets the commands of ops below `keep_from`.
    fn retain_from(&mut self, keep_from: u64) {
        self.by_key.retain(|_, (_, seq)| *seq >= keep_from);
        self.legacy.retain(|_, seq| *seq >= keep_from);
    }

    fn seen(&self, command: &[u8; 16], op_id: &str) -> Seen {
        match self.by_key.get(command) {
            Some((id, seq)) if *id == op_id_bytes(op_id) => Seen::Retry(*seq),
            Some((_, seq)) => Seen::Reused(*seq),
            None => self
                .legacy
                .get(op_id)
                .map_or(Seen::New, |s| Seen::Retry(*s)),
        }
    }
}

/// The answer to a command id used again for a different command.
fn reused(command_id: &str, server_seq: u64) -> ServerMessage {
    ServerMessage::reject(
        command_id,
        ErrorCode::InvalidMessage,
        format!(
            "command_id {command_id} was already used by this actor for a different command (applied at server_seq {server_seq}); a new command needs a new command_id"
        ),
    )
}

enum Plan {
    Reject(ServerMessage),
    /// A new op: index into the batch's ops.
    New(usize),
    /// A retry of an op already in the log at this `server_seq`.
    Existing(u64),
}

pub struct Worker {
    key: StreamKey,
    subject: String,
    spec: Option<Arc<NamespaceSpec>>,
    shared: Arc<WorkerShared>,
    /// The lease of the partition this worker writes for (`None`: no lease, e.g. the
    /// consumer of a deployment set up before partitions). Checked before every
    /// write; the expected-sequence header stays the fence either way.
    fence: Option<Arc<crate::source::Fence>>,
    /// `None` until loaded, or after an error that makes the cached state doubtful.
    loaded: Option<Loaded>,
    /// The log message a retried op was last read from: retries of the ops next to
    /// it (a client resending its outbox) are answered without reading it again.
    last_read: Vec<log::LogEntry>,
}

impl Worker {
    pub fn new(
        key: StreamKey,
        shared: Arc<WorkerShared>,
        fence: Option<Arc<crate::source::Fence>>,
    ) -> Self {
        Self {
            subject: ops_subject(&key),
            spec: shared.namespaces.get(key.namespace.as_str()),
            key,
            shared,
            fence,
            loaded: None,
            last_read: Vec::new(),
        }
    }

    /// This key's snapshot, if there is a sound one that continues into the log: the
    /// stored one or, when the log was compacted past that, a newer one made by a
    /// materializer on request.
    async fn usable_snapshot(&self, head: Head) -> Option<Snapshot> {
        match snapshot::fetch(&self.shared.snapshots, &self.key).await {
            Ok(Some(s)) if self.continues(&s, head).await => return Some(s),
            Ok(Some(s)) => {
                warn!(stream_key = %self.key, snapshot_seq = s.state.last_seq, head = head.server_seq, "the stored snapshot does not continue into the log");
            }
            Ok(None) => {}
            Err(e) => warn!(stream_key = %self.key, error = %e, "no usable stored snapshot"),
        }
        // The whole log is there: replay it.
        let first = match log::next_at_or_after(&self.shared.ops, &self.subject, 1).await {
            Ok(Some(e)) if e.server_seq > 1 => e.server_seq,
            _ => return None,
        };
        // The log was compacted past it: only a newer snapshot helps. A materializer
        // that has applied up to the log's first op makes one (and stores it).
        info!(stream_key = %self.key, first, "asking a materializer for a snapshot the log continues from");
        match ultrasync_shared::reads::stored_snapshot(
            &self.shared.client,
            &self.shared.snapshots,
            &self.key,
            Some(first - 1),
        )
        .await
        {
            Ok(Some(s)) if self.continues(&s, head).await => Some(s),
            Ok(Some(s)) => {
                warn!(stream_key = %self.key, snapshot_seq = s.state.last_seq, first, "the materializer's snapshot does not continue into the log either");
                None
            }
            Ok(None) => {
                warn!(stream_key = %self.key, "no materializer answered for a snapshot");
                None
            }
            Err(e) => {
                warn!(stream_key = %self.key, error = %e, "asking a materializer for a snapshot failed");
                None
            }
        }
    }

    /// Whether the log, as it is now, continues where `snapshot` ends.
    async fn continues(&self, snapshot: &Snapshot, head: Head) -> bool {
        let last = snapshot.state.last_seq;
        if last > head.server_seq {
            false
        } else if last == head.server_seq {
            head.stream_seq == snapshot.head_stream_seq
        } else {
            matches!(
                log::continues_after(
                    &self.shared.ops,
                    &self.subject,
                    snapshot.head_stream_seq,
                    last
                )
                .await,
                Ok(true)
            )
        }
    }

    /// Takes `rx`'s jobs in batches until it closes or the key is idle. Once
    /// `stopping` fires, the batch in progress is finished and what has not been
    /// started is handed back for redelivery.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Job>, stopping: CancellationToken) {
        let window = Duration::from_millis(self.shared.config.batch_window_ms);
        let max = self.shared.config.batch_max;
        let idle = if self.spec.is_some() {
            IDLE
        } else {
            IDLE_UNKNOWN
        };
        loop {
            let mut digests = Vec::new();
            let first = match tokio::time::timeout(idle, rx.recv()).await {
                Ok(Some(Job::Command(p))) => p,
                Ok(Some(Job::Digest(tx))) => {
                    self.digest(tx).await;
                    continue;
                }
                Ok(None) => return,
                Err(_) => {
                    // Idle: stop taking work, finish anything that slipped in.
                    rx.close();
                    let mut rest = Vec::new();
                    while let Ok(job) = rx.try_recv() {
                        match job {
                            Job::Command(p) => rest.push(p),
                            Job::Digest(tx) => digests.push(tx),
                        }
                    }
                    if !rest.is_empty() {
                        self.process(rest).await;
                    }
                    for tx in digests {
                        self.digest(tx).await;
                    }
                    debug!(stream_key = %self.key, "worker idle, exiting");
                    return;
                }
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(Job::Command(p)) => batch.push(p),
                    Ok(Job::Digest(tx)) => digests.push(tx),
                    Err(_) => break,
                }
            }
            // A key under load (more than one command waiting) while the committer
            // is writing: a batch handed in now would wait for that write anyway, so
            // keep it open and take what arrives until the committer is free; those
            // commands share this write instead of costing one of their own. An
            // idle committer takes a batch at once, and a lone command is planned
            // at once (with many quiet keys, planning them all after the write
            // would only delay the next one).
            if batch.len() > 1 && batch.len() < max && self.shared.committer.is_busy() {
                let deadline = tokio::time::Instant::now() + BUSY_LINGER_MAX;
                let idle = self.shared.committer.idle();
                let mut idle = std::pin::pin!(idle);
                while batch.len() < max {
                    tokio::select! {
                        biased;
                        job = rx.recv() => match job {
                            Some(Job::Command(p)) => batch.push(p),
                            Some(Job::Digest(tx)) => digests.push(tx),
                            None => break,
                        },
                        () = &mut idle => break,
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            // Under load (more than one command waiting) linger for the window to
            // fill the durable write; a lone command goes straight through.
            if !window.is_zero() && batch.len() > 1 && batch.len() < max {
                let deadline = tokio::time::Instant::now() + window;
                while batch.len() < max {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(Job::Command(p))) => batch.push(p),
                        Ok(Some(Job::Digest(tx))) => digests.push(tx),
                        _ => break,
                    }
                }
            }
            if stopping.is_cancelled() {
                rx.close();
                while let Ok(job) = rx.try_recv() {
                    if let Job::Command(p) = job {
                        batch.push(p);
                    }
                }
                debug!(stream_key = %self.key, commands = batch.len(), "stopping: commands handed back");
                nak_all(&batch).await;
                return;
            }
            self.process(batch).await;
            for tx in digests {
                self.digest(tx).await;
            }
        }
    }

    /// Answers a digest request with the state this worker holds, caught up with the
    /// log (another instance may have written since).
    async fn digest(&mut self, tx: oneshot::Sender<Result<DigestReply, String>>) {
        let result = match self.loaded.is_some() {
            true => self.catch_up().await,
            false => match self.load().await {
                Ok(l) => {
                    self.loaded = Some(l);
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        let answer = match (result, self.loaded.as_ref()) {
            (Ok(()), Some(l)) => Ok(DigestReply {
                last_server_seq: l.state.last_seq,
                digest: state::digest(&l.state),
                keys: l.state.keys.len() as u64,
            }),
            (Ok(()), None) => Err("the key's state is not loaded".to_owned()),
            (Err(e), _) => Err(e.to_string()),
        };
        let _ = tx.send(answer);
    }

    async fn process(&mut self, mut batch: Vec<Pending>) {
        self.shared.metrics.batch_taken(batch.len());
        let Some(spec) = self.spec.clone() else {
            // Nothing to load or write: every command is refused.
            let name = self.key.namespace.to_string();
            let plans = batch
                .iter()
                .map(|p| {
                    Plan::Reject(ServerMessage::reject(
                        &p.command_id,
                        ErrorCode::UnknownNamespace,
                        format!("namespace {name} is not declared"),
                    ))
                })
                .collect();
            self.answer(&batch, plans, &[]).await;
            return;
        };
        let mut conflicts = 0;
        loop {
            if self.loaded.is_none() {
                match self.load().await {
                    Ok(l) => self.loaded = Some(l),
                    Err(e) => {
                        warn!(stream_key = %self.key, error = %e, "cannot load the key's state; retrying later");
                        nak_all(&batch).await;
                        return;
                    }
                }
            }
            if let Some(loaded) = self.loaded.as_mut()
                && let Err(e) = look_up(&self.shared, &self.key, loaded, &batch).await
            {
                warn!(stream_key = %self.key, error = %e, "looking up compacted commands failed; the batch is retried later");
                nak_all(&batch).await;
                return;
            }
            if let Some(loaded) = self.loaded.as_mut()
                && let Err(e) = refresh_floor(&self.shared, &self.subject, loaded, &batch).await
            {
                warn!(stream_key = %self.key, error = %e, "reading the log's first op for a base_seq check failed; the batch is retried later");
                nak_all(&batch).await;
                return;
            }
            let limits = Limits::for_namespace(&self.shared.limits, &spec);
            let heavy = batch.iter().map(|p| p.bytes).sum::<usize>() > INLINE_PLAN_BYTES
                || batch
                    .iter()
                    .any(|p| matches!(&p.cmd, Ok(c) if c.op_type == OpType::CrdtOp));
            let Planned {
                plans,
                outgoing,
                commands,
                overlay,
            } = if heavy {
                // Decoding changes and large JSON happens on a blocking thread (at most
                // `heavy` at once): this key waits, the runtime and other keys do not.
                // Waiting for a permit and planning may outlast the ack wait under
                // load: the commands' messages are kept in progress meanwhile, so
                // JetStream does not hand them out again to be decoded twice.
                let deliveries = distinct_deliveries(&batch);
                let every = Duration::from_secs(self.shared.config.ack_wait_secs.max(1)) / 2;
                let Ok(permit) = keeping_alive(
                    &deliveries,
                    every,
                    self.shared.heavy.clone().acquire_owned(),
                )
                .await
                else {
                    return;
                };
                let Some(loaded) = self.loaded.take() else {
                    return;
                };
                let (key, shared) = (self.key.clone(), self.shared.clone());
                let spec = spec.clone();
                let job = tokio::task::spawn_blocking(move || {
                    let planned = plan(&key, &shared, &spec, &limits, &loaded, &batch);
                    drop(permit);
                    (loaded, batch, planned)
                });
                match keeping_alive(&deliveries, every, job).await {
                    Ok((loaded, back, planned)) => {
                        self.loaded = Some(loaded);
                        batch = back;
                        planned
                    }
                    Err(e) => {
                        // The batch is gone with the thread: never acked, so redelivered.
                        warn!(stream_key = %self.key, error = %e, "planning a batch failed");
                        return;
                    }
                }
            } else {
                let Some(loaded) = self.loaded.as_ref() else {
                    return;
                };
                plan(&self.key, &self.shared, &spec, &limits, loaded, &batch)
            };
            let Some(loaded) = self.loaded.as_ref() else {
                return;
            };

            if !outgoing.is_empty() && self.fence.as_ref().is_some_and(|f| !f.valid()) {
                // This instance no longer holds the partition (or cannot tell): hand
                // the commands back for its new owner; forget the state, which may
                // be stale by now.
                debug!(stream_key = %self.key, "partition lease lost; handing the batch back");
                self.loaded = None;
                nak_all(&batch).await;
                return;
            }
            if !outgoing.is_empty() {
                let writing: Vec<Span> = batch
                    .iter()
                    .filter(|p| p.span.is_on())
                    .map(|p| {
                        let w = p.span.child("sequencer.write", SpanKind::Producer);
                        w.set("ultrasync.batch_commands", batch.len() as i64);
                        w.set("ultrasync.batch_ops", outgoing.len() as i64);
                        w
                    })
                    .collect();
                let written = self
                    .shared
                    .committer
                    .write(&self.subject, loaded.head_stream_seq, outgoing.clone())
                    .await;
                if let Err(e) = &written {
                    for w in &writing {
                        w.fail(e.to_string());
                    }
                }
                drop(writing);
                match written {
                    Ok(last_stream_seq) => {
                        let last = outgoing.last().map_or(0, |o| o.server_seq);
                        if let Some(loaded) = self.loaded.as_mut() {
                            // The write's messages follow the head it was planned on.
                            if let Some(first) = outgoing.first() {
                                loaded
                                    .marks
                                    .note(first.server_seq, loaded.head_stream_seq + 1);
                            }
                            loaded.head_stream_seq = last_stream_seq;
                            loaded.state.last_seq = last;
                            for (key, entry) in overlay {
                                match entry {
                                    Some(e) => loaded.state.keys.insert(key, e),
                                    None => loaded.state.keys.remove(&key),
                                };
                            }
                            for (o, command) in outgoing.iter().zip(commands) {
                                loaded.commands.insert(command, &o.op_id, o.server_seq);
                            }
                        }
                        debug!(stream_key = %self.key, ops = outgoing.len(), last_seq = last, "batch committed");
                    }
                    Err(WriteError::Conflict(why)) => {
                        conflicts += 1;
                        debug!(stream_key = %self.key, %why, conflicts, "another writer moved the key; re-planning");
                        if conflicts >= MAX_CONFLICTS {
                            warn!(stream_key = %self.key, "too many write conflicts; handing the batch back");
                            self.loaded = None;
                            nak_all(&batch).await;
                            return;
                        }
                        if let Err(e) = self.catch_up().await {
                            warn!(stream_key = %self.key, error = %e, "catching up after a conflict failed");
                            self.loaded = None;
                        }
                        continue;
                    }
                    Err(WriteError::Other(e)) => {
                        warn!(stream_key = %self.key, error = %e, "op log write failed; commands will be redelivered");
                        self.loaded = None;
                        nak_all(&batch).await;
                        return;
                    }
                }
            }
            self.answer(&batch, plans, &outgoing).await;
            // The new ops stay, as stored, for answering retries.
            if let Some(loaded) = self.loaded.as_mut() {
                for o in outgoing {
                    loaded.remember(o.server_seq, o.body);
                }
            }
            if self
                .loaded
                .as_ref()
                .is_some_and(|l| l.commands.len() > l.trim_at)
                && let Some(mut l) = self.loaded.take()
            {
                match trim(&self.shared, &self.subject, &mut l).await {
                    Ok(()) => self.loaded = Some(l),
                    Err(e) => {
                        warn!(stream_key = %self.key, error = %e, "looking up the log's first op failed; reloading the key later")
                    }
                }
            }
            return;
        }
    }
}

/// Forgets the commands of compacted ops (the compactor wrote them to
/// `usync-commands` before purging), keeping the newest [`snapshot::RECENT_COMMANDS`].
async fn trim(shared: &WorkerShared, subject: &str, loaded: &mut Loaded) -> Result<(), LogError> {
    if let Some(first) = log::next_at_or_after(&shared.ops, subject, 1).await? {
        loaded.first_in_log = first.server_seq;
    }
    let recent_from = loaded
        .state
        .last_seq
        .saturating_sub(snapshot::RECENT_COMMANDS)
        + 1;
    loaded
        .commands
        .retain_from(loaded.first_in_log.min(recent_from));
    loaded.trim_at = TRIM_MIN.max(2 * loaded.commands.len());
    Ok(())
}

/// Makes `loaded.first_in_log` exact for the `base_seq` checks of `batch`.
///
/// The floor of a stream key is the newest `server_seq` the compactor purged
/// (`first_in_log - 1`; 0 before any purge): a client whose state is at `base_seq`
/// can still follow the log when `base_seq >= floor`, and when `base_seq < floor` it
/// never saw ops that are gone, so its edit is refused `stale_base`. The cached
/// `first_in_log` only ever lags (the compactor moves the floor up behind the
/// worker's back): a base below it is stale for sure, and a base at or above the
/// head's predecessor never is (the compactor keeps the newest op). Anything in
/// between is checked against the log, one direct get per batch.
async fn refresh_floor(
    shared: &WorkerShared,
    subject: &str,
    loaded: &mut Loaded,
    batch: &[Pending],
) -> Result<(), LogError> {
    let (first, head) = (loaded.first_in_log, loaded.state.last_seq);
    let unsure = batch
        .iter()
        .filter_map(|p| p.cmd.as_ref().ok()?.base_seq)
        .any(|base| base.saturating_add(1) >= first && base.saturating_add(1) < head);
    if unsure && let Some(entry) = log::next_at_or_after(&shared.ops, subject, 1).await? {
        loaded.first_in_log = first.max(entry.server_seq);
    }
    Ok(())
}

/// Looks up, in `usync-commands`, the commands of `batch` that memory does not
/// hold while ops of the key were compacted: a retry of a compacted op, or its
/// command id used again. What is found joins memory until the next trim.
async fn look_up(
    shared: &WorkerShared,
    key: &StreamKey,
    loaded: &mut Loaded,
    batch: &[Pending],
) -> Result<(), String> {
    if loaded.first_in_log <= 1 {
        return Ok(());
    }
    let wanted: std::collections::HashSet<[u8; 16]> = batch
        .iter()
        .filter_map(|p| p.cmd.as_ref().ok())
        .map(|cmd| command_key(&cmd.actor_id, &cmd.command_id))
        .filter(|k| !loaded.commands.by_key.contains_key(k))
        .collect();
    type Found = ([u8; 16], Result<Option<bytes::Bytes>, String>);
    let found: Vec<Found> = futures::stream::iter(wanted)
        .map(|k| async move {
            let got = shared
                .commands
                .get(command_kv_key(key, &encode_command_key(&k)))
                .await
                .map_err(|e| e.to_string());
            (k, got)
        })
        .buffer_unordered(LOOKUPS_IN_FLIGHT)
        .collect()
        .await;
    for (k, got) in found {
        let Some(value) = got? else { continue };
        let text = String::from_utf8_lossy(&value);
        let parsed = text
            .split_once(' ')
            .and_then(|(seq, op_id)| Some((seq.parse::<u64>().ok()?, op_id_bytes(op_id))));
        match parsed {
            Some((seq, op_id)) => {
                loaded.commands.by_key.insert(k, (op_id, seq));
            }
            None => {
                warn!(stream_key = %key, value = %text, "a remembered command does not parse; ignored")
            }
        }
    }
    Ok(())
}

/// What [`plan`] decides.
struct Planned {
    /// One per command of the batch.
    plans: Vec<Plan>,
    /// The new ops, numbered from the head, encoded as they are stored.
    outgoing: Vec<Outgoing>,
    /// The [`command_key`] of each new op.
    commands: Vec<[u8; 16]>,
    /// The keys' entries after the batch (to commit once the write lands).
    overlay: HashMap<String, Option<KeyEntry>>,
}

/// Decides every command of the batch against the state, numbering new ops from the
/// head. Pure CPU: may run on a blocking thread.
fn plan(
    key: &StreamKey,
    shared: &WorkerShared,
    spec: &NamespaceSpec,
    limits: &Limits,
    loaded: &Loaded,
    batch: &[Pending],
) -> Planned {
    let next_seq = loaded.state.last_seq + 1;
    let mut plans = Vec::with_capacity(batch.len());
    let mut commands: Vec<[u8; 16]> = Vec::new();
    let mut outgoing: Vec<Outgoing> = Vec::new();
    let mut overlay: HashMap<String, Option<KeyEntry>> = HashMap::new();
    let mut in_batch: HashMap<[u8; 16], (String, usize)> = HashMap::new();
    for p in batch {
        let cmd = match &p.cmd {
            Ok(c) => c,
            Err(e) => {
                plans.push(Plan::Reject(ServerMessage::reject(
                    &p.command_id,
                    ErrorCode::InvalidMessage,
                    format!("undecodable command: {e}"),
                )));
                continue;
            }
        };
        if let Err(reject) = validate(key, cmd) {
            plans.push(Plan::Reject(reject));
            continue;
        }
        let op_id = cmd.op_id();
        let command = command_key(&cmd.actor_id, &cmd.command_id);
        match loaded.commands.seen(&command, &op_id) {
            Seen::New => {}
            Seen::Retry(seq) => {
                plans.push(Plan::Existing(seq));
                continue;
            }
            Seen::Reused(seq) => {
                plans.push(Plan::Reject(reused(&cmd.command_id, seq)));
                continue;
            }
        }
        if let Some((id, i)) = in_batch.get(&command) {
            plans.push(if *id == op_id {
                Plan::New(*i)
            } else {
                Plan::Reject(reused(&cmd.command_id, outgoing[*i].server_seq))
            });
            continue;
        }
        let current = match overlay.get(&cmd.key) {
            Some(e) => e.as_ref(),
            None => loaded.state.keys.get(&cmd.key),
        };
        // After the retry checks: a command already applied keeps its original
        // answer whatever base it names now.
        if let Some(base) = cmd.base_seq
            && base.saturating_add(1) < loaded.first_in_log
        {
            plans.push(Plan::Reject(stale_base(key, cmd, base, loaded, current)));
            continue;
        }
        let server_seq = next_seq + outgoing.len() as u64;
        let entry = match admit(spec, limits, current, cmd, server_seq) {
            Ok(e) => e,
            Err(reject) => {
                plans.push(Plan::Reject(reject));
                continue;
            }
        };
        let hlc_ts = shared.hlc.new_timestamp().get_time().as_u64().to_string();
        let body = match serde_json::to_vec(&cmd.op_ref(&op_id, server_seq, &hlc_ts)) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                plans.push(Plan::Reject(ServerMessage::reject(
                    &cmd.command_id,
                    ErrorCode::InvalidOp,
                    format!("op does not encode: {e}"),
                )));
                continue;
            }
        };
        overlay.insert(cmd.key.clone(), entry);
        in_batch.insert(command, (op_id.clone(), outgoing.len()));
        plans.push(Plan::New(outgoing.len()));
        commands.push(command);
        outgoing.push(Outgoing {
            server_seq,
            op_id,
            body,
        });
    }
    Planned {
        plans,
        outgoing,
        commands,
        overlay,
    }
}

impl Worker {
    /// Sends every answer, then acks the command messages.
    /// Counts (and logs) an answer that goes nowhere: answers go to gateways' reply
    /// subjects only, and anything else (another service's subject, a wildcard) is
    /// dropped, whatever the command says.
    fn count_dropped(&self, p: &Pending) {
        if p.bad_reply_to {
            let dropped = self.shared.dropped_replies.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(stream_key = %self.key, command_id = %p.command_id, dropped, "answer dropped: reply_to is not a usync.reply subject");
        }
    }

    /// `Plan::New(i)` is `new[i]`, an op as stored: its ack splices the stored JSON
    /// in, as does the ack of a retry.
    async fn answer(&mut self, batch: &[Pending], plans: Vec<Plan>, new: &[Outgoing]) {
        let mut headers = HeaderMap::new();
        headers.insert(HDR_SEQUENCER, self.shared.instance.as_str());
        let mut routes: Vec<(String, Vec<String>, usize)> = Vec::new();
        let mut done = Vec::with_capacity(batch.len());
        let mut retry = Vec::new();
        for (p, plan) in batch.iter().zip(plans) {
            if p.span.is_on() {
                p.span.set("ultrasync.stream_key", self.key.to_string());
            }
            // A new op, or a retry's: the ack splices the op as stored. A retry is
            // the same command (same sender, command id and op id), so its command
            // id is the one stored.
            let stored = match &plan {
                Plan::New(i) => new.get(*i).map(|o| (o.server_seq, o.body.clone())),
                Plan::Existing(seq) => match self.recent_or_stored_op(*seq).await {
                    Ok(Some(body)) => Some((*seq, body)),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(stream_key = %self.key, error = %e, "reading a stored op for a retry failed");
                        retry.push(p);
                        continue;
                    }
                },
                Plan::Reject(_) => None,
            };
            if let Some((server_seq, body)) = stored {
                p.span.set("ultrasync.server_seq", server_seq as i64);
                if let Some(to) = &p.reply_to {
                    let doc = ultrasync_shared::protocol::encode_ack_frame(
                        &p.command_id,
                        server_seq,
                        &body,
                    );
                    push_answer(&mut routes, to, doc);
                }
                self.count_dropped(p);
                done.push(p);
                continue;
            }
            let reply = match plan {
                Plan::Reject(m) => m,
                Plan::New(i) => {
                    // Cannot happen: every new op's plan points into `new`.
                    warn!(stream_key = %self.key, index = i, "a new op's plan points past the batch's ops; the command is retried");
                    retry.push(p);
                    continue;
                }
                // The log no longer holds it.
                Plan::Existing(seq) => ServerMessage::reject(
                    &p.command_id,
                    ErrorCode::StaleBase,
                    format!(
                        "this command was applied at server_seq {seq}, which has been compacted; resync"
                    ),
                ),
            };
            match &reply {
                ServerMessage::Ack { server_seq, .. } => {
                    p.span.set("ultrasync.server_seq", *server_seq as i64)
                }
                ServerMessage::Reject { code, reason, .. } => {
                    p.span.set("ultrasync.reject", code.as_str());
                    p.span.fail(format!("{}: {reason}", code.as_str()));
                }
                _ => {}
            }
            if let Some(to) = &p.reply_to {
                push_answer(&mut routes, to, reply.encode());
            }
            self.count_dropped(p);
            done.push(p);
        }
        // One message per route: a socket's answers of this batch travel together.
        for (to, mut docs, _) in routes {
            if let Some((gateway, session)) = self.shared.local.answers_for(&to) {
                gateway.deliver(session, docs.into_iter().map(String::into_bytes).collect());
                self.shared.metrics.answered(true);
                continue;
            }
            self.shared.metrics.answered(false);
            let mut headers = headers.clone();
            let body = match docs.len() {
                1 => docs.pop().map(String::into_bytes).unwrap_or_default(),
                n => {
                    headers.insert(HDR_BATCH, n.to_string().as_str());
                    join_lines(&docs)
                }
            };
            if let Err(e) = self
                .shared
                .client
                .publish_with_headers(to, headers, body.into())
                .await
            {
                warn!(error = %e, "answering the gateway failed");
            }
        }
        for p in done {
            p.ack().await;
        }
        for p in retry {
            p.retry_after(Duration::from_millis(500)).await;
        }
    }
}

/// Adds an answer for reply route `to`: one message per route, up to
/// [`MAX_ANSWER_BYTES`] (NATS caps a message).
fn push_answer(routes: &mut Vec<(String, Vec<String>, usize)>, to: &str, doc: String) {
    match routes.iter_mut().rev().find(|(r, _, _)| r == to) {
        Some((_, docs, bytes)) if *bytes + doc.len() <= MAX_ANSWER_BYTES => {
            *bytes += doc.len() + 1;
            docs.push(doc);
        }
        _ => {
            let bytes = doc.len();
            routes.push((to.to_owned(), vec![doc], bytes));
        }
    }
}

/// The answer to a command whose `base_seq` is below the floor: nothing is written;
/// `current_state` (the key as it is now) tells it apart from the `stale_base` of a
/// retry whose op was compacted, which was applied and carries none.
fn stale_base(
    key: &StreamKey,
    cmd: &CommandEnvelope,
    base: u64,
    loaded: &Loaded,
    current: Option<&KeyEntry>,
) -> ServerMessage {
    let floor = loaded.first_in_log.saturating_sub(1);
    ServerMessage::Reject {
        command_id: cmd.command_id.clone(),
        code: ErrorCode::StaleBase,
        reason: format!(
            "base_seq {base} is below the compaction floor {floor} of {}: ops this client never saw were purged; resync from a snapshot, then send the edit again",
            key.namespace
        ),
        current_state: Some(CurrentState {
            key: cmd.key.clone(),
            version: current.map_or(0, |e| e.version),
            value: current.map_or(Value::Null, |e| e.value.clone()),
        }),
    }
}

/// Checks the envelope itself. Org, project and actor were put in by the gateway from
/// the verified token.
fn validate(key: &StreamKey, cmd: &CommandEnvelope) -> Result<(), ServerMessage> {
    let reject = |code, reason: &str| Err(ServerMessage::reject(&cmd.command_id, code, reason));
    if cmd.org_id != key.org.as_str()
        || cmd.project_id != key.project.as_str()
        || cmd.namespace != key.namespace.as_str()
    {
        return reject(
            ErrorCode::InvalidMessage,
            "command does not match its subject",
        );
    }
    if !is_valid_id(&cmd.actor_id) || !is_valid_id(&cmd.client_id) {
        return reject(
            ErrorCode::InvalidId,
            "actor_id and client_id must match [A-Za-z0-9_-]{1,64}",
        );
    }
    if cmd.command_id.is_empty()
        || cmd.command_id.len() > 128
        || cmd.command_id.chars().any(char::is_control)
    {
        return reject(
            ErrorCode::InvalidId,
            "command_id must be 1-128 bytes without control characters",
        );
    }
    if validate_key(&cmd.key).is_err() {
        return reject(
            ErrorCode::InvalidKey,
            "key must be 1-512 bytes of UTF-8 without control characters",
        );
    }
    Ok(())
}

impl Worker {
    /// Builds the key's state and op ids: from its snapshot and the log after it, or
    /// from the whole log when there is no sound snapshot.
    async fn load(&mut self) -> Result<Loaded, LogError> {
        let mut loaded = Loaded {
            head_stream_seq: 0,
            state: NamespaceState::default(),
            commands: Commands::default(),
            first_in_log: 1,
            trim_at: TRIM_MIN,
            recent: VecDeque::new(),
            recent_bytes: 0,
            marks: Marks::default(),
        };
        let Some(head) = log::head(&self.shared.ops, &self.subject).await? else {
            info!(stream_key = %self.key, "took key (empty)");
            return Ok(loaded);
        };
        let mut start = 1;
        if let Some(snapshot) = self.usable_snapshot(head).await {
            // The snapshot's last op may sit inside a message: read that message
            // again (its ops up to the snapshot are skipped).
            start = snapshot.head_stream_seq.max(1);
            loaded.head_stream_seq = snapshot.head_stream_seq;
            loaded.state = snapshot.state;
            loaded.commands =
                Commands::from_snapshot(&self.key, snapshot.commands, snapshot.op_ids);
        }
        let from_snapshot = loaded.state.last_seq;
        self.replay(&mut loaded, start, head).await?;
        trim(&self.shared, &self.subject, &mut loaded).await?;
        info!(
            stream_key = %self.key,
            last_seq = loaded.state.last_seq,
            snapshot_seq = from_snapshot,
            replayed = loaded.state.last_seq - from_snapshot,
            "took key"
        );
        Ok(loaded)
    }

    /// Applies the ops after the loaded state up to `head`, reading from stream
    /// sequence `start` (ops at or below the state's last one are skipped).
    async fn replay(&self, loaded: &mut Loaded, start: u64, head: Head) -> Result<(), LogError> {
        if head.server_seq <= loaded.state.last_seq || head.stream_seq < start {
            return Ok(());
        }
        let mut entries = Box::pin(log::read_from(&self.shared.ops, &self.subject, start).await?);
        while let Some(entry) = entries.next().await {
            let entry = entry?;
            if entry.server_seq > loaded.state.last_seq {
                if entry.server_seq != loaded.state.last_seq + 1 {
                    return Err(LogError::Nats(format!(
                        "the log of {} starts at {} (compacted): a snapshot is needed",
                        self.key, entry.server_seq
                    )));
                }
                loaded.apply_entry(&self.key, &entry)?;
            }
            if entry.server_seq >= head.server_seq {
                break;
            }
        }
        Ok(())
    }

    /// After losing a write race: apply what the other writer stored.
    async fn catch_up(&mut self) -> Result<(), LogError> {
        let Some(head) = log::head(&self.shared.ops, &self.subject).await? else {
            return Ok(());
        };
        let Some(mut loaded) = self.loaded.take() else {
            return Ok(());
        };
        let start = loaded.head_stream_seq.max(1);
        let result = self.replay(&mut loaded, start, head).await;
        if result.is_ok() {
            self.loaded = Some(loaded);
        }
        result
    }

    /// The op at `server_seq` as stored, for answering a retry: from memory when
    /// recent, else from the log; `None` when the log no longer holds it.
    async fn recent_or_stored_op(&mut self, server_seq: u64) -> Result<Option<Bytes>, LogError> {
        if let Some(body) = self.loaded.as_ref().and_then(|l| l.recent_op(server_seq)) {
            return Ok(Some(body.clone()));
        }
        if let Some(e) = self.last_read.iter().find(|e| e.server_seq == server_seq) {
            return Ok(Some(e.payload.clone()));
        }
        let mark = self.loaded.as_ref().and_then(|l| l.marks.below(server_seq));
        if let Some(mut at) = mark {
            // A few messages from the mark (at most MARK_EVERY unless the key's
            // writes were split over several messages each).
            for _ in 0..2 * MARK_EVERY {
                let Some(ops) =
                    log::next_message_at_or_after(&self.shared.ops, &self.subject, at).await?
                else {
                    return Ok(None);
                };
                if let Some(e) = ops.iter().find(|e| e.server_seq == server_seq) {
                    self.shared.metrics.retry_read(false);
                    let body = e.payload.clone();
                    self.last_read = ops;
                    return Ok(Some(body));
                }
                match ops.last() {
                    // Past it: the log no longer holds it.
                    Some(last) if last.server_seq > server_seq => return Ok(None),
                    Some(last) => at = last.stream_seq + 1,
                    None => return Ok(None),
                }
            }
        }
        let _turn = self
            .shared
            .searches
            .acquire()
            .await
            .map_err(|_| LogError::Nats("the sequencer is stopping".to_owned()))?;
        self.shared.metrics.retry_read(true);
        let entries =
            log::read_range(&self.shared.ops, &self.subject, server_seq, server_seq).await?;
        Ok(entries
            .into_iter()
            .find(|e| e.server_seq == server_seq)
            .map(|e| e.payload))
    }
}

/// The namespace's admission rules: mode, precondition, sizes, schema. Returns the
/// key's entry after the op.
pub fn admit(
    spec: &NamespaceSpec,
    limits: &Limits,
    current: Option<&KeyEntry>,
    cmd: &CommandEnvelope,
    seq: u64,
) -> Result<Option<KeyEntry>, ServerMessage> {
    let reject = |code, reason: String| Err(ServerMessage::reject(&cmd.command_id, code, reason));
    let ns = &spec.name;
    match (spec.mode, cmd.op_type) {
        (Mode::Ephemeral, _) => {
            return reject(
                ErrorCode::InvalidOp,
                format!("namespace {ns} is ephemeral: send presence frames"),
            );
        }
        (Mode::Crdt, OpType::CrdtOp) if cmd.precondition.is_some() => {
            return reject(
                ErrorCode::InvalidOp,
                format!("namespace {ns} is crdt: changes merge, no preconditions"),
            );
        }
        (Mode::Crdt, OpType::CrdtOp) => {}
        (Mode::Crdt, other) => {
            return reject(
                ErrorCode::InvalidOp,
                format!(
                    "namespace {ns} is crdt: only crdt_op, not {}",
                    other.as_str()
                ),
            );
        }
        (_, OpType::CrdtOp) => {
            return reject(
                ErrorCode::InvalidOp,
                format!(
                    "crdt_op needs a crdt namespace; {ns} is {}",
                    spec.mode.as_str()
                ),
            );
        }
        (Mode::Cas, _) if cmd.precondition.is_none() => {
            return reject(
                ErrorCode::InvalidOp,
                format!("namespace {ns} is cas: every write needs precondition.expected_version"),
            );
        }
        _ => {}
    }
    if let Some(pre) = cmd.precondition {
        let version = current.map_or(0, |e| e.version);
        if pre.expected_version != version {
            return Err(ServerMessage::Reject {
                command_id: cmd.command_id.clone(),
                code: ErrorCode::PreconditionFailed,
                reason: format!(
                    "expected version {}, the key is at {version}",
                    pre.expected_version
                ),
                current_state: Some(CurrentState {
                    key: cmd.key.clone(),
                    version,
                    value: current.map_or(Value::Null, |e| e.value.clone()),
                }),
            });
        }
    }
    let refuse =
        |(code, reason): admission::Refused| ServerMessage::reject(&cmd.command_id, code, reason);
    let invalid_op =
        |e: ApplyError| ServerMessage::reject(&cmd.command_id, ErrorCode::InvalidOp, e.to_string());
    // The payload is stored in the op whatever its type: bounded in depth and size.
    admission::check_value(&cmd.payload, limits).map_err(refuse)?;
    let entry = match cmd.op_type {
        OpType::CrdtOp => {
            let change = admission::admit_change_payload(&cmd.payload, limits).map_err(refuse)?;
            let doc = state::merge_change(current, change).map_err(invalid_op)?;
            admission::check_doc(&doc, limits).map_err(refuse)?;
            Some(KeyEntry {
                value: state::doc_json(&doc),
                version: seq,
                doc: Some(doc),
            })
        }
        _ => state::next_entry(current, cmd.op_type, &cmd.payload, seq).map_err(invalid_op)?,
    };
    if let Some(e) = &entry {
        if let Err((code, reason)) = admission::check_value(&e.value, limits) {
            return reject(code, format!("{ns}: after the op, {reason}"));
        }
        if let Err(why) = spec.check_schema(&e.value) {
            return reject(ErrorCode::SchemaInvalid, why);
        }
    }
    Ok(entry)
}

/// The messages `batch`'s commands came in, each once.
fn distinct_deliveries(batch: &[Pending]) -> Vec<Arc<Delivery>> {
    let mut out: Vec<Arc<Delivery>> = Vec::new();
    for p in batch {
        if !out.iter().any(|d| Arc::ptr_eq(d, &p.delivery)) {
            out.push(p.delivery.clone());
        }
    }
    out
}

/// Runs `work`, telling JetStream every `every` that `deliveries` are still being
/// worked on (`+WPI`), so they are not redelivered while it runs.
async fn keeping_alive<T>(
    deliveries: &[Arc<Delivery>],
    every: Duration,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                for msg in deliveries.iter().filter_map(|d| d.msg.as_ref()) {
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

async fn nak_all(batch: &[Pending]) {
    for p in batch {
        p.span.event("handed back for redelivery");
        p.retry_after(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use ultrasync_shared::Precondition;

    #[test]
    fn marks_are_sparse_bounded_and_point_at_or_below_an_op() {
        let mut marks = Marks::default();
        // One op per message, message n at stream sequence 10 * n.
        for seq in 1..=100u64 {
            marks.note(seq, 10 * seq);
        }
        assert_eq!(marks.0.len(), 13, "one mark per {MARK_EVERY} ops");
        assert_eq!(marks.below(0), None, "nothing below the first mark");
        assert_eq!(marks.below(1), Some(10));
        assert_eq!(marks.below(8), Some(10), "op 8 is read forward from op 1");
        assert_eq!(marks.below(9), Some(90));
        assert_eq!(marks.below(1000), Some(970));
        // Older marks go first once there are too many.
        for seq in 101..=(MARKS as u64 * MARK_EVERY * 2) {
            marks.note(seq, 10 * seq);
        }
        assert_eq!(marks.0.len(), MARKS);
        assert_eq!(marks.below(1), None, "the oldest marks are gone");
        // An op that does not follow the last mark changes nothing.
        let last = marks.0.back().copied();
        marks.note(5, 50);
        assert_eq!(marks.0.back().copied(), last);
    }

    fn cmd(key: &str, op_type: OpType, payload: Value, expected: Option<u64>) -> CommandEnvelope {
        CommandEnvelope {
            org_id: "o".into(),
            project_id: "p".into(),
            namespace: "settings".into(),
            actor_id: "a".into(),
            client_id: "c".into(),
            command_id: "x".into(),
            key: key.into(),
            op_type,
            payload,
            precondition: expected.map(|v| Precondition {
                expected_version: v,
            }),
            reply_to: None,
            base_seq: None,
        }
    }

    fn namespaces() -> Namespaces {
        Namespaces::new(&[]).expect("defaults")
    }

    proptest! {
        /// Compare-and-set against a model: a write is admitted exactly when its
        /// expected version is the key's version (0 = absent), and the rejection
        /// reports the version and value the key really has.
        #[test]
        fn cas_admission_matches_the_model(
            steps in prop::collection::vec(("k[0-2]", 0u8..3, 0u64..6, any::<bool>()), 1..60)
        ) {
            let ns = namespaces();
            let spec = ns.get("settings").expect("settings");
            let mut state = NamespaceState::default();
            let mut model: HashMap<String, (u64, Value)> = HashMap::new();
            for (key, kind, guess, use_current) in steps {
                let current = model.get(&key).map_or(0, |(v, _)| *v);
                let expected = if use_current { current } else { guess };
                let op_type = [OpType::Set, OpType::Del, OpType::Patch][kind as usize];
                let payload = json!({"n": state.last_seq});
                let seq = state.last_seq + 1;
                let c = cmd(&key, op_type, payload.clone(), Some(expected));
                match admit(&spec,&Limits::default(), state.keys.get(&key), &c, seq) {
                    Ok(entry) => {
                        prop_assert_eq!(expected, current, "admitted a stale write");
                        match entry {
                            Some(e) => { model.insert(key.clone(), (seq, e.value.clone())); state.keys.insert(key, e); }
                            None => { model.remove(&key); state.keys.remove(&key); }
                        }
                        state.last_seq = seq;
                    }
                    Err(ServerMessage::Reject { code, current_state: Some(cs), .. }) => {
                        prop_assert_eq!(code, ErrorCode::PreconditionFailed);
                        prop_assert_ne!(expected, current, "refused a write based on the current version");
                        prop_assert_eq!(cs.version, current);
                        prop_assert_eq!(cs.value, model.get(&key).map_or(Value::Null, |(_, v)| v.clone()));
                    }
                    Err(other) => prop_assert!(false, "unexpected answer {:?}", other),
                }
            }
        }
    }

    #[test]
    fn mode_rules() {
        let ns = namespaces();
        let get = |n: &str| ns.get(n).expect("namespace");
        let reject_code = |r: Result<Option<KeyEntry>, ServerMessage>| match r {
            Err(ServerMessage::Reject { code, .. }) => code,
            other => panic!("expected a reject, got {other:?}"),
        };
        // cas needs a precondition; lww does not.
        assert_eq!(
            reject_code(admit(
                &get("settings"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, json!(1), None),
                1
            )),
            ErrorCode::InvalidOp
        );
        assert!(
            admit(
                &get("index"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, json!(1), None),
                1
            )
            .is_ok()
        );
        // create-if-absent on lww, enforced when given.
        assert!(
            admit(
                &get("index"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, json!(1), Some(0)),
                1
            )
            .is_ok()
        );
        assert_eq!(
            reject_code(admit(
                &get("index"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, json!(1), Some(3)),
                1
            )),
            ErrorCode::PreconditionFailed
        );
        // crdt takes only crdt_op; others never do.
        assert_eq!(
            reject_code(admit(
                &get("collab"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, json!(1), None),
                1
            )),
            ErrorCode::InvalidOp
        );
        assert_eq!(
            reject_code(admit(
                &get("index"),
                &Limits::default(),
                None,
                &cmd("k", OpType::CrdtOp, json!({}), None),
                1
            )),
            ErrorCode::InvalidOp
        );
        assert_eq!(
            reject_code(admit(
                &get("presence"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, json!(1), None),
                1
            )),
            ErrorCode::InvalidOp
        );
        // Size is checked on the value after the op.
        let big = json!("x".repeat(300 * 1024));
        assert_eq!(
            reject_code(admit(
                &get("index"),
                &Limits::default(),
                None,
                &cmd("k", OpType::Set, big, None),
                1
            )),
            ErrorCode::PayloadTooLarge
        );
    }
}
