// Persistent reservations through a real unit process and a raw iSCSI
// initiator (docs/protocol/scsi.md, "Persistent reservations"):
//  - with APTPL=1 the registrations and the reservation come back after the
//    unit is killed with SIGKILL and started again on the same data, and
//    still fence off an initiator that is not registered; without APTPL they
//    do not; deleting the volume drops the saved state;
//  - the save is durable before the GOOD: under strace, the PERSISTENT
//    RESERVE OUT's SCSI Response leaves only after the new state's file was
//    fsynced, renamed into DATA/reservations, and that directory fsynced.
//    kill -9 alone could not prove it (the page cache outlives the process).
//    Its canary, a build that answers before its save is done, must fail
//    that check.
// Loopback only, ports chosen by the kernel.

import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync, realpathSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { Op } from "../iscsi/pdu.ts";
import { iscsiTargetName } from "../iscsi/names.ts";
import { RawInitiator } from "../iscsi/testing/initiator.ts";
import { controlOk } from "../testing/control.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { parseStraceLog, stringsIn, type StraceLog, type Syscall } from "../testing/strace.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnitUnderStrace } from "../testing/traced_unit.ts";
import { IPSAN_BIN, type RunningUnit, startUnit } from "../testing/unit.ts";
import { scsiNaa } from "../scsi/identity.ts";
import { endedLogicalUnits } from "./iscsi.ts";
import { RESERVATIONS_DIR_NAME } from "./reservation_store.ts";
import type { VolumeRecord, VolumeTable } from "./table.ts";

const UNIT = "prunit";
const REGISTER = 0;
const RESERVE = 1;
const WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5;
const RESERVATION_CONFLICT = 0x18;

interface Answer {
  status: number;
  data: Buffer;
}

async function connect(unit: RunningUnit, volume: string, initiatorName: string, isid?: Buffer): Promise<RawInitiator> {
  const portal = unit.iscsiPortal;
  assert.ok(portal !== undefined, "the unit serves iSCSI");
  const session = await RawInitiator.connect(portal.slice(0, portal.lastIndexOf(":")), Number(portal.slice(portal.lastIndexOf(":") + 1)));
  // The same ISID is the same I_T nexus (registrations are per initiator port: name and ISID).
  if (isid !== undefined) isid.copy(session.isid);
  const login = await session.login({ targetName: iscsiTargetName(UNIT, volume), initiatorName });
  assert.equal(login.status, 0, `login of ${initiatorName}`);
  await session.ready();
  return session;
}

/** One SCSI command (data out as immediate data), its status and Data-In. */
async function scsi(session: RawInitiator, cdb: Buffer, options: { dataOut?: Buffer; readBytes?: number; itt?: number } = {}): Promise<Answer> {
  const itt = options.itt ?? session.nextItt();
  const bhs = session.commandBhs(cdb, {
    read: options.readBytes !== undefined,
    write: options.dataOut !== undefined,
    expectedLength: options.dataOut?.length ?? options.readBytes ?? 0,
    itt,
  });
  session.send(bhs, options.dataOut);
  const parts: Buffer[] = [];
  for (;;) {
    const pdu = await session.read();
    if (pdu === undefined) throw new Error("connection closed during a command");
    const opcode = pdu.bhs[0]! & 0x3f;
    if (pdu.bhs.readUInt32BE(16) !== itt) continue;
    if (opcode === Op.DATA_IN) {
      parts.push(pdu.data);
      if ((pdu.bhs[1]! & 0x01) !== 0) return { status: pdu.bhs[3]!, data: Buffer.concat(parts) };
    } else if (opcode === Op.SCSI_RESPONSE) {
      return { status: pdu.bhs[3]!, data: Buffer.concat(parts) };
    }
  }
}

function prOut(session: RawInitiator, action: number, type: number, key: bigint, saKey: bigint, aptpl: boolean, itt?: number): Promise<Answer> {
  const cdb = Buffer.from([0x5f, action, type, 0, 0, 0, 0, 0, 24, 0]);
  const data = Buffer.alloc(24);
  data.writeBigUInt64BE(key, 0);
  data.writeBigUInt64BE(saKey, 8);
  data[20] = aptpl ? 0x01 : 0;
  return scsi(session, cdb, { dataOut: data, ...(itt === undefined ? {} : { itt }) });
}

async function readKeys(session: RawInitiator): Promise<bigint[]> {
  const answer = await scsi(session, Buffer.from([0x5e, 0, 0, 0, 0, 0, 0, 0x01, 0x00, 0]), { readBytes: 256 });
  assert.equal(answer.status, 0);
  const length = answer.data.readUInt32BE(4);
  const keys: bigint[] = [];
  for (let at = 8; at < 8 + length; at += 8) keys.push(answer.data.readBigUInt64BE(at));
  return keys;
}

async function readReservation(session: RawInitiator): Promise<{ key: bigint; type: number } | undefined> {
  const answer = await scsi(session, Buffer.from([0x5e, 1, 0, 0, 0, 0, 0, 0x01, 0x00, 0]), { readBytes: 256 });
  assert.equal(answer.status, 0);
  if (answer.data.readUInt32BE(4) === 0) return undefined;
  return { key: answer.data.readBigUInt64BE(8), type: answer.data[21]! & 0x0f };
}

function write10(session: RawInitiator): Promise<Answer> {
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x2a;
  cdb.writeUInt16BE(1, 7);
  return scsi(session, cdb, { dataOut: Buffer.alloc(512, 0x5a) });
}

function unitOptions(dataDir: string) {
  return {
    dataDir,
    name: UNIT,
    capacity: "64M",
    volumes: [
      { name: "kept", size: "8M" },
      { name: "plain", size: "8M" },
    ],
    control: true,
    extraArgs: ["--iscsi", "127.0.0.1:0"],
  };
}

test("APTPL: registrations and the reservation come back after kill -9 and still fence; without APTPL they do not; a deleted volume's go", { timeout: 120_000 }, async () => {
  const dir = makeTempDir("pr-persist");
  try {
    let unit = await startUnit(unitOptions(dir.path));
    const alice = await connect(unit, "kept", "iqn.2026-12.org.example:alice");
    const aliceIsid = Buffer.from(alice.isid);
    try {
      assert.equal((await prOut(alice, REGISTER, 0, 0n, 0xa11ce1n, true)).status, 0);
      assert.equal((await prOut(alice, RESERVE, WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 0xa11ce1n, 0n, false)).status, 0);
    } finally {
      alice.close();
    }
    const plain = await connect(unit, "plain", "iqn.2026-12.org.example:alice");
    try {
      assert.equal((await prOut(plain, REGISTER, 0, 0n, 0x9n, false)).status, 0);
    } finally {
      plain.close();
    }
    const saved = readdirSync(join(dir.path, RESERVATIONS_DIR_NAME));
    assert.equal(saved.length, 1, `one logical unit's state saved (APTPL), not the other's: ${saved.join(", ")}`);
    await unit.kill9();

    unit = await startUnit(unitOptions(dir.path));
    try {
      const carol = await connect(unit, "kept", "iqn.2026-12.org.example:carol");
      try {
        assert.deepEqual(await readKeys(carol), [0xa11ce1n]);
        assert.deepEqual(await readReservation(carol), { key: 0xa11ce1n, type: WRITE_EXCLUSIVE_REGISTRANTS_ONLY });
        assert.equal((await write10(carol)).status, RESERVATION_CONFLICT, "an initiator that is not registered is still fenced off after the restart");
      } finally {
        carol.close();
      }
      // Alice, the same I_T nexus (name and ISID), holds it still.
      const again = await connect(unit, "kept", "iqn.2026-12.org.example:alice", aliceIsid);
      try {
        assert.equal((await write10(again)).status, 0);
      } finally {
        again.close();
      }
      const plainAfter = await connect(unit, "plain", "iqn.2026-12.org.example:carol");
      try {
        assert.deepEqual(await readKeys(plainAfter), [], "without APTPL a restart (a power loss) drops the registrations");
      } finally {
        plainAfter.close();
      }
      await controlOk(unit, "DELETE", "/v1/volumes/kept");
      assert.deepEqual(readdirSync(join(dir.path, RESERVATIONS_DIR_NAME)), [], "the deleted volume's saved reservations are gone");
    } finally {
      await unit.close();
    }
  } finally {
    dir.remove();
  }
});

test("a saved state that does not read back: logins to that target fail with TARGET ERROR and the log names the file; other targets serve", { timeout: 60_000 }, async () => {
  const dir = makeTempDir("pr-unreadable");
  try {
    let unit = await startUnit(unitOptions(dir.path));
    const alice = await connect(unit, "kept", "iqn.2026-12.org.example:alice");
    try {
      assert.equal((await prOut(alice, REGISTER, 0, 0n, 0xa11ce1n, true)).status, 0);
    } finally {
      alice.close();
    }
    await unit.stop();
    const [file] = readdirSync(join(dir.path, RESERVATIONS_DIR_NAME));
    assert.ok(file !== undefined);
    writeFileSync(join(dir.path, RESERVATIONS_DIR_NAME, file), "{ half a file");
    unit = await startUnit(unitOptions(dir.path));
    try {
      const portal = unit.iscsiPortal!;
      const refused = await RawInitiator.connect(portal.slice(0, portal.lastIndexOf(":")), Number(portal.slice(portal.lastIndexOf(":") + 1)));
      try {
        const login = await refused.login({ targetName: iscsiTargetName(UNIT, "kept"), initiatorName: "iqn.2026-12.org.example:carol" });
        assert.equal(login.status, 0x0300, "TARGET ERROR: not served without its reservations");
      } finally {
        refused.close();
      }
      assert.match(unit.stderr(), new RegExp(`${file.replace(".", "\\.")} cannot be read`));
      assert.equal(readFileSync(join(dir.path, RESERVATIONS_DIR_NAME, file), "utf8"), "{ half a file", "the file is left as it was");
      const other = await connect(unit, "plain", "iqn.2026-12.org.example:carol");
      other.close();
    } finally {
      await unit.close();
    }
  } finally {
    dir.remove();
  }
});

const TRACED = ["read", "readv", "recvfrom", "write", "writev", "sendto", "sendmsg", "openat", "rename", "renameat", "renameat2", "fsync", "fdatasync", "link", "linkat"] as const;

/** The bytes a socket write call sent, as far as strace printed them (-s). */
function bytesOf(call: Syscall): Buffer {
  return Buffer.concat(call.args.slice(1).flatMap((arg) => stringsIn(arg)));
}

/**
 * Checks, in the trace, that the SCSI Response to the command with `itt` left
 * after: an fsync of a temporary file under DATA/reservations returned, the
 * rename of it onto NAA.json returned, and an fsync of DATA/reservations
 * entered after that rename returned. Returns what is missing (empty: all there).
 */
function missingBeforeResponse(log: StraceLog, reservationsDir: string, itt: number): string[] {
  const isResponse = (call: Syscall): boolean => {
    if (!["write", "writev", "sendto", "sendmsg"].includes(call.name) || call.fdPath?.startsWith("TCP:") !== true) return false;
    const bytes = bytesOf(call);
    for (let at = 0; at + 20 <= bytes.length; at += 1) {
      if ((bytes[at]! & 0x3f) === Op.SCSI_RESPONSE && bytes[at + 1] === 0x80 && bytes.readUInt32BE(at + 16) === itt) return true;
    }
    return false;
  };
  const response = log.syscalls.find(isResponse);
  if (response === undefined) return ["no SCSI Response for the command in the trace"];
  const before = (call: Syscall): boolean => call.exitLine < response.entryLine && (call.ret ?? -1) >= 0;
  const inDir = (path: string | undefined): boolean => path !== undefined && path.startsWith(`${reservationsDir}/`);
  const missing: string[] = [];
  const fileSync = log.syscalls.find((c) => (c.name === "fsync" || c.name === "fdatasync") && inDir(c.fdPath) && c.fdPath!.endsWith(".tmp") && before(c));
  if (fileSync === undefined) missing.push("fsync of the new state's temporary file");
  const rename = log.syscalls.find((c) => c.name.startsWith("rename") && c.args.some((a) => stringsIn(a).some((path) => path.toString("utf8").endsWith(".tmp"))) && before(c));
  if (rename === undefined) missing.push("rename of the temporary file into place");
  const dirSync = log.syscalls.find((c) => c.name === "fsync" && c.fdPath === reservationsDir && before(c) && rename !== undefined && c.entryLine > rename.exitLine);
  if (dirSync === undefined) missing.push("fsync of DATA/reservations after the rename");
  return missing;
}

async function traceRegister(ipsanBin: string): Promise<{ log: StraceLog; reservationsDir: string; itt: number }> {
  const dir = makeTempDir("pr-trace");
  try {
    const traceFile = dir.file("unit.strace");
    const data = join(dir.path, "data");
    const unit = await startUnitUnderStrace({ ...unitOptions(data), dataDir: data }, { file: traceFile, syscalls: TRACED, stringBytes: 64 }, ipsanBin);
    const itt = 0x7e57;
    try {
      const session = await connect(unit, "kept", "iqn.2026-12.org.example:traced");
      try {
        assert.equal((await prOut(session, REGISTER, 0, 0n, 0x5afen, true, itt)).status, 0);
      } finally {
        session.close();
      }
    } finally {
      await unit.stop();
    }
    const reservationsDir = join(realpathSync(data), RESERVATIONS_DIR_NAME);
    assert.ok(existsSync(reservationsDir));
    return { log: parseStraceLog(readFileSync(traceFile, "utf8")), reservationsDir, itt };
  } finally {
    dir.remove();
  }
}

test("APTPL: PERSISTENT RESERVE OUT answers GOOD only once the new state is durable (strace)", { timeout: 120_000 }, async () => {
  const { log, reservationsDir, itt } = await traceRegister(IPSAN_BIN);
  assert.deepEqual(missingBeforeResponse(log, reservationsDir, itt), []);
});

test("canary: a build that answers PERSISTENT RESERVE OUT before its save is durable fails that check", { timeout: 180_000 }, async () => {
  const build = patchedBuild(
    "pr-save-canary",
    [{ file: "dist/scsi/logical_unit.js", from: "return this.#core.save(save).then(", to: "void this.#core.save(save); return Promise.resolve().then(" }],
    undefined,
    { nodeModules: true },
  );
  try {
    const { log, reservationsDir, itt } = await traceRegister(build.ipsanBin);
    const missing = missingBeforeResponse(log, reservationsDir, itt);
    assert.ok(missing.includes("fsync of the new state's temporary file"), `the broken build passed (missing: ${missing.join("; ")}): the check proves nothing`);
  } finally {
    build.remove();
  }
});


test("the logical units a table change ends: a deleted volume's exports, partitions changed or gone; not a grown volume's", () => {
  const volume = (name: string, number: number, partitions: [number, number][], sizeBytes = 8 * 1024 * 1024): VolumeRecord => ({
    name,
    number,
    sizeBytes,
    extents: [{ startLba: number * 100_000, lengthLba: sizeBytes / 512 }],
    partitions: partitions.map(([startLba, lengthLba]) => ({ startLba, lengthLba })),
    grants: [],
    access: [],
  });
  const table = (...volumes: VolumeRecord[]): VolumeTable => ({ storageBytes: 1 << 30, nextVolumeNumber: 10, volumes });
  const names = (before: VolumeTable, after: VolumeTable): string[] => endedLogicalUnits("unit-id", before, after).map((identity) => identity.exportName);
  const a = volume("a", 1, [
    [0, 2048],
    [2048, 2048],
  ]);
  const b = volume("b", 2, []);
  assert.deepEqual(names(table(a, b), table(b)), ["a", "a/p1", "a/p2"]);
  // p2 moved, p1 kept; a grown volume with the same partitions ends nothing.
  assert.deepEqual(names(table(a), table(volume("a", 1, [[0, 2048], [4096, 2048]]))), ["a/p2"]);
  assert.deepEqual(names(table(a), table(volume("a", 1, [[0, 2048], [2048, 2048]], 16 * 1024 * 1024))), []);
  assert.deepEqual(names(table(a), table(volume("a", 1, [[0, 2048]]))), ["a/p2"]);
  // A new volume of the same name is a new number: the old one's exports ended.
  assert.deepEqual(names(table(b), table(volume("b", 3, []))), ["b"]);
  // The identity carries the NAA the export had.
  const [ended] = endedLogicalUnits("unit-id", table(b), table());
  assert.equal(ended?.naa, scsiNaa("unit-id", 2, undefined));
});
