// Proves the volume table codec and its crash safety on a real storage file:
// random tables (built by the real volume operations) survive encode/decode
// unchanged; a torn or corrupted slot leaves the newest table in the other
// (every change is in both slots) and is rewritten on load;
// both slots corrupt gives a clear CORRUPT error (never an empty table);
// validation catches overlapping volumes (a canary: the check can fail); the
// worst-case table under every limit fits a slot; allocation fills the data
// area with aligned extents and reuses freed space.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { closeSync, openSync, writeSync } from "node:fs";
import fc from "fast-check";
import { makeTempDir } from "../testing/tmp.ts";
import { IpsanError } from "../util/errors.ts";
import { DATA_START_LBA, EXTENT_ALIGNMENT_LBA, MIB, SLOT_HEADER_BYTES, TABLE_BODY_BYTES_MAX, TABLE_SLOT_BYTES } from "./layout.ts";
import { Storage } from "./storage.ts";
import { TABLE_BODY_BYTES_WORST_CASE, UNIT_ID_PATTERN, type VolumeTable, decodeSlot, emptyTable, encodeSlot, freeRanges, newUnitId, validateTable } from "./table.ts";
import { TableStore } from "./table_store.ts";
import { createVolume, deleteVolume, growVolume, setGrants, setPartitions } from "./volume_ops.ts";

type Action =
  | { kind: "create"; size: number }
  | { kind: "delete"; pick: number }
  | { kind: "grow"; pick: number; extra: number }
  | { kind: "partition"; pick: number; parts: number }
  | { kind: "grant"; pick: number; host: number };

const actionArb: fc.Arbitrary<Action> = fc.oneof(
  fc.record({ kind: fc.constant("create" as const), size: fc.integer({ min: 1, max: 6 * 2048 }).map((s) => s * 512) }),
  fc.record({ kind: fc.constant("delete" as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant("grow" as const), pick: fc.nat(), extra: fc.integer({ min: 0, max: 4 * 2048 }).map((s) => s * 512) }),
  fc.record({ kind: fc.constant("partition" as const), pick: fc.nat(), parts: fc.integer({ min: 0, max: 3 }) }),
  fc.record({ kind: fc.constant("grant" as const), pick: fc.nat(), host: fc.integer({ min: 0, max: 255 }) }),
);

/** Applies actions with the real operations, skipping those the table refuses (NO_SPACE etc.). */
export function buildTable(storageBytes: number, actions: readonly Action[]): VolumeTable {
  let table = emptyTable(storageBytes);
  actions.forEach((action, i) => {
    const picked = table.volumes.length === 0 ? undefined : table.volumes[("pick" in action ? action.pick : 0) % table.volumes.length];
    try {
      switch (action.kind) {
        case "create":
          table = createVolume(table, `v${i}`, action.size).table;
          break;
        case "delete":
          if (picked) table = deleteVolume(table, picked.name).table;
          break;
        case "grow":
          if (picked) table = growVolume(table, picked.name, picked.sizeBytes + action.extra).table;
          break;
        case "partition":
          if (picked) {
            const each = Math.floor(picked.sizeBytes / 512 / 4) * 512;
            table = setPartitions(table, picked.name, each === 0 ? [] : Array.from({ length: action.parts }, () => each)).table;
          }
          break;
        case "grant":
          if (picked) table = setGrants(table, picked.name, action.host === 0 ? [] : [`10.0.0.${action.host}`, "fd00::/64"]).table;
          break;
      }
    } catch (error) {
      if (!(error instanceof IpsanError)) throw error;
    }
  });
  return table;
}

test("random tables round-trip through the slot codec", () => {
  fc.assert(
    fc.property(fc.array(actionArb, { maxLength: 40 }), fc.integer({ min: 1, max: 2 ** 40 }), (actions, generation) => {
      const table = buildTable(64 * MIB, actions);
      assert.deepEqual(validateTable(table), []);
      const decoded = decodeSlot(encodeSlot(table, generation));
      assert.equal(decoded.kind, "valid");
      if (decoded.kind === "valid") {
        assert.equal(decoded.generation, generation);
        assert.deepEqual(decoded.table, table);
      }
    }),
    { numRuns: 200 },
  );
});

test("any single flipped byte or truncation of a slot is detected", () => {
  const table = buildTable(64 * MIB, [{ kind: "create", size: MIB }, { kind: "create", size: 3 * MIB }]);
  const image = encodeSlot(table, 7);
  fc.assert(
    fc.property(fc.nat(image.length - 1), fc.integer({ min: 1, max: 255 }), (index, xor) => {
      const damaged = Buffer.from(image);
      damaged[index] = (damaged[index] ?? 0) ^ xor;
      assert.equal(decodeSlot(damaged).kind, "invalid");
    }),
    { numRuns: 300 },
  );
  for (const length of [0, 10, SLOT_HEADER_BYTES, image.length - 1]) assert.notEqual(decodeSlot(image.subarray(0, length)).kind, "valid");
  assert.equal(decodeSlot(Buffer.alloc(4096)).kind, "empty");
});

test("validation catches overlapping volumes and extents outside the data area (canary)", () => {
  const table = buildTable(64 * MIB, [{ kind: "create", size: 2 * MIB }, { kind: "create", size: 2 * MIB }]);
  const [a, b] = table.volumes;
  assert.ok(a && b);
  const overlapping: VolumeTable = { ...table, volumes: [a, { ...b, extents: [{ startLba: a.extents[0]!.startLba + EXTENT_ALIGNMENT_LBA, lengthLba: 2 * EXTENT_ALIGNMENT_LBA }] }] };
  assert.match(validateTable(overlapping).join(";"), /overlap/);
  const intoMetadata: VolumeTable = { ...table, volumes: [{ ...a, extents: [{ startLba: 0, lengthLba: 4 * EXTENT_ALIGNMENT_LBA }] }] };
  assert.match(validateTable(intoMetadata).join(";"), /outside the data area/);
  assert.throws(() => encodeSlot(overlapping, 1), /invalid volume table/);
});

test("the worst-case table fits one slot", () => {
  assert.ok(TABLE_BODY_BYTES_WORST_CASE <= TABLE_BODY_BYTES_MAX, `${TABLE_BODY_BYTES_WORST_CASE} <= ${TABLE_BODY_BYTES_MAX}`);
});

test("allocation: aligned, first volume at the data start, freed space reused, NO_SPACE names the sizes", () => {
  let table = emptyTable(16 * MIB);
  table = createVolume(table, "a", 1000 * 512).table;
  assert.deepEqual(table.volumes[0]?.extents, [{ startLba: DATA_START_LBA, lengthLba: EXTENT_ALIGNMENT_LBA }]);
  table = createVolume(table, "b", 4 * MIB).table;
  table = createVolume(table, "c", 2 * MIB).table;
  table = deleteVolume(table, "b").table;
  // Best fit: a 3 MiB request goes into the 4 MiB hole b left, not the 5 MiB tail.
  table = createVolume(table, "d", 3 * MIB).table;
  assert.equal(table.volumes.find((v) => v.name === "d")?.extents[0]?.startLba, DATA_START_LBA + EXTENT_ALIGNMENT_LBA);
  // Grow d past its hole: extends in place by 1 MiB, then takes the tail.
  table = growVolume(table, "d", 8 * MIB).table;
  const d = table.volumes.find((v) => v.name === "d");
  assert.equal(d?.extents.length, 2);
  assert.throws(() => createVolume(table, "e", 64 * MIB), (error: unknown) => error instanceof IpsanError && error.code === "NO_SPACE" && /needs 64M/.test(error.message));
  assert.throws(() => createVolume(table, "a", MIB), (error: unknown) => error instanceof IpsanError && error.code === "ALREADY_EXISTS");
  assert.throws(() => growVolume(table, "d", MIB), (error: unknown) => error instanceof IpsanError && error.code === "CONFLICT");
  assert.throws(() => createVolume(table, "bad/name", MIB), (error: unknown) => error instanceof IpsanError && error.field === "name");
  assert.throws(() => createVolume(table, "f", 1000), (error: unknown) => error instanceof IpsanError && error.field === "sizeBytes" && /1000/.test(error.message));
  const free = freeRanges(table);
  assert.ok(free.every((r) => r.startLba % EXTENT_ALIGNMENT_LBA === 0 && r.lengthLba % EXTENT_ALIGNMENT_LBA === 0));
});

async function withStorage<T>(body: (storage: Storage, path: string) => Promise<T>): Promise<T> {
  const dir = makeTempDir("table");
  const path = dir.file("storage.img");
  const { storage } = Storage.openFile(path, 32 * MIB);
  try {
    return await body(storage, storage.path);
  } finally {
    storage.closeSync();
    dir.remove();
  }
}

function scribble(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

test("a torn slot: the other slot holds the newest acknowledged table; the load rewrites the torn one", async () => {
  await withStorage(async (storage, path) => {
    const t1 = buildTable(32 * MIB, [{ kind: "create", size: MIB }]);
    const t2 = buildTable(32 * MIB, [{ kind: "create", size: MIB }, { kind: "create", size: 2 * MIB }]);
    const store = await TableStore.format(storage, t1); // generation 1 in both slots
    await store.write(t2); // generation 2 in both slots
    // Tear slot 0: part of its body replaced by garbage.
    scribble(path, SLOT_HEADER_BYTES + 10, Buffer.alloc(40, 0xee));
    const loaded = await TableStore.load(storage);
    assert.equal(loaded.kind, "loaded");
    if (loaded.kind !== "loaded") return;
    assert.deepEqual(loaded.table, t2);
    assert.equal(loaded.store.generation, 2);
    assert.equal(loaded.slots[0]?.kind, "invalid");
    assert.deepEqual(loaded.repaired.map((r) => [r.slot, r.why]), [[0, "damaged"]]);
    const again = await TableStore.load(storage);
    assert.ok(again.kind === "loaded" && again.slots.every((s) => s.kind === "valid") && again.repaired.length === 0);
    assert.deepEqual(again.kind === "loaded" ? again.table : undefined, t2);
  });
});

test("both slots corrupt: CORRUPT error naming both, not an empty table", async () => {
  await withStorage(async (storage, path) => {
    await TableStore.format(storage, buildTable(32 * MIB, [{ kind: "create", size: MIB }]));
    scribble(path, 40, Buffer.from("garbage"));
    scribble(path, TABLE_SLOT_BYTES, Buffer.from("XXXXXXXX"));
    await assert.rejects(TableStore.load(storage), (error: unknown) => {
      return error instanceof IpsanError && error.code === "CORRUPT" && /slot 0 \(bytes 0-2097151\): checksum mismatch/.test(error.message) && /slot 1 \(bytes 2097152-4194303\): bad magic/.test(error.message);
    });
  });
});

test("fresh all-zero storage loads as fresh; a foreign header is not formatted over", async () => {
  await withStorage(async (storage, path) => {
    assert.equal((await TableStore.load(storage)).kind, "fresh");
    scribble(path, 0, Buffer.from("\x7fELF some other data"));
    await assert.rejects(TableStore.load(storage), (error: unknown) => error instanceof IpsanError && error.code === "CORRUPT");
  });
});

test("the unit identity (issue 7): round-trips in a slot, is optional (tables before it), and a bad one is refused", () => {
  const id = newUnitId();
  assert.match(id, UNIT_ID_PATTERN);
  const withId: VolumeTable = { ...emptyTable(64 * MIB), unitId: id };
  const decoded = decodeSlot(encodeSlot(withId, 3));
  assert.ok(decoded.kind === "valid");
  assert.equal(decoded.table.unitId, id);
  const old = decodeSlot(encodeSlot(emptyTable(64 * MIB), 3));
  assert.ok(old.kind === "valid");
  assert.equal("unitId" in old.table, false, "a table without an identity reads back without one");
  assert.deepEqual(validateTable({ ...withId, unitId: "NOT-A-UUID" }), ['unitId "NOT-A-UUID" is not a lowercase UUID']);
  // A slot whose body names a bad identity is refused like any other bad field (the checksum is valid).
  const image = encodeSlot(withId, 3);
  const body = image.subarray(SLOT_HEADER_BYTES).toString("utf8").replace(id, id.toUpperCase());
  const header = Buffer.from(image.subarray(0, SLOT_HEADER_BYTES));
  header.writeUInt32LE(Buffer.byteLength(body), 24);
  createHash("sha256").update(header.subarray(0, 32)).update(body).digest().copy(header, 32);
  const bad = decodeSlot(Buffer.concat([header, Buffer.from(body)]));
  assert.deepEqual(bad, { kind: "invalid", reason: "unitId is not a lowercase UUID" });
});

test("a slot in a format version this unit does not know is invalid, naming the version (docs/OPERATIONS.md \"Upgrade\")", () => {
  const table = buildTable(64 * MIB, [{ kind: "create", size: MIB }]);
  const image = Buffer.from(encodeSlot(table, 3));
  assert.equal(decodeSlot(image).kind, "valid");
  image.writeUInt32LE(2, 8);
  assert.deepEqual(decodeSlot(image), { kind: "invalid", reason: "unknown format version 2" });
});
