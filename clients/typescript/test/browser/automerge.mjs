// The automerge-repo demo (/demo/automerge/, an unmodified automerge-repo app) in
// headless Chromium against a running `ultrasync dev`: two browser contexts are two
// users on one document; edits of one show on the other, concurrent clicks add up,
// and a reload (the page keeps nothing locally) gets the document back from the
// server, which also serves it as JSON over HTTP.
//
// Environment (tests/typescript.rs sets it):
//   ULTRASYNC_AUTOMERGE_DEMO  the `Automerge` link `ultrasync dev` printed
//   ULTRASYNC_HTTP            http://127.0.0.1:PORT of the gateway
//   ULTRASYNC_TOKEN_ALICE/BOB tokens of two actors of org "dev"
//   ULTRASYNC_CHROMIUM        the chromium binary (Debian's package)
//   ULTRASYNC_SCREENSHOTS     folder for the screenshots
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const LINK = process.env.ULTRASYNC_AUTOMERGE_DEMO;
const HTTP = process.env.ULTRASYNC_HTTP;
const TOKENS = { alice: process.env.ULTRASYNC_TOKEN_ALICE, bob: process.env.ULTRASYNC_TOKEN_BOB };
const SHOTS = process.env.ULTRASYNC_SCREENSHOTS ?? "test-output/screenshots";
const WAIT = 20_000;
// A project of this run's own (a stack may serve several runs).
const PROJECT = `am-${Date.now().toString(36)}`;
mkdirSync(SHOTS, { recursive: true });

let browser;
const contexts = [];

before(async () => {
  assert.ok(LINK && HTTP && TOKENS.alice && TOKENS.bob, "ULTRASYNC_AUTOMERGE_DEMO, ULTRASYNC_HTTP and the tokens must be set");
  browser = await chromium.launch({
    executablePath: process.env.ULTRASYNC_CHROMIUM ?? "chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  await browser?.close();
});

/** A user's page on the automerge-repo demo, in a browser context of its own. */
async function user(name, fragment) {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  contexts.push(context);
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
  const link = new URL(LINK);
  await page.goto(`${link.origin}${link.pathname}#${fragment}`);
  await ready(page);
  return { name, context, page };
}

async function ready(page) {
  await page.waitForSelector('#status[data-status="live"]', { timeout: WAIT });
  await page.waitForSelector("#app:not([hidden])", { timeout: WAIT });
}

const shot = (u, label) => u.page.screenshot({ path: join(SHOTS, `automerge-${label}-${u.name}.png`), fullPage: true });
const saved = (u) =>
  u.page.waitForSelector('#saved[data-saved="yes"]', { timeout: WAIT }).catch(async (e) => {
    const state = await u.page.evaluate(() => {
      const { repo, handle, server } = window.demo;
      const s = server();
      return { url: handle.url, heads: handle.heads(), peers: repo.peers, server: s, syncInfo: s?.storageId && handle.getSyncInfo(s.storageId) };
    });
    const id = state.url.slice("automerge:".length);
    const res = await fetch(`${HTTP}/v1/dev/${PROJECT}/collab/keys/${id}`, { headers: { authorization: `Bearer ${TOKENS.alice}` } });
    state.http = { status: res.status, body: await res.text() };
    assert.fail(`${u.name}: the server's heads never included the page's: ${JSON.stringify(state)} (${e.message})`);
  });
const notes = (u) => u.page.$$eval("#notes li .text", (els) => els.map((e) => e.textContent));
const count = (u) => u.page.textContent("#count");

async function addNote(u, text) {
  await u.page.fill("#note", text);
  await u.page.click("#add-note");
}

/** Waits until the page shows `clicks` and exactly `texts` as its notes. */
async function shows(u, clicks, texts) {
  await u.page.waitForFunction(
    ([c, t]) =>
      document.querySelector("#count")?.textContent === String(c) &&
      JSON.stringify([...document.querySelectorAll("#notes li .text")].map((e) => e.textContent)) === JSON.stringify(t),
    [clicks, texts],
    { timeout: WAIT },
  ).catch(async (e) => {
    assert.fail(`${u.name} shows ${await count(u)} clicks and ${JSON.stringify(await notes(u))}, not ${clicks} and ${JSON.stringify(texts)} (${e.message})`);
  });
}

test("two browsers on one automerge-repo document: edits cross, a reload gets it from the server", async () => {
  // Alice opens the printed link: her page creates a document and names it in the fragment.
  const alice = await user("alice", `token=${TOKENS.alice}&name=alice&project=${PROJECT}`);
  const url = await alice.page.evaluate(() => new URLSearchParams(location.hash.slice(1)).get("doc"));
  assert.match(url ?? "", /^automerge:/);
  assert.equal(await alice.page.textContent("#doc-url"), url);
  await alice.page.click("#inc");
  await alice.page.click("#inc");
  await addNote(alice, "milk");
  await shows(alice, 2, ["milk"]);
  // Once the server has stored it, another peer finds it (as with any sync server).
  await saved(alice);

  const bob = await user("bob", `token=${TOKENS.bob}&name=bob&project=${PROJECT}&doc=${url}`);
  await shows(bob, 2, ["milk"]);
  await addNote(bob, "bread");
  await bob.page.click("#inc");
  await shows(alice, 3, ["milk", "bread"]);

  // Both click at once: the counter adds both.
  await Promise.all([alice.page.click("#inc"), bob.page.click("#inc")]);
  await shows(alice, 5, ["milk", "bread"]);
  await shows(bob, 5, ["milk", "bread"]);
  // Delete on one side.
  await alice.page.locator("#notes li", { hasText: "milk" }).locator(".del").click();
  await shows(bob, 5, ["bread"]);
  await shows(alice, 5, ["bread"]);
  await Promise.all([saved(alice), saved(bob)]);
  await shot(alice, "1-synced");
  await shot(bob, "1-synced");

  // The pages keep nothing locally: after a reload the document comes from the server.
  await bob.page.reload();
  await ready(bob.page);
  await shows(bob, 5, ["bread"]);
  assert.equal(await bob.page.textContent("#doc-url"), url);
  await bob.page.click("#inc");
  await shows(alice, 6, ["bread"]);
  await saved(bob);
  await alice.page.reload();
  await ready(alice.page);
  await shows(alice, 6, ["bread"]);
  await shot(bob, "2-reloaded");

  // The same document through the HTTP door (the key is the document id), once the
  // materialized view has caught up with the log.
  const id = url.slice("automerge:".length);
  const deadline = Date.now() + WAIT;
  let value;
  for (;;) {
    const res = await fetch(`${HTTP}/v1/dev/${PROJECT}/collab/keys/${id}`, {
      headers: { authorization: `Bearer ${TOKENS.alice}` },
    });
    value = res.status === 200 ? (await res.json()).value : { status: res.status };
    if (JSON.stringify(value?.notes?.map((n) => [n.text, n.by])) === JSON.stringify([["bread", "bob"]])) break;
    if (Date.now() > deadline) assert.fail(`GET keys/${id}: ${JSON.stringify(value)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(value.title, "alice's board");
});
