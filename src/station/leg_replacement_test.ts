// Proves automatic leg replacement (issue 6 section 3, station side) with a
// real station (`--replace-after 2s`) and three real `ipsan unit`s joined over
// discovery (u1, u2, and the spare sp); the test plays the host agent
// through the StationClient (leg reports):
// - kill -9 of u1: after it has been away longer than --replace-after, the
//   leg of mirror A on u1 is replaced on the spare at the same index, state
//   "rebuilding", a new volume of the leg's size that the spare itself lists,
//   granted to the host; events leg-replacing then leg-replaced;
// - mirror B, whose other leg the host reported stale, keeps its leg on u1:
//   the only in-sync leg is never given up (event leg-replacement-waiting);
// - u1 returns: A's old leg volume is kept (event leg-volume-kept, its grant
//   taken off) while the new leg is rebuilding; once the host reports the new
//   leg in-sync, the old volume is deleted on u1 (event leg-volume-deleted),
//   and the units' grants match the station's assignments.
//
// - the replacement shows as a task "leg.replace" started by "station",
//   succeeded with the leg-replaced event's data as its result.
//
// The scenario is in leg_replacement_scenario.ts; the canary
// (leg_replacement_canary_test.ts) runs it against a broken build.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { REPLACE_AFTER_MS, runScenario } from "./leg_replacement_scenario.ts";

const closers: (() => Promise<void>)[] = [];
after(async () => {
  for (const close of closers.reverse()) await close().catch(() => undefined);
});

test("a leg whose unit stays away is replaced on the spare; the old volume goes only when its unit is back and the new leg is in-sync", async () => {
  const result = await runScenario((close) => closers.push(close));
  process.stdout.write(`# leg replaced ${result.replacedAfterMs} ms after kill -9 of its unit (--replace-after ${REPLACE_AFTER_MS} ms)\n`);
  const tasks = ((await result.station.api("GET", "/api/v1/tasks?kind=leg.replace")).body as { items: { state: string; target: unknown; startedBy: string; role: string; objects: unknown[]; cancellable: boolean; result: { leg?: number; unit?: string } | null }[] }).items;
  assert.equal(tasks.length, 1, JSON.stringify(tasks));
  const task = tasks[0];
  assert.equal(task?.state, "succeeded");
  assert.deepEqual(task?.target, { type: "assignment", id: result.replaced.assignment });
  assert.equal(task?.startedBy, "station");
  assert.equal(task?.role, "station");
  assert.deepEqual(task?.objects, []);
  assert.equal(task?.result?.leg, result.replaced.leg);
  assert.equal(task?.result?.unit, "sp");
});
