// Canary for the revocation claim of real_clients_test ("a revoked device
// drops its session at once"): in a build whose connections ignore
// BlockDevice.onRevoked, the same check must see a session outlive its
// device (the grant changed behind it). If this canary ever passes its check,
// the real test proves nothing.

import assert from "node:assert/strict";
import { test } from "node:test";
import { controlOk } from "../testing/control.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { startUnit } from "../testing/unit.ts";
import { iscsiTargetName } from "./names.ts";
import { RawInitiator } from "./testing/initiator.ts";

test("canary: with onRevoked ignored, a session outlives a grant change (the real test would catch it)", { timeout: 60_000 }, async () => {
  const build = patchedBuild(
    "iscsi-revoke-canary",
    [{ file: "dist/iscsi/connection.js", from: "this.#device?.onRevoked?.((error) => this.revoked(error));", to: "/* canary: revocation ignored */" }],
    undefined,
    { nodeModules: true },
  );
  const unit = await startUnit({ name: "canary", capacity: "64M", volumes: [{ name: "vol", size: "4M" }], control: true, extraArgs: ["--iscsi", "127.0.0.1:0"], ipsanBin: build.ipsanBin });
  try {
    const portal = unit.iscsiPortal!;
    const session = await RawInitiator.connect(portal.slice(0, portal.lastIndexOf(":")), Number(portal.slice(portal.lastIndexOf(":") + 1)));
    try {
      assert.equal((await session.login({ targetName: iscsiTargetName("canary", "vol") })).status, 0);
      await session.ready();
      await controlOk(unit, "PUT", "/v1/volumes/vol/grants", { hosts: ["10.9.9.9"] });
      // The check real_clients_test makes; on this build it must fail.
      assert.equal(await session.waitClosed(2_000), false, "the broken build still dropped the session: the canary tests nothing");
    } finally {
      session.close();
    }
  } finally {
    await unit.close();
    build.remove();
  }
});
