// A unit's storage report that was taken before a change the station made
// through the unit's control API, but applied after the station stored that
// change (a UDP report in flight, a DNS lookup, a slow /v1/info read), must
// not put the station's view back: reports carry the unit's volume-table
// generation and the station drops one older than a generation it has seen
// (a control answer's Ipsan-Table-Generation header, or an earlier report).
//
// Real station core on real SQLite, a real `ipsan unit` process; the stale
// report is a real /v1/info answer read before the change.

import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { controlTokenFor } from "../discovery/keys.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";
import { ManualClock } from "../util/clock.ts";
import { setLogLevel } from "../util/log.ts";
import { openDatabase } from "./db.ts";
import { StationMetrics } from "./metrics.ts";
import { Station } from "./station.ts";
import { StationStore } from "./store.ts";
import { UnitClient } from "./unit_client.ts";

const MIB = 1024 * 1024;
const CLUSTER_KEY = Buffer.alloc(32, 9);

test("a report taken before a partition change and applied after it does not undo it; a newer one still applies", async () => {
  if (process.env["IPSAN_LOG"] === undefined) setLogLevel("error");
  const storeDir = makeTempDir("report-order", memoryTmpBase());
  const unitDir = makeTempDir("report-order-unit", memoryTmpBase());
  writeFileSync(join(unitDir.path, "control.token"), `${controlTokenFor(CLUSTER_KEY, "u1")}\n`, { mode: 0o600 });
  const unit = await startUnit({ name: "u1", capacity: "64M", control: true, dataDir: unitDir.path });
  const store = new StationStore(openDatabase(join(storeDir.path, "station.db")), new ManualClock());
  const station = new Station(store, new StationMetrics(), { clusterKey: CLUSTER_KEY, pendingDeadlineMs: 30_000, reconcileIntervalMs: 10_000, hostOfflineAfterMs: 30_000, unitCallTimeoutMs: 2_000 });
  try {
    const control = { host: "127.0.0.1", port: Number(new URL(unit.controlUrl ?? "").port) };
    const reader = new UnitClient({ unit: "u1", control, token: controlTokenFor(CLUSTER_KEY, "u1") });
    const read = async () => ({ ...(await reader.info()), control });
    await station.applyStorageInfo(await read(), "127.0.0.1", "online", true);
    await station.createVolume("u1", "vol", 8 * MIB);

    const stale = await read(); // the unit's truth before the partition change
    assert.equal(stale.volumes.find((v) => v.name === "vol")?.partitions.length, 0);
    assert.equal(typeof stale.tableGeneration, "number", "a unit's info carries its table generation");
    await station.partitionVolume("u1", "vol", [4 * MIB, 4 * MIB]);
    assert.equal(store.volume("u1", "vol")?.partitions.length, 2);

    await station.applyStorageInfo(stale, "127.0.0.1", "online", true); // arrives late
    assert.equal(store.volume("u1", "vol")?.partitions.length, 2, "the stale report was dropped");
    // Queued (not immediate) and flushed on the next turn: dropped too.
    await station.applyStorageInfo(stale, "127.0.0.1", "online");
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(store.volume("u1", "vol")?.partitions.length, 2, "the stale queued report was dropped");

    // A change made behind the station's back shows up with the unit's next (newer) report.
    const behind = await fetch(`${unit.controlUrl}/v1/volumes/vol/partitions`, {
      method: "PUT",
      headers: { authorization: `Bearer ${controlTokenFor(CLUSTER_KEY, "u1")}`, "content-type": "application/json" },
      body: JSON.stringify({ sizesBytes: [] }),
    });
    assert.equal(behind.status, 200, await behind.text());
    const fresh = await read();
    assert.ok((fresh.tableGeneration ?? 0) > (stale.tableGeneration ?? 0));
    await station.applyStorageInfo(fresh, "127.0.0.1", "online", true);
    assert.equal(store.volume("u1", "vol")?.partitions.length, 0, "a newer report applies");

    // A unit that restarts on other storage starts its generations anew: its startup resets what the station saw.
    station.unitStarted("u1");
    await station.applyStorageInfo({ ...fresh, tableGeneration: 1, volumes: [] }, "127.0.0.1", "online", true);
    assert.equal(store.volume("u1", "vol"), undefined, "after a startup, a lower generation applies");
  } finally {
    await station.stop();
    await unit.stop();
    storeDir.remove();
    unitDir.remove();
  }
});
