// Issue 9 item 13: `ipsan units` showed 127.0.0.1 as ADDRESS for units serving
// on 127.0.0.11 and .12 (the source of their discovery packets), and the
// assignment's unitAddress too. Both now show where the unit serves; the
// listing ends with the pool's totals.

import assert from "node:assert/strict";
import { test } from "node:test";
import { run } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { startStation } from "../station/harness.ts";
import { startJoinedUnit } from "../station/pool_harness.ts";

test("ipsan units: ADDRESS is where each unit serves, and a TOTAL row; an assignment's unitAddress too", { timeout: 60_000 }, async () => {
  const station = await startStation({});
  const units = [];
  try {
    units.push(await startJoinedUnit(station, { name: "u11", capacity: "256M", listen: "127.0.0.11:0" }));
    units.push(await startJoinedUnit(station, { name: "u12", capacity: "512M", listen: "127.0.0.12:0" }));
    const listed = await run(process.execPath, [IPSAN_BIN, "units", "--station", station.url, "--token-file", `${station.dataDir}/admin.token`], { timeoutMs: 20_000 });
    assert.equal(listed.code, 0, listed.stderr);
    const rows = listed.stdout.trim().split("\n").map((line) => line.trim().split(/\s{2,}/));
    const row = (name: string): string[] => rows.find((r) => r[0] === name) ?? [];
    assert.equal(row("u11")[2], "127.0.0.11", listed.stdout);
    assert.equal(row("u12")[2], "127.0.0.12", listed.stdout);
    const total = rows[rows.length - 1] ?? [];
    assert.deepEqual([total[0], total[1]], ["TOTAL", "2/2 online"], listed.stdout);
    assert.equal(total[4], "760M", `capacity 252M + 508M (each storage minus its 4 MiB metadata area):\n${listed.stdout}`);

    await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.5" });
    const created = await station.api("POST", "/api/v1/volumes", { unit: "u12", name: "v1", sizeBytes: 16 * 1024 * 1024 });
    assert.equal(created.status, 201);
    const assignment = await station.api("POST", "/api/v1/assignments", { host: "h1", unit: "u12", volume: "v1" });
    assert.ok(assignment.status === 200 || assignment.status === 201, JSON.stringify(assignment.body));
    assert.equal((assignment.body as { unitAddress: string }).unitAddress, "127.0.0.12");
  } finally {
    for (const unit of units) await unit.close();
    await station.close();
  }
});
