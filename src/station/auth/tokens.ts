// The station's API credentials (docs/api.md "Authentication", docs/security.md).
//
// Three kinds, one table (migration 7), one lookup:
// - "token": a named token with a role (admin, operator, viewer), made by
//   `ipsan tokens create`;
// - "host": a host's own credential (role host, bound to one host name),
//   named `host:NAME`, made when the host registers with a join token;
// - "join": a one-time join token (role join: it may only register a host),
//   named `join-XXXXXXXX`, with an expiry, optionally bound to a host name.
// DATA/admin.token is the built-in admin token named "admin" (never stored
// here; its file is its record).
//
// Only SHA-256 digests of secrets are kept. A presented bearer token is
// hashed and compared with every live credential's digest by timingSafeEqual
// (no early exit: the time does not depend on which one matched). Revoking
// deletes the row and the cached digest at once, so the next request with it
// is refused.

import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { IpsanError } from "../../util/errors.ts";
import type { Db } from "../db.ts";
import { SYSTEM_CLOCK, type Clock } from "../store.ts";
import { show } from "../validate.ts";

export const ROLES = ["admin", "operator", "viewer", "host"] as const;
export type Role = (typeof ROLES)[number] | "join";
/** Roles `ipsan tokens create` makes (a host credential comes from registration). */
export const TOKEN_ROLES = ["admin", "operator", "viewer"] as const;
export type TokenRole = (typeof TOKEN_ROLES)[number];
export type TokenKind = "token" | "host" | "join";

export const ADMIN_TOKEN_NAME = "admin";
export const TOKEN_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** A join token lives this long unless `--expires` says otherwise. */
export const JOIN_TOKEN_TTL_MS_DEFAULT = 3_600_000;
/** Longest join token life: 7 days. */
export const JOIN_TOKEN_TTL_MS_MAX = 7 * 24 * 3_600_000;
/** Credentials of all kinds the station keeps (bounds the table and each request's scan). */
export const CREDENTIALS_MAX = 100_000;
const SECRET_BYTES = 32;
/** A used or expired join token stays listed this long (who enrolled when), then is dropped. */
export const SPENT_JOIN_KEPT_MS = 7 * 24 * 3_600_000;

/** Who made a request: a credential's name and role (and, for a host credential, its host). */
export interface Principal {
  readonly name: string;
  readonly role: Role;
  readonly host: string | null;
}

export interface TokenRecord {
  readonly name: string;
  readonly kind: TokenKind;
  readonly role: Role;
  readonly host: string | null;
  readonly createdAtMs: number;
  readonly expiresAtMs: number | null;
  readonly usedAtMs: number | null;
}

interface Cached extends TokenRecord {
  readonly digest: Buffer;
}

interface Row {
  name: string;
  kind: string;
  role: string;
  host: string | null;
  digest: Buffer;
  created_at: number;
  expires_at: number | null;
  used_at: number | null;
}

export function digestOf(secret: string): Buffer {
  return createHash("sha256").update(secret).digest();
}

/** A new secret: a prefix that says what it is (for secret scanners), then 32 random bytes. */
function newSecret(kind: TokenKind): string {
  const prefix = kind === "join" ? "ipsanj" : kind === "host" ? "ipsanh" : "ipsant";
  return `${prefix}_${randomBytes(SECRET_BYTES).toString("base64url")}`;
}

export function hostCredentialName(host: string): string {
  return `host:${host}`;
}

export type Authentication = { kind: "ok"; principal: Principal } | { kind: "refused"; reason: string };

export class TokenStore {
  readonly #db: Db;
  readonly #clock: Clock;
  readonly #adminDigest: Buffer;
  readonly #cache = new Map<string, Cached>();

  constructor(db: Db, adminToken: string, clock: Clock = SYSTEM_CLOCK) {
    this.#db = db;
    this.#clock = clock;
    this.#adminDigest = digestOf(adminToken);
    for (const row of db.prepare("SELECT * FROM tokens").all() as Row[]) this.#cache.set(row.name, fromRow(row));
  }

  /** Who holds `secret` (a bearer token), or why it is refused (the reason never repeats the secret). */
  authenticate(secret: string): Authentication {
    const digest = digestOf(secret);
    // Every comparison is made; the match is picked afterwards.
    let match: Cached | null = null;
    const admin = timingSafeEqual(digest, this.#adminDigest);
    for (const record of this.#cache.values()) {
      if (timingSafeEqual(digest, record.digest)) match = record;
    }
    if (admin) return { kind: "ok", principal: { name: ADMIN_TOKEN_NAME, role: "admin", host: null } };
    if (match === null) return { kind: "refused", reason: "missing or wrong bearer token" };
    if (match.kind === "join") {
      if (match.usedAtMs !== null) return { kind: "refused", reason: `join token ${match.name} was already used` };
      if (match.expiresAtMs !== null && this.#clock.nowMs() >= match.expiresAtMs) return { kind: "refused", reason: `join token ${match.name} expired` };
    }
    return { kind: "ok", principal: { name: match.name, role: match.role, host: match.host } };
  }

  list(): TokenRecord[] {
    return [...this.#cache.values()].map(publicRecord).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  get(name: string): TokenRecord | undefined {
    const record = this.#cache.get(name);
    return record === undefined ? undefined : publicRecord(record);
  }

  /** A named token with a role; answers its secret (the only time it exists outside the caller). */
  create(name: string, role: TokenRole): { record: TokenRecord; secret: string } {
    if (!TOKEN_NAME_PATTERN.test(name)) throw new IpsanError("INVALID_ARGUMENT", `invalid token name ${show(name)} (1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit)`, { field: "name" });
    if (name === ADMIN_TOKEN_NAME) throw new IpsanError("ALREADY_EXISTS", `token name "admin" is DATA/admin.token's`, { field: "name" });
    if (this.#cache.has(name)) throw new IpsanError("ALREADY_EXISTS", `a token named ${show(name)} exists (revoke it first)`, { field: "name" });
    return this.#insert({ name, kind: "token", role, host: null, expiresAtMs: null });
  }

  /** A one-time join token, valid for `ttlMs`, for `host` only when given. */
  createJoin(host: string | null, ttlMs: number): { record: TokenRecord; secret: string } {
    this.#purgeSpentJoinTokens();
    let name: string;
    do name = `join-${randomBytes(4).toString("hex")}`;
    while (this.#cache.has(name));
    return this.#insert({ name, kind: "join", role: "join", host, expiresAtMs: this.#clock.nowMs() + ttlMs });
  }

  /**
   * Registers `host` with the join token `joinName`: marks the join token used and
   * replaces the host's credential (a host that registers again gets a new one; the
   * old one stops working), in one transaction. Refuses a used or expired join token.
   */
  register(joinName: string, host: string): { record: TokenRecord; secret: string } {
    return this.#issue(host, joinName);
  }

  /** A new credential for `host` (an admin registering a host without a join token); replaces its old one. */
  issueHostCredential(host: string): { record: TokenRecord; secret: string } {
    return this.#issue(host, null);
  }

  #issue(host: string, joinName: string | null): { record: TokenRecord; secret: string } {
    const join = joinName === null ? undefined : this.#cache.get(joinName);
    if (joinName !== null) this.#checkJoin(joinName, join, host);
    const now = this.#clock.nowMs();
    const name = hostCredentialName(host);
    const secret = newSecret("host");
    const credential: Cached = { name, kind: "host", role: "host", host, createdAtMs: now, expiresAtMs: null, usedAtMs: null, digest: digestOf(secret) };
    this.#db.transaction(() => {
      if (joinName !== null) this.#db.prepare("UPDATE tokens SET used_at = ? WHERE name = ?").run(now, joinName);
      this.#db.prepare("DELETE FROM tokens WHERE name = ?").run(name);
      this.#insertRow(credential);
    })();
    if (joinName !== null && join !== undefined) this.#cache.set(joinName, { ...join, usedAtMs: now });
    this.#cache.set(name, credential);
    return { record: publicRecord(credential), secret };
  }

  #checkJoin(joinName: string, join: Cached | undefined, host: string): void {
    if (join === undefined || join.kind !== "join") throw new IpsanError("UNAUTHENTICATED", `join token ${show(joinName)} not found`);
    if (join.usedAtMs !== null) throw new IpsanError("UNAUTHENTICATED", `join token ${joinName} was already used`);
    if (join.expiresAtMs !== null && this.#clock.nowMs() >= join.expiresAtMs) throw new IpsanError("UNAUTHENTICATED", `join token ${joinName} expired`);
    if (join.host !== null && join.host !== host) {
      throw new IpsanError("PERMISSION_DENIED", `role join (token ${joinName}) may not register host ${host}: it is for host ${join.host}`, { field: "name" });
    }
  }

  /** Deletes a credential; the next request that presents it is refused. False when there is none. */
  revoke(name: string): boolean {
    if (!this.#cache.has(name)) return false;
    this.#db.prepare("DELETE FROM tokens WHERE name = ?").run(name);
    this.#cache.delete(name);
    return true;
  }

  /** Join tokens used or expired more than SPENT_JOIN_KEPT_MS ago are forgotten (they open nothing). */
  #purgeSpentJoinTokens(): void {
    const cutoff = this.#clock.nowMs() - SPENT_JOIN_KEPT_MS;
    for (const record of [...this.#cache.values()]) {
      if (record.kind !== "join") continue;
      const spentAt = record.usedAtMs ?? record.expiresAtMs;
      if (spentAt !== null && spentAt < cutoff) this.revoke(record.name);
    }
  }

  #insert(fields: { name: string; kind: TokenKind; role: Role; host: string | null; expiresAtMs: number | null }): { record: TokenRecord; secret: string } {
    if (this.#cache.size >= CREDENTIALS_MAX) throw new IpsanError("NO_SPACE", `the station keeps at most ${CREDENTIALS_MAX} credentials; revoke some first`);
    const secret = newSecret(fields.kind);
    const record: Cached = { ...fields, createdAtMs: this.#clock.nowMs(), usedAtMs: null, digest: digestOf(secret) };
    this.#insertRow(record);
    this.#cache.set(record.name, record);
    return { record: publicRecord(record), secret };
  }

  #insertRow(r: Cached): void {
    this.#db
      .prepare("INSERT INTO tokens (name, kind, role, host, digest, created_at, expires_at, used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
      .run(r.name, r.kind, r.role, r.host, r.digest, r.createdAtMs, r.expiresAtMs, r.usedAtMs);
  }
}

function fromRow(row: Row): Cached {
  return {
    name: row.name,
    kind: row.kind as TokenKind,
    role: row.role as Role,
    host: row.host,
    digest: Buffer.from(row.digest),
    createdAtMs: row.created_at,
    expiresAtMs: row.expires_at,
    usedAtMs: row.used_at,
  };
}

function publicRecord(r: Cached | TokenRecord): TokenRecord {
  return { name: r.name, kind: r.kind, role: r.role, host: r.host, createdAtMs: r.createdAtMs, expiresAtMs: r.expiresAtMs, usedAtMs: r.usedAtMs };
}

/** A credential as the API lists it: never the secret nor its digest. */
export function tokenView(r: TokenRecord): Record<string, unknown> {
  const iso = (ms: number | null): string | null => (ms === null ? null : new Date(ms).toISOString());
  return { name: r.name, kind: r.kind, role: r.role, host: r.host, createdAt: iso(r.createdAtMs), expiresAt: iso(r.expiresAtMs), usedAt: iso(r.usedAtMs) };
}
