//! One automerge-repo socket: `join`, then per document an Automerge sync state
//! against the durable document (`docs`), the peer's changes turned into `crdt_op`
//! commands (one per change, command id `am-{change hash}`), ephemeral messages out
//! to NATS and in from it. Every frame is authorized against the token, counted
//! against the socket's rate, and what the socket may hold is bounded: documents
//! (`gateway.automerge_docs_per_socket`, and the org's `automerge_docs_per_org` on
//! this gateway, see `docs`), commands in flight ([`MAX_INFLIGHT`]), each sync
//! message's counts (`wire::check_sync_message`), each change (`shared::admission`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use automerge::ChangeHash;
use automerge::sync;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use ultrasync_shared::auth::Principal;
use ultrasync_shared::error::close;
use ultrasync_shared::op::OpType;
use ultrasync_shared::protocol::{CommandFrame, ServerMessage};
use ultrasync_shared::{ErrorCode, StreamKey, admission, validate_key};

use super::wire;
use crate::docs::{Answer, Doc, DocLease, Ephemeral, Inbox, PeerGuard, Space};
use crate::rules::limits::{RateLimit, SocketSlot};
use crate::rules::{Refusal, access, commands};
use crate::{AppState, Metrics, spans};

/// How often the server pings an idle socket (as on `/v1/sync`).
const PING_EVERY: Duration = Duration::from_secs(20);
/// A socket silent for this long (no frame, no pong) is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Longest one frame may take to reach a peer before it counts as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Changes one socket may have waiting for the sequencer.
pub const MAX_INFLIGHT: usize = 4096;
/// How long a document waits to be loaded before the peer is told to retry.
const LOAD_WAIT: Duration = Duration::from_secs(20);
/// After a change was refused for a reason that passes (rate, a missing
/// dependency still on its way), the peer is asked to send again this much later.
const RESYNC_AFTER: Duration = Duration::from_millis(500);

/// A joined peer.
struct Joined {
    peer_id: String,
    /// The client id its commands carry (`am-` and a hash of the peer id).
    client_id: String,
    inbox: Arc<Inbox>,
    /// Taken by the session loop once joined.
    ephemeral: Option<mpsc::Receiver<Arc<Ephemeral>>>,
    /// Cancelled when a newer socket of the same actor and peer id joins.
    replaced: CancellationToken,
    _guard: PeerGuard,
}

/// One document this socket syncs.
struct PeerDoc {
    doc: Arc<Doc>,
    /// Holds the document on this gateway while the socket syncs it.
    _lease: DocLease,
    sync: sync::State,
    /// Ask the peer to send its changes again at this time.
    resync_at: Option<Instant>,
    /// A digest of the heads a read-only peer was last told its changes are
    /// refused for, so each new head is refused once, not on every message.
    refused_heads: Option<u64>,
}

/// A change on its way to the sequencer.
struct Inflight {
    doc: String,
    hash: ChangeHash,
    sent: Instant,
    /// The change's `gateway.command` span, ended with the answer.
    span: ultrasync_shared::trace::Span,
}

pub struct Session {
    state: Arc<AppState>,
    principal: Principal,
    key: StreamKey,
    session_id: String,
    server_id: String,
    storage_id: String,
    joined: Option<Joined>,
    space: Option<Arc<Space>>,
    docs: HashMap<String, PeerDoc>,
    inflight: HashMap<String, Inflight>,
    replies: mpsc::Receiver<Vec<Vec<u8>>>,
    /// Frames to write once the current event is handled.
    out: Vec<Vec<u8>>,
    _slot: SocketSlot,
    /// Its credential's registration (closes the socket when revoked) and the
    /// embedder's leave to connect (`on_disconnect` when dropped).
    connected: crate::rules::auth::Connected,
}

struct Closing(u16, String);

type Sink = futures::stream::SplitSink<WebSocket, Message>;

impl Session {
    pub async fn run(
        state: Arc<AppState>,
        socket: WebSocket,
        principal: Principal,
        key: StreamKey,
        slot: SocketSlot,
        connected: crate::rules::auth::Connected,
    ) {
        let session_id = connected.session_id.clone();
        let replies = state.routes.register(&session_id);
        let mut session = Session {
            server_id: format!("ultrasync-{}", state.gateway_id),
            storage_id: super::storage_id(&key),
            state: state.clone(),
            principal,
            key,
            session_id: session_id.clone(),
            joined: None,
            space: None,
            docs: HashMap::new(),
            inflight: HashMap::new(),
            replies,
            out: Vec::new(),
            _slot: slot,
            connected,
        };
        state
            .metrics
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Metrics::inc(&state.docs.metrics.sockets);
        let (mut sink, mut stream) = socket.split();
        let Closing(code, reason) = session.serve(&mut sink, &mut stream).await;
        for (_, f) in std::mem::take(&mut session.inflight) {
            if let Some(pd) = session.docs.get(&f.doc) {
                pd.doc.release(&f.hash);
            }
        }
        state.routes.unregister(&session_id);
        state
            .metrics
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        state
            .docs
            .metrics
            .sockets
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        debug!(session = %session_id, code, %reason, "automerge-repo socket closing");
        if code != close::SLOW_CONSUMER {
            let pending = std::mem::take(&mut session.out);
            let flush = async {
                for f in pending {
                    if sink.send(Message::Binary(f.into())).await.is_err() {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
        }
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(frame)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    }

    async fn serve(
        &mut self,
        sink: &mut Sink,
        stream: &mut futures::stream::SplitStream<WebSocket>,
    ) -> Closing {
        let shutdown = self.state.shutdown.clone();
        let expiry = tokio::time::sleep(Duration::from_secs(self.principal.expires_in()));
        tokio::pin!(expiry);
        let revoked = self.connected.registration.revoked.clone();
        let join_deadline = tokio::time::sleep(Duration::from_secs(
            self.state.config.gateway.hello_timeout_secs,
        ));
        tokio::pin!(join_deadline);
        let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        let mut last_heard = Instant::now();
        let mut limit = RateLimit::new(self.state.config.gateway.max_messages_per_sec);
        let command_timeout = Duration::from_secs(self.state.config.gateway.command_timeout_secs);
        let never = CancellationToken::new();
        let mut ephemeral: Option<mpsc::Receiver<Arc<Ephemeral>>> = None;
        loop {
            if ephemeral.is_none() {
                ephemeral = self.joined.as_mut().and_then(|j| j.ephemeral.take());
            }
            let replaced = self
                .joined
                .as_ref()
                .map_or_else(|| never.clone(), |j| j.replaced.clone());
            let inbox = self.joined.as_ref().map(|j| j.inbox.clone());
            let closing = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    Some(Closing(close::TRY_AGAIN_LATER, "server shutting down".into()))
                }
                _ = &mut expiry => Some(Closing(close::POLICY, "token expired".into())),
                _ = revoked.cancelled() => Some(Closing(close::POLICY, "credential revoked".into())),
                _ = replaced.cancelled() => {
                    Some(Closing(close::NORMAL, "replaced by a newer socket of the same peer".into()))
                }
                _ = &mut join_deadline, if self.joined.is_none() => {
                    self.error("no join in time");
                    Some(Closing(close::POLICY, "no join".into()))
                }
                inbound = stream.next() => {
                    last_heard = Instant::now();
                    match inbound {
                        None => Some(Closing(close::NORMAL, "peer gone".into())),
                        Some(Err(e)) => {
                            let text = e.to_string();
                            if text.contains("too long") || text.contains("Space limit") {
                                self.error(&format!("frame too large: {text}"));
                                Some(Closing(close::TOO_BIG, "frame too large".into()))
                            } else {
                                Some(Closing(close::NORMAL, "peer gone".into()))
                            }
                        }
                        Some(Ok(Message::Close(_))) => Some(Closing(close::NORMAL, "bye".into())),
                        Some(Ok(msg)) => {
                            Metrics::inc(&self.state.metrics.messages_in);
                            if !limit.take() {
                                if limit.exhausted() {
                                    self.error("too many frames; closing");
                                    Some(Closing(close::POLICY, "rate limit".into()))
                                } else {
                                    if matches!(msg, Message::Binary(_)) {
                                        self.error("too many frames; this one was dropped");
                                    }
                                    None
                                }
                            } else {
                                match msg {
                                    Message::Binary(b) => self.on_frame(&b).await,
                                    Message::Text(_) => {
                                        self.error("frames are binary CBOR");
                                        None
                                    }
                                    _ => None,
                                }
                            }
                        }
                    }
                }
                _ = async {
                    match &inbox {
                        Some(i) => i.notify.notified().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.on_durable_change();
                    None
                }
                e = async {
                    match ephemeral.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Some(e), Some(j)) = (e, self.joined.as_ref()) {
                        self.out.push(wire::ephemeral(&e, &j.peer_id));
                    }
                    None
                }
                reply = self.replies.recv() => {
                    match reply {
                        Some(answers) => {
                            self.on_answers(answers);
                            None
                        }
                        None => Some(Closing(close::INTERNAL, "reply route closed".into())),
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > IDLE_LIMIT {
                        Some(Closing(close::POLICY, "no heartbeat".into()))
                    } else {
                        self.write(sink, Message::Ping(Default::default()), &shutdown).await
                    }
                }
                _ = sweep.tick() => {
                    self.sweep(command_timeout);
                    None
                }
            };
            if let Some(c) = closing {
                return c;
            }
            for frame in std::mem::take(&mut self.out) {
                Metrics::inc(&self.state.metrics.messages_out);
                if let Some(c) = self
                    .write(sink, Message::Binary(frame.into()), &shutdown)
                    .await
                {
                    return c;
                }
            }
        }
    }

    async fn write(
        &self,
        sink: &mut Sink,
        msg: Message,
        shutdown: &CancellationToken,
    ) -> Option<Closing> {
        tokio::select! {
            sent = sink.send(msg) => sent.err().map(|_| Closing(close::NORMAL, "peer gone".into())),
            _ = tokio::time::sleep(WRITE_TIMEOUT) => {
                Some(Closing(close::SLOW_CONSUMER, "slow consumer".into()))
            }
            _ = shutdown.cancelled() => {
                Some(Closing(close::TRY_AGAIN_LATER, "server shutting down".into()))
            }
        }
    }

    fn target(&self) -> &str {
        self.joined.as_ref().map_or("", |j| j.peer_id.as_str())
    }

    /// An `error` frame for the peer (the client adapter logs it; nothing closes).
    fn error(&mut self, message: &str) {
        let frame = wire::error(&self.server_id, self.target(), message);
        self.out.push(frame);
    }

    async fn on_frame(&mut self, frame: &[u8]) -> Option<Closing> {
        let msg = match wire::decode(frame) {
            Ok(m) => m,
            Err(e) => {
                self.error(&e.0);
                return None;
            }
        };
        if msg.kind == "join" {
            return self.join(msg);
        }
        let Some(joined) = self.joined.as_ref() else {
            self.error("send join first");
            return None;
        };
        // As the package's server adapter: messages naming another sender are not
        // this socket's to send.
        if msg.sender_id.as_deref() != Some(joined.peer_id.as_str()) {
            return None;
        }
        match msg.kind.as_str() {
            "request" | "sync" => self.on_sync(msg).await,
            "ephemeral" => self.on_ephemeral(msg).await,
            // Sent by peers that also serve others; this server keeps nothing of
            // theirs and gossips no remote heads.
            "doc-unavailable" | "remote-subscription-change" | "remote-heads-changed" | "leave" => {
            }
            other => {
                let other: String = other.chars().take(64).collect();
                self.error(&format!("unknown message type {other}"));
            }
        }
        None
    }

    fn join(&mut self, msg: wire::Inbound) -> Option<Closing> {
        let Some(peer_id) = msg.sender_id.filter(|p| !p.is_empty()) else {
            self.error("join needs a senderId");
            return Some(Closing(close::POLICY, "join without a peer id".into()));
        };
        let versions = msg
            .supported_protocol_versions
            .unwrap_or_else(|| vec![wire::PROTOCOL_V1.to_owned()]);
        if !versions.iter().any(|v| v == wire::PROTOCOL_V1) {
            let frame = wire::error(&self.server_id, &peer_id, "unsupported protocol version");
            self.out.push(frame);
            return Some(Closing(
                close::PROTOCOL_MISMATCH,
                "unsupported protocol version".into(),
            ));
        }
        if let Some(j) = &self.joined {
            if j.peer_id == peer_id {
                // The client adapter joins again on open: answer again.
                let frame = wire::peer(&self.server_id, &peer_id, &self.storage_id);
                self.out.push(frame);
                return None;
            }
            self.error("this socket already joined as another peer");
            return None;
        }
        let client_id = format!(
            "am-{}",
            &hex::encode(Sha256::digest(peer_id.as_bytes()))[..24]
        );
        let (inbox, ephemeral) = Inbox::new(peer_id.clone());
        let (guard, replaced) =
            self.state
                .docs
                .join_peer(self.principal.actor_id.as_str(), &self.key, &peer_id);
        self.out
            .push(wire::peer(&self.server_id, &peer_id, &self.storage_id));
        self.joined = Some(Joined {
            peer_id,
            client_id,
            inbox,
            ephemeral: Some(ephemeral),
            replaced,
            _guard: guard,
        });
        None
    }

    /// The stream key for `access`, or why not (checked on every message).
    fn access(&self, access: access::Access) -> Result<StreamKey, Refusal> {
        access::stream_key(
            &self.state,
            &self.principal,
            (
                &self.key.org,
                &self.key.project,
                self.key.namespace.as_str(),
            ),
            access,
        )
    }

    fn unavailable(&mut self, doc_id: &str) {
        let frame = wire::doc_unavailable(&self.server_id, self.target(), doc_id);
        self.out.push(frame);
    }

    /// The socket's entry for `doc_id`, opening the space and the document on first
    /// use. `Err` carries the error to send.
    async fn peer_doc(&mut self, doc_id: &str) -> Result<(), String> {
        if self.docs.contains_key(doc_id) {
            return Ok(());
        }
        let per_socket = self.state.config.gateway.automerge_docs_per_socket;
        if self.docs.len() >= per_socket {
            return Err(format!(
                "this socket already syncs {per_socket} documents (automerge_docs_per_socket); document {doc_id} refused"
            ));
        }
        let space = match &self.space {
            Some(s) => s.clone(),
            None => {
                let s = self.state.docs.space(&self.key).await.map_err(|e| {
                    Refusal::unavailable("opening the documents of a namespace", e).message
                })?;
                self.space = Some(s.clone());
                s
            }
        };
        let lease = self.state.docs.lease(&space, doc_id).map_err(|full| {
            format!(
                "this gateway holds {} documents of org {} for automerge-repo sockets, all in use (automerge_docs_per_org); document {doc_id} refused, retry later",
                full.held, self.key.org
            )
        })?;
        let doc = lease.doc.clone();
        if let Some(j) = &self.joined {
            doc.watch(&j.inbox);
        }
        self.docs.insert(
            doc_id.to_owned(),
            PeerDoc {
                doc,
                _lease: lease,
                sync: sync::State::new(),
                resync_at: None,
                refused_heads: None,
            },
        );
        Ok(())
    }

    async fn on_sync(&mut self, msg: wire::Inbound) {
        let requested = msg.kind == "request";
        let Some(doc_id) = msg.document_id else {
            return self.error("sync and request need a documentId");
        };
        if validate_key(&doc_id).is_err() {
            return self.error("a documentId must be 1-512 bytes without control characters");
        }
        // A token that may not read here learns nothing, as from a server without
        // the document.
        if self.access(access::Access::Read).is_err() {
            return self.unavailable(&doc_id);
        }
        let Some(data) = msg.data.map(|d| d.0) else {
            return self.error(&format!("sync for document {doc_id} without data"));
        };
        if let Err(e) = wire::check_sync_message(&data) {
            return self.error(&format!("document {doc_id}: {}", e.0));
        }
        let message = match sync::Message::decode(&data) {
            Ok(m) => m,
            Err(e) => {
                return self.error(&format!(
                    "document {doc_id}: not an Automerge sync message: {e}"
                ));
            }
        };
        if let Err(e) = self.peer_doc(&doc_id).await {
            return self.error(&e);
        }
        let Some(doc) = self.docs.get(&doc_id).map(|pd| pd.doc.clone()) else {
            return;
        };
        if tokio::time::timeout(LOAD_WAIT, doc.loaded()).await.is_err() {
            return self.error(&format!(
                "document {doc_id} could not be loaded; retry later"
            ));
        }
        let write = self.access(access::Access::Write);
        // A peer that may not write is told so when it sends changes, and also when
        // its heads name changes the server lacks without carrying them: its sync
        // state may hold them back (the server's Bloom filter can claim to have a
        // change it lacks), and a read-only server never asks for them.
        let refused = match &write {
            Err(r) if !message.changes.is_empty() || doc.lacks_any(&message.heads) => {
                Some((r.clone(), heads_digest(&message.heads)))
            }
            _ => None,
        };
        if !message.changes.is_empty() && write.is_ok() {
            let chunks: Vec<Vec<u8>> = message.changes.iter().map(<[u8]>::to_vec).collect();
            for chunk in chunks {
                self.submit(&doc, chunk).await;
            }
        }
        if let Some((r, digest)) = refused {
            let first = self
                .docs
                .get_mut(&doc_id)
                .is_some_and(|pd| pd.refused_heads.replace(digest) != Some(digest));
            if first {
                self.state.docs.metrics.changes_refused.fetch_add(
                    message.changes.len().max(1) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                let why = format!(
                    "changes to document {doc_id} refused: {} ({})",
                    r.message,
                    r.code.as_str()
                );
                self.error(&why);
            }
        }
        let Some(pd) = self.docs.get_mut(&doc_id) else {
            return;
        };
        match doc.receive(&mut pd.sync, message, write.is_ok(), requested) {
            Answer::Sync(Some(data)) => {
                let frame = wire::sync(&self.server_id, self.target(), &doc_id, &data);
                self.out.push(frame);
            }
            Answer::Sync(None) => {}
            Answer::Unavailable => self.unavailable(&doc_id),
            Answer::Failed(why) => self.error(&why),
        }
    }

    /// Sends one change of the peer to the sequencer, unless the log or this
    /// gateway already has it.
    async fn submit(&mut self, doc: &Arc<Doc>, chunk: Vec<u8>) {
        let doc_id = doc.id.clone();
        let Some(spec) = self.state.namespaces.get(self.key.namespace.as_str()) else {
            return;
        };
        let limits = admission::Limits::for_namespace(&self.state.config.limits, &spec);
        let admitted = tokio::task::spawn_blocking(move || {
            admission::admit_change(&chunk, &limits).map(|c| (c.hash(), chunk))
        })
        .await;
        let (hash, chunk) = match admitted {
            Ok(Ok(c)) => c,
            Ok(Err((code, why))) => {
                Metrics::inc(&self.state.docs.metrics.changes_refused);
                return self.error(&format!(
                    "document {doc_id}: a change was refused: {why} ({})",
                    code.as_str()
                ));
            }
            Err(e) => {
                Metrics::inc(&self.state.docs.metrics.changes_refused);
                let r = Refusal::unavailable("checking a change", e);
                return self.error(&format!("document {doc_id}: {}", r.message));
            }
        };
        if !doc.claim(&hash) {
            return;
        }
        let refuse = |s: &mut Self, r: Refusal| {
            doc.release(&hash);
            Metrics::inc(&s.state.docs.metrics.changes_refused);
            match r.code {
                ErrorCode::RateLimited | ErrorCode::Unavailable => s.resync_later(&doc_id),
                _ => s.error(&format!(
                    "document {doc_id}: change {hash} refused: {} ({})",
                    r.message,
                    r.code.as_str()
                )),
            }
        };
        if self.inflight.len() >= MAX_INFLIGHT {
            return refuse(
                self,
                Refusal::new(
                    ErrorCode::RateLimited,
                    format!("more than {MAX_INFLIGHT} changes in flight"),
                ),
            );
        }
        let command_id = format!("am-{hash}");
        let frame = CommandFrame {
            command_id: command_id.clone(),
            namespace: self.key.namespace.to_string(),
            key: doc_id.clone(),
            op_type: OpType::CrdtOp,
            payload: serde_json::json!({ "change": B64.encode(&chunk) }),
            precondition: None,
            base_seq: None,
        };
        if let Err(r) = commands::check_frame(&self.state, &frame) {
            return refuse(self, r);
        }
        if let Err(r) = self.state.budgets.commands(&self.principal, 1) {
            return refuse(self, r);
        }
        let Some(client_id) = self.joined.as_ref().map(|j| j.client_id.clone()) else {
            return;
        };
        let span = spans::command(&self.state.tracer, "automerge-repo", &frame);
        spans::addressed(
            &span,
            &self.key,
            self.principal.actor_id.as_str(),
            &client_id,
        );
        let mut envelope = commands::envelope(
            &self.principal,
            &self.key,
            &client_id,
            frame,
            self.state.routes.reply_subject(&self.session_id),
        );
        if let Err(e) = self
            .state
            .hooks
            .before_apply(&self.principal, &mut envelope)
        {
            return refuse(self, e.into());
        }
        let body = match serde_json::to_vec(&envelope) {
            Ok(b) => b,
            Err(e) => return refuse(self, Refusal::unavailable("encoding a command", e)),
        };
        let publishing = spans::publish(&span);
        self.inflight.insert(
            command_id.clone(),
            Inflight {
                doc: doc_id,
                hash,
                sent: Instant::now(),
                span,
            },
        );
        Metrics::inc(&self.state.docs.metrics.changes_submitted);
        self.state.publisher.submit(
            ultrasync_shared::nats::cmd_subject(&self.key),
            crate::publisher::Queued {
                body: body.into(),
                route: self.session_id.clone(),
                command_id,
                span: publishing,
            },
        );
    }

    /// The peer is asked (soon) to send what the log lacks again: its sync state
    /// is reset, and the next message from here tells it so.
    fn resync_later(&mut self, doc_id: &str) {
        if let Some(pd) = self.docs.get_mut(doc_id)
            && pd.resync_at.is_none()
        {
            pd.resync_at = Some(Instant::now() + RESYNC_AFTER);
        }
    }

    fn on_answers(&mut self, answers: Vec<Vec<u8>>) {
        for a in answers {
            let Ok(msg) = serde_json::from_slice::<ServerMessage>(&a) else {
                continue;
            };
            match msg {
                // The change comes back through the log; nothing to do.
                ServerMessage::Ack {
                    command_id,
                    server_seq,
                    ..
                } => {
                    if let Some(f) = self.inflight.remove(&command_id) {
                        f.span.set("ultrasync.server_seq", server_seq as i64);
                    }
                }
                ServerMessage::Reject {
                    command_id,
                    code,
                    reason,
                    ..
                } => {
                    let Some(f) = self.inflight.remove(&command_id) else {
                        continue;
                    };
                    spans::rejected(&f.span, code, &reason);
                    Metrics::inc(&self.state.docs.metrics.changes_refused);
                    if let Some(pd) = self.docs.get(&f.doc) {
                        pd.doc.release(&f.hash);
                    }
                    let passes = matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable)
                        || (code == ErrorCode::InvalidOp && reason.contains("depends on changes"));
                    if passes {
                        self.resync_later(&f.doc);
                    } else {
                        let doc = f.doc.clone();
                        self.error(&format!(
                            "document {doc}: change {} refused: {reason} ({})",
                            f.hash,
                            code.as_str()
                        ));
                    }
                }
                _ => {}
            }
        }
    }

    /// Durable documents moved: each tells its peer what the log now has.
    fn on_durable_change(&mut self) {
        let Some(dirty) = self.joined.as_ref().map(|j| j.inbox.take_dirty()) else {
            return;
        };
        for id in dirty {
            let Some(pd) = self.docs.get_mut(&id) else {
                continue;
            };
            // A document the log does not have (just loaded as absent) has nothing
            // to announce; the peer was answered when it asked.
            if !pd.doc.exists() {
                continue;
            }
            if let Some(data) = pd.doc.generate(&mut pd.sync) {
                let frame = wire::sync(&self.server_id, self.target(), &id, &data);
                self.out.push(frame);
            }
        }
    }

    fn sweep(&mut self, command_timeout: Duration) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .inflight
            .iter()
            .filter(|(_, f)| now.duration_since(f.sent) > command_timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(f) = self.inflight.remove(&id) {
                if let Some(pd) = self.docs.get(&f.doc) {
                    pd.doc.release(&f.hash);
                }
                self.resync_later(&f.doc);
            }
        }
        let due: Vec<String> = self
            .docs
            .iter()
            .filter(|(_, pd)| pd.resync_at.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(pd) = self.docs.get_mut(&id) else {
                continue;
            };
            pd.resync_at = None;
            // Empty heads tell the peer to forget what it sent (it then sends what
            // the log lacks again, judged by the bloom filter of what it has).
            pd.sync.needs_reset = true;
            pd.sync.have_responded = false;
            if let Some(data) = pd.doc.generate(&mut pd.sync) {
                // The peer was sent empty heads, not the log's: the next message
                // must announce them again.
                pd.sync.last_sent_heads.clear();
                let frame = wire::sync(&self.server_id, self.target(), &id, &data);
                self.out.push(frame);
            }
        }
    }

    async fn on_ephemeral(&mut self, msg: wire::Inbound) {
        let Some(doc_id) = msg.document_id else {
            return self.error("ephemeral needs a documentId");
        };
        if validate_key(&doc_id).is_err() {
            return self.error("a documentId must be 1-512 bytes without control characters");
        }
        let (Some(session_id), Some(count), Some(data)) = (msg.session_id, msg.count, msg.data)
        else {
            return self.error("ephemeral needs sessionId, count and data");
        };
        // Like presence: sending needs the write scope.
        if let Err(r) = self.access(access::Access::Write) {
            return self.error(&format!(
                "ephemeral message for document {doc_id} refused: {}",
                r.message
            ));
        }
        let max = self.state.config.gateway.presence_payload_bytes;
        if data.0.len() > max {
            return self.error(&format!(
                "ephemeral message for document {doc_id} is {} bytes; at most {max}",
                data.0.len()
            ));
        }
        if let Err(e) = self.peer_doc(&doc_id).await {
            return self.error(&e);
        }
        let (Some(space), Some(j)) = (&self.space, &self.joined) else {
            return;
        };
        let e = Ephemeral {
            document_id: doc_id.clone(),
            sender_id: j.peer_id.clone(),
            session_id,
            count,
            data: data.0,
        };
        if let Err(e) = space.publish_ephemeral(&e).await {
            let r = Refusal::unavailable("publishing an ephemeral message", e);
            self.error(&format!("document {doc_id}: {}", r.message));
        }
    }
}

/// A digest of a peer's heads, to tell one set of heads from the next.
fn heads_digest(heads: &[ChangeHash]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    heads.hash(&mut h);
    h.finish()
}
