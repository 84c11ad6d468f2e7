// The unit's side of unit identities (issue 7): its UUID (from the volume
// table), the cluster key (enrolment only) and, once the station has enrolled
// it, its own secret in DATA/unit.secret (0600, written atomically and
// fsynced). Decides which key signs the unit's datagrams, which keys it
// accepts on the station's, and which bearer tokens its control API accepts:
// before enrolment the cluster-key-derived one, after it only those derived
// from its own secret.

import { promises as fs } from "node:fs";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { writeSecretFileAtomic } from "../util/secret_file.ts";
import type { Clock } from "../util/clock.ts";
import { realClock } from "../util/clock.ts";
import {
  UNIT_SECRET_BYTES,
  controlTokenFor,
  enrolKeyFor,
  packetKeyFor,
  rotateKeyFor,
  unitControlTokenFor,
  unitPacketKeyFor,
} from "./keys.ts";

export const UNIT_SECRET_FILE_NAME = "unit.secret";
/** After a rotation the unit still accepts its previous secret this long (the station switches when it hears the new one). */
export const PREVIOUS_SECRET_GRACE_MS = 120_000;
const SECRET_FILE_BYTES_MAX = 4096;

/** What DATA/unit.secret holds. */
export interface StoredUnitSecret {
  readonly unit: string;
  readonly unitId: string;
  readonly epoch: number;
  readonly secret: Buffer;
}

/** Reads DATA/unit.secret; null if there is none. A file that is not one is an error (never silently re-enrol). */
export async function loadUnitSecret(path: string): Promise<StoredUnitSecret | null> {
  let text: string;
  try {
    const stat = await fs.stat(path);
    if (stat.size > SECRET_FILE_BYTES_MAX) throw new IpsanError("CORRUPT", `unit secret ${path}: ${stat.size} bytes is not a unit secret file`);
    text = await fs.readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
    if (error instanceof IpsanError) throw error;
    throw new IpsanError("IO_ERROR", `unit secret ${path}: ${errorMessage(error)}`, { cause: error });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    value = undefined;
  }
  const v = value as Record<string, unknown> | undefined;
  if (
    typeof v !== "object" || v === null ||
    v["v"] !== 1 ||
    typeof v["unit"] !== "string" ||
    typeof v["unitId"] !== "string" ||
    typeof v["epoch"] !== "number" || !Number.isInteger(v["epoch"]) || v["epoch"] < 1 ||
    typeof v["secret"] !== "string" || !/^[0-9a-f]{64}$/.test(v["secret"])
  ) {
    throw new IpsanError(
      "CORRUPT",
      `unit secret ${path} is damaged; move it away to enrol the unit again (the station then needs: ipsan units forget NAME)`,
    );
  }
  return { unit: v["unit"], unitId: v["unitId"], epoch: v["epoch"], secret: Buffer.from(v["secret"], "hex") };
}

export async function saveUnitSecret(path: string, stored: StoredUnitSecret): Promise<void> {
  const text = JSON.stringify({ v: 1, unit: stored.unit, unitId: stored.unitId, epoch: stored.epoch, secret: stored.secret.toString("hex") });
  await writeSecretFileAtomic(path, `${text}\n`);
}

export interface UnitCredentialsOptions {
  readonly unitName: string;
  readonly unitId: string;
  readonly clusterKey: Buffer;
  /** DATA/unit.secret as loaded (null: not enrolled yet). One for another name or id is ignored. */
  readonly stored: StoredUnitSecret | null;
  /** Persists a new secret durably (saveUnitSecret to DATA/unit.secret). */
  readonly save: (stored: StoredUnitSecret) => Promise<void>;
  readonly clock?: Clock;
}

export class UnitCredentials {
  readonly unitName: string;
  readonly unitId: string;
  private readonly clusterPacketKey: Buffer;
  private readonly clusterToken: string;
  private readonly clusterKey: Buffer;
  private readonly save: (stored: StoredUnitSecret) => Promise<void>;
  private readonly clock: Clock;
  private current: { epoch: number; secret: Buffer; packetKey: Buffer; token: string } | null = null;
  private previous: { packetKey: Buffer; token: string; untilMs: number } | null = null;

  constructor(options: UnitCredentialsOptions) {
    this.unitName = options.unitName;
    this.unitId = options.unitId;
    this.clusterKey = options.clusterKey;
    this.clusterPacketKey = packetKeyFor(options.clusterKey);
    this.clusterToken = controlTokenFor(options.clusterKey, options.unitName);
    this.save = options.save;
    this.clock = options.clock ?? realClock;
    const stored = options.stored;
    if (stored !== null && stored.unit === options.unitName && stored.unitId === options.unitId && stored.secret.length === UNIT_SECRET_BYTES) {
      this.current = this.derive(stored.epoch, stored.secret);
    }
  }

  /** True if DATA/unit.secret held a secret for this name and id (else the unit enrols). */
  static matches(stored: StoredUnitSecret | null, unitName: string, unitId: string): boolean {
    return stored !== null && stored.unit === unitName && stored.unitId === unitId;
  }

  get enrolled(): boolean {
    return this.current !== null;
  }

  /** The current secret's epoch (0: not enrolled). */
  get epoch(): number {
    return this.current?.epoch ?? 0;
  }

  /** What signs this unit's datagrams: its own key once enrolled, else the cluster key. */
  sendKey(): { packetKey: Buffer; unitKey: boolean } {
    return this.current === null ? { packetKey: this.clusterPacketKey, unitKey: false } : { packetKey: this.current.packetKey, unitKey: true };
  }

  /** Keys accepted on the station's datagrams: once enrolled, only its own (and the previous one during a rotation). */
  receiveKeys(unitKey: boolean): readonly Buffer[] {
    if (!unitKey) return this.current === null ? [this.clusterPacketKey] : [];
    if (this.current === null) return [];
    const previous = this.livePrevious();
    return previous === null ? [this.current.packetKey] : [this.current.packetKey, previous.packetKey];
  }

  /** Bearer tokens the station may present on the control API. */
  controlTokens(): readonly string[] {
    if (this.current === null) return [this.clusterToken];
    const previous = this.livePrevious();
    return previous === null ? [this.current.token] : [this.current.token, previous.token];
  }

  /** The key an ENROL's secret is sealed under: the enrol key (first secret) or the current secret's rotate key. */
  unwrapKey(rotation: boolean): Buffer | null {
    if (!rotation) return enrolKeyFor(this.clusterKey);
    return this.current === null ? null : rotateKeyFor(this.current.secret);
  }

  /** Stores a new secret durably, then uses it; the previous one stays accepted for PREVIOUS_SECRET_GRACE_MS. */
  async install(epoch: number, secret: Buffer): Promise<void> {
    await this.save({ unit: this.unitName, unitId: this.unitId, epoch, secret });
    if (this.current !== null) {
      this.previous = { packetKey: this.current.packetKey, token: this.current.token, untilMs: this.clock.nowMs() + PREVIOUS_SECRET_GRACE_MS };
    }
    this.current = this.derive(epoch, secret);
  }

  private livePrevious(): { packetKey: Buffer; token: string } | null {
    if (this.previous !== null && this.clock.nowMs() > this.previous.untilMs) this.previous = null;
    return this.previous;
  }

  private derive(epoch: number, secret: Buffer): { epoch: number; secret: Buffer; packetKey: Buffer; token: string } {
    return { epoch, secret, packetKey: unitPacketKeyFor(secret), token: unitControlTokenFor(secret, this.unitName) };
  }
}
