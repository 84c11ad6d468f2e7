// What this proves: the iSCSI codecs are right and bounded.
// - CRC32C gives the RFC 3720 appendix B.4 (RFC 7143 appendix A.4) test
//   vectors, sent least significant byte first.
// - Any PDU stream (random headers, AHS, data, with or without header and
//   data digests) split at any points frames back into the same PDUs; a
//   flipped bit under a digest is refused; a data segment longer than the
//   limit is refused from the header alone.
// - Text parsing is bounded (key and value lengths, number of keys, total
//   bytes, repeated keys) and random bytes never throw anything but TextError.
// - Operational negotiation: result functions (min, max, OR, AND), ranges
//   (Reject), unknown keys (NotUnderstood), discovery (Irrelevant), digests.
// - CHAP responses match RFC 1994's construction and both value encodings.
// fast-check prints the seed of any failure; rerun with that seed to replay.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";
import fc from "fast-check";
import { chapResponse, chooseChapAlgorithm, parseBinary } from "./chap.ts";
import { DEFAULT_ISCSI_LIMITS, resolveIscsiLimits } from "./limits.ts";
import { chapSecret, iscsiTargetName } from "./names.ts";
import { BHS_BYTES, PduFramingError, PduReader, digestOf, encodePdu, newBhs } from "./pdu.ts";
import { TextError, defaultSessionParams, encodeText, negotiateOperational, parseText } from "./text.ts";

function le(value: number): string {
  const out = Buffer.alloc(4);
  out.writeUInt32LE(value, 0);
  return out.toString("hex");
}

test("CRC32C: the RFC 3720 appendix B.4 test vectors, little-endian on the wire", () => {
  assert.equal(le(digestOf([Buffer.alloc(32, 0x00)])), "aa36918a");
  assert.equal(le(digestOf([Buffer.alloc(32, 0xff)])), "43aba862");
  assert.equal(le(digestOf([Buffer.from(Array.from({ length: 32 }, (_, i) => i))])), "4e79dd46");
  assert.equal(le(digestOf([Buffer.from(Array.from({ length: 32 }, (_, i) => 31 - i))])), "5cdb3f11");
  const scsiRead = Buffer.from(
    "01c00000 00000000 00000000 00000000 14000000 00000400 00000014 00000018 28000000 00000000 02000000 00000000".replaceAll(" ", ""),
    "hex",
  );
  // The iSCSI SCSI Read (10) command PDU of appendix B.4.
  assert.equal(scsiRead.length, 48);
  assert.equal(le(digestOf([scsiRead])), "563a96d9");
  // Chunked = whole.
  assert.equal(digestOf([Buffer.alloc(16), Buffer.alloc(16)]), digestOf([Buffer.alloc(32)]));
});

const pduArbitrary = fc.record({
  opcode: fc.integer({ min: 0, max: 0x3f }),
  flags: fc.integer({ min: 0, max: 255 }),
  ahsWords: fc.integer({ min: 0, max: 4 }),
  data: fc.uint8Array({ minLength: 0, maxLength: 700 }),
  tag: fc.integer({ min: 0, max: 0xffffffff }),
});

test("PduReader: any split of a PDU stream frames back the same PDUs, with and without digests", () => {
  fc.assert(
    fc.property(fc.array(pduArbitrary, { minLength: 1, maxLength: 6 }), fc.boolean(), fc.boolean(), fc.array(fc.integer({ min: 1, max: 97 }), { minLength: 1, maxLength: 20 }), (pdus, headerDigest, dataDigest, cuts) => {
      const wire: Buffer[] = [];
      const expected: { bhs: Buffer; ahs: Buffer; data: Buffer }[] = [];
      for (const p of pdus) {
        const bhs = newBhs(p.opcode, p.flags);
        bhs.writeUInt32BE(p.tag, 16);
        bhs[4] = p.ahsWords;
        const ahs = Buffer.alloc(p.ahsWords * 4, 0xa5);
        const data = Buffer.from(p.data);
        // encodePdu writes the BHS's DataSegmentLength; the AHS goes right after the BHS.
        const parts = encodePdu(bhs, [data], false, false);
        const withAhs = Buffer.concat([bhs, ahs]);
        const headerParts: Buffer[] = [withAhs];
        if (headerDigest) {
          const digest = Buffer.alloc(4);
          digest.writeUInt32LE(digestOf([withAhs]), 0);
          headerParts.push(digest);
        }
        const rest = parts.slice(1);
        if (dataDigest && data.length > 0) {
          const padded = Buffer.concat(rest);
          const digest = Buffer.alloc(4);
          digest.writeUInt32LE(digestOf([padded]), 0);
          rest.push(digest);
        }
        wire.push(...headerParts, ...rest);
        expected.push({ bhs: Buffer.from(bhs), ahs, data });
      }
      const stream = Buffer.concat(wire);
      const reader = new PduReader(1024);
      reader.headerDigest = headerDigest;
      reader.dataDigest = dataDigest;
      const got: { bhs: Buffer; ahs: Buffer; data: Buffer }[] = [];
      let offset = 0;
      let cut = 0;
      while (offset < stream.length) {
        const size = cuts[cut % cuts.length]!;
        cut += 1;
        reader.push(stream.subarray(offset, offset + size));
        offset += size;
        for (let pdu = reader.next(); pdu !== undefined; pdu = reader.next()) got.push(pdu);
      }
      assert.equal(got.length, expected.length);
      for (let i = 0; i < got.length; i += 1) {
        assert.deepEqual(got[i]!.bhs, expected[i]!.bhs);
        assert.deepEqual(got[i]!.ahs, expected[i]!.ahs);
        assert.deepEqual(got[i]!.data, expected[i]!.data);
      }
      assert.equal(reader.bufferedBytes, 0);
    }),
  );
});

test("PduReader: a flipped bit under a header or data digest is refused; an oversize segment is refused from its header", () => {
  const bhs = newBhs(0x01, 0x80);
  const parts = encodePdu(bhs, [Buffer.from("hello world")], true, true);
  const whole = Buffer.concat(parts);
  for (const [index, kind] of [[3, "header-digest"], [BHS_BYTES + 4 + 2, "data-digest"]] as const) {
    const bad = Buffer.from(whole);
    bad[index]! ^= 0x10;
    const reader = new PduReader(1024);
    reader.headerDigest = true;
    reader.dataDigest = true;
    reader.push(bad);
    assert.throws(() => reader.next(), (error: unknown) => error instanceof PduFramingError && error.kind === kind);
  }
  const good = new PduReader(1024);
  good.headerDigest = true;
  good.dataDigest = true;
  good.push(whole);
  assert.equal(good.next()?.data.toString(), "hello world");
  // Only the 48-byte header of a PDU announcing 16 MiB: refused without waiting for the data.
  const huge = newBhs(0x05, 0x80);
  huge.writeUIntBE(0xff_ffff, 5, 3);
  const reader = new PduReader(8192);
  reader.push(huge);
  assert.throws(() => reader.next(), (error: unknown) => error instanceof PduFramingError && error.kind === "oversize");
});

test("text: parsed with bounds; random bytes give pairs or TextError, never anything else", () => {
  const limits = DEFAULT_ISCSI_LIMITS;
  assert.deepEqual(parseText(Buffer.from("InitiatorName=iqn.x\0SessionType=Normal\0"), limits), [
    ["InitiatorName", "iqn.x"],
    ["SessionType", "Normal"],
  ]);
  assert.throws(() => parseText(Buffer.from("A=1\0A=2\0"), limits), TextError);
  assert.throws(() => parseText(Buffer.from(`${"K".repeat(64)}=1\0`), limits), TextError);
  assert.throws(() => parseText(Buffer.from(`K=${"v".repeat(8193)}\0`), limits), TextError);
  assert.throws(() => parseText(Buffer.from("novalue\0"), limits), TextError);
  assert.throws(() => parseText(Buffer.from(Array.from({ length: 257 }, (_, i) => `K${i}=1\0`).join("")), limits), TextError);
  assert.throws(() => parseText(Buffer.alloc(limits.textBytesMax + 1, 0x41), limits), TextError);
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 600 }), (bytes) => {
      try {
        const pairs = parseText(Buffer.from(bytes), limits);
        assert.ok(pairs.length <= limits.textKeysMax);
      } catch (error) {
        assert.ok(error instanceof TextError, String(error));
      }
    }),
  );
  assert.deepEqual(parseText(encodeText([["a", "b"], ["c", ""]]), limits), [["a", "b"], ["c", ""]]);
});

test("negotiation: result functions, ranges, unknown keys, digests, discovery", () => {
  const limits = resolveIscsiLimits({ maxBurstBytes: 1 << 20, firstBurstBytes: 1 << 18, outstandingR2tMax: 8 });
  const params = defaultSessionParams();
  const { answers } = negotiateOperational(
    [
      ["HeaderDigest", "CRC32C,None"],
      ["DataDigest", "None"],
      ["MaxBurstLength", "16776192"],
      ["FirstBurstLength", "262144"],
      ["InitialR2T", "No"],
      ["ImmediateData", "Yes"],
      ["MaxOutstandingR2T", "1"],
      ["DefaultTime2Wait", "0"],
      ["DefaultTime2Retain", "20"],
      ["ErrorRecoveryLevel", "2"],
      ["MaxConnections", "8"],
      ["DataPDUInOrder", "No"],
      ["MaxRecvDataSegmentLength", "65536"],
      ["X-com.example.thing", "1"],
      ["FirstBurstLength2", "1"],
      ["IFMarker", "No"],
      ["OFMarkInt", "2048~4096"],
    ],
    params,
    limits,
    "login",
    "Normal",
  );
  assert.deepEqual(Object.fromEntries(answers), {
    HeaderDigest: "CRC32C",
    DataDigest: "None",
    MaxBurstLength: String(1 << 20),
    FirstBurstLength: "262144",
    InitialR2T: "No",
    ImmediateData: "Yes",
    MaxOutstandingR2T: "1",
    DefaultTime2Wait: "2",
    DefaultTime2Retain: "0",
    ErrorRecoveryLevel: "0",
    MaxConnections: "1",
    DataPDUInOrder: "Yes",
    "X-com.example.thing": "NotUnderstood",
    FirstBurstLength2: "NotUnderstood",
    IFMarker: "No",
    OFMarkInt: "Irrelevant",
  });
  assert.equal(params.headerDigest, true);
  assert.equal(params.initiatorRecvDataSegmentBytes, 65536);
  assert.equal(params.initialR2T, false);
  assert.equal(params.maxOutstandingR2t, 1);
  // Out of range or malformed: Reject, and the parameter keeps its value.
  const before = defaultSessionParams();
  const rejected = negotiateOperational(
    [["MaxBurstLength", "100"], ["FirstBurstLength", "0x"], ["HeaderDigest", "MD5"], ["InitialR2T", "Maybe"], ["MaxRecvDataSegmentLength", "99999999"], ["TargetAlias", "x"]],
    before,
    limits,
    "login",
    "Normal",
  );
  for (const [, value] of rejected.answers) assert.equal(value, "Reject");
  assert.deepEqual(before, defaultSessionParams());
  // Discovery sessions: data-transfer keys are irrelevant.
  const discovery = negotiateOperational([["InitialR2T", "No"], ["MaxBurstLength", "4096"]], defaultSessionParams(), limits, "login", "Discovery");
  assert.deepEqual(Object.fromEntries(discovery.answers), { InitialR2T: "Irrelevant", MaxBurstLength: "Irrelevant" });
  // Full feature phase: login-only keys are rejected.
  const ffp = negotiateOperational([["MaxBurstLength", "4096"], ["HeaderDigest", "None"]], defaultSessionParams(), limits, "full-feature", "Normal");
  assert.deepEqual(Object.fromEntries(ffp.answers), { MaxBurstLength: "Reject", HeaderDigest: "Reject" });
});

test("negotiation: a required digest (--iscsi-require-digest) takes CRC32C from libiscsi's None,CRC32C; None alone is refused", () => {
  const limits = resolveIscsiLimits({});
  const offer: [string, string][] = [["HeaderDigest", "None,CRC32C"], ["DataDigest", "None,CRC32C"]];
  // Not required: the initiator's first choice (RFC 7143 section 6.2).
  const open = defaultSessionParams();
  assert.deepEqual(Object.fromEntries(negotiateOperational(offer, open, limits, "login", "Normal").answers), { HeaderDigest: "None", DataDigest: "None" });
  assert.deepEqual([open.headerDigest, open.dataDigest], [false, false]);
  // Header required: None is not allowed for us, so the first acceptable value is CRC32C.
  const header = defaultSessionParams();
  assert.deepEqual(Object.fromEntries(negotiateOperational(offer, header, limits, "login", "Normal", { header: true, data: false }).answers), { HeaderDigest: "CRC32C", DataDigest: "None" });
  assert.deepEqual([header.headerDigest, header.dataDigest], [true, false]);
  // Both required, and the initiator offers None only for data (libiscsi): Reject, digest off; the login then fails 02-00 (connection.ts).
  const both = defaultSessionParams();
  const answers = Object.fromEntries(negotiateOperational([["HeaderDigest", "None,CRC32C"], ["DataDigest", "None"]], both, limits, "login", "Normal", { header: true, data: true }).answers);
  assert.deepEqual(answers, { HeaderDigest: "CRC32C", DataDigest: "Reject" });
  assert.equal(both.dataDigest, false);
});

test("limits: checked against each other", () => {
  assert.throws(() => resolveIscsiLimits({ firstBurstBytes: 1 << 21, maxBurstBytes: 1 << 20 }), /firstBurstBytes/);
  assert.throws(() => resolveIscsiLimits({ recvDataSegmentBytes: 100 }), /512\.\.16777215/);
  assert.throws(() => resolveIscsiLimits({ queueDepth: 0 }), /positive integer/);
});

test("CHAP: MD5 and SHA-256 responses are H(id || secret || challenge); hex and base64 values; the initiator's first supported algorithm", () => {
  const challenge = Buffer.from("00112233445566778899aabbccddeeff", "hex");
  const md5 = createHash("md5").update(Buffer.from([7])).update("secret").update(challenge).digest();
  assert.deepEqual(chapResponse(5, 7, "secret", challenge), md5);
  const sha = createHash("sha256").update(Buffer.from([7])).update("secret").update(challenge).digest();
  assert.deepEqual(chapResponse(7, 7, "secret", challenge), sha);
  assert.deepEqual(parseBinary("0x00112233445566778899aabbccddeeff"), challenge);
  assert.deepEqual(parseBinary(`0b${challenge.toString("base64")}`), challenge);
  assert.equal(parseBinary("112233"), undefined);
  assert.equal(chooseChapAlgorithm("7,5"), 7);
  assert.equal(chooseChapAlgorithm("6,5"), 5);
  assert.equal(chooseChapAlgorithm("6,1000"), undefined);
  const key = Buffer.alloc(32, 1);
  assert.notEqual(chapSecret(key, "initiator"), chapSecret(key, "target"));
  assert.equal(iscsiTargetName("Rack_1", "Data_Vol/p2"), "iqn.2026-12.org.ipsan:rack-1.data-vol.p2");
});
