// An NBD client for the host's mirror engine (one per leg): fixed newstyle
// handshake, NBD_OPT_GO, then pipelined requests matched to replies by
// cookie. It speaks what ipsan's units (and nbdkit, qemu-nbd) serve:
// simple replies, so a READ's data follows its reply header and the length
// is the one asked for. Every request has a deadline; a connection that
// breaks, sends something invalid or misses a deadline fails every request
// in flight with the reason and is closed (the engine then marks the leg
// failed). Bounded: at most `inFlightMax` requests queued on the socket, the
// rest wait in order.
//
// blockStatus() (NBD_CMD_BLOCK_STATUS, base:allocation) goes over a second
// connection of its own, opened on first use with structured replies and the
// metadata context negotiated, so the data connection stays simple replies
// only. The engine asks it which regions of a leg were never written (a full
// rebuild skips them).

import { readFileSync, statSync } from "node:fs";
import * as net from "node:net";
import * as tls from "node:tls";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { ByteQueue } from "./byte_queue.ts";
import { decodeGreeting, decodeOptionReply, decodeTransmissionReply, encodeClientFlags, encodeInfoRequestData, encodeMetaContextRequestData, encodeOption, encodeRequest } from "./peer_codec.ts";
import { type NbdClientTls, PSK_CIPHERS, parsePskFile } from "./tls.ts";
import { BASE_ALLOCATION, NBD_CMD, NBD_CMD_FLAG, NBD_FLAG, NBD_FLAG_C, NBD_INFO, NBD_OPT, NBD_REP, NBD_REPLY_FLAG, NBD_REPLY_TYPE, NBD_STATE, NBD_TFLAG, WIRE } from "./protocol.ts";

/**
 * `localAddress`: the TCP connection's source address (a test speaking as a given host, e.g. 127.0.0.2).
 * `tls`: STARTTLS then TLS-PSK with this identity and key (from an nbds:// URI; options.tls wins).
 */
export type NbdTarget =
  | { readonly host: string; readonly port: number; readonly exportName: string; readonly localAddress?: string; readonly tls?: NbdClientTls }
  | { readonly path: string; readonly exportName: string; readonly tls?: NbdClientTls };

/** A key file is a few lines of identity:hexkey; anything much larger is not one. */
const PSK_FILE_BYTES_MAX = 1024 * 1024;

/** The key of `identity` in a psktool-format file (libnbd's tls-psk-file); errors name the URI's file. */
function pskFromFile(path: string, identity: string, uri: string): NbdClientTls {
  let text: string;
  try {
    const stat = statSync(path);
    if (stat.size > PSK_FILE_BYTES_MAX) throw new Error(`${stat.size} bytes is not a key file`);
    text = readFileSync(path, "utf8");
  } catch (error) {
    throw new IpsanError("INVALID_ARGUMENT", `${uri}: tls-psk-file ${path}: ${errorMessage(error)}`);
  }
  const parsed = parsePskFile(text);
  if (!parsed.ok) throw new IpsanError("INVALID_ARGUMENT", `${uri}: tls-psk-file ${path}: ${parsed.reason}`);
  const key = parsed.keys.get(identity);
  if (key === undefined) throw new IpsanError("INVALID_ARGUMENT", `${uri}: tls-psk-file ${path} has no key for identity ${JSON.stringify(identity)}`);
  return { identity, key };
}

/**
 * Parses nbd://HOST[:PORT]/EXPORT and nbd+unix:///EXPORT?socket=PATH (the URIs units print and
 * libnbd takes), and their TLS forms nbds://IDENTITY@HOST[:PORT]/EXPORT?tls-psk-file=PATH and
 * nbds+unix://IDENTITY@/EXPORT?socket=PATH&tls-psk-file=PATH: the identity is the URI's user
 * part (as libnbd takes it), the key is read from the file now.
 */
export function parseNbdUri(uri: string): NbdTarget {
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new IpsanError("INVALID_ARGUMENT", `not an NBD URI: ${JSON.stringify(uri)}`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ""));
  const secure = url.protocol === "nbds:" || url.protocol === "nbds+unix:";
  let tls: NbdClientTls | undefined;
  if (secure) {
    const identity = decodeURIComponent(url.username);
    const file = url.searchParams.get("tls-psk-file");
    if (identity === "" || file === null || file === "") throw new IpsanError("INVALID_ARGUMENT", `${uri}: an nbds:// URI needs IDENTITY@ and ?tls-psk-file=PATH (TLS-PSK)`);
    tls = pskFromFile(file, identity, uri);
  }
  if (url.protocol === "nbd+unix:" || url.protocol === "nbds+unix:") {
    const path = url.searchParams.get("socket");
    if (path === null || path === "") throw new IpsanError("INVALID_ARGUMENT", `${uri}: nbd+unix needs ?socket=PATH`);
    return { path, exportName, ...(tls === undefined ? {} : { tls }) };
  }
  if (url.protocol === "nbd:" || url.protocol === "nbds:") {
    const host = url.hostname.replace(/^\[(.*)\]$/, "$1");
    const port = url.port === "" ? 10809 : Number(url.port);
    if (host === "" || !(port > 0 && port < 65536)) throw new IpsanError("INVALID_ARGUMENT", `${uri}: needs HOST[:PORT]`);
    return { host, port, exportName, ...(tls === undefined ? {} : { tls }) };
  }
  throw new IpsanError("INVALID_ARGUMENT", `${uri}: unsupported scheme ${url.protocol} (nbd://, nbds://, nbd+unix:// or nbds+unix://)`);
}

export interface NbdClientOptions {
  /** Connect plus handshake. */
  readonly connectTimeoutMs?: number;
  /** Each request, from sending to its whole reply. */
  readonly requestTimeoutMs?: number;
  /** Requests on the wire at once; more wait in order. */
  readonly inFlightMax?: number;
  /** Negotiate structured replies and base:allocation: a connection for blockStatus() only. */
  readonly allocation?: boolean;
  /** NBD_OPT_STARTTLS, then TLS-PSK with this identity and key, before anything else is negotiated. */
  readonly tls?: NbdClientTls | undefined;
}

/** One run of a BLOCK_STATUS answer (base:allocation). */
export interface AllocationExtent {
  readonly lengthBytes: number;
  /** Not allocated on the server. */
  readonly hole: boolean;
  /** Reads as zeroes. */
  readonly zero: boolean;
}

/** Descriptors accepted in one BLOCK_STATUS answer (a server sending more is cut off). */
export const BLOCK_STATUS_DESCRIPTORS_MAX = 1 << 16;

interface Pending {
  readonly cookie: number;
  readonly type: number;
  readonly length: number;
  readonly resolve: (data: Buffer | undefined) => void;
  readonly reject: (error: Error) => void;
  readonly deadline: number;
  /** BLOCK_STATUS: the runs received so far (structured chunks until DONE). */
  readonly extents: AllocationExtent[] | undefined;
  /** READ: the caller's buffer the data goes into (one copy from the received chunks). */
  readonly into: Buffer | undefined;
}

const DEFAULTS = { connectTimeoutMs: 5_000, requestTimeoutMs: 5_000, inFlightMax: 64, allocation: false, tls: undefined };

export class NbdClient {
  readonly sizeBytes: number;
  readonly transmissionFlags: number;
  readonly #socket: net.Socket;
  readonly #queue: ByteQueue;
  readonly #pending = new Map<number, Pending>();
  readonly #waiting: (() => void)[] = [];
  readonly #requestTimeoutMs: number;
  readonly #inFlightMax: number;
  #nextCookie = 1;
  #broken: Error | undefined;
  /** A simple READ reply whose data has not all arrived yet. */
  #readingData: Pending | undefined;
  #timer: NodeJS.Timeout | undefined;
  readonly #closedListeners: ((error: Error) => void)[] = [];
  #corked = false;
  readonly #target: NbdTarget;
  readonly #options: Required<NbdClientOptions>;
  /** The metadata context id the server gave base:allocation (allocation connections only). */
  readonly #contextId: number | undefined;
  /** The second connection blockStatus() uses, opened on first use. */
  #statusClient: Promise<NbdClient> | undefined;

  readonly #uncork = (): void => {
    this.#corked = false;
    if (!this.#socket.destroyed) this.#socket.uncork();
  };

  private constructor(socket: net.Socket, queue: ByteQueue, sizeBytes: number, flags: number, options: Required<NbdClientOptions>, target: NbdTarget, contextId: number | undefined) {
    this.#target = target;
    this.#options = options;
    this.#contextId = contextId;
    this.#socket = socket;
    this.#queue = queue;
    this.sizeBytes = sizeBytes;
    this.transmissionFlags = flags;
    this.#requestTimeoutMs = options.requestTimeoutMs;
    this.#inFlightMax = options.inFlightMax;
    const onChunk = (chunk: Buffer): void => {
      this.#queue.push(chunk);
      this.#drain();
    };
    // Node's own 64 KiB reads. Large reads (large_reads.ts, as the server's) were tried here: no faster on the
    // engine's fio jobs, and a full rebuild ran at a third of its speed (benchmarks.md, mirror, 2026-12-04).
    socket.on("data", onChunk);
    socket.on("error", (error) => this.#fail(new IpsanError("UNAVAILABLE", `NBD connection failed: ${error.message}`)));
    socket.on("close", () => this.#fail(new IpsanError("UNAVAILABLE", "NBD server closed the connection")));
  }

  /** Connects, negotiates and opens the export; rejects with the server's reason when it refuses. */
  static async connect(target: NbdTarget | string, options: NbdClientOptions = {}): Promise<NbdClient> {
    const resolved = typeof target === "string" ? parseNbdUri(target) : target;
    const settings = { ...DEFAULTS, ...options, tls: options.tls ?? resolved.tls };
    let socket: net.Socket = "path" in resolved ? net.connect(resolved.path) : net.connect({
            host: resolved.host,
            port: resolved.port,
            noDelay: true,
            ...(resolved.localAddress === undefined ? {} : { localAddress: resolved.localAddress }),
          });
    const queue = new ByteQueue();
    const where = "path" in resolved ? `nbd+unix:///${resolved.exportName}?socket=${resolved.path}` : `nbd://${resolved.host}:${resolved.port}/${resolved.exportName}`;
    let wake: (() => void) | undefined;
    let failure: Error | undefined;
    const onData = (chunk: Buffer): void => {
      queue.push(chunk);
      wake?.();
    };
    const onEnd = (error?: Error): void => {
      failure ??= new IpsanError("UNAVAILABLE", `${where}: ${error?.message ?? "connection closed during the handshake"}`);
      wake?.();
    };
    const onClose = (): void => onEnd();
    socket.on("data", onData);
    socket.on("error", onEnd);
    socket.on("close", onClose);
    const deadline = Date.now() + settings.connectTimeoutMs;
    const next = async <T>(decode: (q: ByteQueue) => { kind: "need_more" } | { kind: "frame"; frame: T } | { kind: "invalid"; reason: string }): Promise<T> => {
      for (;;) {
        const result = decode(queue);
        if (result.kind === "frame") return result.frame;
        if (result.kind === "invalid") throw new IpsanError("UNAVAILABLE", `${where}: invalid handshake data (${result.reason})`);
        if (failure !== undefined) throw failure;
        const left = deadline - Date.now();
        if (left <= 0) throw new IpsanError("UNAVAILABLE", `${where}: handshake timed out after ${settings.connectTimeoutMs} ms`);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, left);
          wake = () => {
            clearTimeout(timer);
            wake = undefined;
            resolve();
          };
        });
      }
    };
    try {
      const greeting = await next(decodeGreeting);
      if ((greeting.handshakeFlags & NBD_FLAG.FIXED_NEWSTYLE) === 0) throw new IpsanError("UNAVAILABLE", `${where}: server is not fixed newstyle`);
      const noZeroes = (greeting.handshakeFlags & NBD_FLAG.NO_ZEROES) !== 0;
      socket.write(encodeClientFlags(NBD_FLAG_C.FIXED_NEWSTYLE | (noZeroes ? NBD_FLAG_C.NO_ZEROES : 0)));
      if (settings.tls !== undefined) {
        socket.write(encodeOption(NBD_OPT.STARTTLS));
        const reply = await next((q) => decodeOptionReply(q, 64 * 1024));
        if (reply.replyType !== NBD_REP.ACK) {
          const code = reply.replyType === NBD_REP.ERR_UNSUP ? "NOT_SUPPORTED" : "UNAVAILABLE";
          throw new IpsanError(code, `${where}: the server refused NBD_OPT_STARTTLS (0x${reply.replyType.toString(16)}): ${reply.data.toString("utf8").slice(0, 200)}`);
        }
        if (queue.length > 0) throw new IpsanError("UNAVAILABLE", `${where}: data after the NBD_OPT_STARTTLS reply`);
        const raw = socket;
        raw.off("data", onData);
        raw.off("error", onEnd);
        raw.off("close", onClose);
        raw.on("error", () => undefined);
        const { identity, key } = settings.tls;
        const secure = tls.connect({
          socket: raw,
          ciphers: PSK_CIPHERS,
          minVersion: "TLSv1.2",
          // No certificates with PSK: the key proves both sides.
          checkServerIdentity: () => undefined,
          pskCallback: () => ({ psk: key, identity }),
        });
        socket = secure;
        secure.on("error", onEnd);
        secure.on("close", onClose);
        await new Promise<void>((resolve, reject) => {
          const timer = setTimeout(() => reject(new IpsanError("UNAVAILABLE", `${where}: TLS handshake timed out`)), Math.max(0, deadline - Date.now()));
          secure.once("secureConnect", () => {
            clearTimeout(timer);
            resolve();
          });
          secure.once("close", () => {
            clearTimeout(timer);
            reject(failure ?? new IpsanError("UNAVAILABLE", `${where}: closed during the TLS handshake`));
          });
        });
        secure.on("data", onData);
      }
      let contextId: number | undefined;
      if (settings.allocation) {
        socket.write(encodeOption(NBD_OPT.STRUCTURED_REPLY));
        const structured = await next((q) => decodeOptionReply(q, 64 * 1024));
        if (structured.replyType !== NBD_REP.ACK) throw new IpsanError("NOT_SUPPORTED", `${where}: the server does not offer structured replies (needed for BLOCK_STATUS)`);
        socket.write(encodeOption(NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequestData(resolved.exportName, [BASE_ALLOCATION])));
        for (;;) {
          const reply = await next((q) => decodeOptionReply(q, 64 * 1024));
          if (reply.replyType === NBD_REP.META_CONTEXT && reply.data.length >= 4 && reply.data.toString("utf8", 4) === BASE_ALLOCATION) contextId = reply.data.readUInt32BE(0);
          else if (reply.replyType === NBD_REP.ACK) break;
          else if (reply.replyType >= 0x8000_0000) break;
        }
        if (contextId === undefined) throw new IpsanError("NOT_SUPPORTED", `${where}: the server does not offer ${BASE_ALLOCATION}`);
      }
      socket.write(encodeOption(NBD_OPT.GO, encodeInfoRequestData(resolved.exportName, [NBD_INFO.BLOCK_SIZE])));
      let sizeBytes: number | undefined;
      let flags = 0;
      for (;;) {
        const reply = await next((q) => decodeOptionReply(q, 64 * 1024));
        if (reply.replyType === NBD_REP.INFO && reply.data.length >= 12 && reply.data.readUInt16BE(0) === NBD_INFO.EXPORT) {
          sizeBytes = Number(reply.data.readBigUInt64BE(2));
          flags = reply.data.readUInt16BE(10);
        } else if (reply.replyType === NBD_REP.ACK) {
          break;
        } else if (reply.replyType >= 0x8000_0000) {
          const code = reply.replyType === NBD_REP.ERR_POLICY ? "PERMISSION_DENIED" : reply.replyType === NBD_REP.ERR_UNKNOWN ? "NOT_FOUND" : "UNAVAILABLE";
          throw new IpsanError(code, `${where}: export refused (0x${reply.replyType.toString(16)}): ${reply.data.toString("utf8").slice(0, 200)}`);
        }
      }
      if (sizeBytes === undefined || !Number.isSafeInteger(sizeBytes)) throw new IpsanError("UNAVAILABLE", `${where}: no export size in the GO reply`);
      socket.off("data", onData);
      socket.off("error", onEnd);
      socket.off("close", onClose);
      return new NbdClient(socket, queue, sizeBytes, flags, settings, resolved, contextId);
    } catch (error) {
      socket.destroy();
      throw error;
    }
  }

  get broken(): Error | undefined {
    return this.#broken;
  }

  /** Called once when the connection breaks (with the reason). */
  onBroken(listener: (error: Error) => void): void {
    if (this.#broken !== undefined) listener(this.#broken);
    else this.#closedListeners.push(listener);
  }

  get canFlush(): boolean {
    return (this.transmissionFlags & NBD_TFLAG.SEND_FLUSH) !== 0;
  }

  /**
   * Reads `lengthBytes` at `offsetBytes`. With `into` (of that length), the
   * data is copied once, from the received chunks straight into it, and
   * `into` is what resolves; without, a buffer of its own.
   */
  read(offsetBytes: number, lengthBytes: number, into?: Buffer): Promise<Buffer> {
    if (this.#contextId !== undefined) return Promise.reject(new IpsanError("INVALID_ARGUMENT", "READ on a block-status connection"));
    if (into !== undefined && into.length !== lengthBytes) return Promise.reject(new IpsanError("INVALID_ARGUMENT", `READ into ${into.length} bytes of ${lengthBytes}`));
    const reply = this.#request(NBD_CMD.READ, 0, offsetBytes, lengthBytes, undefined, undefined, into);
    // A READ of some bytes resolves with its data (#drain); one of none has no data phase.
    return lengthBytes > 0 ? (reply as Promise<Buffer>) : reply.then(() => Buffer.alloc(0));
  }

  // WRITE (and the commands below) resolve with undefined: the request's own promise is returned, not one wrapped around it.
  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void> {
    return this.#request(NBD_CMD.WRITE, fua ? NBD_CMD_FLAG.FUA : 0, offsetBytes, data.length, [data]) as Promise<unknown> as Promise<void>;
  }

  /** One WRITE whose payload is `parts` in order, sent without joining them. */
  writev(offsetBytes: number, parts: readonly Buffer[], fua: boolean): Promise<void> {
    let length = 0;
    for (const part of parts) length += part.length;
    return this.#request(NBD_CMD.WRITE, fua ? NBD_CMD_FLAG.FUA : 0, offsetBytes, length, parts) as Promise<unknown> as Promise<void>;
  }

  async flush(): Promise<void> {
    await this.#request(NBD_CMD.FLUSH, 0, 0, 0, undefined);
  }

  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    await this.#request(NBD_CMD.TRIM, fua ? NBD_CMD_FLAG.FUA : 0, offsetBytes, lengthBytes, undefined);
  }

  async zero(offsetBytes: number, lengthBytes: number, fua: boolean, mayTrim: boolean): Promise<void> {
    const flags = (fua ? NBD_CMD_FLAG.FUA : 0) | (mayTrim ? 0 : NBD_CMD_FLAG.NO_HOLE);
    await this.#request(NBD_CMD.WRITE_ZEROES, flags, offsetBytes, lengthBytes, undefined);
  }

  /**
   * The allocation of [offsetBytes, offsetBytes + lengthBytes) on the server
   * (base:allocation), from the start of the range; the runs may cover less
   * than asked (ask again from where they end). Goes over a second
   * connection, opened on first use; rejects with NOT_SUPPORTED when the
   * server does not offer it.
   */
  async blockStatus(offsetBytes: number, lengthBytes: number): Promise<readonly AllocationExtent[]> {
    if (this.#contextId === undefined) {
      if (this.#broken !== undefined) throw this.#broken;
      this.#statusClient ??= NbdClient.connect(this.#target, { ...this.#options, allocation: true });
      let status: NbdClient;
      try {
        status = await this.#statusClient;
      } catch (error) {
        this.#statusClient = undefined;
        throw error;
      }
      if (status.broken !== undefined) {
        this.#statusClient = undefined;
        throw status.broken;
      }
      return status.blockStatus(offsetBytes, lengthBytes);
    }
    const extents: AllocationExtent[] = [];
    await this.#request(NBD_CMD.BLOCK_STATUS, 0, offsetBytes, Math.min(lengthBytes, 0xffff_ffff), undefined, extents);
    return extents;
  }

  /** Sends NBD_CMD_DISC (after requests in flight) and closes. */
  async close(): Promise<void> {
    void this.#statusClient?.then((c) => c.close()).catch(() => undefined);
    this.#statusClient = undefined;
    if (this.#broken === undefined) {
      while (this.#pending.size > 0 && this.#broken === undefined) await new Promise((resolve) => setTimeout(resolve, 5));
      if (this.#broken === undefined) {
        this.#socket.end(encodeRequest({ cookieHi: 0, cookieLo: 0, flags: 0, type: NBD_CMD.DISC, offset: 0, length: 0 }));
      }
    }
    this.#fail(new IpsanError("UNAVAILABLE", "NBD connection closed by the client"));
  }

  /** Cuts the connection now; requests in flight fail. */
  destroy(reason = "NBD connection cut by the client"): void {
    void this.#statusClient?.then((c) => c.destroy(reason)).catch(() => undefined);
    this.#statusClient = undefined;
    this.#fail(new IpsanError("UNAVAILABLE", reason));
  }

  /** Sends a request at once when there is room on the wire (no promise but the reply's), else after waiting its turn. */
  #request(
    type: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    payload: readonly Buffer[] | undefined,
    extents?: AllocationExtent[],
    into?: Buffer,
  ): Promise<Buffer | undefined> {
    if (this.#broken !== undefined) return Promise.reject(this.#broken);
    if (this.#pending.size >= this.#inFlightMax) return this.#requestLater(type, flags, offsetBytes, lengthBytes, payload, extents, into);
    const cookie = this.#nextCookie;
    this.#nextCookie = this.#nextCookie >= 0xffff_fff0 ? 1 : this.#nextCookie + 1;
    return new Promise((resolve, reject) => {
      this.#pending.set(cookie, { cookie, type, length: lengthBytes, resolve, reject, deadline: Date.now() + this.#requestTimeoutMs, extents, into });
      this.#armTimer();
      const header = encodeRequest({ cookieHi: 0, cookieLo: cookie, flags, type, offset: offsetBytes, length: lengthBytes });
      // Requests made in the same turn of the event loop leave in one writev (fewer syscalls
      // here and fewer reads on the server); a lone request leaves at once.
      if (!this.#corked && this.#pending.size > 1) {
        this.#corked = true;
        this.#socket.cork();
        setImmediate(this.#uncork);
      }
      if (payload === undefined) this.#socket.write(header);
      else if (this.#corked) {
        this.#socket.write(header);
        for (const part of payload) this.#socket.write(part);
      } else {
        this.#socket.cork();
        this.#socket.write(header);
        for (const part of payload) this.#socket.write(part);
        this.#socket.uncork();
      }
    });
  }

  async #requestLater(
    type: number,
    flags: number,
    offsetBytes: number,
    lengthBytes: number,
    payload: readonly Buffer[] | undefined,
    extents: AllocationExtent[] | undefined,
    into: Buffer | undefined,
  ): Promise<Buffer | undefined> {
    while (this.#pending.size >= this.#inFlightMax && this.#broken === undefined) {
      await new Promise<void>((resolve) => this.#waiting.push(resolve));
    }
    return this.#request(type, flags, offsetBytes, lengthBytes, payload, extents, into);
  }

  #drain(): void {
    try {
      for (;;) {
        const reading = this.#readingData;
        if (reading !== undefined) {
          if (this.#queue.length < reading.length) return;
          this.#readingData = undefined;
          const into = reading.into;
          let data: Buffer;
          if (into === undefined) data = Buffer.from(this.#queue.take(reading.length));
          else {
            // Spread over several chunks: copied into `into` by take; within one: a view, copied here.
            const taken = this.#queue.take(reading.length, () => into);
            if (taken !== into) taken.copy(into);
            data = into;
          }
          this.#settled(reading.cookie);
          reading.resolve(data);
          continue;
        }
        const decoded = decodeTransmissionReply(this.#queue, WIRE.REQUEST_HEADER_BYTES + (64 << 20));
        if (decoded.kind === "need_more") return;
        if (decoded.kind === "invalid") throw new IpsanError("UNAVAILABLE", `NBD server sent an invalid reply (${decoded.reason})`);
        const reply = decoded.frame;
        const pending = this.#pending.get(reply.cookieLo);
        if (pending === undefined || reply.cookieHi !== 0) throw new IpsanError("UNAVAILABLE", `NBD reply for an unknown cookie ${reply.cookieHi}:${reply.cookieLo}`);
        if (reply.kind === "chunk") {
          if (this.#contextId === undefined) throw new IpsanError("UNAVAILABLE", "NBD server sent a structured reply that was not negotiated");
          this.#chunk(pending, reply.flags, reply.type, reply.payload);
          continue;
        }
        if (reply.errno !== 0) {
          this.#settled(pending.cookie);
          pending.reject(new IpsanError("IO_ERROR", `NBD request failed on the server: errno ${reply.errno}`));
          continue;
        }
        if (pending.type === NBD_CMD.READ && pending.length > 0) {
          this.#readingData = pending;
          continue;
        }
        this.#settled(pending.cookie);
        pending.resolve(undefined);
      }
    } catch (error) {
      this.#fail(error instanceof Error ? error : new Error(String(error)));
    }
  }

  /** One structured reply chunk (allocation connections: BLOCK_STATUS answers, errors, NONE). */
  #chunk(pending: Pending, flags: number, type: number, payload: Buffer): void {
    if ((type & 0x8000) !== 0) {
      this.#settled(pending.cookie);
      const errno = payload.length >= 4 ? payload.readUInt32BE(0) : 0;
      pending.reject(new IpsanError("IO_ERROR", `NBD request failed on the server: errno ${errno}`));
      return;
    }
    if (type === NBD_REPLY_TYPE.BLOCK_STATUS) {
      if (pending.extents === undefined || payload.length < 4 || (payload.length - 4) % 8 !== 0) throw new IpsanError("UNAVAILABLE", "NBD server sent an unexpected block status chunk");
      if (payload.readUInt32BE(0) === this.#contextId) {
        for (let at = 4; at < payload.length; at += 8) {
          if (pending.extents.length >= BLOCK_STATUS_DESCRIPTORS_MAX) throw new IpsanError("UNAVAILABLE", `NBD server sent more than ${BLOCK_STATUS_DESCRIPTORS_MAX} block status descriptors`);
          const state = payload.readUInt32BE(at + 4);
          pending.extents.push({ lengthBytes: payload.readUInt32BE(at), hole: (state & NBD_STATE.HOLE) !== 0, zero: (state & NBD_STATE.ZERO) !== 0 });
        }
      }
    } else if (type !== NBD_REPLY_TYPE.NONE) throw new IpsanError("UNAVAILABLE", `NBD server sent an unexpected chunk type ${type}`);
    if ((flags & NBD_REPLY_FLAG.DONE) !== 0) {
      this.#settled(pending.cookie);
      pending.resolve(undefined);
    }
  }

  #settled(cookie: number): void {
    this.#pending.delete(cookie);
    this.#waiting.shift()?.();
  }

  #armTimer(): void {
    if (this.#timer !== undefined || this.#broken !== undefined) return;
    this.#timer = setTimeout(this.#checkDeadlines, Math.min(this.#requestTimeoutMs, 250));
  }

  readonly #checkDeadlines = (): void => {
    this.#timer = undefined;
    const now = Date.now();
    for (const pending of this.#pending.values()) {
      if (pending.deadline <= now) {
        this.#fail(new IpsanError("UNAVAILABLE", `NBD request timed out after ${this.#requestTimeoutMs} ms`));
        return;
      }
    }
    if (this.#pending.size > 0) this.#armTimer();
  };

  #fail(error: Error): void {
    if (this.#broken !== undefined) return;
    this.#broken = error;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#socket.destroy();
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    this.#readingData = undefined;
    for (const p of pending) p.reject(error);
    for (const wake of this.#waiting.splice(0)) wake();
    for (const listener of this.#closedListeners.splice(0)) listener(error);
  }
}
