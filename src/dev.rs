//! `ultrasync dev`: the embedded default. Starts a managed nats-server with its store
//! under `./.ultrasync/`, then the gateway, a sequencer, a materializer (RocksDB
//! under `./.ultrasync/materializer`) and the compactor in this process, prints the
//! URLs and a dev token, and stops everything in order on Ctrl-C / SIGTERM.
//! `--cluster 3` runs three managed nats-servers as a cluster on loopback instead
//! (stores under `./.ultrasync/nats-{1,2,3}`) with every stream on 3 replicas.
//! `--tls` puts TLS on every connection it starts: the gateway serves `wss://` and
//! `https://`, the managed nats-servers speak TLS on their client (and route) ports,
//! and every service trusts the CA of certificates made on the first start
//! (`pki`, under `./.ultrasync/tls/`).

mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tracing::info;
use ultrasync_shared::auth;
use ultrasync_shared::natsd::{
    ClusterOptions, Natsd, NatsdOptions, TlsFiles, find_nats_server, free_ports,
};

use crate::serve::Services;
use crate::{CommonArgs, shutdown_on_signals};

/// The file in the data folder that holds the dev HS256 secret.
const DEV_SECRET_FILE: &str = "dev-secret";
/// Lifetime of the token `ultrasync dev` prints.
const DEV_TOKEN_TTL_SECS: u64 = 7 * 86_400;

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
    /// Managed nats-servers: 1, or 3 for a cluster on loopback (client ports
    /// --nats-port, +1, +2; streams with 3 replicas).
    #[arg(long, default_value_t = 1)]
    cluster: usize,
    /// Folder of the demo app served at /demo [default: clients/typescript/demo of
    /// this checkout, when it is there].
    #[arg(long, env = "ULTRASYNC_DEMO_DIR")]
    demo_dir: Option<PathBuf>,
    /// TLS everywhere: the gateway serves wss:// and https://, the managed
    /// nats-servers require TLS (clients and routes), every service trusts the CA;
    /// certificates for localhost are made on the first start (DATA_DIR/tls/ca.pem
    /// is the CA to trust).
    #[arg(long, env = "ULTRASYNC_DEV_TLS")]
    tls: bool,
}

/// The demo app's folder: the flag, else `clients/typescript/demo` under the current
/// folder or the source checkout this binary was built from.
fn demo_dir(flag: Option<PathBuf>) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    let rel = Path::new("clients/typescript/demo");
    [
        PathBuf::from("."),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ]
    .into_iter()
    .map(|base| base.join(rel))
    .find(|d| d.join("index.html").is_file())
    .and_then(|d| d.canonicalize().ok())
}

/// Reads the secret `ultrasync dev` keeps in its data folder.
pub fn read_dev_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(DEV_SECRET_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.trim().as_bytes().to_vec())
}

/// The dev secret, made up (and kept) on first start so tokens survive restarts. The
/// file is readable by its owner only: created with mode 0600 (never briefly wider),
/// and an existing one with wider permissions is tightened.
fn dev_secret(data_dir: &Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    let path = data_dir.join(DEV_SECRET_FILE);
    let owner_only = || {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {} to its owner", path.display()))
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        let s = text.trim().to_owned();
        if s.len() >= auth::MIN_SECRET_LEN {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                owner_only()?;
            }
            return Ok(s);
        }
    }
    let bytes: [u8; 32] = rand::random();
    let secret = hex::encode(bytes);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    // `mode` applies to a new file only; a short secret left behind keeps its own.
    owner_only()?;
    file.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
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
    let tls = if args.tls {
        let tls = pki::ensure(&data_dir.join("tls"))?;
        // A certificate configured for the gateway stays; NATS gets the dev one.
        if cfg.gateway.tls_cert_file.is_none() {
            cfg.gateway.tls_cert_file = Some(tls.cert.clone());
            cfg.gateway.tls_key_file = Some(tls.key.clone());
        }
        cfg.nats_tls_ca = Some(tls.ca.clone());
        Some(tls)
    } else {
        None
    };
    // The client port's TLS (clients log in as before; no client certificate).
    let nats_tls_conf = tls.as_ref().map_or(String::new(), |t| {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n}}\n",
            t.cert, t.key
        )
    });
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
    let nodes = args.cluster;
    if !matches!(nodes, 1 | 3) {
        anyhow::bail!("--cluster takes 1 or 3 (nodes), got {nodes}");
    }
    let client_ports: Vec<u16> = if cfg.dev.nats_port == 0 {
        free_ports(nodes)?
    } else {
        (0..nodes as u16).map(|i| cfg.dev.nats_port + i).collect()
    };
    for p in &client_ports {
        if std::net::TcpListener::bind(("127.0.0.1", *p)).is_err() {
            anyhow::bail!("port {p} is taken (another `ultrasync dev`?); pass --nats-port");
        }
    }

    let bin = find_nats_server(args.nats_server_bin.as_deref())?;
    info!(bin = %bin.display(), nodes, "starting nats-server");
    let mut natsds: Vec<Natsd> = Vec::new();
    if nodes == 1 {
        natsds.push(Natsd::spawn(&NatsdOptions {
            bin,
            store_dir: data_dir.join("nats"),
            run_dir: data_dir.clone(),
            port: (cfg.dev.nats_port != 0).then_some(cfg.dev.nats_port),
            extra_conf: nats_tls_conf.clone(),
            ..Default::default()
        })?);
    } else {
        let routes = free_ports(nodes)?;
        // Routes authenticate even on loopback: nothing else may join the cluster.
        let route_password = hex::encode(rand::random::<[u8; 16]>());
        for i in 0..nodes {
            let dir = data_dir.join(format!("nats-{}", i + 1));
            natsds.push(Natsd::spawn(&NatsdOptions {
                bin: bin.clone(),
                store_dir: dir.join("store"),
                run_dir: dir,
                port: Some(client_ports[i]),
                extra_conf: nats_tls_conf.clone(),
                cluster: Some(ClusterOptions {
                    name: "usync-dev".to_owned(),
                    server_name: format!("nats-{}", i + 1),
                    port: routes[i],
                    routes: (0..nodes).filter(|j| *j != i).map(|j| routes[j]).collect(),
                    route_auth: Some(("route".to_owned(), route_password.clone())),
                    // Nodes verify each other against the dev CA.
                    route_tls: tls.as_ref().map(|t| TlsFiles {
                        cert: t.cert.clone(),
                        key: t.key.clone(),
                        ca: t.ca.clone(),
                    }),
                }),
                ..Default::default()
            })?);
        }
        cfg.replicas = 3;
    }
    cfg.nats_url = natsds
        .iter()
        .map(|n| n.url.clone())
        .collect::<Vec<_>>()
        .join(",");
    // Create the layout once here rather than racing four services to it.
    create_layout(&cfg, nodes > 1).await?;

    let shutdown = shutdown_on_signals();
    // The materializer's state lives with the rest of the dev data unless configured.
    if cfg.materializer.data_dir == ultrasync_shared::config::MaterializerConfig::default().data_dir
    {
        cfg.materializer.data_dir = data_dir.join("materializer");
    }
    let demo = demo_dir(args.demo_dir);
    let services = Services::spawn(&cfg, listener, &shutdown, demo.clone());

    // A week, or the configured maximum lifetime when that is shorter.
    let ttl = match cfg.auth.max_token_lifetime_secs {
        0 => DEV_TOKEN_TTL_SECS,
        max => max.min(DEV_TOKEN_TTL_SECS),
    };
    let token = auth::mint_hs256(
        &secret,
        &auth::claims(
            "dev-user",
            "dev",
            &["*"],
            "read write admin",
            ttl,
            &cfg.auth.audience,
        ),
    )?;
    let gateway_tls = cfg.gateway.tls_cert_file.is_some();
    // The gateway presents the dev certificate (not one configured for it).
    let gateway_dev_cert = tls
        .as_ref()
        .is_some_and(|t| cfg.gateway.tls_cert_file.as_ref() == Some(&t.cert));
    let (ws_scheme, http_scheme) = if gateway_tls {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let ws = format!("{ws_scheme}://{http_addr}/v1/sync");
    let http = format!("{http_scheme}://{http_addr}");
    println!();
    println!("ultrasync dev is running");
    println!("  WebSocket  {ws}");
    println!("  HTTP       {http}");
    if let Some(dir) = &demo {
        // The token rides in the fragment: the browser keeps it, no server sees it.
        let built = dir.join("dist/app.js").is_file();
        println!(
            "  Demo       {http}/demo/#token={}{}",
            if cfg.auth.uses_public_keys() {
                "<jwt>"
            } else {
                &token
            },
            if built {
                ""
            } else {
                "  (build it first: npm ci && npm run build in clients/typescript)"
            }
        );
        // An unmodified automerge-repo app on the same token (/v1/automerge/…).
        if dir.join("automerge/index.html").is_file() {
            println!(
                "  Automerge  {http}/demo/automerge/#token={}",
                if cfg.auth.uses_public_keys() {
                    "<jwt>"
                } else {
                    &token
                },
            );
        }
    }
    if nodes == 1 {
        println!(
            "  NATS       {} (store {})",
            cfg.nats_url,
            data_dir.join("nats").display()
        );
    } else {
        println!(
            "  NATS       {} ({nodes}-node cluster, streams on 3 replicas, stores under {}/nats-N)",
            cfg.nats_url,
            data_dir.display()
        );
    }
    if cfg.auth.uses_public_keys() {
        // The gateway verifies RS256/EdDSA: an HS256 dev token would be refused.
        println!(
            "  tokens     {} from your issuer (auth.public_key_file / jwks_file)",
            cfg.auth.algorithm
        );
    } else {
        println!("  dev token  {token}");
        println!(
            "             (org \"dev\", all projects, read write admin, {})",
            if ttl == DEV_TOKEN_TTL_SECS {
                "7 days".to_owned()
            } else {
                format!("{ttl} s")
            }
        );
    }
    if let Some(t) = &tls {
        // What a client trusts to reach the gateway and NATS (the certificates are for
        // localhost, 127.0.0.1 and ::1).
        let ca = t.ca.display();
        println!("  CA         {ca}  (TLS for localhost, 127.0.0.1, ::1)");
        if gateway_dev_cert {
            println!("             curl --cacert {ca} {http}/readyz");
        }
        println!(
            "             ultrasync --nats-url {} --nats-tls-ca {ca} inspect streams",
            cfg.nats_url
        );
    }
    println!();
    let trust = tls
        .as_ref()
        .filter(|_| gateway_dev_cert)
        .map_or(String::new(), |t| {
            format!("SSL_CERT_FILE={} ", t.ca.display())
        });
    println!("  try:  {trust}websocat -H 'Authorization: Bearer {token}' {ws}");
    println!(
        r#"        {{"type":"hello","protocol":1,"org_id":"dev","project_id":"demo","client_id":"term-1","cursors":{{"index":0}}}}"#
    );
    println!(
        r#"        {{"type":"command","command_id":"c1","namespace":"index","key":"greeting","op_type":"set","payload":"hello"}}"#
    );
    println!();
    println!("Ctrl-C stops everything.");

    // Run until a signal, or until a service fails (then stop the rest).
    let result = services.supervise(&shutdown).await;
    tokio::task::spawn_blocking(move || {
        for natsd in &mut natsds {
            natsd.terminate(Duration::from_secs(10));
        }
    })
    .await?;
    info!("nats-server stopped; bye");
    result
}

/// Creates the streams and buckets (what `ultrasync setup` does), on a cluster
/// after waiting (up to 30 s) for its JetStream meta leader to be elected; the
/// streams then wait (up to 30 s more) until every node can hold a replica.
async fn create_layout(
    cfg: &ultrasync_shared::config::Config,
    cluster: bool,
) -> anyhow::Result<()> {
    let client =
        ultrasync_shared::nats::connect(cfg, "ultrasync-dev", Duration::from_secs(30)).await?;
    let js = async_nats::jetstream::new(client);
    if cluster {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = js.query_account().await {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("JetStream did not come up on the cluster: {e}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ultrasync_shared::nats::ensure_layout(&js, cfg.layout()).await
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn the_dev_secret_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(DEV_SECRET_FILE);
        let first = dev_secret(dir.path()).expect("create");
        assert_eq!(mode(&path), 0o600, "created 0600");
        assert_eq!(read_dev_secret(dir.path()).expect("read"), first.as_bytes());

        // An existing secret with wider permissions is kept, and tightened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(dev_secret(dir.path()).expect("reuse"), first);
        assert_eq!(mode(&path), 0o600, "tightened");

        // A too-short one left world-readable is replaced, and 0600 too.
        std::fs::write(&path, "short").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let second = dev_secret(dir.path()).expect("replace");
        assert_ne!(second, first);
        assert!(second.len() >= auth::MIN_SECRET_LEN);
        assert_eq!(mode(&path), 0o600, "replaced 0600");
    }
}
