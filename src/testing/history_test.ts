// The history checker (src/testing/history.ts) on hand-made histories: one
// valid run that uses every excuse the definitions allow (a retry after an
// unknown outcome, a release in flight, a pending assignment undone, a
// released volume given again, follower reads that lag another station),
// then histories that each break exactly one property, so every check is
// shown to fire, and alone.

import assert from "node:assert/strict";
import { test } from "node:test";
import { seededRandom } from "../util/random.ts";
import { type AssignmentView, type FinalAssignment, type HistoryCheck, type HistoryOp, assertHistory, checkHistory, formatViolations } from "./history.ts";

const S1 = "http://127.0.0.1:1001";
const S2 = "http://127.0.0.1:1002";
const S3 = "http://127.0.0.1:1003";

const a1: AssignmentView = { assignmentId: "a-1", unit: "u1", volume: "v1" };
const a2: AssignmentView = { assignmentId: "a-2", unit: "u2", volume: "v1" };
const a3: AssignmentView = { assignmentId: "a-3", unit: "u1", volume: "v1" }; // v1 of u1 again, after a-1's release
const mirror: AssignmentView = { assignmentId: "a-4", unit: "u1", volume: "v2", legs: [{ unit: "u1", volume: "v2" }, { unit: "u2", volume: "v2" }] };

const active = (view: AssignmentView): AssignmentView => ({ ...view, state: "active" });

function op(fields: Partial<HistoryOp> & Pick<HistoryOp, "kind" | "startMs" | "endMs">): HistoryOp {
  return { client: "c1", station: S1, outcome: "ok", ...fields };
}

/** A run that keeps every promise. */
function validRun(): { ops: HistoryOp[]; final: FinalAssignment[] } {
  const ops: HistoryOp[] = [
    // r1: the first try times out at s1 (unknown), the retry at s2 is acknowledged.
    op({ kind: "allocate", requestId: "r1", startMs: 0, endMs: 100, outcome: "unknown" }),
    op({ kind: "allocate", requestId: "r1", station: S2, startMs: 101, endMs: 120, answer: a1 }),
    // Another client's allocation of another unit's volume, and a mirror.
    op({ kind: "allocate", client: "c2", requestId: "r2", station: S3, startMs: 50, endMs: 130, answer: a2 }),
    op({ kind: "allocate", client: "c2", requestId: "r4", station: S3, startMs: 131, endMs: 140, answer: mirror }),
    // A second retry of r1 after its ack gets the same assignment.
    op({ kind: "allocate", requestId: "r1", station: S3, startMs: 121, endMs: 125, answer: a1 }),
    // A read on s1 sees a-1 and a-2 active, and a pending a-9 (later undone by reconcile).
    op({ kind: "read", startMs: 150, endMs: 160, seen: [active(a1), active(a2), { assignmentId: "a-9", unit: "u3", volume: "v9", state: "pending" }] }),
    // A follower s2 that lags: it does not list a-2 yet, which s1 had shown (reads are only monotonic per station).
    op({ kind: "read", client: "c2", station: S2, startMs: 161, endMs: 165, seen: [active(a1)] }),
    // a-1 is released (acknowledged), then u1/v1 goes to a-3.
    op({ kind: "release", assignmentId: "a-1", startMs: 170, endMs: 180 }),
    op({ kind: "allocate", requestId: "r3", startMs: 181, endMs: 190, answer: a3 }),
    // A release of a-2 with a lost answer (unknown) is in flight when s1's next read misses a-2: allowed.
    op({ kind: "release", client: "c2", assignmentId: "a-2", station: S2, startMs: 195, endMs: 400, outcome: "unknown" }),
    // A refused release (failed) changes nothing.
    op({ kind: "release", client: "c2", assignmentId: "a-3", station: S3, startMs: 196, endMs: 197, outcome: "failed" }),
    // s1 again: a-1 released (acknowledged), a-2 released (in flight), a-9 undone (was pending): all may be gone.
    op({ kind: "read", startMs: 200, endMs: 210, seen: [active(a3), active(mirror)] }),
    op({ kind: "read", startMs: 220, endMs: 230, seen: [active(a3), active(mirror)] }),
    // A failed allocation and a failed read are not acknowledged and not checked.
    op({ kind: "allocate", requestId: "r5", startMs: 240, endMs: 241, outcome: "failed" }),
    op({ kind: "read", station: S3, startMs: 240, endMs: 241, outcome: "unknown" }),
    // A manual assignment without a request id.
    op({ kind: "assign", client: "admin", station: S2, startMs: 250, endMs: 260, answer: { assignmentId: "a-5", unit: "u3", volume: "v3" } }),
  ];
  const final: FinalAssignment[] = [
    { ...a1, requestId: "r1", state: "released" },
    { ...a2, requestId: "r2", state: "released" },
    { ...a3, requestId: "r3", state: "active" },
    { ...mirror, requestId: "r4", state: "active" },
    { assignmentId: "a-9", unit: "u3", volume: "v9", state: "failed" },
    { assignmentId: "a-5", unit: "u3", volume: "v3", state: "active" },
  ];
  return { ops, final };
}

function checksFired(ops: readonly HistoryOp[], final: readonly FinalAssignment[]): HistoryCheck[] {
  const report = checkHistory(ops, final);
  return [...new Set(report.violations.map((v) => v.check))].sort();
}

test("a valid run has no violation, and the report counts ops by kind and outcome", () => {
  const { ops, final } = validRun();
  const report = assertHistory(ops, final);
  assert.equal(report.violationsTotal, 0);
  assert.deepEqual(report.counts.allocate, { ok: 5, failed: 1, unknown: 1 });
  assert.deepEqual(report.counts.release, { ok: 1, failed: 1, unknown: 1 });
  assert.deepEqual(report.counts.read, { ok: 4, failed: 0, unknown: 1 });
  assert.deepEqual(report.counts.assign, { ok: 1, failed: 0, unknown: 0 });
});

test("(a) lost-write: an acknowledged allocation missing from the final state", () => {
  const { ops, final } = validRun();
  const withoutA5 = final.filter((v) => v.assignmentId !== "a-5");
  assert.deepEqual(checksFired(ops, withoutA5), ["lost-write"]);
  const report = checkHistory(ops, withoutA5);
  assert.equal(report.violationsTotal, 1);
  assert.match(report.violations[0]?.message ?? "", /a-5 .*missing from the final state/);
  assert.deepEqual(report.violations[0]?.ops, [15]);
});

test("(a) lost-write: an acknowledged allocation that ends failed, an acknowledged release undone, an id listed twice, a request id on two live assignments", () => {
  const { ops, final } = validRun();
  const failed = final.map((v) => (v.assignmentId === "a-3" ? { ...v, state: "failed" } : v));
  assert.deepEqual(checksFired(ops, failed), ["lost-write"]);
  assert.match(formatViolations(checkHistory(ops, failed)), /a-3, which is failed in the final state/);

  const unreleased = final.map((v) => (v.assignmentId === "a-1" ? { ...v, state: "active" } : v));
  const report = checkHistory(ops, unreleased);
  assert.deepEqual(
    report.violations.map((v) => v.check),
    ["lost-write", "double-assignment"], // a-1 active again also shares u1/v1 with a-3
  );
  assert.match(report.violations[0]?.message ?? "", /released assignment a-1, which is active in the final state/);

  const twice = [...final, { ...a3, requestId: "r3", state: "active" }];
  assert.ok(checkHistory(ops, twice).violations.some((v) => v.check === "lost-write" && /lists assignment a-3 2 times/.test(v.message)));

  const duplicateRequest = [...final, { assignmentId: "a-6", unit: "u9", volume: "v9", requestId: "r3", state: "active" }];
  assert.deepEqual(checksFired(ops, duplicateRequest), ["lost-write"]);
  assert.match(formatViolations(checkHistory(ops, duplicateRequest)), /request r3 .*also has live assignment\(s\) a-6 \(active\)/);
});

test("(b) double-assignment: two acknowledged answers share a volume with no release between them", () => {
  const { ops, final } = validRun();
  // c3 gets u2/v1 while a-2 is live (a-2's release only starts at 195).
  const clash: AssignmentView = { assignmentId: "a-7", unit: "u2", volume: "v1" };
  const more = [...ops, op({ kind: "allocate", client: "c3", requestId: "r7", startMs: 140, endMs: 145, answer: clash })];
  const report = checkHistory(more, [...final, { ...clash, requestId: "r7", state: "released" }]);
  // a-7 released in the final state without an acknowledged release is also a lost write; b is what matters here.
  assert.ok(report.violations.some((v) => v.check === "double-assignment" && /u2\/v1 was given to assignment a-2 .* and to assignment a-7/.test(v.message)));
  // The same answer after a-2's release started is fine.
  const later = [...ops, op({ kind: "allocate", client: "c3", requestId: "r7", startMs: 300, endMs: 310, answer: clash })];
  assert.deepEqual(checksFired(later, [...final, { ...clash, requestId: "r7", state: "active" }]), []);
});

test("(b) double-assignment: two live assignments on one volume in the final state, or in one read (a mirror's second leg counts)", () => {
  const { ops, final } = validRun();
  const sharedLeg = [...final, { assignmentId: "a-8", unit: "u2", volume: "v2", state: "pending" }];
  assert.deepEqual(checksFired(ops, sharedLeg), ["double-assignment"]);
  assert.match(formatViolations(checkHistory(ops, sharedLeg)), /volume u2\/v2 is held by 2 live assignments in the final state: a-4, a-8/);

  const badRead = [...ops, op({ kind: "read", station: S3, startMs: 500, endMs: 510, seen: [active(a3), { assignmentId: "a-8", unit: "u1", volume: "v1" }] })];
  assert.deepEqual(checksFired(badRead, final), ["double-assignment"]);
});

test("(c) retry-mismatch: one request id acknowledged with two assignments", () => {
  const { ops, final } = validRun();
  // A follower answered r2's retry with a fresh assignment on a volume nobody else holds, which the leader then released.
  const other: AssignmentView = { assignmentId: "a-10", unit: "u4", volume: "v4" };
  const more = [
    ...ops,
    op({ kind: "allocate", client: "c2", requestId: "r2", station: S1, startMs: 600, endMs: 610, answer: other }),
    op({ kind: "release", client: "c2", assignmentId: "a-10", station: S1, startMs: 620, endMs: 630 }),
  ];
  assert.deepEqual(checksFired(more, [...final, { ...other, requestId: "r2", state: "released" }]), ["retry-mismatch"]);
  assert.match(formatViolations(checkHistory(more, final)), /request r2 was acknowledged with different assignments: a-2 by op #2 .*; a-10 by op #16/);
});

test("(d) stale-read: a later read on the same station misses an active assignment nobody released", () => {
  const { ops, final } = validRun();
  // s1 lists a-5 at 300..310, then forgets it at 320..330.
  const more = [
    ...ops,
    op({ kind: "read", startMs: 300, endMs: 310, seen: [active(a3), active(mirror), { assignmentId: "a-5", unit: "u3", volume: "v3", state: "active" }] }),
    op({ kind: "read", startMs: 320, endMs: 330, seen: [active(a3), active(mirror)] }),
  ];
  assert.deepEqual(checksFired(more, final), ["stale-read"]);
  const report = checkHistory(more, final);
  assert.equal(report.violationsTotal, 1);
  assert.match(report.violations[0]?.message ?? "", /station http:\/\/127.0.0.1:1001: op #17 .* does not list assignment a-5 .*op #16 .*on the same station saw active/);
  assert.deepEqual(report.violations[0]?.ops, [16, 17]);

  // Not a violation: the same two reads on different stations, overlapping reads, or a release in flight.
  const stations = more.map((o, i) => (i === 17 ? { ...o, station: S2 } : o));
  assert.deepEqual(checksFired(stations, final), []);
  const overlapping = more.map((o, i) => (i === 17 ? { ...o, startMs: 305 } : o));
  assert.deepEqual(checksFired(overlapping, final), []);
  const inFlight = [...more, op({ kind: "release", client: "admin", assignmentId: "a-5", station: S3, startMs: 315, endMs: 900, outcome: "unknown" })];
  assert.deepEqual(checksFired(inFlight, final), []);
  // A refused (failed) release excuses nothing.
  const refused = [...more, op({ kind: "release", client: "admin", assignmentId: "a-5", station: S3, startMs: 315, endMs: 316, outcome: "failed" })];
  assert.deepEqual(checksFired(refused, final), ["stale-read"]);
});

test("assertHistory lists the violations; maxViolations keeps the report bounded but counts them all", () => {
  const { ops } = validRun();
  assert.throws(() => assertHistory(ops, []), /history check: 3 violation\(s\) over 16 ops and 0 final assignments:\n\[lost-write\] /);
  const report = checkHistory(ops, [], { maxViolations: 1 });
  assert.equal(report.violations.length, 1);
  assert.equal(report.violationsTotal, 3);
  assert.match(formatViolations(report), /\.\.\. and 2 more$/);
});

test("malformed histories are refused with a message naming the op and the field", () => {
  const { ops, final } = validRun();
  const broken = (index: number, change: Record<string, unknown>): HistoryOp[] => ops.map((o, i) => (i === index ? ({ ...o, ...change } as HistoryOp) : o));
  assert.throws(() => checkHistory(broken(1, { answer: undefined }), final), /history op #1 \(allocate ok\) answer: not an assignment object/);
  assert.throws(() => checkHistory(broken(1, { answer: { assignmentId: "a-1", unit: "u1" } }), final), /history op #1 \(allocate ok\) answer: volume must be a non-empty string/);
  assert.throws(() => checkHistory(broken(2, { endMs: 10 }), final), /history op #2: startMs 50 and endMs 10 must be finite with startMs <= endMs/);
  assert.throws(() => checkHistory(broken(0, { kind: "delete" }), final), /history op #0: kind "delete" is not one of allocate, release, assign, read/);
  assert.throws(() => checkHistory(broken(0, { outcome: "maybe" }), final), /outcome "maybe" is not one of ok, failed, unknown/);
  assert.throws(() => checkHistory(broken(7, { assignmentId: undefined }), final), /history op #7: a release must name the assignment released/);
  assert.throws(() => checkHistory(broken(5, { seen: undefined }), final), /history op #5: an ok read needs seen/);
  assert.throws(() => checkHistory(ops, [{ ...a1, state: "" }]), /final state \[0\]: state must be a non-empty string/);
});

// ---------------------------------------------------------------- a simulated run at scale

/**
 * A linearizable run of three stations, generated from a seed: every op has a
 * commit instant inside [startMs, endMs] in one global order; followers read a
 * snapshot that lags the leader but never goes back; "unknown" ops took effect
 * or not (coin flip); "failed" ops did not. Such a run keeps every promise.
 */
function simulatedRun(seed: number, opsWanted: number): { ops: HistoryOp[]; final: FinalAssignment[] } {
  const random = seededRandom(seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T;
  const stations = [S1, S2, S3];
  const clients = ["c1", "c2", "c3", "c4", "c5", "c6"];
  const volumes: string[] = [];
  for (let u = 1; u <= 4; u++) for (let v = 1; v <= 10; v++) volumes.push(`u${u}/v${v}`);
  const all = new Map<string, { view: AssignmentView; requestId: string; state: string }>();
  const byRequest = new Map<string, string>();
  const held = new Set<string>();
  const snapshots: AssignmentView[][] = [[]]; // the live set after each commit
  const applied = new Map<string, number>(stations.map((s) => [s, 0]));
  const pendingRetries: { client: string; requestId: string }[] = [];
  const ops: HistoryOp[] = [];
  let now = 0;
  let nextId = 1;
  let nextRequest = 1;
  const commit = (): void => {
    snapshots.push([...all.values()].filter((a) => a.state === "active").map((a) => ({ ...a.view, state: "active" })));
  };
  const timing = (): { startMs: number; endMs: number } => ({ startMs: now - Math.floor(random() * 30), endMs: now + Math.floor(random() * 30) });
  while (ops.length < opsWanted) {
    now += 1 + Math.floor(random() * 5);
    const station = pick(stations);
    const roll = random();
    const outcome: HistoryOp["outcome"] = roll < 0.05 ? "unknown" : roll < 0.08 ? "failed" : "ok";
    const applies = outcome === "ok" || (outcome === "unknown" && random() < 0.5);
    const action = random();
    if (action < 0.3 || pendingRetries.length > 0) {
      // allocate (a retry of an unknown request first)
      const retry = pendingRetries.shift();
      const client = retry?.client ?? pick(clients);
      const requestId = retry?.requestId ?? `r${nextRequest++}`;
      let id = byRequest.get(requestId);
      if (id === undefined && applies) {
        const free = volumes.filter((v) => !held.has(v));
        if (free.length === 0) continue;
        const [unit, volume] = pick(free).split("/") as [string, string];
        id = `a-${nextId++}`;
        all.set(id, { view: { assignmentId: id, unit, volume }, requestId, state: "active" });
        byRequest.set(requestId, id);
        held.add(`${unit}/${volume}`);
        commit();
      }
      const answer = outcome === "ok" && id !== undefined ? all.get(id)?.view : undefined;
      ops.push({ client, station, kind: "allocate", requestId, outcome, ...timing(), ...(answer === undefined ? {} : { answer }) });
      if (outcome !== "ok") pendingRetries.push({ client, requestId });
    } else if (action < 0.5) {
      const live = [...all.values()].filter((a) => a.state === "active");
      if (live.length === 0) continue;
      const target = pick(live);
      if (applies) {
        target.state = "released";
        held.delete(`${target.view.unit}/${target.view.volume}`);
        commit();
      }
      ops.push({ client: pick(clients), station, kind: "release", assignmentId: target.view.assignmentId, outcome, ...timing() });
    } else {
      // a read: the station's view moves forward by a random amount, never back
      const latest = snapshots.length - 1;
      const at = Math.min(latest, (applied.get(station) ?? 0) + Math.floor(random() * 4));
      applied.set(station, at);
      const readOutcome = outcome === "failed" ? "unknown" : outcome;
      ops.push({ client: pick(clients), station, kind: "read", outcome: readOutcome, ...timing(), ...(readOutcome === "ok" ? { seen: snapshots[at] ?? [] } : {}) });
    }
  }
  const final: FinalAssignment[] = [...all.values()].map((a) => ({ ...a.view, requestId: a.requestId, state: a.state }));
  return { ops, final };
}

test("a simulated linearizable run of 10,000 ops passes, quickly, and losing one write or one read's entry is caught", () => {
  const seed = Number(process.env["IPSAN_HISTORY_SEED"] ?? Date.now() % 1_000_000);
  const { ops, final } = simulatedRun(seed, 10_000);
  const startMs = performance.now();
  const report = checkHistory(ops, final);
  const tookMs = performance.now() - startMs;
  process.stdout.write(`history checker: ${ops.length} ops, ${final.length} assignments checked in ${tookMs.toFixed(0)} ms (IPSAN_HISTORY_SEED=${seed})\n`);
  assert.equal(report.violationsTotal, 0, `seed ${seed}:\n${formatViolations(report)}`);
  assert.ok(report.counts.read.ok > 500 && report.counts.allocate.ok > 500 && report.counts.release.ok > 500, JSON.stringify(report.counts));
  assert.ok(tookMs < 5_000, `checking took ${tookMs} ms`);

  // One acknowledged, never-released assignment vanishes from the final state.
  const releasedSomehow = new Set(ops.filter((o) => o.kind === "release" && o.outcome !== "failed").map((o) => o.assignmentId));
  const kept = final.find((a) => a.state === "active" && !releasedSomehow.has(a.assignmentId) && ops.some((o) => o.outcome === "ok" && o.answer?.assignmentId === a.assignmentId));
  assert.ok(kept !== undefined, `seed ${seed}: no assignment to drop`);
  const lost = checkHistory(ops, final.filter((a) => a !== kept));
  assert.deepEqual([...new Set(lost.violations.map((v) => v.check))], ["lost-write"], `seed ${seed}`);

  // A read of a station forgets an assignment an earlier read there saw, and that no release had touched before it ended.
  const releaseStarts = new Map<string, number>();
  for (const o of ops) {
    if (o.kind === "release" && o.outcome !== "failed" && o.assignmentId !== undefined) releaseStarts.set(o.assignmentId, Math.min(o.startMs, releaseStarts.get(o.assignmentId) ?? Infinity));
  }
  const reads = ops.map((o, i) => ({ o, i })).filter(({ o }) => o.kind === "read" && o.outcome === "ok" && o.station === S1);
  let victim: { i: number; id: string } | undefined;
  for (let r = reads.length - 1; r > 0 && victim === undefined; r--) {
    const later = reads[r] as { o: HistoryOp; i: number };
    const earlier = reads.slice(0, r).filter(({ o }) => o.endMs < later.o.startMs).at(-1);
    const id = (earlier?.o.seen ?? [])
      .map((a) => a.assignmentId)
      .find((x) => (later.o.seen ?? []).some((a) => a.assignmentId === x) && (releaseStarts.get(x) ?? Infinity) >= later.o.endMs);
    if (id !== undefined) victim = { i: later.i, id };
  }
  assert.ok(victim !== undefined, `seed ${seed}: no assignment to forget`);
  const { i: forgetting, id: forgotten } = victim;
  const stale = ops.map((o, i) => (i === forgetting ? { ...o, seen: (o.seen ?? []).filter((a) => a.assignmentId !== forgotten) } : o));
  const staleReport = checkHistory(stale, final);
  assert.deepEqual([...new Set(staleReport.violations.map((v) => v.check))], ["stale-read"], `seed ${seed}`);
  assert.ok(staleReport.violations.every((v) => v.ops.includes(forgetting)));
});
