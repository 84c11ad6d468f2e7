// The volume table and its on-storage codec. Pure: bytes in, a discriminated
// union out; nothing here touches a file (table_store.ts does the I/O).
//
// Slot header (little-endian, SLOT_HEADER_BYTES = 64):
//   0  8  magic "IPSANVT1"
//   8  4  format version (1)
//  12  4  header bytes (64)
//  16  8  generation (u64, below 2^53)
//  24  4  body bytes
//  28  4  reserved, zero
//  32 32  SHA-256 over header bytes 0..31 followed by the body
// Body: UTF-8 JSON of the VolumeTable with extents as [startLba, lengthLba] pairs,
// and "bothSlots": true when the writer keeps every acknowledged change in
// both slots (table_store.ts; absent in slots written before that, which
// older decoders ignore, so the format stays version 1 both ways), and
// "unitId": the unit's stable identity, a random UUID written when the
// storage is formatted (absent in tables written before issue 7: the unit
// writes one on its next start; older decoders ignore it).

import { createHash, randomUUID } from "node:crypto";
import { SECTOR_SIZE } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import {
  DATA_START_LBA,
  EXTENT_ALIGNMENT_LBA,
  EXTENTS_PER_VOLUME_MAX,
  ACCESS_FROM_MAX,
  ACCESS_IQN_BYTES_TABLE_MAX,
  ACCESS_PER_VOLUME_MAX,
  GRANTS_PER_VOLUME_MAX,
  HOST_NAME_PATTERN,
  PARTITIONS_PER_VOLUME_MAX,
  SLOT_HEADER_BYTES,
  STORAGE_BYTES_MAX,
  STORAGE_BYTES_MIN,
  TABLE_BODY_BYTES_MAX,
  TABLE_FORMAT_VERSION,
  TABLE_MAGIC,
  VOLUME_NAME_PATTERN,
  VOLUMES_MAX,
  dataAreaEndLba,
} from "./layout.ts";
import { parseCidr } from "./cidr.ts";
import { iscsiNameProblem } from "../iscsi/names.ts";

/** An LBA range: absolute on the storage for volume extents, volume-relative for partitions. */
export interface LbaRange {
  readonly startLba: number;
  readonly lengthLba: number;
}

export interface VolumeRecord {
  readonly name: string;
  /** Unique for the life of the storage; never reused after a delete. */
  readonly number: number;
  /** Exact size served to clients; a multiple of 512, at most the extents' total. */
  readonly sizeBytes: number;
  readonly extents: readonly LbaRange[];
  /** Partitions 1..N in order; LBAs relative to the start of the volume. */
  readonly partitions: readonly LbaRange[];
  /** Canonical addresses or CIDRs ("10.1.0.5", "fd00::/64"); empty = no grant. */
  readonly grants: readonly string[];
  /** Identity grants: a host that proved its TLS-PSK identity; empty = none. */
  readonly access: readonly AccessGrant[];
}

/**
 * A grant to a host identity. The key itself is not in the table (it lives
 * in DATA/host-keys.psk, 0600: host_keys.ts); keyId names it, so a rotated
 * key changes the record and the change revokes connections made with the old one.
 */
export interface AccessGrant {
  readonly host: string;
  /** Undefined: the whole volume and its partitions; N: partition N only. */
  readonly partition: number | undefined;
  /** Canonical CIDRs the host must connect from; empty = any address. */
  readonly from: readonly string[];
  /** pskKeyId() of the host's key when the grant was made. */
  readonly keyId: string;
  /**
   * iSCSI: the only initiator name (IQN) the grant admits, besides the host
   * identity and key (undefined: any initiator; NBD peers have none, so a
   * grant with an iqn admits no NBD peer). Absent in tables written before
   * issue 10.
   */
  readonly iqn?: string;
}

export interface VolumeTable {
  /** Storage size the table was last written for; it only grows. */
  readonly storageBytes: number;
  readonly nextVolumeNumber: number;
  readonly volumes: readonly VolumeRecord[];
  /**
   * The unit's stable identity (lowercase UUID), written when the storage is
   * formatted; absent in tables written before issue 7 (the unit adds one on
   * its next start, VolumeManager.open).
   */
  readonly unitId?: string;
}

/** A unit identity as the table stores it: a lowercase RFC 4122 UUID. */
export const UNIT_ID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** A new unit identity (random UUID). */
export function newUnitId(): string {
  return randomUUID();
}

export type SlotDecode =
  | { readonly kind: "empty" }
  | {
      readonly kind: "valid";
      readonly generation: number;
      readonly table: VolumeTable;
      /** Written by a writer that puts every acknowledged change into both slots (docs/adr/0008). */
      readonly bothSlots: boolean;
    }
  | { readonly kind: "invalid"; readonly reason: string };

const MAGIC_BYTES = Buffer.from(TABLE_MAGIC, "ascii");

export function emptyTable(storageBytes: number): VolumeTable {
  return { storageBytes, nextVolumeNumber: 1, volumes: [] };
}

export function extentsLengthLba(extents: readonly LbaRange[]): number {
  return extents.reduce((sum, extent) => sum + extent.lengthLba, 0);
}

function checksum(header: Buffer, body: Buffer): Buffer {
  return createHash("sha256").update(header.subarray(0, 32)).update(body).digest();
}

function encodeBody(table: VolumeTable, bothSlots: boolean): Buffer {
  const pairs = (ranges: readonly LbaRange[]) => ranges.map((r) => [r.startLba, r.lengthLba]);
  return Buffer.from(
    JSON.stringify({
      storageBytes: table.storageBytes,
      nextVolumeNumber: table.nextVolumeNumber,
      ...(bothSlots ? { bothSlots: true } : {}),
      ...(table.unitId === undefined ? {} : { unitId: table.unitId }),
      volumes: table.volumes.map((v) => ({
        name: v.name,
        number: v.number,
        sizeBytes: v.sizeBytes,
        extents: pairs(v.extents),
        partitions: pairs(v.partitions),
        grants: v.grants,
        // Absent when empty: a table without identity grants stays byte-identical to older units' (they ignore the field).
        ...(v.access.length === 0
          ? {}
          : {
              access: v.access.map((a) => ({
                host: a.host,
                ...(a.partition === undefined ? {} : { partition: a.partition }),
                from: a.from,
                keyId: a.keyId,
                // Absent without one: a table without iSCSI grants stays readable by units before issue 10.
                ...(a.iqn === undefined ? {} : { iqn: a.iqn }),
              })),
            }),
      })),
    }),
    "utf8",
  );
}

/**
 * Encodes one complete slot image (header + body). The table must be valid.
 * `bothSlots` false writes the layout of units before ADR 0008 (for tests).
 */
export function encodeSlot(table: VolumeTable, generation: number, bothSlots = true): Buffer {
  const problems = validateTable(table);
  assert(problems.length === 0, `encoding an invalid volume table: ${problems.join("; ")}`);
  assert(Number.isSafeInteger(generation) && generation >= 1, `generation ${generation}`);
  const body = encodeBody(table, bothSlots);
  assert(body.length <= TABLE_BODY_BYTES_MAX, `volume table body ${body.length} bytes over TABLE_BODY_BYTES_MAX`);
  const header = Buffer.alloc(SLOT_HEADER_BYTES);
  MAGIC_BYTES.copy(header, 0);
  header.writeUInt32LE(TABLE_FORMAT_VERSION, 8);
  header.writeUInt32LE(SLOT_HEADER_BYTES, 12);
  header.writeBigUInt64LE(BigInt(generation), 16);
  header.writeUInt32LE(body.length, 24);
  header.writeUInt32LE(0, 28);
  checksum(header, body).copy(header, 32);
  return Buffer.concat([header, body]);
}

/** Decodes a slot read from storage (at least the header; the body if the header says so). */
export function decodeSlot(bytes: Buffer): SlotDecode {
  if (bytes.length < SLOT_HEADER_BYTES) return { kind: "invalid", reason: `slot shorter than ${SLOT_HEADER_BYTES} bytes` };
  const header = bytes.subarray(0, SLOT_HEADER_BYTES);
  if (header.every((b) => b === 0)) return { kind: "empty" };
  if (!header.subarray(0, 8).equals(MAGIC_BYTES)) return { kind: "invalid", reason: "bad magic" };
  const version = header.readUInt32LE(8);
  if (version !== TABLE_FORMAT_VERSION) return { kind: "invalid", reason: `unknown format version ${version}` };
  if (header.readUInt32LE(12) !== SLOT_HEADER_BYTES) return { kind: "invalid", reason: "bad header size" };
  const generationBig = header.readBigUInt64LE(16);
  if (generationBig < 1n || generationBig > BigInt(Number.MAX_SAFE_INTEGER)) {
    return { kind: "invalid", reason: `generation ${generationBig} out of range` };
  }
  const bodyBytes = header.readUInt32LE(24);
  if (bodyBytes > TABLE_BODY_BYTES_MAX) return { kind: "invalid", reason: `body length ${bodyBytes} over limit` };
  if (header.readUInt32LE(28) !== 0) return { kind: "invalid", reason: "reserved field not zero" };
  if (bytes.length < SLOT_HEADER_BYTES + bodyBytes) return { kind: "invalid", reason: "slot cut short" };
  const body = bytes.subarray(SLOT_HEADER_BYTES, SLOT_HEADER_BYTES + bodyBytes);
  if (!checksum(header, body).equals(header.subarray(32, 64))) return { kind: "invalid", reason: "checksum mismatch" };
  const parsed = decodeBody(body);
  if (!parsed.ok) return { kind: "invalid", reason: parsed.reason };
  const problems = validateTable(parsed.table);
  if (problems.length > 0) return { kind: "invalid", reason: `inconsistent table: ${problems.join("; ")}` };
  return { kind: "valid", generation: Number(generationBig), table: parsed.table, bothSlots: parsed.bothSlots };
}

type BodyParse = { ok: true; table: VolumeTable; bothSlots: boolean } | { ok: false; reason: string };

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
function isCount(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}
function parseRanges(value: unknown): LbaRange[] | undefined {
  if (!Array.isArray(value)) return undefined;
  const out: LbaRange[] = [];
  for (const pair of value) {
    if (!Array.isArray(pair) || pair.length !== 2 || !isCount(pair[0]) || !isCount(pair[1])) return undefined;
    out.push({ startLba: pair[0], lengthLba: pair[1] });
  }
  return out;
}

function parseAccess(value: unknown): AccessGrant[] | undefined {
  if (value === undefined) return [];
  if (!Array.isArray(value)) return undefined;
  const out: AccessGrant[] = [];
  for (const a of value) {
    if (!isRecord(a)) return undefined;
    const { host, partition, from, keyId, iqn } = a;
    if (typeof host !== "string" || typeof keyId !== "string" || !Array.isArray(from) || !from.every((f) => typeof f === "string")) return undefined;
    if (partition !== undefined && !isCount(partition)) return undefined;
    if (iqn !== undefined && typeof iqn !== "string") return undefined;
    out.push({ host, partition, from, keyId, ...(iqn === undefined ? {} : { iqn }) });
  }
  return out;
}

function decodeBody(body: Buffer): BodyParse {
  let json: unknown;
  try {
    json = JSON.parse(body.toString("utf8"));
  } catch {
    return { ok: false, reason: "body is not JSON" };
  }
  if (!isRecord(json) || !isCount(json["storageBytes"]) || !isCount(json["nextVolumeNumber"]) || !Array.isArray(json["volumes"])) {
    return { ok: false, reason: "body lacks storageBytes, nextVolumeNumber or volumes" };
  }
  const bothSlots = json["bothSlots"];
  if (bothSlots !== undefined && bothSlots !== true) return { ok: false, reason: "bothSlots is neither absent nor true" };
  const unitId = json["unitId"];
  if (unitId !== undefined && (typeof unitId !== "string" || !UNIT_ID_PATTERN.test(unitId))) {
    return { ok: false, reason: "unitId is not a lowercase UUID" };
  }
  const volumes: VolumeRecord[] = [];
  for (const v of json["volumes"] as unknown[]) {
    if (!isRecord(v)) return { ok: false, reason: "volume entry is not an object" };
    const extents = parseRanges(v["extents"]);
    const partitions = parseRanges(v["partitions"]);
    const grants = v["grants"];
    if (
      typeof v["name"] !== "string" ||
      !isCount(v["number"]) ||
      !isCount(v["sizeBytes"]) ||
      extents === undefined ||
      partitions === undefined ||
      !Array.isArray(grants) ||
      !grants.every((g) => typeof g === "string")
    ) {
      return { ok: false, reason: `volume entry ${JSON.stringify(v["name"])} has a bad field` };
    }
    const access = parseAccess(v["access"]);
    if (access === undefined) return { ok: false, reason: `volume entry ${JSON.stringify(v["name"])} has a bad access field` };
    volumes.push({ name: v["name"], number: v["number"], sizeBytes: v["sizeBytes"], extents, partitions, grants, access });
  }
  const table: VolumeTable = { storageBytes: json["storageBytes"], nextVolumeNumber: json["nextVolumeNumber"], volumes, ...(unitId === undefined ? {} : { unitId }) };
  return { ok: true, table, bothSlots: bothSlots === true };
}

/**
 * Every invariant of a table, as a list of problems (empty = valid). Checked
 * before every write (as an assertion) and after every load (as CORRUPT).
 * The key one: no two extents, of one volume or of two, share a sector.
 */
/** Bytes of initiator names the identity grants of one volume hold (ACCESS_IQN_BYTES_TABLE_MAX counts them). */
export function accessIqnBytes(access: readonly AccessGrant[]): number {
  return access.reduce((sum, a) => sum + (a.iqn === undefined ? 0 : Buffer.byteLength(a.iqn, "utf8")), 0);
}

export function validateTable(table: VolumeTable): string[] {
  const problems: string[] = [];
  if (table.unitId !== undefined && !UNIT_ID_PATTERN.test(table.unitId)) problems.push(`unitId ${JSON.stringify(table.unitId)} is not a lowercase UUID`);
  if (!(table.storageBytes >= STORAGE_BYTES_MIN && table.storageBytes <= STORAGE_BYTES_MAX)) {
    problems.push(`storageBytes ${table.storageBytes} out of range`);
  }
  const endLba = dataAreaEndLba(table.storageBytes);
  if (table.volumes.length > VOLUMES_MAX) problems.push(`${table.volumes.length} volumes over VOLUMES_MAX`);
  const names = new Set<string>();
  const numbers = new Set<number>();
  const all: { startLba: number; endLba: number; name: string }[] = [];
  let iqnBytes = 0;
  for (const v of table.volumes) {
    const at = `volume ${JSON.stringify(v.name)}`;
    if (!VOLUME_NAME_PATTERN.test(v.name)) problems.push(`${at}: bad name`);
    if (names.has(v.name)) problems.push(`${at}: duplicate name`);
    names.add(v.name);
    if (!(v.number >= 1 && v.number < table.nextVolumeNumber) || numbers.has(v.number)) {
      problems.push(`${at}: bad or duplicate number ${v.number}`);
    }
    numbers.add(v.number);
    if (v.extents.length === 0 || v.extents.length > EXTENTS_PER_VOLUME_MAX) problems.push(`${at}: ${v.extents.length} extents`);
    for (const e of v.extents) {
      if (e.lengthLba <= 0 || e.startLba % EXTENT_ALIGNMENT_LBA !== 0 || e.lengthLba % EXTENT_ALIGNMENT_LBA !== 0) {
        problems.push(`${at}: extent ${e.startLba}+${e.lengthLba} empty or not aligned to ${EXTENT_ALIGNMENT_LBA} sectors`);
      }
      if (e.startLba < DATA_START_LBA || e.startLba + e.lengthLba > endLba) {
        problems.push(`${at}: extent ${e.startLba}+${e.lengthLba} outside the data area [${DATA_START_LBA}, ${endLba})`);
      }
      all.push({ startLba: e.startLba, endLba: e.startLba + e.lengthLba, name: v.name });
    }
    const allocatedBytes = extentsLengthLba(v.extents) * SECTOR_SIZE;
    if (v.sizeBytes <= 0 || v.sizeBytes % SECTOR_SIZE !== 0 || v.sizeBytes > allocatedBytes) {
      problems.push(`${at}: sizeBytes ${v.sizeBytes} not a positive sector multiple within its ${allocatedBytes} allocated bytes`);
    }
    if (v.sizeBytes + EXTENT_ALIGNMENT_LBA * SECTOR_SIZE <= allocatedBytes) {
      problems.push(`${at}: ${allocatedBytes} bytes allocated for ${v.sizeBytes}: a whole unused extent unit`);
    }
    if (v.partitions.length > PARTITIONS_PER_VOLUME_MAX) problems.push(`${at}: ${v.partitions.length} partitions`);
    let previousEndLba = 0;
    for (const p of v.partitions) {
      if (p.lengthLba <= 0 || p.startLba < previousEndLba || (p.startLba + p.lengthLba) * SECTOR_SIZE > v.sizeBytes) {
        problems.push(`${at}: partition ${p.startLba}+${p.lengthLba} empty, overlapping or outside the volume`);
      }
      previousEndLba = p.startLba + p.lengthLba;
    }
    if (v.grants.length > GRANTS_PER_VOLUME_MAX) problems.push(`${at}: ${v.grants.length} grants`);
    for (const g of v.grants) {
      const parsed = parseCidr(g);
      if (!parsed.ok || parsed.cidr.text !== g) problems.push(`${at}: grant ${JSON.stringify(g)} not a canonical CIDR`);
    }
    if (v.access.length > ACCESS_PER_VOLUME_MAX) problems.push(`${at}: ${v.access.length} identity grants`);
    iqnBytes += accessIqnBytes(v.access);
    const accessSeen = new Set<string>();
    for (const a of v.access) {
      const what = `${at}: identity grant ${JSON.stringify(a.host)}`;
      if (!HOST_NAME_PATTERN.test(a.host)) problems.push(`${what}: bad host name`);
      if (!/^[0-9a-f]{16}$/.test(a.keyId)) problems.push(`${what}: bad keyId`);
      if (a.partition !== undefined && !(a.partition >= 1 && a.partition <= PARTITIONS_PER_VOLUME_MAX)) problems.push(`${what}: bad partition ${a.partition}`);
      if (a.from.length > ACCESS_FROM_MAX) problems.push(`${what}: ${a.from.length} from entries`);
      for (const f of a.from) {
        const parsed = parseCidr(f);
        if (!parsed.ok || parsed.cidr.text !== f) problems.push(`${what}: from ${JSON.stringify(f)} not a canonical CIDR`);
      }
      if (a.iqn !== undefined) {
        const problem = iscsiNameProblem(a.iqn);
        if (problem !== undefined) problems.push(`${what}: iqn ${problem}`);
      }
      const key = `${a.host}/${a.partition ?? ""}`;
      if (accessSeen.has(key)) problems.push(`${what}: export granted twice`);
      accessSeen.add(key);
    }
  }
  if (iqnBytes > ACCESS_IQN_BYTES_TABLE_MAX) problems.push(`identity grants name ${iqnBytes} bytes of initiators, over ACCESS_IQN_BYTES_TABLE_MAX`);
  all.sort((a, b) => a.startLba - b.startLba);
  for (let i = 1; i < all.length; i++) {
    const previous = all[i - 1];
    const current = all[i];
    if (previous !== undefined && current !== undefined && current.startLba < previous.endLba) {
      problems.push(`volumes ${previous.name} and ${current.name} overlap at LBA ${current.startLba}`);
    }
  }
  return problems;
}

/** The free LBA ranges of the data area, in order. */
export function freeRanges(table: VolumeTable): LbaRange[] {
  const used = table.volumes.flatMap((v) => v.extents).sort((a, b) => a.startLba - b.startLba);
  const free: LbaRange[] = [];
  let cursor = DATA_START_LBA;
  for (const e of used) {
    if (e.startLba > cursor) free.push({ startLba: cursor, lengthLba: e.startLba - cursor });
    cursor = Math.max(cursor, e.startLba + e.lengthLba);
  }
  const endLba = dataAreaEndLba(table.storageBytes);
  if (endLba > cursor) free.push({ startLba: cursor, lengthLba: endLba - cursor });
  return free;
}

/** A table with every limit at its maximum, to prove it fits a slot (checked at load). */
function worstCaseTable(): VolumeTable {
  const lbaMax = Math.floor(STORAGE_BYTES_MAX / SECTOR_SIZE);
  const extents: LbaRange[] = Array.from({ length: EXTENTS_PER_VOLUME_MAX }, () => ({ startLba: lbaMax, lengthLba: lbaMax }));
  const partitions: LbaRange[] = Array.from({ length: PARTITIONS_PER_VOLUME_MAX }, () => ({ startLba: lbaMax, lengthLba: lbaMax }));
  const grants = Array.from({ length: GRANTS_PER_VOLUME_MAX }, () => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128");
  const access: AccessGrant[] = Array.from({ length: ACCESS_PER_VOLUME_MAX }, () => ({
    host: "h".repeat(63),
    partition: PARTITIONS_PER_VOLUME_MAX,
    from: Array.from({ length: ACCESS_FROM_MAX }, () => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
    keyId: "f".repeat(16),
    // ACCESS_IQN_BYTES_TABLE_MAX spread over every grant of every volume.
    iqn: `iqn.2026-12.a:${"b".repeat(Math.max(1, Math.floor(ACCESS_IQN_BYTES_TABLE_MAX / (VOLUMES_MAX * ACCESS_PER_VOLUME_MAX)) - 14))}`,
  }));
  const volumes = Array.from({ length: VOLUMES_MAX }, (_, i) => ({
    name: `${i}`.padStart(63, "x"),
    number: Number.MAX_SAFE_INTEGER,
    sizeBytes: STORAGE_BYTES_MAX,
    extents,
    partitions,
    grants,
    access,
  }));
  return { storageBytes: STORAGE_BYTES_MAX, nextVolumeNumber: Number.MAX_SAFE_INTEGER, volumes, unitId: "ffffffff-ffff-4fff-bfff-ffffffffffff" };
}

const worstCaseBodyBytes = encodeBody(worstCaseTable(), true).length;
assert(
  worstCaseBodyBytes <= TABLE_BODY_BYTES_MAX,
  `worst-case volume table (${worstCaseBodyBytes} bytes) must fit TABLE_BODY_BYTES_MAX (${TABLE_BODY_BYTES_MAX})`,
);
export const TABLE_BODY_BYTES_WORST_CASE = worstCaseBodyBytes;
