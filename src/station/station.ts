// The station core: the operations behind the REST API and the reconcile loop
// (Longhorn style). The database holds the desired state (assignments, and
// through them which host address each volume grants); handlers record intent
// first, then tell the unit, then record the outcome; `reconcile` finishes or
// undoes whatever a failure or a kill -9 left in between, idempotently.
//
// Concurrency: better-sqlite3 is synchronous, so "choose a placement, record
// it pending and count its carve against the unit" runs without an await in
// between and two requests can never take the same volume or the same free
// space. A carve stays counted (CarveLedger, carves.ts) until the unit's own
// report shows it; a unit that answers "no space" is a refusal: the next unit
// is tried, and 507 comes only when no unit can hold the request. Work on one
// assignment is serialized by a per-assignment lock, and grant updates of one
// volume by a per-volume lock (each PUT of grants sends the whole desired list
// computed inside the lock).

import { randomBytes } from "node:crypto";
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import type { UnitIdentities, UnitIdentity } from "../discovery/identities.ts";
import { controlTokenFor } from "../discovery/keys.ts";
import { type NbdTlsMode, type StorageInfo, type VolumeInfo, identityGrant } from "../discovery/messages.ts";
import { parseCidr } from "../unit/cidr.ts";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { formatSize } from "../util/size.ts";
import {
  allocate,
  carveBytes,
  placeLegs,
  compareFreeVolumes,
  type AllocatorUnit,
  type AllocatorVolume,
  type Placement,
  type UnitReason,
} from "./allocator.ts";
import { CarveLedger } from "./carves.ts";
import { type HostKeySecret, hostKeySecretFrom, hostUnitKey } from "./host_keys.ts";
import { HOST_FAILOVER_AFTER_MS_DEFAULT, HostFailover, failoverCheckIntervalMs, isFencing } from "./host_failover.ts";
import type { StationMetrics } from "./metrics.ts";
import { newAssignmentId, volumesOf, type StationStore, type UnitChange } from "./store.ts";
import type { AssignmentDetail, AssignmentRecord, HostState, LegRecord, UnitReport, UnitState, VolumeRecord } from "./types.ts";
import { UnitCallError, UnitClient } from "./unit_client.ts";
import { SECTOR_BYTES, assignedExtents, hostState, mapRange, reachableNbd } from "./views.ts";

const log = logger("station");

export { CARVE_ALIGNMENT_BYTES } from "./allocator.ts";
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
/**
 * Each leg of a mirror is this much larger than the mirror: the host's mirror
 * engine keeps the mirror's metadata in a leg's last MiB (METADATA_BYTES in
 * src/host/engine/metadata.ts; a test checks they agree).
 */
export const MIRROR_METADATA_BYTES = 1024 * 1024;
/** Copies an allocation may ask for (legs on as many distinct units). */
export const COPIES_MAX = 3;

/** The size of each leg of a mirror of `sizeBytes`. */
export function legBytesOf(sizeBytes: number): number {
  return sizeBytes + MIRROR_METADATA_BYTES;
}

/** The carve ledger's key for one leg of a mirrored assignment (a single copy uses the assignment id). */
export function legCarveId(assignmentId: string, index: number): string {
  return `${assignmentId}/leg${index}`;
}

/** DNS names are resolved with this bound. */
export const DNS_LOOKUP_TIMEOUT_MS = 2_000;
export const DNS_CACHE_MS = 60_000;
export const DNS_CACHE_ENTRIES_MAX = 4096;
/** Reports within this long share one reconcile pass. */
export const RECONCILE_DEBOUNCE_MS = 50;
/** A reconcile pass yields to the event loop after this many volumes. */
export const RECONCILE_YIELD_EVERY = 2_000;

export interface StationOptions {
  readonly clusterKey: Buffer;
  /** A pending assignment older than this that cannot be finished is undone. */
  readonly pendingDeadlineMs: number;
  readonly reconcileIntervalMs: number;
  readonly hostOfflineAfterMs: number;
  readonly unitCallTimeoutMs?: number;
  /** A host silent this long has its assignments moved to a spare host (host_failover.ts). */
  readonly hostFailoverAfterMs?: number;
  /** What hosts' NBD keys are derived from (host_keys.ts); default: a random one for this process only. */
  readonly hostKeySecret?: HostKeySecret;
  /**
   * Enrolled units (issue 7): their control API is called with the token of
   * their own secret; `rotate` starts a rotation (the discovery listener
   * delivers the next secret). Without it every unit gets the cluster-key token.
   */
  readonly unitIdentities?: { readonly identities: UnitIdentities; rotate(unit: string): UnitIdentity | undefined };
}

export const DEFAULT_STATION_OPTIONS = {
  pendingDeadlineMs: 30_000,
  reconcileIntervalMs: 10_000,
  hostOfflineAfterMs: 30_000,
} as const;

/** Serializes async work per key; keys are dropped when idle. */
class KeyedMutex {
  private readonly tails = new Map<string, Promise<unknown>>();
  run<T>(key: string, body: () => Promise<T>): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    const next = previous.then(body, body);
    const tail = next.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return next;
  }
}

export interface AllocationInput {
  readonly requestId: string;
  readonly host: string;
  readonly sizeBytes: number;
  readonly address?: string;
  readonly dryRun?: boolean;
  /** 1 (default): one volume. 2..COPIES_MAX: a mirror, one leg per distinct unit. */
  readonly copies?: number;
}

export interface AssignInput {
  readonly host: string;
  readonly unit: string;
  readonly volume: string;
  readonly partition?: number;
  readonly requestId?: string;
}

export type AllocationAnswer =
  | { readonly kind: "assignment"; readonly status: 200 | 201; readonly assignment: AssignmentRecord }
  | {
      readonly kind: "dry_run";
      readonly placement: Placement;
      readonly reasons: readonly UnitReason[];
      /** For copies > 1: every leg's placement (`placement` is the first). */
      readonly legs?: readonly Placement[];
      readonly copies?: number;
    };

export class NoSpaceError extends IpsanError {
  readonly reasons: readonly UnitReason[];
  constructor(message: string, reasons: readonly UnitReason[]) {
    super("NO_SPACE", message);
    this.reasons = reasons;
  }
}

/** The unit refused to create a volume (no space, volume limit, bad name): it made nothing. */
function isCarveRefusal(error: unknown): error is UnitCallError {
  return error instanceof UnitCallError && error.failure === "refused" && error.call === "POST /v1/volumes";
}

/** The values of settled promises, or the most telling failure: a carve refusal, then a final one, then a transient one. */
function settledValues<T>(results: readonly PromiseSettledResult<T>[]): T[] {
  const failures = results.flatMap((r) => (r.status === "rejected" ? [r.reason as unknown] : []));
  if (failures.length > 0) {
    throw (
      failures.find(isCarveRefusal) ??
      failures.find((e) => !(e instanceof UnitCallError && e.transient)) ??
      failures[0]
    );
  }
  return results.map((r) => (r as PromiseFulfilledResult<T>).value);
}

function canonicalGrant(address: string): string {
  const parsed = parseCidr(address);
  return parsed.ok ? parsed.cidr.text : address;
}

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false;
  const set = new Set(a);
  return b.every((x) => set.has(x));
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]);
}

export class Station {
  readonly store: StationStore;
  readonly metrics: StationMetrics;
  readonly options: StationOptions;
  /** Per-assignment ("assignment:ID") and per-volume ("volume:UNIT/NAME") serialization, shared with replacement.ts. */
  readonly locks = new KeyedMutex();
  private readonly inflight = new Map<string, Promise<AllocationAnswer>>();
  private readonly clients = new Map<string, UnitClient>();
  private readonly dnsCache = new Map<string, { addresses: string[]; atMs: number }>();
  private readonly hostStates = new Map<string, HostState>();
  private reconcileRun: Promise<void> | null = null;
  private readonly unitQueue = new Map<string, UnitChange>();
  private unitFlushScheduled = false;
  private reconcileAgain = false;
  private timers: NodeJS.Timeout[] = [];
  private stopped = false;
  /** Carves (and grows) started on each unit and not yet in its reports: placement subtracts them. */
  readonly carves = new CarveLedger();
  /** Units that answered "no space" to a carve of `bytes`, with the free space they reported then (see REFUSAL_HOLD_MS). */
  private readonly refusedCarves = new Map<string, { bytes: number; atMs: number; freeBytes: number }>();
  /** When the latest queued report of each unit was snapshotted at the latest (see REPORT_LAG_MS). */
  private readonly reportObservedAtMs = new Map<string, number>();
  /** When a discovery report of each unit was last queued: an older control-API read is not applied over it. */
  private readonly discoveryReportAtMs = new Map<string, number>();
  /** Order of storage reports per unit as they arrive (before DNS resolution may reorder them). */
  private readonly reportSeq = new Map<string, { issued: number; queued: number }>();
  /** Units whose info is being re-read in the background (true: read once more after). */
  private readonly refreshing = new Map<string, boolean>();
  private adminCarveSeq = 0;
  /** Moves a silent host's assignments to a spare host, old host fenced first (host_failover.ts). */
  readonly failover: HostFailover;
  private readonly hostKeySecret: HostKeySecret;

  constructor(store: StationStore, metrics: StationMetrics, options: StationOptions) {
    this.store = store;
    this.metrics = metrics;
    this.options = options;
    this.hostKeySecret = options.hostKeySecret ?? hostKeySecretFrom(randomBytes(32));
    this.failover = new HostFailover(this, {
      failoverAfterMs: options.hostFailoverAfterMs ?? HOST_FAILOVER_AFTER_MS_DEFAULT,
      spareOnlineWithinMs: options.hostOfflineAfterMs,
      clock: store.clock,
    });
    const nowMs = store.clock.nowMs();
    for (const host of store.hosts.values()) this.hostStates.set(host.name, hostState(host, nowMs, options.hostOfflineAfterMs));
    // Pending carves a kill -9 left: counted until reconcile finishes (the unit then reports them) or undoes them.
    for (const a of store.live.values()) {
      if (a.state !== "pending" || !a.carved) continue;
      for (const leg of a.legs) {
        if (store.volume(leg.unit, leg.volume) === undefined) {
          this.carves.reserve({ id: legCarveId(a.id, leg.index), unit: leg.unit, volume: leg.volume, bytes: carveBytes(leg.sizeBytes), sizeBytes: leg.sizeBytes });
        }
      }
      if (a.legs.length === 0 && store.volume(a.unit, a.volume) === undefined) {
        this.carves.reserve({ id: a.id, unit: a.unit, volume: a.volume, bytes: carveBytes(a.sizeBytes), sizeBytes: a.sizeBytes });
      }
    }
  }

  /** Starts the periodic reconcile and host-state sweep; runs a first reconcile now. */
  start(): void {
    this.timers.push(setInterval(() => void this.reconcile(true), this.options.reconcileIntervalMs).unref());
    this.timers.push(setInterval(() => this.sweepHosts(), Math.min(1000, this.options.hostOfflineAfterMs)).unref());
    const failoverAfterMs = this.options.hostFailoverAfterMs ?? HOST_FAILOVER_AFTER_MS_DEFAULT;
    this.timers.push(setInterval(() => void this.failover.check(), failoverCheckIntervalMs(failoverAfterMs)).unref());
    void this.reconcile();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
    await this.reconcileRun?.catch(() => undefined);
  }

  // ---- units ---------------------------------------------------------------------

  clientFor(unitName: string): UnitClient {
    const unit = this.store.units.get(unitName);
    if (unit === undefined) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(unitName)} not found`, { field: "unit" });
    if (unit.control === null) {
      throw new IpsanError("CONFLICT", `unit ${unitName} has no control API (it reported none): cannot change its volumes`, { field: "unit" });
    }
    const control = reachableNbd(unit.control, unit.addresses) ?? unit.control;
    // An enrolled unit accepts only the token of its own secret; others (units before issue 7) the cluster key's.
    const token = this.options.unitIdentities?.identities.controlToken(unitName) ?? controlTokenFor(this.options.clusterKey, unitName);
    const key = `${unitName}@${control.host}:${control.port}#${token.slice(0, 16)}`;
    let client = this.clients.get(key);
    if (client === undefined) {
      for (const old of this.clients.keys()) if (old.startsWith(`${unitName}@`)) this.clients.delete(old);
      client = new UnitClient({
        unit: unitName,
        control,
        token,
        ...(this.options.unitCallTimeoutMs === undefined ? {} : { timeoutMs: this.options.unitCallTimeoutMs }),
        onCall: (result) => this.metrics.unitCalls.inc(result),
        keyFor: (host) => this.hostKey(host, unitName),
        tlsMode: () => this.store.units.get(unitName)?.tls ?? null,
      });
      this.clients.set(key, client);
    }
    return client;
  }

  private async resolve(name: string): Promise<string[]> {
    if (isIP(name) !== 0) return [name];
    const cached = this.dnsCache.get(name);
    const nowMs = this.store.clock.nowMs();
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
        if (requestedAtMs === undefined) for (const held of this.store.volume(info.name, v.name)?.grants ?? []) if (held.startsWith("id:") && !grants.includes(held)) grants.push(held);
        return grants.length === 0 ? v : { ...v, grants };
      }),
      // A discovery packet without them (a unit from before spares and zones): not spare, no zone.
      spare: info.spare ?? false,
      zone: info.zone ?? null,
      // Absent (a unit from before TLS): keep what the station knew.
      ...(info.tls === undefined ? {} : { tls: info.tls }),
    };
    // A report that arrived earlier but finished resolving later is older than what is queued: drop it.
    if (mine < seq.queued) return;
    seq.queued = mine;
    const nowMs = this.store.clock.nowMs();
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
    try {
      // A unit whose volumes, address or state changed gets its grants checked (its return may also
      // let pending and revoking assignments finish: every pass looks at those).
      const { unitsChanged } = this.store.applyUnitChanges(changes);
      for (const [name, change] of changes) {
        if (change.report === undefined) continue;
        // The report is one snapshot: carves it lists are in its free space now.
        const sizes = new Map(change.report.volumes.map((v) => [v.name, v.sizeBytes]));
        this.carves.noteReport(name, sizes, this.reportObservedAtMs.get(name) ?? this.store.clock.nowMs() - REPORT_LAG_MS);
        // A refusal holds while the unit has no more free space than when it refused.
        const refusal = this.refusedCarves.get(name);
        if (refusal !== undefined) {
          if (change.report.freeBytes > refusal.freeBytes || this.store.clock.nowMs() - refusal.atMs > REFUSAL_HOLD_MS) this.refusedCarves.delete(name);
          else refusal.freeBytes = change.report.freeBytes;
        }
      }
      const dirty = unitsChanged.filter((name) => this.store.units.get(name)?.state === "online");
      if (dirty.length > 0) this.reconcileSoon(dirty);
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
    const requestedAtMs = this.store.clock.nowMs();
    const info = await this.clientFor(name).info();
    if ((this.discoveryReportAtMs.get(name) ?? -Infinity) >= requestedAtMs) return;
    const unit = this.store.units.get(name);
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
  private refreshQuietly(name: string): void {
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
        if (again && !this.stopped) this.refreshQuietly(name);
      });
  }

  /** A unit's free space as placement sees it: what it last reported minus the carves started there since. */
  usableFreeBytes(name: string): number {
    const unit = this.store.units.get(name);
    return unit === undefined ? 0 : Math.max(0, unit.freeBytes - this.carves.reservedBytes(name));
  }

  // ---- hosts ---------------------------------------------------------------------

  hostStateOf(name: string): HostState {
    const host = this.store.hosts.get(name);
    return host === undefined ? "offline" : hostState(host, this.store.clock.nowMs(), this.options.hostOfflineAfterMs);
  }

  /** Registers or updates a host (`spare`: given, it is recorded); a changed address moves its grants along. */
  async putHost(name: string, address: string, spare?: boolean): Promise<{ created: boolean }> {
    const { created, changed } = this.store.putHost(name, address, spare);
    this.noteHostState(name);
    if (changed) await this.followHostAddress(name, address);
    return { created };
  }

  heartbeat(name: string): boolean {
    const ok = this.store.touchHost(name);
    if (ok) this.noteHostState(name);
    return ok;
  }

  private async followHostAddress(name: string, address: string): Promise<void> {
    const volumes = new Set<string>();
    for (const assignment of this.store.listAssignments({ host: name })) {
      if (assignment.state === "revoking") continue;
      this.store.updateAssignment(assignment.id, assignment.state, { hostAddress: address });
      for (const held of volumesOf(assignment)) volumes.add(JSON.stringify(held));
    }
    for (const key of volumes) {
      const [unit, volume] = JSON.parse(key) as [string, string];
      await this.syncGrants(unit, volume, true).catch((error: unknown) =>
        log.limited(`grants:${unit}`, "cannot move grants to a host's new address yet; reconcile retries", {
          unit,
          volume,
          error: errorMessage(error),
        }),
      );
    }
  }

  private noteHostState(name: string): void {
    const state = this.hostStateOf(name);
    const previous = this.hostStates.get(name);
    this.hostStates.set(name, state);
    if (previous !== undefined && previous !== state) this.store.recordHostState(name, state);
  }

  private sweepHosts(): void {
    for (const name of this.store.hosts.keys()) this.noteHostState(name);
  }

  /** Runs `body` under an assignment's lock (host failover's moves wait for unassign and leg work, and the other way round). */
  lockAssignment<T>(id: string, body: () => Promise<T>): Promise<T> {
    return this.locks.run(`assignment:${id}`, body);
  }

  // ---- grants ------------------------------------------------------------------

  /**
   * Grants a volume should carry, for the hosts of its live, not-being-revoked
   * assignments: on a unit that speaks TLS (or is not known not to), a grant by
   * host identity for exactly the export assigned ("id:HOST@VOL" or
   * "id:HOST@VOL/pN"; the host proves it with its key); on a unit started
   * with --insecure-plaintext, the host's address (which admits the whole
   * volume: such a unit cannot tell hosts apart any better).
   */
  desiredGrants(unit: string, volume: string): string[] {
    const byIdentity = this.store.units.get(unit)?.tls !== "off";
    const out: string[] = [];
    for (const a of this.store.liveOnVolume(unit, volume)) {
      if (a.state === "active" || (a.state === "pending" && a.error === null)) {
        // A host failover fencing the old host: neither it nor the new host is granted until every unit confirmed.
        if (isFencing(a)) continue;
        const grant = byIdentity
          ? identityGrant(a.host, a.partition === null ? volume : `${volume}/p${a.partition}`)
          : canonicalGrant(a.hostAddress);
        if (!out.includes(grant)) out.push(grant);
      }
    }
    return out.sort();
  }

  /** Host `host`'s NBD key on unit `unit` (64 hex digits). */
  hostKey(host: string, unit: string): string {
    return hostUnitKey(this.hostKeySecret, host, unit, this.store.hosts.get(host)?.keyEpoch ?? 0);
  }

  /**
   * The NBD keys host `host` needs: one per unit that holds a volume of its
   * live assignments (every leg of a mirror), with the identity to use.
   */
  hostKeys(host: string): { unit: string; identity: string; key: string; tls: NbdTlsMode | null }[] {
    const units = new Set<string>();
    for (const assignment of this.store.listAssignments({ host })) {
      if (assignment.state === "released" || assignment.state === "failed") continue;
      for (const [unit] of volumesOf(assignment)) units.add(unit);
    }
    return [...units].sort().map((unit) => ({ unit, identity: host, key: this.hostKey(host, unit), tls: this.store.units.get(unit)?.tls ?? null }));
  }

  /** `ipsan hosts rotate-key NAME`: new keys for every unit of that host; the units get them with the grants now. */
  async rotateHostKey(host: string): Promise<{ keyEpoch: number }> {
    const keyEpoch = this.store.rotateHostKey(host);
    const volumes = new Set<string>();
    for (const assignment of this.store.listAssignments({ host })) {
      if (assignment.state === "released" || assignment.state === "failed") continue;
      for (const held of volumesOf(assignment)) volumes.add(JSON.stringify(held));
    }
    for (const key of volumes) {
      const [unit, volume] = JSON.parse(key) as [string, string];
      await this.syncGrants(unit, volume, true).catch((error: unknown) =>
        log.limited(`grants:${unit}`, "cannot give a unit a host's new key yet; reconcile retries", { unit, volume, host, error: errorMessage(error) }),
      );
    }
    return { keyEpoch };
  }

  /** Makes the unit's grants of one volume equal the desired ones (skipped when already equal, unless forced). */
  syncGrants(unit: string, volume: string, force: boolean): Promise<void> {
    return this.locks.run(`volume:${unit}/${volume}`, async () => {
      const desired = this.desiredGrants(unit, volume);
      const observed = this.store.volume(unit, volume)?.grants ?? null;
      if (!force && observed !== null && sameSet(observed, desired)) return;
      const updated = await this.clientFor(unit).setGrants(volume, desired);
      this.store.putVolume({ unit, ...updated, grants: updated.grants.map(canonicalGrant) }, "grants");
    });
  }

  // ---- allocation ----------------------------------------------------------------

  /** Each unit's free volumes sorted by size, rebuilt only when the unit's volumes or assignments changed. */
  private readonly freeVolumeCache = new Map<string, { version: number; volumes: AllocatorVolume[] }>();

  private freeVolumesOf(unit: string): AllocatorVolume[] {
    const version = this.store.unitVersion(unit);
    const cached = this.freeVolumeCache.get(unit);
    if (cached !== undefined && cached.version === version) return cached.volumes;
    const volumes: AllocatorVolume[] = [];
    for (const v of this.store.unitVolumes(unit).values()) {
      if (v.partitions.length === 0 && !this.store.isVolumeAssigned(unit, v.name)) volumes.push({ name: v.name, sizeBytes: v.sizeBytes });
    }
    volumes.sort(compareFreeVolumes);
    if (this.freeVolumeCache.size > this.store.units.size + 64) this.freeVolumeCache.clear();
    this.freeVolumeCache.set(unit, { version, volumes });
    return volumes;
  }

  private refusalOf(unit: string): number | null {
    const refusal = this.refusedCarves.get(unit);
    if (refusal === undefined) return null;
    if (this.store.clock.nowMs() - refusal.atMs <= REFUSAL_HOLD_MS) return refusal.bytes;
    this.refusedCarves.delete(unit);
    return null;
  }

  /** The pool as the allocator sees it (also replacement.ts's placement). */
  allocatorUnits(): AllocatorUnit[] {
    const units: AllocatorUnit[] = [];
    for (const unit of this.store.units.values()) {
      const eligible = unit.state === "online" && unit.control !== null;
      const volumes = this.store.unitVolumes(unit.name);
      let volumeCount = volumes.size;
      for (const carve of this.carves.entries(unit.name)) if (!volumes.has(carve.volume)) volumeCount++;
      units.push({
        name: unit.name,
        state: unit.state,
        hasControl: unit.control !== null,
        freeBytes: unit.freeBytes,
        reservedBytes: this.carves.reservedBytes(unit.name),
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

  /** Allocation with idempotency by requestId (docs/api.md "POST /api/v1/allocations"). */
  async allocate(input: AllocationInput, callerAddress: string): Promise<AllocationAnswer> {
    const startedMs = performance.now();
    try {
      const answer = await this.allocateOnce(input, callerAddress);
      this.metrics.allocations.inc(answer.kind === "dry_run" ? "dry_run" : answer.status === 201 ? "created" : "retried");
      return answer;
    } catch (error) {
      this.metrics.allocations.inc(error instanceof NoSpaceError ? "no_space" : "failed");
      throw error;
    } finally {
      if (input.dryRun !== true) this.metrics.allocationSeconds.observe((performance.now() - startedMs) / 1000);
    }
  }

  private async allocateOnce(input: AllocationInput, callerAddress: string): Promise<AllocationAnswer> {
    const copies = input.copies ?? 1;
    if (input.dryRun === true && copies > 1) {
      const result = placeLegs(this.allocatorUnits(), { sizeBytes: legBytesOf(input.sizeBytes), copies, reuse: false });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons, copies);
      return { kind: "dry_run", placement: result.legs[0] as Placement, legs: result.legs, copies, reasons: result.reasons };
    }
    if (input.dryRun === true) {
      const result = allocate(this.allocatorUnits(), { sizeBytes: input.sizeBytes });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons);
      return { kind: "dry_run", placement: result.placement, reasons: result.reasons };
    }
    const running = this.inflight.get(input.requestId);
    if (running !== undefined) {
      const answer = await running;
      return answer.kind === "assignment" ? { ...answer, status: 200 } : answer;
    }
    // A single copy's parameters are written as before copies existed, so old request ids still match.
    const params = JSON.stringify({ kind: "allocation", host: input.host, sizeBytes: input.sizeBytes, ...(copies > 1 ? { copies } : {}) });
    const previous = this.store.findRequest(input.requestId);
    if (previous !== undefined) {
      if (previous.params !== params) {
        throw new IpsanError(
          "CONFLICT",
          `requestId ${JSON.stringify(input.requestId)} was already used for a different request (${previous.params})`,
          { field: "requestId" },
        );
      }
      return { kind: "assignment", status: 200, assignment: await this.settled(previous.assignmentId) };
    }
    const work = this.allocateNew(input, callerAddress, params);
    this.inflight.set(input.requestId, work);
    try {
      return await work;
    } finally {
      this.inflight.delete(input.requestId);
    }
  }

  private noSpace(sizeBytes: number, reasons: readonly UnitReason[], copies = 1): NoSpaceError {
    const units = `${reasons.length} unit${reasons.length === 1 ? "" : "s"}`;
    let message: string;
    if (copies > 1) {
      const what = `${copies} copies of ${formatSize(sizeBytes)} (a leg of ${formatSize(legBytesOf(sizeBytes))}, with the mirror's metadata, on each of ${copies} distinct units)`;
      message = reasons.length === 0 ? `the pool cannot hold ${what}: it has no units` : `the pool cannot hold ${what} (${units}, reasons in "reasons")`;
    } else {
      message =
        reasons.length === 0
          ? `no unit in the pool can hold ${formatSize(sizeBytes)}: the pool has no units`
          : `no unit in the pool can hold ${formatSize(sizeBytes)} (${units}, reasons in "reasons")`;
    }
    return new NoSpaceError(message, reasons);
  }

  private async allocateNew(input: AllocationInput, callerAddress: string, params: string): Promise<AllocationAnswer> {
    const known = this.store.hosts.get(input.host);
    const address = input.address ?? known?.address ?? callerAddress;
    // A new host is registered in the same transaction as its first assignment (one fsync, not two).
    let register: { name: string; address: string } | undefined;
    if (known === undefined) register = { name: input.host, address };
    else if (known.address !== address) await this.putHost(input.host, address);
    else this.heartbeat(input.host);
    if ((input.copies ?? 1) > 1) return this.allocateMirror(input, address, params, register);
    // Units that refused this request's carve, with their words (the 507's reasons if no unit is left).
    const refusals = new Map<string, string>();
    for (;;) {
      const result = allocate(this.allocatorUnits(), { sizeBytes: input.sizeBytes, excludeReasons: refusals });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons);
      const placement = result.placement;
      const nowMs = this.store.clock.nowMs();
      const id = newAssignmentId();
      const assignment: AssignmentRecord = {
        id,
        requestId: input.requestId,
        host: input.host,
        hostAddress: address,
        unit: placement.unit,
        volume: placement.kind === "reuse" ? placement.volume : `h-${id.slice(2)}`,
        partition: null,
        sizeBytes: placement.sizeBytes,
        state: "pending",
        carved: placement.kind === "carve",
        // A reused volume held another host's data: the unit wipes it before the grant.
        wipe: placement.kind === "reuse",
        copies: 1,
        legs: [],
        error: null,
        detail: null,
        createdAtMs: nowMs,
        updatedAtMs: nowMs,
      };
      // No await between allocate() above and this insert: the placement is reserved atomically,
      // and a carve counts against the unit's free space until the unit reports it.
      this.store.insertAssignment(assignment, { requestId: input.requestId, params }, register);
      if (assignment.carved) {
        this.carves.reserve({ id, unit: assignment.unit, volume: assignment.volume, bytes: carveBytes(assignment.sizeBytes), sizeBytes: assignment.sizeBytes });
      }
      if (register !== undefined) {
        this.noteHostState(register.name);
        register = undefined;
      }
      try {
        return { kind: "assignment", status: 201, assignment: await this.finishOrUndo(assignment) };
      } catch (error) {
        // A unit that refused the carve (no space, volume limit) is left out and the next best tried:
        // a refusal is the unit's answer about this request, not a failure of the unit.
        if (!(assignment.carved && isCarveRefusal(error)) || refusals.has(assignment.unit) || refusals.size > this.store.units.size) throw error;
        refusals.set(assignment.unit, `refused the carve: ${error.message.replace(`unit ${assignment.unit}: `, "")}`);
        log.info("unit refused a carve; trying the next unit", { id, unit: assignment.unit, sizeBytes: assignment.sizeBytes, error: error.message });
        continue;
      }
    }
  }

  /**
   * A mirrored allocation (copies > 1): one leg of size + MIRROR_METADATA_BYTES
   * carved on each of `copies` distinct units (never a reused volume: a leg
   * must start blank, as the engine expects of a new mirror). All legs are
   * recorded pending in one transaction, with their ledger entries, before
   * any unit is called; they are finished together (active only when every
   * unit made its leg and granted the host) or undone together. A unit that
   * refuses its leg's carve is left out and all legs are placed again.
   */
  private async allocateMirror(
    input: AllocationInput,
    address: string,
    params: string,
    registerFirst: { name: string; address: string } | undefined,
  ): Promise<AllocationAnswer> {
    const copies = input.copies ?? 1;
    const legBytes = legBytesOf(input.sizeBytes);
    const refusals = new Map<string, string>();
    let register = registerFirst;
    for (;;) {
      const result = placeLegs(this.allocatorUnits(), { sizeBytes: legBytes, copies, reuse: false, excludeReasons: refusals });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons, copies);
      const nowMs = this.store.clock.nowMs();
      const id = newAssignmentId();
      const legs: LegRecord[] = result.legs.map((placement, index) => ({
        index,
        unit: placement.unit,
        volume: `h-${id.slice(2)}-l${index}`,
        sizeBytes: legBytes,
        state: "pending",
        detail: null,
      }));
      const first = legs[0] as LegRecord;
      const assignment: AssignmentRecord = {
        id,
        requestId: input.requestId,
        host: input.host,
        hostAddress: address,
        unit: first.unit,
        volume: first.volume,
        partition: null,
        sizeBytes: input.sizeBytes,
        state: "pending",
        carved: true,
        wipe: false,
        copies,
        legs,
        error: null,
        detail: null,
        createdAtMs: nowMs,
        updatedAtMs: nowMs,
      };
      // No await between placeLegs() above and this insert (as for one copy): every leg's carve is counted at once.
      this.store.insertAssignment(assignment, { requestId: input.requestId, params }, register);
      for (const leg of legs) {
        this.carves.reserve({ id: legCarveId(id, leg.index), unit: leg.unit, volume: leg.volume, bytes: carveBytes(leg.sizeBytes), sizeBytes: leg.sizeBytes });
      }
      if (register !== undefined) {
        this.noteHostState(register.name);
        register = undefined;
      }
      try {
        return { kind: "assignment", status: 201, assignment: await this.finishOrUndo(assignment) };
      } catch (error) {
        if (!isCarveRefusal(error) || refusals.has(error.unit) || refusals.size > this.store.units.size) throw error;
        refusals.set(error.unit, `refused the carve: ${error.message.replace(`unit ${error.unit}: `, "")}`);
        log.info("unit refused a mirror leg's carve; placing the legs again", { id, unit: error.unit, legBytes, error: error.message });
        continue;
      }
    }
  }

  /**
   * A unit said "no space" to a carve: the free space the station has for it
   * is stale-high (or too fragmented to use). No carve that large goes there
   * until it reports more free space (REFUSAL_HOLD_MS); its info is re-read now.
   */
  private noteNoSpace(unit: string, sizeBytes: number): void {
    const bytes = carveBytes(sizeBytes);
    const previous = this.refusedCarves.get(unit);
    const freeBytes = this.store.units.get(unit)?.freeBytes ?? 0;
    this.refusedCarves.set(unit, { bytes: Math.min(bytes, previous?.bytes ?? bytes), atMs: this.store.clock.nowMs(), freeBytes: Math.min(freeBytes, previous?.freeBytes ?? freeBytes) });
    this.refreshQuietly(unit);
  }

  /** Semi-automatic path: the admin assigns a chosen volume or partition to a chosen host. */
  async assign(input: AssignInput): Promise<{ status: 200 | 201; assignment: AssignmentRecord }> {
    const host = this.store.hosts.get(input.host);
    if (host === undefined) {
      throw new IpsanError("NOT_FOUND", `host ${JSON.stringify(input.host)} not found: register it first (PUT /api/v1/hosts/NAME)`, { field: "host" });
    }
    const params = JSON.stringify({ kind: "assignment", host: input.host, unit: input.unit, volume: input.volume, partition: input.partition ?? null });
    if (input.requestId !== undefined) {
      const previous = this.store.findRequest(input.requestId);
      if (previous !== undefined) {
        if (previous.params !== params) {
          throw new IpsanError("CONFLICT", `requestId ${JSON.stringify(input.requestId)} was already used for a different request`, { field: "requestId" });
        }
        return { status: 200, assignment: await this.settled(previous.assignmentId) };
      }
    }
    if (!this.store.units.has(input.unit)) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(input.unit)} not found`, { field: "unit" });
    const volume = this.store.volume(input.unit, input.volume);
    if (volume === undefined) {
      throw new IpsanError("NOT_FOUND", `volume ${JSON.stringify(input.volume)} not found on unit ${input.unit}`, { field: "volume" });
    }
    const partition = input.partition ?? null;
    const range = assignedExtents(volume, partition);
    if (range === null) {
      throw new IpsanError("NOT_FOUND", `partition ${partition} not found on volume ${input.unit}/${input.volume} (it has ${volume.partitions.length})`, {
        field: "partition",
      });
    }
    // Different partitions of one volume may go to different hosts where the unit tells hosts apart by
    // identity (each is granted its own export); a unit that admits by address admits a host to the whole volume.
    const perExport = this.store.units.get(input.unit)?.tls !== "off";
    for (const other of this.store.liveOnVolume(input.unit, input.volume)) {
      const overlaps = other.partition === null || partition === null || other.partition === partition;
      if (overlaps || (other.host !== input.host && !perExport)) {
        throw new IpsanError(
          "CONFLICT",
          `volume ${input.unit}/${input.volume}${other.partition === null ? "" : ` partition ${other.partition}`} is already assigned to host ${other.host} (assignment ${other.id}); ${overlaps ? "an export belongs to one host" : `unit ${input.unit} runs with --insecure-plaintext and admits hosts by address to whole volumes, so a volume belongs to one host there`}`,
          { field: "volume" },
        );
      }
    }
    const nowMs = this.store.clock.nowMs();
    const assignment: AssignmentRecord = {
      id: newAssignmentId(),
      requestId: input.requestId ?? null,
      host: input.host,
      hostAddress: host.address,
      unit: input.unit,
      volume: input.volume,
      partition,
      sizeBytes: range.sizeBytes,
      state: "pending",
      carved: false,
      // The admin's manual path keeps the data (a failed host's volume moved to a spare host).
      wipe: false,
      copies: 1,
      legs: [],
      error: null,
      detail: null,
      createdAtMs: nowMs,
      updatedAtMs: nowMs,
    };
    this.store.insertAssignment(assignment, input.requestId === undefined ? undefined : { requestId: input.requestId, params });
    return { status: 201, assignment: await this.finishOrUndo(assignment) };
  }

  /** The in-line path of a new assignment: finish it now, or undo it before answering the error. */
  private finishOrUndo(assignment: AssignmentRecord): Promise<AssignmentRecord> {
    return this.locks.run(`assignment:${assignment.id}`, async () => {
      try {
        return await this.finish(assignment);
      } catch (error) {
        await this.undo(assignment, errorMessage(error), error);
        throw error;
      }
    });
  }

  /** An existing assignment, with a pending one finished (or undone) first. */
  private async settled(id: string): Promise<AssignmentRecord> {
    const assignment = this.store.getAssignment(id);
    if (assignment === undefined) throw new IpsanError("NOT_FOUND", `assignment ${id} not found`);
    if (assignment.state !== "pending") return assignment;
    await this.settlePending(assignment);
    return this.store.getAssignment(id) ?? assignment;
  }

  /**
   * Tells the unit (create the carved volume if missing, put grants) and marks
   * the assignment active. The unit's answers and the activation are committed
   * together (one fsync). Caller holds the assignment lock.
   */
  private async finish(assignment: AssignmentRecord): Promise<AssignmentRecord> {
    const current = this.store.getAssignment(assignment.id);
    if (current === undefined || current.state !== "pending") return current ?? assignment;
    if (current.legs.length > 0) return this.finishMirror(current);
    const client = this.clientFor(current.unit);
    let volume = this.store.volume(current.unit, current.volume);
    if (volume === undefined && current.carved) {
      let created: VolumeInfo;
      try {
        created = await client.createVolume(current.volume, current.sizeBytes);
        // The unit made it; its free space in the station's eyes drops when its next report lists it
        // (until then the ledger keeps counting it: no free-space estimate to go stale).
        this.carves.settle(current.id, this.store.clock.nowMs());
      } catch (error) {
        if (error instanceof UnitCallError && error.unitCode === "NO_SPACE" && isCarveRefusal(error)) this.noteNoSpace(current.unit, current.sizeBytes);
        // Made by an earlier attempt (a retry after a lost answer, or before a station crash).
        if (!(error instanceof UnitCallError && error.unitCode === "ALREADY_EXISTS")) throw error;
        this.carves.settle(current.id, this.store.clock.nowMs());
        created = await client.getVolume(current.volume);
        if (created.sizeBytes < current.sizeBytes) {
          throw new IpsanError("CONFLICT", `volume ${current.unit}/${current.volume} exists with ${created.sizeBytes} bytes, less than ${current.sizeBytes}`);
        }
      }
      volume = { unit: current.unit, ...created, grants: created.grants.map(canonicalGrant) };
    }
    if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${current.unit}/${current.volume} is no longer on the unit`);
    const range = assignedExtents(volume, current.partition);
    if (range === null) throw new IpsanError("NOT_FOUND", `partition ${current.partition} of ${current.unit}/${current.volume} is gone`);
    const active = await this.locks.run(`volume:${current.unit}/${current.volume}`, async () => {
      if (current.wipe) await this.wipeBeforeGrant(client, current);
      const granted = await client.setGrants(current.volume, this.desiredGrants(current.unit, current.volume));
      const unit = this.store.units.get(current.unit);
      const detail: AssignmentDetail = {
        volumeNumber: granted.number,
        sizeBytes: range.sizeBytes,
        extents: range.extents,
        nbd: reachableNbd(unit?.nbd ?? null, unit?.addresses ?? []),
      };
      return this.store.updateAssignment(current.id, "active", {
        detail,
        error: null,
        volume: { unit: current.unit, ...granted, grants: granted.grants.map(canonicalGrant) },
      });
    });
    log.info("assignment active", { id: active.id, host: active.host, unit: active.unit, volume: active.volume, partition: active.partition ?? undefined });
    return active;
  }

  /**
   * Finishes a pending mirror: every leg's volume made (an existing one of the
   * leg's size counts as made by an earlier attempt), then every leg granted
   * to the host, then active with all legs "in-sync" and the units' answers in
   * one commit. Any leg that fails fails the whole: the caller undoes every
   * leg (or, in reconcile, retries later if the failure is transient). The
   * error thrown is the most telling: a carve refusal first (the allocation
   * then places the legs again without that unit), then a final failure, then
   * a transient one. Caller holds the assignment lock.
   */
  private async finishMirror(current: AssignmentRecord): Promise<AssignmentRecord> {
    // Every leg made first (all of them tried, so an undo knows what exists), then every leg granted.
    settledValues(await Promise.allSettled(current.legs.map((leg) => this.makeLeg(current, leg))));
    const volumes = await Promise.allSettled(
      current.legs.map((leg) =>
        this.locks.run(`volume:${leg.unit}/${leg.volume}`, async () => {
          const granted = await this.clientFor(leg.unit).setGrants(leg.volume, this.desiredGrants(leg.unit, leg.volume));
          return { unit: leg.unit, ...granted, grants: granted.grants.map(canonicalGrant) };
        }),
      ),
    );
    const granted = settledValues(volumes);
    const legs: LegRecord[] = current.legs.map((leg, i) => {
      const volume = granted[i] as VolumeRecord;
      const unit = this.store.units.get(leg.unit);
      return {
        ...leg,
        state: "in-sync",
        detail: {
          volumeNumber: volume.number,
          sizeBytes: volume.sizeBytes,
          extents: assignedExtents(volume, null)?.extents ?? [],
          nbd: reachableNbd(unit?.nbd ?? null, unit?.addresses ?? []),
        },
      };
    });
    const first = granted[0] as VolumeRecord;
    const firstUnit = this.store.units.get(first.unit);
    const detail: AssignmentDetail = {
      volumeNumber: first.number,
      sizeBytes: current.sizeBytes,
      // Where the mirror's data lies on the first leg (its last MiB, the mirror's metadata, left out).
      extents: mapRange(first.extents, 0, Math.ceil(current.sizeBytes / SECTOR_BYTES)),
      nbd: reachableNbd(firstUnit?.nbd ?? null, firstUnit?.addresses ?? []),
    };
    const active = this.store.updateAssignment(current.id, "active", { detail, error: null, legs, volumes: granted as VolumeRecord[] });
    log.info("mirrored assignment active", {
      id: active.id,
      host: active.host,
      copies: active.copies,
      legs: active.legs.map((l) => `${l.unit}/${l.volume}`).join(","),
    });
    return active;
  }

  /** One leg's volume on its unit: created now, or found made by an earlier attempt. */
  private async makeLeg(current: AssignmentRecord, leg: LegRecord): Promise<VolumeRecord> {
    const known = this.store.volume(leg.unit, leg.volume);
    const check = (volume: { sizeBytes: number }): void => {
      if (volume.sizeBytes !== leg.sizeBytes) {
        throw new IpsanError("CONFLICT", `mirror leg ${leg.unit}/${leg.volume} exists with ${volume.sizeBytes} bytes, not ${leg.sizeBytes}`);
      }
    };
    if (known !== undefined) {
      check(known);
      return known;
    }
    const client = this.clientFor(leg.unit);
    const carveId = legCarveId(current.id, leg.index);
    let created: VolumeInfo;
    try {
      created = await client.createVolume(leg.volume, leg.sizeBytes);
      this.carves.settle(carveId, this.store.clock.nowMs());
    } catch (error) {
      if (error instanceof UnitCallError && error.unitCode === "NO_SPACE" && isCarveRefusal(error)) this.noteNoSpace(leg.unit, leg.sizeBytes);
      if (!(error instanceof UnitCallError && error.unitCode === "ALREADY_EXISTS")) throw error;
      this.carves.settle(carveId, this.store.clock.nowMs());
      created = await client.getVolume(leg.volume);
    }
    check(created);
    return { unit: leg.unit, ...created, grants: created.grants.map(canonicalGrant) };
  }

  /**
   * Automatic allocation never hands out old data: the unit wipes a reused
   * volume before it is granted. Done on every finish() of the pending
   * assignment (so a station killed before the grant wipes again on
   * reconcile: harmless, nobody has been told of the volume yet). The unit
   * refuses a wipe under grants; grants found there (an earlier attempt
   * granted, then the station died) belong to no other live assignment, since
   * this pending one holds the volume, so they are taken off first. Caller
   * holds the assignment and volume locks.
   */
  private async wipeBeforeGrant(client: UnitClient, current: AssignmentRecord): Promise<void> {
    const startedMs = this.store.clock.nowMs();
    try {
      await client.wipeVolume(current.volume);
    } catch (error) {
      if (!(error instanceof UnitCallError && error.unitCode === "CONFLICT")) throw error;
      log.info("volume to wipe still has grants; revoking them first", { id: current.id, unit: current.unit, volume: current.volume });
      await client.setGrants(current.volume, []);
      await client.wipeVolume(current.volume);
    }
    log.info("volume wiped before reuse", { id: current.id, host: current.host, unit: current.unit, volume: current.volume, ms: this.store.clock.nowMs() - startedMs });
  }

  /**
   * Undoes a pending assignment: failed in the database first, then grants and
   * a carved volume cleaned up, best effort. `cause`: the error that made it
   * fail; a carve the unit refused was never made, so there is nothing to
   * delete and its bytes stop counting at once. Otherwise they stop counting
   * when the delete is confirmed, or (cleanup failed) when a later report of
   * the unit does not list the volume.
   */
  private async undo(assignment: AssignmentRecord, reason: string, cause?: unknown): Promise<void> {
    const current = this.store.getAssignment(assignment.id);
    if (current === undefined || current.state !== "pending") return;
    this.store.updateAssignment(current.id, "failed", { error: reason, dropRequest: true });
    log.warn("assignment undone", { id: current.id, host: current.host, unit: current.unit, volume: current.volume, copies: current.copies, reason });
    if (current.legs.length > 0) {
      await Promise.all(current.legs.map((leg) => this.undoLeg(current, leg, cause)));
      return;
    }
    if (current.carved && isCarveRefusal(cause)) {
      this.carves.release(current.id);
      return;
    }
    const unit = this.store.units.get(current.unit);
    if (unit === undefined || unit.control === null || unit.state === "offline" || unit.state === "down") {
      this.carves.settle(current.id, this.store.clock.nowMs());
      return;
    }
    try {
      const volume = this.store.volume(current.unit, current.volume);
      if (volume !== undefined) await this.syncGrants(current.unit, current.volume, false);
      if (current.carved && !this.store.isVolumeAssigned(current.unit, current.volume)) {
        await this.locks.run(`volume:${current.unit}/${current.volume}`, async () => {
          try {
            await this.clientFor(current.unit).deleteVolume(current.volume);
          } catch (error) {
            if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
          }
          this.store.removeVolume(current.unit, current.volume);
          this.carves.releaseVolume(current.unit, current.volume);
        });
      }
    } catch (error) {
      log.limited(`undo:${current.unit}`, "cleanup after an undone assignment failed; reconcile fixes grants later", {
        id: current.id,
        error: errorMessage(error),
      });
    } finally {
      this.carves.settle(current.id, this.store.clock.nowMs());
    }
  }

  /**
   * Cleans up one leg of an undone mirror (already failed in the database):
   * its grant taken off and its volume deleted, best effort; a carve its unit
   * refused was never made. What cannot be cleaned now (the unit is away) is
   * left to reconcile's grant check; the volume then stays as a free volume.
   */
  private async undoLeg(current: AssignmentRecord, leg: LegRecord, cause: unknown): Promise<void> {
    const carveId = legCarveId(current.id, leg.index);
    if (isCarveRefusal(cause) && cause.unit === leg.unit) {
      this.carves.release(carveId);
      return;
    }
    const unit = this.store.units.get(leg.unit);
    if (unit === undefined || unit.control === null || unit.state === "offline" || unit.state === "down") {
      this.carves.settle(carveId, this.store.clock.nowMs());
      return;
    }
    try {
      if (this.store.volume(leg.unit, leg.volume) !== undefined) await this.syncGrants(leg.unit, leg.volume, false);
      if (!this.store.isVolumeAssigned(leg.unit, leg.volume)) {
        await this.locks.run(`volume:${leg.unit}/${leg.volume}`, async () => {
          try {
            await this.clientFor(leg.unit).deleteVolume(leg.volume);
          } catch (error) {
            if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
          }
          this.store.removeVolume(leg.unit, leg.volume);
          this.carves.releaseVolume(leg.unit, leg.volume);
        });
      }
    } catch (error) {
      log.limited(`undo:${leg.unit}`, "cleanup of an undone mirror leg failed; reconcile fixes grants later", {
        id: current.id,
        leg: leg.index,
        unit: leg.unit,
        error: errorMessage(error),
      });
    } finally {
      this.carves.settle(carveId, this.store.clock.nowMs());
    }
  }

  /** Reconcile of one pending assignment: finish it, or undo it if it is too old or already failed once. */
  private settlePending(assignment: AssignmentRecord): Promise<void> {
    return this.locks.run(`assignment:${assignment.id}`, async () => {
      const current = this.store.getAssignment(assignment.id);
      if (current === undefined || current.state !== "pending") return;
      const ageMs = this.store.clock.nowMs() - current.createdAtMs;
      if (current.error !== null || ageMs > this.options.pendingDeadlineMs) {
        await this.undo(current, current.error ?? `not finished within ${this.options.pendingDeadlineMs} ms`);
        return;
      }
      // Wait for every unit it needs (each leg's of a mirror), until the deadline.
      for (const [name] of volumesOf(current)) {
        const unit = this.store.units.get(name);
        if (unit === undefined || unit.state === "offline" || unit.state === "down") return;
      }
      try {
        await this.finish(current);
      } catch (error) {
        if (error instanceof UnitCallError && error.transient) {
          log.limited(`pending:${current.unit}`, "pending assignment not finished yet; retrying", { id: current.id, error: errorMessage(error) });
          return;
        }
        await this.undo(current, errorMessage(error), error);
      }
    });
  }

  // ---- unassign ------------------------------------------------------------------

  /** Revokes an assignment: 204 when the unit dropped the grant, 202 when recorded and left to reconcile. */
  async unassign(id: string): Promise<{ status: 202 | 204; assignment: AssignmentRecord }> {
    return this.locks.run(`assignment:${id}`, async () => {
      const current = this.store.getAssignment(id);
      if (current === undefined) throw new IpsanError("NOT_FOUND", `assignment ${JSON.stringify(id)} not found`, { field: "id" });
      if (current.state === "released" || current.state === "failed") return { status: 204 as const, assignment: current };
      if (current.state === "pending") {
        throw new IpsanError("CONFLICT", `assignment ${id} is still being set up; try again in a moment`, { field: "id" });
      }
      const revoking = current.state === "revoking" ? current : this.store.updateAssignment(id, "revoking");
      const done = await this.finishRevoke(revoking);
      return done === null ? { status: 202 as const, assignment: revoking } : { status: 204 as const, assignment: done };
    });
  }

  /**
   * Removes the grants of a revoking assignment (every leg's, for a mirror) and
   * marks it released; null if a unit cannot be told now (reconcile retries
   * the legs not yet told; a unit known to be away is not called).
   */
  private async finishRevoke(assignment: AssignmentRecord): Promise<AssignmentRecord | null> {
    let told = true;
    for (const [unit, volume] of volumesOf(assignment)) {
      const state = this.store.units.get(unit)?.state;
      if (assignment.legs.length > 0 && (state === "offline" || state === "down")) {
        told = false;
        continue;
      }
      try {
        await this.syncGrants(unit, volume, true);
      } catch (error) {
        const gone = error instanceof UnitCallError && error.unitCode === "NOT_FOUND";
        const noUnit = error instanceof IpsanError && error.code === "NOT_FOUND" && !(error instanceof UnitCallError);
        if (!gone && !noUnit) {
          log.limited(`revoke:${unit}`, "grant not revoked yet; reconcile retries", { id: assignment.id, unit, volume, error: errorMessage(error) });
          told = false;
        }
      }
    }
    if (!told) return null;
    const released = this.store.updateAssignment(assignment.id, "released");
    log.info("assignment released", { id: released.id, host: released.host, unit: released.unit, volume: released.volume });
    return released;
  }

  // ---- volume operations (admin) -------------------------------------------------

  private requireVolume(unit: string, name: string): VolumeRecord {
    if (!this.store.units.has(unit)) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(unit)} not found`, { field: "unit" });
    const volume = this.store.volume(unit, name);
    if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${JSON.stringify(name)} not found on unit ${unit}`, { field: "name" });
    return volume;
  }

  async createVolume(unit: string, name: string, sizeBytes: number): Promise<VolumeRecord> {
    const client = this.clientFor(unit);
    if (this.store.volume(unit, name) !== undefined) {
      throw new IpsanError("ALREADY_EXISTS", `volume ${JSON.stringify(name)} already exists on unit ${unit}`, { field: "name" });
    }
    return this.locks.run(`volume:${unit}/${name}`, async () => {
      const created = await this.countedCarve(unit, name, carveBytes(sizeBytes), sizeBytes, () => client.createVolume(name, sizeBytes));
      const volume = { unit, ...created, grants: created.grants.map(canonicalGrant) };
      this.store.putVolume(volume, "created");
      this.refreshQuietly(unit);
      return volume;
    });
  }

  /**
   * An admin's create or grow, counted against the unit's free space like an
   * allocation's carve: from before the call until the unit's report shows it
   * (released at once if the unit refuses).
   */
  private async countedCarve(unit: string, volume: string, bytes: number, sizeBytes: number, call: () => Promise<VolumeInfo>): Promise<VolumeInfo> {
    const id = `admin-${++this.adminCarveSeq}`;
    this.carves.reserve({ id, unit, volume, bytes, sizeBytes });
    try {
      const result = await call();
      this.carves.settle(id, this.store.clock.nowMs());
      return result;
    } catch (error) {
      if (error instanceof UnitCallError && error.failure === "refused") {
        this.carves.release(id);
        if (error.unitCode === "NO_SPACE") this.noteNoSpace(unit, bytes);
      } else {
        this.carves.settle(id, this.store.clock.nowMs());
      }
      throw error;
    }
  }

  async deleteVolume(unit: string, name: string): Promise<void> {
    this.requireVolume(unit, name);
    const holders = this.store.liveOnVolume(unit, name);
    if (holders.length > 0) {
      throw new IpsanError("CONFLICT", `volume ${unit}/${name} is assigned to host ${holders[0]?.host} (assignment ${holders[0]?.id}): unassign it first`, {
        field: "name",
      });
    }
    const client = this.clientFor(unit);
    await this.locks.run(`volume:${unit}/${name}`, async () => {
      try {
        await client.deleteVolume(name);
      } catch (error) {
        if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
      }
      this.store.removeVolume(unit, name);
      this.carves.releaseVolume(unit, name);
    });
    this.refreshQuietly(unit);
  }

  async growVolume(unit: string, name: string, sizeBytes: number): Promise<VolumeRecord> {
    this.requireVolume(unit, name);
    const client = this.clientFor(unit);
    return this.locks.run(`volume:${unit}/${name}`, async () => {
      const before = this.store.volume(unit, name)?.sizeBytes ?? sizeBytes;
      const extra = Math.max(0, carveBytes(sizeBytes) - carveBytes(before));
      const grown = await this.countedCarve(unit, name, extra, sizeBytes, () => client.growVolume(name, sizeBytes));
      const volume = { unit, ...grown, grants: grown.grants.map(canonicalGrant) };
      this.store.putVolume(volume, "grown");
      this.refreshQuietly(unit);
      return volume;
    });
  }

  async partitionVolume(unit: string, name: string, sizesBytes: readonly number[]): Promise<VolumeRecord> {
    this.requireVolume(unit, name);
    const onPartition = this.store.liveOnVolume(unit, name).find((a) => a.partition !== null);
    if (onPartition !== undefined) {
      throw new IpsanError(
        "CONFLICT",
        `partition ${onPartition.partition} of ${unit}/${name} is assigned to host ${onPartition.host} (assignment ${onPartition.id}): unassign it before repartitioning`,
        { field: "sizesBytes" },
      );
    }
    const client = this.clientFor(unit);
    return this.locks.run(`volume:${unit}/${name}`, async () => {
      const changed = await client.setPartitions(name, sizesBytes);
      const volume = { unit, ...changed, grants: changed.grants.map(canonicalGrant) };
      this.store.putVolume(volume, "partitioned");
      return volume;
    });
  }

  // ---- reconcile -----------------------------------------------------------------

  private reconcileTimer: NodeJS.Timeout | null = null;
  /** Units whose grants the next pass checks; null: all of them. */
  private reconcileScope: Set<string> | null = new Set();

  /** A reconcile soon (coalesced): of the given units (after their reports), or of everything. */
  reconcileSoon(units?: Iterable<string>): void {
    if (units === undefined) this.reconcileScope = null;
    else if (this.reconcileScope !== null) for (const unit of units) this.reconcileScope.add(unit);
    if (this.stopped || this.reconcileTimer !== null) return;
    this.reconcileTimer = setTimeout(() => {
      this.reconcileTimer = null;
      void this.reconcile(false);
    }, RECONCILE_DEBOUNCE_MS);
    this.reconcileTimer.unref();
  }

  /**
   * One pass (`full`: every unit's grants; else those asked for by reconcileSoon);
   * concurrent callers share it, and one more pass runs after it if asked meanwhile.
   */
  reconcile(full = true): Promise<void> {
    if (full) this.reconcileScope = null;
    if (this.reconcileRun !== null) {
      this.reconcileAgain = true;
      return this.reconcileRun;
    }
    const run = (async () => {
      do {
        this.reconcileAgain = false;
        const scope = this.reconcileScope;
        this.reconcileScope = new Set();
        await this.reconcilePass(scope);
      } while (this.reconcileAgain && !this.stopped);
    })()
      .catch((error: unknown) => log.error("reconcile pass failed", { error: errorMessage(error) }))
      .finally(() => {
        this.reconcileRun = null;
      });
    this.reconcileRun = run;
    return run;
  }

  private async reconcilePass(scope: ReadonlySet<string> | null): Promise<void> {
    if (this.stopped) return;
    const live = [...this.store.live.values()];
    for (const assignment of live) {
      if (this.stopped) return;
      if (assignment.state === "pending" && !this.isInflight(assignment)) await this.settlePending(assignment);
      else if (assignment.state === "revoking") {
        // A unit that is away is told when it is back (its return triggers a pass); a mirror's
        // legs on units that are here are told now.
        const away = volumesOf(assignment).every(([unit]) => {
          const unitState = this.store.units.get(unit)?.state;
          return unitState === "offline" || unitState === "down";
        });
        if (away) continue;
        await this.locks.run(`assignment:${assignment.id}`, async () => {
          const current = this.store.getAssignment(assignment.id);
          if (current?.state === "revoking") await this.finishRevoke(current);
        });
      }
    }
    // Grants that differ from what the assignments want (a unit that was away, a host that moved).
    const units = scope === null ? [...this.store.units.keys()] : [...scope];
    let checked = 0;
    for (const name of units) {
      const unit = this.store.units.get(name);
      if (this.stopped) return;
      if (unit === undefined || unit.control === null || unit.state === "offline" || unit.state === "down") continue;
      for (const volume of [...this.store.unitVolumes(unit.name).values()]) {
        // Yield now and then: a full pass over 100,000 volumes must not stall the API.
        if (++checked % RECONCILE_YIELD_EVERY === 0) await new Promise((resolve) => setImmediate(resolve));
        if (volume.grants === null) continue;
        if (volume.grants.length === 0 && !this.store.isVolumeAssigned(unit.name, volume.name)) continue;
        if (sameSet(volume.grants, this.desiredGrants(unit.name, volume.name))) continue;
        try {
          await this.syncGrants(unit.name, volume.name, false);
        } catch (error) {
          log.limited(`reconcile:${unit.name}`, "cannot fix a volume's grants yet", { unit: unit.name, volume: volume.name, error: errorMessage(error) });
          break; // this unit is not answering: leave the rest of it for the next pass
        }
      }
    }
  }

  private isInflight(assignment: AssignmentRecord): boolean {
    return assignment.requestId !== null && this.inflight.has(assignment.requestId);
  }
}
