// Test support for src/scsi: a logical unit over a real volume of a real
// unit's storage file (VolumeManager + UnitExportProvider), and CDB builders
// that write the fields where SPC-4/SBC-3 put them (independent of the
// decoder in logical_unit.ts).

import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import type { BlockDevice } from "../block/types.ts";
import { MIB } from "../unit/layout.ts";
import { UnitExportProvider } from "../unit/provider.ts";
import { VolumeManager } from "../unit/volumes.ts";
import { LogicalUnitRegistry } from "./logical_unit.ts";
import type { ReservationStore } from "./reservations.ts";
import type { LogicalUnit, LogicalUnitIdentity, ScsiNexus, ScsiRequest, ScsiResponse } from "./types.ts";

export const IDENTITY: LogicalUnitIdentity = { naa: "3123456789abcdef", serial: "3123456789abcdef", exportName: "vol" };

export function nexus(initiator: string, isid = "400001370000"): ScsiNexus {
  return { initiatorName: initiator, isid, targetPortalGroupTag: 1, relativeTargetPort: 1 };
}

export const ALICE = nexus("iqn.2026-12.org.example:alice");
export const BOB = nexus("iqn.2026-12.org.example:bob");
export const CAROL = nexus("iqn.2026-12.org.example:carol");

export interface Bed {
  readonly manager: VolumeManager;
  readonly registry: LogicalUnitRegistry;
  /** A logical unit view over a fresh device of the volume, shared through the registry. */
  open(): Promise<{ lu: LogicalUnit; device: BlockDevice; close(): Promise<void> }>;
}

/** A unit with one volume "vol" of `sizeBytes`, served through a registry (keeping reservations in `store` if given). */
export async function withBed(sizeBytes: number, body: (bed: Bed) => Promise<void>, store?: ReservationStore): Promise<void> {
  const dir = makeTempDir("scsi", memoryTmpBase());
  const manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: Math.max(32 * MIB, sizeBytes + 8 * MIB) });
  const provider = new UnitExportProvider(manager);
  const registry = new LogicalUnitRegistry(store);
  const opened: { close(): Promise<void> }[] = [];
  try {
    await manager.create("vol", sizeBytes);
    await body({
      manager,
      registry,
      async open() {
        const device = await provider.open("vol", { address: "127.0.0.1", port: 1 });
        const lease = registry.acquire(IDENTITY, device);
        const handle = {
          lu: lease.lu,
          device,
          async close() {
            lease.release();
            await device.close();
          },
        };
        opened.push(handle);
        return handle;
      },
    });
  } finally {
    for (const h of opened) await h.close();
    await manager.close();
    dir.remove();
  }
}

export function run(lu: LogicalUnit, from: ScsiNexus, cdb: number[] | Buffer, dataOut?: Buffer, expectedLength?: number): Promise<ScsiResponse> {
  const bytes = Buffer.isBuffer(cdb) ? cdb : Buffer.from(cdb);
  const padded = bytes.length < 16 ? Buffer.concat([bytes, Buffer.alloc(16 - bytes.length)]) : bytes;
  const request: ScsiRequest = {
    cdb: padded,
    nexus: from,
    attribute: "simple",
    expectedLength: expectedLength ?? dataOut?.length ?? 65536,
    dataOut,
  };
  return lu.execute(request);
}

/** Hex of a buffer, bytes separated by spaces: tables in tests read like the standard's. */
export function hex(buffer: Buffer | undefined): string {
  return buffer === undefined ? "" : [...buffer].map((b) => b.toString(16).padStart(2, "0")).join(" ");
}

export function cdb10(opcode: number, lba: number, blocks: number, byte1 = 0): number[] {
  return [opcode, byte1, (lba >>> 24) & 0xff, (lba >>> 16) & 0xff, (lba >>> 8) & 0xff, lba & 0xff, 0, (blocks >> 8) & 0xff, blocks & 0xff, 0];
}

export function cdb12(opcode: number, lba: number, blocks: number, byte1 = 0): number[] {
  const c = Buffer.alloc(12);
  c[0] = opcode;
  c[1] = byte1;
  c.writeUInt32BE(lba, 2);
  c.writeUInt32BE(blocks, 6);
  return [...c];
}

export function cdb16(opcode: number, lba: bigint | number, blocks: number, byte1 = 0): number[] {
  const c = Buffer.alloc(16);
  c[0] = opcode;
  c[1] = byte1;
  c.writeBigUInt64BE(BigInt(lba), 2);
  c.writeUInt32BE(blocks, 10);
  return [...c];
}

/** Fixed-format sense as SPC-4 table 50 lays it out: key, ASC, ASCQ; INFORMATION when given. */
export function expectedSense(key: number, asc: number, ascq: number, information?: number): string {
  const s = Buffer.alloc(18);
  s[0] = information === undefined ? 0x70 : 0xf0;
  s[2] = key;
  if (information !== undefined) s.writeUInt32BE(information, 3);
  s[7] = 0x0a;
  s[12] = asc;
  s[13] = ascq;
  return hex(s);
}

/** Sense key, ASC, ASCQ of a response ("" when there is none). */
export function senseOf(response: ScsiResponse): string {
  const s = response.sense;
  if (s === undefined) return "";
  return [s[2] ?? 0, s[12] ?? 0, s[13] ?? 0].map((b) => b.toString(16).padStart(2, "0")).join("/");
}

/** Clears the POWER ON unit attention a fresh nexus gets. */
export async function login(lu: LogicalUnit, who: ScsiNexus): Promise<void> {
  lu.nexusAdded(who);
  await run(lu, who, [0x00, 0, 0, 0, 0, 0]);
}

/** Two sessions of one logical unit over a 1 MiB volume: ALICE logged in through the first, BOB and CAROL through the second. */
export async function withThreeNexuses(body: (first: LogicalUnit, second: LogicalUnit) => Promise<void>): Promise<void> {
  await withBed(1024 * 1024, async (bed) => {
    const a = await bed.open();
    const b = await bed.open();
    await login(a.lu, ALICE);
    await login(b.lu, BOB);
    await login(b.lu, CAROL);
    await body(a.lu, b.lu);
  });
}
