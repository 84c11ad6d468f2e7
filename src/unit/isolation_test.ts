// Proves volume isolation (issue 2, section 2 and 6) over random layouts
// (fast-check; the seed is printed on failure): after a random sequence of
// real create/delete/grow/partition operations on a real storage file, writing
// every byte of one volume or partition through its BlockDevice, in
// unaligned chunks that cross extent boundaries, changes no byte of the
// storage outside that device's own extents (not the other volumes, not the
// table area, not free space), reads back exactly, and leaves the volume
// table loading unchanged. Requests reaching outside the device are refused
// with OUT_OF_RANGE before the storage is touched.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import fc from "fast-check";
import { SECTOR_SIZE } from "../block/types.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IpsanError } from "../util/errors.ts";
import { setLogLevel } from "../util/log.ts";
import { MIB } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import { TableStore } from "./table_store.ts";
import { Storage } from "./storage.ts";
import { VolumeManager } from "./volumes.ts";

setLogLevel("warn");
const CAPACITY_BYTES = 24 * MIB;
const LOOPBACK = { address: "127.0.0.1", port: 1 };

type Action =
  | { kind: "create"; sectors: number }
  | { kind: "delete"; pick: number }
  | { kind: "grow"; pick: number; sectors: number }
  | { kind: "partition"; pick: number; parts: number };

const actionArb: fc.Arbitrary<Action> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant("create" as const), sectors: fc.integer({ min: 1, max: 5 * 2048 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("delete" as const), pick: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant("grow" as const), pick: fc.nat(), sectors: fc.integer({ min: 1, max: 3 * 2048 }) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant("partition" as const), pick: fc.nat(), parts: fc.integer({ min: 1, max: 3 }) }) },
);

async function apply(manager: VolumeManager, actions: readonly Action[]): Promise<void> {
  for (const [i, action] of actions.entries()) {
    const volumes = manager.table.volumes;
    const picked = volumes.length === 0 ? undefined : volumes[("pick" in action ? action.pick : 0) % volumes.length];
    try {
      if (action.kind === "create") await manager.create(`v${i}`, action.sectors * SECTOR_SIZE);
      else if (picked === undefined) continue;
      else if (action.kind === "delete") await manager.delete(picked.name);
      else if (action.kind === "grow") await manager.grow(picked.name, picked.sizeBytes + action.sectors * SECTOR_SIZE);
      else {
        const each = Math.floor(picked.sizeBytes / SECTOR_SIZE / (action.parts + 1)) * SECTOR_SIZE;
        if (each > 0) await manager.setPartitions(picked.name, Array.from({ length: action.parts }, () => each));
      }
    } catch (error) {
      if (!(error instanceof IpsanError && error.code === "NO_SPACE")) throw error;
    }
  }
}

/**
 * Where device byte `offset` of export "V" or "V/pN" lives on the storage,
 * computed naively from the table (independently of volume_device.ts).
 */
function storageOffsetOf(manager: VolumeManager, exportName: string): (deviceOffset: number) => number {
  const [volumeName, part] = exportName.split("/p");
  const volume = manager.volume(volumeName ?? "");
  assert.ok(volume);
  const base = part === undefined ? 0 : (volume.partitions[Number(part) - 1]?.startLba ?? NaN) * SECTOR_SIZE;
  return (deviceOffset) => {
    let remaining = base + deviceOffset;
    for (const extent of volume.extents) {
      if (remaining < extent.lengthLba * SECTOR_SIZE) return extent.startLba * SECTOR_SIZE + remaining;
      remaining -= extent.lengthLba * SECTOR_SIZE;
    }
    throw new Error(`offset ${deviceOffset} beyond volume ${volume.name}`);
  };
}

test("writing all of one volume or partition changes no byte outside it", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(actionArb, { minLength: 1, maxLength: 14 }),
      fc.nat(),
      fc.integer({ min: 100_001, max: 3 * MIB }),
      async (actions, targetPick, chunkBytes) => {
        const dir = makeTempDir("isolation");
        const manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: CAPACITY_BYTES });
        try {
          await apply(manager, actions);
          const provider = new UnitExportProvider(manager);
          const exports = provider.list(LOOPBACK).map((e) => e.name);
          if (exports.length === 0) return;
          const target = exports[targetPick % exports.length] ?? "";
          const device = await provider.open(target, LOOPBACK);
          const storageOffset = storageOffsetOf(manager, target);
          const volume = manager.volume(target.split("/p")[0] ?? "");
          const partition = target.includes("/p") ? volume?.partitions[Number(target.split("/p")[1]) - 1] : undefined;
          assert.equal(device.sizeBytes, partition === undefined ? volume?.sizeBytes : partition.lengthLba * SECTOR_SIZE);

          // Out-of-range requests are refused and touch nothing.
          const refused = async (what: Promise<unknown>): Promise<void> => {
            await assert.rejects(what, (error: unknown) => error instanceof IpsanError && error.code === "OUT_OF_RANGE");
          };
          await refused(device.write(Buffer.alloc(1024, 0xaa), device.sizeBytes - 512, false));
          await refused(device.write(Buffer.alloc(1, 0xaa), device.sizeBytes, false));
          await refused(device.read(Buffer.alloc(512), -512));
          await refused(device.zero(device.sizeBytes - 512, 4096, { fua: false, mayTrim: true, fastOnly: false }));
          await refused(device.trim(0, device.sizeBytes + 1, false));
          await refused(device.write(Buffer.alloc(512), 2 ** 53, false));

          const before = readFileSync(manager.storage.path);
          const pattern = randomBytes(device.sizeBytes);
          for (let offset = 0; offset < device.sizeBytes; offset += chunkBytes) {
            const end = Math.min(device.sizeBytes, offset + chunkBytes);
            await device.write(pattern.subarray(offset, end), offset, false);
          }
          await device.flush();
          const readBack = Buffer.alloc(device.sizeBytes);
          await device.read(readBack, 0);
          assert.ok(readBack.equals(pattern), "the device reads back what was written");
          const after = readFileSync(manager.storage.path);
          assert.equal(after.length, before.length);

          // Expected storage image: the old one with each device sector placed where the table says.
          const expected = Buffer.from(before);
          for (let offset = 0; offset < device.sizeBytes; offset += SECTOR_SIZE) {
            pattern.copy(expected, storageOffset(offset), offset, offset + SECTOR_SIZE);
          }
          if (!after.equals(expected)) {
            let first = 0;
            while (after[first] === expected[first]) first += 1;
            assert.fail(`storage differs from the expected image at byte ${first} after writing all of ${target}`);
          }
          await device.close();

          // The table on storage is intact and equal to the manager's.
          const reread = new Storage(manager.storage.fd, manager.storage.path, "file", manager.storage.sizeBytes);
          const loaded = await TableStore.load(reread);
          assert.ok(loaded.kind === "loaded" && loaded.slots.every((s) => s.kind === "valid"));
          assert.deepEqual(loaded.table, manager.table);
        } finally {
          await manager.close();
          dir.remove();
        }
      },
    ),
    { numRuns: 25 },
  );
});
