//! One configuration type for every service. Sources, strongest first: command-line
//! flags > `ULTRASYNC_*` environment variables (both handled by clap in the binary)
//! > `ultrasync.toml` > the defaults here. Unknown keys in the file are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::{MIN_SECRET_LEN, TokenAlgorithm};

/// The file read when no `--config` is given and it exists in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "ultrasync.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS server URL(s), comma separated; on a cluster list several nodes so a
    /// service can connect (and reconnect) through any of them.
    pub nats_url: String,
    /// NATS user (with `nats_password`); each service has its own in the shipped
    /// `deploy/nats/users.conf`. None: no authentication (or credentials in the URL).
    pub nats_user: Option<String>,
    /// Password of `nats_user`. Prefer `ULTRASYNC_NATS_PASSWORD` to the file.
    pub nats_password: Option<String>,
    /// PEM file of the CA that signed the NATS servers' certificates: set, every
    /// connection to NATS uses TLS and trusts only this CA (`tls://` URLs say the
    /// same; without a CA file they trust the system's roots).
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate (with `nats_tls_key`) for servers that verify clients
    /// (mutual TLS).
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of `nats_tls_cert`.
    pub nats_tls_key: Option<PathBuf>,
    /// Stream replicas: 1, or 3 on a NATS cluster.
    pub replicas: usize,
    /// Which region this deployment is, and where writes are sequenced.
    pub region: RegionConfig,
    pub auth: AuthConfig,
    pub gateway: GatewayConfig,
    pub sequencer: SequencerConfig,
    pub materializer: MaterializerConfig,
    pub compactor: CompactorConfig,
    pub dev: DevConfig,
    /// What one command may carry (value depth, Automerge change and document
    /// sizes), checked by the gateways before queueing and by the sequencer.
    pub limits: crate::admission::LimitsConfig,
    /// Namespaces beyond the five defaults (SPEC §3).
    pub namespaces: Vec<crate::namespaces::NamespaceConfig>,
    /// Webhooks: committed ops POSTed to HTTP endpoints (run by the gateways).
    pub webhooks: Vec<WebhookConfig>,
}

/// One webhook: events of matching stream keys POSTed to `url`, signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// An id: the durable consumer is `usync-webhook-{name}`.
    pub name: String,
    /// `http://` or `https://` endpoint.
    pub url: String,
    /// HMAC-SHA256 key for the `Usync-Signature` header (>= 16 bytes).
    pub secret: String,
    pub org: String,
    /// Only this project (all when unset).
    #[serde(default)]
    pub project: Option<String>,
    /// Only this namespace (all when unset).
    #[serde(default)]
    pub namespace: Option<String>,
    /// `op.committed` and/or `doc.updated` (crdt namespaces); both when empty.
    #[serde(default)]
    pub events: Vec<String>,
    /// Attempts per op before it goes to the dead-letter stream.
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, at most 60 s.
    #[serde(default = "default_webhook_backoff_ms")]
    pub backoff_ms: u64,
    /// One attempt, answer included, may take this long; then it has failed.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
    /// A PEM CA trusted for an `https://` url besides the system's roots (a receiver
    /// with a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_webhook_attempts() -> u32 {
    8
}

fn default_webhook_timeout_ms() -> u64 {
    10_000
}

fn default_webhook_backoff_ms() -> u64 {
    500
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            nats_user: None,
            nats_password: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            replicas: 1,
            region: RegionConfig::default(),
            auth: AuthConfig::default(),
            gateway: GatewayConfig::default(),
            sequencer: SequencerConfig::default(),
            materializer: MaterializerConfig::default(),
            compactor: CompactorConfig::default(),
            dev: DevConfig::default(),
            limits: crate::admission::LimitsConfig::default(),
            namespaces: Vec::new(),
            webhooks: Vec::new(),
        }
    }
}

/// Multi-region (SPEC §7): the home region sequences every write; another region
/// keeps a JetStream mirror of the home region's `USYNC_OPS`, materializes it and
/// serves reads and subscriptions from it, while its gateways forward commands to
/// the home region's `USYNC_CMDS` over the leafnode connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionConfig {
    /// This region's name (logs, `/v1/status`).
    pub name: Option<String>,
    /// The home region's JetStream domain. Unset: this is the home region (or the
    /// only one). Set: this region mirrors the op log of that domain and runs no
    /// sequencer.
    pub home_domain: Option<String>,
}

impl RegionConfig {
    /// True in a region that mirrors another's op log.
    pub fn is_replica(&self) -> bool {
        self.home_domain.is_some()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret (≥ 32 bytes). Prefer `jwt_secret_file` or `ULTRASYNC_JWT_SECRET`.
    pub jwt_secret: Option<String>,
    /// File holding the HS256 secret (surrounding whitespace is trimmed).
    pub jwt_secret_file: Option<PathBuf>,
    pub audience: String,
    /// Checked when set.
    pub issuer: Option<String>,
    /// The token algorithm: `HS256` (with the secret), `RS256` or `EdDSA` (with
    /// `public_key_file`, or `jwks_file`, whose keys it then restricts to).
    pub algorithm: TokenAlgorithm,
    /// PEM public key (`PUBLIC KEY`; `RSA PUBLIC KEY` too for RS256) that verifies
    /// tokens of `algorithm`. The issuer keeps the private key; no secret is needed.
    pub public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`): tokens name their key with `kid`; each key
    /// verifies only the algorithm of its type (RSA: RS256, OKP/Ed25519: EdDSA).
    pub jwks_file: Option<PathBuf>,
    /// Longest accepted token lifetime, `exp - iat` (or `exp - now` without `iat`);
    /// 0 = unlimited.
    pub max_token_lifetime_secs: u64,
    /// API keys one org may have (`ultrasync apikey create` refuses more): every
    /// gateway keeps every key in memory.
    pub max_api_keys_per_org: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_secret_file: None,
            audience: crate::auth::DEFAULT_AUDIENCE.to_owned(),
            issuer: None,
            algorithm: TokenAlgorithm::Hs256,
            public_key_file: None,
            jwks_file: None,
            max_token_lifetime_secs: crate::auth::DEFAULT_MAX_TOKEN_LIFETIME_SECS,
            max_api_keys_per_org: crate::apikeys::DEFAULT_MAX_KEYS_PER_ORG,
        }
    }
}

/// True for the placeholder values the example files ship (`change-me…`): a
/// deployment that starts with one has not set its secrets.
pub fn is_example_secret(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    ["change-me", "change_me", "changeme"]
        .iter()
        .any(|p| v.starts_with(p))
}

fn refuse_example_secret(what: &str, value: &str) -> anyhow::Result<()> {
    if is_example_secret(value) {
        anyhow::bail!(
            "{what} is still the example placeholder (\"change-me…\"): set a real secret \
             (e.g. `openssl rand -hex 32`; ./deploy/init-env.sh writes them all)"
        );
    }
    Ok(())
}

impl AuthConfig {
    /// The configured secret, checked for length. There is no built-in default: only
    /// `ultrasync dev` makes one up (and keeps it in its data folder).
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        let secret = match (&self.jwt_secret, &self.jwt_secret_file) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading jwt secret file {}: {e}", path.display()))?
                .trim()
                .as_bytes()
                .to_vec(),
            (None, None) => anyhow::bail!(
                "no JWT secret configured: set ULTRASYNC_JWT_SECRET, --jwt-secret-file or auth.jwt_secret_file"
            ),
        };
        if secret.len() < MIN_SECRET_LEN {
            anyhow::bail!("the JWT secret must be at least {MIN_SECRET_LEN} bytes");
        }
        refuse_example_secret("the JWT secret", &String::from_utf8_lossy(&secret))?;
        Ok(secret)
    }

    /// True when tokens are verified with public keys (RS256/EdDSA), so this
    /// deployment cannot mint them.
    pub fn uses_public_keys(&self) -> bool {
        self.public_key_file.is_some() || self.jwks_file.is_some()
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.audience.is_empty() {
            anyhow::bail!("auth.audience must not be empty");
        }
        if let Some(s) = &self.jwt_secret {
            refuse_example_secret("auth.jwt_secret (ULTRASYNC_JWT_SECRET)", s)?;
        }
        if self.public_key_file.is_some() && self.jwks_file.is_some() {
            anyhow::bail!("auth.public_key_file and auth.jwks_file: set one, not both");
        }
        if self.public_key_file.is_some() && self.algorithm == TokenAlgorithm::Hs256 {
            anyhow::bail!(
                "auth.public_key_file needs auth.algorithm = \"RS256\" or \"EdDSA\" (HS256 uses the secret)"
            );
        }
        if self.algorithm != TokenAlgorithm::Hs256 && !self.uses_public_keys() {
            anyhow::bail!(
                "auth.algorithm = \"{}\" needs auth.public_key_file or auth.jwks_file",
                self.algorithm
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Largest accepted WebSocket frame / HTTP body.
    pub max_frame_bytes: usize,
    /// Frames queued for one socket before it is closed as a slow consumer (4001).
    pub outbound_queue: usize,
    /// Allowed `Origin` values; empty = any.
    pub allowed_origins: Vec<String>,
    /// Seconds a command may wait for the sequencer's answer before `unavailable`.
    pub command_timeout_secs: u64,
    /// Seconds a presence entry lives unless its client refreshes it.
    pub presence_ttl_secs: u64,
    /// Presence keys one client (org, project, actor, client) may show at once; a new
    /// key over it is refused with `rate_limited`.
    pub presence_keys_per_client: usize,
    /// Largest presence payload (encoded JSON bytes), whatever the namespace's
    /// `max_value_bytes`; over it: `payload_too_large`.
    pub presence_payload_bytes: usize,
    /// Presence entries one (org, project) table holds; a new entry over it is refused
    /// with `rate_limited` (and dropped when it arrives from another gateway).
    pub presence_entries_per_room: usize,
    /// Commands one org may have queued on this gateway and not yet stored in
    /// `USYNC_CMDS`; more are refused with `rate_limited`.
    pub org_max_inflight_commands: usize,
    /// Bytes of commands one org may have queued on this gateway and not yet stored
    /// in `USYNC_CMDS`; more are refused with `rate_limited`.
    pub org_max_inflight_bytes: usize,
    /// Frames per second one socket may send (token bucket; the burst is twice this).
    /// Over it, frames are refused with `rate_limited`; a socket that keeps going
    /// for a further burst's worth is closed (1008).
    pub max_messages_per_sec: u32,
    /// Open sockets this gateway accepts; more get 503 before the upgrade.
    pub max_connections: usize,
    /// Seconds a new socket has to send `hello` before it is closed (1008).
    pub hello_timeout_secs: u64,
    /// Cursor reports are coalesced per client and written to KV this often.
    pub cursor_flush_ms: u64,
    /// PEM certificate chain: with `tls_key_file`, `listen` serves TLS (`wss://`,
    /// `https://`; TLS 1.2 and 1.3 only).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// An extra plain (unencrypted) listener next to the TLS one, e.g. for a local
    /// health check; off when unset.
    pub plain_listen: Option<SocketAddr>,
    /// Origins allowed by CORS for the HTTP API; `["*"]` = any; empty = no CORS
    /// headers (browsers then refuse cross-origin reads).
    pub cors_origins: Vec<String>,
    /// Open sockets one actor (token `sub`) may have on this gateway; more get 429
    /// `rate_limited` before the upgrade.
    pub max_sockets_per_actor: usize,
    /// Open sockets one org may have on this gateway (its share of `max_connections`).
    pub max_sockets_per_org: usize,
    /// Commands per second one actor may send, over all its sockets and HTTP requests
    /// (a batch costs one per command; bursts of twice this). Over it: `rate_limited`.
    pub max_commands_per_sec_per_actor: u32,
    /// HTTP requests per second one org may send to this gateway, over all its
    /// actors (each also within `max_messages_per_sec`; bursts of twice this). Over
    /// it: 429 `rate_limited`.
    pub max_requests_per_sec_per_org: u32,
    /// Stream keys this gateway follows for its sockets at once (a consumer on the
    /// op log each); a subscription to one more gets `rate_limited`.
    pub max_followed_keys: usize,
    /// Stream keys one org's sockets make this gateway follow at once.
    pub max_followed_keys_per_org: usize,
    /// Op-log reads that search for their start (HTTP `ops` pages, `history`, a
    /// socket's catch-up) one org may have running on a gateway; more wait in line.
    pub log_reads_per_org: usize,
    /// Namespaces one socket may follow at once (and cursors one `hello` may carry).
    pub max_subscriptions_per_socket: usize,
    /// Bytes queued for one socket (live ops, catch-up, answers); a reader that
    /// cannot keep up is closed 4001 and resumes from its cursor.
    pub max_outbound_bytes: usize,
    /// Largest HTTP `ops` page or `history` answer (bytes; `more` says there is more).
    pub max_page_bytes: usize,
    /// Seconds a client has to send a request's headers (slow clients are cut off).
    pub header_read_timeout_secs: u64,
    /// Seconds an HTTP request may take to be answered (503 after that).
    pub request_timeout_secs: u64,
    /// TCP connections this gateway holds at once, upgraded or not; more are closed
    /// at once.
    pub max_http_connections: usize,
    /// A resuming socket whose cursor is more than this many ops behind the head gets
    /// the stored snapshot and the ops after it instead of every op since its cursor.
    pub snapshot_after_ops: u64,
    /// Client ids one actor may have cursors recorded for on this gateway (each holds
    /// the log until the compactor's `cursor_ttl_secs`); more: `rate_limited`.
    pub max_clients_per_actor: usize,
    /// Documents one automerge-repo socket may sync at once; a further one is refused
    /// with an `error` naming it.
    pub automerge_docs_per_socket: usize,
    /// Automerge documents this gateway holds for one org's automerge-repo sockets
    /// (in use, or kept a minute after the last socket left). At the bound the least
    /// recently used document no socket holds is dropped; when every one is in use, a
    /// new one is refused with an `error` naming it.
    pub automerge_docs_per_org: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_frame_bytes: 1024 * 1024,
            outbound_queue: 1024,
            allowed_origins: Vec::new(),
            command_timeout_secs: 10,
            presence_ttl_secs: 30,
            presence_keys_per_client: 16,
            presence_payload_bytes: 4 * 1024,
            presence_entries_per_room: 10_000,
            org_max_inflight_commands: 4096,
            org_max_inflight_bytes: 16 * 1024 * 1024,
            max_messages_per_sec: 1000,
            max_connections: 10_000,
            hello_timeout_secs: 10,
            cursor_flush_ms: 1000,
            tls_cert_file: None,
            tls_key_file: None,
            plain_listen: None,
            cors_origins: Vec::new(),
            max_sockets_per_actor: 100,
            max_sockets_per_org: 5_000,
            max_commands_per_sec_per_actor: 5_000,
            max_requests_per_sec_per_org: 10_000,
            max_followed_keys: 20_000,
            max_followed_keys_per_org: 2_000,
            log_reads_per_org: 4,
            max_subscriptions_per_socket: 64,
            max_outbound_bytes: 4 * 1024 * 1024,
            max_page_bytes: 4 * 1024 * 1024,
            header_read_timeout_secs: 10,
            request_timeout_secs: 30,
            max_http_connections: 12_000,
            snapshot_after_ops: 10_000,
            max_clients_per_actor: 1_000,
            automerge_docs_per_socket: 1_024,
            automerge_docs_per_org: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequencerConfig {
    /// How long a worker lingers for more commands of its stream key when more than
    /// one waits (ms, 0-10). 0 by default: the committer already groups every key's
    /// writes while one is on its way (measured: 1,000 ops/s p50 5.5 → 4.9 ms).
    pub batch_window_ms: u64,
    /// Most commands in one durable write (JetStream allows 1000 per atomic batch).
    pub batch_max: usize,
    /// Seconds the active sequencer may go without pulling before another takes over.
    pub failover_secs: u64,
    /// Seconds a taken command may stay unanswered before it is handed to another
    /// instance (JetStream ack wait).
    pub ack_wait_secs: u64,
    /// Where this instance serves Prometheus `/metrics` (off when unset).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            batch_window_ms: 0,
            batch_max: 500,
            failover_secs: 2,
            ack_wait_secs: 5,
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaterializerConfig {
    /// Where this instance keeps its RocksDB state (one folder per instance).
    pub data_dir: PathBuf,
    /// This instance's name: its durable consumer is `usync-materializer-{name}`.
    /// Every instance is a full replica; give each its own name and folder.
    pub name: String,
    /// A stream key's snapshot is written after this many ops since the last one...
    pub snapshot_every_ops: u64,
    /// ...or this many seconds after its first op since the last one. A state of
    /// more than 10,000 keys waits that many times longer for both.
    pub snapshot_interval_secs: u64,
    /// Whether this instance writes snapshots (at least one instance should).
    pub write_snapshots: bool,
    /// Milliseconds an apply waits, at most, after the previous one started, so that
    /// under load one write batch takes the ops of several log messages (0, the
    /// default: apply whatever has arrived at once). Ops arriving further apart than
    /// this are applied at once. Reads without `min_seq` may then see state up to
    /// this much older.
    pub apply_interval_ms: u64,
    /// Where this instance serves Prometheus `/metrics` (off when unset).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for MaterializerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".ultrasync/materializer"),
            name: "default".to_owned(),
            snapshot_every_ops: 10_000,
            snapshot_interval_secs: 60,
            write_snapshots: true,
            apply_interval_ms: 0,
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompactorConfig {
    /// Seconds between compaction passes.
    pub interval_secs: u64,
    /// A client whose cursor was last reported longer ago than this no longer holds
    /// the log back (it resyncs from a snapshot when it returns).
    pub cursor_ttl_secs: u64,
    /// Ops kept below the computed floor, for clients slightly behind it.
    pub retention_ops: u64,
    /// A durable reader of the log (a webhook's or a materializer's consumer) this
    /// many ops behind the head no longer holds it back: it is let go on purpose
    /// (logged, counted) and resyncs. 0 = readers always hold the log.
    pub reader_max_lag_ops: u64,
    /// `reader_max_lag_ops` for webhooks only, when set.
    pub webhook_max_lag_ops: Option<u64>,
    /// `reader_max_lag_ops` for materializers only, when set.
    pub materializer_max_lag_ops: Option<u64>,
    /// `reader_max_lag_ops` for replica regions' mirrors only, when set.
    pub mirror_max_lag_ops: Option<u64>,
    /// A durable reader whose oldest unprocessed op of a stream key was stored more
    /// than this many seconds ago (its JetStream timestamp, against the compactor's
    /// clock) is let go on that key just as one past `reader_max_lag_ops`, whichever
    /// bound it passes first. 0 = no time bound. 7 days by default, the same horizon
    /// as `cursor_ttl_secs`: a reader is held as long as a client would be, which
    /// covers a receiver down over a long weekend or a region cut off for days,
    /// while the ops bound alone would let a reader that is gone for good pin up to
    /// a million ops of every key it reads, for as long as those take to accumulate.
    pub reader_max_lag_secs: u64,
    /// `reader_max_lag_secs` for webhooks only, when set.
    pub webhook_max_lag_secs: Option<u64>,
    /// `reader_max_lag_secs` for materializers only, when set.
    pub materializer_max_lag_secs: Option<u64>,
    /// `reader_max_lag_secs` for replica regions' mirrors only, when set.
    pub mirror_max_lag_secs: Option<u64>,
    /// JetStream domains of the replica regions whose `USYNC_OPS` mirrors this one:
    /// each mirror holds the log at what it has copied (read across the leafnode
    /// link each pass; while a region cannot be reached, at the last position seen,
    /// or nothing purged for it at all if none was), within its lag bounds
    /// (`mirror_max_lag_ops`, `mirror_max_lag_secs` or the shared ones).
    pub mirror_domains: Vec<String>,
    /// Where the compactor serves Prometheus `/metrics` (off when unset).
    pub metrics_listen: Option<SocketAddr>,
    /// How long the commands of compacted ops are remembered (KV `usync-commands`,
    /// written before each purge): within it, a retry of a compacted op gets
    /// `stale_base` naming its `server_seq`, and its command id used for another body
    /// is refused. Past it, the command id may be used again. 0: forever (the bucket
    /// then grows by about 100 bytes per op purged).
    pub command_memory_days: u64,
}

impl CompactorConfig {
    /// How far behind a durable reader of `kind` (`webhook`, `materializer`, `mirror`)
    /// may fall before it is let go (0: never).
    pub fn max_lag_ops(&self, kind: &str) -> u64 {
        let own = match kind {
            "webhook" => self.webhook_max_lag_ops,
            "materializer" => self.materializer_max_lag_ops,
            "mirror" => self.mirror_max_lag_ops,
            _ => None,
        };
        own.unwrap_or(self.reader_max_lag_ops)
    }

    /// How old (seconds) the oldest op a durable reader of `kind` has not processed
    /// may be before it is let go (0: no bound).
    pub fn max_lag_secs(&self, kind: &str) -> u64 {
        let own = match kind {
            "webhook" => self.webhook_max_lag_secs,
            "materializer" => self.materializer_max_lag_secs,
            "mirror" => self.mirror_max_lag_secs,
            _ => None,
        };
        own.unwrap_or(self.reader_max_lag_secs)
    }
}

impl Default for CompactorConfig {
    fn default() -> Self {
        Self {
            interval_secs: 60,
            cursor_ttl_secs: 7 * 86_400,
            retention_ops: 1000,
            reader_max_lag_ops: 1_000_000,
            webhook_max_lag_ops: None,
            materializer_max_lag_ops: None,
            mirror_max_lag_ops: None,
            reader_max_lag_secs: 7 * 86_400,
            webhook_max_lag_secs: None,
            materializer_max_lag_secs: None,
            mirror_max_lag_secs: None,
            mirror_domains: Vec::new(),
            metrics_listen: None,
            command_memory_days: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevConfig {
    /// Where `ultrasync dev` keeps the NATS store, its config and the dev secret.
    pub data_dir: PathBuf,
    /// Client port of the managed nats-server.
    pub nats_port: u16,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".ultrasync"),
            nats_port: 4222,
        }
    }
}

impl Config {
    /// Reads `path`, or `ultrasync.toml` in the working directory when present, or
    /// returns the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                if !p.exists() {
                    return Ok(Self::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Self::from_toml(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        crate::nats::server_addrs(&self.nats_url)?;
        if self.nats_user.is_some() != self.nats_password.is_some() {
            anyhow::bail!("nats_user and nats_password go together");
        }
        if let Some(p) = &self.nats_password {
            refuse_example_secret("nats_password (ULTRASYNC_NATS_PASSWORD)", p)?;
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            anyhow::bail!("nats_tls_cert and nats_tls_key go together");
        }
        for (name, file) in [
            ("nats_tls_ca", &self.nats_tls_ca),
            ("nats_tls_cert", &self.nats_tls_cert),
            ("nats_tls_key", &self.nats_tls_key),
        ] {
            if let Some(f) = file
                && !f.is_file()
            {
                anyhow::bail!("{name}: {} is not a readable file", f.display());
            }
        }
        self.auth.validate()?;
        if let Some(d) = &self.region.home_domain
            && (d.is_empty()
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            anyhow::bail!("region.home_domain must be a JetStream domain name, got {d:?}");
        }
        if !matches!(self.replicas, 1 | 3) {
            anyhow::bail!("replicas must be 1 or 3, got {}", self.replicas);
        }
        if !(0..=10).contains(&self.sequencer.batch_window_ms) {
            anyhow::bail!("sequencer.batch_window_ms must be 0-10");
        }
        if !(1..=1000).contains(&self.sequencer.batch_max) {
            anyhow::bail!("sequencer.batch_max must be 1-1000");
        }
        if self.sequencer.failover_secs == 0 || self.sequencer.ack_wait_secs == 0 {
            anyhow::bail!("sequencer.failover_secs and ack_wait_secs must be positive");
        }
        if self.materializer.snapshot_every_ops == 0
            || self.materializer.snapshot_interval_secs == 0
        {
            anyhow::bail!(
                "materializer.snapshot_every_ops and snapshot_interval_secs must be positive"
            );
        }
        if self.materializer.apply_interval_ms > 1000 {
            anyhow::bail!("materializer.apply_interval_ms must be 0-1000");
        }
        crate::ids::Id::parse("materializer.name", &self.materializer.name).map_err(|e| {
            anyhow::anyhow!("materializer.name must be an id (letters, digits, - and _): {e}")
        })?;
        crate::namespaces::Namespaces::new(&self.namespaces)?;
        self.limits.validate().map_err(anyhow::Error::msg)?;
        if self.gateway.max_messages_per_sec == 0
            || self.gateway.max_connections == 0
            || self.gateway.hello_timeout_secs == 0
        {
            anyhow::bail!(
                "gateway.max_messages_per_sec, max_connections and hello_timeout_secs must be positive"
            );
        }
        for d in &self.compactor.mirror_domains {
            if d.is_empty()
                || !d
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                anyhow::bail!("compactor.mirror_domains: {d:?} is not a JetStream domain name");
            }
        }
        if self.compactor.interval_secs == 0 || self.compactor.cursor_ttl_secs == 0 {
            anyhow::bail!("compactor.interval_secs and cursor_ttl_secs must be positive");
        }
        for w in &self.webhooks {
            crate::ids::Id::parse("webhook name", &w.name)?;
            crate::ids::Id::parse("webhook org", &w.org)?;
            if let Some(p) = &w.project {
                crate::ids::Id::parse("webhook project", p)?;
            }
            if let Some(n) = &w.namespace {
                crate::ids::Id::parse("webhook namespace", n)?;
            }
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                anyhow::bail!("webhook {}: url must be http:// or https://", w.name);
            }
            if w.secret.len() < 16 {
                anyhow::bail!("webhook {}: secret must be at least 16 bytes", w.name);
            }
            refuse_example_secret(&format!("webhook {}: secret", w.name), &w.secret)?;
            if w.max_attempts == 0 {
                anyhow::bail!("webhook {}: max_attempts must be positive", w.name);
            }
            if w.timeout_ms == 0 {
                anyhow::bail!("webhook {}: timeout_ms must be positive", w.name);
            }
            if let Some(e) = w
                .events
                .iter()
                .find(|e| !matches!(e.as_str(), "op.committed" | "doc.updated"))
            {
                anyhow::bail!("webhook {}: unknown event {e:?}", w.name);
            }
        }
        if self.gateway.tls_cert_file.is_some() != self.gateway.tls_key_file.is_some() {
            anyhow::bail!("gateway.tls_cert_file and tls_key_file go together");
        }
        if self.gateway.cursor_flush_ms == 0 {
            anyhow::bail!("gateway.cursor_flush_ms must be positive");
        }
        let g = &self.gateway;
        if g.max_sockets_per_actor == 0
            || g.max_sockets_per_org == 0
            || g.max_commands_per_sec_per_actor == 0
            || g.max_requests_per_sec_per_org == 0
            || g.max_followed_keys == 0
            || g.max_followed_keys_per_org == 0
            || g.log_reads_per_org == 0
            || g.max_subscriptions_per_socket == 0
            || g.max_clients_per_actor == 0
            || g.automerge_docs_per_socket == 0
            || g.automerge_docs_per_org == 0
            || g.header_read_timeout_secs == 0
            || g.request_timeout_secs == 0
        {
            anyhow::bail!(
                "gateway.max_sockets_per_actor, max_sockets_per_org, max_commands_per_sec_per_actor, max_requests_per_sec_per_org, max_followed_keys, max_followed_keys_per_org, log_reads_per_org, max_subscriptions_per_socket, max_clients_per_actor, automerge_docs_per_socket, automerge_docs_per_org, header_read_timeout_secs and request_timeout_secs must be positive"
            );
        }
        if g.max_outbound_bytes < 2 * g.max_frame_bytes || g.max_page_bytes < g.max_frame_bytes {
            anyhow::bail!(
                "gateway.max_outbound_bytes must be at least twice max_frame_bytes and max_page_bytes at least max_frame_bytes"
            );
        }
        if g.max_http_connections < g.max_connections {
            anyhow::bail!("gateway.max_http_connections must be at least max_connections");
        }
        if self.gateway.outbound_queue == 0 {
            anyhow::bail!("gateway.outbound_queue must be at least 1");
        }
        Ok(())
    }

    /// The namespace registry (defaults + declared).
    pub fn namespaces(&self) -> anyhow::Result<crate::namespaces::Namespaces> {
        crate::namespaces::Namespaces::new(&self.namespaces)
    }

    pub fn layout(&self) -> crate::nats::LayoutOptions {
        crate::nats::LayoutOptions {
            replicas: self.replicas,
            mirror_of: self.region.home_domain.clone(),
            partitions: None,
            lease_ttl: std::time::Duration::from_secs(self.sequencer.failover_secs),
            command_memory: std::time::Duration::from_secs(
                self.compactor.command_memory_days.saturating_mul(86_400),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let cfg = Config::from_toml(
            "nats_url = \"nats://10.0.0.1:4222\"\n[gateway]\nlisten = \"0.0.0.0:9000\"\n",
        )
        .expect("parse");
        assert_eq!(cfg.nats_url, "nats://10.0.0.1:4222");
        assert_eq!(cfg.gateway.listen.port(), 9000);
        assert_eq!(cfg.gateway.outbound_queue, 1024);
        assert!(Config::from_toml("nats_ur = \"x\"").is_err());
        assert!(Config::from_toml("replicas = 2").is_err());
        assert!(Config::from_toml("nats_user = \"gateway\"").is_err());
        let cfg = Config::from_toml(
            "nats_url = \"nats://a:4222, nats://b:4222,nats://c:4222\"\nnats_user = \"gateway\"\nnats_password = \"pw\"\n",
        )
        .expect("credentials and a server list");
        assert_eq!(cfg.nats_user.as_deref(), Some("gateway"));
        assert!(Config::from_toml("nats_url = \"nats://a:4222,,nope:x\"").is_err());
    }

    #[test]
    fn readers_lag_bounds_fall_back_to_the_shared_one() {
        let cfg = Config::from_toml(
            "[compactor]\nreader_max_lag_ops = 100\nwebhook_max_lag_ops = 5\nmirror_max_lag_ops = 0\n",
        )
        .expect("parse");
        assert_eq!(cfg.compactor.max_lag_ops("webhook"), 5);
        assert_eq!(cfg.compactor.max_lag_ops("materializer"), 100);
        assert_eq!(cfg.compactor.max_lag_ops("mirror"), 0);
        let cfg = Config::from_toml(
            "[compactor]\nreader_max_lag_secs = 600\nwebhook_max_lag_secs = 2\nmaterializer_max_lag_secs = 0\n",
        )
        .expect("parse");
        assert_eq!(cfg.compactor.max_lag_secs("webhook"), 2);
        assert_eq!(cfg.compactor.max_lag_secs("materializer"), 0);
        assert_eq!(cfg.compactor.max_lag_secs("mirror"), 600);
        assert_eq!(
            CompactorConfig::default().max_lag_secs("webhook"),
            7 * 86_400
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let cfg = Config::from_toml(include_str!("../../ultrasync.example.toml"))
            .expect("example config");
        assert_eq!(
            cfg.gateway.outbound_queue,
            GatewayConfig::default().outbound_queue
        );
    }

    #[test]
    fn secret_must_be_long_enough() {
        let mut a = AuthConfig::default();
        assert!(a.secret().is_err());
        a.jwt_secret = Some("short".into());
        assert!(a.secret().is_err());
        a.jwt_secret = Some("x".repeat(32));
        assert_eq!(a.secret().expect("secret").len(), 32);
    }

    #[test]
    fn example_secrets_are_refused() {
        // The placeholders actually shipped in deploy/env/*.example.
        let jwt = "change-me-to-a-random-secret-of-at-least-32-bytes";
        let err = Config::from_toml(&format!("[auth]\njwt_secret = \"{jwt}\"\n"))
            .expect_err("example jwt secret");
        assert!(err.to_string().contains("placeholder"), "{err}");
        let mut a = AuthConfig {
            jwt_secret: Some(jwt.to_owned()),
            ..AuthConfig::default()
        };
        assert!(a.secret().is_err(), "also where the secret is read");
        let dir = std::env::temp_dir().join(format!("usync-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("jwt");
        std::fs::write(&file, format!("{jwt}\n")).expect("write");
        a.jwt_secret = None;
        a.jwt_secret_file = Some(file);
        assert!(a.secret().is_err(), "a secret file holding the placeholder");
        std::fs::remove_dir_all(&dir).ok();

        let err = Config::from_toml(
            "nats_user = \"gateway\"\nnats_password = \"change-me-gateway-password\"\n",
        )
        .expect_err("example nats password");
        assert!(err.to_string().contains("nats_password"), "{err}");

        let webhook = |secret: &str| {
            format!(
                "[[webhooks]]\nname = \"w\"\nurl = \"http://127.0.0.1:9/\"\norg = \"acme\"\nsecret = \"{secret}\"\n"
            )
        };
        let err = Config::from_toml(&webhook("CHANGE-ME-webhook-secret")).expect_err("example");
        assert!(err.to_string().contains("webhook w"), "{err}");
        Config::from_toml(&webhook("a-real-webhook-secret-123")).expect("real secret");
        assert!(!is_example_secret("exchange-me-not"));
    }

    #[test]
    fn auth_keys_parse_and_are_checked() {
        let cfg = Config::from_toml(
            "[auth]\nalgorithm = \"EdDSA\"\npublic_key_file = \"/etc/ultrasync/jwt.pub\"\nmax_token_lifetime_secs = 3600\n",
        )
        .expect("eddsa");
        assert_eq!(cfg.auth.algorithm, TokenAlgorithm::EdDsa);
        assert_eq!(cfg.auth.max_token_lifetime_secs, 3600);
        assert!(cfg.auth.uses_public_keys());
        let cfg = Config::from_toml("[auth]\njwks_file = \"/etc/ultrasync/jwks.json\"\n")
            .expect("jwks alone");
        assert_eq!(cfg.auth.algorithm, TokenAlgorithm::Hs256);
        assert_eq!(
            Config::default().auth.max_token_lifetime_secs,
            30 * 86_400,
            "30 days by default"
        );
        for bad in [
            "[auth]\nalgorithm = \"RS256\"\n",
            "[auth]\nalgorithm = \"none\"\n",
            "[auth]\nalgorithm = \"HS512\"\n",
            "[auth]\npublic_key_file = \"/k.pem\"\n",
            "[auth]\nalgorithm = \"RS256\"\npublic_key_file = \"/k.pem\"\njwks_file = \"/j.json\"\n",
            "[auth]\naudience = \"\"\n",
        ] {
            assert!(Config::from_toml(bad).is_err(), "{bad}");
        }
    }
}
