//! Group commit across stream keys. Every worker hands its planned write here; the
//! committer stores whatever has gathered while the previous write was on its way
//! in one durable write: a single publish when it is one op, otherwise one atomic
//! batch spanning every waiting stream key.
//!
//! Why: nats-server runs a stream's atomic batches one after another and pays a fixed
//! price for each (it stages the batch in a temporary file store, created and
//! removed per batch: ~2.5 ms here with `sync_interval: always`). One batch per key
//! per round made that price the pipeline's ceiling; one batch for all keys pays it
//! once per round, and the batch grows with the load.
//!
//! The fence is unchanged: the first message of every stream key in the batch
//! carries `Nats-Expected-Last-Subject-Sequence`, and a failed check stores nothing.
//! When a shared batch fails on a check, each key's write is retried on its own, so
//! only the key that moved on sees the conflict.

use std::collections::HashSet;
use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::debug;

use crate::metrics::Metrics;
use crate::writer::{self, Outgoing, WriteError};

/// Rounds in flight at once (their stream keys are disjoint). 2 was measured
/// (`ultrasync bench`, 10,000 ops/s, 8 keys): smaller rounds, more batches, p50 27-36
/// ms against 16-24 ms with 1, since the server commits a stream's batches one after
/// another anyway.
const DEPTH: usize = 1;
/// Longest wait for the keys of the previous round to come back.
const LINGER: std::time::Duration = std::time::Duration::from_micros(1000);
/// JetStream's limit on messages in one atomic batch.
const MAX_BATCH_MSGS: usize = 1000;
/// Rounds of at most this many one-message writes go as pipelined single publishes
/// (each its own check). A key's ops share one message, so a round is usually one
/// message per key; nats-server stages every atomic batch in a temporary file store
/// it creates, fsyncs and removes (a third of its CPU in the profile), which costs
/// more than a dozen fsynced single messages. `ultrasync bench`, 8 keys at 10,000
/// ops/s: p50 18 → 9-10 ms, p99 39-177 → 20-27 ms with 16 instead of 4.
const SINGLES_MAX: usize = 16;
/// Requests waiting for the committer; workers block beyond this.
const QUEUE: usize = 4096;

/// One stream key's planned write.
pub struct WriteRequest {
    pub subject: String,
    /// The subject's last stream sequence the plan was made against (0 = empty).
    pub expected_last: u64,
    pub ops: Vec<Outgoing>,
    done: oneshot::Sender<Result<u64, WriteError>>,
}

/// A handle to the instance's committer task.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<WriteRequest>,
    /// `true` while a write is on its way to the server.
    busy: watch::Receiver<bool>,
    /// Counts the ops stored and times the writes.
    metrics: Arc<Metrics>,
}

impl Committer {
    /// Starts the committer; it stops when every handle is dropped.
    pub fn start(
        client: async_nats::Client,
        js: jetstream::Context,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (busy_tx, busy) = watch::channel(false);
        tokio::spawn(run(client, js, rx, busy_tx, metrics.clone()));
        Self { tx, busy, metrics }
    }

    /// Whether a write is on its way: a write handed in now waits for it.
    pub fn is_busy(&self) -> bool {
        *self.busy.borrow()
    }

    /// Resolves once no write is on its way (at once when none is).
    pub async fn idle(&self) {
        let mut busy = self.busy.clone();
        // An error means the committer stopped: nothing to wait for.
        let _ = busy.wait_for(|b| !*b).await;
    }

    /// Stores `ops` on `subject` if its last stream sequence is still `expected_last`;
    /// returns the stream sequence of the last op stored.
    pub async fn write(
        &self,
        subject: &str,
        expected_last: u64,
        ops: Vec<Outgoing>,
    ) -> Result<u64, WriteError> {
        let (done, rx) = oneshot::channel();
        let count = ops.len();
        let req = WriteRequest {
            subject: subject.to_owned(),
            expected_last,
            ops,
            done,
        };
        self.tx
            .send(req)
            .await
            .map_err(|_| WriteError::Other("the committer stopped".to_owned()))?;
        let stored = rx
            .await
            .map_err(|_| WriteError::Other("the committer dropped the write".to_owned()))?;
        if stored.is_ok() {
            self.metrics.wrote(subject, count);
        }
        stored
    }
}

async fn run(
    client: async_nats::Client,
    js: jetstream::Context,
    mut rx: mpsc::Receiver<WriteRequest>,
    busy: watch::Sender<bool>,
    metrics: Arc<Metrics>,
) {
    let mut carry: Option<WriteRequest> = None;
    let mut inflight = FuturesUnordered::new();
    let mut last_keys = 0usize;
    // Workers keep their batches open while a write is on its way (see `is_busy`).
    let show = |inflight: &FuturesUnordered<_>| {
        let now = !inflight.is_empty();
        busy.send_if_modified(|b| std::mem::replace(b, now) != now);
    };
    loop {
        while inflight.len() >= DEPTH {
            inflight.next().await;
            show(&inflight);
        }
        let first = match carry.take() {
            Some(r) => r,
            None => tokio::select! {
                Some(()) = inflight.next(), if !inflight.is_empty() => {
                    show(&inflight);
                    continue;
                }
                got = rx.recv() => match got {
                    Some(r) => r,
                    None => break,
                },
            },
        };
        let mut round = vec![first];
        let mut msgs = writer::messages(&round[0].ops);
        let mut subjects: HashSet<String> = HashSet::from([round[0].subject.clone()]);
        // The workers of the previous round answer their commands and come back
        // almost together: wait a moment for as many keys as that round had, so the
        // first one back does not go alone (a round costs the server the same
        // whatever its size). A lone key never waits.
        let linger_until = tokio::time::Instant::now() + LINGER;
        loop {
            let next = match rx.try_recv() {
                Ok(n) => n,
                Err(_) if round.len() < last_keys => {
                    match tokio::time::timeout_at(linger_until, rx.recv()).await {
                        Ok(Some(n)) => n,
                        _ => break,
                    }
                }
                Err(_) => break,
            };
            // One write per subject per round (its check names one head), and at most
            // JetStream's batch size: anything else waits for the next round.
            let messages = writer::messages(&next.ops);
            if msgs + messages > MAX_BATCH_MSGS || subjects.contains(&next.subject) {
                carry = Some(next);
                break;
            }
            msgs += messages;
            subjects.insert(next.subject.clone());
            round.push(next);
        }
        last_keys = round.len();
        debug!(keys = round.len(), ops = msgs, "committing a round");
        // The keys of a round in flight are not in the next one: their workers wait
        // for this write before they plan again.
        let (client, js, metrics) = (client.clone(), js.clone(), metrics.clone());
        inflight.push(async move {
            let started = std::time::Instant::now();
            commit(client, js, round).await;
            metrics.committed(started.elapsed());
        });
        show(&inflight);
    }
    while inflight.next().await.is_some() {}
}

async fn commit(client: async_nats::Client, js: jetstream::Context, round: Vec<WriteRequest>) {
    let (client, js) = (&client, &js);
    // One key, or a few keys with one message each: single publishes (pipelined,
    // each its own check) cost less than the fixed price of a batch.
    if round.len() == 1
        || (round.len() <= SINGLES_MAX && round.iter().all(|r| writer::messages(&r.ops) == 1))
    {
        return each_alone(client, js, round).await;
    }
    let writes: Vec<writer::SubjectWrite<'_>> = round
        .iter()
        .map(|r| writer::SubjectWrite {
            subject: &r.subject,
            expected_last: r.expected_last,
            ops: &r.ops,
        })
        .collect();
    match writer::write_many(client, &writes).await {
        Ok(lasts) => {
            debug!(keys = round.len(), "shared batch committed");
            for (r, last) in round.into_iter().zip(lasts) {
                let _ = r.done.send(Ok(last));
            }
        }
        Err(WriteError::Conflict(why)) => {
            // Some key moved on; nothing was stored. Each key on its own finds out
            // which.
            debug!(%why, keys = round.len(), "shared batch refused; writing per key");
            each_alone(client, js, round).await;
        }
        Err(WriteError::Other(why)) => {
            for r in round {
                let _ = r.done.send(Err(WriteError::Other(why.clone())));
            }
        }
    }
}

/// Each key's write on its own (a single publish, or an atomic batch of that key's
/// ops), all at once.
async fn each_alone(
    client: &async_nats::Client,
    js: &jetstream::Context,
    round: Vec<WriteRequest>,
) {
    let results = join_all(
        round
            .iter()
            .map(|r| writer::write(client, js, &r.subject, r.expected_last, &r.ops)),
    )
    .await;
    for (r, result) in round.into_iter().zip(results) {
        let _ = r.done.send(result);
    }
}
