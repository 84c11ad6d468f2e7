// Placement of a host's request for N bytes (seed: "Distributing Storage
// Volumes in Pool for Hosts Accessing"). A pure function: a read-only view of
// the pool and a request in, a placement or one named reason per unit out. It
// never changes anything, so the dry run is simply "call it and answer".
//
// Rules, in order:
// 1. Only units that are online and have a control API are candidates.
// 2. Reuse: the smallest free volume (no live assignment, no partitions) whose
//    size is at least the request, on any candidate (ties: unit name, volume name).
//    Each unit hands over its free volumes sorted by size, so a unit costs a
//    binary search, not a scan (1,000 units x 100 volumes must stay fast).
// 3. Carve: a new volume of exactly the requested size on the candidate whose
//    usable free space (reported free minus what pending carves reserve) fits
//    best, i.e. leaves the least free space behind (ties: unit name), and that
//    has not reached its volume limit.

import { formatSize } from "../util/size.ts";
import type { UnitState } from "./types.ts";

/** A free volume: no live assignment (pending, active, revoking) holds it, and it has no partitions. */
export interface AllocatorVolume {
  readonly name: string;
  readonly sizeBytes: number;
}

export interface AllocatorUnit {
  readonly name: string;
  readonly state: UnitState;
  readonly hasControl: boolean;
  readonly freeBytes: number;
  /** Bytes promised to pending carves that the unit's reports do not show yet. */
  readonly reservedBytes: number;
  readonly volumeCount: number;
  readonly volumesMax: number | null;
  /** The unit's free volumes, sorted by size, then name (see sortFreeVolumes). */
  readonly freeVolumes: readonly AllocatorVolume[];
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

export function allocate(units: Iterable<AllocatorUnit>, request: AllocationRequest): AllocationResult {
  const need = request.sizeBytes;
  const reasons: UnitReason[] = [];
  let reuse: { unit: string; volume: string; sizeBytes: number } | null = null;
  let carve: { unit: string; leftBytes: number } | null = null;

  for (const unit of units) {
    if (request.excludeUnits?.has(unit.name)) {
      reasons.push({ unit: unit.name, reason: "refused the request just now" });
      continue;
    }
    if (unit.state !== "online") {
      reasons.push({ unit: unit.name, reason: unit.state });
      continue;
    }
    if (!unit.hasControl) {
      reasons.push({ unit: unit.name, reason: "no control API" });
      continue;
    }
    let unitFits = false;
    const volume = unit.freeVolumes[firstFitting(unit.freeVolumes, need)];
    if (volume !== undefined) {
      unitFits = true;
      if (
        reuse === null ||
        volume.sizeBytes < reuse.sizeBytes ||
        (volume.sizeBytes === reuse.sizeBytes &&
          (compareNames(unit.name, reuse.unit) < 0 || (unit.name === reuse.unit && compareNames(volume.name, reuse.volume) < 0)))
      ) {
        reuse = { unit: unit.name, volume: volume.name, sizeBytes: volume.sizeBytes };
      }
    }
    const usableBytes = Math.max(0, unit.freeBytes - unit.reservedBytes);
    const limitReached = unit.volumesMax !== null && unit.volumeCount >= unit.volumesMax;
    if (!limitReached && usableBytes >= need) {
      unitFits = true;
      const leftBytes = usableBytes - need;
      if (
        carve === null ||
        leftBytes < carve.leftBytes ||
        (leftBytes === carve.leftBytes && compareNames(unit.name, carve.unit) < 0)
      ) {
        carve = { unit: unit.name, leftBytes };
      }
    }
    if (!unitFits) {
      reasons.push({
        unit: unit.name,
        reason:
          limitReached && usableBytes >= need
            ? `volume limit reached (${unit.volumesMax}) and no free volume of ${formatSize(need)}`
            : `not enough free space: need ${formatSize(need)}, free ${formatSize(usableBytes)}` +
              (unit.reservedBytes > 0 ? ` (${formatSize(unit.reservedBytes)} reserved by pending requests)` : "") +
              ", and no free volume that large",
      });
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
