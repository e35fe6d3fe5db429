//! Client commands for people and coding agents: `put`, `get`, `del`, `patch`,
//! `history` (HTTP API) and `watch` (WebSocket). Output is JSON on stdout (one
//! document, or one line per op for `watch`); errors are JSON on stderr
//! (`{"error": {"code", "message"}, …}`) with an exit code that says what happened:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | anything else (bad answer, internal; `untrusted_certificate`: the server's TLS certificate is not signed by a trusted CA, see `--ca-file`) |
//! | 2 | bad input (invalid id, key, JSON; also clap's usage errors) |
//! | 3 | precondition failed (`--if-version` mismatch); the current state is printed |
//! | 4 | not found |
//! | 5 | rejected by the namespace's rules (schema, op, size) |
//! | 6 | not authorized (missing, invalid or expired token; forbidden) |
//! | 7 | unavailable (server down, rate limited, timed out): retry later |
//!
//! `--url` may be `http://`, `https://`, `ws://` or `wss://` (the same gateway either
//! way). TLS trusts the system's roots plus `--ca-file` (`ULTRASYNC_CA_FILE`), a PEM CA
//! for a private deployment (`ultrasync dev --tls` prints its own).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use ultrasync_client::http::{self, HttpError};
use ultrasync_client::{ClientError, Connection, ServerMessage, Trust};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Where and as whom.
#[derive(Args, Clone)]
pub struct Target {
    /// Gateway base URL (`http://`, `https://`; `ws://`/`wss://` work too).
    #[arg(long, env = "ULTRASYNC_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A PEM CA to trust for `https://` / `wss://` besides the system's roots.
    #[arg(long, env = "ULTRASYNC_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Bearer token (see `ultrasync token`) or API key (`ultrasync apikey create`).
    #[arg(long, env = "ULTRASYNC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Organization [default: the token's `org` claim; required with an API key].
    #[arg(long, env = "ULTRASYNC_ORG")]
    org: Option<String>,
    /// Project.
    #[arg(long, env = "ULTRASYNC_PROJECT", default_value = "default")]
    project: String,
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Set a key to a JSON value.
    Put {
        #[command(flatten)]
        target: Target,
        namespace: String,
        key: String,
        /// The value, as JSON (quote strings: '"text"').
        value: String,
        /// Only if the key is still at this version (0: only if absent).
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Read a key.
    Get {
        #[command(flatten)]
        target: Target,
        namespace: String,
        key: String,
    },
    /// Delete a key.
    Del {
        #[command(flatten)]
        target: Target,
        namespace: String,
        key: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Merge a JSON merge patch (RFC 7386) into a key.
    Patch {
        #[command(flatten)]
        target: Target,
        namespace: String,
        key: String,
        /// The patch, as JSON.
        patch: String,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// A key's ops still in the log, newest first.
    History {
        #[command(flatten)]
        target: Target,
        namespace: String,
        key: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Print a namespace's ops as JSON lines as they are committed, until interrupted.
    Watch {
        #[command(flatten)]
        target: Target,
        namespace: String,
        /// Start after this server_seq (0: from the start) [default: from now].
        #[arg(long)]
        since: Option<u64>,
    },
}

/// A failure with its exit code; the message is already printed.
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn fail(code: &str, message: impl Into<String>, extra: Option<Value>) -> anyhow::Error {
    let mut body = json!({"error": {"code": code, "message": message.into()}});
    if let Some(Value::Object(m)) = extra {
        for (k, v) in m {
            body[k] = v;
        }
    }
    eprintln!("{body}");
    Exit(exit_code(code)).into()
}

fn exit_code(code: &str) -> u8 {
    match code {
        "invalid_message" | "invalid_id" | "invalid_key" | "unknown_namespace" => 2,
        "precondition_failed" => 3,
        "not_found" => 4,
        "schema_invalid" | "invalid_op" | "payload_too_large" | "stale_base" => 5,
        "unauthorized" | "forbidden" => 6,
        // "untrusted_certificate" too: retrying will not help, trusting the CA will.
        "unavailable" | "rate_limited" | "slow_consumer" => 7,
        _ => 1,
    }
}

/// The `org` claim of a JWT (not verified: the server does that).
fn token_org(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    v["org"].as_str().map(str::to_owned)
}

struct Resolved {
    /// `http(s)://host:port`.
    base: String,
    http: http::Client,
    trust: Trust,
    token: String,
    org: String,
    project: String,
}

fn resolve(t: &Target) -> anyhow::Result<Resolved> {
    let Some(token) = t.token.clone() else {
        return Err(fail(
            "unauthorized",
            "no token: pass --token or set ULTRASYNC_TOKEN (mint one with `ultrasync token`)",
            None,
        ));
    };
    let org = match t.org.clone().or_else(|| token_org(&token)) {
        Some(o) => o,
        None => {
            return Err(fail(
                "invalid_id",
                "no org: pass --org (an API key does not name its org)",
                None,
            ));
        }
    };
    let url = t.url.trim_end_matches('/');
    let url = url.trim_end_matches("/v1/sync");
    let base = match url.split_once("://") {
        Some(("ws", rest)) => format!("http://{rest}"),
        Some(("wss", rest)) => format!("https://{rest}"),
        _ => url.to_owned(),
    };
    let trust = Trust::from_ca_file(t.ca_file.as_deref())
        .map_err(|e| fail("invalid_message", format!("--ca-file: {e}"), None))?;
    let http = http::Client::new(&base, &trust, TIMEOUT)
        .map_err(|e| fail("invalid_message", format!("--url: {e}"), None))?;
    Ok(Resolved {
        base,
        http,
        trust,
        token,
        org,
        project: t.project.clone(),
    })
}

fn json_arg(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).map_err(|e| {
        fail(
            "invalid_message",
            format!("{what} must be JSON (quote strings: '\"text\"'): {e}"),
            None,
        )
    })
}

/// `/v1/{org}/{project}/{ns}/keys/{key}`.
fn key_path(r: &Resolved, namespace: &str, key: &str) -> String {
    format!(
        "/v1/{}/{}/{}/keys/{}",
        r.org,
        r.project,
        namespace,
        segment(key)
    )
}

/// Percent-encodes a key for a path segment.
fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn call(
    r: &Resolved,
    method: &str,
    path: &str,
    extra_headers: &[(&str, String)],
    body: Option<String>,
) -> anyhow::Result<Value> {
    let auth = format!("Bearer {}", r.token);
    let mut headers: Vec<(&str, &str)> = vec![("Authorization", auth.as_str())];
    for (k, v) in extra_headers {
        headers.push((k, v.as_str()));
    }
    let resp = match r
        .http
        .request(method, path, &headers, body.as_deref())
        .await
    {
        Ok(resp) => resp,
        Err(e @ HttpError::Url(_)) => return Err(fail("invalid_message", e.to_string(), None)),
        Err(e @ HttpError::Untrusted(_)) => {
            return Err(fail("untrusted_certificate", e.to_string(), None));
        }
        Err(e) => return Err(fail("unavailable", e.to_string(), None)),
    };
    let parsed: Value = serde_json::from_str(&resp.body).unwrap_or(Value::Null);
    if (200..300).contains(&resp.status) {
        return Ok(parsed);
    }
    let code = parsed["error"]["code"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| match resp.status {
            401 | 403 => "unauthorized".into(),
            404 => "not_found".into(),
            429 | 503 => "unavailable".into(),
            _ => "internal".into(),
        });
    let message = parsed["error"]["message"]
        .as_str()
        .unwrap_or(&resp.body)
        .to_owned();
    let extra = parsed
        .get("current_state")
        .map(|cs| json!({"current_state": cs}));
    Err(fail(&code, message, extra))
}

fn print(v: &Value) {
    println!("{v}");
}

pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Put {
            target,
            namespace,
            key,
            value,
            if_version,
        } => {
            let r = resolve(&target)?;
            let value = json_arg("the value", &value)?;
            let headers: Vec<(&str, String)> = if_version
                .map(|v| vec![("If-Match", format!("\"{v}\""))])
                .unwrap_or_default();
            let path = key_path(&r, &namespace, &key);
            print(&call(&r, "PUT", &path, &headers, Some(value.to_string())).await?);
        }
        ClientCommand::Del {
            target,
            namespace,
            key,
            if_version,
        } => {
            let r = resolve(&target)?;
            let headers: Vec<(&str, String)> = if_version
                .map(|v| vec![("If-Match", format!("\"{v}\""))])
                .unwrap_or_default();
            let path = key_path(&r, &namespace, &key);
            print(&call(&r, "DELETE", &path, &headers, None).await?);
        }
        ClientCommand::Get {
            target,
            namespace,
            key,
        } => {
            let r = resolve(&target)?;
            let path = key_path(&r, &namespace, &key);
            print(&call(&r, "GET", &path, &[], None).await?);
        }
        ClientCommand::Patch {
            target,
            namespace,
            key,
            patch,
            if_version,
        } => {
            let r = resolve(&target)?;
            let patch = json_arg("the patch", &patch)?;
            let mut command = json!({
                "command_id": format!("cli-{}", uuid_like()),
                "key": key,
                "op_type": "patch",
                "payload": patch,
            });
            if let Some(v) = if_version {
                command["precondition"] = json!({"expected_version": v});
            }
            let body = json!({"client_id": "cli", "commands": [command]});
            let path = format!("/v1/{}/{}/{}/commands", r.org, r.project, namespace);
            let answer = call(&r, "POST", &path, &[], Some(body.to_string())).await?;
            let result = answer["results"][0].clone();
            if result["type"] == "reject" {
                let code = result["code"].as_str().unwrap_or("internal").to_owned();
                let reason = result["reason"].as_str().unwrap_or("").to_owned();
                let extra = result
                    .get("current_state")
                    .map(|cs| json!({"current_state": cs}));
                return Err(fail(&code, reason, extra));
            }
            print(&result);
        }
        ClientCommand::History {
            target,
            namespace,
            key,
            limit,
        } => {
            let r = resolve(&target)?;
            let path = format!(
                "/v1/{}/{}/{}/keys/{}/history?limit={limit}",
                r.org,
                r.project,
                namespace,
                segment(&key)
            );
            print(&call(&r, "GET", &path, &[], None).await?);
        }
        ClientCommand::Watch {
            target,
            namespace,
            since,
        } => {
            let r = resolve(&target)?;
            watch(&r, &namespace, since).await?;
        }
    }
    Ok(())
}

/// A unique enough command id without an RNG dependency.
fn uuid_like() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{now:x}-{}", std::process::id())
}

async fn watch(r: &Resolved, namespace: &str, since: Option<u64>) -> anyhow::Result<()> {
    // From now: start at the current head.
    let since = match since {
        Some(s) => s,
        None => head_of(r, namespace).await?,
    };
    let ws = match r.base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}/v1/sync"),
        Some((_, rest)) => format!("ws://{rest}/v1/sync"),
        None => format!("ws://{}/v1/sync", r.base),
    };
    let mut conn = match Connection::connect_with(&ws, &r.token, &r.trust).await {
        Ok(c) => c,
        Err(ClientError::Http(401 | 403)) => {
            return Err(fail("unauthorized", "token refused", None));
        }
        Err(e @ ClientError::Untrusted(_)) => {
            return Err(fail("untrusted_certificate", e.to_string(), None));
        }
        Err(e) => return Err(fail("unavailable", e.to_string(), None)),
    };
    let client_id = format!("watch-{}", std::process::id());
    let cursors: BTreeMap<String, Option<u64>> = [(namespace.to_owned(), Some(since))].into();
    if let Err(e) = conn.hello(&r.org, &r.project, &client_id, cursors).await {
        return Err(fail("forbidden", e.to_string(), None));
    }
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            m = conn.recv() => m,
        };
        match msg {
            Ok(ServerMessage::Ops { ops, .. }) => {
                for op in ops {
                    println!("{}", serde_json::to_string(&op).unwrap_or_default());
                }
            }
            Ok(ServerMessage::Snapshot {
                last_server_seq, ..
            }) => {
                eprintln!("{}", json!({"snapshot": last_server_seq}));
            }
            Ok(ServerMessage::Error { code, message }) => {
                return Err(fail(code.as_str(), message, None));
            }
            Ok(_) => {}
            Err(e) => return Err(fail("unavailable", e.to_string(), None)),
        }
    }
}

/// The newest `server_seq` of a namespace (0 when empty), from the HTTP API.
async fn head_of(r: &Resolved, namespace: &str) -> anyhow::Result<u64> {
    let path = format!(
        "/v1/{}/{}/{}/ops?since=0&limit=0",
        r.org, r.project, namespace
    );
    match call(r, "GET", &path, &[], None).await {
        Ok(page) => Ok(page["head"].as_u64().unwrap_or(0)),
        Err(e) => Err(e),
    }
}
