// Allocation (POST /api/v1/allocations): choosing a placement (allocator.ts, pure)
// and recording it pending with its carves counted, with no await in between, then
// handing it to the assignments part to finish or undo; idempotent by requestId; a
// unit that refuses a carve is left out and the next placement tried.

import { IpsanError } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { formatSize } from "../../util/size.ts";
import { allocate, carveBytes, placeLegs, type Placement, type UnitReason } from "../allocator.ts";
import { isCarveRefusal, type AssignmentLifecycle } from "../assignments/lifecycle.ts";
import type { StationContext } from "../context.ts";
import type { HostRegistry } from "../hosts/host_registry.ts";
import type { UnitPool } from "../pool/unit_pool.ts";
import { newAssignmentId } from "../store.ts";
import type { AssignmentRecord, LegRecord, Protocol } from "../types.ts";
import { legBytesOf, legCarveId } from "./legs.ts";
import { iscsiUnitProblem, refuseHostWithoutIqn, refuseIscsiMirror } from "../assignments/protocol.ts";

const log = logger("station");

export interface AllocationInput {
  readonly requestId: string;
  readonly host: string;
  readonly sizeBytes: number;
  readonly address?: string;
  readonly dryRun?: boolean;
  /** 1 (default): one volume. 2..COPIES_MAX: a mirror, one leg per distinct unit. */
  readonly copies?: number;
  /** nbd (default) or iscsi: placed only on units that serve iSCSI; a single copy; the host needs an IQN. */
  readonly protocol?: Protocol;
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

export class Allocation {
  private readonly ctx: StationContext;
  private readonly pool: UnitPool;
  private readonly hosts: HostRegistry;
  private readonly assignments: AssignmentLifecycle;
  private readonly inflight = new Map<string, Promise<AllocationAnswer>>();

  constructor(ctx: StationContext, pool: UnitPool, hosts: HostRegistry, assignments: AssignmentLifecycle) {
    this.ctx = ctx;
    this.pool = pool;
    this.hosts = hosts;
    this.assignments = assignments;
  }

  /** Allocation with idempotency by requestId (docs/api.md "POST /api/v1/allocations"). */
  async allocate(input: AllocationInput, callerAddress: string): Promise<AllocationAnswer> {
    const startedMs = performance.now();
    try {
      const answer = await this.allocateOnce(input, callerAddress);
      this.ctx.metrics.allocations.inc(answer.kind === "dry_run" ? "dry_run" : answer.status === 201 ? "created" : "retried");
      return answer;
    } catch (error) {
      this.ctx.metrics.allocations.inc(error instanceof NoSpaceError ? "no_space" : "failed");
      throw error;
    } finally {
      if (input.dryRun !== true) this.ctx.metrics.allocationSeconds.observe((performance.now() - startedMs) / 1000);
    }
  }

  /**
   * protocol iscsi: the refusals (a mirror; a host without an IQN; a pool
   * where no unit serves iSCSI), and the units left out of placement (those
   * without a portal), with their reason for the 507.
   */
  private protocolExclusions(input: AllocationInput): Map<string, string> {
    const protocol = input.protocol ?? "nbd";
    const excluded = new Map<string, string>();
    if (protocol === "nbd") return excluded;
    refuseIscsiMirror(protocol, input.copies ?? 1);
    refuseHostWithoutIqn(protocol, input.host, this.ctx.store.hosts.get(input.host));
    for (const unit of this.ctx.store.units.values()) {
      const problem = iscsiUnitProblem(unit);
      if (problem !== undefined) excluded.set(unit.name, problem);
    }
    if (excluded.size === this.ctx.store.units.size) {
      throw new IpsanError(
        "CONFLICT",
        `no unit in the pool serves iSCSI (${excluded.size} unit${excluded.size === 1 ? "" : "s"}, none reports an iSCSI portal): ` +
          "start units with --iscsi HOST:PORT (3260 is the standard port), or ask with protocol nbd",
        { field: "protocol" },
      );
    }
    return excluded;
  }

  private async allocateOnce(input: AllocationInput, callerAddress: string): Promise<AllocationAnswer> {
    const copies = input.copies ?? 1;
    const excluded = this.protocolExclusions(input);
    if (input.dryRun === true && copies > 1) {
      const result = placeLegs(this.pool.allocatorUnits(), { sizeBytes: legBytesOf(input.sizeBytes), copies, reuse: false });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons, copies);
      return { kind: "dry_run", placement: result.legs[0] as Placement, legs: result.legs, copies, reasons: result.reasons };
    }
    if (input.dryRun === true) {
      const result = allocate(this.pool.allocatorUnits(), { sizeBytes: input.sizeBytes, excludeReasons: excluded });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons);
      return { kind: "dry_run", placement: result.placement, reasons: result.reasons };
    }
    const running = this.inflight.get(input.requestId);
    if (running !== undefined) {
      const answer = await running;
      return answer.kind === "assignment" ? { ...answer, status: 200 } : answer;
    }
    // A single copy's parameters are written as before copies existed, so old request ids still match.
    const protocol = input.protocol ?? "nbd";
    const params = JSON.stringify({
      kind: "allocation",
      host: input.host,
      sizeBytes: input.sizeBytes,
      ...(copies > 1 ? { copies } : {}),
      ...(protocol === "nbd" ? {} : { protocol }),
    });
    const previous = this.ctx.store.findRequest(input.requestId);
    if (previous !== undefined) {
      if (previous.params !== params) {
        throw new IpsanError(
          "CONFLICT",
          `requestId ${JSON.stringify(input.requestId)} was already used for a different request (${previous.params})`,
          { field: "requestId" },
        );
      }
      return { kind: "assignment", status: 200, assignment: await this.assignments.settled(previous.assignmentId) };
    }
    const work = this.allocateNew(input, callerAddress, params, excluded);
    this.inflight.set(input.requestId, work);
    try {
      return await work;
    } finally {
      this.inflight.delete(input.requestId);
    }
  }

  private noSpace(sizeBytes: number, reasons: readonly UnitReason[], copies = 1): IpsanError {
    // Units not heard from since this station started (or took the lead) may well have room:
    // "try again in a moment" (503), not "the pool is full" (507).
    const unheard = reasons.filter((r) => r.reason === "unknown").map((r) => r.unit);
    if (unheard.length > 0) {
      return new IpsanError(
        "UNAVAILABLE",
        `no unit heard from so far can hold ${formatSize(sizeBytes)}${copies > 1 ? ` x ${copies} copies` : ""}, and ${unheard.length} unit${unheard.length === 1 ? " has" : "s have"} not reported since this station started (${unheard.slice(0, 5).join(", ")}${unheard.length > 5 ? ", ..." : ""}); units report every second or so: retry in a few seconds`,
      );
    }
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

  private async allocateNew(input: AllocationInput, callerAddress: string, params: string, excluded: ReadonlyMap<string, string>): Promise<AllocationAnswer> {
    const known = this.ctx.store.hosts.get(input.host);
    const address = input.address ?? known?.address ?? callerAddress;
    // A new host is registered in the same transaction as its first assignment (one fsync, not two).
    let register: { name: string; address: string } | undefined;
    if (known === undefined) register = { name: input.host, address };
    else if (known.address !== address) await this.hosts.putHost(input.host, address);
    else this.hosts.heartbeat(input.host);
    if ((input.copies ?? 1) > 1) return this.allocateMirror(input, address, params, register);
    // Units that refused this request's carve, with their words (the 507's reasons if no unit is left),
    // and for protocol iscsi the units that serve no iSCSI.
    const refusals = new Map<string, string>(excluded);
    const refusalsBefore = refusals.size;
    for (;;) {
      const result = allocate(this.pool.allocatorUnits(), { sizeBytes: input.sizeBytes, excludeReasons: refusals });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons);
      const placement = result.placement;
      const nowMs = this.ctx.store.clock.nowMs();
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
        protocol: input.protocol ?? "nbd",
      };
      // No await between allocate() above and this insert: the placement is reserved atomically,
      // and a carve counts against the unit's free space until the unit reports it.
      this.ctx.store.insertAssignment(assignment, { requestId: input.requestId, params }, register);
      if (assignment.carved) {
        this.ctx.carves.reserve({ id, unit: assignment.unit, volume: assignment.volume, bytes: carveBytes(assignment.sizeBytes), sizeBytes: assignment.sizeBytes });
      }
      if (register !== undefined) {
        this.hosts.noteHostState(register.name);
        register = undefined;
      }
      try {
        return { kind: "assignment", status: 201, assignment: await this.assignments.finishOrUndo(assignment) };
      } catch (error) {
        // A unit that refused the carve (no space, volume limit) is left out and the next best tried:
        // a refusal is the unit's answer about this request, not a failure of the unit.
        if (!(assignment.carved && isCarveRefusal(error)) || refusals.has(assignment.unit) || refusals.size - refusalsBefore > this.ctx.store.units.size) throw error;
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
      const result = placeLegs(this.pool.allocatorUnits(), { sizeBytes: legBytes, copies, reuse: false, excludeReasons: refusals });
      if (!result.ok) throw this.noSpace(input.sizeBytes, result.reasons, copies);
      const nowMs = this.ctx.store.clock.nowMs();
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
      this.ctx.store.insertAssignment(assignment, { requestId: input.requestId, params }, register);
      for (const leg of legs) {
        this.ctx.carves.reserve({ id: legCarveId(id, leg.index), unit: leg.unit, volume: leg.volume, bytes: carveBytes(leg.sizeBytes), sizeBytes: leg.sizeBytes });
      }
      if (register !== undefined) {
        this.hosts.noteHostState(register.name);
        register = undefined;
      }
      try {
        return { kind: "assignment", status: 201, assignment: await this.assignments.finishOrUndo(assignment) };
      } catch (error) {
        if (!isCarveRefusal(error) || refusals.has(error.unit) || refusals.size > this.ctx.store.units.size) throw error;
        refusals.set(error.unit, `refused the carve: ${error.message.replace(`unit ${error.unit}: `, "")}`);
        log.info("unit refused a mirror leg's carve; placing the legs again", { id, unit: error.unit, legBytes, error: error.message });
        continue;
      }
    }
  }

  isInflight(assignment: AssignmentRecord): boolean {
    return assignment.requestId !== null && this.inflight.has(assignment.requestId);
  }
}
