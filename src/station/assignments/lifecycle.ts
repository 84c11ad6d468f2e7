// Assignments: a new one (manual assign, or an allocation's) finished in line or
// undone; a pending one settled by reconcile; unassign and the revoke that takes
// the grants off. Intent is recorded first, then the unit told, then the outcome
// recorded: whatever a failure leaves in between, reconcile finishes or undoes.

import type { VolumeInfo } from "../../discovery/messages.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { legCarveId } from "../allocation/legs.ts";
import type { StationContext } from "../context.ts";
import type { UnitPool } from "../pool/unit_pool.ts";
import { newAssignmentId, volumesOf } from "../store.ts";
import type { AssignmentDetail, AssignmentRecord, LegRecord, Protocol, VolumeRecord } from "../types.ts";
import { UnitCallError, type UnitClient } from "../unit_client.ts";
import { SECTOR_BYTES, assignedExtents, mapRange, reachableNbd } from "../views.ts";
import { canonicalGrant, type Grants } from "./grants.ts";
import { refuseHostWithoutIqn, refuseUnitWithoutIscsi } from "./protocol.ts";

const log = logger("station");

export interface AssignInput {
  readonly host: string;
  readonly unit: string;
  readonly volume: string;
  readonly partition?: number;
  readonly requestId?: string;
  /** nbd (default) or iscsi (the unit must serve iSCSI, the host have an IQN). */
  readonly protocol?: Protocol;
}

/** The unit refused to create a volume (no space, volume limit, bad name): it made nothing. */
export function isCarveRefusal(error: unknown): error is UnitCallError {
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

export class AssignmentLifecycle {
  private readonly ctx: StationContext;
  private readonly pool: UnitPool;
  private readonly grants: Grants;

  constructor(ctx: StationContext, pool: UnitPool, grants: Grants) {
    this.ctx = ctx;
    this.pool = pool;
    this.grants = grants;
  }

  /** Semi-automatic path: the admin assigns a chosen volume or partition to a chosen host. */
  async assign(input: AssignInput): Promise<{ status: 200 | 201; assignment: AssignmentRecord }> {
    const host = this.ctx.store.hosts.get(input.host);
    if (host === undefined) {
      throw new IpsanError("NOT_FOUND", `host ${JSON.stringify(input.host)} not found: register it first (PUT /api/v1/hosts/NAME)`, { field: "host" });
    }
    const protocol = input.protocol ?? "nbd";
    // An NBD assignment's parameters are written as before protocols existed, so old request ids still match.
    const params = JSON.stringify({
      kind: "assignment",
      host: input.host,
      unit: input.unit,
      volume: input.volume,
      partition: input.partition ?? null,
      ...(protocol === "nbd" ? {} : { protocol }),
    });
    if (input.requestId !== undefined) {
      const previous = this.ctx.store.findRequest(input.requestId);
      if (previous !== undefined) {
        if (previous.params !== params) {
          throw new IpsanError("CONFLICT", `requestId ${JSON.stringify(input.requestId)} was already used for a different request`, { field: "requestId" });
        }
        return { status: 200, assignment: await this.settled(previous.assignmentId) };
      }
    }
    const unitRecord = this.ctx.store.units.get(input.unit);
    if (unitRecord === undefined) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(input.unit)} not found`, { field: "unit" });
    refuseHostWithoutIqn(protocol, input.host, host);
    refuseUnitWithoutIscsi(protocol, unitRecord);
    const volume = this.ctx.store.volume(input.unit, input.volume);
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
    const perExport = this.ctx.store.units.get(input.unit)?.tls !== "off";
    for (const other of this.ctx.store.liveOnVolume(input.unit, input.volume)) {
      const overlaps = other.partition === null || partition === null || other.partition === partition;
      if (overlaps || (other.host !== input.host && !perExport)) {
        throw new IpsanError(
          "CONFLICT",
          `volume ${input.unit}/${input.volume}${other.partition === null ? "" : ` partition ${other.partition}`} is already assigned to host ${other.host} (assignment ${other.id}); ${overlaps ? "an export belongs to one host" : `unit ${input.unit} runs with --insecure-plaintext and admits hosts by address to whole volumes, so a volume belongs to one host there`}`,
          { field: "volume" },
        );
      }
    }
    const nowMs = this.ctx.store.clock.nowMs();
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
      protocol,
    };
    this.ctx.store.insertAssignment(assignment, input.requestId === undefined ? undefined : { requestId: input.requestId, params });
    return { status: 201, assignment: await this.finishOrUndo(assignment) };
  }

  /** The in-line path of a new assignment: finish it now, or undo it before answering the error. */
  finishOrUndo(assignment: AssignmentRecord): Promise<AssignmentRecord> {
    return this.ctx.locks.run(`assignment:${assignment.id}`, async () => {
      try {
        return await this.finish(assignment);
      } catch (error) {
        await this.undo(assignment, errorMessage(error), error);
        throw error;
      }
    });
  }

  /** An existing assignment, with a pending one finished (or undone) first. */
  async settled(id: string): Promise<AssignmentRecord> {
    const assignment = this.ctx.store.getAssignment(id);
    if (assignment === undefined) throw new IpsanError("NOT_FOUND", `assignment ${id} not found`);
    if (assignment.state !== "pending") return assignment;
    await this.settlePending(assignment);
    return this.ctx.store.getAssignment(id) ?? assignment;
  }

  /**
   * Tells the unit (create the carved volume if missing, put grants) and marks
   * the assignment active. The unit's answers and the activation are committed
   * together (one fsync). Caller holds the assignment lock.
   */
  private async finish(assignment: AssignmentRecord): Promise<AssignmentRecord> {
    const current = this.ctx.store.getAssignment(assignment.id);
    if (current === undefined || current.state !== "pending") return current ?? assignment;
    if (current.legs.length > 0) return this.finishMirror(current);
    const client = this.pool.clientFor(current.unit);
    let volume = this.ctx.store.volume(current.unit, current.volume);
    if (volume === undefined && current.carved) {
      let created: VolumeInfo;
      try {
        created = await client.createVolume(current.volume, current.sizeBytes);
        // The unit made it; its free space in the station's eyes drops when its next report lists it
        // (until then the ledger keeps counting it: no free-space estimate to go stale).
        this.ctx.carves.settle(current.id, this.ctx.store.clock.nowMs());
      } catch (error) {
        if (error instanceof UnitCallError && error.unitCode === "NO_SPACE" && isCarveRefusal(error)) this.pool.noteNoSpace(current.unit, current.sizeBytes);
        // Made by an earlier attempt (a retry after a lost answer, or before a station crash).
        if (!(error instanceof UnitCallError && error.unitCode === "ALREADY_EXISTS")) throw error;
        this.ctx.carves.settle(current.id, this.ctx.store.clock.nowMs());
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
    const active = await this.ctx.locks.run(`volume:${current.unit}/${current.volume}`, async () => {
      if (current.wipe) await this.wipeBeforeGrant(client, current);
      const granted = await client.setGrants(current.volume, this.grants.desiredGrants(current.unit, current.volume));
      const unit = this.ctx.store.units.get(current.unit);
      const detail: AssignmentDetail = {
        volumeNumber: granted.number,
        sizeBytes: range.sizeBytes,
        extents: range.extents,
        nbd: reachableNbd(unit?.nbd ?? null, unit?.addresses ?? []),
      };
      return this.ctx.store.updateAssignment(current.id, "active", {
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
        this.ctx.locks.run(`volume:${leg.unit}/${leg.volume}`, async () => {
          const granted = await this.pool.clientFor(leg.unit).setGrants(leg.volume, this.grants.desiredGrants(leg.unit, leg.volume));
          return { unit: leg.unit, ...granted, grants: granted.grants.map(canonicalGrant) };
        }),
      ),
    );
    const granted = settledValues(volumes);
    const legs: LegRecord[] = current.legs.map((leg, i) => {
      const volume = granted[i] as VolumeRecord;
      const unit = this.ctx.store.units.get(leg.unit);
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
    const firstUnit = this.ctx.store.units.get(first.unit);
    const detail: AssignmentDetail = {
      volumeNumber: first.number,
      sizeBytes: current.sizeBytes,
      // Where the mirror's data lies on the first leg (its last MiB, the mirror's metadata, left out).
      extents: mapRange(first.extents, 0, Math.ceil(current.sizeBytes / SECTOR_BYTES)),
      nbd: reachableNbd(firstUnit?.nbd ?? null, firstUnit?.addresses ?? []),
    };
    const active = this.ctx.store.updateAssignment(current.id, "active", { detail, error: null, legs, volumes: granted as VolumeRecord[] });
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
    const known = this.ctx.store.volume(leg.unit, leg.volume);
    const check = (volume: { sizeBytes: number }): void => {
      if (volume.sizeBytes !== leg.sizeBytes) {
        throw new IpsanError("CONFLICT", `mirror leg ${leg.unit}/${leg.volume} exists with ${volume.sizeBytes} bytes, not ${leg.sizeBytes}`);
      }
    };
    if (known !== undefined) {
      check(known);
      return known;
    }
    const client = this.pool.clientFor(leg.unit);
    const carveId = legCarveId(current.id, leg.index);
    let created: VolumeInfo;
    try {
      created = await client.createVolume(leg.volume, leg.sizeBytes);
      this.ctx.carves.settle(carveId, this.ctx.store.clock.nowMs());
    } catch (error) {
      if (error instanceof UnitCallError && error.unitCode === "NO_SPACE" && isCarveRefusal(error)) this.pool.noteNoSpace(leg.unit, leg.sizeBytes);
      if (!(error instanceof UnitCallError && error.unitCode === "ALREADY_EXISTS")) throw error;
      this.ctx.carves.settle(carveId, this.ctx.store.clock.nowMs());
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
    const startedMs = this.ctx.store.clock.nowMs();
    try {
      await client.wipeVolume(current.volume);
    } catch (error) {
      if (!(error instanceof UnitCallError && error.unitCode === "CONFLICT")) throw error;
      log.info("volume to wipe still has grants; revoking them first", { id: current.id, unit: current.unit, volume: current.volume });
      await client.setGrants(current.volume, []);
      await client.wipeVolume(current.volume);
    }
    log.info("volume wiped before reuse", { id: current.id, host: current.host, unit: current.unit, volume: current.volume, ms: this.ctx.store.clock.nowMs() - startedMs });
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
    const current = this.ctx.store.getAssignment(assignment.id);
    if (current === undefined || current.state !== "pending") return;
    this.ctx.store.updateAssignment(current.id, "failed", { error: reason, dropRequest: true });
    log.warn("assignment undone", { id: current.id, host: current.host, unit: current.unit, volume: current.volume, copies: current.copies, reason });
    if (current.legs.length > 0) {
      await Promise.all(current.legs.map((leg) => this.undoLeg(current, leg, cause)));
      return;
    }
    if (current.carved && isCarveRefusal(cause)) {
      this.ctx.carves.release(current.id);
      return;
    }
    const unit = this.ctx.store.units.get(current.unit);
    if (unit === undefined || unit.control === null || unit.state === "offline" || unit.state === "down") {
      this.ctx.carves.settle(current.id, this.ctx.store.clock.nowMs());
      return;
    }
    try {
      const volume = this.ctx.store.volume(current.unit, current.volume);
      if (volume !== undefined) await this.grants.syncGrants(current.unit, current.volume, false);
      if (current.carved && !this.ctx.store.isVolumeAssigned(current.unit, current.volume)) {
        await this.ctx.locks.run(`volume:${current.unit}/${current.volume}`, async () => {
          try {
            await this.pool.clientFor(current.unit).deleteVolume(current.volume);
          } catch (error) {
            if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
          }
          this.ctx.store.removeVolume(current.unit, current.volume);
          this.ctx.carves.releaseVolume(current.unit, current.volume);
        });
      }
    } catch (error) {
      log.limited(`undo:${current.unit}`, "cleanup after an undone assignment failed; reconcile fixes grants later", {
        id: current.id,
        error: errorMessage(error),
      });
    } finally {
      this.ctx.carves.settle(current.id, this.ctx.store.clock.nowMs());
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
      this.ctx.carves.release(carveId);
      return;
    }
    const unit = this.ctx.store.units.get(leg.unit);
    if (unit === undefined || unit.control === null || unit.state === "offline" || unit.state === "down") {
      this.ctx.carves.settle(carveId, this.ctx.store.clock.nowMs());
      return;
    }
    try {
      if (this.ctx.store.volume(leg.unit, leg.volume) !== undefined) await this.grants.syncGrants(leg.unit, leg.volume, false);
      if (!this.ctx.store.isVolumeAssigned(leg.unit, leg.volume)) {
        await this.ctx.locks.run(`volume:${leg.unit}/${leg.volume}`, async () => {
          try {
            await this.pool.clientFor(leg.unit).deleteVolume(leg.volume);
          } catch (error) {
            if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
          }
          this.ctx.store.removeVolume(leg.unit, leg.volume);
          this.ctx.carves.releaseVolume(leg.unit, leg.volume);
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
      this.ctx.carves.settle(carveId, this.ctx.store.clock.nowMs());
    }
  }

  /** Reconcile of one pending assignment: finish it, or undo it if it is too old or already failed once. */
  settlePending(assignment: AssignmentRecord): Promise<void> {
    return this.ctx.locks.run(`assignment:${assignment.id}`, async () => {
      const current = this.ctx.store.getAssignment(assignment.id);
      if (current === undefined || current.state !== "pending") return;
      const ageMs = this.ctx.store.clock.nowMs() - current.createdAtMs;
      if (current.error !== null || ageMs > this.ctx.options.pendingDeadlineMs) {
        await this.undo(current, current.error ?? `not finished within ${this.ctx.options.pendingDeadlineMs} ms`);
        return;
      }
      // Wait for every unit it needs (each leg's of a mirror), until the deadline.
      for (const [name] of volumesOf(current)) {
        const unit = this.ctx.store.units.get(name);
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
    return this.ctx.locks.run(`assignment:${id}`, async () => {
      const current = this.ctx.store.getAssignment(id);
      if (current === undefined) throw new IpsanError("NOT_FOUND", `assignment ${JSON.stringify(id)} not found`, { field: "id" });
      if (current.state === "released" || current.state === "failed") return { status: 204 as const, assignment: current };
      if (current.state === "pending") {
        throw new IpsanError("CONFLICT", `assignment ${id} is still being set up; try again in a moment`, { field: "id" });
      }
      const revoking = current.state === "revoking" ? current : this.ctx.store.updateAssignment(id, "revoking");
      const done = await this.finishRevoke(revoking);
      return done === null ? { status: 202 as const, assignment: revoking } : { status: 204 as const, assignment: done };
    });
  }

  /**
   * Removes the grants of a revoking assignment (every leg's, for a mirror) and
   * marks it released; null if a unit cannot be told now (reconcile retries
   * the legs not yet told; a unit known to be away is not called).
   */
  async finishRevoke(assignment: AssignmentRecord): Promise<AssignmentRecord | null> {
    let told = true;
    for (const [unit, volume] of volumesOf(assignment)) {
      const state = this.ctx.store.units.get(unit)?.state;
      if (assignment.legs.length > 0 && (state === "offline" || state === "down")) {
        told = false;
        continue;
      }
      try {
        await this.grants.syncGrants(unit, volume, true);
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
    const released = this.ctx.store.updateAssignment(assignment.id, "released");
    log.info("assignment released", { id: released.id, host: released.host, unit: released.unit, volume: released.volume });
    return released;
  }
}
