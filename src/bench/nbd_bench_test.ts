// Smoke test of `npm run bench`: one 1-second round of one job against all
// five servers (ipsan unit, nbdkit, qemu-nbd, and ipsan and nbdkit over
// TLS-PSK) on a 64 MiB file runs to the end and prints the table with the
// ratios, the TLS verdict and the unit's RSS. It proves the
// benchmark still works, not how fast anything is.

import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { describeResult, run } from "../testing/process.ts";
import { REPO_ROOT } from "../testing/unit.ts";

test("the benchmark runs one short round against all five servers", async () => {
  const result = await run(
    process.execPath,
    [join(REPO_ROOT, "dist", "bench", "nbd_bench.js"), "--rounds", "1", "--runtime", "1", "--jobs", "randread4k", "--size", "64M"],
    { timeoutMs: 60_000 },
  );
  assert.equal(result.code, 0, describeResult(result));
  assert.match(result.stdout, /^randread4k(\s+\d+ IOPS){5}(\s+\d+\.\d\dx){4}$/m, result.stdout);
  assert.match(result.stdout, /ipsan-tls\/nbdkit-tls\s+ipsan-tls\/ipsan/);
  assert.match(result.stdout, /target ipsan-tls >= 1\.0x nbdkit-tls on every job: (met|NOT met)/);
  assert.match(result.stdout, /ipsan unit RSS under the fio jobs: peak sampled VmRSS \d+\.\d MiB, VmHWM \d+\.\d MiB/);
});
