// The spare-host proof of issue 6 (section 4): h1 and the spare h2 in separate
// network namespaces; SIGSTOP h1's agent and mirror engine; the station
// fences h1 on both units and moves the volume to h2 within
// --host-failover-after + 10 s; h2 writes; SIGCONT h1's engine: its next write
// fails and the units count h1's refused attempts; the volume holds h2's data
// (src/e2e/host_failover_scenario.ts). Its canary is host_failover_canary_test.ts.

import { test } from "node:test";
import assert from "node:assert/strict";
import { FAILOVER_AFTER_S, spareHostScenario } from "./host_failover_scenario.ts";
import { PrivateNetwork } from "./netns.ts";

test("spare host: a frozen host is fenced on every unit, its volume moves to the spare, and it cannot write another byte when it wakes", { timeout: 150_000 }, async (t) => {
  const support = await PrivateNetwork.supported();
  if (!support.ok) {
    t.skip(`kernel refuses network namespaces: ${support.why}`);
    return;
  }
  const result = await spareHostScenario("hostfail");
  t.diagnostic(`moved within ${result.movedWithinMs} ms of the freeze (--host-failover-after ${FAILOVER_AFTER_S}s); refused attempts ${result.refusedBefore} -> ${result.refusedAfter}; h1's write: ${result.h1WriteResult.split("\n")[0]}`);
  assert.ok(result.movedWithinMs <= (FAILOVER_AFTER_S + 10) * 1000);
});
