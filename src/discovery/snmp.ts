// SNMP mode of the auto-configuration protocol (seed Fig. 3: "This message
// also could be a SNMP trap of cold start packet, or link up packet"). A
// bounded BER decoder for SNMPv2c Trap PDUs (RFC 3416) and a UDP listener
// that turns traps into typed events:
//   coldStart 1.3.6.1.6.3.1.1.5.1 / warmStart .5.2 -> startup
//   linkDown  1.3.6.1.6.3.1.1.5.3                  -> shutdown
//   linkUp    1.3.6.1.6.3.1.1.5.4                  -> back
// The agent's name comes from sysName.0 or ipsanUnitName.0 (which wins), its
// control API address from ipsanUnitControl.0 ("HOST:PORT"); docs/protocol/snmp.md.
// The decoder is pure and total: every length is checked against the bytes
// that remain and against a named limit; it never throws on hostile input.

import { timingSafeEqual } from "node:crypto";
import { assert } from "../util/assert.ts";
import { errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { UNIT_NAME_PATTERN, type HostPort, type RejectReason } from "./messages.ts";
import { openUdpSocket, type Address, type DatagramSocket } from "./transport.ts";

// ---- Limits ----
export const SNMP_DATAGRAM_BYTES_MAX = 4096;
export const SNMP_VARBINDS_MAX = 64;
export const SNMP_OID_ARCS_MAX = 128;
export const SNMP_OCTET_STRING_BYTES_MAX = 1024;
export const SNMP_COMMUNITY_BYTES_MAX = 255;
/** BER long-form lengths of at most this many bytes (4 GiB is far beyond any datagram). */
const LENGTH_BYTES_MAX = 4;

// ---- OIDs ----
export const OID = {
  sysUpTime0: "1.3.6.1.2.1.1.3.0",
  sysName0: "1.3.6.1.2.1.1.5.0",
  snmpTrapOid0: "1.3.6.1.6.3.1.1.4.1.0",
  coldStart: "1.3.6.1.6.3.1.1.5.1",
  warmStart: "1.3.6.1.6.3.1.1.5.2",
  linkDown: "1.3.6.1.6.3.1.1.5.3",
  linkUp: "1.3.6.1.6.3.1.1.5.4",
  /** ipsan objects, under the RFC 5612 documentation enterprise number (32473) until ipsan has its own. */
  ipsanUnitName0: "1.3.6.1.4.1.32473.1.1.0",
  ipsanUnitControl0: "1.3.6.1.4.1.32473.1.2.0",
} as const;

const TRAP_KINDS: Readonly<Record<string, "startup" | "shutdown" | "back">> = {
  [OID.coldStart]: "startup",
  [OID.warmStart]: "startup",
  [OID.linkDown]: "shutdown",
  [OID.linkUp]: "back",
};

const TAG = {
  INTEGER: 0x02,
  OCTET_STRING: 0x04,
  NULL: 0x05,
  OID: 0x06,
  SEQUENCE: 0x30,
  IP_ADDRESS: 0x40,
  COUNTER32: 0x41,
  GAUGE32: 0x42,
  TIMETICKS: 0x43,
  OPAQUE: 0x44,
  COUNTER64: 0x46,
  UINTEGER32: 0x47,
  NO_SUCH_OBJECT: 0x80,
  NO_SUCH_INSTANCE: 0x81,
  END_OF_MIB_VIEW: 0x82,
  TRAP_V2: 0xa7,
} as const;

export const SNMP_VERSION_2C = 1;

export type VarbindValue =
  | { readonly type: "integer"; readonly value: number }
  | { readonly type: "octets"; readonly value: Buffer }
  | { readonly type: "null" }
  | { readonly type: "oid"; readonly value: string }
  | { readonly type: "ip"; readonly value: string }
  | { readonly type: "unsigned"; readonly tag: number; readonly value: number }
  | { readonly type: "counter64"; readonly value: bigint }
  | { readonly type: "opaque"; readonly value: Buffer }
  | { readonly type: "exception"; readonly tag: number };

export interface Varbind {
  readonly oid: string;
  readonly value: VarbindValue;
}

export interface TrapPdu {
  readonly version: number;
  readonly community: Buffer;
  readonly requestId: number;
  readonly varbinds: readonly Varbind[];
}

export type TrapDecodeResult =
  | { readonly kind: "trap"; readonly trap: TrapPdu }
  | { readonly kind: "invalid"; readonly reason: RejectReason; readonly detail: string };

// ---- BER reading ----

class BerError extends Error {
  readonly reason: RejectReason;
  constructor(reason: RejectReason, detail: string) {
    super(detail);
    this.reason = reason;
  }
}

interface Tlv {
  readonly tag: number;
  readonly start: number;
  readonly end: number;
}

/** Reads one TLV at `offset`, which must end by `limit`. */
function readTlv(bytes: Buffer, offset: number, limit: number, what: string): Tlv {
  if (offset + 2 > limit) throw new BerError("truncated", `${what}: header past the end at ${offset}`);
  const tag = bytes[offset] ?? 0;
  if ((tag & 0x1f) === 0x1f) throw new BerError("bad_trap", `${what}: multi-byte tag 0x${tag.toString(16)}`);
  const first = bytes[offset + 1] ?? 0;
  let length: number;
  let start: number;
  if (first < 0x80) {
    length = first;
    start = offset + 2;
  } else {
    const count = first & 0x7f;
    if (count === 0) throw new BerError("bad_trap", `${what}: indefinite length`);
    if (count > LENGTH_BYTES_MAX) throw new BerError("too_large", `${what}: ${count}-byte length`);
    if (offset + 2 + count > limit) throw new BerError("truncated", `${what}: length past the end`);
    length = 0;
    for (let i = 0; i < count; i++) length = length * 256 + (bytes[offset + 2 + i] ?? 0);
    start = offset + 2 + count;
  }
  if (start + length > limit) {
    throw new BerError("truncated", `${what}: ${length} bytes at ${start} past the end ${limit}`);
  }
  return { tag, start, end: start + length };
}

function expectTag(tlv: Tlv, tag: number, what: string): void {
  if (tlv.tag !== tag) throw new BerError("bad_trap", `${what}: tag 0x${tlv.tag.toString(16)}, expected 0x${tag.toString(16)}`);
}

function readSignedInt(bytes: Buffer, tlv: Tlv, what: string): number {
  const length = tlv.end - tlv.start;
  if (length < 1 || length > 4) throw new BerError("bad_trap", `${what}: ${length}-byte INTEGER`);
  let unsigned = 0;
  for (let i = tlv.start; i < tlv.end; i++) unsigned = unsigned * 256 + (bytes[i] ?? 0);
  // Two's complement: a set top bit makes it negative.
  return ((bytes[tlv.start] ?? 0) & 0x80) !== 0 ? unsigned - 2 ** (8 * length) : unsigned;
}

function readUnsigned(bytes: Buffer, tlv: Tlv, maxBytes: number, what: string): bigint {
  const length = tlv.end - tlv.start;
  if (length < 1 || length > maxBytes) throw new BerError("bad_trap", `${what}: ${length}-byte unsigned`);
  let value = 0n;
  for (let i = tlv.start; i < tlv.end; i++) value = value * 256n + BigInt(bytes[i] ?? 0);
  return value;
}

function readOid(bytes: Buffer, tlv: Tlv, what: string): string {
  const length = tlv.end - tlv.start;
  if (length < 1) throw new BerError("bad_trap", `${what}: empty OID`);
  const arcs: number[] = [];
  let value = 0;
  let arcBytes = 0;
  for (let i = tlv.start; i < tlv.end; i++) {
    const byte = bytes[i] ?? 0;
    arcBytes += 1;
    if (arcBytes > 5) throw new BerError("bad_trap", `${what}: OID arc over 32 bits`);
    value = value * 128 + (byte & 0x7f);
    if ((byte & 0x80) !== 0) continue;
    if (value > 0xffff_ffff) throw new BerError("bad_trap", `${what}: OID arc over 32 bits`);
    if (arcs.length === 0) {
      const first = value < 80 ? Math.floor(value / 40) : 2;
      arcs.push(first, value - first * 40);
    } else {
      arcs.push(value);
    }
    if (arcs.length > SNMP_OID_ARCS_MAX) throw new BerError("too_large", `${what}: more than ${SNMP_OID_ARCS_MAX} OID arcs`);
    value = 0;
    arcBytes = 0;
  }
  if (arcBytes !== 0) throw new BerError("truncated", `${what}: OID ends inside an arc`);
  return arcs.join(".");
}

function readValue(bytes: Buffer, tlv: Tlv, what: string): VarbindValue {
  const length = tlv.end - tlv.start;
  switch (tlv.tag) {
    case TAG.INTEGER:
      return { type: "integer", value: readSignedInt(bytes, tlv, what) };
    case TAG.OCTET_STRING:
    case TAG.OPAQUE:
      if (length > SNMP_OCTET_STRING_BYTES_MAX) throw new BerError("too_large", `${what}: ${length}-byte string`);
      return { type: tlv.tag === TAG.OPAQUE ? "opaque" : "octets", value: Buffer.from(bytes.subarray(tlv.start, tlv.end)) };
    case TAG.NULL:
      if (length !== 0) throw new BerError("bad_trap", `${what}: NULL with ${length} bytes`);
      return { type: "null" };
    case TAG.OID:
      return { type: "oid", value: readOid(bytes, tlv, what) };
    case TAG.IP_ADDRESS:
      if (length !== 4) throw new BerError("bad_trap", `${what}: IpAddress of ${length} bytes`);
      return { type: "ip", value: [...bytes.subarray(tlv.start, tlv.end)].join(".") };
    case TAG.COUNTER32:
    case TAG.GAUGE32:
    case TAG.TIMETICKS:
    case TAG.UINTEGER32: {
      const value = readUnsigned(bytes, tlv, 5, what);
      if (value > 0xffff_ffffn) throw new BerError("bad_trap", `${what}: 32-bit value ${value}`);
      return { type: "unsigned", tag: tlv.tag, value: Number(value) };
    }
    case TAG.COUNTER64:
      return { type: "counter64", value: readUnsigned(bytes, tlv, 9, what) };
    case TAG.NO_SUCH_OBJECT:
    case TAG.NO_SUCH_INSTANCE:
    case TAG.END_OF_MIB_VIEW:
      if (length !== 0) throw new BerError("bad_trap", `${what}: exception with ${length} bytes`);
      return { type: "exception", tag: tlv.tag };
    default:
      throw new BerError("bad_trap", `${what}: value tag 0x${tlv.tag.toString(16)}`);
  }
}

/** Decodes one SNMPv2c Trap datagram. Pure; never throws on hostile input. */
export function decodeTrap(input: Uint8Array): TrapDecodeResult {
  if (input.length > SNMP_DATAGRAM_BYTES_MAX) {
    return { kind: "invalid", reason: "too_large", detail: `datagram ${input.length} bytes > ${SNMP_DATAGRAM_BYTES_MAX}` };
  }
  const bytes = Buffer.from(input.buffer, input.byteOffset, input.length);
  try {
    const message = readTlv(bytes, 0, bytes.length, "message");
    expectTag(message, TAG.SEQUENCE, "message");
    if (message.end !== bytes.length) throw new BerError("bad_trap", `message: ${bytes.length - message.end} trailing bytes`);
    const versionTlv = readTlv(bytes, message.start, message.end, "version");
    expectTag(versionTlv, TAG.INTEGER, "version");
    const version = readSignedInt(bytes, versionTlv, "version");
    if (version !== SNMP_VERSION_2C) throw new BerError("bad_version", `SNMP version field ${version} (only 1 = v2c)`);
    const communityTlv = readTlv(bytes, versionTlv.end, message.end, "community");
    expectTag(communityTlv, TAG.OCTET_STRING, "community");
    if (communityTlv.end - communityTlv.start > SNMP_COMMUNITY_BYTES_MAX) throw new BerError("too_large", "community: too long");
    const pdu = readTlv(bytes, communityTlv.end, message.end, "pdu");
    if (pdu.tag !== TAG.TRAP_V2) throw new BerError("bad_trap", `pdu: type 0x${pdu.tag.toString(16)} is not an SNMPv2-Trap (0xa7)`);
    if (pdu.end !== message.end) throw new BerError("bad_trap", "pdu: trailing bytes in the message");
    const requestIdTlv = readTlv(bytes, pdu.start, pdu.end, "request-id");
    expectTag(requestIdTlv, TAG.INTEGER, "request-id");
    const requestId = readSignedInt(bytes, requestIdTlv, "request-id");
    const errorStatus = readTlv(bytes, requestIdTlv.end, pdu.end, "error-status");
    expectTag(errorStatus, TAG.INTEGER, "error-status");
    const errorIndex = readTlv(bytes, errorStatus.end, pdu.end, "error-index");
    expectTag(errorIndex, TAG.INTEGER, "error-index");
    if (readSignedInt(bytes, errorStatus, "error-status") !== 0 || readSignedInt(bytes, errorIndex, "error-index") !== 0) {
      throw new BerError("bad_trap", "error-status/error-index must be 0 in a trap");
    }
    const list = readTlv(bytes, errorIndex.end, pdu.end, "variable-bindings");
    expectTag(list, TAG.SEQUENCE, "variable-bindings");
    if (list.end !== pdu.end) throw new BerError("bad_trap", "pdu: trailing bytes after the variable bindings");
    const varbinds: Varbind[] = [];
    for (let offset = list.start; offset < list.end; ) {
      if (varbinds.length >= SNMP_VARBINDS_MAX) throw new BerError("too_large", `more than ${SNMP_VARBINDS_MAX} variable bindings`);
      const what = `varbind[${varbinds.length}]`;
      const varbind = readTlv(bytes, offset, list.end, what);
      expectTag(varbind, TAG.SEQUENCE, what);
      const name = readTlv(bytes, varbind.start, varbind.end, `${what}.name`);
      expectTag(name, TAG.OID, `${what}.name`);
      const value = readTlv(bytes, name.end, varbind.end, `${what}.value`);
      if (value.end !== varbind.end) throw new BerError("bad_trap", `${what}: trailing bytes`);
      varbinds.push({ oid: readOid(bytes, name, `${what}.name`), value: readValue(bytes, value, `${what}.value`) });
      offset = varbind.end;
    }
    // RFC 3416 4.2.6: sysUpTime.0 then snmpTrapOID.0 come first.
    if (varbinds[0]?.oid !== OID.sysUpTime0 || varbinds[1]?.oid !== OID.snmpTrapOid0 || varbinds[1].value.type !== "oid") {
      throw new BerError("bad_trap", "a trap must start with sysUpTime.0 and snmpTrapOID.0");
    }
    return {
      kind: "trap",
      trap: { version, community: Buffer.from(bytes.subarray(communityTlv.start, communityTlv.end)), requestId, varbinds },
    };
  } catch (error) {
    if (error instanceof BerError) return { kind: "invalid", reason: error.reason, detail: error.message };
    throw error;
  }
}

// ---- Meaning ----

export type TrapKind = "startup" | "shutdown" | "back";

export interface SnmpTrapEvent {
  readonly kind: TrapKind;
  readonly from: Address;
  /** From ipsanUnitName.0, else sysName.0; null if neither names a valid unit. */
  readonly agentName: string | null;
  /** From ipsanUnitControl.0 ("HOST:PORT"). */
  readonly control: HostPort | null;
  readonly trapOid: string;
  readonly uptimeTicks: number | null;
}

export type SnmpEvent =
  | SnmpTrapEvent
  | { readonly kind: "rejected"; readonly reason: RejectReason; readonly from: Address; readonly detail: string }
  | { readonly kind: "ignored"; readonly trapOid: string; readonly from: Address };

function text(value: VarbindValue | undefined): string | null {
  return value?.type === "octets" ? value.value.toString("utf8") : null;
}

function parseControl(textValue: string | null): HostPort | null {
  if (textValue === null) return null;
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.-]+)):([0-9]{1,5})$/.exec(textValue);
  const port = Number(match?.[3]);
  if (match === null || !(port >= 1 && port <= 65535)) return null;
  return { host: match[1] ?? match[2] ?? "", port };
}

/** What a decoded trap means for the pool, or null for a trap ipsan does not act on. */
export function interpretTrap(trap: TrapPdu, from: Address): SnmpTrapEvent | { kind: "ignored"; trapOid: string } {
  const find = (oid: string): VarbindValue | undefined => trap.varbinds.find((v) => v.oid === oid)?.value;
  const trapOidValue = find(OID.snmpTrapOid0);
  const trapOid = trapOidValue?.type === "oid" ? trapOidValue.value : "";
  const kind = TRAP_KINDS[trapOid];
  if (kind === undefined) return { kind: "ignored", trapOid };
  const name = text(find(OID.ipsanUnitName0)) ?? text(find(OID.sysName0));
  const uptime = find(OID.sysUpTime0);
  return {
    kind,
    from,
    agentName: name !== null && UNIT_NAME_PATTERN.test(name) ? name : null,
    control: parseControl(text(find(OID.ipsanUnitControl0))),
    trapOid,
    uptimeTicks: uptime?.type === "unsigned" ? uptime.value : null,
  };
}

// ---- Listener ----

export interface SnmpTrapListenerOptions {
  /** The community string traps must carry. */
  readonly community: string;
  readonly socket?: DatagramSocket;
}

export class SnmpTrapListener {
  private readonly community: Buffer;
  private readonly handlers = new Set<(event: SnmpEvent) => void>();
  private readonly log = logger("snmp");
  private socket: DatagramSocket | null;
  private readonly counts = { received: 0, startup: 0, shutdown: 0, back: 0, ignored: 0 };
  private readonly rejected = new Map<RejectReason, number>();

  constructor(options: SnmpTrapListenerOptions) {
    assert(options.community.length > 0, "community must not be empty");
    this.community = Buffer.from(options.community, "utf8");
    this.socket = options.socket ?? null;
  }

  async listen(address: Address): Promise<Address> {
    assert(this.socket === null, "listen() once");
    this.socket = await openUdpSocket(address, (bytes, from) => this.handleDatagram(bytes, from));
    this.log.info("snmp trap listener", { address: `${this.socket.local.host}:${this.socket.local.port}` });
    return this.socket.local;
  }

  get address(): Address | null {
    return this.socket?.local ?? null;
  }

  async close(): Promise<void> {
    await this.socket?.close();
    this.socket = null;
  }

  subscribe(handler: (event: SnmpEvent) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  stats(): { received: number; startup: number; shutdown: number; back: number; ignored: number; rejected: Record<string, number> } {
    return { ...this.counts, rejected: Object.fromEntries(this.rejected) };
  }

  metricsText(): string {
    const s = this.stats();
    return [
      "# HELP ipsan_snmp_traps_total SNMP traps received, by meaning.",
      "# TYPE ipsan_snmp_traps_total counter",
      ...(["startup", "shutdown", "back", "ignored"] as const).map((k) => `ipsan_snmp_traps_total{kind="${k}"} ${s[k]}`),
      "# HELP ipsan_snmp_rejected_total SNMP datagrams rejected, by reason.",
      "# TYPE ipsan_snmp_rejected_total counter",
      ...Object.entries(s.rejected).map(([reason, n]) => `ipsan_snmp_rejected_total{reason="${reason}"} ${n}`),
      "",
    ].join("\n");
  }

  handleDatagram(bytes: Buffer, from: Address): void {
    this.counts.received += 1;
    try {
      const decoded = decodeTrap(bytes);
      if (decoded.kind === "invalid") return this.reject(decoded.reason, from, decoded.detail);
      const community = decoded.trap.community;
      if (community.length !== this.community.length || !timingSafeEqual(community, this.community)) {
        return this.reject("bad_community", from, `community of ${community.length} bytes does not match`);
      }
      const meaning = interpretTrap(decoded.trap, from);
      if (meaning.kind === "ignored") {
        this.counts.ignored += 1;
        this.emit({ kind: "ignored", trapOid: meaning.trapOid, from });
        return;
      }
      this.counts[meaning.kind] += 1;
      this.log.info("snmp trap", { kind: meaning.kind, from: `${from.host}:${from.port}`, agent: meaning.agentName ?? "?" });
      this.emit(meaning);
    } catch (error) {
      this.log.limited("snmp-bug", "snmp trap handling failed", { error: errorMessage(error) });
    }
  }

  private reject(reason: RejectReason, from: Address, detail: string): void {
    this.rejected.set(reason, (this.rejected.get(reason) ?? 0) + 1);
    this.log.limited(`snmp-reject:${reason}`, "snmp datagram rejected", { reason, from: `${from.host}:${from.port}`, detail });
    this.emit({ kind: "rejected", reason, from, detail });
  }

  private emit(event: SnmpEvent): void {
    for (const handler of this.handlers) {
      try {
        handler(event);
      } catch (error) {
        this.log.limited("snmp-handler", "snmp event handler failed", { error: errorMessage(error) });
      }
    }
  }
}
