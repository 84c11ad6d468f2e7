// How the station's unit client classifies a unit's answers (in-process HTTP
// server standing in for a unit's control API): 4xx and 507 NO_SPACE are
// refusals (the unit's final word: asked once, not retried, passed on with
// the unit's code so placement moves on to another unit); other 5xx are
// failures, retried with backoff and passed on as UNAVAILABLE.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { UnitCallError, UnitClient } from "./unit_client.ts";

async function withUnit(status: number, code: string, body: (client: UnitClient) => Promise<void>): Promise<number> {
  let calls = 0;
  const server = createServer((req, res) => {
    calls++;
    req.resume();
    const text = JSON.stringify({ error: { code, message: `volume "v": needs 16M, only 12M free` } });
    res.writeHead(status, { "content-type": "application/json", "content-length": String(Buffer.byteLength(text)) }).end(text);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  try {
    await body(new UnitClient({ unit: "u1", control: { host: "127.0.0.1", port }, token: "t", timeoutMs: 2_000 }));
  } finally {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
  return calls;
}

test("507 NO_SPACE is a refusal: asked once, the unit's code passed on", async () => {
  const calls = await withUnit(507, "NO_SPACE", async (client) => {
    const error = await client.createVolume("v", 16 * 1024 * 1024).then(
      () => assert.fail("must be refused"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof UnitCallError);
    assert.equal(error.failure, "refused");
    assert.equal(error.transient, false);
    assert.equal(error.code, "NO_SPACE");
    assert.equal(error.unitCode, "NO_SPACE");
    assert.equal(error.status, 507);
    assert.equal(error.call, "POST /v1/volumes");
  });
  assert.equal(calls, 1, "not retried");
});

test("a 4xx is a refusal too", async () => {
  const calls = await withUnit(409, "CONFLICT", async (client) => {
    await assert.rejects(client.createVolume("v", 1024 * 1024), (e: unknown) => e instanceof UnitCallError && e.failure === "refused" && e.code === "CONFLICT");
  });
  assert.equal(calls, 1);
});

test("other 5xx are failures: retried, then UNAVAILABLE", async () => {
  const calls = await withUnit(500, "INTERNAL", async (client) => {
    await assert.rejects(client.createVolume("v", 1024 * 1024), (e: unknown) => e instanceof UnitCallError && e.failure === "failed" && e.transient && e.code === "UNAVAILABLE");
  });
  assert.equal(calls, 3, "UNIT_CALL_ATTEMPTS_MAX attempts");
});
