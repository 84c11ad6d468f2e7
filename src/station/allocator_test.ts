// Proves the allocator's placement rules over random pools (fast-check, seed
// printed on failure): it never places on a unit that is not online or has no
// control API, never carves more than a unit's usable free space (reported
// free minus carves started and not yet reported, in whole MiB), never tries a
// carve at least as large as one the unit just refused, never reuses
// an assigned or partitioned volume (checked against the raw volume list the
// free lists were made from), prefers the smallest fitting free volume,
// then the best-fitting unit, gives exactly one reason per unit when nothing
// fits (and only when truly nothing fits), and changes nothing in its input
// (which is what makes the API's dry run safe). Multi-leg placement
// (placeLegs): all N legs on N distinct units or none with a reason per unit,
// as many distinct zones as the fitting units allow, one leg equal to
// allocate's placement.

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { allocate, carveBytes, compareFreeVolumes, failureDomain, placeLegs, type AllocatorUnit } from "./allocator.ts";
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
      refusedCarveBytes: fc.option(fc.integer({ min: 1, max: 64 }).map((n) => n * 1024 * 1024), { nil: null }),
      zone: fc.option(fc.constantFrom("za", "zb", "zc"), { nil: null }),
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
        refusedCarveBytes: u.refusedCarveBytes,
        zone: u.zone,
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
  const carve = Math.ceil(need / (1024 * 1024)) * 1024 * 1024;
  const refused = unit.refusedCarveBytes !== undefined && unit.refusedCarveBytes !== null && carve >= unit.refusedCarveBytes;
  return eligible(unit) && usable(unit) >= carve && !refused && (unit.volumesMax === null || unit.volumeCount < unit.volumesMax);
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
        const bestLeft = Math.min(...pool.filter((u) => canCarve(u, need)).map((u) => usable(u) - carveBytes(need)));
        assert.equal(usable(unit) - carveBytes(need), bestLeft, "best fit");
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

test("a refusal never prints two different sizes alike (issue 9 item 8: need 4G, free 4G with 4092 MiB free)", () => {
  const unit: AllocatorUnit = { name: "a", state: "online", hasControl: true, freeBytes: 4092 * 2 ** 20, reservedBytes: 0, volumeCount: 0, volumesMax: null, freeVolumes: [] };
  const result = allocate([unit], { sizeBytes: 4 * 2 ** 30 });
  assert.deepEqual(result.reasons, [{ unit: "a", reason: "not enough free space: need 4G, free 4092M, and no free volume that large" }]);
});

test("a carve takes whole MiB: a unit with less than the rounded-up size is not asked", () => {
  const unit: AllocatorUnit = {
    name: "a",
    state: "online",
    hasControl: true,
    freeBytes: 16 * 1024 * 1024,
    reservedBytes: 0,
    volumeCount: 0,
    volumesMax: null,
    freeVolumes: [],
  };
  assert.equal(allocate([unit], { sizeBytes: 16 * 1024 * 1024 }).ok, true);
  const result = allocate([unit], { sizeBytes: 16 * 1024 * 1024 + 512 });
  assert.equal(result.ok, false);
  assert.deepEqual(result.reasons, [{ unit: "a", reason: "not enough free space: need 17M (16777728 bytes rounded up to whole MiB), free 16M, and no free volume that large" }]);
  const refused = allocate([{ ...unit, freeBytes: 64 * 1024 * 1024, refusedCarveBytes: 16 * 1024 * 1024 }], { sizeBytes: 16 * 1024 * 1024 });
  assert.deepEqual(refused.reasons, [
    { unit: "a", reason: "refused a carve of 16M for lack of space since its last report, and no free volume of 16M" },
  ]);
  assert.equal(allocate([{ ...unit, freeBytes: 64 * 1024 * 1024, refusedCarveBytes: 16 * 1024 * 1024 }], { sizeBytes: 8 * 1024 * 1024 }).ok, true, "a smaller carve may still go there");
});

test("excluded units carry the reason they were given", () => {
  const unit: AllocatorUnit = { name: "a", state: "online", hasControl: true, freeBytes: 1 << 30, reservedBytes: 0, volumeCount: 0, volumesMax: null, freeVolumes: [] };
  const result = allocate([unit], { sizeBytes: 1 << 20, excludeReasons: new Map([["a", "refused the carve: no space"]]) });
  assert.deepEqual(result, { ok: false, reasons: [{ unit: "a", reason: "refused the carve: no space" }] });
});

// ---- placeLegs ---------------------------------------------------------------------

function offers(unit: TestUnit, need: number, reuse: boolean): boolean {
  return (reuse && freeVolumes(unit, need).length > 0) || canCarve(unit, need);
}

test("placeLegs with one copy is allocate", () => {
  fc.assert(
    fc.property(poolArb, sizeArb, (pool, need) => {
      const one = placeLegs(pool, { sizeBytes: need, copies: 1 });
      const single = allocate(pool, { sizeBytes: need });
      assert.equal(one.ok, single.ok);
      assert.deepEqual(one.reasons, single.reasons);
      if (one.ok && single.ok) assert.deepEqual(one.legs, [single.placement]);
    }),
    { numRuns: 2000 },
  );
});

test("placeLegs: all legs on distinct fitting units, most zones first, or none with a reason per unit", () => {
  fc.assert(
    fc.property(poolArb, sizeArb, fc.integer({ min: 1, max: 4 }), fc.boolean(), (pool, need, copies, reuse) => {
      const before = JSON.stringify(pool);
      const result = placeLegs(pool, { sizeBytes: need, copies, reuse });
      assert.equal(JSON.stringify(pool), before, "input unchanged");
      assert.deepEqual(placeLegs(pool, { sizeBytes: need, copies, reuse }), result, "deterministic");
      const fitting = pool.filter((u) => offers(u, need, reuse));
      if (!result.ok) {
        assert.ok(fitting.length < copies, `fails only when fewer than ${copies} units fit (${fitting.length} do)`);
        assert.deepEqual(result.reasons.map((r) => r.unit).sort(), pool.map((u) => u.name).sort(), "one reason per unit");
        for (const reason of result.reasons) assert.ok(reason.reason.length > 0);
        return;
      }
      assert.equal(result.legs.length, copies, "all legs");
      const units = result.legs.map((leg) => leg.unit);
      assert.equal(new Set(units).size, copies, "never two legs on one unit");
      for (const leg of result.legs) {
        const unit = pool.find((u) => u.name === leg.unit);
        assert.ok(unit !== undefined && eligible(unit));
        if (leg.kind === "reuse") {
          assert.ok(reuse, "reuses only when allowed");
          const volume = unit.raw.find((v) => v.name === leg.volume);
          assert.ok(volume !== undefined && !volume.assigned && volume.partitionCount === 0 && volume.sizeBytes >= need);
        } else {
          assert.ok(canCarve(unit, need), "never carves beyond usable free space, a refusal or the volume limit");
          assert.equal(leg.sizeBytes, need);
        }
      }
      const domains = new Set(fitting.map(failureDomain)).size;
      const legDomains = new Set(result.legs.map((leg) => failureDomain(pool.find((u) => u.name === leg.unit) as TestUnit))).size;
      assert.equal(legDomains, Math.min(copies, domains), "as many distinct zones as the fitting units allow");
      assert.equal(result.domains, legDomains);
      if (reuse) {
        const single = allocate(pool, { sizeBytes: need });
        assert.ok(single.ok);
        assert.deepEqual(result.legs[0], single.placement, "the first leg is what allocate would place");
      }
    }),
    { numRuns: 3000 },
  );
});

test("placeLegs: zones first, then the best units; reasons when too few units fit", () => {
  const GIB = 1024 ** 3;
  const unit = (name: string, freeGiB: number, zone: string | null): AllocatorUnit => ({
    name,
    state: "online",
    hasControl: true,
    freeBytes: freeGiB * GIB,
    reservedBytes: 0,
    volumeCount: 0,
    volumesMax: null,
    freeVolumes: [],
    zone,
  });
  // a1 and a2 fit best but share zone a: the second leg goes to zone b.
  const pool = [unit("a1", 10, "a"), unit("a2", 11, "a"), unit("b1", 50, "b"), unit("c1", 5, "c")];
  const two = placeLegs(pool, { sizeBytes: 8 * GIB, copies: 2 });
  assert.ok(two.ok);
  assert.deepEqual(
    two.legs.map((l) => l.unit),
    ["a1", "b1"],
  );
  assert.deepEqual(two.reasons, [{ unit: "c1", reason: "not enough free space: need 8G, free 5G, and no free volume that large" }]);
  // Three legs, two zones that fit: a1 (a), b1 (b), then the best left (a2).
  const three = placeLegs(pool, { sizeBytes: 8 * GIB, copies: 3 });
  assert.ok(three.ok);
  assert.deepEqual(
    three.legs.map((l) => l.unit),
    ["a1", "a2", "b1"],
  );
  assert.equal(three.domains, 2);
  // Units without a zone are each their own failure domain.
  const plain = placeLegs([unit("x", 10, null), unit("y", 11, null)], { sizeBytes: 8 * GIB, copies: 2 });
  assert.ok(plain.ok);
  assert.equal(plain.domains, 2);
  // Four legs, three units fit: none placed, every unit says why.
  const four = placeLegs(pool, { sizeBytes: 8 * GIB, copies: 4 });
  assert.equal(four.ok, false);
  assert.deepEqual(four.reasons, [
    { unit: "a1", reason: "can hold a leg, but only 3 of the 4 distinct units needed can" },
    { unit: "a2", reason: "can hold a leg, but only 3 of the 4 distinct units needed can" },
    { unit: "b1", reason: "can hold a leg, but only 3 of the 4 distinct units needed can" },
    { unit: "c1", reason: "not enough free space: need 8G, free 5G, and no free volume that large" },
  ]);
  assert.throws(() => placeLegs(pool, { sizeBytes: GIB, copies: 0 }), RangeError);
});
