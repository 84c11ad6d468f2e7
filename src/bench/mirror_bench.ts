// `npm run bench:mirror`: issue 6's performance benchmark. Two real `ipsan
// unit` processes on 127.0.0.1 (storage files on the same disk) serve, in one
// run:
//   mirror  a mirrored volume through `ipsan host engine` (leg a on unit A,
//           leg b on unit B; fio reaches the engine on its Unix socket, the
//           engine reaches the units over TCP),
//   single  a single-copy volume on unit A, used directly (TCP),
//   quorum  QEMU's quorum driver as a mirror: qemu-storage-daemon with a
//           quorum blockdev (vote-threshold=1) over two NBD children, one
//           volume on each of the same two units (TCP), exported over NBD on
//           a Unix socket (only when qemu-storage-daemon is installed).
// fio jobs (ioengine=nbd, one connection) alternate between them every round,
// the order rotating; the table shows medians, spread, and the ratios
// mirror/single and mirror/quorum against the issue's targets.
//
// Then, on the mirror:
//   failover  a QD 1 loop of 4 KiB writes (nbdsh, CLOCK_MONOTONIC timestamps)
//             runs through the engine while leg b's unit gets kill -9, and
//             again while it is frozen with SIGSTOP (the request-timeout
//             path): the pause the application sees around the event.
//   resync    after each, the unit comes back: delta resync bytes (the
//             engine's "rebuild started"/"in sync" lines) against the bytes
//             written while the leg was away.
//   rebuild   a blank leg replaces leg b (the engine restarted on a volume
//             whose metadata MiB is zero): bytes / seconds from "rebuild
//             started" to "in sync", alternating with nbdcopy of the same
//             size between the same two units (unit A -> unit B).
// See docs/benchmarks.md, "Mirrored volumes (engine) vs single copy vs qemu quorum".

import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, release, tmpdir, totalmem } from "node:os";
import { pathToFileURL } from "node:url";
import { METADATA_BYTES, regionBytesFor } from "../host/engine/metadata.ts";
import { type Daemon, startDaemon } from "../testing/daemon.ts";
import { writeRandomFile } from "../testing/data.ts";
import { type RunningEngine, logFields, startEngine } from "../testing/engine.ts";
import { describeResult, formatCommand, run, runOk, sleep } from "../testing/process.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";
import { clockTicksPerSecond, cpuSeconds, syncFileSystem } from "./proc.ts";
import { UsageError, errorMessage } from "../util/errors.ts";
import { formatSize, parseSize } from "../util/size.ts";
import { type BenchJob, JOBS, fioArgs, median, parseBenchFlags, pickList, positiveInteger, writes } from "./report.ts";

const MIB = 1024 * 1024;
const UNIT_SPARE_BYTES = 64 * MIB;
const FIO_TIMEOUT_MARGIN_MS = 60_000;
const FILL_TIMEOUT_MS = 600_000;
const IN_SYNC_TIMEOUT_MS = 300_000;
const LEG_EVENT_TIMEOUT_MS = 15_000;
const WRITE_BYTES = 4096;

// ---------------------------------------------------------------- options (pure)

/** engine1 (not run by default): the engine over one leg, to separate the cost of the engine hop from that of writing two legs. */
export const CONFIGS = ["mirror", "single", "quorum", "engine1"] as const;
export type ConfigName = (typeof CONFIGS)[number];
export const DEFAULT_CONFIGS: readonly ConfigName[] = ["mirror", "single", "quorum"];
export const PHASES = ["perf", "failover", "rebuild"] as const;
export type Phase = (typeof PHASES)[number];

/** Issue 6, "Performance": the mirror's share of the single copy per job. */
export const SINGLE_TARGETS: Readonly<Record<string, number>> = { randwrite4k: 0.6, randread4k: 0.8, seqwrite1m: 0.5, seqread1m: 0.8 };
export const MIRROR_JOB_NAMES = ["randwrite4k", "randread4k", "seqwrite1m", "seqread1m"] as const;
export const FAILOVER_TARGET_MS = 1_000;
export const REBUILD_TARGET_RATIO = 0.5;
/** The issue's proof bound for a delta resync: at most 2x the bytes written while the leg was away. */
export const DELTA_BOUND = 2;

export interface MirrorBenchOptions {
  rounds: number;
  runtimeS: number;
  sizeBytes: number;
  jobs: readonly BenchJob[];
  configs: readonly ConfigName[];
  phases: readonly Phase[];
  quorumReadPattern: "quorum" | "fifo";
  dir: string | undefined;
  jsonPath: string | undefined;
}

export const MIRROR_BENCH_USAGE = `usage: node dist/bench/mirror_bench.js [--rounds N] [--runtime S] [--size SIZE] [--jobs a,b] [--configs a,b] [--phases a,b]
                                       [--quorum-read-pattern quorum|fifo] [--dir DIR] [--json FILE]
  jobs:    ${MIRROR_JOB_NAMES.join(", ")} (default all)
  configs: ${CONFIGS.join(", ")} (default ${DEFAULT_CONFIGS.join(",")}; quorum needs qemu-storage-daemon;
           engine1 = the engine over a single leg on unit A, a diagnostic)
  phases:  ${PHASES.join(", ")} (default all)
  --rounds 3 --runtime 5 --size 1G; --rounds also sets the rebuild/nbdcopy pairs; --dir defaults to the OS temp dir`;

export function parseMirrorBenchOptions(argv: readonly string[]): MirrorBenchOptions {
  const { values } = parseBenchFlags(argv, MIRROR_BENCH_USAGE, {
    rounds: { type: "string" },
    runtime: { type: "string" },
    size: { type: "string" },
    jobs: { type: "string" },
    configs: { type: "string" },
    phases: { type: "string" },
    "quorum-read-pattern": { type: "string" },
    dir: { type: "string" },
    json: { type: "string" },
  });
  const sizeBytes = parseSize(values.size ?? "1G", "--size");
  if (sizeBytes < 64 * MIB || sizeBytes % MIB !== 0) throw new UsageError(`--size: expected a whole number of MiB, at least 64M, got "${values.size}"`);
  const jobNames = pickList(values.jobs ?? MIRROR_JOB_NAMES.join(","), "--jobs", MIRROR_JOB_NAMES);
  const pattern = values["quorum-read-pattern"] ?? "quorum";
  if (pattern !== "quorum" && pattern !== "fifo") throw new UsageError(`--quorum-read-pattern: expected quorum or fifo, got "${pattern}"`);
  const configs = pickList(values.configs ?? DEFAULT_CONFIGS.join(","), "--configs", CONFIGS);
  if (!configs.includes("mirror")) throw new UsageError("--configs: the mirror is what this benchmark measures; include it");
  return {
    rounds: positiveInteger(values.rounds ?? "3", "--rounds", 50),
    runtimeS: positiveInteger(values.runtime ?? "5", "--runtime", 600),
    sizeBytes,
    // In the issue's order: writes first, so every read job reads data the run wrote.
    jobs: MIRROR_JOB_NAMES.filter((name) => jobNames.includes(name)).map((name) => JOBS.find((job) => job.name === name) as BenchJob),
    configs: CONFIGS.filter((c) => configs.includes(c)),
    phases: PHASES.filter((p) => pickList(values.phases ?? PHASES.join(","), "--phases", PHASES).includes(p)),
    quorumReadPattern: pattern,
    dir: values.dir,
    jsonPath: values.json,
  };
}

// ---------------------------------------------------------------- results (pure)

export interface Measurement {
  round: number;
  job: string;
  config: ConfigName;
  /** IOPS for 4 KiB jobs, MiB/s for 1 MiB jobs (the job's metric). */
  value: number;
  latencyUsMean: number;
  /** utime+stime of every server process on the path (engine/qsd and the units) over wall time. */
  serverCpuCores: number;
  /** CPU time per I/O (us) of each server process on the path, by role (engine, qsd, unit A, unit B). */
  cpuUsPerIo: Record<string, number>;
}

export interface JobSummary {
  job: BenchJob;
  median: Partial<Record<ConfigName, number>>;
  min: Partial<Record<ConfigName, number>>;
  max: Partial<Record<ConfigName, number>>;
  latencyUs: Partial<Record<ConfigName, number>>;
  cpu: Partial<Record<ConfigName, number>>;
  /** Median CPU us per I/O by role. */
  cpuUsPerIo: Partial<Record<ConfigName, Record<string, number>>>;
  perRound: Partial<Record<ConfigName, number[]>>;
}

export function summarizeMirror(jobs: readonly BenchJob[], configs: readonly ConfigName[], measurements: readonly Measurement[]): JobSummary[] {
  return jobs.map((job) => {
    const s: JobSummary = { job, median: {}, min: {}, max: {}, latencyUs: {}, cpu: {}, cpuUsPerIo: {}, perRound: {} };
    for (const config of configs) {
      const mine = measurements.filter((m) => m.job === job.name && m.config === config).sort((a, b) => a.round - b.round);
      if (mine.length === 0) continue;
      const values = mine.map((m) => m.value);
      s.median[config] = median(values);
      s.min[config] = Math.min(...values);
      s.max[config] = Math.max(...values);
      s.latencyUs[config] = median(mine.map((m) => m.latencyUsMean));
      s.cpu[config] = median(mine.map((m) => m.serverCpuCores));
      const roles = Object.keys(mine[0]?.cpuUsPerIo ?? {});
      s.cpuUsPerIo[config] = Object.fromEntries(roles.map((role) => [role, median(mine.map((m) => m.cpuUsPerIo[role] ?? Number.NaN))]));
      s.perRound[config] = values;
    }
    return s;
  });
}

function fmt(value: number | undefined, metric: BenchJob["metric"]): string {
  if (value === undefined || !Number.isFinite(value)) return "-";
  return metric === "iops" ? `${Math.round(value)}` : `${value.toFixed(0)}`;
}

function ratioOf(a: number | undefined, b: number | undefined): number | undefined {
  return a === undefined || b === undefined || !(b > 0) ? undefined : a / b;
}

function signed(ms: number): string {
  return ms >= 0 ? `+${ms.toFixed(1)}` : ms.toFixed(1);
}

function fmtRatio(r: number | undefined): string {
  return r === undefined ? "-" : `${r.toFixed(2)}x`;
}

export function textTable(rows: readonly (readonly string[])[]): string {
  const widths = rows[0]?.map((_, column) => Math.max(...rows.map((row) => (row[column] ?? "").length))) ?? [];
  return rows.map((row) => row.map((cell, column) => cell.padEnd(widths[column] ?? 0)).join("  ").trimEnd()).join("\n");
}

const LABEL: Record<ConfigName, string> = { mirror: "mirror (engine)", single: "single", quorum: "quorum (qsd)", engine1: "engine, 1 leg" };

/** Medians with [min..max] over rounds, ratios of the medians, each against its target. */
export function formatMirrorSummary(summaries: readonly JobSummary[], configs: readonly ConfigName[]): string {
  const header = ["job", "unit", ...configs.map((c) => `${LABEL[c]} median [min..max]`)];
  if (configs.includes("single")) header.push("mirror/single", "target");
  if (configs.includes("quorum")) header.push("mirror/quorum");
  if (configs.includes("engine1") && configs.includes("single")) header.push("1 leg/single", "mirror/1 leg");
  const rows: string[][] = [header];
  for (const s of summaries) {
    const row = [s.job.name, s.job.metric === "iops" ? "IOPS" : "MiB/s"];
    for (const c of configs) row.push(`${fmt(s.median[c], s.job.metric)} [${fmt(s.min[c], s.job.metric)}..${fmt(s.max[c], s.job.metric)}]`);
    if (configs.includes("single")) {
      const r = ratioOf(s.median.mirror, s.median.single);
      const target = SINGLE_TARGETS[s.job.name];
      row.push(fmtRatio(r), target === undefined ? "-" : `>= ${target}x ${r === undefined ? "" : r >= target ? "met" : "NOT met"}`.trim());
    }
    if (configs.includes("quorum")) {
      const r = ratioOf(s.median.mirror, s.median.quorum);
      row.push(`${fmtRatio(r)}${r === undefined ? "" : r > 1 ? " ahead" : " behind"}`);
    }
    if (configs.includes("engine1") && configs.includes("single")) row.push(fmtRatio(ratioOf(s.median.engine1, s.median.single)), fmtRatio(ratioOf(s.median.mirror, s.median.engine1)));
    rows.push(row);
  }
  // Ratios within each round (the configurations ran one after the other), as a check on the ratio of medians.
  const paired = (s: JobSummary, other: ConfigName): string =>
    (s.perRound.mirror ?? []).map((v, i) => fmtRatio(ratioOf(v, s.perRound[other]?.[i]))).join(" ");
  const pairedWith = (["single", "quorum"] as const).filter((c) => configs.includes(c));
  const perRound: string[][] = [["every round", ...configs.map((c) => LABEL[c]), ...pairedWith.map((c) => `mirror/${c} by round`)]];
  for (const s of summaries) {
    perRound.push([s.job.name, ...configs.map((c) => (s.perRound[c] ?? []).map((v) => fmt(v, s.job.metric)).join(" ")), ...pairedWith.map((c) => paired(s, c))]);
  }
  const latency: string[][] = [["mean latency (us)", ...configs.map((c) => LABEL[c])]];
  for (const s of summaries) latency.push([s.job.name, ...configs.map((c) => s.latencyUs[c]?.toFixed(0) ?? "-")]);
  const cpu: string[][] = [["server-side CPU (cores; us per I/O by process)", ...configs.map((c) => `${LABEL[c]}`)]];
  for (const s of summaries) {
    cpu.push([
      s.job.name,
      ...configs.map((c) => {
        const parts = Object.entries(s.cpuUsPerIo[c] ?? {}).map(([role, us]) => `${role} ${us.toFixed(0)}`);
        return `${s.cpu[c]?.toFixed(2) ?? "-"} (${parts.join(" + ")})`;
      }),
    ]);
  }
  return [textTable(rows), textTable(perRound), textTable(latency), textTable(cpu)].join("\n\n");
}

/** The write loop's trace: one entry per 4 KiB write, times in CLOCK_MONOTONIC ns. */
export interface WriteTrace {
  startNs: bigint[];
  endNs: bigint[];
  offsets: number[];
  ok: boolean[];
  errors: string[];
}

export interface StallReport {
  /** Writes completed in the second before the event, and the p50 / p99 / max interval ending at each of them (ms). */
  beforeWrites: number;
  beforeP50Ms: number;
  beforeP99Ms: number;
  beforeMaxMs: number;
  /** The longest interval between two write completions that ends after the event and starts less than 10 s after it; its ends relative to the event (ms). */
  pauseMs: number;
  pauseFromMs: number;
  pauseToMs: number;
  /** First write completion after `sinceMs` (the engine's failure line), relative to the event (ms); undefined if none. */
  flowingAgainMs: number | undefined;
  /** Writes completed in the second after the end of the pause. */
  afterWrites: number;
  errors: number;
  /** Writes that completed after the event (they went out without the failed leg, or may have). */
  writesAfter: number;
  offsetsAfter: number[];
}

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] ?? Number.NaN;
}

/** What the application saw around `eventNs` (a kill -9 or SIGSTOP of a leg's unit). Pure. */
export function analyzeStall(trace: WriteTrace, eventNs: bigint, sinceNs: bigint | undefined): StallReport {
  const rel = (ns: bigint): number => Number(ns - eventNs) / 1e6;
  const ends = trace.endNs.map(rel);
  const before: number[] = [];
  for (let i = 1; i < ends.length; i++) {
    const a = ends[i - 1] as number;
    const b = ends[i] as number;
    if (b >= -1000 && b < 0) before.push(b - a);
  }
  before.sort((x, y) => x - y);
  let pause = { ms: 0, from: 0, to: 0 };
  for (let i = 1; i < ends.length; i++) {
    const a = ends[i - 1] as number;
    const b = ends[i] as number;
    if (b <= 0 || a > 10_000) continue;
    if (b - a > pause.ms) pause = { ms: b - a, from: a, to: b };
  }
  const since = sinceNs === undefined ? undefined : rel(sinceNs);
  const flowing = since === undefined ? undefined : ends.find((e) => e > since);
  const writesAfter: number[] = [];
  trace.endNs.forEach((end, i) => {
    if (end > eventNs && trace.ok[i] === true) writesAfter.push(trace.offsets[i] as number);
  });
  return {
    beforeWrites: ends.filter((e) => e >= -1000 && e < 0).length,
    beforeP50Ms: percentile(before, 50),
    beforeP99Ms: percentile(before, 99),
    beforeMaxMs: before.length > 0 ? (before[before.length - 1] as number) : Number.NaN,
    pauseMs: pause.ms,
    pauseFromMs: pause.from,
    pauseToMs: pause.to,
    flowingAgainMs: flowing,
    afterWrites: ends.filter((e) => e > pause.to && e <= pause.to + 1000).length,
    errors: trace.ok.filter((ok) => !ok).length,
    writesAfter: writesAfter.length,
    offsetsAfter: writesAfter,
  };
}

/** Distinct regions of `regionBytes` touched by writes of `lengthBytes` at `offsets`. */
export function regionsTouched(offsets: readonly number[], lengthBytes: number, regionBytes: number): number {
  const regions = new Set<number>();
  for (const offset of offsets) for (let r = Math.floor(offset / regionBytes); r <= Math.floor((offset + lengthBytes - 1) / regionBytes); r++) regions.add(r);
  return regions.size;
}

/** Write offsets and lengths from a fio write_iolog (versions 2 and 3: "[MS] FILE write OFFSET LENGTH"). */
export function parseIolog(text: string): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (const line of text.split("\n")) {
    // Version 3 lines start with a time stamp in ms: "2750 job.0.0 write 58691584 4096".
    const match = /^(?:\d+ )?\S+ write (\d+) (\d+)$/.exec(line.trim());
    if (match !== null) out.push({ offset: Number(match[1]), length: Number(match[2]) });
  }
  return out;
}

// ---------------------------------------------------------------- processes

function loadAverage(): string {
  return readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
}

const VOLUMES = {
  /** Unit A: leg a of the mirror, the single copy, quorum child 0. */
  a: { leg: "la", single: "single", quorum: "qa", oneLeg: "l1" },
  /** Unit B: leg b, a second leg-sized volume for the blank-leg rebuilds, quorum child 1. */
  b: { leg: "lb", spare: "lb2", quorum: "qb" },
};

interface Bed {
  units: RunningUnit[];
  ports: number[];
  dirs: string[];
  restartUnit(i: number): Promise<RunningUnit>;
}

async function startBed(work: TempDir, sizeBytes: number, oneLeg: boolean): Promise<Bed> {
  const leg = sizeBytes + METADATA_BYTES;
  const volumes = [
    [
      { name: VOLUMES.a.leg, size: leg },
      { name: VOLUMES.a.single, size: sizeBytes },
      { name: VOLUMES.a.quorum, size: sizeBytes },
      ...(oneLeg ? [{ name: VOLUMES.a.oneLeg, size: leg }] : []),
    ],
    [
      { name: VOLUMES.b.leg, size: leg },
      { name: VOLUMES.b.spare, size: leg },
      { name: VOLUMES.b.quorum, size: sizeBytes },
    ],
  ];
  const dirs = ["unit-a", "unit-b"].map((name) => work.file(name));
  const capacity = (oneLeg ? 4 : 3) * leg + UNIT_SPARE_BYTES;
  const options = (i: number, listen: string): Parameters<typeof startUnit>[0] => ({
    dataDir: dirs[i] as string,
    capacity,
    volumes: volumes[i] ?? [],
    name: `bench-${i === 0 ? "a" : "b"}`,
    listen,
  });
  const units: RunningUnit[] = [];
  const ports: number[] = [];
  for (let i = 0; i < 2; i++) {
    mkdirSync(dirs[i] as string, { recursive: true });
    const unit = await startUnit(options(i, "127.0.0.1:0"));
    units.push(unit);
    ports.push(unit.port);
  }
  return {
    units,
    ports,
    dirs,
    async restartUnit(i) {
      const old = units[i] as RunningUnit;
      if (old.running()) await old.stop();
      // The same port: the engine's leg URI and qsd's child name it.
      const unit = await startUnit(options(i, `127.0.0.1:${ports[i]}`));
      units[i] = unit;
      return unit;
    },
  };
}

function unitA(bed: Bed): RunningUnit {
  return bed.units[0] as RunningUnit;
}
function unitB(bed: Bed): RunningUnit {
  return bed.units[1] as RunningUnit;
}

const MIRROR_ID = "bench-mirror";

async function startMirrorEngine(work: TempDir, bed: Bed, legBVolume: string): Promise<RunningEngine> {
  return startEngine({
    mirror: MIRROR_ID,
    legs: [
      { name: "a", uri: unitA(bed).uri(VOLUMES.a.leg) },
      { name: "b", uri: unitB(bed).uri(legBVolume) },
    ],
    listen: `unix:${work.file("engine.sock")}`,
  });
}

interface Qsd {
  daemon: Daemon;
  uri: string;
  command: string;
}

async function startQsd(work: TempDir, bed: Bed, readPattern: "quorum" | "fifo"): Promise<Qsd> {
  const socket = work.file("qsd.sock");
  const pidFile = work.file("qsd.pid");
  const child = (node: string, unit: RunningUnit, exportName: string): string =>
    `driver=nbd,node-name=${node},server.type=inet,server.host=127.0.0.1,server.port=${unit.port},export=${exportName}`;
  const args = [
    "--blockdev",
    child("child0", unitA(bed), VOLUMES.a.quorum),
    "--blockdev",
    child("child1", unitB(bed), VOLUMES.b.quorum),
    "--blockdev",
    `driver=quorum,node-name=quorum0,vote-threshold=1,read-pattern=${readPattern},children.0=child0,children.1=child1`,
    "--nbd-server",
    `addr.type=unix,addr.path=${socket}`,
    "--export",
    "type=nbd,id=export0,node-name=quorum0,name=bench,writable=on",
    "--pidfile",
    pidFile,
  ];
  const daemon = await startDaemon("qemu-storage-daemon", args, { ready: () => existsSync(pidFile) && existsSync(socket) });
  return { daemon, uri: `nbd+unix:///bench?socket=${socket}`, command: formatCommand("qemu-storage-daemon", args) };
}

// ---------------------------------------------------------------- fio

interface FioDirection {
  iops: number;
  bw_bytes: number;
  io_bytes: number;
  lat_ns?: { mean: number };
}

interface Target {
  config: ConfigName;
  uri: string;
  /** The server processes on the path, by role. */
  pids: () => { role: string; pid: number }[];
}

async function runJob(job: BenchJob, target: Target, options: MirrorBenchOptions, work: TempDir, round: number, ticks: number): Promise<Measurement> {
  const outputPath = work.file(`fio-${job.name}-${target.config}-${round}.json`);
  const pids = target.pids();
  const cpuBefore = pids.map(({ pid }) => cpuSeconds(pid, ticks));
  const startMs = Date.now();
  const result = await run("fio", fioArgs(job, target.uri, options.runtimeS, outputPath), { timeoutMs: options.runtimeS * 1000 + FIO_TIMEOUT_MARGIN_MS });
  const wallS = (Date.now() - startMs) / 1000;
  const cpuUsed = pids.map(({ pid }, i) => cpuSeconds(pid, ticks) - (cpuBefore[i] ?? 0));
  if (result.code !== 0) throw new Error(`fio failed against ${target.config}: ${describeResult(result)}`);
  const parsed = JSON.parse(readFileSync(outputPath, "utf8")) as { jobs: { error: number; read: FioDirection; write: FioDirection }[] };
  const fioJob = parsed.jobs[0];
  if (fioJob === undefined || fioJob.error !== 0) throw new Error(`fio reported an error against ${target.config}: ${describeResult(result)}`);
  const direction = job.rw === "randread" || job.rw === "read" ? fioJob.read : fioJob.write;
  // CPU per I/O: the process's cores over the whole fio run (ramp included) divided by fio's measured IOPS.
  return {
    round,
    job: job.name,
    config: target.config,
    value: job.metric === "iops" ? direction.iops : direction.bw_bytes / MIB,
    latencyUsMean: (direction.lat_ns?.mean ?? Number.NaN) / 1000,
    serverCpuCores: cpuUsed.reduce((a, b) => a + b, 0) / wallS,
    cpuUsPerIo: Object.fromEntries(pids.map(({ role }, i) => [role, ((cpuUsed[i] ?? 0) / wallS / direction.iops) * 1e6])),
  };
}

// ---------------------------------------------------------------- the write loop

/**
 * nbdsh runs this: 4 KiB writes at queue depth 1 for `durationS`, sequential
 * from `base` (wrapping inside `span`), each with its start and end in
 * CLOCK_MONOTONIC ns (the clock process.hrtime.bigint() reads), written as
 * int64 arrays (starts, ends, offsets) then int8 ok flags.
 */
function writerScript(durationS: number, baseBytes: number, spanBytes: number, outPath: string): string {
  return `
import array, json, os, time, nbd
buf = os.urandom(${WRITE_BYTES})
starts = array.array('q'); ends = array.array('q'); offs = array.array('q'); oks = array.array('b')
errors = []
blocks = ${Math.floor(spanBytes / WRITE_BYTES)}
stop = time.monotonic_ns() + ${Math.round(durationS * 1e9)}
i = 0
while True:
    t0 = time.monotonic_ns()
    if t0 >= stop:
        break
    off = ${baseBytes} + (i % blocks) * ${WRITE_BYTES}
    ok = 1
    try:
        h.pwrite(buf, off)
    except nbd.Error as e:
        ok = 0
        if len(errors) < 5:
            errors.append(str(e))
    starts.append(t0); ends.append(time.monotonic_ns()); offs.append(off); oks.append(ok)
    i += 1
with open(${JSON.stringify(outPath)}, 'wb') as f:
    starts.tofile(f); ends.tofile(f); offs.tofile(f); oks.tofile(f)
print(json.dumps({"count": i, "errors": errors}))
`;
}

async function runWriter(uri: string, durationS: number, baseBytes: number, spanBytes: number, outPath: string): Promise<WriteTrace> {
  const result = await run("nbdsh", ["-u", uri, "-c", writerScript(durationS, baseBytes, spanBytes, outPath)], { timeoutMs: durationS * 1000 + 60_000 });
  if (result.code !== 0) throw new Error(`the write loop failed: ${describeResult(result)}`);
  const summary = JSON.parse(result.stdout.trim().split("\n").pop() ?? "{}") as { count: number; errors: string[] };
  const n = summary.count;
  const bytes = readFileSync(outPath);
  if (bytes.length !== n * 25) throw new Error(`write loop trace: ${bytes.length} bytes for ${n} writes`);
  const int64 = (k: number, i: number): bigint => bytes.readBigInt64LE((k * n + i) * 8);
  const trace: WriteTrace = { startNs: [], endNs: [], offsets: [], ok: [], errors: summary.errors };
  for (let i = 0; i < n; i++) {
    trace.startNs.push(int64(0, i));
    trace.endNs.push(int64(1, i));
    trace.offsets.push(Number(int64(2, i)));
    trace.ok.push(bytes[24 * n + i] === 1);
  }
  return trace;
}

/** performance.now() of this process as CLOCK_MONOTONIC ns (hrtime), from a pair read together. */
function clockPair(): { ms: number; ns: bigint } {
  return { ms: performance.now(), ns: process.hrtime.bigint() };
}
function msToNs(pair: { ms: number; ns: bigint }, ms: number): bigint {
  return pair.ns + BigInt(Math.round((ms - pair.ms) * 1e6));
}

interface Resync {
  kind: string;
  totalBytes: number;
  copiedBytes: number;
  /** "rebuild started" to "in sync" (ms, from the engine's lines as they arrived). */
  copyMs: number;
  /** From the unit being back (ready line, or SIGCONT) to "in sync". */
  backToInSyncMs: number;
}

async function waitResync(engine: RunningEngine, after: number, backAtMs: number, leg: string): Promise<Resync> {
  const started = await engine.waitForLine(new RegExp(`mirror leg rebuild started .*\\bleg=${leg}\\b`), { timeoutMs: IN_SYNC_TIMEOUT_MS, after });
  const inSync = await engine.waitForLine(new RegExp(`mirror leg in sync .*\\bleg=${leg}\\b`), { timeoutMs: IN_SYNC_TIMEOUT_MS, after });
  const startFields = logFields(started.text);
  return {
    kind: startFields["kind"] ?? "?",
    totalBytes: Number(startFields["bytes"]),
    copiedBytes: Number(logFields(inSync.text)["copiedBytes"]),
    copyMs: inSync.atMs - started.atMs,
    backToInSyncMs: inSync.atMs - backAtMs,
  };
}

interface FailoverResult {
  event: "kill -9" | "SIGSTOP";
  detectMs: number | undefined;
  stall: StallReport;
  writesTotal: number;
  awayWrittenBytes: number;
  awayRegionBytes: number;
  resync: Resync;
  loadAverage: string;
  notes: string[];
}

const WRITER_BEFORE_MS = 1_500;

/**
 * The write loop through the engine; `event` hits leg b's unit WRITER_BEFORE_MS
 * in; then (kill -9) the unit is restarted, or (SIGSTOP) continued, and the
 * delta resync is timed.
 */
async function failoverCycle(
  work: TempDir,
  bed: Bed,
  engine: RunningEngine,
  event: "kill -9" | "SIGSTOP",
  sizeBytes: number,
  regionBytes: number,
): Promise<FailoverResult> {
  const notes: string[] = [];
  const load = loadAverage();
  const durationS = event === "kill -9" ? 4 : 9;
  // Each cycle writes its own area: the first at the start of the volume, the second from the middle.
  const base = event === "kill -9" ? 0 : Math.floor(sizeBytes / 2 / regionBytes) * regionBytes;
  const after = engine.nextLineIndex();
  const writer = runWriter(engine.uri, durationS, base, Math.min(256 * MIB, sizeBytes / 2), work.file(`writer-${event === "kill -9" ? "kill" : "stop"}.bin`));
  await sleep(WRITER_BEFORE_MS);
  const unit = unitB(bed);
  const at = clockPair();
  if (event === "kill -9") unit.child.kill("SIGKILL");
  else unit.child.kill("SIGSTOP");
  const failed = await engine.waitForLine(/mirror leg failed .*\bleg=b\b/, { timeoutMs: LEG_EVENT_TIMEOUT_MS, after }).catch(() => undefined);
  if (failed === undefined) notes.push(`the engine logged no "mirror leg failed" within ${LEG_EVENT_TIMEOUT_MS} ms`);
  const trace = await writer;
  const stall = analyzeStall(trace, at.ns, failed === undefined ? undefined : msToNs(at, failed.atMs));
  if (trace.errors.length > 0) notes.push(`application errors: ${trace.errors.join("; ")}`);
  let awayOffsets = stall.offsetsAfter;
  let awayBytes = stall.writesAfter * WRITE_BYTES;
  let backAtMs: number;
  const resyncAfter = engine.nextLineIndex();
  if (event === "kill -9") {
    await unit.kill9();
    await bed.restartUnit(1);
    backAtMs = performance.now();
  } else {
    // While the leg is away (its unit frozen): 1,024 random 4 KiB writes over the whole volume, logged by fio.
    const iolog = work.file("away-random.iolog");
    const fio = await run(
      "fio",
      ["--name=away-random", "--ioengine=nbd", `--uri=${engine.uri}`, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--number_ios=1024", "--norandommap=1", "--randrepeat=0", `--write_iolog=${iolog}`, "--output-format=json", `--output=${work.file("away-random.json")}`],
      { timeoutMs: 120_000 },
    );
    if (fio.code !== 0) throw new Error(`fio (random writes while the leg is away) failed: ${describeResult(fio)}`);
    const writes = parseIolog(readFileSync(iolog, "utf8"));
    notes.push(`while leg b was away: the loop's ${stall.writesAfter} sequential 4 KiB writes, then fio's ${writes.length} random 4 KiB writes over the whole volume (${regionsTouched(writes.map((w) => w.offset), WRITE_BYTES, regionBytes)} regions)`);
    awayOffsets = [...awayOffsets, ...writes.map((w) => w.offset)];
    awayBytes += writes.reduce((sum, w) => sum + w.length, 0);
    unit.child.kill("SIGCONT");
    backAtMs = performance.now();
  }
  const resync = await waitResync(engine, resyncAfter, backAtMs, "b");
  return {
    event,
    detectMs: failed === undefined ? undefined : failed.atMs - at.ms,
    stall,
    writesTotal: trace.endNs.length,
    awayWrittenBytes: awayBytes,
    awayRegionBytes: regionsTouched(awayOffsets, WRITE_BYTES, regionBytes) * regionBytes,
    resync,
    loadAverage: load,
    notes,
  };
}

// ---------------------------------------------------------------- full rebuild vs nbdcopy

interface RebuildPair {
  round: number;
  rebuildBytes: number;
  rebuildMs: number;
  rebuildMiBps: number;
  nbdcopyMs: number;
  nbdcopyMiBps: number;
  order: string;
  loadAverage: string;
}

/** Zeroes a leg's metadata MiB (explicit zero bytes): the engine then sees a blank leg. */
async function blankLeg(uri: string, sizeBytes: number): Promise<void> {
  await runOk("nbdsh", ["-u", uri, "-c", `h.pwrite(bytes(${METADATA_BYTES}), ${sizeBytes})\nh.flush()`], { timeoutMs: 60_000 });
}

// ---------------------------------------------------------------- main

async function machineDescription(dir: string): Promise<Record<string, string>> {
  const version = async (command: string, args: string[]): Promise<string> => {
    const result = await run(command, args).catch(() => undefined);
    return result?.code === 0 ? (result.stdout.split("\n")[0]?.trim() ?? "") : "not installed";
  };
  const mount = await run("findmnt", ["-n", "-o", "SOURCE,FSTYPE", "-T", dir]);
  return {
    "load average at start": loadAverage(),
    cpus: `${availableParallelism()} x ${cpus()[0]?.model ?? "?"}`,
    memory: formatSize(totalmem()),
    kernel: release(),
    node: process.version,
    disk: `${mount.stdout.trim()} for ${dir} (both units' storage files)`,
    fio: await version("fio", ["--version"]),
    nbdsh: await version("nbdsh", ["--version"]),
    nbdcopy: await version("nbdcopy", ["--version"]),
    "qemu-storage-daemon": await version("qemu-storage-daemon", ["--version"]),
  };
}

async function hasQsd(): Promise<boolean> {
  const result = await run("qemu-storage-daemon", ["--version"]).catch(() => undefined);
  return result?.code === 0;
}

async function timedCopy(source: string, destination: string, what: string): Promise<number> {
  process.stderr.write(`mirror-bench: ${what}\n`);
  const result = await runOk("nbdcopy", ["--flush", source, destination], { timeoutMs: FILL_TIMEOUT_MS });
  return result.durationMs;
}

export async function mirrorBenchMain(argv: readonly string[]): Promise<number> {
  let options: MirrorBenchOptions;
  try {
    options = parseMirrorBenchOptions(argv);
  } catch (error) {
    process.stderr.write(`${errorMessage(error)}\n`);
    return error instanceof UsageError && errorMessage(error) === MIRROR_BENCH_USAGE ? 0 : 2;
  }
  const log = (text: string): void => void process.stderr.write(`mirror-bench: ${text}\n`);
  const notes: string[] = [];
  let configs = [...options.configs];
  if (configs.includes("quorum") && !(await hasQsd())) {
    configs = configs.filter((c) => c !== "quorum");
    notes.push("quorum: not measured, qemu-storage-daemon is not installed (Debian package qemu-system-common; scripts/setup installs it)");
  }
  const ticks = await clockTicksPerSecond();
  const previousTmp = process.env["TMPDIR"];
  process.env["TMPDIR"] = options.dir ?? tmpdir();
  const work = makeTempDir("mirror-bench");
  if (previousTmp === undefined) delete process.env["TMPDIR"];
  else process.env["TMPDIR"] = previousTmp;

  const size = options.sizeBytes;
  const regionBytes = regionBytesFor(size);
  let bed: Bed | undefined;
  let engine: RunningEngine | undefined;
  let qsd: Qsd | undefined;
  let engine1: RunningEngine | undefined;
  const lines: string[] = [];
  const json: Record<string, unknown> = { options: { ...options, jobs: options.jobs.map((j) => j.name) } };
  try {
    const machine = await machineDescription(work.path);
    json["machine"] = machine;
    log(`writing ${formatSize(size)} of seeded random data; starting two units in ${work.path}`);
    const dataPath = work.file("data.raw");
    writeRandomFile(dataPath, size, "ipsan-mirror-bench");
    bed = await startBed(work, size, configs.includes("engine1"));
    engine = await startMirrorEngine(work, bed, VOLUMES.b.leg);
    if (configs.includes("engine1")) {
      engine1 = await startEngine({ mirror: "bench-one-leg", legs: [{ name: "a", uri: unitA(bed).uri(VOLUMES.a.oneLeg) }], listen: `unix:${work.file("engine1.sock")}` });
    }
    const fills: Record<string, number> = {};
    fills["mirror (through the engine)"] = await timedCopy(dataPath, engine.uri, "filling the mirror through the engine");
    fills["single"] = await timedCopy(dataPath, unitA(bed).uri(VOLUMES.a.single), "filling the single-copy volume");
    if (engine1 !== undefined) fills["engine, 1 leg"] = await timedCopy(dataPath, engine1.uri, "filling the one-leg mirror through its engine");
    if (configs.includes("quorum")) {
      // Both children get the same bytes directly: they must agree before quorum reads vote.
      await timedCopy(dataPath, unitA(bed).uri(VOLUMES.a.quorum), "filling quorum child 0");
      await timedCopy(dataPath, unitB(bed).uri(VOLUMES.b.quorum), "filling quorum child 1");
      qsd = await startQsd(work, bed, options.quorumReadPattern);
    }
    // The rebuild target's data area is written too (its metadata MiB stays zero), so every rebuild overwrites allocated blocks.
    await timedCopy(dataPath, unitB(bed).uri(VOLUMES.b.spare), "filling the data area of leg b's replacement volume");

    const bedNow = bed;
    const engineNow = engine;
    const qsdNow = qsd;
    const engine1Now = engine1;
    const targets: Target[] = configs.map((config) =>
      config === "mirror"
        ? { config, uri: engineNow.uri, pids: () => [{ role: "engine", pid: engineNow.pid }, { role: "A", pid: unitA(bedNow).pid }, { role: "B", pid: unitB(bedNow).pid }] }
        : config === "single"
          ? { config, uri: unitA(bedNow).uri(VOLUMES.a.single), pids: () => [{ role: "A", pid: unitA(bedNow).pid }] }
          : config === "quorum"
            ? { config, uri: qsdNow?.uri ?? "", pids: () => [{ role: "qsd", pid: qsdNow?.daemon.pid ?? -1 }, { role: "A", pid: unitA(bedNow).pid }, { role: "B", pid: unitB(bedNow).pid }] }
            : { config, uri: engine1Now?.uri ?? "", pids: () => [{ role: "engine", pid: engine1Now?.pid ?? -1 }, { role: "A", pid: unitA(bedNow).pid }] },
    );
    lines.push(
      `ipsan mirror benchmark: ${options.rounds} round(s) x ${options.runtimeS} s per job, ${formatSize(size)} volumes, fio ioengine=nbd, one connection per job, configurations alternating (order rotating every round)`,
      ...Object.entries(machine).map(([k, v]) => `  ${k}: ${v}`),
      `  units: ${unitA(bed).args.join(" ")}`,
      `         ${unitB(bed).args.join(" ")}`,
      `  mirror: bin/ipsan ${engine.args.join(" ")}  (fio -> engine over its Unix socket; engine -> units over 127.0.0.1 TCP; region ${formatSize(regionBytes)})`,
      `  single: ${unitA(bed).uri(VOLUMES.a.single)} (fio -> unit A over 127.0.0.1 TCP)`,
      ...(engine1 !== undefined ? [`  engine, 1 leg: bin/ipsan ${engine1.args.join(" ")}  (a diagnostic: the engine hop without a second leg)`] : []),
      ...(qsd !== undefined ? [`  quorum: ${qsd.command}  (fio -> qsd over its Unix socket; qsd -> the same two units over 127.0.0.1 TCP, volumes ${VOLUMES.a.quorum} and ${VOLUMES.b.quorum})`] : []),
      `  fills (nbdcopy --flush, one each, for information): ${Object.entries(fills).map(([k, ms]) => `${k} ${((size / MIB) / (ms / 1000)).toFixed(0)} MiB/s`).join(", ")}`,
    );

    // ------------------------------------------------------------ perf
    if (options.phases.includes("perf")) {
      const measurements: Measurement[] = [];
      const loadStart = loadAverage();
      for (let round = 1; round <= options.rounds; round++) {
        for (const job of options.jobs) {
          const shift = (round - 1) % targets.length;
          for (const target of [...targets.slice(shift), ...targets.slice(0, shift)]) {
            const m = await runJob(job, target, options, work, round, ticks);
            if (writes(job)) await syncFileSystem(work.path);
            measurements.push(m);
            log(`round ${round}/${options.rounds} ${job.name.padEnd(12)} ${target.config.padEnd(7)} ${job.metric === "iops" ? `${Math.round(m.value)} IOPS` : `${m.value.toFixed(0)} MiB/s`}  lat ${m.latencyUsMean.toFixed(0)} us  cpu ${m.serverCpuCores.toFixed(2)}  load ${loadAverage()}`);
          }
        }
      }
      const summaries = summarizeMirror(options.jobs, configs, measurements);
      json["measurements"] = measurements;
      json["summaries"] = summaries.map((s) => ({ ...s, job: s.job.name }));
      lines.push("", `## fio (load average ${loadStart} at the start of the jobs, ${loadAverage()} at their end)`, "", formatMirrorSummary(summaries, configs));
      const verdict: string[] = [];
      for (const s of summaries) {
        const target = SINGLE_TARGETS[s.job.name];
        const r = ratioOf(s.median.mirror, s.median.single);
        const byRound = (other: ConfigName): string => (s.perRound.mirror ?? []).map((v, i) => fmtRatio(ratioOf(v, s.perRound[other]?.[i]))).join(" ");
        if (target !== undefined && r !== undefined) verdict.push(`target ${s.job.name} mirror >= ${target}x single: ${r >= target ? "met" : "NOT met"} (${r.toFixed(2)}x; by round ${byRound("single")})`);
        const q = ratioOf(s.median.mirror, s.median.quorum);
        if (q !== undefined) verdict.push(`target ${s.job.name} mirror ahead of quorum: ${q > 1 ? "met" : "NOT met"} (${q.toFixed(2)}x; by round ${byRound("quorum")})`);
      }
      lines.push("", ...verdict);
    }
    if (qsd !== undefined) {
      await qsd.daemon.stop();
      qsd = undefined;
    }
    if (engine1 !== undefined) {
      await engine1.stop();
      engine1 = undefined;
    }

    // ------------------------------------------------------------ failover and delta resync
    if (options.phases.includes("failover")) {
      const results: FailoverResult[] = [];
      for (const event of ["kill -9", "SIGSTOP"] as const) {
        log(`failover: the write loop through the engine, ${event} of leg b's unit`);
        results.push(await failoverCycle(work, bed, engine, event, size, regionBytes));
      }
      json["failover"] = results.map((r) => ({ ...r, stall: { ...r.stall, offsetsAfter: undefined } }));
      lines.push("", `## failover (nbdsh loop of 4 KiB writes at QD 1 through the engine; default engine timers)`, "");
      const rows: string[][] = [["event on leg b's unit", "load", "before: writes/s, p50/p99/max gap", "engine noticed", "I/O flowing again", "longest pause", "writes/s after", "app errors"]];
      for (const r of results) {
        const s = r.stall;
        rows.push([
          r.event,
          r.loadAverage,
          `${s.beforeWrites}, ${s.beforeP50Ms.toFixed(2)}/${s.beforeP99Ms.toFixed(2)}/${s.beforeMaxMs.toFixed(1)} ms`,
          r.detectMs === undefined ? "-" : `+${r.detectMs.toFixed(1)} ms`,
          s.flowingAgainMs === undefined ? "-" : `+${s.flowingAgainMs.toFixed(1)} ms`,
          `${s.pauseMs.toFixed(1)} ms (${signed(s.pauseFromMs)} .. ${signed(s.pauseToMs)})`,
          `${s.afterWrites}`,
          `${s.errors}`,
        ]);
      }
      lines.push(textTable(rows));
      lines.push(
        "",
        `"I/O flowing again": the first write completed after the engine's "mirror leg failed" line, from the event; "longest pause": the longest interval between two write completions that ends after the event (and starts before +10 s), from .. to in ms relative to the event.`,
      );
      const kill = results.find((r) => r.event === "kill -9");
      if (kill !== undefined) {
        const worst = Math.max(kill.stall.pauseToMs, kill.stall.flowingAgainMs ?? 0);
        lines.push(`target unit kill -9 -> application I/O flowing again < ${FAILOVER_TARGET_MS} ms: ${worst < FAILOVER_TARGET_MS ? "met" : "NOT met"} (${worst.toFixed(1)} ms)`);
      }
      lines.push("", "## delta resync (leg b back: its unit restarted after kill -9, or SIGCONT after SIGSTOP)", "");
      const resyncRows: string[][] = [["after", "written while away", "in whole regions", "resync kind", "copied", "copied/written", "copied/regions", "copy time", "back -> in sync"]];
      for (const r of results) {
        resyncRows.push([
          r.event,
          formatSize(r.awayWrittenBytes),
          formatSize(r.awayRegionBytes),
          r.resync.kind,
          formatSize(r.resync.copiedBytes),
          `${(r.resync.copiedBytes / r.awayWrittenBytes).toFixed(2)}x`,
          `${(r.resync.copiedBytes / r.awayRegionBytes).toFixed(2)}x`,
          `${r.resync.copyMs.toFixed(0)} ms`,
          `${r.resync.backToInSyncMs.toFixed(0)} ms`,
        ]);
      }
      lines.push(textTable(resyncRows));
      for (const r of results) for (const note of r.notes) lines.push(`${r.event}: ${note}`);
      for (const r of results) {
        const ratio = r.resync.copiedBytes / r.awayWrittenBytes;
        lines.push(`target delta resync <= ${DELTA_BOUND}x the bytes written while away (${r.event}): ${ratio <= DELTA_BOUND ? "met" : "NOT met"} (${ratio.toFixed(2)}x; ${(r.resync.copiedBytes / r.awayRegionBytes).toFixed(2)}x the ${formatSize(regionBytes)} regions they touched)`);
      }
    }

    // ------------------------------------------------------------ full rebuild vs nbdcopy
    if (options.phases.includes("rebuild")) {
      const pairs: RebuildPair[] = [];
      // Leg b alternates between its two volumes; the one it moves to is blanked first.
      let current: string = VOLUMES.b.leg;
      for (let round = 1; round <= options.rounds; round++) {
        const load = loadAverage();
        const next: string = current === VOLUMES.b.leg ? VOLUMES.b.spare : VOLUMES.b.leg;
        const rebuildFirst = round % 2 === 1;
        let rebuild: Resync | undefined;
        let copyMs = 0;
        const doRebuild = async (): Promise<void> => {
          if (engine !== undefined && engine.running()) {
            const status = await engine.stop();
            if (status.code !== 0) throw new Error(`engine did not stop cleanly: ${JSON.stringify(status)}\n${engine.stderr()}`);
          }
          await blankLeg(unitB(bed as Bed).uri(next), size);
          log(`rebuild ${round}/${options.rounds}: engine restarted with a blank leg b (${next})`);
          const startedAtMs = performance.now();
          engine = await startMirrorEngine(work, bed as Bed, next);
          rebuild = await waitResync(engine, 0, startedAtMs, "b");
          current = next;
        };
        const doCopy = async (): Promise<void> => {
          copyMs = await timedCopy(unitA(bed as Bed).uri(VOLUMES.a.single), unitB(bed as Bed).uri(VOLUMES.b.quorum), `nbdcopy ${round}/${options.rounds}: unit A ${VOLUMES.a.single} -> unit B ${VOLUMES.b.quorum}`);
        };
        if (rebuildFirst) {
          await doRebuild();
          await doCopy();
        } else {
          await doCopy();
          await doRebuild();
        }
        const r = rebuild as Resync | undefined;
        if (r === undefined) throw new Error("no rebuild measured");
        if (r.kind !== "full") throw new Error(`expected a full rebuild of the blank leg, the engine did a ${r.kind} one`);
        pairs.push({
          round,
          rebuildBytes: r.copiedBytes,
          rebuildMs: r.copyMs,
          rebuildMiBps: r.copiedBytes / MIB / (r.copyMs / 1000),
          nbdcopyMs: copyMs,
          nbdcopyMiBps: size / MIB / (copyMs / 1000),
          order: rebuildFirst ? "rebuild, nbdcopy" : "nbdcopy, rebuild",
          loadAverage: load,
        });
        log(`rebuild ${round}: ${pairs[pairs.length - 1]?.rebuildMiBps.toFixed(0)} MiB/s, nbdcopy ${pairs[pairs.length - 1]?.nbdcopyMiBps.toFixed(0)} MiB/s`);
      }
      json["rebuild"] = pairs;
      const rebuildMedian = median(pairs.map((p) => p.rebuildMiBps));
      const copyMedian = median(pairs.map((p) => p.nbdcopyMiBps));
      lines.push("", `## full rebuild of a blank leg vs nbdcopy (${formatSize(size)}, unit A -> unit B; engine default rate ceiling 512 MiB/s)`, "");
      const rows: string[][] = [["round", "load", "order", "rebuild bytes", "rebuild time", "rebuild MiB/s", "nbdcopy time", "nbdcopy MiB/s", "ratio"]];
      for (const p of pairs) {
        rows.push([String(p.round), p.loadAverage, p.order, formatSize(p.rebuildBytes), `${(p.rebuildMs / 1000).toFixed(2)} s`, p.rebuildMiBps.toFixed(0), `${(p.nbdcopyMs / 1000).toFixed(2)} s`, p.nbdcopyMiBps.toFixed(0), `${(p.rebuildMiBps / p.nbdcopyMiBps).toFixed(2)}x`]);
      }
      const pairedRatios = pairs.map((p) => p.rebuildMiBps / p.nbdcopyMiBps);
      rows.push(["median", "", "", "", "", rebuildMedian.toFixed(0), "", copyMedian.toFixed(0), `${(rebuildMedian / copyMedian).toFixed(2)}x (of the medians; median by round ${median(pairedRatios).toFixed(2)}x)`]);
      lines.push(textTable(rows));
      lines.push(
        "",
        `rebuild time: the engine's "mirror leg rebuild started" to "mirror leg in sync" lines; nbdcopy time: the whole nbdcopy --flush process (connect to exit), ${formatSize(size)} from ${VOLUMES.a.single} on unit A to ${VOLUMES.b.quorum} on unit B.`,
        `target full rebuild >= ${REBUILD_TARGET_RATIO}x nbdcopy: ${rebuildMedian / copyMedian >= REBUILD_TARGET_RATIO ? "met" : "NOT met"} (${(rebuildMedian / copyMedian).toFixed(2)}x the median nbdcopy rate; by round ${pairedRatios.map((r) => `${r.toFixed(2)}x`).join(" ")})`,
      );
    }
    if (notes.length > 0) lines.push("", ...notes);
    lines.push("", `load average at the end: ${loadAverage()}`);
    process.stdout.write(`${lines.join("\n")}\n`);
    if (options.jsonPath !== undefined) writeFileSync(options.jsonPath, `${JSON.stringify(json, (_, v: unknown) => (typeof v === "bigint" ? v.toString() : v), 2)}\n`);
    return 0;
  } finally {
    if (qsd !== undefined) await qsd.daemon.stop().catch(() => undefined);
    if (engine1 !== undefined && engine1.running()) await engine1.stop().catch(() => undefined);
    if (engine !== undefined && engine.running()) await engine.stop().catch(() => undefined);
    if (bed !== undefined) {
      for (const unit of bed.units) {
        // A unit left frozen by a failed SIGSTOP cycle must be continued before it can stop.
        if (unit.running()) unit.child.kill("SIGCONT");
        await unit.stop().catch(() => undefined);
      }
    }
    work.remove();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  mirrorBenchMain(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error: unknown) => {
      process.stderr.write(`mirror-bench: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      process.exitCode = 1;
    },
  );
}
