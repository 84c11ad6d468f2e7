// The logical unit over a real volume (a unit's storage file through
// VolumeManager and UnitExportProvider), command by command. Expected bytes
// are written from SPC-4 and SBC-3's tables (field by field, with the
// section named), not from the implementation.

import { test } from "node:test";
import assert from "node:assert/strict";
import { setLogLevel } from "../util/log.ts";
import { MIB } from "../unit/layout.ts";
import { ALICE, BOB, IDENTITY, cdb10, cdb12, cdb16, expectedSense, hex, login, run, senseOf, withBed } from "./testing.ts";
import { ScsiStatus } from "./types.ts";

setLogLevel("error");
const SIZE = 4 * MIB;
const BLOCKS = SIZE / 512;

test("standard INQUIRY (SPC-4 6.6.2) and allocation length", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const r = await run(lu, ALICE, [0x12, 0, 0, 0, 96, 0]);
    assert.equal(r.status, ScsiStatus.GOOD);
    const d = r.dataIn ?? Buffer.alloc(0);
    // byte 0: qualifier 000b, type 00h; 1: RMB 0; 2: VERSION 06h (SPC-4); 3: HISUP|format 2; 4: ADDITIONAL LENGTH n-4.
    assert.equal(hex(d.subarray(0, 8)), "00 00 06 12 5b 00 00 02");
    assert.equal(d.subarray(8, 16).toString("ascii"), "IPSAN   ");
    assert.equal(d.subarray(16, 32).toString("ascii"), "ipsan volume    ");
    assert.equal(d.subarray(32, 36).toString("ascii"), "0001");
    // Version descriptors: SAM-5 00A0h, iSCSI 0960h, SPC-4 0460h, SBC-3 04C0h.
    assert.equal(hex(d.subarray(58, 66)), "00 a0 09 60 04 60 04 c0");
    const short = await run(lu, ALICE, [0x12, 0, 0, 0, 5, 0]);
    assert.equal(hex(short.dataIn), "00 00 06 12 5b");
    // EVPD=0 with a page code, and CMDDT: INVALID FIELD IN CDB.
    assert.equal(senseOf(await run(lu, ALICE, [0x12, 0, 0x80, 0, 96, 0])), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, [0x12, 0x02, 0, 0, 96, 0])), "05/24/00");
  });
});

test("VPD pages 0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2 (SPC-4 7.8, SBC-3 6.5)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const page = async (code: number): Promise<Buffer> => {
      const r = await run(lu, ALICE, [0x12, 0x01, code, 0x01, 0x00, 0]);
      assert.equal(r.status, ScsiStatus.GOOD, `page ${code}`);
      return r.dataIn ?? Buffer.alloc(0);
    };
    assert.equal(hex(await page(0x00)), "00 00 00 07 00 80 83 86 b0 b1 b2");
    const serial = await page(0x80);
    assert.equal(hex(serial.subarray(0, 4)), "00 80 00 10");
    assert.equal(serial.subarray(4).toString("ascii"), IDENTITY.serial);
    const ids = await page(0x83);
    assert.equal(hex(ids.subarray(0, 2)), "00 83");
    assert.equal(ids.readUInt16BE(2), ids.length - 4);
    // NAA designator: code set 1 (binary), association 00b, type 3, length 8, the NAA's 16 digits.
    assert.equal(hex(ids.subarray(4, 16)), "01 03 00 08 31 23 45 67 89 ab cd ef");
    // T10 vendor ID designator: code set 2 (ASCII), type 1: "IPSAN   " + serial.
    assert.equal(hex(ids.subarray(16, 20)), "02 01 00 18");
    assert.equal(ids.subarray(20, 44).toString("ascii"), `IPSAN   ${IDENTITY.serial}`);
    // Relative target port: protocol 5 (iSCSI) | code set 1, PIV | association 01b | type 4, port 1.
    assert.equal(hex(ids.subarray(44, 52)), "51 94 00 04 00 00 00 01");
    const limits = await page(0xb0);
    assert.equal(hex(limits.subarray(0, 4)), "00 b0 00 3c");
    assert.equal(limits[4], 0x00, "WSNZ=0");
    assert.equal(limits[5], 255, "MAXIMUM COMPARE AND WRITE LENGTH");
    assert.equal(limits.readUInt16BE(6), 8, "OPTIMAL TRANSFER LENGTH GRANULARITY: 4 KiB");
    assert.equal(limits.readUInt32BE(8), 16384, "MAXIMUM TRANSFER LENGTH: 8 MiB");
    assert.equal(limits.readUInt32BE(12), 2048, "OPTIMAL TRANSFER LENGTH: 1 MiB");
    assert.equal(limits.readUInt32BE(20), 1024 * 1024, "MAXIMUM UNMAP LBA COUNT: 2^20 blocks");
    assert.equal(limits.readUInt32BE(24), 256, "MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT");
    assert.equal(limits.readUInt32BE(28), 8, "OPTIMAL UNMAP GRANULARITY");
    assert.equal(limits.readUInt32BE(32), 0x80000000, "UGAVALID, alignment 0");
    assert.equal(limits.readBigUInt64BE(36), 16384n, "MAXIMUM WRITE SAME LENGTH: 8 MiB");
    const characteristics = await page(0xb1);
    assert.equal(hex(characteristics.subarray(0, 6)), "00 b1 00 3c 00 01");
    // LBPU|LBPWS|LBPWS10|LBPRZ, PROVISIONING TYPE 010b (thin).
    assert.equal(hex(await page(0xb2)), "00 b2 00 04 00 e4 02 00");
    // Extended INQUIRY Data (SPC-4 7.8.7): PAGE LENGTH 003Ch; byte 5 HEADSUP (bit 2), ORDSUP (1), SIMPSUP (0); all else 0.
    const extended = await page(0x86);
    assert.equal(hex(extended.subarray(0, 6)), "00 86 00 3c 00 07");
    assert.equal(extended.length, 64);
    assert.ok(extended.subarray(6).every((b) => b === 0), "no other Extended INQUIRY bit is set");
    assert.equal(senseOf(await run(lu, ALICE, [0x12, 0x01, 0x87, 0, 0xff, 0])), "05/24/00");
  });
});

test("READ CAPACITY 10/16 (SBC-3 5.15, 5.16)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const r10 = await run(lu, ALICE, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert.equal(hex(r10.dataIn), "00 00 1f ff 00 00 02 00");
    const r16 = await run(lu, ALICE, [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]);
    // RETURNED LOGICAL BLOCK ADDRESS, LOGICAL BLOCK LENGTH, PROT_EN 0, LBPPBE 0, LBPME|LBPRZ.
    assert.equal(hex(r16.dataIn?.subarray(0, 16)), "00 00 00 00 00 00 1f ff 00 00 02 00 00 00 c0 00");
    assert.equal(r16.dataIn?.length, 32);
    const trimmed = await run(lu, ALICE, [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]);
    assert.equal(trimmed.dataIn?.length, 8);
    // PMI=0 with a non-zero LBA is an invalid field.
    assert.equal(senseOf(await run(lu, ALICE, [0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])), "05/24/00");
  });
});

test("READ and WRITE 6/10/12/16 round trip; FUA; out of range; over the maximum transfer", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    const data = Buffer.alloc(4096);
    for (let i = 0; i < data.length; i += 1) data[i] = (i * 7 + 3) & 0xff;
    for (const [write, read] of [
      [cdb10(0x2a, 8, 8), cdb10(0x28, 8, 8)],
      [cdb10(0x2a, 100, 8, 0x08), cdb10(0x28, 100, 8, 0x18)],
      [cdb12(0xaa, 200, 8), cdb12(0xa8, 200, 8)],
      [cdb16(0x8a, BLOCKS - 8, 8, 0x08), cdb16(0x88, BLOCKS - 8, 8)],
      [[0x0a, 0, 0x01, 0x2c, 8, 0], [0x08, 0, 0x01, 0x2c, 8, 0]],
    ]) {
      assert.equal((await run(lu, ALICE, write ?? [], data)).status, ScsiStatus.GOOD);
      const back = await run(lu, ALICE, read ?? []);
      assert.equal(back.status, ScsiStatus.GOOD);
      assert.ok(back.dataIn?.equals(data), `read back ${hex(Buffer.from(read ?? []))}`);
    }
    // The bytes really are on the device where the LBA says.
    const direct = Buffer.alloc(4096);
    await device.read(direct, 200 * 512);
    assert.ok(direct.equals(data));
    // READ(6) with TRANSFER LENGTH 0 means 256 blocks.
    assert.equal((await run(lu, ALICE, [0x08, 0, 0, 0, 0, 0])).dataIn?.length, 256 * 512);
    // Zero-length READ/WRITE(10): GOOD, no data.
    const none = await run(lu, ALICE, cdb10(0x28, 0, 0));
    assert.equal(none.status, ScsiStatus.GOOD);
    assert.equal(none.dataIn, undefined);
    // LBA OUT OF RANGE (SBC-3 4.5): fixed-format sense 70h, ILLEGAL REQUEST, 21h/00h.
    const beyond = await run(lu, ALICE, cdb10(0x28, BLOCKS - 1, 2));
    assert.equal(beyond.status, ScsiStatus.CHECK_CONDITION);
    assert.equal(hex(beyond.sense), expectedSense(0x05, 0x21, 0x00));
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x88, 0xffffffffffffffffn, 1))), "05/21/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x8a, BLOCKS, 1), Buffer.alloc(512))), "05/21/00");
    // A transfer over MAXIMUM TRANSFER LENGTH (16384 blocks): INVALID FIELD IN CDB.
    await withBed(16 * MIB, async (big) => {
      const { lu: bigLu } = await big.open();
      assert.equal(senseOf(await run(bigLu, ALICE, cdb16(0x88, 0, 16385))), "05/24/00");
      // Over MAXIMUM WRITE SAME LENGTH (16384 blocks) too.
      assert.equal(senseOf(await run(bigLu, ALICE, cdb16(0x93, 0, 16385, 0x08), Buffer.alloc(512))), "05/24/00");
    });
    // RDPROTECT/WRPROTECT without protection information: INVALID FIELD IN CDB.
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x28, 0, 1, 0x20))), "05/24/00");
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x2a, 0, 1, 0x20), Buffer.alloc(512))), "05/24/00");
    // Data-Out shorter than the CDB's transfer (EDTL below it, FCP-4 9.4.2 a): the whole blocks that came are written.
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 8, 2), Buffer.alloc(512, 0xee))).status, ScsiStatus.GOOD);
    const after = await run(lu, ALICE, cdb10(0x28, 8, 2));
    assert.ok(after.dataIn?.subarray(0, 512).every((b) => b === 0xee));
    assert.ok(after.dataIn?.subarray(512).equals(data.subarray(512, 1024)));
    assert.equal((await run(lu, ALICE, cdb10(0x2a, 8, 1), Buffer.alloc(0), 0)).status, ScsiStatus.GOOD);
    // A partial block: INVALID FIELD IN COMMAND INFORMATION UNIT (0Eh/03h), nothing written.
    assert.equal(senseOf(await run(lu, ALICE, cdb10(0x2a, 8, 1), Buffer.alloc(200, 0x11), 200)), "05/0e/03");
    assert.equal((await run(lu, ALICE, cdb10(0x28, 8, 1))).dataIn?.[0], 0xee);
  });
});

test("unit attention after login, REQUEST SENSE, TEST UNIT READY, unsupported opcodes", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    lu.nexusAdded(ALICE);
    // INQUIRY and REPORT LUNS neither report nor clear it (SPC-4 5.14).
    assert.equal((await run(lu, ALICE, [0x12, 0, 0, 0, 36, 0])).status, ScsiStatus.GOOD);
    const ua = await run(lu, ALICE, [0x00, 0, 0, 0, 0, 0]);
    assert.equal(ua.status, ScsiStatus.CHECK_CONDITION);
    // UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h).
    assert.equal(hex(ua.sense), expectedSense(0x06, 0x29, 0x00));
    assert.equal((await run(lu, ALICE, [0x00, 0, 0, 0, 0, 0])).status, ScsiStatus.GOOD);
    // REQUEST SENSE with nothing pending: NO SENSE.
    const rs = await run(lu, ALICE, [0x03, 0, 0, 0, 18, 0]);
    assert.equal(hex(rs.dataIn), expectedSense(0, 0, 0));
    // REQUEST SENSE reports and clears a pending attention.
    lu.reset(BOB);
    const rs2 = await run(lu, ALICE, [0x03, 0, 0, 0, 252, 0]);
    assert.equal(rs2.status, ScsiStatus.GOOD);
    assert.equal(hex(rs2.dataIn), expectedSense(0x06, 0x29, 0x00));
    assert.equal((await run(lu, ALICE, [0x00, 0, 0, 0, 0, 0])).status, ScsiStatus.GOOD);
    // FORMAT UNIT (04h) is not implemented: INVALID COMMAND OPERATION CODE 20h/00h.
    const bad = await run(lu, ALICE, [0x04, 0, 0, 0, 0, 0]);
    assert.equal(hex(bad.sense), expectedSense(0x05, 0x20, 0x00));
    // An unknown service action of SERVICE ACTION IN(16): INVALID FIELD IN CDB, pointing at byte 1.
    const sa = await run(lu, ALICE, [0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]);
    assert.equal(senseOf(sa), "05/24/00");
    assert.equal(hex(sa.sense?.subarray(15, 18)), "cc 00 01", "SKSV|C/D|BPV bit 4, field byte 1");
  });
});

test("REPORT LUNS (SPC-4 6.33) and SYNCHRONIZE CACHE 10/16", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const r = await run(lu, ALICE, [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]);
    assert.equal(hex(r.dataIn), "00 00 00 08 00 00 00 00 00 00 00 00 00 00 00 00");
    assert.equal(senseOf(await run(lu, ALICE, [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0f, 0, 0])), "05/24/00");
    assert.equal((await run(lu, ALICE, cdb10(0x35, 0, 0))).status, ScsiStatus.GOOD);
    assert.equal((await run(lu, ALICE, cdb16(0x91, 0, BLOCKS))).status, ScsiStatus.GOOD);
    assert.equal(senseOf(await run(lu, ALICE, cdb16(0x91, BLOCKS, 1))), "05/21/00");
  });
});

test("MODE SENSE 6/10: caching, control, informational exceptions, all pages; DBD, PC (SPC-4 7.5, SBC-3 6.4.5)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const caching = await run(lu, ALICE, [0x1a, 0, 0x08, 0, 0xff, 0]);
    const d = caching.dataIn ?? Buffer.alloc(0);
    // Header: MODE DATA LENGTH 31, MEDIUM TYPE 0, DPOFUA, BLOCK DESCRIPTOR LENGTH 8.
    assert.equal(hex(d.subarray(0, 4)), "1f 00 10 08");
    // Short block descriptor: NUMBER OF LOGICAL BLOCKS 8192, LOGICAL BLOCK LENGTH 512.
    assert.equal(hex(d.subarray(4, 12)), "00 00 20 00 00 00 02 00");
    // Caching page 08h, length 12h, WCE=1.
    assert.equal(hex(d.subarray(12, 16)), "08 12 04 00");
    assert.equal(d.length, 32);
    const dbd = await run(lu, ALICE, [0x1a, 0x08, 0x0a, 0, 0xff, 0]);
    assert.equal(hex(dbd.dataIn), "0f 00 10 00 0a 0a 00 10 00 00 00 00 ff ff 00 00");
    const ie = await run(lu, ALICE, [0x1a, 0x08, 0x1c, 0, 0xff, 0]);
    assert.equal(hex(ie.dataIn), "0f 00 10 00 1c 0a 08 00 00 00 00 00 00 00 00 00");
    const all = await run(lu, ALICE, [0x5a, 0x08, 0x3f, 0, 0, 0, 0, 0x10, 0, 0]);
    const a = all.dataIn ?? Buffer.alloc(0);
    // MODE SENSE(10) header: MODE DATA LENGTH n-2, DPOFUA, BLOCK DESCRIPTOR LENGTH 0; then pages 08h, 0Ah, 1Ch.
    assert.equal(hex(a.subarray(0, 8)), "00 32 00 10 00 00 00 00");
    assert.deepEqual([a[8], a[28], a[40]], [0x08, 0x0a, 0x1c]);
    // Changeable values: nothing is changeable.
    const changeable = await run(lu, ALICE, [0x1a, 0x08, 0x48, 0, 0xff, 0]);
    assert.equal(hex(changeable.dataIn?.subarray(4, 8)), "08 12 00 00");
    // Long LBA block descriptor (LLBAA): 16 bytes, LONGLBA set.
    const long = await run(lu, ALICE, [0x5a, 0x10, 0x08, 0, 0, 0, 0, 0x10, 0, 0]);
    assert.equal(hex(long.dataIn?.subarray(0, 24)), "00 2a 00 10 01 00 00 10 00 00 00 00 00 00 20 00 00 00 00 00 00 00 02 00");
    // Saved values: SAVING PARAMETERS NOT SUPPORTED; an unknown page: INVALID FIELD IN CDB.
    assert.equal(senseOf(await run(lu, ALICE, [0x1a, 0, 0xc8, 0, 0xff, 0])), "05/39/00");
    assert.equal(senseOf(await run(lu, ALICE, [0x1a, 0, 0x19, 0, 0xff, 0])), "05/24/00");
    // Allocation length truncates.
    assert.equal((await run(lu, ALICE, [0x1a, 0, 0x3f, 0, 4, 0])).dataIn?.length, 4);
  });
});

test("the registry shares one logical unit's state across sessions and drops it with the last", async () => {
  await withBed(SIZE, async (bed) => {
    const first = await bed.open();
    const second = await bed.open();
    assert.equal(bed.registry.size, 1);
    await login(first.lu, ALICE);
    await login(second.lu, BOB);
    // RESERVE(6) through ALICE's session conflicts with BOB's.
    assert.equal((await run(first.lu, ALICE, [0x16, 0, 0, 0, 0, 0])).status, ScsiStatus.GOOD);
    assert.equal((await run(second.lu, BOB, cdb10(0x28, 0, 1))).status, ScsiStatus.RESERVATION_CONFLICT);
    // INQUIRY and REPORT LUNS are allowed through another nexus's reservation.
    assert.equal((await run(second.lu, BOB, [0x12, 0, 0, 0, 36, 0])).status, ScsiStatus.GOOD);
    first.lu.nexusRemoved(ALICE);
    assert.equal((await run(second.lu, BOB, cdb10(0x28, 0, 1))).status, ScsiStatus.GOOD);
    await first.close();
    await second.close();
    assert.equal(bed.registry.size, 0);
  });
});

test("VPD 0x83 with the target name: SCSI name strings of the target port and the target device (SPC-4 7.8.6.11)", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu } = await bed.open();
    const who = { ...ALICE, targetName: "iqn.2026-12.org.ipsan:u.vol" };
    const ids = (await run(lu, who, [0x12, 0x01, 0x83, 0x01, 0x00, 0])).dataIn ?? Buffer.alloc(0);
    // After NAA (12), T10 vendor ID (28) and relative port (8) designators: UTF-8 (3) | iSCSI (5), PIV, association 01b / 10b, type 8.
    const port = ids.subarray(52);
    const portName = "iqn.2026-12.org.ipsan:u.vol,t,0x0001";
    const portLength = Math.ceil((portName.length + 1) / 4) * 4;
    assert.equal(hex(port.subarray(0, 4)), `53 98 00 ${portLength.toString(16)}`);
    assert.equal(port.subarray(4, 4 + portName.length).toString("utf8"), portName);
    const device = port.subarray(4 + portLength);
    assert.equal(hex(device.subarray(0, 4)), "53 a8 00 1c");
    assert.equal(device.subarray(4, 31).toString("utf8"), "iqn.2026-12.org.ipsan:u.vol");
    assert.equal(ids.readUInt16BE(2), ids.length - 4);
    assert.equal(device.length, 4 + 0x1c);
  });
});

test("executeNow answers as execute does: at once for READ/WRITE in the page cache; a promise for a pending unit attention, FUA, other commands", async () => {
  await withBed(SIZE, async (bed) => {
    const { lu, device } = await bed.open();
    const executeNow = lu.executeNow?.bind(lu);
    assert.ok(executeNow !== undefined, "the logical unit has the synchronous path");
    const request = (from: typeof ALICE, cdb: number[], dataOut?: Buffer) => ({
      cdb: Buffer.concat([Buffer.from(cdb), Buffer.alloc(16 - cdb.length)]),
      nexus: from,
      attribute: "simple" as const,
      expectedLength: dataOut?.length ?? 4096,
      dataOut,
    });
    // Both paths, on the same command: the same status, sense and data.
    const same = async (from: typeof ALICE, cdb: number[], dataOut?: Buffer) => {
      const now = await executeNow(request(from, cdb, dataOut));
      const later = await lu.execute(request(from, cdb, dataOut));
      assert.equal(now.status, later.status, `status of ${hex(Buffer.from(cdb))}`);
      assert.equal(hex(now.sense), hex(later.sense));
      assert.equal(hex(now.dataIn), hex(later.dataIn));
      return now;
    };
    // A fresh nexus has POWER ON RESET pending: executeNow leaves it to execute() (a promise), which reports and takes it.
    lu.nexusAdded(ALICE);
    const first = executeNow(request(ALICE, cdb10(0x28, 0, 8)));
    assert.ok(first instanceof Promise);
    assert.equal(senseOf(await first), "06/29/00");
    const data = Buffer.alloc(4096, 0x5a);
    const written = executeNow(request(ALICE, cdb10(0x2a, 16, 8), data));
    assert.ok(!(written instanceof Promise), "a WRITE into the page cache is answered at once");
    assert.equal(written.status, ScsiStatus.GOOD);
    const readBack = executeNow(request(ALICE, cdb16(0x88, 16, 8)));
    // Reads are answered at once where the file system can tell a cached read (RWF_NOWAIT; not tmpfs).
    if (device.readNow?.(Buffer.alloc(4096), 16 * 512) === true) assert.ok(!(readBack instanceof Promise), "a READ from the page cache is answered at once");
    assert.equal(hex((await readBack).dataIn), hex(data));
    // FUA goes through execute() (a promise) and still lands.
    const fua = executeNow(request(ALICE, cdb10(0x2a, 32, 8, 0x08), Buffer.alloc(4096, 0x33)));
    assert.ok(fua instanceof Promise);
    assert.equal((await fua).status, ScsiStatus.GOOD);
    assert.equal(hex((await same(ALICE, cdb10(0x28, 32, 1))).dataIn), hex(Buffer.alloc(512, 0x33)));
    // Failures: out of range, NACA, protection information, a short Data-Out, an unknown opcode.
    assert.equal(senseOf(await same(ALICE, cdb10(0x28, BLOCKS - 1, 2))), "05/21/00");
    assert.equal(senseOf(await same(ALICE, [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0x04])), "05/24/00");
    assert.equal(senseOf(await same(ALICE, cdb10(0x28, 0, 1, 0x20))), "05/24/00");
    assert.equal(senseOf(await same(ALICE, cdb10(0x2a, 0, 2), Buffer.alloc(700))), "05/0e/03");
    assert.equal(senseOf(await same(ALICE, [0xff, 0, 0, 0, 0, 0])), "05/20/00");
    // RESERVE(6) through BOB: ALICE's READ and WRITE conflict on both paths, and nothing is written.
    await login(lu, BOB);
    assert.equal((await lu.execute(request(BOB, [0x16, 0, 0, 0, 0, 0]))).status, ScsiStatus.GOOD);
    assert.equal((await same(ALICE, cdb10(0x2a, 16, 1), Buffer.alloc(512, 0x77))).status, ScsiStatus.RESERVATION_CONFLICT);
    assert.equal((await same(ALICE, cdb10(0x28, 16, 1))).status, ScsiStatus.RESERVATION_CONFLICT);
    assert.equal(hex((await same(BOB, cdb10(0x28, 16, 1))).dataIn), hex(Buffer.alloc(512, 0x5a)));
  });
});
