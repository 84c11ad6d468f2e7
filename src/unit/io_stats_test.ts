// The unit's I/O statistics (docs/unit.md "I/O statistics"), against a real
// `ipsan unit` process and a real client (nbdsh, libnbd): a known sequence of
// requests (writes, reads, a flush, trims, a zero, one out-of-range read that
// the unit refuses) on a volume and on one of its partitions shows up exactly
// in GET /v1/stats, summed per volume with the partition's export apart; an
// open connection is counted while it is open; a deleted volume leaves the
// answer but not the totals; GET /metrics is Prometheus
// text whose every family has HELP and TYPE and whose samples parse; both
// need the control token; and a restarted unit answers a new bootId with its
// counters back at zero; a token from --metrics-token-file reads /metrics and
// /v1/stats and nothing else (403).

import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import assert from "node:assert/strict";
import { controlOk, controlRequest } from "../testing/control.ts";
import { fetchText } from "../testing/fetch.ts";
import { runOk, sleep } from "../testing/process.ts";
import { startUnit } from "../testing/unit.ts";
import type { UnitStatsView, VolumeStatsView } from "./io_report.ts";
import { LATENCY_BUCKETS_US } from "../nbd/io_stats.ts";

const MIB = 1024 * 1024;

function nbdshScript(uri: string, body: string): Promise<unknown> {
  return runOk("nbdsh", ["-c", `h.connect_uri(${JSON.stringify(uri)})\nh.set_strict_mode(0)\n${body}`], { timeoutMs: 20_000 });
}

function volumeOf(stats: UnitStatsView, name: string): VolumeStatsView {
  const volume = stats.volumes.find((v) => v.volume === name);
  assert.ok(volume !== undefined, `volume ${name} in ${JSON.stringify(stats.volumes.map((v) => v.volume))}`);
  return volume;
}

const SAMPLE = /^([a-z_:][a-z0-9_:]*)(\{([a-z_]+="(?:[^"\\]|\\.)*")(,[a-z_]+="(?:[^"\\]|\\.)*")*\})? (-?[0-9.e+-]+|\+Inf|NaN)$/;

/** Parses Prometheus text (format 0.0.4) strictly enough: each sample belongs to a family declared with HELP and TYPE. */
function parseMetrics(text: string): Map<string, { type: string; samples: { line: string; value: number }[] }> {
  const families = new Map<string, { type: string; samples: { line: string; value: number }[] }>();
  let help: string | undefined;
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const h = /^# HELP ([a-z_]+) .+$/.exec(line);
    if (h !== null) {
      help = h[1];
      continue;
    }
    const t = /^# TYPE ([a-z_]+) (counter|gauge|histogram)$/.exec(line);
    if (t !== null) {
      assert.equal(t[1], help, `TYPE after its HELP: ${line}`);
      families.set(t[1] ?? "", { type: t[2] ?? "", samples: [] });
      continue;
    }
    const s = SAMPLE.exec(line);
    assert.ok(s !== null, `sample line parses: ${JSON.stringify(line)}`);
    const name = s[1] ?? "";
    const family = families.get(name) ?? families.get(name.replace(/_(bucket|sum|count)$/, ""));
    assert.ok(family !== undefined, `sample of a declared family: ${line}`);
    family.samples.push({ line, value: Number(s[5]) });
  }
  return families;
}

test("a unit counts I/O per export and volume; /v1/stats and /metrics report it; a restart starts again from zero", { timeout: 60_000 }, async () => {
  const unit = await startUnit({ capacity: "128M", volumes: [{ name: "v1", size: "16M" }, { name: "v2", size: "4M" }], control: true });
  try {
    await controlOk(unit, "PUT", "/v1/volumes/v1/partitions", { sizesBytes: [4 * MIB, 4 * MIB] });
    const idle = (await controlOk(unit, "GET", "/v1/stats")) as UnitStatsView;
    assert.equal(idle.unit, unit.name);
    assert.match(idle.bootId, /^[0-9a-f]{16}$/);
    assert.deepEqual(idle.latencyBucketsUs, LATENCY_BUCKETS_US);
    assert.equal(idle.totals.reads + idle.totals.writes, 0);

    await nbdshScript(
      unit.uri("v1"),
      [
        "for i in range(10): h.pwrite(b'x' * 4096, i * 4096)",
        "for i in range(5): h.pread(8192, i * 8192)",
        "h.flush()",
        "h.trim(4096, 0)",
        "h.trim(4096, 4096)",
        "h.zero(4096, 8192)",
        "try:\n  h.pread(4096, 64 * 1024 * 1024)\nexcept nbd.Error:\n  pass",
      ].join("\n"),
    );
    await nbdshScript(unit.uri("v1/p2"), "for i in range(3): h.pwrite(b'y' * 65536, i * 65536)\nh.pread(512, 0)");

    const stats = (await controlOk(unit, "GET", "/v1/stats")) as UnitStatsView;
    const v1 = volumeOf(stats, "v1");
    assert.deepEqual(
      v1.exports.map((e) => e.export),
      ["v1", "v1/p2"],
      "exports opened, each apart",
    );
    const whole = v1.exports[0];
    const part = v1.exports[1];
    assert.ok(whole !== undefined && part !== undefined);
    assert.deepEqual(
      { reads: whole.reads, writes: whole.writes, readBytes: whole.readBytes, writeBytes: whole.writeBytes, flushes: whole.flushes, trims: whole.trims, zeroes: whole.zeroes, errors: whole.errors },
      { reads: 5, writes: 10, readBytes: 5 * 8192, writeBytes: 10 * 4096, flushes: 1, trims: 2, zeroes: 1, errors: 1 },
    );
    assert.deepEqual(
      { reads: part.reads, writes: part.writes, readBytes: part.readBytes, writeBytes: part.writeBytes, errors: part.errors },
      { reads: 1, writes: 3, readBytes: 512, writeBytes: 3 * 65536, errors: 0 },
    );
    assert.equal(v1.reads, 6, "the volume sums its exports");
    assert.equal(v1.writeBytes, 10 * 4096 + 3 * 65536);
    assert.equal(stats.totals.writes, 13);
    assert.equal(whole.readLatencyBuckets.length, LATENCY_BUCKETS_US.length + 1);
    assert.equal(whole.readLatencyBuckets.reduce((a, b) => a + b, 0), 5, "every read in one latency bucket");
    assert.equal(whole.writeLatencyBuckets.reduce((a, b) => a + b, 0), 10);
    assert.ok(whole.readLatencyUsSum > 0 && whole.writeLatencyUsSum > 0, "latency sums count");
    assert.ok(whole.readLatencyUsSum / whole.reads < 1_000_000, "a mean read latency under a second on loopback");
    assert.equal(v1.connections, 0, "the clients are gone");
    assert.equal(stats.volumes.some((v) => v.volume === "v2"), false, "a volume never opened has no counters");
    assert.ok(stats.uptimeMs >= idle.uptimeMs);

    // A connection open now is counted on its export.
    const holder = nbdshScript(unit.uri("v2"), "import time\nh.pread(4096, 0)\ntime.sleep(2)");
    let open = 0;
    for (let i = 0; i < 60 && open === 0; i++) {
      await sleep(50);
      const now = (await controlOk(unit, "GET", "/v1/stats")) as UnitStatsView;
      open = now.volumes.find((v) => v.volume === "v2")?.connections ?? 0;
    }
    assert.equal(open, 1, "the open connection on v2 is counted");
    await holder;

    // A volume deleted: its counters leave the answer, and stay in the totals (they never go back within one boot).
    const beforeDelete = (await controlOk(unit, "GET", "/v1/stats")) as UnitStatsView;
    assert.equal(volumeOf(beforeDelete, "v2").reads, 1);
    await controlOk(unit, "DELETE", "/v1/volumes/v2");
    const afterDelete = (await controlOk(unit, "GET", "/v1/stats")) as UnitStatsView;
    assert.equal(afterDelete.volumes.some((v) => v.volume === "v2"), false, "the deleted volume's counters are dropped");
    const { connections: _c1, ...totalsBefore } = beforeDelete.totals;
    const { connections: _c2, ...totalsAfter } = afterDelete.totals;
    assert.deepEqual(totalsAfter, totalsBefore, "the totals keep the deleted volume's I/O");

    // Prometheus text, with the control token only.
    assert.equal((await controlRequest(unit, "GET", "/metrics", undefined, "not-the-token-0123456789")).status, 401);
    assert.equal((await controlRequest(unit, "GET", "/v1/stats", undefined, "not-the-token-0123456789")).status, 401);
    const { response, text } = await fetchText(`${unit.controlUrl}/metrics`, { headers: { authorization: `Bearer ${unit.controlToken()}` } }, 10_000);
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
    const families = parseMetrics(text);
    const expected: Record<string, string> = {
      ipsan_unit_uptime_seconds: "gauge",
      ipsan_unit_nbd_connections: "gauge",
      ipsan_unit_export_connections: "gauge",
      ipsan_unit_requests_total: "counter",
      ipsan_unit_bytes_total: "counter",
      ipsan_unit_errors_total: "counter",
      ipsan_unit_request_duration_seconds: "histogram",
      ipsan_unit_refused_total: "counter",
    };
    for (const [name, type] of Object.entries(expected)) assert.equal(families.get(name)?.type, type, `${name} is a ${type}`);
    const sample = (name: string, labels: string): number | undefined =>
      families.get(name)?.samples.find((s) => s.line.startsWith(`${name}{${labels}}`))?.value;
    assert.equal(sample("ipsan_unit_requests_total", 'export="v1",volume="v1",op="write"'), 10);
    assert.equal(sample("ipsan_unit_bytes_total", 'export="v1/p2",volume="v1",op="write"'), 3 * 65536);
    assert.equal(sample("ipsan_unit_errors_total", 'export="v1",volume="v1"'), 1);
    const histogram = families.get("ipsan_unit_request_duration_seconds")?.samples ?? [];
    const inf = histogram.find((s) => s.line.startsWith('ipsan_unit_request_duration_seconds_bucket{export="v1",volume="v1",op="read",le="+Inf"}'));
    assert.equal(inf?.value, 5, "+Inf bucket counts every read");
    const buckets = histogram.filter((s) => s.line.startsWith('ipsan_unit_request_duration_seconds_bucket{export="v1",volume="v1",op="read"'));
    assert.equal(buckets.length, LATENCY_BUCKETS_US.length + 1);
    for (let i = 1; i < buckets.length; i++) assert.ok((buckets[i]?.value ?? 0) >= (buckets[i - 1]?.value ?? 0), "buckets are cumulative");

    // A restart: a new bootId, counters from zero. With --metrics-token-file, a token that reads the statistics only.
    const stopped = await unit.stop();
    assert.equal(stopped.code, 0);
    const metricsTokenFile = join(unit.dataDir, "metrics.token");
    const metricsToken = "scrape-only-token-0123456789";
    writeFileSync(metricsTokenFile, `${metricsToken}\n`, { mode: 0o600 });
    const again = await startUnit({ capacity: "128M", dataDir: unit.dataDir, control: true, extraArgs: ["--metrics-token-file", metricsTokenFile] });
    try {
      const fresh = (await controlOk(again, "GET", "/v1/stats")) as UnitStatsView;
      assert.notEqual(fresh.bootId, stats.bootId);
      assert.equal(fresh.totals.writes, 0);
      assert.ok(fresh.uptimeMs < stats.uptimeMs + 60_000);
      assert.equal((await controlRequest(again, "GET", "/v1/stats", undefined, metricsToken)).status, 200);
      const scrape = await fetchText(`${again.controlUrl}/metrics`, { headers: { authorization: `Bearer ${metricsToken}` } }, 10_000);
      assert.equal(scrape.response.status, 200);
      assert.match(scrape.text, /^# TYPE ipsan_unit_requests_total counter$/m);
      for (const [method, path] of [["GET", "/v1/info"], ["GET", "/v1/volumes"], ["POST", "/v1/volumes"], ["DELETE", "/v1/volumes/v1"]] as const) {
        const refused = await controlRequest(again, method, path, method === "POST" ? { name: "x1", sizeBytes: MIB } : undefined, metricsToken);
        assert.equal(refused.status, 403, `${method} ${path} with the metrics token`);
        assert.equal((refused.body as { error?: { code?: string } }).error?.code, "PERMISSION_DENIED");
      }
      assert.ok(((await controlOk(again, "GET", "/v1/volumes")) as { items: { name: string }[] }).items.some((v) => v.name === "v1"), "nothing changed");
    } finally {
      await again.close();
    }
  } finally {
    await unit.close();
  }
});
