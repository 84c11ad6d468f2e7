// Persistent reservations (SPC-4 5.13, 6.15, 6.16) and RESERVE(6) through a
// logical unit over a real volume, with several I_T nexuses over two
// sessions of the registry: registration, the six reservation types and who
// they let read and write, release, clear, preempt, the unit attentions each
// leaves, REPORT CAPABILITIES / READ FULL STATUS bytes, APTPL refused without
// a store; with one (the unit's file store), kept across a restart.

import { test } from "node:test";
import assert from "node:assert/strict";
import { setLogLevel } from "../util/log.ts";
import { MIB } from "../unit/layout.ts";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { FileReservationStore } from "../unit/reservation_store.ts";
import { MAX_REGISTRATIONS } from "./limits.ts";
import { ALICE, BOB, CAROL, IDENTITY, cdb10, hex, login, nexus, run, senseOf, withBed, withThreeNexuses } from "./testing.ts";
import { type LogicalUnit, type ScsiNexus, ScsiStatus } from "./types.ts";

setLogLevel("error");

const REGISTER = 0;
const RESERVE = 1;
const RELEASE = 2;
const CLEAR = 3;
const PREEMPT = 4;
const PREEMPT_AND_ABORT = 5;
const REGISTER_AND_IGNORE = 6;

function prOut(lu: LogicalUnit, who: ScsiNexus, action: number, type: number, key: bigint, saKey: bigint, flags = 0, length = 24) {
  // CDB (SPC-4 6.16.1): SERVICE ACTION in byte 1, SCOPE|TYPE in byte 2, PARAMETER LIST LENGTH in bytes 5-8.
  const cdb = [0x5f, action, type & 0x0f, 0, 0, 0, 0, 0, length, 0];
  // Parameter list (SPC-4 6.16.3): RESERVATION KEY, SERVICE ACTION RESERVATION KEY, obsolete, flags in byte 20.
  const data = Buffer.alloc(24);
  data.writeBigUInt64BE(key, 0);
  data.writeBigUInt64BE(saKey, 8);
  data[20] = flags;
  return run(lu, who, cdb, data.subarray(0, Math.min(24, length)));
}

async function prIn(lu: LogicalUnit, who: ScsiNexus, action: number): Promise<Buffer> {
  const r = await run(lu, who, [0x5e, action, 0, 0, 0, 0, 0, 0x10, 0x00, 0]);
  assert.equal(r.status, ScsiStatus.GOOD);
  return r.dataIn ?? Buffer.alloc(0);
}

async function status(lu: LogicalUnit, who: ScsiNexus, cdb: number[], data?: Buffer): Promise<string> {
  const r = await run(lu, who, cdb, data);
  if (r.status === ScsiStatus.RESERVATION_CONFLICT) return "conflict";
  if (r.status === ScsiStatus.GOOD) return "good";
  return senseOf(r);
}

const READ = cdb10(0x28, 0, 1);
const WRITE = cdb10(0x2a, 0, 1);
const BLOCK = Buffer.alloc(512, 1);

test("REGISTER, READ KEYS, RESERVE, READ RESERVATION: bytes per SPC-4 6.15.2/6.15.3", async () => {
  await withThreeNexuses(async (lu, other) => {
    assert.equal(hex(await prIn(lu, ALICE, 0)), "00 00 00 00 00 00 00 00");
    assert.equal((await prOut(lu, ALICE, REGISTER, 0, 0n, 0xaaaan)).status, ScsiStatus.GOOD);
    assert.equal((await prOut(other, BOB, REGISTER_AND_IGNORE, 0, 0x1234n, 0xbbbbn)).status, ScsiStatus.GOOD);
    // PRGENERATION 2, ADDITIONAL LENGTH 16, the two keys.
    assert.equal(hex(await prIn(lu, ALICE, 0)), "00 00 00 02 00 00 00 10 00 00 00 00 00 00 aa aa 00 00 00 00 00 00 bb bb");
    // REGISTER from a registered nexus with the wrong RESERVATION KEY; from an unregistered one with a non-zero key.
    assert.equal((await prOut(lu, ALICE, REGISTER, 0, 0x1n, 0x2n)).status, ScsiStatus.RESERVATION_CONFLICT);
    assert.equal((await prOut(other, CAROL, REGISTER, 0, 0x1n, 0x2n)).status, ScsiStatus.RESERVATION_CONFLICT);
    // No reservation: ADDITIONAL LENGTH 0.
    assert.equal(hex(await prIn(lu, ALICE, 1)), "00 00 00 02 00 00 00 00");
    assert.equal((await prOut(lu, ALICE, RESERVE, 1, 0xaaaan, 0n)).status, ScsiStatus.GOOD);
    // READ RESERVATION: key of the holder, SCOPE 0 | TYPE 1 in byte 21.
    assert.equal(
      hex(await prIn(lu, ALICE, 1)),
      "00 00 00 02 00 00 00 10 00 00 00 00 00 00 aa aa 00 00 00 00 00 01 00 00",
    );
    // RESERVE again with the same type is fine; another nexus (registered) reserving: conflict.
    assert.equal((await prOut(lu, ALICE, RESERVE, 1, 0xaaaan, 0n)).status, ScsiStatus.GOOD);
    assert.equal((await prOut(other, BOB, RESERVE, 1, 0xbbbbn, 0n)).status, ScsiStatus.RESERVATION_CONFLICT);
    // RESERVE from an unregistered nexus: conflict. An invalid type: INVALID FIELD IN CDB.
    assert.equal((await prOut(other, CAROL, RESERVE, 1, 0n, 0n)).status, ScsiStatus.RESERVATION_CONFLICT);
    assert.equal(senseOf(await prOut(other, BOB, RESERVE, 2, 0xbbbbn, 0n)), "05/24/00");
    // Changing a key, then unregistering (SERVICE ACTION RESERVATION KEY 0) releases the holder's reservation.
    assert.equal((await prOut(lu, ALICE, REGISTER, 0, 0xaaaan, 0xacacn)).status, ScsiStatus.GOOD);
    assert.equal((await prIn(lu, ALICE, 1)).readBigUInt64BE(8), 0xacacn);
    assert.equal((await prOut(lu, ALICE, REGISTER, 0, 0xacacn, 0n)).status, ScsiStatus.GOOD);
    assert.equal(hex((await prIn(lu, ALICE, 1)).subarray(4, 8)), "00 00 00 00");
    assert.equal(hex((await prIn(lu, ALICE, 0)).subarray(4)), "00 00 00 08 00 00 00 00 00 00 bb bb");
  });
});

test("under every reservation type, INQUIRY, READ CAPACITY, REPORT LUNS, PR IN and TEST UNIT READY never conflict (SPC-4 table 48; READ/WRITE per type: canary_test.ts)", async () => {
  for (const type of [1, 3, 5, 6, 7, 8]) {
    await withThreeNexuses(async (lu, other) => {
      await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan);
      await prOut(other, BOB, REGISTER, 0, 0n, 0xbn);
      assert.equal((await prOut(lu, ALICE, RESERVE, type, 0xan, 0n)).status, ScsiStatus.GOOD);
      for (const cdb of [[0x12, 0, 0, 0, 36, 0], [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], [0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0], [0, 0, 0, 0, 0, 0]]) {
        assert.equal(await status(other, CAROL, cdb), "good", `type ${type} ${hex(Buffer.from(cdb))}`);
      }
      // SYNCHRONIZE CACHE and UNMAP are writes: a stranger conflicts under every type.
      assert.equal(await status(other, CAROL, cdb10(0x35, 0, 0)), "conflict");
      // The all-registrants types report key 0 as the holder's (SPC-4 6.15.3.2).
      const reservation = await prIn(lu, ALICE, 1);
      assert.equal(reservation.readBigUInt64BE(8), type >= 7 ? 0n : 0xan);
      assert.equal(reservation[21], type);
    });
  }
});

test("RELEASE: wrong type is INVALID RELEASE OF PERSISTENT RESERVATION; registrants-only release leaves RESERVATIONS RELEASED", async () => {
  await withThreeNexuses(async (lu, other) => {
    await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan);
    await prOut(other, BOB, REGISTER, 0, 0n, 0xbn);
    await prOut(lu, ALICE, RESERVE, 5, 0xan, 0n);
    assert.equal(senseOf(await prOut(lu, ALICE, RELEASE, 1, 0xan, 0n)), "05/26/04");
    // A registrant that does not hold it releasing: GOOD, nothing changes.
    assert.equal((await prOut(other, BOB, RELEASE, 5, 0xbn, 0n)).status, ScsiStatus.GOOD);
    assert.equal((await prIn(lu, ALICE, 1))[21], 5);
    assert.equal((await prOut(lu, ALICE, RELEASE, 5, 0xan, 0n)).status, ScsiStatus.GOOD);
    assert.equal(hex((await prIn(lu, ALICE, 1)).subarray(4, 8)), "00 00 00 00");
    // BOB (registrant) gets UNIT ATTENTION, RESERVATIONS RELEASED (2Ah/04h); ALICE (the releaser) and CAROL do not.
    assert.equal(senseOf(await run(other, BOB, [0, 0, 0, 0, 0, 0])), "06/2a/04");
    assert.equal(await status(lu, ALICE, [0, 0, 0, 0, 0, 0]), "good");
    assert.equal(await status(other, CAROL, [0, 0, 0, 0, 0, 0]), "good");
  });
});

test("CLEAR removes every registration and the reservation; the others get RESERVATIONS PREEMPTED", async () => {
  await withThreeNexuses(async (lu, other) => {
    await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan);
    await prOut(other, BOB, REGISTER, 0, 0n, 0xbn);
    await prOut(lu, ALICE, RESERVE, 3, 0xan, 0n);
    const generation = (await prIn(lu, ALICE, 0)).readUInt32BE(0);
    assert.equal((await prOut(other, CAROL, CLEAR, 0, 0n, 0n)).status, ScsiStatus.RESERVATION_CONFLICT);
    assert.equal((await prOut(other, BOB, CLEAR, 0, 0xbn, 0n)).status, ScsiStatus.GOOD);
    const keys = await prIn(other, BOB, 0);
    assert.equal(hex(keys.subarray(4)), "00 00 00 00");
    assert.equal(keys.readUInt32BE(0), generation + 1);
    assert.equal(senseOf(await run(lu, ALICE, READ)), "06/2a/03");
    assert.equal(await status(lu, ALICE, READ), "good");
  });
});

test("PREEMPT and PREEMPT AND ABORT: take over the reservation, remove the preempted registrations (SPC-4 5.13.11.4)", async () => {
  for (const action of [PREEMPT, PREEMPT_AND_ABORT]) {
    await withThreeNexuses(async (lu, other) => {
      await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan);
      await prOut(other, BOB, REGISTER, 0, 0n, 0xbn);
      await prOut(other, CAROL, REGISTER, 0, 0n, 0xcn);
      await prOut(lu, ALICE, RESERVE, 1, 0xan, 0n);
      // Preempting a key nobody has: conflict. SERVICE ACTION RESERVATION KEY 0 with a non-all-registrants reservation held by another: INVALID FIELD.
      assert.equal((await prOut(other, BOB, action, 1, 0xbn, 0x99n)).status, ScsiStatus.RESERVATION_CONFLICT);
      assert.equal(senseOf(await prOut(other, BOB, action, 1, 0xbn, 0n)), "05/26/00");
      // BOB preempts ALICE (the holder) and takes the reservation with type 3.
      assert.equal((await prOut(other, BOB, action, 3, 0xbn, 0xan)).status, ScsiStatus.GOOD);
      const reservation = await prIn(other, BOB, 1);
      assert.equal(reservation.readBigUInt64BE(8), 0xbn);
      assert.equal(reservation[21], 3);
      assert.equal(hex((await prIn(other, BOB, 0)).subarray(4)), "00 00 00 10 00 00 00 00 00 00 00 0b 00 00 00 00 00 00 00 0c");
      // ALICE: REGISTRATIONS PREEMPTED (2Ah/05h), then conflicts (Exclusive Access, not registered).
      assert.equal(senseOf(await run(lu, ALICE, READ)), "06/2a/05");
      assert.equal(await status(lu, ALICE, READ), "conflict");
      // CAROL stays registered; the type changed, so she is told RESERVATIONS RELEASED.
      assert.equal(senseOf(await run(other, CAROL, [0, 0, 0, 0, 0, 0])), "06/2a/04");
      // Preempting a registration that holds nothing (no reservation change).
      assert.equal((await prOut(other, BOB, action, 3, 0xbn, 0xcn)).status, ScsiStatus.GOOD);
      assert.equal(senseOf(await run(other, CAROL, [0, 0, 0, 0, 0, 0])), "06/2a/05");
    });
  }
});

test("PREEMPT with key 0 under an all-registrants reservation removes every other registrant", async () => {
  await withThreeNexuses(async (lu, other) => {
    await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan);
    await prOut(other, BOB, REGISTER, 0, 0n, 0xbn);
    await prOut(lu, ALICE, RESERVE, 8, 0xan, 0n);
    assert.equal((await prOut(other, BOB, PREEMPT, 1, 0xbn, 0n)).status, ScsiStatus.GOOD);
    assert.equal(hex((await prIn(other, BOB, 0)).subarray(4)), "00 00 00 08 00 00 00 00 00 00 00 0b");
    const reservation = await prIn(other, BOB, 1);
    assert.equal(reservation.readBigUInt64BE(8), 0xbn);
    assert.equal(reservation[21], 1);
  });
});

test("REPORT CAPABILITIES, READ FULL STATUS, APTPL refused, bad parameter list lengths, the registration limit", async () => {
  await withThreeNexuses(async (lu, other) => {
    // LENGTH 8; CRH|ATP_C (SIP_C=0, PTPL_C=0); TMV, ALLOW COMMANDS 0, PTPL_A=0; type mask WR_EX_AR|EX_AC_RO|WR_EX_RO|EX_AC|WR_EX, EX_AC_AR.
    assert.equal(hex(await prIn(lu, ALICE, 2)), "00 08 14 80 ea 01 00 00");
    // APTPL=1 (byte 20 bit 0) and SPEC_I_PT=1: INVALID FIELD IN PARAMETER LIST; nothing registered.
    assert.equal(senseOf(await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan, 0x01)), "05/26/00");
    assert.equal(senseOf(await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan, 0x08)), "05/26/00");
    assert.equal(hex((await prIn(lu, ALICE, 0)).subarray(4)), "00 00 00 00");
    // PARAMETER LIST LENGTH other than 24: PARAMETER LIST LENGTH ERROR.
    assert.equal(senseOf(await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan, 0, 20)), "05/1a/00");
    assert.equal(senseOf(await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan, 0, 0)), "05/1a/00");
    // REGISTER AND MOVE (7) is not supported.
    assert.equal(senseOf(await prOut(lu, ALICE, 7, 0, 0n, 0xan)), "05/24/00");
    // ALL_TG_PT is accepted (one target port) and shows in READ FULL STATUS.
    assert.equal((await prOut(lu, ALICE, REGISTER, 0, 0n, 0xan, 0x04)).status, ScsiStatus.GOOD);
    await prOut(lu, ALICE, RESERVE, 1, 0xan, 0n);
    const full = await prIn(lu, ALICE, 3);
    assert.equal(full.readUInt32BE(4), full.length - 8);
    // Descriptor: key, reserved, ALL_TG_PT|R_HOLDER, SCOPE|TYPE, reserved, RELATIVE TARGET PORT 1, ADDITIONAL DESCRIPTOR LENGTH.
    assert.equal(hex(full.subarray(8, 32)), "00 00 00 00 00 00 00 0a 00 00 00 00 03 01 00 00 00 00 00 01 00 00 00 34");
    // TransportID: FORMAT CODE 01b | PROTOCOL IDENTIFIER 5, ADDITIONAL LENGTH, "NAME,i,0xISID" NUL-padded to 4.
    const name = "iqn.2026-12.org.example:alice,i,0x400001370000";
    assert.equal(hex(full.subarray(32, 36)), "45 00 00 30");
    assert.equal(full.subarray(36, 36 + name.length).toString("utf8"), name);
    assert.equal(full.length, 32 + 0x34);
    // The registration limit: INSUFFICIENT REGISTRATION RESOURCES (55h/04h) past MAX_REGISTRATIONS.
    for (let i = 1; i < MAX_REGISTRATIONS; i += 1) {
      const who = nexus(`iqn.2026-12.org.example:host${i}`);
      assert.equal((await prOut(other, who, REGISTER_AND_IGNORE, 0, 0n, BigInt(i + 100))).status, ScsiStatus.GOOD);
    }
    assert.equal(senseOf(await prOut(other, nexus("iqn.2026-12.org.example:one-too-many"), REGISTER, 0, 0n, 5n)), "05/55/04");
  });
});

test("RESERVE(6)/RELEASE(6): exclusive to one nexus, refused while persistent reservations exist, released by logout and reset", async () => {
  await withThreeNexuses(async (lu, other) => {
    assert.equal(await status(lu, ALICE, [0x16, 0, 0, 0, 0, 0]), "good");
    assert.equal(await status(other, BOB, [0x16, 0, 0, 0, 0, 0]), "conflict");
    assert.equal(await status(other, BOB, WRITE, BLOCK), "conflict");
    assert.equal(await status(other, BOB, [0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0]), "conflict");
    // RELEASE(6) from another nexus: GOOD, no effect.
    assert.equal(await status(other, BOB, [0x17, 0, 0, 0, 0, 0]), "good");
    assert.equal(await status(other, BOB, READ), "conflict");
    // A reset drops it (and leaves a unit attention).
    lu.reset(ALICE);
    assert.equal(senseOf(await run(other, BOB, READ)), "06/29/00");
    assert.equal(await status(other, BOB, READ), "good");
    assert.equal(await status(lu, ALICE, [0x16, 0, 0, 0, 0, 0]), "06/29/00");
    assert.equal(await status(lu, ALICE, [0x16, 0, 0, 0, 0, 0]), "good");
    lu.nexusRemoved(ALICE);
    assert.equal(await status(other, BOB, READ), "good");
    // With a registration present, RESERVE(6) conflicts (CRH=1).
    await prOut(other, BOB, REGISTER, 0, 0n, 0xbn);
    assert.equal(await status(other, CAROL, [0x16, 0, 0, 0, 0, 0]), "06/29/00");
    assert.equal(await status(other, CAROL, [0x16, 0, 0, 0, 0, 0]), "conflict");
    // Third-party / extent reservations are refused.
    assert.equal(await status(other, CAROL, [0x16, 0x10, 0, 0, 0, 0]), "05/24/00");
  });
});

test("registrations and the reservation outlive a nexus's logout, a reset and the last session leaving; forget() drops them", async () => {
  await withBed(MIB, async (bed) => {
    const a = await bed.open();
    await login(a.lu, ALICE);
    await prOut(a.lu, ALICE, REGISTER, 0, 0n, 0xan);
    a.lu.nexusRemoved(ALICE);
    a.lu.reset(BOB);
    const b = await bed.open();
    await login(b.lu, BOB);
    assert.equal(hex((await prIn(b.lu, BOB, 0)).subarray(4)), "00 00 00 08 00 00 00 00 00 00 00 0a");
    await prOut(b.lu, BOB, REGISTER, 0, 0n, 0xbn);
    await prOut(b.lu, BOB, RESERVE, 1, 0xbn, 0n);
    await a.close();
    await b.close();
    // SPC-4 5.13.1: kept across I_T nexus loss, even with no session left (a cluster whose links all dropped at once).
    assert.equal(bed.registry.size, 1);
    const c = await bed.open();
    await login(c.lu, CAROL);
    assert.equal(hex((await prIn(c.lu, CAROL, 0)).subarray(4)), "00 00 00 10 00 00 00 00 00 00 00 0a 00 00 00 00 00 00 00 0b");
    assert.equal(await status(c.lu, CAROL, WRITE, BLOCK), "conflict");
    await c.close();
    // The export deleted or changed: its reservations go with it.
    await bed.registry.forget(IDENTITY);
    assert.equal(bed.registry.size, 0);
    const d = await bed.open();
    await login(d.lu, CAROL);
    assert.equal(hex((await prIn(d.lu, CAROL, 0)).subarray(4)), "00 00 00 00");
    assert.equal(await status(d.lu, CAROL, WRITE, BLOCK), "good");
    await d.close();
    // A logical unit whose sessions left no registration is not kept.
    assert.equal(bed.registry.size, 0);
  });
});

test("APTPL: REGISTER with APTPL=1 keeps registrations and the reservation across a restart, in the store, before GOOD; APTPL=0 drops them", async () => {
  const dir = makeTempDir("scsi-aptpl", memoryTmpBase());
  try {
    const store = new FileReservationStore(dir.path);
    const path = store.pathOf(IDENTITY);
    await withBed(
      MIB,
      async (bed) => {
        const a = await bed.open();
        await login(a.lu, ALICE);
        // With a store: PTPL_C=1, PTPL_A=0 until an APTPL=1 REGISTER.
        assert.equal(hex(await prIn(a.lu, ALICE, 2)), "00 08 15 80 ea 01 00 00");
        await prOut(a.lu, ALICE, REGISTER, 0, 0n, 0xan);
        assert.equal(existsSync(path), false, "nothing is saved without APTPL");
        assert.equal((await prOut(a.lu, ALICE, REGISTER, 0, 0xan, 0xa1n, 0x01)).status, ScsiStatus.GOOD);
        // Saved by the time GOOD came back.
        assert.equal(existsSync(path), true);
        assert.equal(hex(await prIn(a.lu, ALICE, 2)), "00 08 15 81 ea 01 00 00");
        await login(a.lu, BOB);
        assert.equal((await prOut(a.lu, BOB, REGISTER_AND_IGNORE, 0, 0n, 0xbn, 0x01)).status, ScsiStatus.GOOD);
        // APTPL is ignored (not refused) on the other service actions (SPC-4 6.16.3).
        assert.equal((await prOut(a.lu, ALICE, RESERVE, 5, 0xa1n, 0n, 0x01)).status, ScsiStatus.GOOD);
        await a.close();
      },
      store,
    );
    // A restart: a new registry over the same store and a fresh unit.
    await withBed(
      MIB,
      async (bed) => {
        const a = await bed.open();
        await login(a.lu, CAROL);
        assert.equal(hex(await prIn(a.lu, CAROL, 2)), "00 08 15 81 ea 01 00 00");
        const keys = await prIn(a.lu, CAROL, 0);
        assert.equal(hex(keys.subarray(4)), "00 00 00 10 00 00 00 00 00 00 00 a1 00 00 00 00 00 00 00 0b");
        const reservation = await prIn(a.lu, CAROL, 1);
        assert.equal(reservation.readBigUInt64BE(8), 0xa1n);
        assert.equal(reservation[21], 5);
        // WRITE EXCLUSIVE - REGISTRANTS ONLY: Carol (not registered) may not write; Bob (registered) may.
        assert.equal(await status(a.lu, CAROL, WRITE, BLOCK), "conflict");
        await login(a.lu, BOB);
        assert.equal(await status(a.lu, BOB, WRITE, BLOCK), "good");
        // The holder comes back as the holder: it may release.
        await login(a.lu, ALICE);
        assert.equal((await prOut(a.lu, ALICE, RELEASE, 5, 0xa1n, 0n)).status, ScsiStatus.GOOD);
        // Bob, a registrant, hears of it: RESERVATIONS RELEASED (2Ah/04h).
        assert.equal(senseOf(await run(a.lu, BOB, [0x00, 0, 0, 0, 0, 0])), "06/2a/04");
        // A REGISTER with APTPL=0: the last valid APTPL is zero, the saved state goes.
        assert.equal((await prOut(a.lu, BOB, REGISTER, 0, 0xbn, 0xb2n, 0)).status, ScsiStatus.GOOD);
        assert.equal(existsSync(path), false);
        assert.equal(hex(await prIn(a.lu, BOB, 2)), "00 08 15 80 ea 01 00 00");
        await a.close();
      },
      store,
    );
    // Not saved any more: a restart starts with none.
    await withBed(
      MIB,
      async (bed) => {
        const a = await bed.open();
        await login(a.lu, BOB);
        assert.equal(hex((await prIn(a.lu, BOB, 0)).subarray(4)), "00 00 00 00");
        await a.close();
      },
      store,
    );
  } finally {
    dir.remove();
  }
});

test("APTPL: a saved state that does not read back refuses the logical unit, says why and leaves the file; forget() drops a saved state", async () => {
  const dir = makeTempDir("scsi-aptpl-bad", memoryTmpBase());
  try {
    const store = new FileReservationStore(dir.path);
    const path = store.pathOf(IDENTITY);
    await withBed(
      MIB,
      async (bed) => {
        const a = await bed.open();
        await login(a.lu, ALICE);
        await prOut(a.lu, ALICE, REGISTER, 0, 0n, 0xan, 0x01);
        await a.close();
        assert.equal(existsSync(path), true);
        await bed.registry.forget(IDENTITY);
        assert.equal(existsSync(path), false);
      },
      store,
    );
    for (const bad of ["{not json", JSON.stringify({ format: "ipsan-reservations-v1", naa: "3000000000000000", generation: 1, registrations: [] }), JSON.stringify({ format: "ipsan-reservations-v1", naa: IDENTITY.naa, generation: 1, registrations: [], reservation: { holder: 0, type: 1 } })]) {
      writeFileSync(path, bad);
      await withBed(
        MIB,
        async (bed) => {
          await assert.rejects(bed.open(), /cannot be read .*not served rather than served without them/);
        },
        store,
      );
      assert.equal(readFileSync(path, "utf8"), bad, "the file is left as it was");
    }
  } finally {
    dir.remove();
  }
});

test("APTPL: a save that fails answers HARDWARE ERROR, INTERNAL TARGET FAILURE; the change holds in memory and the next PR OUT saves it all", async () => {
  const dir = makeTempDir("scsi-aptpl-fail", memoryTmpBase());
  try {
    const store = new FileReservationStore(dir.path);
    await withBed(
      MIB,
      async (bed) => {
        const a = await bed.open();
        await login(a.lu, ALICE);
        // DATA/reservations is now a file, not a directory: every write under it fails (ENOTDIR), even as root.
        writeFileSync(store.dir, "in the way\n");
        assert.equal(senseOf(await prOut(a.lu, ALICE, REGISTER, 0, 0n, 0xan, 0x01)), "04/44/00");
        assert.equal(hex((await prIn(a.lu, ALICE, 0)).subarray(4)), "00 00 00 08 00 00 00 00 00 00 00 0a");
        rmSync(store.dir);
        assert.equal((await prOut(a.lu, ALICE, RESERVE, 5, 0xan, 0n)).status, ScsiStatus.GOOD);
        const saved = JSON.parse(readFileSync(store.pathOf(IDENTITY), "utf8")) as { registrations: { key: string }[]; reservation: { type: number } };
        assert.deepEqual(
          saved.registrations.map((r) => r.key),
          ["000000000000000a"],
        );
        assert.equal(saved.reservation.type, 5);
        await a.close();
      },
      store,
    );
  } finally {
    dir.remove();
  }
});
