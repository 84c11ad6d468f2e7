// Health, this API's OpenAPI document, the event stream (Server-Sent Events)
// and Prometheus metrics (docs/api.md "Events", "Metrics").

import { Type } from "@sinclair/typebox";
import type { ServerResponse } from "node:http";
import { IpsanError } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { HOST_STATES, LIVE_ASSIGNMENT_STATES, UNIT_STATES, type StationEvent } from "../types.ts";
import { renderGauge } from "../metrics.ts";
import { HEALTH_REASONS_MAX, poolHealth } from "../views.ts";
import { invalid, show } from "../validate.ts";
import type { Api } from "./route.ts";
import { Enum, ErrorBody, Errors, NoQuery, Ref } from "./schemas.ts";
import { SSE_BUFFER_BYTES_MAX, SSE_HEARTBEAT_MS, SSE_SUBSCRIBERS_MAX, VERSION } from "./limits.ts";

const log = logger("station-api");
const EventsQuery = Type.Object({ since: Type.Optional(Type.String({ description: "replay events after this number (or header Last-Event-ID)" })) }, { additionalProperties: false });

export function systemRoutes(api: Api, openApiDocument: () => unknown): void {
  const { station } = api;
  const store = station.store;

  api.add({
    method: "GET",
    url: "/api/v1/health",
    schema: {
      summary: "Liveness and counts",
      querystring: NoQuery,
      response: {
        200: Type.Object(
          {
            status: Enum(["ok", "degraded"]),
            reasons: Type.Array(Type.String(), { description: `why the pool is degraded (at most ${HEALTH_REASONS_MAX})` }),
            reasonsTotal: Type.Integer(),
            version: Type.String(),
            units: Type.Integer(),
            volumes: Type.Integer(),
            assignments: Type.Integer(),
            leader: Type.Optional(Type.Boolean({ description: "several stations (--etcd): whether this station leads; absent for a single station" })),
            leaderUrl: Type.Optional(Type.Union([Type.String(), Type.Null()], { description: "several stations: the leading station's API URL (null while none leads)" })),
          },
          { additionalProperties: true, description: "the station answers; the pool is ok or degraded (a unit not online, a host offline with assignments, an assignment not served or degraded)" },
        ),
        ...Errors(),
      },
    },
    handler: () => {
      const health = poolHealth(store, (host) => station.hostStateOf(host.name));
      return {
        status: 200,
        body: { ...health, version: VERSION, units: store.units.size, volumes: store.volumeCount, assignments: store.live.size, ...(api.clusterHealth?.() ?? {}) },
      };
    },
  });
  // Who the caller is (the console disables what its role may not do; docs/console.md).
  api.add({
    method: "GET",
    url: "/api/v1/whoami",
    schema: {
      summary: "The caller's credential: name, role and bound host (the console reads its role here)",
      querystring: NoQuery,
      response: {
        200: Type.Object({ name: Type.String(), role: Enum(["admin", "operator", "viewer", "host", "join"]), host: Type.Union([Type.String(), Type.Null()]) }, { additionalProperties: true, description: "caller" }),
        ...Errors(),
      },
    },
    handler: ({ principal }) => ({ status: 200, body: { name: principal.name, role: principal.role, host: principal.host } }),
  });
  api.add({
    method: "GET",
    url: "/api/v1/openapi.json",
    schema: {
      summary: "This document (OpenAPI 3.1, generated from the routes' schemas)",
      querystring: NoQuery,
      response: { 200: Type.Object({ openapi: Type.String(), paths: Type.Object({}, { additionalProperties: true }) }, { additionalProperties: true }), ...Errors() },
    },
    handler: () => ({ status: 200, body: openApiDocument() }),
  });
  api.add({
    method: "GET",
    url: "/api/v1/events",
    schema: {
      summary: "Server-Sent Events of every change (Last-Event-ID or ?since= replays)",
      querystring: EventsQuery,
      produces: ["text/event-stream"],
      response: {
        200: Type.String({ description: "event stream: `id: SEQ`, `event: TYPE`, `data: {seq, at, type, action, subject, data}`" }),
        503: Ref(ErrorBody, "too many subscribers"),
        ...Errors(),
      },
    },
    handler: ({ request, reply, query, principal }) => {
      const since = query.get("since") ?? request.headers["last-event-id"];
      let after: number | null = null;
      if (typeof since === "string") {
        if (!/^[0-9]{1,15}$/.test(since)) throw invalid("Last-Event-ID", `expected an event number, got ${show(since)}`);
        after = Number(since);
      }
      if (api.subscribers.size >= SSE_SUBSCRIBERS_MAX) {
        throw new IpsanError("SHUTTING_DOWN", `too many event stream subscribers (SSE_SUBSCRIBERS_MAX=${SSE_SUBSCRIBERS_MAX}); try again later`);
      }
      reply.hijack();
      subscribe(api, reply.raw, after, principal.name);
      return null;
    },
  });
  api.add({
    method: "GET",
    url: "/metrics",
    schema: {
      summary: "Prometheus metrics",
      querystring: NoQuery,
      produces: ["text/plain"],
      response: { 200: Type.String({ description: "text format 0.0.4" }), ...Errors() },
    },
    handler: () => ({ status: 200, body: metricsText(api), headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" } }),
  });
}

function subscribe(api: Api, res: ServerResponse, after: number | null, opener: string): void {
  const store = api.station.store;
  api.station.metrics.httpRequests.inc("200");
  res.writeHead(200, {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-store",
    connection: "keep-alive",
    "x-accel-buffering": "no",
  });
  res.write(`: ipsan station event stream\nretry: 2000\n\n`);
  api.subscribers.set(res, opener);
  const write = (event: StationEvent): void => {
    if (res.writableLength > SSE_BUFFER_BYTES_MAX) {
      log.limited("sse-slow", "event stream subscriber does not read; disconnecting it");
      res.destroy();
      return;
    }
    const data = JSON.stringify({ seq: event.seq, at: new Date(event.atMs).toISOString(), type: event.type, action: event.action, subject: event.subject, data: event.data });
    res.write(`id: ${event.seq}\nevent: ${event.type}\ndata: ${data}\n\n`);
  };
  // Several stations: an event leaves once its change is in etcd (in order), so no subscriber sees a
  // change a takeover could lose; if this station stops leading first, the stream ends and the client
  // reconnects (to the new leader, with Last-Event-ID).
  const durable = api.clusterDurable;
  let chain = Promise.resolve();
  const deliver =
    durable === undefined
      ? write
      : (event: StationEvent): void => {
          const gate = durable();
          gate.catch(() => undefined); // handled here; the chain below acts on it in order
          chain = chain
            .then(() => gate)
            .then(() => write(event))
            .catch(() => void res.destroy());
        };
  if (after !== null) for (const event of store.eventsAfter(after)) deliver(event);
  const unsubscribe = store.subscribe(deliver);
  const heartbeat = setInterval(() => res.write(`: heartbeat ${new Date().toISOString()}\n\n`), SSE_HEARTBEAT_MS);
  const cleanup = (): void => {
    clearInterval(heartbeat);
    unsubscribe();
    api.subscribers.delete(res);
  };
  res.on("close", cleanup);
  res.on("error", cleanup);
}

export function metricsText(api: Api): string {
  const station = api.station;
  const store = station.store;
  const unitsByState = new Map<string, number>(UNIT_STATES.map((s) => [s, 0]));
  for (const unit of store.units.values()) unitsByState.set(unit.state, (unitsByState.get(unit.state) ?? 0) + 1);
  const hostsByState = new Map<string, number>(HOST_STATES.map((s) => [s, 0]));
  for (const host of store.hosts.keys()) {
    const state = station.hostStateOf(host);
    hostsByState.set(state, (hostsByState.get(state) ?? 0) + 1);
  }
  const assignmentsByState = new Map<string, number>([...LIVE_ASSIGNMENT_STATES].map((s) => [s, 0]));
  for (const a of store.live.values()) assignmentsByState.set(a.state, (assignmentsByState.get(a.state) ?? 0) + 1);
  let capacity = 0;
  let free = 0;
  let reserved = 0;
  for (const unit of store.units.values()) {
    capacity += unit.capacityBytes;
    free += station.usableFreeBytes(unit.name);
    reserved += station.carves.reservedBytes(unit.name);
  }
  const m = station.metrics;
  const memory = process.memoryUsage();
  return [
    renderGauge("ipsan_station_units", "Units in the pool, by state", [...unitsByState].map(([state, n]) => [{ state }, n] as const)),
    renderGauge("ipsan_station_volumes", "Volumes on all units of the pool", [[{}, store.volumeCount]]),
    renderGauge("ipsan_station_pool_capacity_bytes", "Capacity of all units", [[{}, capacity]]),
    renderGauge("ipsan_station_pool_free_bytes", "Free space on all units (reported, minus carves not yet reported)", [[{}, free]]),
    renderGauge("ipsan_station_pool_reserved_bytes", "Bytes of carves started on units and not yet in their reports", [[{}, reserved]]),
    renderGauge("ipsan_station_hosts", "Registered hosts, by state", [...hostsByState].map(([state, n]) => [{ state }, n] as const)),
    renderGauge("ipsan_station_assignments", "Live assignments, by state", [...assignmentsByState].map(([state, n]) => [{ state }, n] as const)),
    renderGauge("ipsan_station_event_subscribers", "Open event streams", [[{}, api.subscribers.size]]),
    renderGauge("ipsan_station_tasks", "Tasks kept (unfinished, and the last TASKS_HISTORY_MAX finished), by state", api.tasks.runner.countByState().map(([state, n]) => [{ state }, n] as const)),
    renderGauge("ipsan_station_leg_replacements", "Mirror leg replacements recorded and not yet finished or undone", [[{}, store.replacements.size]]),
    renderGauge("ipsan_station_leg_volumes_to_delete", "Old or undone leg volumes waiting for their unit (and, for an old leg, its replacement in-sync)", [[{}, store.legDeletions.size]]),
    renderGauge("ipsan_station_resident_memory_bytes", "Resident set size of the station process", [[{}, process.memoryUsage.rss()]]),
    renderGauge("ipsan_station_heap_used_bytes", "V8 heap in use", [[{}, memory.heapUsed]]),
    renderGauge("ipsan_station_heap_total_bytes", "V8 heap reserved", [[{}, memory.heapTotal]]),
    renderGauge("ipsan_station_external_bytes", "Memory held by C++ objects bound to JavaScript (buffers, SQLite statements)", [[{}, memory.external]]),
    m.allocationSeconds.render(),
    m.allocations.render(),
    m.unitCalls.render(),
    m.httpRequests.render(),
    api.extraMetrics?.() ?? "",
  ].join("");
}
