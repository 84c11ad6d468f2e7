// The placement checks of replacement_test.ts, shared with the canary
// (leg_replacement_canary_test.ts), which runs them against a broken
// compiled copy where they must fail. See replacement_test.ts for what they prove.

import assert from "node:assert/strict";
import type { AllocatorUnit } from "./allocator.ts";
import type { placeReplacement } from "./replacement.ts";

const MIB = 1024 * 1024;

function unit(name: string, freeMiB: number, extra: Partial<AllocatorUnit> = {}): AllocatorUnit {
  return { name, state: "online", hasControl: true, freeBytes: freeMiB * MIB, reservedBytes: 0, volumeCount: 0, volumesMax: null, freeVolumes: [], ...extra };
}

export function checkPlacement(place: typeof placeReplacement): void {
  // The mirror's legs: m1 (zone a, stays) and m2 (zone b, its unit away: the leg being replaced).
  const m1 = unit("m1", 1000, { zone: "a" });
  const m2 = unit("m2", 1000, { zone: "b", state: "offline" });
  const s1 = unit("s1", 100, { zone: "a", spare: true });
  const s2 = unit("s2", 100, { zone: "c", spare: true });
  const o1 = unit("o1", 500, { zone: "d" });
  const o2 = unit("o2", 100, { zone: "a" });
  const mirror = new Set(["m1", "m2"]);
  const used = new Set(["zone:a"]);
  const leg = 9 * MIB;
  const unitOf = (units: AllocatorUnit[]): string | null => {
    const result = place(units, leg, mirror, used);
    return result.ok ? result.placement.unit : null;
  };
  assert.equal(unitOf([m1, m2, s1, s2, o1, o2]), "s2", "a spare in a new zone first");
  assert.equal(unitOf([m1, m2, s1, o1, o2]), "s1", "then any spare");
  assert.equal(unitOf([m1, m2, o1, o2]), "o1", "then a unit with room in a new zone");
  assert.equal(unitOf([m1, m2, o2]), "o2", "then any unit with room");
  assert.equal(unitOf([m1, m2, { ...s2, freeBytes: MIB }, o2]), "o2", "a spare without room is passed over");
  // Only units of the mirror have room: no placement, and every unit says why.
  const full = place([m1, m2, { ...o1, freeBytes: MIB }], leg, mirror, used);
  assert.equal(full.ok, false, `placed on ${full.ok ? full.placement.unit : ""}: a unit that holds a leg of this mirror`);
  if (!full.ok) {
    assert.deepEqual(
      full.reasons.map((r) => [r.unit, r.reason.startsWith("holds a leg") || r.reason.startsWith("not enough free space")]),
      [
        ["m1", true],
        ["m2", true],
        ["o1", true],
      ],
    );
  }
  const m1Only = place([m1, { ...m2, state: "online" }], leg, mirror, used);
  assert.equal(m1Only.ok, false, "never on the failed leg's own unit either, even back online");
}
