// Simulated units for the station benchmark: N units with M volumes each in
// one process, joining the station over the real discovery protocol (the
// discovery helper's StationAgent: real UDP, HMACs, fragmentation), and one
// small HTTP server that answers the unit control API for all of them (the
// bearer token says which unit is called: controlTokenFor(key, name)), so the
// station can allocate on them. Volumes are bookkeeping only: no storage, no
// NBD. A change (create, delete, grants) bumps the unit's table and the agent
// pushes fresh storage info, as a real unit does.
//
//   node dist/station/bench/sim_pool.js --station HOST:PORT[,HOST:PORT...] --cluster-key-file FILE
//        --units N --volumes M [--start-times FILE]
// Several stations on etcd (issue 11): --station lists every station's
// discovery address, as a real unit's --discovery does; each agent sends to
// all of them and follows the one that answers (the leader).
// prints "ipsan sim-pool control http://HOST:PORT", then "ipsan sim-pool started N".

import { writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { pathToFileURL } from "node:url";
import { controlTokenFor, loadClusterKey } from "../../discovery/keys.ts";
import { peekUnitName } from "../../discovery/codec.ts";
import type { StorageInfo, VolumeInfo } from "../../discovery/messages.ts";
import { sampleStorageInfo } from "../../discovery/sample_info.ts";
import { preciseNowMs } from "../../discovery/sim_units.ts";
import { openUdpSocket, type Address, type DatagramSocket } from "../../discovery/transport.ts";
import { DISCOVERY_ADDRESSES_MAX, StationAgent } from "../../discovery/unit_agent.ts";
import { UsageError, errorMessage } from "../../util/errors.ts";
import { parseFlags, parseHostPort } from "../../util/flags.ts";

const UNITS_PER_SOCKET = 250;
const BODY_BYTES_MAX = 64 * 1024;
const SECTOR = 512;
const ALIGN_BYTES = 1024 * 1024;

export interface SimUnit {
  readonly name: string;
  info: StorageInfo;
  readonly volumes: Map<string, VolumeInfo>;
  nextLba: number;
  agent: StationAgent | null;
  /** Tests: answer every create with 507 NO_SPACE while still reporting free space (a unit whose report misleads). */
  refuseCarves: boolean;
  /** Creates asked for (tests count how often a refusing unit is tried). */
  carveCalls: number;
}

function snapshot(unit: SimUnit): StorageInfo {
  return { ...unit.info, volumes: [...unit.volumes.values()] };
}

function send(res: ServerResponse, status: number, body?: unknown): void {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": String(Buffer.byteLength(text)) }).end(text);
}

function fail(res: ServerResponse, status: number, code: string, message: string): void {
  send(res, status, { error: { code, message } });
}

async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of req) {
    total += (chunk as Buffer).length;
    if (total > BODY_BYTES_MAX) throw new Error("body too large");
    chunks.push(chunk as Buffer);
  }
  const text = Buffer.concat(chunks).toString("utf8");
  return text === "" ? {} : (JSON.parse(text) as Record<string, unknown>);
}

export class SimPool {
  readonly units = new Map<string, SimUnit>();
  private readonly byToken = new Map<string, SimUnit>();
  private readonly sockets: DatagramSocket[] = [];
  readonly startedAtMs = new Map<string, number>();
  private server = createServer((req, res) => void this.handle(req, res));
  private controlAddress: AddressInfo | null = null;
  private readonly station: Address | readonly Address[];
  private readonly clusterKey: Buffer;

  constructor(station: Address | readonly Address[], clusterKey: Buffer) {
    this.station = station;
    this.clusterKey = clusterKey;
  }

  async listenControl(): Promise<AddressInfo> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.server.keepAliveTimeout = 30_000;
    this.controlAddress = this.server.address() as AddressInfo;
    return this.controlAddress;
  }

  async start(count: number, volumesPerUnit: number, options: { capacityBytes?: number; prefix?: string } = {}): Promise<void> {
    const control = this.controlAddress;
    if (control === null) throw new Error("listenControl() first");
    for (let i = 0; i < Math.ceil(count / UNITS_PER_SOCKET); i++) {
      this.sockets.push(await openUdpSocket({ host: "127.0.0.1", port: 0 }, (bytes, from) => this.dispatch(bytes, from)));
    }
    for (let i = 0; i < count; i++) {
      const name = `${options.prefix ?? "sim"}-${String(i + 1).padStart(5, "0")}`;
      const shared = this.sockets[Math.floor(i / UNITS_PER_SOCKET)] as DatagramSocket;
      const info = sampleStorageInfo(name, {
        volumeCount: volumesPerUnit,
        volumeBytes: 1024 ** 3,
        nbd: { host: "127.0.0.1", port: 9 },
        control: { host: control.address, port: control.port },
        ...(options.capacityBytes === undefined ? {} : { capacityBytes: options.capacityBytes }),
      });
      const unit: SimUnit = {
        name,
        info,
        volumes: new Map(info.volumes.map((v) => [v.name, v])),
        nextLba: 2048 + volumesPerUnit * ((1024 ** 3) / SECTOR),
        agent: null,
        refuseCarves: false,
        carveCalls: 0,
      };
      this.units.set(name, unit);
      this.byToken.set(controlTokenFor(this.clusterKey, name), unit);
      const agent = new StationAgent({
        unitName: name,
        station: this.station,
        clusterKey: this.clusterKey,
        storageInfo: () => snapshot(unit),
        socket: { local: shared.local, send: (b, to) => shared.send(b, to), close: async () => {} },
      });
      unit.agent = agent;
      this.startedAtMs.set(name, preciseNowMs());
      await agent.start();
    }
  }

  private dispatch(bytes: Buffer, from: Address): void {
    const name = peekUnitName(bytes);
    if (name !== undefined) this.units.get(name)?.agent?.handleDatagram(bytes, from);
  }

  private changed(unit: SimUnit): void {
    unit.agent?.notifyChanged();
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    try {
      const token = /^Bearer (\S+)$/.exec(req.headers.authorization ?? "")?.[1] ?? "";
      const unit = this.byToken.get(token);
      if (unit === undefined) return fail(res, 401, "UNAUTHENTICATED", "bad token");
      const url = new URL(req.url ?? "/", "http://sim");
      const parts = url.pathname.split("/").filter((p) => p !== "").map(decodeURIComponent);
      const method = req.method ?? "GET";
      if (parts[0] !== "v1") return fail(res, 404, "NOT_FOUND", "no such path");
      if (parts[1] === "info" && method === "GET") {
        const s = snapshot(unit);
        return send(res, 200, { name: unit.name, capacityBytes: s.capacityBytes, freeBytes: s.freeBytes, sectorSize: 512, nbd: s.nbd, volumes: s.volumes });
      }
      if (parts[1] !== "volumes") return fail(res, 404, "NOT_FOUND", "no such path");
      const name = parts[2];
      if (name === undefined) {
        if (method === "GET") return send(res, 200, { items: [...unit.volumes.values()] });
        if (method !== "POST") return fail(res, 405, "INVALID_ARGUMENT", "method");
        const body = await readJson(req);
        const volumeName = String(body["name"]);
        const sizeBytes = Number(body["sizeBytes"]);
        unit.carveCalls += 1;
        if (unit.volumes.has(volumeName)) return fail(res, 409, "ALREADY_EXISTS", `volume ${volumeName} exists`);
        const allocated = Math.ceil(sizeBytes / ALIGN_BYTES) * ALIGN_BYTES;
        if (allocated > unit.info.freeBytes || unit.refuseCarves) {
          return fail(res, 507, "NO_SPACE", `volume "${volumeName}": needs ${allocated} bytes, free space too fragmented`);
        }
        const lengthLba = allocated / SECTOR;
        const volume: VolumeInfo = {
          name: volumeName,
          number: unit.volumes.size + 1,
          sizeBytes,
          extents: [{ startLba: unit.nextLba, lengthLba, endLba: unit.nextLba + lengthLba - 1 }],
          partitions: [],
          grants: [],
        };
        unit.nextLba += lengthLba;
        unit.info = { ...unit.info, freeBytes: unit.info.freeBytes - allocated };
        unit.volumes.set(volumeName, volume);
        this.changed(unit);
        return send(res, 201, volume);
      }
      const volume = unit.volumes.get(name);
      if (volume === undefined) return fail(res, 404, "NOT_FOUND", `volume ${name} not found`);
      if (parts[3] === undefined) {
        if (method === "GET") return send(res, 200, volume);
        if (method === "DELETE") {
          unit.volumes.delete(name);
          this.changed(unit);
          return send(res, 204);
        }
      }
      // Simulated volumes hold no bytes: a wipe has nothing to discard.
      if (parts[3] === "wipe" && method === "POST") return send(res, 200, volume);
      if (parts[3] === "grants" && method === "PUT") {
        const body = await readJson(req);
        const hosts = (body["hosts"] as string[] | undefined) ?? [];
        const updated = { ...volume, grants: [...new Set(hosts)] };
        unit.volumes.set(name, updated);
        this.changed(unit);
        return send(res, 200, updated);
      }
      return fail(res, 501, "NOT_SUPPORTED", "not simulated");
    } catch (error) {
      fail(res, 400, "INVALID_ARGUMENT", errorMessage(error));
    }
  }

  async stop(): Promise<void> {
    await Promise.all([...this.units.values()].map((u) => u.agent?.stop() ?? Promise.resolve(false)));
    for (const socket of this.sockets) await socket.close();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

async function main(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    station: { type: "string" },
    "cluster-key-file": { type: "string" },
    units: { type: "string" },
    volumes: { type: "string" },
    "start-times": { type: "string" },
  });
  if (values.station === undefined || values["cluster-key-file"] === undefined) {
    throw new UsageError("usage: sim_pool --station HOST:PORT[,HOST:PORT...] --cluster-key-file FILE --units N --volumes M [--start-times FILE]");
  }
  const stations = values.station.split(",").map((text) => parseHostPort(text.trim(), "--station"));
  if (stations.length > DISCOVERY_ADDRESSES_MAX) throw new UsageError(`--station: at most ${DISCOVERY_ADDRESSES_MAX} station addresses (got ${stations.length})`);
  const pool = new SimPool(stations.length === 1 ? (stations[0] as Address) : stations, await loadClusterKey(values["cluster-key-file"]));
  const control = await pool.listenControl();
  process.stdout.write(`ipsan sim-pool control http://${control.address}:${control.port}\n`);
  await pool.start(Number(values.units ?? "10"), Number(values.volumes ?? "10"));
  if (values["start-times"] !== undefined) writeFileSync(values["start-times"], JSON.stringify(Object.fromEntries(pool.startedAtMs)));
  process.stdout.write(`ipsan sim-pool started ${pool.units.size}\n`);
  await new Promise<void>((resolve) => {
    process.once("SIGINT", () => resolve());
    process.once("SIGTERM", () => resolve());
  });
  await pool.stop();
  return 0;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`sim_pool: ${errorMessage(error)}\n`);
      process.exit(error instanceof UsageError ? 2 : 1);
    },
  );
}
