// What this proves: the NBD codecs are total, incremental and bounded.
// - Random bytes fed to every decoder (client flags, options, requests, and
//   the option payload parsers) never throw: they answer need_more, a frame
//   or invalid with a reason.
// - Any split of a valid byte stream (options, or requests with write
//   payloads) decodes to the same frames as the whole stream, including one
//   byte at a time.
// - Encoders and decoders round-trip (requests, options, INFO/GO and
//   META_CONTEXT data, option replies, simple and structured replies).
// - Split payloads: a large WRITE payload spanning received chunks comes back
//   as those chunks in order (no gather copy) and equals the sent data; one
//   in too many small chunks (over 4x memory) is gathered into one buffer.
// - Lengths over a limit are refused from the header alone: the decoder says
//   invalid while only the header is queued, so it never waits for (or
//   buffers) the oversize payload.
// fast-check prints the seed of any failure; rerun with that seed to replay.

import assert from "node:assert/strict";
import { test } from "node:test";
import fc from "fast-check";
import { ByteQueue } from "./byte_queue.ts";
import {
  decodeClientFlags,
  decodeOption,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOptionReply,
  encodeServerData,
  parseInfoRequest,
  parseMetaContextRequest,
  utf8Bounded,
} from "./handshake_codec.ts";
import {
  decodeGreeting,
  decodeOptionReply,
  decodeTransmissionReply,
  encodeClientFlags,
  encodeInfoRequestData,
  encodeMetaContextRequestData,
  encodeOption,
  encodeRequest,
  type RequestFields,
} from "./peer_codec.ts";
import { NBD_CMD, NBD_FLAG, NBD_REP, NBD_REPLY_FLAG, NBD_REPLY_TYPE, WIRE } from "./protocol.ts";
import {
  type RequestFrame,
  SPLIT_PAYLOAD_BYTES_MIN,
  SPLIT_PAYLOAD_PART_BYTES_MIN,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeSimpleReply,
  readReplyHeaderBytes,
  writeReadReplyHeader,
} from "./request_codec.ts";

const PAYLOAD_MAX = 64 * 1024;
const OPTION_DATA_MAX = 16 * 1024;

/** Feeds `stream` in the given pieces, draining the decoder after each; returns frames and the final result kind. */
function decodeAll<F>(
  pieces: readonly Buffer[],
  decode: (queue: ByteQueue) => { kind: "need_more" } | { kind: "frame"; frame: F } | { kind: "invalid" },
): { frames: F[]; end: "need_more" | "invalid" } {
  const queue = new ByteQueue();
  const frames: F[] = [];
  for (const piece of pieces) {
    queue.push(piece);
    for (;;) {
      const result = decode(queue);
      if (result.kind === "frame") frames.push(result.frame);
      else if (result.kind === "invalid") return { frames, end: "invalid" };
      else break;
    }
  }
  return { frames, end: "need_more" };
}

/** Splits `stream` at the given cut points (any order, duplicates allowed). */
function split(stream: Buffer, cuts: readonly number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
  const pieces: Buffer[] = [];
  let at = 0;
  for (const point of points) {
    pieces.push(stream.subarray(at, point));
    at = point;
  }
  pieces.push(stream.subarray(at));
  return pieces;
}

function oneByteAtATime(stream: Buffer): Buffer[] {
  return Array.from({ length: stream.length }, (_, i) => stream.subarray(i, i + 1));
}

const cookieArb = fc.record({ cookieHi: fc.nat({ max: 0xffffffff }), cookieLo: fc.nat({ max: 0xffffffff }) });
const offsetArb = fc.oneof(fc.nat({ max: 0xffffffff }), fc.maxSafeNat());

const requestArb: fc.Arbitrary<RequestFields> = fc.oneof(
  fc
    .record({ cookie: cookieArb, flags: fc.nat({ max: 0xffff }), offset: offsetArb, payload: fc.uint8Array({ maxLength: 2048 }) })
    .map(({ cookie, flags, offset, payload }) => ({
      ...cookie,
      flags,
      type: NBD_CMD.WRITE,
      offset,
      length: payload.length,
      payload: Buffer.from(payload),
    })),
  fc
    .record({
      cookie: cookieArb,
      flags: fc.nat({ max: 0xffff }),
      type: fc.nat({ max: 0xffff }).filter((t) => t !== NBD_CMD.WRITE),
      offset: offsetArb,
      length: fc.nat({ max: 0xffffffff }),
    })
    .map(({ cookie, ...rest }) => ({ ...cookie, ...rest })),
);

function sameRequest(frame: RequestFrame, fields: RequestFields): void {
  assert.equal(frame.type, fields.type);
  assert.equal(frame.flags, fields.flags);
  assert.equal(frame.cookieHi, fields.cookieHi);
  assert.equal(frame.cookieLo, fields.cookieLo);
  assert.equal(frame.offset, fields.offset);
  assert.equal(frame.length, fields.length);
  if (fields.type === NBD_CMD.WRITE) assert.deepEqual(Buffer.from(frame.payload ?? []), fields.payload);
  else assert.equal(frame.payload, undefined);
}

test("random bytes never make a decoder throw", () => {
  fc.assert(
    fc.property(fc.uint8Array({ maxLength: 512 }), fc.array(fc.nat(), { maxLength: 8 }), (bytes, cuts) => {
      const pieces = split(Buffer.from(bytes), cuts);
      decodeAll(pieces, (q) => decodeRequest(q, PAYLOAD_MAX));
      decodeAll(pieces, (q) => decodeOption(q, OPTION_DATA_MAX));
      decodeAll(pieces, decodeClientFlags);
      parseInfoRequest(Buffer.from(bytes));
      parseMetaContextRequest(Buffer.from(bytes), 16);
    }),
    { numRuns: 2000 },
  );
});

test("random bytes after a valid request magic never throw", () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 24, maxLength: 200 }), (bytes) => {
      const stream = Buffer.concat([Buffer.from([0x25, 0x60, 0x95, 0x13]), Buffer.from(bytes)]);
      decodeAll([stream], (q) => decodeRequest(q, PAYLOAD_MAX));
    }),
    { numRuns: 1000 },
  );
});

test("any split of a valid request stream decodes to the same requests", () => {
  fc.assert(
    fc.property(fc.array(requestArb, { minLength: 1, maxLength: 12 }), fc.array(fc.nat(), { maxLength: 20 }), (requests, cuts) => {
      const stream = Buffer.concat(requests.map(encodeRequest));
      const { frames, end } = decodeAll(split(stream, cuts), (q) => decodeRequest(q, PAYLOAD_MAX));
      assert.equal(end, "need_more");
      assert.equal(frames.length, requests.length);
      frames.forEach((frame, i) => sameRequest(frame, requests[i] as RequestFields));
    }),
    { numRuns: 500 },
  );
});

test("a large WRITE payload across chunks is kept as the chunks; tiny chunks are gathered", () => {
  const payload = Buffer.alloc(4 * SPLIT_PAYLOAD_BYTES_MIN);
  for (let i = 0; i < payload.length; i++) payload[i] = (i * 7 + 3) & 0xff;
  const stream = encodeRequest({ type: NBD_CMD.WRITE, flags: 0, cookieHi: 1, cookieLo: 2, offset: 4096, length: payload.length, payload });
  fc.assert(
    fc.property(fc.array(fc.nat(), { maxLength: 12 }), (cuts) => {
      const pieces = split(stream, cuts);
      const { frames } = decodeAll(pieces, (q) => decodeRequest(q, 1 << 30, undefined, true));
      const frame = frames[0] as RequestFrame;
      assert.equal(frames.length, 1);
      const data = frame.payloadParts !== undefined ? Buffer.concat(frame.payloadParts) : (frame.payload as Buffer);
      assert.deepEqual(data, payload);
      if (frame.payloadParts !== undefined) {
        assert.equal(frame.payload, undefined);
        assert.ok(frame.payloadParts.length > 1);
        for (const part of frame.payloadParts) assert.ok(pieces.some((piece) => piece.buffer === part.buffer), "a part is a view of a received chunk");
      }
    }),
    { numRuns: 200 },
  );
  // 1 KiB chunks: 256 parts for 256 KiB is more than one part per SPLIT_PAYLOAD_PART_BYTES_MIN: gathered.
  assert.ok(1024 < SPLIT_PAYLOAD_PART_BYTES_MIN);
  const small = Array.from({ length: Math.ceil(stream.length / 1024) }, (_, i) => Buffer.from(stream.subarray(i * 1024, (i + 1) * 1024)));
  const { frames } = decodeAll(small, (q) => decodeRequest(q, 1 << 30, undefined, true));
  assert.equal(frames[0]?.payloadParts, undefined);
  assert.deepEqual(frames[0]?.payload, payload);
});

test("a request stream fed one byte at a time decodes the same", () => {
  fc.assert(
    fc.property(fc.array(requestArb, { minLength: 1, maxLength: 4 }), (requests) => {
      const stream = Buffer.concat(requests.map(encodeRequest));
      const { frames } = decodeAll(oneByteAtATime(stream), (q) => decodeRequest(q, PAYLOAD_MAX));
      assert.equal(frames.length, requests.length);
      frames.forEach((frame, i) => sameRequest(frame, requests[i] as RequestFields));
    }),
    { numRuns: 100 },
  );
});

const optionArb = fc.record({ option: fc.nat({ max: 0xffffffff }), data: fc.uint8Array({ maxLength: 300 }) });

test("any split of a valid handshake stream decodes to the same client flags and options", () => {
  fc.assert(
    fc.property(
      fc.nat({ max: 3 }),
      fc.array(optionArb, { minLength: 1, maxLength: 10 }),
      fc.array(fc.nat(), { maxLength: 20 }),
      (flags, options, cuts) => {
        const stream = Buffer.concat([encodeClientFlags(flags), ...options.map((o) => encodeOption(o.option, Buffer.from(o.data)))]);
        for (const pieces of [split(stream, cuts), oneByteAtATime(stream)]) {
          const queue = new ByteQueue();
          let flagsSeen: { fixedNewstyle: boolean; noZeroes: boolean } | undefined;
          const decoded: { option: number; data: Buffer }[] = [];
          for (const piece of pieces) {
            queue.push(piece);
            if (flagsSeen === undefined) {
              const result = decodeClientFlags(queue);
              if (result.kind === "frame") flagsSeen = result.frame;
              else {
                assert.equal(result.kind, "need_more");
                continue;
              }
            }
            for (let r = decodeOption(queue, OPTION_DATA_MAX); r.kind !== "need_more"; r = decodeOption(queue, OPTION_DATA_MAX)) {
              assert.equal(r.kind, "frame");
              if (r.kind === "frame") decoded.push(r.frame);
            }
          }
          assert.deepEqual(flagsSeen, { fixedNewstyle: (flags & 1) !== 0, noZeroes: (flags & 2) !== 0 });
          assert.deepEqual(
            decoded.map((o) => ({ option: o.option, data: [...o.data] })),
            options.map((o) => ({ option: o.option, data: [...o.data] })),
          );
        }
      },
    ),
    { numRuns: 300 },
  );
});

test("client flags with unknown bits are invalid", () => {
  fc.assert(
    fc.property(fc.nat({ max: 0xffffffff }).filter((f) => (f & ~3) !== 0), (flags) => {
      const queue = new ByteQueue();
      queue.push(encodeClientFlags(flags));
      const result = decodeClientFlags(queue);
      assert.equal(result.kind, "invalid");
      assert.equal(queue.length, 4, "nothing consumed");
    }),
  );
});

test("a wrong option magic or request magic is invalid at once", () => {
  const option = encodeOption(7, Buffer.alloc(10));
  option.writeUInt8(option.readUInt8(3) ^ 0xff, 3);
  const q1 = new ByteQueue();
  q1.push(option);
  assert.equal(decodeOption(q1, OPTION_DATA_MAX).kind, "invalid");
  const request = encodeRequest({ cookieHi: 1, cookieLo: 2, flags: 0, type: NBD_CMD.READ, offset: 0, length: 512 });
  request.writeUInt32BE(0x12560953, 0); // the historic magic
  const q2 = new ByteQueue();
  q2.push(request);
  const result = decodeRequest(q2, PAYLOAD_MAX);
  assert.deepEqual(result, { kind: "invalid", reason: "bad_request_magic", magic: 0x12560953 });
});

test("oversize lengths are refused from the header alone, before any payload is buffered", () => {
  fc.assert(
    fc.property(fc.integer({ min: OPTION_DATA_MAX + 1, max: 0xffffffff }), (length) => {
      const header = encodeOption(6).subarray(0, 12);
      const queue = new ByteQueue();
      queue.push(Buffer.concat([header, Buffer.from([length >>> 24, (length >>> 16) & 255, (length >>> 8) & 255, length & 255])]));
      const result = decodeOption(queue, OPTION_DATA_MAX);
      assert.equal(result.kind, "invalid");
      if (result.kind === "invalid") assert.equal(result.reason, "option_too_large");
      assert.equal(queue.length, WIRE.OPTION_HEADER_BYTES);
    }),
  );
  fc.assert(
    fc.property(fc.integer({ min: PAYLOAD_MAX + 1, max: 0xffffffff }), cookieArb, (length, cookie) => {
      const header = encodeRequest({ ...cookie, flags: 0, type: NBD_CMD.WRITE, offset: 0, length });
      const queue = new ByteQueue();
      queue.push(header);
      const result = decodeRequest(queue, PAYLOAD_MAX);
      assert.equal(result.kind, "invalid");
      if (result.kind === "invalid" && result.reason === "payload_too_large") {
        assert.equal(result.length, length);
        assert.equal(result.cookieHi, cookie.cookieHi);
        assert.equal(result.cookieLo, cookie.cookieLo);
      } else assert.fail("expected payload_too_large");
    }),
  );
  // A READ of any length carries no payload: the decoder does not wait for one.
  const queue = new ByteQueue();
  queue.push(encodeRequest({ cookieHi: 0, cookieLo: 9, flags: 0, type: NBD_CMD.READ, offset: 0, length: 0xffffffff }));
  assert.equal(decodeRequest(queue, PAYLOAD_MAX).kind, "frame");
});

test("INFO/GO and META_CONTEXT data round-trip, and malformed data is invalid", () => {
  const nameArb = fc.string({ maxLength: 100 }).filter((s) => !s.includes("\0"));
  fc.assert(
    fc.property(nameArb, fc.array(fc.nat({ max: 0xffff }), { maxLength: 20 }), (name, infos) => {
      const parsed = parseInfoRequest(encodeInfoRequestData(name, infos));
      assert.deepEqual(parsed, { kind: "ok", value: { name, infos } });
    }),
  );
  fc.assert(
    fc.property(nameArb, fc.array(nameArb, { maxLength: 10 }), (name, queries) => {
      const parsed = parseMetaContextRequest(encodeMetaContextRequestData(name, queries), 16);
      assert.deepEqual(parsed, { kind: "ok", value: { name, queries } });
    }),
  );
  // Truncations and trailing bytes are invalid.
  const good = encodeInfoRequestData("vol", [1, 3]);
  for (let cut = 0; cut < good.length; cut += 1) assert.equal(parseInfoRequest(good.subarray(0, cut)).kind, "invalid", `cut ${cut}`);
  assert.equal(parseInfoRequest(Buffer.concat([good, Buffer.alloc(1)])).kind, "invalid");
  const meta = encodeMetaContextRequestData("vol", ["base:allocation"]);
  for (let cut = 0; cut < meta.length; cut += 1) assert.equal(parseMetaContextRequest(meta.subarray(0, cut), 16).kind, "invalid");
  assert.equal(parseMetaContextRequest(Buffer.concat([meta, Buffer.alloc(1)]), 16).kind, "invalid");
  // Name length over the string limit, NUL in a name, invalid UTF-8, too many queries.
  const long = encodeInfoRequestData("x".repeat(WIRE.STRING_BYTES_MAX + 1), []);
  assert.equal(parseInfoRequest(long).kind, "invalid");
  assert.equal(parseInfoRequest(encodeInfoRequestData("a\0b", [])).kind, "invalid");
  const badUtf8 = encodeInfoRequestData("ab", []);
  badUtf8.writeUInt8(0xff, 4);
  assert.equal(parseInfoRequest(badUtf8).kind, "invalid");
  assert.equal(parseMetaContextRequest(encodeMetaContextRequestData("v", ["base:", "base:", "base:"]), 2).kind, "invalid");
});

test("server messages round-trip through the peer decoders", () => {
  const greeting = new ByteQueue();
  greeting.push(encodeGreeting());
  assert.deepEqual(decodeGreeting(greeting), { kind: "frame", frame: { handshakeFlags: NBD_FLAG.FIXED_NEWSTYLE | NBD_FLAG.NO_ZEROES } });

  fc.assert(
    fc.property(fc.nat({ max: 0xffffffff }), fc.constantFrom(...Object.values(NBD_REP)), fc.uint8Array({ maxLength: 200 }), (option, type, data) => {
      const queue = new ByteQueue();
      queue.push(encodeOptionReply(option, type, Buffer.from(data)));
      assert.deepEqual(decodeOptionReply(queue), { kind: "frame", frame: { option, replyType: type, data: Buffer.from(data) } });
      assert.equal(queue.length, 0);
    }),
  );

  fc.assert(
    fc.property(cookieArb, fc.nat({ max: 200 }), (cookie, errno) => {
      const queue = new ByteQueue();
      queue.push(encodeSimpleReply(errno, cookie));
      assert.deepEqual(decodeTransmissionReply(queue), { kind: "frame", frame: { kind: "simple", errno, ...cookie } });
    }),
  );

  fc.assert(
    fc.property(cookieArb, fc.nat({ max: 200 }).map((e) => e + 1), fc.string({ maxLength: 100 }), (cookie, errno, message) => {
      const queue = new ByteQueue();
      queue.push(encodeErrorChunk(cookie, errno, utf8Bounded(message)));
      const result = decodeTransmissionReply(queue);
      assert.equal(result.kind, "frame");
      if (result.kind !== "frame" || result.frame.kind !== "chunk") return assert.fail("expected a chunk");
      assert.equal(result.frame.type, NBD_REPLY_TYPE.ERROR);
      assert.equal(result.frame.flags, NBD_REPLY_FLAG.DONE);
      assert.equal(result.frame.cookieHi, cookie.cookieHi);
      assert.equal(result.frame.payload.readUInt32BE(0), errno);
      const length = result.frame.payload.readUInt16BE(4);
      assert.equal(result.frame.payload.subarray(6, 6 + length).toString("utf8"), message);
    }),
  );

  fc.assert(
    fc.property(
      cookieArb,
      fc.nat({ max: 5 }),
      fc.array(fc.record({ lengthBytes: fc.nat({ max: 0xffffffff }), flags: fc.nat({ max: 3 }) }), { minLength: 1, maxLength: 20 }),
      (cookie, contextId, descriptors) => {
        const queue = new ByteQueue();
        queue.push(encodeBlockStatusChunk(cookie, contextId, descriptors, true));
        const result = decodeTransmissionReply(queue);
        if (result.kind !== "frame" || result.frame.kind !== "chunk") return assert.fail("expected a chunk");
        assert.equal(result.frame.type, NBD_REPLY_TYPE.BLOCK_STATUS);
        assert.equal(result.frame.payload.readUInt32BE(0), contextId);
        const back = descriptors.map((_, i) => ({
          lengthBytes: result.frame.kind === "chunk" ? result.frame.payload.readUInt32BE(4 + i * 8) : -1,
          flags: result.frame.kind === "chunk" ? result.frame.payload.readUInt32BE(8 + i * 8) : -1,
        }));
        assert.deepEqual(back, descriptors.map((d) => ({ ...d })));
      },
    ),
  );

  // Read replies: simple header then data; structured OFFSET_DATA chunk with the offset.
  for (const structured of [false, true]) {
    const data = Buffer.from("0123456789abcdef");
    const headerBytes = readReplyHeaderBytes(structured);
    const reply = Buffer.alloc(headerBytes + data.length);
    data.copy(reply, headerBytes);
    writeReadReplyHeader(reply, structured, { cookieHi: 7, cookieLo: 8 }, 4096, data.length);
    const queue = new ByteQueue();
    queue.push(reply);
    const result = decodeTransmissionReply(queue);
    if (result.kind !== "frame") return assert.fail("expected a frame");
    if (result.frame.kind === "simple") {
      assert.equal(structured, false);
      assert.equal(result.frame.errno, 0);
      assert.deepEqual(queue.take(data.length), data);
    } else {
      assert.equal(structured, true);
      assert.equal(result.frame.type, NBD_REPLY_TYPE.OFFSET_DATA);
      assert.equal(result.frame.payload.readUInt32BE(4), 4096);
      assert.deepEqual(result.frame.payload.subarray(8), data);
    }
  }

  const none = new ByteQueue();
  none.push(encodeNoneChunk({ cookieHi: 1, cookieLo: 2 }));
  const noneResult = decodeTransmissionReply(none);
  assert.equal(noneResult.kind === "frame" && noneResult.frame.kind === "chunk" && noneResult.frame.type, NBD_REPLY_TYPE.NONE);
});

test("fixed-layout handshake replies have the sizes proto.md gives", () => {
  assert.equal(encodeGreeting().length, 18);
  assert.equal(encodeInfoExport(1 << 30, 1).length, 12);
  assert.equal(encodeInfoBlockSize({ minimumBytes: 512, preferredBytes: 4096, maximumBytes: 1 << 25 }).length, 14);
  assert.equal(encodeExportNameReply(1 << 30, 1, true).length, 10);
  assert.equal(encodeExportNameReply(1 << 30, 1, false).length, 134);
  const server = encodeServerData("vol", "a volume");
  assert.equal(server.readUInt32BE(0), 3);
  assert.equal(server.subarray(4).toString(), "vola volume");
  // Sizes above 2^32 are written as full 64-bit values.
  const info = encodeInfoExport(2 ** 40 + 512, 0x1ff);
  assert.equal(info.readBigUInt64BE(2), 2n ** 40n + 512n);
  // utf8Bounded never splits a character.
  const bounded = utf8Bounded("é".repeat(3000));
  assert.equal(bounded.length, WIRE.STRING_BYTES_MAX);
  assert.doesNotThrow(() => new TextDecoder("utf-8", { fatal: true }).decode(bounded));
});

test("ByteQueue take/peek give the same bytes under any chunking", () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 1, maxLength: 300 }), fc.array(fc.nat(), { maxLength: 10 }), fc.array(fc.nat({ max: 64 }), { maxLength: 30 }), (bytes, cuts, takes) => {
      const stream = Buffer.from(bytes);
      const queue = new ByteQueue();
      for (const piece of split(stream, cuts)) queue.push(piece);
      let at = 0;
      for (const want of takes) {
        const n = Math.min(want, queue.length);
        if (n > 0) assert.deepEqual(Buffer.from(queue.peek(n)), stream.subarray(at, at + n));
        assert.deepEqual(Buffer.from(queue.take(n)), stream.subarray(at, at + n));
        at += n;
        assert.equal(queue.length, stream.length - at);
      }
    }),
  );
});
