// What this proves: a real `ipsan unit --iscsi` survives hostile initiators
// and keeps serving an honest one through all of them (ERL 0: the bad
// connection is dropped, with a log line, and nothing else is touched):
// random bytes, a login that never finishes (loginTimeoutMs), a Data-Out
// that never comes (dataOutTimeoutMs), an oversized data segment, Data-Out
// at an offset no R2T asked for, a NOP-In ping left unanswered
// (nopInTimeoutMs), and out-of-range LBAs (answered CHECK CONDITION, the
// connection stays; so does a Data-Out with a DataSN out of order, whose
// task ends with CHECK CONDITION and writes nothing). Also: header and data digests (CRC32C) on, with a
// multi-R2T write and a Data-In split by MaxRecvDataSegmentLength read back;
// a unit with --iscsi-require-digest refuses a login without the digest (02-00).

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, test } from "node:test";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { iscsiTargetName } from "./names.ts";
import { Op, newBhs } from "./pdu.ts";
import { RawInitiator } from "./testing/initiator.ts";

const TIMEOUT_MS = 500;
let unit: RunningUnit;
let honest: RawInitiator;
const TARGET = iscsiTargetName("hostile", "vol");

function portal(of: RunningUnit = unit): { host: string; port: number } {
  const text = of.iscsiPortal ?? "";
  const colon = text.lastIndexOf(":");
  return { host: text.slice(0, colon), port: Number(text.slice(colon + 1)) };
}

async function connect(): Promise<RawInitiator> {
  const { host, port } = portal();
  return RawInitiator.connect(host, port);
}

async function loggedIn(options: Parameters<RawInitiator["login"]>[0] = {}): Promise<RawInitiator> {
  const initiator = await connect();
  const result = await initiator.login({ targetName: TARGET, ...options });
  assert.equal(result.status, 0, `login status 0x${result.status.toString(16)}`);
  await initiator.ready();
  return initiator;
}

/** The honest session still reads and writes. */
async function honestStillServed(): Promise<void> {
  const data = randomBytes(4096);
  assert.equal(await honest.write10(8, data), 0);
  const back = await honest.read10(8, 8);
  assert.equal(back.status, 0);
  assert.deepEqual(back.data, data);
}

before(async () => {
  unit = await startUnit({
    name: "hostile",
    capacity: "256M",
    volumes: [{ name: "vol", size: "32M" }],
    extraArgs: ["--iscsi", "127.0.0.1:0"],
    env: { IPSAN_ISCSI_LIMITS: `loginTimeoutMs=${TIMEOUT_MS},dataOutTimeoutMs=${TIMEOUT_MS},nopInIntervalMs=${TIMEOUT_MS},nopInTimeoutMs=${TIMEOUT_MS}` },
  });
  honest = await loggedIn(); // answers pings, as a real initiator does
});

after(async () => {
  honest?.close();
  await unit?.close();
});

test("random bytes: the connection is dropped, the honest session goes on", async () => {
  for (let i = 0; i < 5; i += 1) {
    const bad = await connect();
    bad.write(randomBytes(48 + i * 1000));
    assert.ok(await bad.waitClosed(5_000), "random bytes: connection not dropped");
  }
  await honestStillServed();
});

test("a login that never finishes is cut after loginTimeoutMs", async () => {
  const slow = await connect();
  const started = Date.now();
  slow.write(Buffer.alloc(20)); // part of a BHS, then nothing
  assert.ok(await slow.waitClosed(5_000), "stalled login not cut");
  assert.ok(Date.now() - started >= TIMEOUT_MS - 50);
  await honestStillServed();
});

test("a Data-Out that never comes: the connection is dropped after dataOutTimeoutMs", async () => {
  const bad = await loggedIn();
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x2a;
  cdb.writeUInt16BE(8, 7);
  bad.send(bad.commandBhs(cdb, { write: true, expectedLength: 4096 }));
  const r2t = await bad.read();
  assert.equal((r2t?.bhs[0] ?? 0) & 0x3f, Op.R2T);
  assert.ok(await bad.waitClosed(5_000), "connection waiting for Data-Out forever");
  await honestStillServed();
});

test("an oversized data segment and Data-Out outside its R2T drop the connection", async () => {
  const big = await loggedIn();
  const bhs = newBhs(Op.NOP_OUT | 0x40, 0x80);
  bhs.writeUIntBE(0xffffff, 5, 3);
  big.write(bhs);
  assert.ok(await big.waitClosed(5_000), "16 MiB segment announced: not dropped");

  const stray = await loggedIn();
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x2a;
  cdb.writeUInt16BE(8, 7);
  const itt = stray.nextItt();
  stray.send(stray.commandBhs(cdb, { write: true, expectedLength: 4096, itt }));
  const r2t = await stray.read();
  assert.equal((r2t?.bhs[0] ?? 0) & 0x3f, Op.R2T);
  const out = newBhs(Op.DATA_OUT, 0x80);
  out.writeUInt32BE(itt, 16);
  out.writeUInt32BE(r2t!.bhs.readUInt32BE(20), 20);
  out.writeUInt32BE(1 << 20, 40); // far outside the R2T
  stray.send(out, Buffer.alloc(512));
  const reject = await stray.read();
  assert.equal((reject?.bhs[0] ?? 0) & 0x3f, Op.REJECT);
  assert.ok(await stray.waitClosed(5_000));
  await honestStillServed();
});

test("out-of-range LBAs get CHECK CONDITION and the connection stays", async () => {
  const probe = await loggedIn();
  const blocks = (32 * 1024 * 1024) / 512;
  const past = await probe.read10(blocks - 1, 2);
  assert.equal(past.status, 0x02);
  const far = await probe.read10(0xfffffff0, 1);
  assert.equal(far.status, 0x02);
  const ok = await probe.read10(blocks - 1, 1);
  assert.equal(ok.status, 0);
  probe.close();
  await honestStillServed();
});

test("a Data-Out with a DataSN out of order ends its task with CHECK CONDITION 0B/47/05, writes nothing, and the connection stays (RFC 7143 7.8, 7.9)", async () => {
  const probe = await loggedIn({ keys: [["MaxBurstLength", "262144"]] });
  const before = randomBytes(256 * 1024); // one R2T, four Data-Outs of 64 KiB (DataSN 0..3)
  assert.equal(await probe.write10(4096, before), 0);
  for (const [label, dataSN] of [
    ["repeated", (sn: number) => (sn === 2 ? 1 : sn)],
    ["skipped ahead", (sn: number) => (sn === 0 ? 0 : sn + 26)],
    ["-1", () => -1],
    ["reversed", (sn: number) => 3 - sn],
  ] as const) {
    const status = await probe.write10(4096, randomBytes(before.length), { dataSN });
    assert.equal(status, 0x02, `${label}: status 0x${status.toString(16)}`);
    const senseData = probe.lastResponse?.data.subarray(2) ?? Buffer.alloc(0);
    assert.deepEqual([senseData[2]! & 0x0f, senseData[12], senseData[13]], [0x0b, 0x47, 0x05], `${label}: sense ${senseData.toString("hex")}`);
    assert.ok(!probe.closed, `${label}: connection dropped`);
  }
  const back = await probe.read10(4096, before.length / 512);
  assert.equal(back.status, 0);
  assert.ok(back.data.equals(before), "a write whose Data-Out had a bad DataSN changed the volume");
  probe.close();
  await honestStillServed();
});

test("an unanswered NOP-In ping drops the connection; an answered one keeps it", async () => {
  const quiet = await loggedIn();
  quiet.autoPong = false;
  const ping = await quiet.read(5_000);
  assert.equal((ping?.bhs[0] ?? 0) & 0x3f, Op.NOP_IN);
  assert.notEqual(ping?.bhs.readUInt32BE(20), 0xffffffff);
  assert.ok(await quiet.waitClosed(5_000), "ping not answered but connection kept");
  await new Promise((resolve) => setTimeout(resolve, 3 * TIMEOUT_MS)); // the honest session answers its pings meanwhile
  await honestStillServed();
});

test("header and data digests (CRC32C): multi-R2T write and split Data-In read back", async () => {
  const digests = await loggedIn({ headerDigest: true, dataDigest: true, keys: [["MaxBurstLength", "65536"], ["FirstBurstLength", "65536"]] });
  assert.ok(digests.headerDigest && digests.dataDigest);
  const data = randomBytes(300 * 1024);
  assert.equal(await digests.write10(2048, data), 0);
  const back = await digests.read10(2048, data.length / 512);
  assert.equal(back.status, 0);
  assert.deepEqual(back.data, data);
  // A corrupted data digest: rejected and dropped (ERL 0).
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x2a;
  cdb.writeUInt16BE(1, 7);
  digests.dataDigest = false; // send the data without a digest while the target expects one
  digests.send(digests.commandBhs(cdb, { write: true, expectedLength: 512 }), Buffer.alloc(512, 1));
  assert.ok(await digests.waitClosed(5_000));
  await honestStillServed();
});

test("--iscsi-require-digest header,data: a login offering None fails 02-00, one offering CRC32C gets both digests and works", async () => {
  const strict = await startUnit({
    name: "strict",
    capacity: "64M",
    volumes: [{ name: "vol", size: "16M" }],
    extraArgs: ["--iscsi", "127.0.0.1:0", "--iscsi-require-digest", "header,data"],
  });
  try {
    const { host, port } = portal(strict);
    const target = iscsiTargetName("strict", "vol");
    const plain = await RawInitiator.connect(host, port);
    const refused = await plain.login({ targetName: target, headerDigest: true, dataDigest: false });
    assert.equal(refused.status, 0x0200, `login without a data digest: status 0x${refused.status.toString(16)}`);
    plain.close();
    const digests = await RawInitiator.connect(host, port);
    const accepted = await digests.login({ targetName: target, headerDigest: true, dataDigest: true });
    assert.equal(accepted.status, 0);
    assert.ok(digests.headerDigest && digests.dataDigest);
    await digests.ready();
    const data = randomBytes(8192);
    assert.equal(await digests.write10(0, data), 0);
    assert.deepEqual((await digests.read10(0, 16)).data, data);
    digests.close();
    assert.match(strict.stderr(), /requires DataDigest=CRC32C/);
  } finally {
    await strict.close();
  }
});

test("a command to LUN 1 is LOGICAL UNIT NOT SUPPORTED; a login naming a TSIH that does not exist is 02-0A", async () => {
  const probe = await loggedIn();
  const bhs = probe.commandBhs(Buffer.alloc(6), { expectedLength: 0 });
  bhs[9] = 1; // LUN 1 (single-level addressing)
  probe.send(bhs);
  let response = await probe.read();
  while (response !== undefined && (response.bhs[0]! & 0x3f) !== Op.SCSI_RESPONSE) response = await probe.read();
  assert.equal(response?.bhs[3], 0x02);
  const sense = response!.data.subarray(2);
  assert.equal(sense[2]! & 0x0f, 0x05);
  assert.equal(sense[12], 0x25);
  probe.close();
  const joiner = await connect();
  const login = newBhs(Op.LOGIN_REQUEST | 0x40, 0x80 | (1 << 2) | 3);
  joiner.isid.copy(login, 8);
  login.writeUInt16BE(0x7777, 14);
  joiner.send(login, Buffer.from(`InitiatorName=iqn.2026-12.org.ipsan.test:raw\0TargetName=${TARGET}\0`));
  const answer = await joiner.read();
  assert.equal(answer?.bhs.readUInt16BE(36), 0x020a);
  assert.ok(await joiner.waitClosed(5_000));
  await honestStillServed();
});
