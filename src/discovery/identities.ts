// The station's record of enrolled units (issue 7, ADR 0004 amended): for
// each unit name, the identity (UUID from the unit's volume table) it
// enrolled with and the unit's own 32-byte secret. The cluster key only
// enrols; from then on that unit's datagrams and the station's control calls
// use keys derived from its own secret, and a datagram in its name signed
// with the cluster key alone is refused.
//
// Lifecycle of one name:
//   (none) --STARTUP with an id, cluster key--> pending (secret issued, ENROL sent)
//   pending --a datagram signed with the secret--> confirmed
//   confirmed --rotate()--> confirmed + next (ENROL of the next secret, sealed under the current one)
//   next --a datagram signed with the next secret--> confirmed (next becomes the secret, epoch + 1)
//   any --forget()--> (none)   (`ipsan units forget NAME`: lets a replacement with a new id enrol)
// Every change is persisted (the station: SQLite, migration 8) before it is
// acted on, so a station restart never forgets a secret it gave out. First
// enrolments are group-committed: those issued within one turn of the event
// loop are written in one transaction (one fsync), and their ENROLs go out
// after it (whenDurable), so a fleet joining at once costs a few fsyncs, not
// one per unit.

import { randomBytes } from "node:crypto";
import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { UNIT_SECRET_BYTES, unitControlTokenFor, unitPacketKeyFor } from "./keys.ts";

export interface UnitIdentity {
  readonly name: string;
  /** The unit's UUID (its volume table's unitId). */
  readonly unitId: string;
  /** 1 at first join, +1 per rotation. */
  readonly epoch: number;
  readonly secret: Buffer;
  /** A rotation under way: the next secret (epoch + 1), until the unit signs with it. */
  readonly next: Buffer | null;
  /** The unit has signed a datagram with its secret (until then a STARTUP with the same id gets the secret again). */
  readonly confirmed: boolean;
  readonly enrolledAtMs: number;
  readonly updatedAtMs: number;
}

/**
 * Where identities live (the station's database). save() is durable before it
 * returns unless `durable` is false (a confirmation: if a power cut loses it,
 * the unit's next datagram signed with its secret confirms it again).
 */
export interface IdentityPersistence {
  load(): readonly UnitIdentity[];
  save(identity: UnitIdentity, durable: boolean): void;
  /** Several first enrolments in one durable transaction (one fsync for a burst of new units). */
  saveMany(identities: readonly UnitIdentity[]): void;
  remove(name: string): void;
}

export type IdentityChange = "enrolled" | "confirmed" | "rotation-started" | "rotated" | "forgotten";

export class UnitIdentities {
  private readonly byName = new Map<string, UnitIdentity>();
  private readonly packetKeys = new Map<string, { secret: Buffer; next: Buffer | null; keys: Buffer[] }>();
  private readonly persistence: IdentityPersistence | undefined;
  private readonly listeners = new Set<(name: string, change: IdentityChange) => void>();
  private readonly nowMs: () => number;
  /** First enrolments issued in memory, not yet on disk (their ENROL waits: whenDurable). */
  private readonly unsaved = new Map<string, UnitIdentity>();
  private readonly waiting = new Map<string, (() => void)[]>();
  private flushScheduled = false;

  constructor(options: { persistence?: IdentityPersistence; nowMs?: () => number } = {}) {
    this.persistence = options.persistence;
    this.nowMs = options.nowMs ?? Date.now;
    for (const identity of this.persistence?.load() ?? []) this.byName.set(identity.name, identity);
  }

  get size(): number {
    return this.byName.size;
  }

  get(name: string): UnitIdentity | undefined {
    return this.byName.get(name);
  }

  list(): UnitIdentity[] {
    return [...this.byName.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  onChange(listener: (name: string, change: IdentityChange) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** The packet keys a datagram signed with this unit's key may use: [secret's, next secret's]. Empty: not enrolled. */
  keysFor(name: string): readonly Buffer[] {
    const identity = this.byName.get(name);
    if (identity === undefined) return [];
    const cached = this.packetKeys.get(name);
    if (cached !== undefined && cached.secret === identity.secret && cached.next === identity.next) return cached.keys;
    const keys = [unitPacketKeyFor(identity.secret), ...(identity.next === null ? [] : [unitPacketKeyFor(identity.next)])];
    this.packetKeys.set(name, { secret: identity.secret, next: identity.next, keys });
    return keys;
  }

  /** The key the station signs this unit's datagrams with (its confirmed secret's), or undefined if not enrolled. */
  sendKey(name: string): Buffer | undefined {
    return this.keysFor(name)[0];
  }

  /** The bearer token for this unit's control API, or undefined if not enrolled. */
  controlToken(name: string): string | undefined {
    const identity = this.byName.get(name);
    return identity === undefined ? undefined : unitControlTokenFor(identity.secret, name);
  }

  /** Issues a first secret for a name nobody holds (pending until the unit signs with it). */
  enrol(name: string, unitId: string): UnitIdentity {
    const existing = this.byName.get(name);
    if (existing !== undefined) return existing;
    const nowMs = this.nowMs();
    const identity: UnitIdentity = {
      name,
      unitId,
      epoch: 1,
      secret: randomBytes(UNIT_SECRET_BYTES),
      next: null,
      confirmed: false,
      enrolledAtMs: nowMs,
      updatedAtMs: nowMs,
    };
    this.byName.set(name, identity);
    this.unsaved.set(name, identity);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
    this.notify(name, "enrolled");
    return identity;
  }

  /** Runs `then` once the name's first enrolment is on disk (at once if nothing of it is waiting). Dropped if the write fails. */
  whenDurable(name: string, then: () => void): void {
    if (!this.unsaved.has(name)) return then();
    const list = this.waiting.get(name) ?? [];
    list.push(then);
    this.waiting.set(name, list);
  }

  /** Writes the enrolments issued since the last flush in one transaction, then runs what waited for them. */
  flush(): void {
    this.flushScheduled = false;
    const batch = [...this.unsaved.values()];
    this.unsaved.clear();
    if (batch.length === 0) return;
    try {
      this.persistence?.saveMany(batch);
    } catch (error) {
      // Not on disk: forget them in memory too (their ENROL never left); the units' next STARTUP enrols again.
      logger("discovery").error("cannot store unit enrolments; the units will retry", { units: batch.length, error: errorMessage(error) });
      for (const identity of batch) {
        if (this.byName.get(identity.name) === identity) this.byName.delete(identity.name);
        this.waiting.delete(identity.name);
      }
      return;
    }
    for (const identity of batch) {
      const list = this.waiting.get(identity.name) ?? [];
      this.waiting.delete(identity.name);
      for (const then of list) then();
    }
  }

  /** The unit signed with its secret: it holds it. */
  confirm(name: string): void {
    const identity = this.byName.get(name);
    if (identity === undefined || identity.confirmed) return;
    if (this.unsaved.has(name)) this.flush(); // the unit cannot hold an unsent secret, but keep the order of writes
    this.put({ ...identity, confirmed: true, updatedAtMs: this.nowMs() }, "confirmed", false);
  }

  /** Starts a rotation (idempotent while one is under way: the same next secret is offered again). */
  rotate(name: string): UnitIdentity | undefined {
    const identity = this.byName.get(name);
    if (identity === undefined || !identity.confirmed) return undefined;
    if (identity.next !== null) return identity;
    const rotated = { ...identity, next: randomBytes(UNIT_SECRET_BYTES), updatedAtMs: this.nowMs() };
    this.put(rotated, "rotation-started");
    return rotated;
  }

  /** The unit signed with its next secret: it becomes the secret. */
  promote(name: string): void {
    const identity = this.byName.get(name);
    if (identity === undefined || identity.next === null) return;
    this.put({ ...identity, secret: identity.next, next: null, epoch: identity.epoch + 1, confirmed: true, updatedAtMs: this.nowMs() }, "rotated");
  }

  /** Forgets a name: the next unit to claim it enrols afresh. False if it was not enrolled. */
  forget(name: string): boolean {
    if (!this.byName.has(name)) return false;
    if (this.unsaved.has(name)) this.flush();
    this.persistence?.remove(name);
    this.byName.delete(name);
    this.packetKeys.delete(name);
    this.notify(name, "forgotten");
    return true;
  }

  private put(identity: UnitIdentity, change: IdentityChange, durable = true): void {
    this.persistence?.save(identity, durable);
    this.byName.set(identity.name, identity);
    this.notify(identity.name, change);
  }

  private notify(name: string, change: IdentityChange): void {
    for (const listener of this.listeners) listener(name, change);
  }
}
