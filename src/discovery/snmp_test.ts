// What this proves: the SNMPv2c trap decoder is total and bounded (random
// bytes, every prefix and every bit flip of a real trap never throw; a length
// lie, an indefinite length, too many varbinds and oversize strings are
// rejected with named reasons), and the real net-snmp `snmptrap` drives the
// station: coldStart/warmStart = startup, linkDown = shutdown, linkUp = back,
// a wrong community and an SNMPv1 trap are counted as rejected. End to end,
// a coldStart trap from snmptrap makes the station fetch the unit's storage
// info: over the control API (GET /v1/info with the derived token) for a real
// `ipsan unit` that only the trap announced, and over the discovery protocol
// (NEED_STORAGE_INFO) for a real unit that joined with --station; linkDown
// then marks the unit down.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import fc from "fast-check";
import { decodeTrap, SnmpTrapListener, OID, SNMP_VARBINDS_MAX, type SnmpEvent } from "./snmp.ts";
import { attachSnmp } from "./snmp_join.ts";
import { DiscoveryListener, type DiscoveryEvent } from "./station_listener.ts";
import { controlTokenFor, loadOrCreateClusterKey } from "./keys.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { run, waitFor } from "../testing/process.ts";

/** A coldStart trap as net-snmp 5.9 `snmptrap -v 2c -c public` sends it (sysName.0 = "u1", ipsanUnitControl.0 = "127.0.0.1:8080"). */
const REAL_TRAP = Buffer.from(
  "307402010104067075626c6963a76702045491b6240201000201003059300f06082b060102010103004303030b193017060a2b06010603010104010006092b0601060301010501300e06082b0601020101050004027531301d060b2b0601040181fd59010200040e3132372e302e302e313a38303830",
  "hex",
);

const COMMUNITY = "s3cret-community";
const tmp = makeTempDir("snmp");
const units: RunningUnit[] = [];
after(async () => {
  for (const unit of units) await unit.close().catch(() => undefined);
  tmp.remove();
});

test("decoder: the real trap decodes to its varbinds", () => {
  const result = decodeTrap(REAL_TRAP);
  assert.equal(result.kind, "trap");
  if (result.kind !== "trap") return;
  assert.equal(result.trap.community.toString(), "public");
  assert.deepEqual(
    result.trap.varbinds.map((v) => v.oid),
    [OID.sysUpTime0, OID.snmpTrapOid0, OID.sysName0, OID.ipsanUnitControl0],
  );
  assert.deepEqual(result.trap.varbinds[1]?.value, { type: "oid", value: OID.coldStart });
});

test("decoder: random bytes, prefixes and bit flips never throw", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 600, size: "max" }), (bytes) => {
      decodeTrap(bytes);
    }),
    { numRuns: 2000 },
  );
  for (let length = 0; length < REAL_TRAP.length; length++) assert.equal(decodeTrap(REAL_TRAP.subarray(0, length)).kind, "invalid");
  for (let bit = 0; bit < REAL_TRAP.length * 8; bit++) {
    const copy = Buffer.from(REAL_TRAP);
    copy[bit >> 3] = (copy[bit >> 3] ?? 0) ^ (1 << (bit & 7));
    decodeTrap(copy); // may still decode (e.g. a changed community byte); must not throw
  }
  // Random edits inside a real trap's structure.
  fc.assert(
    fc.property(fc.nat({ max: REAL_TRAP.length - 1 }), fc.integer({ min: 0, max: 255 }), (at, value) => {
      const copy = Buffer.from(REAL_TRAP);
      copy[at] = value;
      decodeTrap(copy);
    }),
    { numRuns: 3000 },
  );
});

test("decoder: named reasons for length lies, indefinite lengths, oversize and too many varbinds", () => {
  const lie = Buffer.from(REAL_TRAP);
  lie[1] = 0x7f; // message claims more bytes than there are
  const lieResult = decodeTrap(lie);
  assert.equal(lieResult.kind === "invalid" && lieResult.reason, "truncated");
  const indefinite = Buffer.from(REAL_TRAP);
  indefinite[1] = 0x80;
  assert.match(JSON.stringify(decodeTrap(indefinite)), /indefinite/);
  const huge = Buffer.from(REAL_TRAP);
  huge[1] = 0x85;
  assert.equal((decodeTrap(huge) as { reason?: string }).reason, "too_large");
  assert.equal((decodeTrap(Buffer.alloc(5000)) as { reason?: string }).reason, "too_large");
  // Build a trap with too many varbinds: sysUpTime, trapOID, then NULL varbinds.
  const varbind = Buffer.from("300806042b060101" + "0500", "hex"); // OID 1.3.6.1.1 = NULL
  const head = REAL_TRAP.subarray(REAL_TRAP.indexOf(Buffer.from("300f06082b", "hex")), REAL_TRAP.indexOf(Buffer.from("300e06082b0601020101050004", "hex")));
  const body = Buffer.concat([head, ...Array.from({ length: SNMP_VARBINDS_MAX }, () => varbind)]);
  const wrap = (tag: number, content: Buffer): Buffer => {
    const length = content.length < 128 ? Buffer.from([content.length]) : Buffer.from([0x82, content.length >> 8, content.length & 0xff]);
    return Buffer.concat([Buffer.from([tag]), length, content]);
  };
  const pdu = wrap(0xa7, Buffer.concat([Buffer.from("020101020100020100", "hex"), wrap(0x30, body)]));
  const message = wrap(0x30, Buffer.concat([Buffer.from("020101", "hex"), wrap(0x04, Buffer.from("public")), pdu]));
  const many = decodeTrap(message);
  assert.equal(many.kind === "invalid" && many.reason, "too_large", JSON.stringify(many));
});

async function snmptrap(port: number, community: string, trapOid: string, varbinds: string[], version = "2c"): Promise<void> {
  const args =
    version === "1"
      ? ["-v", "1", "-c", community, `127.0.0.1:${port}`, "1.3.6.1.4.1.32473", "127.0.0.1", "0", "0", "", ...varbinds]
      : ["-v", "2c", "-c", community, `127.0.0.1:${port}`, "", trapOid, ...varbinds];
  const result = await run("snmptrap", args, { timeoutMs: 10_000, env: { SNMP_PERSISTENT_DIR: tmp.file("snmp-persist") } });
  assert.equal(result.code, 0, result.stderr);
}

test("real snmptrap: coldStart/warmStart/linkDown/linkUp; wrong community and v1 traps are rejected", async () => {
  const listener = new SnmpTrapListener({ community: COMMUNITY });
  const events: SnmpEvent[] = [];
  listener.subscribe((e) => events.push(e));
  const { port } = await listener.listen({ host: "127.0.0.1", port: 0 });
  try {
    await snmptrap(port, COMMUNITY, OID.coldStart, [OID.sysName0, "s", "unit-a"]);
    await snmptrap(port, COMMUNITY, OID.warmStart, [OID.ipsanUnitName0, "s", "unit-b", OID.ipsanUnitControl0, "s", "127.0.0.1:7000"]);
    await snmptrap(port, COMMUNITY, OID.linkDown, [OID.sysName0, "s", "unit-a"]);
    await snmptrap(port, COMMUNITY, OID.linkUp, [OID.sysName0, "s", "unit-a"]);
    await snmptrap(port, "wrong", OID.coldStart, [OID.sysName0, "s", "unit-a"]);
    await snmptrap(port, COMMUNITY, "1.3.6.1.6.3.1.1.5.5", []); // authenticationFailure: not ours
    await snmptrap(port, COMMUNITY, "", [], "1");
    await waitFor("7 datagrams", () => (listener.stats().received >= 7 ? true : undefined), { timeoutMs: 3000 });
    const meaningful = events.flatMap((e) => (e.kind === "startup" || e.kind === "shutdown" || e.kind === "back" ? [[e.kind, e.agentName, e.control]] : []));
    assert.deepEqual(meaningful, [
      ["startup", "unit-a", null],
      ["startup", "unit-b", { host: "127.0.0.1", port: 7000 }],
      ["shutdown", "unit-a", null],
      ["back", "unit-a", null],
    ]);
    assert.deepEqual(listener.stats().rejected, { bad_community: 1, bad_version: 1 });
    assert.equal(listener.stats().ignored, 1);
  } finally {
    await listener.close();
  }
});

test("end to end: snmptrap coldStart makes the station fetch storage info (control API for a trap-only unit, UDP for a joined one)", async () => {
  const keyFile = tmp.file("cluster.key");
  const key = await loadOrCreateClusterKey(keyFile);
  const discovery = new DiscoveryListener({ clusterKey: key, timers: { heartbeatIntervalMs: 200, suspectAfterMs: 800, offlineAfterMs: 3000 } });
  const station = await discovery.listen({ host: "127.0.0.1", port: 0 });
  const snmp = new SnmpTrapListener({ community: COMMUNITY });
  const snmpAddress = await snmp.listen({ host: "127.0.0.1", port: 0 });
  const detach = attachSnmp({ snmp, discovery, clusterKey: key });
  const events: DiscoveryEvent[] = [];
  discovery.subscribe((e) => events.push(e));
  try {
    // A unit that speaks only SNMP: its control token is provisioned as the station-derived one.
    const tokenFile = tmp.file("trap-only.token");
    writeFileSync(tokenFile, `${controlTokenFor(key, "traponly")}\n`, { mode: 0o600 });
    const trapOnly = await startUnit({
      name: "traponly",
      capacity: "32M",
      volumes: [{ name: "v1", size: "1M" }],
      control: true,
      extraArgs: ["--control-token-file", tokenFile],
    });
    units.push(trapOnly);
    const control = (trapOnly.controlUrl ?? "").replace("http://", "");
    await snmptrap(snmpAddress.port, COMMUNITY, OID.coldStart, [OID.ipsanUnitName0, "s", "traponly", OID.ipsanUnitControl0, "s", control]);
    const fetched = await waitFor(
      "storage info over the control API",
      () => events.find((e) => e.kind === "unit_storage_info" && e.unit === "traponly"),
      { timeoutMs: 5000 },
    );
    assert.equal(fetched.kind === "unit_storage_info" && fetched.source, "control_api");
    assert.deepEqual(fetched.kind === "unit_storage_info" && fetched.info.volumes.map((v) => v.name), ["v1"]);
    assert.equal(discovery.unit("traponly")?.state, "online");
    await snmptrap(snmpAddress.port, COMMUNITY, OID.linkDown, [OID.ipsanUnitName0, "s", "traponly"]);
    await waitFor("traponly down", () => (discovery.unit("traponly")?.state === "down" ? true : undefined), { timeoutMs: 3000 });

    // A unit joined over UDP: a warmStart trap naming it makes the station ask it over UDP again.
    const joined = await startUnit({
      name: "joined",
      capacity: "32M",
      volumes: [{ name: "w", size: "1M" }],
      control: true,
      extraArgs: ["--station", `${station.host}:${station.port}`, "--cluster-key-file", keyFile],
    });
    units.push(joined);
    await waitFor("joined info", () => events.find((e) => e.kind === "unit_storage_info" && e.unit === "joined"), { timeoutMs: 3000 });
    const before = events.filter((e) => e.kind === "unit_storage_info" && e.unit === "joined").length;
    await snmptrap(snmpAddress.port, COMMUNITY, OID.warmStart, [OID.sysName0, "s", "joined"]);
    const again = await waitFor(
      "joined info again",
      () => events.filter((e) => e.kind === "unit_storage_info" && e.unit === "joined")[before],
      { timeoutMs: 3000 },
    );
    assert.equal(again.kind === "unit_storage_info" && again.source, "discovery");
  } finally {
    detach();
    await snmp.close();
    await discovery.close();
  }
});
