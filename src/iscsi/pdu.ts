// The iSCSI PDU wire format (RFC 7143 section 11): a 48-byte Basic Header
// Segment, optional Additional Header Segments, an optional header digest, a
// data segment padded to 4 bytes and an optional data digest. Digests are
// CRC32C (RFC 7143 section 13.1 and appendix B.4) from @node-rs/crc32, sent
// least significant byte first (as Linux and libiscsi do; the RFC's test
// vectors read that way). This module only frames and builds bytes: what a
// PDU means is for login.ts and connection.ts.

import { crc32c } from "@node-rs/crc32";

export const BHS_BYTES = 48;
export const DIGEST_BYTES = 4;
/** TotalAHSLength is one byte of 4-byte words. */
export const AHS_BYTES_MAX = 255 * 4;
/** DataSegmentLength is 24 bits. */
export const DATA_SEGMENT_BYTES_MAX = 0xff_ffff;
/** The reserved tag: "no task" (ITT) / "no transfer" (TTT). */
export const RESERVED_TAG = 0xffff_ffff;

/** Initiator opcodes (RFC 7143 section 11.2.1.2). */
export const Op = {
  NOP_OUT: 0x00,
  SCSI_COMMAND: 0x01,
  TASK_MGMT_REQUEST: 0x02,
  LOGIN_REQUEST: 0x03,
  TEXT_REQUEST: 0x04,
  DATA_OUT: 0x05,
  LOGOUT_REQUEST: 0x06,
  SNACK_REQUEST: 0x10,
  // target opcodes
  NOP_IN: 0x20,
  SCSI_RESPONSE: 0x21,
  TASK_MGMT_RESPONSE: 0x22,
  LOGIN_RESPONSE: 0x23,
  TEXT_RESPONSE: 0x24,
  DATA_IN: 0x25,
  LOGOUT_RESPONSE: 0x26,
  R2T: 0x31,
  ASYNC_MESSAGE: 0x32,
  REJECT: 0x3f,
} as const;

/** Reject reasons (RFC 7143 section 11.17.1). */
export const RejectReason = {
  DATA_DIGEST_ERROR: 0x02,
  SNACK_REJECT: 0x03,
  PROTOCOL_ERROR: 0x04,
  COMMAND_NOT_SUPPORTED: 0x05,
  IMMEDIATE_COMMAND_REJECT: 0x06,
  TASK_IN_PROGRESS: 0x07,
  INVALID_DATA_ACK: 0x08,
  INVALID_PDU_FIELD: 0x09,
  LONG_OPERATION_REJECT: 0x0a,
  WAITING_FOR_LOGOUT: 0x0c,
} as const;

/** CRC32C of the concatenation of `parts`. */
export function digestOf(parts: readonly Buffer[]): number {
  let crc = 0;
  for (const part of parts) crc = crc32c(part, crc);
  return crc >>> 0;
}

export function padTo4(length: number): number {
  return (length + 3) & ~3;
}

/** One received PDU. `bhs` is the 48-byte header; `ahs` the AHS bytes (may be empty); `data` without padding. */
export interface Pdu {
  readonly bhs: Buffer;
  readonly ahs: Buffer;
  /** The data segment as one buffer (gathered on first use when it spans socket chunks). */
  readonly data: Buffer;
  /** The data segment as the views of the socket chunks it arrived in (no copy); empty when there is none. */
  readonly dataParts: readonly Buffer[];
  readonly dataLength: number;
}

const NO_PARTS: readonly Buffer[] = Object.freeze([]);

/** A PDU whose data segment spans socket chunks: `data` is gathered only if someone asks for it. */
class SplitPdu implements Pdu {
  readonly bhs: Buffer;
  readonly ahs: Buffer;
  readonly dataParts: readonly Buffer[];
  readonly dataLength: number;
  #data: Buffer | undefined;
  constructor(bhs: Buffer, ahs: Buffer, parts: readonly Buffer[], length: number) {
    this.bhs = bhs;
    this.ahs = ahs;
    this.dataParts = parts;
    this.dataLength = length;
  }
  get data(): Buffer {
    this.#data ??= Buffer.concat(this.dataParts, this.dataLength);
    return this.#data;
  }
}

export function opcodeOf(bhs: Buffer): number {
  return bhs[0]! & 0x3f;
}
export function immediateOf(bhs: Buffer): boolean {
  return (bhs[0]! & 0x40) !== 0;
}
export function finalOf(bhs: Buffer): boolean {
  return (bhs[1]! & 0x80) !== 0;
}
export function ittOf(bhs: Buffer): number {
  return bhs.readUInt32BE(16);
}
export function dataSegmentLengthOf(bhs: Buffer): number {
  return bhs.readUIntBE(5, 3);
}

/** One Additional Header Segment (RFC 7143 section 11.2.2). */
export interface Ahs {
  readonly type: number;
  /** The AHS-specific bytes after the type byte (the reserved byte included). */
  readonly body: Buffer;
}

export const AhsType = { EXTENDED_CDB: 1, BIDI_READ_LENGTH: 2 } as const;

/** Splits the AHS area; undefined if the lengths do not add up. */
export function parseAhs(ahs: Buffer): Ahs[] | undefined {
  const out: Ahs[] = [];
  let offset = 0;
  while (offset < ahs.length) {
    if (offset + 4 > ahs.length) return undefined;
    const length = ahs.readUInt16BE(offset);
    const type = ahs[offset + 2]! & 0x3f;
    // AHSLength counts the bytes after the type byte (the reserved byte and the rest), without padding.
    const end = offset + 3 + length;
    if (length === 0 || end > ahs.length) return undefined;
    out.push({ type, body: ahs.subarray(offset + 3, end) });
    offset += padTo4(3 + length);
  }
  return out;
}

/** Parse failure of a stream: the connection cannot be trusted any more (ERL 0) and is dropped. */
export class PduFramingError extends Error {
  readonly kind: "header-digest" | "oversize" | "data-digest";
  /** The BHS of the offending PDU, when its header was sound (for a Reject). */
  readonly bhs: Buffer | undefined;
  constructor(kind: "header-digest" | "oversize" | "data-digest", message: string, bhs?: Buffer) {
    super(message);
    this.kind = kind;
    this.bhs = bhs;
  }
}

/**
 * Splits a byte stream into PDUs. Digests are checked when enabled; a data
 * segment longer than `dataSegmentBytesMax` is refused before any of it is
 * buffered (so a hostile length cannot make the reader allocate).
 */
export class PduReader {
  headerDigest = false;
  dataDigest = false;
  dataSegmentBytesMax: number;
  readonly #chunks: Buffer[] = [];
  #buffered = 0;

  constructor(dataSegmentBytesMax: number) {
    this.dataSegmentBytesMax = dataSegmentBytesMax;
  }

  get bufferedBytes(): number {
    return this.#buffered;
  }

  /** Whether a buffered (not yet parsed) chunk views `store` (large_reads asks before reusing a read arena). */
  holds(store: ArrayBufferLike): boolean {
    for (const chunk of this.#chunks) if (chunk.buffer === store) return true;
    return false;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
  }

  #peek(length: number): Buffer {
    if (this.#chunks[0]!.length >= length) return this.#chunks[0]!.subarray(0, length);
    // Gather only the chunks that cover `length` (never the whole backlog: no quadratic copying).
    let count = 0;
    let covered = 0;
    while (covered < length) covered += this.#chunks[count++]!.length;
    const joined = Buffer.concat(this.#chunks.slice(0, count), covered);
    this.#chunks.splice(0, count, joined);
    return joined.subarray(0, length);
  }

  #take(length: number): Buffer {
    // Socket chunks are fresh buffers nobody reuses: a PDU inside one chunk is a view of it; one
    // spanning chunks is gathered once (#peek).
    const out = this.#peek(length);
    let left = length;
    while (left > 0) {
      const first = this.#chunks[0]!;
      if (first.length <= left) {
        this.#chunks.shift();
        left -= first.length;
      } else {
        this.#chunks[0] = first.subarray(left);
        left = 0;
      }
    }
    this.#buffered -= length;
    return out;
  }

  /** The next whole PDU, or undefined when more bytes are needed. Throws PduFramingError. */
  next(): Pdu | undefined {
    if (this.#buffered < BHS_BYTES) return undefined;
    const head = this.#peek(BHS_BYTES);
    const ahsBytes = head[4]! * 4;
    const dataBytes = head.readUIntBE(5, 3);
    if (dataBytes > this.dataSegmentBytesMax) {
      throw new PduFramingError("oversize", `data segment of ${dataBytes} bytes exceeds our MaxRecvDataSegmentLength ${this.dataSegmentBytesMax} (opcode 0x${(head[0]! & 0x3f).toString(16)})`, Buffer.from(head));
    }
    const headerDigestBytes = this.headerDigest ? DIGEST_BYTES : 0;
    const dataDigestBytes = this.dataDigest && dataBytes > 0 ? DIGEST_BYTES : 0;
    const total = BHS_BYTES + ahsBytes + headerDigestBytes + padTo4(dataBytes) + dataDigestBytes;
    if (this.#buffered < total) return undefined;
    if (this.#chunks[0]!.length < total && dataBytes > 0) return this.#split(ahsBytes, headerDigestBytes, dataBytes, dataDigestBytes);
    const whole = this.#take(total);
    const bhs = whole.subarray(0, BHS_BYTES);
    const ahs = whole.subarray(BHS_BYTES, BHS_BYTES + ahsBytes);
    let offset = BHS_BYTES + ahsBytes;
    if (this.headerDigest) {
      const expected = digestOf([whole.subarray(0, offset)]);
      const got = whole.readUInt32LE(offset);
      if (expected !== got) throw new PduFramingError("header-digest", `header digest mismatch (got 0x${got.toString(16)}, computed 0x${expected.toString(16)})`);
      offset += DIGEST_BYTES;
    }
    const padded = whole.subarray(offset, offset + padTo4(dataBytes));
    const data = padded.subarray(0, dataBytes);
    offset += padded.length;
    if (dataDigestBytes > 0) {
      const expected = digestOf([padded]);
      const got = whole.readUInt32LE(offset);
      if (expected !== got) throw new PduFramingError("data-digest", `data digest mismatch (got 0x${got.toString(16)}, computed 0x${expected.toString(16)})`, Buffer.from(bhs));
    }
    return { bhs, ahs, data, dataParts: data.length === 0 ? NO_PARTS : [data], dataLength: data.length };
  }

  /** A whole PDU spanning chunks: the header gathered (small), the data segment left as views of the chunks. */
  #split(ahsBytes: number, headerDigestBytes: number, dataBytes: number, dataDigestBytes: number): Pdu {
    const headerBytes = BHS_BYTES + ahsBytes;
    const header = this.#take(headerBytes + headerDigestBytes);
    if (headerDigestBytes > 0) {
      const expected = digestOf([header.subarray(0, headerBytes)]);
      const got = header.readUInt32LE(headerBytes);
      if (expected !== got) throw new PduFramingError("header-digest", `header digest mismatch (got 0x${got.toString(16)}, computed 0x${expected.toString(16)})`);
    }
    const bhs = header.subarray(0, BHS_BYTES);
    const parts: Buffer[] = [];
    let left = dataBytes;
    while (left > 0) {
      const first = this.#chunks[0]!;
      if (first.length <= left) {
        parts.push(first);
        this.#chunks.shift();
        left -= first.length;
      } else {
        parts.push(first.subarray(0, left));
        this.#chunks[0] = first.subarray(left);
        left = 0;
      }
    }
    this.#buffered -= dataBytes;
    const paddingBytes = padTo4(dataBytes) - dataBytes;
    if (paddingBytes + dataDigestBytes > 0) {
      const trailer = this.#take(paddingBytes + dataDigestBytes);
      if (dataDigestBytes > 0) {
        const expected = digestOf(paddingBytes > 0 ? [...parts, trailer.subarray(0, paddingBytes)] : parts);
        const got = trailer.readUInt32LE(paddingBytes);
        if (expected !== got) throw new PduFramingError("data-digest", `data digest mismatch (got 0x${got.toString(16)}, computed 0x${expected.toString(16)})`, Buffer.from(bhs));
      }
    }
    return new SplitPdu(bhs, header.subarray(BHS_BYTES, headerBytes), parts, dataBytes);
  }
}

const PAD = Buffer.alloc(4);

/**
 * The buffers of one outgoing PDU: BHS (its DataSegmentLength is set here),
 * header digest, data, padding, data digest. `data` may be several buffers
 * (a Data-In split from one read buffer without copying).
 */
export function encodePdu(bhs: Buffer, data: readonly Buffer[], headerDigest: boolean, dataDigest: boolean): Buffer[] {
  let length = 0;
  for (const part of data) length += part.length;
  bhs.writeUIntBE(length, 5, 3);
  const out: Buffer[] = [bhs];
  if (headerDigest) {
    const digest = Buffer.allocUnsafe(DIGEST_BYTES);
    digest.writeUInt32LE(digestOf([bhs]), 0);
    out.push(digest);
  }
  if (length > 0) {
    out.push(...data);
    const padding = padTo4(length) - length;
    if (padding > 0) out.push(PAD.subarray(0, padding));
    if (dataDigest) {
      const digest = Buffer.allocUnsafe(DIGEST_BYTES);
      digest.writeUInt32LE(digestOf(padding > 0 ? [...data, PAD.subarray(0, padding)] : data), 0);
      out.push(digest);
    }
  }
  return out;
}

/** A zeroed BHS with the opcode and flags byte set. */
export function newBhs(opcode: number, flags: number): Buffer {
  const bhs = Buffer.alloc(BHS_BYTES);
  bhs[0] = opcode;
  bhs[1] = flags;
  return bhs;
}

/** Serial number arithmetic on 32 bits (RFC 1982), as CmdSN and StatSN use: a < b. */
export function snLess(a: number, b: number): boolean {
  return a !== b && ((a < b && b - a < 0x8000_0000) || (a > b && a - b > 0x8000_0000));
}
export function snAdd(a: number, n: number): number {
  return (a + n) >>> 0;
}
