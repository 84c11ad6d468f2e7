// A unit that refuses one leg of a mirror: all legs are undone and placed
// again without it (issue 6 sections 1 and 5). Two real 256M `ipsan unit`s
// and a simulated unit (src/station/bench/sim_pool.ts) that reports 64M free
// but answers every create with 507 NO_SPACE. Best fit puts the first leg on
// the simulated unit (least free space) and the second on a real unit; the
// refusal undoes the mirror (the real unit's leg is deleted again) and the
// next placement lands both legs on the real units: 201, nothing left on the
// refusing unit, no leg volume left behind. Three copies then cannot be
// placed: 507 with the refusing unit's own words among the reasons, never 503,
// and nothing carved.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { loadClusterKey } from "../discovery/keys.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { waitFor } from "../testing/process.ts";
import { SimPool, type SimUnit } from "./bench/sim_pool.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, heldVolumes, liveAssignments, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const MIB = 1024 * 1024;

let station: RunningStation;
let reals: RunningUnit[] = [];
let pool: SimPool;
let liar: SimUnit;

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "500", "--pending-deadline-ms", "10000"] });
  reals = await Promise.all(["r1", "r2"].map((name) => startJoinedUnit(station, { name, capacity: "256M" })));
  pool = new SimPool(station.discovery, await loadClusterKey(station.clusterKeyFile()));
  await pool.listenControl();
  await pool.start(1, 0, { capacityBytes: 64 * MIB, prefix: "liar" });
  liar = [...pool.units.values()][0] as SimUnit;
  liar.refuseCarves = true;
  await waitFor(
    "the refusing unit online in the pool",
    async () => ((await station.api("GET", `/api/v1/units/${liar.name}`)).body as { state?: string } | undefined)?.state === "online" || undefined,
    { timeoutMs: 15_000 },
  );
});
after(async () => {
  await pool?.stop();
  await Promise.all(reals.map((u) => u.close()));
  await station?.close();
});

test("a refused leg undoes the mirror and places all legs again without that unit", async () => {
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "dry", host: "d", sizeBytes: "16M", copies: 2, dryRun: true });
  assert.equal(dry.status, 200, dry.text);
  const planned = (dry.body as { legs: { unit: string }[] }).legs.map((l) => l.unit);
  assert.ok(planned.includes(liar.name), `best fit plans a leg on the unit with the least free space: ${planned.join(",")}`);

  const response = await station.api("POST", "/api/v1/allocations", { requestId: "m-1", host: "hm", sizeBytes: "16M", address: "127.0.4.1", copies: 2 });
  assert.equal(response.status, 201, response.text);
  const mirror = response.body as Assignment;
  assert.deepEqual(mirror.legs?.map((l) => l.unit).sort(), ["r1", "r2"], "both legs on the units that carve");
  assert.equal(liar.carveCalls, 1, "the refusing unit was asked once");
  assert.equal(liar.volumes.size, 0);
  const held = new Set(heldVolumes(mirror).map((h) => `${h.unit}/${h.volume}`));
  for (const unit of reals) {
    for (const volume of await unitVolumes(unit)) {
      assert.ok(held.has(`${unit.name}/${volume.name}`), `${unit.name}/${volume.name}: the undone attempt's leg was deleted`);
    }
  }
  const failed = ((await liveAssignments(station, "?all=true&host=hm")) as Assignment[]).filter((a) => a.state === "failed");
  assert.equal(failed.length, 1, "the first attempt is on record as failed");
  assert.ok((failed[0]?.error ?? "").startsWith(`unit ${liar.name}: POST /v1/volumes:`), `the unit's refusal is the reason: ${failed[0]?.error}`);
  assert.deepEqual(await grantsMatch(station, reals), []);
});

test("more copies than units that carve: 507 with the refusing unit's words, nothing carved", async () => {
  const before = await Promise.all(reals.map(unitVolumes));
  const response = await station.api("POST", "/api/v1/allocations", { requestId: "m-3", host: "h3", sizeBytes: "16M", address: "127.0.4.2", copies: 3 });
  assert.equal(response.status, 507, response.text);
  const reasons = new Map((errorOf(response.body).reasons ?? []).map((r) => [r.unit, r.reason]));
  assert.deepEqual([...reasons.keys()].sort(), [liar.name, "r1", "r2"].sort());
  assert.match(reasons.get(liar.name) ?? "", /refused/);
  assert.deepEqual(await Promise.all(reals.map(unitVolumes)), before, "every leg of every attempt undone");
  assert.deepEqual(await liveAssignments(station, "?host=h3"), []);
});
