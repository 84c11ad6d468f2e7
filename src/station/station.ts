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
//
// This class is the facade the API, the host failover and the replacements call;
// the work is done by parts of one idea each, sharing one StationContext
// (context.ts): pool/unit_pool.ts (units' reports, refreshes, control clients,
// carve refusals), hosts/host_registry.ts (hosts, liveness, keys),
// assignments/grants.ts (desired grants, syncing them), assignments/lifecycle.ts
// (assign, finish, undo, unassign, revoke), assignments/reconcile.ts (the pass),
// allocation/allocation.ts (choosing and recording placements) and
// volumes/volume_operations.ts (create, delete, grow, partition).

import type { NbdTlsMode, StorageInfo } from "../discovery/messages.ts";
import { Allocation, type AllocationAnswer, type AllocationInput } from "./allocation/allocation.ts";
import { legCarveId } from "./allocation/legs.ts";
import { carveBytes, type AllocatorUnit } from "./allocator.ts";
import { Grants } from "./assignments/grants.ts";
import { AssignmentLifecycle, type AssignInput } from "./assignments/lifecycle.ts";
import { Reconciler } from "./assignments/reconcile.ts";
import type { CarveLedger } from "./carves.ts";
import { newStationContext, type StationContext, type StationOptions } from "./context.ts";
import { HOST_FAILOVER_AFTER_MS_DEFAULT, HostFailover, failoverCheckIntervalMs } from "./host_failover.ts";
import { HostRegistry } from "./hosts/host_registry.ts";
import type { KeyedMutex } from "./keyed_mutex.ts";
import type { StationMetrics } from "./metrics.ts";
import { UnitPool } from "./pool/unit_pool.ts";
import type { StationStore } from "./store.ts";
import type { AssignmentRecord, HostState, UnitState, VolumeRecord } from "./types.ts";
import type { UnitClient } from "./unit_client.ts";
import { VolumeOperations } from "./volumes/volume_operations.ts";

export { CARVE_ALIGNMENT_BYTES } from "./allocator.ts";
export { COPIES_MAX, MIRROR_METADATA_BYTES, legBytesOf, legCarveId } from "./allocation/legs.ts";
export { NoSpaceError } from "./allocation/allocation.ts";
export type { AllocationAnswer, AllocationInput } from "./allocation/allocation.ts";
export type { AssignInput } from "./assignments/lifecycle.ts";
export type { StationOptions } from "./context.ts";
export { DNS_CACHE_ENTRIES_MAX, DNS_CACHE_MS, DNS_LOOKUP_TIMEOUT_MS, REFUSAL_HOLD_MS, REPORT_LAG_MS } from "./pool/unit_pool.ts";
export { RECONCILE_DEBOUNCE_MS, RECONCILE_YIELD_EVERY } from "./assignments/reconcile.ts";

export const DEFAULT_STATION_OPTIONS = {
  pendingDeadlineMs: 30_000,
  reconcileIntervalMs: 10_000,
  hostOfflineAfterMs: 30_000,
} as const;

export class Station {
  readonly store: StationStore;
  readonly metrics: StationMetrics;
  readonly options: StationOptions;
  /** Per-assignment ("assignment:ID") and per-volume ("volume:UNIT/NAME") serialization, shared with replacement.ts. */
  readonly locks: KeyedMutex;
  /** Carves (and grows) started on each unit and not yet in its reports: placement subtracts them. */
  readonly carves: CarveLedger;
  /** Moves a silent host's assignments to a spare host, old host fenced first (host_failover.ts). */
  readonly failover: HostFailover;
  private readonly ctx: StationContext;
  private readonly pool: UnitPool;
  private readonly grants: Grants;
  private readonly hosts: HostRegistry;
  private readonly assignments: AssignmentLifecycle;
  private readonly allocation: Allocation;
  private readonly volumes: VolumeOperations;
  private readonly reconciler: Reconciler;
  private timers: NodeJS.Timeout[] = [];

  constructor(store: StationStore, metrics: StationMetrics, options: StationOptions) {
    this.store = store;
    this.metrics = metrics;
    this.options = options;
    this.ctx = newStationContext(store, metrics, options);
    this.locks = this.ctx.locks;
    this.carves = this.ctx.carves;
    this.pool = new UnitPool(this.ctx, (units) => this.reconcileSoon(units));
    this.grants = new Grants(this.ctx, this.pool);
    this.hosts = new HostRegistry(this.ctx, this.grants);
    this.assignments = new AssignmentLifecycle(this.ctx, this.pool, this.grants);
    this.allocation = new Allocation(this.ctx, this.pool, this.hosts, this.assignments);
    this.volumes = new VolumeOperations(this.ctx, this.pool);
    this.reconciler = new Reconciler(this.ctx, this.assignments, this.grants, this.allocation);
    this.failover = new HostFailover(this, {
      failoverAfterMs: options.hostFailoverAfterMs ?? HOST_FAILOVER_AFTER_MS_DEFAULT,
      spareOnlineWithinMs: options.hostOfflineAfterMs,
      clock: store.clock,
    });
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
    this.timers.push(setInterval(() => this.hosts.sweepHosts(), Math.min(1000, this.options.hostOfflineAfterMs)).unref());
    const failoverAfterMs = this.options.hostFailoverAfterMs ?? HOST_FAILOVER_AFTER_MS_DEFAULT;
    this.timers.push(setInterval(() => void this.failover.check(), failoverCheckIntervalMs(failoverAfterMs)).unref());
    void this.reconcile();
  }

  async stop(): Promise<void> {
    this.ctx.stopped = true;
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
    await this.reconciler.idle();
  }

  // ---- units (pool/unit_pool.ts) --------------------------------------------------

  clientFor(unitName: string): UnitClient {
    return this.pool.clientFor(unitName);
  }

  /** A unit sent STARTUP (or a cold-start trap): its table generations may start anew. */
  unitStarted(name: string): void {
    this.pool.unitStarted(name);
  }

  /**
   * A unit's storage info (discovery, or its control API): the unit is the truth
   * for its volumes. Queued and written with everything else discovery said in
   * the same event-loop turn (one transaction); `immediate` writes it now.
   */
  applyStorageInfo(info: StorageInfo, fromHost: string | null, state: UnitState = "online", immediate = false, requestedAtMs?: number): Promise<void> {
    return this.pool.applyStorageInfo(info, fromHost, state, immediate, requestedAtMs);
  }

  setUnitState(name: string, state: UnitState): void {
    this.pool.setUnitState(name, state);
  }

  /** Reads the unit's info through its control API and applies it, unless a newer discovery report came in meanwhile. */
  refreshUnit(name: string): Promise<void> {
    return this.pool.refreshUnit(name);
  }

  /** A unit's free space as placement sees it: what it last reported minus the carves started there since. */
  usableFreeBytes(name: string): number {
    return this.pool.usableFreeBytes(name);
  }

  /** The pool as the allocator sees it (also replacement.ts's placement). */
  allocatorUnits(): AllocatorUnit[] {
    return this.pool.allocatorUnits();
  }

  // ---- hosts (hosts/host_registry.ts) ---------------------------------------------

  hostStateOf(name: string): HostState {
    return this.hosts.hostStateOf(name);
  }

  /** Registers or updates a host (`spare`, `iqn`: given, they are recorded); a changed address or iqn moves its grants along. */
  putHost(name: string, address: string, spare?: boolean, iqn?: string | null): Promise<{ created: boolean }> {
    return this.hosts.putHost(name, address, spare, iqn);
  }

  heartbeat(name: string): boolean {
    return this.hosts.heartbeat(name);
  }

  /** Host `host`'s NBD key on unit `unit` (64 hex digits). */
  hostKey(host: string, unit: string): string {
    return this.hosts.hostKey(host, unit);
  }

  /** The NBD keys host `host` needs: one per unit that holds a volume of its live assignments. */
  hostKeys(host: string): { unit: string; identity: string; key: string; tls: NbdTlsMode | null }[] {
    return this.hosts.hostKeys(host);
  }

  /** `ipsan hosts rotate-key NAME`: new keys for every unit of that host; the units get them with the grants now. */
  rotateHostKey(host: string): Promise<{ keyEpoch: number }> {
    return this.hosts.rotateHostKey(host);
  }

  // ---- grants (assignments/grants.ts) ---------------------------------------------

  /** Grants a volume should carry, for the hosts of its live, not-being-revoked assignments. */
  desiredGrants(unit: string, volume: string): string[] {
    return this.grants.desiredGrants(unit, volume);
  }

  /** Makes the unit's grants of one volume equal the desired ones (skipped when already equal, unless forced). */
  syncGrants(unit: string, volume: string, force: boolean): Promise<void> {
    return this.grants.syncGrants(unit, volume, force);
  }

  // ---- assignments (assignments/lifecycle.ts, allocation/allocation.ts) -------------

  /** Runs `body` under an assignment's lock (host failover's moves wait for unassign and leg work, and the other way round). */
  lockAssignment<T>(id: string, body: () => Promise<T>): Promise<T> {
    return this.locks.run(`assignment:${id}`, body);
  }

  /** Allocation with idempotency by requestId (docs/api.md "POST /api/v1/allocations"). */
  allocate(input: AllocationInput, callerAddress: string): Promise<AllocationAnswer> {
    return this.allocation.allocate(input, callerAddress);
  }

  /** Semi-automatic path: the admin assigns a chosen volume or partition to a chosen host. */
  assign(input: AssignInput): Promise<{ status: 200 | 201; assignment: AssignmentRecord }> {
    return this.assignments.assign(input);
  }

  /** Revokes an assignment: 204 when the unit dropped the grant, 202 when recorded and left to reconcile. */
  unassign(id: string): Promise<{ status: 202 | 204; assignment: AssignmentRecord }> {
    return this.assignments.unassign(id);
  }

  // ---- volume operations (volumes/volume_operations.ts) ---------------------------

  createVolume(unit: string, name: string, sizeBytes: number): Promise<VolumeRecord> {
    return this.volumes.createVolume(unit, name, sizeBytes);
  }

  deleteVolume(unit: string, name: string): Promise<void> {
    return this.volumes.deleteVolume(unit, name);
  }

  growVolume(unit: string, name: string, sizeBytes: number): Promise<VolumeRecord> {
    return this.volumes.growVolume(unit, name, sizeBytes);
  }

  partitionVolume(unit: string, name: string, sizesBytes: readonly number[]): Promise<VolumeRecord> {
    return this.volumes.partitionVolume(unit, name, sizesBytes);
  }

  // ---- reconcile (assignments/reconcile.ts) ---------------------------------------

  /** A reconcile soon (coalesced): of the given units (after their reports), or of everything. */
  reconcileSoon(units?: Iterable<string>): void {
    this.reconciler.reconcileSoon(units);
  }

  /**
   * One pass (`full`: every unit's grants; else those asked for by reconcileSoon);
   * concurrent callers share it, and one more pass runs after it if asked meanwhile.
   */
  reconcile(full = true): Promise<void> {
    return this.reconciler.reconcile(full);
  }
}
