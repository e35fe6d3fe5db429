/**
 * Where a replica keeps what it must not lose: the confirmed state per namespace (up
 * to its cursor), the outbox of edits not yet acknowledged, the client id and the
 * next command number. Every change is one atomic [`StoreChange`]: an edit is queued
 * in one commit, a batch of ops and the outbox entries it settles in another, so a
 * reload or a crash between two commits loses nothing and duplicates nothing.
 */

import type { Json, OpType, Precondition } from "./types.js";

export interface StoredKey {
  value: Json;
  version: number;
  /** The Automerge document of a crdt key, saved, base64. */
  doc?: string;
}

export interface StoredNamespace {
  lastSeq: number;
  keys: Record<string, StoredKey>;
}

/** One edit waiting for the server. */
export interface Pending {
  command_id: string;
  /** Queue order (the command number). */
  n: number;
  namespace: string;
  key: string;
  op_type: OpType;
  payload: Json;
  precondition?: Precondition;
  /** The namespace's cursor when the edit was made (sent as `base_seq`). */
  base_seq?: number;
}

export interface StoredReplica {
  clientId: string | undefined;
  nextId: number;
  namespaces: Record<string, StoredNamespace>;
  /** In queue order. */
  outbox: Pending[];
}

/** One atomic change to the store. */
export interface StoreChange {
  clientId?: string;
  nextId?: number;
  /** Namespaces replaced whole (a snapshot, or a reset before a resync). */
  replace?: Record<string, StoredNamespace>;
  /** Keys written; `null` deletes. */
  keys?: Array<{ namespace: string; key: string; entry: StoredKey | null }>;
  /** New cursors (`lastSeq`) of namespaces whose keys were written. */
  cursors?: Record<string, number>;
  addPending?: Pending[];
  removePending?: string[];
}

export interface Store {
  load(): Promise<StoredReplica>;
  /** Resolves once the change is durable. Commits are applied in call order. */
  commit(change: StoreChange): Promise<void>;
  close(): void;
}

export function emptyReplica(): StoredReplica {
  return { clientId: undefined, nextId: 1, namespaces: {}, outbox: [] };
}

/** Applies a change to an in-memory replica (the memory and file stores use it). */
export function applyStoreChange(r: StoredReplica, c: StoreChange): void {
  if (c.clientId !== undefined) r.clientId = c.clientId;
  if (c.nextId !== undefined) r.nextId = c.nextId;
  for (const [ns, st] of Object.entries(c.replace ?? {})) {
    r.namespaces[ns] = structuredClone(st);
  }
  for (const { namespace, key, entry } of c.keys ?? []) {
    const ns = (r.namespaces[namespace] ??= { lastSeq: 0, keys: {} });
    if (entry === null) delete ns.keys[key];
    else ns.keys[key] = structuredClone(entry);
  }
  for (const [ns, seq] of Object.entries(c.cursors ?? {})) {
    (r.namespaces[ns] ??= { lastSeq: 0, keys: {} }).lastSeq = seq;
  }
  if (c.removePending?.length) {
    const gone = new Set(c.removePending);
    r.outbox = r.outbox.filter((p) => !gone.has(p.command_id));
  }
  for (const p of c.addPending ?? []) r.outbox.push(structuredClone(p));
}

/** Keeps everything in memory: a restart starts over (Node tools, tests). */
export class MemoryStore implements Store {
  private replica: StoredReplica = emptyReplica();

  async load(): Promise<StoredReplica> {
    return structuredClone(this.replica);
  }

  async commit(change: StoreChange): Promise<void> {
    applyStoreChange(this.replica, change);
  }

  close(): void {}
}
