// Safety scenarios of the SCSI logical unit, shared by their tests and by
// the canaries that run them against a deliberately broken build (a patched
// copy of dist/, src/testing/patched_build.ts) and must see them fail:
// - COMPARE AND WRITE is atomic against other writes of the same blocks
//   (VMware ATS locks and cluster heartbeats rely on it);
// - a persistent reservation fences the initiators it should (table 48).
// Each throws (an AssertionError) when the claim does not hold.

import assert from "node:assert/strict";
import { MIB } from "../unit/layout.ts";
import { ALICE, BOB, CAROL, cdb10, run, withBed, withThreeNexuses } from "./testing.ts";
import { type LogicalUnit, type ScsiNexus, ScsiStatus } from "./types.ts";

/** Eight workers over two sessions increment a counter in block 0 with COMPARE AND WRITE while plain writes hit block 1. */
export async function compareAndWriteCounter(): Promise<void> {
  await withBed(MIB, async (bed) => {
    const a = await bed.open();
    const b = await bed.open();
    const block = (n: number): Buffer => {
      const x = Buffer.alloc(512);
      x.writeUInt32BE(n, 0);
      return x;
    };
    const caw = [0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    let successes = 0;
    const worker = async (lu: LogicalUnit): Promise<void> => {
      for (let done = 0; done < 25; ) {
        const read = await run(lu, ALICE, cdb10(0x28, 0, 1));
        const value = read.dataIn?.readUInt32BE(0) ?? 0;
        const r = await run(lu, ALICE, caw, Buffer.concat([block(value), block(value + 1)]));
        if (r.status === ScsiStatus.GOOD) {
          done += 1;
          successes += 1;
        } else {
          assert.equal(r.sense?.[2], 0x0e, "only MISCOMPARE may refuse an increment");
        }
      }
    };
    const writer = async (): Promise<void> => {
      for (let i = 0; i < 100; i += 1) await run(b.lu, ALICE, cdb10(0x2a, 1, 1), Buffer.alloc(512, i));
    };
    await Promise.all([worker(a.lu), worker(a.lu), worker(a.lu), worker(a.lu), worker(b.lu), worker(b.lu), worker(b.lu), worker(b.lu), writer()]);
    const final = await run(a.lu, ALICE, cdb10(0x28, 0, 1));
    assert.equal(successes, 200);
    assert.equal(final.dataIn?.readUInt32BE(0), 200, "an increment was lost: COMPARE AND WRITE was not atomic");
  });
}

function prOut(lu: LogicalUnit, who: ScsiNexus, action: number, type: number, key: bigint, saKey: bigint) {
  const data = Buffer.alloc(24);
  data.writeBigUInt64BE(key, 0);
  data.writeBigUInt64BE(saKey, 8);
  return run(lu, who, [0x5f, action, type, 0, 0, 0, 0, 0, 24, 0], data);
}

async function outcome(lu: LogicalUnit, who: ScsiNexus, cdb: number[], data?: Buffer): Promise<string> {
  const r = await run(lu, who, cdb, data);
  if (r.status === ScsiStatus.RESERVATION_CONFLICT) return "conflict";
  if (r.status === ScsiStatus.GOOD) return "good";
  return `check ${r.sense?.[2]}/${r.sense?.[12]}/${r.sense?.[13]}`;
}

/**
 * SPC-4 table 48 for the six reservation types: what the holder (ALICE), a
 * registrant (BOB) and a stranger (CAROL) may READ and WRITE.
 */
export async function reservationFencing(): Promise<void> {
  const read = cdb10(0x28, 0, 1);
  const write = cdb10(0x2a, 0, 1);
  const data = Buffer.alloc(512, 1);
  // [type, holder R, holder W, registrant R, registrant W, stranger R, stranger W]
  const table: [number, ...string[]][] = [
    [1, "good", "good", "good", "conflict", "good", "conflict"],
    [3, "good", "good", "conflict", "conflict", "conflict", "conflict"],
    [5, "good", "good", "good", "good", "good", "conflict"],
    [6, "good", "good", "good", "good", "conflict", "conflict"],
    [7, "good", "good", "good", "good", "good", "conflict"],
    [8, "good", "good", "good", "good", "conflict", "conflict"],
  ];
  for (const [type, ...expected] of table) {
    await withThreeNexuses(async (first, second) => {
      assert.equal((await prOut(first, ALICE, 0, 0, 0n, 0xan)).status, ScsiStatus.GOOD);
      assert.equal((await prOut(second, BOB, 0, 0, 0n, 0xbn)).status, ScsiStatus.GOOD);
      assert.equal((await prOut(first, ALICE, 1, type, 0xan, 0n)).status, ScsiStatus.GOOD);
      const row = [
        await outcome(first, ALICE, read),
        await outcome(first, ALICE, write, data),
        await outcome(second, BOB, read),
        await outcome(second, BOB, write, data),
        await outcome(second, CAROL, read),
        await outcome(second, CAROL, write, data),
      ];
      assert.deepEqual(row, expected, `reservation type ${type}: holder, registrant, stranger READ/WRITE`);
    });
  }
}
