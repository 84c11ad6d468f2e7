// A unit reads each NBD connection's socket into a few read arenas and
// reuses one only when no write payload in flight views it
// (src/nbd/large_reads.ts, Session.mayReuseReadMemory). Writes whose device
// write goes through the thread pool hold their payload (views of an arena)
// while later bytes arrive; reusing that arena too early would overwrite
// the payload before it reaches the storage. Here every write goes through
// the thread pool (a build with the synchronous fast path turned off, which a
// unit also does under writeback throttling), 1 MiB writes with 16 in flight
// on one connection, and the volume is read back byte for byte. The canary
// is the same build with the reuse check ignoring payloads in flight: its
// read-back must differ.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { describeResult, run, runOk } from "../testing/process.ts";
import { type BuildEdit, patchedBuild } from "../testing/patched_build.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";

const MiB = 1024 * 1024;
const SIZE_BYTES = 96 * MiB;
const TIMEOUT_MS = 120_000;

const dir = makeTempDir("ipsan-arena-reuse-", memoryTmpBase());
after(() => dir.remove());

/** Every device write through the thread pool: the payload stays in use while the connection reads on. */
const THREAD_POOL_WRITES: BuildEdit = { file: "dist/unit/storage.js", from: "return this.#tickSpentMs < SYNC_IO_TICK_BUDGET_MS;", to: "return false;" };

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Writes SIZE_BYTES of random data through a unit of `ipsanBin` (16 x 1 MiB in flight, one connection); "ok" when it reads back the same. */
async function writeAndReadBack(name: string, ipsanBin: string): Promise<string> {
  const source = dir.file(`${name}-source.raw`);
  const data = randomBytes(SIZE_BYTES);
  writeFileSync(source, data);
  const unitDir = dir.file(`${name}-unit`);
  mkdirSync(unitDir);
  const unit = await startUnit({ dataDir: unitDir, capacity: SIZE_BYTES + 64 * MiB, volumes: [{ name: "v", size: SIZE_BYTES }], ipsanBin });
  try {
    await runOk("nbdcopy", ["--flush", `--request-size=${MiB}`, "--requests=16", "--connections=1", source, unit.uri("v")], { timeoutMs: TIMEOUT_MS });
    const copy = dir.file(`${name}-copy.raw`);
    const result = await run("nbdcopy", ["--connections=1", unit.uri("v"), copy], { timeoutMs: TIMEOUT_MS });
    if (result.code !== 0) return `nbdcopy read-back failed: ${describeResult(result)}`;
    return sha256(readFileSync(copy)) === sha256(data) ? "ok" : "bytes differ";
  } finally {
    await unit.stop();
  }
}

test("1 MiB writes, 16 in flight, all through the thread pool: every byte reads back", { timeout: 180_000 }, async () => {
  const build = patchedBuild("arena-reuse-pool", [THREAD_POOL_WRITES]);
  try {
    assert.equal(await writeAndReadBack("good", build.ipsanBin), "ok");
  } finally {
    build.remove();
  }
});

test("canary: reusing an arena that a write in flight still views corrupts the volume, and the read-back notices", { timeout: 180_000 }, async () => {
  const build = patchedBuild("arena-reuse-canary", [
    THREAD_POOL_WRITES,
    { file: "dist/nbd/session.js", from: '(store) => this.stateValue === "transmission" && !this.payloadViews.has(store) && !this.queue.holds(store);', to: '(store) => this.stateValue === "transmission" && !this.queue.holds(store);' },
    // One retired arena: the arena reused is the one read 2 MiB ago, likely still viewed by a write in flight.
    { file: "dist/nbd/large_reads.js", from: "export const READ_ARENAS_RETIRED_MAX = 5;", to: "export const READ_ARENAS_RETIRED_MAX = 1;" },
  ]);
  try {
    // Corruption depends on the thread pool's timing: a few attempts, bounded.
    const outcomes: string[] = [];
    for (let attempt = 0; attempt < 4 && !outcomes.includes("bytes differ"); attempt++) outcomes.push(await writeAndReadBack(`canary-${attempt}`, build.ipsanBin));
    assert.ok(outcomes.includes("bytes differ"), `the broken build read back: ${outcomes.join(", ")}`);
  } finally {
    build.remove();
  }
});
