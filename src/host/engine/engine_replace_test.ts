// Leg replacement and full rebuilds in the mirror engine (issue 6, sections
// 2 and 3, host side), with real processes on loopback: three `ipsan unit`s
// (legs a, b and the replacement c), each with one 65 MiB volume (64 MiB of
// data plus METADATA_BYTES), and `ipsan host engine --legs-file
// --status-file` serving the mirror. A leg is replaced the way the host agent
// does it: the legs file is rewritten and the engine gets SIGHUP.
//
// - Live replacement while fio randwrite (QD 16, crc32c verify) runs through
//   the engine: b's unit is killed for good and c takes its place; fio
//   finishes with zero errors, c is rebuilt in full and in sync, legs a and c
//   are byte-identical (qemu-img compare on the units' own exports); then
//   a's unit is killed and the volume's data is all on c, read from c's own
//   export.
// - kill -9 of the engine mid full rebuild, restart: the rebuild resumes
//   from its checkpoint. Bytes sent to c (counted by a TCP relay in front of
//   its unit) over both engines stay under 1.2x the written part of a
//   half-written volume: a full rebuild skips the never-written half
//   (BLOCK_STATUS) and does not start again from zero. Its canary: the same
//   scenario on a build whose full rebuild writes no marker (so a restarted
//   engine takes the leg for blank and copies it from zero) must fail.
// - The status file shows c rebuilding (with progress) and then in sync.
// - Refusal: a replacement leg holding another mirror's metadata, or data
//   without metadata, is refused and not one byte of it changes.
// - A move (the same leg at another address: its unit restarted on another
//   port) reconnects there and resyncs by delta; a legs file that does not
//   parse, or that would change the number of legs, is refused as a whole
//   and the engine goes on serving.

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, connect, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { after, before, test, type TestContext } from "node:test";
import { NbdClient } from "../../nbd/client.ts";
import { type RunningEngine, logFields, startEngine } from "../../testing/engine.ts";
import { describeResult, run, runOk, sleep } from "../../testing/process.ts";
import { patchedBuild } from "../../testing/patched_build.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { type RunningUnit, startUnit } from "../../testing/unit.ts";
import { type EngineStatus, type LegEntry, readStatusFile } from "../legs.ts";
import { METADATA_BYTES, encodeHeader, headerSlotOffset, regionBytesFor } from "./metadata.ts";

const MIB = 1024 * 1024;
const DATA_BYTES = 64 * MIB;
const LEG_BYTES = DATA_BYTES + METADATA_BYTES;
const REGION_BYTES = regionBytesFor(DATA_BYTES);
const UNIT_CAPACITY = "96M";
const VOLUME = "m";
const IN_SYNC_TIMEOUT_MS = 40_000;
const EVENT_TIMEOUT_MS = 10_000;
const FIO_TIMEOUT_MS = 60_000;
const POLL_MS = 50;

let tmp: TempDir;
before(() => {
  tmp = makeTempDir("engine-replace", memoryTmpBase());
});
after(() => {
  tmp?.remove();
});

// ---------------------------------------------------------------- test bed

/** A TCP relay in front of a unit that counts the bytes the engine sends through it (requests and written data). */
interface Relay {
  readonly port: number;
  sentBytes(): number;
  close(): Promise<void>;
}

async function startRelay(targetPort: number): Promise<Relay> {
  let sent = 0;
  const sockets = new Set<Socket>();
  const server: Server = createServer((client) => {
    const upstream = connect({ host: "127.0.0.1", port: targetPort });
    sockets.add(client);
    sockets.add(upstream);
    client.on("data", (chunk: Buffer) => {
      sent += chunk.length;
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const end = (): void => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", end);
    upstream.on("close", end);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  assert.ok(address !== null && typeof address === "object");
  return {
    port: address.port,
    sentBytes: () => sent,
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

interface Bed {
  readonly name: string;
  readonly units: RunningUnit[];
  readonly legsFile: string;
  readonly statusFile: string;
  /** Leg i's entry for the legs file (optionally through a relay port). */
  leg(i: number, viaPort?: number): LegEntry;
  writeLegs(legs: readonly LegEntry[]): void;
  startEngine(extraArgs?: readonly string[], ipsanBin?: string): Promise<RunningEngine>;
  close(): Promise<void>;
}

const LEG_NAMES = ["a", "b", "c"] as const;

async function startBed(name: string): Promise<Bed> {
  const dirs = LEG_NAMES.map((leg) => join(tmp.path, `${name}-${leg}`));
  const units: RunningUnit[] = [];
  const engines: RunningEngine[] = [];
  const socketPath = join(tmp.path, `${name}.sock`);
  const legsFile = join(tmp.path, `${name}.legs.json`);
  const statusFile = join(tmp.path, `${name}.status.json`);
  const bed: Bed = {
    name,
    units,
    legsFile,
    statusFile,
    leg(i, viaPort) {
      const unit = units[i] as RunningUnit;
      const uri = viaPort === undefined ? unit.uri(VOLUME) : `nbd://127.0.0.1:${viaPort}/${VOLUME}`;
      return { id: `${name}-${LEG_NAMES[i]}`, uri, unit: unit.name, volume: `${VOLUME}-${LEG_NAMES[i]}` };
    },
    writeLegs(legs) {
      writeFileSync(`${legsFile}.tmp`, JSON.stringify(legs));
      // Renamed into place, as the agent does: the engine never reads half a file.
      rmSync(legsFile, { force: true });
      writeFileSync(legsFile, readFileSync(`${legsFile}.tmp`));
    },
    async startEngine(extraArgs = [], ipsanBin = undefined) {
      const engine = await startEngine({
        ...(ipsanBin === undefined ? {} : { ipsanBin }),
        mirror: `${name}-mirror`,
        legs: [],
        legsFile,
        listen: `unix:${socketPath}`,
        extraArgs: ["--status-file", statusFile, ...extraArgs],
      });
      engines.push(engine);
      return engine;
    },
    async close() {
      for (const engine of engines) if (engine.running()) await engine.kill9();
      for (const unit of units) await unit.stop();
      for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
      rmSync(socketPath, { force: true });
    },
  };
  try {
    for (const [i, dir] of dirs.entries()) {
      mkdirSync(dir, { recursive: true });
      units.push(await startUnit({ dataDir: dir, capacity: UNIT_CAPACITY, volumes: [{ name: VOLUME, size: LEG_BYTES }], name: `${name}-${LEG_NAMES[i]}`, listen: "127.0.0.1:0" }));
    }
  } catch (error) {
    await bed.close();
    throw error;
  }
  return bed;
}

/** Replaces the engine's legs as the agent does: the legs file, then SIGHUP. */
function applyLegs(bed: Bed, engine: RunningEngine, legs: readonly LegEntry[]): void {
  bed.writeLegs(legs);
  process.kill(engine.pid, "SIGHUP");
}

async function waitForLine(engine: RunningEngine, pattern: RegExp, after: number, timeoutMs = EVENT_TIMEOUT_MS): Promise<Record<string, string>> {
  return logFields((await engine.waitForLine(pattern, { timeoutMs, after })).text);
}

/** Reads the status file until `done` holds (bounded); every status seen is kept. */
async function watchStatus(path: string, done: (status: EngineStatus) => boolean, timeoutMs: number, seen: EngineStatus[]): Promise<EngineStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await readStatusFile(path).catch(() => undefined);
    if (status !== undefined) {
      if (JSON.stringify(seen[seen.length - 1]?.legs) !== JSON.stringify(status.legs)) seen.push(status);
      if (done(status)) return status;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting on the status file; last: ${JSON.stringify(status)}`);
    await sleep(POLL_MS);
  }
}

function legState(status: EngineStatus, id: string): string | undefined {
  return status.legs.find((l) => l.id === id)?.state;
}

/** SHA-256 of an NBD export's bytes [0, length) read with nbdcopy (a real client) into a file. */
async function exportHash(bed: Bed, uri: string, length: number, label: string): Promise<string> {
  const file = tmp.file(`${bed.name}-${label}.img`);
  rmSync(file, { force: true });
  await runOk("nbdcopy", [uri, file], { timeoutMs: 60_000 });
  try {
    return createHash("sha256").update(readFileSync(file).subarray(0, length)).digest("hex");
  } finally {
    rmSync(file, { force: true });
  }
}

async function fio(name: string, uri: string, args: readonly string[]): Promise<{ result: Awaited<ReturnType<typeof run>>; job: { error: number; read: { io_bytes: number }; write: { io_bytes: number } } | undefined }> {
  const output = tmp.file(`${name}.fio.json`);
  rmSync(output, { force: true });
  const result = await run("fio", [`--name=${name}`, "--ioengine=nbd", `--uri=${uri}`, "--output-format=json", `--output=${output}`, "--verify_state_save=0", ...args], { timeoutMs: FIO_TIMEOUT_MS });
  let job;
  try {
    job = (JSON.parse(readFileSync(output, "utf8").replace(/^[^{]*/, "")) as { jobs: { error: number; read: { io_bytes: number }; write: { io_bytes: number } }[] }).jobs[0];
  } catch {
    // no JSON: the caller's assertion shows fio's output
  }
  return { result, job };
}

// ---------------------------------------------------------------- (a) live replacement under fio, (d) the status file

const FIO_WRITE_S = 8;

test("a leg replaced by a blank leg on a third unit while fio randwrite crc32c runs: 0 errors, full rebuild, legs identical, data all on the new leg", { timeout: 150_000 }, async (t: TestContext) => {
  const bed = await startBed("live");
  try {
    const [a, b, c] = [bed.leg(0), bed.leg(1), bed.leg(2)];
    bed.writeLegs([a, b]);
    const engine = await bed.startEngine();
    const blocks = DATA_BYTES / 4096;
    const fioRun = fio("replace-verify", engine.uri, [
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=16",
      `--size=${DATA_BYTES}`,
      "--verify=crc32c",
      "--verify_fatal=1",
      "--do_verify=1",
      "--randrepeat=1",
      `--rate_iops=,${Math.ceil(blocks / FIO_WRITE_S)}`,
    ]);
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

    const { result, job } = await fioRun;
    assert.equal(result.code, 0, describeResult(result));
    assert.ok(job !== undefined, describeResult(result));
    assert.equal(job.error, 0, describeResult(result));
    assert.equal(job.read.io_bytes, DATA_BYTES, "fio's verify pass read back (and checked) every block");

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

// ---------------------------------------------------------------- (b) kill -9 of the engine mid full rebuild

const WRITTEN_REGIONS = 32;
/** Rebuild rate of the first engine: slow enough to kill it in the middle. */
const SLOW_RATE = "6M";
/** The first engine is killed once this share of the written part has been copied. */
const KILL_AT_SHARE = 0.4;

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
  const bed = await startBed(name);
  const relay = await startRelay((bed.units[2] as RunningUnit).port);
  try {
    const [a, b] = [bed.leg(0), bed.leg(1)];
    const c = bed.leg(2, relay.port);
    bed.writeLegs([a, b]);
    let engine = await bed.startEngine(["--rebuild-rate", SLOW_RATE], ipsanBin);
    // Half the volume written (regions 0..31), the rest never written.
    const client = await NbdClient.connect(engine.uri);
    try {
      for (let r = 0; r < WRITTEN_REGIONS; r++) await client.write(r * REGION_BYTES, randomBytes(REGION_BYTES), r === WRITTEN_REGIONS - 1);
      await client.flush();
    } finally {
      await client.close();
    }
    const written = WRITTEN_REGIONS * REGION_BYTES;
    const expected = await exportHash(bed, engine.uri, DATA_BYTES, "before");
    let after = engine.nextLineIndex();
    await (bed.units[1] as RunningUnit).kill9();
    await waitForLine(engine, new RegExp(`mirror leg failed .*\\bleg=${b.id}\\b`), after);
    after = engine.nextLineIndex();
    applyLegs(bed, engine, [a, c]);
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
    const stop = await engine.stop();
    assert.equal(stop.code, 0, engine.stderr());
    const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", a.uri, bed.leg(2).uri], { timeoutMs: 60_000 });
    assert.equal(compare.code, 0, `legs a and c differ: ${describeResult(compare)}`);
  } finally {
    await relay.close();
    await bed.close();
  }
}

// ---------------------------------------------------------------- (c) refusal

test("a replacement leg holding another mirror's metadata, or data without metadata, is refused and not a byte of it changes", { timeout: 90_000 }, async (t: TestContext) => {
  const bed = await startBed("refuse");
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
  const bed = await startBed("move");
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
