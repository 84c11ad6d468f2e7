// The unit's ExportProvider: what the NBD server serves from. Access control
// lives here (contracts.md):
// - a volume WITH grants is listed and opened only by peers matching a grant;
// - a volume without grants is served to peers matching --allow (default
//   loopback), except when the unit is joined to a station, where it is served
//   to nobody (the station hands volumes out by granting them).
// Peers on a Unix socket count as matching --allow (file permissions guard
// the socket) and match no grant. IPv4-mapped IPv6 peers ("::ffff:10.0.0.1")
// match IPv4 CIDRs.

import type { BlockDevice, ExportProvider, ExportSummary, Peer } from "../block/types.ts";
import { IpsanError } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { type Cidr, anyContains, loopbackCidrs, parseCidr } from "./cidr.ts";
import type { VolumeRecord } from "./table.ts";
import { type VolumeManager, parseExportName, partitionName } from "./volumes.ts";

function fromContains(from: readonly string[], address: string): boolean {
  return from.some((text) => {
    const parsed = parseCidr(text);
    return parsed.ok && anyContains([parsed.cidr], address);
  });
}

export const UNIX_PEER_ADDRESS = "unix";

const log = logger("access");

/**
 * Refused attempts since the unit started (GET /v1/info `refused`): a peer
 * that holds no grant connecting (or, over TLS, offering a PSK identity the
 * unit has no key for: a host whose grants here were all revoked), and a
 * peer opening an export not granted to it. A fenced host that wakes up
 * (docs/adr/0010) shows here.
 */
export interface RefusalCounts {
  connections: number;
  opens: number;
}
export interface AccessOptions {
  /** --allow CIDRs; default loopback. */
  readonly allow?: readonly Cidr[];
  /** --allow id:NAME: TLS-PSK identities (from --tls-psk) served the volumes without grants. */
  readonly allowIdentities?: readonly string[];
  /** The NBD server offers STARTTLS: peers may yet prove an identity, so identity grants admit connections. */
  readonly tls?: boolean;
  /** True when joined to a station (--station): volumes without grants are served to nobody. */
  readonly joined?: () => boolean;
}

export class UnitExportProvider implements ExportProvider {
  readonly #manager: VolumeManager;
  readonly #allow: readonly Cidr[];
  readonly #joined: () => boolean;
  readonly #allowIdentities: ReadonlySet<string>;
  readonly #tls: boolean;
  readonly refused: RefusalCounts = { connections: 0, opens: 0 };

  constructor(manager: VolumeManager, options: AccessOptions = {}) {
    this.#manager = manager;
    this.#allow = options.allow ?? loopbackCidrs();
    this.#joined = options.joined ?? (() => false);
    this.#allowIdentities = new Set(options.allowIdentities ?? []);
    this.#tls = options.tls ?? false;
  }

  get defaultExport(): string | undefined {
    return undefined;
  }

  /**
   * True if `peer` may open export `partition` of `volume` (undefined: the
   * whole volume). An address grant admits the volume and its partitions to
   * that address. An identity grant admits a peer that proved the host's
   * identity over TLS with the key the grant was made with (keyId), from an
   * address in `from` when that is given: the volume and its partitions, or
   * one partition only. An identity grant that names an initiator (`iqn`,
   * iSCSI) admits only a peer that logged in with that InitiatorName; NBD
   * peers have none, so such a grant admits no NBD peer.
   */
  admits(volume: VolumeRecord, partition: number | undefined, peer: Peer): boolean {
    if (volume.grants.length > 0 || volume.access.length > 0) {
      const unix = peer.address === UNIX_PEER_ADDRESS;
      const byAddress =
        !unix &&
        volume.grants.some((grant) => {
          const parsed = parseCidr(grant);
          return parsed.ok && anyContains([parsed.cidr], peer.address);
        });
      if (byAddress) return true;
      if (peer.identity === undefined) return false;
      return volume.access.some(
        (a) =>
          a.host === peer.identity &&
          a.keyId === peer.keyId &&
          (a.partition === undefined || a.partition === partition) &&
          (a.from.length === 0 || (!unix && fromContains(a.from, peer.address))) &&
          (a.iqn === undefined || a.iqn === peer.initiator),
      );
    }
    if (this.#joined()) return false;
    if (peer.identity !== undefined && this.#allowIdentities.has(peer.identity)) return true;
    return peer.address === UNIX_PEER_ADDRESS || anyContains(this.#allow, peer.address);
  }

  /** True if `peer` may open `volume` itself or one of its partitions (to let it connect at all). */
  #mayOpenSomething(volume: VolumeRecord, peer: Peer): boolean {
    if (this.admits(volume, undefined, peer)) return true;
    // Before TLS nobody has an identity: an identity grant lets through any address it could come from.
    return this.#tls && volume.access.some((a) => a.from.length === 0 || fromContains(a.from, peer.address));
  }

  /** True if the peer may connect at all: it matches --allow, an --allow id: (with TLS), or some volume's grant. */
  admitsConnection(peer: Peer): boolean {
    if (peer.address === UNIX_PEER_ADDRESS || anyContains(this.#allow, peer.address)) return true;
    if (this.#tls && this.#allowIdentities.size > 0) return true;
    if (this.#manager.table.volumes.some((v) => (v.grants.length > 0 || v.access.length > 0) && this.#mayOpenSomething(v, peer))) return true;
    this.refused.connections += 1;
    // The NBD server logs the refusal itself (rate-limited per address); the count is here.
    return false;
  }

  /** A TLS handshake offered an identity without a key here (the NBD server logs it): counted as a refused connection. */
  identityRefused(): void {
    this.refused.connections += 1;
  }

  list(peer: Peer): readonly ExportSummary[] {
    const out: ExportSummary[] = [];
    for (const volume of this.#manager.table.volumes) {
      if (this.admits(volume, undefined, peer)) {
        out.push({ name: volume.name, description: `volume ${volume.name} (number ${volume.number}, ${volume.sizeBytes} bytes)` });
      }
      volume.partitions.forEach((p, i) => {
        if (!this.admits(volume, i + 1, peer)) return;
        out.push({ name: partitionName(volume.name, i + 1), description: `partition ${i + 1} of volume ${volume.name} (${p.lengthLba * 512} bytes)` });
      });
    }
    return out;
  }

  async open(name: string, peer: Peer): Promise<BlockDevice> {
    // The manager asks `admits` against the table it opens from, and again at every change of the volume.
    try {
      const partition = parseExportName(name)?.partition;
      return await this.#manager.openDevice(name, (volume) => this.admits(volume, partition, peer));
    } catch (error) {
      if (error instanceof IpsanError && error.code === "PERMISSION_DENIED") {
        this.refused.opens += 1;
        log.limited(`open_refused:${peer.address}`, "open refused: export not granted to this peer", {
          peer: `${peer.address}:${peer.port}`,
          export: name,
          identity: peer.identity ?? "(plaintext)",
          refusedOpens: this.refused.opens,
        });
        // What the client reads (NBD_REP_ERR_POLICY's message): which peer, as the unit saw it, was refused (issue 9 item 7).
        const who = peer.identity === undefined || peer.identity === null ? `${peer.address} (no TLS identity)` : `${peer.address} (identity ${peer.identity})`;
        throw new IpsanError("PERMISSION_DENIED", `${error.message.replace(/ to this peer$/, "")} to peer ${who}`, { cause: error });
      }
      throw error;
    }
  }
}
