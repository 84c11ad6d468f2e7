// The station side of the auto-configuration protocol (seed Fig. 3): a unit
// says STARTUP, the station records it, ACKs and asks NEED_STORAGE_INFO, the
// unit answers STORAGE_INFO (fragmented), the station ACKs and updates the
// pool; HEARTBEATs keep the unit online (silent: suspect, then offline; heard
// again: online); SHUTDOWN marks it down. The listener keeps no pool: it
// emits typed events (DiscoveryEvent) that the station core stores.
//
// Every datagram is decoded by the pure codec, authenticated, replay-checked,
// then dispatched; anything rejected is counted by reason, logged through the
// rate limiter and reported as a packet_rejected event, and changes nothing.

import { logger, type Logger } from "../util/log.ts";
import { assert } from "../util/assert.ts";
import { errorMessage } from "../util/errors.ts";
import { realClock, type Clock, type Random, type TimerHandle } from "../util/clock.ts";
import {
  decodeFrame,
  decodeHeartbeat,
  decodeShutdown,
  decodeStartup,
  decodeStorageInfo,
  encodeAck,
  encodeEnrol,
  encodeNeedStorageInfo,
  encodeRefuse,
} from "./codec.ts";
import type { UnitIdentities, UnitIdentity } from "./identities.ts";
import { enrolKeyFor, packetKeyFor, rotateKeyFor, sealUnitSecret } from "./keys.ts";
import {
  ACK_STATUS,
  MESSAGE_TYPE,
  REFUSE_CODE,
  REJECT_REASONS,
  TIMESTAMP_SKEW_MS_MAX,
  UNITS_MAX,
  type Frame,
  type MessageTypeName,
  type RejectReason,
  type StorageInfo,
} from "./messages.ts";
import { Reassembler, type ReassemblyLimits } from "./reassembly.ts";
import { ReplayGuard } from "./replay.ts";
import { SendSession } from "./session.ts";
import {
  Retransmitter,
  backoffFromEnv,
  checkLivenessTimers,
  livenessTimersFromEnv,
  type BackoffPolicy,
  type LivenessTimers,
} from "./timers.ts";
import { openUdpSocket, type Address, type DatagramSocket } from "./transport.ts";

export type UnitState = "online" | "suspect" | "offline" | "down";
export const UNIT_STATES: readonly UnitState[] = ["online", "suspect", "offline", "down"];

/** Which state changes are legal (checked by transition()). */
const TRANSITIONS: Readonly<Record<UnitState, readonly UnitState[]>> = {
  online: ["suspect", "down"],
  suspect: ["online", "offline", "down"],
  offline: ["online", "down"],
  down: ["online"],
};

export type DiscoveryEvent =
  /** First authenticated datagram of a unit incarnation (a new session). */
  | {
      readonly kind: "unit_startup";
      readonly unit: string;
      readonly from: Address;
      readonly sessionId: string;
      /** What revealed it: its STARTUP, or (station restarted) a HEARTBEAT or STORAGE_INFO, or an SNMP trap. */
      readonly reason: "startup" | "heartbeat" | "storage_info" | "shutdown" | "snmp";
    }
  | {
      readonly kind: "unit_storage_info";
      readonly unit: string;
      readonly info: StorageInfo;
      /** Increases with every change of the unit's table within a session; 0 from the control API. */
      readonly generation: number;
      readonly from: Address;
      readonly source: "discovery" | "control_api";
    }
  | {
      readonly kind: "unit_state";
      readonly unit: string;
      readonly state: UnitState;
      readonly previous: UnitState | null;
      readonly reason: string;
    }
  | { readonly kind: "packet_rejected"; readonly reason: RejectReason; readonly from: Address; readonly detail: string }
  /**
   * Unit identities (issue 7): a first secret issued (enrolled), the unit
   * holding it (confirmed), a rotation finished (rotated), a STARTUP claiming
   * an enrolled name with another id (impostor), a datagram in an enrolled
   * name signed with the cluster key only (key_refused). Impostor and
   * key_refused are reported at most once per name and sender per
   * IDENTITY_EVENT_HOLD_MS.
   */
  | {
      readonly kind: "unit_identity";
      readonly unit: string;
      readonly action: "enrolled" | "confirmed" | "rotated" | "impostor" | "key_refused";
      readonly from: Address;
      /** The id the datagram claimed (impostor), or the unit's. */
      readonly unitId: string | null;
      readonly detail: string;
    };

/** An impostor's or a stale key's retries are reported (event, REFUSE) at most this often per name and sender. */
export const IDENTITY_EVENT_HOLD_MS = 10_000;
/** REFUSE answers to one sender are sent at most this often (its STARTUP retries back off anyway). */
export const REFUSE_HOLD_MS = 1_000;
/** ENROL of a rotation is re-sent at most this often while the unit still signs with its old secret. */
export const ROTATION_RESEND_MS = 250;

export type DiscoveryEventHandler = (event: DiscoveryEvent) => void;

export interface UnitView {
  readonly name: string;
  readonly state: UnitState;
  readonly address: Address;
  readonly sessionId: string | null;
  readonly lastSeenMs: number;
  readonly generation: number;
  readonly mode: "discovery" | "snmp";
}

export interface DiscoveryStats {
  readonly datagramsReceived: number;
  readonly datagramsSent: number;
  readonly retransmissions: number;
  readonly accepted: Readonly<Record<MessageTypeName, number>>;
  readonly rejected: Readonly<Record<RejectReason, number>>;
  readonly units: Readonly<Record<UnitState, number>>;
  readonly reassemblyMessages: number;
  readonly reassemblyBytes: number;
}

export interface DiscoveryListenerOptions {
  readonly clusterKey: Buffer;
  /** Default: livenessTimersFromEnv() (IPSAN_DISCOVERY_HEARTBEAT_MS, ..._SUSPECT_MS, ..._OFFLINE_MS). */
  readonly timers?: LivenessTimers;
  /** NEED_STORAGE_INFO retransmission. Default: backoffFromEnv(). */
  readonly backoff?: BackoffPolicy;
  readonly clock?: Clock;
  readonly random?: Random;
  readonly skewMsMax?: number;
  readonly unitsMax?: number;
  readonly reassembly?: Partial<ReassemblyLimits>;
  /** Tests: wrap the socket (loss, duplication, reordering). */
  readonly wrapSocket?: (socket: DatagramSocket) => DatagramSocket;
  /** Use this socket instead of binding one (in-memory networks); feed handleDatagram(). */
  readonly socket?: DatagramSocket;
  /**
   * Enrolled units (issue 7). With it, a STARTUP carrying a unit id enrols
   * the unit (ENROL), enrolled units are heard only with their own secret, and
   * a second unit claiming an enrolled name is refused. Without it (protocol
   * simulations), every unit uses the cluster key as before.
   */
  readonly identities?: UnitIdentities;
}

interface UnitRecord {
  readonly name: string;
  sessionId: string | null;
  address: Address;
  state: UnitState;
  lastSeenMs: number;
  /** Generation of the last applied storage info (0: none yet). */
  generation: number;
  lastInfoMessageId: number;
  /** Session that sent SHUTDOWN: its late datagrams do not revive the unit. */
  shutdownSessionId: string | null;
  infoRequest: Retransmitter | null;
  /** Consecutive heartbeats whose generation differs from ours. */
  generationMismatches: number;
  mode: "discovery" | "snmp";
}

function zeroCounts<K extends string>(keys: readonly K[]): Record<K, number> {
  return Object.fromEntries(keys.map((k) => [k, 0])) as Record<K, number>;
}

const UNSPECIFIED_HOSTS = new Set(["0.0.0.0", "::", ""]);

export class DiscoveryListener {
  private readonly packetKey: Buffer;
  private readonly enrolKey: Buffer;
  private readonly identities: UnitIdentities | undefined;
  /** When an identity event or REFUSE last went to each "unit|sender" (rate limits). */
  private readonly identityNoticeAtMs = new Map<string, number>();
  private readonly refuseAtMs = new Map<string, number>();
  private readonly rotationSentAtMs = new Map<string, number>();
  private readonly timers: LivenessTimers;
  private readonly backoff: BackoffPolicy;
  private readonly clock: Clock;
  private readonly random: Random;
  private readonly unitsMax: number;
  private readonly wrapSocket: ((socket: DatagramSocket) => DatagramSocket) | undefined;
  private readonly replay: ReplayGuard;
  private readonly reassembler: Reassembler;
  private readonly session: SendSession;
  private readonly log: Logger = logger("discovery");
  private readonly records = new Map<string, UnitRecord>();
  private readonly handlers = new Set<DiscoveryEventHandler>();
  /** Names whose first state has not been emitted yet (it goes out with previous: null). */
  private readonly firstState = new Set<string>();
  private socket: DatagramSocket | null = null;
  private sweepTimer: TimerHandle | null = null;
  private closed = false;

  private datagramsReceived = 0;
  private datagramsSent = 0;
  private retransmissions = 0;
  private readonly accepted = zeroCounts(Object.keys(MESSAGE_TYPE) as MessageTypeName[]);
  private readonly rejected = zeroCounts(REJECT_REASONS);

  constructor(options: DiscoveryListenerOptions) {
    this.packetKey = packetKeyFor(options.clusterKey);
    this.enrolKey = enrolKeyFor(options.clusterKey);
    this.identities = options.identities;
    this.timers = checkLivenessTimers(options.timers ?? livenessTimersFromEnv());
    this.backoff = options.backoff ?? backoffFromEnv();
    this.clock = options.clock ?? realClock;
    this.random = options.random ?? Math.random;
    this.unitsMax = options.unitsMax ?? UNITS_MAX;
    this.wrapSocket = options.wrapSocket;
    this.replay = new ReplayGuard({ skewMsMax: options.skewMsMax ?? TIMESTAMP_SKEW_MS_MAX });
    this.reassembler = new Reassembler(options.reassembly ?? {});
    this.session = new SendSession({ packetKey: this.packetKey, clock: this.clock, fromStation: true });
    this.socket = options.socket ?? null;
    this.scheduleSweep();
  }

  get livenessTimers(): LivenessTimers {
    return this.timers;
  }

  /** The bound address (after listen()). */
  get address(): Address | null {
    return this.socket?.local ?? null;
  }

  /** Binds the UDP socket; port 0 picks a free port. Returns the bound address. */
  async listen(address: Address): Promise<Address> {
    assert(this.socket === null && !this.closed, "listen() once");
    const socket = await openUdpSocket(address, (bytes, from) => this.handleDatagram(bytes, from));
    this.socket = this.wrapSocket === undefined ? socket : this.wrapSocket(socket);
    this.log.info("discovery listening", { address: `${socket.local.host}:${socket.local.port}` });
    return socket.local;
  }

  /** Stops timers and closes the socket. Units keep their state in the station core's store. */
  async close(): Promise<void> {
    this.closed = true;
    this.sweepTimer?.cancel();
    for (const record of this.records.values()) record.infoRequest?.stop();
    await this.socket?.close();
    this.socket = null;
  }

  /** Subscribes to every event; returns the unsubscribe function. */
  subscribe(handler: DiscoveryEventHandler): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  units(): UnitView[] {
    return [...this.records.values()].map((r) => this.view(r));
  }

  unit(name: string): UnitView | undefined {
    const record = this.records.get(name);
    return record === undefined ? undefined : this.view(record);
  }

  stats(): DiscoveryStats {
    const units = zeroCounts(UNIT_STATES);
    for (const record of this.records.values()) units[record.state] += 1;
    return {
      datagramsReceived: this.datagramsReceived,
      datagramsSent: this.datagramsSent,
      retransmissions: this.retransmissions,
      accepted: { ...this.accepted },
      rejected: { ...this.rejected },
      units,
      reassemblyMessages: this.reassembler.messages,
      reassemblyBytes: this.reassembler.bytes,
    };
  }

  /** Prometheus text for the station's /metrics. */
  metricsText(): string {
    const s = this.stats();
    const lines = [
      "# HELP ipsan_discovery_datagrams_received_total UDP datagrams received on the discovery port.",
      "# TYPE ipsan_discovery_datagrams_received_total counter",
      `ipsan_discovery_datagrams_received_total ${s.datagramsReceived}`,
      "# HELP ipsan_discovery_datagrams_sent_total UDP datagrams sent by the discovery listener.",
      "# TYPE ipsan_discovery_datagrams_sent_total counter",
      `ipsan_discovery_datagrams_sent_total ${s.datagramsSent}`,
      "# HELP ipsan_discovery_retransmissions_total NEED_STORAGE_INFO retransmissions.",
      "# TYPE ipsan_discovery_retransmissions_total counter",
      `ipsan_discovery_retransmissions_total ${s.retransmissions}`,
      "# HELP ipsan_discovery_frames_accepted_total Authenticated datagrams accepted, by message type.",
      "# TYPE ipsan_discovery_frames_accepted_total counter",
      ...Object.entries(s.accepted).map(([type, n]) => `ipsan_discovery_frames_accepted_total{type="${type}"} ${n}`),
      "# HELP ipsan_discovery_packets_rejected_total Datagrams rejected, by reason.",
      "# TYPE ipsan_discovery_packets_rejected_total counter",
      ...Object.entries(s.rejected).map(([reason, n]) => `ipsan_discovery_packets_rejected_total{reason="${reason}"} ${n}`),
      "# HELP ipsan_discovery_units Units known to the discovery listener, by state.",
      "# TYPE ipsan_discovery_units gauge",
      ...Object.entries(s.units).map(([state, n]) => `ipsan_discovery_units{state="${state}"} ${n}`),
    ];
    return `${lines.join("\n")}\n`;
  }

  /**
   * Asks a unit for its storage info again (NEED_STORAGE_INFO, retransmitted
   * with backoff until its STORAGE_INFO arrives). False if the unit is not
   * known by the discovery protocol or is down.
   */
  requestStorageInfo(unitName: string): boolean {
    const record = this.records.get(unitName);
    if (record === undefined || record.sessionId === null || record.state === "down" || record.mode !== "discovery") return false;
    if (record.infoRequest?.active === true) {
      record.infoRequest.nudge();
      return true;
    }
    const messageId = this.session.nextMessageId();
    const retransmitter = new Retransmitter({
      clock: this.clock,
      policy: this.backoff,
      random: this.random,
      send: (attempt) => {
        if (attempt > 0) this.retransmissions += 1;
        this.send(record.address, this.session.frame({
          type: MESSAGE_TYPE.NEED_STORAGE_INFO,
          unitName: record.name,
          messageId,
          payload: encodeNeedStorageInfo(record.generation),
          ...this.signingFor(record.name),
        }));
      },
      // Given up for now; the next heartbeat (generation mismatch) asks again.
      onExhausted: () => {
        if (record.infoRequest === retransmitter) record.infoRequest = null;
      },
    });
    record.infoRequest = retransmitter;
    retransmitter.start();
    return true;
  }

  // ---- Hooks for other sources (SNMP traps, control API): see snmp_join.ts ----

  /** Records a unit learnt outside the UDP protocol (SNMP) and emits what a STARTUP would. */
  noteExternalStartup(unitName: string, from: Address, reason: "snmp"): void {
    if (this.isEnrolled(unitName)) return; // an SNMP trap never speaks for an enrolled unit
    let record = this.records.get(unitName);
    if (record === undefined) {
      if (this.records.size >= this.unitsMax) return;
      record = this.newRecord(unitName, from);
      record.mode = "snmp";
    }
    if (record.sessionId === null) record.mode = "snmp";
    record.address = from;
    record.shutdownSessionId = null;
    this.emit({ kind: "unit_startup", unit: unitName, from, sessionId: record.sessionId ?? "", reason });
    this.touch(record, reason);
  }

  /** Emits storage info obtained outside the UDP protocol (the unit's control API). */
  ingestStorageInfo(unitName: string, info: StorageInfo, from: Address): void {
    if (this.isEnrolled(unitName)) return;
    const record = this.records.get(unitName);
    if (record !== undefined) this.touch(record, "control_api");
    this.emit({ kind: "unit_storage_info", unit: unitName, info: this.fillAddresses(info, from), generation: 0, from, source: "control_api" });
  }

  /** Marks a unit down for a reason outside the UDP protocol (SNMP linkDown). */
  markDown(unitName: string, reason: string): boolean {
    const record = this.records.get(unitName);
    if (record === undefined || this.isEnrolled(unitName)) return false;
    record.infoRequest?.stop();
    record.shutdownSessionId = record.sessionId;
    this.transition(record, "down", reason);
    return true;
  }

  // ---- Receiving ----

  /** Entry point for every datagram (public so tests and multiplexers can feed it). */
  handleDatagram(bytes: Buffer, from: Address): void {
    if (this.closed) return;
    this.datagramsReceived += 1;
    try {
      this.receive(bytes, from);
    } catch (error) {
      // A bug, not bad input: log it and keep serving everyone else.
      this.log.limited("discovery-bug", "discovery datagram handling failed", {
        from: `${from.host}:${from.port}`,
        error: errorMessage(error),
      });
    }
  }

  /** True if the name is enrolled: only datagrams signed with its own secret speak for it (SNMP traps do not). */
  isEnrolled(unitName: string): boolean {
    return this.identities?.get(unitName) !== undefined;
  }

  /**
   * Starts (or repeats) the rotation of a unit's secret: ENROL of the next
   * secret, sealed under the current one, now if the unit is known and again
   * at each datagram it signs with the old secret. False if not enrolled.
   */
  rotateSecret(unitName: string): UnitIdentity | undefined {
    const identity = this.identities?.rotate(unitName);
    if (identity === undefined) return undefined;
    const record = this.records.get(unitName);
    if (record !== undefined) this.sendRotation(identity, record.address);
    return identity;
  }

  private readonly selectKeys = (unitName: string, unitKey: boolean): readonly Buffer[] =>
    unitKey ? (this.identities?.keysFor(unitName) ?? []) : [this.packetKey];

  /** Datagrams to an enrolled unit are signed with its own secret. */
  private signingFor(unitName: string): { key?: { packetKey: Buffer; unitKey: boolean } } {
    const key = this.identities?.sendKey(unitName);
    return key === undefined ? {} : { key: { packetKey: key, unitKey: true } };
  }

  private receive(bytes: Buffer, from: Address): void {
    const decoded = decodeFrame(bytes, this.selectKeys);
    if (decoded.kind === "invalid") return this.reject(decoded.reason, from, decoded.detail);
    const frame = decoded.frame;
    if (frame.fromStation) return this.reject("wrong_direction", from, `${frame.typeName} from a station`);
    // Identities first: a refused datagram must touch no state (not even the replay window).
    if (this.identities !== undefined && this.screen(this.identities, frame, from)) return;
    const nowMs = this.clock.nowMs();
    let record = this.records.get(frame.unitName);
    if (record === undefined && this.records.size >= this.unitsMax) {
      return this.reject("too_many_units", from, `unit ${frame.unitName}: ${this.records.size} units known`);
    }
    const verdict = this.replay.check(frame.unitName, frame, nowMs);
    if (verdict.kind === "reject") return this.reject(verdict.reason, from, `unit ${frame.unitName} ${verdict.detail}`);
    this.accepted[frame.typeName] += 1;
    if (record === undefined) record = this.newRecord(frame.unitName, from);
    switch (frame.typeName) {
      case "STARTUP":
        return this.onStartup(record, frame, from);
      case "HEARTBEAT":
        return this.onHeartbeat(record, frame, from);
      case "STORAGE_INFO":
        return this.onStorageInfoFragment(record, frame, from, nowMs);
      case "SHUTDOWN":
        return this.onShutdown(record, frame, from);
      case "ACK":
      case "NEED_STORAGE_INFO":
      case "ENROL":
      case "REFUSE":
        // Units do not ACK (their STORAGE_INFO answers NEED_STORAGE_INFO); nothing to do.
        return;
    }
  }

  /**
   * The identity rules (issue 7). True when the datagram was handled here
   * (an enrolment) or refused; false to go on as an ordinary datagram.
   */
  private screen(identities: UnitIdentities, frame: Frame, from: Address): boolean {
    const name = frame.unitName;
    const identity = identities.get(name);
    if (frame.unitKey) {
      // decodeFrame verified it with this unit's secret (index 0) or the next one of a rotation (index 1).
      if (identity === undefined) {
        this.reject("unknown_unit", from, `unit ${name} is not enrolled`);
        return true;
      }
      if (frame.keyIndex === 1) {
        identities.promote(name);
        this.log.info("unit secret rotated", { unit: name, epoch: identity.epoch + 1 });
        this.emit({ kind: "unit_identity", unit: name, action: "rotated", from, unitId: identity.unitId, detail: `epoch ${identity.epoch + 1}` });
      } else if (!identity.confirmed) {
        identities.confirm(name);
        this.log.info("unit enrolled", { unit: name, unitId: identity.unitId });
        this.emit({ kind: "unit_identity", unit: name, action: "confirmed", from, unitId: identity.unitId, detail: "the unit signs with its own secret" });
      } else if (identity.next !== null) {
        this.sendRotation(identity, from);
      }
      return false;
    }
    const startup = frame.typeName === "STARTUP" ? decodeStartup(frame.payload) : undefined;
    if (startup?.kind === "invalid") {
      this.reject(startup.reason, from, `unit ${name} ${startup.detail}`);
      return true;
    }
    const claimedId = startup?.value.unitId;
    if (identity === undefined) {
      // Not enrolled: a STARTUP with an id enrols; anything else is a unit from before issue 7 (cluster key, as before).
      if (claimedId === undefined) return false;
      if (!this.records.has(name) && this.records.size + identities.size >= this.unitsMax) {
        this.reject("too_many_units", from, `unit ${name}: ${this.records.size} units known`);
        return true;
      }
      const issued = identities.enrol(name, claimedId);
      this.log.info("unit enrolling: secret issued", { unit: name, unitId: claimedId, from: `${from.host}:${from.port}` });
      this.emit({ kind: "unit_identity", unit: name, action: "enrolled", from, unitId: claimedId, detail: "secret issued, sealed under the cluster key" });
      identities.whenDurable(name, () => this.sendEnrol(issued, from)); // the secret is on disk before it leaves
      return true;
    }
    if (claimedId !== undefined && claimedId === identity.unitId && !identity.confirmed) {
      identities.whenDurable(name, () => this.sendEnrol(identity, from)); // our ENROL was lost: the same secret again
      return true;
    }
    if (claimedId !== undefined && claimedId !== identity.unitId) {
      const message =
        `unit name ${name} is enrolled with another identity (${identity.unitId}); this unit is ${claimedId}. ` +
        `Pick another --name, or if this unit replaces one whose data dir was lost, run: ipsan units forget ${name}`;
      this.reject("impostor", from, `unit ${name}: STARTUP with id ${claimedId}, enrolled with ${identity.unitId}`);
      this.noticeIdentity(name, from, "impostor", claimedId, message);
      this.refuse(name, from, REFUSE_CODE.IMPOSTOR, message);
      return true;
    }
    const message =
      `unit name ${name} is enrolled: its datagrams must be signed with its own secret (DATA/unit.secret), not the cluster key` +
      (claimedId === undefined ? " (this unit sent no identity: an ipsan older than issue 7?)" : "") +
      `. If its data dir was lost, run: ipsan units forget ${name}`;
    this.reject("unit_key_required", from, `unit ${name} is enrolled; ${frame.typeName} signed with the cluster key only`);
    // While the enrolment is pending, the enrolling unit's own cluster-key datagrams are expected: no event for those.
    if (identity.confirmed) this.noticeIdentity(name, from, "key_refused", claimedId ?? null, message);
    if (frame.typeName === "STARTUP") this.refuse(name, from, REFUSE_CODE.UNIT_KEY_REQUIRED, message);
    return true;
  }

  private noticeIdentity(name: string, from: Address, action: "impostor" | "key_refused", unitId: string | null, detail: string): void {
    const key = `${action}|${name}|${from.host}:${from.port}|${unitId ?? ""}`;
    const nowMs = this.clock.nowMs();
    const last = this.identityNoticeAtMs.get(key);
    if (last !== undefined && nowMs - last < IDENTITY_EVENT_HOLD_MS) return;
    if (this.identityNoticeAtMs.size > 10_000) this.identityNoticeAtMs.clear();
    this.identityNoticeAtMs.set(key, nowMs);
    this.log.warn(action === "impostor" ? "refused a unit claiming an enrolled name with another identity" : "refused a datagram signed with the cluster key for an enrolled unit", {
      unit: name,
      from: `${from.host}:${from.port}`,
      ...(unitId === null ? {} : { unitId }),
    });
    this.emit({ kind: "unit_identity", unit: name, action, from, unitId, detail });
  }

  /** REFUSE, signed with the cluster key (the refused sender holds nothing else), at most once per REFUSE_HOLD_MS per sender. */
  private refuse(name: string, to: Address, code: number, message: string): void {
    const key = `${name}|${to.host}:${to.port}`;
    const nowMs = this.clock.nowMs();
    const last = this.refuseAtMs.get(key);
    if (last !== undefined && nowMs - last < REFUSE_HOLD_MS) return;
    if (this.refuseAtMs.size > 10_000) this.refuseAtMs.clear();
    this.refuseAtMs.set(key, nowMs);
    this.send(to, this.session.frame({
      type: MESSAGE_TYPE.REFUSE,
      unitName: name,
      messageId: this.session.nextMessageId(),
      payload: encodeRefuse({ code, message }),
      key: { packetKey: this.packetKey, unitKey: false },
    }));
  }

  /** ENROL of a first secret: sealed under the cluster key's enrol key, signed with the cluster key. */
  private sendEnrol(identity: UnitIdentity, to: Address): void {
    const binding = { unitName: identity.name, unitId: identity.unitId, epoch: identity.epoch };
    const box = sealUnitSecret(this.enrolKey, binding, identity.secret);
    this.send(to, this.session.frame({
      type: MESSAGE_TYPE.ENROL,
      unitName: identity.name,
      messageId: this.session.nextMessageId(),
      payload: encodeEnrol({ epoch: identity.epoch, unitId: identity.unitId, ...box }),
      key: { packetKey: this.packetKey, unitKey: false },
    }));
  }

  /** ENROL of the next secret: sealed under the current secret's rotate key, signed with the current secret. */
  private sendRotation(identity: UnitIdentity, to: Address): void {
    if (identity.next === null) return;
    const nowMs = this.clock.nowMs();
    const last = this.rotationSentAtMs.get(identity.name);
    if (last !== undefined && nowMs - last < ROTATION_RESEND_MS) return;
    this.rotationSentAtMs.set(identity.name, nowMs);
    const epoch = identity.epoch + 1;
    const box = sealUnitSecret(rotateKeyFor(identity.secret), { unitName: identity.name, unitId: identity.unitId, epoch }, identity.next);
    this.send(to, this.session.frame({
      ...this.signingFor(identity.name),
      type: MESSAGE_TYPE.ENROL,
      unitName: identity.name,
      messageId: this.session.nextMessageId(),
      payload: encodeEnrol({ epoch, unitId: identity.unitId, ...box }),
    }));
  }

  /** A datagram from a session we have not seen: the unit (re)started, or we did. */
  private adoptSession(record: UnitRecord, frame: Frame, from: Address, reason: "startup" | "heartbeat" | "storage_info" | "shutdown"): boolean {
    if (record.sessionId === frame.sessionId) return false;
    if (record.sessionId !== null && record.state !== "down" && (record.address.host !== from.host || record.address.port !== from.port)) {
      // Normal after a restart; if it repeats, two processes are using one unit name.
      this.log.info("unit has a new session (restarted?)", {
        unit: record.name,
        was: `${record.address.host}:${record.address.port}`,
        now: `${from.host}:${from.port}`,
      });
    }
    record.sessionId = frame.sessionId;
    record.generation = 0;
    record.lastInfoMessageId = 0;
    record.shutdownSessionId = null;
    record.generationMismatches = 0;
    record.mode = "discovery";
    record.infoRequest?.stop();
    record.infoRequest = null;
    record.address = from;
    this.reassembler.forgetSender(record.name);
    this.emit({ kind: "unit_startup", unit: record.name, from, sessionId: frame.sessionId, reason });
    return true;
  }

  private onStartup(record: UnitRecord, frame: Frame, from: Address): void {
    const payload = decodeStartup(frame.payload);
    if (payload.kind === "invalid") return this.reject(payload.reason, from, `unit ${record.name} ${payload.detail}`);
    if (frame.sessionId === record.shutdownSessionId) return; // a late retransmission from before its SHUTDOWN
    this.adoptSession(record, frame, from, "startup");
    record.address = from;
    this.ack(record, frame);
    this.touch(record, "startup");
    // Ask for storage info unless this is a repeated STARTUP (our ACK was lost) and we are up to date.
    if (record.generation === 0 || record.generation !== payload.value.generation) this.requestStorageInfo(record.name);
  }

  private onHeartbeat(record: UnitRecord, frame: Frame, from: Address): void {
    const payload = decodeHeartbeat(frame.payload);
    if (payload.kind === "invalid") return this.reject(payload.reason, from, `unit ${record.name} ${payload.detail}`);
    if (frame.sessionId === record.shutdownSessionId) return; // late heartbeat of a unit that said goodbye
    const fresh = this.adoptSession(record, frame, from, "heartbeat");
    record.address = from;
    this.touch(record, "heartbeat");
    if (fresh || record.generation === 0) {
      // We do not know this unit's table (station restart, lost STARTUP): rebuild it from the unit.
      if (record.infoRequest?.active !== true) this.requestStorageInfo(record.name);
      return;
    }
    if (payload.value.generation === record.generation) {
      record.generationMismatches = 0;
      return;
    }
    // A changed table is normally pushed by the unit; ask only if two heartbeats in a row disagree.
    record.generationMismatches += 1;
    if (record.generationMismatches >= 2 && record.infoRequest?.active !== true) this.requestStorageInfo(record.name);
  }

  private onStorageInfoFragment(record: UnitRecord, frame: Frame, from: Address, nowMs: number): void {
    if (frame.sessionId === record.shutdownSessionId) return;
    this.adoptSession(record, frame, from, "storage_info");
    record.address = from;
    this.touch(record, "storage_info");
    if (frame.messageId <= record.lastInfoMessageId) {
      // A retransmission of what we applied (our ACK was lost): ACK again once per round.
      if (frame.fragmentIndex === frame.fragmentCount - 1) this.ack(record, frame);
      return;
    }
    const result = this.reassembler.add(record.name, frame, nowMs);
    this.countExpired();
    if (result.kind === "invalid") return this.reject(result.reason, from, `unit ${record.name} ${result.detail}`);
    if (result.kind !== "complete") return;
    const decoded = decodeStorageInfo(result.payload);
    if (decoded.kind === "invalid") return this.reject(decoded.reason, from, `unit ${record.name} ${decoded.detail}`);
    const { generation, info } = decoded.value;
    if (info.name !== record.name) {
      return this.reject("bad_payload", from, `storage info names unit ${info.name} in a datagram of unit ${record.name}`);
    }
    record.lastInfoMessageId = frame.messageId;
    record.generation = generation;
    record.generationMismatches = 0;
    record.infoRequest?.stop();
    record.infoRequest = null;
    this.ack(record, frame);
    this.emit({ kind: "unit_storage_info", unit: record.name, info: this.fillAddresses(info, from), generation, from, source: "discovery" });
  }

  private onShutdown(record: UnitRecord, frame: Frame, from: Address): void {
    const payload = decodeShutdown(frame.payload);
    if (payload.kind === "invalid") return this.reject(payload.reason, from, `unit ${record.name} ${payload.detail}`);
    this.adoptSession(record, frame, from, "shutdown");
    record.address = from;
    this.ack(record, frame);
    record.infoRequest?.stop();
    record.infoRequest = null;
    record.shutdownSessionId = frame.sessionId;
    record.lastSeenMs = this.clock.nowMs();
    this.reassembler.forgetSender(record.name);
    if (record.state !== "down") this.transition(record, "down", payload.value.reason === 1 ? "restart" : "shutdown");
  }

  // ---- Helpers ----

  private newRecord(name: string, from: Address): UnitRecord {
    const record: UnitRecord = {
      name,
      sessionId: null,
      address: from,
      state: "offline",
      lastSeenMs: this.clock.nowMs(),
      generation: 0,
      lastInfoMessageId: 0,
      shutdownSessionId: null,
      infoRequest: null,
      generationMismatches: 0,
      mode: "discovery",
    };
    // "offline" is a placeholder until touch() or transition() emits the first real state.
    this.records.set(name, record);
    this.firstState.add(name);
    return record;
  }

  private touch(record: UnitRecord, reason: string): void {
    record.lastSeenMs = this.clock.nowMs();
    if (record.state !== "online" || this.firstState.has(record.name)) this.transition(record, "online", reason);
  }

  private transition(record: UnitRecord, to: UnitState, reason: string): void {
    const first = this.firstState.delete(record.name);
    const previous = first ? null : record.state;
    if (previous !== null) {
      if (previous === to) return;
      assert(TRANSITIONS[previous].includes(to), `unit ${record.name}: ${previous} -> ${to}`);
    }
    record.state = to;
    this.log.info("unit state", { unit: record.name, state: to, previous: previous ?? "none", reason });
    this.emit({ kind: "unit_state", unit: record.name, state: to, previous, reason });
  }

  private ack(record: UnitRecord, frame: Frame): void {
    this.send(
      record.address,
      this.session.frame({
        ...this.signingFor(record.name),
        type: MESSAGE_TYPE.ACK,
        unitName: record.name,
        messageId: this.session.nextMessageId(),
        payload: encodeAck({
          ackedMessageId: frame.messageId,
          ackedType: frame.type,
          status: ACK_STATUS.OK,
          heartbeatIntervalMs: this.timers.heartbeatIntervalMs,
        }),
      }),
    );
  }

  private send(to: Address, bytes: Buffer): void {
    if (this.socket === null) return;
    if (this.session.exhausted) this.session.renew();
    this.datagramsSent += 1;
    this.socket.send(bytes, to);
  }

  private reject(reason: RejectReason, from: Address, detail: string): void {
    this.rejected[reason] += 1;
    this.log.limited(`reject:${reason}`, "discovery datagram rejected", { reason, from: `${from.host}:${from.port}`, detail });
    this.emit({ kind: "packet_rejected", reason, from, detail });
  }

  private countExpired(): void {
    const expired = this.reassembler.expiredCount;
    if (expired > 0) {
      this.rejected.reassembly_timeout += expired;
      this.reassembler.expiredCount = 0;
    }
  }

  /** A unit bound to 0.0.0.0 reports that as its NBD host: hosts must use the address it spoke from. */
  private fillAddresses(info: StorageInfo, from: Address): StorageInfo {
    const nbd = UNSPECIFIED_HOSTS.has(info.nbd.host) ? { host: from.host, port: info.nbd.port } : info.nbd;
    const control =
      info.control !== null && UNSPECIFIED_HOSTS.has(info.control.host) ? { host: from.host, port: info.control.port } : info.control;
    return nbd === info.nbd && control === info.control ? info : { ...info, nbd, control };
  }

  private emit(event: DiscoveryEvent): void {
    for (const handler of this.handlers) {
      try {
        handler(event);
      } catch (error) {
        this.log.limited("discovery-handler", "discovery event handler failed", { kind: event.kind, error: errorMessage(error) });
      }
    }
  }

  private view(record: UnitRecord): UnitView {
    return {
      name: record.name,
      state: record.state,
      address: record.address,
      sessionId: record.sessionId,
      lastSeenMs: record.lastSeenMs,
      generation: record.generation,
      mode: record.mode,
    };
  }

  // ---- Liveness ----

  private scheduleSweep(): void {
    const periodMs = Math.max(10, Math.min(500, Math.floor(this.timers.heartbeatIntervalMs / 2)));
    this.sweepTimer = this.clock.setTimeout(() => {
      if (this.closed) return;
      this.sweep();
      this.scheduleSweep();
    }, periodMs);
  }

  /** Moves silent units to suspect, then offline (SNMP-only units have no heartbeats and are left alone). */
  sweep(): void {
    const nowMs = this.clock.nowMs();
    for (const record of this.records.values()) {
      if (record.mode !== "discovery" || record.state === "down" || record.state === "offline") continue;
      const silentMs = nowMs - record.lastSeenMs;
      if (record.state === "online" && silentMs > this.timers.suspectAfterMs) {
        this.transition(record, "suspect", `silent ${silentMs} ms`);
      }
      if (record.state === "suspect" && silentMs > this.timers.offlineAfterMs) {
        this.transition(record, "offline", `silent ${silentMs} ms`);
        record.infoRequest?.stop();
        record.infoRequest = null;
      }
    }
    this.reassembler.expire(nowMs);
    this.countExpired();
  }
}
