// Issue 9 item 3: a unit that joined a station without --control could not be
// allocated from ("no control API"). A joined unit now opens its control API
// by itself (the --listen host, a free port), prints it, and reports it: the
// station creates volumes on it and allocates from it.

import assert from "node:assert/strict";
import { test } from "node:test";
import { waitFor } from "../testing/process.ts";
import { startStation } from "./harness.ts";
import { startJoinedUnit } from "./pool_harness.ts";

test("a unit joined without --control opens its control API by itself; the station allocates from it", { timeout: 60_000 }, async () => {
  const station = await startStation({});
  try {
    const unit = await startJoinedUnit(station, { name: "auto1", capacity: "256M", control: false });
    try {
      assert.ok(!unit.args.includes("--control"), "started without --control");
      const line = await waitFor("the control line", () => unit.stdoutLines().find((l) => l.startsWith("ipsan unit auto1 control http://127.0.0.1:")), { timeoutMs: 10_000 });
      const port = Number(/:(\d+)$/.exec(line)?.[1]);
      assert.ok(port > 0);
      const view = await waitFor("the station sees the control API", async () => {
        const answer = await station.api("GET", "/api/v1/units/auto1");
        const body = answer.body as { control?: { host: string; port: number } | null };
        return body.control?.port === port ? body : undefined;
      }, { timeoutMs: 15_000 });
      assert.deepEqual(view.control, { host: "127.0.0.1", port });
      const created = await station.api("POST", "/api/v1/volumes", { unit: "auto1", name: "v1", sizeBytes: 16 * 1024 * 1024 });
      assert.equal(created.status, 201, JSON.stringify(created.body));
    } finally {
      await unit.close();
    }
  } finally {
    await station.close();
  }
});
