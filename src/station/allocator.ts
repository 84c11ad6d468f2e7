// Placement of a host's request for N bytes (seed: "Distributing Storage
// Volumes in Pool for Hosts Accessing"). Pure functions: a read-only view of
// the pool and a request in, a placement or one named reason per unit out.
// They never change anything, so the dry run is simply "call it and answer".
//
// Rules for one volume (`allocate`), in order:
// 1. Only units that are online and have a control API are candidates; a spare
//    unit (`--spare`) only for a request that says `spares` (a replacement leg).
// 2. Reuse: the smallest free volume (no live assignment, no partitions) whose
//    size is at least the request, on any candidate (ties: unit name, volume name).
//    Each unit hands over its free volumes sorted by size, so a unit costs a
//    binary search, not a scan (1,000 units x 100 volumes must stay fast).
// 3. Carve: a new volume of exactly the requested size on the candidate whose
//    usable free space fits best, i.e. leaves the least free space behind
//    (ties: unit name), and that has not reached its volume limit. Usable free
//    space is the unit's reported free space minus the bytes of every carve
//    the station has started there and the unit has not reported yet
//    (`reservedBytes`, docs/adr/0005). A carve takes whole MiB on the unit
//    (CARVE_ALIGNMENT_BYTES), so the request is rounded up before comparing.
//    A unit that refused a carve of R bytes for lack of space since its last
//    report (`refusedCarveBytes`) is not asked for R or more again until it
//    reports.
//
// Several legs (`placeLegs`, mirrors): the same per-unit rules, N distinct
// units or none; units in distinct zones first.

import { formatSize, formatSizesDistinct } from "../util/size.ts";
import type { UnitState } from "./types.ts";

/** Units allocate storage in whole MiB (the unit's EXTENT_ALIGNMENT_BYTES): a carve uses this much free space. */
export const CARVE_ALIGNMENT_BYTES = 1024 * 1024;

/** The unit's free space a carve of `sizeBytes` takes (rounded up to whole MiB). */
export function carveBytes(sizeBytes: number): number {
  return Math.ceil(sizeBytes / CARVE_ALIGNMENT_BYTES) * CARVE_ALIGNMENT_BYTES;
}

/** A free volume: no live assignment (pending, active, revoking) holds it, and it has no partitions. */
export interface AllocatorVolume {
  readonly name: string;
  readonly sizeBytes: number;
}

export interface AllocatorUnit {
  readonly name: string;
  readonly state: UnitState;
  readonly hasControl: boolean;
  /** Free space as the unit last reported it. */
  readonly freeBytes: number;
  /** Bytes of carves (and grows) the station has started on the unit that its reports do not show yet. */
  readonly reservedBytes: number;
  readonly volumeCount: number;
  readonly volumesMax: number | null;
  /** The unit's free volumes, sorted by size, then name (see sortFreeVolumes). */
  readonly freeVolumes: readonly AllocatorVolume[];
  /**
   * The unit answered "no space" to a carve of this many bytes (whole MiB)
   * since its last report: carves of at least this size are not tried there.
   */
  readonly refusedCarveBytes?: number | null;
  /** Failure domain label (`--zone`); legs of one volume go to distinct zones first. */
  readonly zone?: string | null;
  /** Joined with `--spare`: only a request with `spares: true` (a replacement leg) may use it. */
  readonly spare?: boolean;
}

export function compareFreeVolumes(a: AllocatorVolume, b: AllocatorVolume): number {
  return a.sizeBytes - b.sizeBytes || compareNames(a.name, b.name);
}

/** The first index whose volume holds at least `sizeBytes` (volumes sorted by size). */
function firstFitting(volumes: readonly AllocatorVolume[], sizeBytes: number): number {
  let low = 0;
  let high = volumes.length;
  while (low < high) {
    const middle = (low + high) >>> 1;
    if ((volumes[middle]?.sizeBytes ?? 0) < sizeBytes) low = middle + 1;
    else high = middle;
  }
  return low;
}

export interface AllocationRequest {
  readonly sizeBytes: number;
  /** Units to leave out (e.g. one that just refused a carve). */
  readonly excludeUnits?: ReadonlySet<string>;
  /** Why each left-out unit is left out (its refusal), for the 507 reasons; default "refused the request just now". */
  readonly excludeReasons?: ReadonlyMap<string, string>;
  /** Spare units may be used (replacement legs only); default false: spares are left out. */
  readonly spares?: boolean;
}

export type Placement =
  | { readonly kind: "reuse"; readonly unit: string; readonly volume: string; readonly sizeBytes: number }
  | { readonly kind: "carve"; readonly unit: string; readonly sizeBytes: number };

export interface UnitReason {
  readonly unit: string;
  readonly reason: string;
}

export type AllocationResult =
  | { readonly ok: true; readonly placement: Placement; readonly reasons: readonly UnitReason[] }
  | { readonly ok: false; readonly reasons: readonly UnitReason[] };

function compareNames(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** What one unit can offer a request: its smallest fitting free volume and/or a carve, or why nothing. */
type UnitOffer =
  | {
      readonly fits: true;
      readonly reuse: AllocatorVolume | null;
      /** Usable bytes a carve would leave behind, or null if the unit cannot carve it. */
      readonly carveLeftBytes: number | null;
    }
  | { readonly fits: false; readonly reason: string };

function offerOf(unit: AllocatorUnit, need: number, request: AllocationRequest): UnitOffer {
  if (request.excludeUnits?.has(unit.name) === true || request.excludeReasons?.has(unit.name) === true) {
    return { fits: false, reason: request.excludeReasons?.get(unit.name) ?? "refused the request just now" };
  }
  if (unit.spare === true && request.spares !== true) return { fits: false, reason: "spare (kept for replacing the legs of failed units)" };
  if (unit.state !== "online") return { fits: false, reason: unit.state };
  if (!unit.hasControl) return { fits: false, reason: "no control API" };
  const reuse = unit.freeVolumes[firstFitting(unit.freeVolumes, need)] ?? null;
  const carve = carveBytes(need);
  const usableBytes = Math.max(0, unit.freeBytes - unit.reservedBytes);
  const limitReached = unit.volumesMax !== null && unit.volumeCount >= unit.volumesMax;
  const refused = unit.refusedCarveBytes !== undefined && unit.refusedCarveBytes !== null && carve >= unit.refusedCarveBytes;
  const canCarve = !limitReached && !refused && usableBytes >= carve;
  if (reuse !== null || canCarve) return { fits: true, reuse, carveLeftBytes: canCarve ? usableBytes - carve : null };
  const [carveText, usableText] = formatSizesDistinct([carve, usableBytes]);
  const needText = carve === need ? carveText : `${carveText} (${need} bytes rounded up to whole MiB)`;
  let reason: string;
  if (limitReached && usableBytes >= carve) reason = `volume limit reached (${unit.volumesMax}) and no free volume of ${formatSize(need)}`;
  else if (refused && usableBytes >= carve) {
    reason = `refused a carve of ${formatSize(unit.refusedCarveBytes ?? 0)} for lack of space since its last report, and no free volume of ${formatSize(need)}`;
  } else {
    reason =
      `not enough free space: need ${needText}, free ${usableText}` +
      (unit.reservedBytes > 0 ? ` (${formatSize(unit.reservedBytes)} reserved by pending requests)` : "") +
      ", and no free volume that large";
  }
  return { fits: false, reason };
}

export function allocate(units: Iterable<AllocatorUnit>, request: AllocationRequest): AllocationResult {
  const need = request.sizeBytes;
  const reasons: UnitReason[] = [];
  let reuse: { unit: string; volume: string; sizeBytes: number } | null = null;
  let carve: { unit: string; leftBytes: number } | null = null;

  for (const unit of units) {
    const offer = offerOf(unit, need, request);
    if (!offer.fits) {
      reasons.push({ unit: unit.name, reason: offer.reason });
      continue;
    }
    const volume = offer.reuse;
    if (
      volume !== null &&
      (reuse === null ||
        volume.sizeBytes < reuse.sizeBytes ||
        (volume.sizeBytes === reuse.sizeBytes &&
          (compareNames(unit.name, reuse.unit) < 0 || (unit.name === reuse.unit && compareNames(volume.name, reuse.volume) < 0))))
    ) {
      reuse = { unit: unit.name, volume: volume.name, sizeBytes: volume.sizeBytes };
    }
    const leftBytes = offer.carveLeftBytes;
    if (leftBytes !== null && (carve === null || leftBytes < carve.leftBytes || (leftBytes === carve.leftBytes && compareNames(unit.name, carve.unit) < 0))) {
      carve = { unit: unit.name, leftBytes };
    }
  }
  reasons.sort((a, b) => compareNames(a.unit, b.unit));
  if (reuse !== null) {
    return { ok: true, placement: { kind: "reuse", ...reuse }, reasons };
  }
  if (carve !== null) {
    return { ok: true, placement: { kind: "carve", unit: carve.unit, sizeBytes: need }, reasons };
  }
  return { ok: false, reasons };
}

// ---- several legs -------------------------------------------------------------------

export interface LegsRequest extends AllocationRequest {
  /** Number of legs, each on its own unit (1 to 3 in the API; any positive number here). */
  readonly copies: number;
  /** Reuse free volumes as legs (default true); false: carve every leg. */
  readonly reuse?: boolean;
}

export type LegsResult =
  | {
      readonly ok: true;
      /** One placement per leg, on distinct units, best first. */
      readonly legs: readonly Placement[];
      /** Distinct failure domains the legs span (zone labels; an unlabelled unit is its own domain). */
      readonly domains: number;
      readonly reasons: readonly UnitReason[];
    }
  | { readonly ok: false; readonly reasons: readonly UnitReason[] };

/** A unit's failure domain: its zone label, or the unit itself when it has none. */
export function failureDomain(unit: Pick<AllocatorUnit, "name" | "zone">): string {
  return unit.zone === undefined || unit.zone === null ? `unit:${unit.name}` : `zone:${unit.zone}`;
}

interface Candidate {
  readonly unit: AllocatorUnit;
  readonly placement: Placement;
  /** Sort key: reuse before carve; reuse by volume size, carve by bytes left; then names. */
  readonly rank: readonly [number, number, string, string];
}

function compareRank(a: Candidate, b: Candidate): number {
  const [ak, an, au, av] = a.rank;
  const [bk, bn, bu, bv] = b.rank;
  return ak - bk || an - bn || compareNames(au, bu) || compareNames(av, bv);
}

/**
 * Places `copies` legs of `sizeBytes` on as many distinct units: all of them or
 * none (then a reason per unit). Each unit offers what `allocate` would take
 * from it alone (its smallest fitting free volume, else a carve); offers are
 * ranked as `allocate` ranks them (any reuse before any carve, smallest volume,
 * then best fit, then names), so one leg is exactly `allocate`'s placement.
 * Legs go to distinct failure domains first: the best offer of each domain,
 * domains taken in the order of their best offers; only when there are fewer
 * domains than legs do the remaining legs go, best first, to other units of
 * domains already used. So the legs span as many domains as the fitting units
 * allow, and never two legs share a unit.
 */
export function placeLegs(units: Iterable<AllocatorUnit>, request: LegsRequest): LegsResult {
  const need = request.sizeBytes;
  const copies = request.copies;
  if (!Number.isSafeInteger(copies) || copies < 1) throw new RangeError(`copies must be a positive integer, got ${copies}`);
  const reasons: UnitReason[] = [];
  const candidates: Candidate[] = [];
  for (const unit of units) {
    const offer = offerOf(unit, need, request);
    if (!offer.fits) {
      reasons.push({ unit: unit.name, reason: offer.reason });
      continue;
    }
    const reuse = request.reuse === false ? null : offer.reuse;
    if (reuse !== null) {
      candidates.push({
        unit,
        placement: { kind: "reuse", unit: unit.name, volume: reuse.name, sizeBytes: reuse.sizeBytes },
        rank: [0, reuse.sizeBytes, unit.name, reuse.name],
      });
    } else if (offer.carveLeftBytes !== null) {
      candidates.push({ unit, placement: { kind: "carve", unit: unit.name, sizeBytes: need }, rank: [1, offer.carveLeftBytes, unit.name, ""] });
    } else {
      reasons.push({ unit: unit.name, reason: `only a free volume fits (${formatSize(offer.reuse?.sizeBytes ?? 0)}), and legs are carved` });
    }
  }
  candidates.sort(compareRank);
  if (candidates.length < copies) {
    for (const c of candidates) {
      reasons.push({
        unit: c.unit.name,
        reason: `can hold a leg, but only ${candidates.length} of the ${copies} distinct units needed can`,
      });
    }
    reasons.sort((a, b) => compareNames(a.unit, b.unit));
    return { ok: false, reasons };
  }
  const chosen: Candidate[] = [];
  const seenDomains = new Set<string>();
  for (const c of candidates) {
    if (chosen.length === copies) break;
    const domain = failureDomain(c.unit);
    if (seenDomains.has(domain)) continue;
    seenDomains.add(domain);
    chosen.push(c);
  }
  for (const c of candidates) {
    if (chosen.length === copies) break;
    if (!chosen.includes(c)) chosen.push(c);
  }
  chosen.sort(compareRank);
  reasons.sort((a, b) => compareNames(a.unit, b.unit));
  return { ok: true, legs: chosen.map((c) => c.placement), domains: new Set(chosen.map((c) => failureDomain(c.unit))).size, reasons };
}
