// Identity grants that name an iSCSI initiator (issue 10): the unit's control
// API checks `iqn` (RFC 3720 forms, lowercase, at most 223 bytes, a bounded
// total per table), stores it in the volume table (old tables without it
// still load; one written with it round-trips), shows it in the volume view,
// and ExportProvider.admits lets in only a peer that logged in with that
// InitiatorName, besides the host identity, key and `from` it already checks.
// A real VolumeManager on a memory-backed temp dir behind the real control server.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import type { Peer } from "../block/types.ts";
import { ISCSI_NAME_BYTES_MAX } from "../iscsi/names.ts";
import { pskKeyId } from "../nbd/tls.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { ControlServer } from "./control.ts";
import { ACCESS_IQN_BYTES_TABLE_MAX, ACCESS_PER_VOLUME_MAX, MIB } from "./layout.ts";
import { UnitExportProvider } from "./provider.ts";
import { decodeSlot, encodeSlot, validateTable } from "./table.ts";
import { VolumeManager } from "./volumes.ts";

setLogLevel("error");
const TOKEN = "unit-token-0123456789abcdef";
const K1 = randomBytes(32);
const K2 = randomBytes(32);
const hex = (key: Buffer): string => key.toString("hex");
const IQN_A = "iqn.1994-05.com.redhat:client-a";
const IQN_B = "iqn.1991-05.com.microsoft:host-b.example.com";

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
  dir = makeTempDir("iscsi-grants", memoryTmpBase());
  await startAll();
  await manager.create("vol", 4 * MIB);
  await manager.setPartitions("vol", [MIB, MIB]);
});

after(async () => {
  await stopAll();
  dir.remove();
});

async function call(method: string, path: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const response = await fetch(`${base}${path}`, {
    method,
    headers: { authorization: `Bearer ${TOKEN}`, "content-type": "application/json" },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    signal: AbortSignal.timeout(10_000),
  });
  return { status: response.status, json: JSON.parse(await response.text()) as Record<string, unknown> };
}

/** A peer as the iSCSI target makes one (an initiator name) or as NBD does (none). */
function peer(identity: string | undefined, key: Buffer | undefined, initiator?: string, address = "127.0.0.1"): Peer {
  return {
    address,
    port: 1,
    ...(identity === undefined ? {} : { identity }),
    ...(key === undefined ? {} : { keyId: pskKeyId(key) }),
    ...(initiator === undefined ? {} : { initiator }),
  };
}

test("bad iqn in a grant: 400 naming grants[N].iqn with what a name looks like", async () => {
  const key = hex(K1);
  const cases: [unknown, RegExp][] = [
    ["IQN.1994-05.com.redhat:x", /capital letters.*iqn\.1994-05\.com\.redhat:x/],
    ["iqn.1994-05.com.Redhat:x", /capital letters/],
    ["iqn.1994-13.com.redhat:x", /not an iSCSI name/],
    ["iqn.1994-05.com.redhat:white space", /not an iSCSI name/],
    ["iqn.1994-05.com..redhat:x", /not an iSCSI name/],
    ["client1", /not an iSCSI name/],
    ["eui.02004567a425678", /not an iSCSI name/],
    ["naa.1234", /not an iSCSI name/],
    [`iqn.2026-12.org.example:${"x".repeat(ISCSI_NAME_BYTES_MAX)}`, /bytes, more than ISCSI_NAME_BYTES_MAX=223/],
    [42, /got number/],
    [null, /got null/],
  ];
  for (const [iqn, message] of cases) {
    const r = await call("PUT", "/v1/volumes/vol/grants", { grants: [{ host: "h1", key, iqn }] });
    assert.equal(r.status, 400, JSON.stringify(iqn));
    const error = r.json["error"] as { field: string; message: string };
    assert.equal(error.field, "grants[0].iqn", JSON.stringify(r.json));
    assert.match(error.message, message);
    assert.ok(error.message.length < 400 && !error.message.includes(key), "bounded, no key");
  }
  // The three forms, at the length limit.
  const longest = `iqn.2026-12.org.example:${"x".repeat(ISCSI_NAME_BYTES_MAX - "iqn.2026-12.org.example:".length)}`;
  for (const iqn of ["eui.02004567a425678d", "naa.52004567ba64678d", "naa.6001405a1b2c3d4e5f60718293a4b5c6", longest]) {
    const r = await call("PUT", "/v1/volumes/vol/grants", { grants: [{ host: "h1", key, iqn }] });
    assert.equal(r.status, 200, `${iqn}: ${JSON.stringify(r.json)}`);
  }
});

test("a grant with iqn admits only that initiator (with the host's identity and key); one without admits any, NBD too", async () => {
  const r = await call("PUT", "/v1/volumes/vol/grants", {
    grants: [
      { host: "h1", key: hex(K1), export: "vol/p1", iqn: IQN_A },
      { host: "h2", key: hex(K2), export: "vol" },
    ],
  });
  assert.equal(r.status, 200, JSON.stringify(r.json));
  assert.deepEqual(r.json["access"], [
    { host: "h1", export: "vol/p1", from: [], iqn: IQN_A },
    { host: "h2", export: "vol", from: [] },
  ]);
  const shown = await call("GET", "/v1/volumes/vol");
  assert.deepEqual((shown.json["access"] as { iqn?: string }[]).map((a) => a.iqn ?? null), [IQN_A, null]);
  const vol = manager.volume("vol");
  assert.ok(vol !== undefined);
  assert.equal(provider.admits(vol, 1, peer("h1", K1, IQN_A)), true, "the granted initiator");
  assert.equal(provider.admits(vol, 1, peer("h1", K1, IQN_B)), false, "another initiator");
  assert.equal(provider.admits(vol, 1, peer("h1", K1, IQN_A.toUpperCase())), false, "names are compared as the target lowercased them");
  assert.equal(provider.admits(vol, 1, peer("h1", K1)), false, "an NBD peer (no initiator) under an iSCSI grant");
  assert.equal(provider.admits(vol, 1, peer("h1", K2, IQN_A)), false, "the initiator with another key");
  assert.equal(provider.admits(vol, 1, peer("h2", K1, IQN_A)), false, "the initiator under another host's identity");
  assert.equal(provider.admits(vol, 2, peer("h1", K1, IQN_A)), false, "another export");
  assert.equal(provider.admits(vol, 1, peer(undefined, undefined, IQN_A)), false, "no CHAP identity");
  // h2's grant names no initiator: any initiator with h2's identity, and NBD, as before issue 10.
  assert.equal(provider.admits(vol, undefined, peer("h2", K2, IQN_B)), true);
  assert.equal(provider.admits(vol, 2, peer("h2", K2, IQN_A)), true);
  assert.equal(provider.admits(vol, undefined, peer("h2", K2)), true);
  assert.deepEqual(provider.list(peer("h1", K1, IQN_A)).map((e) => e.name), ["vol/p1"]);
  assert.deepEqual(provider.list(peer("h1", K1, IQN_B)).map((e) => e.name), []);
});

test("a changed iqn revokes the devices opened under the old grant", async () => {
  assert.equal((await call("PUT", "/v1/volumes/vol/grants", { grants: [{ host: "h1", key: hex(K1), iqn: IQN_A }] })).status, 200);
  const device = await provider.open("vol", peer("h1", K1, IQN_A));
  let revoked = false;
  device.onRevoked?.(() => (revoked = true));
  assert.equal((await call("PUT", "/v1/volumes/vol/grants", { grants: [{ host: "h1", key: hex(K1), iqn: IQN_B }] })).status, 200);
  assert.equal(revoked, true);
  await device.close();
  await assert.rejects(provider.open("vol", peer("h1", K1, IQN_A)), /not granted|PERMISSION|denied/i);
});

test("iqn survives a restart; tables without it load; with it they round-trip; a bad stored iqn makes the table invalid", async () => {
  assert.equal((await call("PUT", "/v1/volumes/vol/grants", { grants: [{ host: "h1", key: hex(K1), iqn: IQN_A }, { host: "h2", key: hex(K2), export: "vol/p2" }] })).status, 200);
  await stopAll();
  await startAll();
  const vol = manager.volume("vol");
  assert.ok(vol !== undefined);
  assert.deepEqual(vol.access.map((a) => a.iqn ?? null), [IQN_A, null]);
  assert.equal(provider.admits(vol, undefined, peer("h1", K1, IQN_A)), true);
  assert.equal(provider.admits(vol, undefined, peer("h1", K1, IQN_B)), false);
  const keyId = "0123456789abcdef";
  const volume = { name: "a", number: 1, sizeBytes: MIB, extents: [{ startLba: 8192, lengthLba: 2048 }], partitions: [], grants: [] };
  const without = { storageBytes: 64 * MIB, nextVolumeNumber: 2, volumes: [{ ...volume, access: [{ host: "h1", partition: undefined, from: [], keyId }] }] };
  const oldSlot = encodeSlot(without, 1);
  assert.ok(!oldSlot.toString("utf8").includes("iqn"), "a table without iSCSI grants is written as before issue 10");
  const oldDecoded = decodeSlot(oldSlot);
  assert.equal(oldDecoded.kind, "valid");
  if (oldDecoded.kind === "valid") assert.deepEqual(oldDecoded.table.volumes[0]?.access, [{ host: "h1", partition: undefined, from: [], keyId }]);
  const withIqn = { ...without, volumes: [{ ...volume, access: [{ host: "h1", partition: undefined, from: [], keyId, iqn: IQN_B }] }] };
  const decoded = decodeSlot(encodeSlot(withIqn, 2));
  assert.equal(decoded.kind, "valid");
  if (decoded.kind === "valid") assert.deepEqual(decoded.table, withIqn);
  const bad = { ...without, volumes: [{ ...volume, access: [{ host: "h1", partition: undefined, from: [], keyId, iqn: "Not-An-IQN" }] }] };
  assert.match(validateTable(bad).join("; "), /identity grant "h1": iqn .*capital letters/);
});

test("ACCESS_IQN_BYTES_TABLE_MAX: initiator names are bounded per table, with a 400 that says how to proceed", async () => {
  const longIqn = (i: number): string => {
    const head = `iqn.2026-12.org.example:${i}-`;
    return head + "x".repeat(ISCSI_NAME_BYTES_MAX - head.length);
  };
  const keys = Array.from({ length: ACCESS_PER_VOLUME_MAX }, () => hex(randomBytes(32)));
  const perVolume = ACCESS_PER_VOLUME_MAX * ISCSI_NAME_BYTES_MAX;
  const fitting = Math.floor(ACCESS_IQN_BYTES_TABLE_MAX / perVolume);
  let refused: { status: number; json: Record<string, unknown> } | undefined;
  for (let v = 0; v <= fitting; v++) {
    const name = `many${v}`;
    await manager.create(name, MIB);
    const grants = keys.map((key, h) => ({ host: `h${h}`, key, iqn: longIqn(v * ACCESS_PER_VOLUME_MAX + h) }));
    const r = await call("PUT", `/v1/volumes/${name}/grants`, { grants });
    if (v < fitting) assert.equal(r.status, 200, `volume ${v}: ${JSON.stringify(r.json).slice(0, 300)}`);
    else refused = r;
  }
  assert.ok(refused !== undefined);
  assert.equal(refused.status, 400);
  const error = refused.json["error"] as { field: string; message: string };
  assert.equal(error.field, "grants");
  assert.match(error.message, /ACCESS_IQN_BYTES_TABLE_MAX=65536: revoke iSCSI grants .* or place the volume on another unit/);
  // The unit still serves and still loads.
  await stopAll();
  await startAll();
  assert.equal(manager.volume(`many${fitting - 1}`)?.access.length, ACCESS_PER_VOLUME_MAX);
  assert.equal(manager.volume(`many${fitting}`)?.access.length, 0);
});
