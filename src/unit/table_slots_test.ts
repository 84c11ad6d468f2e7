// Proves, in process, the rules of docs/adr/0008-unit-never-loses-volumes.md
// for the volume table's two slots:
// - every acknowledged change is in both slots, so destroying either slot
//   after an acknowledgement still loads that change (a canary writer that
//   puts a change in one slot only must fail the same check);
// - a power cut at any point of a change (on a simulated disk that keeps only
//   what was fdatasynced, plus any subset of the 4 KiB pages of unsynced
//   writes) loads the acknowledged table or the one in flight, never a
//   refusal, and never anything older;
// - what a load decides for every kind of slot pair (decide(), pure): fresh
//   only when the whole metadata area is zero; both valid: the newer wins and
//   the other is rewritten; one damaged: WARN-level repair when the survivor
//   was written in both-slots mode, refusal (with --from-slot advice) when it
//   was written by an older unit; equal generations with different tables
//   refused; no valid slot refused; storage from before this change (one slot
//   per change) loads as before and is brought to both slots;
// - `ipsan unit format` in process: refuses without --force saying what it
//   would overwrite, refuses while the unit lock is held, rewrites the whole
//   metadata area (a foreign superblock in it is gone), leaves the data area
//   alone, and --from-slot keeps that slot's table with a higher generation.

import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import { join } from "node:path";
import { makeTempDir } from "../testing/tmp.ts";
import { IpsanError } from "../util/errors.ts";
import { setLogLevel } from "../util/log.ts";
import { METADATA_AREA_BYTES, MIB, SLOT_HEADER_BYTES, TABLE_SLOT_BYTES } from "./layout.ts";
import { Storage, UnitLock } from "./storage.ts";
import { UNIT_ID_PATTERN, type VolumeTable, decodeSlot, emptyTable, encodeSlot } from "./table.ts";
import { type SlotReport, TableStore, decide } from "./table_store.ts";
import { formatUnitStorage } from "./format.ts";
import { createVolume, deleteVolume, growVolume, setGrants } from "./volume_ops.ts";
import { LOCK_FILE_NAME, STORAGE_FILE_NAME } from "./volumes.ts";

const STORAGE_BYTES = 32 * MIB;
setLogLevel("error"); // thousands of repairs on simulated disks
/** Torn writes land in pieces of this size (a sector; slot images here span several). */
const PAGE_BYTES = 512;

/** A disk that keeps only fdatasynced writes across a power cut; unsynced ones may land in part, page by page. */
class PowerCutDisk {
  readonly path = "simulated-disk";
  readonly sizeBytes = STORAGE_BYTES;
  durable: Buffer = Buffer.alloc(METADATA_AREA_BYTES);
  pending: { position: number; bytes: Buffer }[] = [];
  /** Called before every write and sync: a test takes its crash images here. */
  onStep: (() => void) | undefined;

  async read(buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): Promise<void> {
    this.visible().copy(buffer, bufferOffset, positionBytes, positionBytes + lengthBytes);
  }
  async write(buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): Promise<void> {
    this.onStep?.();
    assert.ok(positionBytes + lengthBytes <= METADATA_AREA_BYTES, "the table store writes only the metadata area");
    this.pending.push({ position: positionBytes, bytes: Buffer.from(buffer.subarray(bufferOffset, bufferOffset + lengthBytes)) });
  }
  async sync(): Promise<void> {
    this.onStep?.();
    this.durable = this.visible();
    this.pending = [];
  }
  /** What the process reads: durable plus every pending write. */
  visible(): Buffer {
    const image = Buffer.from(this.durable);
    for (const w of this.pending) w.bytes.copy(image, w.position);
    return image;
  }
  /** Images a power cut now may leave: none, all, and some pages of each pending write (seeded). */
  crashImages(random: () => number): Buffer[] {
    const images = [Buffer.from(this.durable), this.visible()];
    for (let round = 0; round < 4; round++) {
      const image = Buffer.from(this.durable);
      for (const w of this.pending) {
        for (let at = 0; at < w.bytes.length; at += PAGE_BYTES) {
          if (random() < 0.5) w.bytes.copy(image, w.position + at, at, Math.min(at + PAGE_BYTES, w.bytes.length));
        }
      }
      images.push(image);
    }
    return images;
  }
  static from(image: Buffer): PowerCutDisk {
    const disk = new PowerCutDisk();
    disk.durable = Buffer.from(image);
    return disk;
  }
  asStorage(): Storage {
    return this as unknown as Storage;
  }
}

function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 4294967296;
  };
}

/** A run of changes: create, grow, delete, create ... (each a new table, its slot image a few sectors long). */
function tables(count: number): VolumeTable[] {
  const out: VolumeTable[] = [];
  let table = createVolume(emptyTable(STORAGE_BYTES), "granted", MIB).table;
  const grants = Array.from({ length: 24 }, (_, i) => `fd00:${i.toString(16)}::/64`);
  table = setGrants(table, "granted", grants).table;
  for (let i = 0; out.length < count; i++) {
    if (i % 3 === 0) table = createVolume(table, `v${i}`, MIB + 512 * i).table;
    else if (i % 3 === 1 && table.volumes[0] !== undefined) table = growVolume(table, table.volumes[0].name, table.volumes[0].sizeBytes + MIB).table;
    else if (table.volumes.length > 2 && table.volumes[2] !== undefined) table = deleteVolume(table, table.volumes[2].name).table;
    else table = createVolume(table, `w${i}`, MIB).table;
    out.push(table);
  }
  return out;
}

async function loadTable(image: Buffer): Promise<VolumeTable | "fresh"> {
  const loaded = await TableStore.load(PowerCutDisk.from(image).asStorage());
  return loaded.kind === "fresh" ? "fresh" : loaded.table;
}

function destroySlot(image: Buffer, slot: number): Buffer {
  const out = Buffer.from(image);
  out.fill(0xa5, slot * TABLE_SLOT_BYTES, slot * TABLE_SLOT_BYTES + 4 * PAGE_BYTES);
  return out;
}

type Writer = (disk: PowerCutDisk, table: VolumeTable, generation: number) => Promise<void>;

/** After each acknowledged change, destroying either slot still loads that change. Returns the first violation. */
async function firstLostAcknowledgedChange(write: Writer): Promise<string | undefined> {
  const disk = new PowerCutDisk();
  const all = tables(8);
  for (const [i, table] of all.entries()) {
    await write(disk, table, i + 1);
    for (const slot of [0, 1]) {
      const found = await loadTable(destroySlot(disk.durable, slot)).catch((error: unknown) => `refused: ${String(error)}`);
      if (JSON.stringify(found) !== JSON.stringify(table)) return `change ${i}, slot ${slot} destroyed: loaded ${typeof found === "string" ? found : `a table with ${found.volumes.length} volumes`}`;
    }
  }
  return undefined;
}

test("every acknowledged change is in both slots: destroying either slot afterwards still loads it (and a one-slot writer fails this)", async () => {
  const stores = new WeakMap<PowerCutDisk, TableStore>();
  const realWriter: Writer = async (disk, table) => {
    const store = stores.get(disk);
    if (store === undefined) stores.set(disk, await TableStore.format(disk.asStorage(), table));
    else await store.write(table);
  };
  assert.equal(await firstLostAcknowledgedChange(realWriter), undefined);
  // Canary: the write path before ADR 0008 (alternate slots, one per change), marked as if it wrote both.
  const oneSlotWriter: Writer = async (disk, table, generation) => {
    const image = encodeSlot(table, generation);
    await disk.write(image, 0, image.length, ((generation - 1) % 2) * TABLE_SLOT_BYTES);
    await disk.sync();
  };
  assert.match((await firstLostAcknowledgedChange(oneSlotWriter)) ?? "", /destroyed: loaded/);
});

test("a power cut at any point of a change loads the acknowledged table or the one in flight, never a refusal", async () => {
  const all = tables(4);
  const disk = new PowerCutDisk();
  const store = await TableStore.format(disk.asStorage(), emptyTable(STORAGE_BYTES));
  let acknowledged: VolumeTable = emptyTable(STORAGE_BYTES);
  const random = seeded(8008);
  let images = 0;
  for (const next of all) {
    const crashes: Buffer[] = [];
    disk.onStep = () => crashes.push(...disk.crashImages(random));
    await store.write(next);
    disk.onStep = undefined;
    crashes.push(...disk.crashImages(random));
    for (const image of crashes) {
      const found = await loadTable(image);
      const text = JSON.stringify(found);
      assert.ok(text === JSON.stringify(acknowledged) || text === JSON.stringify(next), `a crash image loaded neither the acknowledged nor the in-flight table: ${text.slice(0, 200)}`);
      // The loaded storage is whole again: both slots hold that table.
      const repaired = PowerCutDisk.from(image);
      await TableStore.load(repaired.asStorage());
      const slots = [0, 1].map((s) => decodeSlot(repaired.visible().subarray(s * TABLE_SLOT_BYTES, (s + 1) * TABLE_SLOT_BYTES)));
      assert.ok(slots.every((s) => s.kind === "valid" && JSON.stringify(s.table) === text), "after the load both slots hold the loaded table");
      images += 1;
    }
    acknowledged = next;
  }
  assert.ok(images > 60, `only ${images} crash images`);
});

function report(slot: number, image: Buffer | "zero" | "garbage"): SlotReport {
  const bytes = Buffer.alloc(TABLE_SLOT_BYTES);
  if (image === "garbage") bytes.fill(0x5a, 0, 3000);
  else if (image !== "zero") image.copy(bytes);
  const zero = image === "zero";
  return { slot, decoded: decodeSlot(bytes), zero, nonZeroBytes: zero ? 0 : 1 };
}

test("decide: what a load does with every kind of slot pair", () => {
  const [t1, t2] = tables(2) as [VolumeTable, VolumeTable];
  const v = (table: VolumeTable, generation: number, bothSlots = true) => encodeSlot(table, generation, bothSlots);
  const headerZeroed = Buffer.from(v(t1, 5));
  headerZeroed.fill(0, 0, SLOT_HEADER_BYTES);
  const cases: [string, SlotReport[], (verdict: ReturnType<typeof decide>) => void][] = [
    ["both zero: fresh", [report(0, "zero"), report(1, "zero")], (d) => assert.equal(d.kind, "fresh")],
    ["both equal", [report(0, v(t1, 4)), report(1, v(t1, 4))], (d) => assert.deepEqual(d.kind === "use" && [d.generation, d.repairs.length], [4, 0])],
    ["slot 1 newer (crash between the writes)", [report(0, v(t1, 4)), report(1, v(t2, 5))], (d) => assert.deepEqual(d.kind === "use" && [d.slot, d.repairs], [1, [{ slot: 0, why: "behind", found: "generation 4, 2 volumes" }]])],
    ["older layout, both valid: newest as before, the other brought up", [report(0, v(t2, 7, false)), report(1, v(t1, 6, false))], (d) => assert.deepEqual(d.kind === "use" && [d.slot, d.repairs.map((r) => r.slot)], [0, [1]])],
    ["slot 0 damaged, survivor in both-slots mode: use it, repair slot 0", [report(0, "garbage"), report(1, v(t2, 9))], (d) => assert.deepEqual(d.kind === "use" && [d.slot, d.repairs.map((r) => [r.slot, r.why])], [1, [[0, "damaged"]]])],
    ["slot 1 all zero (a format cut short), slot 0 valid: use it", [report(0, v(t1, 1)), report(1, "zero")], (d) => assert.deepEqual(d.kind === "use" && d.repairs.map((r) => r.slot), [1])],
    ["survivor from the older layout: refused, --from-slot offered", [report(0, v(t1, 6, false)), report(1, "garbage")], (d) => assert.deepEqual(d.kind === "refuse" && d.fromSlots, [0])],
    ["same generation, different tables: refused, either slot offered", [report(0, v(t1, 3)), report(1, v(t2, 3))], (d) => assert.deepEqual(d.kind === "refuse" && d.fromSlots, [0, 1])],
    ["both headers zeroed, bodies intact: refused, not fresh", [report(0, headerZeroed), report(1, headerZeroed)], (d) => assert.deepEqual(d.kind === "refuse" && d.fromSlots, [])],
    ["garbage and zero: refused", [report(0, "garbage"), report(1, "zero")], (d) => assert.equal(d.kind, "refuse")],
  ];
  for (const [name, slots, check] of cases) {
    try {
      check(decide(slots));
    } catch (error) {
      assert.fail(`${name}: ${String(error)}`);
    }
  }
});

async function withFile<T>(body: (path: string, dir: string) => Promise<T>): Promise<T> {
  const dir = makeTempDir("table-slots");
  const path = dir.file(STORAGE_FILE_NAME);
  const fd = openSync(path, "w");
  closeSync(fd);
  const { storage } = Storage.openFile(path, STORAGE_BYTES);
  storage.closeSync();
  try {
    return await body(path, dir.path);
  } finally {
    dir.remove();
  }
}

function poke(path: string, position: number, bytes: Buffer): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, position);
  } finally {
    closeSync(fd);
  }
}

function peek(path: string, position: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  const fd = openSync(path, "r");
  try {
    readSync(fd, out, 0, length, position);
  } finally {
    closeSync(fd);
  }
  return out;
}

async function loadFile(path: string) {
  const { storage } = Storage.openFile(path, undefined);
  try {
    return await TableStore.load(storage, { formatCommand: "ipsan unit format --data D" });
  } finally {
    storage.closeSync();
  }
}

test("fresh means the whole metadata area is zero: one byte at its last offset is refused, one past it is not", async () => {
  await withFile(async (path) => {
    poke(path, METADATA_AREA_BYTES, Buffer.from([1]));
    assert.equal((await loadFile(path)).kind, "fresh");
    poke(path, METADATA_AREA_BYTES - 1, Buffer.from([1]));
    await assert.rejects(loadFile(path), (error: unknown) => {
      return error instanceof IpsanError && error.code === "CORRUPT" && /slot 1 .*1 byte of the slot is not zero/.test(error.message) && /ipsan unit format --data D --force/.test(error.message);
    });
  });
});

test("storage written one slot per change (before ADR 0008) loads its newest table as before and is brought to both slots; a damaged slot there is refused", async () => {
  const [t1, t2] = tables(2) as [VolumeTable, VolumeTable];
  await withFile(async (path) => {
    poke(path, 0, encodeSlot(t2, 7, false));
    poke(path, TABLE_SLOT_BYTES, encodeSlot(t1, 6, false));
    const loaded = await loadFile(path);
    assert.ok(loaded.kind === "loaded");
    assert.deepEqual(loaded.table, t2);
    const slot1 = decodeSlot(peek(path, TABLE_SLOT_BYTES, TABLE_SLOT_BYTES));
    assert.ok(slot1.kind === "valid" && slot1.generation === 7 && slot1.bothSlots, "slot 1 now holds generation 7 too");
  });
  await withFile(async (path) => {
    poke(path, 0, encodeSlot(t2, 7, false));
    poke(path, TABLE_SLOT_BYTES, encodeSlot(t1, 6, false));
    poke(path, SLOT_HEADER_BYTES + 30, Buffer.alloc(16, 0xff)); // the newest slot's body
    const before = peek(path, 0, METADATA_AREA_BYTES);
    await assert.rejects(loadFile(path), (error: unknown) => {
      return error instanceof IpsanError && error.code === "CORRUPT" && /slot 0 .* is damaged \(checksum mismatch\)/.test(error.message) && /ipsan unit format --data D --from-slot 1 --force/.test(error.message);
    });
    assert.ok(peek(path, 0, METADATA_AREA_BYTES).equals(before), "a refused load writes nothing");
  });
});

test("ipsan unit format in process: refuses without --force and while locked, rewrites the whole metadata area, --from-slot keeps a table", async () => {
  const [t1, t2] = tables(2) as [VolumeTable, VolumeTable];
  await withFile(async (path, dir) => {
    poke(path, 0, encodeSlot(t2, 7, false));
    poke(path, TABLE_SLOT_BYTES, Buffer.from("garbage"));
    poke(path, 1024 + 56, Buffer.from([0x53, 0xef])); // an ext4 magic in slot 0's leftovers (past the image)
    poke(path, METADATA_AREA_BYTES, Buffer.from("data area"));
    const options = { dataDir: dir, devicePath: undefined, capacityBytes: undefined, fromSlot: undefined, force: false };
    await assert.rejects(formatUnitStorage(options), (error: unknown) => {
      return error instanceof IpsanError && error.code === "CONFLICT" && /without --force/.test(error.message) && /slot 0: generation 7, 2 volumes/.test(error.message);
    });
    const lock = UnitLock.acquire(join(dir, LOCK_FILE_NAME));
    try {
      await assert.rejects(formatUnitStorage({ ...options, force: true }), (error: unknown) => error instanceof IpsanError && error.code === "CONFLICT" && /locked/.test(error.message));
    } finally {
      lock.release();
    }
    const kept = await formatUnitStorage({ ...options, fromSlot: 0, force: true });
    assert.equal(kept.volumes, t2.volumes.length);
    const loaded = await loadFile(path);
    assert.ok(loaded.kind === "loaded" && loaded.repaired.length === 0);
    const { unitId, ...keptTable } = loaded.table;
    assert.deepEqual(keptTable, t2);
    assert.match(unitId ?? "", UNIT_ID_PATTERN, "a kept table without an identity gets one (issue 7)");
    assert.equal(loaded.store.generation, 8, "generations only grow");
    assert.ok(peek(path, 1024 + 56, 2).equals(Buffer.alloc(2)), "the rest of the metadata area is zeroed");
    const empty = await formatUnitStorage({ ...options, force: true });
    assert.deepEqual([empty.volumes, empty.generation], [0, 9]);
    const after = await loadFile(path);
    assert.ok(after.kind === "loaded" && after.table.volumes.length === 0);
    assert.equal(peek(path, METADATA_AREA_BYTES, 9).toString(), "data area", "the data area is not touched");
    void t1;
  });
});
