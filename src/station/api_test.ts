// Proves the REST API's guard rails against a real `bin/ipsan station`
// process (no units needed): every path refuses a missing or wrong token with
// 401; malformed requests get a 4xx whose `field` names what was wrong (a
// table of known cases, then a few hundred fast-check-generated bodies, which
// must never produce a 5xx); bodies over 64 KiB get 413, with or without a
// Content-Length; the station keeps serving after all of it. Also: every
// path in the OpenAPI document answers (no 404 "no such path", no 405); the
// event stream delivers a host change and is bounded; /metrics speaks
// Prometheus text; state survives a restart and the database is WAL with
// the schema version recorded (checked with the real sqlite3 CLI).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "node:net";
import fc from "fast-check";
import { runOk } from "../testing/process.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { MIGRATIONS } from "./db.ts";

let station: RunningStation;

before(async () => {
  station = await startStation({ keepData: true });
});
after(async () => {
  await station?.close();
  const { rmSync } = await import("node:fs");
  if (station !== undefined) rmSync(station.dataDir, { recursive: true, force: true });
});

test("401 without the admin token, on every kind of path", async () => {
  const paths: [string, string][] = [
    ["GET", "/api/v1/units"],
    ["GET", "/api/v1/health"],
    ["POST", "/api/v1/allocations"],
    ["GET", "/api/v1/events"],
    ["GET", "/api/v1/openapi.json"],
    ["GET", "/api/v1/whoami"],
    ["GET", "/metrics"],
    ["GET", "/no/such/path"],
  ];
  const good = station.token();
  const wrongTokens: (string | null)[] = [null, "", "x", good.slice(0, -1), `${good}0`, good.toUpperCase() === good ? "0".repeat(64) : good.toUpperCase()];
  for (const [method, path] of paths) {
    for (const token of wrongTokens) {
      const response = await station.api(method, path, method === "POST" ? {} : undefined, { token });
      assert.equal(response.status, 401, `${method} ${path} token=${JSON.stringify(token)}`);
      assert.equal(errorOf(response.body).code, "UNAUTHENTICATED");
    }
    const basic = await station.api(method, path, undefined, { token: null, headers: { authorization: `Basic ${Buffer.from(`a:${good}`).toString("base64")}` } });
    assert.equal(basic.status, 401);
  }
  assert.equal((await station.api("GET", "/api/v1/units")).status, 200);
  assert.deepEqual((await station.api("GET", "/api/v1/whoami")).body, { name: "admin", role: "admin", host: null });
});

test("malformed requests name the field and the value", async () => {
  const alloc = { requestId: "r1", host: "h1", sizeBytes: "1G" };
  const cases: [string, string, unknown, number, string, string?][] = [
    ["POST", "/api/v1/allocations", {}, 400, "requestId"],
    ["POST", "/api/v1/allocations", { ...alloc, sizeBytes: "eighty" }, 400, "sizeBytes", "eighty"],
    ["POST", "/api/v1/allocations", { ...alloc, sizeBytes: 1000 }, 400, "sizeBytes", "1000"],
    ["POST", "/api/v1/allocations", { ...alloc, sizeBytes: -512 }, 400, "sizeBytes", "-512"],
    ["POST", "/api/v1/allocations", { ...alloc, sizeBytes: 1.5 }, 400, "sizeBytes", "1.5"],
    ["POST", "/api/v1/allocations", { ...alloc, sizeBytes: 2 ** 60 }, 400, "sizeBytes"],
    ["POST", "/api/v1/allocations", { ...alloc, host: "bad host" }, 400, "host", "bad host"],
    ["POST", "/api/v1/allocations", { ...alloc, requestId: "" }, 400, "requestId"],
    ["POST", "/api/v1/allocations", { ...alloc, requestId: "x".repeat(129) }, 400, "requestId"],
    ["POST", "/api/v1/allocations", { ...alloc, dryRun: "yes" }, 400, "dryRun", "yes"],
    ["POST", "/api/v1/allocations", { ...alloc, address: "not an address!" }, 400, "address", "not an address!"],
    ["POST", "/api/v1/allocations", { ...alloc, sizebytes: 512 }, 400, "sizebytes"],
    ["POST", "/api/v1/allocations", [1, 2], 400, "body"],
    ["PUT", "/api/v1/hosts/bad%20name", {}, 400, "host", "bad name"],
    ["PUT", "/api/v1/hosts/h1", { address: 5 }, 400, "address", "5"],
    ["PUT", "/api/v1/hosts/h1", { address: "127.0.0.2", extra: true }, 400, "extra"],
    ["POST", "/api/v1/hosts/ghost/heartbeat", {}, 404, "host", "ghost"],
    ["POST", "/api/v1/volumes", { unit: "nope", name: "v", sizeBytes: "1G" }, 404, "unit", "nope"],
    ["POST", "/api/v1/volumes", { unit: "u", name: "-v", sizeBytes: "1G" }, 400, "name", "-v"],
    ["POST", "/api/v1/volumes/u/v/grow", { sizeBytes: null }, 400, "sizeBytes"],
    ["PUT", "/api/v1/volumes/u/v/partitions", { sizesBytes: "x" }, 400, "sizesBytes"],
    ["PUT", "/api/v1/volumes/u/v/partitions", { sizesBytes: ["1M", "7"] }, 400, "sizesBytes[1]", "7"],
    ["POST", "/api/v1/assignments", { host: "ghost", unit: "u", volume: "v" }, 404, "host", "ghost"],
    ["POST", "/api/v1/assignments", { host: "h", unit: "u", volume: "v", partition: 0 }, 400, "partition", "0"],
    ["DELETE", "/api/v1/assignments/a-000000000000", undefined, 404, "id"],
    ["DELETE", "/api/v1/volumes/nope/v", undefined, 404, "unit", "nope"],
    ["GET", "/api/v1/units?bogus=1", undefined, 400, "bogus"],
    ["GET", "/api/v1/units/nope", undefined, 404, "unit", "nope"],
    ["GET", "/api/v1/assignments?all=maybe", undefined, 400, "all", "maybe"],
    ["GET", "/api/v1/events?since=abc", undefined, 400, "Last-Event-ID", "abc"],
    ["PATCH", "/api/v1/units", undefined, 405, "method"],
    ["GET", "/api/v1/nothing", undefined, 404, "path"],
  ];
  for (const [method, path, body, status, field, value] of cases) {
    const response = await station.api(method, path, body);
    const what = `${method} ${path} ${JSON.stringify(body)} -> ${response.status} ${response.text}`;
    assert.equal(response.status, status, what);
    const error = errorOf(response.body);
    assert.equal(error.field, field, what);
    assert.ok(typeof error.message === "string" && error.message.length > 0, what);
    if (value !== undefined) assert.ok(error.message.includes(value), `message names the value: ${what}`);
  }
  const broken = await station.api("POST", "/api/v1/allocations", undefined, { raw: '{"requestId": "r1",' });
  assert.equal(broken.status, 400);
  assert.equal(errorOf(broken.body).field, "body");
  const notAllowed = await station.api("PUT", "/api/v1/allocations", {});
  assert.equal(notAllowed.headers.get("allow"), "POST");
});

test("no units: allocation answers 507 NO_SPACE, a dry run too, and nothing is recorded", async () => {
  const response = await station.api("POST", "/api/v1/allocations", { requestId: "none-1", host: "lonely", sizeBytes: "1G", address: "127.0.0.2" });
  assert.equal(response.status, 507, response.text);
  assert.equal(errorOf(response.body).code, "NO_SPACE");
  assert.deepEqual(errorOf(response.body).reasons, []);
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "none-2", host: "lonely", sizeBytes: "1G", dryRun: true });
  assert.equal(dry.status, 507);
  const all = await station.api("GET", "/api/v1/assignments?all=true");
  assert.deepEqual((all.body as { items: unknown[] }).items, []);
});

test("fuzzed bodies never cause a 5xx, and every 4xx names a field", async () => {
  const names = fc.constantFrom("h1", "u1", "v1", "bad name", "", "x".repeat(70), "ünï", "../etc", "a/b");
  const value = fc.oneof(
    fc.anything({ maxDepth: 2 }),
    names,
    fc.constantFrom("1G", "512", "0", "-1", "1.3K", "99999999T", "127.0.0.2", "::1", "[::1]", "no such host.invalid"),
    fc.integer(),
    fc.double(),
  );
  const keys = ["requestId", "host", "sizeBytes", "address", "dryRun", "unit", "name", "volume", "partition", "sizesBytes", "bogus"];
  const body = fc.oneof(
    fc.dictionary(fc.constantFrom(...keys), value, { maxKeys: 6 }),
    fc.anything({ maxDepth: 2 }),
  );
  const endpoints: [string, string][] = [
    ["POST", "/api/v1/allocations"],
    ["PUT", "/api/v1/hosts/fuzz-host"],
    ["POST", "/api/v1/hosts/fuzz-host/heartbeat"],
    ["POST", "/api/v1/volumes"],
    ["POST", "/api/v1/assignments"],
    ["POST", "/api/v1/volumes/u1/v1/grow"],
    ["PUT", "/api/v1/volumes/u1/v1/partitions"],
  ];
  const samples = fc.sample(fc.tuple(fc.constantFrom(...endpoints), body), { numRuns: 350, seed: 20261125 });
  let fourHundreds = 0;
  for (const [[method, path], payload] of samples) {
    const raw = JSON.stringify(payload) ?? "null";
    const response = await station.api(method, path, undefined, { raw });
    const what = `${method} ${path} ${raw.slice(0, 200)} -> ${response.status} ${response.text.slice(0, 300)}`;
    assert.ok(response.status < 500 || response.status === 507, what);
    if (response.status >= 400) {
      const error = errorOf(response.body);
      assert.ok(typeof error.code === "string" && typeof error.message === "string", what);
      if (response.status === 400) {
        fourHundreds += 1;
        assert.ok(typeof error.field === "string" && error.field.length > 0, `400 names a field: ${what}`);
      }
    }
  }
  assert.ok(fourHundreds > 200, `most fuzzed bodies are invalid (${fourHundreds})`);
  assert.equal((await station.api("GET", "/api/v1/health")).status, 200);
});

function rawRequest(port: number, text: string | Buffer[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: "127.0.0.1", port });
    let out = "";
    socket.setTimeout(10_000, () => socket.destroy(new Error("raw request timed out")));
    socket.on("data", (chunk) => {
      out += chunk.toString("latin1");
    });
    socket.on("close", () => resolve(out));
    socket.on("error", (error) => (out === "" ? reject(error) : resolve(out)));
    socket.on("connect", () => {
      if (typeof text === "string") socket.write(text);
      else for (const part of text) socket.write(part);
    });
  });
}

test("bodies over 64 KiB get 413, declared or chunked; the station keeps working", async () => {
  const big = JSON.stringify({ requestId: "big", host: "h1", sizeBytes: "1G", address: "x".repeat(70 * 1024) });
  const declared = await station.api("POST", "/api/v1/allocations", undefined, { raw: big });
  assert.equal(declared.status, 413);
  assert.equal(errorOf(declared.body).code, "TOO_LARGE");
  const port = Number(new URL(station.url).port);
  const chunk = Buffer.alloc(16 * 1024, "a");
  const parts: Buffer[] = [
    Buffer.from(`POST /api/v1/allocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${station.token()}\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n`),
  ];
  for (let i = 0; i < 6; i++) parts.push(Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from("\r\n"));
  parts.push(Buffer.from("0\r\n\r\n"));
  const answer = await rawRequest(port, parts);
  assert.match(answer, /^HTTP\/1\.1 413 /);
  const garbage = await rawRequest(port, "GARBAGE\r\n\r\n");
  assert.match(garbage, /^HTTP\/1\.1 400 /);
  assert.equal((await station.api("GET", "/api/v1/health")).status, 200);
});

test("every path in the OpenAPI document answers", async () => {
  const response = await station.api("GET", "/api/v1/openapi.json");
  assert.equal(response.status, 200);
  const doc = response.body as { openapi: string; paths: Record<string, Record<string, unknown>> };
  assert.equal(doc.openapi, "3.1.0");
  const paths = Object.entries(doc.paths);
  assert.ok(paths.length >= 15);
  for (const [template, methods] of paths) {
    for (const method of Object.keys(methods)) {
      const path = template.replace(/\{[^}]+\}/g, "probe1");
      if (path === "/api/v1/events") continue; // a stream: checked below
      const response = await station.api(method.toUpperCase(), path, method === "get" || method === "delete" ? undefined : {});
      const what = `${method} ${template} -> ${response.status} ${response.text.slice(0, 200)}`;
      assert.notEqual(response.status, 405, what);
      assert.ok(response.status !== 404 || errorOf(response.body).field !== "path", what);
      assert.ok(response.status < 500 || response.status === 507, what);
    }
  }
});

async function openStream(after?: number): Promise<{ response: Response; read(until: RegExp, timeoutMs?: number): Promise<string>; close(): void }> {
  const controller = new AbortController();
  const response = await fetch(`${station.url}/api/v1/events${after === undefined ? "" : `?since=${after}`}`, {
    headers: { authorization: `Bearer ${station.token()}` },
    signal: controller.signal,
  });
  const reader = response.body?.getReader();
  let seen = "";
  return {
    response,
    async read(until, timeoutMs = 5_000) {
      const deadline = Date.now() + timeoutMs;
      while (!until.test(seen)) {
        if (reader === undefined || Date.now() > deadline) throw new Error(`event stream: no ${until} within ${timeoutMs} ms; saw ${seen}`);
        const next = await Promise.race([reader.read(), new Promise<null>((r) => setTimeout(() => r(null), Math.max(1, deadline - Date.now())))]);
        if (next === null) continue;
        if (next.done) throw new Error(`event stream ended; saw ${seen}`);
        seen += Buffer.from(next.value).toString("utf8");
      }
      return seen;
    },
    close: () => controller.abort(),
  };
}

test("event stream: host changes arrive, Last-Event-ID replays, subscribers are bounded", async () => {
  const stream = await openStream();
  assert.equal(stream.response.status, 200);
  assert.match(stream.response.headers.get("content-type") ?? "", /^text\/event-stream/);
  const put = await station.api("PUT", "/api/v1/hosts/sse-host", { address: "127.0.0.9" });
  assert.equal(put.status, 201, put.text);
  const seen = await stream.read(/event: host\ndata: [^\n]*"sse-host"/);
  const id = Number(/id: ([0-9]+)\nevent: host\ndata: [^\n]*"sse-host"/.exec(seen)?.[1]);
  stream.close();
  const again = await station.api("PUT", "/api/v1/hosts/sse-host", { address: "127.0.0.10" });
  assert.equal(again.status, 200);
  const replay = await openStream(id);
  await replay.read(/"previousAddress":"127\.0\.0\.9"/);
  replay.close();

  const streams = [];
  try {
    for (let i = 0; i < 64; i++) streams.push(await openStream());
    for (const s of streams) assert.equal(s.response.status, 200);
    const refused = await station.api("GET", "/api/v1/events");
    assert.equal(refused.status, 503);
  } finally {
    for (const s of streams) s.close();
  }
});

test("metrics are Prometheus text with pool, host and HTTP series", async () => {
  await station.api("PUT", "/api/v1/hosts/metrics-host", { address: "127.0.0.11" });
  const response = await station.api("GET", "/metrics");
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  for (const series of [
    /^ipsan_station_units\{state="online"\} 0$/m,
    /^ipsan_station_volumes 0$/m,
    /^ipsan_station_hosts\{state="online"\} [1-9][0-9]*$/m,
    /^ipsan_station_allocation_seconds_bucket\{le="\+Inf"\} [0-9]+$/m,
    /^ipsan_station_http_requests_total\{status="401"\} [1-9][0-9]*$/m,
    /^ipsan_discovery_packets_rejected_total\{reason="[a-z_]+"\} [0-9]+$/m,
  ]) {
    assert.match(response.text, series);
  }
  for (const line of response.text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    assert.match(line, /^[a-z_:][a-z0-9_:]*(\{[^}]*\})? -?[0-9.e+-]+$/i, `valid sample line: ${line}`);
  }
});

test("state survives a restart; the database is WAL with its schema version", async () => {
  const put = await station.api("PUT", "/api/v1/hosts/durable-host", { address: "10.9.8.7" });
  assert.ok(put.status === 201 || put.status === 200);
  const { code } = await station.stop();
  assert.equal(code, 0, "clean stop on SIGTERM");
  const db = `${station.dataDir}/station.db`;
  const version = await runOk("sqlite3", [db, "SELECT max(version) FROM schema_version"], { timeoutMs: 10_000 });
  assert.equal(version.stdout.trim(), String(MIGRATIONS.at(-1)?.version));
  const mode = await runOk("sqlite3", [db, "PRAGMA journal_mode"], { timeoutMs: 10_000 });
  assert.equal(mode.stdout.trim(), "wal");
  const row = await runOk("sqlite3", [db, "SELECT address FROM hosts WHERE name = 'durable-host'"], { timeoutMs: 10_000 });
  assert.equal(row.stdout.trim(), "10.9.8.7");
  station = await startStation({ dataDir: station.dataDir, keepData: true });
  const host = await station.api("GET", "/api/v1/hosts/durable-host");
  assert.equal(host.status, 200);
  assert.equal((host.body as { address: string }).address, "10.9.8.7");
});
