// The iSCSI benchmark's pure parts: its options, the qemu-img bench arguments,
// the parsers of what qemu-img bench and iscsi-perf print, and the table.

import { test } from "node:test";
import assert from "node:assert/strict";
import { ISCSI_BENCH_USAGE, ISCSI_JOBS, formatIscsiCpu, formatIscsiSummary, parseIscsiBenchOptions, parseIscsiPerf, parseQemuBench, qemuBenchArgs } from "./iscsi_bench.ts";
import { UsageError } from "../util/errors.ts";

const job = (name: string) => {
  const found = ISCSI_JOBS.find((j) => j.name === name);
  if (found === undefined) throw new Error(name);
  return found;
};

test("qemu-img bench arguments: random 4 KiB jobs stride a prime number of blocks; 1 MiB jobs are sequential", () => {
  assert.deepEqual(qemuBenchArgs(job("randwrite4k"), "iscsi://h/t/0"), ["bench", "-f", "raw", "-c", "60000", "-d", "16", "-s", "4096", "-S", String(4096 * 7919), "-w", "iscsi://h/t/0"]);
  assert.deepEqual(qemuBenchArgs(job("seqread1m"), "nbd://h/e"), ["bench", "-f", "raw", "-c", "2048", "-d", "8", "-s", "1048576", "-S", "1048576", "nbd://h/e"]);
});

test("parsers read what the tools print, and refuse output without their figures", () => {
  assert.equal(parseQemuBench("Sending 1000 read requests, 4096 bytes each, 16 in parallel\nRun completed in 0.084 seconds.\n"), 0.084);
  assert.throws(() => parseQemuBench("qemu-img: Could not open"), /no "Run completed"/);
  const perf = "00:00:01 - lba 3, iops current 16916 (66 MB/s), iops average 16916 (66 MB/s), in_flight 16\r00:00:02 - lba 9, iops current 14806 (57 MB/s), iops average 15861 (61 MB/s)\nfinished.\n";
  assert.equal(parseIscsiPerf(perf), 15861);
  assert.throws(() => parseIscsiPerf("Failed to login"), /no "iops average"/);
});

test("options: defaults, lists checked, sizes bounded", () => {
  const defaults = parseIscsiBenchOptions([]);
  assert.equal(defaults.rounds, 5);
  assert.equal(defaults.sizeBytes, 256 * 1024 * 1024);
  assert.equal(defaults.jobs.length, ISCSI_JOBS.length);
  assert.throws(() => parseIscsiBenchOptions(["--servers", "lio"]), UsageError);
  assert.throws(() => parseIscsiBenchOptions(["--size", "10M"]), /at least 64M/);
  // --help (wherever it stands) is the usage text, not the CLI's HelpRequested.
  assert.throws(() => parseIscsiBenchOptions(["--rounds", "3", "--help"]), (error: unknown) => error instanceof UsageError && error.message === ISCSI_BENCH_USAGE);
});

test("the table gives medians with their spread and the ratios against each target", () => {
  const measurements = [1, 2, 3].flatMap((round) => [
    { round, job: "randread4k", server: "ipsan-iscsi" as const, value: 30_000 + round },
    { round, job: "randread4k", server: "tgt" as const, value: 10_000 },
    { round, job: "randread4k", server: "ipsan-nbd" as const, value: 40_000 },
  ]);
  const table = formatIscsiSummary([job("randread4k")], ["ipsan-iscsi", "tgt", "ipsan-nbd"], measurements);
  const row = table.split("\n")[1] ?? "";
  assert.match(row, /^randread4k\s+30002 \[30001\.\.30003\]\s+10000 \[10000\.\.10000\]\s+40000 \[40000\.\.40000\]\s+3\.00x\s+met\s+0\.75x\s+MISSED$/);
});

test("the CPU table gives the server's CPU us per request per qemu-img job (median [min..max]); iscsi-perf jobs have none", () => {
  const measurements = [
    { round: 0, job: "randwrite4k", server: "ipsan-iscsi" as const, value: 1, cpuUsPerRequest: 12 },
    { round: 1, job: "randwrite4k", server: "ipsan-iscsi" as const, value: 1, cpuUsPerRequest: 10 },
    { round: 2, job: "randwrite4k", server: "ipsan-iscsi" as const, value: 1, cpuUsPerRequest: 30 },
    { round: 0, job: "randwrite4k", server: "tgt" as const, value: 1, cpuUsPerRequest: 20.25 },
    { round: 0, job: "perf-randread4k", server: "tgt" as const, value: 1 },
  ];
  const lines = formatIscsiCpu([job("randwrite4k"), job("perf-randread4k")], ["ipsan-iscsi", "tgt"], measurements).split("\n");
  assert.equal(lines.length, 2);
  assert.match(lines[1] ?? "", /^randwrite4k\s+12\.0 \[10\.0\.\.30\.0\]\s+20\.3 \[20\.3\.\.20\.3\]$/);
});
