// Starts a real `ipsan host engine` (the mirror engine) under strace, for
// tests that prove what the engine's replies wait for (engine_durability_test:
// a FLUSH the engine answers was synced on every leg first). The same
// strace command line as traced_unit.ts (straceArgs: -f, --seccomp-bpf, -yy
// -xx), with the engine given UV_USE_IO_URING=0 so its socket I/O shows up as
// system calls. strace runs the engine itself (no attach), so no ptrace_scope
// rule stands in the way.
//
// `pid` is the engine's own pid (strace's only child, found in /proc), which
// stop() signals: SIGTERM makes the engine flush every leg and exit 0, and
// strace then exits with the engine's status after writing the last of the
// log. `ipsanBin` lets a canary run a patched copy of the build.

import { spawn, type ChildProcess } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { type EngineOptions, ENGINE_READY_TIMEOUT_MS, ENGINE_STOP_TIMEOUT_MS, engineArgs } from "./engine.ts";
import { childEnv, waitForExit } from "./process.ts";
import { STRACE, straceArgs, type TraceOptions } from "./traced_unit.ts";
import { IPSAN_BIN, killOnExit, type ExitStatus } from "./unit.ts";

const READY_PATTERN = /^ipsan engine (\S+) ready (nbd(?:\+unix)?:\/\/\S+)$/;
/** Stderr kept for failure messages (the engine's logs and strace's own complaints). */
const STDERR_TAIL_BYTES = 64 * 1024;

export interface TracedEngine {
  /** The engine's pid (strace's child). */
  readonly pid: number;
  /** The strace process; it exits with the engine's status. */
  readonly child: ChildProcess;
  readonly args: readonly string[];
  /** The URI the engine printed (nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT). */
  readonly uri: string;
  /** The last STDERR_TAIL_BYTES of stderr (the engine's log lines, and strace's). */
  stderr(): string;
  running(): boolean;
  /** SIGTERM to the engine, wait (bounded) for strace to exit, SIGKILL if it hangs. */
  stop(timeoutMs?: number): Promise<ExitStatus & { forced: boolean }>;
}

/** Pids whose parent is `pid` (from /proc/PID/stat; a process that exits meanwhile is skipped). */
export function childPids(pid: number): number[] {
  const out: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      if (Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === pid) out.push(Number(entry));
    } catch {
      // Gone.
    }
  }
  return out;
}

/** Starts `strace ... node BIN host engine ARGS` and waits for the engine's ready line. */
export async function startEngineUnderStrace(options: EngineOptions, trace: TraceOptions, ipsanBin: string = IPSAN_BIN): Promise<TracedEngine> {
  const args = engineArgs(options);
  const command = straceArgs(trace, [process.execPath, ipsanBin, ...args]);
  const child = spawn(STRACE, command, { env: childEnv({ UV_USE_IO_URING: "0", ...options.env }), stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(child);
  let stderrTail = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    if (options.echoStderr === true || process.env["IPSAN_TEST_VERBOSE"] === "1") process.stderr.write(`[traced engine] ${chunk}`);
    stderrTail = (stderrTail + chunk).slice(-STDERR_TAIL_BYTES);
  });
  const lines: string[] = [];
  let partial = "";
  let uri: string | undefined;
  let settle: (() => void) | undefined;
  child.stdout?.setEncoding("utf8");
  child.stdout?.on("data", (chunk: string) => {
    partial += chunk;
    let newline: number;
    while ((newline = partial.indexOf("\n")) >= 0) {
      const line = partial.slice(0, newline);
      partial = partial.slice(newline + 1);
      lines.push(line);
      const match = READY_PATTERN.exec(line.trim());
      if (match !== null && match[1] === options.mirror && uri === undefined) {
        uri = match[2];
        settle?.();
      }
    }
  });
  const describe = (): string => `${STRACE} ${command.join(" ")}\n--- stdout\n${lines.join("\n")}\n--- stderr (strace's and the engine's)\n${stderrTail}`;
  const readyTimeoutMs = options.readyTimeoutMs ?? ENGINE_READY_TIMEOUT_MS;
  let enginePid = -1;
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`traced engine did not print its ready line within ${readyTimeoutMs} ms: ${describe()}`)), readyTimeoutMs);
      settle = () => {
        clearTimeout(timer);
        resolve();
      };
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        setTimeout(() => reject(new Error(`strace or the engine exited (code=${code} signal=${signal}) before ready: ${describe()}`)), 50);
      });
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(new Error(`cannot run ${STRACE} (scripts/setup installs it): ${error.message}`));
      });
      if (uri !== undefined) settle();
    });
    const children = childPids(child.pid ?? -1);
    if (children.length !== 1) throw new Error(`strace (${child.pid}) has ${children.length} children (${children.join(", ")}), expected the engine alone: ${describe()}`);
    enginePid = children[0] as number;
  } catch (error) {
    if (enginePid > 0) process.kill(enginePid, "SIGKILL");
    child.kill("SIGKILL");
    await waitForExit(child, 5_000);
    throw error;
  }
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const signalEngine = (signal: NodeJS.Signals): void => {
    if (exited()) return;
    try {
      process.kill(enginePid, signal);
    } catch {
      // Already gone: strace is about to exit too.
    }
  };
  return {
    pid: enginePid,
    child,
    args,
    uri: uri as string,
    stderr: () => stderrTail,
    running: () => !exited(),
    async stop(timeoutMs = ENGINE_STOP_TIMEOUT_MS) {
      signalEngine("SIGTERM");
      let forced = false;
      if (!(await waitForExit(child, timeoutMs))) {
        forced = true;
        signalEngine("SIGKILL");
        if (!(await waitForExit(child, 5_000))) child.kill("SIGKILL");
        await waitForExit(child, 5_000);
      }
      return { code: child.exitCode, signal: child.signalCode, forced };
    },
  };
}
