// Proves the station's NBD key scheme (host_keys.ts) and the grant bodies it
// sends to units (unit_client.ts grantsBody): one key per (host, unit) pair,
// different for every host, unit and epoch, stable for the same inputs and
// across a restart (the secret is a file); a psktool-format line; identity
// grants carry their host's key for this unit only, address grants none.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { stat } from "node:fs/promises";
import { hostKeySecretFrom, hostUnitKey, loadOrCreateHostKeySecret, pskFileLine } from "./host_keys.ts";
import { grantsBody } from "./unit_client.ts";
import { identityGrant, parseIdentityGrant } from "../discovery/messages.ts";
import { makeTempDir } from "../testing/tmp.ts";

test("a key per host, unit and epoch; the same inputs give the same key", () => {
  const secret = hostKeySecretFrom(randomBytes(32));
  const keys = new Set<string>();
  for (const host of ["h1", "h2"]) for (const unit of ["u1", "u2"]) for (const epoch of [0, 1]) keys.add(hostUnitKey(secret, host, unit, epoch));
  assert.equal(keys.size, 8);
  for (const key of keys) assert.match(key, /^[0-9a-f]{64}$/);
  assert.equal(hostUnitKey(secret, "h1", "u1", 0), hostUnitKey(secret, "h1", "u1", 0));
  // Names that would run together without a separator stay apart.
  assert.notEqual(hostUnitKey(secret, "h1", "1u", 0), hostUnitKey(secret, "h11", "u", 0));
  // Another station (another secret) derives other keys.
  assert.notEqual(hostUnitKey(hostKeySecretFrom(randomBytes(32)), "h1", "u1", 0), hostUnitKey(secret, "h1", "u1", 0));
  assert.equal(pskFileLine("h1", "ab".repeat(32)), `h1:${"ab".repeat(32)}\n`);
});

test("the secret file is made once, 0600, and read back the same after a restart", async () => {
  const tmp = makeTempDir("host-keys");
  try {
    const path = tmp.file("host-keys.secret");
    const first = await loadOrCreateHostKeySecret(path);
    assert.equal((await stat(path)).mode & 0o777, 0o600);
    const again = await loadOrCreateHostKeySecret(path);
    assert.deepEqual(again, first);
    assert.equal(hostUnitKey(again, "h1", "u1", 0), hostUnitKey(first, "h1", "u1", 0));
  } finally {
    tmp.remove();
  }
});

test("grant bodies: identity grants carry the host's key and export; address grants and empty lists keep the old form where they must", () => {
  const keyFor = (host: string): string => (host === "h1" ? "11".repeat(32) : "22".repeat(32));
  const grants = [identityGrant("h1", "vol1/p1"), identityGrant("h2", "vol1/p2", ["10.0.0.0/8"])];
  assert.deepEqual(grantsBody(grants, "require", keyFor), {
    grants: [
      { host: "h1", key: "11".repeat(32), export: "vol1/p1" },
      { host: "h2", key: "22".repeat(32), export: "vol1/p2", from: ["10.0.0.0/8"] },
    ],
  });
  assert.deepEqual(grantsBody(["127.0.0.2"], "off", keyFor), { hosts: ["127.0.0.2"] });
  assert.deepEqual(grantsBody([], "off", keyFor), { hosts: [] });
  // Revoking everything on a TLS unit clears its identity grants too.
  assert.deepEqual(grantsBody([], "require", keyFor), { grants: [] });
  assert.deepEqual(grantsBody([], null, keyFor), { grants: [] });
  assert.throws(() => grantsBody(["127.0.0.2", identityGrant("h1", "vol1")], "on", keyFor), /mix/);
  assert.deepEqual(parseIdentityGrant(identityGrant("h1", "v/p3", ["b", "a"])), { host: "h1", export: "v/p3", from: ["a", "b"] });
  assert.equal(parseIdentityGrant("127.0.0.1"), undefined);
});

test("an iSCSI grant string names the initiator and its body carries iqn; one without stays as before", () => {
  const keyFor = (): string => "11".repeat(32);
  const iqn = "iqn.1994-05.com.redhat:client-a";
  const grant = identityGrant("h1", "vol1/p1", ["10.0.0.0/8"], iqn);
  assert.equal(grant, `id:h1@vol1/p1<10.0.0.0/8#${iqn}`);
  assert.deepEqual(parseIdentityGrant(grant), { host: "h1", export: "vol1/p1", from: ["10.0.0.0/8"], iqn });
  assert.deepEqual(parseIdentityGrant(identityGrant("h1", "vol1", [], iqn)), { host: "h1", export: "vol1", from: [], iqn });
  assert.deepEqual(grantsBody([identityGrant("h1", "vol1", [], iqn), identityGrant("h2", "vol1/p2")], "require", keyFor), {
    grants: [
      { host: "h1", key: "11".repeat(32), export: "vol1", iqn },
      { host: "h2", key: "11".repeat(32), export: "vol1/p2" },
    ],
  });
});
