// Proves the host side's handling of mirrored assignments without a SAN
// (host_mirror_test in src/e2e does it with one): `--copies` accepts 1, 2 or
// 3 only and says so (exit 2); `--mode nbd` on a single copy records the
// unit's own URI with pid null and starts nothing (detach just forgets it);
// `--mode kernel` on a mirror is refused before anything starts; an engine
// that cannot start (no leg reachable) fails the attach with the engine's own
// words, leaves no record and no process; state records with an engine are
// decoded, and a damaged engine part is refused, never half-trusted.
// Leg replacement as the agent applies it (syncMirrorLegs), with real units
// and the engine `attach` starts: the engine runs with a legs file and a
// status file in the state dir; when the station's leg 1 becomes a volume on
// a third unit, the legs file and the record change, the engine (SIGHUP)
// rebuilds the new leg in full and its status file says in sync; after
// kill -9 the agent's re-attach starts the engine on the new legs, with the
// data; detach removes both files.

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { NbdClient } from "../nbd/client.ts";
import { run, sleep } from "../testing/process.ts";
import { IPSAN_BIN, type RunningUnit, startUnit } from "../testing/unit.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { METADATA_BYTES } from "./engine/metadata.ts";
import { attach, attachmentAlive, detach, reattach, syncMirrorLegs } from "./attach.ts";
import { readStatusFile } from "./legs.ts";
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
  assert.match(mode.stderr, /expected auto, fuse, kernel, nbd or iscsi/);
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

test("a leg the station replaced: syncMirrorLegs rewrites the legs file and the record, the engine rebuilds the new leg, a restarted engine uses the new legs", { timeout: 90_000 }, async () => {
  const dir = makeTempDir("mirror-replace-host", memoryTmpBase());
  const units: RunningUnit[] = [];
  const state = new HostState(dir.file("state"));
  const dataBytes = 16 * MIB;
  try {
    for (const name of ["ua", "ub", "uc"]) {
      units.push(await startUnit({ dataDir: dir.file(name), capacity: "48M", volumes: [{ name: "m", size: dataBytes + METADATA_BYTES }], name, listen: "127.0.0.1:0" }));
    }
    const leg = (i: number): { unit: string; volume: string; sizeBytes: number; uri: string; state: string } => ({
      unit: (units[i] as RunningUnit).name,
      volume: `v-${(units[i] as RunningUnit).name}`,
      sizeBytes: dataBytes + METADATA_BYTES,
      uri: (units[i] as RunningUnit).uri("m"),
      state: "in-sync",
    });
    const assignment = (legs: ReturnType<typeof leg>[]): StationAssignment => ({
      id: "a-replace1", host: "h1", unit: "ua", volume: "v-ua", export: "v-ua", nbdHost: "127.0.0.1", nbdPort: 1, sizeBytes: dataBytes, uri: null, copies: 2, legs,
    });
    let record = await attach(state, { assignment: assignment([leg(0), leg(1)]), station: "http://127.0.0.1:1/", host: "h1", mode: "nbd" });
    const engine = record.engine;
    assert.ok(engine !== null && engine !== undefined && engine.legsFile !== undefined && engine.statusFile !== undefined, JSON.stringify(record));
    assert.deepEqual(JSON.parse(readFileSync(engine.legsFile, "utf8")), [leg(0), leg(1)].map((l) => ({ id: l.volume, uri: l.uri, unit: l.unit, volume: l.volume })));
    const data = randomBytes(MIB);
    const client = await NbdClient.connect(record.uri);
    await client.write(3 * MIB, data, true);
    await client.close();

    // Unchanged legs: nothing to do.
    assert.deepEqual((await syncMirrorLegs(state, record, assignment([leg(0), leg(1)]))).changes, []);
    // ub dies for good; the station puts leg 1 on uc.
    await (units[1] as RunningUnit).kill9();
    const synced = await syncMirrorLegs(state, record, assignment([leg(0), leg(2)]));
    assert.deepEqual(synced.changes, ["1: ub/v-ub -> uc/v-uc"]);
    record = synced.record;
    assert.deepEqual((await state.get("a-replace1"))?.engine?.legs.map((l) => l.volume), ["v-ua", "v-uc"]);
    assert.deepEqual((JSON.parse(readFileSync(engine.legsFile, "utf8")) as { id: string }[]).map((l) => l.id), ["v-ua", "v-uc"]);
    const deadline = Date.now() + 30_000;
    let status = await readStatusFile(engine.statusFile);
    while (Date.now() < deadline && !(status?.legs.map((l) => `${l.volume}:${l.state}`).join(",") === "v-ua:in-sync,v-uc:in-sync")) {
      await sleep(100);
      status = await readStatusFile(engine.statusFile);
    }
    assert.deepEqual(status?.legs.map((l) => [l.unit, l.volume, l.state]), [["ua", "v-ua", "in-sync"], ["uc", "v-uc", "in-sync"]]);

    // kill -9 of the engine: the agent's re-attach starts it on the new legs (ub is gone for good, so the old legs could not start).
    process.kill(engine.pid, "SIGKILL");
    const killedBy = Date.now() + 5_000;
    while (Date.now() < killedBy && (await attachmentAlive(record))) await sleep(50);
    record = await reattach(state, record);
    const back = await NbdClient.connect(record.uri);
    assert.ok((await back.read(3 * MIB, MIB)).equals(data), "the data reads back through the restarted engine");
    await back.close();
    await detach(state, record);
    assert.equal(existsSync(engine.legsFile) || existsSync(engine.statusFile), false, "detach removes the legs and status files");
  } finally {
    for (const r of await state.list()) await detach(state, r).catch(() => undefined);
    for (const unit of units) await unit.stop();
    dir.remove();
  }
});
