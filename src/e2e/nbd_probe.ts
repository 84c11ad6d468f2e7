// A minimal NBD client for the sharing tests, written from the protocol
// document (fixed newstyle, NBD_OPT_GO, simple replies), whose one reason to
// exist is what libnbd cannot do: choose the source address of the TCP
// connection (`localAddress`). A unit with address grants (plaintext: a
// standalone unit, or one joined with --insecure-plaintext) identifies a host
// by that address, so with 127.0.0.2 and 127.0.0.3 two "hosts" can share one
// loopback.
// Every read is bounded by a timeout; a server that closes the connection or
// refuses the export is an answer, not an exception.

import { connect, type Socket } from "node:net";

const NBD_MAGIC = Buffer.from("NBDMAGIC");
const IHAVEOPT = Buffer.from("IHAVEOPT");
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;
const OPT_GO = 7;
const REP_ACK = 1;
const REP_INFO = 3;
const REP_FLAG_ERROR = 0x80000000;
const INFO_EXPORT = 0;
const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_FLUSH = 3;
const OPTION_REPLY_BYTES_MAX = 64 * 1024;
export const PROBE_TIMEOUT_MS = 5_000;

export const REPLY_ERROR_NAMES: Readonly<Record<number, string>> = {
  [REP_FLAG_ERROR + 1]: "NBD_REP_ERR_UNSUP",
  [REP_FLAG_ERROR + 2]: "NBD_REP_ERR_POLICY",
  [REP_FLAG_ERROR + 3]: "NBD_REP_ERR_INVALID",
  [REP_FLAG_ERROR + 4]: "NBD_REP_ERR_PLATFORM",
  [REP_FLAG_ERROR + 5]: "NBD_REP_ERR_TLS_REQD",
  [REP_FLAG_ERROR + 6]: "NBD_REP_ERR_UNKNOWN",
  [REP_FLAG_ERROR + 7]: "NBD_REP_ERR_SHUTDOWN",
  [REP_FLAG_ERROR + 8]: "NBD_REP_ERR_BLOCK_SIZE_REQD",
  [REP_FLAG_ERROR + 9]: "NBD_REP_ERR_TOO_BIG",
};

export type OpenResult =
  | { kind: "open"; client: RawNbdClient; sizeBytes: number }
  | { kind: "refused"; error: string; message: string }
  | { kind: "closed"; stage: string };

class Closed extends Error {}

export class RawNbdClient {
  readonly #socket: Socket;
  #buffered: Buffer = Buffer.alloc(0);
  #ended = false;
  #wake: (() => void) | undefined;
  #cookie = 1n;

  constructor(socket: Socket) {
    this.#socket = socket;
    socket.on("data", (chunk: Buffer) => {
      this.#buffered = Buffer.concat([this.#buffered, chunk]);
      this.#wake?.();
    });
    const end = (): void => {
      this.#ended = true;
      this.#wake?.();
    };
    socket.on("end", end);
    socket.on("close", end);
    socket.on("error", end);
  }

  async readExact(length: number, timeoutMs = PROBE_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffered.length < length) {
      if (this.#ended) throw new Closed("connection closed");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`NBD probe: no ${length} bytes within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = undefined;
    }
    const out = this.#buffered.subarray(0, length);
    this.#buffered = this.#buffered.subarray(length);
    return Buffer.from(out);
  }

  /** The source address the kernel gave this connection. */
  get localAddress(): string | undefined {
    return this.#socket.localAddress;
  }

  send(data: Buffer): void {
    this.#socket.write(data);
  }

  #request(type: number, offset: number, length: number): bigint {
    const header = Buffer.alloc(28);
    const cookie = this.#cookie++;
    header.writeUInt32BE(REQUEST_MAGIC, 0);
    header.writeUInt16BE(0, 4);
    header.writeUInt16BE(type, 6);
    header.writeBigUInt64BE(cookie, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    this.send(header);
    return cookie;
  }

  async #reply(cookie: bigint): Promise<number> {
    const reply = await this.readExact(16);
    if (reply.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new Error("NBD probe: bad reply magic");
    if (reply.readBigUInt64BE(8) !== cookie) throw new Error("NBD probe: cookie mismatch");
    return reply.readUInt32BE(4);
  }

  /** Reads; resolves with the data, or throws with the NBD errno. */
  async read(offset: number, length: number): Promise<Buffer> {
    const cookie = this.#request(CMD_READ, offset, length);
    const error = await this.#reply(cookie);
    if (error !== 0) throw new Error(`NBD read error ${error}`);
    return this.readExact(length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    const cookie = this.#request(CMD_WRITE, offset, data.length);
    this.send(data);
    const error = await this.#reply(cookie);
    if (error !== 0) throw new Error(`NBD write error ${error}`);
  }

  async flush(): Promise<void> {
    const error = await this.#reply(this.#request(CMD_FLUSH, 0, 0));
    if (error !== 0) throw new Error(`NBD flush error ${error}`);
  }

  close(): void {
    this.#socket.destroy();
  }
}

/** Connects from `localAddress`, does the fixed-newstyle handshake and NBD_OPT_GO for `exportName`. */
export async function openExport(options: {
  host: string;
  port: number;
  localAddress?: string;
  exportName: string;
}): Promise<OpenResult> {
  const socket = connect({
    host: options.host,
    port: options.port,
    ...(options.localAddress === undefined ? {} : { localAddress: options.localAddress }),
  });
  const client = new RawNbdClient(socket);
  let stage = "greeting";
  try {
    const greeting = await client.readExact(18);
    if (!greeting.subarray(0, 8).equals(NBD_MAGIC) || !greeting.subarray(8, 16).equals(IHAVEOPT)) {
      throw new Error("NBD probe: not a fixed-newstyle server");
    }
    const serverFlags = greeting.readUInt16BE(16);
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
    const name = Buffer.from(options.exportName, "utf8");
    const option = Buffer.alloc(16 + 4 + name.length + 2);
    IHAVEOPT.copy(option, 0);
    option.writeUInt32BE(OPT_GO, 8);
    option.writeUInt32BE(4 + name.length + 2, 12);
    option.writeUInt32BE(name.length, 16);
    name.copy(option, 20);
    option.writeUInt16BE(0, 20 + name.length);
    client.send(Buffer.concat([clientFlags, option]));
    stage = "NBD_OPT_GO";
    let sizeBytes = -1;
    for (;;) {
      const header = await client.readExact(20);
      if (header.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error("NBD probe: bad option reply magic");
      const type = header.readUInt32BE(12);
      const length = header.readUInt32BE(16);
      if (length > OPTION_REPLY_BYTES_MAX) throw new Error(`NBD probe: option reply of ${length} bytes`);
      const data = await client.readExact(length);
      if (type === REP_ACK) break;
      if (type === REP_INFO && data.length >= 12 && data.readUInt16BE(0) === INFO_EXPORT) {
        sizeBytes = Number(data.readBigUInt64BE(2));
        continue;
      }
      if ((type & REP_FLAG_ERROR) !== 0) {
        client.close();
        return { kind: "refused", error: REPLY_ERROR_NAMES[type] ?? `0x${type.toString(16)}`, message: data.toString("utf8") };
      }
    }
    return { kind: "open", client, sizeBytes };
  } catch (error) {
    client.close();
    if (error instanceof Closed || (error as NodeJS.ErrnoException).code === "ECONNRESET") return { kind: "closed", stage };
    throw error;
  }
}
