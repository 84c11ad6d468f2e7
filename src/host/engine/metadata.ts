// The mirror's metadata, kept on every leg itself in the last METADATA_BYTES
// of the leg's volume (the engine serves the bytes before it), so any engine
// that can reach the legs (after a restart, or on a spare host) finds the
// truth without the station (docs/adr/0009-host-mirror-engine.md).
//
//   leg offset  dataBytes            +4 KiB              +8 KiB                +8 KiB + k*BITMAP_BYTES
//               | header slot 0      | header slot 1      | bitmap 0 | bitmap 1 | bitmap 2 | intent bitmap |
//
// A header slot: magic, version, generation, body length, SHA-256 of the
// body, then a JSON body {mirrorId, dataBytes, regionBytes, legs:[{id,
// inSync}]}. Writes alternate slots (the newer generation wins; a torn slot
// fails its checksum and the other holds the previous header). Every leg in
// sync holds the same bytes here, so in-sync legs are byte-identical end to
// end. Bitmap k: regions leg k may lack (it missed writes while away). The
// intent bitmap: regions with writes that may be in flight (set and made
// durable before such a write is sent, cleared when the region goes idle),
// so after an engine crash the in-sync legs are reconciled over those
// regions only.

import { createHash } from "node:crypto";
import { IpsanError } from "../../util/errors.ts";

export const METADATA_BYTES = 1024 * 1024;
export const HEADER_SLOT_BYTES = 4096;
export const HEADER_SLOTS = 2;
export const BITMAP_BYTES = 128 * 1024;
export const BITMAP_BITS = BITMAP_BYTES * 8;
/** Legs a mirror may have (copies 1..3); bitmap LEGS_MAX is the intent bitmap. */
export const LEGS_MAX = 3;
export const INTENT_BITMAP = LEGS_MAX;
/** The bitmaps are written a page at a time. */
export const BITMAP_PAGE_BYTES = 4096;
export const REGION_BYTES_MIN = 1024 * 1024;

const MAGIC = "IPSANMIR";
const VERSION = 1;
const HEADER_FIXED_BYTES = 8 + 4 + 8 + 4 + 32;

export interface LegRecord {
  readonly id: string;
  readonly inSync: boolean;
}

export interface MirrorHeader {
  readonly mirrorId: string;
  readonly generation: number;
  readonly dataBytes: number;
  readonly regionBytes: number;
  readonly legs: readonly LegRecord[];
}

if (HEADER_SLOTS * HEADER_SLOT_BYTES + (LEGS_MAX + 1) * BITMAP_BYTES > METADATA_BYTES) throw new Error("mirror metadata does not fit");

/** Data bytes a leg of `legBytes` serves. */
export function dataBytesOf(legBytes: number): number {
  const data = legBytes - METADATA_BYTES;
  if (!Number.isSafeInteger(data) || data <= 0 || data % 512 !== 0) {
    throw new IpsanError("INVALID_ARGUMENT", `a mirror leg of ${legBytes} bytes is too small or not 512-byte aligned (it needs ${METADATA_BYTES} bytes of metadata)`);
  }
  return data;
}

/** The smallest power-of-two region (at least REGION_BYTES_MIN) whose bitmap fits BITMAP_BITS. */
export function regionBytesFor(dataBytes: number): number {
  let region = REGION_BYTES_MIN;
  while (Math.ceil(dataBytes / region) > BITMAP_BITS) region *= 2;
  return region;
}

export function headerSlotOffset(dataBytes: number, slot: number): number {
  return dataBytes + slot * HEADER_SLOT_BYTES;
}

export function bitmapOffset(dataBytes: number, bitmap: number): number {
  return dataBytes + HEADER_SLOTS * HEADER_SLOT_BYTES + bitmap * BITMAP_BYTES;
}

export function encodeHeader(header: MirrorHeader): Buffer {
  const body = Buffer.from(JSON.stringify({ mirrorId: header.mirrorId, dataBytes: header.dataBytes, regionBytes: header.regionBytes, legs: header.legs }), "utf8");
  if (HEADER_FIXED_BYTES + body.length > HEADER_SLOT_BYTES) throw new IpsanError("INVALID_ARGUMENT", "mirror header too large");
  const out = Buffer.alloc(HEADER_SLOT_BYTES);
  out.write(MAGIC, 0, "latin1");
  out.writeUInt32BE(VERSION, 8);
  out.writeBigUInt64BE(BigInt(header.generation), 12);
  out.writeUInt32BE(body.length, 20);
  createHash("sha256").update(body).digest().copy(out, 24);
  body.copy(out, HEADER_FIXED_BYTES);
  return out;
}

export type HeaderDecode = { readonly kind: "empty" } | { readonly kind: "invalid"; readonly reason: string } | { readonly kind: "valid"; readonly header: MirrorHeader };

export function decodeHeader(slot: Buffer): HeaderDecode {
  if (slot.length < HEADER_FIXED_BYTES) return { kind: "invalid", reason: "short" };
  if (slot.every((b) => b === 0)) return { kind: "empty" };
  if (slot.toString("latin1", 0, 8) !== MAGIC) return { kind: "invalid", reason: "bad magic" };
  const version = slot.readUInt32BE(8);
  if (version !== VERSION) return { kind: "invalid", reason: `version ${version}` };
  const generation = Number(slot.readBigUInt64BE(12));
  const length = slot.readUInt32BE(20);
  if (HEADER_FIXED_BYTES + length > slot.length) return { kind: "invalid", reason: "body length" };
  const body = slot.subarray(HEADER_FIXED_BYTES, HEADER_FIXED_BYTES + length);
  if (!createHash("sha256").update(body).digest().equals(slot.subarray(24, 56))) return { kind: "invalid", reason: "checksum" };
  try {
    const parsed = JSON.parse(body.toString("utf8")) as Partial<MirrorHeader>;
    const legs = parsed.legs;
    if (
      typeof parsed.mirrorId !== "string" ||
      typeof parsed.dataBytes !== "number" ||
      typeof parsed.regionBytes !== "number" ||
      !Array.isArray(legs) ||
      legs.length === 0 ||
      legs.length > LEGS_MAX ||
      !legs.every((l) => typeof l.id === "string" && typeof l.inSync === "boolean")
    ) {
      return { kind: "invalid", reason: "body fields" };
    }
    return { kind: "valid", header: { mirrorId: parsed.mirrorId, generation, dataBytes: parsed.dataBytes, regionBytes: parsed.regionBytes, legs } };
  } catch {
    return { kind: "invalid", reason: "body JSON" };
  }
}

/** The newer valid header of a leg's two slots; "empty" when both are zero (a new leg); "invalid" when neither decodes. */
export function newestHeader(slots: readonly Buffer[]): HeaderDecode {
  let best: MirrorHeader | undefined;
  let reasons: string[] = [];
  let empty = 0;
  for (const slot of slots) {
    const decoded = decodeHeader(slot);
    if (decoded.kind === "valid") {
      if (best === undefined || decoded.header.generation > best.generation) best = decoded.header;
    } else if (decoded.kind === "empty") empty += 1;
    else reasons = [...reasons, decoded.reason];
  }
  if (best !== undefined) return { kind: "valid", header: best };
  if (empty === slots.length) return { kind: "empty" };
  return { kind: "invalid", reason: reasons.join(", ") };
}

/** A region bitmap in memory, with the pages changed since they were last written. */
export class Bitmap {
  readonly bits: Buffer;
  readonly #dirtyPages = new Set<number>();

  constructor(bits: Buffer = Buffer.alloc(BITMAP_BYTES)) {
    if (bits.length !== BITMAP_BYTES) throw new RangeError(`bitmap of ${bits.length} bytes`);
    this.bits = bits;
  }

  has(region: number): boolean {
    return (this.bits[region >> 3]! & (1 << (region & 7))) !== 0;
  }

  /** Sets the bit; true when it was clear. */
  set(region: number): boolean {
    if (this.has(region)) return false;
    this.bits[region >> 3]! |= 1 << (region & 7);
    this.#dirtyPages.add(Math.floor((region >> 3) / BITMAP_PAGE_BYTES));
    return true;
  }

  clear(region: number): boolean {
    if (!this.has(region)) return false;
    this.bits[region >> 3]! &= ~(1 << (region & 7));
    this.#dirtyPages.add(Math.floor((region >> 3) / BITMAP_PAGE_BYTES));
    return true;
  }

  /** Regions set, in order, below `regions`. */
  *setRegions(regions: number): Generator<number> {
    for (let byte = 0; byte < Math.ceil(regions / 8); byte++) {
      const value = this.bits[byte]!;
      if (value === 0) continue;
      for (let bit = 0; bit < 8; bit++) {
        const region = byte * 8 + bit;
        if (region < regions && (value & (1 << bit)) !== 0) yield region;
      }
    }
  }

  count(regions: number): number {
    let n = 0;
    for (const _ of this.setRegions(regions)) n += 1;
    return n;
  }

  /** Takes the pages changed since the last call (to be written). */
  takeDirtyPages(): number[] {
    const pages = [...this.#dirtyPages].sort((a, b) => a - b);
    this.#dirtyPages.clear();
    return pages;
  }

  markAllPagesDirty(): void {
    for (let page = 0; page < BITMAP_BYTES / BITMAP_PAGE_BYTES; page++) this.#dirtyPages.add(page);
  }

  page(page: number): Buffer {
    return this.bits.subarray(page * BITMAP_PAGE_BYTES, (page + 1) * BITMAP_PAGE_BYTES);
  }
}
