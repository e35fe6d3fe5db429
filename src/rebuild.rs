//! `ultrasync rebuild --verify`: rebuilds every stream key from its snapshot and the
//! log into a scratch store, with the materializer's own applier, and compares the
//! digest with the live state a materializer serves (invariant 6). Where the log
//! still starts at op 1 it also rebuilds from the log alone, which checks the
//! snapshot too. Progress goes to stderr, the report (JSON) to stdout; the exit code
//! is 3 when anything differs.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use serde_json::{Value, json};
use ultrasync_materializer::rebuild::rebuild;
use ultrasync_shared::config::Config;
use ultrasync_shared::nats::{self, OPS_STREAM, SNAPSHOTS_BUCKET};
use ultrasync_shared::{StreamKey, log, reads};

#[derive(Args)]
pub struct RebuildArgs {
    /// Compare the rebuilt state with the live one (the only mode: a rebuild never
    /// touches live data).
    #[arg(long)]
    verify: bool,
    /// Only stream keys of this org.
    #[arg(long)]
    org: Option<String>,
    /// Only stream keys of this project.
    #[arg(long)]
    project: Option<String>,
    /// Only this namespace.
    #[arg(long)]
    ns: Option<String>,
    /// Also compare with the sequencer's in-memory state (when it is at the same seq).
    #[arg(long)]
    sequencer: bool,
}

/// Some stream key's rebuilt state differs from the live one.
#[derive(Debug)]
pub struct Mismatch(pub usize);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} stream key(s) differ from their rebuild", self.0)
    }
}

impl std::error::Error for Mismatch {}

pub async fn run(config: &Config, args: RebuildArgs) -> anyhow::Result<()> {
    if !args.verify {
        anyhow::bail!(
            "rebuild only verifies: pass --verify. To rebuild a materializer, stop it, delete its data_dir and start it again: it rebuilds from snapshot + log"
        );
    }
    let client = nats::connect(config, "ultrasync-rebuild", Duration::from_secs(5)).await?;
    let js = jetstream::new(client.clone());
    let ops = js
        .get_stream(OPS_STREAM)
        .await
        .context("opening USYNC_OPS")?;
    let snapshots = js
        .get_object_store(SNAPSHOTS_BUCKET)
        .await
        .context("opening the snapshot store")?;
    let keys: Vec<StreamKey> = log::stream_keys(&ops)
        .await?
        .into_iter()
        .filter(|k| args.org.as_deref().is_none_or(|o| k.org.as_str() == o))
        .filter(|k| {
            args.project
                .as_deref()
                .is_none_or(|p| k.project.as_str() == p)
        })
        .filter(|k| args.ns.as_deref().is_none_or(|n| k.namespace.as_str() == n))
        .collect();
    let scratch = tempfile::tempdir().context("scratch folder")?;
    let mut report = Vec::new();
    let mut bad = 0;
    for (i, key) in keys.iter().enumerate() {
        let subject = nats::ops_subject(key);
        let head = log::head(&ops, &subject).await?.map_or(0, |h| h.server_seq);
        let first = log::next_at_or_after(&ops, &subject, 1)
            .await?
            .map(|e| e.server_seq);
        // The live state at (at least) the log head; the rebuild goes exactly as far.
        let live = reads::digest(&client, key, Some(head))
            .await
            .with_context(|| {
                format!("reading the live state of {key} (is a materializer running?)")
            })?;
        let to = live.last_server_seq;
        let dir = scratch.path().join(format!("{i}"));
        let rebuilt = rebuild(&ops, Some(&snapshots), key, to, &dir.join("snapshot"))
            .await
            .with_context(|| format!("rebuilding {key}"))?;
        let log_only = if first == Some(1) {
            Some(
                rebuild(&ops, None, key, to, &dir.join("log"))
                    .await
                    .with_context(|| format!("rebuilding {key} from the log"))?,
            )
        } else {
            None
        };
        let sequencer = if args.sequencer {
            reads::sequencer_digest(&client, key).await.ok()
        } else {
            None
        };
        let mut ok = rebuilt.digest == live.digest
            && log_only.as_ref().is_none_or(|l| l.digest == live.digest);
        if let Some(s) = &sequencer
            && s.last_server_seq == to
        {
            ok &= s.digest == live.digest;
        }
        if !ok {
            bad += 1;
        }
        eprintln!(
            "rebuild: {key} up to {to}: {} (snapshot {}, {} keys)",
            if ok { "ok" } else { "MISMATCH" },
            rebuilt
                .snapshot_seq
                .map_or("none".to_owned(), |s| s.to_string()),
            rebuilt.keys
        );
        report.push(json!({
            "stream_key": key.to_string(),
            "last_server_seq": to,
            "first_server_seq_in_log": first,
            "live_digest": live.digest,
            "rebuilt_digest": rebuilt.digest,
            "snapshot_seq": rebuilt.snapshot_seq,
            "log_only_digest": log_only.map(|l| l.digest),
            "sequencer": sequencer.map(|s| json!({"last_server_seq": s.last_server_seq, "digest": s.digest})),
            "keys": rebuilt.keys,
            "ok": ok,
        }));
    }
    let out: Value =
        json!({"stream_keys": report, "checked": keys.len(), "mismatches": bad, "ok": bad == 0});
    println!("{}", serde_json::to_string_pretty(&out)?);
    if bad > 0 {
        return Err(Mismatch(bad).into());
    }
    Ok(())
}
