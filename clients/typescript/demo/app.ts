// The demo app: seed 001's lists and tasks (namespace `index`), a shared note edited
// as Automerge text (`collab`), presence (`presence`) and a compare-and-set setting
// (`settings`), on top of @ultrasync/client with its replica in IndexedDB. Open it
// from the `Demo` link `ultrasync dev` prints (`/demo/#token=…&name=…`).
import * as A from "@automerge/automerge";

import { IndexedDbStore, SyncClient, type Json, type PresenceEntry } from "../src/index.js";

type Task = { list: string; title: string; done: boolean; order: number };
type List = { title: string; order: number };
type Note = { text: string };

const $ = <T extends HTMLElement>(sel: string) => document.querySelector(sel) as T;

function params(): URLSearchParams {
  return new URLSearchParams(location.hash.slice(1));
}

function claims(token: string): { sub?: string; org?: string } {
  try {
    const part = token.split(".")[1] ?? "";
    return JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return {};
  }
}

function newId(): string {
  return crypto.getRandomValues(new Uint32Array(2)).reduce((s, n) => s + n.toString(36), "");
}

const COLORS = ["#e63946", "#2a9d8f", "#e9c46a", "#457b9d", "#9b5de5", "#f4a261"];

async function main(): Promise<void> {
  const token = params().get("token") ?? localStorage.getItem("ultrasync-demo-token");
  if (!token) {
    $("#missing").hidden = false;
    return;
  }
  localStorage.setItem("ultrasync-demo-token", token);
  const { sub = "someone", org = "dev" } = claims(token);
  const name = params().get("name") ?? localStorage.getItem("ultrasync-demo-name") ?? sub;
  localStorage.setItem("ultrasync-demo-name", name);
  const color = COLORS[[...name].reduce((h, c) => h + c.charCodeAt(0), 0) % COLORS.length] ?? "#333";
  $("#me").textContent = name;

  const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sync`;
  const client = await SyncClient.open({
    url: wsUrl,
    token,
    org,
    project: params().get("project") ?? "demo",
    namespaces: ["index", "settings", "collab"],
    presence: "presence",
    store: await IndexedDbStore.open(`demo-${org}-${sub}`),
  });
  // For the browser tests and the curious: `demo.client` in the console.
  (window as unknown as { demo: unknown }).demo = { client, A };
  $("#app").hidden = false;

  const status = $("#status");
  const showStatus = () => {
    status.dataset.status = client.status;
    status.textContent = client.status;
    $("#pending").textContent = `${client.pendingCount} pending`;
  };
  client.onStatus(showStatus);

  // ---- lists and tasks ----------------------------------------------------
  const lists = () =>
    client
      .entries("index")
      .filter(([k]) => k.startsWith("list:"))
      .map(([k, v]) => ({ id: k.slice(5), ...(v.value as List), pending: v.pending }))
      .sort((a, b) => a.order - b.order || a.id.localeCompare(b.id));
  const tasks = (list: string) =>
    client
      .entries("index")
      .filter(([k, v]) => k.startsWith("task:") && (v.value as Task).list === list)
      .map(([k, v]) => ({ id: k.slice(5), ...(v.value as Task), pending: v.pending }))
      .sort((a, b) => a.order - b.order || a.id.localeCompare(b.id));

  const esc = (s: string) => s.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);
  const renderLists = () => {
    const drafts = new Map<string, string>();
    document.querySelectorAll<HTMLInputElement>(".new-task").forEach((i) => drafts.set(i.dataset.list ?? "", i.value));
    const focused = document.activeElement as HTMLElement | null;
    const focusKey = focused?.dataset.focus;
    $("#lists").innerHTML = lists()
      .map(
        (l) => `<div class="list${l.pending ? " pending" : ""}" data-id="${l.id}">
  <div class="head"><input class="title" data-focus="list-${l.id}" value="${esc(l.title)}"><button class="del-list">Delete list</button></div>
  ${tasks(l.id)
    .map(
      (t) => `<div class="task${t.done ? " done" : ""}${t.pending ? " pending" : ""}" data-id="${t.id}">
    <input type="checkbox" class="check"${t.done ? " checked" : ""}>
    <input class="title" data-focus="task-${t.id}" value="${esc(t.title)}">
    <button class="up" title="move up">↑</button><button class="down" title="move down">↓</button><button class="del">✕</button>
  </div>`,
    )
    .join("")}
  <form class="new-task-form"><input class="new-task" data-list="${l.id}" data-focus="new-${l.id}" placeholder="New task" autocomplete="off"><button class="add-task">Add</button></form>
</div>`,
      )
      .join("");
    document.querySelectorAll<HTMLInputElement>(".new-task").forEach((i) => (i.value = drafts.get(i.dataset.list ?? "") ?? ""));
    if (focusKey) document.querySelector<HTMLElement>(`[data-focus="${focusKey}"]`)?.focus();
  };

  $("#new-list-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $<HTMLInputElement>("#new-list");
    const title = input.value.trim();
    if (!title) return;
    input.value = "";
    const order = Math.max(0, ...lists().map((l) => l.order)) + 1;
    void client.put("index", `list:${newId()}`, { title, order });
  });

  const lists_el = $("#lists");
  lists_el.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = (ev.target as HTMLElement).querySelector<HTMLInputElement>(".new-task");
    const title = input?.value.trim();
    if (!input || !title) return;
    const list = input.dataset.list ?? "";
    input.value = "";
    const order = Math.max(0, ...tasks(list).map((t) => t.order)) + 1;
    void client.put("index", `task:${newId()}`, { list, title, done: false, order });
  });
  lists_el.addEventListener("change", (ev) => {
    const el = ev.target as HTMLInputElement;
    const task = el.closest<HTMLElement>(".task");
    const list = el.closest<HTMLElement>(".list");
    if (task && el.classList.contains("check")) {
      void client.patch("index", `task:${task.dataset.id}`, { done: el.checked });
    } else if (task && el.classList.contains("title")) {
      void client.patch("index", `task:${task.dataset.id}`, { title: el.value });
    } else if (list && el.classList.contains("title")) {
      void client.patch("index", `list:${list.dataset.id}`, { title: el.value });
    }
  });
  lists_el.addEventListener("click", (ev) => {
    const el = ev.target as HTMLElement;
    const task = el.closest<HTMLElement>(".task");
    const list = el.closest<HTMLElement>(".list");
    if (el.classList.contains("del-list") && list) {
      for (const t of tasks(list.dataset.id ?? "")) void client.delete("index", `task:${t.id}`);
      void client.delete("index", `list:${list.dataset.id}`);
    } else if (el.classList.contains("del") && task) {
      void client.delete("index", `task:${task.dataset.id}`);
    } else if ((el.classList.contains("up") || el.classList.contains("down")) && task && list) {
      // Reorder: swap places with the neighbour (two patches).
      const all = tasks(list.dataset.id ?? "");
      const i = all.findIndex((t) => t.id === task.dataset.id);
      const j = el.classList.contains("up") ? i - 1 : i + 1;
      const a = all[i];
      const b = all[j];
      if (!a || !b) return;
      const [oa, ob] = a.order === b.order ? [b.order + (j > i ? 1 : -1), a.order] : [b.order, a.order];
      void client.patch("index", `task:${a.id}`, { order: oa });
      void client.patch("index", `task:${b.id}`, { order: ob });
    }
  });

  // ---- the shared note (Automerge text) -----------------------------------
  const note = $<HTMLTextAreaElement>("#note");
  const noteText = () => (client.doc<Note>("collab", "note")?.text ?? "").toString();
  const renderNote = () => {
    const text = noteText();
    if (note.value === text) return;
    // Keep the caret where it was relative to the text around it (good enough here).
    const [s, e] = [note.selectionStart, note.selectionEnd];
    note.value = text;
    if (document.activeElement === note) note.setSelectionRange(s, e);
  };
  note.addEventListener("input", async () => {
    // Read the text first: the seed below re-renders the note.
    const value = note.value;
    await client.seedDoc("collab", "note", { text: "" });
    await client.change<Note>("collab", "note", (d) => A.updateText(d, ["text"], value));
    showPresence();
  });

  // ---- presence ------------------------------------------------------------
  let lastPresence = "";
  const showPresence = () => {
    const payload: Json = {
      name,
      color,
      field: document.activeElement === note ? "note" : null,
      cursor: document.activeElement === note ? note.selectionStart : null,
    };
    const text = JSON.stringify(payload);
    if (text === lastPresence && client.status === "live") return;
    lastPresence = text;
    client.setPresence("demo", payload);
  };
  for (const ev of ["focus", "blur", "keyup", "click", "select"]) note.addEventListener(ev, showPresence);
  client.onStatus((s) => {
    if (s === "live") {
      lastPresence = "";
      showPresence();
    }
  });
  const renderPresence = (entries: PresenceEntry[]) => {
    const seen = new Map<string, PresenceEntry>();
    for (const e of entries) if (e.key === "demo") seen.set(`${e.actorId}/${e.clientId}`, e);
    $("#presence").innerHTML = [...seen.values()]
      .map((e) => {
        const p = (e.payload ?? {}) as { name?: string; color?: string; field?: string | null; cursor?: number | null };
        const where = p.field === "note" ? `editing the note at ${p.cursor ?? 0}` : "here";
        const you = e.clientId === client.clientId ? " (you)" : "";
        return `<li data-name="${esc(p.name ?? e.actorId)}"><b style="color:${p.color ?? "#333"}">${esc(p.name ?? e.actorId)}</b>${you} <span class="where">${where}</span></li>`;
      })
      .join("");
  };
  client.onPresence(renderPresence);

  // ---- settings (compare-and-set) -----------------------------------------
  const renderSettings = () => {
    const v = client.get("settings", "theme");
    $("#theme-value").textContent = v ? String(v.value) : "–";
    $("#theme-version").textContent = v ? `v${v.version}${v.pending ? " (saving…)" : ""}` : "";
    document.body.dataset.theme = v ? String(v.value) : "";
  };
  $("#theme-save").addEventListener("click", () => {
    const v = client.get("settings", "theme");
    $("#conflict").hidden = true;
    void client.putIf("settings", "theme", $<HTMLSelectElement>("#theme-input").value, v?.version ?? 0);
  });
  client.onReject((e) => {
    if (e.code !== "precondition_failed") return;
    const c = $("#conflict");
    c.hidden = false;
    const server = e.currentState;
    c.textContent = server
      ? `Conflict: someone changed ${server.key} first. Your change was rolled back to the server's value "${String(server.value)}" (v${server.version}).`
      : `Conflict: your change was rolled back (${e.message}).`;
  });

  // ---- render on every change ---------------------------------------------
  let queued = false;
  const render = () => {
    queued = false;
    renderLists();
    renderNote();
    renderSettings();
    showStatus();
  };
  client.onChange(() => {
    if (!queued) {
      queued = true;
      queueMicrotask(render);
    }
  });
  render();
}

void main();
