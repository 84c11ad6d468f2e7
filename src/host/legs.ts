// The two files between the host agent and a mirror's engine (docs/host.md
// "Legs file and status file"):
// - the legs file (`ipsan host engine --legs-file PATH`): the legs the engine
//   serves, written by the agent from the station's view of the assignment,
//   re-read by the engine on SIGHUP (Mirror.setLegs);
// - the status file (`--status-file PATH`): each leg's state and rebuild
//   progress, written by the engine (tmp + rename) and read by the agent,
//   which reports it to the station.
// Both are JSON, bounded in size, and parsed by pure functions that name the
// bad field.

import { randomBytes } from "node:crypto";
import { open, rename, rm } from "node:fs/promises";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { parseNbdUri } from "../nbd/client.ts";

export const LEGS_FILE_BYTES_MAX = 64 * 1024;
export const STATUS_FILE_BYTES_MAX = 64 * 1024;
/** Legs a mirror may have (metadata.ts LEGS_MAX). */
export const LEGS_FILE_LEGS_MAX = 3;
/** A leg's id: the engine's name for it (the agent uses the leg's volume name). */
export const LEG_ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$/;
const NAME_BYTES_MAX = 200;

export interface LegEntry {
  readonly id: string;
  readonly uri: string;
  /** The station's unit and volume of the leg (reported back with its state). */
  readonly unit?: string;
  readonly volume?: string;
}

export const STATUS_LEG_STATES = ["in-sync", "stale", "rebuilding", "failed"] as const;
export type StatusLegState = (typeof STATUS_LEG_STATES)[number];

export interface StatusRebuild {
  readonly kind: "delta" | "full";
  readonly copiedBytes: number;
  readonly totalBytes: number;
  readonly etaSeconds: number | null;
}

export interface StatusLeg {
  readonly id: string;
  readonly uri: string;
  readonly unit?: string;
  readonly volume?: string;
  readonly state: StatusLegState;
  readonly rebuild: StatusRebuild | null;
  readonly error: string | null;
}

export interface EngineStatus {
  /** The engine's metadata generation. */
  readonly generation: number;
  /** When the engine wrote it (ISO 8601). */
  readonly updatedAt: string;
  readonly legs: readonly StatusLeg[];
}

export type Parsed<T> = { readonly kind: "ok"; readonly value: T } | { readonly kind: "invalid"; readonly reason: string };

function invalid<T>(reason: string): Parsed<T> {
  return { kind: "invalid", reason };
}

function optionalName(value: unknown, field: string): Parsed<string | undefined> {
  if (value === undefined) return { kind: "ok", value: undefined };
  if (typeof value !== "string" || value === "" || Buffer.byteLength(value) > NAME_BYTES_MAX) return invalid(`${field}: a non-empty string of at most ${NAME_BYTES_MAX} bytes`);
  return { kind: "ok", value };
}

/** The legs file: a JSON list of {id, uri, unit?, volume?}, 1 to 3 legs, ids distinct. */
export function parseLegsFile(text: string): Parsed<LegEntry[]> {
  if (Buffer.byteLength(text) > LEGS_FILE_BYTES_MAX) return invalid(`the legs file is larger than ${LEGS_FILE_BYTES_MAX} bytes`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return invalid(`not JSON: ${errorMessage(error)}`);
  }
  if (!Array.isArray(value)) return invalid("expected a JSON list of legs");
  if (value.length === 0 || value.length > LEGS_FILE_LEGS_MAX) return invalid(`a mirror has 1 to ${LEGS_FILE_LEGS_MAX} legs, not ${value.length}`);
  const legs: LegEntry[] = [];
  for (const [i, item] of value.entries()) {
    if (item === null || typeof item !== "object" || Array.isArray(item)) return invalid(`legs[${i}]: expected an object`);
    const leg = item as Record<string, unknown>;
    for (const key of Object.keys(leg)) if (!["id", "uri", "unit", "volume"].includes(key)) return invalid(`legs[${i}].${key}: unknown field`);
    const id = leg["id"];
    if (typeof id !== "string" || !LEG_ID_PATTERN.test(id)) return invalid(`legs[${i}].id: expected 1 to 63 of letters, digits, _ . : / - (not starting with a symbol)`);
    const uri = leg["uri"];
    if (typeof uri !== "string") return invalid(`legs[${i}].uri: expected an NBD URI`);
    try {
      parseNbdUri(uri);
    } catch (error) {
      return invalid(`legs[${i}].uri: ${errorMessage(error)}`);
    }
    const unit = optionalName(leg["unit"], `legs[${i}].unit`);
    if (unit.kind === "invalid") return unit;
    const volume = optionalName(leg["volume"], `legs[${i}].volume`);
    if (volume.kind === "invalid") return volume;
    if (legs.some((l) => l.id === id)) return invalid(`legs[${i}].id: ${id} appears twice`);
    legs.push({ id, uri, ...(unit.value === undefined ? {} : { unit: unit.value }), ...(volume.value === undefined ? {} : { volume: volume.value }) });
  }
  return { kind: "ok", value: legs };
}

function nonNegative(value: unknown): boolean {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

/** The status file the engine writes (the agent reads it; anything malformed is reported, never trusted). */
export function parseStatusFile(text: string): Parsed<EngineStatus> {
  if (Buffer.byteLength(text) > STATUS_FILE_BYTES_MAX) return invalid(`the status file is larger than ${STATUS_FILE_BYTES_MAX} bytes`);
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return invalid(`not JSON: ${errorMessage(error)}`);
  }
  if (value === null || typeof value !== "object") return invalid("expected an object");
  const status = value as Record<string, unknown>;
  if (!nonNegative(status["generation"])) return invalid("generation: expected an integer >= 0");
  if (typeof status["updatedAt"] !== "string") return invalid("updatedAt: expected a time");
  const legs = status["legs"];
  if (!Array.isArray(legs) || legs.length === 0 || legs.length > LEGS_FILE_LEGS_MAX) return invalid(`legs: expected 1 to ${LEGS_FILE_LEGS_MAX} legs`);
  for (const [i, item] of legs.entries()) {
    const leg = item as Record<string, unknown> | null;
    if (leg === null || typeof leg !== "object") return invalid(`legs[${i}]: expected an object`);
    if (typeof leg["id"] !== "string" || typeof leg["uri"] !== "string") return invalid(`legs[${i}]: id and uri must be strings`);
    if (!STATUS_LEG_STATES.includes(leg["state"] as StatusLegState)) return invalid(`legs[${i}].state: one of ${STATUS_LEG_STATES.join(", ")}`);
    if (leg["error"] !== null && typeof leg["error"] !== "string") return invalid(`legs[${i}].error: a string or null`);
    const rebuild = leg["rebuild"] as Record<string, unknown> | null;
    if (rebuild !== null) {
      if (typeof rebuild !== "object" || (rebuild["kind"] !== "delta" && rebuild["kind"] !== "full")) return invalid(`legs[${i}].rebuild.kind: "delta" or "full"`);
      if (!nonNegative(rebuild["copiedBytes"]) || !nonNegative(rebuild["totalBytes"])) return invalid(`legs[${i}].rebuild: copiedBytes and totalBytes are integers >= 0`);
      if (rebuild["etaSeconds"] !== null && !nonNegative(rebuild["etaSeconds"])) return invalid(`legs[${i}].rebuild.etaSeconds: an integer >= 0 or null`);
    }
  }
  return { kind: "ok", value: value as EngineStatus };
}

/** Reads a file of at most `bytesMax` bytes (a larger one is an error, not truncated). */
export async function readBoundedFile(path: string, bytesMax: number, what: string): Promise<string> {
  const handle = await open(path, "r");
  try {
    const buffer = Buffer.alloc(bytesMax + 1);
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, 0);
    if (bytesRead > bytesMax) throw new IpsanError("INVALID_ARGUMENT", `${what} ${path} is larger than ${bytesMax} bytes`);
    return buffer.subarray(0, bytesRead).toString("utf8");
  } finally {
    await handle.close();
  }
}

/** Reads and parses a legs file; errors name the file and the bad field. */
export async function readLegsFile(path: string): Promise<LegEntry[]> {
  const parsed = parseLegsFile(await readBoundedFile(path, LEGS_FILE_BYTES_MAX, "legs file"));
  if (parsed.kind === "invalid") throw new IpsanError("INVALID_ARGUMENT", `legs file ${path}: ${parsed.reason}`);
  return parsed.value;
}

/** Writes `text` to `path` so a reader sees the old content or the new, never half (a temporary file, fsynced, renamed). */
export async function writeFileAtomic(path: string, text: string): Promise<void> {
  const temporary = `${path}.tmp-${process.pid}-${randomBytes(4).toString("hex")}`;
  try {
    const handle = await open(temporary, "w", 0o600);
    try {
      await handle.writeFile(text);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temporary, path);
  } catch (error) {
    await rm(temporary, { force: true });
    throw error;
  }
}

/** Reads the engine's status file; undefined when it does not exist yet. */
export async function readStatusFile(path: string): Promise<EngineStatus | undefined> {
  let text: string;
  try {
    text = await readBoundedFile(path, STATUS_FILE_BYTES_MAX, "status file");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw error;
  }
  const parsed = parseStatusFile(text);
  if (parsed.kind === "invalid") throw new IpsanError("CORRUPT", `status file ${path}: ${parsed.reason}`);
  return parsed.value;
}
