// Tasks (docs/api.md "Tasks"; src/station/tasks): list, read, cancel.

import { Type } from "@sinclair/typebox";
import { IpsanError } from "../../util/errors.ts";
import { TASK_KINDS, TASK_STATES, taskView, type TaskKind, type TaskState } from "../tasks/types.ts";
import { invalid, show } from "../validate.ts";
import { page, paged, type Api } from "./route.ts";
import { Enum, Errors, NoBody, NoQuery, Page, PageQuery, Params, Ref, Task } from "./schemas.ts";

const TaskQuery = Type.Object(
  { state: Type.Optional(Enum(TASK_STATES, { description: "only tasks in this state" })), kind: Type.Optional(Enum(TASK_KINDS, { description: "only tasks of this kind" })), ...PageQuery },
  { additionalProperties: false },
);

function checkTaskId(value: string | undefined): string {
  if (value === undefined || !/^t-[0-9a-f]{1,32}$/.test(value)) throw invalid("id", `invalid task id ${show(value)} (expected t-HEX)`);
  return value;
}

export function taskRoutes(api: Api): void {
  const runner = api.tasks.runner;
  api.add({
    method: "GET",
    url: "/api/v1/tasks",
    schema: { summary: "Tasks, newest first (unfinished ones and the last 1,000 finished)", querystring: TaskQuery, response: { 200: Page(Task), ...Errors() } },
    handler: ({ query }) => {
      const state = query.get("state") as TaskState | null;
      const kind = query.get("kind") as TaskKind | null;
      const all = runner.list({ ...(state === null ? {} : { state }), ...(kind === null ? {} : { kind }) });
      return { status: 200, body: paged(all, page(query), taskView) };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/tasks/:id",
    schema: { summary: "One task", params: Params("id"), querystring: NoQuery, response: { 200: Ref(Task), ...Errors({ 404: "no such task" }) } },
    handler: ({ params }) => {
      const task = runner.get(checkTaskId(params[0]));
      if (task === undefined) throw new IpsanError("NOT_FOUND", `task ${show(params[0])} not found`, { field: "id" });
      return { status: 200, body: taskView(task) };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/tasks/:id/cancel",
    body: true,
    schema: {
      summary: "Cancel a task where that is safe (docs/api.md \"Tasks\": per kind); answers the task after waiting up to TASK_WAIT_MS for it to stop",
      params: Params("id"),
      body: NoBody,
      response: {
        200: Ref(Task, "the task (cancelled, or still stopping)"),
        ...Errors({ 404: "no such task", 409: "finished already, or its kind cannot be cancelled (the message says why)" }),
      },
    },
    handler: async ({ params, principal }) => {
      const id = checkTaskId(params[0]);
      runner.cancel(id, principal);
      // A running task stops at its next safe point: wait for it a little, then answer what it is.
      const task = await runner.wait(id, api.taskWaitMs);
      return { status: 200, body: task === undefined ? null : taskView(task) };
    },
  });
}
