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
// acted on, so a station restart never forgets a secret it gave out.

import { randomBytes } from "node:crypto";
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

/** Where identities live (the station's database); every call is durable before it returns. */
export interface IdentityPersistence {
  load(): readonly UnitIdentity[];
  save(identity: UnitIdentity): void;
  remove(name: string): void;
}

export type IdentityChange = "enrolled" | "confirmed" | "rotation-started" | "rotated" | "forgotten";

export class UnitIdentities {
  private readonly byName = new Map<string, UnitIdentity>();
  private readonly packetKeys = new Map<string, { secret: Buffer; next: Buffer | null; keys: Buffer[] }>();
  private readonly persistence: IdentityPersistence | undefined;
  private readonly listeners = new Set<(name: string, change: IdentityChange) => void>();
  private readonly nowMs: () => number;

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
    this.put(identity, "enrolled");
    return identity;
  }

  /** The unit signed with its secret: it holds it. */
  confirm(name: string): void {
    const identity = this.byName.get(name);
    if (identity === undefined || identity.confirmed) return;
    this.put({ ...identity, confirmed: true, updatedAtMs: this.nowMs() }, "confirmed");
  }

  /** Starts a rotation (idempotent while one is under way: the same next secret is offered again). */
  rotate(name: string): UnitIdentity | undefined {
    const identity = this.byName.get(name);
    if (identity === undefined) return undefined;
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
    this.persistence?.remove(name);
    this.byName.delete(name);
    this.packetKeys.delete(name);
    this.notify(name, "forgotten");
    return true;
  }

  private put(identity: UnitIdentity, change: IdentityChange): void {
    this.persistence?.save(identity);
    this.byName.set(identity.name, identity);
    this.notify(identity.name, change);
  }

  private notify(name: string, change: IdentityChange): void {
    for (const listener of this.listeners) listener(name, change);
  }
}
