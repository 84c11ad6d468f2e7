// What the station core's parts share (station.ts builds it once and hands it to
// each part: pool/, hosts/, assignments/, allocation/, volumes/): the store (and
// through it the clock), the metrics, the options, the per-key locks and the carve
// ledger. Nothing here is global: two stations in one process share nothing.

import { randomBytes } from "node:crypto";
import type { UnitIdentities, UnitIdentity } from "../discovery/identities.ts";
import { CarveLedger } from "./carves.ts";
import { type HostKeySecret, hostKeySecretFrom } from "./host_keys.ts";
import { KeyedMutex } from "./keyed_mutex.ts";
import type { StationMetrics } from "./metrics.ts";
import type { StationStore } from "./store.ts";

export interface StationOptions {
  readonly clusterKey: Buffer;
  /** A pending assignment older than this that cannot be finished is undone. */
  readonly pendingDeadlineMs: number;
  readonly reconcileIntervalMs: number;
  readonly hostOfflineAfterMs: number;
  readonly unitCallTimeoutMs?: number;
  /** A host silent this long has its assignments moved to a spare host (host_failover.ts). */
  readonly hostFailoverAfterMs?: number;
  /** What hosts' NBD keys are derived from (host_keys.ts); default: a random one for this process only. */
  readonly hostKeySecret?: HostKeySecret;
  /**
   * Enrolled units (issue 7): their control API is called with the token of
   * their own secret; `rotate` starts a rotation (the discovery listener
   * delivers the next secret). Without it every unit gets the cluster-key token.
   */
  readonly unitIdentities?: { readonly identities: UnitIdentities; rotate(unit: string): UnitIdentity | undefined };
}

export interface StationContext {
  readonly store: StationStore;
  readonly metrics: StationMetrics;
  readonly options: StationOptions;
  /** Per-assignment ("assignment:ID") and per-volume ("volume:UNIT/NAME") serialization. */
  readonly locks: KeyedMutex;
  /** Carves (and grows) started on each unit and not yet in its reports: placement subtracts them. */
  readonly carves: CarveLedger;
  /** What hosts' NBD keys are derived from. */
  readonly hostKeySecret: HostKeySecret;
  /** Set once by Station.stop(): passes and background reads end. */
  stopped: boolean;
}

/** A station's context: fresh locks and carve ledger; hosts' keys from options.hostKeySecret, else a random secret for this process only. */
export function newStationContext(store: StationStore, metrics: StationMetrics, options: StationOptions): StationContext {
  return {
    store,
    metrics,
    options,
    locks: new KeyedMutex(),
    carves: new CarveLedger(),
    hostKeySecret: options.hostKeySecret ?? hostKeySecretFrom(randomBytes(32)),
    stopped: false,
  };
}
