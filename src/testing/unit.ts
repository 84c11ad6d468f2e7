// Starts a real `bin/ipsan unit` process for a test: listens on 127.0.0.1:0,
// waits for its contract line `ipsan unit NAME ready nbd://HOST:PORT` (and
// `ipsan unit NAME control http://HOST:PORT` when --control is given), keeps
// the tail of its stderr for failure messages, and stops it with SIGTERM
// (graceful) or SIGKILL (crash tests). Every unit still running when the test
// process exits is killed, so a failed test never leaves a daemon behind.

import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { childEnv, sleep, waitForExit } from "./process.ts";
import { makeTempDir, type TempDir } from "./tmp.ts";

/** How long a unit may take to print its ready line. */
export const UNIT_READY_TIMEOUT_MS = 20_000;
/** How long a unit may take to exit after SIGTERM before we SIGKILL it. */
export const UNIT_STOP_TIMEOUT_MS = 15_000;
/** Stderr kept per unit for failure messages. */
export const UNIT_STDERR_TAIL_BYTES = 64 * 1024;
/** Longest stdout line we accept while waiting for the contract lines. */
export const UNIT_STDOUT_LINE_BYTES_MAX = 4096;

/** Repository root (this file is dist/testing/unit.js or src/testing/unit.ts). */
export const REPO_ROOT = dirname(dirname(dirname(fileURLToPath(import.meta.url))));
export const IPSAN_BIN = join(REPO_ROOT, "bin", "ipsan");

export type UnitLine =
  | { kind: "ready"; name: string; host: string; port: number }
  | { kind: "ready-unix"; name: string; path: string }
  | { kind: "control"; name: string; host: string; port: number }
  | { kind: "iscsi"; name: string; host: string; port: number }
  | { kind: "other"; text: string };

const READY_PATTERN = /^ipsan unit (\S+) ready nbd:\/\/(\[[0-9a-fA-F:.]+\]|[^\s:/[\]]+):([0-9]{1,5})\/?$/;
const READY_UNIX_PATTERN = /^ipsan unit (\S+) ready nbd\+unix:\/\/\/\?socket=(\/\S+)$/;
const CONTROL_PATTERN = /^ipsan unit (\S+) control http:\/\/(\[[0-9a-fA-F:.]+\]|[^\s:/[\]]+):([0-9]{1,5})\/?$/;
const ISCSI_PATTERN = /^ipsan unit (\S+) iscsi iscsi:\/\/(\[[0-9a-fA-F:.]+\]|[^\s:/[\]]+):([0-9]{1,5})\/?$/;

/**
 * Parses one stdout line of `ipsan unit` (pure; brackets are stripped from
 * IPv6 hosts). A unit listening on `unix:/PATH` says `ready nbd+unix:///?socket=PATH`.
 */
export function parseUnitLine(line: string): UnitLine {
  const text = line.trim();
  const unix = READY_UNIX_PATTERN.exec(text);
  if (unix !== null) return { kind: "ready-unix", name: unix[1] ?? "", path: decodeURIComponent(unix[2] ?? "") };
  for (const [kind, pattern] of [["ready", READY_PATTERN], ["control", CONTROL_PATTERN], ["iscsi", ISCSI_PATTERN]] as const) {
    const match = pattern.exec(text);
    if (match === null) continue;
    const port = Number(match[3]);
    if (!(port > 0 && port <= 65535)) return { kind: "other", text };
    const host = (match[2] ?? "").replace(/^\[(.*)\]$/, "$1");
    return { kind, name: match[1] ?? "", host, port };
  }
  return { kind: "other", text };
}

/** "HOST:PORT" with IPv6 hosts bracketed, as URIs and --listen want it. */
export function hostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

export interface UnitOptions {
  /** Data directory; default a fresh temp dir, removed by close(). */
  dataDir?: string;
  capacity: string | number;
  volumes?: readonly { name: string; size: string | number }[];
  name?: string;
  /** Default "127.0.0.1:0"; "unix" = a Unix socket nbd.sock in the data dir (any "unix:/PATH" also works). */
  listen?: string;
  allow?: readonly string[];
  /** true = "127.0.0.1:0". */
  control?: boolean | string;
  extraArgs?: readonly string[];
  env?: Readonly<Record<string, string>>;
  /** bin/ipsan to run (default this checkout's; a canary passes a patched build's). */
  ipsanBin?: string;
  readyTimeoutMs?: number;
  /** Copy the unit's stderr to ours as it comes (also IPSAN_TEST_VERBOSE=1). */
  echoStderr?: boolean;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface RunningUnit {
  readonly name: string;
  /** TCP address ("" and 0 when the unit listens on a Unix socket). */
  readonly host: string;
  readonly port: number;
  /** The Unix socket, when started with listen "unix" or "unix:/PATH". */
  readonly socketPath: string | undefined;
  readonly pid: number;
  readonly dataDir: string;
  readonly args: readonly string[];
  readonly child: ChildProcess;
  /** Control API base URL ("http://127.0.0.1:PORT"), if started with control. */
  readonly controlUrl: string | undefined;
  /** The iSCSI portal ("127.0.0.1:PORT") from the `iscsi iscsi://HOST:PORT` line, if started with --iscsi. */
  readonly iscsiPortal: string | undefined;
  /** nbd://HOST:PORT/EXPORT, or nbd+unix:///EXPORT?socket=PATH */
  uri(exportName: string): string;
  /** The URI without an export name, for nbdinfo --list. */
  listUri(): string;
  /** Bearer token of the control API (DATA/control.token). */
  controlToken(): string;
  /** The last UNIT_STDERR_TAIL_BYTES of stderr. */
  stderr(): string;
  /** Every stdout line so far. */
  stdoutLines(): readonly string[];
  running(): boolean;
  /** SIGTERM, wait (bounded), SIGKILL if it hangs. Resolves with how it exited. */
  stop(timeoutMs?: number): Promise<ExitStatus & { forced: boolean }>;
  /** SIGKILL and wait for the exit. */
  kill9(): Promise<void>;
  /** Stops it if running and removes its data dir if we created it. */
  close(): Promise<void>;
}

const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;
function track(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on("exit", () => {
      for (const live of liveChildren) live.kill("SIGKILL");
    });
  }
  liveChildren.add(child);
  child.once("exit", () => liveChildren.delete(child));
}

/** Registers any long-lived child (nbdkit, nbdfuse, ...) to be SIGKILLed if the test process exits. */
export function killOnExit(child: ChildProcess): void {
  track(child);
}

export function unitArgs(options: UnitOptions, dataDir: string): string[] {
  const listen = options.listen === "unix" ? `unix:${join(dataDir, "nbd.sock")}` : (options.listen ?? "127.0.0.1:0");
  const args = ["unit", "--data", dataDir, "--capacity", String(options.capacity), "--listen", listen];
  if (options.name !== undefined) args.push("--name", options.name);
  for (const volume of options.volumes ?? []) args.push("--volume", `${volume.name}:${volume.size}`);
  for (const cidr of options.allow ?? []) args.push("--allow", cidr);
  if (options.control === true) args.push("--control-listen", "127.0.0.1:0");
  else if (typeof options.control === "string") args.push("--control-listen", options.control);
  args.push(...(options.extraArgs ?? []));
  return args;
}

export async function startUnit(options: UnitOptions): Promise<RunningUnit> {
  const ownDir: TempDir | undefined = options.dataDir === undefined ? makeTempDir("unit") : undefined;
  const dataDir = options.dataDir ?? ownDir?.path ?? "";
  const args = unitArgs(options, dataDir);
  const child = spawn(process.execPath, [options.ipsanBin ?? IPSAN_BIN, ...args], {
    env: childEnv(options.env),
    stdio: ["ignore", "pipe", "pipe"],
  });
  track(child);
  const echo = options.echoStderr === true || process.env["IPSAN_TEST_VERBOSE"] === "1";
  let stderrTail = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    if (echo) process.stderr.write(`[unit ${child.pid}] ${chunk}`);
    stderrTail = (stderrTail + chunk).slice(-UNIT_STDERR_TAIL_BYTES);
  });
  const lines: string[] = [];
  let partial = "";
  let ready: Extract<UnitLine, { kind: "ready" | "ready-unix" }> | undefined;
  let control: Extract<UnitLine, { kind: "control" }> | undefined;
  let iscsi: Extract<UnitLine, { kind: "iscsi" }> | undefined;
  const wantControl = options.control !== undefined && options.control !== false;
  const wantIscsi = args.includes("--iscsi");
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
      if ((parsed.kind === "ready" || parsed.kind === "ready-unix") && ready === undefined) ready = parsed;
      if (parsed.kind === "control" && control === undefined) control = parsed;
      if (parsed.kind === "iscsi" && iscsi === undefined) iscsi = parsed;
      if (ready !== undefined && (!wantControl || control !== undefined) && (!wantIscsi || iscsi !== undefined)) settle?.();
    }
    if (partial.length > UNIT_STDOUT_LINE_BYTES_MAX) partial = partial.slice(-UNIT_STDOUT_LINE_BYTES_MAX);
  });

  const readyTimeoutMs = options.readyTimeoutMs ?? UNIT_READY_TIMEOUT_MS;
  const describe = (): string => `ipsan ${args.join(" ")}\n--- stdout\n${lines.join("\n")}\n--- stderr\n${stderrTail}`;
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`unit did not print its ready line within ${readyTimeoutMs} ms: ${describe()}`)),
        readyTimeoutMs,
      );
      settle = () => {
        clearTimeout(timer);
        resolve();
      };
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        // Give the stdout/stderr pipes a moment to drain into the message.
        setTimeout(() => reject(new Error(`unit exited (code=${code} signal=${signal}) before ready: ${describe()}`)), 50);
      });
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(error);
      });
      if (ready !== undefined && (!wantControl || control !== undefined) && (!wantIscsi || iscsi !== undefined)) settle();
    });
  } catch (error) {
    child.kill("SIGKILL");
    await waitForExit(child, 5_000);
    ownDir?.remove();
    throw error;
  }
  const readyLine = ready as Extract<UnitLine, { kind: "ready" | "ready-unix" }>;
  const tcp = readyLine.kind === "ready" ? readyLine : undefined;
  const socketPath = readyLine.kind === "ready-unix" ? readyLine.path : undefined;
  const listUri = (): string =>
    socketPath !== undefined ? `nbd+unix:///?socket=${socketPath}` : `nbd://${hostPort(tcp?.host ?? "", tcp?.port ?? 0)}/`;

  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const unit: RunningUnit = {
    name: readyLine.name,
    host: tcp?.host ?? "",
    port: tcp?.port ?? 0,
    socketPath,
    pid: child.pid ?? -1,
    dataDir,
    args,
    child,
    controlUrl: control === undefined ? undefined : `http://${hostPort(control.host, control.port)}`,
    iscsiPortal: iscsi === undefined ? undefined : hostPort(iscsi.host, iscsi.port),
    uri: (exportName) =>
      socketPath !== undefined
        ? `nbd+unix:///${exportName}?socket=${socketPath}`
        : `nbd://${hostPort(tcp?.host ?? "", tcp?.port ?? 0)}/${exportName}`,
    listUri,
    controlToken: () => readFileSync(join(dataDir, "control.token"), "utf8").trim(),
    stderr: () => stderrTail,
    stdoutLines: () => lines,
    running: () => !exited(),
    async stop(timeoutMs = UNIT_STOP_TIMEOUT_MS) {
      if (!exited()) child.kill("SIGTERM");
      let forced = false;
      if (!(await waitForExit(child, timeoutMs))) {
        forced = true;
        child.kill("SIGKILL");
        await waitForExit(child, 5_000);
      }
      return { code: child.exitCode, signal: child.signalCode, forced };
    },
    async kill9() {
      if (!exited()) child.kill("SIGKILL");
      await waitForExit(child, 5_000);
      // The kernel closes the listening socket with the process; let it settle.
      await sleep(10);
    },
    async close() {
      await unit.stop();
      ownDir?.remove();
    },
  };
  return unit;
}
