// Proves, with a real station and a real joined `ipsan unit`, that automatic
// allocation never hands one host's data to the next, and that the admin's
// manual path keeps data. Hosts are told apart by source address on loopback
// (the raw NBD probe of src/e2e/nbd_probe.ts binds 127.0.0.2, .3, .4, .5).
//   1. Host A gets a carved volume by allocation and fills it with a
//      recognisable pattern; its assignment is released (A's connection stays
//      open). Host B's allocation of the same size reuses that very volume
//      (same unit, same name) and reads all zeroes; A's old connection can
//      no longer read.
//   2. B writes a pattern and is released: release keeps the bytes, and the
//      admin's manual assign of the volume to host C shows C the same bytes.
//   3. A station killed after recording a reuse (pending, wipe) and after
//      granting the host, but before recording it active: the assignment row
//      is written with the real sqlite3 CLI and the grant put on the unit,
//      then the station restarts. Reconcile finishes it: the grant is taken
//      off, the volume wiped, granted again; host D reads all zeroes.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { openExport, type RawNbdClient } from "../e2e/nbd_probe.ts";
import { controlOk } from "../testing/control.ts";
import { runOk, waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, startJoinedUnit, unitVolume, type Assignment } from "./pool_harness.ts";

const MIB = 1024 * 1024;
const VOLUME_BYTES = 8 * MIB;
const CHUNK_BYTES = MIB;
const HOST_A = "127.0.0.2";
const HOST_B = "127.0.0.3";
const HOST_C = "127.0.0.4";
const HOST_D = "127.0.0.5";
const STATION_ARGS = ["--reconcile-interval-ms", "300", "--pending-deadline-ms", "30000"];

let station: RunningStation;
let unit: RunningUnit;
let dataDir = "";

before(async () => {
  station = await startStation({ keepData: true, extraArgs: STATION_ARGS });
  dataDir = station.dataDir;
  unit = await startJoinedUnit(station, { name: "w1", capacity: "128M" });
});
after(async () => {
  await unit?.close();
  await station?.close();
  if (dataDir !== "") rmSync(dataDir, { recursive: true, force: true });
});

function pattern(text: string): Buffer {
  const chunk = Buffer.alloc(CHUNK_BYTES);
  const source = Buffer.from(text);
  for (let i = 0; i < chunk.length; i += source.length) source.copy(chunk, i);
  return chunk;
}

async function open(a: Assignment, localAddress: string): Promise<RawNbdClient> {
  const result = await openExport({ host: a.nbdHost, port: a.nbdPort, localAddress, exportName: a.export });
  assert.equal(result.kind, "open", `host ${localAddress} opens ${a.export}: ${JSON.stringify(result.kind === "refused" ? result : result.kind)}`);
  if (result.kind !== "open") throw new Error("unreachable");
  assert.equal(result.sizeBytes, VOLUME_BYTES);
  return result.client;
}

async function fill(a: Assignment, localAddress: string, text: string): Promise<void> {
  const client = await open(a, localAddress);
  try {
    for (let offset = 0; offset < VOLUME_BYTES; offset += CHUNK_BYTES) await client.write(offset, pattern(text));
    await client.flush();
  } finally {
    client.close();
  }
}

/** Offsets of the chunks that differ from `expected` (reading the whole volume). */
async function chunksNotEqual(a: Assignment, localAddress: string, expected: Buffer): Promise<number[]> {
  const client = await open(a, localAddress);
  const differing: number[] = [];
  try {
    for (let offset = 0; offset < VOLUME_BYTES; offset += CHUNK_BYTES) {
      if (!(await client.read(offset, CHUNK_BYTES)).equals(expected)) differing.push(offset);
    }
  } finally {
    client.close();
  }
  return differing;
}

async function allocate(requestId: string, host: string, address: string): Promise<Assignment> {
  const response = await station.api("POST", "/api/v1/allocations", { requestId, host, sizeBytes: VOLUME_BYTES, address });
  assert.equal(response.status, 201, response.text);
  return response.body as Assignment;
}

const ZEROES = Buffer.alloc(CHUNK_BYTES);
let reused: Assignment;

test("a volume reused by automatic allocation reads all zeroes for the next host", async () => {
  const first = await allocate("wipe-a", "hostA", HOST_A);
  assert.equal(first.unit, "w1");
  await fill(first, HOST_A, "hostA-secret-");
  assert.deepEqual(await chunksNotEqual(first, HOST_A, pattern("hostA-secret-")), [], "host A reads back what it wrote");
  const lingering = await open(first, HOST_A);
  try {
    const released = await station.api("DELETE", `/api/v1/assignments/${first.id}`);
    assert.equal(released.status, 204, released.text);

    reused = await allocate("wipe-b", "hostB", HOST_B);
    assert.equal(reused.unit, first.unit, "the same unit");
    assert.equal(reused.volume, first.volume, "the same volume: reused, not carved");
    assert.deepEqual(reused.extents, first.extents, "the same storage");
    assert.deepEqual((await unitVolume(unit, reused.volume)).grants, [HOST_B]);
    assert.deepEqual(await chunksNotEqual(reused, HOST_B, ZEROES), [], "host B reads zeroes where host A wrote");
    await assert.rejects(lingering.read(0, 512), "host A's old connection cannot read any more");
  } finally {
    lingering.close();
  }
  assert.match(station.stderr(), /volume wiped before reuse/);
  assert.deepEqual(await grantsMatch(station, [unit]), []);
});

test("release keeps the data, and the admin's manual assign hands it over as it is", async () => {
  await fill(reused, HOST_B, "hostB-data-");
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${reused.id}`)).status, 204);
  const host = await station.api("PUT", "/api/v1/hosts/hostC", { address: HOST_C });
  assert.equal(host.status, 201, host.text);
  const assigned = await station.api("POST", "/api/v1/assignments", { host: "hostC", unit: reused.unit, volume: reused.volume });
  assert.equal(assigned.status, 201, assigned.text);
  const manual = assigned.body as Assignment;
  assert.equal(manual.volume, reused.volume);
  assert.deepEqual(await chunksNotEqual(manual, HOST_C, pattern("hostB-data-")), [], "host C sees host B's data: the manual path does not wipe");
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${manual.id}`)).status, 204);
});

test("a station killed after granting a reused volume but before recording it wipes it on restart, before the host reads", async () => {
  const host = await station.api("PUT", "/api/v1/hosts/hostD", { address: HOST_D });
  assert.equal(host.status, 201, host.text);
  await station.kill9();
  // What the killed station had done: the pending assignment with its wipe flag
  // is in the database, and the unit already grants host D (a station that
  // crashed after the grant of an earlier finish attempt).
  const nowMs = Date.now();
  await runOk(
    "sqlite3",
    [
      `${dataDir}/station.db`,
      `INSERT INTO assignments (id, request_id, host, host_address, unit, volume, partition, size_bytes, state, carved, wipe, error, detail, created_at, updated_at)
       VALUES ('a-crashwipe', NULL, 'hostD', '${HOST_D}', '${reused.unit}', '${reused.volume}', NULL, ${VOLUME_BYTES}, 'pending', 0, 1, NULL, NULL, ${nowMs}, ${nowMs})`,
    ],
    { timeoutMs: 10_000 },
  );
  await controlOk(unit, "PUT", `/v1/volumes/${reused.volume}/grants`, { hosts: [HOST_D] });
  station = await startStation({ dataDir, keepData: true, discovery: `${station.discovery.host}:${station.discovery.port}`, extraArgs: STATION_ARGS });
  const active = await waitFor(
    "the pending reuse finished by reconcile",
    async () => {
      const response = await station.api("GET", "/api/v1/assignments/a-crashwipe");
      const a = response.body as Assignment;
      return response.status === 200 && a.state === "active" ? a : undefined;
    },
    { timeoutMs: 15_000 },
  );
  assert.deepEqual((await unitVolume(unit, reused.volume)).grants, [HOST_D]);
  assert.deepEqual(await chunksNotEqual(active, HOST_D, ZEROES), [], "host D reads zeroes, not host B's data");
  assert.match(station.stderr(), /still has grants; revoking them first/);
  assert.deepEqual(await grantsMatch(station, [unit]), []);
});
