// The test bed of the mirror engine's leg replacement tests
// (engine_replace_test.ts, engine_rebuild_resume_test.ts): three real
// `ipsan unit`s (legs a, b and the replacement c), each with one 65 MiB
// volume (64 MiB of data plus METADATA_BYTES), an engine run with
// --legs-file and --status-file, a TCP relay that counts the bytes the engine
// sends to a unit, and helpers that read the status file and hash an export
// with nbdcopy. Every wait is bounded.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type RunningEngine, logFields, startEngine } from "./engine.ts";
import { describeResult, run, runOk, sleep } from "./process.ts";
import type { TempDir } from "./tmp.ts";
import { startTcpProxy } from "./tcp_proxy.ts";
import { type RunningUnit, startUnit } from "./unit.ts";
import { type EngineStatus, type LegEntry, readStatusFile } from "../host/legs.ts";
import { METADATA_BYTES, regionBytesFor } from "../host/engine/metadata.ts";

export const MIB = 1024 * 1024;
export const DATA_BYTES = 64 * MIB;
export const LEG_BYTES = DATA_BYTES + METADATA_BYTES;
export const REGION_BYTES = regionBytesFor(DATA_BYTES);
export const UNIT_CAPACITY = "96M";
export const VOLUME = "m";
export const IN_SYNC_TIMEOUT_MS = 40_000;
export const EVENT_TIMEOUT_MS = 10_000;
export const POLL_MS = 50;

// ---------------------------------------------------------------- test bed

/** A TCP relay in front of a unit that counts the bytes the engine sends through it (requests and written data). */
export interface Relay {
  readonly port: number;
  sentBytes(): number;
  close(): Promise<void>;
}

export async function startRelay(targetPort: number): Promise<Relay> {
  const proxy = await startTcpProxy({ targetPort });
  return { port: proxy.port, sentBytes: () => proxy.bytesToTarget(), close: () => proxy.close() };
}

export interface Bed {
  readonly name: string;
  readonly tmp: TempDir;
  readonly units: RunningUnit[];
  readonly legsFile: string;
  readonly statusFile: string;
  /** Leg i's entry for the legs file (optionally through a relay port). */
  leg(i: number, viaPort?: number): LegEntry;
  writeLegs(legs: readonly LegEntry[]): void;
  startEngine(extraArgs?: readonly string[], ipsanBin?: string): Promise<RunningEngine>;
  close(): Promise<void>;
}

export const LEG_NAMES = ["a", "b", "c"] as const;

export async function startBed(tmp: TempDir, name: string): Promise<Bed> {
  const dirs = LEG_NAMES.map((leg) => join(tmp.path, `${name}-${leg}`));
  const units: RunningUnit[] = [];
  const engines: RunningEngine[] = [];
  const socketPath = join(tmp.path, `${name}.sock`);
  const legsFile = join(tmp.path, `${name}.legs.json`);
  const statusFile = join(tmp.path, `${name}.status.json`);
  const bed: Bed = {
    name,
    tmp,
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
      renameSync(`${legsFile}.tmp`, legsFile);
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
export function applyLegs(bed: Bed, engine: RunningEngine, legs: readonly LegEntry[]): void {
  bed.writeLegs(legs);
  process.kill(engine.pid, "SIGHUP");
}

export async function waitForLine(engine: RunningEngine, pattern: RegExp, after: number, timeoutMs = EVENT_TIMEOUT_MS): Promise<Record<string, string>> {
  return logFields((await engine.waitForLine(pattern, { timeoutMs, after })).text);
}

/** Reads the status file until `done` holds (bounded); every status seen is kept. */
export async function watchStatus(path: string, done: (status: EngineStatus) => boolean, timeoutMs: number, seen: EngineStatus[]): Promise<EngineStatus> {
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

export function legState(status: EngineStatus, id: string): string | undefined {
  return status.legs.find((l) => l.id === id)?.state;
}

/** SHA-256 of an NBD export's bytes [0, length) read with nbdcopy (a real client) into a file of the bed's. */
export async function exportHash(bed: Bed, uri: string, length: number, label: string): Promise<string> {
  return exportSha256(uri, length, bed.tmp.file(`${bed.name}-${label}.img`));
}

/** SHA-256 of an NBD export's bytes [0, length), copied with nbdcopy into `file` (removed after). */
export async function exportSha256(uri: string, length: number, file: string): Promise<string> {
  rmSync(file, { force: true });
  await runOk("nbdcopy", [uri, file], { timeoutMs: 60_000 });
  try {
    return createHash("sha256").update(readFileSync(file).subarray(0, length)).digest("hex");
  } finally {
    rmSync(file, { force: true });
  }
}

/** Stops the engine (it must exit 0), then legs a and c must be byte-identical on their units' exports (qemu-img compare). */
export async function stopAndCompareLegs(bed: Bed, engine: RunningEngine): Promise<void> {
  const stop = await engine.stop();
  assert.equal(stop.code, 0, engine.stderr());
  const compare = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", bed.leg(0).uri, bed.leg(2).uri], { timeoutMs: 60_000 });
  assert.equal(compare.code, 0, `legs a and c differ: ${describeResult(compare)}`);
}
