// Proves allocation end to end with real processes: a station and two
// `ipsan unit`s joined over the discovery protocol. The station's answer, the
// unit's own view (GET /v1/volumes/NAME on its control API) and
// GET /api/v1/assignments agree on unit, volume, size, LBA extents and the
// granted host address. Hosts are told apart by their source address on
// loopback: host A is 127.0.0.2, host B 127.0.0.3. libnbd cannot bind a source
// address, so access is checked with the small raw NBD client of
// src/e2e/nbd_probe.ts (fixed newstyle + NBD_OPT_GO from a chosen localAddress),
// plus nbdinfo from 127.0.0.1 (granted to nobody) for a real client's refusal.
// Also: a retried requestId gets the same assignment, the same id with other
// parameters 409; the unit's DNS name is resolved and handed to the host, a
// host's DNS name is resolved to its address; a dry run answers the placement
// and changes nothing (not the station, not the units); no fit answers 507
// with one reason per unit; a
// free volume is reused before carving; a host's new address moves its grant;
// unassign revokes the grant; the admin's manual path assigns a partition and
// keeps a volume to one host; an unassign while the unit is away answers 202
// and the grant is removed when the unit is back; a unit killed with -9 makes
// the allocation fail with 503 and leaves no live assignment behind.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { openExport } from "../e2e/nbd_probe.ts";
import { run, waitFor } from "../testing/process.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, liveAssignments, startJoinedUnit, unitVolume, unitVolumes, type Assignment } from "./pool_harness.ts";

const MIB = 1024 * 1024;
const HOST_A = "127.0.0.2";
const HOST_B = "127.0.0.3";

let station: RunningStation;
let small: RunningUnit;
let large: RunningUnit;
/** Handles of units that were restarted (closed after the others). */
const restarted: RunningUnit[] = [];

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "500", "--pending-deadline-ms", "5000"] });
  [small, large] = await Promise.all([
    startJoinedUnit(station, { name: "small", capacity: "256M", volumes: [{ name: "spare", size: "32M" }], extraArgs: ["--dns-name", "localhost"] }),
    startJoinedUnit(station, { name: "large", capacity: "512M" }),
  ]);
});
after(async () => {
  await Promise.all([small?.close(), large?.close()]);
  for (const unit of restarted) await unit.close();
  await station?.close();
});

async function allocate(body: Record<string, unknown>): Promise<{ status: number; assignment: Assignment; text: string; body: unknown }> {
  const response = await station.api("POST", "/api/v1/allocations", body);
  return { status: response.status, assignment: response.body as Assignment, text: response.text, body: response.body };
}

async function probe(assignment: Assignment, localAddress: string): Promise<string> {
  const result = await openExport({ host: assignment.nbdHost, port: assignment.nbdPort, localAddress, exportName: assignment.export });
  if (result.kind === "open") {
    result.client.close();
    return `open ${result.sizeBytes}`;
  }
  return result.kind;
}

test("dry run answers the placement and changes nothing", async () => {
  const before = { assignments: await liveAssignments(station, "?all=true"), small: await unitVolumes(small), large: await unitVolumes(large) };
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "dry-1", host: "hostA", sizeBytes: "100M", address: HOST_A, dryRun: true });
  assert.equal(dry.status, 200, dry.text);
  assert.deepEqual((dry.body as { placement: unknown }).placement, { kind: "carve", unit: "small", sizeBytes: 100 * MIB }, "best fit: the unit with less free space");
  assert.deepEqual(await liveAssignments(station, "?all=true"), before.assignments);
  assert.deepEqual(await unitVolumes(small), before.small);
  assert.deepEqual(await unitVolumes(large), before.large);
  assert.equal((await station.api("GET", "/api/v1/hosts/hostA")).status, 404, "a dry run registers no host");
});

let first: Assignment;

test("allocation: the station's answer, the unit and the assignment list agree", async () => {
  const answer = await allocate({ requestId: "req-a1", host: "hostA", sizeBytes: "100M", address: HOST_A });
  assert.equal(answer.status, 201, answer.text);
  first = answer.assignment;
  assert.equal(first.state, "active");
  assert.equal(first.unit, "small");
  assert.equal(first.sizeBytes, 100 * MIB);
  assert.equal(first.hostAddress, HOST_A);
  assert.equal(first.uri, `nbd://${first.nbdHost}:${first.nbdPort}/${first.export}`);
  assert.equal((first as Assignment & { unitDnsName: string }).unitDnsName, "localhost", "the host is told the unit's DNS name");
  const unitInfo = (await station.api("GET", "/api/v1/units/small")).body as { dnsName: string; addresses: string[] };
  assert.ok(unitInfo.addresses.includes("127.0.0.1"), `the station resolved the unit's name: ${unitInfo.addresses.join(",")}`);
  const onUnit = await unitVolume(small, first.volume);
  assert.deepEqual(onUnit.grants, [HOST_A]);
  assert.equal(onUnit.sizeBytes, first.sizeBytes);
  assert.deepEqual(onUnit.extents, first.extents);
  assert.equal(first.startLba, onUnit.extents[0]?.startLba);
  assert.equal(first.endLba, onUnit.extents.at(-1)?.endLba);
  assert.equal(first.lengthLba, first.sizeBytes / 512);
  const listed = (await liveAssignments(station)).find((a) => a.id === first.id);
  assert.deepEqual(listed, first);
  const volume = await station.api("GET", `/api/v1/volumes/small/${first.volume}`);
  assert.equal((volume.body as { assignedTo: string }).assignedTo, "hostA");
  assert.deepEqual(await grantsMatch(station, [small, large]), []);
});

test("a retried requestId gets the same assignment; other parameters with it are refused", async () => {
  const again = await allocate({ requestId: "req-a1", host: "hostA", sizeBytes: "100M", address: HOST_A });
  assert.equal(again.status, 200, again.text);
  assert.equal(again.assignment.id, first.id);
  assert.equal(again.assignment.volume, first.volume);
  const other = await allocate({ requestId: "req-a1", host: "hostA", sizeBytes: "200M" });
  assert.equal(other.status, 409, other.text);
  assert.equal(errorOf(other.body).field, "requestId");
  const all = await liveAssignments(station, "?all=true");
  assert.equal(all.filter((a) => a.requestId === "req-a1").length, 1, "no second assignment");
});

let second: Assignment;

test("a free volume is reused before carving; each host reaches only its own volume", async () => {
  const answer = await allocate({ requestId: "req-b1", host: "hostB", sizeBytes: "20M", address: HOST_B });
  assert.equal(answer.status, 201, answer.text);
  second = answer.assignment;
  assert.equal(second.volume, "spare", "the smallest free volume that fits");
  assert.equal(second.sizeBytes, 32 * MIB);
  assert.deepEqual((await unitVolume(small, "spare")).grants, [HOST_B]);

  assert.equal(await probe(first, HOST_A), `open ${first.sizeBytes}`);
  assert.equal(await probe(second, HOST_B), `open ${second.sizeBytes}`);
  assert.notEqual(await probe(first, HOST_B), `open ${first.sizeBytes}`, "host B is refused on host A's volume");
  assert.notEqual(await probe(second, HOST_A), `open ${second.sizeBytes}`, "host A is refused on host B's volume");
  const nbdinfo = await run("nbdinfo", ["--size", first.uri], { timeoutMs: 20_000 });
  assert.notEqual(nbdinfo.code, 0, "nbdinfo from 127.0.0.1 (not granted) is refused");
  assert.deepEqual(await grantsMatch(station, [small, large]), []);
});

test("listings come in pages", async () => {
  const all = (await station.api("GET", "/api/v1/volumes")).body as { items: unknown[]; total: number; nextOffset: number | null };
  assert.ok(all.total >= 2);
  assert.equal(all.items.length, all.total);
  assert.equal(all.nextOffset, null);
  const first = (await station.api("GET", "/api/v1/volumes?limit=1")).body as { items: { id: string }[]; total: number; nextOffset: number };
  assert.equal(first.items.length, 1);
  assert.equal(first.nextOffset, 1);
  const second = (await station.api("GET", `/api/v1/volumes?limit=1&offset=${first.nextOffset}`)).body as { items: { id: string }[] };
  assert.notEqual(second.items[0]?.id, first.items[0]?.id);
  const past = (await station.api("GET", `/api/v1/assignments?offset=1000`)).body as { items: unknown[]; nextOffset: null };
  assert.deepEqual(past.items, []);
  const tooMany = await station.api("GET", "/api/v1/volumes?limit=100001");
  assert.equal(tooMany.status, 400);
  assert.equal(errorOf(tooMany.body).field, "limit");
});

test("no fit: 507 with a reason for every unit", async () => {
  const answer = await allocate({ requestId: "req-huge", host: "hostA", sizeBytes: "10G" });
  assert.equal(answer.status, 507, answer.text);
  const reasons = errorOf(answer.body).reasons ?? [];
  assert.deepEqual(reasons.map((r) => r.unit), ["large", "small"]);
  for (const r of reasons) assert.match(r.reason, /^not enough free space: need 10G, free [0-9.]+M/);
  assert.equal((await liveAssignments(station, "?all=true")).filter((a) => a.requestId === "req-huge").length, 0);
});

test("a host's address may be a DNS name: the station resolves it", async () => {
  const put = await station.api("PUT", "/api/v1/hosts/dnshost", { address: "localhost" });
  assert.equal(put.status, 201, put.text);
  assert.ok(["127.0.0.1", "::1"].includes((put.body as { address: string }).address));
  const bad = await station.api("PUT", "/api/v1/hosts/dnshost", { address: "no-such-host.invalid" });
  assert.equal(bad.status, 400);
  assert.equal(errorOf(bad.body).field, "address");
  assert.match(errorOf(bad.body).message ?? "", /cannot resolve "no-such-host\.invalid"/);
});

test("a host's new data-path address moves its grant", async () => {
  const moved = await station.api("PUT", "/api/v1/hosts/hostA", { address: "127.0.0.5" });
  assert.equal(moved.status, 200, moved.text);
  assert.deepEqual((await unitVolume(small, first.volume)).grants, ["127.0.0.5"]);
  const current = (await liveAssignments(station)).find((a) => a.id === first.id);
  assert.equal(current?.hostAddress, "127.0.0.5");
  assert.equal(await probe(first, "127.0.0.5"), `open ${first.sizeBytes}`);
  assert.equal(await probe(first, HOST_A), "refused", "the old address is refused now");
  await station.api("PUT", "/api/v1/hosts/hostA", { address: HOST_A });
  assert.deepEqual((await unitVolume(small, first.volume)).grants, [HOST_A]);
});

test("unassign revokes the grant on the unit", async () => {
  const gone = await station.api("DELETE", `/api/v1/assignments/${second.id}`);
  assert.equal(gone.status, 204, gone.text);
  assert.deepEqual((await unitVolume(small, "spare")).grants, []);
  assert.equal((await liveAssignments(station)).some((a) => a.id === second.id), false);
  const history = (await liveAssignments(station, "?all=true")).find((a) => a.id === second.id);
  assert.equal(history?.state, "released");
  assert.equal(await probe(second, HOST_B), "refused");
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${second.id}`)).status, 204, "idempotent");
  assert.deepEqual(await grantsMatch(station, [small, large]), []);
});

test("manual path: create and partition a volume, assign a partition; a volume stays with one host", async () => {
  const created = await station.api("POST", "/api/v1/volumes", { unit: "large", name: "manual", sizeBytes: "8M" });
  assert.equal(created.status, 201, created.text);
  const parted = await station.api("PUT", "/api/v1/volumes/large/manual/partitions", { sizesBytes: ["4M", "4M"] });
  assert.equal(parted.status, 200, parted.text);
  assert.equal((parted.body as { partitions: unknown[] }).partitions.length, 2);
  // No retry here: a storage report the unit took before the partition change and the station applied
  // after it would have undone it; reports carry the table generation now (station/report_order_test.ts).
  const assigned = await station.api("POST", "/api/v1/assignments", { host: "hostB", unit: "large", volume: "manual", partition: 2 });
  assert.equal(assigned.status, 201, assigned.text);
  const a = assigned.body as Assignment;
  assert.equal(a.export, "manual/p2");
  assert.equal(a.sizeBytes, 4 * MIB);
  const onUnit = await unitVolume(large, "manual");
  assert.deepEqual(onUnit.grants, [HOST_B]);
  assert.equal(a.startLba, (onUnit.extents[0]?.startLba ?? 0) + 8192, "partition 2 starts 4 MiB into the volume");
  assert.equal(await probe(a, HOST_B), `open ${4 * MIB}`);
  const taken = await station.api("POST", "/api/v1/assignments", { host: "hostA", unit: "large", volume: "manual", partition: 1 });
  assert.equal(taken.status, 409, taken.text);
  assert.equal(errorOf(taken.body).field, "volume");
  const repartition = await station.api("PUT", "/api/v1/volumes/large/manual/partitions", { sizesBytes: [] });
  assert.equal(repartition.status, 409, "no repartitioning under an assigned partition");
  const busy = await station.api("DELETE", "/api/v1/volumes/large/manual");
  assert.equal(busy.status, 409, "no deleting an assigned volume");
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${a.id}`)).status, 204);
  assert.equal((await station.api("DELETE", "/api/v1/volumes/large/manual")).status, 204);
  assert.equal((await unitVolumes(large)).some((v) => v.name === "manual"), false);
});

test("unassign while the unit is away answers 202; the grant goes when the unit is back", async () => {
  const answer = await allocate({ requestId: "req-d1", host: "hostD", sizeBytes: "300M", address: "127.0.0.8" });
  assert.equal(answer.status, 201, answer.text);
  const away = answer.assignment;
  assert.equal(away.unit, "large");
  assert.deepEqual((await unitVolume(large, away.volume)).grants, ["127.0.0.8"]);
  await large.kill9();
  const gone = await station.api("DELETE", `/api/v1/assignments/${away.id}`);
  assert.equal(gone.status, 202, gone.text);
  assert.equal((gone.body as Assignment).state, "revoking");
  assert.equal((await liveAssignments(station)).find((a) => a.id === away.id)?.state, "revoking");
  const again = await startJoinedUnit(station, { name: "large", capacity: "512M", dataDir: large.dataDir });
  restarted.push(large); // the first handle owns the data dir: its close() removes it
  await waitFor(
    "the revoked grant removed on the returning unit",
    async () => ((await unitVolume(again, away.volume)).grants.length === 0 ? true : undefined),
    { timeoutMs: 15_000 },
  );
  await waitFor("the assignment released", async () => ((await station.api("GET", `/api/v1/assignments/${away.id}`)).body as Assignment).state === "released" || undefined, {
    timeoutMs: 5_000,
  });
  large = again;
});

test("a unit killed with -9 mid-allocation: 503, and no live assignment is left behind", async () => {
  const dry = await station.api("POST", "/api/v1/allocations", { requestId: "dry-2", host: "hostC", sizeBytes: "300M", dryRun: true });
  assert.equal((dry.body as { placement: { unit: string } }).placement.unit, "large");
  await large.kill9();
  const answer = await allocate({ requestId: "req-c1", host: "hostC", sizeBytes: "300M", address: "127.0.0.4" });
  assert.equal(answer.status, 503, answer.text);
  assert.equal(errorOf(answer.body).code, "UNAVAILABLE");
  assert.match(errorOf(answer.body).message ?? "", /unit large/);
  const live = await liveAssignments(station);
  assert.equal(live.some((a) => a.host === "hostC"), false, "nothing live for the failed request");
  const failed = (await liveAssignments(station, "?all=true")).filter((a) => a.requestId === "req-c1");
  assert.deepEqual(failed.map((a) => a.state), ["failed"]);
  assert.match(failed[0]?.error ?? "", /unreachable/);
});
