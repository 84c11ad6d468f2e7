// The generated OpenAPI 3.1 document against a real station with a real unit:
// the document is valid OpenAPI 3.1 (@seriousme/openapi-schema-validator),
// and every path+method in it is exercised at least once, mostly with
// requests that succeed. Every answer's status must be one the document lists
// for that operation, and every JSON answer must match the schema it lists
// (ajv), so the document cannot drift from what the station answers.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { Ajv, type ValidateFunction } from "ajv";
import { Validator } from "@seriousme/openapi-schema-validator";
import type { RunningUnit } from "../../testing/unit.ts";
import { startStation, type ApiResponse, type RunningStation } from "../harness.ts";
import { startJoinedUnit } from "../pool_harness.ts";

interface Operation {
  responses: Record<string, { content?: Record<string, { schema?: unknown }> }>;
}
interface Document {
  openapi: string;
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, unknown> };
}

let station: RunningStation;
let unit: RunningUnit;
let doc: Document;

before(async () => {
  station = await startStation();
  unit = await startJoinedUnit(station, { name: "u1", capacity: "256M" });
  const response = await station.api("GET", "/api/v1/openapi.json");
  assert.equal(response.status, 200, response.text);
  doc = response.body as Document;
});
after(async () => {
  await unit?.close();
  await station?.close();
});

/** The operation a concrete request hits: its template and the document's entry. */
function operationOf(method: string, path: string): { template: string; op: Operation } {
  const bare = path.split("?")[0] ?? path;
  for (const [template, methods] of Object.entries(doc.paths)) {
    const pattern = new RegExp(`^${template.replace(/\{[^}]+\}/g, "[^/]+")}$`);
    const op = methods[method.toLowerCase()];
    if (pattern.test(bare) && op !== undefined) return { template, op };
  }
  throw new Error(`${method} ${path}: not in the document`);
}

test("every path and method in the document answers as the document says", { timeout: 120_000 }, async () => {
  const ajv = new Ajv({ strict: false, validateFormats: false, allErrors: true });
  // The document's components, reachable by the $refs its operations use.
  ajv.addSchema({ $id: "openapi.json", components: doc.components });
  const compiled = new Map<string, ValidateFunction>();
  const schemaOf = (key: string, schema: unknown): ValidateFunction => {
    let fn = compiled.get(key);
    if (fn === undefined) {
      fn = ajv.compile(JSON.parse(JSON.stringify(schema).replaceAll('"#/components/', '"openapi.json#/components/')) as object);
      compiled.set(key, fn);
    }
    return fn;
  };
  const seen = new Set<string>();
  const call = async (method: string, path: string, body?: unknown, options: { token?: string | null; headers?: Record<string, string> } = {}, expect?: number): Promise<ApiResponse> => {
    const response = await station.api(method, path, body, options);
    const what = `${method} ${path} -> ${response.status} ${response.text.slice(0, 300)}`;
    if (expect !== undefined) assert.equal(response.status, expect, what);
    const { template, op } = operationOf(method, path);
    seen.add(`${method.toLowerCase()} ${template}`);
    const documented = op.responses[String(response.status)];
    assert.ok(documented !== undefined, `status not documented: ${what}`);
    const schema = documented.content?.["application/json"]?.schema;
    if (schema !== undefined && response.status !== 204) {
      const validate = schemaOf(`${method} ${template} ${response.status}`, schema);
      assert.ok(validate(response.body), `answer does not match its schema: ${what}: ${ajv.errorsText(validate.errors)}`);
    }
    return response;
  };

  await call("GET", "/api/v1/health", undefined, {}, 200);
  await call("GET", "/api/v1/openapi.json", undefined, {}, 200);
  const me = await call("GET", "/api/v1/whoami", undefined, {}, 200);
  assert.deepEqual(me.body, { name: "admin", role: "admin", host: null });
  const metrics = await call("GET", "/metrics", undefined, {}, 200);
  assert.match(metrics.text, /^ipsan_station_units/m);
  // The event stream: its head, then closed.
  const controller = new AbortController();
  const stream = await fetch(`${station.url}/api/v1/events`, { headers: { authorization: `Bearer ${station.token()}` }, signal: controller.signal });
  assert.equal(stream.status, 200);
  assert.match(stream.headers.get("content-type") ?? "", /^text\/event-stream/);
  controller.abort();
  seen.add("get /api/v1/events");
  await call("GET", "/api/v1/events?since=x", undefined, {}, 400);

  await call("GET", "/api/v1/units", undefined, {}, 200);
  await call("GET", "/api/v1/units?state=online", undefined, {}, 200);
  await call("GET", "/api/v1/units/u1", undefined, {}, 200);
  await call("GET", "/api/v1/units/ghost", undefined, {}, 404);
  await call("POST", "/api/v1/units/u1/refresh", {}, {}, 200);
  const identity = await call("GET", "/api/v1/units/u1/identity");
  assert.ok(identity.status === 200 || identity.status === 404, identity.text);
  await call("POST", "/api/v1/units/ghost/rotate-secret", {}, {}, 404);
  await call("DELETE", "/api/v1/units/ghost/identity", undefined, {}, 404);

  await call("POST", "/api/v1/volumes", { unit: "u1", name: "v1", sizeBytes: "8M" }, {}, 201);
  await call("POST", "/api/v1/volumes", { unit: "u1", name: "v1", sizeBytes: "8M" }, {}, 409);
  await call("POST", "/api/v1/volumes", { unit: "u1", name: "v2", sizeBytes: 4 * 1024 * 1024 }, {}, 201);
  await call("POST", "/api/v1/volumes", { unit: "u1" }, {}, 400);
  await call("GET", "/api/v1/volumes", undefined, {}, 200);
  await call("GET", "/api/v1/volumes?unit=u1&free=true&offset=0&limit=1", undefined, {}, 200);
  await call("GET", "/api/v1/volumes/u1/v1", undefined, {}, 200);
  await call("POST", "/api/v1/volumes/u1/v1/grow", { sizeBytes: "16M" }, {}, 200);
  await call("PUT", "/api/v1/volumes/u1/v1/partitions", { sizesBytes: ["4M", "4M"] }, {}, 200);
  await call("DELETE", "/api/v1/volumes/u1/v2", undefined, {}, 204);

  await call("PUT", "/api/v1/hosts/h1", { address: "127.0.0.2" }, {}, 201);
  await call("PUT", "/api/v1/hosts/h1", { address: "127.0.0.2", spare: false }, {}, 200);
  await call("GET", "/api/v1/hosts", undefined, {}, 200);
  await call("GET", "/api/v1/hosts/h1", undefined, {}, 200);
  await call("POST", "/api/v1/hosts/h1/heartbeat", {}, {}, 204);
  await call("POST", "/api/v1/hosts/ghost/heartbeat", {}, {}, 404);
  // An optional field sent as null is the same as absent (docs/api.md "Basics").
  const nulls = await call("PUT", "/api/v1/hosts/h3", { address: null, spare: null }, {}, 201);
  assert.equal((nulls.body as { address: string; spare: boolean }).address, "127.0.0.1");
  assert.equal((nulls.body as { address: string; spare: boolean }).spare, false);

  const assigned = await call("POST", "/api/v1/assignments", { host: "h1", unit: "u1", volume: "v1", partition: 1 }, {}, 201);
  const id = (assigned.body as { id: string }).id;
  await call("GET", "/api/v1/assignments", undefined, {}, 200);
  await call("GET", "/api/v1/assignments?host=h1&all=true&offset=0&limit=10", undefined, {}, 200);
  await call("GET", `/api/v1/assignments/${id}`, undefined, {}, 200);
  await call("GET", "/api/v1/hosts/h1/keys", undefined, {}, 200);
  await call("POST", "/api/v1/hosts/h1/rotate-key", {}, {}, 200);
  await call("PUT", `/api/v1/assignments/${id}/legs`, { generation: 1, legs: [{ unit: "u1", volume: "v1", state: "in-sync" }] }, {}, 409);
  const released = await call("DELETE", `/api/v1/assignments/${id}`);
  assert.ok(released.status === 204 || released.status === 202, released.text);

  // Tasks: a wipe (answered when done, with its task's id), one started with Prefer: respond-async (202 + the task).
  const wiped = await call("POST", "/api/v1/volumes/u1/v1/wipe", {});
  assert.ok(wiped.status === 200 || wiped.status === 202, wiped.text);
  const taskId = wiped.headers.get("ipsan-task") ?? "";
  assert.match(taskId, /^t-[0-9a-f]+$/);
  const later = await call("POST", "/api/v1/volumes", { unit: "u1", name: "v4", sizeBytes: "1M" }, { headers: { prefer: "respond-async" } }, 202);
  assert.equal(later.headers.get("location"), `/api/v1/tasks/${(later.body as { id: string }).id}`);
  await call("GET", "/api/v1/tasks", undefined, {}, 200);
  await call("GET", "/api/v1/tasks?state=succeeded&kind=volume.wipe&offset=0&limit=5", undefined, {}, 200);
  await call("GET", "/api/v1/tasks?state=done", undefined, {}, 400);
  await call("GET", `/api/v1/tasks/${taskId}`, undefined, {}, 200);
  await call("GET", "/api/v1/tasks/t-00", undefined, {}, 404);
  const cancel = await call("POST", `/api/v1/tasks/${taskId}/cancel`, {});
  assert.ok(cancel.status === 409 || cancel.status === 200, cancel.text);

  await call("POST", "/api/v1/allocations", { requestId: "oa-dry", host: "h1", sizeBytes: "4M", dryRun: true }, {}, 200);
  const allocated = await call("POST", "/api/v1/allocations", { requestId: "oa-1", host: "h1", sizeBytes: "4M" }, {}, 201);
  await call("POST", "/api/v1/allocations", { requestId: "oa-1", host: "h1", sizeBytes: "4M" }, {}, 200);
  await call("POST", "/api/v1/allocations", { requestId: "oa-2", host: "h1", sizeBytes: "1T" }, {}, 507);
  await call("DELETE", `/api/v1/assignments/${(allocated.body as { id: string }).id}`);

  const created = await call("POST", "/api/v1/tokens", { name: "oa-viewer", role: "viewer" }, {}, 201);
  await call("GET", "/api/v1/units", undefined, { token: (created.body as { token: string }).token }, 200);
  assert.deepEqual((await call("GET", "/api/v1/whoami", undefined, { token: (created.body as { token: string }).token }, 200)).body, { name: "oa-viewer", role: "viewer", host: null });
  await call("POST", "/api/v1/volumes", { unit: "u1", name: "v3", sizeBytes: "1M" }, { token: (created.body as { token: string }).token }, 403);
  await call("GET", "/api/v1/tokens", undefined, {}, 200);
  await call("DELETE", "/api/v1/tokens/oa-viewer", undefined, {}, 204);
  await call("GET", "/api/v1/units", undefined, { token: null }, 401);
  const join = await call("POST", "/api/v1/join-tokens", { host: "h2", expires: "10m" }, {}, 201);
  await call("POST", "/api/v1/hosts/h2/register", { address: "127.0.0.3" }, { token: (join.body as { token: string }).token }, 201);
  await call("GET", "/api/v1/stats/units", undefined, {}, 200);
  await call("GET", "/api/v1/stats/units?window=5m", undefined, {}, 200);
  await call("GET", "/api/v1/stats/units?window=soon", undefined, {}, 400);
  await call("GET", "/api/v1/stats/units/u1", undefined, {}, 200);
  await call("GET", "/api/v1/stats/units/ghost", undefined, {}, 404);
  await call("GET", "/api/v1/stats/pool?window=1h", undefined, {}, 200);
  await call("GET", "/api/v1/audit?limit=5", undefined, {}, 200);
  await call("GET", "/api/v1/audit/verify", undefined, {}, 200);

  const missing: string[] = [];
  for (const [template, methods] of Object.entries(doc.paths)) for (const method of Object.keys(methods)) if (!seen.has(`${method} ${template}`)) missing.push(`${method} ${template}`);
  assert.deepEqual(missing, [], "every operation of the document was exercised");
});

// Last: the validator compiles its meta-schemas synchronously for seconds on a loaded machine
// (long enough for the station to close an idle keep-alive connection the client then reuses).
test("the generated document is valid OpenAPI 3.1", async () => {
  assert.equal(doc.openapi, "3.1.0");
  const result = await new Validator().validate(doc as never);
  assert.ok(result.valid, JSON.stringify(result.errors, null, 1)?.slice(0, 2000));
  // Some of it by hand: every operation lists its answers and the shared error schema.
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      assert.ok(op.responses["401"] !== undefined, `${method} ${path} documents 401`);
      assert.ok(Object.keys(op.responses).some((s) => s.startsWith("2")), `${method} ${path} documents a success`);
    }
  }
  assert.deepEqual(Object.keys(doc.components.schemas).sort(), ["Assignment", "AuditEntry", "Error", "Host", "Identity", "LegRebuild", "Task", "Token", "Unit", "Volume"]);
});
