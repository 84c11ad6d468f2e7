// Issue 9 item 11: `ipsan unassign --json` was refused; `ipsan host request
// --dry-run` without --json printed raw JSON. Now unassign has --json and the
// dry run prints text (and JSON only with --json).

import assert from "node:assert/strict";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { startStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";

test("unassign --json and a dry run in text", { timeout: 60_000 }, async () => {
  const station = await startStation({});
  const dir = makeTempDir("json-output");
  try {
    const unit = await startJoinedUnit(station, { name: "u1", capacity: "256M" });
    try {
      const admin = ["--station", station.url, "--token-file", `${station.dataDir}/admin.token`];
      const ipsan = (...args: string[]) => run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 20_000 });
      const dry = await ipsan("host", "request", ...admin, "--host", "h1", "--size", "16M", "--dry-run", "--state-dir", dir.path);
      assert.equal(dry.code, 0, dry.stderr);
      assert.match(dry.stdout, /^dry run \(nothing recorded\): would carve 16M on unit u1\n$/);
      const dryJson = await ipsan("host", "request", ...admin, "--host", "h1", "--size", "16M", "--dry-run", "--json", "--state-dir", dir.path);
      assert.equal((JSON.parse(dryJson.stdout) as { dryRun: boolean }).dryRun, true);

      assert.equal((await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.5" })).status, 201);
      assert.equal((await station.api("POST", "/api/v1/volumes", { unit: "u1", name: "v1", sizeBytes: 16 * 1024 * 1024 })).status, 201);
      const id = ((await station.api("POST", "/api/v1/assignments", { host: "h1", unit: "u1", volume: "v1" })).body as { id: string }).id;
      const unassigned = await ipsan("unassign", id, "--json", ...admin);
      assert.equal(unassigned.code, 0, unassigned.stderr);
      assert.deepEqual(JSON.parse(unassigned.stdout), { id, state: "released" });
    } finally {
      await unit.close();
    }
  } finally {
    dir.remove();
    await station.close();
  }
});
