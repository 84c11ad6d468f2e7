// What this proves: the reply-buffer pool hands out buffers of exactly the
// asked length, reuses a released buffer of the same size class, never takes
// in a buffer it did not make (a socket chunk, a Node pool slab), and keeps
// its idle memory under POOL_IDLE_BYTES_MAX however much is released.

import assert from "node:assert/strict";
import { test } from "node:test";
import { BufferPool, POOL_IDLE_BYTES_MAX } from "./buffer_pool.ts";

test("acquire gives exact lengths and reuses released buffers of the same class", () => {
  const pool = new BufferPool();
  const a = pool.acquire(16, 4096);
  assert.equal(a.length, 4112);
  pool.release(a);
  assert.equal(pool.idleCount, 1);
  const b = pool.acquire(28, 3000);
  assert.equal(b.length, 3028);
  assert.equal(b.buffer, a.buffer, "same backing store reused");
  assert.equal(pool.idleCount, 0);
  // A different class allocates anew.
  const c = pool.acquire(0, 65536);
  assert.notEqual(c.buffer, a.buffer);
  // Over the largest class: a plain buffer, never pooled.
  const big = pool.acquire(16, 2 * 1024 * 1024);
  assert.equal(big.length, 2 * 1024 * 1024 + 16);
  pool.release(big);
  assert.equal(pool.idleCount, 0);
});

test("release ignores buffers the pool did not make", () => {
  const pool = new BufferPool();
  pool.release(Buffer.allocUnsafe(16)); // Node's shared slab
  pool.release(Buffer.allocUnsafeSlow(4096 + 28)); // right size, foreign
  pool.release(Buffer.alloc(65536).subarray(100, 4196));
  assert.equal(pool.idleCount, 0);
});

test("idle memory stays under POOL_IDLE_BYTES_MAX", () => {
  const pool = new BufferPool();
  const held = Array.from({ length: 64 }, () => pool.acquire(28, 1024 * 1024));
  for (const buffer of held) pool.release(buffer);
  assert.ok(pool.idleCount * (1024 * 1024 + 28) <= POOL_IDLE_BYTES_MAX);
  assert.ok(pool.idleCount >= 8, "enough 1 MiB buffers for QD 8");
});
