//! Commands on their way to `USYNC_CMDS`, grouped per stream key.
//!
//! Every socket and HTTP request hands its commands here; one task per stream key
//! publishes them in arrival order. A command arriving while the key's publish
//! depth is used up waits for the next message, which then carries every command
//! that waited (one per line, [`nats::HDR_BATCH`]). At low load each command goes
//! out alone at once; under load one message, one store ack and one delivery to the
//! sequencer serve many commands.
//!
//! A command whose message the stream refuses is answered with `unavailable`
//! through the same route its answer would take, so the sender retries it.
//!
//! Beside a sequencer in the same process (`ultrasync serve`), a key's task first
//! offers each message to it (`ultrasync_shared::local`): taken, the message skips
//! `USYNC_CMDS` and its store ack. Once the sequencer refuses one (it does not hold
//! the key's partition, or the key's queue is full), the task publishes to
//! `USYNC_CMDS`: what it offered before is already in the sequencer's queue, so the
//! key's commands still reach it in order. It offers (at first, and again after a
//! refusal) only when the sequencer would take the key and the stream holds none of
//! its commands (every one published has been sequenced and acked), asking at most
//! every [`BACK_TO_LOCAL`], so that nothing it offers can overtake a command still
//! waiting in the stream.
//!
//! `USYNC_CMDS` is shared by every tenant and refuses new messages when full, so one
//! org's share is bounded twice (SPEC invariant 9). Here: the commands and bytes one
//! org has waiting on this gateway or on their way into the stream
//! (`gateway.org_max_inflight_commands` / `org_max_inflight_bytes`); more are refused
//! at once with `rate_limited`, without touching the other orgs' queues. In the stream:
//! messages per subject, i.e. per stream key (see `cmds_stream_config`); a store
//! refused for that limit is answered `rate_limited` too. A key's task and map entry
//! go away once the key has been idle for [`IDLE`], so the map holds only the keys
//! written lately, not every key ever written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tracing::warn;
use ultrasync_shared::ErrorCode;
use ultrasync_shared::config::GatewayConfig;
use ultrasync_shared::local::{self, Local};
use ultrasync_shared::nats;
use ultrasync_shared::protocol::ServerMessage;
use ultrasync_shared::trace::{self, Span};

use crate::Routes;

/// Messages in flight per stream key before commands start to gather.
const DEPTH: usize = 2;
/// Most commands in one message.
const MAX_COMMANDS: usize = 500;
/// Most bytes in one message (a single larger command still goes, alone).
const MAX_BYTES: usize = 512 * 1024;
/// Commands waiting per stream key before new ones are refused.
const QUEUE: usize = 8192;
/// A key's task with nothing to do for this long exits and leaves the map.
const IDLE: Duration = Duration::from_secs(30);
/// How often a key's task publishing to `USYNC_CMDS` asks whether it may offer to
/// the sequencer of its process again.
const BACK_TO_LOCAL: Duration = Duration::from_secs(1);
/// What the stream answers when a stream key holds `max_messages_per_subject`.
const PER_SUBJECT_FULL: &str = "maximum messages per subject exceeded";

/// One encoded command and where its answer goes.
pub struct Queued {
    pub body: bytes::Bytes,
    /// The route (session or request id) that waits for the answer.
    pub route: String,
    pub command_id: String,
    /// Its `gateway.publish` span (ends at the store ack; its context goes with the
    /// command to the sequencer).
    pub span: Span,
}

/// How much one org may have waiting on this gateway (`gateway.org_max_inflight_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgLimits {
    pub commands: usize,
    pub bytes: usize,
}

impl OrgLimits {
    pub fn from_config(config: &GatewayConfig) -> Self {
        Self {
            commands: config.org_max_inflight_commands,
            bytes: config.org_max_inflight_bytes,
        }
    }
}

impl Default for OrgLimits {
    fn default() -> Self {
        Self::from_config(&GatewayConfig::default())
    }
}

/// Commands and bytes each org has between `submit` and the stream's store ack (or
/// its refusal). Orgs with nothing waiting leave the map.
#[derive(Debug)]
struct Budget {
    limits: OrgLimits,
    used: Mutex<HashMap<String, (usize, usize)>>,
}

impl Budget {
    fn new(limits: OrgLimits) -> Self {
        Self {
            limits,
            used: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (usize, usize)>> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one command of `bytes` for `org`, unless that is over its share. A
    /// single command larger than the byte share still goes when the org has nothing
    /// else waiting (its size is bounded by the frame limit).
    fn take(&self, org: &str, bytes: usize) -> Result<(), String> {
        let mut used = self.lock();
        let (commands, queued) = used.get(org).copied().unwrap_or((0, 0));
        if commands >= self.limits.commands {
            return Err(format!(
                "this org has {commands} commands waiting to be queued, the most it may; retry"
            ));
        }
        if commands > 0 && queued.saturating_add(bytes) > self.limits.bytes {
            return Err(format!(
                "this org has {queued} bytes of commands waiting to be queued; retry"
            ));
        }
        used.insert(org.to_owned(), (commands + 1, queued.saturating_add(bytes)));
        Ok(())
    }

    /// `commands` of `bytes` in all left the gateway (stored or refused).
    fn give(&self, org: &str, commands: usize, bytes: usize) {
        let mut used = self.lock();
        if let Some((c, b)) = used.get_mut(org) {
            *c = c.saturating_sub(commands);
            *b = b.saturating_sub(bytes);
            if *c == 0 {
                used.remove(org);
            }
        }
    }

    fn orgs(&self) -> usize {
        self.lock().len()
    }

    fn commands(&self) -> usize {
        self.lock().values().map(|(c, _)| c).sum()
    }
}

/// What a key's task shares with the publisher.
struct Shared {
    js: jetstream::Context,
    routes: Arc<Routes>,
    /// The sequencer of this process, when there is one.
    local: Local,
    budget: Budget,
    keys: Mutex<HashMap<String, Key>>,
    /// Tells a key's map entry from the one that replaced it.
    generation: AtomicU64,
}

impl Shared {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, Key>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `cmd` will not be stored: its sender is told and its org's share freed.
    fn refuse(&self, org: &str, cmd: Queued, code: ErrorCode, why: &str) {
        self.budget.give(org, 1, cmd.body.len());
        refuse(&self.routes, cmd, code, why);
    }
}

struct Key {
    tx: mpsc::Sender<Queued>,
    generation: u64,
}

/// The gateway's command publisher.
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// A publisher to `USYNC_CMDS`, offering to the sequencer of this process
    /// registered in `local` first.
    pub fn with_limits(
        js: jetstream::Context,
        routes: Arc<Routes>,
        limits: OrgLimits,
        local: Local,
    ) -> Arc<Self> {
        Arc::new(Self {
            shared: Arc::new(Shared {
                js,
                routes,
                local,
                budget: Budget::new(limits),
                keys: Mutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// Stream keys with a publishing task right now.
    pub fn key_count(&self) -> usize {
        self.shared.keys().len()
    }

    /// Orgs with commands waiting on this gateway, and those commands.
    pub fn waiting(&self) -> (usize, usize) {
        (self.shared.budget.orgs(), self.shared.budget.commands())
    }

    /// Renders the publisher's sizes on `/metrics`.
    pub fn export(self: &Arc<Self>, metrics: &crate::Metrics) {
        let probe = |name, help, read: fn(&Self) -> u64| {
            let weak = Arc::downgrade(self);
            let value = move || weak.upgrade().map_or(0, |p| read(&p));
            metrics.probe(name, "gauge", help, Box::new(value));
        };
        probe(
            "ultrasync_gateway_publisher_stream_keys",
            "Stream keys with a command publishing task.",
            |p| p.key_count() as u64,
        );
        probe(
            "ultrasync_gateway_commands_waiting",
            "Commands waiting on this gateway or on their way into USYNC_CMDS.",
            |p| p.waiting().1 as u64,
        );
        probe(
            "ultrasync_gateway_orgs_waiting",
            "Orgs with commands waiting on this gateway.",
            |p| p.waiting().0 as u64,
        );
    }

    /// Queues a command for `subject`. It is answered later: by the sequencer, or
    /// with a reject when it cannot be queued or stored. Refused at once with
    /// `rate_limited` when its org has its share of commands or bytes waiting.
    pub fn submit(&self, subject: String, cmd: Queued) {
        let org = org_of(&subject).to_owned();
        if let Err(why) = self.shared.budget.take(&org, cmd.body.len()) {
            return refuse(&self.shared.routes, cmd, ErrorCode::RateLimited, &why);
        }
        let mut cmd = cmd;
        for _ in 0..2 {
            let tx = {
                let mut keys = self.shared.keys();
                match keys.get(&subject) {
                    Some(key) if !key.tx.is_closed() => key.tx.clone(),
                    _ => {
                        let (tx, rx) = mpsc::channel(QUEUE);
                        let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(run_key(
                            self.shared.clone(),
                            subject.clone(),
                            org.clone(),
                            generation,
                            rx,
                        ));
                        keys.insert(
                            subject.clone(),
                            Key {
                                tx: tx.clone(),
                                generation,
                            },
                        );
                        tx
                    }
                }
            };
            match tx.try_send(cmd) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    return self.shared.refuse(
                        &org,
                        back,
                        ErrorCode::RateLimited,
                        "too many commands waiting for this namespace; retry",
                    );
                }
                // The key's task went idle between the lookup and the send.
                Err(mpsc::error::TrySendError::Closed(back)) => cmd = back,
            }
        }
        self.shared.refuse(
            &org,
            cmd,
            ErrorCode::Unavailable,
            "the command queue is unavailable; retry",
        );
    }
}

/// The org of a `usync.cmd.{org}.{project}.{namespace}` subject (ids are checked
/// before they become part of a subject, so they hold no dots).
fn org_of(subject: &str) -> &str {
    subject.split('.').nth(2).unwrap_or(subject)
}

fn refuse(routes: &Routes, cmd: Queued, code: ErrorCode, why: &str) {
    let msg = ServerMessage::reject(cmd.command_id, code, why);
    routes.deliver(&cmd.route, vec![msg.encode().into_bytes()]);
}

/// Publishes one stream key's commands in order, at most [`DEPTH`] messages in
/// flight, gathering what waits into the next message (or offers each message to
/// the sequencer of this process while it takes them). Idle for [`IDLE`], it stops
/// taking commands, finishes what it has and leaves the map.
async fn run_key(
    shared: Arc<Shared>,
    subject: String,
    org: String,
    generation: u64,
    mut rx: mpsc::Receiver<Queued>,
) {
    let mut inflight = FuturesUnordered::new();
    let intake = shared.local.commands();
    // Offering to the sequencer of this process; when not, see whether it may from
    // this time on. A new task asks too: the one before it may have left commands
    // waiting in the stream.
    let mut offering = false;
    let mut back_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            Some((result, batch)) = inflight.next(), if !inflight.is_empty() => {
                settle(&shared, &subject, &org, result, batch);
            }
            got = rx.recv(), if inflight.len() < DEPTH => {
                let Some(first) = got else { break };
                let mut batch = vec![first];
                let mut bytes = batch[0].body.len();
                while batch.len() < MAX_COMMANDS && bytes < MAX_BYTES {
                    match rx.try_recv() {
                        Ok(c) => {
                            bytes += c.body.len() + 1;
                            batch.push(c);
                        }
                        Err(_) => break,
                    }
                }
                if let Some(to) = &intake {
                    if !offering
                        && inflight.is_empty()
                        && tokio::time::Instant::now() >= back_at
                    {
                        back_at = tokio::time::Instant::now() + BACK_TO_LOCAL;
                        offering = to.would_take(&subject)
                            && stream_holds_none(&shared.js, &subject).await;
                    }
                    if offering {
                        if to.offer(&subject, offered(&shared.routes, &batch)).is_ok() {
                            settle(&shared, &subject, &org, Ok(()), batch);
                            continue;
                        }
                        offering = false;
                        back_at = tokio::time::Instant::now() + BACK_TO_LOCAL;
                    }
                }
                inflight.push(publish(shared.js.clone(), subject.clone(), batch));
            }
            _ = tokio::time::sleep(IDLE), if inflight.is_empty() => {
                rx.close();
            }
        }
    }
    // Closed: finish what is in flight.
    while let Some((result, batch)) = inflight.next().await {
        settle(&shared, &subject, &org, result, batch);
    }
    let mut keys = shared.keys();
    if keys
        .get(&subject)
        .is_some_and(|k| k.generation == generation)
    {
        keys.remove(&subject);
    }
}

/// A message was stored (its commands' share is freed) or refused (its commands are
/// answered with a reject, which frees it too).
fn settle(
    shared: &Shared,
    subject: &str,
    org: &str,
    result: Result<(), String>,
    batch: Vec<Queued>,
) {
    match result {
        Ok(()) => {
            let bytes = batch.iter().map(|c| c.body.len()).sum();
            shared.budget.give(org, batch.len(), bytes);
        }
        Err(why) if why.contains(PER_SUBJECT_FULL) => {
            for cmd in batch {
                shared.refuse(
                    org,
                    cmd,
                    ErrorCode::RateLimited,
                    "too many commands queued for this namespace; retry",
                );
            }
        }
        Err(why) => {
            warn!(subject, error = %why, "commands not accepted by USYNC_CMDS");
            for cmd in batch {
                shared.refuse(
                    org,
                    cmd,
                    ErrorCode::Unavailable,
                    "the command queue is unavailable; retry",
                );
            }
        }
    }
}

/// Whether `USYNC_CMDS` holds no command for `subject` (`usync.cmd.{org}.{project}.
/// {ns}`, stored as `usync.cmdp.{p}.{org}.{project}.{ns}`): every one published has
/// been sequenced and acked. `false` when the stream cannot tell.
async fn stream_holds_none(js: &jetstream::Context, subject: &str) -> bool {
    let Some(filter) = nats::stored_cmd_filter(subject) else {
        return false;
    };
    let Ok(stream) = js.get_stream_no_info(nats::CMDS_STREAM).await else {
        return false;
    };
    let Ok(mut subjects) = stream.info_with_subjects(filter).await else {
        return false;
    };
    while let Some(item) = subjects.next().await {
        match item {
            Ok((_, 0)) => {}
            _ => return false,
        }
    }
    true
}

/// `batch` as the sequencer of this process takes it.
fn offered(routes: &Routes, batch: &[Queued]) -> Vec<local::Command> {
    batch
        .iter()
        .map(|c| local::Command {
            body: c.body.clone(),
            reply_to: routes.reply_subject(&c.route),
            command_id: c.command_id.clone(),
            traceparent: c.span.traceparent(),
        })
        .collect()
}

/// Publishes `batch` as one message and waits for its store ack. Hands the batch
/// back, so its org's share is freed or its senders are told.
async fn publish(
    js: jetstream::Context,
    subject: String,
    batch: Vec<Queued>,
) -> (Result<(), String>, Vec<Queued>) {
    // Traced commands name their context, by line ([`trace::HDR_TRACE`]).
    let mut headers = HeaderMap::new();
    for (line, cmd) in batch.iter().enumerate() {
        if let Some(tp) = cmd.span.traceparent() {
            headers.append(trace::HDR_TRACE, format!("{line} {tp}").as_str());
        }
    }
    let sent = if let [one] = batch.as_slice() {
        if headers.is_empty() {
            js.publish(subject, one.body.clone()).await
        } else {
            js.publish_with_headers(subject, headers, one.body.clone())
                .await
        }
    } else {
        headers.insert(nats::HDR_BATCH, batch.len().to_string().as_str());
        let docs: Vec<&[u8]> = batch.iter().map(|c| c.body.as_ref()).collect();
        js.publish_with_headers(subject, headers, nats::join_lines(&docs).into())
            .await
    };
    let result = match sent {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = &result {
        for cmd in &batch {
            cmd.span.fail(why.clone());
        }
    }
    (result, batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_org_is_refused_over_its_commands_and_others_are_not() {
        let budget = Budget::new(OrgLimits {
            commands: 2,
            bytes: 1000,
        });
        budget.take("acme", 10).expect("1");
        budget.take("acme", 10).expect("2");
        assert!(budget.take("acme", 10).is_err(), "third command of acme");
        budget
            .take("other", 10)
            .expect("another org has its own share");
        budget.give("acme", 1, 10);
        budget.take("acme", 10).expect("after one was stored");
        assert_eq!(budget.commands(), 3);
    }

    #[test]
    fn an_org_is_refused_over_its_bytes_but_one_large_command_goes() {
        let budget = Budget::new(OrgLimits {
            commands: 100,
            bytes: 100,
        });
        budget
            .take("acme", 500)
            .expect("alone, a large command goes");
        assert!(budget.take("acme", 1).is_err(), "over the bytes");
        budget.give("acme", 1, 500);
        budget.take("acme", 60).expect("60");
        assert!(budget.take("acme", 60).is_err(), "120 > 100");
        budget.take("acme", 40).expect("100");
    }

    #[test]
    fn orgs_with_nothing_waiting_leave_the_map() {
        let budget = Budget::new(OrgLimits::default());
        budget.take("acme", 10).expect("1");
        budget.take("acme", 20).expect("2");
        budget.give("acme", 2, 30);
        budget.give("nobody", 1, 1);
        assert_eq!(budget.orgs(), 0);
    }

    #[test]
    fn the_org_is_read_from_the_subject() {
        assert_eq!(org_of("usync.cmd.acme.p1.todos"), "acme");
    }
}
