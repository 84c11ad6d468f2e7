// The control-plane benchmark in both modes at a tiny scale (docs/benchmarks.md
// "Control plane"): a single station, then two stations on a real 3-member
// etcd (the follower forwards, the leader is killed and the follower takes
// over with every unit back). The figures are not checked, only that each
// measure was taken and the ratio table printed: the bench fails (exit 1)
// when any step of the etcd mode fails (a follower that cannot build its
// copy or forward, a takeover that never ends).

import { test } from "node:test";
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { run } from "../../testing/process.ts";

const BENCH = join(dirname(fileURLToPath(import.meta.url)), "station_bench.js");
const BENCH_TIMEOUT_MS = 240_000;

interface EtcdRun {
  mode: string;
  allocationMs: { reuse: { n: number } };
  etcd: {
    forwarded: { reuse: { n: number; p50: number }; carve: { n: number } };
    takeoverMs: { leads: number; apiServing: number; allUnitsOnline: number };
    followerStartToReadyMs: number;
    copyBuildMs: number;
    log: { entriesAppended: number; largestEntryBytes: number; lastSeq: number };
    etcdDbBytes: number[];
  };
}

/** The pretty-printed JSON objects of the output (each starts with "{" alone on a line and ends with "}" alone). */
function runObjects(stdout: string): unknown[] {
  return [...stdout.matchAll(/^\{\n[\s\S]*?\n\}$/gm)].map((m) => JSON.parse(m[0]) as unknown);
}

test("bench:station --compare measures a single station and two stations on etcd, and prints the ratios", { timeout: BENCH_TIMEOUT_MS + 10_000 }, async () => {
  const result = await run(process.execPath, [BENCH, "--compare", "--units", "20", "--volumes", "5", "--allocations", "16", "--carves", "8"], { timeoutMs: BENCH_TIMEOUT_MS });
  assert.equal(result.code, 0, `the bench failed:\n${result.stderr.slice(-4000)}`);
  const runs = runObjects(result.stdout) as { mode: string }[];
  assert.deepEqual(runs.map((r) => r.mode), ["single", "etcd"]);
  const etcd = runs[1] as EtcdRun;
  assert.equal(etcd.allocationMs.reuse.n, 16);
  assert.equal(etcd.etcd.forwarded.reuse.n, 16, "allocations through the follower");
  assert.equal(etcd.etcd.forwarded.carve.n, 8);
  for (const [name, value] of Object.entries({ ...etcd.etcd.takeoverMs, follower: etcd.etcd.followerStartToReadyMs, copy: etcd.etcd.copyBuildMs })) {
    assert.ok(Number.isFinite(value) && value >= 0, `${name}: ${value}`);
  }
  assert.ok(etcd.etcd.log.entriesAppended > 0 && etcd.etcd.log.lastSeq > 0 && etcd.etcd.log.largestEntryBytes > 0, JSON.stringify(etcd.etcd.log));
  assert.equal(etcd.etcd.etcdDbBytes.length, 3, "etcd db size of each member");
  assert.match(result.stdout, /^\| reuse p50 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|$/m, "the etcd/single ratio table");
  assert.match(result.stdout, /^\| etcd mode: through the follower vs the leader /m);
});

// Found by this benchmark (docs/benchmarks.md "Several stations on etcd"): a
// follower that starts while the log after the last snapshot holds more than
// 4 MiB in one read's worth of entries could not build its copy (the etcd
// client's message limit). Log reads now take 32 entries at a time under a
// raised limit, and large entries are stored gzip'd; this keeps it so.
test(
  "a follower started on a freshly loaded pool builds its copy from etcd (150 units x 100 volumes, no snapshot yet)",
  { timeout: BENCH_TIMEOUT_MS + 10_000 },
  async () => {
    const result = await run(
      process.execPath,
      [BENCH, "--etcd", "--follower-start", "loaded", "--units", "150", "--volumes", "100", "--allocations", "8", "--carves", "4"],
      { timeoutMs: BENCH_TIMEOUT_MS },
    );
    assert.equal(result.code, 0, `the bench failed:\n${result.stderr.split("\n").filter((l) => !/ stats: /.test(l)).slice(-30).join("\n")}`);
  },
);
