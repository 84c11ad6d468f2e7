// Canary for the initiator check of iSCSI grants (issue 10): the scenario of
// iscsi_station_scenario.ts runs against a compiled copy of ipsan whose unit
// ignores a grant's `iqn` (src/testing/patched_build.ts), and must fail
// there: another initiator name, with the host's CHAP secret, then logs in.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { Assignment } from "../host/station_client.ts";
import { patchedBuild, type PatchedBuild } from "../testing/patched_build.ts";
import { REPO_ROOT } from "../testing/unit.ts";
import { San } from "./harness.ts";
import { onlyTheGrantedInitiator } from "./iscsi_station_scenario.ts";

const builds: PatchedBuild[] = [];
after(() => {
  for (const build of builds) build.remove();
});

test(
  "canary: a unit that ignores the grant's iqn admits another initiator with the host's secret",
  { timeout: 120_000 },
  async () => {
    const build = patchedBuild(
      "canary-iscsi-any-initiator",
      [{ file: "dist/unit/provider.js", from: "(a.iqn === undefined || a.iqn === peer.initiator)", to: "true" }],
      REPO_ROOT,
      { nodeModules: true },
    );
    builds.push(build);
    const san = new San("iscsi-canary");
    try {
      const station = await san.startStation();
      await san.startUnit("u1", { bin: build.ipsanBin, extraArgs: ["--iscsi", "127.0.0.1:0"] });
      await san.waitUnits(["u1"]);
      const admin = ["--station", station.apiUrl, "--token-file", station.tokenFile];
      const iqn = "iqn.1994-05.com.redhat:canary-h1";
      const state = san.tmp.file("h1-state");
      const request = ["request", ...admin, "--host", "h1", "--address", "127.0.0.1", "--iqn", iqn, "--size", "8M", "--protocol", "iscsi", "--state-dir", state, "--json"];
      const a = (await san.host(request)).json as Assignment;
      assert.ok(a.iscsi !== undefined && a.iscsi !== null && a.iscsi.chapUser !== null, "an iSCSI assignment with CHAP");
      await san.host(["attach", ...admin, "--host", "h1", "--assignment", a.id, "--state-dir", state, "--json"]);
      const login = {
        portal: a.iscsi.portal,
        target: a.iscsi.target,
        chapUser: a.iscsi.chapUser,
        secret: readFileSync(join(state, "keys", "u1.chap"), "utf8"),
        granted: iqn,
        other: "iqn.2000-01.com.example:stranger",
      };
      await assert.rejects(onlyTheGrantedInitiator(login), /another initiator \(iqn\.2000-01\.com\.example:stranger\) logged in/);
    } finally {
      await san.close();
    }
  },
);
