//! The sequencer: the only writer of `USYNC_OPS`.
//!
//! It pulls commands from the shared durable consumer on `USYNC_CMDS`, hands each to
//! the worker that owns its stream key, and the worker validates, dedupes, assigns
//! the next dense `server_seq` and stores the ops with JetStream optimistic
//! concurrency (`Nats-Expected-Last-Subject-Sequence`). Commands that arrive together
//! go into one durable write (an atomic batch). Only after the publish ack does the
//! worker answer the gateway and ack the command message, so an answered op is on
//! disk (invariant 3) and a crash before that is retried by redelivery and deduped.
//!
//! Several instances may run against one NATS: if two write the same stream key, the
//! expected-sequence check lets exactly one batch in; the loser reads what the winner
//! wrote, re-plans its batch on top, and tries again. `server_seq` therefore stays
//! dense and unique whatever the instances do (invariant 2).

mod committer;
mod worker;
mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{PriorityPolicy, pull};
use async_nats::jetstream::{self};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use ultrasync_shared::StreamKey;
use ultrasync_shared::config::Config;
use ultrasync_shared::nats::{self, CMDS_STREAM, SEQUENCER_CONSUMER};
use ultrasync_shared::reads;

use crate::worker::{Job, Pending, Worker, WorkerShared};

/// Commands buffered per stream key before the dispatcher waits for its worker.
const WORKER_QUEUE: usize = 4096;
/// The priority group of the sequencer consumer.
const PRIORITY_GROUP: &str = "sequencers";
/// Header on answers naming the instance that sent them (operators, tests).
pub const HDR_SEQUENCER: &str = "Usync-Sequencer";

/// Runs one sequencer instance until `shutdown` fires; then finishes the batches it
/// has taken and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(home) = &config.region.home_domain {
        anyhow::bail!(
            "this region mirrors the op log of domain {home}: writes are sequenced there; run sequencers in the home region only"
        );
    }
    let nats::ServiceNats {
        client,
        js,
        ops,
        snapshots,
    } = nats::connect_service(&config, "ultrasync-sequencer").await?;
    let cmds = js
        .get_stream(CMDS_STREAM)
        .await
        .context("opening USYNC_CMDS")?;
    // One consumer shared by every instance, pinned to one of them at a time: that
    // one is the active writer for every stream key; the others wait, pulling, and
    // the server pins one of them when the active one stops pulling for
    // `failover_secs`. Pinning is the scheduler, not the fence: the expected-sequence
    // header on every write is what keeps a stale instance from doing harm.
    let consumer = cmds
        .create_consumer(pull::Config {
            durable_name: Some(SEQUENCER_CONSUMER.to_owned()),
            description: Some("ultrasync sequencers (one pinned active instance)".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(config.sequencer.ack_wait_secs),
            max_ack_pending: 50_000,
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![PRIORITY_GROUP.to_owned()],
            priority_timeout: Duration::from_secs(config.sequencer.failover_secs),
            ..Default::default()
        })
        .await
        .context("creating the sequencer consumer")?;

    let instance = format!(
        "{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let shared = Arc::new(WorkerShared {
        client: client.clone(),
        ops,
        snapshots,
        hlc: uhlc::HLC::default(),
        config: config.sequencer.clone(),
        namespaces: config.namespaces()?,
        limits: config.limits,
        heavy: Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        )),
        dropped_replies: std::sync::atomic::AtomicU64::new(0),
        instance: instance.clone(),
        committer: committer::Committer::start(client.clone(), js.clone()),
    });
    info!(instance = %instance, "sequencer running");

    let mut messages = consumer
        .stream()
        .group(PRIORITY_GROUP)
        .max_messages_per_batch(1000)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .context("pulling commands")?;
    // Digest requests (operators, `rebuild --verify`, tests): the worker of the key
    // answers with the state it admits commands against.
    let mut digests = client
        .queue_subscribe(reads::SEQUENCER_SUBSCRIPTION, PRIORITY_GROUP.to_owned())
        .await
        .context("subscribing to digest requests")?;
    let mut workers: HashMap<StreamKey, mpsc::Sender<Job>> = HashMap::new();
    // Each task is one worker; it returns its key when it exits (idle), so its entry
    // leaves `workers` and the map holds only live keys.
    let mut tasks: JoinSet<StreamKey> = JoinSet::new();

    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                reap(&mut workers, res);
                continue;
            }
            Some(req) = digests.next() => {
                let Some(key) = reads::parse_sequencer_subject(&req.subject) else {
                    continue;
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                dispatch(&mut workers, &mut tasks, &shared, key, Job::Digest(tx)).await;
                let client = client.clone();
                tokio::spawn(async move {
                    let Some(reply) = req.reply else { return };
                    let (headers, body) = match rx.await {
                        Ok(Ok(d)) => reads::ok_reply(serde_json::to_vec(&d).unwrap_or_default()),
                        Ok(Err(why)) => reads::error_reply(ultrasync_shared::ErrorCode::Unavailable, why),
                        Err(_) => reads::error_reply(ultrasync_shared::ErrorCode::Unavailable, "the worker stopped"),
                    };
                    let _ = client.publish_with_headers(reply, headers, body).await;
                });
                continue;
            }
            m = messages.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(error = %e, "pulling commands failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            None => {
                warn!("command consumer ended");
                break;
            }
        };
        let Some(key) = nats::stream_key_from_subject(&msg.subject) else {
            warn!(subject = %msg.subject, "dropping command on an unexpected subject");
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            continue;
        };
        for p in Pending::from_message(msg) {
            dispatch(
                &mut workers,
                &mut tasks,
                &shared,
                key.clone(),
                Job::Command(p),
            )
            .await;
        }
        // Reap finished workers without blocking.
        while let Some(res) = tasks.try_join_next() {
            reap(&mut workers, res);
        }
    }

    info!("sequencer stopping: finishing taken batches");
    let _ = digests.unsubscribe().await;
    drop(messages);
    drop(workers);
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            warn!(error = %e, "sequencer worker panicked");
        }
    }
    let _ = client.flush().await;
    info!("sequencer stopped");
    Ok(())
}

/// Forgets the worker that ended, unless a new one already took its key.
fn reap(
    workers: &mut HashMap<StreamKey, mpsc::Sender<Job>>,
    res: Result<StreamKey, tokio::task::JoinError>,
) {
    match res {
        Ok(key) => {
            if workers.get(&key).is_some_and(|tx| tx.is_closed()) {
                workers.remove(&key);
            }
        }
        Err(e) => {
            warn!(error = %e, "sequencer worker panicked");
            workers.retain(|_, tx| !tx.is_closed());
        }
    }
}

/// Hands `job` to the worker of `key`, starting one when there is none (or it went
/// idle and closed its queue).
async fn dispatch(
    workers: &mut HashMap<StreamKey, mpsc::Sender<Job>>,
    tasks: &mut JoinSet<StreamKey>,
    shared: &Arc<WorkerShared>,
    key: StreamKey,
    mut job: Job,
) {
    loop {
        if workers.get(&key).is_none_or(|tx| tx.is_closed()) {
            let (tx, rx) = mpsc::channel(WORKER_QUEUE);
            let worker = Worker::new(key.clone(), shared.clone());
            let owned = key.clone();
            tasks.spawn(async move {
                worker.run(rx).await;
                owned
            });
            workers.insert(key.clone(), tx);
        }
        let Some(tx) = workers.get(&key) else { return };
        match tx.send(job).await {
            Ok(()) => return,
            // The worker closed between the check and the send: start a new one.
            Err(mpsc::error::SendError(back)) => {
                workers.remove(&key);
                job = back;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Workers that went idle leave the map; a key whose worker was replaced keeps
    /// its live entry.
    #[test]
    fn idle_workers_are_forgotten() {
        let mut workers: HashMap<StreamKey, mpsc::Sender<Job>> = HashMap::new();
        let key = |ns: &str| StreamKey::parse("o", "p", ns).expect("key");
        let (idle_tx, idle_rx) = mpsc::channel(1);
        drop(idle_rx);
        workers.insert(key("a"), idle_tx);
        let (live_tx, _live_rx) = mpsc::channel(1);
        workers.insert(key("b"), live_tx);
        reap(&mut workers, Ok(key("a")));
        reap(&mut workers, Ok(key("b")));
        assert_eq!(workers.keys().collect::<Vec<_>>(), [&key("b")]);
    }
}
