// Every bound of the NBD server, in one place, checked against each other once
// when a server is made (TigerBeetle style). The reasons for each value are in
// docs/adr/0003-nbd-subset-and-limits.md.

import { IpsanError } from "../util/errors.ts";
import { WIRE } from "./protocol.ts";

const MiB = 1024 * 1024;

export interface NbdLimits {
  /** Largest READ or WRITE payload; advertised as the maximum block size. */
  readonly payloadBytesMax: number;
  /** Requests being executed per connection; at the limit the server stops reading the socket. */
  readonly requestsInFlightMax: number;
  /** Open connections per server (handshaking or transmitting); more are closed at once. */
  readonly connectionsMax: number;
  /** A client that completes no option for this long (from accept, or from its last option) is dropped. */
  readonly handshakeTimeoutMs: number;
  /** Options per handshake (NBD_OPT_*); one more is answered NBD_REP_ERR_TOO_BIG and the connection closed. */
  readonly optionsMax: number;
  /** Largest option data accepted; a longer option is answered NBD_REP_ERR_TOO_BIG and the connection closed. */
  readonly optionDataBytesMax: number;
  /** Queries in one NBD_OPT_{LIST,SET}_META_CONTEXT. */
  readonly metaContextQueriesMax: number;
  /** Payload bytes (read buffers, write data) of requests in flight on one connection. */
  readonly connectionBytesInFlightMax: number;
  /** Payload bytes in flight over all connections of the server. */
  readonly serverBytesInFlightMax: number;
  /** Reply bytes queued on one socket above which the server stops reading that client's requests. */
  readonly replyBytesQueuedMax: number;
  /** A client whose queued replies stay above replyBytesQueuedMax this long without draining is disconnected. */
  readonly writeStallTimeoutMs: number;
  /**
   * A WRITE's payload must arrive completely within this time once the server
   * has reserved budget for it and reads it; otherwise the connection is closed
   * and the bytes go back to the budget (a client cannot hold them by stalling).
   */
  readonly payloadTimeoutMs: number;
  /** close(): how long in-flight requests may take before connections are cut. */
  readonly closeTimeoutMs: number;
  /** Descriptors in one NBD_REPLY_TYPE_BLOCK_STATUS chunk. */
  readonly blockStatusDescriptorsMax: number;
}

export const DEFAULT_NBD_LIMITS: NbdLimits = Object.freeze({
  payloadBytesMax: 32 * MiB,
  requestsInFlightMax: 64,
  connectionsMax: 1024,
  handshakeTimeoutMs: 10_000,
  optionsMax: 4096,
  optionDataBytesMax: 64 * 1024,
  metaContextQueriesMax: 64,
  connectionBytesInFlightMax: 64 * MiB,
  serverBytesInFlightMax: 256 * MiB,
  replyBytesQueuedMax: 16 * MiB,
  writeStallTimeoutMs: 30_000,
  payloadTimeoutMs: 30_000,
  closeTimeoutMs: 5_000,
  blockStatusDescriptorsMax: 65_536,
});

/** NBD_INFO_BLOCK_SIZE minimum and preferred sizes (the maximum is payloadBytesMax). */
export const BLOCK_SIZE_MIN_BYTES = 512;
export const BLOCK_SIZE_PREFERRED_BYTES = 4096;

function positiveInteger(limits: NbdLimits, key: keyof NbdLimits): void {
  const value = limits[key];
  if (!Number.isSafeInteger(value) || value <= 0) {
    throw new IpsanError("INVALID_ARGUMENT", `NBD limit ${key}=${value} must be a positive integer`);
  }
}

function atLeast(limits: NbdLimits, key: keyof NbdLimits, minimum: number, why: string): void {
  if (limits[key] < minimum) {
    throw new IpsanError("INVALID_ARGUMENT", `NBD limit ${key}=${limits[key]} must be at least ${minimum} (${why})`);
  }
}

/** Merges overrides into the defaults and checks the limits against each other. */
export function resolveLimits(overrides: Partial<NbdLimits> = {}): NbdLimits {
  const limits: NbdLimits = { ...DEFAULT_NBD_LIMITS, ...overrides };
  for (const key of Object.keys(DEFAULT_NBD_LIMITS) as (keyof NbdLimits)[]) positiveInteger(limits, key);
  atLeast(limits, "payloadBytesMax", BLOCK_SIZE_PREFERRED_BYTES, "the maximum block size is at least the preferred one");
  if (limits.payloadBytesMax > 0xffff_ffff - 8) {
    throw new IpsanError("INVALID_ARGUMENT", `NBD limit payloadBytesMax=${limits.payloadBytesMax} must fit a 32-bit chunk length`);
  }
  atLeast(limits, "connectionBytesInFlightMax", limits.payloadBytesMax, "one request of the largest payload must fit");
  atLeast(limits, "serverBytesInFlightMax", limits.connectionBytesInFlightMax, "one connection's in-flight bytes must fit");
  // An NBD_OPT_GO naming the longest export name with a few information requests must fit.
  atLeast(limits, "optionDataBytesMax", 4 + WIRE.STRING_BYTES_MAX + 2 + 2 * 16, "a GO with the longest export name must fit");
  return Object.freeze(limits);
}

/** Environment variable with limit overrides for operators and tests: "key=value,key=value". */
export const LIMITS_ENV = "IPSAN_NBD_LIMITS";

/** Parses "handshakeTimeoutMs=500,writeStallTimeoutMs=1000"; unknown keys and non-numbers name the field. */
export function parseLimitOverrides(text: string): Partial<NbdLimits> {
  const out: Record<string, number> = {};
  for (const item of text.split(",")) {
    const trimmed = item.trim();
    if (trimmed === "") continue;
    const [key = "", value = ""] = trimmed.split("=", 2);
    if (!(key in DEFAULT_NBD_LIMITS)) {
      throw new IpsanError("INVALID_ARGUMENT", `${LIMITS_ENV}: unknown limit "${key}" (known: ${Object.keys(DEFAULT_NBD_LIMITS).join(", ")})`);
    }
    const number = Number(value);
    if (value.trim() === "" || !Number.isSafeInteger(number)) {
      throw new IpsanError("INVALID_ARGUMENT", `${LIMITS_ENV}: ${key}="${value}" is not an integer`);
    }
    out[key] = number;
  }
  return out;
}
