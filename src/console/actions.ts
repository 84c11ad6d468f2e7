// Runs a state-changing request the way the console always does: with
// `Prefer: respond-async`, so a station with tasks answers 202 and the task at
// once (the Tasks page and the event stream follow it); an older station's
// synchronous answer is taken as done.

import { call, describeError } from "./api.ts";
import type { Model } from "./model.ts";
import type { Task } from "./types.ts";

export interface ActionOutcome {
  readonly kind: "ok" | "error";
  readonly text: string;
  readonly task: Task | null;
}

function isTask(body: unknown): body is Task {
  const b = body as Partial<Task> | null;
  return b !== null && typeof b === "object" && typeof b.id === "string" && b.id.startsWith("t-") && typeof b.kind === "string" && typeof b.state === "string";
}

export async function runAction(model: Model, what: string, method: string, path: string, body?: unknown): Promise<ActionOutcome> {
  try {
    const answer = await call(method, path, { async: true, ...(body === undefined ? {} : { body }) });
    if (answer.status === 202 && isTask(answer.body)) {
      model.noteTask(answer.body);
      return { kind: "ok", text: `${what}: task ${answer.body.id} (${answer.body.kind}) ${answer.body.state}`, task: answer.body };
    }
    const taskId = answer.headers.get("ipsan-task");
    return { kind: "ok", text: `${what}: done (${answer.status}${taskId === null ? "" : `, task ${taskId}`})`, task: null };
  } catch (error) {
    return { kind: "error", text: `${what} refused: ${describeError(error)}`, task: null };
  }
}

/** A request id for POST /api/v1/allocations (idempotency key; a retry of the same form reuses it). */
export function newRequestId(): string {
  const bytes = new Uint8Array(6);
  crypto.getRandomValues(bytes);
  return `console-${Date.now().toString(36)}-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}
