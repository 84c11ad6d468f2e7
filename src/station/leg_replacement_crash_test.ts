// Proves that a leg replacement interrupted by kill -9 of the station is
// finished or undone after the restart, never left half-made. Real station
// (`--replace-after 1s`) and three real units (u1, u2, spare sp):
// - mirror A on u1+u2; the test stops sp (SIGSTOP) and shuts u1 down
//   (SIGTERM: the station marks it down at once);
// - after --replace-after the station records the replacement on sp (event
//   leg-replacing) and asks sp to carve the leg: sp does not answer;
// - kill -9 of the station right then (leg-replacing recorded, no
//   leg-replaced); SIGCONT sp (it now carves the volume the dead station
//   asked for); restart the station on the same data and discovery port;
// - then: the replacement is finished (the leg at its index is on sp,
//   "rebuilding", granted to the host) after at most an undo; sp holds no
//   volume but that leg (nothing half-made or leaked); no replacement is left
//   recorded in the database; the units' grants equal the assignments'.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { runOk, waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { FAST_DISCOVERY } from "./leg_replacement_scenario.ts";
import { grantsMatch, recordedEvents, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const HOST = "127.0.0.2";
const STATION_ARGS = ["--replace-after", "1s", "--reconcile-interval-ms", "500", "--pending-deadline-ms", "30000"];
/** Liveness slow enough that the stopped spare stays online (placeable) for a while, fast enough to rejoin quickly. */
const DISCOVERY = { ...FAST_DISCOVERY, IPSAN_DISCOVERY_SUSPECT_MS: "4000", IPSAN_DISCOVERY_OFFLINE_MS: "8000" };
const WAIT_MS = 30_000;

let station: RunningStation;
let dataDir = "";
let units: RunningUnit[] = [];

before(async () => {
  station = await startStation({ keepData: true, extraArgs: STATION_ARGS, env: DISCOVERY });
  dataDir = station.dataDir;
  units = await Promise.all(
    [["u1"], ["u2"], ["sp", "--spare"]].map(([name, ...extraArgs]) =>
      startJoinedUnit(station, { name: name as string, capacity: "64M", extraArgs, env: DISCOVERY }),
    ),
  );
});
after(async () => {
  for (const unit of units) {
    try {
      process.kill(unit.pid, "SIGCONT");
    } catch {
      // already gone
    }
  }
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
  if (dataDir !== "") rmSync(dataDir, { recursive: true, force: true });
});

function unit(name: string): RunningUnit {
  const found = units.find((u) => u.name === name);
  assert.ok(found !== undefined);
  return found;
}

test("a replacement cut by kill -9 of the station is finished or undone after the restart, never half", async () => {
  const answer = await station.api("POST", "/api/v1/allocations", { requestId: "crash-a", host: "h1", address: HOST, sizeBytes: "8M", copies: 2 });
  assert.equal(answer.status, 201, answer.text);
  const a = answer.body as Assignment;
  const oldLeg = (a.legs ?? []).find((l) => l.unit === "u1");
  assert.ok(oldLeg !== undefined);

  process.kill(unit("sp").pid, "SIGSTOP");
  await unit("u1").stop();
  await waitFor(
    "the replacement recorded (leg-replacing)",
    async () => ((await recordedEvents(station)).some((e) => e.subject === a.id && e.action === "leg-replacing") ? true : undefined),
    { timeoutMs: WAIT_MS, intervalMs: 50 },
  );
  await station.kill9();
  const before = (await runOk("sqlite3", [`${dataDir}/station.db`, "SELECT assignment_id, new_unit FROM leg_replacements"], { timeoutMs: 10_000 })).stdout.trim();
  assert.equal(before, `${a.id}|sp`, "killed mid-replacement: recorded, not swapped");
  const legThen = (await runOk("sqlite3", [`${dataDir}/station.db`, `SELECT unit FROM assignment_legs WHERE assignment_id = '${a.id}' AND leg = ${oldLeg.index}`], { timeoutMs: 10_000 })).stdout.trim();
  assert.equal(legThen, "u1");
  process.kill(unit("sp").pid, "SIGCONT");

  station = await startStation({ dataDir, keepData: true, discovery: `${station.discovery.host}:${station.discovery.port}`, extraArgs: STATION_ARGS, env: DISCOVERY });
  const finished = await waitFor(
    "the replacement finished after the restart",
    async () => {
      const now = (await station.api("GET", `/api/v1/assignments/${a.id}`)).body as Assignment;
      const leg = (now.legs ?? [])[oldLeg.index];
      return leg?.unit === "sp" ? now : undefined;
    },
    { timeoutMs: WAIT_MS, intervalMs: 100 },
  );
  const newLeg = (finished.legs ?? [])[oldLeg.index];
  assert.equal(newLeg?.state, "rebuilding");
  const left = (await runOk("sqlite3", [`${dataDir}/station.db`, "SELECT count(*) FROM leg_replacements"], { timeoutMs: 10_000 })).stdout.trim();
  assert.equal(left, "0", "no replacement left recorded");
  // sp holds exactly the new leg, granted to the host: nothing half-made, nothing leaked (an undone attempt is deleted).
  const live = [unit("u2"), unit("sp")];
  await waitFor(
    "the spare holds only the new leg, granted to the host, and every grant matches",
    async () => {
      const onSpare = await unitVolumes(unit("sp"));
      if (onSpare.length !== 1 || onSpare[0]?.name !== newLeg?.volume || JSON.stringify(onSpare[0]?.grants) !== JSON.stringify([HOST])) return undefined;
      return (await grantsMatch(station, live)).length === 0 ? true : undefined;
    },
    { timeoutMs: WAIT_MS, intervalMs: 200 },
  );
  const actions = (await recordedEvents(station)).filter((e) => e.subject === a.id).map((e) => e.action);
  assert.ok(actions.includes("leg-replaced"), actions.join(","));
  assert.ok(actions.indexOf("leg-replacing") < actions.lastIndexOf("leg-replaced"), actions.join(","));
  process.stdout.write(`# events: ${actions.filter((x) => x.startsWith("leg-")).join(" ")}\n`);
});
