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
/// The sequencers' shared durable consumer on `USYNC_CMDS`.
pub const SEQUENCER_CONSUMER: &str = "usync-sequencer";

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

/// Largest message either stream accepts: a frame (1 MiB) plus envelope.
pub const MAX_MSG_SIZE: i32 = 2 * 1024 * 1024;

pub fn cmd_subject(key: &StreamKey) -> String {
    format!("usync.cmd.{}.{}.{}", key.org, key.project, key.namespace)
}

pub fn ops_subject(key: &StreamKey) -> String {
    format!("usync.ops.{}.{}.{}", key.org, key.project, key.namespace)
}

pub fn presence_subject(org: &str, project: &str) -> String {
    format!("usync.presence.{org}.{project}")
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
}

impl Default for LayoutOptions {
    fn default() -> Self {
        Self {
            replicas: 1,
            mirror_of: None,
        }
    }
}

/// `USYNC_CMDS`: memory storage. A command lost before it is sequenced was never
/// acked, so the client's outbox resends it; with `sync_interval: always` a file
/// stream would cost an fsync per command for no guarantee anyone relies on.
pub fn cmds_stream_config(opts: &LayoutOptions) -> stream::Config {
    stream::Config {
        name: CMDS_STREAM.to_owned(),
        description: Some("ultrasync commands, gateway -> sequencer".to_owned()),
        subjects: vec!["usync.cmd.>".to_owned()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::Memory,
        max_bytes: 256 * 1024 * 1024,
        discard: stream::DiscardPolicy::New,
        max_message_size: MAX_MSG_SIZE,
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

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
        num_replicas: opts.replicas,
        ..Default::default()
    }
}

/// Creates or updates the streams and buckets. Safe to run from every service at
/// every start, concurrently.
pub async fn ensure_layout(js: &jetstream::Context, opts: LayoutOptions) -> anyhow::Result<()> {
    // A replica region has no command stream of its own: its gateways' commands
    // reach the home region's over the leafnode connection.
    let streams = match opts.mirror_of {
        None => vec![cmds_stream_config(&opts), ops_stream_config(&opts)],
        Some(_) => vec![ops_stream_config(&opts)],
    };
    for cfg in streams {
        let name = cfg.name.clone();
        js.create_or_update_stream(cfg)
            .await
            .map_err(|e| anyhow::anyhow!("creating stream {name}: {e}"))?;
    }
    js.create_or_update_key_value(jetstream::kv::Config {
        bucket: CURSORS_BUCKET.to_owned(),
        description: "ultrasync client cursors".to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: opts.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("creating bucket {CURSORS_BUCKET}: {e}"))?;
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
    }
    info!(replicas = opts.replicas, "nats layout ready");
    Ok(())
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
/// create or update the streams and buckets, and open the op log and snapshot store.
pub async fn connect_service(
    config: &crate::config::Config,
    name: &str,
) -> anyhow::Result<ServiceNats> {
    use anyhow::Context as _;
    let client = connect(&config.nats_url, name, Duration::from_secs(30)).await?;
    let js = jetstream::new(client.clone());
    ensure_layout(&js, config.layout()).await?;
    let ops = js
        .get_stream(OPS_STREAM)
        .await
        .context("opening USYNC_OPS")?;
    let snapshots = js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .context("opening the snapshot store")?;
    Ok(ServiceNats {
        client,
        js,
        ops,
        snapshots,
    })
}

/// Connects to NATS, retrying for up to `patience` while the server comes up.
pub async fn connect(
    url: &str,
    name: &str,
    patience: Duration,
) -> anyhow::Result<async_nats::Client> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(50);
    loop {
        let opts = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .subscription_capacity(64 * 1024);
        let attempt = async {
            let client = opts.connect(url).await?;
            tokio::time::timeout(Duration::from_secs(2), client.flush())
                .await
                .map_err(|_| anyhow::anyhow!("no answer from {url}"))??;
            anyhow::Ok(client)
        }
        .await;
        match attempt {
            Ok(client) => return Ok(client),
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
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let k = StreamKey::parse("acme", "web", "settings").expect("key");
        assert_eq!(ops_subject(&k), "usync.ops.acme.web.settings");
        assert_eq!(stream_key_from_subject(&ops_subject(&k)), Some(k.clone()));
        assert_eq!(stream_key_from_subject(&cmd_subject(&k)), Some(k));
        assert_eq!(stream_key_from_subject("usync.ops.a.b"), None);
        assert_eq!(stream_key_from_subject("usync.ops.a.b.c.d"), None);
        assert_eq!(stream_key_from_subject("other.ops.a.b.c"), None);
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
    }
}
