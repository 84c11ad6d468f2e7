// Issue 11, the unit side, in process on the simulated network (the real
// StationAgent and DiscoveryListener; only the wire and the clock are
// simulated): a unit given two station names, of which the second does not
// resolve yet, joins the first; while the second name does not resolve, a
// station there never hears the unit (left out, not guessed); once it
// resolves, the unit's periodic re-resolution (RESOLVE_REFRESH_MS, 30 s)
// brings it in, and when the first station is cut off the second one, which
// shares its identities (the same state), has the unit online within one
// heartbeat, with no new enrolment and no refusal. A DNS failure of one name
// never stops the traffic to the others.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { ManualClock, seededRandom } from "../util/clock.ts";
import { UnitIdentities } from "./identities.ts";
import { sampleStorageInfo } from "./sample_info.ts";
import { SimNetwork } from "./sim_network.ts";
import { DiscoveryListener, type DiscoveryEvent } from "./station_listener.ts";
import { RESOLVE_REFRESH_MS, StationAgent, type AgentEvent } from "./unit_agent.ts";
import { UnitCredentials } from "./unit_identity.ts";
import { DEFAULT_LIVENESS_TIMERS } from "./timers.ts";

const UNIT_ID = "6a0f3c1e-2b4d-4c6e-8f10-123456789abc";

async function run(clock: ManualClock, ms: number): Promise<void> {
  for (let t = 0; t < ms; t += 10) {
    clock.advance(10);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

test("two station names: one that does not resolve is left out until it does; then the unit moves to it without a restart", async () => {
  const clock = new ManualClock(1_700_000_000_000);
  const net = new SimNetwork({ clock, random: seededRandom(11) });
  const clusterKey = randomBytes(32);
  // One state for both stations: the same identities (what etcd shares).
  const identities = new UnitIdentities({ nowMs: () => clock.nowMs() });
  const station = (host: string): { listener: DiscoveryListener; events: DiscoveryEvent[] } => {
    let listener: DiscoveryListener | undefined;
    const socket = net.attach({ host, port: 9 }, (bytes, from) => listener?.handleDatagram(bytes, from));
    listener = new DiscoveryListener({ clusterKey, identities, clock, socket, random: () => 0.5 });
    const events: DiscoveryEvent[] = [];
    listener.subscribe((event) => events.push(event));
    return { listener, events };
  };
  const s1 = station("10.0.0.1");

  let secondResolves = false;
  const lookups: string[] = [];
  const resolve = async (host: string): Promise<string> => {
    lookups.push(host);
    if (host === "s1.example") return "10.0.0.1";
    if (host === "s2.example" && secondResolves) return "10.0.0.2";
    throw new Error(`getaddrinfo ENOTFOUND ${host}`);
  };
  const credentials = new UnitCredentials({ unitName: "u1", unitId: UNIT_ID, clusterKey, stored: null, clock, save: async () => undefined });
  let agent: StationAgent | undefined;
  const socket = net.attach({ host: "10.0.1.1", port: 7000 }, (bytes, from) => agent?.handleDatagram(bytes, from));
  agent = new StationAgent({
    unitName: "u1",
    station: [
      { host: "s1.example", port: 9 },
      { host: "s2.example", port: 9 },
    ],
    clusterKey,
    clock,
    random: () => 0.5,
    socket,
    resolve,
    credentials,
    storageInfo: () => sampleStorageInfo("u1", { volumeCount: 2, nbd: { host: "10.0.1.1", port: 10809 } }),
  });
  const agentEvents: AgentEvent[] = [];
  agent.subscribe((event) => agentEvents.push(event));
  await agent.start();
  await run(clock, 3_000);
  assert.equal(agent.state, "joined");
  assert.equal(s1.listener.unit("u1")?.state, "online");
  assert.deepEqual(agent.stations, [{ host: "10.0.0.1", port: 9 }], "the name that does not resolve is left out");

  // A station at the second name's future address hears nothing while the name does not resolve.
  const s2 = station("10.0.0.2");
  net.cut.add("10.0.0.1:9");
  await run(clock, 3 * DEFAULT_LIVENESS_TIMERS.heartbeatIntervalMs);
  assert.equal(s2.listener.unit("u1"), undefined);

  // The name resolves; within RESOLVE_REFRESH_MS the unit sends there too, and is online at once.
  secondResolves = true;
  const before = lookups.filter((host) => host === "s2.example").length;
  await run(clock, RESOLVE_REFRESH_MS + 2 * DEFAULT_LIVENESS_TIMERS.heartbeatIntervalMs);
  assert.ok(lookups.filter((host) => host === "s2.example").length > before, "resolved again while joined");
  assert.deepEqual(agent.stations, [
    { host: "10.0.0.1", port: 9 },
    { host: "10.0.0.2", port: 9 },
  ]);
  const view = s2.listener.unit("u1");
  assert.equal(view?.state, "online");
  assert.ok(view !== undefined && view.generation > 0, "the new station asked for and got the storage info");
  assert.equal(agent.state, "joined", "the unit never restarted its join");
  assert.deepEqual(
    s2.events.filter((e) => e.kind === "unit_identity" && e.action !== "confirmed").map((e) => e.kind === "unit_identity" && e.action),
    [],
    "no enrolment, impostor or refused key at the second station",
  );
  assert.deepEqual(agentEvents.filter((e) => e.kind === "refused"), []);
  await agent.abort();
  await s1.listener.close();
  await s2.listener.close();
});
