//! Before ops are purged, the commands that made them are written to KV
//! `usync-commands` (see [`ultrasync_shared::nats::COMMANDS_BUCKET`]): sequencers then
//! keep only the commands of ops still in the log in memory, and still recognise a
//! retry of a compacted op (`stale_base` naming its `server_seq`) or its command id
//! used for another body (`invalid_message`).

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt as _;
use ultrasync_shared::StreamKey;
use ultrasync_shared::log;
use ultrasync_shared::nats::command_kv_key;
use ultrasync_shared::op::command_key_hex;

/// Log bytes read per round while writing a range's commands.
const READ_BYTES: usize = 4 * 1024 * 1024;
/// KV writes in flight at once.
const IN_FLIGHT: usize = 64;

/// The value stored for a command: `{server_seq} {op_id}`.
pub fn encode(server_seq: u64, op_id: &str) -> String {
    format!("{server_seq} {op_id}")
}

/// Writes the commands of `key`'s ops `from..=to` (`subject` in `ops`) to `kv`.
/// Returns how many were written.
pub async fn remember(
    ops: &jetstream::stream::Stream,
    kv: &jetstream::kv::Store,
    key: &StreamKey,
    subject: &str,
    from: u64,
    to: u64,
) -> anyhow::Result<u64> {
    let mut next = from;
    let mut written = 0;
    while next <= to {
        let entries = log::read_range_limited(ops, subject, next, to, READ_BYTES)
            .await
            .with_context(|| format!("reading ops {next}..={to} of {key}"))?;
        let Some(last) = entries.last().map(|e| e.server_seq) else {
            break;
        };
        let puts: Vec<(String, String)> = entries
            .iter()
            .map(|e| {
                let op = e
                    .op()
                    .with_context(|| format!("op {} of {key} does not decode", e.server_seq))?;
                Ok((
                    command_kv_key(key, &command_key_hex(&op.actor_id, &op.command_id)),
                    encode(e.server_seq, &e.op_id),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(puts)
            .map(|(k, v)| async move {
                kv.put(&k, v.into_bytes().into())
                    .await
                    .map(|_| ())
                    .with_context(|| format!("remembering command {k}"))
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for r in results {
            r?;
        }
        written += entries.len() as u64;
        next = last + 1;
    }
    Ok(written)
}
