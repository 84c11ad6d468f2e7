// The test-controlled TCP proxy (src/testing/tcp_proxy.ts) in front of a TCP
// echo server on loopback: pass forwards both ways, blackhole keeps
// connections open and silent (nothing reaches the target, not even a close),
// pass() afterwards resets those connections and serves new ones, cut()
// resets everything and refuses, close() is for good.

import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer, connect, type Server, type Socket } from "node:net";
import { after, before, test } from "node:test";
import { sleep, waitFor } from "./process.ts";
import { startTcpProxy } from "./tcp_proxy.ts";

const QUIET_MS = 300;
const WAIT_MS = 5_000;

let echo: Server;
let echoPort = 0;
let echoReceived = 0;
let echoClosed = 0;
const echoSockets = new Set<Socket>();

before(async () => {
  echo = createServer((socket) => {
    echoSockets.add(socket);
    socket.on("data", (chunk: Buffer) => {
      echoReceived += chunk.length;
      socket.write(chunk);
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      echoClosed++;
      echoSockets.delete(socket);
    });
  });
  echo.listen(0, "127.0.0.1");
  await once(echo, "listening");
  const address = echo.address();
  assert.ok(address !== null && typeof address === "object");
  echoPort = address.port;
});
after(async () => {
  for (const socket of echoSockets) socket.destroy();
  await new Promise<void>((resolve) => echo.close(() => resolve()));
});

interface Conn {
  socket: Socket;
  received(): string;
  closed(): boolean;
  error(): string | undefined;
}

async function dial(port: number): Promise<Conn> {
  const socket = connect({ host: "127.0.0.1", port });
  let text = "";
  let closed = false;
  let errorCode: string | undefined;
  socket.on("data", (chunk: Buffer) => (text += chunk.toString("utf8")));
  socket.on("error", (error: NodeJS.ErrnoException) => (errorCode = error.code ?? error.message));
  socket.on("close", () => (closed = true));
  // Not events.once: it rejects on "error", and a refused connection is an answer here.
  await new Promise<void>((resolve) => {
    socket.once("connect", () => resolve());
    socket.once("close", () => resolve());
  });
  return { socket, received: () => text, closed: () => closed, error: () => errorCode };
}

async function echoes(port: number, message: string): Promise<Conn> {
  const conn = await dial(port);
  assert.equal(conn.error(), undefined, "connects");
  conn.socket.write(message);
  await waitFor(`echo of ${message}`, () => (conn.received() === message ? true : undefined), { timeoutMs: WAIT_MS });
  return conn;
}

test("pass forwards and counts; blackhole drops every byte and every close, both ways; pass resets what lived through it", async () => {
  const proxy = await startTcpProxy({ targetPort: echoPort });
  try {
    assert.equal(proxy.address, `127.0.0.1:${proxy.port}`);
    assert.equal(proxy.url(), `http://127.0.0.1:${proxy.port}`);
    const before = await echoes(proxy.port, "hello");
    assert.equal(proxy.bytesToTarget(), 5);
    assert.equal(proxy.bytesToClient(), 5);
    assert.equal(proxy.mode(), "pass");

    proxy.blackhole();
    assert.equal(proxy.mode(), "blackhole");
    const receivedBefore = echoReceived;
    const closedBefore = echoClosed;
    before.socket.write("lost");
    const during = await dial(proxy.port); // a new connection is accepted...
    assert.equal(during.error(), undefined);
    during.socket.write("also lost");
    await sleep(QUIET_MS);
    assert.equal(before.received(), "hello", "no answer through the blackhole");
    assert.equal(during.received(), "", "...and answers nothing");
    assert.equal(echoReceived, receivedBefore, "nothing reaches the target");
    assert.equal(before.closed() || during.closed(), false, "connections stay open (no RST, no FIN)");
    assert.equal(proxy.droppedBytes(), "lost".length + "also lost".length);
    // A client giving up in the partition: its FIN does not reach the target either.
    during.socket.end();
    await sleep(QUIET_MS);
    assert.equal(echoClosed, closedBefore, "the target sees no close");
    assert.equal(proxy.connections(), 2);

    await proxy.pass();
    await waitFor("the blackholed connection reset", () => (before.closed() ? true : undefined), { timeoutMs: WAIT_MS });
    assert.equal(before.error(), "ECONNRESET");
    await waitFor("the proxy forgets both connections", () => (proxy.connections() === 0 ? true : undefined), { timeoutMs: WAIT_MS });
    const afterPass = await echoes(proxy.port, "again");
    afterPass.socket.destroy();
  } finally {
    await proxy.close();
  }
});

test("cut resets every connection and refuses new ones; pass listens again on the same port; close is final", async () => {
  const proxy = await startTcpProxy({ targetPort: echoPort });
  const conn = await echoes(proxy.port, "one");
  await proxy.cut();
  assert.equal(proxy.mode(), "cut");
  await waitFor("the cut connection closed", () => (conn.closed() ? true : undefined), { timeoutMs: WAIT_MS });
  assert.equal(conn.error(), "ECONNRESET");
  const refused = await dial(proxy.port);
  assert.equal(refused.error(), "ECONNREFUSED");
  assert.throws(() => proxy.blackhole(), /is cut: pass\(\) first/);

  await proxy.pass();
  const back = await echoes(proxy.port, "two");
  back.socket.destroy();

  await proxy.close();
  assert.equal((await dial(proxy.port)).error(), "ECONNREFUSED");
  await assert.rejects(proxy.pass(), /is closed/);
});

test("a clean close passes through as a clean close, and a dead target closes the client", async () => {
  const proxy = await startTcpProxy({ targetPort: echoPort });
  try {
    const closedBefore = echoClosed;
    const conn = await echoes(proxy.port, "bye");
    conn.socket.end();
    await waitFor("the target sees the close", () => (echoClosed > closedBefore ? true : undefined), { timeoutMs: WAIT_MS });
    await waitFor("the client closed", () => (conn.closed() ? true : undefined), { timeoutMs: WAIT_MS });
    assert.equal(conn.error(), undefined, "no reset on a clean close");
  } finally {
    await proxy.close();
  }
  // A target that refuses: the client's connection is closed at once.
  const spare = createServer();
  spare.listen(0, "127.0.0.1");
  await once(spare, "listening");
  const address = spare.address();
  assert.ok(address !== null && typeof address === "object");
  await new Promise<void>((resolve) => spare.close(() => resolve()));
  const toNowhere = await startTcpProxy({ targetPort: address.port });
  try {
    const conn = await dial(toNowhere.port);
    await waitFor("the client closed", () => (conn.closed() ? true : undefined), { timeoutMs: WAIT_MS });
  } finally {
    await toNowhere.close();
  }
  await assert.rejects(startTcpProxy({ targetPort: 0 }), /target port 0 is not a TCP port/);
});
