// Listener-level benchmark of the auto-configuration protocol (issue 3,
// section 7, "time from startup packet to visible in the pool"): a
// DiscoveryListener in this process, simulated units (sim_units.js) in a child
// process so they do not share a CPU core's event loop with the listener.
// Latency per unit = when the listener emitted unit_storage_info for it minus
// when the simulator started its agent (both preciseNowMs(), same machine).
//
//   node dist/discovery/bench.js [--units 1000] [--volumes 100] [--spread-ms 0] [--enrol]
// --enrol: units enrol first (issue 7): the listener keeps identities in a
// station database (SQLite, durable writes) in a temp dir on disk.
//
// Prints one JSON object: p50/p99/max latency, time until all are visible,
// datagrams, rejects, retransmissions and the listener's RSS.

import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { parseFlags } from "../util/flags.ts";
import { setLogLevel } from "../util/log.ts";
import { loadOrCreateClusterKey } from "./keys.ts";
import { preciseNowMs } from "./sim_units.ts";
import { DiscoveryListener } from "./station_listener.ts";
import { UnitIdentities } from "./identities.ts";
import { openDatabase } from "../station/db.ts";
import { identityPersistence } from "../station/unit_identities.ts";

function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))] ?? NaN;
}

async function main(): Promise<void> {
  const { values } = parseFlags(process.argv.slice(2), {
    units: { type: "string" },
    volumes: { type: "string" },
    "spread-ms": { type: "string" },
    "timeout-ms": { type: "string" },
    enrol: { type: "boolean" },
  });
  const units = Number(values.units ?? "1000");
  const volumes = Number(values.volumes ?? "100");
  const timeoutMs = Number(values["timeout-ms"] ?? "120000");
  setLogLevel("error");
  const dir = mkdtempSync(join(tmpdir(), "ipsan-discovery-bench-"));
  const keyFile = join(dir, "cluster.key");
  const key = await loadOrCreateClusterKey(keyFile);
  const enrol = values.enrol === true;
  const db = enrol ? openDatabase(join(dir, "station.db")) : undefined;
  const identities = db === undefined ? undefined : new UnitIdentities({ persistence: identityPersistence(db) });
  const listener = new DiscoveryListener({ clusterKey: key, ...(identities === undefined ? {} : { identities }) });
  const station = await listener.listen({ host: "127.0.0.1", port: 0 });
  const visibleAtMs = new Map<string, number>();
  const volumesSeen = new Map<string, number>();
  listener.subscribe((event) => {
    if (event.kind !== "unit_storage_info" || visibleAtMs.has(event.unit)) return;
    visibleAtMs.set(event.unit, preciseNowMs());
    volumesSeen.set(event.unit, event.info.volumes.length);
  });
  const startTimesFile = join(dir, "start-times.json");
  const simScript = join(dirname(fileURLToPath(import.meta.url)), "sim_units.js");
  const child = spawn(
    process.execPath,
    [simScript, "--station", `${station.host}:${station.port}`, "--cluster-key-file", keyFile, "--units", String(units),
      "--volumes", String(volumes), "--spread-ms", values["spread-ms"] ?? "0", "--start-times", startTimesFile, ...(enrol ? ["--enrol"] : [])],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, IPSAN_LOG: "error" } },
  );
  const t0 = preciseNowMs();
  const deadline = Date.now() + timeoutMs;
  while (visibleAtMs.size < units && Date.now() < deadline && child.exitCode === null) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const allVisibleMs = preciseNowMs() - t0;
  // The start-times file is written once every agent has started.
  let startTimes: Record<string, number> = {};
  for (let i = 0; i < 200 && Object.keys(startTimes).length === 0; i++) {
    try {
      startTimes = JSON.parse(readFileSync(startTimesFile, "utf8")) as Record<string, number>;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  // Steady state: heartbeats for 3 s.
  const before = listener.stats();
  await new Promise((resolve) => setTimeout(resolve, 3000));
  const after = listener.stats();
  const latencies = [...visibleAtMs].flatMap(([unit, at]) => {
    const start = startTimes[unit];
    return start === undefined ? [] : [at - start];
  }).sort((a, b) => a - b);
  const stopStart = preciseNowMs();
  child.kill("SIGTERM");
  await new Promise((resolve) => child.once("exit", resolve));
  const stopMs = preciseNowMs() - stopStart;
  const stats = listener.stats();
  const result = {
    units,
    enrol,
    enrolled: identities?.list().filter((i) => i.confirmed).length ?? 0,
    volumesPerUnit: volumes,
    visible: visibleAtMs.size,
    volumesVisible: [...volumesSeen.values()].reduce((a, b) => a + b, 0),
    allVisibleMs: Math.round(allVisibleMs),
    latencyMs: {
      p50: Number(percentile(latencies, 50).toFixed(2)),
      p99: Number(percentile(latencies, 99).toFixed(2)),
      max: Number(percentile(latencies, 100).toFixed(2)),
    },
    heartbeatsPerSecond: Math.round((after.accepted.HEARTBEAT - before.accepted.HEARTBEAT) / 3),
    downAfterStop: stats.units.down,
    stopAllMs: Math.round(stopMs),
    datagramsReceived: stats.datagramsReceived,
    datagramsSent: stats.datagramsSent,
    retransmissionsByStation: stats.retransmissions,
    rejected: Object.fromEntries(Object.entries(stats.rejected).filter(([, n]) => n > 0)),
    listenerRssMB: Math.round(process.memoryUsage().rss / 1024 / 1024),
  };
  process.stdout.write(`${JSON.stringify(result)}\n`);
  await listener.close();
  db?.close();
  rmSync(dir, { recursive: true, force: true });
}

await main();
