// Replay protection for authenticated datagrams. A datagram's nonce is
// (session id, sequence): the sender picks a random session id at start and
// numbers every datagram it sends (retransmissions included) 1, 2, 3, ...
// The receiver keeps, per peer, the current session and a sliding window of
// REPLAY_WINDOW sequence numbers (as in IPsec/WireGuard): a sequence seen
// before, or older than the window, is a replay. A datagram from another
// session is a new incarnation of the peer only if its timestamp is later
// than every timestamp seen from that peer; otherwise it is a replay of an
// older session. Every timestamp must also be within TIMESTAMP_SKEW_MS_MAX
// of the receiver's clock, so a stored datagram is useless after that time
// even to a receiver that has just restarted and remembers nothing.

import { REPLAY_WINDOW, TIMESTAMP_SKEW_MS_MAX, type Frame } from "./messages.ts";

export type ReplayVerdict =
  | { readonly kind: "accept"; readonly newSession: boolean }
  | { readonly kind: "reject"; readonly reason: "replay" | "clock_skew"; readonly detail: string };

class SessionWindow {
  readonly sessionId: string;
  highest = 0;
  private readonly bits = new Uint8Array(REPLAY_WINDOW / 8);

  constructor(sessionId: string) {
    this.sessionId = sessionId;
  }

  /** True if `sequence` is new (and records it). */
  accept(sequence: number): boolean {
    if (sequence > this.highest) {
      const advance = sequence - this.highest;
      if (advance >= REPLAY_WINDOW) this.bits.fill(0);
      else for (let s = this.highest + 1; s <= sequence; s++) this.clear(s);
      this.highest = sequence;
      this.set(sequence);
      return true;
    }
    if (this.highest - sequence >= REPLAY_WINDOW) return false;
    if (this.isSet(sequence)) return false;
    this.set(sequence);
    return true;
  }

  private isSet(sequence: number): boolean {
    const bit = sequence % REPLAY_WINDOW;
    return ((this.bits[bit >> 3] ?? 0) & (1 << (bit & 7))) !== 0;
  }
  private set(sequence: number): void {
    const bit = sequence % REPLAY_WINDOW;
    this.bits[bit >> 3] = (this.bits[bit >> 3] ?? 0) | (1 << (bit & 7));
  }
  private clear(sequence: number): void {
    const bit = sequence % REPLAY_WINDOW;
    this.bits[bit >> 3] = (this.bits[bit >> 3] ?? 0) & ~(1 << (bit & 7));
  }
}

interface PeerState {
  window: SessionWindow;
  timestampMsMax: number;
}

/** Replay state for a set of peers, keyed by a caller-chosen peer id. Bounded by the caller (UNITS_MAX). */
export class ReplayGuard {
  private readonly peers = new Map<string, PeerState>();
  private readonly skewMsMax: number;

  constructor(options: { skewMsMax?: number } = {}) {
    this.skewMsMax = options.skewMsMax ?? TIMESTAMP_SKEW_MS_MAX;
  }

  get size(): number {
    return this.peers.size;
  }

  has(peer: string): boolean {
    return this.peers.has(peer);
  }

  /** Checks a frame's nonce and timestamp and, if accepted, records it. */
  check(peer: string, frame: Pick<Frame, "sessionId" | "sequence" | "timestampMs">, nowMs: number): ReplayVerdict {
    const skewMs = frame.timestampMs - nowMs;
    if (Math.abs(skewMs) > this.skewMsMax) {
      return { kind: "reject", reason: "clock_skew", detail: `timestamp off by ${skewMs} ms (max ${this.skewMsMax})` };
    }
    const state = this.peers.get(peer);
    if (state === undefined || state.window.sessionId !== frame.sessionId) {
      if (state !== undefined && frame.timestampMs <= state.timestampMsMax) {
        return {
          kind: "reject",
          reason: "replay",
          detail: `session ${frame.sessionId} older than current ${state.window.sessionId}`,
        };
      }
      const window = new SessionWindow(frame.sessionId);
      window.accept(frame.sequence);
      this.peers.set(peer, { window, timestampMsMax: frame.timestampMs });
      return { kind: "accept", newSession: true };
    }
    if (!state.window.accept(frame.sequence)) {
      return { kind: "reject", reason: "replay", detail: `sequence ${frame.sequence} seen (highest ${state.window.highest})` };
    }
    if (frame.timestampMs > state.timestampMsMax) state.timestampMsMax = frame.timestampMs;
    return { kind: "accept", newSession: false };
  }

  forget(peer: string): void {
    this.peers.delete(peer);
  }
}
