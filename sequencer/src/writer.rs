//! One durable write to `USYNC_OPS`: a single publish, or an atomic batch (ADR-50)
//! when several messages go together. A stream key's consecutive ops are packed into
//! as few messages as their size allows (`Usync-Batch: n`, one op per line; see
//! `ultrasync_shared::log`), so a write usually stores one message per stream key.
//! Either way the first message of a subject carries
//! `Nats-Expected-Last-Subject-Sequence`, so the write lands only if nobody else has
//! written the subject since this worker last looked, and nothing is stored when
//! the check fails.

use async_nats::HeaderMap;
use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE,
    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
};
use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;
use serde::Deserialize;
use ultrasync_shared::nats::{HDR_BATCH, HDR_OP_ID, HDR_SEQ};

/// JetStream error codes that mean "the subject moved on": 10071 wrong last
/// sequence (R1), 10164 the R3 variant.
const CONFLICT_CODES: [u64; 2] = [10071, 10164];

/// An op ready to be stored.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub server_seq: u64,
    pub op_id: String,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Another writer got there first; re-read the head and re-plan.
    #[error("subject moved on: {0}")]
    Conflict(String),
    #[error("{0}")]
    Other(String),
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
struct BatchAck {
    #[serde(default)]
    error: Option<ApiError>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
}

/// Most bytes of ops packed into one log message (a larger op goes alone; the
/// stream takes messages up to `nats::MAX_MSG_SIZE`). Small, because a reader that
/// wants one op (`locate`'s binary search, a retry answered from the log) fetches
/// whole messages: with 256 KiB, `tests/partitions.rs`'s flood of 2 KB ops and their
/// retries drained in over 120 s instead of 25 s.
pub const PACK_BYTES: usize = 32 * 1024;
/// Most ops packed into one log message: what a reader decodes at once.
pub const PACK_OPS: usize = 256;

/// One log message: its ops, consecutive.
struct Packed<'a> {
    ops: &'a [Outgoing],
}

impl Packed<'_> {
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let first = &self.ops[0];
        h.insert(HDR_SEQ, first.server_seq.to_string().as_str());
        h.insert(HDR_OP_ID, first.op_id.as_str());
        if self.ops.len() > 1 {
            h.insert(HDR_BATCH, self.ops.len().to_string().as_str());
        }
        h
    }

    fn body(&self) -> Bytes {
        match self.ops {
            [op] => op.body.clone(),
            ops => {
                let len = ops.iter().map(|o| o.body.len() + 1).sum::<usize>();
                let mut body = Vec::with_capacity(len);
                for (i, op) in ops.iter().enumerate() {
                    if i > 0 {
                        body.push(b'\n');
                    }
                    body.extend_from_slice(&op.body);
                }
                Bytes::from(body)
            }
        }
    }
}

/// `ops` cut into log messages, in order: a message ends before the op that would
/// take it past [`PACK_OPS`] ops or [`PACK_BYTES`] bytes.
struct Packs<'a> {
    ops: &'a [Outgoing],
}

impl<'a> Iterator for Packs<'a> {
    type Item = Packed<'a>;

    fn next(&mut self) -> Option<Packed<'a>> {
        if self.ops.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut end = 0;
        for (n, op) in self.ops.iter().enumerate() {
            if n > 0 && (n >= PACK_OPS || bytes + op.body.len() + 1 > PACK_BYTES) {
                break;
            }
            bytes += op.body.len() + 1;
            end = n + 1;
        }
        let (ops, rest) = self.ops.split_at(end);
        self.ops = rest;
        Some(Packed { ops })
    }
}

fn pack(ops: &[Outgoing]) -> Vec<Packed<'_>> {
    Packs { ops }.collect()
}

/// How many log messages `ops` take (the committer asks per request and per round:
/// counted, not built).
pub fn messages(ops: &[Outgoing]) -> usize {
    Packs { ops }.count()
}

/// Stores `ops` on `subject` if the subject's last stream sequence is still
/// `expected_last` (0 = empty). Returns the stream sequence of the last message
/// stored.
pub async fn write(
    client: &async_nats::Client,
    js: &jetstream::Context,
    subject: &str,
    expected_last: u64,
    ops: &[Outgoing],
) -> Result<u64, WriteError> {
    match pack(ops).as_slice() {
        [] => Err(WriteError::Other("empty write".to_owned())),
        [one] => write_one(js, subject, expected_last, one).await,
        _ => write_many(
            client,
            &[SubjectWrite {
                subject,
                expected_last,
                ops,
            }],
        )
        .await?
        .first()
        .copied()
        .ok_or_else(|| WriteError::Other("empty batch".to_owned())),
    }
}

async fn write_one(
    js: &jetstream::Context,
    subject: &str,
    expected_last: u64,
    message: &Packed<'_>,
) -> Result<u64, WriteError> {
    let mut h = message.headers();
    h.insert(
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected_last.to_string().as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_owned(), h, message.body())
        .await
        .map_err(|e| WriteError::Other(e.to_string()))?
        .await;
    match ack {
        Ok(ack) => Ok(ack.sequence),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
            Err(WriteError::Conflict(e.to_string()))
        }
        Err(e) => {
            let text = e.to_string();
            if CONFLICT_CODES.iter().any(|c| text.contains(&c.to_string())) {
                Err(WriteError::Conflict(text))
            } else {
                Err(WriteError::Other(text))
            }
        }
    }
}

/// One stream key's part of a shared atomic batch.
pub struct SubjectWrite<'a> {
    pub subject: &'a str,
    /// The subject's last stream sequence the ops were planned against (0 = empty).
    pub expected_last: u64,
    pub ops: &'a [Outgoing],
}

/// Stores every write in one atomic batch: all of them, or nothing when any
/// subject's check fails. Returns, per write, the stream sequence of its last
/// message.
pub async fn write_many(
    client: &async_nats::Client,
    writes: &[SubjectWrite<'_>],
) -> Result<Vec<u64>, WriteError> {
    if writes.is_empty() || writes.iter().any(|w| w.ops.is_empty()) {
        return Err(WriteError::Other("empty batch".to_owned()));
    }
    let packed: Vec<Vec<Packed<'_>>> = writes.iter().map(|w| pack(w.ops)).collect();
    let total: usize = packed.iter().map(Vec::len).sum();
    let batch_id = uuid::Uuid::new_v4().simple().to_string();
    let mut n = 0usize;
    for (w, messages) in writes.iter().zip(&packed) {
        for (i, message) in messages.iter().enumerate() {
            n += 1;
            let mut h = message.headers();
            h.insert(NATS_BATCH_ID, batch_id.as_str());
            h.insert(NATS_BATCH_SEQUENCE, n.to_string().as_str());
            if i == 0 {
                // Only a subject's first message in a batch may carry the check.
                h.insert(
                    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    w.expected_last.to_string().as_str(),
                );
            }
            if n < total {
                // Messages before the commit are plain publishes: the connection
                // keeps them in order, and any failure is reported on the commit.
                client
                    .publish_with_headers(w.subject.to_owned(), h, message.body())
                    .await
                    .map_err(|e| WriteError::Other(format!("batch publish: {e}")))?;
                continue;
            }
            h.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
            let resp = client
                .request_with_headers(w.subject.to_owned(), h, message.body())
                .await
                .map_err(|e| WriteError::Other(format!("batch commit: {e}")))?;
            let ack: BatchAck = serde_json::from_slice(&resp.payload)
                .map_err(|e| WriteError::Other(format!("batch commit answer: {e}")))?;
            if let Some(err) = ack.error {
                let text = format!("{} ({})", err.description, err.err_code);
                return if CONFLICT_CODES.contains(&err.err_code) {
                    Err(WriteError::Conflict(text))
                } else {
                    Err(WriteError::Other(text))
                };
            }
            if ack.count != 0 && ack.count != total as u64 {
                return Err(WriteError::Other(format!(
                    "batch stored {} of {total} messages",
                    ack.count
                )));
            }
            // A batch is stored as consecutive stream sequences ending at `seq`.
            let first = ack.seq + 1 - total as u64;
            let mut lasts = Vec::with_capacity(writes.len());
            let mut end = 0u64;
            for messages in &packed {
                end += messages.len() as u64;
                lasts.push(first + end - 1);
            }
            return Ok(lasts);
        }
    }
    Err(WriteError::Other("empty batch".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(seq: u64, len: usize) -> Outgoing {
        Outgoing {
            server_seq: seq,
            op_id: format!("op{seq}"),
            body: Bytes::from(vec![b'x'; len]),
        }
    }

    #[test]
    fn ops_are_packed_by_count_and_size() {
        let small: Vec<Outgoing> = (1..=600).map(|s| op(s, 10)).collect();
        let sizes: Vec<usize> = pack(&small).iter().map(|p| p.ops.len()).collect();
        assert_eq!(sizes, [PACK_OPS, PACK_OPS, 600 - 2 * PACK_OPS]);
        let half = PACK_BYTES / 2 - 10;
        let big = [op(1, half), op(2, half), op(3, PACK_BYTES + 1), op(4, 10)];
        let sizes: Vec<usize> = pack(&big).iter().map(|p| p.ops.len()).collect();
        assert_eq!(sizes, [2, 1, 1], "an op larger than the limit goes alone");
        assert_eq!(messages(&[]), 0);
    }

    #[test]
    fn a_packed_message_reads_back_as_its_ops() {
        let ops: Vec<Outgoing> = (7..10)
            .map(|s| Outgoing {
                server_seq: s,
                op_id: format!("id-{s}"),
                body: Bytes::from(format!(r#"{{"op_id":"id-{s}","server_seq":{s}}}"#)),
            })
            .collect();
        let packed = pack(&ops);
        assert_eq!(packed.len(), 1);
        let back =
            ultrasync_shared::log::entries(42, Some(&packed[0].headers()), &packed[0].body())
                .expect("entries");
        assert_eq!(back.len(), 3);
        for (e, o) in back.iter().zip(&ops) {
            assert_eq!(e.stream_seq, 42);
            assert_eq!(e.server_seq, o.server_seq);
            assert_eq!(e.op_id, o.op_id);
            assert_eq!(e.payload, o.body);
        }
        let one = pack(&ops[..1]);
        let h = one[0].headers();
        assert!(
            h.get(HDR_BATCH).is_none(),
            "a single op is stored as before"
        );
        assert_eq!(one[0].body(), ops[0].body);
    }
}
