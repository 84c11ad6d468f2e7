// Running the real programs a test drives (nbdinfo, qemu-img, fio, mkfs, ...):
// one call with a hard timeout that captures bounded stdout/stderr, so a hung
// client can never hang the suite and a chatty one can never exhaust memory.
//
// The Debian tools under test come first on PATH: a developer's pyenv or
// Homebrew python3 would otherwise shadow /usr/bin/python3, and nbdsh (a
// `python3 -m nbd` wrapper) would fail with "No module named nbd".

import { spawn, type ChildProcess } from "node:child_process";

/** Stdout or stderr kept per command; the rest is dropped and counted. */
export const OUTPUT_BYTES_MAX = 16 * 1024 * 1024;
/** Default hard limit for one command. */
export const COMMAND_TIMEOUT_MS_DEFAULT = 60_000;
/** After SIGTERM on timeout, how long before SIGKILL. */
export const KILL_GRACE_MS = 2_000;

const SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** PATH with the system directories first, then the caller's own. */
export function systemFirstPath(current: string | undefined = process.env["PATH"]): string {
  return current === undefined || current === "" ? SYSTEM_PATH : `${SYSTEM_PATH}:${current}`;
}

export interface RunOptions {
  timeoutMs?: number;
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  /** Merged over process.env (PATH is system-first unless given here). */
  env?: Readonly<Record<string, string>>;
  /** Variables of process.env the child must not see at all (etcd and etcdctl refuse a set ETCD_* / ETCDCTL_* that a flag shadows, even an empty one). */
  unsetEnv?: (name: string) => boolean;
  cwd?: string;
}

export interface CommandResult {
  command: string;
  args: readonly string[];
  /** Exit status, or null if killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  durationMs: number;
}

export function childEnv(extra?: Readonly<Record<string, string>>, unset?: (name: string) => boolean): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, PATH: systemFirstPath(), ...extra };
  if (unset !== undefined) for (const name of Object.keys(env)) if (unset(name) && !(extra !== undefined && name in extra)) delete env[name];
  return env;
}

/** A one-line shell-like rendering of a command, for messages. */
export function formatCommand(command: string, args: readonly string[]): string {
  const quote = (word: string): string => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\\''")}'`);
  return [command, ...args].map(quote).join(" ");
}

/** Everything about a finished command, for an assertion message. */
export function describeResult(result: CommandResult): string {
  const status = result.timedOut
    ? `timed out after ${result.durationMs} ms`
    : result.signal !== null
      ? `killed by ${result.signal}`
      : `exit ${result.code}`;
  const tail = (text: string): string => (text.length > 4000 ? `...${text.slice(-4000)}` : text);
  return `${formatCommand(result.command, result.args)}: ${status}\n--- stdout\n${tail(result.stdout)}\n--- stderr\n${tail(result.stderr)}`;
}

class BoundedText {
  private chunks: Buffer[] = [];
  private kept = 0;
  dropped = 0;
  push(chunk: Buffer): void {
    const room = OUTPUT_BYTES_MAX - this.kept;
    if (room <= 0) {
      this.dropped += chunk.length;
      return;
    }
    const part = chunk.length > room ? chunk.subarray(0, room) : chunk;
    this.chunks.push(part);
    this.kept += part.length;
    this.dropped += chunk.length - part.length;
  }
  text(): string {
    const body = Buffer.concat(this.chunks).toString("utf8");
    return this.dropped > 0 ? `${body}\n[${this.dropped} bytes dropped]` : body;
  }
}

/** Runs a command to completion (or timeout); never rejects for a non-zero exit. */
export function run(command: string, args: readonly string[], options: RunOptions = {}): Promise<CommandResult> {
  const timeoutMs = options.timeoutMs ?? COMMAND_TIMEOUT_MS_DEFAULT;
  const startMs = Date.now();
  return new Promise((resolve, reject) => {
    let child: ChildProcess;
    try {
      child = spawn(command, [...args], {
        cwd: options.cwd,
        env: childEnv(options.env, options.unsetEnv),
        stdio: [options.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
      });
    } catch (error) {
      reject(new Error(`cannot run ${formatCommand(command, args)}: ${String(error)}`, { cause: error }));
      return;
    }
    const stdout = new BoundedText();
    const stderr = new BoundedText();
    child.stdout?.on("data", (chunk: Buffer) => stdout.push(chunk));
    child.stderr?.on("data", (chunk: Buffer) => stderr.push(chunk));
    let timedOut = false;
    let killTimer: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGTERM");
      killTimer = setTimeout(() => child.kill("SIGKILL"), KILL_GRACE_MS);
    }, timeoutMs);
    if (options.input !== undefined && child.stdin !== null) {
      child.stdin.on("error", () => {}); // the child may exit without reading everything
      child.stdin.end(options.input);
    }
    child.on("error", (error) => {
      clearTimeout(timer);
      if (killTimer !== undefined) clearTimeout(killTimer);
      reject(new Error(`cannot run ${formatCommand(command, args)}: ${error.message}`, { cause: error }));
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      if (killTimer !== undefined) clearTimeout(killTimer);
      resolve({
        command,
        args,
        code,
        signal,
        stdout: stdout.text(),
        stderr: stderr.text(),
        timedOut,
        durationMs: Date.now() - startMs,
      });
    });
  });
}

/** Runs a command and throws (with its output) unless it exits 0. */
export async function runOk(command: string, args: readonly string[], options: RunOptions = {}): Promise<CommandResult> {
  const result = await run(command, args, options);
  if (result.code !== 0 || result.timedOut) throw new Error(`command failed: ${describeResult(result)}`);
  return result;
}

/** Waits for a child to exit, up to timeoutMs; resolves false on timeout. */
export function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off("exit", onExit);
      resolve(false);
    }, timeoutMs);
    const onExit = (): void => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once("exit", onExit);
  });
}

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `probe` every intervalMs until it returns a value other than undefined, or throws on timeout. */
export async function waitFor<T>(
  what: string,
  probe: () => T | undefined | Promise<T | undefined>,
  options: { timeoutMs: number; intervalMs?: number },
): Promise<T> {
  const deadlineMs = Date.now() + options.timeoutMs;
  const intervalMs = options.intervalMs ?? 50;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() >= deadlineMs) throw new Error(`timed out after ${options.timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}
