// The iSCSI target server of a unit: accepts connections, bounds how many
// there are, maps target names to exports (names.ts), leases each session
// the export's shared LogicalUnit (reservations and unit attentions span
// sessions, src/scsi/), and the sessions by TSIH (reinstating an older
// session of the same initiator, ISID and target). Access control is the
// ExportProvider's, as for NBD.

import * as net from "node:net";
import type { BlockDevice, ExportProvider, Peer } from "../block/types.ts";
import { ByteBudget } from "../nbd/budget.ts";
import { NO_REQUIRED_DIGESTS, type RequiredDigests } from "./text.ts";
import { BufferPool } from "../nbd/buffer_pool.ts";
import { ReadArenaBudget } from "../nbd/large_reads.ts";
import { peerOf } from "../nbd/session.ts";
import type { LogicalUnit, LogicalUnitIdentity } from "../scsi/types.ts";
import { assert } from "../util/assert.ts";
import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { type AttachedUnit, type ConnectionHost, IscsiConnection } from "./connection.ts";
import { ISCSI_LIMITS_ENV, type IscsiLimits, parseIscsiLimitOverrides, resolveIscsiLimits } from "./limits.ts";
import { iscsiTargetName } from "./names.ts";

const log = logger("iscsi");

export interface IscsiTargetOptions {
  readonly provider: ExportProvider;
  /** The unit's name: the middle of every target name. */
  readonly unitName: string;
  /** Every export the unit has (whoever may open it), oldest first: the first of two that map to one target name keeps it. */
  readonly exports: () => readonly string[];
  /** NAA and serial of an export (src/scsi/identity.ts). */
  readonly identityOf: (exportName: string) => LogicalUnitIdentity;
  /**
   * The SCSI command set over a session's opened device (src/scsi/): a
   * lease on the export's shared logical unit (reservations and unit
   * attentions span sessions), released when the session ends.
   */
  readonly acquireLogicalUnit: (device: BlockDevice, identity: LogicalUnitIdentity) => LogicalUnitLease;
  /** CHAP keys by host identity; absent: CHAP is not offered. */
  readonly keyFor?: (identity: string) => Buffer | undefined;
  /** Peers must log in with CHAP (the unit's --tls require). */
  readonly chapRequired?: boolean;
  /** Digests every session must use (None refused): `ipsan unit --iscsi-require-digest`. Default none. */
  readonly requiredDigests?: RequiredDigests;
  readonly limits?: Partial<IscsiLimits>;
  /** Environment to read IPSAN_ISCSI_LIMITS from (default process.env). */
  readonly env?: Readonly<Record<string, string | undefined>>;
}

/** One session's use of a shared logical unit (the scsi side's LogicalUnitRegistry lease). */
export interface LogicalUnitLease {
  readonly lu: LogicalUnit;
  release(): void;
}

export class IscsiTarget implements ConnectionHost {
  readonly limits: IscsiLimits;
  readonly unitName: string;
  readonly budget: ByteBudget;
  /** Read buffers reused across commands (the NBD server's pool): no fresh 1 MiB to fault in per READ. */
  readonly pool = new BufferPool();
  /** Socket read arenas of all connections (IscsiLimits.readArenaBytesMax). */
  readonly readArenas: ReadArenaBudget;
  readonly chapRequired: boolean;
  readonly requiredDigests: RequiredDigests;
  readonly chapEnabled: boolean;
  readonly #options: IscsiTargetOptions;
  readonly #connections = new Set<IscsiConnection>();
  readonly #attached = new Set<IscsiConnection>();
  readonly #sessions = new Map<number, { key: string; connection: IscsiConnection }>();
  readonly #listeners: net.Server[] = [];
  #nextTsih = 1;
  #closing = false;
  #nameCache: { exports: readonly string[]; byName: Map<string, string> } | undefined;
  readonly #collisionsLogged = new Set<string>();

  constructor(options: IscsiTargetOptions) {
    this.#options = options;
    this.unitName = options.unitName;
    const fromEnv = parseIscsiLimitOverrides((options.env ?? process.env)[ISCSI_LIMITS_ENV] ?? "");
    this.limits = resolveIscsiLimits({ ...options.limits, ...fromEnv });
    this.budget = new ByteBudget(this.limits.serverBytesInFlightMax, { recentMs: this.limits.dataOutTimeoutMs });
    this.readArenas = new ReadArenaBudget(this.limits.readArenaBytesMax);
    this.chapEnabled = options.keyFor !== undefined;
    this.chapRequired = options.chapRequired === true;
    this.requiredDigests = options.requiredDigests ?? NO_REQUIRED_DIGESTS;
    assert(!this.chapRequired || this.chapEnabled, "CHAP required without keys");
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  async listen(host: string, port: number): Promise<{ host: string; port: number }> {
    assert(!this.#closing, "listen after close");
    const server = net.createServer({ noDelay: true });
    server.on("connection", (socket) => this.handleConnection(socket));
    server.on("error", (error) => log.error("listener error", { error: error.message }));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen({ host, port, exclusive: true }, () => {
        server.off("error", reject);
        resolve();
      });
    });
    this.#listeners.push(server);
    const bound = server.address();
    assert(bound !== null && typeof bound !== "string", "TCP listener without an address");
    return { host: bound.address, port: bound.port };
  }

  handleConnection(socket: net.Socket): void {
    const peer = peerOf(socket);
    if (this.#closing || this.#connections.size >= this.limits.connectionsMax) {
      log.limited("iscsi_refused", this.#closing ? "connection refused: target closing" : "connection refused: too many connections", { peer: `${peer.address}:${peer.port}`, connectionsMax: this.limits.connectionsMax });
      socket.on("error", () => undefined);
      socket.destroy();
      return;
    }
    if (this.#options.provider.admitsConnection !== undefined && !this.#options.provider.admitsConnection(peer)) {
      log.limited(`iscsi_not_admitted:${peer.address}`, "connection refused: peer is not allowed and holds no grant", { peer: `${peer.address}:${peer.port}` });
      socket.on("error", () => undefined);
      socket.destroy();
      return;
    }
    this.#connections.add(new IscsiConnection(this, socket, peer));
  }

  keyFor(identity: string): Buffer | undefined {
    return this.#options.keyFor?.(identity);
  }

  /** Target name → export, the oldest export keeping a name two exports map to. */
  #names(): Map<string, string> {
    const exports = this.#options.exports();
    if (this.#nameCache !== undefined && this.#nameCache.exports === exports) return this.#nameCache.byName;
    const byName = new Map<string, string>();
    for (const exportName of exports) {
      const name = iscsiTargetName(this.unitName, exportName);
      const holder = byName.get(name);
      if (holder !== undefined) {
        const key = `${name} ${exportName}`;
        if (!this.#collisionsLogged.has(key)) {
          this.#collisionsLogged.add(key);
          log.warn("two exports map to one iSCSI target name: the older one keeps it, this one is not served over iSCSI (rename it)", { target: name, served: holder, notServed: exportName });
        }
        continue;
      }
      byName.set(name, exportName);
    }
    this.#nameCache = { exports, byName };
    return byName;
  }

  exportOf(targetName: string): string | undefined {
    return this.#names().get(targetName.toLowerCase());
  }

  targetsFor(peer: Peer): readonly string[] {
    const visible = new Set(this.#options.provider.list(peer).map((summary) => summary.name));
    const out: string[] = [];
    for (const [name, exportName] of this.#names()) if (visible.has(exportName)) out.push(name);
    return out;
  }

  async attach(exportName: string, peer: Peer, connection: IscsiConnection): Promise<AttachedUnit> {
    const device = await this.#options.provider.open(exportName, peer);
    let lease: LogicalUnitLease;
    try {
      lease = this.#options.acquireLogicalUnit(device, this.#options.identityOf(exportName));
    } catch (error) {
      // Not served (saved reservations that cannot be read): the device goes, the login fails with the reason.
      log.error("a logical unit cannot be served", { export: exportName, error: errorMessage(error) });
      await device.close().catch(() => undefined);
      throw error;
    }
    this.#attached.add(connection);
    return { device, unit: lease.lu, release: lease.release };
  }

  detach(attached: AttachedUnit, connection: IscsiConnection): void {
    this.#attached.delete(connection);
    attached.release();
    void attached.device.close().catch((error: unknown) => log.warn("closing a device failed", { export: attached.device.name, error: errorMessage(error) }));
  }

  registerSession(connection: IscsiConnection, key: string): number {
    for (const [tsih, session] of this.#sessions) {
      if (session.key === key && session.connection !== connection) {
        // Session reinstatement (RFC 7143 section 6.3.5): the new login replaces the old session.
        this.#sessions.delete(tsih);
        session.connection.close("session reinstated by a new login of the same initiator and ISID");
      }
    }
    let tsih = this.#nextTsih;
    for (let tries = 0; tries < 0x1_0000 && this.#sessions.has(tsih); tries += 1) tsih = tsih >= 0xffff ? 1 : tsih + 1;
    this.#nextTsih = tsih >= 0xffff ? 1 : tsih + 1;
    this.#sessions.set(tsih, { key, connection });
    return tsih;
  }

  sessionExists(tsih: number): boolean {
    return this.#sessions.has(tsih);
  }

  connectionEnded(connection: IscsiConnection): void {
    this.#connections.delete(connection);
    const tsih = connection.tsih;
    if (tsih !== 0 && this.#sessions.get(tsih)?.connection === connection) this.#sessions.delete(tsih);
  }

  /** Stops accepting and drops every connection at once: commands in flight get no answer, and ERL 0 initiators retry them on their next session. */
  async close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    const closed = this.#listeners.map((server) => new Promise<void>((resolve) => server.close(() => resolve())));
    for (const connection of [...this.#connections]) connection.close("target shutting down");
    await Promise.all(closed);
  }
}
