// Tasks (docs/api.md "Tasks"): what a state-changing operation of the station
// looks like while it runs and after. One record per task, kept in SQLite
// (migration 10) and mirrored in memory; the view is what the API, the event
// stream and the console show.

export const TASK_STATES = ["queued", "running", "succeeded", "failed", "cancelled"] as const;
export type TaskState = (typeof TASK_STATES)[number];
export const FINISHED_TASK_STATES: ReadonlySet<TaskState> = new Set(["succeeded", "failed", "cancelled"]);

/** Allowed transitions: the one state machine of a task. */
export const TASK_TRANSITIONS: Readonly<Record<TaskState, readonly TaskState[]>> = {
  queued: ["running", "cancelled", "failed"],
  running: ["succeeded", "failed", "cancelled"],
  succeeded: [],
  failed: [],
  cancelled: [],
};

export const TASK_KINDS = [
  "volume.create",
  "volume.delete",
  "volume.grow",
  "volume.partition",
  "volume.wipe",
  "assignment.create",
  "assignment.delete",
  "allocation",
  "leg.replace",
] as const;
export type TaskKind = (typeof TASK_KINDS)[number];

export const TASK_TARGET_TYPES = ["volume", "unit", "host", "assignment"] as const;
export type TaskTargetType = (typeof TASK_TARGET_TYPES)[number];

export interface TaskTarget {
  readonly type: TaskTargetType;
  /** "u1/v1" for a volume, a unit's, host's or assignment's own name or id. */
  readonly id: string;
}

export interface TaskProgress {
  readonly done: number;
  readonly total: number;
  readonly unit: "bytes" | "steps";
}

/** The error of a failed task: the body the synchronous API answers ({code, message, field?, reasons?}). */
export interface TaskError {
  readonly code: string;
  readonly message: string;
  readonly field?: string;
  readonly reasons?: readonly unknown[];
}

export interface TaskRecord {
  /** Insertion order: listings are newest first. */
  readonly seq: number;
  readonly id: string;
  readonly kind: TaskKind;
  readonly state: TaskState;
  readonly target: TaskTarget;
  /** The lock keys it holds while unfinished ("volume:u1/v1", "assignment:ID"). */
  readonly objects: readonly string[];
  readonly progress: TaskProgress | null;
  readonly startedBy: string;
  readonly role: string;
  readonly cancellable: boolean;
  /** What the restart message needs (a request id, an assignment id). */
  readonly params: Readonly<Record<string, unknown>> | null;
  /** The HTTP status the synchronous API answers with `result` (e.g. 201, 204). */
  readonly resultStatus: number | null;
  readonly result: unknown;
  readonly error: TaskError | null;
  readonly message: string | null;
  readonly createdAtMs: number;
  readonly startedAtMs: number | null;
  readonly finishedAtMs: number | null;
}

function iso(ms: number | null): string | null {
  return ms === null ? null : new Date(ms).toISOString();
}

/** The task as the API answers it (contract: docs/api.md "Tasks"). */
export function taskView(task: TaskRecord) {
  return {
    id: task.id,
    kind: task.kind,
    state: task.state,
    target: task.target,
    objects: task.objects,
    progress: task.progress,
    startedBy: task.startedBy,
    role: task.role,
    createdAt: iso(task.createdAtMs),
    startedAt: iso(task.startedAtMs),
    finishedAt: iso(task.finishedAtMs),
    cancellable: task.cancellable && !FINISHED_TASK_STATES.has(task.state),
    resultStatus: task.resultStatus,
    result: task.result ?? null,
    error: task.error,
    message: task.message,
  };
}
export type TaskView = ReturnType<typeof taskView>;
