// Test support for src/scsi: a logical unit over a real volume of a real
// unit's storage file (VolumeManager + UnitExportProvider), and CDB builders
// that write the fields where SPC-4/SBC-3 put them (independent of the
// decoder in logical_unit.ts).

import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import type { BlockDevice } from "../block/types.ts";
import { MIB } from "../unit/layout.ts";
import { UnitExportProvider } from "../unit/provider.ts";
import { VolumeManager } from "../unit/volumes.ts";
import { LogicalUnitCore, LogicalUnitRegistry, createLogicalUnit } from "./logical_unit.ts";
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

/** A request as the transport builds it: the CDB padded to 16 bytes, SIMPLE unless told. */
export function request(from: ScsiNexus, cdb: number[] | Buffer, dataOut?: Buffer, options: { expectedLength?: number; attribute?: ScsiRequest["attribute"] } = {}): ScsiRequest {
  const bytes = Buffer.isBuffer(cdb) ? cdb : Buffer.from(cdb);
  const padded = bytes.length < 16 ? Buffer.concat([bytes, Buffer.alloc(16 - bytes.length)]) : bytes;
  return {
    cdb: padded,
    nexus: from,
    attribute: options.attribute ?? "simple",
    expectedLength: options.expectedLength ?? dataOut?.length ?? 65536,
    dataOut,
  };
}

export function run(lu: LogicalUnit, from: ScsiNexus, cdb: number[] | Buffer, dataOut?: Buffer, expectedLength?: number): Promise<ScsiResponse> {
  return lu.execute(request(from, cdb, dataOut, expectedLength === undefined ? {} : { expectedLength }));
}

/**
 * A real device whose writes (and, with `reads`, reads) wait while the gate
 * is shut: a command can be held inside the device so the order of the
 * commands around it shows. Shut, writeNow() (and readNow() with `reads`)
 * decline, so the command takes the waiting path; open, everything passes
 * straight through.
 */
export interface Gate {
  readonly device: BlockDevice;
  shut(): void;
  /** Lets every held request (and later ones) through. */
  open(): void;
  /** Writes (reads with `reads`) that reached the device, held or not, since the gate was made. */
  readonly arrived: number;
  /** Requests waiting at the shut gate now. */
  readonly held: number;
}

export function gated(inner: BlockDevice, options: { reads?: boolean } = {}): Gate {
  let shut = false;
  let arrived = 0;
  let waiting: (() => void)[] = [];
  const pass = async (): Promise<void> => {
    arrived += 1;
    if (shut) await new Promise<void>((resolve) => waiting.push(resolve));
  };
  const holdReads = options.reads === true;
  const device: BlockDevice = {
    name: inner.name,
    description: inner.description,
    sizeBytes: inner.sizeBytes,
    capabilities: inner.capabilities,
    async read(buffer, offset) {
      if (holdReads) await pass();
      return inner.read(buffer, offset);
    },
    readNow: (buffer, offset) => (holdReads && shut ? false : inner.readNow?.(buffer, offset) === true),
    async write(buffer, offset, fua) {
      await pass();
      return inner.write(buffer, offset, fua);
    },
    writeNow(parts, offset) {
      if (shut) return false;
      arrived += 1;
      return inner.writeNow?.(parts, offset) === true;
    },
    flush: () => inner.flush(),
    async trim(offset, length, fua) {
      await pass();
      return inner.trim(offset, length, fua);
    },
    async zero(offset, length, zeroOptions) {
      await pass();
      return inner.zero(offset, length, zeroOptions);
    },
    cache: (offset, length) => inner.cache(offset, length),
    extents: (offset, length) => inner.extents(offset, length),
    close: () => inner.close(),
  };
  return {
    device,
    shut: () => {
      shut = true;
    },
    open: () => {
      shut = false;
      const wake = waiting;
      waiting = [];
      for (const resolve of wake) resolve();
    },
    get arrived() {
      return arrived;
    },
    get held() {
      return waiting.length;
    },
  };
}

/** A promise with whether it has settled yet (a command answered or still held). */
export function watch<T>(promise: T | Promise<T>): { readonly settled: boolean; readonly value: T | undefined; readonly promise: Promise<T> } {
  const state = { settled: false, value: undefined as T | undefined, promise: Promise.resolve(promise) };
  void state.promise.then((value) => {
    state.settled = true;
    state.value = value;
  });
  return state;
}

/** Lets pending I/O and promise callbacks run: long enough for an unblocked command to finish on a tmpfs file. */
export async function settle(ms = 30): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms));
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

/**
 * `sessions` logical units sharing one core (one task set, as the registry
 * shares it between sessions) over one gated device of a 1 MiB volume, each
 * nexus (ALICE, BOB, CAROL: one per session) logged in.
 */
export async function withGatedSessions(
  sessions: number,
  options: { reads?: boolean },
  body: (gate: Gate, lus: LogicalUnit[], core: LogicalUnitCore) => Promise<void>,
): Promise<void> {
  await withBed(1024 * 1024, async (bed) => {
    const { device } = await bed.open();
    const gate = gated(device, options);
    const core = new LogicalUnitCore(IDENTITY);
    const lus: LogicalUnit[] = [];
    for (let i = 0; i < sessions; i += 1) {
      const lu = createLogicalUnit(gate.device, IDENTITY, core);
      await login(lu, [ALICE, BOB, CAROL][i] ?? ALICE);
      lus.push(lu);
    }
    try {
      await body(gate, lus, core);
    } finally {
      gate.open();
    }
  });
}
