//! Commands from the gateway of this process (`ultrasync serve`), taken without
//! `USYNC_CMDS` for the partitions this instance holds (see
//! `ultrasync_shared::local`).
//!
//! A partition's source opens an entrance here while it runs; the gateway's offer
//! for a stream key of that partition goes into the source's queue, and from there
//! to the key's worker exactly as a message pulled from `USYNC_CMDS` would. What
//! this instance cannot sequence after taking it (the key's queue is full, the
//! partition is given up, a write must be retried) is handed back: published to
//! `USYNC_CMDS` by one task, in the order handed back, after the delay a
//! redelivery would have had. A key whose queue was found full is refused here for
//! a while, so its gateway publishes to `USYNC_CMDS` itself and waits for the
//! stream's store ack as before: a flood is held back the same way on both paths.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream;
use tokio::sync::{Notify, mpsc};
use tracing::warn;
use ultrasync_shared::local::{Command, Commands, Local};
use ultrasync_shared::protocol::ServerMessage;
use ultrasync_shared::{ErrorCode, StreamKey, nats, trace};

use crate::metrics::Metrics;
use crate::source::Fence;

/// Messages from the gateway waiting for a partition's source.
pub const QUEUE: usize = 256;
/// Bytes of commands offered and not yet taken by their source, all partitions
/// together; beyond this offers are refused (the gateway publishes them to
/// `USYNC_CMDS`).
const OFFERED_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Commands (and their bytes) waiting to be handed back; beyond this they are
/// answered `unavailable` (their senders retry) instead.
const HAND_BACK_MAX: usize = 65_536;
const HAND_BACK_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Commands taken from offers and not yet answered or handed back, all partitions
/// together (what `max_ack_pending` bounds for a partition's consumer); beyond this
/// offers are refused.
const IN_PROCESS_MAX: usize = 50_000;
/// Most commands, and bytes, in one hand-back message (as the gateway's).
const HAND_BACK_BATCH: usize = 500;
const HAND_BACK_BATCH_BYTES: usize = 512 * 1024;
/// How long a key whose queue was found full is refused here.
const BUSY_FOR: Duration = Duration::from_millis(500);

/// The bytes of `commands` (their documents).
fn size_of(commands: &[Command]) -> usize {
    commands.iter().map(|c| c.body.len()).sum()
}

/// One message of commands from the gateway, for one stream key.
pub struct Offered {
    pub key: StreamKey,
    /// The commands' bytes, counted in the intake until the source takes them.
    pub bytes: usize,
    /// `usync.cmd.{org}.{project}.{ns}`: where it goes when handed back.
    pub subject: Arc<str>,
    pub commands: Vec<Command>,
}

struct Entrance {
    tx: mpsc::Sender<Offered>,
    fence: Arc<Fence>,
}

/// Commands to publish to `USYNC_CMDS`, not before `at`.
struct HandBack {
    at: tokio::time::Instant,
    subject: Arc<str>,
    commands: Vec<Command>,
}

/// The sequencer's intake of the gateway's commands (one per instance).
pub struct Intake {
    js: jetstream::Context,
    local: Local,
    metrics: Arc<Metrics>,
    /// Partitions of `USYNC_CMDS` (0: not known yet; nothing is taken).
    partitions: AtomicU32,
    open: RwLock<HashMap<u32, Entrance>>,
    /// Keys refused until the given time.
    busy: Mutex<HashMap<StreamKey, Instant>>,
    hand_back: Mutex<VecDeque<HandBack>>,
    /// Commands and bytes waiting to be handed back.
    handing_back: AtomicUsize,
    handing_back_bytes: AtomicUsize,
    /// Bytes offered and not yet taken by a source.
    offered_bytes: AtomicUsize,
    /// Commands offered and not yet answered or handed back.
    in_process: AtomicUsize,
    wake: Arc<Notify>,
}

impl Intake {
    /// An intake handing back through `js`, answering through `local`; its task
    /// runs until the last reference is gone.
    pub fn new(js: jetstream::Context, local: Local, metrics: Arc<Metrics>) -> Arc<Self> {
        let intake = Arc::new(Self {
            js,
            local,
            metrics,
            partitions: AtomicU32::new(0),
            open: RwLock::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            hand_back: Mutex::new(VecDeque::new()),
            handing_back: AtomicUsize::new(0),
            handing_back_bytes: AtomicUsize::new(0),
            offered_bytes: AtomicUsize::new(0),
            in_process: AtomicUsize::new(0),
            wake: Arc::new(Notify::new()),
        });
        tokio::spawn(hand_back_loop(Arc::downgrade(&intake)));
        intake
    }

    fn open_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u32, Entrance>> {
        self.open.read().unwrap_or_else(|p| p.into_inner())
    }

    fn open_map_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, Entrance>> {
        self.open.write().unwrap_or_else(|p| p.into_inner())
    }

    fn busy_keys(&self) -> std::sync::MutexGuard<'_, HashMap<StreamKey, Instant>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<HandBack>> {
        self.hand_back.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partition `p` of `partitions` takes offered commands while `fence` is valid;
    /// its source reads them from the returned queue.
    pub fn open(&self, p: u32, partitions: u32, fence: Arc<Fence>) -> mpsc::Receiver<Offered> {
        let (tx, rx) = mpsc::channel(QUEUE);
        self.partitions.store(partitions, Ordering::Release);
        self.open_map_mut().insert(p, Entrance { tx, fence });
        rx
    }

    /// Partition `p` takes no more offers.
    pub fn close(&self, p: u32) {
        self.open_map_mut().remove(&p);
    }

    /// A source took `offered` from its queue.
    pub fn took(&self, offered: &Offered) {
        self.offered_bytes
            .fetch_sub(offered.bytes, Ordering::AcqRel);
    }

    /// `key`'s queue was full: refuse its offers for a while.
    pub fn mark_busy(&self, key: &StreamKey) {
        let mut busy = self.busy_keys();
        let now = Instant::now();
        busy.retain(|_, until| *until > now);
        busy.insert(key.clone(), now + BUSY_FOR);
    }

    fn is_busy(&self, key: &StreamKey) -> bool {
        let busy = self.busy_keys();
        !busy.is_empty() && busy.get(key).is_some_and(|until| *until > Instant::now())
    }

    /// Publishes `commands` to `USYNC_CMDS` at `subject` after `delay`, after every
    /// hand-back before it, as the gateway would have published them.
    pub fn hand_back(&self, subject: Arc<str>, commands: Vec<Command>, delay: Duration) {
        if commands.is_empty() {
            return;
        }
        let n = commands.len();
        let bytes = size_of(&commands);
        let over = self.handing_back.fetch_add(n, Ordering::AcqRel) + n > HAND_BACK_MAX;
        let over_bytes = self.handing_back_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes
            > HAND_BACK_MAX_BYTES;
        if over || over_bytes {
            self.handing_back.fetch_sub(n, Ordering::AcqRel);
            self.handing_back_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return self.answer_unavailable(commands, "the sequencer is busy; retry");
        }
        self.metrics.handed_back(n);
        let at = tokio::time::Instant::now() + delay;
        let mut queue = self.queue();
        // Commands handed back one by one (a batch given up) go in one message.
        match queue.back_mut() {
            Some(last)
                if last.subject == subject
                    && last.at <= at
                    && last.commands.len() + n <= HAND_BACK_BATCH
                    && size_of(&last.commands) + bytes <= HAND_BACK_BATCH_BYTES =>
            {
                last.commands.extend(commands);
            }
            _ => queue.push_back(HandBack {
                at,
                subject,
                commands,
            }),
        }
        drop(queue);
        self.wake.notify_one();
    }

    /// Waits (at most `within`) until everything handed back is published.
    pub async fn flush(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.handing_back.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn answer_unavailable(&self, commands: Vec<Command>, why: &str) {
        for c in commands {
            let Some((gateway, session)) = self.local.answers_for(&c.reply_to) else {
                continue;
            };
            let reject = ServerMessage::reject(&c.command_id, ErrorCode::Unavailable, why);
            gateway.deliver(session, vec![reject.encode().into_bytes()]);
        }
    }

    async fn publish(&self, job: HandBack) {
        let mut headers = HeaderMap::new();
        for (line, c) in job.commands.iter().enumerate() {
            if let Some(tp) = &c.traceparent {
                headers.append(trace::HDR_TRACE, format!("{line} {tp}").as_str());
            }
        }
        let body = match job.commands.as_slice() {
            [one] => one.body.clone(),
            many => {
                headers.insert(nats::HDR_BATCH, many.len().to_string().as_str());
                let docs: Vec<&[u8]> = many.iter().map(|c| c.body.as_ref()).collect();
                nats::join_lines(&docs).into()
            }
        };
        let stored = match self
            .js
            .publish_with_headers(job.subject.to_string(), headers, body)
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = stored {
            warn!(subject = %job.subject, error = %e, "handing commands back to USYNC_CMDS failed; their senders are told to retry");
            self.answer_unavailable(job.commands, "the command queue is unavailable; retry");
        }
    }
}

impl Intake {
    /// The key of `subject` and its partition's entrance, when this instance takes
    /// offers for it now.
    fn entrance_for<'a>(
        &self,
        subject: &str,
        open: &'a HashMap<u32, Entrance>,
    ) -> Option<(StreamKey, &'a Entrance)> {
        let partitions = self.partitions.load(Ordering::Acquire);
        if partitions == 0 {
            return None;
        }
        let Some((None, key)) = nats::parse_cmd_subject(subject) else {
            return None;
        };
        if self.is_busy(&key) {
            return None;
        }
        let entrance = open
            .get(&nats::partition_of(&key, partitions))
            .filter(|e| e.fence.valid())?;
        Some((key, entrance))
    }

    /// `n` commands taken from offers were answered or handed back.
    fn finished(&self, n: usize) {
        self.in_process.fetch_sub(n, Ordering::AcqRel);
    }

    /// Hands back a whole offered message its source did not take into workers.
    pub fn hand_back_offered(&self, offered: Offered, delay: Duration) {
        self.finished(offered.commands.len());
        self.hand_back(offered.subject, offered.commands, delay);
    }
}

impl Commands for Intake {
    fn would_take(&self, subject: &str) -> bool {
        self.entrance_for(subject, &self.open_map()).is_some()
    }

    fn offer(&self, subject: &str, commands: Vec<Command>) -> Result<(), Vec<Command>> {
        let open = self.open_map();
        let Some((key, entrance)) = self.entrance_for(subject, &open) else {
            return Err(commands);
        };
        let (n, bytes) = (commands.len(), size_of(&commands));
        let over = self.in_process.fetch_add(n, Ordering::AcqRel) + n > IN_PROCESS_MAX;
        let over_bytes =
            self.offered_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > OFFERED_MAX_BYTES;
        if over || over_bytes {
            self.in_process.fetch_sub(n, Ordering::AcqRel);
            self.offered_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(commands);
        }
        let offered = Offered {
            key,
            bytes,
            subject: subject.into(),
            commands,
        };
        entrance.tx.try_send(offered).map_err(|e| match e {
            mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => {
                self.in_process.fetch_sub(n, Ordering::AcqRel);
                self.offered_bytes.fetch_sub(o.bytes, Ordering::AcqRel);
                o.commands
            }
        })
    }
}

/// A command a worker took from an offer. Answered, it is done; dropped before it
/// was answered or handed back (its batch given up, its worker gone), it is handed
/// back, as a message not acked would be redelivered.
pub struct Taken {
    intake: Arc<Intake>,
    subject: Arc<str>,
    command: Mutex<Option<Command>>,
}

impl Taken {
    pub fn new(intake: Arc<Intake>, subject: Arc<str>, command: Command) -> Self {
        Self {
            intake,
            subject,
            command: Mutex::new(Some(command)),
        }
    }

    fn take(&self) -> Option<Command> {
        self.command
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Answered: nothing to hand back.
    pub fn answered(&self) {
        if self.take().is_some() {
            self.intake.finished(1);
        }
    }

    /// To be sequenced again after `delay`, by whichever instance then holds it.
    pub fn hand_back(&self, delay: Duration) {
        if let Some(c) = self.take() {
            self.intake.finished(1);
            self.intake.hand_back(self.subject.clone(), vec![c], delay);
        }
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.hand_back(Duration::ZERO);
    }
}

/// Publishes hand-backs one after another, each at its time.
async fn hand_back_loop(intake: std::sync::Weak<Intake>) {
    loop {
        let Some(this) = intake.upgrade() else { return };
        let next = this.queue().pop_front();
        match next {
            Some(job) => {
                tokio::time::sleep_until(job.at).await;
                let (n, bytes) = (job.commands.len(), size_of(&job.commands));
                this.publish(job).await;
                this.handing_back.fetch_sub(n, Ordering::AcqRel);
                this.handing_back_bytes.fetch_sub(bytes, Ordering::AcqRel);
            }
            None => {
                let wake = this.wake.clone();
                let woken = wake.notified();
                drop(this);
                // Wakes for new work, and now and then to notice the intake is gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn command(i: usize, bytes: usize) -> Command {
        Command {
            body: Bytes::from(vec![b'x'; bytes.max(1)]),
            reply_to: "usync.reply.g.s".to_owned(),
            command_id: format!("c{i}"),
            traceparent: None,
        }
    }

    fn key(project: &str) -> StreamKey {
        StreamKey::parse("acme", project, "index").expect("key")
    }

    #[tokio::test]
    async fn offers_are_taken_for_a_held_partition_only_and_within_bounds() {
        // Never connected: offers never touch NATS.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("client");
        let intake = Intake::new(
            jetstream::new(client),
            Local::default(),
            Arc::new(Metrics::default()),
        );
        let a = key("a");
        // Another key of the same partition, and one of another partition.
        let same = (0..)
            .map(|i| key(&format!("p{i}")))
            .find(|k| nats::partition_of(k, 16) == nats::partition_of(&a, 16))
            .expect("a key of the same partition");
        let other = (0..)
            .map(|i| key(&format!("q{i}")))
            .find(|k| nats::partition_of(k, 16) != nats::partition_of(&a, 16))
            .expect("a key of another partition");
        let offer = |k: &StreamKey, n: usize, bytes: usize| {
            intake
                .offer(
                    &nats::cmd_subject(k),
                    (0..n).map(|i| command(i, bytes)).collect(),
                )
                .is_ok()
        };
        assert!(!offer(&a, 1, 10), "no partition is held yet");

        let fence = Arc::new(Fence::new());
        fence.renew(Instant::now() + Duration::from_secs(60));
        let mut rx = intake.open(nats::partition_of(&a, 16), 16, fence.clone());
        assert!(intake.would_take(&nats::cmd_subject(&a)));
        assert!(!intake.would_take(&nats::cmd_subject(&other)));
        assert!(offer(&a, 2, 10));
        let taken = rx.try_recv().expect("queued for the source");
        assert_eq!((taken.key.clone(), taken.commands.len()), (a.clone(), 2));
        intake.took(&taken);
        assert!(!offer(&other, 1, 10), "another partition is not held");

        // A key found busy is refused a while; its neighbours are not.
        intake.mark_busy(&a);
        assert!(!intake.would_take(&nats::cmd_subject(&a)));
        assert!(!offer(&a, 1, 10), "a busy key");
        assert!(offer(&same, 1, 10), "another key of the partition");
        intake.took(&rx.try_recv().expect("queued"));

        // Bounds: messages per partition, then bytes over all.
        let mut queued = 0;
        while offer(&same, 1, 10) {
            queued += 1;
        }
        assert_eq!(queued, QUEUE);
        while let Ok(o) = rx.try_recv() {
            intake.took(&o);
        }
        assert!(!offer(&same, 1, OFFERED_MAX_BYTES + 1), "over the bytes");
        assert!(offer(&same, 1, 10), "what was taken is counted off");
        intake.took(&rx.try_recv().expect("queued"));

        // A revoked fence, and a closed partition, take nothing.
        fence.revoke();
        assert!(!offer(&same, 1, 10), "the lease may have moved");
        fence.renew(Instant::now() + Duration::from_secs(60));
        assert!(offer(&same, 1, 10));
        intake.close(nats::partition_of(&a, 16));
        assert!(!offer(&same, 1, 10), "the partition was given up");
        assert!(
            rx.try_recv().is_ok(),
            "what was queued stays for the source"
        );
    }
}
