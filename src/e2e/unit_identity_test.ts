// Proves issue 7's unit promises with real processes on loopback (scenarios in
// unit_identity_scenario.ts; their canaries in unit_identity_canary_test.ts):
// - a unit enrols at first join: its id (volume table) is the station's record,
//   its own secret is in DATA/unit.secret (0600);
// - a duplicate name with another data dir is refused (message on the
//   impostor's stderr, event, log) and the known unit keeps its state, volumes
//   and assignment while the impostor runs and after it stops;
// - a unit's data dir and the cluster key open no other unit's control API
//   (401) and get no datagram in another unit's name accepted;
// - rotating a unit's secret keeps it online; rotating the cluster key keeps
//   enrolled units working and shuts out the old key;
// - a unit whose table has no id and that has no secret (before issue 7)
//   upgrades in place; a unit whose data dir was lost is let in after
//   `ipsan units forget`.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { startStation } from "../station/harness.ts";
import { waitFor } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { IPSAN_BIN, startUnit } from "../testing/unit.ts";
import { Storage } from "../unit/storage.ts";
import { TableStore } from "../unit/table_store.ts";
import { UNIT_ID_PATTERN } from "../unit/table.ts";
import {
  TIMERS,
  identityOf,
  impostorScenario,
  joinUnit,
  perUnitKeyScenario,
  poolUnit,
  startBed,
  storedSecret,
  unitInfo,
  waitEnrolled,
  type Register,
} from "./unit_identity_scenario.ts";

const closers: (() => Promise<void>)[] = [];
const register: Register = (close) => closers.push(close);
after(async () => {
  for (const close of closers.reverse()) await close().catch(() => undefined);
});

/** The CLI without blocking the event loop (the station answers the test's own calls meanwhile). */
function ipsanAsync(args: readonly string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [IPSAN_BIN, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.on("exit", (code) => {
      clearTimeout(timer);
      resolve({ status: code, stdout, stderr });
    });
  });
}

function ipsan(args: readonly string[]): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(process.execPath, [IPSAN_BIN, ...args], { encoding: "utf8", timeout: 20_000 });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

test("a unit enrols at first join: the station records its id, the unit keeps its own secret (0600)", async () => {
  const bed = await startBed(register);
  const unit = await joinUnit(bed, register, "e1");
  const identity = await waitEnrolled(bed.station, unit);
  const info = await unitInfo(unit);
  assert.match(info.unitId, UNIT_ID_PATTERN);
  assert.equal(identity.unitId, info.unitId);
  const stored = storedSecret(unit);
  assert.deepEqual([stored.unit, stored.unitId, stored.epoch, stored.secret.length], ["e1", info.unitId, 1, 32]);
  assert.equal(statSync(join(unit.dataDir, "unit.secret")).mode & 0o777, 0o600);
  // A restart keeps the identity and the secret: no new enrolment.
  await unit.stop();
  const again = await joinUnit(bed, register, "e1", { dataDir: unit.dataDir });
  assert.equal((await unitInfo(again)).unitId, info.unitId);
  assert.deepEqual(await identityOf(bed.station, "e1"), { ...identity });
});

test("a duplicate unit name with another data dir is refused; the known unit keeps its state, volumes and assignment", async () => {
  await impostorScenario(register);
});

test("a unit's data dir and the cluster key open no other unit's control API and get no datagram in its name accepted", async () => {
  await perUnitKeyScenario(register);
});

test("rotating a unit's secret keeps it online; the station's control calls use the new secret", async () => {
  const bed = await startBed(register);
  const unit = await joinUnit(bed, register, "r1");
  await waitEnrolled(bed.station, unit);
  const before = storedSecret(unit);
  const tokenFile = join(bed.station.dataDir, "admin.token");
  // Control calls of the station go on throughout the rotation: none may be refused.
  let calling = true;
  const calls: string[] = [];
  const caller = (async () => {
    while (calling) {
      const response = await bed.station.api("POST", "/api/v1/units/r1/refresh", {});
      calls.push(`${response.status} ${(response.body as { state?: string }).state}`);
    }
  })();
  const t0 = Date.now();
  const rotated = await ipsanAsync(["units", "rotate-secret", "r1", "--station", bed.station.url, "--token-file", tokenFile]);
  assert.equal(rotated.status, 0, rotated.stderr);
  let looks = 0;
  await waitFor("r1 at epoch 2", async () => {
    assert.equal((await poolUnit(bed.station, "r1"))?.state, "online", "online throughout the rotation");
    looks += 1;
    const identity = await identityOf(bed.station, "r1");
    return identity?.epoch === 2 && identity.state === "enrolled" ? true : undefined;
  }, { timeoutMs: 5_000, intervalMs: 20 });
  const rotatedMs = Date.now() - t0;
  const after = storedSecret(unit);
  assert.equal(after.epoch, 2);
  assert.notDeepEqual(after.secret, before.secret);
  for (let i = 0; i < 10; i++) {
    assert.equal((await poolUnit(bed.station, "r1"))?.state, "online");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  calling = false;
  await caller;
  assert.ok(calls.length >= 5, `${calls.length} control calls during the rotation`);
  assert.deepEqual(calls.filter((call) => call !== "200 online"), [], "no control call refused, the unit online, throughout the rotation");
  const refreshed = await bed.station.api("POST", "/api/v1/units/r1/refresh", {});
  assert.equal(refreshed.status, 200, `a control call after the rotation: ${refreshed.text}`);
  const created = await bed.station.api("POST", "/api/v1/volumes", { unit: "r1", name: "after", sizeBytes: 4 * 1024 * 1024 });
  assert.equal(created.status, 201, created.text);
  process.stdout.write(`# rotation done in ${rotatedMs} ms from the command (${looks} looks, online at each; ${calls.length} control calls, all 200 with the unit online)\n`);
});

test("rotating the cluster key: enrolled units keep working; a new unit needs the new key", async () => {
  const stationDir = makeTempDir("unitid-station", memoryTmpBase());
  register(async () => stationDir.remove());
  let station = await startStation({ env: TIMERS, dataDir: stationDir.path, keepData: true });
  const bed = { station, units: new Map() };
  const unit = await joinUnit(bed, register, "k1");
  await waitEnrolled(station, unit);
  const oldKey = join(stationDir.path, "old-cluster.key");
  copyFileSync(station.clusterKeyFile(), oldKey);
  const discovery = `${station.discovery.host}:${station.discovery.port}`;
  await station.stop();
  const rotated = ipsan(["station", "rotate-cluster-key", "--data", stationDir.path]);
  assert.equal(rotated.status, 0, rotated.stderr);
  station = await startStation({ env: TIMERS, dataDir: stationDir.path, keepData: true, discovery });
  register(() => station.close());
  const bed2 = { station, units: new Map() };
  await waitFor("k1 back online with its own secret", async () => ((await poolUnit(station, "k1"))?.state === "online" ? true : undefined), { timeoutMs: 10_000 });
  const refreshed = await station.api("POST", "/api/v1/units/k1/refresh", {});
  assert.equal(refreshed.status, 200, refreshed.text);
  const stale = await joinUnit(bed2, register, "k2", { clusterKeyFile: oldKey, waitOnline: false });
  await new Promise((resolve) => setTimeout(resolve, 1_500));
  assert.equal(await poolUnit(station, "k2"), undefined, "a unit with the old cluster key does not join");
  assert.equal(await identityOf(station, "k2"), undefined);
  await stale.stop();
  const fresh = await joinUnit(bed2, register, "k3");
  await waitEnrolled(station, fresh);
});

test("a unit from before identities (table without an id, no secret) upgrades in place", async () => {
  const dataDir = makeTempDir("unitid-old", memoryTmpBase());
  register(async () => dataDir.remove());
  // A standalone unit makes its storage and a volume; then its table is put back as before issue 7 (no unitId).
  const standalone = await startUnit({ name: "o1", capacity: "64M", volumes: [{ name: "old1", size: "4M" }], dataDir: dataDir.path });
  await standalone.stop();
  const opened = Storage.openFile(join(dataDir.path, "storage.img"), undefined);
  try {
    const loaded = await TableStore.load(opened.storage);
    assert.equal(loaded.kind, "loaded");
    if (loaded.kind !== "loaded") return;
    const { unitId: _dropped, ...old } = loaded.table;
    await TableStore.rewrite(opened.storage, old, loaded.store.generation + 1, [0, 1]);
    const check = await TableStore.load(opened.storage);
    assert.equal(check.kind === "loaded" ? check.table.unitId : "?", undefined, "the table is as before issue 7");
  } finally {
    opened.storage.closeSync();
  }
  assert.equal(existsSync(join(dataDir.path, "unit.secret")), false);
  const bed = await startBed(register);
  const unit = await joinUnit(bed, register, "o1", { dataDir: dataDir.path, volumes: [{ name: "old1", size: "4M" }] });
  const identity = await waitEnrolled(bed.station, unit);
  assert.equal((await unitInfo(unit)).unitId, identity.unitId);
  assert.deepEqual((await poolUnit(bed.station, "o1"))?.volumes.map((v) => v.name), ["old1"]);
  await unit.stop();
  const reopened = Storage.openFile(join(dataDir.path, "storage.img"), undefined);
  try {
    const loaded = await TableStore.load(reopened.storage);
    assert.equal(loaded.kind === "loaded" ? loaded.table.unitId : "?", identity.unitId, "the id is in the table on disk");
  } finally {
    reopened.storage.closeSync();
  }
});

test("a unit whose data dir was lost is refused until `ipsan units forget`, then enrols", async () => {
  const bed = await startBed(register);
  const first = await joinUnit(bed, register, "l1");
  const firstIdentity = await waitEnrolled(bed.station, first);
  await first.kill9();
  rmSync(first.dataDir, { recursive: true, force: true });
  const replacement = await joinUnit(bed, register, "l1", { waitOnline: false });
  await waitFor("the replacement is refused", () => (replacement.stderr().includes("station refused: unit name l1 is enrolled with another identity") ? true : undefined), { timeoutMs: 5_000 });
  const tokenFile = join(bed.station.dataDir, "admin.token");
  const forgot = ipsan(["units", "forget", "l1", "--station", bed.station.url, "--token-file", tokenFile]);
  assert.equal(forgot.status, 0, forgot.stderr);
  assert.match(forgot.stdout, /forgotten/);
  const identity = await waitEnrolled(bed.station, replacement);
  assert.notEqual(identity.unitId, firstIdentity.unitId);
  await waitFor("the replacement online", async () => ((await poolUnit(bed.station, "l1"))?.state === "online" ? true : undefined), { timeoutMs: 10_000 });
});
