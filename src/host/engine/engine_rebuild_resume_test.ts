// Full rebuilds resume after a crash (issue 6 section 2, "kill -9 the engine
// mid-rebuild; the rebuild continues from its checkpoint, bytes copied in
// total under 1.2x"), with real processes on loopback (the bed:
// src/testing/mirror_bed.ts). Leg b's unit dies for good and a blank leg c
// on a third unit replaces it (legs file + SIGHUP), rebuilt at a slow rate
// (--rebuild-rate) so the test can strike in the middle; a TCP relay in
// front of c's unit counts every byte the engine sends it.
//
// - kill -9 of the engine at ~40 % of the copy, restart with the same files:
//   the rebuild resumes (fewer bytes left) and the bytes sent to c over both
//   engines stay under 1.2x the written part of a half-written volume (a full
//   rebuild skips the never-written half: BLOCK_STATUS). The bound is taken
//   against the written part, not the volume: with the skipped half a rebuild
//   from zero would also stay under 1.2x the volume. Its canary: the same
//   scenario on a build whose full rebuild writes no marker (so the restarted
//   engine takes c for blank and copies it from zero) must fail.
// - kill -9 of c's unit at ~40 %: back on the same port, the rebuild resumes
//   from the checkpoint too (its marker says whose it is).
// Each ends with the mirror reading as before and legs a and c identical.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test, type TestContext } from "node:test";
import { NbdClient } from "../../nbd/client.ts";
import { type RunningEngine, logFields } from "../../testing/engine.ts";
import {
  DATA_BYTES,
  type Bed,
  EVENT_TIMEOUT_MS,
  IN_SYNC_TIMEOUT_MS,
  LEG_BYTES,
  REGION_BYTES,
  UNIT_CAPACITY,
  VOLUME,
  applyLegs,
  exportHash,
  startBed,
  startRelay,
  stopAndCompareLegs,
  waitForLine,
  watchStatus,
} from "../../testing/mirror_bed.ts";
import { patchedBuild } from "../../testing/patched_build.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { type RunningUnit, startUnit } from "../../testing/unit.ts";
import type { EngineStatus, LegEntry } from "../legs.ts";

let tmp: TempDir;
before(() => {
  tmp = makeTempDir("engine-resume", memoryTmpBase());
});
after(() => {
  tmp?.remove();
});

// ---------------------------------------------------------------- (b) kill -9 of the engine mid full rebuild

const WRITTEN_REGIONS = 32;
/** Rebuild rate of the first engine: slow enough to kill it in the middle. */
const SLOW_RATE = "6M";
/** The first engine is killed once this share of the written part has been copied. */
const KILL_AT_SHARE = 0.4;

/**
 * Half the volume written (regions 0..31, the rest never written) through a
 * new engine on legs a and b; b's unit killed for good and c put in its place
 * (legs file + SIGHUP). Returns the engine, the written bytes and the
 * mirror's hash before, and the stderr index the replacement started at.
 */
async function replaceOnHalfWritten(bed: Bed, c: LegEntry, ipsanBin: string | undefined): Promise<{ engine: RunningEngine; written: number; expected: string; after: number }> {
  const [a, b] = [bed.leg(0), bed.leg(1)];
  bed.writeLegs([a, b]);
  const engine = await bed.startEngine(["--rebuild-rate", SLOW_RATE], ipsanBin);
  const client = await NbdClient.connect(engine.uri);
  try {
    for (let r = 0; r < WRITTEN_REGIONS; r++) await client.write(r * REGION_BYTES, randomBytes(REGION_BYTES), r === WRITTEN_REGIONS - 1);
    await client.flush();
  } finally {
    await client.close();
  }
  const expected = await exportHash(bed, engine.uri, DATA_BYTES, "before");
  let after = engine.nextLineIndex();
  await (bed.units[1] as RunningUnit).kill9();
  await waitForLine(engine, new RegExp(`mirror leg failed .*\\bleg=${b.id}\\b`), after);
  after = engine.nextLineIndex();
  applyLegs(bed, engine, [a, c]);
  return { engine: engine, written: WRITTEN_REGIONS * REGION_BYTES, expected, after };
}

test("kill -9 of the engine mid full rebuild: the restarted engine resumes from its checkpoint; bytes sent to the new leg < 1.2x the written part", { timeout: 120_000 }, async (t: TestContext) => {
  await resumeAfterKill(t, "resume", undefined);
});

test("canary: an engine whose full rebuild writes no marker (a restart copies from zero) fails the resume test", { timeout: 120_000 }, async (t: TestContext) => {
  const build = patchedBuild("engine-no-marker", [{ file: "dist/host/engine/mirror.js", from: "await target.write(headerSlotOffset(this.sizeBytes, slot), marker, true);", to: "void marker;" }]);
  try {
    await assert.rejects(resumeAfterKill(t, "canary", build.ipsanBin), (error: Error) => {
      t.diagnostic(`canary caught: ${error.message.split("\n")[0]}`);
      return error instanceof assert.AssertionError && /resumed, not restarted|not under 1\.2/.test(error.message);
    });
  } finally {
    build.remove();
  }
});

async function resumeAfterKill(t: TestContext, name: string, ipsanBin: string | undefined): Promise<void> {
  const bed = await startBed(tmp, name);
  const relay = await startRelay((bed.units[2] as RunningUnit).port);
  try {
    const c = bed.leg(2, relay.port);
    const replacing = await replaceOnHalfWritten(bed, c, ipsanBin);
    let engine = replacing.engine;
    const { written, expected, after } = replacing;
    const first = await waitForLine(engine, new RegExp(`mirror leg rebuild started .*\\bleg=${c.id}\\b`), after);
    assert.equal(first["kind"], "full");
    // (d) progress in the status file while it runs; killed once KILL_AT_SHARE of the written part is copied (checkpointed).
    const seen: EngineStatus[] = [];
    await watchStatus(bed.statusFile, (s) => (s.legs.find((l) => l.id === c.id)?.rebuild?.copiedBytes ?? 0) >= KILL_AT_SHARE * written, IN_SYNC_TIMEOUT_MS, seen);
    await engine.kill9();
    const sentFirst = relay.sentBytes();
    const progress = seen.map((s) => s.legs.find((l) => l.id === c.id)?.rebuild?.copiedBytes ?? 0);
    assert.ok(progress.length >= 2 && progress.every((p, i) => i === 0 || p >= (progress[i - 1] ?? 0)), `progress grows in the status file: ${progress.join(", ")}`);
    t.diagnostic(`first engine killed after sending ${sentFirst} bytes to ${c.id} (status progress ${progress.join(" -> ")})`);

    // The agent would start it again with the same files.
    engine = await bed.startEngine([], ipsanBin);
    const resumed = await engine.waitForLine(new RegExp(`mirror leg rebuild started .*\\bleg=${c.id}\\b`), { timeoutMs: EVENT_TIMEOUT_MS });
    const resumedFields = logFields(resumed.text);
    const inSync = logFields((await engine.waitForLine(new RegExp(`mirror leg in sync .*\\bleg=${c.id}\\b`), { timeoutMs: IN_SYNC_TIMEOUT_MS })).text);
    const total = relay.sentBytes();
    t.diagnostic(
      `restarted: kind=${resumedFields["kind"]} left=${resumedFields["bytes"]} copiedBytes=${inSync["copiedBytes"]} skippedBytes=${inSync["skippedBytes"]}; ` +
        `bytes sent to ${c.id} in all: ${total} = ${(total / written).toFixed(2)}x the written part, ${(total / DATA_BYTES).toFixed(2)}x the volume`,
    );
    assert.equal(resumedFields["kind"], "full", "still the full rebuild (its marker)");
    // What was checkpointed is not copied again (the checkpoint trails the copy by at most rebuildCheckpointMs).
    assert.ok(Number(resumedFields["bytes"]) <= DATA_BYTES - (KILL_AT_SHARE / 2) * written, `resumed, not restarted: ${resumedFields["bytes"]} bytes left`);
    assert.ok(total < 1.2 * written, `bytes sent to the new leg over both engines: ${total}, not under 1.2 x ${written}`);
    assert.ok(total < 1.2 * DATA_BYTES);

    assert.equal(await exportHash(bed, engine.uri, DATA_BYTES, "after"), expected, "the mirror reads the same after the rebuild");
    await stopAndCompareLegs(bed, engine);
  } finally {
    await relay.close();
    await bed.close();
  }
}

// ---------------------------------------------------------------- kill -9 of the target's unit mid full rebuild

test("kill -9 of the new leg's unit mid full rebuild: back on the same port, the rebuild resumes from its checkpoint", { timeout: 120_000 }, async (t: TestContext) => {
  const bed = await startBed(tmp, "target");
  const relay = await startRelay((bed.units[2] as RunningUnit).port);
  try {
    const c = bed.leg(2, relay.port);
    const { engine, written, expected } = await replaceOnHalfWritten(bed, c, undefined);
    await watchStatus(bed.statusFile, (s) => (s.legs.find((l) => l.id === c.id)?.rebuild?.copiedBytes ?? 0) >= KILL_AT_SHARE * written, IN_SYNC_TIMEOUT_MS, []);
    const after = engine.nextLineIndex();
    const target = bed.units[2] as RunningUnit;
    await target.kill9();
    await waitForLine(engine, new RegExp(`mirror leg failed .*\\bleg=${c.id}\\b`), after);
    const sentBefore = relay.sentBytes();
    bed.units[2] = await startUnit({ dataDir: target.dataDir, capacity: UNIT_CAPACITY, volumes: [{ name: VOLUME, size: LEG_BYTES }], name: target.name, listen: `127.0.0.1:${target.port}` });
    const resumed = await waitForLine(engine, new RegExp(`mirror leg rebuild started .*\\bleg=${c.id}\\b`), after, IN_SYNC_TIMEOUT_MS);
    const inSync = await waitForLine(engine, new RegExp(`mirror leg in sync .*\\bleg=${c.id}\\b`), after, IN_SYNC_TIMEOUT_MS);
    const total = relay.sentBytes();
    t.diagnostic(`target unit killed after ${sentBefore} bytes sent; on its return kind=${resumed["kind"]} left=${resumed["bytes"]} copiedBytes=${inSync["copiedBytes"]}; bytes sent in all: ${total} = ${(total / written).toFixed(2)}x the written part`);
    assert.equal(resumed["kind"], "full", "still the full rebuild (its marker)");
    assert.ok(Number(resumed["bytes"]) <= DATA_BYTES - (KILL_AT_SHARE / 2) * written, `resumed, not restarted: ${resumed["bytes"]} bytes left`);
    assert.ok(total < 1.2 * written, `bytes sent to the new leg: ${total}, not under 1.2 x ${written}`);
    assert.equal(await exportHash(bed, engine.uri, DATA_BYTES, "after"), expected);
    await stopAndCompareLegs(bed, engine);
  } finally {
    await relay.close();
    await bed.close();
  }
});
