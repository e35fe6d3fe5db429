//! Validated identifiers. Ids (`org_id`, `project_id`, `namespace`, `client_id`,
//! `actor_id`) become parts of NATS subjects, so they are checked against
//! `[A-Za-z0-9_-]{1,64}` before anything else touches them (invariant 8). Keys never go
//! into subjects; they are checked for length and control characters only.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An id that is safe to put into a NATS subject token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Id(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must match [A-Za-z0-9_-]{{1,64}}, got {value:?}")]
    InvalidId { what: &'static str, value: String },
    #[error("key must be 1-512 bytes of UTF-8 without control characters")]
    InvalidKey,
}

impl Id {
    /// Validates `value` as an id; `what` names the field in the error.
    pub fn parse(what: &'static str, value: &str) -> Result<Self, IdError> {
        if is_valid_id(value) {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError::InvalidId {
                what,
                value: value.chars().take(80).collect(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::parse("id", &s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// True when `value` matches `[A-Za-z0-9_-]{1,64}`.
pub fn is_valid_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks a key: UTF-8 (guaranteed by `&str`), 1–512 bytes, no control characters.
pub fn validate_key(key: &str) -> Result<(), IdError> {
    if key.is_empty() || key.len() > 512 || key.chars().any(char::is_control) {
        Err(IdError::InvalidKey)
    } else {
        Ok(())
    }
}

/// `(org, project, namespace)`: the unit of ordering. `server_seq` is dense per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamKey {
    pub org: Id,
    pub project: Id,
    pub namespace: Id,
}

impl StreamKey {
    pub fn new(org: Id, project: Id, namespace: Id) -> Self {
        Self {
            org,
            project,
            namespace,
        }
    }

    /// Parses and validates the three parts.
    pub fn parse(org: &str, project: &str, namespace: &str) -> Result<Self, IdError> {
        Ok(Self {
            org: Id::parse("org_id", org)?,
            project: Id::parse("project_id", project)?,
            namespace: Id::parse("namespace", namespace)?,
        })
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.org, self.project, self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(Id::parse("org_id", "acme-1_x").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", "é", &"x".repeat(65)] {
            assert!(Id::parse("org_id", bad).is_err(), "{bad:?} accepted");
        }
        assert!(Id::parse("org_id", &"x".repeat(64)).is_ok());
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("theme").is_ok());
        assert!(validate_key("a.b/c d ✓").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a\nb").is_err());
        assert!(validate_key("\u{7f}").is_err());
        assert!(validate_key(&"k".repeat(513)).is_err());
        assert!(validate_key(&"k".repeat(512)).is_ok());
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<Id>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<Id>("\"not.ok\"").is_err());
    }
}
