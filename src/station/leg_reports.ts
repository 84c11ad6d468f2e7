// A host's reports of its mirror legs (PUT /api/v1/assignments/ID/legs,
// docs/api.md "Leg reports"): the host's mirror engine knows which legs are
// in-sync, stale, rebuilding or failed; the station records what it says, so
// the API, the admin CLI and the replacement loop (replacement.ts) see it.
//
// Ordering: each report carries the engine's metadata generation. Reports can
// arrive out of order (retries, two agent loops after a restart): one older
// than the last accepted generation is answered {ignored, reason} and changes
// nothing; the same generation is accepted (progress updates within it).
// Legs are matched by unit+volume (a leg the station has replaced in the
// meantime is not in the assignment any more: its report is ignored).
//
// Events: leg-state whenever a leg's state changes; leg-progress at most once
// per LEG_PROGRESS_INTERVAL_MS per leg (a rebuild reports often).

import { IpsanError } from "../util/errors.ts";
import type { StationStore } from "./store.ts";
import { REPORTED_LEG_STATES, type AssignmentRecord, type LegRebuild, type LegRecord, type LegState } from "./types.ts";
import { Body, checkName, invalid, show } from "./validate.ts";

/** At most one leg-progress event per leg this often. */
export const LEG_PROGRESS_INTERVAL_MS = 5_000;
/** Legs in one report (COPIES_MAX is 3; a little room for a host that lists more). */
export const LEG_REPORT_LEGS_MAX = 8;
/** Characters of a leg's error kept. */
export const LEG_ERROR_CHARS_MAX = 256;
/** Largest generation accepted (the engine's is a u32 or a safe integer). */
export const GENERATION_MAX = Number.MAX_SAFE_INTEGER;

export type ReportedLegState = (typeof REPORTED_LEG_STATES)[number];

export interface LegReportEntry {
  readonly unit: string;
  readonly volume: string;
  readonly state: ReportedLegState;
  readonly rebuild: LegRebuild | null;
  readonly error: string | null;
}

export interface LegReport {
  readonly generation: number;
  readonly legs: readonly LegReportEntry[];
}

function wholeNumber(value: unknown, field: string, max = GENERATION_MAX): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0 || value > max) {
    throw invalid(field, `expected a whole number 0..${max}, got ${show(value)}`);
  }
  return value;
}

function parseRebuild(value: unknown, field: string): LegRebuild | null {
  if (value === undefined || value === null) return null;
  const b = new Body(value, ["kind", "copiedBytes", "totalBytes", "etaSeconds"]);
  const kind = b.required("kind");
  if (kind !== "delta" && kind !== "full") throw invalid(`${field}.kind`, `expected "delta" or "full", got ${show(kind)}`);
  const copiedBytes = wholeNumber(b.required("copiedBytes"), `${field}.copiedBytes`);
  const totalBytes = wholeNumber(b.required("totalBytes"), `${field}.totalBytes`);
  if (copiedBytes > totalBytes) throw invalid(`${field}.copiedBytes`, `${copiedBytes} is more than totalBytes ${totalBytes}`);
  const eta = b.optional("etaSeconds");
  const etaSeconds = eta === undefined ? null : wholeNumber(typeof eta === "number" ? Math.ceil(eta) : eta, `${field}.etaSeconds`);
  return { kind, copiedBytes, totalBytes, etaSeconds };
}

/** Validates a report body; errors name the field (`legs[1].state`). */
export function parseLegReport(body: unknown): LegReport {
  const b = new Body(body, ["generation", "legs"]);
  const generation = wholeNumber(b.required("generation"), "generation");
  const list = b.required("legs");
  if (!Array.isArray(list)) throw invalid("legs", `expected a list, got ${show(list)}`);
  if (list.length > LEG_REPORT_LEGS_MAX) throw invalid("legs", `at most ${LEG_REPORT_LEGS_MAX} legs, got ${list.length}`);
  const legs = list.map((item: unknown, i): LegReportEntry => {
    const field = `legs[${i}]`;
    let leg: Body;
    try {
      leg = new Body(item, ["unit", "volume", "state", "rebuild", "error"]);
    } catch (error) {
      if (error instanceof IpsanError) throw invalid(field, error.message);
      throw error;
    }
    const unit = checkName(leg.required("unit"), `${field}.unit`);
    const volume = checkName(leg.required("volume"), `${field}.volume`);
    const state = leg.required("state");
    if (typeof state !== "string" || !(REPORTED_LEG_STATES as readonly string[]).includes(state)) {
      throw invalid(`${field}.state`, `expected one of ${REPORTED_LEG_STATES.join(", ")}, got ${show(state)}`);
    }
    const errorText = leg.optional("error");
    if (errorText !== undefined && typeof errorText !== "string") throw invalid(`${field}.error`, `expected a string, got ${show(errorText)}`);
    return {
      unit,
      volume,
      state: state as ReportedLegState,
      rebuild: parseRebuild(leg.optional("rebuild"), `${field}.rebuild`),
      error: errorText === undefined ? null : errorText.slice(0, LEG_ERROR_CHARS_MAX),
    };
  });
  const seen = new Set<string>();
  for (const [i, leg] of legs.entries()) {
    const key = `${leg.unit}/${leg.volume}`;
    if (seen.has(key)) throw invalid(`legs[${i}]`, `leg ${key} is listed twice`);
    seen.add(key);
  }
  return { generation, legs };
}

export type LegReportAnswer =
  | { readonly kind: "applied"; readonly assignment: AssignmentRecord }
  | { readonly kind: "ignored"; readonly reason: string };

function sameRebuild(a: LegRebuild | null | undefined, b: LegRebuild | null | undefined): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

/** Applies host leg reports to the store, with the leg-progress throttle. */
export class LegReports {
  private readonly store: StationStore;
  /** When leg-progress was last published, by "assignment/leg index/unit/volume". */
  private readonly progressAtMs = new Map<string, number>();

  constructor(store: StationStore) {
    this.store = store;
  }

  /**
   * Records a report. Synchronous from matching to commit, so a replacement
   * swapped in at the same time (replacement.ts) is either seen or not at all.
   */
  apply(id: string, report: LegReport): LegReportAnswer {
    const current = this.store.getAssignment(id);
    if (current === undefined) throw new IpsanError("NOT_FOUND", `assignment ${show(id)} not found`, { field: "id" });
    if (current.legs.length === 0) {
      throw new IpsanError("CONFLICT", `assignment ${id} is not a mirror (copies ${current.copies}): it has no legs to report`, { field: "id" });
    }
    if (current.state !== "active") throw new IpsanError("CONFLICT", `assignment ${id} is ${current.state}, not active: leg reports are not taken`, { field: "id" });
    const last = current.legsGeneration ?? null;
    if (last !== null && report.generation < last) {
      return { kind: "ignored", reason: `generation ${report.generation} is older than the last report's ${last}` };
    }
    const nowMs = this.store.clock.nowMs();
    const changed: LegRecord[] = [];
    const events: { action: string; data: unknown }[] = [];
    for (const entry of report.legs) {
      const leg = current.legs.find((l) => l.unit === entry.unit && l.volume === entry.volume);
      if (leg === undefined) continue; // replaced since, or never this mirror's: not the station's leg
      const rebuild = entry.state === "rebuilding" || entry.state === "stale" ? entry.rebuild : null;
      const next: LegRecord = { ...leg, state: entry.state as LegState, rebuild, error: entry.error };
      if (next.state === leg.state && sameRebuild(next.rebuild, leg.rebuild) && (next.error ?? null) === (leg.error ?? null)) continue;
      changed.push(next);
      const base = { id, leg: leg.index, unit: leg.unit, volume: leg.volume };
      const key = `${id}/${leg.index}/${leg.unit}/${leg.volume}`;
      if (next.state !== leg.state) {
        events.push({ action: "leg-state", data: { ...base, state: next.state, previousState: leg.state, rebuild, error: entry.error, generation: report.generation } });
        this.progressAtMs.delete(key);
      } else if (rebuild !== null && !sameRebuild(rebuild, leg.rebuild)) {
        const lastMs = this.progressAtMs.get(key);
        if (lastMs === undefined || nowMs - lastMs >= LEG_PROGRESS_INTERVAL_MS) {
          this.progressAtMs.set(key, nowMs);
          events.push({ action: "leg-progress", data: { ...base, rebuild } });
        }
      }
    }
    if (changed.length === 0 && last === report.generation) return { kind: "applied", assignment: current };
    if (this.progressAtMs.size > 10_000) this.progressAtMs.clear();
    return { kind: "applied", assignment: this.store.applyLegReport(id, report.generation, changed, events) };
  }
}
