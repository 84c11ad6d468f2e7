// Hosts: registration, liveness (online/offline, recorded on change), following a
// host's new address with its grants, and the NBD keys derived for it (rotation).

import type { NbdTlsMode } from "../../discovery/messages.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import type { Grants } from "../assignments/grants.ts";
import type { StationContext } from "../context.ts";
import { hostUnitKey } from "../host_keys.ts";
import { volumesOf } from "../store.ts";
import type { HostState } from "../types.ts";
import { hostState } from "../views.ts";

const log = logger("station");

/** Host `host`'s NBD key on unit `unit` (64 hex digits). */
export function hostKeyOf(ctx: StationContext, host: string, unit: string): string {
  return hostUnitKey(ctx.hostKeySecret, host, unit, ctx.store.hosts.get(host)?.keyEpoch ?? 0);
}

export class HostRegistry {
  private readonly ctx: StationContext;
  private readonly grants: Grants;
  private readonly hostStates = new Map<string, HostState>();

  constructor(ctx: StationContext, grants: Grants) {
    this.ctx = ctx;
    this.grants = grants;
    const nowMs = ctx.store.clock.nowMs();
    for (const host of ctx.store.hosts.values()) this.hostStates.set(host.name, hostState(host, nowMs, ctx.options.hostOfflineAfterMs));
  }

  hostStateOf(name: string): HostState {
    const host = this.ctx.store.hosts.get(name);
    return host === undefined ? "offline" : hostState(host, this.ctx.store.clock.nowMs(), this.ctx.options.hostOfflineAfterMs);
  }

  /**
   * Registers or updates a host (`spare`, `iqn`: given, they are recorded; iqn
   * null removes it); a changed address moves its grants along, a changed
   * iqn changes the grants of its iSCSI assignments.
   */
  async putHost(name: string, address: string, spare?: boolean, iqn?: string | null): Promise<{ created: boolean }> {
    if (iqn === null && (this.ctx.store.hosts.get(name)?.iqn ?? null) !== null) {
      const iscsi = this.ctx.store.listAssignments({ host: name }).filter((a) => a.protocol === "iscsi" && a.state !== "revoking");
      if (iscsi.length > 0) {
        throw new IpsanError(
          "CONFLICT",
          `host ${name} holds ${iscsi.length} iSCSI assignment${iscsi.length === 1 ? "" : "s"} (${iscsi.map((a) => a.id).join(", ")}) granted to its IQN: ` +
            "release them first, or give a new IQN instead of removing it (the grants follow it)",
          { field: "iqn" },
        );
      }
    }
    const { created, changed, iqnChanged } = this.ctx.store.putHost(name, address, spare, iqn);
    this.noteHostState(name);
    if (changed) await this.followHostAddress(name, address);
    else if (iqnChanged && !created) await this.followHostAddress(name, undefined);
    return { created };
  }

  heartbeat(name: string): boolean {
    const ok = this.ctx.store.touchHost(name);
    if (ok) this.noteHostState(name);
    return ok;
  }

  /** `address` undefined: the address did not change (the iqn did): only the grants are put again. */
  private async followHostAddress(name: string, address: string | undefined): Promise<void> {
    const volumes = new Set<string>();
    for (const assignment of this.ctx.store.listAssignments({ host: name })) {
      if (assignment.state === "revoking") continue;
      if (address === undefined && assignment.protocol !== "iscsi") continue;
      if (address !== undefined) this.ctx.store.updateAssignment(assignment.id, assignment.state, { hostAddress: address });
      for (const held of volumesOf(assignment)) volumes.add(JSON.stringify(held));
    }
    for (const key of volumes) {
      const [unit, volume] = JSON.parse(key) as [string, string];
      await this.grants.syncGrants(unit, volume, true).catch((error: unknown) =>
        log.limited(`grants:${unit}`, "cannot move grants to a host's new address yet; reconcile retries", {
          unit,
          volume,
          error: errorMessage(error),
        }),
      );
    }
  }

  noteHostState(name: string): void {
    const state = this.hostStateOf(name);
    const previous = this.hostStates.get(name);
    this.hostStates.set(name, state);
    if (previous !== undefined && previous !== state) this.ctx.store.recordHostState(name, state);
  }

  sweepHosts(): void {
    for (const name of this.ctx.store.hosts.keys()) this.noteHostState(name);
  }

  /** Host `host`'s NBD key on unit `unit` (64 hex digits). */
  hostKey(host: string, unit: string): string {
    return hostKeyOf(this.ctx, host, unit);
  }

  /**
   * The NBD keys host `host` needs: one per unit that holds a volume of its
   * live assignments (every leg of a mirror), with the identity to use.
   */
  hostKeys(host: string): { unit: string; identity: string; key: string; tls: NbdTlsMode | null }[] {
    const units = new Set<string>();
    for (const assignment of this.ctx.store.listAssignments({ host })) {
      if (assignment.state === "released" || assignment.state === "failed") continue;
      for (const [unit] of volumesOf(assignment)) units.add(unit);
    }
    return [...units].sort().map((unit) => ({ unit, identity: host, key: this.hostKey(host, unit), tls: this.ctx.store.units.get(unit)?.tls ?? null }));
  }

  /** `ipsan hosts rotate-key NAME`: new keys for every unit of that host; the units get them with the grants now. */
  async rotateHostKey(host: string): Promise<{ keyEpoch: number }> {
    const keyEpoch = this.ctx.store.rotateHostKey(host);
    const volumes = new Set<string>();
    for (const assignment of this.ctx.store.listAssignments({ host })) {
      if (assignment.state === "released" || assignment.state === "failed") continue;
      for (const held of volumesOf(assignment)) volumes.add(JSON.stringify(held));
    }
    for (const key of volumes) {
      const [unit, volume] = JSON.parse(key) as [string, string];
      await this.grants.syncGrants(unit, volume, true).catch((error: unknown) =>
        log.limited(`grants:${unit}`, "cannot give a unit a host's new key yet; reconcile retries", { unit, volume, host, error: errorMessage(error) }),
      );
    }
    return { keyEpoch };
  }

}
