//! `ultrasync dev`: the embedded default. Starts a managed nats-server with its store
//! under `./.ultrasync/`, then the gateway, a sequencer, a materializer (RocksDB
//! under `./.ultrasync/materializer`) and the compactor in this process, prints the
//! URLs and a dev token, and stops everything in order on Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tracing::{error, info};
use ultrasync_shared::auth;
use ultrasync_shared::natsd::{Natsd, NatsdOptions, find_nats_server};

use crate::{CommonArgs, STOP_GRACE, shutdown_on_signals};

/// The file in the data folder that holds the dev HS256 secret.
const DEV_SECRET_FILE: &str = "dev-secret";

#[derive(Args)]
pub struct DevArgs {
    /// Data folder (NATS store, logs, dev secret).
    #[arg(long, env = "ULTRASYNC_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Client port of the managed nats-server (0 = any free port).
    #[arg(long, env = "ULTRASYNC_DEV_NATS_PORT")]
    nats_port: Option<u16>,
    /// Gateway address.
    #[arg(long, env = "ULTRASYNC_LISTEN")]
    listen: Option<SocketAddr>,
    /// nats-server binary [default: .tools/bin/nats-server, then PATH].
    #[arg(long, env = "ULTRASYNC_NATS_SERVER_BIN")]
    nats_server_bin: Option<PathBuf>,
}

/// Reads the secret `ultrasync dev` keeps in its data folder.
pub fn read_dev_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(DEV_SECRET_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().as_bytes().to_vec())
}

/// The dev secret, made up (and kept) on first start so tokens survive restarts.
fn dev_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let s = text.trim().to_owned();
        if s.len() >= auth::MIN_SECRET_LEN {
            return Ok(s);
        }
    }
    let bytes: [u8; 32] = rand::random();
    let secret = hex::encode(bytes);
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret)
}

pub async fn run(common: &CommonArgs, args: DevArgs) -> anyhow::Result<()> {
    let mut cfg = common.config()?;
    if let Some(d) = args.data_dir {
        cfg.dev.data_dir = d;
    }
    if let Some(p) = args.nats_port {
        cfg.dev.nats_port = p;
    }
    if let Some(l) = args.listen {
        cfg.gateway.listen = l;
    }
    let data_dir = cfg.dev.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    if cfg.auth.jwt_secret.is_none() && cfg.auth.jwt_secret_file.is_none() {
        cfg.auth.jwt_secret = Some(dev_secret(&data_dir)?);
    }
    let secret = cfg.auth.secret()?;
    cfg.validate()?;

    // Bind the gateway first: a busy port fails before anything starts.
    let listener = tokio::net::TcpListener::bind(cfg.gateway.listen)
        .await
        .with_context(|| {
            format!(
                "binding the gateway to {} (pass --listen)",
                cfg.gateway.listen
            )
        })?;
    let http_addr = listener.local_addr()?;
    if cfg.dev.nats_port != 0
        && std::net::TcpListener::bind(("127.0.0.1", cfg.dev.nats_port)).is_err()
    {
        anyhow::bail!(
            "port {} is taken (another `ultrasync dev`?); pass --nats-port",
            cfg.dev.nats_port
        );
    }

    let bin = find_nats_server(args.nats_server_bin.as_deref())?;
    info!(bin = %bin.display(), "starting nats-server");
    let mut natsd = Natsd::spawn(&NatsdOptions {
        bin,
        store_dir: data_dir.join("nats"),
        run_dir: data_dir.clone(),
        port: (cfg.dev.nats_port != 0).then_some(cfg.dev.nats_port),
        extra_conf: String::new(),
        ..Default::default()
    })?;
    cfg.nats_url = natsd.url.clone();

    let shutdown = shutdown_on_signals();
    // The materializer's state lives with the rest of the dev data unless configured.
    if cfg.materializer.data_dir == ultrasync_shared::config::MaterializerConfig::default().data_dir
    {
        cfg.materializer.data_dir = data_dir.join("materializer");
    }
    let sequencer = tokio::spawn(ultrasync_sequencer::run(cfg.clone(), shutdown.clone()));
    let materializer = tokio::spawn(ultrasync_materializer::run(cfg.clone(), shutdown.clone()));
    let compactor = tokio::spawn(ultrasync_compactor::run(cfg.clone(), shutdown.clone()));
    let gateway = tokio::spawn(ultrasync_gateway::run(
        cfg.clone(),
        listener,
        shutdown.clone(),
    ));

    let token = auth::mint_hs256(
        &secret,
        &auth::claims(
            "dev-user",
            "dev",
            &["*"],
            "read write admin",
            7 * 86_400,
            &cfg.auth.audience,
        ),
    )?;
    let ws = format!("ws://{http_addr}/v1/sync");
    println!();
    println!("ultrasync dev is running");
    println!("  WebSocket  {ws}");
    println!("  HTTP       http://{http_addr}");
    println!(
        "  NATS       {} (store {})",
        natsd.url,
        data_dir.join("nats").display()
    );
    println!("  dev token  {token}");
    println!("             (org \"dev\", all projects, read write admin, 7 days)");
    println!();
    println!("  try:  websocat -H 'Authorization: Bearer {token}' {ws}");
    println!(
        r#"        {{"type":"hello","protocol":1,"org_id":"dev","project_id":"demo","client_id":"term-1","cursors":{{"index":0}}}}"#
    );
    println!(
        r#"        {{"type":"command","command_id":"c1","namespace":"index","key":"greeting","op_type":"set","payload":"hello"}}"#
    );
    println!();
    println!("Ctrl-C stops everything.");

    // Run until a signal, or until a service fails (then stop the rest).
    let mut sequencer = sequencer;
    let mut gateway = gateway;
    let mut materializer = materializer;
    let mut compactor = compactor;
    let failed = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = &mut sequencer => Some(("sequencer", r)),
        r = &mut materializer => Some(("materializer", r)),
        r = &mut compactor => Some(("compactor", r)),
        r = &mut gateway => Some(("gateway", r)),
    };
    // A service that ends cleanly because the signal already fired is no failure.
    let failed = failed.filter(|(_, r)| !(shutdown.is_cancelled() && matches!(r, Ok(Ok(())))));
    shutdown.cancel();
    let mut result = Ok(());
    if let Some((name, r)) = failed {
        let e = match r {
            Ok(Ok(())) => anyhow::anyhow!("{name} stopped unexpectedly"),
            Ok(Err(e)) => e.context(format!("{name} failed")),
            Err(e) => anyhow::anyhow!("{name} panicked: {e}"),
        };
        error!(error = %format!("{e:#}"), "stopping");
        result = Err(e);
    }
    for (name, task) in [
        ("gateway", gateway),
        ("sequencer", sequencer),
        ("materializer", materializer),
        ("compactor", compactor),
    ] {
        if task.is_finished() {
            continue;
        }
        match tokio::time::timeout(STOP_GRACE, task).await {
            Ok(Ok(Err(e))) => {
                error!(service = name, error = %format!("{e:#}"), "stopped with an error")
            }
            Err(_) => error!(service = name, "did not stop in time"),
            _ => info!(service = name, "stopped"),
        }
    }
    tokio::task::spawn_blocking(move || natsd.terminate(Duration::from_secs(10))).await?;
    info!("nats-server stopped; bye");
    result
}
