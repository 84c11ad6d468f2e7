// The API's objects as the console reads them (docs/api.md "Objects"; tasks
// and statistics as the issue 8 contract fixes them). Only the fields shown.

export const UNIT_STATE_WORDS = ["online", "suspect", "offline", "down", "unknown"] as const;
export type UnitState = (typeof UNIT_STATE_WORDS)[number];

export interface Extent {
  readonly startLba: number;
  readonly lengthLba: number;
  readonly endLba: number;
}
export interface Partition extends Extent {
  readonly index: number;
  readonly name: string;
  readonly sizeBytes: number;
}
export interface Unit {
  readonly name: string;
  readonly state: UnitState;
  readonly addresses: readonly string[];
  readonly nbd: { readonly host: string; readonly port: number } | null;
  readonly control: { readonly host: string; readonly port: number } | null;
  readonly capacityBytes: number;
  readonly freeBytes: number;
  readonly volumeCount: number;
  readonly lastSeenAt: string | null;
  readonly spare?: boolean;
  readonly zone?: string | null;
  readonly tls?: string | null;
}
export interface Volume {
  readonly id: string;
  readonly unit: string;
  readonly name: string;
  readonly number: number;
  readonly sizeBytes: number;
  readonly extents: readonly Extent[];
  readonly partitions: readonly Partition[];
  readonly grants: readonly string[];
  readonly assignedTo: string | null;
}
export interface UnitWithVolumes extends Unit {
  readonly volumes: readonly Volume[];
}
export interface Host {
  readonly name: string;
  readonly address: string;
  readonly state: string;
  readonly spare?: boolean;
  /** The host's iSCSI initiator name (null or absent: none). */
  readonly iqn?: string | null;
  readonly lastSeenAt: string | null;
  readonly createdAt?: string;
}
export interface Leg {
  readonly index: number;
  readonly unit: string;
  readonly volume: string;
  readonly state: string;
  readonly rebuild: { readonly copiedBytes: number; readonly totalBytes: number } | null;
}
export interface Assignment {
  readonly id: string;
  readonly host: string;
  readonly unit: string;
  readonly volume: string;
  readonly partition: number | null;
  readonly export: string;
  readonly sizeBytes: number;
  readonly uri: string | null;
  readonly copies: number;
  readonly legs: readonly Leg[];
  readonly state: string;
  readonly error: string | null;
  readonly createdAt: string;
}
export interface Page<T> {
  readonly items: readonly T[];
  readonly total: number;
  readonly offset: number;
  readonly nextOffset: number | null;
}
export const TASK_STATES = ["queued", "running", "succeeded", "failed", "cancelled"] as const;
export interface Task {
  readonly id: string;
  readonly kind: string;
  readonly state: (typeof TASK_STATES)[number];
  readonly target: { readonly type: string; readonly id: string } | null;
  readonly objects?: readonly string[];
  readonly progress: { readonly done: number; readonly total: number; readonly unit: string } | null;
  readonly startedBy: string;
  readonly role?: string;
  readonly createdAt: string;
  readonly startedAt: string | null;
  readonly finishedAt: string | null;
  readonly cancellable: boolean;
  readonly error: { readonly code: string; readonly message: string } | null;
  readonly message: string | null;
}
export interface StationEvent {
  readonly seq: number;
  readonly at: string;
  readonly type: string;
  readonly action: string;
  readonly subject: string;
  readonly data: Record<string, unknown>;
}
export interface Who {
  readonly name: string;
  readonly role: string;
  readonly host: string | null;
}
export interface StatsPoint {
  readonly t: number | string;
  readonly readOps: number;
  readonly writeOps: number;
  readonly readBytes: number;
  readonly writeBytes: number;
  readonly readLatencyMs: number;
  readonly writeLatencyMs: number;
}
export interface PoolPoint {
  readonly t: number | string;
  readonly capacityBytes: number;
  readonly usedBytes: number;
  readonly freeBytes: number;
}
