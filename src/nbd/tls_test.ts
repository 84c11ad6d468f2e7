// NBD_OPT_STARTTLS in the server itself (in-process, a file export on
// 127.0.0.1:0), with ipsan's own client: a TLS-PSK round trip; plaintext to a
// TLS-required server gets NBD_REP_ERR_TLS_REQD; a TLS-on server still
// serves plaintext; STARTTLS with data, or on a TLS-off server, is answered
// and the connection goes on; failed TLS handshakes (wrong key, unknown
// identity, garbage, a client that vanishes mid-handshake) leave no session
// behind; close() during a stalled TLS handshake is prompt.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import * as net from "node:net";
import { after, before, test } from "node:test";
import { waitFor } from "../testing/process.ts";
import { makeTempDir, memoryTmpBase, type TempDir } from "../testing/tmp.ts";
import { setLogLevel } from "../util/log.ts";
import { seededRandom } from "../util/random.ts";
import { NbdClient } from "./client.ts";
import { encodeOption } from "./peer_codec.ts";
import { NBD_OPT, NBD_REP } from "./protocol.ts";
import { NbdServer } from "./server.ts";
import { FileExportProvider } from "./testing/file_provider.ts";
import type { TlsMode } from "./tls.ts";

setLogLevel("error");
const SIZE = 1024 * 1024;
const KEY = randomBytes(32);

let tmp: TempDir;
before(() => {
  tmp = makeTempDir("nbd-tls", memoryTmpBase());
  writeFileSync(tmp.file("disk.img"), Buffer.alloc(SIZE));
});
after(() => tmp.remove());

async function serve(mode: TlsMode, limits: Record<string, number> = {}): Promise<{ server: NbdServer; port: number }> {
  const provider = new FileExportProvider([{ name: "disk", path: tmp.file("disk.img"), sizeBytes: SIZE }]);
  const server = new NbdServer({
    provider,
    env: {},
    limits,
    ...(mode === "off" ? {} : { tls: { mode, keyFor: (identity: string) => (identity === "h1" ? KEY : undefined) } }),
  });
  const bound = await server.listen({ host: "127.0.0.1", port: 0 });
  assert.ok("port" in bound);
  return { server, port: bound.port };
}


/** Sends the client flags and the options; resolves with the reply types, in order, once `count` replies are in. */
async function rawReplies(port: number, options: readonly Buffer[], count: number): Promise<{ types: number[]; socket: net.Socket }> {
  const socket = net.connect({ host: "127.0.0.1", port });
  socket.on("error", () => undefined);
  let received = Buffer.alloc(0);
  socket.on("data", (chunk: Buffer) => (received = Buffer.concat([received, chunk])));
  await waitFor("greeting", () => (received.length >= 18 ? true : undefined), { timeoutMs: 5_000, intervalMs: 5 });
  socket.write(Buffer.from([0, 0, 0, 1]));
  const types: number[] = [];
  let at = 18;
  for (const o of options) {
    socket.write(o);
    await waitFor("option reply", () => (received.length >= at + 20 && received.length >= at + 20 + received.readUInt32BE(at + 16) ? true : undefined), { timeoutMs: 5_000, intervalMs: 5 });
    types.push(received.readUInt32BE(at + 12));
    at += 20 + received.readUInt32BE(at + 16);
    if (types.length >= count) break;
  }
  return { types, socket };
}

test("TLS-PSK round trip with NbdClient; plaintext to a TLS-required server gets NBD_REP_ERR_TLS_REQD", async () => {
  const { server, port } = await serve("require");
  try {
    const client = await NbdClient.connect({ host: "127.0.0.1", port, exportName: "disk" }, { tls: { identity: "h1", key: KEY } });
    const data = randomBytes(65536);
    await client.write(4096, data, true);
    assert.ok((await client.read(4096, 65536)).equals(data));
    await client.close();
    await assert.rejects(NbdClient.connect({ host: "127.0.0.1", port, exportName: "disk" }), /0x80000005/);
    const { types, socket } = await rawReplies(port, [encodeOption(NBD_OPT.LIST), encodeOption(NBD_OPT.STARTTLS, Buffer.from("x"))], 2);
    assert.deepEqual(types, [NBD_REP.ERR_TLS_REQD, NBD_REP.ERR_INVALID]);
    socket.destroy();
  } finally {
    await server.close();
  }
});

test("--tls on serves plaintext and TLS; --tls off answers STARTTLS with ERR_UNSUP and goes on", async () => {
  const on = await serve("on");
  try {
    const plain = await NbdClient.connect({ host: "127.0.0.1", port: on.port, exportName: "disk" });
    await plain.write(0, Buffer.alloc(4096, 7), false);
    await plain.close();
    const secure = await NbdClient.connect({ host: "127.0.0.1", port: on.port, exportName: "disk" }, { tls: { identity: "h1", key: KEY } });
    assert.ok((await secure.read(0, 4096)).equals(Buffer.alloc(4096, 7)));
    await secure.close();
  } finally {
    await on.server.close();
  }
  const off = await serve("off");
  try {
    await assert.rejects(NbdClient.connect({ host: "127.0.0.1", port: off.port, exportName: "disk" }, { tls: { identity: "h1", key: KEY } }), /STARTTLS \(0x80000001\)/);
    const { types, socket } = await rawReplies(off.port, [encodeOption(NBD_OPT.STARTTLS), encodeOption(NBD_OPT.LIST)], 2);
    assert.deepEqual(types, [NBD_REP.ERR_UNSUP, NBD_REP.SERVER]);
    socket.destroy();
  } finally {
    await off.server.close();
  }
});

test("failed TLS handshakes leave no session behind; close() during a stalled TLS handshake is prompt", async () => {
  const { server, port } = await serve("require", { handshakeTimeoutMs: 60_000 });
  try {
    // Garbage in place of a ClientHello: seeded (IPSAN_TLS_FUZZ_SEED), sizes 1..4096, first byte any value.
    const seed = Number(process.env["IPSAN_TLS_FUZZ_SEED"] ?? Date.now() % 1_000_000);
    const random = seededRandom(seed);
    const garbage = (): Buffer => Buffer.from(Array.from({ length: 1 + Math.floor(random() * 4096) }, () => Math.floor(random() * 256)));
    console.log(`tls fuzz seed ${seed} (IPSAN_TLS_FUZZ_SEED)`);
    for (let i = 0; i < 10; i++) {
      await assert.rejects(NbdClient.connect({ host: "127.0.0.1", port, exportName: "disk" }, { tls: { identity: "h1", key: randomBytes(32) } }));
      await assert.rejects(NbdClient.connect({ host: "127.0.0.1", port, exportName: "disk" }, { tls: { identity: "nobody", key: KEY } }));
      const { socket } = await rawReplies(port, [encodeOption(NBD_OPT.STARTTLS)], 1);
      socket.end(garbage());
      const vanish = await rawReplies(port, [encodeOption(NBD_OPT.STARTTLS)], 1);
      vanish.socket.destroy();
    }
    await waitFor("every failed session ended", () => (server.connectionCount === 0 ? true : undefined), { timeoutMs: 10_000, intervalMs: 20 });
    const stalled = await rawReplies(port, [encodeOption(NBD_OPT.STARTTLS)], 1);
    await waitFor("the stalled session", () => (server.connectionCount === 1 ? true : undefined), { timeoutMs: 5_000, intervalMs: 5 });
    const started = Date.now();
    await server.close();
    assert.ok(Date.now() - started < 2_000, `close took ${Date.now() - started} ms`);
    stalled.socket.destroy();
  } finally {
    await server.close();
  }
});
