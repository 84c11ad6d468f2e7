// I/O and capacity statistics (docs/api.md "Statistics"; logic in src/station/stats/).

import { Type } from "@sinclair/typebox";
import { checkName } from "../validate.ts";
import { poolStats, unitStats, unitsStats } from "../stats/api.ts";
import type { StationStats } from "../stats/collector.ts";
import { unitOrNotFound, type Api } from "./route.ts";
import { Errors, Params } from "./schemas.ts";

const WindowQuery = (fallback: string) =>
  Type.Object(
    {
      window: Type.Optional(
        Type.String({ description: `how far back: a duration such as 30s, 10m or 24h (default ${fallback}, at most what the series keep: 10m of unit points, 24h of pool points)` }),
      ),
    },
    { additionalProperties: false },
  );
/** One step of a unit's or volume's I/O series (src/station/stats/series.ts RatePoint). */
const RatePoints = Type.Array(
  Type.Object(
    {
      t: Type.Integer({ description: "milliseconds since the epoch (when the station read the unit's counters)" }),
      readOps: Type.Number({ description: "reads per second over the step" }),
      writeOps: Type.Number({ description: "writes per second over the step" }),
      readBytes: Type.Number({ description: "bytes read per second" }),
      writeBytes: Type.Number({ description: "bytes written per second" }),
      readLatencyMs: Type.Number({ description: "mean read latency over the step at the unit (0: no reads)" }),
      writeLatencyMs: Type.Number({ description: "mean write latency over the step at the unit (0: no writes)" }),
    },
    { additionalProperties: true },
  ),
);
const PoolPoints = Type.Array(
  Type.Object(
    {
      t: Type.Integer({ description: "milliseconds since the epoch" }),
      capacityBytes: Type.Integer(),
      usedBytes: Type.Integer(),
      freeBytes: Type.Integer(),
      units: Type.Integer(),
      unitsOnline: Type.Integer(),
    },
    { additionalProperties: true },
  ),
);

export function statsRoutes(api: Api, stats: StationStats): void {
  api.add({
    method: "GET",
    url: "/api/v1/stats/units",
    schema: {
      summary: "I/O rates of every unit (polled from each unit's GET /v1/stats; docs/api.md \"Statistics\")",
      querystring: WindowQuery("10m"),
      response: {
        200: Type.Object({ items: Type.Array(Type.Object({ unit: Type.String(), points: RatePoints }, { additionalProperties: true })) }, { additionalProperties: true, description: "one series per unit" }),
        ...Errors(),
      },
    },
    handler: ({ query }) => ({ status: 200, body: unitsStats(stats, query.get("window")) }),
  });
  api.add({
    method: "GET",
    url: "/api/v1/stats/units/:name",
    schema: {
      summary: "I/O rates of one unit and of each of its volumes (a volume's series sums its partitions)",
      params: Params("name"),
      querystring: WindowQuery("10m"),
      response: {
        200: Type.Object(
          { unit: Type.String(), points: RatePoints, volumes: Type.Array(Type.Object({ volume: Type.String(), points: RatePoints }, { additionalProperties: true })) },
          { additionalProperties: true, description: "the unit's series and its volumes'" },
        ),
        ...Errors({ 404: "no such unit" }),
      },
    },
    handler: ({ params, query }) => {
      const unit = unitOrNotFound(api.station.store, checkName(params[0], "unit"));
      return { status: 200, body: unitStats(stats, unit.name, query.get("window")) };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/stats/pool",
    schema: {
      summary: "The pool's capacity, used and free bytes and unit counts, one point a minute",
      querystring: WindowQuery("24h"),
      response: { 200: Type.Object({ points: PoolPoints }, { additionalProperties: true, description: "the pool's series" }), ...Errors() },
    },
    handler: ({ query }) => ({ status: 200, body: poolStats(stats, query.get("window")) }),
  });
}
