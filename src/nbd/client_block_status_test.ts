// NbdClient.blockStatus against a real `ipsan unit`: the allocation it
// reports for a volume with data in known places is the one libnbd's
// `nbdinfo --map` reports for the same export (a client written by others),
// run for run; the runs cover the range asked, from its start; the data
// connection keeps working beside the second connection blockStatus opens;
// and READ on the allocation connection itself is refused, not garbled.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { runOk } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";
import { type AllocationExtent, NbdClient } from "./client.ts";

const MIB = 1024 * 1024;
const VOLUME_BYTES = 16 * MIB;

/** Runs merged by kind ("data" or "hole"), as [offset, length, kind]. */
function merged(runs: readonly { offset: number; length: number; kind: string }[]): [number, number, string][] {
  const out: [number, number, string][] = [];
  for (const run of runs) {
    const last = out[out.length - 1];
    if (last !== undefined && last[2] === run.kind && last[0] + last[1] === run.offset) last[1] += run.length;
    else out.push([run.offset, run.length, run.kind]);
  }
  return out;
}

test("blockStatus reports what nbdinfo --map reports, covering the range; the data connection goes on beside it", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("block-status", memoryTmpBase());
  const unit = await startUnit({ dataDir: dir.file("unit"), capacity: "32M", volumes: [{ name: "v", size: VOLUME_BYTES }], name: "bs", listen: "127.0.0.1:0" });
  const uri = unit.uri("v");
  const client = await NbdClient.connect(uri);
  try {
    const data = randomBytes(MIB);
    await client.write(4 * MIB, data, true);
    await client.write(9 * MIB + 64 * 1024, randomBytes(128 * 1024), true);
    await client.flush();

    const ours: { offset: number; length: number; kind: string }[] = [];
    let at = 0;
    for (let asks = 0; at < VOLUME_BYTES && asks < 1000; asks++) {
      const runs: readonly AllocationExtent[] = await client.blockStatus(at, VOLUME_BYTES - at);
      assert.ok(runs.length > 0, "an answer has at least one run");
      for (const run of runs) {
        ours.push({ offset: at, length: Math.min(run.lengthBytes, VOLUME_BYTES - at), kind: run.zero ? "hole" : "data" });
        at += run.lengthBytes;
      }
    }
    assert.equal(at, VOLUME_BYTES, "the runs cover the volume exactly");
    const map = await runOk("nbdinfo", ["--map", "--json", uri], { timeoutMs: 30_000 });
    const theirs = (JSON.parse(map.stdout) as { offset: number; length: number; type: number }[]).map((e) => ({
      offset: e.offset,
      length: e.length,
      kind: (e.type & 2) !== 0 ? "hole" : "data",
    }));
    assert.deepEqual(merged(ours), merged(theirs), "the same allocation as nbdinfo --map");
    assert.ok(
      merged(ours).some(([offset, length, kind]) => kind === "data" && offset <= 4 * MIB && offset + length >= 5 * MIB),
      `the written MiB is data: ${JSON.stringify(merged(ours))}`,
    );
    assert.ok((await client.read(4 * MIB, MIB)).equals(data), "the data connection still reads");

    const allocation = await NbdClient.connect(uri, { allocation: true });
    try {
      await assert.rejects(allocation.read(0, 512), /READ on a block-status connection/);
      assert.ok((await allocation.blockStatus(0, MIB)).length > 0);
    } finally {
      await allocation.close();
    }
  } finally {
    await client.close();
    await unit.stop();
    dir.remove();
  }
});
