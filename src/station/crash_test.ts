// Proves that kill -9 of the station during a burst of allocations loses no
// acknowledged assignment and leaves none half-made. A real station and two
// real units; six clients send allocation requests (each host with its own
// loopback address); the station is killed with SIGKILL as soon as eight have
// been answered, while others are in flight (recorded pending, volume maybe
// carved, grant maybe put). It restarts on the same data directory and
// discovery port. Then: every acknowledged assignment is there, active, on
// the same unit and volume; the reconcile loop leaves no pending assignment;
// each unit's grants equal the station's assignments volume by volume;
// retrying every unanswered request id gives exactly one live assignment per
// request; and no carved volume is left without an assignment.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { runOk, waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, liveAssignments, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const REQUESTS = 40;
const WORKERS = 6;
const KILL_AFTER_ACKS = 8;
const STATION_ARGS = ["--pending-deadline-ms", "8000", "--reconcile-interval-ms", "300"];

let station: RunningStation;
let units: RunningUnit[] = [];
let dataDir = "";

before(async () => {
  station = await startStation({ keepData: true, extraArgs: STATION_ARGS });
  dataDir = station.dataDir;
  units = await Promise.all([
    startJoinedUnit(station, { name: "c1", capacity: "512M" }),
    startJoinedUnit(station, { name: "c2", capacity: "512M" }),
  ]);
});
after(async () => {
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
  const { rmSync } = await import("node:fs");
  if (dataDir !== "") rmSync(dataDir, { recursive: true, force: true });
});

function request(i: number) {
  return { requestId: `burst-${i}`, host: `h${i}`, sizeBytes: "8M", address: `127.0.1.${i + 1}` };
}

test("kill -9 during allocations: nothing acknowledged is lost, nothing half-made survives", async () => {
  const acknowledged = new Map<string, Assignment>();
  const unanswered: number[] = [];
  let next = 0;
  let killed: Promise<void> | null = null;
  const worker = async (): Promise<void> => {
    for (;;) {
      const i = next++;
      if (i >= REQUESTS) return;
      if (killed !== null) {
        unanswered.push(i);
        continue;
      }
      try {
        const response = await station.api("POST", "/api/v1/allocations", request(i));
        if (response.status === 201) acknowledged.set(`burst-${i}`, response.body as Assignment);
        else unanswered.push(i);
      } catch {
        unanswered.push(i);
      }
      if (acknowledged.size >= KILL_AFTER_ACKS && killed === null) killed = station.kill9();
    }
  };
  await Promise.all(Array.from({ length: WORKERS }, worker));
  // Set inside the workers' closures: TypeScript narrows it to null here.
  await (killed as Promise<void> | null);
  assert.ok(acknowledged.size >= KILL_AFTER_ACKS, `acknowledged ${acknowledged.size}`);
  assert.ok(unanswered.length > 0, "some requests were cut off by the kill");
  const pendingAtKill = await runOk("sqlite3", [`${dataDir}/station.db`, "SELECT count(*) FROM assignments WHERE state = 'pending'"], { timeoutMs: 10_000 });
  process.stderr.write(`crash test: ${acknowledged.size} acknowledged, ${unanswered.length} unanswered, ${pendingAtKill.stdout.trim()} pending at the kill\n`);

  station = await startStation({ dataDir, keepData: true, discovery: `${station.discovery.host}:${station.discovery.port}`, extraArgs: STATION_ARGS });
  await waitFor(
    "units back online after the station restart",
    async () => {
      const body = (await station.api("GET", "/api/v1/units")).body as { items: { state: string }[] };
      return body.items.length === 2 && body.items.every((u) => u.state === "online") ? true : undefined;
    },
    { timeoutMs: 15_000 },
  );
  await waitFor("no pending assignment after reconcile", async () => ((await liveAssignments(station, "?state=pending")).length === 0 ? true : undefined), {
    timeoutMs: 20_000,
  });

  for (const [requestId, answered] of acknowledged) {
    const response = await station.api("GET", `/api/v1/assignments/${answered.id}`);
    assert.equal(response.status, 200, `${requestId}: ${response.text}`);
    const now = response.body as Assignment;
    assert.equal(now.state, "active", requestId);
    assert.equal(now.unit, answered.unit);
    assert.equal(now.volume, answered.volume);
    assert.deepEqual(now.extents, answered.extents);
  }
  await waitFor("unit grants equal the station's assignments", async () => ((await grantsMatch(station, units)).length === 0 ? true : undefined), {
    timeoutMs: 10_000,
  }).catch(async (error: unknown) => {
    throw new Error(`${(error as Error).message}: ${(await grantsMatch(station, units)).join("; ")}`);
  });

  for (const i of unanswered) {
    const response = await station.api("POST", "/api/v1/allocations", request(i));
    assert.ok(response.status === 200 || response.status === 201, `retry burst-${i}: ${response.status} ${response.text}`);
    assert.equal((response.body as Assignment).state, "active");
  }
  const live = await liveAssignments(station);
  const byRequest = new Map<string, number>();
  const byVolume = new Map<string, string>();
  for (const a of live) {
    byRequest.set(a.requestId ?? a.id, (byRequest.get(a.requestId ?? a.id) ?? 0) + 1);
    const key = `${a.unit}/${a.volume}`;
    assert.equal(byVolume.get(key) ?? a.host, a.host, `volume ${key} held by one host`);
    byVolume.set(key, a.host);
  }
  assert.equal(live.length, REQUESTS, "one live assignment per request");
  for (const [id, count] of byRequest) assert.equal(count, 1, `${id}: ${count} live assignments`);
  for (const unit of units) {
    for (const volume of await unitVolumes(unit)) {
      if (!volume.name.startsWith("h-")) continue;
      assert.ok(byVolume.has(`${unit.name}/${volume.name}`), `carved volume ${unit.name}/${volume.name} has an assignment`);
    }
  }
  assert.deepEqual(await grantsMatch(station, units), []);
});
