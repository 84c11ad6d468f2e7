// Proves the station side of host leg reports (PUT /api/v1/assignments/ID/legs,
// docs/api.md) with a real station and two real units joined over
// discovery; the test plays the host agent through the StationClient the
// agent uses:
// - bad bodies are 400 naming the field; an unknown assignment is 404; a
//   single copy or a released mirror is 409;
// - an accepted report shows in the leg view (state, rebuild, error) of
//   GET /assignments/ID and of the listing;
// - a report with an older generation than the last accepted one is answered
//   {ignored, reason} and changes nothing (reports may arrive out of order);
//   the same generation is accepted (progress updates);
// - legs the station does not list are ignored;
// - events: leg-state on every change of state; leg-progress at most once per
//   5 s per leg however often the host reports progress.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { StationClient, type LegReport } from "../host/station_client.ts";
import type { RunningUnit } from "../testing/unit.ts";
import { errorOf, startStation, type RunningStation } from "./harness.ts";
import { recordedEvents, startJoinedUnit, type Assignment } from "./pool_harness.ts";

const HOST = "127.0.0.2";

let station: RunningStation;
let units: RunningUnit[] = [];
let client: StationClient;
let mirror: Assignment;

before(async () => {
  station = await startStation({ extraArgs: ["--reconcile-interval-ms", "1000"] });
  units = await Promise.all([startJoinedUnit(station, { name: "r1", capacity: "64M" }), startJoinedUnit(station, { name: "r2", capacity: "64M" })]);
  client = new StationClient({ baseUrl: new URL(station.url), token: station.token() });
  const answer = await station.api("POST", "/api/v1/allocations", { requestId: "reports-1", host: "h1", address: HOST, sizeBytes: "8M", copies: 2 });
  assert.equal(answer.status, 201, answer.text);
  mirror = answer.body as Assignment;
});
after(async () => {
  await Promise.all(units.map((u) => u.close()));
  await station?.close();
});

function legs(a: Assignment): NonNullable<Assignment["legs"]> {
  return a.legs ?? [];
}

async function put(id: string, body: unknown) {
  return station.api("PUT", `/api/v1/assignments/${id}/legs`, body);
}

/** Reports as the host agent does (StationClient.reportLegs); the report must be taken; then the assignment as the station shows it. */
async function report(id: string, body: LegReport): Promise<Assignment> {
  assert.deepEqual(await client.reportLegs(id, body), { ignored: false });
  return (await station.api("GET", `/api/v1/assignments/${id}`)).body as Assignment;
}

test("a new mirror's legs show index, in-sync, no rebuild and no error", () => {
  assert.deepEqual(
    legs(mirror).map((l) => [l.index, l.state, l.rebuild, l.error]),
    [
      [0, "in-sync", null, null],
      [1, "in-sync", null, null],
    ],
  );
});

test("bad reports are 400 naming the field; unknown assignment 404; single copy and released mirror 409", async () => {
  const [l0, l1] = legs(mirror);
  assert.ok(l0 !== undefined && l1 !== undefined);
  const ok = { unit: l0.unit, volume: l0.volume, state: "in-sync" };
  const cases: [unknown, string][] = [
    [[], "body"],
    [{ legs: [ok] }, "generation"],
    [{ generation: -1, legs: [ok] }, "generation"],
    [{ generation: "3", legs: [ok] }, "generation"],
    [{ generation: 1.5, legs: [ok] }, "generation"],
    [{ generation: 1 }, "legs"],
    [{ generation: 1, legs: {} }, "legs"],
    [{ generation: 1, legs: [ok], extra: 1 }, "extra"],
    [{ generation: 1, legs: ["x"] }, "legs[0]"],
    [{ generation: 1, legs: [{ ...ok, state: "pending" }] }, "legs[0].state"],
    [{ generation: 1, legs: [{ ...ok, state: "ok" }] }, "legs[0].state"],
    [{ generation: 1, legs: [{ ...ok, unit: "../x" }] }, "legs[0].unit"],
    [{ generation: 1, legs: [{ ...ok, volume: 7 }] }, "legs[0].volume"],
    [{ generation: 1, legs: [{ ...ok, error: 5 }] }, "legs[0].error"],
    [{ generation: 1, legs: [{ ...ok, state: "rebuilding", rebuild: { kind: "copy", copiedBytes: 0, totalBytes: 1 } }] }, "legs[0].rebuild.kind"],
    [{ generation: 1, legs: [{ ...ok, state: "rebuilding", rebuild: { kind: "full", copiedBytes: 5, totalBytes: 1 } }] }, "legs[0].rebuild.copiedBytes"],
    [{ generation: 1, legs: [{ ...ok, state: "rebuilding", rebuild: { kind: "full", copiedBytes: 0 } }] }, "legs[0].rebuild.totalBytes"],
    [{ generation: 1, legs: [ok, ok] }, "legs[1]"],
  ];
  for (const [body, field] of cases) {
    const response = await put(mirror.id, body);
    assert.equal(response.status, 400, `${JSON.stringify(body)} -> ${response.text}`);
    assert.equal(errorOf(response.body).field, field, `${JSON.stringify(body)} -> ${response.text}`);
  }
  assert.equal((await put("a-000000000000", { generation: 1, legs: [ok] })).status, 404);

  const single = await station.api("POST", "/api/v1/allocations", { requestId: "reports-single", host: "h1", address: HOST, sizeBytes: "4M" });
  assert.equal(single.status, 201, single.text);
  const id = (single.body as Assignment).id;
  const notMirror = await put(id, { generation: 1, legs: [ok] });
  assert.equal(notMirror.status, 409, notMirror.text);
  assert.match(errorOf(notMirror.body).message ?? "", /not a mirror/);

  const other = await station.api("POST", "/api/v1/allocations", { requestId: "reports-released", host: "h1", address: HOST, sizeBytes: "4M", copies: 2 });
  assert.equal(other.status, 201, other.text);
  const released = other.body as Assignment;
  assert.equal((await station.api("DELETE", `/api/v1/assignments/${released.id}`)).status, 204);
  const late = await put(released.id, { generation: 1, legs: [{ unit: legs(released)[0]?.unit, volume: legs(released)[0]?.volume, state: "in-sync" }] });
  assert.equal(late.status, 409, late.text);
  assert.match(errorOf(late.body).message ?? "", /released, not active/);
});

test("reports are recorded in generation order; older ones are ignored; unknown legs are ignored; events say each change", async () => {
  const [l0, l1] = legs(mirror);
  assert.ok(l0 !== undefined && l1 !== undefined);
  const startSeq = Math.max(0, ...(await recordedEvents(station)).map((e) => e.seq));

  // The answer to an accepted report is the assignment view.
  const answered = await put(mirror.id, { generation: 5, legs: [{ unit: l0.unit, volume: l0.volume, state: "in-sync" }] });
  assert.equal(answered.status, 200, answered.text);
  assert.equal((answered.body as Assignment).id, mirror.id);
  const failed = await report(mirror.id, {
    generation: 5,
    legs: [
      { unit: l0.unit, volume: l0.volume, state: "in-sync" },
      { unit: l1.unit, volume: l1.volume, state: "failed", error: "read timed out after 5 s" },
      { unit: "elsewhere", volume: "not-a-leg", state: "failed" },
    ],
  });
  assert.deepEqual(
    legs(failed).map((l) => [l.unit, l.state, l.error]),
    [
      [l0.unit, "in-sync", null],
      [l1.unit, "failed", "read timed out after 5 s"],
    ],
  );

  // An older generation arriving late changes nothing.
  const stale = await client.reportLegs(mirror.id, {
    generation: 4,
    legs: [{ unit: l1.unit, volume: l1.volume, state: "in-sync" }],
  });
  assert.deepEqual(stale, { ignored: true, reason: "generation 4 is older than the last report's 5" });
  const shown = (await station.api("GET", `/api/v1/assignments/${mirror.id}`)).body as Assignment;
  assert.equal(legs(shown)[1]?.state, "failed");

  // The same generation is accepted (a rebuild starts and reports progress); then a newer one.
  const rebuild = (copiedBytes: number) => ({ kind: "delta" as const, copiedBytes, totalBytes: 1 << 20, etaSeconds: 3 });
  const rebuilding = await report(mirror.id, {
    generation: 5,
    legs: [{ unit: l1.unit, volume: l1.volume, state: "rebuilding", rebuild: rebuild(0) }],
  });
  assert.equal(legs(rebuilding)[1]?.state, "rebuilding");
  assert.equal(legs(rebuilding)[1]?.error, null);
  for (const copied of [1000, 2000, 3000, 4000]) {
    await client.reportLegs(mirror.id, { generation: 6, legs: [{ unit: l1.unit, volume: l1.volume, state: "rebuilding", rebuild: rebuild(copied) }] });
  }
  const listed = (await station.api("GET", "/api/v1/assignments")).body as { items: Assignment[] };
  const inList = listed.items.find((a) => a.id === mirror.id);
  assert.deepEqual(legs(inList as Assignment)[1]?.rebuild, rebuild(4000));
  const done = await report(mirror.id, {
    generation: 7,
    legs: [
      { unit: l0.unit, volume: l0.volume, state: "in-sync" },
      { unit: l1.unit, volume: l1.volume, state: "in-sync" },
    ],
  });
  assert.deepEqual(
    legs(done).map((l) => [l.state, l.rebuild]),
    [
      ["in-sync", null],
      ["in-sync", null],
    ],
  );

  const events = (await recordedEvents(station, startSeq)).filter((e) => e.subject === mirror.id);
  const states = events.filter((e) => e.action === "leg-state").map((e) => [e.data["leg"], e.data["previousState"], e.data["state"]]);
  assert.deepEqual(states, [
    [1, "in-sync", "failed"],
    [1, "failed", "rebuilding"],
    [1, "rebuilding", "in-sync"],
  ]);
  // Four progress reports within well under 5 s: at most one leg-progress event.
  const progress = events.filter((e) => e.action === "leg-progress");
  assert.ok(progress.length <= 1, `leg-progress events: ${JSON.stringify(progress)}`);
  assert.equal(progress.length, 1, "the first progress after the state change is told");
});
