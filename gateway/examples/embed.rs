//! Embedding the gateway with hooks that decide who gets in.
//!
//! `TeamHooks` accepts a credential the server does not know — `team_<secret>`, an
//! embedder's own session token — and leaves JWTs and API keys (`usk_…`) to the
//! server; it refuses connections of blocked actors with a code, on WebSocket (before
//! the upgrade) and HTTP alike. `tests/hooks.rs` runs these hooks on a real gateway.
//!
//! Run it against a NATS server with JetStream (and a sequencer, e.g. `ultrasync dev`
//! in another terminal gives both; use its secret and NATS URL):
//!
//! ```sh
//! ULTRASYNC_JWT_SECRET=... cargo run -p ultrasync-gateway --example embed -- nats://127.0.0.1:4222
//! curl -H 'Authorization: Bearer team_s3cret' http://127.0.0.1:8080/v1/acme/web/index/ops?since=0
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ultrasync_gateway::hooks::{Connection, HeaderMap, HookError, Hooks, Identity};
use ultrasync_shared::auth::{Credential, Principal, now_secs};
use ultrasync_shared::config::Config;
use ultrasync_shared::{ErrorCode, Id};

/// The prefix of this embedder's own credentials.
pub const TEAM_PREFIX: &str = "team_";

/// Who a team credential stands for.
pub struct Member {
    pub org: String,
    pub actor: String,
    /// Scopes as in a token: `read`, `write`, `admin`.
    pub scope: String,
}

/// An embedder's identity rules.
#[derive(Default)]
pub struct TeamHooks {
    /// `team_<secret>` → member.
    pub members: HashMap<String, Member>,
    /// Actors refused at connect time, whatever their credential.
    pub blocked: HashSet<String>,
}

impl TeamHooks {
    pub fn demo() -> Self {
        let mut hooks = Self::default();
        hooks.members.insert(
            "s3cret".into(),
            Member {
                org: "acme".into(),
                actor: "alice".into(),
                scope: "read write".into(),
            },
        );
        hooks.members.insert(
            "b4nned".into(),
            Member {
                org: "acme".into(),
                actor: "mallory".into(),
                scope: "read write".into(),
            },
        );
        hooks.blocked.insert("mallory".into());
        hooks
    }
}

impl Hooks for TeamHooks {
    fn identify(&self, credential: Option<&str>, _headers: &HeaderMap) -> Identity {
        // Anything else (a JWT, an API key, nothing) is the server's to check.
        let Some(secret) = credential.and_then(|c| c.strip_prefix(TEAM_PREFIX)) else {
            return Identity::Verify;
        };
        let Some(m) = self.members.get(secret) else {
            return Identity::Refuse(HookError::unauthorized("unknown team credential"));
        };
        let (Ok(actor_id), Ok(org)) = (Id::parse("actor", &m.actor), Id::parse("org", &m.org))
        else {
            return Identity::Refuse(HookError::unauthorized("bad team member"));
        };
        let (read, write, admin) = ultrasync_shared::auth::scopes(&m.scope);
        Identity::Accept(Principal {
            actor_id,
            org,
            projects: vec!["*".into()],
            read,
            write,
            admin,
            namespaces: None,
            // A socket is closed (1008) when this passes; it reconnects with a
            // fresh credential.
            exp: now_secs() + 3600,
            credential: Credential::Embedder,
        })
    }

    fn on_connect(&self, principal: &Principal, _c: &Connection<'_>) -> Result<(), HookError> {
        if self.blocked.contains(principal.actor_id.as_str()) {
            return Err(HookError {
                code: ErrorCode::RateLimited,
                message: format!("{} is blocked for now", principal.actor_id),
            });
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ultrasync_shared::telemetry::init(false);
    let mut config = Config::load(None)?;
    if let Some(url) = std::env::args().nth(1) {
        config.nats_url = url;
    }
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(config.gateway.listen).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    ultrasync_gateway::run_with_hooks(config, listener, stop, Arc::new(TeamHooks::demo())).await
}
