// The station's side of the statistics collector (collector.ts): which units
// to poll (online, with a control API), how (the station's one client of
// each unit, src/station/unit_client.ts), and what the pool holds now.

import type { Station } from "../station.ts";
import type { StatsSource } from "./collector.ts";

/** A poll's answer must come within this (well inside the default poll interval). */
export const STATS_POLL_TIMEOUT_MS = 2_000;

export function stationStatsSource(station: Station, timeoutMs = STATS_POLL_TIMEOUT_MS): StatsSource {
  const store = station.store;
  return {
    pollable: () => [...store.units.values()].filter((u) => u.state === "online" && u.control !== null).map((u) => u.name),
    fetch: (unit) => station.clientFor(unit).stats(timeoutMs),
    pool: () => {
      let capacityBytes = 0;
      let freeBytes = 0;
      let unitsOnline = 0;
      for (const unit of store.units.values()) {
        capacityBytes += unit.capacityBytes;
        freeBytes += station.usableFreeBytes(unit.name);
        if (unit.state === "online") unitsOnline += 1;
      }
      return { capacityBytes, usedBytes: Math.max(0, capacityBytes - freeBytes), freeBytes, units: store.units.size, unitsOnline };
    },
  };
}
