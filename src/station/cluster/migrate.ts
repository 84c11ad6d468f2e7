// `ipsan station migrate`: a single station's state into etcd, and back
// (issue 11; docs/OPERATIONS.md "Several stations").
//
//   ipsan station migrate --from-sqlite DIR --etcd ENDPOINTS
//       DIR/station.db (read through SQLite's online backup, so a consistent
//       copy even if something else has it open) becomes the first snapshot
//       in etcd; DIR's admin.token, cluster.key and host-keys.secret become
//       the cluster's. Refused when etcd already holds ipsan state.
//   ipsan station migrate --from-etcd ENDPOINTS --to-sqlite DIR [--force]
//       the newest snapshot plus the log, written to DIR/station.db, with the
//       cluster's secrets; DIR then runs as a single station. Refused when
//       DIR has a database, unless --force.
// Both verify what they wrote: every table of the destination is compared
// with the source, row for row (a digest per table), and the command prints
// the counts. Stop the stations first: a station that writes after the
// copy was taken is not in it.

import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import Database from "better-sqlite3";
import { CLUSTER_KEY_FILE_NAME } from "../../discovery/keys.ts";
import { IpsanError, UsageError, errorMessage } from "../../util/errors.ts";
import { parseFlags } from "../../util/flags.ts";
import { openDatabase, schemaVersion, type Db } from "../db.ts";
import { HOST_KEYS_SECRET_FILE_NAME } from "../host_keys.ts";
import { EtcdState, parseEndpoints } from "./etcd_log.ts";
import { buildLocalCopy, SCHEMA_VERSION } from "./node.ts";
import { CLUSTER_STATE_TABLE, appliedSeq } from "./recorder.ts";

export const MIGRATE_USAGE = `usage: ipsan station migrate --from-sqlite DIR --etcd ENDPOINTS
       ipsan station migrate --from-etcd ENDPOINTS --to-sqlite DIR [--force]

  --from-sqlite DIR   a single station's data directory (stop the station first)
  --etcd ENDPOINTS    the etcd cluster to move it into (comma-separated client URLs); it must hold no ipsan state
  --from-etcd ENDPOINTS
                      the etcd cluster the stations keep their state in (stop the stations first)
  --to-sqlite DIR     the data directory to write (station.db and the secrets); --force replaces a database there
`;

const DATABASE_FILE_NAME = "station.db";
const ADMIN_TOKEN_FILE_NAME = "admin.token";
const SECRET_FILES = [ADMIN_TOKEN_FILE_NAME, CLUSTER_KEY_FILE_NAME, HOST_KEYS_SECRET_FILE_NAME] as const;
/** The tables compared by digest (every table but the local bookkeeping ones). */
const LOCAL_TABLES = new Set([CLUSTER_STATE_TABLE, "schema_version"]);

/** A digest of every table's rows (sorted), by table: what "identical" means for a migration. */
export function tableDigests(db: Db): Record<string, { rows: number; sha256: string }> {
  const tables = db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").all() as { name: string }[];
  const out: Record<string, { rows: number; sha256: string }> = {};
  for (const { name } of tables) {
    if (LOCAL_TABLES.has(name)) continue;
    const rows = (db.prepare(`SELECT * FROM "${name}"`).raw().all() as unknown[][]).map((row) =>
      JSON.stringify(row, (_k, v: unknown) => (typeof v === "bigint" ? v.toString() : Buffer.isBuffer(v) ? v.toString("base64") : v)),
    );
    rows.sort();
    out[name] = { rows: rows.length, sha256: createHash("sha256").update(rows.join("\n")).digest("hex") };
  }
  return out;
}

function compare(source: Record<string, { rows: number; sha256: string }>, copy: Record<string, { rows: number; sha256: string }>): string[] {
  const problems: string[] = [];
  for (const name of new Set([...Object.keys(source), ...Object.keys(copy)])) {
    const a = source[name];
    const b = copy[name];
    if (a === undefined || b === undefined) problems.push(`table ${name}: only in the ${a === undefined ? "copy" : "source"}`);
    else if (a.sha256 !== b.sha256) problems.push(`table ${name}: ${a.rows} rows in the source, ${b.rows} in the copy, contents differ`);
  }
  return problems;
}

function summary(digests: Record<string, { rows: number }>): string {
  return ["units", "volumes", "hosts", "assignments", "tokens", "events"].map((t) => `${digests[t]?.rows ?? 0} ${t}`).join(", ");
}

export async function migrateMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(
    argv,
    { "from-sqlite": { type: "string" }, etcd: { type: "string" }, "from-etcd": { type: "string" }, "to-sqlite": { type: "string" }, force: { type: "boolean" }, help: { type: "boolean" } },
    true,
  );
  if (values.help === true) {
    process.stdout.write(MIGRATE_USAGE);
    return 0;
  }
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"\n${MIGRATE_USAGE}`);
  if (values["from-sqlite"] !== undefined && values.etcd !== undefined && values["from-etcd"] === undefined && values["to-sqlite"] === undefined) {
    return intoEtcd(resolve(values["from-sqlite"]), parseEndpoints(values.etcd));
  }
  if (values["from-etcd"] !== undefined && values["to-sqlite"] !== undefined && values["from-sqlite"] === undefined && values.etcd === undefined) {
    return intoSqlite(parseEndpoints(values["from-etcd"], "--from-etcd"), resolve(values["to-sqlite"]), values.force === true);
  }
  throw new UsageError(`give --from-sqlite DIR --etcd ENDPOINTS, or --from-etcd ENDPOINTS --to-sqlite DIR\n${MIGRATE_USAGE}`);
}

async function intoEtcd(dir: string, endpoints: string[]): Promise<number> {
  const source = join(dir, DATABASE_FILE_NAME);
  await fs.access(source).catch(() => {
    throw new IpsanError("NOT_FOUND", `--from-sqlite ${dir}: no ${DATABASE_FILE_NAME} there (the station's --data directory)`);
  });
  const secrets = new Map<string, Buffer>();
  for (const name of SECRET_FILES) {
    try {
      secrets.set(name, await fs.readFile(join(dir, name)));
    } catch (error) {
      throw new IpsanError("NOT_FOUND", `--from-sqlite ${dir}: cannot read ${name}: ${errorMessage(error)}`);
    }
  }
  const etcd = new EtcdState(endpoints);
  const scratch = `${source}.migrate-${process.pid}`;
  try {
    if (await etcd.hasState()) {
      throw new IpsanError("CONFLICT", `etcd ${endpoints.join(",")} already holds ipsan state (prefix ${etcd.prefix}): nothing was changed; migrate into an empty etcd`);
    }
    // A consistent copy through SQLite's online backup, upgraded to this version's schema.
    const live = new Database(source, { readonly: true, fileMustExist: true });
    try {
      await live.backup(scratch);
    } finally {
      live.close();
    }
    const db = openDatabase(scratch);
    let digests: Record<string, { rows: number; sha256: string }>;
    let image: Buffer;
    try {
      if (schemaVersion(db) !== SCHEMA_VERSION) throw new IpsanError("CONFLICT", `${source}: schema ${schemaVersion(db)} is not this version's ${SCHEMA_VERSION}`);
      appliedSeq(db);
      digests = tableDigests(db);
      image = db.serialize();
    } finally {
      db.close();
    }
    for (const [name, bytes] of secrets) {
      const stored = await etcd.sharedSecret(name, () => bytes);
      if (!stored.equals(bytes)) throw new IpsanError("CONFLICT", `etcd already had another ${name}: another station was started on this etcd meanwhile`);
    }
    if ((await etcd.writeSnapshot(image, 0, SCHEMA_VERSION, null)) === null) {
      throw new IpsanError("CONFLICT", "etcd received a snapshot from elsewhere meanwhile (a station started on it?): check with etcdctl and retry into an empty etcd");
    }
    // Verify: what etcd now holds, rebuilt as a station would, equals the source.
    const check = `${source}.verify-${process.pid}`;
    const { db: copy } = await buildLocalCopy(etcd, check);
    try {
      const problems = compare(digests, tableDigests(copy));
      if (problems.length > 0) throw new IpsanError("CORRUPT", `etcd's copy differs from ${source}: ${problems.join("; ")}`);
    } finally {
      copy.close();
      for (const suffix of ["", "-wal", "-shm"]) await fs.rm(check + suffix, { force: true });
    }
    process.stdout.write(`migrated ${source} into etcd ${endpoints.join(",")} (${summary(digests)}); verified table by table\n`);
    process.stdout.write(`start the stations with: ipsan station --data DIR --etcd ${endpoints.join(",")}\n`);
    return 0;
  } finally {
    for (const suffix of ["", "-wal", "-shm"]) await fs.rm(scratch + suffix, { force: true });
    etcd.close();
  }
}

async function intoSqlite(endpoints: string[], dir: string, force: boolean): Promise<number> {
  const target = join(dir, DATABASE_FILE_NAME);
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const exists = await fs.access(target).then(() => true, () => false);
  if (exists && !force) throw new IpsanError("ALREADY_EXISTS", `--to-sqlite ${dir}: ${DATABASE_FILE_NAME} exists; nothing was changed (--force replaces it)`);
  const etcd = new EtcdState(endpoints);
  const scratch = `${target}.migrate-${process.pid}`;
  try {
    if ((await etcd.snapshotManifest()) === null) throw new IpsanError("NOT_FOUND", `etcd ${endpoints.join(",")} holds no ipsan state (prefix ${etcd.prefix})`);
    const { db } = await buildLocalCopy(etcd, scratch);
    let digests: Record<string, { rows: number; sha256: string }>;
    try {
      digests = tableDigests(db);
      db.exec(`DROP TABLE ${CLUSTER_STATE_TABLE}`);
      db.pragma("wal_checkpoint(TRUNCATE)");
    } finally {
      db.close();
    }
    for (const suffix of ["-wal", "-shm"]) await fs.rm(target + suffix, { force: true });
    await fs.rename(scratch, target);
    for (const suffix of ["-wal", "-shm"]) await fs.rm(scratch + suffix, { force: true });
    for (const name of SECRET_FILES) {
      const bytes = await etcd.secret(name);
      if (bytes === null) throw new IpsanError("NOT_FOUND", `etcd holds no ${name}`);
      await fs.writeFile(join(dir, `${name}.tmp`), bytes, { mode: 0o600 });
      await fs.rename(join(dir, `${name}.tmp`), join(dir, name));
    }
    const written = openDatabase(target);
    try {
      const problems = compare(digests, tableDigests(written));
      if (problems.length > 0) throw new IpsanError("CORRUPT", `${target} differs from etcd's copy: ${problems.join("; ")}`);
    } finally {
      written.close();
    }
    process.stdout.write(`migrated etcd ${endpoints.join(",")} into ${target} (${summary(digests)}); verified table by table\n`);
    process.stdout.write(`start the station with: ipsan station --data ${dir}\n`);
    return 0;
  } finally {
    for (const suffix of ["", "-wal", "-shm"]) await fs.rm(scratch + suffix, { force: true });
    etcd.close();
  }
}
