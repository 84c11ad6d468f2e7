// Proves that a leg replacement interrupted by kill -9 of the station is
// finished or undone after the restart, never left half-made. Real station
// (`--replace-after 1s`) and real units (u1, u2, spare sp; u3 in the second test):
// - mirror A on u1+u2; the test stops sp (SIGSTOP) and shuts u1 down
//   (SIGTERM: the station marks it down at once);
// - after --replace-after the station records the replacement on sp (event
//   leg-replacing) and asks sp to carve the leg: sp does not answer;
// - kill -9 of the station right then (leg-replacing recorded, no
//   leg-replaced, checked in the database with the sqlite3 CLI);
// - finished: SIGCONT sp (it now carves the volume the dead station asked
//   for) and restart the station: the leg at its index is on sp,
//   "rebuilding", granted to the host; sp holds no volume but that leg;
// - undone: sp stays stopped past --pending-deadline-ms after the restart:
//   the replacement is undone (event leg-replacement-undone) and made again
//   on u3; when sp comes back, whatever it carved for the undone attempt is
//   deleted;
// - either way no replacement is left recorded in the database, nothing is
//   leaked, and the units' grants equal the assignments'.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { runOk, waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { FAST_DISCOVERY } from "./leg_replacement_scenario.ts";
import { grantsMatch, recordedEvents, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const HOST = "127.0.0.2";
/** Liveness slow enough that the stopped spare stays online (placeable) for a while, fast enough to rejoin quickly. */
const DISCOVERY = { ...FAST_DISCOVERY, IPSAN_DISCOVERY_SUSPECT_MS: "4000", IPSAN_DISCOVERY_OFFLINE_MS: "8000" };
const WAIT_MS = 30_000;

interface Pool {
  station: RunningStation;
  readonly dataDir: string;
  readonly units: RunningUnit[];
  readonly args: string[];
}

const pools: Pool[] = [];
after(async () => {
  for (const pool of pools) {
    for (const unit of pool.units) {
      try {
        process.kill(unit.pid, "SIGCONT");
      } catch {
        // already gone
      }
    }
    await Promise.all(pool.units.map((u) => u.close()));
    await pool.station.close();
    rmSync(pool.dataDir, { recursive: true, force: true });
  }
});

async function startPool(pendingDeadline: string, unitSpecs: [name: string, capacity: string, ...extraArgs: string[]][]): Promise<Pool> {
  const args = ["--replace-after", "1s", "--reconcile-interval-ms", "500", "--pending-deadline-ms", pendingDeadline];
  const station = await startStation({ keepData: true, extraArgs: args, env: DISCOVERY });
  const pool: Pool = { station, dataDir: station.dataDir, units: [], args };
  pools.push(pool);
  for (const [name, capacity, ...extraArgs] of unitSpecs) pool.units.push(await startJoinedUnit(station, { name, capacity, extraArgs, env: DISCOVERY }));
  return pool;
}

function unitOf(pool: Pool, name: string): RunningUnit {
  const found = pool.units.find((u) => u.name === name);
  assert.ok(found !== undefined);
  return found;
}

async function sql(pool: Pool, query: string): Promise<string> {
  return (await runOk("sqlite3", [`${pool.dataDir}/station.db`, query], { timeoutMs: 10_000 })).stdout.trim();
}

/** Allocates mirror A on u1+u2, then kills the station while its replacement of u1's leg waits for the stopped spare. */
async function interrupt(pool: Pool): Promise<{ a: Assignment; index: number }> {
  const answer = await pool.station.api("POST", "/api/v1/allocations", { requestId: "crash-a", host: "h1", address: HOST, sizeBytes: "8M", copies: 2 });
  assert.equal(answer.status, 201, answer.text);
  const a = answer.body as Assignment;
  assert.deepEqual((a.legs ?? []).map((l) => l.unit).sort(), ["u1", "u2"]);
  const oldLeg = (a.legs ?? []).find((l) => l.unit === "u1");
  assert.ok(oldLeg !== undefined);
  process.kill(unitOf(pool, "sp").pid, "SIGSTOP");
  await unitOf(pool, "u1").stop();
  await waitFor(
    "the replacement recorded (leg-replacing)",
    async () => ((await recordedEvents(pool.station)).some((e) => e.subject === a.id && e.action === "leg-replacing") ? true : undefined),
    { timeoutMs: WAIT_MS, intervalMs: 50 },
  );
  await pool.station.kill9();
  assert.equal(await sql(pool, "SELECT assignment_id, new_unit FROM leg_replacements"), `${a.id}|sp`, "killed mid-replacement: recorded");
  assert.equal(await sql(pool, `SELECT unit FROM assignment_legs WHERE assignment_id = '${a.id}' AND leg = ${oldLeg.index}`), "u1", "not swapped");
  return { a, index: oldLeg.index };
}

async function restart(pool: Pool): Promise<void> {
  const { host, port } = pool.station.discovery;
  pool.station = await startStation({ dataDir: pool.dataDir, keepData: true, discovery: `${host}:${port}`, extraArgs: pool.args, env: DISCOVERY });
}

/** Waits until leg `index` of `a` is on `unit`; returns the assignment. */
async function legOn(pool: Pool, a: Assignment, index: number, unit: string): Promise<Assignment> {
  return waitFor(
    `leg ${index} of ${a.id} on ${unit}`,
    async () => {
      const now = (await pool.station.api("GET", `/api/v1/assignments/${a.id}`)).body as Assignment;
      return (now.legs ?? [])[index]?.unit === unit ? now : undefined;
    },
    { timeoutMs: WAIT_MS, intervalMs: 100 },
  );
}

/** Nothing half-made or leaked: no replacement recorded, `holder` holds exactly the new leg granted to the host, `empty` nothing, grants match. */
async function settled(pool: Pool, leg: { volume: string }, holder: string, empty: readonly string[], present: readonly string[]): Promise<void> {
  await waitFor(
    `${holder} holds only the new leg, granted to the host; ${empty.join(",") || "nothing"} empty; every grant matches`,
    async () => {
      const held = await unitVolumes(unitOf(pool, holder));
      if (held.length !== 1 || held[0]?.name !== leg.volume || JSON.stringify(held[0]?.grants) !== JSON.stringify([HOST])) return undefined;
      for (const name of empty) if ((await unitVolumes(unitOf(pool, name))).length > 0) return undefined;
      if ((await sql(pool, "SELECT count(*) FROM leg_replacements")) !== "0") return undefined;
      return (await grantsMatch(pool.station, present.map((name) => unitOf(pool, name)))).length === 0 ? true : undefined;
    },
    { timeoutMs: WAIT_MS, intervalMs: 200 },
  );
}

test("a replacement cut by kill -9 of the station is finished after the restart, never half", async () => {
  const pool = await startPool("30000", [["u1", "64M"], ["u2", "64M"], ["sp", "64M", "--spare"]]);
  const { a, index } = await interrupt(pool);
  process.kill(unitOf(pool, "sp").pid, "SIGCONT");
  await restart(pool);
  const finished = await legOn(pool, a, index, "sp");
  const newLeg = (finished.legs ?? [])[index];
  assert.ok(newLeg !== undefined);
  assert.equal(newLeg.state, "rebuilding");
  await settled(pool, newLeg, "sp", [], ["u2", "sp"]);
  const actions = (await recordedEvents(pool.station)).filter((e) => e.subject === a.id).map((e) => e.action);
  assert.ok(actions.indexOf("leg-replacing") < actions.lastIndexOf("leg-replaced"), actions.join(","));
  process.stdout.write(`# events: ${actions.filter((x) => x.startsWith("leg-")).join(" ")}\n`);
});

test("a replacement cut by kill -9 whose unit stays away is undone after the restart, made again elsewhere, and its leftovers deleted", async () => {
  // u3 is larger, so the mirror's legs go to u1 and u2 (best fit); it takes the replacement once the spare is given up.
  const pool = await startPool("3000", [["u1", "64M"], ["u2", "64M"], ["u3", "128M"], ["sp", "64M", "--spare"]]);
  const { a, index } = await interrupt(pool);
  await restart(pool); // sp still stopped: the recorded replacement cannot finish
  const moved = await legOn(pool, a, index, "u3");
  const newLeg = (moved.legs ?? [])[index];
  assert.ok(newLeg !== undefined);
  assert.equal(newLeg.state, "rebuilding");
  const events = (await recordedEvents(pool.station)).filter((e) => e.subject === a.id);
  const undone = events.find((e) => e.action === "leg-replacement-undone");
  assert.ok(undone !== undefined, events.map((e) => e.action).join(","));
  assert.equal(undone.data["unit"], "sp");
  assert.match(String(undone.data["reason"]), /unit sp is unknown and the replacement is older than 3s/);
  process.kill(unitOf(pool, "sp").pid, "SIGCONT");
  // Whatever sp carved for the dead station is deleted once sp is back.
  await settled(pool, newLeg, "u3", ["sp"], ["u2", "u3", "sp"]);
  const actions = (await recordedEvents(pool.station)).filter((e) => e.subject === a.id).map((e) => e.action).filter((x) => x.startsWith("leg-"));
  process.stdout.write(`# events: ${actions.join(" ")}\n`);
  assert.deepEqual(actions.slice(0, 4), ["leg-replacing", "leg-replacement-undone", "leg-replacing", "leg-replaced"]);
});
