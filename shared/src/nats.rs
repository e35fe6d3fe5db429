//! The NATS layout of SPEC §7: subject names, stream and bucket configs, header
//! names, and the idempotent set-up every service runs at start.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tracing::{info, warn};

use crate::ids::StreamKey;

/// Command stream: gateways publish, sequencers consume (work queue).
pub const CMDS_STREAM: &str = "USYNC_CMDS";
/// The op log: only the sequencer writes, only the compactor purges.
pub const OPS_STREAM: &str = "USYNC_OPS";
/// Cursor bucket.
pub const CURSORS_BUCKET: &str = "usync-cursors";
/// Snapshot object store.
pub const SNAPSHOTS_BUCKET: &str = "usync-snapshots";
/// Webhook dead letters (`usync.webhooks.dead.{name}`), written by the gateways.
pub const DLQ_STREAM: &str = "USYNC_WEBHOOKS_DLQ";
/// The sequencers' single durable consumer on `USYNC_CMDS` before partitions
/// (kept only while a deployment set up without partitions drains it).
pub const SEQUENCER_CONSUMER: &str = "usync-sequencer";
/// Sequencer leases and heartbeats (KV): `p.{partition}` → the owning instance,
/// `i.{instance}` → that instance's heartbeat. Entries live `max_age` (the lease
/// TTL) unless renewed.
pub const LEASES_BUCKET: &str = "usync-seq-leases";
/// Partitions of `USYNC_CMDS` when `ultrasync setup` is not told otherwise.
pub const DEFAULT_PARTITIONS: u32 = 16;
/// Most partitions a deployment may have (one consumer each).
pub const MAX_PARTITIONS: u32 = 1024;
/// Stream metadata key on `USYNC_CMDS` holding the number of partitions.
pub const PARTITIONS_METADATA: &str = "usync.partitions";
/// Prefix of the subjects commands are stored under: `usync.cmdp.{partition}.{org}.{project}.{ns}`.
pub const CMD_PARTITIONED_PREFIX: &str = "usync.cmdp.";

/// The durable consumer of one partition of `USYNC_CMDS`.
pub fn partition_consumer(partition: u32) -> String {
    format!("usync-seq-p{partition}")
}

/// The filter of one partition's consumer.
pub fn partition_filter(partition: u32) -> String {
    format!("{CMD_PARTITIONED_PREFIX}{partition}.>")
}

/// The stream's subject transform: gateways publish `usync.cmd.{org}.{project}.{ns}`
/// and the server stores it as `usync.cmdp.{p}.{org}.{project}.{ns}`, `p` a stable
/// hash of the three tokens (nats-server's `partition()` mapping) below `partitions`.
pub fn cmds_transform(partitions: u32) -> stream::SubjectTransform {
    stream::SubjectTransform {
        source: "usync.cmd.*.*.*".to_owned(),
        destination: format!(
            "{CMD_PARTITIONED_PREFIX}{{{{partition({partitions},1,2,3)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}"
        ),
    }
}

/// The partition nats-server's `partition(n,1,2,3)` mapping gives a stream key:
/// FNV-1a (32 bit) of org, project and namespace concatenated, modulo `partitions`
/// (checked against the server by `tests/partitions.rs`).
pub fn partition_of(key: &StreamKey, partitions: u32) -> u32 {
    let h = [
        key.org.as_str(),
        key.project.as_str(),
        key.namespace.as_str(),
    ]
    .iter()
    .flat_map(|t| t.bytes())
    .fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h % partitions.max(1)
}

/// The number of partitions a stored `USYNC_CMDS` configuration has (`None`: set up
/// before partitions, one consumer for every stream key).
pub fn partitions_of(cfg: &stream::Config) -> Option<u32> {
    cfg.subject_transform.as_ref()?;
    cfg.metadata
        .get(PARTITIONS_METADATA)
        .and_then(|p| p.parse().ok())
        .filter(|p| (1..=MAX_PARTITIONS).contains(p))
}

/// The filter matching what `USYNC_CMDS` stores for a command published to
/// `subject` (`usync.cmd.{org}.{project}.{ns}`), in whichever partition.
pub fn stored_cmd_filter(subject: &str) -> Option<String> {
    let rest = subject.strip_prefix("usync.cmd.")?;
    Some(format!("{CMD_PARTITIONED_PREFIX}*.{rest}"))
}

/// A command subject as stored: the stream key and, when partitioned, its partition.
/// Takes both `usync.cmd.{org}.{project}.{ns}` (stored before partitions) and
/// `usync.cmdp.{p}.{org}.{project}.{ns}`.
pub fn parse_cmd_subject(subject: &str) -> Option<(Option<u32>, StreamKey)> {
    match subject.strip_prefix(CMD_PARTITIONED_PREFIX) {
        Some(rest) => {
            let (p, rest) = rest.split_once('.')?;
            let p = p.parse().ok()?;
            let key = stream_key_from_subject(&format!("usync.cmd.{rest}"))?;
            Some((Some(p), key))
        }
        None => Some((None, stream_key_from_subject(subject)?)),
    }
}

/// Header carrying an op's `server_seq` in the log.
pub const HDR_SEQ: &str = "Usync-Seq";
/// Header carrying an op's `op_id` in the log.
pub const HDR_OP_ID: &str = "Usync-Op-Id";

/// Header on a message carrying several JSON documents (commands gateway →
/// sequencer, answers sequencer → gateway), one per line: how many.
pub const HDR_BATCH: &str = "Usync-Batch";

/// Joins JSON documents into one message body, one per line. Compact JSON (what
/// `serde_json` writes) never holds a raw newline, so the line is the boundary.
pub fn join_lines<T: AsRef<[u8]>>(docs: &[T]) -> Vec<u8> {
    let len = docs.iter().map(|d| d.as_ref().len() + 1).sum();
    let mut out = Vec::with_capacity(len);
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(d.as_ref());
    }
    out
}

/// The documents of a message: its lines when it carries [`HDR_BATCH`], otherwise
/// the whole body.
pub fn split_lines<'a>(
    headers: Option<&async_nats::HeaderMap>,
    payload: &'a [u8],
) -> Vec<&'a [u8]> {
    match headers.and_then(|h| h.get(HDR_BATCH)) {
        Some(_) => payload.split(|b| *b == b'\n').collect(),
        None => vec![payload],
    }
}

/// How many documents [`split_lines`] finds in a message, without splitting it.
pub fn count_lines(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> usize {
    match headers.and_then(|h| h.get(HDR_BATCH)) {
        Some(_) => 1 + payload.iter().filter(|b| **b == b'\n').count(),
        None => 1,
    }
}

/// Largest message either stream accepts: a frame (1 MiB) plus envelope.
pub const MAX_MSG_SIZE: i32 = 2 * 1024 * 1024;

/// Most bytes one pull of a consumer asks for (the sequencers' command sources, the
/// materializer, log readers), beside its message count: what a process holds of
/// messages it has not worked through yet. A thousand messages of a tenant's
/// largest commands or ops would otherwise be a couple of GiB at once. Well above
/// [`MAX_MSG_SIZE`]: a message larger than a pull's bytes would never be delivered.
pub const PULL_MAX_BYTES: usize = 8 * 1024 * 1024;
const _: () = assert!(PULL_MAX_BYTES >= 2 * MAX_MSG_SIZE as usize);

pub fn cmd_subject(key: &StreamKey) -> String {
    format!("usync.cmd.{}.{}.{}", key.org, key.project, key.namespace)
}

pub fn ops_subject(key: &StreamKey) -> String {
    format!("usync.ops.{}.{}.{}", key.org, key.project, key.namespace)
}

pub fn presence_subject(org: &str, project: &str) -> String {
    format!("usync.presence.{org}.{project}")
}

/// Where answers to commands go: `usync.reply.{gateway_id}.{session_id}` (any tokens
/// after the prefix). The sequencer publishes answers to these subjects only.
pub const REPLY_PREFIX: &str = "usync.reply.";

/// Whether `subject` is a concrete subject under [`REPLY_PREFIX`]: non-empty tokens,
/// no wildcards, no whitespace or control characters, at most 256 bytes.
pub fn is_reply_subject(subject: &str) -> bool {
    subject.len() <= 256
        && subject.strip_prefix(REPLY_PREFIX).is_some_and(|rest| {
            rest.split('.').all(|t| {
                !t.is_empty()
                    && t != "*"
                    && t != ">"
                    && !t.chars().any(|c| c.is_whitespace() || c.is_control())
            })
        })
}

/// Parses `usync.{cmd|ops}.{org}.{project}.{ns}` back into a stream key.
pub fn stream_key_from_subject(subject: &str) -> Option<StreamKey> {
    let mut parts = subject.split('.');
    if parts.next()? != "usync" {
        return None;
    }
    let kind = parts.next()?;
    if kind != "cmd" && kind != "ops" {
        return None;
    }
    let (org, project, ns) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    StreamKey::parse(org, project, ns).ok()
}

/// Settings that shape the streams.
#[derive(Debug, Clone)]
pub struct LayoutOptions {
    /// 1 or 3.
    pub replicas: usize,
    /// In a replica region: the home region's JetStream domain, whose `USYNC_OPS`
    /// this region's `USYNC_OPS` mirrors (and whose `USYNC_CMDS` takes commands).
    pub mirror_of: Option<String>,
    /// Partitions of `USYNC_CMDS` to set up (`ultrasync setup --partitions`). `None`:
    /// keep what the stream has, or [`DEFAULT_PARTITIONS`] for a new or unpartitioned
    /// one. Fixed once set: a stream key's partition must not move while commands wait.
    pub partitions: Option<u32>,
    /// How long a sequencer's lease on a partition lives without renewal (the lease
    /// bucket's `max_age`): the longest a dead or frozen instance holds its partitions.
    pub lease_ttl: Duration,
    /// How long the commands of compacted ops are remembered (the `usync-commands`
    /// bucket's `max_age`; zero: forever).
    pub command_memory: Duration,
}

impl Default for LayoutOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            mirror_of: None,
            partitions: None,
            lease_ttl: Duration::from_secs(2),
            command_memory: Duration::from_secs(30 * 86_400),
        }
    }
}

/// `USYNC_CMDS`: memory storage. A command lost before it is sequenced was never
/// acked, so the client's outbox resends it; with `sync_interval: always` a file
/// stream would cost an fsync per command for no guarantee anyone relies on.
///
/// The stream is shared by every tenant and refuses new messages when full, so one
/// stream key (one subject, `usync.cmd.{org}.{project}.{ns}`) may hold at most
/// [`CMDS_PER_STREAM_KEY`] messages, and a message over that is refused
/// (`discard_new_per_subject`: without it the per-subject limit would silently drop
/// the key's *oldest* commands). The gateways answer such a refusal `rate_limited`.
/// The backlog of a busy key is its rate times the time to sequence: about 10
/// messages at 1,000 commands/s, ~2,500 for a 2 s sequencer failover at 1,250/s per
/// key (`ultrasync bench`'s 10,000 ops/s over 8 keys), so 4,096 leaves headroom.
/// It bounds messages, not bytes (the gateway gathers up to 512 KiB in one): what
/// one org may have on its way in bytes is bounded by the gateways'
/// `org_max_inflight_bytes`, and the whole stream by `max_bytes`.
///
/// Partitions: the stream's subject transform stores each command under its
/// partition's subject ([`cmds_transform`]); one consumer per partition reads it.
pub fn cmds_stream_config(opts: &LayoutOptions, partitions: u32) -> stream::Config {
    stream::Config {
        name: CMDS_STREAM.to_owned(),
        description: Some("ultrasync commands, gateway -> sequencer".to_owned()),
        subjects: vec!["usync.cmd.>".to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::Memory,
        max_bytes: 256 * 1024 * 1024,
        discard: stream::DiscardPolicy::New,
        max_messages_per_subject: CMDS_PER_STREAM_KEY,
        discard_new_per_subject: true,
        max_message_size: MAX_MSG_SIZE,
        num_replicas: opts.replicas,
        subject_transform: Some(cmds_transform(partitions)),
        metadata: [(PARTITIONS_METADATA.to_owned(), partitions.to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// The lease bucket of the sequencers (see [`LEASES_BUCKET`]).
pub fn leases_bucket_config(opts: &LayoutOptions) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: LEASES_BUCKET.to_owned(),
        description: "ultrasync sequencer partition leases and heartbeats".to_owned(),
        history: 1,
        max_age: opts.lease_ttl,
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

/// Messages one stream key may have waiting in `USYNC_CMDS` (see
/// [`cmds_stream_config`]).
pub const CMDS_PER_STREAM_KEY: i64 = 4096;

/// Consumers `USYNC_OPS` may have. Without a value of its own a stream takes
/// nats-server's default of 1,000, shared by every reader of the log: each
/// gateway's followed stream keys (`gateway.max_followed_keys`, 20,000 by default),
/// materializers, webhooks, loading sequencers. This leaves room for five gateways
/// at their default bound.
pub const OPS_MAX_CONSUMERS: i32 = 100_000;

/// `USYNC_OPS`: the durable op log. In a replica region, a mirror of the home
/// region's (same sequence numbers, subjects and headers; read-only; purged by this
/// region's compactor, since purges do not propagate).
pub fn ops_stream_config(opts: &LayoutOptions) -> stream::Config {
    if let Some(home) = &opts.mirror_of {
        return stream::Config {
            name: OPS_STREAM.to_owned(),
            description: Some(format!("ultrasync op log, mirrored from domain {home}")),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            allow_direct: true,
            max_message_size: MAX_MSG_SIZE,
            max_consumers: OPS_MAX_CONSUMERS,
            num_replicas: opts.replicas,
            mirror: Some(stream::Source {
                name: OPS_STREAM.to_owned(),
                external: Some(stream::External {
                    api_prefix: format!("$JS.{home}.API"),
                    delivery_prefix: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
    }
    stream::Config {
        name: OPS_STREAM.to_owned(),
        description: Some("ultrasync op log".to_owned()),
        subjects: vec!["usync.ops.>".to_owned()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        deny_delete: true,
        allow_direct: true,
        allow_atomic_publish: true,
        duplicate_window: Duration::from_secs(120),
        max_message_size: MAX_MSG_SIZE,
        max_consumers: OPS_MAX_CONSUMERS,
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

/// `USYNC_WEBHOOKS_DLQ`: webhook events that ran out of attempts.
pub fn dlq_stream_config(opts: &LayoutOptions) -> stream::Config {
    stream::Config {
        name: DLQ_STREAM.to_owned(),
        description: Some("ultrasync webhook dead letters".to_owned()),
        subjects: vec!["usync.webhooks.dead.>".to_owned()],
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

/// KV: the commands of compacted ops, `{org}.{project}.{ns}.{command key}` →
/// `{server_seq} {op_id}`. The compactor writes them before it purges the ops; a
/// sequencer looks a command up here when the log and its memory no longer hold it,
/// so its memory holds only the commands of ops still in the log (and a recent
/// window) while a retry of any compacted op is still recognised.
pub const COMMANDS_BUCKET: &str = "usync-commands";

pub fn commands_bucket_config(opts: &LayoutOptions) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: COMMANDS_BUCKET.to_owned(),
        description: "ultrasync commands of compacted ops".to_owned(),
        history: 1,
        max_age: opts.command_memory,
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

/// The `usync-commands` key of a command of `key` (its command key in hex).
pub fn command_kv_key(key: &crate::StreamKey, command_hex: &str) -> String {
    format!(
        "{}.{}.{}.{command_hex}",
        key.org, key.project, key.namespace
    )
}

fn cursors_bucket_config(opts: &LayoutOptions) -> jetstream::kv::Config {
    jetstream::kv::Config {
        bucket: CURSORS_BUCKET.to_owned(),
        description: "ultrasync client cursors".to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

/// The streams of this region's layout: a replica region has no command stream of
/// its own (its gateways' commands reach the home region's over the leafnode
/// connection) and sends no webhooks.
fn layout_streams(opts: &LayoutOptions, partitions: u32) -> Vec<stream::Config> {
    match opts.mirror_of {
        None => vec![
            cmds_stream_config(opts, partitions),
            ops_stream_config(opts),
            dlq_stream_config(opts),
        ],
        Some(_) => vec![ops_stream_config(opts)],
    }
}

/// Creates or updates the streams and buckets (`ultrasync setup`, `ultrasync dev`,
/// and services whose NATS user may). Safe to run concurrently.
pub async fn ensure_layout(js: &jetstream::Context, opts: LayoutOptions) -> anyhow::Result<()> {
    let partitions = choose_partitions(js, &opts).await?;
    for cfg in layout_streams(&opts, partitions) {
        create_stream_placed(js, cfg).await?;
    }
    js.create_or_update_key_value(cursors_bucket_config(&opts))
        .await
        .map_err(|e| anyhow::anyhow!("creating bucket {CURSORS_BUCKET}: {e}"))?;
    js.create_or_update_key_value(commands_bucket_config(&opts))
        .await
        .map_err(|e| anyhow::anyhow!("creating bucket {COMMANDS_BUCKET}: {e}"))?;
    js.create_or_update_key_value(crate::apikeys::bucket_config(opts.replicas))
        .await
        .map_err(|e| anyhow::anyhow!("creating bucket {}: {e}", crate::apikeys::APIKEYS_BUCKET))?;
    if opts.mirror_of.is_none() {
        js.create_or_update_key_value(leases_bucket_config(&opts))
            .await
            .map_err(|e| anyhow::anyhow!("creating bucket {LEASES_BUCKET}: {e}"))?;
        narrow_legacy_consumer(js).await?;
    }
    if js.get_object_store(SNAPSHOTS_BUCKET).await.is_err() {
        let created = js
            .create_object_store(jetstream::object_store::Config {
                bucket: SNAPSHOTS_BUCKET.to_owned(),
                description: Some("ultrasync state snapshots".to_owned()),
                storage: stream::StorageType::File,
                num_replicas: opts.replicas,
                ..Default::default()
            })
            .await;
        if let Err(e) = created {
            // Another service may have created it between our check and create.
            if js.get_object_store(SNAPSHOTS_BUCKET).await.is_err() {
                return Err(anyhow::anyhow!(
                    "creating object store {SNAPSHOTS_BUCKET}: {e}"
                ));
            }
        }
    } else {
        // The object store API has no update: change its stream's replicas directly.
        let name = format!("OBJ_{SNAPSHOTS_BUCKET}");
        let have = js
            .get_stream(&name)
            .await
            .map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?
            .cached_info()
            .config
            .clone();
        if have.num_replicas != opts.replicas {
            js.update_stream(stream::Config {
                num_replicas: opts.replicas,
                ..have
            })
            .await
            .map_err(|e| anyhow::anyhow!("updating stream {name}: {e}"))?;
        }
    }
    info!(replicas = opts.replicas, partitions, "nats layout ready");
    Ok(())
}

/// How long creating a stream waits for a forming cluster to place its replicas.
const PLACEMENT_WAIT: Duration = Duration::from_secs(30);

/// Creates or updates one stream. A cluster that has elected its meta leader may
/// not yet know every node: until the nodes have all reported in, a stream of N
/// replicas finds fewer than N peers ("no suitable peers for placement"). That
/// answer is retried for [`PLACEMENT_WAIT`]; any other fails at once.
async fn create_stream_placed(js: &jetstream::Context, cfg: stream::Config) -> anyhow::Result<()> {
    let name = cfg.name.clone();
    let deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
    let mut told = false;
    loop {
        let e = match js.create_or_update_stream(cfg.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if !cluster_forming(&e) || tokio::time::Instant::now() >= deadline {
            anyhow::bail!("creating stream {name}: {e}");
        }
        if !told {
            info!(stream = %name, replicas = cfg.num_replicas, error = %e,
                "waiting for the cluster's nodes to place the stream's replicas");
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `e` says the cluster has too few peers for the stream yet.
fn cluster_forming(e: &jetstream::context::CreateStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::CreateStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::CLUSTER_NO_PEERS
                || j.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
    )
}

/// The partitions `USYNC_CMDS` gets: what the options ask for, else what it has,
/// else the default. Changing the number of an existing partitioned stream is
/// refused: stream keys would change partition while their commands wait.
async fn choose_partitions(js: &jetstream::Context, opts: &LayoutOptions) -> anyhow::Result<u32> {
    let have = match js.get_stream(CMDS_STREAM).await {
        Ok(s) => partitions_of(&s.cached_info().config),
        Err(e) if stream_not_found(&e) => None,
        Err(e) => return Err(anyhow::anyhow!("reading stream {CMDS_STREAM}: {e}")),
    };
    match (opts.partitions, have) {
        (Some(want), _) if !(1..=MAX_PARTITIONS).contains(&want) => {
            anyhow::bail!("partitions must be 1-{MAX_PARTITIONS}, not {want}")
        }
        (Some(want), Some(have)) if want != have => anyhow::bail!(
            "{CMDS_STREAM} has {have} partitions; the number is fixed once set (stream keys \
             would change partition while their commands wait)"
        ),
        (Some(want), _) => Ok(want),
        (None, Some(have)) => Ok(have),
        (None, None) => Ok(DEFAULT_PARTITIONS),
    }
}

/// Upgrading a deployment set up before partitions: its single consumer
/// ([`SEQUENCER_CONSUMER`]) reads every subject, which a work-queue stream does not
/// allow next to the partition consumers. Narrowed to the subjects stored before
/// partitions (`usync.cmd.>`), it keeps its waiting commands for the sequencers to
/// drain, and the partition consumers take everything stored since.
pub async fn narrow_legacy_consumer(js: &jetstream::Context) -> anyhow::Result<()> {
    use jetstream::consumer::pull;
    let Ok(stream) = js.get_stream(CMDS_STREAM).await else {
        return Ok(());
    };
    let Ok(info) = stream.consumer_info(SEQUENCER_CONSUMER).await else {
        return Ok(());
    };
    let cfg = &info.config;
    if cfg.filter_subject == LEGACY_CMD_FILTER || !cfg.filter_subjects.is_empty() {
        return Ok(());
    }
    let updated = pull::Config {
        durable_name: cfg.durable_name.clone(),
        description: cfg.description.clone(),
        ack_policy: cfg.ack_policy,
        ack_wait: cfg.ack_wait,
        max_ack_pending: cfg.max_ack_pending,
        priority_policy: cfg.priority_policy.clone(),
        priority_groups: cfg.priority_groups.clone(),
        priority_timeout: cfg.priority_timeout,
        filter_subject: LEGACY_CMD_FILTER.to_owned(),
        ..Default::default()
    };
    stream
        .update_consumer(updated)
        .await
        .map_err(|e| anyhow::anyhow!("narrowing consumer {SEQUENCER_CONSUMER}: {e}"))?;
    info!(
        pending = info.num_pending,
        "the unpartitioned sequencer consumer now drains the commands stored before partitions"
    );
    Ok(())
}

/// What the consumer of a deployment set up before partitions reads once upgraded.
pub const LEGACY_CMD_FILTER: &str = "usync.cmd.>";

/// Stream name and replicas of every part of the layout, as stored now.
pub async fn describe_layout(
    js: &jetstream::Context,
    opts: &LayoutOptions,
) -> anyhow::Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    let leases = opts
        .mirror_of
        .is_none()
        .then(|| format!("KV_{LEASES_BUCKET}"));
    let names = layout_streams(opts, DEFAULT_PARTITIONS)
        .into_iter()
        .map(|s| s.name)
        .chain([
            format!("KV_{CURSORS_BUCKET}"),
            format!("KV_{}", crate::apikeys::APIKEYS_BUCKET),
            format!("OBJ_{SNAPSHOTS_BUCKET}"),
        ])
        .chain(leases);
    for name in names {
        let s = js
            .get_stream(&name)
            .await
            .map_err(|e| anyhow::anyhow!("reading stream {name}: {e}"))?;
        out.push((name, s.cached_info().config.num_replicas));
    }
    Ok(out)
}

/// Reads the layout without changing it (only `STREAM.INFO`, which every service
/// user may do): the list of what is missing or differs from what the code needs.
/// Replicas are not compared: they are the operator's choice at `ultrasync setup`.
pub async fn check_layout(
    js: &jetstream::Context,
    opts: &LayoutOptions,
) -> anyhow::Result<Vec<String>> {
    let kv = cursors_bucket_config(opts);
    let mut problems = Vec::new();
    // The transform (partitions) is not compared: a deployment set up before
    // partitions keeps working until `ultrasync setup` adds them.
    for want in layout_streams(opts, DEFAULT_PARTITIONS) {
        match js.get_stream(&want.name).await {
            Err(e) if stream_not_found(&e) => {
                problems.push(format!("stream {} is missing", want.name));
            }
            Err(e) => return Err(anyhow::anyhow!("reading stream {}: {e}", want.name)),
            Ok(s) => {
                let have = &s.cached_info().config;
                let differs = have.subjects != want.subjects
                    || have.storage != want.storage
                    || have.retention != want.retention
                    || have.allow_direct != want.allow_direct
                    || have.allow_atomic_publish != want.allow_atomic_publish
                    || have.deny_delete != want.deny_delete
                    || have.mirror.as_ref().map(|m| &m.name)
                        != want.mirror.as_ref().map(|m| &m.name);
                if differs {
                    problems.push(format!("stream {} has another configuration", want.name));
                }
            }
        }
    }
    for (kind, stream) in [
        ("bucket", format!("KV_{}", kv.bucket)),
        ("bucket", format!("KV_{COMMANDS_BUCKET}")),
        ("bucket", format!("KV_{}", crate::apikeys::APIKEYS_BUCKET)),
        ("object store", format!("OBJ_{SNAPSHOTS_BUCKET}")),
    ] {
        match js.get_stream(&stream).await {
            Ok(_) => {}
            Err(e) if stream_not_found(&e) => {
                problems.push(format!("{kind} {stream} is missing"));
            }
            Err(e) => return Err(anyhow::anyhow!("reading {kind} {stream}: {e}")),
        }
    }
    Ok(problems)
}

fn stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// What services do at start: go on when the layout is there; otherwise create it
/// if this NATS user may, else fail telling the operator to run `ultrasync setup`.
/// Creation may also lose a race with another service creating the same streams
/// (on a cluster the loser can time out): the layout is checked again after a
/// failure, and creation tried twice.
pub async fn prepare_layout(js: &jetstream::Context, opts: LayoutOptions) -> anyhow::Result<()> {
    let problems = patiently("reading the layout", || check_layout(js, &opts)).await?;
    if problems.is_empty() {
        return Ok(());
    }
    info!(problems = %problems.join("; "), "nats layout incomplete; creating it");
    let mut failure = None;
    for _ in 0..2 {
        match ensure_layout(js, opts.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                if check_layout(js, &opts).await?.is_empty() {
                    return Ok(());
                }
                warn!(error = %e, "creating the nats layout failed");
                failure = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let e = failure.unwrap_or_else(|| anyhow::anyhow!("unknown"));
    Err(anyhow::anyhow!(
        "the JetStream layout is not ready ({}) and creating it failed ({e:#}); \
         when this NATS user may not create streams, run `ultrasync setup` once with \
         admin credentials (ULTRASYNC_NATS_USER=admin ULTRASYNC_NATS_PASSWORD=... \
         ultrasync setup --replicas N)",
        problems.join("; ")
    ))
}

/// How long a service at start keeps asking JetStream's API when it does not answer.
const START_PATIENCE: Duration = Duration::from_secs(30);

/// Runs `ask` again while it fails because JetStream's API did not answer in time
/// (a cluster electing its meta leader, a server still recovering its streams), for
/// up to [`START_PATIENCE`]; any other failure, or the last one, is returned.
async fn patiently<T, E, F, Fut>(what: &str, mut ask: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + START_PATIENCE;
    loop {
        match ask().await {
            Err(e) if unanswered(&e.to_string()) && tokio::time::Instant::now() < deadline => {
                warn!(error = %e, "{what}: JetStream did not answer; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Whether an error says a JetStream API request went unanswered (rather than
/// answered with a refusal).
fn unanswered(error: &str) -> bool {
    error.contains("timed out") || error.contains("no responders")
}

/// What a service holds after start-up.
pub struct ServiceNats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// `USYNC_OPS`.
    pub ops: jetstream::stream::Stream,
    /// `usync-snapshots`.
    pub snapshots: jetstream::object_store::ObjectStore,
}

/// What every service does first: connect (waiting up to 30 s for NATS to come up),
/// check (or create) the streams and buckets, and open the op log and snapshot store.
pub async fn connect_service(
    config: &crate::config::Config,
    name: &str,
) -> anyhow::Result<ServiceNats> {
    use anyhow::Context as _;
    let client = connect(config, name, Duration::from_secs(30)).await?;
    let js = jetstream::new(client.clone());
    prepare_layout(&js, config.layout()).await?;
    let ops = patiently("opening USYNC_OPS", || js.get_stream(OPS_STREAM))
        .await
        .context("opening USYNC_OPS")?;
    let snapshots = patiently("opening the snapshot store", || {
        js.get_object_store(SNAPSHOTS_BUCKET)
    })
    .await
    .context("opening the snapshot store")?;
    Ok(ServiceNats {
        client,
        js,
        ops,
        snapshots,
    })
}

/// The oldest nats-server ultrasync runs on: the sequencer writes batches with
/// atomic batch publish (nats-server 2.12, ADR-50).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);
/// The nats-server version the test suite runs (and compose and Helm pin).
pub const TESTED_SERVER_VERSION: &str = "2.15.1";

/// Refuses a nats-server older than [`MIN_SERVER_VERSION`], saying why. A version
/// that does not parse is let through (a development build).
pub fn check_server_version(version: &str) -> anyhow::Result<()> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (parts.next(), parts.next()) else {
        warn!(version, "nats-server version not understood; going on");
        return Ok(());
    };
    let (min_major, min_minor) = MIN_SERVER_VERSION;
    if (major, minor) < (min_major, min_minor) {
        anyhow::bail!(
            "nats-server {version} is too old: ultrasync needs {min_major}.{min_minor} or newer \
             (its sequencers write with atomic batch publish, ADR-50); the tested version is \
             {TESTED_SERVER_VERSION}"
        );
    }
    Ok(())
}

/// Parses `nats_url`: one or more URLs, comma separated (`nats://a:4222,b:4222`).
pub fn server_addrs(urls: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| anyhow::anyhow!("bad NATS URL {u:?}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if addrs.is_empty() {
        anyhow::bail!("nats_url names no server");
    }
    Ok(addrs)
}

/// Connects to NATS as the configured user, through any of the configured servers
/// (and the ones a cluster advertises), retrying for up to `patience` while NATS
/// comes up. Once connected the client reconnects forever, to any server.
pub async fn connect(
    config: &crate::config::Config,
    name: &str,
    patience: Duration,
) -> anyhow::Result<async_nats::Client> {
    let url = config.nats_url.as_str();
    let addrs = server_addrs(url)?;
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(50);
    loop {
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .subscription_capacity(64 * 1024)
            .max_reconnects(None);
        if let (Some(user), Some(password)) = (&config.nats_user, &config.nats_password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(ca) = &config.nats_tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&config.nats_tls_cert, &config.nats_tls_key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let attempt = async {
            let client = opts.connect(addrs.clone()).await?;
            tokio::time::timeout(Duration::from_secs(2), client.flush())
                .await
                .map_err(|_| anyhow::anyhow!("no answer from {url}"))??;
            anyhow::Ok(client)
        }
        .await;
        match attempt {
            Ok(client) => {
                check_server_version(&client.server_info().version)?;
                return Ok(client);
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(url, error = %e, "nats not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(anyhow::anyhow!("cannot reach nats at {url}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn servers_older_than_2_12_are_refused_with_the_reason() {
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("2.12.0-RC.3").is_ok());
        assert!(check_server_version("3.0.0").is_ok());
        assert!(check_server_version("dev").is_ok());
        let e = check_server_version("2.11.9").expect_err("2.11 is refused");
        assert!(e.to_string().contains("atomic batch publish"), "{e}");
        assert!(check_server_version("v2.10.22").is_err());
    }

    use super::*;

    #[test]
    fn subjects_round_trip() {
        let k = StreamKey::parse("acme", "web", "settings").expect("key");
        assert_eq!(ops_subject(&k), "usync.ops.acme.web.settings");
        assert_eq!(stream_key_from_subject(&ops_subject(&k)), Some(k.clone()));
        assert_eq!(stream_key_from_subject(&cmd_subject(&k)), Some(k.clone()));
        assert_eq!(stream_key_from_subject("usync.ops.a.b"), None);
        assert_eq!(stream_key_from_subject("usync.ops.a.b.c.d"), None);
        assert_eq!(stream_key_from_subject("other.ops.a.b.c"), None);
        assert_eq!(parse_cmd_subject(&cmd_subject(&k)), Some((None, k.clone())));
        assert_eq!(
            parse_cmd_subject("usync.cmdp.7.acme.web.settings"),
            Some((Some(7), k.clone()))
        );
        assert_eq!(parse_cmd_subject("usync.cmdp.x.acme.web.settings"), None);
        assert_eq!(parse_cmd_subject("usync.cmdp.7.acme.web"), None);
        assert_eq!(
            stored_cmd_filter(&cmd_subject(&k)).as_deref(),
            Some("usync.cmdp.*.acme.web.settings")
        );
        assert_eq!(stored_cmd_filter("usync.ops.acme.web.settings"), None);
    }

    #[tokio::test]
    async fn a_request_that_went_unanswered_is_asked_again_and_a_refusal_is_not() {
        let mut asked = 0;
        let got: Result<u32, String> = patiently("test", || {
            asked += 1;
            let answer = match asked {
                1 => Err("request error: timed out: request timed out".to_owned()),
                2 => Err("jetstream error: no responders".to_owned()),
                _ => Ok(7),
            };
            async move { answer }
        })
        .await;
        assert_eq!((got, asked), (Ok(7), 3));
        let mut asked = 0;
        let got: Result<u32, String> = patiently("test", || {
            asked += 1;
            async { Err("stream not found".to_owned()) }
        })
        .await;
        assert_eq!((got, asked), (Err("stream not found".to_owned()), 1));
    }
}

#[cfg(test)]
mod lines_tests {
    use super::*;

    #[test]
    fn joined_documents_split_back() {
        let docs = [
            serde_json::to_vec(&serde_json::json!({"a": "x\ny"})).expect("encodes"),
            b"{}".to_vec(),
        ];
        let body = join_lines(&docs);
        let mut h = async_nats::HeaderMap::new();
        h.insert(HDR_BATCH, "2");
        let parts = split_lines(Some(&h), &body);
        assert_eq!(parts, vec![docs[0].as_slice(), docs[1].as_slice()]);
        assert_eq!(split_lines(None, &body), vec![body.as_slice()]);
        assert_eq!(count_lines(Some(&h), &body), 2);
        assert_eq!(count_lines(None, &body), 1);
    }
}
