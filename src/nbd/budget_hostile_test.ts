// What this proves (issue 12, item 2): no admitted NBD client can crash a
// real `bin/ipsan unit` process, leak its sessions, or starve the other
// clients of the server-wide payload budget.
//
// 1. The crash as reported: eight connections each announce a 32 MiB WRITE
//    and send one byte of it, holding the whole budget (serverBytesInFlightMax
//    256 MiB = 8 x 32 MiB); a ninth sends FLUSH and READ 4096 (the READ waits
//    for budget) and resets the connection. Before the fix the session gave
//    back budget it never took, an assertion fired in a socket 'close'
//    listener and the unit exited. Then variants with requests in flight
//    (reads of several MiB, FUA writes, FLUSH), requests blocked on the budget
//    and half-sent payloads, reset or closed at random moments (seeded:
//    IPSAN_TEST_SEED replays the choices). After each round, once every
//    hostile socket is gone: the unit is alive, serves a fresh client (4 KiB
//    write + read back), every session has ended (connectionsMax clients all
//    reach transmission: a leaked session would hold a slot), and the volume
//    can be wiped (the control API refuses while a connection holds it open).
// 2. Budget starvation: four hostile peers (127.0.0.2-5) keep connections
//    that announce maximum-size WRITEs and then stall or trickle a byte every
//    200 ms, reconnecting whenever the unit closes them, while an honest
//    client on 127.0.0.1 does 64 KiB write + read round trips. With
//    payloadTimeoutMs=1000 the unit closes the stalled payloads (and logs
//    it), gives their budget back, and shares it fairly per peer address, so
//    no honest round trip takes longer than payloadTimeoutMs + 1500 ms, the
//    honest client keeps making progress, and the unit's RSS stays bounded.
// 3. A lost wake-up: a connection whose request waits for budget and is then
//    unblocked by its own earlier request giving its bytes back (not by the
//    budget waking it) must go on reading its socket; a third request is
//    answered. Deterministic.
//
// The seed replays the random choices, not the timings. The budget contract
// (payloadTimeoutMs, per-reservation accounting, fair share per peer address)
// is in src/nbd/budget.ts, docs/protocol/nbd.md and
// docs/adr/0007-unit-changes-opens-and-flow-control.md.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { describe, test, type TestContext } from "node:test";
import { type Random, seededRandom } from "../util/clock.ts";
import { controlRequest } from "../testing/control.ts";
import { sleep } from "../testing/process.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";
import { type RequestFields, encodeRequest } from "./peer_codec.ts";
import { NBD_CMD, NBD_CMD_FLAG } from "./protocol.ts";
import { RawNbdClient } from "./testing/raw_client.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const VOLUME = "a";
const VOLUME_BYTES = 64 * MiB;

/** Seed of every random choice (timings, sizes, orders); printed with any failure. */
const SEED = process.env["IPSAN_TEST_SEED"] !== undefined ? Number(process.env["IPSAN_TEST_SEED"]) >>> 0 : (Math.random() * 2 ** 32) >>> 0;

// ---------------------------------------------------------------- test 1 limits

/** Small, so that leaked sessions (which hold a connection slot forever) are easy to see. */
const CONNECTIONS_MAX = 16;
/** The default payloadBytesMax: eight stalled writes of this size hold the default 256 MiB server budget. */
const STALLED_WRITE_BYTES = 32 * MiB;
const STALLED_WRITERS = 8;
const VARIANT_ROUNDS = 6;
/** How long the unit may take to notice closed sockets and end their sessions. */
const SESSIONS_END_TIMEOUT_MS = 5_000;

// ---------------------------------------------------------------- test 2 limits

const PAYLOAD_TIMEOUT_MS = 1_000;
/** Scaled-down budget: 8 maximum-size payloads fill the server, 2 fill a connection. */
const PAYLOAD_BYTES_MAX = 4 * MiB;
const CONNECTION_BYTES_IN_FLIGHT_MAX = 8 * MiB;
const SERVER_BYTES_IN_FLIGHT_MAX = 32 * MiB;
const HOSTILE_ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] as const;
/** 4 peers x 3 connections x 4 MiB = 48 MiB wanted from a 32 MiB budget. */
const HOSTILE_CONNECTIONS_PER_PEER = 3;
const HOSTILE_RECONNECTS_MAX = 200;
const TRICKLE_INTERVAL_MS = 200;
const HONEST_BYTES = 64 * KiB;
const BASELINE_MS = 1_500;
/** Lets the hostile peers take the whole budget before the honest client starts measuring. */
const HOSTILE_SETTLE_MS = 500;
const HOSTILE_PHASE_MS = 8_000;
const ROUND_TRIPS_MAX = 100_000;
/**
 * The documented bound: an honest request waits at most about payloadTimeoutMs
 * for budget held by stalled payloads; 1500 ms covers scheduling on a loaded
 * 2-core machine and the second request of the round trip.
 */
const ROUND_TRIP_MAX_MS = PAYLOAD_TIMEOUT_MS + 1_500;
/**
 * The floor on honest round trips during the hostile phase, as a share of
 * the rate the same client reaches in the quiet baseline just before (same
 * machine, same moment: its speed cancels out). The contract: the honest
 * peer waits at most about one payloadTimeoutMs (1/8 of the phase) for budget
 * held by stalled payloads, and after that keeps getting budget; so it keeps
 * most of its baseline rate (measured 1.3-2.2x the baseline rate on a quiet
 * machine: the baseline includes warm-up). A quarter leaves 4x room for a
 * loaded machine. An absolute floor would not do: with the fair-share check
 * switched off (timeouts and least-holding-first wake-ups still on) no round
 * trip took over 1 s, yet the honest client made only 35-41 round trips in
 * the 8 s instead of thousands; before the fix it makes none.
 */
const HONEST_SHARE_OF_BASELINE = 0.25;
/** Whatever the baseline: at least one round trip per payloadTimeoutMs on average. */
const HONEST_ROUND_TRIPS_MIN = Math.floor(HOSTILE_PHASE_MS / PAYLOAD_TIMEOUT_MS);
/**
 * The unit idles at about 65-75 MB and reaches 111 MB under fio
 * (docs/benchmarks.md); the budget adds at most 32 MiB of payload and the 13
 * connections their read buffers (up to 2 MiB each). Measured here: 76-85 MB.
 * 300 MB leaves room for the garbage collector's slack, not for payload
 * buffered without budget or memory kept per reconnect (about 50 per run).
 */
const RSS_MAX_BYTES = 300 * 1_000_000;
const RSS_SAMPLE_MS = 100;

// ---------------------------------------------------------------- helpers

let cookie = 1;
function nextCookie(): number {
  cookie = (cookie + 1) >>> 0;
  return cookie;
}

/** Sockets opened by a test, all destroyed when it ends. */
class Sockets {
  private readonly open = new Set<RawNbdClient>();

  async transmitting(unit: RunningUnit, options: { localAddress?: string; structured?: boolean; timeoutMs?: number } = {}): Promise<RawNbdClient> {
    const target = { host: unit.host, port: unit.port, ...(options.localAddress === undefined ? {} : { localAddress: options.localAddress }) };
    const client = await RawNbdClient.connect(target, options.timeoutMs);
    this.open.add(client);
    void client.closed.then(() => this.open.delete(client));
    if (options.localAddress !== undefined) assert.equal(client.socket.localAddress, options.localAddress, "bound to the hostile peer's address");
    await client.handshake();
    await client.go(VOLUME, { structured: options.structured ?? true });
    return client;
  }

  destroyAll(): void {
    for (const client of this.open) client.destroy();
    this.open.clear();
  }
}

function request(fields: Omit<RequestFields, "cookieHi" | "cookieLo">): RequestFields {
  return { cookieHi: 0, cookieLo: nextCookie(), ...fields };
}

/** A well-behaved write of `bytes` random bytes at `offset` and a read that must return them. */
async function roundTrip(client: RawNbdClient, offset: number, bytes: number): Promise<void> {
  const data = randomBytes(bytes);
  const write = await client.call(request({ flags: 0, type: NBD_CMD.WRITE, offset, length: bytes, payload: data }));
  assert.equal(write.errno, 0, "well-behaved write");
  const read = await client.call(request({ flags: 0, type: NBD_CMD.READ, offset, length: bytes }));
  assert.equal(read.errno, 0, "well-behaved read");
  assert.ok(read.data?.equals(data), "read returns what was written");
}

function stderrTail(unit: RunningUnit, chars = 4_000): string {
  return unit.stderr().slice(-chars);
}

function assertAlive(unit: RunningUnit, when: string): void {
  if (unit.running()) return;
  assert.fail(
    `the unit exited ${when} (code=${unit.child.exitCode} signal=${unit.child.signalCode}); stderr tail:\n${stderrTail(unit)}`,
  );
}

/** Runs `body`; if it fails and the unit has exited meanwhile, the failure says so (with the unit's stderr). */
async function whileAlive(unit: RunningUnit, what: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    if (message.startsWith("the unit exited")) throw error;
    await sleep(200); // the exit may lag the sockets' close
    assertAlive(unit, `${what} (the test saw: ${message})`);
    throw error;
  }
}

function pick<T>(random: Random, items: readonly T[]): T {
  return items[Math.floor(random() * items.length)] as T;
}

function between(random: Random, low: number, high: number): number {
  return low + Math.floor(random() * (high - low + 1));
}

/** A test whose random choices come from IPSAN_TEST_SEED (plus `index`); the seed is in any failure message. */
function seededTest(name: string, index: number, body: (random: Random, t: TestContext) => Promise<void>): void {
  test(name, async (t) => {
    t.diagnostic(`seed ${SEED} (IPSAN_TEST_SEED=${SEED} replays it)`);
    try {
      await body(seededRandom(SEED + index), t);
    } catch (error) {
      if (error instanceof Error) error.message += `\n(seed: IPSAN_TEST_SEED=${SEED})`;
      throw error;
    }
  });
}

// ---------------------------------------------------------------- test 1

function startCrashUnit(): Promise<RunningUnit> {
  return startUnit({
    capacity: "128M",
    control: true,
    volumes: [{ name: VOLUME, size: VOLUME_BYTES }],
    // Default budget (payloadBytesMax 32 MiB, serverBytesInFlightMax 256 MiB); a short close timeout.
    env: { IPSAN_NBD_LIMITS: `connectionsMax=${CONNECTIONS_MAX},closeTimeoutMs=2000` },
  });
}

/** A connection that announces a WRITE of `length` bytes and sends only `sentBytes` of its payload. */
async function stalledWriter(unit: RunningUnit, sockets: Sockets, length: number, sentBytes: number, structured: boolean): Promise<RawNbdClient> {
  const client = await sockets.transmitting(unit, { structured });
  client.send(request({ flags: 0, type: NBD_CMD.WRITE, offset: 0, length }));
  client.write(Buffer.alloc(sentBytes, 0x5a));
  return client;
}

/**
 * Requests that hold budget while in flight (reads over 1 MiB and FUA writes
 * go to the thread pool), requests that will block on the budget, and maybe
 * a last WRITE whose payload is cut short.
 */
function hostilePipeline(random: Random): Buffer {
  const parts: Buffer[] = [];
  const count = between(random, 3, 8);
  for (let i = 0; i < count; i += 1) {
    const choice = random();
    const offset = 4 * KiB * between(random, 0, (VOLUME_BYTES - 32 * MiB) / (4 * KiB));
    if (choice < 0.5) {
      const length = pick(random, [4 * KiB, 2 * MiB, 8 * MiB, 16 * MiB, 32 * MiB]);
      parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.READ, offset, length })));
    } else if (choice < 0.7) {
      const length = pick(random, [64 * KiB, MiB, 4 * MiB]);
      parts.push(encodeRequest(request({ flags: NBD_CMD_FLAG.FUA, type: NBD_CMD.WRITE, offset, length, payload: Buffer.alloc(length, 0xa5) })));
    } else if (choice < 0.8) {
      parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.WRITE, offset, length: 4 * KiB, payload: Buffer.alloc(4 * KiB, 0xa6) })));
    } else {
      parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.FLUSH, offset: 0, length: 0 })));
    }
  }
  // Last, a large request that will likely wait for budget: a READ, or a WRITE whose payload is cut short.
  if (random() < 0.5) {
    parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.READ, offset: 0, length: STALLED_WRITE_BYTES })));
  } else {
    parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.WRITE, offset: 0, length: STALLED_WRITE_BYTES })));
    parts.push(Buffer.alloc(between(random, 1, 256 * KiB), 0xa7));
  }
  return Buffer.concat(parts);
}

/**
 * READs of `freeBytes` in all, 2 MiB or more each (so they go to the thread
 * pool and hold their bytes while in flight), maybe a FLUSH, then a 32 MiB
 * READ that cannot get budget: nothing this connection gives back frees enough.
 */
function inFlightThenBlocked(random: Random, freeBytes: number): Buffer {
  const parts: Buffer[] = [];
  let units = freeBytes / (2 * MiB);
  while (units > 0) {
    const take = units <= 2 ? units : between(random, 1, units);
    parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.READ, offset: 2 * MiB * between(random, 0, 16), length: take * 2 * MiB })));
    units -= take;
  }
  if (random() < 0.5) parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.FLUSH, offset: 0, length: 0 })));
  parts.push(encodeRequest(request({ flags: 0, type: NBD_CMD.READ, offset: 0, length: STALLED_WRITE_BYTES })));
  return Buffer.concat(parts);
}

/** Ends a hostile connection the way a crashing or misbehaving client would: reset, close, or half-close. */
function hangUp(random: Random, client: RawNbdClient, odds: { reset: number } = { reset: 0.6 }): void {
  const choice = random();
  if (choice < odds.reset) client.socket.resetAndDestroy();
  else if (choice < odds.reset + (1 - odds.reset) / 2) client.destroy();
  else client.socket.end();
}

/** Once every hostile socket is gone: alive, serving, every session ended, the volume not held open. */
async function assertRecovered(unit: RunningUnit, sockets: Sockets, random: Random, t: TestContext): Promise<void> {
  sockets.destroyAll();
  await sleep(50);
  assertAlive(unit, "after the hostile clients");

  const fresh = await sockets.transmitting(unit);
  await roundTrip(fresh, 4 * KiB * between(random, 0, VOLUME_BYTES / (4 * KiB) - 1), 4 * KiB);
  fresh.destroy();

  // Every session ended: all connectionsMax slots can be taken again (a leaked session keeps one).
  const deadline = Date.now() + SESSIONS_END_TIMEOUT_MS;
  let best = 0;
  let lastError = "";
  for (let attempt = 0; ; attempt += 1) {
    const clients: RawNbdClient[] = [];
    try {
      for (let i = 0; i < CONNECTIONS_MAX; i += 1) clients.push(await sockets.transmitting(unit, { timeoutMs: 2_000 }));
      await roundTrip(clients[CONNECTIONS_MAX - 1] as RawNbdClient, 0, 4 * KiB);
      if (attempt > 0) t.diagnostic(`all ${CONNECTIONS_MAX} slots free after ${attempt} retries`);
      break;
    } catch (error) {
      best = Math.max(best, clients.length);
      lastError = error instanceof Error ? error.message : String(error);
    } finally {
      for (const client of clients) client.destroy();
    }
    assertAlive(unit, "while taking every connection slot");
    if (Date.now() > deadline) {
      assert.fail(
        `sessions leaked: only ${best} of connectionsMax=${CONNECTIONS_MAX} new clients reached transmission ` +
          `within ${SESSIONS_END_TIMEOUT_MS} ms after every hostile socket closed (last error: ${lastError}); stderr tail:\n${stderrTail(unit)}`,
      );
    }
    await sleep(200);
  }

  // Every device closed: the volume has no grants, so a wipe is refused only while a connection holds it open.
  let last = { status: 0, body: undefined as unknown };
  const wipeDeadline = Date.now() + SESSIONS_END_TIMEOUT_MS;
  while (Date.now() <= wipeDeadline) {
    last = await controlRequest(unit, "POST", `/v1/volumes/${VOLUME}/wipe`);
    if (last.status === 200) break;
    await sleep(200);
  }
  assert.equal(last.status, 200, `wipe after every client left: ${last.status} ${JSON.stringify(last.body)}`);
  assertAlive(unit, "after the checks");
}

describe("hostile clients cannot crash the unit or leak its sessions through the payload budget", () => {
  seededTest("eight stalled 32 MiB writes hold the budget; a ninth sends FLUSH + READ and resets (the reported crash), 3 rounds", 1, async (random, t) => {
    const unit = await startCrashUnit();
    const sockets = new Sockets();
    try {
      for (let round = 0; round < 3; round += 1) {
        await whileAlive(unit, `in round ${round}`, async () => {
          const stallers: RawNbdClient[] = [];
          for (let i = 0; i < STALLED_WRITERS; i += 1) stallers.push(await stalledWriter(unit, sockets, STALLED_WRITE_BYTES, 1, random() < 0.5));
          // The unit holds each writer's 32 MiB as soon as it has the header.
          await sleep(between(random, 100, 300));
          const ninth = await sockets.transmitting(unit, { structured: random() < 0.5 });
          ninth.send(request({ flags: 0, type: NBD_CMD.FLUSH, offset: 0, length: 0 }));
          ninth.send(request({ flags: 0, type: NBD_CMD.READ, offset: 0, length: 4 * KiB }));
          if (round === 1) {
            // Prove the scenario: the FLUSH is answered, the READ is not (no budget left).
            const flush = await ninth.reply();
            assert.equal(flush.errno, 0, "FLUSH answered");
            await sleep(200);
            assert.equal(ninth.pendingBytes, 0, "the READ waits for budget held by the stalled writes");
          } else if (round === 2) {
            await sleep(between(random, 0, 5));
          }
          // Round 0 resets at once, as reported: the FLUSH is still in flight, and its reply fails.
          ninth.socket.resetAndDestroy();
          await sleep(300);
          assertAlive(unit, `after the ninth connection's reset (round ${round})`);
          for (const staller of stallers) hangUp(random, staller);
          await assertRecovered(unit, sockets, random, t);
        });
      }
    } finally {
      sockets.destroyAll();
      await unit.close();
    }
  });

  seededTest(`requests in flight, requests blocked on the budget and half-sent payloads, reset at random moments, ${VARIANT_ROUNDS} rounds`, 2, async (random, t) => {
    const unit = await startCrashUnit();
    const sockets = new Sockets();
    try {
      for (let round = 0; round < VARIANT_ROUNDS; round += 1) {
        await whileAlive(unit, `in round ${round}`, async () => {
          // Seven stalled 32 MiB writes and a smaller one leave `freeBytes` (4..28 MiB) of the 256 MiB budget.
          const freeBytes = 4 * MiB * between(random, 1, 7);
          const stallers: RawNbdClient[] = [];
          for (let i = 0; i < STALLED_WRITERS; i += 1) {
            const length = i === STALLED_WRITERS - 1 ? STALLED_WRITE_BYTES - freeBytes : STALLED_WRITE_BYTES;
            stallers.push(await stalledWriter(unit, sockets, length, between(random, 1, 64 * KiB), random() < 0.5));
          }
          await sleep(between(random, 50, 150));
          // One connection takes the rest with reads (in flight on the thread pool), asks for 32 MiB
          // more (blocked on the server budget) and hangs up at once, before its replies are written.
          const holder = await sockets.transmitting(unit, { structured: random() < 0.5 });
          holder.write(inFlightThenBlocked(random, freeBytes));
          hangUp(random, holder, { reset: 0.8 });
          // Then connections with random pipelines, hung up in a random order at random moments.
          const busy: RawNbdClient[] = [];
          for (let i = between(random, 1, 3); i > 0; i -= 1) {
            const client = await sockets.transmitting(unit, { structured: random() < 0.5 });
            const pipeline = hostilePipeline(random);
            const split = between(random, 0, pipeline.length);
            client.write(pipeline.subarray(0, split));
            if (random() < 0.3) await sleep(between(random, 0, 5));
            client.write(pipeline.subarray(split));
            busy.push(client);
          }
          for (let i = busy.length - 1; i > 0; i -= 1) {
            const j = Math.floor(random() * (i + 1));
            [busy[i], busy[j]] = [busy[j] as RawNbdClient, busy[i] as RawNbdClient];
          }
          for (const client of busy) {
            if (random() < 0.3) await sleep(between(random, 0, 20));
            hangUp(random, client);
          }
          await sleep(between(random, 0, 300));
          assertAlive(unit, `after the busy connections hung up (round ${round})`);
          for (const staller of stallers) hangUp(random, staller);
          await assertRecovered(unit, sockets, random, t);
        });
      }
    } finally {
      sockets.destroyAll();
      await unit.close();
    }
  });
});

// ---------------------------------------------------------------- test 2

interface HostileStats {
  connected: number;
  closedByUnit: number;
  errors: number;
}

/**
 * One hostile connection slot: connect from `address`, announce a
 * maximum-size WRITE, then stall (one byte) or trickle (a byte every 200 ms)
 * until the unit closes it; reconnect. Bounded by `stop()` and a count.
 */
async function hostileSlot(
  unit: RunningUnit,
  sockets: Sockets,
  address: string,
  trickle: boolean,
  random: Random,
  stopped: () => boolean,
  stats: HostileStats,
): Promise<void> {
  for (let attempt = 0; attempt < HOSTILE_RECONNECTS_MAX && !stopped(); attempt += 1) {
    let client: RawNbdClient | undefined;
    try {
      client = await sockets.transmitting(unit, { localAddress: address, structured: random() < 0.5, timeoutMs: 2_000 });
      stats.connected += 1;
      client.send(request({ flags: 0, type: NBD_CMD.WRITE, offset: 4 * KiB * between(random, 0, (VOLUME_BYTES - PAYLOAD_BYTES_MAX) / (4 * KiB)), length: PAYLOAD_BYTES_MAX }));
      client.write(Buffer.alloc(1, 0xee));
      while (!stopped() && !client.isClosed) {
        if (await client.closedWithin(TRICKLE_INTERVAL_MS + between(random, -50, 50))) break;
        if (trickle) client.write(Buffer.alloc(1, 0xef));
      }
      if (client.isClosed && !stopped()) stats.closedByUnit += 1;
    } catch {
      if (!stopped()) stats.errors += 1;
    } finally {
      client?.destroy();
    }
    await sleep(between(random, 5, 50));
  }
}

interface HonestResult {
  roundTrips: number;
  maxMs: number;
  over: number[];
  errors: string[];
}

/** 64 KiB write + read round trips from 127.0.0.1 for `durationMs`; a failed one is recorded and the client replaced. */
async function honestLoop(unit: RunningUnit, sockets: Sockets, random: Random, durationMs: number): Promise<HonestResult> {
  const result: HonestResult = { roundTrips: 0, maxMs: 0, over: [], errors: [] };
  let client = await sockets.transmitting(unit);
  const endMs = Date.now() + durationMs;
  while (Date.now() < endMs && result.roundTrips < ROUND_TRIPS_MAX) {
    const startMs = performance.now();
    try {
      await roundTrip(client, HONEST_BYTES * between(random, 0, 16 * MiB / HONEST_BYTES - 1), HONEST_BYTES);
      result.roundTrips += 1;
    } catch (error) {
      result.errors.push(`${error instanceof Error ? error.message : String(error)} after ${Math.round(performance.now() - startMs)} ms`);
      client.destroy();
      if (result.errors.length > 20) break;
      try {
        client = await sockets.transmitting(unit);
      } catch (reconnect) {
        result.errors.push(`reconnect: ${reconnect instanceof Error ? reconnect.message : String(reconnect)}`);
        break;
      }
    }
    const ms = performance.now() - startMs;
    result.maxMs = Math.max(result.maxMs, ms);
    if (ms > ROUND_TRIP_MAX_MS) result.over.push(Math.round(ms));
  }
  client.destroy();
  return result;
}

function rssBytes(pid: number): number {
  try {
    const match = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return match === null ? 0 : Number(match[1]) * 1024;
  } catch {
    return 0;
  }
}

describe("stalled payloads cannot starve honest clients of the payload budget", () => {
  seededTest("four hostile peers stall and trickle maximum-size WRITEs; an honest client keeps its round trips", 3, async (random, t) => {
    const unit = await startUnit({
      capacity: "128M",
      volumes: [{ name: VOLUME, size: VOLUME_BYTES }],
      env: {
        IPSAN_NBD_LIMITS:
          `payloadTimeoutMs=${PAYLOAD_TIMEOUT_MS},payloadBytesMax=${PAYLOAD_BYTES_MAX},` +
          `connectionBytesInFlightMax=${CONNECTION_BYTES_IN_FLIGHT_MAX},serverBytesInFlightMax=${SERVER_BYTES_IN_FLIGHT_MAX}`,
      },
    });
    const sockets = new Sockets();
    let stop = false;
    let maxRss = 0;
    const sampler = setInterval(() => {
      maxRss = Math.max(maxRss, rssBytes(unit.pid));
    }, RSS_SAMPLE_MS);
    const stats: HostileStats = { connected: 0, closedByUnit: 0, errors: 0 };
    let slots: Promise<void>[] = [];
    try {
      const baseline = await honestLoop(unit, sockets, random, BASELINE_MS);
      assert.deepEqual(baseline.errors, [], "quiet baseline");
      const baselineRss = rssBytes(unit.pid);

      slots = HOSTILE_ADDRESSES.flatMap((address, peer) =>
        Array.from({ length: HOSTILE_CONNECTIONS_PER_PEER }, (_, i) =>
          hostileSlot(unit, sockets, address, i % 2 === 1, seededRandom(SEED + 100 + peer * HOSTILE_CONNECTIONS_PER_PEER + i), () => stop, stats),
        ),
      );
      await sleep(HOSTILE_SETTLE_MS);
      const hostile = await honestLoop(unit, sockets, random, HOSTILE_PHASE_MS);
      stop = true;
      sockets.destroyAll();
      await Promise.all(slots);
      clearInterval(sampler);

      const summary =
        `baseline ${baseline.roundTrips} round trips in ${BASELINE_MS} ms (max ${Math.round(baseline.maxMs)} ms); ` +
        `hostile phase ${hostile.roundTrips} in ${HOSTILE_PHASE_MS} ms (max ${Math.round(hostile.maxMs)} ms, over ${ROUND_TRIP_MAX_MS} ms: [${hostile.over.join(", ")}]); ` +
        `hostile connections ${stats.connected}, closed by the unit ${stats.closedByUnit}, errors ${stats.errors}; ` +
        `unit RSS ${Math.round(baselineRss / 1e6)} MB after baseline, max ${Math.round(maxRss / 1e6)} MB`;
      t.diagnostic(summary);

      assertAlive(unit, "during the starvation attack");
      assert.deepEqual(hostile.errors, [], `the honest client is never refused or cut off (${summary})`);
      assert.ok(hostile.maxMs <= ROUND_TRIP_MAX_MS, `no honest round trip over payloadTimeoutMs + 1500 ms = ${ROUND_TRIP_MAX_MS} ms (${summary})`);
      const floor = Math.max(HONEST_ROUND_TRIPS_MIN, Math.floor((HONEST_SHARE_OF_BASELINE * baseline.roundTrips * HOSTILE_PHASE_MS) / BASELINE_MS));
      assert.ok(hostile.roundTrips >= floor, `at least ${floor} honest round trips, ${HONEST_SHARE_OF_BASELINE * 100}% of the baseline rate (${summary})`);
      assert.ok(stats.closedByUnit >= HOSTILE_ADDRESSES.length, `the unit closed the stalled connections (${summary})`);
      const logged = unit
        .stderr()
        .split("\n")
        .filter((line) => /payload/i.test(line) && /timed out|timeout/i.test(line) && /127\.0\.0\.[2-5]/.test(line));
      assert.ok(logged.length > 0, `the unit logs the stalled payloads it closes (stderr tail:\n${stderrTail(unit)})`);
      assert.ok(maxRss > 0 && maxRss < RSS_MAX_BYTES, `unit RSS stays under ${RSS_MAX_BYTES / 1e6} MB (${summary})`);

      // And it still serves once the attack is over.
      const after = await sockets.transmitting(unit);
      await roundTrip(after, 0, HONEST_BYTES);
    } finally {
      stop = true;
      clearInterval(sampler);
      sockets.destroyAll();
      await Promise.all(slots);
      await unit.close();
    }
  });
});

// ---------------------------------------------------------------- test 3

describe("a connection whose blocked request its own reply unblocks keeps reading", () => {
  test("two 4 MiB READs with one budget slot free, then a third request: all answered", async () => {
    const unit = await startUnit({
      capacity: "128M",
      volumes: [{ name: VOLUME, size: VOLUME_BYTES }],
      env: {
        IPSAN_NBD_LIMITS:
          `payloadBytesMax=${PAYLOAD_BYTES_MAX},connectionBytesInFlightMax=${CONNECTION_BYTES_IN_FLIGHT_MAX},` +
          `serverBytesInFlightMax=${SERVER_BYTES_IN_FLIGHT_MAX}`,
      },
    });
    const sockets = new Sockets();
    try {
      // Seven stalled 4 MiB writes leave one 4 MiB slot of the 32 MiB budget.
      const stallers = SERVER_BYTES_IN_FLIGHT_MAX / PAYLOAD_BYTES_MAX - 1;
      for (let i = 0; i < stallers; i += 1) await stalledWriter(unit, sockets, PAYLOAD_BYTES_MAX, 1, true);
      await sleep(200);
      const client = await sockets.transmitting(unit);
      // READ A takes the slot (over 1 MiB: it goes to the thread pool); READ B waits for budget.
      // When A is done its bytes come back and this connection's own B takes them at once.
      client.send(request({ flags: 0, type: NBD_CMD.READ, offset: 0, length: PAYLOAD_BYTES_MAX }));
      client.send(request({ flags: 0, type: NBD_CMD.READ, offset: PAYLOAD_BYTES_MAX, length: PAYLOAD_BYTES_MAX }));
      for (let i = 0; i < 2; i += 1) {
        const reply = await client.reply(PAYLOAD_BYTES_MAX);
        assert.equal(reply.errno, 0, "4 MiB READ");
      }
      // The connection must still read: a third request is answered (a stale "waiting for budget"
      // would leave the socket paused with no wake-up to come, and this client hung for ever).
      await roundTrip(client, 8 * MiB, 4 * KiB);
      assertAlive(unit, "after the reads");
    } finally {
      sockets.destroyAll();
      await unit.close();
    }
  });
});
