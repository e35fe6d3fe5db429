/**
 * The local-first client: a replica of some namespaces, an outbox that survives
 * reloads, optimistic edits, and a connection that keeps both in step with the
 * server. The same semantics as the Rust `SyncClient` (`client/src/sync.rs`):
 *
 * - The replica holds, per namespace, the *confirmed* state (the server's, up to a
 *   cursor) and the *outbox* (edits not yet in the confirmed state). Reads see the
 *   confirmed state with the outbox applied on top.
 * - Every edit is committed to the store (one transaction) before it is sent, with a
 *   command id (`<client id>-<n>`) that is stored with it: a resend after a reload is
 *   answered by the server with the original ack, never applied twice.
 * - On connect: `hello` with the stored cursors (none: a snapshot, possibly in
 *   several frames), catch-up ops (own edits found there leave the outbox), `synced`;
 *   then the outbox is sent in order, then live ops.
 * - An `ack` keeps the edit in the view until its op arrives (no flicker); a `reject`
 *   removes it (rollback) and is reported with its code and `current_state`.
 * - After ops are stored, a `cursor` frame says how far this replica durably is.
 * - `stale_base`: the stored cursors are dropped and the replica resyncs from
 *   snapshots (the outbox stays).
 * - Edits carry `base_seq` (the cursor they were made on). Refused `stale_base` with
 *   a `current_state` (made on a state the log was compacted past; nothing written),
 *   an edit stays in the outbox, the replica resyncs, and the edit is sent again on
 *   the new snapshot (rolled back after three such refusals).
 * - A snapshot cut off by a disconnect is continued: the part received is kept in
 *   memory with the last frame's `checkpoint`, which the next `hello` sends back
 *   (`stale_base` when that snapshot was replaced: start over).
 */

import * as A from "@automerge/automerge";

import { type Entry, nextEntry } from "./apply.js";
import { browserWebSocket, Connection, type Status, type WebSocketFactory } from "./connection.js";
import { RejectedError, SyncError, UsageError } from "./errors.js";
import { MemoryStore, type Pending, type Store, type StoreChange, type StoredKey } from "./store.js";
import type { CurrentState, ErrorCode, Json, Op, OpType, ServerMessage } from "./types.js";
import { PROTOCOL_VERSION } from "./types.js";

export interface ClientOptions {
  /** `ws://host:port/v1/sync` or `wss://…`. */
  url: string;
  /** A JWT, or a function that returns a fresh one for every connection. */
  token: string | (() => string | Promise<string>);
  org: string;
  project: string;
  /** Namespaces to replicate (edits go only to these). */
  namespaces: string[];
  /** The ephemeral namespace to join for presence (e.g. `"presence"`); none when unset. */
  presence?: string;
  /** Stable per replica; by default made up once and kept in the store. */
  clientId?: string;
  /** Where the replica lives: `IndexedDbStore` in browsers, memory by default. */
  store?: Store;
  /** How sockets are opened: `?access_token=` by default (browsers). */
  webSocket?: WebSocketFactory;
  backoffStartMs?: number;
  backoffMaxMs?: number;
  /** Presence entries are refreshed this often (the server forgets them after 30 s). */
  presenceRefreshMs?: number;
}

/** A key as this replica sees it. */
export interface View {
  value: Json;
  /** Version of the confirmed value (0: not on the server yet). */
  version: number;
  /** Edits of this key are still waiting for the server. */
  pending: boolean;
}

export type ChangeOrigin = "local" | "remote" | "ack" | "rollback" | "snapshot";

export interface KeyChange {
  namespace: string;
  key: string;
  origin: ChangeOrigin;
  /** The op, for `remote` changes. */
  op?: Op;
}

export interface PresenceEntry {
  actorId: string;
  clientId: string;
  key: string;
  payload: Json;
}

interface Confirmed extends Entry {
  /** The Automerge document of a crdt key. */
  doc?: A.Doc<unknown>;
}

interface NamespaceReplica {
  lastSeq: number;
  keys: Map<string, Confirmed>;
}

interface Outgoing extends Pending {
  /** Acknowledged at this `server_seq`, not yet in the confirmed state. */
  ackedAt?: number;
  /** Refused `stale_base`: waits for the next snapshot, which becomes its base. */
  rebase?: boolean;
  rebases?: number;
}

/** Times an edit is re-based after `stale_base` before it is rolled back. */
const MAX_REBASES = 3;

/** A snapshot received in part: continued on the next socket from `checkpoint`. */
interface SnapshotPart {
  lastSeq: number;
  keys: Map<string, Confirmed>;
  checkpoint?: string;
}

/** Codes that mean "try again later": the edit stays in the outbox. */
const TRANSIENT: ReadonlySet<ErrorCode> = new Set(["unavailable", "rate_limited"]);

type Listener<T> = (value: T) => void;

function b64encode(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function b64decode(text: string): Uint8Array {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function randomId(prefix: string): string {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function docValue(doc: A.Doc<unknown>): Json {
  return A.toJS(doc) as Json;
}

export class SyncClient {
  readonly clientId: string;
  /** The token's subject, once the server said `welcome`. */
  actorId: string | undefined;

  private readonly replicas = new Map<string, NamespaceReplica>();
  private outbox: Outgoing[] = [];
  private nextId: number;
  private readonly conn: Connection;
  private readonly store: Store;
  /** Command ids sent on the current socket. */
  private sent = new Set<string>();
  private unsynced = new Set<string>();
  private snapshotParts = new Map<string, SnapshotPart>();
  /** Optimistic documents (confirmed + pending changes), built on demand. */
  private docViews = new Map<string, A.Doc<unknown>>();
  private readonly presenceSeen = new Map<string, PresenceEntry>();
  private readonly myPresence = new Map<string, Json>();
  private presenceTimer: ReturnType<typeof setInterval> | undefined;
  private readonly changeListeners = new Set<Listener<KeyChange>>();
  private readonly statusListeners = new Set<Listener<Status>>();
  private readonly presenceListeners = new Set<Listener<PresenceEntry[]>>();
  private readonly rejectListeners = new Set<Listener<RejectedError>>();
  private readonly errorListeners = new Set<Listener<SyncError>>();
  private readonly keyListeners = new Map<string, Set<Listener<View | undefined>>>();
  /** Store commits, chained so they complete in order. */
  private writes: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly opts: ClientOptions,
    store: Store,
    clientId: string,
    nextId: number,
  ) {
    this.store = store;
    this.clientId = clientId;
    this.nextId = nextId;
    this.conn = new Connection(
      {
        url: opts.url,
        token: opts.token,
        webSocket: opts.webSocket ?? browserWebSocket,
        backoffStartMs: opts.backoffStartMs,
        backoffMaxMs: opts.backoffMaxMs,
      },
      {
        open: () => this.hello(),
        frame: (m) => this.onFrame(m),
        closed: () => this.onClosed(),
        status: (s) => this.statusListeners.forEach((l) => l(s)),
      },
    );
  }

  /** Loads the store and starts syncing in the background. */
  static async open(opts: ClientOptions): Promise<SyncClient> {
    const store = opts.store ?? new MemoryStore();
    const stored = await store.load();
    const clientId = opts.clientId ?? stored.clientId ?? randomId("web-");
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(clientId)) {
      throw new UsageError(`client id ${clientId} must match [A-Za-z0-9_-]{1,64}`);
    }
    if (stored.clientId !== clientId) await store.commit({ clientId });
    const client = new SyncClient(opts, store, clientId, stored.nextId);
    for (const ns of opts.namespaces) {
      const st = stored.namespaces[ns];
      const keys = new Map<string, Confirmed>();
      for (const [k, e] of Object.entries(st?.keys ?? {})) keys.set(k, client.fromStored(e));
      client.replicas.set(ns, { lastSeq: st?.lastSeq ?? 0, keys });
    }
    client.outbox = stored.outbox.filter((p) => client.replicas.has(p.namespace));
    client.conn.start();
    client.presenceTimer = setInterval(() => client.sendPresence(), opts.presenceRefreshMs ?? 10_000);
    return client;
  }

  // ---- reads ---------------------------------------------------------------

  get status(): Status {
    return this.conn.status;
  }

  /** `key` as seen locally: the confirmed value with pending edits applied. */
  get(namespace: string, key: string): View | undefined {
    const replica = this.replica(namespace);
    const confirmed = replica.keys.get(key);
    const version = confirmed?.version ?? 0;
    const pending = this.outbox.filter((p) => p.namespace === namespace && p.key === key);
    if (confirmed?.doc || pending.some((p) => p.op_type === "crdt_op")) {
      const doc = this.doc(namespace, key);
      return doc === undefined ? undefined : { value: docValue(doc), version, pending: pending.length > 0 };
    }
    let entry: Entry | undefined = confirmed && { value: confirmed.value, version };
    for (const p of pending) entry = nextEntry(entry, p.op_type, p.payload, version);
    return entry && { value: entry.value, version, pending: pending.length > 0 };
  }

  /** Every key of the namespace as seen locally, sorted by key. */
  entries(namespace: string): Array<[string, View]> {
    const keys = new Set(this.replica(namespace).keys.keys());
    for (const p of this.outbox) if (p.namespace === namespace) keys.add(p.key);
    const out: Array<[string, View]> = [];
    for (const k of [...keys].sort()) {
      const v = this.get(namespace, k);
      if (v) out.push([k, v]);
    }
    return out;
  }

  /** The confirmed cursor of a namespace (0: nothing yet). */
  cursor(namespace: string): number {
    return this.replica(namespace).lastSeq;
  }

  /** Edits not yet in the confirmed state. */
  get pendingCount(): number {
    return this.outbox.length;
  }

  /** The Automerge document at `key` (confirmed + pending changes), read-only. */
  doc<T = unknown>(namespace: string, key: string): A.Doc<T> | undefined {
    const id = `${namespace}\u0000${key}`;
    const cached = this.docViews.get(id);
    if (cached) return cached as A.Doc<T>;
    const base = this.replica(namespace).keys.get(key)?.doc;
    const changes = this.outbox
      .filter((p) => p.namespace === namespace && p.key === key && p.op_type === "crdt_op")
      .map((p) => b64decode((p.payload as { change: string }).change));
    if (!base && changes.length === 0) return undefined;
    let doc = base ? A.clone(base) : A.init<unknown>();
    if (changes.length) [doc] = A.applyChanges(doc, changes);
    this.docViews.set(id, doc);
    return doc as A.Doc<T>;
  }

  /** Who is here: every presence entry the server reported, this client's included. */
  presence(): PresenceEntry[] {
    return [...this.presenceSeen.values()];
  }

  // ---- edits ---------------------------------------------------------------

  /** Sets `key`; resolves with the command id once the edit is stored locally. */
  put(namespace: string, key: string, value: Json): Promise<string> {
    return this.enqueue(namespace, key, "set", value);
  }

  /** Sets `key` only if its version is still `expectedVersion` (0: absent). */
  putIf(namespace: string, key: string, value: Json, expectedVersion: number): Promise<string> {
    return this.enqueue(namespace, key, "set", value, expectedVersion);
  }

  /** Merges `patch` (RFC 7386) into `key`. */
  patch(namespace: string, key: string, patch: Json): Promise<string> {
    return this.enqueue(namespace, key, "patch", patch);
  }

  delete(namespace: string, key: string): Promise<string> {
    return this.enqueue(namespace, key, "del", null);
  }

  /**
   * Edits the Automerge document at `key` (crdt namespaces): `fn` runs on the local
   * document; the change it makes is queued. Resolves with the command id, or
   * `undefined` when `fn` changed nothing.
   */
  async change<T = Record<string, unknown>>(
    namespace: string,
    key: string,
    fn: A.ChangeFn<T>,
  ): Promise<string | undefined> {
    const current = this.doc<T>(namespace, key);
    const base = current ? A.clone(current) : A.init<T>();
    const next = A.change(base, fn);
    const change = A.getLastLocalChange(next);
    if (!change || A.getHeads(next).join() === A.getHeads(base).join()) return undefined;
    return this.enqueue(namespace, key, "crdt_op", { change: b64encode(change) });
  }

  /**
   * Creates the document at `key` with `initial` contents when it does not exist,
   * with a change every replica makes byte for byte the same (fixed actor, time 0):
   * two replicas that seed concurrently agree instead of making rival objects.
   */
  async seedDoc(namespace: string, key: string, initial: Record<string, Json>): Promise<void> {
    if (this.doc(namespace, key)) return;
    const doc = A.change(A.init<Record<string, Json>>({ actor: "00" }), { time: 0 }, (d) => {
      Object.assign(d, initial);
    });
    const change = A.getLastLocalChange(doc);
    if (change) await this.enqueue(namespace, key, "crdt_op", { change: b64encode(change) });
  }

  /** Shows (or, with `null`, clears) this client's presence under `key`. */
  setPresence(key: string, payload: Json): void {
    if (!this.opts.presence) throw new UsageError("presence is off: pass `presence` in the options");
    if (payload === null) this.myPresence.delete(key);
    else this.myPresence.set(key, payload);
    if (this.conn.status === "live") this.conn.send({ type: "presence", key, payload });
  }

  // ---- events --------------------------------------------------------------

  onChange(cb: Listener<KeyChange>): () => void {
    return this.listen(this.changeListeners, cb);
  }

  onStatus(cb: Listener<Status>): () => void {
    return this.listen(this.statusListeners, cb);
  }

  onPresence(cb: Listener<PresenceEntry[]>): () => void {
    return this.listen(this.presenceListeners, cb);
  }

  /** Edits the server refused (already rolled back). */
  onReject(cb: Listener<RejectedError>): () => void {
    return this.listen(this.rejectListeners, cb);
  }

  /** Protocol-level `error` frames. */
  onError(cb: Listener<SyncError>): () => void {
    return this.listen(this.errorListeners, cb);
  }

  /** Calls `cb` with the key's view now and after every change to it. */
  subscribe(namespace: string, key: string, cb: Listener<View | undefined>): () => void {
    const id = `${namespace}\u0000${key}`;
    let set = this.keyListeners.get(id);
    if (!set) this.keyListeners.set(id, (set = new Set()));
    set.add(cb);
    cb(this.get(namespace, key));
    return () => {
      set.delete(cb);
      if (set.size === 0) this.keyListeners.delete(id);
    };
  }

  /** Resolves when the client is live and every edit is confirmed. */
  settled(timeoutMs = 30_000): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this.conn.status === "live" && this.outbox.length === 0) {
          done();
          resolve();
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`not settled after ${timeoutMs} ms (${this.outbox.length} pending, ${this.conn.status})`));
      }, timeoutMs);
      const offs = [this.onChange(check), this.onStatus(check)];
      const done = () => {
        clearTimeout(timer);
        offs.forEach((off) => off());
      };
      check();
    });
  }

  /** Drops the socket and connects again at once (tests, network changes). */
  reconnect(): void {
    this.conn.restart("reconnect requested", true);
  }

  /** Stops syncing; waits for pending store writes. The store keeps everything. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.presenceTimer);
    this.conn.stop();
    await this.writes.catch(() => {});
    this.store.close();
  }

  // ---- internals -----------------------------------------------------------

  private listen<T>(set: Set<Listener<T>>, cb: Listener<T>): () => void {
    set.add(cb);
    return () => set.delete(cb);
  }

  private replica(namespace: string): NamespaceReplica {
    const r = this.replicas.get(namespace);
    if (!r) throw new UsageError(`namespace ${namespace} is not replicated by this client`);
    return r;
  }

  private fromStored(e: StoredKey): Confirmed {
    const out: Confirmed = { value: e.value, version: e.version };
    if (e.doc) out.doc = A.load(b64decode(e.doc));
    return out;
  }

  private toStored(e: Confirmed): StoredKey {
    const out: StoredKey = { value: e.value, version: e.version };
    if (e.doc) out.doc = b64encode(A.save(e.doc));
    return out;
  }

  private commit(change: StoreChange): Promise<void> {
    const next = this.writes.then(() => this.store.commit(change));
    this.writes = next.catch(() => {});
    return next;
  }

  private async enqueue(
    namespace: string,
    key: string,
    opType: OpType,
    payload: Json,
    expectedVersion?: number,
  ): Promise<string> {
    if (this.closed) throw new UsageError("the client is closed");
    this.replica(namespace);
    const bytes = new TextEncoder().encode(key).length;
    if (bytes === 0 || bytes > 512 || /\p{Cc}/u.test(key)) {
      throw new UsageError("key must be 1-512 bytes of UTF-8 without control characters");
    }
    const n = this.nextId++;
    const base_seq = this.replica(namespace).lastSeq;
    const p: Outgoing = { command_id: `${this.clientId}-${n}`, n, namespace, key, op_type: opType, payload, base_seq };
    if (expectedVersion !== undefined) p.precondition = { expected_version: expectedVersion };
    this.outbox.push(p);
    this.changed(namespace, key, "local");
    const { ackedAt: _, rebase: _r, rebases: _n, ...stored } = p;
    await this.commit({ addPending: [stored], nextId: this.nextId });
    // Stored: now it may go out (a reload before this point never sent it).
    if (this.conn.status === "live" && this.outbox.includes(p)) this.sendCommand(p);
    return p.command_id;
  }

  private sendCommand(p: Outgoing): void {
    if (this.sent.has(p.command_id) || p.rebase) return;
    const frame = {
      type: "command" as const,
      command_id: p.command_id,
      namespace: p.namespace,
      key: p.key,
      op_type: p.op_type,
      payload: p.payload,
      ...(p.precondition ? { precondition: p.precondition } : {}),
      ...(p.base_seq !== undefined ? { base_seq: p.base_seq } : {}),
    };
    if (this.conn.send(frame)) this.sent.add(p.command_id);
  }

  private changed(namespace: string, key: string, origin: ChangeOrigin, op?: Op): void {
    this.docViews.delete(`${namespace}\u0000${key}`);
    const change: KeyChange = op ? { namespace, key, origin, op } : { namespace, key, origin };
    this.changeListeners.forEach((l) => l(change));
    const subs = this.keyListeners.get(`${namespace}\u0000${key}`);
    if (subs?.size) {
      const view = this.get(namespace, key);
      subs.forEach((l) => l(view));
    }
  }

  private hello(): void {
    const cursors: Record<string, number | null> = {};
    for (const [ns, r] of this.replicas) cursors[ns] = r.lastSeq > 0 ? r.lastSeq : null;
    if (this.opts.presence) cursors[this.opts.presence] = null;
    this.sent = new Set();
    this.unsynced = new Set(this.replicas.keys());
    const checkpoints: Record<string, string> = {};
    for (const [ns, part] of this.snapshotParts) {
      if (cursors[ns] === null && part.checkpoint) checkpoints[ns] = part.checkpoint;
      else this.snapshotParts.delete(ns);
    }
    this.conn.send({
      type: "hello",
      protocol: PROTOCOL_VERSION,
      org_id: this.opts.org,
      project_id: this.opts.project,
      client_id: this.clientId,
      cursors,
      ...(Object.keys(checkpoints).length ? { checkpoints } : {}),
    });
  }

  private onClosed(): void {
    this.sent = new Set();
    // Presence entries are the server's to keep; without a socket they go stale.
    if (this.presenceSeen.size) {
      this.presenceSeen.clear();
      this.emitPresence();
    }
  }

  private onFrame(m: ServerMessage): void {
    switch (m.type) {
      case "welcome":
        this.actorId = m.actor_id;
        this.conn.welcomed();
        if (this.unsynced.size === 0) this.goLive();
        return;
      case "snapshot":
        return this.onSnapshot(m);
      case "ops":
        return void this.onOps(m.namespace, m.ops);
      case "synced":
        this.unsynced.delete(m.namespace);
        if (this.unsynced.size === 0 && this.conn.status === "syncing") this.goLive();
        return;
      case "ack":
        return this.onAck(m.command_id, m.server_seq);
      case "reject":
        return void this.handleReject(m.command_id, m.code, m.reason, m.current_state);
      case "presence": {
        const id = `${m.actor_id}/${m.client_id}/${m.key}`;
        if (m.payload === null) this.presenceSeen.delete(id);
        else this.presenceSeen.set(id, { actorId: m.actor_id, clientId: m.client_id, key: m.key, payload: m.payload });
        return this.emitPresence();
      }
      case "error":
        if (m.code === "stale_base") return void this.resync();
        this.errorListeners.forEach((l) => l(new SyncError(m.code, m.message)));
        return;
      case "pong":
        return;
    }
  }

  private goLive(): void {
    this.conn.setStatus("live");
    for (const p of this.outbox) if (p.ackedAt === undefined) this.sendCommand(p);
    this.sendPresence();
  }

  private sendPresence(): void {
    if (this.conn.status !== "live") return;
    for (const [key, payload] of this.myPresence) this.conn.send({ type: "presence", key, payload });
  }

  private emitPresence(): void {
    const list = this.presence();
    this.presenceListeners.forEach((l) => l(list));
  }

  private onSnapshot(m: Extract<ServerMessage, { type: "snapshot" }>): void {
    if (!this.replicas.has(m.namespace)) return;
    let got = this.snapshotParts.get(m.namespace);
    if (!got || got.lastSeq !== m.last_server_seq) {
      // Another snapshot than the one received in part: start over.
      this.snapshotParts.set(m.namespace, (got = { lastSeq: m.last_server_seq, keys: new Map() }));
    }
    got.checkpoint = m.checkpoint;
    const part = got.keys;
    for (const [k, ks] of Object.entries(m.state)) {
      const e: Confirmed = { value: ks.value, version: ks.version };
      if (ks.doc) e.doc = A.load(b64decode(ks.doc));
      part.set(k, e);
    }
    if (m.more) return;
    this.snapshotParts.delete(m.namespace);
    // Edits refused `stale_base` now stand on this snapshot.
    for (const p of this.outbox) {
      if (p.rebase && p.namespace === m.namespace) {
        p.rebase = false;
        p.base_seq = m.last_server_seq;
      }
    }
    const replica = this.replica(m.namespace);
    const touched = new Set([...replica.keys.keys(), ...part.keys()]);
    replica.keys = part;
    replica.lastSeq = m.last_server_seq;
    const keys: Record<string, StoredKey> = {};
    for (const [k, e] of part) keys[k] = this.toStored(e);
    void this.commit({ replace: { [m.namespace]: { lastSeq: m.last_server_seq, keys } } });
    for (const k of touched) this.changed(m.namespace, k, "snapshot");
  }

  private async onOps(namespace: string, ops: Op[]): Promise<void> {
    const replica = this.replicas.get(namespace);
    if (!replica) return;
    const applied: Op[] = [];
    const written = new Map<string, Confirmed | null>();
    const settled: string[] = [];
    for (const op of ops) {
      if (op.server_seq <= replica.lastSeq) continue;
      if (op.server_seq !== replica.lastSeq + 1) {
        // A hole: never apply past it; a new socket catches up from the cursor.
        this.conn.restart(`op ${op.server_seq} after ${replica.lastSeq}`);
        break;
      }
      const current = replica.keys.get(op.key);
      let next: Confirmed | undefined;
      try {
        next = this.applyConfirmed(current, op);
      } catch (e) {
        this.errorListeners.forEach((l) => l(new SyncError("internal", `op ${op.server_seq}: ${String(e)}`)));
        this.conn.restart("an op did not apply");
        break;
      }
      if (next) replica.keys.set(op.key, next);
      else replica.keys.delete(op.key);
      replica.lastSeq = op.server_seq;
      written.set(op.key, next ?? null);
      applied.push(op);
    }
    if (applied.length === 0) return;
    // Own edits (by command id, or acknowledged at or below the cursor) are settled.
    const own = new Set(applied.filter((o) => o.client_id === this.clientId).map((o) => o.command_id));
    this.outbox = this.outbox.filter((p) => {
      const done = own.has(p.command_id) || (p.ackedAt !== undefined && p.namespace === namespace && p.ackedAt <= replica.lastSeq);
      if (done) settled.push(p.command_id);
      return !done;
    });
    const last = replica.lastSeq;
    const commit = this.commit({
      keys: [...written].map(([key, e]) => ({ namespace, key, entry: e && this.toStored(e) })),
      cursors: { [namespace]: last },
      removePending: settled,
    });
    for (const op of applied) this.changed(namespace, op.key, "remote", op);
    try {
      await commit;
    } catch {
      return;
    }
    // Durable locally: tell the server.
    this.conn.send({ type: "cursor", namespace, server_seq: last });
  }

  private applyConfirmed(current: Confirmed | undefined, op: Op): Confirmed | undefined {
    if (op.op_type !== "crdt_op") {
      if (op.op_type === "patch" && current?.doc) throw new Error("patch on an Automerge document");
      return nextEntry(current, op.op_type, op.payload, op.server_seq);
    }
    if (current && !current.doc) throw new Error("crdt_op on a key that holds a plain value");
    const change = b64decode((op.payload as { change: string }).change);
    const [doc] = A.applyChanges(current?.doc ?? A.init<unknown>(), [change]);
    return { value: docValue(doc), version: op.server_seq, doc };
  }

  private onAck(commandId: string, serverSeq: number): void {
    const p = this.outbox.find((x) => x.command_id === commandId);
    if (!p) return;
    const replica = this.replica(p.namespace);
    if (serverSeq > replica.lastSeq) {
      // Keep it in the view until its op is applied (no flicker back).
      p.ackedAt = serverSeq;
      return;
    }
    this.outbox = this.outbox.filter((x) => x !== p);
    void this.commit({ removePending: [commandId] });
    this.changed(p.namespace, p.key, "ack");
  }

  private async handleReject(
    commandId: string,
    code: ErrorCode,
    reason: string,
    currentState: CurrentState | undefined,
  ): Promise<void> {
    const p = this.outbox.find((x) => x.command_id === commandId);
    if (TRANSIENT.has(code)) {
      // Keep it; send it again on a new socket after the backoff.
      this.conn.restart(`${code}: ${reason}`);
      return;
    }
    if (!p) return;
    // Made on a state the log was compacted past (nothing written): resync, then
    // send it again on the new snapshot.
    const staleEdit = code === "stale_base" && currentState !== undefined;
    if (staleEdit && (p.rebases ?? 0) < MAX_REBASES) {
      p.rebase = true;
      p.rebases = (p.rebases ?? 0) + 1;
      return this.resync();
    }
    this.outbox = this.outbox.filter((x) => x !== p);
    this.changed(p.namespace, p.key, "rollback");
    const commit = this.commit({ removePending: [commandId] });
    // stale_base without current_state: a resend of something applied long ago
    // (compacted); anything else is rolled back.
    if (code !== "stale_base" || staleEdit) {
      const err = new RejectedError(commandId, code, reason, currentState);
      this.rejectListeners.forEach((l) => l(err));
    }
    await commit.catch(() => {});
  }

  /** The server cannot continue from a stored cursor: start over from snapshots. */
  private async resync(): Promise<void> {
    this.snapshotParts = new Map();
    const replace: Record<string, { lastSeq: number; keys: Record<string, StoredKey> }> = {};
    for (const [ns, r] of this.replicas) {
      r.lastSeq = 0;
      replace[ns] = { lastSeq: 0, keys: Object.fromEntries([...r.keys].map(([k, e]) => [k, this.toStored(e)])) };
    }
    await this.commit({ replace }).catch(() => {});
    this.conn.restart("stale_base: resync from a snapshot", true);
  }
}
