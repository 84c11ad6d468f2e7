// The station's audit log, DATA/audit.log (docs/security.md "Audit log"):
// every change made through the API (every method but GET and HEAD) and every
// refused credential (401, 403), one JSON object per line:
//
//   {"seq":1,"time":"...","actor":"ops","role":"operator",
//    "action":"POST /api/v1/volumes/:unit/:name/grow","ids":{"unit":"u1","name":"v1"},
//    "from":"127.0.0.1","status":200,"prev":"<64 hex>","hash":"<64 hex>"}
//
// `hash` is SHA-256 over the entry's other fields (a fixed order, see
// entryHash) including `prev`, the previous line's hash (64 zeros for the
// first): editing, dropping, reordering or inserting a line breaks the chain
// at that line, and `verifyAudit` names it. No request body is logged, so no
// secret can reach the file.
//
// The file is the station's own: opened O_APPEND (0600), each line written
// and fdatasync'd before the API answer is sent. Appends that arrive while a
// write is on its way go out together in the next write, with one fdatasync
// (group commit), in arrival order. If a write or fdatasync fails, the log
// takes no more entries (every later change is answered 500) until the
// station restarts and checks the tail: the chain on disk is never guessed at.
// On start the station checks the tail: a last line without its newline is
// what a crash in the middle of an append leaves (the request it recorded was
// never answered); it is cut off and an "audit.torn-tail-dropped" entry says
// how many bytes went. A complete last line whose hash does not match its
// fields is tampering, not a crash: the station refuses to start and says so.

import { createHash } from "node:crypto";
import { createReadStream, promises as fs } from "node:fs";
import { createInterface } from "node:readline";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { realClock, type TimeSource } from "../../util/clock.ts";

/** The time each entry is stamped with (injected in tests). */
export type Clock = TimeSource;
const SYSTEM_CLOCK: Clock = realClock;

const log = logger("station-audit");

export const AUDIT_FILE_NAME = "audit.log";
export const GENESIS_HASH = "0".repeat(64);
/** Bytes of the file's end read at start to find and check the last entry. */
export const AUDIT_TAIL_BYTES = 256 * 1024;
/** A line longer than this is not an entry (verify stops there). */
export const AUDIT_LINE_BYTES_MAX = 64 * 1024;
export const AUDIT_LIST_LIMIT_DEFAULT = 100;
export const AUDIT_LIST_LIMIT_MAX = 10_000;

export interface AuditFields {
  readonly actor: string;
  readonly role: string;
  readonly action: string;
  readonly ids: Readonly<Record<string, string>>;
  readonly from: string;
  readonly status: number;
}

export interface AuditEntry extends AuditFields {
  readonly seq: number;
  readonly time: string;
  readonly prev: string;
  readonly hash: string;
}

export function entryHash(e: Omit<AuditEntry, "hash">): string {
  return createHash("sha256").update(JSON.stringify([e.seq, e.time, e.actor, e.role, e.action, e.ids, e.from, e.status, e.prev])).digest("hex");
}

function line(e: AuditEntry): string {
  return `${JSON.stringify({ seq: e.seq, time: e.time, actor: e.actor, role: e.role, action: e.action, ids: e.ids, from: e.from, status: e.status, prev: e.prev, hash: e.hash })}\n`;
}

/** Parses one line into an entry, or says what is wrong with it. */
export function parseEntry(text: string): AuditEntry | string {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return `not JSON (${errorMessage(error)})`;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) return "not a JSON object";
  const e = value as Record<string, unknown>;
  if (!Number.isSafeInteger(e["seq"])) return "seq is not a whole number";
  for (const key of ["time", "actor", "role", "action", "from", "prev", "hash"]) if (typeof e[key] !== "string") return `${key} is not a string`;
  if (!Number.isSafeInteger(e["status"])) return "status is not a whole number";
  const ids = e["ids"];
  if (ids === null || typeof ids !== "object" || Array.isArray(ids) || !Object.values(ids).every((v) => typeof v === "string")) return "ids is not an object of strings";
  return e as unknown as AuditEntry;
}

export interface AuditHead {
  readonly seq: number;
  readonly hash: string;
}

export type AuditVerdict =
  | { readonly ok: true; readonly entries: number; readonly head: AuditHead }
  | { readonly ok: false; readonly entries: number; readonly line: number; readonly seq: number | null; readonly reason: string };

/**
 * Checks a chain line by line; the first bad line is named (1-based) with why.
 * `expectedHead` (the running station's last entry when the check began) also
 * catches a file cut short; lines after it (appended meanwhile) are not read.
 */
export async function verifyAudit(lines: AsyncIterable<string> | Iterable<string>, expectedHead?: AuditHead): Promise<AuditVerdict> {
  let prev: AuditHead = { seq: 0, hash: GENESIS_HASH };
  let n = 0;
  for await (const text of lines) {
    if (expectedHead !== undefined && prev.seq >= expectedHead.seq) break;
    n++;
    const bad = (reason: string, seq: number | null = null): AuditVerdict => ({ ok: false, entries: n - 1, line: n, seq, reason });
    if (text.length > AUDIT_LINE_BYTES_MAX) return bad(`line longer than ${AUDIT_LINE_BYTES_MAX} bytes`);
    const entry = parseEntry(text);
    if (typeof entry === "string") return bad(entry);
    if (entry.seq !== prev.seq + 1) {
      return bad(`seq ${entry.seq} follows seq ${prev.seq} (expected ${prev.seq + 1}: an entry was dropped, reordered or inserted)`, entry.seq);
    }
    if (entry.prev !== prev.hash) return bad(`prev does not match the hash of the line before (an entry was dropped, reordered or inserted)`, entry.seq);
    if (entryHash(entry) !== entry.hash) return bad(`hash does not match the entry's fields (the entry was edited)`, entry.seq);
    prev = { seq: entry.seq, hash: entry.hash };
  }
  if (expectedHead !== undefined && expectedHead.seq !== prev.seq) {
    return { ok: false, entries: n, line: n + 1, seq: prev.seq + 1, reason: `the file ends at seq ${prev.seq} but the station has written up to seq ${expectedHead.seq} (entries were cut off the end)` };
  }
  if (expectedHead !== undefined && expectedHead.hash !== prev.hash) {
    return { ok: false, entries: n, line: n, seq: prev.seq, reason: `the chain up to seq ${prev.seq} is not the one the station wrote (the file was rewritten)` };
  }
  return { ok: true, entries: n, head: prev };
}

/** The lines of a file, streamed (a trailing newline ends the last line; a torn last line is still a line). */
export function fileLines(path: string): AsyncIterable<string> {
  return createInterface({ input: createReadStream(path, { encoding: "utf8" }), crlfDelay: Infinity });
}

export async function verifyAuditFile(path: string, expectedHead?: AuditHead): Promise<AuditVerdict> {
  try {
    await fs.access(path);
  } catch (error) {
    throw new IpsanError("NOT_FOUND", `audit log ${path}: ${errorMessage(error)}`, { field: "file" });
  }
  return verifyAudit(fileLines(path), expectedHead);
}

/** The last `limit` entries of a file (oldest first); lines that do not parse are skipped. */
export async function tailEntries(path: string, limit: number): Promise<AuditEntry[]> {
  const ring: AuditEntry[] = [];
  for await (const text of fileLines(path)) {
    const entry = parseEntry(text);
    if (typeof entry === "string") continue;
    ring.push(entry);
    if (ring.length > limit) ring.shift();
  }
  return ring;
}

interface PendingAppend {
  readonly fields: AuditFields;
  readonly resolve: (entry: AuditEntry) => void;
  readonly reject: (error: unknown) => void;
}

export class AuditLog {
  readonly path: string;
  readonly #handle: fs.FileHandle;
  readonly #clock: Clock;
  #head: AuditHead;
  #pending: PendingAppend[] = [];
  #writing: Promise<void> | null = null;
  #failed: unknown = null;

  private constructor(path: string, handle: fs.FileHandle, head: AuditHead, clock: Clock) {
    this.path = path;
    this.#handle = handle;
    this.#head = head;
    this.#clock = clock;
  }

  /** Opens (creating) the log, checks its tail, and drops a torn last line (see the file comment). */
  static async open(path: string, clock: Clock = SYSTEM_CLOCK): Promise<AuditLog> {
    const { head, tornBytes } = await checkTail(path);
    const handle = await fs.open(path, "a", 0o600);
    const audit = new AuditLog(path, handle, head, clock);
    if (tornBytes > 0) {
      log.warn("the audit log ended in a torn line (a crash during an append); dropped it", { path, bytes: tornBytes });
      await audit.append({ actor: "station", role: "station", action: "audit.torn-tail-dropped", ids: { bytes: String(tornBytes) }, from: "", status: 0 });
    }
    return audit;
  }

  get head(): AuditHead {
    return this.#head;
  }

  /** Appends one entry; resolves when it is on disk (fdatasync'd). Entries are chained in call order. */
  append(fields: AuditFields): Promise<AuditEntry> {
    return new Promise((resolve, reject) => {
      if (this.#failed !== null) {
        reject(new IpsanError("IO_ERROR", `audit log ${this.path} failed earlier (${errorMessage(this.#failed)}); restart the station`));
        return;
      }
      this.#pending.push({ fields, resolve, reject });
      this.#kick();
    });
  }

  /** Starts the writer unless it runs; it restarts itself for appends that came as it finished. */
  #kick(): void {
    if (this.#writing !== null) return;
    this.#writing = this.#drain().finally(() => {
      this.#writing = null;
      if (this.#pending.length > 0) this.#kick();
    });
  }

  /** Writes what is pending, in batches: one write and one fdatasync per batch. */
  async #drain(): Promise<void> {
    while (this.#pending.length > 0) {
      const batch = this.#pending.splice(0);
      if (this.#failed !== null) {
        for (const p of batch) p.reject(new IpsanError("IO_ERROR", `audit log ${this.path} failed earlier (${errorMessage(this.#failed)}); restart the station`));
        continue;
      }
      let head = this.#head;
      const entries: AuditEntry[] = [];
      const time = new Date(this.#clock.nowMs()).toISOString();
      for (const p of batch) {
        const body = { seq: head.seq + 1, time, ...p.fields, prev: head.hash };
        const entry: AuditEntry = { ...body, hash: entryHash(body) };
        entries.push(entry);
        head = { seq: entry.seq, hash: entry.hash };
      }
      try {
        await this.#handle.write(entries.map(line).join(""));
        await this.#handle.datasync();
      } catch (error) {
        this.#failed = error;
        log.error("cannot write the audit log: changes are refused until the station restarts", { path: this.path, error: errorMessage(error) });
        for (const p of batch) p.reject(new IpsanError("IO_ERROR", `audit log ${this.path}: ${errorMessage(error)}`, { cause: error }));
        continue;
      }
      this.#head = head;
      batch.forEach((p, i) => p.resolve(entries[i] as AuditEntry));
    }
  }

  async close(): Promise<void> {
    await this.#writing;
    await this.#handle.close();
  }
}

/** The last entry of the file (genesis when empty), and how many bytes of a torn last line were cut off. */
async function checkTail(path: string): Promise<{ head: AuditHead; tornBytes: number }> {
  let size: number;
  try {
    size = (await fs.stat(path)).size;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return { head: { seq: 0, hash: GENESIS_HASH }, tornBytes: 0 };
    throw error;
  }
  if (size === 0) return { head: { seq: 0, hash: GENESIS_HASH }, tornBytes: 0 };
  const start = Math.max(0, size - AUDIT_TAIL_BYTES);
  const handle = await fs.open(path, "r");
  let tail: Buffer;
  try {
    tail = Buffer.alloc(size - start);
    await handle.read(tail, 0, tail.length, start);
  } finally {
    await handle.close();
  }
  let tornBytes = 0;
  if (tail[tail.length - 1] !== 0x0a) {
    const lastNewline = tail.lastIndexOf(0x0a);
    if (lastNewline < 0 && start > 0) throw corrupt(path, `its last ${AUDIT_TAIL_BYTES} bytes hold no line end`);
    tornBytes = tail.length - (lastNewline + 1);
    await fs.truncate(path, size - tornBytes);
    tail = tail.subarray(0, lastNewline + 1);
  }
  const lines = tail.toString("utf8").split("\n").filter((l) => l !== "");
  if (start > 0) lines.shift(); // the first may be the end of a line that began before the tail
  const last = lines.at(-1);
  if (last === undefined) return { head: { seq: 0, hash: GENESIS_HASH }, tornBytes };
  const entry = parseEntry(last);
  if (typeof entry === "string") throw corrupt(path, `its last line is not an entry: ${entry}`);
  if (entryHash(entry) !== entry.hash) throw corrupt(path, `its last entry (seq ${entry.seq}) does not match its hash`);
  const before = lines.length >= 2 ? parseEntry(lines[lines.length - 2] ?? "") : null;
  if (before !== null && (typeof before === "string" || before.hash !== entry.prev || before.seq + 1 !== entry.seq)) {
    throw corrupt(path, `its last entry (seq ${entry.seq}) does not follow the one before`);
  }
  return { head: { seq: entry.seq, hash: entry.hash }, tornBytes };
}

function corrupt(path: string, why: string): IpsanError {
  return new IpsanError(
    "CORRUPT",
    `audit log ${path}: ${why}. It was changed by something other than the station; ` +
      `keep it as evidence (ipsan audit verify --file ${path}), move it aside, and start the station again (a new chain begins)`,
  );
}
