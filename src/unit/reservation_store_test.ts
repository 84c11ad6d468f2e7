// The saved persistent reservations file (reservation_store.ts) is input the
// unit did not necessarily write (a disk moved, an editor, a crash of some
// other tool): fuzzed, load() either gives back a state the logical unit can
// restore or refuses with the "cannot be read" error that keeps the logical
// unit from being served. It never throws anything else, never returns a
// state that does not hold together, and never changes the file. A state it
// saved reads back equal.

import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { test } from "node:test";
import fc from "fast-check";
import { Reservations, type SavedReservations } from "../scsi/reservations.ts";
import { IDENTITY } from "../scsi/testing.ts";
import { makeTempDir, memoryTmpBase } from "../testing/tmp.ts";
import { FileReservationStore } from "./reservation_store.ts";

const hexDigits = (length: number) => fc.stringMatching(new RegExp(`^[0-9a-f]{${length}}$`));

const savedArbitrary: fc.Arbitrary<SavedReservations> = fc
  .uniqueArray(
    fc.record({
      key: hexDigits(16),
      nexus: fc.record({
        initiatorName: fc.stringMatching(/^iqn\.2026-12\.org\.example:[a-z0-9]{1,20}$/),
        isid: hexDigits(12),
        targetPortalGroupTag: fc.constant(1),
        relativeTargetPort: fc.constant(1),
      }),
      allTargetPorts: fc.boolean(),
    }),
    { maxLength: 8, selector: (r) => `${r.nexus.initiatorName}|${r.nexus.isid}` },
  )
  .chain((registrations) =>
    fc.record({
      generation: fc.integer({ min: 0, max: 0xffffffff }),
      registrations: fc.constant(registrations),
      reservation:
        registrations.length === 0
          ? fc.constant(undefined)
          : fc.option(fc.record({ holder: fc.integer({ min: 0, max: registrations.length - 1 }), type: fc.constantFrom(1, 3, 5, 6, 7, 8) }), { nil: undefined }),
    }),
  );

test("a saved state reads back equal and restores", async () => {
  const dir = makeTempDir("pr-store", memoryTmpBase());
  try {
    const store = new FileReservationStore(dir.path);
    await fc.assert(
      fc.asyncProperty(savedArbitrary, async (state) => {
        await store.save(IDENTITY, state);
        const loaded = store.load(IDENTITY);
        // fast-check's records have no prototype: compared as the JSON they are saved as.
        assert.equal(JSON.stringify(loaded), JSON.stringify(state));
        Reservations.restore(loaded!);
      }),
      { numRuns: 200 },
    );
    await store.save(IDENTITY, undefined);
    assert.equal(store.load(IDENTITY), undefined);
  } finally {
    dir.remove();
  }
});

test("fuzz: any file content loads as a state that restores, or is refused with 'cannot be read', and is left as it was", () => {
  const dir = makeTempDir("pr-store-fuzz", memoryTmpBase());
  try {
    const store = new FileReservationStore(dir.path);
    const path = store.pathOf(IDENTITY);
    mkdirSync(store.dir, { recursive: true });
    // Valid files mutated, JSON of any shape, and plain text.
    const mutated = savedArbitrary.chain((state) => {
      const text = JSON.stringify({ format: "ipsan-reservations-v1", naa: IDENTITY.naa, exportName: IDENTITY.exportName, ...state });
      return fc.tuple(fc.nat({ max: Math.max(0, text.length - 1) }), fc.string({ maxLength: 8 }), fc.nat({ max: 8 })).map(([at, insert, drop]) => text.slice(0, at) + insert + text.slice(at + drop));
    });
    const shaped = fc.jsonValue().map((value) => JSON.stringify(value));
    const shapedSaved = fc
      .record({ format: fc.constant("ipsan-reservations-v1"), naa: fc.constant(IDENTITY.naa), generation: fc.jsonValue(), registrations: fc.jsonValue(), reservation: fc.jsonValue() }, { requiredKeys: [] })
      .map((value) => JSON.stringify(value));
    fc.assert(
      fc.property(fc.oneof(mutated, shaped, shapedSaved, fc.string()), (text) => {
        writeFileSync(path, text);
        try {
          const loaded = store.load(IDENTITY);
          assert.ok(loaded !== undefined, "an existing file never loads as nothing");
          Reservations.restore(loaded);
        } catch (error) {
          assert.ok(error instanceof Error && /cannot be read .*not served rather than served without them/.test(error.message), `unexpected failure: ${String(error)}`);
        }
        assert.equal(readFileSync(path, "utf8"), text);
      }),
      { numRuns: 2000 },
    );
  } finally {
    dir.remove();
  }
});
