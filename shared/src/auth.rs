//! JWT auth (SPEC §6). HS256 from a shared secret by default; RS256 or EdDSA from a
//! public key file, or from a JWKS file whose keys are chosen by `kid`. Every key is
//! pinned to one algorithm, and a token is checked against that algorithm only: `alg:
//! none`, another HMAC variant, or an HS256 token signed with the public key bytes
//! (algorithm confusion) are refused. `exp` is required, `nbf` checked when present,
//! the audience must be among the token's (`aud` is a string or an array), the issuer
//! is checked when configured, and a token may not live longer than the configured
//! maximum.

use std::path::Path;

use anyhow::Context as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;
use crate::ids::Id;

/// The smallest HS256 secret accepted outside tests.
pub const MIN_SECRET_LEN: usize = 32;
/// The audience tokens carry unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "ultrasync";
/// Longest token lifetime accepted unless configured otherwise (30 days).
pub const DEFAULT_MAX_TOKEN_LIFETIME_SECS: u64 = 30 * 86_400;
/// Clock skew tolerated on `exp`, `nbf` and the lifetime, in seconds.
pub const LEEWAY_SECS: u64 = 5;
/// The smallest RSA modulus accepted for RS256.
pub const MIN_RSA_BITS: usize = 2048;
/// What a client is told when its token is refused; the reason goes to the logs only.
pub const GENERIC_REFUSAL: &str = "invalid or expired token";

/// The signature algorithms a deployment may configure (`auth.algorithm`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with `auth.jwt_secret`.
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, verified with an RSA public key.
    #[serde(rename = "RS256")]
    Rs256,
    /// Ed25519, verified with an Ed25519 public key.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl TokenAlgorithm {
    pub fn jwt(self) -> Algorithm {
        match self {
            Self::Hs256 => Algorithm::HS256,
            Self::Rs256 => Algorithm::RS256,
            Self::EdDsa => Algorithm::EdDSA,
        }
    }
}

impl std::fmt::Display for TokenAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::EdDsa => "EdDSA",
        })
    }
}

/// The `aud` claim: one audience, or several (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, audience: &str) -> bool {
        match self {
            Self::One(a) => a == audience,
            Self::Many(list) => list.iter().any(|a| a == audience),
        }
    }
}

impl From<&str> for Audience {
    fn from(a: &str) -> Self {
        Self::One(a.to_owned())
    }
}

impl From<String> for Audience {
    fn from(a: String) -> Self {
        Self::One(a)
    }
}

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
    pub aud: Audience,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Optional namespace allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<Vec<String>>,
    /// Token id: a token can be revoked by it (`ultrasync revoke --jti`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
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
    /// What the caller presented: revoking it ends the sockets it opened.
    pub credential: Credential,
}

/// The credential a principal came from.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Credential {
    /// A JWT, with its `jti` and `iat` when it has them (revocation by id, or of a
    /// subject's tokens issued up to a time).
    Jwt {
        jti: Option<String>,
        iat: Option<u64>,
    },
    /// An API key, named by the hex SHA-256 of the key.
    ApiKey { hash: String },
    /// Vouched for by an embedder's hook; the server cannot revoke it.
    #[default]
    Embedder,
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

/// Why a token was refused. `Display` gives the detailed reason, for logs;
/// [`AuthError::client_message`] is what a client may be told.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// A message for the client that reveals nothing about why the token failed
    /// (which key, which claim, which library error).
    pub fn client_message(&self) -> &'static str {
        match self {
            Self::Missing => "missing bearer token",
            Self::Invalid(_) => GENERIC_REFUSAL,
        }
    }
}

fn invalid(reason: impl std::fmt::Display) -> AuthError {
    AuthError::Invalid(reason.to_string())
}

/// One verification key, pinned to the one algorithm it may verify.
#[derive(Clone)]
struct PinnedKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    /// The checks, with `algorithms` = this key's algorithm alone.
    validation: Validation,
}

/// Verifies tokens: each key pinned to one algorithm, claims checked (see the module
/// documentation).
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<PinnedKey>,
    /// True for a JWKS: keys are chosen by the token's `kid`.
    by_kid: bool,
    audience: String,
    issuer: Option<String>,
    /// 0 = unlimited.
    max_lifetime_secs: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "algorithms",
                &self.keys.iter().map(|k| k.algorithm).collect::<Vec<_>>(),
            )
            .field("by_kid", &self.by_kid)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// An HS256 verifier. `issuer` is checked when given.
    pub fn hs256(secret: &[u8], audience: &str, issuer: Option<&str>) -> Self {
        let mut v = Self::empty(audience, issuer, false);
        v.push(None, Algorithm::HS256, DecodingKey::from_secret(secret));
        v
    }

    /// An RS256 or EdDSA verifier from a PEM public key (`PUBLIC KEY`, or `RSA PUBLIC
    /// KEY` for RS256). HS256 has no public key: use [`Verifier::hs256`].
    pub fn public_key_pem(
        algorithm: TokenAlgorithm,
        pem: &str,
        audience: &str,
        issuer: Option<&str>,
    ) -> anyhow::Result<Self> {
        let key = match algorithm {
            TokenAlgorithm::Rs256 => rsa_key_from_pem(pem)?,
            TokenAlgorithm::EdDsa => ed25519_key_from_pem(pem)?,
            TokenAlgorithm::Hs256 => {
                anyhow::bail!("HS256 is verified with a secret, not a public key")
            }
        };
        let mut v = Self::empty(audience, issuer, false);
        v.push(None, algorithm.jwt(), key);
        Ok(v)
    }

    /// A verifier from a JWKS document (`{"keys": [...]}`). Each usable key is pinned
    /// to the algorithm its type implies: RSA → RS256, OKP/Ed25519 → EdDSA; a key
    /// whose `alg` says otherwise, an encryption key, a symmetric (`oct`) key or
    /// another curve is skipped with a warning. `only`, when given, keeps just the keys
    /// of that algorithm. Tokens name their key with `kid`; a token without one is
    /// accepted only when the set has a single usable key.
    pub fn jwks(
        json: &str,
        only: Option<TokenAlgorithm>,
        audience: &str,
        issuer: Option<&str>,
    ) -> anyhow::Result<Self> {
        let set: JwkSet = serde_json::from_str(json).context("not a JWKS document")?;
        let mut v = Self::empty(audience, issuer, true);
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk.common.key_id.clone();
            let name = kid.clone().unwrap_or_else(|| format!("#{i}"));
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                tracing::warn!(key = %name, "jwks: skipping an encryption key");
                continue;
            }
            let declared = jwk.common.key_algorithm;
            let pinned = match &jwk.algorithm {
                AlgorithmParameters::RSA(p) => {
                    if declared.is_some_and(|a| a != KeyAlgorithm::RS256) {
                        None
                    } else {
                        let n = base64_url(&p.n).with_context(|| format!("jwks key {name}: n"))?;
                        let e = base64_url(&p.e).with_context(|| format!("jwks key {name}: e"))?;
                        let bits = significant_bits(&n);
                        if bits < MIN_RSA_BITS {
                            anyhow::bail!(
                                "jwks key {name}: RSA key of {bits} bits; at least {MIN_RSA_BITS} required"
                            );
                        }
                        Some((
                            TokenAlgorithm::Rs256,
                            DecodingKey::from_rsa_raw_components(&n, &e),
                        ))
                    }
                }
                AlgorithmParameters::OctetKeyPair(p)
                    if p.curve == EllipticCurve::Ed25519
                        && declared.is_none_or(|a| a == KeyAlgorithm::EdDSA) =>
                {
                    let x = base64_url(&p.x).with_context(|| format!("jwks key {name}: x"))?;
                    let x: [u8; 32] = x.try_into().map_err(|_| {
                        anyhow::anyhow!("jwks key {name}: an Ed25519 key is 32 bytes")
                    })?;
                    ed25519_dalek::VerifyingKey::from_bytes(&x)
                        .map_err(|e| anyhow::anyhow!("jwks key {name}: {e}"))?;
                    Some((TokenAlgorithm::EdDsa, DecodingKey::from_ed_der(&x)))
                }
                _ => None,
            };
            let Some((algorithm, key)) = pinned else {
                tracing::warn!(key = %name, alg = ?declared, "jwks: skipping a key that is not RS256 or EdDSA");
                continue;
            };
            if only.is_some_and(|o| o != algorithm) {
                tracing::warn!(key = %name, %algorithm, "jwks: skipping a key of another algorithm than auth.algorithm");
                continue;
            }
            if kid.is_some() && v.keys.iter().any(|k| k.kid == kid) {
                anyhow::bail!("jwks: two keys with kid {name:?}");
            }
            v.push(kid, algorithm.jwt(), key);
        }
        if v.keys.is_empty() {
            anyhow::bail!("jwks: no usable RS256 or EdDSA verification key");
        }
        Ok(v)
    }

    /// The verifier a deployment's `[auth]` section describes: a JWKS file, a public
    /// key file, or the HS256 secret; with its maximum token lifetime.
    pub fn from_config(cfg: &AuthConfig) -> anyhow::Result<Self> {
        let audience = cfg.audience.as_str();
        let issuer = cfg.issuer.as_deref();
        let verifier = if let Some(path) = &cfg.jwks_file {
            let only = (cfg.algorithm != TokenAlgorithm::Hs256).then_some(cfg.algorithm);
            Self::jwks(&read_key_file(path)?, only, audience, issuer)
                .with_context(|| format!("auth.jwks_file {}", path.display()))?
        } else if let Some(path) = &cfg.public_key_file {
            Self::public_key_pem(cfg.algorithm, &read_key_file(path)?, audience, issuer)
                .with_context(|| format!("auth.public_key_file {}", path.display()))?
        } else if cfg.algorithm == TokenAlgorithm::Hs256 {
            Self::hs256(&cfg.secret()?, audience, issuer)
        } else {
            anyhow::bail!(
                "auth.algorithm = {:?} needs auth.public_key_file or auth.jwks_file",
                cfg.algorithm.to_string()
            );
        };
        Ok(verifier.with_max_lifetime(cfg.max_token_lifetime_secs))
    }

    /// Refuses tokens whose lifetime (`exp - iat`, or `exp - now` without `iat`) is
    /// longer than `secs`; 0 = unlimited.
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime_secs = secs;
        self
    }

    fn empty(audience: &str, issuer: Option<&str>, by_kid: bool) -> Self {
        Self {
            keys: Vec::new(),
            by_kid,
            audience: audience.to_owned(),
            issuer: issuer.map(str::to_owned),
            max_lifetime_secs: DEFAULT_MAX_TOKEN_LIFETIME_SECS,
        }
    }

    fn push(&mut self, kid: Option<String>, algorithm: Algorithm, key: DecodingKey) {
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_audience(&[&self.audience]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        }
        self.keys.push(PinnedKey {
            kid,
            algorithm,
            key,
            validation,
        });
    }

    /// The key this token must be verified with.
    fn key_for(&self, header: &Header) -> Result<&PinnedKey, AuthError> {
        let key = match (&header.kid, self.by_kid) {
            (Some(kid), true) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str()))
                .ok_or_else(|| invalid(format!("unknown kid {kid:?}")))?,
            (None, true) if self.keys.len() > 1 => {
                return Err(invalid("token has no kid and the key set has several keys"));
            }
            _ => self
                .keys
                .first()
                .ok_or_else(|| invalid("no verification key"))?,
        };
        if header.alg != key.algorithm {
            return Err(invalid(format!(
                "algorithm {:?} refused: this key verifies {:?} only",
                header.alg, key.algorithm
            )));
        }
        Ok(key)
    }

    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        // `alg: none` and unknown algorithms fail here: they are not `Algorithm`s.
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let key = self.key_for(&header)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation).map_err(invalid)?;
        let c = data.claims;
        // The library checks the audience too; this keeps the rule visible here.
        if !c.aud.contains(&self.audience) {
            return Err(invalid("audience not accepted"));
        }
        if self.max_lifetime_secs > 0 {
            let now = now_secs();
            let start = c.iat.map_or(now, |iat| iat.min(now));
            let lifetime = c.exp.saturating_sub(start);
            if lifetime > self.max_lifetime_secs + LEEWAY_SECS {
                return Err(invalid(format!(
                    "lifetime {lifetime} s is over the maximum of {} s",
                    self.max_lifetime_secs
                )));
            }
        }
        let actor_id = Id::parse("sub", &c.sub).map_err(invalid)?;
        let org = Id::parse("org", &c.org).map_err(invalid)?;
        let (read, write, admin) = scopes(&c.scope);
        Ok(Principal {
            actor_id,
            org,
            projects: c.projects,
            read,
            write,
            admin,
            namespaces: c.ns,
            exp: c.exp,
            credential: Credential::Jwt {
                jti: c.jti,
                iat: c.iat,
            },
        })
    }
}

/// `(read, write, admin)` of a space-separated scope: `admin` implies `write`, which
/// implies `read`.
pub fn scopes(scope: &str) -> (bool, bool, bool) {
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let admin = scopes.contains(&"admin");
    let write = admin || scopes.contains(&"write");
    let read = write || scopes.contains(&"read");
    (read, write, admin)
}

fn read_key_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn base64_url(s: &str) -> anyhow::Result<Vec<u8>> {
    use base64::Engine as _;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('='))?)
}

/// Bits of a big-endian unsigned integer, leading zeros not counted.
fn significant_bits(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        Some(i) => (be.len() - i) * 8 - be[i].leading_zeros() as usize,
        None => 0,
    }
}

/// An RSA public key from PEM: SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`).
fn rsa_key_from_pem(pem: &str) -> anyhow::Result<DecodingKey> {
    use rsa::pkcs1::DecodeRsaPublicKey as _;
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let pem = pem.trim();
    let key = rsa::RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(|e| anyhow::anyhow!("not an RSA public key in PEM ({e})"))?;
    let bits = significant_bits(&key.n().to_bytes_be());
    if bits < MIN_RSA_BITS {
        anyhow::bail!("RSA key of {bits} bits; at least {MIN_RSA_BITS} required");
    }
    Ok(DecodingKey::from_rsa_raw_components(
        &key.n().to_bytes_be(),
        &key.e().to_bytes_be(),
    ))
}

/// An Ed25519 public key from PEM (SPKI, `PUBLIC KEY`).
fn ed25519_key_from_pem(pem: &str) -> anyhow::Result<DecodingKey> {
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    let key = ed25519_dalek::VerifyingKey::from_public_key_pem(pem.trim())
        .map_err(|e| anyhow::anyhow!("not an Ed25519 public key in PEM ({e})"))?;
    // jsonwebtoken's EdDSA verifier takes the raw 32 bytes.
    Ok(DecodingKey::from_ed_der(key.as_bytes()))
}

/// Signs claims with an HS256 secret.
pub fn mint_hs256(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
}

/// Signs claims with any key, naming it `kid` in the header when given (issuers of
/// RS256/EdDSA tokens and tests).
pub fn mint(
    algorithm: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    claims: &Claims,
) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key)
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
        aud: audience.into(),
        iss: None,
        iat: Some(now),
        nbf: None,
        ns: None,
        jti: None,
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
    use std::sync::OnceLock;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::LineEnding;
    use rsa::traits::PublicKeyParts as _;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn good() -> Claims {
        claims("u1", "acme", &["*"], "read", 60, "ultrasync")
    }

    /// One RSA key for every test (generating one takes a while).
    fn rsa_key() -> &'static rsa::RsaPrivateKey {
        static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
        KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa"))
    }

    fn rsa_encoding() -> EncodingKey {
        EncodingKey::from_rsa_der(rsa_key().to_pkcs1_der().expect("der").as_bytes())
    }

    fn rsa_public_pem() -> String {
        rsa_key()
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem")
    }

    fn ed_key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn ed_encoding(key: &ed25519_dalek::SigningKey) -> EncodingKey {
        EncodingKey::from_ed_der(key.to_pkcs8_der().expect("der").as_bytes())
    }

    fn ed_public_pem(key: &ed25519_dalek::SigningKey) -> String {
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem")
    }

    /// A token with `header` and `claims` as given, signed with nothing.
    fn unsigned(header: &str, claims: &Claims) -> String {
        let h = URL_SAFE_NO_PAD.encode(header);
        let b = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("json"));
        format!("{h}.{b}.")
    }

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
        let mut c = good();
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
        // Another HMAC algorithm with the same secret.
        let hs512 = mint(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET),
            None,
            &c,
        )
        .expect("mint");
        assert!(v.verify(&hs512).is_err());
    }

    #[test]
    fn nbf_is_checked_with_the_leeway() {
        let v = Verifier::hs256(SECRET, "ultrasync", None);
        let mut c = good();
        c.nbf = Some(now_secs() + 600);
        let err = v
            .verify(&mint_hs256(SECRET, &c).expect("mint"))
            .expect_err("not yet valid");
        assert!(err.to_string().contains("Immature"), "{err}");
        c.nbf = Some(now_secs() + 2); // within the leeway
        v.verify(&mint_hs256(SECRET, &c).expect("mint"))
            .expect("nbf within the leeway");
        c.nbf = Some(now_secs() - 10);
        v.verify(&mint_hs256(SECRET, &c).expect("mint"))
            .expect("nbf in the past");
    }

    #[test]
    fn lifetime_is_bounded() {
        let v = Verifier::hs256(SECRET, "ultrasync", None).with_max_lifetime(3600);
        let now = now_secs();
        let ok = claims("u1", "acme", &["*"], "read", 3600, "ultrasync");
        v.verify(&mint_hs256(SECRET, &ok).expect("mint"))
            .expect("exactly the maximum");
        let long = claims("u1", "acme", &["*"], "read", 7200, "ultrasync");
        let err = v
            .verify(&mint_hs256(SECRET, &long).expect("mint"))
            .expect_err("too long");
        assert!(err.to_string().contains("lifetime"), "{err}");
        // Counted from iat: issued long ago, expiring soon, but 2 days long.
        let mut old = ok.clone();
        old.iat = Some(now - 2 * 86_400);
        old.exp = now + 60;
        assert!(v.verify(&mint_hs256(SECRET, &old).expect("mint")).is_err());
        // Without iat, from now.
        let mut no_iat = long.clone();
        no_iat.iat = None;
        assert!(
            v.verify(&mint_hs256(SECRET, &no_iat).expect("mint"))
                .is_err()
        );
        no_iat.exp = now + 600;
        v.verify(&mint_hs256(SECRET, &no_iat).expect("mint"))
            .expect("short, no iat");
        // An iat in the future does not stretch the limit.
        let mut future = ok.clone();
        future.iat = Some(now + 86_400);
        future.exp = now + 86_400 + 3000;
        assert!(
            v.verify(&mint_hs256(SECRET, &future).expect("mint"))
                .is_err()
        );
        // 0 = unlimited.
        Verifier::hs256(SECRET, "ultrasync", None)
            .with_max_lifetime(0)
            .verify(&mint_hs256(SECRET, &long).expect("mint"))
            .expect("unlimited");
        // The default is 30 days.
        let year = claims("u1", "acme", &["*"], "read", 365 * 86_400, "ultrasync");
        assert!(
            Verifier::hs256(SECRET, "ultrasync", None)
                .verify(&mint_hs256(SECRET, &year).expect("mint"))
                .is_err()
        );
    }

    #[test]
    fn audience_may_be_an_array() {
        let v = Verifier::hs256(SECRET, "ultrasync", None);
        let mut c = good();
        c.aud = Audience::Many(vec!["other".into(), "ultrasync".into()]);
        let t = mint_hs256(SECRET, &c).expect("mint");
        // It is on the wire as a JSON array.
        let payload = t.split('.').nth(1).expect("payload");
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("b64")).expect("json");
        assert!(json["aud"].is_array());
        v.verify(&t).expect("our audience is among them");
        c.aud = Audience::Many(vec!["other".into(), "another".into()]);
        assert!(v.verify(&mint_hs256(SECRET, &c).expect("mint")).is_err());
        c.aud = Audience::Many(Vec::new());
        assert!(v.verify(&mint_hs256(SECRET, &c).expect("mint")).is_err());
    }

    #[test]
    fn rs256_from_a_public_key_pem() {
        let v =
            Verifier::public_key_pem(TokenAlgorithm::Rs256, &rsa_public_pem(), "ultrasync", None)
                .expect("verifier");
        let t = mint(Algorithm::RS256, &rsa_encoding(), None, &good()).expect("mint");
        assert_eq!(v.verify(&t).expect("verify").actor_id.as_str(), "u1");
        // The PKCS#1 form of the same key works too.
        let pkcs1 = {
            use rsa::pkcs1::EncodeRsaPublicKey as _;
            rsa_key()
                .to_public_key()
                .to_pkcs1_pem(LineEnding::LF)
                .expect("pem")
        };
        Verifier::public_key_pem(TokenAlgorithm::Rs256, &pkcs1, "ultrasync", None)
            .expect("pkcs1")
            .verify(&t)
            .expect("verify");
        // Claims are checked as with HS256.
        let mut expired = good();
        expired.exp = now_secs() - 3600;
        let t = mint(Algorithm::RS256, &rsa_encoding(), None, &expired).expect("mint");
        assert!(v.verify(&t).is_err());
        // Another RSA algorithm with the same key is refused: the key is pinned.
        let rs512 = mint(Algorithm::RS512, &rsa_encoding(), None, &good()).expect("mint");
        assert!(v.verify(&rs512).is_err());
        // Not an RSA key.
        assert!(
            Verifier::public_key_pem(
                TokenAlgorithm::Rs256,
                &ed_public_pem(&ed_key(1)),
                "ultrasync",
                None
            )
            .is_err()
        );
        assert!(
            Verifier::public_key_pem(TokenAlgorithm::Rs256, "junk", "ultrasync", None).is_err()
        );
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        let small = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).expect("rsa");
        let pem = small
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        let err = Verifier::public_key_pem(TokenAlgorithm::Rs256, &pem, "ultrasync", None)
            .expect_err("1024 bits");
        assert!(err.to_string().contains("2048"), "{err}");
    }

    #[test]
    fn eddsa_from_a_public_key_pem() {
        let key = ed_key(7);
        let v = Verifier::public_key_pem(
            TokenAlgorithm::EdDsa,
            &ed_public_pem(&key),
            "ultrasync",
            None,
        )
        .expect("verifier");
        let t = mint(Algorithm::EdDSA, &ed_encoding(&key), None, &good()).expect("mint");
        v.verify(&t).expect("verify");
        // Signed by another key.
        let other = mint(Algorithm::EdDSA, &ed_encoding(&ed_key(8)), None, &good()).expect("mint");
        assert!(v.verify(&other).is_err());
        // A tampered payload.
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut admin = good();
        admin.scope = "admin".into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&admin).expect("json"));
        assert!(v.verify(&parts.join(".")).is_err());
        // An RSA key is not an Ed25519 key.
        assert!(
            Verifier::public_key_pem(TokenAlgorithm::EdDsa, &rsa_public_pem(), "ultrasync", None)
                .is_err()
        );
    }

    #[test]
    fn algorithm_confusion_and_none_are_refused() {
        let pem = rsa_public_pem();
        let rs = Verifier::public_key_pem(TokenAlgorithm::Rs256, &pem, "ultrasync", None)
            .expect("verifier");
        // HS256 "signed" with the public key bytes (the PEM text, and the DER).
        let with_pem = mint_hs256(pem.as_bytes(), &good()).expect("mint");
        let err = rs.verify(&with_pem).expect_err("confusion");
        assert!(err.to_string().contains("HS256"), "{err}");
        let der = rsa_key().to_public_key().to_public_key_der().expect("der");
        assert!(
            rs.verify(&mint_hs256(der.as_bytes(), &good()).expect("mint"))
                .is_err()
        );
        let n = rsa_key().to_public_key().n().to_bytes_be();
        assert!(rs.verify(&mint_hs256(&n, &good()).expect("mint")).is_err());
        // The same against an EdDSA verifier.
        let ed = ed_key(3);
        let ed_pem = ed_public_pem(&ed);
        let ev = Verifier::public_key_pem(TokenAlgorithm::EdDsa, &ed_pem, "ultrasync", None)
            .expect("verifier");
        assert!(
            ev.verify(&mint_hs256(ed_pem.as_bytes(), &good()).expect("mint"))
                .is_err()
        );
        assert!(
            ev.verify(&mint_hs256(ed.verifying_key().as_bytes(), &good()).expect("mint"))
                .is_err()
        );
        // An RS256 token against the EdDSA verifier and the reverse.
        let rs_token = mint(Algorithm::RS256, &rsa_encoding(), None, &good()).expect("mint");
        assert!(ev.verify(&rs_token).is_err());
        let ed_token = mint(Algorithm::EdDSA, &ed_encoding(&ed), None, &good()).expect("mint");
        assert!(rs.verify(&ed_token).is_err());
        // alg: none (and variants), unsigned, against every kind of verifier.
        let hs = Verifier::hs256(SECRET, "ultrasync", None);
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"None","typ":"JWT"}"#,
            r#"{"alg":"NONE"}"#,
            r#"{"typ":"JWT"}"#,
        ] {
            let t = unsigned(header, &good());
            assert!(hs.verify(&t).is_err(), "{header}");
            assert!(rs.verify(&t).is_err(), "{header}");
            assert!(ev.verify(&t).is_err(), "{header}");
        }
        // A real header with the signature cut off.
        let t = mint_hs256(SECRET, &good()).expect("mint");
        let cut = format!("{}.", t.rsplit_once('.').expect("dot").0);
        assert!(hs.verify(&cut).is_err());
    }

    fn jwks_json() -> String {
        let pk = rsa_key().to_public_key();
        serde_json::json!({
            "keys": [
                {
                    "kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
                    "n": URL_SAFE_NO_PAD.encode(pk.n().to_bytes_be()),
                    "e": URL_SAFE_NO_PAD.encode(pk.e().to_bytes_be()),
                },
                {
                    "kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
                    "x": URL_SAFE_NO_PAD.encode(ed_key(1).verifying_key().as_bytes()),
                },
                {
                    "kty": "OKP", "crv": "Ed25519", "kid": "ed-2", "alg": "EdDSA",
                    "x": URL_SAFE_NO_PAD.encode(ed_key(2).verifying_key().as_bytes()),
                },
                // Skipped: a symmetric key, an encryption key, an RSA key for RS512.
                { "kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(SECRET) },
                {
                    "kty": "RSA", "kid": "enc", "use": "enc",
                    "n": URL_SAFE_NO_PAD.encode(pk.n().to_bytes_be()),
                    "e": URL_SAFE_NO_PAD.encode(pk.e().to_bytes_be()),
                },
                {
                    "kty": "RSA", "kid": "rsa-512", "alg": "RS512",
                    "n": URL_SAFE_NO_PAD.encode(pk.n().to_bytes_be()),
                    "e": URL_SAFE_NO_PAD.encode(pk.e().to_bytes_be()),
                },
            ]
        })
        .to_string()
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_and_pinned() {
        let v = Verifier::jwks(&jwks_json(), None, "ultrasync", None).expect("jwks");
        let rs = mint(Algorithm::RS256, &rsa_encoding(), Some("rsa-1"), &good()).expect("mint");
        v.verify(&rs).expect("rsa-1");
        let ed1 = mint(
            Algorithm::EdDSA,
            &ed_encoding(&ed_key(1)),
            Some("ed-1"),
            &good(),
        )
        .expect("mint");
        v.verify(&ed1).expect("ed-1");
        let ed2 = mint(
            Algorithm::EdDSA,
            &ed_encoding(&ed_key(2)),
            Some("ed-2"),
            &good(),
        )
        .expect("mint");
        v.verify(&ed2).expect("ed-2");
        // Signed by ed-1's key but naming ed-2.
        let wrong = mint(
            Algorithm::EdDSA,
            &ed_encoding(&ed_key(1)),
            Some("ed-2"),
            &good(),
        )
        .expect("mint");
        assert!(v.verify(&wrong).is_err());
        // Unknown kid, no kid with several keys.
        let unknown =
            mint(Algorithm::RS256, &rsa_encoding(), Some("rsa-9"), &good()).expect("mint");
        assert!(
            v.verify(&unknown)
                .expect_err("unknown")
                .to_string()
                .contains("kid")
        );
        let no_kid = mint(Algorithm::RS256, &rsa_encoding(), None, &good()).expect("mint");
        assert!(v.verify(&no_kid).is_err());
        // The header's alg must be the key's.
        let rs_as_ed =
            mint(Algorithm::RS256, &rsa_encoding(), Some("ed-1"), &good()).expect("mint");
        assert!(v.verify(&rs_as_ed).is_err());
        let rs512 = mint(Algorithm::RS512, &rsa_encoding(), Some("rsa-1"), &good()).expect("mint");
        assert!(v.verify(&rs512).is_err());
        // Skipped keys verify nothing, whatever the token claims.
        let hmac = mint(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET),
            Some("hmac"),
            &good(),
        )
        .expect("mint");
        assert!(v.verify(&hmac).is_err());
        for kid in ["enc", "rsa-512"] {
            let t = mint(Algorithm::RS256, &rsa_encoding(), Some(kid), &good()).expect("mint");
            assert!(v.verify(&t).is_err(), "{kid}");
        }
        let t = mint(Algorithm::RS512, &rsa_encoding(), Some("rsa-512"), &good()).expect("mint");
        assert!(v.verify(&t).is_err());
        // Confusion: HS256 with the public key as secret, naming an RSA kid.
        let pem = rsa_public_pem();
        let confused = mint(
            Algorithm::HS256,
            &EncodingKey::from_secret(pem.as_bytes()),
            Some("rsa-1"),
            &good(),
        )
        .expect("mint");
        assert!(v.verify(&confused).is_err());
        // alg none naming a kid.
        assert!(
            v.verify(&unsigned(r#"{"alg":"none","kid":"rsa-1"}"#, &good()))
                .is_err()
        );
    }

    #[test]
    fn jwks_restricted_to_one_algorithm_and_single_keys() {
        let only_ed = Verifier::jwks(&jwks_json(), Some(TokenAlgorithm::EdDsa), "ultrasync", None)
            .expect("jwks");
        let rs = mint(Algorithm::RS256, &rsa_encoding(), Some("rsa-1"), &good()).expect("mint");
        assert!(only_ed.verify(&rs).is_err());
        // One key, no kid needed.
        let one = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(ed_key(4).verifying_key().as_bytes()),
        }]})
        .to_string();
        let v = Verifier::jwks(&one, None, "ultrasync", None).expect("jwks");
        let t = mint(Algorithm::EdDSA, &ed_encoding(&ed_key(4)), None, &good()).expect("mint");
        v.verify(&t).expect("single key");
        // Bad sets.
        assert!(Verifier::jwks("{}", None, "ultrasync", None).is_err());
        assert!(Verifier::jwks(r#"{"keys": []}"#, None, "ultrasync", None).is_err());
        let hmac_only = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
        assert!(Verifier::jwks(&hmac_only, None, "ultrasync", None).is_err());
        let short_x = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]})
            .to_string();
        assert!(Verifier::jwks(&short_x, None, "ultrasync", None).is_err());
        let dup = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": URL_SAFE_NO_PAD.encode(ed_key(4).verifying_key().as_bytes())},
            {"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": URL_SAFE_NO_PAD.encode(ed_key(5).verifying_key().as_bytes())},
        ]})
        .to_string();
        assert!(Verifier::jwks(&dup, None, "ultrasync", None).is_err());
    }

    #[test]
    fn from_config_picks_the_configured_verifier() {
        let dir = std::env::temp_dir().join(format!("usync-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = ed_key(9);
        let pem_path = dir.join("ed.pem");
        std::fs::write(&pem_path, ed_public_pem(&key)).expect("write");
        let jwks_path = dir.join("jwks.json");
        std::fs::write(&jwks_path, jwks_json()).expect("write");

        let mut cfg = AuthConfig {
            jwt_secret: Some(String::from_utf8(SECRET.to_vec()).expect("utf8")),
            ..AuthConfig::default()
        };
        let hs_token = mint_hs256(SECRET, &good()).expect("mint");
        Verifier::from_config(&cfg)
            .expect("hs256")
            .verify(&hs_token)
            .expect("hs256 token");

        cfg.algorithm = TokenAlgorithm::EdDsa;
        cfg.public_key_file = Some(pem_path.clone());
        let v = Verifier::from_config(&cfg).expect("eddsa");
        let ed_token = mint(Algorithm::EdDSA, &ed_encoding(&key), None, &good()).expect("mint");
        v.verify(&ed_token).expect("eddsa token");
        // The secret is still configured, but HS256 tokens are not accepted.
        assert!(v.verify(&hs_token).is_err());

        cfg.algorithm = TokenAlgorithm::Rs256;
        assert!(
            Verifier::from_config(&cfg).is_err(),
            "an Ed25519 key for RS256"
        );

        cfg.public_key_file = None;
        assert!(Verifier::from_config(&cfg).is_err(), "RS256 without a key");
        cfg.jwks_file = Some(jwks_path);
        let v = Verifier::from_config(&cfg).expect("jwks, RS256 keys only");
        let rs = mint(Algorithm::RS256, &rsa_encoding(), Some("rsa-1"), &good()).expect("mint");
        v.verify(&rs).expect("rs256 token");
        let ed1 = mint(
            Algorithm::EdDSA,
            &ed_encoding(&ed_key(1)),
            Some("ed-1"),
            &good(),
        )
        .expect("mint");
        assert!(v.verify(&ed1).is_err());

        // The lifetime maximum is taken from the config.
        cfg.max_token_lifetime_secs = 30;
        let v = Verifier::from_config(&cfg).expect("jwks");
        assert!(v.verify(&rs).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn client_messages_are_generic() {
        let v = Verifier::hs256(SECRET, "ultrasync", None);
        let mut c = good();
        c.exp = now_secs() - 3600;
        let err = v
            .verify(&mint_hs256(SECRET, &c).expect("mint"))
            .expect_err("expired");
        assert!(
            err.to_string().contains("Expired"),
            "the log keeps the reason: {err}"
        );
        assert_eq!(err.client_message(), GENERIC_REFUSAL);
        let err = v.verify("not-a-jwt").expect_err("garbage");
        assert_eq!(err.client_message(), GENERIC_REFUSAL);
        assert_eq!(AuthError::Missing.client_message(), "missing bearer token");
    }

    #[test]
    fn claims_round_trip_with_either_audience() {
        let one: Claims = serde_json::from_value(serde_json::json!({
            "sub": "u", "org": "o", "projects": ["*"], "scope": "read", "exp": 1, "aud": "x",
        }))
        .expect("string aud");
        assert_eq!(one.aud, Audience::One("x".into()));
        let many: Claims = serde_json::from_value(serde_json::json!({
            "sub": "u", "org": "o", "projects": ["*"], "scope": "read", "exp": 1, "aud": ["x", "y"],
        }))
        .expect("array aud");
        assert!(many.aud.contains("y") && !many.aud.contains("z"));
        let json = serde_json::to_value(&one).expect("json");
        assert_eq!(json["aud"], "x");
        assert!(json.get("nbf").is_none());
    }
}
