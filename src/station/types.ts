import type { NbdTlsMode } from "../discovery/messages.ts";
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
/** How the host reaches an assignment's volume: NBD (the default) or iSCSI (issue 10; a single copy only). */
export const PROTOCOLS = ["nbd", "iscsi"] as const;
export type Protocol = (typeof PROTOCOLS)[number];

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
  /** Joined with --spare: ordinary allocation leaves it out; it takes replacement legs. */
  readonly spare?: boolean;
  /** Failure domain label (--zone); null or absent: none. */
  readonly zone?: string | null;
  /** The unit's NBD TLS mode as its info last said (`ipsan unit --tls`); null or absent: not known yet. */
  readonly tls?: NbdTlsMode | null;
  /** The unit's iSCSI portal as its info last said (`ipsan unit --iscsi`); null or absent: it serves no iSCSI (or not known yet). */
  readonly iscsi?: HostPort | null;
}

export interface HostRecord {
  readonly name: string;
  readonly address: string;
  /** A spare host (`ipsan host agent --spare`): a failed host's assignments move to it (host_failover.ts). */
  readonly spare?: boolean;
  /** Raised by `ipsan hosts rotate-key`: a new epoch derives new NBD keys (host_keys.ts). */
  readonly keyEpoch?: number;
  /** The host's iSCSI initiator name (`ipsan host --iqn`); null or absent: none (no iSCSI assignments). */
  readonly iqn?: string | null;
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
 * "in-sync" (the station's view at creation). Once the host's agent reports
 * (PUT /api/v1/assignments/ID/legs), the state is the reported one: the
 * host's mirror engine keeps the legs' real sync state on the legs themselves
 * (docs/adr/0009). A leg the station put in place of a failed one starts
 * "rebuilding".
 */
export const LEG_STATES = ["pending", "in-sync", "stale", "rebuilding", "failed"] as const;
export type LegState = (typeof LEG_STATES)[number];
/** The states a host may report for a leg. */
export const REPORTED_LEG_STATES = ["in-sync", "stale", "rebuilding", "failed"] as const satisfies readonly LegState[];

/** A rebuild in progress, as the host's engine reports it. */
export interface LegRebuild {
  readonly kind: "delta" | "full";
  readonly copiedBytes: number;
  readonly totalBytes: number;
  /** Null when the engine cannot tell yet. */
  readonly etaSeconds: number | null;
}

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
  /** The rebuild the host reported last (null or absent: none). */
  readonly rebuild?: LegRebuild | null;
  /** Why the leg failed, as the host's engine saw it (null or absent: no error). */
  readonly error?: string | null;
}

/** A leg being replaced (recorded before any unit is called; a restart finishes or undoes it). */
export interface LegReplacementRecord {
  readonly assignmentId: string;
  readonly leg: number;
  readonly oldUnit: string;
  readonly oldVolume: string;
  readonly newUnit: string;
  readonly newVolume: string;
  readonly sizeBytes: number;
  readonly createdAtMs: number;
}

/**
 * A volume the station deletes when its unit is online: "replaced" (an old
 * leg, deleted only once the leg that replaced it is reported in-sync, or the
 * assignment is over) or "undone" (a replacement leg that never went into the
 * assignment).
 */
export interface LegDeletionRecord {
  readonly unit: string;
  readonly volume: string;
  readonly assignmentId: string;
  readonly leg: number;
  readonly reason: "replaced" | "undone";
  readonly createdAtMs: number;
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
  /** The engine generation of the last leg report accepted (null or absent: none yet). */
  readonly legsGeneration?: number | null;
  /** NBD (absent: as before issue 10) or iSCSI: the unit's grant then names the host's IQN. */
  readonly protocol?: Protocol;
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
  /** Absent (a control-API read): keep what discovery said. */
  readonly spare?: boolean;
  readonly zone?: string | null;
  /** Absent (a discovery packet): keep what the unit's info said. */
  readonly tls?: NbdTlsMode | null;
  /** The unit's volume-table generation the report was taken at (StorageInfo.tableGeneration); not stored. */
  readonly tableGeneration?: number;
  /** Absent (a discovery packet): keep what the unit's info said. */
  readonly iscsi?: HostPort | null;
}

export const EVENT_TYPES = ["unit", "volumes", "host", "assignment", "task"] as const;
export type EventType = (typeof EVENT_TYPES)[number];

export interface StationEvent {
  readonly seq: number;
  readonly atMs: number;
  readonly type: EventType;
  readonly action: string;
  readonly subject: string;
  readonly data: unknown;
}
