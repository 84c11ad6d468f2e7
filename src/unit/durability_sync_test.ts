// Proves issue 6 section 7: the unit answers a FUA request or a FLUSH only
// after the storage has been fdatasync'ed, and that sync comes after the
// request's data (and, for a FLUSH, after the data of every write answered
// before it). durability_test's kill -9 cannot prove this: the page cache
// outlives the process, so it passes even if FUA and FLUSH sync nothing.
//
// How: a real `bin/ipsan unit` runs under `strace -f -yy -xx` (every thread:
// the unit syncs on libuv's worker threads). A raw NBD client sends, one at a
// time and each with its own random cookie, on two connections to one volume:
//   FUA WRITE 4 KiB (done on the event loop) and 2 MiB (on the thread pool),
//   two plain WRITEs then a FLUSH, FUA WRITE_ZEROES (punched hole, and with
//   NO_HOLE a zeroed range), FUA TRIM, and a plain WRITE on one connection
//   followed by a FLUSH on the other (CAN_MULTI_CONN: one fd, one sync);
// then a volume is created through the control API (a table change).
// In the trace, for every request:
//   request  the socket read whose bytes hold its 28-byte header (cookie);
//   data     the pwrite64/pwritev/pwritev2/fallocate calls on storage.img
//            that cover its byte range (a write's first bytes are its payload);
//   reply    the socket write whose bytes hold its 16-byte reply (cookie,
//            error 0), on the same socket;
//   sync     for FUA and FLUSH: an fdatasync/fsync of storage.img returning 0
//            that ENTERED after the request was read, after its data (and the
//            data of the writes a FLUSH covers) had RETURNED, and that itself
//            RETURNED before the reply write was entered. For a FUA WRITE the
//            data writes may instead all go through a descriptor of
//            storage.img opened with O_DSYNC (the openat is traced): each is
//            then synced (its range) before it returns, and it returned
//            before the reply (Storage.writeDurable, ADR 0020).
// The table change likewise: its storage writes inside the metadata area,
// then a whole fdatasync, then the "201" answer.
// "Before" is the order of the trace's lines: strace reports a call's return
// before the thread can go on to wake the thread that writes the reply, so a
// sync still <unfinished ...> when the reply is written does not count.
// Canaries run the same requests against copies of the build with the sync
// taken out (Storage.sync() resolving at once; FUA's syncs dropped from
// VolumeDevice while FLUSH keeps its own) and must fail exactly on the
// requests that lost their sync. Loopback only, ports chosen by the kernel;
// strace must be installed and allowed to trace its child (scripts/setup
// installs it; nothing is skipped: without it the test fails, saying why).

import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { readFileSync, realpathSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { encodeRequest } from "../nbd/peer_codec.ts";
import { NBD_CMD, NBD_CMD_FLAG, NBD_SIMPLE_REPLY_MAGIC, NBD_TFLAG } from "../nbd/protocol.ts";
import { RawNbdClient } from "../nbd/testing/raw_client.ts";
import { controlOk } from "../testing/control.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { describeLine, dsyncFds, parseStraceLog, stringsIn, type StraceLog, type Syscall } from "../testing/strace.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnitUnderStrace } from "../testing/traced_unit.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { METADATA_AREA_BYTES } from "./layout.ts";

const KIB = 1024;
const MIB = 1024 * KIB;

/** Every call that can receive a request, move data to the storage, sync it, or send a reply. */
const SYSCALLS = [
  "read",
  "readv",
  "recvfrom",
  "recvmsg",
  "write",
  "writev",
  "sendto",
  "sendmsg",
  "pwrite64",
  "pwritev",
  "pwritev2",
  "fallocate",
  "fdatasync",
  "fsync",
  "openat",
  "io_uring_setup",
] as const;
const SOCKET_READS = new Set(["read", "readv", "recvfrom", "recvmsg"]);
const SOCKET_WRITES = new Set(["write", "writev", "sendto", "sendmsg"]);
const STORAGE_WRITES = new Set(["pwrite64", "pwritev", "pwritev2", "fallocate"]);
const SYNCS = new Set(["fdatasync", "fsync"]);

interface Op {
  readonly label: string;
  /** Which of the two connections sends it. */
  readonly conn: 0 | 1;
  readonly type: number;
  readonly flags: number;
  /** Offset in the volume. */
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
  const other = (label: string, conn: 0 | 1, type: number, flags: number, offset: number, length: number, covers?: string[]): Op => ({
    label,
    conn,
    type,
    flags,
    offset,
    length,
    ...(covers === undefined ? {} : { covers }),
    ...cookie(),
  });
  const { FUA, NO_HOLE } = NBD_CMD_FLAG;
  return [
    write("FUA WRITE 4 KiB", 0, 64 * KIB, 4 * KIB, FUA),
    write("FUA WRITE 2 MiB", 0, MIB, 2 * MIB, FUA),
    write("WRITE 4 KiB", 0, 8 * MIB, 4 * KIB, 0),
    write("WRITE 64 KiB", 0, 9 * MIB, 64 * KIB, 0),
    other("FLUSH", 0, NBD_CMD.FLUSH, 0, 0, 0, ["WRITE 4 KiB", "WRITE 64 KiB"]),
    other("FUA WRITE_ZEROES (hole)", 0, NBD_CMD.WRITE_ZEROES, FUA, 4 * MIB, 64 * KIB),
    other("FUA WRITE_ZEROES NO_HOLE", 0, NBD_CMD.WRITE_ZEROES, FUA | NO_HOLE, 5 * MIB, 64 * KIB),
    other("FUA TRIM", 0, NBD_CMD.TRIM, FUA, 6 * MIB, 64 * KIB),
    write("WRITE 4 KiB, FLUSH elsewhere", 0, 12 * MIB, 4 * KIB, 0),
    other("FLUSH on the 2nd connection", 1, NBD_CMD.FLUSH, 0, 0, 0, ["WRITE 4 KiB, FLUSH elsewhere"]),
  ];
}

function isDurable(op: Op): boolean {
  return op.type === NBD_CMD.FLUSH || (op.flags & NBD_CMD_FLAG.FUA) !== 0;
}

function requestHeader(op: Op): Buffer {
  return encodeRequest({ flags: op.flags, type: op.type, cookieHi: op.cookieHi, cookieLo: op.cookieLo, offset: op.offset, length: op.length });
}

function simpleReply(op: Op): Buffer {
  const reply = Buffer.alloc(16);
  reply.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  reply.writeUInt32BE(0, 4);
  reply.writeUInt32BE(op.cookieHi, 8);
  reply.writeUInt32BE(op.cookieLo, 12);
  return reply;
}

/** True when the bytes strace printed for `call` hold `needle` (in one buffer, or across an iovec). */
function carries(call: Syscall, needle: Buffer): boolean {
  const buffers = call.args.slice(1).flatMap((arg) => stringsIn(arg));
  return buffers.some((b) => b.includes(needle)) || Buffer.concat(buffers).includes(needle);
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

type ViolationKind = "request" | "reply" | "data" | "payload" | "sync";
interface Violation {
  readonly label: string;
  readonly kind: ViolationKind;
  readonly message: string;
}

interface OpEvidence {
  readonly label: string;
  /** Must be synced before its reply (FUA, FLUSH, a table change). */
  readonly durable: boolean;
  request: Syscall | undefined;
  reply: Syscall | undefined;
  data: Syscall[];
  sync: Syscall | undefined;
}

interface Verdict {
  readonly violations: Violation[];
  readonly evidence: OpEvidence[];
  readonly log: StraceLog;
}

/**
 * The order check. `storageStart` is the volume's first byte on the storage;
 * `isStorage` tells the storage's fd paths (storage.img, or storage.img.new
 * while a fresh unit formats it).
 */
function checkSyncOrder(log: StraceLog, ops: readonly Op[], storageStart: number, isStorage: (path: string | undefined) => boolean): Verdict {
  const violations: Violation[] = [];
  const evidence: OpEvidence[] = [];
  const byLabel = new Map<string, OpEvidence>();
  const line = (n: number): string => `L${n + 1} ${describeLine(log.lines[n], 160)}`;
  const storageCalls = log.syscalls.filter((c) => isStorage(c.fdPath));
  const durableFds = dsyncFds(log, isStorage);
  for (const op of ops) {
    const found: OpEvidence = { label: op.label, durable: isDurable(op), request: undefined, reply: undefined, data: [], sync: undefined };
    evidence.push(found);
    byLabel.set(op.label, found);
    const fail = (kind: ViolationKind, message: string): void => {
      violations.push({ label: op.label, kind, message: `${op.label}: ${message}` });
    };
    const header = requestHeader(op);
    found.request = log.syscalls.find((c) => SOCKET_READS.has(c.name) && (c.ret ?? 0) > 0 && !isStorage(c.fdPath) && carries(c, header));
    if (found.request === undefined) {
      fail("request", `no socket read in the trace carries its request header ${header.toString("hex")}`);
      continue;
    }
    const request = found.request;
    const replyBytes = simpleReply(op);
    found.reply = log.syscalls.find(
      (c) => SOCKET_WRITES.has(c.name) && c.fd === request.fd && c.entryLine > request.exitLine && (c.ret ?? 0) > 0 && carries(c, replyBytes),
    );
    if (found.reply === undefined) {
      fail("reply", `no write on fd ${request.fd} after ${line(request.exitLine)} carries its reply ${replyBytes.toString("hex")}`);
      continue;
    }
    const reply = found.reply;
    let dataDone = request.exitLine;
    if (op.type !== NBD_CMD.FLUSH) {
      const start = storageStart + op.offset;
      const end = start + op.length;
      found.data = storageCalls.filter((c) => {
        const range = STORAGE_WRITES.has(c.name) ? storageRange(c) : undefined;
        return range !== undefined && range[0] < end && range[1] > start && c.exitLine > request.exitLine && c.exitLine < reply.entryLine;
      });
      const ranges = found.data.map((c) => storageRange(c) as [number, number]);
      if (!covered(ranges, start, end)) {
        fail("data", `storage bytes [${start}, ${end}) not all written between the request (${line(request.exitLine)}) and the reply (${line(reply.entryLine)}); found ${found.data.map((c) => line(c.exitLine)).join("; ") || "nothing"}`);
        continue;
      }
      dataDone = Math.max(...found.data.map((c) => c.exitLine));
      if (op.payload !== undefined) {
        const first = found.data.find((c) => storageRange(c)?.[0] === start);
        const printed = first === undefined ? undefined : stringsIn(first.args[1] ?? "")[0];
        if (printed === undefined || printed.length === 0 || !op.payload.subarray(0, printed.length).equals(printed)) {
          fail("payload", `the storage write at ${start} does not carry the payload's first bytes: ${first === undefined ? "none" : line(first.exitLine)}`);
        }
      }
    }
    if (!isDurable(op)) continue;
    // A FUA write whose every storage write went through an O_DSYNC descriptor of the storage was synced by those writes
    // themselves (Storage.writeDurable: the kernel syncs the range before the write returns, and they returned before the reply).
    if (op.type === NBD_CMD.WRITE && found.data.length > 0 && found.data.every((c) => c.fd !== undefined && durableFds.has(c.fd))) {
      found.sync = found.data.reduce((last, c) => (c.exitLine > last.exitLine ? c : last));
      continue;
    }
    let after = dataDone;
    for (const label of op.covers ?? []) {
      const earlier = byLabel.get(label);
      assert.ok(earlier !== undefined && earlier.data.length > 0, `${op.label} covers ${label}, which must come first and have data`);
      after = Math.max(after, ...earlier.data.map((c) => c.exitLine));
    }
    found.sync = storageCalls.find((c) => SYNCS.has(c.name) && c.ret === 0 && c.entryLine > after && c.exitLine < reply.entryLine);
    if (found.sync === undefined) {
      // Syncs that overlap the request's window but started too early or returned too late.
      const overlapping = storageCalls.filter((c) => SYNCS.has(c.name) && c.exitLine > request.exitLine && c.entryLine < reply.entryLine);
      fail(
        "sync",
        `no fdatasync/fsync of the storage entered after ${line(after)} and returned before the reply ${line(reply.entryLine)}` +
          (overlapping.length === 0
            ? "; none at all between the request and the reply"
            : `; storage syncs overlapping that window: ${overlapping.map((c) => `${c.name} entered L${c.entryLine + 1}, returned L${c.exitLine + 1} = ${c.result}`).join("; ")}`),
      );
    }
  }
  return { violations, evidence, log };
}

const TABLE_CHANGE = "control API create (table write)";
const TABLE_REQUEST = Buffer.from(`POST /v1/volumes HTTP/1.1`);
const TABLE_REPLY = Buffer.from("HTTP/1.1 201 ");

/**
 * The same order for a volume created through the control API: the table
 * write (a storage write inside the metadata area) returns, then an
 * fdatasync of the storage runs whole, then the 201 answer is written.
 */
function checkTableChange(log: StraceLog, isStorage: (path: string | undefined) => boolean): { violations: Violation[]; evidence: OpEvidence } {
  const e: OpEvidence = { label: TABLE_CHANGE, durable: true, request: undefined, reply: undefined, data: [], sync: undefined };
  const violations: Violation[] = [];
  const fail = (kind: ViolationKind, message: string): { violations: Violation[]; evidence: OpEvidence } => {
    violations.push({ label: TABLE_CHANGE, kind, message: `${TABLE_CHANGE}: ${message}` });
    return { violations, evidence: e };
  };
  const line = (n: number): string => `L${n + 1} ${describeLine(log.lines[n], 160)}`;
  e.request = log.syscalls.find((c) => SOCKET_READS.has(c.name) && (c.ret ?? 0) > 0 && carries(c, TABLE_REQUEST));
  const request = e.request;
  if (request === undefined) return fail("request", `no socket read carries "${TABLE_REQUEST.toString()}"`);
  e.reply = log.syscalls.find((c) => SOCKET_WRITES.has(c.name) && c.fd === request.fd && c.entryLine > request.exitLine && carries(c, TABLE_REPLY));
  const reply = e.reply;
  if (reply === undefined) return fail("reply", `no write on fd ${request.fd} after ${line(request.exitLine)} carries "${TABLE_REPLY.toString()}"`);
  const storageCalls = log.syscalls.filter((c) => isStorage(c.fdPath));
  e.data = storageCalls.filter((c) => {
    const range = STORAGE_WRITES.has(c.name) ? storageRange(c) : undefined;
    return range !== undefined && range[1] <= METADATA_AREA_BYTES && c.exitLine > request.exitLine && c.exitLine < reply.entryLine;
  });
  if (e.data.length === 0) return fail("data", `no storage write inside the metadata area between ${line(request.exitLine)} and ${line(reply.entryLine)}`);
  const after = Math.max(...e.data.map((c) => c.exitLine));
  e.sync = storageCalls.find((c) => SYNCS.has(c.name) && c.ret === 0 && c.entryLine > after && c.exitLine < reply.entryLine);
  if (e.sync === undefined) return fail("sync", `no fdatasync/fsync of the storage entered after the table write ${line(after)} and returned before the answer ${line(reply.entryLine)}`);
  return { violations, evidence: e };
}

/** One line per request: where the trace shows its read, data, sync and reply. */
function summarize(verdict: Verdict): string {
  const at = (c: Syscall | undefined, which: "entry" | "exit"): string =>
    c === undefined ? "-" : `${c.name} L${(which === "entry" ? c.entryLine : c.exitLine) + 1} ${which === "entry" ? c.entryTime : c.exitTime}`;
  return verdict.evidence
    .map((e) => {
      const data = e.data.length === 0 ? "" : ` | data ${e.data.map((c) => at(c, "exit")).join(", ")}`;
      const sync = e.sync === undefined ? "" : ` | sync ${e.sync.name} L${e.sync.entryLine + 1}..L${e.sync.exitLine + 1} ${e.sync.exitTime}`;
      return `  ${e.label}: request ${at(e.request, "exit")}${data}${sync} | reply ${at(e.reply, "entry")}`;
    })
    .join("\n");
}

/** The trace lines a request's evidence points at, readable, for the report and failures. */
function excerpt(verdict: Verdict, label: string): string {
  const e = verdict.evidence.find((x) => x.label === label);
  if (e === undefined) return "";
  const lines = new Set<number>();
  for (const c of [e.request, ...e.data, e.sync, e.reply]) {
    if (c === undefined) continue;
    lines.add(c.entryLine);
    lines.add(c.exitLine);
  }
  return [...lines]
    .sort((a, b) => a - b)
    .map((n) => `  L${n + 1} ${describeLine(verdict.log.lines[n], 200)}`)
    .join("\n");
}

interface Run {
  readonly verdict: Verdict;
  readonly ops: readonly Op[];
  readonly elapsedMs: number;
}

/** Starts the unit (from `ipsanBin`) under strace, sends the requests, stops it, checks the trace. */
async function traceRequests(ipsanBin: string): Promise<Run> {
  const started = Date.now();
  const dir = makeTempDir("durability-sync");
  try {
    const traceFile = dir.file("unit.strace");
    const unit = await startUnitUnderStrace(
      { dataDir: dir.path, capacity: "64M", volumes: [{ name: "d", size: "16M" }], control: true },
      { file: traceFile, syscalls: SYSCALLS },
      ipsanBin,
    );
    const ops = makeOps();
    let storageStart: number;
    const clients: RawNbdClient[] = [];
    try {
      const volume = (await controlOk(unit, "GET", "/v1/volumes/d")) as { extents: { startLba: number; lengthLba: number }[] };
      const extent = volume.extents[0];
      assert.ok(volume.extents.length === 1 && extent !== undefined && extent.lengthLba * 512 >= 16 * MIB, `one extent: ${JSON.stringify(volume)}`);
      storageStart = extent.startLba * 512;
      for (let i = 0; i < 2; i++) {
        const client = await RawNbdClient.connect({ host: unit.host, port: unit.port });
        clients.push(client);
        await client.handshake();
        const { transmissionFlags } = await client.go("d");
        const wanted = NBD_TFLAG.SEND_FLUSH | NBD_TFLAG.SEND_FUA | NBD_TFLAG.SEND_TRIM | NBD_TFLAG.SEND_WRITE_ZEROES;
        assert.equal(transmissionFlags & wanted, wanted, `transmission flags 0x${transmissionFlags.toString(16)}`);
      }
      // One request at a time: a FLUSH covers what was answered before it was sent.
      for (const op of ops) {
        const client = clients[op.conn] as RawNbdClient;
        const { payload, ...fields } = op;
        const reply = await client.call({ ...fields, ...(payload === undefined ? {} : { payload }) });
        assert.equal(reply.errno, 0, `${op.label}: NBD error ${reply.errno}`);
        assert.equal(reply.cookieLo, op.cookieLo, `${op.label}: reply cookie`);
      }
      // A table change after them (the NBD requests' checks must not lean on its sync).
      await controlOk(unit, "POST", "/v1/volumes", { name: "t", sizeBytes: MIB });
    } finally {
      for (const client of clients) client.destroy();
      const exit = await unit.stop();
      assert.equal(exit.code, 0, `the traced unit exits 0 (strace passes on its status): ${JSON.stringify(exit)}\n${unit.stderr()}`);
    }
    const log = parseStraceLog(readFileSync(traceFile, "utf8"));
    const uring = log.syscalls.filter((c) => c.name === "io_uring_setup" && (c.ret ?? -1) >= 0);
    assert.equal(uring.length, 0, "the unit set up no io_uring (I/O through it would be invisible to strace)");
    const dataDir = realpathSync(dir.path);
    const storagePaths = new Set([join(dataDir, "storage.img"), join(dataDir, "storage.img.new")]);
    const isStorage = (path: string | undefined): boolean => path !== undefined && storagePaths.has(path);
    const requests = checkSyncOrder(log, ops, storageStart, isStorage);
    const table = checkTableChange(log, isStorage);
    const verdict: Verdict = { log, violations: [...requests.violations, ...table.violations], evidence: [...requests.evidence, table.evidence] };
    return { verdict, ops, elapsedMs: Date.now() - started };
  } finally {
    dir.remove();
  }
}

function report(run: Run): string {
  const v = run.verdict;
  return `${v.log.syscalls.length} traced calls in ${run.elapsedMs} ms\n${summarize(v)}${v.violations.length === 0 ? "" : `\nviolations:\n${v.violations.map((x) => `  ${x.message}`).join("\n")}`}`;
}

test("FUA requests, FLUSH and a table change are answered only after their data is synced: an fdatasync after it, or (FUA writes) a write through an O_DSYNC descriptor (strace)", async () => {
  const run = await traceRequests(IPSAN_BIN);
  console.log(`durability_sync: ${report(run)}`);
  console.log(`durability_sync: trace of "FUA WRITE 4 KiB":\n${excerpt(run.verdict, "FUA WRITE 4 KiB")}`);
  console.log(`durability_sync: trace of "FLUSH":\n${excerpt(run.verdict, "FLUSH")}`);
  console.log(`durability_sync: trace of "${TABLE_CHANGE}":\n${excerpt(run.verdict, TABLE_CHANGE)}`);
  assert.deepEqual(run.verdict.violations, [], report(run));
  assert.equal(run.verdict.evidence.length, run.ops.length + 1, "every request and the table change were checked");
  for (const e of run.verdict.evidence) {
    assert.ok(e.request !== undefined && e.reply !== undefined, `${e.label}: request and reply found`);
    if (e.durable) assert.ok(e.sync !== undefined, `${e.label}: a sync found`);
  }
});

/** Runs the requests against a patched build; returns the labels whose check failed, by kind. */
async function canary(prefix: string, edits: Parameters<typeof patchedBuild>[1]): Promise<{ run: Run; failed: Map<ViolationKind, string[]> }> {
  const build = patchedBuild(prefix, edits);
  try {
    const run = await traceRequests(build.ipsanBin);
    const failed = new Map<ViolationKind, string[]>();
    for (const v of run.verdict.violations) failed.set(v.kind, [...(failed.get(v.kind) ?? []), v.label]);
    console.log(`${prefix}: ${report(run)}`);
    return { run, failed };
  } finally {
    build.remove();
  }
}

test("canary: with Storage.sync() resolving without fdatasync and FUA writes' descriptor opened without O_DSYNC, every FUA request, FLUSH and table change fails the check", async () => {
  const { run, failed } = await canary("canary-no-sync", [
    { file: "dist/unit/storage.js", from: "return fdatasync(this.fd);", to: "return Promise.resolve();" },
    { file: "dist/unit/storage.js", from: "fs.constants.O_WRONLY | fs.constants.O_DSYNC", to: "fs.constants.O_WRONLY" },
  ]);
  const durable = [...run.ops.filter(isDurable).map((op) => op.label), TABLE_CHANGE];
  assert.deepEqual(failed.get("sync"), durable, `every FUA request, FLUSH and table change lost its sync:\n${report(run)}`);
  assert.deepEqual([...failed.keys()], ["sync"], `requests, data and replies were all found; only the syncs are missing:\n${report(run)}`);
});

test("canary: with the FUA syncs dropped from VolumeDevice (FLUSH keeps its own), exactly the FUA requests fail", async () => {
  const { run, failed } = await canary("canary-no-fua-sync", [
    { file: "dist/unit/volume_device.js", from: "if (fua)\n                await this.#storage.sync()", to: "if (false)\n                await this.#storage.sync()" },
    { file: "dist/unit/volume_device.js", from: "if (options.fua)", to: "if (false)" },
    // FUA writes through the ordinary (not range-synced) path.
    { file: "dist/unit/volume_device.js", from: "if (fua)\n            return this.#storage.writeDurable", to: "if (false)\n            return this.#storage.writeDurable" },
    { file: "dist/unit/volume_device.js", from: "await (fua ? this.#storage.writeDurable", to: "await (false ? this.#storage.writeDurable" },
  ]);
  const fua = run.ops.filter((op) => (op.flags & NBD_CMD_FLAG.FUA) !== 0).map((op) => op.label);
  assert.deepEqual(failed.get("sync"), fua, `the FUA requests (and not the FLUSHes) lost their sync:\n${report(run)}`);
  assert.deepEqual([...failed.keys()], ["sync"], report(run));
});

test("the trace check joins <unfinished ...> and resumed calls: a sync still running when the reply is written does not count", () => {
  const op: Op = { label: "FUA", conn: 0, type: NBD_CMD.WRITE, flags: NBD_CMD_FLAG.FUA, offset: 0, length: 4, payload: Buffer.from("abcd"), cookieHi: 1, cookieLo: 2 };
  const hex = (bytes: Buffer): string => [...bytes].map((b) => `\\x${b.toString(16).padStart(2, "0")}`).join("");
  const storage = `7<${hex(Buffer.from("/d/storage.img"))}>`;
  const socket = `9<${hex(Buffer.from("TCP:[127.0.0.1:1->127.0.0.1:2]"))}>`;
  const request = Buffer.concat([requestHeader(op), op.payload as Buffer]);
  const head = [
    `100 10:00:00.000001 read(${socket}, "${hex(request)}", 65536) = ${request.length} <0.000010>`,
    `100 10:00:00.000002 pwrite64(${storage}, "${hex(op.payload as Buffer)}", 4, 4096) = 4 <0.000010>`,
    `101 10:00:00.000003 fdatasync(${storage} <unfinished ...>`,
  ];
  const replyLine = `100 10:00:00.000005 write(${socket}, "${hex(simpleReply(op))}", 16) = 16 <0.000010>`;
  const resumed = "101 10:00:00.000004 <... fdatasync resumed>) = 0 <0.000002>";
  const isStorage = (path: string | undefined): boolean => path === "/d/storage.img";
  const good = checkSyncOrder(parseStraceLog([...head, resumed, replyLine].join("\n")), [op], 4096, isStorage);
  assert.deepEqual(good.violations, []);
  assert.equal(good.evidence[0]?.sync?.entryLine, 2);
  assert.equal(good.evidence[0]?.sync?.exitLine, 3);
  const late = checkSyncOrder(parseStraceLog([...head, replyLine, resumed].join("\n")), [op], 4096, isStorage);
  assert.deepEqual(
    late.violations.map((v) => v.kind),
    ["sync"],
  );
  const early = [
    `101 10:00:00.000000 fdatasync(${storage}) = 0 <0.000001>`,
    ...head.slice(0, 2),
    replyLine,
  ];
  assert.deepEqual(
    checkSyncOrder(parseStraceLog(early.join("\n")), [op], 4096, isStorage).violations.map((v) => v.kind),
    ["sync"],
    "a sync before the data does not count",
  );
  // The FUA write through a descriptor opened with O_DSYNC is its own sync; the same write through one opened without it is not.
  const dsync = `8<${hex(Buffer.from("/d/storage.img"))}>`;
  const throughDsync = (flags: string): string[] => [
    `100 10:00:00.000000 openat(AT_FDCWD<${hex(Buffer.from("/"))}>, "${hex(Buffer.from("/proc/self/fd/7"))}", ${flags}) = ${dsync} <0.000010>`,
    head[0] as string,
    `101 10:00:00.000002 pwritev(${dsync}, [{iov_base="${hex(op.payload as Buffer)}", iov_len=4}], 1, 4096) = 4 <0.000010>`,
    replyLine,
  ];
  const ranged = checkSyncOrder(parseStraceLog(throughDsync("O_WRONLY|O_CLOEXEC|O_DSYNC").join("\n")), [op], 4096, isStorage);
  assert.deepEqual(ranged.violations, []);
  assert.equal(ranged.evidence[0]?.sync?.name, "pwritev");
  assert.deepEqual(
    checkSyncOrder(parseStraceLog(throughDsync("O_WRONLY|O_CLOEXEC").join("\n")), [op], 4096, isStorage).violations.map((v) => v.kind),
    ["sync"],
    "a write through a descriptor without O_DSYNC is not a sync",
  );
});
