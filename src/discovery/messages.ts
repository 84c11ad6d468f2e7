// The discovery protocol's wire vocabulary: message types, flags, header
// layout, every named limit, the storage-info model and the reasons a
// datagram can be rejected. No I/O here; codec.ts turns bytes into these
// types and back. docs/protocol/discovery.md has the byte tables.

import { assert } from "../util/assert.ts";

/** "IPSD" in ASCII: first four bytes of every datagram. */
export const MAGIC = 0x49505344;
export const PROTOCOL_VERSION = 1;

export const MESSAGE_TYPE = {
  STARTUP: 1,
  NEED_STORAGE_INFO: 2,
  STORAGE_INFO: 3,
  ACK: 4,
  HEARTBEAT: 5,
  SHUTDOWN: 6,
  /** Station -> unit: the unit's own secret, sealed (first join under the cluster key, rotation under the old secret). */
  ENROL: 7,
  /** Station -> unit: why its datagrams are refused (a name enrolled with another identity, ...). */
  REFUSE: 8,
} as const;
export type MessageTypeName = keyof typeof MESSAGE_TYPE;
export type MessageType = (typeof MESSAGE_TYPE)[MessageTypeName];

const TYPE_NAMES: Readonly<Record<number, MessageTypeName>> = Object.fromEntries(
  Object.entries(MESSAGE_TYPE).map(([name, value]) => [value, name as MessageTypeName]),
);
export function messageTypeName(type: number): MessageTypeName | undefined {
  return TYPE_NAMES[type];
}

/** Header flag bits; every other bit is reserved and must be zero. */
export const FLAG = {
  /** Set on datagrams the station sends, clear on datagrams a unit sends. */
  FROM_STATION: 0x01,
  /**
   * The tag is made with the packet key of the named unit's own secret
   * (issue 7), not the cluster key's.
   */
  UNIT_KEY: 0x02,
} as const;
export const FLAGS_KNOWN = FLAG.FROM_STATION | FLAG.UNIT_KEY;

/** Which side may send each type (a unit never sends NEED_STORAGE_INFO, ...). */
export const SENDER_OF: Readonly<Record<MessageTypeName, "unit" | "station" | "both">> = {
  STARTUP: "unit",
  NEED_STORAGE_INFO: "station",
  STORAGE_INFO: "unit",
  ACK: "both",
  HEARTBEAT: "unit",
  SHUTDOWN: "unit",
  ENROL: "station",
  REFUSE: "station",
};

// ---- Layout and limits (checked against each other at load, below) ----

/** Fixed header before the unit name (see the byte table in docs/protocol/discovery.md). */
export const HEADER_BYTES = 40;
/** HMAC-SHA256 tag at the end of every datagram. */
export const TAG_BYTES = 32;
export const UNIT_NAME_BYTES_MAX = 63;
/** Unit names: the same rule as volume names (contracts.md). */
export const UNIT_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** Stays under the IPv6 minimum MTU (1280) minus IP/UDP headers: no IP fragmentation. */
export const DATAGRAM_BYTES_MAX = 1200;
export const DATAGRAM_BYTES_MIN = HEADER_BYTES + 1 + TAG_BYTES;
/** Payload bytes carried by one fragment. */
export const FRAGMENT_PAYLOAD_BYTES_MAX = 1024;
export const FRAGMENTS_PER_MESSAGE_MAX = 128;
/** A reassembled (compressed) message: 128 KiB. */
export const MESSAGE_PAYLOAD_BYTES_MAX = FRAGMENT_PAYLOAD_BYTES_MAX * FRAGMENTS_PER_MESSAGE_MAX;
/** The storage-info JSON after inflating: 1 MiB (a decompression bomb stops here). */
export const STORAGE_INFO_JSON_BYTES_MAX = 1024 * 1024;

/** Fixed payload sizes of the small messages. */
export const PAYLOAD_BYTES = {
  STARTUP: 8,
  NEED_STORAGE_INFO: 8,
  ACK: 16,
  HEARTBEAT: 8,
  SHUTDOWN: 8,
  ENROL: 84,
  /** The shortest REFUSE (code and reserved bytes, no text); REFUSE_BYTES_MAX the longest. */
  REFUSE: 4,
} as const;
/** A STARTUP that carries the unit's identity (UUID) after the generation: 8 + 16 bytes. */
export const STARTUP_WITH_ID_BYTES = 24;
/** REFUSE: 4 bytes then at most this much UTF-8 text in all. */
export const REFUSE_BYTES_MAX = 4 + 400;
/** REFUSE codes. */
export const REFUSE_CODE = {
  /** The name is enrolled with another identity (UUID). */
  IMPOSTOR: 1,
  /** The name is enrolled: datagrams signed with the cluster key alone are not accepted for it. */
  UNIT_KEY_REQUIRED: 2,
} as const;
export type RefuseCode = (typeof REFUSE_CODE)[keyof typeof REFUSE_CODE];

// Storage-info content limits.
export const VOLUMES_PER_UNIT_MAX = 4096;
export const EXTENTS_PER_VOLUME_MAX = 1024;
export const EXTENTS_PER_UNIT_MAX = 65_536;
export const FREE_EXTENTS_MAX = 4096;
export const PARTITIONS_PER_VOLUME_MAX = 128;
export const GRANTS_PER_VOLUME_MAX = 64;
export const GRANT_CHARS_MAX = 64;
export const HOST_CHARS_MAX = 253;
export const PARTITION_NAME_CHARS_MAX = 80;

// Replay protection.
/** Sequence numbers accepted behind the highest one seen in a session. */
export const REPLAY_WINDOW = 1024;
/** A datagram's timestamp may differ from the receiver's clock by at most this. */
export const TIMESTAMP_SKEW_MS_MAX = 30_000;
/** A session's sequence numbers and message ids are u32; a sender renews its session before they wrap. */
export const SEQUENCE_MAX = 0xffff_ffff;

// Reassembly.
export const REASSEMBLY_MESSAGES_PER_SENDER_MAX = 2;
export const REASSEMBLY_BYTES_TOTAL_MAX = 32 * 1024 * 1024;
export const REASSEMBLY_TIMEOUT_MS = 10_000;

/** Units a station tracks at most (only authenticated datagrams create state). */
export const UNITS_MAX = 20_000;

assert(
  HEADER_BYTES + UNIT_NAME_BYTES_MAX + FRAGMENT_PAYLOAD_BYTES_MAX + TAG_BYTES <= DATAGRAM_BYTES_MAX,
  "largest fragment fits in one datagram",
);
assert(REASSEMBLY_BYTES_TOTAL_MAX >= REASSEMBLY_MESSAGES_PER_SENDER_MAX * MESSAGE_PAYLOAD_BYTES_MAX, "reassembly holds a sender");
assert(FRAGMENTS_PER_MESSAGE_MAX <= 0xffff, "fragment count fits u16");
assert(VOLUMES_PER_UNIT_MAX <= EXTENTS_PER_UNIT_MAX, "one extent per volume fits");

// ---- Frames ----

/** One authenticated datagram, decoded. `payload` is this fragment's bytes. */
export interface Frame {
  readonly version: number;
  readonly type: MessageType;
  readonly typeName: MessageTypeName;
  readonly fromStation: boolean;
  /** The sending unit, or for station datagrams the unit they are addressed to. */
  readonly unitName: string;
  /** Random per sender incarnation (u64, as 16 hex digits). */
  readonly sessionId: string;
  /** Per datagram, strictly increasing within a session: the replay nonce. */
  readonly sequence: number;
  /** Per logical message: retransmissions and fragments share it. */
  readonly messageId: number;
  readonly timestampMs: number;
  readonly fragmentIndex: number;
  readonly fragmentCount: number;
  readonly payload: Buffer;
  /** Signed with the named unit's own secret (FLAG.UNIT_KEY) rather than the cluster key. */
  readonly unitKey: boolean;
  /** Which of the keys the receiver offered verified the tag (0: the first). */
  readonly keyIndex: number;
}

export type FrameFields = Omit<Frame, "version" | "typeName" | "payload" | "unitKey" | "keyIndex"> & {
  readonly payload: Uint8Array;
  readonly unitKey?: boolean;
};

/**
 * The keys a receiver offers for a datagram, chosen from its header before
 * the tag is checked: the cluster packet key, or (UNIT_KEY set) the packet
 * keys of that unit's secret(s). Empty: no key for it (`unknown_unit`).
 */
export type KeySelector = (unitName: string, unitKey: boolean) => readonly Buffer[];

/** Why a datagram was rejected; each has a counter. */
export const REJECT_REASONS = [
  "too_large",
  "truncated",
  "bad_magic",
  "bad_version",
  "bad_type",
  "bad_hmac",
  "malformed",
  "wrong_direction",
  "wrong_unit",
  "too_many_fragments",
  "clock_skew",
  "replay",
  "bad_payload",
  "reassembly_full",
  "reassembly_timeout",
  "too_many_units",
  "bad_community",
  "bad_trap",
  /** A datagram in the name of an enrolled unit signed with the cluster key only. */
  "unit_key_required",
  /** A STARTUP claiming an enrolled name with another identity. */
  "impostor",
  /** UNIT_KEY set for a name the receiver holds no unit secret for. */
  "unknown_unit",
] as const;
export type RejectReason = (typeof REJECT_REASONS)[number];

export type DecodeResult =
  | { readonly kind: "frame"; readonly frame: Frame }
  | { readonly kind: "invalid"; readonly reason: RejectReason; readonly detail: string };

// ---- Small payloads ----

/** ACK status byte: only OK is defined in version 1; other values are reserved. */
export const ACK_STATUS = {
  OK: 0,
} as const;
export type AckStatus = (typeof ACK_STATUS)[keyof typeof ACK_STATUS];

export interface AckPayload {
  readonly ackedMessageId: number;
  readonly ackedType: MessageType;
  readonly status: AckStatus;
  /** The station's heartbeat interval for its units (0 = unchanged). */
  readonly heartbeatIntervalMs: number;
}

export interface HeartbeatPayload {
  /** Generation of the unit's latest storage info; the station asks again if it holds another. */
  readonly generation: number;
}

export interface StartupPayload {
  readonly generation: number;
  /** The unit's identity (lowercase UUID); absent from units older than issue 7 (8-byte STARTUP). */
  readonly unitId?: string;
}

export interface EnrolPayload {
  /** The secret's epoch: 1 at first join, +1 per rotation. */
  readonly epoch: number;
  readonly unitId: string;
  /** AES-256-GCM nonce, sealed secret and tag (keys.ts sealUnitSecret). */
  readonly nonce: Buffer;
  readonly sealed: Buffer;
  readonly tag: Buffer;
}

export interface RefusePayload {
  readonly code: number;
  readonly message: string;
}

export const SHUTDOWN_REASON = { STOP: 0, RESTART: 1 } as const;
export type ShutdownReason = (typeof SHUTDOWN_REASON)[keyof typeof SHUTDOWN_REASON];

// ---- Storage info (seed Fig. 3 "unit (n) storage info", Fig. 5) ----

export interface HostPort {
  readonly host: string;
  readonly port: number;
}

export interface LbaExtent {
  readonly startLba: number;
  readonly lengthLba: number;
  /** Inclusive: startLba + lengthLba - 1, as the seed reports it. */
  readonly endLba: number;
}

export interface PartitionInfo extends LbaExtent {
  /** 1-based. */
  readonly index: number;
  /** Export name, "VOLUME/pN". */
  readonly name: string;
  readonly sizeBytes: number;
}

export interface VolumeInfo {
  readonly name: string;
  readonly number: number;
  readonly sizeBytes: number;
  /** Absolute LBAs on the unit's storage. */
  readonly extents: readonly LbaExtent[];
  /** LBAs relative to the volume. */
  readonly partitions: readonly PartitionInfo[];
  /** Host addresses or CIDRs admitted to this volume. */
  readonly grants: readonly string[];
}

export interface StorageInfo {
  readonly name: string;
  readonly dnsName: string | null;
  readonly nbd: HostPort;
  readonly control: HostPort | null;
  readonly sectorSize: number;
  readonly capacityBytes: number;
  readonly freeBytes: number;
  readonly freeExtents: readonly LbaExtent[];
  readonly volumes: readonly VolumeInfo[];
  /**
   * `ipsan unit --spare`: kept out of ordinary allocation, takes replacement
   * legs. Absent in older packets (= not spare).
   */
  readonly spare?: boolean;
  /** `ipsan unit --zone NAME`: the unit's failure domain. Absent in older packets (= no zone). */
  readonly zone?: string | null;
  /**
   * The unit's NBD TLS mode (`ipsan unit --tls`): "require" answers nothing
   * but STARTTLS in plaintext; "off" serves plaintext only. Absent in older
   * answers (= unknown).
   */
  readonly tls?: NbdTlsMode;
  /**
   * The unit's volume-table generation when the report was taken: it rises
   * with every change of the table and survives restarts (the table keeps it).
   * The station drops a report older than a generation it has already seen,
   * so a report in flight never undoes a change the station made and stored.
   * Absent in older reports (= unknown: applied as before).
   */
  readonly tableGeneration?: number;
  /**
   * The unit's iSCSI portal (`ipsan unit --iscsi HOST:PORT`; GET /v1/info
   * `iscsi: {"portal": "HOST:PORT"} | null`): null when it serves no iSCSI.
   * Absent in discovery packets and older answers (= unknown: keep what the
   * station knew).
   */
  readonly iscsi?: HostPort | null;
}

/** Every answer of a unit's control API carries its volume-table generation after the request (docs/unit.md). */
export const TABLE_GENERATION_HEADER = "Ipsan-Table-Generation";

export type NbdTlsMode = "off" | "on" | "require";
export const NBD_TLS_MODES: readonly NbdTlsMode[] = ["off", "on", "require"];

/**
 * A grant by host identity as the station keeps it among a volume's grants
 * (the unit reports it in `access`: {host, export, from}): "id:HOST@EXPORT",
 * with "<CIDR,CIDR" appended when the host must also come from there, and
 * "#IQN" when only that iSCSI initiator is admitted.
 * Address grants stay plain addresses or CIDRs.
 */
export function identityGrant(host: string, exportName: string, from: readonly string[] = [], iqn?: string): string {
  return `id:${host}@${exportName}${from.length === 0 ? "" : `<${[...from].sort().join(",")}`}${iqn === undefined ? "" : `#${iqn}`}`;
}

/** The parts of an identity grant string; `iqn` (after "#": iSCSI names have no "#") only when the grant names an initiator. */
export function parseIdentityGrant(grant: string): { host: string; export: string; from: string[]; iqn?: string } | undefined {
  const match = /^id:([^@]+)@([^<#]+)(?:<([^#]+))?(?:#(.+))?$/.exec(grant);
  if (match === null || match[1] === undefined || match[2] === undefined) return undefined;
  return { host: match[1], export: match[2], from: match[3] === undefined ? [] : match[3].split(","), ...(match[4] === undefined ? {} : { iqn: match[4] }) };
}

/** A zone label (`--zone`): what a unit name may be. */
export const ZONE_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** What a STORAGE_INFO message carries: the unit's report plus its generation. */
export interface StorageInfoMessage {
  readonly generation: number;
  readonly info: StorageInfo;
}
