// `npm run bench:iscsi`: the unit's iSCSI frontend against tgt (Debian's
// user-space iSCSI target, file-backed LUN) and against the same unit's own
// NBD frontend on the same volume (issue 10's targets: at least 3x tgt and at
// least 0.8x NBD). Every job runs with `qemu-img bench` (qemu's iscsi:// and
// nbd:// drivers alike); 4 KiB random reads also with libiscsi's iscsi-perf
// for the two iSCSI targets. Backing data is the same random file for all;
// rounds rotate the servers' order; the table shows medians with [min..max].
// See docs/benchmarks.md.

import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, release, tmpdir } from "node:os";
import { pathToFileURL } from "node:url";
import { iscsiTargetName } from "../iscsi/names.ts";
import { freeTcpPort } from "../testing/daemon.ts";
import { newSeed, writeRandomFile } from "../testing/data.ts";
import { describeResult, run, runOk } from "../testing/process.ts";
import { startTgt, type RunningTgt } from "../testing/tgt.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { UsageError, errorMessage } from "../util/errors.ts";
import { wantsHelp } from "../util/flags.ts";
import { formatSize, parseSize } from "../util/size.ts";
import { textTable } from "./mirror_bench.ts";
import { clockTicksPerSecond, cpuSeconds, syncFileSystem } from "./proc.ts";
import { median, parseBenchFlags, pickList, positiveInteger } from "./report.ts";

const MIB = 1024 * 1024;
const UNIT_NAME = "bench";
const EXPORT_NAME = "bench";
const UNIT_SPARE_BYTES = 64 * MIB;
const RUN_TIMEOUT_MS = 300_000;
const FILL_TIMEOUT_MS = 600_000;
/** A prime number of 4 KiB blocks: qemu-img bench's offsets wrap at the image size, so this stride visits every block in a scattered order. */
const RANDOM_STRIDE_BLOCKS = 7919;
const ISCSI_PERF_SECONDS = 5;

export const ISCSI_SERVERS = ["ipsan-iscsi", "tgt", "ipsan-nbd"] as const;
export type IscsiServerName = (typeof ISCSI_SERVERS)[number];

export interface IscsiJob {
  readonly name: string;
  readonly tool: "qemu-img" | "iscsi-perf";
  readonly write: boolean;
  readonly blockBytes: number;
  readonly depth: number;
  readonly random: boolean;
  /** Requests per qemu-img bench run. */
  readonly count: number;
  readonly metric: "iops" | "mibps";
}

export const ISCSI_JOBS: readonly IscsiJob[] = [
  { name: "randread4k", tool: "qemu-img", write: false, blockBytes: 4096, depth: 16, random: true, count: 60_000, metric: "iops" },
  { name: "randwrite4k", tool: "qemu-img", write: true, blockBytes: 4096, depth: 16, random: true, count: 60_000, metric: "iops" },
  { name: "seqread1m", tool: "qemu-img", write: false, blockBytes: MIB, depth: 8, random: false, count: 2_048, metric: "mibps" },
  { name: "seqwrite1m", tool: "qemu-img", write: true, blockBytes: MIB, depth: 8, random: false, count: 2_048, metric: "mibps" },
  { name: "perf-randread4k", tool: "iscsi-perf", write: false, blockBytes: 4096, depth: 16, random: true, count: 0, metric: "iops" },
];

export const TARGET_VS_TGT = 3;
export const TARGET_VS_NBD = 0.8;

export interface IscsiBenchOptions {
  rounds: number;
  sizeBytes: number;
  jobs: readonly IscsiJob[];
  servers: readonly IscsiServerName[];
  dir: string | undefined;
  jsonPath: string | undefined;
}

export const ISCSI_BENCH_USAGE = `usage: node dist/bench/iscsi_bench.js [--rounds N] [--size SIZE] [--jobs a,b] [--servers a,b] [--dir DIR] [--json FILE]
  jobs:    ${ISCSI_JOBS.map((j) => j.name).join(", ")} (default all)
  servers: ${ISCSI_SERVERS.join(", ")} (default all)
  --rounds 5 --size 256M; --dir defaults to the OS temp dir`;

export function parseIscsiBenchOptions(argv: readonly string[]): IscsiBenchOptions {
  const { values } = parseBenchFlags(argv, ISCSI_BENCH_USAGE, {
    rounds: { type: "string" },
    size: { type: "string" },
    jobs: { type: "string" },
    servers: { type: "string" },
    dir: { type: "string" },
    json: { type: "string" },
  });
  const sizeBytes = parseSize(values.size ?? "256M", "--size");
  if (sizeBytes < 64 * MIB || sizeBytes % MIB !== 0) throw new UsageError(`--size: expected a whole number of MiB, at least 64M, got "${values.size}"`);
  const jobNames = pickList(values.jobs ?? ISCSI_JOBS.map((j) => j.name).join(","), "--jobs", ISCSI_JOBS.map((j) => j.name));
  return {
    rounds: positiveInteger(values.rounds ?? "5", "--rounds", 50),
    sizeBytes,
    jobs: ISCSI_JOBS.filter((j) => jobNames.includes(j.name)),
    servers: pickList(values.servers ?? ISCSI_SERVERS.join(","), "--servers", ISCSI_SERVERS),
    dir: values.dir,
    jsonPath: values.json,
  };
}

/** qemu-img bench arguments for one job against one URI. */
export function qemuBenchArgs(job: IscsiJob, uri: string): string[] {
  const step = job.random ? job.blockBytes * RANDOM_STRIDE_BLOCKS : job.blockBytes;
  return ["bench", "-f", "raw", "-c", String(job.count), "-d", String(job.depth), "-s", String(job.blockBytes), "-S", String(step), ...(job.write ? ["-w"] : []), uri];
}

/** Seconds from qemu-img bench's "Run completed in 1.234 seconds." */
export function parseQemuBench(stdout: string): number {
  const match = /Run completed in ([0-9.]+) seconds/.exec(stdout);
  if (match === null) throw new Error(`qemu-img bench printed no "Run completed" line: ${stdout.slice(-300)}`);
  return Number(match[1]);
}

/** The last "iops average N" iscsi-perf printed before it was interrupted. */
export function parseIscsiPerf(output: string): number {
  const all = [...output.matchAll(/iops average (\d+)/g)];
  const last = all.at(-1);
  if (last === undefined) throw new Error(`iscsi-perf printed no "iops average": ${output.slice(-300)}`);
  return Number(last[1]);
}

export interface IscsiMeasurement {
  round: number;
  job: string;
  server: IscsiServerName;
  value: number;
  /** utime+stime of the server process (all its threads) per request, in microseconds (qemu-img jobs only: iscsi-perf does not count its requests). */
  cpuUsPerRequest?: number;
}

interface Server {
  name: IscsiServerName;
  uri: string;
  settings: string;
  /** The server process whose CPU time is counted (the unit, or tgtd). */
  pid: number;
}

async function measure(job: IscsiJob, server: Server, round: number, ticksPerSecond: number): Promise<IscsiMeasurement | undefined> {
  if (job.tool === "iscsi-perf") {
    if (!server.uri.startsWith("iscsi://")) return undefined;
    // iscsi-perf runs until interrupted; `timeout -s INT` ends it and it prints its totals.
    const result = await run("timeout", ["-s", "INT", String(ISCSI_PERF_SECONDS), "iscsi-perf", "-m", String(job.depth), "-b", String(job.blockBytes / 512), "-r", server.uri], {
      timeoutMs: RUN_TIMEOUT_MS,
    });
    return { round, job: job.name, server: server.name, value: parseIscsiPerf(result.stdout + result.stderr) };
  }
  const cpuBefore = cpuSeconds(server.pid, ticksPerSecond);
  const result = await run("qemu-img", qemuBenchArgs(job, server.uri), { timeoutMs: RUN_TIMEOUT_MS });
  const cpuUsPerRequest = ((cpuSeconds(server.pid, ticksPerSecond) - cpuBefore) * 1e6) / job.count;
  if (result.code !== 0) throw new Error(`qemu-img bench ${job.name} against ${server.name}: ${describeResult(result)}`);
  const seconds = parseQemuBench(result.stdout);
  const value = job.metric === "iops" ? job.count / seconds : (job.count * job.blockBytes) / MIB / seconds;
  return { round, job: job.name, server: server.name, value, cpuUsPerRequest };
}

function fmt(value: number | undefined, metric: "iops" | "mibps"): string {
  if (value === undefined || Number.isNaN(value)) return "-";
  return metric === "iops" ? `${Math.round(value)}` : `${value.toFixed(0)} MiB/s`;
}

/** The table: per job and server the median with [min..max], then ipsan-iscsi's ratios against tgt and its own NBD. */
export function formatIscsiSummary(jobs: readonly IscsiJob[], servers: readonly IscsiServerName[], measurements: readonly IscsiMeasurement[]): string {
  const rows: string[][] = [["job", ...servers.map((s) => `${s} median [min..max]`), "iscsi/tgt", `target >= ${TARGET_VS_TGT}x`, "iscsi/nbd", `target >= ${TARGET_VS_NBD}x`]];
  for (const job of jobs) {
    const medians = new Map<IscsiServerName, number>();
    const cells = servers.map((server) => {
      const values = measurements.filter((m) => m.job === job.name && m.server === server).map((m) => m.value);
      if (values.length === 0) return "-";
      const mid = median(values);
      medians.set(server, mid);
      return `${fmt(mid, job.metric)} [${fmt(Math.min(...values), job.metric)}..${fmt(Math.max(...values), job.metric)}]`;
    });
    const iscsi = medians.get("ipsan-iscsi");
    const tgt = medians.get("tgt");
    const nbd = medians.get("ipsan-nbd");
    const vsTgt = iscsi !== undefined && tgt !== undefined ? iscsi / tgt : undefined;
    const vsNbd = iscsi !== undefined && nbd !== undefined ? iscsi / nbd : undefined;
    const verdict = (ratio: number | undefined, target: number): string => (ratio === undefined ? "-" : ratio >= target ? "met" : "MISSED");
    rows.push([
      job.name,
      ...cells,
      vsTgt === undefined ? "-" : `${vsTgt.toFixed(2)}x`,
      verdict(vsTgt, TARGET_VS_TGT),
      vsNbd === undefined ? "-" : `${vsNbd.toFixed(2)}x`,
      verdict(vsNbd, TARGET_VS_NBD),
    ]);
  }
  return textTable(rows);
}

/** Server CPU time per request (median [min..max] us) per qemu-img job and server: steadier than throughput on a shared machine. */
export function formatIscsiCpu(jobs: readonly IscsiJob[], servers: readonly IscsiServerName[], measurements: readonly IscsiMeasurement[]): string {
  const rows: string[][] = [["server CPU us/request", ...servers.map((s) => `${s} median [min..max]`)]];
  for (const job of jobs) {
    if (job.tool !== "qemu-img") continue;
    rows.push([
      job.name,
      ...servers.map((server) => {
        const values = measurements.filter((m) => m.job === job.name && m.server === server && m.cpuUsPerRequest !== undefined).map((m) => m.cpuUsPerRequest as number);
        if (values.length === 0) return "-";
        return `${median(values).toFixed(1)} [${Math.min(...values).toFixed(1)}..${Math.max(...values).toFixed(1)}]`;
      }),
    ]);
  }
  return textTable(rows);
}

async function version(command: string, args: readonly string[]): Promise<string> {
  const result = await run(command, args);
  return (result.stdout + result.stderr).split("\n")[0]?.trim() ?? "?";
}

export async function iscsiBenchMain(argv: readonly string[]): Promise<number> {
  let options: IscsiBenchOptions;
  try {
    options = parseIscsiBenchOptions(argv);
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`${error.message}\n`);
      return wantsHelp(argv) ? 0 : 2;
    }
    throw error;
  }
  const work = makeTempDir("ipsan-iscsi-bench", options.dir ?? tmpdir());
  let unit: RunningUnit | undefined;
  let tgt: RunningTgt | undefined;
  try {
    const dataPath = work.file("data.raw");
    writeRandomFile(dataPath, options.sizeBytes, newSeed());
    const servers: Server[] = [];
    const wantsUnit = options.servers.includes("ipsan-iscsi") || options.servers.includes("ipsan-nbd");
    if (wantsUnit) {
      const dataDir = work.file("unit");
      mkdirSync(dataDir);
      const iscsiPort = await freeTcpPort();
      unit = await startUnit({
        name: UNIT_NAME,
        dataDir,
        capacity: options.sizeBytes + UNIT_SPARE_BYTES,
        volumes: [{ name: EXPORT_NAME, size: options.sizeBytes }],
        ...(options.servers.includes("ipsan-iscsi") ? { extraArgs: ["--iscsi", `127.0.0.1:${iscsiPort}`] } : {}),
      });
      process.stderr.write(`bench: filling the ipsan volume with ${formatSize(options.sizeBytes)} of data\n`);
      await runOk("nbdcopy", ["--flush", dataPath, unit.uri(EXPORT_NAME)], { timeoutMs: FILL_TIMEOUT_MS });
      const settings = `bin/ipsan ${unit.args.join(" ")}`;
      if (options.servers.includes("ipsan-iscsi")) {
        servers.push({ name: "ipsan-iscsi", uri: `iscsi://127.0.0.1:${iscsiPort}/${iscsiTargetName(UNIT_NAME, EXPORT_NAME)}/0`, settings, pid: unit.pid });
      }
      if (options.servers.includes("ipsan-nbd")) servers.push({ name: "ipsan-nbd", uri: unit.uri(EXPORT_NAME), settings, pid: unit.pid });
    }
    if (options.servers.includes("tgt")) {
      const lun = work.file("tgt.raw");
      copyFileSync(dataPath, lun);
      tgt = await startTgt(lun, "iqn.2026-12.org.ipsan.bench:tgt");
      servers.push({ name: "tgt", uri: tgt.uri, settings: tgt.settings, pid: tgt.pid });
    }
    process.stdout.write(
      [
        "# ipsan iSCSI benchmark",
        `load average at start: ${readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ")}`,
        `cpus: ${availableParallelism()} x ${cpus()[0]?.model ?? "?"}; kernel ${release()}; node ${process.version}`,
        `qemu-img: ${await version("qemu-img", ["--version"])}; tgtd: ${await version("tgtd", ["--version"])}`,
        `volume ${formatSize(options.sizeBytes)}, ${options.rounds} rounds, servers' order rotating each round`,
        ...servers.map((s) => `${s.name}: ${s.uri}  (${s.settings})`),
        "",
      ].join("\n") + "\n",
    );
    const ticks = await clockTicksPerSecond();
    const measurements: IscsiMeasurement[] = [];
    for (let round = 0; round < options.rounds; round++) {
      const order = servers.map((_, i) => servers[(i + round) % servers.length] as Server);
      for (const job of options.jobs) {
        for (const server of order) {
          const m = await measure(job, server, round, ticks);
          if (job.write) await syncFileSystem(work.path);
          if (m === undefined) continue;
          measurements.push(m);
          const cpu = m.cpuUsPerRequest === undefined ? "" : ` (server CPU ${m.cpuUsPerRequest.toFixed(1)} us/request)`;
          process.stderr.write(`round ${round + 1}/${options.rounds} ${job.name} ${server.name}: ${fmt(m.value, job.metric)}${cpu}\n`);
        }
      }
    }
    process.stdout.write(`${formatIscsiSummary(options.jobs, servers.map((s) => s.name), measurements)}\n`);
    process.stdout.write(`${formatIscsiCpu(options.jobs, servers.map((s) => s.name), measurements)}\n`);
    process.stdout.write(`load average at end: ${readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ")}\n`);
    if (options.jsonPath !== undefined) writeFileSync(options.jsonPath, `${JSON.stringify({ options: { ...options, jobs: options.jobs.map((j) => j.name) }, measurements }, null, 2)}\n`);
    return 0;
  } catch (error) {
    process.stderr.write(`bench:iscsi failed: ${errorMessage(error)}\n`);
    return 1;
  } finally {
    await tgt?.stop();
    if (unit?.running() === true) await unit.stop();
    work.remove();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  process.exitCode = await iscsiBenchMain(process.argv.slice(2));
}
