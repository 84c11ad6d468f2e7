// What this proves: the benchmark's simulated units speak the real protocol
// over real loopback UDP: 200 units with 20 volumes each, sharing sockets,
// all become visible at a real DiscoveryListener with exactly their volumes,
// and a clean stop marks every one of them down (SHUTDOWN acknowledged).

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { DiscoveryListener } from "./station_listener.ts";
import { SimulatedUnits } from "./sim_units.ts";
import { waitFor } from "../testing/process.ts";

test("200 simulated units x 20 volumes join a real listener and leave cleanly", async () => {
  const key = randomBytes(32);
  const listener = new DiscoveryListener({ clusterKey: key, timers: { heartbeatIntervalMs: 500, suspectAfterMs: 1500, offlineAfterMs: 5000 } });
  const station = await listener.listen({ host: "127.0.0.1", port: 0 });
  const volumes = new Map<string, number>();
  listener.subscribe((e) => {
    if (e.kind === "unit_storage_info") volumes.set(e.unit, e.info.volumes.length);
  });
  const sim = new SimulatedUnits({ station, clusterKey: key, units: 200, volumesPerUnit: 20 });
  try {
    const t0 = Date.now();
    await sim.start();
    await waitFor("all visible", () => (volumes.size === 200 ? true : undefined), { timeoutMs: 10_000, intervalMs: 10 });
    console.log(`200 units visible after ${Date.now() - t0} ms`);
    assert.ok([...volumes.values()].every((n) => n === 20));
    await sim.stop("shutdown");
    assert.equal(listener.stats().units.down, 200);
  } finally {
    await sim.stop("crash");
    await listener.close();
  }
});
