//! Rebuilding a stream key's state from its snapshot and the log into a scratch
//! store, with the same applier the materializer runs: `ultrasync rebuild --verify`
//! compares the result with the live state (invariant 6).

use std::path::Path;
use std::sync::Arc;

use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::stream::Stream;
use ultrasync_shared::{StreamKey, log, nats, snapshot, state};

use crate::store::{Applier, Store};

/// A rebuilt state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub last_seq: u64,
    pub digest: String,
    pub keys: usize,
    /// `last_server_seq` of the snapshot it started from, if it used one.
    pub snapshot_seq: Option<u64>,
}

/// Rebuilds `key` up to `server_seq` `to` in a fresh store under `dir`. With
/// `snapshots`, starts from the stored snapshot when it is sound, not past `to`, and
/// the log continues after it; otherwise replays the log from its first op (which
/// must be op 1).
pub async fn rebuild(
    ops: &Stream,
    snapshots: Option<&ObjectStore>,
    key: &StreamKey,
    to: u64,
    dir: &Path,
) -> anyhow::Result<Rebuilt> {
    let owned_dir = dir.to_path_buf();
    let store = Arc::new(tokio::task::spawn_blocking(move || Store::open(&owned_dir)).await??);
    let mut applier = Applier::new(store.clone());
    let mut snapshot_seq = None;
    if let Some(objects) = snapshots {
        match snapshot::fetch(objects, key).await {
            Ok(Some(s)) if s.state.last_seq <= to && continues(ops, key, &s, to).await? => {
                snapshot_seq = Some(s.state.last_seq);
                applier.install(key, &s)?;
            }
            Ok(_) => {}
            Err(snapshot::FetchError::Refused(why)) => {
                tracing::warn!(stream_key = %key, %why, "the stored snapshot is damaged; rebuilding from the log alone");
            }
            Err(e) => return Err(e.into()),
        }
    }
    // No snapshot past what the log holds: a rebuild is the log's word.
    crate::fill(&mut applier, ops, &[], key, to, 0).await?;
    let s = store.snapshot(key)?;
    anyhow::ensure!(
        s.state.last_seq == to,
        "the log of {key} ends at {}, not {to}",
        s.state.last_seq
    );
    Ok(Rebuilt {
        last_seq: s.state.last_seq,
        digest: state::digest(&s.state),
        keys: s.state.keys.len(),
        snapshot_seq,
    })
}

/// Whether the log goes on right after `s` (or `s` is at `to`).
async fn continues(
    ops: &Stream,
    key: &StreamKey,
    s: &snapshot::Snapshot,
    to: u64,
) -> anyhow::Result<bool> {
    if s.state.last_seq == to {
        return Ok(true);
    }
    Ok(log::continues_after(
        ops,
        &nats::ops_subject(key),
        s.head_stream_seq,
        s.state.last_seq,
    )
    .await?)
}
