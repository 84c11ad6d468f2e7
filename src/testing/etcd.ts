// Real etcd clusters for the tests of several stations on etcd (issue 11):
// Debian's etcd-server (/usr/bin/etcd, 3.4) started as child processes on
// 127.0.0.1, one or three members, every port free-picked (never 2379/2380, so
// a system etcd that the Debian package may have started cannot meet them),
// data dirs on memoryTmpBase() (tmpfs: etcd's fsyncs cost nothing), short
// raft timers (heartbeat 50 ms, election 500 ms) so a leader change takes
// well under a second. Each member's stdout+stderr go to a file in the
// cluster's temp dir (appended across restarts); every error the harness
// throws ends with the last lines of each member's file, and describe() gives
// them to a test's own assertion messages.
//
// Cleanup: cluster.stop() SIGKILLs every member, waits for the exits and
// removes the temp dir; a test calls it from after()/finally. (member.stop()
// is the graceful one: SIGCONT if paused, SIGTERM, SIGKILL if it hangs.)
// If the test process exits without it, the members are SIGKILLed
// (killOnExit) and the temp dir removed by an exit hook.
//
// The child's environment drops every ETCD_* / ETCDCTL_* variable of the
// caller's shell: etcd and etcdctl refuse to start when such a variable is
// shadowed by a flag, and an ETCDCTL_ENDPOINTS would point elsewhere.

import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readSync, fstatSync } from "node:fs";
import { httpExchange } from "../util/http_client.ts";
import { freeTcpPort, tcpAccepts } from "./daemon.ts";
import { childEnv, describeResult, run, sleep, waitForExit } from "./process.ts";
import { type TempDir, makeTempDir, memoryTmpBase } from "./tmp.ts";
import { killOnExit } from "./unit.ts";

/** The etcd server binary (Debian etcd-server; PATH is system-first). */
export const ETCD_BIN = "etcd";
/** The etcd command-line client (Debian etcd-client). */
export const ETCDCTL_BIN = "etcdctl";
/** Raft heartbeat of the test members (etcd's default is 100 ms). */
export const ETCD_HEARTBEAT_MS = 50;
/** Raft election timeout of the test members (etcd's default is 1000 ms). */
export const ETCD_ELECTION_MS = 500;
/** How long startEtcdCluster() and member.start() wait for health. */
export const ETCD_READY_TIMEOUT_MS = 20_000;
/** SIGTERM to exit before SIGKILL, and SIGKILL to exit before giving up. */
export const ETCD_STOP_TIMEOUT_MS = 5_000;
/** One HTTP probe of a member (/health, /metrics). */
export const ETCD_PROBE_TIMEOUT_MS = 1_000;
/** Default hard limit of one etcdctl command. */
export const ETCDCTL_TIMEOUT_MS = 10_000;
/** Lines of each member's log shown in errors and describe(). */
export const ETCD_LOG_TAIL_LINES = 30;
/** Cluster starts tried when a free-picked port was taken meanwhile. */
export const ETCD_PORT_ATTEMPTS = 3;
const LOG_TAIL_BYTES = 16 * 1024;
const PROBE_MAX_BYTES = 4 * 1024 * 1024;
const POLL_MS = 50;

const isEtcdEnv = (name: string): boolean => name.startsWith("ETCD_") || name.startsWith("ETCDCTL_");

export interface EtcdClusterOptions {
  /** Number of members: 1 or 3. */
  members: 1 | 3;
  /** Names the temp dir (`ipsan-PREFIX-...`) and the cluster token; default "etcd". */
  prefix?: string;
  heartbeatMs?: number;
  electionMs?: number;
  readyTimeoutMs?: number;
  /** Appended to every member's command line. */
  extraArgs?: readonly string[];
}

export interface EtcdMember {
  /** m0, m1, m2 */
  readonly name: string;
  /** http://127.0.0.1:PORT: what clients call (etcdctl --endpoints, new Etcd3({hosts})). */
  readonly clientUrl: string;
  /** The port of clientUrl (for a TCP proxy in front of this member). */
  readonly clientPort: number;
  readonly peerUrl: string;
  readonly dataDir: string;
  /** The file holding this member's stdout and stderr, across restarts. */
  readonly logFile: string;
  /** Pid of the running process, -1 when stopped. */
  readonly pid: number;
  /** The process is alive (paused counts as alive). */
  running(): boolean;
  paused(): boolean;
  /** Sends `signal` (default SIGKILL); for a signal that ends it, waits (bounded) until it has exited. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** SIGCONT if paused, SIGTERM, SIGKILL after ETCD_STOP_TIMEOUT_MS; resolves once exited. No-op when stopped. */
  stop(): Promise<void>;
  /**
   * Starts it again with the same name, data dir and ports. `wait`: "healthy"
   * (default: its /health is true, i.e. it has rejoined a leader with quorum)
   * or "listening" (its client port accepts; for a member started while the
   * cluster has no quorum).
   */
  start(options?: { wait?: "healthy" | "listening"; timeoutMs?: number }): Promise<void>;
  /** SIGSTOP: the process keeps its sockets open but answers nothing (a hung member). */
  pause(): void;
  /** SIGCONT. */
  resume(): void;
  /** GET /health answers {"health":"true"} within ETCD_PROBE_TIMEOUT_MS. */
  healthy(): Promise<boolean>;
  /** Its /metrics say etcd_server_is_leader 1 (false when it does not answer). */
  isLeader(): Promise<boolean>;
  /** The last `lines` lines of its log file. */
  logTail(lines?: number): string;
}

export interface EtcdCluster {
  /** Every member's client URL, in member order. */
  readonly endpoints: string[];
  /** The same, comma-joined: etcdctl's --endpoints and `ipsan station --etcd`. */
  readonly endpointsFlag: string;
  readonly members: EtcdMember[];
  /** The cluster's temp dir (members' data dirs and log files). */
  readonly dir: string;
  /** The member its peers follow: polls until exactly one running, unpaused member says it leads (bounded; default 5 s). */
  leader(timeoutMs?: number): Promise<EtcdMember>;
  /** Until every running, unpaused member answers /health true (bounded; default ETCD_READY_TIMEOUT_MS). */
  waitHealthy(timeoutMs?: number): Promise<void>;
  /** Each member's state and log tail, for assertion messages. */
  describe(): string;
  /** SIGKILLs every member, waits for their exits and removes the temp dir (teardown: the data is gone). Idempotent. */
  stop(): Promise<void>;
}

// ---------------------------------------------------------------- cleanup on exit

/** Temp dirs of clusters not stopped yet, with a synchronous SIGKILL of their members. */
const liveClusters = new Map<TempDir, () => void>();
let exitHookInstalled = false;
function cleanUpOnExit(dir: TempDir, killAll: () => void): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on("exit", () => {
      for (const [dir, kill] of liveClusters) {
        kill();
        try {
          dir.remove();
        } catch {
          // a member still writing; the OS temp cleaner gets the rest
        }
      }
    });
  }
  liveClusters.set(dir, killAll);
}

// ---------------------------------------------------------------- probes

async function probe(url: string): Promise<{ status: number; text: string } | undefined> {
  try {
    const answer = await httpExchange({ url, timeoutMs: ETCD_PROBE_TIMEOUT_MS, maxBytes: PROBE_MAX_BYTES });
    return { status: answer.status, text: answer.text() };
  } catch {
    return undefined;
  }
}

function readTail(path: string, lines: number): string {
  if (!existsSync(path)) return "(no log yet)";
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    const length = Math.min(size, LOG_TAIL_BYTES);
    const buffer = Buffer.alloc(length);
    readSync(fd, buffer, 0, length, size - length);
    const all = buffer.toString("utf8").split("\n");
    if (all.at(-1) === "") all.pop();
    return all.slice(-lines).join("\n");
  } finally {
    closeSync(fd);
  }
}

// ---------------------------------------------------------------- members

interface MemberSpec {
  name: string;
  clientPort: number;
  peerPort: number;
}

interface MemberInternal extends EtcdMember {
  /** Spawns the process (no waiting). */
  spawnProcess(): void;
  /** Why the last process ended early, with its log tail, when it did. */
  exitedEarly(): string | undefined;
}

function makeMember(spec: MemberSpec, all: readonly MemberSpec[], dir: TempDir, token: string, options: EtcdClusterOptions): MemberInternal {
  const clientUrl = `http://127.0.0.1:${spec.clientPort}`;
  const peerUrl = `http://127.0.0.1:${spec.peerPort}`;
  const dataDir = dir.file(`${spec.name}.data`);
  const logFile = dir.file(`${spec.name}.log`);
  const initialCluster = all.map((m) => `${m.name}=http://127.0.0.1:${m.peerPort}`).join(",");
  const args = [
    "--name", spec.name,
    "--data-dir", dataDir,
    "--listen-client-urls", clientUrl,
    "--advertise-client-urls", clientUrl,
    "--listen-peer-urls", peerUrl,
    "--initial-advertise-peer-urls", peerUrl,
    "--initial-cluster", initialCluster,
    "--initial-cluster-state", "new",
    "--initial-cluster-token", token,
    "--heartbeat-interval", String(options.heartbeatMs ?? ETCD_HEARTBEAT_MS),
    "--election-timeout", String(options.electionMs ?? ETCD_ELECTION_MS),
    "--logger", "zap",
    "--log-outputs", "stderr",
    ...(options.extraArgs ?? []),
  ];
  let child: ChildProcess | undefined;
  let spawnError: Error | undefined;
  let isPaused = false;
  const alive = (): boolean => child !== undefined && child.exitCode === null && child.signalCode === null;
  const tail = (lines = ETCD_LOG_TAIL_LINES): string => readTail(logFile, lines);
  const fail = (what: string): Error => new Error(`etcd member ${spec.name} (${clientUrl}): ${what}\n--- last lines of ${logFile}\n${tail()}`);

  const waitExit = async (): Promise<void> => {
    const current = child;
    if (current === undefined) return;
    if (!(await waitForExit(current, ETCD_STOP_TIMEOUT_MS))) {
      current.kill("SIGKILL");
      if (!(await waitForExit(current, ETCD_STOP_TIMEOUT_MS))) throw fail(`pid ${current.pid} did not exit after SIGKILL`);
    }
    isPaused = false;
  };

  const member: MemberInternal = {
    name: spec.name,
    clientUrl,
    clientPort: spec.clientPort,
    peerUrl,
    dataDir,
    logFile,
    get pid(): number {
      return alive() ? (child?.pid ?? -1) : -1;
    },
    running: alive,
    paused: () => alive() && isPaused,
    spawnProcess() {
      if (alive()) throw fail("already running");
      mkdirSync(dataDir, { recursive: true, mode: 0o700 });
      const fd = openSync(logFile, "a");
      spawnError = undefined;
      isPaused = false;
      try {
        child = spawn(ETCD_BIN, args, { env: childEnv(undefined, isEtcdEnv), stdio: ["ignore", fd, fd] });
      } finally {
        closeSync(fd);
      }
      killOnExit(child);
      child.on("error", (error) => {
        spawnError = error;
      });
    },
    exitedEarly() {
      if (spawnError !== undefined) {
        const missing = (spawnError as NodeJS.ErrnoException).code === "ENOENT";
        return `cannot run ${ETCD_BIN}: ${spawnError.message}${missing ? " (install Debian's etcd-server: scripts/setup)" : ""}`;
      }
      if (child !== undefined && !alive()) return `exited (code=${child.exitCode} signal=${child.signalCode})`;
      return undefined;
    },
    async kill(signal: NodeJS.Signals = "SIGKILL") {
      const current = child;
      if (current === undefined || !alive()) throw fail(`cannot send ${signal}: not running`);
      current.kill(signal);
      if (signal === "SIGSTOP") isPaused = true;
      if (signal === "SIGCONT") isPaused = false;
      if (signal === "SIGKILL" || signal === "SIGTERM" || signal === "SIGINT" || signal === "SIGQUIT") {
        if (isPaused && signal !== "SIGKILL") current.kill("SIGCONT");
        await waitExit();
      }
    },
    async stop() {
      const current = child;
      if (current === undefined || !alive()) return;
      if (isPaused) current.kill("SIGCONT");
      current.kill("SIGTERM");
      await waitExit();
    },
    async start(startOptions = {}) {
      member.spawnProcess();
      const timeoutMs = startOptions.timeoutMs ?? options.readyTimeoutMs ?? ETCD_READY_TIMEOUT_MS;
      const ready = startOptions.wait === "listening" ? tcpAccepts("127.0.0.1", spec.clientPort) : member.healthy;
      const deadlineMs = Date.now() + timeoutMs;
      for (;;) {
        const early = member.exitedEarly();
        if (early !== undefined) throw fail(early);
        if (await ready()) return;
        if (Date.now() >= deadlineMs) throw fail(`not ${startOptions.wait ?? "healthy"} within ${timeoutMs} ms`);
        await sleep(POLL_MS);
      }
    },
    pause() {
      if (!alive()) throw fail("cannot pause: not running");
      child?.kill("SIGSTOP");
      isPaused = true;
    },
    resume() {
      if (!alive()) throw fail("cannot resume: not running");
      child?.kill("SIGCONT");
      isPaused = false;
    },
    async healthy() {
      if (!alive()) return false;
      const answer = await probe(`${clientUrl}/health`);
      return answer !== undefined && answer.status === 200 && /"health"\s*:\s*"true"/.test(answer.text);
    },
    async isLeader() {
      if (!alive()) return false;
      const answer = await probe(`${clientUrl}/metrics`);
      return answer !== undefined && answer.status === 200 && /^etcd_server_is_leader 1$/m.test(answer.text);
    },
    logTail: tail,
  };
  return member;
}

// ---------------------------------------------------------------- cluster

async function distinctFreePorts(count: number): Promise<number[]> {
  const ports = new Set<number>();
  for (let attempt = 0; ports.size < count; attempt++) {
    if (attempt > count * 10) throw new Error(`could not find ${count} distinct free ports on 127.0.0.1`);
    ports.add(await freeTcpPort());
  }
  return [...ports];
}

function describeMembers(members: readonly EtcdMember[]): string {
  return members
    .map((m) => {
      const state = m.running() ? (m.paused() ? `paused (pid ${m.pid})` : `running (pid ${m.pid})`) : "stopped";
      return `--- etcd member ${m.name} ${m.clientUrl}: ${state}; last lines of ${m.logFile}\n${m.logTail()}`;
    })
    .join("\n");
}

/** Starts a cluster of real etcd processes and waits (bounded) until every member is healthy. */
export async function startEtcdCluster(options: EtcdClusterOptions): Promise<EtcdCluster> {
  if (options.members !== 1 && options.members !== 3) throw new Error(`startEtcdCluster: members must be 1 or 3, not ${String(options.members)}`);
  const prefix = options.prefix ?? "etcd";
  const timeoutMs = options.readyTimeoutMs ?? ETCD_READY_TIMEOUT_MS;
  let lastError: Error | undefined;
  for (let attempt = 1; attempt <= ETCD_PORT_ATTEMPTS; attempt++) {
    const dir = makeTempDir(prefix, memoryTmpBase());
    const ports = await distinctFreePorts(options.members * 2);
    const specs: MemberSpec[] = [];
    for (let i = 0; i < options.members; i++) specs.push({ name: `m${i}`, clientPort: ports[2 * i] ?? 0, peerPort: ports[2 * i + 1] ?? 0 });
    const token = `${prefix}-${process.pid}-${Date.now()}`;
    const members = specs.map((spec) => makeMember(spec, specs, dir, token, options));
    cleanUpOnExit(dir, () => {
      for (const m of members) if (m.running()) process.kill(m.pid, "SIGKILL");
    });
    let stopped = false;
    const cluster: EtcdCluster = {
      endpoints: members.map((m) => m.clientUrl),
      endpointsFlag: members.map((m) => m.clientUrl).join(","),
      members,
      dir: dir.path,
      async leader(leaderTimeoutMs = 5_000) {
        const deadlineMs = Date.now() + leaderTimeoutMs;
        let seen = "";
        for (;;) {
          const candidates = members.filter((m) => m.running() && !m.paused());
          const leads = await Promise.all(candidates.map((m) => m.isLeader()));
          const leaders = candidates.filter((_, i) => leads[i] === true);
          const [only] = leaders;
          if (leaders.length === 1 && only !== undefined) return only;
          seen = leaders.length === 0 ? "no member says it leads" : `several say they lead: ${leaders.map((m) => m.name).join(", ")}`;
          if (Date.now() >= deadlineMs) throw new Error(`no single etcd leader within ${leaderTimeoutMs} ms (${seen})\n${describeMembers(members)}`);
          await sleep(POLL_MS);
        }
      },
      async waitHealthy(healthyTimeoutMs = timeoutMs) {
        const deadlineMs = Date.now() + healthyTimeoutMs;
        for (;;) {
          const candidates = members.filter((m) => m.running() && !m.paused());
          const health = await Promise.all(candidates.map((m) => m.healthy()));
          if (candidates.length > 0 && health.every(Boolean)) return;
          if (Date.now() >= deadlineMs) {
            const sick = candidates.filter((_, i) => health[i] !== true).map((m) => m.name);
            throw new Error(`etcd cluster not healthy within ${healthyTimeoutMs} ms (unhealthy: ${sick.join(", ") || "no running member"})\n${describeMembers(members)}`);
          }
          await sleep(POLL_MS);
        }
      },
      describe: () => describeMembers(members),
      async stop() {
        if (stopped) return;
        stopped = true;
        // SIGKILL: the data is thrown away, and a SIGTERM to every member at once can keep a leader
        // trying to hand over leadership for seconds.
        const results = await Promise.allSettled(members.map((m) => (m.running() ? m.kill("SIGKILL") : Promise.resolve())));
        dir.remove();
        liveClusters.delete(dir);
        const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
        if (failed !== undefined) throw failed.reason;
      },
    };
    try {
      for (const member of members) member.spawnProcess();
      const deadlineMs = Date.now() + timeoutMs;
      for (;;) {
        const early = members.map((m) => (m.exitedEarly() === undefined ? undefined : `${m.name}: ${m.exitedEarly()}`)).filter((e) => e !== undefined);
        if (early.length > 0) throw new Error(`etcd cluster did not start: ${early.join("; ")}\n${describeMembers(members)}`);
        const health = await Promise.all(members.map((m) => m.healthy()));
        if (health.every(Boolean)) return cluster;
        if (Date.now() >= deadlineMs) throw new Error(`etcd cluster not healthy within ${timeoutMs} ms\n${describeMembers(members)}`);
        await sleep(POLL_MS);
      }
    } catch (error) {
      lastError = error instanceof Error ? error : new Error(String(error));
      const portTaken = members.some((m) => /address already in use/.test(m.logTail(ETCD_LOG_TAIL_LINES)));
      await cluster.stop().catch(() => {});
      if (!portTaken) throw lastError;
    }
  }
  throw new Error(`etcd cluster did not start in ${ETCD_PORT_ATTEMPTS} attempts (a free-picked port was taken each time); last: ${lastError?.message ?? ""}`);
}

// ---------------------------------------------------------------- etcdctl

/**
 * Runs `etcdctl --endpoints ENDPOINTS ARGS...` (API v3, the caller's ETCDCTL_*
 * variables removed, dial timeout 2 s and command timeout 5 s unless ARGS give
 * their own) within ETCDCTL_TIMEOUT_MS and returns its stdout (bounded by
 * OUTPUT_BYTES_MAX); throws with the command's output unless it exits 0.
 * Endpoints are required: etcdctl would otherwise call 127.0.0.1:2379, where a
 * system etcd may answer.
 */
export async function etcdctl(endpoints: string | readonly string[], ...args: string[]): Promise<string> {
  const list = (typeof endpoints === "string" ? endpoints.split(",") : [...endpoints]).map((e) => e.trim()).filter((e) => e !== "");
  if (list.length === 0) throw new Error("etcdctl: no endpoints given (pass the cluster's endpoints; the default 127.0.0.1:2379 may be a system etcd)");
  for (const endpoint of list) {
    if (!/^https?:\/\/[^/\s]+\/?$/.test(endpoint)) throw new Error(`etcdctl: endpoint ${JSON.stringify(endpoint)} is not a client URL like http://127.0.0.1:PORT`);
  }
  const command = ["--endpoints", list.join(","), "--dial-timeout", "2s", "--command-timeout", "5s", ...args];
  const result = await run(ETCDCTL_BIN, command, { timeoutMs: ETCDCTL_TIMEOUT_MS, env: { ETCDCTL_API: "3" }, unsetEnv: isEtcdEnv });
  if (result.code !== 0 || result.timedOut) throw new Error(`etcdctl failed: ${describeResult(result)}`);
  return result.stdout;
}
