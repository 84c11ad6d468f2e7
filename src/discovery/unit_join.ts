// The glue between `ipsan unit` (src/unit/main.ts) and the discovery agent:
// the --discovery (old spelling --station HOST:PORT) / --cluster-key-file / --dns-name flags, their checks, the
// control tokens the unit accepts from the station (its credentials: the
// cluster key's before enrolment, its own secret's after), the storage-info
// callback built from the unit's table snapshot, and change detection.
// main.ts calls these from one delimited block so the unit's own code stays
// the unit helper's.

import { isIP } from "node:net";
import { join as joinPath } from "node:path";
import { UsageError } from "../util/errors.ts";
import { parseHostPort, type FlagSpec } from "../util/flags.ts";
import { logger } from "../util/log.ts";
import { loadClusterKey, type ClusterKey } from "./keys.ts";
import { FREE_EXTENTS_MAX, ZONE_PATTERN, type HostPort, type LbaExtent, type NbdTlsMode, type StorageInfo, type VolumeInfo } from "./messages.ts";
import { DISCOVERY_ADDRESSES_MAX, StationAgent } from "./unit_agent.ts";
import { UNIT_SECRET_FILE_NAME, UnitCredentials, loadUnitSecret, saveUnitSecret } from "./unit_identity.ts";

/** Flags to add to `ipsan unit`'s parseFlags options. */
export const JOIN_FLAGS = {
  discovery: { type: "string" },
  /** The old spelling of --discovery (docs/cli.md): HOST:PORT only; a URL is refused naming --discovery. */
  station: { type: "string" },
  "cluster-key-file": { type: "string" },
  "dns-name": { type: "string" },
  spare: { type: "boolean" },
  zone: { type: "string" },
} as const satisfies FlagSpec;

export const JOIN_USAGE = "[--discovery HOST:PORT[,HOST:PORT...] --cluster-key-file FILE [--dns-name NAME] [--spare] [--zone NAME]]";

/** The station's discovery port when it runs with its defaults (src/station/main.ts DEFAULT_DISCOVERY). */
const DISCOVERY_PORT_HINT = "the station prints it at start: \"ipsan station discovery udp://HOST:PORT\"; 8641 by default";

/** How often the unit looks at its table generation to push changes. */
export const CHANGE_POLL_MS = 100;

const DNS_NAME_PATTERN = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

export interface JoinConfig {
  /** Every station's discovery address (several stations, one leading: issue 11); at least one. */
  readonly stations: readonly HostPort[];
  readonly clusterKeyFile: string;
  readonly dnsName: string | null;
  /** --spare: the station keeps this unit for replacement legs only. */
  readonly spare: boolean;
  /** --zone NAME: the unit's failure domain (legs of a mirror go to distinct zones first). */
  readonly zone: string | null;
}

/**
 * The station's UDP discovery address to join: --discovery HOST:PORT, or the
 * old spelling --station HOST:PORT (a one-line deprecation note on stderr).
 * --station with a URL is the station's HTTP API, which a unit cannot join
 * through: refused at once, naming --discovery (issue 9 item 2).
 */
export function discoveryAddress(values: { discovery?: string; station?: string }, warn: (line: string) => void = (line) => process.stderr.write(`${line}\n`)): string | undefined {
  if (values.discovery !== undefined && values.station !== undefined) {
    throw new UsageError("--station HOST:PORT is the old spelling of --discovery HOST:PORT: give one of them");
  }
  if (values.discovery !== undefined) {
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(values.discovery)) {
      throw new UsageError(`--discovery: "${values.discovery}" is a URL; a unit joins through the station's UDP discovery address, HOST:PORT (${DISCOVERY_PORT_HINT})`);
    }
    return values.discovery;
  }
  if (values.station === undefined) return undefined;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(values.station)) {
    throw new UsageError(
      `--station: "${values.station}" is a URL (the station's HTTP API, what --station means on the host and admin commands); ` +
        `a unit joins through the station's UDP discovery address: --discovery HOST:PORT (${DISCOVERY_PORT_HINT})`,
    );
  }
  warn(`ipsan unit: --station HOST:PORT is deprecated; use --discovery ${values.station} (--station now means the station's HTTP API URL, docs/cli.md)`);
  return values.station;
}

/** Checks the join flags; undefined when neither --discovery nor its old spelling --station is given. */
export function parseJoinFlags(values: {
  discovery?: string;
  station?: string;
  "cluster-key-file"?: string;
  "dns-name"?: string;
  spare?: boolean;
  zone?: string;
}, warn?: (line: string) => void): JoinConfig | undefined {
  const address = discoveryAddress(values, warn);
  if (address === undefined) {
    if (values.spare !== undefined) throw new UsageError("--spare: only meaningful with --discovery HOST:PORT (a spare is kept by a station)");
    if (values.zone !== undefined) throw new UsageError("--zone: only meaningful with --discovery HOST:PORT");
    if (values["cluster-key-file"] !== undefined) throw new UsageError("--cluster-key-file: only meaningful with --discovery HOST:PORT");
    if (values["dns-name"] !== undefined) throw new UsageError("--dns-name: only meaningful with --discovery HOST:PORT");
    return undefined;
  }
  const flag = values.discovery !== undefined ? "--discovery" : "--station";
  const stations = parseDiscoveryAddresses(address, flag);
  const clusterKeyFile = values["cluster-key-file"];
  if (clusterKeyFile === undefined || clusterKeyFile === "") {
    throw new UsageError(
      "--cluster-key-file FILE is required with --discovery (the station keeps the cluster key in STATION_DATA/cluster.key; copy it to the unit)",
    );
  }
  const dnsName = values["dns-name"] ?? null;
  if (dnsName !== null && !DNS_NAME_PATTERN.test(dnsName)) throw new UsageError(`--dns-name: invalid DNS name "${dnsName}"`);
  const zone = values.zone ?? null;
  if (zone !== null && !ZONE_PATTERN.test(zone)) {
    throw new UsageError(`--zone: invalid zone "${zone}" (1..63 letters, digits, '.', '_' or '-', starting with a letter or digit)`);
  }
  return { stations, clusterKeyFile, dnsName, spare: values.spare === true, zone };
}

/**
 * HOST:PORT[,HOST:PORT...]: every station's discovery address, at most
 * DISCOVERY_ADDRESSES_MAX, each checked as one address is (no URL, no port
 * 0), no address twice, and IP literals of one family (the unit speaks from
 * one socket).
 */
export function parseDiscoveryAddresses(text: string, flag: string): HostPort[] {
  const parts = text.split(",").map((part) => part.trim());
  if (parts.length > DISCOVERY_ADDRESSES_MAX) {
    throw new UsageError(`${flag}: ${parts.length} addresses, more than ${DISCOVERY_ADDRESSES_MAX} (give each station's discovery address once)`);
  }
  const stations: HostPort[] = [];
  const seen = new Set<string>();
  for (const part of parts) {
    if (part === "") throw new UsageError(`${flag}: empty address in "${text}" (expected HOST:PORT[,HOST:PORT...])`);
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(part)) {
      throw new UsageError(`${flag}: "${part}" is a URL; a unit joins through each station's UDP discovery address, HOST:PORT (${DISCOVERY_PORT_HINT})`);
    }
    const station = parseHostPort(part, flag);
    if (station.port === 0) throw new UsageError(`${flag}: port 0 in "${part}" (give the port the station printed)`);
    const key = `${station.host.toLowerCase()}:${station.port}`;
    if (seen.has(key)) throw new UsageError(`${flag}: "${part}" is given twice`);
    seen.add(key);
    stations.push(station);
  }
  const families = new Set(stations.map((s) => isIP(s.host)).filter((family) => family !== 0));
  if (families.size > 1) throw new UsageError(`${flag}: "${text}" mixes IPv4 and IPv6 addresses; give the stations' addresses in one family`);
  return stations;
}

/** Loads the cluster key named by --cluster-key-file (errors name the flag and the file). */
export async function loadJoinKey(join: JoinConfig): Promise<ClusterKey> {
  try {
    return await loadClusterKey(join.clusterKeyFile);
  } catch (error) {
    throw new UsageError(
      `--cluster-key-file: ${(error as Error).message} (the station keeps the cluster key in STATION_DATA/cluster.key)`,
    );
  }
}

/**
 * The extra control tokens the unit accepts when joined: the station's.
 * Until startJoin has read DATA/unit.secret, none; then the one derived from
 * the unit's own secret once enrolled, or from the cluster key before
 * (UnitCredentials.controlTokens).
 */
export interface JoinTokens {
  readonly tokens: () => readonly string[];
  credentials: UnitCredentials | undefined;
}

export function joinTokens(): JoinTokens {
  const source: JoinTokens = { tokens: () => source.credentials?.controlTokens() ?? [], credentials: undefined };
  return source;
}


/** What the unit's table snapshot looks like (src/unit/volumes.ts StorageInfoSnapshot). */
export interface TableSnapshot {
  readonly sectorSize: number;
  readonly capacityBytes: number;
  readonly freeBytes: number;
  readonly freeExtents: readonly LbaExtent[];
  readonly volumes: readonly VolumeInfo[];
  readonly generation: number;
}

export interface JoinedUnit {
  readonly name: string;
  readonly nbd: { host: string; port: number } | { path: string };
  readonly control: HostPort | undefined;
  readonly manager: { snapshot(): TableSnapshot; readonly generation: number; readonly unitId: string };
  /** DATA: holds unit.secret once the station has enrolled the unit. */
  readonly dataDir: string;
  /** Filled with the unit's credentials, for the control API's tokens. */
  readonly tokens?: JoinTokens;
  /** The NBD server's TLS mode, in every storage info (the station grants by host identity unless it is "off"). */
  readonly tls?: NbdTlsMode;
}

export interface RunningJoin {
  readonly agent: StationAgent;
  /** Sends SHUTDOWN and waits (bounded) for the station's ACK. */
  stop(): Promise<void>;
}

/**
 * A fragmented unit can have more free extents than one report may carry
 * (FREE_EXTENTS_MAX); the station plans with freeBytes and the largest runs,
 * so report the largest ones, in LBA order. freeBytes stays exact.
 */
export function largestFreeExtents(extents: readonly LbaExtent[]): readonly LbaExtent[] {
  if (extents.length <= FREE_EXTENTS_MAX) return extents;
  return [...extents]
    .sort((a, b) => b.lengthLba - a.lengthLba)
    .slice(0, FREE_EXTENTS_MAX)
    .sort((a, b) => a.startLba - b.startLba);
}

/** Starts the agent for a serving unit; pushes storage info whenever the table generation changes. */
export async function startJoin(join: JoinConfig, key: ClusterKey, unit: JoinedUnit): Promise<RunningJoin> {
  const log = logger("unit");
  const nbd = unit.nbd;
  if ("path" in nbd) throw new UsageError("--discovery: the unit must --listen on HOST:PORT (not a Unix socket) for hosts to reach it");
  const storageInfo = (): StorageInfo => {
    const snapshot = unit.manager.snapshot();
    return {
      name: unit.name,
      dnsName: join.dnsName,
      nbd: { host: nbd.host, port: nbd.port },
      control: unit.control ?? null,
      sectorSize: snapshot.sectorSize,
      capacityBytes: snapshot.capacityBytes,
      freeBytes: snapshot.freeBytes,
      freeExtents: largestFreeExtents(snapshot.freeExtents),
      // The fields of the storage-info packet only: identity grants (`access`) stay on the unit's control API.
      volumes: snapshot.volumes.map((v) => ({ name: v.name, number: v.number, sizeBytes: v.sizeBytes, extents: v.extents, partitions: v.partitions, grants: v.grants })),
      spare: join.spare,
      zone: join.zone,
      tableGeneration: snapshot.generation,
      ...(unit.tls === undefined ? {} : { tls: unit.tls }),
    };
  };
  const secretPath = joinPath(unit.dataDir, UNIT_SECRET_FILE_NAME);
  const stored = await loadUnitSecret(secretPath);
  if (stored !== null && !UnitCredentials.matches(stored, unit.name, unit.manager.unitId)) {
    log.warn("unit.secret belongs to another unit name or identity; enrolling afresh", {
      unit: unit.name,
      unitId: unit.manager.unitId,
      file: secretPath,
      fileUnit: stored.unit,
      fileUnitId: stored.unitId,
    });
  }
  const credentials = new UnitCredentials({
    unitName: unit.name,
    unitId: unit.manager.unitId,
    clusterKey: key,
    stored,
    save: (secret) => saveUnitSecret(secretPath, secret),
  });
  if (unit.tokens !== undefined) unit.tokens.credentials = credentials;
  const agent = new StationAgent({ unitName: unit.name, station: join.stations, clusterKey: key, storageInfo, credentials });
  let lastRefusal = "";
  agent.subscribe((event) => {
    if (event.kind !== "refused" || event.message === lastRefusal) return;
    lastRefusal = event.message;
    // Printed once per distinct reason: what the operator must read.
    process.stderr.write(`ipsan unit ${unit.name}: station refused: ${event.message}\n`);
  });
  await agent.start();
  let generation = unit.manager.generation;
  const poll = setInterval(() => {
    const now = unit.manager.generation;
    if (now === generation) return;
    generation = now;
    agent.notifyChanged();
  }, CHANGE_POLL_MS);
  poll.unref();
  log.info("joining station", {
    unit: unit.name,
    unitId: unit.manager.unitId,
    enrolled: credentials.enrolled,
    station: join.stations.map((s) => `${s.host}:${s.port}`).join(","),
  });
  return {
    agent,
    async stop() {
      clearInterval(poll);
      const acked = await agent.stop();
      log.info(acked ? "station acknowledged shutdown" : "station did not acknowledge shutdown", { unit: unit.name });
    },
  };
}
