// One NBD connection: glue between a socket and the pure parts (codecs,
// handshake, transmission). It owns the connection's state machine, its
// timers, its reading (backpressure) and its writing (batched).
//
//   greeting --client flags--> options --GO/EXPORT_NAME--> transmission
//        \                        \                            |
//         +------------------------+----------> closing <------+ --> closed
//
// Reading stops (socket.pause) whenever the connection may not take another
// request: requests in flight at the limit, the byte budget exhausted, or
// replies piling up unread. So memory per connection is bounded by the
// limits, never by what a client sends.

import type { Socket } from "node:net";
import { performance } from "node:perf_hooks";
import { TLSSocket } from "node:tls";
import type { ExportProvider, Peer } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { NBD_ERRNO, errorMessage, toNbdErrno } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import type { BudgetAccount, BudgetWaiter, ByteBudget, Reservation } from "./budget.ts";
import type { BufferPool } from "./buffer_pool.ts";
import { ByteQueue } from "./byte_queue.ts";
import { type Negotiation, type OpenedExport, type OptionOutcome, negotiateOption } from "./handshake.ts";
import { decodeClientFlags, decodeOption, encodeGreeting, encodeOptionReply, utf8Bounded } from "./handshake_codec.ts";
import type { ExportCounters, IoStats } from "./io_stats.ts";
import { useLargeReads } from "./large_reads.ts";
import type { NbdLimits } from "./limits.ts";
import { NBD_CMD, NBD_REP, WIRE } from "./protocol.ts";
import { mayWriteBehindStream, sendFileSocketFd } from "./send_file.ts";
import { type NbdServerTls, PSK_CIPHERS, pskKeyId } from "./tls.ts";
import { type RequestFrame, decodeRequest, encodeErrorChunk, encodeSimpleReply } from "./request_codec.ts";
import {
  commandName,
  performRequest,
  readReplyNow,
  requestCostBytes,
  sendFileCandidate,
  sendReadReplyNow,
  validateRequest,
  writeReplyNow,
} from "./transmission.ts";

const log = logger("nbd");

/** Idle time before TCP keepalive probes start on a connection. */
const KEEPALIVE_IDLE_MS = 60_000;

export type SessionState = "greeting" | "options" | "transmission" | "closing" | "closed";

/** What a session needs from its server. */
export interface SessionHost {
  readonly provider: ExportProvider;
  readonly limits: NbdLimits;
  readonly budget: ByteBudget;
  readonly pool: BufferPool;
  readonly shuttingDown: boolean;
  /** NBD_OPT_STARTTLS with TLS-PSK; undefined: TLS off. */
  readonly tls: NbdServerTls | undefined;
  /** I/O counters per export (io_stats.ts). */
  readonly stats: IoStats;
  sessionEnded(session: NbdSession): void;
}

export function peerOf(socket: Socket): Peer {
  const address = socket.remoteAddress;
  if (address === undefined) return { address: "unix", port: 0 };
  // IPv4 clients of a dual-stack listener appear as ::ffff:a.b.c.d.
  const plain = address.startsWith("::ffff:") && address.includes(".") ? address.slice(7) : address;
  return { address: plain, port: socket.remotePort ?? 0 };
}

export class NbdSession implements BudgetWaiter {
  private stateValue: SessionState = "greeting";
  /** The connection: the TCP socket, or after NBD_OPT_STARTTLS the TLS socket over it. */
  private socket: Socket;
  /** The TCP socket itself. */
  private readonly rawSocket: Socket;
  private readonly host: SessionHost;
  private readonly limits: NbdLimits;
  private readonly queue = new ByteQueue();
  /** Gains the TLS-PSK identity once TLS is up. */
  peer: Peer;
  readonly peerText: string;
  private readonly negotiation: Negotiation = {
    noZeroes: false,
    structuredReplies: false,
    metaContext: undefined,
    optionsSeen: 0,
    tls: false,
  };
  private opened: OpenedExport | undefined;
  /** The opened export's I/O counters (set with `opened`). */
  private counters: ExportCounters | undefined;
  /**
   * The clock when the running pump dispatched its first request (-1: none yet): the start of
   * every request that pump dispatches (one clock reading per pump, not per request).
   */
  private pumpStartMs = -1;
  /** READs and WRITEs the running pump answered at once: they share the pump's time (countAnsweredNow). */
  private answeredReads = 0;
  private answeredReadBytes = 0;
  private answeredWrites = 0;
  private answeredWriteBytes = 0;
  /** An option is being handled (the client may not send another before its final reply). */
  private optionBusy = false;
  private inFlight = 0;
  /** This peer's account with the server budget (shared by its connections). */
  private readonly account: BudgetAccount;
  /** Budget bytes held by this connection's reservations (requests in flight, a payload arriving). */
  private inFlightBytes = 0;
  /** A decoded request waiting for budget bytes (it holds none). */
  private blocked: { frame: RequestFrame; costBytes: number } | undefined;
  /** Budget reserved for a WRITE whose payload is still arriving; the payload timer runs while it is held. */
  private payloadReservation: Reservation | undefined;
  private payloadTimer: NodeJS.Timeout | undefined;
  private waitingForBudget = false;
  /** A WRITE's payload is arriving but its budget bytes could not be held yet. */
  private payloadBudgetPending = false;
  private socketEnded = false;
  private readingPaused = false;
  private corked = false;
  /**
   * The memory that payloads of decoded WRITE frames view (received read
   * arenas, or pooled buffers), with the number of such frames per store:
   * counted down when the write is done or rejected, never after a failed
   * device write (the device may still read it). A read arena is reused only
   * when no payload views it (mayReuseReadMemory): one write still in flight
   * pins its own arena, not every arena of the connection.
   */
  private readonly payloadViews = new Map<ArrayBufferLike, number>();
  /**
   * The plaintext TCP socket's file descriptor once in transmission, for READ replies by sendfile
   * (transmission.ts sendReadReplyNow); -1: none (TLS, a Unix socket, or sendfile turned off).
   */
  private sendFileFd = -1;
  /**
   * READs that may leave by sendfile, waiting (oldest first) for the stream to hold nothing;
   * each counts in inFlight and keeps its reservation. Answered from the pump once the
   * stream is empty; by the copy path when the connection starts closing.
   */
  private readonly waitingForSendFile: { frame: RequestFrame; reservation: Reservation | undefined }[] = [];
  /** Corked for replies answered synchronously during one pump (uncorked when it returns). */
  private pumpCorked = false;
  /** Buffers handed to socket.write, oldest first: write callbacks come back in this order. */
  private readonly writing: Buffer[] = [];
  private handshakeTimer: NodeJS.Timeout | undefined;
  private stallTimer: NodeJS.Timeout | undefined;
  /** socket.bytesWritten when the stall timer was armed: progress since means a slow reader, not a dead one. */
  private stallBytesWritten = 0;
  private closeTimer: NodeJS.Timeout | undefined;
  private deviceClosed = false;
  private endedResolve: (() => void) | undefined;
  readonly ended: Promise<void>;

  constructor(host: SessionHost, socket: Socket) {
    this.host = host;
    this.limits = host.limits;
    this.socket = socket;
    this.rawSocket = socket;
    this.peer = peerOf(socket);
    this.peerText = this.peer.address === "unix" ? "unix" : `${this.peer.address}:${this.peer.port}`;
    this.account = host.budget.join(this.peer.address);
    this.ended = new Promise((resolve) => {
      this.endedResolve = resolve;
    });
    socket.setNoDelay(true);
    // A host that vanishes without closing (power loss, cable) is found by TCP keepalive, not never.
    socket.setKeepAlive(true, KEEPALIVE_IDLE_MS);
    // Every entry point from the socket, a timer or the budget runs guarded (guard()):
    // a broken invariant costs this connection, never the process.
    socket.on("data", this.onData);
    // Reads of up to 2 MiB per read(2) instead of Node's 64 KiB (large_reads.ts); falls back to 'data'.
    // With TLS offered, the TCP socket may yet be handed to TLS: plaintext switches at transmission.
    if (host.tls === undefined) useLargeReads(socket, this.onData, this.mayReuseReadMemory);
    socket.on("error", this.onError);
    socket.on("close", this.onClose);
    socket.on("drain", this.onDrain);
    this.handshakeTimer = setTimeout(this.onHandshakeTimeout, this.limits.handshakeTimeoutMs);
    socket.write(encodeGreeting());
  }

  get state(): SessionState {
    return this.stateValue;
  }

  /** The one way the state changes: asserts the move is allowed. */
  private transition(from: readonly SessionState[], to: SessionState): void {
    assert(from.includes(this.stateValue), `nbd session ${this.peerText}: ${this.stateValue} -> ${to}`);
    log.debug("session state", { peer: this.peerText, from: this.stateValue, to });
    this.stateValue = to;
  }

  // ------------------------------------------------------------ socket events

  /** Runs an entry point; an exception in it (a programmer error) closes this connection and is logged. */
  private guard(body: () => void): void {
    try {
      body();
    } catch (error) {
      this.internalError(error);
    }
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.stateValue === "closing" || this.stateValue === "closed") return;
    this.queue.push(chunk);
    this.pump();
  };

  private readonly onError = (error: NodeJS.ErrnoException): void => {
    const quiet = error.code === "ECONNRESET" || error.code === "EPIPE";
    if (quiet) log.debug("connection error", { peer: this.peerText, error: error.message });
    else log.limited("socket_error", "connection error", { peer: this.peerText, error: error.message });
  };

  private readonly onClose = (): void => {
    this.guard(this.closed);
  };

  private readonly closed = (): void => {
    if (this.queue.length > 0 && this.stateValue !== "closing" && this.stateValue !== "closed") {
      // A message cut short: the client went away in the middle of a header or payload.
      log.limited("cut_short", "client closed in the middle of a message", {
        peer: this.peerText,
        state: this.stateValue,
        pendingBytes: this.queue.length,
      });
    }
    if (this.stateValue !== "closed") this.transition(["greeting", "options", "transmission", "closing"], "closed");
    this.clearTimers();
    this.queue.clear();
    // A blocked request holds no bytes; a payload still arriving holds its reservation.
    this.blocked = undefined;
    this.releaseSendFileWaiters(false);
    this.dropPayloadReservation();
    this.finishIfIdle();
  };

  private readonly onDrain = (): void => {
    this.guard(this.drained);
  };

  private readonly drained = (): void => {
    if (this.stallTimer !== undefined) {
      clearTimeout(this.stallTimer);
      this.stallTimer = undefined;
    }
    if (this.stateValue === "transmission") this.pump();
  };

  private readonly onPayloadTimeout = (): void => {
    this.guard(this.payloadTimedOut);
  };

  private readonly payloadTimedOut = (): void => {
    this.payloadTimer = undefined;
    if (this.payloadReservation === undefined || this.stateValue !== "transmission") return;
    if (this.socket.writableLength > this.limits.replyBytesQueuedMax) {
      // Reading is paused because the client does not read its replies: that is the
      // write-stall timer's case, not a slow payload. Give the payload another period.
      this.payloadTimer = setTimeout(this.onPayloadTimeout, this.limits.payloadTimeoutMs);
      return;
    }
    log.limited("payload_timeout", "WRITE payload timed out: closing the connection", {
      peer: this.peerText,
      payloadBytes: this.payloadReservation.bytes,
      receivedBytes: Math.max(0, this.queue.length - WIRE.REQUEST_HEADER_BYTES),
      timeoutMs: this.limits.payloadTimeoutMs,
    });
    this.hardDisconnect();
  };

  private readonly onHandshakeTimeout = (): void => {
    this.guard(this.handshakeTimedOut);
  };

  private readonly handshakeTimedOut = (): void => {
    this.handshakeTimer = undefined;
    if (this.stateValue !== "greeting" && this.stateValue !== "options") return;
    log.limited("handshake_timeout", "handshake timed out: dropping client", {
      peer: this.peerText,
      timeoutMs: this.limits.handshakeTimeoutMs,
      state: this.stateValue,
    });
    this.hardDisconnect();
  };

  private readonly onWriteStall = (): void => {
    this.guard(this.writeStalled);
  };

  private readonly writeStalled = (): void => {
    this.stallTimer = undefined;
    if (this.socket.bytesWritten > this.stallBytesWritten && this.socket.writableLength > this.limits.replyBytesQueuedMax) {
      // Slow but reading: give it another period.
      this.armStallTimer();
      return;
    }
    if (this.socket.writableLength <= this.limits.replyBytesQueuedMax) {
      this.pump();
      return;
    }
    log.limited("write_stall", "client does not read its replies: disconnecting", {
      peer: this.peerText,
      queuedBytes: this.socket.writableLength,
      timeoutMs: this.limits.writeStallTimeoutMs,
    });
    this.hardDisconnect();
  };

  /** BudgetWaiter: bytes came back to the server budget. */
  budgetAvailable(): void {
    this.waitingForBudget = false;
    if (this.stateValue === "transmission") this.pump();
  }

  /** The export was revoked (volume deleted or changed, grant withdrawn): stop taking requests and end the connection. */
  private readonly exportRevoked = (error: Error): void => {
    this.guard(() => {
      if (this.stateValue !== "transmission") return;
      log.limited("export_revoked", "export revoked: closing the connection", { peer: this.peerText, export: this.opened?.name ?? "", reason: error.message });
      this.softClose();
    });
  };

  // ------------------------------------------------------------ input

  /**
   * Decodes and dispatches whatever input can be handled now. Every entry
   * point comes through here, so a programmer error (a failed assertion)
   * costs this one connection, logged with its stack, and never the unit.
   */
  private pump(): void {
    try {
      this.pumpUnguarded();
    } catch (error) {
      this.internalError(error);
    }
  }

  private internalError(error: unknown): void {
    log.error("internal error: closing the connection", {
      peer: this.peerText,
      state: this.stateValue,
      error: error instanceof Error ? (error.stack ?? error.message) : String(error),
    });
    try {
      this.hardDisconnect();
      // The close event may already have come and gone (the error was in it): end what can be ended.
      if (this.stateValue === "closed") this.finishIfIdle();
    } catch (again) {
      log.error("internal error while closing", { peer: this.peerText, error: errorMessage(again) });
    }
  }

  private pumpUnguarded(): void {
    switch (this.stateValue) {
      case "greeting":
        this.pumpGreeting();
        break;
      case "options":
        this.pumpOptions();
        break;
      case "transmission":
        try {
          this.pumpRequests();
        } finally {
          if (this.pumpCorked) {
            this.pumpCorked = false;
            if (!this.socket.destroyed) this.socket.uncork();
          }
        }
        break;
      default:
        return;
    }
    this.updateReading();
  }

  private pumpGreeting(): void {
    const decoded = decodeClientFlags(this.queue);
    if (decoded.kind === "need_more") return;
    if (decoded.kind === "invalid") {
      this.protocolError("unknown client flags", { flags: `0x${decoded.flags.toString(16)}` });
      return;
    }
    this.negotiation.noZeroes = decoded.frame.noZeroes;
    this.transition(["greeting"], "options");
    this.pumpOptions();
  }

  private pumpOptions(): void {
    if (this.optionBusy) return;
    const decoded = decodeOption(this.queue, this.limits.optionDataBytesMax);
    if (decoded.kind === "need_more") return;
    if (decoded.kind === "invalid") {
      if (decoded.reason === "bad_option_magic") {
        this.protocolError("bad option magic", {});
        return;
      }
      const message = `option ${decoded.option} data of ${decoded.lengthBytes} bytes is over ${this.limits.optionDataBytesMax}`;
      log.limited("option_too_large", "option too large: closing", { peer: this.peerText, option: decoded.option, lengthBytes: decoded.lengthBytes });
      this.send(encodeOptionReply(decoded.option, NBD_REP.ERR_TOO_BIG, utf8Bounded(message)));
      this.softClose();
      return;
    }
    this.optionBusy = true;
    negotiateOption(
      {
        provider: this.host.provider,
        peer: this.peer,
        peerText: this.peerText,
        limits: this.limits,
        negotiation: this.negotiation,
        shuttingDown: this.host.shuttingDown,
        tls: this.host.tls?.mode ?? "off",
      },
      decoded.frame,
    ).then(this.afterOption, this.optionFailed);
  }

  private readonly afterOption = (outcome: OptionOutcome): void => {
    try {
      this.enterOutcome(outcome);
    } catch (error) {
      this.internalError(error);
    }
  };

  private enterOutcome(outcome: OptionOutcome): void {
    this.optionBusy = false;
    if (this.stateValue !== "options") {
      // The client went away (or timed out) while the option was handled.
      if (outcome.kind === "transmission") void outcome.opened.device.close().catch(() => undefined);
      this.finishIfIdle();
      return;
    }
    switch (outcome.kind) {
      case "continue":
        for (const reply of outcome.replies) this.send(reply);
        // The timeout is for a client that stalls: each answered option starts it again
        // (nbdinfo --list asks two options per export; optionsMax bounds the total).
        this.handshakeTimer?.refresh();
        this.pump();
        return;
      case "close":
        log.limited("handshake_close", "closing after option", { peer: this.peerText, reason: outcome.reason });
        for (const reply of outcome.replies) this.send(reply);
        this.softClose();
        return;
      case "drop":
        log.limited("handshake_drop", "dropping client in handshake", { peer: this.peerText, reason: outcome.reason });
        this.hardDisconnect();
        return;
      case "starttls":
        this.startTls(outcome.replies);
        return;
      case "transmission":
        for (const reply of outcome.replies) this.send(reply);
        this.opened = outcome.opened;
        this.counters = this.host.stats.forExport(outcome.opened.name);
        this.counters.connections += 1;
        // Plaintext on a server that offers TLS: large reads from here (nothing may sit unread in the stream).
        if (this.host.tls !== undefined && !this.negotiation.tls && this.socket.readableLength === 0) {
          useLargeReads(this.socket, this.onData, this.mayReuseReadMemory);
        }
        // Plaintext TCP: large READ replies may leave by sendfile, bytes the process never copies (never under TLS).
        if (!this.negotiation.tls && this.socket === this.rawSocket) this.sendFileFd = sendFileSocketFd(this.socket);
        if (this.handshakeTimer !== undefined) clearTimeout(this.handshakeTimer);
        this.handshakeTimer = undefined;
        this.transition(["options"], "transmission");
        log.debug("transmission", { peer: this.peerText, export: outcome.opened.name, sizeBytes: outcome.opened.sizeBytes });
        // A device revoked between its open and now is reported at once.
        outcome.opened.device.onRevoked?.(this.exportRevoked);
        if ((this.stateValue as SessionState) === "transmission") this.pump();
        return;
    }
  }

  /**
   * NBD_OPT_STARTTLS was accepted: ACK it in plaintext, then a TLS server
   * handshake (TLS-PSK) on the same TCP connection. Options go on over TLS
   * once it is up; the handshake timer covers the TLS handshake too. Bytes
   * the client sent after the option and before our ACK would be plaintext
   * smuggled past TLS: that is a protocol error.
   */
  private startTls(replies: readonly Buffer[]): void {
    const config = this.host.tls;
    assert(config !== undefined && this.socket === this.rawSocket, "STARTTLS without TLS or twice");
    if (this.queue.length > 0) {
      this.protocolError("data after NBD_OPT_STARTTLS", { pendingBytes: this.queue.length });
      return;
    }
    const raw = this.rawSocket;
    // From here nothing is read as plaintext: what comes next is the client's TLS handshake.
    raw.off("data", this.onData);
    raw.pause();
    this.optionBusy = true;
    for (const reply of replies) this.send(reply);
    this.handshakeTimer?.refresh();
    let offered: { identity: string; key: Buffer } | undefined;
    const secure = new TLSSocket(raw, {
      isServer: true,
      ciphers: PSK_CIPHERS,
      minVersion: "TLSv1.2",
      dhparam: "auto",
      honorCipherOrder: true,
      pskCallback: (_socket: TLSSocket, identity: string): Buffer | null => {
        const key = config.keyFor(identity);
        offered = key === undefined ? undefined : { identity, key };
        if (key === undefined) log.limited("tls_unknown_identity", "TLS: unknown PSK identity", { peer: this.peerText, identity: identity.slice(0, 64) });
        return key ?? null;
      },
    } as ConstructorParameters<typeof TLSSocket>[1]);
    raw.off("error", this.onError);
    raw.off("close", this.onClose);
    raw.off("drain", this.onDrain);
    raw.on("error", () => undefined);
    this.socket = secure;
    this.readingPaused = false;
    // A handshake that never completes (wrong key, garbage, a stall cut by the timer, shutdown)
    // holds no option any more once the socket is gone: the session must still end.
    secure.once("close", () => {
      if (!this.negotiation.tls) this.optionBusy = false;
    });
    secure.on("error", this.onError);
    secure.on("close", this.onClose);
    secure.on("drain", this.onDrain);
    secure.once("secure", () => {
      this.guard(() => {
        if (this.stateValue !== "options") return;
        if (offered === undefined) {
          this.protocolError("TLS up without a PSK identity", {});
          return;
        }
        this.peer = { ...this.peer, identity: offered.identity, keyId: pskKeyId(offered.key) };
        // doc/proto.md: nothing negotiated before TLS carries over.
        this.negotiation.tls = true;
        this.negotiation.structuredReplies = false;
        this.negotiation.metaContext = undefined;
        this.optionBusy = false;
        this.handshakeTimer?.refresh();
        const cipher = secure.getCipher();
        log.debug("tls up", { peer: this.peerText, identity: offered.identity, protocol: secure.getProtocol() ?? "", cipher: cipher.name });
        secure.on("data", this.onData);
        this.pump();
      });
    });
  }

  private readonly optionFailed = (error: unknown): void => {
    this.optionBusy = false;
    log.error("option handling failed", { peer: this.peerText, error: errorMessage(error) });
    this.hardDisconnect();
  };

  private pumpRequests(): void {
    try {
      this.decodeAndDispatch();
    } finally {
      this.countAnsweredNow();
    }
  }

  /**
   * Counts the READs and WRITEs this pump answered at once, each with an equal share of the
   * time from the pump's first dispatch to now (they ran one after another, microseconds
   * each): one more clock reading per pump, none per request.
   */
  private countAnsweredNow(): void {
    if (this.pumpStartMs < 0) return;
    const answered = this.answeredReads + this.answeredWrites;
    if (answered > 0 && this.counters !== undefined) {
      const eachMs = (performance.now() - this.pumpStartMs) / answered;
      if (this.answeredReads > 0) this.counters.completedMany(NBD_CMD.READ, this.answeredReads, this.answeredReadBytes, eachMs);
      if (this.answeredWrites > 0) this.counters.completedMany(NBD_CMD.WRITE, this.answeredWrites, this.answeredWriteBytes, eachMs);
    }
    this.pumpStartMs = -1;
    this.answeredReads = 0;
    this.answeredReadBytes = 0;
    this.answeredWrites = 0;
    this.answeredWriteBytes = 0;
  }

  private decodeAndDispatch(): void {
    const opened = this.opened;
    assert(opened !== undefined, "transmission without an export");
    const limits = this.limits;
    while (this.stateValue === "transmission") {
      if (this.waitingForSendFile.length > 0 && this.answerSendFileWaiters()) continue;
      if (this.blocked !== undefined) {
        const reservation = this.reserve(this.blocked.costBytes);
        if (reservation === undefined) return;
        const { frame } = this.blocked;
        this.blocked = undefined;
        this.dispatch(frame, reservation);
        continue;
      }
      if (this.inFlight >= limits.requestsInFlightMax) return;
      if (this.socket.writableLength > limits.replyBytesQueuedMax) {
        this.armStallTimer();
        return;
      }
      const decoded = decodeRequest(this.queue, limits.payloadBytesMax, this.allocatePayload, true);
      if (decoded.kind === "need_more") {
        // A WRITE's payload is on its way: hold its bytes from the budget before buffering them.
        const payloadBytes = decoded.bytesNeeded - WIRE.REQUEST_HEADER_BYTES;
        if (payloadBytes > 0 && this.payloadReservation === undefined) {
          this.payloadReservation = this.reserve(payloadBytes);
          this.payloadBudgetPending = this.payloadReservation === undefined;
          // From now on the payload is the client's to send: it has payloadTimeoutMs.
          if (this.payloadReservation !== undefined) this.payloadTimer = setTimeout(this.onPayloadTimeout, this.limits.payloadTimeoutMs);
        }
        return;
      }
      if (decoded.kind === "invalid") {
        if (decoded.reason === "bad_request_magic") {
          this.protocolError("bad request magic", { magic: `0x${decoded.magic.toString(16)}` });
          return;
        }
        // The payload cannot be skipped without reading it all: reply, then close.
        const message = `${commandName(decoded.type)}: payload length=${decoded.length} over the maximum ${limits.payloadBytesMax}`;
        log.limited("payload_too_large", "request payload too large: closing", { peer: this.peerText, length: decoded.length });
        this.replyError(decoded, NBD_ERRNO.EINVAL, message);
        this.softClose();
        return;
      }
      const frame = decoded.frame;
      if (frame.type === NBD_CMD.WRITE) this.holdPayload(frame);
      // Budget already held for this WRITE's payload while it arrived (only a WRITE has a payload).
      const held = this.takePayloadReservation();
      if (held !== undefined && (frame.type !== NBD_CMD.WRITE || held.bytes !== frame.length)) {
        this.releaseReservation(held);
        throw new Error(`payload reservation of ${held.bytes} bytes does not match ${commandName(frame.type)} length=${frame.length}`);
      }
      if (frame.type === NBD_CMD.DISC) {
        log.debug("client disconnect", { peer: this.peerText });
        this.softClose();
        return;
      }
      const rejection = validateRequest(opened, frame, limits, this.host.shuttingDown);
      if (rejection !== undefined) {
        log.limited("request_rejected", "request rejected", {
          peer: this.peerText,
          command: commandName(frame.type),
          errno: rejection.errno,
          reason: rejection.message,
        });
        this.replyError(frame, rejection.errno, rejection.message);
        if (this.counters !== undefined) this.counters.errors += 1;
        if (held !== undefined) this.releaseReservation(held);
        if (frame.type === NBD_CMD.WRITE) this.releasePayload(frame);
        continue;
      }
      const costBytes = requestCostBytes(frame);
      let reservation = held;
      if (reservation === undefined && costBytes > 0) {
        reservation = this.reserve(costBytes);
        if (reservation === undefined) {
          this.blocked = { frame, costBytes };
          return;
        }
      }
      this.dispatch(frame, reservation);
    }
  }

  /**
   * Takes budget bytes for a request: a Reservation, or undefined (and a
   * wake-up later: from the budget, or from this connection's own requests
   * completing) when the server or this connection has none to spare.
   */
  private reserve(bytes: number): Reservation | undefined {
    if (this.inFlightBytes > 0 && this.inFlightBytes + bytes > this.limits.connectionBytesInFlightMax) return undefined;
    const reservation = this.host.budget.reserve(this.account, bytes, this);
    if (reservation === undefined) {
      this.waitingForBudget = true;
      return undefined;
    }
    // Granted: whatever this connection was waiting for, it is not waiting any more (the
    // budget dropped it from its waiters, so no wake-up will come to clear the flag).
    this.waitingForBudget = false;
    this.inFlightBytes += reservation.bytes;
    return reservation;
  }

  /** Gives a reservation's bytes back (once: a second call does nothing). */
  private releaseReservation(reservation: Reservation | undefined): void {
    if (reservation?.release() === true) this.inFlightBytes -= reservation.bytes;
  }

  /** The payload reservation, now owned by the caller; the payload timer stops. */
  private takePayloadReservation(): Reservation | undefined {
    const held = this.payloadReservation;
    this.payloadReservation = undefined;
    if (this.payloadTimer !== undefined) clearTimeout(this.payloadTimer);
    this.payloadTimer = undefined;
    return held;
  }

  private dropPayloadReservation(): void {
    this.releaseReservation(this.takePayloadReservation());
  }

  /** Answers a validated request: at once when the device can, else through execute. */
  private dispatch(frame: RequestFrame, reservation: Reservation | undefined): void {
    if (this.pumpStartMs < 0) this.pumpStartMs = performance.now();
    if (frame.type === NBD_CMD.READ || frame.type === NBD_CMD.WRITE) {
      const opened = this.opened;
      assert(opened !== undefined, "dispatch without an export");
      // Straight from the page cache to the socket, only when nothing else waits to be written (the bytes must
      // stay in order), and never once the socket is destroyed or ended: its fd number may already name another file.
      // While the stream still holds bytes, such a READ waits for it to empty rather than take the copy path.
      if (this.sendFileFd >= 0 && this.stateValue === "transmission" && sendFileCandidate(opened, frame)) {
        if (this.sendFileMayWrite() && this.waitingForSendFile.length === 0 && this.sendReadNow(opened, frame)) {
          this.releaseReservation(reservation);
          return;
        }
        if (this.socket.writableLength > 0 || this.waitingForSendFile.length > 0) {
          this.inFlight += 1;
          this.waitingForSendFile.push({ frame, reservation });
          return;
        }
      }
      this.dispatchCopy(opened, frame, reservation);
      return;
    }
    this.inFlight += 1;
    void this.execute(frame, reservation, this.pumpStartMs);
  }

  /** The socket's fd may be written behind the stream now: nothing queued, not destroyed, not ended. */
  private sendFileMayWrite(): boolean {
    return this.sendFileFd >= 0 && mayWriteBehindStream(this.socket);
  }

  /** Answers the READs waiting for sendfile while the stream stays empty; true if it answered any. */
  private answerSendFileWaiters(): boolean {
    const opened = this.opened;
    let answered = false;
    while (this.waitingForSendFile.length > 0 && opened !== undefined && this.sendFileMayWrite()) {
      const waiting = this.waitingForSendFile.shift();
      if (waiting === undefined) break;
      this.inFlight -= 1;
      answered = true;
      if (this.pumpStartMs < 0) this.pumpStartMs = performance.now();
      if (this.sendReadNow(opened, waiting.frame)) this.releaseReservation(waiting.reservation);
      else this.dispatchCopy(opened, waiting.frame, waiting.reservation);
    }
    // At shutdown the connection ends once nothing is in flight (execute() does the same for its requests).
    if (answered && this.host.shuttingDown && this.inFlight === 0 && this.stateValue === "transmission") this.softClose();
    return answered;
  }

  /** The READs waiting for sendfile go the copy path (the connection is closing), or are dropped (it is gone). */
  private releaseSendFileWaiters(answer: boolean): void {
    const opened = this.opened;
    while (this.waitingForSendFile.length > 0) {
      const waiting = this.waitingForSendFile.shift();
      if (waiting === undefined) break;
      this.inFlight -= 1;
      if (answer && opened !== undefined) this.dispatchCopy(opened, waiting.frame, waiting.reservation);
      else this.releaseReservation(waiting.reservation);
    }
  }

  /** A validated READ or WRITE answered by copying: at once when the device can, else through execute. */
  private dispatchCopy(opened: OpenedExport, frame: RequestFrame, reservation: Reservation | undefined): void {
    const reply = frame.type === NBD_CMD.READ ? readReplyNow(opened, frame, this.host.pool) : writeReplyNow(opened, frame);
    if (reply !== undefined) {
      // Done in the page cache: no promise. Replies sent in this pump leave in one writev; the
      // last request in the input (always so at queue depth 1) is written at once, without the
      // cork's buffering, so its reply reaches the kernel before the pump's bookkeeping.
      if (!this.pumpCorked && this.queue.length >= WIRE.REQUEST_HEADER_BYTES) {
        this.pumpCorked = true;
        this.socket.cork();
      }
      this.releaseReservation(reservation);
      this.send(reply);
      if (frame.type === NBD_CMD.WRITE) {
        this.releasePayload(frame);
        if (frame.payload !== undefined) this.host.pool.release(frame.payload);
      }
      if (frame.type === NBD_CMD.READ) {
        this.answeredReads += 1;
        this.answeredReadBytes += frame.length;
      } else {
        this.answeredWrites += 1;
        this.answeredWriteBytes += frame.length;
      }
      return;
    }
    this.inFlight += 1;
    void this.execute(frame, reservation, this.pumpStartMs);
  }

  /**
   * A READ answered by sendfile (sendReadReplyNow); false when not possible (nothing was sent).
   * A rest the socket did not take is written next through the stream, ahead of any other reply.
   */
  private sendReadNow(opened: OpenedExport, frame: RequestFrame): boolean {
    let sent: { rest: Buffer | undefined } | undefined;
    try {
      sent = sendReadReplyNow(opened, frame, this.sendFileFd, this.host.pool);
    } catch (error) {
      // Part of the reply is on the wire and the rest cannot be read: the stream cannot go on.
      log.limited("send_file_failed", "READ reply cut short (its rest could not be read): closing the connection", {
        peer: this.peerText,
        offset: frame.offset,
        length: frame.length,
        error: errorMessage(error),
      });
      if (this.counters !== undefined) this.counters.errors += 1;
      this.hardDisconnect();
      return true;
    }
    if (sent === undefined) return false;
    if (sent.rest !== undefined) this.send(sent.rest);
    this.answeredReads += 1;
    this.answeredReadBytes += frame.length;
    return true;
  }

  /** Runs one request on the device. Whatever happens, the request leaves inFlight and gives its bytes back exactly once. */
  private async execute(frame: RequestFrame, reservation: Reservation | undefined, startMs: number): Promise<void> {
    let reply: Buffer | undefined;
    let failure: unknown;
    try {
      const opened = this.opened;
      if (opened === undefined) throw new Error("execute without an export");
      reply = await performRequest(opened, frame, this.limits, this.host.pool);
    } catch (error) {
      failure = error;
    }
    try {
      if (reply !== undefined) {
        this.send(reply);
        this.counters?.completed(frame.type, frame.length, performance.now() - startMs);
        // Written: the payload may be reused (after a failure it is dropped: the device may still read it).
        if (frame.type === NBD_CMD.WRITE) {
          this.releasePayload(frame);
          if (frame.payload !== undefined) this.host.pool.release(frame.payload);
        }
      } else {
        if (this.counters !== undefined) this.counters.errors += 1;
        this.replyFailure(frame, failure);
      }
    } catch (error) {
      this.internalError(error);
    } finally {
      this.inFlight -= 1;
      this.releaseReservation(reservation);
    }
    this.guard(() => {
      if (this.stateValue !== "transmission") this.finishIfIdle();
      else if (this.host.shuttingDown && this.inFlight === 0) this.softClose();
      else this.pump();
    });
  }

  /** The one place a failed request's error becomes a wire errno, after it is logged once. */
  private replyFailure(frame: RequestFrame, error: unknown): void {
    const errno = toNbdErrno(error);
    log.limited("request_failed", "request failed", {
      peer: this.peerText,
      command: commandName(frame.type),
      offset: frame.offset,
      length: frame.length,
      errno,
      error: errorMessage(error),
    });
    this.replyError(frame, errno, errorMessage(error));
  }

  private replyError(cookie: { cookieHi: number; cookieLo: number }, errno: number, message: string): void {
    if (this.opened?.structuredReplies === true) this.send(encodeErrorChunk(cookie, errno, utf8Bounded(message)));
    else this.send(encodeSimpleReply(errno, cookie));
  }

  // ------------------------------------------------------------ output

  private send(bytes: Buffer): void {
    if (this.stateValue === "closed" || this.socket.destroyed) return;
    // Replies completing in the same turn of the event loop leave in one writev;
    // a lone reply (queue depth 1) leaves at once, without waiting for the turn to end.
    if (!this.corked && this.inFlight > 1) {
      this.corked = true;
      this.socket.cork();
      setImmediate(this.uncork);
    }
    this.writing.push(bytes);
    this.socket.write(bytes, this.onWritten);
  }

  private readonly allocatePayload = (bytes: number): Buffer => this.host.pool.acquire(0, bytes);

  /** large_reads: a read arena may be reused once no queued chunk and no write payload can view it. */
  private readonly mayReuseReadMemory = (store: ArrayBufferLike): boolean =>
    this.stateValue === "transmission" && !this.payloadViews.has(store) && !this.queue.holds(store);

  /** A decoded WRITE's payload is in use until releasePayload (payloadViews). */
  private holdPayload(frame: RequestFrame): void {
    for (const part of frame.payloadParts ?? (frame.payload !== undefined ? [frame.payload] : [])) {
      this.payloadViews.set(part.buffer, (this.payloadViews.get(part.buffer) ?? 0) + 1);
    }
  }

  private releasePayload(frame: RequestFrame): void {
    for (const part of frame.payloadParts ?? (frame.payload !== undefined ? [frame.payload] : [])) {
      const count = (this.payloadViews.get(part.buffer) ?? 0) - 1;
      if (count > 0) this.payloadViews.set(part.buffer, count);
      else this.payloadViews.delete(part.buffer);
    }
  }

  /** A write finished (or was cancelled): the oldest buffer may go back to the pool. */
  private readonly onWritten = (): void => {
    const bytes = this.writing.shift();
    if (bytes !== undefined) this.host.pool.release(bytes);
    // The stream is empty again: READs waiting for sendfile may go ('drain' only comes after a write over the high-water mark).
    if (this.waitingForSendFile.length > 0 && this.stateValue === "transmission" && this.socket.writableLength === 0) this.pump();
  };

  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  private armStallTimer(): void {
    if (this.stallTimer !== undefined) return;
    this.stallBytesWritten = this.socket.bytesWritten;
    this.stallTimer = setTimeout(this.onWriteStall, this.limits.writeStallTimeoutMs);
  }

  /** Reads only while this connection may take more input. */
  private updateReading(): void {
    let wanted: boolean;
    switch (this.stateValue) {
      case "greeting":
        wanted = true;
        break;
      case "options":
        wanted = !this.optionBusy;
        break;
      case "transmission":
        wanted =
          this.blocked === undefined &&
          !this.waitingForBudget &&
          !this.payloadBudgetPending &&
          this.inFlight < this.limits.requestsInFlightMax &&
          this.socket.writableLength <= this.limits.replyBytesQueuedMax;
        break;
      case "closing":
        // Keep reading (and dropping) so the client's FIN is seen and the socket closes.
        wanted = true;
        break;
      default:
        wanted = false;
    }
    if (wanted && this.readingPaused) {
      this.readingPaused = false;
      this.socket.resume();
    } else if (!wanted && !this.readingPaused) {
      this.readingPaused = true;
      this.socket.pause();
    }
  }

  // ------------------------------------------------------------ ending

  private protocolError(what: string, fields: Record<string, string | number>): void {
    log.limited(`protocol_${what}`, `protocol error: ${what}: disconnecting`, { peer: this.peerText, state: this.stateValue, ...fields });
    this.hardDisconnect();
  }

  /** Stop reading, let requests in flight reply, then end the connection. */
  softClose(): void {
    if (this.stateValue === "closing" || this.stateValue === "closed") return;
    this.transition(["greeting", "options", "transmission"], "closing");
    this.queue.clear();
    this.releaseSendFileWaiters(true);
    this.dropPayloadReservation();
    this.blocked = undefined;
    this.updateReading();
    if (this.closeTimer === undefined) {
      this.closeTimer = setTimeout(this.hardDisconnect, this.limits.closeTimeoutMs);
      this.closeTimer.unref();
    }
    this.finishIfIdle();
  }

  /** Cut the connection now. Requests in flight finish; their replies are dropped. */
  readonly hardDisconnect = (): void => {
    if (this.stateValue === "closed") return;
    this.socket.destroy();
    if (this.rawSocket !== this.socket) this.rawSocket.destroy();
  };

  /** Ends the socket once nothing is in flight; closes the device once the socket is gone too. */
  private finishIfIdle(): void {
    if (this.inFlight > 0 || this.optionBusy) return;
    if (this.stateValue === "closing") {
      if (this.socketEnded) return;
      this.socketEnded = true;
      if (this.corked) this.uncork();
      this.socket.end();
      return;
    }
    if (this.stateValue !== "closed") return;
    if (!this.deviceClosed) {
      this.deviceClosed = true;
      if (this.counters !== undefined) this.counters.connections -= 1;
      const device = this.opened?.device;
      if (device !== undefined) {
        device.close().catch((error: unknown) => {
          log.error("closing export failed", { peer: this.peerText, export: device.name, error: errorMessage(error) });
        });
      }
      this.host.budget.leave(this.account, this);
      this.host.sessionEnded(this);
      this.endedResolve?.();
    }
  }

  private clearTimers(): void {
    for (const timer of [this.handshakeTimer, this.stallTimer, this.closeTimer, this.payloadTimer]) if (timer !== undefined) clearTimeout(timer);
    this.payloadTimer = undefined;
    this.handshakeTimer = undefined;
    this.stallTimer = undefined;
    this.closeTimer = undefined;
  }

  /** Server shutdown: handshaking clients are closed; transmitting ones finish in-flight requests (new ones get ESHUTDOWN). */
  shutdown(): void {
    if (this.socket !== this.rawSocket && !this.negotiation.tls) {
      // In the TLS handshake: nothing to finish.
      this.hardDisconnect();
      return;
    }
    if (this.stateValue === "greeting" || this.stateValue === "options") {
      if (this.optionBusy) this.softClose();
      else this.hardDisconnect();
      return;
    }
    if (this.stateValue !== "transmission") return;
    if (this.closeTimer === undefined) {
      this.closeTimer = setTimeout(this.hardDisconnect, this.limits.closeTimeoutMs);
      this.closeTimer.unref();
    }
    // Requests already received are answered ESHUTDOWN; the connection ends when none is in flight.
    this.pump();
    if (this.stateValue === "transmission" && this.inFlight === 0) this.softClose();
  }
}
