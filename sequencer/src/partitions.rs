//! Which partitions of `USYNC_CMDS` this instance sequences.
//!
//! Every instance keeps a heartbeat (`i.{instance}`) and its leases (`p.{partition}`)
//! in the KV bucket `usync-seq-leases`, whose `max_age` is the lease TTL: an entry
//! not renewed within it disappears. Each round (a quarter of the TTL) an instance
//! renews what it holds (a revision-checked update: it fails once another instance
//! has taken the partition), counts the live heartbeats, and moves toward
//! `ceil(partitions / live instances)`: it releases what it holds beyond that and
//! claims free partitions (a create: only one claimer wins) up to it. So N instances
//! share the partitions evenly, a new one gets its share within a few rounds, and a
//! dead or frozen one's partitions are free after the TTL.
//!
//! A lease is the scheduler, not the fence. Each partition's consumer is pinned to one
//! puller by the server, and every write still carries the expected last subject
//! sequence. On top, a worker writes only while its partition's [`Fence`] is valid: it
//! expires a little before the lease could expire on the server, measured on the
//! monotonic clock, so an instance thawed after SIGSTOP knows at once that its leases
//! may be gone, hands back what it holds, and claims again like a newcomer.
//!
//! A deployment set up before partitions has one consumer for every stream key
//! ([`nats::SEQUENCER_CONSUMER`]). Until `ultrasync setup` adds the partitions the
//! instances share that consumer as before; afterwards they drain it alongside the
//! partitions and delete it once it is empty.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{PriorityPolicy, pull};
use async_nats::jetstream::{self, kv, stream::Stream};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use ultrasync_shared::config::SequencerConfig;
use ultrasync_shared::nats::{self, LEASES_BUCKET, SEQUENCER_CONSUMER};

use crate::PRIORITY_GROUP;
use crate::metrics::Metrics;
use crate::source::{self, Fence, SourceReport, SourceStats};
use crate::worker::WorkerShared;

/// What a lease entry holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Lease {
    pub instance: String,
    /// When this instance took the partition (unix ms).
    pub since_ms: u64,
}

/// What a heartbeat entry holds.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Heartbeat {
    pub instance: String,
    pub pid: u32,
    /// Partitions this instance sequences, with their counters.
    pub partitions: BTreeMap<u32, SourceReport>,
    /// The consumer of a deployment set up before partitions, while drained here.
    pub unpartitioned: Option<SourceReport>,
}

/// One running source.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<SourceStats>,
    /// Lease revision (partitions only).
    revision: u64,
    since_ms: u64,
    fence: Option<Arc<Fence>>,
}

pub struct Coordinator {
    js: jetstream::Context,
    cmds: Stream,
    shared: Arc<WorkerShared>,
    /// What `/metrics` shows of the partitions held.
    metrics: Arc<Metrics>,
    config: SequencerConfig,
    instance: String,
    /// `None` until `USYNC_CMDS` has partitions.
    partitions: Option<u32>,
    leases: Option<kv::Store>,
    ttl: Duration,
    owned: HashMap<u32, Running>,
    unpartitioned: Option<Running>,
    /// Releases on their way (source finishing, then lease deleted).
    releasing: Vec<JoinHandle<()>>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lease_key(p: u32) -> String {
    format!("p.{p}")
}

impl Coordinator {
    pub async fn start(
        js: jetstream::Context,
        shared: Arc<WorkerShared>,
        metrics: Arc<Metrics>,
        config: SequencerConfig,
        instance: String,
    ) -> anyhow::Result<Self> {
        let cmds = js
            .get_stream(nats::CMDS_STREAM)
            .await
            .context("opening USYNC_CMDS")?;
        let mut me = Self {
            js,
            cmds,
            shared,
            metrics,
            ttl: Duration::from_secs(config.failover_secs.max(1)),
            config,
            instance,
            partitions: None,
            leases: None,
            owned: HashMap::new(),
            unpartitioned: None,
            releasing: Vec::new(),
        };
        me.discover().await?;
        me.metrics.set_layout(me.partitions, me.ttl);
        if me.partitions.is_none() {
            // Set up before partitions: one consumer for every key, as it always was.
            me.start_unpartitioned(true).await?;
        } else if me.legacy_exists().await {
            me.start_unpartitioned(false).await?;
        }
        Ok(me)
    }

    /// How often [`Coordinator::tick`] should run.
    pub fn period(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(100))
    }

    /// Reads the stream's partitions; opens the lease bucket once there are some.
    async fn discover(&mut self) -> anyhow::Result<()> {
        if self.partitions.is_some() {
            return Ok(());
        }
        let info = self
            .cmds
            .info()
            .await
            .context("reading USYNC_CMDS")?
            .clone();
        let Some(p) = nats::partitions_of(&info.config) else {
            return Ok(());
        };
        let leases = self
            .js
            .get_key_value(LEASES_BUCKET)
            .await
            .context("opening the sequencer lease bucket (run `ultrasync setup`)")?;
        let status = leases.status().await.context("reading the lease bucket")?;
        let ttl = status.max_age();
        if !ttl.is_zero() {
            self.ttl = ttl;
        }
        // A consumer that reads every subject cannot live next to the partition
        // consumers on a work-queue stream: narrow it to what was stored before.
        if let Err(e) = nats::narrow_legacy_consumer(&self.js).await {
            warn!(error = %e, "narrowing the unpartitioned consumer failed");
        }
        info!(
            partitions = p,
            lease_ttl_ms = self.ttl.as_millis() as u64,
            "sequencing by partition"
        );
        self.partitions = Some(p);
        self.leases = Some(leases);
        self.metrics.set_layout(self.partitions, self.ttl);
        Ok(())
    }

    async fn legacy_exists(&self) -> bool {
        self.cmds.consumer_info(SEQUENCER_CONSUMER).await.is_ok()
    }

    fn consumer_config(
        &self,
        durable: String,
        filter: String,
        description: String,
    ) -> pull::Config {
        pull::Config {
            durable_name: Some(durable),
            description: Some(description),
            filter_subject: filter,
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(self.config.ack_wait_secs),
            max_ack_pending: 50_000,
            priority_policy: PriorityPolicy::PinnedClient,
            priority_groups: vec![PRIORITY_GROUP.to_owned()],
            priority_timeout: Duration::from_secs(self.config.failover_secs),
            ..Default::default()
        }
    }

    /// Starts draining the single consumer of a deployment set up before
    /// partitions (`create`: make it when missing, with no filter, as before).
    async fn start_unpartitioned(&mut self, create: bool) -> anyhow::Result<()> {
        let consumer: jetstream::consumer::PullConsumer = if create {
            let mut cfg = self.consumer_config(
                SEQUENCER_CONSUMER.to_owned(),
                String::new(),
                "ultrasync sequencers (one pinned active instance)".to_owned(),
            );
            cfg.priority_timeout = Duration::from_secs(self.config.failover_secs);
            self.cmds
                .create_consumer(cfg)
                .await
                .context("creating the sequencer consumer")?
        } else {
            self.cmds
                .get_consumer(SEQUENCER_CONSUMER)
                .await
                .map_err(|e| anyhow::anyhow!("opening the unpartitioned consumer: {e}"))?
        };
        let stop = CancellationToken::new();
        let stats = self.metrics.unpartitioned_source();
        let task = tokio::spawn(source::run(
            SEQUENCER_CONSUMER.to_owned(),
            consumer,
            self.shared.clone(),
            None,
            stats.clone(),
            stop.clone(),
            None,
        ));
        self.unpartitioned = Some(Running {
            stop,
            task,
            stats,
            revision: 0,
            since_ms: unix_ms(),
            fence: None,
        });
        Ok(())
    }

    /// One round: heartbeat, renew, rebalance; and the migration steps.
    pub async fn tick(&mut self) {
        if let Err(e) = self.discover().await {
            warn!(error = %e, "reading the partition layout failed");
        }
        self.releasing.retain(|t| !t.is_finished());
        if self.partitions.is_some() {
            self.drain_unpartitioned().await;
        }
        let (Some(partitions), Some(leases)) = (self.partitions, self.leases.clone()) else {
            return;
        };
        let started = Instant::now();
        let started_ms = unix_ms();
        let valid_until = started + self.ttl * 7 / 8;

        // Frozen past a lease (SIGSTOP, a stalled host): nothing held is trusted.
        let stale: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, r)| r.fence.as_ref().is_some_and(|f| !f.valid()))
            .map(|(p, _)| *p)
            .collect();
        if !stale.is_empty() {
            warn!(partitions = ?stale, "leases may have expired (this instance was stalled); stepping down");
            for p in stale {
                self.drop_partition(p, false);
            }
        }

        // Renew.
        let mut lost = Vec::new();
        for (p, r) in self.owned.iter_mut() {
            let value = lease_value(&self.instance, r.since_ms);
            match leases.update(lease_key(*p), value, r.revision).await {
                Ok(rev) => {
                    r.revision = rev;
                    if let Some(f) = &r.fence {
                        f.renew(valid_until);
                    }
                    self.metrics.lease_renewed(*p, started_ms);
                }
                Err(e) => {
                    warn!(partition = p, error = %e, "lease renewal failed; stepping down from the partition");
                    lost.push(*p);
                }
            }
        }
        for p in lost {
            self.drop_partition(p, false);
        }

        // Heartbeat.
        let beat = Heartbeat {
            instance: self.instance.clone(),
            pid: std::process::id(),
            partitions: self
                .owned
                .iter()
                .map(|(p, r)| (*p, r.stats.report()))
                .collect(),
            unpartitioned: self.unpartitioned.as_ref().map(|r| r.stats.report()),
        };
        if let Ok(body) = serde_json::to_vec(&beat)
            && let Err(e) = leases
                .put(format!("i.{}", self.instance), body.into())
                .await
        {
            warn!(error = %e, "heartbeat failed");
        }

        // Who is there, and what is free.
        let keys: Vec<String> = match leases.keys().await {
            Ok(k) => match k.try_collect().await {
                Ok(k) => k,
                Err(e) => {
                    warn!(error = %e, "listing leases failed");
                    return;
                }
            },
            Err(e) => {
                warn!(error = %e, "listing leases failed");
                return;
            }
        };
        let live = keys.iter().filter(|k| k.starts_with("i.")).count().max(1);
        let target = (partitions as usize).div_ceil(live);
        let taken: std::collections::HashSet<u32> = keys
            .iter()
            .filter_map(|k| k.strip_prefix("p.")?.parse().ok())
            .collect();

        if self.owned.len() > target {
            // Give back the surplus (highest partitions first, so instances agree
            // roughly on what moves).
            let mut mine: Vec<u32> = self.owned.keys().copied().collect();
            mine.sort_unstable();
            for p in mine.into_iter().rev().take(self.owned.len() - target) {
                info!(
                    partition = p,
                    live, target, "releasing a partition to rebalance"
                );
                self.drop_partition(p, true);
            }
            return;
        }
        // Claim free partitions, starting at a point of our own so that instances
        // starting together spread out.
        let offset = (fxhash(&self.instance) % partitions as u64) as u32;
        for i in 0..partitions {
            if self.owned.len() >= target {
                break;
            }
            let p = (offset + i) % partitions;
            if taken.contains(&p) || self.owned.contains_key(&p) {
                continue;
            }
            let since_ms = unix_ms();
            match leases
                .create(lease_key(p), lease_value(&self.instance, since_ms))
                .await
            {
                Ok(revision) => {
                    if let Err(e) = self
                        .start_partition(p, revision, since_ms, valid_until)
                        .await
                    {
                        warn!(partition = p, error = %e, "starting a partition failed; releasing it");
                        let _ = leases
                            .delete_expect_revision(lease_key(p), Some(revision))
                            .await;
                    }
                }
                Err(_) => continue, // another instance was first
            }
        }
    }

    async fn start_partition(
        &mut self,
        p: u32,
        revision: u64,
        since_ms: u64,
        valid_until: Instant,
    ) -> anyhow::Result<()> {
        let cfg = self.consumer_config(
            nats::partition_consumer(p),
            nats::partition_filter(p),
            format!("ultrasync sequencers, partition {p} (one pinned active instance)"),
        );
        let consumer = self
            .cmds
            .create_consumer(cfg)
            .await
            .with_context(|| format!("creating the consumer of partition {p}"))?;
        let fence = Arc::new(Fence::new());
        fence.renew(valid_until);
        let stop = CancellationToken::new();
        let stats = self.metrics.source(p);
        let offered = self
            .partitions
            .map(|partitions| self.shared.intake.open(p, partitions, fence.clone()));
        let task = tokio::spawn(source::run(
            nats::partition_consumer(p),
            consumer,
            self.shared.clone(),
            Some(fence.clone()),
            stats.clone(),
            stop.clone(),
            offered,
        ));
        info!(partition = p, "took partition");
        self.metrics.lease_renewed(p, since_ms);
        self.owned.insert(
            p,
            Running {
                stop,
                task,
                stats,
                revision,
                since_ms,
                fence: Some(fence),
            },
        );
        Ok(())
    }

    /// Stops sequencing partition `p`. `release`: the lease is still ours; once the
    /// source has finished its batches, delete the lease and unpin the consumer so
    /// the next owner starts at once. Otherwise (lost or doubtful) revoke the fence
    /// at once and leave lease and pin alone: they may be someone else's already.
    fn drop_partition(&mut self, p: u32, release: bool) {
        let Some(r) = self.owned.remove(&p) else {
            return;
        };
        self.shared.intake.close(p);
        self.metrics.released(p);
        r.stop.cancel();
        if !release {
            if let Some(f) = &r.fence {
                f.revoke();
            }
            info!(partition = p, "stepped down from partition");
            return;
        }
        let (leases, cmds) = (self.leases.clone(), self.cmds.clone());
        self.releasing.push(tokio::spawn(async move {
            let _ = r.task.await;
            if let Some(f) = &r.fence {
                f.revoke();
            }
            if let Some(leases) = leases {
                let _ = leases
                    .delete_expect_revision(lease_key(p), Some(r.revision))
                    .await;
            }
            let _ = cmds
                .unpin_consumer(&nats::partition_consumer(p), PRIORITY_GROUP)
                .await;
            info!(partition = p, "released partition");
        }));
    }

    /// Once partitions are set up, the single consumer of before keeps only what
    /// was stored before: drain it, then delete it.
    async fn drain_unpartitioned(&mut self) {
        let info = self.cmds.consumer_info(SEQUENCER_CONSUMER).await.ok();
        match (&info, self.unpartitioned.is_some()) {
            (None, true) => {
                // Deleted (by another instance): stop pulling it.
                if let Some(r) = self.unpartitioned.take() {
                    r.stop.cancel();
                    let _ = r.task.await;
                }
                self.metrics.unpartitioned_stopped();
            }
            (Some(_), false) => {
                if let Err(e) = self.start_unpartitioned(false).await {
                    warn!(error = %e, "draining the unpartitioned consumer failed");
                }
            }
            (Some(i), true)
                if i.num_pending == 0
                    && i.num_ack_pending == 0
                    && i.config.filter_subject == nats::LEGACY_CMD_FILTER =>
            {
                info!("the unpartitioned consumer is drained; deleting it");
                if let Some(r) = self.unpartitioned.take() {
                    r.stop.cancel();
                    let _ = r.task.await;
                }
                self.metrics.unpartitioned_stopped();
                if let Err(e) = self.cmds.delete_consumer(SEQUENCER_CONSUMER).await {
                    warn!(error = %e, "deleting the drained unpartitioned consumer failed");
                }
            }
            _ => {}
        }
    }

    /// Stops everything, lets in-flight batches finish, gives the leases back.
    pub async fn shutdown(mut self) {
        let mine: Vec<u32> = self.owned.keys().copied().collect();
        for p in mine {
            self.drop_partition(p, true);
        }
        if let Some(r) = self.unpartitioned.take() {
            r.stop.cancel();
            let _ = r.task.await;
        }
        self.metrics.unpartitioned_stopped();
        for t in self.releasing.drain(..) {
            let _ = t.await;
        }
        if let Some(leases) = &self.leases {
            let _ = leases.delete(format!("i.{}", self.instance)).await;
        }
    }
}

fn lease_value(instance: &str, since_ms: u64) -> bytes::Bytes {
    serde_json::to_vec(&Lease {
        instance: instance.to_owned(),
        since_ms,
    })
    .unwrap_or_default()
    .into()
}

/// A small stable hash (FNV-1a) of an instance id.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
