// Bundles the demo apps into demo/dist/: app.js (demo/app.ts + the SDK + Automerge)
// and automerge.js (demo/automerge/app.ts + automerge-repo and its WebSocket adapter,
// the page at /demo/automerge/): plain files the gateway serves at /demo, no dev
// server. Automerge's wasm comes inlined as base64 (the `webpack` export condition),
// so there is no .wasm to serve.
import { build } from "esbuild";

await build({
  entryPoints: { app: "demo/app.ts", automerge: "demo/automerge/app.ts" },
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  conditions: ["webpack"],
  outdir: "demo/dist",
  sourcemap: true,
  logLevel: "warning",
});
