// The host's own record of what it has attached, so that `detach` can undo an
// attach made by an earlier process and `agent` can re-attach after a restart.
// One JSON file per attachment under STATE_DIR/attachments/, written to a
// temporary file and renamed (a crash leaves the old record or the new one,
// never half of one). Reads are bounded and tolerate garbage: a record that
// does not parse is reported and skipped, never fatal.

import { mkdir, readFile, readdir, rename, rm, writeFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { writeSecretFileAtomic } from "../util/secret_file.ts";

const log = logger("host");

export const RECORD_BYTES_MAX = 64 * 1024;
export const RECORDS_MAX = 4096;
export const RECORD_VERSION = 1;
/** STATE_DIR/credential.json: the host's own station credential (`ipsan host register`), 0600. */
export const CREDENTIAL_FILE_NAME = "credential.json";
export const CREDENTIAL_BYTES_MAX = 16 * 1024;

/** What `ipsan host register` stores: enough for request/attach/release/agent to need no station flags. */
export interface HostCredential {
  readonly version: 1;
  readonly station: string;
  readonly host: string;
  /** The host credential's secret (role host, this host only). */
  readonly token: string;
  /** The address the station registered for this host (the agent keeps it). */
  readonly address: string | null;
  /** --ca-file given at registration (absolute), for an https:// station. */
  readonly caFile: string | null;
}

/**
 * fuse: an nbdfuse file; kernel: /dev/nbdN; nbd: an NBD URI served on this
 * host (a mirror's engine), or, for a single copy, the unit's own URI;
 * iscsi: an iSCSI assignment, whose initiator (open-iscsi, libiscsi, qemu) is
 * the user's: nothing runs here, the record keeps where to log in.
 */
export const ATTACH_MODES = ["fuse", "kernel", "nbd", "iscsi"] as const;
export type AttachMode = (typeof ATTACH_MODES)[number];

/** The mirror engine a record started (`ipsan host engine`), with what it takes to start it again. */
export interface EngineRecord {
  readonly pid: number;
  /** --mirror: the assignment id. */
  readonly mirror: string;
  readonly export: string;
  /** --listen: "unix:/PATH" (under the state dir), or "127.0.0.1:0" when that path is too long for a socket. */
  readonly listen: string;
  /** What the engine printed in its ready line: the URI this host's clients use. */
  readonly uri: string;
  /** By position (the station's leg index); unit and volume are the station's names (absent in records from before leg replacement). */
  readonly legs: readonly EngineLegRecord[];
  /** --legs-file (under the state dir): the agent rewrites it when the station changes a leg, then sends SIGHUP. Absent in older records. */
  readonly legsFile?: string;
  /** --status-file: the legs' states and rebuild progress, which the agent reports to the station. */
  readonly statusFile?: string;
}

export interface EngineLegRecord {
  /** The engine's id of the leg (the leg's volume name). */
  readonly name: string;
  readonly uri: string;
  readonly unit?: string;
  readonly volume?: string;
}

/** Where an iSCSI attachment logs in (mode iscsi): the station's answer, and the CHAP secret file attach wrote. */
export interface IscsiAttachmentRecord {
  readonly portal: string;
  readonly target: string;
  readonly lun: number;
  /** null: a unit started with --insecure-plaintext (admits by address, no CHAP). */
  readonly chapUser: string | null;
  /** STATE_DIR/keys/UNIT.chap (0600), or null without CHAP. */
  readonly chapSecretFile: string | null;
}

/** "attached": should be kept attached (the agent re-attaches it); "detaching": being undone. */
export type AttachmentState = "attached" | "detaching";

export interface AttachmentRecord {
  readonly version: typeof RECORD_VERSION;
  readonly assignmentId: string;
  readonly station: string;
  readonly host: string;
  readonly unit: string;
  readonly volume: string;
  readonly export: string;
  readonly uri: string;
  readonly sizeBytes: number;
  readonly mode: AttachMode;
  /** The path a user reads and writes: the nbdfuse file or /dev/nbdN. */
  readonly path: string;
  /** nbdfuse: its process id and mount directory; kernel: the device. */
  readonly pid: number | null;
  readonly mountpoint: string | null;
  readonly device: string | null;
  readonly state: AttachmentState;
  readonly attachedAt: string;
  /** A mirror's engine (absent or null for a single copy). For mode nbd, `pid` is the engine's too. */
  readonly engine?: EngineRecord | null;
  /** Mode iscsi: where to log in (absent or null for NBD attachments). */
  readonly iscsi?: IscsiAttachmentRecord | null;
}

/** The protocol an attachment speaks: iscsi for mode iscsi, otherwise nbd. */
export function protocolOf(record: Pick<AttachmentRecord, "mode">): "nbd" | "iscsi" {
  return record.mode === "iscsi" ? "iscsi" : "nbd";
}

/** --state-dir, else $XDG_STATE_HOME/ipsan-host, else /var/lib/ipsan-host for root, else ~/.local/state/ipsan-host. */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env["XDG_STATE_HOME"];
  if (xdg !== undefined && xdg !== "") return join(xdg, "ipsan-host");
  if (process.getuid?.() === 0) return "/var/lib/ipsan-host";
  return join(homedir(), ".local", "state", "ipsan-host");
}

/** File-name-safe form of an assignment id (ids are the station's; never trust them as paths). */
export function recordKey(assignmentId: string): string {
  const safe = assignmentId.replace(/[^A-Za-z0-9_.-]/g, "_").slice(0, 100);
  return safe === "" || safe.startsWith(".") ? `_${safe}` : safe;
}

export class HostState {
  /** Always absolute: a relative --state-dir is resolved once, at start, so records, mount points and the detached processes started from them agree whatever their working directory (issue 9 item 9). */
  readonly dir: string;
  constructor(dir: string) {
    this.dir = resolve(dir);
  }

  get attachmentsDir(): string {
    return join(this.dir, "attachments");
  }

  mountDir(assignmentId: string): string {
    return join(this.dir, "mnt", recordKey(assignmentId));
  }

  logPath(assignmentId: string): string {
    return join(this.dir, "log", `${recordKey(assignmentId)}.log`);
  }

  engineLogPath(assignmentId: string): string {
    return join(this.dir, "log", `${recordKey(assignmentId)}.engine.log`);
  }

  /** A mirror engine's legs file (--legs-file). */
  legsFilePath(assignmentId: string): string {
    return join(this.dir, "run", `${recordKey(assignmentId)}.legs.json`);
  }

  /** A mirror engine's status file (--status-file). */
  statusFilePath(assignmentId: string): string {
    return join(this.dir, "run", `${recordKey(assignmentId)}.status.json`);
  }

  /** Where a mirror's engine listens. */
  socketPath(assignmentId: string): string {
    return join(this.dir, "run", `${recordKey(assignmentId)}.sock`);
  }

  get credentialPath(): string {
    return join(this.dir, CREDENTIAL_FILE_NAME);
  }

  /** Writes the credential 0600 (fsynced, renamed into place: never half a credential). */
  async writeCredential(credential: HostCredential): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o700 });
    await writeSecretFileAtomic(this.credentialPath, `${JSON.stringify(credential, null, 2)}\n`);
  }

  /** The stored credential; undefined when the host never registered here. A damaged file is an error that names it. */
  async readCredential(): Promise<HostCredential | undefined> {
    let bytes: Buffer;
    try {
      bytes = await readFile(this.credentialPath);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw new IpsanError("IO_ERROR", `host credential ${this.credentialPath}: ${errorMessage(error)}`);
    }
    const bad = (why: string): IpsanError => new IpsanError("CORRUPT", `host credential ${this.credentialPath}: ${why}; register again (ipsan host register)`);
    if (bytes.length > CREDENTIAL_BYTES_MAX) throw bad("too large");
    let value: Record<string, unknown>;
    try {
      value = JSON.parse(bytes.toString("utf8")) as Record<string, unknown>;
    } catch (error) {
      throw bad(`not JSON (${errorMessage(error)})`);
    }
    if (value === null || typeof value !== "object" || value["version"] !== 1) throw bad("not a version 1 credential");
    for (const key of ["station", "host", "token"]) if (typeof value[key] !== "string" || value[key] === "") throw bad(`${key} missing`);
    for (const key of ["address", "caFile"]) if (value[key] !== null && value[key] !== undefined && typeof value[key] !== "string") throw bad(`${key} is not a string`);
    return { version: 1, station: value["station"] as string, host: value["host"] as string, token: value["token"] as string, address: (value["address"] as string | undefined) ?? null, caFile: (value["caFile"] as string | undefined) ?? null };
  }

  async ensure(): Promise<void> {
    await mkdir(this.attachmentsDir, { recursive: true, mode: 0o700 });
    await mkdir(join(this.dir, "mnt"), { recursive: true, mode: 0o700 });
    await mkdir(join(this.dir, "log"), { recursive: true, mode: 0o700 });
    await mkdir(join(this.dir, "run"), { recursive: true, mode: 0o700 });
  }

  async write(record: AttachmentRecord): Promise<void> {
    await this.ensure();
    const path = join(this.attachmentsDir, `${recordKey(record.assignmentId)}.json`);
    const temporary = `${path}.tmp-${process.pid}`;
    await writeFile(temporary, `${JSON.stringify(record, null, 2)}\n`, { mode: 0o600 });
    await rename(temporary, path);
  }

  async remove(assignmentId: string): Promise<void> {
    await rm(join(this.attachmentsDir, `${recordKey(assignmentId)}.json`), { force: true });
  }

  async get(assignmentId: string): Promise<AttachmentRecord | undefined> {
    return this.#load(join(this.attachmentsDir, `${recordKey(assignmentId)}.json`));
  }

  async list(): Promise<AttachmentRecord[]> {
    let names: string[];
    try {
      names = await readdir(this.attachmentsDir);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw error;
    }
    const records: AttachmentRecord[] = [];
    for (const name of names.filter((n) => n.endsWith(".json")).sort().slice(0, RECORDS_MAX)) {
      const record = await this.#load(join(this.attachmentsDir, name));
      if (record !== undefined) records.push(record);
    }
    return records;
  }

  async #load(path: string): Promise<AttachmentRecord | undefined> {
    let text: Buffer;
    try {
      text = await readFile(path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw error;
    }
    if (text.length > RECORD_BYTES_MAX) {
      log.warn("attachment record too large, skipped", { path, bytes: text.length });
      return undefined;
    }
    const result = decodeRecord(text.toString("utf8"));
    if (result.kind === "invalid") {
      log.warn("attachment record unreadable, skipped", { path, reason: result.reason });
      return undefined;
    }
    return result.record;
  }
}

export type DecodedRecord = { kind: "record"; record: AttachmentRecord } | { kind: "invalid"; reason: string };

/** Pure: checks every field a later detach or re-attach relies on. */
export function decodeRecord(text: string): DecodedRecord {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return { kind: "invalid", reason: `not JSON: ${errorMessage(error)}` };
  }
  if (value === null || typeof value !== "object") return { kind: "invalid", reason: "not an object" };
  const r = value as Record<string, unknown>;
  if (r["version"] !== RECORD_VERSION) return { kind: "invalid", reason: `version=${String(r["version"])}` };
  for (const key of ["assignmentId", "station", "host", "unit", "volume", "export", "uri", "path", "attachedAt"]) {
    if (typeof r[key] !== "string") return { kind: "invalid", reason: `${key} is not a string` };
  }
  if (typeof r["sizeBytes"] !== "number") return { kind: "invalid", reason: "sizeBytes is not a number" };
  if (!ATTACH_MODES.includes(r["mode"] as AttachMode)) return { kind: "invalid", reason: `mode=${String(r["mode"])}` };
  if (r["state"] !== "attached" && r["state"] !== "detaching") return { kind: "invalid", reason: `state=${String(r["state"])}` };
  if (r["pid"] !== null && !(Number.isSafeInteger(r["pid"]) && (r["pid"] as number) > 0)) {
    return { kind: "invalid", reason: `pid=${String(r["pid"])}` };
  }
  for (const key of ["mountpoint", "device"]) {
    if (r[key] !== null && typeof r[key] !== "string") return { kind: "invalid", reason: `${key} is not a string` };
  }
  const engine = r["engine"];
  if (engine !== undefined && engine !== null) {
    const reason = engineProblem(engine);
    if (reason !== null) return { kind: "invalid", reason: `engine: ${reason}` };
  }
  const iscsi = r["iscsi"];
  if (r["mode"] === "iscsi" || (iscsi !== undefined && iscsi !== null)) {
    const reason = r["mode"] !== "iscsi" ? `mode ${String(r["mode"])} with iscsi` : iscsiProblem(iscsi);
    if (reason !== null) return { kind: "invalid", reason: `iscsi: ${reason}` };
  }
  return { kind: "record", record: value as AttachmentRecord };
}

function engineProblem(value: unknown): string | null {
  if (typeof value !== "object" || value === null) return "not an object";
  const e = value as Record<string, unknown>;
  if (!(Number.isSafeInteger(e["pid"]) && (e["pid"] as number) > 0)) return `pid=${String(e["pid"])}`;
  for (const key of ["mirror", "export", "listen", "uri"]) if (typeof e[key] !== "string") return `${key} is not a string`;
  for (const key of ["legsFile", "statusFile"]) if (e[key] !== undefined && typeof e[key] !== "string") return `${key} is not a string`;
  const legs = e["legs"];
  if (!Array.isArray(legs) || legs.length === 0) return "no legs";
  for (const leg of legs as unknown[]) {
    const l = leg as Record<string, unknown> | null;
    if (l === null || typeof l !== "object" || typeof l["name"] !== "string" || typeof l["uri"] !== "string") return "a leg without name or uri";
    for (const key of ["unit", "volume"]) if (l[key] !== undefined && typeof l[key] !== "string") return `a leg's ${key} is not a string`;
  }
  return null;
}

function iscsiProblem(value: unknown): string | null {
  if (typeof value !== "object" || value === null) return "not an object";
  const i = value as Record<string, unknown>;
  for (const key of ["portal", "target"]) if (typeof i[key] !== "string") return `${key} is not a string`;
  if (!(Number.isSafeInteger(i["lun"]) && (i["lun"] as number) >= 0)) return `lun=${String(i["lun"])}`;
  for (const key of ["chapUser", "chapSecretFile"]) if (i[key] !== null && typeof i[key] !== "string") return `${key} is not a string`;
  return null;
}

export function notAttached(what: string, stateDir: string): IpsanError {
  return new IpsanError("NOT_FOUND", `${what} is not attached on this host (state dir ${stateDir})`);
}
