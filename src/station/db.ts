// The station's database: SQLite through better-sqlite3 (synchronous, so a
// check-then-write on the event loop is atomic with respect to other
// requests). WAL journal with synchronous=FULL: a transaction that returned
// has been fsynced, so an API answer sent after it survives kill -9.
//
// Schema changes are numbered migrations kept here in code; each runs in its
// own transaction together with the bump of schema_version, so a crash in the
// middle of a migration leaves the previous version intact.

import { Worker } from "node:worker_threads";
import Database from "better-sqlite3";
import { IpsanError } from "../util/errors.ts";

export type Db = Database.Database;

/** How long a statement waits for a lock held by another connection (e.g. the sqlite3 CLI). */
export const DB_BUSY_TIMEOUT_MS = 5_000;

export interface Migration {
  readonly version: number;
  readonly description: string;
  readonly sql: string;
}

export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    description: "units, volumes, hosts, assignments, requests, events",
    sql: `
      CREATE TABLE units (
        name TEXT PRIMARY KEY,
        dns_name TEXT,
        addresses TEXT NOT NULL,
        nbd_host TEXT, nbd_port INTEGER,
        control_host TEXT, control_port INTEGER,
        capacity_bytes INTEGER NOT NULL,
        free_bytes INTEGER NOT NULL,
        volumes_max INTEGER,
        state TEXT NOT NULL,
        last_seen_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL
      );
      CREATE TABLE volumes (
        unit TEXT NOT NULL,
        name TEXT NOT NULL,
        number INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        extents TEXT NOT NULL,
        partitions TEXT NOT NULL,
        grants TEXT,
        PRIMARY KEY (unit, name)
      ) WITHOUT ROWID;
      CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        last_seen_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL
      );
      CREATE TABLE assignments (
        id TEXT PRIMARY KEY,
        request_id TEXT,
        host TEXT NOT NULL,
        host_address TEXT NOT NULL,
        unit TEXT NOT NULL,
        volume TEXT NOT NULL,
        partition INTEGER,
        size_bytes INTEGER NOT NULL,
        state TEXT NOT NULL,
        carved INTEGER NOT NULL,
        error TEXT,
        detail TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
      );
      CREATE INDEX assignments_by_state ON assignments (state);
      CREATE INDEX assignments_by_host ON assignments (host);
      CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        assignment_id TEXT NOT NULL,
        params TEXT NOT NULL,
        created_at INTEGER NOT NULL
      );
      CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        type TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        data TEXT NOT NULL
      );
    `,
  },
  {
    version: 2,
    description: "find a request by its assignment (undo drops the idempotency record)",
    sql: "CREATE INDEX requests_by_assignment ON requests (assignment_id);",
  },
  {
    version: 3,
    description: "assignments remember whether the volume must be wiped before it is granted (automatic reuse)",
    sql: "ALTER TABLE assignments ADD COLUMN wipe INTEGER NOT NULL DEFAULT 0;",
  },
  {
    version: 4,
    description: "mirrored assignments: copies, and one row per leg (recorded pending together, activated together)",
    sql: `
      ALTER TABLE assignments ADD COLUMN copies INTEGER NOT NULL DEFAULT 1;
      CREATE TABLE assignment_legs (
        assignment_id TEXT NOT NULL,
        leg INTEGER NOT NULL,
        unit TEXT NOT NULL,
        volume TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        state TEXT NOT NULL,
        detail TEXT,
        PRIMARY KEY (assignment_id, leg)
      ) WITHOUT ROWID;
    `,
  },
  {
    version: 5,
    description:
      "spare units and zones; each leg's reported state, rebuild progress and error, the engine generation of the last leg report; " +
      "leg replacements in progress (finished or undone after a crash); old leg volumes to delete when their unit returns",
    sql: `
      ALTER TABLE units ADD COLUMN spare INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE units ADD COLUMN zone TEXT;
      ALTER TABLE assignment_legs ADD COLUMN rebuild TEXT;
      ALTER TABLE assignment_legs ADD COLUMN error TEXT;
      ALTER TABLE assignments ADD COLUMN legs_generation INTEGER;
      CREATE TABLE leg_replacements (
        assignment_id TEXT NOT NULL,
        leg INTEGER NOT NULL,
        old_unit TEXT NOT NULL,
        old_volume TEXT NOT NULL,
        new_unit TEXT NOT NULL,
        new_volume TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (assignment_id, leg)
      ) WITHOUT ROWID;
      CREATE TABLE leg_volume_deletions (
        unit TEXT NOT NULL,
        volume TEXT NOT NULL,
        assignment_id TEXT NOT NULL,
        leg INTEGER NOT NULL,
        reason TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (unit, volume)
      ) WITHOUT ROWID;
    `,
  },
  {
    version: 6,
    description: "spare hosts, and assignments a host failover moved (from which host, when the move finished)",
    sql: `
      ALTER TABLE hosts ADD COLUMN spare INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE assignments ADD COLUMN moved_from TEXT;
      ALTER TABLE assignments ADD COLUMN moved_at INTEGER;
    `,
  },
  {
    version: 7,
    description:
      "API credentials (src/station/auth): named tokens with a role (admin, operator, viewer), host credentials (role host, one per host), " +
      "one-time join tokens; only the SHA-256 digest of each secret is kept",
    sql: `
      CREATE TABLE tokens (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        role TEXT NOT NULL,
        host TEXT,
        digest BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        used_at INTEGER
      ) WITHOUT ROWID;
    `,
  },
  {
    version: 8,
    description: "unit identities: each enrolled unit's id and its own secret (issue 7; src/station/unit_identities.ts)",
    sql: `
      CREATE TABLE unit_identities (
        name TEXT PRIMARY KEY,
        unit_id TEXT NOT NULL,
        epoch INTEGER NOT NULL,
        secret BLOB NOT NULL,
        next_secret BLOB,
        confirmed INTEGER NOT NULL DEFAULT 0,
        enrolled_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
      ) WITHOUT ROWID;
    `,
  },
  {
    version: 9,
    description: "NBD over TLS: each unit's TLS mode as it last said, each host's key epoch (ipsan hosts rotate-key)",
    sql: `
      ALTER TABLE units ADD COLUMN nbd_tls TEXT;
      ALTER TABLE hosts ADD COLUMN key_epoch INTEGER NOT NULL DEFAULT 0;
    `,
  },
  {
    version: 10,
    description:
      "tasks (src/station/tasks): every state-changing operation with its state, progress, starter, result or error; " +
      "finished ones kept up to TASKS_HISTORY_MAX; ones a restart interrupted are finished as failed at the next start",
    sql: `
      CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        target_type TEXT NOT NULL,
        target_id TEXT NOT NULL,
        objects TEXT NOT NULL,
        progress TEXT,
        started_by TEXT NOT NULL,
        role TEXT NOT NULL,
        cancellable INTEGER NOT NULL,
        params TEXT,
        result_status INTEGER,
        result TEXT,
        error TEXT,
        message TEXT,
        created_at INTEGER NOT NULL,
        started_at INTEGER,
        finished_at INTEGER
      );
      CREATE INDEX tasks_unfinished ON tasks (state) WHERE finished_at IS NULL;
    `,
  },
  {
    version: 11,
    description:
      "iSCSI (issue 10): each host's initiator name (IQN), each unit's iSCSI portal as its info last said, " +
      "each assignment's protocol (nbd for every assignment made before)",
    sql: `
      ALTER TABLE hosts ADD COLUMN iqn TEXT;
      ALTER TABLE units ADD COLUMN iscsi_host TEXT;
      ALTER TABLE units ADD COLUMN iscsi_port INTEGER;
      ALTER TABLE assignments ADD COLUMN protocol TEXT NOT NULL DEFAULT 'nbd';
    `,
  },
];

export function schemaVersion(db: Db): number {
  const row = db.prepare("SELECT max(version) AS version FROM schema_version").get() as { version: number | null };
  return row.version ?? 0;
}

/** Applies every migration newer than the database; refuses a database from a newer station. */
export function migrate(db: Db, migrations: readonly Migration[] = MIGRATIONS): { from: number; to: number } {
  db.exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)");
  const from = schemaVersion(db);
  const latest = migrations.at(-1)?.version ?? 0;
  if (from > latest) {
    throw new IpsanError(
      "CONFLICT",
      `station database schema version ${from} is newer than this station understands (${latest}): upgrade ipsan`,
    );
  }
  for (const migration of migrations) {
    if (migration.version <= from) continue;
    db.transaction(() => {
      db.exec(migration.sql);
      db.prepare("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)").run(migration.version, Date.now());
    })();
  }
  return { from, to: Math.max(from, latest) };
}

/**
 * WAL pages after which the station's own connection checkpoints (a backstop:
 * normally the checkpoint worker has done it long before).
 */
export const WAL_AUTOCHECKPOINT_PAGES_BACKSTOP = 50_000;
export const CHECKPOINT_INTERVAL_MS = 1_000;

export function openDatabase(path: string, options: { checkpointInWorker?: boolean } = {}): Db {
  const db = new Database(path, { timeout: DB_BUSY_TIMEOUT_MS });
  db.pragma("journal_mode = WAL");
  db.pragma("synchronous = FULL");
  db.pragma("foreign_keys = ON");
  // With the worker, checkpoints (and their fsyncs) happen off the event loop.
  if (options.checkpointInWorker === true) db.pragma(`wal_autocheckpoint = ${WAL_AUTOCHECKPOINT_PAGES_BACKSTOP}`);
  migrate(db);
  return db;
}

/** Starts the checkpoint worker (checkpoint_worker.ts) on the database at `path`. */
export function startCheckpointer(path: string, onError: (message: string) => void): { stop(): Promise<void> } {
  const worker = new Worker(new URL("./checkpoint_worker.js", import.meta.url), {
    workerData: { path, intervalMs: CHECKPOINT_INTERVAL_MS, busyTimeoutMs: DB_BUSY_TIMEOUT_MS },
  });
  worker.unref();
  worker.on("message", (message: { kind: string; message?: string }) => {
    if (message.kind === "error") onError(message.message ?? "checkpoint failed");
  });
  worker.on("error", (error) => onError(error.message));
  return {
    async stop() {
      worker.ref(); // keep the process alive until the worker has closed its connection
      const exited = new Promise<void>((resolve) => worker.once("exit", () => resolve()));
      worker.postMessage({ stop: true });
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([exited, new Promise<void>((resolve) => (timer = setTimeout(resolve, 2_000)))]);
      clearTimeout(timer);
      await worker.terminate();
    },
  };
}
