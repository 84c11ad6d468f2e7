// `ipsan station backup` / `restore` (issue 9, ADR 0016), with real processes:
// a station and a unit; a write load (host registrations, allocations, API
// tokens) runs while `ipsan station backup` copies the data directory; the
// backup is restored into a new data directory and a second station started
// there must hold every host, assignment, volume and token that was
// acknowledged before the backup began, and answer the old admin token.
//
// The WAL is kept hot on purpose: the test holds a read transaction open on
// station.db from before the load, so no checkpoint can move the load's
// commits into the database file (as an operator's open sqlite3 shell or a
// busy station would). The canary runs the same scenario with a backup that
// copies station.db as a plain file: the load's commits are missing from its
// restore, and the check must say so.
//
// Then: a backup with one flipped byte, a manifest claiming a newer schema, a
// non-empty data directory, and a DEST that exists are each refused with a
// message saying what to do; and a backup that fails part way leaves neither
// DEST nor its partial directory.

import { test } from "node:test";
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import type { StationClient } from "../host/station_client.ts";
import { patchedBuild } from "../testing/patched_build.ts";
import { describeResult, run, type CommandResult } from "../testing/process.ts";
import { IPSAN_BIN } from "../demo/child.ts";
import { San } from "../e2e/harness.ts";
import { makeTempDir } from "../testing/tmp.ts";
import { MIGRATIONS, openDatabase } from "./db.ts";

const MIB = 1024 * 1024;
const LOAD_ACKS_BEFORE_BACKUP = 6;
const LOAD_ROUND_MAX = 200;
const COMMAND_TIMEOUT_MS = 60_000;

function ipsanWith(bin: string, args: readonly string[]): Promise<CommandResult> {
  return run(process.execPath, [bin, ...args], { timeoutMs: COMMAND_TIMEOUT_MS });
}

interface Acked {
  hosts: string[];
  assignments: string[];
  volumes: string[];
  tokens: string[];
}

/** Registers a host, allocates it a volume and creates a token, round after round, until stopped. */
function startLoad(client: StationClient): { acked: Acked; stop(): Promise<void>; error(): unknown } {
  const acked: Acked = { hosts: [], assignments: [], volumes: [], tokens: [] };
  let stopping = false;
  let failure: unknown;
  const loop = (async () => {
    for (let round = 0; round < LOAD_ROUND_MAX && !stopping; round++) {
      const host = `h${round}`;
      await client.registerHost(host, `127.0.1.${round + 1}`);
      acked.hosts.push(host);
      const assignment = await client.allocate({ requestId: `backup-load-${round}`, host, sizeBytes: 4 * MIB });
      acked.assignments.push(assignment.id);
      acked.volumes.push(`${assignment.unit}/${assignment.volume}`);
      await client.call("POST", "/api/v1/tokens", { name: `t${round}`, role: "viewer" });
      acked.tokens.push(`t${round}`);
    }
  })().catch((error: unknown) => {
    failure = error;
  });
  return {
    acked,
    error: () => failure,
    async stop() {
      stopping = true;
      await loop;
    },
  };
}

function copyAcked(acked: Acked): Acked {
  return { hosts: [...acked.hosts], assignments: [...acked.assignments], volumes: [...acked.volumes], tokens: [...acked.tokens] };
}

interface Outcome {
  /** What was acknowledged before the backup began and is not in the restored station. */
  readonly missing: string[];
  readonly before: Acked;
  readonly backupDir: string;
  readonly restoredDir: string;
  readonly san: San;
}

/** The scenario; `bin` runs `ipsan station backup` (the canary's patched build, or the real one). */
async function backupUnderLoad(name: string, bin: string): Promise<Outcome> {
  const san = new San(name);
  const station = await san.startStation();
  await san.startUnit("u1", { capacity: "1G" });
  await san.waitUnits(["u1"]);
  const client = await san.client();
  // Everything so far into the database file (the schema, the unit), then a read snapshot that
  // stops later checkpoints: the load's commits stay in the WAL.
  const checkpointer = new Database(join(station.dataDir, "station.db"), { timeout: 5_000 });
  checkpointer.pragma("wal_checkpoint(FULL)");
  checkpointer.close();
  const reader = new Database(join(station.dataDir, "station.db"), { readonly: true });
  let load: ReturnType<typeof startLoad> | undefined;
  const backupDir = san.tmp.file("backup");
  const restoredDir = san.tmp.file("restored");
  try {
    reader.exec("BEGIN");
    reader.prepare("SELECT count(*) FROM units").get(); // the read snapshot: checkpoints stop here
    load = startLoad(client);
    const deadline = Date.now() + 30_000;
    while (load.acked.tokens.length < LOAD_ACKS_BEFORE_BACKUP && load.error() === undefined) {
      assert.ok(Date.now() < deadline, `the load made ${load.acked.tokens.length} rounds in 30 s`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.equal(load.error(), undefined, `the load failed: ${String(load.error())}`);
    const before = copyAcked(load.acked);
    const backup = await ipsanWith(bin, ["station", "backup", backupDir, "--data", station.dataDir]);
    assert.equal(backup.code, 0, describeResult(backup));
    assert.match(backup.stdout, /^backup written to /);
    await load.stop();
    assert.equal(load.error(), undefined, `the load failed: ${String(load.error())}`);
    assert.ok(load.acked.tokens.length > before.tokens.length, "the load went on while the backup ran");
    reader.exec("COMMIT");
    reader.close();

    const restore = await ipsanWith(IPSAN_BIN, ["station", "restore", backupDir, "--data", restoredDir]);
    assert.equal(restore.code, 0, describeResult(restore));
    // The restored station: its own temp dir and ports; the unit stays with the first one.
    const second = new San(`${name}-restored`);
    try {
      const restored = await second.startStation({ dataDir: restoredDir });
      assert.equal(await fs.readFile(restored.tokenFile, "utf8"), await fs.readFile(station.tokenFile, "utf8"), "the admin token came back");
      const client2 = await second.client();
      const hosts = new Set((await client2.hosts()).map((h) => h.name));
      const assignments = new Set((await client2.assignments()).map((a) => a.id));
      const volumes = new Set((await client2.volumes()).map((v) => `${v.unit}/${v.name}`));
      const tokens = new Set(((await client2.call("GET", "/api/v1/tokens")) as { items: { name: string }[] }).items.map((t) => t.name));
      const missing = [
        ...before.hosts.filter((h) => !hosts.has(h)).map((h) => `host ${h}`),
        ...before.assignments.filter((a) => !assignments.has(a)).map((a) => `assignment ${a}`),
        ...before.volumes.filter((v) => !volumes.has(v)).map((v) => `volume ${v}`),
        ...before.tokens.filter((t) => !tokens.has(t)).map((t) => `token ${t}`),
      ];
      return { missing, before, backupDir, restoredDir, san };
    } finally {
      await second.close();
    }
  } catch (error) {
    await load?.stop();
    if (reader.open) reader.close();
    await san.close();
    throw error;
  }
}

test("station backup under write load with a hot WAL: the restored station holds everything acknowledged before the backup", { timeout: 120_000 }, async () => {
  const outcome = await backupUnderLoad("backup", IPSAN_BIN);
  try {
    assert.deepEqual(outcome.missing, [], `lost in backup and restore (acknowledged before the backup: ${JSON.stringify(outcome.before)})`);
    const manifest = JSON.parse(await fs.readFile(join(outcome.backupDir, "manifest.json"), "utf8")) as { schemaVersion: number; files: { name: string }[] };
    assert.equal(manifest.schemaVersion, MIGRATIONS.at(-1)?.version);
    assert.deepEqual(manifest.files.map((f) => f.name).sort(), ["admin.token", "audit.log", "cluster.key", "host-keys.secret", "station.db"]);
    assert.equal((await fs.stat(outcome.backupDir)).mode & 0o777, 0o700, "the backup directory is the owner's only");
    for (const file of manifest.files) assert.equal((await fs.stat(join(outcome.backupDir, file.name))).mode & 0o077, 0, `${file.name} is the owner's only`);

    // Refusals, each on a copy of the good backup.
    const copy = async (label: string): Promise<string> => {
      const dir = outcome.san.tmp.file(`backup-${label}`);
      await fs.cp(outcome.backupDir, dir, { recursive: true });
      return dir;
    };
    const restoreInto = (backup: string, data: string, ...more: string[]): Promise<CommandResult> =>
      ipsanWith(IPSAN_BIN, ["station", "restore", backup, "--data", data, ...more]);

    const flipped = await copy("flipped");
    const db = await fs.readFile(join(flipped, "station.db"));
    db[db.length - 100] = (db[db.length - 100] ?? 0) ^ 0xff;
    await fs.writeFile(join(flipped, "station.db"), db);
    const refusedFlip = await restoreInto(flipped, outcome.san.tmp.file("data-flipped"));
    assert.equal(refusedFlip.code, 1, describeResult(refusedFlip));
    assert.match(refusedFlip.stderr, /station\.db does not match its checksum in manifest\.json .*nothing was restored/, describeResult(refusedFlip));
    await assert.rejects(fs.access(outcome.san.tmp.file("data-flipped")), "nothing written for a corrupted backup");

    const newer = await copy("newer");
    const manifestPath = join(newer, "manifest.json");
    const text = JSON.parse(await fs.readFile(manifestPath, "utf8")) as Record<string, unknown>;
    await fs.writeFile(manifestPath, JSON.stringify({ ...text, schemaVersion: 999 }));
    const refusedNewer = await restoreInto(newer, outcome.san.tmp.file("data-newer"));
    assert.equal(refusedNewer.code, 1, describeResult(refusedNewer));
    assert.match(refusedNewer.stderr, /schema version 999, newer than this ipsan knows .*upgrade ipsan first/, describeResult(refusedNewer));

    const refusedBusy = await restoreInto(outcome.backupDir, outcome.restoredDir);
    assert.equal(refusedBusy.code, 1, describeResult(refusedBusy));
    assert.match(refusedBusy.stderr, /is not empty .*add --force/, describeResult(refusedBusy));
    const forced = await restoreInto(outcome.backupDir, outcome.restoredDir, "--force");
    assert.equal(forced.code, 0, describeResult(forced));

    const exists = await ipsanWith(IPSAN_BIN, ["station", "backup", outcome.backupDir, "--data", outcome.restoredDir]);
    assert.equal(exists.code, 1, describeResult(exists));
    assert.match(exists.stderr, /exists: a backup goes into a new directory/);
    const noStation = await ipsanWith(IPSAN_BIN, ["station", "backup", outcome.san.tmp.file("b2"), "--data", outcome.san.tmp.file("nowhere")]);
    assert.equal(noStation.code, 1, describeResult(noStation));
    assert.match(noStation.stderr, /station\.db does not exist: --data must name the station's data directory/);
  } finally {
    await outcome.san.close();
  }
});

test("canary: a backup that copies station.db as a plain file loses the commits still in the WAL, and the check says so", { timeout: 120_000 }, async () => {
  const build = patchedBuild(
    "backup-canary",
    [{ file: "dist/station/backup.js", from: "await db.backup(dest, {", to: "await (await import(\"node:fs\")).promises.copyFile(source, dest); if (false) await db.backup(dest, {" }],
    undefined,
    { nodeModules: true },
  );
  try {
    const outcome = await backupUnderLoad("backup-canary", build.ipsanBin);
    try {
      assert.ok(outcome.missing.length > 0, "a plain copy of a database with a hot WAL must lose acknowledged commits");
      assert.ok(outcome.missing.some((m) => m.startsWith("assignment ")), outcome.missing.join(", "));
    } finally {
      await outcome.san.close();
    }
  } finally {
    build.remove();
  }
});

test("a backup that fails part way leaves no DEST and no partial directory behind", { timeout: 30_000 }, async () => {
  const dir = makeTempDir("backup-partial");
  try {
    const data = dir.file("station");
    await fs.mkdir(data);
    openDatabase(join(data, "station.db")).close();
    for (const name of ["admin.token", "cluster.key", "host-keys.secret"]) await fs.writeFile(join(data, name), `${"ab".repeat(32)}\n`, { mode: 0o600 });
    // The audit log is read last, after the secrets and the database were copied: make that read fail.
    await fs.mkdir(join(data, "audit.log"));
    const dest = dir.file("backup");
    const failed = await ipsanWith(IPSAN_BIN, ["station", "backup", dest, "--data", data]);
    assert.equal(failed.code, 1, describeResult(failed));
    assert.match(failed.stderr, /EISDIR/);
    assert.deepEqual((await fs.readdir(dir.path)).sort(), ["station"], "neither DEST nor a partial directory is left");
  } finally {
    dir.remove();
  }
});
