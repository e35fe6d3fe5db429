//! Every service in one process: `ultrasync serve` against a NATS server, and
//! `ultrasync dev` beside its managed one. One runtime carries the gateway, a
//! sequencer, a materializer and the compactor; they talk through NATS exactly as
//! separate processes do, except that the sequencer hands its answers for the
//! gateway straight to it (`ultrasync_shared::local`).

use std::path::PathBuf;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use ultrasync_shared::config::Config;
use ultrasync_shared::local::Local;

use crate::STOP_GRACE;

/// The services of one process, running.
pub struct Services {
    gateway: JoinHandle<anyhow::Result<()>>,
    sequencer: JoinHandle<anyhow::Result<()>>,
    materializer: JoinHandle<anyhow::Result<()>>,
    compactor: JoinHandle<anyhow::Result<()>>,
}

impl Services {
    /// Starts the four services: the gateway on `listener` (serving the demo app
    /// from `demo` when given). The JetStream layout is expected in place.
    pub fn spawn(
        cfg: &Config,
        listener: tokio::net::TcpListener,
        shutdown: &CancellationToken,
        demo: Option<PathBuf>,
    ) -> Self {
        let local = Local::default();
        let sequencer = tokio::spawn(ultrasync_sequencer::run_in_process(
            cfg.clone(),
            shutdown.clone(),
            local.clone(),
        ));
        let materializer = tokio::spawn(ultrasync_materializer::run(cfg.clone(), shutdown.clone()));
        let compactor = tokio::spawn(ultrasync_compactor::run(cfg.clone(), shutdown.clone()));
        let gateway = tokio::spawn(ultrasync_gateway::run_in_process(
            cfg.clone(),
            listener,
            shutdown.clone(),
            demo,
            local,
        ));
        Self {
            gateway,
            sequencer,
            materializer,
            compactor,
        }
    }

    /// Runs until `shutdown` fires or a service ends (a failure: the others are
    /// then stopped and its error returned), each given [`STOP_GRACE`] to stop.
    pub async fn supervise(self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let Self {
            mut gateway,
            mut sequencer,
            mut materializer,
            mut compactor,
        } = self;
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
                // Stopped because another service failed: what it says is about
                // being cut short, not a failure of its own.
                Ok(Ok(Err(e))) if result.is_err() => {
                    warn!(service = name, error = %format!("{e:#}"), "cut short while stopping")
                }
                Ok(Ok(Err(e))) => {
                    error!(service = name, error = %format!("{e:#}"), "stopped with an error")
                }
                Err(_) => error!(service = name, "did not stop in time"),
                _ => info!(service = name, "stopped"),
            }
        }
        result
    }
}
