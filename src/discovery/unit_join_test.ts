// Proves that a fragmented unit still reports: past FREE_EXTENTS_MAX free
// extents, the storage info carries the largest ones in LBA order (the
// station plans with those and the exact freeBytes) instead of failing
// validation and never joining.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FREE_EXTENTS_MAX, type LbaExtent } from "./messages.ts";
import { largestFreeExtents } from "./unit_join.ts";

const extent = (startLba: number, lengthLba: number): LbaExtent => ({ startLba, lengthLba, endLba: startLba + lengthLba - 1 });

test("free extents within the limit are reported as they are", () => {
  const extents = [extent(8192, 2048), extent(20480, 4096)];
  assert.equal(largestFreeExtents(extents), extents);
});

test("past the limit the largest extents are kept, in LBA order", () => {
  const count = FREE_EXTENTS_MAX + 500;
  // Every other MiB free; lengths vary so the largest are spread over the disk.
  const extents = Array.from({ length: count }, (_, i) => extent(8192 + i * 8192, 2048 * (1 + (i * 7919) % 3)));
  const kept = largestFreeExtents(extents);
  assert.equal(kept.length, FREE_EXTENTS_MAX);
  const smallestKept = Math.min(...kept.map((e) => e.lengthLba));
  const dropped = extents.filter((e) => !kept.includes(e));
  assert.equal(dropped.length, 500);
  assert.ok(dropped.every((e) => e.lengthLba <= smallestKept), "only the smallest are dropped");
  for (let i = 1; i < kept.length; i++) assert.ok(kept[i - 1]!.startLba < kept[i]!.startLba, "LBA order");
});
