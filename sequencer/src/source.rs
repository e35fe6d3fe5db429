//! One source of commands: a consumer on `USYNC_CMDS` (a partition's, or the single
//! consumer of a deployment set up before partitions) feeding per-stream-key
//! workers, and, for a partition, the commands the gateway of this process offers
//! for it (`crate::intake`).
//!
//! Dispatch never waits for a worker: when a stream key's queue has no room for a
//! message's commands, the message is handed back to JetStream for redelivery after
//! [`BUSY_RETRY`], before it is decoded, and every other key of the source keeps
//! flowing. A flooded key slows only itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use ultrasync_shared::StreamKey;
use ultrasync_shared::nats;

use crate::PRIORITY_GROUP;
use crate::intake::Offered;
use crate::worker::{Job, Pending, Worker, WorkerShared};

/// Commands buffered per stream key; beyond this the key's commands are handed back.
pub const WORKER_QUEUE: usize = 4096;
/// Redelivery delay of a command handed back because its key's queue was full,
/// times the message's deliveries so far (at most [`BUSY_RETRY_MAX`]): a flood
/// cycles through the consumer less often the longer it lasts.
pub const BUSY_RETRY: Duration = Duration::from_millis(200);
pub const BUSY_RETRY_MAX: Duration = Duration::from_secs(2);

/// Whether this instance may still write for a partition: valid until a point in
/// time set at each lease renewal, a little before the lease can expire on the
/// server. Monotonic time keeps running while a process is frozen (SIGSTOP), so a
/// thawed instance sees at once that its leases may have moved.
pub struct Fence {
    epoch: Instant,
    /// Milliseconds after `epoch`; 0 = revoked.
    valid_until_ms: AtomicU64,
}

impl Fence {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            valid_until_ms: AtomicU64::new(0),
        }
    }

    pub fn valid(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.valid_until_ms.load(Ordering::Acquire)
    }

    /// Extends validity to `until` (never shortens it).
    pub fn renew(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.epoch).as_millis() as u64;
        self.valid_until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    pub fn revoke(&self) {
        self.valid_until_ms.store(0, Ordering::Release);
    }
}

/// Counters of one source (reported in the instance's heartbeat, `ultrasync
/// inspect partitions`).
#[derive(Default)]
pub struct SourceStats {
    pub commands: AtomicU64,
    pub pushed_back: AtomicU64,
    pub workers: AtomicUsize,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SourceReport {
    pub commands: u64,
    pub pushed_back: u64,
    pub workers: usize,
}

impl SourceStats {
    pub fn report(&self) -> SourceReport {
        SourceReport {
            commands: self.commands.load(Ordering::Relaxed),
            pushed_back: self.pushed_back.load(Ordering::Relaxed),
            workers: self.workers.load(Ordering::Relaxed),
        }
    }
}

/// The workers of one source, by stream key.
pub struct Workers {
    shared: Arc<WorkerShared>,
    fence: Option<Arc<Fence>>,
    senders: HashMap<StreamKey, mpsc::Sender<Job>>,
    /// Each task is one worker; it returns its key when it exits (idle).
    tasks: JoinSet<StreamKey>,
    /// Fired by [`finish`](Self::finish): workers end the batch in hand and hand
    /// back the commands they have not started.
    stopping: CancellationToken,
}

impl Workers {
    pub fn new(shared: Arc<WorkerShared>, fence: Option<Arc<Fence>>) -> Self {
        Self {
            shared,
            fence,
            senders: HashMap::new(),
            tasks: JoinSet::new(),
            stopping: CancellationToken::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Hands `job` to the worker of `key` (starting one when there is none, or it
    /// went idle) without waiting: the job comes back when the key's queue is full.
    pub fn dispatch(&mut self, key: StreamKey, mut job: Job) -> Result<(), Job> {
        loop {
            if self.senders.get(&key).is_none_or(|tx| tx.is_closed()) {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                let worker = Worker::new(key.clone(), self.shared.clone(), self.fence.clone());
                let owned = key.clone();
                let stopping = self.stopping.clone();
                self.tasks.spawn(async move {
                    worker.run(rx, stopping).await;
                    owned
                });
                self.senders.insert(key.clone(), tx);
            }
            let Some(tx) = self.senders.get(&key) else {
                return Err(job);
            };
            match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(back)) => return Err(back),
                // The worker closed between the check and the send: start a new one.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    self.senders.remove(&key);
                    job = back;
                }
            }
        }
    }

    /// Commands the queue of `key` takes now without waiting (a whole queue when the
    /// key has no live worker). The source is the queues' only sender, so this much
    /// room stays until it dispatches.
    pub fn room(&self, key: &StreamKey) -> usize {
        match self.senders.get(key) {
            Some(tx) if !tx.is_closed() => tx.capacity(),
            _ => WORKER_QUEUE,
        }
    }

    /// Forgets workers that ended, without waiting.
    pub fn reap(&mut self) {
        while let Some(res) = self.tasks.try_join_next() {
            self.forget(res);
        }
    }

    /// Waits for the next worker to end (pending forever when there is none).
    pub async fn next_ended(&mut self) {
        match self.tasks.join_next().await {
            Some(res) => self.forget(res),
            None => std::future::pending().await,
        }
    }

    fn forget(&mut self, res: Result<StreamKey, tokio::task::JoinError>) {
        match res {
            Ok(key) => {
                if self.senders.get(&key).is_some_and(|tx| tx.is_closed()) {
                    self.senders.remove(&key);
                }
            }
            Err(e) => {
                warn!(error = %e, "sequencer worker panicked");
                self.senders.retain(|_, tx| !tx.is_closed());
            }
        }
    }

    /// Closes every queue and waits for the workers to finish the batch each has in
    /// hand; the commands queued behind it go back to the stream for the next owner
    /// (a stop waits for one batch per key, not for everything queued).
    pub async fn finish(mut self) {
        self.stopping.cancel();
        self.senders.clear();
        while let Some(res) = self.tasks.join_next().await {
            if let Err(e) = res {
                warn!(error = %e, "sequencer worker panicked");
            }
        }
    }
}

/// The next message offered by the gateway of this process (pending forever when
/// there is no queue; `None` once it is closed and empty).
async fn next_offered(rx: &mut Option<mpsc::Receiver<Offered>>) -> Option<Offered> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Closes the queue of offers and hands back what is in it.
fn hand_back_offers(shared: &WorkerShared, offered: &mut Option<mpsc::Receiver<Offered>>) {
    let Some(rx) = offered.as_mut() else { return };
    rx.close();
    while let Ok(o) = rx.try_recv() {
        shared.intake.took(&o);
        shared.intake.hand_back_offered(o, Duration::ZERO);
    }
}

/// Hands an offered message to its key's worker, or back to `USYNC_CMDS` when the
/// key's queue has no room for it (and refuses the key's offers for a while).
async fn take_offered(
    workers: &mut Workers,
    shared: &Arc<WorkerShared>,
    stats: &SourceStats,
    offered: Offered,
) {
    shared.intake.took(&offered);
    let n = offered.commands.len();
    stats.commands.fetch_add(n as u64, Ordering::Relaxed);
    if workers.room(&offered.key) < n.min(WORKER_QUEUE) {
        stats.pushed_back.fetch_add(n as u64, Ordering::Relaxed);
        shared.intake.mark_busy(&offered.key);
        shared.intake.hand_back_offered(offered, BUSY_RETRY);
        return;
    }
    shared.metrics.taken_in_process(n);
    let key = offered.key.clone();
    for p in Pending::from_offered(offered, &shared.intake, &shared.tracer) {
        if let Err(Job::Command(p)) = workers.dispatch(key.clone(), Job::Command(p)) {
            stats.pushed_back.fetch_add(1, Ordering::Relaxed);
            p.retry_after(BUSY_RETRY).await;
        }
    }
}

/// Pulls `consumer` (priority group, pinned) and feeds the workers, with what the
/// gateway of this process offers through `offered`, until `stop` fires; then
/// stops pulling and lets the workers finish.
pub async fn run(
    name: String,
    consumer: PullConsumer,
    shared: Arc<WorkerShared>,
    fence: Option<Arc<Fence>>,
    stats: Arc<SourceStats>,
    stop: CancellationToken,
    mut offered: Option<mpsc::Receiver<Offered>>,
) {
    let tracer = shared.tracer.clone();
    let mut workers = Workers::new(shared.clone(), fence);
    let mut messages = loop {
        let pulled = consumer
            .stream()
            .group(PRIORITY_GROUP)
            .max_messages_per_batch(1000)
            .max_bytes_per_batch(nats::PULL_MAX_BYTES)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await;
        match pulled {
            Ok(m) => break m,
            Err(e) => {
                warn!(source = %name, error = %e, "pulling commands failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => {
                        hand_back_offers(&shared, &mut offered);
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        }
    };
    debug!(source = %name, "pulling commands");
    loop {
        // Offers first: one the gateway made before publishing a key's next command
        // to the stream is taken before the stream delivers that command.
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            o = next_offered(&mut offered) => {
                match o {
                    Some(o) => take_offered(&mut workers, &shared, &stats, o).await,
                    None => offered = None,
                }
                workers.reap();
                stats.workers.store(workers.len(), Ordering::Relaxed);
                continue;
            }
            _ = workers.next_ended() => {
                stats.workers.store(workers.len(), Ordering::Relaxed);
                continue;
            }
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(source = %name, error = %e, "pulling commands failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
            None => {
                warn!(source = %name, "command consumer ended");
                break;
            }
        };
        let Some((_, key)) = nats::parse_cmd_subject(&msg.subject) else {
            warn!(subject = %msg.subject, "dropping command on an unexpected subject");
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            continue;
        };
        let delivered = msg.info().map_or(1, |i| i.delivered.max(1)) as u32;
        let busy_retry = (BUSY_RETRY * delivered).min(BUSY_RETRY_MAX);
        // A message goes to its key's queue whole or not at all, and is handed back
        // before it is decoded: a flood costs a redelivery per message, not a
        // decode and a repeated answer per command already taken. (Gateways put at
        // most 500 commands in a message; one over a whole queue would go in part
        // once the queue is empty, the rest handed back as before.)
        let commands = nats::count_lines(msg.headers.as_ref(), &msg.payload);
        if workers.room(&key) < commands.min(WORKER_QUEUE) {
            stats.commands.fetch_add(commands as u64, Ordering::Relaxed);
            stats
                .pushed_back
                .fetch_add(commands as u64, Ordering::Relaxed);
            if let Err(e) = msg
                .ack_with(jetstream::AckKind::Nak(Some(busy_retry)))
                .await
            {
                warn!(error = %e, "handing a command message back failed; it will be redelivered");
            }
            continue;
        }
        for p in Pending::from_message(msg, &tracer) {
            stats.commands.fetch_add(1, Ordering::Relaxed);
            if let Err(Job::Command(p)) = workers.dispatch(key.clone(), Job::Command(p)) {
                // The key's queue is full: only this key waits.
                stats.pushed_back.fetch_add(1, Ordering::Relaxed);
                p.retry_after(busy_retry).await;
            }
        }
        workers.reap();
        stats.workers.store(workers.len(), Ordering::Relaxed);
    }
    // Messages the client library already holds would otherwise wait out the ack
    // wait before the partition's next owner gets them: hand them back now.
    let drain_until = tokio::time::Instant::now() + Duration::from_millis(50);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(drain_until, messages.next()).await {
        let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
    }
    drop(messages);
    // Offers stop here; the workers hand back what they have not started, then
    // what is still queued for them goes back after it, in order.
    if let Some(rx) = offered.as_mut() {
        rx.close();
    }
    workers.finish().await;
    hand_back_offers(&shared, &mut offered);
    stats.workers.store(0, Ordering::Relaxed);
    debug!(source = %name, "stopped pulling commands");
}
