// An in-memory datagram network for deterministic protocol tests: sockets are
// addresses in a map, delivery goes through an injected Clock (ManualClock in
// tests) after a random delay (so datagrams reorder), and each datagram may be
// lost or duplicated, all from one seeded Random: a failing seed replays.
// Not a mock of anything a user runs: the listener and agents under test are
// the real classes; only the wire between them is simulated.

import type { Clock, Random } from "../util/clock.ts";
import type { Address, DatagramHandler, DatagramSocket } from "./transport.ts";

export interface LinkFaults {
  readonly lossRatio: number;
  readonly duplicateRatio: number;
  readonly delayMsMin: number;
  readonly delayMsMax: number;
}

export const PERFECT_LINK: LinkFaults = { lossRatio: 0, duplicateRatio: 0, delayMsMin: 0, delayMsMax: 0 };

function key(address: Address): string {
  return `${address.host}:${address.port}`;
}

export class SimNetwork {
  private readonly clock: Clock;
  private readonly random: Random;
  private readonly endpoints = new Map<string, DatagramHandler>();
  faults: LinkFaults;
  /** Addresses whose traffic (both ways) is dropped: a crashed or cut-off process. */
  readonly cut = new Set<string>();
  /** Drops every datagram this returns true for (e.g. one message type). */
  dropIf: ((bytes: Buffer) => boolean) | null = null;
  /** Datagrams transmitted, by message type (byte 5 of the header). */
  readonly sentByType = new Map<number, number>();
  sent = 0;
  delivered = 0;
  dropped = 0;
  duplicated = 0;

  constructor(options: { clock: Clock; random: Random; faults?: LinkFaults }) {
    this.clock = options.clock;
    this.random = options.random;
    this.faults = options.faults ?? PERFECT_LINK;
  }

  /** A socket at `address` whose incoming datagrams go to `handler`. */
  attach(address: Address, handler: DatagramHandler): DatagramSocket {
    const local = { ...address };
    this.endpoints.set(key(local), handler);
    this.cut.delete(key(local));
    return {
      local,
      send: (bytes, to) => this.transmit(Buffer.from(bytes), local, to),
      close: async () => {
        this.endpoints.delete(key(local));
      },
    };
  }

  /** Delivers raw bytes as if `from` had sent them (forged or replayed datagrams). */
  inject(bytes: Buffer, from: Address, to: Address): void {
    this.endpoints.get(key(to))?.(Buffer.from(bytes), from);
  }

  private transmit(bytes: Buffer, from: Address, to: Address): void {
    this.sent += 1;
    const type = bytes[5] ?? 0;
    this.sentByType.set(type, (this.sentByType.get(type) ?? 0) + 1);
    if (this.cut.has(key(from)) || this.cut.has(key(to)) || this.dropIf?.(bytes) === true || this.random() < this.faults.lossRatio) {
      this.dropped += 1;
      return;
    }
    const copies = this.random() < this.faults.duplicateRatio ? 2 : 1;
    if (copies === 2) this.duplicated += 1;
    for (let i = 0; i < copies; i++) {
      const delayMs = this.faults.delayMsMin + this.random() * (this.faults.delayMsMax - this.faults.delayMsMin);
      this.clock.setTimeout(() => {
        if (this.cut.has(key(to))) {
          this.dropped += 1;
          return;
        }
        const handler = this.endpoints.get(key(to));
        if (handler === undefined) {
          this.dropped += 1;
          return;
        }
        this.delivered += 1;
        handler(bytes, from);
      }, delayMs);
    }
  }
}
