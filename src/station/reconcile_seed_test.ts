// The reconcile pass driven from a seed: the real station core (station.ts and its
// parts) on a real SQLite store with an injected ManualClock, and real `ipsan unit`
// processes (one speaking TLS, so grants by host identity; two plaintext, grants by
// address). A seeded sequence of manual assigns, unassigns, unit stops (SIGTERM or
// kill -9, noticed by the station or not) and restarts, hosts moving to new addresses
// and grants changed on a unit behind the station's back runs against it; then every
// unit is brought back, reported as discovery would, and reconcile passes run (the
// clock moved past the pending deadline) until settled. The invariant: nothing is
// left pending or revoking, and the grants on every unit, volume by volume, equal
// what the store's live assignments say (the same comparison as grantsMatch in
// pool_harness.ts, computed here from the store rather than over the REST API).
//
// The seed is printed; IPSAN_RECONCILE_SEED=N replays a run.

import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { controlTokenFor } from "../discovery/keys.ts";
import { controlOk } from "../testing/control.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { ManualClock } from "../util/clock.ts";
import { errorMessage } from "../util/errors.ts";
import { setLogLevel } from "../util/log.ts";
import { seededRandom, type Random } from "../util/random.ts";
import { openDatabase } from "./db.ts";
import { StationMetrics } from "./metrics.ts";
import { grantsOf, unitTlsMode, unitVolumes } from "./pool_harness.ts";
import { Station } from "./station.ts";
import { StationStore, volumesOf } from "./store.ts";
import { UnitClient } from "./unit_client.ts";

const SEED_TEXT = process.env["IPSAN_RECONCILE_SEED"] ?? "";
const SEED = SEED_TEXT === "" ? Math.floor(Math.random() * 1e9) : Number(SEED_TEXT);
const STEPS = 60;
const SETTLE_PASSES_MAX = 10;
const PENDING_DEADLINE_MS = 30_000;
const MIB = 1024 * 1024;
const CLUSTER_KEY = Buffer.alloc(32, 7);
const UNITS = [
  { name: "u1", tls: false },
  { name: "u2", tls: true },
  { name: "u3", tls: false },
] as const;
const HOSTS = [
  { name: "h1", address: "127.0.0.11" },
  { name: "h2", address: "127.0.0.12" },
  { name: "h3", address: "127.0.0.13" },
] as const;
const VOLUMES_PER_UNIT = 3;

interface PoolUnit {
  readonly name: string;
  readonly tls: boolean;
  readonly dir: TempDir;
  process: RunningUnit | null;
}

function pick<T>(random: Random, items: readonly T[]): T {
  const item = items[Math.floor(random() * items.length)];
  if (item === undefined) throw new Error("pick from an empty list");
  return item;
}

async function startPoolUnit(unit: PoolUnit): Promise<RunningUnit> {
  const running = await startUnit({
    name: unit.name,
    capacity: "64M",
    control: true,
    dataDir: unit.dir.path,
    extraArgs: unit.tls ? ["--tls", "require"] : [],
  });
  unit.process = running;
  return running;
}

/** What discovery would report for a running unit: its info, with its control address. */
async function report(station: Station, running: RunningUnit): Promise<void> {
  const control = { host: "127.0.0.1", port: Number(new URL(running.controlUrl ?? "").port) };
  const info = await new UnitClient({ unit: running.name, control, token: controlTokenFor(CLUSTER_KEY, running.name) }).info();
  await station.applyStorageInfo({ ...info, control }, "127.0.0.1", "online", true);
}

/** Unit truth vs the store's live assignments, volume by volume (as grantsMatch, from the store). */
async function grantProblems(station: Station, units: readonly PoolUnit[]): Promise<string[]> {
  const problems: string[] = [];
  const live = [...station.store.live.values()];
  for (const a of live) if (a.state === "pending" || a.state === "revoking") problems.push(`assignment ${a.id} (${a.host} ${a.unit}/${a.volume}) is still ${a.state}`);
  for (const unit of units) {
    const running = unit.process;
    if (running === null) throw new Error(`unit ${unit.name} is not running`);
    const byIdentity = (await unitTlsMode(running)) !== "off";
    for (const volume of await unitVolumes(running)) {
      const holders = live.filter((a) => a.state === "active" && volumesOf(a).some(([u, v]) => u === unit.name && v === volume.name));
      const want = [...new Set(holders.map((a) => (byIdentity ? `id:${a.host}@${a.partition === null ? volume.name : `${volume.name}/p${a.partition}`}` : a.hostAddress)))].sort();
      const have = grantsOf(volume);
      if (JSON.stringify(want) !== JSON.stringify(have)) problems.push(`${unit.name}/${volume.name}: unit grants ${JSON.stringify(have)}, store wants ${JSON.stringify(want)}`);
    }
  }
  return problems;
}

test(`reconcile from a seed (IPSAN_RECONCILE_SEED=${SEED}): after assigns, unassigns, unit stops and starts, every unit's grants equal the store's`, async (t) => {
  t.diagnostic(`seed ${SEED} (replay with IPSAN_RECONCILE_SEED=${SEED})`);
  // The station core logs every refused call of this churn; IPSAN_LOG=info shows them.
  if (process.env["IPSAN_LOG"] === undefined) setLogLevel("error");
  const random = seededRandom(SEED);
  const clock = new ManualClock();
  const storeDir = makeTempDir("reconcile-seed", memoryTmpBase());
  const store = new StationStore(openDatabase(join(storeDir.path, "station.db")), clock);
  const station = new Station(store, new StationMetrics(), {
    clusterKey: CLUSTER_KEY,
    pendingDeadlineMs: PENDING_DEADLINE_MS,
    reconcileIntervalMs: 10_000,
    hostOfflineAfterMs: 30_000,
    unitCallTimeoutMs: 2_000,
  });
  const units: PoolUnit[] = UNITS.map((u) => ({ ...u, dir: makeTempDir(`reconcile-seed-${u.name}`, memoryTmpBase()), process: null }));
  const log: string[] = [];
  try {
    // The pool: each unit's data dir holds the station's derived control token (what a joined unit accepts).
    for (const unit of units) writeFileSync(join(unit.dir.path, "control.token"), `${controlTokenFor(CLUSTER_KEY, unit.name)}\n`, { mode: 0o600 });
    await Promise.all(units.map(async (unit) => report(station, await startPoolUnit(unit))));
    for (const unit of units) for (let i = 0; i < VOLUMES_PER_UNIT; i++) await station.createVolume(unit.name, `v${i}`, 4 * MIB);
    for (const host of HOSTS) await station.putHost(host.name, host.address);

    for (let step = 0; step < STEPS; step++) {
      const roll = random();
      clock.advance(Math.floor(random() * 2_000));
      if (roll < 0.4) {
        const unit = pick(random, units);
        const host = pick(random, HOSTS);
        const volume = `v${Math.floor(random() * VOLUMES_PER_UNIT)}`;
        const outcome = await station.assign({ host: host.name, unit: unit.name, volume }).then(
          (r) => `${r.status} ${r.assignment.id} ${r.assignment.state}`,
          (error: unknown) => `refused: ${errorMessage(error)}`,
        );
        log.push(`${step}: assign ${unit.name}/${volume} to ${host.name}: ${outcome}`);
      } else if (roll < 0.55) {
        const live = [...store.live.values()].filter((a) => a.state === "active" || a.state === "revoking");
        if (live.length === 0) continue;
        const a = pick(random, live.sort((x, y) => x.id.localeCompare(y.id)));
        const outcome = await station.unassign(a.id).then(
          (r) => `${r.status} ${r.assignment.state}`,
          (error: unknown) => `refused: ${errorMessage(error)}`,
        );
        log.push(`${step}: unassign ${a.id} (${a.host} ${a.unit}/${a.volume}): ${outcome}`);
      } else if (roll < 0.7) {
        const unit = pick(random, units);
        if (unit.process === null) {
          await report(station, await startPoolUnit(unit));
          log.push(`${step}: start ${unit.name}`);
        } else {
          const kill = random() < 0.5;
          const noticed = random() < 0.5;
          if (kill) await unit.process.kill9();
          else await unit.process.stop();
          unit.process = null;
          if (noticed) station.setUnitState(unit.name, kill ? "offline" : "down");
          log.push(`${step}: ${kill ? "kill -9" : "stop"} ${unit.name}${noticed ? "" : " (the station not told)"}`);
        }
      } else if (roll < 0.8) {
        // A host moves: its grants follow it (a unit that is away gets them from reconcile).
        const host = pick(random, HOSTS);
        const address = `127.0.${1 + Math.floor(random() * 3)}.${host.name.slice(1)}`;
        const outcome = await station.putHost(host.name, address).then(
          () => "ok",
          (error: unknown) => `refused: ${errorMessage(error)}`,
        );
        log.push(`${step}: host ${host.name} moves to ${address}: ${outcome}`);
      } else if (roll < 0.9) {
        // Someone changes a plaintext unit's grants behind the station's back; the unit's next report shows it.
        const unit = pick(random, units.filter((u) => !u.tls));
        const volume = `v${Math.floor(random() * VOLUMES_PER_UNIT)}`;
        if (unit.process === null) continue;
        const hosts = random() < 0.5 ? [] : ["127.0.0.99"];
        await controlOk(unit.process, "PUT", `/v1/volumes/${volume}/grants`, { hosts });
        await report(station, unit.process);
        log.push(`${step}: ${unit.name}/${volume} grants set to ${JSON.stringify(hosts)} behind the station's back`);
      } else {
        await station.reconcile(true);
        log.push(`${step}: reconcile pass`);
      }
    }

    // Everything back, reported as discovery would; then passes until settled.
    for (const unit of units) {
      const running = unit.process ?? (await startPoolUnit(unit));
      await report(station, running);
    }
    let problems: string[] = [];
    for (let pass = 0; pass < SETTLE_PASSES_MAX; pass++) {
      // Past the pending deadline: a pending assignment that cannot be finished is undone.
      clock.advance(PENDING_DEADLINE_MS + 1);
      await station.reconcile(true);
      problems = await grantProblems(station, units);
      if (problems.length === 0) break;
    }
    assert.deepEqual(problems, [], `seed ${SEED} (IPSAN_RECONCILE_SEED=${SEED}); the steps:\n${log.join("\n")}`);
    const active = [...store.live.values()].filter((a) => a.state === "active").length;
    t.diagnostic(`${log.length} steps, ${active} assignments active at the end`);
  } finally {
    await station.stop();
    await Promise.all(units.map(async (unit) => {
      await unit.process?.close();
      unit.dir.remove();
    }));
    store.close();
    storeDir.remove();
  }
});
