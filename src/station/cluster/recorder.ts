// Captures every write a station makes to its SQLite database as the
// statements and parameters that made it, one entry per committed
// transaction, so that etcd can hold them as a replicated log and every other
// station can apply them to its own copy (ADR 0017: statement-level
// replication, as rqlite does with Raft).
//
// The station's code writes only through prepared statements' run() (the
// store, tasks, tokens, unit identities), inside db.transaction() or alone
// (autocommit). recordWrites() wraps the connection's prepare() and
// transaction() so that:
//   - a statement run inside the outermost transaction is buffered, and the
//     buffer becomes one entry when that transaction commits (nothing when it
//     throws); a nested transaction (a SAVEPOINT) that throws drops what it
//     buffered, as SQLite drops what it wrote;
//   - a statement run outside any transaction is an entry of its own;
//   - just before the outermost transaction commits, the entry's sequence
//     number is written into the local cluster_state table in the same
//     transaction, so the database always says which entry it reflects.
// Statements that write and also return rows (RETURNING) are refused: the
// station does not use them, and replaying them would need care.
//
// What makes replay exact: the station passes times and ids as parameters
// (its clock, its random ids), never SQL's own now() or random(), so the same
// statements on the same database give the same rows, rowids included
// (src/station/cluster/recorder_test.ts checks the whole store this way).

import type { Db } from "../db.ts";
import { IpsanError } from "../../util/errors.ts";

/** One statement of an entry: the SQL text and its parameters (encodeParams). */
export type LogStatement = readonly [sql: string, params: unknown];

/** The local table naming the last log entry this database reflects. */
export const CLUSTER_STATE_TABLE = "cluster_state";
/** Statements of one entry at most (a transaction larger than this is refused, loudly: none is near it). */
export const ENTRY_STATEMENTS_MAX = 100_000;

/**
 * The sequence number the database reflects (0: none), creating the
 * cluster_state table if missing. Only a read once the table exists, so it
 * never adds an entry on a recorded connection (exec is not recorded).
 */
export function appliedSeq(db: Db): number {
  const read = (): { applied_seq: number } | undefined => {
    try {
      return db.prepare(`SELECT applied_seq FROM ${CLUSTER_STATE_TABLE} WHERE id = 1`).get() as { applied_seq: number } | undefined;
    } catch {
      return undefined; // no such table yet
    }
  };
  let row = read();
  if (row === undefined) {
    db.exec(`CREATE TABLE IF NOT EXISTS ${CLUSTER_STATE_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), applied_seq INTEGER NOT NULL);
             INSERT OR IGNORE INTO ${CLUSTER_STATE_TABLE} (id, applied_seq) VALUES (1, 0);`);
    row = read();
  }
  return row?.applied_seq ?? 0;
}

/** JSON-safe parameters: Buffers as {"$b": base64}, bigints as {"$n": digits}. */
export function encodeParams(params: readonly unknown[]): unknown {
  const one = (value: unknown): unknown => {
    if (Buffer.isBuffer(value) || value instanceof Uint8Array) return { $b: Buffer.from(value as Uint8Array).toString("base64") };
    if (typeof value === "bigint") return { $n: value.toString() };
    if (value !== null && typeof value === "object") {
      return Object.fromEntries(Object.entries(value as Record<string, unknown>).map(([k, v]) => [k, one(v)]));
    }
    return value;
  };
  return params.map(one);
}

/** The inverse of encodeParams; refuses anything it could not have produced. */
export function decodeParams(encoded: unknown): unknown[] {
  const one = (value: unknown, depth: number): unknown => {
    if (value === null || typeof value === "number" || typeof value === "string" || typeof value === "boolean") return value;
    if (typeof value !== "object" || Array.isArray(value) || depth > 1) throw new IpsanError("INVALID_ARGUMENT", "log entry: a parameter of an unexpected kind");
    const record = value as Record<string, unknown>;
    const keys = Object.keys(record);
    if (keys.length === 1 && keys[0] === "$b" && typeof record["$b"] === "string") return Buffer.from(record["$b"], "base64");
    if (keys.length === 1 && keys[0] === "$n" && typeof record["$n"] === "string" && /^-?[0-9]{1,30}$/.test(record["$n"])) return BigInt(record["$n"]);
    return Object.fromEntries(keys.map((k) => [k, one(record[k], depth + 1)]));
  };
  if (!Array.isArray(encoded)) throw new IpsanError("INVALID_ARGUMENT", "log entry: parameters are not a list");
  return encoded.map((value) => one(value, 0));
}

export interface WriteRecorder {
  /** Stops recording (statements prepared before keep their wrapper but record nothing). */
  detach(): void;
}

/**
 * Wraps `db` so that each committed write transaction reaches `onEntry` with
 * its statements, after `nextSeq()` gave it the sequence number written into
 * cluster_state in the same transaction. `onEntry` runs synchronously, after
 * the commit, in commit order.
 */
export function recordWrites(db: Db, nextSeq: () => number, onEntry: (seq: number, statements: LogStatement[]) => void): WriteRecorder {
  appliedSeq(db);
  const setApplied = db.prepare(`UPDATE ${CLUSTER_STATE_TABLE} SET applied_seq = ? WHERE id = 1`);
  let recording = true;
  let depth = 0;
  let buffer: LogStatement[] | null = null;
  let pendingSeq = 0;

  const prepare = db.prepare.bind(db);
  const transaction = db.transaction.bind(db);

  const add = (sql: string, params: readonly unknown[]): void => {
    if (!recording) return;
    if (buffer === null) {
      // Autocommit: the statement already committed; its cluster_state update follows in its own transaction.
      const seq = nextSeq();
      setApplied.run(seq);
      onEntry(seq, [[sql, encodeParams(params)]]);
      return;
    }
    if (buffer.length >= ENTRY_STATEMENTS_MAX) throw new IpsanError("NOT_SUPPORTED", `a transaction of more than ${ENTRY_STATEMENTS_MAX} statements cannot be replicated`);
    buffer.push([sql, encodeParams(params)]);
  };

  (db as { prepare: (sql: string) => unknown }).prepare = (sql: string) => {
    const statement = prepare(sql);
    if (statement.reader) {
      if (!/^\s*(SELECT|WITH|PRAGMA|EXPLAIN|VALUES)\b/i.test(sql)) {
        throw new IpsanError("NOT_SUPPORTED", `a statement that writes and returns rows cannot be replicated: ${sql.slice(0, 80)}`);
      }
      return statement;
    }
    const run = statement.run.bind(statement);
    (statement as { run: (...params: unknown[]) => unknown }).run = (...params: unknown[]) => {
      const info = run(...params);
      add(sql, params);
      return info;
    };
    return statement;
  };

  (db as { transaction: (fn: (...args: unknown[]) => unknown) => unknown }).transaction = (fn: (...args: unknown[]) => unknown) => {
    const inner = transaction((...args: unknown[]) => {
      depth += 1;
      const mark = buffer?.length ?? 0;
      try {
        const value = fn(...args);
        if (depth === 1 && buffer !== null && buffer.length > 0) {
          pendingSeq = nextSeq();
          setApplied.run(pendingSeq);
        }
        return value;
      } catch (error) {
        if (buffer !== null) buffer.length = mark;
        throw error;
      } finally {
        depth -= 1;
      }
    });
    return (...args: unknown[]) => {
      const outermost = depth === 0 && buffer === null;
      if (outermost && recording) {
        buffer = [];
        pendingSeq = 0;
      }
      let value: unknown;
      try {
        value = inner(...args);
      } catch (error) {
        if (outermost) buffer = null;
        throw error;
      }
      if (outermost && buffer !== null) {
        const statements = buffer;
        buffer = null;
        if (statements.length > 0) onEntry(pendingSeq, statements);
      }
      return value;
    };
  };

  return {
    detach() {
      recording = false;
    },
  };
}

/**
 * Applies one entry to `db` (a follower, or a station rebuilding its copy):
 * every statement, then cluster_state = seq, in one transaction. Refuses an
 * entry that does not follow the database's own sequence number.
 */
export function applyEntry(db: Db, seq: number, statements: readonly LogStatement[]): void {
  const current = appliedSeq(db);
  if (seq !== current + 1) {
    throw new IpsanError("CONFLICT", `log entry ${seq} does not follow this database's entry ${current}: the copy must be rebuilt from etcd`);
  }
  const cache = new Map<string, ReturnType<Db["prepare"]>>();
  db.transaction(() => {
    for (const [sql, params] of statements) {
      let statement = cache.get(sql);
      if (statement === undefined) cache.set(sql, (statement = db.prepare(sql)));
      (statement.run as (...values: unknown[]) => unknown)(...decodeParams(params));
    }
    db.prepare(`UPDATE ${CLUSTER_STATE_TABLE} SET applied_seq = ? WHERE id = 1`).run(seq);
  })();
}
