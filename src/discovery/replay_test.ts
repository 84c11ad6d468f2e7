// What this proves: the replay guard accepts a (session, sequence) nonce
// exactly once. A model-based property test compares the sliding bitmap window
// with a plain set over random sequences (in order, reordered, duplicated,
// far jumps): the guard accepts exactly what the model says is new and inside
// REPLAY_WINDOW. A new session is adopted only with a later timestamp (so an
// older session's datagrams replayed later are refused), and timestamps
// outside the skew bound are refused as clock_skew.

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ReplayGuard } from "./replay.ts";
import { REPLAY_WINDOW } from "./messages.ts";

const NOW = 1_700_000_000_000;

test("window: accepts exactly the new sequence numbers within the window (model-based)", () => {
  fc.assert(
    fc.property(fc.array(fc.integer({ min: 1, max: 5 * REPLAY_WINDOW }), { minLength: 1, maxLength: 400 }), (sequences) => {
      const guard = new ReplayGuard();
      const seen = new Set<number>();
      let highest = 0;
      for (const sequence of sequences) {
        const expected = !seen.has(sequence) && (sequence > highest || highest - sequence < REPLAY_WINDOW);
        const verdict = guard.check("u", { sessionId: "00000000000000aa", sequence, timestampMs: NOW }, NOW);
        assert.equal(verdict.kind === "accept", expected, `sequence ${sequence} highest ${highest}`);
        if (expected) {
          seen.add(sequence);
          highest = Math.max(highest, sequence);
        }
      }
    }),
    { numRuns: 300 },
  );
});

test("a duplicate is a replay; an old sequence outside the window is a replay", () => {
  const guard = new ReplayGuard();
  const frame = (sequence: number) => ({ sessionId: "0000000000000001", sequence, timestampMs: NOW });
  assert.deepEqual(guard.check("u", frame(5), NOW), { kind: "accept", newSession: true });
  assert.equal(guard.check("u", frame(5), NOW).kind, "reject");
  assert.equal(guard.check("u", frame(3), NOW).kind, "accept", "reordered but inside the window");
  assert.equal(guard.check("u", frame(5 + REPLAY_WINDOW), NOW).kind, "accept");
  assert.equal(guard.check("u", frame(4), NOW).kind, "reject", "fell out of the window");
  assert.equal(guard.check("other", frame(5), NOW).kind, "accept", "peers are separate");
});

test("sessions: a newer incarnation is adopted, the older one's datagrams are then replays", () => {
  const guard = new ReplayGuard();
  assert.equal(guard.check("u", { sessionId: "000000000000000a", sequence: 1, timestampMs: NOW }, NOW).kind, "accept");
  assert.equal(guard.check("u", { sessionId: "000000000000000a", sequence: 2, timestampMs: NOW + 100 }, NOW + 100).kind, "accept");
  // Restart: new session, later timestamp.
  const restarted = guard.check("u", { sessionId: "000000000000000b", sequence: 1, timestampMs: NOW + 200 }, NOW + 200);
  assert.deepEqual(restarted, { kind: "accept", newSession: true });
  // A datagram of the old session (captured, or late) is refused even with an unseen sequence.
  const old = guard.check("u", { sessionId: "000000000000000a", sequence: 3, timestampMs: NOW + 150 }, NOW + 250);
  assert.equal(old.kind === "reject" && old.reason, "replay");
});

test("timestamps outside the skew bound are refused", () => {
  const guard = new ReplayGuard({ skewMsMax: 1000 });
  const late = guard.check("u", { sessionId: "0000000000000001", sequence: 1, timestampMs: NOW - 1001 }, NOW);
  assert.equal(late.kind === "reject" && late.reason, "clock_skew");
  const early = guard.check("u", { sessionId: "0000000000000001", sequence: 1, timestampMs: NOW + 1001 }, NOW);
  assert.equal(early.kind === "reject" && early.reason, "clock_skew");
  assert.equal(guard.check("u", { sessionId: "0000000000000001", sequence: 1, timestampMs: NOW + 999 }, NOW).kind, "accept");
  assert.equal(guard.size, 1, "rejected datagrams create no state");
});
