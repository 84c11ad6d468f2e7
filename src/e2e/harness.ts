// End-to-end harness: a whole SAN of real `bin/ipsan` processes (a station,
// units that join it over the discovery protocol, host commands), optionally
// each inside a network namespace (`ip netns exec NS ...`). Everything is on
// ports the kernel picks, every wait is bounded, and close() stops units
// before the station (so their shutdown is recorded) and removes the temp dir.

import { join } from "node:path";
import { IpsanChild } from "../demo/child.ts";
import { IPSAN_BIN } from "../demo/child.ts";
import { StationClient, readTokenFile, type UnitInfo } from "../host/station_client.ts";
import { childEnv, describeResult, run, waitFor, type CommandResult } from "../testing/process.ts";
import { makeTempDir, type TempDir } from "../testing/tmp.ts";

export const START_TIMEOUT_MS = 20_000;
export const JOIN_TIMEOUT_MS = 20_000;
export const HOST_COMMAND_TIMEOUT_MS = 30_000;

export interface StationProcess {
  readonly child: IpsanChild;
  readonly apiUrl: string;
  /** HOST:PORT of the UDP discovery listener, what units get as --station. */
  readonly discovery: string;
  readonly dataDir: string;
  readonly tokenFile: string;
  readonly keyFile: string;
}

export interface UnitProcess {
  readonly name: string;
  readonly child: IpsanChild;
  readonly nbd: string;
  readonly dataDir: string;
  /** The control API's URL (http://HOST:PORT); its token is DATA/control.token. */
  readonly control: string;
}

export interface StationOptions {
  /** Where to listen (default 127.0.0.1:0 for both). */
  readonly http?: string;
  readonly discovery?: string;
  readonly prefix?: readonly string[];
  readonly dataDir?: string;
  /** More flags, e.g. --host-failover-after 3s. */
  readonly extraArgs?: readonly string[];
  /** Another bin/ipsan (a canary's patched build). */
  readonly bin?: string;
}

export interface UnitOptions {
  readonly capacity?: string;
  /** IP to listen on for NBD and control (default 127.0.0.1). */
  readonly address?: string;
  readonly prefix?: readonly string[];
  readonly extraArgs?: readonly string[];
  /** Another bin/ipsan (a canary's patched build). */
  readonly bin?: string;
}

export class San {
  readonly tmp: TempDir;
  station: StationProcess | undefined;
  readonly units = new Map<string, UnitProcess>();
  #client: StationClient | undefined;

  constructor(name: string) {
    this.tmp = makeTempDir(`e2e-${name}`);
  }

  log(name: string): string {
    return this.tmp.file(`${name}.log`);
  }

  async startStation(options: StationOptions = {}): Promise<StationProcess> {
    const dataDir = options.dataDir ?? this.tmp.file("station");
    const child = new IpsanChild(
      ["station", "--data", dataDir, "--http", options.http ?? "127.0.0.1:0", "--discovery", options.discovery ?? "127.0.0.1:0", ...(options.extraArgs ?? [])],
      {
        name: "station",
        logFile: this.log("station"),
        env: childEnv(),
        ...(options.prefix === undefined ? {} : { prefix: options.prefix }),
        ...(options.bin === undefined ? {} : { bin: options.bin }),
      },
    );
    const apiUrl = (await child.waitForLine(/^ipsan station ready (http:\/\/\S+)/, START_TIMEOUT_MS))[1] ?? "";
    const discovery = (await child.waitForLine(/^ipsan station discovery udp:\/\/(\S+)/, START_TIMEOUT_MS))[1] ?? "";
    this.station = {
      child,
      apiUrl,
      discovery,
      dataDir,
      tokenFile: join(dataDir, "admin.token"),
      keyFile: join(dataDir, "cluster.key"),
    };
    this.#client = undefined;
    return this.station;
  }

  async startUnit(name: string, options: UnitOptions = {}): Promise<UnitProcess> {
    const station = this.station;
    if (station === undefined) throw new Error("start the station first");
    const address = options.address ?? "127.0.0.1";
    const dataDir = this.tmp.file(`unit-${name}`);
    const child = new IpsanChild(
      [
        "unit",
        "--name", name,
        "--data", dataDir,
        "--capacity", options.capacity ?? "256M",
        "--listen", `${address}:0`,
        "--control-listen", `${address}:0`,
        "--discovery", station.discovery,
        "--cluster-key-file", station.keyFile,
        ...(options.extraArgs ?? []),
      ],
      {
        name,
        logFile: this.log(name),
        env: childEnv(),
        ...(options.prefix === undefined ? {} : { prefix: options.prefix }),
        ...(options.bin === undefined ? {} : { bin: options.bin }),
      },
    );
    const nbd = (await child.waitForLine(/^ipsan unit \S+ ready (nbd:\/\/\S+)/, START_TIMEOUT_MS))[1] ?? "";
    const control = (await child.waitForLine(/^ipsan unit \S+ control (http:\/\/\S+)/, START_TIMEOUT_MS))[1] ?? "";
    const unit = { name, child, nbd, dataDir, control };
    this.units.set(name, unit);
    return unit;
  }

  /** A REST client on the current station (re-made after a restart). */
  async client(): Promise<StationClient> {
    const station = this.station;
    if (station === undefined) throw new Error("no station");
    this.#client ??= new StationClient({ baseUrl: new URL(station.apiUrl), token: await readTokenFile(station.tokenFile) });
    return this.#client;
  }

  /** Waits until every named unit is in `state` in GET /api/v1/units; returns the whole list. */
  async waitUnits(names: readonly string[], state = "online", timeoutMs = JOIN_TIMEOUT_MS): Promise<UnitInfo[]> {
    const client = await this.client();
    let last = "";
    try {
      return await waitFor(
        `units ${names.join(",")} ${state}`,
        async () => {
          const units = await client.units().catch(() => [] as UnitInfo[]);
          last = units.map((u) => `${u.name}=${u.state}`).join(" ");
          return names.every((n) => units.some((u) => u.name === n && u.state === state)) ? units : undefined;
        },
        { timeoutMs, intervalMs: 50 },
      );
    } catch (error) {
      throw new Error(`${(error as Error).message} (station sees: ${last || "nothing"})\n${this.logs()}`);
    }
  }

  /** `bin/ipsan host ARGS` (inside `prefix`), must exit 0; parses stdout as JSON when --json is given. */
  async host(args: readonly string[], prefix: readonly string[] = []): Promise<{ result: CommandResult; json: unknown }> {
    const result = await ipsan(["host", ...args], prefix);
    if (result.code !== 0) throw new Error(`${describeResult(result)}\n${this.logs()}`);
    return { result, json: args.includes("--json") ? JSON.parse(result.stdout) : undefined };
  }

  /** The station's and units' log tails, for assertion messages. */
  logs(): string {
    const parts: string[] = [];
    for (const child of [this.station?.child, ...[...this.units.values()].map((u) => u.child)]) {
      if (child !== undefined) parts.push(`--- ${child.name} exit=${JSON.stringify(child.exit ?? null)}`);
    }
    return `${parts.join("\n")}\n(logs in ${this.tmp.path}; IPSAN_KEEP_TMP=1 keeps them)`;
  }

  async close(): Promise<void> {
    await Promise.all([...this.units.values()].map((u) => u.child.stop("SIGTERM")));
    await this.station?.child.stop("SIGTERM");
    this.tmp.remove();
  }
}

/** Runs `bin/ipsan ARGS` to completion (inside `prefix`, e.g. ip netns exec NS). */
export function ipsan(args: readonly string[], prefix: readonly string[] = [], timeoutMs = HOST_COMMAND_TIMEOUT_MS): Promise<CommandResult> {
  const [command, ...rest] = [...prefix, process.execPath, IPSAN_BIN, ...args];
  return run(command ?? process.execPath, rest, { timeoutMs });
}

export function sumCapacity(units: readonly UnitInfo[]): number {
  return units.reduce((sum, u) => sum + (u.capacityBytes ?? 0), 0);
}

// ---------------------------------------------------------------- fio

export interface FioJob {
  readonly jobname: string;
  readonly error: number;
  readonly read: { io_bytes: number; total_ios: number };
  readonly write: { io_bytes: number; total_ios: number };
}

export interface FioRun {
  readonly result: CommandResult;
  readonly jobs: FioJob[];
  readonly totalErrors: number;
}

/**
 * fio ioengine=nbd on `uri`; JSON output parsed. Never rejects for fio's own failure.
 * An nbds:// URI with a tls-psk-file needs `env` from fioTlsEnv (src/testing/fio_tls.ts).
 */
export async function fio(name: string, uri: string, args: readonly string[], timeoutMs = 120_000, env?: Readonly<Record<string, string>>): Promise<FioRun> {
  // No verify state file: fio would drop local-NAME-verify.state into the working directory.
  const result = await run("fio", [`--name=${name}`, "--ioengine=nbd", `--uri=${uri}`, "--output-format=json", "--verify_state_save=0", ...args], {
    timeoutMs,
    ...(env === undefined ? {} : { env }),
  });
  let jobs: FioJob[] = [];
  try {
    const start = result.stdout.indexOf("{");
    jobs = (JSON.parse(result.stdout.slice(start)) as { jobs: FioJob[] }).jobs;
  } catch {
    // fio failed before printing JSON: callers assert on result
  }
  return { result, jobs, totalErrors: jobs.reduce((sum, j) => sum + j.error, 0) };
}

/**
 * The out-of-band workload: 4 KiB random writes at QD 16 with crc32c in every
 * block, paced (rate_iops) so the write phase lasts `seconds`, then fio reads
 * every block back and checks it.
 */
export function verifyJob(sizeBytes: number, seconds: number): string[] {
  const blocks = sizeBytes / 4096;
  return [
    "--rw=randwrite",
    "--bs=4k",
    "--iodepth=16",
    `--size=${sizeBytes}`,
    "--verify=crc32c",
    "--verify_fatal=1",
    "--do_verify=1",
    "--randrepeat=1",
    `--rate_iops=,${Math.ceil(blocks / seconds)}`,
  ];
}

/** A second pass that only reads and checks what verifyJob wrote. */
export function verifyOnlyJob(sizeBytes: number): string[] {
  return ["--rw=randwrite", "--bs=4k", "--iodepth=16", `--size=${sizeBytes}`, "--verify=crc32c", "--verify_fatal=1", "--verify_only", "--randrepeat=1"];
}

export function describeFio(run: FioRun): string {
  return `${describeResult(run.result)}\njobs: ${JSON.stringify(run.jobs.map((j) => ({ name: j.jobname, error: j.error, read: j.read.io_bytes, write: j.write.io_bytes })))}`;
}
