// Handshake codec: the greeting, client flags, option requests and option
// replies of fixed newstyle negotiation. Pure: decoders read a ByteQueue and
// return a Decoded union; option payload parsers take the option's data and
// return ok | invalid; encoders return Buffers. Every length is checked
// against a limit before anything is buffered or allocated.

import type { ByteQueue } from "./byte_queue.ts";
import { type Decoded, decodeWireString, needMore, writeU64 } from "./decoded.ts";
import {
  NBD_FLAG,
  NBD_FLAG_C,
  NBD_INFO,
  NBD_MAGIC,
  NBD_OPTION_MAGIC,
  NBD_REPLY_OPTION_MAGIC,
  WIRE,
} from "./protocol.ts";

const OPTION_MAGIC_HI = Number(NBD_OPTION_MAGIC >> 32n);
const OPTION_MAGIC_LO = Number(NBD_OPTION_MAGIC & 0xffffffffn);
const KNOWN_CLIENT_FLAGS = NBD_FLAG_C.FIXED_NEWSTYLE | NBD_FLAG_C.NO_ZEROES;

// ---------------------------------------------------------------- greeting

/** S: NBDMAGIC, IHAVEOPT, handshake flags (FIXED_NEWSTYLE | NO_ZEROES). */
export function encodeGreeting(): Buffer {
  const out = Buffer.allocUnsafe(WIRE.GREETING_BYTES);
  out.writeBigUInt64BE(NBD_MAGIC, 0);
  out.writeBigUInt64BE(NBD_OPTION_MAGIC, 8);
  out.writeUInt16BE(NBD_FLAG.FIXED_NEWSTYLE | NBD_FLAG.NO_ZEROES, 16);
  return out;
}

export interface ClientFlags {
  readonly fixedNewstyle: boolean;
  readonly noZeroes: boolean;
}

/** C: 32-bit client flags. Unknown bits are invalid (the server must drop the connection). */
export function decodeClientFlags(
  queue: ByteQueue,
): Decoded<ClientFlags, { reason: "unknown_client_flags"; flags: number }> {
  if (queue.length < WIRE.CLIENT_FLAGS_BYTES) return needMore(WIRE.CLIENT_FLAGS_BYTES);
  const flags = queue.peek(WIRE.CLIENT_FLAGS_BYTES).readUInt32BE(0);
  if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) return { kind: "invalid", reason: "unknown_client_flags", flags };
  queue.skip(WIRE.CLIENT_FLAGS_BYTES);
  return {
    kind: "frame",
    frame: {
      fixedNewstyle: (flags & NBD_FLAG_C.FIXED_NEWSTYLE) !== 0,
      noZeroes: (flags & NBD_FLAG_C.NO_ZEROES) !== 0,
    },
  };
}

// ---------------------------------------------------------------- options

export interface OptionFrame {
  readonly option: number;
  readonly data: Buffer;
}

export type OptionInvalid =
  | { reason: "bad_option_magic" }
  | { reason: "option_too_large"; option: number; lengthBytes: number };

/** C: IHAVEOPT, 32-bit option, 32-bit length, data. Data over `dataBytesMax` is invalid before it is buffered. */
export function decodeOption(queue: ByteQueue, dataBytesMax: number): Decoded<OptionFrame, OptionInvalid> {
  if (queue.length < WIRE.OPTION_HEADER_BYTES) return needMore(WIRE.OPTION_HEADER_BYTES);
  const header = queue.peek(WIRE.OPTION_HEADER_BYTES);
  if (header.readUInt32BE(0) !== OPTION_MAGIC_HI || header.readUInt32BE(4) !== OPTION_MAGIC_LO) {
    return { kind: "invalid", reason: "bad_option_magic" };
  }
  const option = header.readUInt32BE(8);
  const lengthBytes = header.readUInt32BE(12);
  if (lengthBytes > dataBytesMax) return { kind: "invalid", reason: "option_too_large", option, lengthBytes };
  const frameBytes = WIRE.OPTION_HEADER_BYTES + lengthBytes;
  if (queue.length < frameBytes) return needMore(frameBytes);
  queue.skip(WIRE.OPTION_HEADER_BYTES);
  // Copy: option data is small, and must not pin the socket's receive chunk.
  const data = Buffer.from(queue.take(lengthBytes));
  return { kind: "frame", frame: { option, data } };
}

export type Parsed<T> = { readonly kind: "ok"; readonly value: T } | { readonly kind: "invalid"; readonly reason: string };

function invalid(reason: string): { readonly kind: "invalid"; readonly reason: string } {
  return { kind: "invalid", reason };
}

/** Reads a u32-length-prefixed string at `at`; returns it and the next position. */
function readLengthPrefixed(
  data: Buffer,
  at: number,
  field: string,
): { readonly text: string; readonly next: number } | string {
  if (data.length - at < 4) return `${field}: length field cut short`;
  const lengthBytes = data.readUInt32BE(at);
  if (lengthBytes > WIRE.STRING_BYTES_MAX) return `${field}: length ${lengthBytes} over ${WIRE.STRING_BYTES_MAX}`;
  if (data.length - at - 4 < lengthBytes) return `${field}: length ${lengthBytes} past end of option data`;
  const text = decodeWireString(data.subarray(at + 4, at + 4 + lengthBytes));
  if (text === undefined) return `${field}: not UTF-8 or contains NUL`;
  return { text, next: at + 4 + lengthBytes };
}

export interface InfoRequest {
  readonly name: string;
  /** NBD_INFO types the client asked for (unknown ones included; the server ignores them). */
  readonly infos: readonly number[];
}

/** NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 count, count x u16. */
export function parseInfoRequest(data: Buffer): Parsed<InfoRequest> {
  const name = readLengthPrefixed(data, 0, "export name");
  if (typeof name === "string") return invalid(name);
  if (data.length - name.next < 2) return invalid("information request count cut short");
  const count = data.readUInt16BE(name.next);
  const listBytes = data.length - name.next - 2;
  if (listBytes !== count * 2) return invalid(`information request count ${count} does not match ${listBytes} bytes`);
  const infos: number[] = [];
  for (let i = 0; i < count; i += 1) infos.push(data.readUInt16BE(name.next + 2 + i * 2));
  return { kind: "ok", value: { name: name.text, infos } };
}

export interface MetaContextRequest {
  readonly name: string;
  readonly queries: readonly string[];
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data: u32 name length, name, u32 count, count x (u32 length, query). */
export function parseMetaContextRequest(data: Buffer, queriesMax: number): Parsed<MetaContextRequest> {
  const name = readLengthPrefixed(data, 0, "export name");
  if (typeof name === "string") return invalid(name);
  if (data.length - name.next < 4) return invalid("query count cut short");
  const count = data.readUInt32BE(name.next);
  if (count > queriesMax) return invalid(`query count ${count} over ${queriesMax}`);
  const queries: string[] = [];
  let at = name.next + 4;
  for (let i = 0; i < count; i += 1) {
    const query = readLengthPrefixed(data, at, `query ${i}`);
    if (typeof query === "string") return invalid(query);
    queries.push(query.text);
    at = query.next;
  }
  if (at !== data.length) return invalid(`${data.length - at} bytes after the last query`);
  return { kind: "ok", value: { name: name.text, queries } };
}

// ---------------------------------------------------------------- replies

/** S: reply magic, option, reply type, length, data. */
export function encodeOptionReply(option: number, replyType: number, data?: Buffer): Buffer {
  const dataBytes = data?.length ?? 0;
  const out = Buffer.allocUnsafe(WIRE.OPTION_REPLY_HEADER_BYTES + dataBytes);
  out.writeBigUInt64BE(NBD_REPLY_OPTION_MAGIC, 0);
  out.writeUInt32BE(option, 8);
  out.writeUInt32BE(replyType >>> 0, 12);
  out.writeUInt32BE(dataBytes, 16);
  data?.copy(out, WIRE.OPTION_REPLY_HEADER_BYTES);
  return out;
}

/** Truncates `text` to at most `bytesMax` UTF-8 bytes without splitting a character. */
export function utf8Bounded(text: string, bytesMax: number = WIRE.STRING_BYTES_MAX): Buffer {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.length <= bytesMax) return bytes;
  let end = bytesMax;
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) end -= 1;
  return bytes.subarray(0, end);
}

/** NBD_REP_SERVER data: u32 name length, name, description. */
export function encodeServerData(name: string, description: string): Buffer {
  const nameBytes = utf8Bounded(name);
  const descriptionBytes = utf8Bounded(description);
  const out = Buffer.allocUnsafe(4 + nameBytes.length + descriptionBytes.length);
  out.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(out, 4);
  descriptionBytes.copy(out, 4 + nameBytes.length);
  return out;
}

/** NBD_REP_INFO data for NBD_INFO_EXPORT: u16 type, u64 size, u16 transmission flags. */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  const out = Buffer.allocUnsafe(12);
  out.writeUInt16BE(NBD_INFO.EXPORT, 0);
  writeU64(out, sizeBytes, 2);
  out.writeUInt16BE(transmissionFlags, 10);
  return out;
}

/** NBD_REP_INFO data for NBD_INFO_NAME or NBD_INFO_DESCRIPTION: u16 type, string. */
export function encodeInfoString(infoType: typeof NBD_INFO.NAME | typeof NBD_INFO.DESCRIPTION, text: string): Buffer {
  const bytes = utf8Bounded(text);
  const out = Buffer.allocUnsafe(2 + bytes.length);
  out.writeUInt16BE(infoType, 0);
  bytes.copy(out, 2);
  return out;
}

export interface BlockSizes {
  readonly minimumBytes: number;
  readonly preferredBytes: number;
  readonly maximumBytes: number;
}

/** NBD_REP_INFO data for NBD_INFO_BLOCK_SIZE: u16 type, u32 minimum, u32 preferred, u32 maximum. */
export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const out = Buffer.allocUnsafe(14);
  out.writeUInt16BE(NBD_INFO.BLOCK_SIZE, 0);
  out.writeUInt32BE(sizes.minimumBytes, 2);
  out.writeUInt32BE(sizes.preferredBytes, 6);
  out.writeUInt32BE(sizes.maximumBytes, 10);
  return out;
}

/** NBD_REP_META_CONTEXT data: u32 context id, name. */
export function encodeMetaContextData(contextId: number, name: string): Buffer {
  const bytes = utf8Bounded(name);
  const out = Buffer.allocUnsafe(4 + bytes.length);
  out.writeUInt32BE(contextId, 0);
  bytes.copy(out, 4);
  return out;
}

/** Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 transmission flags, 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const zeroes = noZeroes ? 0 : WIRE.EXPORT_NAME_REPLY_ZEROES_BYTES;
  const out = Buffer.alloc(WIRE.EXPORT_NAME_REPLY_BYTES + zeroes);
  writeU64(out, sizeBytes, 0);
  out.writeUInt16BE(transmissionFlags, 8);
  return out;
}
