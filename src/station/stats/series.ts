// Bounded in-memory series (ring buffers of typed arrays): a unit's I/O
// rates and its volumes' at one point per poll, and the pool's capacity at
// one point per pool step. A unit's volumes share the unit's slots and
// times, so a volume costs RATE_FIELDS x points x 4 bytes (Float32: a chart's
// precision), nothing per point besides. Nothing here reads a clock.

import type { IoRates } from "./rates.ts";

export const RATE_FIELDS = ["readOps", "writeOps", "readBytes", "writeBytes", "readLatencyMs", "writeLatencyMs"] as const;
export const POOL_FIELDS = ["capacityBytes", "usedBytes", "freeBytes", "units", "unitsOnline"] as const;

/** One point of a rate series (docs/api.md "Statistics"): t in milliseconds since the epoch. */
export type RatePoint = { t: number } & { -readonly [K in keyof IoRates]: number };
export type PoolPoint = { t: number } & Record<(typeof POOL_FIELDS)[number], number>;
export type PoolValues = Record<(typeof POOL_FIELDS)[number], number>;

/** Three decimals are plenty for a chart, and keep the answer short. */
function round(value: number): number {
  return Math.round(value * 1000) / 1000;
}

/** Slot indexes of the points at or after `sinceMs`, oldest first. */
function slotsSince(times: Float64Array, next: number, count: number, sinceMs: number): number[] {
  const capacity = times.length;
  const slots: number[] = [];
  for (let k = count; k >= 1; k--) {
    const slot = (next - k + capacity) % capacity;
    if ((times[slot] as number) >= sinceMs) slots.push(slot);
  }
  return slots;
}

interface VolumeRing {
  readonly values: Float32Array;
  /** Steps in a row the unit's samples did not list this volume (dropped at `capacity`). */
  absentSteps: number;
}

/** A unit's rate series and its volumes'. */
export class UnitSeries {
  readonly capacity: number;
  readonly #times: Float64Array;
  readonly #values: Float32Array;
  readonly #volumes = new Map<string, VolumeRing>();
  #next = 0;
  #count = 0;

  constructor(capacity: number) {
    this.capacity = capacity;
    this.#times = new Float64Array(capacity);
    this.#values = new Float32Array(capacity * RATE_FIELDS.length);
  }

  get points(): number {
    return this.#count;
  }

  get volumeCount(): number {
    return this.#volumes.size;
  }

  /** Time of the newest point (undefined: none yet). */
  get lastMs(): number | undefined {
    return this.#count === 0 ? undefined : this.#times[(this.#next - 1 + this.capacity) % this.capacity];
  }

  /** Adds a point at `tMs`: the unit's rates and each listed volume's (a volume not listed gets zeroes). */
  append(tMs: number, unit: IoRates, volumes: ReadonlyMap<string, IoRates>): void {
    const slot = this.#next;
    this.#times[slot] = tMs;
    write(this.#values, slot, unit);
    for (const [name, ring] of this.#volumes) {
      if (volumes.has(name)) continue;
      ring.absentSteps += 1;
      if (ring.absentSteps >= this.capacity) this.#volumes.delete(name);
      else write(ring.values, slot, undefined);
    }
    for (const [name, rates] of volumes) {
      let ring = this.#volumes.get(name);
      if (ring === undefined) {
        // Earlier slots read zero: the volume moved nothing then (or did not exist).
        ring = { values: new Float32Array(this.capacity * RATE_FIELDS.length), absentSteps: 0 };
        this.#volumes.set(name, ring);
      }
      ring.absentSteps = 0;
      write(ring.values, slot, rates);
    }
    this.#next = (slot + 1) % this.capacity;
    this.#count = Math.min(this.#count + 1, this.capacity);
  }

  unitPoints(sinceMs: number): RatePoint[] {
    return this.#read(this.#values, sinceMs);
  }

  /** Every volume with a series, by name, each with its points since `sinceMs`. */
  volumePoints(sinceMs: number): { volume: string; points: RatePoint[] }[] {
    return [...this.#volumes.keys()].sort().map((volume) => ({ volume, points: this.#read((this.#volumes.get(volume) as VolumeRing).values, sinceMs) }));
  }

  #read(values: Float32Array, sinceMs: number): RatePoint[] {
    return slotsSince(this.#times, this.#next, this.#count, sinceMs).map((slot) => {
      const base = slot * RATE_FIELDS.length;
      return {
        t: this.#times[slot] as number,
        readOps: round(values[base] as number),
        writeOps: round(values[base + 1] as number),
        readBytes: round(values[base + 2] as number),
        writeBytes: round(values[base + 3] as number),
        readLatencyMs: round(values[base + 4] as number),
        writeLatencyMs: round(values[base + 5] as number),
      };
    });
  }
}

function write(values: Float32Array, slot: number, rates: IoRates | undefined): void {
  const base = slot * RATE_FIELDS.length;
  values[base] = rates?.readOps ?? 0;
  values[base + 1] = rates?.writeOps ?? 0;
  values[base + 2] = rates?.readBytes ?? 0;
  values[base + 3] = rates?.writeBytes ?? 0;
  values[base + 4] = rates?.readLatencyMs ?? 0;
  values[base + 5] = rates?.writeLatencyMs ?? 0;
}

/** The pool's capacity series (Float64: byte counts stay exact). */
export class PoolSeries {
  readonly capacity: number;
  readonly #times: Float64Array;
  readonly #values: Float64Array;
  #next = 0;
  #count = 0;

  constructor(capacity: number) {
    this.capacity = capacity;
    this.#times = new Float64Array(capacity);
    this.#values = new Float64Array(capacity * POOL_FIELDS.length);
  }

  get points(): number {
    return this.#count;
  }

  append(tMs: number, values: PoolValues): void {
    const slot = this.#next;
    this.#times[slot] = tMs;
    POOL_FIELDS.forEach((field, i) => (this.#values[slot * POOL_FIELDS.length + i] = values[field]));
    this.#next = (slot + 1) % this.capacity;
    this.#count = Math.min(this.#count + 1, this.capacity);
  }

  pointsSince(sinceMs: number): PoolPoint[] {
    return slotsSince(this.#times, this.#next, this.#count, sinceMs).map((slot) => {
      const point: Record<string, number> = { t: this.#times[slot] as number };
      POOL_FIELDS.forEach((field, i) => (point[field] = this.#values[slot * POOL_FIELDS.length + i] as number));
      return point as PoolPoint;
    });
  }
}
