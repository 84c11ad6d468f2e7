// Canaries for leg replacement: the replacement tests run against compiled
// copies of ipsan with a defect put back on purpose
// (src/testing/patched_build.ts) and must fail there:
// - a station that deletes an old leg's volume as soon as its unit returns,
//   before the leg that replaced it is reported in-sync: the scenario of
//   leg_replacement_test.ts must fail (the old volume must be kept);
// - a placement that does not leave out the units holding legs of the
//   mirror: replacement_test.ts's checks must fail.
// The copy runs the station, which needs better-sqlite3: node_modules is
// linked into it (patchedBuild's nodeModules).

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { patchedBuild, type PatchedBuild } from "../testing/patched_build.ts";
import { REPO_ROOT } from "../testing/unit.ts";
import { runScenario } from "./leg_replacement_scenario.ts";
import { checkPlacement } from "./replacement_checks.ts";
import type { placeReplacement } from "./replacement.ts";

const builds: PatchedBuild[] = [];
const closers: (() => Promise<void>)[] = [];
after(async () => {
  for (const close of closers.reverse()) await close().catch(() => undefined);
  for (const build of builds) build.remove();
});

/** A patched copy that can run the station (node_modules linked in); removed after the tests. */
function stationBuild(prefix: string, edits: Parameters<typeof patchedBuild>[1]): PatchedBuild {
  const build = patchedBuild(prefix, edits, REPO_ROOT, { nodeModules: true });
  builds.push(build);
  return build;
}

test("canary: a station that deletes the old leg volume before the new leg is in-sync fails the replacement scenario", async () => {
  const build = stationBuild("canary-early-delete", [
    { file: "dist/station/replacement.js", from: 'if (leg === undefined || leg.state === "in-sync")', to: "if (true)" },
  ]);
  await assert.rejects(
    runScenario((close) => closers.push(close), build.ipsanBin),
    /old leg volume must be kept|still kept/,
  );
});

test("canary: a placement that may pick a unit of the mirror fails the placement checks", async () => {
  const build = stationBuild("canary-same-unit", [
    { file: "dist/station/replacement.js", from: "units.filter((u) => !mirrorUnits.has(u.name))", to: "units.filter((u) => true)" },
  ]);
  const broken = (await import(pathToFileURL(join(build.root, "dist", "station", "replacement.js")).href)) as { placeReplacement: typeof placeReplacement };
  assert.throws(() => checkPlacement(broken.placeReplacement), /holds a leg of this mirror|never on the failed leg's own unit/);
});
