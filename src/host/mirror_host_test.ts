// Proves the host side's handling of mirrored assignments without a SAN
// (host_mirror_test in src/e2e does it with one): `--copies` accepts 1, 2 or
// 3 only and says so (exit 2); `--mode nbd` on a single copy records the
// unit's own URI with pid null and starts nothing (detach just forgets it);
// `--mode kernel` on a mirror is refused before anything starts; an engine
// that cannot start (no leg reachable) fails the attach with the engine's own
// words, leaves no record and no process; state records with an engine are
// decoded, and a damaged engine part is refused, never half-trusted.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { run } from "../testing/process.ts";
import { IPSAN_BIN } from "../testing/unit.ts";
import { attach, attachmentAlive, detach, reattach } from "./attach.ts";
import { HostState, decodeRecord } from "./state.ts";
import type { StationAssignment } from "./station_client.ts";

const MIB = 1024 * 1024;

function single(id: string): StationAssignment {
  return { id, host: "h1", unit: "u1", volume: "v1", export: "v1", nbdHost: "127.0.0.1", nbdPort: 10809, sizeBytes: 8 * MIB, uri: "nbd://127.0.0.1:10809/v1", copies: 1, legs: [] };
}

function mirrored(id: string): StationAssignment {
  // Port 1 on loopback: nothing listens there, so every leg is refused at once.
  const legs = [0, 1].map((i) => ({ unit: `u${i}`, volume: `h-${id.slice(2)}-l${i}`, sizeBytes: 9 * MIB, uri: `nbd://127.0.0.1:1/h-${id.slice(2)}-l${i}`, state: "in-sync" }));
  return { id, host: "h1", unit: "u0", volume: legs[0]?.volume ?? "", export: legs[0]?.volume ?? "", nbdHost: "127.0.0.1", nbdPort: 1, sizeBytes: 8 * MIB, uri: null, copies: 2, legs };
}

test("--copies takes 1, 2 or 3 and names itself otherwise; --mode lists nbd", async () => {
  for (const copies of ["0", "4", "two", "1.5", ""]) {
    const result = await run(process.execPath, [IPSAN_BIN, "host", "request", "--station", "http://127.0.0.1:1", "--token-file", "/nonexistent", "--host", "h1", "--size", "1M", "--copies", copies]);
    assert.equal(result.code, 2, `--copies ${copies}: ${result.stderr}`);
    assert.match(result.stderr, /--copies/);
  }
  const mode = await run(process.execPath, [IPSAN_BIN, "host", "attach", "--station", "http://127.0.0.1:1", "--token-file", "/nonexistent", "--host", "h1", "--assignment", "a-1", "--mode", "loop"]);
  assert.equal(mode.code, 2);
  assert.match(mode.stderr, /expected auto, fuse, kernel or nbd/);
});

test("--mode nbd on a single copy records the unit's URI, pid null, and starts nothing", async () => {
  const dir = mkdtempSync(join(tmpdir(), "ipsan-nbdmode-"));
  try {
    const state = new HostState(dir);
    const record = await attach(state, { assignment: single("a-single"), station: "http://127.0.0.1:1/", host: "h1", mode: "nbd" });
    assert.deepEqual([record.mode, record.path, record.uri, record.pid, record.engine], ["nbd", "nbd://127.0.0.1:10809/v1", "nbd://127.0.0.1:10809/v1", null, null]);
    assert.equal(await attachmentAlive(record), true, "nothing runs here, so nothing can die");
    assert.deepEqual(await reattach(state, record), record);
    assert.deepEqual((await state.list()).map((r) => r.assignmentId), ["a-single"]);
    await detach(state, record);
    assert.deepEqual(await state.list(), []);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("a mirror: --mode kernel is refused before anything starts; an engine that cannot start fails the attach and leaves nothing", { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), "ipsan-mirror-attach-"));
  try {
    const state = new HostState(dir);
    await assert.rejects(
      attach(state, { assignment: mirrored("a-0000000000k1"), station: "http://127.0.0.1:1/", host: "h1", mode: "kernel" }),
      (error: Error) => error.name === "UsageError" && /--mode kernel.*mirrored.*--mode nbd/.test(error.message),
    );
    assert.deepEqual(await state.list(), []);
    for (const mode of ["nbd", "fuse"] as const) {
      await assert.rejects(
        attach(state, { assignment: mirrored("a-0000000000e1"), station: "http://127.0.0.1:1/", host: "h1", mode }),
        (error: Error) => /mirror a-0000000000e1: the mirror engine exited/.test(error.message) && /no leg of mirror a-0000000000e1 can be reached/.test(error.message),
        `mode ${mode}`,
      );
      assert.deepEqual(await state.list(), [], `mode ${mode}: no record of a failed attach`);
    }
    const engines = await run("pgrep", ["-f", "--", "--mirror a-0000000000e1"]);
    assert.deepEqual([engines.code, engines.stdout.trim()], [1, ""], `no engine left running: ${engines.stderr}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("records with an engine decode; a damaged engine part is refused", () => {
  const engine = { pid: 42, mirror: "a-1", export: "a-1", listen: "unix:/s/a-1.sock", uri: "nbd+unix:///a-1?socket=/s/a-1.sock", legs: [{ name: "h-1-l0", uri: "nbd://127.0.0.1:1/h-1-l0" }] };
  const good = {
    version: 1, assignmentId: "a-1", station: "http://x/", host: "h", unit: "u", volume: "h-1-l0", export: "h-1-l0",
    uri: engine.uri, sizeBytes: 512, mode: "nbd", path: engine.uri, pid: 42, mountpoint: null,
    device: null, state: "attached", attachedAt: "now", engine,
  };
  const decoded = decodeRecord(JSON.stringify(good));
  assert.equal(decoded.kind, "record");
  assert.deepEqual(decoded.kind === "record" ? decoded.record.engine : undefined, engine);
  assert.equal(decodeRecord(JSON.stringify({ ...good, engine: null })).kind, "record");
  const cases: Array<[unknown, string]> = [
    [{ ...good, engine: 5 }, "engine: not an object"],
    [{ ...good, engine: { ...engine, pid: 0 } }, "engine: pid=0"],
    [{ ...good, engine: { ...engine, listen: 7 } }, "engine: listen"],
    [{ ...good, engine: { ...engine, legs: [] } }, "engine: no legs"],
    [{ ...good, engine: { ...engine, legs: [{ name: "x" }] } }, "engine: a leg without name or uri"],
  ];
  for (const [input, reason] of cases) {
    const result = decodeRecord(JSON.stringify(input));
    assert.ok(result.kind === "invalid" && result.reason.includes(reason), `${JSON.stringify(input).slice(0, 80)} -> ${JSON.stringify(result)}`);
  }
});
