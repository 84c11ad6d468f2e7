// Issue 6 section 6, "a unit never loses volumes by itself", against real
// `ipsan unit` processes, one test per way a user lost volumes:
// 1. both 64-byte table headers zeroed (the slot bodies intact): the unit
//    refuses to start, naming the storage and `ipsan unit format ... --force`,
//    and the volumes' bytes (read from the storage file at the extents of the
//    table read before) are untouched, also after a start with --volume;
// 2. `--device` on a file holding a real ext4 file system: refused (the file
//    is byte for byte unchanged, e2fsck -fn clean); `ipsan unit format`
//    without --force refuses naming the ext4 signature; with --force it
//    formats and the unit starts; while that unit runs, format is refused;
// 3. the newest table slot damaged: the unit starts with the volume created
//    last (through the control API) still there with its data, logs a WARN
//    naming the slot, and both slots are valid afterwards;
// 5. fresh storage still formats by itself: a new file, and a --device whose
//    metadata area is all zero (bytes after it are left alone); one non-zero
//    byte inside that area is refused;
// and `ipsan unit format`'s own usage errors (exit 2) and new storage.
// (Case 4, a torn table write, is table_crash_test and table_slots_test.)

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, openSync, readSync, statSync, writeSync } from "node:fs";
import { controlOk } from "../testing/control.ts";
import { run } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, type UnitOptions, startUnit } from "../testing/unit.ts";
import { SECTOR_SIZE } from "../block/types.ts";
import { METADATA_AREA_BYTES, SLOT_HEADER_BYTES, TABLE_SLOT_BYTES } from "./layout.ts";
import { type VolumeRecord, type VolumeTable, decodeSlot } from "./table.ts";

const MIB = 1024 * 1024;

function ipsan(args: readonly string[]) {
  return run(process.execPath, [IPSAN_BIN, ...args], { timeoutMs: 30_000 });
}

function readAt(path: string, position: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  const fd = openSync(path, "r");
  try {
    readSync(fd, out, 0, length, position);
  } finally {
    closeSync(fd);
  }
  return out;
}

function writeAt(path: string, position: number, bytes: Buffer): void {
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, position);
  } finally {
    closeSync(fd);
  }
}

function sha256(bytes: Buffer): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** Both slots as decoded from the storage file (no unit running). */
function slots(path: string) {
  return [0, 1].map((slot) => decodeSlot(readAt(path, slot * TABLE_SLOT_BYTES, TABLE_SLOT_BYTES)));
}

/** The newest valid table on the storage file, and the slot holding it (the first, on a tie). */
function newestTable(path: string): { slot: number; generation: number; table: VolumeTable } {
  let best: { slot: number; generation: number; table: VolumeTable } | undefined;
  slots(path).forEach((decoded, slot) => {
    if (decoded.kind === "valid" && (best === undefined || decoded.generation > best.generation)) best = { slot, generation: decoded.generation, table: decoded.table };
  });
  assert.ok(best !== undefined, `no valid table on ${path}`);
  return best;
}

function volume(table: VolumeTable, name: string): VolumeRecord {
  const found = table.volumes.find((v) => v.name === name);
  assert.ok(found !== undefined, `volume ${name} in the table`);
  return found;
}

/** The volume's bytes, read straight from the storage file at its extents. */
function volumeBytes(path: string, v: VolumeRecord): Buffer {
  return Buffer.concat(v.extents.map((e) => readAt(path, e.startLba * SECTOR_SIZE, e.lengthLba * SECTOR_SIZE))).subarray(0, v.sizeBytes);
}

/** Fills the volume with random bytes, straight into the storage file; returns their checksum. */
function fillVolume(path: string, v: VolumeRecord): string {
  const data = randomBytes(v.sizeBytes);
  let at = 0;
  for (const e of v.extents) {
    const length = Math.min(e.lengthLba * SECTOR_SIZE, data.length - at);
    writeAt(path, e.startLba * SECTOR_SIZE, data.subarray(at, at + length));
    at += length;
  }
  return sha256(data);
}

/** Starts a unit that must refuse: returns the failure text (with its stderr); fails the test if it serves. */
async function refusedStart(options: UnitOptions): Promise<string> {
  let unit;
  try {
    unit = await startUnit({ readyTimeoutMs: 15_000, ...options });
  } catch (error) {
    return String(error);
  }
  const stderr = unit.stderr();
  await unit.stop();
  assert.fail(`the unit started and served instead of refusing:\n${stderr}`);
}

test("headers zeroed: the unit refuses to start, says how to proceed, and no volume byte changes", async () => {
  const dir = makeTempDir("refuse-headers");
  const storage = dir.file("storage.img");
  const options = { dataDir: dir.path, capacity: "64M", volumes: [{ name: "a", size: "8M" }, { name: "b", size: "12M" }] };
  try {
    const first = await startUnit(options);
    await first.stop();
    const table = newestTable(storage).table;
    const sums = { a: fillVolume(storage, volume(table, "a")), b: fillVolume(storage, volume(table, "b")) };
    // What the user did: dd if=/dev/zero bs=64 count=1 conv=notrunc, at 0 and at 2 MiB.
    writeAt(storage, 0, Buffer.alloc(SLOT_HEADER_BYTES));
    writeAt(storage, TABLE_SLOT_BYTES, Buffer.alloc(SLOT_HEADER_BYTES));
    const metadata = readAt(storage, 0, METADATA_AREA_BYTES);

    const refusal = await refusedStart(options);
    assert.match(refusal, /code=1/);
    assert.ok(refusal.includes(`storage ${storage}`), `the message names the storage: ${refusal}`);
    assert.ok(refusal.includes(`ipsan unit format --data ${dir.path} --force`), `the message says how to proceed: ${refusal}`);
    assert.match(refusal, /no table header/);
    assert.doesNotMatch(refusal, /storage formatted/);

    for (const name of ["a", "b"] as const) assert.equal(sha256(volumeBytes(storage, volume(table, name))), sums[name], `volume ${name}'s bytes are untouched`);
    assert.ok(readAt(storage, 0, METADATA_AREA_BYTES).equals(metadata), "the metadata area is untouched");

    // Without --force, format refuses too, and says what it would overwrite.
    const unforced = await ipsan(["unit", "format", "--data", dir.path]);
    assert.equal(unforced.code, 1, unforced.stderr);
    assert.match(unforced.stderr, /without --force: it would overwrite its first 4194304 bytes, which hold no usable volume table/);
    assert.ok(readAt(storage, 0, METADATA_AREA_BYTES).equals(metadata), "a refused format writes nothing");
  } finally {
    dir.remove();
  }
});

test("--device on a file holding ext4: refused and untouched; format --force then formats it; format is refused while a unit runs", async () => {
  const dir = makeTempDir("refuse-ext4");
  const device = dir.file("ext4.img");
  const data = dir.file("unit");
  try {
    const created = await run("truncate", ["-s", "64M", device]);
    assert.equal(created.code, 0, created.stderr);
    const mkfs = await run("mkfs.ext4", ["-q", "-F", device]);
    assert.equal(mkfs.code, 0, mkfs.stderr);
    const before = sha256(readAt(device, 0, statSync(device).size));
    const options = { dataDir: data, capacity: "64M", extraArgs: ["--device", device] };

    const refusal = await refusedStart(options);
    assert.match(refusal, /code=1/);
    assert.match(refusal, /looks like an ext2\/3\/4 file system/);
    assert.ok(refusal.includes(`ipsan unit format --data ${data} --device ${device} --force`), refusal);
    assert.equal(sha256(readAt(device, 0, statSync(device).size)), before, "the file is byte for byte unchanged");
    const fsck = await run("e2fsck", ["-fn", device]);
    assert.equal(fsck.code, 0, `e2fsck -fn after the refused start:\n${fsck.stdout}\n${fsck.stderr}`);

    const unforced = await ipsan(["unit", "format", "--data", data, "--device", device]);
    assert.equal(unforced.code, 1, unforced.stderr);
    assert.match(unforced.stderr, /without --force.*it looks like an ext2\/3\/4 file system/);
    assert.equal(sha256(readAt(device, 0, statSync(device).size)), before, "unchanged after format without --force");

    const forced = await ipsan(["unit", "format", "--data", data, "--device", device, "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stdout, /^formatted .*ext4\.img: 67108864 bytes, generation 1, 0 volumes; overwrote its first 4194304 bytes/);
    assert.ok(readAt(device, 1024 + 56, 2).equals(Buffer.alloc(2)), "the ext4 superblock magic in the metadata area is gone");

    const unit = await startUnit({ ...options, volumes: [{ name: "v", size: "8M" }] });
    try {
      const locked = await ipsan(["unit", "format", "--data", data, "--device", device, "--force"]);
      assert.equal(locked.code, 1, locked.stderr);
      assert.match(locked.stderr, /locked: another unit \(pid \d+\).*stop that unit before formatting/);
    } finally {
      await unit.stop();
    }
    assert.deepEqual(newestTable(device).table.volumes.map((v) => v.name), ["v"], "the refused format left the table alone");
  } finally {
    dir.remove();
  }
});

test("newest slot damaged: the unit starts with the volume created last and its data, WARNs naming the slot, and repairs it", async () => {
  const dir = makeTempDir("refuse-newest");
  const storage = dir.file("storage.img");
  const volumes = [{ name: "a", size: "8M" }];
  try {
    const first = await startUnit({ dataDir: dir.path, capacity: "64M", volumes, control: true });
    try {
      await controlOk(first, "POST", "/v1/volumes", { name: "c", sizeBytes: 8 * MIB });
    } finally {
      await first.stop();
    }
    const newest = newestTable(storage);
    const c = volume(newest.table, "c");
    const sum = fillVolume(storage, c);
    // Damage the newest slot's body (its checksum now fails).
    const at = newest.slot * TABLE_SLOT_BYTES + SLOT_HEADER_BYTES + 16;
    writeAt(storage, at, Buffer.from(readAt(storage, at, 32).map((b) => b ^ 0xff)));
    assert.equal(slots(storage)[newest.slot]?.kind, "invalid");

    // Restarted with --volume for c too: that must not re-create (and zero) it.
    const again = await startUnit({ dataDir: dir.path, capacity: "64M", volumes: [...volumes, { name: "c", size: "8M" }], control: true });
    try {
      const served = (await controlOk(again, "GET", "/v1/volumes/c")) as { extents: { startLba: number; lengthLba: number }[] };
      assert.deepEqual(served.extents.map((e) => [e.startLba, e.lengthLba]), c.extents.map((e) => [e.startLba, e.lengthLba]), "c kept its extents");
      assert.match(again.stderr(), new RegExp(`WARN .*volume table slot damaged.* slot=${newest.slot} `));
    } finally {
      await again.stop();
    }
    assert.equal(sha256(volumeBytes(storage, c)), sum, "c's data is intact");
    const after = slots(storage);
    assert.ok(after.every((s) => s.kind === "valid"), `both slots valid after the restart: ${JSON.stringify(after.map((s) => s.kind))}`);
    const generations = after.map((s) => (s.kind === "valid" ? s.generation : -1));
    assert.equal(generations[0], generations[1], "both slots hold the same (newest) generation");
  } finally {
    dir.remove();
  }
});

test("fresh storage formats by itself: a new file; a --device whose whole metadata area is zero; not one with a byte set in it", async () => {
  const dir = makeTempDir("fresh");
  try {
    const created = await startUnit({ dataDir: dir.file("new"), capacity: "32M", volumes: [{ name: "n", size: "4M" }] });
    await created.stop();
    assert.match(created.stderr(), /storage formatted/);

    const device = dir.file("zeroed.img");
    assert.equal((await run("truncate", ["-s", "32M", device])).code, 0);
    const beyond = randomBytes(4096);
    writeAt(device, METADATA_AREA_BYTES, beyond);
    const unit = await startUnit({ dataDir: dir.file("dev"), capacity: "32M", extraArgs: ["--device", device] });
    await unit.stop();
    assert.match(unit.stderr(), /storage formatted/);
    assert.ok(readAt(device, METADATA_AREA_BYTES, beyond.length).equals(beyond), "bytes past the metadata area are left alone");
    assert.equal(newestTable(device).table.volumes.length, 0);

    const dirty = dir.file("dirty.img");
    assert.equal((await run("truncate", ["-s", "32M", dirty])).code, 0);
    writeAt(dirty, METADATA_AREA_BYTES - 1, Buffer.from([1]));
    const refusal = await refusedStart({ dataDir: dir.file("dirty"), capacity: "32M", extraArgs: ["--device", dirty] });
    assert.match(refusal, /metadata area .* is not all zero/);
    assert.ok(readAt(dirty, 0, METADATA_AREA_BYTES - 1).equals(Buffer.alloc(METADATA_AREA_BYTES - 1)), "nothing written");
  } finally {
    dir.remove();
  }
});

test("ipsan unit format: usage errors exit 2 naming the flag; new storage needs no --force (it destroys nothing)", async () => {
  const dir = makeTempDir("format-cli");
  try {
    const cases: [string[], RegExp][] = [
      [["unit", "format"], /--data DIR is required/],
      [["unit", "format", "--data", dir.path, "--from-slot", "2", "--force"], /--from-slot: invalid slot "2"/],
      [["unit", "format", "--data", dir.path, "--force"], /--capacity SIZE is required to create the storage/],
      [["unit", "format", "--data", dir.path, "--capacity", "1M", "--force"], /--capacity 1048576 out of range/],
      [["unit", "format", "--data", dir.path, "--bogus"], /--bogus/],
    ];
    for (const [args, pattern] of cases) {
      const result = await ipsan(args);
      assert.equal(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
      assert.match(result.stderr, pattern);
    }
    const created = await ipsan(["unit", "format", "--data", dir.path, "--capacity", "16M"]);
    assert.equal(created.code, 0, created.stderr);
    assert.match(created.stdout, /: 16777216 bytes, generation 1, 0 volumes; overwrote nothing/);
    const fromSlot = await ipsan(["unit", "format", "--data", dir.path, "--from-slot", "1", "--force"]);
    assert.equal(fromSlot.code, 0, fromSlot.stderr);
    assert.match(fromSlot.stdout, /generation 2, 0 volumes; overwrote its volume table \(generation 1, no volumes\)/);
  } finally {
    dir.remove();
  }
});
