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
import { randomBytes } from "node:crypto";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import type { Assignment } from "../host/station_client.ts";
import { nbdRead } from "../testing/clients.ts";
import { childEnv, run, runOk, waitFor } from "../testing/process.ts";
import { IpsanChild } from "../demo/child.ts";
import { San, ipsan } from "./harness.ts";

const MIB = 1024 * 1024;

/** `uri` with another TLS-PSK identity (the URI's user part) and key file. */
function asIdentity(uri: string, identity: string, keyFile: string): string {
  const url = new URL(uri);
  url.username = identity;
  url.searchParams.set("tls-psk-file", keyFile);
  return url.href;
}

async function refused(uri: string, why: string): Promise<void> {
  const result = await run("nbdinfo", ["--size", uri], { timeoutMs: 30_000 });
  assert.notEqual(result.code, 0, `${why}: nbdinfo must fail, got ${result.stdout}`);
}

async function readsBack(uri: string, tmp: (name: string) => string, tag: string): Promise<void> {
  const pattern = randomBytes(MIB);
  writeFileSync(tmp(`${tag}.in`), pattern);
  // nbdcopy writes the file's 1 MiB at the start of the export (--destination-is-zero is not claimed).
  await runOk("nbdcopy", ["--flush", tmp(`${tag}.in`), uri], { timeoutMs: 30_000 });
  assert.ok((await nbdRead(uri, 0, MIB)).equals(pattern), `${tag}: the bytes nbdcopy wrote through ${uri} read back with nbdsh`);
}

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

    // Partitions of one volume to two hosts.
    const client = await san.client();
    await client.registerHost("hA", "127.0.0.1");
    await client.registerHost("hB", "127.0.0.1");
    const carved = (await client.call("POST", "/api/v1/volumes", { unit: "u1", name: "shared1", sizeBytes: 32 * MIB })) as { unit: string; name: string };
    await client.call("PUT", `/api/v1/volumes/${carved.unit}/${carved.name}/partitions`, { sizesBytes: [8 * MIB, 8 * MIB] });
    const stateA = san.tmp.file("hA-state");
    const stateB = san.tmp.file("hB-state");
    const assignTo = async (host: string, partition: number, state: string): Promise<string> => {
      const assigned = (await client.call("POST", "/api/v1/assignments", { host, unit: "u1", volume: carved.name, partition })) as Assignment;
      const local = (await san.host(["attach", ...admin, "--host", host, "--assignment", String(assigned.id), "--mode", "nbd", "--state-dir", state, "--json"])).json as { uri: string };
      return local.uri;
    };
    const pA = await assignTo("hA", 1, stateA);
    const pB = await assignTo("hB", 2, stateB);
    assert.match(pA, new RegExp(`/${carved.name}/p1\\?`));
    await readsBack(pA, (n) => san.tmp.file(n), "pA");
    await readsBack(pB, (n) => san.tmp.file(n), "pB");
    const whole = (uri: string): string => uri.replace(/\/p[12]\?/, "?");
    await refused(whole(pA), "hA on the whole volume");
    await refused(whole(pB), "hB on the whole volume");
    await refused(pA.replace("/p1?", "/p2?"), "hA on hB's partition");
    await refused(pB.replace("/p2?", "/p1?"), "hB on hA's partition");

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
