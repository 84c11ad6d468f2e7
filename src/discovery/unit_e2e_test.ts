// What this proves, with real `bin/ipsan unit --station` processes on loopback
// and the real DiscoveryListener (short timers: heartbeat 100 ms, suspect
// 400 ms, offline 1000 ms, which the units adopt from the station's ACKs):
// a unit appears with its volumes within 2 s; a volume created through the
// unit's control API with the station's derived token (controlTokenFor) is
// pushed to the station; SIGTERM sends SHUTDOWN and the unit is down within
// 1 s; kill -9 turns it suspect, then offline, within the timers, and a
// restart brings it back online with its volumes; a unit with the wrong
// cluster key never appears; datagrams captured on the wire and replayed,
// forged, truncated or oversized from a raw UDP socket are counted by reason
// and change nothing; the station may be named by DNS (localhost) and a
// unit's --dns-name reaches it; --station without --cluster-key-file is a
// usage error that says where the key lives.

import { test, after } from "node:test";
import assert from "node:assert/strict";
import dgram from "node:dgram";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { DiscoveryListener, type DiscoveryEvent } from "./station_listener.ts";
import { controlTokenFor, loadOrCreateClusterKey, packetKeyFor } from "./keys.ts";
import { decodeFrame } from "./codec.ts";
import { openUdpSocket } from "./transport.ts";
import type { StorageInfo } from "./messages.ts";
import { startUnit, IPSAN_BIN, type RunningUnit } from "../testing/unit.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { run, waitFor } from "../testing/process.ts";

const TIMERS = { heartbeatIntervalMs: 100, suspectAfterMs: 400, offlineAfterMs: 1000 };
const tmp = makeTempDir("discovery-e2e");
const keyFile = tmp.file("cluster.key");
const key = await loadOrCreateClusterKey(keyFile);
const packetKey = packetKeyFor(key);
const events: { atMs: number; event: DiscoveryEvent }[] = [];
const captured: Buffer[] = [];
let receiver: DiscoveryListener | undefined;
// Our own socket in front of the listener, so the test sees what crosses the wire (as a sniffer would).
const socket = await openUdpSocket({ host: "127.0.0.1", port: 0 }, (bytes, from) => {
  // Keep authentic datagrams only (the intruder test sends others).
  if (captured.length < 200 && decodeFrame(bytes, packetKey).kind === "frame") captured.push(Buffer.from(bytes));
  receiver?.handleDatagram(bytes, from);
});
const station = socket.local;
const stationWithSocket = new DiscoveryListener({ clusterKey: key, timers: TIMERS, socket });
receiver = stationWithSocket;
stationWithSocket.subscribe((event) => events.push({ atMs: Date.now(), event }));
const units: RunningUnit[] = [];

after(async () => {
  for (const unit of units) await unit.close().catch(() => undefined);
  await stationWithSocket.close();
  tmp.remove();
});

function joinArgs(keyPath = keyFile): string[] {
  return ["--station", `${station.host}:${station.port}`, "--cluster-key-file", keyPath];
}

async function start(name: string, extra: string[] = [], dataDir?: string): Promise<RunningUnit> {
  const unit = await startUnit({
    name,
    capacity: "64M",
    volumes: [
      { name: "alpha", size: "4M" },
      { name: "beta", size: "2M" },
    ],
    control: true,
    extraArgs: [...joinArgs(), ...extra],
    ...(dataDir === undefined ? {} : { dataDir }),
  });
  units.push(unit);
  return unit;
}

function latestInfo(unit: string): StorageInfo | undefined {
  for (let i = events.length - 1; i >= 0; i--) {
    const e = events[i]?.event;
    if (e?.kind === "unit_storage_info" && e.unit === unit) return e.info;
  }
  return undefined;
}

function stateOf(unit: string): string | undefined {
  return stationWithSocket.unit(unit)?.state;
}

async function waitState(unit: string, state: string, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  await waitFor(`${unit} ${state}`, () => (stateOf(unit) === state ? true : undefined), { timeoutMs, intervalMs: 10 });
  return Date.now() - t0;
}

test("a unit started with --station appears with its volumes within 2 s; its control API accepts the derived token", async () => {
  const t0 = Date.now();
  const unit = await start("u1");
  await waitFor("u1 storage info", () => latestInfo("u1"), { timeoutMs: 2000, intervalMs: 10 });
  const ms = Date.now() - t0;
  console.log(`u1: process start to storage info at the station: ${ms} ms`);
  assert.ok(ms < 2000);
  const info = latestInfo("u1");
  assert.deepEqual(info?.volumes.map((v) => [v.name, v.sizeBytes]), [["alpha", 4 * 1024 * 1024], ["beta", 2 * 1024 * 1024]]);
  assert.equal(info?.nbd.port, unit.port);
  assert.equal(stateOf("u1"), "online");

  // The station's derived token works on the unit's control API, and the change reaches the station.
  const response = await fetch(`${unit.controlUrl}/v1/volumes`, {
    method: "POST",
    headers: { authorization: `Bearer ${controlTokenFor(key, "u1")}`, "content-type": "application/json" },
    body: JSON.stringify({ name: "gamma", sizeBytes: 1024 * 1024 }),
  });
  assert.equal(response.status, 201, await response.text());
  await waitFor("gamma at the station", () => (latestInfo("u1")?.volumes.some((v) => v.name === "gamma") ? true : undefined), {
    timeoutMs: 2000,
  });
  const wrong = await fetch(`${unit.controlUrl}/v1/info`, { headers: { authorization: `Bearer ${controlTokenFor(key, "someone-else")}` } });
  assert.equal(wrong.status, 401, "a token derived for another unit is refused");
  await wrong.arrayBuffer();
});

test("SIGTERM: SHUTDOWN marks the unit down within 1 s and the unit exits 0", async () => {
  const unit = await start("u2");
  await waitFor("u2 info", () => latestInfo("u2"), { timeoutMs: 2000 });
  const t0 = Date.now();
  const exit = unit.stop();
  await waitState("u2", "down", 1000);
  console.log(`u2: SIGTERM to down: ${Date.now() - t0} ms`);
  assert.deepEqual(await exit, { code: 0, signal: null, forced: false });
});

test("kill -9: suspect, then offline within the timers; a restart brings it back online with its volumes", async () => {
  const unit = await start("u3");
  await waitFor("u3 info", () => latestInfo("u3"), { timeoutMs: 2000 });
  await unit.kill9();
  const t0 = Date.now();
  const suspectMs = await waitState("u3", "suspect", TIMERS.suspectAfterMs + 500);
  const offlineMs = suspectMs + (await waitState("u3", "offline", TIMERS.offlineAfterMs + 500));
  console.log(`u3: kill -9 to suspect ${suspectMs} ms, to offline ${offlineMs} ms (timers ${TIMERS.suspectAfterMs}/${TIMERS.offlineAfterMs})`);
  assert.ok(Date.now() - t0 <= TIMERS.offlineAfterMs + 500);
  const before = events.length;
  const again = await start("u3", [], unit.dataDir);
  const backMs = await waitState("u3", "online", 2000);
  await waitFor("u3 info again", () => (events.slice(before).some((e) => e.event.kind === "unit_storage_info" && e.event.unit === "u3") ? true : undefined), {
    timeoutMs: 2000,
  });
  console.log(`u3: restart to online ${backMs} ms`);
  assert.deepEqual(latestInfo("u3")?.volumes.map((v) => v.name), ["alpha", "beta"]);
  const states = events.flatMap((e) => (e.event.kind === "unit_state" && e.event.unit === "u3" ? [e.event.state] : []));
  assert.deepEqual(states, ["online", "suspect", "offline", "online"]);
  await again.stop();
});

test("a unit with another cluster key never appears; its datagrams are counted as bad_hmac", async () => {
  const otherKey = tmp.file("other.key");
  writeFileSync(otherKey, `${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
  const before = stationWithSocket.stats().rejected.bad_hmac;
  const unit = await startUnit({ name: "intruder", capacity: "16M", control: true, extraArgs: joinArgs(otherKey) });
  units.push(unit);
  await waitFor("bad_hmac counted", () => (stationWithSocket.stats().rejected.bad_hmac >= before + 2 ? true : undefined), { timeoutMs: 2000 });
  assert.equal(stationWithSocket.unit("intruder"), undefined);
  assert.ok(!events.some((e) => e.event.kind !== "packet_rejected" && "unit" in e.event && e.event.unit === "intruder"));
  await unit.stop();
});

test("replayed, forged, truncated and oversized datagrams from a raw socket change nothing and are counted", async () => {
  const unit = await start("u4");
  await waitFor("u4 info", () => latestInfo("u4"), { timeoutMs: 2000 });
  await unit.stop();
  await waitState("u4", "down", 1000);
  assert.ok(captured.length > 10);
  // Everything but the live units' lastSeenMs (u1 is still running and heartbeating).
  const view = (): string =>
    JSON.stringify(stationWithSocket.units().map((u) => ({ ...u, lastSeenMs: u.state === "online" ? 0 : u.lastSeenMs })));
  const snapshot = view();
  const eventsBefore = events.length;
  const rejectedBefore = stationWithSocket.stats().rejected;
  const raw = dgram.createSocket("udp4");
  after(() => raw.close());
  await new Promise<void>((resolve) => raw.bind(0, "127.0.0.1", resolve));
  const send = (bytes: Buffer): Promise<void> =>
    new Promise((resolve, reject) => raw.send(bytes, station.port, station.host, (error) => (error ? reject(error) : resolve())));
  const replays = captured.slice(0, 40);
  for (const bytes of replays) await send(bytes);
  const forged = Buffer.from(replays[0] ?? Buffer.alloc(80));
  forged[60] = (forged[60] ?? 0) ^ 0xff;
  await send(forged);
  await send(forged.subarray(0, 30));
  await send(Buffer.alloc(1300, 7));
  await send(Buffer.from("IPSD garbage"));
  await waitFor("all counted", () => {
    const r = stationWithSocket.stats().rejected;
    const total = (reason: keyof typeof r): number => r[reason] - rejectedBefore[reason];
    return total("replay") + total("clock_skew") >= replays.length && total("bad_hmac") >= 1 && total("truncated") >= 2 && total("too_large") >= 1
      ? true
      : undefined;
  }, { timeoutMs: 2000 });
  assert.equal(view(), snapshot, "no unit changed");
  assert.ok(events.slice(eventsBefore).every((e) => e.event.kind === "packet_rejected"));
});

test("the station may be given by DNS name; --dns-name reaches the station in the storage info", async () => {
  const unit = await startUnit({
    name: "u5",
    capacity: "16M",
    control: true,
    extraArgs: ["--station", `localhost:${station.port}`, "--cluster-key-file", keyFile, "--dns-name", "u5.san.example"],
  });
  units.push(unit);
  const info = await waitFor("u5 info", () => latestInfo("u5"), { timeoutMs: 2000 });
  assert.equal(info.dnsName, "u5.san.example");
  await unit.stop();
});

test("--station without --cluster-key-file is a usage error naming where the key lives", async () => {
  const result = await run(process.execPath, [IPSAN_BIN, "unit", "--data", tmp.file("nokey"), "--capacity", "16M", "--listen", "127.0.0.1:0", "--station", "127.0.0.1:9"], {
    timeoutMs: 20_000,
  });
  assert.equal(result.code, 2);
  assert.match(result.stderr, /--cluster-key-file FILE is required with --discovery .*STATION_DATA\/cluster\.key/);
});

