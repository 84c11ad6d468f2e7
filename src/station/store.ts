// The station's state: SQLite is the truth, with a mirror in memory so reads
// and the allocator never touch the disk. Every change goes through `commit`:
// the SQL runs in one transaction; only after it commits are the in-memory
// mirror updated and the events published (to the SSE hub). So an API answer
// sent after a store call is durable, and memory never shows an uncommitted
// change.
//
// Units' lastSeenAt is kept in memory between reports (heartbeats are too
// frequent to fsync) and written with every state change or report.

import { realClock, type TimeSource } from "../util/clock.ts";
import { randomBytes } from "node:crypto";
import { assert } from "../util/assert.ts";
import { IpsanError } from "../util/errors.ts";
import type { NbdTlsMode } from "../discovery/messages.ts";
import type { Db } from "./db.ts";
import {
  ASSIGNMENT_TRANSITIONS,
  LIVE_ASSIGNMENT_STATES,
  type AssignmentDetail,
  type AssignmentRecord,
  type AssignmentState,
  type EventType,
  type HostRecord,
  type LegDeletionRecord,
  type LegRebuild,
  type LegRecord,
  type LegReplacementRecord,
  type LegState,
  type StationEvent,
  type UnitRecord,
  type HostPort,
  type UnitReport,
  type UnitState,
  type VolumeRecord,
} from "./types.ts";

/** Events kept in the database for Last-Event-ID replay. */
export const EVENTS_KEPT_MAX = 10_000;
/** Names listed in one "volumes" event; more are counted, not listed. */
export const EVENT_NAMES_MAX = 100;
/** Events answered by one replay query. */
export const EVENTS_REPLAY_MAX = 1_000;
/** Assignments answered by a history query (all=true). */
export const ASSIGNMENT_HISTORY_MAX = 10_000;

/** The store reads time only through this (util/clock.ts; tests inject a ManualClock or their own). */
export type Clock = TimeSource;
export const SYSTEM_CLOCK: Clock = realClock;

export function volumeKey(unit: string, volume: string): string {
  return `${unit}/${volume}`;
}

/** The volumes an assignment holds: each leg's of a mirror, else its one volume. */
export function volumesOf(assignment: Pick<AssignmentRecord, "unit" | "volume" | "legs">): [unit: string, volume: string][] {
  return assignment.legs.length > 0 ? assignment.legs.map((leg) => [leg.unit, leg.volume]) : [[assignment.unit, assignment.volume]];
}

export function replacementKey(assignmentId: string, leg: number): string {
  return `${assignmentId}/${leg}`;
}

function replacementFromRow(row: Record<string, unknown>): LegReplacementRecord {
  return {
    assignmentId: row["assignment_id"] as string,
    leg: row["leg"] as number,
    oldUnit: row["old_unit"] as string,
    oldVolume: row["old_volume"] as string,
    newUnit: row["new_unit"] as string,
    newVolume: row["new_volume"] as string,
    sizeBytes: row["size_bytes"] as number,
    createdAtMs: row["created_at"] as number,
  };
}

export function newAssignmentId(): string {
  return `a-${randomBytes(6).toString("hex")}`;
}

type Row = Record<string, unknown>;

function json<T>(text: unknown, fallback: T): T {
  if (typeof text !== "string") return fallback;
  return JSON.parse(text) as T;
}

function unitFromRow(row: Row): UnitRecord {
  return {
    name: row["name"] as string,
    dnsName: (row["dns_name"] as string | null) ?? null,
    addresses: json<string[]>(row["addresses"], []),
    nbd: row["nbd_host"] === null ? null : { host: row["nbd_host"] as string, port: row["nbd_port"] as number },
    control:
      row["control_host"] === null ? null : { host: row["control_host"] as string, port: row["control_port"] as number },
    capacityBytes: row["capacity_bytes"] as number,
    freeBytes: row["free_bytes"] as number,
    volumesMax: (row["volumes_max"] as number | null) ?? null,
    // After a restart the station has not heard from anyone yet: the listener's
    // next state event (or report) says how the unit is now.
    state: "unknown",
    lastSeenAtMs: row["last_seen_at"] as number,
    createdAtMs: row["created_at"] as number,
    spare: row["spare"] === 1,
    zone: (row["zone"] as string | null | undefined) ?? null,
    tls: (row["nbd_tls"] as NbdTlsMode | null | undefined) ?? null,
    iscsi:
      row["iscsi_host"] === null || row["iscsi_host"] === undefined ? null : { host: row["iscsi_host"] as string, port: row["iscsi_port"] as number },
  };
}

function volumeFromRow(row: Row): VolumeRecord {
  return {
    unit: row["unit"] as string,
    name: row["name"] as string,
    number: row["number"] as number,
    sizeBytes: row["size_bytes"] as number,
    extents: json(row["extents"], []),
    partitions: json(row["partitions"], []),
    grants: json<string[] | null>(row["grants"], null),
  };
}

function legFromRow(row: Row): LegRecord {
  return {
    index: row["leg"] as number,
    unit: row["unit"] as string,
    volume: row["volume"] as string,
    sizeBytes: row["size_bytes"] as number,
    state: row["state"] as LegState,
    detail: json<AssignmentDetail | null>(row["detail"], null),
    rebuild: json<LegRebuild | null>(row["rebuild"], null),
    error: (row["error"] as string | null | undefined) ?? null,
  };
}

/** `legs`: the assignment's leg rows (only looked up for copies > 1). */
function assignmentFromRow(row: Row, legs: readonly LegRecord[] = []): AssignmentRecord {
  return {
    id: row["id"] as string,
    requestId: (row["request_id"] as string | null) ?? null,
    host: row["host"] as string,
    hostAddress: row["host_address"] as string,
    unit: row["unit"] as string,
    volume: row["volume"] as string,
    partition: (row["partition"] as number | null) ?? null,
    sizeBytes: row["size_bytes"] as number,
    state: row["state"] as AssignmentState,
    carved: row["carved"] === 1,
    wipe: row["wipe"] === 1,
    copies: (row["copies"] as number | undefined) ?? 1,
    legs,
    movedFrom: (row["moved_from"] as string | null | undefined) ?? null,
    movedAtMs: (row["moved_at"] as number | null | undefined) ?? null,
    error: (row["error"] as string | null) ?? null,
    detail: json<AssignmentDetail | null>(row["detail"], null),
    createdAtMs: row["created_at"] as number,
    updatedAtMs: row["updated_at"] as number,
    legsGeneration: (row["legs_generation"] as number | null | undefined) ?? null,
    protocol: row["protocol"] === "iscsi" ? "iscsi" : "nbd",
  };
}

function sameRanges(a: readonly { startLba: number; lengthLba: number }[], b: readonly { startLba: number; lengthLba: number }[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i];
    const y = b[i];
    if (x === undefined || y === undefined || x.startLba !== y.startLba || x.lengthLba !== y.lengthLba) return false;
  }
  return true;
}

/** Field by field, without building strings: reports arrive often and mostly say nothing new. */
function sameVolume(a: Omit<VolumeRecord, "unit">, b: Omit<VolumeRecord, "unit">): boolean {
  if (a.number !== b.number || a.sizeBytes !== b.sizeBytes) return false;
  if (!sameRanges(a.extents, b.extents) || !sameRanges(a.partitions, b.partitions)) return false;
  for (let i = 0; i < a.partitions.length; i++) {
    if (a.partitions[i]?.name !== b.partitions[i]?.name || a.partitions[i]?.index !== b.partitions[i]?.index) return false;
  }
  if (a.grants === null || b.grants === null) return a.grants === b.grants;
  if (a.grants.length !== b.grants.length) return false;
  for (let i = 0; i < a.grants.length; i++) if (a.grants[i] !== b.grants[i]) return false;
  return true;
}

function capped(names: string[]): { names: string[]; count: number } {
  return { names: names.slice(0, EVENT_NAMES_MAX), count: names.length };
}

interface PendingEvent {
  readonly type: EventType;
  readonly action: string;
  readonly subject: string;
  readonly data: unknown;
}

/** What a transaction body collects: memory changes and events, applied only after commit. */
class Batch {
  readonly apply: (() => void)[] = [];
  readonly events: PendingEvent[] = [];
  event(type: EventType, action: string, subject: string, data: unknown): void {
    this.events.push({ type, action, subject, data });
  }
}

/** What discovery said about one unit since the last flush: its latest report and/or state. */
export interface UnitChange {
  readonly report?: UnitReport;
  readonly state?: UnitState;
}

export interface RequestRecord {
  readonly requestId: string;
  readonly assignmentId: string;
  readonly params: string;
}

function prepareStatements(db: Db) {
  return {
    upsertUnit: db.prepare(`
      INSERT INTO units (name, dns_name, addresses, nbd_host, nbd_port, control_host, control_port,
                         capacity_bytes, free_bytes, volumes_max, state, last_seen_at, created_at, spare, zone, nbd_tls,
                         iscsi_host, iscsi_port)
      VALUES (@name, @dnsName, @addresses, @nbdHost, @nbdPort, @controlHost, @controlPort,
              @capacityBytes, @freeBytes, @volumesMax, @state, @lastSeenAt, @createdAt, @spare, @zone, @nbdTls,
              @iscsiHost, @iscsiPort)
      ON CONFLICT (name) DO UPDATE SET dns_name = excluded.dns_name, addresses = excluded.addresses,
        nbd_host = excluded.nbd_host, nbd_port = excluded.nbd_port, control_host = excluded.control_host,
        control_port = excluded.control_port, capacity_bytes = excluded.capacity_bytes,
        free_bytes = excluded.free_bytes, volumes_max = excluded.volumes_max, state = excluded.state,
        last_seen_at = excluded.last_seen_at, spare = excluded.spare, zone = excluded.zone, nbd_tls = excluded.nbd_tls,
        iscsi_host = excluded.iscsi_host, iscsi_port = excluded.iscsi_port`),
    upsertVolume: db.prepare(`
      INSERT INTO volumes (unit, name, number, size_bytes, extents, partitions, grants)
      VALUES (@unit, @name, @number, @sizeBytes, @extents, @partitions, @grants)
      ON CONFLICT (unit, name) DO UPDATE SET number = excluded.number, size_bytes = excluded.size_bytes,
        extents = excluded.extents, partitions = excluded.partitions, grants = excluded.grants`),
    deleteVolume: db.prepare("DELETE FROM volumes WHERE unit = ? AND name = ?"),
    setHostKeyEpoch: db.prepare("UPDATE hosts SET key_epoch = @keyEpoch WHERE name = @name"),
    upsertHost: db.prepare(`
      INSERT INTO hosts (name, address, last_seen_at, created_at, spare, iqn) VALUES (@name, @address, @lastSeenAt, @createdAt, @spare, @iqn)
      ON CONFLICT (name) DO UPDATE SET address = excluded.address, last_seen_at = excluded.last_seen_at, spare = excluded.spare,
        iqn = excluded.iqn`),
    moveAssignment: db.prepare(`
      UPDATE assignments SET host = @host, host_address = @hostAddress, moved_from = @movedFrom, moved_at = @movedAt,
        updated_at = @updatedAt WHERE id = @id`),
    insertAssignment: db.prepare(`
      INSERT INTO assignments (id, request_id, host, host_address, unit, volume, partition, size_bytes,
                               state, carved, wipe, copies, error, detail, created_at, updated_at, protocol)
      VALUES (@id, @requestId, @host, @hostAddress, @unit, @volume, @partition, @sizeBytes,
              @state, @carved, @wipe, @copies, @error, @detail, @createdAt, @updatedAt, @protocol)`),
    updateAssignment: db.prepare(`
      UPDATE assignments SET state = @state, error = @error, detail = @detail, updated_at = @updatedAt,
        host_address = @hostAddress WHERE id = @id`),
    selectAssignment: db.prepare("SELECT * FROM assignments WHERE id = ?"),
    insertLeg: db.prepare(`
      INSERT INTO assignment_legs (assignment_id, leg, unit, volume, size_bytes, state, detail)
      VALUES (@assignmentId, @leg, @unit, @volume, @sizeBytes, @state, @detail)`),
    updateLeg: db.prepare("UPDATE assignment_legs SET state = @state, detail = @detail WHERE assignment_id = @assignmentId AND leg = @leg"),
    selectLegs: db.prepare("SELECT * FROM assignment_legs WHERE assignment_id = ? ORDER BY leg"),
    insertRequest: db.prepare(
      "INSERT INTO requests (request_id, assignment_id, params, created_at) VALUES (?, ?, ?, ?)",
    ),
    selectRequest: db.prepare("SELECT request_id, assignment_id, params FROM requests WHERE request_id = ?"),
    deleteRequestsOf: db.prepare("DELETE FROM requests WHERE assignment_id = ?"),
    insertEvent: db.prepare("INSERT INTO events (at, type, action, subject, data) VALUES (?, ?, ?, ?, ?)"),
    pruneEvents: db.prepare("DELETE FROM events WHERE seq <= ?"),
    eventsAfter: db.prepare("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?"),
    // leg states and replacement (migration 5; src/station/replacement.ts)
    reportLeg: db.prepare("UPDATE assignment_legs SET state = @state, rebuild = @rebuild, error = @error WHERE assignment_id = @assignmentId AND leg = @leg"),
    setLegsGeneration: db.prepare("UPDATE assignments SET legs_generation = ?, updated_at = ? WHERE id = ?"),
    insertReplacement: db.prepare(`
      INSERT INTO leg_replacements (assignment_id, leg, old_unit, old_volume, new_unit, new_volume, size_bytes, created_at)
      VALUES (@assignmentId, @leg, @oldUnit, @oldVolume, @newUnit, @newVolume, @sizeBytes, @createdAtMs)`),
    deleteReplacement: db.prepare("DELETE FROM leg_replacements WHERE assignment_id = ? AND leg = ?"),
    insertDeletion: db.prepare(`
      INSERT OR REPLACE INTO leg_volume_deletions (unit, volume, assignment_id, leg, reason, created_at)
      VALUES (@unit, @volume, @assignmentId, @leg, @reason, @createdAtMs)`),
    deleteDeletion: db.prepare("DELETE FROM leg_volume_deletions WHERE unit = ? AND volume = ?"),
    swapLeg: db.prepare(`
      UPDATE assignment_legs SET unit = @unit, volume = @volume, size_bytes = @sizeBytes, state = @state, detail = @detail,
        rebuild = NULL, error = NULL WHERE assignment_id = @assignmentId AND leg = @leg`),
    moveFirstLeg: db.prepare("UPDATE assignments SET unit = ?, volume = ?, detail = ?, updated_at = ? WHERE id = ?"),
  };
}

export class StationStore {
  readonly units = new Map<string, UnitRecord>();
  /** unit name -> volume name -> volume */
  readonly volumes = new Map<string, Map<string, VolumeRecord>>();
  readonly hosts = new Map<string, HostRecord>();
  /** Live (pending, active, revoking) assignments by id. */
  readonly live = new Map<string, AssignmentRecord>();
  private readonly liveByVolume = new Map<string, Set<string>>();
  /** Leg replacements in progress, by "assignment/leg" (migration 5). */
  readonly replacements = new Map<string, LegReplacementRecord>();
  /** Volumes to delete when their unit is online, by volumeKey (migration 5). */
  readonly legDeletions = new Map<string, LegDeletionRecord>();
  private readonly listeners = new Set<(event: StationEvent) => void>();
  private volumeCountTotal = 0;
  private readonly unitVersions = new Map<string, number>();
  /** The connection's current synchronous mode (openDatabase sets FULL). */
  private durableMode = true;
  private readonly db: Db;
  readonly clock: Clock;
  private readonly statements: ReturnType<typeof prepareStatements>;

  constructor(db: Db, clock: Clock = SYSTEM_CLOCK) {
    this.db = db;
    this.clock = clock;
    this.statements = prepareStatements(db);
    this.load();
  }

  private load(): void {
    for (const row of this.db.prepare("SELECT * FROM units").all() as Row[]) {
      const unit = unitFromRow(row);
      this.units.set(unit.name, unit);
      this.volumes.set(unit.name, new Map());
    }
    for (const row of this.db.prepare("SELECT * FROM volumes").iterate() as Iterable<Row>) {
      const volume = volumeFromRow(row);
      let map = this.volumes.get(volume.unit);
      if (map === undefined) this.volumes.set(volume.unit, (map = new Map()));
      map.set(volume.name, volume);
      this.volumeCountTotal += 1;
    }
    for (const row of this.db.prepare("SELECT * FROM hosts").all() as Row[]) {
      const host: HostRecord = {
        name: row["name"] as string,
        address: row["address"] as string,
        lastSeenAtMs: row["last_seen_at"] as number,
        createdAtMs: row["created_at"] as number,
        spare: row["spare"] === 1,
        keyEpoch: (row["key_epoch"] as number | undefined) ?? 0,
        iqn: (row["iqn"] as string | null | undefined) ?? null,
      };
      this.hosts.set(host.name, host);
    }
    const liveRows = this.db
      .prepare("SELECT * FROM assignments WHERE state IN ('pending', 'active', 'revoking')")
      .all() as Row[];
    const legsOf = new Map<string, LegRecord[]>();
    const legRows = this.db
      .prepare(
        `SELECT l.* FROM assignment_legs l JOIN assignments a ON a.id = l.assignment_id
         WHERE a.state IN ('pending', 'active', 'revoking') ORDER BY l.assignment_id, l.leg`,
      )
      .all() as Row[];
    for (const row of legRows) {
      const id = row["assignment_id"] as string;
      let legs = legsOf.get(id);
      if (legs === undefined) legsOf.set(id, (legs = []));
      legs.push(legFromRow(row));
    }
    for (const row of liveRows) this.indexLive(assignmentFromRow(row, legsOf.get(row["id"] as string)));
    for (const row of this.db.prepare("SELECT * FROM leg_replacements").all() as Row[]) {
      const r = replacementFromRow(row);
      this.replacements.set(replacementKey(r.assignmentId, r.leg), r);
    }
    for (const row of this.db.prepare("SELECT * FROM leg_volume_deletions").all() as Row[]) {
      const d: LegDeletionRecord = {
        unit: row["unit"] as string,
        volume: row["volume"] as string,
        assignmentId: row["assignment_id"] as string,
        leg: row["leg"] as number,
        reason: row["reason"] as LegDeletionRecord["reason"],
        createdAtMs: row["created_at"] as number,
      };
      this.legDeletions.set(volumeKey(d.unit, d.volume), d);
    }
  }

  // ---- transactions and events ------------------------------------------------

  /**
   * Runs `body` in one transaction. `durable` (the default) commits with
   * synchronous=FULL: fsynced before this returns, so an answer sent after it
   * survives kill -9 and power loss. Writes nobody is answered about yet (unit
   * reports, the pending intent of an allocation) commit with NORMAL: they
   * survive kill -9 of the station (the WAL is in the OS), may be lost with the
   * machine's power, and the reconcile loop repairs what that could leave
   * (docs/adr/0005). The next durable commit makes them durable too.
   */
  private commit<T>(body: (batch: Batch) => T, durable = true): T {
    if (durable !== this.durableMode) {
      this.db.pragma(`synchronous = ${durable ? "FULL" : "NORMAL"}`);
      this.durableMode = durable;
    }
    const batch = new Batch();
    const nowMs = this.clock.nowMs();
    const published: StationEvent[] = [];
    const result = this.db.transaction(() => {
      const value = body(batch);
      for (const event of batch.events) {
        const info = this.statements.insertEvent.run(nowMs, event.type, event.action, event.subject, JSON.stringify(event.data));
        const seq = Number(info.lastInsertRowid);
        published.push({ seq, atMs: nowMs, ...event });
        if (seq % 1000 === 0) this.statements.pruneEvents.run(seq - EVENTS_KEPT_MAX);
      }
      return value;
    })();
    for (const apply of batch.apply) apply();
    for (const event of published) {
      for (const listener of this.listeners) listener(event);
    }
    return result;
  }

  /** The connection, for tables kept by their own module (unit identities, src/station/unit_identities.ts). */
  get database(): Db {
    return this.db;
  }

  #unitIdQuery: ReturnType<Db["prepare"]> | undefined;

  /**
   * The identity (UUID) a unit enrolled with (unit_identities, migration 8), or
   * null for a unit from before enrolment: its volumes' SCSI identifiers
   * (scsiNaa) derive from it, as the unit's own do.
   */
  enrolledUnitId(unit: string): string | null {
    this.#unitIdQuery ??= this.db.prepare("SELECT unit_id FROM unit_identities WHERE name = ?");
    const row = this.#unitIdQuery.get(unit) as { unit_id?: unknown } | undefined;
    return typeof row?.unit_id === "string" ? row.unit_id : null;
  }

  /**
   * Runs `write` (statements on a table kept by its own module: tasks,
   * src/station/tasks/) and records one event, in one transaction; `durable`
   * as in commit (a task's progress is written with NORMAL).
   */
  recordChange(type: EventType, action: string, subject: string, data: unknown, write: () => void, durable = true): void {
    this.recordChanges([{ type, action, subject, data }], write, durable);
  }

  /** As recordChange, with several events (a task recorded queued and started at once: one fsync). */
  recordChanges(events: readonly PendingEvent[], write: () => void, durable = true): void {
    this.commit((batch) => {
      write();
      for (const event of events) batch.event(event.type, event.action, event.subject, event.data);
    }, durable);
  }

  /** Records one unit event on its own (identity events: enrolled, impostor, ...), durably. */
  recordUnitEvent(action: string, subject: string, data: unknown): void {
    this.commit((batch) => batch.event("unit", action, subject, data));
  }

  subscribe(listener: (event: StationEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  eventsAfter(seq: number, limit = EVENTS_REPLAY_MAX): StationEvent[] {
    return (this.statements.eventsAfter.all(seq, limit) as Row[]).map((row) => ({
      seq: row["seq"] as number,
      atMs: row["at"] as number,
      type: row["type"] as EventType,
      action: row["action"] as string,
      subject: row["subject"] as string,
      data: json(row["data"], null),
    }));
  }

  // ---- units and volumes --------------------------------------------------------

  get volumeCount(): number {
    return this.volumeCountTotal;
  }

  unitVolumes(unit: string): ReadonlyMap<string, VolumeRecord> {
    return this.volumes.get(unit) ?? new Map();
  }

  volume(unit: string, name: string): VolumeRecord | undefined {
    return this.volumes.get(unit)?.get(name);
  }

  private writeUnit(unit: UnitRecord): void {
    this.statements.upsertUnit.run({
      name: unit.name,
      dnsName: unit.dnsName,
      addresses: JSON.stringify(unit.addresses),
      nbdHost: unit.nbd?.host ?? null,
      nbdPort: unit.nbd?.port ?? null,
      controlHost: unit.control?.host ?? null,
      controlPort: unit.control?.port ?? null,
      capacityBytes: unit.capacityBytes,
      freeBytes: unit.freeBytes,
      volumesMax: unit.volumesMax,
      state: unit.state,
      lastSeenAt: unit.lastSeenAtMs,
      createdAt: unit.createdAtMs,
      spare: unit.spare === true ? 1 : 0,
      zone: unit.zone ?? null,
      nbdTls: unit.tls ?? null,
      iscsiHost: unit.iscsi?.host ?? null,
      iscsiPort: unit.iscsi?.port ?? null,
    });
  }

  private writeVolume(volume: VolumeRecord): void {
    this.statements.upsertVolume.run({
      unit: volume.unit,
      name: volume.name,
      number: volume.number,
      sizeBytes: volume.sizeBytes,
      extents: JSON.stringify(volume.extents),
      partitions: JSON.stringify(volume.partitions),
      grants: volume.grants === null ? null : JSON.stringify(volume.grants),
    });
  }

  /** Changes whenever a unit's volumes or the live assignments on them change (for caches of derived views). */
  unitVersion(unit: string): number {
    return this.unitVersions.get(unit) ?? 0;
  }

  private bumpUnit(unit: string): void {
    this.unitVersions.set(unit, (this.unitVersions.get(unit) ?? 0) + 1);
  }

  private setVolumeInMemory(volume: VolumeRecord): void {
    this.bumpUnit(volume.unit);
    let map = this.volumes.get(volume.unit);
    if (map === undefined) this.volumes.set(volume.unit, (map = new Map()));
    if (!map.has(volume.name)) this.volumeCountTotal += 1;
    map.set(volume.name, volume);
  }

  private deleteVolumeInMemory(unit: string, name: string): void {
    this.bumpUnit(unit);
    if (this.volumes.get(unit)?.delete(name) === true) this.volumeCountTotal -= 1;
  }

  /**
   * A unit described itself (startup or storage info): upsert it and replace its
   * volumes with the reported ones (the unit is the truth for its volumes). Writes
   * only what changed. `state` is what the report implies (a unit that reports is online).
   */
  applyUnitReport(report: UnitReport, state: UnitState = "online"): { added: boolean; volumesChanged: boolean } {
    const added = !this.units.has(report.name);
    const result = this.applyUnitChanges(new Map([[report.name, { report, state }]]));
    return { added, volumesChanged: result.volumesChanged.includes(report.name) };
  }

  /**
   * Reports and state changes of many units in one transaction (one fsync): the
   * station batches what discovery delivers within one event-loop turn. Each
   * unit appears once. Nothing is written when nothing changed.
   */
  applyUnitChanges(changes: ReadonlyMap<string, UnitChange>): { volumesChanged: string[]; stateChanged: string[]; unitsChanged: string[] } {
    const unitsChanged: string[] = [];
    const volumesChanged: string[] = [];
    const stateChanged: string[] = [];
    const memoryOnly: UnitRecord[] = [];
    const staged: ((batch: Batch) => void)[] = [];
    for (const [name, change] of changes) {
      const previous = this.units.get(name);
      if (change.report !== undefined) {
        const plan = this.planReport(change.report, change.state ?? "online");
        if (plan === null) {
          if (previous !== undefined) memoryOnly.push({ ...previous, lastSeenAtMs: this.clock.nowMs() });
          continue;
        }
        unitsChanged.push(name);
        if (plan.volumesChanged) volumesChanged.push(name);
        if (previous?.state !== plan.unit.state) stateChanged.push(name);
        staged.push(plan.stage);
      } else if (change.state !== undefined && previous !== undefined && previous.state !== change.state) {
        const unit: UnitRecord = { ...previous, state: change.state, lastSeenAtMs: change.state === "online" ? this.clock.nowMs() : previous.lastSeenAtMs };
        unitsChanged.push(name);
        stateChanged.push(name);
        staged.push((batch) => {
          this.writeUnit(unit);
          batch.apply.push(() => this.units.set(name, unit));
          batch.event("unit", "state", name, { name, state: unit.state, previousState: previous.state });
        });
      }
    }
    for (const unit of memoryOnly) this.units.set(unit.name, unit);
    if (staged.length > 0) {
      this.commit((batch) => {
        for (const stage of staged) stage(batch);
      }, false);
    }
    return { volumesChanged, stateChanged, unitsChanged };
  }

  /** What a report changes, or null if nothing (then only lastSeenAt moves, in memory). */
  private planReport(report: UnitReport, state: UnitState): { unit: UnitRecord; volumesChanged: boolean; stage: (batch: Batch) => void } | null {
    const nowMs = this.clock.nowMs();
    const previous = this.units.get(report.name);
    const unit: UnitRecord = {
      name: report.name,
      dnsName: report.dnsName !== undefined ? report.dnsName : (previous?.dnsName ?? null),
      addresses: report.addresses ?? previous?.addresses ?? [],
      nbd: report.nbd !== undefined ? report.nbd : (previous?.nbd ?? null),
      control: report.control !== undefined ? report.control : (previous?.control ?? null),
      capacityBytes: report.capacityBytes,
      freeBytes: report.freeBytes,
      volumesMax: report.volumesMax !== undefined ? report.volumesMax : (previous?.volumesMax ?? null),
      state,
      lastSeenAtMs: nowMs,
      createdAtMs: previous?.createdAtMs ?? nowMs,
      // A control-API read does not say: keep what discovery said.
      spare: report.spare ?? previous?.spare ?? false,
      zone: report.zone !== undefined ? report.zone : (previous?.zone ?? null),
      tls: report.tls !== undefined ? report.tls : (previous?.tls ?? null),
      iscsi: report.iscsi !== undefined ? report.iscsi : (previous?.iscsi ?? null),
    };
    const old = this.volumes.get(report.name) ?? new Map<string, VolumeRecord>();
    // Records are made only for what changed: most reports repeat what we have.
    const incoming = new Map<string, VolumeRecord>();
    const reported = new Set<string>();
    const added: string[] = [];
    const changed: string[] = [];
    const removed: string[] = [];
    for (const volume of report.volumes) {
      reported.add(volume.name);
      const before = old.get(volume.name);
      if (before !== undefined && sameVolume(before, volume)) continue;
      (before === undefined ? added : changed).push(volume.name);
      incoming.set(volume.name, { unit: report.name, ...volume });
    }
    for (const name of old.keys()) if (!reported.has(name)) removed.push(name);
    const unitChanged =
      previous === undefined ||
      JSON.stringify({ ...previous, lastSeenAtMs: 0 }) !== JSON.stringify({ ...unit, lastSeenAtMs: 0 });
    const volumesChanged = added.length + changed.length + removed.length > 0;
    if (!unitChanged && !volumesChanged) return null;
    const stage = (batch: Batch): void => {
      this.writeUnit(unit);
      for (const name of [...added, ...changed]) this.writeVolume(incoming.get(name) as VolumeRecord);
      for (const name of removed) this.statements.deleteVolume.run(report.name, name);
      batch.apply.push(() => {
        this.units.set(unit.name, unit);
        for (const name of removed) this.deleteVolumeInMemory(unit.name, name);
        for (const name of [...added, ...changed]) this.setVolumeInMemory(incoming.get(name) as VolumeRecord);
        if (!this.volumes.has(unit.name)) this.volumes.set(unit.name, new Map());
      });
      if (unitChanged) {
        batch.event("unit", previous === undefined ? "added" : previous.state !== state ? "state" : "updated", unit.name, {
          name: unit.name,
          state,
          previousState: previous?.state ?? null,
        });
      }
      if (volumesChanged) {
        batch.event("volumes", "report", unit.name, {
          unit: unit.name,
          added: capped(added),
          changed: capped(changed),
          removed: capped(removed),
        });
      }
    };
    return { unit, volumesChanged, stage };
  }

  /**
   * A unit's iSCSI portal as its GET /v1/info said (discovery packets do not
   * carry it): recorded even when the rest of that read is dropped for a
   * newer discovery report. Null: it serves no iSCSI.
   */
  setUnitIscsi(name: string, iscsi: HostPort | null): void {
    const unit = this.units.get(name);
    if (unit === undefined || JSON.stringify(unit.iscsi ?? null) === JSON.stringify(iscsi)) return;
    const changed: UnitRecord = { ...unit, iscsi };
    this.commit((batch) => {
      this.writeUnit(changed);
      batch.apply.push(() => this.units.set(name, { ...(this.units.get(name) ?? changed), iscsi }));
      batch.event("unit", "updated", name, { name, state: unit.state, previousState: unit.state, iscsi });
    });
  }

  /** The discovery listener's last-heard time (memory only; written with the next change). */
  setUnitLastSeen(name: string, lastSeenAtMs: number): void {
    const unit = this.units.get(name);
    if (unit !== undefined && unit.lastSeenAtMs < lastSeenAtMs) this.units.set(name, { ...unit, lastSeenAtMs });
  }

  /** The listener saw the unit (heartbeat): memory only. */
  touchUnit(name: string): void {
    const unit = this.units.get(name);
    if (unit !== undefined) this.units.set(name, { ...unit, lastSeenAtMs: this.clock.nowMs() });
  }

  /** Unit state from discovery (online, suspect, offline, down). Unknown units are ignored. */
  setUnitState(name: string, state: UnitState): boolean {
    return this.applyUnitChanges(new Map([[name, { state }]])).stateChanged.length > 0;
  }

  /** A volume as the unit's control API answered it (after create, grow, partition, grants). */
  putVolume(volume: VolumeRecord, action: string): void {
    const before = this.volume(volume.unit, volume.name);
    if (before !== undefined && sameVolume(before, volume)) return;
    this.commit((batch) => this.stageVolume(batch, volume, action));
  }

  private stageVolume(batch: Batch, volume: VolumeRecord, action: string): void {
    const before = this.volume(volume.unit, volume.name);
    if (before !== undefined && sameVolume(before, volume)) return;
    this.writeVolume(volume);
    batch.apply.push(() => this.setVolumeInMemory(volume));
    batch.event("volumes", action, volume.unit, {
      unit: volume.unit,
      added: capped(before === undefined ? [volume.name] : []),
      changed: capped(before === undefined ? [] : [volume.name]),
      removed: capped([]),
    });
  }

  removeVolume(unit: string, name: string): void {
    if (this.volume(unit, name) === undefined) return;
    this.commit((batch) => {
      this.statements.deleteVolume.run(unit, name);
      batch.apply.push(() => this.deleteVolumeInMemory(unit, name));
      batch.event("volumes", "deleted", unit, { unit, added: capped([]), changed: capped([]), removed: capped([name]) });
    });
  }

  /** Adjusts a unit's free space after the station carved or deleted a volume (the next report corrects it). */
  adjustUnitFree(name: string, freeBytes: number): void {
    this.commit((batch) => this.stageUnitFree(batch, name, freeBytes));
  }

  private stageUnitFree(batch: Batch, name: string, freeBytes: number): void {
    const unit = this.units.get(name);
    if (unit === undefined || unit.freeBytes === freeBytes) return;
    const next = { ...unit, freeBytes: Math.max(0, freeBytes) };
    this.writeUnit(next);
    batch.apply.push(() => this.units.set(name, next));
  }

  // ---- hosts --------------------------------------------------------------------

  /**
   * Registers or updates a host's data-path address (and, when given, whether
   * it is a spare, and its iSCSI initiator name: null removes it); returns
   * whether it was new / its address changed / its iqn changed.
   */
  putHost(name: string, address: string, spare?: boolean, iqn?: string | null): { host: HostRecord; created: boolean; changed: boolean; iqnChanged: boolean } {
    return this.commit((batch) => this.stageHost(batch, name, address, spare, iqn));
  }

  private stageHost(
    batch: Batch,
    name: string,
    address: string,
    spare?: boolean,
    iqnGiven?: string | null,
  ): { host: HostRecord; created: boolean; changed: boolean; iqnChanged: boolean } {
    const nowMs = this.clock.nowMs();
    const previous = this.hosts.get(name);
    const isSpare = spare ?? previous?.spare ?? false;
    const iqn = iqnGiven !== undefined ? iqnGiven : (previous?.iqn ?? null);
    const host: HostRecord = { name, address, lastSeenAtMs: nowMs, createdAtMs: previous?.createdAtMs ?? nowMs, spare: isSpare, keyEpoch: previous?.keyEpoch ?? 0, iqn };
    const changed = previous !== undefined && previous.address !== address;
    const iqnChanged = (previous?.iqn ?? null) !== iqn;
    this.statements.upsertHost.run({ name, address, lastSeenAt: nowMs, createdAt: host.createdAtMs, spare: isSpare ? 1 : 0, iqn });
    batch.apply.push(() => this.hosts.set(name, host));
    if (previous === undefined || changed || (previous.spare ?? false) !== isSpare || iqnChanged) {
      batch.event("host", previous === undefined ? "added" : "updated", name, { name, address, previousAddress: previous?.address ?? null, spare: isSpare, iqn });
    }
    return { host, created: previous === undefined, changed, iqnChanged };
  }

  /** Raises a host's key epoch (`ipsan hosts rotate-key`): every NBD key of that host changes. Returns the new epoch. */
  rotateHostKey(name: string): number {
    return this.commit((batch) => {
      const host = this.hosts.get(name);
      if (host === undefined) throw new IpsanError("NOT_FOUND", `host ${JSON.stringify(name)} not found`);
      const keyEpoch = (host.keyEpoch ?? 0) + 1;
      this.statements.setHostKeyEpoch.run({ name, keyEpoch });
      batch.apply.push(() => this.hosts.set(name, { ...(this.hosts.get(name) ?? host), keyEpoch }));
      batch.event("host", "key-rotated", name, { name, keyEpoch });
      return keyEpoch;
    });
  }

  /** Heartbeat: memory only (the host's state is derived from lastSeenAt). */
  touchHost(name: string): boolean {
    const host = this.hosts.get(name);
    if (host === undefined) return false;
    this.hosts.set(name, { ...host, lastSeenAtMs: this.clock.nowMs() });
    return true;
  }

  /** A host event that changes no record (host failover's progress: failover-started, failover-waiting). */
  recordHostEvent(name: string, action: string, data: unknown): void {
    this.commit((batch) => batch.event("host", action, name, data), false);
  }

  /**
   * Host failover (host_failover.ts), durably and in one transaction per call:
   * `movedAtMs` null records the start of a move (host and address are the
   * new host's, but while movedFrom is set and movedAtMs is null the station
   * grants the volumes to nobody: the old host is being fenced); a time
   * finishes it (the new host is granted from then on). `events`: recorded
   * for each moved assignment (subject: its id), in order, in the same commit.
   */
  moveAssignments(
    moves: readonly { id: string; host: string; hostAddress: string; movedFrom: string; movedAtMs: number | null }[],
    events: readonly { action: string; data: unknown }[],
  ): AssignmentRecord[] {
    const nowMs = this.clock.nowMs();
    const next: AssignmentRecord[] = [];
    for (const move of moves) {
      const previous = this.live.get(move.id);
      if (previous === undefined) throw new IpsanError("NOT_FOUND", `live assignment ${move.id} not found`);
      next.push({ ...previous, host: move.host, hostAddress: move.hostAddress, movedFrom: move.movedFrom, movedAtMs: move.movedAtMs, updatedAtMs: nowMs });
    }
    this.commit((batch) => {
      for (const a of next) {
        this.statements.moveAssignment.run({ id: a.id, host: a.host, hostAddress: a.hostAddress, movedFrom: a.movedFrom ?? null, movedAt: a.movedAtMs ?? null, updatedAt: nowMs });
        batch.apply.push(() => this.indexLive(a));
        for (const event of events) batch.event("assignment", event.action, a.id, event.data);
      }
    });
    return next;
  }

  /** Records a host's online/offline change as an event (the state itself is derived). */
  recordHostState(name: string, state: string): void {
    this.commit((batch) => batch.event("host", "state", name, { name, state }), false);
  }

  // ---- assignments and requests --------------------------------------------------

  private indexLive(assignment: AssignmentRecord): void {
    const previous = this.live.get(assignment.id);
    if (previous !== undefined) {
      for (const [unit, volume] of volumesOf(previous)) {
        const key = volumeKey(unit, volume);
        const ids = this.liveByVolume.get(key);
        ids?.delete(previous.id);
        if (ids?.size === 0) this.liveByVolume.delete(key);
      }
    }
    // Every volume the assignment holds (each leg of a mirror) is held by it: not free, granted to its host.
    for (const [unit] of volumesOf(assignment)) this.bumpUnit(unit);
    if (LIVE_ASSIGNMENT_STATES.has(assignment.state)) {
      this.live.set(assignment.id, assignment);
      for (const [unit, volume] of volumesOf(assignment)) {
        const key = volumeKey(unit, volume);
        let ids = this.liveByVolume.get(key);
        if (ids === undefined) this.liveByVolume.set(key, (ids = new Set()));
        ids.add(assignment.id);
      }
    } else {
      this.live.delete(assignment.id);
    }
  }

  /**
   * Live assignments on one volume (any partition); for a replacement leg
   * being made (replacement.ts), the mirror it is for: it is that mirror's
   * volume already (granted to its host, shown as its host's, taken).
   */
  liveOnVolume(unit: string, volume: string): AssignmentRecord[] {
    const ids = this.liveByVolume.get(volumeKey(unit, volume));
    const out: AssignmentRecord[] = [];
    for (const id of ids ?? []) {
      const assignment = this.live.get(id);
      if (assignment !== undefined) out.push(assignment);
    }
    const replacing = this.replacementOn(unit, volume);
    const mirror = replacing === undefined ? undefined : this.live.get(replacing.assignmentId);
    if (mirror !== undefined && !out.includes(mirror)) out.push(mirror);
    return out;
  }

  /** Held by a live assignment, or by a leg replacement or deletion (never a free volume: see heldByLegWork). */
  isVolumeAssigned(unit: string, volume: string): boolean {
    return (this.liveByVolume.get(volumeKey(unit, volume))?.size ?? 0) > 0 || this.heldByLegWork(unit, volume);
  }

  /**
   * Inserts a pending assignment, with a request id its idempotency record, and
   * with `host` the host's registration, all in one transaction (one fsync).
   */
  insertAssignment(assignment: AssignmentRecord, request?: { requestId: string; params: string }, host?: { name: string; address: string }): void {
    assert(assignment.state === "pending", `new assignment ${assignment.id} must be pending`);
    this.commit((batch) => {
      if (host !== undefined) this.stageHost(batch, host.name, host.address);
      this.statements.insertAssignment.run({
        id: assignment.id,
        requestId: assignment.requestId,
        host: assignment.host,
        hostAddress: assignment.hostAddress,
        unit: assignment.unit,
        volume: assignment.volume,
        partition: assignment.partition,
        sizeBytes: assignment.sizeBytes,
        state: assignment.state,
        carved: assignment.carved ? 1 : 0,
        wipe: assignment.wipe ? 1 : 0,
        copies: assignment.copies,
        protocol: assignment.protocol ?? "nbd",
        error: assignment.error,
        detail: assignment.detail === null ? null : JSON.stringify(assignment.detail),
        createdAt: assignment.createdAtMs,
        updatedAt: assignment.updatedAtMs,
      });
      // All legs of a mirror are recorded with it, in the same transaction: reconcile finds all or none.
      for (const leg of assignment.legs) {
        this.statements.insertLeg.run({
          assignmentId: assignment.id,
          leg: leg.index,
          unit: leg.unit,
          volume: leg.volume,
          sizeBytes: leg.sizeBytes,
          state: leg.state,
          detail: leg.detail === null ? null : JSON.stringify(leg.detail),
        });
      }
      if (request !== undefined) {
        this.statements.insertRequest.run(request.requestId, assignment.id, request.params, assignment.createdAtMs);
      }
      batch.apply.push(() => this.indexLive(assignment));
      batch.event("assignment", "pending", assignment.id, { id: assignment.id, host: assignment.host, unit: assignment.unit, volume: assignment.volume, partition: assignment.partition });
    }, false);
  }

  /** Moves an assignment along its state machine (asserted), with an optional patch. */
  updateAssignment(
    id: string,
    to: AssignmentState,
    patch: {
      error?: string | null;
      detail?: AssignmentDetail | null;
      hostAddress?: string;
      dropRequest?: boolean;
      /** Written in the same transaction: the volume as the unit answered, the unit's new free space. */
      volume?: VolumeRecord;
      /** More volumes as their units answered (a mirror's legs), in the same transaction. */
      volumes?: readonly VolumeRecord[];
      /** New state and detail of legs (matched by index), in the same transaction. */
      legs?: readonly LegRecord[];
      unitFree?: { unit: string; freeBytes: number };
    } = {},
  ): AssignmentRecord {
    const previous = this.getAssignment(id);
    if (previous === undefined) throw new IpsanError("NOT_FOUND", `assignment ${id} not found`);
    assert(
      previous.state === to || ASSIGNMENT_TRANSITIONS[previous.state].includes(to),
      `assignment ${id}: transition ${previous.state} -> ${to}`,
    );
    const next: AssignmentRecord = {
      ...previous,
      state: to,
      error: patch.error !== undefined ? patch.error : previous.error,
      detail: patch.detail !== undefined ? patch.detail : previous.detail,
      hostAddress: patch.hostAddress ?? previous.hostAddress,
      legs: patch.legs === undefined ? previous.legs : previous.legs.map((leg) => patch.legs?.find((l) => l.index === leg.index) ?? leg),
      updatedAtMs: this.clock.nowMs(),
    };
    this.commit((batch) => {
      if (patch.volume !== undefined) this.stageVolume(batch, patch.volume, "grants");
      for (const volume of patch.volumes ?? []) this.stageVolume(batch, volume, "grants");
      for (const leg of patch.legs ?? []) {
        this.statements.updateLeg.run({ assignmentId: id, leg: leg.index, state: leg.state, detail: leg.detail === null ? null : JSON.stringify(leg.detail) });
      }
      if (patch.unitFree !== undefined) this.stageUnitFree(batch, patch.unitFree.unit, patch.unitFree.freeBytes);
      this.statements.updateAssignment.run({
        id,
        state: next.state,
        error: next.error,
        detail: next.detail === null ? null : JSON.stringify(next.detail),
        updatedAt: next.updatedAtMs,
        hostAddress: next.hostAddress,
      });
      if (patch.dropRequest === true) this.statements.deleteRequestsOf.run(id);
      batch.apply.push(() => this.indexLive(next));
      if (previous.state !== to || previous.hostAddress !== next.hostAddress) {
        batch.event("assignment", to, id, { id, host: next.host, unit: next.unit, volume: next.volume, partition: next.partition, error: next.error });
      }
    });
    return next;
  }

  getAssignment(id: string): AssignmentRecord | undefined {
    const live = this.live.get(id);
    if (live !== undefined) return live;
    const row = this.statements.selectAssignment.get(id) as Row | undefined;
    return row === undefined ? undefined : this.fromRow(row);
  }

  /** A history row with its legs (looked up only for mirrors). */
  private fromRow(row: Row): AssignmentRecord {
    const copies = (row["copies"] as number | undefined) ?? 1;
    return assignmentFromRow(row, copies > 1 ? (this.statements.selectLegs.all(row["id"]) as Row[]).map(legFromRow) : []);
  }

  /** Live assignments, or with `all` the history too (newest first, bounded). */
  listAssignments(options: { host?: string; all?: boolean } = {}): AssignmentRecord[] {
    let list: AssignmentRecord[];
    if (options.all === true) {
      const rows = (
        options.host === undefined
          ? this.db.prepare("SELECT * FROM assignments ORDER BY created_at DESC LIMIT ?").all(ASSIGNMENT_HISTORY_MAX)
          : this.db.prepare("SELECT * FROM assignments WHERE host = ? ORDER BY created_at DESC LIMIT ?").all(options.host, ASSIGNMENT_HISTORY_MAX)
      ) as Row[];
      list = rows.map((row) => this.live.get(row["id"] as string) ?? this.fromRow(row));
    } else {
      list = [...this.live.values()].filter((a) => options.host === undefined || a.host === options.host);
      list.sort((a, b) => a.createdAtMs - b.createdAtMs || (a.id < b.id ? -1 : 1));
    }
    return list;
  }

  findRequest(requestId: string): RequestRecord | undefined {
    const row = this.statements.selectRequest.get(requestId) as Row | undefined;
    if (row === undefined) return undefined;
    return { requestId, assignmentId: row["assignment_id"] as string, params: row["params"] as string };
  }

  // ---- leg states and replacement (migration 5; src/station/replacement.ts) --------

  /** A replacement leg being made, or a volume waiting to be deleted: not free, not reusable. */
  heldByLegWork(unit: string, volume: string): boolean {
    if (this.legDeletions.has(volumeKey(unit, volume))) return true;
    return this.replacementOn(unit, volume) !== undefined;
  }

  /** The replacement in progress whose new leg is this volume. */
  replacementOn(unit: string, volume: string): LegReplacementRecord | undefined {
    if (this.replacements.size === 0) return undefined;
    for (const r of this.replacements.values()) if (r.newUnit === unit && r.newVolume === volume) return r;
    return undefined;
  }

  /** An event with no other change (e.g. leg-replacement-waiting); not fsynced on its own. */
  recordEvent(action: string, subject: string, data: unknown): void {
    this.commit((batch) => batch.event("assignment", action, subject, data), false);
  }

  /**
   * A host's leg report, already matched to the station's legs: their states,
   * rebuilds and errors and the report's generation, with the events, in one
   * transaction.
   */
  applyLegReport(
    id: string,
    generation: number,
    legs: readonly LegRecord[],
    events: readonly { action: string; data: unknown }[],
  ): AssignmentRecord {
    const previous = this.getAssignment(id);
    if (previous === undefined) throw new IpsanError("NOT_FOUND", `assignment ${id} not found`);
    const next: AssignmentRecord = {
      ...previous,
      legs: previous.legs.map((leg) => legs.find((l) => l.index === leg.index) ?? leg),
      legsGeneration: generation,
      updatedAtMs: this.clock.nowMs(),
    };
    const durable = events.some((e) => e.action === "leg-state");
    this.commit((batch) => {
      for (const leg of legs) {
        this.statements.reportLeg.run({
          assignmentId: id,
          leg: leg.index,
          state: leg.state,
          rebuild: leg.rebuild === undefined || leg.rebuild === null ? null : JSON.stringify(leg.rebuild),
          error: leg.error ?? null,
        });
      }
      this.statements.setLegsGeneration.run(generation, next.updatedAtMs, id);
      for (const event of events) batch.event("assignment", event.action, id, event.data);
      batch.apply.push(() => this.indexLive(next));
    }, durable);
    return next;
  }

  /** Records a replacement before any unit is called (event leg-replacing). */
  beginReplacement(record: LegReplacementRecord, data: unknown): void {
    this.commit((batch) => {
      this.statements.insertReplacement.run(record);
      batch.apply.push(() => {
        this.replacements.set(replacementKey(record.assignmentId, record.leg), record);
        this.bumpUnit(record.newUnit);
      });
      batch.event("assignment", "leg-replacing", record.assignmentId, data);
    });
  }

  /** Undoes a replacement: its new volume (if made) is deleted when its unit is online (event leg-replacement-undone). */
  undoReplacement(record: LegReplacementRecord, reason: string): void {
    const deletion: LegDeletionRecord = {
      unit: record.newUnit,
      volume: record.newVolume,
      assignmentId: record.assignmentId,
      leg: record.leg,
      reason: "undone",
      createdAtMs: this.clock.nowMs(),
    };
    this.commit((batch) => {
      this.statements.deleteReplacement.run(record.assignmentId, record.leg);
      this.statements.insertDeletion.run(deletion);
      batch.apply.push(() => {
        this.replacements.delete(replacementKey(record.assignmentId, record.leg));
        this.legDeletions.set(volumeKey(deletion.unit, deletion.volume), deletion);
        this.bumpUnit(record.newUnit);
      });
      batch.event("assignment", "leg-replacement-undone", record.assignmentId, {
        id: record.assignmentId,
        leg: record.leg,
        unit: record.newUnit,
        volume: record.newVolume,
        keeps: { unit: record.oldUnit, volume: record.oldVolume },
        reason,
      });
    });
  }

  /**
   * Swaps a made and granted replacement into the assignment at its index
   * (state "rebuilding"), records the old leg's volume for deletion, and drops
   * the replacement record: one transaction (event leg-replaced).
   */
  swapLeg(record: LegReplacementRecord, volume: VolumeRecord, detail: AssignmentDetail, assignmentDetail: AssignmentDetail | null): AssignmentRecord {
    const previous = this.getAssignment(record.assignmentId);
    if (previous === undefined) throw new IpsanError("NOT_FOUND", `assignment ${record.assignmentId} not found`);
    const nowMs = this.clock.nowMs();
    const leg: LegRecord = {
      index: record.leg,
      unit: record.newUnit,
      volume: record.newVolume,
      sizeBytes: record.sizeBytes,
      state: "rebuilding",
      detail,
      rebuild: null,
      error: null,
    };
    const first = record.leg === 0;
    const next: AssignmentRecord = {
      ...previous,
      legs: previous.legs.map((l) => (l.index === record.leg ? leg : l)),
      ...(first ? { unit: leg.unit, volume: leg.volume, detail: assignmentDetail } : {}),
      updatedAtMs: nowMs,
    };
    const deletion: LegDeletionRecord = {
      unit: record.oldUnit,
      volume: record.oldVolume,
      assignmentId: record.assignmentId,
      leg: record.leg,
      reason: "replaced",
      createdAtMs: nowMs,
    };
    this.commit((batch) => {
      this.stageVolume(batch, volume, "grants");
      this.statements.swapLeg.run({
        assignmentId: record.assignmentId,
        leg: record.leg,
        unit: leg.unit,
        volume: leg.volume,
        sizeBytes: leg.sizeBytes,
        state: leg.state,
        detail: JSON.stringify(detail),
      });
      if (first) this.statements.moveFirstLeg.run(leg.unit, leg.volume, assignmentDetail === null ? null : JSON.stringify(assignmentDetail), nowMs, record.assignmentId);
      this.statements.deleteReplacement.run(record.assignmentId, record.leg);
      this.statements.insertDeletion.run(deletion);
      batch.apply.push(() => {
        this.replacements.delete(replacementKey(record.assignmentId, record.leg));
        this.legDeletions.set(volumeKey(deletion.unit, deletion.volume), deletion);
        this.bumpUnit(record.oldUnit);
        this.indexLive(next);
      });
      batch.event("assignment", "leg-replaced", record.assignmentId, {
        id: record.assignmentId,
        leg: record.leg,
        unit: leg.unit,
        volume: leg.volume,
        replaced: { unit: record.oldUnit, volume: record.oldVolume },
      });
    });
    return next;
  }

  /** The unit deleted (or no longer has) a volume the station was to delete (event leg-volume-deleted). */
  finishLegDeletion(deletion: LegDeletionRecord, data: unknown): void {
    this.commit((batch) => {
      this.statements.deleteDeletion.run(deletion.unit, deletion.volume);
      this.statements.deleteVolume.run(deletion.unit, deletion.volume);
      batch.apply.push(() => {
        this.legDeletions.delete(volumeKey(deletion.unit, deletion.volume));
        this.deleteVolumeInMemory(deletion.unit, deletion.volume);
      });
      batch.event("assignment", "leg-volume-deleted", deletion.assignmentId, data);
    });
  }

  close(): void {
    this.db.close();
  }
}
