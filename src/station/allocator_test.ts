// Proves the allocator's placement rules over random pools (fast-check, seed
// printed on failure): it never places on a unit that is not online or has no
// control API, never carves more than a unit's usable free space, never reuses
// an assigned or partitioned volume (checked against the raw volume list the
// free lists were made from), prefers the smallest fitting free volume,
// then the best-fitting unit, gives exactly one reason per unit when nothing
// fits (and only when truly nothing fits), and changes nothing in its input
// (which is what makes the API's dry run safe).

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { allocate, compareFreeVolumes, type AllocatorUnit } from "./allocator.ts";
import { UNIT_STATES } from "./types.ts";

const SECTOR = 512;
const sizeArb = fc.integer({ min: 1, max: 64 }).map((n) => n * 1024 * SECTOR);

interface RawVolume {
  readonly name: string;
  readonly sizeBytes: number;
  readonly partitionCount: number;
  readonly assigned: boolean;
}
type TestUnit = AllocatorUnit & { readonly raw: readonly RawVolume[] };

const unitArb = (index: number): fc.Arbitrary<TestUnit> =>
  fc
    .record({
      state: fc.constantFrom(...UNIT_STATES, "online", "online"),
      hasControl: fc.constantFrom(true, true, true, false),
      freeBytes: fc.integer({ min: 0, max: 200 }).map((n) => n * 1024 * SECTOR),
      reservedBytes: fc.integer({ min: 0, max: 40 }).map((n) => n * 1024 * SECTOR),
      volumesMax: fc.option(fc.integer({ min: 0, max: 6 }), { nil: null }),
      volumes: fc.array(
        fc.record({
          sizeBytes: sizeArb,
          partitionCount: fc.integer({ min: 0, max: 2 }).map((n) => (n === 2 ? 1 : 0)),
          assigned: fc.boolean(),
        }),
        { maxLength: 6 },
      ),
    })
    .map((u) => {
      const raw = u.volumes.map((v, i) => ({ name: `v${i}`, ...v }));
      return {
        name: `u${index}`,
        state: u.state,
        hasControl: u.hasControl,
        freeBytes: u.freeBytes,
        reservedBytes: u.reservedBytes,
        volumesMax: u.volumesMax,
        volumeCount: raw.length,
        // What the station hands over: free (unassigned, unpartitioned) volumes, sorted.
        freeVolumes: raw
          .filter((v) => !v.assigned && v.partitionCount === 0)
          .map((v) => ({ name: v.name, sizeBytes: v.sizeBytes }))
          .sort(compareFreeVolumes),
        raw,
      };
    });

const poolArb = fc.integer({ min: 0, max: 8 }).chain((n) => fc.tuple(...Array.from({ length: n }, (_, i) => unitArb(i))));

function eligible(unit: AllocatorUnit): boolean {
  return unit.state === "online" && unit.hasControl;
}
function usable(unit: AllocatorUnit): number {
  return Math.max(0, unit.freeBytes - unit.reservedBytes);
}
function canCarve(unit: AllocatorUnit, need: number): boolean {
  return eligible(unit) && usable(unit) >= need && (unit.volumesMax === null || unit.volumeCount < unit.volumesMax);
}
function freeVolumes(unit: TestUnit, need: number) {
  return eligible(unit) ? unit.raw.filter((v) => !v.assigned && v.partitionCount === 0 && v.sizeBytes >= need) : [];
}

test("placements obey the rules and failures name every unit", () => {
  fc.assert(
    fc.property(poolArb, sizeArb, (pool, need) => {
      const before = JSON.stringify(pool);
      const result = allocate(pool, { sizeBytes: need });
      assert.equal(JSON.stringify(pool), before, "input unchanged");
      assert.deepEqual(allocate(pool, { sizeBytes: need }), result, "deterministic");
      const anyReuse = pool.some((u) => freeVolumes(u, need).length > 0);
      const anyCarve = pool.some((u) => canCarve(u, need));
      if (!result.ok) {
        assert.ok(!anyReuse && !anyCarve, "fails only when nothing fits");
        assert.deepEqual(
          result.reasons.map((r) => r.unit).sort(),
          pool.map((u) => u.name).sort(),
          "one reason per unit",
        );
        for (const reason of result.reasons) assert.ok(reason.reason.length > 0);
        return;
      }
      const unit = pool.find((u) => u.name === result.placement.unit);
      assert.ok(unit !== undefined);
      assert.ok(eligible(unit), "never on a unit that is not online or lacks a control API");
      if (result.placement.kind === "reuse") {
        const { volume: name } = result.placement;
        const volume = unit.raw.find((v) => v.name === name);
        assert.ok(volume !== undefined && !volume.assigned && volume.partitionCount === 0 && volume.sizeBytes >= need);
        const smallest = Math.min(...pool.flatMap((u) => freeVolumes(u, need).map((v) => v.sizeBytes)));
        assert.equal(volume.sizeBytes, smallest, "smallest fitting free volume");
      } else {
        assert.ok(!anyReuse, "carves only when no free volume fits");
        assert.ok(canCarve(unit, need), "never carves beyond usable free space or the volume limit");
        assert.equal(result.placement.sizeBytes, need);
        const bestLeft = Math.min(...pool.filter((u) => canCarve(u, need)).map((u) => usable(u) - need));
        assert.equal(usable(unit) - need, bestLeft, "best fit");
      }
    }),
    { numRuns: 2000 },
  );
});

test("excluded units are never chosen", () => {
  fc.assert(
    fc.property(poolArb, sizeArb, fc.integer({ min: 0, max: 7 }), (pool, need, excluded) => {
      const exclude = new Set([`u${excluded}`]);
      const result = allocate(pool, { sizeBytes: need, excludeUnits: exclude });
      if (result.ok) assert.ok(!exclude.has(result.placement.unit));
    }),
    { numRuns: 500 },
  );
});

test("reasons say why, unit by unit", () => {
  const pool: AllocatorUnit[] = [
    { name: "a", state: "offline", hasControl: true, freeBytes: 1 << 30, reservedBytes: 0, volumeCount: 0, volumesMax: null, freeVolumes: [] },
    { name: "b", state: "online", hasControl: true, freeBytes: 20 * 2 ** 30, reservedBytes: 0, volumeCount: 0, volumesMax: null, freeVolumes: [] },
    { name: "c", state: "online", hasControl: false, freeBytes: 1 << 30, reservedBytes: 0, volumeCount: 0, volumesMax: null, freeVolumes: [] },
    { name: "d", state: "online", hasControl: true, freeBytes: 100 * 2 ** 30, reservedBytes: 0, volumeCount: 2, volumesMax: 2, freeVolumes: [] },
  ];
  const result = allocate(pool, { sizeBytes: 80 * 2 ** 30 });
  assert.equal(result.ok, false);
  assert.deepEqual(result.reasons, [
    { unit: "a", reason: "offline" },
    { unit: "b", reason: "not enough free space: need 80G, free 20G, and no free volume that large" },
    { unit: "c", reason: "no control API" },
    { unit: "d", reason: "volume limit reached (2) and no free volume of 80G" },
  ]);
});
