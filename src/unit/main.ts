// `ipsan unit`: runs a SAN unit (storage, volume table, NBD server, control
// API), or with `ipsan unit volume ...` administers a stopped unit's volumes
// (admin.ts), or with `ipsan unit format ...` formats its storage
// (format.ts). The stable CLI contract is in issue 2 and docs/unit.md.

import { readFileSync, statSync, statfsSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { NbdServer, type NbdListenAddress } from "../nbd/server.ts";
import { IpsanError, UsageError, errorMessage } from "../util/errors.ts";
import { parseFlags, parseHostPort } from "../util/flags.ts";
import { logger } from "../util/log.ts";
import { createSecretFileIfMissing } from "../util/secret_file.ts";
import { formatSize, parseSize } from "../util/size.ts";
import { type Cidr, loopbackCidrs, parseCidr } from "./cidr.ts";
import { ControlServer } from "./control.ts";
import { VOLUME_NAME_PATTERN } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import { VolumeManager, type VolumeView } from "./volumes.ts";
import type { IscsiMetrics } from "./io_report.ts";
import type { IscsiTarget } from "../iscsi/target.ts";
import type { RequiredDigests } from "../iscsi/text.ts";
import { type NbdServerTls, PSK_IDENTITY_PATTERN, TLS_MODES, type TlsMode, parsePskFile } from "../nbd/tls.ts";
// discovery (--discovery): flags, cluster key, derived control token, agent — see src/discovery/unit_join.ts
import { JOIN_FLAGS, JOIN_USAGE, joinTokens, loadJoinKey, parseJoinFlags, startJoin, type JoinConfig } from "../discovery/unit_join.ts";

const log = logger("unit");

export const CONTROL_TOKEN_FILE_NAME = "control.token";
/**
 * --tls when joined to a station and not given: the station hands hosts their
 * keys and the unit grants by host identity (ADR 0012). --insecure-plaintext
 * makes it "off" (the station then gives address grants).
 */
export const JOINED_TLS_DEFAULT: TlsMode = "require";
export const UNIT_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** How long a stopping unit waits for its cleanup before exiting anyway. */
export const SHUTDOWN_TIMEOUT_MS = 15_000;

export const USAGE = `usage: ipsan unit --data DIR --capacity SIZE --listen HOST:PORT [--name NAME] [--device PATH]
                  [--volume NAME:SIZE]... [--allow CIDR|id:NAME]... [--control-listen HOST:PORT] [--control-token-file FILE]
                  (with --discovery, the control API opens by itself on the --listen host and a free port)
                  [--metrics-token-file FILE] [--tls off|on|require] [--tls-psk FILE] [--insecure-plaintext]
                  [--iscsi HOST:PORT]   (also serve every volume and partition as an iSCSI target; port 0 = a free port)
                  [--iscsi-require-digest header|data|header,data]   (refuse iSCSI sessions without these CRC32C digests)
                  ${JOIN_USAGE}
       ipsan unit volume list|create|delete|grow|partition|grant ...   (see "ipsan unit volume help")
       ipsan unit format --data DIR [--device PATH] [--capacity SIZE] [--from-slot 0|1] [--force]   (see "ipsan unit format --help")

SIZE is bytes or a number with K, M, G or T (powers of 1024). --listen also takes unix:/PATH.
--discovery HOST:PORT is the station's UDP discovery address (old spelling: --station HOST:PORT);
--control-listen HOST:PORT is where this unit opens its control API (old spelling: --control HOST:PORT).
Every flag's one meaning across the CLI: docs/cli.md.
`;

export interface UnitConfig {
  readonly name: string;
  readonly dataDir: string;
  readonly capacityBytes: number | undefined;
  readonly devicePath: string | undefined;
  readonly listen: NbdListenAddress;
  /** --iscsi HOST:PORT: the iSCSI portal (docs/protocol/iscsi.md); absent: no iSCSI. */
  readonly iscsi?: { host: string; port: number } | undefined;
  /** --iscsi-require-digest: CRC32C digests every iSCSI session must use. */
  readonly iscsiRequiredDigests?: RequiredDigests | undefined;
  readonly volumes: readonly { name: string; sizeBytes: number }[];
  readonly allow: readonly Cidr[];
  /** --allow id:NAME: identities from --tls-psk served the volumes without grants. */
  readonly allowIdentities: readonly string[];
  /** --tls (default: require with --discovery, off standalone; off with --insecure-plaintext). */
  readonly tls: TlsMode;
  /** --insecure-plaintext: joined, and the operator chose plaintext (warned loudly at start). */
  readonly insecurePlaintext: boolean;
  /** --tls-psk FILE: identities and keys (psktool format) beyond those of identity grants. */
  readonly tlsPskFile: string | undefined;
  readonly control: { host: string; port: number } | undefined;
  readonly controlTokenFile: string | undefined;
  /** --metrics-token-file: a token that may read GET /metrics and GET /v1/stats only (a Prometheus scrape). */
  readonly metricsTokenFile?: string | undefined;
  /** More control tokens to accept (the station's derived token, when joined). */
  readonly extraTokens?: () => readonly string[];
  /** Joined to a station: volumes without grants are served to nobody. */
  readonly joined?: () => boolean;
  /** discovery (--discovery): where to join, with which cluster key file. */
  readonly join?: JoinConfig;
}

export interface RunningUnit {
  readonly config: UnitConfig;
  readonly manager: VolumeManager;
  readonly provider: UnitExportProvider;
  readonly nbd: NbdListenAddress;
  /** The bound iSCSI portal, when --iscsi was given. */
  readonly iscsi: { host: string; port: number } | undefined;
  readonly control: { host: string; port: number } | undefined;
  /** Stops accepting, finishes requests in flight, syncs, releases the storage. */
  stop(): Promise<void>;
}

/** --iscsi-require-digest: "header", "data" or both, comma-separated. */
export function parseRequiredDigests(text: string, iscsi: boolean): RequiredDigests {
  if (!iscsi) throw new UsageError("--iscsi-require-digest needs --iscsi HOST:PORT");
  const items = text.split(",").map((item) => item.trim());
  const unknown = items.filter((item) => item !== "header" && item !== "data");
  if (unknown.length > 0 || items.length === 0) throw new UsageError(`--iscsi-require-digest: invalid "${text}" (expected header, data or header,data)`);
  return { header: items.includes("header"), data: items.includes("data") };
}

function hostForUrl(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/** "HOST:PORT" with an IPv6 host bracketed (the iSCSI portal as printed and reported). */
function hostPortText(address: { host: string; port: number }): string {
  return `${hostForUrl(address.host)}:${address.port}`;
}

export function nbdUrl(address: NbdListenAddress): string {
  return "path" in address ? `nbd+unix:///?socket=${address.path}` : `nbd://${hostForUrl(address.host)}:${address.port}`;
}

export function parseListen(text: string): NbdListenAddress {
  if (text.startsWith("unix:")) {
    const path = text.slice(5);
    if (path === "" || path.length > 100) throw new UsageError(`--listen: invalid Unix socket path "${text}" (expected unix:/PATH, at most 100 characters)`);
    return { path };
  }
  return parseHostPort(text, "--listen");
}

export function parseVolumeFlag(text: string): { name: string; sizeBytes: number } {
  const colon = text.lastIndexOf(":");
  const name = colon < 0 ? "" : text.slice(0, colon);
  if (!VOLUME_NAME_PATTERN.test(name)) {
    throw new UsageError(`--volume: invalid "${text}" (expected NAME:SIZE with NAME matching [A-Za-z0-9][A-Za-z0-9_.-]{0,62})`);
  }
  const sizeBytes = parseSize(text.slice(colon + 1), "--volume");
  if (sizeBytes <= 0 || sizeBytes % 512 !== 0) throw new UsageError(`--volume: size in "${text}" must be a positive multiple of 512 bytes`);
  return { name, sizeBytes };
}

export function parseUnitArgs(argv: readonly string[]): UnitConfig {
  const { values, positionals } = parseFlags(
    argv,
    {
      data: { type: "string" },
      capacity: { type: "string" },
      listen: { type: "string" },
      name: { type: "string" },
      device: { type: "string" },
      volume: { type: "string", multiple: true },
      allow: { type: "string", multiple: true },
      tls: { type: "string" },
      "tls-psk": { type: "string" },
      "insecure-plaintext": { type: "boolean" },
      "control-listen": { type: "string" },
      /** The old spelling of --control-listen (docs/cli.md). */
      control: { type: "string" },
      "control-token-file": { type: "string" },
      "metrics-token-file": { type: "string" },
      iscsi: { type: "string" },
      "iscsi-require-digest": { type: "string" },
      ...JOIN_FLAGS, // discovery (--discovery)
      help: { type: "boolean", short: "h" },
    },
    true,
    { station: "old spelling of --discovery HOST:PORT", control: "old spelling of --control-listen HOST:PORT" },
  );
  if (values.help === true) throw new UsageError(USAGE.trimEnd());
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"\n${USAGE.trimEnd()}`);
  if (values.data === undefined || values.data === "") throw new UsageError(`--data DIR is required\n${USAGE.trimEnd()}`);
  if (values.listen === undefined) throw new UsageError(`--listen HOST:PORT is required\n${USAGE.trimEnd()}`);
  const capacityBytes = values.capacity === undefined ? undefined : parseSize(values.capacity, "--capacity");
  const name = values.name ?? hostname().split(".")[0] ?? "unit";
  if (!UNIT_NAME_PATTERN.test(name)) throw new UsageError(`--name: invalid unit name "${name}" (expected [A-Za-z0-9][A-Za-z0-9_.-]{0,62})`);
  const volumes = (values.volume ?? []).map(parseVolumeFlag);
  const seen = new Set<string>();
  for (const v of volumes) {
    if (seen.has(v.name)) throw new UsageError(`--volume: volume "${v.name}" given twice`);
    seen.add(v.name);
  }
  const allowIdentities = (values.allow ?? []).filter((text) => text.startsWith("id:")).map((text) => {
    const identity = text.slice(3);
    if (!PSK_IDENTITY_PATTERN.test(identity)) throw new UsageError(`--allow: invalid identity in "${text}" (expected id:NAME)`);
    return identity;
  });
  const allowAddresses = (values.allow ?? []).filter((text) => !text.startsWith("id:"));
  const allow =
    values.allow === undefined
      ? loopbackCidrs()
      : allowAddresses.map((text) => {
          const parsed = parseCidr(text);
          if (!parsed.ok) throw new UsageError(`--allow: invalid CIDR "${text}": ${parsed.reason}`);
          return parsed.cidr;
        });
  const join = parseJoinFlags(values); // discovery (--discovery)
  const insecurePlaintext = values["insecure-plaintext"] === true;
  if (insecurePlaintext && join === undefined) throw new UsageError("--insecure-plaintext: only with --discovery (a standalone unit is plaintext unless --tls says otherwise)");
  if (values.tls !== undefined && !(TLS_MODES as readonly string[]).includes(values.tls)) {
    throw new UsageError(`--tls: invalid "${values.tls}" (expected off, on or require)`);
  }
  if (insecurePlaintext && values.tls !== undefined && values.tls !== "off") {
    throw new UsageError(`--insecure-plaintext: contradicts --tls ${values.tls} (give one of them)`);
  }
  const tls: TlsMode = (values.tls as TlsMode | undefined) ?? (join !== undefined && !insecurePlaintext ? JOINED_TLS_DEFAULT : "off");
  if (allowIdentities.length > 0 && values["tls-psk"] === undefined) throw new UsageError("--allow id:NAME needs --tls-psk FILE (where NAME's key is)");
  if (values["tls-psk"] !== undefined && tls === "off") throw new UsageError("--tls-psk needs --tls on or --tls require");
  return {
    ...(join === undefined ? {} : { join }),
    name,
    dataDir: values.data,
    capacityBytes,
    devicePath: values.device,
    listen: parseListen(values.listen),
    ...(values.iscsi === undefined ? {} : { iscsi: parseHostPort(values.iscsi, "--iscsi") }),
    ...(values["iscsi-require-digest"] === undefined ? {} : { iscsiRequiredDigests: parseRequiredDigests(values["iscsi-require-digest"], values.iscsi !== undefined) }),
    volumes,
    allow,
    allowIdentities,
    tls,
    insecurePlaintext,
    tlsPskFile: values["tls-psk"],
    control: controlListen(values) ?? (join !== undefined ? autoControl(parseListen(values.listen)) : undefined),
    controlTokenFile: values["control-token-file"],
    metricsTokenFile: values["metrics-token-file"],
  };
}

/**
 * Where the control API listens: --control-listen HOST:PORT, or its old
 * spelling --control HOST:PORT (a one-line deprecation note on stderr). A URL
 * there is the other meaning of --control (a unit's control API URL, as in
 * `ipsan unit volume --control URL`): refused naming the right flag.
 */
function controlListen(values: { "control-listen"?: string; control?: string }, warn: (line: string) => void = (line) => process.stderr.write(`${line}\n`)): { host: string; port: number } | undefined {
  if (values["control-listen"] !== undefined && values.control !== undefined) {
    throw new UsageError("--control HOST:PORT is the old spelling of --control-listen HOST:PORT: give one of them");
  }
  const flag = values["control-listen"] !== undefined ? "--control-listen" : "--control";
  const text = values["control-listen"] ?? values.control;
  if (text === undefined) return undefined;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
    throw new UsageError(
      `${flag}: "${text}" is a URL; a unit opens its control API at --control-listen HOST:PORT (e.g. 127.0.0.1:0 for a free port). ` +
        `A running unit's control API URL is for "ipsan unit volume --control URL"`,
    );
  }
  const address = parseHostPort(text, flag);
  if (flag === "--control") warn(`ipsan unit: --control HOST:PORT is deprecated; use --control-listen ${text} (--control URL names a unit's control API, docs/cli.md)`);
  return address;
}

/**
 * A unit joined to a station opens its control API by itself when --control is
 * not given (the station allocates through it; without one the unit's space is
 * unusable, issue 9 item 3): on the --listen host (127.0.0.1 for a Unix socket),
 * a free port, reported to the station and printed on the control line.
 */
function autoControl(listen: NbdListenAddress): { host: string; port: number } {
  return { host: "path" in listen ? "127.0.0.1" : listen.host, port: 0 };
}

/** Reads the control token from FILE, or DATA/control.token (created 0600 with 32 random bytes on first use). */
export async function loadControlToken(dataDir: string, tokenFile: string | undefined): Promise<string> {
  const path = tokenFile ?? join(dataDir, CONTROL_TOKEN_FILE_NAME);
  if (tokenFile === undefined) await createSecretFileIfMissing(path);
  return readTokenFile(path, "--control-token-file");
}

/** One token of 16..512 printable characters from `path`; errors name `flag`. */
function readTokenFile(path: string, flag: string): string {
  let token: string;
  try {
    token = readFileSync(path, "utf8").trim();
  } catch (error) {
    throw new IpsanError("INVALID_ARGUMENT", `${flag}: cannot read "${path}": ${errorMessage(error)}`, { field: flag });
  }
  if (!/^[\x21-\x7e]{16,512}$/.test(token)) {
    throw new IpsanError("INVALID_ARGUMENT", `${flag}: "${path}" must hold one token of 16..512 printable characters`, { field: flag });
  }
  return token;
}

/** The NBD server's TLS (and iSCSI's CHAP): keys of identity grants (DATA/host-keys.psk) first, then --tls-psk. */
function serverTls(config: UnitConfig, manager: VolumeManager, provider: UnitExportProvider): NbdServerTls | undefined {
  if (config.tls === "off") return undefined;
  let fileKeys = new Map<string, Buffer>();
  if (config.tlsPskFile !== undefined) {
    let text: string;
    try {
      text = readFileSync(config.tlsPskFile, "utf8");
    } catch (error) {
      throw new IpsanError("INVALID_ARGUMENT", `--tls-psk: cannot read "${config.tlsPskFile}": ${errorMessage(error)}`, { field: "--tls-psk" });
    }
    const parsed = parsePskFile(text);
    if (!parsed.ok) throw new IpsanError("INVALID_ARGUMENT", `--tls-psk: "${config.tlsPskFile}": ${parsed.reason}`, { field: "--tls-psk" });
    fileKeys = parsed.keys;
  }
  return {
    mode: config.tls,
    keyFor: (identity) => {
      const key = manager.hostKeys.get(identity) ?? fileKeys.get(identity);
      // An identity with no key here (e.g. a host fenced off every volume of this unit) is a refused attempt.
      if (key === undefined) provider.identityRefused();
      return key;
    },
  };
}

/**
 * A storage file is sparse: a --capacity larger than what its file system can
 * still hold starts fine and fails later, when writes meet ENOSPC. Say so at
 * start (issue 9 item 10), with the figures.
 */
function warnIfFileSystemTooSmall(storagePath: string, sizeBytes: number): void {
  try {
    const fsStat = statfsSync(dirname(storagePath));
    const freeBytes = fsStat.bavail * fsStat.bsize;
    const allocatedBytes = statSync(storagePath).blocks * 512;
    const unallocatedBytes = Math.max(0, sizeBytes - allocatedBytes);
    if (unallocatedBytes > freeBytes) {
      log.warn("the storage file is larger than its file system can hold: writes will fail (ENOSPC, answered as NO_SPACE) once it fills; free space there or lower --capacity", {
        storage: storagePath,
        capacity: formatSize(sizeBytes),
        allocated: formatSize(allocatedBytes),
        fileSystemFree: formatSize(freeBytes),
      });
    }
  } catch (error) {
    log.debug("cannot check the storage file system's free space", { error: errorMessage(error) });
  }
}

/** Opens the storage, makes sure the --volume volumes exist, and starts serving. */
export async function startUnit(config: UnitConfig): Promise<RunningUnit> {
  const manager = await VolumeManager.open({ dataDir: config.dataDir, capacityBytes: config.capacityBytes, devicePath: config.devicePath });
  if (config.devicePath === undefined) warnIfFileSystemTooSmall(manager.storage.path, manager.storage.sizeBytes);
  let nbdServer: NbdServer | undefined;
  let iscsiTarget: IscsiTarget | undefined;
  let controlServer: ControlServer | undefined;
  try {
    for (const v of config.volumes) await manager.ensure(v.name, v.sizeBytes);
    const provider = new UnitExportProvider(manager, {
      allow: config.allow,
      allowIdentities: config.allowIdentities,
      tls: config.tls !== "off",
      ...(config.joined === undefined ? {} : { joined: config.joined }),
    });
    const tls = serverTls(config, manager, provider);
    if (config.insecurePlaintext) {
      log.warn("INSECURE: --insecure-plaintext: NBD data to and from hosts is not encrypted and hosts do not prove who they are; anyone on the storage network who can use a granted address can read and write its volumes");
    }
    nbdServer = new NbdServer({ provider, ...(tls === undefined ? {} : { tls }) });
    const nbd = await nbdServer.listen(config.listen);
    let iscsi: { host: string; port: number } | undefined;
    let iscsiView: ((view: VolumeView) => VolumeView) | undefined;
    let iscsiMetrics: (() => IscsiMetrics) | undefined;
    if (config.iscsi !== undefined) {
      // Loaded only with --iscsi: the iSCSI side is the unit's one npm dependency (@node-rs/crc32).
      const { endedLogicalUnits, newUnitIscsiTarget, withIscsi } = await import("./iscsi.ts");
      const { LogicalUnitRegistry } = await import("../scsi/logical_unit.ts");
      const { FileReservationStore } = await import("./reservation_store.ts");
      // Persistent reservations outlive sessions; under APTPL they are kept in DATA/reservations across restarts.
      const registry = new LogicalUnitRegistry(new FileReservationStore(config.dataDir));
      manager.onChanged = (before, after) => {
        for (const identity of endedLogicalUnits(manager.unitId, before, after)) {
          registry.forget(identity).catch((error: unknown) => {
            log.error("the saved persistent reservations of an ended logical unit could not be removed", { export: identity.exportName, error: errorMessage(error) });
          });
        }
      };
      const target = newUnitIscsiTarget({
        unitName: config.name,
        manager,
        provider,
        acquireLogicalUnit: (device, identity) => registry.acquire(identity, device),
        // CHAP secrets derive from the same host keys as NBD's TLS-PSK (src/iscsi/names.ts chapSecret).
        keyFor: tls === undefined ? undefined : tls.keyFor,
        chapRequired: config.tls === "require",
        ...(config.iscsiRequiredDigests === undefined ? {} : { requiredDigests: config.iscsiRequiredDigests }),
      });
      iscsiTarget = target;
      iscsiView = (view) => withIscsi(view, target, manager);
      iscsiMetrics = () => ({
        connections: target.connectionCount,
        readArenaBytes: target.readArenas.heldBytes,
        readArenaConnections: target.readArenas.holders,
        readArenaBytesMax: target.readArenas.bytesMax,
      });
      iscsi = await target.listen(config.iscsi.host, config.iscsi.port);
    }
    const iscsiPortal = iscsi === undefined ? undefined : hostPortText(iscsi);
    let control: { host: string; port: number } | undefined;
    if (config.control !== undefined) {
      const token = await loadControlToken(config.dataDir, config.controlTokenFile);
      const metricsToken = config.metricsTokenFile === undefined ? undefined : readTokenFile(config.metricsTokenFile, "--metrics-token-file");
      controlServer = new ControlServer({
        manager,
        provider,
        unitName: config.name,
        tokens: [token],
        ...(config.extraTokens === undefined ? {} : { extraTokens: config.extraTokens }),
        nbd: () => nbd,
        tls: config.tls,
        io: () => nbdServer,
        ...(iscsiView === undefined ? {} : { iscsi: { portal: () => iscsiPortal, view: iscsiView, ...(iscsiMetrics === undefined ? {} : { metrics: iscsiMetrics }) } }),
        ...(metricsToken === undefined ? {} : { readTokens: [metricsToken] }),
      });
      control = await controlServer.listen(config.control.host, config.control.port);
    }
    const servers = { nbd: nbdServer, iscsi: iscsiTarget, control: controlServer };
    let stopping: Promise<void> | undefined;
    return {
      config,
      manager,
      provider,
      nbd,
      iscsi,
      control,
      stop: () => {
        stopping ??= (async () => {
          await Promise.all([servers.nbd.close(), servers.iscsi?.close(), servers.control?.close()]);
          await manager.close();
        })();
        return stopping;
      },
    };
  } catch (error) {
    await nbdServer?.close().catch(() => undefined);
    await iscsiTarget?.close().catch(() => undefined);
    await controlServer?.close().catch(() => undefined);
    await manager.close().catch(() => undefined);
    throw error;
  }
}

export async function unitMain(argv: readonly string[]): Promise<number> {
  if (argv[0] === "volume") {
    const { volumeMain } = await import("./admin.ts");
    return volumeMain(argv.slice(1));
  }
  if (argv[0] === "format") {
    const { formatMain } = await import("./format.ts");
    return formatMain(argv.slice(1));
  }
  let config = parseUnitArgs(argv);
  // ---- discovery (--discovery): accept the station's derived token; unassigned volumes go to nobody ----
  const joinKey = config.join === undefined ? undefined : await loadJoinKey(config.join);
  const stationTokens = joinKey === undefined ? undefined : joinTokens();
  if (stationTokens !== undefined) config = { ...config, extraTokens: stationTokens.tokens, joined: () => true };
  // ---- end discovery ----
  // Signal handlers go in before anything starts: a SIGTERM that arrives while
  // the unit is starting (or right after its ready line) still stops it cleanly.
  let signalled: NodeJS.Signals | undefined;
  let onStopRequest: (() => void) | undefined;
  const onSignal = (signal: NodeJS.Signals): void => {
    if (signalled !== undefined) return;
    signalled = signal;
    log.info("stopping", { signal });
    setTimeout(() => {
      log.error("shutdown took too long; exiting", { timeoutMs: SHUTDOWN_TIMEOUT_MS });
      process.exit(1);
    }, SHUTDOWN_TIMEOUT_MS).unref();
    onStopRequest?.();
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    let unit: RunningUnit;
    try {
      unit = await startUnit(config);
    } catch (error) {
      // A flag value the storage rejects (a smaller --capacity, a bad --device) is a usage error too.
      if (error instanceof IpsanError && error.code === "INVALID_ARGUMENT" && error.field?.startsWith("--")) throw new UsageError(error.message);
      throw error;
    }
    let join: Awaited<ReturnType<typeof startJoin>> | undefined;
    if (signalled === undefined) {
      process.stdout.write(`ipsan unit ${config.name} ready ${nbdUrl(unit.nbd)}\n`);
      if (unit.iscsi !== undefined) process.stdout.write(`ipsan unit ${config.name} iscsi iscsi://${hostPortText(unit.iscsi)}\n`);
      if (unit.control !== undefined) {
        process.stdout.write(`ipsan unit ${config.name} control http://${hostForUrl(unit.control.host)}:${unit.control.port}\n`);
      }
      // The unit's identity (issue 7), on a line of its own after the contract lines above.
      process.stdout.write(`ipsan unit ${config.name} id ${unit.manager.unitId}\n`);
      // ---- discovery (--discovery): join the station's pool (STARTUP, storage info, heartbeats) ----
      join = config.join === undefined || joinKey === undefined ? undefined : await startJoin(config.join, joinKey, { name: config.name, nbd: unit.nbd, control: unit.control, manager: unit.manager, dataDir: config.dataDir, tls: config.tls, ...(stationTokens === undefined ? {} : { tokens: stationTokens }) });
      // ---- end discovery ----
      const snapshot = unit.manager.snapshot();
      log.info("serving", { name: config.name, unitId: unit.manager.unitId, storage: unit.manager.storage.path, capacityBytes: snapshot.capacityBytes, volumes: snapshot.volumes.length });
      if (signalled === undefined) {
        await new Promise<void>((resolve) => {
          onStopRequest = resolve;
        });
      }
    }
    try {
      // discovery (--discovery): SHUTDOWN to the station first (bounded wait for its ACK), then stop serving.
      await (join?.stop() ?? Promise.resolve()).catch(() => undefined);
      await unit.stop();
    } catch (error) {
      log.error("stop failed", { error: errorMessage(error) });
      return 1;
    }
    log.info("stopped cleanly");
    return 0;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}
