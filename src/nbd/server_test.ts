// What this proves: the engine behaviours that need a device the test can
// hold and fail at will (nbdkit tests these with its delay and error
// filters), on a real socket against an in-process NbdServer:
// - replies leave in completion order, not request order, and cookies come
//   back as the same 8 bytes;
// - at most requestsInFlightMax requests reach the device per connection,
//   and the server-wide byte budget bounds payload bytes across connections;
// - device failures become the right errno (EIO, ENOSPC, EPERM, ENOTSUP for
//   a FAST_ZERO that cannot be fast), with a message in structured mode;
// - close() answers new requests ESHUTDOWN, lets the request in flight
//   finish and reply, closes the device, and ends every connection;
// - at the connection limit with every connection transmitting, a new
//   connection is refused; the device is closed only after the requests of
//   a vanished client finish.
// Everything the unit's real provider can show is tested against the real
// `ipsan unit` in hostile_test.ts and nbdsh_test.ts instead.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import type { BlockCapabilities, BlockDevice, ExportProvider, Extent, ZeroOptions } from "../block/types.ts";
import { IpsanError, NBD_ERRNO } from "../util/errors.ts";
import { sleep, waitFor } from "../testing/process.ts";
import { NBD_CMD, NBD_CMD_FLAG } from "./protocol.ts";
import { type NbdLimits, NbdServer } from "./server.ts";
import { RawNbdClient } from "./testing/raw_client.ts";

interface Pending {
  readonly op: string;
  readonly offset: number;
  readonly length: number;
  readonly options: ZeroOptions | undefined;
  resolve(): void;
  reject(error: unknown): void;
}

/** A device whose every call waits until the test resolves or rejects it. */
class GatedDevice implements BlockDevice {
  readonly name = "gated";
  readonly description = "a device the test drives";
  readonly sizeBytes = 1 << 24;
  readonly capabilities: BlockCapabilities = {
    readOnly: false,
    canFlush: true,
    canTrim: true,
    canZero: true,
    canFastZero: true,
    canFua: true,
    canCache: true,
    canExtents: true,
    canMultiConn: false,
  };
  readonly pending: Pending[] = [];
  maxConcurrent = 0;
  closed = 0;

  private gate(op: string, offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return new Promise((resolve, reject) => {
      this.pending.push({ op, offset, length, options, resolve, reject });
      this.maxConcurrent = Math.max(this.maxConcurrent, this.pending.length);
    });
  }

  /** Settles the first pending call matching `offset` (or the first one). */
  settle(offset?: number, error?: unknown): Pending {
    const index = offset === undefined ? 0 : this.pending.findIndex((p) => p.offset === offset);
    const [entry] = this.pending.splice(index, 1);
    assert.ok(entry !== undefined, `a pending call at ${offset}`);
    if (error === undefined) entry.resolve();
    else entry.reject(error);
    return entry;
  }

  async read(buffer: Buffer, offsetBytes: number): Promise<void> {
    await this.gate("read", offsetBytes, buffer.length);
    buffer.fill(offsetBytes / 512);
  }
  write(buffer: Buffer, offsetBytes: number): Promise<void> {
    return this.gate("write", offsetBytes, buffer.length);
  }
  flush(): Promise<void> {
    return this.gate("flush", 0, 0);
  }
  trim(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.gate("trim", offsetBytes, lengthBytes);
  }
  zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    return this.gate("zero", offsetBytes, lengthBytes, options);
  }
  cache(offsetBytes: number, lengthBytes: number): Promise<void> {
    return this.gate("cache", offsetBytes, lengthBytes);
  }
  async extents(_offsetBytes: number, lengthBytes: number): Promise<readonly Extent[]> {
    return [{ lengthBytes, hole: false, zero: false }];
  }
  async close(): Promise<void> {
    this.closed += 1;
  }
}

const servers: NbdServer[] = [];

async function serve(limits: Partial<NbdLimits> = {}): Promise<{ server: NbdServer; device: GatedDevice; target: { host: string; port: number } }> {
  const device = new GatedDevice();
  const provider: ExportProvider = {
    defaultExport: "gated",
    list: () => [{ name: "gated", description: device.description }],
    open: async (name) => {
      if (name !== "gated") throw new IpsanError("NOT_FOUND", `export ${name} not found`);
      return device;
    },
  };
  const server = new NbdServer({ provider, limits, env: {} });
  servers.push(server);
  const bound = await server.listen({ host: "127.0.0.1", port: 0 });
  assert.ok("host" in bound);
  return { server, device, target: bound };
}

async function client(target: { host: string; port: number }, structured = true): Promise<RawNbdClient> {
  const c = await RawNbdClient.connect(target);
  await c.handshake();
  await c.go("gated", { structured });
  return c;
}

const until = (what: string, probe: () => boolean): Promise<true> =>
  waitFor(what, () => (probe() ? true : undefined), { timeoutMs: 3000, intervalMs: 5 });

after(async () => {
  await Promise.all(servers.map((s) => s.close()));
});

test("replies leave in completion order and echo the cookie's 8 bytes", async () => {
  const { device, target } = await serve();
  const c = await client(target);
  c.send({ cookieHi: 0xffffffff, cookieLo: 0x80000001, flags: 0, type: NBD_CMD.READ, offset: 0, length: 512 });
  c.send({ cookieHi: 0x01020304, cookieLo: 0x05060708, flags: 0, type: NBD_CMD.READ, offset: 4096, length: 512 });
  await until("two reads at the device", () => device.pending.length === 2);
  device.settle(4096);
  const first = await c.reply(512);
  assert.equal(first.cookieLo, 0x05060708);
  assert.equal(first.chunks[0]?.cookieHi, 0x01020304);
  assert.deepEqual(first.data, Buffer.alloc(512, 8));
  device.settle(0);
  const second = await c.reply(512);
  assert.equal(second.chunks[0]?.cookieHi, 0xffffffff);
  assert.equal(second.cookieLo, 0x80000001);
  c.destroy();
});

test("no more than requestsInFlightMax requests reach the device per connection", async () => {
  const { device, target } = await serve({ requestsInFlightMax: 4 });
  const c = await client(target);
  for (let i = 0; i < 10; i += 1) c.send({ cookieHi: 0, cookieLo: i, flags: 0, type: NBD_CMD.READ, offset: i * 512, length: 512 });
  await until("four reads at the device", () => device.pending.length === 4);
  await sleep(50);
  assert.equal(device.pending.length, 4, "the fifth waits");
  const seen = new Set<number>();
  for (let i = 0; i < 10; i += 1) {
    await until("a pending read", () => device.pending.length > 0);
    device.settle();
    seen.add((await c.reply(512)).cookieLo);
  }
  assert.equal(seen.size, 10);
  assert.equal(device.maxConcurrent, 4);
  c.destroy();
});

test("the server-wide byte budget bounds payload bytes in flight across connections", async () => {
  const KiB = 1024;
  const { device, target } = await serve({ payloadBytesMax: 16 * KiB, connectionBytesInFlightMax: 32 * KiB, serverBytesInFlightMax: 32 * KiB });
  const clients = [await client(target), await client(target)];
  for (const [n, c] of clients.entries()) {
    for (let i = 0; i < 4; i += 1) c.send({ cookieHi: n, cookieLo: i, flags: 0, type: NBD_CMD.READ, offset: (n * 8 + i) * 16 * KiB, length: 16 * KiB });
  }
  await until("two reads at the device", () => device.pending.length === 2);
  await sleep(50);
  assert.equal(device.pending.length, 2, "32 KiB of reads in flight, no more");
  // Each client reads its four replies in turn (replies of one connection arrive in order).
  const replies = clients.map(async (c) => {
    const errnos: number[] = [];
    for (let i = 0; i < 4; i += 1) errnos.push((await c.reply(16 * KiB)).errno);
    return errnos;
  });
  for (let i = 0; i < 8; i += 1) {
    await until("a pending read", () => device.pending.length > 0);
    assert.ok(device.pending.length <= 2);
    device.settle();
  }
  assert.deepEqual(await Promise.all(replies), [
    [0, 0, 0, 0],
    [0, 0, 0, 0],
  ]);
  assert.equal(device.maxConcurrent, 2);
  for (const c of clients) c.destroy();
});

test("device failures become the right errno", async () => {
  const { device, target } = await serve();
  for (const structured of [true, false]) {
    const c = await client(target, structured);
    const cases: [number, number, number, unknown, number][] = [
      [NBD_CMD.READ, 0, 0, new IpsanError("IO_ERROR", "disk on fire"), NBD_ERRNO.EIO],
      [NBD_CMD.WRITE, 0, 0, Object.assign(new Error("no space"), { code: "ENOSPC" }), NBD_ERRNO.ENOSPC],
      [NBD_CMD.WRITE, 0, NBD_CMD_FLAG.FUA, new IpsanError("READ_ONLY", "volume is read-only"), NBD_ERRNO.EPERM],
      [NBD_CMD.WRITE_ZEROES, 0, NBD_CMD_FLAG.FAST_ZERO, new IpsanError("NOT_SUPPORTED", "not fast"), NBD_ERRNO.ENOTSUP],
      [NBD_CMD.FLUSH, 0, 0, new Error("anything else"), NBD_ERRNO.EIO],
      [NBD_CMD.TRIM, 0, 0, new IpsanError("OUT_OF_RANGE", "beyond"), NBD_ERRNO.EINVAL],
    ];
    for (const [type, offset, flags, error, errno] of cases) {
      const length = type === NBD_CMD.FLUSH ? 0 : 512;
      c.send({ cookieHi: 0, cookieLo: type, flags, type, offset, length, ...(type === NBD_CMD.WRITE ? { payload: Buffer.alloc(512) } : {}) });
      await until("the call at the device", () => device.pending.length === 1);
      const entry = device.settle(undefined, error);
      if (type === NBD_CMD.WRITE_ZEROES) assert.equal(entry.options?.fastOnly, true);
      const reply = await c.reply(type === NBD_CMD.READ ? 512 : 0);
      assert.equal(reply.errno, errno, `command ${type}`);
      if (structured) {
        const chunk = reply.chunks[0];
        assert.ok(chunk?.kind === "chunk" && chunk.payload.subarray(6).toString().length > 0, "a message");
      }
    }
    c.destroy();
  }
});

test("close(): ESHUTDOWN for new requests, the one in flight finishes, the device is closed", async () => {
  const { server, device, target } = await serve();
  const c = await client(target);
  const handshaking = await RawNbdClient.connect(target);
  c.send({ cookieHi: 0, cookieLo: 1, flags: 0, type: NBD_CMD.WRITE, offset: 0, length: 512, payload: Buffer.alloc(512) });
  await until("the write at the device", () => device.pending.length === 1);
  const closed = server.close();
  c.send({ cookieHi: 0, cookieLo: 2, flags: 0, type: NBD_CMD.READ, offset: 0, length: 512 });
  const refused = await c.reply();
  assert.equal(refused.cookieLo, 2);
  assert.equal(refused.errno, NBD_ERRNO.ESHUTDOWN);
  assert.ok(await handshaking.closedWithin(2000), "handshaking client closed");
  device.settle();
  const done = await c.reply();
  assert.equal(done.cookieLo, 1);
  assert.equal(done.errno, 0);
  assert.ok(await c.closedWithin(3000), "transmitting client closed after its request");
  await closed;
  assert.equal(device.closed, 1);
  assert.equal(server.connectionCount, 0);
});

test("a Unix socket listener serves, reports the peer as unix, and its path is removed on close", async () => {
  const { mkdtempSync, existsSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const dir = mkdtempSync(join(tmpdir(), "ipsan-nbd-unix-"));
  const path = join(dir, "nbd.sock");
  const device = new GatedDevice();
  const peers: string[] = [];
  const server = new NbdServer({
    provider: {
      defaultExport: "gated",
      list: () => [],
      open: async (_name, peer) => {
        peers.push(peer.address);
        return device;
      },
    },
    env: {},
  });
  try {
    assert.deepEqual(await server.listen({ path }), { path });
    const c = await RawNbdClient.connect({ path });
    await c.handshake();
    await c.go("");
    c.send({ cookieHi: 0, cookieLo: 5, flags: 0, type: NBD_CMD.READ, offset: 1024, length: 512 });
    await until("the read at the device", () => device.pending.length === 1);
    device.settle();
    assert.deepEqual((await c.reply(512)).data, Buffer.alloc(512, 2));
    assert.deepEqual(peers, ["unix"]);
    c.destroy();
    await server.close();
    assert.equal(existsSync(path), false);
  } finally {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("random byte streams at every phase never hit an internal error, and the server keeps serving", async () => {
  const seed = Number(process.env["IPSAN_FUZZ_SEED"] ?? Date.now() % 1_000_000);
  process.stderr.write(`nbd session fuzz seed ${seed} (IPSAN_FUZZ_SEED to replay)\n`);
  let state = seed;
  const random = (n: number): number => {
    state = (state * 1103515245 + 12345) % 2 ** 31;
    return state % n;
  };
  const { server, device, target } = await serve({ handshakeTimeoutMs: 2000 });
  // Settle every device call at once, successfully or not.
  let failSome = true;
  const settler = setInterval(() => {
    while (device.pending.length > 0) device.settle(undefined, failSome && random(4) === 0 ? new Error("fuzz") : undefined);
  }, 1);
  const logged: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string | Uint8Array, ...rest: never[]) => {
    logged.push(String(chunk));
    return write(chunk, ...rest);
  });
  try {
    const magic = Buffer.from([0x25, 0x60, 0x95, 0x13]);
    for (let i = 0; i < 150; i += 1) {
      const c = await RawNbdClient.connect(target);
      const phase = random(3);
      if (phase >= 1) await c.handshake();
      if (phase === 2) {
        const structured = random(2) === 0;
        await c.go("gated", { structured, meta: structured && random(2) === 0 });
      }
      const pieces: Buffer[] = [];
      for (let j = 0, n = 1 + random(6); j < n; j += 1) {
        const junk = Buffer.alloc(random(80));
        for (let k = 0; k < junk.length; k += 1) junk.writeUInt8(random(256), k);
        // Often start with a valid request magic so the request validator sees random fields.
        pieces.push(random(2) === 0 ? Buffer.concat([magic, junk]) : junk);
      }
      for (const piece of pieces) c.write(piece);
      await sleep(random(3));
      c.destroy();
    }
    await until("every fuzz connection closed", () => server.connectionCount === 0);
    failSome = false;
    const good = await client(target);
    good.send({ cookieHi: 0, cookieLo: 1, flags: 0, type: NBD_CMD.READ, offset: 512, length: 512 });
    assert.equal((await good.reply(512)).errno, 0);
    good.destroy();
  } finally {
    clearInterval(settler);
    process.stderr.write = write;
  }
  assert.deepEqual(logged.filter((line) => /internal error|assertion failed/.test(line)), []);
});

test("at the limit with every connection transmitting, new connections are refused; a vanished client's device closes after its requests", async () => {
  const { server, device, target } = await serve({ connectionsMax: 2 });
  const a = await client(target);
  const b = await client(target);
  const c = await RawNbdClient.connect(target);
  assert.ok(await c.closedWithin(2000), "third connection refused");
  assert.equal(server.connectionCount, 2);
  a.send({ cookieHi: 0, cookieLo: 1, flags: 0, type: NBD_CMD.READ, offset: 0, length: 512 });
  await until("the read at the device", () => device.pending.length === 1);
  a.destroy();
  await sleep(50);
  assert.equal(device.closed, 0, "device stays open while its request runs");
  device.settle();
  await until("device closed", () => device.closed === 1);
  await until("connection gone", () => server.connectionCount === 1);
  b.destroy();
});
