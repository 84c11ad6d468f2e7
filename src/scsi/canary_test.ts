// The SCSI safety scenarios (scenarios.ts) hold on this build and fail on a
// copy of it with the safety removed: COMPARE AND WRITE taking its range
// lock shared instead of exclusive, the persistent reservation check
// letting every command through, and the logical unit's own LBA range check
// gone (the device's refusal then shows as an internal failure to the fuzzer), ORDERED commands
// entering the task set like SIMPLE ones, and an aborted waiting command left in the task set. A
// scenario that passed on the broken copy would be testing nothing.

import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { patchedBuild } from "../testing/patched_build.ts";
import { setLogLevel } from "../util/log.ts";
import { abortedOrderedReleasesWaiters, compareAndWriteCounter, fuzzExecute, orderedReadAfterWrite, preemptAndAbortFences, reservationFencing } from "./scenarios.ts";

setLogLevel("error");

type Scenarios = typeof import("./scenarios.ts");

async function broken(prefix: string, file: string, from: string, to: string, body: (scenarios: Scenarios) => Promise<void>): Promise<void> {
  // node_modules: the fuzz scenario imports fast-check.
  const build = patchedBuild(prefix, [{ file, from, to }], undefined, { nodeModules: true });
  try {
    const scenarios = (await import(pathToFileURL(join(build.root, "dist", "scsi", "scenarios.js")).href)) as Scenarios;
    const log = (await import(pathToFileURL(join(build.root, "dist", "util", "log.js")).href)) as typeof import("../util/log.ts");
    log.setLogLevel("error");
    await body(scenarios);
  } finally {
    build.remove();
  }
}

test("COMPARE AND WRITE is atomic; with its lock made shared, increments are lost", { timeout: 120_000 }, async () => {
  await compareAndWriteCounter();
  await broken("scsi-caw-canary", "dist/scsi/logical_unit.js", "locks.acquire(start, start + bytes, true)", "locks.acquire(start, start + bytes, false)", async (s) => {
    await assert.rejects(s.compareAndWriteCounter(), /increment was lost|200/);
  });
});

test("persistent reservations fence per SPC-4 table 48; with the check removed, strangers write", { timeout: 120_000 }, async () => {
  await reservationFencing();
  await broken("scsi-pr-canary", "dist/scsi/reservations.js", `if (r === undefined || access === "none")`, "if (true)", async (s) => {
    await assert.rejects(s.reservationFencing(), /reservation type 1/);
  });
});

test("PREEMPT AND ABORT waits for the preempted nexus's writes in flight; without the wait, GOOD comes first", { timeout: 120_000 }, async () => {
  await preemptAndAbortFences();
  await broken("scsi-preempt-abort-canary", "dist/scsi/logical_unit.js", "if (preempted.length > 0)", "if (false)", async (s) => {
    await assert.rejects(s.preemptAndAbortFences(), /still in the device/);
  });
});

test("random commands never reach past the device; without the logical unit's range check they do", { timeout: 300_000 }, async () => {
  await fuzzExecute(300);
  await broken("scsi-range-canary", "dist/scsi/logical_unit.js", "if (lba + BigInt(blocks) > BigInt(this.#blocks)) {", "if (false) {", async (s) => {
    await assert.rejects(s.fuzzExecute(3000), (error: unknown) => /internal failure/.test(`${String(error)} ${String((error as { cause?: unknown }).cause)}`));
  });
});

test("an ORDERED READ waits for the WRITE before it; with ORDERED entered like SIMPLE, it reads the old bytes", { timeout: 120_000 }, async () => {
  await orderedReadAfterWrite();
  await broken("scsi-ordered-canary", "dist/scsi/logical_unit.js", `const ordered = request.attribute === "ordered";`, "const ordered = false;", async (s) => {
    await assert.rejects(s.orderedReadAfterWrite(), /ORDERED READ was answered while an earlier WRITE was still running/);
  });
});

test("an aborted waiting command releases those behind it; left in the task set, it holds them", { timeout: 120_000 }, async () => {
  await abortedOrderedReleasesWaiters();
  await broken("scsi-abort-canary", "dist/scsi/logical_unit.js", "cancel(request) {", "cancel(request) { return false;", async (s) => {
    await assert.rejects(s.abortedOrderedReleasesWaiters(), /aborted while it waited was not answered/);
  });
});
