// startUnit against the real `bin/ipsan unit`: it comes up on 127.0.0.1:0 and
// on a Unix socket, its URIs reach the volume (nbdinfo sees the exact size
// both ways), SIGTERM stops it with status 0, kill9() leaves no process
// behind, and a unit that cannot start (bad flag) fails startUnit with the
// unit's own error message instead of hanging.

import assert from "node:assert/strict";
import { test } from "node:test";
import { nbdinfoList, nbdinfoSize } from "./clients.ts";
import { startUnit } from "./unit.ts";

const MIB = 1024 * 1024;

test("startUnit on TCP port 0: URI works, SIGTERM exits 0", async () => {
  const unit = await startUnit({ capacity: "64M", volumes: [{ name: "v1", size: "8M" }], name: "harness" });
  try {
    assert.equal(unit.name, "harness");
    assert.equal(unit.host, "127.0.0.1");
    assert.ok(unit.port > 0);
    assert.equal(unit.uri("v1"), `nbd://127.0.0.1:${unit.port}/v1`);
    assert.equal(await nbdinfoSize(unit.uri("v1")), 8 * MIB);
    assert.deepEqual((await nbdinfoList(unit.listUri())).exports.map((e) => e["export-name"]), ["v1"]);
    assert.deepEqual(await unit.stop(), { code: 0, signal: null, forced: false });
  } finally {
    await unit.close();
  }
});

test("startUnit on a Unix socket; kill9 leaves nothing running", async () => {
  const unit = await startUnit({ capacity: "64M", volumes: [{ name: "v2", size: "4M" }], listen: "unix" });
  try {
    assert.ok(unit.socketPath?.endsWith("/nbd.sock"), unit.socketPath);
    assert.equal(unit.uri("v2"), `nbd+unix:///v2?socket=${unit.socketPath}`);
    assert.equal(await nbdinfoSize(unit.uri("v2")), 4 * MIB);
    await unit.kill9();
    assert.equal(unit.running(), false);
    assert.equal(unit.child.signalCode, "SIGKILL");
    assert.throws(() => process.kill(unit.pid, 0), /ESRCH/);
  } finally {
    await unit.close();
  }
});

test("startUnit reports a unit that exits before ready, with its message", async () => {
  await assert.rejects(
    startUnit({ capacity: "64M", volumes: [{ name: "bad name!", size: "4M" }], readyTimeoutMs: 10_000 }),
    /unit exited \(code=2 signal=null\) before ready:[\s\S]*bad name!/,
  );
});
