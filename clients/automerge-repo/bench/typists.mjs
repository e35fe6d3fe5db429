// Concurrent typists on one document: N automerge-repo peers spread over several
// Node processes (bench/typist-worker.mjs, a few peers each), each peer making a
// change every `interval` ms (open loop: change k is due at a fixed time whether or
// not the previous ones went out). For every change made in the measured window,
// the time until each other peer has it (sender and receiver clocks are the same
// machine's). Works against any automerge-repo sync server.
//
// The generator checks itself: it reports the changes it made against those it
// offered and how late it made them, and marks the figures invalid (`valid: false`,
// a warning on stderr) when it fell behind: then they measure the generator, not
// the server. Server CPU is read from /proc for the pids given (the server's
// processes only), the generator's own CPU and the rest of the machine's likewise;
// other processes using more than 15 % of a core during the window also make the
// run invalid (they compete with the server for the same cores).
//
//   node bench/typists.mjs --url 'ws://127.0.0.1:8080/v1/automerge/dev/demo/collab?access_token=…' \
//       [--peers 32] [--interval 100] [--seconds 20] [--procs 4] [--pids 123,456]
//   node bench/typists.mjs --url ws://127.0.0.1:3030 --pids <sync server pid>
//
// bench/compare.mjs starts both servers and runs this for several peer counts.

import { fork } from "node:child_process"
import { readFileSync, readdirSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const CLK_TCK = Number(process.env.CLK_TCK ?? 100)
const now = () => performance.timeOrigin + performance.now()

/** CPU seconds (user + system, all threads) of `pid` so far; 0 once it is gone. */
export function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ")
    return (Number(fields[11]) + Number(fields[12])) / CLK_TCK
  } catch {
    return 0
  }
}

/** The pids of `pid`'s children (every thread's). */
export function childPids(pid) {
  const out = []
  try {
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      const text = readFileSync(`/proc/${pid}/task/${task}/children`, "utf8").trim()
      if (text) out.push(...text.split(/\s+/).map(Number))
    }
  } catch {
    // gone
  }
  return out
}

/** Busy CPU seconds of the whole machine so far (all cores). */
function machineBusySeconds() {
  const cpu = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number)
  const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0)
  return (total - cpu[3] - cpu[4]) / CLK_TCK
}

const sum = xs => xs.reduce((a, b) => a + b, 0)
const round = (x, d = 1) => (x === null || x === undefined || !Number.isFinite(x) ? null : Number(x.toFixed(d)))

/** The q-quantile of sorted `xs` (Infinity stands for a receipt that never came). */
function quantile(xs, q) {
  if (!xs.length) return null
  return xs[Math.min(xs.length - 1, Math.floor(q * xs.length))]
}

/**
 * Runs the benchmark once. `pids`: the server's processes (CPU). Returns the report.
 */
export async function runTypists({
  url,
  peers = 32,
  interval = 100,
  seconds = 20,
  warmup = 3,
  drain = 5,
  procs = 4,
  pids = [],
  maxLatenessMs = interval / 2,
  maxOtherPercent = 15,
  log = () => {},
}) {
  procs = Math.max(1, Math.min(procs, peers))
  // The document, made by a repo that is not a typist and leaves before the run.
  const creator = new Repo({ network: [new WebSocketClientAdapter(url, 1000)] })
  await new Promise(resolve => creator.networkSubsystem.once("peer", resolve))
  const created = creator.create({ typists: {}, text: "" })
  const docUrl = created.url
  await new Promise(r => setTimeout(r, 1500))
  await creator.shutdown()

  const workerFile = fileURLToPath(new URL("./typist-worker.mjs", import.meta.url))
  const workers = []
  for (let w = 0; w < procs; w++) {
    const ids = []
    for (let id = w; id < peers; id += procs) ids.push(id)
    const child = fork(workerFile, [], { stdio: ["ignore", "inherit", "inherit", "ipc"] })
    const inbox = []
    const waiters = []
    child.on("message", m => {
      inbox.push(m)
      for (const f of waiters.splice(0)) f()
    })
    const next = async (type, ms) => {
      const deadline = Date.now() + ms
      for (;;) {
        const i = inbox.findIndex(m => m.type === type || m.type === "failed")
        if (i >= 0) {
          const [m] = inbox.splice(i, 1)
          if (m.type === "failed") throw new Error(`worker ${w}: ${m.error}`)
          return m
        }
        if (Date.now() > deadline) throw new Error(`worker ${w}: no ${type} in ${ms} ms`)
        await new Promise(r => {
          waiters.push(r)
          setTimeout(r, 500)
        })
      }
    }
    child.send({ type: "init", url, docUrl, ids })
    workers.push({ child, ids, next })
  }
  try {
    await Promise.all(workers.map(w => w.next("ready", 120_000)))
    log(`${peers} peers in ${procs} processes on ${docUrl}`)

    const t0 = now() + 1000
    const from = t0 + warmup * 1000
    const to = from + seconds * 1000
    for (const w of workers) w.child.send({ type: "start", t0, until: to, interval, peers })
    const genPids = [process.pid, ...workers.map(w => w.child.pid)]
    await new Promise(r => setTimeout(r, from - now()))
    const serverCpu0 = sum(pids.map(cpuSeconds))
    const genCpu0 = sum(genPids.map(cpuSeconds))
    const busy0 = machineBusySeconds()
    const wall0 = now()
    await new Promise(r => setTimeout(r, to - now()))
    const wall = (now() - wall0) / 1000
    const serverCpu = sum(pids.map(cpuSeconds)) - serverCpu0
    const genCpu = sum(genPids.map(cpuSeconds)) - genCpu0
    const busy = machineBusySeconds() - busy0
    await new Promise(r => setTimeout(r, drain * 1000))
    for (const w of workers) w.child.send({ type: "stop" })
    const reports = await Promise.all(workers.map(w => w.next("report", 60_000)))

    // When change n of typist `id` was due, and whether it falls in the window.
    const due = (id, n) => t0 + (interval * id) / peers + (n - 1) * interval
    const inWindow = (id, n) => due(id, n) >= from && due(id, n) < to
    const sends = new Map()
    const lateness = []
    let offered = 0
    let made = 0
    for (let id = 0; id < peers; id++) {
      for (let n = 1; due(id, n) < to; n++) if (inWindow(id, n)) offered++
    }
    for (const r of reports) {
      for (const t of r.typists) {
        sends.set(t.id, t.sends)
        t.sends.forEach((_, i) => {
          if (inWindow(t.id, i + 1)) {
            made++
            lateness.push(t.lateness[i])
          }
        })
      }
    }
    const latencies = []
    for (const r of reports) {
      for (const t of r.typists) {
        for (const [who, a, b, at] of t.receipts) {
          const sent = sends.get(who) ?? []
          for (let n = a; n <= b; n++) {
            if (inWindow(who, n) && sent[n - 1] !== undefined) latencies.push(at - sent[n - 1])
          }
        }
      }
    }
    const expected = made * (peers - 1)
    const received = latencies.length
    // Receipts that never came count as slower than any that did.
    for (let i = received; i < expected; i++) latencies.push(Infinity)
    latencies.sort((x, y) => x - y)
    lateness.sort((x, y) => x - y)
    const latenessP99 = quantile(lateness, 0.99)
    const loopP99 = Math.max(...reports.map(r => r.loopDelayP99Ms ?? 0))
    const why = []
    if (made < 0.99 * offered) why.push(`made ${made} of ${offered} offered changes`)
    if (latenessP99 !== null && latenessP99 > maxLatenessMs)
      why.push(`p99 of changes made ${round(latenessP99)} ms after they were due (at most ${maxLatenessMs})`)
    const other = ((busy - serverCpu - genCpu) / wall) * 100
    if (pids.length && other > maxOtherPercent)
      why.push(`other processes used ${round(other, 0)} % of a core during the run (at most ${maxOtherPercent})`)
    const report = {
      url: url.replace(/access_token=[^&]+/, "access_token=…"),
      peers,
      processes: procs,
      interval_ms: interval,
      seconds,
      offered_changes: offered,
      made_changes: made,
      generator_lateness_p99_ms: round(latenessP99),
      generator_loop_delay_p99_ms: round(loopP99),
      valid: why.length === 0,
      invalid_because: why.length ? why.join("; ") : undefined,
      expected_receipts: expected,
      receipts: received,
      receipts_missing_after_drain: expected - received,
      drain_seconds: drain,
      p50_ms: round(quantile(latencies, 0.5)),
      p99_ms: round(quantile(latencies, 0.99)),
      max_ms: round(received ? latencies[received - 1] : null),
      server_cpu_seconds: pids.length ? round(serverCpu, 2) : null,
      server_cpu_percent_of_one_core: pids.length ? round((serverCpu / wall) * 100, 0) : null,
      generator_cpu_percent_of_one_core: round((genCpu / wall) * 100, 0),
      other_cpu_percent_of_one_core: round(((busy - serverCpu - genCpu) / wall) * 100, 0),
    }
    if (!report.valid) {
      console.error(`typists: figures NOT valid (the generator fell behind or the machine was busy): ${report.invalid_because}`)
    }
    return report
  } finally {
    for (const w of workers) if (w.child.exitCode === null) w.child.kill("SIGKILL")
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const args = Object.fromEntries(
    process.argv
      .slice(2)
      .reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), [])
  )
  if (!args.url) {
    console.error(
      "usage: node bench/typists.mjs --url <ws url> [--peers N] [--interval ms] [--seconds s] [--procs P] [--pids a,b]"
    )
    process.exit(2)
  }
  const report = await runTypists({
    url: args.url,
    peers: Number(args.peers ?? 32),
    interval: Number(args.interval ?? 100),
    seconds: Number(args.seconds ?? 20),
    procs: Number(args.procs ?? 4),
    pids: (args.pids ?? "").split(",").filter(Boolean).map(Number),
    log: m => console.error(m),
  })
  console.log(JSON.stringify(report))
  process.exit(0)
}
