//! API keys and revocations (SPEC §6, issue 22): credentials for agents and services
//! that need no signing secret, and a way to end a JWT before it expires.
//!
//! Everything lives in the KV bucket `usync-apikeys`, which every gateway watches and
//! keeps in memory (no KV read per request):
//!
//! | key | value | written by |
//! | --- | --- | --- |
//! | `key.{org}.{sha256 hex}` | [`ApiKeyRecord`]: name, principal, created, expiry | `ultrasync apikey create` (admin) |
//! | `used.{org}.{sha256 hex}` | [`LastUsed`] | gateways, at most once per key per minute each |
//! | `revoked.jti.{sha256 hex of the jti}` | [`Revocation`] | `ultrasync revoke --jti` (admin) |
//! | `revoked.sub.{org}.{sub}` | [`Revocation`]: tokens issued up to `revoked_at` | `ultrasync revoke --sub` (admin) |
//!
//! A key is `usk_` and 32 random bytes in base64url (47 characters). It is shown once,
//! at creation; the bucket holds its SHA-256 only, so reading the bucket gives nobody
//! a usable key. Revoking a key deletes its record: every gateway forgets it at once
//! and closes the sockets it opened (1008).

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv};
use base64::Engine as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::auth::{AuthError, Credential, Principal, now_secs};
use crate::ids::Id;

/// The bucket of API keys, their last use and revocations.
pub const APIKEYS_BUCKET: &str = "usync-apikeys";
/// Every API key starts with this; a bearer that does not is a JWT.
pub const KEY_PREFIX: &str = "usk_";
/// Random bytes in a key.
pub const KEY_BYTES: usize = 32;
/// Length of a key: the prefix and 32 bytes in unpadded base64url.
pub const KEY_LEN: usize = KEY_PREFIX.len() + 43;
/// API keys one org may have unless configured otherwise (`auth.max_api_keys_per_org`).
pub const DEFAULT_MAX_KEYS_PER_ORG: usize = 1000;
/// `exp` of a principal whose key never expires (9999-12-31).
pub const NEVER: u64 = 253_402_300_799;
/// Largest value the bucket accepts (a record is well under 1 KiB).
const MAX_VALUE_BYTES: i32 = 16 * 1024;

/// A new random key.
pub fn generate() -> String {
    let bytes: [u8; KEY_BYTES] = rand::random();
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Whether a bearer string is meant as an API key (whether or not it is a good one).
pub fn is_api_key(bearer: &str) -> bool {
    bearer.starts_with(KEY_PREFIX)
}

/// The hex SHA-256 of a well-formed key (its name in the bucket); `None` for anything
/// that cannot be a key (length, alphabet), before any hashing.
pub fn key_hash(key: &str) -> Option<String> {
    let body = key.strip_prefix(KEY_PREFIX)?;
    if key.len() != KEY_LEN
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    Some(hex::encode(Sha256::digest(key.as_bytes())))
}

/// The short id a key is listed and revoked by: the first 16 hex digits of its hash.
pub fn short_id(hash: &str) -> &str {
    &hash[..hash.len().min(16)]
}

pub fn record_entry(org: &str, hash: &str) -> String {
    format!("key.{org}.{hash}")
}

pub fn used_entry(org: &str, hash: &str) -> String {
    format!("used.{org}.{hash}")
}

/// A JWT id may hold any character; its entry is named by its hash.
pub fn jti_entry(jti: &str) -> String {
    format!(
        "revoked.jti.{}",
        hex::encode(Sha256::digest(jti.as_bytes()))
    )
}

pub fn sub_entry(org: &str, sub: &str) -> String {
    format!("revoked.sub.{org}.{sub}")
}

/// What the bucket holds for one key: everything but the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// A label for people (`ultrasync apikey list`).
    pub name: String,
    pub org: String,
    /// The actor the key acts as (`sub` of a JWT).
    pub actor_id: String,
    /// Projects the key may touch; `"*"` = all of the org's.
    pub projects: Vec<String>,
    /// Space-separated: `read`, `write`, `admin` (as a JWT's `scope`).
    pub scope: String,
    /// Namespace allow-list; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<Vec<String>>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Seconds since the epoch; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl ApiKeyRecord {
    /// What a request carrying this key may do: the same principal a JWT with these
    /// claims gives. `hash` names the credential (sockets opened with it close when it
    /// is revoked).
    pub fn principal(&self, hash: &str) -> Result<Principal, AuthError> {
        let invalid = |e: crate::ids::IdError| AuthError::Invalid(e.to_string());
        let exp = self.expires_at.unwrap_or(NEVER);
        if exp <= now_secs() {
            return Err(AuthError::Invalid("api key expired".into()));
        }
        let (read, write, admin) = crate::auth::scopes(&self.scope);
        Ok(Principal {
            actor_id: Id::parse("actor_id", &self.actor_id).map_err(invalid)?,
            org: Id::parse("org", &self.org).map_err(invalid)?,
            projects: self.projects.clone(),
            read,
            write,
            admin,
            namespaces: self.ns.clone(),
            exp,
            credential: Credential::ApiKey {
                hash: hash.to_owned(),
            },
        })
    }
}

/// A gateway's note of a key's last use (seconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LastUsed {
    pub at: u64,
}

/// A revoked JWT id or subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// The token id (`revoked.jti.…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The org and subject (`revoked.sub.…`): tokens issued at or before `revoked_at`
    /// (and tokens without `iat`) are refused; newer ones are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub revoked_at: u64,
    /// After this no token it names can still be valid (the longest token lifetime
    /// has passed): the entry is moot and may be deleted.
    pub until: u64,
}

impl Revocation {
    pub fn is_moot(&self) -> bool {
        self.until < now_secs()
    }
}

/// The bucket (`ultrasync setup`, `ensure_layout`).
pub fn bucket_config(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: APIKEYS_BUCKET.to_owned(),
        description: "ultrasync API keys (hashes only), their last use, revoked tokens".to_owned(),
        history: 1,
        max_value_size: MAX_VALUE_BYTES,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// What `ultrasync apikey create` asks for.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub org: String,
    pub actor_id: String,
    pub projects: Vec<String>,
    pub scope: String,
    pub ns: Option<Vec<String>>,
    /// Seconds from now; never expires when absent.
    pub ttl_secs: Option<u64>,
}

/// A key as `ultrasync apikey list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub id: String,
    #[serde(flatten)]
    pub record: ApiKeyRecord,
    /// Seconds since the epoch; absent when no gateway has seen it used.
    pub last_used: Option<u64>,
}

/// Every key record of the bucket, by hash (of one org when given).
async fn records(
    kv: &kv::Store,
    org: Option<&str>,
) -> anyhow::Result<BTreeMap<String, ApiKeyRecord>> {
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("reading {APIKEYS_BUCKET}: {e}");
    let prefix = match org {
        Some(o) => format!("key.{o}."),
        None => "key.".to_owned(),
    };
    let mut names = Vec::new();
    let mut keys = kv.keys().await.map_err(|e| failed(&e))?;
    while let Some(name) = keys.next().await {
        let name = name.map_err(|e| failed(&e))?;
        if name.starts_with(&prefix) {
            names.push(name);
        }
    }
    let mut out = BTreeMap::new();
    for name in names {
        let Some(value) = kv.get(&name).await.map_err(|e| failed(&e))? else {
            continue;
        };
        if let (Some(hash), Ok(r)) = (
            name.rsplit('.').next(),
            serde_json::from_slice::<ApiKeyRecord>(&value),
        ) {
            out.insert(hash.to_owned(), r);
        }
    }
    Ok(out)
}

/// Creates a key: checks the principal as a gateway would, refuses a new key when
/// the org has `max_per_org`, stores the record under the key's hash and returns the
/// key (the only time anyone sees it) with its id.
pub async fn create(
    kv: &kv::Store,
    new: NewKey,
    max_per_org: usize,
) -> anyhow::Result<(String, String, ApiKeyRecord)> {
    let now = now_secs();
    let record = ApiKeyRecord {
        name: new.name,
        org: new.org,
        actor_id: new.actor_id,
        projects: new.projects,
        scope: new.scope,
        ns: new.ns,
        created_at: now,
        expires_at: new.ttl_secs.map(|t| now + t),
    };
    record.principal("").map_err(|e| anyhow::anyhow!("{e}"))?;
    let (read, _, _) = crate::auth::scopes(&record.scope);
    if !read {
        anyhow::bail!("--scope must grant read, write or admin");
    }
    let have = records(kv, Some(&record.org)).await?.len();
    if have >= max_per_org {
        anyhow::bail!(
            "org {} has {have} API keys; at most {max_per_org} (auth.max_api_keys_per_org): revoke some first",
            record.org
        );
    }
    let key = generate();
    let hash = key_hash(&key).ok_or_else(|| anyhow::anyhow!("a generated key is malformed"))?;
    kv.create(
        record_entry(&record.org, &hash),
        serde_json::to_vec(&record)?.into(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("storing the key: {e}"))?;
    Ok((key, short_id(&hash).to_owned(), record))
}

/// The keys of the bucket (of one org when given), with their last use.
pub async fn list(kv: &kv::Store, org: Option<&str>) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    for (hash, record) in records(kv, org).await? {
        let last_used = kv
            .get(used_entry(&record.org, &hash))
            .await
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice::<LastUsed>(&v).ok())
            .map(|u| u.at);
        out.push(Listed {
            id: short_id(&hash).to_owned(),
            record,
            last_used,
        });
    }
    Ok(out)
}

/// Revokes a key named by its id (from `list`) or by the key itself: its record and
/// last use are deleted, which every gateway sees at once.
pub async fn revoke(kv: &kv::Store, id_or_key: &str) -> anyhow::Result<Listed> {
    let wanted = key_hash(id_or_key).unwrap_or_else(|| id_or_key.to_ascii_lowercase());
    if wanted.len() < 8 || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
        anyhow::bail!("not a key id (16 hex digits from `ultrasync apikey list`) nor a key");
    }
    let all = records(kv, None).await?;
    let mut found = all.iter().filter(|(h, _)| h.starts_with(&wanted));
    let (Some((hash, record)), None) = (found.next(), found.next()) else {
        anyhow::bail!("no single API key has the id {id_or_key:?}");
    };
    kv.purge(record_entry(&record.org, hash))
        .await
        .map_err(|e| anyhow::anyhow!("revoking the key: {e}"))?;
    let _ = kv.purge(used_entry(&record.org, hash)).await;
    Ok(Listed {
        id: short_id(hash).to_owned(),
        record: record.clone(),
        last_used: None,
    })
}

/// Deletes revocations that no longer name a valid token ([`Revocation::is_moot`]),
/// so that the bucket, and every gateway's copy, holds only those still needed.
/// Returns how many went.
pub async fn prune_moot(kv: &kv::Store) -> anyhow::Result<usize> {
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("reading {APIKEYS_BUCKET}: {e}");
    let mut names = Vec::new();
    let mut keys = kv.keys().await.map_err(|e| failed(&e))?;
    while let Some(name) = keys.next().await {
        let name = name.map_err(|e| failed(&e))?;
        if name.starts_with("revoked.") {
            names.push(name);
        }
    }
    let mut pruned = 0;
    for name in names {
        let moot = kv
            .get(&name)
            .await
            .map_err(|e| failed(&e))?
            .and_then(|v| serde_json::from_slice::<Revocation>(&v).ok())
            .is_some_and(|r| r.is_moot());
        if moot {
            kv.purge(&name)
                .await
                .map_err(|e| anyhow::anyhow!("deleting {name}: {e}"))?;
            pruned += 1;
        }
    }
    Ok(pruned)
}

/// Refuses the JWT with this `jti` until `until` (seconds since the epoch).
pub async fn revoke_jti(kv: &kv::Store, jti: &str, until: u64) -> anyhow::Result<Revocation> {
    if jti.is_empty() || jti.len() > 1024 {
        anyhow::bail!("a jti is 1 to 1024 bytes");
    }
    let r = Revocation {
        jti: Some(jti.to_owned()),
        org: None,
        sub: None,
        revoked_at: now_secs(),
        until,
    };
    kv.put(jti_entry(jti), serde_json::to_vec(&r)?.into())
        .await
        .map_err(|e| anyhow::anyhow!("storing the revocation: {e}"))?;
    Ok(r)
}

/// Refuses every JWT of `sub` in `org` issued until now (and every one without
/// `iat`), until `until`.
pub async fn revoke_sub(
    kv: &kv::Store,
    org: &str,
    sub: &str,
    until: u64,
) -> anyhow::Result<Revocation> {
    Id::parse("org", org)?;
    Id::parse("sub", sub)?;
    let r = Revocation {
        jti: None,
        org: Some(org.to_owned()),
        sub: Some(sub.to_owned()),
        revoked_at: now_secs(),
        until,
    };
    kv.put(sub_entry(org, sub), serde_json::to_vec(&r)?.into())
        .await
        .map_err(|e| anyhow::anyhow!("storing the revocation: {e}"))?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_well_formed_and_hashed() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_LEN);
        let h = key_hash(&a).expect("well formed");
        assert_eq!(h.len(), 64);
        assert!(!h.contains(&a[KEY_PREFIX.len()..]));
        assert_eq!(key_hash(&a), Some(h));
        for bad in [
            "usk_",
            "usk_short",
            &format!("{a}x"),
            &format!("{}!", &a[..a.len() - 1]),
            &format!("usk_{}", "é".repeat(21)),
            "eyJhbGciOiJIUzI1NiJ9.e30.x",
        ] {
            assert_eq!(key_hash(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_record_gives_the_principal_a_token_would() {
        let r = ApiKeyRecord {
            name: "ci".into(),
            org: "acme".into(),
            actor_id: "bot".into(),
            projects: vec!["web".into()],
            scope: "write".into(),
            ns: Some(vec!["index".into()]),
            created_at: now_secs(),
            expires_at: None,
        };
        let p = r.principal("ab").expect("principal");
        assert!(p.read && p.write && !p.admin);
        assert!(p.allows_project("web") && !p.allows_project("api"));
        assert!(p.allows_namespace("index") && !p.allows_namespace("other"));
        assert_eq!(p.exp, NEVER);
        assert_eq!(p.credential, Credential::ApiKey { hash: "ab".into() });
        let expired = ApiKeyRecord {
            expires_at: Some(now_secs() - 1),
            ..r.clone()
        };
        assert!(expired.principal("ab").is_err());
        let bad_org = ApiKeyRecord {
            org: "a.b".into(),
            ..r
        };
        assert!(bad_org.principal("ab").is_err());
    }

    #[test]
    fn entries_are_valid_kv_keys() {
        let jti = jti_entry("any thing/with * and > in it");
        assert!(jti.starts_with("revoked.jti.") && jti.len() == 12 + 64);
        assert_eq!(sub_entry("acme", "u1"), "revoked.sub.acme.u1");
        assert_eq!(record_entry("acme", "ff"), "key.acme.ff");
    }
}
