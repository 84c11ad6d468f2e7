// Unit identities in the station's database (migration 8): the persistence
// behind src/discovery/identities.ts, and what the station API shows of them
// (never a secret). Every write is a durable (synchronous=FULL) transaction of
// its own: a secret the station hands out is on disk before the ENROL leaves.

import type { IdentityPersistence, UnitIdentities, UnitIdentity } from "../discovery/identities.ts";
import { IpsanError } from "../util/errors.ts";
import type { Db } from "./db.ts";
import type { StationStore } from "./store.ts";

interface Row {
  name: string;
  unit_id: string;
  epoch: number;
  secret: Buffer;
  next_secret: Buffer | null;
  confirmed: number;
  enrolled_at: number;
  updated_at: number;
}

export function identityPersistence(db: Db): IdentityPersistence {
  const select = db.prepare("SELECT * FROM unit_identities ORDER BY name");
  const upsert = db.prepare(`
    INSERT INTO unit_identities (name, unit_id, epoch, secret, next_secret, confirmed, enrolled_at, updated_at)
    VALUES (@name, @unitId, @epoch, @secret, @next, @confirmed, @enrolledAt, @updatedAt)
    ON CONFLICT (name) DO UPDATE SET unit_id = excluded.unit_id, epoch = excluded.epoch, secret = excluded.secret,
      next_secret = excluded.next_secret, confirmed = excluded.confirmed, updated_at = excluded.updated_at`);
  const remove = db.prepare("DELETE FROM unit_identities WHERE name = ?");
  // FULL is always safe here: the store switches the mode back when it wants NORMAL (it only ever lowers it on purpose).
  // A write that need not be durable runs in whatever mode the connection is in (never lowered here).
  const write = (body: () => void, durable = true): void => {
    if (durable) {
      db.pragma("synchronous = FULL");
      db.transaction(body)();
      return;
    }
    // NORMAL for this one write (survives kill -9, not a power cut), then FULL again: never left lower than found.
    db.pragma("synchronous = NORMAL");
    try {
      db.transaction(body)();
    } finally {
      db.pragma("synchronous = FULL");
    }
  };
  const row = (identity: UnitIdentity) => ({
    name: identity.name,
    unitId: identity.unitId,
    epoch: identity.epoch,
    secret: identity.secret,
    next: identity.next,
    confirmed: identity.confirmed ? 1 : 0,
    enrolledAt: identity.enrolledAtMs,
    updatedAt: identity.updatedAtMs,
  });
  return {
    load: () =>
      (select.all() as Row[]).map((row) => ({
        name: row.name,
        unitId: row.unit_id,
        epoch: row.epoch,
        secret: Buffer.from(row.secret),
        next: row.next_secret === null ? null : Buffer.from(row.next_secret),
        confirmed: row.confirmed === 1,
        enrolledAtMs: row.enrolled_at,
        updatedAtMs: row.updated_at,
      })),
    save: (identity: UnitIdentity, durable: boolean) => write(() => void upsert.run(row(identity)), durable),
    saveMany: (identities: readonly UnitIdentity[]) =>
      write(() => {
        for (const identity of identities) upsert.run(row(identity));
      }),
    remove: (name: string) => write(() => void remove.run(name)),
  };
}

/** What the API shows of a unit's identity (GET /api/v1/units/NAME/identity): never the secret. */
export interface IdentityView {
  readonly unit: string;
  readonly unitId: string;
  readonly epoch: number;
  /** pending: secret issued, the unit has not signed with it yet; enrolled; rotating: a next secret offered. */
  readonly state: "pending" | "enrolled" | "rotating";
  readonly enrolledAt: string;
  readonly updatedAt: string;
}

export function identityView(identity: UnitIdentity): IdentityView {
  return {
    unit: identity.name,
    unitId: identity.unitId,
    epoch: identity.epoch,
    state: !identity.confirmed ? "pending" : identity.next !== null ? "rotating" : "enrolled",
    enrolledAt: new Date(identity.enrolledAtMs).toISOString(),
    updatedAt: new Date(identity.updatedAtMs).toISOString(),
  };
}

/** What the station core holds for identities (StationOptions.unitIdentities). */
export interface IdentityAdmin {
  readonly identities: UnitIdentities;
  rotate(unit: string): UnitIdentity | undefined;
}

function adminOf(admin: IdentityAdmin | undefined): IdentityAdmin {
  if (admin === undefined) throw new IpsanError("UNAVAILABLE", "this station keeps no unit identities");
  return admin;
}

function enrolledOr404(admin: IdentityAdmin, name: string): UnitIdentity {
  const identity = admin.identities.get(name);
  if (identity === undefined) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(name)} is not enrolled`, { field: "unit" });
  return identity;
}

/** GET /api/v1/units/NAME/identity */
export function identityOf(admin: IdentityAdmin | undefined, name: string): IdentityView {
  return identityView(enrolledOr404(adminOf(admin), name));
}

/** POST /api/v1/units/NAME/rotate-secret: starts a rotation (202); the unit switches at its next datagram. */
export function rotateSecret(admin: IdentityAdmin | undefined, store: StationStore, name: string): IdentityView {
  const a = adminOf(admin);
  const identity = enrolledOr404(a, name);
  if (!identity.confirmed) throw new IpsanError("CONFLICT", `unit ${name} is still enrolling (it has not used its first secret yet); rotate it later`, { field: "unit" });
  const rotated = a.rotate(name) ?? identity;
  store.recordUnitEvent("unit-secret-rotation-started", name, { unitId: rotated.unitId, epoch: rotated.epoch + 1 });
  return identityView(rotated);
}

/** DELETE /api/v1/units/NAME/identity: the next unit to claim the name enrols afresh (a replacement for a lost data dir). */
export function forgetIdentity(admin: IdentityAdmin | undefined, store: StationStore, name: string): { unit: string; unitId: string; forgotten: true } {
  const a = adminOf(admin);
  const identity = enrolledOr404(a, name);
  a.identities.forget(name);
  store.recordUnitEvent("unit-forgotten", name, { unitId: identity.unitId });
  return { unit: name, unitId: identity.unitId, forgotten: true };
}
