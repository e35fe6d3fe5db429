//! The gateway's listener: accepts TCP connections (TLS when configured) and serves
//! HTTP/1.1 and HTTP/2 with WebSocket upgrades. What `axum::serve` does, plus what
//! a server facing hostile clients needs: a cap on connections held before their
//! upgrade (past it a connection is closed at once), a deadline for the TLS handshake
//! and one for a request's headers (a client trickling a header line every few
//! seconds is cut off), and a graceful stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long a stopping server lets open requests finish.
const DRAIN: Duration = Duration::from_secs(10);

/// Limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections held at once (plain or TLS, before their upgrade).
    pub max_connections: usize,
    /// Time a client has to send a request's headers (and to finish TLS).
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = tls.map(TlsAcceptor::from);
    let open = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "connection cap reached; closing");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let acceptor = acceptor.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        open.spawn(async move {
            let io = match acceptor {
                None => Either::Left(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => Either::Right(tls),
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(20)));
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
                }
            }
            drop(permit);
        });
    }
    open.close();
    tokio::time::timeout(DRAIN, open.wait())
        .await
        .context("connections still open after the drain")
        .or_else(|e| {
            warn!(error = %e, "stopping with connections open");
            Ok(())
        })
}
