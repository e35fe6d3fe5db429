//! Checks a command passes at the gateway, before it is queued in the shared
//! `USYNC_CMDS` stream (the sequencer checks everything again; these keep one
//! tenant's garbage out of every tenant's queue), and the cursor rules.

use ultrasync_shared::auth::Principal;
use ultrasync_shared::protocol::CommandFrame;
use ultrasync_shared::{CommandEnvelope, ErrorCode, OpType, StreamKey, admission};

use super::Refusal;
use crate::AppState;

/// Longest `command_id`.
const MAX_COMMAND_ID: usize = 128;

/// Checks a command frame the same way on every door.
pub fn check_frame(state: &AppState, frame: &CommandFrame) -> Result<(), Refusal> {
    if frame.command_id.is_empty()
        || frame.command_id.len() > MAX_COMMAND_ID
        || frame.command_id.chars().any(char::is_control)
    {
        return Err(Refusal::new(
            ErrorCode::InvalidId,
            format!("command_id must be 1-{MAX_COMMAND_ID} bytes without control characters"),
        ));
    }
    if ultrasync_shared::validate_key(&frame.key).is_err() {
        return Err(Refusal::new(
            ErrorCode::InvalidKey,
            "key must be 1-512 bytes of UTF-8 without control characters",
        ));
    }
    let Some(spec) = state.namespaces.get(&frame.namespace) else {
        return Err(Refusal::new(
            ErrorCode::UnknownNamespace,
            format!("namespace {} is not declared", frame.namespace),
        ));
    };
    if spec.mode == ultrasync_shared::namespaces::Mode::Ephemeral {
        return Err(Refusal::new(
            ErrorCode::InvalidOp,
            format!(
                "{} is ephemeral: send presence frames, not commands",
                spec.name
            ),
        ));
    }
    Ok(())
}

/// What the command carries (value depth and size, an Automerge change's sizes),
/// checked before it is queued: a value the sequencer would refuse never takes room
/// in the shared `USYNC_CMDS`. A change is inflated (bounded) off the async runtime,
/// so a tenant's expensive input costs a blocking thread, not a runtime worker.
pub async fn admit(state: &AppState, frame: &CommandFrame) -> Result<(), Refusal> {
    let Some(spec) = state.namespaces.get(&frame.namespace) else {
        return Err(Refusal::new(
            ErrorCode::UnknownNamespace,
            format!("namespace {} is not declared", frame.namespace),
        ));
    };
    let limits = admission::Limits::for_namespace(&state.config.limits, &spec);
    let refused = |(code, message): admission::Refused| Refusal::new(code, message);
    if frame.op_type != OpType::CrdtOp {
        return admission::check_command(frame.op_type, &frame.payload, &limits).map_err(refused);
    }
    let payload = frame.payload.clone();
    tokio::task::spawn_blocking(move || admission::check_command(OpType::CrdtOp, &payload, &limits))
        .await
        .map_err(|e| Refusal::unavailable("checking a change", e))?
        .map_err(refused)
}

/// The envelope a checked frame becomes, answered on `reply_to`.
pub fn envelope(
    principal: &Principal,
    key: &StreamKey,
    client_id: &str,
    frame: CommandFrame,
    reply_to: String,
) -> CommandEnvelope {
    CommandEnvelope {
        org_id: key.org.to_string(),
        project_id: key.project.to_string(),
        namespace: key.namespace.to_string(),
        actor_id: principal.actor_id.to_string(),
        client_id: client_id.to_owned(),
        command_id: frame.command_id,
        key: frame.key,
        op_type: frame.op_type,
        payload: frame.payload,
        precondition: frame.precondition,
        base_seq: frame.base_seq,
        reply_to: Some(reply_to),
    }
}

/// A cursor may not be above the head of its stream key (it would hold a state this
/// log never had).
pub async fn check_cursor(
    state: &AppState,
    key: &StreamKey,
    server_seq: u64,
) -> Result<(), Refusal> {
    let head = state
        .hub
        .head(key)
        .await
        .map_err(|e| Refusal::unavailable("reading the log", e))?;
    if server_seq > head {
        return Err(Refusal::new(
            ErrorCode::StaleBase,
            format!(
                "cursor {server_seq} of {} is above the head {head}; resync from a snapshot",
                key.namespace
            ),
        ));
    }
    Ok(())
}

/// A client's cursor, from any door (`cursor` frames, `hello`/`subscribe` cursors,
/// `POST …/cursors`, `GET …/ops?since=&client_id=`): checked against the head and
/// recorded for the compactor under the client id, which must be the actor's own.
pub async fn report_cursor(
    state: &AppState,
    principal: &Principal,
    key: &StreamKey,
    client_id: &str,
    server_seq: u64,
) -> Result<(), Refusal> {
    check_cursor(state, key, server_seq).await?;
    state
        .cursors
        .record(key, client_id, principal.actor_id.as_str(), server_seq)
        .await
}
