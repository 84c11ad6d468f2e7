// Scenarios for unit identities (issue 7, "Units"), run by
// unit_identity_test.ts against the build and by unit_identity_canary_test.ts
// against compiled copies with a defect put back (they must fail there).
// Real processes on loopback: a station, units joined to it, an impostor.
// Each scenario throws (assert) when a promise is broken.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import dgram from "node:dgram";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { encodeFrame, encodeHeartbeat, encodeShutdown } from "../discovery/codec.ts";
import { controlTokenFor, loadClusterKey, packetKeyFor, unitControlTokenFor, unitPacketKeyFor } from "../discovery/keys.ts";
import { MESSAGE_TYPE } from "../discovery/messages.ts";
import { startStation, type RunningStation } from "../station/harness.ts";
import { joinArgs } from "../station/pool_harness.ts";
import { waitFor } from "../testing/process.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";

/** Short liveness timers (the station's environment; units adopt them from its ACKs). */
export const TIMERS = { IPSAN_DISCOVERY_HEARTBEAT_MS: "100", IPSAN_DISCOVERY_SUSPECT_MS: "400", IPSAN_DISCOVERY_OFFLINE_MS: "1000" };
/** How long the pool is watched while an impostor runs and after it stops (longer than the offline timer). */
export const WATCH_MS = 1_600;

export type Register = (close: () => Promise<void>) => void;

export interface Bed {
  readonly station: RunningStation;
  readonly units: Map<string, RunningUnit>;
  readonly unitBin?: string;
}

export interface BedOptions {
  /** The station from another build (canaries). */
  readonly stationBin?: string;
  /** The units from another build (canaries). */
  readonly unitBin?: string;
}

export async function startBed(register: Register, options: BedOptions = {}): Promise<Bed> {
  const station = await startStation({ env: TIMERS, ...(options.stationBin === undefined ? {} : { bin: options.stationBin }) });
  register(() => station.close());
  return { station, units: new Map(), ...(options.unitBin === undefined ? {} : { unitBin: options.unitBin }) };
}

export async function joinUnit(
  bed: Bed,
  register: Register,
  name: string,
  options: { volumes?: { name: string; size: string }[]; dataDir?: string; clusterKeyFile?: string; waitOnline?: boolean } = {},
): Promise<RunningUnit> {
  const volumes = options.volumes ?? [{ name: "va", size: "4M" }, { name: "vb", size: "4M" }];
  const args = joinArgs(bed.station);
  if (options.clusterKeyFile !== undefined) args[3] = options.clusterKeyFile;
  const unit = await startUnit({
    name,
    capacity: "64M",
    control: true,
    volumes,
    extraArgs: args,
    env: TIMERS,
    ...(options.dataDir === undefined ? {} : { dataDir: options.dataDir }),
    ...(bed.unitBin === undefined ? {} : { ipsanBin: bed.unitBin }),
  });
  register(() => unit.close());
  if (options.waitOnline !== false) {
    await waitFor(`unit ${name} online with its volumes`, async () => {
      const u = await poolUnit(bed.station, name);
      return u?.state === "online" && u.volumes.length >= volumes.length ? true : undefined;
    }, { timeoutMs: 10_000 });
  }
  return unit;
}

export interface PoolUnit {
  readonly state: string;
  readonly volumes: { name: string }[];
}

export async function poolUnit(station: RunningStation, name: string): Promise<PoolUnit | undefined> {
  const response = await station.api("GET", `/api/v1/units/${name}`);
  return response.status === 200 ? (response.body as PoolUnit) : undefined;
}

export async function identityOf(station: RunningStation, name: string): Promise<{ unitId: string; epoch: number; state: string } | undefined> {
  const response = await station.api("GET", `/api/v1/units/${name}/identity`);
  return response.status === 200 ? (response.body as { unitId: string; epoch: number; state: string }) : undefined;
}

/** GET /v1/info on a unit's control API with a bearer token: the status. */
export async function controlStatus(unit: RunningUnit, token: string): Promise<number> {
  const response = await fetch(`${unit.controlUrl}/v1/info`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(5_000) });
  await response.arrayBuffer();
  return response.status;
}

export async function unitInfo(unit: RunningUnit): Promise<{ unitId: string; name: string }> {
  const response = await fetch(`${unit.controlUrl}/v1/info`, { headers: { authorization: `Bearer ${unit.controlToken()}` }, signal: AbortSignal.timeout(5_000) });
  assert.equal(response.status, 200);
  return (await response.json()) as { unitId: string; name: string };
}

export function storedSecret(unit: RunningUnit): { unit: string; unitId: string; epoch: number; secret: Buffer } {
  const value = JSON.parse(readFileSync(join(unit.dataDir, "unit.secret"), "utf8")) as { unit: string; unitId: string; epoch: number; secret: string };
  return { ...value, secret: Buffer.from(value.secret, "hex") };
}

/** Waits until the unit has its own secret and the station lists its identity as enrolled. */
export async function waitEnrolled(station: RunningStation, unit: RunningUnit, epoch = 1): Promise<{ unitId: string; epoch: number; state: string }> {
  return waitFor(`unit ${unit.name} enrolled (epoch ${epoch})`, async () => {
    const identity = await identityOf(station, unit.name);
    return identity?.state === "enrolled" && identity.epoch === epoch ? identity : undefined;
  }, { timeoutMs: 10_000 });
}

/** The station's Prometheus counter of rejected datagrams for one reason. */
export async function rejectedCount(station: RunningStation, reason: string): Promise<number> {
  const response = await station.api("GET", "/metrics");
  const match = new RegExp(`ipsan_discovery_packets_rejected_total\\{reason="${reason}"\\} (\\d+)`).exec(response.text);
  return Number(match?.[1] ?? "0");
}

/** Sends one datagram to the station's discovery port. */
export async function sendDatagram(station: RunningStation, bytes: Buffer): Promise<void> {
  const socket = dgram.createSocket("udp4");
  try {
    await new Promise<void>((resolve, reject) => socket.send(bytes, station.discovery.port, station.discovery.host, (error) => (error ? reject(error) : resolve())));
  } finally {
    socket.close();
  }
}

/** A datagram in `unitName`'s name, signed with `packetKey` (unitKey: flagged as signed with a unit's own key). */
export function forge(type: "SHUTDOWN" | "HEARTBEAT", unitName: string, packetKey: Buffer, unitKey: boolean): Buffer {
  return encodeFrame(
    {
      type: MESSAGE_TYPE[type],
      fromStation: false,
      unitName,
      sessionId: randomBytes(8).toString("hex"),
      sequence: 1,
      messageId: 1,
      // A little ahead (within the ±30 s skew), as an attacker would: later than anything the real unit sent.
      timestampMs: Date.now() + 5_000,
      fragmentIndex: 0,
      fragmentCount: 1,
      payload: type === "SHUTDOWN" ? encodeShutdown(0) : encodeHeartbeat({ generation: 1 }),
      unitKey,
    },
    packetKey,
  );
}

/** The station's stored events (the SSE stream from 0, read for a bounded time). */
export async function eventsText(station: RunningStation, waitMs = 500): Promise<string> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), waitMs);
  let text = "";
  try {
    const response = await fetch(`${station.url}/api/v1/events?since=0`, { headers: { authorization: `Bearer ${station.token()}` }, signal: controller.signal });
    const reader = response.body?.getReader();
    for (;;) {
      const chunk = await reader?.read();
      if (chunk === undefined || chunk.done) break;
      text += Buffer.from(chunk.value).toString("utf8");
    }
  } catch {
    // aborted: what came so far is the answer
  } finally {
    clearTimeout(timer);
  }
  return text;
}

interface PoolSnapshot {
  readonly state: string;
  readonly volumes: string;
  readonly assignment: string;
}

async function snapshot(station: RunningStation, unit: string, assignmentId: string): Promise<PoolSnapshot> {
  const u = await poolUnit(station, unit);
  const a = await station.api("GET", `/api/v1/assignments/${assignmentId}`);
  const body = a.body as { state: string; host: string; unit: string; volume: string };
  return {
    state: u?.state ?? "missing",
    volumes: (u?.volumes ?? []).map((v) => v.name).sort().join(","),
    assignment: `${body.state} ${body.host} ${body.unit}/${body.volume}`,
  };
}

/** Watches the pool for `ms`: every look must equal `expected`. */
async function watchPool(station: RunningStation, unit: string, assignmentId: string, expected: PoolSnapshot, ms: number, phase: string): Promise<void> {
  const deadline = Date.now() + ms;
  let looks = 0;
  while (Date.now() < deadline) {
    assert.deepEqual(await snapshot(station, unit, assignmentId), expected, `${phase}: the known unit ${unit}'s state, volumes and assignment must be untouched`);
    looks += 1;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(looks >= 5, `${phase}: watched the pool ${looks} times`);
}

/**
 * Impostor: unit1 enrolled, online with va and vb, va assigned to h1. A
 * second unit named unit1 (another data dir, the same cluster key) is
 * refused with a clear message on its stderr, an event and a log line; the
 * known unit1 stays online with its volumes and assignment while the
 * impostor runs and after it stops.
 */
export async function impostorScenario(register: Register, options: BedOptions = {}): Promise<void> {
  const bed = await startBed(register, options);
  const { station } = bed;
  const real = await joinUnit(bed, register, "unit1");
  const host = await station.api("PUT", "/api/v1/hosts/h1", { address: "127.0.0.5" });
  assert.ok(host.status === 201 || host.status === 200, `host h1: ${host.status} ${host.text}`);
  const assigned = await station.api("POST", "/api/v1/assignments", { host: "h1", unit: "unit1", volume: "va" });
  assert.equal(assigned.status, 201, `assignment: ${assigned.text}`);
  const assignmentId = (assigned.body as { id: string }).id;
  await waitFor("assignment active", async () => ((await snapshot(station, "unit1", assignmentId)).assignment.startsWith("active") ? true : undefined), { timeoutMs: 10_000 });
  const expected = await snapshot(station, "unit1", assignmentId);
  assert.deepEqual(expected, { state: "online", volumes: "va,vb", assignment: "active h1 unit1/va" });
  const realId = (await unitInfo(real)).unitId;

  const impostor = await joinUnit(bed, register, "unit1", { volumes: [{ name: "x1", size: "4M" }], waitOnline: false });
  const impostorId = (await unitInfo(impostor)).unitId;
  assert.notEqual(impostorId, realId, "another data dir is another identity");
  // The pool first, during and after the impostor's life (that is the promise), then how it was refused.
  await watchPool(station, "unit1", assignmentId, expected, WATCH_MS, "while the impostor runs");
  const exit = await impostor.stop();
  assert.equal(exit.code, 0, "the impostor stops cleanly");
  await watchPool(station, "unit1", assignmentId, expected, WATCH_MS, "after the impostor stopped");
  assert.match(impostor.stderr(), /station refused: unit name unit1 is enrolled with another identity/, "the impostor printed the refusal");
  assert.match(impostor.stderr(), /pick another --name, or .*ipsan units forget unit1/i);
  const events = await eventsText(station);
  assert.match(events, /unit-impostor/, "a unit-impostor event");
  assert.ok(events.includes(impostorId), "the event names the impostor's id");
  assert.match(station.stderr(), /refused a unit claiming an enrolled name with another identity/, "a log line");
  assert.ok((await rejectedCount(station, "impostor")) >= 1);
  assert.equal((await identityOf(station, "unit1"))?.unitId, realId, "the enrolled identity is the real unit's");
}

/**
 * Per-unit keys: unit1 and unit2 enrolled. Holding unit2's data dir and the
 * cluster key, nothing opens unit1's control API (401) and no datagram in
 * unit1's name is accepted: a SHUTDOWN signed with the cluster key, or with
 * unit2's own secret, leaves unit1 online.
 */
export async function perUnitKeyScenario(register: Register, options: BedOptions = {}): Promise<void> {
  const bed = await startBed(register, options);
  const { station } = bed;
  const unit1 = await joinUnit(bed, register, "unit1");
  const unit2 = await joinUnit(bed, register, "unit2");
  await waitEnrolled(station, unit1);
  await waitEnrolled(station, unit2);
  const clusterKey = await loadClusterKey(station.clusterKeyFile());
  const unit2Secret = storedSecret(unit2);
  assert.equal(unit2Secret.unit, "unit2");

  // The control API: unit1's own token opens it; nothing unit2 holds does.
  assert.equal(await controlStatus(unit1, unit1.controlToken()), 200);
  assert.equal(await controlStatus(unit1, controlTokenFor(clusterKey, "unit1")), 401, "the cluster-key token no longer opens an enrolled unit");
  assert.equal(await controlStatus(unit1, unitControlTokenFor(unit2Secret.secret, "unit1")), 401, "unit2's secret does not open unit1");
  assert.equal(await controlStatus(unit1, unitControlTokenFor(unit2Secret.secret, "unit2")), 401);
  assert.equal(await controlStatus(unit1, unit2.controlToken()), 401, "unit2's control.token does not open unit1");
  // The station's own control calls use unit1's token: a refresh reads it through its control API.
  const refreshed = await station.api("POST", "/api/v1/units/unit1/refresh", {});
  assert.equal(refreshed.status, 200, refreshed.text);

  // Discovery: SHUTDOWNs in unit1's name, signed with what unit2 holds.
  const keyRefusedBefore = await rejectedCount(station, "unit_key_required");
  const badHmacBefore = await rejectedCount(station, "bad_hmac");
  await sendDatagram(station, forge("SHUTDOWN", "unit1", packetKeyFor(clusterKey), false));
  await sendDatagram(station, forge("SHUTDOWN", "unit1", unitPacketKeyFor(unit2Secret.secret), true));
  // The state first (that is the promise), then that both were counted as refused. A SHUTDOWN
  // taken for unit1's would show in the event stream even if its next heartbeat revived it at once.
  const deadline = Date.now() + 800;
  while (Date.now() < deadline) {
    assert.equal((await poolUnit(station, "unit1"))?.state, "online", "a forged SHUTDOWN must not mark unit1 down");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const downs = (await eventsText(station)).split("\n").filter((line) => line.startsWith("data:") && line.includes('"unit1"') && line.includes('"state":"down"'));
  assert.deepEqual(downs, [], "a forged SHUTDOWN must not mark unit1 down (event stream)");
  await waitFor("both forged datagrams refused", async () =>
    (await rejectedCount(station, "unit_key_required")) > keyRefusedBefore && (await rejectedCount(station, "bad_hmac")) > badHmacBefore ? true : undefined,
  { timeoutMs: 3_000 });
  assert.match(await eventsText(station), /unit-key-refused/, "a unit-key-refused event");
}
