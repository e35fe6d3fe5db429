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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tracing::warn;
use ultrasync_shared::ErrorCode;
use ultrasync_shared::nats;
use ultrasync_shared::protocol::ServerMessage;

use crate::Routes;

/// Messages in flight per stream key before commands start to gather.
const DEPTH: usize = 2;
/// Most commands in one message.
const MAX_COMMANDS: usize = 500;
/// Most bytes in one message (a single larger command still goes, alone).
const MAX_BYTES: usize = 512 * 1024;
/// Commands waiting per stream key before new ones are refused.
const QUEUE: usize = 8192;
/// A key's task with nothing to do for this long exits.
const IDLE: Duration = Duration::from_secs(60);

/// One encoded command and where its answer goes.
pub struct Queued {
    pub body: bytes::Bytes,
    /// The route (session or request id) that waits for the answer.
    pub route: String,
    pub command_id: String,
}

/// The gateway's command publisher.
pub struct Publisher {
    js: jetstream::Context,
    routes: Arc<Routes>,
    keys: Mutex<HashMap<String, mpsc::Sender<Queued>>>,
}

impl Publisher {
    pub fn new(js: jetstream::Context, routes: Arc<Routes>) -> Arc<Self> {
        Arc::new(Self {
            js,
            routes,
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// Queues a command for `subject`. It is answered later: by the sequencer, or
    /// with a reject when it cannot be queued or stored.
    pub fn submit(&self, subject: String, cmd: Queued) {
        let mut cmd = cmd;
        for _ in 0..2 {
            let tx = {
                let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
                match keys.get(&subject) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let (tx, rx) = mpsc::channel(QUEUE);
                        tokio::spawn(run_key(
                            self.js.clone(),
                            self.routes.clone(),
                            subject.clone(),
                            rx,
                        ));
                        keys.insert(subject.clone(), tx.clone());
                        tx
                    }
                }
            };
            match tx.try_send(cmd) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    return refuse(
                        &self.routes,
                        back,
                        ErrorCode::RateLimited,
                        "too many commands waiting for this namespace; retry",
                    );
                }
                // The key's task went idle between the lookup and the send.
                Err(mpsc::error::TrySendError::Closed(back)) => cmd = back,
            }
        }
        refuse(
            &self.routes,
            cmd,
            ErrorCode::Unavailable,
            "the command queue is unavailable; retry",
        );
    }
}

fn refuse(routes: &Routes, cmd: Queued, code: ErrorCode, why: &str) {
    let msg = ServerMessage::reject(cmd.command_id, code, why);
    routes.deliver(&cmd.route, vec![msg.encode().into_bytes()]);
}

/// Publishes one stream key's commands in order, at most [`DEPTH`] messages in
/// flight, gathering what waits into the next message.
async fn run_key(
    js: jetstream::Context,
    routes: Arc<Routes>,
    subject: String,
    mut rx: mpsc::Receiver<Queued>,
) {
    let mut inflight = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some((result, waiting)) = inflight.next(), if !inflight.is_empty() => {
                if let Err(why) = result {
                    warn!(subject, error = %why, "commands not accepted by USYNC_CMDS");
                    for cmd in waiting {
                        refuse(&routes, cmd, ErrorCode::Unavailable, "the command queue is unavailable; retry");
                    }
                }
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
                inflight.push(publish(js.clone(), subject.clone(), batch));
            }
            _ = tokio::time::sleep(IDLE), if inflight.is_empty() => {
                rx.close();
            }
        }
    }
    // Closed: finish what is in flight.
    while let Some((result, waiting)) = inflight.next().await {
        if result.is_err() {
            for cmd in waiting {
                refuse(
                    &routes,
                    cmd,
                    ErrorCode::Unavailable,
                    "the command queue is unavailable; retry",
                );
            }
        }
    }
}

/// Publishes `batch` as one message and waits for its store ack. Hands the batch
/// back when it was not stored, so its senders can be told.
async fn publish(
    js: jetstream::Context,
    subject: String,
    batch: Vec<Queued>,
) -> (Result<(), String>, Vec<Queued>) {
    let sent = if let [one] = batch.as_slice() {
        js.publish(subject, one.body.clone()).await
    } else {
        let mut headers = HeaderMap::new();
        headers.insert(nats::HDR_BATCH, batch.len().to_string().as_str());
        let docs: Vec<&[u8]> = batch.iter().map(|c| c.body.as_ref()).collect();
        js.publish_with_headers(subject, headers, nats::join_lines(&docs).into())
            .await
    };
    let result = match sent {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => (Ok(()), Vec::new()),
        Err(e) => (Err(e), batch),
    }
}
