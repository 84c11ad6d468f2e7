// nbdcopy (libnbd's parallel copier) against a real `ipsan unit`: 256 MiB of
// seeded random data copied INTO a volume over four connections with 16
// requests in flight each, then copied back OUT over four connections, is
// byte-identical (sha256). A small verbose copy shows nbdcopy really opened
// four connections, which it only does when the server advertises multi-conn.
// Run with IPSAN_REALCLIENTS_SERVER=nbdkit to check these tests against nbdkit.

import assert from "node:assert/strict";
import { statSync } from "node:fs";
import { after, before, test } from "node:test";
import { newSeed, sha256File, writeRandomFile } from "../testing/data.ts";
import { runOk } from "../testing/process.ts";
import { startTarget, type Target } from "../testing/target.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";

const MIB = 1024 * 1024;
const BIG_BYTES = 256 * MIB;
const COPY_TIMEOUT_MS = 120_000;
const PARALLEL = ["--connections=4", "--threads=4", "--requests=16"];

let target: Target;
let tmp: TempDir;
before(async () => {
  tmp = makeTempDir("nbdcopy");
  target = await startTarget({ volumes: [{ name: "big", sizeBytes: BIG_BYTES }, { name: "small", sizeBytes: 4 * MIB }] });
});
after(async () => {
  await target?.close();
  tmp?.remove();
});

test("nbdcopy uses four connections in each direction (multi-conn)", async () => {
  const source = tmp.file("small.raw");
  writeRandomFile(source, 4 * MIB, "small");
  const into = await runOk("nbdcopy", ["--verbose", ...PARALLEL, source, target.uri("small")]);
  assert.match(into.stderr, /^nbdcopy: connections=4 /m);
  const back = tmp.file("small-back.raw");
  const out = await runOk("nbdcopy", ["--verbose", ...PARALLEL, target.uri("small"), back]);
  assert.match(out.stderr, /^nbdcopy: connections=4 /m);
  assert.equal(await sha256File(back), await sha256File(source));
});

test("nbdcopy 256 MiB of random data in and out is byte-identical", async () => {
  const seed = newSeed();
  process.stdout.write(`# seed ${seed}\n`);
  const source = tmp.file("big.raw");
  const sourceSha = writeRandomFile(source, BIG_BYTES, seed);
  await runOk("nbdcopy", [...PARALLEL, source, target.uri("big")], { timeoutMs: COPY_TIMEOUT_MS });
  const back = tmp.file("big-back.raw");
  await runOk("nbdcopy", [...PARALLEL, target.uri("big"), back], { timeoutMs: COPY_TIMEOUT_MS });
  assert.equal(statSync(back).size, BIG_BYTES);
  assert.equal(await sha256File(back), sourceSha);
});
