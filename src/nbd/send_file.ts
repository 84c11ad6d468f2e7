// Replies sent from the page cache to a plaintext TCP socket by sendfile,
// behind Node's stream (docs/adr/0018-read-replies-by-sendfile.md): the
// one pump both frontends use, the NBD session for a READ reply and the
// iSCSI connection for each Data-In PDU (header, then the device's bytes).

import type { Socket } from "node:net";
import type { BlockDevice } from "../block/types.ts";
import type { BufferPool } from "./buffer_pool.ts";

/** Messages with at least this much data may go out by sendfile (BlockDevice.sendNow); below it, copying the data costs less than the extra system calls. */
export const SEND_FILE_BYTES_MIN = 64 * 1024;
/** ...and a READ of at most this much (the storage's bound for synchronous page-cache reads, NOWAIT_BYTES_MAX). */
export const SEND_FILE_BYTES_MAX = 1024 * 1024;

/** The fd of a plaintext TCP socket (never TLS, never a Unix socket), for sendfile; -1 when there is none. */
export function sendFileSocketFd(socket: Socket): number {
  if (socket.remoteAddress === undefined) return -1;
  const fd = (socket as unknown as { _handle?: { fd?: unknown } | null })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : -1;
}

/**
 * The socket's fd may be written behind the stream now: nothing queued (the
 * bytes stay in order), not destroyed and not ended (its fd number may already
 * name another file).
 */
export function mayWriteBehindStream(socket: Socket): boolean {
  return !socket.destroyed && socket.writable && socket.writableLength === 0;
}

/**
 * `header`, then `lengthBytes` of `device` at `offsetBytes`, sent straight
 * from the page cache to `socketFd` (BlockDevice.sendNow). Undefined when not
 * possible (nothing sent: send it another way); else `rest`, the part the
 * socket did not take (read into a buffer from `pool`), which the caller must
 * write before anything else, or undefined when all of it went out. Throws
 * when the rest cannot be read: the message is cut short on the wire, so the
 * connection must be closed.
 */
export function sendHeaderAndDataNow(
  device: BlockDevice,
  socketFd: number,
  header: Buffer,
  offsetBytes: number,
  lengthBytes: number,
  pool: BufferPool,
): { rest: Buffer | undefined } | undefined {
  if (device.sendNow === undefined || device.readSync === undefined) return undefined;
  const sent = device.sendNow(socketFd, header, offsetBytes, lengthBytes);
  if (sent < 0) return undefined;
  if (sent === header.length + lengthBytes) return { rest: undefined };
  if (sent < header.length) {
    const whole = pool.acquire(header.length, lengthBytes);
    header.copy(whole);
    device.readSync(whole.subarray(header.length), offsetBytes);
    return { rest: whole.subarray(sent) };
  }
  const dataSent = sent - header.length;
  const rest = pool.acquire(0, lengthBytes - dataSent);
  device.readSync(rest, offsetBytes + dataSent);
  return { rest };
}
