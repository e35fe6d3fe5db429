//! `ultrasync`: one binary, one subcommand per service plus the tools around them.
//! Parsing and wiring only; the services live in their crates.

mod apikey;
mod bench;
mod cli;
mod dev;
mod inspect;
mod rebuild;
mod serve;

/// mimalloc instead of glibc's malloc: the pipeline allocates many small, short-lived
/// buffers (frames, envelopes, ops) across threads; measured with `ultrasync bench`.
/// Built with `no_thp` (Cargo.toml): with transparent huge pages, every page mimalloc
/// purged and touched again made the kernel zero 2 MiB (3-9 % of `serve`'s profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use ultrasync_shared::auth;
use ultrasync_shared::config::Config;

#[derive(Parser)]
#[command(
    name = "ultrasync",
    version,
    about = "Server-authoritative real-time sync on NATS JetStream"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

/// Settings every subcommand understands. Flags beat `ULTRASYNC_*` variables, which
/// beat `ultrasync.toml`, which beats the defaults.
#[derive(Args)]
struct CommonArgs {
    /// Config file [default: ./ultrasync.toml when present].
    #[arg(long, global = true, env = "ULTRASYNC_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL(s), comma separated (several nodes of a cluster).
    #[arg(long, global = true, env = "ULTRASYNC_NATS_URL")]
    nats_url: Option<String>,
    /// NATS user (each service has its own in deploy/nats/users.conf).
    #[arg(long, global = true, env = "ULTRASYNC_NATS_USER")]
    nats_user: Option<String>,
    /// Password of --nats-user.
    #[arg(
        long,
        global = true,
        env = "ULTRASYNC_NATS_PASSWORD",
        hide_env_values = true
    )]
    nats_password: Option<String>,
    /// CA (PEM) of the NATS servers' certificates: connect with TLS, trusting it.
    #[arg(long, global = true, env = "ULTRASYNC_NATS_TLS_CA")]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients.
    #[arg(long, global = true, env = "ULTRASYNC_NATS_TLS_CERT")]
    nats_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(long, global = true, env = "ULTRASYNC_NATS_TLS_KEY")]
    nats_tls_key: Option<PathBuf>,
    /// HS256 secret (at least 32 bytes).
    #[arg(
        long,
        global = true,
        env = "ULTRASYNC_JWT_SECRET",
        hide_env_values = true
    )]
    jwt_secret: Option<String>,
    /// File holding the HS256 secret.
    #[arg(long, global = true, env = "ULTRASYNC_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Stream replicas (1, or 3 on a NATS cluster).
    #[arg(long, global = true, env = "ULTRASYNC_REPLICAS")]
    replicas: Option<usize>,
    /// This region's name (logs).
    #[arg(long, global = true, env = "ULTRASYNC_REGION")]
    region: Option<String>,
    /// Make this a replica region of the one whose NATS JetStream domain this is:
    /// mirror its op log, forward writes to it, run no sequencer.
    #[arg(long, global = true, env = "ULTRASYNC_HOME_DOMAIN")]
    home_domain: Option<String>,
    /// Automerge documents a gateway holds for one org's automerge-repo sockets
    /// (gateway.automerge_docs_per_org).
    #[arg(long, global = true, env = "ULTRASYNC_AUTOMERGE_DOCS_PER_ORG")]
    automerge_docs_per_org: Option<usize>,
    /// Log format.
    #[arg(long, global = true, env = "ULTRASYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `ultrasync setup`.
#[derive(clap::Args)]
struct SetupArgs {
    /// Partitions of USYNC_CMDS (1-1024; default 16 for a new layout). Fixed once
    /// set: a later setup keeps the number and refuses another.
    #[arg(long, env = "ULTRASYNC_PARTITIONS")]
    partitions: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything locally: a managed nats-server and all services in one process.
    Dev(dev::DevArgs),
    /// Create or update the JetStream layout (streams, cursor bucket, snapshot store,
    /// sequencer leases, command partitions) with the configured replicas. Run once
    /// per deployment, with admin credentials; services whose NATS user may not
    /// create streams expect it done. On a deployment set up before partitions it
    /// adds them while everything runs (README, "Upgrading to partitions").
    Setup(SetupArgs),
    /// Run every service (gateway, sequencer, materializer, compactor) in one process
    /// against a NATS server: one host's deployment, at less CPU per op than
    /// separate processes. It includes the compactor: run one per deployment, and
    /// scale out with the services as separate processes.
    Serve(ServeArgs),
    /// Run the gateway (WebSocket + HTTP) against a NATS server.
    Gateway(GatewayArgs),
    /// Run a sequencer against a NATS server.
    Sequencer(SequencerArgs),
    /// Run a materializer (RocksDB state, snapshots, reads) against a NATS server.
    Materializer(MaterializerArgs),
    /// Run the compactor (trims the op log below every live client's cursor and the
    /// snapshot) against a NATS server.
    Compactor(CompactorArgs),
    /// One compaction pass now; prints what it purged (or would, with --dry-run).
    Compact(CompactArgs),
    /// Load-test a stack of its own: throughput, latency, fan-out, bootstrap and raw
    /// JetStream; writes a JSON report and an SVG chart.
    Bench(bench::BenchArgs),
    /// Rebuild every stream key from snapshot + log and compare with the live state.
    Rebuild(rebuild::RebuildArgs),
    /// Mint a JWT from the configured secret (or the `dev` secret).
    Token(TokenArgs),
    /// API keys for agents and services: scoped, revocable credentials that need no
    /// signing secret, stored as hashes in the bucket usync-apikeys (NATS admin
    /// credentials: --nats-user admin).
    #[command(subcommand)]
    Apikey(apikey::ApiKeyCommand),
    /// Revoke JWTs before they expire, by `jti` or by subject (NATS admin
    /// credentials): refused by every gateway at once, open sockets closed with 1008.
    RevokeToken(apikey::RevokeTokenArgs),
    /// Print the effective configuration (all sources merged, secrets redacted) as TOML.
    Config,
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// Admin views of what is stored (JSON).
    #[command(subcommand)]
    Inspect(inspect::Inspect),
}

#[derive(Args)]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, env = "ULTRASYNC_LISTEN")]
    listen: Option<SocketAddr>,
    /// PEM certificate chain: serve TLS (wss://, https://) on --listen.
    #[arg(long, env = "ULTRASYNC_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "ULTRASYNC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Folder of the materializer's RocksDB state.
    #[arg(long, env = "ULTRASYNC_MATERIALIZER_DIR")]
    data_dir: Option<PathBuf>,
    /// The materializer's instance name (its durable consumer is
    /// usync-materializer-{name}).
    #[arg(long, env = "ULTRASYNC_MATERIALIZER_NAME")]
    name: Option<String>,
}

impl GatewayArgs {
    fn apply(self, cfg: &mut Config) {
        if let Some(l) = self.listen {
            cfg.gateway.listen = l;
        }
        if self.tls_cert.is_some() {
            cfg.gateway.tls_cert_file = self.tls_cert;
            cfg.gateway.tls_key_file = self.tls_key;
        }
    }
}

#[derive(Args)]
pub struct SequencerArgs {
    /// Milliseconds a worker lingers for more commands of its stream key when more
    /// than one waits (0-10; 0: none, the committer groups writes under load).
    #[arg(long, env = "ULTRASYNC_BATCH_WINDOW_MS")]
    batch_window_ms: Option<u64>,
    /// Most commands in one write (1-1000).
    #[arg(long, env = "ULTRASYNC_BATCH_MAX")]
    batch_max: Option<usize>,
    /// Serve Prometheus /metrics here (per-partition queue depth, counters, leases).
    #[arg(long, env = "ULTRASYNC_SEQUENCER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args)]
pub struct MaterializerArgs {
    /// Folder of this instance's RocksDB state.
    #[arg(long, env = "ULTRASYNC_MATERIALIZER_DIR")]
    data_dir: Option<PathBuf>,
    /// Instance name (its durable consumer is usync-materializer-{name}).
    #[arg(long, env = "ULTRASYNC_MATERIALIZER_NAME")]
    name: Option<String>,
    /// Snapshot a stream key after this many ops.
    #[arg(long, env = "ULTRASYNC_SNAPSHOT_EVERY_OPS")]
    snapshot_every_ops: Option<u64>,
    /// ... or this many seconds after its first op since the last snapshot.
    #[arg(long, env = "ULTRASYNC_SNAPSHOT_INTERVAL_SECS")]
    snapshot_interval_secs: Option<u64>,
    /// Serve Prometheus /metrics here (ops applied, apply and snapshot times).
    #[arg(long, env = "ULTRASYNC_MATERIALIZER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args)]
pub struct CompactorArgs {
    /// Seconds between passes.
    #[arg(long, env = "ULTRASYNC_COMPACT_INTERVAL_SECS")]
    interval_secs: Option<u64>,
    /// Clients unseen this long no longer hold the log back.
    #[arg(long, env = "ULTRASYNC_CURSOR_TTL_SECS")]
    cursor_ttl_secs: Option<u64>,
    /// Ops kept below the computed floor.
    #[arg(long, env = "ULTRASYNC_RETENTION_OPS")]
    retention_ops: Option<u64>,
    /// Serve Prometheus /metrics here.
    #[arg(long, env = "ULTRASYNC_COMPACTOR_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

impl CompactorArgs {
    fn apply(&self, cfg: &mut Config) {
        if let Some(v) = self.interval_secs {
            cfg.compactor.interval_secs = v;
        }
        if let Some(v) = self.cursor_ttl_secs {
            cfg.compactor.cursor_ttl_secs = v;
        }
        if let Some(v) = self.retention_ops {
            cfg.compactor.retention_ops = v;
        }
        if let Some(v) = self.metrics_listen {
            cfg.compactor.metrics_listen = Some(v);
        }
    }
}

#[derive(Args)]
pub struct CompactArgs {
    /// Print what would be purged; purge nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    settings: CompactorArgs,
}

#[derive(Args)]
struct TokenArgs {
    /// Organization the token is for.
    #[arg(long)]
    org: String,
    /// Project(s) the token may touch; repeat or comma-separate; `*` = all.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    project: Vec<String>,
    /// Space-separated scopes: read, write, admin.
    #[arg(long, default_value = "read write")]
    scope: String,
    /// Lifetime: seconds, or with a unit (30m, 12h, 7d).
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    ttl: u64,
    /// Subject (the actor id).
    #[arg(long, default_value = "dev-user")]
    sub: String,
    /// Namespace allow-list (comma-separated); all when absent.
    #[arg(long, value_delimiter = ',')]
    ns: Option<Vec<String>>,
    /// Token id (`jti`), by which `ultrasync revoke-token --jti` revokes it
    /// [default: a random one].
    #[arg(long)]
    jti: Option<String>,
    /// The `dev` data folder whose secret to use when none is configured.
    #[arg(long, env = "ULTRASYNC_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (try 3600, 30m, 12h, 7d)"))?;
    if n == 0 {
        return Err("ttl must be positive".to_owned());
    }
    Ok(n * mult)
}

impl CommonArgs {
    /// Loads the file and applies the flags / environment on top.
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::load(self.config.as_deref())?;
        if let Some(u) = &self.nats_url {
            cfg.nats_url = u.clone();
        }
        if let Some(u) = &self.nats_user {
            cfg.nats_user = Some(u.clone());
        }
        if let Some(p) = &self.nats_password {
            cfg.nats_password = Some(p.clone());
        }
        if let Some(f) = &self.nats_tls_ca {
            cfg.nats_tls_ca = Some(f.clone());
        }
        if let Some(f) = &self.nats_tls_cert {
            cfg.nats_tls_cert = Some(f.clone());
        }
        if let Some(f) = &self.nats_tls_key {
            cfg.nats_tls_key = Some(f.clone());
        }
        if let Some(s) = &self.jwt_secret {
            cfg.auth.jwt_secret = Some(s.clone());
        }
        if let Some(f) = &self.jwt_secret_file {
            cfg.auth.jwt_secret_file = Some(f.clone());
        }
        if let Some(r) = self.replicas {
            cfg.replicas = r;
        }
        if let Some(r) = &self.region {
            cfg.region.name = Some(r.clone());
        }
        if let Some(d) = &self.home_domain {
            cfg.region.home_domain = Some(d.clone());
        }
        if let Some(n) = self.automerge_docs_per_org {
            cfg.gateway.automerge_docs_per_org = n;
        }
        Ok(cfg)
    }
}

/// Cancels on Ctrl-C or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    error!(error = %e, "cannot listen for SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    t.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("interrupt: shutting down"),
            _ = term.recv() => info!("terminated: shutting down"),
        }
        t.cancel();
    });
    token
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ultrasync_shared::telemetry::init(matches!(cli.common.log_format, LogFormat::Json));
    // The services export their spans when ULTRASYNC_OTLP_ENDPOINT is set.
    let services = matches!(
        cli.command,
        Command::Dev(_)
            | Command::Serve(_)
            | Command::Gateway(_)
            | Command::Sequencer(_)
            | Command::Materializer(_)
            | Command::Compactor(_)
    );
    if services {
        match ultrasync_shared::trace::init_from_env() {
            Ok(true) => info!("traces are exported over OTLP"),
            Ok(false) => {}
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    if services {
        // Spans still queued go out before the process ends.
        ultrasync_shared::trace::shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<cli::Exit>().is_some() => {
            ExitCode::from(e.downcast_ref::<cli::Exit>().map_or(1, |x| x.0))
        }
        Err(e) if e.downcast_ref::<rebuild::Mismatch>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev::run(&cli.common, args).await,
        Command::Serve(args) => {
            let mut cfg = cli.common.config()?;
            args.gateway.apply(&mut cfg);
            if let Some(d) = args.data_dir {
                cfg.materializer.data_dir = d;
            }
            if let Some(n) = args.name {
                cfg.materializer.name = n;
            }
            cfg.validate()?;
            let listener = tokio::net::TcpListener::bind(cfg.gateway.listen)
                .await
                .with_context(|| format!("binding {}", cfg.gateway.listen))?;
            // Once here rather than four services racing to it.
            {
                let client = ultrasync_shared::nats::connect(
                    &cfg,
                    "ultrasync-serve",
                    Duration::from_secs(30),
                )
                .await?;
                let js = async_nats::jetstream::new(client);
                ultrasync_shared::nats::prepare_layout(&js, cfg.layout()).await?;
            }
            let shutdown = shutdown_on_signals();
            serve::Services::spawn(&cfg, listener, &shutdown, None)
                .supervise(&shutdown)
                .await
        }
        Command::Gateway(args) => {
            let mut cfg = cli.common.config()?;
            args.apply(&mut cfg);
            cfg.validate()?;
            let listener = tokio::net::TcpListener::bind(cfg.gateway.listen)
                .await
                .with_context(|| format!("binding {}", cfg.gateway.listen))?;
            ultrasync_gateway::run(cfg, listener, shutdown_on_signals()).await
        }
        Command::Sequencer(args) => {
            let mut cfg = cli.common.config()?;
            if let Some(w) = args.batch_window_ms {
                cfg.sequencer.batch_window_ms = w;
            }
            if let Some(m) = args.batch_max {
                cfg.sequencer.batch_max = m;
            }
            if let Some(a) = args.metrics_listen {
                cfg.sequencer.metrics_listen = Some(a);
            }
            cfg.validate()?;
            ultrasync_sequencer::run(cfg, shutdown_on_signals()).await
        }
        Command::Materializer(args) => {
            let mut cfg = cli.common.config()?;
            if let Some(d) = args.data_dir {
                cfg.materializer.data_dir = d;
            }
            if let Some(n) = args.name {
                cfg.materializer.name = n;
            }
            if let Some(n) = args.snapshot_every_ops {
                cfg.materializer.snapshot_every_ops = n;
            }
            if let Some(n) = args.snapshot_interval_secs {
                cfg.materializer.snapshot_interval_secs = n;
            }
            if let Some(a) = args.metrics_listen {
                cfg.materializer.metrics_listen = Some(a);
            }
            cfg.validate()?;
            ultrasync_materializer::run(cfg, shutdown_on_signals()).await
        }
        Command::Compactor(args) => {
            let mut cfg = cli.common.config()?;
            args.apply(&mut cfg);
            cfg.validate()?;
            ultrasync_compactor::run(cfg, shutdown_on_signals()).await
        }
        Command::Compact(args) => {
            let mut cfg = cli.common.config()?;
            args.settings.apply(&mut cfg);
            cfg.validate()?;
            let client =
                ultrasync_shared::nats::connect(&cfg, "ultrasync-compact", Duration::from_secs(5))
                    .await?;
            let js = async_nats::jetstream::new(client);
            let report =
                ultrasync_compactor::compact_once(&js, &cfg.compactor, args.dry_run, None).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Setup(args) => {
            let cfg = cli.common.config()?;
            cfg.validate()?;
            let client =
                ultrasync_shared::nats::connect(&cfg, "ultrasync-setup", Duration::from_secs(10))
                    .await?;
            let js = async_nats::jetstream::new(client);
            let mut layout = cfg.layout();
            layout.partitions = args.partitions;
            ultrasync_shared::nats::ensure_layout(&js, layout).await?;
            let problems = ultrasync_shared::nats::check_layout(&js, &cfg.layout()).await?;
            if !problems.is_empty() {
                anyhow::bail!("layout still incomplete: {}", problems.join("; "));
            }
            for (name, replicas) in
                ultrasync_shared::nats::describe_layout(&js, &cfg.layout()).await?
            {
                println!("{name:<24} replicas {replicas}");
            }
            Ok(())
        }
        Command::Client(cmd) => cli::run(cmd).await,
        Command::Apikey(cmd) => apikey::run(&cli.common.config()?, cmd).await,
        Command::RevokeToken(args) => apikey::revoke_token(&cli.common.config()?, args).await,
        Command::Bench(args) => bench::run(args, cli.common.config()).await,
        Command::Rebuild(args) => rebuild::run(&cli.common.config()?, args).await,
        Command::Inspect(what) => inspect::run(&cli.common.config()?, what).await,
        Command::Config => {
            let cfg = cli.common.config()?;
            cfg.validate()?;
            let mut value = toml::Value::try_from(&cfg)?;
            redact_secrets(&mut value);
            print!("{}", toml::to_string(&value)?);
            Ok(())
        }
        Command::Token(args) => {
            let cfg = cli.common.config()?;
            if cfg.auth.uses_public_keys() {
                anyhow::bail!(
                    "this deployment verifies {} tokens with a public key (auth.public_key_file / \
                     auth.jwks_file): they are minted by the issuer that holds the private key; \
                     `ultrasync token` signs HS256 tokens with auth.jwt_secret only",
                    cfg.auth.algorithm
                );
            }
            let max = cfg.auth.max_token_lifetime_secs;
            if max > 0 && args.ttl > max {
                anyhow::bail!(
                    "--ttl {} s is longer than auth.max_token_lifetime_secs ({max} s): the gateway would refuse the token",
                    args.ttl
                );
            }
            let secret = match cfg.auth.secret() {
                Ok(s) => s,
                Err(configured) => {
                    let dir = args
                        .data_dir
                        .clone()
                        .unwrap_or_else(|| cfg.dev.data_dir.clone());
                    dev::read_dev_secret(&dir).with_context(|| {
                        format!(
                            "{configured:#}; and no dev secret in {} (run `ultrasync dev` first). \
                             `ultrasync token` signs HS256 tokens only: with RS256/EdDSA, tokens come \
                             from your issuer",
                            dir.display()
                        )
                    })?
                }
            };
            ultrasync_shared::Id::parse("org", &args.org)?;
            ultrasync_shared::Id::parse("sub", &args.sub)?;
            let projects: Vec<&str> = args.project.iter().map(String::as_str).collect();
            let mut claims = auth::claims(
                &args.sub,
                &args.org,
                &projects,
                &args.scope,
                args.ttl,
                &cfg.auth.audience,
            );
            claims.iss = cfg.auth.issuer.clone();
            claims.ns = args.ns;
            claims.jti = Some(
                args.jti
                    .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
            );
            println!("{}", auth::mint_hs256(&secret, &claims)?);
            Ok(())
        }
    }
}

/// Replaces every secret in a serialized config with `"<redacted>"`: any string
/// under a key that names a secret, password, credential, private key or token
/// (`jwt_secret`, `nats_password`, each webhook's `secret`, and keys added later
/// with such names). Paths to secret files (`*_file`) are kept.
fn redact_secrets(value: &mut toml::Value) {
    fn is_secret_key(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        !k.ends_with("_file")
            && !k.ends_with("_files")
            && (k.contains("secret")
                || k.contains("password")
                || k.contains("passwd")
                || k.contains("credential")
                || k.contains("private_key")
                || k.contains("api_key")
                || k == "token"
                || k.ends_with("_token"))
    }
    fn redact_all(value: &mut toml::Value) {
        match value {
            toml::Value::String(s) => "<redacted>".clone_into(s),
            toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| redact_all(v)),
            toml::Value::Array(items) => items.iter_mut().for_each(redact_all),
            _ => {}
        }
    }
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table.iter_mut() {
                if is_secret_key(key) {
                    redact_all(v);
                } else {
                    redact_secrets(v);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        _ => {}
    }
}

/// How long services get to stop before the process gives up on them.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
