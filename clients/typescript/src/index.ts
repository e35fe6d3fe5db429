/**
 * `@ultrasync/client`: the browser and Node client of ultrasync's native protocol.
 *
 * ```ts
 * import { SyncClient, IndexedDbStore } from "@ultrasync/client";
 * const client = await SyncClient.open({
 *   url: "ws://127.0.0.1:8080/v1/sync", token, org: "dev", project: "demo",
 *   namespaces: ["index", "settings", "collab"], presence: "presence",
 *   store: await IndexedDbStore.open("demo"),
 * });
 * client.subscribe("index", "greeting", (view) => render(view?.value));
 * await client.put("index", "greeting", "hello"); // stored, shown, then sent
 * ```
 */

export { SyncClient } from "./client.js";
export type { ChangeOrigin, ClientOptions, KeyChange, PresenceEntry, View } from "./client.js";
export { Connection, browserWebSocket } from "./connection.js";
export type { Status, WebSocketFactory, WebSocketLike } from "./connection.js";
export { Backoff } from "./backoff.js";
export { canonicalJson, mergePatch, nextEntry } from "./apply.js";
export type { Entry } from "./apply.js";
export { RejectedError, StoreError, SyncError, UsageError } from "./errors.js";
export { MemoryStore, applyStoreChange, emptyReplica } from "./store.js";
export type { Pending, Store, StoreChange, StoredKey, StoredNamespace, StoredReplica } from "./store.js";
export { IndexedDbStore } from "./idb.js";
export * from "./types.js";
