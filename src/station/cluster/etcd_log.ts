// The station's state in etcd (ADR 0017): a replicated log of committed
// SQLite transactions (src/station/cluster/recorder.ts) plus a snapshot of
// the whole database now and then, so the log stays short. Keys, under the
// prefix (default "/ipsan/"):
//
//   leader                     the elected station: {id, url, since}, with its lease
//   log/<seq, 20 digits>       one entry: {v, seq, schema, statements}
//   snapshot                   the newest snapshot's manifest: {v, seq, schema, chunks, bytes, sha256}
//   snapshot/<seq>/<i>         its gzip'd SQLite image, in chunks of SNAPSHOT_CHUNK_BYTES
//   secrets/<file name>        admin.token, cluster.key, host-keys.secret, forward.secret (first station creates them)
//
// Every append is a transaction fenced on the leader key: it succeeds only
// while the key still carries the create revision this station won it with,
// so a station whose lease expired (or that was partitioned away while
// another took over) can never append again.

import { createHash } from "node:crypto";
import { promisify } from "node:util";
import { gunzip as gunzipCallback, gunzipSync, gzip as gzipCallback, gzipSync } from "node:zlib";
import { Etcd3 } from "etcd3";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { decodeParams, type LogStatement } from "./recorder.ts";

// Compression off the event loop: a large database must not stall the leader's lease renewals.
const gzip = promisify(gzipCallback);
const gunzip = promisify(gunzipCallback);

export const KEY_PREFIX_DEFAULT = "/ipsan/";
/** Largest log entry as stored (etcd refuses requests over 1.5 MiB by default: --max-request-bytes). */
export const ENTRY_BYTES_MAX = 1024 * 1024;
/** Entries larger than this are stored gzip'd. */
export const ENTRY_COMPRESS_BYTES = 16 * 1024;
/** Largest entry once uncompressed (a bound for what a reader inflates). */
export const ENTRY_TEXT_BYTES_MAX = 64 * 1024 * 1024;
/** Entries per append transaction at most (etcd's --max-txn-ops defaults to 128). */
export const APPEND_BATCH_ENTRIES_MAX = 64;
/** Bytes per append transaction at most. */
export const APPEND_BATCH_BYTES_MAX = 1024 * 1024;
export const SNAPSHOT_CHUNK_BYTES = 512 * 1024;
/** Snapshot chunks at most (a 1 GiB compressed database): bounds what a reader fetches. */
export const SNAPSHOT_CHUNKS_MAX = 2048;
/** Entries read per range request while catching up: at most 32 MiB of entries, under GRPC_RECEIVE_BYTES_MAX. */
export const CATCH_UP_PAGE = 32;
/**
 * The largest answer the client accepts (gRPC's default is 4 MiB, less than a
 * page of large entries; an answer over the limit is an error the etcd3
 * client retries and then counts against the member, cutting the station off
 * from it for seconds).
 */
export const GRPC_RECEIVE_BYTES_MAX = CATCH_UP_PAGE * ENTRY_BYTES_MAX + 8 * 1024 * 1024;
/** How long one etcd call may take before it counts as failed. */
export const ETCD_CALL_TIMEOUT_MS = 5_000;

export interface LogEntry {
  readonly seq: number;
  readonly schema: number;
  readonly statements: readonly LogStatement[];
}

export interface SnapshotManifest {
  readonly v: 1;
  readonly seq: number;
  readonly schema: number;
  readonly chunks: number;
  readonly bytes: number;
  readonly sha256: string;
}

export interface LeaderRecord {
  readonly id: string;
  readonly url: string;
  readonly since: number;
}

export function seqKey(seq: number): string {
  return String(seq).padStart(20, "0");
}

/** Parses the endpoints as etcdctl's --endpoints: comma-separated client URLs (http:// only). */
export function parseEndpoints(text: string, flag = "--etcd"): string[] {
  const endpoints = text.split(",").map((s) => s.trim()).filter((s) => s !== "");
  if (endpoints.length === 0 || endpoints.length > 16) throw new IpsanError("INVALID_ARGUMENT", `${flag}: give 1 to 16 comma-separated etcd client URLs, e.g. http://127.0.0.1:2379`);
  for (const endpoint of endpoints) {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      throw new IpsanError("INVALID_ARGUMENT", `${flag}: "${endpoint}" is not a URL (etcd client URLs look like http://HOST:2379)`);
    }
    if (url.protocol !== "http:" || url.port === "" || url.pathname !== "/") {
      throw new IpsanError("INVALID_ARGUMENT", `${flag}: "${endpoint}": expected http://HOST:PORT (TLS to etcd is not supported yet)`);
    }
  }
  return endpoints;
}

/**
 * An entry as stored: its JSON, gzip'd when larger than ENTRY_COMPRESS_BYTES
 * (SQL text shrinks several times; a unit's report with its volumes is the
 * largest entry there is).
 */
export function encodeEntry(entry: LogEntry): Buffer {
  const text = Buffer.from(JSON.stringify({ v: 1, seq: entry.seq, schema: entry.schema, statements: entry.statements }), "utf8");
  return text.length > ENTRY_COMPRESS_BYTES ? gzipSync(text, { level: 6 }) : text;
}

export function decodeEntry(stored: Buffer | string, expectSeq: number): LogEntry {
  let text: string;
  if (typeof stored === "string") text = stored;
  else if (stored[0] === 0x1f && stored[1] === 0x8b) {
    try {
      text = gunzipSync(stored, { maxOutputLength: ENTRY_TEXT_BYTES_MAX }).toString("utf8");
    } catch (error) {
      throw new IpsanError("INVALID_ARGUMENT", `etcd log entry ${expectSeq}: cannot uncompress it (${errorMessage(error)})`);
    }
  } else text = stored.toString("utf8");
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new IpsanError("INVALID_ARGUMENT", `etcd log entry ${expectSeq}: not JSON (${errorMessage(error)})`);
  }
  const record = value as Record<string, unknown>;
  if (record === null || typeof record !== "object" || record["v"] !== 1 || record["seq"] !== expectSeq || typeof record["schema"] !== "number" || !Array.isArray(record["statements"])) {
    throw new IpsanError("INVALID_ARGUMENT", `etcd log entry ${expectSeq}: not an ipsan log entry of this version`);
  }
  const statements = record["statements"] as unknown[];
  for (const statement of statements) {
    if (!Array.isArray(statement) || statement.length !== 2 || typeof statement[0] !== "string") {
      throw new IpsanError("INVALID_ARGUMENT", `etcd log entry ${expectSeq}: a statement is not [sql, params]`);
    }
    decodeParams(statement[1]);
  }
  return { seq: expectSeq, schema: record["schema"], statements: statements as LogStatement[] };
}

/** Races a promise against a timeout (etcd3's calls have no deadline of their own). */
export async function withDeadline<T>(what: string, promise: Promise<T>, ms = ETCD_CALL_TIMEOUT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_resolve, reject) => {
        timer = setTimeout(() => reject(new IpsanError("UNAVAILABLE", `etcd: ${what} took longer than ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** The station's view of its keys in one etcd cluster. */
export class EtcdState {
  readonly client: Etcd3;
  readonly prefix: string;
  readonly endpoints: readonly string[];

  constructor(endpoints: readonly string[], prefix = KEY_PREFIX_DEFAULT) {
    this.endpoints = endpoints;
    this.prefix = prefix;
    this.client = new Etcd3({
      hosts: [...endpoints],
      dialTimeout: ETCD_CALL_TIMEOUT_MS,
      grpcOptions: { "grpc.max_receive_message_length": GRPC_RECEIVE_BYTES_MAX },
    });
  }

  key(name: string): string {
    return `${this.prefix}${name}`;
  }

  close(): void {
    this.client.close();
  }

  // ---- secrets ----------------------------------------------------------------

  /** The shared secret `name`: etcd's copy, else `create()`'s, stored if nobody stored one first. */
  async sharedSecret(name: string, create: () => Buffer): Promise<Buffer> {
    const key = this.key(`secrets/${name}`);
    const candidate = create();
    const result = await withDeadline(
      `store secret ${name}`,
      this.client.if(key, "Create", "==", 0).then(this.client.put(key).value(candidate)).else(this.client.get(key)).commit(),
    );
    if (result.succeeded) return candidate;
    const kv = result.responses[0]?.response_range?.kvs[0];
    if (kv === undefined) throw new IpsanError("UNAVAILABLE", `etcd: secret ${name} vanished while read`);
    return Buffer.from(kv.value);
  }

  /** The shared secret `name` if etcd has it. */
  async secret(name: string): Promise<Buffer | null> {
    return withDeadline(`read secret ${name}`, this.client.get(this.key(`secrets/${name}`)).buffer());
  }

  async hasState(): Promise<boolean> {
    const count = await withDeadline("count keys", this.client.getAll().prefix(this.prefix).count());
    return count > 0;
  }

  // ---- leader ------------------------------------------------------------------

  async leader(): Promise<(LeaderRecord & { createRevision: string }) | null> {
    const response = await withDeadline("read leader", this.client.get(this.key("leader")).exec());
    const kv = response.kvs[0];
    if (kv === undefined) return null;
    try {
      const record = JSON.parse(kv.value.toString("utf8")) as LeaderRecord;
      return { ...record, createRevision: kv.create_revision };
    } catch {
      return null;
    }
  }

  // ---- log ---------------------------------------------------------------------

  /**
   * Appends entries (consecutive seqs) if, and only if, the leader key still
   * has `leaderRevision` as its create revision and the first seq is free.
   * Returns false when the fence refused (another station leads, or our
   * lease expired); throws when etcd could not be reached.
   */
  async append(entries: readonly { seq: number; stored: Buffer }[], leaderRevision: string): Promise<boolean> {
    const first = entries[0];
    if (first === undefined) return true;
    const puts = entries.map((e) => this.client.put(this.key(`log/${seqKey(e.seq)}`)).value(e.stored));
    const result = await withDeadline(
      `append log entries ${first.seq}..${first.seq + entries.length - 1}`,
      this.client.if(this.key("leader"), "Create", "==", leaderRevision).and(this.key(`log/${seqKey(first.seq)}`), "Version", "==", 0).then(...puts).commit(),
    );
    return result.succeeded;
  }

  /** Entries after `afterSeq`, in order, at most `limit` (one answer stays under GRPC_RECEIVE_BYTES_MAX). */
  async entriesAfter(afterSeq: number, limit = CATCH_UP_PAGE): Promise<LogEntry[]> {
    const response = await withDeadline(
      `read log after ${afterSeq}`,
      this.client
        .getAll()
        .inRange({ start: this.key(`log/${seqKey(afterSeq + 1)}`), end: this.key("log0") })
        .limit(Math.min(limit, CATCH_UP_PAGE))
        .sort("Key", "Ascend")
        .exec(),
    );
    const entries: LogEntry[] = [];
    let expect = afterSeq + 1;
    for (const kv of response.kvs) {
      const seq = Number(kv.key.toString("utf8").slice(this.key("log/").length));
      if (seq !== expect) {
        throw new IpsanError("CONFLICT", `etcd log: entry ${expect} is missing (next is ${seq}); the log was compacted past this copy: it is rebuilt from the snapshot`);
      }
      entries.push(decodeEntry(kv.value, seq));
      expect += 1;
    }
    return entries;
  }

  /** The newest seq in the log, or the snapshot's if the log is empty; 0 for none. */
  async lastSeq(): Promise<number> {
    const response = await withDeadline(
      "read the last log entry",
      this.client.getAll().inRange({ start: this.key("log/"), end: this.key("log0") }).limit(1).sort("Key", "Descend").exec(),
    );
    const kv = response.kvs[0];
    if (kv !== undefined) return Number(kv.key.toString("utf8").slice(this.key("log/").length));
    return (await this.snapshotManifest())?.seq ?? 0;
  }

  // ---- snapshots ---------------------------------------------------------------

  async snapshotManifest(): Promise<SnapshotManifest | null> {
    const text = await withDeadline("read the snapshot manifest", this.client.get(this.key("snapshot")).string());
    if (text === null) return null;
    const m = JSON.parse(text) as SnapshotManifest;
    if (m.v !== 1 || !Number.isSafeInteger(m.seq) || !Number.isSafeInteger(m.chunks) || m.chunks < 1 || m.chunks > SNAPSHOT_CHUNKS_MAX) {
      throw new IpsanError("INVALID_ARGUMENT", "etcd: the snapshot manifest is not one this version of ipsan wrote");
    }
    return m;
  }

  /** The snapshot's SQLite image (checked against its SHA-256). */
  async snapshotImage(manifest: SnapshotManifest): Promise<Buffer> {
    const parts: Buffer[] = [];
    for (let i = 0; i < manifest.chunks; i++) {
      const chunk = await withDeadline(`read snapshot chunk ${i}`, this.client.get(this.key(`snapshot/${seqKey(manifest.seq)}/${String(i).padStart(6, "0")}`)).buffer());
      if (chunk === null) throw new IpsanError("CONFLICT", `etcd: snapshot ${manifest.seq} chunk ${i} is missing (a newer snapshot replaced it): read again`);
      parts.push(chunk);
    }
    const packed = Buffer.concat(parts);
    if (createHash("sha256").update(packed).digest("hex") !== manifest.sha256) {
      throw new IpsanError("CONFLICT", `etcd: snapshot ${manifest.seq} does not match its checksum: read again`);
    }
    return gunzip(packed);
  }

  /**
   * Stores a snapshot of the database at `seq` (the leader's, with nothing
   * unreplicated), fenced like an append, then drops the log up to it and the
   * previous snapshot's chunks. `leaderRevision` null: no fence (migrate, into
   * an empty prefix only). Returns the snapshot's compressed size, or null
   * when the fence refused.
   */
  async writeSnapshot(image: Buffer, seq: number, schema: number, leaderRevision: string | null): Promise<number | null> {
    const packed = await gzip(image);
    const chunks = Math.max(1, Math.ceil(packed.length / SNAPSHOT_CHUNK_BYTES));
    if (chunks > SNAPSHOT_CHUNKS_MAX) throw new IpsanError("INVALID_ARGUMENT", `the station's database is too large for an etcd snapshot (${packed.length} bytes compressed)`);
    const previous = await this.snapshotManifest();
    for (let i = 0; i < chunks; i++) {
      const key = this.key(`snapshot/${seqKey(seq)}/${String(i).padStart(6, "0")}`);
      await withDeadline(`write snapshot chunk ${i}`, this.client.put(key).value(packed.subarray(i * SNAPSHOT_CHUNK_BYTES, (i + 1) * SNAPSHOT_CHUNK_BYTES)).exec());
    }
    const manifest: SnapshotManifest = { v: 1, seq, schema, chunks, bytes: packed.length, sha256: createHash("sha256").update(packed).digest("hex") };
    const put = this.client.put(this.key("snapshot")).value(JSON.stringify(manifest));
    const txn = leaderRevision === null ? this.client.if(this.key("snapshot"), "Version", "==", 0) : this.client.if(this.key("leader"), "Create", "==", leaderRevision);
    const result = await withDeadline("write the snapshot manifest", txn.then(put).commit());
    if (!result.succeeded) return null;
    // The log up to seq and the previous snapshot are no longer needed.
    await withDeadline("drop the log up to the snapshot", this.client.delete().inRange({ start: this.key("log/"), end: this.key(`log/${seqKey(seq + 1)}`) }).exec());
    if (previous !== null && previous.seq !== seq) {
      await withDeadline("drop the previous snapshot", this.client.delete().prefix(this.key(`snapshot/${seqKey(previous.seq)}/`)).exec());
    }
    return packed.length;
  }
}
