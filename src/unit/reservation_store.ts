// Persistent reservations kept across unit restarts (SPC-4 5.13.5, APTPL):
// DATA/reservations/NAA.json, one file per logical unit that has them, mode
// 0600. Written only while the last REGISTER carried APTPL=1, and before
// PERSISTENT RESERVE OUT answers GOOD: replaced whole (a temporary file,
// fsynced, renamed into place, the directory fsynced), so a crash leaves
// the old state or the new one. Dropped (unlinked, the directory fsynced)
// when APTPL is turned off or the export is deleted or changed.
//
// Every save and drop goes through one queue, in the order asked, so the
// file ends with the newest state, and load() does not read a file whose
// drop is still queued. A file that does not read back as a state of this
// logical unit is never taken for "no reservations": load() throws, the
// logical unit is not served (its sessions are refused, the unit's log says
// why), and the file is left for the operator to look at.

import { mkdirSync, readFileSync, statSync } from "node:fs";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { type ReservationStore, Reservations, type SavedRegistration, type SavedReservations } from "../scsi/reservations.ts";
import type { LogicalUnitIdentity, ScsiNexus } from "../scsi/types.ts";
import { errorMessage } from "../util/errors.ts";
import { fsyncPath, writeSecretFileAtomic } from "../util/secret_file.ts";

export const RESERVATIONS_DIR_NAME = "reservations";
/** A saved state is small (at most MAX_REGISTRATIONS registrations); anything larger is not ours. */
export const RESERVATIONS_FILE_BYTES_MAX = 1024 * 1024;
const FORMAT = "ipsan-reservations-v1";

export class FileReservationStore implements ReservationStore {
  readonly dir: string;
  /** The queue every save and drop runs through, in order. */
  #queue: Promise<void> = Promise.resolve();
  /** NAAs with a drop queued and not done yet: load() reads none of them. */
  readonly #dropping = new Map<string, number>();

  constructor(dataDir: string) {
    this.dir = join(dataDir, RESERVATIONS_DIR_NAME);
  }

  pathOf(identity: LogicalUnitIdentity): string {
    if (!/^[0-9a-f]{16}$/.test(identity.naa)) throw new Error(`NAA ${JSON.stringify(identity.naa)} is not 16 lowercase hex digits`);
    return join(this.dir, `${identity.naa}.json`);
  }

  load(identity: LogicalUnitIdentity): SavedReservations | undefined {
    if (this.#dropping.has(identity.naa)) return undefined;
    const path = this.pathOf(identity);
    let text: string;
    try {
      if (statSync(path).size > RESERVATIONS_FILE_BYTES_MAX) throw new Error(`larger than ${RESERVATIONS_FILE_BYTES_MAX} bytes`);
      text = readFileSync(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw unreadable(path, identity, error);
    }
    try {
      const saved = parseSaved(text, identity);
      Reservations.restore(saved); // throws where the parts do not hold together (a holder that is no registration...)
      return saved;
    } catch (error) {
      throw unreadable(path, identity, error);
    }
  }

  save(identity: LogicalUnitIdentity, state: SavedReservations | undefined): Promise<void> {
    const path = this.pathOf(identity);
    const naa = identity.naa;
    if (state === undefined) this.#dropping.set(naa, (this.#dropping.get(naa) ?? 0) + 1);
    const run = this.#queue.then(async () => {
      if (state !== undefined) {
        await this.#ensureDir();
        await writeSecretFileAtomic(path, `${JSON.stringify({ format: FORMAT, naa, exportName: identity.exportName, ...state }, null, 1)}\n`);
        return;
      }
      try {
        await fs.unlink(path);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
        throw error;
      }
      await fsyncPath(this.dir);
    });
    const done = (): void => {
      if (state !== undefined) return;
      const left = (this.#dropping.get(naa) ?? 1) - 1;
      if (left > 0) this.#dropping.set(naa, left);
      else this.#dropping.delete(naa);
    };
    this.#queue = run.then(done, done);
    return run;
  }

  async #ensureDir(): Promise<void> {
    try {
      statSync(this.dir);
      return;
    } catch {
      // made below
    }
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    // The new directory's name must survive a crash too.
    await fsyncPath(join(this.dir, ".."));
  }
}

function unreadable(path: string, identity: LogicalUnitIdentity, error: unknown): Error {
  return new Error(
    `persistent reservations of ${identity.exportName} in ${path} cannot be read (${errorMessage(error)}); the logical unit is not served ` +
      "rather than served without them: fix the file, or move it away to drop its reservations, then log in again",
  );
}

/** A saved state, checked field by field: anything else throws. */
export function parseSaved(text: string, identity: LogicalUnitIdentity): SavedReservations {
  const raw: unknown = JSON.parse(text);
  const record = object(raw, "the file");
  if (record["format"] !== FORMAT) throw new Error(`format ${JSON.stringify(record["format"])}, expected ${FORMAT}`);
  if (record["naa"] !== identity.naa) throw new Error(`it is for NAA ${JSON.stringify(record["naa"])}, not ${identity.naa}`);
  const generation = record["generation"];
  if (typeof generation !== "number" || !Number.isInteger(generation) || generation < 0 || generation > 0xffffffff) throw new Error("generation is not a 32-bit count");
  const list = record["registrations"];
  if (!Array.isArray(list)) throw new Error("registrations is not a list");
  const registrations: SavedRegistration[] = list.map((item: unknown, i: number) => {
    const entry = object(item, `registration ${i}`);
    const nexus = object(entry["nexus"], `registration ${i} nexus`);
    const { initiatorName, isid, targetPortalGroupTag, relativeTargetPort, targetName } = nexus;
    if (typeof entry["key"] !== "string" || typeof entry["allTargetPorts"] !== "boolean") throw new Error(`registration ${i}: key or allTargetPorts missing`);
    if (typeof initiatorName !== "string" || initiatorName.length === 0 || initiatorName.length > 223) throw new Error(`registration ${i}: bad initiatorName`);
    if (typeof isid !== "string" || !/^[0-9a-f]{12}$/.test(isid)) throw new Error(`registration ${i}: bad isid`);
    if (!isUint16(targetPortalGroupTag) || !isUint16(relativeTargetPort)) throw new Error(`registration ${i}: bad target port`);
    if (targetName !== undefined && (typeof targetName !== "string" || targetName.length > 223)) throw new Error(`registration ${i}: bad targetName`);
    const restored: ScsiNexus = { initiatorName, isid, targetPortalGroupTag, relativeTargetPort, ...(targetName === undefined ? {} : { targetName }) };
    return { key: entry["key"], nexus: restored, allTargetPorts: entry["allTargetPorts"] };
  });
  const reservation = record["reservation"];
  let saved: SavedReservations["reservation"];
  if (reservation !== undefined) {
    const r = object(reservation, "reservation");
    if (!isUint16(r["holder"]) || !isUint16(r["type"])) throw new Error("reservation: bad holder or type");
    saved = { holder: r["holder"], type: r["type"] };
  }
  return { generation, registrations, reservation: saved };
}

function object(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw new Error(`${what} is not an object`);
  return value as Record<string, unknown>;
}

function isUint16(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= 0xffff;
}
