// iSCSI text keys (RFC 7143 sections 6 and 13): "key=value" pairs separated
// by NUL bytes, parsed with bounds (limits.ts), and the target's side of the
// operational negotiation: each key's kind (declarative or negotiated), its
// range, and its result function.

import type { IscsiLimits } from "./limits.ts";

export type TextPair = readonly [key: string, value: string];

export class TextError extends Error {}

const KEY_PATTERN = /^[A-Za-z0-9.\-+@_]+$/;

/** Parses a text data segment. Throws TextError (too long, too many, malformed, repeated key). */
export function parseText(data: Buffer, limits: Pick<IscsiLimits, "textBytesMax" | "textKeysMax" | "keyBytesMax" | "valueBytesMax">): TextPair[] {
  if (data.length > limits.textBytesMax) throw new TextError(`text of ${data.length} bytes exceeds ${limits.textBytesMax}`);
  const out: TextPair[] = [];
  const seen = new Set<string>();
  let start = 0;
  while (start < data.length) {
    let end = data.indexOf(0, start);
    if (end < 0) end = data.length; // RFC: every pair ends in NUL; tolerate a missing last one
    if (end === start) {
      start = end + 1;
      continue; // padding NULs
    }
    const item = data.subarray(start, end).toString("utf8");
    start = end + 1;
    const equals = item.indexOf("=");
    if (equals <= 0) throw new TextError(`malformed text item "${item.slice(0, 64)}" (expected key=value)`);
    const key = item.slice(0, equals);
    const value = item.slice(equals + 1);
    if (Buffer.byteLength(key) > limits.keyBytesMax || !KEY_PATTERN.test(key)) throw new TextError(`invalid key "${key.slice(0, 64)}" (at most ${limits.keyBytesMax} bytes of A-Z a-z 0-9 . - + @ _)`);
    if (Buffer.byteLength(value) > limits.valueBytesMax) throw new TextError(`value of ${key} is ${Buffer.byteLength(value)} bytes, more than ${limits.valueBytesMax}`);
    if (seen.has(key)) throw new TextError(`key ${key} given twice`);
    seen.add(key);
    if (out.length >= limits.textKeysMax) throw new TextError(`more than ${limits.textKeysMax} keys`);
    out.push([key, value]);
  }
  return out;
}

export function encodeText(pairs: readonly TextPair[]): Buffer {
  return Buffer.from(pairs.map(([key, value]) => `${key}=${value}\0`).join(""), "utf8");
}

/** RFC 7143 section 6.1 numbers: decimal, or 0x hex. undefined if not one. */
export function parseNumber(value: string): number | undefined {
  if (/^0x[0-9a-fA-F]{1,8}$/.test(value)) return Number.parseInt(value.slice(2), 16);
  if (/^(0|[1-9][0-9]{0,9})$/.test(value)) return Number(value);
  return undefined;
}

/** The operational parameters of a session once negotiated (RFC 7143 section 13, defaults where not negotiated). */
export interface SessionParams {
  headerDigest: boolean;
  dataDigest: boolean;
  initialR2T: boolean;
  immediateData: boolean;
  /** Largest data segment WE may send the initiator (its declared MaxRecvDataSegmentLength). */
  initiatorRecvDataSegmentBytes: number;
  maxBurstBytes: number;
  firstBurstBytes: number;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  maxOutstandingR2t: number;
  errorRecoveryLevel: number;
}

export function defaultSessionParams(): SessionParams {
  return {
    headerDigest: false,
    dataDigest: false,
    initialR2T: true,
    immediateData: true,
    initiatorRecvDataSegmentBytes: 8192,
    maxBurstBytes: 262_144,
    firstBurstBytes: 65_536,
    defaultTime2Wait: 2,
    defaultTime2Retain: 20,
    maxOutstandingR2t: 1,
    errorRecoveryLevel: 0,
  };
}

/** Where a key may appear (RFC 7143 section 13: LO = leading only, IO = initialize only, FFPO/ALL). */
export type NegotiationPhase = "login-leading" | "login" | "full-feature";

interface NumericRule {
  readonly kind: "min" | "max";
  readonly low: number;
  readonly high: number;
  readonly ours: (limits: IscsiLimits) => number;
  readonly set: (params: SessionParams, value: number) => void;
  readonly leadingOnly: boolean;
}

const NUMERIC: Readonly<Record<string, NumericRule>> = {
  MaxBurstLength: { kind: "min", low: 512, high: 0xff_ffff, ours: (l) => l.maxBurstBytes, set: (p, v) => { p.maxBurstBytes = v; }, leadingOnly: true },
  FirstBurstLength: { kind: "min", low: 512, high: 0xff_ffff, ours: (l) => l.firstBurstBytes, set: (p, v) => { p.firstBurstBytes = v; }, leadingOnly: true },
  DefaultTime2Wait: { kind: "max", low: 0, high: 3600, ours: () => 2, set: (p, v) => { p.defaultTime2Wait = v; }, leadingOnly: true },
  DefaultTime2Retain: { kind: "min", low: 0, high: 3600, ours: () => 0, set: (p, v) => { p.defaultTime2Retain = v; }, leadingOnly: true },
  MaxOutstandingR2T: { kind: "min", low: 1, high: 65_535, ours: (l) => l.outstandingR2tMax, set: (p, v) => { p.maxOutstandingR2t = v; }, leadingOnly: true },
  ErrorRecoveryLevel: { kind: "min", low: 0, high: 2, ours: () => 0, set: (p, v) => { p.errorRecoveryLevel = v; }, leadingOnly: true },
  MaxConnections: { kind: "min", low: 1, high: 65_535, ours: () => 1, set: () => undefined, leadingOnly: true },
};

interface BooleanRule {
  /** "or": Yes if either says Yes; "and": Yes only if both do. */
  readonly kind: "or" | "and";
  readonly ours: boolean;
  readonly set: (params: SessionParams, value: boolean) => void;
}

const BOOLEAN: Readonly<Record<string, BooleanRule>> = {
  InitialR2T: { kind: "or", ours: false, set: (p, v) => { p.initialR2T = v; } },
  ImmediateData: { kind: "and", ours: true, set: (p, v) => { p.immediateData = v; } },
  // We deliver and expect data in order only: OR with our Yes is Yes.
  DataPDUInOrder: { kind: "or", ours: true, set: () => undefined },
  DataSequenceInOrder: { kind: "or", ours: true, set: () => undefined },
  // Markers (RFC 3720; removed by RFC 7143): never used.
  IFMarker: { kind: "and", ours: false, set: () => undefined },
  OFMarker: { kind: "and", ours: false, set: () => undefined },
  // iSER: not over TCP.
  RDMAExtensions: { kind: "and", ours: false, set: () => undefined },
};

/** Keys the initiator declares: we take note and answer nothing. */
const DECLARED_BY_INITIATOR = new Set(["InitiatorName", "InitiatorAlias", "SessionType", "TargetName"]);
/** Keys only the target may send: an initiator sending them gets "Irrelevant"? RFC: Reject. */
const TARGET_ONLY = new Set(["TargetAlias", "TargetAddress", "TargetPortalGroupTag"]);

/** Digests the target requires (`ipsan unit --iscsi-require-digest`): None is not accepted for them. */
export interface RequiredDigests {
  readonly header: boolean;
  readonly data: boolean;
}

export const NO_REQUIRED_DIGESTS: RequiredDigests = { header: false, data: false };

export interface NegotiationResult {
  /** Our answers, in order. */
  readonly answers: TextPair[];
  /** Why the negotiation cannot go on (a value out of its range where the RFC makes that fatal); undefined when fine. */
  readonly failure: string | undefined;
}

/**
 * Answers the operational keys of one request and updates `params`. Keys
 * for the security stage and declarations (InitiatorName...) are handled by
 * the caller; they must not be passed here. Unknown keys: NotUnderstood;
 * keys not allowed in this phase: Reject; bad values: Reject.
 */
export function negotiateOperational(
  pairs: readonly TextPair[],
  params: SessionParams,
  limits: IscsiLimits,
  phase: NegotiationPhase,
  sessionType: "Normal" | "Discovery",
  required: RequiredDigests = NO_REQUIRED_DIGESTS,
): NegotiationResult {
  const answers: TextPair[] = [];
  for (const [key, value] of pairs) {
    if (DECLARED_BY_INITIATOR.has(key)) continue;
    if (TARGET_ONLY.has(key)) {
      answers.push([key, "Reject"]);
      continue;
    }
    if (key === "HeaderDigest" || key === "DataDigest") {
      if (phase === "full-feature") {
        answers.push([key, "Reject"]);
        continue;
      }
      const offered = value.split(",");
      // A required digest: None is not "allowed" for us, so the initiator's first acceptable value is CRC32C (RFC 7143 section 6.2).
      const noneAllowed = !(key === "HeaderDigest" ? required.header : required.data);
      const choice = offered.find((item) => item === "CRC32C" || (item === "None" && noneAllowed));
      if (choice === undefined) {
        answers.push([key, "Reject"]);
        continue;
      }
      if (key === "HeaderDigest") params.headerDigest = choice === "CRC32C";
      else params.dataDigest = choice === "CRC32C";
      answers.push([key, choice]);
      continue;
    }
    if (key === "MaxRecvDataSegmentLength") {
      const number = parseNumber(value);
      if (number === undefined || number < 512 || number > 0xff_ffff) {
        answers.push([key, "Reject"]);
        continue;
      }
      params.initiatorRecvDataSegmentBytes = number;
      // Declarative: our own value is declared separately (see ourDeclarations).
      continue;
    }
    const numeric = NUMERIC[key];
    if (numeric !== undefined) {
      if (phase === "full-feature" && numeric.leadingOnly) {
        answers.push([key, "Reject"]);
        continue;
      }
      if (sessionType === "Discovery" && key !== "ErrorRecoveryLevel" && key !== "MaxConnections" && key !== "DefaultTime2Wait" && key !== "DefaultTime2Retain") {
        answers.push([key, "Irrelevant"]);
        continue;
      }
      const number = parseNumber(value);
      if (number === undefined || number < numeric.low || number > numeric.high) {
        answers.push([key, "Reject"]);
        continue;
      }
      const ours = numeric.ours(limits);
      const result = numeric.kind === "min" ? Math.min(number, ours) : Math.max(number, ours);
      numeric.set(params, result);
      answers.push([key, String(result)]);
      continue;
    }
    const boolean = BOOLEAN[key];
    if (boolean !== undefined) {
      if (phase === "full-feature") {
        answers.push([key, "Reject"]);
        continue;
      }
      if (value !== "Yes" && value !== "No") {
        answers.push([key, "Reject"]);
        continue;
      }
      if (sessionType === "Discovery" && (key === "InitialR2T" || key === "ImmediateData" || key === "DataPDUInOrder" || key === "DataSequenceInOrder")) {
        answers.push([key, "Irrelevant"]);
        continue;
      }
      const theirs = value === "Yes";
      const result = boolean.kind === "or" ? theirs || boolean.ours : theirs && boolean.ours;
      boolean.set(params, result);
      answers.push([key, result ? "Yes" : "No"]);
      continue;
    }
    if (key === "OFMarkInt" || key === "IFMarkInt") {
      answers.push([key, "Irrelevant"]);
      continue;
    }
    if (key === "iSCSIProtocolLevel") {
      const number = parseNumber(value);
      answers.push([key, number === undefined ? "Reject" : String(Math.min(number, 1))]);
      continue;
    }
    if (key === "TaskReporting") {
      answers.push([key, value.split(",").includes("RFC3720") ? "RFC3720" : "Reject"]);
      continue;
    }
    answers.push([key, "NotUnderstood"]);
  }
  // FirstBurstLength never exceeds MaxBurstLength (RFC 7143 section 13.14).
  if (params.firstBurstBytes > params.maxBurstBytes) params.firstBurstBytes = params.maxBurstBytes;
  return { answers, failure: undefined };
}
