// READ replies by sendfile (ipsan_io sendFileNow, Storage.sendNow, the NBD
// session's plaintext path; docs/adr/0018-read-replies-by-sendfile.md).
//
// Native level, over a real loopback TCP connection: the header then the
// file bytes arrive in order and intact; a range not in the page cache (a
// hole never read) sends nothing and says EAGAIN; a peer that does not read
// makes it stop short (the socket buffer is full) and report exactly how
// much went out, so the caller can send the rest; bad arguments are refused.
//
// Unit level, a real `ipsan unit` and real clients: nbdcopy reads the whole
// volume with 64 requests of 256 KiB or 1 MiB in flight (most replies by
// sendfile, many cut short by the socket buffer and finished by a copy,
// between replies that took the copy path) and the bytes match the data
// written; the same over NBD with TLS (which never uses sendfile); and small
// reads in between keep working (nbdsh reads at odd offsets). Canaries: the
// same read-back against a unit built with the rest read from the wrong
// place, and with sendfile allowed while other replies wait in the stream,
// must fail.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from "node:fs";
import * as net from "node:net";
import { describeResult, run, runOk } from "../testing/process.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { startUnit } from "../testing/unit.ts";
import { ipsanIo } from "./native.ts";

const io = ipsanIo();
// On disk (the OS temp dir), as a unit's storage would be: the page cache and sendfile of a real filesystem.
const dir = makeTempDir("sendfile");
const fds: number[] = [];
after(() => {
  for (const fd of fds) closeSync(fd);
  dir.remove();
});

const MiB = 1024 * 1024;
const TIMEOUT_MS = 60_000;

/** A connected loopback pair: the server side's fd (for the addon) and the client socket. */
async function tcpPair(): Promise<{ serverSide: net.Socket; fd: number; client: net.Socket; close(): void }> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address() as net.AddressInfo;
  const accepted = new Promise<net.Socket>((resolve) => server.once("connection", resolve));
  const client = net.connect(address.port, "127.0.0.1");
  const serverSide = await accepted;
  server.close();
  const fd = (serverSide as unknown as { _handle: { fd: number } })._handle.fd;
  assert.ok(Number.isInteger(fd) && fd >= 0, `server socket fd ${fd}`);
  return {
    serverSide,
    fd,
    client,
    close: () => {
      client.destroy();
      serverSide.destroy();
    },
  };
}

/** Reads exactly `bytes` from a socket (bounded by TIMEOUT_MS). */
function receive(socket: net.Socket, bytes: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let got = 0;
    const timer = setTimeout(() => reject(new Error(`received ${got} of ${bytes} bytes in ${TIMEOUT_MS} ms`)), TIMEOUT_MS);
    const onData = (chunk: Buffer): void => {
      chunks.push(chunk);
      got += chunk.length;
      if (got >= bytes) {
        clearTimeout(timer);
        socket.off("data", onData);
        resolve(Buffer.concat(chunks).subarray(0, bytes));
      }
    };
    socket.on("data", onData);
    socket.resume();
  });
}

function dataFile(name: string, bytes: number): { path: string; fd: number; data: Buffer } {
  const path = dir.file(name);
  const data = randomBytes(bytes);
  writeFileSync(path, data);
  const fd = openSync(path, "r");
  fds.push(fd);
  readFileSync(path); // in the page cache now
  return { path, fd, data };
}

test("sendFileNow: header then the cached bytes, in order", async () => {
  const { fd: fileFd, data } = dataFile("cached.img", 2 * MiB);
  const pair = await tcpPair();
  try {
    const header = Buffer.from("0123456789abcdef");
    const offset = 12_345;
    const length = 300_000;
    const reading = receive(pair.client, header.length + length);
    const sent = io.sendFileNow(pair.fd, header, fileFd, offset, length);
    // A fresh loopback socket takes 300 KB at once; if it ever did not, the count still says what went out.
    assert.ok(sent > 0 && sent <= header.length + length, `sent ${sent}`);
    if (sent < header.length + length) pair.serverSide.write(Buffer.concat([header, data.subarray(offset, offset + length)]).subarray(sent));
    const got = await reading;
    assert.deepEqual(got.subarray(0, header.length), header);
    assert.ok(got.subarray(header.length).equals(data.subarray(offset, offset + length)), "file bytes differ");
  } finally {
    pair.close();
  }
});

test("sendFileNow: a range not in the page cache sends nothing (EAGAIN)", async () => {
  const path = dir.file("hole.img");
  const fd = openSync(path, "w+");
  fds.push(fd);
  ftruncateSync(fd, 64 * MiB);
  writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 0);
  const pair = await tcpPair();
  try {
    // The middle of a never-touched sparse file has no page in the cache.
    assert.equal(io.sendFileNow(pair.fd, Buffer.from("header"), fd, 32 * MiB, MiB), -io.EAGAIN);
    // Nothing reached the peer: the next bytes it sees are the ones written now.
    const reading = receive(pair.client, 5);
    pair.serverSide.write("after");
    assert.equal((await reading).toString(), "after");
  } finally {
    pair.close();
  }
});

test("sendFileNow: a peer that does not read stops it short, and the count is exact", async () => {
  const { fd: fileFd, data } = dataFile("big.img", 4 * MiB);
  const pair = await tcpPair();
  try {
    pair.client.pause();
    const header = Buffer.from("HDR!");
    const expected: Buffer[] = [];
    let short = false;
    // The socket buffers fill within a few MiB; 64 rounds bound the loop.
    for (let round = 0; round < 64 && !short; round++) {
      const offset = (round % 3) * MiB;
      const sent = io.sendFileNow(pair.fd, header, fileFd, offset, MiB);
      assert.ok(sent >= 0, `sendFileNow: ${sent}`);
      const whole = Buffer.concat([header, data.subarray(offset, offset + MiB)]);
      expected.push(whole.subarray(0, sent));
      short = sent < whole.length;
    }
    assert.ok(short, "64 MiB went into a socket whose peer reads nothing");
    const total = expected.reduce((sum, b) => sum + b.length, 0);
    const got = await receive(pair.client, total);
    assert.ok(got.equals(Buffer.concat(expected)), "the bytes received are not exactly the bytes reported sent");
  } finally {
    pair.close();
  }
});

test("sendFileNow refuses bad arguments before any system call", async () => {
  const { fd: fileFd } = dataFile("args.img", 8192);
  const pair = await tcpPair();
  try {
    const call = (...args: unknown[]): number => (io.sendFileNow as (...a: unknown[]) => number)(...args);
    assert.throws(() => call(-1, Buffer.alloc(1), fileFd, 0, 1), { name: "RangeError", message: /sendFileNow: fd/ });
    assert.throws(() => call(pair.fd, "header", fileFd, 0, 1), { name: "TypeError", message: /sendFileNow: header must be a Buffer/ });
    assert.throws(() => call(pair.fd, Buffer.alloc(1), 2 ** 32 + fileFd, 0, 1), { name: "RangeError", message: /sendFileNow: fileFd/ });
    assert.throws(() => call(pair.fd, Buffer.alloc(1), fileFd, -1, 1), { name: "RangeError", message: /sendFileNow: position/ });
    assert.throws(() => call(pair.fd, Buffer.alloc(1), fileFd, 0, 0), { name: "RangeError", message: /sendFileNow: length/ });
    assert.throws(() => call(pair.fd, Buffer.alloc(1), fileFd, Number.MAX_SAFE_INTEGER, 1), { name: "RangeError", message: /position \+ length/ });
    // Nothing was sent by any of them.
    const reading = receive(pair.client, 2);
    pair.serverSide.write("ok");
    assert.equal((await reading).toString(), "ok");
  } finally {
    pair.close();
  }
});

function sha256(data: Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

/** What a real unit (of `ipsanBin`, default this checkout) sent back for each way of reading the whole volume: "ok" or what went wrong. */
async function readBackThroughUnit(name: string, ipsanBin?: string): Promise<Record<string, string>> {
  const sizeBytes = 64 * MiB;
  const source = dir.file(`${name}-source.raw`);
  const data = randomBytes(sizeBytes);
  writeFileSync(source, data);
  const pskFile = dir.file(`${name}.psk`);
  writeFileSync(pskFile, `sendfile:${randomBytes(32).toString("hex")}\n`, { mode: 0o600 });
  const unitDir = dir.file(`${name}-unit`);
  mkdirSync(unitDir);
  const unit = await startUnit({
    dataDir: unitDir,
    capacity: sizeBytes + 64 * MiB,
    volumes: [{ name: "v", size: sizeBytes }],
    extraArgs: ["--tls", "on", "--tls-psk", pskFile, "--allow", "127.0.0.0/8", "--allow", "id:sendfile"],
    ...(ipsanBin === undefined ? {} : { ipsanBin }),
  });
  const outcome: Record<string, string> = {};
  const want = sha256(data);
  const copyAndCompare = async (label: string, args: string[]): Promise<void> => {
    const copy = dir.file(`${name}-${label}.raw`);
    const result = await run("nbdcopy", [...args, copy], { timeoutMs: TIMEOUT_MS });
    if (result.code !== 0) outcome[label] = `nbdcopy failed: ${describeResult(result)}`;
    else outcome[label] = sha256(readFileSync(copy)) === want ? "ok" : "bytes differ";
  };
  try {
    const plain = unit.uri("v");
    await runOk("nbdcopy", ["--flush", source, plain], { timeoutMs: TIMEOUT_MS });
    // 64 requests in flight: most replies by sendfile, many cut short by the socket buffer and finished by a copy.
    await copyAndCompare("plain-256k", ["--request-size=262144", "--requests=64", plain]);
    await copyAndCompare("plain-1m", [`--request-size=${MiB}`, "--requests=64", plain]);
    await copyAndCompare("tls-1m", [`--request-size=${MiB}`, `nbds://sendfile@127.0.0.1:${unit.port}/v?tls-psk-file=${pskFile}`]);
    // Small and large reads mixed on one connection, at offsets that are not multiples of the large size.
    const script = [
      `h.connect_uri(${JSON.stringify(plain)})`,
      `data = open(${JSON.stringify(source)}, 'rb').read()`,
      "bad = [(off, n) for off, n in [(4096, 4096), (5 * 1048576 + 512, 1048576), (8192, 65536), (9 * 1048576 - 512, 200 * 1024), (0, 512)] if h.pread(n, off) != data[off:off + n]]",
      "print('ok' if not bad else 'differ %r' % bad)",
    ].join("\n");
    const mixed = await run("nbdsh", ["-c", script], { timeoutMs: TIMEOUT_MS });
    outcome["mixed"] = mixed.code === 0 ? mixed.stdout.trim() : `nbdsh failed: ${describeResult(mixed)}`;
  } finally {
    await unit.stop();
  }
  return outcome;
}

const ALL_OK = { "plain-256k": "ok", "plain-1m": "ok", "tls-1m": "ok", mixed: "ok" };

test("a real unit: nbdcopy reads back every byte, plain (sendfile) and over TLS (no sendfile)", { timeout: 180_000 }, async () => {
  assert.deepEqual(await readBackThroughUnit("good"), ALL_OK);
});

// Canaries: the test above must notice a unit that gets the rest of a cut-short reply wrong, or that sends
// by sendfile while other replies still wait in the stream (their bytes would interleave).
test("canary: a unit that reads the rest of a cut-short reply from the wrong place fails the read-back", { timeout: 180_000 }, async () => {
  const build = patchedBuild("sendfile-canary-rest", [
    { file: "dist/nbd/send_file.js", from: "device.readSync(rest, offsetBytes + dataSent);", to: "device.readSync(rest, offsetBytes + dataSent + 512);" },
  ]);
  try {
    const outcome = await readBackThroughUnit("rest", build.ipsanBin);
    assert.notEqual(outcome["plain-256k"], "ok", JSON.stringify(outcome));
    assert.equal(outcome["tls-1m"], "ok", "TLS never sends by sendfile");
  } finally {
    build.remove();
  }
});

test("canary: a unit that sends by sendfile past replies still queued fails the read-back", { timeout: 180_000 }, async () => {
  const build = patchedBuild("sendfile-canary-order", [
    { file: "dist/nbd/send_file.js", from: "socket.writable && socket.writableLength === 0;", to: "socket.writable;" },
  ]);
  try {
    const outcome = await readBackThroughUnit("order", build.ipsanBin);
    assert.ok(outcome["plain-256k"] !== "ok" || outcome["plain-1m"] !== "ok", JSON.stringify(outcome));
    assert.equal(outcome["tls-1m"], "ok", "TLS never sends by sendfile");
  } finally {
    build.remove();
  }
});

// Shutdown with large READs in flight, some waiting for the stream to empty: the unit answers or
// refuses them and exits promptly, well inside the close timeout (DEFAULT_NBD_LIMITS.closeTimeoutMs,
// 5 s). A sanity check, not a canary: nbdcopy drops the connection on its first ESHUTDOWN, which
// ends the session whatever the unit does with its waiting READs.
test("a unit stopped while 64 large READs are in flight exits promptly", { timeout: 120_000 }, async () => {
  const sizeBytes = 64 * MiB;
  const unitDir = dir.file("stop-unit");
  mkdirSync(unitDir);
  const source = dir.file("stop-source.raw");
  writeFileSync(source, randomBytes(sizeBytes));
  const unit = await startUnit({ dataDir: unitDir, capacity: sizeBytes + 64 * MiB, volumes: [{ name: "v", size: sizeBytes }] });
  try {
    await runOk("nbdcopy", ["--flush", source, unit.uri("v")], { timeoutMs: TIMEOUT_MS });
    // A reader that keeps 64 x 1 MiB in flight for as long as the unit serves (the volume, again and again).
    const reader = run("sh", ["-c", `while nbdcopy --request-size=${MiB} --requests=64 --connections=1 '${unit.uri("v")}' null:; do :; done`], {
      timeoutMs: TIMEOUT_MS,
    });
    await new Promise((resolve) => setTimeout(resolve, 500));
    const startMs = Date.now();
    const exit = await unit.stop();
    const tookMs = Date.now() - startMs;
    assert.equal(exit.forced, false, "the unit had to be killed");
    assert.ok(tookMs < 4000, `the unit took ${tookMs} ms to stop`);
    await reader;
  } finally {
    if (unit.running()) await unit.stop();
  }
});
