// Grants: what each volume should grant (from the live assignments in the store)
// and the one path that puts them on a unit (under the volume's lock, the whole
// desired list at once).

import { identityGrant } from "../../discovery/messages.ts";
import { parseCidr } from "../../unit/cidr.ts";
import type { StationContext } from "../context.ts";
import { isFencing } from "../host_failover.ts";
import type { UnitPool } from "../pool/unit_pool.ts";

/** A grant as the station stores it (an address grant in its canonical CIDR text). */
export function canonicalGrant(address: string): string {
  const parsed = parseCidr(address);
  return parsed.ok ? parsed.cidr.text : address;
}

export function sameSet(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false;
  const set = new Set(a);
  return b.every((x) => set.has(x));
}

export class Grants {
  private readonly ctx: StationContext;
  private readonly pool: UnitPool;

  constructor(ctx: StationContext, pool: UnitPool) {
    this.ctx = ctx;
    this.pool = pool;
  }

  /**
   * Grants a volume should carry, for the hosts of its live, not-being-revoked
   * assignments: on a unit that speaks TLS (or is not known not to), a grant by
   * host identity for exactly the export assigned ("id:HOST@VOL" or
   * "id:HOST@VOL/pN"; the host proves it with its key; an iSCSI assignment's
   * grant names the host's IQN too, "id:HOST@VOL#IQN"); on a unit started
   * with --insecure-plaintext, the host's address (which admits the whole
   * volume: such a unit cannot tell hosts apart any better).
   */
  desiredGrants(unit: string, volume: string): string[] {
    const byIdentity = this.ctx.store.units.get(unit)?.tls !== "off";
    const out: string[] = [];
    for (const a of this.ctx.store.liveOnVolume(unit, volume)) {
      if (a.state === "active" || (a.state === "pending" && a.error === null)) {
        // A host failover fencing the old host: neither it nor the new host is granted until every unit confirmed.
        if (isFencing(a)) continue;
        // iSCSI: the grant also names the host's initiator (the unit admits only that IQN's logins).
        const iqn = a.protocol === "iscsi" ? (this.ctx.store.hosts.get(a.host)?.iqn ?? undefined) : undefined;
        const grant = byIdentity
          ? identityGrant(a.host, a.partition === null ? volume : `${volume}/p${a.partition}`, [], iqn)
          : canonicalGrant(a.hostAddress);
        if (!out.includes(grant)) out.push(grant);
      }
    }
    return out.sort();
  }

  /** Makes the unit's grants of one volume equal the desired ones (skipped when already equal, unless forced). */
  syncGrants(unit: string, volume: string, force: boolean): Promise<void> {
    return this.ctx.locks.run(`volume:${unit}/${volume}`, async () => {
      const desired = this.desiredGrants(unit, volume);
      const observed = this.ctx.store.volume(unit, volume)?.grants ?? null;
      if (!force && observed !== null && sameSet(observed, desired)) return;
      const updated = await this.pool.clientFor(unit).setGrants(volume, desired);
      this.ctx.store.putVolume({ unit, ...updated, grants: updated.grants.map(canonicalGrant) }, "grants");
    });
  }
}
