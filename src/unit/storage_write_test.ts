// A write that "succeeds" with 0 bytes (no error, no progress) must fail
// with an EIO-style error naming the offset instead of being retried
// forever: writeFull (fs.write), writevFull (fs.writev), writevSyncFull
// (fs.writevSync) and Storage.write's synchronous loop (fs.writeSync).
// storage.ts calls node:fs through its ES module namespace, so the test
// swaps the fs function and publishes the swap with syncBuiltinESMExports.
// Each fake gives up after a few hundred calls, so a loop that does not
// check for progress fails the test instead of hanging it.

import { after, afterEach, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import { syncBuiltinESMExports } from "node:module";
import { makeTempDir } from "../testing/tmp.ts";
import { Storage, writeFull, writevFull, writevSyncFull } from "./storage.ts";

const dir = makeTempDir("storage-write");
const fd = fs.openSync(dir.file("storage.img"), "w+");
fs.ftruncateSync(fd, 1024 * 1024);
after(() => {
  fs.closeSync(fd);
  dir.remove();
});

const CALLS_MAX = 300;
const SPUN = "the write loop kept retrying a 0-byte write";
type Writer = "write" | "writev" | "writeSync" | "writevSync";
const originals = new Map<Writer, unknown>();

/** Replaces fs[name] with a fake that writes nothing (0 bytes, no error) and counts its calls. */
function zeroWrites(name: Writer): { calls: number } {
  const counter = { calls: 0 };
  if (!originals.has(name)) originals.set(name, fs[name]);
  const fake = (...args: unknown[]): number => {
    counter.calls++;
    const callback = args.at(-1);
    if (typeof callback === "function") {
      process.nextTick(() => (callback as (error: Error | null, written: number) => void)(counter.calls > CALLS_MAX ? new Error(SPUN) : null, 0));
      return 0;
    }
    if (counter.calls > CALLS_MAX) throw new Error(SPUN);
    return 0;
  };
  (fs as unknown as Record<Writer, unknown>)[name] = fake;
  syncBuiltinESMExports();
  return counter;
}

afterEach(() => {
  for (const [name, original] of originals) (fs as unknown as Record<Writer, unknown>)[name] = original;
  originals.clear();
  syncBuiltinESMExports();
});

const EIO_AT = (offset: number) => ({ code: "EIO", syscall: "write", message: new RegExp(`write at offset ${offset} made no progress`) });

test("writeFull: a 0-byte fs.write fails with EIO naming the offset", async () => {
  const fake = zeroWrites("write");
  await assert.rejects(writeFull(fd, Buffer.alloc(4096, 1), 0, 4096, 8192), EIO_AT(8192));
  assert.equal(fake.calls, 1);
});

test("writevFull: a 0-byte fs.writev fails with EIO naming the offset", async () => {
  const fake = zeroWrites("writev");
  await assert.rejects(writevFull(fd, [Buffer.alloc(512, 1), Buffer.alloc(512, 2)], 1024, 4096), EIO_AT(4096));
  assert.equal(fake.calls, 1);
});

test("writevSyncFull: a 0-byte fs.writevSync fails with EIO naming the offset", () => {
  const fake = zeroWrites("writevSync");
  assert.throws(() => writevSyncFull(fd, [Buffer.alloc(512, 1)], 512, 65536), EIO_AT(65536));
  assert.equal(fake.calls, 1);
});

test("Storage.write: a 0-byte write fails with EIO naming the offset", async (t) => {
  // Whichever path write() takes (RWF_NOWAIT, then the synchronous loop, or the pool), none may spin.
  const sync = zeroWrites("writeSync");
  const pool = zeroWrites("write");
  const storage = new Storage(fd, dir.file("storage.img"), "file", 1024 * 1024);
  const outcome = await storage.write(Buffer.alloc(4096, 3), 0, 4096, 12288).then(
    () => undefined,
    (error: unknown) => error,
  );
  if (outcome === undefined) return t.skip("pwritev2(RWF_NOWAIT) wrote everything; no loop was reached");
  const error = outcome as NodeJS.ErrnoException;
  assert.ok(error instanceof Error, String(outcome));
  assert.equal(error.code, "EIO");
  assert.match(error.message, /write at offset 12288 made no progress/);
  assert.equal(sync.calls + pool.calls, 1, "one write call, not a retry loop");
});
