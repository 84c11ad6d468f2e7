// The leg replacement scenario (issue 6 section 3, station side), shared by
// leg_replacement_test.ts and its canary (leg_replacement_canary_test.ts): a
// real station (`--replace-after 2s`) and three real `ipsan unit`s joined
// over discovery (u1, u2, and the spare sp); the caller plays the host agent
// through the StationClient (leg reports). What it proves is listed in
// leg_replacement_test.ts.

import assert from "node:assert/strict";
import { StationClient } from "../host/station_client.ts";
import { run, waitFor } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { IPSAN_BIN, type RunningUnit } from "../testing/unit.ts";
import { startStation, type RunningStation } from "./harness.ts";
import { grantsMatch, recordedEvents, startJoinedUnit, unitVolume, unitVolumes, type Assignment, type RecordedEvent } from "./pool_harness.ts";

const HOST = "127.0.0.2";
export const REPLACE_AFTER_MS = 2_000;
/** Fast liveness so a killed unit is offline within ~3 s, yet a live one on loaded cores is not (station and units read these). */
export const FAST_DISCOVERY = { IPSAN_DISCOVERY_HEARTBEAT_MS: "250", IPSAN_DISCOVERY_SUSPECT_MS: "1000", IPSAN_DISCOVERY_OFFLINE_MS: "3000" };
const WAIT_MS = 20_000;

type Legs = NonNullable<Assignment["legs"]>;

function legsOf(a: Assignment): Legs {
  return a.legs ?? [];
}

export interface ScenarioResult {
  readonly replacedAfterMs: number;
  /** The station, still running (the cleanup closes it), and mirror A's assignment id. */
  readonly station: RunningStation;
  readonly replaced: { readonly assignment: string; readonly leg: number };
}

/**
 * The whole scenario, against the station run from `stationBin` (default the
 * repository's; a canary passes a broken build's). Throws at the first broken promise.
 */
export async function runScenario(cleanup: (close: () => Promise<void>) => void, stationBin?: string): Promise<ScenarioResult> {
  const station: RunningStation = await startStation({
    extraArgs: ["--replace-after", `${REPLACE_AFTER_MS / 1000}s`, "--reconcile-interval-ms", "500", "--pending-deadline-ms", "8000"],
    env: FAST_DISCOVERY,
    ...(stationBin === undefined ? {} : { bin: stationBin }),
  });
  cleanup(() => station.close());
  const u1Data = makeTempDir("replace-u1", memoryTmpBase());
  cleanup(async () => u1Data.remove());
  const start = (name: string, extraArgs: string[] = [], dataDir?: string): Promise<RunningUnit> =>
    startJoinedUnit(station, { name, capacity: "64M", extraArgs, env: FAST_DISCOVERY, ...(dataDir === undefined ? {} : { dataDir }) });
  let u1 = await start("u1", [], u1Data.path);
  const u2 = await start("u2");
  const sp = await start("sp", ["--spare"]);
  cleanup(async () => {
    await Promise.all([u1.close(), u2.close(), sp.close()]);
  });
  const client = new StationClient({ baseUrl: new URL(station.url), token: station.token() });

  const allocate = async (requestId: string): Promise<Assignment> => {
    const answer = await station.api("POST", "/api/v1/allocations", { requestId, host: "h1", address: HOST, sizeBytes: "8M", copies: 2 });
    assert.equal(answer.status, 201, answer.text);
    return answer.body as Assignment;
  };
  const a = await allocate("replace-a");
  const b = await allocate("replace-b");
  assert.deepEqual(legsOf(a).map((l) => l.unit).sort(), ["u1", "u2"], "the spare takes no ordinary leg");
  const oldLeg = legsOf(a).find((l) => l.unit === "u1");
  assert.ok(oldLeg !== undefined);
  const report = (m: Assignment, generation: number, states: Record<string, string>) =>
    client.reportLegs(m.id, {
      generation,
      legs: legsOf(m).map((l) => ({ unit: l.unit, volume: l.volume, state: (states[l.unit] ?? "in-sync") as "in-sync" })),
    });
  await report(a, 1, {});
  // B's only in-sync leg is the one on u1: it must never be replaced.
  await report(b, 1, { u2: "stale" });

  const killedAtMs = Date.now();
  await u1.kill9();
  const replaced = await waitFor(
    "mirror A's leg on u1 replaced on the spare",
    async () => {
      const now = (await station.api("GET", `/api/v1/assignments/${a.id}`)).body as Assignment;
      return legsOf(now).some((l) => l.unit === "sp") ? now : undefined;
    },
    { timeoutMs: WAIT_MS, intervalMs: 100 },
  );
  const replacedAfterMs = Date.now() - killedAtMs;
  assert.ok(replacedAfterMs >= REPLACE_AFTER_MS, `replaced ${replacedAfterMs} ms after the kill, before --replace-after`);
  const newLeg = legsOf(replaced)[oldLeg.index];
  assert.ok(newLeg !== undefined);
  assert.equal(newLeg.unit, "sp", "the replacement is at the same index");
  assert.equal(newLeg.state, "rebuilding");
  assert.equal(newLeg.sizeBytes, oldLeg.sizeBytes);
  assert.notEqual(newLeg.uri, null);
  assert.deepEqual(
    legsOf(replaced).filter((l) => l.index !== oldLeg.index),
    legsOf(a).filter((l) => l.index !== oldLeg.index).map((l) => ({ ...l, state: "in-sync" })),
    "the other leg is untouched",
  );
  if (oldLeg.index === 0) assert.equal(replaced.unit, "sp", "leg 0 is also the assignment's unit");
  const onSpare = await unitVolume(sp, newLeg.volume);
  assert.equal(onSpare.sizeBytes, oldLeg.sizeBytes, "the spare made the leg");
  assert.deepEqual(onSpare.grants, [HOST], "the spare grants the host");

  // B keeps its only in-sync leg (on u1, away) and says why.
  await waitFor(
    "leg-replacement-waiting for mirror B",
    async () => ((await recordedEvents(station)).some((e) => e.subject === b.id && e.action === "leg-replacement-waiting") ? true : undefined),
    { timeoutMs: WAIT_MS, intervalMs: 200 },
  );
  const bNow = (await station.api("GET", `/api/v1/assignments/${b.id}`)).body as Assignment;
  assert.deepEqual(legsOf(bNow).map((l) => l.unit).sort(), ["u1", "u2"], "B's only in-sync leg is not replaced");

  // The host starts the full copy; u1 comes back while it runs: the old volume stays.
  await client.reportLegs(a.id, {
    generation: 2,
    legs: [
      { unit: newLeg.unit, volume: newLeg.volume, state: "rebuilding", rebuild: { kind: "full", copiedBytes: 1 << 20, totalBytes: newLeg.sizeBytes, etaSeconds: 4 } },
      { unit: oldLeg.unit, volume: oldLeg.volume, state: "failed", error: "connection refused" },
    ],
  });
  // The admin CLI shows it: `ipsan assignments` LEGS column.
  const listing = await run(process.execPath, [IPSAN_BIN, "assignments"], {
    timeoutMs: 30_000,
    env: { IPSAN_STATION: station.url, IPSAN_TOKEN_FILE: `${station.dataDir}/admin.token` },
  });
  const percent = Math.floor((100 * (1 << 20)) / newLeg.sizeBytes);
  assert.match(listing.stdout, new RegExp(`\\n${a.id} .* (sp:rebuilding ${percent}% u2:in-sync|u2:in-sync sp:rebuilding ${percent}%) +nbd\\n`), listing.stdout + listing.stderr);
  u1 = await start("u1", [], u1Data.path);
  const kept = await waitFor(
    "A's old leg volume on u1 kept, its grant taken off",
    async () => {
      const volume = (await unitVolumes(u1)).find((v) => v.name === oldLeg.volume);
      assert.ok(volume !== undefined, "the old leg volume must be kept while the new leg is rebuilding");
      return volume.grants.length === 0 ? volume : undefined;
    },
    { timeoutMs: WAIT_MS, intervalMs: 100 },
  );
  assert.equal(kept.sizeBytes, oldLeg.sizeBytes);
  await new Promise((resolve) => setTimeout(resolve, 1_500)); // several passes of the loop
  assert.ok((await unitVolumes(u1)).some((v) => v.name === oldLeg.volume), "still kept after more passes while rebuilding");
  assert.match((await station.api("GET", "/metrics")).text, /^ipsan_station_leg_volumes_to_delete 1$/m);
  assert.match((await station.api("GET", "/metrics")).text, /^ipsan_station_leg_replacements 0$/m);
  await waitFor(
    "leg-volume-kept for A's old leg",
    async () => ((await recordedEvents(station)).some((e) => e.subject === a.id && e.action === "leg-volume-kept") ? true : undefined),
    { timeoutMs: WAIT_MS, intervalMs: 200 },
  );

  // The host reports the new leg in-sync: the old volume goes.
  await client.reportLegs(a.id, { generation: 3, legs: [{ unit: newLeg.unit, volume: newLeg.volume, state: "in-sync" }] });
  await waitFor(
    "A's old leg volume deleted on u1",
    async () => ((await unitVolumes(u1)).some((v) => v.name === oldLeg.volume) ? undefined : true),
    { timeoutMs: WAIT_MS, intervalMs: 100 },
  );
  assert.ok((await unitVolumes(u1)).some((v) => legsOf(b).some((l) => l.volume === v.name)), "B's leg on u1 is untouched");
  await waitFor("the deletion recorded done", async () => (/^ipsan_station_leg_volumes_to_delete 0$/m.test((await station.api("GET", "/metrics")).text) ? true : undefined), {
    timeoutMs: WAIT_MS,
    intervalMs: 100,
  });

  const events: RecordedEvent[] = (await recordedEvents(station)).filter((e) => e.subject === a.id);
  const actions = events.map((e) => e.action).filter((x) => x.startsWith("leg-replac") || x.startsWith("leg-volume"));
  assert.deepEqual(
    actions.filter((x, i) => actions.indexOf(x) === i),
    ["leg-replacing", "leg-replaced", "leg-volume-kept", "leg-volume-deleted"],
  );
  const replacedEvent = events.find((e) => e.action === "leg-replaced");
  assert.deepEqual(replacedEvent?.data["replaced"], { unit: "u1", volume: oldLeg.volume });
  assert.match(String(events.find((e) => e.action === "leg-volume-kept")?.data["reason"]), /rebuilding, not in-sync/);
  await waitFor("grants match the assignments", async () => ((await grantsMatch(station, [u1, u2, sp])).length === 0 ? true : undefined), {
    timeoutMs: WAIT_MS,
    intervalMs: 200,
  });
  return { replacedAfterMs, station, replaced: { assignment: a.id, leg: Number(replacedEvent?.data["leg"]) } };
}
