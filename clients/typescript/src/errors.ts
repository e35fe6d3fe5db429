/** Errors carry the protocol's `code` (SPEC §4), so callers branch on it, not on text. */

import type { CurrentState, ErrorCode } from "./types.js";

/** Something the server refused, or a protocol-level error frame. */
export class SyncError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string) {
    super(`${code}: ${message}`);
    this.name = "SyncError";
    this.code = code;
  }
}

/** The server refused one edit; it has been rolled back locally. */
export class RejectedError extends SyncError {
  readonly commandId: string;
  readonly currentState: CurrentState | undefined;
  constructor(commandId: string, code: ErrorCode, reason: string, currentState?: CurrentState) {
    super(code, reason);
    this.name = "RejectedError";
    this.commandId = commandId;
    this.currentState = currentState;
  }
}

/** A call the client cannot make (unknown namespace, closed client, bad key). */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** The local store failed (IndexedDB, file). */
export class StoreError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "StoreError";
  }
}
