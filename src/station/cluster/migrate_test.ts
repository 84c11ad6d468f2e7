// `ipsan station migrate` (issue 11): a single station's pool moves into etcd
// and back, identical. A real station with a real unit allocates, registers
// hosts and creates a token; it stops; its state goes into an empty
// single-member etcd; a station started on that etcd (a new data directory)
// answers the same pool; it makes one more change; it stops; the state goes
// back into a new data directory and a single station started there answers
// that pool, the change included. A second migration into the same etcd, and
// a migration back over an existing database without --force, are refused
// and change nothing.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { startEtcdCluster, type EtcdCluster } from "../../testing/etcd.ts";
import { startEtcdStation, stationHealth, until } from "../../testing/stations.ts";
import { run } from "../../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../../testing/tmp.ts";
import { IPSAN_BIN, type RunningUnit } from "../../testing/unit.ts";
import { startStation, type RunningStation } from "../harness.ts";
import { startJoinedUnit } from "../pool_harness.ts";

let etcd: EtcdCluster;
let dirs: TempDir;
let unit: RunningUnit | undefined;

before(async () => {
  etcd = await startEtcdCluster({ members: 1, prefix: "migrate" });
  dirs = makeTempDir("migrate", memoryTmpBase());
});
after(async () => {
  await unit?.close();
  await etcd?.stop();
  dirs?.remove();
});

/** The pool as the API answers it, without what changes by itself (liveness, times), each list sorted (a listing's order is not kept across restarts). */
async function pool(station: RunningStation): Promise<unknown> {
  const sorted = (rows: unknown[][]): unknown[][] => rows.sort((a, b) => JSON.stringify(a).localeCompare(JSON.stringify(b)));
  const items = async (path: string): Promise<Record<string, unknown>[]> => {
    const response = await station.api("GET", path);
    assert.equal(response.status, 200, `${path}: ${response.text}`);
    return (response.body as { items: Record<string, unknown>[] }).items;
  };
  return {
    assignments: sorted((await items("/api/v1/assignments?all=true")).map((a) => [a["id"], a["requestId"], a["host"], a["unit"], a["volume"], a["sizeBytes"], a["state"]])),
    volumes: sorted((await items("/api/v1/volumes")).map((v) => [v["unit"], v["name"], v["sizeBytes"]])),
    hosts: sorted((await items("/api/v1/hosts")).map((h) => [h["name"], h["address"], h["spare"]])),
    units: sorted((await items("/api/v1/units")).map((u) => [u["name"], u["capacityBytes"]])),
    tokens: sorted((await items("/api/v1/tokens")).map((t) => [t["name"], t["role"]])),
  };
}

async function migrate(...args: string[]): Promise<{ code: number | null; out: string }> {
  const result = await run(process.execPath, [IPSAN_BIN, "station", "migrate", ...args], { timeoutMs: 30_000, unsetEnv: (name) => name.startsWith("ETCD") });
  return { code: result.code, out: result.stdout + result.stderr };
}

test("a single station's pool into etcd and back, identical; refusals change nothing", async () => {
  const single = await startStation({ dataDir: dirs.file("single"), keepData: true });
  unit = await startJoinedUnit(single, { name: "mu", capacity: "256M" });
  let before: unknown;
  try {
    for (const [i, address] of ["127.0.0.2", "127.0.0.3"].entries()) {
      const response = await single.api("POST", "/api/v1/allocations", { requestId: `m-${i}`, host: `mh${i}`, sizeBytes: "8M", address });
      assert.equal(response.status, 201, response.text);
    }
    assert.equal((await single.api("POST", "/api/v1/tokens", { name: "ops", role: "operator" })).status, 201);
    before = await pool(single);
  } finally {
    await single.stop();
  }

  const into = await migrate("--from-sqlite", dirs.file("single"), "--etcd", etcd.endpointsFlag);
  assert.equal(into.code, 0, into.out);
  assert.match(into.out, /migrated .* \(1 units, 2 volumes, 2 hosts, 2 assignments, 1 tokens, \d+ events\); verified table by table/);
  const again = await migrate("--from-sqlite", dirs.file("single"), "--etcd", etcd.endpointsFlag);
  assert.equal(again.code, 1, again.out);
  assert.match(again.out, /already holds ipsan state.*nothing was changed/);

  const clustered = await startEtcdStation(dirs, "clustered", etcd);
  let during: unknown;
  try {
    await until("the station on etcd leads", async () => (await stationHealth(clustered))?.leader === true, 15_000);
    assert.equal(clustered.token(), single.token(), "the cluster's admin token is the single station's");
    assert.deepEqual(await pool(clustered), before, "the station on etcd answers the same pool");
    const response = await clustered.api("PUT", "/api/v1/hosts/after-move", { address: "127.0.0.9" });
    assert.equal(response.status, 201, response.text);
    during = await pool(clustered);
  } finally {
    await clustered.stop();
  }

  const existing = await migrate("--from-etcd", etcd.endpointsFlag, "--to-sqlite", dirs.file("single"));
  assert.equal(existing.code, 1, existing.out);
  assert.match(existing.out, /exists; nothing was changed \(--force replaces it\)/);
  const back = await migrate("--from-etcd", etcd.endpointsFlag, "--to-sqlite", dirs.file("back"));
  assert.equal(back.code, 0, back.out);
  const restored = await startStation({ dataDir: dirs.file("back"), keepData: true });
  try {
    assert.deepEqual(await pool(restored), during, "the single station started on the copy answers the pool, the change made on etcd included");
  } finally {
    await restored.stop();
  }
});
