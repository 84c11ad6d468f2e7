// The history checker of issue 11 (several stations on etcd): a test's
// clients record every request they make to any station and what came back;
// at the end the test reads the final state from the leader; checkHistory()
// says whether the run kept the station's promises. Pure code: no I/O, no
// clock; the caller records startMs/endMs from one clock (Date.now() or
// performance.now() of the test process).
//
// Recording rules (what the checks rely on):
// - One op per request sent, retries included (a retry of the same request id
//   on the next station is another op with the same requestId).
// - outcome "ok": the station answered success (allocate 200/201, assign
//   200/201, release 204/202, read 200). "failed": a definite refusal that
//   did NOT change anything (4xx; a 503 "no leader" refused before any
//   write). "unknown": anything that may or may not have taken effect
//   (timeout, connection lost, 5xx after forwarding). When in doubt,
//   "unknown": a "failed" op that did take effect makes the checker report
//   violations that are not there.
// - allocate/assign ok: `answer` is the assignment answered (assignmentId,
//   unit, volume; `legs` for a mirror: every leg's unit/volume).
// - release: `assignmentId` (or `answer.assignmentId`) names the assignment
//   released, whatever the outcome.
// - read ok: `seen` lists the live assignments the station listed (GET
//   /api/v1/assignments), each with its state when known.
// - final: every assignment the leader lists at the end, live or over
//   (GET /api/v1/assignments?all=true), with its state and requestId.
//
// Definitions. An op is "acknowledged" when its outcome is "ok". A release
// R of assignment X "may have happened by time t" when R's outcome is "ok"
// or "unknown" and R.startMs < t. Live states: pending, active, revoking
// (options.liveStates).
//
// (a) lost-write: for every acknowledged allocate/assign answered with
//     assignment X (request id Q):
//     - if no release of X was acknowledged: the final state lists X in a
//       live state (or, when a release of X had an unknown outcome, in a
//       released state or not at all); and if Q is set, X is the only live
//       assignment of the final state carrying Q;
//     - for every acknowledged release of X (X from any op): the final state
//       lists X in a released state (released, or revoking: reconcile
//       finishes it; options.releasedStates) or not at all.
//     Also: no assignment id is listed twice in the final state.
// (b) double-assignment: no (unit, volume) is held by two assignments at once:
//     - in the final state, among live assignments (a mirror holds each leg);
//     - in any acknowledged read's `seen` (entries without a state count as live);
//     - in the history: two acknowledged allocate/assign ops answered with
//       different assignments A and B sharing a (unit, volume) are a
//       violation unless a release of A may have happened by B.endMs or a
//       release of B may have happened by A.endMs (both were committed by
//       their endMs, so at the later commit both were live otherwise).
// (c) retry-mismatch: all acknowledged allocate/assign ops with one request
//     id were answered with the same assignment id.
// (d) stale-read: reads never go back in time on one station. For two
//     acknowledged reads R1, R2 of the same station with R1.endMs <
//     R2.startMs, every assignment X that R1 saw in a settled state (active
//     or revoking, options.settledStates; an entry without state counts as
//     settled; a pending one may still be undone) is in R2's `seen`, unless a
//     release of X may have happened by R2.endMs. This is what a station
//     promises for reads (monotonic reads per station, from its own
//     watch-fed cache); it is not linearizability: a follower's read may
//     still miss a write another station acknowledged a moment before.

export type HistoryKind = "allocate" | "release" | "assign" | "read";
export type HistoryOutcome = "ok" | "failed" | "unknown";

export interface VolumeRef {
  readonly unit: string;
  readonly volume: string;
}

export interface AssignmentView {
  readonly assignmentId: string;
  readonly unit: string;
  readonly volume: string;
  /** A mirror's legs: every (unit, volume) it holds; when absent, (unit, volume). */
  readonly legs?: readonly VolumeRef[];
  readonly state?: string;
  readonly requestId?: string;
  readonly [field: string]: unknown;
}

export interface FinalAssignment extends AssignmentView {
  readonly state: string;
}

export interface HistoryOp {
  /** Which test client made the request. */
  readonly client: string;
  /** The station called (its URL). */
  readonly station: string;
  readonly kind: HistoryKind;
  readonly requestId?: string;
  /** release: the assignment released (else answer.assignmentId). */
  readonly assignmentId?: string;
  readonly startMs: number;
  readonly endMs: number;
  readonly outcome: HistoryOutcome;
  /** allocate/assign "ok": the assignment answered. */
  readonly answer?: AssignmentView;
  /** read "ok": the live assignments listed. */
  readonly seen?: readonly AssignmentView[];
}

export type HistoryCheck = "lost-write" | "double-assignment" | "retry-mismatch" | "stale-read";

export interface Violation {
  readonly check: HistoryCheck;
  readonly message: string;
  /** Indexes into the history of the ops involved. */
  readonly ops: readonly number[];
}

export interface HistoryOptions {
  /** Default pending, active, revoking. */
  liveStates?: readonly string[];
  /** States an assignment whose release was acknowledged may have at the end. Default released, revoking. */
  releasedStates?: readonly string[];
  /** States a read must not forget (check d). Default active, revoking. */
  settledStates?: readonly string[];
  /** Violations kept in the report (all are counted). Default HISTORY_VIOLATIONS_KEPT. */
  maxViolations?: number;
}

export interface HistoryReport {
  /** The first maxViolations violations, by check then history order. */
  readonly violations: readonly Violation[];
  readonly violationsTotal: number;
  /** Ops per kind and outcome. */
  readonly counts: Readonly<Record<HistoryKind, Readonly<Record<HistoryOutcome, number>>>>;
}

/** The most ops checkHistory takes (a run records far fewer; past it the caller has a bug). */
export const HISTORY_OPS_MAX = 1_000_000;
/** The most assignments of a final state. */
export const HISTORY_FINAL_MAX = 1_000_000;
/** Default maxViolations. */
export const HISTORY_VIOLATIONS_KEPT = 100;

const KINDS: readonly HistoryKind[] = ["allocate", "release", "assign", "read"];
const OUTCOMES: readonly HistoryOutcome[] = ["ok", "failed", "unknown"];

// ---------------------------------------------------------------- input

function isNonEmptyString(value: unknown): value is string {
  return typeof value === "string" && value !== "";
}

function validateView(view: unknown, where: string): void {
  if (view === null || typeof view !== "object") throw new Error(`${where}: not an assignment object`);
  const v = view as Record<string, unknown>;
  for (const field of ["assignmentId", "unit", "volume"]) {
    if (!isNonEmptyString(v[field])) throw new Error(`${where}: ${field} must be a non-empty string, got ${JSON.stringify(v[field])}`);
  }
  if (v["legs"] !== undefined) {
    if (!Array.isArray(v["legs"])) throw new Error(`${where}: legs must be an array`);
    v["legs"].forEach((leg: unknown, i) => {
      const l = (leg ?? {}) as Record<string, unknown>;
      if (!isNonEmptyString(l["unit"]) || !isNonEmptyString(l["volume"])) throw new Error(`${where}: legs[${i}] needs a unit and a volume`);
    });
  }
}

function validate(ops: readonly HistoryOp[], final: readonly FinalAssignment[]): void {
  if (!Array.isArray(ops)) throw new Error("checkHistory: the history must be an array of ops");
  if (!Array.isArray(final)) throw new Error("checkHistory: the final state must be an array of assignments");
  if (ops.length > HISTORY_OPS_MAX) throw new Error(`checkHistory: ${ops.length} ops is more than HISTORY_OPS_MAX (${HISTORY_OPS_MAX})`);
  if (final.length > HISTORY_FINAL_MAX) throw new Error(`checkHistory: ${final.length} final assignments is more than HISTORY_FINAL_MAX (${HISTORY_FINAL_MAX})`);
  ops.forEach((op, i) => {
    const where = `history op #${i}`;
    if (op === null || typeof op !== "object") throw new Error(`${where}: not an object`);
    if (!KINDS.includes(op.kind)) throw new Error(`${where}: kind ${JSON.stringify(op.kind)} is not one of ${KINDS.join(", ")}`);
    if (!OUTCOMES.includes(op.outcome)) throw new Error(`${where}: outcome ${JSON.stringify(op.outcome)} is not one of ${OUTCOMES.join(", ")}`);
    if (!isNonEmptyString(op.client) || !isNonEmptyString(op.station)) throw new Error(`${where}: client and station must be non-empty strings`);
    if (!Number.isFinite(op.startMs) || !Number.isFinite(op.endMs) || op.endMs < op.startMs) {
      throw new Error(`${where}: startMs ${op.startMs} and endMs ${op.endMs} must be finite with startMs <= endMs`);
    }
    if (op.requestId !== undefined && !isNonEmptyString(op.requestId)) throw new Error(`${where}: requestId must be a non-empty string when given`);
    if ((op.kind === "allocate" || op.kind === "assign") && op.outcome === "ok") validateView(op.answer, `${where} (${op.kind} ok) answer`);
    if (op.kind === "release" && !isNonEmptyString(op.assignmentId ?? op.answer?.assignmentId)) {
      throw new Error(`${where}: a release must name the assignment released (assignmentId)`);
    }
    if (op.kind === "read" && op.outcome === "ok") {
      if (!Array.isArray(op.seen)) throw new Error(`${where}: an ok read needs seen (the assignments it listed)`);
      op.seen.forEach((view: unknown, j: number) => validateView(view, `${where} seen[${j}]`));
    }
  });
  final.forEach((view, i) => {
    validateView(view, `final state [${i}]`);
    if (!isNonEmptyString(view.state)) throw new Error(`final state [${i}]: state must be a non-empty string`);
  });
}

// ---------------------------------------------------------------- helpers

function volumesOf(view: AssignmentView): string[] {
  const refs = view.legs !== undefined && view.legs.length > 0 ? view.legs : [view];
  return [...new Set(refs.map((ref) => `${ref.unit}/${ref.volume}`))];
}

function describeOp(ops: readonly HistoryOp[], i: number): string {
  const op = ops[i];
  if (op === undefined) return `op #${i}`;
  const request = op.requestId === undefined ? "" : ` request ${op.requestId}`;
  return `op #${i} (${op.kind}${request} by ${op.client} at ${op.station}, ${op.startMs}..${op.endMs} ms, ${op.outcome})`;
}

function pushTo<K, V>(map: Map<K, V[]>, key: K, value: V): void {
  const list = map.get(key);
  if (list === undefined) map.set(key, [value]);
  else list.push(value);
}

function releaseTarget(op: HistoryOp): string | undefined {
  return op.kind === "release" ? (op.assignmentId ?? op.answer?.assignmentId) : undefined;
}

// ---------------------------------------------------------------- the checks

/** Checks a recorded history against the final state; see the header for what each check means. Throws on malformed input. */
export function checkHistory(ops: readonly HistoryOp[], final: readonly FinalAssignment[], options: HistoryOptions = {}): HistoryReport {
  validate(ops, final);
  const live = new Set(options.liveStates ?? ["pending", "active", "revoking"]);
  const releasedOk = new Set(options.releasedStates ?? ["released", "revoking"]);
  const settled = new Set(options.settledStates ?? ["active", "revoking"]);
  const keep = options.maxViolations ?? HISTORY_VIOLATIONS_KEPT;
  const violations: Violation[] = [];
  let total = 0;
  const report = (check: HistoryCheck, message: string, involved: readonly number[]): void => {
    total++;
    if (violations.length < keep) violations.push({ check, message, ops: involved });
  };

  const counts = Object.fromEntries(KINDS.map((kind) => [kind, { ok: 0, failed: 0, unknown: 0 }])) as Record<HistoryKind, Record<HistoryOutcome, number>>;
  for (const op of ops) counts[op.kind][op.outcome]++;

  // Index: acknowledged allocations, releases by target, the final state.
  const acked: number[] = []; // indexes of ok allocate/assign
  const releasesOf = new Map<string, number[]>(); // assignment id -> release op indexes (any outcome)
  ops.forEach((op, i) => {
    if ((op.kind === "allocate" || op.kind === "assign") && op.outcome === "ok") acked.push(i);
    const target = releaseTarget(op);
    if (target !== undefined) pushTo(releasesOf, target, i);
  });
  const ackedReleaseOf = (id: string): number | undefined => (releasesOf.get(id) ?? []).find((i) => ops[i]?.outcome === "ok");
  const firstReleaseStart = new Map<string, number>(); // assignment id -> earliest start of an ok or unknown release
  for (const [id, indexes] of releasesOf) {
    for (const i of indexes) {
      const op = ops[i] as HistoryOp;
      if (op.outcome !== "failed") firstReleaseStart.set(id, Math.min(op.startMs, firstReleaseStart.get(id) ?? Number.POSITIVE_INFINITY));
    }
  }
  /** A release of `id` may have happened by `t`: one that was ok or unknown started before t. */
  const releasedBy = (id: string, t: number): boolean => (firstReleaseStart.get(id) ?? Number.POSITIVE_INFINITY) < t;
  const finalById = new Map<string, FinalAssignment[]>();
  const finalLiveByRequest = new Map<string, FinalAssignment[]>();
  for (const view of final) {
    pushTo(finalById, view.assignmentId, view);
    if (view.requestId !== undefined && live.has(view.state)) pushTo(finalLiveByRequest, view.requestId, view);
  }

  // (a) lost-write
  for (const [id, views] of finalById) {
    if (views.length > 1) report("lost-write", `the final state lists assignment ${id} ${views.length} times (states ${views.map((v) => v.state).join(", ")})`, []);
  }
  const checkedAllocation = new Set<string>();
  for (const i of acked) {
    const op = ops[i] as HistoryOp;
    const answer = op.answer as AssignmentView;
    const id = answer.assignmentId;
    if (checkedAllocation.has(`${id}\u0000${op.requestId ?? ""}`)) continue;
    checkedAllocation.add(`${id}\u0000${op.requestId ?? ""}`);
    if (ackedReleaseOf(id) !== undefined) continue; // the release's own check below
    // A release with an unknown outcome may have happened: then X may be released, or gone from a bounded history.
    const mayBeReleased = firstReleaseStart.has(id);
    const views = finalById.get(id) ?? [];
    const [view] = views;
    if (view === undefined) {
      if (!mayBeReleased) report("lost-write", `acknowledged ${describeOp(ops, i)} answered assignment ${id} (${volumesOf(answer).join(", ")}), which is missing from the final state, and no release of it was acknowledged or in flight`, [i]);
      continue;
    }
    if (!live.has(view.state) && !(mayBeReleased && releasedOk.has(view.state))) {
      report("lost-write", `acknowledged ${describeOp(ops, i)} answered assignment ${id}, which is ${view.state} in the final state, though no release of it was acknowledged`, [i]);
    }
    if (op.requestId !== undefined) {
      const sameRequest = finalLiveByRequest.get(op.requestId) ?? [];
      const others = sameRequest.filter((v) => v.assignmentId !== id);
      if (others.length > 0) {
        report("lost-write", `request ${op.requestId} was acknowledged with assignment ${id} (${describeOp(ops, i)}), but the final state also has live assignment(s) ${others.map((v) => `${v.assignmentId} (${v.state})`).join(", ")} carrying it`, [i]);
      }
    }
  }
  for (const [id, releaseOps] of releasesOf) {
    const okRelease = releaseOps.find((i) => ops[i]?.outcome === "ok");
    if (okRelease === undefined) continue;
    for (const view of finalById.get(id) ?? []) {
      if (!releasedOk.has(view.state)) {
        report("lost-write", `acknowledged ${describeOp(ops, okRelease)} released assignment ${id}, which is ${view.state} in the final state`, [okRelease]);
      }
    }
  }

  // (b) double-assignment: final state, each read, and the acknowledged answers.
  const holders = (views: readonly AssignmentView[], isLive: (v: AssignmentView) => boolean): Map<string, string[]> => {
    const byVolume = new Map<string, string[]>();
    for (const view of views) {
      if (!isLive(view)) continue;
      for (const key of volumesOf(view)) {
        const ids = byVolume.get(key) ?? [];
        if (!ids.includes(view.assignmentId)) ids.push(view.assignmentId);
        byVolume.set(key, ids);
      }
    }
    return byVolume;
  };
  for (const [key, ids] of holders(final, (v) => v.state !== undefined && live.has(v.state))) {
    if (ids.length > 1) report("double-assignment", `volume ${key} is held by ${ids.length} live assignments in the final state: ${ids.join(", ")}`, []);
  }
  ops.forEach((op, i) => {
    if (op.kind !== "read" || op.outcome !== "ok") return;
    for (const [key, ids] of holders(op.seen ?? [], (v) => v.state === undefined || live.has(v.state))) {
      if (ids.length > 1) report("double-assignment", `${describeOp(ops, i)} listed volume ${key} held by ${ids.length} live assignments at once: ${ids.join(", ")}`, [i]);
    }
  });
  const answeredByVolume = new Map<string, number[]>();
  for (const i of acked) {
    for (const key of volumesOf((ops[i] as HistoryOp).answer as AssignmentView)) pushTo(answeredByVolume, key, i);
  }
  for (const [key, indexes] of answeredByVolume) {
    for (let x = 0; x < indexes.length; x++) {
      for (let y = x + 1; y < indexes.length; y++) {
        const a = ops[indexes[x] as number] as HistoryOp;
        const b = ops[indexes[y] as number] as HistoryOp;
        const idA = (a.answer as AssignmentView).assignmentId;
        const idB = (b.answer as AssignmentView).assignmentId;
        if (idA === idB) continue;
        if (releasedBy(idA, b.endMs) || releasedBy(idB, a.endMs)) continue;
        report(
          "double-assignment",
          `volume ${key} was given to assignment ${idA} by ${describeOp(ops, indexes[x] as number)} and to assignment ${idB} by ${describeOp(ops, indexes[y] as number)}, and neither was released in between`,
          [indexes[x] as number, indexes[y] as number],
        );
      }
    }
  }

  // (c) retry-mismatch
  const answersByRequest = new Map<string, number[]>();
  for (const i of acked) {
    const requestId = (ops[i] as HistoryOp).requestId;
    if (requestId !== undefined) pushTo(answersByRequest, requestId, i);
  }
  for (const [requestId, indexes] of answersByRequest) {
    const ids = [...new Set(indexes.map((i) => ((ops[i] as HistoryOp).answer as AssignmentView).assignmentId))];
    if (ids.length > 1) {
      report("retry-mismatch", `request ${requestId} was acknowledged with different assignments: ${indexes.map((i) => `${((ops[i] as HistoryOp).answer as AssignmentView).assignmentId} by ${describeOp(ops, i)}`).join("; ")}`, indexes);
    }
  }

  // (d) stale-read, per station: each read against every assignment seen settled by a read that ended before it started.
  const readsByStation = new Map<string, number[]>();
  ops.forEach((op, i) => {
    if (op.kind === "read" && op.outcome === "ok") pushTo(readsByStation, op.station, i);
  });
  for (const reads of readsByStation.values()) {
    const byEnd = [...reads].sort((x, y) => (ops[x] as HistoryOp).endMs - (ops[y] as HistoryOp).endMs);
    const byStart = [...reads].sort((x, y) => (ops[x] as HistoryOp).startMs - (ops[y] as HistoryOp).startMs);
    const seenSettled = new Map<string, { read: number; view: AssignmentView }>(); // id -> the latest earlier read that saw it settled
    let next = 0;
    for (const r2 of byStart) {
      const read2 = ops[r2] as HistoryOp;
      while (next < byEnd.length && (ops[byEnd[next] as number] as HistoryOp).endMs < read2.startMs) {
        const r1 = byEnd[next] as number;
        for (const view of (ops[r1] as HistoryOp).seen ?? []) {
          if (view.state === undefined || settled.has(view.state)) seenSettled.set(view.assignmentId, { read: r1, view });
        }
        next++;
      }
      const ids2 = new Set((read2.seen ?? []).map((v) => v.assignmentId));
      for (const [id, { read: r1, view }] of seenSettled) {
        // Released (maybe) before this read started: excused for this and every later-starting read.
        if (releasedBy(id, read2.startMs)) {
          seenSettled.delete(id);
          continue;
        }
        if (ids2.has(id) || releasedBy(id, read2.endMs)) continue;
        report(
          "stale-read",
          `station ${read2.station}: ${describeOp(ops, r2)} does not list assignment ${id} (${volumesOf(view).join(", ")}), which the earlier ${describeOp(ops, r1)} on the same station saw ${view.state ?? "live"}; no release of it was acknowledged or in flight before the later read ended`,
          [r1, r2],
        );
      }
    }
  }

  const order: readonly HistoryCheck[] = ["lost-write", "double-assignment", "retry-mismatch", "stale-read"];
  violations.sort((x, y) => order.indexOf(x.check) - order.indexOf(y.check));
  return { violations, violationsTotal: total, counts };
}

/** The report as text: one line per kept violation, then how many more there were. */
export function formatViolations(report: HistoryReport): string {
  const lines = report.violations.map((v) => `[${v.check}] ${v.message}`);
  if (report.violationsTotal > report.violations.length) lines.push(`... and ${report.violationsTotal - report.violations.length} more`);
  return lines.join("\n");
}

/** checkHistory, throwing an Error that lists the violations unless there are none. */
export function assertHistory(ops: readonly HistoryOp[], final: readonly FinalAssignment[], options: HistoryOptions = {}): HistoryReport {
  const report = checkHistory(ops, final, options);
  if (report.violationsTotal > 0) {
    throw new Error(`history check: ${report.violationsTotal} violation(s) over ${ops.length} ops and ${final.length} final assignments:\n${formatViolations(report)}`);
  }
  return report;
}
