// The unit's backing storage: a sparse file DATA/storage.img, or an existing
// block device (or file) given with --device. One file descriptor serves
// every volume and every connection, so fdatasync on it makes all writes
// durable at once (the honest basis for NBD CAN_MULTI_CONN).
//
// All I/O is positional (pread/pwrite semantics), never through the file
// offset, so concurrent requests cannot disturb each other. Only the
// operations Node lacks go through the native addon.

import * as fs from "node:fs";
import { dirname } from "node:path";
import { assert } from "../util/assert.ts";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { STORAGE_BYTES_MAX, STORAGE_BYTES_MIN } from "./layout.ts";
import { errnoCode, ipsanIo, isNotSupported } from "./native.ts";

const log = logger("storage");

/** Zero-fill writes (fallback when no fast zeroing exists) go in chunks of this size. */
export const ZERO_CHUNK_BYTES = 1024 * 1024;

/**
 * Fast paths (docs/adr/0002-unit-storage-layout.md, "I/O path"). A read first
 * tries preadv2(RWF_NOWAIT) on the event loop: a page-cache hit costs about a
 * microsecond instead of a thread-pool round trip (~30 us); a miss returns
 * EAGAIN at once and goes to the pool. Writes try pwritev2(RWF_NOWAIT); where
 * the filesystem does not support it, writes up to SYNC_WRITE_BYTES_MAX are
 * done synchronously (a copy into the page cache) as long as they stay fast:
 * one that takes longer than SYNC_WRITE_SLOW_MS (dirty-page throttling, block
 * allocation stalls) sends all writes to the pool for SYNC_WRITE_BACKOFF_MS.
 */
export const NOWAIT_BYTES_MAX = 1024 * 1024;
export const SYNC_WRITE_BYTES_MAX = 1024 * 1024;
export const SYNC_WRITE_SLOW_MS = 20;
export const SYNC_WRITE_BACKOFF_MS = 1_000;
/**
 * Event-loop time the synchronous fast paths (RWF_NOWAIT reads and writes,
 * synchronous writes) may take in one turn of the loop, over all connections.
 * Past it, I/O goes through the thread pool until the next turn, so a client
 * with many large requests queued cannot hold the loop for others.
 */
export const SYNC_IO_TICK_BUDGET_MS = 4;
const RESOLVED: Promise<void> = Promise.resolve();

export type StorageKind = "file" | "device";

export function readFull(fd: number, buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === lengthBytes) return resolve();
      fs.read(fd, buffer, bufferOffset + done, lengthBytes - done, positionBytes + done, (error, bytesRead) => {
        if (error) return reject(error);
        if (bytesRead === 0) {
          // Past the end of a file: the rest reads as zeroes (cannot happen for a sized storage).
          buffer.fill(0, bufferOffset + done, bufferOffset + lengthBytes);
          return resolve();
        }
        step(done + bytesRead);
      });
    };
    step(0);
  });
}

/**
 * The error for a write that returned 0 bytes without an error: retrying it
 * would loop forever, so the write fails like an I/O error at that offset.
 */
function noProgressError(positionBytes: number): NodeJS.ErrnoException {
  const error: NodeJS.ErrnoException = new Error(`EIO: write at offset ${positionBytes} made no progress (0 bytes written)`);
  error.code = "EIO";
  error.syscall = "write";
  return error;
}

export function writeFull(fd: number, buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === lengthBytes) return resolve();
      fs.write(fd, buffer, bufferOffset + done, lengthBytes - done, positionBytes + done, (error, written) => {
        if (error) return reject(error);
        if (written === 0) return reject(noProgressError(positionBytes + done));
        step(done + written);
      });
    };
    step(0);
  });
}

/** The parts after the first `skipBytes` bytes of `parts` (subarrays, no copy). */
export function dropBytes(parts: readonly Buffer[], skipBytes: number): Buffer[] {
  const out: Buffer[] = [];
  let left = skipBytes;
  for (const part of parts) {
    if (left >= part.length) {
      left -= part.length;
      continue;
    }
    out.push(left > 0 ? part.subarray(left) : part);
    left = 0;
  }
  return out;
}

/** Positional vectored write on the thread pool, resumed after short writes. */
/** writev(2) on the event loop, looping over short writes until every byte is written; throws on error. */
export function writevSyncFull(fd: number, parts: readonly Buffer[], lengthBytes: number, positionBytes: number): void {
  let rest: readonly Buffer[] = parts;
  let done = 0;
  while (done < lengthBytes) {
    const written = fs.writevSync(fd, rest, positionBytes + done);
    if (written === 0) throw noProgressError(positionBytes + done);
    done += written;
    rest = dropBytes(rest, written);
  }
}

export function writevFull(fd: number, parts: readonly Buffer[], lengthBytes: number, positionBytes: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (rest: readonly Buffer[], done: number): void => {
      if (done >= lengthBytes) return resolve();
      fs.writev(fd, rest, positionBytes + done, (error, written) => {
        if (error) return reject(error);
        if (written === 0) return reject(noProgressError(positionBytes + done));
        step(dropBytes(rest, written), done + written);
      });
    };
    step(parts, 0);
  });
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (error) => (error ? reject(error) : resolve())));
}

export interface StorageOpen {
  readonly storage: Storage;
  /** True when this start created the backing file (it holds only zeroes). */
  readonly created: boolean;
  /** Size of the file before this start grew it, if it did. */
  readonly grownFromBytes: number | undefined;
}

export class Storage {
  readonly fd: number;
  readonly kind: StorageKind;
  #path: string;
  #sizeBytes: number;
  #closed = false;
  #noWaitReads = true;
  #noWaitWrites = true;
  /** sendNow works here: the addon has sendFileNow (an addon built before it lacks it) and the kernel has cachestat; known at the first call. */
  #sendFile: boolean | undefined;
  #syncWritesAfterMs = 0;
  /**
   * A second descriptor of the same file opened with O_DSYNC, for FUA writes
   * (writeDurable): undefined until the first one; null when it cannot be
   * opened (FUA then falls back to a write and an fdatasync of everything).
   */
  #dsyncFd: number | null | undefined;
  /** Event-loop time spent in synchronous I/O during the current turn of the loop. */
  #tickSpentMs = 0;
  #tickResetQueued = false;
  readonly #resetTick = (): void => {
    this.#tickSpentMs = 0;
    this.#tickResetQueued = false;
  };

  constructor(fd: number, path: string, kind: StorageKind, sizeBytes: number) {
    this.fd = fd;
    this.#path = path;
    this.kind = kind;
    this.#sizeBytes = sizeBytes;
  }

  get path(): string {
    return this.#path;
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  /**
   * Opens DATA/storage.img, creating it sparse with `capacityBytes` if it is
   * missing (through a temporary name, so a crash never leaves a half-made
   * file behind), or growing it when `capacityBytes` is larger.
   */
  static openFile(path: string, capacityBytes: number | undefined): StorageOpen {
    if (capacityBytes !== undefined) checkCapacity(capacityBytes);
    if (!fs.existsSync(path)) {
      if (capacityBytes === undefined) {
        throw new IpsanError("INVALID_ARGUMENT", `--capacity is required to create the storage ${path}`, { field: "--capacity" });
      }
      const temporary = `${path}.new`;
      const fd = fs.openSync(temporary, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o600);
      fs.ftruncateSync(fd, capacityBytes);
      return { storage: new Storage(fd, temporary, "file", capacityBytes), created: true, grownFromBytes: undefined };
    }
    const fd = fs.openSync(path, fs.constants.O_RDWR);
    const stat = fs.fstatSync(fd);
    if (!stat.isFile()) {
      fs.closeSync(fd);
      throw new IpsanError("INVALID_ARGUMENT", `${path} is not a regular file`, { field: "--data" });
    }
    let grownFromBytes: number | undefined;
    if (capacityBytes !== undefined && capacityBytes < stat.size) {
      fs.closeSync(fd);
      throw new IpsanError(
        "INVALID_ARGUMENT",
        `--capacity ${capacityBytes} is smaller than the existing storage ${path} (${stat.size} bytes); storage never shrinks`,
        { field: "--capacity" },
      );
    }
    if (capacityBytes !== undefined && capacityBytes > stat.size) {
      fs.ftruncateSync(fd, capacityBytes);
      fs.fdatasyncSync(fd);
      grownFromBytes = stat.size;
      log.info("storage grown", { path, fromBytes: stat.size, toBytes: capacityBytes });
    }
    const sizeBytes = capacityBytes ?? stat.size;
    if (sizeBytes < STORAGE_BYTES_MIN) {
      fs.closeSync(fd);
      throw new IpsanError("INVALID_ARGUMENT", `storage ${path} is ${sizeBytes} bytes, below the minimum ${STORAGE_BYTES_MIN}`, { field: "--capacity" });
    }
    return { storage: new Storage(fd, path, "file", sizeBytes), created: false, grownFromBytes };
  }

  /** Renames the freshly formatted DATA/storage.img.new into place (durably). */
  commitCreatedFile(finalPath: string): void {
    assert(this.kind === "file" && this.#path.endsWith(".new"), "only a created file is committed");
    fs.renameSync(this.#path, finalPath);
    this.#path = finalPath;
    const dirFd = fs.openSync(dirname(finalPath), "r");
    try {
      fs.fsyncSync(dirFd);
    } finally {
      fs.closeSync(dirFd);
    }
  }

  /** Opens --device PATH: a block device (size by ioctl) or an existing file (size by lseek). */
  static async openDevice(path: string, capacityBytes: number | undefined): Promise<StorageOpen> {
    let fd: number;
    try {
      // O_EXCL on a block device fails with EBUSY while it is mounted or opened exclusively elsewhere.
      fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_EXCL);
    } catch (error) {
      throw new IpsanError("INVALID_ARGUMENT", `--device ${path}: cannot open: ${errorMessage(error)}`, { field: "--device", cause: error });
    }
    const stat = fs.fstatSync(fd);
    let deviceBytes: number;
    let kind: StorageKind;
    if (stat.isBlockDevice()) {
      kind = "device";
      deviceBytes = await ipsanIo().blkGetSize64(fd);
    } else if (stat.isFile()) {
      kind = "file";
      deviceBytes = await ipsanIo().lseek(fd, 0, ipsanIo().SEEK_END);
    } else {
      fs.closeSync(fd);
      throw new IpsanError("INVALID_ARGUMENT", `--device ${path}: not a block device or regular file`, { field: "--device" });
    }
    if (capacityBytes !== undefined && capacityBytes > deviceBytes) {
      fs.closeSync(fd);
      throw new IpsanError("INVALID_ARGUMENT", `--capacity ${capacityBytes} is larger than --device ${path} (${deviceBytes} bytes)`, {
        field: "--capacity",
      });
    }
    const sizeBytes = Math.min(capacityBytes ?? deviceBytes, STORAGE_BYTES_MAX);
    if (sizeBytes < STORAGE_BYTES_MIN) {
      fs.closeSync(fd);
      throw new IpsanError("INVALID_ARGUMENT", `--device ${path} is ${sizeBytes} bytes, below the minimum ${STORAGE_BYTES_MIN}`, { field: "--device" });
    }
    const flockErrno = ipsanIo().flock(fd, true);
    if (flockErrno !== 0) {
      fs.closeSync(fd);
      throw new IpsanError("CONFLICT", `--device ${path} is locked by another process (errno ${flockErrno})`, { field: "--device" });
    }
    return { storage: new Storage(fd, path, kind, sizeBytes), created: false, grownFromBytes: undefined };
  }

  /** Whether the synchronous fast paths may still run in this turn of the event loop. */
  #syncAllowed(): boolean {
    return this.#tickSpentMs < SYNC_IO_TICK_BUDGET_MS;
  }

  /** Charges synchronous I/O time to the current turn (reset by the next setImmediate). */
  #charge(startMs: number): number {
    const spentMs = performance.now() - startMs;
    this.#tickSpentMs += spentMs;
    if (!this.#tickResetQueued) {
      this.#tickResetQueued = true;
      setImmediate(this.#resetTick);
    }
    return spentMs;
  }

  /** The synchronous half of read(): true when the bytes were in the page cache and are now in `buffer`. */
  readNow(buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): boolean {
    this.#check(positionBytes, lengthBytes);
    if (!this.#noWaitReads || lengthBytes > NOWAIT_BYTES_MAX || !this.#syncAllowed()) return false;
    const io = ipsanIo();
    const startMs = performance.now();
    const done = io.preadNoWait(this.fd, buffer, bufferOffset, lengthBytes, positionBytes);
    this.#charge(startMs);
    if (done === -io.EOPNOTSUPP) this.#noWaitReads = false;
    return done === lengthBytes;
  }

  /**
   * A READ reply from the page cache to a socket without copying the data
   * through user space (ipsan_io sendFileNow: header, then sendfile(2)),
   * when every page of the range is cached. The bytes the socket took
   * (header included; fewer than all when its buffer filled), or -1 with
   * nothing sent. Charged to the turn's synchronous I/O budget like readNow.
   */
  sendNow(socketFd: number, header: Buffer, lengthBytes: number, positionBytes: number): number {
    this.#check(positionBytes, lengthBytes);
    const io = ipsanIo();
    this.#sendFile ??= typeof (io as Partial<typeof io>).sendFileNow === "function";
    if (!this.#sendFile || lengthBytes > NOWAIT_BYTES_MAX || !this.#syncAllowed()) return -1;
    const startMs = performance.now();
    const sent = io.sendFileNow(socketFd, header, this.fd, positionBytes, lengthBytes);
    this.#charge(startMs);
    if (sent >= 0) return sent;
    // No cachestat (Linux < 6.5): never again on this storage. A socket that takes no file pages says so per call.
    if (sent === -io.ENOSYS) this.#sendFile = false;
    return -1;
  }

  /** Fills [bufferOffset, bufferOffset + lengthBytes) of `buffer` before returning: from the page cache, else from the disk (blocking). */
  readSync(buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): void {
    this.#check(positionBytes, lengthBytes);
    let done = 0;
    if (this.#noWaitReads) done = Math.max(0, ipsanIo().preadNoWait(this.fd, buffer, bufferOffset, lengthBytes, positionBytes));
    while (done < lengthBytes) {
      const got = fs.readSync(this.fd, buffer, bufferOffset + done, lengthBytes - done, positionBytes + done);
      if (got === 0) {
        buffer.fill(0, bufferOffset + done, bufferOffset + lengthBytes);
        return;
      }
      done += got;
    }
  }

  /**
   * The synchronous half of writev(): true when all of `parts` went into the
   * page cache now; false when it would wait (the caller writes through the
   * pool, again from the start: a positional write of the same bytes).
   */
  writeNow(parts: readonly Buffer[], lengthBytes: number, positionBytes: number): boolean {
    this.#check(positionBytes, lengthBytes);
    const io = ipsanIo();
    if (lengthBytes > NOWAIT_BYTES_MAX || parts.length === 0 || parts.length > io.IOV_COUNT_MAX || !this.#syncAllowed()) return false;
    if (this.#noWaitWrites) {
      const startMs = performance.now();
      const only = parts.length === 1 ? parts[0] : undefined;
      const done = only !== undefined ? io.pwriteNoWait(this.fd, only, 0, only.length, positionBytes) : io.pwritevNoWait(this.fd, parts, positionBytes);
      this.#charge(startMs);
      if (done === lengthBytes) return true;
      if (done !== -io.EOPNOTSUPP) return false;
      this.#noWaitWrites = false;
    }
    if (!this.#syncWritesAllowed(lengthBytes)) return false;
    const startMs = performance.now();
    try {
      writevSyncFull(this.fd, parts, lengthBytes, positionBytes);
    } catch {
      return false;
    } finally {
      this.#noteSyncWrite(startMs, lengthBytes);
    }
    return true;
  }

  read(buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): Promise<void> {
    this.#check(positionBytes, lengthBytes);
    if (this.#noWaitReads && lengthBytes <= NOWAIT_BYTES_MAX && this.#syncAllowed()) {
      const io = ipsanIo();
      const startMs = performance.now();
      const done = io.preadNoWait(this.fd, buffer, bufferOffset, lengthBytes, positionBytes);
      this.#charge(startMs);
      if (done === lengthBytes) return RESOLVED;
      if (done > 0) return readFull(this.fd, buffer, bufferOffset + done, lengthBytes - done, positionBytes + done);
      if (done === -io.EOPNOTSUPP) this.#noWaitReads = false;
      // -EAGAIN (not cached) and any error: the pool path reads it (and reports a real error properly).
    }
    return readFull(this.fd, buffer, bufferOffset, lengthBytes, positionBytes);
  }

  write(buffer: Buffer, bufferOffset: number, lengthBytes: number, positionBytes: number): Promise<void> {
    this.#check(positionBytes, lengthBytes);
    if (lengthBytes <= NOWAIT_BYTES_MAX && this.#syncAllowed()) {
      const io = ipsanIo();
      if (this.#noWaitWrites) {
        const startMs = performance.now();
        const done = io.pwriteNoWait(this.fd, buffer, bufferOffset, lengthBytes, positionBytes);
        this.#charge(startMs);
        if (done === lengthBytes) return RESOLVED;
        if (done > 0) return writeFull(this.fd, buffer, bufferOffset + done, lengthBytes - done, positionBytes + done);
        if (done === -io.EOPNOTSUPP) this.#noWaitWrites = false;
      }
      if (this.#syncWritesAllowed(lengthBytes)) {
        const startMs = performance.now();
        try {
          let done = 0;
          while (done < lengthBytes) {
            const written = fs.writeSync(this.fd, buffer, bufferOffset + done, lengthBytes - done, positionBytes + done);
            if (written === 0) throw noProgressError(positionBytes + done);
            done += written;
          }
        } catch (error) {
          return Promise.reject(error as Error);
        } finally {
          this.#noteSyncWrite(startMs, lengthBytes);
        }
        return RESOLVED;
      }
    }
    return writeFull(this.fd, buffer, bufferOffset, lengthBytes, positionBytes);
  }

  /**
   * Writes `parts` in order at `positionBytes` (one vectored write; the
   * parts are the socket chunks a payload arrived in, never gathered).
   * At most IOV_COUNT_MAX parts.
   */
  writev(parts: readonly Buffer[], lengthBytes: number, positionBytes: number): Promise<void> {
    this.#check(positionBytes, lengthBytes);
    const io = ipsanIo();
    assert(parts.length > 0 && parts.length <= io.IOV_COUNT_MAX, `writev of ${parts.length} parts`);
    if (lengthBytes <= NOWAIT_BYTES_MAX && this.#syncAllowed()) {
      if (this.#noWaitWrites) {
        const startMs = performance.now();
        const done = io.pwritevNoWait(this.fd, parts, positionBytes);
        this.#charge(startMs);
        if (done === lengthBytes) return RESOLVED;
        if (done > 0) return writevFull(this.fd, dropBytes(parts, done), lengthBytes - done, positionBytes + done);
        if (done === -io.EOPNOTSUPP) this.#noWaitWrites = false;
      }
      if (this.#syncWritesAllowed(lengthBytes)) {
        const startMs = performance.now();
        try {
          writevSyncFull(this.fd, parts, lengthBytes, positionBytes);
        } catch (error) {
          return Promise.reject(error as Error);
        } finally {
          this.#noteSyncWrite(startMs, lengthBytes);
        }
        return RESOLVED;
      }
    }
    return writevFull(this.fd, parts, lengthBytes, positionBytes);
  }

  /** Synchronous writes (no RWF_NOWAIT here): small enough, not backed off after a slow one, budget left this turn. */
  #syncWritesAllowed(lengthBytes: number): boolean {
    return !this.#noWaitWrites && lengthBytes <= SYNC_WRITE_BYTES_MAX && this.#syncAllowed() && Date.now() >= this.#syncWritesAfterMs;
  }

  #noteSyncWrite(startMs: number, lengthBytes: number): void {
    if (this.#charge(startMs) > SYNC_WRITE_SLOW_MS) {
      this.#syncWritesAfterMs = Date.now() + SYNC_WRITE_BACKOFF_MS;
      log.limited("sync-write-slow", "a synchronous write was slow; writes go through the thread pool for a while", {
        lengthBytes,
        backoffMs: SYNC_WRITE_BACKOFF_MS,
      });
    }
  }

  sync(): Promise<void> {
    return fdatasync(this.fd);
  }

  /**
   * Writes `parts` at `positionBytes` and resolves once those bytes (and the
   * metadata needed to read them back) are durable, without making the rest
   * of the storage durable: a write through an O_DSYNC descriptor syncs only
   * its own range (the kernel's fdatasync of that range, then a device cache
   * flush), while fdatasync(2) of the whole file writes back every dirty page
   * every volume left. This is what FUA promises (NBD: the data of this
   * request; SBC: this command's blocks), and what a mirror's intent-bitmap
   * write needs: a 4 KiB FUA write costs a 4 KiB sync, not a flush of the
   * whole page cache the application's stream built up
   * (docs/adr/0020-fua-syncs-its-range.md). Always on the thread pool.
   */
  writeDurable(parts: readonly Buffer[], lengthBytes: number, positionBytes: number): Promise<void> {
    this.#check(positionBytes, lengthBytes);
    const fd = this.#durableFd();
    if (fd === null) return writevFull(this.fd, parts, lengthBytes, positionBytes).then(() => this.sync());
    return writevFull(fd, parts, lengthBytes, positionBytes);
  }

  /** Opens the O_DSYNC descriptor once, through /proc/self/fd: the very file this.fd is, whatever its path became. */
  #durableFd(): number | null {
    if (this.#dsyncFd !== undefined) return this.#dsyncFd;
    try {
      this.#dsyncFd = fs.openSync(`/proc/self/fd/${this.fd}`, fs.constants.O_WRONLY | fs.constants.O_DSYNC);
    } catch (error) {
      this.#dsyncFd = null;
      log.warn("cannot open the storage for range-synced writes; FUA writes sync the whole storage instead", { path: this.#path, error: errorMessage(error) });
    }
    return this.#dsyncFd;
  }

  /**
   * Makes [position, position + length) read as zeroes. `mayDeallocate`
   * allows a hole (punch) instead of allocated zeroes. Returns false when no
   * fast method exists and `fastOnly` forbids writing zeroes.
   */
  async zero(positionBytes: number, lengthBytes: number, mayDeallocate: boolean, fastOnly: boolean): Promise<boolean> {
    this.#check(positionBytes, lengthBytes);
    const io = ipsanIo();
    if (this.kind === "file") {
      const mode = mayDeallocate ? io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE : io.FALLOC_FL_ZERO_RANGE | io.FALLOC_FL_KEEP_SIZE;
      try {
        await io.fallocate(this.fd, mode, positionBytes, lengthBytes);
        return true;
      } catch (error) {
        if (!isNotSupported(error)) throw error;
        if (!mayDeallocate) {
          try {
            await io.fallocate(this.fd, io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE, positionBytes, lengthBytes);
            return true;
          } catch (punchError) {
            if (!isNotSupported(punchError)) throw punchError;
          }
        }
      }
    } else if (!fastOnly) {
      try {
        await io.blkZeroOut(this.fd, positionBytes, lengthBytes);
        return true;
      } catch (error) {
        if (!isNotSupported(error)) throw error;
      }
    }
    if (fastOnly) return false;
    await this.#writeZeroes(positionBytes, lengthBytes);
    return true;
  }

  /** Advisory discard; does nothing where the storage cannot discard. */
  async discard(positionBytes: number, lengthBytes: number): Promise<void> {
    this.#check(positionBytes, lengthBytes);
    const io = ipsanIo();
    try {
      if (this.kind === "file") {
        await io.fallocate(this.fd, io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE, positionBytes, lengthBytes);
      } else {
        // Block devices discard whole logical blocks only: shrink to the 4 KiB-aligned inside.
        const start = Math.ceil(positionBytes / 4096) * 4096;
        const end = Math.floor((positionBytes + lengthBytes) / 4096) * 4096;
        if (end > start) await io.blkDiscard(this.fd, start, end - start);
      }
    } catch (error) {
      if (!isNotSupported(error)) throw error;
      log.limited("discard-unsupported", "discard not supported by the storage; ignored", { path: this.path, code: errnoCode(error) });
    }
  }

  /** Next data at or after `position` (SEEK_DATA), or undefined when only a hole follows. */
  async seekData(positionBytes: number): Promise<number | undefined> {
    try {
      return await ipsanIo().lseek(this.fd, positionBytes, ipsanIo().SEEK_DATA);
    } catch (error) {
      if (errnoCode(error) === "ENXIO") return undefined;
      throw error;
    }
  }

  /** Next hole at or after `position` (SEEK_HOLE); the end of the file counts as a hole. */
  seekHole(positionBytes: number): Promise<number> {
    return ipsanIo().lseek(this.fd, positionBytes, ipsanIo().SEEK_HOLE);
  }

  async #writeZeroes(positionBytes: number, lengthBytes: number): Promise<void> {
    const zeroes = Buffer.alloc(Math.min(ZERO_CHUNK_BYTES, lengthBytes));
    for (let done = 0; done < lengthBytes; done += zeroes.length) {
      const chunk = Math.min(zeroes.length, lengthBytes - done);
      await writeFull(this.fd, zeroes, 0, chunk, positionBytes + done);
    }
  }

  #check(positionBytes: number, lengthBytes: number): void {
    assert(!this.#closed, `storage ${this.path} used after close`);
    assert(
      Number.isSafeInteger(positionBytes) && Number.isSafeInteger(lengthBytes) && positionBytes >= 0 && lengthBytes >= 0 && positionBytes + lengthBytes <= this.#sizeBytes,
      `storage access out of range: offset=${positionBytes} length=${lengthBytes} size=${this.#sizeBytes}`,
    );
  }

  closeSync(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (typeof this.#dsyncFd === "number") fs.closeSync(this.#dsyncFd);
    fs.closeSync(this.fd);
  }
}

function checkCapacity(capacityBytes: number): void {
  if (capacityBytes < STORAGE_BYTES_MIN || capacityBytes > STORAGE_BYTES_MAX) {
    throw new IpsanError("INVALID_ARGUMENT", `--capacity ${capacityBytes} out of range [${STORAGE_BYTES_MIN}, ${STORAGE_BYTES_MAX}]`, { field: "--capacity" });
  }
}

/**
 * DATA/unit.lock, held with flock for the life of the process (the kernel
 * drops it when the process dies, even by kill -9); it records the pid for
 * the error message a second unit gets.
 */
export class UnitLock {
  readonly path: string;
  readonly fd: number;
  constructor(path: string, fd: number) {
    this.path = path;
    this.fd = fd;
  }

  static acquire(path: string): UnitLock {
    const fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o600);
    const errno = ipsanIo().flock(fd, true);
    if (errno !== 0) {
      let holder = "";
      try {
        holder = fs.readFileSync(path, "utf8").trim();
      } catch {
        // The pid is only for the message.
      }
      fs.closeSync(fd);
      throw new IpsanError("CONFLICT", `${path} is locked: another unit (pid ${holder || "unknown"}) is using this storage`, { field: "--data" });
    }
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
    return new UnitLock(path, fd);
  }

  release(): void {
    try {
      fs.ftruncateSync(this.fd, 0);
    } catch {
      // Best effort: the flock is what counts, and closing drops it.
    }
    fs.closeSync(this.fd);
  }
}
