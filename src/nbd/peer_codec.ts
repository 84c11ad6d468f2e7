// The other side of the wire: encoders of what a client sends and decoders
// of what the server sends. The server never uses these; the codec property
// tests use them for round trips, and the hostile-client tests use them to
// speak (and deliberately mis-speak) NBD over a raw socket.

import type { ByteQueue } from "./byte_queue.ts";
import { type Decoded, needMore, readU64, writeU64 } from "./decoded.ts";
import { NBD_OPTION_MAGIC, NBD_REPLY_OPTION_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, WIRE } from "./protocol.ts";
import type { Cookie } from "./request_codec.ts";

export function encodeClientFlags(flags: number): Buffer {
  const out = Buffer.allocUnsafe(4);
  out.writeUInt32BE(flags >>> 0, 0);
  return out;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.allocUnsafe(WIRE.OPTION_HEADER_BYTES + data.length);
  out.writeBigUInt64BE(NBD_OPTION_MAGIC, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(data.length, 12);
  data.copy(out, WIRE.OPTION_HEADER_BYTES);
  return out;
}

/** NBD_OPT_INFO / NBD_OPT_GO data. */
export function encodeInfoRequestData(name: string, infos: readonly number[]): Buffer {
  const nameBytes = Buffer.from(name, "utf8");
  const out = Buffer.allocUnsafe(4 + nameBytes.length + 2 + infos.length * 2);
  out.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(out, 4);
  out.writeUInt16BE(infos.length, 4 + nameBytes.length);
  infos.forEach((info, i) => out.writeUInt16BE(info, 4 + nameBytes.length + 2 + i * 2));
  return out;
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT data. */
export function encodeMetaContextRequestData(name: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (value: number): Buffer => {
    const b = Buffer.allocUnsafe(4);
    b.writeUInt32BE(value, 0);
    return b;
  };
  const nameBytes = Buffer.from(name, "utf8");
  parts.push(u32(nameBytes.length), nameBytes, u32(queries.length));
  for (const query of queries) {
    const bytes = Buffer.from(query, "utf8");
    parts.push(u32(bytes.length), bytes);
  }
  return Buffer.concat(parts);
}

export interface RequestFields extends Cookie {
  readonly flags: number;
  readonly type: number;
  /** A bigint for offsets at or above 2^53 (hostile tests). */
  readonly offset: number | bigint;
  readonly length: number;
  readonly payload?: Buffer;
}

export function encodeRequest(fields: RequestFields): Buffer {
  const payloadBytes = fields.payload?.length ?? 0;
  const out = Buffer.allocUnsafe(WIRE.REQUEST_HEADER_BYTES + payloadBytes);
  out.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  out.writeUInt16BE(fields.flags, 4);
  out.writeUInt16BE(fields.type, 6);
  out.writeUInt32BE(fields.cookieHi, 8);
  out.writeUInt32BE(fields.cookieLo, 12);
  if (typeof fields.offset === "bigint") out.writeBigUInt64BE(fields.offset, 16);
  else writeU64(out, fields.offset, 16);
  out.writeUInt32BE(fields.length, 24);
  fields.payload?.copy(out, WIRE.REQUEST_HEADER_BYTES);
  return out;
}

// ---------------------------------------------------------------- server messages

export interface Greeting {
  readonly handshakeFlags: number;
}

export function decodeGreeting(queue: ByteQueue): Decoded<Greeting, { reason: "bad_greeting" }> {
  if (queue.length < WIRE.GREETING_BYTES) return needMore(WIRE.GREETING_BYTES);
  const bytes = queue.take(WIRE.GREETING_BYTES);
  if (bytes.toString("latin1", 0, 16) !== "NBDMAGICIHAVEOPT") return { kind: "invalid", reason: "bad_greeting" };
  return { kind: "frame", frame: { handshakeFlags: bytes.readUInt16BE(16) } };
}

export interface OptionReply {
  readonly option: number;
  readonly replyType: number;
  readonly data: Buffer;
}

export function decodeOptionReply(queue: ByteQueue, dataBytesMax = 1 << 20): Decoded<OptionReply, { reason: "bad_reply_magic" | "reply_too_large" }> {
  if (queue.length < WIRE.OPTION_REPLY_HEADER_BYTES) return needMore(WIRE.OPTION_REPLY_HEADER_BYTES);
  const header = queue.peek(WIRE.OPTION_REPLY_HEADER_BYTES);
  if (header.readBigUInt64BE(0) !== NBD_REPLY_OPTION_MAGIC) return { kind: "invalid", reason: "bad_reply_magic" };
  const option = header.readUInt32BE(8);
  const replyType = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  if (length > dataBytesMax) return { kind: "invalid", reason: "reply_too_large" };
  if (queue.length < WIRE.OPTION_REPLY_HEADER_BYTES + length) return needMore(WIRE.OPTION_REPLY_HEADER_BYTES + length);
  queue.skip(WIRE.OPTION_REPLY_HEADER_BYTES);
  return { kind: "frame", frame: { option, replyType, data: Buffer.from(queue.take(length)) } };
}

export type TransmissionReply =
  | ({ readonly kind: "simple"; readonly errno: number } & Cookie)
  | ({ readonly kind: "chunk"; readonly flags: number; readonly type: number; readonly payload: Buffer } & Cookie);

/**
 * A simple reply (header only: the caller takes read data itself, knowing the
 * length it asked for) or a structured reply chunk with its payload.
 */
export function decodeTransmissionReply(
  queue: ByteQueue,
  payloadBytesMax = 64 << 20,
): Decoded<TransmissionReply, { reason: "bad_reply_magic" | "chunk_too_large" }> {
  if (queue.length < 4) return needMore(4);
  const magic = queue.peek(4).readUInt32BE(0);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    if (queue.length < WIRE.SIMPLE_REPLY_HEADER_BYTES) return needMore(WIRE.SIMPLE_REPLY_HEADER_BYTES);
    const header = queue.take(WIRE.SIMPLE_REPLY_HEADER_BYTES);
    return {
      kind: "frame",
      frame: { kind: "simple", errno: header.readUInt32BE(4), cookieHi: header.readUInt32BE(8), cookieLo: header.readUInt32BE(12) },
    };
  }
  if (magic !== NBD_STRUCTURED_REPLY_MAGIC) return { kind: "invalid", reason: "bad_reply_magic" };
  if (queue.length < WIRE.STRUCTURED_REPLY_HEADER_BYTES) return needMore(WIRE.STRUCTURED_REPLY_HEADER_BYTES);
  const header = queue.peek(WIRE.STRUCTURED_REPLY_HEADER_BYTES);
  const flags = header.readUInt16BE(4);
  const type = header.readUInt16BE(6);
  const cookieHi = header.readUInt32BE(8);
  const cookieLo = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  if (length > payloadBytesMax) return { kind: "invalid", reason: "chunk_too_large" };
  if (queue.length < WIRE.STRUCTURED_REPLY_HEADER_BYTES + length) return needMore(WIRE.STRUCTURED_REPLY_HEADER_BYTES + length);
  queue.skip(WIRE.STRUCTURED_REPLY_HEADER_BYTES);
  return { kind: "frame", frame: { kind: "chunk", flags, type, cookieHi, cookieLo, payload: Buffer.from(queue.take(length)) } };
}

export { readU64 };
