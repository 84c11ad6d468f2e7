// The sending half of a peer's identity: a random session id per incarnation,
// a sequence number per datagram (the replay nonce) and a message id per
// logical message. Shared by the station listener and the unit agent.

import { randomBytes } from "node:crypto";
import { encodeFrame } from "./codec.ts";
import type { Clock } from "../util/clock.ts";
import { SEQUENCE_MAX, type MessageType } from "./messages.ts";

/** Renew the session well before a counter could wrap. */
const COUNTER_RENEW_AT = SEQUENCE_MAX - 1_000_000;

export class SendSession {
  private packetKey: Buffer;
  /** Frames carry FLAG.UNIT_KEY: signed with a unit's own secret. */
  private unitKey = false;
  private readonly clock: Clock;
  private readonly fromStation: boolean;
  sessionId = randomBytes(8).toString("hex");
  private sequence = 0;
  private messageId = 0;

  constructor(options: { packetKey: Buffer; clock: Clock; fromStation: boolean }) {
    this.packetKey = options.packetKey;
    this.clock = options.clock;
    this.fromStation = options.fromStation;
  }

  /** Signs from now on with `packetKey` (a unit's own key when `unitKey`); the session goes on. */
  setKey(packetKey: Buffer, unitKey: boolean): void {
    this.packetKey = packetKey;
    this.unitKey = unitKey;
  }

  /** True once the counters are near wrapping: the owner should renew() (a unit re-sends STARTUP). */
  get exhausted(): boolean {
    return this.sequence >= COUNTER_RENEW_AT || this.messageId >= COUNTER_RENEW_AT;
  }

  renew(): void {
    this.sessionId = randomBytes(8).toString("hex");
    this.sequence = 0;
    this.messageId = 0;
  }

  nextMessageId(): number {
    this.messageId += 1;
    return this.messageId;
  }

  /** One signed datagram; every call uses a fresh sequence number and the current time. */
  frame(options: {
    type: MessageType;
    unitName: string;
    messageId: number;
    payload: Uint8Array;
    fragmentIndex?: number;
    fragmentCount?: number;
    /** Sign this frame with another key (the station's ENROL/REFUSE for a unit), `unitKey` telling which kind. */
    key?: { packetKey: Buffer; unitKey: boolean };
  }): Buffer {
    this.sequence += 1;
    return encodeFrame(
      {
        type: options.type,
        fromStation: this.fromStation,
        unitName: options.unitName,
        sessionId: this.sessionId,
        sequence: this.sequence,
        messageId: options.messageId,
        timestampMs: Math.floor(this.clock.nowMs()),
        fragmentIndex: options.fragmentIndex ?? 0,
        fragmentCount: options.fragmentCount ?? 1,
        payload: options.payload,
        unitKey: options.key?.unitKey ?? this.unitKey,
      },
      options.key?.packetKey ?? this.packetKey,
    );
  }
}
