//! One WebSocket session: hello, subscriptions, commands, cursors, pings. Every frame
//! is authorized against the verified token, not only the handshake, and counted
//! against the socket's and the actor's budgets (`rules::limits`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::error::close;
use ultrasync_shared::ids::Id;
use ultrasync_shared::namespaces::Mode;
use ultrasync_shared::protocol::{ClientMessage, CommandFrame, PROTOCOL_VERSION, ServerMessage};
use ultrasync_shared::trace::Span;
use ultrasync_shared::{ErrorCode, StreamKey, validate_key};

use super::follow::Follower;
use super::outbound::{self, OutQueue, OutReceiver, Outbound, Refused};
use crate::presence::Room;
use crate::rules::auth::Connected;
use crate::rules::limits::{RateLimit, SocketSlot};
use crate::rules::{Refusal, access, commands};
use crate::{AppState, Metrics, spans};

/// How often the server pings an idle socket.
const PING_EVERY: Duration = Duration::from_secs(20);
/// A socket silent for this long (no frame, no pong) is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// The close reason for a socket that kept flooding.
const RATE_LIMITED: &str = "rate limit";
/// How long a close lingers for a peer that may still be sending.
const LINGER: Duration = Duration::from_millis(500);
/// Longest one frame may take to reach a peer before it counts as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands one socket may have waiting for the sequencer.
const MAX_INFLIGHT: usize = 10_000;

/// Who the socket is after `hello`.
struct Bound {
    org: Id,
    project: Id,
    client_id: Id,
}

pub struct Session {
    state: Arc<AppState>,
    principal: Principal,
    session_id: String,
    out: OutQueue,
    /// Answers from the sequencer, routed here by the gateway's reply subscription.
    replies: mpsc::Receiver<Vec<Vec<u8>>>,
    slow: CancellationToken,
    bound: Option<Bound>,
    followers: HashMap<String, JoinHandle<()>>,
    /// Commands sent on and not yet answered: when each arrived, and its span.
    inflight: HashMap<String, (Instant, Span)>,
    /// Presence keys this socket shows (cleared with `null` on disconnect).
    presence_keys: std::collections::HashSet<String>,
    /// This socket's place in its actor's and org's socket budget.
    _slot: SocketSlot,
    /// Its credential's registration (closes the socket when revoked) and the
    /// embedder's leave to connect (`on_disconnect` when dropped).
    connected: Connected,
}

/// Why the session loop ended, and the close frame to send.
struct Closing(u16, String);

impl Session {
    pub async fn run(
        state: Arc<AppState>,
        socket: WebSocket,
        principal: Principal,
        slot: SocketSlot,
        connected: Connected,
    ) {
        let session_id = connected.session_id.clone();
        let (out, mut out_rx) = outbound::channel(
            state.config.gateway.outbound_queue,
            state.config.gateway.max_outbound_bytes,
        );
        let replies = state.routes.register(&session_id);
        let mut session = Session {
            state: state.clone(),
            principal,
            session_id: session_id.clone(),
            out,
            replies,
            slow: CancellationToken::new(),
            bound: None,
            followers: HashMap::new(),
            inflight: HashMap::new(),
            presence_keys: Default::default(),
            _slot: slot,
            connected,
        };
        state
            .metrics
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let probe = session.out.downgrade();
        state
            .metrics
            .track_queue(&session_id, Box::new(move || probe.frames()));
        let (mut sink, mut stream) = socket.split();
        let closing = session.serve(&mut sink, &mut stream, &mut out_rx).await;
        for (_, f) in session.followers.drain() {
            f.abort();
        }
        out_rx.close();
        session.leave_presence().await;
        state.routes.unregister(&session_id);
        state.metrics.untrack_queue(&session_id);
        state
            .metrics
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let Closing(code, reason) = closing;
        debug!(session = %session_id, code, %reason, "socket closing");
        let lingers = code == close::TOO_BIG || reason == RATE_LIMITED;
        // Frames already queued (an error explaining the close, acks) go out first,
        // unless the socket is being dropped for not reading them.
        if code != close::SLOW_CONSUMER {
            let flush = async {
                while let Some(item) = out_rx.try_recv() {
                    for text in item.into_texts() {
                        if sink.send(Message::Text(text)).await.is_err() {
                            return;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
        }
        // A peer that does not read may never take the close frame: do not wait long.
        let close_frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(close_frame)).await;
        if lingers {
            // The peer is likely still sending: closing with its data unread makes the
            // kernel reset the connection, and the peer could lose the close frame.
            // Linger a little, reading and dropping what it sends.
            let drain = async {
                while let Some(Ok(_)) = stream.next().await {}
                tokio::time::sleep(LINGER).await;
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    }

    async fn serve(
        &mut self,
        sink: &mut futures::stream::SplitSink<WebSocket, Message>,
        stream: &mut futures::stream::SplitStream<WebSocket>,
        out_rx: &mut OutReceiver,
    ) -> Closing {
        let shutdown = self.state.shutdown.clone();
        let expiry = tokio::time::sleep(Duration::from_secs(self.principal.expires_in()));
        tokio::pin!(expiry);
        let revoked = self.connected.registration.revoked.clone();
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        let mut last_heard = Instant::now();
        let mut limit = RateLimit::new(self.state.config.gateway.max_messages_per_sec);
        let hello_deadline = tokio::time::sleep(Duration::from_secs(
            self.state.config.gateway.hello_timeout_secs,
        ));
        tokio::pin!(hello_deadline);
        let command_timeout = Duration::from_secs(self.state.config.gateway.command_timeout_secs);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    return Closing(close::TRY_AGAIN_LATER, "server shutting down".into());
                }
                _ = self.slow.cancelled() => return self.slow_consumer(),
                _ = &mut expiry => {
                    return Closing(close::POLICY, "token expired".into());
                }
                _ = revoked.cancelled() => {
                    return Closing(close::POLICY, "credential revoked".into());
                }
                _ = &mut hello_deadline, if self.bound.is_none() => {
                    self.push(ServerMessage::error(ErrorCode::InvalidMessage, "no hello in time"));
                    return Closing(close::POLICY, "no hello".into());
                }
                frame = out_rx.recv() => {
                    let Some(item) = frame else {
                        return Closing(close::INTERNAL, "outbound queue closed".into());
                    };
                    let len = item.len();
                    let written = self.write_all(sink, item.into_texts(), &shutdown).await;
                    out_rx.done(len);
                    if let Some(c) = written {
                        return c;
                    }
                }
                reply = self.replies.recv() => {
                    let Some(reply) = reply else {
                        return Closing(close::INTERNAL, "reply route closed".into());
                    };
                    self.on_replies(reply);
                }
                inbound = stream.next() => {
                    last_heard = Instant::now();
                    match inbound {
                        None => return Closing(close::NORMAL, "peer gone".into()),
                        Some(Err(e)) => {
                            // tungstenite reports an over-long frame or message as a
                            // capacity error ("Space limit exceeded: Message too long").
                            let text = e.to_string();
                            if text.contains("too long") || text.contains("Space limit") {
                                self.push(ServerMessage::error(ErrorCode::PayloadTooLarge, format!("frame too large: {text}")));
                                return Closing(close::TOO_BIG, "frame too large".into());
                            }
                            return Closing(close::NORMAL, "peer gone".into());
                        }
                        Some(Ok(Message::Text(text))) => {
                            Metrics::inc(&self.state.metrics.messages_in);
                            if !limit.take() {
                                if limit.exhausted() {
                                    self.push(ServerMessage::error(ErrorCode::RateLimited, "too many frames; closing"));
                                    return Closing(close::POLICY, RATE_LIMITED.into());
                                }
                                self.refuse_rate_limited(text.as_str());
                                continue;
                            }
                            if let Some(c) = self.on_frame(text.as_str()).await {
                                return c;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            // Every frame counts against the socket's rate, whatever
                            // its kind.
                            if !limit.take() {
                                if limit.exhausted() {
                                    self.push(ServerMessage::error(ErrorCode::RateLimited, "too many frames; closing"));
                                    return Closing(close::POLICY, RATE_LIMITED.into());
                                }
                                continue;
                            }
                            self.push(ServerMessage::error(ErrorCode::InvalidMessage, "frames are JSON text"));
                        }
                        Some(Ok(Message::Close(_))) => return Closing(close::NORMAL, "bye".into()),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            if !limit.take() && limit.exhausted() {
                                self.push(ServerMessage::error(ErrorCode::RateLimited, "too many frames; closing"));
                                return Closing(close::POLICY, RATE_LIMITED.into());
                            }
                        }
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > IDLE_LIMIT {
                        return Closing(close::POLICY, "no heartbeat".into());
                    }
                    if let Some(c) = self.write(sink, Message::Ping(Default::default()), &shutdown).await {
                        return c;
                    }
                }
                _ = sweep.tick() => {
                    let now = Instant::now();
                    let expired: Vec<String> = self
                        .inflight
                        .iter()
                        .filter(|(_, (t, _))| now.duration_since(*t) > command_timeout)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in expired {
                        const WHY: &str = "no answer from the sequencer in time; retry with the same command_id";
                        if let Some((_, span)) = self.inflight.remove(&id) {
                            spans::rejected(&span, ErrorCode::Unavailable, WHY);
                        }
                        self.push(ServerMessage::reject(id, ErrorCode::Unavailable, WHY));
                    }
                }
            }
        }
    }

    /// Writes one frame to the socket. The write waits for the peer to read; while it
    /// waits, the socket can still be found a slow consumer (its queue overflowed), the
    /// server can stop, and a peer that takes longer than `WRITE_TIMEOUT` for one frame
    /// is a slow consumer too.
    async fn write(
        &self,
        sink: &mut futures::stream::SplitSink<WebSocket, Message>,
        msg: Message,
        shutdown: &CancellationToken,
    ) -> Option<Closing> {
        if matches!(msg, Message::Text(_)) {
            Metrics::inc(&self.state.metrics.messages_out);
        }
        tokio::select! {
            sent = sink.send(msg) => sent.err().map(|_| Closing(close::NORMAL, "peer gone".into())),
            _ = self.slow.cancelled() => Some(self.slow_consumer()),
            _ = tokio::time::sleep(WRITE_TIMEOUT) => Some(self.slow_consumer()),
            _ = shutdown.cancelled() => Some(Closing(close::TRY_AGAIN_LATER, "server shutting down".into())),
        }
    }

    /// Writes frames with one flush at the end (one socket write for many small
    /// frames). Each frame gets `WRITE_TIMEOUT`: a peer that keeps reading is not a
    /// slow consumer however large the batch. A write the socket takes at once (the
    /// usual case) is done on its first poll, without arming the timer.
    async fn write_all(
        &self,
        sink: &mut futures::stream::SplitSink<WebSocket, Message>,
        texts: Vec<Utf8Bytes>,
        shutdown: &CancellationToken,
    ) -> Option<Closing> {
        let last = texts.len().saturating_sub(1);
        for (i, text) in texts.into_iter().enumerate() {
            Metrics::inc(&self.state.metrics.messages_out);
            let msg = Message::Text(text);
            let step = async {
                match i == last {
                    true => sink.send(msg).await,
                    false => sink.feed(msg).await,
                }
            };
            let mut step = std::pin::pin!(step);
            let sent = match futures::poll!(step.as_mut()) {
                std::task::Poll::Ready(sent) => sent,
                std::task::Poll::Pending => {
                    tokio::select! {
                        sent = step => sent,
                        _ = self.slow.cancelled() => return Some(self.slow_consumer()),
                        _ = tokio::time::sleep(WRITE_TIMEOUT) => return Some(self.slow_consumer()),
                        _ = shutdown.cancelled() => return Some(Closing(close::TRY_AGAIN_LATER, "server shutting down".into())),
                    }
                }
            };
            if sent.is_err() {
                return Some(Closing(close::NORMAL, "peer gone".into()));
            }
        }
        None
    }

    fn slow_consumer(&self) -> Closing {
        self.state
            .metrics
            .slow_consumers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Closing(
            close::SLOW_CONSUMER,
            "slow consumer: resume from your cursor".into(),
        )
    }

    /// Queues a frame; a full queue marks the socket a slow consumer.
    fn push(&self, msg: ServerMessage) {
        if let ServerMessage::Reject { code, .. } = &msg {
            self.state.metrics.reject(*code);
        }
        if let Err(Refused::Full) = self.out.try_push(Outbound::Text(msg.encode())) {
            self.slow.cancel();
        }
    }

    /// Answers a frame refused by the rate limit: a command gets a `reject` (so its
    /// sender knows to retry it), anything else an `error`.
    fn refuse_rate_limited(&self, text: &str) {
        #[derive(serde::Deserialize)]
        struct Peek {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            command_id: String,
        }
        let msg = match serde_json::from_str::<Peek>(text) {
            Ok(p) if p.kind == "command" => ServerMessage::reject(
                p.command_id,
                ErrorCode::RateLimited,
                "too many frames; slow down and retry",
            ),
            _ => ServerMessage::error(ErrorCode::RateLimited, "too many frames; slow down"),
        };
        self.push(msg);
    }

    /// Answers of this socket's commands (several when the sequencer answered a
    /// batch): bookkeeping, then one queue slot for all of them.
    fn on_replies(&mut self, replies: Vec<Vec<u8>>) {
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            command_id: String,
            #[serde(default)]
            code: Option<ErrorCode>,
            #[serde(default)]
            server_seq: Option<u64>,
            #[serde(default)]
            reason: Option<String>,
        }
        let mut texts = Vec::with_capacity(replies.len());
        for reply in replies {
            if let Ok(h) = serde_json::from_slice::<Head>(&reply) {
                let (sent, span) = match self.inflight.remove(&h.command_id) {
                    Some((t, span)) => (Some(t), span),
                    None => (None, Span::off()),
                };
                match (h.kind.as_str(), h.code) {
                    ("ack", _) => {
                        Metrics::inc(&self.state.metrics.acks);
                        if let Some(t) = sent {
                            self.state.metrics.ack_latency(t.elapsed());
                        }
                        if let Some(seq) = h.server_seq {
                            span.set("ultrasync.server_seq", seq as i64);
                        }
                    }
                    (_, Some(code)) => {
                        self.state.metrics.reject(code);
                        spans::rejected(&span, code, h.reason.as_deref().unwrap_or_default());
                    }
                    _ => {}
                }
            }
            if self.state.hooks.observes_answers()
                && let Ok(answer) = serde_json::from_slice::<ServerMessage>(&reply)
            {
                self.state.hooks.after_apply(&self.principal, &answer);
            }
            texts.push(
                String::from_utf8(reply)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            );
        }
        let item = match texts.len() {
            1 => Outbound::Text(texts.pop().unwrap_or_default()),
            _ => Outbound::Texts(texts),
        };
        if let Err(Refused::Full) = self.out.try_push(item) {
            self.slow.cancel();
        }
    }

    async fn on_frame(&mut self, text: &str) -> Option<Closing> {
        let msg = match ClientMessage::decode(text) {
            Ok(m) => m,
            Err(e) => {
                self.push(ServerMessage::error(
                    ErrorCode::InvalidMessage,
                    format!("bad frame: {e}"),
                ));
                return None;
            }
        };
        match msg {
            ClientMessage::Hello {
                protocol,
                org_id,
                project_id,
                client_id,
                cursors,
                mut checkpoints,
            } => {
                if self.bound.is_some() {
                    self.push(ServerMessage::error(
                        ErrorCode::InvalidMessage,
                        "hello was already sent",
                    ));
                    return None;
                }
                let most = self.state.config.gateway.max_subscriptions_per_socket;
                if cursors.len() > most {
                    self.push(ServerMessage::error(
                        ErrorCode::RateLimited,
                        format!(
                            "hello carries {} cursors; a socket follows at most {most} namespaces",
                            cursors.len()
                        ),
                    ));
                    return Some(Closing(close::POLICY, "too many cursors".into()));
                }
                if protocol != PROTOCOL_VERSION {
                    self.push(ServerMessage::error(
                        ErrorCode::InvalidMessage,
                        format!("protocol {protocol} is not spoken here; use {PROTOCOL_VERSION}"),
                    ));
                    return Some(Closing(
                        close::PROTOCOL_MISMATCH,
                        "protocol mismatch".into(),
                    ));
                }
                let ids = (
                    Id::parse("org_id", &org_id),
                    Id::parse("project_id", &project_id),
                    Id::parse("client_id", &client_id),
                );
                let (Ok(org), Ok(project), Ok(client_id)) = ids else {
                    self.push(ServerMessage::error(
                        ErrorCode::InvalidId,
                        "org_id, project_id and client_id must match [A-Za-z0-9_-]{1,64}",
                    ));
                    return Some(Closing(close::POLICY, "invalid id".into()));
                };
                if org != self.principal.org || !self.principal.allows_project(project.as_str()) {
                    self.push(ServerMessage::error(
                        ErrorCode::Forbidden,
                        "the token does not grant this org/project",
                    ));
                    return Some(Closing(close::POLICY, "forbidden".into()));
                }
                self.bound = Some(Bound {
                    org,
                    project,
                    client_id,
                });
                self.push(ServerMessage::Welcome {
                    protocol: PROTOCOL_VERSION,
                    server_id: self.state.gateway_id.clone(),
                    session_id: self.session_id.clone(),
                    actor_id: self.principal.actor_id.to_string(),
                });
                for (ns, cursor) in cursors {
                    let checkpoint = checkpoints.remove(&ns);
                    self.subscribe(&ns, cursor, checkpoint).await;
                }
            }
            _ if self.bound.is_none() => {
                self.push(ServerMessage::error(
                    ErrorCode::InvalidMessage,
                    "send hello first",
                ));
            }
            ClientMessage::Subscribe {
                namespace,
                last_server_seq,
                checkpoint,
            } => {
                self.subscribe(&namespace, last_server_seq, checkpoint)
                    .await
            }
            ClientMessage::Unsubscribe { namespace } => {
                if let Some(f) = self.followers.remove(&namespace) {
                    f.abort();
                }
            }
            ClientMessage::Command(frame) => self.command(frame).await,
            ClientMessage::Cursor {
                namespace,
                server_seq,
            } => self.cursor(&namespace, server_seq).await,
            ClientMessage::Presence { key, payload } => self.presence(key, payload).await,
            ClientMessage::Ping { nonce } => self.push(ServerMessage::Pong { nonce }),
        }
        None
    }

    /// Resolves a namespace for this socket, or says why not.
    fn stream_key(&self, namespace: &str, access: access::Access) -> Result<StreamKey, Refusal> {
        let bound = self
            .bound
            .as_ref()
            .ok_or(Refusal::new(ErrorCode::InvalidMessage, "send hello first"))?;
        access::stream_key(
            &self.state,
            &self.principal,
            (&bound.org, &bound.project, namespace),
            access,
        )
    }

    async fn subscribe(
        &mut self,
        namespace: &str,
        cursor: Option<u64>,
        checkpoint: Option<String>,
    ) {
        let key = match self.stream_key(namespace, access::Access::Read) {
            Ok(k) => k,
            Err(r) => return self.push(ServerMessage::error(r.code, r.message)),
        };
        // A checkpoint continues a snapshot, so it goes with a null cursor only.
        let checkpoint = match checkpoint.filter(|_| cursor.is_none()) {
            None => None,
            Some(text) => match ultrasync_shared::protocol::Checkpoint::decode(&text, &key) {
                Ok(cp) => Some(cp),
                Err(e) => {
                    return self.push(ServerMessage::error(
                        ErrorCode::InvalidMessage,
                        format!("{namespace}: {e}"),
                    ));
                }
            },
        };
        let most = self.state.config.gateway.max_subscriptions_per_socket;
        if !self.followers.contains_key(namespace) && self.followers.len() >= most {
            return self.push(ServerMessage::error(
                ErrorCode::RateLimited,
                format!("this socket already follows {most} namespaces; unsubscribe first"),
            ));
        }
        if let Some(old) = self.followers.remove(namespace) {
            old.abort();
        }
        // A resuming client's cursor says what it has: it holds the log like a
        // `cursor` frame would (one above the head is the follower's to refuse).
        if let (Some(seq), Some(bound)) = (cursor, self.bound.as_ref()) {
            let client_id = bound.client_id.to_string();
            match commands::report_cursor(&self.state, &self.principal, &key, &client_id, seq).await
            {
                Err(r) if r.code == ErrorCode::Forbidden => {
                    return self.push(ServerMessage::error(r.code, r.message));
                }
                _ => {}
            }
        }
        if self
            .state
            .namespaces
            .get(namespace)
            .is_some_and(|s| s.mode == Mode::Ephemeral)
        {
            // An ephemeral namespace has no log: joining it means getting the
            // current presence set, then every change. The table is open (subscribed)
            // before this socket's next frame is read, so its own updates reach it.
            let room = match self.state.presence.room(&key.org, &key.project).await {
                Ok(r) => r,
                Err(e) => {
                    let r = Refusal::unavailable("presence", e);
                    return self.push(ServerMessage::error(r.code, r.message));
                }
            };
            let handle = tokio::spawn(follow_presence(room, self.out.clone(), self.slow.clone()));
            self.followers.insert(namespace.to_owned(), handle);
            return;
        }
        let topic = match self.state.hub.follow(&key) {
            Ok(t) => t,
            Err(r) => return self.push(ServerMessage::error(r.code, r.message)),
        };
        let follower = Follower {
            hub: self.state.hub.clone(),
            topic,
            namespace: namespace.to_owned(),
            out: self.out.clone(),
            slow: self.slow.clone(),
            snapshot_after_ops: self.state.config.gateway.snapshot_after_ops,
            log_reads: self.state.budgets.log_reads(),
        };
        let handle = tokio::spawn(follower.run(cursor, checkpoint));
        self.followers.insert(namespace.to_owned(), handle);
    }

    /// A presence update from this socket; `null` leaves.
    async fn presence(&mut self, key: String, payload: serde_json::Value) {
        let Some(ns) = self.state.namespaces.names().find(|n| {
            self.state
                .namespaces
                .get(n)
                .is_some_and(|s| s.mode == Mode::Ephemeral)
        }) else {
            return self.push(ServerMessage::error(
                ErrorCode::UnknownNamespace,
                "no ephemeral namespace is declared",
            ));
        };
        let ns = ns.to_owned();
        let stream_key = match self.stream_key(&ns, access::Access::Write) {
            Ok(k) => k,
            Err(r) => return self.push(ServerMessage::error(r.code, r.message)),
        };
        if validate_key(&key).is_err() {
            return self.push(ServerMessage::error(
                ErrorCode::InvalidKey,
                "presence key must be 1-512 bytes without control characters",
            ));
        }
        let size = serde_json::to_vec(&payload).map_or(usize::MAX, |v| v.len());
        let max = self
            .state
            .namespaces
            .get(&ns)
            .map_or(0, |s| s.max_value_bytes);
        if size > max {
            return self.push(ServerMessage::error(
                ErrorCode::PayloadTooLarge,
                format!("presence payload is {size} bytes; the limit is {max}"),
            ));
        }
        let Some(bound) = self.bound.as_ref() else {
            return;
        };
        let leaving = payload.is_null();
        let published = self
            .state
            .presence
            .publish(
                &stream_key.org,
                &stream_key.project,
                self.principal.actor_id.as_str(),
                bound.client_id.as_str(),
                &key,
                payload,
            )
            .await;
        match published {
            Err((code, message)) => self.push(ServerMessage::error(code, message)),
            Ok(()) if leaving => {
                self.presence_keys.remove(&key);
            }
            Ok(()) => {
                self.presence_keys.insert(key);
            }
        }
    }

    /// On disconnect: everything this socket showed leaves.
    async fn leave_presence(&mut self) {
        let Some(bound) = self.bound.as_ref() else {
            return;
        };
        for key in std::mem::take(&mut self.presence_keys) {
            // A leave (null payload) is never refused.
            let _ = self
                .state
                .presence
                .publish(
                    &bound.org,
                    &bound.project,
                    self.principal.actor_id.as_str(),
                    bound.client_id.as_str(),
                    &key,
                    serde_json::Value::Null,
                )
                .await;
        }
    }

    async fn command(&mut self, frame: CommandFrame) {
        let command_id = frame.command_id.clone();
        let span = spans::command(&self.state.tracer, "ws", &frame);
        let reject = |r: Refusal| {
            spans::rejected(&span, r.code, &r.message);
            ServerMessage::reject(command_id.clone(), r.code, r.message)
        };
        let key = match self.stream_key(&frame.namespace, access::Access::Write) {
            Ok(k) => k,
            Err(r) => return self.push(reject(r)),
        };
        if let Err(r) = commands::check_frame(&self.state, &frame) {
            return self.push(reject(r));
        }
        if let Err(r) = commands::admit(&self.state, &frame).await {
            return self.push(reject(r));
        }
        if self.inflight.len() >= MAX_INFLIGHT && !self.inflight.contains_key(&frame.command_id) {
            return self.push(reject(Refusal::new(
                ErrorCode::RateLimited,
                format!("more than {MAX_INFLIGHT} commands in flight"),
            )));
        }
        if let Err(r) = self.state.budgets.commands(&self.principal, 1) {
            return self.push(reject(r));
        }
        let Some(bound) = self.bound.as_ref() else {
            return;
        };
        spans::addressed(
            &span,
            &key,
            self.principal.actor_id.as_str(),
            bound.client_id.as_str(),
        );
        let mut envelope = commands::envelope(
            &self.principal,
            &key,
            bound.client_id.as_str(),
            frame,
            self.state.routes.reply_subject(&self.session_id),
        );
        if let Err(e) = self
            .state
            .hooks
            .before_apply(&self.principal, &mut envelope)
        {
            return self.push(reject(e.into()));
        }
        let body = match serde_json::to_vec(&envelope) {
            Ok(b) => b,
            Err(e) => {
                return self.push(reject(Refusal::new(
                    ErrorCode::InvalidMessage,
                    format!("command does not encode: {e}"),
                )));
            }
        };
        let publishing = spans::publish(&span);
        self.inflight
            .insert(command_id.clone(), (Instant::now(), span));
        // One publisher per stream key keeps the socket's order and gathers commands
        // under load; a command it cannot store is answered with a reject.
        self.state.publisher.submit(
            ultrasync_shared::nats::cmd_subject(&key),
            crate::publisher::Queued {
                body: body.into(),
                route: self.session_id.clone(),
                command_id,
                span: publishing,
            },
        );
    }

    async fn cursor(&mut self, namespace: &str, server_seq: u64) {
        let key = match self.stream_key(namespace, access::Access::Read) {
            Ok(k) => k,
            Err(r) => return self.push(ServerMessage::error(r.code, r.message)),
        };
        let Some(bound) = self.bound.as_ref() else {
            return;
        };
        let client_id = bound.client_id.to_string();
        if let Err(r) =
            commands::report_cursor(&self.state, &self.principal, &key, &client_id, server_seq)
                .await
        {
            self.push(ServerMessage::error(r.code, r.message));
        }
    }
}

/// A socket's presence follower: the current set, then every change. Live frames never
/// wait: a socket that cannot take them is a slow consumer.
async fn follow_presence(room: Arc<Room>, out: OutQueue, slow: CancellationToken) {
    let (mut rx, current) = room.join();
    for e in current {
        if out.push(Outbound::Text(e.frame().encode())).await.is_err() {
            return;
        }
    }
    loop {
        let event = match rx.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Missed updates: the current set says where everyone is now.
                for e in room.current() {
                    if out.push(Outbound::Text(e.frame().encode())).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Err(_) => return,
        };
        match out.try_push(Outbound::Text(event.frame().encode())) {
            Ok(()) => {}
            Err(Refused::Full) => {
                slow.cancel();
                return;
            }
            Err(Refused::Closed) => return,
        }
    }
}
