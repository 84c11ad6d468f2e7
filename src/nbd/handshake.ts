// Fixed newstyle option negotiation (nbdkit's protocol-handshake-newstyle.c):
// one option in, the replies to send and what happens next out. It never
// touches the socket; the session writes the replies and changes state.

import type { BlockCapabilities, BlockDevice, ExportProvider, Peer } from "../block/types.ts";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { decodeWireString } from "./decoded.ts";
import {
  type OptionFrame,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextData,
  encodeOptionReply,
  encodeServerData,
  parseInfoRequest,
  parseMetaContextRequest,
  utf8Bounded,
} from "./handshake_codec.ts";
import type { TlsMode } from "./tls.ts";
import { BLOCK_SIZE_MIN_BYTES, BLOCK_SIZE_PREFERRED_BYTES, type NbdLimits } from "./limits.ts";
import { BASE_ALLOCATION, NBD_INFO, NBD_OPT, NBD_REP, type NbdRepError, NBD_TFLAG, WIRE } from "./protocol.ts";

const log = logger("nbd");

/** The metadata context id of base:allocation after NBD_OPT_SET_META_CONTEXT. */
export const BASE_ALLOCATION_CONTEXT_ID = 1;

/** What the client has negotiated so far on one connection. */
export interface Negotiation {
  noZeroes: boolean;
  structuredReplies: boolean;
  /** The last NBD_OPT_SET_META_CONTEXT: the export it named and whether base:allocation was selected. */
  metaContext: { readonly exportName: string; readonly allocation: boolean } | undefined;
  optionsSeen: number;
  /** NBD_OPT_STARTTLS succeeded: everything from here on is over TLS. */
  tls: boolean;
}

/** An export the client has entered transmission with. */
export interface OpenedExport {
  readonly device: BlockDevice;
  readonly name: string;
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  /** Set when base:allocation was selected for this export. */
  readonly metaContextId: number | undefined;
  /** The client asked for NBD_INFO_BLOCK_SIZE on NBD_OPT_GO, so it promised to keep to 512-byte alignment. */
  readonly alignmentAgreed: boolean;
}

export type OptionOutcome =
  /** Send the replies and wait for the next option. */
  | { readonly kind: "continue"; readonly replies: readonly Buffer[] }
  /** Send the replies and enter transmission. */
  | { readonly kind: "transmission"; readonly replies: readonly Buffer[]; readonly opened: OpenedExport }
  /** Send the replies, then close the connection (NBD_OPT_ABORT, or a limit). */
  | { readonly kind: "close"; readonly replies: readonly Buffer[]; readonly reason: string }
  /** Send the ACK, then a TLS server handshake on the same connection; options go on over TLS. */
  | { readonly kind: "starttls"; readonly replies: readonly Buffer[] }
  /** Close at once without a reply (NBD_OPT_EXPORT_NAME that cannot be served). */
  | { readonly kind: "drop"; readonly reason: string };

export interface HandshakeContext {
  readonly provider: ExportProvider;
  readonly peer: Peer;
  readonly peerText: string;
  readonly limits: NbdLimits;
  readonly negotiation: Negotiation;
  readonly shuttingDown: boolean;
  /** The server's TLS mode (off: NBD_OPT_STARTTLS is not supported). */
  readonly tls: TlsMode;
}

export function transmissionFlags(capabilities: BlockCapabilities, structuredReplies: boolean): number {
  let flags: number = NBD_TFLAG.HAS_FLAGS;
  if (capabilities.readOnly) flags |= NBD_TFLAG.READ_ONLY;
  if (capabilities.canFlush) flags |= NBD_TFLAG.SEND_FLUSH;
  if (capabilities.canFua) flags |= NBD_TFLAG.SEND_FUA;
  if (!capabilities.readOnly && capabilities.canTrim) flags |= NBD_TFLAG.SEND_TRIM;
  if (!capabilities.readOnly && capabilities.canZero) {
    flags |= NBD_TFLAG.SEND_WRITE_ZEROES;
    if (capabilities.canFastZero) flags |= NBD_TFLAG.SEND_FAST_ZERO;
  }
  if (structuredReplies) flags |= NBD_TFLAG.SEND_DF;
  if (capabilities.canMultiConn) flags |= NBD_TFLAG.CAN_MULTI_CONN;
  if (capabilities.canCache) flags |= NBD_TFLAG.SEND_CACHE;
  return flags;
}

function errorReply(option: number, type: NbdRepError, message: string): Buffer {
  return encodeOptionReply(option, type, utf8Bounded(message));
}

function ack(option: number): Buffer {
  return encodeOptionReply(option, NBD_REP.ACK);
}

/** Maps a provider's open() failure to an option error reply type (the one place for the handshake). */
function openErrorType(error: unknown): NbdRepError {
  if (!(error instanceof IpsanError)) return NBD_REP.ERR_UNKNOWN;
  switch (error.code) {
    case "NOT_FOUND":
      return NBD_REP.ERR_UNKNOWN;
    case "PERMISSION_DENIED":
    case "UNAUTHENTICATED":
    case "READ_ONLY":
      return NBD_REP.ERR_POLICY;
    case "SHUTTING_DOWN":
      return NBD_REP.ERR_SHUTDOWN;
    case "INVALID_ARGUMENT":
      return NBD_REP.ERR_INVALID;
    default:
      return NBD_REP.ERR_UNKNOWN;
  }
}

type OpenResult = { readonly kind: "ok"; readonly device: BlockDevice } | { readonly kind: "error"; readonly type: NbdRepError; readonly message: string };

async function openExport(ctx: HandshakeContext, requestedName: string): Promise<OpenResult> {
  const name = requestedName === "" ? ctx.provider.defaultExport : requestedName;
  if (name === undefined) return { kind: "error", type: NBD_REP.ERR_UNKNOWN, message: "no default export: name one" };
  try {
    const device = await ctx.provider.open(name, ctx.peer);
    if (!Number.isSafeInteger(device.sizeBytes) || device.sizeBytes < 0) {
      await device.close();
      throw new Error(`export ${name} has an invalid size ${device.sizeBytes}`);
    }
    return { kind: "ok", device };
  } catch (error) {
    const type = openErrorType(error);
    const expected = error instanceof IpsanError && type !== NBD_REP.ERR_UNKNOWN ? "refused" : "failed";
    log.limited(`open_${expected}`, `open ${expected}`, { peer: ctx.peerText, export: name, error: errorMessage(error) });
    const message = error instanceof IpsanError ? error.message : `cannot open export ${name}`;
    return { kind: "error", type, message };
  }
}

/** Handles one option request (the client sends the next only after the final reply). */
export async function negotiateOption(ctx: HandshakeContext, frame: OptionFrame): Promise<OptionOutcome> {
  const { option, data } = frame;
  const negotiation = ctx.negotiation;
  negotiation.optionsSeen += 1;
  if (negotiation.optionsSeen > ctx.limits.optionsMax) {
    const message = `too many options: over ${ctx.limits.optionsMax}`;
    if (option === NBD_OPT.EXPORT_NAME) return { kind: "drop", reason: message };
    return { kind: "close", replies: [errorReply(option, NBD_REP.ERR_TOO_BIG, message)], reason: message };
  }
  if (ctx.shuttingDown && option !== NBD_OPT.ABORT) {
    if (option === NBD_OPT.EXPORT_NAME) return { kind: "drop", reason: "server shutting down" };
    return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_SHUTDOWN, "server shutting down")] };
  }
  if (option === NBD_OPT.STARTTLS) return startTls(ctx, data);
  if (ctx.tls === "require" && !negotiation.tls && option !== NBD_OPT.ABORT) {
    // doc/proto.md: before TLS, a server that requires it answers every option with NBD_REP_ERR_TLS_REQD.
    if (option === NBD_OPT.EXPORT_NAME) return { kind: "drop", reason: "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS: TLS is required" };
    return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_TLS_REQD, "TLS is required: negotiate NBD_OPT_STARTTLS first")] };
  }
  switch (option) {
    case NBD_OPT.EXPORT_NAME:
      return exportName(ctx, data);
    case NBD_OPT.ABORT:
      return { kind: "close", replies: [ack(option)], reason: "client sent NBD_OPT_ABORT" };
    case NBD_OPT.LIST:
      return list(ctx, option, data);
    case NBD_OPT.INFO:
    case NBD_OPT.GO:
      return infoOrGo(ctx, option, data);
    case NBD_OPT.STRUCTURED_REPLY:
      if (data.length !== 0) {
        return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")] };
      }
      if (negotiation.structuredReplies) {
        return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, "structured replies already negotiated")] };
      }
      negotiation.structuredReplies = true;
      return { kind: "continue", replies: [ack(option)] };
    case NBD_OPT.LIST_META_CONTEXT:
    case NBD_OPT.SET_META_CONTEXT:
      return metaContext(ctx, option, data);
    default:
      return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_UNSUP, `option ${option} is not supported`)] };
  }
}

function startTls(ctx: HandshakeContext, data: Buffer): OptionOutcome {
  const option = NBD_OPT.STARTTLS;
  if (ctx.tls === "off") return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_UNSUP, "TLS is not enabled on this server")] };
  if (ctx.negotiation.tls) return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, "TLS is already negotiated")] };
  if (data.length !== 0) return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")] };
  return { kind: "starttls", replies: [ack(option)] };
}

async function exportName(ctx: HandshakeContext, data: Buffer): Promise<OptionOutcome> {
  if (data.length > WIRE.STRING_BYTES_MAX) return { kind: "drop", reason: `export name of ${data.length} bytes` };
  const name = decodeWireString(data);
  if (name === undefined) return { kind: "drop", reason: "export name not UTF-8 or contains NUL" };
  const opened = await openExport(ctx, name);
  if (opened.kind === "error") return { kind: "drop", reason: `NBD_OPT_EXPORT_NAME ${JSON.stringify(name)}: ${opened.message}` };
  const { device } = opened;
  // Without structured replies (they need NBD_OPT_GO's clients) and without an agreed block size.
  const negotiation = ctx.negotiation;
  const flags = transmissionFlags(device.capabilities, negotiation.structuredReplies);
  return {
    kind: "transmission",
    replies: [encodeExportNameReply(device.sizeBytes, flags, negotiation.noZeroes)],
    opened: openedExport(ctx, device, name, flags, false),
  };
}

function openedExport(ctx: HandshakeContext, device: BlockDevice, requestedName: string, flags: number, alignmentAgreed: boolean): OpenedExport {
  const negotiation = ctx.negotiation;
  const meta = negotiation.metaContext;
  const metaSelected = negotiation.structuredReplies && meta !== undefined && meta.allocation && meta.exportName === requestedName;
  return {
    device,
    name: device.name,
    sizeBytes: device.sizeBytes,
    transmissionFlags: flags,
    structuredReplies: negotiation.structuredReplies,
    metaContextId: metaSelected ? BASE_ALLOCATION_CONTEXT_ID : undefined,
    alignmentAgreed,
  };
}

function list(ctx: HandshakeContext, option: number, data: Buffer): OptionOutcome {
  if (data.length !== 0) {
    return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, "NBD_OPT_LIST takes no data")] };
  }
  const replies: Buffer[] = [];
  for (const entry of ctx.provider.list(ctx.peer)) {
    replies.push(encodeOptionReply(option, NBD_REP.SERVER, encodeServerData(entry.name, entry.description)));
  }
  replies.push(ack(option));
  return { kind: "continue", replies };
}

async function infoOrGo(ctx: HandshakeContext, option: number, data: Buffer): Promise<OptionOutcome> {
  const parsed = parseInfoRequest(data);
  if (parsed.kind === "invalid") {
    return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, parsed.reason)] };
  }
  const request = parsed.value;
  const opened = await openExport(ctx, request.name);
  if (opened.kind === "error") return { kind: "continue", replies: [errorReply(option, opened.type, opened.message)] };
  const { device } = opened;
  const flags = transmissionFlags(device.capabilities, ctx.negotiation.structuredReplies);
  const replies: Buffer[] = [
    encodeOptionReply(option, NBD_REP.INFO, encodeInfoExport(device.sizeBytes, flags)),
    // Sent even when not asked: clients ignore info they did not request.
    encodeOptionReply(
      option,
      NBD_REP.INFO,
      encodeInfoBlockSize({
        minimumBytes: BLOCK_SIZE_MIN_BYTES,
        preferredBytes: BLOCK_SIZE_PREFERRED_BYTES,
        maximumBytes: ctx.limits.payloadBytesMax,
      }),
    ),
  ];
  if (request.infos.includes(NBD_INFO.NAME)) {
    replies.push(encodeOptionReply(option, NBD_REP.INFO, encodeInfoString(NBD_INFO.NAME, device.name)));
  }
  if (request.infos.includes(NBD_INFO.DESCRIPTION) && device.description !== "") {
    replies.push(encodeOptionReply(option, NBD_REP.INFO, encodeInfoString(NBD_INFO.DESCRIPTION, device.description)));
  }
  replies.push(ack(option));
  if (option === NBD_OPT.INFO) {
    await device.close();
    return { kind: "continue", replies };
  }
  const alignmentAgreed = request.infos.includes(NBD_INFO.BLOCK_SIZE);
  return { kind: "transmission", replies, opened: openedExport(ctx, device, request.name, flags, alignmentAgreed) };
}

/** Contexts a query names: "base:allocation" itself, and (for LIST only) the "base:" wildcard. */
function contextsFor(query: string, listing: boolean): readonly string[] {
  if (query === BASE_ALLOCATION) return [BASE_ALLOCATION];
  if (listing && query === "base:") return [BASE_ALLOCATION];
  return [];
}

function metaContext(ctx: HandshakeContext, option: number, data: Buffer): OptionOutcome {
  const negotiation = ctx.negotiation;
  const setting = option === NBD_OPT.SET_META_CONTEXT;
  // SET replaces the previous selection even when it fails.
  if (setting) negotiation.metaContext = undefined;
  if (!negotiation.structuredReplies) {
    return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")] };
  }
  const parsed = parseMetaContextRequest(data, ctx.limits.metaContextQueriesMax);
  if (parsed.kind === "invalid") {
    return { kind: "continue", replies: [errorReply(option, NBD_REP.ERR_INVALID, parsed.reason)] };
  }
  const { name, queries } = parsed.value;
  const found = new Set<string>();
  if (queries.length === 0 && !setting) found.add(BASE_ALLOCATION);
  for (const query of queries) for (const context of contextsFor(query, !setting)) found.add(context);
  const replies: Buffer[] = [];
  for (const context of found) {
    const contextId = setting ? BASE_ALLOCATION_CONTEXT_ID : 0;
    replies.push(encodeOptionReply(option, NBD_REP.META_CONTEXT, encodeMetaContextData(contextId, context)));
  }
  if (setting) negotiation.metaContext = { exportName: name, allocation: found.has(BASE_ALLOCATION) };
  replies.push(ack(option));
  return { kind: "continue", replies };
}
