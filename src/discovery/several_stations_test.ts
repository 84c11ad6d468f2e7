// Issue 11, the unit side: `ipsan unit --discovery P1,P2` sends every
// discovery datagram to both addresses, so it stays registered and online at
// whichever station is leading, through the loss of either, without a
// restart. "A new leader with the same state" is a second station started on
// a copy of the first one's data directory (what etcd will share), on the
// other discovery address. With the DEFAULT timers (heartbeat 1 s):
//   station 1 on P1 (nobody on P2): the unit joins, enrols, gets a volume;
//   kill -9 station 1; copy its data dir; station 2 on P2 from the copy:
//   the unit (same process) is online there with its volumes and the
//   allocation, no impostor or key-refused event, no refusal on the unit;
//   then the other way round (kill -9 station 2, a station on P1 from a copy
//   of station 2's data). The time from the new station's ready line to the
//   unit online in it is measured and printed (docs/OPERATIONS.md
//   "Several stations" cites it); the test fails above SWITCH_MS_MAX.
// Canary: a unit built to send to its first address only (the behaviour
// before issue 11) must fail the scenario (never online at station 2).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { cpSync } from "node:fs";
import { startStation, type RunningStation } from "../station/harness.ts";
import { recordedEvents, startJoinedUnit, unitVolumes, type StationUnit } from "../station/pool_harness.ts";
import { freeUdpPort } from "../testing/daemon.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { waitFor } from "../testing/process.ts";
import { patchedBuild, type PatchedBuild } from "../testing/patched_build.ts";
import type { RunningUnit } from "../testing/unit.ts";

/** With the default heartbeat (1 s) the unit is heard within one interval of the new station listening. */
const SWITCH_MS_MAX = 5_000;
const ONLINE_TIMEOUT_MS = 20_000;

const tmp = makeTempDir("several-stations", memoryTmpBase());
const stations: RunningStation[] = [];
const units: RunningUnit[] = [];
const builds: PatchedBuild[] = [];

after(async () => {
  for (const unit of units) await unit.close().catch(() => undefined);
  for (const station of stations) await station.close().catch(() => undefined);
  for (const build of builds) build.remove();
  tmp.remove();
});

async function stationOn(discovery: string, dataDir: string): Promise<RunningStation> {
  const station = await startStation({ dataDir, discovery, keepData: true });
  stations.push(station);
  return station;
}

/** Polls the station until it lists the unit online with `volumes` volumes; resolves with the ms it took. */
async function onlineIn(station: RunningStation, name: string, volumes: number, timeoutMs = ONLINE_TIMEOUT_MS): Promise<number> {
  const started = Date.now();
  await waitFor(
    `unit ${name} online at the station on udp://${station.discovery.host}:${station.discovery.port}`,
    async () => {
      const response = await station.api("GET", `/api/v1/units/${name}`);
      const body = response.body as (StationUnit & { volumes: unknown[] }) | undefined;
      return response.status === 200 && body?.state === "online" && body.volumes.length >= volumes ? true : undefined;
    },
    { timeoutMs, intervalMs: 50 },
  );
  return Date.now() - started;
}

/** The last stored event's sequence number (the copy carries the events before it). */
async function lastSeq(station: RunningStation): Promise<number> {
  return (await recordedEvents(station)).at(-1)?.seq ?? 0;
}

/** Identity events after `since`: a second enrolment, an impostor, a refused key (none is expected). */
async function identityTrouble(station: RunningStation, since: number): Promise<string[]> {
  return (await recordedEvents(station, since))
    .filter((e) => e.action === "unit-impostor" || e.action === "unit-key-refused" || e.action === "unit-enrolling")
    .map((e) => `${e.action} ${e.subject}`);
}

/** The scenario; resolves with the two switch times (ms from the new station's ready line to the unit online in it). */
async function scenario(name: string, options: { ipsanBin?: string; onlineTimeoutMs?: number } = {}): Promise<[number, number]> {
  const p1 = await freeUdpPort();
  const p2 = await freeUdpPort();
  assert.notEqual(p1, p2);
  const addresses = `127.0.0.1:${p1},127.0.0.1:${p2}`;
  const dir1 = tmp.file(`${name}-s1`);
  const s1 = await stationOn(`127.0.0.1:${p1}`, dir1);
  const unit = await startJoinedUnit(s1, {
    name,
    capacity: "64M",
    volumes: [{ name: "keep", size: "4M" }],
    // After the harness's --discovery (station 1 only): the last one given wins.
    extraArgs: ["--discovery", addresses],
    ...(options.ipsanBin === undefined ? {} : { ipsanBin: options.ipsanBin }),
  });
  units.push(unit);
  const pid = unit.pid;
  // Enrolled at station 1 (its own secret), then an allocation to carry over.
  await waitFor(`unit ${name} enrolled`, async () => ((await recordedEvents(s1)).some((e) => e.action === "unit-enrolled" && e.subject === name) ? true : undefined), { timeoutMs: 10_000 });
  assert.equal((await s1.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.9" })).status, 201);
  const allocated = await s1.api("POST", "/api/v1/allocations", { requestId: "several-1", host: "h1", sizeBytes: "8M" });
  assert.equal(allocated.status, 201, allocated.text);
  const assignment = allocated.body as { id: string; volume: string };
  await onlineIn(s1, name, 2);

  /** The old station dies (kill -9); one with a copy of its state starts on `port`: the unit must be online there. */
  const takeOver = async (old: RunningStation, port: number, dir: string): Promise<{ station: RunningStation; switchMs: number; totalMs: number }> => {
    const since = await lastSeq(old);
    const killed = Date.now();
    await old.kill9();
    cpSync(old.dataDir, dir, { recursive: true });
    const station = await stationOn(`127.0.0.1:${port}`, dir);
    const switchMs = await onlineIn(station, name, 2, options.onlineTimeoutMs);
    const totalMs = Date.now() - killed;
    // The new station knew the unit: no second enrolment, no impostor, no refused key.
    assert.deepEqual(await identityTrouble(station, since), []);
    return { station, switchMs, totalMs };
  };
  // Station 1 dies, a station on P2 takes over; then back the other way, onto P1.
  const { station: s2, switchMs: switch1Ms, totalMs: total1Ms } = await takeOver(s1, p2, tmp.file(`${name}-s2`));
  const { station: s3, switchMs: switch2Ms, totalMs: total2Ms } = await takeOver(s2, p1, tmp.file(`${name}-s3`));
  process.stdout.write(
    `# several stations: unit online at the new station ${switch1Ms} ms and ${switch2Ms} ms after its ready line ` +
      `(${total1Ms} ms and ${total2Ms} ms after the kill -9, the copy and the new station's start included; default timers)\n`,
  );

  assert.ok(unit.running() && unit.pid === pid, "the same unit process throughout");
  assert.ok(switch1Ms <= SWITCH_MS_MAX && switch2Ms <= SWITCH_MS_MAX, `switches took ${switch1Ms} and ${switch2Ms} ms (max ${SWITCH_MS_MAX})`);
  // Its volumes and the allocation are intact, in the station's view and the unit's.
  const volumes = (await unitVolumes(unit)).map((v) => v.name).sort();
  assert.deepEqual(volumes, ["keep", assignment.volume].sort());
  const listed = await s3.api("GET", `/api/v1/assignments/${assignment.id}`);
  assert.equal(listed.status, 200, listed.text);
  const view = (await s3.api("GET", `/api/v1/units/${name}`)).body as { volumes: { name: string }[] };
  assert.deepEqual(view.volumes.map((v) => v.name).sort(), volumes);
  assert.doesNotMatch(unit.stderr(), /station refused/);
  await unit.close();
  for (const station of [s1, s2, s3]) await station.close();
  return [switch1Ms, switch2Ms];
}

test("a unit given two discovery addresses stays online through the loss of either station, without a restart", { timeout: 180_000 }, async () => {
  await scenario("mu1");
});

test("canary: a unit that sends to its first discovery address only is lost when that station dies", { timeout: 180_000 }, async () => {
  const build = patchedBuild("canary-first-address", [
    { file: "dist/discovery/unit_agent.js", from: "for (const address of this.stationAddresses) {", to: "for (const address of this.stationAddresses.slice(0, 1)) {" },
  ]);
  builds.push(build);
  await assert.rejects(scenario("mu2", { ipsanBin: build.ipsanBin, onlineTimeoutMs: 6_000 }), /unit mu2 online at the station on udp:\/\/127\.0\.0\.1:[0-9]+/);
});
