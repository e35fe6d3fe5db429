// The demo in headless Chromium against a running `ultrasync dev`: two browser
// contexts are two users (alice and bob). Each test works in its own project, so
// they do not see each other's data.
//
// Environment (tests/typescript.rs sets it):
//   ULTRASYNC_HTTP            http://127.0.0.1:PORT of the gateway serving /demo
//   ULTRASYNC_TOKEN_ALICE/BOB tokens of two actors of org "dev"
//   ULTRASYNC_CHROMIUM        the chromium binary (Debian's package)
//   ULTRASYNC_SCREENSHOTS     folder for the screenshots
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { chromium } from "playwright-core";

const HTTP = process.env.ULTRASYNC_HTTP;
const TOKENS = { alice: process.env.ULTRASYNC_TOKEN_ALICE, bob: process.env.ULTRASYNC_TOKEN_BOB };
const SHOTS = process.env.ULTRASYNC_SCREENSHOTS ?? "test-output/screenshots";
const WAIT = 20_000;
// Each run works in projects of its own (a stack may serve several runs).
const RUN = Date.now().toString(36);
const project = (name) => `${name}-${RUN}`;
mkdirSync(SHOTS, { recursive: true });

let browser;
const contexts = [];

before(async () => {
  assert.ok(HTTP && TOKENS.alice && TOKENS.bob, "ULTRASYNC_HTTP and the tokens must be set");
  browser = await chromium.launch({
    executablePath: process.env.ULTRASYNC_CHROMIUM ?? "chromium",
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  await browser?.close();
});

/** A user's page on the demo, in its own browser context (own IndexedDB). */
async function user(name, project) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  contexts.push(context);
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
  await page.goto(`${HTTP}/demo/#token=${TOKENS[name]}&name=${name}&project=${project}`);
  await live(page);
  return { name, context, page };
}

const live = (page) => page.waitForSelector('#status[data-status="live"]', { timeout: WAIT });
const shot = (u, label) => u.page.screenshot({ path: join(SHOTS, `${label}-${u.name}.png`), fullPage: true });
const pendingCount = (page) => page.evaluate(() => window.demo.client.pendingCount);

/** What a user's lists show: list titles, each with its tasks in order. */
function listState(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll(".list")].map((l) => ({
      title: l.querySelector(".head input.title").value,
      tasks: [...l.querySelectorAll(".task")].map((t) => `${t.querySelector("input.title").value}${t.querySelector(".check").checked ? " ✓" : ""}`),
    })),
  );
}

async function converged(a, b) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const [x, y, pa, pb] = await Promise.all([listState(a.page), listState(b.page), pendingCount(a.page), pendingCount(b.page)]);
    if (JSON.stringify(x) === JSON.stringify(y) && pa === 0 && pb === 0) return x;
    if (Date.now() > deadline) assert.fail(`not converged: ${a.name} ${JSON.stringify(x)} (${pa} pending) vs ${b.name} ${JSON.stringify(y)} (${pb} pending)`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function addList(u, title) {
  await u.page.fill("#new-list", title);
  await u.page.click("#add-list");
}

async function addTask(u, listTitle, title) {
  const list = u.page.locator(".list", { has: u.page.locator(`.head input.title[value="${listTitle}"]`) });
  await list.locator(".new-task").fill(title);
  await list.locator(".add-task").click();
}

const task = (u, title) => u.page.locator(".task", { has: u.page.locator(`input.title[value="${title}"]`) });

describe("the demo in two browsers", { concurrency: false }, () => {
  test("both edit the same list online and see each other's changes", async () => {
    const alice = await user("alice", project("t-list"));
    const bob = await user("bob", project("t-list"));
    await addList(alice, "Groceries");
    await addTask(alice, "Groceries", "milk");
    await addTask(alice, "Groceries", "bread");
    await task(bob, "milk").waitFor({ timeout: WAIT });
    await task(bob, "milk").locator(".check").check();
    await addTask(bob, "Groceries", "eggs");
    await task(alice, "eggs").waitFor({ timeout: WAIT });
    await alice.page.waitForSelector('.task.done input.title[value="milk"]', { timeout: WAIT });
    // Rename, reorder, delete.
    await task(alice, "bread").locator("input.title").fill("rye bread");
    await task(alice, "bread").locator("input.title").press("Enter");
    await task(bob, "eggs").locator(".up").click();
    await task(bob, "milk").locator(".del").click();
    await bob.page.waitForSelector('.task input.title[value="rye bread"]', { timeout: WAIT });
    const state = await converged(alice, bob);
    assert.deepEqual(state, [{ title: "Groceries", tasks: ["eggs", "rye bread"] }]);
    await shot(alice, "1-list");
    await shot(bob, "1-list");
  });

  test("offline: 20 edits, a reload, back online: both converge and the log holds each edit once", async () => {
    const alice = await user("alice", project("t-offline"));
    const bob = await user("bob", project("t-offline"));
    await addList(alice, "Trip");
    await bob.page.waitForSelector('.list .head input.title[value="Trip"]', { timeout: WAIT });
    await converged(alice, bob);

    await bob.context.setOffline(true);
    await bob.page.waitForSelector('#status[data-status="offline"]', { timeout: WAIT });
    for (let i = 1; i <= 14; i++) await addTask(bob, "Trip", `item ${i}`);
    for (let i = 1; i <= 3; i++) await task(bob, `item ${i}`).locator(".check").check();
    for (let i = 4; i <= 6; i++) {
      const title = task(bob, `item ${i}`).locator("input.title");
      await title.fill(`item ${i} (renamed)`);
      await title.press("Enter");
    }
    await bob.page.waitForFunction(() => window.demo.client.pendingCount === 20, null, { timeout: WAIT });
    // Alice edits meanwhile, online.
    await addTask(alice, "Trip", "passport");
    await shot(bob, "2-offline-before-reload");

    // Reload while the sync socket is still cut off: the page comes from the
    // gateway, the outbox from IndexedDB.
    let cutOff = true;
    await bob.page.routeWebSocket(/\/v1\/sync/, (ws) => {
      if (cutOff) ws.close({ code: 1013, reason: "test: still offline" });
      else ws.connectToServer();
    });
    await bob.context.setOffline(false);
    await bob.page.reload();
    await bob.page.waitForFunction(() => window.demo?.client.pendingCount === 20, null, { timeout: WAIT });
    assert.equal(await bob.page.locator(".task").count(), 14, "the reloaded page shows the offline edits");
    await shot(bob, "2-offline-after-reload");

    cutOff = false;
    bob.page.evaluate(() => window.demo.client.reconnect());
    await live(bob.page);
    const state = await converged(alice, bob);
    assert.equal(state[0].tasks.length, 15);
    assert.ok(state[0].tasks.includes("passport"));
    assert.ok(state[0].tasks.includes("item 1 ✓"));
    assert.ok(state[0].tasks.includes("item 5 (renamed)"));
    await shot(alice, "2-offline-converged");
    await shot(bob, "2-offline-converged");

    // The log: bob's 20 commands, each exactly once.
    const clientId = await bob.page.evaluate(() => window.demo.client.clientId);
    const res = await fetch(`${HTTP}/v1/dev/${project("t-offline")}/index/ops?since=0&limit=1000`, {
      headers: { authorization: `Bearer ${TOKENS.alice}` },
    });
    assert.equal(res.status, 200);
    const { ops } = await res.json();
    const mine = ops.filter((o) => o.client_id === clientId).map((o) => o.command_id);
    assert.equal(mine.length, 20, `bob's ops: ${JSON.stringify(mine)}`);
    assert.equal(new Set(mine).size, 20, "no command twice");
    assert.deepEqual(ops.map((o) => o.server_seq), ops.map((_, i) => i + 1), "dense log");
  });

  test("concurrent edits of the shared note merge; presence shows both users", async () => {
    const alice = await user("alice", project("t-note"));
    const bob = await user("bob", project("t-note"));
    for (const u of [alice, bob]) await u.page.click("#note");
    for (const u of [alice, bob]) {
      await u.page.waitForSelector('#presence li[data-name="alice"]', { timeout: WAIT });
      await u.page.waitForSelector('#presence li[data-name="bob"]', { timeout: WAIT });
    }
    // Truly concurrent: both write while neither can see the other.
    await Promise.all([alice.context.setOffline(true), bob.context.setOffline(true)]);
    await alice.page.fill("#note", "Alice: bring snacks.\n");
    await bob.page.fill("#note", "Bob: bring the map.\n");
    await Promise.all([alice.context.setOffline(false), bob.context.setOffline(false)]);
    const deadline = Date.now() + WAIT;
    let texts;
    for (;;) {
      texts = await Promise.all([alice.page.inputValue("#note"), bob.page.inputValue("#note")]);
      if (texts[0] === texts[1] && texts[0].includes("Alice: bring snacks.") && texts[0].includes("Bob: bring the map.")) break;
      if (Date.now() > deadline) assert.fail(`note not merged: ${JSON.stringify(texts)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    // Then live typing at the end of the merged text.
    await alice.page.focus("#note");
    await alice.page.keyboard.press("Control+End");
    await alice.page.keyboard.type("Alice again.");
    await bob.page.waitForFunction(() => document.querySelector("#note").value.endsWith("Alice again."), null, { timeout: WAIT });
    for (const u of [alice, bob]) {
      await u.page.waitForSelector('#presence li[data-name="alice"]', { timeout: WAIT });
      await u.page.waitForSelector('#presence li[data-name="bob"]', { timeout: WAIT });
    }
    await bob.page.waitForSelector('#presence li[data-name="alice"] .where:has-text("editing the note")', { timeout: WAIT });
    await shot(alice, "3-note-presence");
    await shot(bob, "3-note-presence");
  });

  test("a CAS conflict in the settings panel rolls back visibly to the server's value", async () => {
    const alice = await user("alice", project("t-cas"));
    const bob = await user("bob", project("t-cas"));
    await alice.page.selectOption("#theme-input", "dark");
    await alice.page.click("#theme-save");
    await bob.page.waitForSelector('#theme-value:has-text("dark")', { timeout: WAIT });
    await bob.page.waitForFunction(() => !document.querySelector("#theme-version").textContent.includes("saving"), null, { timeout: WAIT });

    await bob.context.setOffline(true);
    await bob.page.waitForSelector('#status[data-status="offline"]', { timeout: WAIT });
    await bob.page.selectOption("#theme-input", "green");
    await bob.page.click("#theme-save");
    await bob.page.waitForSelector('#theme-value:has-text("green")');
    await shot(bob, "4-cas-optimistic");
    await alice.page.selectOption("#theme-input", "blue");
    await alice.page.click("#theme-save");
    await alice.page.waitForFunction(() => window.demo.client.pendingCount === 0, null, { timeout: WAIT });

    await bob.context.setOffline(false);
    await bob.page.waitForSelector("#conflict:not([hidden])", { timeout: WAIT });
    await bob.page.waitForSelector('#theme-value:has-text("blue")', { timeout: WAIT });
    const text = await bob.page.textContent("#conflict");
    assert.match(text, /rolled back to the server's value "blue"/);
    assert.equal(await alice.page.textContent("#theme-value"), "blue");
    await shot(bob, "4-cas-rolled-back");
  });
});
