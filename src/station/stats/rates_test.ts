// The pure rate computation (rates.ts): differences of two snapshots over the
// unit's uptime; a unit's first sample gives no point; a restart (new boot
// id, or uptime gone back) and a volume's counters that fell count from zero
// instead of going negative; and, over a thousand seeded random histories
// of a unit (I/O, restarts, volumes deleted and made again), no rate is ever
// negative or not finite, and without resets the rates times the spans add
// up to exactly the counters' growth.

import { test } from "node:test";
import assert from "node:assert/strict";
import { seededRandom } from "../../util/random.ts";
import { type IoTotals, type UnitSample, ZERO_TOTALS, ratesBetween, unitStep } from "./rates.ts";

function totals(reads: number, writes: number, latencyUs = 0): IoTotals {
  return { reads, writes, readBytes: reads * 4096, writeBytes: writes * 65536, readLatencyUsSum: reads * latencyUs, writeLatencyUsSum: writes * latencyUs * 2 };
}

function sample(bootId: string, uptimeMs: number, unit: IoTotals, volumes: Record<string, IoTotals> = {}): UnitSample {
  return { bootId, uptimeMs, totals: unit, volumes: new Map(Object.entries(volumes)) };
}

test("rates: counters' differences over the uptime's; mean latency over the step's requests", () => {
  const step = unitStep(sample("a", 10_000, totals(100, 50, 200)), sample("a", 15_000, totals(600, 150, 300), { v1: totals(10, 0, 100) }));
  assert.ok(step !== undefined);
  assert.equal(step.restarted, false);
  assert.equal(step.spanMs, 5_000);
  assert.equal(step.unit.readOps, 100);
  assert.equal(step.unit.writeOps, 20);
  assert.equal(step.unit.readBytes, 100 * 4096);
  assert.equal(step.unit.writeBytes, 20 * 65536);
  // (600*300 - 100*200) us over 500 reads = 320 us
  assert.equal(step.unit.readLatencyMs, 0.32);
  assert.equal(step.volumes.get("v1")?.readOps, 2, "a volume new since the last sample counts from zero");
  assert.equal(ratesBetween(totals(5, 5), totals(5, 5), 1000).readLatencyMs, 0, "no requests: latency 0");
});

test("rates: a unit's first sample gives no point; a step of no time neither", () => {
  assert.equal(unitStep(undefined, sample("a", 1000, totals(1, 1))), undefined);
  assert.equal(unitStep(sample("a", 1000, totals(1, 1)), sample("a", 1000, totals(1, 1))), undefined);
});

test("rates: a restart counts from zero over the new uptime, never negative", () => {
  const before = sample("a", 3_600_000, totals(1_000_000, 500_000, 100), { v1: totals(900_000, 1) });
  const restarted = unitStep(before, sample("b", 2_000, totals(400, 0, 100), { v1: totals(400, 0) }));
  assert.ok(restarted !== undefined);
  assert.equal(restarted.restarted, true);
  assert.equal(restarted.spanMs, 2_000);
  assert.equal(restarted.unit.readOps, 200);
  assert.equal(restarted.unit.writeOps, 0);
  assert.equal(restarted.volumes.get("v1")?.readOps, 200);
  // Same boot id but the uptime went back (a unit that keeps its id must still be caught).
  const back = unitStep(before, sample("a", 1_000, totals(10, 0)));
  assert.equal(back?.restarted, true);
  assert.equal(back?.unit.readOps, 10);
  // A volume deleted and made again within one boot: its counters fell.
  const remade = unitStep(sample("a", 1_000, totals(100, 0), { v1: totals(100, 0) }), sample("a", 2_000, totals(105, 0), { v1: totals(5, 0) }));
  assert.equal(remade?.volumes.get("v1")?.readOps, 5);
  assert.equal(ratesBetween(totals(10, 10), ZERO_TOTALS, 1000).readOps, 0);
});

test("rates: seeded random histories never give a negative or non-finite rate, and add up without resets", () => {
  const seed = Number(process.env["IPSAN_SEED"] ?? Date.now() % 1_000_000);
  const random = seededRandom(seed);
  const message = `seed ${seed} (IPSAN_SEED=${seed} replays it)`;
  for (let history = 0; history < 1_000; history++) {
    let boot = 0;
    let uptimeMs = Math.floor(random() * 1e6);
    let unit = { ...ZERO_TOTALS };
    let volumes = new Map<string, IoTotals>();
    let previous: UnitSample | undefined;
    let integratedReads = 0;
    let resets = 0;
    let baselineReads = 0;
    for (let i = 0; i < 20; i++) {
      const roll = random();
      if (roll < 0.05) {
        boot += 1;
        resets += 1;
        uptimeMs = Math.floor(random() * 10_000);
        unit = { ...ZERO_TOTALS };
        volumes = new Map();
      } else {
        uptimeMs += 1 + Math.floor(random() * 10_000);
        const name = `v${Math.floor(random() * 4)}`;
        if (roll < 0.1) {
          volumes.delete(name);
          resets += 1;
        }
        const reads = Math.floor(random() * 1000);
        const writes = Math.floor(random() * 1000);
        const add = totals(reads, writes, random() * 1000);
        const sum = (a: IoTotals, b: IoTotals): IoTotals => ({
          reads: a.reads + b.reads,
          writes: a.writes + b.writes,
          readBytes: a.readBytes + b.readBytes,
          writeBytes: a.writeBytes + b.writeBytes,
          readLatencyUsSum: a.readLatencyUsSum + b.readLatencyUsSum,
          writeLatencyUsSum: a.writeLatencyUsSum + b.writeLatencyUsSum,
        });
        unit = sum(unit, add);
        volumes.set(name, sum(volumes.get(name) ?? ZERO_TOTALS, add));
      }
      const current = sample(`boot${boot}`, uptimeMs, unit, Object.fromEntries(volumes));
      if (previous === undefined) baselineReads = current.totals.reads;
      const step = unitStep(previous, current);
      if (step !== undefined) {
        for (const rates of [step.unit, ...step.volumes.values()]) {
          for (const [field, value] of Object.entries(rates)) {
            assert.ok(Number.isFinite(value) && value >= 0, `${field}=${value} at step ${i}: ${message}`);
          }
        }
        integratedReads += (step.unit.readOps * step.spanMs) / 1000;
      }
      previous = current;
    }
    if (resets === 0 && previous !== undefined) {
      // The first sample is the baseline: everything after it is in the steps.
      assert.ok(Math.abs(integratedReads - (previous.totals.reads - baselineReads)) < 1e-6 * Math.max(1, previous.totals.reads), `reads add up: ${message}`);
    }
  }
});
