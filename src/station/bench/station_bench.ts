// Control-plane benchmark of the station (issue 3, section 7), run by
// `npm run bench:station`:
//   1. a real `ipsan station` process; simulated units (sim_pool.js, a child
//      process) join it over the real discovery protocol: startup -> visible
//      latency per unit = when the station's event stream announced the unit
//      (committed to its database, with its volumes) minus when the simulator
//      started that unit's agent (same machine clock);
//   2. allocation latency against the station (the simulator answers the unit
//      control API): sequential requests that reuse a free volume, then
//      requests that carve a new one, then 8 clients at once (throughput);
//   3. station RSS after loading the pool and after the allocations;
//   4. kill -9 and restart on the same data: time until the ready line, until
//      the API answers, until every unit is online again.
//
//   node dist/station/bench/station_bench.js [--units 1000] [--volumes 100]
//        [--allocations 500] [--carves 200]
// Prints one JSON object and a Markdown table for docs/benchmarks.md.

import { spawn, type ChildProcess } from "node:child_process";
import { cpus, loadavg } from "node:os";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { preciseNowMs } from "../../discovery/sim_units.ts";
import { parseFlags } from "../../util/flags.ts";
import { startStation, type RunningStation } from "../harness.ts";

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] ?? NaN;
}

function summary(samples: number[]): { n: number; p50: number; p99: number; max: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  const round = (x: number): number => Math.round(x * 100) / 100;
  return { n: sorted.length, p50: round(percentile(sorted, 50)), p99: round(percentile(sorted, 99)), max: round(sorted.at(-1) ?? NaN) };
}

/** Gauges and the allocation histogram from the station's /metrics. */
async function stationMetrics(station: RunningStation): Promise<{ heapMb: number; heapTotalMb: number; externalMb: number; serverP50Ms: number; serverP99Ms: number }> {
  const text = (await station.api("GET", "/metrics")).text;
  const gauge = (name: string): number => Math.round(Number(new RegExp(`^${name} ([0-9.e+]+)$`, "m").exec(text)?.[1] ?? NaN) / 1024 / 1024);
  const heap = Number(/^ipsan_station_heap_used_bytes ([0-9.e+]+)$/m.exec(text)?.[1] ?? NaN);
  const buckets = [...text.matchAll(/^ipsan_station_allocation_seconds_bucket\{le="([^"]+)"\} ([0-9]+)$/gm)].map((m) => ({
    le: m[1] === "+Inf" ? Infinity : Number(m[1]),
    count: Number(m[2]),
  }));
  const total = buckets.at(-1)?.count ?? 0;
  const quantile = (q: number): number => (buckets.find((b) => b.count >= q * total)?.le ?? NaN) * 1000;
  return {
    heapMb: Math.round(heap / 1024 / 1024),
    heapTotalMb: gauge("ipsan_station_heap_total_bytes"),
    externalMb: gauge("ipsan_station_external_bytes"),
    serverP50Ms: quantile(0.5),
    serverP99Ms: quantile(0.99),
  };
}

function rssMb(pid: number): { rssMb: number; peakMb: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+([0-9]+) kB`, "m").exec(status)?.[1] ?? NaN);
  return { rssMb: Math.round(kb("VmRSS") / 1024), peakMb: Math.round(kb("VmHWM") / 1024) };
}

async function waitFor<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>, intervalMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Reads the station's event stream; calls back with each unit "added" event (the unit is committed, with its volumes). */
async function watchUnits(station: RunningStation, onAdded: (unit: string, atMs: number) => void): Promise<() => void> {
  const controller = new AbortController();
  const response = await fetch(`${station.url}/api/v1/events`, { headers: { authorization: `Bearer ${station.token()}` }, signal: controller.signal });
  const reader = response.body?.getReader();
  if (reader === undefined) throw new Error("no event stream");
  let buffer = "";
  void (async () => {
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        const atMs = preciseNowMs();
        buffer += Buffer.from(value).toString("utf8");
        let end: number;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = /^data: (.*)$/m.exec(block)?.[1];
          if (data === undefined || !/^event: unit$/m.test(block)) continue;
          const event = JSON.parse(data) as { action: string; subject: string };
          if (event.action === "added") onAdded(event.subject, atMs);
        }
      }
    } catch {
      // aborted
    }
  })();
  return () => controller.abort();
}

async function main(): Promise<void> {
  const { values } = parseFlags(process.argv.slice(2), {
    units: { type: "string" },
    volumes: { type: "string" },
    allocations: { type: "string" },
    carves: { type: "string" },
    "no-restart": { type: "boolean" },
    "station-args": { type: "string" },
  });
  const stationArgs = (values["station-args"] ?? "").split(" ").filter((a) => a !== "");
  const unitCount = Number(values.units ?? "1000");
  const volumesPerUnit = Number(values.volumes ?? "100");
  const reuseCount = Number(values.allocations ?? "500");
  const carveCount = Number(values.carves ?? "200");
  const env = { IPSAN_LOG: "warn" };

  let station = await startStation({ keepData: true, env, extraArgs: stationArgs });
  const dataDir = station.dataDir;
  const visibleAtMs = new Map<string, number>();
  const stopWatching = await watchUnits(station, (unit, atMs) => {
    if (!visibleAtMs.has(unit)) visibleAtMs.set(unit, atMs);
  });

  const simScript = join(dirname(fileURLToPath(import.meta.url)), "sim_pool.js");
  const startTimes = join(dataDir, "start-times.json");
  const t0 = preciseNowMs();
  const sim: ChildProcess = spawn(
    process.execPath,
    [simScript, "--station", `${station.discovery.host}:${station.discovery.port}`, "--cluster-key-file", station.clusterKeyFile(),
      "--units", String(unitCount), "--volumes", String(volumesPerUnit), "--start-times", startTimes],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, IPSAN_LOG: "error" } },
  );
  let simOut = "";
  sim.stdout?.on("data", (chunk: Buffer) => {
    simOut += chunk.toString("utf8");
  });
  await waitFor("simulated units started", 300_000, async () => (/ipsan sim-pool started/.test(simOut) ? true : undefined));
  await waitFor(`${unitCount} units visible`, 300_000, async () => (visibleAtMs.size >= unitCount ? true : undefined));
  const allVisibleMs = preciseNowMs() - t0;
  const started = JSON.parse(readFileSync(startTimes, "utf8")) as Record<string, number>;
  const joinLatencies = [...visibleAtMs].map(([unit, at]) => at - (started[unit] ?? NaN)).filter(Number.isFinite);
  await waitFor("every volume stored", 120_000, async () => {
    const health = (await station.api("GET", "/api/v1/health")).body as { volumes: number };
    return health.volumes >= unitCount * volumesPerUnit ? health.volumes : undefined;
  });
  const rssLoaded = rssMb(station.pid);

  const allocate = async (i: number, size: string): Promise<number> => {
    const started = performance.now();
    const response = await station.api("POST", "/api/v1/allocations", {
      requestId: `bench-${size}-${i}`,
      host: `bench-host-${size}-${i}`,
      sizeBytes: size,
      address: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`,
    });
    const elapsed = performance.now() - started;
    if (response.status !== 201) throw new Error(`allocation ${i}: ${response.status} ${response.text}`);
    return elapsed;
  };
  // Warm up the HTTP connections and JIT.
  for (let i = 0; i < 20; i++) await allocate(1_000_000 + i, "1G");
  const reuse: number[] = [];
  for (let i = 0; i < reuseCount; i++) reuse.push(await allocate(i, "1G"));
  const carve: number[] = [];
  for (let i = 0; i < carveCount; i++) carve.push(await allocate(i, "2G"));
  const concurrent: number[] = [];
  const concurrency = 8;
  const perWorker = Math.floor(reuseCount / concurrency);
  const tc = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async (_, w) => {
      for (let j = 0; j < perWorker; j++) concurrent.push(await allocate(2_000_000 + w * perWorker + j, "1G"));
    }),
  );
  const concurrentSeconds = (performance.now() - tc) / 1000;
  const rssAfter = rssMb(station.pid);
  const serverSide = await stationMetrics(station);
  stopWatching();

  // Restart after kill -9, on the same data and discovery port.
  const discovery = `${station.discovery.host}:${station.discovery.port}`;
  if (values["no-restart"] === true) {
    sim.kill("SIGTERM");
    await new Promise((r) => sim.once("exit", r));
    await station.close();
    const { rmSync } = await import("node:fs");
    rmSync(dataDir, { recursive: true, force: true });
    process.stdout.write(`${JSON.stringify({ reuse: summary(reuse), carve: summary(carve), concurrent: summary(concurrent) })}\n`);
    return;
  }
  await station.kill9();
  const tr = performance.now();
  station = await startStation({ dataDir, keepData: true, discovery, env, extraArgs: stationArgs });
  const readyMs = performance.now() - tr;
  await waitFor("API answers", 30_000, async () => ((await station.api("GET", "/api/v1/units?state=online")).status === 200 ? true : undefined), 10);
  const servingMs = performance.now() - tr;
  await waitFor("every unit online again", 120_000, async () => {
    const body = (await station.api("GET", "/api/v1/units?state=online")).body as { items: unknown[] };
    return body.items.length >= unitCount ? true : undefined;
  });
  const allOnlineMs = performance.now() - tr;
  const rssRestarted = rssMb(station.pid);

  sim.kill("SIGTERM");
  await new Promise((r) => sim.once("exit", r));
  await station.close();
  const { rmSync } = await import("node:fs");
  rmSync(dataDir, { recursive: true, force: true });

  const result = {
    machine: { cpus: cpus().length, model: cpus()[0]?.model ?? "?", node: process.version, loadAverage1m: Math.round((loadavg()[0] ?? 0) * 10) / 10 },
    stationSide: serverSide,
    pool: { units: unitCount, volumesPerUnit, volumes: unitCount * volumesPerUnit },
    joinMs: { ...summary(joinLatencies), allVisibleMs: Math.round(allVisibleMs) },
    allocationMs: { reuse: summary(reuse), carve: summary(carve), concurrent8: { ...summary(concurrent), perSecond: Math.round(concurrent.length / concurrentSeconds) } },
    stationRss: { loaded: rssLoaded, afterAllocations: rssAfter, afterRestart: rssRestarted },
    restartMs: { readyLine: Math.round(readyMs), apiServing: Math.round(servingMs), allUnitsOnline: Math.round(allOnlineMs) },
  };
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  const a = result.allocationMs;
  process.stdout.write(
    [
      "",
      `| measure (${unitCount} units, ${unitCount * volumesPerUnit} volumes) | p50 | p99 | max | target |`,
      "|---|---|---|---|---|",
      `| startup packet -> visible in the pool (committed) | ${result.joinMs.p50} ms | ${result.joinMs.p99} ms | ${result.joinMs.max} ms | |`,
      `| allocation, reusing a free volume (sequential, n=${a.reuse.n}) | ${a.reuse.p50} ms | ${a.reuse.p99} ms | ${a.reuse.max} ms | p99 < 20 ms |`,
      `| allocation, carving a new volume (sequential, n=${a.carve.n}) | ${a.carve.p50} ms | ${a.carve.p99} ms | ${a.carve.max} ms | p99 < 20 ms |`,
      `| allocation, 8 clients at once (n=${a.concurrent8.n}, ${a.concurrent8.perSecond}/s) | ${a.concurrent8.p50} ms | ${a.concurrent8.p99} ms | ${a.concurrent8.max} ms | |`,
      "",
      `all ${unitCount} units visible ${result.joinMs.allVisibleMs} ms after the simulator started; station RSS ${rssLoaded.rssMb} MB loaded, ` +
        `${rssAfter.rssMb} MB after allocations (peak ${rssAfter.peakMb} MB), target < 300 MB; restart after kill -9: ready line ${result.restartMs.readyLine} ms, ` +
        `API serving ${result.restartMs.apiServing} ms (target < 3 s), all units online ${result.restartMs.allUnitsOnline} ms. ` +
        `Station-side allocation histogram (all ${a.reuse.n + a.carve.n + a.concurrent8.n} + warm-up): p50 <= ${serverSide.serverP50Ms} ms, p99 <= ${serverSide.serverP99Ms} ms (bucket bounds); ` +
        `V8 heap in use after allocations ${serverSide.heapMb} MB; load average ${result.machine.loadAverage1m} on ${result.machine.cpus} CPUs.`,
      "",
    ].join("\n"),
  );
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    process.stderr.write(`station bench: ${(error as Error).stack ?? String(error)}\n`);
    process.exit(1);
  },
);
