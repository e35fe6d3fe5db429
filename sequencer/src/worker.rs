//! The per-stream-key worker: gathers a batch, plans it against the key's head,
//! writes it, answers. One worker per key per instance; across instances the
//! expected-sequence check on the write is the fence.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, stream::Stream};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use ultrasync_shared::config::SequencerConfig;
use ultrasync_shared::ids::is_valid_id;
use ultrasync_shared::log::{self, Head};
use ultrasync_shared::nats::ops_subject;
use ultrasync_shared::protocol::ServerMessage;
use ultrasync_shared::{CommandEnvelope, ErrorCode, Op, OpType, StreamKey, validate_key};

use crate::writer::{self, Outgoing, WriteError};

/// A worker with nothing to do for this long exits; the next command starts a new one.
const IDLE: Duration = Duration::from_secs(300);
/// How many recent op ids a worker keeps to answer retries without reading the log.
const RECENT_CAP: usize = 20_000;
/// How many of the newest ops a worker reads when it takes a key.
const RECENT_LOAD: u64 = 2_000;
/// Conflicts in a row before a batch is handed back for redelivery.
const MAX_CONFLICTS: u32 = 64;

/// What every worker of an instance shares.
pub struct WorkerShared {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub ops: Stream,
    pub hlc: uhlc::HLC,
    pub config: SequencerConfig,
    pub max_value_bytes: usize,
}

/// A command message taken from `USYNC_CMDS`, decoded.
pub struct Pending {
    msg: jetstream::Message,
    cmd: Result<CommandEnvelope, String>,
    /// Known even when the body does not decode, so a reject can still be sent.
    reply_to: Option<String>,
    command_id: String,
}

impl Pending {
    pub fn new(msg: jetstream::Message) -> Self {
        let loose: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        let reply_to = loose
            .get("reply_to")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let command_id = loose
            .get("command_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let cmd =
            serde_json::from_slice::<CommandEnvelope>(&msg.payload).map_err(|e| e.to_string());
        Self {
            msg,
            cmd,
            reply_to,
            command_id,
        }
    }
}

/// Op ids this worker knows are in the log, with their `server_seq`.
#[derive(Default)]
struct Recent {
    map: HashMap<String, u64>,
    order: VecDeque<String>,
}

impl Recent {
    fn insert(&mut self, op_id: String, server_seq: u64) {
        if self.map.insert(op_id.clone(), server_seq).is_none() {
            self.order.push_back(op_id);
            while self.order.len() > RECENT_CAP {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, op_id: &str) -> Option<u64> {
        self.map.get(op_id).copied()
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}

/// How one command of a batch is answered.
enum Plan {
    Reject(ServerMessage),
    /// A new op: index into the batch's ops.
    New(usize),
    /// A retry of an op already in the log at this `server_seq`.
    Existing(u64),
}

pub struct Worker {
    key: StreamKey,
    subject: String,
    shared: std::sync::Arc<WorkerShared>,
    /// `None` until loaded, or after an error that makes the cached head doubtful.
    head: Option<Option<Head>>,
    recent: Recent,
}

impl Worker {
    pub fn new(key: StreamKey, shared: std::sync::Arc<WorkerShared>) -> Self {
        Self {
            subject: ops_subject(&key),
            key,
            shared,
            head: None,
            recent: Recent::default(),
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<Pending>) {
        let window = Duration::from_millis(self.shared.config.batch_window_ms);
        let max = self.shared.config.batch_max;
        loop {
            let first = match tokio::time::timeout(IDLE, rx.recv()).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(_) => {
                    // Idle: stop taking work, finish anything that slipped in.
                    rx.close();
                    let mut rest = Vec::new();
                    while let Ok(p) = rx.try_recv() {
                        rest.push(p);
                    }
                    if !rest.is_empty() {
                        self.process(rest).await;
                    }
                    debug!(stream_key = %self.key, "worker idle, exiting");
                    return;
                }
            };
            let mut batch = vec![first];
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            // Under load (more than one command waiting) linger for the window to
            // fill the durable write; a lone command goes straight through.
            if batch.len() > 1 && batch.len() < max {
                let deadline = tokio::time::Instant::now() + window;
                while batch.len() < max {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(p)) => batch.push(p),
                        _ => break,
                    }
                }
            }
            self.process(batch).await;
        }
    }

    async fn process(&mut self, batch: Vec<Pending>) {
        let mut conflicts = 0;
        loop {
            let head = match self.head {
                Some(h) => h,
                None => match self.load().await {
                    Ok(h) => h,
                    Err(e) => {
                        warn!(stream_key = %self.key, error = %e, "cannot read the log head; retrying later");
                        nak_all(&batch).await;
                        return;
                    }
                },
            };
            let next_seq = head.map_or(0, |h| h.server_seq) + 1;
            let expected_last = head.map_or(0, |h| h.stream_seq);

            let mut plans = Vec::with_capacity(batch.len());
            let mut ops: Vec<Op> = Vec::new();
            let mut outgoing: Vec<Outgoing> = Vec::new();
            let mut in_batch: HashMap<String, usize> = HashMap::new();
            for p in &batch {
                let cmd = match &p.cmd {
                    Ok(c) => c,
                    Err(e) => {
                        plans.push(Plan::Reject(ServerMessage::reject(
                            &p.command_id,
                            ErrorCode::InvalidMessage,
                            format!("undecodable command: {e}"),
                        )));
                        continue;
                    }
                };
                if let Err(reject) = self.validate(cmd) {
                    plans.push(Plan::Reject(reject));
                    continue;
                }
                let op_id = cmd.op_id();
                if let Some(seq) = self.recent.get(&op_id) {
                    plans.push(Plan::Existing(seq));
                    continue;
                }
                if let Some(&i) = in_batch.get(&op_id) {
                    plans.push(Plan::New(i));
                    continue;
                }
                let server_seq = next_seq + ops.len() as u64;
                let hlc_ts = self
                    .shared
                    .hlc
                    .new_timestamp()
                    .get_time()
                    .as_u64()
                    .to_string();
                let op = cmd.clone().into_op(op_id.clone(), server_seq, hlc_ts);
                let body = match serde_json::to_vec(&op) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        plans.push(Plan::Reject(ServerMessage::reject(
                            &cmd.command_id,
                            ErrorCode::InvalidOp,
                            format!("op does not encode: {e}"),
                        )));
                        continue;
                    }
                };
                in_batch.insert(op_id.clone(), ops.len());
                plans.push(Plan::New(ops.len()));
                outgoing.push(Outgoing {
                    server_seq,
                    op_id,
                    body,
                });
                ops.push(op);
            }

            if !outgoing.is_empty() {
                let written = writer::write(
                    &self.shared.client,
                    &self.shared.js,
                    &self.subject,
                    expected_last,
                    &outgoing,
                )
                .await;
                match written {
                    Ok(last_stream_seq) => {
                        let last = outgoing.last().map_or(0, |o| o.server_seq);
                        self.head = Some(Some(Head {
                            stream_seq: last_stream_seq,
                            server_seq: last,
                        }));
                        for o in outgoing {
                            self.recent.insert(o.op_id, o.server_seq);
                        }
                        debug!(stream_key = %self.key, ops = ops.len(), last_seq = last, "batch committed");
                    }
                    Err(WriteError::Conflict(why)) => {
                        conflicts += 1;
                        debug!(stream_key = %self.key, %why, conflicts, "another writer moved the key; re-planning");
                        if conflicts >= MAX_CONFLICTS {
                            warn!(stream_key = %self.key, "too many write conflicts; handing the batch back");
                            self.head = None;
                            nak_all(&batch).await;
                            return;
                        }
                        if let Err(e) = self.catch_up().await {
                            warn!(stream_key = %self.key, error = %e, "catching up after a conflict failed");
                            self.head = None;
                        }
                        continue;
                    }
                    Err(WriteError::Other(e)) => {
                        warn!(stream_key = %self.key, error = %e, "op log write failed; commands will be redelivered");
                        self.head = None;
                        nak_all(&batch).await;
                        return;
                    }
                }
            }

            for (p, plan) in batch.iter().zip(plans) {
                let reply = match plan {
                    Plan::Reject(m) => m,
                    Plan::New(i) => ServerMessage::Ack {
                        command_id: ops[i].command_id.clone(),
                        server_seq: ops[i].server_seq,
                        op: ops[i].clone(),
                    },
                    Plan::Existing(seq) => match self.stored_op(seq).await {
                        Some(op) => ServerMessage::Ack {
                            command_id: op.command_id.clone(),
                            server_seq: op.server_seq,
                            op,
                        },
                        None => {
                            let _ = p
                                .msg
                                .ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                                .await;
                            continue;
                        }
                    },
                };
                if let Some(to) = &p.reply_to
                    && let Err(e) = self
                        .shared
                        .client
                        .publish(to.clone(), reply.encode().into())
                        .await
                {
                    warn!(error = %e, "answering the gateway failed");
                }
                if let Err(e) = p.msg.ack().await {
                    warn!(error = %e, "acking a command failed; it will be redelivered and deduped");
                }
            }
            return;
        }
    }

    /// Checks what can be checked without state. Org, project and actor were put in
    /// by the gateway from the verified token.
    fn validate(&self, cmd: &CommandEnvelope) -> Result<(), ServerMessage> {
        let reject =
            |code, reason: String| Err(ServerMessage::reject(&cmd.command_id, code, reason));
        if cmd.org_id != self.key.org.as_str()
            || cmd.project_id != self.key.project.as_str()
            || cmd.namespace != self.key.namespace.as_str()
        {
            return reject(
                ErrorCode::InvalidMessage,
                "command does not match its subject".into(),
            );
        }
        if !is_valid_id(&cmd.actor_id) || !is_valid_id(&cmd.client_id) {
            return reject(
                ErrorCode::InvalidId,
                "actor_id and client_id must match [A-Za-z0-9_-]{1,64}".into(),
            );
        }
        if !valid_command_id(&cmd.command_id) {
            return reject(
                ErrorCode::InvalidId,
                "command_id must be 1-128 bytes without control characters".into(),
            );
        }
        if validate_key(&cmd.key).is_err() {
            return reject(
                ErrorCode::InvalidKey,
                "key must be 1-512 bytes of UTF-8 without control characters".into(),
            );
        }
        match cmd.op_type {
            OpType::Set | OpType::Del => {}
            other => {
                return reject(
                    ErrorCode::InvalidOp,
                    format!(
                        "op type {} is not accepted in lww namespaces",
                        other.as_str()
                    ),
                );
            }
        }
        if cmd.precondition.is_some() {
            return reject(
                ErrorCode::InvalidOp,
                "preconditions are not accepted by this sequencer yet".into(),
            );
        }
        let size = serde_json::to_vec(&cmd.payload).map_or(usize::MAX, |v| v.len());
        if size > self.shared.max_value_bytes {
            return reject(
                ErrorCode::PayloadTooLarge,
                format!(
                    "value is {size} bytes, the limit is {}",
                    self.shared.max_value_bytes
                ),
            );
        }
        Ok(())
    }

    /// Reads the key's head and the newest op ids from the log.
    async fn load(&mut self) -> Result<Option<Head>, log::LogError> {
        let head = log::head(&self.shared.ops, &self.subject).await?;
        self.recent.clear();
        if let Some(h) = head {
            let from = h.server_seq.saturating_sub(RECENT_LOAD - 1).max(1);
            for e in log::read_range(&self.shared.ops, &self.subject, from, h.server_seq).await? {
                self.recent.insert(e.op_id, e.server_seq);
            }
        }
        self.head = Some(head);
        debug!(stream_key = %self.key, head = ?head, "worker took key");
        Ok(head)
    }

    /// After losing a write race: learn what the other writer stored.
    async fn catch_up(&mut self) -> Result<(), log::LogError> {
        let old = self.head.flatten();
        let new = log::head(&self.shared.ops, &self.subject).await?;
        let (Some(new), from) = (new, old.map_or(1, |h| h.server_seq + 1)) else {
            self.head = Some(None);
            return Ok(());
        };
        if new.server_seq + 1 - from > RECENT_CAP as u64 {
            self.load().await?;
            return Ok(());
        }
        for e in log::read_range(&self.shared.ops, &self.subject, from, new.server_seq).await? {
            self.recent.insert(e.op_id, e.server_seq);
        }
        self.head = Some(Some(new));
        Ok(())
    }

    /// The op stored at `server_seq`, for answering a retry.
    async fn stored_op(&self, server_seq: u64) -> Option<Op> {
        match log::read_range(&self.shared.ops, &self.subject, server_seq, server_seq).await {
            Ok(entries) => entries
                .into_iter()
                .find(|e| e.server_seq == server_seq)
                .and_then(|e| e.op().ok()),
            Err(e) => {
                warn!(stream_key = %self.key, error = %e, "reading a stored op for a retry failed");
                None
            }
        }
    }
}

fn valid_command_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && !id.chars().any(char::is_control)
}

async fn nak_all(batch: &[Pending]) {
    for p in batch {
        let _ = p
            .msg
            .ack_with(AckKind::Nak(Some(Duration::from_millis(250))))
            .await;
    }
}
