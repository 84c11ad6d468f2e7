// Proves that nothing a station and two units listen on answers without
// authentication (issue 7): every TCP and UDP port the three processes hold
// (found with ss, not from a list the test keeps) is probed as a stranger.
// - An NBD port shows its greeting and then nothing but "TLS required":
//   LIST, INFO, GO and EXPORT_NAME before STARTTLS get NBD_REP_ERR_TLS_REQD
//   (or the connection closes), and STARTTLS is the one option acknowledged.
// - An HTTP port answers 401 to every path and method but the health
//   endpoint and the web console's static files (GET / and /assets/*, issue
//   8), whose answers hold no secret (no long hex run, no key or token).
// - A UDP port answers no datagram: neither garbage nor an unsigned packet.
// Canary: the same probe of a plaintext unit's NBD port must find answers.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createSocket } from "node:dgram";
import { connect } from "node:net";
import { San } from "./harness.ts";
import { run } from "../testing/process.ts";
import { startUnit } from "../testing/unit.ts";
import { RawNbdClient } from "../nbd/testing/raw_client.ts";
import { NBD_OPT, NBD_REP } from "../nbd/protocol.ts";

interface Listening {
  readonly proto: "tcp" | "udp";
  readonly host: string;
  readonly port: number;
  readonly pid: number;
}

/** The sockets `pids` listen on (TCP) or are bound to (UDP), from `ss`. */
async function listeningSockets(pids: readonly number[]): Promise<Listening[]> {
  const out: Listening[] = [];
  for (const proto of ["tcp", "udp"] as const) {
    const result = await run("ss", ["-H", "-n", "-p", proto === "tcp" ? "-lt" : "-lu"]);
    assert.equal(result.code, 0, `ss: ${result.stderr}`);
    for (const line of result.stdout.split("\n")) {
      const pid = /pid=(\d+)/.exec(line)?.[1];
      if (pid === undefined || !pids.includes(Number(pid))) continue;
      const local = line.trim().split(/\s+/)[3] ?? "";
      const match = /^(.*):(\d+)$/.exec(local);
      if (match === null || match[1] === undefined || match[2] === undefined) continue;
      out.push({ proto, host: match[1].replace(/^\[|\]$/g, "").replace(/%.*$/, ""), port: Number(match[2]), pid: Number(pid) });
    }
  }
  return out;
}

/** The first bytes a server sends on connect (within `ms`), or an empty buffer. */
function firstBytes(host: string, port: number, ms: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const socket = connect({ host, port });
    const chunks: Buffer[] = [];
    const done = (): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(Buffer.concat(chunks));
    };
    const timer = setTimeout(done, ms);
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.on("error", done);
    socket.on("close", done);
  });
}

async function httpStatus(host: string, port: number, method: string, path: string): Promise<{ status: number; body: string }> {
  const response = await fetch(`http://${host.includes(":") ? `[${host}]` : host}:${port}${path}`, {
    method,
    ...(method === "GET" || method === "HEAD" ? {} : { body: "{}", headers: { "content-type": "application/json" } }),
    signal: AbortSignal.timeout(5_000),
  });
  return { status: response.status, body: await response.text() };
}

const HTTP_PROBES: readonly [string, string][] = [
  ["POST", "/"],
  ["GET", "/assets/../api/v1/units"],
  ["GET", "/metrics"],
  ["GET", "/api/v1/units"],
  ["GET", "/api/v1/hosts"],
  ["GET", "/api/v1/assignments"],
  ["GET", "/api/v1/events"],
  ["GET", "/api/v1/openapi.json"],
  ["GET", "/api/v1/hosts/h1/keys"],
  ["GET", "/api/v1/tokens"],
  ["GET", "/api/v1/audit"],
  ["POST", "/api/v1/allocations"],
  ["PUT", "/api/v1/hosts/h9"],
  ["POST", "/api/v1/tokens"],
  ["GET", "/v1/info"],
  ["GET", "/v1/volumes"],
  ["POST", "/v1/volumes"],
  ["PUT", "/v1/volumes/x/grants"],
  ["DELETE", "/v1/volumes/x"],
];

/** Health endpoints may answer a stranger, with nothing secret in them. */
const HEALTH_PATHS = new Set(["/api/v1/health", "/healthz", "/v1/health"]);
/** The console's static files (the station's; public, like a health answer: nothing secret in them). */
const PUBLIC_PATHS = new Set([...HEALTH_PATHS, "/", "/index.html", "/assets/index.js", "/assets/.env", "/assets/%2e%2e%2fadmin.token"]);

/** What a stranger gets from an NBD port before TLS: a list of what answered (empty = nothing but TLS required). */
async function nbdStrangerAnswers(host: string, port: number): Promise<string[]> {
  const answers: string[] = [];
  for (const option of [NBD_OPT.LIST, NBD_OPT.INFO, NBD_OPT.GO, NBD_OPT.STRUCTURED_REPLY]) {
    const client = await RawNbdClient.connect({ host, port });
    try {
      await client.handshake();
      const replies = await client.option(option, option === NBD_OPT.GO || option === NBD_OPT.INFO ? goData("") : undefined).catch(() => []);
      for (const reply of replies) if (reply.replyType !== NBD_REP.ERR_TLS_REQD) answers.push(`option ${option}: reply 0x${reply.replyType.toString(16)}`);
    } catch {
      // closed during the handshake: nothing answered
    } finally {
      client.socket.destroy();
    }
  }
  // EXPORT_NAME has no error reply: the server must close without an export.
  const client = await RawNbdClient.connect({ host, port });
  try {
    await client.handshake();
    client.write(optionFrame(NBD_OPT.EXPORT_NAME, Buffer.from("v1")));
    if (!(await client.closedWithin(3_000)) || client.pendingBytes > 0) answers.push("EXPORT_NAME: served an export");
  } catch {
    // closed: fine
  } finally {
    client.socket.destroy();
  }
  return answers;
}

function goData(name: string): Buffer {
  const bytes = Buffer.from(name);
  const data = Buffer.alloc(4 + bytes.length + 2);
  data.writeUInt32BE(bytes.length, 0);
  bytes.copy(data, 4);
  data.writeUInt16BE(0, 4 + bytes.length);
  return data;
}

function optionFrame(option: number, data: Buffer): Buffer {
  const frame = Buffer.alloc(16 + data.length);
  frame.write("IHAVEOPT", 0, "latin1");
  frame.writeUInt32BE(option, 8);
  frame.writeUInt32BE(data.length, 12);
  data.copy(frame, 16);
  return frame;
}

async function udpAnswers(host: string, port: number): Promise<number> {
  const socket = createSocket(host.includes(":") ? "udp6" : "udp4");
  let answers = 0;
  socket.on("message", () => {
    answers += 1;
  });
  await new Promise<void>((resolve) => socket.bind(0, host.includes(":") ? "::1" : "127.0.0.1", resolve));
  const garbage = [Buffer.from("hello"), Buffer.alloc(64, 0xff), Buffer.concat([Buffer.from("IPSAN"), Buffer.alloc(200)])];
  for (const datagram of garbage) socket.send(datagram, port, host);
  await new Promise((resolve) => setTimeout(resolve, 700));
  socket.close();
  return answers;
}

test("a port scan of a station and two units finds nothing that answers without authentication", { timeout: 120_000 }, async () => {
  const san = new San("port-scan");
  try {
    const station = await san.startStation();
    const u1 = await san.startUnit("u1");
    const u2 = await san.startUnit("u2");
    await san.waitUnits(["u1", "u2"]);
    // A live assignment, so the units hold grants (and keys) while they are scanned.
    const client = await san.client();
    await client.registerHost("h1", "127.0.0.1");
    await client.allocate({ requestId: "scan-1", host: "h1", sizeBytes: 16 * 1024 * 1024, copies: 2 });

    const pids = [station.child.pid, u1.child.pid, u2.child.pid].filter((pid): pid is number => pid !== undefined);
    const sockets = await listeningSockets(pids);
    const tcp = sockets.filter((s) => s.proto === "tcp");
    // The station's API, and each unit's NBD and control ports, at least.
    assert.ok(tcp.length >= 5, `listening TCP sockets: ${JSON.stringify(sockets)}`);
    assert.ok(sockets.some((s) => s.proto === "udp"), `the station's discovery port is found: ${JSON.stringify(sockets)}`);

    let nbdPorts = 0;
    let httpPorts = 0;
    const problems: string[] = [];
    for (const socket of tcp) {
      const host = socket.host === "*" || socket.host === "0.0.0.0" ? "127.0.0.1" : socket.host === "::" ? "::1" : socket.host;
      const greeting = await firstBytes(host, socket.port, 500);
      if (greeting.subarray(0, 8).toString("latin1") === "NBDMAGIC") {
        nbdPorts += 1;
        for (const answer of await nbdStrangerAnswers(host, socket.port)) problems.push(`nbd ${host}:${socket.port}: ${answer}`);
        // STARTTLS is what a stranger may do (and then prove a key).
        const client = await RawNbdClient.connect({ host, port: socket.port });
        try {
          await client.handshake();
          const [reply] = await client.option(NBD_OPT.STARTTLS);
          assert.equal(reply?.replyType, NBD_REP.ACK, `STARTTLS is offered on ${host}:${socket.port}`);
        } finally {
          client.socket.destroy();
        }
        continue;
      }
      httpPorts += 1;
      for (const [method, path] of HTTP_PROBES) {
        const { status } = await httpStatus(host, socket.port, method, path);
        if (status !== 401) problems.push(`http ${host}:${socket.port}: ${method} ${path} answered ${status} without a token`);
      }
      for (const path of PUBLIC_PATHS) {
        const { status, body } = await httpStatus(host, socket.port, "GET", path);
        if (status === 401 || status === 404) continue;
        if (/[0-9a-f]{32,}/i.test(body) || /token|secret|"key"/i.test(body)) problems.push(`http ${host}:${socket.port}: ${path} says too much: ${body.slice(0, 200)}`);
      }
    }
    assert.equal(nbdPorts, 2, "both units' NBD ports were found");
    assert.ok(httpPorts >= 3, "the station's API and both control APIs were probed");
    for (const socket of sockets.filter((s) => s.proto === "udp")) {
      const host = socket.host === "*" || socket.host === "0.0.0.0" ? "127.0.0.1" : socket.host;
      const answers = await udpAnswers(host, socket.port);
      if (answers > 0) problems.push(`udp ${host}:${socket.port}: answered ${answers} datagram(s) from a stranger`);
    }
    assert.deepEqual(problems, []);

    // Canary: the same probe finds a unit that serves plaintext (standalone, --tls off, a volume open to loopback).
    const open = await startUnit({ capacity: "64M", volumes: [{ name: "v1", size: "8M" }], allow: ["127.0.0.0/8"] });
    try {
      const answers = await nbdStrangerAnswers(open.host, open.port);
      assert.ok(answers.length > 0, "the scan finds the plaintext unit answering without authentication");
    } finally {
      await open.close();
    }
  } finally {
    await san.close();
  }
});
