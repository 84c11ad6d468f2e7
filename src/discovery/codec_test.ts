// What this proves: the discovery codec is total and strict. Any frame the
// encoder can produce decodes back to the same fields (fast-check round trip);
// random bytes, random prefixes of valid datagrams and every single-bit flip of
// a valid datagram are rejected with a named reason and never throw; a wrong
// cluster key, a forged tag, trailing bytes, reserved bits, a wrong direction,
// too many fragments and oversize datagrams each get their own reason; the
// storage-info payload round-trips through deflate+JSON, a decompression bomb
// stops at STORAGE_INFO_JSON_BYTES_MAX and validation errors name the field.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { deflateRawSync } from "node:zlib";
import fc from "fast-check";
import {
  decodeAck,
  decodeFrame,
  decodeHeartbeat,
  decodeStorageInfo,
  encodeAck,
  encodeFrame,
  encodeHeartbeat,
  encodeStorageInfo,
  splitFragments,
} from "./codec.ts";
import {
  DATAGRAM_BYTES_MAX,
  FRAGMENT_PAYLOAD_BYTES_MAX,
  FRAGMENTS_PER_MESSAGE_MAX,
  MESSAGE_TYPE,
  PAYLOAD_BYTES,
  STORAGE_INFO_JSON_BYTES_MAX,
  TAG_BYTES,
  type FrameFields,
  type MessageTypeName,
} from "./messages.ts";
import { sampleStorageInfo } from "./sample_info.ts";

const KEY = randomBytes(32);
const OTHER_KEY = randomBytes(32);

const SMALL_TYPES = ["STARTUP", "NEED_STORAGE_INFO", "ACK", "HEARTBEAT", "SHUTDOWN"] as const;
const FROM_STATION: Record<MessageTypeName, boolean> = {
  STARTUP: false,
  NEED_STORAGE_INFO: true,
  STORAGE_INFO: false,
  ACK: true,
  HEARTBEAT: false,
  SHUTDOWN: false,
  ENROL: true,
  REFUSE: true,
};

const unitName = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/);
const u32 = fc.integer({ min: 1, max: 0xffff_ffff });

const frameFields: fc.Arbitrary<FrameFields> = fc.oneof(
  fc
    .record({
      typeName: fc.constantFrom(...SMALL_TYPES),
      unitName,
      sessionId: fc.uint8Array({ minLength: 8, maxLength: 8 }).map((b) => Buffer.from(b).toString("hex")),
      sequence: u32,
      messageId: u32,
      timestampMs: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
      seed: fc.uint8Array({ minLength: 16, maxLength: 16 }),
    })
    .map(({ typeName, seed, ...rest }) => ({
      ...rest,
      type: MESSAGE_TYPE[typeName],
      fromStation: FROM_STATION[typeName],
      fragmentIndex: 0,
      fragmentCount: 1,
      payload: Buffer.from(seed).subarray(0, PAYLOAD_BYTES[typeName]),
    })),
  fc
    .record({
      unitName,
      sessionId: fc.uint8Array({ minLength: 8, maxLength: 8 }).map((b) => Buffer.from(b).toString("hex")),
      sequence: u32,
      messageId: u32,
      timestampMs: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
      fragmentCount: fc.integer({ min: 1, max: FRAGMENTS_PER_MESSAGE_MAX }),
      index: fc.nat(),
      payload: fc.uint8Array({ minLength: 1, maxLength: FRAGMENT_PAYLOAD_BYTES_MAX }),
    })
    .map(({ index, fragmentCount, ...rest }) => ({
      ...rest,
      type: MESSAGE_TYPE.STORAGE_INFO,
      fromStation: false,
      fragmentCount,
      fragmentIndex: index % fragmentCount,
    })),
);

function sample(overrides: Partial<FrameFields> = {}): FrameFields {
  return {
    type: MESSAGE_TYPE.HEARTBEAT,
    fromStation: false,
    unitName: "unit-1",
    sessionId: "0123456789abcdef",
    sequence: 7,
    messageId: 3,
    timestampMs: 1_700_000_000_000,
    fragmentIndex: 0,
    fragmentCount: 1,
    payload: encodeHeartbeat({ generation: 5 }),
    ...overrides,
  };
}

/** Re-signs a datagram after editing its body (to reach checks behind the HMAC). */
function resign(bytes: Buffer, key = KEY): Buffer {
  const body = bytes.subarray(0, bytes.length - TAG_BYTES);
  createHmac("sha256", key).update(body).digest().copy(bytes, body.length);
  return bytes;
}

function reason(bytes: Uint8Array, key = KEY): string {
  const result = decodeFrame(bytes, key);
  return result.kind === "invalid" ? result.reason : "frame";
}

test("round trip: every encodable frame decodes to the same fields and fits one datagram", () => {
  fc.assert(
    fc.property(frameFields, (fields) => {
      const bytes = encodeFrame(fields, KEY);
      assert.ok(bytes.length <= DATAGRAM_BYTES_MAX);
      const result = decodeFrame(bytes, KEY);
      assert.equal(result.kind, "frame");
      if (result.kind !== "frame") return;
      const { typeName, version, payload, ...rest } = result.frame;
      assert.equal(version, 1);
      assert.equal(MESSAGE_TYPE[typeName], fields.type);
      assert.equal(rest.unitName, fields.unitName);
      assert.equal(rest.sessionId, fields.sessionId);
      assert.equal(rest.sequence, fields.sequence);
      assert.equal(rest.messageId, fields.messageId);
      assert.equal(rest.timestampMs, fields.timestampMs);
      assert.equal(rest.fragmentIndex, fields.fragmentIndex);
      assert.equal(rest.fragmentCount, fields.fragmentCount);
      assert.equal(rest.fromStation, fields.fromStation);
      assert.deepEqual(payload, Buffer.from(fields.payload));
    }),
    { numRuns: 500 },
  );
});

test("random bytes never throw and never decode", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 1400, size: "max" }), (bytes) => {
      const result = decodeFrame(bytes, KEY);
      assert.equal(result.kind, "invalid");
    }),
    { numRuns: 2000 },
  );
});

test("random bytes behind a valid magic and version are rejected too", () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 1300, size: "max" }), (tail) => {
      const bytes = Buffer.concat([Buffer.from([0x49, 0x50, 0x53, 0x44, 1]), tail]);
      assert.equal(decodeFrame(bytes, KEY).kind, "invalid");
    }),
    { numRuns: 2000 },
  );
});

test("every prefix of a valid datagram is rejected as truncated or malformed, never thrown", () => {
  const bytes = encodeFrame(sample(), KEY);
  for (let length = 0; length < bytes.length; length++) {
    const r = reason(bytes.subarray(0, length));
    assert.ok(r === "truncated" || r === "malformed", `prefix ${length}: ${r}`);
  }
});

test("every single-bit flip of a valid datagram is rejected", () => {
  const bytes = encodeFrame(sample(), KEY);
  for (let bit = 0; bit < bytes.length * 8; bit++) {
    const copy = Buffer.from(bytes);
    copy[bit >> 3] = (copy[bit >> 3] ?? 0) ^ (1 << (bit & 7));
    assert.notEqual(reason(copy), "frame", `bit ${bit}`);
  }
});

test("each defect has its own reason", () => {
  const good = encodeFrame(sample(), KEY);
  assert.equal(reason(good), "frame");
  assert.equal(reason(good, OTHER_KEY), "bad_hmac", "wrong cluster key");
  const forged = Buffer.from(good);
  forged.fill(0xaa, forged.length - TAG_BYTES);
  assert.equal(reason(forged), "bad_hmac", "forged tag");
  assert.equal(reason(Buffer.alloc(DATAGRAM_BYTES_MAX + 1)), "too_large");
  assert.equal(reason(Buffer.alloc(10)), "truncated");
  const magic = Buffer.from(good);
  magic[0] = 0;
  assert.equal(reason(magic), "bad_magic");
  const version = Buffer.from(good);
  version[4] = 2;
  assert.equal(reason(version), "bad_version");
  assert.equal(reason(Buffer.concat([good, Buffer.alloc(1)])), "malformed", "trailing byte");
  const type = Buffer.from(good);
  type[5] = 99;
  assert.equal(reason(resign(type)), "bad_type");
  const flags = Buffer.from(good);
  flags[6] = 0x80;
  assert.equal(reason(resign(flags)), "malformed", "reserved flag");
  const reserved = Buffer.from(good);
  reserved[39] = 1;
  assert.equal(reason(resign(reserved)), "malformed", "reserved field");
  const direction = Buffer.from(good);
  direction[6] = 1; // a HEARTBEAT claiming to come from the station
  assert.equal(reason(resign(direction)), "wrong_direction");
  const fragments = encodeFrame(sample({ type: MESSAGE_TYPE.STORAGE_INFO, payload: Buffer.alloc(10, 1) }), KEY);
  fragments.writeUInt16BE(FRAGMENTS_PER_MESSAGE_MAX + 1, 34);
  assert.equal(reason(resign(fragments)), "too_many_fragments");
  const split = Buffer.from(good);
  split.writeUInt16BE(2, 34); // a HEARTBEAT in two fragments
  assert.equal(reason(resign(split)), "malformed");
  const badName = encodeFrame(sample(), KEY);
  badName[40] = 0x2f; // "/" is not allowed in a unit name
  assert.equal(reason(resign(badName)), "malformed");
  const payloadLength = Buffer.from(good);
  payloadLength.writeUInt16BE(FRAGMENT_PAYLOAD_BYTES_MAX + 1, 36);
  assert.equal(reason(payloadLength), "too_large");
});

test("small payloads: reserved bytes must be zero", () => {
  const ack = encodeAck({ ackedMessageId: 9, ackedType: MESSAGE_TYPE.STARTUP, status: 0, heartbeatIntervalMs: 1000 });
  assert.deepEqual(decodeAck(ack), {
    kind: "ok",
    value: { ackedMessageId: 9, ackedType: MESSAGE_TYPE.STARTUP, status: 0, heartbeatIntervalMs: 1000 },
  });
  const dirty = Buffer.from(ack);
  dirty[15] = 1;
  assert.equal(decodeAck(dirty).kind, "invalid");
  const ackOfAck = Buffer.from(ack);
  ackOfAck[4] = MESSAGE_TYPE.ACK;
  assert.equal(decodeAck(ackOfAck).kind, "invalid");
  const heartbeat = encodeHeartbeat({ generation: 3 });
  heartbeat[7] = 9;
  assert.equal(decodeHeartbeat(heartbeat).kind, "invalid");
});

test("storage info: round trip through deflate+JSON, fragments, 100 volumes in a few datagrams", () => {
  const info = sampleStorageInfo("unit-7", { volumeCount: 100, partitionsPerVolume: 2, grant: "10.0.0.5" });
  const payload = encodeStorageInfo({ generation: 4, info });
  assert.ok(payload !== null);
  const fragments = splitFragments(payload);
  assert.ok(fragments.length <= 8, `${fragments.length} fragments for 100 volumes`);
  const decoded = decodeStorageInfo(Buffer.concat(fragments));
  assert.deepEqual(decoded, { kind: "ok", value: { generation: 4, info } });
});

test("storage info: a decompression bomb stops at the limit; garbage and bad fields are named", () => {
  const bomb = deflateRawSync(Buffer.alloc(STORAGE_INFO_JSON_BYTES_MAX + 1, 0x20));
  assert.ok(bomb.length < 4096);
  const bombResult = decodeStorageInfo(bomb);
  assert.equal(bombResult.kind === "invalid" && bombResult.reason, "too_large");
  const garbage = decodeStorageInfo(Buffer.from("not deflate at all"));
  assert.equal(garbage.kind, "invalid");
  const notJson = decodeStorageInfo(deflateRawSync(Buffer.from("{nope")));
  assert.equal(notJson.kind === "invalid" && notJson.reason, "bad_payload");
  const info = sampleStorageInfo("u", { volumeCount: 2 });
  const broken = { v: 1, generation: 1, info: { ...info, volumes: [info.volumes[0], { ...info.volumes[1], extents: [{ startLba: 10, lengthLba: 5, endLba: 15 }] }] } };
  const result = decodeStorageInfo(deflateRawSync(Buffer.from(JSON.stringify(broken))));
  assert.equal(result.kind, "invalid");
  assert.match(result.kind === "invalid" ? result.detail : "", /info\.volumes\[1\]\.extents\[0\]\.endLba: expected startLba \+ lengthLba - 1 = 14, got 15/);
  const tooMany = { v: 1, generation: 1, info: { ...info, volumes: Array.from({ length: 4097 }, () => info.volumes[0]) } };
  const many = decodeStorageInfo(deflateRawSync(Buffer.from(JSON.stringify(tooMany))));
  assert.match(many.kind === "invalid" ? many.detail : "", /info\.volumes: expected at most 4096 items/);
});

test("storage info: random JSON values never throw in validation", () => {
  fc.assert(
    fc.property(fc.jsonValue({ maxDepth: 4 }), (value) => {
      const bytes = deflateRawSync(Buffer.from(JSON.stringify({ v: 1, generation: 1, info: value })));
      assert.equal(decodeStorageInfo(bytes).kind, "invalid");
    }),
    { numRuns: 500 },
  );
});
