// Proves the task runner on a real SQLite database (the station's own store,
// with an injected clock): finished tasks beyond the history bound are
// deleted oldest first, in memory and on disk; past TASKS_RUNNING_MAX tasks
// wait queued and a queued task is cancelled at once; past
// TASKS_UNFINISHED_MAX a new one is refused with UNAVAILABLE; object keys conflict
// with themselves and with the keys below them, and a refusal names the
// holder; progress events are written at most once per interval of the
// injected clock; a second runner on the same database (what a restart
// makes) finishes the tasks the first left unfinished as failed,
// "interrupted by a station restart", with what reconcile does for their
// kind, and an interrupted allocation's message later says whether reconcile
// finished or undid its pending assignment; a task whose kind cannot be cancelled refuses cancel, saying why,
// and runs to its end.

import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { makeTempDir, memoryTmpBase } from "../../testing/tmp.ts";
import { IpsanError } from "../../util/errors.ts";
import type { Principal } from "../auth/tokens.ts";
import { openDatabase } from "../db.ts";
import { StationStore } from "../store.ts";
import type { StationEvent } from "../types.ts";
import { INTERRUPTED_MESSAGE, TaskConflictError, TaskRunner, keysConflict, type TaskSpec } from "./runner.ts";
import { StationTasks, interruptedDetail } from "./operations.ts";
import { StationMetrics } from "../metrics.ts";
import { DEFAULT_STATION_OPTIONS, Station } from "../station.ts";

const ADMIN: Principal = { name: "admin", role: "admin", host: null };
const OPERATOR: Principal = { name: "op1", role: "operator", host: null };

function openStore(path: string, clock: { nowMs(): number }): StationStore {
  return new StationStore(openDatabase(path), clock);
}

function spec(objects: string[], run: TaskSpec["run"] = async () => ({ status: 200, body: { ok: true } }), notCancellable: string | null = null): TaskSpec {
  return { kind: "volume.wipe", target: { type: "volume", id: "u1/v1" }, objects, notCancellable, run };
}

/** A work function that waits until released (or cancelled, when it honours the signal). */
function gate(): { run: TaskSpec["run"]; release(): void } {
  let release = (): void => undefined;
  const released = new Promise<void>((resolve) => (release = resolve));
  return {
    release: () => release(),
    run: async (ctx) => {
      await Promise.race([
        released,
        new Promise<never>((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason as Error), { once: true })),
      ]);
      return { status: 204 };
    },
  };
}

test("object keys conflict with themselves and what they contain", () => {
  const cases: [string, string, boolean][] = [
    ["volume:u1/v1", "volume:u1/v1", true],
    ["volume:u1/v1", "volume:u1/v1/p1", true],
    ["volume:u1/v1/p1", "volume:u1/v1", true],
    ["volume:u1/v1/p1", "volume:u1/v1/p2", false],
    ["volume:u1/v1", "volume:u1/v10", false],
    ["volume:u1/v1", "assignment:u1/v1", false],
  ];
  for (const [a, b, expected] of cases) assert.equal(keysConflict(a, b), expected, `${a} vs ${b}`);
});

test("history bound, queue, cancel of a queued task, conflicts, progress throttle", async () => {
  const dir = makeTempDir("tasks-runner", memoryTmpBase());
  try {
    let nowMs = 1_000_000;
    const store = openStore(join(dir.path, "station.db"), { nowMs: () => nowMs });
    const events: StationEvent[] = [];
    store.subscribe((event) => events.push(event));
    const runner = new TaskRunner(store, { historyMax: 3, runningMax: 1, unfinishedMax: 3, progressIntervalMs: 1_000 });

    // History: 5 tasks finish, the 3 newest are kept.
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const task = runner.start(spec([`volume:u1/h${i}`]), ADMIN);
      ids.push(task.id);
      assert.equal((await runner.wait(task.id, 5_000))?.state, "succeeded");
    }
    assert.deepEqual(runner.list().map((t) => t.id), ids.slice(2).reverse(), "newest first, oldest pruned");
    const rows = store.database.prepare("SELECT id FROM tasks ORDER BY seq").all() as { id: string }[];
    assert.deepEqual(rows.map((r) => r.id), ids.slice(2));

    // One runs; the next waits queued; a conflicting one is refused naming the holder.
    const holding = gate();
    const running = runner.start(spec(["volume:u1/v1"], holding.run), OPERATOR);
    assert.equal(runner.get(running.id)?.state, "running");
    const queued = runner.start(spec(["volume:u1/v2"]), ADMIN);
    assert.equal(runner.get(queued.id)?.state, "queued");
    // Past unfinishedMax (3 here): refused with 503 UNAVAILABLE, nothing recorded.
    const third = runner.start(spec(["volume:u1/v5"]), ADMIN);
    const before = runner.list().length;
    assert.throws(() => runner.start(spec(["volume:u1/v6"]), ADMIN), (error: unknown) => error instanceof IpsanError && error.code === "UNAVAILABLE" && /too many unfinished tasks/.test(error.message));
    assert.equal(runner.list().length, before);
    runner.cancel(third.id, ADMIN);
    assert.throws(
      () => runner.start(spec(["volume:u1/v1/p1"]), ADMIN),
      (error: unknown) =>
        error instanceof TaskConflictError &&
        error.task === running.id &&
        error.message === `volume u1/v1 is busy: task ${running.id} (volume.wipe, started by op1) holds it`,
    );
    // Progress: many updates within one interval write one event; the next interval another.
    const progressOf = (): number => events.filter((e) => e.action === "progress" && e.subject === running.id).length;
    holding.release();
    assert.equal((await runner.wait(running.id, 5_000))?.state, "succeeded");
    assert.equal(progressOf(), 0);
    assert.equal((await runner.wait(queued.id, 5_000))?.state, "succeeded");

    const reporting = gate();
    const reporter = runner.start(
      spec(["volume:u1/v3"], async (ctx) => {
        for (let i = 1; i <= 10; i++) {
          ctx.progress(i, 10, "steps");
          nowMs += 100;
        }
        ctx.progress(10, 10, "steps");
        return reporting.run(ctx);
      }),
      ADMIN,
    );
    const blockedQueue = runner.start(spec(["volume:u1/v4"]), ADMIN);
    assert.equal(runner.get(blockedQueue.id)?.state, "queued");
    const cancelled = runner.cancel(blockedQueue.id, OPERATOR);
    assert.equal(cancelled.state, "cancelled");
    assert.equal(cancelled.message, "cancelled by op1 before it started");
    assert.throws(() => runner.cancel(blockedQueue.id, ADMIN), /already finished: cancelled/);
    const reportEvents = events.filter((e) => e.action === "progress" && e.subject === reporter.id);
    assert.equal(reportEvents.length, 2, "10 updates over 1 s of clock: at most one event per second");
    assert.deepEqual(runner.get(reporter.id)?.progress, { done: 10, total: 10, unit: "steps" }, "memory has the latest");
    runner.cancel(reporter.id, ADMIN);
    const ended = await runner.wait(reporter.id, 5_000);
    assert.equal(ended?.state, "cancelled");
    assert.equal(ended?.message, "cancelled by admin after 10 of 10 steps");
    assert.deepEqual(
      events.filter((e) => e.subject === reporter.id && e.action !== "progress").map((e) => e.action),
      ["queued", "running", "cancelled"],
    );
    store.close();
  } finally {
    dir.remove();
  }
});

test("a task whose kind cannot be cancelled refuses, and its work runs to the end", async () => {
  const dir = makeTempDir("tasks-runner", memoryTmpBase());
  try {
    const store = openStore(join(dir.path, "station.db"), { nowMs: () => Date.now() });
    const runner = new TaskRunner(store);
    const holding = gate();
    const task = runner.start(spec(["volume:u1/v1"], holding.run, "it is one call to the unit"), ADMIN);
    assert.throws(() => runner.cancel(task.id, ADMIN), /cannot be cancelled: it is one call to the unit/);
    holding.release();
    assert.equal((await runner.wait(task.id, 5_000))?.state, "succeeded");
    store.close();
  } finally {
    dir.remove();
  }
});

test("a restart finishes the tasks it interrupted as failed, saying what reconcile does", async () => {
  const dir = makeTempDir("tasks-runner", memoryTmpBase());
  try {
    const path = join(dir.path, "station.db");
    const store = openStore(path, { nowMs: () => Date.now() });
    const first = new TaskRunner(store);
    const never = gate();
    const wipe = first.start(
      spec(["volume:u1/v1"], async (ctx) => {
        ctx.progress(4096, 8192, "bytes");
        return never.run(ctx);
      }),
      ADMIN,
    );
    const allocation = first.start({ kind: "allocation", target: { type: "host", id: "h1" }, objects: [], notCancellable: "x", params: { requestId: "r9" }, run: never.run }, ADMIN);
    // Progress is written at most once a second: the first update is on disk.
    const restarted = new StationStore(store.database, { nowMs: () => Date.now() });
    const second = new TaskRunner(restarted, { interrupted: (task) => interruptedDetail(restarted, task) });
    const wiped = second.get(wipe.id);
    assert.equal(wiped?.state, "failed");
    assert.equal(wiped?.message, `${INTERRUPTED_MESSAGE}: volume u1/v1 is partly zeroed (at least 4096 of 8192 bytes were zeroed); start the wipe again to finish it`);
    assert.deepEqual(wiped?.error, { code: "UNAVAILABLE", message: wiped?.message });
    const allocated = second.get(allocation.id);
    assert.equal(allocated?.state, "failed");
    assert.equal(allocated?.message, `${INTERRUPTED_MESSAGE}: no assignment was recorded for request r9 (or it was undone): ask again`);
    // The new runner holds nothing: the volume is free for a new task.
    assert.equal(second.holderOf("volume:u1/v1"), undefined);
    store.close();
  } finally {
    dir.remove();
  }
});

test("an interrupted allocation says what reconcile did with its pending assignment", async () => {
  const dir = makeTempDir("tasks-runner", memoryTmpBase());
  try {
    const clock = { nowMs: () => Date.now() };
    const store = openStore(join(dir.path, "station.db"), clock);
    const first = new TaskRunner(store);
    const never = gate();
    const task = first.start({ kind: "allocation", target: { type: "host", id: "h1" }, objects: [], notCancellable: "x", params: { requestId: "r1" }, run: never.run }, ADMIN);
    const nowMs = clock.nowMs();
    store.insertAssignment(
      { id: "a-1", requestId: "r1", host: "h1", hostAddress: "127.0.0.2", unit: "u1", volume: "v1", partition: null, sizeBytes: 1 << 20, state: "pending", carved: false, wipe: false, copies: 1, legs: [], error: null, detail: null, createdAtMs: nowMs, updatedAtMs: nowMs },
      { requestId: "r1", params: "{}" },
      { name: "h1", address: "127.0.0.2" },
    );
    // What a restart makes: a store and a station core on the same database, then their tasks.
    const restarted = new StationStore(store.database, clock);
    const station = new Station(restarted, new StationMetrics(), { clusterKey: Buffer.alloc(32, 1), ...DEFAULT_STATION_OPTIONS });
    const tasks = new StationTasks(station);
    assert.equal(tasks.runner.get(task.id)?.message, `${INTERRUPTED_MESSAGE}: reconcile finishes or undoes pending assignment a-1`);
    const events: StationEvent[] = [];
    restarted.subscribe((event) => events.push(event));
    restarted.updateAssignment("a-1", "failed", { error: "unit u1 is gone" });
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(tasks.runner.get(task.id)?.message, `${INTERRUPTED_MESSAGE}: reconcile undid assignment a-1 (failed: unit u1 is gone)`);
    assert.deepEqual(events.map((e) => `${e.type} ${e.action}`), ["assignment failed", "task failed"]);
    // The new message is on disk.
    const reread = new TaskRunner(new StationStore(store.database, clock));
    assert.equal(reread.get(task.id)?.message, `${INTERRUPTED_MESSAGE}: reconcile undid assignment a-1 (failed: unit u1 is gone)`);
    store.close();
  } finally {
    dir.remove();
  }
});
