// Proves that mirrored allocations are all-or-none across a kill -9 of the
// station (issue 6 sections 1 and 5), as crash_test.ts does for single
// copies. A real station and three real units; six clients send allocations
// with copies 2 (each host with its own loopback address); the station is
// killed with SIGKILL as soon as six have been answered, while others are in
// flight (recorded pending with both legs, some legs carved, some granted).
// It restarts on the same data directory and discovery port. Then: every
// acknowledged mirror is there, active, with the same legs, all in-sync; the
// reconcile loop leaves no pending assignment; each unit's grants equal the
// station's assignments leg by leg; no leg volume exists on a unit without a
// live assignment holding it (a half-made mirror was finished or entirely
// undone); retrying every unanswered request id gives exactly one live
// mirror per request, each with two legs of size + 1 MiB on two units.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { runOk, waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, heldVolumes, liveAssignments, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const MIB = 1024 * 1024;
const REQUESTS = 30;
const WORKERS = 6;
const KILL_AFTER_ACKS = 6;
const STATION_ARGS = ["--pending-deadline-ms", "8000", "--reconcile-interval-ms", "300"];

let station: RunningStation;
let units: RunningUnit[] = [];
let dataDir = "";

before(async () => {
  station = await startStation({ keepData: true, extraArgs: STATION_ARGS });
  dataDir = station.dataDir;
  units = await Promise.all(["k1", "k2", "k3"].map((name) => startJoinedUnit(station, { name, capacity: "512M" })));
});
after(async () => {
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
  if (dataDir !== "") rmSync(dataDir, { recursive: true, force: true });
});

function request(i: number) {
  return { requestId: `mburst-${i}`, host: `mh${i}`, sizeBytes: "8M", address: `127.0.2.${i + 1}`, copies: 2 };
}

async function sql(query: string): Promise<string> {
  return (await runOk("sqlite3", [`${dataDir}/station.db`, query], { timeoutMs: 10_000 })).stdout.trim();
}

test("kill -9 during mirrored allocations: acknowledged mirrors stay whole, half-made ones are finished or undone", { timeout: 180_000 }, async () => {
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
        if (response.status === 201) acknowledged.set(`mburst-${i}`, response.body as Assignment);
        else unanswered.push(i);
      } catch {
        unanswered.push(i);
      }
      if (acknowledged.size >= KILL_AFTER_ACKS && killed === null) killed = station.kill9();
    }
  };
  await Promise.all(Array.from({ length: WORKERS }, worker));
  await (killed as Promise<void> | null);
  assert.ok(acknowledged.size >= KILL_AFTER_ACKS, `acknowledged ${acknowledged.size}`);
  assert.ok(unanswered.length > 0, "some requests were cut off by the kill");
  const pendingLegs = await sql("SELECT count(*) FROM assignment_legs l JOIN assignments a ON a.id = l.assignment_id WHERE a.state = 'pending'");
  const pendingMirrors = await sql("SELECT count(*) FROM assignments WHERE state = 'pending'");
  // How many legs of the pending mirrors the units had made when the station died (half-made mirrors).
  const pendingLegNames = (await sql("SELECT l.unit || '/' || l.volume FROM assignment_legs l JOIN assignments a ON a.id = l.assignment_id WHERE a.state = 'pending'"))
    .split("\n")
    .filter((line) => line !== "");
  const onUnits = new Set<string>();
  for (const unit of units) for (const v of await unitVolumes(unit)) onUnits.add(`${unit.name}/${v.name}`);
  const made = pendingLegNames.filter((name) => onUnits.has(name)).length;
  process.stderr.write(
    `mirror crash test: ${acknowledged.size} acknowledged, ${unanswered.length} unanswered, ${pendingMirrors} mirrors (${pendingLegs} legs) pending at the kill, ${made} of those legs already made on their units\n`,
  );
  // Every pending mirror was recorded with all of its legs, in one transaction.
  assert.equal(await sql("SELECT count(*) FROM assignments a WHERE a.copies = 2 AND (SELECT count(*) FROM assignment_legs l WHERE l.assignment_id = a.id) <> 2"), "0");

  station = await startStation({ dataDir, keepData: true, discovery: `${station.discovery.host}:${station.discovery.port}`, extraArgs: STATION_ARGS });
  await waitFor(
    "units back online after the station restart",
    async () => {
      const body = (await station.api("GET", "/api/v1/units")).body as { items: { state: string }[] };
      return body.items.length === 3 && body.items.every((u) => u.state === "online") ? true : undefined;
    },
    { timeoutMs: 15_000 },
  );
  await waitFor("no pending assignment after reconcile", async () => ((await liveAssignments(station, "?state=pending")).length === 0 ? true : undefined), {
    timeoutMs: 30_000,
  });

  for (const [requestId, answered] of acknowledged) {
    const response = await station.api("GET", `/api/v1/assignments/${answered.id}`);
    assert.equal(response.status, 200, `${requestId}: ${response.text}`);
    const now = response.body as Assignment;
    assert.equal(now.state, "active", requestId);
    assert.deepEqual(now.legs, answered.legs, `${requestId}: the same legs`);
    assert.ok(now.legs?.every((l) => l.state === "in-sync"));
  }
  // A half-made mirror leaves no leg behind: every leg volume on a unit belongs to a live assignment.
  const orphans = async (): Promise<string[]> => {
    const held = new Set((await liveAssignments(station)).flatMap((a) => heldVolumes(a).map((h) => `${h.unit}/${h.volume}`)));
    const out: string[] = [];
    for (const unit of units) for (const v of await unitVolumes(unit)) if (v.name.startsWith("h-") && !held.has(`${unit.name}/${v.name}`)) out.push(`${unit.name}/${v.name}`);
    return out;
  };
  await waitFor("no orphaned leg volume", async () => ((await orphans()).length === 0 ? true : undefined), { timeoutMs: 10_000 }).catch(async (error: unknown) => {
    throw new Error(`${(error as Error).message}: ${(await orphans()).join(", ")}`);
  });
  await waitFor("unit grants equal the station's assignments", async () => ((await grantsMatch(station, units)).length === 0 ? true : undefined), {
    timeoutMs: 10_000,
  }).catch(async (error: unknown) => {
    throw new Error(`${(error as Error).message}: ${(await grantsMatch(station, units)).join("; ")}`);
  });

  for (const i of unanswered) {
    const response = await station.api("POST", "/api/v1/allocations", request(i));
    assert.ok(response.status === 200 || response.status === 201, `retry mburst-${i}: ${response.status} ${response.text}`);
    assert.equal((response.body as Assignment).state, "active");
  }
  const live = await liveAssignments(station);
  assert.equal(live.length, REQUESTS, "one live assignment per request");
  const byRequest = new Map<string, number>();
  const byVolume = new Map<string, string>();
  for (const a of live) {
    byRequest.set(a.requestId ?? a.id, (byRequest.get(a.requestId ?? a.id) ?? 0) + 1);
    assert.equal(a.copies, 2);
    assert.equal(a.legs?.length, 2, `${a.id}: two legs`);
    assert.notEqual(a.legs?.[0]?.unit, a.legs?.[1]?.unit, `${a.id}: on two units`);
    for (const leg of a.legs ?? []) {
      assert.equal(leg.sizeBytes, 9 * MIB);
      const key = `${leg.unit}/${leg.volume}`;
      assert.equal(byVolume.get(key), undefined, `volume ${key} held by one mirror`);
      byVolume.set(key, a.id);
    }
  }
  for (const [id, count] of byRequest) assert.equal(count, 1, `${id}: ${count} live assignments`);
  assert.deepEqual(await orphans(), []);
  assert.deepEqual(await grantsMatch(station, units), []);
});
