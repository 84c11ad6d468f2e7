// Stable SCSI identifiers of a volume or partition (VPD 0x83 and 0x80).

import { createHash } from "node:crypto";

/**
 * NAA 3 ("locally assigned", SPC-4 7.8.6.6.4) designator of an export: 16 hex
 * digits, "3" then 60 bits of SHA-256 over the unit's identity (its table's
 * unitId), the volume's number (never reused) and the partition (0 = the
 * whole volume). The same across unit restarts; a new volume never gets a
 * deleted one's identifier.
 */
export function scsiNaa(unitId: string, volumeNumber: number, partition: number | undefined): string {
  const digest = createHash("sha256").update(`ipsan naa v1 ${unitId} ${volumeNumber} ${partition ?? 0}`).digest("hex");
  return `3${digest.slice(0, 15)}`;
}

/** VPD 0x80 serial: the NAA's 16 digits, which already name the export uniquely. */
export function scsiSerial(naa: string): string {
  return naa;
}
