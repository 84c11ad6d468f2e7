// Task attributes through the iSCSI transport: the ATTR bits of SCSI
// Command PDUs from the raw initiator reach the logical unit's task set,
// which spans sessions, and the transport's task management takes waiting
// commands out of it. The target runs in this process over a real volume
// (VolumeManager, UnitExportProvider, the unit's own target factory) with
// each session's device behind a gate, so a READ can be held in the device
// while the commands around it show their order. A last test runs the
// same ATTR values through a real `ipsan unit --iscsi` process (where
// nothing can be held, so it shows the wiring, not the waiting).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { LogicalUnitRegistry } from "../scsi/logical_unit.ts";
import { type Gate, gated, hex } from "../scsi/testing.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";
import { newUnitIscsiTarget } from "../unit/iscsi.ts";
import { MIB } from "../unit/layout.ts";
import { UnitExportProvider } from "../unit/provider.ts";
import { VolumeManager } from "../unit/volumes.ts";
import { setLogLevel } from "../util/log.ts";
import { iscsiTargetName } from "./names.ts";
import { Op, newBhs } from "./pdu.ts";
import type { IscsiTarget } from "./target.ts";
import { RawInitiator } from "./testing/initiator.ts";

setLogLevel("error");

const SIMPLE = 1;
const ORDERED = 2;
const HEAD_OF_QUEUE = 3;
const ACA = 4;
/** How long "not answered" is watched for; an answer that should come is waited for much longer. */
const QUIET_MS = 300;

const dir = makeTempDir("iscsi-attributes", memoryTmpBase());
let manager: VolumeManager;
let target: IscsiTarget;
let portal: { host: string; port: number };
/** Each session's device gate, in login order. */
const gates: Gate[] = [];

before(async () => {
  manager = await VolumeManager.open({ dataDir: dir.path, capacityBytes: 32 * MIB });
  await manager.create("vol", 4 * MIB);
  const provider = new UnitExportProvider(manager);
  const registry = new LogicalUnitRegistry();
  target = newUnitIscsiTarget({
    unitName: "attrs",
    manager,
    provider,
    acquireLogicalUnit: (device, identity) => {
      const gate = gated(device, { reads: true });
      gates.push(gate);
      return registry.acquire(identity, gate.device);
    },
    keyFor: undefined,
    chapRequired: false,
  });
  portal = await target.listen("127.0.0.1", 0);
});

after(async () => {
  for (const gate of gates) gate.open();
  await target?.close();
  await manager?.close();
  dir.remove();
});

async function loggedIn(at: { host: string; port: number }, unitName: string): Promise<RawInitiator> {
  const initiator = await RawInitiator.connect(at.host, at.port);
  assert.equal((await initiator.login({ targetName: iscsiTargetName(unitName, "vol") })).status, 0);
  await initiator.ready();
  return initiator;
}

async function session(): Promise<{ initiator: RawInitiator; gate: Gate }> {
  const initiator = await loggedIn(portal, "attrs");
  const gate = gates[gates.length - 1];
  assert.ok(gate !== undefined);
  return { initiator, gate };
}

/** Sends a command without waiting for its answer; its ITT. */
function send(initiator: RawInitiator, cdb: number[], attribute: number, read = 0): number {
  const itt = initiator.nextItt();
  const bytes = Buffer.concat([Buffer.from(cdb), Buffer.alloc(16 - cdb.length)]);
  initiator.send(initiator.commandBhs(bytes, { read: read > 0, expectedLength: read, itt, attribute }));
  return itt;
}

const TUR = [0x00, 0, 0, 0, 0, 0];
const read10 = (lba: number): number[] => [0x28, 0, 0, 0, (lba >> 8) & 0xff, lba & 0xff, 0, 0, 1, 0];

/** The next answer: a SCSI Response, the last Data-In (status in it) or a task management response. */
async function answer(initiator: RawInitiator, timeoutMs = 10_000): Promise<{ itt: number; kind: "scsi" | "tmf"; status: number; sense: string; data: Buffer }> {
  const data: Buffer[] = [];
  for (;;) {
    const pdu = await initiator.read(timeoutMs);
    assert.ok(pdu !== undefined, "the target closed the connection");
    const opcode = pdu.bhs[0]! & 0x3f;
    const itt = pdu.bhs.readUInt32BE(16);
    if (opcode === Op.TASK_MGMT_RESPONSE) return { itt, kind: "tmf", status: pdu.bhs[2]!, sense: "", data: Buffer.alloc(0) };
    if (opcode === Op.DATA_IN) {
      data.push(pdu.data);
      if ((pdu.bhs[1]! & 0x01) !== 0) return { itt, kind: "scsi", status: pdu.bhs[3]!, sense: "", data: Buffer.concat(data) };
    } else if (opcode === Op.SCSI_RESPONSE) {
      // Sense: 2-byte length, then fixed format (key in byte 2, ASC/ASCQ in 12-13).
      const s = pdu.data.subarray(2);
      const sense = s.length >= 14 ? [s[2]! & 0x0f, s[12]!, s[13]!].map((b) => b.toString(16).padStart(2, "0")).join("/") : "";
      return { itt, kind: "scsi", status: pdu.bhs[3]!, sense, data: Buffer.concat(data) };
    }
  }
}

async function quiet(initiator: RawInitiator, what: string): Promise<void> {
  await assert.rejects(initiator.read(QUIET_MS), /no PDU/, what);
}

/** A task management request (immediate): ABORT TASK (1) of `referenced`, LOGICAL UNIT RESET (5). */
function taskManagement(initiator: RawInitiator, fn: number, referenced = 0xffffffff): number {
  const itt = initiator.nextItt();
  const bhs = newBhs(Op.TASK_MGMT_REQUEST | 0x40, 0x80 | fn);
  bhs.writeUInt32BE(itt, 16);
  bhs.writeUInt32BE(referenced, 20);
  bhs.writeUInt32BE(initiator.cmdSN, 24);
  bhs.writeUInt32BE(initiator.expStatSN, 28);
  bhs.writeUInt32BE(initiator.cmdSN, 32); // RefCmdSN: not checked for a task the target holds
  initiator.send(bhs);
  return itt;
}

test("ATTR bits: HEAD OF QUEUE answers at once, ORDERED waits across sessions, ABORT TASK and a session's end take waiting commands out", { timeout: 60_000 }, async () => {
  const one = await session();
  const two = await session();
  try {
    await one.initiator.write10(0, Buffer.alloc(512, 0x5a));
    one.gate.shut();
    const held = send(one.initiator, read10(0), SIMPLE, 512);
    const ordered = send(one.initiator, TUR, ORDERED);
    const head = send(one.initiator, TUR, HEAD_OF_QUEUE);
    const first = await answer(one.initiator);
    assert.deepEqual([first.itt, first.status], [head, 0], "the HEAD OF QUEUE command was not answered first");
    await quiet(one.initiator, "the ORDERED command ran while the READ before it was held");
    // The other session's SIMPLE command waits behind the first session's ORDERED one: one task set.
    const behind = send(two.initiator, TUR, SIMPLE);
    await quiet(two.initiator, "a SIMPLE command of another session overtook a waiting ORDERED one");
    // ABORT TASK of the waiting ORDERED command: answered at once (it never runs), which lets the other session's command go.
    const tmf = taskManagement(one.initiator, 1, ordered);
    const aborted = await answer(one.initiator, 2_000);
    assert.deepEqual([aborted.kind, aborted.itt, aborted.status], ["tmf", tmf, 0], "ABORT TASK: function complete");
    const released = await answer(two.initiator, 2_000);
    assert.deepEqual([released.itt, released.status], [behind, 0]);
    // An ORDERED command of a session that then ends must not hold anyone back either.
    send(two.initiator, TUR, ORDERED);
    await quiet(two.initiator, "the second ORDERED command ran while the READ was held");
    two.initiator.close();
    await new Promise((resolve) => setTimeout(resolve, 100));
    const after = send(one.initiator, TUR, SIMPLE);
    const answered = await answer(one.initiator, 2_000);
    assert.deepEqual([answered.itt, answered.status], [after, 0], "a dead session's ORDERED command still held back a SIMPLE one");
    one.gate.open();
    const read = await answer(one.initiator);
    assert.deepEqual([read.itt, read.status], [held, 0]);
    assert.equal(hex(read.data), hex(Buffer.alloc(512, 0x5a)));
    // The aborted ORDERED command never answers.
    await quiet(one.initiator, "an aborted command was answered");
  } finally {
    one.gate.open();
    one.initiator.close();
    two.initiator.close();
  }
});

test("ATTR bits: an ORDERED READ is answered after the READ held before it; ACA is CHECK CONDITION 05/49/00", { timeout: 60_000 }, async () => {
  const one = await session();
  try {
    one.gate.shut();
    const held = send(one.initiator, read10(1), SIMPLE, 512);
    const ordered = send(one.initiator, read10(2), ORDERED, 512);
    await quiet(one.initiator, "the ORDERED READ was answered while the READ before it was held");
    one.gate.open();
    assert.equal((await answer(one.initiator)).itt, held);
    const second = await answer(one.initiator);
    assert.deepEqual([second.itt, second.status, second.data.length], [ordered, 0, 512]);
    const aca = send(one.initiator, TUR, ACA);
    const refused = await answer(one.initiator);
    assert.deepEqual([refused.itt, refused.status, refused.sense], [aca, 0x02, "05/49/00"]);
  } finally {
    one.gate.open();
    one.initiator.close();
  }
});

test("LOGICAL UNIT RESET takes the session's waiting commands out at once: another session's command behind them goes on", { timeout: 60_000 }, async () => {
  const one = await session();
  const two = await session();
  try {
    one.gate.shut();
    send(one.initiator, read10(3), SIMPLE, 512);
    send(one.initiator, TUR, ORDERED);
    await quiet(one.initiator, "the ORDERED command ran while the READ before it was held");
    const behind = send(two.initiator, TUR, SIMPLE);
    await quiet(two.initiator, "a SIMPLE command overtook a waiting ORDERED one");
    const reset = taskManagement(one.initiator, 5);
    // The reset waits for the held READ (it is running), but the ORDERED command it aborted no longer holds anyone.
    const released = await answer(two.initiator, 2_000);
    assert.deepEqual([released.itt, released.status], [behind, 0]);
    one.gate.open();
    const done = await answer(one.initiator);
    assert.deepEqual([done.kind, done.itt, done.status], ["tmf", reset, 0], "LOGICAL UNIT RESET: function complete, and no answer for the aborted commands");
  } finally {
    one.gate.open();
    one.initiator.close();
    two.initiator.close();
  }
});

test("a real unit process: every ATTR value is answered as the task set says, and VPD 86h reports HEADSUP, ORDSUP, SIMPSUP", { timeout: 60_000 }, async () => {
  // Nothing can be held inside a real unit's device, so this shows the wiring end to end, not the waiting (the tests above do).
  const unit = await startUnit({ name: "attrs-unit", capacity: "64M", volumes: [{ name: "vol", size: "4M" }], extraArgs: ["--iscsi", "127.0.0.1:0"] });
  try {
    const text = unit.iscsiPortal ?? "";
    const initiator = await loggedIn({ host: text.slice(0, text.lastIndexOf(":")), port: Number(text.slice(text.lastIndexOf(":") + 1)) }, "attrs-unit");
    try {
      assert.equal(await initiator.write10(4, Buffer.alloc(512, 0x77)), 0);
      // READs, INQUIRY and TEST UNIT READY need no R2T: all four go out before any answer.
      const ordered = send(initiator, read10(4), ORDERED, 512);
      const head = send(initiator, [0x12, 0x01, 0x86, 0, 64, 0], HEAD_OF_QUEUE, 64);
      const simple = send(initiator, read10(4), SIMPLE, 512);
      const aca = send(initiator, TUR, ACA);
      const answers = new Map<number, Awaited<ReturnType<typeof answer>>>();
      for (let i = 0; i < 4; i += 1) {
        const a = await answer(initiator);
        answers.set(a.itt, a);
      }
      assert.equal(hex(answers.get(ordered)?.data), hex(Buffer.alloc(512, 0x77)));
      assert.equal(hex(answers.get(simple)?.data), hex(Buffer.alloc(512, 0x77)));
      assert.equal(hex(answers.get(head)?.data.subarray(0, 6)), "00 86 00 3c 00 07");
      assert.deepEqual([answers.get(aca)?.status, answers.get(aca)?.sense], [0x02, "05/49/00"]);
    } finally {
      initiator.close();
    }
  } finally {
    await unit.close();
  }
});
