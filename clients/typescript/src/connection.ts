/**
 * The connection's state machine, apart from what the frames mean:
 *
 * ```
 * connecting ──welcome──▶ syncing ──every namespace synced──▶ live
 *     ▲                      │                                 │
 *     └──backoff + jitter────┴──────── socket closed ◀─────────┘
 * offline: the browser says it is offline; no attempts until it is online again
 * closed:  stop() was called, or the server speaks another protocol (4002)
 * ```
 *
 * It opens sockets (token in `?access_token=` for browsers, or through a factory
 * that sets the `Authorization` header), reconnects with exponential backoff and
 * jitter, pings an idle socket, and hands every decoded frame to its owner.
 */

import { Backoff } from "./backoff.js";
import { CloseCode, type ClientMessage, type ServerMessage } from "./types.js";

export type Status = "connecting" | "syncing" | "live" | "offline" | "closed";

/** The part of the WHATWG WebSocket the client uses (browsers, `ws` in Node). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

/** Opens a socket to `url` authenticated with `token`. */
export type WebSocketFactory = (url: string, token: string) => WebSocketLike;

/** The browser way: the token rides in `?access_token=` (a browser cannot set headers). */
export const browserWebSocket: WebSocketFactory = (url, token) => {
  const u = new URL(url);
  u.searchParams.set("access_token", token);
  return new WebSocket(u.toString()) as unknown as WebSocketLike;
};

export interface ConnectionHandlers {
  /** The socket is open: say hello. */
  open(): void;
  frame(msg: ServerMessage): void;
  /** The socket is gone (the connection will retry unless stopped). */
  closed(reason: string): void;
  status(s: Status): void;
}

export interface ConnectionOptions {
  url: string;
  token: string | (() => string | Promise<string>);
  webSocket: WebSocketFactory;
  backoffStartMs?: number;
  backoffMaxMs?: number;
  /** Ping an idle socket this often; close it when nothing came for 3×. */
  pingMs?: number;
}

const OPEN = 1;

export class Connection {
  private ws: WebSocketLike | null = null;
  private current: Status = "connecting";
  private timer: ReturnType<typeof setTimeout> | undefined;
  private pinger: ReturnType<typeof setInterval> | undefined;
  private lastFrameAt = 0;
  private stopped = false;
  private offline = false;
  private readonly backoff: Backoff;
  private readonly pingMs: number;
  private readonly onOnline = () => this.setOnline(true);
  private readonly onOffline = () => this.setOnline(false);

  constructor(
    private readonly opts: ConnectionOptions,
    private readonly handlers: ConnectionHandlers,
  ) {
    this.backoff = new Backoff(opts.backoffStartMs, opts.backoffMaxMs);
    this.pingMs = opts.pingMs ?? 15_000;
  }

  get status(): Status {
    return this.current;
  }

  setStatus(s: Status): void {
    if (s === this.current) return;
    this.current = s;
    this.handlers.status(s);
  }

  start(): void {
    const g = globalThis as { addEventListener?: typeof addEventListener; navigator?: { onLine?: boolean } };
    if (typeof g.addEventListener === "function") {
      g.addEventListener("online", this.onOnline);
      g.addEventListener("offline", this.onOffline);
      if (g.navigator?.onLine === false) this.offline = true;
    }
    this.pinger = setInterval(() => this.keepAlive(), this.pingMs);
    void this.connect();
  }

  /** Sends a frame when a socket is open; `false` when it is not. */
  send(msg: ClientMessage): boolean {
    if (!this.ws || this.ws.readyState !== OPEN) return false;
    this.ws.send(JSON.stringify(msg));
    return true;
  }

  /** The server said hello back: reconnects start from a short delay again. */
  welcomed(): void {
    this.backoff.reset();
    this.setStatus("syncing");
  }

  /** Drops the socket; the next one comes after the backoff (or at once). */
  restart(reason: string, now = false): void {
    const ws = this.ws;
    this.detach(reason);
    ws?.close(CloseCode.normal, reason.slice(0, 100));
    if (now) this.backoff.reset();
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    const g = globalThis as { removeEventListener?: typeof removeEventListener };
    g.removeEventListener?.("online", this.onOnline);
    g.removeEventListener?.("offline", this.onOffline);
    const ws = this.ws;
    this.detach("closed");
    ws?.close(CloseCode.normal, "client closed");
    this.setStatus("closed");
  }

  private setOnline(online: boolean): void {
    if (this.stopped) return;
    this.offline = !online;
    if (online) {
      this.backoff.reset();
      clearTimeout(this.timer);
      if (!this.ws) void this.connect();
    } else {
      this.restart("offline");
    }
  }

  private async connect(): Promise<void> {
    this.timer = undefined;
    if (this.stopped || this.ws) return;
    if (this.offline) {
      this.setStatus("offline");
      return;
    }
    this.setStatus("connecting");
    let ws: WebSocketLike;
    try {
      const token = typeof this.opts.token === "function" ? await this.opts.token() : this.opts.token;
      if (this.stopped || this.ws) return;
      ws = this.opts.webSocket(this.opts.url, token);
    } catch (e) {
      this.handlers.closed(`connect: ${String(e)}`);
      this.schedule();
      return;
    }
    this.ws = ws;
    this.lastFrameAt = Date.now();
    ws.onopen = () => {
      if (this.ws === ws) this.handlers.open();
    };
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      let msg: ServerMessage;
      try {
        msg = JSON.parse(String(ev.data)) as ServerMessage;
      } catch {
        return;
      }
      this.handlers.frame(msg);
    };
    ws.onerror = () => {};
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.detach(`closed ${ev.code} ${ev.reason}`.trim());
      if (ev.code === CloseCode.protocolMismatch) {
        this.stop();
        return;
      }
      this.schedule();
    };
  }

  /** Forgets the socket (its late events are ignored) and tells the owner. */
  private detach(reason: string): void {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    this.handlers.closed(reason);
  }

  private schedule(): void {
    if (this.stopped) return;
    if (this.offline) {
      this.setStatus("offline");
      return;
    }
    this.setStatus("connecting");
    clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.connect(), this.backoff.delay());
  }

  private keepAlive(): void {
    if (!this.ws || this.ws.readyState !== OPEN) return;
    if (Date.now() - this.lastFrameAt > 3 * this.pingMs) {
      this.restart("no answer to pings");
      return;
    }
    this.send({ type: "ping" });
  }
}
