// The task runner (docs/api.md "Tasks"): every state-changing operation of
// the station runs as a task with a state (queued -> running -> succeeded |
// failed | cancelled), progress, its starter, and its result or error.
//
// - Conflicts: a task names the objects it works on (lock keys, the same
//   names as Station.locks: "volume:u1/v1", "assignment:ID"); a task whose
//   object is held by an unfinished task is refused at once (409 CONFLICT
//   naming the holder, its kind and its starter). A key also covers the keys
//   below it: "volume:u1/v1" conflicts with "volume:u1/v1/p1", while
//   "volume:u1/v1/p1" and "volume:u1/v1/p2" do not conflict.
// - Many tasks run at once (up to TASKS_RUNNING_MAX; more wait queued).
// - Cancel: an AbortSignal handed to the work function, which honours it
//   where that is safe (documented per kind); a queued task is cancelled at
//   once.
// - Every change is a row in SQLite (migration 10) and a "task" event, in one
//   transaction; progress at most once per TASK_PROGRESS_INTERVAL_MS per
//   task. Finished tasks beyond TASKS_HISTORY_MAX are pruned, oldest first.
// - At start, tasks a restart interrupted (queued or running) are finished as
//   failed, with a message saying what reconcile does for their kind.

import { randomBytes } from "node:crypto";
import { assert } from "../../util/assert.ts";
import { ERROR_CODES, IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import type { StationStore } from "../store.ts";
import { TaskTable } from "./table.ts";
import {
  FINISHED_TASK_STATES,
  TASK_STATES,
  TASK_TRANSITIONS,
  taskView,
  type TaskError,
  type TaskKind,
  type TaskProgress,
  type TaskRecord,
  type TaskState,
  type TaskTarget,
} from "./types.ts";

const log = logger("tasks");

/** Finished tasks kept (newest first); older ones are deleted when another finishes. */
export const TASKS_HISTORY_MAX = 1_000;
/** Tasks running at once; more wait queued, first come first run. */
export const TASKS_RUNNING_MAX = 32;
/** Unfinished tasks at once (running and queued): past it a new task is refused with 503. */
export const TASKS_UNFINISHED_MAX = 1_024;
/** A task's progress is written and published at most this often. */
export const TASK_PROGRESS_INTERVAL_MS = 1_000;
/** The message of a task that a station restart interrupted starts with this. */
export const INTERRUPTED_MESSAGE = "interrupted by a station restart";

/** What a finished operation answers: the status and body the synchronous API gives. */
export interface TaskAnswer {
  readonly status: number;
  readonly body?: unknown;
}

export interface TaskContext {
  /** Aborted when the task is cancelled (a work function honours it only where that is safe). */
  readonly signal: AbortSignal;
  progress(done: number, total: number, unit: TaskProgress["unit"]): void;
  /** A human one-liner kept with the task (e.g. how far a cancelled wipe got). */
  note(message: string): void;
}

export interface TaskSpec {
  readonly kind: TaskKind;
  readonly target: TaskTarget;
  readonly objects: readonly string[];
  /** null: cancellable; else why not (the 409's message says it). */
  readonly notCancellable: string | null;
  readonly params?: Readonly<Record<string, unknown>>;
  run(ctx: TaskContext): Promise<TaskAnswer>;
}

export interface TaskRunnerOptions {
  readonly historyMax?: number;
  readonly runningMax?: number;
  /** TASKS_UNFINISHED_MAX unless given (tests). */
  readonly unfinishedMax?: number;
  readonly progressIntervalMs?: number;
  /** For a task a restart interrupted: what reconcile does for it (appended to INTERRUPTED_MESSAGE). */
  readonly interrupted?: (task: TaskRecord) => string;
}

interface Live {
  record: TaskRecord;
  readonly spec: TaskSpec | null;
  readonly controller: AbortController;
  readonly waiters: Set<() => void>;
  lastProgressWriteMs: number;
  cancelledBy: string | null;
}

/** Who starts or cancels a task: a token (src/station/auth Principal), or the station itself ({name: "station", role: "station"}). */
export interface TaskActor {
  readonly name: string;
  readonly role: string;
}

/** True when key `a` and key `b` name the same object or one contains the other ("volume:u/v" and "volume:u/v/p1"). */
export function keysConflict(a: string, b: string): boolean {
  return a === b || a.startsWith(`${b}/`) || b.startsWith(`${a}/`);
}

export function newTaskId(): string {
  return `t-${randomBytes(6).toString("hex")}`;
}

/** The error body of a failed task, from what its work threw. */
export function taskErrorOf(error: unknown): TaskError {
  if (error instanceof IpsanError) {
    const reasons = (error as { reasons?: unknown }).reasons;
    return {
      code: error.code,
      message: error.message,
      ...(error.field === undefined ? {} : { field: error.field }),
      ...(Array.isArray(reasons) ? { reasons } : {}),
    };
  }
  return { code: "IO_ERROR", message: `internal error: ${errorMessage(error)}` };
}

/** The HTTP status of a task's error body. */
export function statusOfTaskError(error: TaskError): number {
  return Object.hasOwn(ERROR_CODES, error.code) ? ERROR_CODES[error.code as keyof typeof ERROR_CODES][1] : 500;
}

export class TaskRunner {
  private readonly store: StationStore;
  private readonly table: TaskTable;
  private readonly historyMax: number;
  private readonly runningMax: number;
  private readonly unfinishedMax: number;
  private readonly progressIntervalMs: number;
  /** Every task kept, by id (finished ones up to historyMax). */
  private readonly tasks = new Map<string, TaskRecord>();
  /** Unfinished tasks of this process. */
  private readonly live = new Map<string, Live>();
  private readonly queue: string[] = [];
  private running = 0;

  constructor(store: StationStore, options: TaskRunnerOptions = {}) {
    this.store = store;
    this.table = new TaskTable(store.database);
    this.historyMax = options.historyMax ?? TASKS_HISTORY_MAX;
    this.runningMax = options.runningMax ?? TASKS_RUNNING_MAX;
    this.unfinishedMax = options.unfinishedMax ?? TASKS_UNFINISHED_MAX;
    this.progressIntervalMs = options.progressIntervalMs ?? TASK_PROGRESS_INTERVAL_MS;
    assert(this.historyMax >= 1 && this.runningMax >= 1 && this.unfinishedMax >= this.runningMax, "task limits must be positive, and unfinishedMax >= runningMax");
    for (const task of this.table.all()) this.tasks.set(task.id, task);
    this.finishInterrupted(options.interrupted ?? (() => ""));
  }

  /** Tasks found queued or running in the database: a restart interrupted them. */
  private finishInterrupted(describe: (task: TaskRecord) => string): void {
    for (const task of [...this.tasks.values()]) {
      if (FINISHED_TASK_STATES.has(task.state)) continue;
      const detail = describe(task);
      const message = detail === "" ? INTERRUPTED_MESSAGE : `${INTERRUPTED_MESSAGE}: ${detail}`;
      const finished: TaskRecord = {
        ...task,
        state: "failed",
        error: { code: "UNAVAILABLE", message },
        message,
        finishedAtMs: this.store.clock.nowMs(),
      };
      this.write(finished, "failed", false);
      log.info("task interrupted by a restart", { id: task.id, kind: task.kind, message });
    }
    this.prune();
  }

  // ---- reading ------------------------------------------------------------------

  get(id: string): TaskRecord | undefined {
    return this.tasks.get(id);
  }

  /** Newest first, optionally of one state and/or kind. */
  list(filter: { state?: TaskState; kind?: TaskKind } = {}): TaskRecord[] {
    const out: TaskRecord[] = [];
    for (const task of this.tasks.values()) {
      if (filter.state !== undefined && task.state !== filter.state) continue;
      if (filter.kind !== undefined && task.kind !== filter.kind) continue;
      out.push(task);
    }
    return out.sort((a, b) => b.seq - a.seq);
  }

  /** How many tasks are kept in each state (every state listed). */
  countByState(): [TaskState, number][] {
    const counts = new Map<TaskState, number>(TASK_STATES.map((state) => [state, 0]));
    for (const task of this.tasks.values()) counts.set(task.state, (counts.get(task.state) ?? 0) + 1);
    return [...counts];
  }

  get unfinishedCount(): number {
    return this.live.size;
  }

  /** The unfinished task holding an object that conflicts with `key`, if any. */
  holderOf(key: string): TaskRecord | undefined {
    for (const live of this.live.values()) {
      if (live.record.objects.some((held) => keysConflict(held, key))) return live.record;
    }
    return undefined;
  }

  /**
   * Resolves with the task once it is finished, or with its current record
   * after `timeoutMs` (whichever comes first).
   */
  wait(id: string, timeoutMs: number): Promise<TaskRecord | undefined> {
    const live = this.live.get(id);
    if (live === undefined) return Promise.resolve(this.tasks.get(id));
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        live.waiters.delete(done);
        resolve(this.tasks.get(id));
      };
      const timer = setTimeout(done, timeoutMs);
      live.waiters.add(done);
    });
  }

  // ---- starting -----------------------------------------------------------------

  /**
   * Records a task and starts it (or queues it past TASKS_RUNNING_MAX).
   * Refuses at once (409 CONFLICT) when an unfinished task holds one of its
   * objects, naming that task, its kind and its starter.
   */
  start(spec: TaskSpec, principal: TaskActor): TaskRecord {
    for (const key of spec.objects) {
      const holder = this.holderOf(key);
      if (holder !== undefined) {
        const held = holder.objects.find((k) => keysConflict(k, key)) ?? key;
        throw new TaskConflictError(
          `${describeKey(held)} is busy: task ${holder.id} (${holder.kind}, started by ${holder.startedBy}) holds it`,
          holder.id,
        );
      }
    }
    if (this.live.size >= this.unfinishedMax) {
      throw new IpsanError("UNAVAILABLE", `too many unfinished tasks (TASKS_UNFINISHED_MAX=${this.unfinishedMax}); try again when some have finished`);
    }
    const nowMs = this.store.clock.nowMs();
    const record: TaskRecord = {
      seq: 0,
      id: newTaskId(),
      kind: spec.kind,
      state: "queued",
      target: spec.target,
      objects: [...spec.objects],
      progress: null,
      startedBy: principal.name,
      role: principal.role,
      cancellable: spec.notCancellable === null,
      params: spec.params ?? null,
      resultStatus: null,
      result: null,
      error: null,
      message: null,
      createdAtMs: nowMs,
      startedAtMs: null,
      finishedAtMs: null,
    };
    // With a free slot and nobody waiting, it is recorded queued and running in one transaction (one fsync).
    const runNow = this.running < this.runningMax && this.queue.length === 0;
    const written: TaskRecord = runNow ? { ...record, state: "running", startedAtMs: nowMs } : record;
    const events = [{ type: "task" as const, action: "queued", subject: record.id, data: taskView(record) }];
    if (runNow) events.push({ type: "task", action: "running", subject: record.id, data: taskView(written) });
    let seq = 0;
    this.store.recordChanges(events, () => {
      seq = this.table.insert(written);
    });
    const inserted = { ...written, seq };
    this.tasks.set(inserted.id, inserted);
    const live: Live = { record: inserted, spec, controller: new AbortController(), waiters: new Set(), lastProgressWriteMs: 0, cancelledBy: null };
    this.live.set(inserted.id, live);
    if (runNow) {
      this.running += 1;
      void this.execute(live);
    } else {
      this.queue.push(inserted.id);
      this.pump();
    }
    return this.tasks.get(inserted.id) ?? inserted;
  }

  private pump(): void {
    while (this.running < this.runningMax && this.queue.length > 0) {
      const id = this.queue.shift() as string;
      const live = this.live.get(id);
      if (live === undefined || live.record.state !== "queued") continue;
      this.running += 1;
      void this.execute(live);
    }
  }

  private async execute(live: Live): Promise<void> {
    const spec = live.spec;
    assert(spec !== null, "a live task has its spec");
    if (live.record.state === "queued") this.transition(live, "running", { startedAtMs: this.store.clock.nowMs() });
    const ctx: TaskContext = {
      signal: live.controller.signal,
      progress: (done, total, unit) => this.progress(live, { done, total, unit }),
      note: (message) => {
        live.record = { ...live.record, message };
        this.tasks.set(live.record.id, live.record);
      },
    };
    try {
      const answer = await spec.run(ctx);
      this.transition(live, "succeeded", { resultStatus: answer.status, result: answer.body ?? null });
    } catch (error) {
      if (live.controller.signal.aborted) {
        const progress = live.record.progress;
        const how = progress === null ? "" : ` after ${progress.done} of ${progress.total} ${progress.unit}`;
        const note = live.record.message === null ? "" : `: ${live.record.message}`;
        this.transition(live, "cancelled", { message: `cancelled by ${live.cancelledBy ?? "?"}${how}${note}` });
        return;
      }
      if (!(error instanceof IpsanError)) log.error("task failed unexpectedly", { id: live.record.id, kind: live.record.kind, error: errorMessage(error), stack: (error as Error).stack?.split("\n")[1]?.trim() });
      this.transition(live, "failed", { error: taskErrorOf(error) });
    }
  }

  private progress(live: Live, progress: TaskProgress): void {
    if (FINISHED_TASK_STATES.has(live.record.state)) return;
    live.record = { ...live.record, progress };
    this.tasks.set(live.record.id, live.record);
    const nowMs = this.store.clock.nowMs();
    if (nowMs - live.lastProgressWriteMs < this.progressIntervalMs) return;
    live.lastProgressWriteMs = nowMs;
    this.write(live.record, "progress", false);
  }

  private transition(live: Live, to: TaskState, changes: Partial<TaskRecord>): void {
    const from = live.record.state;
    assert(TASK_TRANSITIONS[from].includes(to), `task ${live.record.id}: ${from} -> ${to} is not a transition`);
    const finished = FINISHED_TASK_STATES.has(to);
    live.record = { ...live.record, ...changes, state: to, ...(finished ? { finishedAtMs: this.store.clock.nowMs() } : {}) };
    this.write(live.record, to, true);
    if (!finished) return;
    this.live.delete(live.record.id);
    if (from === "running") this.running -= 1;
    this.prune();
    for (const waiter of [...live.waiters]) waiter();
    this.pump();
  }

  /** Writes the task's row and publishes the event, in one transaction. */
  private write(task: TaskRecord, action: string, durable: boolean): void {
    this.store.recordChange("task", action, task.id, taskView(task), () => this.table.update(task), durable);
    this.tasks.set(task.id, task);
  }

  private prune(): void {
    let finished = 0;
    for (const task of this.tasks.values()) if (FINISHED_TASK_STATES.has(task.state)) finished++;
    if (finished <= this.historyMax) return;
    this.table.prune(this.historyMax);
    // Oldest finished first (insertion order is seq order).
    const excess = finished - this.historyMax;
    let removed = 0;
    for (const task of [...this.tasks.values()].sort((a, b) => a.seq - b.seq)) {
      if (removed >= excess) break;
      if (!FINISHED_TASK_STATES.has(task.state)) continue;
      this.tasks.delete(task.id);
      removed++;
    }
  }

  /** Replaces the message of a finished task (what reconcile later did for one a restart interrupted); published like a change. */
  amendMessage(id: string, message: string): TaskRecord | undefined {
    const task = this.tasks.get(id);
    if (task === undefined || !FINISHED_TASK_STATES.has(task.state)) return task;
    const amended = { ...task, message };
    this.write(amended, amended.state, true);
    return amended;
  }

  // ---- cancelling ---------------------------------------------------------------

  /**
   * Asks a task to stop: a queued one is cancelled at once, a running one is
   * signalled (its work stops where it is safe). Refused (409) when the task is
   * finished or its kind cannot be cancelled, saying why.
   */
  cancel(id: string, principal: TaskActor): TaskRecord {
    const task = this.tasks.get(id);
    if (task === undefined) throw new IpsanError("NOT_FOUND", `task ${JSON.stringify(id)} not found`, { field: "id" });
    const live = this.live.get(id);
    if (live === undefined || FINISHED_TASK_STATES.has(task.state)) {
      throw new IpsanError("CONFLICT", `task ${id} (${task.kind}) already finished: ${task.state}`, { field: "id" });
    }
    const why = live.spec?.notCancellable ?? null;
    if (why !== null) {
      throw new IpsanError("CONFLICT", `task ${id} (${task.kind}) cannot be cancelled: ${why}`, { field: "id" });
    }
    live.cancelledBy ??= principal.name;
    if (task.state === "queued") {
      this.transition(live, "cancelled", { message: `cancelled by ${principal.name} before it started` });
    } else {
      live.controller.abort(new IpsanError("CONFLICT", `task ${id} cancelled by ${principal.name}`));
      log.info("task cancel requested", { id, kind: task.kind, by: principal.name });
    }
    return this.tasks.get(id) ?? task;
  }
}

/** 409 CONFLICT naming the task that holds an object (`task` is its id, also in the error body). */
export class TaskConflictError extends IpsanError {
  readonly task: string;
  constructor(message: string, task: string) {
    super("CONFLICT", message);
    this.name = "TaskConflictError";
    this.task = task;
  }
}

/** "volume:u1/v1" -> "volume u1/v1". */
function describeKey(key: string): string {
  const colon = key.indexOf(":");
  return colon < 0 ? key : `${key.slice(0, colon)} ${key.slice(colon + 1)}`;
}
