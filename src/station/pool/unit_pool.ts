// The unit pool: units' storage reports (discovery or the control API) queued and
// written in one transaction per event-loop turn, background re-reads, each unit's
// control client, carve refusals ("no space" answers held for REFUSAL_HOLD_MS) and
// the pool as the allocator sees it.

import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { controlTokenFor } from "../../discovery/keys.ts";
import type { StorageInfo } from "../../discovery/messages.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { carveBytes, compareFreeVolumes, type AllocatorUnit, type AllocatorVolume } from "../allocator.ts";
import { canonicalGrant } from "../assignments/grants.ts";
import type { StationContext } from "../context.ts";
import { hostKeyOf } from "../hosts/host_registry.ts";
import type { UnitChange } from "../store.ts";
import type { UnitReport, UnitState } from "../types.ts";
import { UnitClient } from "../unit_client.ts";
import { reachableNbd } from "../views.ts";

const log = logger("station");

/**
 * A unit's report that comes by discovery was snapshotted at most this long
 * before the station applies it (the unit sends within 20 ms of a change;
 * retransmissions back off up to 4 s). Only used to decide that a carve the
 * unit answered and a later report does not list did not happen.
 */
export const REPORT_LAG_MS = 5_000;
/**
 * A unit that answered "no space" to a carve of R bytes is not asked for R or
 * more again until a report shows it has more free space than when it refused
 * (a volume was deleted) or this long has passed.
 */
export const REFUSAL_HOLD_MS = 60_000;
/** DNS names are resolved with this bound. */
export const DNS_LOOKUP_TIMEOUT_MS = 2_000;
export const DNS_CACHE_MS = 60_000;
export const DNS_CACHE_ENTRIES_MAX = 4096;

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]);
}

export class UnitPool {
  private readonly ctx: StationContext;
  /** Called with the online units whose volumes, address or state a write changed (their grants want a check). */
  private readonly onUnitsChanged: (units: string[]) => void;
  private readonly clients = new Map<string, UnitClient>();
  private readonly dnsCache = new Map<string, { addresses: string[]; atMs: number }>();
  private readonly unitQueue = new Map<string, UnitChange>();
  private unitFlushScheduled = false;
  /** Units that answered "no space" to a carve of `bytes`, with the free space they reported then (see REFUSAL_HOLD_MS). */
  private readonly refusedCarves = new Map<string, { bytes: number; atMs: number; freeBytes: number }>();
  /** When the latest queued report of each unit was snapshotted at the latest (see REPORT_LAG_MS). */
  private readonly reportObservedAtMs = new Map<string, number>();
  /** When a discovery report of each unit was last queued: an older control-API read is not applied over it. */
  private readonly discoveryReportAtMs = new Map<string, number>();
  /** Order of storage reports per unit as they arrive (before DNS resolution may reorder them). */
  private readonly reportSeq = new Map<string, { issued: number; queued: number }>();
  /**
   * The highest volume-table generation seen of each unit (its reports, its control answers):
   * a report older than it was taken before a change the station already stored, and is dropped.
   */
  private readonly tableGenerations = new Map<string, number>();
  /** Units whose info is being re-read in the background (true: read once more after). */
  private readonly refreshing = new Map<string, boolean>();
  /** Units whose GET /v1/info was read since they were last seen coming online (its iSCSI portal is not in discovery packets). */
  private readonly infoReadSinceOnline = new Set<string>();

  constructor(ctx: StationContext, onUnitsChanged: (units: string[]) => void) {
    this.ctx = ctx;
    this.onUnitsChanged = onUnitsChanged;
  }

  clientFor(unitName: string): UnitClient {
    const unit = this.ctx.store.units.get(unitName);
    if (unit === undefined) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(unitName)} not found`, { field: "unit" });
    if (unit.control === null) {
      throw new IpsanError("CONFLICT", `unit ${unitName} has no control API (it reported none): cannot change its volumes`, { field: "unit" });
    }
    const control = reachableNbd(unit.control, unit.addresses) ?? unit.control;
    // An enrolled unit accepts only the token of its own secret; others (units before issue 7) the cluster key's.
    const token = this.ctx.options.unitIdentities?.identities.controlToken(unitName) ?? controlTokenFor(this.ctx.options.clusterKey, unitName);
    const key = `${unitName}@${control.host}:${control.port}#${token.slice(0, 16)}`;
    let client = this.clients.get(key);
    if (client === undefined) {
      for (const old of this.clients.keys()) if (old.startsWith(`${unitName}@`)) this.clients.delete(old);
      client = new UnitClient({
        unit: unitName,
        control,
        token,
        ...(this.ctx.options.unitCallTimeoutMs === undefined ? {} : { timeoutMs: this.ctx.options.unitCallTimeoutMs }),
        onCall: (result) => this.ctx.metrics.unitCalls.inc(result),
        onTableGeneration: (generation) => this.noteTableGeneration(unitName, generation),
        keyFor: (host) => hostKeyOf(this.ctx, host, unitName),
        tlsMode: () => this.ctx.store.units.get(unitName)?.tls ?? null,
      });
      this.clients.set(key, client);
    }
    return client;
  }

  private async resolve(name: string): Promise<string[]> {
    if (isIP(name) !== 0) return [name];
    const cached = this.dnsCache.get(name);
    const nowMs = this.ctx.store.clock.nowMs();
    if (cached !== undefined && nowMs - cached.atMs < DNS_CACHE_MS) return cached.addresses;
    try {
      const results = await withTimeout(lookup(name, { all: true }), DNS_LOOKUP_TIMEOUT_MS, `resolve ${name}`);
      const addresses = results.map((r) => r.address);
      if (this.dnsCache.size >= DNS_CACHE_ENTRIES_MAX) this.dnsCache.clear();
      this.dnsCache.set(name, { addresses, atMs: nowMs });
      return addresses;
    } catch (error) {
      log.limited(`dns:${name}`, "cannot resolve a unit's DNS name", { name, error: errorMessage(error) });
      return cached?.addresses ?? [];
    }
  }

  /** Records a table generation the unit answered or reported (only ever rises, until the unit starts anew). */
  noteTableGeneration(unit: string, generation: number): void {
    if (generation > (this.tableGenerations.get(unit) ?? 0)) this.tableGenerations.set(unit, generation);
  }

  /**
   * The unit (re)started: it may run on other storage now, whose generations
   * start anew, so what was seen before no longer orders its reports.
   */
  unitStarted(unit: string): void {
    this.tableGenerations.delete(unit);
  }

  /** True if this report was taken before a table generation already seen (a change since then is stored). */
  private staleReport(unit: string, generation: number | undefined): boolean {
    return generation !== undefined && generation < (this.tableGenerations.get(unit) ?? 0);
  }

  /**
   * A unit's storage info (discovery, or its control API): the unit is the truth
   * for its volumes. Queued and written with everything else discovery said in
   * the same event-loop turn (one transaction); `immediate` writes it now.
   */
  async applyStorageInfo(
    info: StorageInfo,
    fromHost: string | null,
    state: UnitState = "online",
    immediate = false,
    /** When the unit's answer was asked for (a control-API read); omitted for discovery reports. */
    requestedAtMs?: number,
  ): Promise<void> {
    const seq = this.reportSeq.get(info.name) ?? { issued: 0, queued: 0 };
    this.reportSeq.set(info.name, seq);
    const mine = ++seq.issued;
    const addresses: string[] = [];
    const add = (address: string | null | undefined): void => {
      if (address && isIP(address) !== 0 && !addresses.includes(address) && address !== "0.0.0.0" && address !== "::") addresses.push(address);
    };
    if (info.dnsName !== null) for (const address of await this.resolve(info.dnsName)) add(address);
    add(fromHost);
    add(info.nbd.host);
    const report: UnitReport = {
      name: info.name,
      dnsName: info.dnsName,
      addresses,
      nbd: info.nbd,
      control: info.control,
      capacityBytes: info.capacityBytes,
      freeBytes: info.freeBytes,
      volumes: info.volumes.map((v) => {
        const grants = v.grants.map(canonicalGrant);
        // A discovery packet carries address grants only (identity grants would grow it toward its
        // limit): the identity grants the unit confirmed over its control API are kept.
        if (requestedAtMs === undefined) for (const held of this.ctx.store.volume(info.name, v.name)?.grants ?? []) if (held.startsWith("id:") && !grants.includes(held)) grants.push(held);
        return grants.length === 0 ? v : { ...v, grants };
      }),
      // A discovery packet without them (a unit from before spares and zones): not spare, no zone.
      spare: info.spare ?? false,
      zone: info.zone ?? null,
      // Absent (a unit from before TLS): keep what the station knew.
      ...(info.tls === undefined ? {} : { tls: info.tls }),
      ...(info.tableGeneration === undefined ? {} : { tableGeneration: info.tableGeneration }),
      // Absent (a discovery packet, a unit from before iSCSI): keep what the station knew.
      ...(info.iscsi === undefined ? {} : { iscsi: info.iscsi }),
    };
    // A report that arrived earlier but finished resolving later is older than what is queued: drop it.
    if (mine < seq.queued) return;
    // A report taken before a table change the station has seen (and may have stored) would undo it: drop it.
    if (this.staleReport(info.name, info.tableGeneration)) {
      log.debug("dropped a unit's report older than its table generation already seen", {
        unit: info.name,
        generation: info.tableGeneration,
        seen: this.tableGenerations.get(info.name),
      });
      return;
    }
    if (info.tableGeneration !== undefined) this.noteTableGeneration(info.name, info.tableGeneration);
    seq.queued = mine;
    const nowMs = this.ctx.store.clock.nowMs();
    if (requestedAtMs === undefined) this.discoveryReportAtMs.set(info.name, nowMs);
    this.reportObservedAtMs.set(info.name, requestedAtMs ?? nowMs - REPORT_LAG_MS);
    this.queueUnitChange(info.name, { report, state });
    if (immediate) this.flushUnitChanges();
  }

  setUnitState(name: string, state: UnitState): void {
    this.queueUnitChange(name, { state });
  }

  private queueUnitChange(name: string, change: UnitChange): void {
    const previous = this.unitQueue.get(name);
    // The latest report wins; the latest state wins (a report carries the state at its time).
    const report = change.report ?? previous?.report;
    const state = change.state ?? previous?.state;
    this.unitQueue.set(name, { ...(report === undefined ? {} : { report }), ...(state === undefined ? {} : { state }) });
    if (this.unitFlushScheduled) return;
    this.unitFlushScheduled = true;
    setImmediate(() => this.flushUnitChanges());
  }

  private flushUnitChanges(): void {
    this.unitFlushScheduled = false;
    if (this.unitQueue.size === 0) return;
    const changes = new Map(this.unitQueue);
    this.unitQueue.clear();
    // A control answer may have shown a newer table since the report was queued (and its change been stored).
    for (const [name, change] of changes) {
      if (change.report === undefined || !this.staleReport(name, change.report.tableGeneration)) continue;
      const { report: _stale, ...rest } = change;
      changes.set(name, rest);
    }
    try {
      // A unit whose volumes, address or state changed gets its grants checked (its return may also
      // let pending and revoking assignments finish: every pass looks at those).
      const { unitsChanged } = this.ctx.store.applyUnitChanges(changes);
      for (const [name, change] of changes) {
        if (change.report === undefined) continue;
        // The report is one snapshot: carves it lists are in its free space now.
        const sizes = new Map(change.report.volumes.map((v) => [v.name, v.sizeBytes]));
        this.ctx.carves.noteReport(name, sizes, this.reportObservedAtMs.get(name) ?? this.ctx.store.clock.nowMs() - REPORT_LAG_MS);
        // A refusal holds while the unit has no more free space than when it refused.
        const refusal = this.refusedCarves.get(name);
        if (refusal !== undefined) {
          if (change.report.freeBytes > refusal.freeBytes || this.ctx.store.clock.nowMs() - refusal.atMs > REFUSAL_HOLD_MS) this.refusedCarves.delete(name);
          else refusal.freeBytes = change.report.freeBytes;
        }
      }
      // A unit that joined (or came back online) has its info read once: the discovery packet
      // does not say everything GET /v1/info does (its iSCSI portal).
      for (const [name] of changes) {
        const unit = this.ctx.store.units.get(name);
        if (unit === undefined || unit.control === null || unit.state !== "online") this.infoReadSinceOnline.delete(name);
        else if (!this.infoReadSinceOnline.has(name)) {
          this.infoReadSinceOnline.add(name);
          this.refreshQuietly(name);
        }
      }
      const dirty = unitsChanged.filter((name) => this.ctx.store.units.get(name)?.state === "online");
      if (dirty.length > 0) this.onUnitsChanged(dirty);
    } catch (error) {
      log.error("cannot store what discovery reported", { units: changes.size, error: errorMessage(error) });
    }
  }

  /**
   * Reads the unit's info through its control API and applies it, unless a
   * discovery report came in meanwhile (that one may be newer: the read is
   * dropped rather than put an older free space over it).
   */
  async refreshUnit(name: string): Promise<void> {
    const requestedAtMs = this.ctx.store.clock.nowMs();
    const info = await this.clientFor(name).info();
    if ((this.discoveryReportAtMs.get(name) ?? -Infinity) >= requestedAtMs) {
      // Discovery does not carry the iSCSI portal: that part of the read is kept.
      if (info.iscsi !== undefined) this.ctx.store.setUnitIscsi(name, info.iscsi);
      return;
    }
    const unit = this.ctx.store.units.get(name);
    const state = unit?.state ?? "online";
    // GET /v1/info does not repeat the unit's own control address or DNS name: keep what discovery said.
    await this.applyStorageInfo(
      {
        ...info,
        control: info.control ?? unit?.control ?? null,
        dnsName: info.dnsName ?? unit?.dnsName ?? null,
        spare: info.spare ?? unit?.spare ?? false,
        zone: info.zone !== undefined ? info.zone : (unit?.zone ?? null),
      },
      null,
      state === "unknown" ? "online" : state,
      true,
      requestedAtMs,
    );
  }

  /** Re-reads a unit's info in the background; asked again while a read is under way, one more read follows it. */
  refreshQuietly(name: string): void {
    if (this.refreshing.has(name)) {
      this.refreshing.set(name, true);
      return;
    }
    this.refreshing.set(name, false);
    void this.refreshUnit(name)
      .catch((error: unknown) => log.limited(`refresh:${name}`, "cannot refresh unit info", { unit: name, error: errorMessage(error) }))
      .finally(() => {
        const again = this.refreshing.get(name) === true;
        this.refreshing.delete(name);
        if (again && !this.ctx.stopped) this.refreshQuietly(name);
      });
  }

  /** A unit's free space as placement sees it: what it last reported minus the carves started there since. */
  usableFreeBytes(name: string): number {
    const unit = this.ctx.store.units.get(name);
    return unit === undefined ? 0 : Math.max(0, unit.freeBytes - this.ctx.carves.reservedBytes(name));
  }

  /** Each unit's free volumes sorted by size, rebuilt only when the unit's volumes or assignments changed. */
  private readonly freeVolumeCache = new Map<string, { version: number; volumes: AllocatorVolume[] }>();

  private freeVolumesOf(unit: string): AllocatorVolume[] {
    const version = this.ctx.store.unitVersion(unit);
    const cached = this.freeVolumeCache.get(unit);
    if (cached !== undefined && cached.version === version) return cached.volumes;
    const volumes: AllocatorVolume[] = [];
    for (const v of this.ctx.store.unitVolumes(unit).values()) {
      if (v.partitions.length === 0 && !this.ctx.store.isVolumeAssigned(unit, v.name)) volumes.push({ name: v.name, sizeBytes: v.sizeBytes });
    }
    volumes.sort(compareFreeVolumes);
    if (this.freeVolumeCache.size > this.ctx.store.units.size + 64) this.freeVolumeCache.clear();
    this.freeVolumeCache.set(unit, { version, volumes });
    return volumes;
  }

  private refusalOf(unit: string): number | null {
    const refusal = this.refusedCarves.get(unit);
    if (refusal === undefined) return null;
    if (this.ctx.store.clock.nowMs() - refusal.atMs <= REFUSAL_HOLD_MS) return refusal.bytes;
    this.refusedCarves.delete(unit);
    return null;
  }

  /** The pool as the allocator sees it (also replacement.ts's placement). */
  allocatorUnits(): AllocatorUnit[] {
    const units: AllocatorUnit[] = [];
    for (const unit of this.ctx.store.units.values()) {
      const eligible = unit.state === "online" && unit.control !== null;
      const volumes = this.ctx.store.unitVolumes(unit.name);
      let volumeCount = volumes.size;
      for (const carve of this.ctx.carves.entries(unit.name)) if (!volumes.has(carve.volume)) volumeCount++;
      units.push({
        name: unit.name,
        state: unit.state,
        hasControl: unit.control !== null,
        freeBytes: unit.freeBytes,
        reservedBytes: this.ctx.carves.reservedBytes(unit.name),
        volumeCount,
        volumesMax: unit.volumesMax,
        freeVolumes: eligible ? this.freeVolumesOf(unit.name) : [],
        refusedCarveBytes: this.refusalOf(unit.name),
        zone: unit.zone ?? null,
        spare: unit.spare === true,
      });
    }
    return units;
  }


  /**
   * A unit said "no space" to a carve: the free space the station has for it
   * is stale-high (or too fragmented to use). No carve that large goes there
   * until it reports more free space (REFUSAL_HOLD_MS); its info is re-read now.
   */
  noteNoSpace(unit: string, sizeBytes: number): void {
    const bytes = carveBytes(sizeBytes);
    const previous = this.refusedCarves.get(unit);
    const freeBytes = this.ctx.store.units.get(unit)?.freeBytes ?? 0;
    this.refusedCarves.set(unit, { bytes: Math.min(bytes, previous?.bytes ?? bytes), atMs: this.ctx.store.clock.nowMs(), freeBytes: Math.min(freeBytes, previous?.freeBytes ?? freeBytes) });
    this.refreshQuietly(unit);
  }
}
