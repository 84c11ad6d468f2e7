// What this proves: the server-wide byte budget (budget.ts) keeps exact
// accounting and shares fairly per peer address, in process, with an injected
// clock and no sockets.
//
// - A Reservation gives back exactly its bytes, once (a second release()
//   returns false and changes nothing); reserve() refuses 0, negative,
//   fractional, NaN, infinite and over-capacity byte counts with a RangeError
//   and changes nothing; inUseBytes stays within [0, capacity].
// - Fair share: with two active peers, one that holds bytes gets at most
//   capacity / 2; a peer holding nothing may take one request whenever that
//   much is free, even above its share; a peer stops counting as active
//   `recentMs` after it last used the budget (the boundary is exclusive), and
//   an account is forgotten once its last user left and it holds nothing.
// - Waiters: woken after a release, never inside release() but in a
//   microtask, least-holding account first, once per release burst; a waiter
//   that left is not woken.
// - A model-based property test (fast-check) over random sequences of join /
//   reserve / release / leave / clock advance / settle, checking after every
//   step that the budget agrees with an independent model (accounting, users,
//   waiters, forgotten accounts, exact grant/refuse decisions, wake order),
//   and in particular that no account already holding bytes is ever granted
//   past capacity / (active accounts), with "active" computed by the model.
// - Canaries: the same property run against deliberately broken budgets (one
//   that gives bytes back twice, one that skips the share check) fails, so the
//   property is able to catch those bugs.

import assert from "node:assert/strict";
import { test } from "node:test";
import fc from "fast-check";
import { type BudgetAccount, type BudgetWaiter, ByteBudget, type Reservation } from "./budget.ts";

const RECENT_MS = 100;

class Clock {
  ms = 0;
  readonly now = (): number => this.ms;
}

/** Lets queued microtasks (the budget's wake-up) run. */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** A waiter that records its wake-ups in `log` (shared, to see the order). */
class Waiter implements BudgetWaiter {
  calls = 0;
  readonly name: string;
  readonly log: string[];
  constructor(name: string, log: string[] = []) {
    this.name = name;
    this.log = log;
  }
  budgetAvailable(): void {
    this.calls += 1;
    this.log.push(this.name);
  }
}

function budgetOf(capacity: number, clock = new Clock()): ByteBudget {
  return new ByteBudget(capacity, { recentMs: RECENT_MS, now: clock.now });
}

function mustReserve(budget: ByteBudget, account: BudgetAccount, bytes: number, waiter: BudgetWaiter): Reservation {
  const reservation = budget.reserve(account, bytes, waiter);
  assert.ok(reservation !== undefined, `reserve(${account.key}, ${bytes}) refused (held ${account.heldBytes}, in use ${budget.inUseBytes})`);
  return reservation;
}

// ------------------------------------------------------------------ accounting

test("a reservation gives back exactly its bytes, once", () => {
  const budget = budgetOf(100);
  const a = budget.join("A");
  const w = new Waiter("a");
  const r1 = mustReserve(budget, a, 30, w);
  const r2 = mustReserve(budget, a, 20, w);
  assert.equal(budget.inUseBytes, 50);
  assert.equal(a.heldBytes, 50);
  assert.equal(r1.released, false);

  assert.equal(r1.release(), true);
  assert.equal(r1.released, true);
  assert.equal(budget.inUseBytes, 20);
  assert.equal(a.heldBytes, 20);

  // Again: nothing changes, the other reservation's bytes stay counted.
  assert.equal(r1.release(), false);
  assert.equal(r1.release(), false);
  assert.equal(budget.inUseBytes, 20);
  assert.equal(a.heldBytes, 20);

  assert.equal(r2.release(), true);
  assert.equal(r2.release(), false);
  assert.equal(budget.inUseBytes, 0);
  assert.equal(a.heldBytes, 0);
});

test("inUseBytes never exceeds capacity: a full budget refuses even one byte", () => {
  const budget = budgetOf(64);
  const a = budget.join("A");
  const b = budget.join("B");
  const wa = new Waiter("a");
  const wb = new Waiter("b");
  const full = mustReserve(budget, a, 64, wa);
  assert.equal(budget.inUseBytes, 64);
  assert.equal(budget.reserve(b, 1, wb), undefined, "B holds nothing, but nothing is free");
  assert.equal(budget.reserve(a, 1, wa), undefined);
  assert.equal(budget.inUseBytes, 64);
  assert.equal(b.heldBytes, 0);
  full.release();
  assert.equal(budget.inUseBytes, 0);
});

test("reserve() refuses 0, negative, fractional, NaN, infinite and over-capacity byte counts and changes nothing", () => {
  const clock = new Clock();
  const budget = budgetOf(100, clock);
  const a = budget.join("A");
  const w = new Waiter("a");
  const held = mustReserve(budget, a, 10, w);
  clock.ms = 5_000; // so a refused call that touched lastActiveMs would show
  const before = a.lastActiveMs;
  for (const bytes of [0, -0, -1, -100, 0.5, 1.5, 99.999, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 101, 2 ** 53, Number.MAX_SAFE_INTEGER]) {
    assert.throws(() => budget.reserve(a, bytes, w), RangeError, `bytes=${bytes}`);
  }
  assert.equal(budget.inUseBytes, 10);
  assert.equal(a.heldBytes, 10);
  assert.equal(a.waiting.size, 0, "a refused byte count registers no waiter");
  assert.equal(a.lastActiveMs, before);
  // Exactly the capacity is allowed (when it is free).
  held.release();
  mustReserve(budget, a, 100, w).release();
  assert.equal(budget.inUseBytes, 0);
});

// ------------------------------------------------------------------ fair share

test("fair share: with two active peers, one holding bytes gets at most capacity / 2", () => {
  const budget = budgetOf(100);
  const a = budget.join("A");
  const b = budget.join("B");
  const wa = new Waiter("a");
  const wb = new Waiter("b");
  mustReserve(budget, a, 10, wa);
  mustReserve(budget, b, 10, wb);
  mustReserve(budget, a, 40, wa); // 50 = 100 / 2
  assert.equal(a.heldBytes, 50);
  assert.equal(budget.reserve(a, 1, wa), undefined, "51 > 100 / 2 although 40 bytes are free");
  assert.ok(a.waiting.has(wa));
  assert.equal(a.heldBytes, 50);
  assert.equal(budget.inUseBytes, 60);
  // B may still grow to its share.
  mustReserve(budget, b, 40, wb);
  assert.equal(b.heldBytes, 50);
  assert.equal(budget.reserve(b, 1, wb), undefined);
});

test("fair share: a peer holding nothing may take one request when that much is free, even above its share", () => {
  const budget = budgetOf(90);
  const [a, b, c] = ["A", "B", "C"].map((key) => budget.join(key)) as [BudgetAccount, BudgetAccount, BudgetAccount];
  const wa = new Waiter("a");
  const wb = new Waiter("b");
  const wc = new Waiter("c");
  mustReserve(budget, a, 10, wa);
  const rb = mustReserve(budget, b, 10, wb);
  // Three active peers: share 30. C holds nothing: 60 of the 70 free bytes are granted.
  const big = mustReserve(budget, c, 60, wc);
  assert.equal(c.heldBytes, 60);
  assert.equal(budget.inUseBytes, 80);
  // Now C holds bytes: no more, even though 10 are free.
  assert.equal(budget.reserve(c, 1, wc), undefined);
  big.release();
  rb.release();
  // B holds nothing again: one request of all that is free (80 of 80), far above 90 / 3.
  const all = mustReserve(budget, b, 80, wb);
  assert.equal(budget.inUseBytes, 90);
  all.release();
  // Holding nothing is no licence to take more than is free.
  assert.equal(budget.reserve(c, 81, wc), undefined);
  assert.ok(c.waiting.has(wc));
  assert.equal(c.heldBytes, 0);
});

test("fair share: a peer stops counting as active recentMs after its last use, then the other may take more", () => {
  const clock = new Clock();
  const budget = budgetOf(100, clock);
  const a = budget.join("A");
  const b = budget.join("B");
  const wa = new Waiter("a");
  const wb = new Waiter("b");
  mustReserve(budget, a, 10, wa);
  clock.ms = 1_000;
  // B uses the budget at t=1000 and gives it back: it holds nothing but is active until t=1100.
  mustReserve(budget, b, 5, wb).release();
  assert.equal(b.heldBytes, 0);
  clock.ms = 1_000 + RECENT_MS - 1;
  assert.equal(budget.shareBytes(a), 50);
  assert.equal(budget.reserve(a, 45, wa), undefined, "55 > 100 / 2 while B is recent");
  clock.ms = 1_000 + RECENT_MS; // exactly recentMs later: no longer active (active means now - last < recentMs)
  assert.equal(budget.shareBytes(a), 100);
  mustReserve(budget, a, 45, wa);
  assert.equal(a.heldBytes, 55);
  assert.equal(a.waiting.size, 0, "a granted reserve() unregisters the waiter");
  // B comes back: it holds nothing, so it may take one request; then both are active again.
  mustReserve(budget, b, 5, wb);
  assert.equal(budget.reserve(a, 1, wa), undefined, "56 > 100 / 2 with B active again");
});

test("fair share: a peer waiting for bytes counts as active even when it holds nothing and is not recent", () => {
  const clock = new Clock();
  const budget = budgetOf(100, clock);
  const a = budget.join("A");
  const b = budget.join("B");
  const wa = new Waiter("a");
  const wb = new Waiter("b");
  mustReserve(budget, a, 10, wa);
  mustReserve(budget, a, 80, wa); // B never used the budget: A alone is active
  assert.equal(budget.reserve(b, 20, wb), undefined, "only 10 free");
  clock.ms = 10 * RECENT_MS; // long after B's last use, but B still waits
  assert.equal(budget.shareBytes(a), 50);
  assert.equal(budget.reserve(a, 1, wa), undefined);
});

test("an account is forgotten after its last user leaves and it holds nothing", () => {
  const budget = budgetOf(100);
  const w1 = new Waiter("a1");
  const w2 = new Waiter("a2");
  const a = budget.join("A");
  assert.equal(budget.join("A"), a, "connections of one peer share its account");
  assert.equal(a.users, 2);
  const r = mustReserve(budget, a, 30, w1);
  budget.leave(a, w1);
  budget.leave(a, w2);
  assert.equal(a.users, 0);
  // Still holding: still known, a new connection of that peer gets the same account.
  const again = budget.join("A");
  assert.equal(again, a);
  budget.leave(a, w1);
  r.release();
  // Released after its last user left: forgotten.
  const fresh = budget.join("A");
  assert.notEqual(fresh, a);
  assert.equal(fresh.heldBytes, 0);
  assert.equal(fresh.users, 1);
  // Leaving while holding nothing forgets at once.
  budget.leave(fresh, w1);
  assert.notEqual(budget.join("A"), fresh);
});

// ------------------------------------------------------------------ waiters

test("a waiter is woken after a release, in a microtask, never inside release()", async () => {
  const budget = budgetOf(100);
  const a = budget.join("A");
  const b = budget.join("B");
  const wa = new Waiter("a");
  const wb = new Waiter("b");
  const r1 = mustReserve(budget, a, 60, wa);
  const r2 = mustReserve(budget, b, 40, wb);
  assert.equal(budget.reserve(b, 10, wb), undefined);
  assert.ok(b.waiting.has(wb));
  r1.release();
  r2.release(); // two releases in one turn
  assert.equal(wb.calls, 0, "not woken synchronously inside release()");
  await Promise.resolve(); // one microtask turn: the wake-up queued by release() has run
  assert.equal(wb.calls, 1, "woken in a microtask");
  await settle();
  assert.equal(wb.calls, 1, "woken once for the burst of releases");
  assert.equal(wa.calls, 0, "a connection that was not waiting is not woken");
  assert.equal(b.waiting.size, 0, "woken waiters are unregistered (they register again if still short)");
  await settle();
  assert.equal(wb.calls, 1);
});

test("waiters are woken least-holding account first", async () => {
  const budget = budgetOf(100);
  const log: string[] = [];
  const a = budget.join("A");
  const b = budget.join("B");
  const c = budget.join("C");
  const d = budget.join("D");
  const wa = new Waiter("A", log);
  const wb1 = new Waiter("B1", log);
  const wb2 = new Waiter("B2", log);
  const wc = new Waiter("C", log);
  const wd = new Waiter("D", log);
  // Each takes one request while holding nothing: A 50, B 30, C 10, D 10 (full).
  mustReserve(budget, a, 50, wa);
  mustReserve(budget, b, 30, wb1);
  mustReserve(budget, c, 10, wc);
  const rd = mustReserve(budget, d, 10, wd);
  // They wait, most-holding first (so registration order alone would be wrong).
  assert.equal(budget.reserve(a, 5, wa), undefined);
  assert.equal(budget.reserve(b, 5, wb1), undefined);
  assert.equal(budget.reserve(b, 5, wb2), undefined);
  assert.equal(budget.reserve(c, 5, wc), undefined);
  rd.release();
  assert.deepEqual(log, []);
  await settle();
  assert.deepEqual(log, ["C", "B1", "B2", "A"]);
});

test("a waiter that left is not woken", async () => {
  const budget = budgetOf(100);
  const log: string[] = [];
  const a = budget.join("A");
  const b = budget.join("B");
  budget.join("B"); // a second connection of B
  const c = budget.join("C");
  const wa = new Waiter("A", log);
  const wb1 = new Waiter("B1", log);
  const wb2 = new Waiter("B2", log);
  const wc = new Waiter("C", log);
  const full = mustReserve(budget, a, 100, wa);
  assert.equal(budget.reserve(b, 10, wb1), undefined);
  assert.equal(budget.reserve(b, 10, wb2), undefined);
  assert.equal(budget.reserve(c, 10, wc), undefined);
  budget.leave(b, wb1); // B's account stays (B2 uses it), B1 stops waiting
  budget.leave(c, wc); // C's account is forgotten
  assert.equal(b.waiting.size, 1);
  full.release();
  await settle();
  assert.deepEqual(log, ["B2"]);
  // Leaving after the release but before the microtask also prevents the wake.
  const full2 = mustReserve(budget, a, 100, wa);
  assert.equal(budget.reserve(b, 10, wb2), undefined);
  full2.release();
  budget.leave(b, wb2);
  await settle();
  assert.deepEqual(log, ["B2"]);
});

// ------------------------------------------------------------------ model-based property

type Op =
  | { readonly kind: "join"; readonly peer: number }
  /** `permille` of the capacity (at least 1 byte), so sizes scale with any capacity. */
  | { readonly kind: "reserve"; readonly conn: number; readonly permille: number }
  | { readonly kind: "reserveInvalid"; readonly conn: number; readonly bytes: "over" | number }
  | { readonly kind: "release"; readonly res: number }
  | { readonly kind: "leave"; readonly conn: number }
  | { readonly kind: "advance"; readonly ms: number }
  | { readonly kind: "settle" };

const PEERS = ["p0", "p1", "p2", "p3"] as const;

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant("join" as const), peer: fc.integer({ min: 0, max: PEERS.length - 1 }) }), weight: 3 },
  {
    arbitrary: fc.record({
      kind: fc.constant("reserve" as const),
      conn: fc.nat(31),
      permille: fc.oneof(fc.integer({ min: 1, max: 150 }), fc.integer({ min: 1, max: 600 }), fc.integer({ min: 1, max: 1000 })),
    }),
    weight: 8,
  },
  {
    arbitrary: fc.record({
      kind: fc.constant("reserveInvalid" as const),
      conn: fc.nat(31),
      bytes: fc.constantFrom<"over" | number>("over", 0, -1, 0.5, Number.NaN, Number.POSITIVE_INFINITY),
    }),
    weight: 1,
  },
  { arbitrary: fc.record({ kind: fc.constant("release" as const), res: fc.nat(63) }), weight: 4 },
  { arbitrary: fc.record({ kind: fc.constant("leave" as const), conn: fc.nat(31) }), weight: 1 },
  {
    arbitrary: fc.record({
      kind: fc.constant("advance" as const),
      // Mostly whole halves of RECENT_MS, so that "exactly RECENT_MS since the last use" happens often.
      ms: fc.oneof(fc.integer({ min: 0, max: 3 }).map((n) => (n * RECENT_MS) / 2), fc.constantFrom(1, RECENT_MS - 1, RECENT_MS + 1)),
    }),
    weight: 2,
  },
  { arbitrary: fc.constant({ kind: "settle" as const }), weight: 2 },
);

const capacityArb = fc.integer({ min: 8, max: 128 });
const opsArb = fc.array(opArb, { minLength: 1, maxLength: 60, size: "max" });

interface ModelAccount {
  readonly key: string;
  readonly real: BudgetAccount;
  users: number;
  held: number;
  /** In registration order, as a Set keeps it. */
  readonly waiters: Set<ModelConn>;
  lastActiveMs: number;
}

interface ModelConn {
  readonly account: ModelAccount;
  readonly waiter: Waiter;
  left: boolean;
}

interface ModelReservation {
  readonly account: ModelAccount;
  readonly real: Reservation;
  readonly bytes: number;
  released: boolean;
}

type BudgetFactory = (capacity: number, options: { recentMs: number; now: () => number }) => ByteBudget;

/**
 * Runs `ops` against a budget from `make` and an independent model of the
 * contract, checking after every step. Throws (an AssertionError naming the
 * broken rule) on the first disagreement.
 */
async function runAgainstModel(make: BudgetFactory, capacity: number, ops: readonly Op[]): Promise<void> {
  const clock = new Clock();
  const budget = make(capacity, { recentMs: RECENT_MS, now: clock.now });
  const wakeLog: string[] = [];
  /** Accounts the budget should know (remembered), in its insertion order. */
  const known = new Map<string, ModelAccount>();
  const everyAccount: ModelAccount[] = [];
  const conns: ModelConn[] = [];
  const reservations: ModelReservation[] = [];
  let available = capacity;
  let wakePending = false;
  let expectedWakes = 0;

  const isActive = (m: ModelAccount): boolean => m.held > 0 || m.waiters.size > 0 || clock.ms - m.lastActiveMs < RECENT_MS;
  const forgetIfDone = (m: ModelAccount): void => {
    if (m.users <= 0 && m.held === 0 && known.get(m.key) === m) known.delete(m.key);
  };

  const check = (step: number, op: Op | undefined): void => {
    const where = `step ${step} ${JSON.stringify(op)}`;
    assert.equal(wakeLog.length, expectedWakes, `${where}: waiters woken outside a settle (synchronously)`);
    const unreleased = reservations.filter((r) => !r.released).reduce((sum, r) => sum + r.bytes, 0);
    assert.equal(budget.inUseBytes, unreleased, `${where}: inUseBytes != sum of unreleased reservations`);
    assert.ok(budget.inUseBytes >= 0 && budget.inUseBytes <= capacity, `${where}: inUseBytes ${budget.inUseBytes} outside [0, ${capacity}]`);
    assert.equal(budget.inUseBytes, capacity - available, `${where}: inUseBytes != model`);
    for (const m of everyAccount) {
      const held = reservations.filter((r) => r.account === m && !r.released).reduce((sum, r) => sum + r.bytes, 0);
      assert.equal(m.real.heldBytes, held, `${where}: ${m.key} heldBytes != sum of its unreleased reservations`);
      assert.equal(m.held, held);
      assert.equal(m.real.users, m.users, `${where}: ${m.key} users`);
      assert.deepEqual(
        [...m.real.waiting].map((w) => (w as Waiter).name),
        [...m.waiters].map((c) => c.waiter.name),
        `${where}: ${m.key} waiters`,
      );
    }
  };

  check(-1, undefined);
  // A final settle: every wake-up is checked before the sequence ends.
  for (const [step, op] of [...ops, { kind: "settle" } as const].entries()) {
    switch (op.kind) {
      case "join": {
        const key = PEERS[op.peer] ?? "p0";
        const real = budget.join(key);
        let m = known.get(key);
        if (m !== undefined) {
          assert.equal(real, m.real, `step ${step}: join(${key}) must return the remembered account`);
        } else {
          assert.ok(!everyAccount.some((old) => old.real === real), `step ${step}: join(${key}) returned a forgotten account`);
          assert.equal(real.heldBytes, 0);
          m = { key, real, users: 0, held: 0, waiters: new Set(), lastActiveMs: Number.NEGATIVE_INFINITY };
          known.set(key, m);
          everyAccount.push(m);
        }
        m.users += 1;
        conns.push({ account: m, waiter: new Waiter(`${key}#${conns.length}`, wakeLog), left: false });
        break;
      }
      case "reserve": {
        const live = conns.filter((c) => !c.left);
        const conn = live[op.conn % Math.max(1, live.length)];
        if (conn === undefined) break;
        const m = conn.account;
        const bytes = Math.max(1, Math.round((op.permille * capacity) / 1000));
        // The oracle: share = capacity / (accounts active now: holding, waiting, or used within RECENT_MS).
        const activeCount = [...known.values()].filter(isActive).length + (isActive(m) ? 0 : 1);
        const share = Math.floor(capacity / Math.max(1, activeCount));
        const heldBefore = m.held;
        const expectGrant = bytes <= available && (heldBefore === 0 || heldBefore + bytes <= share);
        const real = budget.reserve(m.real, bytes, conn.waiter);
        if (real !== undefined) {
          assert.ok(
            heldBefore === 0 || heldBefore + bytes <= share,
            `step ${step}: granted above fair share: ${m.key} held ${heldBefore} + ${bytes} > share ${share} (${activeCount} active)`,
          );
          assert.ok(bytes <= available, `step ${step}: granted ${bytes} with only ${available} free`);
        }
        assert.equal(real !== undefined, expectGrant, `step ${step}: reserve(${m.key}, ${bytes}) granted=${real !== undefined}, model says ${expectGrant} (held ${heldBefore}, share ${share}, free ${available})`);
        m.lastActiveMs = clock.ms;
        if (real !== undefined) {
          assert.equal(real.bytes, bytes);
          m.waiters.delete(conn);
          available -= bytes;
          m.held += bytes;
          reservations.push({ account: m, real, bytes, released: false });
        } else {
          m.waiters.add(conn);
        }
        break;
      }
      case "reserveInvalid": {
        const live = conns.filter((c) => !c.left);
        const conn = live[op.conn % Math.max(1, live.length)];
        if (conn === undefined) break;
        const bytes = op.bytes === "over" ? capacity + 1 : op.bytes;
        assert.throws(() => budget.reserve(conn.account.real, bytes, conn.waiter), RangeError, `step ${step}: reserve(${bytes}) must throw`);
        break;
      }
      case "release": {
        const r = reservations[op.res % Math.max(1, reservations.length)];
        if (r === undefined) break;
        const first = !r.released;
        assert.equal(r.real.release(), first, `step ${step}: release() must return ${first}`);
        assert.equal(r.real.released, true);
        if (first) {
          r.released = true;
          r.account.held -= r.bytes;
          available += r.bytes;
          r.account.lastActiveMs = clock.ms;
          forgetIfDone(r.account);
          wakePending = true;
        }
        break;
      }
      case "leave": {
        const live = conns.filter((c) => !c.left);
        const conn = live[op.conn % Math.max(1, live.length)];
        if (conn === undefined) break;
        budget.leave(conn.account.real, conn.waiter);
        conn.left = true;
        conn.account.waiters.delete(conn);
        conn.account.users -= 1;
        forgetIfDone(conn.account);
        break;
      }
      case "advance":
        clock.ms += op.ms;
        break;
      case "settle": {
        const from = wakeLog.length;
        await settle();
        const expected: string[] = [];
        if (wakePending) {
          wakePending = false;
          const waiting = [...known.values()].filter((m) => m.waiters.size > 0);
          waiting.sort((x, y) => x.held - y.held); // stable: ties in the order the budget met the peers
          for (const m of waiting) {
            for (const c of m.waiters) expected.push(c.waiter.name);
            m.waiters.clear();
          }
        }
        assert.deepEqual(wakeLog.slice(from), expected, `step ${step}: wake order (least-holding account first, only registered waiters)`);
        expectedWakes += expected.length;
        break;
      }
    }
    check(step, op);
  }
}

const realBudget: BudgetFactory = (capacity, options) => new ByteBudget(capacity, options);

// Seeded by fast-check: on failure it prints the seed, the path and the shrunk
// sequence; add `seed` and `path` to the options below to replay it.
test("property: random join/reserve/release/leave/advance sequences agree with an independent model", async () => {
  const started = performance.now();
  await fc.assert(
    fc.asyncProperty(capacityArb, opsArb, (capacity, ops) => runAgainstModel(realBudget, capacity, ops)),
    { numRuns: 400 },
  );
  console.log(`400 sequences in ${Math.round(performance.now() - started)} ms`);
});

// ------------------------------------------------------------------ canaries

/** Broken on purpose: every release gives the bytes back twice. */
class DoubleReturnBudget extends ByteBudget {
  override returned(account: BudgetAccount, bytes: number): void {
    super.returned(account, bytes);
    super.returned(account, bytes);
  }
}

/** Broken on purpose: the fair share is always the whole capacity. */
class NoShareBudget extends ByteBudget {
  override shareBytes(): number {
    return this.capacityBytes;
  }
}

async function counterexample(make: BudgetFactory): Promise<string> {
  const details = await fc.check(
    fc.asyncProperty(capacityArb, opsArb, (capacity, ops) => runAgainstModel(make, capacity, ops)),
    { numRuns: 400, endOnFailure: true }, // finding one is the point: no shrinking
  );
  assert.equal(details.failed, true, "the property must catch the broken budget");
  return String(details.errorInstance);
}

test("canary: the property catches a budget that gives bytes back twice", async () => {
  const error = await counterexample((capacity, options) => new DoubleReturnBudget(capacity, options));
  assert.match(error, /inUseBytes/);
});

test("canary: the property catches a budget that skips the fair-share check", async () => {
  const error = await counterexample((capacity, options) => new NoShareBudget(capacity, options));
  assert.match(error, /granted above fair share/);
});
