/** Reconnect delays: exponential from `startMs` to `maxMs`, each with ±50 % jitter. */

export class Backoff {
  private next: number;
  constructor(
    private readonly startMs = 100,
    private readonly maxMs = 10_000,
    private readonly random: () => number = Math.random,
  ) {
    this.next = startMs;
  }

  /** The delay before the next attempt; doubles the one after. */
  delay(): number {
    const d = this.next * (0.5 + this.random());
    this.next = Math.min(this.next * 2, this.maxMs);
    return Math.round(d);
  }

  /** After a successful `welcome`. */
  reset(): void {
    this.next = this.startMs;
  }
}
