// Validation of a unit's storage info (the seed's "unit (n) storage info"):
// parsed JSON in, a fresh object holding only the known fields out, or the
// first problem named by its path ("volumes[3].extents[0].endLba: ...").
// Unknown fields are ignored (forward compatibility inside version 1);
// every list is bounded by a limit from messages.ts.

import { ISCSI_NAME_BYTES_MAX, ISCSI_NAME_PATTERN } from "../iscsi/names.ts";
import {
  EXTENTS_PER_UNIT_MAX,
  EXTENTS_PER_VOLUME_MAX,
  FREE_EXTENTS_MAX,
  GRANT_CHARS_MAX,
  GRANTS_PER_VOLUME_MAX,
  HOST_CHARS_MAX,
  PARTITION_NAME_CHARS_MAX,
  PARTITIONS_PER_VOLUME_MAX,
  UNIT_NAME_PATTERN,
  VOLUMES_PER_UNIT_MAX,
  ZONE_PATTERN,
  type HostPort,
  type LbaExtent,
  type PartitionInfo,
  type StorageInfo,
  type StorageInfoMessage,
  type VolumeInfo,
  NBD_TLS_MODES,
  type NbdTlsMode,
  identityGrant,
} from "./messages.ts";

export type ValidationResult<T> = { readonly kind: "ok"; readonly value: T } | { readonly kind: "invalid"; readonly detail: string };

/** Thrown only inside this module and turned into {kind:"invalid"} at its entry points. */
class Invalid extends Error {}

function fail(path: string, expected: string, value: unknown): never {
  let shown: string;
  try {
    shown = JSON.stringify(value) ?? String(value);
  } catch {
    shown = String(value);
  }
  if (shown.length > 60) shown = `${shown.slice(0, 57)}...`;
  throw new Invalid(`${path}: expected ${expected}, got ${shown}`);
}

function object(value: unknown, path: string): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) fail(path, "an object", value);
  return value as Record<string, unknown>;
}

function list(value: unknown, path: string, max: number): readonly unknown[] {
  if (!Array.isArray(value)) fail(path, "a list", value);
  if (value.length > max) fail(path, `at most ${max} items`, `${value.length} items`);
  return value;
}

function count(value: unknown, path: string, min = 0): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < min) fail(path, `an integer >= ${min}`, value);
  return value;
}

function text(value: unknown, path: string, max: number, pattern?: RegExp): string {
  if (typeof value !== "string" || value.length === 0 || value.length > max || (pattern !== undefined && !pattern.test(value))) {
    fail(path, `a string of 1..${max} characters${pattern === undefined ? "" : ` matching ${pattern}`}`, value);
  }
  return value;
}

const HOST_PATTERN = /^[A-Za-z0-9.:_%-]+$/;
const GRANT_PATTERN = /^[0-9A-Fa-f.:/]+$/;

function hostPort(value: unknown, path: string): HostPort {
  const o = object(value, path);
  const port = count(o["port"], `${path}.port`);
  if (port > 65535) fail(`${path}.port`, "a port 0..65535", port);
  return { host: text(o["host"], `${path}.host`, HOST_CHARS_MAX, HOST_PATTERN), port };
}

function extent(value: unknown, path: string): LbaExtent {
  const o = object(value, path);
  const startLba = count(o["startLba"], `${path}.startLba`);
  const lengthLba = count(o["lengthLba"], `${path}.lengthLba`, 1);
  const endLba = count(o["endLba"], `${path}.endLba`);
  if (endLba !== startLba + lengthLba - 1) fail(`${path}.endLba`, `startLba + lengthLba - 1 = ${startLba + lengthLba - 1}`, endLba);
  return { startLba, lengthLba, endLba };
}

function partition(value: unknown, path: string): PartitionInfo {
  const o = object(value, path);
  const base = extent(o, path);
  return {
    index: count(o["index"], `${path}.index`, 1),
    name: text(o["name"], `${path}.name`, PARTITION_NAME_CHARS_MAX),
    ...base,
    sizeBytes: count(o["sizeBytes"], `${path}.sizeBytes`),
  };
}

function volume(value: unknown, path: string): VolumeInfo {
  const o = object(value, path);
  return {
    name: text(o["name"], `${path}.name`, 63, UNIT_NAME_PATTERN),
    number: count(o["number"], `${path}.number`),
    sizeBytes: count(o["sizeBytes"], `${path}.sizeBytes`),
    extents: list(o["extents"], `${path}.extents`, EXTENTS_PER_VOLUME_MAX).map((e, i) => extent(e, `${path}.extents[${i}]`)),
    partitions: list(o["partitions"] ?? [], `${path}.partitions`, PARTITIONS_PER_VOLUME_MAX).map((p, i) =>
      partition(p, `${path}.partitions[${i}]`),
    ),
    // Address grants, then grants by host identity ("access", never with keys) in their station form.
    grants: [
      ...list(o["grants"] ?? [], `${path}.grants`, GRANTS_PER_VOLUME_MAX).map((g, i) => text(g, `${path}.grants[${i}]`, GRANT_CHARS_MAX, GRANT_PATTERN)),
      ...list(o["access"] ?? [], `${path}.access`, GRANTS_PER_VOLUME_MAX).map((a, i) => access(a, `${path}.access[${i}]`)),
    ],
  };
}

const EXPORT_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(?:\/p[1-9][0-9]{0,2})?$/;

/** One grant by host identity as a unit reports it: {host, export, from}, in the station's string form. */
function access(value: unknown, path: string): string {
  const o = object(value, path);
  const host = text(o["host"], `${path}.host`, 63, UNIT_NAME_PATTERN);
  const exportName = text(o["export"], `${path}.export`, 70, EXPORT_PATTERN);
  const from = list(o["from"] ?? [], `${path}.from`, GRANTS_PER_VOLUME_MAX).map((g, i) => text(g, `${path}.from[${i}]`, GRANT_CHARS_MAX, GRANT_PATTERN));
  const iqn = o["iqn"] === undefined || o["iqn"] === null ? undefined : text(o["iqn"], `${path}.iqn`, ISCSI_NAME_BYTES_MAX, ISCSI_NAME_PATTERN);
  return identityGrant(host, exportName, from, iqn);
}

function storageInfo(value: unknown, path: string): StorageInfo {
  const o = object(value, path);
  const volumes = list(o["volumes"], `${path}.volumes`, VOLUMES_PER_UNIT_MAX).map((v, i) => volume(v, `${path}.volumes[${i}]`));
  let extents = 0;
  for (const v of volumes) extents += v.extents.length;
  if (extents > EXTENTS_PER_UNIT_MAX) fail(`${path}.volumes`, `at most ${EXTENTS_PER_UNIT_MAX} extents in all`, extents);
  const dnsName = o["dnsName"] ?? null;
  const control = o["control"] ?? null;
  // Both absent in packets of units from before spares and zones: not spare, no zone (the station reads it so).
  const spare = o["spare"] ?? false;
  if (typeof spare !== "boolean") fail(`${path}.spare`, "true or false", spare);
  const zone = o["zone"] ?? null;
  return {
    name: text(o["name"], `${path}.name`, 63, UNIT_NAME_PATTERN),
    dnsName: dnsName === null ? null : text(dnsName, `${path}.dnsName`, HOST_CHARS_MAX, HOST_PATTERN),
    nbd: hostPort(o["nbd"], `${path}.nbd`),
    control: control === null ? null : hostPort(control, `${path}.control`),
    sectorSize: count(o["sectorSize"] ?? 512, `${path}.sectorSize`, 1),
    capacityBytes: count(o["capacityBytes"], `${path}.capacityBytes`),
    freeBytes: count(o["freeBytes"], `${path}.freeBytes`),
    freeExtents: list(o["freeExtents"] ?? [], `${path}.freeExtents`, FREE_EXTENTS_MAX).map((e, i) =>
      extent(e, `${path}.freeExtents[${i}]`),
    ),
    volumes,
    // Carried only when the packet has them, so an old packet reads back exactly as it was sent.
    ...(o["spare"] === undefined ? {} : { spare }),
    ...(o["zone"] === undefined ? {} : { zone: zone === null ? null : text(zone, `${path}.zone`, 63, ZONE_PATTERN) }),
    ...(o["tls"] === undefined ? {} : { tls: tlsMode(o["tls"], `${path}.tls`) }),
    ...(o["tableGeneration"] === undefined ? {} : { tableGeneration: count(o["tableGeneration"], `${path}.tableGeneration`) }),
    ...(o["iscsi"] === undefined ? {} : { iscsi: iscsiPortal(o["iscsi"], `${path}.iscsi`) }),
  };
}

/** GET /v1/info `iscsi`: null, or {portal: "HOST:PORT"} ("[v6]:PORT"). */
function iscsiPortal(value: unknown, path: string): HostPort | null {
  if (value === null) return null;
  const o = object(value, path);
  const portal = text(o["portal"], `${path}.portal`, HOST_CHARS_MAX + 8);
  const match = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):([0-9]{1,5})$/.exec(portal);
  const port = Number(match?.[3]);
  const host = match?.[1] ?? match?.[2];
  if (match === null || host === undefined || !HOST_PATTERN.test(host) || !(port >= 1 && port <= 65535)) fail(`${path}.portal`, "HOST:PORT ([v6]:PORT), port 1..65535", portal);
  return { host, port };
}

function tlsMode(value: unknown, path: string): NbdTlsMode {
  if (typeof value !== "string" || !(NBD_TLS_MODES as readonly string[]).includes(value)) fail(path, NBD_TLS_MODES.join(" | "), value);
  return value as NbdTlsMode;
}

/** Validates a storage info (for example a unit's GET /v1/info answer). */
export function validateStorageInfo(value: unknown): ValidationResult<StorageInfo> {
  try {
    return { kind: "ok", value: storageInfo(value, "info") };
  } catch (error) {
    if (error instanceof Invalid) return { kind: "invalid", detail: error.message };
    throw error;
  }
}

/** Validates the JSON body of a STORAGE_INFO message: {v:1, generation, info}. */
export function validateStorageInfoMessage(value: unknown): ValidationResult<StorageInfoMessage> {
  try {
    const o = object(value, "message");
    if (o["v"] !== 1) fail("message.v", "1", o["v"]);
    const generation = count(o["generation"], "message.generation", 1);
    if (generation > 0xffff_ffff) fail("message.generation", "a u32", generation);
    return { kind: "ok", value: { generation, info: storageInfo(o["info"], "info") } };
  } catch (error) {
    if (error instanceof Invalid) return { kind: "invalid", detail: error.message };
    throw error;
  }
}
