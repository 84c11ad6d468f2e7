// Hosts prove who they are with keys, not addresses (issue 7), end to end
// with a real station, a unit on its default (--tls require) and real
// clients:
// - `ipsan host request` answers an nbds:// URI that carries the host's key
//   file (written 0600 under its state dir); nbdinfo and nbdcopy use it as
//   it is, and `attach --mode nbd --json` prints it for a single copy.
// - Refused: plaintext nbd:// to the unit; host h2's identity and key on
//   h1's export (same source address: identity, not address, decides); h1's
//   identity with h2's key.
// - Partitions: p1 to hA and p2 to hB (`ipsan assign --partition`): each
//   reads and writes its own; neither opens the whole volume nor the other's.
// - `ipsan hosts rotate-key h1`: the old key file is refused at once;
//   `attach` again writes the new key and the URI works again; a running
//   `ipsan host agent` rewrites the key file by itself after the next rotation.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import type { Assignment } from "../host/station_client.ts";
import { childEnv, runOk, waitFor } from "../testing/process.ts";
import { IpsanChild } from "../demo/child.ts";
import { San, ipsan } from "./harness.ts";
import { MIB, asIdentity, partitionsToTwoHosts, readsBack, refused } from "./identity_scenario.ts";


test("identity: nbds:// URIs with the host's key; other identities, other keys and plaintext refused; partitions per host; key rotation", { timeout: 180_000 }, async () => {
  const san = new San("identity");
  try {
    const station = await san.startStation();
    await san.startUnit("u1");
    await san.waitUnits(["u1"]);
    const admin = ["--station", station.apiUrl, "--token-file", station.tokenFile];
    const state1 = san.tmp.file("h1-state");
    const state2 = san.tmp.file("h2-state");
    const request = async (host: string, state: string): Promise<Assignment> =>
      (await san.host(["request", ...admin, "--host", host, "--address", "127.0.0.1", "--size", "16M", "--state-dir", state, "--json"])).json as Assignment;
    const a1 = await request("h1", state1);
    const a2 = await request("h2", state2);
    const keyFile1 = `${state1}/keys/u1.psk`;
    const keyFile2 = `${state2}/keys/u1.psk`;
    assert.match(a1.uri, /^nbds:\/\/h1@127\.0\.0\.1:\d+\/[^?]+\?tls-psk-file=/, `the answer's URI: ${a1.uri}`);
    assert.equal(new URL(a1.uri).searchParams.get("tls-psk-file"), keyFile1);
    assert.equal(statSync(keyFile1).mode & 0o777, 0o600, "the key file is 0600");
    assert.match(readFileSync(keyFile1, "utf8"), /^h1:[0-9a-f]{64}\n$/, "psktool format: identity:hexkey");
    assert.notEqual(readFileSync(keyFile1, "utf8").slice(3), readFileSync(keyFile2, "utf8").slice(3), "each host has its own key");

    // Real clients with the URI as it is.
    const size = await runOk("nbdinfo", ["--size", a1.uri]);
    assert.equal(Number(size.stdout.trim()), 16 * MIB);
    await readsBack(a1.uri, (n) => san.tmp.file(n), "h1");

    // attach --mode nbd prints the same kind of URI for a single copy.
    const attached = (await san.host(["attach", ...admin, "--host", "h1", "--assignment", String(a1.id), "--mode", "nbd", "--state-dir", state1, "--json"])).json as {
      assignment: string;
      mode: string;
      uri: string;
    };
    assert.equal(attached.mode, "nbd");
    assert.equal(attached.assignment, String(a1.id));
    assert.equal(attached.uri, a1.uri);

    // Refusals: plaintext, another host's identity and key (same address), the right identity with a wrong key.
    const plain = a1.uri.replace(/^nbds:\/\/h1@/, "nbd://").replace(/\?.*$/, "");
    await refused(plain, "plaintext to a TLS-required unit");
    await refused(asIdentity(a1.uri, "h2", keyFile2), "h2's identity and key on h1's export");
    const forged = san.tmp.file("forged.psk");
    writeFileSync(forged, `h1:${readFileSync(keyFile2, "utf8").trim().split(":")[1]}\n`, { mode: 0o600 });
    await refused(asIdentity(a1.uri, "h1", forged), "h1's identity with h2's key");
    // h2's own export still works with h2's key.
    assert.equal(Number((await runOk("nbdinfo", ["--size", a2.uri])).stdout.trim()), 16 * MIB);

    // Partitions of one volume to two hosts (identity_scenario.ts; its canary breaks the station's per-export grants).
    await partitionsToTwoHosts(san, admin);
    const client = await san.client();

    // Rotation: the old key stops working at once; attaching again fetches the new one.
    const oldKey = san.tmp.file("old.psk");
    writeFileSync(oldKey, readFileSync(keyFile1), { mode: 0o600 });
    const rotated = await ipsan(["hosts", "rotate-key", "h1", ...admin, "--json"]);
    assert.equal(rotated.code, 0, rotated.stderr);
    assert.equal((JSON.parse(rotated.stdout) as { keyEpoch: number }).keyEpoch, 1);
    await refused(asIdentity(a1.uri, "h1", oldKey), "h1's key from before the rotation");
    await san.host(["attach", ...admin, "--host", "h1", "--assignment", String(a1.id), "--mode", "nbd", "--state-dir", state1, "--json"]);
    assert.notEqual(readFileSync(keyFile1, "utf8"), readFileSync(oldKey, "utf8"), "attach wrote the new key");
    assert.equal(Number((await runOk("nbdinfo", ["--size", a1.uri])).stdout.trim()), 16 * MIB, "the same URI works with the new key file");

    // The host's agent follows a rotation by itself: it rewrites the key file at its next check.
    const agent = new IpsanChild(["host", "agent", ...admin, "--host", "h1", "--heartbeat-ms", "200", "--state-dir", state1], {
      name: "agent",
      logFile: san.log("agent"),
      env: childEnv(),
    });
    try {
      await agent.waitForLine(/^ipsan host agent h1 running/, 10_000);
      const before = readFileSync(keyFile1, "utf8");
      await client.rotateHostKey("h1");
      await waitFor("the agent writes the rotated key", () => (readFileSync(keyFile1, "utf8") !== before ? true : undefined), { timeoutMs: 15_000, intervalMs: 100 });
      assert.equal(Number((await runOk("nbdinfo", ["--size", a1.uri])).stdout.trim()), 16 * MIB, "the URI works with the key the agent wrote");
    } finally {
      await agent.stop("SIGTERM");
    }
  } finally {
    await san.close();
  }
});
