// A child `bin/ipsan ...` process as the demo (and the end-to-end tests) run
// it: stdout lines are kept (bounded) and can be awaited, everything the child
// prints is also appended to a log file, and stopping is signal -> bounded wait
// -> SIGKILL. Children are started in their own process group so a Ctrl-C on
// the terminal reaches only the demo, which then stops them in order (units
// first so their shutdown packets reach a running station).

import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, type WriteStream } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { IpsanError } from "../util/errors.ts";

export const LINES_KEPT_MAX = 2000;
export const STOP_TIMEOUT_MS = 10_000;

/** bin/ipsan of this checkout (dist/demo/child.js -> ../../bin/ipsan). */
export const IPSAN_BIN = join(dirname(dirname(dirname(fileURLToPath(import.meta.url)))), "bin", "ipsan");

export interface ChildExit {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
}

export interface SpawnOptions {
  readonly name: string;
  /** Appends stdout and stderr here (created if missing). */
  readonly logFile?: string;
  /** Runs `prefix... node bin/ipsan args` (e.g. ["ip", "netns", "exec", NS]). */
  readonly prefix?: readonly string[];
  /** Also copy the child's stderr to ours. */
  readonly echoStderr?: boolean;
  readonly env?: NodeJS.ProcessEnv;
  /** Another bin/ipsan (a canary's patched build, src/testing/patched_build.ts); default this checkout's. */
  readonly bin?: string;
}

export class IpsanChild {
  readonly name: string;
  readonly process: ChildProcess;
  readonly exited: Promise<ChildExit>;
  readonly lines: string[] = [];
  #exit: ChildExit | undefined;
  #waiters = new Set<() => void>();
  #log: WriteStream | undefined;

  constructor(args: readonly string[], options: SpawnOptions) {
    this.name = options.name;
    const prefix = options.prefix ?? [];
    const [command, ...rest] = [...prefix, process.execPath, options.bin ?? IPSAN_BIN, ...args];
    this.#log = options.logFile === undefined ? undefined : createWriteStream(options.logFile, { flags: "a" });
    this.process = spawn(command ?? process.execPath, rest, {
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
      env: options.env ?? process.env,
    });
    const stdout = this.process.stdout;
    const stderr = this.process.stderr;
    if (stdout === null || stderr === null) throw new IpsanError("IO_ERROR", `${this.name}: no stdio pipes`);
    createInterface({ input: stdout }).on("line", (line) => {
      this.#log?.write(`${line}\n`);
      this.lines.push(line);
      if (this.lines.length > LINES_KEPT_MAX) this.lines.shift();
      for (const wake of this.#waiters) wake();
    });
    stderr.on("data", (chunk: Buffer) => {
      this.#log?.write(chunk);
      if (options.echoStderr === true) process.stderr.write(chunk);
    });
    this.exited = new Promise((resolve) => {
      this.process.once("error", (error) => {
        this.#exit = { code: 127, signal: null };
        this.#log?.write(`spawn failed: ${error.message}\n`);
        resolve(this.#exit);
      });
      this.process.once("close", (code, signal) => {
        this.#exit = { code, signal };
        this.#log?.end();
        for (const wake of this.#waiters) wake();
        resolve(this.#exit);
      });
    });
  }

  get pid(): number | undefined {
    return this.process.pid;
  }

  get exit(): ChildExit | undefined {
    return this.#exit;
  }

  /** Resolves with the first stdout line matching `pattern` (already printed or still to come). */
  waitForLine(pattern: RegExp, timeoutMs: number): Promise<RegExpExecArray> {
    return new Promise((resolve, reject) => {
      let scanned = 0;
      const check = (): boolean => {
        for (; scanned < this.lines.length; scanned += 1) {
          const match = pattern.exec(this.lines[scanned] ?? "");
          if (match !== null) {
            done();
            resolve(match);
            return true;
          }
        }
        if (this.#exit !== undefined) {
          done();
          reject(
            new IpsanError(
              "UNAVAILABLE",
              `${this.name} exited (code ${this.#exit.code ?? this.#exit.signal}) before printing ${pattern}`,
            ),
          );
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        done();
        reject(new IpsanError("UNAVAILABLE", `${this.name}: no line matching ${pattern} within ${timeoutMs} ms`));
      }, timeoutMs);
      const wake = (): void => {
        // lines may be shifted out when over LINES_KEPT_MAX; rescan from a safe index.
        scanned = Math.min(scanned, this.lines.length);
        check();
      };
      const done = (): void => {
        clearTimeout(timer);
        this.#waiters.delete(wake);
      };
      this.#waiters.add(wake);
      check();
    });
  }

  signal(signal: NodeJS.Signals): void {
    if (this.#exit === undefined && this.process.pid !== undefined) {
      try {
        process.kill(this.process.pid, signal);
      } catch {
        // already gone
      }
    }
  }

  /** `signal`, wait up to timeoutMs, then SIGKILL. Resolves with how it ended. */
  async stop(signal: NodeJS.Signals = "SIGTERM", timeoutMs = STOP_TIMEOUT_MS): Promise<ChildExit & { killed: boolean }> {
    if (this.#exit !== undefined) return { ...this.#exit, killed: false };
    this.signal(signal);
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      this.exited.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), timeoutMs);
      }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      this.signal("SIGKILL");
      return { ...(await this.exited), killed: true };
    }
    return { ...(await this.exited), killed: false };
  }
}
