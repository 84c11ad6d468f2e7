// Canary for the per-export grants the station makes (issue 7): the
// partitions scenario of the identity test (identity_scenario.ts) runs
// against a compiled copy of ipsan whose station grants a partition's host
// the whole volume (src/testing/patched_build.ts), and must fail there: hA
// then opens the whole volume, which the scenario says it must not.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { patchedBuild, type PatchedBuild } from "../testing/patched_build.ts";
import { REPO_ROOT } from "../testing/unit.ts";
import { San } from "./harness.ts";
import { partitionsToTwoHosts } from "./identity_scenario.ts";

const builds: PatchedBuild[] = [];
after(() => {
  for (const build of builds) build.remove();
});

test("canary: a station that grants a partition's host the whole volume fails the partitions scenario", { timeout: 120_000 }, async () => {
  const build = patchedBuild(
    "canary-whole-volume-grant",
    [{ file: "dist/station/assignments/grants.js", from: "a.partition === null ? volume : `${volume}/p${a.partition}`", to: "volume" }],
    REPO_ROOT,
    { nodeModules: true },
  );
  builds.push(build);
  const san = new San("identity-canary");
  try {
    const station = await san.startStation({ bin: build.ipsanBin });
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    await assert.rejects(partitionsToTwoHosts(san, ["--station", station.apiUrl, "--token-file", station.tokenFile]), /hA on the whole volume/);
  } finally {
    await san.close();
  }
});
