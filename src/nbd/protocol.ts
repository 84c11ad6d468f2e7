// NBD wire constants, and nothing else (nbdkit's common/protocol/nbd-protocol.h).
// Values and names follow doc/proto.md of github.com/NetworkBlockDevice/nbd.
// Byte layouts of every message ipsan sends or accepts: docs/protocol/nbd.md.

/** ASCII "NBDMAGIC": first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** ASCII "IHAVEOPT": the newstyle magic, and the magic of every option request. */
export const NBD_OPTION_MAGIC = 0x49484156454f5054n;
/** Magic of every option reply. */
export const NBD_REPLY_OPTION_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server, 16 bits). */
export const NBD_FLAG = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Client flags (32 bits). Any other bit set: the server must drop the connection. */
export const NBD_FLAG_C = {
  FIXED_NEWSTYLE: 1 << 0,
  NO_ZEROES: 1 << 1,
} as const;

/** Transmission flags (16 bits). */
export const NBD_TFLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

/** Option types. */
export const NBD_OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

/** Option reply types; errors have bit 31 set. */
export const NBD_REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
} as const;
export type NbdRepError = Exclude<(typeof NBD_REP)[keyof typeof NBD_REP], 1 | 2 | 3 | 4>;

/** Information types in NBD_REP_INFO replies and NBD_OPT_INFO/GO requests. */
export const NBD_INFO = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Request (command) types. */
export const NBD_CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
export type NbdCmd = (typeof NBD_CMD)[keyof typeof NBD_CMD];

/** Command flags (16 bits). */
export const NBD_CMD_FLAG = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

/** Structured reply chunk flags. */
export const NBD_REPLY_FLAG = {
  DONE: 1 << 0,
} as const;

/** Structured reply chunk types; error chunks have bit 15 set. */
export const NBD_REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
} as const;

/** base:allocation status flags. */
export const NBD_STATE = {
  HOLE: 1 << 0,
  ZERO: 1 << 1,
} as const;

/** The one metadata context ipsan serves. */
export const BASE_ALLOCATION = "base:allocation";

/** Fixed sizes of wire headers, in bytes. */
export const WIRE = {
  /** NBDMAGIC + IHAVEOPT + 16-bit handshake flags. */
  GREETING_BYTES: 18,
  CLIENT_FLAGS_BYTES: 4,
  /** IHAVEOPT + option + length. */
  OPTION_HEADER_BYTES: 16,
  /** reply magic + option + reply type + length. */
  OPTION_REPLY_HEADER_BYTES: 20,
  /** size + transmission flags (+ 124 zero bytes without NO_ZEROES). */
  EXPORT_NAME_REPLY_BYTES: 10,
  EXPORT_NAME_REPLY_ZEROES_BYTES: 124,
  REQUEST_HEADER_BYTES: 28,
  SIMPLE_REPLY_HEADER_BYTES: 16,
  STRUCTURED_REPLY_HEADER_BYTES: 20,
  /** Longest string the protocol allows (export names, messages, queries). */
  STRING_BYTES_MAX: 4096,
} as const;
