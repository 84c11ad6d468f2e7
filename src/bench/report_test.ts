// The benchmark's pure parts: option parsing accepts the documented flags and
// names the flag and value it rejects; fio gets the job's pattern, block size
// and queue depth; medians and ratios come out right; the table has a row per
// job with ipsan's ratio to each other server.

import assert from "node:assert/strict";
import { test } from "node:test";
import { UsageError } from "../util/errors.ts";
import { BENCH_USAGE, fioArgs, formatSummary, formatVerdict, JOBS, median, parseBenchOptions, summarize, type Measurement } from "./report.ts";

test("parseBenchOptions: defaults, lists, and errors that name the flag", () => {
  const defaults = parseBenchOptions([]);
  assert.equal(defaults.rounds, 5);
  assert.equal(defaults.runtimeS, 8);
  assert.equal(defaults.sizeBytes, 1024 ** 3);
  assert.deepEqual(defaults.jobs.map((job) => job.name), JOBS.map((job) => job.name));
  assert.deepEqual(defaults.servers, ["ipsan", "nbdkit", "qemu-nbd", "ipsan-tls", "nbdkit-tls"]);
  const picked = parseBenchOptions(["--rounds", "5", "--runtime", "2", "--jobs", "seqread1m,randread4k", "--servers", "ipsan,nbdkit", "--size", "256M"]);
  assert.deepEqual(picked.jobs.map((job) => job.name), ["randread4k", "seqread1m"]);
  assert.deepEqual([picked.rounds, picked.runtimeS, picked.sizeBytes], [5, 2, 256 * 1024 * 1024]);
  assert.throws(() => parseBenchOptions(["--jobs", "nosuch"]), /--jobs: unknown "nosuch"/);
  assert.throws(() => parseBenchOptions(["--rounds", "0"]), /--rounds: expected an integer 1\.\.50, got "0"/);
  assert.throws(() => parseBenchOptions(["--size", "1000K"]), /--size: expected a whole number of MiB/);
  assert.throws(() => parseBenchOptions(["--servers", "tgt"]), /--servers: unknown "tgt"/);
  assert.throws(() => parseBenchOptions(["-h"]), (error: unknown) => error instanceof UsageError && error.message === BENCH_USAGE);
});

test("fioArgs carries the job's pattern, block size, depth and runtime", () => {
  const job = JOBS.find((j) => j.name === "randwrite4k");
  assert.ok(job !== undefined);
  const args = fioArgs(job, "nbd://127.0.0.1:1/v", 8, "/tmp/out.json");
  for (const expected of ["--ioengine=nbd", "--uri=nbd://127.0.0.1:1/v", "--rw=randwrite", "--bs=4096", "--iodepth=16", "--runtime=8", "--ramp_time=1", "--output=/tmp/out.json"]) {
    assert.ok(args.includes(expected), expected);
  }
  assert.ok(fioArgs(job, "u", 1, "o").includes("--ramp_time=0"), "no warm-up in a 1 s smoke run");
});

test("median, summaries and the table", () => {
  assert.equal(median([3, 1, 2]), 2);
  assert.equal(median([4, 1, 2, 3]), 2.5);
  assert.ok(Number.isNaN(median([])));
  const jobs = JOBS.filter((job) => job.name === "randread4k" || job.name === "seqread1m");
  const m = (round: number, job: string, server: Measurement["server"], iops: number, mibps: number): Measurement => ({
    round, job, server, iops, mibps, serverCpuCores: 0.5, latencyUsMean: 100,
  });
  const measurements = [
    m(1, "randread4k", "ipsan", 100, 0), m(2, "randread4k", "ipsan", 300, 0), m(3, "randread4k", "ipsan", 200, 0),
    m(1, "randread4k", "nbdkit", 100, 0), m(2, "randread4k", "nbdkit", 100, 0), m(3, "randread4k", "nbdkit", 100, 0),
    m(1, "seqread1m", "ipsan", 0, 900), m(1, "seqread1m", "nbdkit", 0, 1000),
  ];
  const summaries = summarize(jobs, ["ipsan", "nbdkit"], measurements);
  assert.deepEqual(summaries.map((s) => s.values), [{ ipsan: 200, nbdkit: 100 }, { ipsan: 900, nbdkit: 1000 }]);
  const text = formatSummary(summaries, ["ipsan", "nbdkit"]);
  assert.match(text, /^job\s+ipsan\s+nbdkit\s+ipsan\/nbdkit$/m);
  assert.match(text, /^randread4k\s+200 IOPS\s+100 IOPS\s+2\.00x$/m);
  assert.match(text, /^seqread1m\s+900 MiB\/s\s+1000 MiB\/s\s+0\.90x$/m);
  // The spread: lowest-highest round per server, and ipsan/nbdkit round by round.
  assert.deepEqual(summaries[0]?.range, { ipsan: [100, 300], nbdkit: [100, 100] });
  assert.deepEqual(summaries[0]?.roundRatios, { nbdkit: [1, 3, 2] });
  assert.match(text, /^spread over rounds \(min-max\)\s+ipsan\s+nbdkit\s+ipsan\/nbdkit per round$/m);
  assert.match(text, /^randread4k\s+100-300\s+100-100\s+1\.00 3\.00 2\.00$/m);
  // serverCpuCores 0.5 at 200 IOPS: 2500 us of server CPU per request.
  assert.equal(summaries[0]?.cpuUsPerRequest.ipsan, 2500);
  assert.match(text, /^server CPU per request \(us\)\s+ipsan\s+nbdkit$/m);
  assert.match(text, /^seqread1m\s+900-900\s+1000-1000\s+0\.90$/m);
  assert.equal(
    formatVerdict(summaries, 200e6),
    "target ipsan >= 1.0x nbdkit on every job: NOT met, behind on seqread1m\ntarget unit RSS < 150 MB: NOT met (200 MB)",
  );
  assert.equal(
    formatVerdict(summaries.slice(0, 1), 100e6),
    "target ipsan >= 1.0x nbdkit on every job: met (1 jobs)\ntarget unit RSS < 150 MB: met (100 MB)",
  );
});
