// What this proves: validateRequest gives the errno proto.md asks for in each
// case (unknown command or flag, flag not advertised, read-only export,
// out-of-range and overflowing offset+length, unaligned request after the
// client agreed to block sizes, oversize read, FLUSH with non-zero fields,
// shutdown), and accepts the requests that are valid; statusDescriptors turns
// a device's extents into base:allocation descriptors that are merged,
// clipped to the request, bounded in number, exactly one with REQ_ONE, and
// never empty. Both are pure, so this is a table test with no socket.

import assert from "node:assert/strict";
import { test } from "node:test";
import { NBD_ERRNO } from "../util/errors.ts";
import type { OpenedExport } from "./handshake.ts";
import { DEFAULT_NBD_LIMITS } from "./limits.ts";
import { NBD_CMD, NBD_CMD_FLAG, NBD_STATE, NBD_TFLAG } from "./protocol.ts";
import type { RequestFrame } from "./request_codec.ts";
import { statusDescriptors, validateRequest } from "./transmission.ts";

const ALL_FLAGS =
  NBD_TFLAG.HAS_FLAGS |
  NBD_TFLAG.SEND_FLUSH |
  NBD_TFLAG.SEND_FUA |
  NBD_TFLAG.SEND_TRIM |
  NBD_TFLAG.SEND_WRITE_ZEROES |
  NBD_TFLAG.SEND_FAST_ZERO |
  NBD_TFLAG.SEND_DF |
  NBD_TFLAG.SEND_CACHE |
  NBD_TFLAG.CAN_MULTI_CONN;

function opened(overrides: Partial<OpenedExport> = {}): OpenedExport {
  return {
    device: undefined as never,
    name: "vol",
    sizeBytes: 1 << 20,
    transmissionFlags: ALL_FLAGS,
    structuredReplies: true,
    metaContextId: 1,
    alignmentAgreed: true,
    ...overrides,
  };
}

function request(type: number, offset: number, length: number, flags = 0): RequestFrame {
  return { type, offset, length, flags, cookieHi: 0, cookieLo: 1, payload: type === NBD_CMD.WRITE ? Buffer.alloc(length) : undefined };
}

const L = DEFAULT_NBD_LIMITS;
const SIZE = 1 << 20;

test("validateRequest returns the errno proto.md asks for", () => {
  const cases: [string, OpenedExport, RequestFrame, number | undefined][] = [
    ["valid read", opened(), request(NBD_CMD.READ, 0, 4096), undefined],
    ["valid write FUA", opened(), request(NBD_CMD.WRITE, SIZE - 512, 512, NBD_CMD_FLAG.FUA), undefined],
    ["valid read DF", opened(), request(NBD_CMD.READ, 0, 512, NBD_CMD_FLAG.DF), undefined],
    ["valid zero NO_HOLE|FAST_ZERO", opened(), request(NBD_CMD.WRITE_ZEROES, 0, SIZE, NBD_CMD_FLAG.NO_HOLE | NBD_CMD_FLAG.FAST_ZERO), undefined],
    ["valid block status REQ_ONE, unaligned", opened(), request(NBD_CMD.BLOCK_STATUS, 1, 3, NBD_CMD_FLAG.REQ_ONE), undefined],
    ["valid flush", opened(), request(NBD_CMD.FLUSH, 0, 0), undefined],
    ["valid trim of the whole export", opened(), request(NBD_CMD.TRIM, 0, SIZE), undefined],
    ["valid cache", opened(), request(NBD_CMD.CACHE, 4096, 4096), undefined],
    ["unknown command", opened(), request(9, 0, 512), NBD_ERRNO.EINVAL],
    ["unknown flag", opened(), request(NBD_CMD.READ, 0, 512, 1 << 9), NBD_ERRNO.EINVAL],
    ["REQ_ONE on a read", opened(), request(NBD_CMD.READ, 0, 512, NBD_CMD_FLAG.REQ_ONE), NBD_ERRNO.EINVAL],
    ["NO_HOLE on a write", opened(), request(NBD_CMD.WRITE, 0, 512, NBD_CMD_FLAG.NO_HOLE), NBD_ERRNO.EINVAL],
    ["DF without structured replies", opened({ transmissionFlags: ALL_FLAGS & ~NBD_TFLAG.SEND_DF, structuredReplies: false }), request(NBD_CMD.READ, 0, 512, NBD_CMD_FLAG.DF), NBD_ERRNO.EINVAL],
    ["FUA not advertised", opened({ transmissionFlags: ALL_FLAGS & ~NBD_TFLAG.SEND_FUA }), request(NBD_CMD.WRITE, 0, 512, NBD_CMD_FLAG.FUA), NBD_ERRNO.EINVAL],
    ["FAST_ZERO not advertised", opened({ transmissionFlags: ALL_FLAGS & ~NBD_TFLAG.SEND_FAST_ZERO }), request(NBD_CMD.WRITE_ZEROES, 0, 512, NBD_CMD_FLAG.FAST_ZERO), NBD_ERRNO.EINVAL],
    ["trim not advertised", opened({ transmissionFlags: ALL_FLAGS & ~NBD_TFLAG.SEND_TRIM }), request(NBD_CMD.TRIM, 0, 512), NBD_ERRNO.EINVAL],
    ["flush not advertised", opened({ transmissionFlags: ALL_FLAGS & ~NBD_TFLAG.SEND_FLUSH }), request(NBD_CMD.FLUSH, 0, 0), NBD_ERRNO.EINVAL],
    ["flush with an offset", opened(), request(NBD_CMD.FLUSH, 512, 0), NBD_ERRNO.EINVAL],
    ["write on a read-only export", opened({ transmissionFlags: ALL_FLAGS | NBD_TFLAG.READ_ONLY }), request(NBD_CMD.WRITE, 0, 512), NBD_ERRNO.EPERM],
    ["trim on a read-only export", opened({ transmissionFlags: ALL_FLAGS | NBD_TFLAG.READ_ONLY }), request(NBD_CMD.TRIM, 0, 512), NBD_ERRNO.EPERM],
    ["read past the end", opened(), request(NBD_CMD.READ, SIZE - 512, 1024), NBD_ERRNO.EINVAL],
    ["read at 2^64-512 (overflowing offset+length)", opened(), request(NBD_CMD.READ, 2 ** 64 - 512, 1024), NBD_ERRNO.EINVAL],
    ["write past the end", opened(), request(NBD_CMD.WRITE, SIZE, 512), NBD_ERRNO.ENOSPC],
    ["write zeroes past the end", opened(), request(NBD_CMD.WRITE_ZEROES, SIZE - 512, 1024), NBD_ERRNO.ENOSPC],
    ["trim past the end", opened(), request(NBD_CMD.TRIM, SIZE - 512, 1024), NBD_ERRNO.EINVAL],
    ["block status past the end", opened(), request(NBD_CMD.BLOCK_STATUS, SIZE, 512), NBD_ERRNO.EINVAL],
    ["zero-length read", opened(), request(NBD_CMD.READ, 0, 0), NBD_ERRNO.EINVAL],
    ["unaligned read after agreeing to block sizes", opened(), request(NBD_CMD.READ, 1, 512), NBD_ERRNO.EINVAL],
    ["unaligned read without agreeing", opened({ alignmentAgreed: false }), request(NBD_CMD.READ, 1, 3), undefined],
    ["block status without a context", opened({ metaContextId: undefined }), request(NBD_CMD.BLOCK_STATUS, 0, 512), NBD_ERRNO.EINVAL],
    ["read over the payload limit, structured", opened({ sizeBytes: 2 ** 40 }), request(NBD_CMD.READ, 0, L.payloadBytesMax + 512), NBD_ERRNO.EOVERFLOW],
    ["read over the payload limit, simple", opened({ sizeBytes: 2 ** 40, structuredReplies: false, transmissionFlags: ALL_FLAGS & ~NBD_TFLAG.SEND_DF }), request(NBD_CMD.READ, 0, L.payloadBytesMax + 512), NBD_ERRNO.EINVAL],
    ["zero over the payload limit is fine", opened({ sizeBytes: 2 ** 40 }), request(NBD_CMD.WRITE_ZEROES, 0, 2 ** 32 - 512), undefined],
  ];
  for (const [name, exp, frame, errno] of cases) {
    assert.equal(validateRequest(exp, frame, L, false)?.errno, errno, name);
  }
  assert.equal(validateRequest(opened(), request(NBD_CMD.READ, 0, 512), L, true)?.errno, NBD_ERRNO.ESHUTDOWN);
  // Messages name the export and the values.
  assert.match(validateRequest(opened(), request(NBD_CMD.READ, SIZE, 512), L, false)?.message ?? "", /export=vol offset=1048576 length=512 size=1048576/);
});

test("statusDescriptors merges, clips, bounds and never returns nothing", () => {
  const data = (n: number) => ({ lengthBytes: n, hole: false, zero: false });
  const hole = (n: number) => ({ lengthBytes: n, hole: true, zero: true });
  const H = NBD_STATE.HOLE | NBD_STATE.ZERO;
  assert.deepEqual(statusDescriptors([data(512), data(512), hole(1024), data(4096)], 8192, false, 100), [
    { lengthBytes: 1024, flags: 0 },
    { lengthBytes: 1024, flags: H },
    { lengthBytes: 4096, flags: 0 },
  ]);
  // Clipped to the requested length.
  assert.deepEqual(statusDescriptors([hole(1 << 20)], 4096, false, 100), [{ lengthBytes: 4096, flags: H }]);
  // REQ_ONE: exactly one descriptor, at most the request length.
  assert.deepEqual(statusDescriptors([data(512), hole(512)], 4096, true, 100), [{ lengthBytes: 512, flags: 0 }]);
  assert.deepEqual(statusDescriptors([data(512), data(512), hole(512)], 768, true, 100), [{ lengthBytes: 768, flags: 0 }]);
  // Bounded count.
  const alternating = Array.from({ length: 100 }, (_, i) => (i % 2 === 0 ? data(512) : hole(512)));
  assert.equal(statusDescriptors(alternating, 51200, false, 10).length, 10);
  // A device reporting nothing (or nonsense) gets one status-0 descriptor over the range.
  assert.deepEqual(statusDescriptors([], 4096, false, 100), [{ lengthBytes: 4096, flags: 0 }]);
  assert.deepEqual(statusDescriptors([data(0), data(-5)], 4096, false, 100), [{ lengthBytes: 4096, flags: 0 }]);
});
