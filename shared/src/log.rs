//! Reading the op log. Ops live on `usync.ops.{org}.{project}.{ns}`; a message carries
//! one op, or several consecutive ops of its stream key (one durable write): header
//! `Usync-Seq` is the `server_seq` of its first op, `Usync-Op-Id` that op's id, and
//! `Usync-Batch: n` (absent: 1) says how many ops the body holds, one JSON document
//! per line, numbered `Usync-Seq`, `Usync-Seq + 1`, ... Readers see ops
//! ([`LogEntry`]): the ops of one message share its stream sequence.
//!
//! `server_seq` is dense per subject but the stream sequence is shared by all
//! subjects, so finding where `server_seq = N` sits takes a binary search over the
//! stream sequence using the leader-routed "next message on subject from sequence S"
//! lookup: O(log stream size) small requests, independent of how long the subject's
//! history is.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bytes::Bytes;
use futures::StreamExt;
use tracing::debug;

use crate::nats::{HDR_BATCH, HDR_OP_ID, HDR_SEQ};

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
    /// Stream sequence of the message that carries the op (shared by every op of
    /// that message).
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
    #[error("op log message {stream_seq} says it carries {said} ops but holds {held}")]
    BadBatch {
        stream_seq: u64,
        said: usize,
        held: usize,
    },
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

/// How many ops a log message carries (`Usync-Batch`, absent: 1).
fn header_count(headers: Option<&async_nats::HeaderMap>) -> usize {
    headers
        .and_then(|h| h.get(HDR_BATCH))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn header_op_id(headers: Option<&async_nats::HeaderMap>) -> String {
    headers
        .and_then(|h| h.get(HDR_OP_ID))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// The `op_id` of an op's JSON. The sequencer writes it first (`{"op_id":"...",`),
/// so it is read without parsing the op; anything else is parsed.
fn op_id_of(json: &[u8]) -> String {
    const LEAD: &[u8] = br#"{"op_id":""#;
    if let Some(rest) = json.strip_prefix(LEAD)
        && let Some(end) = rest.iter().position(|b| *b == b'"' || *b == b'\\')
        && rest[end] == b'"'
        && let Ok(id) = std::str::from_utf8(&rest[..end])
    {
        return id.to_owned();
    }
    #[derive(serde::Deserialize)]
    struct OpId {
        #[serde(default)]
        op_id: String,
    }
    serde_json::from_slice::<OpId>(json)
        .map(|o| o.op_id)
        .unwrap_or_default()
}

/// The ops of one log message (stream sequence `stream_seq`), in order.
pub fn entries(
    stream_seq: u64,
    headers: Option<&async_nats::HeaderMap>,
    payload: &Bytes,
) -> Result<Vec<LogEntry>, LogError> {
    let first = header_seq(headers, stream_seq)?;
    let count = header_count(headers);
    if count == 1 {
        return Ok(vec![LogEntry {
            stream_seq,
            server_seq: first,
            op_id: header_op_id(headers),
            payload: payload.clone(),
        }]);
    }
    let held = payload.split(|b| *b == b'\n').count();
    if held != count {
        return Err(LogError::BadBatch {
            stream_seq,
            said: count,
            held,
        });
    }
    let mut out = Vec::with_capacity(count);
    let mut start = 0usize;
    for (i, line) in payload.split(|b| *b == b'\n').enumerate() {
        let end = start + line.len();
        out.push(LogEntry {
            stream_seq,
            server_seq: first + i as u64,
            op_id: match i {
                0 => header_op_id(headers),
                _ => op_id_of(line),
            },
            payload: payload.slice(start..end),
        });
        start = end + 1;
    }
    Ok(out)
}

/// The ops of a message read with a direct or leader-routed get.
pub fn stream_message_entries(m: &StreamMessage) -> Result<Vec<LogEntry>, LogError> {
    entries(m.sequence, Some(&m.headers), &m.payload)
}

/// The ops of a message delivered by a consumer.
pub fn consumer_message_entries(
    m: &async_nats::jetstream::Message,
) -> Result<Vec<LogEntry>, LogError> {
    let stream_seq = m.info().map_err(nats_err)?.stream_sequence;
    entries(stream_seq, m.headers.as_ref(), &m.payload)
}

impl LogEntry {
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
            server_seq: header_seq(Some(&m.headers), m.sequence)?
                + header_count(Some(&m.headers)) as u64
                - 1,
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
    Ok(next_message_at_or_after(stream, subject, from_stream_seq)
        .await?
        .and_then(|ops| ops.into_iter().next()))
}

/// The ops of the first message on `subject` at stream sequence `from_stream_seq` or
/// later (never empty).
pub async fn next_message_at_or_after(
    stream: &Stream,
    subject: &str,
    from_stream_seq: u64,
) -> Result<Option<Vec<LogEntry>>, LogError> {
    let res = stream
        .raw_message_builder()
        .sequence(from_stream_seq.max(1))
        .next_by_subject(subject.to_owned())
        .send()
        .await;
    match res {
        Ok(m) => Ok(Some(stream_message_entries(&m)?)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(nats_err(e)),
    }
}

/// Whether the log of `subject` goes on right after op `last`, whose message is at
/// stream sequence `stream_seq`: the op `last + 1` is in that message or is the first
/// op of the next one.
pub async fn continues_after(
    stream: &Stream,
    subject: &str,
    stream_seq: u64,
    last: u64,
) -> Result<bool, LogError> {
    let Some(ops) = next_message_at_or_after(stream, subject, stream_seq).await? else {
        return Ok(false);
    };
    if ops[0].stream_seq == stream_seq && ops.iter().any(|e| e.server_seq == last + 1) {
        return Ok(true);
    }
    let from = match ops[0].stream_seq {
        s if s == stream_seq => s + 1,
        // The message of `last` is gone: what follows must start right after it.
        _ => return Ok(ops[0].server_seq == last + 1),
    };
    Ok(next_at_or_after(stream, subject, from)
        .await?
        .is_some_and(|e| e.server_seq == last + 1))
}

/// The first op on `subject` whose `server_seq >= from` (its `stream_seq` is that of
/// the message carrying it), or `None` when there is none (the subject ends before
/// `from`). When `from` lies below the oldest op still in the log (compacted), the
/// oldest op is returned: the caller compares its `server_seq` with what it asked
/// for.
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

/// From a message's ops, the first with `server_seq >= from` (the last when none is).
fn pick(ops: Vec<LogEntry>, from: u64) -> Option<LogEntry> {
    let at = ops
        .iter()
        .position(|e| e.server_seq >= from)
        .unwrap_or(ops.len().saturating_sub(1));
    ops.into_iter().nth(at)
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
    // Invariant: the message holding the answer has its stream sequence in [lo, hi].
    // (A message may carry several ops, so the distance in ops from the head does
    // not bound its stream sequence from above.)
    let mut lo = 1u64;
    let mut hi = head.stream_seq;
    let mut best: Option<LogEntry> = None;
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        match next_message_at_or_after(stream, subject, mid).await? {
            Some(ops) if ops.last().is_some_and(|e| e.server_seq >= from) => {
                let at = ops[0].stream_seq;
                let holds = ops[0].server_seq <= from;
                hi = at.min(mid).saturating_sub(1);
                best = pick(ops, from);
                if holds || hi < lo {
                    break;
                }
            }
            Some(ops) => lo = ops.last().map_or(mid, |e| e.stream_seq) + 1,
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
        None => Ok(next_message_at_or_after(stream, subject, lo)
            .await?
            .and_then(|ops| pick(ops, from))),
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
    /// Ops of the last message read, not yielded yet.
    pending: std::collections::VecDeque<LogEntry>,
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
            .max_bytes_per_batch(crate::nats::PULL_MAX_BYTES)
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
        if let Some(e) = self.pending.pop_front() {
            return Some(Ok(e));
        }
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
                            return match consumer_message_entries(&m) {
                                Ok(ops) => {
                                    self.pending.extend(ops);
                                    self.pending.pop_front().map(Ok)
                                }
                                Err(e) => Some(Err(e)),
                            };
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
        pending: std::collections::VecDeque::new(),
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
    let Some((first, to)) = range_start(stream, subject, from, to).await? else {
        return Ok(Vec::new());
    };
    let want = (to - first.server_seq + 1) as usize;
    let mut out = Vec::with_capacity(want.min(64 * 1024));
    // Few ops: leader-routed lookups, no consumer to create.
    if want <= 8 {
        let mut next = first.stream_seq;
        let mut at = first.server_seq - 1;
        while at < to {
            let Some(ops) = next_message_at_or_after(stream, subject, next).await? else {
                break;
            };
            next = ops[0].stream_seq + 1;
            for e in ops {
                if e.server_seq > at && e.server_seq <= to {
                    at = e.server_seq;
                    out.push(e);
                }
            }
        }
        return Ok(out);
    }
    // Pulls sized for the budget, taking ops of 64 KiB as the usual worst case (a
    // pull of larger ops overshoots by a few messages; the client may have the next
    // pull in flight too).
    let max_batch = match max_bytes {
        usize::MAX => 0,
        b => (b / (64 * 1024)).clamp(4, 500) as i64,
    };
    let mut entries =
        Box::pin(read_from_batched(stream, subject, first.stream_seq, max_batch).await?);
    let mut range = Range::new(first.server_seq, to, max_bytes, out);
    while let Some(e) = entries.next().await {
        if range.take([e?]) {
            break;
        }
    }
    Ok(range.out)
}

/// A range read's ops as they arrive: from the first one asked for, until `to` or
/// until their payloads reach `max_bytes`.
struct Range {
    from: u64,
    to: u64,
    max_bytes: usize,
    bytes: usize,
    out: Vec<LogEntry>,
}

impl Range {
    fn new(from: u64, to: u64, max_bytes: usize, out: Vec<LogEntry>) -> Self {
        Self {
            from,
            to,
            max_bytes,
            bytes: 0,
            out,
        }
    }

    /// Ops still wanted, at most (a message carries at least one).
    fn ops_left(&self) -> usize {
        let next = self.out.last().map_or(self.from, |e| e.server_seq + 1);
        usize::try_from(self.to.saturating_sub(next) + 1).unwrap_or(usize::MAX)
    }

    /// Takes `ops` (the first message's ops before `from` are skipped); true once
    /// the range is complete.
    fn take(&mut self, ops: impl IntoIterator<Item = LogEntry>) -> bool {
        for e in ops {
            if e.server_seq < self.from {
                continue;
            }
            let done = e.server_seq >= self.to;
            self.bytes += e.payload.len();
            self.out.push(e);
            if done || self.bytes >= self.max_bytes {
                return true;
            }
        }
        false
    }
}

/// Where a read of ops `from..=to` on `subject` starts: the op at or below `from`
/// that begins a message, and `to` capped at the head; `None` when there is nothing
/// to read.
async fn range_start(
    stream: &Stream,
    subject: &str,
    from: u64,
    to: u64,
) -> Result<Option<(LogEntry, u64)>, LogError> {
    let Some(head) = head(stream, subject).await? else {
        return Ok(None);
    };
    let to = to.min(head.server_seq);
    if to < from {
        return Ok(None);
    }
    let Some(first) = locate_below(stream, subject, from, head).await? else {
        return Ok(None);
    };
    Ok((first.server_seq <= to).then_some((first, to)))
}

/// [`read_range_limited`] for readers that come and go at a tenant's pace (HTTP
/// pages and history, catch-up frames): it reads with batched direct gets
/// (`$JS.API.DIRECT.GET`, nats-server 2.11+), so no consumer is made and nothing
/// is left on the server. A consumer lingered until its inactivity threshold, and a
/// stream holds at most so many (nats-server's default is 1,000): a flood of short
/// reads could leave no room for anyone's consumer.
pub async fn read_range_direct(
    client: &async_nats::Client,
    stream: &Stream,
    subject: &str,
    from: u64,
    to: u64,
    max_bytes: usize,
) -> Result<Vec<LogEntry>, LogError> {
    let Some((first, to)) = range_start(stream, subject, from, to).await? else {
        return Ok(Vec::new());
    };
    let want = (to - first.server_seq + 1) as usize;
    let range = Range::new(
        first.server_seq,
        to,
        max_bytes,
        Vec::with_capacity(want.min(64 * 1024)),
    );
    let direct = DirectReader::new(client, stream, subject, first.stream_seq).await?;
    read_direct(direct, range).await
}

/// [`read_range_direct`] going on from an earlier read: ops `after + 1..=to` (`to`
/// at most the head), where op `after` is in the message at stream sequence
/// `after_stream_seq`. Nothing is searched for; ops compacted since the earlier read
/// are missing from the answer, which then starts later.
pub async fn continue_range_direct(
    client: &async_nats::Client,
    stream: &Stream,
    subject: &str,
    (after, after_stream_seq): (u64, u64),
    to: u64,
    max_bytes: usize,
) -> Result<Vec<LogEntry>, LogError> {
    if to <= after {
        return Ok(Vec::new());
    }
    let range = Range::new(after + 1, to, max_bytes, Vec::new());
    let direct = DirectReader::new(client, stream, subject, after_stream_seq).await?;
    read_direct(direct, range).await
}

/// Reads messages from `direct` into `range` until it is complete or full.
async fn read_direct(
    mut direct: DirectReader<'_>,
    mut range: Range,
) -> Result<Vec<LogEntry>, LogError> {
    let mut lagging = 0;
    loop {
        let budget = range.max_bytes.saturating_sub(range.bytes);
        let Some(ops) = direct.next_message(budget, range.ops_left()).await? else {
            // The leader has the ops up to `to`; a replica answering direct gets may
            // not have them yet.
            if lagging == DIRECT_LAG_RETRIES {
                return Ok(range.out);
            }
            lagging += 1;
            tokio::time::sleep(DIRECT_LAG_WAIT).await;
            direct.resume();
            continue;
        };
        lagging = 0;
        if range.take(ops) {
            return Ok(range.out);
        }
    }
}

/// How often, and how long apart, a range read asks again for ops the leader has
/// and the replica answering does not yet.
const DIRECT_LAG_RETRIES: u32 = 50;
const DIRECT_LAG_WAIT: Duration = Duration::from_millis(20);

/// Messages asked for by one batched direct get.
const DIRECT_BATCH: usize = 256;
/// Most payload bytes asked for by one batched direct get.
const DIRECT_BATCH_BYTES: usize = 1024 * 1024;
/// Longest wait for the next answer of a batched direct get.
const DIRECT_WAIT: Duration = Duration::from_secs(10);

/// The messages of one subject in order, read with batched direct gets on one
/// inbox of its own (a core subscription, gone when this is dropped).
struct DirectReader<'a> {
    client: &'a async_nats::Client,
    api: String,
    subject: &'a str,
    inbox: String,
    answers: async_nats::Subscriber,
    /// The stream sequence to ask from next.
    next: u64,
    /// A batch is being answered, and how many messages it brought so far.
    open: bool,
    answered: usize,
    /// The subject has no more messages.
    ended: bool,
}

impl<'a> DirectReader<'a> {
    async fn new(
        client: &'a async_nats::Client,
        stream: &Stream,
        subject: &'a str,
        start: u64,
    ) -> Result<Self, LogError> {
        let inbox = client.new_inbox();
        let answers = client.subscribe(inbox.clone()).await.map_err(nats_err)?;
        Ok(Self {
            client,
            api: format!("$JS.API.DIRECT.GET.{}", stream.cached_info().config.name),
            subject,
            inbox,
            answers,
            next: start.max(1),
            open: false,
            answered: 0,
            ended: false,
        })
    }

    /// Asks again from where it stopped, after the subject seemed to end.
    fn resume(&mut self) {
        self.open = false;
        self.ended = false;
    }

    /// The ops of the next message, `None` once the subject has no more. A new
    /// batch asks for at most `budget` payload bytes and `messages` messages (at
    /// least one): a short page does not make the server send a whole batch.
    async fn next_message(
        &mut self,
        budget: usize,
        messages: usize,
    ) -> Result<Option<Vec<LogEntry>>, LogError> {
        while !self.ended {
            if !self.open {
                let ask = serde_json::json!({
                    "seq": self.next,
                    "next_by_subj": self.subject,
                    "batch": messages.clamp(1, DIRECT_BATCH),
                    "max_bytes": budget.clamp(1, DIRECT_BATCH_BYTES),
                });
                self.client
                    .publish_with_reply(
                        self.api.clone(),
                        self.inbox.clone(),
                        ask.to_string().into(),
                    )
                    .await
                    .map_err(nats_err)?;
                self.open = true;
                self.answered = 0;
            }
            let answer = match tokio::time::timeout(DIRECT_WAIT, self.answers.next()).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err(LogError::Nats("the direct get inbox closed".to_owned())),
                Err(_) => return Err(LogError::Nats("no answer to a direct get".to_owned())),
            };
            match answer.status.map(|s| s.as_u16()) {
                None => {
                    let m = async_nats::jetstream::message::StreamMessage::try_from(answer)
                        .map_err(nats_err)?;
                    self.next = m.sequence + 1;
                    self.answered += 1;
                    return stream_message_entries(&m).map(Some);
                }
                // End of a batch: ask for the next one (an empty batch ends the
                // subject).
                Some(204) => {
                    self.open = false;
                    let pending = answer
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Num-Pending"))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    if pending == Some(0) || self.answered == 0 {
                        self.ended = true;
                    }
                }
                // Nothing at or after `next`.
                Some(404) => self.ended = true,
                Some(code) => {
                    return Err(LogError::Nats(format!(
                        "direct get answered {code} {}",
                        answer.description.unwrap_or_default()
                    )));
                }
            }
        }
        Ok(None)
    }
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
