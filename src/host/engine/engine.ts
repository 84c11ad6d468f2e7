// `ipsan host engine`: the mirror engine as a process. It serves one mirrored
// volume over NBD to the host's own clients (a Unix socket, or a loopback TCP
// port) and speaks NBD to every leg. Prints one line when serving:
//   ipsan engine MIRROR ready URI
// and then one JSON line per leg event on stderr (logs). SIGTERM/SIGINT:
// stop accepting, finish requests, flush every leg, exit 0.
// With --legs-file the legs come from a JSON file (src/host/legs.ts) and
// SIGHUP re-reads it (a replaced or moved leg, Mirror.setLegs); with
// --status-file the legs' states and rebuild progress are written to a file
// (tmp + rename) on every change and at most once a second while rebuilding.

import { lstat, unlink } from "node:fs/promises";
import { connect } from "node:net";
import { UsageError } from "../../util/errors.ts";
import type { BlockDevice, ExportProvider, ExportSummary, Peer } from "../../block/types.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { parseFlags, parseHostPort } from "../../util/flags.ts";
import { logger } from "../../util/log.ts";
import { NbdClient, parseNbdUri } from "../../nbd/client.ts";
import { NbdServer } from "../../nbd/server.ts";
import { type LegSpec, Mirror, type MirrorEvent } from "./mirror.ts";
import { type EngineStatus, LEG_ID_PATTERN, type LegEntry, readLegsFile, writeFileAtomic } from "../legs.ts";
import { formatSize, parseSize } from "../../util/size.ts";

const log = logger("engine");

/** --rebuild-rate default: the rebuild copies at most this many bytes per second (mirror.ts). */
export const REBUILD_RATE_DEFAULT = 512 * 1024 * 1024;
/** The status file is rewritten at most this often while only progress changes. */
export const STATUS_INTERVAL_MS = 1_000;

export const ENGINE_USAGE = `usage: ipsan host engine --mirror ID (--leg NAME=URI [--leg NAME=URI]... | --legs-file PATH) --listen unix:/PATH|127.0.0.1:PORT
                         [--export NAME] [--status-file PATH] [--rebuild-rate SIZE]
    serves the mirror of the legs (NBD URIs of volumes on different units, each the
    mirror's size plus 1 MiB of metadata) over NBD; prints "ipsan engine ID ready URI"
    --legs-file PATH    the legs as JSON [{"id","uri","unit"?,"volume"?}]; SIGHUP re-reads it
    --status-file PATH  the legs' states and rebuild progress, as JSON (written atomically)
    --rebuild-rate SIZE ceiling on rebuild copying, bytes per second (K/M/G; default ${formatSize(REBUILD_RATE_DEFAULT)})
`;


const LOOPBACK = /^(127\.|::1$|::ffff:127\.)/;

/** The engine's front: one export, for this host only. */
class MirrorProvider implements ExportProvider {
  readonly #mirror: Mirror;
  constructor(mirror: Mirror) {
    this.#mirror = mirror;
  }
  get defaultExport(): string {
    return this.#mirror.name;
  }
  admitsConnection(peer: Peer): boolean {
    return peer.address === "unix" || LOOPBACK.test(peer.address);
  }
  list(): readonly ExportSummary[] {
    return [{ name: this.#mirror.name, description: this.#mirror.description }];
  }
  async open(name: string): Promise<BlockDevice> {
    if (name !== this.#mirror.name) throw new IpsanError("NOT_FOUND", `export ${JSON.stringify(name)} not found (this engine serves ${this.#mirror.name})`);
    return this.#mirror;
  }
}

export function parseLeg(text: string): { id: string; uri: string } {
  const at = text.indexOf("=");
  const id = text.slice(0, at);
  const uri = text.slice(at + 1);
  if (at <= 0 || !LEG_ID_PATTERN.test(id)) throw new UsageError(`--leg: expected NAME=URI, got "${text}"`);
  try {
    parseNbdUri(uri);
  } catch (error) {
    throw new UsageError(`--leg ${id}: ${(error as Error).message}`);
  }
  return { id, uri };
}

export async function engineMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    mirror: { type: "string" },
    leg: { type: "string", multiple: true },
    listen: { type: "string" },
    export: { type: "string" },
    "legs-file": { type: "string" },
    "status-file": { type: "string" },
    "rebuild-rate": { type: "string" },
    help: { type: "boolean" },
  });
  if (values.help === true) {
    process.stdout.write(ENGINE_USAGE);
    return 0;
  }
  const mirrorId = values.mirror;
  if (mirrorId === undefined || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(mirrorId)) throw new UsageError(`--mirror: a mirror id is required (letters, digits, _ . -)\n${ENGINE_USAGE}`);
  const legsFile = values["legs-file"];
  // A SIGHUP while the engine starts would end the process (the default action): it is kept and applied once serving.
  let hangupWhileStarting = false;
  const hangupEarly = (): void => {
    hangupWhileStarting = true;
  };
  process.on("SIGHUP", hangupEarly);
  if (legsFile !== undefined && values.leg !== undefined) throw new UsageError(`--leg and --legs-file: give one or the other\n${ENGINE_USAGE}`);
  let legs: LegEntry[];
  if (legsFile !== undefined) {
    try {
      legs = await readLegsFile(legsFile);
    } catch (error) {
      throw new UsageError(`--legs-file: ${errorMessage(error)}`);
    }
  } else legs = (values.leg ?? []).map(parseLeg);
  if (legs.length === 0) throw new UsageError(`--leg or --legs-file is required\n${ENGINE_USAGE}`);
  const rebuildRate = values["rebuild-rate"] === undefined ? REBUILD_RATE_DEFAULT : parseSize(values["rebuild-rate"], "--rebuild-rate");
  if (rebuildRate <= 0) throw new UsageError("--rebuild-rate: must be more than 0 bytes per second");
  const statusFile = values["status-file"];
  const listen = values.listen;
  if (listen === undefined) throw new UsageError(`--listen is required\n${ENGINE_USAGE}`);
  const address = listen.startsWith("unix:") ? { path: listen.slice(5) } : parseHostPort(listen, "--listen");
  if (!("path" in address) && !LOOPBACK.test(address.host)) throw new UsageError(`--listen: the engine serves this host only: a Unix socket or a loopback address, not ${address.host}`);
  const exportName = values.export ?? mirrorId;

  // Before the legs are touched: a live engine on this socket must not have a second one beside it.
  if ("path" in address) await removeStaleSocket(address.path);
  const toSpecs = (entries: readonly LegEntry[]): LegSpec[] => entries.map((leg) => ({ id: leg.id, uri: leg.uri, connect: () => NbdClient.connect(leg.uri) }));
  let current = legs;
  let status: StatusWriter | undefined;
  const mirror = await Mirror.open(mirrorId, exportName, toSpecs(legs), {
    rebuildBytesPerSecond: rebuildRate,
    onEvent: (event) => {
      log.info(`mirror event ${event.type}`, { mirror: mirrorId, ...flatten(event) });
      status?.changed(event);
    },
  });
  if (statusFile !== undefined) {
    status = new StatusWriter(statusFile, () => statusOf(mirror, current));
    status.changed(undefined);
  }
  const onHangup = (): void => {
    if (legsFile === undefined) {
      log.info("SIGHUP ignored: the legs were given with --leg, not --legs-file", { mirror: mirrorId });
      return;
    }
    void (async () => {
      const next = await readLegsFile(legsFile);
      log.info("legs file re-read", { mirror: mirrorId, legs: next.map((l) => `${l.id}=${l.uri}`).join(",") });
      const previous = current;
      // While the change is applied, the status file finds new legs' unit and volume (and old ones' until they are gone).
      current = [...next, ...previous];
      try {
        await mirror.setLegs(toSpecs(next));
        current = next;
      } catch (error) {
        current = previous;
        throw error;
      } finally {
        status?.changed(undefined);
      }
    })().catch((error: unknown) => log.error("legs file not applied", { mirror: mirrorId, path: legsFile, error: errorMessage(error) }));
  };
  process.off("SIGHUP", hangupEarly);
  process.on("SIGHUP", onHangup);
  if (hangupWhileStarting) onHangup();
  const server = new NbdServer({ provider: new MirrorProvider(mirror) });
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      process.off("SIGHUP", onHangup);
      await server.close();
      await mirror.shutdown();
      await status?.close();
    })();
    return stopping;
  };
  const done = new Promise<void>((resolve) => {
    const onSignal = (): void => {
      void stop().then(resolve);
    };
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
  });
  let bound: Awaited<ReturnType<NbdServer["listen"]>>;
  try {
    bound = await server.listen(address);
  } catch (error) {
    // Nothing is served: give the legs back and exit non-zero rather than hold them.
    await server.close().catch(() => undefined);
    await mirror.shutdown();
    await status?.close();
    throw error;
  }
  const uri = "path" in bound ? `nbd+unix:///${encodeURIComponent(exportName)}?socket=${bound.path}` : `nbd://${bound.host}:${bound.port}/${encodeURIComponent(exportName)}`;
  process.stdout.write(`ipsan engine ${mirrorId} ready ${uri}\n`);
  log.info("mirror engine serving", { mirror: mirrorId, uri, legs: mirror.status().map((l) => `${l.id}:${l.state}`).join(",") });
  await done;
  return 0;
}

/**
 * A socket file left by an engine that was killed: removed when nothing
 * answers on it; an engine that still serves it is not disturbed.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let info;
  try {
    info = await lstat(path);
  } catch {
    return;
  }
  if (!info.isSocket()) throw new IpsanError("ALREADY_EXISTS", `--listen unix:${path}: the path exists and is not a socket; refusing to remove it`);
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect(path);
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
  if (live) throw new IpsanError("ALREADY_EXISTS", `--listen unix:${path}: the socket is in use by another process`);
  log.info("removing a stale socket left by an engine that stopped", { path });
  await unlink(path);
}

function flatten(event: object): Record<string, string | number> {
  const out: Record<string, string | number> = {};
  for (const [key, value] of Object.entries(event)) {
    if (typeof value === "string" || typeof value === "number") out[key] = value;
    else if (value !== null && typeof value === "object") for (const [k, v] of Object.entries(value as object)) if (typeof v === "string" || typeof v === "number") out[`${key}.${k}`] = v;
  }
  return out;
}

/** The status file's content now: the mirror's legs, with the unit and volume the legs file gave each. */
function statusOf(mirror: Mirror, entries: readonly LegEntry[]): EngineStatus {
  return {
    generation: mirror.generation,
    updatedAt: new Date().toISOString(),
    legs: mirror.status().map((leg) => {
      const entry = entries.find((e) => e.id === leg.id);
      return {
        id: leg.id,
        uri: leg.uri ?? entry?.uri ?? "",
        ...(entry?.unit === undefined ? {} : { unit: entry.unit }),
        ...(entry?.volume === undefined ? {} : { volume: entry.volume }),
        state: leg.state,
        rebuild: leg.rebuild === undefined ? null : { kind: leg.rebuild.kind, copiedBytes: leg.rebuild.copiedBytes, totalBytes: leg.rebuild.totalBytes, etaSeconds: leg.rebuild.etaSeconds ?? null },
        error: leg.state === "in-sync" ? null : (leg.lastError ?? null),
      };
    }),
  };
}

/**
 * Writes the status file (tmp + rename): at once when a leg changes state,
 * at most every STATUS_INTERVAL_MS for progress alone, and once a second
 * while anything changed (a rebuild's progress between its events).
 */
class StatusWriter {
  readonly #path: string;
  readonly #read: () => EngineStatus;
  #writing: Promise<void> = Promise.resolve();
  #last = "";
  #lastWriteMs = 0;
  readonly #timer: NodeJS.Timeout;
  #closed = false;

  constructor(path: string, read: () => EngineStatus) {
    this.#path = path;
    this.#read = read;
    this.#timer = setInterval(() => this.#write(false), STATUS_INTERVAL_MS);
    this.#timer.unref();
  }

  /** A mirror event (undefined: the legs changed): a state change is written at once, progress at most once a second. */
  changed(event: MirrorEvent | undefined): void {
    const progressOnly = event?.type === "rebuild-progress";
    if (progressOnly && performance.now() - this.#lastWriteMs < STATUS_INTERVAL_MS) return;
    this.#write(true);
  }

  #write(force: boolean): void {
    if (this.#closed) return;
    this.#writing = this.#writing.then(async () => {
      const status = this.#read();
      const key = JSON.stringify({ ...status, updatedAt: "" });
      if (!force && key === this.#last) return;
      this.#last = key;
      this.#lastWriteMs = performance.now();
      try {
        await writeFileAtomic(this.#path, `${JSON.stringify(status)}\n`);
      } catch (error) {
        log.limited("status_file", "cannot write the status file", { path: this.#path, error: errorMessage(error) });
      }
    });
  }

  async close(): Promise<void> {
    this.#write(true);
    this.#closed = true;
    clearInterval(this.#timer);
    await this.#writing;
  }
}
