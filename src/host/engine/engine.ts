// `ipsan host engine`: the mirror engine as a process. It serves one mirrored
// volume over NBD to the host's own clients (a Unix socket, or a loopback TCP
// port) and speaks NBD to every leg. Prints one line when serving:
//   ipsan engine MIRROR ready URI
// and then one JSON line per leg event on stderr (logs). SIGTERM/SIGINT:
// stop accepting, finish requests, flush every leg, exit 0.

import { lstat, unlink } from "node:fs/promises";
import { connect } from "node:net";
import { UsageError } from "../../util/errors.ts";
import type { BlockDevice, ExportProvider, ExportSummary, Peer } from "../../block/types.ts";
import { IpsanError } from "../../util/errors.ts";
import { parseFlags, parseHostPort } from "../../util/flags.ts";
import { logger } from "../../util/log.ts";
import { NbdClient, parseNbdUri } from "../../nbd/client.ts";
import { NbdServer } from "../../nbd/server.ts";
import { type LegSpec, Mirror } from "./mirror.ts";

const log = logger("engine");

export const ENGINE_USAGE = `usage: ipsan host engine --mirror ID --leg NAME=URI [--leg NAME=URI]... --listen unix:/PATH|127.0.0.1:PORT [--export NAME]
    serves the mirror of the legs (NBD URIs of volumes on different units, each the
    mirror's size plus 1 MiB of metadata) over NBD; prints "ipsan engine ID ready URI"
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
  if (at <= 0 || !/^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$/.test(id)) throw new UsageError(`--leg: expected NAME=URI, got "${text}"`);
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
    help: { type: "boolean" },
  });
  if (values.help === true) {
    process.stdout.write(ENGINE_USAGE);
    return 0;
  }
  const mirrorId = values.mirror;
  if (mirrorId === undefined || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(mirrorId)) throw new UsageError(`--mirror: a mirror id is required (letters, digits, _ . -)\n${ENGINE_USAGE}`);
  const legs = (values.leg ?? []).map(parseLeg);
  if (legs.length === 0) throw new UsageError(`--leg is required\n${ENGINE_USAGE}`);
  const listen = values.listen;
  if (listen === undefined) throw new UsageError(`--listen is required\n${ENGINE_USAGE}`);
  const address = listen.startsWith("unix:") ? { path: listen.slice(5) } : parseHostPort(listen, "--listen");
  if (!("path" in address) && !LOOPBACK.test(address.host)) throw new UsageError(`--listen: the engine serves this host only: a Unix socket or a loopback address, not ${address.host}`);
  const exportName = values.export ?? mirrorId;

  // Before the legs are touched: a live engine on this socket must not have a second one beside it.
  if ("path" in address) await removeStaleSocket(address.path);
  const specs: LegSpec[] = legs.map((leg) => ({ id: leg.id, connect: () => NbdClient.connect(leg.uri) }));
  const mirror = await Mirror.open(mirrorId, exportName, specs, {
    onEvent: (event) => log.info(`mirror event ${event.type}`, { mirror: mirrorId, ...flatten(event) }),
  });
  const server = new NbdServer({ provider: new MirrorProvider(mirror) });
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      await server.close();
      await mirror.shutdown();
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
