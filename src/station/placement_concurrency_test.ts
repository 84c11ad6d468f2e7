// Issue 6 section 5, tried as a new user would: a burst of concurrent
// allocations on two small real units. A real station and two real
// `ipsan unit`s of 512M each; 50 clients ask at once for 16M each
// (POST /api/v1/allocations, what `ipsan host request` sends). The pool has
// room for all of them, so every answer must be 201; no volume may be handed
// out twice (each answer's unit/volume distinct, and the units' own volume
// lists hold exactly the answered volumes, each of 16M); the total allocated
// is 50 x 16M; once the units have reported, the station's free space per
// unit equals the unit's own. Then a second burst asks for more than the pool
// holds: exactly as many as still fit get 201, the rest 507 NO_SPACE with a
// reason per unit, and none 503 (a unit's "no space" is a refusal that moves
// on to the next unit, never a failure).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { controlOk } from "../testing/control.ts";
import { waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, liveAssignments, startJoinedUnit, unitVolumes, type Assignment, type StationUnit } from "./pool_harness.ts";

const MIB = 1024 * 1024;
const SIZE = 16 * MIB;
const BURST = 50;

let station: RunningStation;
let units: RunningUnit[] = [];

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "500", "--pending-deadline-ms", "10000"] });
  units = await Promise.all([startJoinedUnit(station, { name: "p1", capacity: "512M" }), startJoinedUnit(station, { name: "p2", capacity: "512M" })]);
});
after(async () => {
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
});

interface Answer {
  readonly i: number;
  readonly status: number;
  readonly body: unknown;
  readonly text: string;
}

async function burst(prefix: string, count: number, firstHost: number): Promise<Answer[]> {
  return Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const n = firstHost + i;
      const response = await station.api("POST", "/api/v1/allocations", {
        requestId: `${prefix}-${i}`,
        host: `${prefix}-h${i}`,
        sizeBytes: "16M",
        address: `127.0.${2 + Math.floor(n / 250)}.${1 + (n % 250)}`,
      });
      return { i, status: response.status, body: response.body, text: response.text };
    }),
  );
}

function tally(answers: readonly Answer[]): string {
  const counts = new Map<string, number>();
  for (const a of answers) {
    const key = a.status === 201 || a.status === 200 ? String(a.status) : `${a.status} ${errorOf(a.body).message ?? a.text}`;
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return [...counts].map(([k, v]) => `${v} x ${k}`).join("; ");
}

async function unitInfoFree(unit: RunningUnit): Promise<number> {
  return ((await controlOk(unit, "GET", "/v1/info")) as { freeBytes: number }).freeBytes;
}

async function stationUnits(): Promise<Map<string, StationUnit>> {
  const body = (await station.api("GET", "/api/v1/units")).body as { items: StationUnit[] };
  return new Map(body.items.map((u) => [u.name, u]));
}

/** The units' own carved volumes (h-*), as "unit/volume" -> size. */
async function carvedOnUnits(): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for (const unit of units) for (const v of await unitVolumes(unit)) if (v.name.startsWith("h-")) out.set(`${unit.name}/${v.name}`, v.sizeBytes);
  return out;
}

async function freeAgrees(): Promise<void> {
  await waitFor(
    "the station's free space per unit equals the unit's own",
    async () => {
      const listed = await stationUnits();
      for (const unit of units) if (listed.get(unit.name)?.freeBytes !== (await unitInfoFree(unit))) return undefined;
      return true;
    },
    { timeoutMs: 10_000 },
  ).catch(async (error: unknown) => {
    const listed = await stationUnits();
    const seen = await Promise.all(units.map(async (u) => `${u.name}: station ${listed.get(u.name)?.freeBytes}, unit ${await unitInfoFree(u)}`));
    throw new Error(`${(error as Error).message}: ${seen.join("; ")}`);
  });
}

test(`${BURST} concurrent 16M allocations on two 512M units: all 201, none twice, 50 x 16M allocated`, async () => {
  const poolFree = [...(await stationUnits()).values()].reduce((sum, u) => sum + u.freeBytes, 0);
  assert.ok(poolFree >= BURST * SIZE, `the pool has room: ${poolFree} >= ${BURST * SIZE}`);

  const answers = await burst("b", BURST, 0);
  const onUnits = await carvedOnUnits();
  const perUnit = new Map<string, number>();
  for (const a of answers) if (a.status === 201) perUnit.set((a.body as Assignment).unit, (perUnit.get((a.body as Assignment).unit) ?? 0) + 1);
  process.stderr.write(
    `burst of ${BURST} x 16M: ${tally(answers)}; per unit ${JSON.stringify(Object.fromEntries(perUnit))}; ` +
      `unit free ${JSON.stringify(await Promise.all(units.map(unitInfoFree)))}\n`,
  );
  assert.deepEqual(
    answers.filter((a) => a.status !== 201).map((a) => `${a.i}: ${a.status} ${a.text}`),
    [],
    `every answer 201 while the pool has room (${tally(answers)})`,
  );

  const seen = new Set<string>();
  let total = 0;
  for (const a of answers) {
    const assignment = a.body as Assignment;
    assert.equal(assignment.state, "active");
    assert.equal(assignment.sizeBytes, SIZE);
    const key = `${assignment.unit}/${assignment.volume}`;
    assert.ok(!seen.has(key), `volume ${key} handed out twice`);
    seen.add(key);
    assert.equal(onUnits.get(key), SIZE, `${key} is on its unit with 16M`);
    total += assignment.sizeBytes;
  }
  assert.equal(total, BURST * SIZE, "total allocated");
  assert.deepEqual([...onUnits.keys()].sort(), [...seen].sort(), "the units' own volume lists hold exactly the answered volumes");
  assert.equal([...onUnits.values()].reduce((sum, v) => sum + v, 0), BURST * SIZE, "the units hold 50 x 16M");
  const live = await liveAssignments(station);
  assert.equal(live.length, BURST);
  assert.deepEqual(live.map((a) => `${a.unit}/${a.volume}`).sort(), [...seen].sort(), "the station's live assignments are the answered ones");
  assert.deepEqual(await grantsMatch(station, units), []);
  await freeAgrees();
});

test("a burst past the pool's room: as many 201 as fit, the rest 507 with a reason per unit, no 503", async () => {
  await freeAgrees();
  const free = await Promise.all(units.map(unitInfoFree));
  const fit = free.reduce((sum, f) => sum + Math.floor(f / SIZE), 0);
  const extra = fit + 8;
  const answers = await burst("x", extra, BURST);
  process.stderr.write(`burst of ${extra} x 16M with room for ${fit} (unit free ${JSON.stringify(free)}): ${tally(answers)}\n`);
  const created = answers.filter((a) => a.status === 201);
  const refused = answers.filter((a) => a.status !== 201);
  assert.deepEqual(
    refused.filter((a) => a.status !== 507).map((a) => `${a.i}: ${a.status} ${a.text}`),
    [],
    "only 507 when the pool is full",
  );
  assert.equal(created.length, fit, `exactly the ${fit} that fit are placed (${tally(answers)})`);
  for (const a of refused) {
    const error = errorOf(a.body);
    assert.equal(error.code, "NO_SPACE");
    assert.deepEqual(
      (error.reasons ?? []).map((r) => r.unit),
      units.map((u) => u.name),
      `one reason per unit: ${a.text}`,
    );
  }
  const onUnits = await carvedOnUnits();
  assert.equal(onUnits.size, BURST + fit, "no carved volume is left behind by a refused request");
  assert.equal((await liveAssignments(station)).length, BURST + fit);
  assert.deepEqual(await grantsMatch(station, units), []);
  await freeAgrees();
});
