// Proves where a replacement leg goes (placeReplacement, src/station/replacement.ts),
// a pure function over the pool as the allocator sees it:
// - a spare in a failure domain the mirror's remaining legs do not use first,
//   then any spare, then a non-spare with room in a new domain, then any unit
//   with room;
// - never a unit that holds a leg of this mirror (the remaining legs' units,
//   and the failed leg's own unit), even when it alone has room: then no
//   placement, with the reason for every unit.
// - the loop (LegReplacer, injected clock) does nothing before --replace-after,
//   waits again when the unit came back in between, and never replaces the
//   only leg reported in-sync.
// The checks are in replacement_checks.ts: the canary (leg_replacement_canary_test.ts)
// runs the same checks against a broken compiled copy, where they must fail.

import { test } from "node:test";
import assert from "node:assert/strict";
import { openDatabase } from "./db.ts";
import { StationMetrics } from "./metrics.ts";
import { LegReplacer, placeReplacement } from "./replacement.ts";
import { DEFAULT_STATION_OPTIONS, Station } from "./station.ts";
import { StationStore } from "./store.ts";
import type { LegRecord } from "./types.ts";

const MIB = 1024 * 1024;
import { checkPlacement } from "./replacement_checks.ts";

test("a replacement leg goes to a spare in a new zone first, never to a unit of the mirror", () => {
  checkPlacement(placeReplacement);
});

// The loop's timing, by its injected clock, on a real store (SQLite in memory) and the real
// station core, with two units and no third to place on (so no unit is ever called):
// nothing before --replace-after, leg-replacement-waiting at it; a unit that comes back starts
// the wait again; a leg whose peer is reported stale is never replaced ("nothing to rebuild from").
test("the replacement loop waits --replace-after by its clock, and never gives up the only in-sync leg", async () => {
  const clock = { t: 1_000, nowMs: () => clock.t };
  const store = new StationStore(openDatabase(":memory:"), clock);
  const legBytes = 9 * MIB;
  for (const [name, volume] of [["u1", "h-000000000001-l0"], ["u2", "h-000000000001-l1"]] as const) {
    store.applyUnitReport({
      name,
      dnsName: null,
      addresses: ["127.0.0.1"],
      nbd: { host: "127.0.0.1", port: 10809 },
      control: { host: "127.0.0.1", port: 10810 },
      capacityBytes: 64 * MIB,
      freeBytes: 8 * MIB,
      volumes: [{ name: volume, number: 1, sizeBytes: legBytes, extents: [{ startLba: 8192, lengthLba: legBytes / 512, endLba: 8191 + legBytes / 512 }], partitions: [], grants: ["127.0.0.2"] }],
    });
  }
  const legs: LegRecord[] = [0, 1].map((index) => ({ index, unit: `u${index + 1}`, volume: `h-000000000001-l${index}`, sizeBytes: legBytes, state: "pending", detail: null }));
  const id = "a-000000000001";
  store.insertAssignment({
    id, requestId: null, host: "h1", hostAddress: "127.0.0.2", unit: "u1", volume: legs[0]?.volume ?? "", partition: null, sizeBytes: 8 * MIB,
    state: "pending", carved: true, wipe: false, copies: 2, legs, error: null, detail: null, createdAtMs: clock.t, updatedAtMs: clock.t,
  });
  store.updateAssignment(id, "active", { legs: legs.map((l) => ({ ...l, state: "in-sync" })) });
  const station = new Station(store, new StationMetrics(), { clusterKey: Buffer.alloc(32), ...DEFAULT_STATION_OPTIONS });
  const replacer = new LegReplacer(station, { replaceAfterMs: 60_000, clock });
  const said: string[] = [];
  store.subscribe((event) => {
    if (event.action.startsWith("leg-")) said.push(`${event.action}: ${String((event.data as { reason?: string }).reason)}`);
  });
  const at = async (t: number): Promise<void> => {
    clock.t = t;
    await replacer.runPass();
  };

  store.setUnitState("u1", "offline");
  await at(1_000);
  await at(60_999);
  assert.deepEqual(said, [], "nothing before --replace-after");
  await at(61_000);
  assert.equal(said.length, 1);
  assert.match(said[0] ?? "", /^leg-replacement-waiting: no unit can take a leg of 9437184 bytes: u1: holds a leg of this mirror; u2: holds a leg of this mirror$/);
  await at(62_000);
  assert.equal(said.length, 1, "the same reason is said once");

  // u1 comes back, then goes again: the wait starts again.
  store.setUnitState("u1", "online");
  await at(70_000);
  store.setUnitState("u1", "down");
  await at(80_000);
  said.length = 0;
  await at(139_999);
  await at(140_000);
  assert.equal(said.length, 0, "same reason as before: not said again");

  // The host reports u2's leg stale: u1's is the only in-sync one, never replaced.
  store.applyLegReport(id, 1, [{ ...legs[1], state: "stale" } as LegRecord], []);
  await at(200_000);
  assert.deepEqual(said, ["leg-replacement-waiting: no other leg of the mirror is in-sync on a unit that is here: nothing to rebuild from"]);
  assert.equal(store.replacements.size, 0);
  await replacer.stop();
  store.close();
});
