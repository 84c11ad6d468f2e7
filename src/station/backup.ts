// ipsan station backup DEST --data DIR / ipsan station restore BACKUP --data DIR
// (issue 9, ADR 0016). A backup is a directory:
//
//   DEST/station.db        the database, copied with SQLite's online backup API
//                          (a consistent snapshot, WAL included, while the station writes)
//   DEST/admin.token, cluster.key, host-keys.secret   the station's secrets
//   DEST/audit.log         the audit log up to its last complete line
//   DEST/manifest.json     format, ipsan version, schema version, each file's bytes and SHA-256
//
// The command reads the data directory itself (no API call): SQLite's locks
// make the database copy safe while the station runs, and the other files are
// written once (the secrets, replaced atomically by rotation) or appended to
// (the audit log). It is written to DEST.partial-PID and renamed to DEST when
// complete, so a DEST that exists is a whole backup.
//
// Restore checks the manifest, every checksum, the database's integrity and
// schema version (a newer schema than this ipsan knows is refused: upgrade
// first), then writes the files into the data directory (empty, or --force),
// removing a stale station.db-wal / -shm that would otherwise be replayed
// over the restored database.

import { createHash, randomBytes } from "node:crypto";
import { createReadStream, promises as fs } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import Database from "better-sqlite3";
import { CLUSTER_KEY_FILE_NAME } from "../discovery/keys.ts";
import { IpsanError, UsageError, errorMessage } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { fsyncPath } from "../util/secret_file.ts";
import { AUDIT_FILE_NAME } from "./auth/audit.ts";
import { DB_BUSY_TIMEOUT_MS, MIGRATIONS, schemaVersion } from "./db.ts";
import { HOST_KEYS_SECRET_FILE_NAME } from "./host_keys.ts";

export const BACKUP_FORMAT = "ipsan-station-backup";
export const BACKUP_FORMAT_VERSION = 1;
export const MANIFEST_FILE_NAME = "manifest.json";
/** A manifest larger than this is not one of ours. */
export const MANIFEST_BYTES_MAX = 64 * 1024;
/** The database file's name in the data directory and in a backup (DATABASE_FILE_NAME in main.ts). */
const DATABASE = "station.db";
const ADMIN_TOKEN = "admin.token";
/** Secrets: copied whole, required. */
const SECRET_FILES = [ADMIN_TOKEN, CLUSTER_KEY_FILE_NAME, HOST_KEYS_SECRET_FILE_NAME] as const;
/** Every name a backup may hold (besides the manifest). */
export const BACKUP_FILES = [DATABASE, ...SECRET_FILES, AUDIT_FILE_NAME] as const;
/** How long a backup of a busy database may keep restarting before it gives up. */
export const BACKUP_TIMEOUT_MS = 60_000;

export interface ManifestFile {
  readonly name: string;
  readonly bytes: number;
  readonly sha256: string;
}

export interface BackupManifest {
  readonly format: typeof BACKUP_FORMAT;
  readonly formatVersion: number;
  readonly ipsanVersion: string;
  readonly createdAt: string;
  readonly sourceDataDir: string;
  readonly schemaVersion: number;
  readonly files: readonly ManifestFile[];
}

export const BACKUP_USAGE = `usage: ipsan station backup DEST --data DIR
       ipsan station restore BACKUP --data DIR [--force]

  backup   copies the station's state (DIR: the station's --data) into the new directory DEST while
           the station runs: station.db through SQLite's online backup API, admin.token, cluster.key,
           host-keys.secret, audit.log, and manifest.json (versions, schema, SHA-256 of each file).
           TLS files (--tls-cert, --tls-key) live outside DIR: back them up with /etc/ipsan.
  restore  checks BACKUP (checksums, database integrity, schema not newer than this ipsan) and writes
           it into DIR, which must be empty or absent unless --force (then its station files are
           replaced). Stop the station that uses DIR first; start it on DIR afterwards.
  --data-dir DIR is accepted for --data. --json prints {"path", and the manifest's fields} instead of a sentence.
`;

/** Size and SHA-256 of a file, read as a stream (a database may be large; a hostile backup's files, any size). */
async function hashFile(path: string): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  let bytes = 0;
  for await (const chunk of createReadStream(path)) {
    bytes += (chunk as Buffer).length;
    hash.update(chunk as Buffer);
  }
  return { bytes, sha256: hash.digest("hex") };
}

async function writeFileSynced(path: string, bytes: Buffer | string, mode: number): Promise<void> {
  const handle = await fs.open(path, "wx", mode);
  try {
    await handle.writeFile(bytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function dataFlag(values: { data?: string | undefined; "data-dir"?: string | undefined }, usage: string): string {
  const data = values.data ?? values["data-dir"];
  if (data === undefined || data === "") throw new UsageError(`--data DIR is required\n${usage}`);
  if (values.data !== undefined && values["data-dir"] !== undefined) throw new UsageError("--data and --data-dir are the same flag: give one");
  return resolve(data);
}

/** The station's version, from package.json (as `ipsan --version`). */
async function ipsanVersion(): Promise<string> {
  return (await import("../cli.ts")).packageVersion();
}

/**
 * Copies the database at `source` into the new file `dest` with SQLite's
 * online backup API: what a committed transaction wrote is in the copy whether
 * it sits in the database file or still in the WAL. Returns the copy's schema version.
 */
export async function backupDatabase(source: string, dest: string): Promise<number> {
  // Created 0600 first: SQLite would make it with the umask's mode (0644), and it holds token digests and unit secrets.
  await (await fs.open(dest, "wx", 0o600)).close();
  const db = new Database(source, { fileMustExist: true, timeout: DB_BUSY_TIMEOUT_MS });
  try {
    const started = Date.now();
    // All remaining pages in the next step: a step that sees the source changed restarts,
    // so few large steps finish under a steady write load where many small ones might not.
    await db.backup(dest, {
      progress: () => {
        if (Date.now() - started > BACKUP_TIMEOUT_MS) throw new IpsanError("UNAVAILABLE", `backup of ${source} did not finish within ${BACKUP_TIMEOUT_MS} ms`);
        return 1_000_000;
      },
    });
  } finally {
    db.close();
  }
  const copy = new Database(dest, { fileMustExist: true });
  try {
    // The copy is a standalone file: no WAL to carry around.
    copy.pragma("journal_mode = DELETE");
    checkIntegrity(copy, dest);
    return schemaVersion(copy);
  } finally {
    copy.close();
  }
}

function checkIntegrity(db: Database.Database, path: string): void {
  const rows = db.pragma("integrity_check") as { integrity_check: string }[];
  const problems = rows.map((row) => row.integrity_check).filter((text) => text !== "ok");
  if (problems.length > 0) throw new IpsanError("CORRUPT", `${path}: SQLite integrity check failed: ${problems.slice(0, 3).join("; ")}`);
}

/** The audit log up to its last complete line (an append in flight is left out). */
async function readAuditLog(path: string): Promise<Buffer | undefined> {
  let bytes: Buffer;
  try {
    bytes = await fs.readFile(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw error;
  }
  return bytes.subarray(0, bytes.lastIndexOf(0x0a) + 1);
}

export async function backupStation(dataDir: string, dest: string): Promise<BackupManifest> {
  const database = join(dataDir, DATABASE);
  try {
    await fs.access(database);
  } catch {
    throw new IpsanError("NOT_FOUND", `${database} does not exist: --data must name the station's data directory (the --data of "ipsan station")`);
  }
  try {
    await fs.lstat(dest);
    throw new IpsanError("ALREADY_EXISTS", `${dest} exists: a backup goes into a new directory (choose another name or remove it)`);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
  const partial = join(dirname(dest), `.${basename(dest)}.partial-${process.pid}-${randomBytes(3).toString("hex")}`);
  await fs.mkdir(partial, { mode: 0o700 });
  try {
    const files: ManifestFile[] = [];
    const add = async (name: string): Promise<void> => {
      files.push({ name, ...(await hashFile(join(partial, name))) });
    };
    // Secrets first: a backup never holds a database newer than its keys.
    for (const name of SECRET_FILES) {
      let bytes: Buffer;
      try {
        bytes = await fs.readFile(join(dataDir, name));
      } catch (error) {
        throw new IpsanError("NOT_FOUND", `cannot read ${join(dataDir, name)}: ${errorMessage(error)} (is ${dataDir} a station's data directory, readable by this user?)`);
      }
      await writeFileSynced(join(partial, name), bytes, 0o600);
      await add(name);
    }
    const version = await backupDatabase(database, join(partial, DATABASE));
    await fsyncPath(join(partial, DATABASE));
    await add(DATABASE);
    const audit = await readAuditLog(join(dataDir, AUDIT_FILE_NAME));
    if (audit !== undefined) {
      await writeFileSynced(join(partial, AUDIT_FILE_NAME), audit, 0o600);
      await add(AUDIT_FILE_NAME);
    }
    const manifest: BackupManifest = {
      format: BACKUP_FORMAT,
      formatVersion: BACKUP_FORMAT_VERSION,
      ipsanVersion: await ipsanVersion(),
      createdAt: new Date().toISOString(),
      sourceDataDir: dataDir,
      schemaVersion: version,
      files,
    };
    await writeFileSynced(join(partial, MANIFEST_FILE_NAME), `${JSON.stringify(manifest, null, 2)}\n`, 0o600);
    await fsyncPath(partial);
    await fs.rename(partial, dest);
    await fsyncPath(dirname(dest));
    return manifest;
  } catch (error) {
    await fs.rm(partial, { recursive: true, force: true });
    throw error;
  }
}

function corrupt(backup: string, why: string): IpsanError {
  return new IpsanError("CORRUPT", `backup ${backup} is not usable: ${why}; nothing was restored (use another backup)`);
}

/** Reads and checks BACKUP's manifest and every file it lists; returns the manifest. */
export async function verifyBackup(backup: string): Promise<BackupManifest> {
  let text: string;
  try {
    const handle = await fs.open(join(backup, MANIFEST_FILE_NAME), "r");
    try {
      const { size } = await handle.stat();
      if (size > MANIFEST_BYTES_MAX) throw corrupt(backup, `${MANIFEST_FILE_NAME} is ${size} bytes (at most ${MANIFEST_BYTES_MAX})`);
      text = (await handle.readFile()).toString("utf8");
    } finally {
      await handle.close();
    }
  } catch (error) {
    if (error instanceof IpsanError) throw error;
    throw corrupt(backup, `cannot read ${MANIFEST_FILE_NAME}: ${errorMessage(error)} (is it a directory made by "ipsan station backup"?)`);
  }
  let manifest: BackupManifest;
  try {
    manifest = JSON.parse(text) as BackupManifest;
  } catch (error) {
    throw corrupt(backup, `${MANIFEST_FILE_NAME} is not JSON: ${errorMessage(error)}`);
  }
  if (manifest === null || typeof manifest !== "object" || manifest.format !== BACKUP_FORMAT) throw corrupt(backup, `${MANIFEST_FILE_NAME} is not an ipsan station backup manifest`);
  if (manifest.formatVersion !== BACKUP_FORMAT_VERSION) {
    throw new IpsanError("NOT_SUPPORTED", `backup ${backup} has format version ${String(manifest.formatVersion)}; this ipsan reads version ${BACKUP_FORMAT_VERSION}: restore it with the ipsan that made it (${String(manifest.ipsanVersion)}) or newer`);
  }
  const latest = MIGRATIONS.at(-1)?.version ?? 0;
  if (!Number.isSafeInteger(manifest.schemaVersion)) throw corrupt(backup, "the manifest has no schema version");
  if (manifest.schemaVersion > latest) {
    throw new IpsanError(
      "NOT_SUPPORTED",
      `backup ${backup} holds station schema version ${manifest.schemaVersion}, newer than this ipsan knows (${latest}); made by ipsan ${String(manifest.ipsanVersion)}: upgrade ipsan first, then restore`,
    );
  }
  if (!Array.isArray(manifest.files)) throw corrupt(backup, "the manifest lists no files");
  const names = new Set<string>();
  for (const file of manifest.files) {
    if (!(BACKUP_FILES as readonly string[]).includes(file?.name)) throw corrupt(backup, `the manifest lists an unknown file ${JSON.stringify(file?.name)}`);
    if (names.has(file.name)) throw corrupt(backup, `the manifest lists ${file.name} twice`);
    names.add(file.name);
    let found: { bytes: number; sha256: string };
    try {
      const { size } = await fs.stat(join(backup, file.name));
      // A size that differs is refused before anything is read.
      found = size === file.bytes ? await hashFile(join(backup, file.name)) : { bytes: size, sha256: "" };
    } catch (error) {
      throw corrupt(backup, `cannot read ${file.name}: ${errorMessage(error)}`);
    }
    if (found.bytes !== file.bytes || found.sha256 !== file.sha256) {
      throw corrupt(backup, `${file.name} does not match its checksum in ${MANIFEST_FILE_NAME} (${found.bytes} bytes, expected ${String(file.bytes)})`);
    }
  }
  for (const name of [DATABASE, ...SECRET_FILES]) if (!names.has(name)) throw corrupt(backup, `the manifest does not list ${name}`);
  const db = new Database(join(backup, DATABASE), { readonly: true, fileMustExist: true });
  try {
    checkIntegrity(db, join(backup, DATABASE));
    const version = schemaVersion(db);
    if (version !== manifest.schemaVersion) throw corrupt(backup, `station.db has schema version ${version}, the manifest says ${manifest.schemaVersion}`);
  } catch (error) {
    if (error instanceof IpsanError) throw error;
    throw corrupt(backup, `station.db: ${errorMessage(error)}`);
  } finally {
    db.close();
  }
  return manifest;
}

/** Writes a verified backup into `dataDir` (empty or absent unless `force`). */
export async function restoreStation(backup: string, dataDir: string, force: boolean): Promise<BackupManifest> {
  const manifest = await verifyBackup(backup);
  let entries: string[] = [];
  try {
    entries = await fs.readdir(dataDir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
  if (entries.length > 0 && !force) {
    throw new IpsanError(
      "ALREADY_EXISTS",
      `${dataDir} is not empty (${entries.slice(0, 5).join(", ")}${entries.length > 5 ? ", ..." : ""}): restore into an empty directory, or stop the station that uses it and add --force to replace its files`,
    );
  }
  await fs.mkdir(dataDir, { recursive: true, mode: 0o700 });
  // A WAL left by the old database would be replayed over the restored one.
  for (const stale of [`${DATABASE}-wal`, `${DATABASE}-shm`, `${DATABASE}-journal`, AUDIT_FILE_NAME]) {
    await fs.rm(join(dataDir, stale), { force: true });
  }
  for (const file of manifest.files) {
    const temporary = join(dataDir, `.${file.name}.restore-${process.pid}.tmp`);
    await fs.rm(temporary, { force: true });
    await fs.copyFile(join(backup, file.name), temporary, fs.constants.COPYFILE_EXCL);
    await fs.chmod(temporary, 0o600);
    await fsyncPath(temporary);
    await fs.rename(temporary, join(dataDir, file.name));
  }
  await fsyncPath(dataDir);
  return manifest;
}

export async function backupMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { data: { type: "string" }, "data-dir": { type: "string" }, json: { type: "boolean" }, help: { type: "boolean" } }, true);
  if (values.help === true) {
    process.stdout.write(BACKUP_USAGE);
    return 0;
  }
  if (positionals.length !== 1) throw new UsageError(`expected one DEST (a new directory)\n${BACKUP_USAGE}`);
  const dataDir = dataFlag(values, BACKUP_USAGE);
  const dest = resolve(positionals[0] as string);
  const manifest = await backupStation(dataDir, dest);
  if (values.json === true) process.stdout.write(`${JSON.stringify({ path: dest, ...manifest })}\n`);
  else process.stdout.write(`backup written to ${dest} (schema version ${manifest.schemaVersion}, ${manifest.files.length} files, ipsan ${manifest.ipsanVersion})\n`);
  return 0;
}

export async function restoreMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(
    argv,
    { data: { type: "string" }, "data-dir": { type: "string" }, force: { type: "boolean" }, json: { type: "boolean" }, help: { type: "boolean" } },
    true,
  );
  if (values.help === true) {
    process.stdout.write(BACKUP_USAGE);
    return 0;
  }
  if (positionals.length !== 1) throw new UsageError(`expected one BACKUP (a directory made by "ipsan station backup")\n${BACKUP_USAGE}`);
  const dataDir = dataFlag(values, BACKUP_USAGE);
  const backup = resolve(positionals[0] as string);
  const manifest = await restoreStation(backup, dataDir, values.force === true);
  if (values.json === true) process.stdout.write(`${JSON.stringify({ path: dataDir, ...manifest })}\n`);
  else process.stdout.write(`restored ${backup} (made ${manifest.createdAt}, schema version ${manifest.schemaVersion}) into ${dataDir}; start the station with --data ${dataDir}\n`);
  return 0;
}
