// The test harness itself: the unit's contract lines parse (IPv4, IPv6,
// names with dots and dashes) and anything else does not; run() captures
// output and exit status, enforces its timeout by killing the child, and
// reports a missing program as an error; extents merge only when adjacent and
// of one type; seeded data is reproducible; a free port can be listened on.

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";
import { mergeExtents } from "./clients.ts";
import { SeededBytes } from "./data.ts";
import { freeTcpPort } from "./daemon.ts";
import { run, systemFirstPath } from "./process.ts";
import { hostPort, parseUnitLine } from "./unit.ts";

test("parseUnitLine reads the ready, control and iscsi lines", () => {
  assert.deepEqual(parseUnitLine("ipsan unit u1 ready nbd://127.0.0.1:40123"), {
    kind: "ready",
    name: "u1",
    host: "127.0.0.1",
    port: 40123,
  });
  assert.deepEqual(parseUnitLine("ipsan unit rack-2.a ready nbd://[::1]:10809\n"), {
    kind: "ready",
    name: "rack-2.a",
    host: "::1",
    port: 10809,
  });
  assert.deepEqual(parseUnitLine("ipsan unit vm ready nbd+unix:///?socket=/tmp/u/nbd.sock"), {
    kind: "ready-unix",
    name: "vm",
    path: "/tmp/u/nbd.sock",
  });
  assert.deepEqual(parseUnitLine("ipsan unit u1 control http://127.0.0.1:8080"), {
    kind: "control",
    name: "u1",
    host: "127.0.0.1",
    port: 8080,
  });
  assert.deepEqual(parseUnitLine("ipsan unit u1 iscsi iscsi://127.0.0.1:3260"), {
    kind: "iscsi",
    name: "u1",
    host: "127.0.0.1",
    port: 3260,
  });
  for (const line of [
    "ipsan unit u1 ready nbd://127.0.0.1:0",
    "ipsan unit u1 ready nbd://127.0.0.1:70000",
    "ipsan unit u1 ready nbd://127.0.0.1",
    "ipsan unit  ready nbd://127.0.0.1:1",
    "INFO unit: ready",
    "",
  ]) {
    assert.equal(parseUnitLine(line).kind, "other", line);
  }
  assert.equal(hostPort("::1", 5), "[::1]:5");
  assert.equal(hostPort("127.0.0.1", 5), "127.0.0.1:5");
});

test("run captures output and status, and kills a command at its timeout", async () => {
  const ok = await run("sh", ["-c", "echo out; echo err >&2; exit 3"]);
  assert.deepEqual([ok.code, ok.stdout, ok.stderr, ok.timedOut], [3, "out\n", "err\n", false]);
  const input = await run("cat", [], { input: "piped" });
  assert.equal(input.stdout, "piped");
  const slow = await run("sleep", ["30"], { timeoutMs: 200 });
  assert.equal(slow.timedOut, true);
  assert.equal(slow.signal, "SIGTERM");
  assert.ok(slow.durationMs < 5_000);
  await assert.rejects(run("ipsan-no-such-program", []), /cannot run ipsan-no-such-program/);
  assert.match(systemFirstPath("/opt/x"), /^\/usr\/local\/sbin:.*:\/bin:\/opt\/x$/);
});

test("mergeExtents joins only adjacent extents of the same type", () => {
  assert.deepEqual(
    mergeExtents([
      { offset: 0, length: 10, type: 3 },
      { offset: 10, length: 5, type: 3 },
      { offset: 15, length: 5, type: 0 },
      { offset: 20, length: 5, type: 0 },
      { offset: 25, length: 5, type: 2 },
    ]),
    [
      { offset: 0, length: 15, type: 3 },
      { offset: 15, length: 10, type: 0 },
      { offset: 25, length: 5, type: 2 },
    ],
  );
});

test("seeded bytes repeat for a seed and differ between seeds", () => {
  const a = new SeededBytes("s1").next(1000);
  assert.ok(a.equals(new SeededBytes("s1").next(1000)));
  assert.ok(!a.equals(new SeededBytes("s2").next(1000)));
  const split = new SeededBytes("s1");
  assert.ok(Buffer.concat([split.next(333), split.next(667)]).equals(a), "chunking does not change the stream");
});

test("freeTcpPort returns a port we can listen on", async () => {
  const port = await freeTcpPort();
  const server = createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", resolve);
  });
  await new Promise<void>((resolve) => server.close(() => resolve()));
});
