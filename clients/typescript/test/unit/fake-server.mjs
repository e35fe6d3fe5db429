// A scripted stand-in for the gateway: each socket the client opens is recorded, the
// test reads the frames the client sent and pushes server frames back.

export class FakeSocket {
  constructor(url, token) {
    this.url = url;
    this.token = token;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.waiters = [];
  }
  send(text) {
    this.sent.push(JSON.parse(text));
    for (const w of this.waiters.splice(0)) w();
  }
  close(code = 1000, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }
  /** Server side: accept the socket. */
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  /** Server side: push a frame. */
  push(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  /** Server side: drop the connection. */
  drop(code = 1006) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "dropped" });
  }
  /** Frames of one type sent so far. */
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
  /** Waits until `pred(sent)` holds. */
  async until(pred, ms = 2000) {
    const end = Date.now() + ms;
    while (!pred(this.sent)) {
      if (Date.now() > end) throw new Error(`timed out; sent: ${JSON.stringify(this.sent)}`);
      await new Promise((r) => {
        this.waiters.push(r);
        setTimeout(r, 20);
      });
    }
  }
}

export class FakeServer {
  constructor() {
    this.sockets = [];
    this.waiters = [];
    this.factory = (url, token) => {
      const s = new FakeSocket(url, token);
      this.sockets.push(s);
      for (const w of this.waiters.splice(0)) w();
      return s;
    };
  }
  /** The n-th socket (0-based), once the client opened it. */
  async socket(n, ms = 3000) {
    const end = Date.now() + ms;
    while (this.sockets.length <= n) {
      if (Date.now() > end) throw new Error(`socket ${n} never opened`);
      await new Promise((r) => {
        this.waiters.push(r);
        setTimeout(r, 20);
      });
    }
    return this.sockets[n];
  }
}

let seq = 0;
/** A committed op as the server would send it. */
export function op(fields) {
  seq += 1;
  return {
    op_id: `op${seq}`,
    org_id: "o",
    project_id: "p",
    namespace: "index",
    actor_id: "a",
    client_id: "other",
    command_id: `x${seq}`,
    hlc_ts: "1",
    payload: null,
    ...fields,
  };
}

export const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
