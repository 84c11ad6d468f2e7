// The SCSI block command set (SBC-3/SPC-4) over a BlockDevice: the
// LogicalUnit of src/scsi/types.ts. Every command is decoded with bounds
// (the CDB table below names each one's length, its reservation access class
// and its CDB usage map for REPORT SUPPORTED OPERATION CODES); every failure
// becomes a status with fixed-format sense data, never a rejection.
//
// State that spans sessions (persistent reservations, RESERVE(6), unit
// attentions, the COMPARE AND WRITE range locks) lives in a LogicalUnitCore
// shared through the LogicalUnitRegistry; each session's LogicalUnit is a
// view over that core and the BlockDevice the session opened through the
// export provider (so access control and revocation stay per peer).
// docs/protocol/scsi.md describes the command set byte by byte.

import type { BlockDevice } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import {
  LBA_STATUS_SCAN_BYTES,
  LOGICAL_BLOCK_BYTES,
  MAX_CDB_BYTES,
  MAX_COMPARE_AND_WRITE_BLOCKS,
  MAX_LBA_STATUS_DESCRIPTORS,
  MAX_MODE_SELECT_BYTES,
  MAX_NEXUS_STATES,
  MAX_TRANSFER_BLOCKS,
  MAX_TRANSFER_BYTES,
  MAX_UNIT_ATTENTIONS_PER_NEXUS,
  MAX_UNMAP_DESCRIPTORS,
  MAX_UNMAP_LBA_COUNT,
  MAX_UNMAP_PARAMETER_BYTES,
  MAX_WRITE_SAME_BLOCKS,
  PR_OUT_PARAMETER_BYTES,
  WRITE_SAME_CHUNK_BYTES,
} from "./limits.ts";
import { MODE_PAGES, type PageControl, modePage, provisioning, standardInquiry, vpd } from "./pages.ts";
import {
  type AccessClass,
  ReservationConflict,
  type ReservationNotice,
  type ReservationStore,
  Reservations,
  type SavedReservations,
  nexusKey,
} from "./reservations.ts";
import {
  ASC,
  type Asc,
  SenseError,
  SenseKey,
  deviceErrorSense,
  fixedSense,
  illegalRequest,
  invalidFieldInCdb,
  invalidFieldInParameterList,
  lbaOutOfRange,
  parameterListLengthError,
} from "./sense.ts";
import { type LogicalUnit, type LogicalUnitIdentity, type ScsiNexus, type ScsiRequest, type ScsiResponse, ScsiStatus } from "./types.ts";

const log = logger("scsi");

const GOOD: ScsiResponse = { status: ScsiStatus.GOOD };
/** A READ whose Data-In and status the transport already sent (ScsiRequest.sendDataIn). */
const DATA_IN_SENT: ScsiResponse = { status: ScsiStatus.GOOD, dataInSent: true };
/** A command aborted while it waited in the task set: it never ran (the transport sends nothing for it). */
const TASK_ABORTED: ScsiResponse = { status: ScsiStatus.TASK_ABORTED };

/** The shared part of one logical unit: reservations, unit attentions and write ordering span sessions. */
export class LogicalUnitCore {
  readonly identity: LogicalUnitIdentity;
  readonly reservations: Reservations;
  readonly #store: ReservationStore | undefined;
  readonly locks = new RangeLocks();
  /** Task attributes (SAM-5 8.6): one task set for every I_T nexus (control mode page TST=000b). */
  readonly tasks = new TaskSet();
  /** Pending unit attentions per nexus key, oldest first. */
  readonly #attentions = new Map<string, Asc[]>();
  /** Nexuses logged in to this logical unit (through any session), oldest first. */
  readonly #nexuses = new Set<string>();
  /** Nexuses that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT set. */
  readonly #preventing = new Set<string>();

  /** With a store, reservations saved under APTPL come back (a state the store cannot read throws: the logical unit is not served). */
  constructor(identity: LogicalUnitIdentity, store?: ReservationStore) {
    this.identity = identity;
    this.#store = store;
    const saved = store?.load(identity);
    this.reservations = saved !== undefined ? Reservations.restore(saved) : new Reservations(store !== undefined);
  }

  /**
   * Commands of each nexus that are running and may still touch the medium
   * (execute() and a READ gone to the device): PREEMPT AND ABORT waits for
   * those of the nexuses it preempts. Commands answered synchronously
   * (executeNow) are done before any other command can run.
   */
  readonly #running = new Map<string, { count: number; idle: (() => void)[] }>();

  started(key: string): void {
    const entry = this.#running.get(key);
    if (entry === undefined) this.#running.set(key, { count: 1, idle: [] });
    else entry.count += 1;
  }

  finished(key: string): void {
    const entry = this.#running.get(key);
    if (entry === undefined) return;
    entry.count -= 1;
    if (entry.count > 0) return;
    this.#running.delete(key);
    for (const wake of entry.idle) wake();
  }

  /** Resolves once no command of these nexuses is running (the ones running now finished; none started since counts for them). */
  async drained(keys: readonly string[]): Promise<void> {
    for (const key of keys) {
      const entry = this.#running.get(key);
      if (entry !== undefined) await new Promise<void>((resolve) => entry.idle.push(resolve));
    }
  }

  /** Writes the reservations' state through the store (null: drops the saved state); resolves once durable. */
  save(state: SavedReservations | null): Promise<void> {
    return this.#store === undefined ? Promise.resolve() : this.#store.save(this.identity, state ?? undefined);
  }

  addAttention(key: string, asc: Asc): void {
    let queue = this.#attentions.get(key);
    if (queue === undefined) {
      if (this.#attentions.size >= MAX_NEXUS_STATES) {
        const oldest = this.#attentions.keys().next().value;
        if (oldest !== undefined) this.#attentions.delete(oldest);
      }
      queue = [];
      this.#attentions.set(key, queue);
    }
    if (queue.some((a) => a[0] === asc[0] && a[1] === asc[1])) return;
    // A reset supersedes what was queued before it (SAM-5 5.14).
    if (asc[0] === 0x29) queue.length = 0;
    if (queue.length >= MAX_UNIT_ATTENTIONS_PER_NEXUS) queue.splice(queue[0]?.[0] === 0x29 ? 1 : 0, 1);
    queue.push(asc);
  }

  takeAttention(key: string): Asc | undefined {
    const queue = this.#attentions.get(key);
    const first = queue?.shift();
    if (queue !== undefined && queue.length === 0) this.#attentions.delete(key);
    return first;
  }

  hasAttention(key: string): boolean {
    return (this.#attentions.get(key)?.length ?? 0) > 0;
  }

  notify(notices: readonly ReservationNotice[]): void {
    for (const n of notices) this.addAttention(n.nexusKey, n.asc);
  }

  nexusAdded(nexus: ScsiNexus): void {
    const key = nexusKey(nexus);
    this.#nexuses.delete(key);
    if (this.#nexuses.size >= MAX_NEXUS_STATES) {
      const oldest = this.#nexuses.values().next().value;
      if (oldest !== undefined) this.#nexuses.delete(oldest);
    }
    this.#nexuses.add(key);
    this.#attentions.delete(key);
    this.addAttention(key, ASC.POWER_ON_RESET);
  }

  nexusRemoved(nexus: ScsiNexus): void {
    const key = nexusKey(nexus);
    this.#nexuses.delete(key);
    this.reservations.dropLegacy(nexus);
    this.#preventing.delete(key);
  }

  /**
   * LOGICAL UNIT RESET (SAM-5 6.3.3): RESERVE(6) and PREVENT go, every nexus
   * gets a unit attention. It is POWER ON, RESET, OR BUS DEVICE RESET
   * OCCURRED (29h/00h), the generic code, not 29h/03h: initiators (libiscsi's
   * RESERVE/RELEASE helpers among them) retry on the generic one.
   */
  reset(from: ScsiNexus): void {
    this.reservations.dropLegacy(undefined);
    this.#preventing.clear();
    const keys = new Set([...this.#nexuses, ...this.#attentions.keys(), nexusKey(from)]);
    for (const key of keys) this.addAttention(key, ASC.POWER_ON_RESET);
  }

  setPrevent(key: string, prevent: boolean): void {
    if (prevent) this.#preventing.add(key);
    else this.#preventing.delete(key);
  }

  get preventing(): boolean {
    return this.#preventing.size > 0;
  }
}

/** A command held back by an ORDERED one (TaskSet): woken with true when it may start, false when it was aborted first. */
interface WaitingTask {
  readonly request: ScsiRequest;
  readonly ordered: boolean;
  readonly wake: (start: boolean) => void;
}

/**
 * The task set of one logical unit (SAM-5 8.6), shared by all its sessions,
 * in the order commands reach the logical unit: an ORDERED command starts
 * once every earlier command has completed, and nothing that came after it
 * starts before it completes; HEAD OF QUEUE starts at once (an ORDERED
 * command still waits for it like for any other running command); SIMPLE
 * starts at once unless an earlier ORDERED command has not completed.
 *
 * The counters are public so the logical unit's hot path is one test at
 * the start, one at the end and a counter: with no ORDERED command in the
 * set (`ordered === 0`) a SIMPLE command never waits and nothing waits
 * behind it, so it only adds itself to `running` and takes itself off (or,
 * answered synchronously, not even that: nothing else runs meanwhile).
 */
export class TaskSet {
  /** Commands started and not completed, of every attribute. */
  running = 0;
  /** ORDERED commands in the set, waiting or running: while there are none, nobody waits. */
  ordered = 0;
  #orderedRunning = false;
  /** Commands held back, in arrival order; empty whenever `ordered` is 0. */
  readonly #waiting: WaitingTask[] = [];

  get waitingCount(): number {
    return this.#waiting.length;
  }

  /**
   * Enters a command that is not a SIMPLE one on the hot path: true when it
   * may start now (it is counted running and must complete once), else a
   * promise of true when its turn comes or false when it was cancelled first.
   */
  enter(request: ScsiRequest): boolean | Promise<boolean> {
    const ordered = request.attribute === "ordered";
    if (ordered) {
      this.ordered += 1;
      if (this.running === 0 && this.#waiting.length === 0) {
        this.running += 1;
        this.#orderedRunning = true;
        return true;
      }
    } else if (request.attribute === "head-of-queue" || this.ordered === 0) {
      this.running += 1;
      return true;
    }
    return new Promise<boolean>((wake) => this.#waiting.push({ request, ordered, wake }));
  }

  /**
   * A command that was counted running completed: `running -= 1` (inline,
   * the hot path's one decrement), then this, only while `ordered` is not 0
   * (otherwise nobody waits): whoever it held may start.
   */
  completed(ordered: boolean): void {
    if (ordered) {
      this.ordered -= 1;
      this.#orderedRunning = false;
    }
    this.#wakeWaiters();
  }

  /** Takes a command that has not started out of the set (it never runs); false when it is not waiting (running, done or unknown). */
  cancel(request: ScsiRequest): boolean {
    const i = this.#waiting.findIndex((w) => w.request === request);
    const waiter = this.#waiting[i];
    if (waiter === undefined) return false;
    this.#waiting.splice(i, 1);
    if (waiter.ordered) this.ordered -= 1;
    waiter.wake(false);
    this.#wakeWaiters();
    return true;
  }

  /** Starts waiting commands from the oldest: SIMPLE ones while no ORDERED runs, an ORDERED one once nothing runs. */
  #wakeWaiters(): void {
    for (;;) {
      const head = this.#waiting[0];
      if (head === undefined || this.#orderedRunning || (head.ordered && this.running > 0)) return;
      this.#waiting.shift();
      this.running += 1;
      if (head.ordered) this.#orderedRunning = true;
      head.wake(true);
    }
  }
}

interface HeldRange {
  readonly start: number;
  readonly end: number;
  readonly exclusive: boolean;
}

/**
 * Block-range locks: writes share a range with each other, COMPARE AND
 * WRITE holds its range alone, so its read-compare-write is atomic against
 * every other write to those blocks through this logical unit. FIFO: a
 * waiting COMPARE AND WRITE is not starved by later writes.
 */
export class RangeLocks {
  readonly #held: HeldRange[] = [];
  readonly #waiting: { range: HeldRange; wake: () => void }[] = [];

  get heldCount(): number {
    return this.#held.length;
  }

  get waitingCount(): number {
    return this.#waiting.length;
  }

  async acquire(start: number, end: number, exclusive: boolean): Promise<() => void> {
    const range: HeldRange = { start, end, exclusive };
    if (this.#grantable(range, this.#waiting.length)) this.#held.push(range);
    else await new Promise<void>((wake) => this.#waiting.push({ range, wake }));
    return this.#releaser(range);
  }

  /** acquire() when the range is grantable now (no waiting): its release function, else undefined (nothing held). */
  tryAcquire(start: number, end: number, exclusive: boolean): (() => void) | undefined {
    const range: HeldRange = { start, end, exclusive };
    if (!this.#grantable(range, this.#waiting.length)) return undefined;
    this.#held.push(range);
    return this.#releaser(range);
  }

  #releaser(range: HeldRange): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const i = this.#held.indexOf(range);
      if (i >= 0) this.#held.splice(i, 1);
      this.#wakeWaiters();
    };
  }

  #grantable(range: HeldRange, waitersBefore: number): boolean {
    const conflicts = (other: HeldRange): boolean =>
      other.start < range.end && range.start < other.end && (other.exclusive || range.exclusive);
    if (this.#held.some(conflicts)) return false;
    for (let i = 0; i < waitersBefore; i += 1) {
      const w = this.#waiting[i];
      if (w !== undefined && conflicts(w.range)) return false;
    }
    return true;
  }

  #wakeWaiters(): void {
    for (let i = 0; i < this.#waiting.length; ) {
      const w = this.#waiting[i];
      if (w !== undefined && this.#grantable(w.range, i)) {
        this.#waiting.splice(i, 1);
        this.#held.push(w.range);
        w.wake();
      } else {
        i += 1;
      }
    }
  }
}

// ---- CDB decoding ----

function u8(cdb: Buffer, i: number): number {
  return cdb[i] ?? 0;
}

/** A logical block address and count, decoded and checked against the capacity. */
interface Extent {
  readonly lba: number;
  readonly blocks: number;
}

function decodeLba(cdb: Buffer, length: 6 | 10 | 12 | 16): { lba: bigint; blocks: number } {
  switch (length) {
    case 6: {
      const lba = ((u8(cdb, 1) & 0x1f) << 16) | (u8(cdb, 2) << 8) | u8(cdb, 3);
      const count = u8(cdb, 4);
      return { lba: BigInt(lba), blocks: count === 0 ? 256 : count };
    }
    case 10:
      return { lba: BigInt(cdb.readUInt32BE(2)), blocks: cdb.readUInt16BE(7) };
    case 12:
      return { lba: BigInt(cdb.readUInt32BE(2)), blocks: cdb.readUInt32BE(6) };
    case 16:
      return { lba: cdb.readBigUInt64BE(2), blocks: cdb.readUInt32BE(10) };
  }
}

interface CommandSpec {
  readonly name: string;
  readonly opcode: number;
  /** Service action (byte 1 bits 4-0) for opcodes that have them. */
  readonly serviceAction?: number;
  readonly cdbLength: 6 | 10 | 12 | 16;
  readonly access: AccessClass;
  /** Allowed through another nexus's RESERVE(6) (SPC-2 table 10). */
  readonly legacyAllowed?: boolean;
  /** Does not report or clear a pending unit attention (SPC-4 5.14: INQUIRY, REPORT LUNS, REQUEST SENSE). */
  readonly attentionExempt?: boolean;
  /** CDB USAGE DATA (REPORT SUPPORTED OPERATION CODES): the bits the command uses. */
  readonly usage: readonly number[];
}

// Usage bitmaps: byte 0 is the opcode, then the bits each field uses, then the CONTROL byte (NACA bit only).
const RW6 = [0x1f, 0xff, 0xff, 0xff, 0x04];
const RW10 = [0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04];
const RW12 = [0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04];
const RW16 = [0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04];
const VERIFY10 = [0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04];
const VERIFY12 = [0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04];
const VERIFY16 = [0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04];

export const COMMANDS: readonly CommandSpec[] = [
  { name: "TEST UNIT READY", opcode: 0x00, cdbLength: 6, access: "none", usage: [0, 0, 0, 0, 0x04] },
  { name: "REQUEST SENSE", opcode: 0x03, cdbLength: 6, access: "none", legacyAllowed: true, attentionExempt: true, usage: [0x01, 0, 0, 0xff, 0x04] },
  { name: "READ(6)", opcode: 0x08, cdbLength: 6, access: "read", usage: RW6 },
  { name: "WRITE(6)", opcode: 0x0a, cdbLength: 6, access: "write", usage: RW6 },
  { name: "INQUIRY", opcode: 0x12, cdbLength: 6, access: "none", legacyAllowed: true, attentionExempt: true, usage: [0x01, 0xff, 0xff, 0xff, 0x04] },
  { name: "MODE SELECT(6)", opcode: 0x15, cdbLength: 6, access: "write", usage: [0x11, 0, 0, 0xff, 0x04] },
  { name: "RESERVE(6)", opcode: 0x16, cdbLength: 6, access: "none", usage: [0, 0, 0, 0, 0x04] },
  { name: "RELEASE(6)", opcode: 0x17, cdbLength: 6, access: "none", legacyAllowed: true, usage: [0, 0, 0, 0, 0x04] },
  { name: "MODE SENSE(6)", opcode: 0x1a, cdbLength: 6, access: "read", usage: [0x08, 0xff, 0xff, 0xff, 0x04] },
  { name: "START STOP UNIT", opcode: 0x1b, cdbLength: 6, access: "write", usage: [0x01, 0, 0x0f, 0xf7, 0x04] },
  { name: "PREVENT ALLOW MEDIUM REMOVAL", opcode: 0x1e, cdbLength: 6, access: "none", usage: [0, 0, 0, 0x03, 0x04] },
  { name: "READ CAPACITY(10)", opcode: 0x25, cdbLength: 10, access: "none", usage: [0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04] },
  { name: "READ(10)", opcode: 0x28, cdbLength: 10, access: "read", usage: RW10 },
  { name: "WRITE(10)", opcode: 0x2a, cdbLength: 10, access: "write", usage: RW10 },
  { name: "WRITE AND VERIFY(10)", opcode: 0x2e, cdbLength: 10, access: "write", usage: VERIFY10 },
  { name: "VERIFY(10)", opcode: 0x2f, cdbLength: 10, access: "read", usage: VERIFY10 },
  { name: "SYNCHRONIZE CACHE(10)", opcode: 0x35, cdbLength: 10, access: "write", usage: [0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04] },
  { name: "WRITE SAME(10)", opcode: 0x41, cdbLength: 10, access: "write", usage: [0xe8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04] },
  { name: "UNMAP", opcode: 0x42, cdbLength: 10, access: "write", usage: [0x00, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x04] },
  { name: "MODE SELECT(10)", opcode: 0x55, cdbLength: 10, access: "write", usage: [0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04] },
  { name: "RESERVE(10)", opcode: 0x56, cdbLength: 10, access: "none", usage: [0, 0, 0, 0, 0, 0, 0, 0, 0x04] },
  { name: "RELEASE(10)", opcode: 0x57, cdbLength: 10, access: "none", legacyAllowed: true, usage: [0, 0, 0, 0, 0, 0, 0, 0, 0x04] },
  { name: "MODE SENSE(10)", opcode: 0x5a, cdbLength: 10, access: "read", usage: [0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04] },
  { name: "PERSISTENT RESERVE IN", opcode: 0x5e, cdbLength: 10, access: "none", usage: [0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04] },
  { name: "PERSISTENT RESERVE OUT", opcode: 0x5f, cdbLength: 10, access: "none", usage: [0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04] },
  { name: "PRE-FETCH(10)", opcode: 0x34, cdbLength: 10, access: "read", usage: [0x02, 0xff, 0xff, 0xff, 0xff, 0x3f, 0xff, 0xff, 0x04] },
  { name: "READ DEFECT DATA(10)", opcode: 0x37, cdbLength: 10, access: "read", usage: [0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04] },
  { name: "READ(16)", opcode: 0x88, cdbLength: 16, access: "read", usage: RW16 },
  { name: "ORWRITE(16)", opcode: 0x8b, cdbLength: 16, access: "write", usage: RW16 },
  { name: "COMPARE AND WRITE", opcode: 0x89, cdbLength: 16, access: "write", usage: [0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0x04] },
  { name: "WRITE(16)", opcode: 0x8a, cdbLength: 16, access: "write", usage: RW16 },
  { name: "WRITE AND VERIFY(16)", opcode: 0x8e, cdbLength: 16, access: "write", usage: VERIFY16 },
  { name: "VERIFY(16)", opcode: 0x8f, cdbLength: 16, access: "read", usage: VERIFY16 },
  { name: "PRE-FETCH(16)", opcode: 0x90, cdbLength: 16, access: "read", usage: [0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x04] },
  { name: "SYNCHRONIZE CACHE(16)", opcode: 0x91, cdbLength: 16, access: "write", usage: [0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04] },
  { name: "WRITE SAME(16)", opcode: 0x93, cdbLength: 16, access: "write", usage: [0xe9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04] },
  { name: "READ CAPACITY(16)", opcode: 0x9e, serviceAction: 0x10, cdbLength: 16, access: "none", usage: [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x04] },
  { name: "GET LBA STATUS", opcode: 0x9e, serviceAction: 0x12, cdbLength: 16, access: "read", usage: [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04] },
  { name: "REPORT LUNS", opcode: 0xa0, cdbLength: 12, access: "none", legacyAllowed: true, attentionExempt: true, usage: [0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04] },
  { name: "REPORT SUPPORTED OPERATION CODES", opcode: 0xa3, serviceAction: 0x0c, cdbLength: 12, access: "none", legacyAllowed: true, usage: [0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04] },
  { name: "READ(12)", opcode: 0xa8, cdbLength: 12, access: "read", usage: RW12 },
  { name: "READ DEFECT DATA(12)", opcode: 0xb7, cdbLength: 12, access: "read", usage: [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04] },
  { name: "WRITE(12)", opcode: 0xaa, cdbLength: 12, access: "write", usage: RW12 },
  { name: "WRITE AND VERIFY(12)", opcode: 0xae, cdbLength: 12, access: "write", usage: VERIFY12 },
  { name: "VERIFY(12)", opcode: 0xaf, cdbLength: 12, access: "read", usage: VERIFY12 },
];

/** Opcodes whose byte 1 carries a service action. */
const SERVICE_ACTION_OPCODES: ReadonlySet<number> = new Set([0x9e, 0xa3]);

const BY_OPCODE = new Map<number, CommandSpec>();
for (const c of COMMANDS) BY_OPCODE.set(c.serviceAction === undefined ? c.opcode : c.opcode * 256 + c.serviceAction, c);

function lookup(cdb: Buffer): CommandSpec | undefined | "bad service action" {
  const opcode = u8(cdb, 0);
  if (SERVICE_ACTION_OPCODES.has(opcode)) return BY_OPCODE.get(opcode * 256 + (u8(cdb, 1) & 0x1f)) ?? "bad service action";
  return BY_OPCODE.get(opcode);
}

for (const c of COMMANDS) assert(c.usage.length + 1 === c.cdbLength, `${c.name}: CDB usage map covers the CDB`);

// ---- The registry ----

/** One session's use of a shared logical unit. */
export interface LogicalUnitLease {
  readonly lu: LogicalUnit;
  /** The session is done with it. The core stays while it holds registrations or a persistent reservation (SPC-4: they outlive I_T nexus loss). */
  release(): void;
}

/**
 * Logical units of one unit process, keyed by export name and NAA: every
 * session that opens the same export shares reservations and unit
 * attentions. The registry does not open or close devices: the transport
 * opens one per session through the ExportProvider (access control and
 * revocation stay per peer) and closes it after release(). A logical unit
 * whose last session left keeps its persistent reservations until
 * forget() (its export was deleted or changed) or the unit stops; with a
 * store, those saved under APTPL come back after a restart.
 */
export class LogicalUnitRegistry {
  readonly #cores = new Map<string, { core: LogicalUnitCore; leases: number }>();
  readonly #store: ReservationStore | undefined;

  constructor(store?: ReservationStore) {
    this.#store = store;
  }

  /** Throws when the store holds a state for this logical unit that it cannot read (the session is then refused). */
  acquire(identity: LogicalUnitIdentity, device: BlockDevice): LogicalUnitLease {
    const key = `${identity.exportName}\n${identity.naa}`;
    let entry = this.#cores.get(key);
    if (entry === undefined) {
      entry = { core: new LogicalUnitCore(identity, this.#store), leases: 0 };
      this.#cores.set(key, entry);
    }
    entry.leases += 1;
    const held = entry;
    let released = false;
    return {
      lu: new BlockLogicalUnit(device, held.core),
      release: () => {
        if (released) return;
        released = true;
        held.leases -= 1;
        if (held.leases === 0 && !held.core.reservations.holdsState && this.#cores.get(key) === held) this.#cores.delete(key);
      },
    };
  }

  /**
   * The export is gone or is no longer the same logical unit (deleted, or its
   * partitions changed): its reservations go, from memory now and from the
   * store (after any save queued before). Sessions still open keep the core
   * they have until they end.
   */
  forget(identity: LogicalUnitIdentity): Promise<void> {
    this.#cores.delete(`${identity.exportName}\n${identity.naa}`);
    return this.#store === undefined ? Promise.resolve() : this.#store.save(identity, undefined);
  }

  /** Logical units with a session or with reservations (for tests and /metrics). */
  get size(): number {
    return this.#cores.size;
  }
}

/** A logical unit of its own (not shared with other sessions): for tests and single-session tools. */
export function createLogicalUnit(device: BlockDevice, identity: LogicalUnitIdentity, core = new LogicalUnitCore(identity)): LogicalUnit {
  return new BlockLogicalUnit(device, core);
}

// ---- The logical unit ----

class BlockLogicalUnit implements LogicalUnit {
  readonly identity: LogicalUnitIdentity;
  readonly device: BlockDevice;
  readonly maxTransferBytes = MAX_TRANSFER_BYTES;
  readonly #core: LogicalUnitCore;
  readonly #blocks: number;

  constructor(device: BlockDevice, core: LogicalUnitCore) {
    this.identity = core.identity;
    this.device = device;
    this.#core = core;
    this.#blocks = Math.floor(device.sizeBytes / LOGICAL_BLOCK_BYTES);
  }

  nexusAdded(nexus: ScsiNexus): void {
    this.#core.nexusAdded(nexus);
  }

  nexusRemoved(nexus: ScsiNexus): void {
    this.#core.nexusRemoved(nexus);
  }

  reset(from: ScsiNexus): void {
    this.#core.reset(from);
  }

  dataOutLength(cdb: Buffer): number {
    try {
      return this.#dataOutLength(cdb);
    } catch {
      return 0;
    }
  }

  #dataOutLength(cdb: Buffer): number {
    if (cdb.length === 0 || cdb.length > MAX_CDB_BYTES) return 0;
    const spec = lookup(cdb);
    if (spec === undefined || spec === "bad service action" || cdb.length < spec.cdbLength) return 0;
    const opcode = spec.opcode;
    const blocksOf = (): number => {
      const { lba, blocks } = decodeLba(cdb, spec.cdbLength);
      if (blocks > MAX_TRANSFER_BLOCKS || lba + BigInt(blocks) > BigInt(this.#blocks)) return 0;
      return blocks;
    };
    switch (opcode) {
      case 0x0a:
      case 0x2a:
      case 0xaa:
      case 0x8a:
      case 0x8b:
      case 0x2e:
      case 0xae:
      case 0x8e:
        return blocksOf() * LOGICAL_BLOCK_BYTES;
      case 0x2f:
      case 0xaf:
      case 0x8f: {
        const bytchk = (u8(cdb, 1) >> 1) & 3;
        if (bytchk === 1) return blocksOf() * LOGICAL_BLOCK_BYTES;
        if (bytchk === 3) return blocksOf() > 0 ? LOGICAL_BLOCK_BYTES : 0;
        return 0;
      }
      case 0x41:
        return LOGICAL_BLOCK_BYTES;
      case 0x93:
        return (u8(cdb, 1) & 0x01) !== 0 ? 0 : LOGICAL_BLOCK_BYTES;
      case 0x89: {
        const blocks = u8(cdb, 13);
        if (blocks > MAX_COMPARE_AND_WRITE_BLOCKS || cdb.readBigUInt64BE(2) + BigInt(blocks) > BigInt(this.#blocks)) return 0;
        return 2 * blocks * LOGICAL_BLOCK_BYTES;
      }
      case 0x42:
        return Math.min(cdb.readUInt16BE(7), MAX_UNMAP_PARAMETER_BYTES);
      case 0x15:
        return Math.min(u8(cdb, 4), MAX_MODE_SELECT_BYTES);
      case 0x55:
        return Math.min(cdb.readUInt16BE(7), MAX_MODE_SELECT_BYTES);
      case 0x5f:
        return Math.min(cdb.readUInt32BE(5), PR_OUT_PARAMETER_BYTES);
      default:
        return 0;
    }
  }

  /**
   * execute() answered synchronously when that needs no waiting: READ and
   * WRITE (6/10/12/16, no FUA) whose data is in the page cache or goes into
   * it now (the device's readNow/writeNow, as the NBD server uses them),
   * with no unit attention pending and the write's blocks not locked. The
   * same checks in the same order as execute(), so the same answers; any
   * other command, or one that would wait, gets execute()'s promise. Never
   * throws or rejects: every failure is a status with sense data.
   */
  executeNow(request: ScsiRequest): ScsiResponse | Promise<ScsiResponse> {
    const tasks = this.#core.tasks;
    // Only a SIMPLE command with no ORDERED one in the task set may skip it (see TaskSet).
    if (tasks.ordered !== 0 || request.attribute !== "simple") return this.execute(request);
    const cdb = request.cdb;
    const opcode = cdb[0];
    const read = opcode === 0x28 || opcode === 0x88 || opcode === 0xa8 || opcode === 0x08;
    const write = opcode === 0x2a || opcode === 0x8a || opcode === 0xaa || opcode === 0x0a;
    if ((!read && !write) || cdb.length > MAX_CDB_BYTES) return this.execute(request);
    const spec = lookup(cdb);
    if (spec === undefined || spec === "bad service action" || cdb.length < spec.cdbLength) return this.execute(request);
    // A pending unit attention is reported (and taken) by execute().
    if (this.#core.hasAttention(nexusKey(request.nexus))) return this.execute(request);
    let writing = false;
    try {
      if ((u8(cdb, spec.cdbLength - 1) & 0x04) !== 0) throw invalidFieldInCdb(spec.cdbLength - 1, 2, "NACA is not supported");
      this.#core.reservations.check(request.nexus, spec.access, spec.legacyAllowed === true);
      writing = write;
      this.#checkProtect(spec, cdb);
      if (write) this.#checkWritable(spec);
      const { lba, blocks } = this.#extent(spec, cdb, MAX_TRANSFER_BLOCKS);
      if (blocks === 0) return GOOD;
      const offset = lba * LOGICAL_BLOCK_BYTES;
      if (read) {
        if (request.sendDataIn?.(offset, blocks * LOGICAL_BLOCK_BYTES) === true) return DATA_IN_SENT;
        const allocate = request.allocateDataIn;
        const buffer = allocate !== undefined ? allocate(blocks * LOGICAL_BLOCK_BYTES) : Buffer.allocUnsafe(blocks * LOGICAL_BLOCK_BYTES);
        if (this.device.readNow?.(buffer, offset) === true) return { status: ScsiStatus.GOOD, dataIn: buffer };
        // Now it outlives this turn: it counts as running until it completes (an ORDERED command waits for it).
        tasks.running += 1;
        return this.#readLater(buffer, offset, request.nexus);
      }
      const data = this.#truncatedData(spec, request.dataOut, blocks * LOGICAL_BLOCK_BYTES);
      if (data.length === 0) return GOOD;
      const fua = spec.cdbLength !== 6 && (u8(cdb, 1) & 0x08) !== 0;
      if (!fua && this.device.writeNow !== undefined) {
        const release = this.#core.locks.tryAcquire(offset, offset + data.length, false);
        if (release !== undefined) {
          try {
            if (this.device.writeNow([data], offset)) return GOOD;
          } finally {
            release();
          }
        }
      }
    } catch (error) {
      return this.#failure(error, writing);
    }
    // The write waits (a lock, the page cache, FUA): execute() runs it, through the same checks (nothing changed since).
    return this.execute(request);
  }

  /** A READ's data was not in the page cache: read through the device into the buffer executeNow() already has (counted running). */
  async #readLater(buffer: Buffer, offset: number, nexus: ScsiNexus): Promise<ScsiResponse> {
    const key = nexusKey(nexus);
    this.#core.started(key);
    try {
      await this.device.read(buffer, offset);
      return { status: ScsiStatus.GOOD, dataIn: buffer };
    } catch (error) {
      return this.#failure(error, false);
    } finally {
      this.#core.finished(key);
      const tasks = this.#core.tasks;
      tasks.running -= 1;
      if (tasks.ordered !== 0) tasks.completed(false);
    }
  }

  async execute(request: ScsiRequest): Promise<ScsiResponse> {
    const tasks = this.#core.tasks;
    if (tasks.ordered !== 0 || request.attribute !== "simple") {
      // ACA is refused as SAM-5 says when no ACA condition exists (the unit never establishes one: NACA is refused).
      if (request.attribute === "aca") return this.#failure(illegalRequest(ASC.INVALID_MESSAGE_ERROR, "the ACA task attribute without an ACA condition"), false);
      const entered = tasks.enter(request);
      if (entered !== true && !(await entered)) return TASK_ABORTED;
    } else {
      tasks.running += 1;
    }
    // Admitted: from here it runs, and PREEMPT AND ABORT waits for it if its nexus is preempted (never while it waits in the task set).
    const key = nexusKey(request.nexus);
    this.#core.started(key);
    let writing = false;
    try {
      const cdb = request.cdb;
      if (cdb.length === 0) throw illegalRequest(ASC.INVALID_COMMAND_OPERATION_CODE, "empty CDB");
      if (cdb.length > MAX_CDB_BYTES) throw invalidFieldInCdb(0, undefined, `CDB of ${cdb.length} bytes is longer than ${MAX_CDB_BYTES}`);
      const spec = lookup(cdb);
      if (spec === undefined) {
        // A pending unit attention is reported before an unknown opcode is refused (SAM-5 5.14).
        this.#attention(request.nexus);
        throw illegalRequest(ASC.INVALID_COMMAND_OPERATION_CODE, `operation code 0x${u8(cdb, 0).toString(16)} is not supported`);
      }
      if (spec === "bad service action") {
        this.#attention(request.nexus);
        throw invalidFieldInCdb(1, 4, `service action 0x${(u8(cdb, 1) & 0x1f).toString(16)} of operation 0x${u8(cdb, 0).toString(16)} is not supported`);
      }
      if (cdb.length < spec.cdbLength) throw invalidFieldInCdb(0, undefined, `${spec.name} needs a ${spec.cdbLength}-byte CDB, got ${cdb.length}`);
      // CONTROL byte: NACA is not supported (standard INQUIRY NORMACA=0).
      if ((u8(cdb, spec.cdbLength - 1) & 0x04) !== 0) throw invalidFieldInCdb(spec.cdbLength - 1, 2, "NACA is not supported");
      if (!spec.attentionExempt) this.#attention(request.nexus);
      this.#core.reservations.check(request.nexus, spec.access, spec.legacyAllowed === true || spec.opcode === 0x16 || spec.opcode === 0x56);
      writing = spec.access === "write";
      return await this.#run(spec, request);
    } catch (error) {
      return this.#failure(error, writing);
    } finally {
      this.#core.finished(key);
      // Counted once, however the command ended; the task set's bookkeeping only while something is ORDERED.
      tasks.running -= 1;
      if (tasks.ordered !== 0) tasks.completed(request.attribute === "ordered");
    }
  }

  /** The transport aborted the command: if it waits in the task set it never runs (execute() answers TASK ABORTED) and stops holding back later ones. */
  abort(request: ScsiRequest): void {
    this.#core.tasks.cancel(request);
  }

  /** Reports (and clears) the nexus's oldest unit attention as CHECK CONDITION. */
  #attention(nexus: ScsiNexus): void {
    const asc = this.#core.takeAttention(nexusKey(nexus));
    if (asc !== undefined) throw new SenseError({ key: SenseKey.UNIT_ATTENTION, asc }, "unit attention");
  }

  #failure(error: unknown, writing: boolean): ScsiResponse {
    if (error instanceof SenseError) return { status: ScsiStatus.CHECK_CONDITION, sense: fixedSense(error.fields) };
    if (error instanceof ReservationConflict) return { status: ScsiStatus.RESERVATION_CONFLICT };
    const fields = deviceErrorSense(error, writing);
    if (fields.key === SenseKey.HARDWARE_ERROR) log.error(`export ${this.identity.exportName}: command failed: ${errorMessage(error)}`);
    else log.warn(`export ${this.identity.exportName}: ${errorMessage(error)}`);
    return { status: ScsiStatus.CHECK_CONDITION, sense: fixedSense(fields) };
  }

  #run(spec: CommandSpec, request: ScsiRequest): Promise<ScsiResponse> | ScsiResponse {
    const cdb = request.cdb;
    switch (spec.opcode) {
      case 0x00:
        return GOOD;
      case 0x03:
        return this.#requestSense(cdb, request.nexus);
      case 0x08:
      case 0x28:
      case 0xa8:
      case 0x88:
        return this.#read(spec, cdb, request.allocateDataIn);
      case 0x0a:
      case 0x2a:
      case 0xaa:
      case 0x8a:
        return this.#write(spec, cdb, request.dataOut, false);
      case 0x8b:
        return this.#orWrite(spec, cdb, request.dataOut);
      case 0x34:
      case 0x90:
        return this.#prefetch(spec, cdb);
      case 0x37:
      case 0xb7:
        return this.#readDefectData(spec, cdb);
      case 0x2e:
      case 0xae:
      case 0x8e:
        return this.#write(spec, cdb, request.dataOut, true);
      case 0x2f:
      case 0xaf:
      case 0x8f:
        return this.#verify(spec, cdb, request.dataOut);
      case 0x12:
        return this.#inquiry(cdb, request.nexus);
      case 0x15:
      case 0x55:
        return this.#modeSelect(spec, cdb, request.dataOut);
      case 0x1a:
      case 0x5a:
        return this.#modeSense(spec, cdb);
      case 0x16:
      case 0x56:
        if ((u8(cdb, 1) & 0x11) !== 0) throw invalidFieldInCdb(1, (u8(cdb, 1) & 0x10) !== 0 ? 4 : 0, "third-party and extent reservations are not supported");
        this.#core.reservations.legacyReserve(request.nexus);
        return GOOD;
      case 0x17:
      case 0x57:
        if ((u8(cdb, 1) & 0x11) !== 0) throw invalidFieldInCdb(1, (u8(cdb, 1) & 0x10) !== 0 ? 4 : 0, "third-party and extent releases are not supported");
        this.#core.reservations.legacyRelease(request.nexus);
        return GOOD;
      case 0x1b:
        return this.#startStop(cdb);
      case 0x1e:
        if ((u8(cdb, 4) & 0xfc) !== 0) throw invalidFieldInCdb(4, 2);
        this.#core.setPrevent(nexusKey(request.nexus), (u8(cdb, 4) & 0x03) !== 0);
        return GOOD;
      case 0x25:
        return this.#readCapacity10(cdb);
      case 0x35:
      case 0x91:
        return this.#synchronize(spec, cdb);
      case 0x41:
      case 0x93:
        return this.#writeSame(spec, cdb, request.dataOut, request.expectedLength);
      case 0x42:
        return this.#unmap(cdb, request.dataOut);
      case 0x5e:
        return this.#prIn(cdb);
      case 0x5f:
        return this.#prOut(cdb, request);
      case 0x89:
        return this.#compareAndWrite(cdb, request.dataOut, request.expectedLength);
      case 0x9e:
        return spec.serviceAction === 0x10 ? this.#readCapacity16(cdb) : this.#getLbaStatus(cdb);
      case 0xa0:
        return this.#reportLuns(cdb);
      case 0xa3:
        return this.#reportOpcodes(cdb);
      default:
        throw illegalRequest(ASC.INVALID_COMMAND_OPERATION_CODE, `${spec.name} is not implemented`);
    }
  }

  // ---- helpers ----

  /** Decodes and checks an LBA range: MAXIMUM TRANSFER LENGTH, then the capacity. */
  #extent(spec: CommandSpec, cdb: Buffer, maxBlocks: number): Extent {
    const { lba, blocks } = decodeLba(cdb, spec.cdbLength);
    if (lba + BigInt(blocks) > BigInt(this.#blocks)) {
      throw lbaOutOfRange(`${spec.name}: LBA ${lba} + ${blocks} blocks is beyond the last LBA ${this.#blocks - 1}`);
    }
    if (blocks > maxBlocks) {
      const byte = spec.cdbLength === 6 ? 4 : spec.cdbLength === 10 ? 7 : spec.cdbLength === 12 ? 6 : 10;
      throw invalidFieldInCdb(byte, undefined, `${spec.name}: ${blocks} blocks is more than the ${maxBlocks} the unit transfers at once`);
    }
    return { lba: Number(lba), blocks };
  }

  #checkProtect(spec: CommandSpec, cdb: Buffer): void {
    if (spec.cdbLength !== 6 && (u8(cdb, 1) & 0xe0) !== 0) {
      throw invalidFieldInCdb(1, 7, `${spec.name}: protection information is not supported (RDPROTECT/WRPROTECT/VRPROTECT must be 0)`);
    }
  }

  #checkWritable(spec: CommandSpec): void {
    if (this.device.capabilities.readOnly) {
      throw new SenseError({ key: SenseKey.DATA_PROTECT, asc: ASC.WRITE_PROTECTED }, `${spec.name}: the export is read-only`);
    }
  }

  /** The Data-Out a command needs, or INVALID FIELD IN COMMAND INFORMATION UNIT when the initiator sent less. */
  #needData(spec: CommandSpec, dataOut: Buffer | undefined, bytes: number): Buffer {
    if (dataOut === undefined || dataOut.length < bytes) {
      throw illegalRequest(
        ASC.INVALID_FIELD_IN_COMMAND_IU,
        `${spec.name} needs ${bytes} bytes of Data-Out, the initiator sent ${dataOut?.length ?? 0} (ExpectedDataTransferLength too small)`,
      );
    }
    return dataOut.length === bytes ? dataOut : dataOut.subarray(0, bytes);
  }

  /**
   * The Data-Out of a WRITE whose ExpectedDataTransferLength is below the
   * CDB's transfer length (FCP-4 9.4.2 a, which libiscsi's residual tests
   * follow): the whole blocks that came are written and the rest is not
   * asked for (the transport reports the overflow residual). A partial block
   * is refused with INVALID FIELD IN COMMAND INFORMATION UNIT and nothing is written.
   */
  #truncatedData(spec: CommandSpec, dataOut: Buffer | undefined, bytes: number): Buffer {
    const got = dataOut ?? Buffer.alloc(0);
    if (got.length >= bytes) return got.length === bytes ? got : got.subarray(0, bytes);
    if (got.length % LOGICAL_BLOCK_BYTES !== 0) {
      throw illegalRequest(
        ASC.INVALID_FIELD_IN_COMMAND_IU,
        `${spec.name} got ${got.length} bytes of Data-Out, not a whole number of ${LOGICAL_BLOCK_BYTES}-byte blocks (ExpectedDataTransferLength below the transfer length)`,
      );
    }
    return got;
  }

  /**
   * WRITE SAME and COMPARE AND WRITE take exactly the Data-Out their CDB
   * names: a different ExpectedDataTransferLength means the initiator and
   * the CDB disagree on what the data is (a COMPARE AND WRITE of 256 blocks
   * wraps its one-byte length to 0), so nothing is written: INVALID FIELD IN
   * CDB pointing at the CDB's length field.
   */
  #exactData(spec: CommandSpec, expectedLength: number, bytes: number, lengthByte: number): void {
    if (expectedLength !== bytes) {
      throw invalidFieldInCdb(
        lengthByte,
        undefined,
        `${spec.name} transfers exactly ${bytes} bytes of Data-Out by its CDB; the initiator's ExpectedDataTransferLength is ${expectedLength}`,
      );
    }
  }

  async #readBlocks(lba: number, blocks: number, allocate?: (bytes: number) => Buffer): Promise<Buffer> {
    const buffer = allocate !== undefined ? allocate(blocks * LOGICAL_BLOCK_BYTES) : Buffer.allocUnsafe(blocks * LOGICAL_BLOCK_BYTES);
    const offset = lba * LOGICAL_BLOCK_BYTES;
    if (this.device.readNow?.(buffer, offset) !== true) await this.device.read(buffer, offset);
    return buffer;
  }

  async #writeBlocks(data: Buffer, lba: number, fua: boolean): Promise<void> {
    const start = lba * LOGICAL_BLOCK_BYTES;
    const release = await this.#core.locks.acquire(start, start + data.length, false);
    try {
      if (!fua && this.device.writeNow?.([data], start) === true) return;
      const deviceFua = fua && this.device.capabilities.canFua;
      await this.device.write(data, start, deviceFua);
      if (fua && !deviceFua) await this.device.flush();
    } finally {
      release();
    }
  }

  // ---- commands ----

  #requestSense(cdb: Buffer, nexus: ScsiNexus): ScsiResponse {
    if ((u8(cdb, 1) & 0x01) !== 0) throw invalidFieldInCdb(1, 0, "descriptor-format sense is not supported (DESC must be 0)");
    const asc = this.#core.takeAttention(nexusKey(nexus));
    const sense = asc === undefined ? fixedSense({ key: SenseKey.NO_SENSE, asc: ASC.NO_ADDITIONAL }) : fixedSense({ key: SenseKey.UNIT_ATTENTION, asc });
    return { status: ScsiStatus.GOOD, dataIn: sense.subarray(0, u8(cdb, 4)) };
  }

  async #read(spec: CommandSpec, cdb: Buffer, allocate: ((bytes: number) => Buffer) | undefined): Promise<ScsiResponse> {
    this.#checkProtect(spec, cdb);
    const { lba, blocks } = this.#extent(spec, cdb, MAX_TRANSFER_BLOCKS);
    if (blocks === 0) return GOOD;
    return { status: ScsiStatus.GOOD, dataIn: await this.#readBlocks(lba, blocks, allocate) };
  }

  async #write(spec: CommandSpec, cdb: Buffer, dataOut: Buffer | undefined, verify: boolean): Promise<ScsiResponse> {
    this.#checkProtect(spec, cdb);
    this.#checkWritable(spec);
    if (verify && (u8(cdb, 1) & 0x04) !== 0) throw invalidFieldInCdb(1, 2, `${spec.name}: BYTCHK 10b/11b is not defined for WRITE AND VERIFY`);
    const { lba, blocks } = this.#extent(spec, cdb, MAX_TRANSFER_BLOCKS);
    if (blocks === 0) return GOOD;
    const data = this.#truncatedData(spec, dataOut, blocks * LOGICAL_BLOCK_BYTES);
    if (data.length === 0) return GOOD;
    // FUA (byte 1 bit 3; none in WRITE(6)); WRITE AND VERIFY makes the data durable before it answers.
    const fua = verify || (spec.cdbLength !== 6 && (u8(cdb, 1) & 0x08) !== 0);
    await this.#writeBlocks(data, lba, fua);
    return GOOD;
  }

  /** ORWRITE(16) (SBC-3 5.8): each block becomes the bitwise OR of itself and the Data-Out, atomically against other writes. */
  async #orWrite(spec: CommandSpec, cdb: Buffer, dataOut: Buffer | undefined): Promise<ScsiResponse> {
    this.#checkProtect(spec, cdb);
    this.#checkWritable(spec);
    const { lba, blocks } = this.#extent(spec, cdb, MAX_TRANSFER_BLOCKS);
    if (blocks === 0) return GOOD;
    const data = this.#truncatedData(spec, dataOut, blocks * LOGICAL_BLOCK_BYTES);
    if (data.length === 0) return GOOD;
    const fua = (u8(cdb, 1) & 0x08) !== 0;
    const start = lba * LOGICAL_BLOCK_BYTES;
    const release = await this.#core.locks.acquire(start, start + data.length, true);
    try {
      const medium = await this.#readBlocks(lba, data.length / LOGICAL_BLOCK_BYTES);
      for (let i = 0; i < medium.length; i += 1) medium[i] = (medium[i] ?? 0) | (data[i] ?? 0);
      const deviceFua = fua && this.device.capabilities.canFua;
      await this.device.write(medium, start, deviceFua);
      if (fua && !deviceFua) await this.device.flush();
      return GOOD;
    } finally {
      release();
    }
  }

  /** PRE-FETCH 10/16 (SBC-3 5.9): a page-cache hint; GOOD, not CONDITION MET (nothing is promised to stay cached). */
  async #prefetch(spec: CommandSpec, cdb: Buffer): Promise<ScsiResponse> {
    const { lba, blocks } = this.#extent(spec, cdb, MAX_TRANSFER_BLOCKS);
    if (blocks > 0 && this.device.capabilities.canCache) await this.device.cache(lba * LOGICAL_BLOCK_BYTES, blocks * LOGICAL_BLOCK_BYTES);
    return GOOD;
  }

  /** READ DEFECT DATA 10/12 (SBC-3 5.12, 5.13): no defects, no lists (PLISTV=GLISTV=0). */
  #readDefectData(spec: CommandSpec, cdb: Buffer): ScsiResponse {
    const ten = spec.cdbLength === 10;
    const format = (ten ? u8(cdb, 2) : u8(cdb, 1)) & 0x07;
    const allocation = ten ? cdb.readUInt16BE(7) : cdb.readUInt32BE(6);
    const out = Buffer.alloc(ten ? 4 : 8);
    out[1] = format;
    return { status: ScsiStatus.GOOD, dataIn: out.subarray(0, allocation) };
  }

  async #verify(spec: CommandSpec, cdb: Buffer, dataOut: Buffer | undefined): Promise<ScsiResponse> {
    this.#checkProtect(spec, cdb);
    const bytchk = (u8(cdb, 1) >> 1) & 3;
    if (bytchk === 2) throw invalidFieldInCdb(1, 2, `${spec.name}: BYTCHK 10b is reserved`);
    const { lba, blocks } = this.#extent(spec, cdb, MAX_TRANSFER_BLOCKS);
    if (blocks === 0) return GOOD;
    const medium = await this.#readBlocks(lba, blocks);
    if (bytchk === 0) return GOOD; // the medium was readable
    const expected = this.#needData(spec, dataOut, bytchk === 1 ? blocks * LOGICAL_BLOCK_BYTES : LOGICAL_BLOCK_BYTES);
    for (let b = 0; b < blocks; b += 1) {
      const got = medium.subarray(b * LOGICAL_BLOCK_BYTES, (b + 1) * LOGICAL_BLOCK_BYTES);
      const want = bytchk === 1 ? expected.subarray(b * LOGICAL_BLOCK_BYTES, (b + 1) * LOGICAL_BLOCK_BYTES) : expected;
      const at = firstDifference(got, want);
      if (at >= 0) {
        const offset = bytchk === 1 ? b * LOGICAL_BLOCK_BYTES + at : b * LOGICAL_BLOCK_BYTES + at;
        throw new SenseError(
          { key: SenseKey.MISCOMPARE, asc: ASC.MISCOMPARE_DURING_VERIFY, information: offset },
          `${spec.name}: miscompare at byte ${offset}`,
        );
      }
    }
    return GOOD;
  }

  #inquiry(cdb: Buffer, nexus: ScsiNexus): ScsiResponse {
    const evpd = (u8(cdb, 1) & 0x01) !== 0;
    if ((u8(cdb, 1) & 0xfe) !== 0) throw invalidFieldInCdb(1, (u8(cdb, 1) & 0x02) !== 0 ? 1 : 7, "INQUIRY: CMDDT and reserved bits must be 0");
    const page = u8(cdb, 2);
    const allocation = cdb.readUInt16BE(3);
    let data: Buffer;
    if (!evpd) {
      if (page !== 0) throw invalidFieldInCdb(2, undefined, "INQUIRY: PAGE CODE must be 0 without EVPD");
      data = standardInquiry(this.device.capabilities.readOnly);
    } else {
      const found = vpd(page, this.identity, nexus, this.device.capabilities);
      if (found === undefined) throw invalidFieldInCdb(2, undefined, `INQUIRY: VPD page 0x${page.toString(16)} is not supported`);
      data = found;
    }
    return { status: ScsiStatus.GOOD, dataIn: data.subarray(0, allocation) };
  }

  #readCapacity10(cdb: Buffer): ScsiResponse {
    const pmi = (u8(cdb, 8) & 0x01) !== 0;
    if (!pmi && cdb.readUInt32BE(2) !== 0) throw invalidFieldInCdb(2, undefined, "READ CAPACITY(10): LOGICAL BLOCK ADDRESS must be 0 without PMI");
    const out = Buffer.alloc(8);
    const last = this.#blocks - 1;
    out.writeUInt32BE(last > 0xfffffffe ? 0xffffffff : Math.max(last, 0), 0);
    out.writeUInt32BE(LOGICAL_BLOCK_BYTES, 4);
    return { status: ScsiStatus.GOOD, dataIn: out };
  }

  #readCapacity16(cdb: Buffer): ScsiResponse {
    const out = Buffer.alloc(32);
    out.writeBigUInt64BE(BigInt(Math.max(this.#blocks - 1, 0)), 0);
    out.writeUInt32BE(LOGICAL_BLOCK_BYTES, 8);
    // P_TYPE/PROT_EN 0; LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0: GET LBA STATUS answers per
    // logical block, and libiscsi 1.19 (Debian's) mis-checks GET LBA STATUS when the exponent is above 0.
    out[13] = 0x00;
    const p = provisioning(this.device.capabilities);
    out[14] = (p.lbpme ? 0x80 : 0) | (p.lbprz ? 0x40 : 0);
    return { status: ScsiStatus.GOOD, dataIn: out.subarray(0, cdb.readUInt32BE(10)) };
  }

  async #synchronize(spec: CommandSpec, cdb: Buffer): Promise<ScsiResponse> {
    const lba = spec.cdbLength === 10 ? BigInt(cdb.readUInt32BE(2)) : cdb.readBigUInt64BE(2);
    const blocks = spec.cdbLength === 10 ? cdb.readUInt16BE(7) : cdb.readUInt32BE(10);
    if (lba + BigInt(blocks) > BigInt(this.#blocks)) throw lbaOutOfRange(`${spec.name}: LBA ${lba} + ${blocks} is beyond the capacity`);
    if (this.device.capabilities.canFlush) await this.device.flush();
    return GOOD;
  }

  #startStop(cdb: Buffer): ScsiResponse {
    const condition = u8(cdb, 4) >> 4;
    const loej = (u8(cdb, 4) & 0x02) !== 0;
    const start = (u8(cdb, 4) & 0x01) !== 0;
    if (condition !== 0) return GOOD; // power conditions: accepted, the unit stays active
    if (loej && !start && this.#core.preventing) {
      throw illegalRequest(ASC.MEDIUM_REMOVAL_PREVENTED, "START STOP UNIT: medium removal is prevented (PREVENT ALLOW MEDIUM REMOVAL)");
    }
    // Not removable (RMB=0) and always ready: starting and stopping change nothing.
    return GOOD;
  }

  async #writeSame(spec: CommandSpec, cdb: Buffer, dataOut: Buffer | undefined, expectedLength: number): Promise<ScsiResponse> {
    this.#checkProtect(spec, cdb);
    this.#checkWritable(spec);
    const flags = u8(cdb, 1);
    if ((flags & 0x10) !== 0) throw invalidFieldInCdb(1, 4, `${spec.name}: ANCHOR is not supported (ANC_SUP=0)`);
    if ((flags & 0x06) !== 0) throw invalidFieldInCdb(1, 2, `${spec.name}: PBDATA/LBDATA are not supported`);
    const unmap = (flags & 0x08) !== 0;
    const ndob = spec.cdbLength === 16 && (flags & 0x01) !== 0;
    const p = provisioning(this.device.capabilities);
    if (unmap && !p.writeSameUnmap) throw invalidFieldInCdb(1, 3, `${spec.name}: UNMAP is not supported by this export (LBPWS=0)`);
    const lengthByte = spec.cdbLength === 10 ? 7 : 10;
    const given = this.#extent(spec, cdb, MAX_WRITE_SAME_BLOCKS);
    const lba = given.lba;
    // WSNZ=0: NUMBER OF LOGICAL BLOCKS 0 means through the last LBA (SBC-3 5.42), within MAXIMUM WRITE SAME LENGTH.
    const blocks = given.blocks === 0 ? this.#blocks - lba : given.blocks;
    if (blocks > MAX_WRITE_SAME_BLOCKS) {
      throw invalidFieldInCdb(lengthByte, undefined, `${spec.name}: ${blocks} blocks to the end of the medium is more than the ${MAX_WRITE_SAME_BLOCKS} of MAXIMUM WRITE SAME LENGTH`);
    }
    if (blocks === 0) return GOOD;
    if (!ndob) this.#exactData(spec, expectedLength, LOGICAL_BLOCK_BYTES, lengthByte);
    const pattern = ndob ? Buffer.alloc(LOGICAL_BLOCK_BYTES) : this.#needData(spec, dataOut, LOGICAL_BLOCK_BYTES);
    const start = lba * LOGICAL_BLOCK_BYTES;
    const length = blocks * LOGICAL_BLOCK_BYTES;
    const release = await this.#core.locks.acquire(start, start + length, false);
    try {
      // With UNMAP the blocks are unmapped whatever the Data-Out holds (as LIO does, and libiscsi
      // expects: they then read back as zeroes, LBPRZ); zeroes without UNMAP are written as zeroes.
      if ((unmap || pattern.every((b) => b === 0)) && this.device.capabilities.canZero) {
        await this.device.zero(start, length, { fua: false, mayTrim: unmap, fastOnly: false });
        return GOOD;
      }
      const chunkBlocks = Math.min(blocks, WRITE_SAME_CHUNK_BYTES / LOGICAL_BLOCK_BYTES);
      const chunk = Buffer.allocUnsafe(chunkBlocks * LOGICAL_BLOCK_BYTES);
      for (let b = 0; b < chunkBlocks; b += 1) pattern.copy(chunk, b * LOGICAL_BLOCK_BYTES);
      for (let done = 0; done < blocks; done += chunkBlocks) {
        const n = Math.min(chunkBlocks, blocks - done);
        await this.device.write(n === chunkBlocks ? chunk : chunk.subarray(0, n * LOGICAL_BLOCK_BYTES), start + done * LOGICAL_BLOCK_BYTES, false);
      }
      return GOOD;
    } finally {
      release();
    }
  }

  async #unmap(cdb: Buffer, dataOut: Buffer | undefined): Promise<ScsiResponse> {
    const p = provisioning(this.device.capabilities);
    if (!p.lbpme) throw illegalRequest(ASC.INVALID_COMMAND_OPERATION_CODE, "UNMAP is not supported by this export (LBPME=0)");
    this.#checkWritable(COMMANDS_BY_NAME.UNMAP);
    if ((u8(cdb, 1) & 0x01) !== 0) throw invalidFieldInCdb(1, 0, "UNMAP: ANCHOR is not supported (ANC_SUP=0)");
    const listLength = cdb.readUInt16BE(7);
    if (listLength === 0) return GOOD;
    if (listLength < 8) throw parameterListLengthError(`UNMAP: parameter list length ${listLength} is shorter than its 8-byte header`);
    if (listLength > MAX_UNMAP_PARAMETER_BYTES) {
      throw invalidFieldInCdb(7, undefined, `UNMAP: parameter list length ${listLength} exceeds ${MAX_UNMAP_PARAMETER_BYTES} (at most ${MAX_UNMAP_DESCRIPTORS} descriptors)`);
    }
    const data = this.#needData(COMMANDS_BY_NAME.UNMAP, dataOut, listLength);
    const descriptorBytes = data.readUInt16BE(2);
    if (data.readUInt16BE(0) < 6 && descriptorBytes > 0) throw parameterListLengthError("UNMAP: UNMAP DATA LENGTH is too small");
    const count = Math.floor(Math.min(descriptorBytes, listLength - 8) / 16);
    if (count > MAX_UNMAP_DESCRIPTORS) throw invalidFieldInParameterList(2, undefined, `UNMAP: more than ${MAX_UNMAP_DESCRIPTORS} block descriptors`);
    const ranges: Extent[] = [];
    let total = 0;
    for (let i = 0; i < count; i += 1) {
      const at = 8 + 16 * i;
      const lba = data.readBigUInt64BE(at);
      const blocks = data.readUInt32BE(at + 8);
      if (lba + BigInt(blocks) > BigInt(this.#blocks)) throw lbaOutOfRange(`UNMAP: descriptor ${i} (LBA ${lba} + ${blocks}) is beyond the capacity`);
      total += blocks;
      if (blocks > MAX_UNMAP_LBA_COUNT || total > MAX_UNMAP_LBA_COUNT) {
        throw invalidFieldInParameterList(at + 8, undefined, `UNMAP: more than ${MAX_UNMAP_LBA_COUNT} blocks in one command`);
      }
      if (blocks > 0) ranges.push({ lba: Number(lba), blocks });
    }
    for (const r of ranges) {
      const start = r.lba * LOGICAL_BLOCK_BYTES;
      const length = r.blocks * LOGICAL_BLOCK_BYTES;
      const release = await this.#core.locks.acquire(start, start + length, false);
      try {
        if (this.device.capabilities.canZero) await this.device.zero(start, length, { fua: false, mayTrim: true, fastOnly: false });
        else await this.device.trim(start, length, false);
      } finally {
        release();
      }
    }
    return GOOD;
  }

  async #compareAndWrite(cdb: Buffer, dataOut: Buffer | undefined, expectedLength: number): Promise<ScsiResponse> {
    const spec = COMMANDS_BY_NAME["COMPARE AND WRITE"];
    this.#checkProtect(spec, cdb);
    this.#checkWritable(spec);
    const lba = cdb.readBigUInt64BE(2);
    const blocks = u8(cdb, 13);
    if (lba + BigInt(blocks) > BigInt(this.#blocks)) throw lbaOutOfRange(`COMPARE AND WRITE: LBA ${lba} + ${blocks} is beyond the capacity`);
    if (blocks > MAX_COMPARE_AND_WRITE_BLOCKS) throw invalidFieldInCdb(13, undefined, `COMPARE AND WRITE: at most ${MAX_COMPARE_AND_WRITE_BLOCKS} blocks`);
    const bytes = blocks * LOGICAL_BLOCK_BYTES;
    this.#exactData(spec, expectedLength, 2 * bytes, 13);
    if (blocks === 0) return GOOD;
    const data = this.#needData(spec, dataOut, 2 * bytes);
    const fua = (u8(cdb, 1) & 0x08) !== 0;
    const start = Number(lba) * LOGICAL_BLOCK_BYTES;
    const release = await this.#core.locks.acquire(start, start + bytes, true);
    try {
      const medium = await this.#readBlocks(Number(lba), blocks);
      const at = firstDifference(medium, data.subarray(0, bytes));
      if (at >= 0) {
        throw new SenseError({ key: SenseKey.MISCOMPARE, asc: ASC.MISCOMPARE_DURING_VERIFY, information: at }, `COMPARE AND WRITE: miscompare at byte ${at}`);
      }
      const deviceFua = fua && this.device.capabilities.canFua;
      await this.device.write(data.subarray(bytes), start, deviceFua);
      if (fua && !deviceFua) await this.device.flush();
      return GOOD;
    } finally {
      release();
    }
  }

  async #getLbaStatus(cdb: Buffer): Promise<ScsiResponse> {
    const lba = cdb.readBigUInt64BE(2);
    const allocation = cdb.readUInt32BE(10);
    if (lba >= BigInt(this.#blocks)) throw lbaOutOfRange(`GET LBA STATUS: LBA ${lba} is beyond the last LBA ${this.#blocks - 1}`);
    const first = Number(lba);
    const maxDescriptors = Math.min(MAX_LBA_STATUS_DESCRIPTORS, Math.max(1, Math.floor((allocation - 8) / 16)));
    const start = first * LOGICAL_BLOCK_BYTES;
    const length = Math.min(this.#blocks * LOGICAL_BLOCK_BYTES - start, LBA_STATUS_SCAN_BYTES);
    const runs = await this.device.extents(start, length);
    const descriptors: { lba: number; blocks: number; status: number }[] = [];
    let cursor = first;
    for (const run of runs) {
      if (descriptors.length >= maxDescriptors) break;
      const blocks = Math.floor(run.lengthBytes / LOGICAL_BLOCK_BYTES);
      if (blocks <= 0) break;
      const status = run.hole ? 0x1 : 0x0; // deallocated or mapped
      const last = descriptors[descriptors.length - 1];
      if (last !== undefined && last.status === status) last.blocks += blocks;
      else descriptors.push({ lba: cursor, blocks, status });
      cursor += blocks;
    }
    if (descriptors.length === 0) descriptors.push({ lba: first, blocks: 1, status: 0 });
    const out = Buffer.alloc(8 + 16 * descriptors.length);
    out.writeUInt32BE(out.length - 4, 0);
    descriptors.forEach((d, i) => {
      out.writeBigUInt64BE(BigInt(d.lba), 8 + 16 * i);
      out.writeUInt32BE(Math.min(d.blocks, 0xffffffff), 16 + 16 * i);
      out[20 + 16 * i] = d.status;
    });
    return { status: ScsiStatus.GOOD, dataIn: out.subarray(0, allocation) };
  }

  #reportLuns(cdb: Buffer): ScsiResponse {
    const select = u8(cdb, 2);
    const allocation = cdb.readUInt32BE(6);
    if (allocation < 16) throw invalidFieldInCdb(6, undefined, "REPORT LUNS: ALLOCATION LENGTH must be at least 16");
    if (select > 0x02) throw invalidFieldInCdb(2, undefined, `REPORT LUNS: SELECT REPORT 0x${select.toString(16)} is not supported`);
    // LUN 0 for SELECT REPORT 00h and 02h; no well-known logical units (01h).
    const luns = select === 0x01 ? 0 : 1;
    const out = Buffer.alloc(8 + 8 * luns);
    out.writeUInt32BE(8 * luns, 0);
    return { status: ScsiStatus.GOOD, dataIn: out.subarray(0, allocation) };
  }

  #prIn(cdb: Buffer): ScsiResponse {
    const action = u8(cdb, 1) & 0x1f;
    const allocation = cdb.readUInt16BE(7);
    const r = this.#core.reservations;
    let data: Buffer;
    switch (action) {
      case 0:
        data = r.readKeys();
        break;
      case 1:
        data = r.readReservation();
        break;
      case 2:
        data = r.reportCapabilities();
        break;
      case 3:
        data = r.readFullStatus();
        break;
      default:
        throw invalidFieldInCdb(1, 4, `PERSISTENT RESERVE IN: service action ${action} is not supported`);
    }
    return { status: ScsiStatus.GOOD, dataIn: data.subarray(0, allocation) };
  }

  /**
   * PERSISTENT RESERVE OUT. Under APTPL the new state is durable before GOOD
   * (SPC-4 5.13.5); a save that fails answers HARDWARE ERROR, INTERNAL TARGET
   * FAILURE (44h/00h) with the change in effect in memory: the next PR OUT
   * that saves writes it whole.
   */
  #prOut(cdb: Buffer, request: ScsiRequest): ScsiResponse | Promise<ScsiResponse> {
    const listLength = cdb.readUInt32BE(5);
    const data = request.dataOut ?? Buffer.alloc(0);
    const result = this.#core.reservations.out(request.nexus, cdb, data.subarray(0, Math.min(listLength, data.length)));
    this.#core.notify(result.notices);
    // PREEMPT AND ABORT (SPC-4 5.13.11.2.3): the preempted nexuses' commands still running finish
    // before GOOD (they are not cut off half way), so a fenced initiator's write never lands after
    // the fencing node was told it is fenced. Their commands not yet started meet the new state.
    const preempted = (u8(cdb, 1) & 0x1f) === 5 ? result.notices.filter((n) => n.asc === ASC.REGISTRATIONS_PREEMPTED).map((n) => n.nexusKey) : [];
    if (preempted.length > 0) return this.#core.drained(preempted).then(() => this.#saved(result.save));
    return this.#saved(result.save);
  }

  /** GOOD once `save` (if any) is durable; a save that fails is HARDWARE ERROR (through #failure). */
  #saved(save: SavedReservations | null | undefined): ScsiResponse | Promise<ScsiResponse> {
    if (save === undefined) return GOOD;
    return this.#core.save(save).then(
      () => GOOD,
      (error: unknown) => {
        throw new Error(`persistent reservations of ${this.identity.exportName} could not be saved (APTPL): ${errorMessage(error)}`, { cause: error });
      },
    );
  }

  #modeSense(spec: CommandSpec, cdb: Buffer): ScsiResponse {
    const ten = spec.cdbLength === 10;
    const dbd = (u8(cdb, 1) & 0x08) !== 0;
    const llbaa = ten && (u8(cdb, 1) & 0x10) !== 0;
    const pc = u8(cdb, 2) >> 6;
    const code = u8(cdb, 2) & 0x3f;
    const subpage = u8(cdb, 3);
    const allocation = ten ? cdb.readUInt16BE(7) : u8(cdb, 4);
    if (pc === 3) throw illegalRequest(ASC.SAVING_PARAMETERS_NOT_SUPPORTED, "MODE SENSE: saved values are not supported (PC=11b)");
    const pages: Buffer[] = [];
    const caps = this.device.capabilities;
    if (code === 0x3f) {
      if (subpage !== 0x00 && subpage !== 0xff) throw invalidFieldInCdb(3, undefined, `MODE SENSE: subpage 0x${subpage.toString(16)} is not supported`);
      for (const c of MODE_PAGES) pages.push(modePage(c, pc as PageControl, caps) ?? Buffer.alloc(0));
    } else {
      const page = modePage(code, pc as PageControl, caps);
      if (page === undefined) throw invalidFieldInCdb(2, 5, `MODE SENSE: page 0x${code.toString(16)} is not supported`);
      if (subpage !== 0) throw invalidFieldInCdb(3, undefined, `MODE SENSE: subpage 0x${subpage.toString(16)} is not supported`);
      pages.push(page);
    }
    let descriptor = Buffer.alloc(0);
    if (!dbd) {
      if (llbaa) {
        descriptor = Buffer.alloc(16);
        descriptor.writeBigUInt64BE(BigInt(pc === 1 ? 0 : this.#blocks), 0);
        descriptor.writeUInt32BE(pc === 1 ? 0 : LOGICAL_BLOCK_BYTES, 12);
      } else {
        descriptor = Buffer.alloc(8);
        descriptor.writeUInt32BE(pc === 1 ? 0 : Math.min(this.#blocks, 0xffffffff), 0);
        descriptor.writeUIntBE(pc === 1 ? 0 : LOGICAL_BLOCK_BYTES, 5, 3);
      }
    }
    // DEVICE-SPECIFIC PARAMETER: WP (bit 7), DPOFUA (bit 4).
    const deviceSpecific = (caps.readOnly ? 0x80 : 0) | 0x10;
    const body = Buffer.concat([descriptor, ...pages]);
    let out: Buffer;
    if (ten) {
      out = Buffer.alloc(8 + body.length);
      out.writeUInt16BE(out.length - 2, 0);
      out[3] = deviceSpecific;
      out[4] = llbaa && descriptor.length > 0 ? 0x01 : 0x00;
      out.writeUInt16BE(descriptor.length, 6);
      body.copy(out, 8);
    } else {
      out = Buffer.alloc(4 + body.length);
      out[0] = Math.min(out.length - 1, 0xff);
      out[2] = deviceSpecific;
      out[3] = descriptor.length;
      body.copy(out, 4);
    }
    return { status: ScsiStatus.GOOD, dataIn: out.subarray(0, allocation) };
  }

  #modeSelect(spec: CommandSpec, cdb: Buffer, dataOut: Buffer | undefined): ScsiResponse {
    const ten = spec.cdbLength === 10;
    if ((u8(cdb, 1) & 0x01) !== 0) throw invalidFieldInCdb(1, 0, `${spec.name}: saving parameters (SP=1) is not supported`);
    const listLength = ten ? cdb.readUInt16BE(7) : u8(cdb, 4);
    if (listLength === 0) return GOOD;
    if (listLength > MAX_MODE_SELECT_BYTES) throw invalidFieldInCdb(ten ? 7 : 4, undefined, `${spec.name}: parameter list longer than ${MAX_MODE_SELECT_BYTES} bytes`);
    const data = this.#needData(spec, dataOut, listLength);
    const headerBytes = ten ? 8 : 4;
    if (data.length < headerBytes) throw parameterListLengthError(`${spec.name}: parameter list shorter than its ${headerBytes}-byte header`);
    const descriptorBytes = ten ? data.readUInt16BE(6) : u8(data, 3);
    const longLba = ten && (u8(data, 4) & 0x01) !== 0;
    let at = headerBytes;
    if (descriptorBytes > 0) {
      const size = longLba ? 16 : 8;
      if (descriptorBytes !== size) throw invalidFieldInParameterList(ten ? 6 : 3, undefined, `${spec.name}: BLOCK DESCRIPTOR LENGTH must be 0 or ${size}`);
      if (at + size > data.length) throw parameterListLengthError(`${spec.name}: block descriptor truncated`);
      const blockLength = longLba ? data.readUInt32BE(at + 12) : data.readUIntBE(at + 5, 3);
      if (blockLength !== LOGICAL_BLOCK_BYTES) {
        throw invalidFieldInParameterList(at + (longLba ? 12 : 5), undefined, `${spec.name}: the logical block length is fixed at ${LOGICAL_BLOCK_BYTES}`);
      }
      at += size;
    }
    const caps = this.device.capabilities;
    while (at < data.length) {
      if (at + 2 > data.length) throw parameterListLengthError(`${spec.name}: mode page header truncated at byte ${at}`);
      const code = u8(data, at) & 0x3f;
      if ((u8(data, at) & 0x40) !== 0) throw invalidFieldInParameterList(at, 6, `${spec.name}: subpages are not supported`);
      const current = modePage(code, 0, caps);
      if (current === undefined) throw invalidFieldInParameterList(at, 5, `${spec.name}: page 0x${code.toString(16)} is not supported`);
      const length = u8(data, at + 1);
      if (length !== current.length - 2) throw invalidFieldInParameterList(at + 1, undefined, `${spec.name}: page 0x${code.toString(16)} length must be ${current.length - 2}`);
      if (at + 2 + length > data.length) throw parameterListLengthError(`${spec.name}: page 0x${code.toString(16)} truncated`);
      const given = data.subarray(at + 2, at + 2 + length);
      const at2 = firstDifference(given, current.subarray(2));
      if (at2 >= 0) throw invalidFieldInParameterList(at + 2 + at2, undefined, `${spec.name}: page 0x${code.toString(16)} byte ${at2 + 2} cannot be changed`);
      at += 2 + length;
    }
    return GOOD;
  }

  #reportOpcodes(cdb: Buffer): ScsiResponse {
    const rctd = (u8(cdb, 2) & 0x80) !== 0;
    const options = u8(cdb, 2) & 0x07;
    const opcode = u8(cdb, 3);
    const serviceAction = cdb.readUInt16BE(4);
    const allocation = cdb.readUInt32BE(6);
    const timeouts = (): Buffer => {
      const t = Buffer.alloc(12);
      t.writeUInt16BE(0x0a, 0);
      return t; // nominal and recommended timeouts 0: not specified
    };
    let data: Buffer;
    if (options === 0) {
      const parts = COMMANDS.map((c) => {
        const d = Buffer.alloc(8);
        d[0] = c.opcode;
        d.writeUInt16BE(c.serviceAction ?? 0, 2);
        d[5] = (rctd ? 0x02 : 0) | (c.serviceAction !== undefined ? 0x01 : 0);
        d.writeUInt16BE(c.cdbLength, 6);
        return rctd ? Buffer.concat([d, timeouts()]) : d;
      });
      const body = Buffer.concat(parts);
      data = Buffer.alloc(4 + body.length);
      data.writeUInt32BE(body.length, 0);
      body.copy(data, 4);
    } else if (options === 1 || options === 2 || options === 3) {
      if (options === 1 && SERVICE_ACTION_OPCODES.has(opcode)) throw invalidFieldInCdb(2, 0, "REPORT SUPPORTED OPERATION CODES: this operation code has service actions");
      if (options === 2 && !SERVICE_ACTION_OPCODES.has(opcode)) throw invalidFieldInCdb(2, 0, "REPORT SUPPORTED OPERATION CODES: this operation code has no service actions");
      const spec = COMMANDS.find((c) => c.opcode === opcode && (SERVICE_ACTION_OPCODES.has(opcode) ? c.serviceAction === serviceAction : true));
      if (spec === undefined) {
        data = Buffer.alloc(4);
        data[1] = 0x01; // SUPPORT 001b: not supported
      } else {
        const usage = Buffer.from([spec.opcode, ...spec.usage]);
        if (spec.serviceAction !== undefined) usage[1] = spec.serviceAction | (usage[1] ?? 0) & 0xe0;
        const head = Buffer.alloc(4);
        head[1] = (rctd ? 0x80 : 0) | 0x03; // CTDP, SUPPORT 011b: supported as the standard says
        head.writeUInt16BE(usage.length, 2);
        data = Buffer.concat(rctd ? [head, usage, timeouts()] : [head, usage]);
      }
    } else {
      throw invalidFieldInCdb(2, 2, `REPORT SUPPORTED OPERATION CODES: REPORTING OPTIONS ${options} is not supported`);
    }
    return { status: ScsiStatus.GOOD, dataIn: data.subarray(0, allocation) };
  }
}

const COMMANDS_BY_NAME = {
  UNMAP: COMMANDS.find((c) => c.opcode === 0x42) as CommandSpec,
  "COMPARE AND WRITE": COMMANDS.find((c) => c.opcode === 0x89) as CommandSpec,
};

/** Index of the first byte where `a` and `b` differ, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 1) if (a[i] !== b[i]) return i;
  return n;
}
