// Transmission codec: requests in, simple replies and structured reply chunks
// out. Pure: the decoder reads a ByteQueue and returns a Decoded union; the
// encoders write into Buffers. A write's payload length is checked against the
// payload limit from its header, before a byte of payload is waited for.
//
// The cookie is 8 opaque bytes; it is carried as two 32-bit halves (no
// allocation, no bigint) and written back exactly as received.

import type { ByteQueue } from "./byte_queue.ts";
import { type Decoded, needMore, readU64, writeU64 } from "./decoded.ts";
import {
  NBD_CMD,
  NBD_REPLY_FLAG,
  NBD_REPLY_TYPE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  WIRE,
} from "./protocol.ts";

export interface Cookie {
  readonly cookieHi: number;
  readonly cookieLo: number;
}

export interface RequestFrame extends Cookie {
  readonly flags: number;
  readonly type: number;
  /** Exact below 2^53; larger offsets are rounded but are always out of range. */
  readonly offset: number;
  readonly length: number;
  /**
   * The data of NBD_CMD_WRITE (length bytes); undefined for every other
   * command, and for a WRITE whose data is in `payloadParts` instead.
   */
  readonly payload: Buffer | undefined;
  /** A WRITE's data as the received chunks it arrived in, in order (when the decoder was asked to split). */
  readonly payloadParts?: readonly Buffer[];
}

/** A WRITE payload at least this large that spans received chunks may be kept as those chunks (`payloadParts`) rather than gathered. */
export const SPLIT_PAYLOAD_BYTES_MIN = 64 * 1024;
/** ... if its parts average at least this many bytes: a payload never holds more than ~4x its size of received chunks. */
export const SPLIT_PAYLOAD_PART_BYTES_MIN = 16 * 1024;
/** ... and are at most this many (IOV_MAX: one vectored write). */
export const SPLIT_PAYLOAD_PARTS_MAX = 1024;

export type RequestInvalid =
  | { reason: "bad_request_magic"; magic: number }
  | ({ reason: "payload_too_large"; type: number; length: number } & Cookie);

/**
 * C: u32 magic, u16 flags, u16 type, 8-byte cookie, u64 offset, u32 length,
 * then `length` bytes of data for NBD_CMD_WRITE only. A payload that spans
 * received chunks is copied into `allocatePayload(length)` (a pooled buffer).
 */
export function decodeRequest(
  queue: ByteQueue,
  payloadBytesMax: number,
  allocatePayload?: (bytes: number) => Buffer,
  splitPayloads = false,
): Decoded<RequestFrame, RequestInvalid> {
  if (queue.length < WIRE.REQUEST_HEADER_BYTES) return needMore(WIRE.REQUEST_HEADER_BYTES);
  const header = queue.peek(WIRE.REQUEST_HEADER_BYTES);
  const magic = header.readUInt32BE(0);
  if (magic !== NBD_REQUEST_MAGIC) return { kind: "invalid", reason: "bad_request_magic", magic };
  const flags = header.readUInt16BE(4);
  const type = header.readUInt16BE(6);
  const cookieHi = header.readUInt32BE(8);
  const cookieLo = header.readUInt32BE(12);
  const offset = readU64(header, 16);
  const length = header.readUInt32BE(24);
  let payload: Buffer | undefined;
  if (type === NBD_CMD.WRITE) {
    if (length > payloadBytesMax) {
      return { kind: "invalid", reason: "payload_too_large", type, length, cookieHi, cookieLo };
    }
    const frameBytes = WIRE.REQUEST_HEADER_BYTES + length;
    if (queue.length < frameBytes) return needMore(frameBytes);
    queue.skip(WIRE.REQUEST_HEADER_BYTES);
    if (splitPayloads && length >= SPLIT_PAYLOAD_BYTES_MIN) {
      const partsMax = Math.min(SPLIT_PAYLOAD_PARTS_MAX, Math.floor(length / SPLIT_PAYLOAD_PART_BYTES_MIN) + 2);
      const parts = queue.takeParts(length, partsMax);
      if (parts !== undefined && parts.length > 1) {
        return { kind: "frame", frame: { flags, type, cookieHi, cookieLo, offset, length, payload: undefined, payloadParts: parts } };
      }
      if (parts !== undefined) payload = parts[0];
    }
    payload ??= queue.take(length, allocatePayload);
  } else {
    queue.skip(WIRE.REQUEST_HEADER_BYTES);
  }
  return { kind: "frame", frame: { flags, type, cookieHi, cookieLo, offset, length, payload } };
}

// ---------------------------------------------------------------- replies

/** S: u32 magic, u32 error, 8-byte cookie (then read data on success). */
export function writeSimpleReplyHeader(target: Buffer, at: number, errno: number, cookie: Cookie): void {
  target.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, at);
  target.writeUInt32BE(errno, at + 4);
  target.writeUInt32BE(cookie.cookieHi, at + 8);
  target.writeUInt32BE(cookie.cookieLo, at + 12);
}

export function encodeSimpleReply(errno: number, cookie: Cookie): Buffer {
  const out = Buffer.allocUnsafe(WIRE.SIMPLE_REPLY_HEADER_BYTES);
  writeSimpleReplyHeader(out, 0, errno, cookie);
  return out;
}

/** S: u32 magic, u16 flags, u16 type, 8-byte cookie, u32 payload length. */
export function writeStructuredHeader(
  target: Buffer,
  at: number,
  flags: number,
  type: number,
  cookie: Cookie,
  payloadBytes: number,
): void {
  target.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  target.writeUInt16BE(flags, at + 4);
  target.writeUInt16BE(type, at + 6);
  target.writeUInt32BE(cookie.cookieHi, at + 8);
  target.writeUInt32BE(cookie.cookieLo, at + 12);
  target.writeUInt32BE(payloadBytes, at + 16);
}

/** Bytes before the data in a read reply: simple header, or chunk header + u64 offset. */
export function readReplyHeaderBytes(structured: boolean): number {
  return structured ? WIRE.STRUCTURED_REPLY_HEADER_BYTES + 8 : WIRE.SIMPLE_REPLY_HEADER_BYTES;
}

/**
 * Writes the header of a successful read reply in front of its data:
 * `target` holds readReplyHeaderBytes(structured) header bytes then `length`
 * data bytes, so the whole reply goes out in one socket write.
 * Structured: one NBD_REPLY_TYPE_OFFSET_DATA chunk with NBD_REPLY_FLAG_DONE.
 */
export function writeReadReplyHeader(
  target: Buffer,
  structured: boolean,
  cookie: Cookie,
  offset: number,
  length: number,
): void {
  if (!structured) {
    writeSimpleReplyHeader(target, 0, 0, cookie);
    return;
  }
  writeStructuredHeader(target, 0, NBD_REPLY_FLAG.DONE, NBD_REPLY_TYPE.OFFSET_DATA, cookie, 8 + length);
  writeU64(target, offset, WIRE.STRUCTURED_REPLY_HEADER_BYTES);
}

/** NBD_REPLY_TYPE_ERROR chunk (final): u32 error, u16 message length, message. */
export function encodeErrorChunk(cookie: Cookie, errno: number, message: Buffer): Buffer {
  const messageBytes = Math.min(message.length, WIRE.STRING_BYTES_MAX);
  const out = Buffer.allocUnsafe(WIRE.STRUCTURED_REPLY_HEADER_BYTES + 6 + messageBytes);
  writeStructuredHeader(out, 0, NBD_REPLY_FLAG.DONE, NBD_REPLY_TYPE.ERROR, cookie, 6 + messageBytes);
  out.writeUInt32BE(errno, WIRE.STRUCTURED_REPLY_HEADER_BYTES);
  out.writeUInt16BE(messageBytes, WIRE.STRUCTURED_REPLY_HEADER_BYTES + 4);
  message.copy(out, WIRE.STRUCTURED_REPLY_HEADER_BYTES + 6, 0, messageBytes);
  return out;
}

/** NBD_REPLY_TYPE_NONE chunk with NBD_REPLY_FLAG_DONE. */
export function encodeNoneChunk(cookie: Cookie): Buffer {
  const out = Buffer.allocUnsafe(WIRE.STRUCTURED_REPLY_HEADER_BYTES);
  writeStructuredHeader(out, 0, NBD_REPLY_FLAG.DONE, NBD_REPLY_TYPE.NONE, cookie, 0);
  return out;
}

export interface StatusDescriptor {
  readonly lengthBytes: number;
  readonly flags: number;
}

/** NBD_REPLY_TYPE_BLOCK_STATUS chunk: u32 context id, then (u32 length, u32 flags) per descriptor. */
export function encodeBlockStatusChunk(
  cookie: Cookie,
  contextId: number,
  descriptors: readonly StatusDescriptor[],
  done: boolean,
): Buffer {
  const payloadBytes = 4 + descriptors.length * 8;
  const out = Buffer.allocUnsafe(WIRE.STRUCTURED_REPLY_HEADER_BYTES + payloadBytes);
  writeStructuredHeader(out, 0, done ? NBD_REPLY_FLAG.DONE : 0, NBD_REPLY_TYPE.BLOCK_STATUS, cookie, payloadBytes);
  out.writeUInt32BE(contextId, WIRE.STRUCTURED_REPLY_HEADER_BYTES);
  let at = WIRE.STRUCTURED_REPLY_HEADER_BYTES + 4;
  for (const descriptor of descriptors) {
    out.writeUInt32BE(descriptor.lengthBytes, at);
    out.writeUInt32BE(descriptor.flags, at + 4);
    at += 8;
  }
  return out;
}
