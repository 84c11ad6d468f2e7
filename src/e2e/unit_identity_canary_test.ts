// Canaries for unit identities: the scenarios of unit_identity_test.ts run
// against compiled copies of ipsan with a defect put back on purpose
// (src/testing/patched_build.ts) and must fail there:
// - a station where the latest claimant of a name wins (a STARTUP with
//   another id re-enrols the name instead of being refused): the impostor
//   scenario must fail (the known unit's state, volumes or assignment change);
// - a station that accepts datagrams in an enrolled unit's name signed with
//   the cluster key (only STARTUP still checked): the per-unit key scenario
//   must fail (a forged SHUTDOWN marks the unit down);
// - a unit that still accepts the cluster-key token on its control API once
//   enrolled: the per-unit key scenario must fail (401 expected).
// The copies run the station (it needs better-sqlite3: node_modules is linked
// in) or the units, as each defect needs.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { patchedBuild, type PatchedBuild } from "../testing/patched_build.ts";
import { REPO_ROOT } from "../testing/unit.ts";
import { impostorScenario, perUnitKeyScenario, type Register } from "./unit_identity_scenario.ts";

const builds: PatchedBuild[] = [];
const closers: (() => Promise<void>)[] = [];
const register: Register = (close) => closers.push(close);
after(async () => {
  for (const close of closers.reverse()) await close().catch(() => undefined);
  for (const build of builds) build.remove();
});

function stationBuild(prefix: string, edits: Parameters<typeof patchedBuild>[1]): PatchedBuild {
  const build = patchedBuild(prefix, edits, REPO_ROOT, { nodeModules: true });
  builds.push(build);
  return build;
}

test("canary: a station where the latest claimant of a name wins lets the impostor disturb the known unit", async () => {
  const build = stationBuild("canary-impostor", [
    {
      file: "dist/discovery/station_listener.js",
      from: "if (claimedId !== undefined && claimedId !== identity.unitId) {",
      to: "if (claimedId !== undefined && claimedId !== identity.unitId) { identities.forget(name); this.sendEnrol(identities.enrol(name, claimedId), from); return true; } if (false) {",
    },
  ]);
  await assert.rejects(impostorScenario(register, { stationBin: build.ipsanBin }), /must be untouched/);
});

test("canary: a station that takes cluster-key datagrams for an enrolled unit accepts a forged SHUTDOWN", async () => {
  const build = stationBuild("canary-unit-key", [
    {
      file: "dist/discovery/station_listener.js",
      from: 'const startup = frame.typeName === "STARTUP" ? decodeStartup(frame.payload) : undefined;',
      to: 'if (frame.typeName !== "STARTUP") return false; const startup = decodeStartup(frame.payload);',
    },
  ]);
  await assert.rejects(perUnitKeyScenario(register, { stationBin: build.ipsanBin }), /must not mark unit1 down/);
});

test("canary: a unit that keeps accepting the cluster-key token after enrolment opens to the cluster key", async () => {
  const build = stationBuild("canary-unit-token", [
    {
      file: "dist/discovery/unit_identity.js",
      from: "if (this.current === null)\n            return [this.clusterToken];",
      to: "if (this.current !== null)\n            return [this.current.token, this.clusterToken];\n        if (this.current === null)\n            return [this.clusterToken];",
    },
  ]);
  await assert.rejects(perUnitKeyScenario(register, { unitBin: build.ipsanBin }), /the cluster-key token no longer opens an enrolled unit/);
});
