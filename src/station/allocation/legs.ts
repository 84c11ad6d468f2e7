// Mirror legs: sizes and carve-ledger keys shared by allocation, assignments and replacement.

/**
 * Each leg of a mirror is this much larger than the mirror: the host's mirror
 * engine keeps the mirror's metadata in a leg's last MiB (METADATA_BYTES in
 * src/host/engine/metadata.ts; a test checks they agree).
 */
export const MIRROR_METADATA_BYTES = 1024 * 1024;
/** Copies an allocation may ask for (legs on as many distinct units). */
export const COPIES_MAX = 3;

/** The size of each leg of a mirror of `sizeBytes`. */
export function legBytesOf(sizeBytes: number): number {
  return sizeBytes + MIRROR_METADATA_BYTES;
}

/** The carve ledger's key for one leg of a mirrored assignment (a single copy uses the assignment id). */
export function legCarveId(assignmentId: string, index: number): string {
  return `${assignmentId}/leg${index}`;
}
