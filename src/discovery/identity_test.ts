// Unit identities at the protocol level (issue 7), in process: the new wire
// pieces (STARTUP with an id, ENROL, REFUSE, the UNIT_KEY flag), the sealing
// of a unit's secret (bound to name, id and epoch), and the listener and agent
// over an in-memory network: enrolment, a second id refused without touching
// the first unit's record, cluster-key datagrams refused once enrolled, and a
// rotation that loses no datagram. The real processes are in
// src/e2e/unit_identity_test.ts.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { ManualClock, seededRandom } from "../util/clock.ts";
import { decodeEnrol, decodeFrame, decodeRefuse, decodeStartup, encodeEnrol, encodeFrame, encodeRefuse, encodeShutdown, encodeStartup } from "./codec.ts";
import { UnitIdentities } from "./identities.ts";
import { enrolKeyFor, openUnitSecret, packetKeyFor, rotateKeyFor, sealUnitSecret, unitPacketKeyFor } from "./keys.ts";
import { MESSAGE_TYPE, type FrameFields } from "./messages.ts";
import { sampleStorageInfo } from "./sample_info.ts";
import { SimNetwork } from "./sim_network.ts";
import { DiscoveryListener, type DiscoveryEvent } from "./station_listener.ts";
import { StationAgent, type AgentEvent } from "./unit_agent.ts";
import { UnitCredentials, type StoredUnitSecret } from "./unit_identity.ts";

const ID_A = "0b6f3c1e-8d4a-4f3b-9c2d-1a2b3c4d5e6f";
const ID_B = "7e1d2c3b-4a59-4867-b5a4-93827160f5e4";

test("wire: STARTUP carries an id (24 bytes) or none (8, units before issue 7); ENROL and REFUSE round-trip", () => {
  assert.deepEqual(decodeStartup(encodeStartup({ generation: 7, unitId: ID_A })), { kind: "ok", value: { generation: 7, unitId: ID_A } });
  assert.deepEqual(decodeStartup(encodeStartup({ generation: 7 })), { kind: "ok", value: { generation: 7 } });
  assert.equal(encodeStartup({ generation: 1, unitId: ID_A }).length, 24);
  assert.equal(decodeStartup(Buffer.alloc(24)).kind, "invalid", "an all-zero id is refused");
  const box = { nonce: randomBytes(12), sealed: randomBytes(32), tag: randomBytes(16) };
  assert.deepEqual(decodeEnrol(encodeEnrol({ epoch: 3, unitId: ID_B, ...box })), { kind: "ok", value: { epoch: 3, unitId: ID_B, ...box } });
  const refused = decodeRefuse(encodeRefuse({ code: 1, message: "no\u0007 way ".repeat(100) }));
  assert.ok(refused.kind === "ok");
  assert.ok(refused.value.message.length <= 400 && !refused.value.message.includes("\u0007"), "cut to fit, control characters replaced");
});

test("wire: the UNIT_KEY flag chooses the keys offered; a flipped flag or another unit's key fails the tag", () => {
  const clusterPacket = packetKeyFor(randomBytes(32));
  const unitKey = unitPacketKeyFor(randomBytes(32));
  const fields: FrameFields = {
    type: MESSAGE_TYPE.SHUTDOWN, fromStation: false, unitName: "u1", sessionId: "0011223344556677", sequence: 1, messageId: 1,
    timestampMs: 1, fragmentIndex: 0, fragmentCount: 1, payload: encodeShutdown(0), unitKey: true,
  };
  const bytes = encodeFrame(fields, unitKey);
  const offered: string[] = [];
  const select = (name: string, flagged: boolean): Buffer[] => {
    offered.push(`${name}:${flagged}`);
    return flagged ? [randomBytes(32), unitKey] : [clusterPacket];
  };
  const decoded = decodeFrame(bytes, select);
  assert.ok(decoded.kind === "frame" && decoded.frame.unitKey && decoded.frame.keyIndex === 1);
  assert.deepEqual(offered, ["u1:true"]);
  assert.deepEqual(decodeFrame(bytes, () => []), { kind: "invalid", reason: "unknown_unit", detail: "no secret known for unit u1" });
  assert.equal(decodeFrame(encodeFrame({ ...fields, unitKey: false }, unitKey), select).kind, "invalid", "signed with the unit key but flagged cluster");
});

test("sealing: the secret opens only with the same key, name, id and epoch", () => {
  const clusterKey = randomBytes(32);
  const secret = randomBytes(32);
  const binding = { unitName: "u1", unitId: ID_A, epoch: 1 };
  const box = sealUnitSecret(enrolKeyFor(clusterKey), binding, secret);
  assert.deepEqual(openUnitSecret(enrolKeyFor(clusterKey), binding, box), secret);
  assert.equal(openUnitSecret(enrolKeyFor(randomBytes(32)), binding, box), null);
  assert.equal(openUnitSecret(enrolKeyFor(clusterKey), { ...binding, unitName: "u2" }, box), null);
  assert.equal(openUnitSecret(enrolKeyFor(clusterKey), { ...binding, unitId: ID_B }, box), null);
  assert.equal(openUnitSecret(enrolKeyFor(clusterKey), { ...binding, epoch: 2 }, box), null);
  assert.equal(openUnitSecret(rotateKeyFor(secret), binding, box), null);
});

interface SimUnit {
  agent: StationAgent;
  credentials: UnitCredentials;
  saved: StoredUnitSecret[];
  events: AgentEvent[];
}

function simBed(): { clock: ManualClock; net: SimNetwork; clusterKey: Buffer; identities: UnitIdentities; listener: DiscoveryListener; events: DiscoveryEvent[]; unit(name: string, unitId: string, port: number): SimUnit } {
  const clock = new ManualClock(1_700_000_000_000);
  const net = new SimNetwork({ clock, random: seededRandom(7) });
  const clusterKey = randomBytes(32);
  const identities = new UnitIdentities({ nowMs: () => clock.nowMs() });
  let listener: DiscoveryListener | undefined;
  const stationSocket = net.attach({ host: "10.0.0.1", port: 9 }, (bytes, from) => listener?.handleDatagram(bytes, from));
  listener = new DiscoveryListener({ clusterKey, identities, clock, socket: stationSocket, random: () => 0.5 });
  const events: DiscoveryEvent[] = [];
  listener.subscribe((event) => events.push(event));
  return {
    clock, net, clusterKey, identities, listener, events,
    unit(name, unitId, port) {
      const saved: StoredUnitSecret[] = [];
      const credentials = new UnitCredentials({ unitName: name, unitId, clusterKey, stored: null, clock, save: async (s) => void saved.push(s) });
      let agent: StationAgent | undefined;
      const socket = net.attach({ host: "10.0.1.1", port }, (bytes, from) => agent?.handleDatagram(bytes, from));
      agent = new StationAgent({
        unitName: name, station: { host: "10.0.0.1", port: 9 }, clusterKey, clock, random: () => 0.5, socket,
        storageInfo: () => sampleStorageInfo(name, { volumeCount: 2, nbd: { host: "10.0.1.1", port: 10809 } }), credentials,
      });
      const events: AgentEvent[] = [];
      agent.subscribe((event) => events.push(event));
      return { agent, credentials, saved, events };
    },
  };
}

async function run(clock: ManualClock, ms: number): Promise<void> {
  for (let t = 0; t < ms; t += 10) {
    clock.advance(10);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

test("listener and agent: enrolment, an impostor refused without touching the unit, cluster-key datagrams refused, a rotation losing nothing", async () => {
  const bed = simBed();
  const a = bed.unit("u1", ID_A, 100);
  await a.agent.start();
  await run(bed.clock, 2_000);
  assert.equal(a.agent.state, "joined");
  assert.equal(a.saved.length, 1, "the secret was stored");
  assert.equal(a.credentials.enrolled, true);
  assert.deepEqual([bed.identities.get("u1")?.unitId, bed.identities.get("u1")?.confirmed], [ID_A, true]);
  assert.ok(bed.events.some((e) => e.kind === "unit_storage_info" && e.unit === "u1"));
  const before = bed.listener.unit("u1");

  // An impostor: same name, another id, the cluster key.
  const b = bed.unit("u1", ID_B, 200);
  await b.agent.start();
  await run(bed.clock, 1_000);
  assert.notEqual(b.agent.state, "joined");
  assert.ok(b.events.some((e) => e.kind === "refused" && /enrolled with another identity/.test(e.message)));
  assert.ok(bed.events.some((e) => e.kind === "unit_identity" && e.action === "impostor" && e.unitId === ID_B));
  assert.equal(bed.listener.unit("u1")?.sessionId, before?.sessionId, "the known unit's session is untouched");
  assert.equal(bed.listener.unit("u1")?.state, "online");
  assert.equal(bed.identities.get("u1")?.unitId, ID_A);
  await b.agent.abort();

  // A datagram signed with the cluster key in u1's name: refused.
  const rejected = bed.listener.stats().rejected.unit_key_required;
  bed.listener.handleDatagram(encodeFrame({
    type: MESSAGE_TYPE.SHUTDOWN, fromStation: false, unitName: "u1", sessionId: "ffeeddccbbaa9988", sequence: 1, messageId: 1,
    timestampMs: bed.clock.nowMs() + 1_000, fragmentIndex: 0, fragmentCount: 1, payload: encodeShutdown(0),
  }, packetKeyFor(bed.clusterKey)), { host: "10.0.9.9", port: 1 });
  assert.equal(bed.listener.stats().rejected.unit_key_required, rejected + 1);
  assert.equal(bed.listener.unit("u1")?.state, "online");

  // Rotation: the unit switches at its next datagram; no datagram of it is rejected on the way.
  const rejectedBefore = Object.values(bed.listener.stats().rejected).reduce((x, y) => x + y, 0);
  const agentRejectedBefore = Object.values(a.agent.stats().rejected).reduce((x, y) => x + y, 0);
  assert.ok(bed.listener.rotateSecret("u1") !== undefined);
  await run(bed.clock, 1_000);
  assert.deepEqual([bed.identities.get("u1")?.epoch, bed.identities.get("u1")?.next], [2, null]);
  assert.equal(a.saved.length, 2);
  assert.equal(a.saved[1]?.epoch, 2);
  assert.equal(Object.values(bed.listener.stats().rejected).reduce((x, y) => x + y, 0), rejectedBefore, "the station rejected nothing");
  assert.equal(Object.values(a.agent.stats().rejected).reduce((x, y) => x + y, 0), agentRejectedBefore, "the unit rejected nothing");
  assert.equal(bed.listener.unit("u1")?.state, "online");
  await a.agent.abort();
  await bed.listener.close();
});

test("identities: first enrolments are written together, ENROL waits for the write; a failed write forgets them", async () => {
  const writes: string[][] = [];
  let fail = false;
  const identities = new UnitIdentities({
    persistence: {
      load: () => [],
      save: (identity) => void writes.push([`save ${identity.name}`]),
      saveMany: (batch) => {
        if (fail) throw new Error("disk full");
        writes.push(batch.map((i) => i.name));
      },
      remove: () => undefined,
    },
  });
  const sent: string[] = [];
  for (const name of ["a", "b", "c"]) {
    identities.enrol(name, ID_A);
    identities.whenDurable(name, () => sent.push(name));
  }
  assert.deepEqual([writes, sent], [[], []], "nothing leaves before the write");
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(writes, [["a", "b", "c"]], "one transaction for the burst");
  assert.deepEqual(sent, ["a", "b", "c"]);
  identities.whenDurable("a", () => sent.push("a again"));
  assert.equal(sent.at(-1), "a again", "at once when nothing is waiting");
  fail = true;
  identities.enrol("d", ID_B);
  identities.whenDurable("d", () => sent.push("d"));
  await new Promise((resolve) => setImmediate(resolve));
  assert.equal(identities.get("d"), undefined, "not on disk: not enrolled");
  assert.ok(!sent.includes("d"), "its ENROL never left");
});
