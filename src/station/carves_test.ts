// Proves the placement accounting (CarveLedger) against a model of one unit,
// over random interleavings (fast-check, seed printed on failure): the
// station places carves, the unit makes or refuses them in any order, takes
// storage snapshots at any moment that reach the station later (in order),
// volumes are deleted, and the station gives up on carves whose fate it does
// not know. After every step the station never believes the unit has more
// room than it has:
//
//     reported free - reserved  <=  the unit's free now - carves placed and not yet made
//
// and once everything has settled and a fresh report arrives, nothing stays
// reserved (no leak: the unit's free space is exactly what the station sees).

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { CarveLedger } from "./carves.ts";

const MIB = 1024 * 1024;
const CAPACITY = 64 * MIB;
const UNIT = "u";

type Op =
  | { kind: "place"; bytes: number }
  | { kind: "unitCreate"; pick: number }
  | { kind: "stationLearns"; pick: number }
  | { kind: "giveUp"; pick: number }
  | { kind: "delete"; pick: number }
  | { kind: "snapshot"; lagMs: number }
  | { kind: "deliver" }
  | { kind: "tick"; ms: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ kind: fc.constant("place" as const), bytes: fc.integer({ min: 1, max: 12 }).map((n) => n * MIB) }),
  fc.record({ kind: fc.constant("unitCreate" as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant("stationLearns" as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant("giveUp" as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant("delete" as const), pick: fc.nat() }),
  fc.record({ kind: fc.constant("snapshot" as const), lagMs: fc.integer({ min: 0, max: 3 }) }),
  fc.record({ kind: fc.constant("deliver" as const) }),
  fc.record({ kind: fc.constant("tick" as const), ms: fc.integer({ min: 1, max: 3 }) }),
);

interface Carve {
  readonly id: string;
  readonly bytes: number;
  /** Where the carve is: placed (not yet at the unit), made (on the unit), refused or gone. */
  stage: "placed" | "made" | "refused" | "gone";
  /** The station knows the outcome (settled or released). */
  learned: boolean;
}

function pickFrom<T>(items: readonly T[], pick: number): T | undefined {
  return items.length === 0 ? undefined : items[pick % items.length];
}

function run(ops: readonly Op[], ledger: CarveLedger = new CarveLedger()): void {
  const carves: Carve[] = [];
  const onUnit = new Map<string, number>(); // the unit's volumes: name -> bytes
  const reports: { volumes: Map<string, number>; freeBytes: number; observedAtMs: number }[] = [];
  let reportedFree = CAPACITY;
  let nowMs = 1;
  let seq = 0;
  const unitFree = (): number => CAPACITY - [...onUnit.values()].reduce((a, b) => a + b, 0);
  const check = (step: string): void => {
    const usable = reportedFree - ledger.reservedBytes(UNIT);
    const placed = carves.filter((c) => c.stage === "placed").reduce((a, c) => a + c.bytes, 0);
    assert.ok(usable <= unitFree() - placed, `${step}: station sees ${usable}, the unit has ${unitFree()} free with ${placed} still to be made`);
  };
  for (const op of ops) {
    switch (op.kind) {
      case "place": {
        const id = `c${++seq}`;
        carves.push({ id, bytes: op.bytes, stage: "placed", learned: false });
        ledger.reserve({ id, unit: UNIT, volume: id, bytes: op.bytes, sizeBytes: op.bytes });
        break;
      }
      case "unitCreate": {
        const carve = pickFrom(carves.filter((c) => c.stage === "placed"), op.pick);
        if (carve === undefined) break;
        if (unitFree() >= carve.bytes) {
          carve.stage = "made";
          onUnit.set(carve.id, carve.bytes);
        } else carve.stage = "refused";
        break;
      }
      case "stationLearns": {
        // The unit's answer comes back: made -> settle; refused -> release.
        const carve = pickFrom(carves.filter((c) => !c.learned && (c.stage === "made" || c.stage === "refused")), op.pick);
        if (carve === undefined) break;
        carve.learned = true;
        if (carve.stage === "made") ledger.settle(carve.id, nowMs);
        else ledger.release(carve.id);
        break;
      }
      case "giveUp": {
        // The station gave up on a carve whose answer never came (timeout) and the unit never made it.
        const carve = pickFrom(carves.filter((c) => !c.learned && c.stage === "placed"), op.pick);
        if (carve === undefined) break;
        carve.stage = "gone";
        carve.learned = true;
        ledger.settle(carve.id, nowMs);
        break;
      }
      case "delete": {
        // An undo or an admin delete: the unit deletes, then the station releases.
        const carve = pickFrom(carves.filter((c) => c.learned && c.stage === "made"), op.pick);
        if (carve === undefined) break;
        onUnit.delete(carve.id);
        carve.stage = "gone";
        ledger.releaseVolume(UNIT, carve.id);
        break;
      }
      case "snapshot":
        reports.push({ volumes: new Map(onUnit), freeBytes: unitFree(), observedAtMs: nowMs - op.lagMs });
        break;
      case "deliver": {
        const report = reports.shift();
        if (report === undefined) break;
        reportedFree = report.freeBytes;
        ledger.noteReport(UNIT, report.volumes, report.observedAtMs);
        break;
      }
      case "tick":
        nowMs += op.ms;
        break;
    }
    check(op.kind);
  }
  // Settle everything, then a fresh report: nothing may stay reserved.
  for (const carve of carves) {
    if (carve.stage === "placed") {
      carve.stage = unitFree() >= carve.bytes ? "made" : "refused";
      if (carve.stage === "made") onUnit.set(carve.id, carve.bytes);
    }
    if (!carve.learned) {
      carve.learned = true;
      if (carve.stage === "made") ledger.settle(carve.id, nowMs);
      else ledger.release(carve.id);
    }
    check("settle all");
  }
  for (const report of reports) {
    reportedFree = report.freeBytes;
    ledger.noteReport(UNIT, report.volumes, report.observedAtMs);
    check("deliver the rest");
  }
  nowMs += 1;
  reportedFree = unitFree();
  ledger.noteReport(UNIT, new Map(onUnit), nowMs);
  assert.equal(ledger.reservedBytes(UNIT), 0, `leaked: ${JSON.stringify(ledger.entries())}`);
  assert.equal(ledger.size, 0);
}

test("the station never counts more free space than a unit has, and nothing stays reserved", () => {
  fc.assert(
    fc.property(fc.array(opArb, { maxLength: 80 }), (ops) => run(ops)),
    { numRuns: 3000 },
  );
});

/** A ledger with the classic bug: a report that does not list a carve releases it, even one still in flight. */
class ForgetfulLedger extends CarveLedger {
  override noteReport(unit: string, volumes: ReadonlyMap<string, number>, observedAtMs: number): string[] {
    for (const entry of this.entries(unit)) if (!volumes.has(entry.volume)) this.settle(entry.id, observedAtMs - 1);
    return super.noteReport(unit, volumes, observedAtMs);
  }
}

test("canary: the property catches a ledger that forgets carves still in flight", () => {
  const found = fc.check(
    fc.property(fc.array(opArb, { maxLength: 80 }), (ops) => run(ops, new ForgetfulLedger())),
    { numRuns: 3000 },
  );
  assert.equal(found.failed, true, "the model must find the over-count");
});

test("worked example: same-millisecond answers, reports that list a carve, give-ups", () => {
  // Two carves placed on a unit whose last report shows 16M free: counted, 16M - 2 x 8M = 0 usable.
  const ledger = new CarveLedger();
  ledger.reserve({ id: "a", unit: UNIT, volume: "a", bytes: 8 * MIB, sizeBytes: 8 * MIB });
  ledger.reserve({ id: "b", unit: UNIT, volume: "b", bytes: 8 * MIB, sizeBytes: 8 * MIB });
  assert.equal(ledger.reservedBytes(UNIT), 16 * MIB);
  // The unit made "a"; a report without it (taken before) leaves both counted.
  ledger.settle("a", 10);
  ledger.noteReport(UNIT, new Map(), 10);
  assert.equal(ledger.reservedBytes(UNIT), 16 * MIB, "an answer in the same millisecond as the snapshot is not taken as absent");
  ledger.noteReport(UNIT, new Map([["a", 8 * MIB]]), 11);
  assert.equal(ledger.reservedBytes(UNIT), 8 * MIB, "a report listing it takes it into its own free space");
  // "b" never came and the station gave up: a report taken after that releases it.
  ledger.settle("b", 12);
  ledger.noteReport(UNIT, new Map([["a", 8 * MIB]]), 12);
  assert.equal(ledger.reservedBytes(UNIT), 8 * MIB, "not by a report from the same millisecond");
  ledger.noteReport(UNIT, new Map([["a", 8 * MIB]]), 13);
  assert.equal(ledger.reservedBytes(UNIT), 0);
});

test("a grow counts its extra bytes until a report shows the new size", () => {
  const ledger = new CarveLedger();
  ledger.reserve({ id: "g", unit: UNIT, volume: "v", bytes: 4 * MIB, sizeBytes: 12 * MIB });
  ledger.noteReport(UNIT, new Map([["v", 8 * MIB]]), 5);
  assert.equal(ledger.reservedBytes(UNIT), 4 * MIB, "the old size is not the grown one");
  ledger.noteReport(UNIT, new Map([["v", 12 * MIB]]), 6);
  assert.equal(ledger.reservedBytes(UNIT), 0);
  ledger.reserve({ id: "h", unit: UNIT, volume: "v", bytes: 4 * MIB, sizeBytes: 16 * MIB });
  ledger.reserve({ id: "i", unit: "other", volume: "v", bytes: 2 * MIB, sizeBytes: 2 * MIB });
  ledger.releaseVolume(UNIT, "v");
  assert.equal(ledger.reservedBytes(UNIT), 0, "a deleted volume's entries go");
  assert.equal(ledger.reservedBytes("other"), 2 * MIB, "only on its unit");
});
