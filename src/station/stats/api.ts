// The statistics routes' logic (docs/api.md "Statistics"); src/station/api/stats.ts only
// registers them. ?window= is a duration (util/duration.ts: 30s, 10m, 24h),
// at most what the series hold; anything else is a 400 naming `window`.

import { errorMessage } from "../../util/errors.ts";
import { parseDuration } from "../../util/duration.ts";
import { invalid, show } from "../validate.ts";
import type { StationStats } from "./collector.ts";

/** Window of the unit and volume series unless ?window= says otherwise, and the most it may say (unless the series hold more). */
export const STATS_UNITS_WINDOW_DEFAULT_MS = 10 * 60_000;
/** Window of the pool's series unless ?window= says otherwise, and the most it may say. */
export const STATS_POOL_WINDOW_DEFAULT_MS = 24 * 3_600_000;

/** ?window=: a duration of at most `maxMs` (null: `fallbackMs`). */
export function parseWindow(text: string | null, fallbackMs: number, maxMs: number): number {
  if (text === null) return fallbackMs;
  let ms: number;
  try {
    ms = parseDuration(text, "window");
  } catch (error) {
    throw invalid("window", `expected a duration such as 30s, 10m or 24h, got ${show(text)} (${errorMessage(error).replace(/^window: /, "")})`);
  }
  if (ms > maxMs) throw invalid("window", `at most ${maxMs / 60_000} minutes of points are kept, got ${show(text)}`);
  return ms;
}

function unitsWindowMaxMs(stats: StationStats): number {
  return Math.max(STATS_UNITS_WINDOW_DEFAULT_MS, stats.unitPoints * stats.pollIntervalMs);
}

/** GET /api/v1/stats/units */
export function unitsStats(stats: StationStats, window: string | null): ReturnType<StationStats["unitsView"]> {
  return stats.unitsView(parseWindow(window, STATS_UNITS_WINDOW_DEFAULT_MS, unitsWindowMaxMs(stats)));
}

/** GET /api/v1/stats/units/:name (the caller checked the unit exists) */
export function unitStats(stats: StationStats, unit: string, window: string | null): ReturnType<StationStats["unitView"]> {
  return stats.unitView(unit, parseWindow(window, STATS_UNITS_WINDOW_DEFAULT_MS, unitsWindowMaxMs(stats)));
}

/** GET /api/v1/stats/pool */
export function poolStats(stats: StationStats, window: string | null): ReturnType<StationStats["poolView"]> {
  return stats.poolView(parseWindow(window, STATS_POOL_WINDOW_DEFAULT_MS, STATS_POOL_WINDOW_DEFAULT_MS));
}
