// A unit's "no space" is a refusal that moves placement on to the next unit
// (issue 6 section 5), proved with a unit whose reports mislead: a simulated
// unit (src/station/bench/sim_pool.ts: the real discovery protocol and a
// control API, no storage) that reports 64M free but answers every create
// with 507 NO_SPACE, beside a real 512M `ipsan unit`. Best fit sends carves to
// the simulated unit first (it has less free space). Every request still gets
// 201 on the real unit, nothing is left on the refusing one, and once it has
// refused, carves that large stop going there while it reports no more free
// space than when it refused. When the real unit is full too, the answer is
// 507 with both units' reasons, never 503.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { loadClusterKey } from "../discovery/keys.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { waitFor } from "../testing/process.ts";
import { SimPool, type SimUnit } from "./bench/sim_pool.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, liveAssignments, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const MIB = 1024 * 1024;

let station: RunningStation;
let real: RunningUnit;
let pool: SimPool;
let liar: SimUnit;

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "500", "--pending-deadline-ms", "10000"] });
  real = await startJoinedUnit(station, { name: "real", capacity: "512M" });
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
  await real?.close();
  await station?.close();
});

async function allocate(requestId: string, i: number): Promise<{ status: number; body: unknown; text: string }> {
  const response = await station.api("POST", "/api/v1/allocations", { requestId, host: `h${i}`, sizeBytes: "16M", address: `127.0.3.${i + 1}` });
  return { status: response.status, body: response.body, text: response.text };
}

test("a unit's 507 moves placement to the next unit: 20 concurrent requests, all 201 on the unit with room", async () => {
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "dry", host: "d", sizeBytes: "16M", dryRun: true });
  assert.equal(dry.status, 200, dry.text);
  assert.equal((dry.body as { placement: { unit: string } }).placement.unit, liar.name, "best fit picks the unit with less free space first");

  const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => allocate(`r-${i}`, i)));
  process.stderr.write(`refusal burst: ${answers.filter((a) => a.status === 201).length} x 201 of 20; the refusing unit was asked ${liar.carveCalls} times\n`);
  assert.deepEqual(
    answers.filter((a) => a.status !== 201).map((a) => `${a.status} ${a.text}`),
    [],
    "every answer 201",
  );
  for (const a of answers) assert.equal((a.body as Assignment).unit, "real");
  // Its 64M hold four 16M carves: at most four are placed there before its first refusal comes back.
  assert.ok(liar.carveCalls >= 1 && liar.carveCalls <= 4, `the refusing unit was tried, and not more than its reported space allows: ${liar.carveCalls}`);
  assert.equal(liar.volumes.size, 0, "nothing made on the refusing unit");
  const volumes = new Set(answers.map((a) => (a.body as Assignment).volume));
  assert.equal(volumes.size, 20, "20 distinct volumes");
  assert.deepEqual(
    (await unitVolumes(real)).map((v) => v.name).sort(),
    [...volumes].sort(),
    "the real unit holds exactly the answered volumes",
  );
  assert.equal((await liveAssignments(station)).length, 20);
  assert.deepEqual(await liveAssignments(station, "?state=pending"), []);
  assert.deepEqual(await grantsMatch(station, [real]), []);
});

test("after a refusal, carves that large skip the unit while it reports no more free space", async () => {
  const calls = liar.carveCalls;
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "dry2", host: "d", sizeBytes: "16M", dryRun: true });
  assert.equal((dry.body as { placement: { unit: string } }).placement.unit, "real", dry.text);
  const liarReason = (dry.body as { reasons: { unit: string; reason: string }[] }).reasons.find((r) => r.unit === liar.name)?.reason ?? "";
  assert.match(liarReason, /refused a carve of 16M for lack of space/);
  const answer = await allocate("r-next", 100);
  assert.equal(answer.status, 201, answer.text);
  assert.equal((answer.body as Assignment).unit, "real");
  assert.equal(liar.carveCalls, calls, "the refusing unit was not asked again");
  // A smaller carve may still go there (the refusal was about 16M): and is refused, then placed on the real unit.
  const small = await station.api("POST", "/api/v1/allocations", { requestId: "r-small", host: "h-small", sizeBytes: "8M", address: "127.0.3.200" });
  assert.equal(small.status, 201, small.text);
  assert.equal((small.body as Assignment).unit, "real");
  assert.equal(liar.carveCalls, calls + 1, "an 8M carve was tried there once");
});

test("no unit can hold it: 507 with every unit's reason, never 503", async () => {
  // Fill the real unit.
  for (let i = 0; ; i++) {
    const answer = await allocate(`fill-${i}`, 110 + (i % 100));
    if (answer.status === 507) {
      const error = errorOf(answer.body);
      assert.equal(error.code, "NO_SPACE", answer.text);
      const reasons = new Map((error.reasons ?? []).map((r) => [r.unit, r.reason]));
      assert.deepEqual([...reasons.keys()].sort(), [liar.name, "real"].sort());
      assert.match(reasons.get("real") ?? "", /not enough free space/);
      assert.match(reasons.get(liar.name) ?? "", /refused/);
      break;
    }
    assert.equal(answer.status, 201, `fill-${i}: ${answer.text}`);
    assert.ok(i < 40, "the real unit fills up");
  }
  assert.equal(liar.volumes.size, 0);
  assert.deepEqual(await liveAssignments(station, "?state=pending"), []);
  assert.deepEqual(await grantsMatch(station, [real]), []);
});
