//! One durable write to `USYNC_OPS`: a single publish, or an atomic batch (ADR-50)
//! when several ops go together. Either way the first message carries
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
use ultrasync_shared::nats::{HDR_OP_ID, HDR_SEQ};

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

fn headers(op: &Outgoing) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HDR_SEQ, op.server_seq.to_string().as_str());
    h.insert(HDR_OP_ID, op.op_id.as_str());
    h
}

/// Stores `ops` on `subject` if the subject's last stream sequence is still
/// `expected_last` (0 = empty). Returns the stream sequence of the last op stored.
pub async fn write(
    client: &async_nats::Client,
    js: &jetstream::Context,
    subject: &str,
    expected_last: u64,
    ops: &[Outgoing],
) -> Result<u64, WriteError> {
    match ops {
        [] => Err(WriteError::Other("empty write".to_owned())),
        [op] => write_one(js, subject, expected_last, op).await,
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
    op: &Outgoing,
) -> Result<u64, WriteError> {
    let mut h = headers(op);
    h.insert(
        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected_last.to_string().as_str(),
    );
    let ack = js
        .publish_with_headers(subject.to_owned(), h, op.body.clone())
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
/// subject's check fails. Returns, per write, the stream sequence of its last op.
pub async fn write_many(
    client: &async_nats::Client,
    writes: &[SubjectWrite<'_>],
) -> Result<Vec<u64>, WriteError> {
    let total: usize = writes.iter().map(|w| w.ops.len()).sum();
    if total == 0 || writes.iter().any(|w| w.ops.is_empty()) {
        return Err(WriteError::Other("empty batch".to_owned()));
    }
    let batch_id = uuid::Uuid::new_v4().simple().to_string();
    let mut n = 0usize;
    for w in writes {
        for (i, op) in w.ops.iter().enumerate() {
            n += 1;
            let mut h = headers(op);
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
                    .publish_with_headers(w.subject.to_owned(), h, op.body.clone())
                    .await
                    .map_err(|e| WriteError::Other(format!("batch publish: {e}")))?;
                continue;
            }
            h.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
            let resp = client
                .request_with_headers(w.subject.to_owned(), h, op.body.clone())
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
                    "batch stored {} of {total} ops",
                    ack.count
                )));
            }
            // A batch is stored as consecutive stream sequences ending at `seq`.
            let first = ack.seq + 1 - total as u64;
            let mut lasts = Vec::with_capacity(writes.len());
            let mut end = 0u64;
            for w in writes {
                end += w.ops.len() as u64;
                lasts.push(first + end - 1);
            }
            return Ok(lasts);
        }
    }
    Err(WriteError::Other("empty batch".to_owned()))
}
