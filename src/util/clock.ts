// The project's injectable time (the discovery state machines, the station's
// store, reconcile, failover and replacement loops): they
// read the time and arm timers only through a Clock, so tests can drive them
// with ManualClock (deterministic, no sleeping) and production uses realClock.

export interface TimerHandle {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds since the Unix epoch (datagram timestamps, replay checks). */
  nowMs(): number;
  setTimeout(callback: () => void, delayMs: number): TimerHandle;
}

/** What only reads the time (the station's store, tokens and audit log stamp records with it): the nowMs half of a Clock. */
export type TimeSource = Pick<Clock, "nowMs">;

export const realClock: Clock = {
  nowMs: () => Date.now(),
  setTimeout(callback, delayMs) {
    const timer = setTimeout(callback, delayMs);
    timer.unref();
    return { cancel: () => clearTimeout(timer) };
  },
};

/** A clock that moves only when advance() is called; timers fire in due order. */
export class ManualClock implements Clock {
  private now: number;
  private nextId = 0;
  private readonly timers = new Map<number, { dueMs: number; callback: () => void }>();

  constructor(startMs = 1_700_000_000_000) {
    this.now = startMs;
  }

  nowMs(): number {
    return this.now;
  }

  setTimeout(callback: () => void, delayMs: number): TimerHandle {
    const id = this.nextId++;
    this.timers.set(id, { dueMs: this.now + Math.max(0, delayMs), callback });
    return { cancel: () => this.timers.delete(id) };
  }

  get pending(): number {
    return this.timers.size;
  }

  /** Moves time forward by `ms`, firing every timer that falls due on the way. */
  advance(ms: number): void {
    const target = this.now + ms;
    for (;;) {
      let nextId: number | undefined;
      let nextDue = Infinity;
      for (const [id, timer] of this.timers) {
        if (timer.dueMs <= target && timer.dueMs < nextDue) {
          nextDue = timer.dueMs;
          nextId = id;
        }
      }
      if (nextId === undefined) break;
      const timer = this.timers.get(nextId);
      this.timers.delete(nextId);
      this.now = Math.max(this.now, nextDue);
      timer?.callback();
    }
    this.now = target;
  }
}

/** Random numbers in [0, 1) for jitter, and the seeded generator: one of each, in util/random.ts. */
export { type Random, seededRandom } from "./random.ts";
