// The unit side of the auto-configuration protocol (seed Fig. 3), run by
// `ipsan unit --discovery HOST:PORT --cluster-key-file FILE`:
//   STARTUP, retransmitted with backoff until the station ACKs it (rounds of
//   attempts, then start over: a lost datagram delays a join, never loses it);
//   NEED_STORAGE_INFO -> STORAGE_INFO (the unit's table, fragmented,
//   retransmitted until ACKed); notifyChanged() -> STORAGE_INFO again;
//   HEARTBEAT every interval (the station sets it in its ACKs);
//   stop() -> SHUTDOWN, waiting a bounded time for its ACK.
// The station's name is resolved through DNS at start and at every new round.
//
// Several stations (issue 11: `--discovery A:P,B:P`, at most
// DISCOVERY_ADDRESSES_MAX): every datagram goes to every address, and any
// station's answer counts. Only the leading station listens for units, so
// the one that answers is the leader; when another station takes over it
// hears the unit's next heartbeat (a session it has not seen, as after a
// station restart), marks the unit online and asks for its storage info: the
// unit never notices, and never restarts. Names are resolved again every
// RESOLVE_REFRESH_MS while some address is a DNS name.

import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { assert } from "../util/assert.ts";
import { errorMessage } from "../util/errors.ts";
import { logger, type Logger } from "../util/log.ts";
import { realClock, type Clock, type Random, type TimerHandle } from "../util/clock.ts";
import {
  decodeAck,
  decodeEnrol,
  decodeFrame,
  decodeNeedStorageInfo,
  decodeRefuse,
  encodeHeartbeat,
  encodeShutdown,
  encodeStartup,
  encodeStorageInfo,
  splitFragments,
} from "./codec.ts";
import { openUnitSecret, packetKeyFor } from "./keys.ts";
import type { UnitCredentials } from "./unit_identity.ts";
import {
  MESSAGE_TYPE,
  REJECT_REASONS,
  SHUTDOWN_REASON,
  TIMESTAMP_SKEW_MS_MAX,
  UNIT_NAME_PATTERN,
  type RejectReason,
  type StorageInfo,
} from "./messages.ts";
import { ReplayGuard } from "./replay.ts";
import { SendSession } from "./session.ts";
import {
  DEFAULT_LIVENESS_TIMERS,
  HEARTBEAT_INTERVAL_MS_MAX,
  HEARTBEAT_INTERVAL_MS_MIN,
  Retransmitter,
  SHUTDOWN_ACK_TIMEOUT_MS,
  backoffFromEnv,
  type BackoffPolicy,
} from "./timers.ts";
import { isLoopback, openUdpSocket, type Address, type DatagramSocket } from "./transport.ts";

export type AgentState = "idle" | "starting" | "joined" | "stopping" | "stopped";

export type AgentEvent =
  | { readonly kind: "joined"; readonly station: Address }
  | { readonly kind: "storage_info_sent"; readonly generation: number; readonly fragments: number; readonly bytes: number }
  | { readonly kind: "storage_info_acked"; readonly generation: number }
  | { readonly kind: "packet_rejected"; readonly reason: RejectReason; readonly detail: string }
  /** The station gave this unit its own secret (epoch 1) or a rotated one; it is stored and in use. */
  | { readonly kind: "enrolled"; readonly epoch: number }
  /** The station refused this unit (REFUSE): its text says why and what to do. */
  | { readonly kind: "refused"; readonly code: number; readonly message: string };

/** At most this many station discovery addresses (`--discovery A:P,B:P,...`). */
export const DISCOVERY_ADDRESSES_MAX = 16;
/** While joined, DNS names among the station addresses are resolved again this often. */
export const RESOLVE_REFRESH_MS = 30_000;

export interface StationAgentOptions {
  readonly unitName: string;
  /**
   * The station's discovery address, or every station's (several stations
   * sharing one state, one of them leading): each datagram goes to each.
   * A host may be a DNS name.
   */
  readonly station: Address | readonly Address[];
  readonly clusterKey: Buffer;
  /** A snapshot of the unit's table, called whenever storage info is sent. */
  readonly storageInfo: () => StorageInfo;
  /** Until the station's first ACK says otherwise. */
  readonly heartbeatIntervalMs?: number;
  readonly backoff?: BackoffPolicy;
  readonly shutdownAckTimeoutMs?: number;
  readonly clock?: Clock;
  readonly random?: Random;
  readonly skewMsMax?: number;
  /** Local address to bind (default: loopback if the station is on loopback, else the wildcard). */
  readonly bindHost?: string;
  /** Send through this socket instead of opening one (many simulated units on one socket); feed handleDatagram(). */
  readonly socket?: DatagramSocket;
  readonly wrapSocket?: (socket: DatagramSocket) => DatagramSocket;
  /** DNS resolution (injectable for tests). */
  readonly resolve?: (host: string) => Promise<string>;
  /**
   * The unit's identity and secret (issue 7): STARTUP carries its id, the
   * station's ENROL is stored, and once enrolled every datagram is signed
   * with the unit's own key. Without it the unit speaks with the cluster key
   * only (simulations; units before issue 7).
   */
  readonly credentials?: UnitCredentials;
}

/** Changes within this time are sent as one STORAGE_INFO. */
const CHANGE_COALESCE_MS = 20;

async function resolveHost(host: string): Promise<string> {
  if (isIP(host) !== 0) return host;
  return (await lookup(host)).address;
}

export class StationAgent {
  private readonly unitName: string;
  private readonly stationSpecs: readonly Address[];
  private readonly packetKey: Buffer;
  private readonly credentials: UnitCredentials | undefined;
  /** An ENROL's secret is being written to DATA/unit.secret. */
  private installing = false;
  private readonly storageInfo: () => StorageInfo;
  private readonly backoff: BackoffPolicy;
  private readonly shutdownAckTimeoutMs: number;
  private readonly clock: Clock;
  private readonly random: Random;
  private readonly bindHost: string | undefined;
  private readonly wrapSocket: ((socket: DatagramSocket) => DatagramSocket) | undefined;
  private readonly resolve: (host: string) => Promise<string>;
  private readonly ownsSocket: boolean;
  private readonly replay: ReplayGuard;
  private readonly session: SendSession;
  private readonly log: Logger = logger("discovery");
  private readonly handlers = new Set<(event: AgentEvent) => void>();

  private socket: DatagramSocket | null;
  /** The resolved addresses, in the order given (a name that does not resolve is left out until it does). */
  private stationAddresses: readonly Address[] = [];
  /** Where the last authentic station datagram came from. */
  private answeredBy: Address | null = null;
  /** The last address each spec resolved to (by index), kept when a later lookup fails. */
  private readonly lastResolved = new Map<number, string>();
  private resolvedAtMs = 0;
  private resolving = false;
  private currentState: AgentState = "idle";
  private heartbeatIntervalMs: number;
  private heartbeatTimer: TimerHandle | null = null;
  private roundTimer: TimerHandle | null = null;
  private changeTimer: TimerHandle | null = null;
  private generation = 1;
  private startup: { messageId: number; retransmitter: Retransmitter } | null = null;
  private info: { messageId: number; generation: number; retransmitter: Retransmitter; lastSentMs: number } | null = null;
  private shutdown: { messageId: number; resolve: (acked: boolean) => void } | null = null;

  private datagramsSent = 0;
  private retransmissions = 0;
  private readonly rejected = Object.fromEntries(REJECT_REASONS.map((r) => [r, 0])) as Record<RejectReason, number>;

  constructor(options: StationAgentOptions) {
    assert(UNIT_NAME_PATTERN.test(options.unitName), `unit name ${options.unitName}`);
    this.unitName = options.unitName;
    this.stationSpecs = Array.isArray(options.station) ? [...(options.station as readonly Address[])] : [options.station as Address];
    assert(this.stationSpecs.length >= 1 && this.stationSpecs.length <= DISCOVERY_ADDRESSES_MAX, `1..${DISCOVERY_ADDRESSES_MAX} station addresses`);
    this.packetKey = packetKeyFor(options.clusterKey);
    this.credentials = options.credentials;
    this.storageInfo = options.storageInfo;
    this.heartbeatIntervalMs = options.heartbeatIntervalMs ?? DEFAULT_LIVENESS_TIMERS.heartbeatIntervalMs;
    this.backoff = options.backoff ?? backoffFromEnv();
    this.shutdownAckTimeoutMs = options.shutdownAckTimeoutMs ?? SHUTDOWN_ACK_TIMEOUT_MS;
    this.clock = options.clock ?? realClock;
    this.random = options.random ?? Math.random;
    this.bindHost = options.bindHost;
    this.wrapSocket = options.wrapSocket;
    this.resolve = options.resolve ?? resolveHost;
    this.socket = options.socket ?? null;
    this.ownsSocket = options.socket === undefined;
    this.replay = new ReplayGuard({ skewMsMax: options.skewMsMax ?? TIMESTAMP_SKEW_MS_MAX });
    this.session = new SendSession({ packetKey: this.packetKey, clock: this.clock, fromStation: false });
    if (this.credentials !== undefined) {
      const key = this.credentials.sendKey();
      this.session.setKey(key.packetKey, key.unitKey);
    }
  }

  get state(): AgentState {
    return this.currentState;
  }

  get name(): string {
    return this.unitName;
  }

  /** The station that answered last, else the first address as last resolved. */
  get station(): Address | null {
    return this.answeredBy ?? this.stationAddresses[0] ?? null;
  }

  /** Every station address as last resolved (datagrams go to each). */
  get stations(): readonly Address[] {
    return this.stationAddresses;
  }

  get currentHeartbeatIntervalMs(): number {
    return this.heartbeatIntervalMs;
  }

  stats(): { datagramsSent: number; retransmissions: number; rejected: Readonly<Record<RejectReason, number>>; generation: number } {
    return { datagramsSent: this.datagramsSent, retransmissions: this.retransmissions, rejected: { ...this.rejected }, generation: this.generation };
  }

  subscribe(handler: (event: AgentEvent) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  /** Resolves once the station ACKed STARTUP (or asked for storage info), or rejects after timeoutMs. */
  waitJoined(timeoutMs: number): Promise<void> {
    if (this.currentState === "joined") return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = this.clock.setTimeout(() => {
        unsubscribe();
        reject(new Error(`unit ${this.unitName}: not joined within ${timeoutMs} ms`));
      }, timeoutMs);
      const unsubscribe = this.subscribe((event) => {
        if (event.kind !== "joined") return;
        timer.cancel();
        unsubscribe();
        resolve();
      });
    });
  }

  /**
   * Starts joining: resolves the station's name, binds the socket, sends
   * STARTUP and heartbeats. Returns once the first STARTUP is sent (or name
   * resolution failed: it is retried in the background).
   */
  async start(): Promise<void> {
    assert(this.currentState === "idle", `start() in state ${this.currentState}`);
    this.currentState = "starting";
    await this.beginRound();
    this.scheduleHeartbeat();
  }

  /** The unit's table changed: send STORAGE_INFO (changes within CHANGE_COALESCE_MS go as one). */
  notifyChanged(): void {
    if (this.currentState !== "starting" && this.currentState !== "joined") return;
    this.generation = this.generation >= 0xffff_ffff ? 1 : this.generation + 1;
    if (this.changeTimer !== null) return;
    this.changeTimer = this.clock.setTimeout(() => {
      this.changeTimer = null;
      this.sendStorageInfo();
    }, CHANGE_COALESCE_MS);
  }

  /** Sends SHUTDOWN and waits up to shutdownAckTimeoutMs for the ACK. True if acknowledged. */
  async stop(reason: "stop" | "restart" = "stop"): Promise<boolean> {
    if (this.currentState === "stopped" || this.currentState === "stopping") return false;
    const wasRunning = this.currentState !== "idle";
    this.currentState = "stopping";
    this.heartbeatTimer?.cancel();
    this.roundTimer?.cancel();
    this.changeTimer?.cancel();
    this.startup?.retransmitter.stop();
    this.info?.retransmitter.stop();
    let acked = false;
    if (wasRunning && this.stationAddresses.length > 0 && this.socket !== null) {
      const messageId = this.session.nextMessageId();
      const payload = encodeShutdown(reason === "restart" ? SHUTDOWN_REASON.RESTART : SHUTDOWN_REASON.STOP);
      acked = await new Promise<boolean>((resolve) => {
        const retransmitter = new Retransmitter({
          clock: this.clock,
          policy: {
            initialMs: Math.max(1, Math.floor(this.shutdownAckTimeoutMs / 5)),
            maxMs: this.shutdownAckTimeoutMs,
            attemptsMax: 5,
            jitterRatio: 0,
          },
          random: this.random,
          send: () => this.sendFrame(MESSAGE_TYPE.SHUTDOWN, messageId, payload),
          onExhausted: () => {},
        });
        const timer = this.clock.setTimeout(() => finish(false), this.shutdownAckTimeoutMs);
        const finish = (value: boolean): void => {
          timer.cancel();
          retransmitter.stop();
          this.shutdown = null;
          resolve(value);
        };
        this.shutdown = { messageId, resolve: finish };
        retransmitter.start();
      });
    }
    this.currentState = "stopped";
    if (this.ownsSocket) await this.socket?.close();
    return acked;
  }

  /** Stops at once without SHUTDOWN, as a crash would (simulations and tests). */
  async abort(): Promise<void> {
    this.currentState = "stopped";
    this.heartbeatTimer?.cancel();
    this.roundTimer?.cancel();
    this.changeTimer?.cancel();
    this.startup?.retransmitter.stop();
    this.info?.retransmitter.stop();
    if (this.ownsSocket) await this.socket?.close();
  }

  // ---- Receiving ----

  /** Entry point for every datagram from the station (public for shared sockets). */
  handleDatagram(bytes: Buffer, from: Address): void {
    try {
      this.receive(bytes, from);
    } catch (error) {
      this.log.limited("agent-bug", "discovery agent datagram handling failed", { unit: this.unitName, error: errorMessage(error) });
    }
  }

  private receive(bytes: Buffer, from: Address): void {
    const credentials = this.credentials;
    const decoded = decodeFrame(bytes, credentials === undefined ? this.packetKey : (_name, unitKey) => credentials.receiveKeys(unitKey));
    if (decoded.kind === "invalid") return this.reject(decoded.reason, decoded.detail);
    const frame = decoded.frame;
    if (!frame.fromStation) return this.reject("wrong_direction", `${frame.typeName} from a unit`);
    if (frame.unitName !== this.unitName) return this.reject("wrong_unit", `addressed to ${frame.unitName}`);
    const verdict = this.replay.check("station", frame, this.clock.nowMs());
    if (verdict.kind === "reject") return this.reject(verdict.reason, verdict.detail);
    if (this.currentState === "stopped" || this.currentState === "idle") return;
    this.answeredBy = from;
    if (frame.typeName === "ACK") {
      const ack = decodeAck(frame.payload);
      if (ack.kind === "invalid") return this.reject(ack.reason, ack.detail);
      const { ackedMessageId, ackedType, heartbeatIntervalMs } = ack.value;
      this.adoptHeartbeatInterval(heartbeatIntervalMs);
      if (ackedType === MESSAGE_TYPE.STARTUP && this.startup?.messageId === ackedMessageId) this.joined();
      else if (ackedType === MESSAGE_TYPE.STORAGE_INFO && this.info?.messageId === ackedMessageId) {
        const generation = this.info.generation;
        this.info.retransmitter.stop();
        this.info = null;
        this.emit({ kind: "storage_info_acked", generation });
      } else if (ackedType === MESSAGE_TYPE.SHUTDOWN && this.shutdown?.messageId === ackedMessageId) {
        this.shutdown.resolve(true);
      }
      return;
    }
    if (frame.typeName === "NEED_STORAGE_INFO") {
      const need = decodeNeedStorageInfo(frame.payload);
      if (need.kind === "invalid") return this.reject(need.reason, need.detail);
      if (this.currentState === "stopping") return;
      // The station knows us: as good as an ACK of STARTUP.
      if (this.currentState === "starting") this.joined();
      if (this.info === null || this.info.generation !== this.generation) this.sendStorageInfo();
      // Already on its way: resend now, unless we just sent it (the station's ask crossed our send).
      else if (this.clock.nowMs() - this.info.lastSentMs >= this.backoff.initialMs) this.info.retransmitter.nudge();
      return;
    }
    if (frame.typeName === "ENROL") return this.onEnrol(frame.payload, frame.unitKey);
    if (frame.typeName === "REFUSE") {
      const refusal = decodeRefuse(frame.payload);
      if (refusal.kind === "invalid") return this.reject(refusal.reason, refusal.detail);
      this.log.limited("agent-refused", "station refused this unit", { unit: this.unitName, message: refusal.value.message });
      this.emit({ kind: "refused", code: refusal.value.code, message: refusal.value.message });
      return;
    }
    // Any other type was refused by decodeFrame (wrong direction).
  }

  /** ENROL: the station's secret for this unit, sealed; stored durably, then used for every datagram. */
  private onEnrol(payload: Buffer, rotation: boolean): void {
    const credentials = this.credentials;
    if (credentials === undefined) return this.reject("bad_payload", "ENROL to a unit without an identity");
    const enrol = decodeEnrol(payload);
    if (enrol.kind === "invalid") return this.reject(enrol.reason, enrol.detail);
    const { epoch, unitId } = enrol.value;
    if (unitId !== credentials.unitId) return this.reject("bad_payload", `ENROL for unit id ${unitId}, this unit is ${credentials.unitId}`);
    if (epoch <= credentials.epoch || this.installing) return; // already stored (a repeated ENROL), or being stored
    if (rotation && epoch !== credentials.epoch + 1) return this.reject("bad_payload", `ENROL of epoch ${epoch}, this unit holds ${credentials.epoch}`);
    const wrapKey = credentials.unwrapKey(rotation);
    const secret = wrapKey === null ? null : openUnitSecret(wrapKey, { unitName: this.unitName, unitId, epoch }, enrol.value);
    if (secret === null) return this.reject("bad_payload", "ENROL secret does not open with this unit's key");
    this.installing = true;
    credentials
      .install(epoch, secret)
      .then(() => {
        const key = credentials.sendKey();
        this.session.setKey(key.packetKey, key.unitKey);
        this.log.info(rotation ? "unit secret rotated" : "enrolled: the station gave this unit its own secret", { unit: this.unitName, epoch });
        this.emit({ kind: "enrolled", epoch });
        // Show the station at once that we hold it: STARTUP again while joining, else a heartbeat.
        if (this.currentState === "starting") this.startup?.retransmitter.nudge();
        else if (this.currentState === "joined") this.sendFrame(MESSAGE_TYPE.HEARTBEAT, this.session.nextMessageId(), encodeHeartbeat({ generation: this.generation }));
      })
      .catch((error: unknown) => {
        this.log.error("cannot store the unit secret; the station will offer it again", { unit: this.unitName, error: errorMessage(error) });
      })
      .finally(() => {
        this.installing = false;
      });
  }

  private joined(): void {
    this.startup?.retransmitter.stop();
    this.startup = null;
    this.roundTimer?.cancel();
    this.roundTimer = null;
    if (this.currentState !== "starting") return;
    this.currentState = "joined";
    const station = this.station;
    this.log.info("joined station", { unit: this.unitName, station: station === null ? "-" : `${station.host}:${station.port}` });
    if (station !== null) this.emit({ kind: "joined", station });
  }

  private adoptHeartbeatInterval(intervalMs: number): void {
    if (intervalMs === 0 || intervalMs === this.heartbeatIntervalMs) return;
    const clamped = Math.max(HEARTBEAT_INTERVAL_MS_MIN, Math.min(HEARTBEAT_INTERVAL_MS_MAX, intervalMs));
    this.heartbeatIntervalMs = clamped;
    this.scheduleHeartbeat();
  }

  // ---- Sending ----

  /** One round of STARTUP attempts, after (re)resolving the station; starts over when used up. */
  private async beginRound(): Promise<void> {
    this.roundTimer = null;
    if (this.currentState !== "starting") return;
    try {
      await this.resolveStations();
      const first = this.stationAddresses[0];
      if (first === undefined) throw new Error("no station address resolves");
      if (this.socket === null) {
        const bindHost = this.bindHost ?? (this.stationAddresses.every((a) => isLoopback(a.host)) ? first.host : isIP(first.host) === 6 ? "::" : "0.0.0.0");
        const socket = await openUdpSocket({ host: bindHost, port: 0 }, (bytes, from) => this.handleDatagram(bytes, from));
        this.socket = this.wrapSocket === undefined ? socket : this.wrapSocket(socket);
      }
    } catch (error) {
      this.log.limited("agent-resolve", "cannot reach station; retrying", {
        unit: this.unitName,
        station: this.specsText(),
        error: errorMessage(error),
      });
      this.scheduleRound();
      return;
    }
    if (this.currentState !== "starting") return;
    const messageId = this.session.nextMessageId();
    const payload = encodeStartup({ generation: this.generation, ...(this.credentials === undefined ? {} : { unitId: this.credentials.unitId }) });
    const retransmitter = new Retransmitter({
      clock: this.clock,
      policy: this.backoff,
      random: this.random,
      send: (attempt) => {
        if (attempt > 0) this.retransmissions += 1;
        this.sendFrame(MESSAGE_TYPE.STARTUP, messageId, payload);
      },
      onExhausted: () => {
        // A round of STARTUPs without an ACK: say so, naming the address (issue 9 item 2: a unit pointed at
        // the station's HTTP port used to log "joining station" and then nothing, for ever).
        this.log.limited("agent-no-answer", "no answer from the station; still trying", {
          unit: this.unitName,
          station: this.stationSpecs.map((s) => `udp://${s.host}:${s.port}`).join(","),
          attempts: this.backoff.attemptsMax,
          hint: "--discovery (old spelling --station HOST:PORT) must be the station's discovery address (it prints: ipsan station discovery udp://HOST:PORT), not its HTTP API; and the unit's --cluster-key-file must be the station's DATA/cluster.key",
        });
        this.scheduleRound();
      },
    });
    this.startup = { messageId, retransmitter };
    retransmitter.start();
  }

  /**
   * Resolves every station address (in parallel, each bounded by the
   * resolver). A name that fails keeps its last address, if any; one whose
   * address is of the other IP family than the first (one socket speaks one
   * family) is left out, with a log line.
   */
  private async resolveStations(): Promise<void> {
    const results = await Promise.allSettled(this.stationSpecs.map((spec) => this.resolve(spec.host)));
    const resolved: Address[] = [];
    let family = 0;
    results.forEach((result, index) => {
      const spec = this.stationSpecs[index] as Address;
      if (result.status === "fulfilled") this.lastResolved.set(index, result.value);
      else {
        this.log.limited(`agent-resolve:${spec.host}`, "cannot resolve a station address; using the others", {
          unit: this.unitName,
          station: `${spec.host}:${spec.port}`,
          error: errorMessage(result.reason),
        });
      }
      const host = this.lastResolved.get(index);
      if (host === undefined) return;
      const hostFamily = isIP(host);
      if (family !== 0 && hostFamily !== family) {
        this.log.limited(`agent-family:${spec.host}`, "station address is of another IP family than the first; left out", {
          unit: this.unitName,
          station: `${spec.host}:${spec.port}`,
          resolved: host,
        });
        return;
      }
      family = hostFamily;
      resolved.push({ host, port: spec.port });
    });
    this.resolvedAtMs = this.clock.nowMs();
    this.stationAddresses = resolved;
  }

  /** While joined: resolve the names again every RESOLVE_REFRESH_MS (a station may move, or come into DNS late). */
  private maybeRefreshAddresses(): void {
    if (this.resolving || this.stationSpecs.every((spec) => isIP(spec.host) !== 0)) return;
    if (this.clock.nowMs() - this.resolvedAtMs < RESOLVE_REFRESH_MS) return;
    this.resolving = true;
    void this.resolveStations().finally(() => {
      this.resolving = false;
    });
  }

  private specsText(): string {
    return this.stationSpecs.map((spec) => `${spec.host}:${spec.port}`).join(",");
  }

  private scheduleRound(): void {
    if (this.currentState !== "starting" || this.roundTimer !== null) return;
    this.roundTimer = this.clock.setTimeout(() => void this.beginRound(), this.backoff.maxMs);
  }

  private sendStorageInfo(): void {
    if (this.currentState !== "starting" && this.currentState !== "joined") return;
    this.info?.retransmitter.stop();
    this.info = null;
    let payload: Buffer | null;
    try {
      payload = encodeStorageInfo({ generation: this.generation, info: this.storageInfo() });
    } catch (error) {
      this.log.error("cannot build storage info", { unit: this.unitName, error: errorMessage(error) });
      return;
    }
    if (payload === null) {
      this.log.error("storage info exceeds the protocol limits; not sent", { unit: this.unitName });
      return;
    }
    const fragments = splitFragments(payload);
    const messageId = this.session.nextMessageId();
    const generation = this.generation;
    const retransmitter = new Retransmitter({
      clock: this.clock,
      policy: this.backoff,
      random: this.random,
      send: (attempt) => {
        if (attempt > 0) this.retransmissions += 1;
        if (this.info?.messageId === messageId) this.info.lastSentMs = this.clock.nowMs();
        fragments.forEach((fragment, index) =>
          this.sendFrame(MESSAGE_TYPE.STORAGE_INFO, messageId, fragment, index, fragments.length),
        );
      },
      // Start over with a fresh snapshot after a pause (the station also asks when heartbeats disagree).
      onExhausted: () => {
        if (this.info?.messageId !== messageId) return;
        this.info = null;
        this.changeTimer ??= this.clock.setTimeout(() => {
          this.changeTimer = null;
          this.sendStorageInfo();
        }, this.backoff.maxMs);
      },
    });
    this.info = { messageId, generation, retransmitter, lastSentMs: this.clock.nowMs() };
    this.emit({ kind: "storage_info_sent", generation, fragments: fragments.length, bytes: payload.length });
    retransmitter.start();
  }

  private scheduleHeartbeat(): void {
    this.heartbeatTimer?.cancel();
    if (this.currentState !== "starting" && this.currentState !== "joined") return;
    this.heartbeatTimer = this.clock.setTimeout(() => {
      this.heartbeatTimer = null;
      if (this.currentState !== "starting" && this.currentState !== "joined") return;
      // A unit waiting for its first secret has nothing to say yet (a cluster-key heartbeat would be refused).
      const enrolling = this.currentState === "starting" && this.credentials !== undefined && !this.credentials.enrolled;
      if (!enrolling) this.sendFrame(MESSAGE_TYPE.HEARTBEAT, this.session.nextMessageId(), encodeHeartbeat({ generation: this.generation }));
      this.maybeRefreshAddresses();
      this.scheduleHeartbeat();
    }, this.heartbeatIntervalMs);
  }

  private sendFrame(type: (typeof MESSAGE_TYPE)[keyof typeof MESSAGE_TYPE], messageId: number, payload: Uint8Array, fragmentIndex = 0, fragmentCount = 1): void {
    const socket = this.socket;
    if (socket === null || this.stationAddresses.length === 0) return;
    if (this.session.exhausted) {
      // Counters near wrapping: become a new incarnation (the station sees a new session and asks for storage info).
      this.session.renew();
    }
    // One frame (one sequence number) to every station: only the leader listens; any answer counts.
    const frame = this.session.frame({ type, unitName: this.unitName, messageId, payload, fragmentIndex, fragmentCount });
    for (const address of this.stationAddresses) {
      this.datagramsSent += 1;
      socket.send(frame, address);
    }
  }

  private reject(reason: RejectReason, detail: string): void {
    this.rejected[reason] += 1;
    this.log.limited(`agent-reject:${reason}`, "discovery datagram rejected", { unit: this.unitName, reason, detail });
    this.emit({ kind: "packet_rejected", reason, detail });
  }

  private emit(event: AgentEvent): void {
    for (const handler of this.handlers) {
      try {
        handler(event);
      } catch (error) {
        this.log.limited("agent-handler", "agent event handler failed", { kind: event.kind, error: errorMessage(error) });
      }
    }
  }
}
