// A queue of received byte chunks that decoders read from without touching a
// socket. Chunks are kept as they arrived (no concatenation on push); `take`
// returns a zero-copy subarray when the wanted bytes lie inside one chunk and
// copies only when they straddle chunks. Decoders peek at fixed-size headers
// first and take (consume) only whole frames, so any chunking decodes alike.

import { assert } from "../util/assert.ts";

export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private head = 0;
  private total = 0;
  /** Scratch for headers that straddle chunks (peekHeader). */
  private readonly scratch = Buffer.allocUnsafe(64);

  /** Bytes available to read. */
  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /**
   * The first `count` bytes (count <= 64), without consuming them. The result
   * is valid only until the next call on this queue (it may be the scratch).
   */
  peek(count: number): Buffer {
    assert(count <= this.scratch.length && count <= this.total, `peek ${count} of ${this.total}`);
    const first = this.chunks[0];
    assert(first !== undefined, "peek on empty queue");
    if (first.length - this.head >= count) return first.subarray(this.head, this.head + count);
    this.copyOut(this.scratch, count, false);
    return this.scratch.subarray(0, count);
  }

  /**
   * Consumes `count` bytes: a subarray of the received chunk when they lie in
   * one, else a copy into `allocate(count)` (default: a new Buffer).
   */
  take(count: number, allocate?: (bytes: number) => Buffer): Buffer {
    assert(count <= this.total, `take ${count} of ${this.total}`);
    if (count === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    assert(first !== undefined, "take on empty queue");
    if (first.length - this.head >= count) {
      const out = first.subarray(this.head, this.head + count);
      this.advance(count);
      return out;
    }
    const out = allocate === undefined ? Buffer.allocUnsafe(count) : allocate(count);
    assert(out.length === count, "allocate gave the wrong length");
    this.copyOut(out, count, true);
    return out;
  }

  /**
   * Consumes `count` bytes as subarrays of the chunks they lie in, in order
   * (no copy). Returns undefined, consuming nothing, when that would take
   * more than `partsMax` parts.
   */
  takeParts(count: number, partsMax: number): Buffer[] | undefined {
    assert(count > 0 && count <= this.total, `takeParts ${count} of ${this.total}`);
    const parts: Buffer[] = [];
    let left = count;
    let position = this.head;
    for (const chunk of this.chunks) {
      if (left === 0) break;
      if (parts.length >= partsMax) return undefined;
      const n = Math.min(chunk.length - position, left);
      parts.push(chunk.subarray(position, position + n));
      left -= n;
      position = 0;
    }
    assert(left === 0, "takeParts past end");
    this.advance(count);
    return parts;
  }

  /** Whether a queued chunk is a view of `store` (its memory may not be reused yet). */
  holds(store: ArrayBufferLike): boolean {
    for (const chunk of this.chunks) if (chunk.buffer === store) return true;
    return false;
  }

  /** Consumes and drops `count` bytes. */
  skip(count: number): void {
    assert(count <= this.total, `skip ${count} of ${this.total}`);
    this.advance(count);
  }

  /** Drops everything (the connection is going away). */
  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }

  private advance(count: number): void {
    let left = count;
    while (left > 0) {
      const first = this.chunks[0];
      assert(first !== undefined, "advance past end");
      const inFirst = first.length - this.head;
      if (inFirst > left) {
        this.head += left;
        break;
      }
      left -= inFirst;
      this.chunks.shift();
      this.head = 0;
    }
    this.total -= count;
  }

  private copyOut(target: Buffer, count: number, consume: boolean): void {
    let copied = 0;
    let index = 0;
    let position = this.head;
    while (copied < count) {
      const chunk = this.chunks[index];
      assert(chunk !== undefined, "copyOut past end");
      const n = Math.min(chunk.length - position, count - copied);
      chunk.copy(target, copied, position, position + n);
      copied += n;
      index += 1;
      position = 0;
    }
    if (consume) this.advance(count);
  }
}
