// Host failover (issue 6 section 4, docs/adr/0010): when a host misses its
// heartbeats longer than `--host-failover-after`, the station moves the host's
// active assignments to a spare host (`ipsan host agent --spare`), whose agent
// attaches them. Fencing comes first, in two phases, so that at no moment can
// two hosts write the same volume:
//
// 0. The move is recorded (one transaction): host = the spare, movedFrom = the
//    old host, movedAt = null. While movedAt is null the assignment grants its
//    volumes to NOBODY (Station.desiredGrants skips it), so neither reconcile
//    nor anything else can grant the old host again or the spare too early.
// 1. Fence: on every unit holding a volume of the assignment (every leg of a
//    mirror) the grants are replaced by the desired ones (without the old
//    host); the unit revokes the old host's open devices and closes their
//    connections at once, and answers only after their storage calls in
//    flight have settled (src/unit/volumes.ts). Each unit's answer is checked.
//    A unit that is away or does not answer blocks the move
//    (failover-waiting, retried on the next check): the old host may still
//    hold a connection there.
// 2. Only when every unit confirmed: movedAt is recorded (failover-fenced,
//    then failover-moved) and the spare is granted on every unit (a unit
//    that misses that call is fixed by reconcile, which now wants the spare).
//
// The decisions (which host failed, which spare takes over) are pure
// functions of the records and an injected clock; HostFailover runs them on a
// timer and carries the moves out. A station restart resumes a move half
// done (the records say where it was); heartbeats are kept in memory only, so
// a host's silence is counted from the station's start at the earliest.

import { parseIdentityGrant } from "../discovery/messages.ts";
import { formatDuration, parseDuration } from "../util/duration.ts";
import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import type { Station } from "./station.ts";
import { volumesOf, type Clock } from "./store.ts";
import type { AssignmentRecord, HostRecord } from "./types.ts";

const log = logger("host-failover");

/** `ipsan station --host-failover-after` default. */
export const HOST_FAILOVER_AFTER_MS_DEFAULT = 60_000;
/** The flag's lines in `ipsan station --help`. */
export const HOST_FAILOVER_AFTER_USAGE = `  --host-failover-after DURATION
                         a host silent this long has its assignments moved to a spare host, fenced
                         first (default ${formatDuration(HOST_FAILOVER_AFTER_MS_DEFAULT)}; e.g. 30s, 5m)`;

/** `--host-failover-after DURATION` (absent: the default; a bare number is refused). */
export function hostFailoverAfterFlag(value: string | undefined): number {
  return value === undefined ? HOST_FAILOVER_AFTER_MS_DEFAULT : parseDuration(value, "--host-failover-after");
}
/** A failover-waiting event for the same assignment and reason is repeated at most this often. */
export const FAILOVER_WAITING_REPEAT_MS = 30_000;

/** How often the failover check runs for a given --host-failover-after. */
export function failoverCheckIntervalMs(failoverAfterMs: number): number {
  return Math.max(100, Math.min(1_000, Math.floor(failoverAfterMs / 4)));
}

/** The old host is being fenced: the move is recorded, not finished (nobody is granted). */
export function isFencing(assignment: Pick<AssignmentRecord, "movedFrom" | "movedAtMs">): boolean {
  return (assignment.movedFrom ?? null) !== null && (assignment.movedAtMs ?? null) === null;
}

/**
 * Hosts silent for longer than `failoverAfterMs` (counted from `sinceMs` at
 * the earliest: the station's start) that hold an active assignment not
 * already being moved.
 */
export function failedHosts(
  hosts: Iterable<HostRecord>,
  live: Iterable<AssignmentRecord>,
  nowMs: number,
  sinceMs: number,
  failoverAfterMs: number,
): HostRecord[] {
  const holding = new Set<string>();
  for (const a of live) if (a.state === "active" && !isFencing(a)) holding.add(a.host);
  const out: HostRecord[] = [];
  for (const host of hosts) {
    if (!holding.has(host.name)) continue;
    if (nowMs - Math.max(host.lastSeenAtMs, sinceMs) > failoverAfterMs) out.push(host);
  }
  return out.sort((a, b) => (a.name < b.name ? -1 : 1));
}

/**
 * The spare that takes over `failed`'s assignments: a spare host heard from
 * within `onlineWithinMs`, not the failed host and not on its address (a
 * grant names an address: a spare on the same one could not be told apart
 * from the host it replaces), with an iSCSI initiator name when `needsIqn`
 * (the failed host holds iSCSI assignments: their grants name the new
 * host's IQN, and without one any initiator holding its CHAP secret would
 * be admitted), with the fewest live assignments; or why none.
 */
export function chooseSpare(
  failed: HostRecord,
  hosts: Iterable<HostRecord>,
  live: Iterable<AssignmentRecord>,
  nowMs: number,
  onlineWithinMs: number,
  needsIqn = false,
): { spare: HostRecord } | { reason: string } {
  const load = new Map<string, number>();
  for (const a of live) load.set(a.host, (load.get(a.host) ?? 0) + 1);
  const candidates: HostRecord[] = [];
  let sameAddress = 0;
  let noIqn = 0;
  for (const host of hosts) {
    if (host.spare !== true || host.name === failed.name) continue;
    if (nowMs - host.lastSeenAtMs > onlineWithinMs) continue;
    if (host.address === failed.address) {
      sameAddress += 1;
      continue;
    }
    if (needsIqn && (host.iqn ?? null) === null) {
      noIqn += 1;
      continue;
    }
    candidates.push(host);
  }
  candidates.sort((a, b) => (load.get(a.name) ?? 0) - (load.get(b.name) ?? 0) || (a.name < b.name ? -1 : 1));
  const spare = candidates[0];
  if (spare !== undefined) return { spare };
  if (noIqn > 0) {
    return {
      reason:
        `no spare host online with an iSCSI initiator name (IQN) for ${failed.name}'s iSCSI assignments ` +
        `(${noIqn} spare${noIqn === 1 ? "" : "s"} without one): give a spare its IQN (ipsan host agent ... --spare --iqn IQN)`,
    };
  }
  return {
    reason:
      sameAddress > 0
        ? `no spare host online on another address than ${failed.address} (a grant names an address: a spare on the same one cannot be fenced apart)`
        : "no spare host online (start one with: ipsan host agent ... --spare)",
  };
}

export interface HostFailoverOptions {
  readonly failoverAfterMs: number;
  /** A spare counts as online when heard from within this long. */
  readonly spareOnlineWithinMs: number;
  readonly clock: Clock;
}

export class HostFailover {
  readonly #station: Station;
  readonly #options: HostFailoverOptions;
  readonly #sinceMs: number;
  #run: Promise<void> | null = null;
  /** Last failover-waiting reason per assignment (or host, for "no spare"), and when it was recorded. */
  readonly #waiting = new Map<string, { reason: string; atMs: number }>();

  constructor(station: Station, options: HostFailoverOptions) {
    this.#station = station;
    this.#options = options;
    this.#sinceMs = options.clock.nowMs();
  }

  /** One check (concurrent callers share it): start moves for failed hosts, carry on every move not finished. */
  check(): Promise<void> {
    this.#run ??= this.#checkOnce()
      .catch((error: unknown) => log.error("host failover check failed", { error: errorMessage(error) }))
      .finally(() => {
        this.#run = null;
      });
    return this.#run;
  }

  async #checkOnce(): Promise<void> {
    const store = this.#station.store;
    const nowMs = this.#options.clock.nowMs();
    for (const failed of failedHosts(store.hosts.values(), store.live.values(), nowMs, this.#sinceMs, this.#options.failoverAfterMs)) {
      const moving = store.listAssignments({ host: failed.name }).filter((a) => a.state === "active" && !isFencing(a));
      if (moving.length === 0) continue;
      const needsIqn = moving.some((a) => a.protocol === "iscsi");
      const choice = chooseSpare(failed, store.hosts.values(), store.live.values(), nowMs, this.#options.spareOnlineWithinMs, needsIqn);
      if ("reason" in choice) {
        this.#noteWaiting(`host:${failed.name}`, failed.name, { host: failed.name, assignments: moving.map((a) => a.id), reason: choice.reason });
        continue;
      }
      const spare = choice.spare;
      const silentMs = nowMs - failed.lastSeenAtMs;
      log.warn("host missed its heartbeats: moving its assignments to a spare host, old host fenced first", {
        host: failed.name,
        spare: spare.name,
        silentMs,
        assignments: moving.length,
      });
      store.recordHostEvent(failed.name, "failover-started", {
        host: failed.name,
        address: failed.address,
        spare: spare.name,
        spareAddress: spare.address,
        silentMs,
        assignments: moving.map((a) => a.id),
      });
      this.#waiting.delete(`host:${failed.name}`);
      // Phase 0: recorded before any unit is told; from here on nobody is granted these volumes.
      store.moveAssignments(
        moving.map((a) => ({ id: a.id, host: spare.name, hostAddress: spare.address, movedFrom: failed.name, movedAtMs: null })),
        [],
      );
    }
    for (const assignment of [...store.live.values()]) {
      if (assignment.state === "active" && isFencing(assignment)) await this.#fenceAndMove(assignment.id);
    }
  }

  /** Phases 1 and 2 of one assignment's move (under its lock, so unassign and leg work wait). */
  #fenceAndMove(id: string): Promise<void> {
    const station = this.#station;
    const store = station.store;
    return station.lockAssignment(id, async () => {
      const current = store.getAssignment(id);
      if (current === undefined || current.state !== "active" || !isFencing(current)) return;
      const from = current.movedFrom ?? "";
      const oldAddress = store.hosts.get(from)?.address ?? null;
      // Phase 1: every unit, even after one failed (the reachable ones are fenced now, not later).
      const blocked: { unit: string; volume: string; reason: string }[] = [];
      for (const [unit, volume] of volumesOf(current)) {
        const reason = await this.#fence(unit, volume, from, oldAddress);
        if (reason !== null) blocked.push({ unit, volume, reason });
      }
      if (blocked.length > 0) {
        this.#noteWaiting(id, from, {
          host: from,
          assignment: id,
          spare: current.host,
          units: blocked.map((b) => b.unit),
          reason: blocked.map((b) => `${b.unit}/${b.volume}: ${b.reason}`).join("; "),
        });
        return;
      }
      this.#waiting.delete(id);
      const units = volumesOf(current).map(([unit]) => unit);
      log.info("old host fenced on every unit", { id, host: from, units: units.join(",") });
      // Phase 2: the move is finished in the records (with the fence's event); from now on the spare is the one granted.
      const nowMs = this.#options.clock.nowMs();
      const [moved] = store.moveAssignments(
        [{ id, host: current.host, hostAddress: current.hostAddress, movedFrom: from, movedAtMs: nowMs }],
        [
          { action: "failover-fenced", data: { id, host: from, address: oldAddress, spare: current.host, units } },
          { action: "failover-moved", data: { id, host: current.host, hostAddress: current.hostAddress, movedFrom: from, unit: current.unit, volume: current.volume } },
        ],
      );
      for (const [unit, volume] of volumesOf(current)) {
        await station.syncGrants(unit, volume, true).catch((error: unknown) =>
          log.limited(`failover-grant:${unit}`, "cannot grant the spare host yet; reconcile retries", { id, unit, volume, error: errorMessage(error) }),
        );
      }
      log.info("assignment moved to the spare host", { id, from, to: moved?.host, address: moved?.hostAddress });
    });
  }

  /** Replaces one volume's grants with the desired ones (the old host's gone) and checks the unit's answer; null when confirmed. */
  async #fence(unit: string, volume: string, oldHost: string, oldAddress: string | null): Promise<string | null> {
    const station = this.#station;
    const record = station.store.units.get(unit);
    if (record === undefined) return "the unit is not in the pool";
    if (record.state === "offline" || record.state === "down") return `the unit is ${record.state}`;
    try {
      await station.syncGrants(unit, volume, true);
    } catch (error) {
      return `the unit did not confirm: ${errorMessage(error)}`;
    }
    const grants = station.store.volume(unit, volume)?.grants ?? null;
    if (grants === null) return "the unit's answer lists no grants";
    const desired = station.desiredGrants(unit, volume);
    if (grants.length !== desired.length || !grants.every((g) => desired.includes(g))) {
      return `the unit answered grants ${JSON.stringify(grants)}, not ${JSON.stringify(desired)}`;
    }
    if (oldAddress !== null && grants.some((g) => g === oldAddress || g === `${oldAddress}/32` || g === `${oldAddress}/128`)) {
      return `another live assignment of this volume grants ${oldAddress}`;
    }
    if (grants.some((g) => parseIdentityGrant(g)?.host === oldHost)) return `another live assignment of this volume grants host ${oldHost}`;
    return null;
  }

  /** failover-waiting, once per reason change (or every FAILOVER_WAITING_REPEAT_MS while it stays). */
  #noteWaiting(key: string, host: string, data: { reason: string } & Record<string, unknown>): void {
    const nowMs = this.#options.clock.nowMs();
    const last = this.#waiting.get(key);
    if (last !== undefined && last.reason === data.reason && nowMs - last.atMs < FAILOVER_WAITING_REPEAT_MS) return;
    this.#waiting.set(key, { reason: data.reason, atMs: nowMs });
    log.warn("host failover waiting", { key, ...data });
    this.#station.store.recordHostEvent(host, "failover-waiting", data);
  }
}
