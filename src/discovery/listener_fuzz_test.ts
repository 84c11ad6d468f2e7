// What this proves: hostile datagrams at the station's DiscoveryListener
// change nothing and are each counted exactly once. After a real unit agent
// has joined (in-memory wire, ManualClock), fast-check throws at the listener
// random bytes, mutations and truncations of authentic datagrams, authentic
// datagrams replayed, re-signed ones with a wrong key, fragments claiming
// more than FRAGMENTS_PER_MESSAGE_MAX, and oversize datagrams: the listener
// never throws, emits only packet_rejected events, keeps every unit exactly
// as it was, and its rejected counters grow by one per datagram.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import fc from "fast-check";
import { ManualClock, seededRandom } from "../util/clock.ts";
import { DiscoveryListener, type DiscoveryEvent } from "./station_listener.ts";
import { StationAgent } from "./unit_agent.ts";
import { SimNetwork } from "./sim_network.ts";
import { sampleStorageInfo } from "./sample_info.ts";
import { DEFAULT_LIVENESS_TIMERS } from "./timers.ts";
import { FRAGMENTS_PER_MESSAGE_MAX, TAG_BYTES } from "./messages.ts";
import type { Address } from "./transport.ts";

const STATION: Address = { host: "10.0.0.1", port: 4000 };
const UNIT: Address = { host: "10.0.0.2", port: 5000 };
const ATTACKER: Address = { host: "10.6.6.6", port: 666 };

test("fuzzed datagrams: never throw, never change a unit, each counted once", async () => {
  const seed = 4242;
  console.log(`seed ${seed}`);
  const clock = new ManualClock();
  const random = seededRandom(seed);
  const net = new SimNetwork({ clock, random, faults: { lossRatio: 0, duplicateRatio: 0, delayMsMin: 1, delayMsMax: 1 } });
  const key = randomBytes(32);
  let listener: DiscoveryListener | undefined;
  const captured: Buffer[] = [];
  const socket = net.attach(STATION, (bytes, from) => {
    if (from.host === UNIT.host) captured.push(Buffer.from(bytes));
    listener?.handleDatagram(bytes, from);
  });
  listener = new DiscoveryListener({ clusterKey: key, clock, random, timers: DEFAULT_LIVENESS_TIMERS, socket });
  const events: DiscoveryEvent[] = [];
  listener.subscribe((e) => events.push(e));
  let agent: StationAgent | undefined;
  const unitSocket = net.attach(UNIT, (bytes, from) => agent?.handleDatagram(bytes, from));
  agent = new StationAgent({
    unitName: "victim",
    station: STATION,
    clusterKey: key,
    storageInfo: () => sampleStorageInfo("victim", { volumeCount: 300 }),
    clock,
    random,
    socket: unitSocket,
  });
  await agent.start();
  for (let i = 0; i < 300; i++) {
    clock.advance(10);
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.equal(listener.unit("victim")?.state, "online");
  assert.ok(captured.some((b) => b[5] === 3 && b.readUInt16BE(34) > 1), "a multi-fragment STORAGE_INFO was captured");
  // Freeze the unit: from now on only the attacker speaks (no clock movement, so no timers fire).
  net.cut.add(`${UNIT.host}:${UNIT.port}`);
  const frozen = JSON.stringify(listener.units());
  const eventsBefore = events.length;
  const totalRejected = (): number => Object.values(listener?.stats().rejected ?? {}).reduce((a, b) => a + b, 0);

  const authentic = fc.constantFrom(...captured);
  const resign = (bytes: Buffer, signingKey: Buffer): Buffer => {
    const copy = Buffer.from(bytes);
    const body = copy.subarray(0, copy.length - TAG_BYTES);
    createHmac("sha256", signingKey).update(body).digest().copy(copy, body.length);
    return copy;
  };
  const hostile = fc.oneof(
    fc.uint8Array({ maxLength: 1500, size: "max" }).map((b) => Buffer.from(b)),
    authentic, // replayed as is
    fc.tuple(authentic, fc.nat(), fc.integer({ min: 1, max: 255 })).map(([b, at, x]) => {
      const copy = Buffer.from(b);
      const i = at % copy.length;
      copy[i] = (copy[i] ?? 0) ^ x;
      return copy;
    }),
    fc.tuple(authentic, fc.nat()).map(([b, cut]) => b.subarray(0, cut % b.length)),
    authentic.map((b) => resign(b, randomBytes(32))),
    authentic.map((b) => {
      const copy = Buffer.from(b);
      copy.writeUInt16BE(FRAGMENTS_PER_MESSAGE_MAX + 1 + (copy[0] ?? 0), 34);
      return copy;
    }),
    authentic.map((b) => Buffer.concat([b, Buffer.alloc(1300 - b.length + 1)])),
  );
  let sent = 0;
  const before = totalRejected();
  fc.assert(
    fc.property(hostile, (bytes) => {
      net.inject(bytes, ATTACKER, STATION);
      sent += 1;
    }),
    { numRuns: 3000, seed },
  );
  assert.equal(totalRejected() - before, sent, "every hostile datagram counted exactly once");
  assert.equal(JSON.stringify(listener.units()), frozen, "no unit changed");
  const after = events.slice(eventsBefore);
  assert.equal(after.length, sent);
  assert.ok(after.every((e) => e.kind === "packet_rejected"));
  console.log(`rejected by reason: ${JSON.stringify(Object.fromEntries(Object.entries(listener.stats().rejected).filter(([, n]) => n > 0)))}`);
  await agent.abort();
  await listener.close();
});
