// The statistics collector (collector.ts) driven by ManualClock over a
// scripted source (units whose counters the test moves): polls come every
// pollIntervalMs and the pool every poolStepMs; the series keep exactly
// their bounded number of points and the windows cut them; a unit that fails
// a poll leaves a gap and one away longer than the series' span starts again
// without a point spanning its absence, and a failing unit is asked less and
// less often (after 1, 2, 4, 8 rounds); no more than
// `concurrency` polls run at once; a unit gone for a whole series' span is
// forgotten; a volume that stops being listed ages out. And the memory
// figure docs/api.md gives: the series of 1,000 units with 10,000 volumes.

import { test } from "node:test";
import assert from "node:assert/strict";
import { ManualClock } from "../../util/clock.ts";
import { STATS_POOL_POINTS, STATS_UNIT_POINTS, StationStats, type StatsSource } from "./collector.ts";
import type { IoTotals, UnitSample } from "./rates.ts";
import { parseWindow, unitsStats } from "./api.ts";
import { setLogLevel } from "../../util/log.ts";

setLogLevel("error");

interface FakeUnit {
  bootId: string;
  uptimeMs: number;
  reads: number;
  writes: number;
  volumes: Map<string, number>;
  failing: boolean;
}

function totalsOf(reads: number, writes: number): IoTotals {
  return { reads, writes, readBytes: reads * 4096, writeBytes: writes * 4096, readLatencyUsSum: reads * 100, writeLatencyUsSum: writes * 500 };
}

class Pool implements StatsSource {
  readonly units = new Map<string, FakeUnit>();
  inFlight = 0;
  inFlightMax = 0;
  capacityBytes = 1000;
  add(name: string): FakeUnit {
    const unit: FakeUnit = { bootId: "b0", uptimeMs: 50_000, reads: 0, writes: 0, volumes: new Map(), failing: false };
    this.units.set(name, unit);
    return unit;
  }
  pollable(): readonly string[] {
    return [...this.units.keys()];
  }
  async fetch(name: string): Promise<UnitSample> {
    const unit = this.units.get(name);
    if (unit === undefined || unit.failing) throw new Error(`unit ${name} does not answer`);
    this.inFlight += 1;
    this.inFlightMax = Math.max(this.inFlightMax, this.inFlight);
    await Promise.resolve();
    this.inFlight -= 1;
    return {
      bootId: unit.bootId,
      uptimeMs: unit.uptimeMs,
      totals: totalsOf(unit.reads, unit.writes),
      volumes: new Map([...unit.volumes].map(([v, reads]) => [v, totalsOf(reads, 0)])),
    };
  }
  pool() {
    return { capacityBytes: this.capacityBytes, usedBytes: 100, freeBytes: this.capacityBytes - 100, units: this.units.size, unitsOnline: this.units.size };
  }
}

/** Moves the clock (and every unit's uptime) one interval, then lets the poll that fell due finish. */
async function tick(clock: ManualClock, pool: Pool, stats: StationStats, ms: number, io: (unit: FakeUnit) => void = () => undefined): Promise<void> {
  for (const unit of pool.units.values()) {
    unit.uptimeMs += ms;
    io(unit);
  }
  clock.advance(ms);
  await stats.poll();
}

test("collector: polls on the interval, keeps STATS_UNIT_POINTS points, cuts by window, samples the pool every step", async () => {
  const clock = new ManualClock();
  const pool = new Pool();
  const u1 = pool.add("u1");
  u1.volumes.set("v1", 0);
  const stats = new StationStats(pool, { clock, pollIntervalMs: 5_000 });
  stats.start();
  await stats.poll();
  assert.equal(stats.unitView("u1", 600_000).points.length, 0, "the first answer is only a baseline");
  for (let i = 0; i < STATS_UNIT_POINTS + 30; i++) {
    await tick(clock, pool, stats, 5_000, (unit) => {
      unit.reads += 500;
      unit.writes += 50;
      unit.volumes.set("v1", (unit.volumes.get("v1") ?? 0) + 100);
    });
  }
  const view = stats.unitView("u1", 600_000);
  assert.equal(view.points.length, STATS_UNIT_POINTS, "bounded");
  for (const point of view.points) {
    assert.equal(point.readOps, 100);
    assert.equal(point.writeOps, 10);
    assert.equal(point.readBytes, 409_600);
    assert.equal(point.readLatencyMs, 0.1);
    assert.equal(point.writeLatencyMs, 0.5);
  }
  assert.deepEqual(view.volumes.map((v) => [v.volume, v.points.length, v.points[0]?.readOps]), [["v1", STATS_UNIT_POINTS, 20]]);
  const times = view.points.map((p) => p.t);
  assert.deepEqual(times, [...times].sort((a, b) => a - b), "oldest first");
  assert.equal(times.at(-1), clock.nowMs());
  assert.equal(stats.unitView("u1", 60_000).points.length, 13, "a one-minute window: the points at or after now-60s");
  assert.equal(unitsStats(stats, "30s").items[0]?.points.length, 7);
  // 150 polls x 5 s = 750 s: the pool was sampled at the start and each minute since; the last point is now.
  const poolPoints = stats.poolView(24 * 3_600_000).points;
  assert.equal(poolPoints.length, 1 + Math.floor(((STATS_UNIT_POINTS + 30) * 5_000) / 60_000) + 1);
  assert.equal(poolPoints.at(-1)?.t, clock.nowMs());
  pool.capacityBytes = 5000;
  assert.equal(stats.poolView(60_000).points.at(-1)?.capacityBytes, 5000, "the last point is the pool now");
  assert.deepEqual(Object.keys(stats.poolView(3_600_000).points[0] ?? {}), ["t", "capacityBytes", "usedBytes", "freeBytes", "units", "unitsOnline"]);
  await stats.stop();
});

test("collector: restarts, failed polls and long absences never give negative rates or a point spanning the absence", async () => {
  const clock = new ManualClock();
  const pool = new Pool();
  const u1 = pool.add("u1");
  const stats = new StationStats(pool, { clock, pollIntervalMs: 1_000, unitPoints: 10 });
  await stats.poll();
  await tick(clock, pool, stats, 1_000, (u) => (u.reads += 100));
  // Restart: new boot id, counters and uptime from zero.
  u1.bootId = "b1";
  u1.uptimeMs = 0;
  u1.reads = 0;
  await tick(clock, pool, stats, 1_000, (u) => (u.reads += 30));
  let points = stats.unitView("u1", 600_000).points;
  assert.deepEqual(points.map((p) => p.readOps), [100, 30]);
  // One failed poll: a gap (no point), then the next spans two intervals.
  u1.failing = true;
  await tick(clock, pool, stats, 1_000, (u) => (u.reads += 100));
  u1.failing = false;
  await tick(clock, pool, stats, 1_000, (u) => (u.reads += 100));
  points = stats.unitView("u1", 600_000).points;
  assert.deepEqual(points.map((p) => p.readOps), [100, 30, 100]);
  assert.equal(stats.polls.failed, 1);
  // Away longer than the series' span (10 points): the next answer is a new baseline. While it fails,
  // the unit is asked after 1, 2, 4, 8, then every STATS_FAILED_SKIP_ROUNDS_MAX rounds.
  u1.failing = true;
  const failedBefore = stats.polls.failed;
  for (let i = 0; i < 12; i++) await tick(clock, pool, stats, 1_000, (u) => (u.reads += 1_000));
  assert.equal(stats.polls.failed - failedBefore, 4, "rounds 1, 2, 4 and 8 of 12 asked the failing unit");
  u1.failing = false;
  for (let i = 0; i < 8; i++) await tick(clock, pool, stats, 1_000, (u) => (u.reads += 7));
  points = stats.unitView("u1", 600_000).points;
  assert.deepEqual(points.slice(0, 3).map((p) => p.readOps), [100, 30, 100]);
  assert.ok(points.length >= 4 && points.slice(3).every((p) => p.readOps === 7), `no point spans the absence: ${JSON.stringify(points.map((p) => p.readOps))}`);
  assert.ok(points.every((p) => Object.values(p).every((v) => v >= 0)));
});

test("collector: bounded concurrency; units and volumes that go away are forgotten", async () => {
  const clock = new ManualClock();
  const pool = new Pool();
  for (let i = 0; i < 50; i++) pool.add(`u${i}`).volumes.set("gone", 0);
  const stats = new StationStats(pool, { clock, pollIntervalMs: 1_000, concurrency: 4, unitPoints: 10 });
  await stats.poll();
  assert.ok(pool.inFlightMax <= 4 && pool.inFlightMax >= 2, `at most 4 polls at once (saw ${pool.inFlightMax})`);
  await tick(clock, pool, stats, 1_000, (u) => (u.reads += 1));
  assert.equal(stats.unitsView(600_000).items.length, 50);
  // u0's volume stops being listed: it ages out after unitPoints steps.
  pool.units.get("u0")?.volumes.clear();
  for (let i = 0; i < 9; i++) await tick(clock, pool, stats, 1_000);
  assert.equal(stats.unitView("u0", 600_000).volumes.length, 1, "still within the series' span");
  await tick(clock, pool, stats, 1_000);
  assert.equal(stats.unitView("u0", 600_000).volumes.length, 0);
  // u1 leaves the pool: forgotten once its last point is older than the series' span.
  pool.units.delete("u1");
  for (let i = 0; i < 10; i++) await tick(clock, pool, stats, 1_000);
  assert.equal(stats.unitsView(600_000).items.some((u) => u.unit === "u1"), true);
  await tick(clock, pool, stats, 1_000);
  assert.equal(stats.unitsView(600_000).items.some((u) => u.unit === "u1"), false);
});

test("collector: the series of 1,000 units with 10,000 volumes hold 31.2 MiB of typed arrays", async () => {
  const clock = new ManualClock();
  const pool = new Pool();
  for (let i = 0; i < 1_000; i++) {
    const unit = pool.add(`u${i}`);
    for (let v = 0; v < 10; v++) unit.volumes.set(`v${v}`, 0);
  }
  const stats = new StationStats(pool, { clock, concurrency: 64 });
  await stats.poll();
  await tick(clock, pool, stats, 5_000, (u) => (u.reads += 1));
  const bytes = stats.seriesBytes();
  // Per unit: 120 x (8 B time + 6 x 4 B); per volume 120 x 6 x 4 B; the pool 1,440 x 6 x 8 B.
  const expected = 1_000 * STATS_UNIT_POINTS * (8 + 24) + 10_000 * STATS_UNIT_POINTS * 24 + STATS_POOL_POINTS * 48;
  assert.equal(bytes, expected);
  assert.ok(bytes < 32 * 1024 * 1024, `${bytes} bytes`);
});

test("window: a duration up to the limit; anything else is a 400 naming window", () => {
  assert.equal(parseWindow(null, 600_000, 600_000), 600_000);
  assert.equal(parseWindow("30s", 600_000, 600_000), 30_000);
  for (const bad of ["", "10", "-5m", "1y", "ten minutes", "11m"]) {
    assert.throws(() => parseWindow(bad, 600_000, 600_000), (error: { code?: string; field?: string }) => error.code === "INVALID_ARGUMENT" && error.field === "window", bad);
  }
});
