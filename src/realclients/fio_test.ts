// fio's nbd engine (libnbd, many requests in flight) against a real `ipsan
// unit`: random 4 KiB writes at queue depth 16 over a whole volume with
// crc32c checksums in every block, then fio reads every block back and checks
// them (verify must pass with zero errors); a verify-only pass after we
// corrupt one block must fail, which proves the check is live; and a mixed
// random read/write load with two jobs (two connections) and varied block
// sizes finishes with no I/O error and real traffic both ways.
// Run with IPSAN_REALCLIENTS_SERVER=nbdkit to check these tests against nbdkit.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";
import { nbdsh } from "../testing/clients.ts";
import { describeResult, run, type CommandResult } from "../testing/process.ts";
import { startTarget, type Target } from "../testing/target.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";

const MIB = 1024 * 1024;
const VERIFY_BYTES = 64 * MIB;
const MIXED_BYTES = 128 * MIB;
const FIO_TIMEOUT_MS = 90_000;

interface FioDirection {
  io_bytes: number;
  total_ios: number;
  iops: number;
}
interface FioJob {
  jobname: string;
  error: number;
  read: FioDirection;
  write: FioDirection;
}

let target: Target;
let tmp: TempDir;
before(async () => {
  tmp = makeTempDir("fio");
  target = await startTarget({
    volumes: [
      { name: "verify", sizeBytes: VERIFY_BYTES },
      { name: "mixed", sizeBytes: MIXED_BYTES },
    ],
  });
});
after(async () => {
  await target?.close();
  tmp?.remove();
});

async function fio(name: string, args: readonly string[]): Promise<{ result: CommandResult; jobs: FioJob[] }> {
  const outputPath = tmp.file(`${name}.json`);
  const result = await run("fio", [`--name=${name}`, "--ioengine=nbd", "--output-format=json", `--output=${outputPath}`, ...args], {
    timeoutMs: FIO_TIMEOUT_MS,
  });
  let jobs: FioJob[] = [];
  try {
    jobs = (JSON.parse(readFileSync(outputPath, "utf8")) as { jobs: FioJob[] }).jobs;
  } catch {
    // no JSON (fio failed early): the caller's assertion shows its output
  }
  return { result, jobs };
}

const VERIFY_JOB = (uri: string): string[] => [
  `--uri=${uri}`,
  "--rw=randwrite",
  "--bs=4k",
  "--iodepth=16",
  `--size=${VERIFY_BYTES}`,
  "--verify=crc32c",
  "--verify_fatal=1",
  "--randrepeat=1",
];

test("fio randwrite QD16 with crc32c verify passes with zero errors", async () => {
  const { result, jobs } = await fio("randwrite-verify", [...VERIFY_JOB(target.uri("verify")), "--do_verify=1"]);
  assert.equal(result.code, 0, describeResult(result));
  const job = jobs[0];
  assert.ok(job !== undefined, describeResult(result));
  assert.equal(job.error, 0);
  assert.equal(job.write.io_bytes, VERIFY_BYTES, "every block written once");
  assert.equal(job.read.io_bytes, VERIFY_BYTES, "every block read back and verified");
});

test("fio verify fails after one block is corrupted behind its back", async () => {
  await nbdsh(target.uri("verify"), `h.pwrite(b"\\0" * 4096, ${12 * MIB})\nh.flush()`);
  const { result } = await fio("verify-only", [...VERIFY_JOB(target.uri("verify")), "--verify_only=1"]);
  assert.notEqual(result.code, 0, `verify passed over a corrupted block: ${describeResult(result)}`);
  // fio names the corrupted block: bad magic header (we zeroed it) at exactly our offset.
  assert.match(result.stdout + result.stderr, new RegExp(`verify: bad magic header .* offset ${12 * MIB}\\b`));
});

test("fio mixed randrw (two connections, 4k-64k blocks) finishes with no errors", async () => {
  const { result, jobs } = await fio("randrw", [
    `--uri=${target.uri("mixed")}`,
    "--rw=randrw",
    "--rwmixread=60",
    "--bsrange=4k-64k",
    "--iodepth=16",
    "--numjobs=2",
    `--size=${MIXED_BYTES}`,
    "--time_based=1",
    "--runtime=5",
  ]);
  assert.equal(result.code, 0, describeResult(result));
  assert.equal(jobs.length, 2, describeResult(result));
  for (const job of jobs) {
    assert.equal(job.error, 0);
    assert.ok(job.read.total_ios > 100, `reads: ${job.read.total_ios}`);
    assert.ok(job.write.total_ios > 100, `writes: ${job.write.total_ios}`);
  }
});
