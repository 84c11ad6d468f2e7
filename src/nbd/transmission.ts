// Transmission phase (nbdkit's protocol.c): every request is validated first
// (validateRequest, pure) and only then handled (performRequest, which calls
// the BlockDevice and returns the reply bytes). Neither touches the socket;
// the session sends the reply, and maps a thrown error to an errno in one place.

import type { Extent } from "../block/types.ts";
import type { BufferPool } from "./buffer_pool.ts";
import { SEND_FILE_BYTES_MAX, SEND_FILE_BYTES_MIN, sendHeaderAndDataNow } from "./send_file.ts";
import { NBD_ERRNO, type NbdErrno } from "../util/errors.ts";
import type { OpenedExport } from "./handshake.ts";
import { BLOCK_SIZE_MIN_BYTES, type NbdLimits } from "./limits.ts";
import { NBD_CMD, NBD_CMD_FLAG, NBD_STATE, NBD_TFLAG } from "./protocol.ts";
import {
  type RequestFrame,
  type StatusDescriptor,
  encodeBlockStatusChunk,
  encodeSimpleReply,
  readReplyHeaderBytes,
  writeReadReplyHeader,
} from "./request_codec.ts";

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD.READ]: "READ",
  [NBD_CMD.WRITE]: "WRITE",
  [NBD_CMD.DISC]: "DISC",
  [NBD_CMD.FLUSH]: "FLUSH",
  [NBD_CMD.TRIM]: "TRIM",
  [NBD_CMD.CACHE]: "CACHE",
  [NBD_CMD.WRITE_ZEROES]: "WRITE_ZEROES",
  [NBD_CMD.BLOCK_STATUS]: "BLOCK_STATUS",
};

export function commandName(type: number): string {
  return COMMAND_NAMES[type] ?? `command ${type}`;
}

/** A request that fails validation: the errno for the wire and a message naming the values. */
export interface RequestRejection {
  readonly errno: NbdErrno;
  readonly message: string;
}

function reject(errno: NbdErrno, message: string): RequestRejection {
  return { errno, message };
}

/** Command flags each command accepts, given what was advertised. */
function allowedFlags(opened: OpenedExport, type: number): number {
  const advertised = opened.transmissionFlags;
  let allowed = (advertised & NBD_TFLAG.SEND_FUA) !== 0 ? NBD_CMD_FLAG.FUA : 0;
  if (type === NBD_CMD.READ && (advertised & NBD_TFLAG.SEND_DF) !== 0) allowed |= NBD_CMD_FLAG.DF;
  if (type === NBD_CMD.WRITE_ZEROES) {
    allowed |= NBD_CMD_FLAG.NO_HOLE;
    if ((advertised & NBD_TFLAG.SEND_FAST_ZERO) !== 0) allowed |= NBD_CMD_FLAG.FAST_ZERO;
  }
  if (type === NBD_CMD.BLOCK_STATUS) allowed |= NBD_CMD_FLAG.REQ_ONE;
  return allowed;
}

/** The transmission flag a command needs, if any. */
const REQUIRED_TFLAG: Readonly<Record<number, number>> = {
  [NBD_CMD.FLUSH]: NBD_TFLAG.SEND_FLUSH,
  [NBD_CMD.TRIM]: NBD_TFLAG.SEND_TRIM,
  [NBD_CMD.WRITE_ZEROES]: NBD_TFLAG.SEND_WRITE_ZEROES,
  [NBD_CMD.CACHE]: NBD_TFLAG.SEND_CACHE,
};

function isWriteLike(type: number): boolean {
  return type === NBD_CMD.WRITE || type === NBD_CMD.TRIM || type === NBD_CMD.WRITE_ZEROES;
}

/**
 * Checks a request (other than NBD_CMD_DISC) against the protocol, the
 * negotiated export and the limits. Returns undefined when it may be handled.
 */
export function validateRequest(
  opened: OpenedExport,
  frame: RequestFrame,
  limits: NbdLimits,
  shuttingDown: boolean,
): RequestRejection | undefined {
  const { type, flags, offset, length } = frame;
  const name = commandName(type);
  if (shuttingDown) return reject(NBD_ERRNO.ESHUTDOWN, "server is shutting down");
  if (type > NBD_CMD.BLOCK_STATUS || type === NBD_CMD.DISC) return reject(NBD_ERRNO.EINVAL, `unknown command ${type}`);
  const extra = flags & ~allowedFlags(opened, type);
  if (extra !== 0) return reject(NBD_ERRNO.EINVAL, `${name}: flags 0x${extra.toString(16)} not allowed`);
  const required = REQUIRED_TFLAG[type];
  if (required !== undefined && (opened.transmissionFlags & required) === 0) {
    return reject(NBD_ERRNO.EINVAL, `${name} is not supported on export ${opened.name}`);
  }
  if (type === NBD_CMD.FLUSH) {
    if (offset !== 0 || length !== 0) return reject(NBD_ERRNO.EINVAL, `FLUSH: offset=${offset} length=${length} must be zero`);
    return undefined;
  }
  if (isWriteLike(type) && (opened.transmissionFlags & NBD_TFLAG.READ_ONLY) !== 0) {
    return reject(NBD_ERRNO.EPERM, `${name}: export ${opened.name} is read-only`);
  }
  if (type === NBD_CMD.BLOCK_STATUS && opened.metaContextId === undefined) {
    return reject(NBD_ERRNO.EINVAL, "BLOCK_STATUS: no metadata context selected (NBD_OPT_SET_META_CONTEXT base:allocation)");
  }
  if (length === 0) return reject(NBD_ERRNO.EINVAL, `${name}: zero length at offset=${offset}`);
  if (offset + length > opened.sizeBytes) {
    // proto.md: ENOSPC for writes past the end, EINVAL for the rest.
    const errno = type === NBD_CMD.WRITE || type === NBD_CMD.WRITE_ZEROES ? NBD_ERRNO.ENOSPC : NBD_ERRNO.EINVAL;
    return reject(errno, `${name} out of range: export=${opened.name} offset=${offset} length=${length} size=${opened.sizeBytes}`);
  }
  if (opened.alignmentAgreed && type !== NBD_CMD.BLOCK_STATUS && (offset % BLOCK_SIZE_MIN_BYTES !== 0 || length % BLOCK_SIZE_MIN_BYTES !== 0)) {
    return reject(NBD_ERRNO.EINVAL, `${name}: offset=${offset} length=${length} not aligned to ${BLOCK_SIZE_MIN_BYTES} bytes`);
  }
  if (type === NBD_CMD.READ && length > limits.payloadBytesMax) {
    // Structured replies may reject a large read with EOVERFLOW; simple replies only know EINVAL.
    const errno = opened.structuredReplies ? NBD_ERRNO.EOVERFLOW : NBD_ERRNO.EINVAL;
    return reject(errno, `READ: length=${length} over the maximum payload ${limits.payloadBytesMax}`);
  }
  return undefined;
}

/** Payload bytes a validated request holds while in flight (its read buffer or write data). */
export function requestCostBytes(frame: RequestFrame): number {
  return frame.type === NBD_CMD.READ || frame.type === NBD_CMD.WRITE ? frame.length : 0;
}

/**
 * A validated READ answered synchronously when the device can (readNow):
 * the whole reply from `pool`, or undefined to go through performRequest.
 */
export function readReplyNow(opened: OpenedExport, frame: RequestFrame, pool: BufferPool): Buffer | undefined {
  const device = opened.device;
  if (device.readNow === undefined) return undefined;
  const headerBytes = readReplyHeaderBytes(opened.structuredReplies);
  const reply = pool.acquire(headerBytes, frame.length);
  let done = false;
  try {
    done = device.readNow(reply.subarray(headerBytes), frame.offset);
  } catch {
    // performRequest reads again and reports the error.
  }
  if (!done) {
    pool.release(reply);
    return undefined;
  }
  writeReadReplyHeader(reply, opened.structuredReplies, frame, frame.offset, frame.length);
  return reply;
}

/** Whether a validated request is a READ the device may send by sendfile (sendReadReplyNow). */
export function sendFileCandidate(opened: OpenedExport, frame: RequestFrame): boolean {
  return (
    frame.type === NBD_CMD.READ &&
    frame.length >= SEND_FILE_BYTES_MIN &&
    frame.length <= SEND_FILE_BYTES_MAX &&
    opened.device.sendNow !== undefined &&
    opened.device.readSync !== undefined
  );
}

/**
 * A validated READ sent straight from the page cache to the socket
 * `socketFd` (BlockDevice.sendNow: header, then sendfile). Undefined when
 * not possible (nothing sent: answer it another way); else `rest`, the part
 * of the reply the socket did not take (from `pool`), which the caller must
 * write before anything else, or undefined when all of it went out. Throws
 * when the rest cannot be read: the reply is cut short, so the connection
 * must be closed.
 */
export function sendReadReplyNow(opened: OpenedExport, frame: RequestFrame, socketFd: number, pool: BufferPool): { rest: Buffer | undefined } | undefined {
  if (!sendFileCandidate(opened, frame)) return undefined;
  const header = Buffer.allocUnsafe(readReplyHeaderBytes(opened.structuredReplies));
  writeReadReplyHeader(header, opened.structuredReplies, frame, frame.offset, frame.length);
  return sendHeaderAndDataNow(opened.device, socketFd, header, frame.offset, frame.length, pool);
}

/**
 * A validated WRITE without FUA done synchronously when the device can
 * (writeNow): the reply, or undefined to go through performRequest.
 */
export function writeReplyNow(opened: OpenedExport, frame: RequestFrame): Buffer | undefined {
  const device = opened.device;
  if (device.writeNow === undefined || (frame.flags & NBD_CMD_FLAG.FUA) !== 0) return undefined;
  const parts = frame.payloadParts ?? (frame.payload !== undefined ? [frame.payload] : undefined);
  if (parts === undefined) return undefined;
  let done = false;
  try {
    done = device.writeNow(parts, frame.offset);
  } catch {
    // performRequest writes again and reports the error.
  }
  return done ? encodeSimpleReply(0, frame) : undefined;
}

/**
 * Handles a validated request; returns the whole reply (a read's comes from
 * `pool`: give it back once written). Throws the device's error on failure.
 */
export async function performRequest(opened: OpenedExport, frame: RequestFrame, limits: NbdLimits, pool: BufferPool): Promise<Buffer> {
  const device = opened.device;
  const fua = (frame.flags & NBD_CMD_FLAG.FUA) !== 0;
  switch (frame.type) {
    case NBD_CMD.READ: {
      const headerBytes = readReplyHeaderBytes(opened.structuredReplies);
      // On failure the buffer is dropped, not pooled: the device may still be writing into it.
      const reply = pool.acquire(headerBytes, frame.length);
      await device.read(reply.subarray(headerBytes), frame.offset);
      writeReadReplyHeader(reply, opened.structuredReplies, frame, frame.offset, frame.length);
      return reply;
    }
    case NBD_CMD.WRITE: {
      // The decoder attached exactly `length` bytes: one buffer, or the received chunks in order.
      const parts = frame.payloadParts;
      if (parts === undefined) await device.write(frame.payload as Buffer, frame.offset, fua);
      else if (device.writev !== undefined) await device.writev(parts, frame.offset, fua);
      else await device.write(Buffer.concat(parts, frame.length), frame.offset, fua);
      break;
    }
    case NBD_CMD.FLUSH:
      await device.flush();
      break;
    case NBD_CMD.TRIM:
      await device.trim(frame.offset, frame.length, fua);
      break;
    case NBD_CMD.WRITE_ZEROES:
      await device.zero(frame.offset, frame.length, {
        fua,
        mayTrim: (frame.flags & NBD_CMD_FLAG.NO_HOLE) === 0,
        fastOnly: (frame.flags & NBD_CMD_FLAG.FAST_ZERO) !== 0,
      });
      break;
    case NBD_CMD.CACHE:
      await device.cache(frame.offset, frame.length);
      break;
    case NBD_CMD.BLOCK_STATUS: {
      const extents = await device.extents(frame.offset, frame.length);
      const reqOne = (frame.flags & NBD_CMD_FLAG.REQ_ONE) !== 0;
      const descriptors = statusDescriptors(extents, frame.length, reqOne, limits.blockStatusDescriptorsMax);
      return encodeBlockStatusChunk(frame, opened.metaContextId ?? 0, descriptors, true);
    }
    default:
      throw new Error(`performRequest: unvalidated command ${frame.type}`);
  }
  return encodeSimpleReply(0, frame);
}

/**
 * base:allocation descriptors for the device's extents: merged when the
 * status repeats, clipped to the requested length, at least one (status 0
 * over the whole range when the device reports nothing), one with REQ_ONE.
 */
export function statusDescriptors(
  extents: readonly Extent[],
  requestedBytes: number,
  reqOne: boolean,
  descriptorsMax: number,
): StatusDescriptor[] {
  const out: { lengthBytes: number; flags: number }[] = [];
  let covered = 0;
  for (const extent of extents) {
    if (covered >= requestedBytes) break;
    if (!(extent.lengthBytes > 0) || !Number.isSafeInteger(extent.lengthBytes)) continue;
    const flags = (extent.hole ? NBD_STATE.HOLE : 0) | (extent.zero ? NBD_STATE.ZERO : 0);
    const lengthBytes = Math.min(extent.lengthBytes, requestedBytes - covered);
    const last = out[out.length - 1];
    if (last !== undefined && last.flags === flags) {
      last.lengthBytes += lengthBytes;
    } else {
      if (reqOne && out.length === 1) break;
      if (out.length >= descriptorsMax) break;
      out.push({ lengthBytes, flags });
    }
    covered += lengthBytes;
  }
  if (out.length === 0) out.push({ lengthBytes: requestedBytes, flags: 0 });
  return out;
}
