// Proves the station's tasks (docs/api.md "Tasks") against a real
// `bin/ipsan station` process and a real joined `ipsan unit` on loopback:
// - every kind (volume create/grow/partition/wipe/delete, manual assign,
//   unassign, allocation) answers exactly what the synchronous API answered
//   (status and body) plus an Ipsan-Task header, and is listed as a
//   succeeded task with its starter, result and "task" events;
// - `Prefer: respond-async` answers 202 + Location + the task at once; a
//   long task answers 202 after TASK_WAIT_MS without it;
// - two long wipes run at once with progress; a task on a volume a wipe
//   holds is refused at once with 409 naming the holder, its kind and its
//   starter; a viewer may read tasks and may not cancel; a cancelled wipe
//   ends cancelled and its progress stops; finished or uncancellable tasks
//   refuse cancel with 409 saying why; a host credential reads only the
//   tasks it started;
// - the CLI: `ipsan volume wipe` asks for its task (202) and follows it
//   until it finishes; `ipsan tasks`, `tasks show`, `tasks cancel`;
// - a station killed with kill -9 in the middle of a long wipe and started
//   again finishes the task as failed, "interrupted by a station restart",
//   and frees the volume for the next task.
// Long wipes are big sparse volumes wiped in 4 MiB chunks
// (IPSAN_WIPE_CHUNK_BYTES), each a real call to the unit's control API.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { run, waitFor } from "../testing/process.ts";
import { IPSAN_BIN, type RunningUnit } from "../testing/unit.ts";
import { errorOf, startStation, type ApiResponse, type RunningStation } from "./harness.ts";
import { recordedEvents, startJoinedUnit } from "./pool_harness.ts";

const MIB = 1024 * 1024;
const GIB = 1024 * MIB;
const LONG_WIPE_BYTES = 64 * GIB;
const STATION_ENV = { IPSAN_WIPE_CHUNK_BYTES: "4M" };
const STATION_ARGS = ["--reconcile-interval-ms", "500"];

interface Task {
  id: string;
  kind: string;
  state: string;
  target: { type: string; id: string };
  objects: string[];
  progress: { done: number; total: number; unit: string } | null;
  startedBy: string;
  role: string;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  cancellable: boolean;
  resultStatus: number | null;
  result: unknown;
  error: { code: string; message: string } | null;
  message: string | null;
}

let station: RunningStation;
let unit: RunningUnit;
let dataDir = "";

before(async () => {
  station = await startStation({ keepData: true, extraArgs: STATION_ARGS, env: STATION_ENV });
  dataDir = station.dataDir;
  unit = await startJoinedUnit(station, { name: "t1", capacity: "200G" });
  assert.equal((await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.2" })).status, 201);
});
after(async () => {
  await unit?.close();
  await station?.close();
  if (dataDir !== "") rmSync(dataDir, { recursive: true, force: true });
});

const ASYNC = { headers: { prefer: "respond-async" } };

async function task(id: string): Promise<Task> {
  const response = await station.api("GET", `/api/v1/tasks/${id}`);
  assert.equal(response.status, 200, response.text);
  return response.body as Task;
}

function taskIdOf(response: ApiResponse): string {
  const id = response.headers.get("ipsan-task");
  assert.ok(id !== null && /^t-[0-9a-f]+$/.test(id), `Ipsan-Task header on ${response.status} ${response.text}`);
  return id;
}

/** A task that answered synchronously: finished, with the answer's status and body as its result. */
async function checkSync(response: ApiResponse, status: number, kind: string): Promise<Task> {
  assert.equal(response.status, status, response.text);
  const t = await task(taskIdOf(response));
  assert.equal(t.kind, kind);
  assert.equal(t.state, "succeeded");
  assert.equal(t.startedBy, "admin");
  assert.equal(t.role, "admin");
  assert.equal(t.resultStatus, status);
  assert.deepEqual(t.result, response.body ?? null);
  assert.equal(t.error, null);
  assert.ok(t.finishedAt !== null && t.startedAt !== null);
  assert.equal(t.cancellable, false, "a finished task is not cancellable");
  return t;
}

async function startLongWipe(name: string, token?: string): Promise<Task> {
  await checkSync(await station.api("POST", "/api/v1/volumes", { unit: "t1", name, sizeBytes: LONG_WIPE_BYTES }), 201, "volume.create");
  const response = await station.api("POST", `/api/v1/volumes/t1/${name}/wipe`, {}, { ...ASYNC, ...(token === undefined ? {} : { token }) });
  assert.equal(response.status, 202, response.text);
  assert.equal(response.headers.get("preference-applied"), "respond-async");
  const started = response.body as Task;
  assert.equal(response.headers.get("location"), `/api/v1/tasks/${started.id}`);
  assert.equal(started.kind, "volume.wipe");
  assert.deepEqual(started.objects, [`volume:t1/${name}`]);
  assert.equal(started.cancellable, true);
  return started;
}

async function progressing(id: string): Promise<Task> {
  return waitFor(`task ${id} running with progress`, async () => {
    const t = await task(id);
    return t.state === "running" && t.progress !== null && t.progress.done > 0 ? t : undefined;
  }, { timeoutMs: 15_000, intervalMs: 100 });
}

test("every kind runs as a task and answers what the synchronous API answered", async () => {
  const since = (await recordedEvents(station)).at(-1)?.seq ?? 0;
  const created = await checkSync(await station.api("POST", "/api/v1/volumes", { unit: "t1", name: "k1", sizeBytes: 64 * MIB }), 201, "volume.create");
  assert.deepEqual(created.target, { type: "volume", id: "t1/k1" });
  assert.deepEqual(created.objects, ["volume:t1/k1"]);
  const grown = await checkSync(await station.api("POST", "/api/v1/volumes/t1/k1/grow", { sizeBytes: 128 * MIB }), 200, "volume.grow");
  assert.equal((grown.result as { sizeBytes: number }).sizeBytes, 128 * MIB);
  await checkSync(await station.api("PUT", "/api/v1/volumes/t1/k1/partitions", { sizesBytes: [32 * MIB, 32 * MIB] }), 200, "volume.partition");
  const wiped = await checkSync(await station.api("POST", "/api/v1/volumes/t1/k1/wipe", {}), 200, "volume.wipe");
  assert.deepEqual(wiped.result, { unit: "t1", name: "k1", wipedBytes: 128 * MIB });
  assert.deepEqual(wiped.progress, { done: 128 * MIB, total: 128 * MIB, unit: "bytes" });
  const assigned = await checkSync(await station.api("POST", "/api/v1/assignments", { host: "h1", unit: "t1", volume: "k1", partition: 1 }), 201, "assignment.create");
  assert.deepEqual(assigned.objects, ["volume:t1/k1/p1"]);
  const assignmentId = (assigned.result as { id: string }).id;
  // An assigned volume is not wiped: refused at once, no task.
  const refused = await station.api("POST", "/api/v1/volumes/t1/k1/wipe", {});
  assert.equal(refused.status, 409, refused.text);
  assert.match(errorOf(refused.body).message ?? "", /assigned to host h1/);
  assert.equal(refused.headers.get("ipsan-task"), null);
  await checkSync(await station.api("DELETE", `/api/v1/assignments/${assignmentId}`), 204, "assignment.delete");
  const allocated = await checkSync(await station.api("POST", "/api/v1/allocations", { requestId: "r-tasks-1", host: "h1", sizeBytes: 16 * MIB }), 201, "allocation");
  assert.deepEqual(allocated.target, { type: "host", id: "h1" });
  // The same requestId again: 200 and the same assignment, as before tasks.
  const again = await station.api("POST", "/api/v1/allocations", { requestId: "r-tasks-1", host: "h1", sizeBytes: 16 * MIB });
  assert.equal(again.status, 200);
  assert.equal((again.body as { id: string }).id, (allocated.result as { id: string }).id);
  // Two at once with one requestId: no conflict between allocation tasks; one 201, one 200, one assignment.
  const pair = await Promise.all([1, 2].map(() => station.api("POST", "/api/v1/allocations", { requestId: "r-tasks-2", host: "h1", sizeBytes: 16 * MIB })));
  assert.deepEqual(pair.map((r) => r.status).sort(), [200, 201], pair.map((r) => r.text).join(""));
  assert.equal((pair[0]?.body as { id: string }).id, (pair[1]?.body as { id: string }).id);
  assert.notEqual(taskIdOf(pair[0] as ApiResponse), taskIdOf(pair[1] as ApiResponse));
  await checkSync(await station.api("DELETE", "/api/v1/volumes/t1/k1"), 204, "volume.delete");
  // A failing task answers the same error as before, with its task.
  const missing = await station.api("DELETE", "/api/v1/volumes/t1/nope");
  assert.equal(missing.status, 404);
  assert.equal(errorOf(missing.body).field, "name");
  const failed = await task(taskIdOf(missing));
  assert.equal(failed.state, "failed");
  assert.equal(failed.error?.code, "NOT_FOUND");
  // Listed newest first, filtered by kind and state.
  const list = (await station.api("GET", "/api/v1/tasks?kind=volume.create&state=succeeded")).body as { items: Task[]; total: number };
  assert.ok(list.items.some((t) => t.id === created.id));
  assert.ok(list.items.every((t) => t.kind === "volume.create" && t.state === "succeeded"));
  const page = (await station.api("GET", "/api/v1/tasks?limit=2")).body as { items: Task[]; total: number; nextOffset: number | null };
  assert.equal(page.items.length, 2);
  assert.equal(page.items[0]?.id, failed.id, "newest first");
  assert.equal(page.nextOffset, 2);
  assert.equal((await station.api("GET", "/api/v1/tasks?state=done")).status, 400);
  assert.equal(errorOf((await station.api("GET", "/api/v1/tasks?kind=x")).body).field, "kind");
  assert.equal((await station.api("GET", "/api/v1/tasks/t-0123")).status, 404);
  assert.equal(errorOf((await station.api("GET", "/api/v1/tasks/bad")).body).field, "id");
  // Events: queued, running, then the final state, with the task view as data.
  const events = (await recordedEvents(station, since)).filter((e) => e.type === "task" && e.subject === created.id);
  assert.deepEqual(events.map((e) => e.action), ["queued", "running", "succeeded"]);
  assert.equal((events.at(-1)?.data as unknown as Task).state, "succeeded");
});

test("Prefer: respond-async answers 202 with the task at once; the task carries the answer", async () => {
  const response = await station.api("POST", "/api/v1/volumes", { unit: "t1", name: "a1", sizeBytes: 8 * MIB }, ASYNC);
  assert.equal(response.status, 202, response.text);
  const started = response.body as Task;
  assert.equal(response.headers.get("location"), `/api/v1/tasks/${started.id}`);
  assert.equal(response.headers.get("ipsan-task"), started.id);
  assert.ok(["queued", "running", "succeeded"].includes(started.state));
  const done = await waitFor("the create task done", async () => {
    const t = await task(started.id);
    return t.finishedAt === null ? undefined : t;
  }, { timeoutMs: 10_000 });
  assert.equal(done.state, "succeeded");
  assert.equal(done.resultStatus, 201);
  assert.equal((done.result as { id: string }).id, "t1/a1");
  assert.equal((await station.api("GET", "/api/v1/volumes/t1/a1")).status, 200);
});

test("two long wipes at once: progress, conflicts named, viewer refused, cancel", async () => {
  const viewer = await station.api("POST", "/api/v1/tokens", { name: "watcher", role: "viewer" });
  assert.equal(viewer.status, 201);
  const viewerToken = (viewer.body as { token: string }).token;
  const operator = await station.api("POST", "/api/v1/tokens", { name: "op1", role: "operator" });
  const operatorToken = (operator.body as { token: string }).token;
  const first = await startLongWipe("big1");
  const second = await startLongWipe("big2", operatorToken);
  const [one, two] = await Promise.all([progressing(first.id), progressing(second.id)]);
  assert.equal(one.progress?.total, LONG_WIPE_BYTES);
  assert.equal(one.progress?.unit, "bytes");
  assert.equal(two.startedBy, "op1");
  assert.equal(two.role, "operator");

  // Conflicting tasks on the held volume: refused at once, naming the holder.
  for (const [method, path, body] of [
    ["POST", "/api/v1/volumes/t1/big1/grow", { sizeBytes: LONG_WIPE_BYTES * 2 }],
    ["DELETE", "/api/v1/volumes/t1/big1", undefined],
    ["POST", "/api/v1/volumes/t1/big1/wipe", {}],
    ["POST", "/api/v1/assignments", { host: "h1", unit: "t1", volume: "big1" }],
    ["PUT", "/api/v1/volumes/t1/big2/partitions", { sizesBytes: [GIB] }],
  ] as const) {
    const startedMs = Date.now();
    const refused = await station.api(method, path, body);
    assert.equal(refused.status, 409, `${method} ${path}: ${refused.text}`);
    assert.ok(Date.now() - startedMs < 1_500, "refused at once, not after waiting");
    const holder = path.includes("big2") ? second : first;
    const who = path.includes("big2") ? "op1" : "admin";
    const volume = path.includes("big2") ? "big2" : "big1";
    assert.equal(errorOf(refused.body).message, `volume t1/${volume} is busy: task ${holder.id} (volume.wipe, started by ${who}) holds it`);
    assert.equal((refused.body as { error: { task: string } }).error.task, holder.id);
  }
  // Without Prefer, a long task answers 202 after TASK_WAIT_MS (5 s) with Location.
  await checkSync(await station.api("POST", "/api/v1/volumes", { unit: "t1", name: "big3", sizeBytes: LONG_WIPE_BYTES }), 201, "volume.create");
  const waitedFrom = Date.now();
  const waited = await station.api("POST", "/api/v1/volumes/t1/big3/wipe", {});
  const waitedMs = Date.now() - waitedFrom;
  assert.equal(waited.status, 202, waited.text);
  assert.ok(waitedMs >= 4_900 && waitedMs < 10_000, `answered after ${waitedMs} ms`);
  assert.equal(waited.headers.get("preference-applied"), null);
  const third = waited.body as Task;
  assert.equal(waited.headers.get("location"), `/api/v1/tasks/${third.id}`);
  assert.equal(third.state, "running");

  // A viewer reads tasks, and may neither cancel nor start one.
  const seen = await station.api("GET", `/api/v1/tasks/${first.id}`, undefined, { token: viewerToken });
  assert.equal(seen.status, 200);
  assert.equal((await station.api("GET", "/api/v1/tasks?state=running", undefined, { token: viewerToken })).status, 200);
  const denied = await station.api("POST", `/api/v1/tasks/${first.id}/cancel`, {}, { token: viewerToken });
  assert.equal(denied.status, 403, denied.text);
  assert.equal(errorOf(denied.body).code, "PERMISSION_DENIED");
  assert.equal((await station.api("POST", "/api/v1/volumes/t1/big1/wipe", {}, { token: viewerToken })).status, 403);
  assert.equal((await task(first.id)).state, "running");

  // Cancel: the wipe stops between chunks, ends cancelled, and its progress stops.
  const cancelled = await station.api("POST", `/api/v1/tasks/${first.id}/cancel`, {});
  assert.equal(cancelled.status, 200, cancelled.text);
  const stopped = await waitFor("the cancelled wipe finished", async () => {
    const t = await task(first.id);
    return t.finishedAt === null ? undefined : t;
  }, { timeoutMs: 5_000 });
  assert.equal(stopped.state, "cancelled");
  assert.ok((stopped.progress?.done ?? 0) < LONG_WIPE_BYTES);
  assert.match(stopped.message ?? "", /^cancelled by admin after [0-9]+ of [0-9]+ bytes: volume t1\/big1 is zeroed up to byte [0-9]+/);
  await new Promise((resolve) => setTimeout(resolve, 1_200));
  assert.deepEqual((await task(first.id)).progress, stopped.progress, "no progress after cancel");
  assert.ok(((await task(second.id)).progress?.done ?? 0) > (two.progress?.done ?? 0), "the other wipe goes on");
  // Cancel again: finished. A finished create: finished. The volume is free for the next task.
  const twice = await station.api("POST", `/api/v1/tasks/${first.id}/cancel`, {});
  assert.equal(twice.status, 409);
  assert.match(errorOf(twice.body).message ?? "", /already finished: cancelled/);
  assert.equal((await station.api("GET", "/api/v1/audit?limit=50")).status, 200);
  const audit = ((await station.api("GET", "/api/v1/audit?limit=50")).body as { items: { action: string; ids: Record<string, string>; status: number }[] }).items;
  assert.ok(audit.some((a) => a.action === "POST /api/v1/tasks/:id/cancel" && a.ids["id"] === first.id && a.status === 200), "cancel is audited");
  assert.ok(audit.some((a) => a.action === "POST /api/v1/tasks/:id/cancel" && a.status === 403), "a refused cancel is audited");
  await checkSync(await station.api("DELETE", "/api/v1/volumes/t1/big1"), 204, "volume.delete");
  for (const t of [second, third]) assert.equal((await station.api("POST", `/api/v1/tasks/${t.id}/cancel`, {}, { token: operatorToken })).status, 200);
  for (const t of [second, third]) {
    await waitFor(`task ${t.id} cancelled`, async () => ((await task(t.id)).state === "cancelled" ? true : undefined), { timeoutMs: 5_000 });
  }
});

test("a host credential reads the tasks it started, and no other", async () => {
  const registered = await station.api("POST", "/api/v1/hosts/h2/register", { address: "127.0.0.3" });
  assert.equal(registered.status, 201, registered.text);
  const hostToken = (registered.body as { token: string }).token;
  const response = await station.api("POST", "/api/v1/allocations", { requestId: "r-h2", host: "h2", sizeBytes: 8 * MIB }, { ...ASYNC, token: hostToken });
  assert.equal(response.status, 202, response.text);
  const mine = response.body as Task;
  assert.equal(mine.kind, "allocation");
  assert.equal(mine.role, "host");
  const done = await waitFor("the host's allocation done", async () => {
    const read = await station.api("GET", `/api/v1/tasks/${mine.id}`, undefined, { token: hostToken });
    assert.equal(read.status, 200, read.text);
    const t = read.body as Task;
    return t.finishedAt === null ? undefined : t;
  }, { timeoutMs: 10_000 });
  assert.equal(done.state, "succeeded");
  assert.equal((done.result as { host: string }).host, "h2");
  const others = ((await station.api("GET", "/api/v1/tasks?kind=volume.create&limit=1")).body as { items: Task[] }).items;
  const other = others[0];
  assert.ok(other !== undefined);
  assert.equal((await station.api("GET", `/api/v1/tasks/${other.id}`, undefined, { token: hostToken })).status, 403);
  assert.equal((await station.api("GET", "/api/v1/tasks", undefined, { token: hostToken })).status, 403);
  assert.equal((await station.api("POST", `/api/v1/tasks/${mine.id}/cancel`, {}, { token: hostToken })).status, 403);
});

test("a task that cannot be cancelled says why", async () => {
  const response = await station.api("POST", "/api/v1/volumes", { unit: "t1", name: "c1", sizeBytes: 8 * MIB }, ASYNC);
  const started = response.body as Task;
  assert.equal(started.cancellable, false);
  const refused = await station.api("POST", `/api/v1/tasks/${started.id}/cancel`, {});
  assert.equal(refused.status, 409);
  assert.match(errorOf(refused.body).message ?? "", /cannot be cancelled: it is one call to the unit|already finished: succeeded/);
});

test("CLI: volume wipe asks for its task and follows it; tasks, tasks show, tasks cancel", async () => {
  const ipsan = (args: readonly string[]) =>
    run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 60_000, env: { IPSAN_STATION: station.url, IPSAN_TOKEN_FILE: `${station.dataDir}/admin.token` } });
  assert.equal((await ipsan(["volume", "create", "t1", "cliw", "512M"])).code, 0);
  const wiped = await ipsan(["volume", "wipe", "t1", "cliw"]);
  assert.equal(wiped.code, 0, wiped.stderr);
  assert.equal(wiped.stdout, "wiped volume t1/cliw (512M)\n");
  const listed = (JSON.parse((await ipsan(["tasks", "--kind", "volume.wipe", "--state", "succeeded", "--json"])).stdout) as { items: Task[] }).items;
  const mine = listed.find((t) => t.target.id === "t1/cliw");
  assert.ok(mine !== undefined);
  // The CLI asked for the task at once (202) and printed only once it had succeeded: the station's audit shows the 202.
  const audit = ((await station.api("GET", "/api/v1/audit?limit=100")).body as { items: { action: string; ids: Record<string, string>; status: number }[] }).items;
  assert.ok(audit.some((a) => a.action === "POST /api/v1/volumes/:unit/:name/wipe" && a.ids["name"] === "cliw" && a.status === 202));
  const table = (await ipsan(["tasks"])).stdout;
  assert.match(table, /^ID +KIND +TARGET +STATE +PROGRESS +BY +CREATED +MESSAGE\n/);
  assert.match(table, new RegExp(`\n${mine.id} +volume\.wipe +volume t1/cliw +succeeded +100% \\(512M of 512M\\) +admin `));
  assert.match((await ipsan(["tasks", "show", mine.id])).stdout, new RegExp(`\n${mine.id} +volume\.wipe `));
  const again = await ipsan(["tasks", "cancel", mine.id]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /409 CONFLICT: task t-[0-9a-f]+ \(volume\.wipe\) already finished: succeeded/);
  assert.equal((await ipsan(["tasks", "show", "nope"])).code, 2);
  assert.equal((await ipsan(["volume", "wipe", "t1"])).code, 2);
});

test("kill -9 in the middle of a long wipe: the restarted station says the restart interrupted it", async () => {
  const started = await startLongWipe("big4");
  const before = await progressing(started.id);
  await station.kill9();
  station = await startStation({ dataDir, keepData: true, extraArgs: STATION_ARGS, env: STATION_ENV, discovery: `${station.discovery.host}:${station.discovery.port}` });
  const after = await task(started.id);
  assert.equal(after.state, "failed");
  assert.equal(after.error?.code, "UNAVAILABLE");
  assert.match(after.message ?? "", /^interrupted by a station restart: volume t1\/big4 is partly zeroed \(at least [0-9]+ of [0-9]+ bytes were zeroed\); start the wipe again to finish it$/);
  assert.ok((after.progress?.done ?? 0) >= 0 && (after.progress?.done ?? 0) <= LONG_WIPE_BYTES);
  assert.ok(after.finishedAt !== null);
  assert.ok(before.progress !== null);
  const events = (await recordedEvents(station)).filter((e) => e.type === "task" && e.subject === started.id);
  assert.equal(events.at(-1)?.action, "failed");
  const metrics = await station.api("GET", "/metrics");
  assert.match(metrics.text, /\nipsan_station_tasks\{state="failed"\} [1-9][0-9]*\n/);
  assert.match(metrics.text, /\nipsan_station_tasks\{state="running"\} 0\n/);
  // The volume is no longer held: once the unit is back, a new task on it runs.
  await waitFor("unit t1 online again", async () => ((await station.api("GET", "/api/v1/units/t1")).body as { state?: string }).state === "online" || undefined, { timeoutMs: 15_000 });
  await checkSync(await station.api("DELETE", "/api/v1/volumes/t1/big4"), 204, "volume.delete");
});
