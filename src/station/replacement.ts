// Automatic replacement of a mirror leg whose unit stays away (issue 6 section
// 3, station side; docs/api.md "Leg replacement"). A reconcile-style loop, one
// pass every `tickMs`:
//
// 1. A leg whose unit has been away (offline, down, or not heard from since
//    the station started) for longer than `replaceAfterMs` is replaced, unless
//    no other leg of the mirror is in-sync on a unit that is here (replacing
//    the only good copy's peer would leave nothing to rebuild from, and a leg
//    reported as the only in-sync one is never given up). The new leg goes on
//    a spare unit in a failure domain the mirror's other legs do not use, else
//    any spare, else any unit with room in a new domain, else any unit with
//    room; never on a unit that holds a leg of this mirror. None: event
//    leg-replacement-waiting, retried every pass.
// 2. The replacement is recorded first (leg_replacements, event
//    leg-replacing), then its volume is carved and granted to the mirror's
//    host, then it is swapped into the assignment at the same index, state
//    "rebuilding", in one commit that also records the old leg's volume for
//    deletion (event leg-replaced). The host's agent sees a different
//    unit+volume at that index and gives it a full copy.
// 3. A replacement that cannot finish (the assignment is no longer active,
//    the new unit refused, or it is older than the pending deadline) is undone
//    (event leg-replacement-undone): its volume, if made, is deleted when its
//    unit is here. After a station crash, each recorded replacement is carried
//    on by the same code: finished (the carve and the grant are idempotent) or
//    undone; never half.
// 4. The old leg's volume is deleted only once its unit is back AND the leg
//    that replaced it is reported in-sync by the host (or the assignment is
//    over): event leg-volume-deleted; until then leg-volume-kept says why,
//    once per reason.
//
// Time comes from an injected clock (the store's), so tests can decide it.

import { VOLUMES_PER_UNIT_MAX } from "../discovery/messages.ts";
import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { formatDuration } from "../util/duration.ts";
import { carveBytes, failureDomain, placeLegs, type AllocatorUnit, type Placement, type UnitReason } from "./allocator.ts";
import { legCarveId, type Station } from "./station.ts";
import { replacementKey, volumeKey, type Clock } from "./store.ts";
import type { AssignmentDetail, AssignmentRecord, LegDeletionRecord, LegRecord, LegReplacementRecord, UnitState, VolumeRecord } from "./types.ts";
import { UnitCallError } from "./unit_client.ts";
import { SECTOR_BYTES, assignedExtents, mapRange, reachableNbd } from "./views.ts";

const log = logger("station");

/** `ipsan station --replace-after` default. */
export const REPLACE_AFTER_DEFAULT_MS = 5 * 60_000;
/** Longest pause between two passes of the loop. */
export const REPLACEMENT_TICK_MS_MAX = 1_000;

/** A unit is "here" (its legs can be read and written) in these states; anything else counts as away. */
const PRESENT_STATES: ReadonlySet<UnitState> = new Set(["online", "suspect"]);

export interface LegReplacerOptions {
  readonly replaceAfterMs: number;
  readonly clock?: Clock;
  /** Pause between passes (default: a quarter of replaceAfterMs, at most REPLACEMENT_TICK_MS_MAX). */
  readonly tickMs?: number;
}

/** The placement tiers a replacement leg tries, best first. */
function replacementTiers(units: readonly AllocatorUnit[], usedDomains: ReadonlySet<string>): AllocatorUnit[][] {
  const fresh = (u: AllocatorUnit): boolean => !usedDomains.has(failureDomain(u));
  const spares = units.filter((u) => u.spare === true);
  const others = units.filter((u) => u.spare !== true);
  return [spares.filter(fresh), spares, others.filter(fresh), others];
}

/**
 * Where a replacement leg of `sizeBytes` goes, or why nowhere: pure, over the
 * pool as the allocator sees it. `mirrorUnits`: every unit holding a leg of
 * this mirror (left out); `usedDomains`: the failure domains of the legs that stay.
 */
export function placeReplacement(
  units: readonly AllocatorUnit[],
  sizeBytes: number,
  mirrorUnits: ReadonlySet<string>,
  usedDomains: ReadonlySet<string>,
): { ok: true; placement: Placement } | { ok: false; reasons: readonly UnitReason[] } {
  const candidates = units.filter((u) => !mirrorUnits.has(u.name));
  for (const tier of replacementTiers(candidates, usedDomains)) {
    if (tier.length === 0) continue;
    const result = placeLegs(tier, { sizeBytes, copies: 1, reuse: false, spares: true });
    if (result.ok && result.legs[0] !== undefined) return { ok: true, placement: result.legs[0] };
  }
  const all = placeLegs(candidates, { sizeBytes, copies: 1, reuse: false, spares: true });
  const reasons = [
    ...units.filter((u) => mirrorUnits.has(u.name)).map((u) => ({ unit: u.name, reason: "holds a leg of this mirror" })),
    ...(all.ok ? [] : all.reasons),
  ].sort((a, b) => (a.unit < b.unit ? -1 : a.unit > b.unit ? 1 : 0));
  return { ok: false, reasons };
}

export class LegReplacer {
  private readonly station: Station;
  private readonly replaceAfterMs: number;
  private readonly clock: Clock;
  private readonly tickMs: number;
  /** When each unit was first seen away (memory only: after a restart the wait starts again). */
  private readonly awaySinceMs = new Map<string, number>();
  /** Last leg-replacement-waiting / leg-volume-kept reason per leg or volume (events only when it changes). */
  private readonly lastSaid = new Map<string, string>();
  private timer: NodeJS.Timeout | null = null;
  private pass: Promise<void> | null = null;
  private stopped = false;

  constructor(station: Station, options: LegReplacerOptions) {
    this.station = station;
    this.replaceAfterMs = options.replaceAfterMs;
    this.clock = options.clock ?? station.store.clock;
    this.tickMs = options.tickMs ?? Math.max(50, Math.min(REPLACEMENT_TICK_MS_MAX, Math.floor(options.replaceAfterMs / 4)));
  }

  start(): void {
    const recorded = this.station.store.replacements.size;
    if (recorded > 0) log.info("leg replacements recorded before a restart: finishing or undoing them", { count: recorded });
    this.timer = setInterval(() => void this.runPass(), this.tickMs);
    this.timer.unref();
    void this.runPass();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
    await this.pass?.catch(() => undefined);
  }

  /** One pass (concurrent callers share it). */
  runPass(): Promise<void> {
    if (this.pass !== null) return this.pass;
    this.pass = this.passOnce()
      .catch((error: unknown) => log.error("leg replacement pass failed", { error: errorMessage(error) }))
      .finally(() => {
        this.pass = null;
      });
    return this.pass;
  }

  private isAway(unit: string): boolean {
    const state = this.station.store.units.get(unit)?.state;
    return state === undefined || !PRESENT_STATES.has(state);
  }

  private async passOnce(): Promise<void> {
    const store = this.station.store;
    const nowMs = this.clock.nowMs();
    for (const unit of store.units.values()) {
      if (PRESENT_STATES.has(unit.state)) this.awaySinceMs.delete(unit.name);
      else if (!this.awaySinceMs.has(unit.name)) this.awaySinceMs.set(unit.name, nowMs);
    }
    // Replacements recorded earlier (a crash, or a unit that did not answer yet): carried on or undone.
    for (const record of [...store.replacements.values()]) {
      if (this.stopped) return;
      await this.carry(record);
    }
    for (const assignment of [...store.live.values()]) {
      if (this.stopped) return;
      if (assignment.state !== "active" || assignment.legs.length === 0) continue;
      for (const leg of assignment.legs) {
        const since = this.awaySinceMs.get(leg.unit);
        if (since === undefined || nowMs - since < this.replaceAfterMs) continue;
        if (store.replacements.has(replacementKey(assignment.id, leg.index))) continue;
        await this.replace(assignment.id, leg.index);
      }
    }
    await this.deleteOldLegs();
  }

  /** Says `reason` about `key` as event `action`, unless it said the same last time. */
  private sayOnce(key: string, action: string, subject: string, reason: string, data: Record<string, unknown>): void {
    if (this.lastSaid.get(key) === reason) return;
    this.lastSaid.set(key, reason);
    if (this.lastSaid.size > 10_000) this.lastSaid.clear();
    this.station.store.recordEvent(action, subject, { ...data, reason });
  }

  /** Decides and records one leg's replacement, then carries it out (under the assignment's lock). */
  private replace(id: string, index: number): Promise<void> {
    return this.station.locks.run(`assignment:${id}`, async () => {
      const store = this.station.store;
      const current = store.getAssignment(id);
      const leg = current?.legs.find((l) => l.index === index);
      if (current === undefined || current.state !== "active" || leg === undefined || !this.isAway(leg.unit)) return;
      if (store.replacements.has(replacementKey(id, index))) return;
      const waitingKey = `waiting:${id}/${index}`;
      const base = { id, leg: index, unit: leg.unit, volume: leg.volume };
      const peers = current.legs.filter((l) => l.index !== index && l.state === "in-sync" && !this.isAway(l.unit));
      if (peers.length === 0) {
        this.sayOnce(waitingKey, "leg-replacement-waiting", id, "no other leg of the mirror is in-sync on a unit that is here: nothing to rebuild from", base);
        return;
      }
      const mirrorUnits = new Set(current.legs.map((l) => l.unit));
      const units = this.station.allocatorUnits();
      const usedDomains = new Set(
        current.legs.filter((l) => l.index !== index).flatMap((l) => units.filter((u) => u.name === l.unit).map((u) => failureDomain(u))),
      );
      const placed = placeReplacement(units, leg.sizeBytes, mirrorUnits, usedDomains);
      if (!placed.ok) {
        const reason = `no unit can take a leg of ${leg.sizeBytes} bytes: ${placed.reasons.map((r) => `${r.unit}: ${r.reason}`).join("; ") || "the pool has no other units"}`;
        this.sayOnce(waitingKey, "leg-replacement-waiting", id, reason, { ...base, reasons: placed.reasons });
        return;
      }
      this.lastSaid.delete(waitingKey);
      const nowMs = this.clock.nowMs();
      const record: LegReplacementRecord = {
        assignmentId: id,
        leg: index,
        oldUnit: leg.unit,
        oldVolume: leg.volume,
        newUnit: placed.placement.unit,
        newVolume: this.newVolumeName(id, index, placed.placement.unit, nowMs),
        sizeBytes: leg.sizeBytes,
        createdAtMs: nowMs,
      };
      // No await between placement and this commit: the carve is counted at once.
      store.beginReplacement(record, {
        ...base,
        to: { unit: record.newUnit, volume: record.newVolume },
        awayMs: nowMs - (this.awaySinceMs.get(leg.unit) ?? nowMs),
      });
      this.station.carves.reserve({ id: this.carveId(record), unit: record.newUnit, volume: record.newVolume, bytes: carveBytes(record.sizeBytes), sizeBytes: record.sizeBytes });
      log.warn("replacing a mirror leg whose unit is away", {
        id,
        leg: index,
        from: `${leg.unit}/${leg.volume}`,
        to: `${record.newUnit}/${record.newVolume}`,
        after: formatDuration(this.replaceAfterMs),
      });
      await this.carryLocked(record);
    });
  }

  /** A name no volume on the unit has, and no replacement or deletion holds (an undone one may still be there). */
  private newVolumeName(id: string, index: number, unit: string, nowMs: number): string {
    const base = `h-${id.slice(2)}-l${index}-r${nowMs.toString(36)}`;
    const taken = (name: string): boolean => this.station.store.volume(unit, name) !== undefined || this.station.store.heldByLegWork(unit, name);
    // Bounded: each taken name is a volume or record of its own, and the unit holds at most VOLUMES_PER_UNIT_MAX.
    for (let n = 0; n <= VOLUMES_PER_UNIT_MAX; n++) {
      const name = n === 0 ? base : `${base}-${n}`;
      if (!taken(name)) return name;
    }
    throw new Error(`no free volume name for a replacement leg on unit ${unit}`);
  }

  private carveId(record: LegReplacementRecord): string {
    return `${legCarveId(record.assignmentId, record.leg)}/replacement`;
  }

  private carry(record: LegReplacementRecord): Promise<void> {
    return this.station.locks.run(`assignment:${record.assignmentId}`, () => this.carryLocked(record));
  }

  /** Makes, grants and swaps in a recorded replacement, or undoes it. Caller holds the assignment lock. */
  private async carryLocked(record: LegReplacementRecord): Promise<void> {
    const store = this.station.store;
    if (store.replacements.get(replacementKey(record.assignmentId, record.leg)) !== record) return; // done meanwhile
    const stillWanted = (): string | null => {
      const current = store.getAssignment(record.assignmentId);
      if (current === undefined || current.state !== "active") return `the assignment is ${current?.state ?? "gone"}`;
      const leg = current.legs.find((l) => l.index === record.leg);
      if (leg === undefined || leg.unit !== record.oldUnit || leg.volume !== record.oldVolume) return "the leg changed meanwhile";
      return null;
    };
    const why = stillWanted();
    if (why !== null) return this.undo(record, why);
    const ageMs = this.clock.nowMs() - record.createdAtMs;
    const tooOld = ageMs > this.station.options.pendingDeadlineMs;
    const unit = store.units.get(record.newUnit);
    if (unit === undefined || !PRESENT_STATES.has(unit.state)) {
      if (tooOld) return this.undo(record, `unit ${record.newUnit} is ${unit?.state ?? "gone"} and the replacement is older than ${formatDuration(this.station.options.pendingDeadlineMs)}`);
      return; // wait for it (the next pass tries again)
    }
    let volume: VolumeRecord;
    try {
      volume = await this.makeAndGrant(record);
    } catch (error) {
      const transient = error instanceof UnitCallError && error.transient;
      if (transient && !tooOld) {
        log.limited(`replace:${record.newUnit}`, "replacement leg not made yet; retrying", { id: record.assignmentId, leg: record.leg, error: errorMessage(error) });
        return;
      }
      return this.undo(record, `unit ${record.newUnit}: ${errorMessage(error)}`);
    }
    // Synchronous from here to the commit: nothing can change the assignment in between.
    const late = stillWanted();
    if (late !== null) return this.undo(record, late);
    const current = store.getAssignment(record.assignmentId) as AssignmentRecord;
    const detail: AssignmentDetail = {
      volumeNumber: volume.number,
      sizeBytes: volume.sizeBytes,
      extents: assignedExtents(volume, null)?.extents ?? [],
      nbd: reachableNbd(unit.nbd, unit.addresses),
    };
    const assignmentDetail: AssignmentDetail | null =
      record.leg === 0
        ? { ...detail, sizeBytes: current.sizeBytes, extents: mapRange(volume.extents, 0, Math.ceil(current.sizeBytes / SECTOR_BYTES)) }
        : current.detail;
    store.swapLeg(record, volume, detail, assignmentDetail);
    log.info("mirror leg replaced; the host rebuilds it", { id: record.assignmentId, leg: record.leg, unit: record.newUnit, volume: record.newVolume });
  }

  /** The replacement's volume on its unit (made now, or found made by an earlier attempt), granted to the mirror's host. */
  private async makeAndGrant(record: LegReplacementRecord): Promise<VolumeRecord> {
    const client = this.station.clientFor(record.newUnit);
    try {
      await client.createVolume(record.newVolume, record.sizeBytes);
    } catch (error) {
      if (!(error instanceof UnitCallError && error.unitCode === "ALREADY_EXISTS")) {
        if (error instanceof UnitCallError && error.failure === "refused") this.station.carves.release(this.carveId(record));
        throw error;
      }
      const made = await client.getVolume(record.newVolume);
      if (made.sizeBytes !== record.sizeBytes) throw new Error(`volume ${record.newUnit}/${record.newVolume} exists with ${made.sizeBytes} bytes, not ${record.sizeBytes}`);
    } finally {
      this.station.carves.settle(this.carveId(record), this.clock.nowMs());
    }
    const granted = await this.station.locks.run(`volume:${record.newUnit}/${record.newVolume}`, () =>
      client.setGrants(record.newVolume, this.station.desiredGrants(record.newUnit, record.newVolume)),
    );
    return { unit: record.newUnit, ...granted, grants: [...granted.grants] };
  }

  private undo(record: LegReplacementRecord, reason: string): void {
    log.warn("leg replacement undone", { id: record.assignmentId, leg: record.leg, unit: record.newUnit, volume: record.newVolume, reason });
    this.station.store.undoReplacement(record, reason);
    this.station.carves.settle(this.carveId(record), this.clock.nowMs());
  }

  // ---- old legs -----------------------------------------------------------------

  /** Why an old leg's volume must stay for now, or null if it may go. */
  private keepReason(deletion: LegDeletionRecord): string | null {
    if (deletion.reason === "undone") return null;
    const assignment = this.station.store.live.get(deletion.assignmentId);
    if (assignment === undefined || assignment.state !== "active") return null; // the mirror is over: nothing rebuilds from it
    const leg: LegRecord | undefined = assignment.legs.find((l) => l.index === deletion.leg);
    if (leg === undefined || leg.state === "in-sync") return null;
    return `the leg that replaced it (${leg.unit}/${leg.volume}) is ${leg.state}, not in-sync yet`;
  }

  private async deleteOldLegs(): Promise<void> {
    const store = this.station.store;
    for (const deletion of [...store.legDeletions.values()]) {
      if (this.stopped) return;
      const unit = store.units.get(deletion.unit);
      if (unit === undefined || unit.control === null || unit.state !== "online") continue; // when its unit returns
      const key = `kept:${volumeKey(deletion.unit, deletion.volume)}`;
      const data = { id: deletion.assignmentId, leg: deletion.leg, unit: deletion.unit, volume: deletion.volume, kind: deletion.reason };
      const keep = this.keepReason(deletion);
      if (keep !== null) {
        this.sayOnce(key, "leg-volume-kept", deletion.assignmentId, keep, data);
        continue;
      }
      try {
        await this.station.locks.run(`volume:${deletion.unit}/${deletion.volume}`, async () => {
          const client = this.station.clientFor(deletion.unit);
          try {
            // The unit refuses to delete a granted volume: the grants go first (nobody may use it now).
            await client.setGrants(deletion.volume, []);
            await client.deleteVolume(deletion.volume);
          } catch (error) {
            if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
          }
          store.finishLegDeletion(deletion, data);
          this.station.carves.releaseVolume(deletion.unit, deletion.volume);
        });
        this.lastSaid.delete(key);
        log.info("old mirror leg volume deleted", data);
      } catch (error) {
        log.limited(`leg-delete:${deletion.unit}`, "cannot delete an old leg's volume yet; retrying", { ...data, error: errorMessage(error) });
      }
    }
  }
}
