// Proves spare units and zones (issue 6 section 3, station side) with a real
// station and four real `ipsan unit`s joined over discovery:
// - `--spare` and `--zone NAME` travel in the unit's storage-info packet and
//   show in GET /api/v1/units (`spare`, `zone`); a packet without them (a unit
//   from before them) reads as not spare, no zone;
// - ordinary allocation never uses a spare: one copy or a mirror that only
//   the spare could hold is 507 with the reason "spare (...)", and many
//   small allocations never land on it;
// - zones: a mirror's legs go to distinct zones first, even when two units
//   of one zone would fit better; with fewer zones than legs, all zones are
//   used and never two legs share a unit;
// - the flags are checked: --spare/--zone without --station, a bad zone name.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { validateStorageInfo } from "../discovery/storage_info.ts";
import { IPSAN_BIN, type RunningUnit } from "../testing/unit.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { startJoinedUnit, type Assignment } from "./pool_harness.ts";

const HOST = "127.0.0.2";

let station: RunningStation;
let units: RunningUnit[] = [];

interface UnitView {
  name: string;
  spare: boolean;
  zone: string | null;
}

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "1000"] });
  units = await Promise.all([
    // z1 and z2 fit a small leg best (least left behind), but share zone "a".
    startJoinedUnit(station, { name: "z1", capacity: "48M", extraArgs: ["--zone", "a"] }),
    startJoinedUnit(station, { name: "z2", capacity: "48M", extraArgs: ["--zone", "a"] }),
    startJoinedUnit(station, { name: "z3", capacity: "96M", extraArgs: ["--zone", "b"] }),
    // The largest unit, and the only one that could hold a big request: a spare.
    startJoinedUnit(station, { name: "s1", capacity: "256M", extraArgs: ["--spare", "--zone", "c"] }),
  ]);
});
after(async () => {
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
});

test("spare and zone travel in the storage info and show on the unit", async () => {
  const listed = ((await station.api("GET", "/api/v1/units")).body as { items: UnitView[] }).items;
  assert.deepEqual(
    listed.map((u) => [u.name, u.spare, u.zone]),
    [
      ["s1", true, "c"],
      ["z1", false, "a"],
      ["z2", false, "a"],
      ["z3", false, "b"],
    ],
  );
  const one = (await station.api("GET", "/api/v1/units/s1")).body as UnitView;
  assert.equal(one.spare, true);
  // An old packet has neither field: it validates, and nothing is made up for it.
  const old = validateStorageInfo({ name: "old", nbd: { host: "127.0.0.1", port: 1 }, capacityBytes: 1, freeBytes: 1, volumes: [] });
  assert.equal(old.kind, "ok");
  if (old.kind === "ok") {
    assert.equal(old.value.spare, undefined);
    assert.equal(old.value.zone, undefined);
  }
  for (const [field, value] of [["spare", "yes"], ["zone", "bad zone"], ["zone", "x".repeat(64)]] as const) {
    const bad = validateStorageInfo({ name: "old", nbd: { host: "127.0.0.1", port: 1 }, capacityBytes: 1, freeBytes: 1, volumes: [], [field]: value });
    assert.equal(bad.kind, "invalid", `${field}=${value}`);
    if (bad.kind === "invalid") assert.match(bad.detail, new RegExp(`^info\\.${field}:`));
  }
});

test("ordinary allocation never uses a spare", async () => {
  const big = await station.api("POST", "/api/v1/allocations", { requestId: "big", host: "h1", address: HOST, sizeBytes: "128M" });
  assert.equal(big.status, 507, big.text);
  assert.match(errorOf(big.body).reasons?.find((r) => r.unit === "s1")?.reason ?? "", /^spare \(/);
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "big-dry", host: "h1", address: HOST, sizeBytes: "128M", dryRun: true });
  assert.equal(dry.status, 507, dry.text);
  const bigMirror = await station.api("POST", "/api/v1/allocations", { requestId: "big-m", host: "h1", address: HOST, sizeBytes: "60M", copies: 2 });
  assert.equal(bigMirror.status, 507, bigMirror.text);
  assert.match(errorOf(bigMirror.body).reasons?.find((r) => r.unit === "s1")?.reason ?? "", /^spare \(/);
  const small: Assignment[] = [];
  for (let i = 0; i < 6; i++) {
    const answer = await station.api("POST", "/api/v1/allocations", { requestId: `small-${i}`, host: "h1", address: HOST, sizeBytes: "4M" });
    assert.equal(answer.status, 201, answer.text);
    small.push(answer.body as Assignment);
  }
  assert.deepEqual(small.filter((a) => a.unit === "s1"), []);
  for (const a of small) assert.equal((await station.api("DELETE", `/api/v1/assignments/${a.id}`)).status, 204);
});

test("a mirror's legs go to distinct zones first", async () => {
  const two = await station.api("POST", "/api/v1/allocations", { requestId: "zones-2", host: "h1", address: HOST, sizeBytes: "8M", copies: 2 });
  assert.equal(two.status, 201, two.text);
  const legUnits = ((two.body as Assignment).legs ?? []).map((l) => l.unit).sort();
  assert.equal(legUnits.length, 2);
  assert.ok(legUnits.includes("z3"), `legs on ${legUnits.join(",")}: zone b must hold one (z1 and z2 share zone a)`);
  const three = await station.api("POST", "/api/v1/allocations", { requestId: "zones-3", host: "h1", address: HOST, sizeBytes: "8M", copies: 3 });
  assert.equal(three.status, 201, three.text);
  assert.deepEqual(((three.body as Assignment).legs ?? []).map((l) => l.unit).sort(), ["z1", "z2", "z3"]);
});

test("--spare and --zone are checked", () => {
  const run = (args: string[]) => spawnSync(process.execPath, [IPSAN_BIN, "unit", "--data", "/nonexistent-ipsan-test", "--capacity", "16M", "--listen", "127.0.0.1:0", ...args], { encoding: "utf8", timeout: 20_000 });
  const alone = run(["--spare"]);
  assert.notEqual(alone.status, 0);
  assert.match(alone.stderr, /--spare: only meaningful with --discovery/);
  const zone = run(["--zone", "a"]);
  assert.notEqual(zone.status, 0);
  assert.match(zone.stderr, /--zone: only meaningful with --discovery/);
  const bad = run(["--station", "127.0.0.1:9", "--cluster-key-file", "/nonexistent", "--zone", "no spaces"]);
  assert.notEqual(bad.status, 0);
  assert.match(bad.stderr, /--zone: invalid zone "no spaces"/);
});
