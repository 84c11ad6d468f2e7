// The statement log is exact: every write the station's store, tokens and
// unit identities make to one database, recorded (recorder.ts) and applied to
// a fresh database, gives the same rows in every table, rowids and event
// sequence numbers included; a transaction that throws records nothing, a
// nested one that throws drops only its own statements; entries apply only in
// order; parameters of every kind survive the JSON round trip.

import { test } from "node:test";
import assert from "node:assert/strict";
import { makeTempDir, memoryTmpBase } from "../../testing/tmp.ts";
import { openDatabase, type Db } from "../db.ts";
import { StationStore } from "../store.ts";
import { TokenStore } from "../auth/tokens.ts";
import { applyEntry, appliedSeq, decodeParams, encodeParams, recordWrites, type LogStatement } from "./recorder.ts";
import { decodeEntry, encodeEntry } from "./etcd_log.ts";

/** Every table's rows, in rowid (or key) order (schema_version's local applied_at left out: each file ran its own migrations). */
function dump(db: Db): Record<string, unknown[]> {
  const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").all() as { name: string }[];
  const out: Record<string, unknown[]> = {};
  for (const { name } of tables) {
    out[name] = name === "schema_version" ? db.prepare("SELECT version FROM schema_version ORDER BY 1").all() : db.prepare(`SELECT * FROM "${name}" ORDER BY 1, 2`).all();
  }
  return out;
}

test("a store's writes, recorded and applied to a fresh database, give the same rows", () => {
  const dir = makeTempDir("recorder", memoryTmpBase());
  try {
    const a = openDatabase(dir.file("a.db"));
    const b = openDatabase(dir.file("b.db"));
    appliedSeq(b);
    const entries: { seq: number; statements: LogStatement[] }[] = [];
    let next = 0;
    recordWrites(a, () => ++next, (seq, statements) => entries.push({ seq, statements }));
    const store = new StationStore(a);
    const tokens = new TokenStore(a, "admin-token-of-sixteen-chars");
    store.applyUnitReport({
      name: "u1",
      dnsName: null,
      addresses: ["127.0.0.1"],
      nbd: { host: "127.0.0.1", port: 10809 },
      control: { host: "127.0.0.1", port: 10810 },
      capacityBytes: 4 << 30,
      freeBytes: 3 << 30,
      volumes: [{ name: "v1", number: 1, sizeBytes: 1 << 20, extents: [{ startLba: 4096, lengthLba: 2048, endLba: 6143 }], partitions: [], grants: ["127.0.0.2"] }],
    });
    store.putHost("h1", "127.0.0.2", false, "iqn.2026-12.org.example:h1");
    store.insertAssignment(
      {
        id: "a1",
        requestId: "r1",
        host: "h1",
        hostAddress: "127.0.0.2",
        unit: "u1",
        volume: "v1",
        partition: null,
        sizeBytes: 1 << 20,
        state: "pending",
        carved: true,
        wipe: false,
        copies: 1,
        legs: [],
        error: null,
        detail: null,
        createdAtMs: 5,
        updatedAtMs: 5,
      },
      { requestId: "r1", params: "{}" },
    );
    store.updateAssignment("a1", "active", {});
    tokens.create("ops", "operator");
    for (let i = 0; i < 5; i++) store.recordEvent("noted", `thing-${i}`, { i, buffer: "x".repeat(i) });
    // A transaction that throws records nothing; a nested one that throws drops only its own part.
    assert.throws(() =>
      a.transaction(() => {
        a.prepare("INSERT INTO events (at, type, action, subject, data) VALUES (?, ?, ?, ?, ?)").run(1, "unit", "lost", "x", "null");
        throw new Error("rolled back");
      })(),
    );
    a.transaction(() => {
      a.prepare("INSERT INTO events (at, type, action, subject, data) VALUES (?, ?, ?, ?, ?)").run(2, "unit", "kept", "y", "null");
      assert.throws(() =>
        a.transaction(() => {
          a.prepare("INSERT INTO events (at, type, action, subject, data) VALUES (?, ?, ?, ?, ?)").run(3, "unit", "dropped", "z", "null");
          throw new Error("inner rolled back");
        })(),
      );
    })();
    // An autocommit statement is an entry of its own.
    a.prepare("DELETE FROM tokens WHERE name = ?").run("nobody");
    store.removeVolume("u1", "v1");

    assert.ok(entries.length >= 8, `entries: ${entries.length}`);
    assert.deepEqual(entries.map((e) => e.seq), entries.map((_e, i) => i + 1), "consecutive sequence numbers in commit order");
    assert.equal(appliedSeq(a), entries.length, "the database says which entry it reflects");
    assert.ok(!JSON.stringify(entries).includes("lost") && !JSON.stringify(entries).includes("dropped"), "rolled back statements are not in the log");
    for (const entry of entries) {
      const text = encodeEntry({ seq: entry.seq, schema: 11, statements: entry.statements });
      applyEntry(b, entry.seq, decodeEntry(text, entry.seq).statements);
    }
    assert.deepEqual(dump(b), dump(a), "the copy equals the original in every table");
    assert.ok((dump(a)["events"] ?? []).some((row) => (row as { action: string }).action === "kept"));
    a.close();
    b.close();
  } finally {
    dir.remove();
  }
});

test("entries apply only in order; parameters of every kind round-trip", () => {
  const dir = makeTempDir("recorder", memoryTmpBase());
  try {
    const db = openDatabase(dir.file("c.db"));
    appliedSeq(db);
    assert.throws(() => applyEntry(db, 2, []), /does not follow/);
    applyEntry(db, 1, []);
    assert.throws(() => applyEntry(db, 1, []), /does not follow/);
    const params = [1, -2.5, "text", null, Buffer.from([0, 255, 7]), 12345678901234567890n, { named: Buffer.from("x"), n: 3 }];
    assert.deepEqual(decodeParams(JSON.parse(JSON.stringify(encodeParams(params)))), params);
    assert.throws(() => decodeParams([[1, 2]]), /unexpected kind/);
    assert.throws(() => decodeParams("nope"), /not a list/);
    assert.throws(() => decodeEntry("{}", 1), /not an ipsan log entry/);
    assert.throws(() => decodeEntry('{"v":1,"seq":2,"schema":11,"statements":[]}', 1), /not an ipsan log entry/);
    db.close();
  } finally {
    dir.remove();
  }
});
