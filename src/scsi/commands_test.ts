// VERIFY, WRITE AND VERIFY, WRITE SAME, UNMAP, COMPARE AND WRITE, GET LBA
// STATUS, MODE SELECT, REPORT SUPPORTED OPERATION CODES, START STOP UNIT,
// PREVENT ALLOW, a read-only device and a full file system: a logical unit
// over a real volume, expected bytes from SBC-3/SPC-4's tables.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import type { BlockDevice } from "../block/types.ts";
import { run as runProcess, runOk } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { MIB } from "../unit/layout.ts";
import { UnitExportProvider } from "../unit/provider.ts";
import { VolumeManager } from "../unit/volumes.ts";
import { createLogicalUnit } from "./logical_unit.ts";
import { ALICE, IDENTITY, cdb10, cdb12, cdb16, expectedSense, hex, run, senseOf, withBed } from "./testing.ts";
import { ScsiStatus } from "./types.ts";

setLogLevel("error");
const SIZE = 4 * MIB;
const BLOCKS = SIZE / 512;

function pattern(bytes: number, seed: number): Buffer {
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 1) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

function unmapList(ranges: readonly [number, number][]): Buffer {
  // SBC-3 5.28.2: UNMAP DATA LENGTH (n-1), UNMAP BLOCK DESCRIPTOR DATA LENGTH, reserved, then 16-byte descriptors.
  const out = Buffer.alloc(8 + 16 * ranges.length);
  out.writeUInt16BE(out.length - 2, 0);
  out.writeUInt16BE(16 * ranges.length, 2);
  ranges.forEach(([lba, blocks], i) => {
    out.writeBigUInt64BE(BigInt(lba), 8 + 16 * i);
    out.writeUInt32BE(blocks, 16 + 16 * i);
  });
  return out;
}

function unmapCdb(length: number): number[] {
  return [0x42, 0, 0, 0, 0, 0, 0, (length >> 8) & 0xff, length & 0xff, 0];
}

function lbaStatusCdb(lba: number, allocation: number): number[] {
  return cdb16(0x9e, lba, allocation, 0x12);
}

test("VERIFY 10/12/16: BYTCHK 00b, 01b (MISCOMPARE with the offset in INFORMATION), 11b; 10b reserved", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const data = pattern(8 * 512, 1);
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 16, 8), data)).status, ScsiStatus.GOOD);
    for (const make of [(b1: number) => cdb10(0x2f, 16, 8, b1), (b1: number) => cdb12(0xaf, 16, 8, b1), (b1: number) => cdb16(0x8f, 16, 8, b1)]) {
      assert.equal((await run(lu, ALICE, make(0x00))).status, ScsiStatus.GOOD);
      assert.equal((await run(lu, ALICE, make(0x02), data)).status, ScsiStatus.GOOD);
      const wrong = Buffer.from(data);
      wrong[1234] = (wrong[1234] ?? 0) ^ 0x58;
      const miscompare = await run(lu, ALICE, make(0x02), wrong);
      assert.equal(miscompare.status, ScsiStatus.CHECK_CONDITION);
      // MISCOMPARE (Eh), MISCOMPARE DURING VERIFY OPERATION (1Dh/00h), VALID, INFORMATION = byte offset 1234.
      assert.equal(hex(miscompare.sense), expectedSense(0x0e, 0x1d, 0x00, 1234));
      assert.equal(senseOf(await run(lu, ALICE, make(0x04))), "05/24/00");
    }
    // BYTCHK 11b: one block compared with every block of the range.
    const same = Buffer.alloc(512, 0x77);
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 40, 4), Buffer.alloc(2048, 0x77))).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, cdb10(0x2f, 40, 4, 0x06), same)).status, ScsiStatus.GOOD);
    const r = await run(lu, ALICE, cdb10(0x2f, 39, 4, 0x06), same);
    assert.equal(senseOf(r), "0e/1d/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x2f, BLOCKS - 1, 2))), "05/21/00");
  });
});

test("WRITE AND VERIFY 10/12/16 writes the data durably", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    for (const [i, cdb] of [cdb10(0x2e, 64, 2, 0x02), cdb12(0xae, 66, 2), cdb16(0x8e, 68, 2, 0x12)].entries()) {
      const data = pattern(1024, i + 5);
      assert.equal((await run(lu, ALICE, cdb, data)).status, ScsiStatus.GOOD);
      const back = Buffer.alloc(1024);
      await device.read(back, (64 + 2 * i) * 512);
      assert.ok(back.equals(data));
    }
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x8e, BLOCKS - 1, 2), Buffer.alloc(1024))), "05/21/00");
  });
});

test("WRITE SAME 10/16: a pattern, zeroes with UNMAP (deallocated, reads zero), NDOB, 0 blocks to the end, exact Data-Out", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    const block = pattern(512, 9);
    assert.equal((await run(lu, ALICE, cdb10(0x41, 100, 2500), block)).status, ScsiStatus.GOOD);
    const back = Buffer.alloc(2500 * 512);
    await device.read(back, 100 * 512);
    for (let b = 0; b < 2500; b += 1) assert.ok(back.subarray(b * 512, (b + 1) * 512).equals(block), `block ${b}`);
    // UNMAP with zero data over a 4 KiB-aligned range: reads zero and GET LBA STATUS says deallocated.
    assert.equal((await run(lu, ALICE, cdb16(0x93, 1024, 1024, 0x08), Buffer.alloc(512))).status, ScsiStatus.GOOD);
    const status = await run(lu, ALICE, lbaStatusCdb(1024, 24));
    assert.equal(hex(status.dataIn), "00 00 00 14 00 00 00 00 00 00 00 00 00 00 04 00 00 00 04 00 01 00 00 00");
    // UNMAP with a non-zero block: the blocks are unmapped all the same and read back zero (LBPRZ).
    assert.equal((await run(lu, ALICE, cdb10(0x41, 2048, 16, 0x08), block)).status, ScsiStatus.GOOD);
    const unmapped = Buffer.alloc(16 * 512, 1);
    await device.read(unmapped, 2048 * 512);
    assert.ok(unmapped.every((b) => b === 0));
    // NDOB (WRITE SAME(16) only): zeroes without Data-Out.
    assert.equal((await run(lu, ALICE, cdb16(0x93, 100, 8, 0x01), undefined, 0)).status, ScsiStatus.GOOD);
    const zero = Buffer.alloc(8 * 512, 1);
    await device.read(zero, 100 * 512);
    assert.ok(zero.every((b) => b === 0));
    // NUMBER OF LOGICAL BLOCKS 0 (WSNZ=0): through the last LBA, if that is within MAXIMUM WRITE SAME LENGTH (16384 blocks).
    assert.equal((await run(lu, ALICE, cdb10(0x41, BLOCKS - 16, 0), block)).status, ScsiStatus.GOOD);
    const tail = Buffer.alloc(16 * 512);
    await device.read(tail, (BLOCKS - 16) * 512);
    for (let b = 0; b < 16; b += 1) assert.ok(tail.subarray(b * 512, (b + 1) * 512).equals(block), `tail block ${b}`);
    await withBed(16 * MIB, async (big) => {
      const { lu: bigLu } = await big.open();
      assert.equal(senseOf(await run(bigLu, ALICE, cdb10(0x41, 0, 0), block)), "05/24/00");
    });
    // ANCHOR, PBDATA/LBDATA: INVALID FIELD IN CDB.
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x41, 0, 1, 0x18), block)), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x41, 0, 1, 0x02), block)), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x41, BLOCKS - 1, 2), block)), "05/21/00");
    // Data-Out of other than one block (libiscsi's invalid_dataout_size): refused, nothing written.
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x41, 0, 1), Buffer.alloc(1024, 5), 1024)), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x41, 0, 1), Buffer.alloc(256, 5), 256)), "05/24/00");
    const first = Buffer.alloc(512, 1);
    await device.read(first, 0);
    assert.ok(first.every((b) => b === 0));
  });
});

test("UNMAP: parameter list parsed with bounds; all descriptors checked before any is applied (SBC-3 5.28)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 0, 64), Buffer.alloc(64 * 512, 0xaa))).status, ScsiStatus.GOOD);
    const list = unmapList([
      [0, 8],
      [16, 8],
    ]);
    assert.equal((await run(lu, ALICE, unmapCdb(list.length), list)).status, ScsiStatus.GOOD);
    const back = Buffer.alloc(64 * 512);
    await device.read(back, 0);
    assert.ok(back.subarray(0, 4096).every((b) => b === 0));
    assert.ok(back.subarray(4096, 8192).every((b) => b === 0xaa));
    assert.ok(back.subarray(8192, 12288).every((b) => b === 0));
    // GET LBA STATUS from 0: deallocated 0-7, mapped 8-15, deallocated 16-23, mapped 24-63, deallocated to the end.
    const status = await run(lu, ALICE, lbaStatusCdb(0, 8 + 16 * 8));
    const d = status.dataIn ?? Buffer.alloc(0);
    assert.equal(d.readUInt32BE(0), d.length - 4);
    const runs: string[] = [];
    for (let at = 8; at < d.length; at += 16) runs.push(`${d.readBigUInt64BE(at)}+${d.readUInt32BE(at + 8)}:${d[at + 12]}`);
    assert.deepEqual(runs, ["0+8:1", "8+8:0", "16+8:1", "24+40:0", `64+${BLOCKS - 64}:1`]);
    // One bad descriptor: LBA OUT OF RANGE, and the good one before it is not applied.
    const bad = unmapList([
      [24, 8],
      [BLOCKS - 4, 8],
    ]);
    assert.equal(hex((await run(lu, ALICE, unmapCdb(bad.length), bad)).sense), expectedSense(0x05, 0x21, 0x00));
    const still = Buffer.alloc(4096);
    await device.read(still, 24 * 512);
    assert.ok(still.every((b) => b === 0xaa));
    // PARAMETER LIST LENGTH 1-7: PARAMETER LIST LENGTH ERROR; 0: nothing to do.
    assert.equal(senseOf(await run(lu, ALICE, unmapCdb(4), Buffer.alloc(4))), "05/1a/00");
    assert.equal((await run(lu, ALICE, unmapCdb(0))).status, ScsiStatus.GOOD);
    // 257 descriptors (over MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT) and ANCHOR: refused.
    const many = unmapList(Array.from({ length: 257 }, (_, i) => [i, 1] as [number, number]));
    assert.equal((await run(lu, ALICE, unmapCdb(many.length), many)).status, ScsiStatus.CHECK_CONDITION);
    assert.equal(senseOf(await run(lu, ALICE, [0x42, 1, 0, 0, 0, 0, 0, 0, list.length, 0], list)), "05/24/00");
  });
});

test("COMPARE AND WRITE: writes on a match; MISCOMPARE with the offset and nothing written otherwise (SBC-3 5.2)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    const old = pattern(1024, 3);
    const next = pattern(1024, 4);
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 10, 2), old)).status, ScsiStatus.GOOD);
    const caw = (lba: number, blocks: number): number[] => {
      const c = cdb16(0x89, lba, 0);
      c[13] = blocks;
      return c;
    };
    assert.equal((await run(lu, ALICE, caw(10, 2), Buffer.concat([old, next]))).status, ScsiStatus.GOOD);
    const back = Buffer.alloc(1024);
    await device.read(back, 10 * 512);
    assert.ok(back.equals(next));
    const wrong = Buffer.from(old);
    const r = await run(lu, ALICE, caw(10, 2), Buffer.concat([wrong, pattern(1024, 8)]));
    assert.equal(r.status, ScsiStatus.CHECK_CONDITION);
    // The first differing byte of old vs next pattern is byte 0.
    assert.equal(hex(r.sense), expectedSense(0x0e, 0x1d, 0x00, 0));
    await device.read(back, 10 * 512);
    assert.ok(back.equals(next));
    const nearly = Buffer.from(next);
    nearly[700] = (nearly[700] ?? 0) ^ 1;
    assert.equal(hex((await run(lu, ALICE, caw(10, 2), Buffer.concat([nearly, old]))).sense), expectedSense(0x0e, 0x1d, 0x00, 700));
    // 0 blocks: nothing; out of range; a Data-Out other than 2 x blocks (libiscsi's invalid_dataout_size).
    assert.equal((await run(lu, ALICE, caw(10, 0), undefined, 0)).status, ScsiStatus.GOOD);
    assert.equal(senseOf(await run(lu, ALICE, caw(BLOCKS - 1, 2), Buffer.alloc(2048))), "05/21/00");
    assert.equal(senseOf(await run(lu, ALICE, caw(10, 1), Buffer.alloc(2048), 2048)), "05/24/00");
    // 256 blocks wrap the one-byte NUMBER OF LOGICAL BLOCKS to 0: the Data-Out of 2 x 256 blocks gives it away.
    assert.equal(senseOf(await run(lu, ALICE, caw(10, 0), Buffer.alloc(0), 2 * 256 * 512)), "05/24/00");
  });
});

test("GET LBA STATUS: a fresh volume is one deallocated run; beyond the end is LBA OUT OF RANGE (SBC-3 5.7)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const r = await run(lu, ALICE, lbaStatusCdb(8, 64));
    // PARAMETER DATA LENGTH 20, one descriptor: LBA 8, 8184 blocks, PROVISIONING STATUS 1 (deallocated).
    assert.equal(hex(r.dataIn), "00 00 00 14 00 00 00 00 00 00 00 00 00 00 00 08 00 00 1f f8 01 00 00 00");
    assert.equal(senseOf(await run(lu, ALICE, lbaStatusCdb(BLOCKS, 64))), "05/21/00");
    assert.equal((await run(lu, ALICE, lbaStatusCdb(0, 4))).dataIn?.length, 4);
  });
});

test("MODE SELECT 6/10 accepts the current values and refuses changes it cannot honour", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const sense = await run(lu, ALICE, [0x1a, 0x08, 0x08, 0, 0xff, 0]);
    const page = (sense.dataIn ?? Buffer.alloc(0)).subarray(4);
    const list6 = Buffer.concat([Buffer.from([0, 0, 0, 0]), page]);
    assert.equal((await run(lu, ALICE, [0x15, 0x10, 0, 0, list6.length, 0], list6)).status, ScsiStatus.GOOD);
    // With a block descriptor of the right block length.
    const withDescriptor = Buffer.concat([Buffer.from([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 2, 0]), page]);
    assert.equal((await run(lu, ALICE, [0x15, 0x10, 0, 0, withDescriptor.length, 0], withDescriptor)).status, ScsiStatus.GOOD);
    // MODE SELECT(10) header (8 bytes).
    const list10 = Buffer.concat([Buffer.alloc(8), page]);
    assert.equal((await run(lu, ALICE, [0x55, 0x10, 0, 0, 0, 0, 0, 0, list10.length, 0], list10)).status, ScsiStatus.GOOD);
    // Clearing WCE: not changeable: INVALID FIELD IN PARAMETER LIST, field pointer at the page's byte 2.
    const noWce = Buffer.from(list6);
    noWce[6] = 0;
    const refused = await run(lu, ALICE, [0x15, 0x10, 0, 0, noWce.length, 0], noWce);
    assert.equal(senseOf(refused), "05/26/00");
    assert.equal(hex(refused.sense?.subarray(15, 18)), "80 00 06");
    // A 4096-byte block length, SP=1, a truncated page, an unknown page.
    const badLength = Buffer.from(withDescriptor);
    badLength[10] = 0x10;
    assert.equal(senseOf(await run(lu, ALICE, [0x15, 0x10, 0, 0, badLength.length, 0], badLength)), "05/26/00");
    assert.equal(senseOf(await run(lu, ALICE, [0x15, 0x11, 0, 0, list6.length, 0], list6)), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, [0x15, 0x10, 0, 0, 10, 0], list6.subarray(0, 10))), "05/1a/00");
    const unknown = Buffer.from([0, 0, 0, 0, 0x19, 0x02, 0, 0]);
    assert.equal(senseOf(await run(lu, ALICE, [0x15, 0x10, 0, 0, unknown.length, 0], unknown)), "05/26/00");
  });
});

test("REPORT SUPPORTED OPERATION CODES: all, one command, one service action, timeouts descriptors (SPC-4 6.35)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const rsoc = (options: number, opcode: number, sa: number, allocation = 8192): number[] => [
      0xa3, 0x0c, options, opcode, (sa >> 8) & 0xff, sa & 0xff, (allocation >>> 24) & 0xff, (allocation >>> 16) & 0xff, (allocation >>> 8) & 0xff, allocation & 0xff, 0, 0,
    ];
    const all = (await run(lu, ALICE, rsoc(0, 0, 0))).dataIn ?? Buffer.alloc(0);
    assert.equal(all.readUInt32BE(0), all.length - 4);
    assert.equal((all.length - 4) % 8, 0);
    const descriptors = new Map<string, string>();
    for (let at = 4; at < all.length; at += 8) descriptors.set(`${all[at]?.toString(16)}/${all.readUInt16BE(at + 2).toString(16)}`, hex(all.subarray(at, at + 8)));
    // READ(10): opcode 28h, no service action, CDB LENGTH 10; READ CAPACITY(16): 9Eh/10h with SERVACTV.
    assert.equal(descriptors.get("28/0"), "28 00 00 00 00 00 00 0a");
    assert.equal(descriptors.get("9e/10"), "9e 00 00 10 00 01 00 10");
    for (const must of ["0/0", "12/0", "2a/0", "89/0", "42/0", "5e/0", "5f/0", "a0/0", "a3/c", "9e/12", "93/0", "41/0"]) assert.ok(descriptors.has(must), must);
    // One command: SUPPORT 011b, CDB SIZE 10, CDB USAGE DATA starting with the opcode.
    assert.equal(hex((await run(lu, ALICE, rsoc(1, 0x28, 0))).dataIn), "00 03 00 0a 28 fa ff ff ff ff 1f ff ff 04");
    // One service action: the usage data carries the service action in byte 1.
    const rc16 = (await run(lu, ALICE, rsoc(2, 0x9e, 0x10))).dataIn ?? Buffer.alloc(0);
    assert.equal(hex(rc16.subarray(0, 6)), "00 03 00 10 9e 10");
    // Not supported: SUPPORT 001b.
    assert.equal(hex((await run(lu, ALICE, rsoc(1, 0x04, 0))).dataIn), "00 01 00 00");
    // A service-action opcode asked without one, and the reverse: INVALID FIELD IN CDB.
    assert.equal(senseOf(await run(lu, ALICE, rsoc(1, 0x9e, 0))), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, rsoc(2, 0x28, 0))), "05/24/00");
    // RCTD: CTDP set and a 12-byte command timeouts descriptor (length 000Ah) after each.
    const timed = (await run(lu, ALICE, rsoc(0x81, 0x28, 0))).dataIn ?? Buffer.alloc(0);
    assert.equal(hex(timed.subarray(0, 2)), "00 83");
    assert.equal(hex(timed.subarray(14, 16)), "00 0a");
    const allTimed = (await run(lu, ALICE, rsoc(0x80, 0, 0))).dataIn ?? Buffer.alloc(0);
    assert.equal(allTimed.readUInt32BE(0), descriptors.size * 20);
    assert.equal(allTimed[4 + 5], 0x02, "CTDP");
  });
});

test("START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL on a non-removable unit", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    assert.equal((await run(lu, ALICE, [0x1b, 0, 0, 0, 0x00, 0])).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, [0x1b, 1, 0, 0, 0x01, 0])).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, [0x00, 0, 0, 0, 0, 0])).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, [0x1e, 0, 0, 0, 0x01, 0])).status, ScsiStatus.GOOD);
    // Ejecting while prevented: ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED (53h/02h).
    assert.equal(senseOf(await run(lu, ALICE, [0x1b, 0, 0, 0, 0x02, 0])), "05/53/02");
    assert.equal((await run(lu, ALICE, [0x1e, 0, 0, 0, 0x00, 0])).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, [0x1b, 0, 0, 0, 0x02, 0])).status, ScsiStatus.GOOD);
    assert.equal(senseOf(await run(lu, ALICE, [0x1e, 0, 0, 0, 0x04, 0])), "05/24/00");
  });
});

test("a read-only device: writes are DATA PROTECT / WRITE PROTECTED, MODE SENSE shows WP", async () => {
  await withBed(SIZE, async (bed) => {
    const { device } = await bed.open();
    // The same real device, seen read-only (no read-only export exists yet; the LU must honour the capability).
    const readOnly: BlockDevice = {
      name: device.name,
      description: device.description,
      sizeBytes: device.sizeBytes,
      capabilities: { ...device.capabilities, readOnly: true },
      read: (buffer, offset) => device.read(buffer, offset),
      write: (buffer, offset, fua) => device.write(buffer, offset, fua),
      flush: () => device.flush(),
      trim: (offset, length, fua) => device.trim(offset, length, fua),
      zero: (offset, length, options) => device.zero(offset, length, options),
      cache: (offset, length) => device.cache(offset, length),
      extents: (offset, length) => device.extents(offset, length),
      close: () => Promise.resolve(),
    };
    const lu = createLogicalUnit(readOnly, IDENTITY);
    assert.equal(hex((await run(lu, ALICE, cdb10(0x2a, 0, 1), Buffer.alloc(512))).sense), expectedSense(0x07, 0x27, 0x00));
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x41, 0, 1), Buffer.alloc(512))), "07/27/00");
    assert.equal((await run(lu, ALICE, cdb10(0x28, 0, 1))).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, [0x1a, 0x08, 0x08, 0, 0xff, 0])).dataIn?.[2], 0x90, "WP|DPOFUA");
    // No thin provisioning on a read-only device: UNMAP is not a command it has.
    assert.equal(senseOf(await run(lu, ALICE, unmapCdb(24), unmapList([[0, 1]]))), "05/20/00");
  });
});

test("a full file system under the storage: WRITE answers DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("scsi-enospc");
  const mnt = dir.file("fs");
  mkdirSync(mnt);
  await runOk("mount", ["-t", "tmpfs", "-o", "size=8M", "tmpfs", mnt]);
  try {
    const manager = await VolumeManager.open({ dataDir: `${mnt}/data`, capacityBytes: 64 * MIB });
    try {
      await manager.create("vol", 32 * MIB);
      const device = await new UnitExportProvider(manager).open("vol", { address: "127.0.0.1", port: 1 });
      const lu = createLogicalUnit(device, IDENTITY);
      let answer = "";
      for (let lba = 0; lba < (32 * MIB) / 512 && answer === ""; lba += 2048) {
        const r = await run(lu, ALICE, cdb10(0x2a, lba, 2048, 0x08), Buffer.alloc(MIB, 0x5a));
        if (r.status !== ScsiStatus.GOOD) answer = hex(r.sense);
      }
      assert.equal(answer, expectedSense(0x07, 0x27, 0x07));
      await device.close();
    } finally {
      await manager.close();
    }
  } finally {
    await runProcess("umount", [mnt]);
    dir.remove();
  }
});

test("ORWRITE(16) ORs the Data-Out into the blocks; PRE-FETCH 10/16; READ DEFECT DATA 10/12 reports no defects (SBC-3 5.8, 5.9, 5.12)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 4, 2), Buffer.alloc(1024, 0x0f))).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, cdb16(0x8b, 4, 2), Buffer.alloc(1024, 0x30))).status, ScsiStatus.GOOD);
    const back = Buffer.alloc(1024);
    await device.read(back, 4 * 512);
    assert.ok(back.every((b) => b === 0x3f));
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x8b, BLOCKS - 1, 2), Buffer.alloc(1024))), "05/21/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x8b, 0, 1, 0x20), Buffer.alloc(512))), "05/24/00");
    assert.equal((await run(lu, ALICE, cdb10(0x34, 0, 256))).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, cdb16(0x90, BLOCKS - 256, 256, 0x02))).status, ScsiStatus.GOOD);
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x90, BLOCKS, 1))), "05/21/00");
    // READ DEFECT DATA(10): reserved, PLISTV=0|GLISTV=0|format, DEFECT LIST LENGTH 0.
    assert.equal(hex((await run(lu, ALICE, [0x37, 0, 0x18 | 0x05, 0, 0, 0, 0, 0, 32, 0])).dataIn), "00 05 00 00");
    assert.equal(hex((await run(lu, ALICE, [0xb7, 0x18 | 0x04, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0])).dataIn), "00 04 00 00 00 00 00 00");
  });
});

test("a revoked export (its volume deleted) answers NOT READY, never a rejection", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    assert.equal((await run(lu, ALICE, cdb10(0x28, 0, 1))).status, ScsiStatus.GOOD);
    await bed.manager.delete("vol");
    assert.equal(hex((await run(lu, ALICE, cdb10(0x28, 0, 1))).sense), expectedSense(0x02, 0x04, 0x03));
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x2a, 0, 1), Buffer.alloc(512))), "02/04/03");
  });
});
