// Starts a real `bin/ipsan host engine` process (the mirror engine) for a
// test: waits for its contract line `ipsan engine ID ready URI`, keeps every
// stderr line with the time it arrived (so a test can wait for a leg event
// and measure how long it took), and stops it with SIGTERM (graceful: the
// engine flushes every leg) or SIGKILL (crash tests). Every engine still
// running when the test process exits is killed (killOnExit).

import { spawn, type ChildProcess } from "node:child_process";
import { childEnv, waitForExit } from "./process.ts";
import { IPSAN_BIN, killOnExit, type ExitStatus } from "./unit.ts";

/** How long an engine may take to print its ready line. */
export const ENGINE_READY_TIMEOUT_MS = 20_000;
/** How long an engine may take to exit after SIGTERM before we SIGKILL it. */
export const ENGINE_STOP_TIMEOUT_MS = 15_000;
/** Stderr lines kept per engine (the oldest are dropped first). */
export const ENGINE_LOG_LINES_MAX = 10_000;
/** Longest partial line kept while waiting for its newline. */
const LINE_BYTES_MAX = 16 * 1024;

const READY_PATTERN = /^ipsan engine (\S+) ready (nbd(?:\+unix)?:\/\/\S+)$/;

export interface EngineLeg {
  readonly name: string;
  readonly uri: string;
}

export interface EngineOptions {
  readonly mirror: string;
  readonly legs: readonly EngineLeg[];
  /** --legs-file PATH instead of one --leg per leg (the file is the test's to write). */
  readonly legsFile?: string;
  /** bin/ipsan to run (a patched build for a canary); default this build's. */
  readonly ipsanBin?: string;
  /** "unix:/PATH" or "127.0.0.1:PORT". */
  readonly listen: string;
  readonly exportName?: string;
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly readyTimeoutMs?: number;
  /** Copy the engine's stderr to ours as it comes (also IPSAN_TEST_VERBOSE=1). */
  readonly echoStderr?: boolean;
}

/** One stderr line and when it arrived (performance.now() of the test process). */
export interface LogLine {
  readonly index: number;
  readonly text: string;
  readonly atMs: number;
}

export interface RunningEngine {
  readonly pid: number;
  readonly child: ChildProcess;
  readonly args: readonly string[];
  /** The URI the engine printed (nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT). */
  readonly uri: string;
  /** Every stderr line so far (at most ENGINE_LOG_LINES_MAX, oldest dropped). */
  logLines(): readonly LogLine[];
  /** Index the next stderr line will get: pass it as `after` to wait only for lines still to come. */
  nextLineIndex(): number;
  /** Waits (bounded) for a stderr line with index >= after that matches; rejects on timeout or exit. */
  waitForLine(pattern: RegExp, options: { timeoutMs: number; after?: number }): Promise<LogLine>;
  /** The stderr lines as text, for assertion messages. */
  stderr(): string;
  running(): boolean;
  /** SIGTERM, wait (bounded), SIGKILL if it hangs. */
  stop(timeoutMs?: number): Promise<ExitStatus & { forced: boolean }>;
  /** SIGKILL and wait for the exit. */
  kill9(): Promise<void>;
}

export function engineArgs(options: EngineOptions): string[] {
  const args = ["host", "engine", "--mirror", options.mirror];
  if (options.legsFile !== undefined) args.push("--legs-file", options.legsFile);
  else for (const leg of options.legs) args.push("--leg", `${leg.name}=${leg.uri}`);
  args.push("--listen", options.listen);
  if (options.exportName !== undefined) args.push("--export", options.exportName);
  args.push(...(options.extraArgs ?? []));
  return args;
}

/** key=value fields of an ipsan log line ("INFO engine: message key=value key=\"a b\""). */
export function logFields(line: string): Record<string, string> {
  const fields: Record<string, string> = {};
  for (const match of line.matchAll(/ ([A-Za-z][\w.]*)=("(?:[^"\\]|\\.)*"|\S*)/g)) {
    const raw = match[2] ?? "";
    let value = raw;
    if (raw.startsWith('"')) {
      try {
        value = JSON.parse(raw) as string;
      } catch {
        value = raw.slice(1, -1);
      }
    }
    fields[match[1] ?? ""] = value;
  }
  return fields;
}

interface Spawned {
  child: ChildProcess;
  lines: LogLine[];
  stdout: string[];
  nextIndex: () => number;
  onLine: Set<() => void>;
  exited: () => boolean;
  /** Resolves when the process exited and its pipes are drained. */
  closed: Promise<void>;
  describe: () => string;
}

function spawnEngine(args: readonly string[], options: Pick<EngineOptions, "env" | "echoStderr" | "ipsanBin">): Spawned {
  const child = spawn(process.execPath, [options.ipsanBin ?? IPSAN_BIN, ...args], { env: childEnv(options.env), stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(child);
  const echo = options.echoStderr === true || process.env["IPSAN_TEST_VERBOSE"] === "1";
  const lines: LogLine[] = [];
  const stdout: string[] = [];
  const onLine = new Set<() => void>();
  let index = 0;
  /** Feeds a stream's lines to `sink`; a last line without a newline is fed at the end. */
  const linesOf = (stream: NodeJS.ReadableStream | null, sink: (line: string) => void): void => {
    let partial = "";
    stream?.setEncoding("utf8");
    stream?.on("data", (chunk: string) => {
      partial += chunk;
      let newline: number;
      while ((newline = partial.indexOf("\n")) >= 0) {
        sink(partial.slice(0, newline));
        partial = partial.slice(newline + 1);
      }
      if (partial.length > LINE_BYTES_MAX) partial = partial.slice(-LINE_BYTES_MAX);
    });
    stream?.on("end", () => {
      if (partial !== "") sink(partial);
      partial = "";
    });
  };
  linesOf(child.stderr, (text) => {
    if (echo) process.stderr.write(`[engine ${child.pid}] ${text}\n`);
    lines.push({ index: index++, text, atMs: performance.now() });
    if (lines.length > ENGINE_LOG_LINES_MAX) lines.shift();
    for (const wake of [...onLine]) wake();
  });
  linesOf(child.stdout, (text) => {
    stdout.push(text);
    for (const wake of [...onLine]) wake();
  });
  child.once("exit", () => {
    for (const wake of [...onLine]) wake();
  });
  const closed = new Promise<void>((resolve) => child.once("close", () => resolve()));
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const describe = (): string =>
    `ipsan ${args.join(" ")} (${exited() ? `exited code=${child.exitCode} signal=${child.signalCode}` : "still running"})\n--- stdout\n${stdout.join("\n")}\n--- stderr\n${lines.map((l) => l.text).join("\n")}`;
  return { child, lines, stdout, nextIndex: () => index, onLine, exited, closed, describe };
}

/** Resolves when `ready()` is true, or rejects with `describe()` on timeout or exit. */
function waitUntil(spawned: Spawned, ready: () => boolean, what: string, timeoutMs: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const check = (): void => {
      if (ready()) finish(undefined);
      else if (spawned.exited()) setTimeout(() => finish(new Error(`engine exited before ${what}: ${spawned.describe()}`)), 50);
    };
    const finish = (error: Error | undefined): void => {
      if (timer === undefined) return;
      clearTimeout(timer);
      timer = undefined;
      spawned.onLine.delete(check);
      if (error === undefined) resolve();
      else reject(error);
    };
    timer = setTimeout(() => finish(new Error(`timed out after ${timeoutMs} ms waiting for ${what}: ${spawned.describe()}`)), timeoutMs);
    spawned.onLine.add(check);
    check();
  });
}

export async function startEngine(options: EngineOptions): Promise<RunningEngine> {
  const args = engineArgs(options);
  const spawned = spawnEngine(args, options);
  const { child, lines } = spawned;
  let uri: string | undefined;
  const readyLine = (): boolean => {
    for (const line of spawned.stdout) {
      const match = READY_PATTERN.exec(line.trim());
      if (match !== null && match[1] === options.mirror) uri = match[2];
    }
    return uri !== undefined;
  };
  try {
    await waitUntil(spawned, readyLine, "its ready line", options.readyTimeoutMs ?? ENGINE_READY_TIMEOUT_MS);
  } catch (error) {
    child.kill("SIGKILL");
    await waitForExit(child, 5_000);
    throw error;
  }
  const engine: RunningEngine = {
    pid: child.pid ?? -1,
    child,
    args,
    uri: uri as string,
    logLines: () => lines,
    nextLineIndex: spawned.nextIndex,
    async waitForLine(pattern, { timeoutMs, after = 0 }) {
      let found: LogLine | undefined;
      const match = (): boolean => {
        found = lines.find((l) => l.index >= after && pattern.test(l.text));
        return found !== undefined;
      };
      await waitUntil(spawned, match, `a stderr line matching ${String(pattern)}`, timeoutMs);
      return found as LogLine;
    },
    stderr: () => lines.map((l) => l.text).join("\n"),
    running: () => !spawned.exited(),
    async stop(timeoutMs = ENGINE_STOP_TIMEOUT_MS) {
      if (!spawned.exited()) child.kill("SIGTERM");
      let forced = false;
      if (!(await waitForExit(child, timeoutMs))) {
        forced = true;
        child.kill("SIGKILL");
        await waitForExit(child, 5_000);
      }
      return { code: child.exitCode, signal: child.signalCode, forced };
    },
    async kill9() {
      if (!spawned.exited()) child.kill("SIGKILL");
      await waitForExit(child, 5_000);
    },
  };
  return engine;
}

export interface EngineRefusal {
  /** Exit status; code null with timedOut when it was still running at the deadline (then SIGKILLed). */
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly timedOut: boolean;
  readonly stdout: string;
  readonly stderr: string;
  readonly description: string;
}

/**
 * Runs an engine that is expected not to start: waits (bounded) for it to
 * exit and returns how. One still running at the deadline is SIGKILLed and
 * reported with timedOut (an engine that printed its ready line is also
 * reported, through its stdout).
 */
export async function runEngineToExit(options: EngineOptions, timeoutMs: number): Promise<EngineRefusal> {
  const args = engineArgs(options);
  const spawned = spawnEngine(args, options);
  const exited = await waitForExit(spawned.child, timeoutMs);
  if (!exited) {
    spawned.child.kill("SIGKILL");
    await waitForExit(spawned.child, 5_000);
  }
  // Let the pipes drain into the report (bounded: a grandchild could hold them open).
  await Promise.race([spawned.closed, new Promise((resolve) => setTimeout(resolve, 2_000))]);
  return {
    code: exited ? spawned.child.exitCode : null,
    signal: exited ? spawned.child.signalCode : null,
    timedOut: !exited,
    stdout: spawned.stdout.join("\n"),
    stderr: spawned.lines.map((l) => l.text).join("\n"),
    description: spawned.describe(),
  };
}
