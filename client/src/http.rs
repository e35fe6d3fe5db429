//! The gateway's HTTP API as the CLI and agents call it, over the workspace's one HTTP
//! client (`ultrasync-http-client`: reqwest on rustls): `http://` and `https://`,
//! trusting the system's roots plus an optional private CA ([`Trust`]), each exchange
//! under a deadline and every answer read up to [`MAX_BODY`].

use std::time::Duration;

use ultrasync_http_client::reqwest;
use ultrasync_http_client::{BodyError, describe, is_untrusted_certificate, read_bounded};
pub use ultrasync_http_client::{Trust, TrustError};

/// The largest answer read (a history page or a big value fits; a runaway does not).
pub const MAX_BODY: usize = 64 << 20;

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not an http:// or https:// URL: {0}")]
    Url(String),
    /// The server's certificate is not signed by a trusted CA (or names another host).
    #[error(
        "the server's certificate is not trusted ({0}); give the CA that signed it with --ca-file or ULTRASYNC_CA_FILE"
    )]
    Untrusted(String),
    #[error("cannot reach {0}")]
    Connect(String),
    #[error("timed out")]
    Timeout,
    #[error("bad answer: {0}")]
    Answer(String),
}

impl HttpError {
    fn from_reqwest(e: &reqwest::Error) -> Self {
        if is_untrusted_certificate(e) {
            Self::Untrusted(describe(e))
        } else if e.is_timeout() {
            Self::Timeout
        } else if e.is_connect() {
            Self::Connect(describe(e))
        } else {
            Self::Answer(describe(e))
        }
    }
}

/// Requests to one gateway; connections are kept and reused between them.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `http(s)://host:port`, no trailing slash.
    base: String,
}

impl Client {
    /// A client for the gateway at `base` (`https://host:port`), trusting `trust`,
    /// giving each exchange `timeout` in all.
    pub fn new(base: &str, trust: &Trust, timeout: Duration) -> Result<Self, HttpError> {
        let base = base.trim_end_matches('/');
        let url = reqwest::Url::parse(base).map_err(|e| HttpError::Url(format!("{base}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(HttpError::Url(base.to_owned()));
        }
        let http = ultrasync_http_client::builder(trust, "ultrasync-cli", timeout)
            .build()
            .map_err(|e| HttpError::Answer(describe(&e)))?;
        Ok(Self {
            http,
            base: base.to_owned(),
        })
    }

    /// Sends one request to `base` + `path` (`/v1/...`, already percent-encoded); a JSON
    /// `body` when given.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Result<Response, HttpError> {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| HttpError::Url(format!("method {method}: {e}")))?;
        let mut req = self.http.request(method, &url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(body.to_owned());
        }
        let resp = req.send().await.map_err(|e| HttpError::from_reqwest(&e))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = match read_bounded(resp, MAX_BODY).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(BodyError::TooLarge(n)) => {
                return Err(HttpError::Answer(format!("the answer is over {n} bytes")));
            }
            Err(BodyError::Timeout) => return Err(HttpError::Timeout),
            Err(BodyError::Read(e)) => return Err(HttpError::Answer(e)),
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// One request to `base` + `path` with a client of its own trusting the system's
/// roots (for a single call; keep a [`Client`] to reuse connections or trust a CA).
pub async fn request(
    method: &str,
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    Client::new(base, &Trust::system(), timeout)?
        .request(method, path, headers, body)
        .await
}
