// A server-wide byte budget for request payloads in flight (read buffers and
// write data), so many clients sending large requests at once cannot make the
// unit's memory grow without bound. A connection that cannot get bytes stops
// reading its socket and is woken when bytes are given back.
//
// Two rules keep it honest (docs/adr/0007-unit-changes-opens-and-flow-control.md):
// - Every reserved byte has one owner, a Reservation, which gives back
//   exactly what it took, once: accounting cannot go negative or leak, and a
//   mistake is refused where it happens instead of surfacing as an assertion
//   in some later socket event.
// - Fair share per peer address: a peer that already holds bytes may hold at
//   most capacity / (active peers), where a peer is active while it holds or
//   waits for bytes and for `recentMs` after (the payload timeout: a peer
//   between two requests still counts); a peer holding nothing may always
//   take one request's worth when that much is free. Waiters are woken
//   least-holding peer first. So peers that stall their payloads (which the
//   session times out) keep an honest peer from the budget for at most one
//   payload timeout, and after that hold no more than their share.

export interface BudgetWaiter {
  budgetAvailable(): void;
}

/** One peer's standing with the budget; shared by that peer's connections. */
export class BudgetAccount {
  readonly key: string;
  heldBytes = 0;
  /** Connections of this peer waiting for bytes. */
  readonly waiting = new Set<BudgetWaiter>();
  /** Connections using this account; it is forgotten at zero. */
  users = 0;
  /** When it last held, asked for or gave back bytes (the budget's clock). */
  lastActiveMs = Number.NEGATIVE_INFINITY;

  constructor(key: string) {
    this.key = key;
  }

  active(nowMs: number, recentMs: number): boolean {
    return this.heldBytes > 0 || this.waiting.size > 0 || nowMs - this.lastActiveMs < recentMs;
  }
}

/** Bytes taken from a budget by one owner; release() gives back exactly these bytes, once. */
export class Reservation {
  readonly bytes: number;
  readonly #budget: ByteBudget;
  readonly #account: BudgetAccount;
  #released = false;

  constructor(budget: ByteBudget, account: BudgetAccount, bytes: number) {
    this.#budget = budget;
    this.#account = account;
    this.bytes = bytes;
  }

  get released(): boolean {
    return this.#released;
  }

  /** Gives the bytes back. True the first time; later calls do nothing and return false. */
  release(): boolean {
    if (this.#released) return false;
    this.#released = true;
    this.#account.heldBytes -= this.bytes;
    this.#budget.returned(this.#account, this.bytes);
    return true;
  }
}

export interface ByteBudgetOptions {
  /** A peer counts as active for this long after it last used the budget (the payload timeout). */
  readonly recentMs: number;
  /** Milliseconds on a monotonic clock (injected in tests). */
  readonly now?: () => number;
}

export class ByteBudget {
  readonly capacityBytes: number;
  readonly #recentMs: number;
  readonly #now: () => number;
  #availableBytes: number;
  readonly #accounts = new Map<string, BudgetAccount>();
  #wakeScheduled = false;

  constructor(capacityBytes: number, options: ByteBudgetOptions) {
    this.capacityBytes = capacityBytes;
    this.#availableBytes = capacityBytes;
    this.#recentMs = options.recentMs;
    this.#now = options.now ?? (() => performance.now());
  }

  get inUseBytes(): number {
    return this.capacityBytes - this.#availableBytes;
  }

  /** The account of peer `key` (its address); each user calls leave() when done with it. */
  join(key: string): BudgetAccount {
    let account = this.#accounts.get(key);
    if (account === undefined) {
      account = new BudgetAccount(key);
      this.#accounts.set(key, account);
    }
    account.users += 1;
    return account;
  }

  /** A connection is done with its account: it stops waiting; the account goes when its last user leaves and holds nothing. */
  leave(account: BudgetAccount, waiter: BudgetWaiter): void {
    account.waiting.delete(waiter);
    account.users -= 1;
    if (account.users <= 0 && account.heldBytes === 0 && this.#accounts.get(account.key) === account) this.#accounts.delete(account.key);
  }

  /** Bytes `account` may hold at most while others compete: capacity over the active peers (counting it). */
  shareBytes(account: BudgetAccount, nowMs = this.#now()): number {
    let active = account.active(nowMs, this.#recentMs) ? 0 : 1;
    for (const other of this.#accounts.values()) if (other.active(nowMs, this.#recentMs)) active += 1;
    return Math.floor(this.capacityBytes / Math.max(1, active));
  }

  #withinShare(account: BudgetAccount, bytes: number, nowMs: number): boolean {
    if (account.heldBytes === 0) return true;
    const wanted = account.heldBytes + bytes;
    // Cheap first: no peer's share is below capacity / known peers.
    if (wanted <= Math.floor(this.capacityBytes / Math.max(1, this.#accounts.size))) return true;
    return wanted <= this.shareBytes(account, nowMs);
  }

  /**
   * Takes `bytes` for `account` if they are free and within its fair share;
   * otherwise registers `waiter` to be woken when bytes come back and
   * returns undefined.
   */
  reserve(account: BudgetAccount, bytes: number, waiter: BudgetWaiter): Reservation | undefined {
    if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes > this.capacityBytes) {
      throw new RangeError(`budget reservation of ${bytes} bytes (capacity ${this.capacityBytes})`);
    }
    const nowMs = this.#now();
    const withinShare = this.#withinShare(account, bytes, nowMs);
    account.lastActiveMs = nowMs;
    if (bytes <= this.#availableBytes && withinShare) {
      account.waiting.delete(waiter);
      this.#availableBytes -= bytes;
      account.heldBytes += bytes;
      return new Reservation(this, account, bytes);
    }
    account.waiting.add(waiter);
    return undefined;
  }

  /** Reservation.release(): the bytes are free again; waiters are woken (in a microtask, never inside the caller) least-holding peer first. */
  returned(account: BudgetAccount, bytes: number): void {
    this.#availableBytes += bytes;
    account.lastActiveMs = this.#now();
    if (account.users <= 0 && account.heldBytes === 0 && this.#accounts.get(account.key) === account) this.#accounts.delete(account.key);
    if (this.#wakeScheduled) return;
    this.#wakeScheduled = true;
    queueMicrotask(this.#wake);
  }

  readonly #wake = (): void => {
    this.#wakeScheduled = false;
    const waiting = [...this.#accounts.values()].filter((a) => a.waiting.size > 0);
    waiting.sort((a, b) => a.heldBytes - b.heldBytes);
    for (const account of waiting) {
      // Those that still cannot proceed register again.
      const woken = [...account.waiting];
      account.waiting.clear();
      for (const waiter of woken) waiter.budgetAvailable();
    }
  };
}
