// Proves the station's database layer on real SQLite files: migrations run
// once, in order, each in a transaction with its version bump (a failing
// migration leaves the previous version intact), and a database from a newer
// station is refused; the store's in-memory mirror equals what a fresh store
// loads from the same file (so a restart shows the same pool); a unit report
// replaces that unit's volumes and writes only what changed; the assignment
// state machine refuses illegal transitions; requests map to assignments and
// a dropped request frees its id; events persist in order for replay; a
// database made before migration 3 upgrades in place, its assignments read
// back with wipe = false, and a new assignment's wipe flag survives a reopen;
// a mirror's legs are recorded with it in one transaction, come back after a
// reopen (live and in the history), and each leg's volume counts as held; a
// database made before migration 4 reads its assignments as copies 1.

import { test } from "node:test";
import assert from "node:assert/strict";
import { makeTempDir } from "../testing/tmp.ts";
import { MIGRATIONS, migrate, openDatabase, schemaVersion } from "./db.ts";
import { StationStore } from "./store.ts";
import type { AssignmentRecord, LegRecord, UnitReport } from "./types.ts";
import { MIRROR_METADATA_BYTES } from "./station.ts";
import { METADATA_BYTES } from "../host/engine/metadata.ts";
import Database from "better-sqlite3";

function report(name: string, volumes: { name: string; sizeBytes: number; grants?: string[] }[], freeBytes = 1 << 30): UnitReport {
  let next = 4096;
  return {
    name,
    dnsName: null,
    addresses: ["127.0.0.1"],
    nbd: { host: "127.0.0.1", port: 10809 },
    control: { host: "127.0.0.1", port: 10810 },
    capacityBytes: 4 << 30,
    freeBytes,
    volumes: volumes.map((v, i) => {
      const lengthLba = v.sizeBytes / 512;
      const extent = { startLba: next, lengthLba, endLba: next + lengthLba - 1 };
      next += lengthLba;
      return { name: v.name, number: i + 1, sizeBytes: v.sizeBytes, extents: [extent], partitions: [], grants: v.grants ?? [] };
    }),
  };
}

/** The newest migration's version (versions need not be contiguous: branches number theirs in parallel). */
const LATEST = MIGRATIONS.at(-1)?.version ?? 0;

function pending(id: string, over: Partial<AssignmentRecord> = {}): AssignmentRecord {
  return {
    id,
    requestId: null,
    host: "h1",
    hostAddress: "127.0.0.2",
    unit: "u1",
    volume: "v1",
    partition: null,
    sizeBytes: 1 << 20,
    state: "pending",
    carved: false,
    wipe: false,
    copies: 1,
    legs: [],
    error: null,
    detail: null,
    createdAtMs: 1,
    updatedAtMs: 1,
    ...over,
  };
}

test("migrations apply once, in a transaction each; a newer database is refused", () => {
  const dir = makeTempDir("store");
  try {
    const path = dir.file("a.db");
    const db = new Database(path);
    const broken = [...MIGRATIONS, { version: LATEST + 1, description: "bad", sql: "CREATE TABLE extra (x); THIS IS NOT SQL" }];
    assert.throws(() => migrate(db, broken));
    assert.equal(schemaVersion(db), LATEST, "the good migrations stayed, the bad one left nothing");
    assert.equal(db.prepare("SELECT count(*) AS n FROM sqlite_master WHERE name = 'extra'").get() !== undefined, true);
    assert.equal((db.prepare("SELECT count(*) AS n FROM sqlite_master WHERE name = 'extra'").get() as { n: number }).n, 0);
    assert.deepEqual(migrate(db), { from: LATEST, to: LATEST }, "second run does nothing");
    db.prepare("INSERT INTO schema_version (version, applied_at) VALUES (?, 0)").run(99);
    db.close();
    assert.throws(() => openDatabase(path), /schema version 99 is newer/);
  } finally {
    dir.remove();
  }
});

test("a reopened store shows the same pool, hosts and live assignments", () => {
  const dir = makeTempDir("store");
  try {
    const path = dir.file("s.db");
    const store = new StationStore(openDatabase(path));
    store.applyUnitReport(report("u1", [{ name: "v1", sizeBytes: 1 << 20 }, { name: "v2", sizeBytes: 2 << 20, grants: ["127.0.0.2/32"] }]));
    store.applyUnitReport(report("u2", []));
    store.putHost("h1", "127.0.0.2");
    store.insertAssignment(pending("a-1"), { requestId: "r1", params: "{}" });
    store.updateAssignment("a-1", "active");
    store.insertAssignment(pending("a-2", { volume: "v2" }));
    store.updateAssignment("a-2", "failed", { error: "boom" });
    const events = store.eventsAfter(0);
    store.close();

    const again = new StationStore(openDatabase(path));
    assert.deepEqual([...again.units.keys()].sort(), ["u1", "u2"]);
    assert.equal(again.units.get("u1")?.state, "unknown", "not heard from since the restart");
    assert.equal(again.volumeCount, 2);
    assert.deepEqual(again.volume("u1", "v2")?.grants, ["127.0.0.2/32"]);
    assert.equal(again.hosts.get("h1")?.address, "127.0.0.2");
    assert.deepEqual([...again.live.keys()], ["a-1"], "only live assignments in memory");
    assert.equal(again.getAssignment("a-2")?.state, "failed", "history from the database");
    assert.equal(again.isVolumeAssigned("u1", "v1"), true);
    assert.equal(again.findRequest("r1")?.assignmentId, "a-1");
    assert.deepEqual(again.eventsAfter(0), events, "events persisted in order");
    again.close();
  } finally {
    dir.remove();
  }
});

test("migration 3 upgrades an older database in place: old assignments do not wipe, new ones keep their flag", () => {
  const dir = makeTempDir("store");
  try {
    const path = dir.file("old.db");
    const old = new Database(path);
    migrate(old, MIGRATIONS.filter((m) => m.version <= 2));
    assert.equal(schemaVersion(old), 2);
    old
      .prepare(
        `INSERT INTO assignments (id, request_id, host, host_address, unit, volume, partition, size_bytes, state, carved, error, detail, created_at, updated_at)
         VALUES ('a-old', NULL, 'h1', '127.0.0.2', 'u1', 'v1', NULL, 1048576, 'active', 0, NULL, NULL, 1, 1)`,
      )
      .run();
    old.close();

    const store = new StationStore(openDatabase(path));
    assert.equal(store.getAssignment("a-old")?.wipe, false, "an assignment from before the migration never wipes");
    store.insertAssignment(pending("a-new", { volume: "v2", wipe: true }));
    store.close();
    const again = new StationStore(openDatabase(path));
    assert.equal(again.getAssignment("a-new")?.wipe, true, "a reused volume's pending assignment still wipes after a restart");
    assert.equal(again.live.get("a-new")?.wipe, true);
    again.close();
    const check = new Database(path);
    assert.equal(schemaVersion(check), LATEST);
    assert.deepEqual(check.prepare("SELECT id, wipe FROM assignments ORDER BY id").all(), [
      { id: "a-new", wipe: 1 },
      { id: "a-old", wipe: 0 },
    ]);
    check.close();
  } finally {
    dir.remove();
  }
});

test("a unit report replaces that unit's volumes and writes only changes", () => {
  const dir = makeTempDir("store");
  try {
    const store = new StationStore(openDatabase(dir.file("r.db")));
    store.applyUnitReport(report("u1", [{ name: "v1", sizeBytes: 1 << 20 }, { name: "v2", sizeBytes: 1 << 20 }]));
    const before = store.eventsAfter(0).length;
    assert.equal(store.applyUnitReport(report("u1", [{ name: "v1", sizeBytes: 1 << 20 }, { name: "v2", sizeBytes: 1 << 20 }])).volumesChanged, false);
    assert.equal(store.eventsAfter(0).length, before, "an identical report changes nothing");
    store.applyUnitReport(report("u1", [{ name: "v1", sizeBytes: 1 << 20 }, { name: "v3", sizeBytes: 1 << 20 }]));
    assert.deepEqual([...store.unitVolumes("u1").keys()].sort(), ["v1", "v3"]);
    assert.equal(store.volumeCount, 2);
    const last = store.eventsAfter(0).at(-1);
    assert.equal(last?.type, "volumes");
    assert.deepEqual((last?.data as { added: { names: string[] }; removed: { names: string[] } }).added.names, ["v3"]);
    assert.deepEqual((last?.data as { added: { names: string[] }; removed: { names: string[] } }).removed.names, ["v2"]);
    store.close();
  } finally {
    dir.remove();
  }
});

test("the assignment state machine refuses illegal moves; a dropped request frees its id", () => {
  const dir = makeTempDir("store");
  try {
    const store = new StationStore(openDatabase(dir.file("m.db")));
    store.insertAssignment(pending("a-1"), { requestId: "r1", params: "{}" });
    assert.throws(() => store.updateAssignment("a-1", "released"), /pending -> released/);
    assert.throws(() => store.updateAssignment("a-1", "revoking"), /pending -> revoking/);
    store.updateAssignment("a-1", "failed", { error: "unit away", dropRequest: true });
    assert.equal(store.findRequest("r1"), undefined);
    assert.equal(store.live.size, 0);
    assert.throws(() => store.updateAssignment("a-1", "active"), /failed -> active/);
    store.insertAssignment(pending("a-2"), { requestId: "r1", params: "{}" });
    assert.equal(store.findRequest("r1")?.assignmentId, "a-2");
    assert.throws(() => store.insertAssignment(pending("a-3"), { requestId: "r1", params: "{}" }), /UNIQUE|PRIMARY/);
    assert.equal(store.getAssignment("a-3"), undefined, "a failed transaction leaves nothing");
    assert.equal(store.live.has("a-3"), false, "nor anything in memory");
    store.close();
  } finally {
    dir.remove();
  }
});

function leg(index: number, unit: string, volume: string, over: Partial<LegRecord> = {}): LegRecord {
  return { index, unit, volume, sizeBytes: (1 << 20) + MIRROR_METADATA_BYTES, state: "pending", detail: null, ...over };
}

test("the station sizes legs with the engine's metadata: MIRROR_METADATA_BYTES equals METADATA_BYTES", () => {
  assert.equal(MIRROR_METADATA_BYTES, METADATA_BYTES);
});

test("a mirror's legs are recorded with it, survive a reopen, and hold every leg's volume", () => {
  const dir = makeTempDir("store");
  try {
    const path = dir.file("legs.db");
    const store = new StationStore(openDatabase(path));
    store.applyUnitReport(report("u1", []));
    store.applyUnitReport(report("u2", []));
    const legs = [leg(0, "u1", "h-m1-l0"), leg(1, "u2", "h-m1-l1")];
    store.insertAssignment(pending("a-m1", { unit: "u1", volume: "h-m1-l0", carved: true, copies: 2, legs }), { requestId: "rm1", params: "{}" });
    assert.equal(store.isVolumeAssigned("u1", "h-m1-l0"), true);
    assert.equal(store.isVolumeAssigned("u2", "h-m1-l1"), true, "the second leg's volume is held too");
    assert.deepEqual(store.liveOnVolume("u2", "h-m1-l1").map((a) => a.id), ["a-m1"]);
    const detail = { volumeNumber: 1, sizeBytes: legs[0]?.sizeBytes ?? 0, extents: [], nbd: null };
    store.updateAssignment("a-m1", "active", { legs: legs.map((l) => ({ ...l, state: "in-sync" as const, detail })) });
    // A second mirror that fails: its legs stay in the history.
    store.insertAssignment(pending("a-m2", { unit: "u2", volume: "h-m2-l0", carved: true, copies: 2, legs: [leg(0, "u2", "h-m2-l0"), leg(1, "u1", "h-m2-l1")] }));
    store.updateAssignment("a-m2", "failed", { error: "unit away" });
    assert.equal(store.isVolumeAssigned("u1", "h-m2-l1"), false, "a failed mirror holds no leg");
    store.close();

    const again = new StationStore(openDatabase(path));
    const live = again.live.get("a-m1");
    assert.equal(live?.copies, 2);
    assert.deepEqual(live?.legs.map((l) => [l.index, l.unit, l.volume, l.state]), [
      [0, "u1", "h-m1-l0", "in-sync"],
      [1, "u2", "h-m1-l1", "in-sync"],
    ]);
    assert.deepEqual(live?.legs[1]?.detail, detail);
    assert.equal(again.isVolumeAssigned("u2", "h-m1-l1"), true, "legs are indexed after a reopen");
    const failed = again.getAssignment("a-m2");
    assert.equal(failed?.state, "failed");
    assert.deepEqual(failed?.legs.map((l) => l.volume), ["h-m2-l0", "h-m2-l1"], "history keeps the legs");
    assert.deepEqual(again.listAssignments({ all: true }).find((a) => a.id === "a-m2")?.legs.length, 2);
    again.updateAssignment("a-m1", "revoking");
    again.updateAssignment("a-m1", "released");
    assert.equal(again.isVolumeAssigned("u1", "h-m1-l0"), false);
    assert.equal(again.isVolumeAssigned("u2", "h-m1-l1"), false, "a released mirror frees every leg's volume");
    again.close();
  } finally {
    dir.remove();
  }
});

test("migration 4 upgrades an older database in place: its assignments are single copies", () => {
  const dir = makeTempDir("store");
  try {
    const path = dir.file("old3.db");
    const old = new Database(path);
    migrate(old, MIGRATIONS.filter((m) => m.version <= 3));
    old
      .prepare(
        `INSERT INTO assignments (id, request_id, host, host_address, unit, volume, partition, size_bytes, state, carved, wipe, error, detail, created_at, updated_at)
         VALUES ('a-old', NULL, 'h1', '127.0.0.2', 'u1', 'v1', NULL, 1048576, 'active', 0, 0, NULL, NULL, 1, 1)`,
      )
      .run();
    old.close();
    const store = new StationStore(openDatabase(path));
    const a = store.getAssignment("a-old");
    assert.equal(a?.copies, 1);
    assert.deepEqual(a?.legs, []);
    assert.equal(store.isVolumeAssigned("u1", "v1"), true);
    store.close();
  } finally {
    dir.remove();
  }
});
