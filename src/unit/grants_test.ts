// Identity grants on the unit (issue 7), over the real control API and a real
// VolumeManager on a storage file: `PUT /v1/volumes/NAME/grants` takes the
// new {grants:[{host, key, export, from}]} body and the legacy {hosts} one;
// bad bodies get a 400 naming the field (never echoing a key); the keys go to
// DATA/host-keys.psk (0600, exactly the hosts some grant names) and never
// into an answer or the volume table; the table survives a restart; a table
// written before identity grants loads; per-export admission (a partition
// grant admits that partition only, a whole-volume grant the volume and its
// partitions, `from` narrows it, the key must be the one granted); a rotated
// key revokes the old key's open devices on every volume of that host.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import type { Peer } from "../block/types.ts";
import { pskKeyId } from "../nbd/tls.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { ControlServer } from "./control.ts";
import { HOST_KEYS_FILE_NAME } from "./host_keys.ts";
import { MIB } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import { decodeSlot, encodeSlot } from "./table.ts";
import { VolumeManager } from "./volumes.ts";

setLogLevel("error");
const TOKEN = "unit-token-0123456789abcdef";
const K1 = randomBytes(32);
const K2 = randomBytes(32);
const hex = (key: Buffer): string => key.toString("hex");

let dir: TempDir;
let manager: VolumeManager;
let provider: UnitExportProvider;
let server: ControlServer;
let base: string;

async function startAll(): Promise<void> {
  manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 64 * MIB });
  provider = new UnitExportProvider(manager, { tls: true, joined: () => true });
  server = new ControlServer({ manager, provider, unitName: "u1", tokens: [TOKEN], nbd: () => undefined });
  base = `http://127.0.0.1:${(await server.listen("127.0.0.1", 0)).port}`;
}

async function stopAll(): Promise<void> {
  await server.close();
  await manager.close();
}

before(async () => {
  dir = makeTempDir("grants", memoryTmpBase());
  await startAll();
  await manager.create("vol", 8 * MIB);
  await manager.setPartitions("vol", [2 * MIB, 2 * MIB]);
  await manager.create("other", 2 * MIB);
});

after(async () => {
  await stopAll();
  dir.remove();
});

async function put(name: string, body: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const response = await fetch(`${base}/v1/volumes/${name}/grants`, {
    method: "PUT",
    headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await response.text();
  return { status: response.status, json: JSON.parse(text) as Record<string, unknown> };
}

function peer(identity: string | undefined, key: Buffer | undefined, address = "127.0.0.1"): Peer {
  return { address, port: 1, ...(identity === undefined ? {} : { identity }), ...(key === undefined ? {} : { keyId: pskKeyId(key) }) };
}

test("bad grants bodies: 400 naming the field, never echoing the key", async () => {
  const secret = hex(K1);
  const cases: [unknown, string][] = [
    [{ grants: "h1" }, "grants"],
    [{ grants: [{ key: secret }] }, "grants[0].host"],
    [{ grants: [{ host: "bad host", key: secret }] }, "grants[0].host"],
    [{ grants: [{ host: "h1" }] }, "grants[0].key"],
    [{ grants: [{ host: "h1", key: "abcd" }] }, "grants[0].key"],
    [{ grants: [{ host: "h1", key: secret, export: "vol/p0" }] }, "grants[0].export"],
    [{ grants: [{ host: "h1", key: secret, export: "other" }] }, "grants[0].export"],
    [{ grants: [{ host: "h1", key: secret, from: ["10.0.0.300"] }] }, "grants[0].from[0]"],
    [{ grants: [{ host: "h1", key: secret, from: ["10.0.0.1", "10.0.0.2", "10.0.0.3"] }] }, "grants[0].from"],
    [{ grants: [{ host: "h1", key: secret, colour: "red" }] }, "grants[0].colour"],
    [{ grants: [{ host: "h1", key: secret }, { host: "h1", key: hex(K2), export: "vol/p1" }] }, "grants[1].key"],
    [{ grants: [{ host: "h1", key: secret }, { host: "h1", key: secret }] }, "grants[1].export"],
    [{ grants: [], hosts: [] }, "hosts"],
  ];
  for (const [body, field] of cases) {
    const r = await put("vol", body);
    assert.equal(r.status, 400, JSON.stringify(body));
    const error = r.json["error"] as { field: string; message: string };
    assert.equal(error.field, field, JSON.stringify(r.json));
    assert.ok(!error.message.includes(secret) && !error.message.includes(hex(K2)), "no key in the message");
  }
});

test("identity grants: stored, shown as access without the key, keys in a 0600 file, per-export admission", async () => {
  const r = await put("vol", {
    grants: [
      { host: "h1", key: hex(K1), export: "vol/p1" },
      { host: "h2", key: hex(K2), export: "vol", from: ["10.0.0.0/24"] },
    ],
  });
  assert.equal(r.status, 200, JSON.stringify(r.json));
  assert.deepEqual(r.json["grants"], []);
  assert.deepEqual(r.json["access"], [
    { host: "h1", export: "vol/p1", from: [] },
    { host: "h2", export: "vol", from: ["10.0.0.0/24"] },
  ]);
  assert.ok(!JSON.stringify(r.json).includes(hex(K1)));
  const path = dir.file(HOST_KEYS_FILE_NAME);
  assert.equal(statSync(path).mode & 0o777, 0o600);
  assert.equal(readFileSync(path, "utf8"), `h1:${hex(K1)}\nh2:${hex(K2)}\n`);
  assert.ok(!readFileSync(dir.file("storage.img")).includes(Buffer.from(hex(K1))), "the key is not in the volume table");
  const vol = manager.volume("vol");
  assert.ok(vol !== undefined);
  // h1: partition 1 only, from anywhere, with its key.
  assert.equal(provider.admits(vol, 1, peer("h1", K1)), true);
  assert.equal(provider.admits(vol, 2, peer("h1", K1)), false);
  assert.equal(provider.admits(vol, undefined, peer("h1", K1)), false);
  assert.equal(provider.admits(vol, 1, peer("h1", K2)), false, "another key");
  assert.equal(provider.admits(vol, 1, peer("h2", K2)), false, "h2 is not granted p1 from 127.0.0.1");
  assert.equal(provider.admits(vol, 1, peer(undefined, undefined)), false, "plaintext");
  // h2: the volume and its partitions, from 10.0.0.0/24 only.
  assert.equal(provider.admits(vol, undefined, peer("h2", K2, "10.0.0.7")), true);
  assert.equal(provider.admits(vol, 2, peer("h2", K2, "10.0.0.7")), true);
  assert.equal(provider.admits(vol, undefined, peer("h2", K2, "10.0.1.7")), false);
  assert.deepEqual(
    provider.list(peer("h1", K1)).map((e) => e.name),
    ["vol/p1"],
  );
  // Before TLS, a connection from an address some identity grant could come from gets a handshake.
  assert.equal(provider.admitsConnection({ address: "10.9.9.9", port: 1 }), true, "h1's grant has no from");
});

test("a rotated key revokes the old key's devices on every volume of that host; the legacy body replaces identity grants", async () => {
  assert.equal((await put("vol", { grants: [{ host: "h1", key: hex(K1), export: "vol/p1" }] })).status, 200);
  assert.equal((await put("other", { grants: [{ host: "h1", key: hex(K1) }] })).status, 200);
  assert.equal(readFileSync(dir.file(HOST_KEYS_FILE_NAME), "utf8"), `h1:${hex(K1)}\n`, "h2's key dropped with its last grant");
  const onVol = await provider.open("vol/p1", peer("h1", K1));
  const onOther = await provider.open("other", peer("h1", K1));
  const revoked: string[] = [];
  onVol.onRevoked?.(() => revoked.push("vol/p1"));
  onOther.onRevoked?.(() => revoked.push("other"));
  const K3 = randomBytes(32);
  assert.equal((await put("other", { grants: [{ host: "h1", key: hex(K3) }] })).status, 200);
  assert.deepEqual(revoked.sort(), ["other", "vol/p1"]);
  const vol = manager.volume("vol");
  assert.ok(vol !== undefined);
  assert.equal(provider.admits(vol, 1, peer("h1", K3)), true, "the new key opens h1's other grants too");
  assert.equal(provider.admits(vol, 1, peer("h1", K1)), false);
  await onVol.close();
  await onOther.close();
  const legacy = await put("other", { hosts: ["10.1.0.5"] });
  assert.deepEqual(legacy.json["grants"], ["10.1.0.5"]);
  assert.deepEqual(legacy.json["access"], []);
});

test("grants survive a restart; a table written before identity grants loads and encodes byte-identical", async () => {
  await stopAll();
  await startAll();
  const vol = manager.volume("vol");
  assert.ok(vol !== undefined);
  assert.equal(vol.access[0]?.host, "h1");
  assert.equal(manager.hostKeys.get("h1")?.length, 32);
  // A table with no identity grants has no "access" field: older units read it as before.
  const old = { storageBytes: 64 * MIB, nextVolumeNumber: 2, volumes: [{ name: "a", number: 1, sizeBytes: MIB, extents: [{ startLba: 8192, lengthLba: 2048 }], partitions: [], grants: ["10.0.0.1"], access: [] }] };
  const slot = encodeSlot(old, 1);
  assert.ok(!slot.toString("utf8").includes("access"));
  const decoded = decodeSlot(slot);
  assert.equal(decoded.kind, "valid");
  if (decoded.kind === "valid") assert.deepEqual(decoded.table.volumes[0]?.access, []);
});
