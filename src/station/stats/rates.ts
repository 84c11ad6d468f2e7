// Rates from two snapshots of a unit's cumulative I/O counters (pure). A
// unit answers counters since it started, its monotonic uptime and a boot id
// (docs/unit.md "I/O statistics"); one step's rates are the counters'
// differences over the uptime's difference. Counters never go backwards
// within one boot, except a volume's when the volume was deleted and made
// again: any decrease is a reset. A reset (new boot id, uptime that went
// back, or a counter that fell) counts from zero: the rates of that step are
// the new counters over the time since the unit started (or, for a volume,
// over the step). So a rate is never negative, whatever the unit does.

/** The counters a rate is computed from (a unit's totals, or one volume's). */
export interface IoTotals {
  readonly reads: number;
  readonly writes: number;
  readonly readBytes: number;
  readonly writeBytes: number;
  readonly readLatencyUsSum: number;
  readonly writeLatencyUsSum: number;
}

/** One step: operations and bytes per second, and the mean latency of the step's requests (0 when there were none). */
export interface IoRates {
  readonly readOps: number;
  readonly writeOps: number;
  readonly readBytes: number;
  readonly writeBytes: number;
  readonly readLatencyMs: number;
  readonly writeLatencyMs: number;
}

/** One answer of a unit's GET /v1/stats, as the station keeps it. */
export interface UnitSample {
  readonly bootId: string;
  readonly uptimeMs: number;
  readonly totals: IoTotals;
  readonly volumes: ReadonlyMap<string, IoTotals>;
}

export interface UnitStep {
  /** Milliseconds the step spans (of the unit's uptime). */
  readonly spanMs: number;
  /** The unit restarted since the previous sample (its counters started again). */
  readonly restarted: boolean;
  readonly unit: IoRates;
  readonly volumes: ReadonlyMap<string, IoRates>;
}

export const ZERO_TOTALS: IoTotals = { reads: 0, writes: 0, readBytes: 0, writeBytes: 0, readLatencyUsSum: 0, writeLatencyUsSum: 0 };
export const ZERO_RATES: IoRates = { readOps: 0, writeOps: 0, readBytes: 0, writeBytes: 0, readLatencyMs: 0, writeLatencyMs: 0 };

/** `previous`, unless a counter fell since (a reset): then zero. */
function baseline(previous: IoTotals | undefined, current: IoTotals): IoTotals {
  if (previous === undefined) return ZERO_TOTALS;
  const fell =
    current.reads < previous.reads ||
    current.writes < previous.writes ||
    current.readBytes < previous.readBytes ||
    current.writeBytes < previous.writeBytes ||
    current.readLatencyUsSum < previous.readLatencyUsSum ||
    current.writeLatencyUsSum < previous.writeLatencyUsSum;
  return fell ? ZERO_TOTALS : previous;
}

/** Rates over `spanMs` from `previous` (undefined: zero) to `current`. */
export function ratesBetween(previous: IoTotals | undefined, current: IoTotals, spanMs: number): IoRates {
  if (!(spanMs > 0)) return ZERO_RATES;
  const from = baseline(previous, current);
  const seconds = spanMs / 1000;
  const reads = current.reads - from.reads;
  const writes = current.writes - from.writes;
  return {
    readOps: reads / seconds,
    writeOps: writes / seconds,
    readBytes: (current.readBytes - from.readBytes) / seconds,
    writeBytes: (current.writeBytes - from.writeBytes) / seconds,
    readLatencyMs: reads > 0 ? (current.readLatencyUsSum - from.readLatencyUsSum) / reads / 1000 : 0,
    writeLatencyMs: writes > 0 ? (current.writeLatencyUsSum - from.writeLatencyUsSum) / writes / 1000 : 0,
  };
}

/**
 * The step from `previous` to `current`; undefined for a unit's first sample
 * (nothing to difference with: its counters may span days) or a step of no time.
 * A volume missing from `previous` (first opened since) counts from zero.
 */
export function unitStep(previous: UnitSample | undefined, current: UnitSample): UnitStep | undefined {
  if (previous === undefined) return undefined;
  const restarted = current.bootId !== previous.bootId || current.uptimeMs < previous.uptimeMs;
  const spanMs = restarted ? current.uptimeMs : current.uptimeMs - previous.uptimeMs;
  if (!(spanMs > 0)) return undefined;
  const volumes = new Map<string, IoRates>();
  for (const [name, totals] of current.volumes) volumes.set(name, ratesBetween(restarted ? undefined : previous.volumes.get(name), totals, spanMs));
  return { spanMs, restarted, unit: ratesBetween(restarted ? undefined : previous.totals, current.totals, spanMs), volumes };
}
