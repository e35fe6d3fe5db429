/**
 * The WebSocket protocol v1 (SPEC §4) as TypeScript types: every frame is a JSON
 * object tagged by `type`. The server's Rust types (`shared/src/protocol.rs`) are the
 * source of truth; these mirror them field for field.
 */

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export type OpType = "set" | "del" | "patch" | "crdt_op";

/** The closed set of reject and error codes (SPEC §4). */
export type ErrorCode =
  | "unauthorized"
  | "forbidden"
  | "invalid_message"
  | "invalid_id"
  | "invalid_key"
  | "unknown_namespace"
  | "invalid_op"
  | "schema_invalid"
  | "precondition_failed"
  | "payload_too_large"
  | "rate_limited"
  | "stale_base"
  | "slow_consumer"
  | "unavailable"
  | "internal";

export interface Precondition {
  /** The key's version the write expects; 0 = create only if absent. */
  expected_version: number;
}

/** A committed op as it sits in the log (SPEC §2). */
export interface Op {
  op_id: string;
  org_id: string;
  project_id: string;
  namespace: string;
  actor_id: string;
  client_id: string;
  command_id: string;
  server_seq: number;
  /** uhlc timestamp, a decimal string (it does not fit a JS number). */
  hlc_ts: string;
  key: string;
  op_type: OpType;
  payload: Json;
  precondition?: Precondition;
}

export interface CommandFrame {
  command_id: string;
  namespace: string;
  key: string;
  op_type: OpType;
  payload: Json;
  precondition?: Precondition;
  /** The namespace's cursor the edit was made on: below the compaction floor the
   * server refuses it `stale_base` with `current_state`, writing nothing. */
  base_seq?: number;
}

/** Client → server. */
export type ClientMessage =
  | {
      type: "hello";
      protocol: 1;
      org_id: string;
      project_id: string;
      client_id: string;
      cursors: Record<string, number | null>;
      /** Continue an interrupted snapshot (null cursor) from its last checkpoint. */
      checkpoints?: Record<string, string>;
    }
  | { type: "subscribe"; namespace: string; last_server_seq: number | null; checkpoint?: string }
  | { type: "unsubscribe"; namespace: string }
  | ({ type: "command" } & CommandFrame)
  | { type: "cursor"; namespace: string; server_seq: number }
  | { type: "presence"; key: string; payload: Json }
  | { type: "ping"; nonce?: Json };

/** One key in a snapshot (crdt keys also carry their document). */
export interface KeyState {
  value: Json;
  version: number;
  heads?: string[];
  /** The Automerge document, saved and base64-encoded. */
  doc?: string;
}

/** The state of a key as a reject reports it. */
export interface CurrentState {
  key: string;
  version: number;
  value: Json;
}

/** Server → client. */
export type ServerMessage =
  | { type: "welcome"; protocol: number; server_id: string; session_id: string; actor_id: string }
  | {
      type: "snapshot";
      namespace: string;
      last_server_seq: number;
      state: Record<string, KeyState>;
      digest: string;
      /** All frames of a multi-frame snapshot but the last. */
      more?: boolean;
      /** Where this frame leaves the transfer: sent back to continue it. */
      checkpoint?: string;
    }
  | { type: "ops"; namespace: string; seq_start: number; ops: Op[] }
  | { type: "synced"; namespace: string; server_seq: number }
  | { type: "ack"; command_id: string; server_seq: number; op: Op }
  | {
      type: "reject";
      command_id: string;
      code: ErrorCode;
      reason: string;
      current_state?: CurrentState;
    }
  | {
      type: "presence";
      actor_id: string;
      client_id: string;
      key: string;
      payload: Json;
      hlc_ts: string;
    }
  | { type: "error"; code: ErrorCode; message: string }
  | { type: "pong"; nonce?: Json };

export const PROTOCOL_VERSION = 1 as const;

/** Close codes the server uses (SPEC §4). */
export const CloseCode = {
  normal: 1000,
  policy: 1008,
  tooBig: 1009,
  internal: 1011,
  tryAgainLater: 1013,
  slowConsumer: 4001,
  protocolMismatch: 4002,
} as const;
