// The station's domain: units, volumes, hosts and assignments as the station
// keeps them (in SQLite and mirrored in memory). One word per concept, the same
// as in docs/api.md: unit, pool, volume, partition, extent, host, grant,
// assignment.

export const UNIT_STATES = ["online", "suspect", "offline", "down", "unknown"] as const;
export type UnitState = (typeof UNIT_STATES)[number];

export const HOST_STATES = ["online", "offline"] as const;
export type HostState = (typeof HOST_STATES)[number];

/**
 * pending: recorded, the unit not yet (fully) told. active: the unit grants the
 * host. revoking: unassign recorded, the grant not yet removed. released and
 * failed are final (history).
 */
export const ASSIGNMENT_STATES = ["pending", "active", "revoking", "released", "failed"] as const;
export type AssignmentState = (typeof ASSIGNMENT_STATES)[number];
export const LIVE_ASSIGNMENT_STATES: ReadonlySet<AssignmentState> = new Set(["pending", "active", "revoking"]);

/** Which state may follow which (one place, asserted by the store). */
export const ASSIGNMENT_TRANSITIONS: Readonly<Record<AssignmentState, readonly AssignmentState[]>> = {
  pending: ["active", "failed"],
  active: ["revoking"],
  revoking: ["released"],
  released: [],
  failed: [],
};

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export interface ExtentRecord {
  readonly startLba: number;
  readonly lengthLba: number;
  readonly endLba: number;
}

export interface PartitionRecord {
  readonly index: number;
  readonly name: string;
  readonly startLba: number;
  readonly lengthLba: number;
  readonly endLba: number;
  readonly sizeBytes: number;
}

export interface VolumeRecord {
  readonly unit: string;
  readonly name: string;
  readonly number: number;
  readonly sizeBytes: number;
  readonly extents: readonly ExtentRecord[];
  readonly partitions: readonly PartitionRecord[];
  /** As last reported by the unit; null when the report did not say. */
  readonly grants: readonly string[] | null;
}

export interface UnitRecord {
  readonly name: string;
  readonly dnsName: string | null;
  readonly addresses: readonly string[];
  readonly nbd: HostPort | null;
  readonly control: HostPort | null;
  readonly capacityBytes: number;
  readonly freeBytes: number;
  /** Largest number of volumes the unit holds, when it says. */
  readonly volumesMax: number | null;
  readonly state: UnitState;
  readonly lastSeenAtMs: number;
  readonly createdAtMs: number;
}

export interface HostRecord {
  readonly name: string;
  readonly address: string;
  /** A spare host (`ipsan host agent --spare`): a failed host's assignments move to it (host_failover.ts). */
  readonly spare?: boolean;
  readonly lastSeenAtMs: number;
  readonly createdAtMs: number;
}

/** What the station recorded when it placed the assignment (shown if the volume is not in the pool). */
export interface AssignmentDetail {
  readonly volumeNumber: number | null;
  readonly sizeBytes: number;
  readonly extents: readonly ExtentRecord[];
  readonly nbd: HostPort | null;
}

/**
 * A leg of a mirrored assignment (copies > 1), as the station knows it:
 * "pending" until the unit made its volume and granted the host, then
 * "in-sync" (the station's view at creation; the host's mirror engine keeps
 * the legs' real sync state on the legs themselves, docs/adr/0009).
 */
export const LEG_STATES = ["pending", "in-sync"] as const;
export type LegState = (typeof LEG_STATES)[number];

export interface LegRecord {
  /** 0-based; leg 0 is also the assignment's unit and volume. */
  readonly index: number;
  readonly unit: string;
  readonly volume: string;
  /** The leg volume's size: the mirror's size plus MIRROR_METADATA_BYTES. */
  readonly sizeBytes: number;
  readonly state: LegState;
  /** What the unit answered when the leg was made (shown if its volume is not in the pool). */
  readonly detail: AssignmentDetail | null;
}

export interface AssignmentRecord {
  readonly id: string;
  readonly requestId: string | null;
  readonly host: string;
  readonly hostAddress: string;
  readonly unit: string;
  readonly volume: string;
  /** 1-based partition index, or null for the whole volume. */
  readonly partition: number | null;
  readonly sizeBytes: number;
  readonly state: AssignmentState;
  /** The station carved this volume for this assignment (undo deletes it). */
  readonly carved: boolean;
  /**
   * The unit wipes the volume before the grant (automatic allocation reusing a
   * free volume: the next host never reads the last one's data). False for the
   * admin's manual assign, which keeps the data on purpose.
   */
  readonly wipe: boolean;
  /** 1: one volume, used directly. 2 or 3: a mirror over `legs`, each on its own unit (unit/volume are leg 0's). */
  readonly copies: number;
  /** The legs of a mirror (copies > 1), by index; empty for a single copy. */
  readonly legs: readonly LegRecord[];
  /**
   * Host failover (host_failover.ts): the host the assignment was moved from.
   * Set with movedAtMs null while the old host is being fenced (no host is
   * granted then); movedAtMs is when the move finished (the new host granted).
   */
  readonly movedFrom?: string | null;
  readonly movedAtMs?: number | null;
  readonly error: string | null;
  readonly detail: AssignmentDetail | null;
  readonly createdAtMs: number;
  readonly updatedAtMs: number;
}

/** A unit's own description of itself and its volumes (discovery storage info or GET /v1/info). */
export interface UnitReport {
  readonly name: string;
  readonly dnsName?: string | null;
  readonly addresses?: readonly string[];
  readonly nbd?: HostPort | null;
  readonly control?: HostPort | null;
  readonly capacityBytes: number;
  readonly freeBytes: number;
  readonly volumesMax?: number | null;
  readonly volumes: readonly Omit<VolumeRecord, "unit">[];
}

export const EVENT_TYPES = ["unit", "volumes", "host", "assignment"] as const;
export type EventType = (typeof EVENT_TYPES)[number];

export interface StationEvent {
  readonly seq: number;
  readonly atMs: number;
  readonly type: EventType;
  readonly action: string;
  readonly subject: string;
  readonly data: unknown;
}
