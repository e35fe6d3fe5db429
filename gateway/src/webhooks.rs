//! Webhooks: committed ops POSTed to configured endpoints, at least once.
//!
//! Each webhook has one durable consumer on `USYNC_OPS` (`usync-webhook-{name}`,
//! filtered to its org / project / namespace) shared by every gateway, so any number
//! of gateways deliver together and a restart resumes where the last ack left off. An
//! op is acked only after the endpoint answered 2xx for each of its events; a failure
//! is retried after `backoff_ms * 2^(attempt-1)` (at most 60 s) and, after
//! `max_attempts`, published to the dead-letter stream `USYNC_WEBHOOKS_DLQ`
//! (`usync.webhooks.dead.{name}`) and acked.
//!
//! A webhook that fell so far behind that the compactor let it go (past
//! `compactor.reader_max_lag_ops` or `_secs`, or the `webhook_` ones) loses the ops
//! purged before it got them; the compactor records the range (`cursors::ResetRecord`), and before the webhook's next
//! op of that stream key it gets a `stream.reset` event naming exactly that range, so
//! the receiver knows to resync rather than silently missing ops.
//!
//! Each POST carries `Usync-Event` (`op.committed`, `doc.updated` or `stream.reset`), `Usync-Delivery`
//! (`{op_id}.{event}`, the same on every retry), `Usync-Timestamp` (Unix seconds) and
//! `Usync-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
//!
//! POSTs go through the workspace's one HTTP client (`ultrasync-http-client`): one
//! pooled client per webhook, so its deliveries reuse a kept-alive connection (one TLS
//! handshake for many), trusting the system's roots plus the webhook's `ca_file`. An
//! attempt succeeds on a 2xx whose answer is complete within `timeout_ms` (request,
//! status and body together); the body is read and dropped, at most
//! [`MAX_ANSWER_BYTES`] of it, so a receiver answering a huge body or one that never
//! ends holds neither memory nor the delivery task: past the bound or the deadline the
//! connection is dropped and the attempt fails like any other.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use ultrasync_http_client::{Trust, describe, read_bounded, reqwest};
use ultrasync_shared::config::WebhookConfig;
use ultrasync_shared::log::{self, LogEntry};
use ultrasync_shared::namespaces::{Mode, Namespaces};
use ultrasync_shared::nats::OPS_STREAM;

/// The dead-letter stream.
pub use ultrasync_shared::nats::DLQ_STREAM;
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The shortest time JetStream waits for an op's ack before sending it again (longer
/// for webhooks with a long `timeout_ms`: an op may take one POST per event).
const MIN_ACK_WAIT: Duration = Duration::from_secs(30);
/// The most of an answer's body read (and dropped); a longer one fails the attempt.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Idle kept-alive connections per webhook.
const POOL_PER_WEBHOOK: usize = 4;

/// Where one webhook's POSTs go: its URL and its pooled client.
struct Endpoint {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl Endpoint {
    fn new(hook: &WebhookConfig) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(&hook.url)
            .with_context(|| format!("webhook {}: url {}", hook.name, hook.url))?;
        let trust = Trust::from_ca_file(hook.ca_file.as_deref())
            .with_context(|| format!("webhook {}: ca_file", hook.name))?;
        let client = ultrasync_http_client::builder(
            &trust,
            "ultrasync-webhooks",
            Duration::from_millis(hook.timeout_ms),
        )
        .pool_max_idle_per_host(POOL_PER_WEBHOOK)
        .build()
        .with_context(|| format!("webhook {}: HTTP client", hook.name))?;
        Ok(Self { url, client })
    }
}

#[derive(Default)]
pub struct WebhookMetrics {
    pub delivered: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// `sha256=<hex>` of `{timestamp}.{body}`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Starts one delivery task per configured webhook.
pub async fn start(
    js: &jetstream::Context,
    hooks: &[WebhookConfig],
    namespaces: Namespaces,
    metrics: Arc<WebhookMetrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if hooks.is_empty() {
        return Ok(());
    }
    // Normally made by `ultrasync setup` / the service start-up (`ensure_layout`);
    // only looked up here when it exists.
    js.get_or_create_stream(ultrasync_shared::nats::dlq_stream_config(
        &ultrasync_shared::nats::LayoutOptions::default(),
    ))
    .await
    .context("opening the webhook dead-letter stream")?;
    let ops = js
        .get_stream(OPS_STREAM)
        .await
        .context("opening USYNC_OPS")?;
    let namespaces = Arc::new(namespaces);
    let resets = js
        .get_key_value(ultrasync_shared::nats::CURSORS_BUCKET)
        .await
        .context("opening the cursor bucket (webhook resets)")?;
    for hook in hooks {
        let endpoint = Arc::new(Endpoint::new(hook)?);
        let filter = format!(
            "usync.ops.{}.{}.{}",
            hook.org,
            hook.project.as_deref().unwrap_or("*"),
            hook.namespace.as_deref().unwrap_or("*")
        );
        let consumer = ops
            .get_or_create_consumer(
                &format!("usync-webhook-{}", hook.name),
                pull::Config {
                    durable_name: Some(format!("usync-webhook-{}", hook.name)),
                    description: Some(format!("ultrasync webhook {}", hook.name)),
                    filter_subject: filter,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_millis(hook.timeout_ms.saturating_mul(3))
                        .max(MIN_ACK_WAIT),
                    max_ack_pending: 256,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("creating the consumer of webhook {}", hook.name))?;
        let hook = Arc::new(hook.clone());
        let js = js.clone();
        let metrics = metrics.clone();
        let namespaces = namespaces.clone();
        let shutdown = shutdown.clone();
        let resets = resets.clone();
        tokio::spawn(async move {
            info!(webhook = %hook.name, url = %hook.url, "webhook delivery running");
            loop {
                let mut messages = match consumer.messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(webhook = %hook.name, error = %e, "pulling ops for a webhook failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = messages.next() => m,
                    };
                    match msg {
                        Some(Ok(m)) => {
                            deliver(&js, &resets, &hook, &endpoint, &namespaces, &metrics, m).await;
                        }
                        Some(Err(e)) => {
                            debug!(webhook = %hook.name, error = %e, "webhook pull error");
                        }
                        None => break,
                    }
                }
            }
        });
    }
    Ok(())
}

/// Delivers the ops of one log message in order, then acks it. A failed op makes the
/// whole message come back after the backoff (the ops before it are delivered again:
/// at least once, with the same `Usync-Delivery`); once the message has been
/// delivered `max_attempts` times, a failing op is dead-lettered and the next ones
/// go on.
async fn deliver(
    js: &jetstream::Context,
    resets: &jetstream::kv::Store,
    hook: &WebhookConfig,
    endpoint: &Endpoint,
    namespaces: &Namespaces,
    metrics: &WebhookMetrics,
    msg: jetstream::Message,
) {
    let Ok(ops) = log::consumer_message_entries(&msg) else {
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    let attempt = msg.info().map_or(1, |i| i.delivered.max(1) as u32);
    for entry in &ops {
        let Err(why) = deliver_op(resets, hook, endpoint, namespaces, entry).await else {
            metrics.delivered.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        metrics.failed_attempts.fetch_add(1, Ordering::Relaxed);
        if attempt < hook.max_attempts {
            let delay =
                Duration::from_millis(hook.backoff_ms.saturating_mul(1 << (attempt - 1).min(16)))
                    .min(MAX_BACKOFF);
            debug!(webhook = %hook.name, op_id = %entry.op_id, attempt, ?delay, %why, "webhook failed; retrying");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            return;
        }
        warn!(webhook = %hook.name, op_id = %entry.op_id, attempt, %why, "webhook gave up; dead-lettered");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Usync-Webhook", hook.name.as_str());
        headers.insert("Usync-Error", why.as_str());
        let subject = format!("usync.webhooks.dead.{}", hook.name);
        let stored = match js
            .publish_with_headers(subject, headers, entry.payload.clone())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if !stored {
            let _ = msg.ack_with(AckKind::Nak(Some(MAX_BACKOFF))).await;
            return;
        }
        metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    let _ = msg.double_ack().await;
}

/// Posts the events of one op; the reason when one was not accepted.
async fn deliver_op(
    resets: &jetstream::kv::Store,
    hook: &WebhookConfig,
    endpoint: &Endpoint,
    namespaces: &Namespaces,
    entry: &LogEntry,
) -> Result<(), String> {
    let Ok(op) = entry.op() else {
        // Not an op: nothing to deliver.
        return Ok(());
    };
    let crdt = namespaces
        .get(&op.namespace)
        .is_some_and(|s| s.mode == Mode::Crdt);
    let wants = |e: &str| hook.events.is_empty() || hook.events.iter().any(|x| x == e);
    let op_json: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap_or_default();
    let mut events = Vec::new();
    // Ops compacted before this webhook got them: said first, once.
    let key = ultrasync_shared::StreamKey::parse(&op.org_id, &op.project_id, &op.namespace).ok();
    let reset_key = key
        .as_ref()
        .map(|k| ultrasync_shared::cursors::reset_kv_key(k, &hook.name));
    let reset = match &reset_key {
        Some(k) => resets
            .get(k)
            .await
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<ultrasync_shared::cursors::ResetRecord>(&b).ok())
            .filter(|r| r.to < op.server_seq),
        None => None,
    };
    if let Some(r) = reset {
        events.push((
            "stream.reset",
            serde_json::json!({
                "type": "stream.reset",
                "org_id": op.org_id,
                "project_id": op.project_id,
                "namespace": op.namespace,
                "from_server_seq": r.from,
                "to_server_seq": r.to,
                "reason": "these ops were compacted before this webhook received them (it fell behind past one of the compactor's lag bounds: webhook_max_lag_ops or _secs, else reader_max_lag_ops or _secs); resync the stream key from a snapshot",
            }),
        ));
    }
    if wants("op.committed") {
        events.push((
            "op.committed",
            serde_json::json!({"type": "op.committed", "op": op_json}),
        ));
    }
    if crdt && wants("doc.updated") {
        events.push((
            "doc.updated",
            serde_json::json!({
                "type": "doc.updated",
                "org_id": op.org_id,
                "project_id": op.project_id,
                "namespace": op.namespace,
                "key": op.key,
                "server_seq": op.server_seq,
                "op_id": op.op_id,
            }),
        ));
    }
    let mut failed = None;
    for (event, body) in &events {
        let delivery = match *event {
            "stream.reset" => format!(
                "{}.{}.{}.reset.{}-{}",
                op.org_id,
                op.project_id,
                op.namespace,
                body["from_server_seq"],
                body["to_server_seq"]
            ),
            _ => format!("{}.{event}", op.op_id),
        };
        let body = serde_json::to_vec(body).unwrap_or_default();
        match post(hook, endpoint, event, &delivery, body).await {
            Ok(status) if (200..300).contains(&status) => {}
            Ok(status) => failed = Some(format!("HTTP {status}")),
            Err(e) => failed = Some(e),
        }
        if failed.is_some() {
            break;
        }
    }
    if let Some(why) = failed {
        return Err(why);
    }
    if let (Some(_), Some(k)) = (reset, &reset_key) {
        let _ = resets.delete(k).await;
    }
    Ok(())
}

/// One signed POST; the HTTP status, once the whole answer is in (see the module
/// docs for the bounds).
async fn post(
    hook: &WebhookConfig,
    endpoint: &Endpoint,
    event: &str,
    delivery: &str,
    body: Vec<u8>,
) -> Result<u16, String> {
    let timestamp = ultrasync_shared::auth::now_secs();
    let signature = signature(hook.secret.as_bytes(), timestamp, &body);
    let answer = endpoint
        .client
        .post(endpoint.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Usync-Event", event)
        .header("Usync-Delivery", delivery)
        .header("Usync-Timestamp", timestamp.to_string())
        .header("Usync-Signature", signature)
        .body(body)
        .send()
        .await
        .map_err(|e| describe(&e))?;
    let status = answer.status().as_u16();
    // Read to its end, so the connection goes back to the pool.
    read_bounded(answer, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| format!("HTTP {status}: {e}"))?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Known-answer: HMAC-SHA256("key", "1.{}").
        let sig = signature(b"key", 1, b"{}");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), 7 + 64);
        assert_eq!(sig, signature(b"key", 1, b"{}"));
        assert_ne!(sig, signature(b"key", 2, b"{}"));
        assert_ne!(sig, signature(b"other", 1, b"{}"));
    }
}
