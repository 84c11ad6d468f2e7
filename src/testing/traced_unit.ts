// Starts a real `ipsan unit` under strace, for tests that prove what the unit
// asks of the kernel and in which order (durability_sync_test: a FUA write's
// fdatasync happens before its reply). strace runs the unit itself (no attach
// to a running process, so no ptrace_scope rule stands in the way) and writes
// its log to a file:
//   -f          every thread: the unit does disk I/O on libuv's worker threads
//   -tt -T      wall-clock times and durations, for the humans reading a failure
//               (or unix times in ns, TraceOptions.timestamps, to compare logs)
//   -yy         fds annotated with their path, or the addresses of a TCP socket
//   -xx -s N    buffers as hex, the first N bytes of each
//   --seccomp-bpf  only the traced calls stop the unit (much less slowdown)
// The unit gets UV_USE_IO_URING=0: file I/O libuv sent through io_uring would
// not show up as system calls at all (Node 20 does not use it by default; this
// keeps a future default from blinding the trace).
//
// The returned RunningUnit behaves like one from startUnit(): `pid` is the
// unit's own pid (read from DATA/unit.lock and checked to be strace's child),
// `child` is the strace process, which exits with the unit's status once the
// unit has exited, after writing the last of the log.

import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { childEnv, sleep, waitForExit } from "./process.ts";
import { makeTempDir, type TempDir } from "./tmp.ts";
import {
  IPSAN_BIN,
  UNIT_READY_TIMEOUT_MS,
  UNIT_STDERR_TAIL_BYTES,
  UNIT_STDOUT_LINE_BYTES_MAX,
  UNIT_STOP_TIMEOUT_MS,
  hostPort,
  killOnExit,
  parseUnitLine,
  unitArgs,
  type RunningUnit,
  type UnitLine,
  type UnitOptions,
} from "./unit.ts";

export const STRACE = "strace";

export interface TraceOptions {
  /** Where strace writes its log (-o). */
  file: string;
  /** The system calls to trace (-e trace=...). */
  syscalls: readonly string[];
  /** Bytes of each buffer printed (-s); default 64. */
  stringBytes?: number;
  /**
   * "wall" (default): -tt, HH:MM:SS.micros. "unix-ns": seconds since the epoch
   * with nanoseconds, comparable between the logs of several traced processes
   * (strace.ts stampNs, returnedByNs).
   */
  timestamps?: "wall" | "unix-ns";
}

/** strace's command line for running `node IPSAN_BIN ARGS...`. */
export function straceArgs(trace: TraceOptions, command: readonly string[]): string[] {
  return [
    "-f",
    trace.timestamps === "unix-ns" ? "--absolute-timestamps=format:unix,precision:ns" : "-tt",
    "-T",
    "-yy",
    "-xx",
    "-s",
    String(trace.stringBytes ?? 64),
    "--seccomp-bpf",
    "-e",
    `trace=${trace.syscalls.join(",")}`,
    "-o",
    trace.file,
    ...command,
  ];
}

/** The parent pid from /proc/PID/stat (field 4, after the parenthesised command name). */
function parentPid(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
  } catch {
    return undefined;
  }
}

/**
 * Starts `strace ... node BIN unit ARGS` and waits for the unit's ready line
 * (and control line). `ipsanBin` lets a test run a patched copy of the build.
 */
export async function startUnitUnderStrace(options: UnitOptions, trace: TraceOptions, ipsanBin: string = IPSAN_BIN): Promise<RunningUnit> {
  if (options.listen?.startsWith("unix") === true) throw new Error("startUnitUnderStrace serves TCP only");
  const ownDir: TempDir | undefined = options.dataDir === undefined ? makeTempDir("traced-unit") : undefined;
  const dataDir = options.dataDir ?? ownDir?.path ?? "";
  const args = unitArgs(options, dataDir);
  const command = straceArgs(trace, [process.execPath, ipsanBin, ...args]);
  const child = spawn(STRACE, command, { env: childEnv({ UV_USE_IO_URING: "0", ...options.env }), stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(child);
  let stderrTail = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    if (options.echoStderr === true || process.env["IPSAN_TEST_VERBOSE"] === "1") process.stderr.write(`[traced unit] ${chunk}`);
    stderrTail = (stderrTail + chunk).slice(-UNIT_STDERR_TAIL_BYTES);
  });
  const lines: string[] = [];
  let partial = "";
  let ready: Extract<UnitLine, { kind: "ready" }> | undefined;
  let control: Extract<UnitLine, { kind: "control" }> | undefined;
  let iscsi: Extract<UnitLine, { kind: "iscsi" }> | undefined;
  const wantControl = options.control !== undefined && options.control !== false;
  const wantIscsi = (options.extraArgs ?? []).includes("--iscsi");
  const settled = (): boolean => ready !== undefined && (!wantControl || control !== undefined) && (!wantIscsi || iscsi !== undefined);
  let settle: (() => void) | undefined;
  child.stdout?.setEncoding("utf8");
  child.stdout?.on("data", (chunk: string) => {
    partial += chunk;
    let newline: number;
    while ((newline = partial.indexOf("\n")) >= 0) {
      const line = partial.slice(0, newline);
      partial = partial.slice(newline + 1);
      lines.push(line);
      const parsed = parseUnitLine(line);
      if (parsed.kind === "ready" && ready === undefined) ready = parsed;
      if (parsed.kind === "control" && control === undefined) control = parsed;
      if (parsed.kind === "iscsi" && iscsi === undefined) iscsi = parsed;
      if (settled()) settle?.();
    }
    if (partial.length > UNIT_STDOUT_LINE_BYTES_MAX) partial = partial.slice(-UNIT_STDOUT_LINE_BYTES_MAX);
  });
  const describe = (): string => `${STRACE} ${command.join(" ")}\n--- stdout\n${lines.join("\n")}\n--- stderr (strace's and the unit's)\n${stderrTail}`;
  const readyTimeoutMs = options.readyTimeoutMs ?? UNIT_READY_TIMEOUT_MS;
  let unitPid = -1;
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`traced unit did not print its ready line within ${readyTimeoutMs} ms: ${describe()}`)), readyTimeoutMs);
      settle = () => {
        clearTimeout(timer);
        resolve();
      };
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        setTimeout(() => reject(new Error(`strace or the unit exited (code=${code} signal=${signal}) before ready: ${describe()}`)), 50);
      });
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(new Error(`cannot run ${STRACE} (scripts/setup installs it): ${error.message}`));
      });
      if (settled()) settle();
    });
    unitPid = Number(readFileSync(join(dataDir, "unit.lock"), "utf8").trim());
    const parent = parentPid(unitPid);
    if (parent !== child.pid) throw new Error(`unit.lock names pid ${unitPid}, whose parent is ${parent}, not strace (${child.pid}): ${describe()}`);
  } catch (error) {
    if (unitPid > 0) process.kill(unitPid, "SIGKILL");
    child.kill("SIGKILL");
    await waitForExit(child, 5_000);
    ownDir?.remove();
    throw error;
  }
  const tcp = ready as Extract<UnitLine, { kind: "ready" }>;
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const signalUnit = (signal: NodeJS.Signals): void => {
    if (exited()) return;
    try {
      process.kill(unitPid, signal);
    } catch {
      // Already gone: strace is about to exit too.
    }
  };
  const unit: RunningUnit = {
    iscsiPortal: iscsi === undefined ? undefined : hostPort(iscsi.host, iscsi.port),
    name: tcp.name,
    host: tcp.host,
    port: tcp.port,
    socketPath: undefined,
    pid: unitPid,
    dataDir,
    args,
    child,
    controlUrl: control === undefined ? undefined : `http://${hostPort(control.host, control.port)}`,
    uri: (exportName) => `nbd://${hostPort(tcp.host, tcp.port)}/${exportName}`,
    listUri: () => `nbd://${hostPort(tcp.host, tcp.port)}/`,
    controlToken: () => readFileSync(join(dataDir, "control.token"), "utf8").trim(),
    stderr: () => stderrTail,
    stdoutLines: () => lines,
    running: () => !exited(),
    async stop(timeoutMs = UNIT_STOP_TIMEOUT_MS) {
      signalUnit("SIGTERM");
      let forced = false;
      if (!(await waitForExit(child, timeoutMs))) {
        forced = true;
        signalUnit("SIGKILL");
        if (!(await waitForExit(child, 5_000))) child.kill("SIGKILL");
        await waitForExit(child, 5_000);
      }
      return { code: child.exitCode, signal: child.signalCode, forced };
    },
    async kill9() {
      signalUnit("SIGKILL");
      await waitForExit(child, 5_000);
      await sleep(10);
    },
    async close() {
      await unit.stop();
      ownDir?.remove();
    },
  };
  return unit;
}
