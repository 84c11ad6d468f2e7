// Volume operations as pure functions: table in, new table out, or a typed
// IpsanError naming the field and value. The manager (volumes.ts) serializes
// them, zeroes newly allocated space, and persists the result.
//
// Allocation: a request is rounded up to whole EXTENT_ALIGNMENT_BYTES units.
// Grow first extends the volume's last extent in place when the space right
// after it is free. Otherwise the smallest free range that holds the whole
// request is used (best fit); failing that, the largest free ranges are taken
// in turn (fewest extents), up to EXTENTS_PER_VOLUME_MAX per volume.

import { SECTOR_SIZE } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { IpsanError } from "../util/errors.ts";
import { formatSize } from "../util/size.ts";
import { parseCidr } from "./cidr.ts";
import { PSK_KEY_HEX_PATTERN, pskKeyId } from "../nbd/tls.ts";
import {
  ACCESS_FROM_MAX,
  ACCESS_IQN_BYTES_TABLE_MAX,
  ACCESS_PER_VOLUME_MAX,
  EXTENT_ALIGNMENT_BYTES,
  EXTENT_ALIGNMENT_LBA,
  EXTENTS_PER_VOLUME_MAX,
  GRANTS_PER_VOLUME_MAX,
  HOST_NAME_PATTERN,
  PARTITIONS_PER_VOLUME_MAX,
  STORAGE_BYTES_MAX,
  VOLUME_NAME_PATTERN,
  VOLUMES_MAX,
} from "./layout.ts";
import { type AccessGrant, type LbaRange, type VolumeRecord, type VolumeTable, accessIqnBytes, extentsLengthLba, freeRanges, validateTable } from "./table.ts";
import { iscsiNameProblem } from "../iscsi/names.ts";

export interface TableChange {
  readonly table: VolumeTable;
  /** The volume after the change (undefined after a delete). */
  readonly volume: VolumeRecord | undefined;
  /** Storage ranges that became part of a volume and must read as zeroes before it is served. */
  readonly allocated: readonly LbaRange[];
}

function invalid(field: string, message: string): IpsanError {
  return new IpsanError("INVALID_ARGUMENT", message, { field });
}

export function checkVolumeName(value: unknown, field = "name"): string {
  if (typeof value !== "string" || !VOLUME_NAME_PATTERN.test(value)) {
    throw invalid(field, `${field}: invalid volume name ${JSON.stringify(value)} (expected [A-Za-z0-9][A-Za-z0-9_.-]{0,62})`);
  }
  return value;
}

export function checkSizeBytes(value: unknown, field = "sizeBytes"): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value <= 0) {
    throw invalid(field, `${field}: ${JSON.stringify(value)} is not a positive whole number of bytes`);
  }
  if (value % SECTOR_SIZE !== 0) throw invalid(field, `${field}: ${value} is not a multiple of ${SECTOR_SIZE} bytes`);
  if (value > STORAGE_BYTES_MAX) throw invalid(field, `${field}: ${value} is over the limit ${STORAGE_BYTES_MAX}`);
  return value;
}

function findVolume(table: VolumeTable, name: string): VolumeRecord {
  const volume = table.volumes.find((v) => v.name === name);
  if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${JSON.stringify(name)} not found`, { field: "name" });
  return volume;
}

function unitsFor(bytes: number): number {
  return Math.ceil(bytes / EXTENT_ALIGNMENT_BYTES);
}

function replaceVolume(table: VolumeTable, volume: VolumeRecord): VolumeTable {
  return { ...table, volumes: table.volumes.map((v) => (v.name === volume.name ? volume : v)) };
}

function finish(change: TableChange): TableChange {
  const problems = validateTable(change.table);
  assert(problems.length === 0, `volume operation produced an invalid table: ${problems.join("; ")}`);
  return change;
}

/** Appends `ranges` to `extents`, merging a range that starts where the previous one ends. */
function appendExtents(extents: readonly LbaRange[], ranges: readonly LbaRange[]): LbaRange[] {
  const out = [...extents];
  for (const r of ranges) {
    const last = out[out.length - 1];
    if (last !== undefined && last.startLba + last.lengthLba === r.startLba) {
      out[out.length - 1] = { startLba: last.startLba, lengthLba: last.lengthLba + r.lengthLba };
    } else {
      out.push(r);
    }
  }
  return out;
}

/**
 * Chooses storage for `units` extent units; `after` is the LBA right after the
 * volume's last extent (grow), where a free range is taken first.
 */
function allocate(table: VolumeTable, units: number, after: number | undefined, name: string): LbaRange[] {
  let neededLba = units * EXTENT_ALIGNMENT_LBA;
  const free = freeRanges(table);
  const totalFree = extentsLengthLba(free);
  if (totalFree < neededLba) {
    throw new IpsanError(
      "NO_SPACE",
      `volume ${JSON.stringify(name)}: needs ${formatSize(neededLba * SECTOR_SIZE)}, only ${formatSize(totalFree * SECTOR_SIZE)} free`,
      { field: "sizeBytes" },
    );
  }
  const taken: LbaRange[] = [];
  const adjacent = after === undefined ? undefined : free.find((r) => r.startLba === after);
  let candidates = free;
  if (adjacent !== undefined) {
    const lengthLba = Math.min(adjacent.lengthLba, neededLba);
    taken.push({ startLba: adjacent.startLba, lengthLba });
    neededLba -= lengthLba;
    candidates = free.filter((r) => r !== adjacent);
  }
  if (neededLba > 0) {
    const bestFit = candidates.filter((r) => r.lengthLba >= neededLba).sort((a, b) => a.lengthLba - b.lengthLba || a.startLba - b.startLba)[0];
    if (bestFit !== undefined) {
      taken.push({ startLba: bestFit.startLba, lengthLba: neededLba });
      neededLba = 0;
    } else {
      for (const r of [...candidates].sort((a, b) => b.lengthLba - a.lengthLba || a.startLba - b.startLba)) {
        if (neededLba === 0) break;
        const lengthLba = Math.min(r.lengthLba, neededLba);
        taken.push({ startLba: r.startLba, lengthLba });
        neededLba -= lengthLba;
      }
    }
  }
  assert(neededLba === 0, "allocation covered the request");
  return taken;
}

function checkExtentCount(extents: readonly LbaRange[], name: string): void {
  if (extents.length > EXTENTS_PER_VOLUME_MAX) {
    throw new IpsanError(
      "NO_SPACE",
      `volume ${JSON.stringify(name)}: free space too fragmented (${extents.length} extents, limit EXTENTS_PER_VOLUME_MAX=${EXTENTS_PER_VOLUME_MAX})`,
      { field: "sizeBytes" },
    );
  }
}

export function createVolume(table: VolumeTable, nameValue: unknown, sizeValue: unknown): TableChange {
  const name = checkVolumeName(nameValue);
  const sizeBytes = checkSizeBytes(sizeValue);
  if (table.volumes.some((v) => v.name === name)) {
    throw new IpsanError("ALREADY_EXISTS", `volume ${JSON.stringify(name)} already exists`, { field: "name" });
  }
  if (table.volumes.length >= VOLUMES_MAX) {
    throw new IpsanError("NO_SPACE", `volume ${JSON.stringify(name)}: the unit already has VOLUMES_MAX=${VOLUMES_MAX} volumes`, { field: "name" });
  }
  const allocated = allocate(table, unitsFor(sizeBytes), undefined, name);
  const extents = appendExtents([], allocated);
  checkExtentCount(extents, name);
  const volume: VolumeRecord = { name, number: table.nextVolumeNumber, sizeBytes, extents, partitions: [], grants: [], access: [] };
  return finish({
    table: { ...table, nextVolumeNumber: table.nextVolumeNumber + 1, volumes: [...table.volumes, volume] },
    volume,
    allocated,
  });
}

export function deleteVolume(table: VolumeTable, nameValue: unknown): TableChange {
  const name = checkVolumeName(nameValue);
  findVolume(table, name);
  return finish({ table: { ...table, volumes: table.volumes.filter((v) => v.name !== name) }, volume: undefined, allocated: [] });
}

/**
 * What a wipe must zero: every extent of the volume (its slack past sizeBytes
 * too). Refused while the volume has grants: a granted host may be using it,
 * and a wipe under a running host is data loss, not hygiene.
 */
export function wipeRanges(table: VolumeTable, nameValue: unknown, range?: WipeRange): { volume: VolumeRecord; ranges: readonly LbaRange[] } {
  const name = checkVolumeName(nameValue);
  const volume = findVolume(table, name);
  if (volume.grants.length > 0 || volume.access.length > 0) {
    const holders = [...volume.grants, ...volume.access.map((a) => `host ${a.host}`)];
    throw new IpsanError(
      "CONFLICT",
      `volume ${name} has grants (${holders.join(", ")}): a host may be using it; revoke them first (PUT /v1/volumes/${name}/grants {"hosts": []})`,
      { field: "name" },
    );
  }
  return { volume, ranges: range === undefined ? volume.extents : sliceExtents(volume.extents, range.offset / SECTOR_SIZE, range.length / SECTOR_SIZE) };
}

/** The most one ranged wipe zeroes (the station drives a long wipe chunk by chunk, src/station/tasks/wipe.ts). */
export const WIPE_RANGE_BYTES_MAX = 1024 * 1024 * 1024;

/** Part of a volume's address space (its extents, slack included) to zero: bytes from the volume's start. */
export interface WipeRange {
  readonly offset: number;
  readonly length: number;
}

/** Checks a wipe's {offset, length} body against the volume's extents (sector multiples, at most WIPE_RANGE_BYTES_MAX). */
export function checkWipeRange(table: VolumeTable, nameValue: unknown, offsetValue: unknown, lengthValue: unknown): WipeRange {
  const name = checkVolumeName(nameValue);
  const volume = findVolume(table, name);
  const spaceBytes = extentsLengthLba(volume.extents) * SECTOR_SIZE;
  if (typeof offsetValue !== "number" || !Number.isSafeInteger(offsetValue) || offsetValue < 0 || offsetValue % SECTOR_SIZE !== 0) {
    throw invalid("offset", `offset: ${JSON.stringify(offsetValue)} is not a whole, non-negative multiple of ${SECTOR_SIZE} bytes`);
  }
  const length = checkSizeBytes(lengthValue, "length");
  if (length > WIPE_RANGE_BYTES_MAX) throw invalid("length", `length: ${length} is over the limit WIPE_RANGE_BYTES_MAX=${WIPE_RANGE_BYTES_MAX}`);
  if (offsetValue + length > spaceBytes) {
    throw new IpsanError("OUT_OF_RANGE", `offset ${offsetValue} + length ${length} is past the end of volume ${name}'s extents (${spaceBytes} bytes)`, { field: "length" });
  }
  return { offset: offsetValue, length };
}

/** The LBA ranges of `extents` that hold the volume's sectors [startLba, startLba + lengthLba). */
function sliceExtents(extents: readonly LbaRange[], startLba: number, lengthLba: number): LbaRange[] {
  const out: LbaRange[] = [];
  let skip = startLba;
  let left = lengthLba;
  for (const extent of extents) {
    if (left === 0) break;
    if (skip >= extent.lengthLba) {
      skip -= extent.lengthLba;
      continue;
    }
    const take = Math.min(extent.lengthLba - skip, left);
    out.push({ startLba: extent.startLba + skip, lengthLba: take });
    left -= take;
    skip = 0;
  }
  assert(left === 0, "a checked wipe range lies within the volume's extents");
  return out;
}

/** Grows a volume to `sizeValue` bytes in total; open devices keep their old size. */
export function growVolume(table: VolumeTable, nameValue: unknown, sizeValue: unknown): TableChange {
  const name = checkVolumeName(nameValue);
  const sizeBytes = checkSizeBytes(sizeValue);
  const volume = findVolume(table, name);
  if (sizeBytes < volume.sizeBytes) {
    throw new IpsanError("CONFLICT", `volume ${JSON.stringify(name)}: sizeBytes ${sizeBytes} is smaller than its size ${volume.sizeBytes} (volumes never shrink)`, {
      field: "sizeBytes",
    });
  }
  const haveUnits = extentsLengthLba(volume.extents) / EXTENT_ALIGNMENT_LBA;
  const extraUnits = unitsFor(sizeBytes) - haveUnits;
  let extents = volume.extents;
  let allocated: LbaRange[] = [];
  if (extraUnits > 0) {
    const last = volume.extents[volume.extents.length - 1];
    allocated = allocate(table, extraUnits, last === undefined ? undefined : last.startLba + last.lengthLba, name);
    extents = appendExtents(volume.extents, allocated);
    checkExtentCount(extents, name);
  }
  // Bytes between the old size and the end of its last extent unit become
  // visible too: they were never reachable, but zero them all the same.
  const slack = tailSlack(volume);
  const grown: VolumeRecord = { ...volume, sizeBytes, extents };
  return finish({ table: replaceVolume(table, grown), volume: grown, allocated: sizeBytes > volume.sizeBytes && slack !== undefined ? [slack, ...allocated] : allocated });
}

/** The allocated but unserved sectors at the end of a volume's last extent, if any. */
function tailSlack(volume: VolumeRecord): LbaRange | undefined {
  const last = volume.extents[volume.extents.length - 1];
  const allocatedLba = extentsLengthLba(volume.extents);
  const sizeLba = volume.sizeBytes / SECTOR_SIZE;
  if (last === undefined || allocatedLba === sizeLba) return undefined;
  const slackLba = allocatedLba - sizeLba;
  return { startLba: last.startLba + last.lengthLba - slackLba, lengthLba: slackLba };
}

/** Replaces the partitions: laid out back to back from the start of the volume. */
export function setPartitions(table: VolumeTable, nameValue: unknown, sizesValue: unknown): TableChange {
  const name = checkVolumeName(nameValue);
  const volume = findVolume(table, name);
  if (!Array.isArray(sizesValue)) throw invalid("sizesBytes", `sizesBytes: expected a list of sizes in bytes, got ${JSON.stringify(sizesValue)}`);
  if (sizesValue.length > PARTITIONS_PER_VOLUME_MAX) {
    throw invalid("sizesBytes", `sizesBytes: ${sizesValue.length} partitions, limit PARTITIONS_PER_VOLUME_MAX=${PARTITIONS_PER_VOLUME_MAX}`);
  }
  const partitions: LbaRange[] = [];
  let nextLba = 0;
  sizesValue.forEach((value: unknown, i) => {
    const sizeBytes = checkSizeBytes(value, `sizesBytes[${i}]`);
    partitions.push({ startLba: nextLba, lengthLba: sizeBytes / SECTOR_SIZE });
    nextLba += sizeBytes / SECTOR_SIZE;
  });
  if (nextLba * SECTOR_SIZE > volume.sizeBytes) {
    throw invalid("sizesBytes", `sizesBytes: partitions total ${nextLba * SECTOR_SIZE} bytes, more than volume ${JSON.stringify(name)} (${volume.sizeBytes} bytes)`);
  }
  const changed: VolumeRecord = { ...volume, partitions };
  return finish({ table: replaceVolume(table, changed), volume: changed, allocated: [] });
}

/** One entry of `PUT /v1/volumes/NAME/grants {"grants": [...]}`, checked (parseIdentityGrants). */
export interface IdentityGrantInput {
  readonly host: string;
  readonly key: Buffer;
  readonly partition: number | undefined;
  readonly from: readonly string[];
  /** iSCSI: the one initiator name the grant admits (undefined: any). */
  readonly iqn?: string;
}

/**
 * Checks the new grants body of volume `volumeName`: a list of
 * {host, key, export?, from?, iqn?}. Every entry naming one host carries the same
 * key; one export is granted to one host once. Errors name the field.
 */
export function parseIdentityGrants(volumeName: string, value: unknown): IdentityGrantInput[] {
  if (!Array.isArray(value)) throw invalid("grants", `grants: expected a list of {host, key, export, from}, got ${typeof value}`);
  if (value.length > ACCESS_PER_VOLUME_MAX) throw invalid("grants", `grants: ${value.length} entries, limit ACCESS_PER_VOLUME_MAX=${ACCESS_PER_VOLUME_MAX}`);
  const out: IdentityGrantInput[] = [];
  const keys = new Map<string, string>();
  value.forEach((entry: unknown, i) => {
    const at = `grants[${i}]`;
    if (typeof entry !== "object" || entry === null || Array.isArray(entry)) throw invalid(at, `${at}: expected an object {host, key, export, from}`);
    const record = entry as Record<string, unknown>;
    for (const field of Object.keys(record)) {
      if (!["host", "key", "export", "from", "iqn"].includes(field)) {
        throw invalid(`${at}.${field}`, `${at}.${field}: unknown field (expected host, key, export, from, iqn)`);
      }
    }
    const host = record["host"];
    if (typeof host !== "string" || !HOST_NAME_PATTERN.test(host)) {
      throw invalid(`${at}.host`, `${at}.host: required, a host name matching [A-Za-z0-9][A-Za-z0-9_.-]{0,62}`);
    }
    const key = record["key"];
    // The key never goes into a message.
    if (typeof key !== "string" || !PSK_KEY_HEX_PATTERN.test(key)) throw invalid(`${at}.key`, `${at}.key: required, 64 hex digits (32 bytes)`);
    const lower = key.toLowerCase();
    const earlier = keys.get(host);
    if (earlier !== undefined && earlier !== lower) throw invalid(`${at}.key`, `${at}.key: host ${host} is given two different keys`);
    keys.set(host, lower);
    const exportValue = record["export"] ?? volumeName;
    let partition: number | undefined;
    if (exportValue !== volumeName) {
      const match = typeof exportValue === "string" && exportValue.startsWith(`${volumeName}/p`) ? /^([1-9][0-9]{0,2})$/.exec(exportValue.slice(volumeName.length + 2)) : null;
      const n = match === null ? NaN : Number(match[1]);
      if (!(n >= 1 && n <= PARTITIONS_PER_VOLUME_MAX)) {
        throw invalid(`${at}.export`, `${at}.export: ${JSON.stringify(exportValue)} is neither ${volumeName} nor ${volumeName}/pN (N 1..${PARTITIONS_PER_VOLUME_MAX})`);
      }
      partition = n;
    }
    const fromValue = record["from"] ?? [];
    if (!Array.isArray(fromValue) || fromValue.length > ACCESS_FROM_MAX) {
      throw invalid(`${at}.from`, `${at}.from: expected a list of at most ${ACCESS_FROM_MAX} addresses or CIDRs`);
    }
    const from: string[] = [];
    fromValue.forEach((f: unknown, j) => {
      const parsed = typeof f === "string" ? parseCidr(f) : { ok: false as const, reason: "expected a string" };
      if (!parsed.ok) throw invalid(`${at}.from[${j}]`, `${at}.from[${j}]: ${JSON.stringify(f)}: ${parsed.reason}`);
      if (!from.includes(parsed.cidr.text)) from.push(parsed.cidr.text);
    });
    if (out.some((g) => g.host === host && g.partition === partition)) {
      throw invalid(`${at}.export`, `${at}: export ${partition === undefined ? volumeName : `${volumeName}/p${partition}`} granted to host ${host} twice`);
    }
    const iqn = record["iqn"];
    if (iqn !== undefined) {
      const problem = iscsiNameProblem(iqn);
      if (problem !== undefined) throw invalid(`${at}.iqn`, `${at}.iqn: ${problem}`);
    }
    out.push({ host, key: Buffer.from(lower, "hex"), partition, from, ...(typeof iqn === "string" ? { iqn } : {}) });
  });
  return out;
}

/**
 * Replaces every grant of the volume with identity grants (the address
 * grants go). A host's key is one per unit: a new key for a host rotates it
 * on every volume granted to that host (their records change, so the
 * manager revokes connections made with the old key).
 */
export function setIdentityGrants(table: VolumeTable, nameValue: unknown, grants: readonly IdentityGrantInput[]): TableChange {
  const name = checkVolumeName(nameValue);
  const volume = findVolume(table, name);
  const keyIds = new Map(grants.map((g) => [g.host, pskKeyId(g.key)]));
  const access: AccessGrant[] = grants.map((g) => ({
    host: g.host,
    partition: g.partition,
    from: g.from,
    keyId: keyIds.get(g.host) ?? "",
    ...(g.iqn === undefined ? {} : { iqn: g.iqn }),
  }));
  const iqnBytes = table.volumes.reduce((sum, v) => sum + (v.name === name ? accessIqnBytes(access) : accessIqnBytes(v.access)), 0);
  if (iqnBytes > ACCESS_IQN_BYTES_TABLE_MAX) {
    throw invalid(
      "grants",
      `grants: the unit's identity grants would name ${iqnBytes} bytes of initiator IQNs in all, over ACCESS_IQN_BYTES_TABLE_MAX=${ACCESS_IQN_BYTES_TABLE_MAX}: ` +
        "revoke iSCSI grants of volumes no longer used, or place the volume on another unit",
    );
  }
  const changed: VolumeRecord = { ...volume, grants: [], access };
  const volumes = table.volumes.map((v) => {
    if (v.name === name) return changed;
    if (!v.access.some((a) => keyIds.has(a.host) && keyIds.get(a.host) !== a.keyId)) return v;
    return { ...v, access: v.access.map((a) => ({ ...a, keyId: keyIds.get(a.host) ?? a.keyId })) };
  });
  return finish({ table: { ...table, volumes }, volume: changed, allocated: [] });
}

/** Replaces the grants (hosts or CIDRs that may open the volume); stored canonical and de-duplicated. */
export function setGrants(table: VolumeTable, nameValue: unknown, hostsValue: unknown): TableChange {
  const name = checkVolumeName(nameValue);
  const volume = findVolume(table, name);
  if (!Array.isArray(hostsValue)) throw invalid("hosts", `hosts: expected a list of addresses or CIDRs, got ${JSON.stringify(hostsValue)}`);
  if (hostsValue.length > GRANTS_PER_VOLUME_MAX) {
    throw invalid("hosts", `hosts: ${hostsValue.length} entries, limit GRANTS_PER_VOLUME_MAX=${GRANTS_PER_VOLUME_MAX}`);
  }
  const grants: string[] = [];
  hostsValue.forEach((value: unknown, i) => {
    const parsed = typeof value === "string" ? parseCidr(value) : { ok: false as const, reason: "expected a string" };
    if (!parsed.ok) throw invalid(`hosts[${i}]`, `hosts[${i}]: ${JSON.stringify(value)}: ${parsed.reason}`);
    if (!grants.includes(parsed.cidr.text)) grants.push(parsed.cidr.text);
  });
  // The legacy body replaces every grant of the volume, identity grants too.
  const changed: VolumeRecord = { ...volume, grants, access: [] };
  return finish({ table: replaceVolume(table, changed), volume: changed, allocated: [] });
}

/** Records a larger storage (its new space becomes free). Smaller is refused by the caller. */
export function growStorage(table: VolumeTable, storageBytes: number): TableChange {
  assert(storageBytes >= table.storageBytes, "storage never shrinks");
  return finish({ table: { ...table, storageBytes }, volume: undefined, allocated: [] });
}
