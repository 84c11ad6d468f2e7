// `npm run bench`: the same fio jobs (ioengine=nbd, one connection each)
// against an ipsan unit's volume, nbdkit's file plugin and qemu-nbd, each
// serving a fully written backing file of the same size on the same disk, all
// on 127.0.0.1 TCP. Rounds alternate the servers (the order rotates every
// round) so drift in the machine hits all of them alike; the table shows
// medians, ipsan's ratio to each, mean latency, and server CPU; and the
// unit's peak RSS. ipsan-tls and nbdkit-tls are the same jobs over NBD with
// TLS-PSK (nbds:// URIs; fio gets src/testing/allow_local_file.c preloaded,
// src/testing/fio_tls.ts, so libnbd may read the key file). See docs/benchmarks.md for the settings and results.

import { randomBytes } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { availableParallelism, cpus, release, tmpdir, totalmem } from "node:os";
import { pathToFileURL } from "node:url";
import { type Daemon, fileExists, freeTcpPort, startDaemon } from "../testing/daemon.ts";
import { writeRandomFile } from "../testing/data.ts";
import { describeResult, run, runOk } from "../testing/process.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";
import { fioTlsEnv } from "../testing/fio_tls.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { clockTicksPerSecond, cpuSeconds, syncFileSystem } from "./proc.ts";
import { UsageError, errorMessage } from "../util/errors.ts";
import { formatSize } from "../util/size.ts";
import {
  BENCH_USAGE,
  type BenchJob,
  type BenchOptions,
  fioArgs,
  formatSummary,
  formatVerdict,
  type Measurement,
  parseBenchOptions,
  type ServerName,
  summarize,
  writes,
} from "./report.ts";

const EXPORT_NAME = "bench";
const MIB = 1024 * 1024;
/** Spare capacity of the unit beyond the volume (its table and alignment). */
const UNIT_SPARE_BYTES = 64 * MIB;
const FIO_TIMEOUT_MARGIN_MS = 60_000;
const FILL_TIMEOUT_MS = 600_000;
const RSS_SAMPLE_MS = 200;
const PORT_ATTEMPTS_MAX = 5;

interface BenchServer {
  name: ServerName;
  uri: string;
  pid: number;
  settings: string;
  /** Environment for fio (the TLS jobs preload allow_local_file.so). */
  env?: Record<string, string>;
  stop(): Promise<void>;
}

/** The TLS jobs' identity and key file (psktool format), and the fio preload that lets libnbd read it. */
interface BenchTls {
  identity: string;
  pskFile: string;
  fioEnv: Record<string, string>;
}

async function prepareTls(work: TempDir): Promise<BenchTls> {
  const pskFile = work.file("bench.psk");
  writeFileSync(pskFile, `bench:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
  return { identity: "bench", pskFile, fioEnv: await fioTlsEnv(work.path) };
}

function nbdsUri(tls: BenchTls, port: number): string {
  return `nbds://${tls.identity}@127.0.0.1:${port}/${EXPORT_NAME}?tls-psk-file=${tls.pskFile}`;
}

function statusKib(pid: number, key: "VmRSS" | "VmHWM"): number {
  const match = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(match?.[1] ?? Number.NaN);
}

/** One unit serves both "ipsan" (plaintext) and "ipsan-tls" (--tls on: STARTTLS offered, plaintext allowed). */
async function startIpsan(
  work: TempDir,
  options: BenchOptions,
  dataPath: string,
  tls: BenchTls | undefined,
): Promise<{ servers: BenchServer[]; unit: RunningUnit; fillHwmKib: number }> {
  const dataDir = work.file("unit");
  mkdirSync(dataDir);
  const unitOptions = {
    dataDir,
    capacity: options.sizeBytes + UNIT_SPARE_BYTES,
    volumes: [{ name: EXPORT_NAME, size: options.sizeBytes }],
    ...(tls === undefined ? {} : { extraArgs: ["--tls", "on", "--tls-psk", tls.pskFile, "--allow", "127.0.0.0/8", "--allow", `id:${tls.identity}`] }),
  };
  const filler = await startUnit(unitOptions);
  process.stderr.write(`bench: filling the ipsan volume with ${formatSize(options.sizeBytes)} of data\n`);
  await runOk("nbdcopy", ["--connections=4", "--threads=4", "--flush", dataPath, filler.uri(EXPORT_NAME)], { timeoutMs: FILL_TIMEOUT_MS });
  const fillHwmKib = statusKib(filler.pid, "VmHWM");
  // A fresh unit on the filled storage, so the RSS figures are those of the fio jobs alone.
  await filler.stop();
  const unit = await startUnit(unitOptions);
  const servers: BenchServer[] = [];
  const stop = async (): Promise<void> => {
    if (unit.running()) await unit.stop();
  };
  const settings = `bin/ipsan ${unit.args.join(" ")}`;
  if (options.servers.includes("ipsan")) servers.push({ name: "ipsan", uri: unit.uri(EXPORT_NAME), pid: unit.pid, settings, stop });
  if (tls !== undefined) servers.push({ name: "ipsan-tls", uri: nbdsUri(tls, unit.port), pid: unit.pid, settings, env: tls.fioEnv, stop });
  return { fillHwmKib, unit, servers };
}

/** Starts a daemon on a free port, retrying if another process took the port first. */
async function onFreePort(name: ServerName, start: (port: number) => Promise<Daemon>): Promise<{ daemon: Daemon; port: number }> {
  let lastError: unknown;
  for (let attempt = 0; attempt < PORT_ATTEMPTS_MAX; attempt++) {
    const port = await freeTcpPort();
    try {
      return { daemon: await start(port), port };
    } catch (error) {
      lastError = error;
      if (!/in use/i.test(errorMessage(error))) break;
    }
  }
  throw new Error(`cannot start ${name}: ${errorMessage(lastError)}`);
}

async function startNbdkit(work: TempDir, dataPath: string, tls?: BenchTls): Promise<BenchServer> {
  const name: ServerName = tls === undefined ? "nbdkit" : "nbdkit-tls";
  const path = work.file(`${name}.raw`);
  copyFileSync(dataPath, path);
  let args: string[] = [];
  const { daemon, port } = await onFreePort(name, (port) => {
    const pidFile = work.file(`${name}-${port}.pid`);
    // Defaults otherwise: thread model parallel, 16 threads, page cache on (cache=default).
    const tlsArgs = tls === undefined ? [] : ["--tls=require", `--tls-psk=${tls.pskFile}`];
    args = ["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", String(port), "-P", pidFile, ...tlsArgs, "file", path];
    return startDaemon("nbdkit", args, { ready: fileExists(pidFile) });
  });
  return {
    name,
    uri: tls === undefined ? `nbd://127.0.0.1:${port}/${EXPORT_NAME}` : nbdsUri(tls, port),
    pid: daemon.pid,
    ...(tls === undefined ? {} : { env: tls.fioEnv }),
    settings: `nbdkit ${args.join(" ")}`,
    stop: async () => {
      await daemon.stop();
    },
  };
}

async function startQemuNbd(work: TempDir, dataPath: string): Promise<BenchServer> {
  const path = work.file("qemu-nbd.raw");
  copyFileSync(dataPath, path);
  let args: string[] = [];
  const { daemon, port } = await onFreePort("qemu-nbd", (port) => {
    const pidFile = work.file(`qemu-nbd-${port}.pid`);
    // qemu-nbd's defaults spelled out: page cache on (writeback), thread-pool AIO;
    // --persistent so it outlives each fio connection, --shared so fio's is never refused.
    args = [
      "--format=raw",
      "--bind=127.0.0.1",
      `--port=${port}`,
      `--export-name=${EXPORT_NAME}`,
      "--persistent",
      "--shared=8",
      "--cache=writeback",
      "--aio=threads",
      `--pid-file=${pidFile}`,
      path,
    ];
    return startDaemon("qemu-nbd", args, { ready: fileExists(pidFile) });
  });
  return {
    name: "qemu-nbd",
    uri: `nbd://127.0.0.1:${port}/${EXPORT_NAME}`,
    pid: daemon.pid,
    settings: `qemu-nbd ${args.join(" ")}`,
    stop: async () => {
      await daemon.stop();
    },
  };
}

interface FioDirection {
  iops: number;
  bw_bytes: number;
  lat_ns?: { mean: number };
}

async function runJob(job: BenchJob, server: BenchServer, options: BenchOptions, work: TempDir, round: number, ticksPerSecond: number): Promise<Measurement> {
  const outputPath = work.file(`fio-${job.name}-${server.name}-${round}.json`);
  const cpuBefore = cpuSeconds(server.pid, ticksPerSecond);
  const startMs = Date.now();
  const fio = fioArgs(job, server.uri, options.runtimeS, outputPath);
  const [command, args] = options.pin ? ["taskset", ["-c", "0", "fio", ...fio]] : ["fio", fio];
  const result = await run(command, args, {
    timeoutMs: options.runtimeS * 1000 + FIO_TIMEOUT_MARGIN_MS,
    ...(server.env === undefined ? {} : { env: server.env }),
  });
  const wallS = (Date.now() - startMs) / 1000;
  const cpu = cpuSeconds(server.pid, ticksPerSecond) - cpuBefore;
  if (result.code !== 0) throw new Error(`fio failed against ${server.name}: ${describeResult(result)}`);
  const parsed = JSON.parse(readFileSync(outputPath, "utf8")) as { jobs: { error: number; read: FioDirection; write: FioDirection }[] };
  const fioJob = parsed.jobs[0];
  if (fioJob === undefined || fioJob.error !== 0) throw new Error(`fio reported an error against ${server.name}: ${describeResult(result)}`);
  const direction = job.rw === "randread" || job.rw === "read" ? fioJob.read : fioJob.write;
  return {
    round,
    job: job.name,
    server: server.name,
    iops: direction.iops,
    mibps: direction.bw_bytes / MIB,
    serverCpuCores: cpu / wallS,
    latencyUsMean: (direction.lat_ns?.mean ?? Number.NaN) / 1000,
  };
}

async function machineDescription(dir: string): Promise<Record<string, string>> {
  const mount = await run("findmnt", ["-n", "-o", "SOURCE,FSTYPE", "-T", dir]);
  const fio = await run("fio", ["--version"]);
  const nbdkit = await run("nbdkit", ["--version"]);
  const qemu = await run("qemu-nbd", ["--version"]);
  const device = mount.stdout.trim().split(/\s+/)[0]?.replace(/^\/dev\//, "") ?? "";
  let rotational = "?";
  try {
    rotational = readFileSync(`/sys/block/${device.replace(/\d+$/, "")}/queue/rotational`, "utf8").trim() === "0" ? "non-rotational" : "rotational";
  } catch {
    // a partition or a device without sysfs queue info
  }
  return {
    "load average at start": readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" "),
    cpus: `${availableParallelism()} x ${cpus()[0]?.model ?? "?"}`,
    memory: formatSize(totalmem()),
    kernel: release(),
    node: process.version,
    disk: `${mount.stdout.trim()} (${rotational}) for ${dir}`,
    fio: fio.stdout.trim(),
    nbdkit: nbdkit.stdout.trim(),
    "qemu-nbd": qemu.stdout.split("\n")[0]?.trim() ?? "",
  };
}

export async function benchMain(argv: readonly string[]): Promise<number> {
  let options: BenchOptions;
  try {
    options = parseBenchOptions(argv);
  } catch (error) {
    process.stderr.write(`${errorMessage(error)}\n`);
    return error instanceof UsageError && errorMessage(error) === BENCH_USAGE ? 0 : 2;
  }
  const ticks = await clockTicksPerSecond();
  const baseDir = options.dir ?? tmpdir();
  const previousTmp = process.env["TMPDIR"];
  process.env["TMPDIR"] = baseDir;
  const work = makeTempDir("bench");
  if (previousTmp === undefined) delete process.env["TMPDIR"];
  else process.env["TMPDIR"] = previousTmp;

  const servers: BenchServer[] = [];
  let unit: RunningUnit | undefined;
  let fillHwmKib = Number.NaN;
  let rssMaxKib = 0;
  let sampler: NodeJS.Timeout | undefined;
  try {
    const machine = await machineDescription(work.path);
    process.stderr.write(`bench: writing a ${formatSize(options.sizeBytes)} data file in ${work.path}\n`);
    const dataPath = work.file("data.raw");
    writeRandomFile(dataPath, options.sizeBytes, "ipsan-bench");
    const tls = options.servers.some((name) => name.endsWith("-tls")) ? await prepareTls(work) : undefined;
    for (const name of options.servers) {
      if (name === "ipsan" || name === "ipsan-tls") {
        if (unit !== undefined) continue;
        const started = await startIpsan(work, options, dataPath, options.servers.includes("ipsan-tls") ? tls : undefined);
        unit = started.unit;
        fillHwmKib = started.fillHwmKib;
        servers.push(...started.servers);
      } else if (name === "nbdkit") {
        servers.push(await startNbdkit(work, dataPath));
      } else if (name === "nbdkit-tls") {
        servers.push(await startNbdkit(work, dataPath, tls));
      } else {
        servers.push(await startQemuNbd(work, dataPath));
      }
    }
    const cpuCount = availableParallelism();
    if (options.pin && cpuCount < 2) throw new UsageError(`--pin: needs at least 2 CPUs, this machine has ${cpuCount}`);
    // The table's columns in the order the servers were asked for.
    servers.sort((a, b) => options.servers.indexOf(a.name) - options.servers.indexOf(b.name));
    for (const server of servers) {
      // -a: every thread of the server, and the threads it starts later inherit the mask.
      if (options.pin) await runOk("taskset", ["-a", "-c", "-p", `1-${cpuCount - 1}`, String(server.pid)]);
      const size = Number((await runOk("nbdinfo", ["--size", server.uri])).stdout.trim());
      if (size !== options.sizeBytes) throw new Error(`${server.name} serves ${size} bytes, expected ${options.sizeBytes}`);
    }
    const unitPid = unit?.pid;
    if (unitPid !== undefined) {
      sampler = setInterval(() => {
        try {
          rssMaxKib = Math.max(rssMaxKib, statusKib(unitPid, "VmRSS"));
        } catch {
          // the unit has exited; the run will fail on its own
        }
      }, RSS_SAMPLE_MS);
    }

    const measurements: Measurement[] = [];
    for (let round = 1; round <= options.rounds; round++) {
      for (const job of options.jobs) {
        const shift = (round - 1) % servers.length;
        const order = [...servers.slice(shift), ...servers.slice(0, shift)];
        for (const server of order) {
          const m = await runJob(job, server, options, work, round, ticks);
          if (writes(job)) await syncFileSystem(work.path);
          measurements.push(m);
          process.stderr.write(
            `bench: round ${round}/${options.rounds} ${job.name.padEnd(15)} ${server.name.padEnd(8)} ` +
              `${Math.round(m.iops)} IOPS ${m.mibps.toFixed(1)} MiB/s cpu ${m.serverCpuCores.toFixed(2)}\n`,
          );
        }
      }
    }
    if (sampler !== undefined) clearInterval(sampler);
    const hwmKib = unitPid !== undefined ? statusKib(unitPid, "VmHWM") : Number.NaN;

    machine["load average at end"] = readFileSync("/proc/loadavg", "utf8").split(" ").slice(0, 3).join(" ");
    const summaries = summarize(options.jobs, options.servers, measurements);
    const lines = [
      `ipsan NBD benchmark: ${options.rounds} round(s) x ${options.runtimeS} s per job, ${formatSize(options.sizeBytes)} backing files, fio ioengine=nbd over 127.0.0.1 TCP, one connection per job` +
        (options.pin ? `, fio pinned to CPU 0 and the servers to CPUs 1-${availableParallelism() - 1}` : ", nothing pinned"),
      ...Object.entries(machine).map(([key, value]) => `  ${key}: ${value}`),
      ...servers.map((server) => `  ${server.name}: ${server.settings}`),
      "",
      formatSummary(summaries, options.servers),
    ];
    if (unitPid !== undefined) {
      lines.push(
        "",
        `ipsan unit RSS under the fio jobs: peak sampled VmRSS ${(rssMaxKib / 1024).toFixed(1)} MiB, VmHWM ${(hwmKib / 1024).toFixed(1)} MiB` +
          ` (fresh unit after the fill; the unit that took the 4-connection nbdcopy fill peaked at ${(fillHwmKib / 1024).toFixed(1)} MiB)`,
      );
    }
    const verdict = formatVerdict(summaries, unitPid !== undefined ? Math.max(rssMaxKib, hwmKib) * 1024 : undefined);
    if (verdict !== "") lines.push("", verdict);
    process.stdout.write(`${lines.join("\n")}\n`);
    if (options.jsonPath !== undefined) {
      writeFileSync(
        options.jsonPath,
        `${JSON.stringify({ machine, options: { ...options, jobs: options.jobs.map((j) => j.name) }, servers: servers.map((s) => ({ name: s.name, settings: s.settings })), measurements, summaries: summaries.map((s) => ({ ...s, job: s.job.name })), unitRssMaxKib: rssMaxKib, unitVmHwmKib: hwmKib, fillVmHwmKib: fillHwmKib }, null, 2)}\n`,
      );
    }
    return 0;
  } finally {
    if (sampler !== undefined) clearInterval(sampler);
    for (const server of servers) await server.stop();
    if (unit !== undefined && unit.running()) await unit.stop();
    work.remove();
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  benchMain(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (error: unknown) => {
      process.stderr.write(`bench: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      process.exitCode = 1;
    },
  );
}
