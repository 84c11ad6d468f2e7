// Proves issue 6 section 7 for the mirror engine: a FUA write or a FLUSH that
// the engine acknowledges has been fdatasync'ed on EVERY healthy leg (both
// legs in sync, none failing) before the engine's reply left it, and every
// write's data was on every leg before the engine answered it.
// src/unit/durability_sync_test.ts proves the unit's side (it syncs before it
// answers a FUA request or a FLUSH); this test proves the engine gets that
// sync from every leg, whatever it asks (here: FUA passed on, a FLUSH to each
// leg), and waits for all of them before it answers. A kill -9 test cannot
// show this (the page cache outlives the processes).
//
// How: two real `ipsan unit`s (legs "a" and "b", one volume each of the
// mirror's size + 1 MiB) and a real `ipsan host engine` over them, all three
// under `strace -f` with unix timestamps in nanoseconds, which compare across
// the three logs (one kernel clock). A raw NBD client on the engine's Unix
// socket sends, one at a time and each with its own random cookie:
//   FUA WRITE 4 KiB and 1 MiB, two plain WRITEs then a FLUSH, and a plain
//   WRITE on one connection followed by a FLUSH on the other (the engine
//   advertises CAN_MULTI_CONN).
// In the engine's trace, for every request:
//   request  the socket read whose bytes hold its 28-byte header (cookie);
//   reply    the later socket write on that fd holding its 16-byte reply.
// In each unit's trace:
//   data     the pwrite64/pwritev/fallocate calls on storage.img covering the
//            write's range at the leg offset (the volume's extent + the
//            mirror offset; the first one carries the payload's first bytes);
//            they must have returned before the engine's reply;
//   sync     for FUA and FLUSH: an fdatasync/fsync of storage.img returning 0
//            that ENTERED after that unit's data had returned (line order in
//            the unit's log; for a FLUSH, the data of the writes it covers)
//            and after the engine had read the request, and had RETURNED
//            before the engine's reply write entered. For a FUA WRITE the
//            unit's data writes may instead all go through a descriptor of
//            storage.img opened with O_DSYNC (traced openat): each synced its
//            range before returning (the unit's range-synced FUA, ADR 0020).
// Times are bounds strace makes safe (strace.ts): a call's entry time is
// before the kernel ran it; a call printed on one line carries its entry
// time, so its return is bounded by the next line's time (or its resumed
// line). "Returned before the reply" is therefore "returned by a time earlier
// than the time the engine's reply write was entered", never an estimate.
// The unit's request from the engine (with or without FUA) and its answer are
// shown in the report, not required: a correct engine may choose how it asks.
// Canary: the same run with a patched copy of the engine that passes FUA as
// false and whose FLUSH resolves without calling the legs must fail, with
// every durable request missing its sync on both legs and nothing else.
// The engine's own metadata writes are FUA (intent bits, before a write's
// data; retired intent, once a region is idle for 2 s, after a FLUSH of the
// legs): the requests are sent
// back to back, well within 2 s, so none of them lands inside a request's
// window and hands the canary a sync by chance. Loopback only, ports chosen
// by the kernel, data dirs on tmpfs (the subject is which calls are made in
// which order, not what the disk does with them); strace must be installed
// (no skip).

import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { mkdirSync, readFileSync, realpathSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { encodeRequest } from "../../nbd/peer_codec.ts";
import { NBD_CMD, NBD_CMD_FLAG, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBD_TFLAG } from "../../nbd/protocol.ts";
import { RawNbdClient } from "../../nbd/testing/raw_client.ts";
import { controlOk } from "../../testing/control.ts";
import { logFields } from "../../testing/engine.ts";
import { patchedBuild } from "../../testing/patched_build.ts";
import { waitFor } from "../../testing/process.ts";
import { describeLine, dsyncFds, enteredAtNs, parseStraceLog, returnedByNs, stringsIn, type StraceLog, type Syscall } from "../../testing/strace.ts";
import { makeTempDir, memoryTmpBase } from "../../testing/tmp.ts";
import { startEngineUnderStrace } from "../../testing/traced_engine.ts";
import { startUnitUnderStrace, type TraceOptions } from "../../testing/traced_unit.ts";
import { IPSAN_BIN, type RunningUnit } from "../../testing/unit.ts";
import { METADATA_BYTES } from "./metadata.ts";

const KIB = 1024;
const MIB = 1024 * KIB;
const DATA_BYTES = 16 * MIB;
const LEG_BYTES = DATA_BYTES + METADATA_BYTES;
const VOLUME = "m";
const MIRROR = "md";
const LEGS = ["a", "b"] as const;

const SOCKET_READS = new Set(["read", "readv", "recvfrom", "recvmsg"]);
const SOCKET_WRITES = new Set(["write", "writev", "sendto", "sendmsg"]);
const STORAGE_WRITES = new Set(["pwrite64", "pwritev", "pwritev2", "fallocate"]);
const SYNCS = new Set(["fdatasync", "fsync"]);
/** The unit: requests in, data to the storage, syncs, replies out. */
const UNIT_SYSCALLS = [...SOCKET_READS, ...SOCKET_WRITES, ...STORAGE_WRITES, ...SYNCS, "openat", "io_uring_setup"];
/** The engine: requests in and replies out, on its clients' and its legs' sockets. */
const ENGINE_SYSCALLS = [...SOCKET_READS, ...SOCKET_WRITES, "io_uring_setup"];
const trace = (file: string, syscalls: readonly string[]): TraceOptions => ({ file, syscalls, stringBytes: 96, timestamps: "unix-ns" });

interface Op {
  readonly label: string;
  /** Which of the two client connections sends it. */
  readonly conn: 0 | 1;
  readonly type: number;
  readonly flags: number;
  /** Offset in the mirror (and so on each leg). */
  readonly offset: number;
  readonly length: number;
  readonly payload?: Buffer;
  /** For a FLUSH: the plain writes (answered before it was sent) it must cover. */
  readonly covers?: readonly string[];
  readonly cookieHi: number;
  readonly cookieLo: number;
}

function makeOps(): Op[] {
  const cookie = (): { cookieHi: number; cookieLo: number } => ({ cookieHi: randomInt(0, 2 ** 32), cookieLo: randomInt(0, 2 ** 32) });
  const write = (label: string, conn: 0 | 1, offset: number, length: number, flags: number): Op => ({
    label,
    conn,
    type: NBD_CMD.WRITE,
    flags,
    offset,
    length,
    payload: randomBytes(length),
    ...cookie(),
  });
  const flush = (label: string, conn: 0 | 1, covers: string[]): Op => ({ label, conn, type: NBD_CMD.FLUSH, flags: 0, offset: 0, length: 0, covers, ...cookie() });
  const { FUA } = NBD_CMD_FLAG;
  return [
    write("FUA WRITE 4 KiB", 0, 64 * KIB, 4 * KIB, FUA),
    write("FUA WRITE 1 MiB", 0, 2 * MIB, MIB, FUA),
    write("WRITE 4 KiB", 0, 5 * MIB, 4 * KIB, 0),
    write("WRITE 64 KiB", 0, 6 * MIB + 64 * KIB, 64 * KIB, 0),
    flush("FLUSH", 0, ["WRITE 4 KiB", "WRITE 64 KiB"]),
    write("WRITE 4 KiB, FLUSH elsewhere", 0, 8 * MIB, 4 * KIB, 0),
    flush("FLUSH on the 2nd connection", 1, ["WRITE 4 KiB, FLUSH elsewhere"]),
  ];
}

function isDurable(op: Op): boolean {
  return op.type === NBD_CMD.FLUSH || (op.flags & NBD_CMD_FLAG.FUA) !== 0;
}

function requestHeader(op: Op): Buffer {
  return encodeRequest({ flags: op.flags, type: op.type, cookieHi: op.cookieHi, cookieLo: op.cookieLo, offset: op.offset, length: op.length });
}

function simpleReply(cookieHi: number, cookieLo: number): Buffer {
  const reply = Buffer.alloc(16);
  reply.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  reply.writeUInt32BE(0, 4);
  reply.writeUInt32BE(cookieHi, 8);
  reply.writeUInt32BE(cookieLo, 12);
  return reply;
}

/** The bytes strace printed for a call's buffers, each alone and all joined (an iovec). */
function printedBytes(call: Syscall): Buffer[] {
  const buffers = call.args.slice(1).flatMap((arg) => stringsIn(arg));
  return [...buffers, Buffer.concat(buffers)];
}

function carries(call: Syscall, needle: Buffer): boolean {
  return printedBytes(call).some((b) => b.includes(needle));
}

interface LegHeader {
  readonly flags: number;
  readonly type: number;
  readonly cookieHi: number;
  readonly cookieLo: number;
  readonly offset: number;
  readonly length: number;
}

/** Every whole NBD request header in the printed bytes of a socket read. */
function requestHeadersIn(call: Syscall): LegHeader[] {
  const magic = Buffer.alloc(4);
  magic.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
  const out: LegHeader[] = [];
  for (const bytes of printedBytes(call).slice(0, -1)) {
    for (let at = bytes.indexOf(magic); at >= 0 && at + 28 <= bytes.length; at = bytes.indexOf(magic, at + 1)) {
      out.push({
        flags: bytes.readUInt16BE(at + 4),
        type: bytes.readUInt16BE(at + 6),
        cookieHi: bytes.readUInt32BE(at + 8),
        cookieLo: bytes.readUInt32BE(at + 12),
        offset: Number(bytes.readBigUInt64BE(at + 16)),
        length: bytes.readUInt32BE(at + 24),
      });
    }
  }
  return out;
}

/** The storage bytes a successful data call touched, [start, end). */
function storageRange(call: Syscall): [number, number] | undefined {
  if (call.ret === undefined || call.ret < 0) return undefined;
  if (call.name === "fallocate") return call.ret === 0 ? [Number(call.args[2]), Number(call.args[2]) + Number(call.args[3])] : undefined;
  if (call.ret === 0) return undefined;
  return [Number(call.args[3]), Number(call.args[3]) + call.ret];
}

/** Whether the ranges cover [start, end) with no gap. */
function covered(ranges: readonly [number, number][], start: number, end: number): boolean {
  let reached = start;
  for (const [from, to] of [...ranges].sort((a, b) => a[0] - b[0])) {
    if (from > reached) break;
    reached = Math.max(reached, to);
  }
  return reached >= end;
}

/** One traced leg: its unit's log, where the volume starts on the storage, which fd paths are the storage. */
interface TracedLeg {
  readonly name: string;
  readonly log: StraceLog;
  readonly storageStart: number;
  readonly isStorage: (path: string | undefined) => boolean;
}

type ViolationKind = "request" | "reply" | "data" | "payload" | "sync";
interface Violation {
  readonly label: string;
  /** The leg, or undefined for the engine's side. */
  readonly leg: string | undefined;
  readonly kind: ViolationKind;
  readonly message: string;
}

interface LegEvidence {
  readonly leg: string;
  /** The unit's read of the engine's request for this op (shown, not required). */
  legRequest: { call: Syscall; header: LegHeader } | undefined;
  /** The unit's answer to it (shown, not required). */
  legReply: Syscall | undefined;
  data: Syscall[];
  sync: Syscall | undefined;
  syncReturnedByNs: bigint | undefined;
}

interface OpEvidence {
  readonly label: string;
  readonly durable: boolean;
  request: Syscall | undefined;
  /** A time by which the engine had read the request. */
  requestReadByNs: bigint | undefined;
  reply: Syscall | undefined;
  /** When the engine's reply write entered: before its bytes left the engine. */
  replyAtNs: bigint | undefined;
  /** When the client had the reply (its own clock reading; shown, not used). */
  clientNs: bigint | undefined;
  legs: LegEvidence[];
}

interface Verdict {
  readonly violations: Violation[];
  readonly evidence: OpEvidence[];
}

/**
 * The check. `engineLog` is the engine's trace; `legs` the units' traces.
 * Every durable op needs, on every leg, a storage sync that entered after
 * that leg's data and after the engine read the request, and returned before
 * the engine's reply write entered.
 */
function checkEngineSyncs(engineLog: StraceLog, legs: readonly TracedLeg[], ops: readonly Op[], clientNs: readonly (bigint | undefined)[] = []): Verdict {
  const violations: Violation[] = [];
  const evidence: OpEvidence[] = [];
  const byLabel = new Map<string, OpEvidence>();
  const at = (log: StraceLog, n: number): string => `L${n + 1} ${describeLine(log.lines[n], 160)}`;
  ops.forEach((op, index) => {
    const found: OpEvidence = {
      label: op.label,
      durable: isDurable(op),
      request: undefined,
      requestReadByNs: undefined,
      reply: undefined,
      replyAtNs: undefined,
      clientNs: clientNs[index],
      legs: [],
    };
    evidence.push(found);
    byLabel.set(op.label, found);
    const fail = (leg: string | undefined, kind: ViolationKind, message: string): void => {
      violations.push({ label: op.label, leg, kind, message: `${op.label}${leg === undefined ? " (engine)" : ` on leg ${leg}`}: ${message}` });
    };
    const header = requestHeader(op);
    found.request = engineLog.syscalls.find((c) => SOCKET_READS.has(c.name) && (c.ret ?? 0) > 0 && carries(c, header));
    const request = found.request;
    if (request === undefined) return fail(undefined, "request", `no socket read of the engine carries its request header ${header.toString("hex")}`);
    found.requestReadByNs = returnedByNs(engineLog, request);
    const replyBytes = simpleReply(op.cookieHi, op.cookieLo);
    found.reply = engineLog.syscalls.find((c) => SOCKET_WRITES.has(c.name) && c.fd === request.fd && c.entryLine > request.exitLine && (c.ret ?? 0) > 0 && carries(c, replyBytes));
    const reply = found.reply;
    if (reply === undefined) return fail(undefined, "reply", `no write of the engine on fd ${request.fd} after ${at(engineLog, request.exitLine)} carries its reply ${replyBytes.toString("hex")}`);
    const replyAt = enteredAtNs(reply);
    found.replyAtNs = replyAt;
    const readBy = found.requestReadByNs;
    for (const leg of legs) {
      const e: LegEvidence = { leg: leg.name, legRequest: undefined, legReply: undefined, data: [], sync: undefined, syncReturnedByNs: undefined };
      found.legs.push(e);
      const log = leg.log;
      // The engine's request to this leg, as the unit read it (after the engine had the client's).
      for (const call of log.syscalls) {
        if (!SOCKET_READS.has(call.name) || (call.ret ?? 0) <= 0 || leg.isStorage(call.fdPath) || readBy === undefined || enteredAtNs(call) <= readBy) continue;
        const legHeader = requestHeadersIn(call).find((h) => h.type === op.type && h.offset === op.offset && h.length === op.length);
        if (legHeader !== undefined) {
          e.legRequest = { call, header: legHeader };
          const answer = simpleReply(legHeader.cookieHi, legHeader.cookieLo);
          e.legReply = log.syscalls.find((c) => SOCKET_WRITES.has(c.name) && c.fd === call.fd && c.entryLine > call.exitLine && carries(c, answer));
          break;
        }
      }
      const storageCalls = log.syscalls.filter((c) => leg.isStorage(c.fdPath));
      const durableFds = dsyncFds(log, leg.isStorage);
      let dataDone = -1;
      if (op.type === NBD_CMD.WRITE) {
        const start = leg.storageStart + op.offset;
        const end = start + op.length;
        // The calls on its range that entered after the engine had the request and returned before the engine's reply.
        const inRange = storageCalls.filter((c) => {
          const range = STORAGE_WRITES.has(c.name) ? storageRange(c) : undefined;
          return range !== undefined && range[0] < end && range[1] > start && readBy !== undefined && enteredAtNs(c) > readBy;
        });
        e.data = inRange.filter((c) => (returnedByNs(log, c) ?? replyAt) < replyAt);
        if (!covered(e.data.map((c) => storageRange(c) as [number, number]), start, end)) {
          fail(
            leg.name,
            "data",
            `storage bytes [${start}, ${end}) not all written after the engine read the request and before its reply ${at(engineLog, reply.entryLine)}; found ${e.data.map((c) => at(log, c.exitLine)).join("; ") || "nothing"}` +
              (inRange.length > e.data.length ? `; returned too late: ${inRange.filter((c) => !e.data.includes(c)).map((c) => at(log, c.exitLine)).join("; ")}` : ""),
          );
          continue;
        }
        dataDone = Math.max(...e.data.map((c) => c.exitLine));
        const first = e.data.find((c) => storageRange(c)?.[0] === start);
        const printed = first === undefined ? undefined : stringsIn(first.args[1] ?? "")[0];
        if (op.payload !== undefined && (printed === undefined || printed.length === 0 || !op.payload.subarray(0, printed.length).equals(printed))) {
          fail(leg.name, "payload", `the storage write at ${start} does not carry the payload's first bytes: ${first === undefined ? "none" : at(log, first.exitLine)}`);
        }
      }
      if (!isDurable(op)) continue;
      // A FUA write whose every storage write on this leg went through an O_DSYNC descriptor of the storage synced its own
      // range before it returned (the unit's Storage.writeDurable), and it returned before the engine's reply.
      if (op.type === NBD_CMD.WRITE && e.data.length > 0 && e.data.every((c) => c.fd !== undefined && durableFds.has(c.fd))) {
        e.sync = e.data.reduce((last, c) => (c.exitLine > last.exitLine ? c : last));
        e.syncReturnedByNs = returnedByNs(log, e.sync);
        continue;
      }
      for (const label of op.covers ?? []) {
        const earlier = byLabel.get(label)?.legs.find((l) => l.leg === leg.name);
        assert.ok(earlier !== undefined && earlier.data.length > 0, `${op.label} covers ${label}, which must come first and have data on leg ${leg.name}`);
        dataDone = Math.max(dataDone, ...earlier.data.map((c) => c.exitLine));
      }
      e.sync = storageCalls.find((c) => {
        if (!SYNCS.has(c.name) || c.ret !== 0 || c.entryLine <= dataDone || readBy === undefined || enteredAtNs(c) <= readBy) return false;
        const returnedBy = returnedByNs(log, c);
        return returnedBy !== undefined && returnedBy < replyAt;
      });
      e.syncReturnedByNs = e.sync === undefined ? undefined : returnedByNs(log, e.sync);
      if (e.sync === undefined) {
        // Syncs that overlap the request's window but started too early or returned too late.
        const overlapping = storageCalls.filter((c) => SYNCS.has(c.name) && (returnedByNs(log, c) ?? replyAt) > (readBy ?? 0n) && enteredAtNs(c) < replyAt);
        fail(
          leg.name,
          "sync",
          `no fdatasync/fsync of the storage entered after ${dataDone < 0 ? "the engine read the request" : `${at(log, dataDone)} and after the engine read the request`} and returned before the engine's reply ${at(engineLog, reply.entryLine)}` +
            (overlapping.length === 0
              ? "; none at all between the request and the reply"
              : `; storage syncs overlapping that window: ${overlapping.map((c) => `${c.name} entered L${c.entryLine + 1}, returned L${c.exitLine + 1} = ${c.result}`).join("; ")}`),
        );
      }
    }
  });
  return { violations, evidence };
}

/** "WRITE+FUA", "FLUSH", ... */
function commandName(header: LegHeader): string {
  const name = Object.entries(NBD_CMD).find(([, value]) => value === header.type)?.[0] ?? `command ${header.type}`;
  return (header.flags & NBD_CMD_FLAG.FUA) !== 0 ? `${name}+FUA` : name;
}

/** µs from `from` to `to`, signed, for the report. */
function micros(from: bigint | undefined, to: bigint | undefined): string {
  if (from === undefined || to === undefined) return "?";
  const us = Number(to - from) / 1000;
  return `${us >= 0 ? "+" : ""}${us.toFixed(0)} µs`;
}

/** One line per request and leg: where the traces show the request, each leg's data and sync, and the reply (times from the engine's read). */
function summarize(verdict: Verdict): string {
  return verdict.evidence
    .map((e) => {
      const t0 = e.requestReadByNs;
      const head = `  ${e.label}: engine read ${e.request === undefined ? "-" : `L${e.request.exitLine + 1}`}, engine reply ${e.reply === undefined ? "-" : `L${e.reply.entryLine + 1} at ${micros(t0, e.replyAtNs)}`}, client had it at ${micros(t0, e.clientNs)}`;
      const legs = e.legs.map((l) => {
        const request = l.legRequest === undefined ? "no request from the engine" : `got ${commandName(l.legRequest.header)} L${l.legRequest.call.exitLine + 1}`;
        const data = l.data.length === 0 ? "" : ` | data ${l.data.map((c) => `${c.name} L${c.exitLine + 1}`).join(", ")}`;
        const sync = l.sync === undefined ? (e.durable ? " | NO SYNC" : "") : ` | ${l.sync.name} L${l.sync.entryLine + 1}..L${l.sync.exitLine + 1} entered ${micros(t0, enteredAtNs(l.sync))}, returned by ${micros(t0, l.syncReturnedByNs)}`;
        const answer = l.legReply === undefined ? "" : ` | answered the engine L${l.legReply.entryLine + 1} at ${micros(t0, enteredAtNs(l.legReply))}`;
        return `      leg ${l.leg}: ${request}${data}${sync}${answer}`;
      });
      return [head, ...legs].join("\n");
    })
    .join("\n");
}

/** The lines of the three traces that a request's evidence points at, merged in time order. */
function excerpt(verdict: Verdict, label: string, engineLog: StraceLog, legs: readonly TracedLeg[], tmpPath = ""): string {
  const e = verdict.evidence.find((x) => x.label === label);
  if (e === undefined) return "";
  const rows: { at: string; text: string }[] = [];
  const add = (who: string, log: StraceLog, calls: (Syscall | undefined)[]): void => {
    const lines = new Set<number>();
    for (const c of calls) {
      if (c === undefined) continue;
      lines.add(c.entryLine);
      lines.add(c.exitLine);
    }
    for (const n of lines) {
      const text = describeLine(log.lines[n], 10_000).split(tmpPath === "" ? "\0" : tmpPath).join("$TMP");
      rows.push({ at: /^\d+\s+(\S+)/.exec(log.lines[n] ?? "")?.[1] ?? "", text: `  [${who.padEnd(6)}] L${n + 1} ${text.length > 200 ? `${text.slice(0, 200)}...` : text}` });
    }
  };
  add("engine", engineLog, [e.request, e.reply]);
  for (const l of e.legs) {
    const leg = legs.find((x) => x.name === l.leg);
    if (leg !== undefined) add(`unit ${l.leg}`, leg.log, [l.legRequest?.call, ...l.data, l.sync, l.legReply]);
  }
  return rows
    .sort((x, y) => (x.at < y.at ? -1 : x.at > y.at ? 1 : 0))
    .map((r) => r.text)
    .join("\n");
}

interface Run {
  readonly verdict: Verdict;
  readonly ops: readonly Op[];
  readonly engineLog: StraceLog;
  readonly legs: readonly TracedLeg[];
  /** The run's temp dir (removed), to shorten paths in excerpts. */
  readonly tmpPath: string;
  readonly elapsedMs: number;
  /** From the first request sent to the last reply. */
  readonly requestsMs: number;
}

/** The client's clock reading in ns (realtime base + monotonic; shown, not relied on). */
function clientNowNs(): bigint {
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1000)) * 1000n;
}

/** Two traced units, a traced engine (from `engineBin`) over a volume on each, the requests, the check. */
async function traceRequests(engineBin: string): Promise<Run> {
  const started = Date.now();
  const dir = makeTempDir("engine-durability", memoryTmpBase());
  try {
    const units: RunningUnit[] = [];
    const traceFiles = { engine: dir.file("engine.strace"), a: dir.file("unit-a.strace"), b: dir.file("unit-b.strace") };
    const storageStarts: number[] = [];
    const ops = makeOps();
    const clientNs: (bigint | undefined)[] = [];
    let requestsMs = 0;
    try {
      const startedUnits = await Promise.allSettled(
        LEGS.map((leg) => {
          mkdirSync(dir.file(leg));
          return startUnitUnderStrace(
            { dataDir: dir.file(leg), capacity: "64M", name: `unit-${leg}`, volumes: [{ name: VOLUME, size: LEG_BYTES }], control: true },
            trace(traceFiles[leg], UNIT_SYSCALLS),
          );
        }),
      );
      for (const s of startedUnits) if (s.status === "fulfilled") units.push(s.value);
      for (const s of startedUnits) if (s.status === "rejected") throw s.reason;
      for (const unit of units) {
        const volume = (await controlOk(unit, "GET", `/v1/volumes/${VOLUME}`)) as { extents: { startLba: number; lengthLba: number }[] };
        const extent = volume.extents[0];
        assert.ok(volume.extents.length === 1 && extent !== undefined && extent.lengthLba * 512 >= LEG_BYTES, `one extent: ${JSON.stringify(volume)}`);
        storageStarts.push(extent.startLba * 512);
      }
      const engine = await startEngineUnderStrace(
        { mirror: MIRROR, legs: LEGS.map((leg, i) => ({ name: leg, uri: (units[i] as RunningUnit).uri(VOLUME) })), listen: `unix:${dir.file("engine.sock")}` },
        trace(traceFiles.engine, ENGINE_SYSCALLS),
        engineBin,
      );
      const clients: RawNbdClient[] = [];
      try {
        // Both legs healthy: the engine serves with both in sync.
        const serving = await waitFor("the engine's serving line", () => engine.stderr().split("\n").find((l) => l.includes("mirror engine serving")), { timeoutMs: 5_000 });
        assert.equal(logFields(serving).legs, "a:in-sync,b:in-sync", `both legs in sync: ${serving}`);
        for (let i = 0; i < 2; i++) {
          const client = await RawNbdClient.connect({ path: dir.file("engine.sock") });
          clients.push(client);
          await client.handshake();
          const { transmissionFlags, sizeBytes } = await client.go(MIRROR);
          assert.equal(sizeBytes, DATA_BYTES, "the mirror's size");
          const wanted = NBD_TFLAG.SEND_FLUSH | NBD_TFLAG.SEND_FUA | NBD_TFLAG.CAN_MULTI_CONN;
          assert.equal(transmissionFlags & wanted, wanted, `transmission flags 0x${transmissionFlags.toString(16)}`);
        }
        // One request at a time: a FLUSH covers what was answered before it was sent.
        const first = Date.now();
        for (const op of ops) {
          const client = clients[op.conn] as RawNbdClient;
          const { payload, ...fields } = op;
          const reply = await client.call({ ...fields, ...(payload === undefined ? {} : { payload }) });
          clientNs.push(clientNowNs());
          assert.equal(reply.errno, 0, `${op.label}: NBD error ${reply.errno}`);
          assert.equal(reply.cookieLo, op.cookieLo, `${op.label}: reply cookie`);
        }
        requestsMs = Date.now() - first;
      } finally {
        for (const client of clients) client.destroy();
        const exit = await engine.stop();
        assert.equal(exit.code, 0, `the traced engine exits 0: ${JSON.stringify(exit)}\n${engine.stderr()}`);
      }
      assert.doesNotMatch(engine.stderr(), /mirror leg failed/, "no leg failed during the run");
    } finally {
      for (const unit of units) {
        const exit = await unit.stop();
        assert.equal(exit.code, 0, `the traced unit exits 0: ${JSON.stringify(exit)}\n${unit.stderr()}`);
      }
    }
    const engineLog = parseStraceLog(readFileSync(traceFiles.engine, "utf8"));
    const legs: TracedLeg[] = LEGS.map((leg, i) => {
      const dataDir = realpathSync(dir.file(leg));
      const storagePaths = new Set([join(dataDir, "storage.img"), join(dataDir, "storage.img.new")]);
      return { name: leg, log: parseStraceLog(readFileSync(traceFiles[leg], "utf8")), storageStart: storageStarts[i] as number, isStorage: (path) => path !== undefined && storagePaths.has(path) };
    });
    for (const [who, log] of [["engine", engineLog], ...legs.map((l) => [`unit ${l.name}`, l.log] as const)] as const) {
      assert.equal(log.syscalls.filter((c) => c.name === "io_uring_setup" && (c.ret ?? -1) >= 0).length, 0, `the ${who} set up no io_uring (I/O through it would be invisible to strace)`);
    }
    const verdict = checkEngineSyncs(engineLog, legs, ops, clientNs);
    return { verdict, ops, engineLog, legs, tmpPath: realpathSync(dir.path), elapsedMs: Date.now() - started, requestsMs };
  } finally {
    dir.remove();
  }
}

function report(run: Run): string {
  const v = run.verdict;
  const calls = [run.engineLog, ...run.legs.map((l) => l.log)].map((log) => log.syscalls.length);
  return (
    `${calls.join(" + ")} traced calls (engine + units), requests took ${run.requestsMs} ms, whole run ${run.elapsedMs} ms\n${summarize(v)}` +
    (v.violations.length === 0 ? "" : `\nviolations:\n${v.violations.map((x) => `  ${x.message}`).join("\n")}`)
  );
}

test("a FUA write or FLUSH acknowledged by the mirror engine was fdatasync'ed on every leg before the engine's reply (strace on the engine and both units)", async () => {
  const run = await traceRequests(IPSAN_BIN);
  console.log(`engine_durability: ${report(run)}`);
  for (const label of ["FUA WRITE 4 KiB", "FLUSH"]) console.log(`engine_durability: traces of "${label}" in time order:\n${excerpt(run.verdict, label, run.engineLog, run.legs, run.tmpPath)}`);
  assert.deepEqual(run.verdict.violations, [], report(run));
  assert.equal(run.verdict.evidence.length, run.ops.length, "every request was checked");
  for (const e of run.verdict.evidence) {
    assert.ok(e.request !== undefined && e.reply !== undefined, `${e.label}: request and reply found`);
    assert.deepEqual(
      e.legs.map((l) => l.leg),
      [...LEGS],
      `${e.label}: both legs checked`,
    );
    if (e.durable) for (const l of e.legs) assert.ok(l.sync !== undefined && l.syncReturnedByNs !== undefined && e.replyAtNs !== undefined && l.syncReturnedByNs < e.replyAtNs, `${e.label}: a sync on leg ${l.leg}`);
  }
});

test("canary: an engine that drops FUA on the way to the legs and answers FLUSH without the legs fails the check on both legs", async () => {
  const build = patchedBuild("canary-engine-no-sync", [
    { file: "dist/host/engine/mirror.js", from: "(io) => io.write(offsetBytes, buffer, fua)", to: "(io) => io.write(offsetBytes, buffer, false)" },
    // A payload that arrived in several chunks goes to the legs as they are (writev).
    { file: "dist/host/engine/mirror.js", from: "io.writev(offsetBytes, parts, fua) : io.write(offsetBytes, (joined ??= Buffer.concat(parts)), fua)", to: "io.writev(offsetBytes, parts, false) : io.write(offsetBytes, (joined ??= Buffer.concat(parts)), false)" },
    { file: "dist/host/engine/mirror.js", from: "legs.map((l) => l.io.flush())", to: "legs.map(() => Promise.resolve())" },
  ]);
  let run: Run;
  try {
    run = await traceRequests(build.ipsanBin);
  } finally {
    build.remove();
  }
  console.log(`canary-engine-no-sync: ${report(run)}`);
  const failed = (kind: ViolationKind): string[] => run.verdict.violations.filter((v) => v.kind === kind).map((v) => `${v.label} on ${v.leg ?? "engine"}`);
  const expected = run.ops.filter(isDurable).flatMap((op) => LEGS.map((leg) => `${op.label} on ${leg}`));
  assert.deepEqual(
    failed("sync"),
    expected,
    `every FUA write and FLUSH lost its sync on both legs (a sync found here may be the engine's own metadata write landing in the window: the requests took ${run.requestsMs} ms):\n${report(run)}`,
  );
  assert.deepEqual(
    [...new Set(run.verdict.violations.map((v) => v.kind))],
    ["sync"],
    `requests, replies and data were all found; only the syncs are missing:\n${report(run)}`,
  );
});

test("the cross-trace check: a sync counts only if it entered after the engine read the request and returned before the engine's reply", () => {
  const op: Op = { label: "FLUSH", conn: 0, type: NBD_CMD.FLUSH, flags: 0, offset: 0, length: 0, cookieHi: 1, cookieLo: 2 };
  const hex = (bytes: Buffer): string => [...bytes].map((b) => `\\x${b.toString(16).padStart(2, "0")}`).join("");
  const fd = (n: number, path: string): string => `${n}<${hex(Buffer.from(path))}>`;
  const client = fd(9, "UNIX-STREAM:[1->2,/e.sock]");
  // The engine reads the FLUSH at 10.000100000 (returned by its next line, 10.000100500) and replies at `replyAt`.
  const engine = (replyAt: string): StraceLog =>
    parseStraceLog(
      [
        `100 10.000100000 read(${client}, "${hex(requestHeader(op))}", 65536) = 28 <0.000010>`,
        `100 10.000100500 read(${client}, 0x1, 65536) = -1 EAGAIN (Resource temporarily unavailable) <0.000001>`,
        `100 ${replyAt} write(${client}, "${hex(simpleReply(1, 2))}", 16) = 16 <0.000010>`,
      ].join("\n"),
    );
  const storage = fd(7, "/d/storage.img");
  const unit = (syncAt: string, nextAt: string): TracedLeg => ({
    name: "a",
    storageStart: 0,
    isStorage: (path) => path === "/d/storage.img",
    log: parseStraceLog([`200 ${syncAt} fdatasync(${storage}) = 0 <0.000100>`, `200 ${nextAt} write(${fd(5, "anon_inode:[eventfd]")}, "\\x01", 8) = 8 <0.000001>`].join("\n")),
  });
  const kinds = (legs: TracedLeg[], engineLog: StraceLog): ViolationKind[] => checkEngineSyncs(engineLog, legs, [op]).violations.map((v) => v.kind);
  // The sync entered at 10.000200 and returned by 10.000300 (its next line), the reply at 10.000400: it counts.
  assert.deepEqual(kinds([unit("10.000200000", "10.000300000")], engine("10.000400000")), []);
  // The sync's next line comes after the reply: it may not have returned in time.
  assert.deepEqual(kinds([unit("10.000200000", "10.000500000")], engine("10.000400000")), ["sync"]);
  // The sync entered before the engine had certainly read the FLUSH.
  assert.deepEqual(kinds([unit("10.000100100", "10.000300000")], engine("10.000400000")), ["sync"]);
  // On every leg: a second leg without the sync fails alone.
  const late = { ...unit("10.000200000", "10.000500000"), name: "b" };
  assert.deepEqual(
    checkEngineSyncs(engine("10.000400000"), [unit("10.000200000", "10.000300000"), late], [op]).violations.map((v) => `${v.kind} ${v.leg}`),
    ["sync b"],
  );
  // Parsing: stamps in ns, a one-line call returns by its next line.
  const log = unit("10.000200000", "10.000300000").log;
  assert.equal(enteredAtNs(log.syscalls[0] as Syscall), 10_000_200_000n);
  assert.equal(returnedByNs(log, log.syscalls[0] as Syscall), 10_000_300_000n);
});
