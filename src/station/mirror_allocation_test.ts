// Proves mirrored allocation (issue 6 section 1, the station's part) with a
// real station and three real `ipsan unit`s joined over discovery:
// - `copies` is validated (0, 4, "2", 1.5, true -> 400 naming `copies`);
// - copies 1 (given or not) answers exactly today's assignment, plus
//   `copies: 1` and `legs: []`, and keeps today's request-id idempotency;
// - copies 2 and 3 place one leg per distinct unit, each a new volume of the
//   requested size + 1 MiB (the engine's metadata) as the unit itself reports
//   it, granted to the host's address on every unit; the answer's unit/volume
//   are the first leg's, `uri` is null, `legs` lists every leg in-sync with
//   its own URI; GET /assignments/ID and the listing show the same; a dry run
//   shows every leg's placement and changes nothing;
// - a retried request id answers the same mirror, another `copies` is 409;
// - fewer fitting units than copies: 507 with a reason for every unit, and
//   nothing recorded or carved;
// - unassign revokes every leg's grant on its unit; the legs become free
//   volumes (reusable, wiped, by single-copy allocations; never by mirrors).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import type { RunningUnit } from "../testing/unit.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, liveAssignments, startJoinedUnit, unitVolumes, type Assignment } from "./pool_harness.ts";

const MIB = 1024 * 1024;
const HOST = "127.0.0.2";

interface Leg {
  unit: string;
  volume: string;
  sizeBytes: number;
  uri: string | null;
  state: string;
}
type Mirror = Omit<Assignment, "uri"> & { uri: string | null; copies: number; legs: Leg[] };

/** Every field an assignment answer had before copies existed (docs/api.md "Assignment"). */
const SINGLE_COPY_FIELDS = [
  "id", "requestId", "host", "hostAddress", "unit", "unitDnsName", "unitAddress", "nbdHost", "nbdPort", "export", "volume",
  "volumeNumber", "partition", "sizeBytes", "startLba", "lengthLba", "endLba", "extents", "uri", "state", "createdAt",
  "updatedAt", "error",
];

let station: RunningStation;
let units: RunningUnit[] = [];

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "500", "--pending-deadline-ms", "5000"] });
  units = await Promise.all([
    startJoinedUnit(station, { name: "m1", capacity: "256M" }),
    startJoinedUnit(station, { name: "m2", capacity: "256M" }),
    startJoinedUnit(station, { name: "m3", capacity: "128M" }),
  ]);
});
after(async () => {
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
});

function unitNamed(name: string): RunningUnit {
  const unit = units.find((u) => u.name === name);
  if (unit === undefined) throw new Error(`no unit ${name}`);
  return unit;
}

async function allocate(body: Record<string, unknown>): Promise<{ status: number; body: unknown; text: string }> {
  const response = await station.api("POST", "/api/v1/allocations", body);
  return { status: response.status, body: response.body, text: response.text };
}

test("copies is validated: 0, 4, \"2\", 1.5 and true are 400 naming copies; nothing is recorded", async () => {
  for (const copies of [0, 4, "2", 1.5, true, -1]) {
    const response = await allocate({ requestId: `bad-copies-${String(copies)}`, host: "hv", sizeBytes: "8M", address: HOST, copies });
    assert.equal(response.status, 400, `copies ${JSON.stringify(copies)}: ${response.text}`);
    const error = errorOf(response.body);
    assert.equal(error.code, "INVALID_ARGUMENT");
    assert.equal(error.field, "copies");
    assert.ok(error.message?.includes(JSON.stringify(copies)), `the message shows the value: ${error.message}`);
  }
  assert.deepEqual(await liveAssignments(station, "?all=true&host=hv"), []);
});

test("copies 1 answers today's assignment (plus copies: 1, legs: []), with today's idempotency", async () => {
  const implicit = await allocate({ requestId: "single-1", host: "hs", sizeBytes: "8M", address: HOST });
  assert.equal(implicit.status, 201, implicit.text);
  const explicit = await allocate({ requestId: "single-2", host: "hs", sizeBytes: "8M", address: HOST, copies: 1 });
  assert.equal(explicit.status, 201, explicit.text);
  for (const answer of [implicit.body, explicit.body] as Record<string, unknown>[]) {
    // movedFrom/movedAt: a host failover's record (null unless moved; docs/adr/0010); serving/servingReasons: can it be served now (issue 9);
    // protocol/iscsi: NBD or iSCSI (issue 10).
    assert.deepEqual(
      Object.keys(answer).sort(),
      [...SINGLE_COPY_FIELDS, "copies", "legs", "movedFrom", "movedAt", "serving", "servingReasons", "protocol", "iscsi"].sort(),
      "every field of today, and only copies, legs, the failover, the serving and the protocol fields added",
    );
    assert.equal(answer["copies"], 1);
    assert.deepEqual(answer["legs"], []);
    assert.equal(answer["uri"], `nbd://${String(answer["nbdHost"])}:${String(answer["nbdPort"])}/${String(answer["export"])}`);
    assert.equal(answer["sizeBytes"], 8 * MIB);
    assert.equal(answer["lengthLba"], (8 * MIB) / 512);
  }
  // Omitting copies and giving copies 1 are the same request: a retry either way gets the same assignment.
  const retried = await allocate({ requestId: "single-1", host: "hs", sizeBytes: "8M", address: HOST, copies: 1 });
  assert.equal(retried.status, 200, retried.text);
  assert.equal((retried.body as Assignment).id, (implicit.body as Assignment).id);
  const other = await allocate({ requestId: "single-1", host: "hs", sizeBytes: "8M", address: HOST, copies: 2 });
  assert.equal(other.status, 409, other.text);
  assert.equal(errorOf(other.body).field, "requestId");
  for (const a of [implicit.body, explicit.body] as Assignment[]) assert.equal((await station.api("DELETE", `/api/v1/assignments/${a.id}`)).status, 204);
});

let mirror: Mirror;

test("a dry run with copies 2 shows a leg per distinct unit and changes nothing", async () => {
  const before = { live: await liveAssignments(station, "?all=true"), volumes: await Promise.all(units.map(unitVolumes)) };
  const dry = await allocate({ requestId: "dry-m", host: "hm", sizeBytes: "32M", address: HOST, copies: 2, dryRun: true });
  assert.equal(dry.status, 200, dry.text);
  const body = dry.body as { copies: number; placement: { unit: string }; legs: { kind: string; unit: string; sizeBytes: number }[] };
  assert.equal(body.copies, 2);
  assert.equal(body.legs.length, 2);
  assert.equal(new Set(body.legs.map((l) => l.unit)).size, 2, "distinct units");
  assert.deepEqual(body.placement, body.legs[0]);
  for (const leg of body.legs) assert.deepEqual([leg.kind, leg.sizeBytes], ["carve", 33 * MIB]);
  assert.deepEqual(await liveAssignments(station, "?all=true"), before.live);
  assert.deepEqual(await Promise.all(units.map(unitVolumes)), before.volumes);
});

test("copies 2: two legs of size + 1 MiB on two units, granted to the host; the answer, GET and the list agree", async () => {
  const answer = await allocate({ requestId: "mirror-1", host: "hm", sizeBytes: "32M", address: HOST, copies: 2 });
  assert.equal(answer.status, 201, answer.text);
  mirror = answer.body as Mirror;
  assert.equal(mirror.state, "active");
  assert.equal(mirror.copies, 2);
  assert.equal(mirror.sizeBytes, 32 * MIB, "sizeBytes is the mirror's, not a leg's");
  assert.equal(mirror.uri, null, "no direct URI: the host's engine serves a mirror");
  assert.equal(mirror.legs.length, 2);
  assert.notEqual(mirror.legs[0]?.unit, mirror.legs[1]?.unit, "never two legs on one unit");
  assert.equal(mirror.unit, mirror.legs[0]?.unit);
  assert.equal(mirror.volume, mirror.legs[0]?.volume);
  assert.equal(mirror.export, mirror.volume);
  assert.equal(mirror.lengthLba, (32 * MIB) / 512, "the extents cover the mirror's data on the first leg, not its metadata");
  for (const key of SINGLE_COPY_FIELDS) assert.ok(key in mirror, `a mirror's answer keeps ${key}`);
  for (const leg of mirror.legs) {
    assert.equal(leg.state, "in-sync");
    assert.equal(leg.sizeBytes, 33 * MIB);
    const onUnit = (await unitVolumes(unitNamed(leg.unit))).find((v) => v.name === leg.volume);
    assert.ok(onUnit !== undefined, `leg ${leg.unit}/${leg.volume} exists on its unit`);
    assert.equal(onUnit.sizeBytes, 33 * MIB, "the unit made the leg 1 MiB larger than the mirror");
    assert.deepEqual(onUnit.grants, [HOST], "the unit grants the leg to the host");
    const nbd = (await station.api("GET", `/api/v1/units/${leg.unit}`)).body as { nbd: { host: string; port: number } };
    assert.equal(leg.uri, `nbd://${nbd.nbd.host}:${nbd.nbd.port}/${leg.volume}`);
  }
  const got = await station.api("GET", `/api/v1/assignments/${mirror.id}`);
  assert.equal(got.status, 200);
  assert.deepEqual((got.body as Mirror).legs, mirror.legs);
  assert.equal((got.body as Mirror).copies, 2);
  const listed = (await liveAssignments(station, "?host=hm")) as unknown as Mirror[];
  assert.deepEqual(listed.map((a) => [a.id, a.copies, a.legs]), [[mirror.id, 2, mirror.legs]]);
  // Both leg volumes are held: the station lists them assigned, not free.
  for (const leg of mirror.legs) {
    const volume = (await station.api("GET", `/api/v1/volumes/${leg.unit}/${leg.volume}`)).body as { assignedTo: string | null };
    assert.equal(volume.assignedTo, "hm");
  }
  assert.deepEqual(await grantsMatch(station, units), []);

  const retried = await allocate({ requestId: "mirror-1", host: "hm", sizeBytes: "32M", address: HOST, copies: 2 });
  assert.equal(retried.status, 200, retried.text);
  assert.equal((retried.body as Mirror).id, mirror.id, "a retried request id answers the same mirror");
  const changed = await allocate({ requestId: "mirror-1", host: "hm", sizeBytes: "32M", address: HOST, copies: 3 });
  assert.equal(changed.status, 409, changed.text);
  assert.equal(errorOf(changed.body).field, "requestId");
});

test("copies 3 uses all three units", async () => {
  const answer = await allocate({ requestId: "mirror-3", host: "h3", sizeBytes: "16M", address: "127.0.0.3", copies: 3 });
  assert.equal(answer.status, 201, answer.text);
  const three = answer.body as Mirror;
  assert.deepEqual(three.legs.map((l) => l.unit).sort(), ["m1", "m2", "m3"]);
  assert.ok(three.legs.every((l) => l.state === "in-sync" && l.sizeBytes === 17 * MIB));
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${three.id}`)).status, 204);
});

test("fewer fitting units than copies: 507 with every unit's reason, nothing recorded or carved", async () => {
  const before = await Promise.all(units.map(unitVolumes));
  // m3 (128M) cannot hold a leg of 161M; m1 and m2 can: two units for three copies.
  const response = await allocate({ requestId: "too-many", host: "hx", sizeBytes: "160M", address: HOST, copies: 3 });
  assert.equal(response.status, 507, response.text);
  const error = errorOf(response.body);
  assert.equal(error.code, "NO_SPACE");
  assert.match(error.message ?? "", /3 copies of 160M/);
  const reasons = new Map((error.reasons ?? []).map((r) => [r.unit, r.reason]));
  assert.deepEqual([...reasons.keys()].sort(), ["m1", "m2", "m3"], "a reason for every unit");
  assert.match(reasons.get("m3") ?? "", /not enough free space: need 161M/);
  assert.match(reasons.get("m1") ?? "", /can hold a leg, but only 2 of the 3 distinct units needed can/);
  assert.deepEqual(await Promise.all(units.map(unitVolumes)), before, "no unit carved anything");
  assert.deepEqual(await liveAssignments(station, "?all=true&host=hx"), []);
  const retry = await allocate({ requestId: "too-many", host: "hx", sizeBytes: "160M", address: HOST, copies: 2 });
  assert.equal(retry.status, 201, `an answered error is not acknowledged: the id is free again: ${retry.text}`);
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${(retry.body as Mirror).id}`)).status, 204);
});

test("unassign revokes every leg's grant; the legs become free volumes", async () => {
  const response = await station.api("DELETE", `/api/v1/assignments/${mirror.id}`);
  assert.equal(response.status, 204, response.text);
  for (const leg of mirror.legs) {
    const onUnit = (await unitVolumes(unitNamed(leg.unit))).find((v) => v.name === leg.volume);
    assert.deepEqual(onUnit?.grants, [], `${leg.unit}/${leg.volume}: grant revoked on the unit`);
    const volume = (await station.api("GET", `/api/v1/volumes/${leg.unit}/${leg.volume}`)).body as { assignedTo: string | null };
    assert.equal(volume.assignedTo, null, "a free volume again");
  }
  const released = (await station.api("GET", `/api/v1/assignments/${mirror.id}`)).body as Mirror;
  assert.equal(released.state, "released");
  assert.equal(released.legs.length, 2, "the history keeps the legs");
  assert.deepEqual(await grantsMatch(station, units), []);
});
