// A small pool of read-reply buffers, so the hot path (4 KiB to 1 MiB reads)
// does not allocate, fault in and garbage-collect a fresh ArrayBuffer per
// request. A
// buffer goes back to the pool only when the socket has finished writing it
// (the session releases in write-completion order), and never after a failed
// read (a device might still be writing into it). Size classes are powers of
// two with a bounded number of idle buffers each, and the pool never holds
// more than POOL_IDLE_BYTES_MAX idle; larger requests get a fresh buffer.
// Write payloads that arrive split over socket chunks are gathered into
// pooled buffers too, and given back after a successful device write.

import { assert } from "../util/assert.ts";

/** Room for the largest read-reply header (structured chunk header + offset). */
export const REPLY_HEADER_BYTES_MAX = 28;
const CLASS_MIN_BYTES = 4096;
const CLASS_MAX_BYTES = 1024 * 1024;
const CLASS_COUNT = Math.log2(CLASS_MAX_BYTES / CLASS_MIN_BYTES) + 1;
/** Idle buffers kept per size class (fio QD 16 and nbdcopy's 64 requests fit). */
const CLASS_IDLE_COUNT_MAX = 64;
/** Idle bytes kept over all classes: a fresh 1 MiB buffer costs ~100 us of page faults, a pooled one nothing. */
export const POOL_IDLE_BYTES_MAX = 16 * 1024 * 1024;

export class BufferPool {
  /** Idle backing buffers per class; class i holds REPLY_HEADER_BYTES_MAX + (CLASS_MIN_BYTES << i) bytes. */
  private readonly idle: Buffer[][] = Array.from({ length: CLASS_COUNT }, () => []);
  /** Backing stores this pool made: only these are ever taken back. */
  private readonly owned = new WeakSet<ArrayBufferLike>();
  private idleBytes = 0;

  private static classOf(dataBytes: number): number {
    if (dataBytes > CLASS_MAX_BYTES) return -1;
    let index = 0;
    while (CLASS_MIN_BYTES << index < dataBytes) index += 1;
    return index;
  }

  /** A buffer of exactly headerBytes + dataBytes bytes. */
  acquire(headerBytes: number, dataBytes: number): Buffer {
    assert(headerBytes <= REPLY_HEADER_BYTES_MAX, `header of ${headerBytes} bytes`);
    const index = BufferPool.classOf(dataBytes);
    if (index < 0) return Buffer.allocUnsafeSlow(headerBytes + dataBytes);
    let backing = this.idle[index]?.pop();
    if (backing !== undefined) this.idleBytes -= backing.length;
    else {
      backing = Buffer.allocUnsafeSlow(REPLY_HEADER_BYTES_MAX + (CLASS_MIN_BYTES << index));
      this.owned.add(backing.buffer);
    }
    return backing.subarray(0, headerBytes + dataBytes);
  }

  /** Takes back a buffer from acquire() once nothing refers to its bytes; ignores any other buffer. */
  release(view: Buffer): void {
    const store = view.buffer;
    if (!this.owned.has(store)) return;
    const index = BufferPool.classOf(store.byteLength - REPLY_HEADER_BYTES_MAX);
    const list = this.idle[index];
    if (list === undefined || list.length >= CLASS_IDLE_COUNT_MAX || this.idleBytes + store.byteLength > POOL_IDLE_BYTES_MAX) return;
    this.idleBytes += store.byteLength;
    list.push(Buffer.from(store, 0, store.byteLength));
  }

  /** Idle buffers held (for tests). */
  get idleCount(): number {
    return this.idle.reduce((sum, list) => sum + list.length, 0);
  }
}
