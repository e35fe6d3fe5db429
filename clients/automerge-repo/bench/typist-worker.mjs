// One load-generator process of bench/typists.mjs: a few automerge-repo peers (one
// Repo and one WebSocket each) on the benchmark's document. Driven over the IPC
// channel of child_process.fork:
//
//   ← {type: "init", url, docUrl, ids, peers, interval}   connect, find the document
//   → {type: "ready"}
//   ← {type: "start", t0, until}   typist `id` makes its k-th change (k = 1, 2, …)
//                                  at t0 + interval·id/peers + (k-1)·interval, until `until`
//   ← {type: "stop"}               stop typing and report
//   → {type: "report", sends, receipts, lateness, loopDelayP99Ms, made}
//
// Times are milliseconds on the machine's clock (performance.timeOrigin +
// performance.now(), comparable across the processes of one machine). Every change
// sets the typist's `n` and `t` and types one character; a peer that sees typist
// `who` at `n` has every change of `who` up to `n` (one actor's changes apply in
// order), so a receipt covers every change since the last one it saw.

import { Repo, splice } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { monitorEventLoopDelay } from "node:perf_hooks"

const now = () => performance.timeOrigin + performance.now()

let typists = []
let stopped = false
const loop = monitorEventLoopDelay({ resolution: 10 })

async function findWithRetry(repo, docUrl) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await repo.find(docUrl)
    } catch (e) {
      if (attempt >= 50) throw e
      await new Promise(r => setTimeout(r, 200))
    }
  }
}

async function connect(url, docUrl, id) {
  const repo = new Repo({ network: [new WebSocketClientAdapter(url, 1000)] })
  await new Promise(resolve => repo.networkSubsystem.once("peer", resolve))
  const handle = await findWithRetry(repo, docUrl)
  const t = {
    id,
    repo,
    handle,
    // Per other typist: the last n seen.
    seen: new Map(),
    // [who, fromN, toN, time] for every change event that brought something new.
    receipts: [],
    // sends[n-1] = time change n was made.
    sends: [],
    // made - due, per change (ms).
    lateness: [],
  }
  handle.on("change", ({ doc }) => {
    const at = now()
    for (const [who, entry] of Object.entries(doc.typists ?? {})) {
      if (Number(who) === id) continue
      const last = t.seen.get(who) ?? 0
      if (entry.n > last) {
        t.seen.set(who, entry.n)
        t.receipts.push([Number(who), last + 1, entry.n, at])
      }
    }
  })
  return t
}

function type(t, n, due) {
  const made = now()
  t.lateness.push(made - due)
  t.sends.push(made)
  t.handle.change(d => {
    if (!d.typists) d.typists = {}
    if (!d.typists[t.id]) d.typists[t.id] = { n: 0, t: 0 }
    d.typists[t.id].n = n
    d.typists[t.id].t = made
    if (!d.text) d.text = ""
    splice(d, ["text"], Math.floor(Math.random() * (d.text.length + 1)), 0, "x")
  })
}

function start({ t0, until, interval, peers }) {
  loop.enable()
  for (const t of typists) {
    const offset = (interval * t.id) / peers
    let n = 0
    const next = () => {
      if (stopped) return
      const due = t0 + offset + n * interval
      if (due > until) return
      const wait = due - now()
      setTimeout(
        () => {
          if (stopped) return
          n += 1
          type(t, n, due)
          next()
        },
        Math.max(0, wait)
      )
    }
    next()
  }
}

process.on("message", async msg => {
  if (msg.type === "init") {
    try {
      for (const id of msg.ids) typists.push(await connect(msg.url, msg.docUrl, id))
      process.send({ type: "ready" })
    } catch (e) {
      process.send({ type: "failed", error: String(e?.stack ?? e) })
    }
  } else if (msg.type === "start") {
    start(msg)
  } else if (msg.type === "stop") {
    stopped = true
    loop.disable()
    process.send({
      type: "report",
      typists: typists.map(t => ({ id: t.id, sends: t.sends, receipts: t.receipts, lateness: t.lateness })),
      loopDelayP99Ms: loop.count ? loop.percentile(99) / 1e6 : null,
      loopDelayMaxMs: loop.count ? loop.max / 1e6 : null,
    })
    // Let the report flush, then leave without closing sockets gracefully (the
    // server sees them go; nothing waits on them).
    setTimeout(() => process.exit(0), 200)
  }
})
