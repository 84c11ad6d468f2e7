// The unit's on-storage layout and its named limits (docs/adr/0002-unit-storage-layout.md).
//
//   byte 0                      TABLE_SLOT_BYTES             METADATA_AREA_BYTES
//   | table slot 0 (2 MiB)       | table slot 1 (2 MiB)       | data area: volume extents ... |
//
// Each slot holds one complete copy of the volume table: a 64-byte header
// (magic, format version, generation, body length, SHA-256) and a JSON body.
// Updates go to the older slot, so a torn write only ever damages the copy
// that was being replaced. Volume extents are absolute LBAs (512-byte
// sectors) inside the data area, aligned to EXTENT_ALIGNMENT_BYTES.

import { assert } from "../util/assert.ts";
import { SECTOR_SIZE } from "../block/types.ts";

export const MIB = 1024 * 1024;

export const TABLE_SLOT_COUNT = 2;
export const TABLE_SLOT_BYTES = 2 * MIB;
export const METADATA_AREA_BYTES = TABLE_SLOT_COUNT * TABLE_SLOT_BYTES;
export const SLOT_HEADER_BYTES = 64;
export const TABLE_BODY_BYTES_MAX = TABLE_SLOT_BYTES - SLOT_HEADER_BYTES;
export const TABLE_MAGIC = "IPSANVT1";
export const TABLE_FORMAT_VERSION = 1;

/** Every extent starts and ends on this boundary (1 MiB: the usual partition alignment). */
export const EXTENT_ALIGNMENT_BYTES = MIB;
export const EXTENT_ALIGNMENT_LBA = EXTENT_ALIGNMENT_BYTES / SECTOR_SIZE;
export const DATA_START_LBA = METADATA_AREA_BYTES / SECTOR_SIZE;

export const VOLUMES_MAX = 256;
export const EXTENTS_PER_VOLUME_MAX = 64;
export const PARTITIONS_PER_VOLUME_MAX = 16;
export const GRANTS_PER_VOLUME_MAX = 32;
/** Identity grants (host, export, from) per volume, apart from the address grants. */
export const ACCESS_PER_VOLUME_MAX = 16;
/** Source addresses or CIDRs one identity grant may require. */
export const ACCESS_FROM_MAX = 2;
/**
 * Bytes of initiator names (identity grants' `iqn`, each up to 223 bytes) in
 * one volume table, all volumes together: the table's 2 MiB slot holds every
 * other limit at its maximum and this much besides (about 1100 grants naming
 * 60-byte IQNs). Checked by the grants endpoint and at load.
 */
export const ACCESS_IQN_BYTES_TABLE_MAX = 64 * 1024;
/** Station host names: the TLS-PSK identity of a host. */
export const HOST_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
export const VOLUME_NAME_LENGTH_MAX = 63;
/** Byte offsets stay below 2^53 so they are exact JavaScript numbers. */
export const STORAGE_BYTES_MAX = 2 ** 53 - EXTENT_ALIGNMENT_BYTES;
/** Smallest storage that holds the metadata area and one extent. */
export const STORAGE_BYTES_MIN = METADATA_AREA_BYTES + EXTENT_ALIGNMENT_BYTES;

export const VOLUME_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** Bytes of the data area usable for extents on storage of `storageBytes`. */
export function dataAreaEndLba(storageBytes: number): number {
  const usableBytes = Math.floor(storageBytes / EXTENT_ALIGNMENT_BYTES) * EXTENT_ALIGNMENT_BYTES;
  return Math.max(DATA_START_LBA, usableBytes / SECTOR_SIZE);
}

// Limits checked against each other once, when the module loads (TigerBeetle style).
assert(METADATA_AREA_BYTES % EXTENT_ALIGNMENT_BYTES === 0, "metadata area must end on an extent boundary");
assert(EXTENT_ALIGNMENT_BYTES % SECTOR_SIZE === 0, "extent alignment must be whole sectors");
assert(TABLE_SLOT_BYTES % 4096 === 0, "table slots must be page aligned");
assert(SLOT_HEADER_BYTES >= 8 + 4 + 4 + 8 + 4 + 4 + 32, "slot header must hold its fields");
assert(VOLUME_NAME_PATTERN.test("a".repeat(VOLUME_NAME_LENGTH_MAX)), "name pattern and length limit agree");
assert(!VOLUME_NAME_PATTERN.test("a".repeat(VOLUME_NAME_LENGTH_MAX + 1)), "name pattern and length limit agree");
