// An unmodified automerge-repo app using ultrasync as its sync server: the only
// ultrasync-specific line is the URL.
//
//   ultrasync dev                      # prints a dev token
//   node example.mjs <token>           # creates a document, prints its URL, edits it
//   node example.mjs <token> <url>     # a second repo: finds it and follows the edits
//
// ULTRASYNC_URL overrides the gateway (default ws://127.0.0.1:8080); the dev token
// is for org `dev`, project `demo`, and `collab` is the default crdt namespace.

import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const [token, docUrl] = process.argv.slice(2)
if (!token) {
  console.error("usage: node example.mjs <token> [automerge:url]")
  process.exit(2)
}
const base = process.env.ULTRASYNC_URL ?? "ws://127.0.0.1:8080"
const endpoint = `${base}/v1/automerge/dev/demo/collab?access_token=${encodeURIComponent(token)}`

const repo = new Repo({ network: [new WebSocketClientAdapter(endpoint)] })
await new Promise(resolve => repo.networkSubsystem.once("peer", resolve))

const handle = docUrl
  ? await repo.find(docUrl)
  : repo.create({ title: "hello from automerge-repo", clicks: 0 })
console.log(docUrl ? `following ${handle.url}` : `created ${handle.url}`)
console.log(JSON.stringify(handle.doc()))

handle.on("change", ({ doc }) => console.log("now", JSON.stringify(doc)))
handle.on("ephemeral-message", ({ message }) => console.log("ephemeral", message))

// Edit once a second; every repo on the document sees the clicks add up.
setInterval(() => {
  handle.change(d => {
    d.clicks = (d.clicks ?? 0) + 1
  })
  handle.broadcast({ from: repo.peerId, at: Date.now() })
}, 1000)
