//! JWT auth (SPEC §6): HS256 with a pinned algorithm, required `exp`, audience
//! checked, issuer checked when configured. `alg: none` and algorithm confusion are
//! refused because only the configured algorithm is accepted.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::ids::Id;

/// The smallest HS256 secret accepted outside tests.
pub const MIN_SECRET_LEN: usize = 32;
/// The audience tokens carry unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "ultrasync";

/// Token claims.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The actor id.
    pub sub: String,
    pub org: String,
    /// Projects this token may touch; `"*"` = all of the org's.
    pub projects: Vec<String>,
    /// Space-separated: `read`, `write`, `admin`.
    pub scope: String,
    pub exp: u64,
    pub aud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Optional namespace allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<Vec<String>>,
}

/// What a token grants, after verification.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub actor_id: Id,
    pub org: Id,
    pub projects: Vec<String>,
    pub read: bool,
    pub write: bool,
    pub admin: bool,
    pub namespaces: Option<Vec<String>>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

impl Principal {
    pub fn allows_project(&self, project: &str) -> bool {
        self.projects.iter().any(|p| p == "*" || p == project)
    }

    pub fn allows_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n == "*" || n == namespace))
    }

    /// Seconds until the token expires (0 when already expired).
    pub fn expires_in(&self) -> u64 {
        self.exp.saturating_sub(now_secs())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies tokens with one pinned algorithm and key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// An HS256 verifier. `issuer` is checked when given.
    pub fn hs256(secret: &[u8], audience: &str, issuer: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = 5;
        validation.validate_exp = true;
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        }
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        let actor_id = Id::parse("sub", &c.sub).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let org = Id::parse("org", &c.org).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let scopes: Vec<&str> = c.scope.split_whitespace().collect();
        let admin = scopes.contains(&"admin");
        let write = admin || scopes.contains(&"write");
        let read = write || scopes.contains(&"read");
        Ok(Principal {
            actor_id,
            org,
            projects: c.projects,
            read,
            write,
            admin,
            namespaces: c.ns,
            exp: c.exp,
        })
    }
}

/// Signs claims with an HS256 secret.
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
}

/// Claims for a token valid `ttl_secs` from now.
pub fn claims(
    sub: &str,
    org: &str,
    projects: &[&str],
    scope: &str,
    ttl_secs: u64,
    audience: &str,
) -> Claims {
    let now = now_secs();
    Claims {
        sub: sub.to_owned(),
        org: org.to_owned(),
        projects: projects.iter().map(|p| (*p).to_owned()).collect(),
        scope: scope.to_owned(),
        exp: now + ttl_secs,
        aud: audience.to_owned(),
        iss: None,
        iat: Some(now),
        ns: None,
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    #[test]
    fn valid_token_grants_scopes() {
        let t = mint_hs256(
            SECRET,
            &claims("u1", "acme", &["web"], "write", 60, "ultrasync"),
        )
        .expect("mint");
        let p = Verifier::hs256(SECRET, "ultrasync", None)
            .verify(&t)
            .expect("verify");
        assert_eq!(p.actor_id.as_str(), "u1");
        assert!(p.read && p.write && !p.admin);
        assert!(p.allows_project("web") && !p.allows_project("other"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let v = Verifier::hs256(SECRET, "ultrasync", Some("issuer-a"));
        let mut c = claims("u1", "acme", &["*"], "read", 60, "ultrasync");
        // Missing issuer when one is configured.
        assert!(v.verify(&mint_hs256(SECRET, &c).expect("mint")).is_err());
        c.iss = Some("issuer-a".into());
        assert!(v.verify(&mint_hs256(SECRET, &c).expect("mint")).is_ok());
        // Wrong secret.
        assert!(
            v.verify(&mint_hs256(b"another-secret-another-secret-xx", &c).expect("mint"))
                .is_err()
        );
        // Expired.
        let mut old = c.clone();
        old.exp = now_secs() - 3600;
        assert!(v.verify(&mint_hs256(SECRET, &old).expect("mint")).is_err());
        // Wrong audience.
        let mut aud = c.clone();
        aud.aud = "someone-else".into();
        assert!(v.verify(&mint_hs256(SECRET, &aud).expect("mint")).is_err());
        // Bad subject id.
        let mut sub = c.clone();
        sub.sub = "a.b".into();
        assert!(v.verify(&mint_hs256(SECRET, &sub).expect("mint")).is_err());
    }
}
