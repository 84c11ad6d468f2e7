// What this proves: the whole protocol (the real DiscoveryListener and real
// StationAgents; only the wire is simulated by SimNetwork, under a ManualClock)
// builds the pool the seed's Fig. 3 describes, and keeps it right on a bad
// network. With 30% loss, 10% duplication and reordering, every unit joins and
// the station ends up with exactly each unit's reported volumes (several seeds;
// the seed is printed). A unit that goes silent turns suspect after
// suspectAfterMs and offline after offlineAfterMs, and is back online at its
// next heartbeat; a clean stop marks it down at once; a restarted station
// rebuilds its view from heartbeats (it asks for storage info); a changed
// table is pushed with a higher generation; replayed, forged and truncated
// datagrams are counted by reason and change nothing.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { ManualClock, seededRandom } from "../util/clock.ts";
import { DiscoveryListener, type DiscoveryEvent } from "./station_listener.ts";
import { StationAgent } from "./unit_agent.ts";
import { SimNetwork, PERFECT_LINK, type LinkFaults } from "./sim_network.ts";
import { sampleStorageInfo } from "./sample_info.ts";
import { DEFAULT_BACKOFF, DEFAULT_LIVENESS_TIMERS } from "./timers.ts";
import { MESSAGE_TYPE, type StorageInfo } from "./messages.ts";
import type { Address } from "./transport.ts";

const STATION: Address = { host: "10.0.0.1", port: 4000 };
const TIMERS = DEFAULT_LIVENESS_TIMERS; // 1 s heartbeat, suspect 3 s, offline 10 s

function keyFor(seed: number): Buffer {
  return createHash("sha256").update(`cluster-${seed}`).digest();
}

class World {
  readonly clock = new ManualClock();
  readonly net: SimNetwork;
  readonly key: Buffer;
  readonly events: DiscoveryEvent[] = [];
  readonly infos = new Map<string, StorageInfo>();
  readonly agents = new Map<string, StationAgent>();
  listener!: DiscoveryListener;
  private readonly random: () => number;

  constructor(seed: number, faults: LinkFaults) {
    this.random = seededRandom(seed);
    this.net = new SimNetwork({ clock: this.clock, random: this.random, faults });
    this.key = keyFor(seed);
    this.startStation();
  }

  startStation(): void {
    let listener: DiscoveryListener | undefined;
    const socket = this.net.attach(STATION, (bytes, from) => listener?.handleDatagram(bytes, from));
    listener = new DiscoveryListener({
      clusterKey: this.key,
      clock: this.clock,
      random: this.random,
      timers: TIMERS,
      backoff: DEFAULT_BACKOFF,
      socket,
    });
    listener.subscribe((event) => this.events.push(event));
    this.listener = listener;
  }

  async startUnit(name: string, volumeCount: number, host: string): Promise<StationAgent> {
    this.infos.set(name, sampleStorageInfo(name, { volumeCount, nbd: { host, port: 10809 } }));
    let agent: StationAgent | undefined;
    const socket = this.net.attach({ host, port: 5000 }, (bytes, from) => agent?.handleDatagram(bytes, from));
    agent = new StationAgent({
      unitName: name,
      station: STATION,
      clusterKey: this.key,
      storageInfo: () => this.infos.get(name) as StorageInfo,
      clock: this.clock,
      random: this.random,
      backoff: DEFAULT_BACKOFF,
      socket,
    });
    this.agents.set(name, agent);
    await agent.start();
    return agent;
  }

  /** Advances simulated time in steps, letting promises settle in between. */
  async run(ms: number, stepMs = 5): Promise<void> {
    for (let t = 0; t < ms; t += stepMs) {
      this.clock.advance(stepMs);
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  /** Runs until `predicate` holds; returns the simulated ms it took. */
  async runUntil(predicate: () => boolean, limitMs: number, stepMs = 5): Promise<number> {
    const start = this.clock.nowMs();
    while (!predicate()) {
      assert.ok(this.clock.nowMs() - start < limitMs, `condition not met within ${limitMs} ms (simulated)`);
      await this.run(stepMs, stepMs);
    }
    return this.clock.nowMs() - start;
  }

  lastInfo(unit: string): StorageInfo | undefined {
    for (let i = this.events.length - 1; i >= 0; i--) {
      const e = this.events[i];
      if (e?.kind === "unit_storage_info" && e.unit === unit) return e.info;
    }
    return undefined;
  }

  states(unit: string): string[] {
    return this.events.flatMap((e) => (e.kind === "unit_state" && e.unit === unit ? [e.state] : []));
  }
}

test("perfect network: startup -> need storage info -> storage info, in a few round trips", async () => {
  const world = new World(1, { ...PERFECT_LINK, delayMsMin: 1, delayMsMax: 1 });
  await world.startUnit("alpha", 3, "10.0.0.2");
  const ms = await world.runUntil(() => world.lastInfo("alpha") !== undefined, 1000, 1);
  assert.ok(ms <= 10, `visible after ${ms} ms`);
  assert.deepEqual(world.lastInfo("alpha"), world.infos.get("alpha"));
  const kinds = world.events.map((e) => e.kind);
  assert.deepEqual(kinds, ["unit_startup", "unit_state", "unit_storage_info"]);
  assert.equal(world.agents.get("alpha")?.state, "joined");
  assert.equal(world.listener.unit("alpha")?.state, "online");
});

for (const seed of [11, 22, 33, 44]) {
  test(`lossy network (seed ${seed}): 30% loss, 10% duplicates, reordering; every unit joins with exactly its volumes`, async () => {
    console.log(`seed ${seed}`);
    const world = new World(seed, { lossRatio: 0.3, duplicateRatio: 0.1, delayMsMin: 0, delayMsMax: 40 });
    const names = Array.from({ length: 12 }, (_, i) => `unit-${i}`);
    // 400 volumes: storage info spans several fragments.
    for (const [i, name] of names.entries()) await world.startUnit(name, i % 2 === 0 ? 400 : 5, `10.0.1.${i + 1}`);
    const ms = await world.runUntil(() => names.every((n) => world.lastInfo(n) !== undefined), 60_000, 20);
    console.log(`seed ${seed}: all ${names.length} units visible after ${ms} ms simulated; network ${JSON.stringify({ sent: world.net.sent, dropped: world.net.dropped, duplicated: world.net.duplicated })}`);
    for (const name of names) {
      assert.deepEqual(world.lastInfo(name), world.infos.get(name), name);
      assert.equal(world.listener.unit(name)?.state, "online");
    }
    // Every unit eventually learns it joined (an ACK or a NEED_STORAGE_INFO got through).
    await world.runUntil(() => names.every((n) => world.agents.get(n)?.state === "joined"), 60_000, 20);
    const stats = world.listener.stats();
    assert.equal(stats.rejected.bad_hmac, 0);
    assert.equal(Object.values(stats.rejected).reduce((a, b) => a + b, 0) - stats.rejected.replay, 0, JSON.stringify(stats.rejected));
    // Duplicated datagrams are the only replays.
    assert.ok(stats.rejected.replay <= world.net.duplicated);
  });
}

test("liveness: silent -> suspect -> offline at the documented timers; back online at its next heartbeat", async () => {
  const world = new World(2, { ...PERFECT_LINK, delayMsMin: 1, delayMsMax: 1 });
  await world.startUnit("alpha", 1, "10.0.0.2");
  await world.runUntil(() => world.lastInfo("alpha") !== undefined, 1000);
  await world.run(5000);
  assert.equal(world.listener.unit("alpha")?.state, "online", "heartbeats keep it online");
  // Cut the unit off (a crash, or a cable): no SHUTDOWN.
  world.net.cut.add("10.0.0.2:5000");
  const lastSeen = world.listener.unit("alpha")?.lastSeenMs ?? 0;
  await world.runUntil(() => world.listener.unit("alpha")?.state === "suspect", 20_000, 10);
  const suspectAfter = world.clock.nowMs() - lastSeen;
  assert.ok(suspectAfter > TIMERS.suspectAfterMs && suspectAfter <= TIMERS.suspectAfterMs + 600, `suspect after ${suspectAfter} ms`);
  await world.runUntil(() => world.listener.unit("alpha")?.state === "offline", 20_000, 10);
  const offlineAfter = world.clock.nowMs() - lastSeen;
  assert.ok(offlineAfter > TIMERS.offlineAfterMs && offlineAfter <= TIMERS.offlineAfterMs + 600, `offline after ${offlineAfter} ms`);
  world.net.cut.delete("10.0.0.2:5000");
  const backAfter = await world.runUntil(() => world.listener.unit("alpha")?.state === "online", 5000, 10);
  assert.ok(backAfter <= TIMERS.heartbeatIntervalMs + 20, `back after ${backAfter} ms`);
  assert.deepEqual(world.states("alpha"), ["online", "suspect", "offline", "online"]);
});

test("clean stop: SHUTDOWN is acknowledged and the unit is down at once; a restart brings it back", async () => {
  const world = new World(3, { ...PERFECT_LINK, delayMsMin: 1, delayMsMax: 1 });
  const agent = await world.startUnit("alpha", 2, "10.0.0.2");
  await world.runUntil(() => world.lastInfo("alpha") !== undefined, 1000);
  const stopping = agent.stop();
  await world.run(10, 1);
  assert.equal(await stopping, true, "SHUTDOWN acknowledged");
  assert.equal(world.listener.unit("alpha")?.state, "down");
  await world.run(15_000, 50);
  assert.equal(world.listener.unit("alpha")?.state, "down", "a down unit is not swept to offline");
  await world.startUnit("alpha", 3, "10.0.0.2");
  await world.runUntil(() => world.lastInfo("alpha")?.volumes.length === 3, 1000);
  assert.deepEqual(world.states("alpha"), ["online", "down", "online"]);
  assert.equal(world.events.filter((e) => e.kind === "unit_startup").length, 2);
});

test("station restart: heartbeats from units it does not know make it ask, and the pool rebuilds itself", async () => {
  const world = new World(4, { ...PERFECT_LINK, delayMsMin: 1, delayMsMax: 3 });
  for (const name of ["a", "b", "c"]) await world.startUnit(name, 4, `10.0.2.${name.charCodeAt(0)}`);
  await world.runUntil(() => ["a", "b", "c"].every((n) => world.lastInfo(n) !== undefined), 1000);
  await world.listener.close();
  await world.run(2000);
  world.events.length = 0;
  world.startStation();
  const ms = await world.runUntil(() => ["a", "b", "c"].every((n) => world.lastInfo(n) !== undefined), 5000);
  assert.ok(ms <= TIMERS.heartbeatIntervalMs + 50, `rebuilt after ${ms} ms`);
  for (const n of ["a", "b", "c"]) assert.deepEqual(world.lastInfo(n), world.infos.get(n));
  assert.ok(world.events.some((e) => e.kind === "unit_startup" && e.reason === "heartbeat"));
});

test("a changed table is pushed with a higher generation; the station asks again if a push is lost", async () => {
  const world = new World(5, { ...PERFECT_LINK, delayMsMin: 1, delayMsMax: 1 });
  const agent = await world.startUnit("alpha", 2, "10.0.0.2");
  await world.runUntil(() => world.lastInfo("alpha") !== undefined, 1000);
  world.infos.set("alpha", sampleStorageInfo("alpha", { volumeCount: 5, nbd: { host: "10.0.0.2", port: 10809 } }));
  agent.notifyChanged();
  await world.runUntil(() => world.lastInfo("alpha")?.volumes.length === 5, 1000);
  const generations = world.events.flatMap((e) => (e.kind === "unit_storage_info" ? [e.generation] : []));
  assert.deepEqual(generations, [1, 2]);
  // Lose every STORAGE_INFO for longer than a whole retransmission round: the unit's heartbeats
  // carry generation 3, the station holds 2, and after two such heartbeats it asks (NEED_STORAGE_INFO).
  world.net.dropIf = (bytes) => bytes[5] === MESSAGE_TYPE.STORAGE_INFO;
  world.infos.set("alpha", sampleStorageInfo("alpha", { volumeCount: 7, nbd: { host: "10.0.0.2", port: 10809 } }));
  const asksBefore = world.net.sentByType.get(MESSAGE_TYPE.NEED_STORAGE_INFO) ?? 0;
  agent.notifyChanged();
  await world.run(15_000, 20);
  const asks = (world.net.sentByType.get(MESSAGE_TYPE.NEED_STORAGE_INFO) ?? 0) - asksBefore;
  assert.ok(asks >= 1, `station asked ${asks} times`);
  assert.equal(world.lastInfo("alpha")?.volumes.length, 5, "nothing got through yet");
  world.net.dropIf = null;
  await world.runUntil(() => world.lastInfo("alpha")?.volumes.length === 7, 10_000);
});

test("replayed, forged and truncated datagrams are counted and change nothing", async () => {
  const world = new World(6, { ...PERFECT_LINK, delayMsMin: 1, delayMsMax: 1 });
  const captured: { bytes: Buffer; from: Address }[] = [];
  const agent = await world.startUnit("alpha", 2, "10.0.0.2");
  await world.runUntil(() => world.lastInfo("alpha") !== undefined, 1000);
  await world.run(1500);
  // Capture what a sniffer would: this unit's next heartbeat, then its SHUTDOWN.
  const original = world.listener.handleDatagram.bind(world.listener);
  world.listener.handleDatagram = (bytes: Buffer, from: Address) => {
    captured.push({ bytes: Buffer.from(bytes), from });
    original(bytes, from);
  };
  await world.run(1100);
  const stopping = agent.stop();
  await world.run(10, 1);
  assert.equal(await stopping, true);
  world.listener.handleDatagram = original;
  assert.equal(world.listener.unit("alpha")?.state, "down");
  const before = { events: world.events.length, unit: world.listener.unit("alpha") };

  const attacker: Address = { host: "10.6.6.6", port: 666 };
  for (const { bytes } of captured) world.net.inject(bytes, attacker, STATION); // replay heartbeat + shutdown
  const forged = Buffer.from(captured[0]?.bytes ?? Buffer.alloc(0));
  forged[forged.length - 1] = (forged[forged.length - 1] ?? 0) ^ 1;
  world.net.inject(forged, attacker, STATION);
  world.net.inject((captured[0]?.bytes ?? Buffer.alloc(0)).subarray(0, 50), attacker, STATION);
  world.net.inject(Buffer.alloc(1500, 0x41), attacker, STATION);
  world.net.inject(Buffer.from("hello"), attacker, STATION);

  const stats = world.listener.stats();
  assert.ok(captured.length >= 2);
  assert.equal(stats.rejected.replay, captured.length);
  assert.equal(stats.rejected.bad_hmac, 1);
  assert.equal(stats.rejected.truncated, 2);
  assert.equal(stats.rejected.too_large, 1);
  assert.deepEqual(world.listener.unit("alpha"), before.unit, "unit state unchanged");
  const after = world.events.slice(before.events);
  assert.ok(after.every((e) => e.kind === "packet_rejected"), JSON.stringify(after.map((e) => e.kind)));
  assert.equal(after.length, captured.length + 4);
  assert.match(world.listener.metricsText(), /ipsan_discovery_packets_rejected_total\{reason="replay"\} [1-9]/);
});
