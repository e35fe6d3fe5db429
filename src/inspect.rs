//! `ultrasync inspect`: read-only admin views of what is stored, as JSON.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Subcommand;
use futures::TryStreamExt;
use serde_json::{Value, json};
use ultrasync_shared::config::Config;
use ultrasync_shared::nats::{self, CMDS_STREAM, CURSORS_BUCKET, OPS_STREAM, SNAPSHOTS_BUCKET};
use ultrasync_shared::{StreamKey, log, reads, snapshot};

#[derive(Subcommand)]
pub enum Inspect {
    /// The NATS resources of ultrasync with message counts, and every stream key's head.
    Streams,
    /// Every client's cursor with its lag behind the head and when it was last seen.
    Cursors {
        /// Clients unseen this long are marked expired (default: the compactor's TTL).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// A stream key's live state as a materializer holds it (or one key of it).
    State {
        #[arg(long)]
        org: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        ns: String,
        /// Only this key.
        #[arg(long)]
        key: Option<String>,
    },
    /// The partitions of `USYNC_CMDS`: which sequencer instance holds each (lease),
    /// its queue (waiting, in flight, redelivered) and the instances' counters.
    Partitions {
        /// Prometheus text instead of JSON (per-partition gauges and counters).
        #[arg(long)]
        prometheus: bool,
    },
    /// A stream key's stored snapshot (state, versions, digest, op count).
    Snapshot {
        #[arg(long)]
        org: String,
        #[arg(long)]
        project: String,
        #[arg(long)]
        ns: String,
    },
}

pub async fn run(config: &Config, what: Inspect) -> anyhow::Result<()> {
    let client = nats::connect(config, "ultrasync-inspect", Duration::from_secs(5)).await?;
    let js = jetstream::new(client);
    let out = match what {
        Inspect::Streams => streams(&js).await?,
        Inspect::Partitions { prometheus } => {
            let out = partitions(&js).await?;
            if prometheus {
                print!("{}", partitions_prometheus(&out));
                return Ok(());
            }
            out
        }
        Inspect::Cursors { ttl_secs } => {
            cursors(&js, ttl_secs.unwrap_or(config.compactor.cursor_ttl_secs)).await?
        }
        Inspect::State {
            org,
            project,
            ns,
            key,
        } => {
            let stream_key = StreamKey::parse(&org, &project, &ns)?;
            let client = js.client();
            match key {
                Some(k) => {
                    let r = reads::key(&client, &stream_key, &k, None)
                        .await
                        .with_context(|| format!("reading {k} of {stream_key}"))?;
                    json!({
                        "stream_key": stream_key.to_string(),
                        "key": k,
                        "last_server_seq": r.last_server_seq,
                        "exists": r.value.is_some(),
                        "value": r.value,
                        "version": r.version,
                        "heads": r.heads,
                    })
                }
                None => {
                    let s = reads::snapshot(&client, &stream_key, &Default::default())
                        .await
                        .with_context(|| format!("reading the state of {stream_key}"))?;
                    snapshot_json(&s)
                }
            }
        }
        Inspect::Snapshot { org, project, ns } => {
            let key = StreamKey::parse(&org, &project, &ns)?;
            let store = js
                .get_object_store(SNAPSHOTS_BUCKET)
                .await
                .context("opening the snapshot store")?;
            match snapshot::fetch(&store, &key).await? {
                None => anyhow::bail!("no snapshot of {key}"),
                Some(s) => snapshot_json(&s),
            }
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn cursors(js: &jetstream::Context, ttl_secs: u64) -> anyhow::Result<Value> {
    let ops = js
        .get_stream(OPS_STREAM)
        .await
        .context("opening USYNC_OPS")?;
    let now = ultrasync_shared::cursors::now_ms();
    let mut out = Vec::new();
    for (key, clients) in ultrasync_compactor::read_cursors(js).await? {
        let head = log::head(&ops, &nats::ops_subject(&key))
            .await?
            .map_or(0, |h| h.server_seq);
        for (client_id, c) in clients {
            let seen = now.saturating_sub(c.seen_at_ms) / 1000;
            out.push(json!({
                "stream_key": key.to_string(),
                "client_id": client_id,
                "server_seq": c.server_seq,
                "head": head,
                "lag": head.saturating_sub(c.server_seq),
                "seen_secs_ago": seen,
                "live": seen <= ttl_secs,
            }));
        }
    }
    Ok(json!({"cursors": out, "ttl_secs": ttl_secs}))
}

fn snapshot_json(s: &snapshot::Snapshot) -> Value {
    json!({
        "stream_key": s.stream_key,
        "last_server_seq": s.state.last_seq,
        "head_stream_seq": s.head_stream_seq,
        "digest": s.digest(),
        "commands": s.commands.len() + s.op_ids.len(),
        "state": s.state.keys.iter().map(|(k, e)| {
            (k.clone(), json!({"value": e.value, "version": e.version, "heads": e.heads()}))
        }).collect::<serde_json::Map<String, Value>>(),
    })
}

fn state_json(info: &jetstream::stream::Info) -> Value {
    let s = &info.state;
    // Where the stream is stored: its replica count, and on a cluster the RAFT
    // leader and each follower's state (a follower that is not current is behind).
    let cluster = info.cluster.as_ref().map(|c| {
        json!({
            "leader": c.leader,
            "followers": c.replicas.iter().map(|p| json!({
                "name": p.name,
                "current": p.current,
                "offline": p.offline,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "replicas": info.config.num_replicas,
        "cluster": cluster,
        "messages": s.messages,
        "bytes": s.bytes,
        "first_seq": s.first_sequence,
        "last_seq": s.last_sequence,
        "consumers": s.consumer_count,
        "subjects": s.subjects_count,
    })
}

async fn streams(js: &jetstream::Context) -> anyhow::Result<Value> {
    let mut resources = serde_json::Map::new();
    for (label, stream) in [
        ("USYNC_CMDS", CMDS_STREAM.to_owned()),
        ("USYNC_OPS", OPS_STREAM.to_owned()),
        (CURSORS_BUCKET, format!("KV_{CURSORS_BUCKET}")),
        (SNAPSHOTS_BUCKET, format!("OBJ_{SNAPSHOTS_BUCKET}")),
    ] {
        let value = match js.get_stream(&stream).await {
            Ok(mut s) => state_json(s.info().await?),
            Err(_) => json!({"missing": true}),
        };
        resources.insert(label.to_owned(), value);
    }
    // Every stream key in the op log, with its head.
    let ops = js
        .get_stream(OPS_STREAM)
        .await
        .context("opening USYNC_OPS")?;
    let subjects: Vec<(String, usize)> = ops
        .info_with_subjects("usync.ops.>")
        .await?
        .try_collect()
        .await?;
    let mut keys = Vec::new();
    for (subject, messages) in subjects {
        let head = log::head(&ops, &subject).await?;
        let first = log::next_at_or_after(&ops, &subject, 1).await?;
        keys.push(json!({
            "stream_key": nats::stream_key_from_subject(&subject).map(|k| k.to_string()),
            "subject": subject,
            "messages": messages,
            "first_server_seq": first.map(|e| e.server_seq),
            "head_server_seq": head.map(|h| h.server_seq),
        }));
    }
    keys.sort_by(|a, b| a["subject"].as_str().cmp(&b["subject"].as_str()));
    Ok(json!({"resources": resources, "stream_keys": keys}))
}

/// Leases, heartbeats and consumer state of every partition.
async fn partitions(js: &jetstream::Context) -> anyhow::Result<Value> {
    use ultrasync_sequencer::{Heartbeat, Lease};
    let mut cmds = js
        .get_stream(CMDS_STREAM)
        .await
        .context("opening USYNC_CMDS")?;
    let info = cmds.info().await?.clone();
    let count = nats::partitions_of(&info.config);
    let mut leases = std::collections::BTreeMap::new();
    let mut instances = Vec::new();
    if let Ok(kv) = js.get_key_value(nats::LEASES_BUCKET).await {
        let keys: Vec<String> = kv.keys().await?.try_collect().await?;
        for k in keys {
            let Some(entry) = kv.get(&k).await? else {
                continue;
            };
            if let Some(p) = k.strip_prefix("p.").and_then(|p| p.parse::<u32>().ok()) {
                if let Ok(lease) = serde_json::from_slice::<Lease>(&entry) {
                    leases.insert(p, lease);
                }
            } else if k.starts_with("i.")
                && let Ok(beat) = serde_json::from_slice::<Heartbeat>(&entry)
            {
                instances.push(beat);
            }
        }
    }
    let stats_of = |p: u32| {
        instances.iter().find_map(|i| {
            i.partitions
                .get(&p)
                .map(|s| (i.instance.clone(), s.clone()))
        })
    };
    let mut parts = Vec::new();
    for p in 0..count.unwrap_or(0) {
        let consumer = cmds.consumer_info(nats::partition_consumer(p)).await.ok();
        let lease = leases.get(&p);
        let reported = stats_of(p);
        parts.push(json!({
            "partition": p,
            "owner": lease.map(|l| l.instance.clone()),
            "owner_since_ms": lease.map(|l| l.since_ms),
            "waiting": consumer.as_ref().map(|c| c.num_pending),
            "in_flight": consumer.as_ref().map(|c| c.num_ack_pending),
            "redelivered": consumer.as_ref().map(|c| c.num_redelivered),
            "lag": consumer.as_ref().map(|c| c.num_pending + c.num_ack_pending as u64),
            "commands": reported.as_ref().map(|(_, s)| s.commands),
            "pushed_back": reported.as_ref().map(|(_, s)| s.pushed_back),
            "workers": reported.as_ref().map(|(_, s)| s.workers),
        }));
    }
    let unpartitioned = cmds
        .consumer_info(nats::SEQUENCER_CONSUMER)
        .await
        .ok()
        .map(|c| {
            json!({
                "consumer": nats::SEQUENCER_CONSUMER,
                "filter": c.config.filter_subject,
                "waiting": c.num_pending,
                "in_flight": c.num_ack_pending,
            })
        });
    let instances: Vec<Value> = instances
        .iter()
        .map(|i| {
            json!({
                "instance": i.instance,
                "pid": i.pid,
                "partitions": i.partitions.keys().collect::<Vec<_>>(),
                "draining_unpartitioned": i.unpartitioned.is_some(),
            })
        })
        .collect();
    let lease_ttl_ms = match js.get_key_value(nats::LEASES_BUCKET).await {
        Ok(kv) => kv
            .status()
            .await
            .ok()
            .map(|s| s.max_age().as_millis() as u64),
        Err(_) => None,
    };
    Ok(json!({
        "partitions": count,
        "lease_ttl_ms": lease_ttl_ms,
        "instances": instances,
        "by_partition": parts,
        "unpartitioned_consumer": unpartitioned,
    }))
}

/// [`partitions`] as Prometheus text (0.0.4), names `ultrasync_inspect_partition_*`.
fn partitions_prometheus(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let metrics = [
        (
            "waiting",
            "gauge",
            "Commands waiting in the partition's consumer",
        ),
        (
            "in_flight",
            "gauge",
            "Commands taken by a sequencer, not yet acked",
        ),
        (
            "redelivered",
            "gauge",
            "Commands delivered more than once, not yet acked",
        ),
        (
            "commands_total",
            "counter",
            "Commands the owning instance took from the partition",
        ),
        (
            "pushed_back_total",
            "counter",
            "Commands handed back because their stream key's queue was full",
        ),
        (
            "workers",
            "gauge",
            "Stream keys with a live worker on the owning instance",
        ),
    ];
    let parts = v["by_partition"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "# HELP ultrasync_inspect_partition_owned 1 for the instance holding the partition's lease"
    );
    let _ = writeln!(out, "# TYPE ultrasync_inspect_partition_owned gauge");
    for p in &parts {
        if let Some(owner) = p["owner"].as_str() {
            let _ = writeln!(
                out,
                "ultrasync_inspect_partition_owned{{partition=\"{}\",instance=\"{owner}\"}} 1",
                p["partition"]
            );
        }
    }
    for (name, kind, help) in metrics {
        let _ = writeln!(out, "# HELP ultrasync_inspect_partition_{name} {help}");
        let _ = writeln!(out, "# TYPE ultrasync_inspect_partition_{name} {kind}");
        // A counter's field is its name without `_total`.
        let field = name.trim_end_matches("_total");
        for p in &parts {
            if let Some(n) = p[field].as_u64() {
                let _ = writeln!(
                    out,
                    "ultrasync_inspect_partition_{name}{{partition=\"{}\"}} {n}",
                    p["partition"]
                );
            }
        }
    }
    out
}
