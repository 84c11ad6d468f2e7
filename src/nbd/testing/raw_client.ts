// A raw NBD client over one socket, for tests that must speak (and mis-speak)
// the protocol byte by byte: hostile inputs, exact error codes, connections
// left stalled on purpose. Real clients (nbdsh, nbdinfo, qemu) are used
// everywhere else. Every wait is bounded by a timeout.

import * as net from "node:net";
import { ByteQueue } from "../byte_queue.ts";
import {
  type OptionReply,
  type TransmissionReply,
  decodeGreeting,
  decodeOptionReply,
  decodeTransmissionReply,
  encodeClientFlags,
  encodeInfoRequestData,
  encodeMetaContextRequestData,
  encodeOption,
  encodeRequest,
  type RequestFields,
} from "../peer_codec.ts";
import { NBD_CMD, NBD_FLAG_C, NBD_INFO, NBD_OPT, NBD_REP, NBD_REPLY_FLAG, NBD_REPLY_TYPE } from "../protocol.ts";

export const RAW_CLIENT_TIMEOUT_MS = 5_000;

/** A TCP target may name the local (source) address, e.g. 127.0.0.2 to be another "host" on the loopback. */
export type Target = { host: string; port: number; localAddress?: string | undefined } | { path: string };

type Decoder<T> = (queue: ByteQueue) => { kind: "need_more" } | { kind: "frame"; frame: T } | { kind: "invalid"; reason: string };

export class RawNbdClient {
  readonly socket: net.Socket;
  private readonly queue = new ByteQueue();
  /** Callers of next() waiting for bytes (a Set: several may wait at once). */
  private readonly waiters = new Set<() => void>();
  private closedFlag = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.on("data", (chunk: Buffer) => {
      this.queue.push(chunk);
      this.wakeAll();
    });
    socket.on("error", () => undefined);
    this.closed = new Promise((resolve) =>
      socket.once("close", () => {
        this.closedFlag = true;
        this.wakeAll();
        resolve();
      }),
    );
  }

  static connect(target: Target, timeoutMs = RAW_CLIENT_TIMEOUT_MS): Promise<RawNbdClient> {
    return new Promise((resolve, reject) => {
      const socket =
        "path" in target
          ? net.connect(target.path)
          : net.connect({ port: target.port, host: target.host, ...(target.localAddress === undefined ? {} : { localAddress: target.localAddress }) });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`connect timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once("connect", () => {
        clearTimeout(timer);
        resolve(new RawNbdClient(socket));
      });
      socket.once("error", (error) => {
        clearTimeout(timer);
        reject(error);
      });
    });
  }

  private wakeAll(): void {
    for (const wake of [...this.waiters]) wake();
  }

  get isClosed(): boolean {
    return this.closedFlag;
  }

  /** Bytes received and not yet decoded. */
  get pendingBytes(): number {
    return this.queue.length;
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Waits until `decode` yields a frame; throws on invalid input, close or timeout. */
  async next<T>(decode: Decoder<T>, timeoutMs = RAW_CLIENT_TIMEOUT_MS): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const result = decode(this.queue);
      if (result.kind === "frame") return result.frame;
      if (result.kind === "invalid") throw new Error(`server sent invalid data: ${result.reason}`);
      if (this.closedFlag) throw new Error("server closed the connection");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no reply within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const wake = (): void => {
          clearTimeout(timer);
          this.waiters.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, left);
        this.waiters.add(wake);
      });
    }
  }

  /** Waits for `count` raw bytes (read data after a simple reply). */
  take(count: number, timeoutMs = RAW_CLIENT_TIMEOUT_MS): Promise<Buffer> {
    return this.next((queue) => (queue.length >= count ? { kind: "frame", frame: queue.take(count) } : { kind: "need_more" }), timeoutMs);
  }

  /** True if the server closes the connection within the timeout. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    const result = await Promise.race([this.closed.then(() => true as const), timedOut]);
    clearTimeout(timer);
    return result;
  }

  /** Reads the greeting and sends client flags (fixed newstyle + no zeroes by default). */
  async handshake(clientFlags: number = NBD_FLAG_C.FIXED_NEWSTYLE | NBD_FLAG_C.NO_ZEROES): Promise<number> {
    const greeting = await this.next(decodeGreeting);
    this.write(encodeClientFlags(clientFlags));
    return greeting.handshakeFlags;
  }

  /** Sends an option and collects replies up to the final one (ACK or an error). */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.write(encodeOption(option, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const reply = await this.next((queue) => decodeOptionReply(queue));
      replies.push(reply);
      if (reply.replyType === NBD_REP.ACK || reply.replyType >= 0x80000000) return replies;
    }
  }

  /** STRUCTURED_REPLY (optional), SET_META_CONTEXT base:allocation (optional), then GO. */
  async go(name: string, options: { structured?: boolean; meta?: boolean; infos?: readonly number[] } = {}): Promise<{ sizeBytes: number; transmissionFlags: number }> {
    if (options.structured === true) await this.expectAck(NBD_OPT.STRUCTURED_REPLY);
    if (options.meta === true) await this.expectAck(NBD_OPT.SET_META_CONTEXT, encodeMetaContextRequestData(name, ["base:allocation"]));
    const replies = await this.option(NBD_OPT.GO, encodeInfoRequestData(name, options.infos ?? [NBD_INFO.BLOCK_SIZE]));
    const final = replies[replies.length - 1];
    if (final?.replyType !== NBD_REP.ACK) throw new Error(`GO ${name} failed: reply 0x${final?.replyType.toString(16)} ${final?.data.toString()}`);
    const exportInfo = replies.find((r) => r.replyType === NBD_REP.INFO && r.data.readUInt16BE(0) === NBD_INFO.EXPORT);
    if (exportInfo === undefined) throw new Error("GO: no NBD_INFO_EXPORT");
    return { sizeBytes: Number(exportInfo.data.readBigUInt64BE(2)), transmissionFlags: exportInfo.data.readUInt16BE(10) };
  }

  private async expectAck(option: number, data?: Buffer): Promise<OptionReply[]> {
    const replies = await this.option(option, data);
    if (replies[replies.length - 1]?.replyType !== NBD_REP.ACK) throw new Error(`option ${option} not acknowledged`);
    return replies;
  }

  /** Sends one request (no reply expected for DISC). */
  send(fields: RequestFields): void {
    this.write(encodeRequest(fields));
  }

  /** Reads one whole reply: a simple reply (with `readLength` data bytes when errno is 0) or chunks up to DONE. */
  async reply(readLength = 0): Promise<{ errno: number; cookieLo: number; data: Buffer | undefined; chunks: TransmissionReply[] }> {
    const first = await this.next((queue) => decodeTransmissionReply(queue));
    if (first.kind === "simple") {
      const data = first.errno === 0 && readLength > 0 ? await this.take(readLength) : undefined;
      return { errno: first.errno, cookieLo: first.cookieLo, data, chunks: [first] };
    }
    const chunks: TransmissionReply[] = [first];
    let chunk = first;
    while ((chunk.flags & NBD_REPLY_FLAG.DONE) === 0) {
      chunk = (await this.next((queue) => decodeTransmissionReply(queue))) as typeof first;
      chunks.push(chunk);
    }
    let errno = 0;
    let data: Buffer | undefined;
    for (const c of chunks) {
      if (c.kind !== "chunk") continue;
      if ((c.type & 0x8000) !== 0) errno = c.payload.readUInt32BE(0);
      if (c.type === NBD_REPLY_TYPE.OFFSET_DATA) data = c.payload.subarray(8);
    }
    return { errno, cookieLo: first.cookieLo, data, chunks };
  }

  /** One request and its reply. */
  async call(fields: RequestFields): Promise<{ errno: number; cookieLo: number; data: Buffer | undefined; chunks: TransmissionReply[] }> {
    this.send(fields);
    return this.reply(fields.type === NBD_CMD.READ ? fields.length : 0);
  }

  destroy(): void {
    this.socket.destroy();
  }
}
