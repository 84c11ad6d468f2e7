// What this proves: every hostile or malformed input of issue 2 section 4 sent
// to a real `bin/ipsan unit` process over a real socket gets an error reply
// or a clean disconnect, is logged (with the peer's address and port) by the
// unit, and never stops the unit from serving a second, well-behaved client,
// which is checked after each case (and during the flood and the stalled
// reader). The unit runs with short limits through IPSAN_NBD_LIMITS so the
// timeouts fire in about a second. Inputs are written with the raw client
// (src/nbd/testing/raw_client.ts) because real clients refuse to send them.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { NBD_ERRNO } from "../util/errors.ts";
import { sleep, waitFor } from "../testing/process.ts";
import { type RunningUnit, startUnit } from "../testing/unit.ts";
import { encodeInfoRequestData, encodeOption, encodeRequest } from "./peer_codec.ts";
import { NBD_CMD, NBD_INFO, NBD_OPT, NBD_REP, WIRE } from "./protocol.ts";
import { RawNbdClient } from "./testing/raw_client.ts";

const HANDSHAKE_TIMEOUT_MS = 1500;
const WRITE_STALL_TIMEOUT_MS = 1500;
const CONNECTIONS_MAX = 40;
const OPTIONS_MAX = 256;
const MiB = 1024 * 1024;
const VOLUME_BYTES = 64 * MiB;

let unit: RunningUnit;
let target: { host: string; port: number };
let cookie = 1;

async function connected(): Promise<RawNbdClient> {
  const client = await RawNbdClient.connect(target);
  await client.handshake();
  return client;
}

async function transmitting(options: { structured?: boolean } = {}): Promise<RawNbdClient> {
  const client = await connected();
  await client.go("a", { structured: options.structured ?? true });
  return client;
}

/** A second client, well-behaved: writes a random block and reads it back. */
async function assertServed(client?: RawNbdClient): Promise<void> {
  const own = client === undefined;
  const c = client ?? (await transmitting());
  try {
    const data = randomBytes(4096);
    const offset = 4096 * Math.floor(Math.random() * 1000);
    const write = await c.call({ cookieHi: 0, cookieLo: cookie++, flags: 0, type: NBD_CMD.WRITE, offset, length: data.length, payload: data });
    assert.equal(write.errno, 0, "well-behaved write");
    const read = await c.call({ cookieHi: 0, cookieLo: cookie++, flags: 0, type: NBD_CMD.READ, offset, length: data.length });
    assert.equal(read.errno, 0, "well-behaved read");
    assert.deepEqual(read.data, data);
  } finally {
    if (own) c.destroy();
  }
}

/** The unit logged `pattern` for this client's port within a few seconds. */
async function assertLogged(pattern: RegExp, port: number | undefined): Promise<void> {
  await waitFor(
    `unit log ${pattern} for port ${port}`,
    () =>
      unit
        .stderr()
        .split("\n")
        .some((line) => pattern.test(line) && (port === undefined || line.includes(`:${port} `) || line.endsWith(`:${port}`)))
        ? true
        : undefined,
    { timeoutMs: 5000 },
  );
}

before(async () => {
  unit = await startUnit({
    capacity: "256M",
    volumes: [
      { name: "a", size: VOLUME_BYTES },
      { name: "b", size: "16M" },
    ],
    env: {
      IPSAN_NBD_LIMITS: `handshakeTimeoutMs=${HANDSHAKE_TIMEOUT_MS},writeStallTimeoutMs=${WRITE_STALL_TIMEOUT_MS},connectionsMax=${CONNECTIONS_MAX},optionsMax=${OPTIONS_MAX},replyBytesQueuedMax=${MiB},closeTimeoutMs=2000`,
    },
  });
  target = { host: unit.host, port: unit.port };
});

after(async () => {
  await unit?.close();
});

describe("hostile NBD clients against a real unit", () => {
  test("wrong option magic: disconnect, logged, others served", async () => {
    const client = await connected();
    const bad = encodeOption(NBD_OPT.GO, encodeInfoRequestData("a", []));
    bad.write("NOTOPTIO", 0, "latin1");
    client.write(bad);
    assert.ok(await client.closedWithin(3000), "server closed the connection");
    await assertLogged(/bad option magic/, client.socket.localPort);
    await assertServed();
  });

  test("unknown client flags: disconnect", async () => {
    const client = await RawNbdClient.connect(target);
    await client.handshake(0x80);
    assert.ok(await client.closedWithin(3000));
    await assertLogged(/unknown client flags/, client.socket.localPort);
    await assertServed();
  });

  test("unknown option: NBD_REP_ERR_UNSUP and the handshake goes on", async () => {
    const client = await connected();
    const replies = await client.option(0x4242, Buffer.from("junk"));
    assert.equal(replies.length, 1);
    assert.equal(replies[0]?.replyType, NBD_REP.ERR_UNSUP);
    assert.equal(replies[0]?.option, 0x4242);
    // NBD_OPT_STARTTLS: no TLS here, so unsupported as well.
    assert.equal((await client.option(NBD_OPT.STARTTLS))[0]?.replyType, NBD_REP.ERR_UNSUP);
    await client.go("a", { structured: true });
    await assertServed(client);
    client.destroy();
  });

  test("unknown export: ERR_UNKNOWN on GO, disconnect on EXPORT_NAME", async () => {
    const client = await connected();
    const replies = await client.option(NBD_OPT.GO, encodeInfoRequestData("no-such-volume", [NBD_INFO.BLOCK_SIZE]));
    assert.equal(replies.at(-1)?.replyType, NBD_REP.ERR_UNKNOWN);
    assert.match(replies.at(-1)?.data.toString() ?? "", /no-such-volume/);
    await client.go("a");
    client.destroy();
    const legacy = await connected();
    legacy.write(encodeOption(NBD_OPT.EXPORT_NAME, Buffer.from("no-such-volume")));
    assert.ok(await legacy.closedWithin(3000), "EXPORT_NAME of an unknown export ends the session");
    await assertServed();
  });

  test("malformed option data and oversize options", async () => {
    const client = await connected();
    // GO whose name length points past the end of the data.
    const data = encodeInfoRequestData("a", []);
    data.writeUInt32BE(1000, 0);
    assert.equal((await client.option(NBD_OPT.GO, data)).at(-1)?.replyType, NBD_REP.ERR_INVALID);
    assert.equal((await client.option(NBD_OPT.LIST, Buffer.from("x"))).at(-1)?.replyType, NBD_REP.ERR_INVALID);
    assert.equal((await client.option(NBD_OPT.SET_META_CONTEXT, Buffer.alloc(8))).at(-1)?.replyType, NBD_REP.ERR_INVALID, "before STRUCTURED_REPLY");
    // An option claiming 1 GiB of data: ERR_TOO_BIG from its header alone, then the connection closes.
    const header = encodeOption(NBD_OPT.GO).subarray(0, WIRE.OPTION_HEADER_BYTES);
    header.writeUInt32BE(1 << 30, 12);
    const replies = await (async () => {
      client.write(header);
      return client.next((q) => (q.length >= 20 ? { kind: "frame" as const, frame: q.take(20) } : { kind: "need_more" as const }));
    })();
    assert.equal(replies.readUInt32BE(12), NBD_REP.ERR_TOO_BIG);
    assert.ok(await client.closedWithin(4000));
    await assertLogged(/option too large/, client.socket.localPort);
    await assertServed();
  });

  test("too many options: ERR_TOO_BIG then disconnect", async () => {
    const client = await connected();
    const burst = Buffer.concat(Array.from({ length: OPTIONS_MAX + 44 }, () => encodeOption(0x4243)));
    client.write(burst);
    const seen: number[] = [];
    while (!client.isClosed || client.pendingBytes > 0) {
      try {
        const reply = await client.next((q) => (q.length >= 20 ? { kind: "frame" as const, frame: q.take(20) } : { kind: "need_more" as const }), 3000);
        seen.push(reply.readUInt32BE(12));
        const length = reply.readUInt32BE(16);
        if (length > 0) await client.take(length);
      } catch {
        break;
      }
    }
    assert.equal(seen.filter((t) => t === NBD_REP.ERR_UNSUP).length, OPTIONS_MAX);
    assert.equal(seen.at(-1), NBD_REP.ERR_TOO_BIG);
    assert.ok(await client.closedWithin(3000));
    await assertServed();
  });

  test("unknown command and bad flags: EINVAL, connection stays usable", async () => {
    for (const structured of [true, false]) {
      const client = await transmitting({ structured });
      const unknown = await client.call({ cookieHi: 7, cookieLo: 99, flags: 0, type: 42, offset: 0, length: 512 });
      assert.equal(unknown.errno, NBD_ERRNO.EINVAL);
      assert.equal(unknown.cookieLo, 99, "cookie echoed");
      const badFlag = await client.call({ cookieHi: 0, cookieLo: 100, flags: 1 << 12, type: NBD_CMD.READ, offset: 0, length: 512 });
      assert.equal(badFlag.errno, NBD_ERRNO.EINVAL);
      await assertServed(client);
      client.destroy();
    }
  });

  test("out-of-range and overflowing offset+length: EINVAL/ENOSPC, connection stays usable", async () => {
    const client = await transmitting();
    const past = await client.call({ cookieHi: 0, cookieLo: 1, flags: 0, type: NBD_CMD.READ, offset: VOLUME_BYTES, length: 512 });
    assert.equal(past.errno, NBD_ERRNO.EINVAL);
    const straddle = await client.call({ cookieHi: 0, cookieLo: 2, flags: 0, type: NBD_CMD.READ, offset: VOLUME_BYTES - 512, length: 1024 });
    assert.equal(straddle.errno, NBD_ERRNO.EINVAL);
    const overflow = await client.call({ cookieHi: 0, cookieLo: 3, flags: 0, type: NBD_CMD.READ, offset: 2n ** 64n - 512n, length: 1024 });
    assert.equal(overflow.errno, NBD_ERRNO.EINVAL);
    const write = await client.call({ cookieHi: 0, cookieLo: 4, flags: 0, type: NBD_CMD.WRITE, offset: VOLUME_BYTES, length: 512, payload: Buffer.alloc(512, 1) });
    assert.equal(write.errno, NBD_ERRNO.ENOSPC);
    const trim = await client.call({ cookieHi: 0, cookieLo: 5, flags: 0, type: NBD_CMD.TRIM, offset: 2n ** 63n, length: 512 });
    assert.equal(trim.errno, NBD_ERRNO.EINVAL);
    await assertServed(client);
    client.destroy();
  });

  test("write payload over the limit: EINVAL reply, then disconnect", async () => {
    const client = await transmitting();
    client.send({ cookieHi: 0, cookieLo: 77, flags: 0, type: NBD_CMD.WRITE, offset: 0, length: 64 * MiB });
    client.write(randomBytes(64 * 1024)); // the start of a payload the server will not take
    const reply = await client.reply();
    assert.equal(reply.errno, NBD_ERRNO.EINVAL);
    assert.equal(reply.cookieLo, 77);
    assert.ok(await client.closedWithin(4000));
    await assertLogged(/payload too large/, client.socket.localPort);
    await assertServed();
  });

  test("header cut short: the connection closes cleanly and is logged", async () => {
    const client = await transmitting();
    const port = client.socket.localPort;
    client.socket.end(encodeRequest({ cookieHi: 0, cookieLo: 1, flags: 0, type: NBD_CMD.READ, offset: 0, length: 512 }).subarray(0, 10));
    assert.ok(await client.closedWithin(3000));
    await assertLogged(/in the middle of a message/, port);
    // A write whose payload is cut short, too.
    const writer = await transmitting();
    writer.socket.end(encodeRequest({ cookieHi: 0, cookieLo: 1, flags: 0, type: NBD_CMD.WRITE, offset: 0, length: 8192, payload: Buffer.alloc(8192) }).subarray(0, 5000));
    assert.ok(await writer.closedWithin(3000));
    await assertLogged(/in the middle of a message/, writer.socket.localPort);
    await assertServed();
  });

  test("garbage after the handshake: bad request magic, disconnect, logged", async () => {
    const client = await transmitting();
    client.write(randomBytes(100).fill(0xee, 0, 4));
    assert.ok(await client.closedWithin(3000));
    await assertLogged(/bad request magic/, client.socket.localPort);
    await assertServed();
  });

  test("stalled handshake: dropped after the handshake timeout, others served meanwhile", async () => {
    const silent = await RawNbdClient.connect(target); // never sends its flags
    const halfway = await connected();
    halfway.write(encodeOption(NBD_OPT.GO, encodeInfoRequestData("a", [])).subarray(0, 20)); // option cut short, then silence
    const startMs = Date.now();
    await assertServed();
    assert.ok(await silent.closedWithin(HANDSHAKE_TIMEOUT_MS + 3000), "silent client dropped");
    assert.ok(await halfway.closedWithin(1000), "half-sent option dropped");
    assert.ok(Date.now() - startMs >= HANDSHAKE_TIMEOUT_MS - 300, "not before the timeout");
    await assertLogged(/handshake timed out/, silent.socket.localPort);
    await assertServed();
  });

  test("connection flood: established clients keep working, new ones still get in", async () => {
    const established = await transmitting();
    const flood: RawNbdClient[] = [];
    for (let i = 0; i < CONNECTIONS_MAX * 2; i += 1) flood.push(await RawNbdClient.connect(target));
    await sleep(100);
    // The oldest handshaking connections were dropped to make room; transmission ones never are.
    await assertServed(established);
    await assertServed();
    const dropped = (await Promise.all(flood.map((c) => c.closedWithin(50)))).filter(Boolean).length;
    assert.ok(dropped >= CONNECTIONS_MAX, `at least ${CONNECTIONS_MAX} of the flood dropped (${dropped})`);
    await assertLogged(/connection limit reached/, undefined);
    for (const c of flood) c.destroy();
    await assertServed(established);
    established.destroy();
  });

  test("client that never reads its replies: disconnected after the write-stall timeout, others never stall", async () => {
    const client = await transmitting();
    const socket = client.socket;
    socket.pause(); // never read
    const requests = Array.from({ length: 48 }, (_, i) =>
      encodeRequest({ cookieHi: 0, cookieLo: i, flags: 0, type: NBD_CMD.READ, offset: i * MiB, length: MiB }),
    );
    socket.write(Buffer.concat(requests));
    const startMs = Date.now();
    // Others are served while it stalls.
    for (let i = 0; i < 3; i += 1) {
      await assertServed();
      await sleep(200);
    }
    await assertLogged(/does not read its replies/, socket.localPort);
    assert.ok(Date.now() - startMs >= WRITE_STALL_TIMEOUT_MS - 300);
    socket.resume();
    assert.ok(await client.closedWithin(5000), "connection ended");
    await assertServed();
  });
});
