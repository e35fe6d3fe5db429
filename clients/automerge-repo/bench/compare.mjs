// ultrasync against the upstream @automerge/automerge-repo-sync-server, side by
// side on this machine: for each peer count and run, a fresh server (a new data
// folder), bench/typists.mjs against it, server CPU from /proc for the server's
// processes only (ultrasync: the `ultrasync dev` process and its nats-server; the
// upstream: its node process). Writes every run to a JSON report.
//
//   node bench/compare.mjs [--peers 8,16,32] [--runs 2] [--seconds 20] [--procs 4]
//       [--servers ultrasync,upstream] [--bin <ultrasync release binary>] [--out report.json]
//
// The binary defaults to $CARGO_TARGET_DIR/release/ultrasync, else
// ../../target/release/ultrasync (build it with `cargo build --release --bin
// ultrasync`); ULTRASYNC_NATS_SERVER_BIN as for `ultrasync dev`.

import { spawn } from "node:child_process"
import { existsSync, mkdtempSync, rmSync, writeFileSync, readFileSync } from "node:fs"
import { tmpdir, cpus } from "node:os"
import { join, resolve, dirname } from "node:path"
import { fileURLToPath } from "node:url"
import { createServer } from "node:net"
import { runTypists, childPids } from "./typists.mjs"

const here = dirname(fileURLToPath(import.meta.url))
const pkg = resolve(here, "..")
const repoRoot = resolve(pkg, "../..")

const args = Object.fromEntries(
  process.argv
    .slice(2)
    .reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), [])
)
const peerCounts = (args.peers ?? "8,16,32").split(",").map(Number)
const runs = Number(args.runs ?? 2)
const seconds = Number(args.seconds ?? 20)
const interval = Number(args.interval ?? 100)
const procs = Number(args.procs ?? 4)
const servers = (args.servers ?? "ultrasync,upstream").split(",")
const bin =
  args.bin ??
  [process.env.CARGO_TARGET_DIR && join(process.env.CARGO_TARGET_DIR, "release/ultrasync"), join(repoRoot, "target/release/ultrasync")].find(
    p => p && existsSync(p)
  )
const out = args.out

async function freePort() {
  return new Promise((res, rej) => {
    const s = createServer()
    s.once("error", rej)
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address()
      s.close(() => res(port))
    })
  })
}

/** Starts `cmd`, resolves once a stdout/stderr line matches `ready` (→ the match). */
function start(cmd, argv, env, cwd, ready) {
  const child = spawn(cmd, argv, { env: { ...process.env, ...env }, cwd, stdio: ["ignore", "pipe", "pipe"] })
  let text = ""
  return new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`${cmd} did not start: ${text.slice(-2000)}`)), 60_000)
    const on = chunk => {
      text += chunk.toString()
      const m = text.match(ready)
      if (m) {
        clearTimeout(timer)
        res({ child, match: m })
      }
    }
    child.stdout.on("data", on)
    child.stderr.on("data", on)
    child.once("exit", code => rej(new Error(`${cmd} exited (${code}): ${text.slice(-2000)}`)))
  })
}

async function stop(child) {
  if (child.exitCode !== null) return
  const gone = new Promise(r => child.once("exit", r))
  child.kill("SIGTERM")
  const t = setTimeout(() => child.kill("SIGKILL"), 15_000)
  await gone
  clearTimeout(t)
}

async function ultrasync() {
  if (!bin) throw new Error("no ultrasync release binary: cargo build --release --bin ultrasync, or --bin")
  const dir = mkdtempSync(join(tmpdir(), "am-bench-ultrasync-"))
  const port = await freePort()
  const { child, match } = await start(
    bin,
    ["dev", "--data-dir", dir, "--listen", `127.0.0.1:${port}`, "--nats-port", "0"],
    { ULTRASYNC_LOG: "warn" },
    dir,
    /dev token\s+(\S+)/
  )
  const token = match[1]
  const pids = [child.pid, ...childPids(child.pid)]
  return {
    url: `ws://127.0.0.1:${port}/v1/automerge/dev/demo/collab?access_token=${encodeURIComponent(token)}`,
    pids,
    stop: async () => {
      await stop(child)
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

async function upstream() {
  const dir = mkdtempSync(join(tmpdir(), "am-bench-upstream-"))
  const port = await freePort()
  const entry = join(pkg, "node_modules/@automerge/automerge-repo-sync-server/src/index.js")
  const { child } = await start(process.execPath, [entry], { PORT: String(port), DATA_DIR: join(dir, "data") }, dir, /Listening on port/)
  return {
    url: `ws://127.0.0.1:${port}`,
    pids: [child.pid],
    stop: async () => {
      await stop(child)
      rmSync(dir, { recursive: true, force: true })
    },
  }
}

function version(name) {
  return JSON.parse(readFileSync(join(pkg, "node_modules", name, "package.json"), "utf8")).version
}

/** Busy CPU (per cent of one core) of the whole machine over `ms`. */
async function machineBusy(ms) {
  const read = () => {
    const cpu = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number)
    return { busy: cpu.slice(0, 8).reduce((a, b) => a + b, 0) - cpu[3] - cpu[4], at: Date.now() }
  }
  const a = read()
  await new Promise(r => setTimeout(r, ms))
  const b = read()
  return ((b.busy - a.busy) / 100 / ((b.at - a.at) / 1000)) * 100
}

/** Waits (up to `limitMs`) until the machine has been idle for a few seconds. */
async function waitQuiet(limitMs = 600_000) {
  const deadline = Date.now() + limitMs
  for (;;) {
    const busy = await machineBusy(3000)
    if (busy < 10) return busy
    if (Date.now() > deadline) return busy
    console.error(`machine busy (${busy.toFixed(0)} % of a core); waiting for it to settle`)
    await new Promise(r => setTimeout(r, 10_000))
  }
}

const results = []
for (const peers of peerCounts) {
  for (const server of servers) {
    for (let run = 1; run <= runs; run++) {
      await waitQuiet()
      const s = server === "ultrasync" ? await ultrasync() : await upstream()
      try {
        // Let start-up work (stream creation, JIT) settle before the clock starts.
        await new Promise(r => setTimeout(r, 2000))
        const report = await runTypists({
          url: s.url,
          peers,
          interval,
          seconds,
          procs,
          pids: s.pids,
          log: m => console.error(`[${server} run ${run}] ${m}`),
        })
        const row = { server, run, server_pids: s.pids.length, ...report }
        console.error(JSON.stringify(row))
        results.push(row)
      } finally {
        await s.stop()
      }
    }
  }
}

const doc = {
  benchmark: "automerge-repo concurrent typists on one document",
  machine: { cores: cpus().length, cpu: cpus()[0]?.model, node: process.version },
  what: "each peer (its own Repo and WebSocket) changes the document every interval_ms (open loop); latency from a change being made to each other peer having it; server CPU over the measured window from /proc, per cent of one core",
  ultrasync: { binary: bin, mode: "ultrasync dev (gateway, sequencer, materializer, compactor in one process) + its managed nats-server" },
  upstream: { package: `@automerge/automerge-repo-sync-server ${version("@automerge/automerge-repo-sync-server")}` },
  client: `@automerge/automerge-repo ${version("@automerge/automerge-repo")}, -network-websocket ${version("@automerge/automerge-repo-network-websocket")}`,
  results,
}
if (out) writeFileSync(out, JSON.stringify(doc, null, 2) + "\n")
console.log(JSON.stringify(doc, null, 2))
process.exit(0)
