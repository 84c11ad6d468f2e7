// Smoke test of `npm run bench`: one 1-second round of one job against all
// three servers (ipsan unit, nbdkit, qemu-nbd) on a 64 MiB file runs to the
// end and prints the table with a ratio and the unit's RSS. It proves the
// benchmark still works, not how fast anything is.

import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { describeResult, run } from "../testing/process.ts";
import { REPO_ROOT } from "../testing/unit.ts";

test("the benchmark runs one short round against all three servers", async () => {
  const result = await run(
    process.execPath,
    [join(REPO_ROOT, "dist", "bench", "nbd_bench.js"), "--rounds", "1", "--runtime", "1", "--jobs", "randread4k", "--size", "64M"],
    { timeoutMs: 60_000 },
  );
  assert.equal(result.code, 0, describeResult(result));
  assert.match(result.stdout, /^randread4k\s+\d+ IOPS\s+\d+ IOPS\s+\d+ IOPS\s+\d+\.\d\dx\s+\d+\.\d\dx$/m, result.stdout);
  assert.match(result.stdout, /ipsan unit RSS under the fio jobs: peak sampled VmRSS \d+\.\d MiB, VmHWM \d+\.\d MiB/);
});
