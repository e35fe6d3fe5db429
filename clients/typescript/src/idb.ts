/**
 * The browser store: one IndexedDB database per replica. Each [`StoreChange`] is one
 * readwrite transaction over all object stores, resolved on `complete` (durable), so
 * a queued edit survives a reload or a crash the moment its promise resolves.
 *
 * Object stores: `meta` (client id, next command number, one cursor per namespace),
 * `keys` (`[namespace, key]` → value, version, document), `outbox` (command id →
 * pending edit, ordered by its number on load).
 */

import { StoreError } from "./errors.js";
import type { Pending, Store, StoreChange, StoredKey, StoredReplica } from "./store.js";
import { emptyReplica } from "./store.js";

const VERSION = 1;

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(new StoreError(`IndexedDB: ${r.error?.message ?? "request failed"}`));
  });
}

export class IndexedDbStore implements Store {
  private constructor(private readonly db: IDBDatabase) {}

  /** Opens (or creates) the database `ultrasync:<name>`. */
  static async open(name: string, factory: IDBFactory = globalThis.indexedDB): Promise<IndexedDbStore> {
    if (!factory) throw new StoreError("IndexedDB is not available here; use MemoryStore");
    const open = factory.open(`ultrasync:${name}`, VERSION);
    open.onupgradeneeded = () => {
      const db = open.result;
      if (!db.objectStoreNames.contains("meta")) db.createObjectStore("meta");
      if (!db.objectStoreNames.contains("keys")) db.createObjectStore("keys");
      if (!db.objectStoreNames.contains("outbox")) db.createObjectStore("outbox", { keyPath: "command_id" });
    };
    return new IndexedDbStore(await request(open));
  }

  async load(): Promise<StoredReplica> {
    const tx = this.db.transaction(["meta", "keys", "outbox"], "readonly");
    const meta = tx.objectStore("meta");
    const keys = tx.objectStore("keys");
    const [metaKeys, metaValues, keyKeys, keyValues, outbox] = await Promise.all([
      request(meta.getAllKeys()),
      request(meta.getAll()),
      request(keys.getAllKeys()),
      request(keys.getAll()),
      request(tx.objectStore("outbox").getAll() as IDBRequest<Pending[]>),
    ]);
    const r = emptyReplica();
    metaKeys.forEach((k, i) => {
      const v = metaValues[i];
      if (k === "client_id") r.clientId = v as string;
      else if (k === "next_id") r.nextId = v as number;
      else if (typeof k === "string" && k.startsWith("cursor:")) {
        (r.namespaces[k.slice(7)] ??= { lastSeq: 0, keys: {} }).lastSeq = v as number;
      }
    });
    keyKeys.forEach((k, i) => {
      const [ns, key] = k as [string, string];
      (r.namespaces[ns] ??= { lastSeq: 0, keys: {} }).keys[key] = keyValues[i] as StoredKey;
    });
    r.outbox = outbox.sort((a, b) => a.n - b.n);
    return r;
  }

  commit(c: StoreChange): Promise<void> {
    const tx = this.db.transaction(["meta", "keys", "outbox"], "readwrite", { durability: "strict" });
    const meta = tx.objectStore("meta");
    const keys = tx.objectStore("keys");
    const outbox = tx.objectStore("outbox");
    if (c.clientId !== undefined) meta.put(c.clientId, "client_id");
    if (c.nextId !== undefined) meta.put(c.nextId, "next_id");
    for (const [ns, st] of Object.entries(c.replace ?? {})) {
      // Arrays sort after strings: [ns, []] bounds every [ns, key].
      keys.delete(IDBKeyRange.bound([ns], [ns, []]));
      for (const [key, entry] of Object.entries(st.keys)) keys.put(entry, [ns, key]);
      meta.put(st.lastSeq, `cursor:${ns}`);
    }
    for (const { namespace, key, entry } of c.keys ?? []) {
      if (entry === null) keys.delete([namespace, key]);
      else keys.put(entry, [namespace, key]);
    }
    for (const [ns, seq] of Object.entries(c.cursors ?? {})) meta.put(seq, `cursor:${ns}`);
    for (const id of c.removePending ?? []) outbox.delete(id);
    for (const p of c.addPending ?? []) outbox.put(p);
    return new Promise((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onabort = tx.onerror = () =>
        reject(new StoreError(`IndexedDB commit: ${tx.error?.message ?? "aborted"}`));
    });
  }

  close(): void {
    this.db.close();
  }
}
