// The tasks table (migration 10): one row per task, written through the
// station store's `recordChange` so each change and its "task" event commit
// in one transaction (synchronous=FULL, except progress: NORMAL). Finished
// tasks beyond `historyMax` are pruned, oldest first, whenever one finishes.

import type { Db } from "../db.ts";
import { TASK_KINDS, TASK_STATES, type TaskKind, type TaskRecord, type TaskState, type TaskTargetType } from "./types.ts";

type Row = Record<string, unknown>;

function json<T>(text: unknown, fallback: T): T {
  if (typeof text !== "string") return fallback;
  try {
    return JSON.parse(text) as T;
  } catch {
    return fallback;
  }
}

function recordFromRow(row: Row): TaskRecord {
  const kind = row["kind"] as string;
  const state = row["state"] as string;
  return {
    seq: row["seq"] as number,
    id: row["id"] as string,
    kind: ((TASK_KINDS as readonly string[]).includes(kind) ? kind : "volume.create") as TaskKind,
    state: ((TASK_STATES as readonly string[]).includes(state) ? state : "failed") as TaskState,
    target: { type: row["target_type"] as TaskTargetType, id: row["target_id"] as string },
    objects: json<string[]>(row["objects"], []),
    progress: json(row["progress"], null),
    startedBy: row["started_by"] as string,
    role: row["role"] as string,
    cancellable: row["cancellable"] === 1,
    params: json(row["params"], null),
    resultStatus: (row["result_status"] as number | null) ?? null,
    result: json(row["result"], null),
    error: json(row["error"], null),
    message: (row["message"] as string | null) ?? null,
    createdAtMs: row["created_at"] as number,
    startedAtMs: (row["started_at"] as number | null) ?? null,
    finishedAtMs: (row["finished_at"] as number | null) ?? null,
  };
}

function rowOf(task: TaskRecord): Row {
  return {
    id: task.id,
    kind: task.kind,
    state: task.state,
    targetType: task.target.type,
    targetId: task.target.id,
    objects: JSON.stringify(task.objects),
    progress: task.progress === null ? null : JSON.stringify(task.progress),
    startedBy: task.startedBy,
    role: task.role,
    cancellable: task.cancellable ? 1 : 0,
    params: task.params === null ? null : JSON.stringify(task.params),
    resultStatus: task.resultStatus,
    result: task.result === null || task.result === undefined ? null : JSON.stringify(task.result),
    error: task.error === null ? null : JSON.stringify(task.error),
    message: task.message,
    createdAt: task.createdAtMs,
    startedAt: task.startedAtMs,
    finishedAt: task.finishedAtMs,
  };
}

export class TaskTable {
  private readonly statements;

  constructor(db: Db) {
    this.statements = {
      insert: db.prepare(`
        INSERT INTO tasks (id, kind, state, target_type, target_id, objects, progress, started_by, role, cancellable, params,
                           result_status, result, error, message, created_at, started_at, finished_at)
        VALUES (@id, @kind, @state, @targetType, @targetId, @objects, @progress, @startedBy, @role, @cancellable, @params,
                @resultStatus, @result, @error, @message, @createdAt, @startedAt, @finishedAt)`),
      update: db.prepare(`
        UPDATE tasks SET state = @state, objects = @objects, progress = @progress, cancellable = @cancellable, params = @params,
          result_status = @resultStatus, result = @result, error = @error, message = @message, started_at = @startedAt,
          finished_at = @finishedAt WHERE id = @id`),
      all: db.prepare("SELECT * FROM tasks ORDER BY seq"),
      prune: db.prepare(`
        DELETE FROM tasks WHERE seq IN (
          SELECT seq FROM tasks WHERE finished_at IS NOT NULL ORDER BY seq DESC LIMIT -1 OFFSET ?)`),
    };
  }

  /** Inserts a new task; returns its seq. */
  insert(task: TaskRecord): number {
    return Number(this.statements.insert.run(rowOf(task)).lastInsertRowid);
  }

  update(task: TaskRecord): void {
    this.statements.update.run(rowOf(task));
  }

  /** Deletes the oldest finished tasks beyond the newest `keep`; returns how many. */
  prune(keep: number): number {
    return this.statements.prune.run(keep).changes;
  }

  all(): TaskRecord[] {
    return (this.statements.all.all() as Row[]).map(recordFromRow);
  }
}
