// Every bound of the iSCSI target, in one place, checked against each other
// once when a target is made (like src/nbd/limits.ts). The reasons are in
// docs/adr/0015-iscsi-target.md; the table is in docs/protocol/iscsi.md.

import { IpsanError } from "../util/errors.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

export interface IscsiLimits {
  /** Open connections per target server (logging in or in full feature phase); more are closed at once. */
  readonly connectionsMax: number;
  /** A login that does not reach full feature phase within this time is cut (from accept). */
  readonly loginTimeoutMs: number;
  /** Login or Text request PDUs in one negotiation (C-bit continuations included). */
  readonly negotiationPdusMax: number;
  /** Text bytes (key=value pairs) of one Login or Text request, all its continuations together. */
  readonly textBytesMax: number;
  /** key=value pairs in one request. */
  readonly textKeysMax: number;
  /** Bytes of one key name (RFC 7143 section 6.1: 63). */
  readonly keyBytesMax: number;
  /** Bytes of one value (RFC 7143 section 6.1: 255 for most, 8192 for CHAP's binary values). */
  readonly valueBytesMax: number;
  /** Our MaxRecvDataSegmentLength: the largest data segment we accept, declared at login. */
  readonly recvDataSegmentBytes: number;
  /** Largest MaxBurstLength we agree to (the negotiated value is the lower of ours and the initiator's). */
  readonly maxBurstBytes: number;
  /** Largest FirstBurstLength we agree to. */
  readonly firstBurstBytes: number;
  /** Largest MaxOutstandingR2T we agree to. */
  readonly outstandingR2tMax: number;
  /** Commands a session may have outstanding (the CmdSN window: MaxCmdSN - ExpCmdSN + 1). */
  readonly queueDepth: number;
  /** Data bytes (Data-Out gathered, Data-In to send) of commands in flight on one connection. */
  readonly connectionBytesInFlightMax: number;
  /** Data bytes in flight over all connections of the target (src/nbd/budget.ts, fair share per peer address). */
  readonly serverBytesInFlightMax: number;
  /** A Data-Out the target asked for (R2T) or expects (unsolicited) that does not come within this time: connection dropped. */
  readonly dataOutTimeoutMs: number;
  /** An idle connection gets a NOP-In ping after this long without a PDU. */
  readonly nopInIntervalMs: number;
  /** A NOP-In ping not answered within this time: connection dropped. */
  readonly nopInTimeoutMs: number;
  /** Reply bytes queued on a socket above which the target stops reading that initiator. */
  readonly replyBytesQueuedMax: number;
  /** close(): how long commands in flight may take before connections are cut. */
  readonly closeTimeoutMs: number;
  /** Largest Data-In for a command the logical unit would not bound itself (bytes). */
  readonly transferBytesMax: number;
  /**
   * Socket read arenas over all connections (src/nbd/large_reads.ts): a connection that
   * receives bulk data reads into 2 MiB arenas, reserving 4 MiB (an arena and its spare);
   * past this sum the others read 64 KiB at a time. An idle connection reserves nothing.
   */
  readonly readArenaBytesMax: number;
}

export const DEFAULT_ISCSI_LIMITS: IscsiLimits = Object.freeze({
  connectionsMax: 1024,
  loginTimeoutMs: 15_000,
  negotiationPdusMax: 16,
  textBytesMax: 64 * KiB,
  textKeysMax: 256,
  keyBytesMax: 63,
  valueBytesMax: 8192,
  recvDataSegmentBytes: 256 * KiB,
  maxBurstBytes: 1 * MiB,
  firstBurstBytes: 256 * KiB,
  outstandingR2tMax: 8,
  queueDepth: 64,
  connectionBytesInFlightMax: 64 * MiB,
  serverBytesInFlightMax: 256 * MiB,
  dataOutTimeoutMs: 30_000,
  nopInIntervalMs: 30_000,
  nopInTimeoutMs: 15_000,
  replyBytesQueuedMax: 16 * MiB,
  closeTimeoutMs: 5_000,
  transferBytesMax: 32 * MiB,
  readArenaBytesMax: 64 * MiB,
});

function check(condition: boolean, message: string): void {
  if (!condition) throw new IpsanError("INVALID_ARGUMENT", `iSCSI limit ${message}`);
}

/** Merges overrides into the defaults and checks the limits against each other. */
export function resolveIscsiLimits(overrides: Partial<IscsiLimits> = {}): IscsiLimits {
  const limits: IscsiLimits = { ...DEFAULT_ISCSI_LIMITS, ...overrides };
  for (const key of Object.keys(DEFAULT_ISCSI_LIMITS) as (keyof IscsiLimits)[]) {
    const value = limits[key];
    check(Number.isSafeInteger(value) && value > 0, `${key}=${value} must be a positive integer`);
  }
  // RFC 7143 section 13: MaxRecvDataSegmentLength, MaxBurstLength, FirstBurstLength are 512..2^24-1.
  for (const key of ["recvDataSegmentBytes", "maxBurstBytes", "firstBurstBytes"] as const) {
    check(limits[key] >= 512 && limits[key] <= 0xff_ffff, `${key}=${limits[key]} must be 512..16777215 (RFC 7143 section 13)`);
  }
  check(limits.firstBurstBytes <= limits.maxBurstBytes, `firstBurstBytes=${limits.firstBurstBytes} must not exceed maxBurstBytes=${limits.maxBurstBytes}`);
  check(limits.outstandingR2tMax <= 65_535, `outstandingR2tMax=${limits.outstandingR2tMax} must be at most 65535`);
  check(limits.queueDepth <= 65_536, `queueDepth=${limits.queueDepth} must be at most 65536`);
  check(limits.keyBytesMax <= 63, `keyBytesMax=${limits.keyBytesMax} must be at most 63 (RFC 7143 section 6.1)`);
  check(limits.valueBytesMax >= 1024, `valueBytesMax=${limits.valueBytesMax} must be at least 1024 (a SHA-256 CHAP challenge in hex and a full target name fit)`);
  check(limits.textBytesMax >= 8192, `textBytesMax=${limits.textBytesMax} must be at least 8192 (a login's keys fit)`);
  check(limits.connectionBytesInFlightMax >= limits.transferBytesMax, "connectionBytesInFlightMax must be at least transferBytesMax (one command of the largest transfer fits)");
  check(limits.serverBytesInFlightMax >= limits.connectionBytesInFlightMax, "serverBytesInFlightMax must be at least connectionBytesInFlightMax");
  return Object.freeze(limits);
}

/** Environment variable with limit overrides for operators and tests: "key=value,key=value". */
export const ISCSI_LIMITS_ENV = "IPSAN_ISCSI_LIMITS";

/** Parses "loginTimeoutMs=500,nopInIntervalMs=1000"; unknown keys and non-numbers name the field. */
export function parseIscsiLimitOverrides(text: string): Partial<IscsiLimits> {
  const out: Record<string, number> = {};
  for (const item of text.split(",")) {
    const trimmed = item.trim();
    if (trimmed === "") continue;
    const [key = "", value = ""] = trimmed.split("=", 2);
    if (!(key in DEFAULT_ISCSI_LIMITS)) {
      throw new IpsanError("INVALID_ARGUMENT", `${ISCSI_LIMITS_ENV}: unknown limit "${key}" (known: ${Object.keys(DEFAULT_ISCSI_LIMITS).join(", ")})`);
    }
    const number = Number(value);
    if (value.trim() === "" || !Number.isSafeInteger(number)) throw new IpsanError("INVALID_ARGUMENT", `${ISCSI_LIMITS_ENV}: ${key}="${value}" is not an integer`);
    out[key] = number;
  }
  return out;
}
