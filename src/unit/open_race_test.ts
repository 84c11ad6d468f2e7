// What this proves (issue 12, item 1): a connection opened while a volume is
// being deleted, regranted or repartitioned cannot keep the old view. Against
// a real `bin/ipsan unit` process (standalone, --allow 127.0.0.0/8, --control),
// each round:
//   1. dirties the page cache of the unit's storage file (hundreds of MiB
//      written into a filler volume and not flushed), so the fdatasync of the
//      table write takes tens to hundreds of ms: the window in which the unit
//      has picked the devices to revoke but not yet switched tables is wide
//      (dirty data in another file does not do it on ext4 with delayed
//      allocation: fdatasync of storage.img then takes about 1 ms);
//   2. runs 8 opener loops (raw NBD: greeting, flags, [STRUCTURED_REPLY], GO)
//      hammering the affected export from the affected peer address, keeping
//      every connection that reaches transmission;
//   3. issues the change through the control API and notes when it is
//      acknowledged;
//   4. after the acknowledgement, sends a READ and then a WRITE on every
//      connection that reached transmission (before, during or after the
//      change) and holds the old view. THE INVARIANT: each gets a nonzero NBD
//      error or finds the connection closed by the unit; none returns data or
//      success, and none stays silent (no answer within 3 s fails too).
//      Opens started after the acknowledgement are refused in the
//      handshake (NBD_REP_ERR_UNKNOWN for a deleted volume or a removed
//      partition, NBD_REP_ERR_POLICY for a peer no longer granted).
//   The bytes the new table gives someone else are checked too: for delete, a
//   volume created right after (on a's old extents) gets a pattern no stale
//   `a` connection may read or overwrite; for the grant move, the new owner
//   (127.0.0.2) writes a pattern no 127.0.0.1 connection may read or
//   overwrite; for the repartition, the old p2 bytes are rewritten through the
//   whole volume and no stale `a/p2` connection may read or overwrite them.
//   Repartition rounds alternate: p2 removed (odd rounds) or moved and shrunk
//   (even rounds); an open's size tells which table it saw, and a connection
//   to the new p2 is legitimate, so only old-size a/p2 connections are stale.
// Timings (dirty bytes, lead of the openers, jitter between opens, the
// pattern) come from a PRNG seeded per round; the seed is in the test name.
// IPSAN_OPEN_RACE_SEED=N replays a run's choices (round k uses N + k).
// Every opener loop is bounded in opens and time, every socket is destroyed
// at the end of its round, ports are chosen by the kernel, and only
// 127.0.0.1 / 127.0.0.2 are used.

import assert from "node:assert/strict";
import { performance } from "node:perf_hooks";
import { after, before, describe, test } from "node:test";
import { encodeInfoRequestData } from "../nbd/peer_codec.ts";
import { NBD_CMD, NBD_INFO, NBD_OPT, NBD_REP } from "../nbd/protocol.ts";
import { RawNbdClient } from "../nbd/testing/raw_client.ts";
import { controlOk, controlRequest } from "../testing/control.ts";
import { sleep } from "../testing/process.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";
import { seededRandom } from "../util/random.ts";

const MiB = 1024 * 1024;
const ROUNDS = 5;
const OPENERS = 8;
/** Opens per opener loop per round (8 x 60 = 480 connections at most, well under the unit's connectionsMax 1024). */
const OPENS_PER_LOOP_MAX = 60;
/** An opener loop stops after this long whatever happens. */
const OPENER_LOOP_MS_MAX = 4_000;
/** Openers keep going this long after the acknowledgement (opens that must now be refused). */
const AFTER_ACK_OPEN_MS = 40;
/** Dirty bytes written into the filler volume before each change: a seeded choice in this range. */
const DIRTY_MIB_MIN = 128;
const DIRTY_MIB_MAX = 224;
const DIRTY_CHUNK_BYTES = 4 * MiB;
const DIRTY_WINDOW = 8;
const FILLER_BYTES = DIRTY_MIB_MAX * MiB;
const VOLUME_BYTES = 16 * MiB;
const PROBE_BYTES = 4096;
/** A probe (READ or WRITE on a stale connection) gets an answer or a close within this; silence is a failure. */
const PROBE_TIMEOUT_MS = 3_000;
const OPEN_TIMEOUT_MS = 5_000;
const OWNER = "127.0.0.1";
const NEW_OWNER = "127.0.0.2";
/** Repartition: p1 4 MiB, p2 8 MiB; "remove" leaves p1 only, "move" makes p2 4 MiB at 6 MiB. */
const PARTITIONS_BEFORE = [4 * MiB, 8 * MiB];
const PARTITIONS_REMOVE = [4 * MiB];
const PARTITIONS_MOVE = [6 * MiB, 4 * MiB];
const OLD_P2_START = 4 * MiB;

const BASE_SEED = Number(process.env["IPSAN_OPEN_RACE_SEED"] ?? Math.floor(Math.random() * 1_000_000));

/** mulberry32 (util/random.ts): small, seeded, good enough for timings. */
const prng = seededRandom;

function between(random: () => number, low: number, high: number): number {
  return low + Math.floor(random() * (high - low + 1));
}

function patternFrom(random: () => number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) out.writeUInt32LE(Math.floor(random() * 2 ** 32), i);
  return out;
}

// ---- Opening exports ----

type OpenOutcome =
  | { kind: "open"; client: RawNbdClient; sizeBytes: number }
  | { kind: "refused"; replyType: number; message: string }
  | { kind: "failed"; error: string };

/** Greeting, flags, STRUCTURED_REPLY (optional), GO; a refusal is an answer, not an exception. */
async function openExport(unit: RunningUnit, localAddress: string, name: string, structured: boolean, sockets: Set<RawNbdClient>): Promise<OpenOutcome> {
  let client: RawNbdClient | undefined;
  try {
    client = await RawNbdClient.connect({ host: unit.host, port: unit.port, localAddress }, OPEN_TIMEOUT_MS);
    sockets.add(client);
    await client.handshake();
    if (structured) {
      const ack = await client.option(NBD_OPT.STRUCTURED_REPLY);
      if (ack.at(-1)?.replyType !== NBD_REP.ACK) throw new Error("STRUCTURED_REPLY not acknowledged");
    }
    const replies = await client.option(NBD_OPT.GO, encodeInfoRequestData(name, [NBD_INFO.BLOCK_SIZE]));
    const final = replies.at(-1);
    if (final === undefined) throw new Error("GO: no reply");
    if (final.replyType !== NBD_REP.ACK) {
      client.destroy();
      return { kind: "refused", replyType: final.replyType, message: final.data.toString() };
    }
    const info = replies.find((r) => r.replyType === NBD_REP.INFO && r.data.readUInt16BE(0) === NBD_INFO.EXPORT);
    if (info === undefined) throw new Error("GO: no NBD_INFO_EXPORT");
    return { kind: "open", client, sizeBytes: Number(info.data.readBigUInt64BE(2)) };
  } catch (error) {
    client?.destroy();
    return { kind: "failed", error: error instanceof Error ? error.message : String(error) };
  }
}

async function mustOpen(unit: RunningUnit, localAddress: string, name: string, sockets: Set<RawNbdClient>): Promise<RawNbdClient> {
  const outcome = await openExport(unit, localAddress, name, true, sockets);
  if (outcome.kind !== "open") throw new Error(`${localAddress} cannot open ${name}: ${JSON.stringify(outcome)}`);
  return outcome.client;
}

// ---- Requests on a legitimate connection ----

let cookie = 1;

async function writeOk(client: RawNbdClient, offset: number, data: Buffer): Promise<void> {
  const reply = await client.call({ cookieHi: 0, cookieLo: cookie++, flags: 0, type: NBD_CMD.WRITE, offset, length: data.length, payload: data });
  assert.equal(reply.errno, 0, `legitimate write at ${offset}`);
  const flush = await client.call({ cookieHi: 0, cookieLo: cookie++, flags: 0, type: NBD_CMD.FLUSH, offset: 0, length: 0 });
  assert.equal(flush.errno, 0, "legitimate flush");
}

async function readOk(client: RawNbdClient, offset: number, length: number): Promise<Buffer> {
  const reply = await client.call({ cookieHi: 0, cookieLo: cookie++, flags: 0, type: NBD_CMD.READ, offset, length });
  assert.equal(reply.errno, 0, `legitimate read at ${offset}`);
  assert.ok(reply.data !== undefined && reply.data.length === length, "legitimate read returns its data");
  return reply.data;
}

/** Writes `mib` MiB into the filler volume without flushing: dirty pages the next table fdatasync must write. */
async function dirtyPageCache(client: RawNbdClient, mib: number): Promise<void> {
  const chunk = Buffer.alloc(DIRTY_CHUNK_BYTES, 0x5a);
  const chunks = Math.ceil((mib * MiB) / DIRTY_CHUNK_BYTES);
  for (let first = 0; first < chunks; first += DIRTY_WINDOW) {
    const count = Math.min(DIRTY_WINDOW, chunks - first);
    for (let i = 0; i < count; i += 1) {
      client.send({ cookieHi: 0, cookieLo: cookie++, flags: 0, type: NBD_CMD.WRITE, offset: (first + i) * DIRTY_CHUNK_BYTES, length: chunk.length, payload: chunk });
    }
    for (let i = 0; i < count; i += 1) assert.equal((await client.reply()).errno, 0, "filler write");
  }
}

// ---- Probing a connection after the acknowledgement ----

type Probe = { kind: "error"; errno: number } | { kind: "closed" } | { kind: "served"; data: Buffer | undefined } | { kind: "silent"; error: string };

async function probe(client: RawNbdClient, type: typeof NBD_CMD.READ | typeof NBD_CMD.WRITE, offset: number, payload: Buffer): Promise<Probe> {
  if (client.isClosed) return { kind: "closed" };
  try {
    client.send(
      type === NBD_CMD.READ
        ? { cookieHi: 0, cookieLo: cookie++, flags: 0, type, offset, length: PROBE_BYTES }
        : { cookieHi: 0, cookieLo: cookie++, flags: 0, type, offset, length: payload.length, payload },
    );
    const reply = await withTimeout(client.reply(type === NBD_CMD.READ ? PROBE_BYTES : 0), PROBE_TIMEOUT_MS);
    if (reply.errno !== 0) return { kind: "error", errno: reply.errno };
    return { kind: "served", data: reply.data };
  } catch (error) {
    if (client.isClosed) return { kind: "closed" };
    return { kind: "silent", error: error instanceof Error ? error.message : String(error) };
  }
}

async function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

// ---- One round ----

interface OpenRecord {
  readonly loop: number;
  readonly startMs: number;
  readonly endMs: number;
  readonly outcome: OpenOutcome;
}

type Phase = "before" | "during" | "after";

function phaseOf(record: OpenRecord, sentMs: number, ackMs: number): Phase {
  if (record.startMs >= ackMs) return "after";
  if (record.endMs < sentMs) return "before";
  return "during";
}

const REPLY_NAMES: Readonly<Record<number, string>> = Object.fromEntries(Object.entries(NBD_REP).map(([name, value]) => [value, `NBD_REP_${name}`]));

function replyName(type: number): string {
  return REPLY_NAMES[type] ?? `0x${type.toString(16)}`;
}

interface Scenario {
  /** The peer address the openers use and the export they open. */
  readonly peer: string;
  readonly exportName: string;
  /** Refusal expected for opens started after the acknowledgement. */
  readonly refusedAfter: number;
  /** Issues the change; resolves when the unit has acknowledged it. */
  change(): Promise<void>;
  /** After the acknowledgement: writes the pattern through a connection the new table permits; returns how to read it back. */
  claim(pattern: Buffer, sockets: Set<RawNbdClient>): Promise<{ probeOffset: number; readBack: () => Promise<Buffer>; note: string }>;
  /** True if a connection opened with this size holds the old view (must be cut off). */
  stale(sizeBytes: number): boolean;
  /** An open after the acknowledgement that the new table permits (repartition "move": the new p2). */
  permittedAfter(outcome: OpenOutcome): boolean;
}

interface RoundResult {
  readonly summary: string;
  readonly failures: string[];
}

async function runRound(unit: RunningUnit, label: string, seed: number, scenario: Scenario, random: () => number, sockets: Set<RawNbdClient>): Promise<RoundResult> {
  const dirtyMib = between(random, DIRTY_MIB_MIN, DIRTY_MIB_MAX);
  const leadMs = between(random, 2, 30);
  const jitterMs = between(random, 0, 2);
  const pattern = patternFrom(random, PROBE_BYTES);
  const junk = Buffer.alloc(PROBE_BYTES, 0xee);

  const filler = await mustOpen(unit, OWNER, "filler", sockets);
  await dirtyPageCache(filler, dirtyMib);
  filler.destroy();

  const records: OpenRecord[] = [];
  let stop = false;
  const loopStartMs = performance.now();
  const loops = Array.from({ length: OPENERS }, async (_, loop) => {
    const structured = loop % 2 === 0;
    for (let i = 0; i < OPENS_PER_LOOP_MAX && !stop && performance.now() - loopStartMs < OPENER_LOOP_MS_MAX; i += 1) {
      const startMs = performance.now();
      const outcome = await openExport(unit, scenario.peer, scenario.exportName, structured, sockets);
      records.push({ loop, startMs, endMs: performance.now(), outcome });
      if (jitterMs > 0) await sleep(jitterMs);
    }
  });

  await sleep(leadMs);
  const sentMs = performance.now();
  let ackMs = sentMs;
  try {
    await scenario.change();
    ackMs = performance.now();
    await sleep(AFTER_ACK_OPEN_MS);
  } finally {
    stop = true;
    await Promise.all(loops);
  }

  const failures: string[] = [];
  const claimed = await scenario.claim(pattern, sockets);

  // Every connection that reached transmission with the old view: READ, then WRITE, all sent after the acknowledgement.
  const opened = records.filter((r): r is OpenRecord & { outcome: Extract<OpenOutcome, { kind: "open" }> } => r.outcome.kind === "open");
  const stale = opened.filter((r) => scenario.stale(r.outcome.sizeBytes));
  const reads = await Promise.all(stale.map((r) => probe(r.outcome.client, NBD_CMD.READ, claimed.probeOffset, junk)));
  const writes = await Promise.all(stale.map((r) => probe(r.outcome.client, NBD_CMD.WRITE, claimed.probeOffset, junk)));
  const readBack = await claimed.readBack();

  const count = { before: 0, during: 0, after: 0 };
  const served = { before: 0, during: 0, after: 0 };
  let readsServed = 0;
  let patternLeaked = 0;
  let writesServed = 0;
  let silent = 0;
  let refusedDuring = 0;
  let failedOpens = 0;
  for (const record of records) {
    const phase = phaseOf(record, sentMs, ackMs);
    count[phase] += 1;
    if (phase === "during" && record.outcome.kind === "refused") refusedDuring += 1;
    if (phase === "during" && record.outcome.kind === "failed") failedOpens += 1;
  }
  stale.forEach((record, i) => {
    const read = reads[i];
    const write = writes[i];
    const phase = phaseOf(record, sentMs, ackMs);
    const readServed = read?.kind === "served";
    const writeServed = write?.kind === "served";
    if (readServed) readsServed += 1;
    if (readServed && read.data !== undefined && read.data.equals(pattern)) patternLeaked += 1;
    if (writeServed) writesServed += 1;
    if (read?.kind === "silent" || write?.kind === "silent") silent += 1;
    if (readServed || writeServed) served[phase] += 1;
  });

  const staleServed = served.before + served.during + served.after;
  const summary =
    `${label} seed ${seed}: dirty ${dirtyMib} MiB, lead ${leadMs} ms, jitter ${jitterMs} ms, change acknowledged after ${(ackMs - sentMs).toFixed(0)} ms; ` +
    `${records.length} opens (${count.before} before, ${count.during} during, ${count.after} after the change; ${refusedDuring} refused and ${failedOpens} dropped during); ` +
    `${served.during} of ${count.during} connections opened during the change still served after it ` +
    `(${staleServed} of ${stale.length} old-view connections in all: ${readsServed} READs and ${writesServed} WRITEs answered with success, ` +
    `${patternLeaked} READs returned the bytes the new table gives to someone else, ${silent} probes unanswered); ${claimed.note}`;

  if (staleServed > 0) failures.push(`${staleServed} of ${stale.length} stale connections still served (${served.during} of ${count.during} opened during the change, ${served.before} before, ${served.after} after)`);
  if (silent > 0) failures.push(`${silent} stale connections neither answered nor were closed within ${PROBE_TIMEOUT_MS} ms`);
  if (!readBack.equals(pattern)) failures.push("the bytes the new table gives to someone else were overwritten through a stale connection");
  const wrongAfter = records.filter((r) => phaseOf(r, sentMs, ackMs) === "after" && !scenario.permittedAfter(r.outcome) && !(r.outcome.kind === "refused" && r.outcome.replyType === scenario.refusedAfter));
  if (wrongAfter.length > 0) {
    const examples = wrongAfter.slice(0, 3).map((r) => (r.outcome.kind === "refused" ? replyName(r.outcome.replyType) : r.outcome.kind === "open" ? `open (${r.outcome.sizeBytes} bytes)` : r.outcome.error));
    failures.push(`${wrongAfter.length} of ${count.after} opens after the acknowledgement were not refused with ${replyName(scenario.refusedAfter)} (${examples.join(", ")})`);
  }
  if (count.during === 0) failures.push("no open overlapped the change: the round proves nothing");
  // A dropped handshake is a refusal during the change, but not before it (the unit is broken) nor after it (the reply must say why).
  const failedOutside = records.filter((r) => r.outcome.kind === "failed" && phaseOf(r, sentMs, ackMs) !== "during");
  if (failedOutside.length > 0) {
    const example = failedOutside[0]?.outcome;
    failures.push(`${failedOutside.length} opens before or after the change failed without an NBD answer (${example?.kind === "failed" ? example.error : ""})`);
  }
  return { summary, failures };
}

function destroyAll(sockets: Set<RawNbdClient>): void {
  for (const client of sockets) client.destroy();
  sockets.clear();
}

async function roundTest(unit: () => RunningUnit, label: string, round: number, setup: () => Promise<Scenario>): Promise<void> {
  const seed = BASE_SEED + round;
  const sockets = new Set<RawNbdClient>();
  try {
    const scenario = await setup();
    const result = await runRound(unit(), label, seed, scenario, prng(seed), sockets);
    process.stderr.write(`open race: ${result.summary}\n`);
    assert.deepEqual(result.failures, [], `${result.summary}\nunit stderr tail:\n${unit().stderr().slice(-2000)}`);
  } finally {
    destroyAll(sockets);
  }
}

async function startRaceUnit(): Promise<RunningUnit> {
  return startUnit({
    capacity: `${FILLER_BYTES / MiB + 4 * (VOLUME_BYTES / MiB) + 16}M`,
    allow: ["127.0.0.0/8"],
    control: true,
    volumes: [{ name: "filler", size: FILLER_BYTES }],
  });
}

async function volumeExists(unit: RunningUnit, name: string): Promise<boolean> {
  const response = await controlRequest(unit, "GET", `/v1/volumes/${name}`);
  if (response.status === 404) return false;
  assert.equal(response.status, 200, `GET /v1/volumes/${name}: ${JSON.stringify(response.body)}`);
  return true;
}

interface ExtentBody {
  readonly startLba: number;
  readonly lengthLba: number;
}

function extentsOf(body: unknown): ExtentBody[] {
  return (body as { extents: ExtentBody[] }).extents.map((e) => ({ startLba: e.startLba, lengthLba: e.lengthLba }));
}

describe(`open during a table change keeps no old view (IPSAN_OPEN_RACE_SEED=${BASE_SEED})`, () => {
  describe("(a) delete", () => {
    let unit: RunningUnit | undefined;
    const running = (): RunningUnit => unit ?? assert.fail("unit not started");
    before(async () => {
      unit = await startRaceUnit();
    });
    after(async () => {
      await unit?.close();
    });
    for (let round = 0; round < ROUNDS; round += 1) {
      test(`delete round ${round + 1} seed ${BASE_SEED + round}: connections opened during DELETE are cut off, and cannot touch the volume created next on a's extents`, async () => {
        await roundTest(running, `delete round ${round + 1}`, round, async () => {
          const u = running();
          if (await volumeExists(u, "b")) await controlOk(u, "DELETE", "/v1/volumes/b");
          if (await volumeExists(u, "a")) await controlOk(u, "DELETE", "/v1/volumes/a");
          const oldExtents = extentsOf(await controlOk(u, "POST", "/v1/volumes", { name: "a", sizeBytes: VOLUME_BYTES }));
          return {
            peer: OWNER,
            exportName: "a",
            refusedAfter: NBD_REP.ERR_UNKNOWN,
            async change() {
              const response = await controlRequest(u, "DELETE", "/v1/volumes/a");
              assert.equal(response.status, 204, `DELETE /v1/volumes/a: ${JSON.stringify(response.body)}`);
            },
            async claim(pattern, sockets) {
              const created = extentsOf(await controlOk(u, "POST", "/v1/volumes", { name: "b", sizeBytes: VOLUME_BYTES }));
              const reused = JSON.stringify(created) === JSON.stringify(oldExtents);
              const owner = await mustOpen(u, OWNER, "b", sockets);
              await writeOk(owner, 0, pattern);
              return {
                probeOffset: 0,
                readBack: () => readOk(owner, 0, PROBE_BYTES),
                note: `volume b ${reused ? "reuses a's extents exactly" : `has extents ${JSON.stringify(created)} (a had ${JSON.stringify(oldExtents)})`}`,
              };
            },
            stale: () => true,
            permittedAfter: () => false,
          };
        });
      });
    }
  });

  describe(`(b) grant move ${OWNER} -> ${NEW_OWNER}`, () => {
    let unit: RunningUnit | undefined;
    const running = (): RunningUnit => unit ?? assert.fail("unit not started");
    before(async () => {
      unit = await startRaceUnit();
      await controlOk(unit, "POST", "/v1/volumes", { name: "a", sizeBytes: VOLUME_BYTES });
    });
    after(async () => {
      await unit?.close();
    });
    for (let round = 0; round < ROUNDS; round += 1) {
      test(`grant move round ${round + 1} seed ${BASE_SEED + round}: ${OWNER} connections opened during the move are cut off and never read ${NEW_OWNER}'s data`, async () => {
        await roundTest(running, `grant move round ${round + 1}`, round, async () => {
          const u = running();
          await controlOk(u, "PUT", "/v1/volumes/a/grants", { hosts: [OWNER] });
          return {
            peer: OWNER,
            exportName: "a",
            refusedAfter: NBD_REP.ERR_POLICY,
            async change() {
              const response = await controlRequest(u, "PUT", "/v1/volumes/a/grants", { hosts: [NEW_OWNER] });
              assert.equal(response.status, 200, `PUT /v1/volumes/a/grants: ${JSON.stringify(response.body)}`);
            },
            async claim(pattern, sockets) {
              const owner = await mustOpen(u, NEW_OWNER, "a", sockets);
              await writeOk(owner, 0, pattern);
              return { probeOffset: 0, readBack: () => readOk(owner, 0, PROBE_BYTES), note: `${NEW_OWNER} wrote its pattern at offset 0` };
            },
            stale: () => true,
            permittedAfter: () => false,
          };
        });
      });
    }
  });

  describe("(c) repartition", () => {
    let unit: RunningUnit | undefined;
    const running = (): RunningUnit => unit ?? assert.fail("unit not started");
    before(async () => {
      unit = await startRaceUnit();
      await controlOk(unit, "POST", "/v1/volumes", { name: "a", sizeBytes: VOLUME_BYTES });
    });
    after(async () => {
      await unit?.close();
    });
    for (let round = 0; round < ROUNDS; round += 1) {
      const seed = BASE_SEED + round;
      // Odd rounds remove p2, even rounds move it (to 6 MiB, and shrink it, so an open's size tells which table it saw).
      const variant = round % 2 === 0 ? "remove" : "move";
      const partitionsAfter = variant === "remove" ? PARTITIONS_REMOVE : PARTITIONS_MOVE;
      const oldP2Bytes = PARTITIONS_BEFORE[1] ?? 0;
      const newP2Bytes = partitionsAfter[1];
      test(`repartition round ${round + 1} seed ${seed}: a/p2 connections opened while p2 is ${variant === "remove" ? "removed" : "moved"} are cut off`, async () => {
        await roundTest(running, `repartition (${variant} p2) round ${round + 1}`, round, async () => {
          const u = running();
          await controlOk(u, "PUT", "/v1/volumes/a/partitions", { sizesBytes: PARTITIONS_BEFORE });
          return {
            peer: OWNER,
            exportName: "a/p2",
            refusedAfter: NBD_REP.ERR_UNKNOWN,
            async change() {
              const response = await controlRequest(u, "PUT", "/v1/volumes/a/partitions", { sizesBytes: partitionsAfter });
              assert.equal(response.status, 200, `PUT /v1/volumes/a/partitions: ${JSON.stringify(response.body)}`);
            },
            async claim(pattern, sockets) {
              // The old p2's first bytes now belong to p1 ("move") or to no partition ("remove"): write them through the whole volume.
              const whole = await mustOpen(u, OWNER, "a", sockets);
              await writeOk(whole, OLD_P2_START, pattern);
              return {
                probeOffset: 0,
                readBack: () => readOk(whole, OLD_P2_START, PROBE_BYTES),
                note: `p2 ${variant === "remove" ? "removed" : `moved to ${(PARTITIONS_MOVE[0] ?? 0) / MiB} MiB (${(newP2Bytes ?? 0) / MiB} MiB)`}`,
              };
            },
            // A connection with the old p2's size holds the old view; one with the new p2's size opened the new table.
            stale: (sizeBytes) => sizeBytes === oldP2Bytes,
            permittedAfter: (outcome) => outcome.kind === "open" && newP2Bytes !== undefined && outcome.sizeBytes === newP2Bytes,
          };
        });
      });
    }
  });
});
