// Every limit of the SCSI command set in one place (docs/protocol/scsi.md):
// what VPD page 0xB0 advertises and what the logical unit enforces are the
// same constants, so an initiator that honours the page never hits a refusal.

/** Logical block size the logical unit reports (READ CAPACITY, MODE SENSE block descriptor). */
export const LOGICAL_BLOCK_BYTES = 512;

/** Largest READ/WRITE/VERIFY/WRITE AND VERIFY transfer: 8 MiB (VPD 0xB0 MAXIMUM TRANSFER LENGTH). */
export const MAX_TRANSFER_BYTES = 8 * 1024 * 1024;
export const MAX_TRANSFER_BLOCKS = MAX_TRANSFER_BYTES / LOGICAL_BLOCK_BYTES;

/** OPTIMAL TRANSFER LENGTH GRANULARITY: 4 KiB (the page size the storage file is written in). */
export const OPTIMAL_GRANULARITY_BLOCKS = 4096 / LOGICAL_BLOCK_BYTES;

/** OPTIMAL TRANSFER LENGTH: 1 MiB. */
export const OPTIMAL_TRANSFER_BLOCKS = (1024 * 1024) / LOGICAL_BLOCK_BYTES;

/** Most blocks one UNMAP command may name in total: 2^20 blocks, 512 MiB (libiscsi calls more "insanely big"). */
export const MAX_UNMAP_LBA_COUNT = 1024 * 1024;

/** Most block descriptors in one UNMAP parameter list. */
export const MAX_UNMAP_DESCRIPTORS = 256;

/** Largest UNMAP parameter list accepted: the header and MAX_UNMAP_DESCRIPTORS descriptors. */
export const MAX_UNMAP_PARAMETER_BYTES = 8 + 16 * MAX_UNMAP_DESCRIPTORS;

/** OPTIMAL UNMAP GRANULARITY: 4 KiB (a hole punched in the storage file is this granular). */
export const UNMAP_GRANULARITY_BLOCKS = 4096 / LOGICAL_BLOCK_BYTES;

/**
 * Most blocks one WRITE SAME may cover (MAXIMUM WRITE SAME LENGTH): 8 MiB,
 * as for a transfer. Below 65536 blocks on purpose: libiscsi's WRITE SAME(16)
 * UNMAP test writes 65536 blocks in one WRITE(16), over MAXIMUM TRANSFER
 * LENGTH, unless MAXIMUM WRITE SAME LENGTH is smaller than that.
 */
export const MAX_WRITE_SAME_BLOCKS = MAX_TRANSFER_BLOCKS;

/** WRITE SAME with a non-zero pattern is written in chunks of this many bytes. */
export const WRITE_SAME_CHUNK_BYTES = 1024 * 1024;

/** MAXIMUM COMPARE AND WRITE LENGTH (blocks; the CDB field is one byte). */
export const MAX_COMPARE_AND_WRITE_BLOCKS = 255;

/** Most persistent reservation registrations one logical unit keeps (INSUFFICIENT REGISTRATION RESOURCES beyond). */
export const MAX_REGISTRATIONS = 64;

/** Most unit attention conditions queued for one I_T nexus (older ones are dropped first; a reset is kept). */
export const MAX_UNIT_ATTENTIONS_PER_NEXUS = 8;

/** Most I_T nexuses the logical unit keeps state for (unit attentions, PREVENT): older idle ones are forgotten. */
export const MAX_NEXUS_STATES = 1024;

/** Most LBA status descriptors one GET LBA STATUS answers. */
export const MAX_LBA_STATUS_DESCRIPTORS = 256;

/** GET LBA STATUS looks at most this many bytes past the starting LBA (the rest is asked for again). */
export const LBA_STATUS_SCAN_BYTES = 1024 * 1024 * 1024;

/** Longest CDB decoded (the transport may pass 16 bytes plus an extended-CDB AHS). */
export const MAX_CDB_BYTES = 260;

/** Largest MODE SELECT parameter list read. */
export const MAX_MODE_SELECT_BYTES = 512;

/** Largest PERSISTENT RESERVE OUT parameter list (the basic 24 bytes; SPEC_I_PT lists are refused). */
export const PR_OUT_PARAMETER_BYTES = 24;
