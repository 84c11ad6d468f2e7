// One station of several sharing an etcd cluster (issue 11, ADR 0017).
//
// Every station keeps a copy of the station database (DATA/station.db),
// rebuilt from etcd at start: the newest snapshot, then the log entries after
// it. One station is the leader: it won the etcd key "leader" with a lease.
// Only the leader runs the station proper (placement, reconcile, replacement,
// failover, the discovery listener, the API's routes); every write it commits
// to its copy is recorded (recorder.ts) and appended to the log in etcd, in
// commit order, fenced on its leader key (etcd_log.ts). The API answers a
// request only after every entry committed before the answer is in etcd:
// an acknowledged change is in etcd, on a quorum of its members' disks.
// Followers apply the log to their copy as it grows and forward API requests
// to the leader.
//
// Losing the lead. The leader renews its lease every ttl/4. If no renewal has
// succeeded for ttl - ttl/3 (measured from when the last successful renewal
// was sent, a lower bound of when etcd will let the lease expire), it stops
// acting as leader at once, a third of the lease before anyone else can be
// elected. An append that the fence refuses (another station leads) or any
// local error does the same. Stepping down closes the station proper,
// discards the local copy (it may hold changes etcd never took) and rebuilds
// it from etcd, then campaigns again.

import { randomUUID } from "node:crypto";
import { promises as fs } from "node:fs";
import { performance } from "node:perf_hooks";
import type { IncomingMessage, ServerResponse } from "node:http";
import { openDatabase, schemaVersion, MIGRATIONS, type Db } from "../db.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { applyEntry, appliedSeq, recordWrites, type WriteRecorder } from "./recorder.ts";
import {
  APPEND_BATCH_BYTES_MAX,
  APPEND_BATCH_ENTRIES_MAX,
  ENTRY_BYTES_MAX,
  encodeEntry,
  withDeadline,
  type EtcdState,
  type LeaderRecord,
} from "./etcd_log.ts";

const log = logger("station-cluster");

/** Default lease of the leader key: a dead leader is replaced within about this long. */
export const LEADER_LEASE_MS_DEFAULT = 3_000;
export const LEADER_LEASE_MS_MIN = 1_000;
export const LEADER_LEASE_MS_MAX = 60_000;
/**
 * A snapshot is written once at least this many entries were appended since
 * the last one and their bytes reach the last snapshot's compressed size (so
 * a large database is not copied whole every few seconds), or once the log
 * since holds SNAPSHOT_EVERY_BYTES and twice the last snapshot, or after
 * SNAPSHOT_EVERY_ENTRIES_MAX entries whatever their size.
 */
export const SNAPSHOT_EVERY_ENTRIES = 1_000;
export const SNAPSHOT_EVERY_ENTRIES_MAX = 20_000;
/** Or once the log since the last snapshot holds this many bytes (and twice the last snapshot's size). */
export const SNAPSHOT_EVERY_BYTES = 8 * 1024 * 1024;
/** How often a follower polls etcd for the leader and new entries when no watch event came. */
export const FOLLOWER_POLL_MS = 500;
/** The schema every station of a cluster must have (the newest migration of this version). */
export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]!.version;

export type Role = "starting" | "follower" | "promoting" | "leader" | "stepping-down" | "stopped";

/** What the leader runs: the station proper on the copy `db`. */
export interface LeaderServices {
  /** Answers an HTTP request (the API's fastify handler). */
  handle(req: IncomingMessage, res: ServerResponse): void;
  close(): Promise<void>;
}

export interface ClusterNodeOptions {
  readonly etcd: EtcdState;
  readonly dbPath: string;
  /** This station's API URL as other stations and clients reach it (--advertise-url). */
  readonly url: string;
  readonly leaseMs?: number;
  /** Starts the station proper on `db`; `durable()` resolves when every change so far is in etcd. */
  readonly startServices: (db: Db, durable: () => Promise<void>) => Promise<LeaderServices>;
  /** Monotonic milliseconds (the lease's arithmetic); default performance.now. */
  readonly monotonicMs?: () => number;
  /** Entries between snapshots at least (default SNAPSHOT_EVERY_ENTRIES). */
  readonly snapshotEveryEntries?: number;
}

interface Pending {
  readonly seq: number;
  readonly stored: Buffer;
}

export class ClusterNode {
  readonly id = randomUUID();
  role: Role = "starting";
  /** The leader as last read from etcd (this station's own record while it leads). */
  leader: LeaderRecord | null = null;
  /** Why this station is not leading or not serving, for health and logs. */
  lastProblem: string | null = null;
  private readonly options: ClusterNodeOptions;
  private readonly etcd: EtcdState;
  private readonly leaseMs: number;
  private readonly mono: () => number;
  private db: Db | null = null;
  private services: LeaderServices | null = null;
  private recorder: WriteRecorder | null = null;
  private leaderRevision: string | null = null;
  private lease: ReturnType<EtcdState["client"]["lease"]> | null = null;
  private leaseValidUntil = 0;
  private queue: Pending[] = [];
  private inflight = false;
  private lastEnqueued = 0;
  private committed = 0;
  private lastSnapshotSeq = 0;
  private lastSnapshotBytes = 0;
  private bytesSinceSnapshot = 0;
  private snapshotting = false;
  private waiters: { seq: number; resolve: () => void; reject: (error: Error) => void }[] = [];
  private timers: NodeJS.Timeout[] = [];
  private watchers: { cancel(): Promise<void> }[] = [];
  private catchingUp: Promise<void> | null = null;
  private wakeFollower: (() => void) | null = null;
  private stopped = false;
  private loop: Promise<void> | null = null;

  constructor(options: ClusterNodeOptions) {
    this.options = options;
    this.etcd = options.etcd;
    this.leaseMs = options.leaseMs ?? LEADER_LEASE_MS_DEFAULT;
    this.mono = options.monotonicMs ?? (() => performance.now());
  }

  get leading(): boolean {
    return this.role === "leader";
  }

  /** The entry this station's copy reflects. */
  get appliedSeq(): number {
    return this.db === null ? 0 : appliedSeq(this.db);
  }

  /** Rebuilds the copy, then runs the follower/leader loop until stop(). */
  async start(): Promise<void> {
    await this.rebuild();
    const watcher = await this.etcd.client.watch().prefix(this.etcd.prefix).create();
    watcher.on("put", () => this.wakeFollower?.());
    watcher.on("delete", () => this.wakeFollower?.());
    watcher.on("error", (error: unknown) => log.limited("watch", "etcd watch failed (polling goes on)", { error: errorMessage(error) }));
    this.watchers.push(watcher);
    let firstRound: () => void = () => undefined;
    const ready = new Promise<void>((resolve) => (firstRound = resolve));
    this.loop = this.run(firstRound);
    // Ready once this station knows who leads (or leads itself, or knows that nobody does).
    await ready;
  }

  /** Answers an HTTP request as leader; null when this station does not lead. */
  handler(): ((req: IncomingMessage, res: ServerResponse) => void) | null {
    if (this.role !== "leader" || this.services === null) return null;
    const services = this.services;
    return (req, res) => services.handle(req, res);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.wakeFollower?.();
    if (this.role === "leader" || this.role === "promoting") await this.stepDown("the station is stopping", false);
    await this.loop?.catch(() => undefined);
    for (const timer of this.timers) clearInterval(timer);
    for (const watcher of this.watchers) await watcher.cancel().catch(() => undefined);
    this.db?.close();
    this.db = null;
    this.role = "stopped";
  }

  // ---- the copy ------------------------------------------------------------------

  /** Discards the local copy and builds it again from etcd: snapshot, then log. */
  private async rebuild(): Promise<void> {
    this.db?.close();
    this.db = null;
    for (let attempt = 1; ; attempt++) {
      try {
        const { db, snapshotSeq } = await buildLocalCopy(this.etcd, this.options.dbPath);
        this.db = db;
        this.lastSnapshotSeq = snapshotSeq;
        return;
      } catch (error) {
        if (error instanceof IpsanError && error.code === "CONFLICT" && /schema/.test(error.message)) throw error;
        this.lastProblem = `cannot rebuild the station database from etcd: ${errorMessage(error)}`;
        log.limited("rebuild", "cannot rebuild the station database from etcd; retrying", { attempt, error: errorMessage(error) });
        if (this.stopped) throw error;
        await delay(Math.min(2_000, 100 * attempt));
      }
    }
  }

  /** Applies every entry etcd has after the copy's own (one run at a time; callers share it). */
  private catchUp(): Promise<void> {
    if (this.catchingUp !== null) return this.catchingUp;
    const db = this.db;
    if (db === null) return Promise.resolve();
    const run = applyLog(this.etcd, db).finally(() => {
      if (this.catchingUp === run) this.catchingUp = null;
    });
    this.catchingUp = run;
    return run;
  }

  // ---- follower and campaign -------------------------------------------------------

  private async run(firstRound: () => void): Promise<void> {
    try {
      await this.follow(firstRound);
    } finally {
      firstRound();
    }
  }

  private async follow(firstRound: () => void): Promise<void> {
    this.role = "follower";
    for (let round = 0; !this.stopped; round++) {
      try {
        if (this.role === "follower") {
          await this.catchUp().catch(async (error: unknown) => {
            log.warn("the local copy cannot follow the log; rebuilding it", { error: errorMessage(error) });
            await this.rebuild();
          });
          const current = await this.etcd.leader();
          this.leader = current;
          if (current === null) await this.campaign();
          this.lastProblem = (this.role as Role) === "leader" ? null : current === null ? "no station leads" : null;
        }
      } catch (error) {
        this.lastProblem = `etcd: ${errorMessage(error)}`;
        log.limited("follow", "cannot reach etcd", { error: errorMessage(error) });
      }
      if (this.stopped) break;
      if (round === 0) firstRound();
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, FOLLOWER_POLL_MS);
        this.wakeFollower = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wakeFollower = null;
    }
  }

  private async campaign(): Promise<void> {
    const ttlSeconds = Math.max(1, Math.round(this.leaseMs / 1000));
    const lease = this.etcd.client.lease(ttlSeconds, { autoKeepAlive: false });
    const grantedAt = this.mono();
    const leaseId = await withDeadline("grant a lease", lease.grant());
    const record: LeaderRecord = { id: this.id, url: this.options.url, since: Date.now() };
    const key = this.etcd.key("leader");
    const result = await withDeadline(
      "campaign",
      this.etcd.client.if(key, "Create", "==", 0).then(this.etcd.client.put(key).value(JSON.stringify(record)).lease(leaseId)).commit(),
    );
    if (!result.succeeded) {
      await lease.revoke().catch(() => undefined);
      return;
    }
    this.lease = lease;
    this.leaderRevision = result.header.revision;
    this.leaseValidUntil = grantedAt + ttlSeconds * 1000;
    this.leader = record;
    log.info("elected leader", { id: this.id, url: this.options.url, revision: this.leaderRevision });
    await this.promote(lease);
  }

  // ---- leading ---------------------------------------------------------------------

  private async promote(lease: ReturnType<EtcdState["client"]["lease"]>): Promise<void> {
    this.role = "promoting";
    const ttlMs = Math.max(1, Math.round(this.leaseMs / 1000)) * 1000;
    // The lease: renewed every ttl/4; without a renewal for ttl - ttl/3, step down.
    const renew = setInterval(() => {
      const sentAt = this.mono();
      withDeadline("renew the leader lease", lease.keepaliveOnce(), ttlMs / 4)
        .then((answer) => {
          if (Number(answer.TTL) <= 0) throw new IpsanError("UNAVAILABLE", "etcd says the lease expired");
          this.leaseValidUntil = Math.max(this.leaseValidUntil, sentAt + ttlMs);
        })
        .catch((error: unknown) => log.limited("lease", "cannot renew the leader lease", { error: errorMessage(error) }));
    }, ttlMs / 4);
    const check = setInterval(() => {
      if (this.mono() > this.leaseValidUntil - ttlMs / 3) void this.stepDown("the leader lease was not renewed in time (etcd unreachable?)");
    }, Math.min(100, ttlMs / 10));
    this.timers.push(renew, check);
    try {
      await this.catchUp();
      const db = this.db;
      if (db === null) throw new IpsanError("UNAVAILABLE", "no local copy of the station database");
      const applied = appliedSeq(db);
      this.lastEnqueued = applied;
      this.committed = applied;
      if ((await this.etcd.snapshotManifest()) === null) {
        await this.etcd.writeSnapshot(db.serialize(), applied, SCHEMA_VERSION, this.leaderRevision);
        this.lastSnapshotSeq = applied;
      }
      let next = applied;
      this.recorder = recordWrites(
        db,
        () => ++next,
        (seq, statements) => this.enqueue(seq, statements),
      );
      if (this.role !== "promoting") return;
      this.services = await this.options.startServices(db, () => this.durable());
      if (this.role !== "promoting") {
        await this.services.close().catch(() => undefined);
        this.services = null;
        return;
      }
      this.role = "leader";
      this.lastProblem = null;
      log.info("leading", { seq: applied });
    } catch (error) {
      await this.stepDown(`cannot start leading: ${errorMessage(error)}`);
    }
  }

  private enqueue(seq: number, statements: Parameters<Parameters<typeof recordWrites>[2]>[1]): void {
    const stored = encodeEntry({ seq, schema: SCHEMA_VERSION, statements });
    if (stored.length > ENTRY_BYTES_MAX) {
      void this.stepDown(`a change of ${stored.length} bytes (compressed) is larger than an etcd log entry may be (${ENTRY_BYTES_MAX})`);
      return;
    }
    this.queue.push({ seq, stored });
    this.lastEnqueued = seq;
    this.pump();
  }

  /** Resolves when every entry enqueued so far is in etcd; rejects if this station stops leading first. */
  durable(): Promise<void> {
    if (this.role !== "leader" && this.role !== "promoting") return Promise.reject(notLeading(this.lastProblem));
    const seq = this.lastEnqueued;
    if (this.committed >= seq) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ seq, resolve, reject }));
  }

  private pump(): void {
    if (this.inflight || this.queue.length === 0 || this.leaderRevision === null) return;
    const batch: Pending[] = [];
    let bytes = 0;
    for (const entry of this.queue) {
      if (batch.length >= APPEND_BATCH_ENTRIES_MAX || (batch.length > 0 && bytes + entry.stored.length > APPEND_BATCH_BYTES_MAX)) break;
      batch.push(entry);
      bytes += entry.stored.length;
    }
    this.inflight = true;
    const revision = this.leaderRevision;
    this.etcd
      .append(batch, revision)
      .then((ok) => {
        this.inflight = false;
        if (!ok) {
          void this.stepDown("etcd refused an append: another station leads now");
          return;
        }
        this.queue.splice(0, batch.length);
        for (const entry of batch) this.bytesSinceSnapshot += entry.stored.length;
        this.committed = batch[batch.length - 1]!.seq;
        const ready = this.waiters.filter((w) => w.seq <= this.committed);
        this.waiters = this.waiters.filter((w) => w.seq > this.committed);
        for (const waiter of ready) waiter.resolve();
        this.pump();
        this.maybeSnapshot();
      })
      .catch((error: unknown) => {
        this.inflight = false;
        log.limited("append", "cannot append to the etcd log; retrying", { error: errorMessage(error) });
        const timer = setTimeout(() => this.pump(), 100);
        timer.unref();
      });
  }

  private maybeSnapshot(): void {
    if (this.snapshotting || this.queue.length > 0 || this.inflight || this.db === null || this.role !== "leader") return;
    const entries = this.committed - this.lastSnapshotSeq;
    const byCount = entries >= (this.options.snapshotEveryEntries ?? SNAPSHOT_EVERY_ENTRIES) && this.bytesSinceSnapshot >= this.lastSnapshotBytes;
    // Large entries (a pool joining: units' reports with their volumes) also call for one, by bytes.
    const byBytes = this.bytesSinceSnapshot >= Math.max(SNAPSHOT_EVERY_BYTES, 2 * this.lastSnapshotBytes);
    if (!byCount && !byBytes && entries < SNAPSHOT_EVERY_ENTRIES_MAX) return;
    // Nothing is waiting to be appended: the copy is exactly the log up to `committed`.
    const seq = this.committed;
    const image = this.db.serialize();
    this.snapshotting = true;
    this.etcd
      .writeSnapshot(image, seq, SCHEMA_VERSION, this.leaderRevision)
      .then((bytes) => {
        if (bytes === null) return;
        this.lastSnapshotSeq = seq;
        this.lastSnapshotBytes = bytes;
        this.bytesSinceSnapshot = 0;
      })
      .catch((error: unknown) => log.limited("snapshot", "cannot write a snapshot to etcd (the log keeps growing until one succeeds)", { error: errorMessage(error) }))
      .finally(() => {
        this.snapshotting = false;
      });
  }

  /** Stops acting as leader now; then rebuilds the copy and follows (unless `follow` is false). */
  private async stepDown(reason: string, follow = true): Promise<void> {
    if (this.role !== "leader" && this.role !== "promoting") return;
    this.role = "stepping-down";
    this.lastProblem = reason;
    log.warn("not leading any more", { reason });
    this.recorder?.detach();
    this.recorder = null;
    const failed = notLeading(reason);
    for (const waiter of this.waiters) waiter.reject(failed);
    this.waiters = [];
    this.queue = [];
    for (const timer of this.timers) clearInterval(timer);
    this.timers = [];
    const revision = this.leaderRevision;
    this.leaderRevision = null;
    const services = this.services;
    this.services = null;
    await services?.close().catch((error: unknown) => log.warn("closing the station proper failed", { error: errorMessage(error) }));
    // Give the lead back at once if etcd still has us (a clean stop or a local error): others need not wait for the lease.
    if (revision !== null) {
      const key = this.etcd.key("leader");
      await withDeadline("resign", this.etcd.client.if(key, "Create", "==", revision).then(this.etcd.client.delete().key(key)).commit(), 1_000).catch(() => undefined);
    }
    if (this.lease !== null) {
      await withDeadline("revoke the lease", this.lease.revoke(), 500).catch(() => undefined);
      this.lease = null;
    }
    this.leader = null;
    if (!follow) {
      this.role = "follower";
      return;
    }
    try {
      await this.rebuild();
    } finally {
      this.role = "follower";
      this.wakeFollower?.();
    }
  }
}

/**
 * Builds a copy of the station database at `path` from etcd (anything there
 * is removed first): the newest snapshot, then every log entry after it.
 * Refuses a snapshot or entry of another schema.
 */
export async function buildLocalCopy(etcd: EtcdState, path: string): Promise<{ db: Db; snapshotSeq: number }> {
  for (const suffix of ["", "-wal", "-shm"]) await fs.rm(path + suffix, { force: true });
  let db: Db | null = null;
  try {
    const manifest = await etcd.snapshotManifest();
    if (manifest !== null) {
      if (manifest.schema !== SCHEMA_VERSION) {
        throw new IpsanError(
          "CONFLICT",
          `etcd holds the station database at schema ${manifest.schema}; this ipsan has schema ${SCHEMA_VERSION}: every station of a cluster runs the same ipsan version (docs/OPERATIONS.md "Several stations": upgrading)`,
        );
      }
      await fs.writeFile(path, await etcd.snapshotImage(manifest));
    }
    db = openDatabase(path);
    if (schemaVersion(db) !== SCHEMA_VERSION) throw new IpsanError("CONFLICT", "the snapshot's schema changed when opened");
    appliedSeq(db);
    await applyLog(etcd, db);
    return { db, snapshotSeq: manifest?.seq ?? 0 };
  } catch (error) {
    db?.close();
    for (const suffix of ["", "-wal", "-shm"]) await fs.rm(path + suffix, { force: true });
    throw error;
  }
}

/**
 * Applies every log entry after the copy's own, in order. Refuses (CONFLICT:
 * rebuild) a copy that a snapshot has overtaken: its next entries may be
 * gone from the log even when no later entry shows the gap yet.
 */
export async function applyLog(etcd: EtcdState, db: Db): Promise<void> {
  for (;;) {
    const applied = appliedSeq(db);
    const entries = await etcd.entriesAfter(applied);
    if (entries.length === 0) {
      const snapshot = await etcd.snapshotManifest();
      if (snapshot !== null && snapshot.seq > applied) {
        throw new IpsanError("CONFLICT", `the copy is at entry ${applied}, and a snapshot at ${snapshot.seq} replaced the log up to it: the copy is rebuilt from the snapshot`);
      }
      return;
    }
    for (const entry of entries) {
      if (entry.schema !== SCHEMA_VERSION) {
        throw new IpsanError("CONFLICT", `log entry ${entry.seq} was written by a station with schema ${entry.schema} (this one: ${SCHEMA_VERSION}): run the same ipsan version on every station`);
      }
      applyEntry(db, entry.seq, entry.statements);
    }
  }
}

function notLeading(reason: string | null): IpsanError {
  return new IpsanError("UNAVAILABLE", `this station stopped leading before the change reached etcd (${reason ?? "unknown"}); it may or may not be kept: retry (an allocation with the same request id is not made twice)`);
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
