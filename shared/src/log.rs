//! Reading the op log. Each op is one message on `usync.ops.{org}.{project}.{ns}` with
//! headers `Usync-Seq` (its `server_seq`) and `Usync-Op-Id`. `server_seq` is dense per
//! subject but the stream sequence is shared by all subjects, so finding where
//! `server_seq = N` sits takes a binary search over the stream sequence using the
//! leader-routed "next message on subject from sequence S" lookup: O(log stream size)
//! small requests, independent of how long the subject's history is.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use futures::StreamExt;
use tracing::debug;

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

/// The server removes a reader's consumer this long after its last pull request
/// ended: what a reader that started over (or was dropped) leaves behind goes away
/// by itself.
const READER_INACTIVE: Duration = Duration::from_secs(30);
/// Messages asked for by one pull (capped by `max_batch`).
const READER_BATCH: usize = 500;
/// How long one pull waits for messages, and the idle heartbeat the server sends
/// meanwhile (two missed: the reader starts over).
const READER_EXPIRES: Duration = Duration::from_secs(30);
const READER_HEARTBEAT: Duration = Duration::from_secs(15);
/// Start-overs in a row without a message read before the last error is surfaced.
const READER_MAX_RESTARTS: u32 = 10;
/// Longest wait between two start-overs in a row.
const READER_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// An ordered reader of one subject that never deletes a consumer. It reads with an
/// ephemeral pull consumer (no ack, one replica, memory storage, as async-nats'
/// ordered consumer) and keeps the stream sequence of the last op it yielded; on a
/// gap in the consumer sequence, missed heartbeats, the consumer gone (a node
/// failed, the server restarted) or any other pull error it makes a new consumer
/// from the next stream sequence and leaves the old one to the server, which removes
/// it after [`READER_INACTIVE`]. (async-nats' ordered consumer deletes the old one
/// first: the shipped users may not delete consumers on `USYNC_OPS`, so that
/// request is refused, logged as a permission violation and waited out.)
struct Reader {
    stream: Stream,
    subject: String,
    max_batch: i64,
    /// The stream sequence the next op must be at or after.
    next: u64,
    messages: Option<pull::Stream>,
    /// Consumer sequence of the last message of the current consumer.
    delivered: u64,
    /// Start-overs since the last op yielded.
    restarts: u32,
    /// A pull was refused for the consumer's request limits since the last op.
    limit_exceeded: bool,
    /// An error was surfaced: the stream has ended.
    done: bool,
}

impl Reader {
    /// A new consumer from `self.next`.
    async fn open(&mut self) -> Result<(), LogError> {
        let consumer = self
            .stream
            .create_consumer(pull::Config {
                durable_name: None,
                name: None,
                filter_subject: self.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.next,
                },
                ack_policy: AckPolicy::None,
                max_deliver: 1,
                max_ack_pending: 0,
                max_batch: self.max_batch,
                inactive_threshold: READER_INACTIVE,
                num_replicas: 1,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        let batch = match usize::try_from(self.max_batch) {
            Ok(m) if m > 0 => READER_BATCH.min(m),
            _ => READER_BATCH,
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .expires(READER_EXPIRES)
            .heartbeat(READER_HEARTBEAT)
            .messages()
            .await
            .map_err(nats_err)?;
        self.messages = Some(messages);
        self.delivered = 0;
        Ok(())
    }

    /// Drops the current consumer (not deleted: it expires) and opens a new one
    /// from `self.next`, waiting longer between start-overs that bring nothing.
    /// Gives up with `why` or the last error after [`READER_MAX_RESTARTS`].
    async fn start_over(&mut self, why: LogError) -> Result<(), LogError> {
        self.messages = None;
        let mut last = why;
        loop {
            if self.restarts >= READER_MAX_RESTARTS {
                return Err(last);
            }
            if self.restarts > 0 {
                let wait = Duration::from_millis(50)
                    .saturating_mul(1 << self.restarts.min(8))
                    .min(READER_MAX_BACKOFF);
                tokio::time::sleep(wait).await;
            }
            self.restarts += 1;
            debug!(subject = %self.subject, from = self.next, attempt = self.restarts, reason = %last, "op log reader starts over");
            match self.open().await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
    }

    async fn next_entry(&mut self) -> Option<Result<LogEntry, LogError>> {
        while !self.done {
            let why = match self.messages.as_mut() {
                None => LogError::Nats("no consumer".to_owned()),
                Some(messages) => match messages.next().await {
                    Some(Ok(m)) => match m.info() {
                        Ok(info) if info.consumer_sequence != self.delivered + 1 => {
                            LogError::Nats(format!(
                                "consumer sequence {} after {}",
                                info.consumer_sequence, self.delivered
                            ))
                        }
                        Ok(info) => {
                            self.delivered = info.consumer_sequence;
                            if info.stream_sequence < self.next {
                                // Already yielded (cannot happen with a new consumer
                                // from `next`; kept out all the same).
                                continue;
                            }
                            self.next = info.stream_sequence + 1;
                            self.restarts = 0;
                            self.limit_exceeded = false;
                            return Some(LogEntry::from_consumer_message(&m));
                        }
                        Err(e) => nats_err(e),
                    },
                    Some(Err(e)) => {
                        // A new consumer reads the current limits; refused twice
                        // in a row, starting over does not help.
                        if e.kind() == pull::MessagesErrorKind::RequestLimitExceeded {
                            if self.limit_exceeded {
                                self.done = true;
                                return Some(Err(nats_err(e)));
                            }
                            self.limit_exceeded = true;
                        }
                        nats_err(e)
                    }
                    None => LogError::Nats("the consumer's messages ended".to_owned()),
                },
            };
            if let Err(e) = self.start_over(why).await {
                self.done = true;
                return Some(Err(e));
            }
        }
        None
    }
}

/// Reads ops on `subject` from stream sequence `start` onward, in order, with an
/// ephemeral consumer that is replaced (never deleted) when it fails ([`Reader`]).
/// The stream ends only on error (after the reader could not start over); callers
/// stop when they have read what they need.
pub async fn read_from(
    stream: &Stream,
    subject: &str,
    start: u64,
) -> Result<impl futures::Stream<Item = Result<LogEntry, LogError>> + Send + use<>, LogError> {
    read_from_batched(stream, subject, start, 0).await
}

/// [`read_from`], pulling at most `max_batch` messages at a time (0: the reader's
/// default, hundreds): a reader that stops early then has at most that many
/// messages buffered, not hundreds of large ops.
async fn read_from_batched(
    stream: &Stream,
    subject: &str,
    start: u64,
    max_batch: i64,
) -> Result<impl futures::Stream<Item = Result<LogEntry, LogError>> + Send + use<>, LogError> {
    let mut reader = Reader {
        stream: stream.clone(),
        subject: subject.to_owned(),
        max_batch,
        next: start.max(1),
        messages: None,
        delivered: 0,
        restarts: 0,
        limit_exceeded: false,
        done: false,
    };
    reader.open().await?;
    Ok(futures::stream::unfold(reader, |mut r| async move {
        r.next_entry().await.map(|item| (item, r))
    }))
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
