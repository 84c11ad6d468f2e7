// A server-wide byte budget for request payloads in flight (read buffers and
// write data), so many clients sending large requests at once cannot make the
// unit's memory grow without bound. A connection that cannot get bytes stops
// reading its socket and is woken when bytes are given back.

import { assert } from "../util/assert.ts";

export interface BudgetWaiter {
  budgetAvailable(): void;
}

export class ByteBudget {
  private availableBytes: number;
  private readonly waiters = new Set<BudgetWaiter>();
  readonly capacityBytes: number;

  constructor(capacityBytes: number) {
    this.capacityBytes = capacityBytes;
    this.availableBytes = capacityBytes;
  }

  get inUseBytes(): number {
    return this.capacityBytes - this.availableBytes;
  }

  /** Takes `bytes` if available; otherwise registers `waiter` to be told when bytes come back. */
  tryTake(bytes: number, waiter: BudgetWaiter): boolean {
    if (bytes <= this.availableBytes) {
      this.availableBytes -= bytes;
      return true;
    }
    this.waiters.add(waiter);
    return false;
  }

  give(bytes: number): void {
    this.availableBytes += bytes;
    assert(this.availableBytes <= this.capacityBytes, `budget over capacity: ${this.availableBytes}`);
    if (bytes === 0 || this.waiters.size === 0) return;
    // Wake every waiter; those that still cannot proceed register again.
    const woken = [...this.waiters];
    this.waiters.clear();
    for (const waiter of woken) waiter.budgetAvailable();
  }

  forget(waiter: BudgetWaiter): void {
    this.waiters.delete(waiter);
  }
}
