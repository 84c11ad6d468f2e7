// The SCSI safety scenarios (scenarios.ts) hold on this build and fail on a
// copy of it with the safety removed: COMPARE AND WRITE taking its range
// lock shared instead of exclusive, and the persistent reservation check
// letting every command through. A scenario that passed on the broken copy
// would be testing nothing.

import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { patchedBuild } from "../testing/patched_build.ts";
import { setLogLevel } from "../util/log.ts";
import { compareAndWriteCounter, reservationFencing } from "./scenarios.ts";

setLogLevel("error");

type Scenarios = typeof import("./scenarios.ts");

async function broken(prefix: string, file: string, from: string, to: string, body: (scenarios: Scenarios) => Promise<void>): Promise<void> {
  const build = patchedBuild(prefix, [{ file, from, to }]);
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
