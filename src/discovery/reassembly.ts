// Reassembly of fragmented messages (STORAGE_INFO). Fragments of one message
// share (sender, session, message id); retransmissions repeat them, so a
// partial message fills in across attempts and duplicates are ignored.
// Bounded three ways: REASSEMBLY_MESSAGES_PER_SENDER_MAX partial messages per
// sender (a newer message id evicts the oldest), REASSEMBLY_BYTES_TOTAL_MAX
// over all senders (further fragments are refused), and REASSEMBLY_TIMEOUT_MS
// per partial message (swept by expire()). The clock is the caller's.

import {
  FRAGMENTS_PER_MESSAGE_MAX,
  MESSAGE_PAYLOAD_BYTES_MAX,
  REASSEMBLY_BYTES_TOTAL_MAX,
  REASSEMBLY_MESSAGES_PER_SENDER_MAX,
  REASSEMBLY_TIMEOUT_MS,
  type Frame,
  type RejectReason,
} from "./messages.ts";

export interface ReassemblyLimits {
  readonly messagesPerSenderMax: number;
  readonly bytesTotalMax: number;
  readonly timeoutMs: number;
}

export const DEFAULT_REASSEMBLY_LIMITS: ReassemblyLimits = {
  messagesPerSenderMax: REASSEMBLY_MESSAGES_PER_SENDER_MAX,
  bytesTotalMax: REASSEMBLY_BYTES_TOTAL_MAX,
  timeoutMs: REASSEMBLY_TIMEOUT_MS,
};

export type ReassemblyResult =
  | { readonly kind: "complete"; readonly payload: Buffer }
  | { readonly kind: "partial"; readonly received: number; readonly count: number }
  | { readonly kind: "duplicate" }
  | { readonly kind: "invalid"; readonly reason: RejectReason; readonly detail: string };

interface PartialMessage {
  readonly sender: string;
  readonly sessionId: string;
  readonly messageId: number;
  readonly type: number;
  readonly fragments: (Buffer | undefined)[];
  received: number;
  bytes: number;
  readonly firstSeenMs: number;
}

export class Reassembler {
  private readonly limits: ReassemblyLimits;
  private readonly partials = new Map<string, PartialMessage>();
  private readonly bySender = new Map<string, PartialMessage[]>();
  private bytesTotal = 0;
  /** Messages dropped because they timed out (for the reassembly_timeout counter). */
  expiredCount = 0;

  constructor(limits: Partial<ReassemblyLimits> = {}) {
    this.limits = { ...DEFAULT_REASSEMBLY_LIMITS, ...limits };
  }

  get bytes(): number {
    return this.bytesTotal;
  }
  get messages(): number {
    return this.partials.size;
  }

  /** Adds an authenticated, replay-checked fragment from `sender`. */
  add(sender: string, frame: Frame, nowMs: number): ReassemblyResult {
    if (frame.fragmentCount === 1) return { kind: "complete", payload: frame.payload };
    if (frame.fragmentCount > FRAGMENTS_PER_MESSAGE_MAX) {
      return { kind: "invalid", reason: "too_many_fragments", detail: `fragment count ${frame.fragmentCount}` };
    }
    this.expire(nowMs);
    const key = `${sender}\u0000${frame.sessionId}\u0000${frame.messageId}`;
    let partial = this.partials.get(key);
    if (partial === undefined) {
      const mine = [...(this.bySender.get(sender) ?? [])];
      // A message older than one we are already assembling from the same session is stale.
      if (mine.some((p) => p.sessionId === frame.sessionId && p.messageId > frame.messageId)) {
        return { kind: "duplicate" };
      }
      while (mine.length >= this.limits.messagesPerSenderMax) {
        const oldest = mine.shift();
        if (oldest !== undefined) this.drop(oldest);
      }
      partial = {
        sender,
        sessionId: frame.sessionId,
        messageId: frame.messageId,
        type: frame.type,
        fragments: new Array<Buffer | undefined>(frame.fragmentCount).fill(undefined),
        received: 0,
        bytes: 0,
        firstSeenMs: nowMs,
      };
      this.partials.set(key, partial);
      const list = this.bySender.get(sender);
      if (list === undefined) this.bySender.set(sender, [partial]);
      else list.push(partial);
    }
    if (partial.fragments.length !== frame.fragmentCount || partial.type !== frame.type) {
      this.drop(partial);
      return {
        kind: "invalid",
        reason: "malformed",
        detail: `fragment ${frame.fragmentIndex} says ${frame.fragmentCount} fragments, message has ${partial.fragments.length}`,
      };
    }
    if (partial.fragments[frame.fragmentIndex] !== undefined) return { kind: "duplicate" };
    if (partial.bytes + frame.payload.length > MESSAGE_PAYLOAD_BYTES_MAX) {
      this.drop(partial);
      return { kind: "invalid", reason: "too_large", detail: `message over ${MESSAGE_PAYLOAD_BYTES_MAX} bytes` };
    }
    if (this.bytesTotal + frame.payload.length > this.limits.bytesTotalMax) {
      return { kind: "invalid", reason: "reassembly_full", detail: `reassembly holds ${this.bytesTotal} bytes` };
    }
    partial.fragments[frame.fragmentIndex] = frame.payload;
    partial.received += 1;
    partial.bytes += frame.payload.length;
    this.bytesTotal += frame.payload.length;
    if (partial.received < partial.fragments.length) {
      return { kind: "partial", received: partial.received, count: partial.fragments.length };
    }
    this.drop(partial);
    return { kind: "complete", payload: Buffer.concat(partial.fragments as Buffer[]) };
  }

  /** Drops partial messages older than the timeout; returns how many. */
  expire(nowMs: number): number {
    let dropped = 0;
    // The map keeps insertion order, which is firstSeenMs order: stop at the first young one.
    for (const partial of this.partials.values()) {
      if (nowMs - partial.firstSeenMs <= this.limits.timeoutMs) break;
      this.drop(partial);
      dropped += 1;
    }
    this.expiredCount += dropped;
    return dropped;
  }

  /** Forgets every partial message from `sender` (it restarted or shut down). */
  forgetSender(sender: string): void {
    for (const partial of [...(this.bySender.get(sender) ?? [])]) this.drop(partial);
  }

  private drop(partial: PartialMessage): void {
    const key = `${partial.sender}\u0000${partial.sessionId}\u0000${partial.messageId}`;
    if (!this.partials.delete(key)) return;
    this.bytesTotal -= partial.bytes;
    const list = this.bySender.get(partial.sender) ?? [];
    const rest = list.filter((p) => p !== partial);
    if (rest.length === 0) this.bySender.delete(partial.sender);
    else this.bySender.set(partial.sender, rest);
  }
}
