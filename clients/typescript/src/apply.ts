/**
 * The plain-op state machine, the same as the server's `shared::state::next_entry`:
 * `set` replaces the value, `del` removes the key, `patch` applies an RFC 7386 merge
 * patch to the current value (`{}` when absent or not an object). The SDK uses it for
 * its confirmed state and for the optimistic view (confirmed + pending edits); the
 * test vectors generated from the Rust side check both agree byte for byte.
 */

import type { Json, OpType } from "./types.js";

export interface Entry {
  value: Json;
  version: number;
}

function isObject(v: Json | undefined): v is { [key: string]: Json } {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** RFC 7386: a new value, `target` is not modified. */
export function mergePatch(target: Json | undefined, patch: Json): Json {
  if (!isObject(patch)) return structuredClone(patch);
  const out: { [key: string]: Json } = isObject(target) ? { ...target } : {};
  for (const [name, value] of Object.entries(patch)) {
    if (value === null) {
      delete out[name];
    } else {
      out[name] = mergePatch(out[name], value);
    }
  }
  return out;
}

/**
 * What an op does to one key's entry: the next entry, or `undefined` when the key is
 * gone. `crdt_op` is handled by the Automerge side of the client, not here.
 */
export function nextEntry(
  current: Entry | undefined,
  opType: OpType,
  payload: Json,
  seq: number,
): Entry | undefined {
  switch (opType) {
    case "set":
      return { value: structuredClone(payload), version: seq };
    case "del":
      return undefined;
    case "patch":
      return { value: mergePatch(current?.value ?? {}, payload), version: seq };
    case "crdt_op":
      throw new Error("crdt_op is applied to the key's Automerge document");
  }
}

/** JSON with object members sorted by key, no whitespace (the server's digest form). */
export function canonicalJson(v: Json): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(",")}]`;
  if (isObject(v)) {
    const keys = Object.keys(v).sort(compareUtf8);
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(v[k] as Json)}`).join(",")}}`;
  }
  return JSON.stringify(v);
}

/** Orders strings by their UTF-8 bytes, as Rust's `String` ordering does. */
function compareUtf8(a: string, b: string): number {
  const enc = new TextEncoder();
  const x = enc.encode(a);
  const y = enc.encode(b);
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) {
    if (x[i] !== y[i]) return (x[i] as number) - (y[i] as number);
  }
  return x.length - y.length;
}
