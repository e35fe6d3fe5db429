// One automerge-repo peer, unmodified (`Repo` + `WebSocketClientAdapter`), driven
// by tests/automerge_repo.rs over stdin/stdout: one JSON command a line in, one
// JSON answer a line out ({"ok": ...} or {"error": "..."}). Waiting commands wait
// for a condition (never for a time); the Rust side bounds how long it waits.
//
//   node test/peer.mjs <ws url with ?access_token=...>
//
// Commands: create {value} → {url, heads}; change {url, key, value} → {heads};
// find {url} → {doc} | error; doc {url} → {doc, heads}; wait {url, key, value} →
// {doc} once doc[key] equals value; wait_server_heads {url} → {heads} once the
// server's heads (what the sync server says it stores) include this peer's;
// broadcast {url, message}; wait_ephemeral {url, match} → {message} once an
// ephemeral message equal to `match` arrived; errors → {errors} (the server's
// `error` frames so far); wait_error {contains} → {message}; peer → {peerId,
// storageId}.

import { Repo, cbor } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { createInterface } from "node:readline"

const url = process.argv[2]
if (!url) {
  console.error("usage: node test/peer.mjs <ws url>")
  process.exit(2)
}

const adapter = new WebSocketClientAdapter(url, 500)
const errors = []
const errorWaiters = []
// The adapter only logs `error` frames; tests want to see them.
const receive = adapter.receiveMessage.bind(adapter)
adapter.receiveMessage = bytes => {
  try {
    const m = cbor.decode(new Uint8Array(bytes))
    if (m && m.type === "error") {
      errors.push(m.message)
      for (const w of errorWaiters.splice(0)) w()
    }
  } catch {
    // the adapter reports undecodable frames itself
  }
  return receive(bytes)
}

let server = null
const connected = new Promise(resolve => {
  adapter.on("peer-candidate", ({ peerId, peerMetadata }) => {
    server = { peerId, storageId: peerMetadata?.storageId }
    resolve()
  })
})

const repo = new Repo({ network: [adapter] })
const handles = new Map()
const ephemeral = new Map()
const ephemeralWaiters = []

function track(handle) {
  if (handles.has(handle.url)) return handle
  handles.set(handle.url, handle)
  ephemeral.set(handle.url, [])
  handle.on("ephemeral-message", ({ message }) => {
    ephemeral.get(handle.url).push(message)
    for (const w of ephemeralWaiters.splice(0)) w()
  })
  return handle
}

function handle(url) {
  const h = handles.get(url)
  if (!h) throw new Error(`no handle for ${url}; create or find it first`)
  return h
}

const plain = doc => JSON.parse(JSON.stringify(doc ?? null))
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b)

function until(h, check) {
  return new Promise(resolve => {
    const test = () => {
      const r = check()
      if (r !== undefined) {
        h.off("change", test)
        h.off("remote-heads", test)
        resolve(r)
      }
    }
    h.on("change", test)
    h.on("remote-heads", test)
    test()
  })
}

// The server's heads as this peer's sync state saw them last.
function serverHeads(h) {
  const info = server?.storageId ? h.getSyncInfo(server.storageId) : undefined
  return info?.lastHeads ?? []
}

const commands = {
  async peer() {
    return server
  },
  async create({ value }) {
    const h = track(repo.create(value ?? {}))
    return { url: h.url, heads: h.heads() }
  },
  async change({ url, key, value }) {
    const h = handle(url)
    h.change(d => {
      d[key] = value
    })
    return { heads: h.heads() }
  },
  async find({ url }) {
    const h = track(await repo.find(url))
    return { doc: plain(h.doc()), heads: h.heads() }
  },
  async doc({ url }) {
    const h = handle(url)
    return { doc: plain(h.doc()), heads: h.heads() }
  },
  async wait({ url, key, value }) {
    const h = handle(url)
    const doc = await until(h, () => {
      const d = plain(h.doc())
      return d && same(d[key], value) ? d : undefined
    })
    return { doc }
  },
  async wait_server_heads({ url }) {
    const h = handle(url)
    const heads = await new Promise(resolve => {
      const test = () => {
        const mine = h.heads()
        const theirs = serverHeads(h)
        if (mine.length > 0 && mine.every(x => theirs.includes(x))) {
          clearInterval(poll)
          h.off("remote-heads", test)
          resolve(theirs)
        }
      }
      // Sync info is updated without an event of its own; look on each message.
      const poll = setInterval(test, 20)
      h.on("remote-heads", test)
      test()
    })
    return { heads }
  },
  async broadcast({ url, message }) {
    handle(url).broadcast(message)
    return {}
  },
  async wait_ephemeral({ url, match }) {
    const list = ephemeral.get(url)
    if (!list) throw new Error(`no handle for ${url}`)
    const message = await new Promise(resolve => {
      const test = () => {
        const found = list.find(m => same(m, match))
        if (found !== undefined) resolve(found)
        else ephemeralWaiters.push(test)
      }
      test()
    })
    return { message }
  },
  async errors() {
    return { errors }
  },
  async wait_error({ contains }) {
    const message = await new Promise(resolve => {
      const test = () => {
        const found = errors.find(e => e.includes(contains))
        if (found !== undefined) resolve(found)
        else errorWaiters.push(test)
      }
      test()
    })
    return { message }
  },
}

const lines = createInterface({ input: process.stdin })
let queue = Promise.resolve()
lines.on("line", line => {
  if (!line.trim()) return
  // Commands run one at a time, in order.
  queue = queue.then(async () => {
    let answer
    try {
      const cmd = JSON.parse(line)
      const run = commands[cmd.cmd]
      if (!run) throw new Error(`unknown command ${cmd.cmd}`)
      if (cmd.cmd !== "errors") await connected
      answer = { ok: (await run(cmd)) ?? {} }
    } catch (e) {
      answer = { error: String(e?.message ?? e) }
    }
    process.stdout.write(JSON.stringify(answer) + "\n")
  })
})
lines.on("close", () => {
  queue.then(() => {
    adapter.disconnect()
    process.exit(0)
  })
})
