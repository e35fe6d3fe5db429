//! How ultrasync reaches other servers over HTTP(S) and TLS: one client for the whole
//! workspace (reqwest on rustls with ring, HTTP/1.1). The CLI's commands, the Rust
//! SDK's `wss://` handshake and the gateway's webhooks all go through it, so there is
//! one place that decides whom to trust, how long to wait and how much to read.
//!
//! - [`Trust`]: the system's roots plus, when given, a private CA from a PEM file
//!   (`--ca-file` / `ULTRASYNC_CA_FILE`, a webhook's `ca_file`). The same rustls
//!   configuration serves HTTPS and `wss://`.
//! - [`builder`]: a reqwest client with a connect deadline and a deadline for a whole
//!   exchange (the answer's body included), connections kept for reuse, redirects not
//!   followed. Proxies come from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`.
//! - [`read_bounded`]: an answer's body read up to a bound; past it the read stops and
//!   the connection is dropped, so a peer answering without end holds neither memory
//!   nor a task.
//! - [`describe`] and [`is_untrusted_certificate`]: errors told whole (reqwest's own
//!   message leaves out the cause), and a certificate that no trusted CA signed told
//!   apart from an outage.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub use reqwest;

/// Longest wait for a TCP connection and TLS handshake, within the exchange deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading the CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {0} holds no PEM certificate")]
    Empty(PathBuf),
    #[error("the CA file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// An answer's body that could not be read whole within its bound.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer's body is over {0} bytes")]
    TooLarge(usize),
    /// The exchange's deadline passed before the body ended.
    #[error("the answer's body did not end in time")]
    Timeout,
    #[error("reading the answer: {0}")]
    Read(String),
}

/// Whom a client believes: the system's roots, plus a private CA when one is given.
#[derive(Clone)]
pub struct Trust {
    tls: Arc<rustls::ClientConfig>,
    ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// The system's roots only.
    pub fn system() -> Self {
        static SYSTEM: OnceLock<Trust> = OnceLock::new();
        SYSTEM
            .get_or_init(|| Self::build(system_roots().clone(), None))
            .clone()
    }

    /// The system's roots plus every certificate of the PEM file `path`.
    pub fn with_ca_file(path: &Path) -> Result<Self, TrustError> {
        let pem = std::fs::read(path).map_err(|source| TrustError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| TrustError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut roots = system_roots().clone();
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| invalid(e.to_string()))?;
            roots.add(cert).map_err(|e| invalid(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(TrustError::Empty(path.to_owned()));
        }
        Ok(Self::build(roots, Some(path.to_owned())))
    }

    /// [`Trust::with_ca_file`] when a file is given, else [`Trust::system`].
    pub fn from_ca_file(path: Option<&Path>) -> Result<Self, TrustError> {
        match path {
            Some(p) => Self::with_ca_file(p),
            None => Ok(Self::system()),
        }
    }

    /// The private CA file, if any.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The rustls configuration (for a `wss://` connector). No ALPN: HTTP/1.1 only,
    /// which a WebSocket upgrade needs.
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    fn build(roots: rustls::RootCertStore, ca_file: Option<PathBuf>) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            tls: Arc::new(tls),
            ca_file,
        }
    }
}

/// The system's roots, read once; certificates rustls cannot use are skipped.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let _ = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        roots
    })
}

/// A reqwest client builder trusting `trust`, with `exchange` as the deadline of one
/// whole exchange (connect, request, the answer's body) and at most
/// [`CONNECT_TIMEOUT`] for connecting. Idle connections are kept a minute for reuse;
/// redirects are not followed (a 3xx is an answer like any other).
pub fn builder(trust: &Trust, user_agent: &str, exchange: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(rustls::ClientConfig::clone(&trust.tls))
        .user_agent(user_agent)
        .connect_timeout(exchange.min(CONNECT_TIMEOUT))
        .timeout(exchange)
        .pool_idle_timeout(POOL_IDLE)
        .redirect(reqwest::redirect::Policy::none())
}

/// Reads `response`'s body up to `limit` bytes. Past the limit the read stops and the
/// response (so its connection) is dropped; the client's deadline ends a body that
/// never does.
pub async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, BodyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) if e.is_timeout() => return Err(BodyError::Timeout),
            Err(e) => return Err(BodyError::Read(describe(&e))),
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message names
/// only the URL).
pub fn describe(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Whether `error` (or a cause) is a server certificate that the trusted roots do not
/// vouch for (unknown issuer, wrong name, expired...), as opposed to an outage.
pub fn is_untrusted_certificate(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if is_invalid_certificate(e) {
            return true;
        }
        next = e.source();
    }
    false
}

/// `e` is rustls' certificate error, or io::Errors wrapped around one (io::Error hides
/// its inner error from `source()`, and connectors wrap it more than once).
fn is_invalid_certificate(mut e: &(dyn StdError + 'static)) -> bool {
    loop {
        if let Some(rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return true;
        }
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => e = inner,
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("usync-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        assert!(matches!(
            Trust::with_ca_file(&empty),
            Err(TrustError::Empty(_))
        ));
        assert!(matches!(
            Trust::with_ca_file(&dir.join("missing.pem")),
            Err(TrustError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_io_wrapped_certificate_error_is_recognized() {
        let rustls_error =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        // As hyper-rustls hands it on: wrapped once more.
        let twice = std::io::Error::other(io);
        assert!(is_untrusted_certificate(&twice));
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_untrusted_certificate(&other));
    }
}
