// Persistent reservations (SPC-4 5.13, PERSISTENT RESERVE IN/OUT) and the
// older RESERVE(6)/RELEASE(6) reservation (SPC-2), kept per logical unit and
// shared by every session of it. Registrations and the persistent
// reservation outlive the sessions that made them (SPC-4 5.13.1: they are
// kept across I_T nexus loss): the registry keeps a logical unit's state for
// the unit's lifetime, until its export is deleted or changed. Across a unit
// restart (a power loss, for the initiators) they are kept only while the
// last REGISTER carried APTPL=1 (SPC-4 5.13.5): each change is then written
// through a ReservationStore before PERSISTENT RESERVE OUT answers GOOD, and
// read back when the unit starts serving the logical unit again.
// RESERVE(6) reservations go with their I_T nexus, as SPC-2 says.

import type { LogicalUnitIdentity, ScsiNexus } from "./types.ts";
import { MAX_REGISTRATIONS, PR_OUT_PARAMETER_BYTES } from "./limits.ts";
import {
  ASC,
  illegalRequest,
  invalidFieldInCdb,
  invalidFieldInParameterList,
  parameterListLengthError,
} from "./sense.ts";

/** Persistent reservation types (SPC-4 table 207). */
export const PrType = {
  WRITE_EXCLUSIVE: 0x1,
  EXCLUSIVE_ACCESS: 0x3,
  WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 0x5,
  EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 0x6,
  WRITE_EXCLUSIVE_ALL_REGISTRANTS: 0x7,
  EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 0x8,
} as const;
const VALID_TYPES: ReadonlySet<number> = new Set(Object.values(PrType));

/** How a command touches the medium, for the reservation conflict tables. */
export type AccessClass = "none" | "read" | "write";

const NEXUS_KEYS = new WeakMap<ScsiNexus, string>();

/** The key of an I_T nexus: initiator port name (TransportID) and target port (cached per nexus object: every command asks). */
export function nexusKey(nexus: ScsiNexus): string {
  let key = NEXUS_KEYS.get(nexus);
  if (key === undefined) {
    key = `${initiatorPortName(nexus)}|${nexus.targetPortalGroupTag}`;
    NEXUS_KEYS.set(nexus, key);
  }
  return key;
}

/** iSCSI initiator port name: "InitiatorName,i,0xISID" (RFC 7143 4.2.7). */
export function initiatorPortName(nexus: ScsiNexus): string {
  return `${nexus.initiatorName.toLowerCase()},i,0x${nexus.isid.toLowerCase()}`;
}

interface Registration {
  key: bigint;
  readonly nexus: ScsiNexus;
  readonly allTargetPorts: boolean;
}

/**
 * What APTPL keeps across a power loss (SPC-4 5.13.5): every registration
 * (its key, its I_T nexus, ALL_TG_PT) and the persistent reservation. Plain
 * JSON: keys as 16 hex digits.
 */
export interface SavedReservations {
  readonly generation: number;
  readonly registrations: readonly SavedRegistration[];
  /** The holder as its registration's index in `registrations`. */
  readonly reservation: { readonly holder: number; readonly type: number } | undefined;
}

export interface SavedRegistration {
  readonly key: string;
  readonly nexus: ScsiNexus;
  readonly allTargetPorts: boolean;
}

/**
 * Where logical units' reservations are kept across restarts (the unit's
 * is a file per logical unit, src/unit/reservation_store.ts). load() runs
 * when a logical unit is first used after a start (a state it cannot read
 * throws: the logical unit is then not served, never served without its
 * reservations); save() replaces the state, save(undefined) drops it (APTPL
 * turned off, or the export deleted). Saves and drops take effect in the
 * order they were called, and load() never sees a state dropped before it.
 */
export interface ReservationStore {
  load(identity: LogicalUnitIdentity): SavedReservations | undefined;
  save(identity: LogicalUnitIdentity, state: SavedReservations | undefined): Promise<void>;
}

/** What a PERSISTENT RESERVE OUT asks of the logical unit: unit attentions to queue, and the state to save first (undefined: nothing to save). */
export interface PrOutResult {
  readonly notices: ReservationNotice[];
  /** The new state to save before GOOD (APTPL on); null: drop the saved state (APTPL turned off); undefined: nothing to write. */
  readonly save: SavedReservations | null | undefined;
}

interface Reservation {
  /** The holder's nexus key; for the all-registrants types every registrant holds it. */
  readonly holder: string;
  readonly type: number;
}

/** A unit attention the reservation change asks the logical unit to queue for a nexus. */
export interface ReservationNotice {
  readonly nexusKey: string;
  readonly asc: readonly [number, number];
}

export function reservationConflict(why: string): ReservationConflict {
  return new ReservationConflict(why);
}

/** Thrown for RESERVATION CONFLICT status (no sense data). */
export class ReservationConflict extends Error {
  constructor(why: string) {
    super(why);
    this.name = "ReservationConflict";
  }
}

function allRegistrants(type: number): boolean {
  return type === PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS || type === PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS;
}

function registrantsOnly(type: number): boolean {
  return type === PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY || type === PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY;
}

function exclusiveAccess(type: number): boolean {
  return type === PrType.EXCLUSIVE_ACCESS || type === PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY || type === PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS;
}

export class Reservations {
  readonly #registrations = new Map<string, Registration>();
  #reservation: Reservation | undefined;
  #generation = 0;
  /** RESERVE(6)/RESERVE(10) holder's nexus key. */
  #legacyHolder: string | undefined;
  /** PTPL_A: the last valid APTPL bit received was one (SPC-4 5.13.5): every change is saved. */
  #aptpl = false;
  /** PTPL_C: a store keeps the state across restarts (without one, APTPL=1 is refused). */
  readonly #persistable: boolean;

  constructor(persistable = false) {
    this.#persistable = persistable;
  }

  get generation(): number {
    return this.#generation;
  }

  /** Whether APTPL is on (REPORT CAPABILITIES PTPL_A). */
  get persistThroughPowerLoss(): boolean {
    return this.#aptpl;
  }

  /** Whether there is anything SPC-4 keeps across I_T nexus loss: a registration or a persistent reservation. */
  get holdsState(): boolean {
    return this.#registrations.size > 0 || this.#reservation !== undefined;
  }

  /** The state as a store saves it (registrations in order, the holder by index). */
  saved(): SavedReservations {
    const entries = [...this.#registrations.entries()];
    const r = this.#reservation;
    const holder = r === undefined ? -1 : entries.findIndex(([k]) => k === r.holder);
    return {
      generation: this.#generation,
      registrations: entries.map(([, registration]) => ({
        key: registration.key.toString(16).padStart(16, "0"),
        nexus: { ...registration.nexus },
        allTargetPorts: registration.allTargetPorts,
      })),
      // An all-registrants reservation has no single holder: any registration stands for it.
      reservation: r === undefined ? undefined : { holder: Math.max(holder, 0), type: r.type },
    };
  }

  /** Reservations as a store saved them (APTPL was on, so it still is). Throws when `state` does not hold together. */
  static restore(state: SavedReservations): Reservations {
    const out = new Reservations(true);
    const keys: string[] = [];
    for (const saved of state.registrations) {
      if (!/^[0-9a-f]{16}$/.test(saved.key)) throw new Error(`registration key ${JSON.stringify(saved.key)} is not 16 hex digits`);
      const key = nexusKey(saved.nexus);
      if (out.#registrations.has(key)) throw new Error(`two registrations for the I_T nexus ${key}`);
      out.#registrations.set(key, { key: BigInt(`0x${saved.key}`), nexus: saved.nexus, allTargetPorts: saved.allTargetPorts });
      keys.push(key);
    }
    if (out.#registrations.size > MAX_REGISTRATIONS) throw new Error(`${out.#registrations.size} registrations: at most ${MAX_REGISTRATIONS}`);
    if (state.reservation !== undefined) {
      const holder = keys[state.reservation.holder];
      if (holder === undefined) throw new Error(`the reservation's holder ${state.reservation.holder} is not a registration`);
      if (!VALID_TYPES.has(state.reservation.type)) throw new Error(`reservation type ${state.reservation.type} is not one SPC-4 defines`);
      out.#reservation = { holder, type: state.reservation.type };
    }
    out.#generation = state.generation >>> 0;
    out.#aptpl = true;
    return out;
  }

  get registrationCount(): number {
    return this.#registrations.size;
  }

  /** Whether the nexus holds the persistent reservation (every registrant does for the all-registrants types). */
  #isHolder(key: string): boolean {
    const r = this.#reservation;
    if (r === undefined) return false;
    if (allRegistrants(r.type)) return this.#registrations.has(key);
    return r.holder === key;
  }

  /**
   * Throws ReservationConflict if a command of `access` class from `nexus`
   * conflicts with the reservations (SPC-4 5.13.1 table 48 / SBC-3 table 13;
   * SPC-2 7.21 for RESERVE(6)). `opcode` lets RELEASE(6) and the PR commands through.
   */
  check(nexus: ScsiNexus, access: AccessClass, allowedUnderLegacy: boolean): void {
    const key = nexusKey(nexus);
    if (this.#legacyHolder !== undefined && this.#legacyHolder !== key && !allowedUnderLegacy) {
      throw reservationConflict("the logical unit is reserved (RESERVE) through another I_T nexus");
    }
    const r = this.#reservation;
    if (r === undefined || access === "none") return;
    if (this.#isHolder(key)) return;
    if ((registrantsOnly(r.type) || allRegistrants(r.type)) && this.#registrations.has(key)) return;
    if (access === "read" && !exclusiveAccess(r.type)) return;
    throw reservationConflict(`persistent reservation type ${r.type} is held through another I_T nexus`);
  }

  // ---- RESERVE(6) / RELEASE(6) ----

  legacyReserve(nexus: ScsiNexus): void {
    const key = nexusKey(nexus);
    if (this.#legacyHolder !== undefined && this.#legacyHolder !== key) throw reservationConflict("already reserved through another I_T nexus");
    // Compatible reservation handling (CRH=1): RESERVE while persistent reservations exist conflicts.
    if (this.#reservation !== undefined || this.#registrations.size > 0) {
      if (!this.#isHolder(key) || this.#reservation === undefined) throw reservationConflict("a persistent reservation or registration exists");
      return;
    }
    this.#legacyHolder = key;
  }

  legacyRelease(nexus: ScsiNexus): void {
    if (this.#legacyHolder === nexusKey(nexus)) this.#legacyHolder = undefined;
  }

  /** A nexus went away or the logical unit was reset: its RESERVE(6) reservation goes. */
  dropLegacy(nexus: ScsiNexus | undefined): void {
    if (nexus === undefined || this.#legacyHolder === nexusKey(nexus)) this.#legacyHolder = undefined;
  }

  // ---- PERSISTENT RESERVE IN ----

  /** PR IN READ KEYS (SPC-4 6.15.2). */
  readKeys(): Buffer {
    const keys = [...this.#registrations.values()];
    const out = Buffer.alloc(8 + 8 * keys.length);
    out.writeUInt32BE(this.#generation >>> 0, 0);
    out.writeUInt32BE(8 * keys.length, 4);
    keys.forEach((r, i) => out.writeBigUInt64BE(r.key, 8 + 8 * i));
    return out;
  }

  /** PR IN READ RESERVATION (SPC-4 6.15.3). */
  readReservation(): Buffer {
    const r = this.#reservation;
    const out = Buffer.alloc(r === undefined ? 8 : 24);
    out.writeUInt32BE(this.#generation >>> 0, 0);
    if (r !== undefined) {
      out.writeUInt32BE(16, 4);
      const holderKey = allRegistrants(r.type) ? 0n : (this.#registrations.get(r.holder)?.key ?? 0n);
      out.writeBigUInt64BE(holderKey, 8);
      out[21] = r.type & 0x0f; // scope LU_SCOPE (0) in the high nibble
    }
    return out;
  }

  /** PR IN REPORT CAPABILITIES (SPC-4 6.15.4). */
  reportCapabilities(): Buffer {
    const out = Buffer.alloc(8);
    out.writeUInt16BE(8, 0);
    // CRH=1 (RESERVE(6) conflicts with persistent reservations), SIP_C=0, ATP_C=1, PTPL_C: APTPL is kept across restarts when there is a store.
    out[2] = 0x10 | 0x04 | (this.#persistable ? 0x01 : 0);
    // TMV=1, ALLOW COMMANDS=000b, PTPL_A: APTPL on now.
    out[3] = 0x80 | (this.#aptpl ? 0x01 : 0);
    // Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; EX_AC_AR.
    out[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
    out[5] = 0x01;
    return out;
  }

  /** PR IN READ FULL STATUS (SPC-4 6.15.5): one descriptor per registration, with an iSCSI TransportID. */
  readFullStatus(): Buffer {
    const descriptors: Buffer[] = [];
    for (const [key, registration] of this.#registrations) {
      const transportId = iscsiTransportId(registration.nexus);
      const d = Buffer.alloc(24 + transportId.length);
      d.writeBigUInt64BE(registration.key, 0);
      const holder = this.#isHolder(key);
      d[12] = (registration.allTargetPorts ? 0x02 : 0) | (holder ? 0x01 : 0);
      if (holder && this.#reservation !== undefined) d[13] = this.#reservation.type & 0x0f;
      d.writeUInt16BE(registration.nexus.relativeTargetPort & 0xffff, 18);
      d.writeUInt32BE(transportId.length, 20);
      transportId.copy(d, 24);
      descriptors.push(d);
    }
    const body = Buffer.concat(descriptors);
    const out = Buffer.alloc(8 + body.length);
    out.writeUInt32BE(this.#generation >>> 0, 0);
    out.writeUInt32BE(body.length, 4);
    body.copy(out, 8);
    return out;
  }

  // ---- PERSISTENT RESERVE OUT ----

  /**
   * Runs PR OUT (SPC-4 6.16) for `nexus`: `cdb` gives the service action,
   * scope and type, `data` the parameter list. Returns the unit attentions to
   * queue and what to save before answering GOOD. Throws SenseError or
   * ReservationConflict (and then nothing changed).
   */
  out(nexus: ScsiNexus, cdb: Buffer, data: Buffer): PrOutResult {
    const serviceAction = (cdb[1] ?? 0) & 0x1f;
    const scope = ((cdb[2] ?? 0) >> 4) & 0x0f;
    const type = (cdb[2] ?? 0) & 0x0f;
    const listLength = cdb.readUInt32BE(5);
    if (serviceAction > 6) throw invalidFieldInCdb(1, 4, `PERSISTENT RESERVE OUT service action ${serviceAction} is not supported`);
    if (listLength !== PR_OUT_PARAMETER_BYTES) {
      throw parameterListLengthError(`PERSISTENT RESERVE OUT parameter list length ${listLength}: expected ${PR_OUT_PARAMETER_BYTES}`);
    }
    if (data.length < PR_OUT_PARAMETER_BYTES) {
      throw parameterListLengthError(`PERSISTENT RESERVE OUT carried ${data.length} bytes of its ${PR_OUT_PARAMETER_BYTES}`);
    }
    const reservationKey = data.readBigUInt64BE(0);
    const serviceActionKey = data.readBigUInt64BE(8);
    const flags = data[20] ?? 0;
    const specIPt = (flags & 0x08) !== 0;
    const allTgPt = (flags & 0x04) !== 0;
    const key = nexusKey(nexus);
    const own = this.#registrations.get(key);
    const register = serviceAction === 0 || serviceAction === 6;
    const wasOn = this.#aptpl;
    let notices: ReservationNotice[];
    if (register) {
      if (specIPt) throw invalidFieldInParameterList(20, 3, "SPEC_I_PT is not supported (REPORT CAPABILITIES SIP_C=0)");
      if ((flags & 0x01) !== 0 && !this.#persistable) throw invalidFieldInParameterList(20, 0, "APTPL is not supported here: nothing keeps reservations across a restart (PTPL_C=0)");
      notices = this.#register(nexus, key, own, reservationKey, serviceActionKey, serviceAction === 6, allTgPt);
      // The APTPL bit of a REGISTER that succeeded is the last valid one received (SPC-4 5.13.5).
      this.#aptpl = (flags & 0x01) !== 0;
    } else {
      // Every other service action needs a registered nexus with the matching key. Their APTPL bit is ignored (SPC-4 6.16.3).
      if (own === undefined) throw reservationConflict("the I_T nexus is not registered");
      if (own.key !== reservationKey) throw reservationConflict("RESERVATION KEY does not match the nexus's registration");
      if (specIPt || allTgPt) throw invalidFieldInParameterList(20, specIPt ? 3 : 2, "SPEC_I_PT/ALL_TG_PT are only valid with REGISTER");
      switch (serviceAction) {
        case 1:
          this.#reserve(key, scope, type);
          notices = [];
          break;
        case 2:
          notices = this.#release(key, scope, type);
          break;
        case 3:
          notices = this.#clear(key);
          break;
        default:
          notices = this.#preempt(key, scope, type, serviceActionKey);
      }
    }
    return { notices, save: this.#aptpl ? this.saved() : wasOn ? null : undefined };
  }

  #register(
    nexus: ScsiNexus,
    key: string,
    own: Registration | undefined,
    reservationKey: bigint,
    serviceActionKey: bigint,
    ignoreExisting: boolean,
    allTargetPorts: boolean,
  ): ReservationNotice[] {
    if (own === undefined) {
      if (!ignoreExisting && reservationKey !== 0n) throw reservationConflict("REGISTER from an unregistered nexus with a non-zero RESERVATION KEY");
      if (serviceActionKey === 0n) return [];
      if (this.#registrations.size >= MAX_REGISTRATIONS) {
        throw illegalRequest(ASC.INSUFFICIENT_REGISTRATION_RESOURCES, `at most ${MAX_REGISTRATIONS} registrations per logical unit`);
      }
      this.#registrations.set(key, { key: serviceActionKey, nexus, allTargetPorts });
      this.#generation = (this.#generation + 1) >>> 0;
      return [];
    }
    if (!ignoreExisting && own.key !== reservationKey) throw reservationConflict("RESERVATION KEY does not match the nexus's registration");
    this.#generation = (this.#generation + 1) >>> 0;
    if (serviceActionKey !== 0n) {
      own.key = serviceActionKey;
      return [];
    }
    return this.#unregister(key);
  }

  /** Removes a registration; releases the reservation if it was the holder (SPC-4 5.13.11.2.2). */
  #unregister(key: string): ReservationNotice[] {
    const notices: ReservationNotice[] = [];
    const r = this.#reservation;
    const wasHolder = this.#isHolder(key);
    this.#registrations.delete(key);
    if (r !== undefined && wasHolder && (!allRegistrants(r.type) || this.#registrations.size === 0)) {
      this.#reservation = undefined;
      if (registrantsOnly(r.type)) for (const other of this.#registrations.keys()) notices.push({ nexusKey: other, asc: ASC.RESERVATIONS_RELEASED });
    }
    return notices;
  }

  #reserve(key: string, scope: number, type: number): void {
    if (scope !== 0) throw invalidFieldInCdb(2, 7, `reservation scope ${scope} is not supported (LU_SCOPE only)`);
    if (!VALID_TYPES.has(type)) throw invalidFieldInCdb(2, 3, `reservation type ${type} is not supported`);
    const r = this.#reservation;
    if (r === undefined) {
      this.#reservation = { holder: key, type };
      return;
    }
    if (this.#isHolder(key) && r.type === type) return;
    throw reservationConflict(`a persistent reservation of type ${r.type} is held`);
  }

  #release(key: string, scope: number, type: number): ReservationNotice[] {
    const r = this.#reservation;
    if (r === undefined || !this.#isHolder(key)) return [];
    if (scope !== 0 || r.type !== type) {
      throw illegalRequest(ASC.INVALID_RELEASE_OF_PERSISTENT_RESERVATION, `RELEASE of type ${type} scope ${scope}: the reservation is type ${r.type}`);
    }
    this.#reservation = undefined;
    const notices: ReservationNotice[] = [];
    if (registrantsOnly(r.type) || allRegistrants(r.type)) {
      for (const other of this.#registrations.keys()) if (other !== key) notices.push({ nexusKey: other, asc: ASC.RESERVATIONS_RELEASED });
    }
    return notices;
  }

  #clear(key: string): ReservationNotice[] {
    const notices: ReservationNotice[] = [];
    for (const other of this.#registrations.keys()) if (other !== key) notices.push({ nexusKey: other, asc: ASC.RESERVATIONS_PREEMPTED });
    this.#registrations.clear();
    this.#reservation = undefined;
    this.#generation = (this.#generation + 1) >>> 0;
    return notices;
  }

  #preempt(key: string, scope: number, type: number, serviceActionKey: bigint): ReservationNotice[] {
    const notices: ReservationNotice[] = [];
    const r = this.#reservation;
    const removeWithKey = (match: (registration: Registration, k: string) => boolean): number => {
      let removed = 0;
      for (const [k, registration] of [...this.#registrations]) {
        if (k === key || !match(registration, k)) continue;
        this.#registrations.delete(k);
        notices.push({ nexusKey: k, asc: ASC.REGISTRATIONS_PREEMPTED });
        removed += 1;
      }
      return removed;
    };
    const newReservation = (): void => {
      if (scope !== 0) throw invalidFieldInCdb(2, 7, `reservation scope ${scope} is not supported (LU_SCOPE only)`);
      if (!VALID_TYPES.has(type)) throw invalidFieldInCdb(2, 3, `reservation type ${type} is not supported`);
    };
    if (r !== undefined && allRegistrants(r.type)) {
      if (serviceActionKey === 0n) {
        newReservation();
        removeWithKey(() => true);
        this.#reservation = { holder: key, type };
      } else if (removeWithKey((registration) => registration.key === serviceActionKey) === 0) {
        throw reservationConflict("no registration has the SERVICE ACTION RESERVATION KEY");
      }
    } else if (r !== undefined && this.#registrations.get(r.holder)?.key === serviceActionKey) {
      newReservation();
      removeWithKey((registration) => registration.key === serviceActionKey);
      const changed = r.type !== type;
      this.#reservation = { holder: key, type };
      if (changed) {
        for (const other of this.#registrations.keys()) {
          if (other !== key) notices.push({ nexusKey: other, asc: ASC.RESERVATIONS_RELEASED });
        }
      }
    } else {
      if (serviceActionKey === 0n) throw invalidFieldInParameterList(8, undefined, "SERVICE ACTION RESERVATION KEY 0 preempts nothing here");
      if (removeWithKey((registration) => registration.key === serviceActionKey) === 0) {
        throw reservationConflict("no registration has the SERVICE ACTION RESERVATION KEY");
      }
    }
    this.#generation = (this.#generation + 1) >>> 0;
    return notices;
  }
}

/** iSCSI TransportID, FORMAT CODE 01b (SPC-4 7.6.4.6): "NAME,i,0xISID", NUL-terminated, padded to a multiple of 4. */
export function iscsiTransportId(nexus: ScsiNexus): Buffer {
  const name = Buffer.from(`${initiatorPortName(nexus)}\0`, "utf8");
  const padded = Math.max(20 - 4, Math.ceil(name.length / 4) * 4);
  const out = Buffer.alloc(4 + padded);
  out[0] = 0x40 | 0x05;
  out.writeUInt16BE(padded, 2);
  name.copy(out, 4);
  return out;
}
