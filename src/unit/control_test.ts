// Proves the unit's control API over real HTTP on 127.0.0.1:0: requests
// without a token, with a wrong one, or with a malformed header get 401
// (and extra tokens, the station's, are accepted); every route works as
// contracts.md says; a few hundred random JSON and non-JSON bodies get 4xx
// answers (400s name the field) and never a 5xx or a crash; bodies over
// CONTROL_BODY_BYTES_MAX get 413, whether announced or streamed; concurrent
// creates are serialized and never overlap, and the table stays valid.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import * as http from "node:http";
import fc from "fast-check";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { CONTROL_BODY_BYTES_MAX, ControlServer } from "./control.ts";
import { MIB } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import { validateTable } from "./table.ts";
import { VolumeManager, type VolumeView } from "./volumes.ts";

setLogLevel("error");
const TOKEN = "unit-token-0123456789abcdef";
const STATION_TOKEN = "station-derived-token-abcdef0123";

let dir: TempDir;
let manager: VolumeManager;
let server: ControlServer;
let base: string;

before(async () => {
  dir = makeTempDir("control");
  manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 128 * MIB });
  const provider = new UnitExportProvider(manager);
  server = new ControlServer({
    manager,
    provider,
    unitName: "u1",
    tokens: [TOKEN],
    extraTokens: () => [STATION_TOKEN],
    nbd: () => ({ host: "127.0.0.1", port: 10809 }),
  });
  const bound = await server.listen("127.0.0.1", 0);
  base = `http://127.0.0.1:${bound.port}`;
});

after(async () => {
  await server.close();
  await manager.close();
  dir.remove();
});

/** Every field the tests read from a reply (a volume, the info, a list or an error). */
type Reply = VolumeView & {
  readonly error: { readonly code: string; readonly message: string; readonly field?: string };
  readonly items: readonly VolumeView[];
  readonly volumes: readonly VolumeView[];
  readonly sectorSize: number;
  readonly capacityBytes: number;
  readonly nbd: unknown;
};

async function call(method: string, path: string, body?: unknown, token: string | null = TOKEN): Promise<{ status: number; json: Reply }> {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: { ...(token === null ? {} : { authorization: `Bearer ${token}` }), "content-type": "application/json" },
    ...(body === undefined ? {} : { body: typeof body === "string" ? body : JSON.stringify(body) }),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await response.text();
  return { status: response.status, json: (text === "" ? undefined : JSON.parse(text)) as Reply };
}

test("401 without a token, with a wrong one, or a malformed header; extra tokens accepted", async () => {
  for (const token of [null, "wrong-token-0123456789", "", `${TOKEN}x`, TOKEN.slice(0, -1)]) {
    const r = await call("GET", "/v1/info", undefined, token);
    assert.equal(r.status, 401, `token ${JSON.stringify(token)}`);
    assert.equal(r.json.error.code, "UNAUTHENTICATED");
  }
  const raw = await fetch(`${base}/v1/info`, { headers: { authorization: `Basic ${TOKEN}` } });
  assert.equal(raw.status, 401);
  assert.equal((await call("GET", "/v1/info", undefined, STATION_TOKEN)).status, 200);
});

test("every route", async () => {
  const created = await call("POST", "/v1/volumes", { name: "alpha", sizeBytes: 3 * MIB });
  assert.equal(created.status, 201);
  const alpha = created.json as VolumeView;
  assert.equal(alpha.sizeBytes, 3 * MIB);
  assert.deepEqual(alpha.extents.map((e) => e.endLba - e.startLba + 1), [6144]);
  assert.equal((await call("POST", "/v1/volumes", { name: "alpha", sizeBytes: MIB })).status, 409);
  const info = await call("GET", "/v1/info");
  assert.equal(info.json.name, "u1");
  assert.equal(info.json.sectorSize, 512);
  assert.deepEqual(info.json.nbd, { host: "127.0.0.1", port: 10809 });
  assert.equal(info.json.capacityBytes, 124 * MIB);
  assert.ok(info.json.volumes.some((v) => v.name === "alpha"));
  assert.equal((await call("GET", "/v1/volumes/alpha")).json.number, alpha.number);
  assert.ok((await call("GET", "/v1/volumes")).json.items.some((v) => v.name === "alpha"));
  const grown = await call("POST", "/v1/volumes/alpha/grow", { sizeBytes: 5 * MIB });
  assert.equal(grown.json.sizeBytes, 5 * MIB);
  assert.equal((await call("POST", "/v1/volumes/alpha/grow", { sizeBytes: MIB })).status, 409);
  const parted = await call("PUT", "/v1/volumes/alpha/partitions", { sizesBytes: [MIB, 2 * MIB] });
  assert.deepEqual(parted.json.partitions.map((p) => [p.name, p.startLba, p.endLba]), [
    ["alpha/p1", 0, 2047],
    ["alpha/p2", 2048, 6143],
  ]);
  const granted = await call("PUT", "/v1/volumes/alpha/grants", { hosts: ["10.1.0.5", "fd00::/64", "10.1.0.5/32"] });
  assert.deepEqual(granted.json.grants, ["10.1.0.5", "fd00::/64"]);
  assert.equal((await call("DELETE", "/v1/volumes/alpha")).status, 204);
  assert.equal((await call("GET", "/v1/volumes/alpha")).status, 404);
  assert.equal((await call("DELETE", "/v1/volumes/alpha")).status, 404);
  assert.equal((await call("GET", "/v2/info")).status, 404);
  assert.equal((await call("PATCH", "/v1/volumes")).status, 404);
  assert.equal((await call("GET", "/v1/volumes/%E0%A4%A")).status, 400);
});

test("bad fields are named in 400s", async () => {
  const cases: [string, string, unknown, string][] = [
    ["POST", "/v1/volumes", { name: "bad name", sizeBytes: MIB }, "name"],
    ["POST", "/v1/volumes", { name: "ok", sizeBytes: 1000 }, "sizeBytes"],
    ["POST", "/v1/volumes", { name: "ok", sizeBytes: "1G" }, "sizeBytes"],
    ["POST", "/v1/volumes", { name: "ok" }, "sizeBytes"],
    ["POST", "/v1/volumes", { name: "ok", sizeBytes: MIB, colour: "red" }, "colour"],
    ["POST", "/v1/volumes", [1, 2], "body"],
    ["POST", "/v1/volumes", "{not json", "body"],
    ["POST", "/v1/volumes", "", "body"],
  ];
  for (const [method, path, body, field] of cases) {
    const r = await call(method, path, body);
    assert.equal(r.status, 400, `${JSON.stringify(body)} -> ${JSON.stringify(r.json)}`);
    assert.equal(r.json.error.field, field);
    assert.equal(r.json.error.code, "INVALID_ARGUMENT");
    assert.ok(r.json.error.message.includes(field), r.json.error.message);
  }
  await call("POST", "/v1/volumes", { name: "beta", sizeBytes: MIB });
  const badPart = await call("PUT", "/v1/volumes/beta/partitions", { sizesBytes: [512, 100] });
  assert.equal(badPart.json.error.field, "sizesBytes[1]");
  assert.match(badPart.json.error.message, /100/);
  const badGrant = await call("PUT", "/v1/volumes/beta/grants", { hosts: ["10.0.0.1", "10.0.0.300"] });
  assert.equal(badGrant.json.error.field, "hosts[1]");
  assert.match(badGrant.json.error.message, /10\.0\.0\.300/);
  const tooBig = await call("PUT", "/v1/volumes/beta/partitions", { sizesBytes: [2 * MIB] });
  assert.equal(tooBig.status, 400);
  await call("DELETE", "/v1/volumes/beta");
});

test("random bodies never crash the server or get a 5xx", async () => {
  const paths = ["/v1/volumes", "/v1/volumes/fz/grow", "/v1/volumes/fz/partitions", "/v1/volumes/fz/grants"];
  await call("POST", "/v1/volumes", { name: "fz", sizeBytes: 2 * MIB });
  const bodyArb = fc.oneof(
    fc.jsonValue().map((v) => JSON.stringify(v)),
    fc.record({ name: fc.oneof(fc.string(), fc.jsonValue()), sizeBytes: fc.oneof(fc.integer(), fc.double(), fc.jsonValue()) }).map((v) => JSON.stringify(v)),
    fc.record({ sizeBytes: fc.jsonValue(), sizesBytes: fc.array(fc.oneof(fc.integer(), fc.jsonValue())), hosts: fc.array(fc.string()) }, { requiredKeys: [] }).map((v) =>
      JSON.stringify(v),
    ),
    fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b).toString("latin1")),
  );
  await fc.assert(
    fc.asyncProperty(fc.constantFrom(...paths), bodyArb, async (path, body) => {
      const method = path.endsWith("grow") || path === "/v1/volumes" ? "POST" : "PUT";
      const r = await call(method, path, body);
      assert.ok(r.status >= 200 && r.status < 500 || r.status === 507, `${method} ${path} ${body} -> ${r.status} ${JSON.stringify(r.json)}`);
      if (r.status === 400) {
        assert.equal(typeof r.json.error.field, "string");
        assert.ok(r.json.error.message.length > 0);
      }
      if (r.status === 201) await call("DELETE", `/v1/volumes/${encodeURIComponent(r.json.name)}`);
    }),
    { numRuns: 300 },
  );
  assert.equal((await call("GET", "/v1/info")).status, 200);
  assert.deepEqual(validateTable(manager.table), []);
  await call("DELETE", "/v1/volumes/fz");
});

function rawRequest(options: http.RequestOptions, body: (request: http.ClientRequest) => void): Promise<number> {
  return new Promise((resolve, reject) => {
    const request = http.request(`${base}/v1/volumes`, { method: "POST", ...options }, (response) => {
      response.resume();
      resolve(response.statusCode ?? 0);
    });
    request.on("error", reject);
    body(request);
  });
}

test("413 for bodies over the limit, announced or streamed", async () => {
  const big = Buffer.alloc(CONTROL_BODY_BYTES_MAX + 1, 0x20);
  const announced = await rawRequest({ headers: { authorization: `Bearer ${TOKEN}`, "content-length": big.length } }, (r) => r.end(big));
  assert.equal(announced, 413);
  const streamed = await rawRequest({ headers: { authorization: `Bearer ${TOKEN}`, "transfer-encoding": "chunked" } }, (r) => {
    for (let i = 0; i < 20; i++) r.write(Buffer.alloc(8192, 0x20));
    r.end();
  });
  assert.equal(streamed, 413, "the 413 arrives after the body is drained, not a reset");
  assert.equal((await call("GET", "/v1/info")).status, 200);
});

test("concurrent creates are serialized and never overlap", async () => {
  const results = await Promise.all(
    Array.from({ length: 40 }, (_, i) => call("POST", "/v1/volumes", { name: `c${i}`, sizeBytes: (1 + (i % 5)) * MIB - 512 * (i % 3) })),
  );
  const ok = results.filter((r) => r.status === 201).map((r) => r.json);
  assert.ok(ok.length >= 20, `${ok.length} creates succeeded`);
  assert.ok(results.every((r) => r.status === 201 || (r.status === 507 && r.json.error.code === "NO_SPACE")));
  const ranges = ok.flatMap((v) => v.extents.map((e) => [e.startLba, e.endLba] as const)).sort((a, b) => a[0] - b[0]);
  for (let i = 1; i < ranges.length; i++) assert.ok((ranges[i]?.[0] ?? 0) > (ranges[i - 1]?.[1] ?? 0), "no two volumes share a sector");
  assert.deepEqual(validateTable(manager.table), []);
  assert.equal(new Set(ok.map((v) => v.number)).size, ok.length);
});
