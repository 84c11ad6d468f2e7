// A small raw iSCSI initiator for the target's own tests: it speaks PDUs
// byte by byte (pdu.ts) so tests can send what libiscsi never would (data
// digests, hostile lengths, wrong offsets, logins that stop halfway) and
// read exactly what the target answered. Not shipped (package.json files).

import { randomBytes } from "node:crypto";
import * as net from "node:net";
import { chapResponse, formatBinary, parseBinary } from "../chap.ts";
import { BHS_BYTES, DIGEST_BYTES, Op, PduReader, encodePdu, newBhs, type Pdu } from "../pdu.ts";
import { type TextPair, encodeText, parseText } from "../text.ts";
import { DEFAULT_ISCSI_LIMITS } from "../limits.ts";

export const RAW_TIMEOUT_MS = 10_000;

export interface RawLogin {
  readonly initiatorName?: string;
  readonly targetName?: string;
  readonly sessionType?: "Normal" | "Discovery";
  readonly headerDigest?: boolean;
  readonly dataDigest?: boolean;
  /** CHAP as the initiator: algorithm 5 (MD5, default) or 7 (SHA-256); `challenge` asks for mutual CHAP ("reflect": send the target's own challenge back). */
  readonly chap?: { user: string; secret: string; algorithm?: number; challenge?: Buffer | "reflect" };
  /** More operational keys (e.g. InitialR2T=No). */
  readonly keys?: readonly TextPair[];
  /** The MaxRecvDataSegmentLength declared (default 65536). */
  readonly maxRecvDataSegmentLength?: number;
}

export interface LoginResult {
  readonly status: number;
  readonly pairs: Map<string, string>;
}

export class RawInitiator {
  readonly socket: net.Socket;
  readonly #reader = new PduReader(16 * 1024 * 1024);
  readonly #queue: Pdu[] = [];
  #waiter: (() => void) | undefined;
  #closed = false;
  headerDigest = false;
  dataDigest = false;
  cmdSN = 1;
  /** Answer the target's NOP-In pings at once (as real initiators do); false to test the ping deadline. */
  autoPong = true;
  expStatSN = 0;
  /** The StatSN of every status the target sent, in order (a connection's must go up by one each time, RFC 7143 4.2.2.2). */
  readonly statSNs: number[] = [];
  #itt = 1;
  /** A random ISID (type 01b "random"): two initiators with one name and one ISID are one session (reinstatement). */
  readonly isid = Buffer.concat([Buffer.from([0x80]), randomBytes(5)]);

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on("data", (chunk: Buffer) => {
      this.#reader.push(chunk);
      try {
        for (let pdu = this.#reader.next(); pdu !== undefined; pdu = this.#reader.next()) {
          if (this.autoPong && (pdu.bhs[0]! & 0x3f) === Op.NOP_IN && pdu.bhs.readUInt32BE(20) !== 0xffffffff) {
            this.#pong(pdu.bhs.readUInt32BE(20));
            continue;
          }
          this.#queue.push(pdu);
        }
      } catch {
        socket.destroy();
      }
      this.#waiter?.();
    });
    socket.on("close", () => {
      this.#closed = true;
      this.#waiter?.();
    });
    socket.on("error", () => undefined);
  }

  static connect(host: string, port: number): Promise<RawInitiator> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host, port }, () => resolve(new RawInitiator(socket)));
      socket.once("error", reject);
    });
  }

  get closed(): boolean {
    return this.#closed;
  }

  nextItt(): number {
    this.#itt += 1;
    return this.#itt;
  }

  write(bytes: Buffer): void {
    this.socket.write(bytes);
  }

  /** Sends a PDU (BHS as given; DataSegmentLength and digests filled in). */
  send(bhs: Buffer, data: Buffer = Buffer.alloc(0)): void {
    for (const part of encodePdu(bhs, data.length === 0 ? [] : [data], this.headerDigest, this.dataDigest)) this.socket.write(part);
  }

  /** The next PDU from the target; undefined if the connection closed first. Throws on timeout. */
  async read(timeoutMs = RAW_TIMEOUT_MS): Promise<Pdu | undefined> {
    const deadline = Date.now() + timeoutMs;
    while (this.#queue.length === 0) {
      if (this.#closed) return undefined;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no PDU from the target within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#waiter = undefined;
    }
    const pdu = this.#queue.shift()!;
    // A PDU with status carries a StatSN: every one but Data-In without the S bit, and R2T.
    if ((pdu.bhs[0] !== Op.DATA_IN || (pdu.bhs[1]! & 0x01) !== 0) && pdu.bhs[0] !== Op.R2T) {
      this.statSNs.push(pdu.bhs.readUInt32BE(24));
      this.expStatSN = (pdu.bhs.readUInt32BE(24) + 1) >>> 0;
    }
    return pdu;
  }

  /** Waits for the target to close the connection; true if it did within the time. */
  async waitClosed(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#closed && Date.now() < deadline) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
        this.#waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#waiter = undefined;
      this.#queue.length = 0;
    }
    return this.#closed;
  }

  loginPdu(csg: number, nsg: number, transit: boolean, pairs: readonly TextPair[]): void {
    const bhs = newBhs(Op.LOGIN_REQUEST | 0x40, (transit ? 0x80 : 0) | (csg << 2) | (transit ? nsg : 0));
    this.isid.copy(bhs, 8);
    bhs.writeUInt32BE(1, 16);
    bhs.writeUInt32BE(this.cmdSN, 24);
    bhs.writeUInt32BE(this.expStatSN, 28);
    this.send(bhs, encodeText(pairs));
  }

  async #loginAnswer(): Promise<{ status: number; pairs: Map<string, string>; transit: boolean }> {
    const pdu = await this.read();
    if (pdu === undefined) throw new Error("the target closed the connection during login");
    if ((pdu.bhs[0]! & 0x3f) !== Op.LOGIN_RESPONSE) throw new Error(`expected a Login Response, got opcode 0x${pdu.bhs[0]!.toString(16)}`);
    return { status: pdu.bhs.readUInt16BE(36), pairs: new Map(parseText(pdu.data, DEFAULT_ISCSI_LIMITS)), transit: (pdu.bhs[1]! & 0x80) !== 0 };
  }

  /** Logs in (security stage with CHAP when given, then operational) to full feature phase. */
  async login(options: RawLogin): Promise<LoginResult> {
    const declarations: TextPair[] = [
      ["InitiatorName", options.initiatorName ?? "iqn.2026-12.org.ipsan.test:raw"],
      ["SessionType", options.sessionType ?? "Normal"],
      ...(options.targetName === undefined ? [] : ([["TargetName", options.targetName]] as TextPair[])),
    ];
    const operational: TextPair[] = [
      ["HeaderDigest", options.headerDigest === true ? "CRC32C" : "None"],
      ["DataDigest", options.dataDigest === true ? "CRC32C" : "None"],
      ["MaxRecvDataSegmentLength", String(options.maxRecvDataSegmentLength ?? 65536)],
      ...(options.keys ?? []),
    ];
    const all = new Map<string, string>();
    if (options.chap !== undefined) {
      this.loginPdu(0, 1, false, [...declarations, ["AuthMethod", "CHAP,None"]]);
      let answer = await this.#loginAnswer();
      if (answer.status !== 0) return { status: answer.status, pairs: answer.pairs };
      const algorithm = options.chap.algorithm ?? 5;
      this.loginPdu(0, 1, false, [["CHAP_A", String(algorithm)]]);
      answer = await this.#loginAnswer();
      if (answer.status !== 0) return { status: answer.status, pairs: answer.pairs };
      const identifier = Number(answer.pairs.get("CHAP_I"));
      const challenge = parseBinary(answer.pairs.get("CHAP_C") ?? "") ?? Buffer.alloc(0);
      if (answer.pairs.get("CHAP_A") !== String(algorithm)) throw new Error(`the target chose CHAP_A=${answer.pairs.get("CHAP_A")}, not ${algorithm}`);
      const mutual: TextPair[] = [];
      const ours = options.chap.challenge === "reflect" ? challenge : options.chap.challenge;
      if (ours !== undefined) mutual.push(["CHAP_I", "9"], ["CHAP_C", formatBinary(ours)]);
      this.loginPdu(0, 1, true, [["CHAP_N", options.chap.user], ["CHAP_R", formatBinary(chapResponse(algorithm, identifier, options.chap.secret, challenge))], ...mutual]);
      answer = await this.#loginAnswer();
      if (answer.status !== 0) return { status: answer.status, pairs: answer.pairs };
      for (const [key, value] of answer.pairs) all.set(key, value);
      this.loginPdu(1, 3, true, operational);
    } else {
      this.loginPdu(1, 3, true, [...declarations, ...operational]);
    }
    const answer = await this.#loginAnswer();
    for (const [key, value] of answer.pairs) all.set(key, value);
    if (answer.status === 0) {
      this.headerDigest = all.get("HeaderDigest") === "CRC32C";
      this.dataDigest = all.get("DataDigest") === "CRC32C";
      this.#reader.headerDigest = this.headerDigest;
      this.#reader.dataDigest = this.dataDigest;
    }
    return { status: answer.status, pairs: all };
  }

  /** A SCSI Command PDU for LUN 0; ATTR (RFC 7143 11.3.1) 1 SIMPLE unless `attribute` says: 2 ORDERED, 3 HEAD OF QUEUE, 4 ACA. */
  commandBhs(cdb: Buffer, options: { read?: boolean; write?: boolean; expectedLength: number; final?: boolean; itt?: number; attribute?: number }): Buffer {
    const flags = (options.final === false ? 0 : 0x80) | (options.read === true ? 0x40 : 0) | (options.write === true ? 0x20 : 0);
    const bhs = newBhs(Op.SCSI_COMMAND, flags | ((options.attribute ?? 1) & 0x07));
    bhs.writeUInt32BE(options.itt ?? this.nextItt(), 16);
    bhs.writeUInt32BE(options.expectedLength, 20);
    bhs.writeUInt32BE(this.cmdSN, 24);
    this.cmdSN = (this.cmdSN + 1) >>> 0;
    bhs.writeUInt32BE(this.expStatSN, 28);
    cdb.copy(bhs, 32, 0, Math.min(16, cdb.length));
    return bhs;
  }

  /** READ(10) of `blocks` 512-byte blocks at `lba`: the data and SCSI status. */
  async read10(lba: number, blocks: number): Promise<{ status: number; data: Buffer }> {
    const cdb = Buffer.alloc(10);
    cdb[0] = 0x28;
    cdb.writeUInt32BE(lba, 2);
    cdb.writeUInt16BE(blocks, 7);
    this.send(this.commandBhs(cdb, { read: true, expectedLength: blocks * 512 }));
    const parts: Buffer[] = [];
    for (;;) {
      const pdu = await this.read();
      if (pdu === undefined) throw new Error("connection closed during READ(10)");
      const opcode = pdu.bhs[0]! & 0x3f;
      if (opcode === Op.DATA_IN) {
        parts.push(pdu.data);
        if ((pdu.bhs[1]! & 0x01) !== 0) return { status: pdu.bhs[3]!, data: Buffer.concat(parts) };
      } else if (opcode === Op.SCSI_RESPONSE) {
        return { status: pdu.bhs[3]!, data: Buffer.concat(parts) };
      }
    }
  }

  /** The last SCSI Response PDU (its data segment holds the sense data of a CHECK CONDITION). */
  lastResponse: Pdu | undefined;

  /**
   * WRITE(10) of `data` at `lba`, answering R2Ts; returns the SCSI status.
   * `dataSN` rewrites the DataSN of each Data-Out (index in its R2T's sequence -> DataSN sent), to test a target's sequence checks.
   */
  async write10(lba: number, data: Buffer, options: { dataSN?: (sn: number) => number } = {}): Promise<number> {
    const cdb = Buffer.alloc(10);
    cdb[0] = 0x2a;
    cdb.writeUInt32BE(lba, 2);
    cdb.writeUInt16BE(data.length / 512, 7);
    const itt = this.nextItt();
    this.send(this.commandBhs(cdb, { write: true, expectedLength: data.length, itt }));
    for (;;) {
      const pdu = await this.read();
      if (pdu === undefined) throw new Error("connection closed during WRITE(10)");
      const opcode = pdu.bhs[0]! & 0x3f;
      if (opcode === Op.R2T) {
        const ttt = pdu.bhs.readUInt32BE(20);
        const offset = pdu.bhs.readUInt32BE(40);
        const length = pdu.bhs.readUInt32BE(44);
        let dataSN = 0;
        for (let at = offset; at < offset + length; at += 65536) {
          const size = Math.min(65536, offset + length - at);
          const out = newBhs(Op.DATA_OUT, at + size >= offset + length ? 0x80 : 0);
          out.writeUInt32BE(itt, 16);
          out.writeUInt32BE(ttt, 20);
          out.writeUInt32BE(this.expStatSN, 28);
          out.writeUInt32BE(options.dataSN === undefined ? dataSN : options.dataSN(dataSN) >>> 0, 36);
          dataSN += 1;
          out.writeUInt32BE(at, 40);
          this.send(out, data.subarray(at, at + size));
        }
      } else if (opcode === Op.SCSI_RESPONSE) {
        this.lastResponse = pdu;
        return pdu.bhs[3]!;
      }
    }
  }

  #pong(ttt: number): void {
    const answer = newBhs(Op.NOP_OUT | 0x40, 0x80);
    answer.writeUInt32BE(0xffffffff, 16);
    answer.writeUInt32BE(ttt, 20);
    answer.writeUInt32BE(this.cmdSN, 24);
    answer.writeUInt32BE(this.expStatSN, 28);
    this.send(answer);
  }

  /** TEST UNIT READY until GOOD (the first command after login gets the POWER ON unit attention). */
  async ready(): Promise<void> {
    for (let i = 0; i < 4; i += 1) {
      this.send(this.commandBhs(Buffer.alloc(6), { expectedLength: 0 }));
      for (;;) {
        const pdu = await this.read();
        if (pdu === undefined) throw new Error("connection closed during TEST UNIT READY");
        if ((pdu.bhs[0]! & 0x3f) !== Op.SCSI_RESPONSE) continue;
        if (pdu.bhs[3] === 0) return;
        break;
      }
    }
    throw new Error("TEST UNIT READY never answered GOOD");
  }

  close(): void {
    this.socket.destroy();
  }
}

export { BHS_BYTES, DIGEST_BYTES };
