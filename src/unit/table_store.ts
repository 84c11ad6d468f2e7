// Reads and writes the volume table's two slots at the start of the storage
// (docs/adr/0008-unit-never-loses-volumes.md, which amends ADR 0002).
//
// Every acknowledged change is in BOTH slots: a write puts the next
// generation into slot 0 and fdatasyncs, then into slot 1 and fdatasyncs,
// and only then is the change acknowledged. So any one damaged slot leaves
// the newest acknowledged table in the other, and a crash (a torn write)
// loses at most the change in flight, which nobody was told about.
//
// What a load decides (decide(), pure):
//   - the whole metadata area is zero: fresh storage (the caller formats it);
//   - both slots valid: the higher generation wins (a crash between the two
//     writes, or storage last written by a unit that wrote one slot per
//     change); the slot behind is rewritten from it. Equal generations must
//     hold the same table;
//   - one slot valid and written in both-slots mode: it holds the newest
//     acknowledged table; the other slot is damaged: WARN, and it is
//     rewritten before the unit serves;
//   - one slot valid but written by an older unit (one slot per change): the
//     damaged slot may have held a newer, acknowledged change: refused (the
//     operator may accept the survivor with `ipsan unit format --from-slot`);
//   - no valid slot and not all zero: refused; never formatted over.

import { IpsanError } from "../util/errors.ts";
import { assert } from "../util/assert.ts";
import { logger } from "../util/log.ts";
import { METADATA_AREA_BYTES, SLOT_HEADER_BYTES, TABLE_SLOT_BYTES, TABLE_SLOT_COUNT } from "./layout.ts";
import type { Storage } from "./storage.ts";
import { type SlotDecode, type VolumeTable, decodeSlot, encodeSlot } from "./table.ts";

const log = logger("table");

const ZERO_SLOT = Buffer.alloc(TABLE_SLOT_BYTES);

/** One slot as found on the storage. */
export interface SlotReport {
  readonly slot: number;
  readonly decoded: SlotDecode;
  /** Every byte of the slot is zero. */
  readonly zero: boolean;
  /** How many bytes of the slot are not zero (for messages; counted only for a slot without a header). */
  readonly nonZeroBytes: number;
}

/** A slot rewritten from the chosen table before the unit serves. */
export interface SlotRepair {
  readonly slot: number;
  /** "damaged": not a valid table; "behind": a valid but older generation. */
  readonly why: "damaged" | "behind";
  readonly found: string;
}

export type TableVerdict =
  | { readonly kind: "fresh" }
  | {
      readonly kind: "use";
      readonly slot: number;
      readonly generation: number;
      readonly table: VolumeTable;
      readonly repairs: readonly SlotRepair[];
    }
  | {
      readonly kind: "refuse";
      /** What was found and why that is refused (no advice). */
      readonly reason: string;
      /** A valid slot the operator may choose with --from-slot, when that is the way on. */
      readonly fromSlots: readonly number[];
    };

export interface Inspection {
  readonly slots: readonly SlotReport[];
  readonly verdict: TableVerdict;
  /** A known foreign signature in the metadata area ("an ext2/3/4 file system"), if any. */
  readonly foreign: string | undefined;
  /** The highest valid generation found (0 if none): a format continues above it. */
  readonly generationMax: number;
}

export type TableLoad =
  | { readonly kind: "fresh" }
  | {
      readonly kind: "loaded";
      readonly store: TableStore;
      readonly table: VolumeTable;
      /** The slots as found, before any repair. */
      readonly slots: readonly SlotDecode[];
      readonly repaired: readonly SlotRepair[];
    };

export interface LoadOptions {
  /** The command an operator runs to format this storage, without --force (for messages). */
  readonly formatCommand?: string;
}

/** Known signatures of other systems' data, checked in the metadata area (offset, bytes, what). */
const FOREIGN_SIGNATURES: readonly { offset: number; bytes: Buffer; what: string }[] = [
  { offset: 1024 + 56, bytes: Buffer.from([0x53, 0xef]), what: "an ext2/3/4 file system" },
  { offset: 0, bytes: Buffer.from("XFSB"), what: "an XFS file system" },
  { offset: 65536 + 64, bytes: Buffer.from("_BHRfS_M"), what: "a btrfs file system" },
  { offset: 0, bytes: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]), what: "a LUKS volume" },
  { offset: 512, bytes: Buffer.from("LABELONE"), what: "an LVM physical volume" },
  { offset: 512, bytes: Buffer.from("EFI PART"), what: "a GPT partition table" },
  { offset: 4096 - 10, bytes: Buffer.from("SWAPSPACE2"), what: "a swap area" },
  { offset: 32768 + 1, bytes: Buffer.from("CD001"), what: "an ISO 9660 image" },
  { offset: 0, bytes: Buffer.from("hsqs"), what: "a squashfs image" },
  { offset: 510, bytes: Buffer.from([0x55, 0xaa]), what: "an MBR/DOS partition table or boot sector" },
];

/** The first known foreign signature in `area` (the metadata area), if any. Pure. */
export function foreignSignature(area: Buffer): string | undefined {
  if (area.subarray(0, 8).equals(Buffer.from("IPSANVT1"))) return undefined;
  for (const signature of FOREIGN_SIGNATURES) {
    const end = signature.offset + signature.bytes.length;
    if (end <= area.length && area.subarray(signature.offset, end).equals(signature.bytes)) return signature.what;
  }
  return undefined;
}

function countNonZero(bytes: Buffer): number {
  let count = 0;
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) count += 1;
  return count;
}

/** One slot in words, for logs and messages ("checksum mismatch", "generation 7, 2 volumes"). */
export function describeSlot(report: SlotReport): string {
  const d = report.decoded;
  if (report.zero) return "all zero";
  if (d.kind === "empty") return `no table header (its first ${SLOT_HEADER_BYTES} bytes are zero) but ${report.nonZeroBytes} byte${report.nonZeroBytes === 1 ? "" : "s"} of the slot ${report.nonZeroBytes === 1 ? "is" : "are"} not zero`;
  if (d.kind === "invalid") return d.reason;
  const volumes = `${d.table.volumes.length} volume${d.table.volumes.length === 1 ? "" : "s"}`;
  return `generation ${d.generation}, ${volumes}${d.bothSlots ? "" : ", written by an older ipsan (one slot per change)"}`;
}

function slotName(slot: number): string {
  return `slot ${slot} (bytes ${slot * TABLE_SLOT_BYTES}-${(slot + 1) * TABLE_SLOT_BYTES - 1})`;
}

function sameTable(a: VolumeTable, b: VolumeTable): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** What a load must do with these two slots (pure; see the comment at the top). */
export function decide(slots: readonly SlotReport[]): TableVerdict {
  assert(slots.length === TABLE_SLOT_COUNT && TABLE_SLOT_COUNT === 2, "two table slots");
  if (slots.every((s) => s.zero)) return { kind: "fresh" };
  const valid = slots.flatMap((s) => (s.decoded.kind === "valid" ? [{ slot: s.slot, ...s.decoded }] : []));
  const findings = slots.map((s) => `${slotName(s.slot)}: ${describeSlot(s)}`).join("; ");
  const [first, second] = valid;
  if (first === undefined) {
    return { kind: "refuse", reason: `no valid volume table (${findings}), and its metadata area (the first ${METADATA_AREA_BYTES} bytes) is not all zero`, fromSlots: [] };
  }
  if (second !== undefined) {
    if (first.generation === second.generation) {
      if (sameTable(first.table, second.table)) {
        // Normal. (A copy without the both-slots mark cannot occur here, but would be re-marked.)
        const unmarked = [first, second].filter((v) => !v.bothSlots);
        const repairs = unmarked.map((v) => ({ slot: v.slot, why: "behind" as const, found: describeSlot(slots[v.slot] as SlotReport) }));
        return { kind: "use", slot: first.slot, generation: first.generation, table: first.table, repairs };
      }
      return {
        kind: "refuse",
        reason: `both table slots hold generation ${first.generation} but different tables (${findings}); one generation is never written with two tables, so neither can be trusted over the other`,
        fromSlots: [first.slot, second.slot],
      };
    }
    const [newer, older] = first.generation > second.generation ? [first, second] : [second, first];
    const olderReport = slots[older.slot];
    assert(olderReport !== undefined, "older slot reported");
    return {
      kind: "use",
      slot: newer.slot,
      generation: newer.generation,
      table: newer.table,
      repairs: [{ slot: older.slot, why: "behind", found: describeSlot(olderReport) }],
    };
  }
  const damaged = slots.find((s) => s.slot !== first.slot);
  assert(damaged !== undefined, "the other slot");
  if (!first.bothSlots) {
    return {
      kind: "refuse",
      reason:
        `volume table ${slotName(damaged.slot)} is damaged (${describeSlot(damaged)}) and the only valid one, ` +
        `${slotName(first.slot)} (generation ${first.generation}, ${first.table.volumes.length} volumes), was written by an older ipsan ` +
        `that kept one slot per change, so the damaged slot may have held a newer, acknowledged change ` +
        `(a volume created, grown, deleted or granted after generation ${first.generation}); falling back to it needs an operator's consent`,
      fromSlots: [first.slot],
    };
  }
  return { kind: "use", slot: first.slot, generation: first.generation, table: first.table, repairs: [{ slot: damaged.slot, why: "damaged", found: describeSlot(damaged) }] };
}

export class TableStore {
  readonly #storage: Storage;
  /** The generation of the table last written completely (the one in force). */
  #generation: number;
  /** The highest generation number ever used, by a write that completed or not. */
  #generationUsed: number;

  private constructor(storage: Storage, generation: number) {
    this.#storage = storage;
    this.#generation = generation;
    this.#generationUsed = generation;
  }

  get generation(): number {
    return this.#generation;
  }

  /** Reads the whole metadata area and judges it, writing nothing. */
  static async inspect(storage: Storage): Promise<Inspection> {
    const area = Buffer.alloc(METADATA_AREA_BYTES);
    await storage.read(area, 0, METADATA_AREA_BYTES, 0);
    const slots: SlotReport[] = [];
    for (let slot = 0; slot < TABLE_SLOT_COUNT; slot++) {
      const bytes = area.subarray(slot * TABLE_SLOT_BYTES, (slot + 1) * TABLE_SLOT_BYTES);
      const zero = bytes.equals(ZERO_SLOT);
      const decoded = decodeSlot(bytes);
      slots.push({ slot, decoded, zero, nonZeroBytes: zero || decoded.kind !== "empty" ? 0 : countNonZero(bytes) });
    }
    const generationMax = Math.max(0, ...slots.map((s) => (s.decoded.kind === "valid" ? s.decoded.generation : 0)));
    return { slots, verdict: decide(slots), foreign: foreignSignature(area), generationMax };
  }

  /**
   * Loads the newest acknowledged table, repairing a damaged or lagging slot
   * (durably) before returning. "fresh" only when the whole metadata area is
   * zero. Anything else without a trustworthy table throws CORRUPT with what
   * was found, why it is refused, and the command that proceeds.
   */
  static async load(storage: Storage, options: LoadOptions = {}): Promise<TableLoad> {
    const inspection = await TableStore.inspect(storage);
    const verdict = inspection.verdict;
    if (verdict.kind === "fresh") return { kind: "fresh" };
    const slots = inspection.slots.map((s) => s.decoded);
    if (verdict.kind === "refuse") {
      const command = options.formatCommand ?? "ipsan unit format --data DIR";
      const foreign = inspection.foreign === undefined ? "" : `; it looks like ${inspection.foreign}`;
      const advice =
        verdict.fromSlots.length > 0
          ? `To use the table of ${verdict.fromSlots.map((s) => `slot ${s}`).join(" or ")} (changes it lacks are lost), run: ` +
            verdict.fromSlots.map((s) => `${command} --from-slot ${s} --force`).join("  or  ")
          : `If nothing on it is needed, run: ${command} --force (it writes an empty volume table over the whole metadata area; every volume that was on this storage is lost)`;
      throw new IpsanError(
        "CORRUPT",
        `storage ${storage.path}: ${verdict.reason}${foreign}. The unit refuses to start rather than lose volumes or ` +
          `overwrite data: it formats only storage whose metadata area is all zero. ${advice}`,
      );
    }
    const image = encodeSlot(verdict.table, verdict.generation);
    for (const repair of verdict.repairs) {
      const fields = { storage: storage.path, slot: repair.slot, found: repair.found, from: verdict.slot, generation: verdict.generation };
      if (repair.why === "damaged") log.warn("volume table slot damaged; rewriting it from the other slot, which holds the newest table", fields);
      else log.info("volume table slot behind the other; rewriting it so both hold the newest table", fields);
      await storage.write(image, 0, image.length, repair.slot * TABLE_SLOT_BYTES);
    }
    if (verdict.repairs.length > 0) await storage.sync();
    return { kind: "loaded", store: new TableStore(storage, verdict.generation), table: verdict.table, slots, repaired: verdict.repairs };
  }

  /** Writes a first table into both slots of fresh (all-zero) storage, generation 1. */
  static async format(storage: Storage, table: VolumeTable): Promise<TableStore> {
    const store = new TableStore(storage, 0);
    await store.write(table);
    return store;
  }

  /**
   * Rewrites the whole metadata area with `table` at `generation` (above any
   * generation on the storage): each slot in `order` gets the slot image
   * padded with zeroes to the full slot, then fdatasync. Put a slot holding
   * the table being kept last, so a crash midway leaves it loadable.
   */
  static async rewrite(storage: Storage, table: VolumeTable, generation: number, order: readonly number[]): Promise<TableStore> {
    assert([...order].sort().join() === "0,1", "rewrite covers both slots once");
    const full = Buffer.alloc(TABLE_SLOT_BYTES);
    encodeSlot(table, generation).copy(full);
    for (const slot of order) {
      await storage.write(full, 0, full.length, slot * TABLE_SLOT_BYTES);
      await storage.sync();
    }
    return new TableStore(storage, generation);
  }

  /**
   * Persists `table` durably in both slots (slot 0, fdatasync, slot 1,
   * fdatasync); the caller acknowledges the change only after this returns.
   * Callers serialize writes. A failed write still uses its generation
   * number up (it may be on the storage), so one generation number never
   * names two different tables.
   */
  async write(table: VolumeTable): Promise<void> {
    const generation = this.#generationUsed + 1;
    const image = encodeSlot(table, generation);
    assert(image.length <= TABLE_SLOT_BYTES && image.length >= SLOT_HEADER_BYTES, "slot image fits its slot");
    this.#generationUsed = generation;
    for (let slot = 0; slot < TABLE_SLOT_COUNT; slot++) {
      await this.#storage.write(image, 0, image.length, slot * TABLE_SLOT_BYTES);
      await this.#storage.sync();
    }
    this.#generation = generation;
  }
}
