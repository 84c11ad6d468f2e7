// Leg replacement in the mirror engine (issue 6, sections 2 and 3, host
// side), with real processes on loopback (the bed: src/testing/mirror_bed.ts,
// three real units, legs a, b and the replacement c, and `ipsan host engine
// --legs-file --status-file`). A leg is replaced the way the host agent does
// it: the legs file is rewritten and the engine gets SIGHUP.
//
// - Live replacement while fio randwrite (QD 16, crc32c verify) runs through
//   the engine: b's unit is killed for good and c takes its place; fio
//   finishes with zero errors, c is rebuilt in full and in sync, legs a and c
//   are byte-identical (qemu-img compare on the units' own exports); then
//   a's unit is killed and the volume's data is all on c, read from c's own
//   export. The status file shows c rebuilding (with progress) and then in
//   sync.
// - Refusal: a replacement leg holding another mirror's metadata, or data
//   without metadata, is refused and not one byte of it changes.
// - A move (the same leg at another address: its unit restarted on another
//   port) reconnects there and resyncs by delta; a legs file that does not
//   parse, or that would change the number of legs, is refused as a whole
//   and the engine goes on serving.
// - An engine started with a changed leg set (the agent restarts it with the
//   station's legs): a leg out of sync on record is replaced (full rebuild);
//   leaving out a leg in sync on record is refused.
// Resumed full rebuilds are in engine_rebuild_resume_test.ts.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { after, before, test, type TestContext } from "node:test";
import { NbdClient } from "../../nbd/client.ts";
import { logFields, runEngineToExit } from "../../testing/engine.ts";
import {
  DATA_BYTES,
  EVENT_TIMEOUT_MS,
  IN_SYNC_TIMEOUT_MS,
  LEG_BYTES,
  MIB,
  REGION_BYTES,
  UNIT_CAPACITY,
  VOLUME,
  applyLegs,
  exportHash,
  legState,
  startBed,
  waitForLine,
  watchStatus,
} from "../../testing/mirror_bed.ts";
import { describeFio, fio, verifyJob } from "../../e2e/harness.ts";
import { describeResult, run, sleep } from "../../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { type RunningUnit, startUnit } from "../../testing/unit.ts";
import type { EngineStatus } from "../legs.ts";
import { encodeHeader, headerSlotOffset } from "./metadata.ts";

let tmp: TempDir;
before(() => {
  tmp = makeTempDir("engine-replace", memoryTmpBase());
});
after(() => {
  tmp?.remove();
});

// ---------------------------------------------------------------- (a) live replacement under fio, (d) the status file

const FIO_WRITE_S = 8;

test("a leg replaced by a blank leg on a third unit while fio randwrite crc32c runs: 0 errors, full rebuild, legs identical, data all on the new leg", { timeout: 150_000 }, async (t: TestContext) => {
  const bed = await startBed(tmp, "live");
  try {
    const [a, b, c] = [bed.leg(0), bed.leg(1), bed.leg(2)];
    bed.writeLegs([a, b]);
    const engine = await bed.startEngine();
    const fioRun = fio("replace-verify", engine.uri, verifyJob(DATA_BYTES, FIO_WRITE_S));
    await sleep(1_500);
    // b's unit dies for good; the station would place c and tell the host.
    let after = engine.nextLineIndex();
    await (bed.units[1] as RunningUnit).kill9();
    await waitForLine(engine, new RegExp(`mirror leg failed .*\\bleg=${b.id}\\b`), after);
    after = engine.nextLineIndex();
    applyLegs(bed, engine, [a, c]);
    await waitForLine(engine, new RegExp(`mirror leg replaced .*\\bleg=${c.id}\\b`), after);
    const started = await waitForLine(engine, new RegExp(`mirror leg rebuild started .*\\bleg=${c.id}\\b`), after);
    assert.equal(started["kind"], "full", "a blank replacement gets a full rebuild");
    const seen: EngineStatus[] = [];
    await watchStatus(bed.statusFile, (s) => legState(s, c.id) === "in-sync", IN_SYNC_TIMEOUT_MS, seen);
    const inSync = await waitForLine(engine, new RegExp(`mirror leg in sync .*\\bleg=${c.id}\\b`), after, IN_SYNC_TIMEOUT_MS);
    t.diagnostic(`full rebuild of ${c.id}: copiedBytes=${inSync["copiedBytes"]} skippedBytes=${inSync["skippedBytes"]}`);

    const fioRun2 = await fioRun;
    assert.equal(fioRun2.result.code, 0, describeFio(fioRun2));
    assert.equal(fioRun2.totalErrors, 0, describeFio(fioRun2));
    assert.equal(fioRun2.jobs[0]?.read.io_bytes, DATA_BYTES, "fio's verify pass read back (and checked) every block");

    // (d) The status file went through rebuilding (with progress) to in sync; b is gone from it.
    const states = seen.map((s) => legState(s, c.id));
    t.diagnostic(`status file states of ${c.id}: ${states.join(" -> ")}`);
    const rebuilding = seen.filter((s) => legState(s, c.id) === "rebuilding").map((s) => s.legs.find((l) => l.id === c.id)?.rebuild);
    assert.ok(rebuilding.length > 0 && rebuilding.every((r) => r !== null && r !== undefined && r.kind === "full" && r.totalBytes > 0), `the status file showed ${c.id} rebuilding in full: ${JSON.stringify(seen)}`);
    const last = seen[seen.length - 1] as EngineStatus;
    assert.deepEqual(last.legs.map((l) => [l.id, l.state, l.rebuild, l.unit, l.volume]), [
      [a.id, "in-sync", null, a.unit, a.volume],
      [c.id, "in-sync", null, c.unit, c.volume],
    ]);

    const viaEngine = await exportHash(bed, engine.uri, DATA_BYTES, "engine");
    const stop = await engine.stop();
    assert.deepEqual({ code: stop.code, forced: stop.forced }, { code: 0, forced: false }, engine.stderr());
    const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", a.uri, c.uri], { timeoutMs: 60_000 });
    assert.equal(compare.code, 0, `legs a and c differ: ${describeResult(compare)}`);
    // The survivor's unit dies: the data is all on c, read from c's own export.
    await (bed.units[0] as RunningUnit).kill9();
    assert.equal(await exportHash(bed, c.uri, DATA_BYTES, "c"), viaEngine, "the new leg alone holds the volume's data");
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- (c) refusal

test("a replacement leg holding another mirror's metadata, or data without metadata, is refused and not a byte of it changes", { timeout: 90_000 }, async (t: TestContext) => {
  const bed = await startBed(tmp, "refuse");
  try {
    const [a, b, c] = [bed.leg(0), bed.leg(1), bed.leg(2)];
    // c holds another mirror's header (as a leg of "other-mirror" would) and some data.
    const direct = await NbdClient.connect(c.uri);
    try {
      const header = encodeHeader({ mirrorId: "other-mirror", generation: 7, dataBytes: DATA_BYTES, regionBytes: REGION_BYTES, legs: [{ id: "x", inSync: true }] });
      await direct.write(headerSlotOffset(DATA_BYTES, 1), header, false);
      await direct.write(5 * REGION_BYTES, randomBytes(4096), true);
    } finally {
      await direct.close();
    }
    const before = await exportHash(bed, c.uri, LEG_BYTES, "c-before");
    bed.writeLegs([a, b]);
    const engine = await bed.startEngine();
    // Data on a and b before b leaves the mirror.
    const writer = await NbdClient.connect(engine.uri);
    await writer.write(0, randomBytes(4096), true);
    await writer.close();
    let after = engine.nextLineIndex();
    applyLegs(bed, engine, [a, c]);
    const refused = await waitForLine(engine, new RegExp(`mirror leg refused .*\\bleg=${c.id}\\b`), after);
    t.diagnostic(`refused: ${refused["reason"]}`);
    assert.match(refused["reason"] ?? "", /belongs to mirror other-mirror/);
    const status = await watchStatus(bed.statusFile, (s) => legState(s, c.id) === "failed" && /other-mirror/.test(s.legs.find((l) => l.id === c.id)?.error ?? ""), EVENT_TIMEOUT_MS, []);
    assert.equal(legState(status, a.id), "in-sync", "the mirror goes on with a");
    // The mirror keeps serving, on a alone.
    const client = await NbdClient.connect(engine.uri);
    await client.write(0, randomBytes(4096), true);
    await client.close();
    await sleep(1_000); // a reconnect attempt or two
    const stop = await engine.stop();
    assert.equal(stop.code, 0, engine.stderr());
    assert.equal(await exportHash(bed, c.uri, LEG_BYTES, "c-after"), before, "nothing was written to the refused leg");

    // b left the mirror (c took its place on record): its volume keeps data; with its metadata zeroed it is "data without metadata".
    const direct2 = await NbdClient.connect(b.uri);
    try {
      await direct2.write(headerSlotOffset(DATA_BYTES, 0), Buffer.alloc(8192), true);
    } finally {
      await direct2.close();
    }
    // As a replacement it is refused too (the engine starts although c, out of sync on record, is refused).
    const beforeB = await exportHash(bed, b.uri, LEG_BYTES, "b-before");
    const d = { ...b, id: `${bed.name}-d` };
    bed.writeLegs([a, c]);
    const second = await bed.startEngine();
    after = second.nextLineIndex();
    applyLegs(bed, second, [a, d]);
    const refusedData = await waitForLine(second, new RegExp(`mirror leg refused .*\\bleg=${d.id}\\b`), after);
    assert.match(refusedData["reason"] ?? "", /holds data/);
    const stop2 = await second.stop();
    assert.equal(stop2.code, 0, second.stderr());
    assert.equal(await exportHash(bed, b.uri, LEG_BYTES, "b-after"), beforeB, "nothing was written to the leg that holds data");
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- a move, and legs files refused as a whole

test("a leg moved to another address reconnects there (delta); a bad legs file or another number of legs is refused and the engine goes on", { timeout: 90_000 }, async () => {
  const bed = await startBed(tmp, "move");
  try {
    const [a, b] = [bed.leg(0), bed.leg(1)];
    bed.writeLegs([a, b]);
    const engine = await bed.startEngine();
    const client = await NbdClient.connect(engine.uri);
    const data = randomBytes(64 * 1024);
    try {
      let after = engine.nextLineIndex();
      bed.writeLegs([a, b]);
      writeFileSync(bed.legsFile, "[{");
      process.kill(engine.pid, "SIGHUP");
      await waitForLine(engine, /legs file not applied .*not JSON/, after);
      after = engine.nextLineIndex();
      applyLegs(bed, engine, [a]);
      await waitForLine(engine, /legs file not applied .*has 2 legs, not 1/, after);

      // b's unit restarts on another port: the station (or an operator) gives its new address.
      const old = bed.units[1] as RunningUnit;
      await old.stop();
      await client.write(7 * REGION_BYTES, data, true);
      bed.units[1] = await startUnit({ dataDir: old.dataDir, capacity: UNIT_CAPACITY, volumes: [{ name: VOLUME, size: LEG_BYTES }], name: old.name, listen: "127.0.0.1:0" });
      const moved = bed.leg(1);
      assert.notEqual(moved.uri, b.uri);
      after = engine.nextLineIndex();
      applyLegs(bed, engine, [a, moved]);
      await waitForLine(engine, new RegExp(`mirror leg moved .*\\bleg=${b.id}\\b`), after);
      const started = await waitForLine(engine, new RegExp(`mirror leg rebuild started .*\\bleg=${b.id}\\b`), after, IN_SYNC_TIMEOUT_MS);
      assert.equal(started["kind"], "delta", "a moved leg keeps its metadata: only what it missed is copied");
      await waitForLine(engine, new RegExp(`mirror leg in sync .*\\bleg=${b.id}\\b`), after, IN_SYNC_TIMEOUT_MS);
      for (let k = 0; k < 2; k++) assert.ok((await client.read(7 * REGION_BYTES, data.length)).equals(data));
    } finally {
      await client.close();
    }
    const stop = await engine.stop();
    assert.equal(stop.code, 0, engine.stderr());
    const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", a.uri, bed.leg(1).uri], { timeoutMs: 60_000 });
    assert.equal(compare.code, 0, `legs a and b differ: ${describeResult(compare)}`);
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- a changed leg set at start

test("an engine started with a changed leg set: a leg out of sync on record is replaced (full rebuild); one in sync on record cannot be left out", { timeout: 90_000 }, async () => {
  const bed = await startBed(tmp, "restart");
  try {
    const [a, b, c] = [bed.leg(0), bed.leg(1), bed.leg(2)];
    bed.writeLegs([a, b]);
    let engine = await bed.startEngine();
    const data = randomBytes(MIB);
    const client = await NbdClient.connect(engine.uri);
    await client.write(2 * MIB, data, true);
    await client.close();
    const after = engine.nextLineIndex();
    await (bed.units[1] as RunningUnit).kill9();
    await waitForLine(engine, new RegExp(`mirror leg failed .*\\bleg=${b.id}\\b`), after);
    const stop = await engine.stop();
    assert.equal(stop.code, 0, engine.stderr());

    // Leaving out a, in sync on record, is refused: it may hold writes the others lack. (b's unit back, with b's older metadata.)
    const dead = bed.units[1] as RunningUnit;
    bed.units[1] = await startUnit({ dataDir: dead.dataDir, capacity: UNIT_CAPACITY, volumes: [{ name: VOLUME, size: LEG_BYTES }], name: dead.name, listen: `127.0.0.1:${dead.port}` });
    bed.writeLegs([c, b]);
    const refused = await runEngineToExit({ mirror: `${bed.name}-mirror`, legs: [], legsFile: bed.legsFile, listen: `unix:${tmp.file(`${bed.name}-refused.sock`)}` }, 20_000);
    assert.notEqual(refused.code, 0, refused.description);
    assert.match(refused.stderr, new RegExp(`leg ${a.id} of mirror .* was in sync .* not among the legs given`), refused.description);

    // b (out of sync on record, its unit gone) replaced by c at start: c is rebuilt in full.
    bed.writeLegs([a, c]);
    engine = await bed.startEngine();
    const started = await engine.waitForLine(new RegExp(`mirror leg rebuild started .*\\bleg=${c.id}\\b`), { timeoutMs: EVENT_TIMEOUT_MS });
    assert.equal(logFields(started.text)["kind"], "full");
    await engine.waitForLine(new RegExp(`mirror leg in sync .*\\bleg=${c.id}\\b`), { timeoutMs: IN_SYNC_TIMEOUT_MS });
    const back = await NbdClient.connect(engine.uri);
    for (let k = 0; k < 2; k++) assert.ok((await back.read(2 * MIB, MIB)).equals(data), "both legs serve the data");
    await back.close();
    const stopped = await engine.stop();
    assert.equal(stopped.code, 0, engine.stderr());
    const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", a.uri, c.uri], { timeoutMs: 60_000 });
    assert.equal(compare.code, 0, `legs a and c differ: ${describeResult(compare)}`);
  } finally {
    await bed.close();
  }
});
