// The host's NBD keys (issue 7, docs/security.md). A unit managed by a
// station speaks NBD over TLS with pre-shared keys: the station gives every
// host one key per unit it holds a volume on, and the unit admits the host's
// identity (its host name) with that key to exactly the exports granted to it.
// The host keeps each key in STATE_DIR/keys/UNIT.psk (0600, "identity:hexkey",
// the format of libnbd's tls-psk-file, nbdkit's --tls-psk and psktool), and
// the URIs it hands its clients carry `?tls-psk-file=PATH`, so nbdinfo,
// nbdcopy, nbdfuse, fio and the mirror engine use them as they are.

import { mkdir, readFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { chapSecret } from "../iscsi/names.ts";
import { IpsanError } from "../util/errors.ts";
import { writeSecretFileAtomic } from "../util/secret_file.ts";
import type { HostState } from "./state.ts";
import type { HostKey, StationAssignment, StationClient } from "./station_client.ts";

/** STATE_DIR/keys/UNIT.psk. */
export function keyFilePath(state: HostState, unit: string): string {
  return join(state.dir, "keys", `${unit}.psk`);
}

/** Writes one key file (0600, fsynced, renamed into place: never half a key). */
export async function writeKeyFile(path: string, key: HostKey): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  await writeSecretFileAtomic(path, `${key.identity}:${key.key}\n`);
}

/** `uri` with `tls-psk-file=PATH` (for an nbds:// URI; others are returned as they are). */
export function withPskFile(uri: string, path: string): string {
  if (!uri.startsWith("nbds://")) return uri;
  const url = new URL(uri);
  url.searchParams.set("tls-psk-file", path);
  // URLSearchParams encodes "/" as %2F; libnbd decodes it, but a readable path is kinder to admins.
  return url.href.replace(/tls-psk-file=[^&]*/, `tls-psk-file=${encodeURI(path).replace(/[?#&]/g, encodeURIComponent)}`);
}

function needsKeys(assignment: Localizable): boolean {
  return (assignment.uri ?? "").startsWith("nbds://") || (assignment.legs ?? []).some((leg) => (leg.uri ?? "").startsWith("nbds://"));
}

/** Writes a key file unless it already holds exactly this key. */
async function ensureKeyFile(path: string, key: HostKey): Promise<void> {
  const wanted = `${key.identity}:${key.key}\n`;
  const current = await readFile(path, "utf8").catch(() => undefined);
  if (current !== wanted) await writeKeyFile(path, key);
}

/**
 * The assignments as this host's clients use them: when a unit (or a leg's)
 * speaks TLS, the host's keys are fetched from the station (one call for all)
 * and written under the state dir (rewritten when the station rotated them),
 * and every nbds:// URI gets its key file. A unit the station has no key for
 * (nothing granted there yet) keeps its URI as it is.
 */
type Localizable = Pick<StationAssignment, "unit" | "legs"> & { readonly uri: string | null };

export async function localizeAssignments<T extends Localizable>(state: HostState, client: StationClient, host: string, assignments: readonly T[]): Promise<T[]> {
  if (!assignments.some(needsKeys)) return [...assignments];
  const keys = new Map((await client.hostKeys(host)).map((key) => [key.unit, key]));
  const paths = new Map<string, string>();
  const pathFor = async (unit: string): Promise<string | undefined> => {
    const key = keys.get(unit);
    if (key === undefined) return undefined;
    let path = paths.get(unit);
    if (path === undefined) {
      path = keyFilePath(state, unit);
      await ensureKeyFile(path, key);
      paths.set(unit, path);
    }
    return path;
  };
  const local = async (uri: string | null, unit: string): Promise<string | null> => {
    if (uri === null || !uri.startsWith("nbds://")) return uri;
    const path = await pathFor(unit);
    return path === undefined ? uri : withPskFile(uri, path);
  };
  const out: T[] = [];
  for (const assignment of assignments) {
    if (!needsKeys(assignment)) {
      out.push(assignment);
      continue;
    }
    const legs = assignment.legs === undefined ? undefined : await Promise.all(assignment.legs.map(async (leg) => ({ ...leg, uri: await local(leg.uri, leg.unit) })));
    out.push({ ...assignment, uri: await local(assignment.uri, assignment.unit), ...(legs === undefined ? {} : { legs }) } as T);
  }
  return out;
}

export async function localizeAssignment<T extends Localizable>(state: HostState, client: StationClient, host: string, assignment: T): Promise<T> {
  const [local] = await localizeAssignments(state, client, host, [assignment]);
  return local ?? assignment;
}

/** STATE_DIR/keys/UNIT.chap: the CHAP secret this host answers unit UNIT's iSCSI target with. */
export function chapSecretFilePath(state: HostState, unit: string): string {
  return join(state.dir, "keys", `${unit}.chap`);
}

/**
 * Writes this host's iSCSI CHAP secret for `unit` (chapSecret(key,
 * "initiator"), src/iscsi/names.ts) from its key for that unit, fetched from
 * the station like the NBD keys, to STATE_DIR/keys/UNIT.chap (0600, the 16
 * characters and nothing else, fsynced, renamed into place); returns the
 * path. The unit derives the same secret from the same key.
 */
export async function writeChapSecretFile(state: HostState, client: StationClient, host: string, unit: string): Promise<string> {
  const key = (await client.hostKeys(host)).find((k) => k.unit === unit);
  if (key === undefined) {
    throw new IpsanError(
      "NOT_FOUND",
      `the station has no key for host ${host} on unit ${unit} (nothing of this host's is granted there yet): wait for the assignment to be active, then attach again`,
    );
  }
  const path = chapSecretFilePath(state, unit);
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const secret = chapSecret(Buffer.from(key.key, "hex"), "initiator");
  const current = await readFile(path, "utf8").catch(() => undefined);
  if (current !== secret) await writeSecretFileAtomic(path, secret);
  return path;
}
