// `node dist/bench/io_stats_bench.js`: what the unit's I/O counting
// (src/nbd/io_stats.ts) costs per request on this CPU, apart from everything
// else: a clock reading (performance.now()) and ExportCounters.completed(),
// as the session does for each request. Compare with the unit's CPU per
// request from `npm run bench` (server CPU cores / IOPS); docs/benchmarks.md
// "I/O statistics cost".

import { performance } from "node:perf_hooks";
import { ExportCounters } from "../nbd/io_stats.ts";
import { NBD_CMD } from "../nbd/protocol.ts";

const ITERATIONS = 5_000_000;
const ROUNDS = 5;

function nsPerOp(body: () => void): number {
  const start = process.hrtime.bigint();
  body();
  return Number(process.hrtime.bigint() - start) / ITERATIONS;
}

const counters = new ExportCounters("bench");
let sink = 0;
const results: { clock: number; count: number; both: number }[] = [];
for (let round = 0; round < ROUNDS; round++) {
  const clock = nsPerOp(() => {
    for (let i = 0; i < ITERATIONS; i++) sink += performance.now();
  });
  const count = nsPerOp(() => {
    for (let i = 0; i < ITERATIONS; i++) counters.completed(i & 1 ? NBD_CMD.READ : NBD_CMD.WRITE, 4096, (i & 1023) / 100);
  });
  const both = nsPerOp(() => {
    let last = performance.now();
    for (let i = 0; i < ITERATIONS; i++) {
      const now = performance.now();
      counters.completed(NBD_CMD.READ, 4096, now - last);
      last = now;
    }
  });
  results.push({ clock, count, both });
}
const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)] ?? Number.NaN;
process.stdout.write(
  `io_stats per request (median of ${ROUNDS} x ${ITERATIONS}): performance.now() ${median(results.map((r) => r.clock)).toFixed(1)} ns, ` +
    `completed() ${median(results.map((r) => r.count)).toFixed(1)} ns, both ${median(results.map((r) => r.both)).toFixed(1)} ns (sink ${sink > 0 ? "ok" : "?"}, reads ${counters.reads})\n`,
);
