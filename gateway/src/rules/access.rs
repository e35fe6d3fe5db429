//! What a principal may touch: the org and project of its token, its scopes, its
//! namespace allow-list, declared namespaces only (SPEC §4: `unknown_namespace`), and
//! the embedder's `authorize` hook. One function for every door.

use ultrasync_shared::auth::Principal;
use ultrasync_shared::namespaces::Mode;
use ultrasync_shared::{ErrorCode, Id, StreamKey};

use super::Refusal;
use crate::AppState;
pub use crate::hooks::Access;

/// Resolves `org/project/namespace` for `principal`, or says why not. Ephemeral
/// namespaces (presence) resolve too: the caller decides what they mean there.
pub fn stream_key(
    state: &AppState,
    principal: &Principal,
    (org, project, namespace): (&Id, &Id, &str),
    access: Access,
) -> Result<StreamKey, Refusal> {
    let ns = Id::parse("namespace", namespace)
        .map_err(|e| Refusal::new(ErrorCode::InvalidId, e.to_string()))?;
    if principal.org != *org || !principal.allows_project(project.as_str()) {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            format!("the token does not cover {org}/{project}"),
        ));
    }
    let (allowed, what) = match access {
        Access::Write => (principal.write, "write"),
        Access::Read => (principal.read, "read"),
    };
    if !allowed {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            format!("the token has no {what} scope"),
        ));
    }
    if !principal.allows_namespace(namespace) {
        return Err(Refusal::new(
            ErrorCode::Forbidden,
            format!("the token does not grant namespace {namespace}"),
        ));
    }
    if state.namespaces.get(namespace).is_none() {
        return Err(Refusal::new(
            ErrorCode::UnknownNamespace,
            format!("namespace {namespace} is not declared for this project"),
        ));
    }
    let key = StreamKey::new(org.clone(), project.clone(), ns);
    state.hooks.authorize(principal, &key, access)?;
    Ok(key)
}

/// The mode of a declared namespace.
pub fn mode(state: &AppState, namespace: &str) -> Option<Mode> {
    state.namespaces.get(namespace).map(|s| s.mode)
}
