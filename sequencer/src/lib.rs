//! The sequencer: the only writer of `USYNC_OPS`.
//!
//! `USYNC_CMDS` is split into partitions by a stable hash of the stream key (the
//! stream's subject transform); each partition has one consumer, and each instance
//! sequences the partitions it holds a lease on (`partitions.rs`), so N instances
//! share the work and a fault touches only the partitions of the instance it hit.
//! A source (`source.rs`) hands each command to the worker that owns its stream key,
//! and the worker validates, dedupes, assigns the next dense `server_seq` and stores
//! the ops with JetStream optimistic concurrency
//! (`Nats-Expected-Last-Subject-Sequence`). Commands that arrive together go into
//! one durable write (an atomic batch). Only after the publish ack does the worker
//! answer the gateway and ack the command message, so an answered op is on disk
//! (invariant 3) and a crash before that is retried by redelivery and deduped.
//!
//! If two instances write the same stream key (a lease moving, a frozen instance
//! thawing), the expected-sequence check lets exactly one batch in; the loser reads
//! what the winner wrote, re-plans its batch on top, and tries again. `server_seq`
//! therefore stays dense and unique whatever the instances do (invariant 2).
//!
//! With `sequencer.metrics_listen` set, an instance serves `/metrics` on it
//! (`metrics.rs`): the partitions it holds, their queue depth and counters, batch
//! sizes and commit times.

mod committer;
mod intake;
mod metrics;
mod partitions;
mod source;
mod worker;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::info;
use ultrasync_shared::config::Config;
use ultrasync_shared::local::Local;
use ultrasync_shared::nats;
use ultrasync_shared::reads;

pub use crate::partitions::{Heartbeat, Lease};
pub use crate::source::SourceReport;
use crate::source::Workers;
use crate::worker::{Job, WorkerShared};

/// The priority group of every sequencer consumer.
const PRIORITY_GROUP: &str = "sequencers";
/// Header on answers naming the instance that sent them (operators, tests).
pub const HDR_SEQUENCER: &str = "Usync-Sequencer";
/// Searches of the log for old retried ops at once, per instance
/// ([`worker::WorkerShared::searches`]).
const SEARCHES: usize = 2;
/// How long a stopping instance waits for the commands it hands back to
/// `USYNC_CMDS` (offered by the gateway of its process, not sequenced) to be stored.
const STOP_HAND_BACK: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs one sequencer instance until `shutdown` fires; then finishes the batches it
/// has taken, gives its partitions back and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Bound before anything else, so a taken port stops the start at once.
    let metrics_listener =
        ultrasync_metrics::bind("sequencer", config.sequencer.metrics_listen).await?;
    run_with_metrics(config, metrics_listener, shutdown).await
}

/// [`run`] beside the other services of this process (`ultrasync serve`): answers
/// for a gateway registered in `local` go to it directly.
pub async fn run_in_process(
    config: Config,
    shutdown: CancellationToken,
    local: Local,
) -> anyhow::Result<()> {
    let metrics_listener =
        ultrasync_metrics::bind("sequencer", config.sequencer.metrics_listen).await?;
    run_inner(config, metrics_listener, shutdown, local).await
}

/// [`run`] with the metrics listener bound already (`None`: no listener), as tests
/// bind it on port 0.
pub async fn run_with_metrics(
    config: Config,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_inner(config, metrics_listener, shutdown, Local::default()).await
}

async fn run_inner(
    config: Config,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
    local: Local,
) -> anyhow::Result<()> {
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

    let instance = format!(
        "{}-{}",
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let metrics = Arc::new(metrics::Metrics::default());
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
        searches: Arc::new(tokio::sync::Semaphore::new(SEARCHES)),
        dropped_replies: std::sync::atomic::AtomicU64::new(0),
        instance: instance.clone(),
        intake: intake::Intake::new(js.clone(), local.clone(), metrics.clone()),
        local: local.clone(),
        committer: committer::Committer::start(client.clone(), js.clone(), metrics.clone()),
        metrics: metrics.clone(),
        commands: js
            .get_key_value(ultrasync_shared::nats::COMMANDS_BUCKET)
            .await
            .context("opening the bucket of compacted commands")?,
        tracer: ultrasync_shared::trace::Tracer::for_service("sequencer"),
    });
    let commands: Arc<dyn ultrasync_shared::local::Commands> = shared.intake.clone();
    let _in_process = local.add_sequencer(&commands);
    let mut coordinator = partitions::Coordinator::start(
        js.clone(),
        shared.clone(),
        metrics.clone(),
        config.sequencer.clone(),
        instance.clone(),
    )
    .await?;
    // Served until the instance has given its partitions back.
    let metrics_stop = CancellationToken::new();
    if let Some(listener) = metrics_listener {
        let cmds = js
            .get_stream(nats::CMDS_STREAM)
            .await
            .context("opening USYNC_CMDS")?;
        let dropped = shared.clone();
        let registry = metrics.registry(
            &instance,
            Box::new(move || dropped.dropped_replies.load(Ordering::Relaxed)),
        );
        let exposed = metrics::Exposed {
            metrics: metrics.clone(),
            registry,
            cmds,
        };
        tokio::spawn(ultrasync_metrics::serve(
            "sequencer",
            listener,
            Arc::new(exposed),
            metrics_stop.clone(),
        ));
    }
    info!(instance = %instance, "sequencer running");
    coordinator.tick().await;
    let mut rounds = tokio::time::interval(coordinator.period());
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Digest requests (operators, `rebuild --verify`, tests): any instance answers
    // with the state it admits commands against, caught up with the log.
    let mut digests = client
        .queue_subscribe(reads::SEQUENCER_SUBSCRIPTION, PRIORITY_GROUP.to_owned())
        .await
        .map_err(|e| anyhow::anyhow!("subscribing to digest requests: {e}"))?;
    let mut digest_workers = Workers::new(shared.clone(), None);

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = rounds.tick() => coordinator.tick().await,
            _ = digest_workers.next_ended() => {}
            Some(req) = digests.next() => {
                let Some(key) = reads::parse_sequencer_subject(&req.subject) else {
                    continue;
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let busy = digest_workers.dispatch(key, Job::Digest(tx)).is_err();
                let client = client.clone();
                tokio::spawn(async move {
                    let Some(reply) = req.reply else { return };
                    let (headers, body) = match rx.await {
                        Ok(Ok(d)) => reads::ok_reply(serde_json::to_vec(&d).unwrap_or_default()),
                        Ok(Err(why)) => reads::error_reply(ultrasync_shared::ErrorCode::Unavailable, why),
                        Err(_) if busy => reads::error_reply(ultrasync_shared::ErrorCode::Unavailable, "busy"),
                        Err(_) => reads::error_reply(ultrasync_shared::ErrorCode::Unavailable, "the worker stopped"),
                    };
                    let _ = client.publish_with_headers(reply, headers, body).await;
                });
            }
        }
    }

    info!("sequencer stopping: finishing taken batches");
    let _ = digests.unsubscribe().await;
    coordinator.shutdown().await;
    shared.intake.flush(STOP_HAND_BACK).await;
    digest_workers.finish().await;
    let _ = client.flush().await;
    metrics_stop.cancel();
    info!("sequencer stopped");
    Ok(())
}
