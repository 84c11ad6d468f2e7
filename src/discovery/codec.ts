// Pure codec for discovery datagrams: bytes in, a discriminated union out.
// Never touches a socket, never throws on hostile input: every length is
// checked against a named limit from messages.ts before it is used, reserved
// fields must be zero, and the HMAC-SHA256 tag is verified before the frame
// is returned. Replay checks need state and live in replay.ts.

import { createHmac, timingSafeEqual } from "node:crypto";
import { deflateRawSync, inflateRawSync } from "node:zlib";
import { assert } from "../util/assert.ts";
import {
  ACK_STATUS,
  DATAGRAM_BYTES_MAX,
  DATAGRAM_BYTES_MIN,
  FLAG,
  FLAGS_KNOWN,
  FRAGMENT_PAYLOAD_BYTES_MAX,
  FRAGMENTS_PER_MESSAGE_MAX,
  HEADER_BYTES,
  MAGIC,
  MESSAGE_PAYLOAD_BYTES_MAX,
  MESSAGE_TYPE,
  PAYLOAD_BYTES,
  PROTOCOL_VERSION,
  REFUSE_BYTES_MAX,
  SENDER_OF,
  STARTUP_WITH_ID_BYTES,
  SEQUENCE_MAX,
  STORAGE_INFO_JSON_BYTES_MAX,
  TAG_BYTES,
  UNIT_NAME_BYTES_MAX,
  UNIT_NAME_PATTERN,
  messageTypeName,
  type AckPayload,
  type DecodeResult,
  type EnrolPayload,
  type Frame,
  type KeySelector,
  type RefusePayload,
  type FrameFields,
  type HeartbeatPayload,
  type MessageType,
  type RejectReason,
  type ShutdownReason,
  type StartupPayload,
  type StorageInfoMessage,
} from "./messages.ts";
import { validateStorageInfoMessage } from "./storage_info.ts";

// Header offsets (docs/protocol/discovery.md, "Header").
const OFFSET = {
  magic: 0,
  version: 4,
  type: 5,
  flags: 6,
  nameLength: 7,
  sessionId: 8,
  sequence: 16,
  messageId: 20,
  timestampMs: 24,
  fragmentIndex: 32,
  fragmentCount: 34,
  payloadLength: 36,
  reserved: 38,
} as const;

function invalid(reason: RejectReason, detail: string): DecodeResult {
  return { kind: "invalid", reason, detail };
}

function tagOf(key: Buffer, bytes: Uint8Array): Buffer {
  return createHmac("sha256", key).update(bytes).digest();
}

const SESSION_ID_PATTERN = /^[0-9a-f]{16}$/;

/** Encodes one datagram and signs it. Asserts on programmer errors (bad fields). */
/**
 * The unit name a datagram carries, read from its header without
 * authenticating it (only to route it to the agent that will), or undefined
 * if the header cannot hold one.
 */
export function peekUnitName(bytes: Buffer): string | undefined {
  if (bytes.length < HEADER_BYTES + 1) return undefined;
  const nameLength = bytes[7] ?? 0;
  if (nameLength < 1 || nameLength > UNIT_NAME_BYTES_MAX || bytes.length < HEADER_BYTES + nameLength) return undefined;
  return bytes.toString("latin1", HEADER_BYTES, HEADER_BYTES + nameLength);
}

export function encodeFrame(fields: FrameFields, key: Buffer): Buffer {
  const name = Buffer.from(fields.unitName, "ascii");
  assert(UNIT_NAME_PATTERN.test(fields.unitName) && name.length <= UNIT_NAME_BYTES_MAX, `unit name ${fields.unitName}`);
  assert(SESSION_ID_PATTERN.test(fields.sessionId), `session id ${fields.sessionId}`);
  assert(Number.isInteger(fields.sequence) && fields.sequence >= 1 && fields.sequence <= SEQUENCE_MAX, "sequence");
  assert(Number.isInteger(fields.messageId) && fields.messageId >= 1 && fields.messageId <= SEQUENCE_MAX, "message id");
  assert(Number.isSafeInteger(fields.timestampMs) && fields.timestampMs >= 0, "timestamp");
  assert(fields.fragmentCount >= 1 && fields.fragmentCount <= FRAGMENTS_PER_MESSAGE_MAX, "fragment count");
  assert(fields.fragmentIndex >= 0 && fields.fragmentIndex < fields.fragmentCount, "fragment index");
  assert(fields.payload.length <= FRAGMENT_PAYLOAD_BYTES_MAX, "fragment payload size");
  const bodyBytes = HEADER_BYTES + name.length + fields.payload.length;
  const out = Buffer.alloc(bodyBytes + TAG_BYTES);
  out.writeUInt32BE(MAGIC, OFFSET.magic);
  out.writeUInt8(PROTOCOL_VERSION, OFFSET.version);
  out.writeUInt8(fields.type, OFFSET.type);
  out.writeUInt8((fields.fromStation ? FLAG.FROM_STATION : 0) | (fields.unitKey === true ? FLAG.UNIT_KEY : 0), OFFSET.flags);
  out.writeUInt8(name.length, OFFSET.nameLength);
  out.write(fields.sessionId, OFFSET.sessionId, 8, "hex");
  out.writeUInt32BE(fields.sequence, OFFSET.sequence);
  out.writeUInt32BE(fields.messageId, OFFSET.messageId);
  out.writeBigUInt64BE(BigInt(fields.timestampMs), OFFSET.timestampMs);
  out.writeUInt16BE(fields.fragmentIndex, OFFSET.fragmentIndex);
  out.writeUInt16BE(fields.fragmentCount, OFFSET.fragmentCount);
  out.writeUInt16BE(fields.payload.length, OFFSET.payloadLength);
  out.writeUInt16BE(0, OFFSET.reserved);
  name.copy(out, HEADER_BYTES);
  out.set(fields.payload, HEADER_BYTES + name.length);
  tagOf(key, out.subarray(0, bodyBytes)).copy(out, bodyBytes);
  return out;
}

/**
 * Decodes and authenticates one datagram. Order: size bounds, magic, version,
 * structure (lengths, type, flags, reserved, fragments, name), then the tag.
 * Cheap structural checks come first so garbage costs no HMAC.
 */
export function decodeFrame(bytes: Uint8Array, keys: Buffer | KeySelector): DecodeResult {
  if (bytes.length > DATAGRAM_BYTES_MAX) return invalid("too_large", `datagram ${bytes.length} bytes > ${DATAGRAM_BYTES_MAX}`);
  if (bytes.length < DATAGRAM_BYTES_MIN) return invalid("truncated", `datagram ${bytes.length} bytes < ${DATAGRAM_BYTES_MIN}`);
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  const magic = view.readUInt32BE(OFFSET.magic);
  if (magic !== MAGIC) return invalid("bad_magic", `magic 0x${magic.toString(16)}`);
  const version = view.readUInt8(OFFSET.version);
  if (version !== PROTOCOL_VERSION) return invalid("bad_version", `version ${version}`);
  const nameLength = view.readUInt8(OFFSET.nameLength);
  if (nameLength < 1 || nameLength > UNIT_NAME_BYTES_MAX) return invalid("malformed", `unit name length ${nameLength}`);
  const payloadLength = view.readUInt16BE(OFFSET.payloadLength);
  if (payloadLength > FRAGMENT_PAYLOAD_BYTES_MAX) {
    return invalid("too_large", `payload length ${payloadLength} > ${FRAGMENT_PAYLOAD_BYTES_MAX}`);
  }
  const bodyBytes = HEADER_BYTES + nameLength + payloadLength;
  if (bytes.length < bodyBytes + TAG_BYTES) {
    return invalid("truncated", `datagram ${bytes.length} bytes < ${bodyBytes + TAG_BYTES} announced`);
  }
  if (bytes.length > bodyBytes + TAG_BYTES) {
    return invalid("malformed", `${bytes.length - bodyBytes - TAG_BYTES} trailing bytes`);
  }
  const type = view.readUInt8(OFFSET.type);
  const typeName = messageTypeName(type);
  if (typeName === undefined) return invalid("bad_type", `type ${type}`);
  const flags = view.readUInt8(OFFSET.flags);
  if ((flags & ~FLAGS_KNOWN) !== 0) return invalid("malformed", `reserved flag bits 0x${flags.toString(16)}`);
  const reserved = view.readUInt16BE(OFFSET.reserved);
  if (reserved !== 0) return invalid("malformed", `reserved field ${reserved}`);
  const fromStation = (flags & FLAG.FROM_STATION) !== 0;
  const sender = SENDER_OF[typeName];
  if ((sender === "unit" && fromStation) || (sender === "station" && !fromStation)) {
    return invalid("wrong_direction", `${typeName} with fromStation=${fromStation}`);
  }
  const fragmentIndex = view.readUInt16BE(OFFSET.fragmentIndex);
  const fragmentCount = view.readUInt16BE(OFFSET.fragmentCount);
  if (fragmentCount > FRAGMENTS_PER_MESSAGE_MAX) {
    return invalid("too_many_fragments", `fragment count ${fragmentCount} > ${FRAGMENTS_PER_MESSAGE_MAX}`);
  }
  if (fragmentCount < 1 || fragmentIndex >= fragmentCount) {
    return invalid("malformed", `fragment ${fragmentIndex} of ${fragmentCount}`);
  }
  if (typeName !== "STORAGE_INFO") {
    if (fragmentCount !== 1) return invalid("malformed", `${typeName} in ${fragmentCount} fragments`);
    const expected = PAYLOAD_BYTES[typeName];
    const fits =
      payloadLength === expected ||
      (typeName === "STARTUP" && payloadLength === STARTUP_WITH_ID_BYTES) ||
      (typeName === "REFUSE" && payloadLength >= expected && payloadLength <= REFUSE_BYTES_MAX);
    if (!fits) return invalid("malformed", `${typeName} payload ${payloadLength} bytes, expected ${expected}`);
  } else if (payloadLength === 0) {
    return invalid("malformed", "empty STORAGE_INFO fragment");
  }
  const sequence = view.readUInt32BE(OFFSET.sequence);
  const messageId = view.readUInt32BE(OFFSET.messageId);
  if (sequence === 0 || messageId === 0) return invalid("malformed", `sequence ${sequence} message id ${messageId}`);
  const timestamp = view.readBigUInt64BE(OFFSET.timestampMs);
  if (timestamp > BigInt(Number.MAX_SAFE_INTEGER)) return invalid("malformed", `timestamp ${timestamp}`);
  const unitName = view.toString("latin1", HEADER_BYTES, HEADER_BYTES + nameLength);
  if (!UNIT_NAME_PATTERN.test(unitName)) return invalid("malformed", `unit name ${JSON.stringify(unitName)}`);

  const unitKey = (flags & FLAG.UNIT_KEY) !== 0;
  const offered = Buffer.isBuffer(keys) ? [keys] : keys(unitName, unitKey);
  if (offered.length === 0) return invalid("unknown_unit", `no secret known for unit ${unitName}`);
  const presented = view.subarray(bodyBytes, bodyBytes + TAG_BYTES);
  let keyIndex = -1;
  // Every offered key is tried (at most two: a secret and its successor during a rotation).
  offered.forEach((key, index) => {
    if (timingSafeEqual(tagOf(key, view.subarray(0, bodyBytes)), presented) && keyIndex < 0) keyIndex = index;
  });
  if (keyIndex < 0) return invalid("bad_hmac", `tag mismatch unit=${unitName}${unitKey ? " (unit key)" : ""}`);
  const frame: Frame = {
    version,
    type: type as MessageType,
    typeName,
    fromStation,
    unitName,
    sessionId: view.toString("hex", OFFSET.sessionId, OFFSET.sessionId + 8),
    sequence,
    messageId,
    timestampMs: Number(timestamp),
    fragmentIndex,
    fragmentCount,
    // A copy: the caller may keep it (reassembly) after the socket reuses its buffer.
    payload: Buffer.from(view.subarray(HEADER_BYTES + nameLength, bodyBytes)),
    unitKey,
    keyIndex,
  };
  return { kind: "frame", frame };
}

// ---- Small payloads: fixed sizes, reserved bytes must be zero ----

export type PayloadResult<T> =
  | { readonly kind: "ok"; readonly value: T }
  | { readonly kind: "invalid"; readonly reason: RejectReason; readonly detail: string };

function zeroes(bytes: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (bytes[i] !== 0) return false;
  return true;
}

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function uuidBytes(uuid: string): Buffer {
  assert(UUID_PATTERN.test(uuid), `unit id ${uuid}`);
  return Buffer.from(uuid.replace(/-/g, ""), "hex");
}

function uuidText(bytes: Buffer): string {
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

/** 8 bytes (no identity, as units before issue 7) or 24 (the unit's UUID at 8..23). */
export function encodeStartup(payload: StartupPayload): Buffer {
  const out = Buffer.alloc(payload.unitId === undefined ? PAYLOAD_BYTES.STARTUP : STARTUP_WITH_ID_BYTES);
  out.writeUInt32BE(payload.generation, 0);
  if (payload.unitId !== undefined) uuidBytes(payload.unitId).copy(out, 8);
  return out;
}

export function decodeStartup(bytes: Buffer): PayloadResult<StartupPayload> {
  if ((bytes.length !== PAYLOAD_BYTES.STARTUP && bytes.length !== STARTUP_WITH_ID_BYTES) || !zeroes(bytes, 4, 8)) {
    return { kind: "invalid", reason: "bad_payload", detail: "STARTUP payload reserved bytes" };
  }
  const generation = bytes.readUInt32BE(0);
  if (bytes.length === PAYLOAD_BYTES.STARTUP) return { kind: "ok", value: { generation } };
  const unitId = uuidText(bytes.subarray(8, 24));
  if (zeroes(bytes, 8, 24)) return { kind: "invalid", reason: "bad_payload", detail: "STARTUP unit id is all zero" };
  return { kind: "ok", value: { generation, unitId } };
}

/** ENROL: u32 epoch, u32 reserved, 16 bytes unit id, 12 nonce, 32 sealed secret, 16 GCM tag. */
export function encodeEnrol(payload: EnrolPayload): Buffer {
  assert(payload.nonce.length === 12 && payload.sealed.length === 32 && payload.tag.length === 16, "enrol payload sizes");
  assert(Number.isInteger(payload.epoch) && payload.epoch >= 1 && payload.epoch <= SEQUENCE_MAX, "enrol epoch");
  const out = Buffer.alloc(PAYLOAD_BYTES.ENROL);
  out.writeUInt32BE(payload.epoch, 0);
  uuidBytes(payload.unitId).copy(out, 8);
  payload.nonce.copy(out, 24);
  payload.sealed.copy(out, 36);
  payload.tag.copy(out, 68);
  return out;
}

export function decodeEnrol(bytes: Buffer): PayloadResult<EnrolPayload> {
  if (bytes.length !== PAYLOAD_BYTES.ENROL || !zeroes(bytes, 4, 8)) {
    return { kind: "invalid", reason: "bad_payload", detail: "ENROL payload reserved bytes" };
  }
  const epoch = bytes.readUInt32BE(0);
  if (epoch === 0) return { kind: "invalid", reason: "bad_payload", detail: "ENROL epoch 0" };
  return {
    kind: "ok",
    value: {
      epoch,
      unitId: uuidText(bytes.subarray(8, 24)),
      nonce: Buffer.from(bytes.subarray(24, 36)),
      sealed: Buffer.from(bytes.subarray(36, 68)),
      tag: Buffer.from(bytes.subarray(68, 84)),
    },
  };
}

/** REFUSE: u8 code, 3 reserved bytes, then the reason as UTF-8 text (cut to fit). */
export function encodeRefuse(payload: RefusePayload): Buffer {
  let text = Buffer.from(payload.message, "utf8");
  if (text.length > REFUSE_BYTES_MAX - 4) text = text.subarray(0, REFUSE_BYTES_MAX - 4);
  const out = Buffer.alloc(4 + text.length);
  out.writeUInt8(payload.code, 0);
  text.copy(out, 4);
  return out;
}

export function decodeRefuse(bytes: Buffer): PayloadResult<RefusePayload> {
  if (bytes.length < PAYLOAD_BYTES.REFUSE || bytes.length > REFUSE_BYTES_MAX || !zeroes(bytes, 1, 4)) {
    return { kind: "invalid", reason: "bad_payload", detail: "REFUSE payload reserved bytes" };
  }
  // Control characters are replaced: the text is printed on the unit's terminal.
  const message = bytes.toString("utf8", 4).replace(/[\u0000-\u001f\u007f]/g, "?");
  return { kind: "ok", value: { code: bytes.readUInt8(0), message } };
}

export function encodeHeartbeat(payload: HeartbeatPayload): Buffer {
  const out = Buffer.alloc(PAYLOAD_BYTES.HEARTBEAT);
  out.writeUInt32BE(payload.generation, 0);
  return out;
}

export function decodeHeartbeat(bytes: Buffer): PayloadResult<HeartbeatPayload> {
  if (bytes.length !== PAYLOAD_BYTES.HEARTBEAT || !zeroes(bytes, 4, 8)) {
    return { kind: "invalid", reason: "bad_payload", detail: "HEARTBEAT payload reserved bytes" };
  }
  return { kind: "ok", value: { generation: bytes.readUInt32BE(0) } };
}

/** NEED_STORAGE_INFO carries the generation the station holds (0 = none). */
export function encodeNeedStorageInfo(knownGeneration: number): Buffer {
  const out = Buffer.alloc(PAYLOAD_BYTES.NEED_STORAGE_INFO);
  out.writeUInt32BE(knownGeneration, 0);
  return out;
}

export function decodeNeedStorageInfo(bytes: Buffer): PayloadResult<{ knownGeneration: number }> {
  if (bytes.length !== PAYLOAD_BYTES.NEED_STORAGE_INFO || !zeroes(bytes, 4, 8)) {
    return { kind: "invalid", reason: "bad_payload", detail: "NEED_STORAGE_INFO payload reserved bytes" };
  }
  return { kind: "ok", value: { knownGeneration: bytes.readUInt32BE(0) } };
}

export function encodeShutdown(reason: ShutdownReason): Buffer {
  const out = Buffer.alloc(PAYLOAD_BYTES.SHUTDOWN);
  out.writeUInt8(reason, 0);
  return out;
}

export function decodeShutdown(bytes: Buffer): PayloadResult<{ reason: ShutdownReason }> {
  const reason = bytes[0];
  if (bytes.length !== PAYLOAD_BYTES.SHUTDOWN || !zeroes(bytes, 1, 8) || (reason !== 0 && reason !== 1)) {
    return { kind: "invalid", reason: "bad_payload", detail: `SHUTDOWN payload reason ${reason}` };
  }
  return { kind: "ok", value: { reason } };
}

export function encodeAck(payload: AckPayload): Buffer {
  const out = Buffer.alloc(PAYLOAD_BYTES.ACK);
  out.writeUInt32BE(payload.ackedMessageId, 0);
  out.writeUInt8(payload.ackedType, 4);
  out.writeUInt8(payload.status, 5);
  out.writeUInt32BE(payload.heartbeatIntervalMs, 8);
  return out;
}

export function decodeAck(bytes: Buffer): PayloadResult<AckPayload> {
  if (bytes.length !== PAYLOAD_BYTES.ACK || !zeroes(bytes, 6, 8) || !zeroes(bytes, 12, 16)) {
    return { kind: "invalid", reason: "bad_payload", detail: "ACK payload reserved bytes" };
  }
  const ackedType = bytes.readUInt8(4);
  const status = bytes.readUInt8(5);
  if (messageTypeName(ackedType) === undefined || ackedType === MESSAGE_TYPE.ACK) {
    return { kind: "invalid", reason: "bad_payload", detail: `ACK of type ${ackedType}` };
  }
  if (status !== ACK_STATUS.OK) {
    return { kind: "invalid", reason: "bad_payload", detail: `ACK status ${status}` };
  }
  const ackedMessageId = bytes.readUInt32BE(0);
  if (ackedMessageId === 0) return { kind: "invalid", reason: "bad_payload", detail: "ACK of message id 0" };
  return {
    kind: "ok",
    value: {
      ackedMessageId,
      ackedType: ackedType as MessageType,
      status,
      heartbeatIntervalMs: bytes.readUInt32BE(8),
    },
  };
}

// ---- Storage info: deflate-raw(JSON), fragmented ----

/** Serialises and compresses a storage-info message; null if it exceeds the limits. */
export function encodeStorageInfo(message: StorageInfoMessage): Buffer | null {
  const json = Buffer.from(JSON.stringify({ v: 1, generation: message.generation, info: message.info }), "utf8");
  if (json.length > STORAGE_INFO_JSON_BYTES_MAX) return null;
  const compressed = deflateRawSync(json, { level: 6 });
  return compressed.length <= MESSAGE_PAYLOAD_BYTES_MAX ? compressed : null;
}

export function decodeStorageInfo(bytes: Buffer): PayloadResult<StorageInfoMessage> {
  if (bytes.length > MESSAGE_PAYLOAD_BYTES_MAX) {
    return { kind: "invalid", reason: "too_large", detail: `storage info ${bytes.length} bytes` };
  }
  let json: Buffer;
  try {
    json = inflateRawSync(bytes, { maxOutputLength: STORAGE_INFO_JSON_BYTES_MAX });
  } catch (error) {
    const tooLarge = error instanceof RangeError || (error as NodeJS.ErrnoException).code === "ERR_BUFFER_TOO_LARGE";
    return tooLarge
      ? { kind: "invalid", reason: "too_large", detail: `storage info inflates past ${STORAGE_INFO_JSON_BYTES_MAX} bytes` }
      : { kind: "invalid", reason: "bad_payload", detail: "storage info is not deflate-raw data" };
  }
  let value: unknown;
  try {
    value = JSON.parse(json.toString("utf8"));
  } catch {
    return { kind: "invalid", reason: "bad_payload", detail: "storage info is not JSON" };
  }
  const result = validateStorageInfoMessage(value);
  return result.kind === "ok" ? result : { kind: "invalid", reason: "bad_payload", detail: result.detail };
}

/** Splits a message payload into fragment payloads of at most FRAGMENT_PAYLOAD_BYTES_MAX. */
export function splitFragments(payload: Buffer): Buffer[] {
  assert(payload.length > 0 && payload.length <= MESSAGE_PAYLOAD_BYTES_MAX, `message payload ${payload.length} bytes`);
  const fragments: Buffer[] = [];
  for (let offset = 0; offset < payload.length; offset += FRAGMENT_PAYLOAD_BYTES_MAX) {
    fragments.push(payload.subarray(offset, Math.min(payload.length, offset + FRAGMENT_PAYLOAD_BYTES_MAX)));
  }
  return fragments;
}
