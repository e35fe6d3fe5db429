// Bundles the demo app (demo/app.ts + the SDK + Automerge) into demo/dist/app.js:
// plain files the gateway serves at /demo, no dev server. Automerge's wasm comes
// inlined as base64 (the `webpack` export condition), so there is no .wasm to serve.
import { build } from "esbuild";

await build({
  entryPoints: ["demo/app.ts"],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  conditions: ["webpack"],
  outfile: "demo/dist/app.js",
  sourcemap: true,
  logLevel: "warning",
});
