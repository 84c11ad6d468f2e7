// Simulated units for the control-plane benchmark (issue 3, section 7): N
// units with M volumes each, from one process, speaking the real protocol
// (real StationAgents, real UDP, real HMACs). They share a few UDP sockets;
// datagrams from the station are handed to the agent named in their header
// (station datagrams carry the unit name they are addressed to), and the
// agent authenticates them as usual. They have no NBD or control server:
// their storage info points at addresses nobody listens on.
//
// As a program:
//   node dist/discovery/sim_units.js --station HOST:PORT --cluster-key-file FILE
//        --units N --volumes M [--prefix sim] [--spread-ms MS] [--start-times FILE] [--enrol]
// (--enrol: each unit has an identity and enrols, issue 7; secrets kept in memory)
// prints "ipsan sim-units started N" once every agent has sent STARTUP and
// stops on SIGINT/SIGTERM (each unit sends SHUTDOWN).

import { randomUUID } from "node:crypto";
import { writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { pathToFileURL } from "node:url";
import { UsageError, errorMessage } from "../util/errors.ts";
import { parseFlags, parseHostPort } from "../util/flags.ts";
import { loadClusterKey } from "./keys.ts";
import { peekUnitName } from "./codec.ts";
import { sampleStorageInfo } from "./sample_info.ts";
import { openUdpSocket, type Address, type DatagramSocket } from "./transport.ts";
import { StationAgent } from "./unit_agent.ts";
import { UnitCredentials } from "./unit_identity.ts";
import type { BackoffPolicy } from "./timers.ts";

/** Units per shared UDP socket. */
export const SIM_UNITS_PER_SOCKET = 250;
export const SIM_UNITS_MAX = 20_000;

export interface SimUnitsOptions {
  readonly station: Address;
  readonly clusterKey: Buffer;
  readonly units: number;
  readonly volumesPerUnit: number;
  readonly prefix?: string;
  /** Spread the starts evenly over this many ms (0: all at once). */
  readonly spreadMs?: number;
  readonly bindHost?: string;
  readonly backoff?: BackoffPolicy;
  /** Each unit has an identity and enrols (issue 7); secrets are kept in memory. */
  readonly enrol?: boolean;
}

/** Wall-clock ms with sub-ms precision, comparable across processes on one machine. */
export function preciseNowMs(): number {
  return performance.timeOrigin + performance.now();
}

export class SimulatedUnits {
  private readonly options: SimUnitsOptions;
  private readonly sockets: DatagramSocket[] = [];
  private readonly byName = new Map<string, StationAgent>();
  /** When each unit's agent started (its first STARTUP), preciseNowMs(). */
  readonly startedAtMs = new Map<string, number>();

  constructor(options: SimUnitsOptions) {
    if (!(Number.isInteger(options.units) && options.units >= 1 && options.units <= SIM_UNITS_MAX)) {
      throw new UsageError(`--units: ${options.units} is outside 1..${SIM_UNITS_MAX}`);
    }
    if (!(Number.isInteger(options.volumesPerUnit) && options.volumesPerUnit >= 0 && options.volumesPerUnit <= 4096)) {
      throw new UsageError(`--volumes: ${options.volumesPerUnit} is outside 0..4096`);
    }
    this.options = options;
  }

  get agents(): readonly StationAgent[] {
    return [...this.byName.values()];
  }

  names(): string[] {
    const prefix = this.options.prefix ?? "sim";
    return Array.from({ length: this.options.units }, (_, i) => `${prefix}-${String(i + 1).padStart(5, "0")}`);
  }

  /** Opens the sockets and starts every agent (spread over spreadMs). */
  async start(): Promise<void> {
    const names = this.names();
    const socketCount = Math.ceil(names.length / SIM_UNITS_PER_SOCKET);
    const bindHost = this.options.bindHost ?? "127.0.0.1";
    for (let i = 0; i < socketCount; i++) {
      this.sockets.push(await openUdpSocket({ host: bindHost, port: 0 }, (bytes, from) => this.dispatch(bytes, from)));
    }
    const spreadMs = this.options.spreadMs ?? 0;
    const t0 = preciseNowMs();
    for (const [i, name] of names.entries()) {
      if (spreadMs > 0) {
        const dueMs = t0 + (spreadMs * i) / names.length;
        const waitMs = dueMs - preciseNowMs();
        if (waitMs > 1) await new Promise((resolve) => setTimeout(resolve, waitMs));
      }
      const shared = this.sockets[Math.floor(i / SIM_UNITS_PER_SOCKET)] as DatagramSocket;
      const info = sampleStorageInfo(name, {
        volumeCount: this.options.volumesPerUnit,
        volumeBytes: 1024 ** 3,
        nbd: { host: shared.local.host, port: 9 },
        control: null,
      });
      const agent = new StationAgent({
        unitName: name,
        station: this.options.station,
        clusterKey: this.options.clusterKey,
        storageInfo: () => info,
        ...(this.options.backoff === undefined ? {} : { backoff: this.options.backoff }),
        ...(this.options.enrol === true
          ? { credentials: new UnitCredentials({ unitName: name, unitId: randomUUID(), clusterKey: this.options.clusterKey, stored: null, save: async () => {} }) }
          : {}),
        // Shared: closing one agent must not close the socket under the others.
        socket: { local: shared.local, send: (b, to) => shared.send(b, to), close: async () => {} },
      });
      this.byName.set(name, agent);
      this.startedAtMs.set(name, preciseNowMs());
      await agent.start();
    }
  }

  /** Hands a station datagram to the agent it names (the agent authenticates it). */
  private dispatch(bytes: Buffer, from: Address): void {
    const name = peekUnitName(bytes);
    if (name !== undefined) this.byName.get(name)?.handleDatagram(bytes, from);
  }

  /** Stops every unit: SHUTDOWN (clean) or silence (crash). */
  async stop(mode: "shutdown" | "crash" = "shutdown"): Promise<void> {
    await Promise.all([...this.byName.values()].map((agent) => (mode === "shutdown" ? agent.stop() : agent.abort())));
    for (const socket of this.sockets) await socket.close();
    this.sockets.length = 0;
  }
}

async function main(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    station: { type: "string" },
    "cluster-key-file": { type: "string" },
    units: { type: "string" },
    volumes: { type: "string" },
    prefix: { type: "string" },
    "spread-ms": { type: "string" },
    "start-times": { type: "string" },
    enrol: { type: "boolean" },
  });
  if (values.station === undefined || values["cluster-key-file"] === undefined) {
    throw new UsageError("usage: sim_units --station HOST:PORT --cluster-key-file FILE --units N --volumes M [--prefix P] [--spread-ms MS] [--start-times FILE]");
  }
  const sim = new SimulatedUnits({
    station: parseHostPort(values.station, "--station"),
    clusterKey: await loadClusterKey(values["cluster-key-file"]),
    units: Number(values.units ?? "1"),
    volumesPerUnit: Number(values.volumes ?? "0"),
    ...(values.prefix === undefined ? {} : { prefix: values.prefix }),
    spreadMs: Number(values["spread-ms"] ?? "0"),
    enrol: values.enrol === true,
  });
  await sim.start();
  if (values["start-times"] !== undefined) writeFileSync(values["start-times"], JSON.stringify(Object.fromEntries(sim.startedAtMs)));
  process.stdout.write(`ipsan sim-units started ${sim.agents.length}\n`);
  await new Promise<void>((resolve) => {
    const onSignal = (): void => resolve();
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
  });
  await sim.stop("shutdown");
  return 0;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`sim_units: ${errorMessage(error)}\n`);
      process.exit(error instanceof UsageError ? 2 : 1);
    },
  );
}
