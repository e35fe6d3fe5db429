//! `ultrasync bench`: drives a stack through real WebSocket connections and writes a
//! JSON report and an SVG chart to a results folder.
//!
//! By default it starts its own stack: a managed nats-server with `sync_interval:
//! always` in a temporary folder, and the gateway, materializer and sequencer(s) each
//! in its own process. This process is only the load generator: it shares the
//! machine's cores with the stack, as the targets assume, but not its CPU
//! accounting. Every measured step reports the CPU µs per acked op of the ultrasync
//! processes and of nats-server separately (and of the load generator), read from
//! /proc. Scenarios:
//!
//! - `jetstream`: raw JetStream publishes (file storage, same server, same
//!   durability) with bounded in-flight acks: the physical limit of this machine.
//! - `throughput`: one org, one client per project (stream key), open loop at rising
//!   total rates until p99 ack latency passes 100 ms or acks fall behind the offer.
//! - `closed`: closed loop like the peers' harnesses: W writers (a stream key each),
//!   each keeping a window of commands in flight, as fast as acks come back.
//! - `latency`: a fixed 1,000 ops/s.
//! - `fanout`: one writer at 100 ops/s, N subscribers; commit-to-receipt latency.
//! - `bootstrap`: a namespace with K keys, then the time a new client takes from
//!   `hello` (null cursor) to `synced`.
//! - `idle`: a gateway in its own process holding N idle sockets (each after
//!   `hello`): its resident memory before and with them.
//! - `tenants`: K stream keys in K orgs (one socket each, tokens minted per org),
//!   each writing at a low rate, the total rate doubling per step (after a warm-up
//!   that writes every key once) until p99 passes 100 ms or acks fall behind;
//!   repeated with 1, 2 and 3 `ultrasync sequencer` processes sharing the
//!   partitions (each count on a fresh stack). Against an existing stack (`--url`)
//!   it runs once, with whatever sequencers that has.
//!
//! Open-loop latencies are measured from the scheduled send time (a slow server
//! cannot hide its queueing) with an HDR histogram (µs, 3 significant digits).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use plotters::coord::types::RangedCoordf64;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::series::DashedLineSeries;
use serde_json::{Value, json};
use ultrasync_client::{Connection, OpType, ServerMessage};
use ultrasync_shared::auth;
use ultrasync_shared::config::Config;
use ultrasync_shared::natsd::{Natsd, NatsdOptions, find_nats_server};

#[derive(Args)]
pub struct BenchArgs {
    /// Scenarios to run (comma separated): jetstream, throughput, closed, latency,
    /// fanout, bootstrap, idle, tenants, or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenario: Vec<String>,
    /// Seconds per measurement step.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Small sizes and short steps (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Fan-out subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Keys written before the bootstrap measurement.
    #[arg(long, default_value_t = 100_000)]
    bootstrap_keys: usize,
    /// Idle sockets held open against a separate gateway process.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Ops written to the bootstrap namespace (spread over its keys).
    #[arg(long, default_value_t = 1_000_000)]
    bootstrap_ops: usize,
    /// Writers (one project, so one stream key, each) of the closed-loop scenario.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Commands each closed-loop writer keeps in flight.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Clients (one project, so one stream key, each) of the throughput scenario.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Offered rates of the throughput scenario (comma separated ops/s).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u64>>,
    /// Stream keys (one org, one socket each) of the tenants scenario.
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    /// Offered total rates of the tenants scenario (comma separated ops/s; default
    /// 1000, 2000, 4000, ... until p99 passes 100 ms or acks fall behind).
    #[arg(long, value_delimiter = ',')]
    tenant_rates: Option<Vec<u64>>,
    /// Sequencer processes of the tenants scenario, one run per count.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    sequencers: Vec<usize>,
    /// Drive an existing stack: its gateway's WebSocket URL (`ws://host:port/v1/sync`).
    /// Tokens are minted from the configured JWT secret (`--jwt-secret`,
    /// `ULTRASYNC_JWT_SECRET`, or the config file); the raw JetStream scenario uses
    /// `--nats-url`. Its per-socket rate limit must allow the offered rates.
    #[arg(long)]
    url: Option<String>,
    /// Run the services of a stack this run starts in one `ultrasync serve` process
    /// (gateway, sequencer, materializer and compactor; the tenants scenario's
    /// further sequencers are processes of their own) instead of a process each.
    #[arg(long, conflicts_with = "url")]
    one_process: bool,
    /// Where the report and chart go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

/// The stack under test: started by this run (nats-server and every service in its
/// own process), or an existing one (`--url`).
struct Stack {
    ws: String,
    secret: String,
    nats_url: String,
    /// nats-server's monitoring endpoint (a stack this run started).
    nats_monitor: Option<String>,
    /// Partitions of `USYNC_CMDS`, when sequencer processes were started.
    partitions: Option<u32>,
    /// The `/metrics` of every sequencer this run started (`http://host:port`).
    sequencer_metrics: Vec<String>,
    own: Option<OwnStack>,
}

struct OwnStack {
    natsd: Natsd,
    dir: tempfile::TempDir,
    /// `ultrasync gateway`, `materializer` and `sequencer` processes (or `serve` and
    /// further sequencers), by role.
    services: Vec<(String, std::process::Child)>,
}

/// What the processes of a stack spent: CPU seconds per role, read from /proc, the
/// messages nats-server took in and sent out (its `/varz`), and the sequencers'
/// durable writes (their `/metrics`), when known.
#[derive(Clone)]
struct CpuSample {
    cpu: Vec<(String, f64)>,
    nats_msgs: Option<(u64, u64)>,
    writes: Option<Writes>,
    at: Instant,
}

/// The sequencers' durable writes so far, summed over the instances.
#[derive(Clone, Copy, Default)]
struct Writes {
    /// Committer rounds (one durable write each, of one or more stream keys).
    rounds: f64,
    /// Seconds the rounds took, from publish to the server's acks.
    round_secs: f64,
    /// One stream key's ops stored together (one log message unless they exceed
    /// its cap).
    key_writes: f64,
    ops: f64,
}

impl Writes {
    /// Adds the counters of one sequencer's `/metrics` text.
    fn add(&mut self, metrics: &str) {
        for line in metrics.lines() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            match name {
                "ultrasync_sequencer_commit_seconds_count" => self.rounds += value,
                "ultrasync_sequencer_commit_seconds_sum" => self.round_secs += value,
                "ultrasync_sequencer_batch_ops_count" => self.key_writes += value,
                "ultrasync_sequencer_ops_written_total" => self.ops += value,
                _ => {}
            }
        }
    }
}

impl Stack {
    /// Starts a managed nats-server (`sync_interval: always`), then a gateway and a
    /// materializer process, then `sequencers` (at least one) `ultrasync sequencer`
    /// processes, and waits until they share the partitions evenly. The load
    /// generator (this process) shares the machine with them but not their CPU
    /// accounting.
    async fn start(sequencers: usize, one_process: bool) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let bin = find_nats_server(None)?;
        // The monitoring endpoint on loopback: messages in and out per acked op.
        let monitor_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let natsd = Natsd::spawn(&NatsdOptions {
            bin,
            store_dir: dir.path().join("nats"),
            run_dir: dir.path().to_path_buf(),
            port: None,
            extra_conf: format!("http: \"127.0.0.1:{monitor_port}\"\n"),
            ..Default::default()
        })?;
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let mut config = Config {
            nats_url: natsd.url.clone(),
            ..Default::default()
        };
        config.gateway.max_messages_per_sec = 1_000_000;
        config.gateway.outbound_queue = 65_536;
        // One org and few actors drive the whole load: the per-tenant budgets are
        // opened up (what is measured is the pipeline, not the limiter).
        config.gateway.max_outbound_bytes = 256 << 20;
        config.gateway.max_commands_per_sec_per_actor = 1_000_000;
        config.gateway.max_requests_per_sec_per_org = 1_000_000;
        config.gateway.max_followed_keys_per_org = 100_000;
        config.gateway.max_followed_keys = 100_000;
        config.gateway.max_sockets_per_actor = 100_000;
        config.gateway.max_sockets_per_org = 100_000;
        config.gateway.max_connections = 100_000;
        config.gateway.max_http_connections = 100_000;
        config.gateway.max_subscriptions_per_socket = 1024;
        config.gateway.org_max_inflight_commands = 1 << 20;
        config.gateway.org_max_inflight_bytes = 1 << 30;
        config.materializer.data_dir = dir.path().join("materializer");
        // Every sequencer serves `/metrics` on a port of its own: the report shows
        // what the durable writes were (`serve`'s from the file, the others' flags).
        let mut sequencer_ports = Vec::new();
        for _ in 0..sequencers.max(1) {
            sequencer_ports.push(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?);
        }
        if one_process {
            config.sequencer.metrics_listen = Some(sequencer_ports[0]);
        }
        config.auth.jwt_secret = Some(secret.clone());
        config.validate()?;
        // The secret goes to the services in their environment, not in the file.
        config.auth.jwt_secret = None;
        let config_path = dir.path().join("ultrasync.toml");
        std::fs::write(
            &config_path,
            toml::to_string(&config).context("writing the stack's config")?,
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut stack = Self {
            ws: format!("ws://127.0.0.1:{port}/v1/sync"),
            secret,
            nats_url: natsd.url.clone(),
            nats_monitor: Some(format!("http://127.0.0.1:{monitor_port}")),
            partitions: None,
            sequencer_metrics: sequencer_ports
                .iter()
                .map(|a| format!("http://{a}"))
                .collect(),
            own: Some(OwnStack {
                natsd,
                dir,
                services: Vec::new(),
            }),
        };
        let listen = format!("127.0.0.1:{port}");
        let started = async {
            // The sequencers that are processes of their own.
            let mut own_sequencers = 0..sequencers.max(1);
            if one_process {
                stack.spawn("serve", &["serve", "--listen", &listen])?;
                own_sequencers.start = 1;
            } else {
                stack.spawn("gateway", &["gateway", "--listen", &listen])?;
                stack.spawn("materializer", &["materializer"])?;
            }
            // The gateway has set up the streams once it answers; the sequencers
            // start on a ready layout.
            stack.wait_ready().await?;
            for i in own_sequencers {
                let metrics = sequencer_ports[i].to_string();
                stack.spawn(
                    &format!("sequencer-{}", i + 1),
                    &["sequencer", "--metrics-listen", &metrics],
                )?;
            }
            stack.wait_partitions_shared(sequencers.max(1)).await
        }
        .await;
        match started {
            Ok(p) => {
                stack.partitions = Some(p);
                Ok(stack)
            }
            Err(e) => {
                let e = anyhow::anyhow!("{e:#}\n{}", stack.service_logs());
                stack.stop().await;
                Err(e)
            }
        }
    }

    /// Starts `ultrasync <args>` as `role`, with the stack's config and secret, its
    /// log in the stack's folder.
    fn spawn(&mut self, role: &str, args: &[&str]) -> anyhow::Result<()> {
        let Some(own) = self.own.as_mut() else {
            return Ok(());
        };
        let log = std::fs::File::create(own.dir.path().join(format!("{role}.log")))?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(args)
            .arg("--config")
            .arg(own.dir.path().join("ultrasync.toml"))
            .env("ULTRASYNC_JWT_SECRET", &self.secret)
            .env("ULTRASYNC_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {role} process"))?;
        own.services.push((role.to_owned(), child));
        Ok(())
    }

    /// The last lines each service process logged (for an error).
    fn service_logs(&self) -> String {
        let Some(own) = &self.own else {
            return String::new();
        };
        let mut out = String::from("service logs:");
        for (role, _) in &own.services {
            let log = std::fs::read_to_string(own.dir.path().join(format!("{role}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(5)..] {
                out.push_str(&format!("\n  [{role}] {l}"));
            }
        }
        out
    }

    /// Fails when a service process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(own) = self.own.as_mut() {
            for (role, c) in &mut own.services {
                if let Some(status) = c.try_wait()? {
                    anyhow::bail!("the {role} process exited ({status})");
                }
            }
        }
        Ok(())
    }

    /// Waits until `n` sequencer instances are alive and hold every partition, none
    /// more than its even share (so no partition moves during the measurement).
    async fn wait_partitions_shared(&mut self, n: usize) -> anyhow::Result<u32> {
        use futures::TryStreamExt as _;
        use ultrasync_shared::nats;
        let js = async_nats::jetstream::new(async_nats::connect(&self.nats_url).await?);
        let cmds = js.get_stream(nats::CMDS_STREAM).await?;
        let partitions = nats::partitions_of(&cmds.cached_info().config)
            .context("USYNC_CMDS has no partitions")?;
        let leases = js.get_key_value(nats::LEASES_BUCKET).await?;
        let share = (partitions as usize).div_ceil(n);
        let mut last = String::new();
        for _ in 0..300 {
            self.check_alive()?;
            let keys: Vec<String> = leases.keys().await?.try_collect().await?;
            let leased = keys.iter().filter(|k| k.starts_with("p.")).count();
            let mut shares = Vec::new();
            for k in keys.iter().filter(|k| k.starts_with("i.")) {
                if let Some(beat) = leases.get(k).await?
                    && let Ok(beat) =
                        serde_json::from_slice::<ultrasync_sequencer::Heartbeat>(&beat)
                {
                    shares.push(beat.partitions.len());
                }
            }
            if leased == partitions as usize
                && shares.len() == n
                && shares.iter().all(|s| (1..=share).contains(s))
                && shares.iter().sum::<usize>() == partitions as usize
            {
                return Ok(partitions);
            }
            last = format!("{leased}/{partitions} partitions leased, shares {shares:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("{n} sequencer processes did not share the partitions: {last}")
    }

    /// An existing stack: its gateway's WebSocket URL, its JWT secret and its NATS.
    async fn attach(ws: String, secret: String, nats_url: String) -> anyhow::Result<Self> {
        let stack = Self {
            ws,
            secret,
            nats_url,
            nats_monitor: None,
            partitions: None,
            sequencer_metrics: Vec::new(),
            own: None,
        };
        stack.wait_ready().await?;
        Ok(stack)
    }

    /// Ready when a socket gets a welcome.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let mut last = String::new();
        for _ in 0..300 {
            match Connection::connect(&self.ws, &self.token("probe")).await {
                Ok(mut c) => match c.hello("bench", "probe", "probe", BTreeMap::new()).await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("the stack at {} did not answer a hello: {last}", self.ws)
    }

    fn token(&self, sub: &str) -> String {
        self.token_in("bench", sub)
    }

    /// A token of org `org`, minted with the stack's secret.
    fn token_in(&self, org: &str, sub: &str) -> String {
        let claims = auth::claims(
            sub,
            org,
            &["*"],
            "read write",
            86_400,
            auth::DEFAULT_AUDIENCE,
        );
        auth::mint_hs256(self.secret.as_bytes(), &claims).unwrap_or_default()
    }

    async fn client(
        &self,
        project: &str,
        client: &str,
        cursors: &[(&str, Option<u64>)],
    ) -> anyhow::Result<Connection> {
        let mut c = Connection::connect(&self.ws, &self.token(client)).await?;
        let cursors = cursors.iter().map(|(n, s)| ((*n).to_owned(), *s)).collect();
        c.hello("bench", project, client, cursors).await?;
        Ok(c)
    }

    async fn stop(self) {
        let Some(mut own) = self.own else { return };
        // Sequencers first (they hand their partitions back), then the rest.
        own.services
            .sort_by_key(|(role, _)| !role.starts_with("sequencer"));
        for (_, c) in &own.services {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for (_, mut c) in own.services.drain(..) {
            let waited = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            });
            let _ = waited.await;
        }
        let mut natsd = own.natsd;
        let _ = tokio::task::spawn_blocking(move || natsd.terminate(Duration::from_secs(10))).await;
    }

    /// The processes measured, by name: the stack's services, its nats-server and the
    /// load generator (this process); or (`--url`) every `ultrasync` and
    /// `nats-server` process on this machine but this one, and this one.
    fn processes(&self) -> Vec<(String, u32)> {
        let me = std::process::id();
        match &self.own {
            Some(own) => {
                let mut found: Vec<(String, u32)> = own
                    .services
                    .iter()
                    .map(|(role, c)| (format!("ultrasync {role}"), c.id()))
                    .collect();
                found.push(("nats-server".to_owned(), own.natsd.pid()));
                found.push((LOAD_GENERATOR.to_owned(), me));
                found
            }
            None => {
                let mut found = Vec::new();
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Some(pid) = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let comm =
                        std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                    let comm = comm.trim();
                    if pid != me && (comm.starts_with("ultrasync") || comm == "nats-server") {
                        let args = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                        let role = args
                            .split(|b| *b == 0)
                            .nth(1)
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .unwrap_or_default();
                        found.push((format!("{comm} {role} (pid {pid})").trim().to_owned(), pid));
                    }
                }
                found.push((LOAD_GENERATOR.to_owned(), me));
                found
            }
        }
    }

    /// CPU seconds spent so far by each measured process, and nats-server's message
    /// counters.
    async fn cpu(&self) -> CpuSample {
        let mut msgs = None;
        if let Some(base) = &self.nats_monitor
            && let Ok(r) = ultrasync_client::http::request(
                "GET",
                base,
                "/varz",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            && let Ok(v) = serde_json::from_str::<Value>(&r.body)
        {
            msgs = v["in_msgs"].as_u64().zip(v["out_msgs"].as_u64());
        }
        let mut writes = (!self.sequencer_metrics.is_empty()).then(Writes::default);
        for base in &self.sequencer_metrics {
            match ultrasync_client::http::request(
                "GET",
                base,
                "/metrics",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            {
                Ok(r) if r.status == 200 => {
                    if let Some(w) = writes.as_mut() {
                        w.add(&r.body);
                    }
                }
                // One sequencer unheard: no figures rather than wrong ones.
                _ => writes = None,
            }
        }
        CpuSample {
            cpu: self
                .processes()
                .into_iter()
                .filter_map(|(name, pid)| Some((name, process_usage(pid)?.0)))
                .collect(),
            nats_msgs: msgs,
            writes,
            at: Instant::now(),
        }
    }
}

/// The name the load generator's own process is reported under.
const LOAD_GENERATOR: &str = "load generator (this process)";

impl CpuSample {
    /// The sequencers' durable writes between `self` and `later`: how many ops
    /// each stream key's write carried and how the committer's rounds went, which
    /// with nats-server fsyncing every message decide the rate.
    fn writes_until(&self, later: &CpuSample, acked: u64) -> Value {
        let (Some(a), Some(b)) = (self.writes, later.writes) else {
            return Value::Null;
        };
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let rounds = b.rounds - a.rounds;
        let key_writes = b.key_writes - a.key_writes;
        let ops = b.ops - a.ops;
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
        json!({
            "key_writes_per_sec": key_writes / secs,
            "key_writes_per_acked_op": ratio(key_writes, acked as f64),
            "ops_per_key_write": ratio(ops, key_writes),
            "rounds_per_sec": rounds / secs,
            "keys_per_round": ratio(key_writes, rounds),
            "ms_per_round": ratio(b.round_secs - a.round_secs, rounds) * 1e3,
            "committer_busy_share": (b.round_secs - a.round_secs) / secs,
        })
    }

    /// CPU µs per acked op spent between `self` and `later`, summed by group: the
    /// ultrasync processes, nats-server, and the load generator.
    fn per_op(&self, later: &CpuSample, acked: u64) -> Value {
        let mut groups: BTreeMap<&str, f64> = BTreeMap::new();
        let mut processes: BTreeMap<&str, f64> = BTreeMap::new();
        for (name, after) in &later.cpu {
            let before = self
                .cpu
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, c)| *c);
            let group = if name == LOAD_GENERATOR {
                "load_generator"
            } else if name.starts_with("nats-server") {
                "nats_server"
            } else {
                "ultrasync"
            };
            *groups.entry(group).or_default() += after - before;
            *processes.entry(name).or_default() += after - before;
        }
        let per_op = |secs: f64| secs * 1e6 / acked.max(1) as f64;
        let server = groups.get("ultrasync").copied().unwrap_or(0.0)
            + groups.get("nats_server").copied().unwrap_or(0.0);
        let msgs = match (self.nats_msgs, later.nats_msgs) {
            (Some((i0, o0)), Some((i1, o1))) => json!({
                "in": i1.saturating_sub(i0) as f64 / acked.max(1) as f64,
                "out": o1.saturating_sub(o0) as f64 / acked.max(1) as f64,
            }),
            _ => Value::Null,
        };
        json!({
            "nats_msgs_per_op": msgs,
            "durable_writes": self.writes_until(later, acked),
            "cpu_secs": groups,
            "cpu_secs_by_process": processes,
            "cpu_us_per_op": {
                "ultrasync": per_op(groups.get("ultrasync").copied().unwrap_or(0.0)),
                "nats_server": per_op(groups.get("nats_server").copied().unwrap_or(0.0)),
                "server_total": per_op(server),
                "load_generator": per_op(groups.get("load_generator").copied().unwrap_or(0.0)),
            },
        })
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn summary(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "max_ms": ms(h.max()),
    })
}

/// How often a step whose bar is hidden (stderr is not a terminal) prints where it is.
const PLAIN_EVERY: Duration = Duration::from_secs(30);

/// The progress of one step: a bar on stderr while it runs (indicatif draws it only
/// when stderr is a terminal) and one plain line when it ends, so a log or a CI run
/// shows every step too. Without a terminal, a step that runs long also prints a
/// plain line every [`PLAIN_EVERY`].
struct Step {
    bar: ProgressBar,
    label: String,
    begun: Instant,
    /// A timed step's planned length (the bar runs on time, not items).
    planned: Option<Duration>,
    /// When the last plain line went out.
    last_line: Instant,
}

impl Step {
    /// A step measured in time: its bar fills over `total`.
    fn timed(label: &str, total: Duration) -> Self {
        let style = Self::style("{prefix:<24} [{bar:20}] {secs} {wide_msg}").with_key(
            "secs",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:>5.1}s", s.pos() as f64 / 1000.0);
            },
        );
        let mut step = Self::new(label, total.as_millis() as u64, style);
        step.planned = Some(total);
        step
    }

    /// A step counted in items (sockets opened, ops written).
    fn items(label: &str, total: usize) -> Self {
        let style = Self::style("{prefix:<24} [{bar:20}] {pos}/{len} {wide_msg}");
        Self::new(label, total as u64, style)
    }

    fn style(template: &str) -> ProgressStyle {
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#> ")
    }

    fn new(label: &str, len: u64, style: ProgressStyle) -> Self {
        let bar = ProgressBar::new(len)
            .with_style(style)
            .with_prefix(label.to_owned());
        let now = Instant::now();
        Self {
            bar,
            label: label.to_owned(),
            begun: now,
            planned: None,
            last_line: now,
        }
    }

    /// A timed step: the time since it began, and what it has measured so far.
    fn tick(&mut self, msg: String) {
        let done = self.begun.elapsed().min(self.planned.unwrap_or_default());
        self.advance(done.as_millis() as u64, msg);
    }

    /// `done`: items (or, for a timed step, milliseconds) so far.
    fn advance(&mut self, done: u64, msg: String) {
        self.bar.set_position(done);
        if self.bar.is_hidden() && self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            let shown = match self.planned {
                Some(_) => String::new(),
                None => format!("{done}/{} ", self.bar.length().unwrap_or(0)),
            };
            eprintln!(
                "{}: {shown}{msg} ({:.0}s so far)",
                self.label,
                self.begun.elapsed().as_secs_f64()
            );
        }
        self.bar.set_message(msg);
    }

    /// Clears the bar and prints one line: the label, `summary` and the time taken.
    fn finish(self, summary: &str) {
        self.bar.finish_and_clear();
        eprintln!(
            "{}: {summary} ({:.1}s)",
            self.label,
            self.begun.elapsed().as_secs_f64()
        );
    }
}

/// "p50 1.2 ms, p99 8.5 ms" of a latency histogram (µs).
fn percentiles(h: &Histogram<u64>) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!("p50 {:.1} ms, p99 {:.1} ms", ms(0.5), ms(0.99))
}

/// (user+system CPU seconds, peak RSS bytes) of a process, from /proc.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = (fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?;
    Some((cpu, hwm * 1024))
}

/// Open-loop writers: `clients` sockets (one project each), `rate` ops/s in all, for
/// `duration`; the sockets are closed after the step.
async fn open_loop(
    stack: &Stack,
    clients: usize,
    rate: u64,
    duration: Duration,
    label: &str,
) -> anyhow::Result<Driven> {
    // Client ids differ from run to run: a step repeated at the same rate sends new
    // commands, not retries of the earlier step's.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        conns.push(
            stack
                .client(&format!("p{i}"), &format!("w{i}-{rate}-{run}"), &[])
                .await?,
        );
    }
    Ok(drive(conns, rate, duration, label, "c", false).await)
}

/// Closed-loop writers, shaped like the peers' harnesses: `writers` sockets (one
/// project, so one stream key, each), each keeping `window` commands in flight and
/// sending the next one as soon as an ack comes back, for `duration`. Latency runs
/// from each command's send.
async fn closed_loop(
    stack: &Stack,
    writers: usize,
    window: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let mut conns = Vec::with_capacity(writers);
    for i in 0..writers {
        conns.push(
            stack
                .client(&format!("c{i}"), &format!("cw{i}"), &[])
                .await?,
        );
    }
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let window = window.max(1);
    let cpu_before = stack.cpu().await;
    let begun = Instant::now();
    let deadline = begun + duration;
    let mut tasks = Vec::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        let acked = acked.clone();
        let latency = latency.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(window);
            let mut local = histogram();
            let mut next = 0u64;
            loop {
                let sending = Instant::now() < deadline;
                while sending && sent_at.len() < window {
                    let id = format!("w{w}-{next}");
                    conn.command(
                        &id,
                        "index",
                        &format!("k{}", next % 1000),
                        OpType::Set,
                        json!({"n": next}),
                    )
                    .await?;
                    sent_at.insert(id, Instant::now());
                    next += 1;
                }
                if sent_at.is_empty() {
                    break;
                }
                match conn.recv_timeout(Duration::from_secs(10)).await? {
                    ServerMessage::Ack { command_id, .. } => {
                        if let Some(t) = sent_at.remove(&command_id) {
                            let _ = local.record((t.elapsed().as_micros() as u64).max(1));
                            acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    ServerMessage::Reject { command_id, .. } => {
                        sent_at.remove(&command_id);
                    }
                    _ => {}
                }
            }
            latency
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .add(&local)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    let label = format!("closed loop {writers}x{window}");
    let mut step = Step::timed(&label, duration);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        step.tick(format!(
            "{} acked",
            acked.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = begun.elapsed();
    let cpu = cpu_before.per_op(
        &stack.cpu().await,
        acked.load(std::sync::atomic::Ordering::Relaxed),
    );
    let acked = acked.load(std::sync::atomic::Ordering::Relaxed);
    let latency = latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let rate = acked as f64 / elapsed.as_secs_f64();
    let writes = &cpu["durable_writes"];
    step.finish(&format!(
        "{acked} acked ({rate:.0}/s), {}, server CPU {:.0} µs/op{}",
        percentiles(&latency),
        cpu["cpu_us_per_op"]["server_total"].as_f64().unwrap_or(0.0),
        match writes["ops_per_key_write"].as_f64() {
            Some(ops) => format!(
                ", {ops:.1} ops per durable write of a key, {:.1} keys per {:.1} ms round",
                writes["keys_per_round"].as_f64().unwrap_or(0.0),
                writes["ms_per_round"].as_f64().unwrap_or(0.0)
            ),
            None => String::new(),
        }
    ));
    Ok(json!({
        "writers": writers,
        "window": window,
        "acked": acked,
        "acked_ops_per_sec": rate,
        "latency": summary(&latency),
        "cpu": cpu,
    }))
}

/// What one open-loop step measured; the sockets come back for the next step.
struct Driven {
    acked: u64,
    latency: Histogram<u64>,
    /// How late the load generator sent each command after its scheduled time (µs).
    send_lag: Histogram<u64>,
    elapsed: Duration,
    conns: Vec<Connection>,
}

/// One socket's schedule: its first send time, the interval, how many sends, and
/// where to say "send command n, due at this time, now".
type Schedule = (
    Instant,
    Duration,
    u64,
    tokio::sync::mpsc::UnboundedSender<(u64, Instant)>,
);

/// Tells every socket's task when its next command is due, from a thread of its own
/// that sleeps with the OS timer. tokio's timer has a resolution of 1 ms and rounds
/// up: paced by it, a command went out up to a millisecond after its scheduled time,
/// and the latency (measured from that time) counted the delay as the server's.
fn pace(schedules: Vec<Schedule>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    std::thread::spawn(move || {
        let mut due: BinaryHeap<Reverse<(Instant, usize, u64)>> = schedules
            .iter()
            .enumerate()
            .filter(|(_, s)| s.2 > 0)
            .map(|(i, s)| Reverse((s.0, i, 0)))
            .collect();
        while let Some(Reverse((at, i, n))) = due.pop() {
            let wait = at.saturating_duration_since(Instant::now());
            if wait > Duration::from_micros(20) {
                std::thread::sleep(wait);
            }
            let (first, interval, total, tx) = &schedules[i];
            if tx.send((n, at)).is_err() {
                continue;
            }
            if n + 1 < *total {
                due.push(Reverse((
                    *first + interval.mul_f64((n + 1) as f64),
                    i,
                    n + 1,
                )));
            }
        }
    });
}

/// Drives `conns` (each after `hello`) open loop: `rate` ops/s in all, shared
/// evenly, for `duration`; each socket writes `index` keys of its own project.
/// Command ids start with `tag` (unique per step: a reused id would be answered
/// from its op id). `spread`: the sockets' send times are staggered over one
/// interval instead of all falling on the same instants (many slow writers).
/// Latency runs from the scheduled send time, so a slow server cannot hide its
/// queueing; `send_lag` says how late the load generator itself was.
async fn drive(
    conns: Vec<Connection>,
    rate: u64,
    duration: Duration,
    label: &str,
    tag: &str,
    spread: bool,
) -> Driven {
    let sockets = conns.len();
    let clients = sockets.max(1);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // One histogram for every socket (a lock held for one record per ack), so the
    // progress line can show the p99 so far.
    let latency = Arc::new(Mutex::new(histogram()));
    let send_lag = Arc::new(Mutex::new(histogram()));
    let start = Instant::now() + Duration::from_millis(200);
    let per_client = rate as f64 / clients as f64;
    let total = (per_client * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / per_client.max(0.001));
    let mut tasks = Vec::new();
    let mut schedules = Vec::with_capacity(sockets);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let acked = acked.clone();
        let latency = latency.clone();
        let send_lag = send_lag.clone();
        let tag = tag.to_owned();
        let phase = if spread {
            i as f64 / clients as f64
        } else {
            0.0
        };
        let (go, mut go_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        schedules.push((start + interval.mul_f64(phase), interval, total, go));
        tasks.push(tokio::spawn(async move {
            let mut sent_at: HashMap<String, Instant> = HashMap::new();
            let mut lag = histogram();
            let mut pacing = true;
            let deadline = start + duration + Duration::from_secs(10);
            while (pacing || !sent_at.is_empty()) && Instant::now() < deadline {
                tokio::select! {
                    biased;
                    go = go_rx.recv(), if pacing => {
                        // Send what is due (open loop).
                        let Some((next, due)) = go else {
                            pacing = false;
                            continue;
                        };
                        let _ = lag.record((due.elapsed().as_micros() as u64).max(1));
                        let id = format!("{tag}{next}");
                        if conn
                            .command(
                                &id,
                                "index",
                                &format!("k{}", next % 1000),
                                OpType::Set,
                                json!({"n": next}),
                            )
                            .await
                            .is_err()
                        {
                            return None;
                        }
                        sent_at.insert(id, due);
                    }
                    got = conn.recv() => match got {
                        Ok(ServerMessage::Ack { command_id, .. }) => {
                            if let Some(t) = sent_at.remove(&command_id) {
                                let us = t.elapsed().as_micros() as u64;
                                let _ = latency
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .record(us.max(1));
                                acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Ok(ServerMessage::Reject { command_id, .. }) => {
                            sent_at.remove(&command_id);
                        }
                        Ok(_) => {}
                        Err(_) => return None,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            let _ = send_lag.lock().unwrap_or_else(|p| p.into_inner()).add(&lag);
            Some(conn)
        }));
    }
    pace(schedules);
    let total = duration + Duration::from_millis(200);
    let ticker = {
        let acked = acked.clone();
        let latency = latency.clone();
        let mut step = Step::timed(label, total);
        tokio::spawn(async move {
            loop {
                let n = acked.load(std::sync::atomic::Ordering::Relaxed);
                let p99 = latency
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .value_at_quantile(0.99) as f64
                    / 1000.0;
                step.tick(if n == 0 {
                    "0 acked".to_owned()
                } else {
                    format!("{n} acked, p99 {p99:.1} ms")
                });
                if step.begun.elapsed() >= total {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            step
        })
    };
    let mut back = Vec::new();
    for t in tasks {
        if let Ok(conn) = t.await {
            back.extend(conn);
        }
    }
    let elapsed = start
        .elapsed()
        .min(duration + Duration::from_secs(10))
        .max(duration);
    let acked = acked.load(std::sync::atomic::Ordering::Relaxed);
    let latency = latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let send_lag = send_lag.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Ok(step) = ticker.await {
        step.finish(&format!(
            "{acked} acked ({:.0}/s), {}{}",
            acked as f64 / elapsed.as_secs_f64(),
            percentiles(&latency),
            match sockets - back.len() {
                0 => String::new(),
                lost => format!(", {lost} socket(s) closed"),
            }
        ));
    }
    Driven {
        acked,
        latency,
        send_lag,
        elapsed,
        conns: back,
    }
}

async fn jetstream(natsd_url: &str, duration: Duration) -> anyhow::Result<Value> {
    use async_nats::jetstream;
    let client = async_nats::connect(natsd_url).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream("USYNC_BENCH").await;
    js.create_stream(jetstream::stream::Config {
        name: "USYNC_BENCH".into(),
        subjects: vec!["usync.bench.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 200]);
    let mut h = histogram();
    let in_flight = 256;
    let mut pending = std::collections::VecDeque::new();
    let mut step = Step::timed("jetstream raw publish", duration);
    let begun = Instant::now();
    let mut ticked = begun;
    let mut acked = 0u64;
    while begun.elapsed() < duration {
        while pending.len() < in_flight {
            let t = Instant::now();
            let ack = js.publish("usync.bench.x", payload.clone()).await?;
            pending.push_back((t, ack));
        }
        if let Some((t, ack)) = pending.pop_front() {
            ack.await?;
            let _ = h.record((t.elapsed().as_micros() as u64).max(1));
            acked += 1;
        }
        if ticked.elapsed() >= Duration::from_millis(200) {
            ticked = Instant::now();
            step.tick(format!(
                "{acked} acked, p99 {:.1} ms",
                h.value_at_quantile(0.99) as f64 / 1000.0
            ));
        }
    }
    while let Some((t, ack)) = pending.pop_front() {
        ack.await?;
        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
        acked += 1;
    }
    let elapsed = begun.elapsed();
    step.finish(&format!(
        "{acked} acked ({:.0}/s, {in_flight} in flight), {}",
        acked as f64 / elapsed.as_secs_f64(),
        percentiles(&h)
    ));
    let _ = js.delete_stream("USYNC_BENCH").await;
    Ok(json!({
        "acked": acked,
        "ops_per_sec": acked as f64 / elapsed.as_secs_f64(),
        "in_flight": in_flight,
        "payload_bytes": 200,
        "latency": summary(&h),
    }))
}

async fn fanout(stack: &Stack, subscribers: usize, duration: Duration) -> anyhow::Result<Value> {
    let merged = Arc::new(Mutex::new(histogram()));
    let mut tasks = Vec::new();
    let epoch = Instant::now();
    let expected = (100.0 * duration.as_secs_f64()) as u64;
    let mut connecting = Step::items("fanout: connecting", subscribers);
    for i in 0..subscribers {
        let mut conn = stack
            .client("fan", &format!("s{i}"), &[("index", Some(0))])
            .await?;
        let merged = merged.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            let mut seen = 0;
            while seen < expected {
                match tokio::time::timeout(Duration::from_secs(30), conn.recv()).await {
                    Ok(Ok(ServerMessage::Ops { ops, .. })) => {
                        for op in ops {
                            seen += 1;
                            if let Some(sent) = op.payload["t_us"].as_u64() {
                                let now = epoch.elapsed().as_micros() as u64;
                                let _ = local.record(now.saturating_sub(sent).max(1));
                            }
                        }
                    }
                    Ok(Ok(_)) => {}
                    _ => break,
                }
            }
            let _ = merged.lock().unwrap_or_else(|p| p.into_inner()).add(&local);
        }));
        if (i + 1).is_multiple_of(100) {
            connecting.advance(i as u64 + 1, String::new());
        }
    }
    connecting.finish(&format!("{subscribers} subscribers"));
    let mut writer = stack.client("fan", "fan-writer", &[]).await?;
    let cpu_before = stack.cpu().await;
    let mut step = Step::timed("fanout 100 ops/s", duration);
    let begun = Instant::now();
    for n in 0..expected {
        let due = begun + Duration::from_millis(10 * n);
        tokio::time::sleep_until(due.into()).await;
        let t = epoch.elapsed().as_micros() as u64;
        writer
            .command(
                &format!("f{n}"),
                "index",
                "ticker",
                OpType::Set,
                json!({"t_us": t}),
            )
            .await?;
        if n.is_multiple_of(20) {
            step.tick(format!("{n}/{expected} ops sent"));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    // CPU per op written, each delivered to every subscriber.
    let cpu = cpu_before.per_op(&stack.cpu().await, expected);
    let h = merged.lock().unwrap_or_else(|p| p.into_inner()).clone();
    step.finish(&format!(
        "{expected} ops to {subscribers} subscribers, {} receipts, commit to receipt {}",
        h.len(),
        percentiles(&h)
    ));
    Ok(json!({
        "subscribers": subscribers,
        "ops": expected,
        "rate": 100,
        "latency": summary(&h),
        "cpu": cpu,
    }))
}

/// Writers of the bootstrap namespace, each with this many commands in flight.
const BOOT_WRITERS: usize = 8;
const BOOT_IN_FLIGHT: usize = 1000;

async fn bootstrap(stack: &Stack, keys: usize, ops: usize) -> anyhow::Result<Value> {
    let begun = Instant::now();
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..BOOT_WRITERS {
        let mut conn = stack
            .client("boot", &format!("boot-writer-{w}"), &[])
            .await?;
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            // Op n sets key n % keys: every key is written ops / keys times.
            let mine: Vec<usize> = (w..ops).step_by(BOOT_WRITERS).collect();
            let mut sent = 0usize;
            let mut done = 0usize;
            while done < mine.len() {
                while sent < mine.len() && sent - done < BOOT_IN_FLIGHT {
                    let n = mine[sent];
                    conn.command(
                        &format!("b{n}"),
                        "index",
                        &format!("key-{}", n % keys),
                        OpType::Set,
                        json!({"n": n, "pad": "0123456789abcdef"}),
                    )
                    .await?;
                    sent += 1;
                }
                match conn.recv_timeout(Duration::from_secs(60)).await? {
                    ServerMessage::Ack { .. } => {
                        done += 1;
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    ServerMessage::Reject {
                        command_id, code, ..
                    } => {
                        anyhow::bail!("bootstrap write {command_id} refused: {code:?}")
                    }
                    _ => {}
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let ticker = {
        let acked = acked.clone();
        let mut step = Step::items("bootstrap: writing ops", ops);
        tokio::spawn(async move {
            loop {
                let n = acked.load(std::sync::atomic::Ordering::Relaxed);
                let rate = n as f64 / begun.elapsed().as_secs_f64().max(0.001);
                step.advance(n as u64, format!("{rate:.0} ops/s acked"));
                if n >= ops {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            step
        })
    };
    let written = async {
        for w in writers {
            w.await.context("a bootstrap writer stopped")??;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if written.is_err() {
        ticker.abort();
    }
    written?;
    let write_secs = begun.elapsed().as_secs_f64();
    if let Ok(step) = ticker.await {
        step.finish(&format!(
            "{ops} ops on {keys} keys ({:.0} ops/s)",
            ops as f64 / write_secs
        ));
    }
    // A new client with no cursor: snapshot (when one is stored) + tail, then synced.
    let started = Instant::now();
    let mut c = stack
        .client("boot", "boot-reader", &[("index", None)])
        .await?;
    let mut frames = 0;
    let mut snapshot_keys = 0;
    let mut tail_ops = 0;
    loop {
        match c.recv_timeout(Duration::from_secs(120)).await? {
            ServerMessage::Snapshot { state, .. } => {
                frames += 1;
                snapshot_keys += state.len();
            }
            ServerMessage::Ops { ops: o, .. } => tail_ops += o.len(),
            ServerMessage::Synced { .. } => break,
            _ => {}
        }
    }
    Ok(json!({
        "keys": keys,
        "ops": ops,
        "write_secs": write_secs,
        "write_ops_per_sec": ops as f64 / write_secs,
        "bootstrap_ms": started.elapsed().as_secs_f64() * 1000.0,
        "snapshot_frames": frames,
        "snapshot_keys": snapshot_keys,
        "tail_ops": tail_ops,
    }))
}

/// Resident set (VmRSS, VmHWM) of a process, in bytes.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((kib("VmRSS:")? * 1024, kib("VmHWM:")? * 1024))
}

async fn idle(stack: &Stack, connections: usize) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("ultrasync.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nmax_connections = {n}\nmax_http_connections = {n}\nmax_sockets_per_actor = {n}\nmax_sockets_per_org = {n}\nhello_timeout_secs = 60\n",
            n = connections + 100
        ),
    )?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--nats-url",
            &stack.nats_url,
        ])
        .arg("--config")
        .arg(&config)
        .env("ULTRASYNC_JWT_SECRET", &stack.secret)
        .env("ULTRASYNC_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting a gateway process")?;
    let ws = format!("ws://127.0.0.1:{port}/v1/sync");
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(r) = ultrasync_client::http::request(
            "GET",
            &base,
            "/readyz",
            &[],
            None,
            Duration::from_secs(2),
        )
        .await
            && r.status == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !ready {
        let _ = child.kill();
        anyhow::bail!("the gateway process did not come up");
    }
    let before = rss(child.id()).map_or(0, |r| r.0);
    let token = stack.token("idle");
    let mut held = Vec::with_capacity(connections);
    let mut step = Step::items("idle: opening sockets", connections);
    let begun = Instant::now();
    while held.len() < connections {
        let batch = (connections - held.len()).min(200);
        let opened = futures::future::join_all((0..batch).map(|i| {
            let ws = ws.clone();
            let token = token.clone();
            let n = held.len() + i;
            async move {
                let mut c = Connection::connect(&ws, &token).await?;
                c.hello("bench", "idle", &format!("idle-{n}"), BTreeMap::new())
                    .await?;
                Ok::<_, ultrasync_client::ClientError>(c)
            }
        }))
        .await;
        for c in opened {
            held.push(c?);
        }
        step.advance(
            held.len() as u64,
            format!(
                "gateway at {:.0} MiB",
                rss(child.id()).map_or(0.0, |r| r.0 as f64 / 1048576.0)
            ),
        );
    }
    let open_secs = begun.elapsed().as_secs_f64();
    step.finish(&format!("{connections} sockets open"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (with, peak) = rss(child.id()).unwrap_or((0, 0));
    drop(held);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    let mib = |b: u64| b as f64 / 1048576.0;
    Ok(json!({
        "connections": connections,
        "open_secs": open_secs,
        "gateway_rss_mib_before": mib(before),
        "gateway_rss_mib_with_connections": mib(with),
        "gateway_peak_rss_mib": mib(peak),
        "kib_per_connection": (with.saturating_sub(before)) as f64 / 1024.0 / connections.max(1) as f64,
    }))
}

/// Opens `keys` sockets, socket `n` in org `t{n}` (its own token) and project `p`:
/// one stream key per org.
async fn tenant_sockets(stack: &Stack, keys: usize) -> anyhow::Result<Vec<Connection>> {
    let mut conns = Vec::with_capacity(keys);
    let mut step = Step::items("tenants: opening sockets", keys);
    while conns.len() < keys {
        let batch = (keys - conns.len()).min(100);
        let opened = futures::future::join_all((0..batch).map(|i| {
            let n = conns.len() + i;
            let ws = stack.ws.clone();
            let (org, client) = (format!("t{n}"), format!("tenant-{n}"));
            let token = stack.token_in(&org, &client);
            async move {
                let mut c = Connection::connect(&ws, &token).await?;
                c.hello(&org, "p", &client, BTreeMap::new()).await?;
                Ok::<_, ultrasync_client::ClientError>(c)
            }
        }))
        .await;
        for c in opened {
            conns.push(c?);
        }
        step.advance(conns.len() as u64, String::new());
    }
    step.finish(&format!("{keys} sockets, one org each"));
    Ok(conns)
}

/// The best acked rate among `steps` whose p99 stayed within 100 ms.
fn best_under_100ms(steps: &[Value]) -> f64 {
    steps
        .iter()
        .filter(|s| s["latency"]["p99_ms"].as_f64().is_some_and(|p| p <= 100.0))
        .filter_map(|s| s["acked_ops_per_sec"].as_f64())
        .fold(0.0_f64, f64::max)
}

/// One run of the tenants scenario on `stack`: `keys` sockets, one org each, at the
/// total `rates` in turn until p99 passes 100 ms or acks fall behind.
async fn tenant_steps(
    stack: &Stack,
    keys: usize,
    rates: &[u64],
    step: Duration,
    label: &str,
) -> anyhow::Result<Vec<Value>> {
    let mut conns = tenant_sockets(stack, keys).await?;
    // Every stream key written before measuring: a key's first command starts its
    // worker, which loads the key (snapshot, log); live tenants have warm workers.
    let first = rates.first().copied().unwrap_or(1000);
    let warm = drive(
        conns,
        first.max(keys as u64),
        Duration::from_secs(1).max(step / 2),
        &format!("{label} warm-up"),
        "warm-",
        true,
    )
    .await;
    conns = warm.conns;
    let mut steps = Vec::new();
    for &rate in rates {
        let run = drive(
            conns,
            rate,
            step,
            &format!("{label} {rate}/s"),
            &format!("r{rate}-"),
            true,
        )
        .await;
        conns = run.conns;
        let achieved = run.acked as f64 / run.elapsed.as_secs_f64();
        let p99 = run.latency.value_at_quantile(0.99) as f64 / 1000.0;
        let lost = keys - conns.len();
        steps.push(json!({
            "offered_ops_per_sec": rate,
            "acked_ops_per_sec": achieved,
            "acked": run.acked,
            "latency": summary(&run.latency),
            "send_lag": summary(&run.send_lag),
            "sockets_closed": lost,
        }));
        if p99 > 100.0 || achieved < rate as f64 * 0.9 || lost > 0 {
            break;
        }
    }
    Ok(steps)
}

/// CPU spent since `before` and peak RSS, per measured process.
fn usage_since(measured: &[(String, u32)], before: &[Option<(f64, u64)>]) -> Value {
    let mut processes = serde_json::Map::new();
    for ((name, pid), before) in measured.iter().zip(before) {
        if let Some((cpu, rss)) = process_usage(*pid) {
            let spent = cpu - before.map_or(0.0, |b| b.0);
            processes.insert(
                name.clone(),
                json!({"cpu_secs": spent, "peak_rss_mib": rss as f64 / 1048576.0}),
            );
        }
    }
    Value::Object(processes)
}

/// The tenants scenario: a fresh stack per sequencer count (or once on `existing`).
async fn tenants(
    args: &BenchArgs,
    existing: Option<&Stack>,
    step: Duration,
) -> anyhow::Result<Value> {
    let keys = if args.quick {
        args.tenants.min(50)
    } else {
        args.tenants
    }
    .max(1);
    let rates: Vec<u64> = match (&args.tenant_rates, args.quick) {
        (Some(r), _) => r.clone(),
        (None, true) => vec![200, 400],
        (None, false) => (0..8).map(|i| 1000 << i).collect(),
    };
    let mut runs = Vec::new();
    if let Some(stack) = existing {
        let steps = tenant_steps(stack, keys, &rates, step, "tenants").await?;
        runs.push(json!({
            "sequencers": "existing stack",
            "best_ops_per_sec_with_p99_under_100ms": best_under_100ms(&steps),
            "steps": steps,
        }));
    }
    for &n in args.sequencers.iter().filter(|_| existing.is_none()) {
        anyhow::ensure!(n > 0, "--sequencers: counts must be positive");
        eprintln!("tenants: starting a stack with {n} sequencer process(es)...");
        let stack = Stack::start(n, args.one_process).await?;
        let measured = stack.processes();
        let before: Vec<Option<(f64, u64)>> = measured
            .iter()
            .map(|(_, pid)| process_usage(*pid))
            .collect();
        let steps = tenant_steps(&stack, keys, &rates, step, &format!("tenants, {n} seq")).await;
        let processes = usage_since(&measured, &before);
        let partitions = stack.partitions;
        stack.stop().await;
        let steps = steps?;
        runs.push(json!({
            "sequencers": n,
            "partitions": partitions,
            "best_ops_per_sec_with_p99_under_100ms": best_under_100ms(&steps),
            "steps": steps,
            "processes": processes,
        }));
    }
    Ok(json!({
        "stream_keys": keys,
        "orgs": keys,
        "offered_ops_per_sec": rates,
        "step_secs": step.as_secs_f64(),
        "runs": runs,
    }))
}

/// One line of the chart: offered ops/s against a value, with its legend entry.
struct Curve {
    label: String,
    colour: RGBColor,
    /// Dashed (p50) or solid.
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// One scenario's column of the chart: acked rate on top, ack latency below.
struct Panel {
    caption: &'static str,
    acked: Vec<Curve>,
    latency: Vec<Curve>,
}

/// Colours of the runs in a panel (throughput, or one per sequencer count).
const RUN_COLOURS: [RGBColor; 4] = [
    RGBColor(0x00, 0x66, 0xcc),
    RGBColor(0x22, 0xaa, 0x22),
    RGBColor(0xaa, 0x22, 0xcc),
    RGBColor(0xcc, 0x22, 0x22),
];
const RAW_COLOUR: RGBColor = RGBColor(0x00, 0x99, 0x00);
const TARGET_COLOUR: RGBColor = RGBColor(0xcc, 0x00, 0x00);
const FONT: &str = "sans-serif";

impl Panel {
    /// The curves of one run: acked rate, p50 and p99 against the offered rate.
    fn add_run(&mut self, who: &str, colour: RGBColor, steps: &[Value]) {
        let points = |value: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
            steps
                .iter()
                .filter_map(|s| Some((s["offered_ops_per_sec"].as_f64()?, value(s)?)))
                .collect()
        };
        self.acked.push(Curve {
            label: format!("acked, {who}"),
            colour,
            dashed: false,
            points: points(&|s| s["acked_ops_per_sec"].as_f64()),
        });
        for (q, dashed) in [("p50", true), ("p99", false)] {
            self.latency.push(Curve {
                label: format!("{q}, {who}"),
                colour,
                dashed,
                points: points(&|s| s["latency"][format!("{q}_ms")].as_f64()),
            });
        }
    }

    fn points(curves: &[Curve]) -> impl Iterator<Item = (f64, f64)> + '_ {
        curves.iter().flat_map(|c| c.points.iter().copied())
    }

    fn max_offered(&self) -> f64 {
        Self::points(&self.acked)
            .map(|p| p.0)
            .fold(1.0_f64, f64::max)
    }
}

/// The SVG chart of the throughput and tenants scenarios, a column each: acked rate
/// against the offered rate (with the raw JetStream rate, when measured, for
/// reference) and p50/p99 ack latency against the offered rate (log scale, with the
/// 100 ms target). `tenants`: the scenario's runs (`sequencers`, `steps`).
fn chart(steps: &[Value], raw_rate: Option<f64>, tenants: &[Value]) -> anyhow::Result<String> {
    let mut panels = Vec::new();
    if !steps.is_empty() {
        let mut panel = Panel {
            caption: "throughput: one org, a stream key per client",
            acked: Vec::new(),
            latency: Vec::new(),
        };
        panel.add_run("throughput", RUN_COLOURS[0], steps);
        panels.push(panel);
    }
    if !tenants.is_empty() {
        let mut panel = Panel {
            caption: "tenants: one stream key per org",
            acked: Vec::new(),
            latency: Vec::new(),
        };
        for (i, run) in tenants.iter().enumerate() {
            let who = match &run["sequencers"] {
                Value::Number(n) => format!("tenants, {n} sequencer(s)"),
                other => format!("tenants, {}", other.as_str().unwrap_or("?")),
            };
            let steps = run["steps"].as_array().map_or(&[][..], Vec::as_slice);
            panel.add_run(&who, RUN_COLOURS[(i + 1) % RUN_COLOURS.len()], steps);
        }
        panels.push(panel);
    }
    let columns = panels.len().max(1);
    let size = (if columns > 1 { 1200 } else { 760 }, 820);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            "ultrasync bench: acked rate and ack latency vs offered load (open loop)",
            (FONT, 20),
        )?;
        if panels.is_empty() {
            root.draw(&Text::new(
                "no throughput or tenants steps in this run",
                (40, 40),
                (FONT, 14),
            ))?;
        }
        let cells = root.split_evenly((2, columns));
        for (i, panel) in panels.iter().enumerate() {
            rate_panel(&cells[i], panel, raw_rate)?;
            latency_panel(&cells[columns + i], panel)?;
        }
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Acked ops/s against offered ops/s: the line `acked = offered` is where the stack
/// keeps up; the raw JetStream rate is the ceiling this machine allows.
fn rate_panel(area: &Area<'_>, panel: &Panel, raw_rate: Option<f64>) -> anyhow::Result<()> {
    let x_max = panel.max_offered() * 1.05;
    let top = Panel::points(&panel.acked)
        .map(|p| p.1)
        .fold(x_max, f64::max);
    // A raw rate far above the steps would squash them to the bottom: then it is
    // named in the legend only.
    let raw_on_scale = raw_rate.filter(|raw| *raw <= top * 2.0);
    let y_max = raw_on_scale.unwrap_or(0.0).max(top) * 1.08;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{}: acked rate", panel.caption), (FONT, 15))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("offered ops/s")
        .y_desc("acked ops/s")
        .x_label_formatter(&|v| rate_label(*v))
        .y_label_formatter(&|v| rate_label(*v))
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.12))
        .label_style((FONT, 12))
        .draw()?;
    let grey = BLACK.mix(0.4).stroke_width(1);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, 0.0), (x_max, x_max)],
            4,
            4,
            grey,
        ))?
        .label("acked = offered")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], grey));
    let style = RAW_COLOUR.stroke_width(2);
    match (raw_rate, raw_on_scale) {
        (Some(raw), Some(_)) => {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, raw), (x_max, raw)],
                    8,
                    4,
                    style,
                ))?
                .label(format!("raw JetStream {raw:.0}/s"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        (Some(raw), None) => {
            chart
                .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                .label(format!("raw JetStream {raw:.0}/s (above this scale)"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
        }
        (None, _) => {}
    }
    for curve in &panel.acked {
        draw_curve(&mut chart, curve)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 12))
        .draw()?;
    Ok(())
}

/// p50 (dashed) and p99 (solid) ack latency against offered ops/s, log scale, with
/// the 100 ms p99 target.
fn latency_panel(area: &Area<'_>, panel: &Panel) -> anyhow::Result<()> {
    let x_max = panel.max_offered() * 1.05;
    let values: Vec<f64> = Panel::points(&panel.latency)
        .map(|p| p.1)
        .filter(|v| *v > 0.0)
        .collect();
    let low = values.iter().copied().fold(100.0_f64, f64::min);
    let high = values.iter().copied().fold(100.0_f64, f64::max);
    // Whole decades below, and room above the highest value for the legend.
    let y_min = 10f64.powf(low.log10().floor()).clamp(0.001, 10.0);
    let y_max = (high * 3.0).min(100_000.0);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{}: ack latency", panel.caption), (FONT, 15))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            0.0..x_max,
            (y_min..y_max)
                .log_scale()
                .with_key_points(log_ticks(y_min, y_max)),
        )?;
    chart
        .configure_mesh()
        .x_desc("offered ops/s")
        .y_desc("ack latency, ms (log scale)")
        .x_label_formatter(&|v| rate_label(*v))
        .y_label_formatter(&|v| ms_label(*v))
        .light_line_style(TRANSPARENT)
        .bold_line_style(BLACK.mix(0.12))
        .label_style((FONT, 12))
        .draw()?;
    let target = TARGET_COLOUR.stroke_width(1);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, 100.0), (x_max, 100.0)],
            6,
            4,
            target,
        ))?
        .label("p99 target 100 ms")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], target));
    for curve in &panel.latency {
        let points = curve
            .points
            .iter()
            .map(|&(x, y)| (x, y.max(y_min)))
            .collect();
        draw_curve(
            &mut chart,
            &Curve {
                points,
                label: curve.label.clone(),
                ..*curve
            },
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 12))
        .draw()?;
    Ok(())
}

/// A curve: its line (dashed or solid), a dot per step and its legend entry.
fn draw_curve<Y>(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<RangedCoordf64, Y>>,
    curve: &Curve,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    let style = curve.colour.stroke_width(2);
    if curve.dashed {
        chart
            .draw_series(DashedLineSeries::new(curve.points.clone(), 6, 4, style))?
            .label(&curve.label)
            .legend(move |(x, y)| DashedPathElement::new([(x, y), (x + 20, y)], 6, 4, style));
    } else {
        chart
            .draw_series(LineSeries::new(curve.points.clone(), style))?
            .label(&curve.label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    chart.draw_series(PointSeries::of_element(
        curve.points.clone(),
        3,
        curve.colour.filled(),
        &|c, s, st| Circle::new(c, s, st),
    ))?;
    Ok(())
}

/// Ticks of a log axis from `low` to `high`: 1, 2 and 5 of each decade, or only the
/// powers of ten when the axis spans more than three decades.
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    let (first, last) = (low.log10().floor() as i32, high.log10().ceil() as i32);
    let steps: &[f64] = if last - first > 3 {
        &[1.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    (first..=last)
        .flat_map(|e| steps.iter().map(move |m| m * 10f64.powi(e)))
        // (`low` may be a power of ten computed another way, an ulp off.)
        .filter(|v| *v >= low * (1.0 - 1e-9) && *v <= high * (1.0 + 1e-9))
        .collect()
}

/// Ops/s on an axis: 500, 2k, 2.5k.
fn rate_label(v: f64) -> String {
    if v.abs() < 1000.0 {
        format!("{v:.0}")
    } else if (v / 1000.0).fract().abs() < 0.05 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{:.1}k", v / 1000.0)
    }
}

/// Milliseconds on a log axis: 0.01, 0.5, 2, 100.
fn ms_label(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_owned()
    }
}

/// How a stack this run starts runs its services (`--one-process`).
fn services_shape(one_process: bool) -> &'static str {
    match one_process {
        true => "one process: ultrasync serve (gateway, sequencer, materializer, compactor)",
        false => "a process each: gateway, sequencer, materializer",
    }
}

/// `config` is needed only with `--url` (secret, NATS URL).
pub async fn run(args: BenchArgs, config: anyhow::Result<Config>) -> anyhow::Result<()> {
    let all = args.scenario.iter().any(|s| s == "all");
    let wants = |s: &str| all || args.scenario.iter().any(|x| x == s);
    let step = Duration::from_secs(if args.quick { 1 } else { args.duration.max(1) });
    let mut report = serde_json::Map::new();
    report.insert(
        "machine".into(),
        json!({
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
        }),
    );
    if args.url.is_none() {
        report.insert("services".into(), services_shape(args.one_process).into());
    }
    // Every scenario but `tenants` (which starts a stack per sequencer count) runs on
    // one stack; so does `tenants` against an existing one.
    let on_one_stack = [
        "jetstream",
        "closed",
        "throughput",
        "latency",
        "fanout",
        "bootstrap",
        "idle",
    ]
    .iter()
    .any(|s| wants(s));
    let mut steps = Vec::new();
    let mut raw_rate = None;
    if on_one_stack || args.url.is_some() {
        let stack = match &args.url {
            None => {
                eprintln!(
                    "starting a stack (nats-server with sync_interval: always, {})...",
                    services_shape(args.one_process)
                );
                Stack::start(1, args.one_process).await?
            }
            Some(url) => {
                let config = config?;
                let secret = String::from_utf8(config.auth.secret()?)
                    .context("the JWT secret is not UTF-8")?;
                eprintln!("using the stack at {url} (NATS {})", config.nats_url);
                Stack::attach(url.clone(), secret, config.nats_url.clone()).await?
            }
        };
        (steps, raw_rate) = one_stack(&args, &stack, step, &mut report).await?;
        stack.stop().await;
    }
    if wants("tenants") && args.url.is_none() {
        report.insert("tenants".into(), tenants(&args, None, step).await?);
    }
    let tenant_runs = report
        .get("tenants")
        .and_then(|t| t["runs"].as_array().cloned())
        .unwrap_or_default();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json_path = args.out.join(format!("bench-{stamp}.json"));
    let svg_path = args.out.join(format!("bench-{stamp}.svg"));
    let report = Value::Object(report);
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(
        &svg_path,
        chart(&steps, raw_rate, &tenant_runs).context("drawing the chart")?,
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!(
        "report: {}\nchart:  {}",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// The scenarios that share one stack, into `report`; returns the throughput steps
/// and the raw JetStream rate (for the chart).
async fn one_stack(
    args: &BenchArgs,
    stack: &Stack,
    step: Duration,
    report: &mut serde_json::Map<String, Value>,
) -> anyhow::Result<(Vec<Value>, Option<f64>)> {
    let all = args.scenario.iter().any(|s| s == "all");
    let wants = |s: &str| all || args.scenario.iter().any(|x| x == s);
    let subscribers = if args.quick {
        args.subscribers.min(50)
    } else {
        args.subscribers
    };
    let boot_keys = if args.quick {
        args.bootstrap_keys.min(2000)
    } else {
        args.bootstrap_keys
    };
    let measured = stack.processes();
    let usage_before: Vec<Option<(f64, u64)>> = measured
        .iter()
        .map(|(_, pid)| process_usage(*pid))
        .collect();
    let mut raw_rate = None;
    if wants("jetstream") {
        let r = jetstream(&stack.nats_url, step).await?;
        raw_rate = r["ops_per_sec"].as_f64();
        report.insert("jetstream".into(), r);
    }
    let mut steps = Vec::new();
    if wants("throughput") {
        let rates: Vec<u64> = match (&args.rates, args.quick) {
            (Some(r), _) => r.clone(),
            (None, true) => vec![500, 2000],
            (None, false) => vec![
                1000, 2500, 5000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000,
            ],
        };
        for &rate in &rates {
            let cpu_before = stack.cpu().await;
            let run = open_loop(
                stack,
                args.clients,
                rate,
                step,
                &format!("throughput {rate}/s"),
            )
            .await?;
            let cpu = cpu_before.per_op(&stack.cpu().await, run.acked);
            let achieved = run.acked as f64 / run.elapsed.as_secs_f64();
            let p99 = run.latency.value_at_quantile(0.99) as f64 / 1000.0;
            steps.push(json!({
                "offered_ops_per_sec": rate,
                "acked_ops_per_sec": achieved,
                "acked": run.acked,
                "latency": summary(&run.latency),
                "send_lag": summary(&run.send_lag),
                "cpu": cpu,
            }));
            if p99 > 100.0 || achieved < rate as f64 * 0.9 {
                break;
            }
        }
        let best = best_under_100ms(&steps);
        report.insert(
            "throughput".into(),
            json!({
                "clients": args.clients,
                "steps": steps,
                "best_ops_per_sec_with_p99_under_100ms": best,
                "ratio_to_raw_jetstream": raw_rate.map(|r| best / r),
            }),
        );
    }
    if wants("latency") {
        let cpu_before = stack.cpu().await;
        let run = open_loop(stack, 4, 1000, step * 2, "latency at 1000/s").await?;
        let cpu = cpu_before.per_op(&stack.cpu().await, run.acked);
        report.insert(
            "latency".into(),
            json!({
                "offered_ops_per_sec": 1000,
                "acked_ops_per_sec": run.acked as f64 / run.elapsed.as_secs_f64(),
                "latency": summary(&run.latency),
                "send_lag": summary(&run.send_lag),
                "cpu": cpu,
            }),
        );
    }
    if wants("closed") {
        let mut closed = closed_loop(stack, args.writers, args.window, step).await?;
        if let (Some(raw), Some(rate)) = (raw_rate, closed["acked_ops_per_sec"].as_f64()) {
            closed["ratio_to_raw_jetstream"] = json!(rate / raw);
        }
        report.insert("closed".into(), closed);
    }
    if wants("fanout") {
        report.insert("fanout".into(), fanout(stack, subscribers, step * 2).await?);
    }
    if wants("bootstrap") {
        let boot_ops = if args.quick {
            args.bootstrap_ops.min(boot_keys * 2)
        } else {
            args.bootstrap_ops
        }
        .max(boot_keys);
        report.insert(
            "bootstrap".into(),
            bootstrap(stack, boot_keys, boot_ops).await?,
        );
    }
    if wants("idle") {
        let n = if args.quick {
            args.idle_connections.min(200)
        } else {
            args.idle_connections
        };
        report.insert("idle".into(), idle(stack, n).await?);
    }
    if wants("tenants") && stack.own.is_none() {
        report.insert("tenants".into(), tenants(args, Some(stack), step).await?);
    }
    // CPU spent during this run, and peak RSS, per process.
    report.insert("processes".into(), usage_since(&measured, &usage_before));
    report.insert(
        "stack".into(),
        json!(match &args.url {
            Some(u) => format!("existing: {u}"),
            None => "started by the bench: nats-server, gateway, materializer and sequencer processes; the load generator in its own".to_owned(),
        }),
    );
    Ok((steps, raw_rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(offered: f64, acked: f64, p50: f64, p99: f64) -> Value {
        json!({
            "offered_ops_per_sec": offered,
            "acked_ops_per_sec": acked,
            "acked": (acked * 5.0) as u64,
            "latency": {"p50_ms": p50, "p99_ms": p99},
        })
    }

    /// The text of every `<text>` element of a well-formed SVG document.
    fn texts(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).expect("the chart is well-formed XML");
        assert!(doc.root_element().has_tag_name("svg"), "{svg}");
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_owned())
            .collect()
    }

    #[test]
    fn durable_writes_come_from_the_sequencers_counters() {
        let metrics = |rounds: u64, secs: f64, writes: u64, ops: u64| {
            format!(
                "# TYPE ultrasync_sequencer_commit_seconds histogram\n\
                 ultrasync_sequencer_commit_seconds_bucket{{le=\"0.001\"}} 1\n\
                 ultrasync_sequencer_commit_seconds_sum {secs}\n\
                 ultrasync_sequencer_commit_seconds_count {rounds}\n\
                 ultrasync_sequencer_batch_ops_sum {ops}\n\
                 ultrasync_sequencer_batch_ops_count {writes}\n\
                 ultrasync_sequencer_ops_written_total {ops}\n\
                 ultrasync_sequencer_partition_ops_written_total{{partition=\"1\"}} 99\n"
            )
        };
        let sample = |texts: &[String], at: Instant| {
            let mut w = Writes::default();
            for t in texts {
                w.add(t);
            }
            CpuSample {
                cpu: Vec::new(),
                nats_msgs: None,
                writes: Some(w),
                at,
            }
        };
        let t0 = Instant::now();
        // Two sequencers; in 2 s: 100 rounds of 0.5 s in all, 400 key writes, 4,000 ops.
        let before = sample(&[metrics(10, 1.0, 20, 100), metrics(0, 0.0, 0, 0)], t0);
        let after = sample(
            &[metrics(60, 1.25, 220, 2100), metrics(50, 0.25, 200, 2000)],
            t0 + Duration::from_secs(2),
        );
        let w = before.writes_until(&after, 4000);
        assert_eq!(w["key_writes_per_sec"], 200.0);
        assert_eq!(w["key_writes_per_acked_op"], 0.1);
        assert_eq!(w["ops_per_key_write"], 10.0);
        assert_eq!(w["rounds_per_sec"], 50.0);
        assert_eq!(w["keys_per_round"], 4.0);
        assert_eq!(w["ms_per_round"], 5.0);
        assert_eq!(w["committer_busy_share"], 0.25);
        // A stack without the sequencers' figures (`--url`) reports none.
        let unknown = CpuSample {
            writes: None,
            ..before.clone()
        };
        assert!(unknown.writes_until(&after, 4000).is_null());
    }

    #[test]
    fn the_chart_has_axes_legends_and_reference_lines() {
        let steps = [
            step(1000.0, 998.0, 0.8, 3.1),
            step(2500.0, 2497.0, 1.1, 12.0),
            step(5000.0, 4990.0, 4.2, 61.0),
            step(10_000.0, 6900.0, 310.0, 1450.0),
        ];
        let tenants = [
            json!({"sequencers": 1, "steps": [step(1000.0, 999.0, 1.0, 9.0), step(2000.0, 1500.0, 80.0, 235.0)]}),
            json!({"sequencers": 3, "steps": [step(1000.0, 999.0, 0.9, 7.0), step(2000.0, 1998.0, 2.0, 30.0)]}),
            json!({"sequencers": "existing stack", "steps": [step(1000.0, 1000.0, 0.5, 2.0)]}),
        ];
        let svg = chart(&steps, Some(6956.0), &tenants).expect("chart");
        let texts = texts(&svg);
        for want in [
            "ultrasync bench: acked rate and ack latency vs offered load (open loop)",
            "throughput: one org, a stream key per client: acked rate",
            "throughput: one org, a stream key per client: ack latency",
            "tenants: one stream key per org: acked rate",
            "tenants: one stream key per org: ack latency",
            "offered ops/s",
            "acked ops/s",
            "ack latency, ms (log scale)",
            "acked = offered",
            "raw JetStream 6956/s",
            // The tenants' steps stay far below it.
            "raw JetStream 6956/s (above this scale)",
            "p99 target 100 ms",
            "acked, throughput",
            "p50, throughput",
            "p99, throughput",
            "acked, tenants, 1 sequencer(s)",
            "p50, tenants, 3 sequencer(s)",
            "p99, tenants, 3 sequencer(s)",
            "p99, tenants, existing stack",
            // Tick labels of both axes.
            "10k",
            "100",
        ] {
            assert!(texts.iter().any(|t| t == want), "no {want:?} in {texts:?}");
        }
        assert!(svg.contains("<polyline"), "{svg}");
    }

    #[test]
    fn a_chart_without_raw_rate_or_tenants_draws_what_it_has() {
        let svg = chart(&[step(500.0, 500.0, 0.4, 1.2)], None, &[]).expect("chart");
        let texts = texts(&svg);
        assert!(texts.iter().any(|t| t == "p99, throughput"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "p99 target 100 ms"), "{texts:?}");
        assert!(
            !texts.iter().any(|t| t.starts_with("raw JetStream")),
            "{texts:?}"
        );
        assert!(!texts.iter().any(|t| t.contains("tenants")), "{texts:?}");
    }

    #[test]
    fn log_axes_are_ticked_at_1_2_5_or_at_powers_of_ten() {
        assert_eq!(
            log_ticks(1.0, 300.0),
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0]
        );
        let wide = log_ticks(10f64.powf(-1.0), 3000.0);
        assert_eq!(wide.len(), 5, "{wide:?}");
        assert_eq!(
            wide.iter().map(|v| ms_label(*v)).collect::<Vec<_>>(),
            ["0.1", "1", "10", "100", "1000"]
        );
        assert_eq!(rate_label(2500.0), "2.5k");
        assert_eq!(rate_label(40_000.0), "40k");
        assert_eq!(rate_label(500.0), "500");
    }

    #[test]
    fn a_chart_without_steps_is_still_an_svg() {
        let texts = texts(&chart(&[], Some(7000.0), &[]).expect("chart"));
        assert!(
            texts
                .iter()
                .any(|t| t == "no throughput or tenants steps in this run"),
            "{texts:?}"
        );
    }
}
