// Safety scenarios of the SCSI logical unit, shared by their tests and by
// the canaries that run them against a deliberately broken build (a patched
// copy of dist/, src/testing/patched_build.ts) and must see them fail:
// - COMPARE AND WRITE is atomic against other writes of the same blocks
//   (VMware ATS locks and cluster heartbeats rely on it);
// - a persistent reservation fences the initiators it should (table 48),
//   and PREEMPT AND ABORT answers only once the preempted nexus's writes
//   in flight are done;
// - random commands never make the device refuse a range (the logical unit
//   checks first) nor touch another volume's bytes;
// - an ORDERED command waits for the commands before it, across sessions,
//   and one aborted while it waits never runs and holds nobody back.
// Each throws (an AssertionError) when the claim does not hold.

import assert from "node:assert/strict";
import fc from "fast-check";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { MIB } from "../unit/layout.ts";
import { UnitExportProvider } from "../unit/provider.ts";
import { VolumeManager } from "../unit/volumes.ts";
import { MAX_TRANSFER_BYTES } from "./limits.ts";
import type { BlockDevice } from "../block/types.ts";
import { COMMANDS, LogicalUnitCore, LogicalUnitRegistry, createLogicalUnit } from "./logical_unit.ts";
import { ALICE, BOB, CAROL, IDENTITY, cdb10, hex, login, nexus, request, run, settle, watch, withBed, withGatedSessions, withThreeNexuses } from "./testing.ts";
import { type LogicalUnit, type ScsiNexus, type ScsiRequest, ScsiStatus } from "./types.ts";

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

/**
 * fence_scsi's fencing step: a node (BOB) preempts another (ALICE) with
 * PREEMPT AND ABORT under Write Exclusive - Registrants Only while one of
 * ALICE's writes is still in the device. GOOD must not come back before that
 * write is done (else it could land after the fencing node was told ALICE is
 * fenced), and ALICE's next write conflicts.
 */
export async function preemptAndAbortFences(): Promise<void> {
  await withBed(MIB, async (bed) => {
    const real = (await bed.open()).device;
    let release: () => void = () => undefined;
    const gate = new Promise<void>((resolve) => (release = resolve));
    let held = 0;
    // ALICE's device: its writes wait at the gate (a slow disk); everything else is the real device.
    const slow: BlockDevice = Object.assign(Object.create(real) as BlockDevice, {
      writeNow: undefined,
      writev: undefined,
      write: async (buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void> => {
        held += 1;
        await gate;
        await real.write(buffer, offsetBytes, fua);
      },
    });
    const core = new LogicalUnitCore(IDENTITY);
    const alice = createLogicalUnit(slow, IDENTITY, core);
    const bob = createLogicalUnit(real, IDENTITY, core);
    await login(alice, ALICE);
    await login(bob, BOB);
    assert.equal((await prOut(alice, ALICE, 0, 0, 0n, 0xan)).status, ScsiStatus.GOOD);
    assert.equal((await prOut(bob, BOB, 0, 0, 0n, 0xbn)).status, ScsiStatus.GOOD);
    assert.equal((await prOut(alice, ALICE, 1, 5, 0xan, 0n)).status, ScsiStatus.GOOD);
    const write = run(alice, ALICE, cdb10(0x2a, 0, 1), Buffer.alloc(512, 0xaa));
    for (let i = 0; i < 100 && held === 0; i += 1) await new Promise((resolve) => setImmediate(resolve));
    assert.equal(held, 1, "ALICE's write reached the device");
    let answered = false;
    const preempt = prOut(bob, BOB, 5, 5, 0xbn, 0xan).then((r) => {
      answered = true;
      return r;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(answered, false, "PREEMPT AND ABORT answered while a write of the preempted nexus was still in the device");
    release();
    assert.equal((await write).status, ScsiStatus.GOOD);
    assert.equal((await preempt).status, ScsiStatus.GOOD);
    // ALICE hears of it, then is fenced off; BOB reads what ALICE's last write left.
    assert.equal((await run(alice, ALICE, cdb10(0x2a, 0, 1), Buffer.alloc(512, 0xbb))).status, ScsiStatus.CHECK_CONDITION);
    assert.equal(await outcome(alice, ALICE, cdb10(0x2a, 0, 1), Buffer.alloc(512, 0xbb)), "conflict");
    const read = await run(bob, BOB, cdb10(0x28, 0, 1));
    assert.equal(read.dataIn?.[0], 0xaa);
  });
}

const STATUSES: ReadonlySet<number> = new Set(Object.values(ScsiStatus));
const NEXUSES = [nexus("iqn.2026-12.org.example:a"), nexus("iqn.2026-12.org.example:b"), nexus("iqn.2026-12.org.example:a", "400001370001")];

/** A CDB: a supported opcode (and service action) with random other bytes, or random bytes. */
const cdbArbitrary = fc.oneof(
  fc
    .tuple(fc.constantFrom(...COMMANDS), fc.uint8Array({ minLength: 16, maxLength: 16 }), fc.boolean())
    .map(([spec, bytes, small]) => {
      const cdb = Buffer.from(bytes);
      cdb[0] = spec.opcode;
      if (spec.serviceAction !== undefined) cdb[1] = ((cdb[1] ?? 0) & 0xe0) | spec.serviceAction;
      // Small LBAs and lengths half the time, so commands reach the device instead of stopping at range checks.
      if (small) {
        if (spec.cdbLength === 10) cdb.writeUInt32BE((cdb.readUInt32BE(2) % 4096) >>> 0, 2);
        if (spec.cdbLength === 16) cdb.writeBigUInt64BE(cdb.readBigUInt64BE(2) % 4096n, 2);
        if (spec.cdbLength === 10) cdb.writeUInt16BE(cdb.readUInt16BE(7) % 64, 7);
        if (spec.cdbLength === 16) cdb.writeUInt32BE(cdb.readUInt32BE(10) % 64, 10);
        cdb[spec.cdbLength - 1] = 0;
        if (spec.serviceAction === undefined && spec.access !== "none") cdb[1] = (cdb[1] ?? 0) & 0x1a;
      }
      return cdb;
    }),
  fc.uint8Array({ minLength: 0, maxLength: 40 }).map((b) => Buffer.from(b)),
);

/**
 * Random CDBs (every supported opcode with random fields, and random bytes),
 * Data-Out, ExpectedDataTransferLength and nexuses against a volume between
 * two others: execute() never rejects, answers a valid status with 18 bytes
 * of fixed-format sense and never HARDWARE ERROR, dataOutLength() stays
 * bounded, and the neighbouring volumes keep their bytes.
 */
export async function fuzzExecute(numRuns: number): Promise<void> {
  const dir = makeTempDir("scsi-fuzz", memoryTmpBase());
  const manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 32 * MIB });
  try {
    // before | vol | after, adjacent on the storage file.
    await manager.create("before", MIB);
    await manager.create("vol", 2 * MIB);
    await manager.create("after", MIB);
    const provider = new UnitExportProvider(manager);
    const guards = await Promise.all(["before", "after"].map((name) => provider.open(name, { address: "127.0.0.1", port: 1 })));
    for (const g of guards) await g.write(Buffer.alloc(MIB, 0xa5), 0, true);
    const device = await provider.open("vol", { address: "127.0.0.1", port: 1 });
    const registry = new LogicalUnitRegistry();
    const lease = registry.acquire(IDENTITY, device);
    const lu = lease.lu;
    for (const n of NEXUSES) lu.nexusAdded(n);
    let checkConditions = 0;
    let good = 0;
    await fc.assert(
      fc.asyncProperty(
        cdbArbitrary,
        fc.nat({ max: NEXUSES.length - 1 }),
        fc.oneof(fc.constant(-1), fc.nat({ max: 70_000 })),
        fc.uint8Array({ minLength: 0, maxLength: 2048 }),
        fc.boolean(),
        async (cdb, who, expected, seed, resetFirst) => {
          if (resetFirst && who === 0) lu.reset(NEXUSES[who] ?? NEXUSES[0]!);
          const wanted = lu.dataOutLength(cdb);
          assert.ok(Number.isSafeInteger(wanted) && wanted >= 0 && wanted <= 2 * MAX_TRANSFER_BYTES, `dataOutLength ${wanted}`);
          const expectedLength = expected < 0 ? wanted : expected;
          const length = Math.min(expectedLength, wanted);
          let dataOut: Buffer | undefined;
          if (wanted > 0) {
            dataOut = Buffer.alloc(length);
            for (let i = 0; i < length; i += Math.max(seed.length, 1)) Buffer.from(seed).copy(dataOut, i);
          }
          const request: ScsiRequest = { cdb, nexus: NEXUSES[who] ?? NEXUSES[0]!, attribute: "simple", expectedLength, dataOut };
          const response = await lu.execute(request);
          assert.ok(STATUSES.has(response.status), `status ${response.status}`);
          if (response.status === ScsiStatus.CHECK_CONDITION) {
            checkConditions += 1;
            assert.equal(response.sense?.length, 18);
            assert.equal(response.sense?.[0] === 0x70 || response.sense?.[0] === 0xf0, true);
            assert.equal(response.sense?.[7], 10);
            // No HARDWARE ERROR: the device refusing a range (it checks bounds too) would show as one.
            assert.notEqual(response.sense?.[2], 0x04, `internal failure for CDB ${cdb.toString("hex")}`);
          } else if (response.status === ScsiStatus.GOOD) {
            good += 1;
          }
          assert.ok((response.dataIn?.length ?? 0) <= MAX_TRANSFER_BYTES + 65536, "bounded Data-In");
        },
      ),
      { numRuns },
    );
    if (process.env["SCSI_FUZZ_DEBUG"] === "1") console.log({ good, checkConditions });
    assert.ok(good >= numRuns / 50 && checkConditions >= numRuns / 50, `a mix of outcomes (good ${good}, check condition ${checkConditions})`);
    for (const g of guards) {
      const back = Buffer.alloc(MIB);
      await g.read(back, 0);
      assert.ok(back.every((b) => b === 0xa5), `volume ${g.name} untouched`);
      await g.close();
    }
    lease.release();
    await device.close();
  } finally {
    await manager.close();
    dir.remove();
  }
}

/**
 * A SIMPLE WRITE through one session is held in the device; an ORDERED READ
 * of the same block through another session (one task set, TST=000b) is not
 * answered until the WRITE completed, and reads what it wrote. Run as a
 * SIMPLE command, the READ would overtake the WRITE and read the old bytes.
 */
export async function orderedReadAfterWrite(): Promise<void> {
  await withGatedSessions(2, {}, async (gate, [a, b]) => {
    assert.ok(a !== undefined && b !== undefined && b.executeNow !== undefined);
    const data = Buffer.alloc(512, 0xab);
    gate.shut();
    const write = watch(a.execute(request(ALICE, cdb10(0x2a, 8, 1), data)));
    await settle();
    assert.equal(gate.held, 1, "the WRITE is held in the device");
    const read = watch(b.executeNow(request(BOB, cdb10(0x28, 8, 1), undefined, { attribute: "ordered", expectedLength: 512 })));
    await settle();
    assert.equal(read.settled, false, "the ORDERED READ was answered while an earlier WRITE was still running");
    gate.open();
    assert.equal((await write.promise).status, ScsiStatus.GOOD);
    const answer = await read.promise;
    assert.equal(answer.status, ScsiStatus.GOOD);
    assert.equal(hex(answer.dataIn), hex(data), "the ORDERED READ did not see the WRITE before it");
  });
}

/**
 * An ORDERED WRITE waits behind a held SIMPLE WRITE, a SIMPLE WRITE behind
 * it; the ORDERED one is aborted while it waits: it answers TASK ABORTED,
 * its data never reaches the device, and the SIMPLE one behind it starts at
 * once (while the first write is still held).
 */
export async function abortedOrderedReleasesWaiters(): Promise<void> {
  await withGatedSessions(2, {}, async (gate, [a, b]) => {
    assert.ok(a !== undefined && b !== undefined && a.abort !== undefined);
    gate.shut();
    const first = watch(a.execute(request(ALICE, cdb10(0x2a, 1, 1), Buffer.alloc(512, 1))));
    const orderedRequest = request(ALICE, cdb10(0x2a, 2, 1), Buffer.alloc(512, 2), { attribute: "ordered" });
    const ordered = watch(a.execute(orderedRequest));
    const after = watch(b.execute(request(BOB, cdb10(0x2a, 3, 1), Buffer.alloc(512, 3))));
    await settle();
    assert.equal(gate.arrived, 1, "only the first WRITE reached the device");
    a.abort(orderedRequest);
    await settle();
    assert.equal(ordered.settled, true, "the ORDERED WRITE aborted while it waited was not answered");
    assert.equal(ordered.value?.status, ScsiStatus.TASK_ABORTED);
    assert.equal(gate.arrived, 2, "the SIMPLE WRITE behind the aborted ORDERED one started");
    assert.equal(first.settled, false, "the first WRITE is still held");
    gate.open();
    assert.equal((await first.promise).status, ScsiStatus.GOOD);
    assert.equal((await after.promise).status, ScsiStatus.GOOD);
    const back = await run(a, ALICE, cdb10(0x28, 1, 3));
    assert.equal(hex(back.dataIn), hex(Buffer.concat([Buffer.alloc(512, 1), Buffer.alloc(512, 0), Buffer.alloc(512, 3)])), "the aborted WRITE must not have run");
  });
}
