//! A socket's follower for one namespace: catch-up from the client's cursor (or a
//! snapshot, possibly continued from a checkpoint), then `synced`, then live ops,
//! always contiguous and in `server_seq` order.

use std::sync::Arc;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use ultrasync_shared::ErrorCode;
use ultrasync_shared::log;
use ultrasync_shared::protocol::{Checkpoint, ServerMessage, SnapshotParts, encode_ops_frame};
use ultrasync_shared::snapshot::Snapshot;

use super::outbound::{OutQueue, Outbound, Refused};
use crate::hub::{Hub, LiveOp, Topic};
use crate::rules::Refusal;

/// Most ops in one `ops` frame.
const FRAME_OPS: usize = 500;
/// About how many bytes of ops one `ops` frame carries (and one read of the log
/// holds): what a follower has in hand stays bounded however large the ops are.
const FRAME_BYTES: usize = 512 * 1024;
/// About how much state one `snapshot` frame carries (frames stay under 1 MiB).
const SNAPSHOT_FRAME_BYTES: usize = 512 * 1024;

pub struct Follower {
    pub hub: Arc<Hub>,
    pub topic: Arc<Topic>,
    pub namespace: String,
    pub out: OutQueue,
    /// Fired when the socket's queue overflows: the session closes with 4001.
    pub slow: CancellationToken,
    /// A cursor farther than this behind the head gets a snapshot and the tail.
    pub snapshot_after_ops: u64,
    /// The org's turns to read the log (its catch-up past the topic's recent ops).
    pub log_reads: crate::rules::limits::LogReadLines,
}

/// Why a follower stopped.
#[derive(Debug)]
enum Stop {
    /// The socket is gone or closing.
    Closed,
    /// Told the client with an `error` frame.
    Reported,
}

impl Follower {
    /// Runs until the socket goes away. `cursor` is the last `server_seq` the client
    /// has; `None` asks for a snapshot, continued after `checkpoint` when given.
    pub async fn run(self, cursor: Option<u64>, checkpoint: Option<Checkpoint>) {
        let _ = self.follow(cursor, checkpoint).await;
    }

    async fn follow(
        &self,
        cursor: Option<u64>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), Stop> {
        let (mut rx, head) = self.topic.subscribe().await;
        let mut last = cursor.unwrap_or(0);
        match cursor {
            None if checkpoint.is_some() => {
                // Continue the snapshot the checkpoint names, if it is still the
                // stored one; else the client starts over.
                let Some(cp) = checkpoint else {
                    return Err(Stop::Closed);
                };
                let parts = match self.snapshot_up_to(head).await? {
                    Some(s) => {
                        let parts = SnapshotParts::new(Arc::new(s), cp.after.clone());
                        cp.names(parts.snapshot(), parts.digest()).then_some(parts)
                    }
                    None => None,
                };
                let Some(parts) = parts else {
                    return self
                        .report(
                            ErrorCode::StaleBase,
                            format!(
                                "the snapshot of {} at {} that the checkpoint names was replaced; start over: subscribe with a null cursor and no checkpoint",
                                self.namespace, cp.last_server_seq
                            ),
                        )
                        .await;
                };
                last = parts.snapshot().state.last_seq;
                self.send_parts(parts).await?;
            }
            None => {
                // SPEC §4: a null cursor always gets a snapshot frame: the stored
                // snapshot, else a materializer's state, else the empty state at 0;
                // the log after it follows.
                let s = match self.snapshot_up_to(head).await? {
                    Some(s) => s,
                    None => match self.materialized_up_to(head).await {
                        Some(s) => s,
                        None => Snapshot {
                            stream_key: self.topic.key.to_string(),
                            head_stream_seq: 0,
                            state: Default::default(),
                            commands: Default::default(),
                            op_ids: Default::default(),
                        },
                    },
                };
                last = s.state.last_seq;
                self.send_snapshot(s).await?;
            }
            // Far behind (though above the floor): a snapshot and the tail cost less
            // than every op since the cursor.
            Some(c) if head.saturating_sub(c) > self.snapshot_after_ops => {
                if let Some(s) = self
                    .snapshot_up_to(head)
                    .await?
                    .filter(|s| s.state.last_seq > c)
                {
                    last = s.state.last_seq;
                    self.send_snapshot(s).await?;
                }
            }
            Some(_) => {}
        }
        let cursor = last;
        if cursor > head {
            return self
                .report(
                    ErrorCode::StaleBase,
                    format!(
                        "cursor {cursor} for namespace {} is ahead of the log (head {head}); resync from a snapshot",
                        self.namespace
                    ),
                )
                .await;
        }
        // A cursor below the compacted part of the log gets a snapshot, even when the
        // ring still holds the ops (SPEC §4: below the floor means snapshot + tail).
        if cursor < head
            && let Some(first) = self.oldest().await?
            && cursor + 1 < first
            && !self.resync(&mut last, head, first).await?
        {
            return self
                .report(
                    ErrorCode::StaleBase,
                    format!(
                        "ops after {cursor} of {} are compacted (oldest is {first}); resync from a snapshot",
                        self.namespace
                    ),
                )
                .await;
        }
        self.fill(&mut last, head).await?;
        self.send(ServerMessage::Synced {
            namespace: self.namespace.clone(),
            server_seq: last,
        })
        .await?;

        loop {
            let op = match rx.recv().await {
                Ok(op) => op,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let head = self.topic.head();
                    self.fill(&mut last, head).await?;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(Stop::Closed),
            };
            let mut live: Vec<Arc<LiveOp>> = Vec::new();
            let mut next = Some(op);
            // Take what is already queued so one frame carries many ops.
            while let Some(op) = next.take() {
                if op.server_seq <= last {
                    // Already sent (catch-up overlapped the broadcast).
                } else if op.server_seq == last + 1 {
                    last = op.server_seq;
                    live.push(op);
                } else {
                    // A hole: flush what we have, fill from ring or log, then continue.
                    self.push_live(&mut live)?;
                    self.fill(&mut last, op.server_seq - 1).await?;
                    last = op.server_seq;
                    live.push(op);
                }
                if live.len() < FRAME_OPS {
                    // A lag here ends the frame; the broadcast always holds a newer
                    // op behind a missed one, and the next `recv` fills the hole.
                    next = rx.try_recv().ok();
                }
            }
            self.push_live(&mut live)?;
        }
    }

    /// Live ops go out without waiting: a socket that cannot take them is a slow
    /// consumer and is closed (it resumes from its cursor).
    fn push_live(&self, live: &mut Vec<Arc<LiveOp>>) -> Result<(), Stop> {
        let Some(first) = live.first() else {
            return Ok(());
        };
        if let [one] = live.as_slice() {
            // The usual case under fan-out: one op, one frame encoded for all sockets.
            let frame = one.frame();
            live.clear();
            return self.push_now(Outbound::Shared(frame));
        }
        let frames = ops_frames(
            &self.namespace,
            first.server_seq,
            live.iter().map(|o| o.body.as_ref()),
        );
        live.clear();
        for frame in frames {
            self.push_now(Outbound::Text(frame))?;
        }
        Ok(())
    }

    /// Queues a live frame without waiting; a full queue marks the socket a slow
    /// consumer.
    fn push_now(&self, item: Outbound) -> Result<(), Stop> {
        match self.out.try_push(item) {
            Ok(()) => Ok(()),
            Err(Refused::Full) => {
                self.slow.cancel();
                Err(Stop::Closed)
            }
            Err(Refused::Closed) => Err(Stop::Closed),
        }
    }

    /// Sends ops `last+1..=to` from the topic's ring or the log, advancing `last`.
    async fn fill(&self, last: &mut u64, to: u64) -> Result<(), Stop> {
        // The last op read from the log and its stream sequence: the next chunk goes
        // on from there instead of searching the stream for its start.
        let mut read_to: Option<(u64, u64)> = None;
        while *last < to {
            let from = *last + 1;
            let chunk_to = to.min(from + FRAME_OPS as u64 - 1);
            let bodies: Vec<(u64, bytes::Bytes)> = match self.topic.recent(from, chunk_to) {
                Some(ops) => ops.iter().map(|o| (o.server_seq, o.body.clone())).collect(),
                None => {
                    let _turn = self.log_reads.turn(self.topic.key.org.as_str()).await;
                    let (client, ops) = (self.hub.client(), self.hub.ops_stream());
                    let subject = &self.topic.subject;
                    let entries = match read_to.filter(|(seq, _)| *seq == *last) {
                        Some(after) => {
                            log::continue_range_direct(
                                client,
                                ops,
                                subject,
                                after,
                                chunk_to,
                                FRAME_BYTES,
                            )
                            .await
                        }
                        None => {
                            log::read_range_direct(
                                client,
                                ops,
                                subject,
                                from,
                                chunk_to,
                                FRAME_BYTES,
                            )
                            .await
                        }
                    };
                    match entries {
                        Ok(e) => {
                            read_to = e.last().map(|e| (e.server_seq, e.stream_seq));
                            e.into_iter().map(|e| (e.server_seq, e.payload)).collect()
                        }
                        Err(e) => {
                            return self
                                .refuse(Refusal::unavailable("reading the op log", e))
                                .await;
                        }
                    }
                }
            };
            let Some(&(first, _)) = bodies.first() else {
                return self
                    .report(
                        ErrorCode::Unavailable,
                        format!(
                            "ops {from}..={chunk_to} of {} are not readable",
                            self.namespace
                        ),
                    )
                    .await;
            };
            if first != from {
                if self.resync(last, to, first).await? {
                    continue;
                }
                return self
                    .report(
                        ErrorCode::StaleBase,
                        format!(
                            "ops after {} of {} are compacted (oldest is {first}); resync from a snapshot",
                            *last, self.namespace
                        ),
                    )
                    .await;
            }
            // Keep only the contiguous run (the log cannot have holes, but be strict).
            let mut n = 0;
            for (i, (seq, _)) in bodies.iter().enumerate() {
                if *seq != from + i as u64 {
                    break;
                }
                n = i + 1;
            }
            for frame in ops_frames(
                &self.namespace,
                from,
                bodies[..n].iter().map(|(_, b)| b.as_ref()),
            ) {
                self.out
                    .push(Outbound::Text(frame))
                    .await
                    .map_err(|_| Stop::Closed)?;
            }
            *last = from + n as u64 - 1;
        }
        Ok(())
    }

    /// The log below `first` is compacted and the client is at `last`, below it: sends
    /// a snapshot that reaches `first` (the stored one, else the materializer's
    /// state) and moves `last` to it. `false` when there is none.
    async fn resync(&self, last: &mut u64, to: u64, first: u64) -> Result<bool, Stop> {
        let stored = self.snapshot_up_to(to).await?;
        let fresh = match &stored {
            Some(s) if s.state.last_seq + 1 >= first => None,
            // The stored one is too old for what is left of the log: the
            // materializer's state is newer.
            _ => self
                .hub
                .materialized(&self.topic.key, false)
                .await
                .ok()
                .flatten()
                .filter(|s| s.state.last_seq <= to),
        };
        match fresh.or(stored) {
            Some(s) if s.state.last_seq + 1 >= first && s.state.last_seq > *last => {
                *last = s.state.last_seq;
                self.send_snapshot(s).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The oldest `server_seq` still in the log (`None` when the subject is empty).
    async fn oldest(&self) -> Result<Option<u64>, Stop> {
        match log::next_at_or_after(self.hub.ops_stream(), &self.topic.subject, 1).await {
            Ok(e) => Ok(e.map(|e| e.server_seq)),
            Err(e) => {
                self.refuse(Refusal::unavailable("reading the op log", e))
                    .await?;
                Ok(None)
            }
        }
    }

    /// A materializer's state of this key, if it is not ahead of `head`.
    async fn materialized_up_to(&self, head: u64) -> Option<Snapshot> {
        self.hub
            .materialized(&self.topic.key, false)
            .await
            .ok()
            .flatten()
            .filter(|s| s.state.last_seq <= head)
    }

    /// The newest snapshot of this key, if it is not ahead of `head`.
    async fn snapshot_up_to(&self, head: u64) -> Result<Option<Snapshot>, Stop> {
        match self.hub.snapshot(&self.topic.key).await {
            Ok(s) => Ok(s.filter(|s| s.state.last_seq <= head)),
            Err(e) => {
                self.refuse(Refusal::unavailable("reading the snapshot", e))
                    .await?;
                Ok(None)
            }
        }
    }

    async fn send_snapshot(&self, snapshot: Snapshot) -> Result<(), Stop> {
        self.send_parts(SnapshotParts::new(Arc::new(snapshot), None))
            .await
    }

    /// Sends the snapshot's frames one at a time, each encoded when the queue has
    /// room for it.
    async fn send_parts(&self, mut parts: SnapshotParts) -> Result<(), Stop> {
        while let Some(frame) = parts.next_frame(&self.namespace, SNAPSHOT_FRAME_BYTES) {
            self.send(frame).await?;
        }
        Ok(())
    }

    async fn send(&self, msg: ServerMessage) -> Result<(), Stop> {
        self.out
            .push(Outbound::Text(msg.encode()))
            .await
            .map_err(|_| Stop::Closed)
    }

    async fn refuse(&self, r: Refusal) -> Result<(), Stop> {
        self.report(r.code, r.message).await
    }

    async fn report(&self, code: ErrorCode, message: String) -> Result<(), Stop> {
        self.send(ServerMessage::error(code, message)).await?;
        Err(Stop::Reported)
    }
}

/// Encodes contiguous ops starting at `first_seq` as `ops` frames of at most
/// `FRAME_BYTES` each (an op larger than that gets a frame of its own).
fn ops_frames<'a>(
    namespace: &str,
    first_seq: u64,
    bodies: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<String> {
    let mut frames = Vec::new();
    let mut group: Vec<&[u8]> = Vec::new();
    let mut group_start = first_seq;
    let mut size = 0;
    for (i, body) in bodies.into_iter().enumerate() {
        if !group.is_empty() && size + body.len() > FRAME_BYTES {
            frames.push(encode_ops_frame(namespace, group_start, group.drain(..)));
            group_start = first_seq + i as u64;
            size = 0;
        }
        size += body.len();
        group.push(body);
    }
    if !group.is_empty() {
        frames.push(encode_ops_frame(namespace, group_start, group));
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_frames_split_by_bytes_and_keep_the_sequence() {
        let small = b"\"small\"".to_vec();
        let big = format!("\"{}\"", "b".repeat(FRAME_BYTES)).into_bytes();
        let bodies: Vec<&[u8]> = vec![&small, &small, &big, &small, &big];
        let frames = ops_frames("ns", 7, bodies);
        let starts: Vec<u64> = frames
            .iter()
            .map(|f| {
                serde_json::from_str::<serde_json::Value>(f)
                    .ok()
                    .and_then(|v| v["seq_start"].as_u64())
                    .unwrap_or(0)
            })
            .collect();
        assert_eq!(starts, vec![7, 9, 10, 11]);
        assert!(frames.iter().all(|f| f.len() <= FRAME_BYTES + 200));
    }

    #[test]
    fn a_lone_live_op_is_the_frame_a_socket_would_build() {
        let body = r#"{"op_id":"a","server_seq":5,"value":"é"}"#.as_bytes();
        let entry = |payload: &[u8]| ultrasync_shared::log::LogEntry {
            stream_seq: 9,
            server_seq: 5,
            op_id: "a".to_owned(),
            payload: bytes::Bytes::copy_from_slice(payload),
        };
        let op = LiveOp::new(entry(body), "ns");
        let built = ops_frames("ns", 5, [body]);
        assert_eq!(built.len(), 1);
        assert_eq!(op.frame().as_str(), built[0]);
        assert_eq!(op.body.as_ref(), body, "the body is kept as stored");
        // A body that is not UTF-8 (never written by the sequencer) is kept apart.
        let odd = LiveOp::new(entry(b"\"\xff\""), "ns");
        assert_eq!(odd.body.as_ref(), b"\"\xff\"");
    }
}
