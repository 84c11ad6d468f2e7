// Canary of the spare-host proof (host_failover_test.ts): the same scenario
// with units built so that a grant revoked from a host leaves that host's
// open connections working (permits() in src/unit/volumes.ts no longer
// revokes a device whose peer lost its grant; new connections are still
// refused). Fencing then does not fence: when h1 wakes up, its engine's old
// connections still write. The scenario must fail, and at the check of h1's
// write; a test that passed here would prove nothing about fencing.

import { test } from "node:test";
import assert from "node:assert/strict";
import { patchedBuild } from "../testing/patched_build.ts";
import { spareHostScenario } from "./host_failover_scenario.ts";
import { PrivateNetwork } from "./netns.ts";

test("canary: units that keep a revoked host's open connections fail the spare-host proof at h1's write", { timeout: 150_000 }, async (t) => {
  const support = await PrivateNetwork.supported();
  if (!support.ok) {
    t.skip(`kernel refuses network namespaces: ${support.why}`);
    return;
  }
  const build = patchedBuild("canary-hostfail", [
    {
      file: "dist/unit/volumes.js",
      from: 'if (!device.admits(volume))\n        return new IpsanError("PERMISSION_DENIED", `grant to volume',
      to: 'if (false)\n        return new IpsanError("PERMISSION_DENIED", `grant to volume',
    },
  ]);
  try {
    await assert.rejects(spareHostScenario("hostfail-canary", { unitBin: build.ipsanBin }), (error: Error) => {
      assert.match(error.message, /h1's write after waking up must fail/, `the canary must fail at h1's write, not elsewhere: ${error.message}`);
      return true;
    });
  } finally {
    build.remove();
  }
});
