//! Namespace modes (SPEC §3). Every project has the five defaults; more are declared
//! in the config file with a mode, an optional JSON Schema for values and an optional
//! max value size. A namespace that is neither is unknown (`unknown_namespace`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::is_valid_id;

/// Default largest value (after the op applies): 256 KiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Serialized in server order; precondition optional, enforced when given.
    Lww,
    /// Every write carries `precondition.expected_version`.
    Cas,
    /// Only `crdt_op`: Automerge changes, merged, never rejected for conflict.
    Crdt,
    /// Presence: never in the durable log.
    Ephemeral,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lww => "lww",
            Self::Cas => "cas",
            Self::Crdt => "crdt",
            Self::Ephemeral => "ephemeral",
        }
    }
}

/// A namespace as declared in `ultrasync.toml`:
///
/// ```toml
/// [[namespaces]]
/// name = "todos"
/// mode = "lww"
/// max_value_bytes = 65536
/// schema = { type = "object", required = ["title"] }   # or schema_file = "todo.json"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    pub mode: Mode,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    #[serde(default)]
    pub max_value_bytes: Option<usize>,
}

/// A namespace ready to check values against.
pub struct NamespaceSpec {
    pub name: String,
    pub mode: Mode,
    pub max_value_bytes: usize,
    pub schema: Option<jsonschema::Validator>,
}

impl std::fmt::Debug for NamespaceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceSpec")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

impl NamespaceSpec {
    /// Checks a value the op would produce against the schema; the error is the
    /// validator's message.
    pub fn check_schema(&self, value: &Value) -> Result<(), String> {
        let Some(schema) = &self.schema else {
            return Ok(());
        };
        let errors: Vec<String> = schema
            .iter_errors(value)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{at}: {e}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// The namespaces every project has.
pub fn defaults() -> Vec<(&'static str, Mode)> {
    vec![
        ("presence", Mode::Ephemeral),
        ("settings", Mode::Cas),
        ("index", Mode::Lww),
        ("collab", Mode::Crdt),
        ("metadata", Mode::Lww),
    ]
}

/// All namespaces by name. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Namespaces {
    by_name: Arc<BTreeMap<String, Arc<NamespaceSpec>>>,
}

impl Namespaces {
    /// The defaults plus `declared` (a declared namespace with a default's name
    /// replaces it). Schemas are compiled here, so a bad schema fails at start-up.
    pub fn new(declared: &[NamespaceConfig]) -> anyhow::Result<Self> {
        let mut by_name = BTreeMap::new();
        for (name, mode) in defaults() {
            by_name.insert(
                name.to_owned(),
                Arc::new(NamespaceSpec {
                    name: name.to_owned(),
                    mode,
                    max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
                    schema: None,
                }),
            );
        }
        for ns in declared {
            if !is_valid_id(&ns.name) {
                anyhow::bail!(
                    "namespace name {:?} must match [A-Za-z0-9_-]{{1,64}}",
                    ns.name
                );
            }
            let schema_doc = match (&ns.schema, &ns.schema_file) {
                (Some(_), Some(_)) => anyhow::bail!(
                    "namespace {}: give schema or schema_file, not both",
                    ns.name
                ),
                (Some(s), None) => Some(s.clone()),
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("namespace {}: reading {}: {e}", ns.name, path.display())
                    })?;
                    Some(serde_json::from_str(&text).map_err(|e| {
                        anyhow::anyhow!(
                            "namespace {}: {} is not JSON: {e}",
                            ns.name,
                            path.display()
                        )
                    })?)
                }
                (None, None) => None,
            };
            let schema = match schema_doc {
                Some(doc) => Some(jsonschema::validator_for(&doc).map_err(|e| {
                    anyhow::anyhow!("namespace {}: invalid JSON Schema: {e}", ns.name)
                })?),
                None => None,
            };
            by_name.insert(
                ns.name.clone(),
                Arc::new(NamespaceSpec {
                    name: ns.name.clone(),
                    mode: ns.mode,
                    max_value_bytes: ns.max_value_bytes.unwrap_or(DEFAULT_MAX_VALUE_BYTES),
                    schema,
                }),
            );
        }
        Ok(Self {
            by_name: Arc::new(by_name),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<NamespaceSpec>> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_declared() {
        let ns = Namespaces::new(&[NamespaceConfig {
            name: "todos".into(),
            mode: Mode::Lww,
            schema: Some(json!({"type": "object", "required": ["title"]})),
            schema_file: None,
            max_value_bytes: Some(100),
        }])
        .expect("namespaces");
        assert_eq!(ns.get("settings").map(|s| s.mode), Some(Mode::Cas));
        assert_eq!(ns.get("collab").map(|s| s.mode), Some(Mode::Crdt));
        assert_eq!(ns.get("presence").map(|s| s.mode), Some(Mode::Ephemeral));
        assert!(ns.get("nope").is_none());
        let todos = ns.get("todos").expect("todos");
        assert!(todos.check_schema(&json!({"title": "x"})).is_ok());
        let err = todos
            .check_schema(&json!({"done": true}))
            .expect_err("invalid");
        assert!(err.contains("title"), "{err}");
    }

    #[test]
    fn bad_schema_fails_at_start() {
        let bad = NamespaceConfig {
            name: "x".into(),
            mode: Mode::Lww,
            schema: Some(json!({"type": 12})),
            schema_file: None,
            max_value_bytes: None,
        };
        assert!(Namespaces::new(&[bad]).is_err());
    }
}
