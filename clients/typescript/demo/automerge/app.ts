// The automerge-repo demo: an unmodified automerge-repo app (`Repo` with
// `BrowserWebSocketClientAdapter`, nothing of ultrasync's SDK) whose sync server is
// ultrasync's automerge-repo endpoint, `/v1/automerge/{org}/{project}/{ns}`. One
// document: a click counter (an Automerge counter, so concurrent clicks add up) and a
// list of notes. No local storage: what a reload shows comes from the server.
//
// Open it from the `Automerge` link `ultrasync dev` prints
// (`/demo/automerge/#token=…`); the page creates a document and puts its URL in the
// fragment (`&doc=automerge:…`), so that link opens the same document elsewhere.
// Optional: `&name=`, `&project=` (default `demo`), `&ns=` (a crdt namespace, default
// `collab`).
import { Counter, Repo, type AutomergeUrl, type DocHandle, type PeerId, type StorageId } from "@automerge/automerge-repo";
import { BrowserWebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket";

type Note = { id: string; text: string; by: string };
type Board = { title: string; clicks: Counter; notes: Note[] };

const $ = <T extends HTMLElement>(sel: string) => document.querySelector(sel) as T;

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

function fail(message: string): void {
  const error = $("#error");
  error.textContent = message;
  error.hidden = false;
}

async function main(): Promise<void> {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token") ?? localStorage.getItem("ultrasync-demo-token");
  if (!token) {
    $("#missing").hidden = false;
    return;
  }
  localStorage.setItem("ultrasync-demo-token", token);
  const { sub = "someone", org = "dev" } = claims(token);
  const name = params.get("name") ?? sub;
  const project = params.get("project") ?? "demo";
  const ns = params.get("ns") ?? "collab";
  $("#me").textContent = name;

  // The one ultrasync-specific line: the sync server's URL, from the page's origin.
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const path = [org, project, ns].map(encodeURIComponent).join("/");
  const endpoint = `${scheme}://${location.host}/v1/automerge/${path}?access_token=${encodeURIComponent(token)}`;
  const adapter = new BrowserWebSocketClientAdapter(endpoint);

  // The server's peer: its storage id tells which heads the server has stored.
  let server: { peerId: PeerId; storageId?: StorageId } | undefined;
  const status = $("#status");
  const showStatus = (s: "connecting" | "live" | "offline") => {
    status.dataset.status = s;
    status.textContent = s;
  };
  const connected = new Promise<void>((resolve) => {
    adapter.on("peer-candidate", ({ peerId, peerMetadata }) => {
      server = { peerId, storageId: peerMetadata?.storageId };
      showStatus("live");
      resolve();
    });
  });
  adapter.on("peer-disconnected", () => showStatus("offline"));

  const repo = new Repo({ network: [adapter] });
  await connected;

  const docParam = params.get("doc");
  let handle: DocHandle<Board>;
  try {
    handle = docParam
      ? await repo.find<Board>(docParam as AutomergeUrl)
      : repo.create<Board>({ title: `${name}'s board`, clicks: new Counter(0), notes: [] });
  } catch (e) {
    fail(`Document ${docParam} is not available: not stored on the server (yet), or in another project or namespace. (${e})`);
    return;
  }
  if (!docParam) {
    params.set("doc", handle.url);
    history.replaceState(null, "", `#${params}`);
  }
  // For the browser tests and the curious: `demo.handle` in the console.
  (window as unknown as { demo: unknown }).demo = { repo, handle, server: () => server };

  $("#doc-url").textContent = handle.url;
  $("#project").textContent = project;
  $("#ns").textContent = ns;
  const share = $<HTMLAnchorElement>("#share");
  share.href = share.textContent = location.href;
  $("#app").hidden = false;

  const render = () => {
    const doc = handle.doc();
    if (!doc) return;
    $("#title").textContent = doc.title ?? "";
    $("#count").textContent = String(doc.clicks?.value ?? 0);
    const list = $("#notes");
    list.replaceChildren(
      ...(doc.notes ?? []).map((note) => {
        const li = document.createElement("li");
        li.dataset.id = note.id;
        const text = document.createElement("span");
        text.className = "text";
        text.textContent = note.text;
        const by = document.createElement("span");
        by.className = "by";
        by.textContent = `— ${note.by}`;
        const del = document.createElement("button");
        del.className = "del";
        del.textContent = "×";
        del.title = "delete";
        del.onclick = () =>
          handle.change((d) => {
            const i = d.notes.findIndex((n) => n.id === note.id);
            if (i >= 0) d.notes.splice(i, 1);
          });
        li.append(text, by, " ", del);
        return li;
      }),
    );
  };

  // Saved: the server's heads (as its sync messages tell them) include this page's.
  // The sync info changes without an event of its own, hence the look every 250 ms.
  const saved = $("#saved");
  const showSaved = () => {
    const mine: readonly string[] = handle.heads() ?? [];
    const theirs: readonly string[] = (server?.storageId && handle.getSyncInfo(server.storageId)?.lastHeads) || [];
    const yes = mine.length > 0 && mine.every((h) => theirs.includes(h));
    saved.dataset.saved = yes ? "yes" : "no";
    saved.textContent = yes ? "saved on the server" : "not saved yet";
  };
  handle.on("change", () => {
    render();
    showSaved();
  });
  handle.on("remote-heads", showSaved);
  setInterval(showSaved, 250);
  render();
  showSaved();

  $("#inc").onclick = () => handle.change((d) => d.clicks.increment(1));
  $("#dec").onclick = () => handle.change((d) => d.clicks.decrement(1));
  $<HTMLFormElement>("#note-form").onsubmit = (e) => {
    e.preventDefault();
    const input = $<HTMLInputElement>("#note");
    const text = input.value.trim();
    if (!text) return;
    handle.change((d) => {
      d.notes.push({ id: newId(), text, by: name });
    });
    input.value = "";
  };
}

main().catch((e) => fail(`The demo failed: ${e}`));
