// Typed access to the native addon src/native/ipsan_io.cc (built by `npm ci`
// through node-gyp into build/Release/ipsan_io.node). Node's fs module has no
// fallocate, SEEK_DATA/SEEK_HOLE, block-device ioctls or flock; the addon
// runs each on libuv's thread pool and rejects with errno-coded errors.
// Bad arguments (an fd outside [0, 2^31 - 1], an offset that is negative or
// not a safe integer, an unknown mode or whence, a detached buffer) are
// refused before any system call with a TypeError or RangeError coded
// ERR_INVALID_ARG_TYPE, ERR_INVALID_ARG_VALUE or ERR_OUT_OF_RANGE, never an
// errno name, so isNotSupported() cannot take a caller's bug for a missing
// feature: the synchronous calls throw it, the others reject with it.

import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

export interface IpsanIo {
  fallocate(fd: number, mode: number, offsetBytes: number, lengthBytes: number): Promise<number>;
  lseek(fd: number, offsetBytes: number, whence: number): Promise<number>;
  blkGetSize64(fd: number): Promise<number>;
  blkDiscard(fd: number, offsetBytes: number, lengthBytes: number): Promise<number>;
  blkZeroOut(fd: number, offsetBytes: number, lengthBytes: number): Promise<number>;
  /** Non-blocking flock: 0, or the errno (EWOULDBLOCK when someone else holds it). */
  flock(fd: number, exclusive: boolean): number;
  /** Synchronous preadv2(RWF_NOWAIT): bytes read, or -errno (-EAGAIN when the data is not in the page cache). */
  preadNoWait(fd: number, buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): number;
  /** Synchronous pwritev2(RWF_NOWAIT): bytes written, or -errno (-EAGAIN would block, -EOPNOTSUPP unsupported). */
  pwriteNoWait(fd: number, buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): number;
  /** pwriteNoWait over 1..IOV_COUNT_MAX buffers in order (one pwritev2 call). */
  pwritevNoWait(fd: number, buffers: readonly Buffer[], positionBytes: number): number;
  /**
   * A READ reply straight from the page cache: `header`, then sendfile(2) of [position, position + length) to a
   * non-blocking socket, only when all of it is cached (cachestat). Bytes the socket took (header included, maybe
   * fewer than all, even 0), or -errno with nothing sent (-EAGAIN: not all cached; -ENOSYS: no cachestat).
   */
  sendFileNow(socketFd: number, header: Buffer, fileFd: number, positionBytes: number, lengthBytes: number): number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly SEEK_SET: number;
  readonly SEEK_END: number;
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
  readonly EWOULDBLOCK: number;
  readonly EAGAIN: number;
  readonly EOPNOTSUPP: number;
  readonly EINVAL: number;
  readonly ENOSYS: number;
  readonly IOV_COUNT_MAX: number;
}

// dist/unit/native.js -> <repo>/build/Release/ipsan_io.node (and the same from src/ for tools).
const ADDON_PATH = fileURLToPath(new URL("../../build/Release/ipsan_io.node", import.meta.url));

let cached: IpsanIo | undefined;

export function ipsanIo(): IpsanIo {
  if (cached === undefined) {
    try {
      cached = createRequire(import.meta.url)(ADDON_PATH) as IpsanIo;
    } catch (error) {
      throw new Error(`native addon ${ADDON_PATH} is missing or broken; run "npm ci" (or "npx node-gyp rebuild") in the repository`, {
        cause: error,
      });
    }
  }
  return cached;
}

/** The errno name of an error from the addon or from node:fs ("EOPNOTSUPP"), if any. */
export function errnoCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

export function isNotSupported(error: unknown): boolean {
  const code = errnoCode(error);
  return code === "EOPNOTSUPP" || code === "ENOTSUP" || code === "ENOTTY" || code === "ENOSYS" || code === "EINVAL";
}
