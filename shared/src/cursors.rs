//! Client cursors in KV `usync-cursors`: `{org}.{project}.{ns}.{client_id}` → the last
//! `server_seq` the client has durably applied, when it last said so, and the actor
//! the client id belongs to. Gateways
//! write them (coalesced); the compactor reads them to find how far the log may be
//! trimmed.

use serde::{Deserialize, Serialize};

use crate::StreamKey;
use crate::ids::is_valid_id;

/// One stored cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorRecord {
    pub server_seq: u64,
    /// Unix time in milliseconds of the client's last cursor report.
    pub seen_at_ms: u64,
    /// The actor that first used this client id: only it may move the cursor
    /// (records written before owners were kept have none and are claimed by the
    /// next writer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
}

/// The KV key of `client_id`'s cursor on `key`.
pub fn kv_key(key: &StreamKey, client_id: &str) -> String {
    format!("{}.{}.{}.{client_id}", key.org, key.project, key.namespace)
}

/// The record of ops a webhook never got (compacted before delivery, after it was let
/// go): `{org}.{project}.{ns}.={webhook}` in the same bucket (`=` cannot start a
/// client id, so the two never meet). The webhook delivers a `stream.reset` event
/// naming the range before its next op of that stream key.
pub fn reset_kv_key(key: &StreamKey, webhook: &str) -> String {
    format!("{}.{}.{}.={webhook}", key.org, key.project, key.namespace)
}

/// Whether `kv_key` is a webhook reset record rather than a cursor.
pub fn is_reset_kv_key(kv_key: &str) -> bool {
    kv_key
        .rsplit('.')
        .next()
        .is_some_and(|t| t.starts_with('='))
}

/// Ops `from..=to` of a stream key were compacted before a webhook delivered them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRecord {
    pub from: u64,
    pub to: u64,
}

/// Parses a KV key back into the stream key and client id.
pub fn parse_kv_key(kv_key: &str) -> Option<(StreamKey, String)> {
    let mut parts = kv_key.split('.');
    let (org, project, ns, client) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_valid_id(client) {
        return None;
    }
    Some((StreamKey::parse(org, project, ns).ok()?, client.to_owned()))
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys_round_trip() {
        let k = StreamKey::parse("acme", "web", "index").expect("key");
        let kv = kv_key(&k, "tab-1");
        assert_eq!(kv, "acme.web.index.tab-1");
        assert_eq!(parse_kv_key(&kv), Some((k, "tab-1".to_owned())));
        assert_eq!(parse_kv_key("acme.web.index"), None);
        assert_eq!(parse_kv_key("acme.web.index.a.b"), None);
    }
}
