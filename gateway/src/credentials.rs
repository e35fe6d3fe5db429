//! API keys and revoked tokens as a gateway knows them: a watch on the KV bucket
//! `usync-apikeys` (`shared::apikeys`) kept in memory, so that a request's key or
//! token is checked without a KV read, and a revocation reaches every gateway as soon
//! as the bucket changes. Sockets register the credential they were opened with;
//! when the watch sees it revoked (a key's record deleted, a `jti` or a subject
//! revoked), the matching sockets are told to close (1008).
//!
//! A key's last use is written back coalesced: at most once per key per minute by
//! each gateway (`used.{org}.{hash}`), from a flusher task, never on the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use ultrasync_shared::apikeys::{self, APIKEYS_BUCKET, ApiKeyRecord, LastUsed, Revocation};
use ultrasync_shared::auth::{AuthError, Credential, Principal, now_secs};

/// How often a key's last use is written at most (per gateway).
const USED_EVERY: Duration = Duration::from_secs(60);
/// How often the flusher looks for keys used since their last write.
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// How long start-up waits for the bucket's current state.
const LOAD_TIMEOUT: Duration = Duration::from_secs(15);

/// One open socket's credential.
struct Socket {
    principal_org: String,
    actor_id: String,
    credential: Credential,
    revoked: CancellationToken,
}

/// When a key was last written as used, and whether it was used since.
struct Used {
    org: String,
    written: Option<Instant>,
    pending: bool,
}

#[derive(Default)]
struct Known {
    /// Key hash → record.
    keys: HashMap<String, ApiKeyRecord>,
    /// Hex SHA-256 of a revoked `jti` → its revocation.
    jtis: HashMap<String, Revocation>,
    /// `{org}.{sub}` → its revocation.
    subs: HashMap<String, Revocation>,
}

pub struct Credentials {
    known: RwLock<Known>,
    sockets: Mutex<HashMap<String, Socket>>,
    used: Mutex<HashMap<String, Used>>,
    kv: kv::Store,
}

/// A socket's place in the registry: `revoked` fires when its credential is revoked;
/// dropping it unregisters the socket.
pub struct Registration {
    credentials: Arc<Credentials>,
    session_id: String,
    pub revoked: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.credentials.sockets).remove(&self.session_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.to_owned())
}

impl Credentials {
    /// Opens the bucket, loads what it holds (before the gateway serves anything, so
    /// a revoked token is never let through at start-up) and keeps following it.
    pub async fn start(
        js: &jetstream::Context,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let kv = js
            .get_key_value(APIKEYS_BUCKET)
            .await
            .with_context(|| format!("opening the bucket {APIKEYS_BUCKET}"))?;
        let this = Arc::new(Self {
            known: RwLock::new(Known::default()),
            sockets: Mutex::new(HashMap::new()),
            used: Mutex::new(HashMap::new()),
            kv,
        });
        let (loaded_tx, loaded) = tokio::sync::oneshot::channel();
        tokio::spawn(this.clone().follow(loaded_tx, shutdown.clone()));
        tokio::spawn(this.clone().flush_used(shutdown));
        tokio::time::timeout(LOAD_TIMEOUT, loaded)
            .await
            .map_err(|_| anyhow::anyhow!("reading {APIKEYS_BUCKET} took over {LOAD_TIMEOUT:?}"))?
            .map_err(|_| anyhow::anyhow!("the watch of {APIKEYS_BUCKET} ended at start-up"))?;
        Ok(this)
    }

    /// The principal of an API key, from memory.
    pub fn api_key(&self, key: &str) -> Result<Principal, AuthError> {
        let hash = apikeys::key_hash(key).ok_or_else(|| invalid("malformed api key"))?;
        let record = self
            .read()
            .keys
            .get(&hash)
            .cloned()
            .ok_or_else(|| invalid("unknown api key"))?;
        let principal = record.principal(&hash)?;
        self.touch(&hash, &record.org);
        Ok(principal)
    }

    /// Refuses a verified JWT that was revoked (by its `jti`, or its subject's
    /// tokens issued up to a time).
    pub fn check(&self, principal: &Principal) -> Result<(), AuthError> {
        match self.revoked(principal) {
            true => Err(invalid("token revoked")),
            false => Ok(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the principal's credential has been revoked.
    fn revoked(&self, p: &Principal) -> bool {
        let known = self.read();
        match &p.credential {
            Credential::ApiKey { hash } => !known.keys.contains_key(hash),
            Credential::Jwt { jti, iat } => {
                let by_jti = match jti {
                    Some(j) if !known.jtis.is_empty() => known
                        .jtis
                        .get(&hex::encode(Sha256::digest(j.as_bytes())))
                        .is_some_and(|r| !r.is_moot()),
                    _ => false,
                };
                by_jti
                    || (!known.subs.is_empty()
                        && known
                            .subs
                            .get(&format!("{}.{}", p.org, p.actor_id))
                            .is_some_and(|r| !r.is_moot() && iat.is_none_or(|t| t <= r.revoked_at)))
            }
            Credential::Embedder => false,
        }
    }

    /// Registers an open socket's credential. A credential revoked between its check
    /// and this call is caught here: `revoked` is then already cancelled.
    pub fn register(self: &Arc<Self>, session_id: &str, principal: &Principal) -> Registration {
        let revoked = CancellationToken::new();
        lock(&self.sockets).insert(
            session_id.to_owned(),
            Socket {
                principal_org: principal.org.to_string(),
                actor_id: principal.actor_id.to_string(),
                credential: principal.credential.clone(),
                revoked: revoked.clone(),
            },
        );
        if self.revoked(principal) {
            revoked.cancel();
        }
        Registration {
            credentials: self.clone(),
            session_id: session_id.to_owned(),
            revoked,
        }
    }

    /// Notes that a key was used; the flusher writes it at most once a minute.
    fn touch(&self, hash: &str, org: &str) {
        let mut used = lock(&self.used);
        let u = used.entry(hash.to_owned()).or_insert_with(|| Used {
            org: org.to_owned(),
            written: None,
            pending: false,
        });
        if !u.pending && u.written.is_none_or(|t| t.elapsed() >= USED_EVERY) {
            u.pending = true;
        }
    }

    async fn flush_used(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let due: Vec<(String, String)> = {
                let mut used = lock(&self.used);
                used.iter_mut()
                    .filter(|(_, u)| u.pending)
                    .map(|(h, u)| {
                        u.pending = false;
                        u.written = Some(Instant::now());
                        (h.clone(), u.org.clone())
                    })
                    .collect()
            };
            for (hash, org) in due {
                let body = serde_json::to_vec(&LastUsed { at: now_secs() }).unwrap_or_default();
                if let Err(e) = self
                    .kv
                    .put(apikeys::used_entry(&org, &hash), body.into())
                    .await
                {
                    debug!(error = %e, "writing a key's last use failed");
                }
            }
        }
    }

    /// Follows the bucket: its current state first (then `loaded` fires), every
    /// change after. A watch that ends is started again.
    async fn follow(
        self: Arc<Self>,
        loaded: tokio::sync::oneshot::Sender<()>,
        shutdown: CancellationToken,
    ) {
        let mut loaded = Some(loaded);
        loop {
            let watching = async {
                let empty = self
                    .kv
                    .status()
                    .await
                    .map(|s| s.values() == 0)
                    .map_err(|e| e.to_string())?;
                let mut watch = self
                    .kv
                    .watch_with_history(">")
                    .await
                    .map_err(|e| e.to_string())?;
                if empty && let Some(l) = loaded.take() {
                    let _ = l.send(());
                }
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(entry) => {
                            let current = entry.delta == 0;
                            self.apply(entry);
                            if current && let Some(l) = loaded.take() {
                                let _ = l.send(());
                            }
                        }
                        Err(e) => debug!(error = %e, "api key watch"),
                    }
                }
                Ok::<(), String>(())
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = watching => {
                    if let Err(e) = r {
                        warn!(error = %e, "watching {APIKEYS_BUCKET} failed; retrying");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// One change of the bucket.
    fn apply(&self, entry: kv::Entry) {
        let put = entry.operation == kv::Operation::Put;
        let mut parts = entry.key.splitn(3, '.');
        let (kind, rest) = (parts.next(), parts.next().zip(parts.next()));
        match (kind, rest) {
            (Some("key"), Some((_org, hash))) => {
                let record = put
                    .then(|| serde_json::from_slice::<ApiKeyRecord>(&entry.value).ok())
                    .flatten();
                let hash = hash.to_owned();
                match record {
                    Some(r) => {
                        self.write().keys.insert(hash, r);
                    }
                    None => {
                        let gone = self.write().keys.remove(&hash).is_some();
                        lock(&self.used).remove(&hash);
                        if gone {
                            info!(key = apikeys::short_id(&hash), "api key revoked");
                        }
                        self.close_where(
                            |s| matches!(&s.credential, Credential::ApiKey { hash: h } if *h == hash),
                        );
                    }
                }
            }
            (Some("revoked"), Some(("jti", hash))) => {
                let r = put
                    .then(|| serde_json::from_slice::<Revocation>(&entry.value).ok())
                    .flatten();
                let Some(r) = r else {
                    self.write().jtis.remove(hash);
                    return;
                };
                let jti = r.jti.clone();
                self.write().jtis.insert(hash.to_owned(), r);
                self.close_where(|s| {
                    matches!(&s.credential, Credential::Jwt { jti: Some(j), .. } if Some(j) == jti.as_ref())
                });
            }
            (Some("revoked"), Some(("sub", org_sub))) => {
                let r = put
                    .then(|| serde_json::from_slice::<Revocation>(&entry.value).ok())
                    .flatten();
                let Some(r) = r else {
                    self.write().subs.remove(org_sub);
                    return;
                };
                let before = r.revoked_at;
                let (org, sub) = org_sub.split_once('.').unwrap_or((org_sub, ""));
                let (org, sub) = (org.to_owned(), sub.to_owned());
                self.write().subs.insert(org_sub.to_owned(), r);
                self.close_where(|s| {
                    s.principal_org == org
                        && s.actor_id == sub
                        && matches!(&s.credential, Credential::Jwt { iat, .. } if iat.is_none_or(|t| t <= before))
                });
            }
            _ => {}
        }
    }

    /// Tells the sockets whose credential matches to close.
    fn close_where(&self, matches: impl Fn(&Socket) -> bool) {
        let sockets = lock(&self.sockets);
        let mut closed = 0;
        for s in sockets.values().filter(|s| matches(s)) {
            s.revoked.cancel();
            closed += 1;
        }
        if closed > 0 {
            info!(sockets = closed, "closing sockets of a revoked credential");
        }
    }
}
