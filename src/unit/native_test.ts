// Hostile arguments to the native addon (src/native/ipsan_io.cc, typed in
// native.ts). An fd of 2^32 + a real fd is refused instead of acting on the
// real fd (the file is checked byte for byte, and its lock stays free); bad
// offsets, lengths, modes and whences (negative, NaN, fractional, past 2^53,
// not numbers, sums past 2^53) are refused naming the argument; the buffer
// list of pwritevNoWait must be a plain Array of 1..IOV_COUNT_MAX attached
// Uint8Arrays, and a getter in it (or on Array.prototype behind a hole) that
// detaches a buffer fetched before it is caught instead of leaving a
// dangling pointer. The promise-returning calls never throw: each returns a
// promise that rejects for bad input. Good input still works.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { makeTempDir } from "../testing/tmp.ts";
import { ipsanIo, type IpsanIo } from "./native.ts";

const io = ipsanIo();
const dir = makeTempDir("native");
const fds: number[] = [];
after(() => {
  for (const fd of fds) closeSync(fd);
  dir.remove();
});

const FILE_BYTES = 8192;
const PATTERN = 0x55;
const SAFE_MAX = Number.MAX_SAFE_INTEGER;
const INT_MAX = 2 ** 31 - 1;

/** A new file of FILE_BYTES bytes of PATTERN, open read-write. */
function patternFile(name: string): { path: string; fd: number } {
  const path = dir.file(name);
  writeFileSync(path, Buffer.alloc(FILE_BYTES, PATTERN));
  const fd = openSync(path, "r+");
  fds.push(fd);
  return { path, fd };
}

function assertUnchanged(path: string): void {
  assert.deepEqual(readFileSync(path), Buffer.alloc(FILE_BYTES, PATTERN), `${path} did not change`);
}

/** Detaches the ArrayBuffer under `bytes` by transferring it (Node 20 has no ArrayBuffer.prototype.transfer). */
function detach(bytes: Uint8Array): void {
  structuredClone(bytes.buffer, { transfer: [bytes.buffer] });
}

/** Calls an addon function with arguments its type would not allow. */
function call(name: keyof IpsanIo, ...args: unknown[]): unknown {
  return (io[name] as unknown as (...args: unknown[]) => unknown)(...args);
}

const RANGE = { name: "RangeError", code: "ERR_OUT_OF_RANGE" };
const TYPE = { name: "TypeError", code: "ERR_INVALID_ARG_TYPE" };
const DETACHED = { name: "TypeError", code: "ERR_INVALID_ARG_VALUE" };

/** The call returns a promise instead of throwing, and that promise rejects like `expected`. */
async function rejects(name: keyof IpsanIo, args: readonly unknown[], expected: object): Promise<void> {
  let result: unknown;
  assert.doesNotThrow(() => {
    result = call(name, ...args);
  }, `${name}(${args.map(String).join(", ")}) must reject, not throw`);
  assert.ok(result instanceof Promise, `${name} returns a promise`);
  await assert.rejects(result, expected, `${name}(${args.map(String).join(", ")})`);
}

/** Values no integer argument accepts, as [value, expected error]. */
const NOT_INTEGERS: readonly (readonly [unknown, object])[] = [
  [-1, RANGE],
  [Number.NaN, RANGE],
  [0.5, RANGE],
  [Number.POSITIVE_INFINITY, RANGE],
  [2 ** 53, RANGE],
  [2 ** 64 + 3, RANGE],
  ["0", TYPE],
  [1n, TYPE],
  [undefined, TYPE],
  [null, TYPE],
];

test("an fd of 2^32 + a real fd is refused, and the real fd is left alone", async () => {
  const { path, fd } = patternFile("fd.img");
  const wrapped = 2 ** 32 + fd;
  const message = new RegExp(`fd must be an integer in \\[0, 2147483647\\], got ${wrapped}$`);
  const punch = io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE;
  // Settle each promise first and look at the file, so a build that narrows the fd shows the damage.
  const outcomes = await Promise.all([
    io.fallocate(wrapped, punch, 0, FILE_BYTES).then(() => "resolved", (error: unknown) => error),
    io.fallocate(wrapped, io.FALLOC_FL_ZERO_RANGE | io.FALLOC_FL_KEEP_SIZE, 0, FILE_BYTES).then(() => "resolved", (error: unknown) => error),
  ]);
  let written: unknown;
  try {
    written = io.pwriteNoWait(wrapped, Buffer.alloc(16, 0xaa), 0, 16, 0);
  } catch (error) {
    written = error;
  }
  assertUnchanged(path);
  for (const outcome of [...outcomes, written]) {
    assert.ok(outcome instanceof RangeError, `refused, got ${String(outcome)}`);
    assert.match(outcome.message, message);
  }

  assert.throws(() => io.pwritevNoWait(wrapped, [Buffer.alloc(16, 0xaa)], 0), { ...RANGE, message });
  const into = Buffer.alloc(16);
  assert.throws(() => io.preadNoWait(wrapped, into, 0, 16, 0), { ...RANGE, message });
  assert.deepEqual(into, Buffer.alloc(16), "nothing was read from the real fd");
  await rejects("lseek", [wrapped, 0, io.SEEK_END], { ...RANGE, message });
  await rejects("blkGetSize64", [wrapped], { ...RANGE, message });
  await rejects("blkDiscard", [wrapped, 0, 4096], { ...RANGE, message });
  await rejects("blkZeroOut", [wrapped, 0, 4096], { ...RANGE, message });

  // flock on the wrapped fd must not take the real fd's lock: another open file description still gets it.
  assert.throws(() => io.flock(wrapped, true), { ...RANGE, message });
  const other = openSync(path, "r");
  fds.push(other);
  assert.equal(io.flock(other, true), 0, "the lock was still free");
  assertUnchanged(path);
});

test("fds outside [0, INT_MAX] or not integers are refused by every call", async () => {
  for (const [fd, expected] of [...NOT_INTEGERS, [INT_MAX + 1, RANGE] as const, [-(2 ** 32) + 3, RANGE] as const]) {
    assert.throws(() => call("flock", fd, true), expected, `flock fd ${String(fd)}`);
    assert.throws(() => call("preadNoWait", fd, Buffer.alloc(1), 0, 1, 0), expected);
    assert.throws(() => call("pwriteNoWait", fd, Buffer.alloc(1), 0, 1, 0), expected);
    assert.throws(() => call("pwritevNoWait", fd, [Buffer.alloc(1)], 0), expected);
    await rejects("fallocate", [fd, io.FALLOC_FL_KEEP_SIZE, 0, 1], expected);
    await rejects("lseek", [fd, 0, io.SEEK_SET], expected);
    await rejects("blkGetSize64", [fd], expected);
    await rejects("blkDiscard", [fd, 0, 1], expected);
    await rejects("blkZeroOut", [fd, 0, 1], expected);
  }
  await rejects("fallocate", [], TYPE);
});

test("bad offsets and lengths are refused naming the argument; the file is untouched", async () => {
  const { path, fd } = patternFile("ranges.img");
  const buffer = Buffer.alloc(16, 0xaa);
  for (const [bad, expected] of NOT_INTEGERS) {
    for (const name of ["preadNoWait", "pwriteNoWait"] as const) {
      assert.throws(() => call(name, fd, buffer, bad, 1, 0), { ...expected, message: /bufferOffset must be an integer/ });
      assert.throws(() => call(name, fd, buffer, 0, bad, 0), { ...expected, message: /length must be an integer/ });
      assert.throws(() => call(name, fd, buffer, 0, 1, bad), { ...expected, message: /position must be an integer/ });
    }
    assert.throws(() => call("pwritevNoWait", fd, [buffer], bad), { ...expected, message: /position must be an integer/ });
    const punch = io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE;
    await rejects("fallocate", [fd, punch, bad, 4096], { ...expected, message: /fallocate: offset must be an integer/ });
    await rejects("fallocate", [fd, punch, 0, bad], { ...expected, message: /fallocate: length must be an integer/ });
    await rejects("fallocate", [fd, bad, 0, 4096], { ...expected, message: /fallocate: mode must be an integer/ });
    await rejects("lseek", [fd, bad, io.SEEK_DATA], { ...expected, message: /lseek: offset must be an integer/ });
    await rejects("lseek", [fd, 0, bad], { ...expected, message: /lseek: whence must be an integer/ });
    for (const name of ["blkDiscard", "blkZeroOut"] as const) {
      await rejects(name, [fd, bad, 4096], { ...expected, message: new RegExp(`${name}: offset must be an integer`) });
      await rejects(name, [fd, 0, bad], { ...expected, message: new RegExp(`${name}: length must be an integer`) });
    }
  }
  // Each value alone is fine, the sum is not.
  for (const name of ["preadNoWait", "pwriteNoWait"] as const) {
    assert.throws(() => call(name, fd, buffer, 8, 9, 0), { ...RANGE, message: /bufferOffset \+ length must be at most 16, got 8 \+ 9/ });
    assert.throws(() => call(name, fd, buffer, 17, 0, 0), { ...RANGE, message: /bufferOffset \+ length must be at most 16/ });
    assert.throws(() => call(name, fd, buffer, 0, 16, SAFE_MAX - 15), { ...RANGE, message: /position \+ length must be at most 9007199254740991/ });
  }
  assert.throws(() => io.pwritevNoWait(fd, [buffer, buffer], SAFE_MAX - 20), { ...RANGE, message: /position \+ total length must be at most/ });
  await rejects("fallocate", [fd, io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE, SAFE_MAX, 1], { ...RANGE, message: /offset \+ length must be at most/ });
  await rejects("blkDiscard", [fd, 2 ** 52, 2 ** 52], { ...RANGE, message: /offset \+ length must be at most/ });
  await rejects("blkZeroOut", [fd, 1, SAFE_MAX], { ...RANGE, message: /offset \+ length must be at most/ });
  assertUnchanged(path);
});

test("fallocate modes and lseek whences outside the exported constants are refused", async () => {
  const { path, fd } = patternFile("modes.img");
  // COLLAPSE_RANGE (8) and INSERT_RANGE (0x20) would shift the data; UNSHARE_RANGE is 0x40; NO_HIDE_STALE 4.
  for (const mode of [4, 8, 0x20, 0x40, 0x100, io.FALLOC_FL_PUNCH_HOLE | 8, 2 ** 31, -3]) {
    await rejects("fallocate", [fd, mode, 0, 4096], { ...RANGE, message: /fallocate: mode must/ });
  }
  for (const whence of [1, 5, 255, -1, 2 ** 32 + io.SEEK_END]) {
    await rejects("lseek", [fd, 0, whence], { ...RANGE, message: /lseek: whence must/ });
  }
  assertUnchanged(path);
});

test("flock wants a boolean", () => {
  const { fd } = patternFile("flock.img");
  for (const exclusive of [1, 0, "true", undefined, null, {}]) {
    assert.throws(() => call("flock", fd, exclusive), { ...TYPE, message: /flock: exclusive must be a boolean/ });
  }
});

test("pwritevNoWait wants a plain Array of 1..IOV_COUNT_MAX buffers", () => {
  const { path, fd } = patternFile("list.img");
  const part = Buffer.alloc(16, 0xaa);
  for (const list of [part, { length: 1, 0: part }, null, undefined, "abc", new Set([part])]) {
    assert.throws(() => call("pwritevNoWait", fd, list, 0), { ...TYPE, message: /buffers must be an Array/ });
  }
  assert.throws(() => io.pwritevNoWait(fd, [], 0), { ...RANGE, message: /buffers must hold 1 to 1024 buffers, got 0/ });
  const tooMany = new Array<Buffer>(io.IOV_COUNT_MAX + 1).fill(Buffer.alloc(1));
  assert.throws(() => io.pwritevNoWait(fd, tooMany, 0), { ...RANGE, message: /got 1025/ });
  const lengthOnly: Buffer[] = [];
  lengthOnly.length = 2 ** 32 - 1;
  assert.throws(() => io.pwritevNoWait(fd, lengthOnly, 0), RANGE);

  // A Proxy is not an Array to node-api, so none of its traps runs.
  const trapped: string[] = [];
  const proxy = new Proxy([part], {
    get: (target, key, receiver) => {
      trapped.push(String(key));
      return Reflect.get(target, key, receiver) as unknown;
    },
  });
  assert.throws(() => io.pwritevNoWait(fd, proxy, 0), { ...TYPE, message: /buffers must be an Array, got an object/ });
  assert.deepEqual(trapped, []);

  const others: readonly unknown[] = ["abc", 1, {}, null, undefined, new Float64Array(2), new Uint16Array(2), new DataView(new ArrayBuffer(2)), new ArrayBuffer(2), [part]];
  for (const other of others) {
    assert.throws(() => call("pwritevNoWait", fd, [part, other], 0), { ...TYPE, message: /buffers\[1\] must be a Buffer or Uint8Array/ });
    assert.throws(() => call("pwriteNoWait", fd, other, 0, 0, 0), { ...TYPE, message: /buffer must be a Buffer or Uint8Array/ });
    assert.throws(() => call("preadNoWait", fd, other, 0, 0, 0), { ...TYPE, message: /buffer must be a Buffer or Uint8Array/ });
  }
  const holey = [part];
  holey[2] = part; // index 1 is a hole
  assert.throws(() => io.pwritevNoWait(fd, holey, 0), { ...TYPE, message: /buffers\[1\] must be a Buffer or Uint8Array, got undefined/ });

  // 1024 buffers, a plain Uint8Array and an empty buffer are all fine (written, or a -errno like -EOPNOTSUPP).
  const full = new Array<Buffer>(io.IOV_COUNT_MAX).fill(Buffer.alloc(1, 0x55));
  assert.equal(typeof io.pwritevNoWait(fd, full, 0), "number");
  assert.equal(typeof io.pwritevNoWait(fd, [new Uint8Array(4).fill(0x55) as Buffer, Buffer.alloc(0)], 0), "number");
  assertUnchanged(path);
});

test("detached buffers are refused, also when a getter detaches one fetched before it", () => {
  const { path, fd } = patternFile("detached.img");
  const gone = Buffer.alloc(16, 0xaa);
  detach(gone);
  assert.equal(gone.length, 0);
  assert.throws(() => io.pwriteNoWait(fd, gone, 0, 0, 0), { ...DETACHED, message: /pwriteNoWait: buffer is detached/ });
  assert.throws(() => io.preadNoWait(fd, gone, 0, 0, 0), { ...DETACHED, message: /preadNoWait: buffer is detached/ });
  assert.throws(() => io.pwritevNoWait(fd, [Buffer.alloc(4, PATTERN), gone], 0), { ...DETACHED, message: /buffers\[1\] is detached/ });

  // An accessor on the array transfers buffers[0] away while buffers[1] is fetched.
  const first = Buffer.alloc(4096, 0xaa);
  const list = [first];
  let ran = 0;
  Object.defineProperty(list, 1, {
    enumerable: true,
    get: () => {
      ran++;
      detach(first);
      return Buffer.alloc(4096, 0xbb);
    },
  });
  assert.throws(() => io.pwritevNoWait(fd, list, 0), { ...DETACHED, message: /pwritevNoWait: buffers\[0\] is detached/ });
  assert.equal(ran, 1, "the getter ran once");

  // The same through a hole: fetching it reads Array.prototype[1] (installed
  // only around the call, since every array without an index 1 sees it).
  const second = Buffer.alloc(4096, 0xaa);
  const holey = [second];
  holey[2] = Buffer.alloc(1);
  let refused: unknown;
  Object.defineProperty(Array.prototype, 1, {
    configurable: true,
    get: () => {
      if (second.buffer.byteLength > 0) detach(second);
      return Buffer.alloc(4096, 0xbb);
    },
  });
  try {
    io.pwritevNoWait(fd, holey, 0);
  } catch (error) {
    refused = error;
  } finally {
    delete (Array.prototype as unknown as Record<number, unknown>)[1];
  }
  assert.equal(second.length, 0, "the prototype getter ran");
  assert.throws(() => {
    throw refused;
  }, { ...DETACHED, message: /buffers\[0\] is detached/ });

  // A getter that throws: its error comes through as it is.
  const throwing = [Buffer.alloc(1)];
  Object.defineProperty(throwing, 1, {
    get: () => {
      throw new Error("getter says no");
    },
  });
  assert.throws(() => io.pwritevNoWait(fd, throwing, 0), /getter says no/);
  assertUnchanged(path);
});

test("good arguments still work", async () => {
  const { path, fd } = patternFile("good.img");
  assert.equal(await io.lseek(fd, 0, io.SEEK_END), FILE_BYTES);
  assert.equal(await io.lseek(fd, 0, io.SEEK_DATA), 0);
  const into = Buffer.alloc(FILE_BYTES);
  const read = io.preadNoWait(fd, into, 0, FILE_BYTES, 0);
  assert.ok(read === FILE_BYTES || read === -io.EAGAIN, `preadNoWait: ${read}`);
  if (read === FILE_BYTES) assert.deepEqual(into, Buffer.alloc(FILE_BYTES, PATTERN));
  assert.equal(io.flock(fd, false), 0);
  await io.fallocate(fd, io.FALLOC_FL_PUNCH_HOLE | io.FALLOC_FL_KEEP_SIZE, 0, 4096);
  const now = readFileSync(path);
  assert.deepEqual(now.subarray(0, 4096), Buffer.alloc(4096), "the first 4 KiB were punched");
  assert.deepEqual(now.subarray(4096), Buffer.alloc(FILE_BYTES - 4096, PATTERN));
  await assert.rejects(io.blkGetSize64(fd), { code: "ENOTTY", syscall: "ioctl(BLKGETSIZE64)" });
});
