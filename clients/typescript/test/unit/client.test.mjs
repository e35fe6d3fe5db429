// The client's protocol behaviour against a scripted server: hello with cursors,
// multi-frame snapshots, catch-up, outbox after synced, acks without flicker,
// rollback on reject, resume by cursor with the same command ids, stale_base resync,
// Automerge changes, and an IndexedDB outbox that survives a reload.
import "fake-indexeddb/auto";

import assert from "node:assert/strict";
import { test } from "node:test";

import { Backoff, IndexedDbStore, MemoryStore, SyncClient } from "../../dist/index.js";
import { FakeServer, op, tick } from "./fake-server.mjs";

async function open(server, extra = {}) {
  return SyncClient.open({
    url: "ws://gateway.test/v1/sync",
    token: "tok",
    org: "o",
    project: "p",
    namespaces: ["index"],
    clientId: "me",
    store: new MemoryStore(),
    webSocket: server.factory,
    backoffStartMs: 5,
    backoffMaxMs: 20,
    ...extra,
  });
}

/** Opens the socket, answers hello, and plays `frames` then `synced`. */
async function connect(server, n, frames = [], synced = 0) {
  const s = await server.socket(n);
  s.open();
  await s.until((sent) => sent.some((f) => f.type === "hello"));
  s.push({ type: "welcome", protocol: 1, server_id: "g", session_id: `s${n}`, actor_id: "a" });
  for (const f of frames) s.push(f);
  s.push({ type: "synced", namespace: "index", server_seq: synced });
  return s;
}

test("hello, multi-frame snapshot, catch-up, cursor report, then the outbox in order", async () => {
  const server = new FakeServer();
  const client = await open(server);
  try {
    await client.put("index", "a", 1);
    await client.patch("index", "b", { x: 1 });
    const s = await server.socket(0);
    assert.equal(s.url, "ws://gateway.test/v1/sync");
    assert.equal(s.token, "tok");
    s.open();
    await s.until((sent) => sent.length > 0);
    assert.deepEqual(s.sent[0], { type: "hello", protocol: 1, org_id: "o", project_id: "p", client_id: "me", cursors: { index: null } });
    assert.equal(s.frames("command").length, 0, "nothing before synced");
    s.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s", actor_id: "a" });
    s.push({ type: "snapshot", namespace: "index", last_server_seq: 4, state: { k1: { value: "one", version: 2 } }, digest: "d", more: true });
    assert.equal(client.get("index", "k1"), undefined, "a partial snapshot is not applied");
    s.push({ type: "snapshot", namespace: "index", last_server_seq: 4, state: { k2: { value: "two", version: 4 } }, digest: "d" });
    assert.equal(client.get("index", "k1").value, "one");
    s.push({ type: "ops", namespace: "index", seq_start: 5, ops: [op({ server_seq: 5, key: "k1", op_type: "set", payload: "uno" })] });
    await s.until((sent) => sent.some((f) => f.type === "cursor"));
    assert.deepEqual(s.frames("cursor").at(-1), { type: "cursor", namespace: "index", server_seq: 5 });
    s.push({ type: "synced", namespace: "index", server_seq: 5 });
    await s.until((sent) => sent.filter((f) => f.type === "command").length === 2);
    assert.deepEqual(s.frames("command").map((c) => [c.command_id, c.key, c.op_type]), [["me-1", "a", "set"], ["me-2", "b", "patch"]]);
    assert.equal(client.status, "live");
  } finally {
    await client.close();
  }
});

test("an ack keeps the edit visible until its op arrives; a reject rolls back with the server's state", async () => {
  const server = new FakeServer();
  const client = await open(server, { namespaces: ["settings"] });
  try {
    const s = await server.socket(0);
    s.open();
    await s.until((sent) => sent.length > 0);
    s.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s", actor_id: "a" });
    s.push({ type: "snapshot", namespace: "settings", last_server_seq: 1, state: { theme: { value: "light", version: 1 } }, digest: "d" });
    s.push({ type: "synced", namespace: "settings", server_seq: 1 });
    const rejects = [];
    client.onReject((e) => rejects.push(e));
    const seen = [];
    client.subscribe("settings", "theme", (v) => seen.push(v?.value));

    const id = await client.putIf("settings", "theme", "dark", 1);
    await s.until((sent) => sent.some((f) => f.type === "command"));
    assert.deepEqual(s.frames("command")[0].precondition, { expected_version: 1 });
    s.push({ type: "ack", command_id: id, server_seq: 2, op: {} });
    assert.equal(client.get("settings", "theme").value, "dark", "still shown after the ack");
    s.push({ type: "ops", namespace: "settings", seq_start: 2, ops: [op({ namespace: "settings", server_seq: 2, key: "theme", op_type: "set", payload: "dark", client_id: "me", command_id: id })] });
    assert.equal(client.pendingCount, 0);
    assert.deepEqual(client.get("settings", "theme"), { value: "dark", version: 2, pending: false });

    // Someone else wins; our CAS write is refused and rolled back.
    s.push({ type: "ops", namespace: "settings", seq_start: 3, ops: [op({ namespace: "settings", server_seq: 3, key: "theme", op_type: "set", payload: "blue" })] });
    const lost = await client.putIf("settings", "theme", "green", 2);
    assert.equal(client.get("settings", "theme").value, "green");
    s.push({ type: "reject", command_id: lost, code: "precondition_failed", reason: "version is 3", current_state: { key: "theme", version: 3, value: "blue" } });
    await tick();
    assert.deepEqual(client.get("settings", "theme"), { value: "blue", version: 3, pending: false });
    assert.equal(rejects.length, 1);
    assert.equal(rejects[0].code, "precondition_failed");
    assert.deepEqual(rejects[0].currentState, { key: "theme", version: 3, value: "blue" });
    assert.deepEqual(seen, ["light", "dark", "dark", "blue", "green", "blue"]);
  } finally {
    await client.close();
  }
});

test("a reconnect resumes from the cursor, drops own ops found in the catch-up, resends the rest with the same ids", async () => {
  const server = new FakeServer();
  const client = await open(server);
  try {
    const s0 = await connect(server, 0, [{ type: "snapshot", namespace: "index", last_server_seq: 0, state: {}, digest: "d" }]);
    const a = await client.put("index", "a", 1);
    const b = await client.put("index", "b", 2);
    await s0.until((sent) => sent.filter((f) => f.type === "command").length === 2);
    s0.drop();
    const s1 = await connect(server, 1, [
      { type: "ops", namespace: "index", seq_start: 1, ops: [op({ server_seq: 1, key: "a", op_type: "set", payload: 1, client_id: "me", command_id: a })] },
    ], 1);
    assert.deepEqual(s1.sent[0].cursors, { index: null }, "nothing was confirmed before");
    await s1.until((sent) => sent.some((f) => f.type === "command"));
    assert.deepEqual(s1.frames("command").map((c) => c.command_id), [b]);
    s1.push({ type: "ops", namespace: "index", seq_start: 2, ops: [op({ server_seq: 2, key: "b", op_type: "set", payload: 2, client_id: "me", command_id: b })] });
    s1.drop();
    const s2 = await server.socket(2);
    s2.open();
    await s2.until((sent) => sent.some((f) => f.type === "hello"));
    assert.deepEqual(s2.sent[0].cursors, { index: 2 });
    // The server cannot go on from 2 (compacted): the client starts over from a snapshot.
    s2.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s", actor_id: "a" });
    s2.push({ type: "error", code: "stale_base", message: "compacted" });
    const s3 = await server.socket(3);
    s3.open();
    await s3.until((sent) => sent.some((f) => f.type === "hello"));
    assert.deepEqual(s3.sent[0].cursors, { index: null });
    assert.equal(client.pendingCount, 0);
  } finally {
    await client.close();
  }
});

test("a snapshot cut off is continued from its checkpoint; a replaced one starts over", async () => {
  const server = new FakeServer();
  const client = await open(server);
  try {
    const s0 = await server.socket(0);
    s0.open();
    await s0.until((sent) => sent.some((f) => f.type === "hello"));
    s0.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s0", actor_id: "a" });
    s0.push({ type: "snapshot", namespace: "index", last_server_seq: 9, state: { k1: { value: 1, version: 1 } }, digest: "d", more: true, checkpoint: "cp-1" });
    s0.drop();
    const s1 = await server.socket(1);
    s1.open();
    await s1.until((sent) => sent.some((f) => f.type === "hello"));
    assert.deepEqual(s1.sent[0].checkpoints, { index: "cp-1" });
    s1.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s1", actor_id: "a" });
    s1.push({ type: "snapshot", namespace: "index", last_server_seq: 9, state: { k2: { value: 2, version: 9 } }, digest: "d", checkpoint: "cp-2" });
    s1.push({ type: "synced", namespace: "index", server_seq: 9 });
    assert.equal(client.get("index", "k1").value, 1, "the first part was kept");
    assert.equal(client.get("index", "k2").value, 2);
    // An edit made on 9, refused because the log was compacted past it: resync, resend.
    const id = await client.put("index", "k3", 3);
    await s1.until((sent) => sent.some((f) => f.type === "command"));
    assert.equal(s1.frames("command")[0].base_seq, 9);
    s1.push({ type: "reject", command_id: id, code: "stale_base", reason: "below the floor", current_state: { key: "k3", version: 0, value: null } });
    const s2 = await server.socket(2);
    s2.open();
    await s2.until((sent) => sent.some((f) => f.type === "hello"));
    assert.deepEqual(s2.sent[0].cursors, { index: null });
    assert.equal(s2.sent[0].checkpoints, undefined);
    assert.equal(client.get("index", "k3").pending, true, "the edit is kept");
    s2.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s2", actor_id: "a" });
    s2.push({ type: "snapshot", namespace: "index", last_server_seq: 20, state: {}, digest: "e", more: true, checkpoint: "cp-3" });
    s2.drop();
    // The snapshot named by cp-3 was replaced: stale_base, and the client starts over.
    const s3 = await server.socket(3);
    s3.open();
    await s3.until((sent) => sent.some((f) => f.type === "hello"));
    assert.deepEqual(s3.sent[0].checkpoints, { index: "cp-3" });
    s3.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s3", actor_id: "a" });
    s3.push({ type: "error", code: "stale_base", message: "replaced" });
    const s4 = await connect(server, 4, [{ type: "snapshot", namespace: "index", last_server_seq: 21, state: {}, digest: "f", checkpoint: "cp-4" }], 21);
    assert.equal(s4.sent[0].checkpoints, undefined);
    await s4.until((sent) => sent.some((f) => f.type === "command"));
    assert.deepEqual(s4.frames("command").map((c) => [c.command_id, c.base_seq]), [[id, 21]]);
  } finally {
    await client.close();
  }
});

test("the IndexedDB outbox survives a reload with its command ids", async () => {
  const server = new FakeServer();
  const first = await open(server, { clientId: undefined, store: await IndexedDbStore.open("reload") });
  const ids = [];
  for (let i = 0; i < 5; i++) ids.push(await first.put("index", `k${i}`, i));
  await first.patch("index", "k0", { note: "x" });
  const clientId = first.clientId;
  await first.close();

  const again = new FakeServer();
  const second = await open(again, { clientId: undefined, store: await IndexedDbStore.open("reload") });
  try {
    assert.equal(second.clientId, clientId, "the client id is kept in the store");
    assert.equal(second.pendingCount, 6);
    assert.deepEqual(second.get("index", "k0").value, { note: "x" });
    const s = await connect(again, 0, [{ type: "snapshot", namespace: "index", last_server_seq: 0, state: {}, digest: "d" }]);
    await s.until((sent) => sent.filter((f) => f.type === "command").length === 6);
    assert.deepEqual(s.frames("command").slice(0, 5).map((c) => c.command_id), ids);
    const next = await second.put("index", "new", true);
    assert.equal(next, `${clientId}-7`, "numbering goes on after the reload");
  } finally {
    await second.close();
  }
});

test("Automerge changes are queued as crdt_op and merge with the server's", async () => {
  const server = new FakeServer();
  const client = await open(server, { namespaces: ["collab"] });
  try {
    await client.seedDoc("collab", "note", { text: "" });
    await client.change("collab", "note", (d) => {
      d.text = "hello";
    });
    assert.deepEqual(client.get("collab", "note").value, { text: "hello" });
    assert.equal(await client.change("collab", "note", () => {}), undefined, "no change, nothing queued");
    const s = await server.socket(0);
    s.open();
    await s.until((sent) => sent.length > 0);
    s.push({ type: "welcome", protocol: 1, server_id: "g", session_id: "s", actor_id: "a" });
    s.push({ type: "snapshot", namespace: "collab", last_server_seq: 0, state: {}, digest: "d" });
    s.push({ type: "synced", namespace: "collab", server_seq: 0 });
    await s.until((sent) => sent.filter((f) => f.type === "command").length === 2);
    const [seed, edit] = s.frames("command");
    assert.equal(seed.op_type, "crdt_op");
    s.push({ type: "ops", namespace: "collab", seq_start: 1, ops: [
      op({ namespace: "collab", server_seq: 1, key: "note", op_type: "crdt_op", payload: seed.payload, client_id: "me", command_id: seed.command_id }),
      op({ namespace: "collab", server_seq: 2, key: "note", op_type: "crdt_op", payload: edit.payload, client_id: "me", command_id: edit.command_id }),
    ] });
    assert.equal(client.pendingCount, 0);
    assert.deepEqual(client.get("collab", "note"), { value: { text: "hello" }, version: 2, pending: false });
  } finally {
    await client.close();
  }
});

test("backoff doubles to its cap with ±50 % jitter", () => {
  const lo = new Backoff(100, 1000, () => 0);
  assert.deepEqual([1, 2, 3, 4, 5].map(() => lo.delay()), [50, 100, 200, 400, 500]);
  const hi = new Backoff(100, 1000, () => 0.999);
  assert.equal(hi.delay(), 150);
  assert.equal(hi.delay(), 300);
  hi.reset();
  assert.equal(hi.delay(), 150);
});
