// What this proves: libnbd (through nbdsh, python3-libnbd), a client nobody
// here wrote, gets from a real `bin/ipsan unit` process exactly what the NBD
// protocol promises: errors with the right errno for out-of-range, unaligned
// and oversize requests with the connection still usable afterwards; FLUSH;
// FUA on writes, zeroes and trims; TRIM; WRITE_ZEROES plain, with NO_HOLE and
// with FAST_ZERO; BLOCK_STATUS with and without REQ_ONE; simple-reply mode;
// the Linux kernel client's modes (no structured replies, GO without info
// requests, and EXPORT_NAME without fixed newstyle or NO_ZEROES); LIST, INFO
// and LIST_META_CONTEXT in libnbd's option mode; and 64 concurrent requests
// of mixed sizes whose replies libnbd matches by cookie. Each script is one
// short nbdsh run; a Python assertion failure fails the test with its output.

import { after, before, describe, test } from "node:test";
import { runOk } from "../testing/process.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";

let unit: RunningUnit;

const PRELUDE = `
import nbd, os
URI = os.environ["URI"]
MiB = 1 << 20

def expect_errno(fn, name):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == name, "expected %s, got %s: %s" % (name, e.errno, e)
        return
    raise AssertionError("expected %s, got success" % name)

def connect(meta=True, structured=True, full_info=True, flags=None, uri=None):
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.set_request_structured_replies(structured)
    h.set_full_info(full_info)
    if flags is not None:
        h.set_handshake_flags(flags)
    h.connect_uri(uri or URI)
    return h

def extents(h, offset, length, flags=0):
    out = []
    def cb(meta, off, entries, err):
        assert meta == "base:allocation", meta
        out.extend(zip(entries[0::2], entries[1::2]))
        return 0
    h.block_status(length, offset, cb, flags)
    return out

def roundtrip(h, offset=0):
    data = os.urandom(4096)
    h.pwrite(data, offset)
    assert h.pread(4096, offset) == data
`;

async function nbdsh(exportName: string, script: string): Promise<void> {
  await runOk("nbdsh", ["-c", PRELUDE + script], { env: { URI: unit.uri(exportName) }, timeoutMs: 30_000 });
}

before(async () => {
  unit = await startUnit({
    capacity: "256M",
    volumes: [
      { name: "a", size: "64M" },
      { name: "b", size: "16M" },
    ],
  });
});

after(async () => {
  await unit?.close();
});

describe("nbdsh against a real unit", { concurrency: true }, () => {
  test("out-of-range, unaligned and oversize requests fail with the right errno; the connection stays usable", async () => {
    await nbdsh(
      "a",
      `
h = connect()
h.set_strict_mode(0)
size = h.get_size()
assert size == 64 * MiB, size
expect_errno(lambda: h.pread(512, size), "EINVAL")
expect_errno(lambda: h.pread(1024, size - 512), "EINVAL")
expect_errno(lambda: h.pwrite(b"x" * 512, size), "ENOSPC")
expect_errno(lambda: h.zero(1024, size - 512), "ENOSPC")
expect_errno(lambda: h.trim(512, size), "EINVAL")
expect_errno(lambda: h.block_status(512, size, lambda *a: 0), "EINVAL")
expect_errno(lambda: h.pread(512, 3), "EINVAL")
expect_errno(lambda: h.pread(33 * MiB, 0), "EOVERFLOW")
expect_errno(lambda: h.pread(0, 0), "EINVAL")
roundtrip(h)
h.shutdown()
`,
    );
  });

  test("flush and FUA on write, zero and trim", async () => {
    await nbdsh(
      "a",
      `
h = connect()
assert h.can_flush() and h.can_fua()
data = os.urandom(65536)
h.pwrite(data, MiB, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, MiB) == data
h.zero(8192, MiB, nbd.CMD_FLAG_FUA)
assert h.pread(8192, MiB) == bytes(8192)
h.trim(8192, MiB + 8192, nbd.CMD_FLAG_FUA)
h.flush()
roundtrip(h, MiB)
h.shutdown()
`,
    );
  });

  test("trim, write zeroes (plain, NO_HOLE, FAST_ZERO) and block status with and without REQ_ONE", async () => {
    await nbdsh(
      "b",
      `
h = connect()
assert h.can_trim() and h.can_zero() and h.can_meta_context("base:allocation")
size = h.get_size()
h.pwrite(b"\\xab" * MiB, 0)
e = extents(h, 0, 2 * MiB)
assert e[0][0] >= MiB and e[0][1] & nbd.STATE_HOLE == 0, e
# Without REQ_ONE: nonzero lengths, all but the last inside the request.
e = extents(h, 0, size)
assert all(length > 0 for length, _ in e), e
assert sum(length for length, _ in e[:-1]) < size, e
# With REQ_ONE: exactly one descriptor, no longer than asked.
e = extents(h, 0, 3 * MiB, nbd.CMD_FLAG_REQ_ONE)
assert len(e) == 1 and e[0][0] <= 3 * MiB, e
# Write zeroes that may punch a hole.
h.zero(MiB // 2, 0)
assert h.pread(MiB // 2, 0) == bytes(MiB // 2)
e = extents(h, 0, MiB // 2)
assert e[0][1] & nbd.STATE_ZERO or e[0][1] == 0, e
# NO_HOLE: reads as zero and stays allocated.
h.pwrite(b"\\xcd" * MiB, 2 * MiB)
h.zero(MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(MiB, 2 * MiB) == bytes(MiB)
e = extents(h, 2 * MiB, MiB)
assert e[0][1] & nbd.STATE_HOLE == 0, e
# FAST_ZERO: either done fast, or ENOTSUP with the data left alone.
h.pwrite(b"\\xef" * MiB, 4 * MiB)
if h.can_fast_zero():
    try:
        h.zero(MiB, 4 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(MiB, 4 * MiB) == bytes(MiB)
    except nbd.Error as e:
        assert e.errno == "ENOTSUP", e
        assert h.pread(MiB, 4 * MiB) == b"\\xef" * MiB
# TRIM succeeds; the range is allowed to read as anything afterwards.
h.trim(2 * MiB, 6 * MiB)
e = extents(h, 6 * MiB, 2 * MiB)
assert sum(length for length, _ in e) >= 1
roundtrip(h, 8 * MiB)
h.shutdown()
`,
    );
  });

  test("simple-reply mode (no structured replies)", async () => {
    await nbdsh(
      "a",
      `
h = connect(meta=False, structured=False)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
roundtrip(h, 12 * MiB)
h.set_strict_mode(0)
expect_errno(lambda: h.pread(512, h.get_size()), "EINVAL")
expect_errno(lambda: h.pread(33 * MiB, 0), "EINVAL")
roundtrip(h, 12 * MiB)
h.shutdown()
`,
    );
  });

  test("the Linux kernel client's modes: GO without info requests, and EXPORT_NAME without fixed newstyle or NO_ZEROES", async () => {
    await nbdsh(
      "a",
      `
h = connect(meta=False, structured=False, full_info=False)
assert h.get_protocol() == "newstyle-fixed", h.get_protocol()
assert h.get_size() == 64 * MiB
roundtrip(h, 16 * MiB)
h.flush()
h.shutdown()

# Client flags 0: plain newstyle, so libnbd can only use NBD_OPT_EXPORT_NAME,
# and the reply carries the 124 zero bytes.
h = connect(meta=False, structured=False, full_info=False, flags=0)
assert h.get_protocol() == "newstyle", h.get_protocol()
assert h.get_size() == 64 * MiB
roundtrip(h, 17 * MiB)
h.shutdown()

# Fixed newstyle without NO_ZEROES.
h = connect(meta=False, structured=False, full_info=False, flags=nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
assert h.get_size() == 64 * MiB
roundtrip(h, 18 * MiB)
h.shutdown()
`,
    );
  });

  test("option mode: LIST, INFO (known and unknown export), LIST_META_CONTEXT, GO", async () => {
    await nbdsh(
      "a",
      `
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(URI)
names = {}
def entry(name, description):
    names[name] = description
    return 0
assert h.opt_list(entry) >= 2
assert "a" in names and "b" in names, names
h.set_export_name("b")
h.opt_info()
assert h.get_size() == 16 * MiB
assert h.get_canonical_export_name() == "b"
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
contexts = []
h.opt_list_meta_context(lambda c: contexts.append(c) or 0)
assert contexts == ["base:allocation"], contexts
h.set_export_name("no-such-volume")
expect_errno(lambda: h.opt_info(), "ENOENT")
h.set_export_name("a")
h.opt_go()
assert h.get_size() == 64 * MiB
roundtrip(h, 20 * MiB)
h.shutdown()
`,
    );
  });

  test("64 concurrent requests of mixed sizes: replies out of order, matched by cookie", async () => {
    await nbdsh(
      "a",
      `
h = connect()
blocks = {}
for i in range(32):
    size = 512 * (1 + (i * 37) % 256)
    blocks[i] = (24 * MiB + i * 256 * 1024, os.urandom(size))
cookies = [h.aio_pwrite(data, offset) for offset, data in blocks.values()]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
bufs = {i: nbd.Buffer(len(data)) for i, (offset, data) in blocks.items()}
cookies = [h.aio_pread(bufs[i], blocks[i][0]) for i in blocks]
cookies += [h.aio_pread(nbd.Buffer(4096), 40 * MiB + k * 4096) for k in range(32)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for i, (offset, data) in blocks.items():
    assert bufs[i].to_bytearray() == data, i
h.shutdown()
`,
    );
  });
});
