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
// --etcd (several stations on etcd, issue 11): the same on a station started
// with `--etcd` on a real 3-member etcd (src/testing/etcd.ts), plus a second
// station as a follower (its start -> ready
// line includes building its copy of the database from etcd; --follower-start
// says when: before the units join, once the pool is loaded, or, the default,
// after the leader's allocations, once the leader stored a snapshot). The units know
// both discovery addresses. Measured on top: sequential allocations through
// the follower (forwarded to the leader); instead of the restart, a takeover
// (kill -9 of the leader: time until the follower leads, answers the API,
// has every unit online); the etcd log (entries and bytes appended during
// the run, as a watch saw them; the largest entry), the snapshot, etcd's db
// size, and the time to build a copy from etcd in this process.
// --compare runs both modes (single, then etcd, alternating for --runs N)
// and prints the ratios etcd/single of every latency.
//
//   node dist/station/bench/station_bench.js [--units 1000] [--volumes 100]
//        [--allocations 500] [--carves 200] [--etcd | --compare [--runs 1]]
//        [--follower-start units|loaded|allocated]
// Prints one JSON object and a Markdown table per run for docs/benchmarks.md.

import { spawn, type ChildProcess } from "node:child_process";
import { cpus, loadavg } from "node:os";
import { readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { preciseNowMs } from "../../discovery/sim_units.ts";
import { parseFlags } from "../../util/flags.ts";
import { startStation, type RunningStation } from "../harness.ts";
import { EtcdState, KEY_PREFIX_DEFAULT, decodeEntry } from "../cluster/etcd_log.ts";
import { buildLocalCopy } from "../cluster/node.ts";
import { etcdctl, startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { freeUdpPort } from "../../testing/daemon.ts";
import { stationHealth } from "../../testing/stations.ts";
import { makeTempDir, type TempDir } from "../../testing/tmp.ts";

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


type Summary = ReturnType<typeof summary>;

interface Params {
  readonly unitCount: number;
  readonly volumesPerUnit: number;
  readonly reuseCount: number;
  readonly carveCount: number;
  readonly restart: boolean;
  readonly stationArgs: readonly string[];
  /** etcd mode: when the follower starts (before the units join, once they are loaded, after the leader's allocations). */
  readonly followerStart: "units" | "loaded" | "allocated";
}

interface EtcdFigures {
  readonly followerStart: Params["followerStart"];
  readonly followerStartToReadyMs: number;
  /** What etcd held when the follower started: the snapshot it built from and the log after it. */
  readonly followerCopyFrom: { snapshotSeq: number; logEntries: number; logBytes: number } | null;
  readonly followerRss: { rssMb: number; peakMb: number };
  readonly forwarded: { reuse: Summary; carve: Summary };
  readonly takeoverMs: { leads: number; apiServing: number; allUnitsOnline: number; entriesAppended: number };
  readonly log: {
    entriesAppended: number;
    bytesAppended: number;
    largestEntryBytes: number;
    largestEntry: { seq: number; statements: number; firstSql: string };
    entriesInEtcdAtEnd: number;
    lastSeq: number;
    snapshotsStored: number;
  };
  readonly snapshot: { seq: number; imageBytes: number; compressedBytes: number; chunks: number } | null;
  readonly etcdDbBytes: number[];
  readonly copyBuildMs: number;
  /** The stations' own warnings about the cluster (a step-down, a lost lease, a copy that cannot follow), first lines of each. */
  readonly clusterWarnings: { leader: string[]; follower: string[] };
}

interface RunResult {
  readonly mode: "single" | "etcd";
  readonly machine: { cpus: number; model: string; node: string; loadAverage1m: number; loadAverageAtStart1m: number };
  readonly stationSide: Awaited<ReturnType<typeof stationMetrics>>;
  readonly pool: { units: number; volumesPerUnit: number; volumes: number };
  readonly joinMs: Summary & { allVisibleMs: number };
  readonly allocationMs: { reuse: Summary; carve: Summary; concurrent8: Summary & { perSecond: number } };
  readonly stationRss: { loaded: { rssMb: number; peakMb: number }; afterAllocations: { rssMb: number; peakMb: number }; afterRestart?: { rssMb: number; peakMb: number } };
  readonly restartMs?: { readyLine: number; apiServing: number; allUnitsOnline: number };
  readonly etcd?: EtcdFigures;
}

const load1 = (): number => Math.round((loadavg()[0] ?? 0) * 10) / 10;

/** Counts what the stations append to etcd (log entries, snapshot chunks) while the run goes on. */
async function watchEtcdLog(endpoints: readonly string[]): Promise<{ stats: { entries: number; bytes: number; largest: number; largestSeq: number; largestStatements: number; largestFirstSql: string; snapshots: number }; close: () => Promise<void> }> {
  const state = new EtcdState(endpoints);
  const stats = { entries: 0, bytes: 0, largest: 0, largestSeq: 0, largestStatements: 0, largestFirstSql: "", snapshots: 0 };
  const watcher = await state.client.watch().prefix(KEY_PREFIX_DEFAULT).create();
  watcher.on("put", (kv: { key: Buffer; value: Buffer }) => {
    const key = kv.key.toString("utf8");
    if (key.startsWith(`${KEY_PREFIX_DEFAULT}log/`)) {
      stats.entries += 1;
      stats.bytes += kv.value.length;
      if (kv.value.length > stats.largest) {
        stats.largest = kv.value.length;
        // As stored: entries over 16 KiB are gzip'd (decodeEntry inflates them).
        const entry = decodeEntry(kv.value, Number(key.slice(`${KEY_PREFIX_DEFAULT}log/`.length)));
        stats.largestSeq = entry.seq;
        stats.largestStatements = entry.statements.length;
        stats.largestFirstSql = String(entry.statements[0]?.[0] ?? "").replace(/\s+/g, " ").slice(0, 80);
      }
    } else if (key === `${KEY_PREFIX_DEFAULT}snapshot`) {
      stats.snapshots += 1;
    }
  });
  return {
    stats,
    close: async () => {
      await watcher.cancel().catch(() => undefined);
      state.close();
    },
  };
}

/** Log entries left in etcd, the newest snapshot's manifest, and every member's db size. */
async function etcdContents(cluster: EtcdCluster, withImage = true): Promise<{ entries: number; logBytes: number; lastSeq: number; snapshot: EtcdFigures["snapshot"]; dbBytes: number[] }> {
  const state = new EtcdState(cluster.endpoints);
  try {
    // Keys only, then each value on its own: a page of large entries can pass the client's 4 MiB message limit.
    const keys = await state.client.getAll().prefix(`${KEY_PREFIX_DEFAULT}log/`).keys();
    let lastSeq = 0;
    let logBytes = 0;
    for (const key of keys) {
      lastSeq = Math.max(lastSeq, Number(key.slice(`${KEY_PREFIX_DEFAULT}log/`.length)));
      logBytes += (await state.client.get(key).buffer())?.length ?? 0;
    }
    const manifest = await state.snapshotManifest();
    let snapshot: EtcdFigures["snapshot"] = null;
    if (manifest !== null) {
      const image = withImage ? await state.snapshotImage(manifest) : null;
      snapshot = { seq: manifest.seq, imageBytes: image?.length ?? NaN, compressedBytes: manifest.bytes, chunks: manifest.chunks };
      lastSeq = Math.max(lastSeq, manifest.seq);
    }
    const status = JSON.parse(await etcdctl(cluster.endpoints, "endpoint", "status", "--write-out=json")) as { Status: { dbSize: number } }[];
    return { entries: keys.length, logBytes, lastSeq, snapshot, dbBytes: status.map((s) => s.Status.dbSize) };
  } finally {
    state.close();
  }
}

/** Lines of a station's stderr from its cluster module (station-cluster), at most CLUSTER_WARNINGS_MAX. */
const CLUSTER_WARNINGS_MAX = 20;
function clusterWarnings(stderr: string): string[] {
  return stderr.split("\n").filter((line) => / station-cluster: /.test(line)).slice(0, CLUSTER_WARNINGS_MAX);
}

/** Time to build a copy of the station database from etcd (snapshot + log) in this process, as a station does at start. */
async function timeCopyBuild(cluster: EtcdCluster, dir: TempDir): Promise<number> {
  const state = new EtcdState(cluster.endpoints);
  try {
    const started = performance.now();
    const { db } = await buildLocalCopy(state, dir.file("copy.db"));
    const elapsed = performance.now() - started;
    db.close();
    return Math.round(elapsed);
  } finally {
    state.close();
  }
}

async function runOnce(mode: "single" | "etcd", p: Params): Promise<RunResult> {
  const env = { IPSAN_LOG: "warn" };
  const loadAtStart = load1();
  const { unitCount, volumesPerUnit, reuseCount, carveCount } = p;
  // etcd mode: the etcd members on tmpfs (the test kit's choice), both stations' data in the OS temp dir as in single mode.
  let cluster: EtcdCluster | null = null;
  let dirs: TempDir | null = null;
  let logWatch: Awaited<ReturnType<typeof watchEtcdLog>> | null = null;
  let follower = null as RunningStation | null;
  let followerDiscovery = "";
  let station: RunningStation;
  if (mode === "etcd") {
    cluster = await startEtcdCluster({ members: 3, prefix: "etcdbench" });
    dirs = makeTempDir("etcdbench");
    logWatch = await watchEtcdLog(cluster.endpoints);
    followerDiscovery = `127.0.0.1:${await freeUdpPort()}`;
    station = await startStation({
      dataDir: dirs.file("station-a"),
      keepData: true,
      env,
      discovery: `127.0.0.1:${await freeUdpPort()}`,
      readyWithoutDiscovery: true,
      extraArgs: ["--etcd", cluster.endpointsFlag, ...p.stationArgs],
    });
    const first = station;
    await waitFor("the first station leads", 30_000, async () => ((await stationHealth(first))?.leader === true ? true : undefined));
  } else {
    station = await startStation({ keepData: true, env, extraArgs: p.stationArgs });
  }
  const dataDir = station.dataDir;
  let followerStartToReadyMs = NaN;
  let followerCopyFrom: EtcdFigures["followerCopyFrom"] = null;
  /**
   * Starts the second station: its ready line comes once it has built its copy
   * from etcd (snapshot, then the log after it) and knows who leads.
   */
  const startFollower = async (): Promise<void> => {
    if (cluster === null || dirs === null) return;
    const seen = await etcdContents(cluster, false);
    followerCopyFrom = { snapshotSeq: seen.snapshot?.seq ?? 0, logEntries: seen.entries, logBytes: seen.logBytes };
    const tf = performance.now();
    follower = await startStation({
      dataDir: dirs.file("station-b"),
      keepData: true,
      env,
      discovery: followerDiscovery,
      readyWithoutDiscovery: true,
      extraArgs: ["--etcd", cluster.endpointsFlag, ...p.stationArgs],
    });
    followerStartToReadyMs = Math.round(performance.now() - tf);
    const f = follower;
    await waitFor("the second station follows", 30_000, async () => ((await stationHealth(f))?.leader === false ? true : undefined));
  };
  try {
    if (p.followerStart === "units") await startFollower();
    const visibleAtMs = new Map<string, number>();
    const stopWatching = await watchUnits(station, (unit, atMs) => {
      if (!visibleAtMs.has(unit)) visibleAtMs.set(unit, atMs);
    });

    const simScript = join(dirname(fileURLToPath(import.meta.url)), "sim_pool.js");
    const startTimes = join(dataDir, "start-times.json");
    const leaderDiscovery = `${station.discovery.host}:${station.discovery.port}`;
    const t0 = preciseNowMs();
    const sim: ChildProcess = spawn(
      process.execPath,
      [simScript, "--station", mode === "etcd" ? `${leaderDiscovery},${followerDiscovery}` : leaderDiscovery, "--cluster-key-file", station.clusterKeyFile(),
        "--units", String(unitCount), "--volumes", String(volumesPerUnit), "--start-times", startTimes],
      { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, IPSAN_LOG: "error" } },
    );
    const simExited = new Promise((r) => sim.once("exit", r));
    let simOut = "";
    sim.stdout?.on("data", (chunk: Buffer) => {
      simOut += chunk.toString("utf8");
    });
    try {
      await waitFor("simulated units started", 300_000, async () => (/ipsan sim-pool started/.test(simOut) ? true : undefined));
      await waitFor(`${unitCount} units visible`, 300_000, async () => (visibleAtMs.size >= unitCount ? true : undefined));
      const allVisibleMs = preciseNowMs() - t0;
      const started = JSON.parse(readFileSync(startTimes, "utf8")) as Record<string, number>;
      const joinLatencies = [...visibleAtMs].map(([unit, at]) => at - (started[unit] ?? NaN)).filter(Number.isFinite);
      const leaderNow = station;
      await waitFor("every volume stored", 120_000, async () => {
        const health = (await leaderNow.api("GET", "/api/v1/health")).body as { volumes: number };
        return health.volumes >= unitCount * volumesPerUnit ? health.volumes : undefined;
      });
      const rssLoaded = rssMb(station.pid);

      if (p.followerStart === "loaded") await startFollower();

      const allocate = async (via: RunningStation, i: number, size: string, tag = ""): Promise<number> => {
        const started = performance.now();
        const response = await via.api("POST", "/api/v1/allocations", {
          requestId: `bench${tag}-${size}-${i}`,
          host: `bench-host${tag}-${size}-${i}`,
          sizeBytes: size,
          address: `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`,
        });
        const elapsed = performance.now() - started;
        if (response.status !== 201) throw new Error(`allocation ${tag}${i}: ${response.status} ${response.text}`);
        return elapsed;
      };
      // Warm up the HTTP connections and JIT.
      for (let i = 0; i < 20; i++) await allocate(station, 1_000_000 + i, "1G");
      const reuse: number[] = [];
      for (let i = 0; i < reuseCount; i++) reuse.push(await allocate(station, i, "1G"));
      const carve: number[] = [];
      for (let i = 0; i < carveCount; i++) carve.push(await allocate(station, i, "2G"));
      const concurrent: number[] = [];
      const concurrency = 8;
      const perWorker = Math.floor(reuseCount / concurrency);
      const tc = performance.now();
      await Promise.all(
        Array.from({ length: concurrency }, async (_, w) => {
          for (let j = 0; j < perWorker; j++) concurrent.push(await allocate(station, 2_000_000 + w * perWorker + j, "1G"));
        }),
      );
      const concurrentSeconds = (performance.now() - tc) / 1000;
      if (p.followerStart === "allocated" && cluster !== null) {
        // The leader snapshots once 1,000 entries are in the log and nothing waits to be appended: give it that moment (bounded).
        const c = cluster;
        await waitFor("a snapshot after the allocations", 60_000, async () => (((await etcdContents(c, false)).snapshot?.seq ?? 0) > 0 ? true : undefined), 500).catch(() => undefined);
        await startFollower();
      }
      // Through the follower (forwarded to the leader), the same sequential requests.
      const forwardedReuse: number[] = [];
      const forwardedCarve: number[] = [];
      if (follower !== null) {
        for (let i = 0; i < 20; i++) await allocate(follower, 1_000_000 + i, "1G", "-fw-warm");
        for (let i = 0; i < reuseCount; i++) forwardedReuse.push(await allocate(follower, 3_000_000 + i, "1G", "-fw"));
        for (let i = 0; i < carveCount; i++) forwardedCarve.push(await allocate(follower, 3_000_000 + i, "2G", "-fw"));
      }
      const rssAfter = rssMb(station.pid);
      const serverSide = await stationMetrics(station);
      stopWatching();

      const base = {
        mode,
        stationSide: serverSide,
        pool: { units: unitCount, volumesPerUnit, volumes: unitCount * volumesPerUnit },
        joinMs: { ...summary(joinLatencies), allVisibleMs: Math.round(allVisibleMs) },
        allocationMs: { reuse: summary(reuse), carve: summary(carve), concurrent8: { ...summary(concurrent), perSecond: Math.round(concurrent.length / concurrentSeconds) } },
      };
      const machine = () => ({ cpus: cpus().length, model: cpus()[0]?.model ?? "?", node: process.version, loadAverage1m: load1(), loadAverageAtStart1m: loadAtStart });

      if (mode === "etcd" && cluster !== null && dirs !== null && follower !== null && logWatch !== null) {
        const followerRss = rssMb(follower.pid);
        const appendedBeforeTakeover = { ...logWatch.stats };
        const contents = await etcdContents(cluster);
        const copyBuildMs = await timeCopyBuild(cluster, dirs);
        // Takeover: kill -9 of the leader; the follower must lead, answer, and have every unit back.
        const f = follower;
        const leaderStderr = station.stderr();
        await station.kill9();
        const tt = performance.now();
        await waitFor("the follower leads", 60_000, async () => ((await stationHealth(f))?.leader === true ? true : undefined), 10);
        const leadsMs = performance.now() - tt;
        await waitFor("API answers", 30_000, async () => ((await f.api("GET", "/api/v1/units?state=online")).status === 200 ? true : undefined), 10);
        const servingMs = performance.now() - tt;
        await waitFor("every unit online again", 120_000, async () => {
          const body = (await f.api("GET", "/api/v1/units?state=online")).body as { items: unknown[] };
          return body.items.length >= unitCount ? true : undefined;
        });
        const allOnlineMs = performance.now() - tt;
        const s = appendedBeforeTakeover;
        const entriesDuringTakeover = logWatch.stats.entries - s.entries;
        return {
          ...base,
          machine: machine(),
          stationRss: { loaded: rssLoaded, afterAllocations: rssAfter },
          etcd: {
            followerStart: p.followerStart,
            followerStartToReadyMs,
            followerCopyFrom,
            followerRss,
            forwarded: { reuse: summary(forwardedReuse), carve: summary(forwardedCarve) },
            takeoverMs: { leads: Math.round(leadsMs), apiServing: Math.round(servingMs), allUnitsOnline: Math.round(allOnlineMs), entriesAppended: entriesDuringTakeover },
            log: { entriesAppended: s.entries, bytesAppended: s.bytes, largestEntryBytes: s.largest, largestEntry: { seq: s.largestSeq, statements: s.largestStatements, firstSql: s.largestFirstSql }, entriesInEtcdAtEnd: contents.entries, lastSeq: contents.lastSeq, snapshotsStored: s.snapshots },
            snapshot: contents.snapshot,
            etcdDbBytes: contents.dbBytes,
            copyBuildMs,
            clusterWarnings: { leader: clusterWarnings(leaderStderr), follower: clusterWarnings(f.stderr()) },
          },
        };
      }
      if (!p.restart) return { ...base, machine: machine(), stationRss: { loaded: rssLoaded, afterAllocations: rssAfter } };

      // Restart after kill -9, on the same data and discovery port.
      await station.kill9();
      const tr = performance.now();
      station = await startStation({ dataDir, keepData: true, discovery: leaderDiscovery, env, extraArgs: p.stationArgs });
      const readyMs = performance.now() - tr;
      const restarted = station;
      await waitFor("API answers", 30_000, async () => ((await restarted.api("GET", "/api/v1/units?state=online")).status === 200 ? true : undefined), 10);
      const servingMs = performance.now() - tr;
      await waitFor("every unit online again", 120_000, async () => {
        const body = (await restarted.api("GET", "/api/v1/units?state=online")).body as { items: unknown[] };
        return body.items.length >= unitCount ? true : undefined;
      });
      const allOnlineMs = performance.now() - tr;
      return {
        ...base,
        machine: machine(),
        stationRss: { loaded: rssLoaded, afterAllocations: rssAfter, afterRestart: rssMb(station.pid) },
        restartMs: { readyLine: Math.round(readyMs), apiServing: Math.round(servingMs), allUnitsOnline: Math.round(allOnlineMs) },
      };
    } finally {
      sim.kill("SIGTERM");
      await simExited;
    }
  } catch (error) {
    // The stations' own log lines say why (a leader that stepped down, an entry refused...).
    const tail = (name: string, text: string): string => `--- ${name} stderr (last 40 lines):\n${text.split("\n").slice(-40).join("\n")}\n`;
    process.stderr.write(tail(`station ${station.pid}`, station.stderr()) + (follower === null ? "" : tail(`follower ${follower.pid}`, follower.stderr())));
    throw error;
  } finally {
    await station.close();
    await follower?.close();
    await logWatch?.close();
    await cluster?.stop();
    dirs?.remove();
    if (mode === "single") rmSync(dataDir, { recursive: true, force: true });
  }
}

function printRun(result: RunResult): void {
  process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
  const a = result.allocationMs;
  const { unitCount, volumes } = { unitCount: result.pool.units, volumes: result.pool.volumes };
  const lines = [
    "",
    `| measure (${result.mode}, ${unitCount} units, ${volumes} volumes) | p50 | p99 | max | target |`,
    "|---|---|---|---|---|",
    `| startup packet -> visible in the pool (committed) | ${result.joinMs.p50} ms | ${result.joinMs.p99} ms | ${result.joinMs.max} ms | |`,
    `| allocation, reusing a free volume (sequential, n=${a.reuse.n}) | ${a.reuse.p50} ms | ${a.reuse.p99} ms | ${a.reuse.max} ms | p99 < 20 ms |`,
    `| allocation, carving a new volume (sequential, n=${a.carve.n}) | ${a.carve.p50} ms | ${a.carve.p99} ms | ${a.carve.max} ms | p99 < 20 ms |`,
    `| allocation, 8 clients at once (n=${a.concurrent8.n}, ${a.concurrent8.perSecond}/s) | ${a.concurrent8.p50} ms | ${a.concurrent8.p99} ms | ${a.concurrent8.max} ms | |`,
  ];
  const e = result.etcd;
  if (e !== undefined) {
    lines.push(
      `| allocation through the follower, reusing (sequential, n=${e.forwarded.reuse.n}) | ${e.forwarded.reuse.p50} ms | ${e.forwarded.reuse.p99} ms | ${e.forwarded.reuse.max} ms | |`,
      `| allocation through the follower, carving (sequential, n=${e.forwarded.carve.n}) | ${e.forwarded.carve.p50} ms | ${e.forwarded.carve.p99} ms | ${e.forwarded.carve.max} ms | |`,
    );
  }
  lines.push("");
  const rss = result.stationRss;
  let text =
    `all ${unitCount} units visible ${result.joinMs.allVisibleMs} ms after the simulator started; station RSS ${rss.loaded.rssMb} MB loaded, ` +
    `${rss.afterAllocations.rssMb} MB after allocations (peak ${rss.afterAllocations.peakMb} MB), target < 300 MB; `;
  if (result.restartMs !== undefined) {
    text += `restart after kill -9: ready line ${result.restartMs.readyLine} ms, API serving ${result.restartMs.apiServing} ms (target < 3 s), all units online ${result.restartMs.allUnitsOnline} ms. `;
  }
  if (e !== undefined) {
    const mb = (b: number): string => (b / 1024 / 1024).toFixed(1);
    text +=
      `follower started ${e.followerStart === "units" ? "before the units joined" : e.followerStart === "loaded" ? "once the pool was loaded" : "after the leader's allocations"}` +
      (e.followerCopyFrom === null ? "" : ` (etcd then held the snapshot at seq ${e.followerCopyFrom.snapshotSeq} and ${e.followerCopyFrom.logEntries} log entries after it, ${mb(e.followerCopyFrom.logBytes)} MiB)`) +
      `: start -> ready line (copy built from etcd) ${e.followerStartToReadyMs} ms, RSS ${e.followerRss.rssMb} MB; a copy built in the bench process ${e.copyBuildMs} ms. ` +
      `Takeover after kill -9 of the leader: follower leads ${e.takeoverMs.leads} ms, API serving ${e.takeoverMs.apiServing} ms, all units online ${e.takeoverMs.allUnitsOnline} ms (the new leader appended ${e.takeoverMs.entriesAppended} entries meanwhile). ` +
      "Before the takeover: " +
      `etcd log: ${e.log.entriesAppended} entries appended (${mb(e.log.bytesAppended)} MiB, largest ${(e.log.largestEntryBytes / 1024).toFixed(1)} KiB: seq ${e.log.largestEntry.seq}, ${e.log.largestEntry.statements} statements), last seq ${e.log.lastSeq}, ` +
      `${e.log.entriesInEtcdAtEnd} entries left after the newest snapshot, ${e.log.snapshotsStored} snapshots stored; ` +
      (e.snapshot === null ? "no snapshot; " : `snapshot at seq ${e.snapshot.seq}: image ${mb(e.snapshot.imageBytes)} MiB, gzip'd ${mb(e.snapshot.compressedBytes)} MiB in ${e.snapshot.chunks} chunks; `) +
      `etcd db size per member ${e.etcdDbBytes.map(mb).join(" / ")} MiB; ` +
      `cluster warnings: leader ${e.clusterWarnings.leader.length}, follower ${e.clusterWarnings.follower.length}${e.clusterWarnings.follower.length + e.clusterWarnings.leader.length === 0 ? "" : " (in the JSON)"}. `;
  }
  text +=
    `Station-side allocation histogram: p50 <= ${result.stationSide.serverP50Ms} ms, p99 <= ${result.stationSide.serverP99Ms} ms (bucket bounds); ` +
    `V8 heap in use after allocations ${result.stationSide.heapMb} MB; load average ${result.machine.loadAverageAtStart1m} at start, ${result.machine.loadAverage1m} at the end, on ${result.machine.cpus} CPUs.`;
  lines.push(text, "");
  process.stdout.write(lines.join("\n"));
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const value = sorted.length % 2 === 1 ? (sorted[mid] ?? NaN) : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
  return Math.round(value * 100) / 100;
}

/** Ratios etcd/single of every latency (the median over runs of each mode). */
function printRatios(results: RunResult[]): void {
  const single = results.filter((r) => r.mode === "single");
  const etcd = results.filter((r) => r.mode === "etcd");
  if (single.length === 0 || etcd.length === 0) return;
  const rows: [string, (r: RunResult) => number][] = [
    ["startup -> visible p50", (r) => r.joinMs.p50],
    ["startup -> visible p99", (r) => r.joinMs.p99],
    ["all units visible", (r) => r.joinMs.allVisibleMs],
    ["reuse p50", (r) => r.allocationMs.reuse.p50],
    ["reuse p99", (r) => r.allocationMs.reuse.p99],
    ["carve p50", (r) => r.allocationMs.carve.p50],
    ["carve p99", (r) => r.allocationMs.carve.p99],
    ["8 clients p50", (r) => r.allocationMs.concurrent8.p50],
    ["8 clients p99", (r) => r.allocationMs.concurrent8.p99],
    ["8 clients per second (throughput)", (r) => r.allocationMs.concurrent8.perSecond],
    ["kill -9 -> API serving (restart vs takeover)", (r) => r.restartMs?.apiServing ?? r.etcd?.takeoverMs.apiServing ?? NaN],
    ["kill -9 -> all units online (restart vs takeover)", (r) => r.restartMs?.allUnitsOnline ?? r.etcd?.takeoverMs.allUnitsOnline ?? NaN],
  ];
  const lines = ["", `| measure (median of ${single.length} single / ${etcd.length} etcd runs) | single | etcd | etcd/single |`, "|---|---|---|---|"];
  for (const [name, pick] of rows) {
    const s = median(single.map(pick));
    const e = median(etcd.map(pick));
    lines.push(`| ${name} | ${s} | ${e} | ${(e / s).toFixed(2)} |`);
  }
  const fw: [string, (r: RunResult) => number, (r: RunResult) => number][] = [
    ["reuse p50", (r) => r.etcd?.forwarded.reuse.p50 ?? NaN, (r) => r.allocationMs.reuse.p50],
    ["reuse p99", (r) => r.etcd?.forwarded.reuse.p99 ?? NaN, (r) => r.allocationMs.reuse.p99],
    ["carve p50", (r) => r.etcd?.forwarded.carve.p50 ?? NaN, (r) => r.allocationMs.carve.p50],
    ["carve p99", (r) => r.etcd?.forwarded.carve.p99 ?? NaN, (r) => r.allocationMs.carve.p99],
  ];
  lines.push("", "| etcd mode: through the follower vs the leader | leader | follower | follower/leader |", "|---|---|---|---|");
  for (const [name, viaFollower, viaLeader] of fw) {
    const l = median(etcd.map(viaLeader));
    const f = median(etcd.map(viaFollower));
    lines.push(`| ${name} | ${l} | ${f} | ${(f / l).toFixed(2)} |`);
  }
  process.stdout.write(`${lines.join("\n")}\n`);
}

function parseFollowerStart(text: string): Params["followerStart"] {
  if (text === "units" || text === "loaded" || text === "allocated") return text;
  throw new Error(`--follower-start ${text}: give units (before the units join), loaded (once the pool is loaded) or allocated (after the leader's allocations, the default)`);
}

async function main(): Promise<void> {
  const { values } = parseFlags(process.argv.slice(2), {
    units: { type: "string" },
    volumes: { type: "string" },
    allocations: { type: "string" },
    carves: { type: "string" },
    "no-restart": { type: "boolean" },
    "station-args": { type: "string" },
    etcd: { type: "boolean" },
    compare: { type: "boolean" },
    runs: { type: "string" },
    "follower-start": { type: "string" },
  });
  const params: Params = {
    unitCount: Number(values.units ?? "1000"),
    volumesPerUnit: Number(values.volumes ?? "100"),
    reuseCount: Number(values.allocations ?? "500"),
    carveCount: Number(values.carves ?? "200"),
    restart: values["no-restart"] !== true,
    stationArgs: (values["station-args"] ?? "").split(" ").filter((a) => a !== ""),
    followerStart: parseFollowerStart(values["follower-start"] ?? "allocated"),
  };
  const runs = Number(values.runs ?? "1");
  if (!(Number.isInteger(runs) && runs >= 1 && runs <= 10)) throw new Error(`--runs ${values.runs}: give a whole number of runs from 1 to 10`);
  if (values.etcd === true && values.compare === true) throw new Error("--etcd and --compare: give one (--compare runs both modes)");
  const modes: ("single" | "etcd")[] = values.compare === true ? ["single", "etcd"] : values.etcd === true ? ["etcd"] : ["single"];
  if (values["no-restart"] === true && modes.length === 1 && modes[0] === "single" && runs === 1) {
    // The short form a test uses: latencies only.
    const result = await runOnce("single", params);
    process.stdout.write(`${JSON.stringify({ reuse: result.allocationMs.reuse, carve: result.allocationMs.carve, concurrent: result.allocationMs.concurrent8 })}\n`);
    return;
  }
  const results: RunResult[] = [];
  for (let i = 0; i < runs; i++) {
    // Alternate which mode goes first, so neither always runs on the warmer (or busier) machine.
    const order = i % 2 === 0 ? modes : [...modes].reverse();
    for (const mode of order) {
      process.stderr.write(`station bench: run ${i + 1}/${runs}, ${mode} mode, load average ${load1()}\n`);
      const result = await runOnce(mode, params);
      results.push(result);
      printRun(result);
    }
  }
  printRatios(results);
}

main().then(
  () => process.exit(0),
  (error: unknown) => {
    process.stderr.write(`station bench: ${(error as Error).stack ?? String(error)}\n`);
    process.exit(1);
  },
);
