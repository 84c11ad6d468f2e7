// The reconcile pass: pending assignments finished or undone, revoking ones
// released, and every volume's grants on its unit made equal to what the live
// assignments want. Passes are coalesced: concurrent callers share one, and one
// more runs after it if asked meanwhile; reconcileSoon debounces unit reports.

import { errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import type { Allocation } from "../allocation/allocation.ts";
import type { StationContext } from "../context.ts";
import { volumesOf } from "../store.ts";
import { sameSet, type Grants } from "./grants.ts";
import type { AssignmentLifecycle } from "./lifecycle.ts";

const log = logger("station");

/** Reports within this long share one reconcile pass. */
export const RECONCILE_DEBOUNCE_MS = 50;
/** A reconcile pass yields to the event loop after this many volumes. */
export const RECONCILE_YIELD_EVERY = 2_000;

export class Reconciler {
  private readonly ctx: StationContext;
  private readonly assignments: AssignmentLifecycle;
  private readonly grants: Grants;
  private readonly allocation: Allocation;
  private reconcileRun: Promise<void> | null = null;
  private reconcileAgain = false;

  constructor(ctx: StationContext, assignments: AssignmentLifecycle, grants: Grants, allocation: Allocation) {
    this.ctx = ctx;
    this.assignments = assignments;
    this.grants = grants;
    this.allocation = allocation;
  }

  /** The pass under way, if any, settled (Station.stop waits for it). */
  async idle(): Promise<void> {
    await this.reconcileRun?.catch(() => undefined);
  }

  private reconcileTimer: NodeJS.Timeout | null = null;
  /** Units whose grants the next pass checks; null: all of them. */
  private reconcileScope: Set<string> | null = new Set();

  /** A reconcile soon (coalesced): of the given units (after their reports), or of everything. */
  reconcileSoon(units?: Iterable<string>): void {
    if (units === undefined) this.reconcileScope = null;
    else if (this.reconcileScope !== null) for (const unit of units) this.reconcileScope.add(unit);
    if (this.ctx.stopped || this.reconcileTimer !== null) return;
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
      } while (this.reconcileAgain && !this.ctx.stopped);
    })()
      .catch((error: unknown) => log.error("reconcile pass failed", { error: errorMessage(error) }))
      .finally(() => {
        this.reconcileRun = null;
      });
    this.reconcileRun = run;
    return run;
  }

  private async reconcilePass(scope: ReadonlySet<string> | null): Promise<void> {
    if (this.ctx.stopped) return;
    const live = [...this.ctx.store.live.values()];
    for (const assignment of live) {
      if (this.ctx.stopped) return;
      if (assignment.state === "pending" && !this.allocation.isInflight(assignment)) await this.assignments.settlePending(assignment);
      else if (assignment.state === "revoking") {
        // A unit that is away is told when it is back (its return triggers a pass); a mirror's
        // legs on units that are here are told now.
        const away = volumesOf(assignment).every(([unit]) => {
          const unitState = this.ctx.store.units.get(unit)?.state;
          return unitState === "offline" || unitState === "down";
        });
        if (away) continue;
        await this.ctx.locks.run(`assignment:${assignment.id}`, async () => {
          const current = this.ctx.store.getAssignment(assignment.id);
          if (current?.state === "revoking") await this.assignments.finishRevoke(current);
        });
      }
    }
    // Grants that differ from what the assignments want (a unit that was away, a host that moved).
    const units = scope === null ? [...this.ctx.store.units.keys()] : [...scope];
    let checked = 0;
    for (const name of units) {
      const unit = this.ctx.store.units.get(name);
      if (this.ctx.stopped) return;
      if (unit === undefined || unit.control === null || unit.state === "offline" || unit.state === "down") continue;
      for (const volume of [...this.ctx.store.unitVolumes(unit.name).values()]) {
        // Yield now and then: a full pass over 100,000 volumes must not stall the API.
        if (++checked % RECONCILE_YIELD_EVERY === 0) await new Promise((resolve) => setImmediate(resolve));
        if (volume.grants === null) continue;
        if (volume.grants.length === 0 && !this.ctx.store.isVolumeAssigned(unit.name, volume.name)) continue;
        if (sameSet(volume.grants, this.grants.desiredGrants(unit.name, volume.name))) continue;
        try {
          await this.grants.syncGrants(unit.name, volume.name, false);
        } catch (error) {
          log.limited(`reconcile:${unit.name}`, "cannot fix a volume's grants yet", { unit: unit.name, volume: volume.name, error: errorMessage(error) });
          break; // this unit is not answering: leave the rest of it for the next pass
        }
      }
    }
  }
}
