// Issue 9 item 14: /api/v1/health said "ok" with a unit down, and an assignment
// on a down unit read "active" and nothing else. Now health is "degraded" with
// reasons, and every live assignment says whether it can be served now.

import assert from "node:assert/strict";
import { test } from "node:test";
import { waitFor } from "../testing/process.ts";
import { startStation } from "./harness.ts";
import { startJoinedUnit } from "./pool_harness.ts";

const TIMERS = { IPSAN_DISCOVERY_HEARTBEAT_MS: "100", IPSAN_DISCOVERY_SUSPECT_MS: "400", IPSAN_DISCOVERY_OFFLINE_MS: "1000" };

interface Health {
  status: string;
  reasons: string[];
  reasonsTotal: number;
}

test("health turns degraded with reasons when a unit holding an assignment dies, and the assignment says it is not served", { timeout: 60_000 }, async () => {
  const station = await startStation({ env: TIMERS });
  try {
    const u1 = await startJoinedUnit(station, { name: "u1", capacity: "256M", env: TIMERS });
    const u2 = await startJoinedUnit(station, { name: "u2", capacity: "256M", env: TIMERS });
    try {
      const health = async (): Promise<Health> => (await station.api("GET", "/api/v1/health")).body as Health;
      assert.deepEqual(await health().then((h) => [h.status, h.reasons, h.reasonsTotal]), ["ok", [], 0]);
      assert.equal((await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.5" })).status, 201);
      assert.equal((await station.api("POST", "/api/v1/volumes", { unit: "u2", name: "v1", sizeBytes: 16 * 1024 * 1024 })).status, 201);
      const assigned = await station.api("POST", "/api/v1/assignments", { host: "h1", unit: "u2", volume: "v1" });
      const id = (assigned.body as { id: string }).id;
      assert.deepEqual([(assigned.body as { serving: string }).serving, (assigned.body as { servingReasons: string[] }).servingReasons], ["ok", []]);

      await u2.kill9();
      const degraded = await waitFor("health degraded", async () => {
        const h = await health();
        return h.status === "degraded" && h.reasons.some((r) => r.startsWith(`assignment ${id}`)) ? h : undefined;
      }, { timeoutMs: 10_000, intervalMs: 100 });
      assert.ok(degraded.reasons.some((r) => /^unit u2 is (suspect|offline|down)$/.test(r)), JSON.stringify(degraded.reasons));
      assert.ok(degraded.reasons.some((r) => new RegExp(`^assignment ${id} \\(host h1\\) is not served: unit u2 is (suspect|offline|down)$`).test(r)), JSON.stringify(degraded.reasons));
      assert.equal(degraded.reasonsTotal, degraded.reasons.length);
      const view = (await station.api("GET", `/api/v1/assignments/${id}`)).body as { state: string; serving: string; servingReasons: string[] };
      assert.equal(view.state, "active", "the assignment itself is still recorded as active");
      assert.equal(view.serving, "down");
      assert.match(view.servingReasons[0] ?? "", /^unit u2 is (suspect|offline|down)$/);
    } finally {
      await u1.close();
      await u2.close();
    }
  } finally {
    await station.close();
  }
});
