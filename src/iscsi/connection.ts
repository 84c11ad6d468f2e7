// One iSCSI connection (RFC 7143), which with MaxConnections=1 is also one
// session: login (security stage with CHAP or none, operational stage), then
// the full feature phase (SCSI commands with immediate, unsolicited and
// R2T-solicited Data-Out, Data-In split by the initiator's
// MaxRecvDataSegmentLength, task management, NOP keepalives, text, logout).
// ERL 0: any framing or protocol error drops the connection; the unit keeps
// serving every other one. The wire format is in pdu.ts, keys in text.ts.

import type { Socket } from "node:net";
import type { BlockDevice, Peer } from "../block/types.ts";
import type { BudgetAccount, BudgetWaiter, Reservation } from "../nbd/budget.ts";
import type { BufferPool } from "../nbd/buffer_pool.ts";
import { type ReadArenaBudget, useLargeReads } from "../nbd/large_reads.ts";
import { SEND_FILE_BYTES_MAX, SEND_FILE_BYTES_MIN, mayWriteBehindStream, sendFileSocketFd, sendHeaderAndDataNow } from "../nbd/send_file.ts";
import { pskKeyId } from "../nbd/tls.ts";
import { LOGICAL_BLOCK_BYTES } from "../scsi/limits.ts";
import { ScsiStatus, type LogicalUnit, type ScsiNexus, type ScsiRequest, type ScsiResponse, type TaskAttribute } from "../scsi/types.ts";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { chapResponse, chooseChapAlgorithm, formatBinary, newChallenge, parseBinary, responsesEqual } from "./chap.ts";
import type { IscsiLimits } from "./limits.ts";
import { chapSecret } from "./names.ts";
import {
  AhsType,
  Op,
  PduFramingError,
  PduReader,
  RESERVED_TAG,
  RejectReason,
  encodePdu,
  finalOf,
  immediateOf,
  ittOf,
  newBhs,
  opcodeOf,
  parseAhs,
  snAdd,
  snLess,
  type Pdu,
} from "./pdu.ts";
import { TextError, type RequiredDigests, type TextPair, defaultSessionParams, encodeText, negotiateOperational, parseText, type SessionParams } from "./text.ts";

const log = logger("iscsi");

/** Login status class and detail (RFC 7143 section 11.13.5). */
export const LoginStatus = {
  SUCCESS: 0x0000,
  INITIATOR_ERROR: 0x0200,
  AUTHENTICATION_FAILURE: 0x0201,
  AUTHORIZATION_FAILURE: 0x0202,
  NOT_FOUND: 0x0203,
  TARGET_REMOVED: 0x0204,
  UNSUPPORTED_VERSION: 0x0205,
  TOO_MANY_CONNECTIONS: 0x0206,
  MISSING_PARAMETER: 0x0207,
  CANT_INCLUDE_IN_SESSION: 0x0208,
  SESSION_TYPE_NOT_SUPPORTED: 0x0209,
  SESSION_DOES_NOT_EXIST: 0x020a,
  INVALID_DURING_LOGIN: 0x020b,
  TARGET_ERROR: 0x0300,
  SERVICE_UNAVAILABLE: 0x0301,
  OUT_OF_RESOURCES: 0x0302,
} as const;

/** Task management functions and responses (RFC 7143 sections 11.5.1 and 11.6.1). */
const Tmf = { ABORT_TASK: 1, ABORT_TASK_SET: 2, CLEAR_ACA: 3, CLEAR_TASK_SET: 4, LUN_RESET: 5, TARGET_WARM_RESET: 6, TARGET_COLD_RESET: 7, TASK_REASSIGN: 8 } as const;
const TmfResponse = { COMPLETE: 0, NO_TASK: 1, NO_LUN: 2, REASSIGN_NOT_SUPPORTED: 4, NOT_SUPPORTED: 5, REJECTED: 255 } as const;

const STAGE_SECURITY = 0;
const STAGE_OPERATIONAL = 1;
const STAGE_FULL_FEATURE = 3;

/** A session's opened device and its lease on the export's logical unit. */
export interface AttachedUnit {
  readonly device: BlockDevice;
  readonly unit: LogicalUnit;
  release(): void;
}

/** What a connection needs from the target that accepted it (target.ts). */
export interface ConnectionHost {
  readonly limits: IscsiLimits;
  readonly unitName: string;
  /** Read buffers: a READ's Data-In is read into one and given back when the socket has sent it. */
  readonly pool: BufferPool;
  /** Socket read arenas of all connections, bounded (IscsiLimits.readArenaBytesMax). */
  readonly readArenas: ReadArenaBudget;
  readonly budget: { join(key: string): BudgetAccount; leave(account: BudgetAccount, waiter: BudgetWaiter): void; reserve(account: BudgetAccount, bytes: number, waiter: BudgetWaiter): Reservation | undefined };
  /** CHAP: the key of a host identity on this unit (host keys, then --tls-psk), or undefined. */
  keyFor(identity: string): Buffer | undefined;
  /** A peer must prove an identity with CHAP (the unit's --tls require). */
  readonly chapRequired: boolean;
  /** Digests a session must use (--iscsi-require-digest): a login without them fails 02-00. */
  readonly requiredDigests: RequiredDigests;
  /** CHAP is possible at all (the unit has keys: --tls on or require). */
  readonly chapEnabled: boolean;
  /** The export behind a target name, or undefined (02-03). */
  exportOf(targetName: string): string | undefined;
  /** SendTargets: the target names this peer may open. */
  targetsFor(peer: Peer): readonly string[];
  /** Opens the export for the peer and leases the shared logical unit. Throws IpsanError NOT_FOUND / PERMISSION_DENIED. */
  attach(exportName: string, peer: Peer, connection: IscsiConnection): Promise<AttachedUnit>;
  /** The session ended: the logical unit is released and the device closed. */
  detach(attached: AttachedUnit, connection: IscsiConnection): void;
  /** A new TSIH; registers the session (reinstating an older one with the same initiator, ISID and target). */
  registerSession(connection: IscsiConnection, key: string): number;
  /** Whether a session with this TSIH exists (a login adding a connection to it). */
  sessionExists(tsih: number): boolean;
  connectionEnded(connection: IscsiConnection): void;
}

interface R2tState {
  readonly ttt: number;
  readonly offset: number;
  readonly length: number;
  received: number;
  /** DataSN the next Data-Out of this R2T's sequence must carry (RFC 7143 section 11.7.5: from 0 per sequence). */
  dataSN: number;
}

/** The status a command's last Data-In PDU carries (GOOD only). */
interface DataInStatus {
  readonly status: number;
  readonly residualFlag: number;
  readonly residual: number;
}

interface Task {
  readonly itt: number;
  readonly cmdSN: number;
  readonly lun: Buffer;
  readonly cdb: Buffer;
  readonly attribute: TaskAttribute;
  readonly expectedLength: number;
  readonly read: boolean;
  readonly write: boolean;
  /** Data-Out bytes the command needs (min of EDTL and the CDB's length). */
  readonly wanted: number;
  /** Data-Out bytes the CDB transfers per the logical unit (residual against EDTL). */
  readonly cdbDataOut: number;
  buffer: Buffer | undefined;
  /** Unsolicited bytes the initiator will send (immediate + Data-Out with TTT 0xffffffff). */
  unsolicitedEnd: number;
  unsolicitedReceived: number;
  unsolicitedDataSN: number;
  /** Bytes of [0, wanted) received. */
  received: number;
  nextR2tOffset: number;
  r2tSN: number;
  readonly r2ts: Map<number, R2tState>;
  state: "data-out" | "executing" | "done";
  aborted: boolean;
  reservation: Reservation | undefined;
  dataOutTimer: NodeJS.Timeout | undefined;
  /** Immediate data that came before the budget let the task in. */
  pending: Buffer | undefined;
  /** Waiting for budget (no R2T yet): unsolicited Data-Out that came meanwhile is kept in `early`. */
  parked: boolean;
  readonly early: { offset: number; data: Buffer }[];
  settled: Promise<void> | undefined;
  /** What the logical unit was given (from #execute on): abort() names the command by it. */
  request: ScsiRequest | undefined;
  /**
   * A Data-Out came with a DataSN out of order (RFC 7143 section 7.9: an implied
   * digest error). At ErrorRecoveryLevel 0 the task ends (section 7.8, option b):
   * no more R2Ts, the outstanding data is awaited, then CHECK CONDITION
   * ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR, and the connection stays up.
   */
  dataSnError: boolean;
}

type Phase = "login" | "full-feature" | "logging-out" | "closed";

function attributeOf(bits: number): TaskAttribute {
  switch (bits & 0x07) {
    case 2:
      return "ordered";
    case 3:
      return "head-of-queue";
    case 4:
      return "aca";
    default:
      return "simple";
  }
}

/** Consecutive views starting at `offset`, each with its own offset (a task's `early` entries). */
function atOffsets(offset: number, parts: readonly Buffer[]): { offset: number; data: Buffer }[] {
  const out: { offset: number; data: Buffer }[] = [];
  let at = offset;
  for (const data of parts) {
    out.push({ offset: at, data });
    at += data.length;
  }
  return out;
}

function lunIsZero(lun: Buffer): boolean {
  for (let i = 0; i < 8; i += 1) if (lun[i] !== 0) return false;
  return true;
}

/** Fixed-format sense (SPC-4 4.5.3) for errors the transport itself answers. */
function sense(key: number, asc: number, ascq: number): Buffer {
  const out = Buffer.alloc(18);
  out[0] = 0x70;
  out[2] = key;
  out[7] = 10;
  out[12] = asc;
  out[13] = ascq;
  return out;
}

export class IscsiConnection implements BudgetWaiter {
  readonly socket: Socket;
  readonly peerText: string;
  peer: Peer;
  phase: Phase = "login";
  readonly #host: ConnectionHost;
  readonly #limits: IscsiLimits;
  readonly #reader: PduReader;
  readonly #params: SessionParams = defaultSessionParams();
  #account: BudgetAccount;
  // login state
  #loginStage = STAGE_SECURITY;
  #loginPdus = 0;
  #loginText: Buffer[] = [];
  #loginTextBytes = 0;
  #loginStarted = false;
  #isid = Buffer.alloc(6);
  #tsih = 0;
  #initiatorName = "";
  #targetName = "";
  #sessionType: "Normal" | "Discovery" = "Normal";
  #authMethod: "None" | "CHAP" | undefined;
  #authenticated = false;
  #chap: { algorithm: number; identifier: number; challenge: Buffer } | undefined;
  #loginTimer: NodeJS.Timeout | undefined;
  #targetAliasSent = false;
  #declaredSent = false;
  // numbering
  #statSN = 0;
  #expCmdSN = 0;
  #maxCmdSN = 0;
  // full feature phase
  #exportName: string | undefined;
  #attached: AttachedUnit | undefined;
  #device: BlockDevice | undefined;
  #unit: LogicalUnit | undefined;
  #nexus: ScsiNexus | undefined;
  readonly #tasks = new Map<number, Task>();
  #nextTtt = 1;
  #bytesHeld = 0;
  /** PDU processing waits (a login step in progress). */
  #busy = false;
  /**
   * Commands waiting for budget, in arrival order. PDU processing goes on
   * meanwhile (the Data-Out of admitted commands must get through, or budget
   * would never come back); their unsolicited data is kept, at most
   * FirstBurstLength each and queueDepth of them.
   */
  readonly #parked: Task[] = [];
  #nopTimer: NodeJS.Timeout | undefined;
  #lastReceiveMs = performance.now();
  #nopPing: { ttt: number; timer: NodeJS.Timeout } | undefined;
  #textContinuation: { itt: number; ttt: number; rest: Buffer } | undefined;
  #textRequest: { itt: number; parts: Buffer[]; bytes: number } | undefined;
  /** Write data used in place (views of the socket's read memory) by commands still executing, aborted ones included. */
  readonly #borrowed = new Set<Buffer>();
  /** The socket is corked until the end of this turn of the event loop (#send). */
  #batchCorked = false;
  /** The PDUs of one socket chunk are being handled (#onData): answers made meanwhile are batched (#send). */
  #inChunk = false;
  #ended = false;
  /**
   * The plaintext TCP socket's fd in a Normal session without digests, for
   * Data-In by sendfile (#sendDataIn, docs/adr/0018-read-replies-by-sendfile.md);
   * -1: none (digests on, a discovery session, sendfile off, or too small a segment).
   */
  #sendFileFd = -1;

  constructor(host: ConnectionHost, socket: Socket, peer: Peer) {
    this.#host = host;
    this.#limits = host.limits;
    this.socket = socket;
    this.peer = peer;
    this.peerText = `${peer.address}:${peer.port}`;
    // During login, data segments are text: bounded by the text limit (and 8192 is what the RFC lets initiators assume).
    this.#reader = new PduReader(Math.min(this.#limits.textBytesMax, this.#limits.recvDataSegmentBytes));
    this.#account = host.budget.join(peer.address);
    socket.setNoDelay(true);
    socket.on("data", this.#onData);
    socket.on("error", (error) => this.#end(`socket error: ${error.message}`, "debug"));
    socket.on("close", () => this.#end("peer closed the connection", "debug"));
    socket.on("drain", () => this.#process());
    this.#loginTimer = setTimeout(() => this.#drop(`login not finished within ${this.#limits.loginTimeoutMs} ms`), this.#limits.loginTimeoutMs);
  }

  get exportName(): string | undefined {
    return this.#exportName;
  }

  get tsih(): number {
    return this.#tsih;
  }

  // ---------------------------------------------------------------- plumbing

  readonly #onData = (chunk: Buffer): void => {
    if (this.#ended) return;
    this.#reader.push(chunk);
    this.#received();
    this.#inChunk = true;
    try {
      this.#process();
    } finally {
      this.#inChunk = false;
    }
  };

  /**
   * large_reads: a read arena may be reused once nothing views it: no
   * unparsed chunk, no command's immediate or early data, no write executing
   * on a view of it, no text request being gathered. Queued replies never
   * view it (so answers corked while a chunk is handled do not keep an
   * arena from being reused, which cost a fresh 2 MiB arena per 2 MiB of
   * Data-Out: measured, docs/benchmarks.md).
   */
  readonly #mayReuseReadMemory = (store: ArrayBufferLike): boolean => {
    // Replies queued on the socket do not count: none views read memory (a NOP-In's echo and a Reject's header are copies).
    if (this.phase !== "full-feature" || this.#textRequest !== undefined || this.#reader.holds(store)) return false;
    for (const buffer of this.#borrowed) if (buffer.buffer === store) return false;
    for (const task of this.#tasks.values()) {
      if (task.pending?.buffer === store || task.buffer?.buffer === store) return false;
      for (const part of task.early) if (part.data.buffer === store) return false;
    }
    return true;
  };

  #process(): void {
    while (!this.#ended && !this.#busy) {
      if (this.socket.writableLength > this.#limits.replyBytesQueuedMax) {
        // The initiator is not reading its answers: stop reading its requests until the socket drains.
        return;
      }
      let pdu: Pdu | undefined;
      try {
        pdu = this.#reader.next();
      } catch (error) {
        if (error instanceof PduFramingError) {
          if (error.kind === "data-digest" && error.bhs !== undefined && this.phase === "full-feature") this.#reject(error.bhs, RejectReason.DATA_DIGEST_ERROR);
          this.#drop(error.message);
          return;
        }
        throw error;
      }
      if (pdu === undefined) {
        if (this.#reader.bufferedBytes > 0) this.socket.resume();
        return;
      }
      try {
        this.#handle(pdu);
      } catch (error) {
        this.#drop(`internal error handling opcode 0x${opcodeOf(pdu.bhs).toString(16)}: ${errorMessage(error)}`, "error");
        return;
      }
    }
  }

  /** Queues one PDU; `written` runs once the socket has sent it (not if the connection ends first). */
  #send(bhs: Buffer, data: readonly Buffer[] = [], written?: () => void): void {
    if (this.#ended) return;
    if (!this.#batchCorked && (this.#tasks.size > 0 || this.#inChunk)) {
      // Other commands are in flight, or the chunk being handled may hold more (commands answered
      // at once, LogicalUnit.executeNow): PDUs made in this turn of the event loop leave in one
      // writev (the NBD server does the same); a lone command's answer leaves at once.
      this.#batchCorked = true;
      this.socket.cork();
      setImmediate(this.#uncorkBatch);
    }
    const parts = encodePdu(bhs, data, this.phase !== "login" && this.#params.headerDigest, this.phase !== "login" && this.#params.dataDigest);
    this.socket.cork();
    const last = parts.length - 1;
    for (let i = 0; i < last; i += 1) this.socket.write(parts[i]!);
    if (written === undefined) this.socket.write(parts[last]!);
    else this.socket.write(parts[last]!, (error) => { if (error === undefined || error === null) written(); });
    this.socket.uncork();
  }

  readonly #uncorkBatch = (): void => {
    this.#batchCorked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  /** Fills StatSN (advancing it when `advance`), ExpCmdSN and MaxCmdSN at 24, 28, 32. */
  #numbers(bhs: Buffer, advance: boolean): void {
    bhs.writeUInt32BE(this.#statSN, 24);
    if (advance) this.#statSN = snAdd(this.#statSN, 1);
    this.#updateMaxCmdSN();
    bhs.writeUInt32BE(this.#expCmdSN, 28);
    bhs.writeUInt32BE(this.#maxCmdSN, 32);
  }

  #updateMaxCmdSN(): void {
    const room = Math.max(0, this.#limits.queueDepth - this.#tasks.size);
    const computed = snAdd(this.#expCmdSN, room - 1);
    if (snLess(this.#maxCmdSN, computed)) this.#maxCmdSN = computed;
  }

  #drop(reason: string, level: "warn" | "error" | "debug" = "warn"): void {
    this.#end(reason, level);
  }

  /** Ends the connection (idempotent): tasks are abandoned, the device and logical unit released, the socket destroyed. */
  #end(reason: string, level: "warn" | "error" | "debug" | "info" = "info"): void {
    if (this.#ended) return;
    this.#ended = true;
    this.phase = "closed";
    const fields = { peer: this.peerText, initiator: this.#initiatorName || undefined, target: this.#targetName || undefined };
    if (level === "debug") log.debug(`connection closed: ${reason}`, fields);
    else log.limited(`iscsi_drop:${this.peer.address}`, `connection closed: ${reason}`, fields);
    clearTimeout(this.#loginTimer);
    clearTimeout(this.#nopTimer);
    if (this.#nopPing !== undefined) clearTimeout(this.#nopPing.timer);
    for (const task of this.#tasks.values()) {
      // One waiting in the logical unit's task set must not run after its session is gone, nor hold up other sessions.
      if (task.state === "executing" && task.request !== undefined) this.#unit?.abort?.(task.request);
      this.#finishTask(task);
    }
    this.#tasks.clear();
    this.#host.budget.leave(this.#account, this);
    if (this.#batchCorked) {
      // What this turn queued (a Reject, a last response) goes out before the socket is destroyed.
      this.#batchCorked = false;
      this.socket.uncork();
    }
    this.socket.destroy();
    if (this.#nexus !== undefined) this.#unit?.nexusRemoved(this.#nexus);
    if (this.#attached !== undefined) this.#host.detach(this.#attached, this);
    this.#host.connectionEnded(this);
  }

  /** Server shutdown or session reinstatement: drop now. */
  close(reason: string): void {
    this.#end(reason, "info");
  }

  /** The device was revoked (volume deleted, grant changed): drop at once, like NBD. */
  revoked(error: Error): void {
    this.#end(`device revoked: ${error.message}`, "warn");
  }

  // ---------------------------------------------------------------- dispatch

  #handle(pdu: Pdu): void {
    const opcode = opcodeOf(pdu.bhs);
    if (this.phase === "login") {
      if (opcode !== Op.LOGIN_REQUEST) {
        this.#drop(`opcode 0x${opcode.toString(16)} before login finished`);
        return;
      }
      this.#login(pdu);
      return;
    }
    if (this.phase !== "full-feature") return;
    switch (opcode) {
      case Op.SCSI_COMMAND:
        this.#scsiCommand(pdu);
        return;
      case Op.DATA_OUT:
        this.#dataOut(pdu);
        return;
      case Op.NOP_OUT:
        this.#nopOut(pdu);
        return;
      case Op.TASK_MGMT_REQUEST:
        this.#taskManagement(pdu);
        return;
      case Op.TEXT_REQUEST:
        this.#text(pdu);
        return;
      case Op.LOGOUT_REQUEST:
        this.#logout(pdu);
        return;
      case Op.LOGIN_REQUEST:
        this.#reject(pdu.bhs, RejectReason.PROTOCOL_ERROR);
        this.#drop("login request in full feature phase");
        return;
      case Op.SNACK_REQUEST:
        // ERL 0: no SNACK support (RFC 7143 section 11.16).
        this.#reject(pdu.bhs, RejectReason.PROTOCOL_ERROR);
        return;
      default:
        this.#reject(pdu.bhs, RejectReason.COMMAND_NOT_SUPPORTED);
    }
  }

  #reject(rejected: Buffer, reason: number): void {
    const bhs = newBhs(Op.REJECT, 0x80);
    bhs[2] = reason;
    bhs.writeUInt32BE(RESERVED_TAG, 16);
    this.#numbers(bhs, true);
    this.#send(bhs, [Buffer.from(rejected.subarray(0, 48))]);
  }

  /**
   * CmdSN check of a non-immediate PDU (RFC 7143 section 4.2.2.1): the
   * expected one advances ExpCmdSN; any other is outside what a single
   * connection can send and is ignored (logged).
   */
  #acceptCmdSN(bhs: Buffer): boolean {
    const cmdSN = bhs.readUInt32BE(24);
    if (immediateOf(bhs)) return true;
    if (cmdSN === this.#expCmdSN) {
      this.#expCmdSN = snAdd(this.#expCmdSN, 1);
      return true;
    }
    log.limited(`iscsi_cmdsn:${this.peer.address}`, "command ignored: CmdSN is not the expected one", { peer: this.peerText, cmdSN, expCmdSN: this.#expCmdSN, maxCmdSN: this.#maxCmdSN });
    return false;
  }

  // ---------------------------------------------------------------- login

  #loginFail(bhs: Buffer, status: number, why: string): void {
    const response = this.#loginResponseBhs(bhs, false, this.#loginStage, this.#loginStage);
    response[36] = status >> 8;
    response[37] = status & 0xff;
    this.#send(response);
    this.socket.end();
    this.#end(`login refused (status 0x${status.toString(16).padStart(4, "0")}): ${why}`, "warn");
  }

  #loginResponseBhs(request: Buffer, transit: boolean, csg: number, nsg: number): Buffer {
    const bhs = newBhs(Op.LOGIN_RESPONSE, (transit ? 0x80 : 0) | (csg << 2) | (transit ? nsg : 0));
    bhs[2] = 0x00; // Version-max
    bhs[3] = 0x00; // Version-active
    this.#isid.copy(bhs, 8);
    bhs.writeUInt16BE(this.#tsih, 14);
    bhs.writeUInt32BE(ittOf(request), 16);
    this.#numbers(bhs, true);
    return bhs;
  }

  #login(pdu: Pdu): void {
    const bhs = pdu.bhs;
    this.#loginPdus += 1;
    if (this.#loginPdus > this.#limits.negotiationPdusMax) {
      this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, `more than ${this.#limits.negotiationPdusMax} login PDUs`);
      return;
    }
    const transit = (bhs[1]! & 0x80) !== 0;
    const more = (bhs[1]! & 0x40) !== 0;
    const csg = (bhs[1]! >> 2) & 0x03;
    const nsg = bhs[1]! & 0x03;
    if (!this.#loginStarted) {
      this.#loginStarted = true;
      bhs.copy(this.#isid, 0, 8, 14);
      const versionMin = bhs[3]!;
      const cmdSN = bhs.readUInt32BE(24);
      this.#expCmdSN = cmdSN;
      this.#maxCmdSN = snAdd(cmdSN, this.#limits.queueDepth - 1);
      this.#statSN = (Math.random() * 0x1_0000) >>> 0;
      const tsih = bhs.readUInt16BE(14);
      if (versionMin !== 0) {
        this.#loginFail(bhs, LoginStatus.UNSUPPORTED_VERSION, `version-min ${versionMin} (only 0 is defined)`);
        return;
      }
      if (tsih !== 0) {
        // MaxConnections=1: a connection cannot join an existing session.
        const exists = this.#host.sessionExists(tsih);
        this.#loginFail(bhs, exists ? LoginStatus.TOO_MANY_CONNECTIONS : LoginStatus.SESSION_DOES_NOT_EXIST, exists ? "MaxConnections is 1" : `TSIH ${tsih} names no session`);
        return;
      }
      if (csg === 2 || (transit && (nsg === 2 || nsg <= csg))) {
        this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, `invalid stages CSG=${csg} NSG=${nsg} T=${transit}`);
        return;
      }
      this.#loginStage = csg;
    } else if (csg !== this.#loginStage) {
      this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, `CSG ${csg} while in stage ${this.#loginStage}`);
      return;
    }
    if (transit && more) {
      this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, "T and C both set");
      return;
    }
    this.#loginTextBytes += pdu.data.length;
    if (this.#loginTextBytes > this.#limits.textBytesMax) {
      this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, `login text exceeds ${this.#limits.textBytesMax} bytes`);
      return;
    }
    this.#loginText.push(pdu.data);
    if (more) {
      // More text follows: answer with an empty response (RFC 7143 section 11.12.3).
      this.#send(this.#loginResponseBhs(bhs, false, csg, 0));
      return;
    }
    const text = Buffer.concat(this.#loginText);
    this.#loginText = [];
    this.#loginTextBytes = 0;
    let pairs: TextPair[];
    try {
      pairs = parseText(text, this.#limits);
    } catch (error) {
      this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, error instanceof TextError ? error.message : errorMessage(error));
      return;
    }
    this.#busy = true;
    this.#loginStep(bhs, pairs, transit, csg, nsg).then(
      () => {
        this.#busy = false;
        this.#process();
      },
      (error: unknown) => this.#drop(`login failed: ${errorMessage(error)}`, "error"),
    );
  }

  async #loginStep(bhs: Buffer, pairs: TextPair[], transit: boolean, csg: number, nsg: number): Promise<void> {
    const get = (key: string): string | undefined => pairs.find(([k]) => k === key)?.[1];
    const answers: TextPair[] = [];
    // Declarations of the leading login.
    const initiatorName = get("InitiatorName");
    if (initiatorName !== undefined) {
      if (this.#initiatorName !== "" && initiatorName !== this.#initiatorName) return this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, "InitiatorName changed during login");
      if (initiatorName.length === 0 || initiatorName.length > 223) return this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, "InitiatorName is empty or longer than 223 bytes");
      this.#initiatorName = initiatorName;
      this.peer = { ...this.peer, initiator: initiatorName.toLowerCase() };
    }
    const sessionType = get("SessionType");
    if (sessionType !== undefined) {
      if (sessionType !== "Normal" && sessionType !== "Discovery") return this.#loginFail(bhs, LoginStatus.SESSION_TYPE_NOT_SUPPORTED, `SessionType ${sessionType}`);
      this.#sessionType = sessionType;
    }
    const targetName = get("TargetName");
    if (targetName !== undefined) this.#targetName = targetName;
    if (this.#initiatorName === "") return this.#loginFail(bhs, LoginStatus.MISSING_PARAMETER, "no InitiatorName in the first login request");
    if (this.#sessionType === "Normal") {
      if (this.#targetName === "") return this.#loginFail(bhs, LoginStatus.MISSING_PARAMETER, "no TargetName for a normal session");
      if (this.#host.exportOf(this.#targetName) === undefined) return this.#loginFail(bhs, LoginStatus.NOT_FOUND, `no target ${this.#targetName} on unit ${this.#host.unitName}`);
    }
    if (!this.#targetAliasSent && this.#sessionType === "Normal") {
      this.#targetAliasSent = true;
      answers.push(["TargetPortalGroupTag", "1"]);
    }

    if (csg === STAGE_SECURITY) {
      const done = this.#security(bhs, pairs, answers);
      if (done === "failed") return;
      if (transit && done === "complete") this.#authenticated = true;
      if (transit && done !== "complete") {
        // Not ready to leave the security stage yet: answer without T.
        this.#sendLogin(bhs, answers, false, csg, nsg);
        return;
      }
    } else {
      // Operational stage. Skipping security means AuthMethod None.
      if (!this.#authenticated) {
        if (this.#host.chapRequired) return this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, "this unit requires CHAP (its NBD side requires TLS identities); the initiator skipped the security stage");
        this.#authenticated = true;
        this.#authMethod = "None";
      }
      const operational = pairs.filter(([key]) => !key.startsWith("CHAP_") && key !== "AuthMethod");
      const result = negotiateOperational(operational, this.#params, this.#limits, "login", this.#sessionType, this.#host.requiredDigests);
      answers.push(...result.answers);
      if (pairs.some(([key]) => key.startsWith("CHAP_") || key === "AuthMethod")) {
        for (const [key] of pairs) if (key.startsWith("CHAP_") || key === "AuthMethod") answers.push([key, "Irrelevant"]);
      }
    }
    if (!this.#declaredSent && (csg === STAGE_OPERATIONAL || (transit && nsg !== STAGE_SECURITY))) {
      // Our declarative MaxRecvDataSegmentLength: said once, before full feature phase.
      this.#declaredSent = true;
      answers.push(["MaxRecvDataSegmentLength", String(this.#limits.recvDataSegmentBytes)]);
    }
    if (transit && nsg === STAGE_FULL_FEATURE) {
      const required = this.#host.requiredDigests;
      for (const [kind, on, wanted] of [["HeaderDigest", this.#params.headerDigest, required.header], ["DataDigest", this.#params.dataDigest, required.data]] as const) {
        if (wanted && !on) return this.#loginFail(bhs, LoginStatus.INITIATOR_ERROR, `this unit requires ${kind}=CRC32C (ipsan unit --iscsi-require-digest); the initiator did not offer CRC32C`);
      }
      if (this.#sessionType === "Normal") {
        const exportName = this.#host.exportOf(this.#targetName);
        if (exportName === undefined) return this.#loginFail(bhs, LoginStatus.TARGET_REMOVED, `target ${this.#targetName} is gone`);
        try {
          const attached = await this.#host.attach(exportName, this.peer, this);
          if (this.#ended) {
            this.#host.detach(attached, this);
            return;
          }
          this.#exportName = exportName;
          this.#attached = attached;
          this.#device = attached.device;
          this.#unit = attached.unit;
        } catch (error) {
          if (this.#ended) return;
          if (error instanceof IpsanError && error.code === "PERMISSION_DENIED") return this.#loginFail(bhs, LoginStatus.AUTHORIZATION_FAILURE, `${this.peerText} (initiator ${this.#initiatorName}${this.peer.identity === undefined ? "" : `, CHAP user ${this.peer.identity}`}) may not open ${this.#targetName}`);
          if (error instanceof IpsanError && error.code === "NOT_FOUND") return this.#loginFail(bhs, LoginStatus.NOT_FOUND, `target ${this.#targetName}: ${error.message}`);
          return this.#loginFail(bhs, LoginStatus.TARGET_ERROR, `cannot open ${this.#targetName}: ${errorMessage(error)}`);
        }
      }
      const key = `${this.#initiatorName.toLowerCase()},${this.#isid.toString("hex")},${this.#targetName.toLowerCase()}`;
      this.#tsih = this.#host.registerSession(this, key);
      this.#sendLogin(bhs, answers, true, csg, nsg);
      this.#enterFullFeature();
      return;
    }
    if (transit && nsg === STAGE_OPERATIONAL) {
      this.#sendLogin(bhs, answers, true, csg, nsg);
      this.#loginStage = STAGE_OPERATIONAL;
      return;
    }
    this.#sendLogin(bhs, answers, false, csg, nsg);
  }

  #sendLogin(request: Buffer, answers: readonly TextPair[], transit: boolean, csg: number, nsg: number): void {
    const bhs = this.#loginResponseBhs(request, transit, csg, nsg);
    // A Login Response with C set would need the initiator to ask for the rest; ours always fit.
    this.#send(bhs, answers.length === 0 ? [] : [encodeText(answers)]);
  }

  /** Security stage keys. "complete" when authentication is done (or None chosen). */
  #security(bhs: Buffer, pairs: readonly TextPair[], answers: TextPair[]): "complete" | "pending" | "failed" {
    const get = (key: string): string | undefined => pairs.find(([k]) => k === key)?.[1];
    const authMethod = get("AuthMethod");
    if (authMethod !== undefined && this.#authMethod === undefined) {
      const offered = authMethod.split(",");
      const chapOk = this.#host.chapEnabled && offered.includes("CHAP");
      const noneOk = !this.#host.chapRequired && offered.includes("None");
      // The initiator's order, restricted to what we accept.
      const choice = offered.find((item) => (item === "CHAP" && chapOk) || (item === "None" && noneOk));
      if (choice === undefined) {
        this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, `AuthMethod ${authMethod}: this unit accepts ${this.#host.chapRequired ? "CHAP only" : this.#host.chapEnabled ? "CHAP or None" : "None only (it has no CHAP keys)"}`);
        return "failed";
      }
      this.#authMethod = choice as "None" | "CHAP";
      answers.push(["AuthMethod", choice]);
    }
    for (const [key] of pairs) {
      if (key === "AuthMethod" || key.startsWith("CHAP_") || key === "InitiatorName" || key === "InitiatorAlias" || key === "TargetName" || key === "SessionType") continue;
      // Operational keys in the security stage: answered too (RFC 7143 allows them in either stage).
      const result = negotiateOperational([[key, get(key)!]], this.#params, this.#limits, "login", this.#sessionType);
      answers.push(...result.answers);
    }
    if (this.#authMethod === undefined) {
      if (this.#host.chapRequired) {
        this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, "this unit requires CHAP and the initiator offered no AuthMethod");
        return "failed";
      }
      this.#authMethod = "None";
      return "complete";
    }
    if (this.#authMethod === "None") return "complete";
    // CHAP.
    const chapA = get("CHAP_A");
    if (this.#chap === undefined) {
      if (chapA === undefined) return "pending";
      const algorithm = chooseChapAlgorithm(chapA);
      if (algorithm === undefined) {
        answers.push(["CHAP_A", "Reject"]);
        this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, `CHAP_A ${chapA}: this unit supports 5 (MD5) and 7 (SHA-256)`);
        return "failed";
      }
      const { identifier, challenge } = newChallenge(algorithm);
      this.#chap = { algorithm, identifier, challenge };
      answers.push(["CHAP_A", String(algorithm)], ["CHAP_I", String(identifier)], ["CHAP_C", formatBinary(challenge)]);
      return "pending";
    }
    if (this.#authenticated) return "complete";
    const name = get("CHAP_N");
    const response = get("CHAP_R");
    if (name === undefined || response === undefined) {
      this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, "CHAP: expected CHAP_N and CHAP_R");
      return "failed";
    }
    const received = parseBinary(response);
    const key = this.#host.keyFor(name);
    if (key === undefined || received === undefined) {
      this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, `CHAP: ${key === undefined ? `no key for user "${name}" on this unit` : "malformed CHAP_R"}`);
      return "failed";
    }
    const expected = chapResponse(this.#chap.algorithm, this.#chap.identifier, chapSecret(key, "initiator"), this.#chap.challenge);
    if (!responsesEqual(expected, received)) {
      this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, `CHAP: wrong response for user "${name}"`);
      return "failed";
    }
    // Mutual CHAP: the initiator challenges us.
    const theirI = get("CHAP_I");
    const theirC = get("CHAP_C");
    if (theirI !== undefined || theirC !== undefined) {
      const identifier = theirI === undefined || !/^[0-9]{1,3}$/.test(theirI) ? -1 : Number(theirI);
      const challenge = theirC === undefined ? undefined : parseBinary(theirC);
      if (identifier < 0 || identifier > 255 || challenge === undefined || challenge.length === 0 || challenge.length > 1024) {
        this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP: malformed CHAP_I or CHAP_C");
        return "failed";
      }
      if (challenge.equals(this.#chap.challenge)) {
        // RFC 7143 section 12.1.3: a reflected challenge is an attack.
        this.#loginFail(bhs, LoginStatus.AUTHENTICATION_FAILURE, "mutual CHAP: the initiator sent back our own challenge");
        return "failed";
      }
      answers.push(["CHAP_N", this.#targetName || `${this.#host.unitName}`], ["CHAP_R", formatBinary(chapResponse(this.#chap.algorithm, identifier, chapSecret(key, "target"), challenge))]);
    }
    this.peer = { ...this.peer, identity: name, keyId: pskKeyId(key) };
    this.#authenticated = true;
    return "complete";
  }

  #enterFullFeature(): void {
    clearTimeout(this.#loginTimer);
    this.#loginTimer = undefined;
    this.phase = "full-feature";
    this.#reader.headerDigest = this.#params.headerDigest;
    this.#reader.dataDigest = this.#params.dataDigest;
    this.#reader.dataSegmentBytesMax = this.#limits.recvDataSegmentBytes;
    if (this.#sessionType === "Normal" && this.#unit !== undefined) {
      this.#nexus = { initiatorName: this.#initiatorName, isid: this.#isid.toString("hex"), targetPortalGroupTag: 1, relativeTargetPort: 1, targetName: this.#targetName };
      this.#unit.nexusAdded(this.#nexus);
      this.#device?.onRevoked?.((error) => this.revoked(error));
      // Reads of up to 2 MiB into a reused arena: a 256 KiB Data-Out is one read and a view, not
      // four 64 KiB chunks gathered into a fresh buffer (src/nbd/large_reads.ts). The arena comes
      // with the first bulk data, within the target's budget: idle sessions pin none.
      useLargeReads(this.socket, this.#onData, this.#mayReuseReadMemory, this.#host.readArenas);
      // Large READs' Data-In by sendfile: only without digests (a data digest needs the bytes in the
      // process), with segments and bursts large enough that a PDU is worth its extra system calls, and
      // whole blocks (so every PDU of a READ is a multiple of 4 bytes: sendfile sends no padding).
      const segment = this.#params.initiatorRecvDataSegmentBytes;
      const burst = this.#params.maxBurstBytes;
      if (!this.#params.headerDigest && !this.#params.dataDigest && Math.min(segment, burst) >= SEND_FILE_BYTES_MIN && segment % LOGICAL_BLOCK_BYTES === 0 && burst % LOGICAL_BLOCK_BYTES === 0) {
        this.#sendFileFd = sendFileSocketFd(this.socket);
      }
    }
    log.info("session logged in", {
      peer: this.peerText,
      initiator: this.#initiatorName,
      type: this.#sessionType,
      target: this.#targetName || undefined,
      auth: this.#authMethod,
      identity: this.peer.identity,
      headerDigest: this.#params.headerDigest,
      dataDigest: this.#params.dataDigest,
      // The negotiated transfer sizes: what the data path's PDU and R2T counts follow from.
      maxRecvDataSegment: this.#limits.recvDataSegmentBytes,
      maxSendDataSegment: this.#params.initiatorRecvDataSegmentBytes,
      maxBurst: this.#params.maxBurstBytes,
      firstBurst: this.#params.firstBurstBytes,
      immediateData: this.#params.immediateData,
      initialR2T: this.#params.initialR2T,
      maxOutstandingR2T: this.#params.maxOutstandingR2t,
      tsih: this.#tsih,
    });
    this.#armNop();
  }

  // ---------------------------------------------------------------- keepalive

  /** Starts the keepalive: a timer that pings once nothing came for nopInIntervalMs (no timer churn per chunk). */
  #armNop(): void {
    if (this.phase !== "full-feature" || this.#nopTimer !== undefined) return;
    const check = (): void => {
      if (this.phase !== "full-feature") return;
      const idleMs = performance.now() - this.#lastReceiveMs;
      if (idleMs >= this.#limits.nopInIntervalMs && this.#nopPing === undefined) this.#ping();
      const waitMs = this.#nopPing !== undefined ? this.#limits.nopInIntervalMs : this.#limits.nopInIntervalMs - idleMs;
      this.#nopTimer = setTimeout(check, Math.max(1, waitMs));
      this.#nopTimer.unref();
    };
    this.#nopTimer = setTimeout(check, this.#limits.nopInIntervalMs);
    this.#nopTimer.unref();
  }

  /** Bytes came: the initiator is alive (an outstanding ping counts as answered). */
  #received(): void {
    this.#lastReceiveMs = performance.now();
    if (this.#nopPing !== undefined) {
      clearTimeout(this.#nopPing.timer);
      this.#nopPing = undefined;
    }
  }

  #ping(): void {
    if (this.phase !== "full-feature") return;
    const ttt = this.#newTtt();
    const bhs = newBhs(Op.NOP_IN, 0x80);
    bhs.writeUInt32BE(RESERVED_TAG, 16);
    bhs.writeUInt32BE(ttt, 20);
    this.#numbers(bhs, false);
    this.#send(bhs);
    const timer = setTimeout(() => this.#drop(`NOP-In ping not answered within ${this.#limits.nopInTimeoutMs} ms`), this.#limits.nopInTimeoutMs);
    timer.unref();
    this.#nopPing = { ttt, timer };
  }

  #newTtt(): number {
    const ttt = this.#nextTtt;
    this.#nextTtt = this.#nextTtt >= 0x7fff_ffff ? 1 : this.#nextTtt + 1;
    return ttt;
  }

  #nopOut(pdu: Pdu): void {
    const bhs = pdu.bhs;
    const itt = ittOf(bhs);
    if (itt === RESERVED_TAG) {
      // An answer to our ping (its TTT), or a ping that wants no answer; #received() already cleared the ping.
      return;
    }
    if (!this.#acceptCmdSN(bhs)) return;
    const answer = newBhs(Op.NOP_IN, 0x80);
    bhs.copy(answer, 8, 8, 16); // LUN
    answer.writeUInt32BE(itt, 16);
    answer.writeUInt32BE(RESERVED_TAG, 20);
    this.#numbers(answer, true);
    // A copy (at most MaxRecvDataSegmentLength): no reply views the socket's read memory (#mayReuseReadMemory).
    const echo = Buffer.from(pdu.data.subarray(0, Math.min(pdu.data.length, this.#params.initiatorRecvDataSegmentBytes)));
    this.#send(answer, echo.length === 0 ? [] : [echo]);
  }

  // ---------------------------------------------------------------- text

  #text(pdu: Pdu): void {
    const bhs = pdu.bhs;
    const itt = ittOf(bhs);
    const ttt = bhs.readUInt32BE(20);
    const more = (bhs[1]! & 0x40) !== 0;
    if (!this.#acceptCmdSN(bhs)) return;
    if (this.#textContinuation !== undefined && ttt === this.#textContinuation.ttt && pdu.data.length === 0) {
      const rest = this.#textContinuation.rest;
      this.#textContinuation = undefined;
      this.#sendText(itt, rest);
      return;
    }
    if (ttt !== RESERVED_TAG) {
      // An initiator resetting (or abandoning) a continuation: start over.
      this.#textContinuation = undefined;
    }
    const request = this.#textRequest?.itt === itt ? this.#textRequest : { itt, parts: [], bytes: 0 };
    request.parts.push(pdu.data);
    request.bytes += pdu.data.length;
    if (request.bytes > this.#limits.textBytesMax || request.parts.length > this.#limits.negotiationPdusMax) {
      this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
      this.#drop(`text request over ${this.#limits.textBytesMax} bytes or ${this.#limits.negotiationPdusMax} PDUs`);
      return;
    }
    if (more) {
      this.#textRequest = request;
      const answer = newBhs(Op.TEXT_RESPONSE, 0x00);
      answer.writeUInt32BE(itt, 16);
      answer.writeUInt32BE(this.#newTtt(), 20);
      this.#numbers(answer, true);
      this.#send(answer);
      return;
    }
    this.#textRequest = undefined;
    let pairs: TextPair[];
    try {
      pairs = parseText(Buffer.concat(request.parts), this.#limits);
    } catch (error) {
      this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
      this.#drop(`bad text request: ${errorMessage(error)}`);
      return;
    }
    const answers: TextPair[] = [];
    const sendTargets = pairs.find(([key]) => key === "SendTargets")?.[1];
    const others = pairs.filter(([key]) => key !== "SendTargets");
    if (sendTargets !== undefined) answers.push(...this.#sendTargets(sendTargets));
    if (others.length > 0) answers.push(...negotiateOperational(others, this.#params, this.#limits, "full-feature", this.#sessionType).answers);
    this.#sendText(itt, encodeText(answers));
  }

  #sendTargets(which: string): TextPair[] {
    const portal = `${this.socket.localAddress?.startsWith("::ffff:") === true && this.socket.localAddress.includes(".") ? this.socket.localAddress.slice(7) : (this.socket.localAddress ?? "127.0.0.1")}`;
    const address = portal.includes(":") ? `[${portal}]` : portal;
    const targetAddress = `${address}:${this.socket.localPort ?? 3260},1`;
    let names: readonly string[];
    if (this.#sessionType === "Discovery") {
      const all = this.#host.targetsFor(this.peer);
      names = which === "All" ? all : all.filter((name) => name === which);
    } else {
      // In a normal session: only the session's own target (RFC 7143 appendix C).
      names = which === "" || which === this.#targetName ? [this.#targetName] : [];
    }
    const out: TextPair[] = [];
    for (const name of names) out.push(["TargetName", name], ["TargetAddress", targetAddress]);
    return out;
  }

  /** A Text Response, in several PDUs (C bit, TTT) when longer than the initiator accepts. */
  #sendText(itt: number, text: Buffer): void {
    const limit = this.#params.initiatorRecvDataSegmentBytes;
    const answer = newBhs(Op.TEXT_RESPONSE, 0x80);
    answer.writeUInt32BE(itt, 16);
    if (text.length > limit) {
      answer[1] = 0x40;
      const ttt = this.#newTtt();
      answer.writeUInt32BE(ttt, 20);
      this.#textContinuation = { itt, ttt, rest: Buffer.from(text.subarray(limit)) };
      this.#numbers(answer, true);
      this.#send(answer, [text.subarray(0, limit)]);
      return;
    }
    answer.writeUInt32BE(RESERVED_TAG, 20);
    this.#numbers(answer, true);
    this.#send(answer, text.length === 0 ? [] : [text]);
  }

  // ---------------------------------------------------------------- logout

  #logout(pdu: Pdu): void {
    const bhs = pdu.bhs;
    if (!this.#acceptCmdSN(bhs)) return;
    const reason = bhs[1]! & 0x7f;
    const answer = newBhs(Op.LOGOUT_RESPONSE, 0x80);
    answer.writeUInt32BE(ittOf(bhs), 16);
    if (reason === 2) {
      // Remove the connection for recovery: ERL 0 has no connection recovery.
      answer[2] = 2;
      this.#numbers(answer, true);
      this.#send(answer);
      return;
    }
    this.phase = "logging-out";
    const settle = [...this.#tasks.values()].map((task) => task.settled ?? Promise.resolve());
    for (const task of this.#tasks.values()) if (task.state === "data-out") this.#finishTask(task);
    const timeout = new Promise<void>((resolve) => setTimeout(resolve, this.#limits.closeTimeoutMs).unref());
    void Promise.race([Promise.all(settle), timeout]).then(() => {
      if (this.#ended) return;
      answer[2] = 0;
      answer.writeUInt16BE(0, 40); // Time2Wait
      answer.writeUInt16BE(0, 42); // Time2Retain
      this.#numbers(answer, true);
      this.#send(answer);
      this.socket.end();
      this.#end("logged out", "debug");
    });
  }

  // ---------------------------------------------------------------- task management

  #taskManagement(pdu: Pdu): void {
    const bhs = pdu.bhs;
    if (!this.#acceptCmdSN(bhs)) return;
    const fn = bhs[1]! & 0x7f;
    const itt = ittOf(bhs);
    const answer = newBhs(Op.TASK_MGMT_RESPONSE, 0x80);
    answer.writeUInt32BE(itt, 16);
    const respond = (code: number): void => {
      if (this.#ended) return;
      answer[2] = code;
      this.#numbers(answer, true);
      this.#send(answer);
    };
    const lun = bhs.subarray(8, 16);
    const settleAll = (tasks: Task[]): Promise<void> => {
      for (const task of tasks) this.#abort(task);
      const timeout = new Promise<void>((resolve) => setTimeout(resolve, this.#limits.closeTimeoutMs).unref());
      return Promise.race([Promise.all(tasks.map((task) => task.settled ?? Promise.resolve())).then(() => undefined), timeout]);
    };
    switch (fn) {
      case Tmf.ABORT_TASK: {
        const referenced = bhs.readUInt32BE(20);
        const task = this.#tasks.get(referenced);
        if (task === undefined) {
          // One connection delivers commands in order: a RefCmdSN below ExpCmdSN came and is done
          // (answered already): "task does not exist". One not yet received counts as received and
          // aborted (RFC 7143 section 11.5.1): "function complete".
          const refCmdSN = bhs.readUInt32BE(32);
          respond(snLess(refCmdSN, this.#expCmdSN) ? TmfResponse.NO_TASK : TmfResponse.COMPLETE);
          return;
        }
        void settleAll([task]).then(() => respond(TmfResponse.COMPLETE));
        return;
      }
      case Tmf.ABORT_TASK_SET:
      case Tmf.CLEAR_TASK_SET:
        if (this.#sessionType !== "Normal" || !lunIsZero(lun)) return respond(TmfResponse.NO_LUN);
        void settleAll([...this.#tasks.values()]).then(() => respond(TmfResponse.COMPLETE));
        return;
      case Tmf.LUN_RESET:
      case Tmf.TARGET_WARM_RESET:
        if (this.#sessionType !== "Normal" || (fn === Tmf.LUN_RESET && !lunIsZero(lun))) return respond(TmfResponse.NO_LUN);
        void settleAll([...this.#tasks.values()]).then(() => {
          if (this.#nexus !== undefined) this.#unit?.reset(this.#nexus);
          respond(TmfResponse.COMPLETE);
        });
        return;
      case Tmf.TARGET_COLD_RESET:
        // A warm reset, then the connection goes (RFC 7143 section 11.5.1: the response first).
        if (this.#sessionType !== "Normal") return respond(TmfResponse.NOT_SUPPORTED);
        void settleAll([...this.#tasks.values()]).then(() => {
          if (this.#nexus !== undefined) this.#unit?.reset(this.#nexus);
          respond(TmfResponse.COMPLETE);
          this.socket.end();
          this.#end("TARGET COLD RESET: the session ends", "info");
        });
        return;
      case Tmf.TASK_REASSIGN:
        return respond(TmfResponse.REASSIGN_NOT_SUPPORTED);
      default:
        return respond(TmfResponse.NOT_SUPPORTED);
    }
  }

  /** Aborts a task: no response will be sent for it; its Data-Out is no longer waited for; if it waits in the task set, it never runs. */
  #abort(task: Task): void {
    task.aborted = true;
    if (task.state === "data-out") this.#finishTask(task);
    else if (task.state === "executing" && task.request !== undefined) this.#unit?.abort?.(task.request);
  }

  // ---------------------------------------------------------------- SCSI commands

  #scsiCommand(pdu: Pdu): void {
    const bhs = pdu.bhs;
    if (this.#sessionType !== "Normal" || this.#unit === undefined) {
      this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
      this.#drop("SCSI command in a discovery session");
      return;
    }
    const itt = ittOf(bhs);
    if (this.#tasks.has(itt)) {
      this.#reject(bhs, RejectReason.TASK_IN_PROGRESS);
      return;
    }
    if (!immediateOf(bhs) && this.#tasks.size >= this.#limits.queueDepth) {
      this.#drop(`more than ${this.#limits.queueDepth} commands outstanding (MaxCmdSN was not honoured)`);
      return;
    }
    if (!this.#acceptCmdSN(bhs)) return;
    const flags = bhs[1]!;
    const read = (flags & 0x40) !== 0;
    const write = (flags & 0x20) !== 0;
    const expectedLength = bhs.readUInt32BE(20);
    let cdb = bhs.subarray(32, 48);
    let bidiReadLength: number | undefined;
    if (pdu.ahs.length > 0) {
      const segments = parseAhs(pdu.ahs);
      if (segments === undefined) {
        this.#reject(bhs, RejectReason.INVALID_PDU_FIELD);
        return;
      }
      for (const segment of segments) {
        if (segment.type === AhsType.EXTENDED_CDB) cdb = Buffer.concat([cdb, segment.body.subarray(1)]);
        else if (segment.type === AhsType.BIDI_READ_LENGTH && segment.body.length >= 5) bidiReadLength = segment.body.readUInt32BE(1);
      }
    }
    cdb = Buffer.from(cdb);
    const unit = this.#unit;
    // The CDB's own Data-Out length, W bit or not: a write CDB with EDTL 0 (and no W) is an overflow, not "no data".
    const cdbDataOut = unit.dataOutLength(cdb);
    const wanted = write ? Math.min(expectedLength, cdbDataOut) : 0;
    // Immediate data: one view when it came in one socket chunk (kept as `pending`), else its views in `early`.
    const immediateBytes = pdu.dataLength;
    if (!write && immediateBytes > 0) {
      this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
      this.#drop("immediate data with a command that has no W bit");
      return;
    }
    if (immediateBytes > 0 && (!this.#params.immediateData || immediateBytes > Math.min(this.#params.firstBurstBytes, expectedLength))) {
      this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
      this.#drop(`immediate data of ${immediateBytes} bytes not allowed (ImmediateData=${this.#params.immediateData ? "Yes" : "No"}, FirstBurstLength ${this.#params.firstBurstBytes}, EDTL ${expectedLength})`);
      return;
    }
    const final = finalOf(bhs);
    let unsolicitedEnd = immediateBytes;
    if (write && !this.#params.initialR2T && !final) unsolicitedEnd = Math.min(expectedLength, this.#params.firstBurstBytes);
    const task: Task = {
      itt,
      cmdSN: bhs.readUInt32BE(24),
      lun: Buffer.from(bhs.subarray(8, 16)),
      cdb,
      attribute: attributeOf(flags),
      expectedLength: read && write && bidiReadLength !== undefined ? bidiReadLength : expectedLength,
      read,
      write,
      wanted,
      cdbDataOut,
      buffer: undefined,
      unsolicitedEnd,
      unsolicitedReceived: immediateBytes,
      unsolicitedDataSN: 0,
      received: 0,
      nextR2tOffset: 0,
      r2tSN: 0,
      r2ts: new Map(),
      state: "data-out",
      aborted: false,
      reservation: undefined,
      dataOutTimer: undefined,
      pending: pdu.dataParts.length === 1 ? pdu.dataParts[0] : undefined,
      parked: false,
      early: pdu.dataParts.length > 1 ? atOffsets(0, pdu.dataParts) : [],
      settled: undefined,
      request: undefined,
      dataSnError: false,
    };
    this.#tasks.set(itt, task);
    if (!lunIsZero(task.lun) && !this.#lunIndependent(cdb)) {
      this.#complete(task, { status: ScsiStatus.CHECK_CONDITION, sense: sense(0x05, 0x25, 0x00) });
      return;
    }
    this.#admit(task);
  }

  /** REPORT LUNS is answered whatever the LUN (SPC-4 6.33): passed to LUN 0's unit. */
  #lunIndependent(cdb: Buffer): boolean {
    return cdb[0] === 0xa0;
  }

  /** Takes budget for the task's data, or parks it behind the ones already waiting; then gathers or executes. */
  #admit(task: Task): void {
    if (this.#bytesFor(task) > 0 && (this.#parked.length > 0 || !this.#reserve(task))) {
      task.parked = true;
      this.#parked.push(task);
      return;
    }
    this.#start(task);
  }

  #bytesFor(task: Task): number {
    return task.write ? task.wanted : task.read ? Math.min(task.expectedLength, this.#unit!.maxTransferBytes, this.#limits.transferBytesMax) : 0;
  }

  /** Reserves the task's bytes (connection bound, then the unit's budget); false when they are not free now. */
  #reserve(task: Task): boolean {
    const bytes = this.#bytesFor(task);
    if (bytes === 0) return true;
    if (this.#bytesHeld + bytes > this.#limits.connectionBytesInFlightMax && this.#bytesHeld > 0) return false;
    const reservation = this.#host.budget.reserve(this.#account, Math.min(bytes, this.#limits.serverBytesInFlightMax), this);
    if (reservation === undefined) return false;
    task.reservation = reservation;
    this.#bytesHeld += reservation.bytes;
    return true;
  }

  #start(task: Task): void {
    if (task.write && task.wanted > 0 && task.pending !== undefined && task.early.length === 0 && task.pending.length >= task.wanted && task.unsolicitedEnd <= task.pending.length) {
      // All the data came as immediate data (a small write): use it as it is, no copy.
      const borrowed = task.pending.subarray(0, task.wanted);
      task.buffer = borrowed;
      task.received = task.wanted;
      task.pending = undefined;
      this.#borrowed.add(borrowed);
      this.#execute(task);
      if (task.settled === undefined) this.#borrowed.delete(borrowed); // answered at once (executeNow)
      else void task.settled.then(() => this.#borrowed.delete(borrowed));
      return;
    }
    if (task.write && task.wanted > 0) {
      // Gathered into a pooled buffer (given back when the command has run): no fresh memory to fault in per write.
      task.buffer = this.#host.pool.acquire(0, task.wanted);
      if (task.pending !== undefined) {
        this.#storeData(task, 0, task.pending);
        task.pending = undefined;
      }
      for (const part of task.early.splice(0)) this.#storeData(task, part.offset, part.data);
      this.#solicit(task);
      if (this.#allDataIn(task)) this.#dataDone(task);
      else this.#armDataOutTimer(task);
      return;
    }
    task.early.length = 0;
    if (task.write && task.unsolicitedReceived < task.unsolicitedEnd) {
      // Nothing wanted but unsolicited data announced: wait for it, then run.
      this.#armDataOutTimer(task);
      return;
    }
    this.#execute(task);
  }

  /** Budget bytes came back (ByteBudget wakes us) or one of our tasks finished: admit parked tasks in order. */
  budgetAvailable(): void {
    while (this.#parked.length > 0 && !this.#ended) {
      const task = this.#parked[0]!;
      if (task.aborted || task.state !== "data-out") {
        this.#parked.shift();
        continue;
      }
      if (!this.#reserve(task)) return;
      this.#parked.shift();
      task.parked = false;
      this.#start(task);
    }
  }

  #armDataOutTimer(task: Task): void {
    clearTimeout(task.dataOutTimer);
    task.dataOutTimer = setTimeout(() => this.#drop(`Data-Out for task 0x${task.itt.toString(16)} did not come within ${this.#limits.dataOutTimeoutMs} ms`), this.#limits.dataOutTimeoutMs);
    task.dataOutTimer.unref();
  }

  /** Copies a Data-Out's views (the socket chunks it came in) into the task's buffer at `offset`. */
  #storeParts(task: Task, offset: number, parts: readonly Buffer[]): void {
    let at = offset;
    for (const part of parts) {
      this.#storeData(task, at, part);
      at += part.length;
    }
  }

  #storeData(task: Task, offset: number, data: Buffer): void {
    if (task.buffer === undefined || offset >= task.wanted) return;
    const usable = data.subarray(0, Math.min(data.length, task.wanted - offset));
    usable.copy(task.buffer, offset);
    task.received += usable.length;
  }

  /** Sends R2Ts for the part not covered by unsolicited data, up to MaxOutstandingR2T at once (none once the task failed). */
  #solicit(task: Task): void {
    if (task.dataSnError) return;
    if (task.nextR2tOffset < task.unsolicitedEnd) task.nextR2tOffset = Math.min(task.unsolicitedEnd, task.wanted);
    while (task.nextR2tOffset < task.wanted && task.r2ts.size < this.#params.maxOutstandingR2t) {
      const length = Math.min(this.#params.maxBurstBytes, task.wanted - task.nextR2tOffset);
      const r2t: R2tState = { ttt: this.#newTtt(), offset: task.nextR2tOffset, length, received: 0, dataSN: 0 };
      task.r2ts.set(r2t.ttt, r2t);
      task.nextR2tOffset += length;
      const bhs = newBhs(Op.R2T, 0x80);
      task.lun.copy(bhs, 8);
      bhs.writeUInt32BE(task.itt, 16);
      bhs.writeUInt32BE(r2t.ttt, 20);
      this.#numbers(bhs, false);
      bhs.writeUInt32BE(task.r2tSN, 36);
      task.r2tSN += 1;
      bhs.writeUInt32BE(r2t.offset, 40);
      bhs.writeUInt32BE(r2t.length, 44);
      this.#send(bhs);
    }
    if (this.#batchCorked) {
      // The initiator waits for its R2T: it leaves now, not at the end of this turn (#send's batching).
      this.#batchCorked = false;
      this.socket.uncork();
    }
  }

  #dataOut(pdu: Pdu): void {
    const bhs = pdu.bhs;
    const itt = ittOf(bhs);
    const ttt = bhs.readUInt32BE(20);
    const offset = bhs.readUInt32BE(40);
    const dataSN = bhs.readUInt32BE(36);
    const dataBytes = pdu.dataLength;
    const task = this.#tasks.get(itt);
    if (task === undefined || task.state !== "data-out") {
      // Data for an aborted or unknown task: discarded (RFC 7143 section 4.2.3.3).
      log.limited(`iscsi_stray_data:${this.peer.address}`, "Data-Out for no task waiting for data: discarded", { peer: this.peerText, itt, ttt });
      return;
    }
    if (ttt === RESERVED_TAG) {
      if (offset !== task.unsolicitedReceived || offset + dataBytes > task.unsolicitedEnd) {
        this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
        this.#drop(`unsolicited Data-Out at offset ${offset} length ${dataBytes}: expected offset ${task.unsolicitedReceived}, at most up to ${task.unsolicitedEnd} (FirstBurstLength)`);
        return;
      }
      if (dataSN !== task.unsolicitedDataSN) this.#dataSnError(task, dataSN, task.unsolicitedDataSN, "unsolicited");
      task.unsolicitedDataSN += 1;
      if (task.parked) task.early.push(...atOffsets(offset, pdu.dataParts));
      else this.#storeParts(task, offset, pdu.dataParts);
      task.unsolicitedReceived += dataBytes;
      if (task.parked) return; // runs once admitted
    } else {
      const r2t = task.r2ts.get(ttt);
      if (r2t === undefined) {
        this.#reject(bhs, RejectReason.INVALID_PDU_FIELD);
        this.#drop(`Data-Out with unknown Target Transfer Tag 0x${ttt.toString(16)}`);
        return;
      }
      if (offset !== r2t.offset + r2t.received || r2t.received + dataBytes > r2t.length) {
        this.#reject(bhs, RejectReason.PROTOCOL_ERROR);
        this.#drop(`Data-Out at offset ${offset} length ${dataBytes} outside its R2T (offset ${r2t.offset + r2t.received} expected, ${r2t.length - r2t.received} bytes left)`);
        return;
      }
      if (dataSN !== r2t.dataSN) this.#dataSnError(task, dataSN, r2t.dataSN, `R2T 0x${ttt.toString(16)}`);
      r2t.dataSN += 1;
      this.#storeParts(task, offset, pdu.dataParts);
      r2t.received += dataBytes;
      if (r2t.received >= r2t.length) {
        task.r2ts.delete(ttt);
        this.#solicit(task);
      }
    }
    if (this.#allDataIn(task)) this.#dataDone(task);
    else this.#armDataOutTimer(task);
  }

  /**
   * A DataSN out of order: RFC 7143 section 7.9 makes it an implied digest
   * error, handled as section 7.8 says for a Data-Out with a bad data digest.
   * ERL 0 has no recovery R2T, so the task is terminated: its data still
   * counts by offset (so the end of the outstanding data is known), nothing
   * reaches the logical unit, and the answer is CHECK CONDITION once all the
   * outstanding data has come. The offsets are still checked strictly.
   */
  #dataSnError(task: Task, got: number, expected: number, sequence: string): void {
    if (task.dataSnError) return;
    task.dataSnError = true;
    log.limited(`iscsi_datasn:${this.peer.address}`, "Data-Out with a DataSN out of order: the task ends with CHECK CONDITION (RFC 7143 sections 7.8, 7.9; ERL 0 has no recovery R2T)", {
      peer: this.peerText,
      itt: task.itt,
      sequence,
      dataSN: got,
      expected,
    });
  }

  /** The task has every Data-Out it will get: all unsolicited data, no R2T outstanding, and all it wants (or it failed). */
  #allDataIn(task: Task): boolean {
    if (task.unsolicitedReceived < task.unsolicitedEnd || task.r2ts.size > 0) return false;
    return task.dataSnError || task.received >= task.wanted;
  }

  #dataDone(task: Task): void {
    clearTimeout(task.dataOutTimer);
    if (task.dataSnError) {
      // RFC 7143 section 11.4.7.2: "Protocol Service CRC error", ABORTED COMMAND, 0x47/0x05.
      this.#complete(task, { status: ScsiStatus.CHECK_CONDITION, sense: sense(0x0b, 0x47, 0x05) });
      return;
    }
    this.#execute(task);
  }

  #execute(task: Task): void {
    clearTimeout(task.dataOutTimer);
    task.state = "executing";
    const unit = this.#unit!;
    const request: ScsiRequest = {
      cdb: task.cdb,
      nexus: this.#nexus!,
      attribute: task.attribute,
      expectedLength: task.expectedLength,
      dataOut: task.write || task.cdbDataOut > 0 ? (task.buffer ?? Buffer.alloc(0)) : undefined,
      allocateDataIn: task.read && !task.write ? this.#allocateDataIn : undefined,
      sendDataIn:
        this.#sendFileFd >= 0 && task.read && !task.write && task.expectedLength >= SEND_FILE_BYTES_MIN && task.expectedLength <= SEND_FILE_BYTES_MAX
          ? (offsetBytes: number, lengthBytes: number) => this.#sendDataIn(task, offsetBytes, lengthBytes)
          : undefined,
    };
    task.request = request;
    // A gathered write buffer goes back to the pool once the unit is done with it (not a borrowed view: the pool ignores those).
    const gathered = task.write && task.buffer !== undefined && !this.#borrowed.has(task.buffer) ? task.buffer : undefined;
    const answer = unit.executeNow !== undefined ? unit.executeNow(request) : unit.execute(request);
    if (!(answer instanceof Promise)) {
      // Answered without waiting (a READ from the page cache, a WRITE into it): no promise, no microtask.
      if (gathered !== undefined) this.#host.pool.release(gathered);
      this.#complete(task, answer);
      return;
    }
    task.settled = answer.then(
      (response) => {
        if (gathered !== undefined) this.#host.pool.release(gathered);
        this.#complete(task, response);
      },
      (error: unknown) => {
        log.error("logical unit failed a command (it should answer every failure with sense)", { peer: this.peerText, opcode: task.cdb[0], error: errorMessage(error) });
        this.#complete(task, { status: ScsiStatus.CHECK_CONDITION, sense: sense(0x04, 0x44, 0x00) });
      },
    );
  }

  readonly #allocateDataIn = (bytes: number): Buffer => this.#host.pool.acquire(0, bytes);

  #finishTask(task: Task): void {
    clearTimeout(task.dataOutTimer);
    task.state = "done";
    if (task.reservation !== undefined) {
      this.#bytesHeld -= task.reservation.bytes;
      task.reservation.release();
      task.reservation = undefined;
    }
    task.buffer = undefined;
    task.request = undefined;
    if (this.#tasks.get(task.itt) === task) this.#tasks.delete(task.itt);
    task.early.length = 0;
    if (this.#parked.length > 0 && !this.#ended) queueMicrotask(() => this.budgetAvailable());
  }

  /** Sends Data-In (split by the initiator's MaxRecvDataSegmentLength, status in the last when GOOD) and/or the SCSI Response. */
  #complete(task: Task, response: ScsiResponse): void {
    const aborted = task.aborted;
    this.#finishTask(task);
    if (aborted || this.#ended || this.phase === "closed" || response.dataInSent === true) return;
    const expected = task.expectedLength;
    let dataIn = task.read && response.dataIn !== undefined ? response.dataIn : undefined;
    let residualFlag = 0;
    let residual = 0;
    if (task.cdbDataOut > 0 || task.write) {
      if (task.cdbDataOut < expected) {
        residualFlag = 0x02;
        residual = expected - task.cdbDataOut;
      } else if (task.cdbDataOut > expected) {
        residualFlag = 0x04;
        residual = task.cdbDataOut - expected;
      }
    } else if (task.read) {
      const produced = dataIn?.length ?? 0;
      if (produced < expected) {
        residualFlag = 0x02;
        residual = expected - produced;
      } else if (produced > expected) {
        residualFlag = 0x04;
        residual = produced - expected;
        dataIn = dataIn!.subarray(0, expected);
      }
    } else if (expected > 0) {
      residualFlag = 0x02;
      residual = expected;
    }
    const good = response.status === ScsiStatus.GOOD && response.sense === undefined;
    let dataSN = 0;
    if (dataIn !== undefined && dataIn.length > 0) {
      // All the command's Data-In PDUs leave in one writev; the read buffer goes back to the pool
      // (a no-op for buffers that are not the pool's) once the socket has sent its last byte.
      const whole = response.dataIn!;
      const release = (): void => this.#host.pool.release(whole);
      this.socket.cork();
      dataSN = this.#queueDataIn(task, dataIn, 0, 0, good ? { status: response.status, residualFlag, residual } : undefined, good ? release : undefined);
      this.socket.uncork();
      if (good) return;
    }
    const bhs = newBhs(Op.SCSI_RESPONSE, 0x80 | residualFlag);
    bhs[2] = 0x00; // command completed at target
    bhs[3] = response.status;
    bhs.writeUInt32BE(task.itt, 16);
    this.#numbers(bhs, true);
    bhs.writeUInt32BE(task.read ? dataSN : task.r2tSN, 36);
    bhs.writeUInt32BE(residual, 44);
    let data: Buffer[] = [];
    if (response.sense !== undefined && response.sense.length > 0) {
      const length = Buffer.alloc(2);
      length.writeUInt16BE(response.sense.length, 0);
      data = [length, response.sense];
    }
    this.#send(bhs, data);
  }

  /**
   * Queues the Data-In PDUs of `data`, a command's bytes from `offset` on,
   * split by the initiator's MaxRecvDataSegmentLength and MaxBurstLength, the
   * first with DataSN `dataSN`; the last carries `status` when given (GOOD
   * only) and runs `written` once the socket has sent it. Returns the next DataSN.
   */
  #queueDataIn(task: Task, data: Buffer, offset: number, dataSN: number, status: DataInStatus | undefined, written: (() => void) | undefined): number {
    const total = offset + data.length;
    for (let at = offset; at < total; ) {
      const length = this.#dataInLength(at, total);
      const bhs = this.#dataInBhs(task, at, length, total, dataSN, status);
      dataSN += 1;
      this.#send(bhs, [data.subarray(at - offset, at - offset + length)], at + length >= total ? written : undefined);
      at += length;
    }
    return dataSN;
  }

  /** The length of the Data-In PDU at `offset` of a command's `total` bytes. */
  #dataInLength(offset: number, total: number): number {
    const burst = this.#params.maxBurstBytes;
    return Math.min(this.#params.initiatorRecvDataSegmentBytes, total - offset, burst - (offset % burst));
  }

  /** The BHS of the Data-In PDU of `length` bytes at `offset` of a command's `total`; the last carries `status` when given (StatSN advances). */
  #dataInBhs(task: Task, offset: number, length: number, total: number, dataSN: number, status: DataInStatus | undefined): Buffer {
    const last = offset + length >= total;
    const endOfBurst = last || (offset + length) % this.#params.maxBurstBytes === 0;
    const bhs = newBhs(Op.DATA_IN, endOfBurst ? 0x80 : 0);
    task.lun.copy(bhs, 8);
    bhs.writeUInt32BE(task.itt, 16);
    bhs.writeUInt32BE(RESERVED_TAG, 20);
    if (last && status !== undefined) {
      bhs[1] = 0x80 | 0x01 | status.residualFlag;
      bhs[3] = status.status;
      bhs.writeUInt32BE(status.residual, 44);
      this.#numbers(bhs, true);
    } else {
      this.#numbers(bhs, false);
      bhs.writeUInt32BE(0, 24);
    }
    bhs.writeUInt32BE(dataSN, 36);
    bhs.writeUInt32BE(offset, 40);
    return bhs;
  }

  /**
   * ScsiRequest.sendDataIn: a READ's whole Data-In, with GOOD status in the
   * last PDU, sent from the page cache: each PDU's BHS, then its data segment
   * by sendfile (sendHeaderAndDataNow, the NBD session's pump), only while
   * Node's stream holds nothing for the socket. What the socket does not take
   * of a PDU, and the PDUs after it, are read now (pages cached a moment ago)
   * and queued ahead of any other answer. False when nothing was sent (not
   * cached, spans storage pieces, the stream holds bytes): the unit reads the
   * data the usual way. If the rest cannot be read, part of the Data-In is on
   * the wire: the connection is dropped.
   */
  #sendDataIn(task: Task, offsetBytes: number, lengthBytes: number): boolean {
    const device = this.#unit?.device;
    if (device === undefined || this.#ended || task.aborted || lengthBytes !== task.expectedLength || !mayWriteBehindStream(this.socket)) return false;
    const pool = this.#host.pool;
    const status: DataInStatus = { status: ScsiStatus.GOOD, residualFlag: 0, residual: 0 };
    const statSN = this.#statSN;
    let at = 0;
    let dataSN = 0;
    try {
      while (at < lengthBytes) {
        const length = this.#dataInLength(at, lengthBytes);
        const bhs = this.#dataInBhs(task, at, length, lengthBytes, dataSN, status);
        bhs.writeUIntBE(length, 5, 3); // the data segment's length (whole blocks, as segment and burst are: no padding)
        const sent = sendHeaderAndDataNow(device, this.#sendFileFd, bhs, offsetBytes + at, length, pool);
        if (sent === undefined) {
          // Nothing of this PDU went out: the StatSN a last PDU took is taken again when it is queued below (or by the unit's own answer).
          this.#statSN = statSN;
          if (at > 0) break;
          return false;
        }
        at += length;
        dataSN += 1;
        const rest = sent.rest;
        if (rest !== undefined) {
          this.socket.write(rest, () => pool.release(rest));
          break;
        }
      }
      if (at < lengthBytes) {
        const data = pool.acquire(0, lengthBytes - at);
        device.readSync!(data, offsetBytes + at);
        this.socket.cork();
        this.#queueDataIn(task, data, at, dataSN, status, () => pool.release(data));
        this.socket.uncork();
      }
    } catch (error) {
      this.#drop(`READ Data-In cut short (its rest could not be read): ${errorMessage(error)}`, "error");
    }
    return true;
  }
}
