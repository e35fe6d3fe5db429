//! The gateway's part of a command's trace (see `ultrasync_shared::trace`):
//! `gateway.command` from the command's arrival to its answer, and under it
//! `gateway.publish` from the hand-over to the publisher to `USYNC_CMDS`' store ack.
//! The publish span's context rides with the command to the sequencer.

use ultrasync_shared::protocol::{CommandFrame, ServerMessage};
use ultrasync_shared::trace::{Span, SpanKind, Tracer};
use ultrasync_shared::{ErrorCode, StreamKey};

/// The span of a command that just arrived over `transport` (`ws`, `http`).
pub fn command(tracer: &Tracer, transport: &'static str, frame: &CommandFrame) -> Span {
    let span = tracer.root("gateway.command", SpanKind::Server);
    if span.is_on() {
        span.set("ultrasync.transport", transport);
        span.set("ultrasync.command_id", frame.command_id.clone());
        span.set("ultrasync.namespace", frame.namespace.clone());
        span.set("ultrasync.op_type", frame.op_type.as_str());
    }
    span
}

/// Who sent it and where it goes, once known.
pub fn addressed(span: &Span, key: &StreamKey, actor: &str, client_id: &str) {
    if span.is_on() {
        span.set("ultrasync.org", key.org.to_string());
        span.set("ultrasync.project", key.project.to_string());
        span.set("ultrasync.actor_id", actor.to_owned());
        span.set("ultrasync.client_id", client_id.to_owned());
    }
}

/// The command was refused before it left the gateway, or answered with a reject.
pub fn rejected(span: &Span, code: ErrorCode, why: &str) {
    span.set("ultrasync.reject", code.as_str());
    span.fail(format!("{}: {why}", code.as_str()));
}

/// Records the answer on the command's span.
pub fn answered(span: &Span, answer: &ServerMessage) {
    match answer {
        ServerMessage::Ack { server_seq, .. } => {
            span.set("ultrasync.server_seq", *server_seq as i64)
        }
        ServerMessage::Reject { code, reason, .. } => rejected(span, *code, reason),
        _ => {}
    }
}

/// The span of a command's trip into `USYNC_CMDS`.
pub fn publish(command: &Span) -> Span {
    command.child("gateway.publish", SpanKind::Producer)
}
