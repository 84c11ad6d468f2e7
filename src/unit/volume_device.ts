// BlockDevice over a volume or one of its partitions: device offsets map
// through the extent list to storage offsets. A request that spans extents
// is split; every piece is checked to lie inside the device's own extents
// before the storage is touched (and the storage checks its own bounds
// again), so no request can reach a byte of another volume or the table.
//
// A device captures its extents when it is opened: growing a volume only
// appends extents, so an open device stays valid and keeps its size. A
// change that the device's view no longer matches (delete, repartition, a
// grant its peer loses) revokes it (volumes.ts): later requests fail, the
// frontend is told at once (onRevoked) so it can drop the connection, and
// the change waits until every storage call of the device has settled, even
// the pieces of a request whose first piece already failed.

import { type BlockCapabilities, type BlockDevice, type Extent, type ZeroOptions, SECTOR_SIZE } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { IpsanError } from "../util/errors.ts";
import type { Storage } from "./storage.ts";
import type { LbaRange, VolumeRecord } from "./table.ts";

/** One contiguous run of the device: device bytes [deviceStart, +length) live at storage bytes [storageStart, +length). */
export interface Segment {
  readonly deviceStart: number;
  readonly storageStart: number;
  readonly lengthBytes: number;
}

export interface Piece {
  readonly deviceOffset: number;
  readonly storageOffset: number;
  readonly lengthBytes: number;
}

/** Most parts one writev() hands to the storage as one vectored write (IOV_MAX on Linux). */
export const WRITEV_PARTS_MAX = 1024;

/** Most allocation runs one extents() call reports (NBD clients ask again for the rest). */
export const EXTENT_RUNS_MAX = 1024;

/** Segments of the first `sizeBytes` of a volume laid over `extents`. */
export function volumeSegments(extents: readonly LbaRange[], sizeBytes: number): Segment[] {
  const segments: Segment[] = [];
  let deviceStart = 0;
  for (const extent of extents) {
    if (deviceStart >= sizeBytes) break;
    const lengthBytes = Math.min(extent.lengthLba * SECTOR_SIZE, sizeBytes - deviceStart);
    segments.push({ deviceStart, storageStart: extent.startLba * SECTOR_SIZE, lengthBytes });
    deviceStart += lengthBytes;
  }
  assert(deviceStart === sizeBytes, `extents cover the volume size ${sizeBytes}`);
  return segments;
}

/** The part [startBytes, startBytes + lengthBytes) of a volume's segments, rebased to 0 (a partition). */
export function subSegments(segments: readonly Segment[], startBytes: number, lengthBytes: number): Segment[] {
  const out: Segment[] = [];
  for (const piece of mapRange(segments, startBytes, lengthBytes)) {
    out.push({ deviceStart: piece.deviceOffset - startBytes, storageStart: piece.storageOffset, lengthBytes: piece.lengthBytes });
  }
  return out;
}

/** Splits a device range into storage pieces. The range must lie inside the segments. */
export function mapRange(segments: readonly Segment[], offsetBytes: number, lengthBytes: number): Piece[] {
  const pieces: Piece[] = [];
  let cursor = offsetBytes;
  const end = offsetBytes + lengthBytes;
  for (const s of segments) {
    if (cursor >= end) break;
    const segmentEnd = s.deviceStart + s.lengthBytes;
    if (segmentEnd <= cursor) continue;
    assert(s.deviceStart <= cursor, `segments are contiguous at ${cursor}`);
    const take = Math.min(segmentEnd, end) - cursor;
    pieces.push({ deviceOffset: cursor, storageOffset: s.storageStart + (cursor - s.deviceStart), lengthBytes: take });
    cursor += take;
  }
  assert(cursor >= end, `range ${offsetBytes}+${lengthBytes} lies inside the device`);
  return pieces;
}

export interface VolumeDeviceOptions {
  readonly name: string;
  readonly description: string;
  readonly volumeName: string;
  /** Partition number (1-based) this device serves, or undefined for the whole volume. */
  readonly partition: number | undefined;
  /** Whether the device's peer may still use the volume as a change leaves it. */
  readonly admits: (volume: VolumeRecord) => boolean;
  readonly storage: Storage;
  readonly segments: readonly Segment[];
  /** Called once the device is closed and none of its storage calls is in flight. */
  readonly onClose: (device: VolumeDevice) => void;
}

/** Waits for every piece of a split request, then fails with the first error: no piece outlives its request. */
async function settleAll(pieces: readonly Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(pieces);
  for (const result of results) if (result.status === "rejected") throw result.reason;
}

export class VolumeDevice implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly volumeName: string;
  readonly partition: number | undefined;
  readonly admits: (volume: VolumeRecord) => boolean;
  readonly sizeBytes: number;
  readonly capabilities: BlockCapabilities;
  readonly #storage: Storage;
  readonly #segments: readonly Segment[];
  readonly #onClose: (device: VolumeDevice) => void;
  #revoked: IpsanError | undefined;
  #revokedListeners: ((error: IpsanError) => void)[] = [];
  #inFlight = 0;
  #drained: (() => void)[] = [];
  #closed = false;
  #closeReported = false;

  constructor(options: VolumeDeviceOptions) {
    this.name = options.name;
    this.description = options.description;
    this.volumeName = options.volumeName;
    this.partition = options.partition;
    this.admits = options.admits;
    this.#storage = options.storage;
    this.#segments = options.segments;
    this.#onClose = options.onClose;
    this.sizeBytes = options.segments.reduce((sum, s) => sum + s.lengthBytes, 0);
    const isFile = options.storage.kind === "file";
    this.capabilities = {
      readOnly: false,
      canFlush: true,
      canTrim: true,
      canZero: true,
      canFastZero: isFile,
      canFua: true,
      canCache: true,
      canExtents: isFile,
      // One fd for every connection: fdatasync on it covers all of them.
      canMultiConn: true,
    };
  }

  async read(buffer: Buffer, offsetBytes: number): Promise<void> {
    await this.#run("read", offsetBytes, buffer.length, (pieces) => {
      const only = pieces.length === 1 ? pieces[0] : undefined;
      if (only !== undefined) return this.#storage.read(buffer, 0, only.lengthBytes, only.storageOffset);
      return settleAll(pieces.map((p) => this.#storage.read(buffer, p.deviceOffset - offsetBytes, p.lengthBytes, p.storageOffset)));
    });
  }

  /** read() without a promise when the range is one storage piece and in the page cache (BlockDevice.readNow). */
  readNow(buffer: Buffer, offsetBytes: number): boolean {
    if (this.#revoked !== undefined || this.#closed) return false;
    const lengthBytes = buffer.length;
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || lengthBytes === 0 || offsetBytes + lengthBytes > this.sizeBytes) return false;
    const pieces = mapRange(this.#segments, offsetBytes, lengthBytes);
    const only = pieces.length === 1 ? pieces[0] : undefined;
    if (only === undefined) return false;
    this.#assertInside(only);
    return this.#storage.readNow(buffer, 0, only.lengthBytes, only.storageOffset);
  }

  /** BlockDevice.sendNow: a READ reply by sendfile when the range is one storage piece and in the page cache. */
  sendNow(socketFd: number, header: Buffer, offsetBytes: number, lengthBytes: number): number {
    if (this.#revoked !== undefined || this.#closed) return -1;
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || lengthBytes <= 0 || offsetBytes + lengthBytes > this.sizeBytes) return -1;
    const pieces = mapRange(this.#segments, offsetBytes, lengthBytes);
    const only = pieces.length === 1 ? pieces[0] : undefined;
    if (only === undefined) return -1;
    this.#assertInside(only);
    return this.#storage.sendNow(socketFd, header, only.lengthBytes, only.storageOffset);
  }

  /** BlockDevice.readSync: the rest of a reply sendNow started (one storage piece, as sendNow needs). */
  readSync(buffer: Buffer, offsetBytes: number): void {
    const lengthBytes = buffer.length;
    const pieces = mapRange(this.#segments, offsetBytes, lengthBytes);
    const only = pieces.length === 1 ? pieces[0] : undefined;
    assert(only !== undefined, `readSync of ${lengthBytes} bytes at ${offsetBytes} spans ${pieces.length} storage pieces`);
    this.#assertInside(only);
    this.#storage.readSync(buffer, 0, lengthBytes, only.storageOffset);
  }

  /** A write (no FUA) without a promise when the range is one storage piece and the page cache takes it now (BlockDevice.writeNow). */
  writeNow(parts: readonly Buffer[], offsetBytes: number): boolean {
    if (this.#revoked !== undefined || this.#closed || parts.length > WRITEV_PARTS_MAX) return false;
    let lengthBytes = 0;
    for (const part of parts) lengthBytes += part.length;
    if (!Number.isSafeInteger(offsetBytes) || offsetBytes < 0 || lengthBytes === 0 || offsetBytes + lengthBytes > this.sizeBytes) return false;
    const pieces = mapRange(this.#segments, offsetBytes, lengthBytes);
    const only = pieces.length === 1 ? pieces[0] : undefined;
    if (only === undefined) return false;
    this.#assertInside(only);
    return this.#storage.writeNow(parts, lengthBytes, only.storageOffset);
  }

  async write(buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void> {
    await this.#run("write", offsetBytes, buffer.length, async (pieces) => {
      const only = pieces.length === 1 ? pieces[0] : undefined;
      if (only !== undefined) await this.#writePiece(buffer, 0, only, fua);
      else await settleAll(pieces.map((p) => this.#writePiece(buffer, p.deviceOffset - offsetBytes, p, fua)));
    });
  }

  /** Writes `buffer[from, from + piece.lengthBytes)` to one storage piece; with FUA range-synced (Storage.writeDurable), never an fdatasync of the whole storage. */
  #writePiece(buffer: Buffer, from: number, piece: Piece, fua: boolean): Promise<void> {
    if (fua) return this.#storage.writeDurable([buffer.subarray(from, from + piece.lengthBytes)], piece.lengthBytes, piece.storageOffset);
    return this.#storage.write(buffer, from, piece.lengthBytes, piece.storageOffset);
  }

  /** write() of the concatenation of `parts`, without concatenating them when the range is one storage piece. */
  async writev(parts: readonly Buffer[], offsetBytes: number, fua: boolean): Promise<void> {
    let lengthBytes = 0;
    for (const part of parts) lengthBytes += part.length;
    await this.#run("write", offsetBytes, lengthBytes, async (pieces) => {
      const only = pieces.length === 1 ? pieces[0] : undefined;
      if (only !== undefined && parts.length <= WRITEV_PARTS_MAX) {
        await (fua ? this.#storage.writeDurable(parts, lengthBytes, only.storageOffset) : this.#storage.writev(parts, lengthBytes, only.storageOffset));
      } else {
        // Spans extents (rare): gather once and split as write() does.
        const buffer = Buffer.concat(parts, lengthBytes);
        await settleAll(pieces.map((p) => this.#writePiece(buffer, p.deviceOffset - offsetBytes, p, fua)));
      }
    });
  }

  async flush(): Promise<void> {
    await this.#run("flush", 0, 0, () => this.#storage.sync());
  }

  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    await this.#run("trim", offsetBytes, lengthBytes, async (pieces) => {
      for (const p of pieces) await this.#storage.discard(p.storageOffset, p.lengthBytes);
      if (fua) await this.#storage.sync();
    });
  }

  async zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    await this.#run("zero", offsetBytes, lengthBytes, async (pieces) => {
      for (const p of pieces) {
        const done = await this.#storage.zero(p.storageOffset, p.lengthBytes, options.mayTrim, options.fastOnly);
        if (!done) {
          throw new IpsanError("NOT_SUPPORTED", `fast zero not possible: export=${this.name} offset=${offsetBytes} length=${lengthBytes}`);
        }
      }
      if (options.fua) await this.#storage.sync();
    });
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    // A hint only: the kernel page cache does the caching; the range is still validated.
    await this.#run("cache", offsetBytes, lengthBytes, async () => {});
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<readonly Extent[]> {
    const runs: Extent[] = [];
    await this.#run("block status", offsetBytes, lengthBytes, async (pieces) => {
      if (!this.capabilities.canExtents) {
        runs.push({ lengthBytes, hole: false, zero: false });
        return;
      }
      for (const p of pieces) {
        if (!(await this.#pieceExtents(p, runs))) break;
      }
    });
    return runs;
  }

  /** Appends the runs of one piece; false once EXTENT_RUNS_MAX is reached. */
  async #pieceExtents(piece: Piece, runs: Extent[]): Promise<boolean> {
    const end = piece.storageOffset + piece.lengthBytes;
    let position = piece.storageOffset;
    while (position < end) {
      if (runs.length >= EXTENT_RUNS_MAX) return false;
      const data = await this.#storage.seekData(position);
      let runEnd: number;
      let hole: boolean;
      if (data === undefined || data > position) {
        hole = true;
        runEnd = Math.min(data ?? end, end);
      } else {
        hole = false;
        runEnd = Math.min(await this.#storage.seekHole(position), end);
      }
      assert(runEnd > position, `extent scan advances at ${position}`);
      const last = runs[runs.length - 1];
      if (last !== undefined && last.hole === hole) {
        runs[runs.length - 1] = { lengthBytes: last.lengthBytes + (runEnd - position), hole, zero: hole };
      } else {
        runs.push({ lengthBytes: runEnd - position, hole, zero: hole });
      }
      position = runEnd;
    }
    return true;
  }

  async #run(what: string, offsetBytes: number, lengthBytes: number, body: (pieces: Piece[]) => Promise<void>): Promise<void> {
    if (this.#revoked !== undefined) throw this.#revoked;
    if (this.#closed) throw new IpsanError("UNAVAILABLE", `export ${this.name} used after close`);
    if (
      !Number.isSafeInteger(offsetBytes) ||
      !Number.isSafeInteger(lengthBytes) ||
      offsetBytes < 0 ||
      lengthBytes < 0 ||
      offsetBytes + lengthBytes > this.sizeBytes
    ) {
      throw new IpsanError(
        "OUT_OF_RANGE",
        `${what} out of range: export=${this.name} offset=${offsetBytes} length=${lengthBytes} size=${this.sizeBytes}`,
      );
    }
    const pieces = lengthBytes === 0 ? [] : mapRange(this.#segments, offsetBytes, lengthBytes);
    for (const p of pieces) this.#assertInside(p);
    this.#inFlight += 1;
    try {
      await body(pieces);
    } finally {
      this.#inFlight -= 1;
      if (this.#inFlight === 0) this.#settled();
    }
  }

  #settled(): void {
    for (const wake of this.#drained.splice(0)) wake();
    if (this.#closed && !this.#closeReported) {
      this.#closeReported = true;
      this.#onClose(this);
    }
  }

  #assertInside(piece: Piece): void {
    const inside = this.#segments.some(
      (s) => piece.storageOffset >= s.storageStart && piece.storageOffset + piece.lengthBytes <= s.storageStart + s.lengthBytes,
    );
    assert(inside, `export ${this.name}: piece ${piece.storageOffset}+${piece.lengthBytes} outside its extents`);
  }

  /** The storage runs this device maps (fixed when it was opened). */
  get segments(): readonly Segment[] {
    return this.#segments;
  }

  /**
   * Fails every later request with `error` (synchronously: from the next
   * call on), tells the onRevoked listeners, and resolves once the storage
   * calls in flight have settled.
   */
  revoke(error: IpsanError): Promise<void> {
    if (this.#revoked === undefined) {
      this.#revoked = error;
      for (const listener of this.#revokedListeners.splice(0)) {
        try {
          listener(error);
        } catch {
          // A listener's failure is its own; the revocation stands.
        }
      }
    }
    return this.drained();
  }

  /** Resolves when no storage call of this device is in flight. */
  drained(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drained.push(resolve));
  }

  /** BlockDevice.onRevoked: `listener` is called once when the device is revoked (at once if it already is). */
  onRevoked(listener: (error: Error) => void): void {
    if (this.#revoked !== undefined) listener(this.#revoked);
    else this.#revokedListeners.push(listener);
  }

  get revoked(): boolean {
    return this.#revoked !== undefined;
  }

  /** Closed by its frontend (it may still have storage calls in flight). */
  get closed(): boolean {
    return this.#closed;
  }

  /** Closes the device; it leaves its manager once its last storage call has settled. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#revokedListeners = [];
    if (this.#inFlight === 0) this.#settled();
  }
}
