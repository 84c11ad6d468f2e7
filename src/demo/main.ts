// `ipsan demo`: a whole SAN on loopback, the README's main job. Starts
// `ipsan station` and N file-backed `ipsan unit` processes that join the pool
// through the auto-configuration protocol (seed Fig. 3) with the station's
// cluster key, waits until the station lists every unit online, and prints
// how to get a volume and use it with a real NBD client. Ctrl-C (SIGINT or
// SIGTERM) stops the units first (each sends "shutdown", so the station marks
// it down), then the station, and exits 0. A child that dies on its own is
// reported with the tail of its log and the demo exits 1.
//
// The data dir is reused on a restart: the same admin token, cluster key and
// volumes; only the ports change (all are picked free by the kernel).

import { existsSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { formatConfig, userConfigPath, type ConfigKey } from "../util/config.ts";
import { IpsanError, UsageError, errorMessage } from "../util/errors.ts";
import { parseFlags, parseHostPort } from "../util/flags.ts";
import { formatSize, parseSize } from "../util/size.ts";
import { StationClient, readTokenFile, type UnitInfo } from "../host/station_client.ts";
import { IPSAN_BIN, IpsanChild, type ChildExit } from "./child.ts";

export const DEMO_UNITS_DEFAULT = 3;
export const DEMO_UNITS_MAX = 32;
export const DEMO_CAPACITY_DEFAULT = "1G";
export const STARTUP_TIMEOUT_MS = 30_000;
export const UNITS_ONLINE_TIMEOUT_MS = 30_000;
export const POLL_INTERVAL_MS = 100;
const LOG_TAIL_LINES = 15;

export const USAGE = `usage: ipsan demo [--units N] [--capacity SIZE] [--data DIR] [--http HOST:PORT]
  a control station and N file-backed SAN units on loopback (defaults: 3 units of 1G,
  data in ./ipsan-demo, API on a free port of 127.0.0.1). Ctrl-C stops everything.
`;

/** The first line of a config file the demo wrote: it may rewrite or remove such a file, never another. */
const DEMO_CONFIG_MARK = "written by ipsan demo";

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export async function demoMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    units: { type: "string" },
    capacity: { type: "string" },
    data: { type: "string" },
    http: { type: "string" },
    help: { type: "boolean" },
  });
  if (values.help === true) {
    process.stdout.write(USAGE);
    return 0;
  }
  const unitCount = Number(values.units ?? DEMO_UNITS_DEFAULT);
  if (!Number.isSafeInteger(unitCount) || unitCount < 1 || unitCount > DEMO_UNITS_MAX) {
    throw new UsageError(`--units: invalid "${values.units}" (integer 1..${DEMO_UNITS_MAX})`);
  }
  const capacity = values.capacity ?? DEMO_CAPACITY_DEFAULT;
  parseSize(capacity, "--capacity");
  const http = values.http ?? "127.0.0.1:0";
  parseHostPort(http, "--http");
  const dataDir = resolve(values.data ?? "ipsan-demo");
  return new Demo({ unitCount, capacity, http, dataDir }).run();
}

interface DemoOptions {
  readonly unitCount: number;
  readonly capacity: string;
  readonly http: string;
  readonly dataDir: string;
}

class Demo {
  readonly #o: DemoOptions;
  #station: IpsanChild | undefined;
  readonly #units: IpsanChild[] = [];
  #stopping = false;
  #failure: string | undefined;
  #wakeStop: (() => void) | undefined;
  /** The user's config file, when this demo wrote it (removed again at the stop, if still the demo's). */
  #userConfig: string | undefined;

  constructor(options: DemoOptions) {
    this.#o = options;
  }

  async run(): Promise<number> {
    const stopRequested = new Promise<void>((r) => {
      this.#wakeStop = r;
    });
    const onSignal = (signal: NodeJS.Signals): void => {
      if (!this.#stopping) process.stderr.write(`ipsan demo: ${signal}, stopping (units first, then the station)\n`);
      this.#stopping = true;
      this.#wakeStop?.();
    };
    // Last resort if this process dies without stopping its children (they run in their own groups).
    const killAll = (): void => {
      for (const child of [...this.#units, this.#station]) child?.signal("SIGKILL");
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    process.on("exit", killAll);
    try {
      await Promise.race([this.#start(), stopRequested]);
      if (!this.#stopping && this.#failure === undefined) await stopRequested;
    } catch (error) {
      this.#failure ??= errorMessage(error);
    } finally {
      this.#stopping = true;
      await this.#stopAll();
      await this.#removeUserConfig();
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
      process.off("exit", killAll);
    }
    if (this.#failure !== undefined) {
      process.stderr.write(`ipsan demo: ${this.#failure}\n`);
      return 1;
    }
    process.stdout.write("ipsan demo stopped\n");
    return 0;
  }

  #watch(child: IpsanChild): void {
    void child.exited.then(async (exit: ChildExit) => {
      if (this.#stopping) return;
      const tail = await logTail(this.#logFile(child.name));
      this.#failure ??= `${child.name} exited unexpectedly (code ${exit.code ?? exit.signal}); last lines of ${this.#logFile(child.name)}:\n${tail}`;
      this.#stopping = true;
      this.#wakeStop?.();
    });
  }

  #logFile(name: string): string {
    return join(this.#o.dataDir, "logs", `${name}.log`);
  }

  async #start(): Promise<void> {
    const { dataDir } = this.#o;
    await mkdir(join(dataDir, "logs"), { recursive: true });
    const stationDir = join(dataDir, "station");
    const station = new IpsanChild(["station", "--data", stationDir, "--http", this.#o.http, "--discovery", "127.0.0.1:0"], {
      name: "station",
      logFile: this.#logFile("station"),
    });
    this.#station = station;
    this.#watch(station);
    const apiUrl = (await station.waitForLine(/^ipsan station ready (http:\/\/\S+)/, STARTUP_TIMEOUT_MS))[1] ?? "";
    const discovery = (await station.waitForLine(/^ipsan station discovery udp:\/\/(\S+)/, STARTUP_TIMEOUT_MS))[1] ?? "";
    const keyFile = join(stationDir, "cluster.key");
    const tokenFile = join(stationDir, "admin.token");
    for (const file of [keyFile, tokenFile]) {
      if (!existsSync(file)) throw new IpsanError("UNAVAILABLE", `station is ready but ${file} is missing`);
    }
    const names: string[] = [];
    for (let i = 1; i <= this.#o.unitCount; i += 1) {
      if (this.#stopping) return;
      const name = `u${i}`;
      names.push(name);
      const unit = new IpsanChild(
        [
          "unit",
          "--name", name,
          "--data", join(dataDir, name),
          "--capacity", this.#o.capacity,
          "--listen", "127.0.0.1:0",
          "--control-listen", "127.0.0.1:0",
          "--discovery", discovery,
          "--cluster-key-file", keyFile,
        ],
        { name, logFile: this.#logFile(name) },
      );
      this.#units.push(unit);
      this.#watch(unit);
    }
    for (const unit of this.#units) await unit.waitForLine(/^ipsan unit \S+ ready nbd:\/\//, STARTUP_TIMEOUT_MS);
    const client = new StationClient({ baseUrl: new URL(apiUrl), token: await readTokenFile(tokenFile) });
    const units = await waitOnline(client, names, () => this.#stopping);
    if (this.#stopping) return;
    const capacityBytes = units.reduce((sum, u) => sum + (u.capacityBytes ?? 0), 0);
    const bin = IPSAN_BIN;
    const hostState = join(dataDir, "host");
    const copy = join(dataDir, "demo-copy.img");
    const request = `${bin} host request --station ${apiUrl} --token-file ${tokenFile} --host demo-host --size 64M --state-dir ${hostState} --json`;
    const uriOf = `node -pe 'JSON.parse(require("fs").readFileSync(0, "utf8")).uri'`;
    const config = await this.#writeConfig({ station: apiUrl, "token-file": tokenFile, "state-dir": hostState });
    process.stdout.write(
      `ipsan demo ready ${apiUrl}\n` +
        `ipsan demo config ${config} (ipsan units, ipsan volumes, ipsan tasks ... now reach this demo)\n` +
        `ipsan demo units ${names.join(" ")} online, pool ${formatSize(capacityBytes)}\n` +
        `ipsan demo token ${tokenFile}\n` +
        `ipsan demo data ${dataDir} (logs in ${join(dataDir, "logs")})\n` +
        `ipsan demo example URI=$(${request} | ${uriOf}) && nbdinfo "$URI" && nbdcopy "$URI" ${copy} && ls -l ${copy}\n` +
        `ipsan demo api curl -H "Authorization: Bearer $(cat ${tokenFile})" ${apiUrl}/api/v1/units\n` +
        `ipsan demo Ctrl-C stops the units, then the station\n`,
    );
  }

  /**
   * DATA/ipsan.conf points at this demo; so does the user's config file
   * (~/.config/ipsan/config) when there is none or the one there is a demo's,
   * so that `ipsan units` works right after the demo (issue 9 item 5). A
   * config file someone else wrote is never touched: the demo says how to use
   * its own instead. Answers the path that applies.
   */
  async #writeConfig(values: Partial<Record<ConfigKey, string>>): Promise<string> {
    const own = join(this.#o.dataDir, "ipsan.conf");
    const text = formatConfig(values, `${DEMO_CONFIG_MARK} (${this.#o.dataDir}); remove this file or write your own`);
    await writeFile(own, text, { mode: 0o600 });
    const user = userConfigPath();
    const existing = await readFile(user, "utf8").catch(() => null);
    if (existing !== null && !existing.startsWith(`# ${DEMO_CONFIG_MARK}`)) {
      process.stdout.write(`ipsan demo note ${user} is yours and stays as it is: run admin commands with --config ${own} (or IPSAN_CONFIG=${own})\n`);
      return own;
    }
    await mkdir(dirname(user), { recursive: true });
    await writeFile(user, text, { mode: 0o600 });
    this.#userConfig = user;
    return user;
  }

  /** The user's config file goes with the demo that wrote it (unless someone rewrote it meanwhile). */
  async #removeUserConfig(): Promise<void> {
    const user = this.#userConfig;
    if (user === undefined) return;
    const text = await readFile(user, "utf8").catch(() => null);
    if (text !== null && text.startsWith(`# ${DEMO_CONFIG_MARK} (${this.#o.dataDir})`)) await rm(user, { force: true });
  }

  async #stopAll(): Promise<void> {
    // Units first: each sends "shutdown" to the station, which must still be running to record it.
    const results = await Promise.all(this.#units.map(async (u) => ({ name: u.name, ...(await u.stop("SIGTERM")) })));
    const station = this.#station;
    if (station !== undefined) results.push({ name: station.name, ...(await station.stop("SIGTERM")) });
    for (const r of results) {
      if (r.killed) this.#failure ??= `${r.name} did not stop within the timeout and was killed`;
    }
  }
}

async function waitOnline(client: StationClient, names: readonly string[], stopping: () => boolean): Promise<UnitInfo[]> {
  const deadline = Date.now() + UNITS_ONLINE_TIMEOUT_MS;
  let last = "";
  while (!stopping()) {
    try {
      const units = await client.units();
      const online = units.filter((u) => names.includes(u.name) && u.state === "online");
      if (online.length === names.length) return online;
      last = units.map((u) => `${u.name}=${u.state}`).join(" ");
    } catch (error) {
      last = errorMessage(error);
    }
    if (Date.now() > deadline) {
      throw new IpsanError("UNAVAILABLE", `units ${names.join(" ")} not all online within ${UNITS_ONLINE_TIMEOUT_MS} ms (station sees: ${last || "none"})`);
    }
    await sleep(POLL_INTERVAL_MS);
  }
  return [];
}

async function logTail(path: string): Promise<string> {
  try {
    return (await readFile(path, "utf8")).trimEnd().split("\n").slice(-LOG_TAIL_LINES).join("\n");
  } catch {
    return "(no log)";
  }
}
