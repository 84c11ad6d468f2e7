// A unit's GET /v1/stats answer (src/unit/io_report.ts, docs/unit.md),
// checked before the station keeps anything of it: the fields rates need, as
// finite non-negative numbers, and a bounded number of volumes. Pure.

import type { IoTotals, UnitSample } from "./rates.ts";

/** Volumes one answer may list (a unit's table holds far fewer). */
export const UNIT_STATS_VOLUMES_MAX = 100_000;

const TOTAL_FIELDS = ["reads", "writes", "readBytes", "writeBytes", "readLatencyUsSum", "writeLatencyUsSum"] as const;

function totalsOf(value: unknown, where: string): IoTotals | string {
  if (typeof value !== "object" || value === null) return `${where}: not an object`;
  const record = value as Record<string, unknown>;
  const out: Record<string, number> = {};
  for (const field of TOTAL_FIELDS) {
    const n = record[field];
    if (typeof n !== "number" || !Number.isFinite(n) || n < 0) return `${where}.${field}: expected a number >= 0`;
    out[field] = n;
  }
  return out as unknown as IoTotals;
}

/** The sample, or what is wrong with the answer. */
export function parseUnitStats(json: unknown): UnitSample | string {
  if (typeof json !== "object" || json === null) return "stats: not an object";
  const record = json as Record<string, unknown>;
  const bootId = record["bootId"];
  if (typeof bootId !== "string" || !/^[0-9A-Za-z_-]{1,64}$/.test(bootId)) return "stats.bootId: expected an id";
  const uptimeMs = record["uptimeMs"];
  if (typeof uptimeMs !== "number" || !Number.isFinite(uptimeMs) || uptimeMs < 0) return "stats.uptimeMs: expected a number >= 0";
  const totals = totalsOf(record["totals"], "stats.totals");
  if (typeof totals === "string") return totals;
  const list = record["volumes"];
  if (!Array.isArray(list) || list.length > UNIT_STATS_VOLUMES_MAX) return `stats.volumes: expected a list of at most ${UNIT_STATS_VOLUMES_MAX}`;
  const volumes = new Map<string, IoTotals>();
  for (const [i, item] of list.entries()) {
    const name = (item as { volume?: unknown } | null)?.volume;
    if (typeof name !== "string" || name.length === 0 || name.length > 255) return `stats.volumes[${i}].volume: expected a name`;
    const volume = totalsOf(item, `stats.volumes[${i}]`);
    if (typeof volume === "string") return volume;
    volumes.set(name, volume);
  }
  return { bootId, uptimeMs, totals, volumes };
}
