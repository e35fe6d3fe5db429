// Concurrent typists on one document: N automerge-repo peers (one Node process),
// each making a change every `interval` ms; for every change, the time until each
// other peer has it (same clock: the change carries its send time). Prints JSON
// with p50/p99, and the CPU seconds the server processes used (from /proc) when
// their pids are given. Works against any automerge-repo sync server:
//
//   node bench/typists.mjs --url 'ws://127.0.0.1:8080/v1/automerge/dev/demo/collab?access_token=…' \
//       [--peers 32] [--interval 100] [--seconds 20] [--pids 123,456]
//   node bench/typists.mjs --url ws://127.0.0.1:3030 --pids <sync server pid>

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { readFileSync } from "node:fs"

const args = Object.fromEntries(
  process.argv
    .slice(2)
    .reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), [])
)
const url = args.url
const peers = Number(args.peers ?? 32)
const interval = Number(args.interval ?? 100)
const seconds = Number(args.seconds ?? 20)
const pids = (args.pids ?? "").split(",").filter(Boolean).map(Number)
if (!url) {
  console.error("usage: node bench/typists.mjs --url <ws url> [--peers N] [--interval ms] [--seconds s] [--pids a,b]")
  process.exit(2)
}

const ticks = Number(process.env.CLK_TCK ?? 100)
function cpuSeconds() {
  let total = 0
  for (const pid of pids) {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    total += (Number(fields[11]) + Number(fields[12])) / ticks
  }
  return total
}

async function connect() {
  const adapter = new WebSocketClientAdapter(url, 1000)
  const repo = new Repo({ network: [adapter] })
  await new Promise(resolve => repo.networkSubsystem.once("peer", resolve))
  return repo
}

const repos = []
for (let i = 0; i < peers; i++) repos.push(await connect())
const first = repos[0].create({ typists: {} })
await new Promise(r => setTimeout(r, 500))
const handles = [first]
for (const repo of repos.slice(1)) handles.push(await repo.find(first.url))

const latencies = []
const seen = handles.map(() => new Map())
handles.forEach((h, me) => {
  h.on("change", ({ doc }) => {
    const now = performance.now()
    for (const [who, entry] of Object.entries(doc.typists ?? {})) {
      if (Number(who) === me) continue
      const last = seen[me].get(who) ?? 0
      if (entry.n > last) {
        seen[me].set(who, entry.n)
        if (measuring) latencies.push(now - entry.t)
      }
    }
  })
})

let measuring = false
let changes = 0
const timers = handles.map((h, i) =>
  setTimeout(() => {
    let n = 0
    timers[i] = setInterval(() => {
      n += 1
      changes += measuring ? 1 : 0
      h.change(d => {
        d.typists[i] = { n, t: performance.now() }
      })
    }, interval)
  }, (interval * i) / peers)
)
// Warm up, then measure.
await new Promise(r => setTimeout(r, 2000))
const cpu0 = pids.length ? cpuSeconds() : 0
measuring = true
await new Promise(r => setTimeout(r, seconds * 1000))
measuring = false
const cpu = pids.length ? cpuSeconds() - cpu0 : null
timers.forEach(t => clearInterval(t))
latencies.sort((a, b) => a - b)
const q = p => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : null)
console.log(
  JSON.stringify({
    url: url.replace(/access_token=[^&]+/, "access_token=…"),
    peers,
    interval_ms: interval,
    seconds,
    changes,
    receipts: latencies.length,
    expected_receipts: changes * (peers - 1),
    p50_ms: q(0.5) && Number(q(0.5).toFixed(1)),
    p99_ms: q(0.99) && Number(q(0.99).toFixed(1)),
    max_ms: latencies.length ? Number(latencies[latencies.length - 1].toFixed(1)) : null,
    server_cpu_seconds: cpu && Number(cpu.toFixed(2)),
    server_cpu_percent: cpu && Number(((cpu / seconds) * 100).toFixed(0)),
  })
)
process.exit(0)
