// How a route that started a task answers (docs/api.md "Tasks"): with
// `Prefer: respond-async` (RFC 7240), 202 and the task at once; otherwise it
// waits up to TASK_WAIT_MS and, when the task is done, answers exactly what
// the synchronous API answered (same status and body, or the same error),
// plus `Ipsan-Task: ID`; still running, 202 with the task and
// `Location: /api/v1/tasks/ID`. Independent of the HTTP framework: it gets
// the Prefer header and returns status, body and headers.

import { statusOfTaskError, type TaskRunner } from "./runner.ts";
import { taskView, type TaskRecord } from "./types.ts";

/**
 * How long a route waits for its task before it answers 202. Long enough that
 * every operation but a wipe of a big volume answers as it did before tasks,
 * even on a loaded machine (an allocation under a burst of 50 took over 2 s on
 * 2 busy cores), and shorter than the station client's 10 s timeout
 * (STATION_REQUEST_TIMEOUT_MS) so a client from before tasks gets an answer.
 */
export const TASK_WAIT_MS = 5_000;
export const TASK_HEADER = "ipsan-task";

export interface TaskHttpAnswer {
  readonly status: number;
  readonly body?: unknown;
  readonly headers: Record<string, string>;
}

export function taskLocation(id: string): string {
  return `/api/v1/tasks/${id}`;
}

/** True when the Prefer header asks for respond-async. */
export function prefersAsync(prefer: string | readonly string[] | undefined): boolean {
  const values = prefer === undefined ? [] : typeof prefer === "string" ? [prefer] : prefer;
  return values.some((value) => value.split(",").some((part) => part.trim().split(/[;=\s]/)[0]?.toLowerCase() === "respond-async"));
}

/** The answer of a finished task, as the synchronous API gave it. */
export function finishedAnswer(task: TaskRecord): TaskHttpAnswer {
  const headers = { [TASK_HEADER]: task.id };
  if (task.state === "succeeded") return { status: task.resultStatus ?? 200, ...(task.result === null ? {} : { body: task.result }), headers };
  if (task.state === "failed" && task.error !== null) return { status: statusOfTaskError(task.error), body: { error: task.error }, headers };
  // Cancelled while the caller waited.
  return { status: 409, body: { error: { code: "CONFLICT", message: `task ${task.id} (${task.kind}) was ${task.message ?? "cancelled"}`, task: task.id } }, headers };
}

export async function answerTask(runner: TaskRunner, started: TaskRecord, prefer: string | readonly string[] | undefined, waitMs = TASK_WAIT_MS): Promise<TaskHttpAnswer> {
  const accepted = (task: TaskRecord, applied: boolean): TaskHttpAnswer => ({
    status: 202,
    body: taskView(task),
    headers: { [TASK_HEADER]: task.id, location: taskLocation(task.id), ...(applied ? { "preference-applied": "respond-async" } : {}) },
  });
  if (prefersAsync(prefer)) return accepted(runner.get(started.id) ?? started, true);
  const task = (await runner.wait(started.id, waitMs)) ?? started;
  if (task.finishedAtMs === null) return accepted(task, false);
  return finishedAnswer(task);
}
