// Test harness: runs a real `bin/ipsan station` process on loopback (port 0
// for HTTP and UDP), waits for its contract lines, and offers a small API
// client with the admin token. Stop with SIGTERM, or kill -9 for crash tests;
// `restart` starts it again on the same data directory. Every station still
// running when the test process exits is killed (src/testing/unit.ts hook).

import { spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fetchText } from "../testing/fetch.ts";
import { childEnv, waitForExit } from "../testing/process.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";
import { IPSAN_BIN, killOnExit } from "../testing/unit.ts";

export const STATION_READY_TIMEOUT_MS = 20_000;
export const STATION_STOP_TIMEOUT_MS = 10_000;
export const API_TIMEOUT_MS = 15_000;
const STDERR_TAIL_BYTES = 64 * 1024;

export interface ApiResponse {
  readonly status: number;
  readonly body: unknown;
  readonly text: string;
  readonly headers: Headers;
}

export interface RunningStation {
  readonly url: string;
  readonly discovery: { host: string; port: number };
  /** The SNMP trap address, when started with --snmp. */
  snmp(): { host: string; port: number } | undefined;
  readonly dataDir: string;
  readonly pid: number;
  readonly child: ChildProcess;
  token(): string;
  clusterKeyFile(): string;
  api(method: string, path: string, body?: unknown, options?: { token?: string | null; raw?: string | Buffer; headers?: Record<string, string> }): Promise<ApiResponse>;
  stderr(): string;
  running(): boolean;
  stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill9(): Promise<void>;
  /** Stops it if running and removes its data dir if the harness made it. */
  close(): Promise<void>;
}

export interface StationOptions {
  readonly dataDir?: string;
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  /** Keep the data dir on close (a restart reuses it). */
  readonly keepData?: boolean;
  /** UDP discovery address (default 127.0.0.1:0); a restart passes the old one so units find it again. */
  readonly discovery?: string;
  /** Another bin/ipsan (a canary's patched build, src/testing/patched_build.ts with nodeModules). */
  readonly bin?: string;
  /**
   * Ready at "ipsan station ready" alone (several stations, --etcd: only the
   * leader listens for discovery, so a follower never prints that line; give
   * `discovery` as a fixed HOST:PORT).
   */
  readonly readyWithoutDiscovery?: boolean;
}

const READY = /^ipsan station ready (https?):\/\/(\S+)$/;
const DISCOVERY = /^ipsan station discovery udp:\/\/(\[[0-9a-fA-F:.]+\]|[^\s:]+):([0-9]+)$/;
const SNMP = /^ipsan station snmp udp:\/\/(\[[0-9a-fA-F:.]+\]|[^\s:]+):([0-9]+)$/;

export async function startStation(options: StationOptions = {}): Promise<RunningStation> {
  const own: TempDir | undefined = options.dataDir === undefined ? makeTempDir("station") : undefined;
  const dataDir = options.dataDir ?? own?.path ?? "";
  const args = ["station", "--data", dataDir, "--http", "127.0.0.1:0", "--discovery", options.discovery ?? "127.0.0.1:0", ...(options.extraArgs ?? [])];
  // IPSAN_STATION_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the station (benchmarks).
  const nodeArgs = (process.env["IPSAN_STATION_NODE_ARGS"] ?? "").split(" ").filter((a) => a !== "");
  const child = spawn(process.execPath, [...nodeArgs, options.bin ?? IPSAN_BIN, ...args], { env: childEnv(options.env), stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(child);
  let stderr = "";
  child.stderr?.setEncoding("utf8");
  child.stderr?.on("data", (chunk: string) => {
    if (process.env["IPSAN_TEST_VERBOSE"] === "1") process.stderr.write(`[station ${child.pid}] ${chunk}`);
    stderr = (stderr + chunk).slice(-STDERR_TAIL_BYTES);
  });
  let url: string | undefined;
  let discovery: { host: string; port: number } | undefined;
  let snmp: { host: string; port: number } | undefined;
  let partial = "";
  const lines: string[] = [];
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`station not ready within ${STATION_READY_TIMEOUT_MS} ms:\n${stderr}`)), STATION_READY_TIMEOUT_MS);
    child.stdout?.setEncoding("utf8");
    child.stdout?.on("data", (chunk: string) => {
      partial += chunk;
      let newline: number;
      while ((newline = partial.indexOf("\n")) >= 0) {
        const line = partial.slice(0, newline).trim();
        partial = partial.slice(newline + 1);
        lines.push(line);
        const ready = READY.exec(line);
        if (ready !== null) url = `${ready[1]}://${ready[2]}`;
        const udp = DISCOVERY.exec(line);
        if (udp !== null) discovery = { host: (udp[1] ?? "").replace(/^\[(.*)\]$/, "$1"), port: Number(udp[2]) };
        const trap = SNMP.exec(line);
        if (trap !== null) snmp = { host: (trap[1] ?? "").replace(/^\[(.*)\]$/, "$1"), port: Number(trap[2]) };
        if (url !== undefined && discovery === undefined && options.readyWithoutDiscovery === true) {
          const [host, port] = (options.discovery ?? "127.0.0.1:0").split(":");
          discovery = { host: host ?? "127.0.0.1", port: Number(port) };
        }
        if (url !== undefined && discovery !== undefined) {
          clearTimeout(timer);
          resolve();
        }
      }
    });
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      setTimeout(() => reject(new Error(`station exited (code=${code} signal=${signal}) before ready:\n${lines.join("\n")}\n${stderr}`)), 50);
    });
  }).catch(async (error: unknown) => {
    child.kill("SIGKILL");
    await waitForExit(child, 5_000);
    if (options.keepData !== true) own?.remove();
    throw error;
  });
  const base = url as string;
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const token = (): string => readFileSync(join(dataDir, "admin.token"), "utf8").trim();
  const station: RunningStation = {
    url: base,
    discovery: discovery as { host: string; port: number },
    snmp: () => snmp,
    dataDir,
    pid: child.pid ?? -1,
    child,
    token,
    clusterKeyFile: () => join(dataDir, "cluster.key"),
    async api(method, path, body, opts = {}) {
      const headers: Record<string, string> = { ...(opts.headers ?? {}) };
      const auth = opts.token === undefined ? token() : opts.token;
      if (auth !== null) headers["authorization"] = `Bearer ${auth}`;
      const payload = opts.raw ?? (body === undefined ? undefined : JSON.stringify(body));
      if (payload !== undefined) headers["content-type"] = "application/json";
      const { response, text } = await fetchText(
        `${base}${path}`,
        { method, headers, ...(payload === undefined ? {} : { body: typeof payload === "string" ? payload : new Uint8Array(payload) }) },
        API_TIMEOUT_MS,
      );
      let parsed: unknown = undefined;
      try {
        parsed = text === "" ? undefined : JSON.parse(text);
      } catch {
        parsed = text;
      }
      return { status: response.status, body: parsed, text, headers: response.headers };
    },
    stderr: () => stderr,
    running: () => !exited(),
    async stop() {
      if (!exited()) child.kill("SIGTERM");
      if (!(await waitForExit(child, STATION_STOP_TIMEOUT_MS))) {
        child.kill("SIGKILL");
        await waitForExit(child, 5_000);
      }
      return { code: child.exitCode, signal: child.signalCode };
    },
    async kill9() {
      if (!exited()) child.kill("SIGKILL");
      await waitForExit(child, 5_000);
    },
    async close() {
      await station.stop();
      if (options.keepData !== true) own?.remove();
    },
  };
  return station;
}

/** Field of an API error body, for assertions. */
export function errorOf(body: unknown): { code?: string; message?: string; field?: string; reasons?: { unit: string; reason: string }[] } {
  return (body as { error?: unknown } | undefined)?.error ?? {};
}
