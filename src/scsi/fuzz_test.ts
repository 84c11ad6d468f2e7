// Fuzzing the logical unit with fast-check: random CDBs (every supported
// opcode with random fields, and random bytes), random Data-Out and
// ExpectedDataTransferLength, several nexuses. execute() never rejects,
// always answers a valid status (with 18 bytes of fixed-format sense on
// CHECK CONDITION), dataOutLength() never throws and stays bounded, and no
// command touches a byte outside its volume: the neighbouring volumes on the
// same storage file keep their bytes.

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { MIB } from "../unit/layout.ts";
import { UnitExportProvider } from "../unit/provider.ts";
import { VolumeManager } from "../unit/volumes.ts";
import { COMMANDS, LogicalUnitRegistry } from "./logical_unit.ts";
import { MAX_TRANSFER_BYTES } from "./limits.ts";
import { IDENTITY, nexus } from "./testing.ts";
import { ScsiStatus, type ScsiRequest } from "./types.ts";

setLogLevel("error");

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

test("fuzz: execute never rejects, answers valid status and sense, and never touches another volume's bytes", { timeout: 300_000 }, async () => {
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
          } else if (response.status === ScsiStatus.GOOD) {
            good += 1;
          }
          assert.ok((response.dataIn?.length ?? 0) <= MAX_TRANSFER_BYTES + 65536, "bounded Data-In");
        },
      ),
      { numRuns: 3000 },
    );
    if (process.env["SCSI_FUZZ_DEBUG"] === "1") console.log({ good, checkConditions });
    assert.ok(good > 100 && checkConditions > 100, `a mix of outcomes (good ${good}, check condition ${checkConditions})`);
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
});
