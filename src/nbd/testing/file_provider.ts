// A small file-backed ExportProvider for the NBD engine's own in-process
// tests and for quick benchmarks: each export is a whole file. The real
// provider (volumes carved from a unit's storage, with grants) is the unit's.
// Extents: a sparse-aware map is not available from Node, so the whole range
// is reported as data, except ranges this provider itself trimmed or zeroed
// (tracked in memory), which are reported as holes that read as zeroes.

import { type FileHandle, open } from "node:fs/promises";
import type { BlockCapabilities, BlockDevice, ExportProvider, ExportSummary, Extent, Peer, ZeroOptions } from "../../block/types.ts";
import { IpsanError } from "../../util/errors.ts";

export interface FileExport {
  readonly name: string;
  readonly path: string;
  readonly sizeBytes: number;
  readonly description?: string;
  readonly readOnly?: boolean;
  /** Peers (addresses) allowed to open it; all when absent. */
  readonly allow?: readonly string[];
}

const ZERO_CHUNK_BYTES = 1024 * 1024;

export class FileExportProvider implements ExportProvider {
  private readonly exports = new Map<string, FileExport>();
  readonly defaultExport: string | undefined;
  /** Ranges known to read as zeroes, per export: [start, end) pairs, kept sorted and disjoint. */
  readonly zeroRanges = new Map<string, Array<[number, number]>>();
  openCount = 0;

  constructor(exports: readonly FileExport[], defaultExport?: string) {
    for (const entry of exports) this.exports.set(entry.name, entry);
    this.defaultExport = defaultExport;
  }

  private admitted(entry: FileExport, peer: Peer): boolean {
    return entry.allow === undefined || entry.allow.includes(peer.address);
  }

  list(peer: Peer): readonly ExportSummary[] {
    return [...this.exports.values()]
      .filter((entry) => this.admitted(entry, peer))
      .map((entry) => ({ name: entry.name, description: entry.description ?? "" }));
  }

  async open(name: string, peer: Peer): Promise<BlockDevice> {
    const entry = this.exports.get(name);
    if (entry === undefined) throw new IpsanError("NOT_FOUND", `export ${name} not found`);
    if (!this.admitted(entry, peer)) throw new IpsanError("PERMISSION_DENIED", `export ${name}: peer ${peer.address} not admitted`);
    const handle = await open(entry.path, entry.readOnly === true ? "r" : "r+");
    this.openCount += 1;
    return new FileDevice(this, entry, handle);
  }

  markZero(name: string, start: number, end: number): void {
    const ranges = (this.zeroRanges.get(name) ?? []).filter(([s, e]) => e < start || s > end);
    let newStart = start;
    let newEnd = end;
    for (const [s, e] of this.zeroRanges.get(name) ?? []) {
      if (!(e < start || s > end)) {
        newStart = Math.min(newStart, s);
        newEnd = Math.max(newEnd, e);
      }
    }
    ranges.push([newStart, newEnd]);
    ranges.sort((a, b) => a[0] - b[0]);
    this.zeroRanges.set(name, ranges);
  }

  markData(name: string, start: number, end: number): void {
    const out: Array<[number, number]> = [];
    for (const [s, e] of this.zeroRanges.get(name) ?? []) {
      if (e <= start || s >= end) out.push([s, e]);
      else {
        if (s < start) out.push([s, start]);
        if (e > end) out.push([end, e]);
      }
    }
    this.zeroRanges.set(name, out);
  }
}

class FileDevice implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly capabilities: BlockCapabilities;
  private readonly provider: FileExportProvider;
  private readonly handle: FileHandle;

  constructor(provider: FileExportProvider, entry: FileExport, handle: FileHandle) {
    this.provider = provider;
    this.handle = handle;
    this.name = entry.name;
    this.description = entry.description ?? "";
    this.sizeBytes = entry.sizeBytes;
    const readOnly = entry.readOnly === true;
    this.capabilities = {
      readOnly,
      canFlush: true,
      canTrim: true,
      canZero: true,
      canFastZero: true,
      canFua: true,
      canCache: true,
      canExtents: true,
      canMultiConn: true,
    };
  }

  private check(offsetBytes: number, lengthBytes: number): void {
    if (offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new IpsanError("OUT_OF_RANGE", `export ${this.name}: offset=${offsetBytes} length=${lengthBytes} size=${this.sizeBytes}`);
    }
  }

  async read(buffer: Buffer, offsetBytes: number): Promise<void> {
    this.check(offsetBytes, buffer.length);
    let done = 0;
    while (done < buffer.length) {
      const { bytesRead } = await this.handle.read(buffer, done, buffer.length - done, offsetBytes + done);
      if (bytesRead === 0) {
        buffer.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }

  async write(buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void> {
    this.check(offsetBytes, buffer.length);
    let done = 0;
    while (done < buffer.length) {
      const { bytesWritten } = await this.handle.write(buffer, done, buffer.length - done, offsetBytes + done);
      done += bytesWritten;
    }
    this.provider.markData(this.name, offsetBytes, offsetBytes + buffer.length);
    if (fua) await this.handle.datasync();
  }

  async flush(): Promise<void> {
    await this.handle.datasync();
  }

  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    await this.zero(offsetBytes, lengthBytes, { fua, mayTrim: true, fastOnly: false });
  }

  async zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    this.check(offsetBytes, lengthBytes);
    // Writing zeroes is as slow as a write: refuse fast-only requests above 1 MiB.
    if (options.fastOnly && lengthBytes > ZERO_CHUNK_BYTES) {
      throw new IpsanError("NOT_SUPPORTED", `export ${this.name}: zeroing ${lengthBytes} bytes is not fast`);
    }
    const zeroes = Buffer.alloc(Math.min(lengthBytes, ZERO_CHUNK_BYTES));
    for (let done = 0; done < lengthBytes; ) {
      const n = Math.min(zeroes.length, lengthBytes - done);
      await this.handle.write(zeroes, 0, n, offsetBytes + done);
      done += n;
    }
    if (options.mayTrim) this.provider.markZero(this.name, offsetBytes, offsetBytes + lengthBytes);
    else this.provider.markData(this.name, offsetBytes, offsetBytes + lengthBytes);
    if (options.fua) await this.handle.datasync();
  }

  async cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    this.check(offsetBytes, lengthBytes);
  }

  async extents(offsetBytes: number, lengthBytes: number): Promise<readonly Extent[]> {
    this.check(offsetBytes, lengthBytes);
    const end = offsetBytes + lengthBytes;
    const out: Extent[] = [];
    let at = offsetBytes;
    for (const [s, e] of this.provider.zeroRanges.get(this.name) ?? []) {
      if (e <= at || s >= end) continue;
      if (s > at) out.push({ lengthBytes: s - at, hole: false, zero: false });
      const holeEnd = Math.min(e, end);
      out.push({ lengthBytes: holeEnd - Math.max(s, at), hole: true, zero: true });
      at = holeEnd;
    }
    if (at < end) out.push({ lengthBytes: end - at, hole: false, zero: false });
    return out;
  }

  async close(): Promise<void> {
    this.provider.openCount -= 1;
    await this.handle.close();
  }
}
