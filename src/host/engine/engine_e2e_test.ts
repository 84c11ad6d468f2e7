// The mirror engine end to end (issue 6, "Proof"), with real processes on
// loopback: two `ipsan unit`s, each serving one 65 MiB volume (64 MiB of data
// plus METADATA_BYTES), and `ipsan host engine` serving the 64 MiB mirror of
// the two on a Unix socket. Units are killed with kill -9 and restarted on
// the same data dir and port (so the engine's leg URI stays valid); engines
// are stopped with SIGTERM or killed with kill -9. Every wait is bounded.
//
// - fio randwrite QD 16 with crc32c verify runs through the engine while one
//   leg's unit is killed: zero errors; the unit returns, the leg is in sync
//   again by a delta resync, and the two legs are byte-identical (data and
//   metadata) on the units' own exports (qemu-img compare).
// - Delta bound: with writes to three known regions while a leg is away, the
//   resync copies at most 2x those bytes rounded up to whole regions.
// - ext4 on the mirror (nbdfuse + loop) while a leg's unit is killed during
//   a file copy: e2fsck clean, every file's checksum right, legs identical
//   after the resync.
// - kill -9 of the engine with writes in flight: a new engine with the same
//   flags starts, reconciles the regions that were being written, and data
//   written with FUA before the crash reads back; the legs are identical.
// - Refusal: an engine does not start without a leg its metadata lists as
//   in sync, and says which and why; with the leg back it starts. A leg
//   recorded out of sync does not hold it back.
// - A leg that returns right after writes it missed gets them too.
// - Two tests pin engine bugs this file found (a stale socket after kill -9
//   blocked a restart; an engine that could not listen stayed running).

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmSync } from "node:fs";
import { open } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import { after, before, test, type TestContext } from "node:test";
import { NbdClient } from "../../nbd/client.ts";
import { sha256 } from "../../testing/data.ts";
import { type Daemon, fileExists, startDaemon } from "../../testing/daemon.ts";
import { type EngineOptions, type RunningEngine, logFields, runEngineToExit, startEngine } from "../../testing/engine.ts";
import { describeResult, run, runOk, sleep } from "../../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { type RunningUnit, startUnit } from "../../testing/unit.ts";
import { METADATA_BYTES, regionBytesFor } from "./metadata.ts";
import { INTENT_AHEAD_REGIONS } from "./mirror.ts";

const MIB = 1024 * 1024;
const DATA_BYTES = 64 * MIB;
const LEG_BYTES = DATA_BYTES + METADATA_BYTES;
const REGION_BYTES = regionBytesFor(DATA_BYTES);
const UNIT_CAPACITY = "96M";
const VOLUME = "m";
/**
 * The engine keeps a region in its intent bitmap until it has been idle for
 * intentIdleMs (2 s by default), checked every intentIdleMs / 2; only then is
 * it recorded as missed by a leg that is away. Tests that want that path
 * (the missed bitmap) let written regions settle this long before the leg
 * returns; the test "writes made less than intentIdleMs before a leg
 * returns ..." covers a leg that returns sooner (the intent bitmap).
 */
const INTENT_SETTLE_MS = 3_500;
const LEG_EVENT_TIMEOUT_MS = 10_000;
const IN_SYNC_TIMEOUT_MS = 30_000;
const FIO_TIMEOUT_MS = 60_000;

let tmp: TempDir;
before(() => {
  tmp = makeTempDir("engine-e2e", memoryTmpBase());
});
after(() => {
  tmp?.remove();
});

// ---------------------------------------------------------------- test bed

/** Two units (legs "a" and "b"), each with one LEG_BYTES volume, on fixed data dirs. */
interface Bed {
  readonly name: string;
  readonly units: RunningUnit[];
  /** Starts leg i's unit again on its data dir and port. */
  restartUnit(i: number): Promise<RunningUnit>;
  legUri(i: number): string;
  engineOptions(): EngineOptions;
  /** Every engine started through startEngine() is killed by close(). */
  startEngine(): Promise<RunningEngine>;
  close(): Promise<void>;
}

const LEG_NAMES = ["a", "b"] as const;

async function startBed(name: string): Promise<Bed> {
  const dirs = LEG_NAMES.map((leg) => join(tmp.path, `${name}-${leg}`));
  const ports: number[] = [];
  const units: RunningUnit[] = [];
  const engines: RunningEngine[] = [];
  const socketPath = join(tmp.path, `${name}.sock`);
  const unitOptions = (i: number, listen: string): Parameters<typeof startUnit>[0] => ({
    dataDir: dirs[i] as string,
    capacity: UNIT_CAPACITY,
    volumes: [{ name: VOLUME, size: LEG_BYTES }],
    name: `${name}-${LEG_NAMES[i]}`,
    listen,
  });
  const bed: Bed = {
    name,
    units,
    async restartUnit(i) {
      const old = units[i] as RunningUnit;
      if (old.running()) await old.stop();
      // The same port: the engine's leg URI names it.
      const unit = await startUnit(unitOptions(i, `127.0.0.1:${ports[i]}`));
      units[i] = unit;
      return unit;
    },
    legUri: (i) => (units[i] as RunningUnit).uri(VOLUME),
    engineOptions: () => ({ mirror: `${name}-mirror`, legs: LEG_NAMES.map((leg, i) => ({ name: leg, uri: bed.legUri(i) })), listen: `unix:${socketPath}` }),
    async startEngine() {
      const engine = await startEngine(bed.engineOptions());
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
      const unit = await startUnit(unitOptions(i, "127.0.0.1:0"));
      units.push(unit);
      ports.push(unit.port);
    }
  } catch (error) {
    await bed.close();
    throw error;
  }
  return bed;
}

/**
 * The legs compared byte for byte, metadata MiB included, read from the
 * units' own exports (the engine must be stopped): `qemu-img compare` on the
 * two NBD URIs. With `copy`, each export is first copied whole with nbdcopy
 * into a file and the files are compared: qemu-img asks the unit for block
 * status once per extent, and a unit answers a block status request in
 * ~6 ms, so a volume fragmented by random 4 KiB writes into thousands of
 * extents takes minutes to compare in place. Returns the ms it took.
 */
async function assertLegsIdentical(bed: Bed, how: "nbd" | "copy" = "nbd"): Promise<number> {
  const startedAt = performance.now();
  let images = [bed.legUri(0), bed.legUri(1)];
  if (how === "copy") {
    images = images.map((_, i) => tmp.file(`${bed.name}-leg${i}.img`));
    for (const [i, file] of images.entries()) {
      rmSync(file, { force: true });
      await runOk("nbdcopy", [bed.legUri(i), file], { timeoutMs: 60_000 });
    }
  }
  try {
    const result = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", ...images], { timeoutMs: 60_000 });
    assert.equal(result.code, 0, `the legs differ: ${describeResult(result)}`);
  } finally {
    if (how === "copy") for (const file of images) rmSync(file, { force: true });
  }
  return performance.now() - startedAt;
}

/** Stops an engine with SIGTERM; it must exit 0 by itself. */
async function stopEngine(engine: RunningEngine): Promise<void> {
  const status = await engine.stop();
  assert.deepEqual({ code: status.code, forced: status.forced }, { code: 0, forced: false }, `engine did not exit 0 on SIGTERM:\n${engine.stderr()}`);
}

/** Bytes of the whole regions that `writes` touch. */
function regionBytesTouched(writes: readonly { offset: number; length: number }[]): number {
  const regions = new Set<number>();
  for (const { offset, length } of writes) for (let r = Math.floor(offset / REGION_BYTES); r <= Math.floor((offset + length - 1) / REGION_BYTES); r++) regions.add(r);
  return regions.size * REGION_BYTES;
}

/** Kills leg i's unit with kill -9 and waits for the engine's "mirror leg failed" line; returns the ms between. */
async function killLegUnit(bed: Bed, engine: RunningEngine, i: number): Promise<number> {
  const after = engine.nextLineIndex();
  const killedAt = performance.now();
  await (bed.units[i] as RunningUnit).kill9();
  const failed = await engine.waitForLine(new RegExp(`mirror leg failed .*\\bleg=${LEG_NAMES[i]}\\b`), { timeoutMs: LEG_EVENT_TIMEOUT_MS, after });
  return failed.atMs - killedAt;
}

interface Resync {
  kind: string;
  totalBytes: number;
  copiedBytes: number;
  /** From the unit's ready line to the leg in sync. */
  ms: number;
}

/** Restarts leg i's unit and waits for the engine's rebuild of that leg to start and finish. */
async function restartAndResync(bed: Bed, engine: RunningEngine, i: number): Promise<Resync> {
  const leg = LEG_NAMES[i];
  const after = engine.nextLineIndex();
  await bed.restartUnit(i);
  const backAt = performance.now();
  const started = await engine.waitForLine(new RegExp(`mirror leg rebuild started .*\\bleg=${leg}\\b`), { timeoutMs: IN_SYNC_TIMEOUT_MS, after });
  const inSync = await engine.waitForLine(new RegExp(`mirror leg in sync .*\\bleg=${leg}\\b`), { timeoutMs: IN_SYNC_TIMEOUT_MS, after });
  const startFields = logFields(started.text);
  const syncFields = logFields(inSync.text);
  return { kind: startFields["kind"] ?? "?", totalBytes: Number(startFields["bytes"]), copiedBytes: Number(syncFields["copiedBytes"]), ms: inSync.atMs - backAt };
}

// ---------------------------------------------------------------- fio

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; iops: number };
  write: { io_bytes: number; iops: number; runtime: number };
}

async function fio(name: string, uri: string, args: readonly string[]): Promise<{ result: Awaited<ReturnType<typeof run>>; job: FioJob | undefined }> {
  const output = tmp.file(`${name}.fio.json`);
  rmSync(output, { force: true });
  // No verify state file: fio would drop local-NAME-verify.state into the working directory.
  const result = await run("fio", [`--name=${name}`, "--ioengine=nbd", `--uri=${uri}`, "--output-format=json", `--output=${output}`, "--verify_state_save=0", ...args], { timeoutMs: FIO_TIMEOUT_MS });
  let job: FioJob | undefined;
  try {
    job = (JSON.parse(readFileSync(output, "utf8").replace(/^[^{]*/, "")) as { jobs: FioJob[] }).jobs[0];
  } catch {
    // no JSON (fio failed early): the caller's assertion shows its output
  }
  return { result, job };
}

// ---------------------------------------------------------------- 1. fio through a unit kill

const FIO_WRITE_S = 8;
const FIO_KILL_AFTER_MS = 2_000;

test("fio randwrite QD16 crc32c through the engine survives kill -9 of a leg's unit; delta resync; legs identical", { timeout: 120_000 }, async (t: TestContext) => {
  const bed = await startBed("fio");
  try {
    const engine = await bed.startEngine();
    const blocks = DATA_BYTES / 4096;
    let fioDone = false;
    const fioRun = fio("mirror-verify", engine.uri, [
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=16",
      `--size=${DATA_BYTES}`,
      "--verify=crc32c",
      "--verify_fatal=1",
      "--do_verify=1",
      "--randrepeat=1",
      // Paced so the write phase lasts ~FIO_WRITE_S whatever the machine; then fio reads every block back and checks it.
      `--rate_iops=,${Math.ceil(blocks / FIO_WRITE_S)}`,
    ]).finally(() => {
      fioDone = true;
    });
    await sleep(FIO_KILL_AFTER_MS);
    assert.equal(fioDone, false, "fio must still be running when the unit dies");
    const detectMs = await killLegUnit(bed, engine, 0);
    t.diagnostic(`unit kill -9 to the engine's "mirror leg failed": ${detectMs.toFixed(1)} ms`);

    const { result, job } = await fioRun;
    assert.equal(result.code, 0, describeResult(result));
    assert.ok(job !== undefined, describeResult(result));
    assert.equal(job.error, 0, describeResult(result));
    assert.equal(job.write.io_bytes, DATA_BYTES, "fio wrote every block");
    assert.equal(job.read.io_bytes, DATA_BYTES, "fio's verify pass read back (and checked) every block");
    const awayShare = Math.max(0, 1 - FIO_KILL_AFTER_MS / job.write.runtime);
    t.diagnostic(`fio: ${job.write.iops.toFixed(0)} write IOPS (paced), ${job.read.iops.toFixed(0)} verify read IOPS; ~${((job.write.io_bytes * awayShare) / MIB).toFixed(1)} MiB written while leg a was away`);

    await sleep(INTENT_SETTLE_MS);
    const resync = await restartAndResync(bed, engine, 0);
    t.diagnostic(`resync of leg a: kind=${resync.kind} totalBytes=${resync.totalBytes} copiedBytes=${resync.copiedBytes} (${(resync.copiedBytes / MIB).toFixed(1)} MiB), ${resync.ms.toFixed(0)} ms from the unit's return to in sync`);
    assert.equal(resync.kind, "delta", "a returning leg gets a delta resync");
    // Random 4 KiB writes over the whole volume touch nearly every 1 MiB region: the bound that means something is in the next test.
    assert.ok(resync.copiedBytes <= DATA_BYTES, `a delta resync copies at most the volume, not ${resync.copiedBytes}`);
    assert.ok(resync.copiedBytes > 0, "leg a missed writes, so something was copied");

    await stopEngine(engine);
    t.diagnostic(`legs identical: qemu-img compare over NBD took ${(await assertLegsIdentical(bed)).toFixed(0)} ms`);
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- 1b. the delta bound

test("delta resync after writes to 3 known regions copies at most 2x those regions' bytes", { timeout: 60_000 }, async (t: TestContext) => {
  const bed = await startBed("delta");
  try {
    const engine = await bed.startEngine();
    const client = await NbdClient.connect(engine.uri);
    try {
      await killLegUnit(bed, engine, 0);
      // While leg a is away: 1 MiB, 64 KiB and 4 KiB in regions 3, 17 and 40 (written with FUA).
      const writes = [
        { offset: 3 * REGION_BYTES, data: randomBytes(REGION_BYTES) },
        { offset: 17 * REGION_BYTES + 128 * 1024, data: randomBytes(64 * 1024) },
        { offset: 40 * REGION_BYTES + REGION_BYTES - 4096, data: randomBytes(4096) },
      ];
      for (const w of writes) await client.write(w.offset, w.data, true);
      await client.flush();
      const writtenBytes = writes.reduce((sum, w) => sum + w.data.length, 0);
      const regionBytes = regionBytesTouched(writes.map((w) => ({ offset: w.offset, length: w.data.length })));
      await sleep(INTENT_SETTLE_MS);

      const resync = await restartAndResync(bed, engine, 0);
      t.diagnostic(`written while leg a was away: ${writtenBytes} bytes in ${regionBytes / REGION_BYTES} regions of ${REGION_BYTES}; resync kind=${resync.kind} copiedBytes=${resync.copiedBytes}, ${resync.ms.toFixed(0)} ms`);
      assert.equal(resync.kind, "delta");
      // The bound: copiedBytes <= 2 * written, with "written" rounded up to whole regions (the engine tracks regions, not bytes).
      assert.ok(resync.copiedBytes <= 2 * regionBytes, `delta resync copied ${resync.copiedBytes} bytes, more than 2 x ${regionBytes}`);
      assert.ok(resync.copiedBytes >= writtenBytes, `delta resync copied ${resync.copiedBytes} bytes, less than the ${writtenBytes} bytes leg a missed`);

      // Reads alternate between in-sync legs: read each write twice so both legs serve it.
      for (const w of writes) for (let k = 0; k < 2; k++) assert.ok((await client.read(w.offset, w.data.length)).equals(w.data), `read ${k} at ${w.offset}`);
    } finally {
      await client.close();
    }
    await stopEngine(engine);
    t.diagnostic(`legs identical: qemu-img compare over NBD took ${(await assertLegsIdentical(bed)).toFixed(0)} ms`);
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- 2. ext4 through a unit kill

/** The engine's export as a file in a FUSE mount (nbdfuse), then as a loop device; detach() undoes both. */
async function attachLoop(uri: string, name: string): Promise<{ device: string; detach(): Promise<void> }> {
  const fuseDir = tmp.file(`fuse-${name}`);
  mkdirSync(fuseDir, { recursive: true });
  const pidFile = tmp.file(`nbdfuse-${name}.pid`);
  rmSync(pidFile, { force: true });
  let nbdfuse: Daemon;
  try {
    nbdfuse = await startDaemon("nbdfuse", ["-P", pidFile, join(fuseDir, "disk"), uri], { ready: fileExists(pidFile) });
  } catch (error) {
    await run("fusermount3", ["-u", "-z", fuseDir], { timeoutMs: 10_000 });
    throw error;
  }
  let device: string | undefined;
  const detach = async (): Promise<void> => {
    if (device !== undefined) {
      const detached = await run("losetup", ["-d", device]);
      if (detached.code !== 0) process.stderr.write(`cleanup: ${describeResult(detached)}\n`);
      device = undefined;
    }
    // fusermount3 -u makes nbdfuse flush, disconnect and exit by itself.
    for (let attempt = 0; attempt < 20 && nbdfuse.running(); attempt++) {
      await run("fusermount3", ["-u", fuseDir], { timeoutMs: 10_000 });
      if (nbdfuse.running()) await sleep(100);
    }
    await nbdfuse.stop();
  };
  try {
    device = (await runOk("losetup", ["--find", "--show", join(fuseDir, "disk")])).stdout.trim();
    assert.match(device, /^\/dev\/loop\d+$/);
    return { device, detach };
  } catch (error) {
    await detach();
    throw error;
  }
}

async function withMount<T>(device: string, mountDir: string, options: readonly string[], body: () => Promise<T>): Promise<T> {
  await runOk("mount", ["-t", "ext4", ...options, device, mountDir]);
  try {
    return await body();
  } finally {
    let result = await run("umount", [mountDir], { timeoutMs: 30_000 });
    if (result.code !== 0) result = await run("umount", ["-l", mountDir]);
    if (result.code !== 0) process.stderr.write(`cleanup: ${describeResult(result)}\n`);
  }
}

const EXT4_FILES = 48;
const EXT4_KILL_AT_FILE = 16;

test("ext4 on the mirror (nbdfuse + loop) survives kill -9 of a leg's unit during a file copy: e2fsck clean, every checksum right", { timeout: 90_000 }, async (t: TestContext) => {
  const bed = await startBed("ext4");
  const mountDir = tmp.file("ext4-mnt");
  mkdirSync(mountDir, { recursive: true });
  try {
    const engine = await bed.startEngine();
    const expected = new Map<string, string>();
    const first = await attachLoop(engine.uri, "write");
    try {
      await runOk("mkfs.ext4", ["-q", "-F", "-L", "ipsan-mirror", first.device], { timeoutMs: 60_000 });
      await withMount(first.device, mountDir, [], async () => {
        for (let f = 0; f < EXT4_FILES; f++) {
          if (f === EXT4_KILL_AT_FILE) t.diagnostic(`unit of leg a killed after ${f} files: "mirror leg failed" after ${(await killLegUnit(bed, engine, 0)).toFixed(1)} ms`);
          // 64 KiB to ~576 KiB each, fsynced, so the bytes go through the engine while the unit dies.
          const data = randomBytes(64 * 1024 + ((f * 104_729) % (512 * 1024)));
          const name = `file${f}.bin`;
          const handle = await open(join(mountDir, name), "w");
          try {
            await handle.writeFile(data);
            await handle.sync();
          } finally {
            await handle.close();
          }
          expected.set(name, sha256(data));
        }
      });
    } finally {
      await first.detach();
    }

    const second = await attachLoop(engine.uri, "check");
    try {
      const fsck = await run("e2fsck", ["-f", "-n", second.device], { timeoutMs: 60_000 });
      assert.equal(fsck.code, 0, `e2fsck is not clean: ${describeResult(fsck)}`);
      await withMount(second.device, mountDir, ["-o", "ro"], async () => {
        const wrong = [...expected].filter(([name, digest]) => sha256(readFileSync(join(mountDir, name))) !== digest).map(([name]) => name);
        assert.deepEqual(wrong, [], `${wrong.length} files differ`);
      });
    } finally {
      await second.detach();
    }

    await sleep(INTENT_SETTLE_MS);
    const resync = await restartAndResync(bed, engine, 0);
    t.diagnostic(`resync of leg a after the copy: kind=${resync.kind} copiedBytes=${resync.copiedBytes}, ${resync.ms.toFixed(0)} ms`);
    assert.equal(resync.kind, "delta");
    await stopEngine(engine);
    t.diagnostic(`legs identical: qemu-img compare over NBD took ${(await assertLegsIdentical(bed)).toFixed(0)} ms`);
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- writes just before a leg returns

// Found by this test at 9a89d17 (fixed since by dc08092, which found it in the
// simulation too): a region stays in the intent bitmap for intentIdleMs after
// its last write and only then is recorded as missed by a leg that is away,
// but a leg that came back sooner started its rebuild from its missed bitmap
// alone, so it was promoted in sync without those writes (copiedBytes=0) and
// half the reads of those blocks returned old data.
test(
  "writes made less than intentIdleMs before a leg returns are copied to it before it is promoted in sync",
  { timeout: 60_000 },
  async (t: TestContext) => {
    const bed = await startBed("recent");
    try {
      const engine = await bed.startEngine();
      const client = await NbdClient.connect(engine.uri);
      const written: { offset: number; data: Buffer }[] = [];
      try {
        await killLegUnit(bed, engine, 0);
        // Leg a's unit comes back while we keep writing distinct 4 KiB blocks (one every 50 ms) until the rebuild starts.
        const after = engine.nextLineIndex();
        const restarted = bed.restartUnit(0);
        const deadline = performance.now() + IN_SYNC_TIMEOUT_MS;
        let rebuilding = false;
        void engine
          .waitForLine(/mirror leg rebuild started .*\bleg=a\b/, { timeoutMs: IN_SYNC_TIMEOUT_MS, after })
          .then(() => {
            rebuilding = true;
          })
          .catch(() => undefined);
        for (let i = 0; !rebuilding && performance.now() < deadline && i < 512; i++) {
          const w = { offset: 5 * REGION_BYTES + i * 4096, data: randomBytes(4096) };
          await client.write(w.offset, w.data, true);
          written.push(w);
          await sleep(50);
        }
        await restarted;
        const inSync = await engine.waitForLine(/mirror leg in sync .*\bleg=a\b/, { timeoutMs: IN_SYNC_TIMEOUT_MS, after });
        t.diagnostic(`${written.length} blocks written while leg a was away or returning; ${inSync.text}`);
        // What the application sees: reads alternate between the in-sync legs.
        const stale: number[] = [];
        for (const w of written) for (let k = 0; k < 2; k++) if (!(await client.read(w.offset, w.data.length)).equals(w.data)) stale.push(w.offset);
        assert.deepEqual(stale, [], `reads through the engine returned old data at ${stale.length} offsets (leg a was promoted in sync without them)`);
      } finally {
        await client.close();
      }
      await stopEngine(engine);
      t.diagnostic(`legs identical: qemu-img compare over NBD took ${(await assertLegsIdentical(bed)).toFixed(0)} ms`);
    } finally {
      await bed.close();
    }
  },
);

// ---------------------------------------------------------------- 3. engine crash

test("kill -9 of the engine with writes in flight: it starts again with the same flags, reconciles, and FUA data reads back", { timeout: 90_000 }, async (t: TestContext) => {
  const bed = await startBed("crash");
  try {
    const first = await bed.startEngine();
    const kept = { offset: 40 * MIB, data: randomBytes(4 * MIB) };
    const client = await NbdClient.connect(first.uri);
    try {
      await client.write(kept.offset, kept.data, true);
      await client.flush();
    } finally {
      await client.close();
    }
    const keptSha = sha256(kept.data);

    // Unpaced random writes over the first 32 MiB (away from the kept data) until the engine dies.
    let fioDone = false;
    const fioRun = fio("crash-load", first.uri, ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=0", `--size=${32 * MIB}`, "--time_based", "--runtime=30"]).finally(() => {
      fioDone = true;
    });
    await sleep(1_500);
    assert.equal(fioDone, false, "fio must still be writing when the engine is killed");
    await first.kill9();
    const load = await fioRun;
    assert.notEqual(load.result.code, 0, "fio lost its server, so it reports errors");

    // A killed engine leaves its socket file behind: the new one removes it (nothing listens behind it).
    const second = await bed.startEngine();
    const serving = await second.waitForLine(/mirror engine serving /, { timeoutMs: LEG_EVENT_TIMEOUT_MS });
    assert.equal(logFields(serving.text)["legs"], "a:in-sync,b:in-sync", serving.text);
    const reconciled = second.logLines().find((l) => /reconciling regions written before the last stop/.test(l.text));
    assert.ok(reconciled !== undefined, `the engine died mid-write, so a restart reconciles the regions being written:\n${second.stderr()}`);
    const regions = Number(logFields(reconciled.text)["regions"]);
    // fio wrote the first 32 regions; the kept data's 4 regions were written less than intentIdleMs before the kill, so they may be listed too,
    // and each run of consecutive regions marks INTENT_AHEAD_REGIONS more after it.
    const bound = 32 + kept.data.length / REGION_BYTES + 2 * INTENT_AHEAD_REGIONS;
    assert.ok(regions >= 1 && regions <= bound, `regions reconciled: ${regions} (at most ${bound})`);
    t.diagnostic(`after kill -9 mid-write: ${regions} regions reconciled on restart`);

    const reader = await NbdClient.connect(second.uri);
    try {
      // Twice: reads alternate between the in-sync legs.
      for (let k = 0; k < 2; k++) assert.equal(sha256(await reader.read(kept.offset, kept.data.length)), keptSha, `read ${k} of the data written with FUA before the crash`);
    } finally {
      await reader.close();
    }
    await stopEngine(second);
    // fio's random 4 KiB writes left thousands of extents: compare copies (see assertLegsIdentical).
    t.diagnostic(`legs identical: nbdcopy + qemu-img compare took ${(await assertLegsIdentical(bed, "copy")).toFixed(0)} ms`);
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- restart after kill -9 (a bug this file found, fixed in aa14e42)

test(
  "after kill -9 the engine starts again with the same --listen unix:PATH (the stale socket file is removed)",
  { timeout: 60_000 },
  async () => {
    const bed = await startBed("stale");
    try {
      const first = await bed.startEngine();
      await first.kill9();
      const second = await startEngine({ ...bed.engineOptions(), readyTimeoutMs: 5_000 }).catch((error: unknown) => error as Error);
      if (!(second instanceof Error)) await stopEngine(second);
      assert.ok(!(second instanceof Error), `an engine restarted with the same flags after kill -9 must serve: ${second instanceof Error ? second.message : ""}`);
    } finally {
      await bed.close();
    }
  },
);

test(
  "an engine whose socket another process serves exits non-zero at once, without touching the legs (a bug this file found, fixed in aa14e42)",
  { timeout: 60_000 },
  async () => {
    const bed = await startBed("busy");
    const socketPath = join(tmp.path, "busy-other.sock");
    const other = createServer();
    await new Promise<void>((resolve, reject) => {
      other.once("error", reject);
      other.listen(socketPath, resolve);
    });
    try {
      const outcome = await runEngineToExit({ ...bed.engineOptions(), listen: `unix:${socketPath}` }, 5_000);
      assert.equal(outcome.timedOut, false, `the engine was still running 5 s after it started: ${outcome.description}`);
      assert.equal(outcome.code, 1, outcome.description);
      assert.match(outcome.stderr, /EADDRINUSE|in use/, outcome.description);
    } finally {
      await new Promise<void>((resolve) => other.close(() => resolve()));
      await bed.close();
    }
  },
);

// ---------------------------------------------------------------- 4. refusal

test("an engine refuses to start without a leg its metadata lists in sync; starts with it back; a failed leg does not hold it back", { timeout: 90_000 }, async (t: TestContext) => {
  const bed = await startBed("refuse");
  try {
    const kept = { offset: 10 * MIB, data: randomBytes(MIB) };
    const readKept = async (engine: RunningEngine): Promise<void> => {
      const client = await NbdClient.connect(engine.uri);
      try {
        for (let k = 0; k < 2; k++) assert.ok((await client.read(kept.offset, kept.data.length)).equals(kept.data), `read ${k} of the kept data`);
      } finally {
        await client.close();
      }
    };
    const first = await bed.startEngine();
    const writer = await NbdClient.connect(first.uri);
    try {
      await writer.write(kept.offset, kept.data, true);
    } finally {
      await writer.close();
    }
    await stopEngine(first);

    // Leg a's unit goes away while no engine runs: the metadata on leg b still lists a in sync.
    await (bed.units[0] as RunningUnit).stop();
    const refused = await runEngineToExit(bed.engineOptions(), 15_000);
    t.diagnostic(`refusal: exit ${refused.code}: ${refused.stderr.trim().split("\n").pop() ?? ""}`);
    assert.equal(refused.timedOut, false, `the engine must exit by itself: ${refused.description}`);
    assert.equal(refused.code, 1, refused.description);
    assert.doesNotMatch(refused.stdout, /ready/, refused.description);
    assert.match(refused.stderr, /\bleg a\b/, `the message names the leg: ${refused.description}`);
    assert.match(refused.stderr, /in sync/, `the message says why: ${refused.description}`);
    assert.match(refused.stderr, /cannot be reached|unreachable/, `the message says why: ${refused.description}`);

    await bed.restartUnit(0);
    const second = await bed.startEngine();
    const serving = await second.waitForLine(/mirror engine serving /, { timeoutMs: LEG_EVENT_TIMEOUT_MS });
    assert.equal(logFields(serving.text)["legs"], "a:in-sync,b:in-sync", serving.text);
    await readKept(second);

    // Leg a fails while the engine runs: it is recorded out of sync, so the next engine starts without it.
    await killLegUnit(bed, second, 0);
    await stopEngine(second);
    const third = await bed.startEngine();
    const degraded = await third.waitForLine(/mirror engine serving /, { timeoutMs: LEG_EVENT_TIMEOUT_MS });
    assert.equal(logFields(degraded.text)["legs"], "a:failed,b:in-sync", degraded.text);
    await readKept(third);
    await stopEngine(third);
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- a leg that stops answering

test("a leg whose unit stops answering (SIGSTOP: sockets open, no replies) is failed after requestTimeoutMs and I/O goes on", { timeout: 90_000 }, async (t: TestContext) => {
  const bed = await startBed("frozen");
  const frozen = bed.units[0] as RunningUnit;
  try {
    const engine = await bed.startEngine();
    const client = await NbdClient.connect(engine.uri, { requestTimeoutMs: 30_000 });
    try {
      const before = randomBytes(64 * 1024);
      await client.write(0, before, true);
      process.kill(frozen.pid, "SIGSTOP");
      const data = randomBytes(64 * 1024);
      const started = Date.now();
      // The unit holds its sockets open and answers nothing: only the engine's request timeout (5 s) can free this write.
      await client.write(MIB, data, true);
      const stalledMs = Date.now() - started;
      t.diagnostic(`write stalled ${stalledMs} ms while leg a's unit was stopped`);
      assert.ok(stalledMs >= 4_000 && stalledMs < 10_000, `the write waited for the leg's request timeout (5 s), not for ever: ${stalledMs} ms`);
      const failed = await engine.waitForLine(/mirror leg failed .*leg=a/, { timeoutMs: LEG_EVENT_TIMEOUT_MS });
      assert.match(failed.text, /timed out/);
      // Later I/O does not wait again.
      const quick = Date.now();
      await client.write(2 * MIB, data, false);
      assert.ok((await client.read(MIB, data.length)).equals(data));
      assert.ok((await client.read(0, before.length)).equals(before));
      assert.ok(Date.now() - quick < 2_000, "I/O after the leg was failed does not wait for it");
    } finally {
      process.kill(frozen.pid, "SIGCONT");
      await client.close();
    }
    // Once the unit runs again, the leg comes back and is rebuilt.
    await engine.waitForLine(/mirror leg in sync .*leg=a/, { timeoutMs: IN_SYNC_TIMEOUT_MS });
  } finally {
    await bed.close();
  }
});

// ---------------------------------------------------------------- a clean stop

test("after a clean stop (SIGTERM) the next engine has nothing to reconcile, even with a leg failed", { timeout: 60_000 }, async () => {
  const bed = await startBed("clean");
  try {
    const first = await bed.startEngine();
    const client = await NbdClient.connect(first.uri);
    try {
      await client.write(0, randomBytes(256 * 1024), false);
      await bed.units[0]?.kill9();
      await first.waitForLine(/mirror leg failed .*leg=a/, { timeoutMs: LEG_EVENT_TIMEOUT_MS });
      await client.write(5 * MIB, randomBytes(256 * 1024), false);
    } finally {
      await client.close();
    }
    await stopEngine(first);
    await bed.restartUnit(0);
    const second = await bed.startEngine();
    await second.waitForLine(/mirror engine serving /, { timeoutMs: LEG_EVENT_TIMEOUT_MS });
    assert.equal(second.logLines().find((l) => /reconciling regions/.test(l.text)), undefined, `a clean stop leaves no intent regions:\n${second.stderr()}`);
    // The failed leg still gets what it missed.
    await second.waitForLine(/mirror leg in sync .*leg=a/, { timeoutMs: IN_SYNC_TIMEOUT_MS });
    await stopEngine(second);
  } finally {
    await bed.close();
  }
});
