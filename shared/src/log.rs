//! Reading the op log. Each op is one message on `usync.ops.{org}.{project}.{ns}` with
//! headers `Usync-Seq` (its `server_seq`) and `Usync-Op-Id`. `server_seq` is dense per
//! subject but the stream sequence is shared by all subjects, so finding where
//! `server_seq = N` sits takes a binary search over the stream sequence using the
//! leader-routed "next message on subject from sequence S" lookup: O(log stream size)
//! small requests, independent of how long the subject's history is.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::nats::{HDR_OP_ID, HDR_SEQ};

/// The newest op on a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// JetStream stream sequence of the newest op (the value for
    /// `Nats-Expected-Last-Subject-Sequence`).
    pub stream_seq: u64,
    /// Its `server_seq`.
    pub server_seq: u64,
}

/// One op as read from the log, payload still encoded.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub stream_seq: u64,
    pub server_seq: u64,
    pub op_id: String,
    /// The op's JSON, as stored.
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("op log message {stream_seq} lacks a valid {HDR_SEQ} header")]
    MissingSeq { stream_seq: u64 },
}

fn nats_err(e: impl std::fmt::Display) -> LogError {
    LogError::Nats(e.to_string())
}

fn header_seq(headers: Option<&async_nats::HeaderMap>, stream_seq: u64) -> Result<u64, LogError> {
    headers
        .and_then(|h| h.get(HDR_SEQ))
        .and_then(|v| v.as_str().parse().ok())
        .ok_or(LogError::MissingSeq { stream_seq })
}

fn header_op_id(headers: Option<&async_nats::HeaderMap>) -> String {
    headers
        .and_then(|h| h.get(HDR_OP_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

impl LogEntry {
    pub fn from_stream_message(m: &StreamMessage) -> Result<Self, LogError> {
        Ok(Self {
            stream_seq: m.sequence,
            server_seq: header_seq(Some(&m.headers), m.sequence)?,
            op_id: header_op_id(Some(&m.headers)),
            payload: m.payload.clone(),
        })
    }

    pub fn from_consumer_message(m: &async_nats::jetstream::Message) -> Result<Self, LogError> {
        let stream_seq = m.info().map_err(nats_err)?.stream_sequence;
        Ok(Self {
            stream_seq,
            server_seq: header_seq(m.headers.as_ref(), stream_seq)?,
            op_id: header_op_id(m.headers.as_ref()),
            payload: m.payload.clone(),
        })
    }

    /// Decodes the op.
    pub fn op(&self) -> Result<crate::Op, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// The newest op on `subject`, read from the stream leader; `None` when the subject is
/// empty (never written, or purged entirely).
pub async fn head(stream: &Stream, subject: &str) -> Result<Option<Head>, LogError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(Some(Head {
            stream_seq: m.sequence,
            server_seq: header_seq(Some(&m.headers), m.sequence)?,
        })),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(nats_err(e)),
    }
}

/// The first op on `subject` at stream sequence `from_stream_seq` or later.
pub async fn next_at_or_after(
    stream: &Stream,
    subject: &str,
    from_stream_seq: u64,
) -> Result<Option<LogEntry>, LogError> {
    let res = stream
        .raw_message_builder()
        .sequence(from_stream_seq.max(1))
        .next_by_subject(subject.to_owned())
        .send()
        .await;
    match res {
        Ok(m) => Ok(Some(LogEntry::from_stream_message(&m)?)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(nats_err(e)),
    }
}

/// The stream sequence of the first op on `subject` whose `server_seq >= from`, or
/// `None` when there is none (the subject ends before `from`). When `from` lies
/// below the oldest op still in the log (compacted), the oldest op is returned: the
/// caller compares its `server_seq` with what it asked for.
pub async fn locate(
    stream: &Stream,
    subject: &str,
    from: u64,
) -> Result<Option<LogEntry>, LogError> {
    match head(stream, subject).await? {
        Some(h) => locate_below(stream, subject, from, h).await,
        None => Ok(None),
    }
}

/// [`locate`] with the subject's head already known.
pub async fn locate_below(
    stream: &Stream,
    subject: &str,
    from: u64,
    head: Head,
) -> Result<Option<LogEntry>, LogError> {
    if head.server_seq < from {
        return Ok(None);
    }
    // Invariant: the answer's stream sequence is in [lo, hi].
    let mut lo = 1u64;
    let mut hi = head.stream_seq;
    // Dense server_seq: the op `from` sits at least (head.server_seq - from) messages
    // before the head, which bounds it from above.
    hi = hi.saturating_sub(head.server_seq - from).max(lo);
    let mut best: Option<LogEntry> = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match next_at_or_after(stream, subject, mid).await? {
            Some(e) if e.server_seq >= from => {
                hi = e.stream_seq.min(mid).saturating_sub(1);
                let done = e.server_seq == from;
                best = Some(e);
                if done || hi < lo {
                    break;
                }
            }
            Some(e) => lo = e.stream_seq + 1,
            None => {
                if mid == 0 {
                    break;
                }
                hi = mid - 1;
            }
        }
    }
    match best {
        Some(e) => Ok(Some(e)),
        // Nothing found under the bound: read forward from it (cannot normally happen).
        None => next_at_or_after(stream, subject, lo).await,
    }
}

/// Reads ops on `subject` from stream sequence `start` onward with an ordered
/// consumer, in order. The stream ends only on error; callers stop when they have
/// read what they need.
pub async fn read_from(
    stream: &Stream,
    subject: &str,
    start: u64,
) -> Result<impl futures::Stream<Item = Result<LogEntry, LogError>> + Send + use<>, LogError> {
    read_from_batched(stream, subject, start, 0).await
}

/// [`read_from`], pulling at most `max_batch` messages at a time (0: the client's
/// default, hundreds): a reader that stops early then has at most that many
/// messages buffered, not hundreds of large ops.
async fn read_from_batched(
    stream: &Stream,
    subject: &str,
    start: u64,
    max_batch: i64,
) -> Result<impl futures::Stream<Item = Result<LogEntry, LogError>> + Send + use<>, LogError> {
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            max_batch,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let messages = consumer.messages().await.map_err(nats_err)?;
    Ok(messages
        .map_err(nats_err)
        .and_then(|m| async move { LogEntry::from_consumer_message(&m) }))
}

/// Reads ops `from..=to` (by `server_seq`) on `subject`; `to` is capped at the
/// subject's head. Returns fewer when the log does not hold them all: the caller
/// checks the first `server_seq` (compaction) and the count.
pub async fn read_range(
    stream: &Stream,
    subject: &str,
    from: u64,
    to: u64,
) -> Result<Vec<LogEntry>, LogError> {
    read_range_limited(stream, subject, from, to, usize::MAX).await
}

/// [`read_range`], stopping once the payloads read reach `max_bytes` (at least one
/// entry is returned when there is one): what a reader holds stays bounded however
/// large the ops are. The caller continues after the last entry it got.
pub async fn read_range_limited(
    stream: &Stream,
    subject: &str,
    from: u64,
    to: u64,
    max_bytes: usize,
) -> Result<Vec<LogEntry>, LogError> {
    let Some(head) = head(stream, subject).await? else {
        return Ok(Vec::new());
    };
    let to = to.min(head.server_seq);
    if to < from {
        return Ok(Vec::new());
    }
    let Some(first) = locate_below(stream, subject, from, head).await? else {
        return Ok(Vec::new());
    };
    if first.server_seq > to {
        return Ok(Vec::new());
    }
    let want = (to - first.server_seq + 1) as usize;
    let mut out = Vec::with_capacity(want.min(64 * 1024));
    // Few ops: leader-routed lookups, no consumer to create.
    if want <= 8 {
        let mut next = first.stream_seq + 1;
        let last_seq = first.server_seq;
        out.push(first);
        let mut at = last_seq;
        while at < to {
            match next_at_or_after(stream, subject, next).await? {
                Some(e) => {
                    next = e.stream_seq + 1;
                    at = e.server_seq;
                    out.push(e);
                }
                None => break,
            }
        }
        return Ok(out);
    }
    let mut bytes = 0;
    // Pulls sized for the budget, taking ops of 64 KiB as the usual worst case (a
    // pull of larger ops overshoots by a few messages; the client may have the next
    // pull in flight too).
    let max_batch = match max_bytes {
        usize::MAX => 0,
        b => (b / (64 * 1024)).clamp(4, 500) as i64,
    };
    let mut entries =
        Box::pin(read_from_batched(stream, subject, first.stream_seq, max_batch).await?);
    while let Some(e) = entries.next().await {
        let e = e?;
        let done = e.server_seq >= to;
        bytes += e.payload.len();
        out.push(e);
        if done || bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// Every stream key with ops in the log (`usync.ops.>` subjects), sorted.
pub async fn stream_keys(stream: &Stream) -> Result<Vec<crate::StreamKey>, LogError> {
    use futures::TryStreamExt as _;
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects("usync.ops.>")
        .await
        .map_err(nats_err)?
        .try_collect()
        .await
        .map_err(nats_err)?;
    let mut keys: Vec<crate::StreamKey> = subjects
        .iter()
        .filter_map(|(s, _)| crate::nats::stream_key_from_subject(s))
        .collect();
    keys.sort();
    Ok(keys)
}
