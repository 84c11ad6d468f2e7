// ipsan tasks: the station's tasks over its API (docs/api.md "Tasks"):
//   tasks [--state S] [--kind K] [--json]   newest first
//   tasks show ID [--json]                  one task
//   tasks cancel ID [--json]                cancel it where its kind allows (the station says why not)
//   tasks wait ID [--json]                  follow it until it finishes (progress on a TTY); exit 1 unless it succeeded
// and the progress line that long admin commands (volume wipe, ...) show on a
// TTY while the CLI follows their task.

import type { StationTask } from "../host/station_client.ts";
import { UsageError } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { describeAmount } from "../util/progress.ts";
import { printItems } from "../util/output.ts";
import { COMMON_FLAGS, COMMON_USAGE, client, listItems, table } from "./main.ts";

const USAGE = `usage: ipsan tasks [--state queued|running|succeeded|failed|cancelled] [--kind KIND] [--json]
       ipsan tasks show ID [--json]
       ipsan tasks cancel ID [--json]
       ipsan tasks wait ID [--json]     follow it until it finishes (a wipe, a leg.replace, ...): progress on a
                                        terminal; prints the task; exit 0 if it succeeded, 1 if not
`;
const TASK_ID = /^t-[0-9a-f]{1,32}$/;
/** Tasks the listing shows (the station keeps up to 1,000 finished ones). */
const TASKS_LISTED_MAX = 1_000;

/** "42% (27M of 64M)", "3/5 steps", or "-" (the progress line says the same: src/util/progress.ts). */
export function progressCell(task: Pick<StationTask, "progress">): string {
  return describeAmount(task.progress) || "-";
}

const HEADERS = ["ID", "KIND", "TARGET", "STATE", "PROGRESS", "BY", "CREATED", "MESSAGE"];
function row(t: StationTask): string[] {
  const message = t.error?.message ?? t.message ?? "-";
  return [t.id, t.kind, `${t.target.type} ${t.target.id}`, t.state, progressCell(t), t.startedBy, t.createdAt, message];
}

function taskId(value: string | undefined): string {
  if (value === undefined) throw new UsageError(`missing task ID\n${USAGE.trimEnd()}`);
  if (!TASK_ID.test(value)) throw new UsageError(`ID: invalid task id "${value}" (t-HEX, as "ipsan tasks" lists them)`);
  return value;
}

function print(task: StationTask, json: boolean): void {
  process.stdout.write(json ? `${JSON.stringify(task, null, 2)}\n` : table(HEADERS, [row(task)]));
}

export async function tasksMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" }, state: { type: "string" }, kind: { type: "string" } }, true);
  if (values.help === true) {
    process.stdout.write(`${USAGE}${COMMON_USAGE}`);
    return 0;
  }
  const json = values.json === true;
  const [action, idArg, ...rest] = positionals;
  if (rest.length > 0) throw new UsageError(`unexpected argument "${rest[0]}"\n${USAGE.trimEnd()}`);
  switch (action) {
    case undefined: {
      const query = new URLSearchParams({ limit: String(TASKS_LISTED_MAX) });
      if (values.state !== undefined) query.set("state", values.state);
      if (values.kind !== undefined) query.set("kind", values.kind);
      const items = listItems<StationTask>(await (await client(values)).call("GET", `/api/v1/tasks?${query}`), "tasks");
      if (json) printItems(items);
      else process.stdout.write(table(HEADERS, items.map(row)));
      return 0;
    }
    case "show":
      print(await (await client(values)).task(taskId(idArg)), json);
      return 0;
    case "wait": {
      const task = await (await client(values)).followTask(taskId(idArg));
      print(task, json);
      return task.state === "succeeded" ? 0 : 1;
    }
    case "cancel": {
      const id = taskId(idArg);
      const task = (await (await client(values)).call("POST", `/api/v1/tasks/${id}/cancel`, {})) as StationTask;
      print(task, json);
      return 0;
    }
    default:
      throw new UsageError(`unknown action "${action}" (show, cancel, wait; none: list)\n${USAGE.trimEnd()}`);
  }
}
