// The station's I/O statistics (docs/api.md "Statistics", docs/ARCHITECTURE.md):
// every pollIntervalMs it reads GET /v1/stats of each online unit (through
// the one unit client, src/station/unit_client.ts; at most `concurrency`
// at once, each bounded by the client's timeout, one attempt: a missed poll
// is a gap, not a retry; a unit failing again and again is asked less often), turns two answers into rates (rates.ts) and keeps
// them in bounded rings (series.ts): per unit and per volume, `unitPoints`
// points (10 minutes at the default 5 s); and every poolStepMs the pool's
// capacity, used and free bytes and unit counts, `poolPoints` points (24 h at
// one a minute). Why polling and not the discovery heartbeat: a unit's
// counters per volume do not fit a UDP datagram of the discovery protocol
// (docs/protocol/discovery.md), and the control API already has the auth,
// bounds and client the station needs.
//
// Time comes from an injected clock (src/util/clock.ts): tests drive
// polls and the pool step with ManualClock.

import { type Clock, type TimerHandle, realClock } from "../../util/clock.ts";
import { errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { type UnitSample, unitStep } from "./rates.ts";
import { POOL_FIELDS, PoolSeries, type PoolPoint, type PoolValues, RATE_FIELDS, type RatePoint, UnitSeries } from "./series.ts";

const log = logger("stats");

export const STATS_POLL_INTERVAL_MS_DEFAULT = 5_000;
/** Points kept per unit and per volume: 10 minutes at the default poll interval. */
export const STATS_UNIT_POINTS = 120;
export const STATS_POOL_STEP_MS = 60_000;
/** Points of the pool's series: 24 hours at one a minute. */
export const STATS_POOL_POINTS = 1_440;
/** Units polled at once. */
export const STATS_POLL_CONCURRENCY = 16;
/** A unit whose poll failed k times in a row is skipped for min(2^(k-1), this) rounds (a dead control API costs little). */
export const STATS_FAILED_SKIP_ROUNDS_MAX = 12;

/** What the collector needs of the station. */
export interface StatsSource {
  /** Units to poll now (online, with a control API). */
  pollable(): readonly string[];
  /** The unit's counters (GET /v1/stats), validated; rejects when it cannot be read. */
  fetch(unit: string): Promise<UnitSample>;
  /** The pool now. */
  pool(): PoolValues;
}

export interface StatsOptions {
  readonly clock: Clock;
  readonly pollIntervalMs?: number;
  readonly poolStepMs?: number;
  readonly unitPoints?: number;
  readonly poolPoints?: number;
  readonly concurrency?: number;
}

export class StationStats {
  readonly pollIntervalMs: number;
  readonly poolStepMs: number;
  readonly unitPoints: number;
  readonly #source: StatsSource;
  readonly #clock: Clock;
  readonly #concurrency: number;
  readonly #last = new Map<string, { sample: UnitSample; atMs: number }>();
  readonly #units = new Map<string, UnitSeries>();
  readonly #pool: PoolSeries;
  #pollTimer: TimerHandle | undefined;
  #poolTimer: TimerHandle | undefined;
  #polling: Promise<void> | undefined;
  #stopped = false;
  #round = 0;
  /** Units whose last polls failed: how many in a row, and the first round to poll them again. */
  readonly #failing = new Map<string, { failures: number; nextRound: number }>();
  /** Polls answered and failed since the start (the station's /metrics). */
  readonly polls = { ok: 0, failed: 0 };

  constructor(source: StatsSource, options: StatsOptions) {
    this.#source = source;
    this.#clock = options.clock;
    this.pollIntervalMs = options.pollIntervalMs ?? STATS_POLL_INTERVAL_MS_DEFAULT;
    this.poolStepMs = options.poolStepMs ?? STATS_POOL_STEP_MS;
    this.unitPoints = options.unitPoints ?? STATS_UNIT_POINTS;
    this.#concurrency = options.concurrency ?? STATS_POLL_CONCURRENCY;
    this.#pool = new PoolSeries(options.poolPoints ?? STATS_POOL_POINTS);
  }

  /** Samples the pool now and polls the units at once, then on their intervals. */
  start(): void {
    this.samplePool();
    const pollTick = (): void => {
      if (this.#stopped) return;
      void this.poll().finally(() => {
        if (!this.#stopped) this.#pollTimer = this.#clock.setTimeout(pollTick, this.pollIntervalMs);
      });
    };
    const poolTick = (): void => {
      if (this.#stopped) return;
      this.samplePool();
      this.#poolTimer = this.#clock.setTimeout(poolTick, this.poolStepMs);
    };
    this.#poolTimer = this.#clock.setTimeout(poolTick, this.poolStepMs);
    pollTick();
  }

  async stop(): Promise<void> {
    this.#stopped = true;
    this.#pollTimer?.cancel();
    this.#poolTimer?.cancel();
    await this.#polling;
  }

  /** One round over the pollable units (a round still running is joined, not doubled). */
  poll(): Promise<void> {
    this.#polling ??= this.#pollAll().finally(() => {
      this.#polling = undefined;
    });
    return this.#polling;
  }

  samplePool(): void {
    try {
      this.#pool.append(this.#clock.nowMs(), this.#source.pool());
    } catch (error) {
      log.limited("pool-sample", "cannot sample the pool", { error: errorMessage(error) });
    }
  }

  async #pollAll(): Promise<void> {
    const round = ++this.#round;
    const pollable = this.#source.pollable();
    const units = pollable.filter((unit) => (this.#failing.get(unit)?.nextRound ?? 0) <= round);
    let nextIndex = 0;
    const worker = async (): Promise<void> => {
      while (nextIndex < units.length && !this.#stopped) {
        const unit = units[nextIndex++] as string;
        await this.#pollUnit(unit, round);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.#concurrency, units.length) }, worker));
    this.#expire(new Set(pollable), round);
  }

  async #pollUnit(unit: string, round: number): Promise<void> {
    let sample: UnitSample;
    try {
      sample = await this.#source.fetch(unit);
    } catch (error) {
      this.polls.failed += 1;
      const failures = (this.#failing.get(unit)?.failures ?? 0) + 1;
      this.#failing.set(unit, { failures, nextRound: round + Math.min(2 ** (failures - 1), STATS_FAILED_SKIP_ROUNDS_MAX) });
      // One rate-limited key for all units: a thousand dead control APIs log ten lines per 10 s, not ten thousand.
      log.limited("stats-poll", "cannot read a unit's I/O statistics", { unit, failures, error: errorMessage(error) });
      return;
    }
    this.#failing.delete(unit);
    this.polls.ok += 1;
    const nowMs = this.#clock.nowMs();
    const last = this.#last.get(unit);
    // An answer older than the series' span is not differenced with (the unit was away that long): the next answer starts again.
    // Within it, a point after an absence holds the mean rate over the absence.
    const fresh = last !== undefined && nowMs - last.atMs <= this.unitPoints * this.pollIntervalMs;
    this.#last.set(unit, { sample, atMs: nowMs });
    const step = unitStep(fresh ? last.sample : undefined, sample);
    if (step === undefined) return;
    let series = this.#units.get(unit);
    if (series === undefined) {
      series = new UnitSeries(this.unitPoints);
      this.#units.set(unit, series);
    }
    series.append(nowMs, step.unit, step.volumes);
  }

  /** Units not polled for a whole series' span (gone, or away that long) are forgotten. */
  #expire(polled: ReadonlySet<string>, round: number): void {
    for (const [unit, failing] of this.#failing) if (!polled.has(unit) && failing.nextRound < round) this.#failing.delete(unit);
    const horizonMs = this.#clock.nowMs() - this.unitPoints * this.pollIntervalMs;
    for (const [unit, series] of this.#units) {
      if (!polled.has(unit) && (series.lastMs ?? 0) < horizonMs) this.#units.delete(unit);
    }
    for (const [unit, last] of this.#last) if (!polled.has(unit) && last.atMs < horizonMs) this.#last.delete(unit);
  }

  // ---- views (docs/api.md "Statistics") ----

  /** Every unit with a series or polled now, by name, each with its points in the window. */
  unitsView(windowMs: number): { items: { unit: string; points: RatePoint[] }[] } {
    const sinceMs = this.#clock.nowMs() - windowMs;
    const names = [...new Set([...this.#units.keys(), ...this.#source.pollable()])].sort();
    return { items: names.map((unit) => ({ unit, points: this.#units.get(unit)?.unitPoints(sinceMs) ?? [] })) };
  }

  unitView(unit: string, windowMs: number): { unit: string; points: RatePoint[]; volumes: { volume: string; points: RatePoint[] }[] } {
    const sinceMs = this.#clock.nowMs() - windowMs;
    const series = this.#units.get(unit);
    return { unit, points: series?.unitPoints(sinceMs) ?? [], volumes: series?.volumePoints(sinceMs) ?? [] };
  }

  /** The pool's points in the window, one per step, and last the pool now (a chart of capacity ends at the present). */
  poolView(windowMs: number): { points: PoolPoint[] } {
    const nowMs = this.#clock.nowMs();
    const points = this.#pool.pointsSince(nowMs - windowMs);
    try {
      points.push({ t: nowMs, ...this.#source.pool() });
    } catch (error) {
      log.limited("pool-sample", "cannot sample the pool", { error: errorMessage(error) });
    }
    return { points };
  }

  /** Bytes held by the series' typed arrays (the bulk of the memory; docs/api.md gives the figure at scale). */
  seriesBytes(): number {
    let bytes = this.#pool.capacity * (8 + POOL_FIELDS.length * 8);
    for (const series of this.#units.values()) bytes += series.capacity * (8 + RATE_FIELDS.length * 4 * (1 + series.volumeCount));
    return bytes;
  }
}

/** Statistics that never poll (an API server made without a collector): empty series. */
export function idleStats(): StationStats {
  const source: StatsSource = {
    pollable: () => [],
    fetch: () => Promise.reject(new Error("no statistics collector")),
    pool: () => ({ capacityBytes: 0, usedBytes: 0, freeBytes: 0, units: 0, unitsOnline: 0 }),
  };
  return new StationStats(source, { clock: realClock });
}
