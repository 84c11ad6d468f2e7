// READ Data-In by sendfile on plaintext iSCSI without digests (the NBD
// session's pump, src/nbd/send_file.ts; docs/adr/0018-read-replies-by-sendfile.md).
//
// A real `ipsan unit --iscsi` and a real initiator (qemu's libiscsi): the
// volume is written over NBD, then read back over iSCSI by qemu-img convert
// with 16 requests in flight, of 1 MiB (each four 256 KiB Data-In PDUs: a BHS
// then the data by sendfile, some cut short by the socket buffer and finished
// by a copy, the PDUs after them copied) and of 256 KiB, and by qemu-img
// compare (qemu's own sizes, up to the unit's 8 MiB MAXIMUM TRANSFER LENGTH:
// the copy path); every byte must match. With header digests (qemu's
// header-digest=crc32c) the copy path answers, and must match too.
// Canaries: a unit that sends each PDU's data from one block further on, and
// one that copies the PDUs after a cut-short one from the wrong place, must
// fail the read-back while the header-digest (copy) read-back stays correct.
// The raw initiator reads with MaxRecvDataSegmentLength 65536 (sendfile,
// sixteen PDUs per MiB) and 65537 (not whole blocks: its PDUs need padding,
// which sendfile cannot send, so the copy path answers) and gets every byte.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { sha256 } from "../testing/data.ts";
import { type PatchedBuild, patchedBuild } from "../testing/patched_build.ts";
import { describeResult, run, runOk } from "../testing/process.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { REPO_ROOT, type RunningUnit, startUnit } from "../testing/unit.ts";
import { iscsiTargetName } from "./names.ts";
import { RawInitiator } from "./testing/initiator.ts";

// On disk (the OS temp dir), as a unit's storage would be: the page cache and sendfile of a real filesystem.
const dir = makeTempDir("iscsi-sendfile");
after(() => dir.remove());

const MiB = 1024 * 1024;
const TIMEOUT_MS = 60_000;

/** A real unit (of `ipsanBin`, default this checkout) with iSCSI and volume "v" of random `data`, written over NBD (so its pages are in the page cache). */
async function filledUnit(name: string, sizeBytes: number, ipsanBin?: string): Promise<{ unit: RunningUnit; data: Buffer; source: string }> {
  const source = dir.file(`${name}-source.raw`);
  const data = randomBytes(sizeBytes);
  writeFileSync(source, data);
  const unitDir = dir.file(`${name}-unit`);
  mkdirSync(unitDir);
  const unit = await startUnit({
    name: "sf",
    dataDir: unitDir,
    capacity: sizeBytes + 64 * MiB,
    volumes: [{ name: "v", size: sizeBytes }],
    extraArgs: ["--iscsi", "127.0.0.1:0"],
    ...(ipsanBin === undefined ? {} : { ipsanBin }),
  });
  try {
    await runOk("nbdcopy", ["--flush", source, unit.uri("v")], { timeoutMs: TIMEOUT_MS });
  } catch (error) {
    await unit.stop();
    throw error;
  }
  return { unit, data, source };
}

/** This checkout's build with `from` replaced by `to` in its iSCSI connection. */
function patchedConnection(name: string, from: string, to: string): PatchedBuild {
  return patchedBuild(`iscsi-sendfile-canary-${name}`, [{ file: "dist/iscsi/connection.js", from, to }], REPO_ROOT, { nodeModules: true });
}

/** What a real unit (of `ipsanBin`, default this checkout) sent back for each way of reading the whole volume over iSCSI: "ok" or what went wrong. */
async function readBackOverIscsi(name: string, ipsanBin?: string): Promise<Record<string, string>> {
  const { unit, data, source } = await filledUnit(name, 64 * MiB, ipsanBin);
  const outcome: Record<string, string> = {};
  const want = sha256(data);
  const target = iscsiTargetName("sf", "v");
  // qemu asks for up to the unit's MAXIMUM TRANSFER LENGTH (8 MiB) per READ; blkdebug's max-transfer makes them
  // sizes sendfile takes (64 KiB to 1 MiB; the benchmark's seqread1m reads 1 MiB).
  const iscsi = { driver: "iscsi", transport: "tcp", portal: unit.iscsiPortal, target, lun: "0" };
  const limited = (maxTransfer: number, image: object): string => `json:${JSON.stringify({ driver: "raw", file: { driver: "blkdebug", "max-transfer": maxTransfer, image } })}`;
  const convertAndCompare = async (label: string, uri: string): Promise<void> => {
    const copy = dir.file(`${name}-${label}.raw`);
    const result = await run("qemu-img", ["convert", "-m", "16", "-f", "raw", "-O", "raw", uri, copy], { timeoutMs: TIMEOUT_MS });
    if (result.code !== 0) outcome[label] = `qemu-img convert failed: ${describeResult(result)}`;
    else outcome[label] = sha256(readFileSync(copy)) === want ? "ok" : "bytes differ";
  };
  try {
    await convertAndCompare("plain-1m", limited(MiB, iscsi));
    await convertAndCompare("plain-256k", limited(256 * 1024, iscsi));
    const compared = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", source, `iscsi://${unit.iscsiPortal}/${target}/0`], { timeoutMs: TIMEOUT_MS });
    outcome["compare"] = compared.code === 0 ? "ok" : `qemu-img compare: ${describeResult(compared)}`;
    await convertAndCompare("header-digest-1m", limited(MiB, { ...iscsi, "header-digest": "crc32c" }));
  } finally {
    await unit.stop();
  }
  return outcome;
}

test("a real unit: qemu-img reads back every byte over iSCSI, without digests (sendfile) and with header digests (copy)", { timeout: 180_000 }, async () => {
  assert.deepEqual(await readBackOverIscsi("good"), { "plain-1m": "ok", "plain-256k": "ok", compare: "ok", "header-digest-1m": "ok" });
});

/** The read-back against a unit built with `from` replaced by `to` in its iSCSI connection; the header-digest (copy path) read-back must stay correct. */
async function canaryOutcome(name: string, from: string, to: string): Promise<Record<string, string>> {
  const build = patchedConnection(name, from, to);
  try {
    const outcome = await readBackOverIscsi(name, build.ipsanBin);
    assert.equal(outcome["header-digest-1m"], "ok", `with header digests nothing goes by sendfile: ${JSON.stringify(outcome)}`);
    return outcome;
  } finally {
    build.remove();
  }
}

test("canary: a unit that sends each Data-In PDU's data from one block further on fails the read-back", { timeout: 180_000 }, async () => {
  const outcome = await canaryOutcome("offset", "this.#sendFileFd, bhs, offsetBytes + at, length, pool)", "this.#sendFileFd, bhs, offsetBytes + at + 512, length, pool)");
  assert.ok(outcome["plain-1m"] !== "ok" && outcome["plain-256k"] !== "ok", JSON.stringify(outcome));
});

test("canary: a unit that copies the Data-In PDUs after a cut-short one from the wrong place fails the read-back", { timeout: 180_000 }, async () => {
  const outcome = await canaryOutcome("tail", "device.readSync(data, offsetBytes + at);", "device.readSync(data, offsetBytes + at + 512);");
  assert.notEqual(outcome["plain-1m"], "ok", JSON.stringify(outcome));
});

/** READs by the raw initiator with each MaxRecvDataSegmentLength against a real unit (of `ipsanBin`): what went wrong, per read (empty: all right). */
async function rawReadBack(name: string, segments: readonly number[], ipsanBin?: string): Promise<string[]> {
  const sizeBytes = 16 * MiB;
  const { unit, data } = await filledUnit(`${name}-raw`, sizeBytes, ipsanBin);
  const wrong: string[] = [];
  try {
    const portal = unit.iscsiPortal ?? "";
    const colon = portal.lastIndexOf(":");
    for (const segment of segments) {
      const initiator = await RawInitiator.connect(portal.slice(0, colon), Number(portal.slice(colon + 1)));
      try {
        const login = await initiator.login({ targetName: iscsiTargetName("sf", "v"), maxRecvDataSegmentLength: segment });
        assert.equal(login.status, 0, `login with MaxRecvDataSegmentLength ${segment}`);
        await initiator.ready();
        // 1 MiB at block 0, 192 KiB at an odd block, and 1 MiB ending at the volume's end.
        for (const [lba, blocks] of [[0, 2048], [777, 384], [sizeBytes / 512 - 2048, 2048]] as const) {
          const got = await initiator.read10(lba, blocks).catch((error: unknown) => ({ status: -1, data: Buffer.from(String(error)) }));
          if (got.status !== 0 || !got.data.equals(data.subarray(lba * 512, (lba + blocks) * 512))) wrong.push(`segment ${segment}, READ(10) ${lba}+${blocks}: status ${got.status}`);
          if (got.status === -1) break;
        }
      } finally {
        initiator.close();
      }
    }
  } finally {
    await unit.stop();
  }
  return wrong;
}

test("the raw initiator reads back every byte with MaxRecvDataSegmentLength 65536 (sendfile) and 65537 (padded PDUs: copied)", { timeout: 120_000 }, async () => {
  assert.deepEqual(await rawReadBack("raw", [65536, 65537]), []);
});

test("canary: a unit that sends PDUs needing padding by sendfile fails the raw read-back", { timeout: 120_000 }, async () => {
  const build = patchedConnection("padding", "segment % LOGICAL_BLOCK_BYTES === 0 && burst % LOGICAL_BLOCK_BYTES === 0", "true");
  try {
    assert.notDeepEqual(await rawReadBack("padding", [65537], build.ipsanBin), []);
  } finally {
    build.remove();
  }
});

// A PDU that cannot go by sendfile (its pages left the cache, the socket is full) is sent by copy with those
// after it. When that is the last PDU, the one carrying the status, its StatSN must be taken once: a StatSN
// skipped tells the initiator a status was lost. A stand-in build forces the fallback on every READ's last PDU.
const LAST_PDU_BY_COPY = {
  from: "const sent = sendHeaderAndDataNow(device, this.#sendFileFd, bhs, offsetBytes + at, length, pool);",
  to: "const sent = at > 0 && at + length >= lengthBytes ? undefined : sendHeaderAndDataNow(device, this.#sendFileFd, bhs, offsetBytes + at, length, pool);",
};

/** READs whose last Data-In PDU falls back to a copy, through a unit of `ipsanBin`: the StatSNs that did not follow their predecessor by one, and wrong data. */
async function statSnGaps(name: string, ipsanBin: string): Promise<string[]> {
  const sizeBytes = 16 * MiB;
  const { unit, data } = await filledUnit(`${name}-statsn`, sizeBytes, ipsanBin);
  const wrong: string[] = [];
  try {
    const portal = unit.iscsiPortal ?? "";
    const colon = portal.lastIndexOf(":");
    const initiator = await RawInitiator.connect(portal.slice(0, colon), Number(portal.slice(colon + 1)));
    try {
      const login = await initiator.login({ targetName: iscsiTargetName("sf", "v"), maxRecvDataSegmentLength: 65536 });
      assert.equal(login.status, 0);
      await initiator.ready();
      const first = initiator.statSNs.length;
      for (const lba of [0, 2048, 777, 8192]) {
        const got = await initiator.read10(lba, 2048);
        if (got.status !== 0 || !got.data.equals(data.subarray(lba * 512, (lba + 2048) * 512))) wrong.push(`READ(10) ${lba}+2048: status ${got.status} or data differ`);
      }
      const sns = initiator.statSNs.slice(first);
      for (let i = 1; i < sns.length; i++) if (sns[i] !== (((sns[i - 1] as number) + 1) >>> 0)) wrong.push(`StatSN ${sns[i]} after ${sns[i - 1]}`);
      if (sns.length !== 4) wrong.push(`${sns.length} statuses for 4 READs`);
    } finally {
      initiator.close();
    }
  } finally {
    await unit.stop();
  }
  return wrong;
}

test("a READ whose last Data-In PDU goes by copy after the others went by sendfile keeps StatSN in sequence", { timeout: 120_000 }, async () => {
  const build = patchedConnection("last-pdu-copy", LAST_PDU_BY_COPY.from, LAST_PDU_BY_COPY.to);
  try {
    assert.deepEqual(await statSnGaps("last-copy", build.ipsanBin), []);
  } finally {
    build.remove();
  }
});

test("canary: a unit that takes the last PDU's StatSN twice when it falls back to a copy skips a StatSN", { timeout: 120_000 }, async () => {
  const build = patchedBuild(
    "iscsi-sendfile-canary-statsn",
    [
      { file: "dist/iscsi/connection.js", from: LAST_PDU_BY_COPY.from, to: LAST_PDU_BY_COPY.to },
      { file: "dist/iscsi/connection.js", from: "this.#statSN = statSN;", to: "" },
    ],
    REPO_ROOT,
    { nodeModules: true },
  );
  try {
    const wrong = await statSnGaps("statsn-canary", build.ipsanBin);
    assert.ok(wrong.some((w) => w.startsWith("StatSN")), JSON.stringify(wrong));
  } finally {
    build.remove();
  }
});
