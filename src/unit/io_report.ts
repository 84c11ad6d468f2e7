// The unit's I/O statistics as the control API serves them (docs/unit.md
// "I/O statistics"): GET /v1/stats (JSON, cumulative counters per volume and
// per export with the unit's monotonic uptime and boot id) and GET /metrics
// (the same counters as Prometheus text). The counting itself is the NBD
// server's (src/nbd/io_stats.ts); this file sums exports into volumes (a
// volume and its partitions) and drops the counters of exports that are gone.

import { type IoCountersView, type IoStats, LATENCY_BUCKETS_US, addCounters, zeroCounters } from "../nbd/io_stats.ts";
import { type Labels, renderCounter, renderGauge, renderHistogram } from "../util/prometheus.ts";
import { type VolumeManager, parseExportName } from "./volumes.ts";

export interface ExportStatsView extends IoCountersView {
  export: string;
}

export interface VolumeStatsView extends IoCountersView {
  volume: string;
  exports: ExportStatsView[];
}

/** GET /v1/stats. */
export interface UnitStatsView {
  unit: string;
  /** Changes when the unit restarts (its counters start again from zero). */
  bootId: string;
  /** Milliseconds since the unit started counting (monotonic): rates are differences over differences of this. */
  uptimeMs: number;
  /** NBD connections open (in the handshake or serving an export). */
  connections: number;
  latencyBucketsUs: readonly number[];
  /** Every export's counters since the start, those of exports since deleted included (never decreasing within one boot). */
  totals: IoCountersView;
  volumes: VolumeStatsView[];
}

export interface IoSource {
  readonly stats: IoStats;
  readonly connectionCount: number;
}

/** True while export `name` (a volume, or partition N of one) exists on the unit. */
function exportExists(manager: VolumeManager, name: string): boolean {
  const parsed = parseExportName(name);
  if (parsed === undefined) return false;
  const volume = manager.volume(parsed.volume);
  if (volume === undefined) return false;
  return parsed.partition === undefined || parsed.partition <= volume.partitions.length;
}

export function unitStats(unit: string, source: IoSource, manager: VolumeManager): UnitStatsView {
  source.stats.prune((name) => exportExists(manager, name));
  const volumes = new Map<string, VolumeStatsView>();
  for (const counters of source.stats.exports()) {
    const view = counters.view();
    const volumeName = parseExportName(counters.name)?.volume ?? counters.name;
    let volume = volumes.get(volumeName);
    if (volume === undefined) {
      volume = { volume: volumeName, ...zeroCounters(), exports: [] };
      volumes.set(volumeName, volume);
    }
    addCounters(volume, view);
    volume.exports.push({ export: counters.name, ...view });
  }
  const items = [...volumes.values()].sort((a, b) => (a.volume < b.volume ? -1 : 1));
  for (const item of items) item.exports.sort((a, b) => (a.export < b.export ? -1 : 1));
  return {
    unit,
    bootId: source.stats.bootId,
    uptimeMs: Math.round(source.stats.uptimeMs()),
    connections: source.connectionCount,
    latencyBucketsUs: LATENCY_BUCKETS_US,
    totals: source.stats.totals(),
    volumes: items,
  };
}

const OPS = ["read", "write", "flush", "trim", "zero"] as const;

function opCount(c: IoCountersView, op: (typeof OPS)[number]): number {
  switch (op) {
    case "read":
      return c.reads;
    case "write":
      return c.writes;
    case "flush":
      return c.flushes;
    case "trim":
      return c.trims;
    case "zero":
      return c.zeroes;
  }
}

/** The iSCSI target's gauges in GET /metrics (--iscsi only). */
export interface IscsiMetrics {
  /** Connections open (logging in or in full feature phase). */
  readonly connections: number;
  /** Bytes of socket read arenas reserved now, and by how many connections (IscsiLimits.readArenaBytesMax). */
  readonly readArenaBytes: number;
  readonly readArenaConnections: number;
  readonly readArenaBytesMax: number;
}

/** GET /metrics: the counters of every export, labelled by export and volume (names in docs/unit.md). */
export function unitMetricsText(view: UnitStatsView, refused: { connections: number; opens: number }, iscsi?: IscsiMetrics): string {
  const exports = view.volumes.flatMap((v) => v.exports.map((e) => ({ labels: { export: e.export, volume: v.volume } as Labels, c: e as IoCountersView })));
  const boundsSeconds = view.latencyBucketsUs.map((us) => us / 1e6);
  return [
    renderGauge("ipsan_unit_uptime_seconds", "Seconds since the unit started counting (counters restart from zero with the unit)", [[{}, view.uptimeMs / 1000]]),
    renderGauge("ipsan_unit_nbd_connections", "NBD connections open (handshake or transmission)", [[{}, view.connections]]),
    renderGauge("ipsan_unit_export_connections", "NBD connections serving each export", exports.map((e) => [e.labels, e.c.connections] as const)),
    renderCounter(
      "ipsan_unit_requests_total",
      "NBD requests answered successfully, by export and operation",
      exports.flatMap((e) => OPS.map((op) => [{ ...e.labels, op }, opCount(e.c, op)] as const)),
    ),
    renderCounter(
      "ipsan_unit_bytes_total",
      "Bytes read and written, by export and operation",
      exports.flatMap((e) => [[{ ...e.labels, op: "read" }, e.c.readBytes] as const, [{ ...e.labels, op: "write" }, e.c.writeBytes] as const]),
    ),
    renderCounter("ipsan_unit_errors_total", "NBD requests refused or failed, by export", exports.map((e) => [e.labels, e.c.errors] as const)),
    renderHistogram(
      "ipsan_unit_request_duration_seconds",
      "Time from handling a request to handing its reply to the socket, by export and operation (read, write)",
      boundsSeconds,
      exports.flatMap((e) => [
        { labels: { ...e.labels, op: "read" }, counts: e.c.readLatencyBuckets, sum: e.c.readLatencyUsSum / 1e6 },
        { labels: { ...e.labels, op: "write" }, counts: e.c.writeLatencyBuckets, sum: e.c.writeLatencyUsSum / 1e6 },
      ]),
    ),
    renderCounter("ipsan_unit_refused_total", "Refused NBD connections and export opens (no grant, unknown TLS identity)", [
      [{ what: "connection" }, refused.connections],
      [{ what: "open" }, refused.opens],
    ]),
    ...(iscsi === undefined
      ? []
      : [
          renderGauge("ipsan_unit_iscsi_connections", "iSCSI connections open (logging in or in full feature phase)", [[{}, iscsi.connections]]),
          renderGauge("ipsan_unit_iscsi_read_arena_bytes", "Bytes of socket read arenas reserved by iSCSI connections receiving bulk data (idle ones reserve none)", [[{}, iscsi.readArenaBytes]]),
          renderGauge("ipsan_unit_iscsi_read_arena_connections", "iSCSI connections reading into arenas", [[{}, iscsi.readArenaConnections]]),
          renderGauge("ipsan_unit_iscsi_read_arena_bytes_max", "The bound on those bytes (IPSAN_ISCSI_LIMITS readArenaBytesMax)", [[{}, iscsi.readArenaBytesMax]]),
        ]),
  ].join("");
}
