// Issue 9 items 6 and 11: no command registered a host; `ipsan unassign --json`
// was refused; `ipsan host request --dry-run` without --json printed raw JSON.
// Now `ipsan hosts register` does, unassign has --json, and the dry run prints
// text (JSON only with --json).

import assert from "node:assert/strict";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { startStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";

test("hosts register, unassign --json and a dry run in text", { timeout: 60_000 }, async () => {
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

      // Issue 9 item 6: a command registers a host (the error used to say to use curl).
      const registered = await ipsan("hosts", "register", "h1", "--address", "127.0.0.5", ...admin);
      assert.equal(registered.code, 0, registered.stderr);
      assert.equal(registered.stdout, "host h1 registered at 127.0.0.5\n");
      const spare = await ipsan("hosts", "register", "h2", "--address", "127.0.0.6", "--spare", "--json", ...admin);
      assert.equal(spare.code, 0, spare.stderr);
      assert.deepEqual([JSON.parse(spare.stdout).name, JSON.parse(spare.stdout).address, JSON.parse(spare.stdout).spare], ["h2", "127.0.0.6", true]);
      const noAddress = await ipsan("hosts", "register", "h3", ...admin);
      assert.equal(noAddress.code, 2);
      assert.match(noAddress.stderr, /--address IP is required/);
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
