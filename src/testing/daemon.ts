// Long-running helper programs a test starts beside the unit (nbdkit,
// qemu-nbd, nbdfuse): spawn, wait (bounded) until a readiness probe passes,
// keep the stderr tail, stop with SIGTERM then SIGKILL. Killed if the test
// process exits. Also: a free TCP port on loopback for servers that cannot
// listen on port 0 themselves.

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { createSocket } from "node:dgram";
import { createServer, connect } from "node:net";
import { childEnv, formatCommand, sleep, waitForExit } from "./process.ts";
import { killOnExit } from "./unit.ts";

export const DAEMON_READY_TIMEOUT_MS = 20_000;
export const DAEMON_STOP_TIMEOUT_MS = 10_000;
export const DAEMON_STDERR_TAIL_BYTES = 32 * 1024;
const READY_POLL_MS = 25;

export interface Daemon {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly description: string;
  stderr(): string;
  running(): boolean;
  stop(timeoutMs?: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export interface DaemonOptions {
  /** Resolves true once the daemon serves. */
  ready: () => boolean | Promise<boolean>;
  readyTimeoutMs?: number;
  env?: Readonly<Record<string, string>>;
  /** Default SIGTERM. */
  stopSignal?: NodeJS.Signals;
}

export async function startDaemon(command: string, args: readonly string[], options: DaemonOptions): Promise<Daemon> {
  const description = formatCommand(command, args);
  const child = spawn(command, [...args], { env: childEnv(options.env), stdio: ["ignore", "pipe", "pipe"] });
  killOnExit(child);
  let tail = "";
  const keep = (chunk: Buffer): void => {
    tail = (tail + chunk.toString("utf8")).slice(-DAEMON_STDERR_TAIL_BYTES);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  let spawnError: Error | undefined;
  child.on("error", (error) => {
    spawnError = error;
  });
  const exited = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const daemon: Daemon = {
    child,
    pid: child.pid ?? -1,
    description,
    stderr: () => tail,
    running: () => !exited(),
    async stop(timeoutMs = DAEMON_STOP_TIMEOUT_MS) {
      if (!exited()) child.kill(options.stopSignal ?? "SIGTERM");
      if (!(await waitForExit(child, timeoutMs))) {
        child.kill("SIGKILL");
        await waitForExit(child, 5_000);
      }
      return { code: child.exitCode, signal: child.signalCode };
    },
  };
  const timeoutMs = options.readyTimeoutMs ?? DAEMON_READY_TIMEOUT_MS;
  const deadlineMs = Date.now() + timeoutMs;
  for (;;) {
    if (spawnError !== undefined) throw new Error(`cannot run ${description}: ${spawnError.message}`);
    if (exited()) {
      await sleep(50);
      throw new Error(`${description} exited (code=${child.exitCode} signal=${child.signalCode}) before ready:\n${tail}`);
    }
    if (await options.ready()) return daemon;
    if (Date.now() >= deadlineMs) {
      await daemon.stop();
      throw new Error(`${description} not ready within ${timeoutMs} ms:\n${tail}`);
    }
    await sleep(READY_POLL_MS);
  }
}

/** A readiness probe: the file exists (nbdkit/qemu-nbd pid files are written once they listen). */
export function fileExists(path: string): () => boolean {
  return () => existsSync(path);
}

/** A readiness probe: a TCP connection to host:port succeeds (and is closed at once). */
export function tcpAccepts(host: string, port: number): () => Promise<boolean> {
  return () =>
    new Promise((resolve) => {
      const socket = connect({ host, port });
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
}

/**
 * A TCP port that was free on `host` a moment ago (the OS picked it for a
 * listener on port 0 that we then closed). For servers such as nbdkit and
 * qemu-nbd that cannot report a port they chose; a caller that loses the race
 * sees the server fail to bind and may retry.
 */
export function freeTcpPort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen({ host, port: 0, exclusive: true }, () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolve(port) : reject(new Error("no port from the OS"))));
    });
  });
}

/** A UDP port that was free on `host` a moment ago (as freeTcpPort): a station's discovery address that units are given before it binds. */
export function freeUdpPort(host = "127.0.0.1"): Promise<number> {
  return new Promise((resolve, reject) => {
    const socket = createSocket(host.includes(":") ? "udp6" : "udp4");
    socket.once("error", reject);
    socket.bind({ address: host, port: 0, exclusive: true }, () => {
      const port = socket.address().port;
      socket.close(() => (port > 0 ? resolve(port) : reject(new Error("no port from the OS"))));
    });
  });
}
