// `ipsan station`: the control station. Opens (or creates) its data directory
// with the admin token, the cluster key and the SQLite database; serves the
// REST API; runs the discovery listener (UDP) and, with --snmp, the SNMP trap
// listener; stores what they report; reconciles units with the assignments.
//
//   ipsan station --data DIR [--http HOST:PORT] [--discovery HOST:PORT]
//                 [--snmp HOST:PORT] [--snmp-community NAME]
//                 [--tls-cert FILE --tls-key FILE]
//
// Prints "ipsan station ready http://HOST:PORT" (https:// with --tls-cert) and
// "ipsan station discovery udp://HOST:PORT" on stdout when serving.
// SIGINT/SIGTERM: stop accepting, close listeners and the database, exit 0.

import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import { CLUSTER_KEY_FILE_NAME, loadOrCreateClusterKey } from "../discovery/keys.ts";
import { SnmpTrapListener } from "../discovery/snmp.ts";
import { attachSnmp } from "../discovery/snmp_join.ts";
import { DiscoveryListener } from "../discovery/station_listener.ts";
import { UnitIdentities } from "../discovery/identities.ts";
import { identityPersistence } from "./unit_identities.ts";
import { IpsanError, UsageError, errorMessage } from "../util/errors.ts";
import { parseFlags, parseHostPort } from "../util/flags.ts";
import { logger } from "../util/log.ts";
import { createSecretFileIfMissing } from "../util/secret_file.ts";
import { openDatabase, startCheckpointer } from "./db.ts";
import { HOST_FAILOVER_AFTER_USAGE, hostFailoverAfterFlag } from "./host_failover.ts";
import { ApiServer } from "./api/server.ts";
import { StationTasks } from "./tasks/operations.ts";
import { wipeChunkBytesFrom } from "./tasks/wipe.ts";
import { StationMetrics } from "./metrics.ts";
import { DEFAULT_STATION_OPTIONS, Station } from "./station.ts";
import { StationStore } from "./store.ts";
import { LegReplacer, REPLACE_AFTER_DEFAULT_MS } from "./replacement.ts";
import { formatDuration, parseDuration } from "../util/duration.ts";
import { HOST_KEYS_SECRET_FILE_NAME, loadOrCreateHostKeySecret } from "./host_keys.ts";
import { AUDIT_FILE_NAME, AuditLog } from "./auth/audit.ts";
import { TokenStore } from "./auth/tokens.ts";
import { realClock } from "../util/clock.ts";
import { STATS_POLL_INTERVAL_MS_DEFAULT, StationStats } from "./stats/collector.ts";
import { stationStatsSource } from "./stats/source.ts";
import { renderCounter, renderGauge } from "../util/prometheus.ts";
import { randomBytes } from "node:crypto";
import type { Db } from "./db.ts";
import type { ApiServerOptions } from "./api/server.ts";
import { EtcdState, parseEndpoints } from "./cluster/etcd_log.ts";
import { ClusterNode, LEADER_LEASE_MS_DEFAULT, LEADER_LEASE_MS_MAX, LEADER_LEASE_MS_MIN } from "./cluster/node.ts";
import { FrontServer } from "./cluster/front.ts";

const log = logger("station");

export const DEFAULT_HTTP = "127.0.0.1:8640";
export const DEFAULT_DISCOVERY = "127.0.0.1:8641";
export const ADMIN_TOKEN_FILE_NAME = "admin.token";
export const DATABASE_FILE_NAME = "station.db";
const TOKEN_FILE_BYTES_MAX = 1024;
/** How often the listener's lastSeen times are copied into the pool (memory only). */
const LAST_SEEN_SYNC_MS = 1_000;

export const USAGE = `usage: ipsan station --data DIR [--http HOST:PORT] [--discovery HOST:PORT]
                     [--snmp HOST:PORT] [--snmp-community NAME] [--host-failover-after DURATION]
                     [--pending-deadline-ms MS] [--reconcile-interval-ms MS] [--host-offline-after-ms MS]
                     [--replace-after DURATION] [--stats-interval DURATION] [--tls-cert FILE --tls-key FILE]
                     [--console-dir DIR] [--etcd ENDPOINTS [--advertise-url URL] [--leader-lease DURATION]]
       ipsan station backup|restore|rotate-cluster-key|migrate ...

  --data DIR             station state: admin.token, cluster.key, host-keys.secret, station.db, audit.log (created on first start)
  --http HOST:PORT       REST API (default ${DEFAULT_HTTP}; port 0 picks a free port)
  --discovery HOST:PORT  UDP auto-configuration protocol (default ${DEFAULT_DISCOVERY}); units enrol with
                         DATA/cluster.key, which "ipsan station rotate-cluster-key --data DIR" replaces
${HOST_FAILOVER_AFTER_USAGE}
  --snmp HOST:PORT       also listen for SNMPv2c traps (off by default)
  --snmp-community NAME  SNMP community accepted (default "public")
  --replace-after DURATION
                         a mirror leg whose unit has been away this long is replaced on a spare
                         (else any unit with room); e.g. 30s, 5m (default ${formatDuration(REPLACE_AFTER_DEFAULT_MS)})
  --stats-interval DURATION
                         how often each online unit's I/O counters are read for the statistics
                         (GET /api/v1/stats/...; default ${formatDuration(STATS_POLL_INTERVAL_MS_DEFAULT)}); 120 points are kept per unit and volume
  --tls-cert FILE        serve the API over HTTPS with this certificate (PEM, chain first); needs --tls-key
  --tls-key FILE         the certificate's private key (PEM)
  --console-dir DIR      serve the web console from DIR (index.html, assets/) at / without a token
                         (default: dist/console of this installation, built by npm run build:console)
  --etcd ENDPOINTS       several stations: keep the state in this etcd cluster (comma-separated client
                         URLs, as etcdctl --endpoints); one station leads, the others forward to it
                         (docs/OPERATIONS.md "Several stations"); DATA/station.db is then a local copy
  --advertise-url URL    with --etcd: this station's API URL as the others reach it (default: the --http address;
                         https:// with --tls-cert: followers verify the leader against the system CAs and their own --tls-cert file)
  --leader-lease DURATION
                         with --etcd: the leader's etcd lease, whole seconds (default ${LEADER_LEASE_MS_DEFAULT / 1000}s):
                         a dead leader is replaced within about this long

subcommands (each reads the data directory itself):
  backup DEST --data DIR              a consistent copy of the station's state into the new directory DEST,
                                      while the station runs (SQLite online backup; ADR 0016)
  restore BACKUP --data DIR [--force] check a backup and write it into an empty DIR (--force: replace)
  rotate-cluster-key --data DIR       a new cluster key for units that have not enrolled yet
  migrate --from-sqlite DIR --etcd ENDPOINTS
                                      a single station's state into an empty etcd (then run several stations on it)
  migrate --from-etcd ENDPOINTS --to-sqlite DIR [--force]
                                      the stations' state from etcd back into a single station's data directory
`;

/** Reads --tls-cert and --tls-key (both or neither); a PEM file is at most 1 MiB. */
async function readTls(certPath: string | undefined, keyPath: string | undefined): Promise<{ cert: Buffer; key: Buffer } | undefined> {
  if (certPath === undefined && keyPath === undefined) return undefined;
  if (certPath === undefined || keyPath === undefined) throw new UsageError("--tls-cert and --tls-key go together");
  const read = async (path: string, flag: string): Promise<Buffer> => {
    let bytes: Buffer;
    try {
      bytes = await fs.readFile(path);
    } catch (error) {
      throw new UsageError(`${flag}: cannot read "${path}": ${errorMessage(error)}`);
    }
    if (bytes.length > 1024 * 1024 || !bytes.includes("-----BEGIN ")) throw new UsageError(`${flag}: "${path}" is not a PEM file`);
    return bytes;
  };
  return { cert: await read(certPath, "--tls-cert"), key: await read(keyPath, "--tls-key") };
}

/** Loads DATA/admin.token, creating it (0600, 32 random bytes hex) atomically on first start. */
export async function loadOrCreateAdminToken(path: string): Promise<string> {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const text = (await fs.readFile(path)).subarray(0, TOKEN_FILE_BYTES_MAX).toString("utf8").trim();
      if (!/^\S{16,512}$/.test(text)) throw new IpsanError("INVALID_ARGUMENT", `admin token ${path}: expected one token of 16..512 characters`);
      return text;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    }
    await createSecretFileIfMissing(path);
  }
  throw new IpsanError("IO_ERROR", `admin token ${path}: cannot create it`);
}

function positiveMs(value: string | undefined, flag: string, fallback: number): number {
  if (value === undefined) return fallback;
  const ms = Number(value);
  if (!/^[0-9]{1,9}$/.test(value) || ms < 1) throw new UsageError(`${flag}: invalid duration "${value}" (milliseconds, 1..999999999)`);
  return ms;
}

function urlHost(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

export async function stationMain(argv: readonly string[]): Promise<number> {
  // ipsan station rotate-cluster-key --data DIR (issue 7): src/station/rotate_cluster_key.ts
  if (argv[0] === "rotate-cluster-key") return (await import("./rotate_cluster_key.ts")).rotateClusterKeyMain(argv.slice(1));
  // ipsan station backup DEST --data DIR / restore BACKUP --data DIR (issue 9, ADR 0016): src/station/backup.ts
  if (argv[0] === "backup") return (await import("./backup.ts")).backupMain(argv.slice(1));
  if (argv[0] === "restore") return (await import("./backup.ts")).restoreMain(argv.slice(1));
  // ipsan station migrate --from-sqlite DIR --etcd ENDPOINTS / --from-etcd ENDPOINTS --to-sqlite DIR (issue 11): src/station/cluster/migrate.ts
  if (argv[0] === "migrate") return (await import("./cluster/migrate.ts")).migrateMain(argv.slice(1));
  const { values, positionals } = parseFlags(
    argv,
    {
      data: { type: "string" },
      http: { type: "string" },
      discovery: { type: "string" },
      snmp: { type: "string" },
      "snmp-community": { type: "string" },
      "host-failover-after": { type: "string" },
      "pending-deadline-ms": { type: "string" },
      "reconcile-interval-ms": { type: "string" },
      "host-offline-after-ms": { type: "string" },
      "replace-after": { type: "string" },
      "stats-interval": { type: "string" },
      "tls-cert": { type: "string" },
      "tls-key": { type: "string" },
      "console-dir": { type: "string" },
      etcd: { type: "string" },
      "advertise-url": { type: "string" },
      "leader-lease": { type: "string" },
      help: { type: "boolean" },
    },
    true,
  );
  if (values.help === true) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"\n${USAGE}`);
  if (values.data === undefined) throw new UsageError(`--data DIR is required\n${USAGE}`);
  const http = parseHostPort(values.http ?? DEFAULT_HTTP, "--http");
  const discovery = parseHostPort(values.discovery ?? DEFAULT_DISCOVERY, "--discovery");
  const snmp = values.snmp === undefined ? null : parseHostPort(values.snmp, "--snmp");
  const community = values["snmp-community"] ?? "public";
  if (!/^[\x21-\x7e]{1,64}$/.test(community)) throw new UsageError(`--snmp-community: invalid community "${community}"`);
  const options = {
    hostFailoverAfterMs: hostFailoverAfterFlag(values["host-failover-after"]),
    pendingDeadlineMs: positiveMs(values["pending-deadline-ms"], "--pending-deadline-ms", DEFAULT_STATION_OPTIONS.pendingDeadlineMs),
    reconcileIntervalMs: positiveMs(values["reconcile-interval-ms"], "--reconcile-interval-ms", DEFAULT_STATION_OPTIONS.reconcileIntervalMs),
    hostOfflineAfterMs: positiveMs(values["host-offline-after-ms"], "--host-offline-after-ms", DEFAULT_STATION_OPTIONS.hostOfflineAfterMs),
  };

  const replaceAfterMs = values["replace-after"] === undefined ? REPLACE_AFTER_DEFAULT_MS : parseDuration(values["replace-after"], "--replace-after");
  const statsIntervalMs = values["stats-interval"] === undefined ? STATS_POLL_INTERVAL_MS_DEFAULT : parseDuration(values["stats-interval"], "--stats-interval");

  const tls = await readTls(values["tls-cert"], values["tls-key"]);
  const dataDir = resolve(values.data);
  await fs.mkdir(dataDir, { recursive: true, mode: 0o700 });
  // Several stations (issue 11): the state is in etcd; the secrets too, the first station's.
  const etcd = values.etcd === undefined ? null : new EtcdState(parseEndpoints(values.etcd));
  if (etcd === null && (values["advertise-url"] !== undefined || values["leader-lease"] !== undefined)) {
    throw new UsageError("--advertise-url and --leader-lease go with --etcd (several stations)");
  }
  const advertise = values["advertise-url"]?.replace(/\/$/, "");
  if (advertise !== undefined && !/^https?:\/\/[^/\s]+$/.test(advertise)) throw new UsageError(`--advertise-url: "${advertise}" is not http://HOST:PORT or https://HOST:PORT`);
  if (advertise !== undefined && advertise.startsWith("https:") !== (tls !== undefined)) {
    throw new UsageError(`--advertise-url: ${advertise.startsWith("https:") ? "https:// needs --tls-cert" : "with --tls-cert the station serves https://"}`);
  }
  const leaderLease = values["leader-lease"] === undefined ? LEADER_LEASE_MS_DEFAULT : parseDuration(values["leader-lease"], "--leader-lease");
  if (leaderLease < LEADER_LEASE_MS_MIN || leaderLease > LEADER_LEASE_MS_MAX || leaderLease % 1000 !== 0) {
    throw new UsageError(`--leader-lease: whole seconds from ${LEADER_LEASE_MS_MIN / 1000}s to ${LEADER_LEASE_MS_MAX / 1000}s (etcd leases count seconds)`);
  }
  if (etcd !== null) {
    try {
      await shareSecrets(etcd, dataDir);
    } catch (error) {
      etcd.close();
      throw new IpsanError("UNAVAILABLE", `--etcd ${values.etcd}: cannot read or store the cluster's secrets: ${errorMessage(error)}`, { cause: error });
    }
  }
  const adminToken = await loadOrCreateAdminToken(join(dataDir, ADMIN_TOKEN_FILE_NAME));
  const clusterKey = await loadOrCreateClusterKey(join(dataDir, CLUSTER_KEY_FILE_NAME));
  const hostKeySecret = await loadOrCreateHostKeySecret(join(dataDir, HOST_KEYS_SECRET_FILE_NAME));
  const databasePath = join(dataDir, DATABASE_FILE_NAME);
  const proper: ProperOptions = {
    dataDir,
    adminToken,
    clusterKey,
    hostKeySecret,
    discovery,
    snmp,
    community,
    options,
    replaceAfterMs,
    statsIntervalMs,
    tls,
    consoleDir: values["console-dir"] === undefined ? undefined : resolve(values["console-dir"]),
  };
  if (etcd !== null) return runCluster(proper, etcd, http, databasePath, values["advertise-url"], leaderLease);

  const db = openDatabase(databasePath, { checkpointInWorker: true });
  const checkpointer = startCheckpointer(databasePath, (message) => log.limited("checkpoint", "WAL checkpoint failed", { error: message }));
  let running: StationProper;
  try {
    running = await startProper(db, proper, { http });
  } catch (error) {
    await checkpointer.stop();
    db.close();
    throw error;
  }
  await untilSignal();
  await running.close();
  await checkpointer.stop();
  db.close();
  log.info("stopped");
  return 0;
}

/** Resolves at SIGINT or SIGTERM. */
function untilSignal(): Promise<void> {
  return new Promise<void>((resolveStop) => {
    const stop = (signal: string): void => {
      log.info("stopping", { signal });
      process.off("SIGINT", onInt);
      process.off("SIGTERM", onTerm);
      resolveStop();
    };
    const onInt = (): void => stop("SIGINT");
    const onTerm = (): void => stop("SIGTERM");
    process.on("SIGINT", onInt);
    process.on("SIGTERM", onTerm);
  });
}

/** What the station proper needs besides its database. */
interface ProperOptions {
  readonly dataDir: string;
  readonly adminToken: string;
  readonly clusterKey: Awaited<ReturnType<typeof loadOrCreateClusterKey>>;
  readonly hostKeySecret: Awaited<ReturnType<typeof loadOrCreateHostKeySecret>>;
  readonly discovery: { host: string; port: number };
  readonly snmp: { host: string; port: number } | null;
  readonly community: string;
  readonly options: { hostFailoverAfterMs: number; pendingDeadlineMs: number; reconcileIntervalMs: number; hostOfflineAfterMs: number };
  readonly replaceAfterMs: number;
  readonly statsIntervalMs: number;
  readonly tls: { cert: Buffer; key: Buffer } | undefined;
  readonly consoleDir: string | undefined;
}

/** The station proper, running. */
interface StationProper {
  readonly api: ApiServer;
  /** Where the API listens (a single station; several stations: their front server). */
  readonly httpAddress: { address: string; port: number } | null;
  close(): Promise<void>;
}

/**
 * Starts the station proper on `db`: store, tokens, audit log, unit identities,
 * the discovery (and SNMP) listener, reconcile, tasks, statistics, leg
 * replacement and the API, listening on `listen.http` or (several stations)
 * answering through the cluster's front server. Prints the discovery line.
 */
async function startProper(
  db: Db,
  o: ProperOptions,
  listen: { http: { host: string; port: number } } | { cluster: NonNullable<ApiServerOptions["cluster"]> },
): Promise<StationProper> {
  const store = new StationStore(db);
  const tokens = new TokenStore(db, o.adminToken);
  const audit = await AuditLog.open(join(o.dataDir, AUDIT_FILE_NAME));
  const metrics = new StationMetrics();
  // Unit identities (issue 7): enrolled units' ids and own secrets, in the database (migration 8).
  const identities = new UnitIdentities({ persistence: identityPersistence(store.database) });
  const listener = new DiscoveryListener({ clusterKey: o.clusterKey, identities });
  const station = new Station(store, metrics, { clusterKey: o.clusterKey, hostKeySecret: o.hostKeySecret, ...o.options, unitIdentities: { identities, rotate: (unit) => listener.rotateSecret(unit) } });
  listener.subscribe((event) => {
    switch (event.kind) {
      case "unit_identity":
        store.recordUnitEvent(IDENTITY_EVENT_ACTIONS[event.action], event.unit, {
          from: `${event.from.host}:${event.from.port}`,
          unitId: event.unitId,
          detail: event.detail,
        });
        return;
      case "unit_storage_info":
        station
          .applyStorageInfo(event.info, event.from.host, listener.unit(event.unit)?.state ?? "online")
          .catch((error: unknown) => log.error("cannot store a unit's storage info", { unit: event.unit, error: errorMessage(error) }));
        return;
      case "unit_state":
        station.setUnitState(event.unit, event.state);
        return;
      case "unit_startup":
        station.unitStarted(event.unit);
        return;
      case "packet_rejected":
        return; // a state event follows a startup; rejections are counted by the listener
    }
  });
  let snmpListener: SnmpHandle | null = null;
  // Tasks (migration 10): those a restart interrupted are finished as failed here, saying what reconcile does.
  const tasks = new StationTasks(station, { wipeChunkBytes: wipeChunkBytesFrom(process.env) });
  const stats = new StationStats(stationStatsSource(station), { clock: realClock, pollIntervalMs: o.statsIntervalMs });
  const api = new ApiServer({
    station,
    tokens,
    audit,
    tasks,
    ...(o.tls === undefined ? {} : { tls: o.tls }),
    ...(o.consoleDir === undefined ? {} : { consoleDir: o.consoleDir }),
    ...("cluster" in listen ? { cluster: listen.cluster } : {}),
    stats,
    extraMetrics: () =>
      listener.metricsText() +
      (snmpListener?.metricsText() ?? "") +
      renderCounter("ipsan_station_stats_polls_total", "Reads of units' I/O counters, by result", [[{ result: "ok" }, stats.polls.ok], [{ result: "failed" }, stats.polls.failed]]) +
      renderGauge("ipsan_station_stats_series_bytes", "Memory held by the I/O and capacity series", [[{}, stats.seriesBytes()]]),
  });

  let httpAddress: { address: string; port: number } | null = null;
  let udpAddress;
  try {
    if ("http" in listen) httpAddress = await api.listen(listen.http.host, listen.http.port);
    else await api.ready();
    udpAddress = await listener.listen(o.discovery);
    snmpListener = o.snmp === null ? null : await startSnmp(listener, o.clusterKey, o.community, o.snmp);
  } catch (error) {
    await api.close().catch(() => undefined);
    await listener.close().catch(() => undefined);
    await snmpListener?.close().catch(() => undefined);
    await audit.close();
    throw new IpsanError("UNAVAILABLE", `cannot listen: ${errorMessage(error)}`, { cause: error });
  }
  station.start();
  stats.start();
  const replacer = new LegReplacer(station, { replaceAfterMs: o.replaceAfterMs });
  replacer.start();
  const lastSeenTimer = setInterval(() => {
    for (const unit of listener.units()) store.setUnitLastSeen(unit.name, unit.lastSeenMs);
  }, LAST_SEEN_SYNC_MS);
  lastSeenTimer.unref();

  if (httpAddress !== null) process.stdout.write(`ipsan station ready ${o.tls === undefined ? "http" : "https"}://${urlHost(httpAddress.address)}:${httpAddress.port}\n`);
  process.stdout.write(`ipsan station discovery udp://${urlHost(udpAddress.host)}:${udpAddress.port}\n`);
  if (snmpListener !== null) process.stdout.write(`ipsan station snmp udp://${urlHost(snmpListener.address.host)}:${snmpListener.address.port}\n`);
  log.info("station ready", {
    data: o.dataDir,
    ...(httpAddress === null ? {} : { http: `${httpAddress.address}:${httpAddress.port}` }),
    units: store.units.size,
    volumes: store.volumeCount,
    assignments: store.live.size,
  });
  return {
    api,
    httpAddress,
    async close() {
      clearInterval(lastSeenTimer);
      await api.close();
      await listener.close();
      await snmpListener?.close();
      await replacer.stop();
      await stats.stop();
      await station.stop();
      await audit.close();
    },
  };
}

/**
 * Several stations on etcd (issue 11, ADR 0017): the shared secrets come from
 * etcd, the front server answers on --http at once, and the station proper
 * runs only while this station leads (src/station/cluster/node.ts).
 */
async function runCluster(
  o: ProperOptions,
  etcd: EtcdState,
  http: { host: string; port: number },
  databasePath: string,
  advertiseUrl: string | undefined,
  leaseMs: number,
): Promise<number> {
  const forwardSecret = await etcd.sharedSecret("forward.secret", () => Buffer.from(randomBytes(32).toString("hex")));
  let node: ClusterNode | null = null;
  const front = new FrontServer({
    tls: o.tls,
    forwardSecret,
    leaderHandler: () => node?.handler() ?? null,
    status: () => ({ leaderUrl: node?.leader?.url ?? null, problem: node?.lastProblem ?? null, role: node?.role ?? "starting" }),
    ownUrl: () => url,
  });
  if (advertiseUrl === undefined && (http.host === "0.0.0.0" || http.host === "::")) {
    etcd.close();
    throw new UsageError(`--http ${http.host}:${http.port} listens on every address: give --advertise-url URL, the address other stations and clients reach this one at (e.g. http://192.0.2.10:${http.port || 8640})`);
  }
  let url = "";
  let address;
  try {
    address = await front.listen(http.host, http.port);
  } catch (error) {
    etcd.close();
    throw new IpsanError("UNAVAILABLE", `cannot listen: ${errorMessage(error)}`, { cause: error });
  }
  url = advertiseUrl ?? `${o.tls === undefined ? "http" : "https"}://${urlHost(address.address)}:${address.port}`;
  node = new ClusterNode({
    etcd,
    dbPath: databasePath,
    url,
    leaseMs,
    startServices: async (db, durable) => {
      const running = await startProper(db, o, {
        cluster: { durable, forwardSecret, health: () => ({ leader: node?.leading === true, leaderUrl: node?.leader?.url ?? null }) },
      });
      return { handle: (req, res) => running.api.handle(req, res), close: () => running.close() };
    },
  });
  try {
    await node.start();
  } catch (error) {
    await front.close();
    etcd.close();
    throw error;
  }
  process.stdout.write(`ipsan station ready ${url}\n`);
  log.info("station in a cluster", { url, etcd: etcd.endpoints.join(","), id: node.id });
  await untilSignal();
  await node.stop();
  await front.close();
  etcd.close();
  log.info("stopped");
  return 0;
}

/**
 * Several stations share one admin token, cluster key and host key secret:
 * etcd's copy wins; the first station stores its own (created as usual if
 * missing). The files in DATA are then written from etcd's copy.
 */
async function shareSecrets(etcd: EtcdState, dataDir: string): Promise<void> {
  const files: [string, (path: string) => Promise<unknown>][] = [
    [ADMIN_TOKEN_FILE_NAME, loadOrCreateAdminToken],
    [CLUSTER_KEY_FILE_NAME, loadOrCreateClusterKey],
    [HOST_KEYS_SECRET_FILE_NAME, loadOrCreateHostKeySecret],
  ];
  for (const [name, create] of files) {
    const path = join(dataDir, name);
    const existed = await fs.stat(path).then(() => true, () => false);
    const stored = existed ? null : await etcd.secret(name);
    if (stored !== null) await writeSecretFile(path, stored);
    await create(path);
    const local = await fs.readFile(path);
    const shared = await etcd.sharedSecret(name, () => local);
    if (!shared.equals(local)) {
      log.warn("replacing a local secret with the cluster's (etcd's) copy", { file: path });
      await writeSecretFile(path, shared);
    }
  }
}

async function writeSecretFile(path: string, bytes: Buffer): Promise<void> {
  await fs.writeFile(`${path}.tmp`, bytes, { mode: 0o600 });
  await fs.rename(`${path}.tmp`, path);
}

/** Station event actions (type "unit") for the discovery listener's identity events. */
const IDENTITY_EVENT_ACTIONS = {
  enrolled: "unit-enrolling",
  confirmed: "unit-enrolled",
  rotated: "unit-secret-rotated",
  impostor: "unit-impostor",
  key_refused: "unit-key-refused",
} as const;

interface SnmpHandle {
  readonly address: { host: string; port: number };
  metricsText(): string;
  close(): Promise<void>;
}

/** SNMP trap listener (src/discovery/snmp.ts), wired to the discovery listener by attachSnmp. */
async function startSnmp(
  listener: DiscoveryListener,
  clusterKey: Buffer,
  community: string,
  address: { host: string; port: number },
): Promise<SnmpHandle> {
  const snmp = new SnmpTrapListener({ community });
  const bound = await snmp.listen(address);
  const detach = attachSnmp({ snmp, discovery: listener, clusterKey });
  return {
    address: bound,
    metricsText: () => snmp.metricsText(),
    async close() {
      detach();
      await snmp.close();
    },
  };
}
