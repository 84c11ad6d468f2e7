// I/O statistics end to end (docs/api.md "Statistics"): a real station
// (reading units' counters every second, --stats-interval 1s) and a real unit
// joined to it; host h1 gets a volume; two fio processes (ioengine=nbd, over
// NBD with TLS-PSK on the host's nbds:// URI, straight to the unit) run at
// once for a few seconds, one writing 4 KiB blocks paced at WRITE_IOPS and
// one reading paced at READ_IOPS. The station's series of the unit and of
// the volume must show those rates (the median of the busy points within
// 20%) with latencies > 0, and their sum over time must come within 15% of
// what fio says it did. Then the unit is restarted (its counters start again
// from zero) and does a little more I/O: no point of any series is negative,
// and points after the restart show the new I/O. The pool's series has the
// unit's capacity; a viewer's token reads the statistics; a bad ?window= is a
// 400 naming `window`; the station's /metrics counts the polls.

import { test } from "node:test";
import assert from "node:assert/strict";
import type { Assignment } from "../host/station_client.ts";
import { StationClient, StationError } from "../host/station_client.ts";
import { fetchText } from "../testing/fetch.ts";
import { fioTlsEnv } from "../testing/fio_tls.ts";
import { sleep, waitFor } from "../testing/process.ts";
import type { RatePoint } from "../station/stats/series.ts";
import { San, describeFio, fio } from "./harness.ts";

const MIB = 1024 * 1024;
const WRITE_IOPS = 300;
const READ_IOPS = 200;
const FIO_SECONDS = 6;

interface UnitStatsAnswer {
  unit: string;
  points: RatePoint[];
  volumes: { volume: string; points: RatePoint[] }[];
}

function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN;
}

/** Operations over the series: each point's rate times the time since the point before it. */
function integrate(points: readonly RatePoint[], field: "readOps" | "writeOps" | "readBytes" | "writeBytes"): number {
  let sum = 0;
  for (let i = 1; i < points.length; i++) sum += ((points[i]?.[field] ?? 0) * ((points[i]?.t ?? 0) - (points[i - 1]?.t ?? 0))) / 1000;
  return sum;
}

function paced(rw: "randread" | "randwrite", iops: number): string[] {
  return [`--rw=${rw}`, "--bs=4k", "--iodepth=4", `--size=${16 * MIB}`, "--time_based", `--runtime=${FIO_SECONDS}`, `--rate_iops=${iops}`, "--randrepeat=1"];
}

test("stats: the station's series show what real clients did on a unit, survive its restart without a negative rate", { timeout: 120_000 }, async () => {
  const san = new San("stats");
  try {
    const station = await san.startStation({ extraArgs: ["--stats-interval", "1s"] });
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    const client = await san.client();
    const { json } = await san.host([
      "request", "--station", station.apiUrl, "--token-file", station.tokenFile,
      "--host", "h1", "--size", "32M", "--state-dir", san.tmp.file("state-h1"), "--json",
    ]);
    const assignment = json as Assignment;
    const fioEnv = await fioTlsEnv(san.tmp.path);
    const get = async (path: string): Promise<UnitStatsAnswer> => (await client.call("GET", path)) as UnitStatsAnswer;

    // A couple of idle points first: the busy ones then have a point before them.
    await waitFor("two idle points of u1", async () => ((await get("/api/v1/stats/units/u1?window=1m")).points.length >= 2 ? true : undefined), { timeoutMs: 15_000, intervalMs: 200 });
    const [writer, reader] = await Promise.all([
      fio("stats-write", assignment.uri, paced("randwrite", WRITE_IOPS), 60_000, fioEnv),
      fio("stats-read", assignment.uri, paced("randread", READ_IOPS), 60_000, fioEnv),
    ]);
    assert.equal(writer.result.code, 0, describeFio(writer));
    assert.equal(reader.result.code, 0, describeFio(reader));
    const wrote = writer.jobs[0]?.write.io_bytes ?? 0;
    const read = reader.jobs[0]?.read.io_bytes ?? 0;
    // Two more polls so the last busy second is in the series.
    await sleep(2_500);

    const unit = await get("/api/v1/stats/units/u1?window=2m");
    assert.equal(unit.unit, "u1");
    const busy = unit.points.filter((p) => p.writeOps > 0);
    assert.ok(busy.length >= FIO_SECONDS - 2, `busy points: ${JSON.stringify(unit.points)}`);
    const within = (actual: number, expected: number, tolerance: number, what: string): void =>
      assert.ok(Math.abs(actual - expected) <= tolerance * expected, `${what}: ${actual} vs ${expected} (±${tolerance * 100}%)\n${JSON.stringify(unit.points)}`);
    within(median(busy.map((p) => p.writeOps)), WRITE_IOPS, 0.2, "median write ops/s");
    within(median(busy.filter((p) => p.readOps > 0).map((p) => p.readOps)), READ_IOPS, 0.2, "median read ops/s");
    within(median(busy.map((p) => p.writeBytes)), WRITE_IOPS * 4096, 0.2, "median write bytes/s");
    within(integrate(unit.points, "writeBytes"), wrote, 0.15, "bytes written over the series vs fio");
    within(integrate(unit.points, "readBytes"), read, 0.15, "bytes read over the series vs fio");
    assert.ok(busy.every((p) => p.writeLatencyMs > 0), "write latency measured");
    assert.ok(busy.filter((p) => p.readOps > 0).every((p) => p.readLatencyMs > 0), "read latency measured");
    const volume = unit.volumes.find((v) => v.volume === assignment.volume);
    assert.ok(volume !== undefined, `volume ${assignment.volume} has a series: ${JSON.stringify(unit.volumes.map((v) => v.volume))}`);
    within(integrate(volume.points, "writeBytes"), wrote, 0.15, "the volume's bytes written vs fio");

    const all = (await client.call("GET", "/api/v1/stats/units")) as { items: { unit: string; points: RatePoint[] }[] };
    assert.deepEqual(all.items.map((i) => i.unit), ["u1"]);
    const pool = (await client.call("GET", "/api/v1/stats/pool?window=1h")) as { points: { capacityBytes: number; units: number; unitsOnline: number; usedBytes: number; freeBytes: number }[] };
    assert.ok(pool.points.length >= 1);
    const lastPool = pool.points.at(-1);
    assert.ok(lastPool !== undefined && lastPool.units >= 1 && lastPool.capacityBytes > 0 && lastPool.usedBytes + lastPool.freeBytes === lastPool.capacityBytes, JSON.stringify(pool));

    // Restart the unit: its counters start again from zero.
    const restartedAt = Date.now();
    await san.units.get("u1")?.child.stop("SIGTERM");
    const restarted = await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    // The unit listens on a new port now.
    const uriAfter = assignment.uri.replace(/@([^/]+):[0-9]+\//, `@$1:${new URL(restarted.nbd).port}/`);
    const after = await fio("stats-after", uriAfter, [...paced("randwrite", 100).filter((a) => !a.startsWith("--runtime")), "--runtime=3"], 60_000, fioEnv);
    assert.equal(after.result.code, 0, describeFio(after));
    await sleep(2_500);
    const later = await get("/api/v1/stats/units/u1?window=5m");
    for (const series of [later.points, ...later.volumes.map((v) => v.points)]) {
      for (const point of series) {
        for (const [field, value] of Object.entries(point)) assert.ok(value >= 0, `${field}=${value} in ${JSON.stringify(point)}`);
      }
    }
    const since = later.points.filter((p) => p.t > restartedAt && p.writeOps > 0);
    assert.ok(since.length >= 1, `points after the restart show the new writes: ${JSON.stringify(later.points)}`);
    assert.ok(median(since.map((p) => p.writeOps)) <= 100 * 1.3, `no spike from the reset: ${JSON.stringify(since)}`);

    // A viewer reads the statistics; bad windows and parameters are 400s naming the field.
    const viewerToken = ((await client.call("POST", "/api/v1/tokens", { name: "stats-viewer", role: "viewer" })) as { token: string }).token;
    const viewer = new StationClient({ baseUrl: new URL(station.apiUrl), token: viewerToken });
    assert.ok(((await viewer.call("GET", "/api/v1/stats/pool")) as { points: unknown[] }).points.length >= 1);
    for (const [path, field] of [
      ["/api/v1/stats/units?window=10", "window"],
      ["/api/v1/stats/units/u1?window=1h", "window"],
      ["/api/v1/stats/pool?window=2d", "window"],
      ["/api/v1/stats/pool?step=1m", "step"],
    ] as const) {
      await assert.rejects(viewer.call("GET", path), (error: unknown) => error instanceof StationError && error.status === 400 && error.field === field, path);
    }
    await assert.rejects(viewer.call("GET", "/api/v1/stats/units/nope"), (error: unknown) => error instanceof StationError && error.status === 404);

    // The collector's own counters on the station's /metrics.
    const metrics = await fetchText(`${station.apiUrl}/metrics`, { headers: { authorization: `Bearer ${viewerToken}` } }, 10_000);
    const polled = /^ipsan_station_stats_polls_total\{result="ok"\} ([0-9]+)$/m.exec(metrics.text);
    assert.ok(polled !== null && Number(polled[1]) >= 10, `polls counted: ${polled?.[0]}`);
    assert.match(metrics.text, /^ipsan_station_stats_polls_total\{result="failed"\} [0-9]+$/m);
    assert.match(metrics.text, /^ipsan_station_stats_series_bytes [1-9][0-9]*$/m);
  } finally {
    await san.close();
  }
});
