//! `ultrasync apikey create|list|revoke` and `ultrasync revoke-token`: API keys and
//! token revocations in the bucket `usync-apikeys`, written with the NATS
//! credentials of the configuration (the `admin` user of `deploy/nats/users.conf`;
//! gateways may only read the bucket). Every gateway follows the bucket, so a new
//! key works and a revoked one stops working (its sockets closed with 1008) as soon
//! as the command returns.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ultrasync_shared::apikeys::{self, APIKEYS_BUCKET, NewKey};
use ultrasync_shared::auth::now_secs;
use ultrasync_shared::config::Config;

#[derive(Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it (JSON: `key`, `id`, the principal). The key is shown
    /// this once: the bucket keeps only its SHA-256. Use it as a token:
    /// `Authorization: Bearer usk_…`, `?access_token=` on WebSocket routes, `--token`.
    Create(CreateArgs),
    /// List keys (JSON): id, name, principal, created, expiry, last use (as seen by
    /// the gateways, at most a minute old). Never the keys themselves.
    List {
        /// Only this organization's keys.
        #[arg(long)]
        org: Option<String>,
    },
    /// Revoke a key by its id (from `list`) or by the key itself: refused at once by
    /// every gateway, and its open sockets closed with 1008.
    Revoke {
        /// The key's id (16 hex digits, or a unique prefix of at least 8) or the key.
        id: String,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// A label for people (shown by `list`).
    #[arg(long)]
    name: String,
    /// Organization the key belongs to.
    #[arg(long)]
    org: String,
    /// Project(s) the key may touch; repeat or comma-separate; `*` = all.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    project: Vec<String>,
    /// Space-separated scopes: read, write, admin.
    #[arg(long, default_value = "read write")]
    scope: String,
    /// Namespace allow-list (comma-separated); all when absent.
    #[arg(long, value_delimiter = ',')]
    ns: Option<Vec<String>>,
    /// Lifetime: seconds, or with a unit (30m, 12h, 7d); the key never expires
    /// without it.
    #[arg(long, value_parser = crate::parse_ttl)]
    ttl: Option<u64>,
    /// The actor id the key acts as (the `sub` of a token) [default: --name].
    #[arg(long)]
    actor: Option<String>,
}

/// `ultrasync revoke-token`.
#[derive(Args)]
pub struct RevokeTokenArgs {
    /// Refuse the token with this `jti` claim.
    #[arg(long, conflicts_with_all = ["org", "sub"], required_unless_present = "sub")]
    jti: Option<String>,
    /// With --sub: the subject's organization.
    #[arg(long, requires = "sub")]
    org: Option<String>,
    /// Refuse every token of this subject (in --org) issued until now, and those
    /// without `iat`; tokens minted afterwards work.
    #[arg(long, requires = "org")]
    sub: Option<String>,
}

async fn bucket(cfg: &Config) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let client =
        ultrasync_shared::nats::connect(cfg, "ultrasync-apikey", Duration::from_secs(10)).await?;
    let js = async_nats::jetstream::new(client);
    js.get_key_value(APIKEYS_BUCKET).await.with_context(|| {
        format!("opening the bucket {APIKEYS_BUCKET} (run `ultrasync setup` first)")
    })
}

pub async fn run(cfg: &Config, cmd: ApiKeyCommand) -> anyhow::Result<()> {
    let kv = bucket(cfg).await?;
    let out = match cmd {
        ApiKeyCommand::Create(a) => {
            let actor_id = a.actor.unwrap_or_else(|| a.name.clone());
            ultrasync_shared::Id::parse("actor", &actor_id)
                .context("--actor (default: --name) is the key's actor id")?;
            let new = NewKey {
                name: a.name,
                org: a.org,
                actor_id,
                projects: a.project,
                scope: a.scope,
                ns: a.ns,
                ttl_secs: a.ttl,
            };
            let (key, id, record) =
                apikeys::create(&kv, new, cfg.auth.max_api_keys_per_org).await?;
            eprintln!("the key is shown this once; only its hash is stored");
            let mut v = serde_json::to_value(&record)?;
            v["id"] = id.into();
            v["key"] = key.into();
            v
        }
        ApiKeyCommand::List { org } => {
            serde_json::to_value(apikeys::list(&kv, org.as_deref()).await?)?
        }
        ApiKeyCommand::Revoke { id } => serde_json::to_value(apikeys::revoke(&kv, &id).await?)?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

pub async fn revoke_token(cfg: &Config, args: RevokeTokenArgs) -> anyhow::Result<()> {
    let kv = bucket(cfg).await?;
    // No token it names outlives the longest lifetime a gateway accepts.
    let lifetime = match cfg.auth.max_token_lifetime_secs {
        0 => 100 * 365 * 86_400,
        s => s + ultrasync_shared::auth::LEEWAY_SECS,
    };
    let until = now_secs() + lifetime;
    let r = match (args.jti, args.org, args.sub) {
        (Some(jti), _, _) => apikeys::revoke_jti(&kv, &jti, until).await?,
        (None, Some(org), Some(sub)) => apikeys::revoke_sub(&kv, &org, &sub, until).await?,
        _ => anyhow::bail!("pass --jti, or --org and --sub"),
    };
    // Revocations past every token they could name go, so the bucket stays small.
    apikeys::prune_moot(&kv).await?;
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
