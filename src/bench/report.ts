// The benchmark's pure parts: its options, the fio jobs, medians, ratios and
// the printed table. No processes here, so they have plain unit tests.

import { UsageError } from "../util/errors.ts";
import { type FlagSpec, parseFlags, wantsHelp } from "../util/flags.ts";
import { parseSize } from "../util/size.ts";

/** ipsan-tls and nbdkit-tls: the same servers with NBD over TLS-PSK (TLS 1.3), fio through nbds:// URIs. */
export const SERVERS = ["ipsan", "nbdkit", "qemu-nbd", "ipsan-tls", "nbdkit-tls"] as const;
export type ServerName = (typeof SERVERS)[number];

export interface BenchJob {
  readonly name: string;
  readonly rw: "randread" | "randwrite" | "read" | "write";
  readonly blockBytes: number;
  readonly iodepth: number;
  /** The figure the job is judged by. */
  readonly metric: "iops" | "mibps";
  readonly description: string;
}

/** Whether the job writes (its run leaves dirty pages behind: see syncFileSystem). */
export function writes(job: BenchJob): boolean {
  return job.rw === "write" || job.rw === "randwrite";
}

export const JOBS: readonly BenchJob[] = [
  { name: "randread4k", rw: "randread", blockBytes: 4096, iodepth: 16, metric: "iops", description: "4 KiB random read, QD 16" },
  { name: "randwrite4k", rw: "randwrite", blockBytes: 4096, iodepth: 16, metric: "iops", description: "4 KiB random write, QD 16" },
  { name: "seqread1m", rw: "read", blockBytes: 1024 * 1024, iodepth: 8, metric: "mibps", description: "1 MiB sequential read, QD 8" },
  { name: "seqwrite1m", rw: "write", blockBytes: 1024 * 1024, iodepth: 8, metric: "mibps", description: "1 MiB sequential write, QD 8" },
  { name: "randread4k-qd1", rw: "randread", blockBytes: 4096, iodepth: 1, metric: "iops", description: "4 KiB random read, QD 1" },
];

export const ROUNDS_MAX = 50;
export const RUNTIME_S_MAX = 600;

export interface BenchOptions {
  rounds: number;
  runtimeS: number;
  jobs: readonly BenchJob[];
  servers: readonly ServerName[];
  sizeBytes: number;
  /** Where the backing files go (all on one disk). */
  dir: string | undefined;
  /** Write every measurement as JSON here. */
  jsonPath: string | undefined;
  /** Pin fio to the first CPU and every server to the others (taskset), for steadier figures. */
  pin: boolean;
}

export const BENCH_USAGE = `usage: node dist/bench/nbd_bench.js [--rounds N] [--runtime S] [--jobs a,b] [--servers a,b] [--size SIZE] [--dir DIR] [--json FILE] [--pin]
  jobs:    ${JOBS.map((job) => job.name).join(", ")} (default all)
  servers: ${SERVERS.join(", ")} (default all)
  --rounds 5 --runtime 8 --size 1G; --dir defaults to the OS temp dir
  --pin: fio on CPU 0, the servers on the other CPUs (taskset)`;

export function positiveInteger(text: string, field: string, max: number): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 1 || value > max) throw new UsageError(`${field}: expected an integer 1..${max}, got "${text}"`);
  return value;
}

export function pickList<T extends string>(text: string, field: string, known: readonly T[]): T[] {
  const names = text.split(",").map((name) => name.trim()).filter((name) => name !== "");
  for (const name of names) {
    if (!(known as readonly string[]).includes(name)) throw new UsageError(`${field}: unknown "${name}" (known: ${known.join(", ")})`);
  }
  if (names.length === 0) throw new UsageError(`${field}: empty list`);
  return [...new Set(names)] as T[];
}

/**
 * A bench's flags. `--help` or `-h` throws UsageError(usage), which the bench's
 * main prints with exit 0 (parseFlags alone would throw the CLI's HelpRequested).
 */
export function parseBenchFlags<T extends FlagSpec>(argv: readonly string[], usage: string, spec: T) {
  if (wantsHelp(argv)) throw new UsageError(usage);
  return parseFlags(argv, spec);
}

export function parseBenchOptions(argv: readonly string[]): BenchOptions {
  const { values } = parseBenchFlags(argv, BENCH_USAGE, {
    rounds: { type: "string" },
    runtime: { type: "string" },
    jobs: { type: "string" },
    servers: { type: "string" },
    size: { type: "string" },
    dir: { type: "string" },
    json: { type: "string" },
    pin: { type: "boolean" },
  });
  const jobNames = pickList(values.jobs ?? JOBS.map((job) => job.name).join(","), "--jobs", JOBS.map((job) => job.name));
  const sizeBytes = parseSize(values.size ?? "1G", "--size");
  if (sizeBytes < 16 * 1024 * 1024 || sizeBytes % (1024 * 1024) !== 0) {
    throw new UsageError(`--size: expected a whole number of MiB, at least 16M, got "${values.size}"`);
  }
  return {
    rounds: positiveInteger(values.rounds ?? "5", "--rounds", ROUNDS_MAX),
    runtimeS: positiveInteger(values.runtime ?? "8", "--runtime", RUNTIME_S_MAX),
    jobs: JOBS.filter((job) => jobNames.includes(job.name)),
    servers: pickList(values.servers ?? SERVERS.join(","), "--servers", SERVERS),
    sizeBytes,
    dir: values.dir,
    jsonPath: values.json,
    pin: values.pin === true,
  };
}

/** fio arguments for one job against one NBD URI. */
export function fioArgs(job: BenchJob, uri: string, runtimeS: number, outputPath: string): string[] {
  const random = job.rw.startsWith("rand");
  return [
    `--name=${job.name}`,
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.blockBytes}`,
    `--iodepth=${job.iodepth}`,
    "--numjobs=1",
    "--time_based=1",
    `--runtime=${runtimeS}`,
    // A warm-up second keeps connection set-up out of the figures, when there is time for it.
    `--ramp_time=${runtimeS >= 4 ? 1 : 0}`,
    ...(random ? ["--norandommap=1", "--randrepeat=0"] : []),
    "--output-format=json",
    `--output=${outputPath}`,
  ];
}

export interface Measurement {
  round: number;
  job: string;
  server: ServerName;
  iops: number;
  mibps: number;
  /** Server CPU time over the run divided by wall time (1.0 = one core busy). */
  serverCpuCores: number;
  /** Mean completion latency in microseconds. */
  latencyUsMean: number;
}

export function median(values: readonly number[]): number {
  if (values.length === 0) return Number.NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[middle] ?? Number.NaN) : ((sorted[middle - 1] ?? 0) + (sorted[middle] ?? 0)) / 2;
}

export interface Summary {
  job: BenchJob;
  /** Median of the job's metric per server. */
  values: Partial<Record<ServerName, number>>;
  cpu: Partial<Record<ServerName, number>>;
  latencyUs: Partial<Record<ServerName, number>>;
  /** Server CPU time per request in microseconds (utime+stime / requests; steadier than throughput on a shared machine). */
  cpuUsPerRequest: Partial<Record<ServerName, number>>;
  /** Smallest and largest figure over the rounds, per server (the spread behind the median). */
  range: Partial<Record<ServerName, readonly [number, number]>>;
  /** ipsan's figure over each other server's in the same round, in round order (rounds where both ran). */
  roundRatios: Partial<Record<ServerName, readonly number[]>>;
}

export function summarize(jobs: readonly BenchJob[], servers: readonly ServerName[], measurements: readonly Measurement[]): Summary[] {
  return jobs.map((job) => {
    const summary: Summary = { job, values: {}, cpu: {}, latencyUs: {}, cpuUsPerRequest: {}, range: {}, roundRatios: {} };
    const figure = (m: Measurement): number => (job.metric === "iops" ? m.iops : m.mibps);
    for (const server of servers) {
      const mine = measurements.filter((m) => m.job === job.name && m.server === server);
      if (mine.length === 0) continue;
      const figures = mine.map(figure);
      summary.values[server] = median(figures);
      summary.range[server] = [Math.min(...figures), Math.max(...figures)];
      summary.cpu[server] = median(mine.map((m) => m.serverCpuCores));
      summary.latencyUs[server] = median(mine.map((m) => m.latencyUsMean));
      summary.cpuUsPerRequest[server] = median(mine.map((m) => (m.iops > 0 ? (m.serverCpuCores / m.iops) * 1e6 : Number.NaN)));
    }
    const ipsanRounds = new Map(measurements.filter((m) => m.job === job.name && m.server === "ipsan").map((m) => [m.round, figure(m)]));
    for (const server of servers) {
      if (server === "ipsan" || server.endsWith("-tls") || ipsanRounds.size === 0) continue;
      const ratios: number[] = [];
      for (const m of measurements.filter((m) => m.job === job.name && m.server === server).sort((a, b) => a.round - b.round)) {
        const mine = ipsanRounds.get(m.round);
        if (mine !== undefined && figure(m) > 0) ratios.push(mine / figure(m));
      }
      if (ratios.length > 0) summary.roundRatios[server] = ratios;
    }
    return summary;
  });
}

function formatValue(value: number | undefined, metric: BenchJob["metric"]): string {
  if (value === undefined || !Number.isFinite(value)) return "-";
  return metric === "iops" ? `${Math.round(value)} IOPS` : `${value.toFixed(0)} MiB/s`;
}

/** A figure without its unit (for ranges). */
function formatNumber(value: number, metric: BenchJob["metric"]): string {
  return metric === "iops" ? String(Math.round(value)) : value.toFixed(0);
}

function ratio(a: number | undefined, b: number | undefined): string {
  return a === undefined || b === undefined || !(b > 0) ? "-" : `${(a / b).toFixed(2)}x`;
}

function table(rows: readonly (readonly string[])[]): string {
  const widths = rows[0]?.map((_, column) => Math.max(...rows.map((row) => (row[column] ?? "").length))) ?? [];
  return rows.map((row) => row.map((cell, column) => cell.padEnd(widths[column] ?? 0)).join("  ").trimEnd()).join("\n");
}

/** The result table: median per job and server, ipsan's ratio to each other server, the spread over rounds, latency, server CPU. */
export function formatSummary(summaries: readonly Summary[], servers: readonly ServerName[]): string {
  const plain = servers.filter((server) => !server.endsWith("-tls"));
  const others = plain.filter((server) => server !== "ipsan");
  // TLS servers are compared with TLS servers (and ipsan-tls with plaintext ipsan: what TLS costs).
  const tlsRatios: [ServerName, ServerName][] = [];
  if (servers.includes("ipsan-tls")) {
    if (servers.includes("nbdkit-tls")) tlsRatios.push(["ipsan-tls", "nbdkit-tls"]);
    if (servers.includes("ipsan")) tlsRatios.push(["ipsan-tls", "ipsan"]);
  }
  const header = ["job", ...servers, ...(plain.includes("ipsan") ? others.map((other) => `ipsan/${other}`) : []), ...tlsRatios.map(([a, b]) => `${a}/${b}`)];
  const rows: string[][] = [header];
  for (const summary of summaries) {
    rows.push([
      summary.job.name,
      ...servers.map((server) => formatValue(summary.values[server], summary.job.metric)),
      ...(plain.includes("ipsan") ? others.map((other) => ratio(summary.values.ipsan, summary.values[other])) : []),
      ...tlsRatios.map(([a, b]) => ratio(summary.values[a], summary.values[b])),
    ]);
  }
  const cpuRows: string[][] = [["server CPU (cores)", ...servers]];
  for (const summary of summaries) {
    cpuRows.push([summary.job.name, ...servers.map((server) => summary.cpu[server]?.toFixed(2) ?? "-")]);
  }
  const cpuPerRequestRows: string[][] = [["server CPU per request (us)", ...servers]];
  for (const summary of summaries) {
    cpuPerRequestRows.push([summary.job.name, ...servers.map((server) => summary.cpuUsPerRequest[server]?.toFixed(1) ?? "-")]);
  }
  const latencyRows: string[][] = [["mean latency (us)", ...servers]];
  for (const summary of summaries) {
    latencyRows.push([summary.job.name, ...servers.map((server) => summary.latencyUs[server]?.toFixed(0) ?? "-")]);
  }
  // The spread behind each median: the lowest and highest round, and ipsan's ratio round by round.
  const spreadRows: string[][] = [["spread over rounds (min-max)", ...servers, ...(plain.includes("ipsan") ? others.map((other) => `ipsan/${other} per round`) : [])]];
  for (const summary of summaries) {
    spreadRows.push([
      summary.job.name,
      ...servers.map((server) => {
        const range = summary.range[server];
        return range === undefined ? "-" : `${formatNumber(range[0], summary.job.metric)}-${formatNumber(range[1], summary.job.metric)}`;
      }),
      ...(plain.includes("ipsan") ? others.map((other) => summary.roundRatios[other]?.map((r) => r.toFixed(2)).join(" ") ?? "-") : []),
    ]);
  }
  return `${table(rows)}\n\n${table(spreadRows)}\n\n${table(latencyRows)}\n\n${table(cpuRows)}\n\n${table(cpuPerRequestRows)}`;
}

/** Issue 2's targets: ipsan >= 1.0x nbdkit on every job; unit RSS under load < 150 MB. */
export const RSS_TARGET_BYTES = 150 * 1000 * 1000;

export function formatVerdict(summaries: readonly Summary[], unitRssBytes: number | undefined): string {
  const lines: string[] = [];
  const behind = summaries.filter((s) => s.values.ipsan !== undefined && s.values.nbdkit !== undefined && s.values.ipsan < s.values.nbdkit);
  const compared = summaries.filter((s) => s.values.ipsan !== undefined && s.values.nbdkit !== undefined);
  if (compared.length > 0) {
    lines.push(
      behind.length === 0
        ? `target ipsan >= 1.0x nbdkit on every job: met (${compared.length} jobs)`
        : `target ipsan >= 1.0x nbdkit on every job: NOT met, behind on ${behind.map((s) => s.job.name).join(", ")}`,
    );
  }
  const tlsCompared = summaries.filter((s) => s.values["ipsan-tls"] !== undefined && s.values["nbdkit-tls"] !== undefined);
  if (tlsCompared.length > 0) {
    const tlsBehind = tlsCompared.filter((s) => (s.values["ipsan-tls"] ?? 0) < (s.values["nbdkit-tls"] ?? 0));
    lines.push(
      tlsBehind.length === 0
        ? `target ipsan-tls >= 1.0x nbdkit-tls on every job: met (${tlsCompared.length} jobs)`
        : `target ipsan-tls >= 1.0x nbdkit-tls on every job: NOT met, behind on ${tlsBehind.map((s) => s.job.name).join(", ")}`,
    );
  }
  if (unitRssBytes !== undefined && Number.isFinite(unitRssBytes)) {
    const mb = (unitRssBytes / 1e6).toFixed(0);
    lines.push(unitRssBytes < RSS_TARGET_BYTES ? `target unit RSS < 150 MB: met (${mb} MB)` : `target unit RSS < 150 MB: NOT met (${mb} MB)`);
  }
  return lines.join("\n");
}
