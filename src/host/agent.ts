// `ipsan host agent`: keeps a host registered with the station (heartbeats,
// so the station shows it online) and keeps the host's recorded attachments
// attached: after a restart of the host, or when an nbdfuse process or a
// mirror's engine dies, it re-attaches (restarts the engine) from the state dir. It needs the station only to register and
// heartbeat: re-attaching works from the records alone, so a host comes back
// to its volumes even while the station is down (the out-of-band design).
// When the station is reachable, a recorded attachment whose assignment the
// station no longer has (released by an admin) is detached instead.
// For a mirror, the agent also brings the engine's legs to the station's (a
// leg the station replaced: the legs file is rewritten and the engine gets
// SIGHUP, or is started with it) and reports the legs' states and rebuild
// progress from the engine's status file (PUT /api/v1/assignments/ID/legs):
// at once when a state changes, progress at most every
// LEG_PROGRESS_REPORT_MS, and every LEG_REPORT_INTERVAL_MS otherwise.

import { IpsanError, errorMessage } from "../util/errors.ts";
import { takeOverMoved, type TakeoverMode } from "./takeover.ts";
import { logger } from "../util/log.ts";
import { attachmentAlive, detach, reattach, syncMirrorLegs } from "./attach.ts";
import { readStatusFile } from "./legs.ts";
import type { AttachmentRecord, HostState } from "./state.ts";
import { type Assignment, type LegReport, sourceAddressToward, type StationClient } from "./station_client.ts";
import { localizeAssignments } from "./keys.ts";

const log = logger("host-agent");

export const HEARTBEAT_INTERVAL_MS_DEFAULT = 5_000;
export const HEARTBEAT_INTERVAL_MS_MIN = 100;
export const HEARTBEAT_INTERVAL_MS_MAX = 600_000;
/** Attachments are checked every this many heartbeats (and at start). */
export const ATTACHMENT_CHECK_EVERY_BEATS = 2;
/** A mirror's leg report is sent at least this often (and at once when a leg's state changes). */
export const LEG_REPORT_INTERVAL_MS = 60_000;
/** Rebuild progress alone is reported at most this often. */
export const LEG_PROGRESS_REPORT_MS = 5_000;
/** Rebuild progress is logged at most this often per mirror. */
export const LEG_PROGRESS_LOG_MS = 30_000;

interface LegReportState {
  stateKey: string;
  progressKey: string;
  sentMs: number;
  progressLoggedMs: number;
  readonly states: Map<string, string>;
}

export interface AgentOptions {
  readonly client: StationClient;
  readonly state: HostState;
  readonly host: string;
  readonly address: string | undefined;
  readonly heartbeatIntervalMs: number;
  readonly reattach: boolean;
  /** Registers the host as a spare (failover target: takeover.ts). */
  readonly spare?: boolean;
  /** The host's iSCSI initiator name (--iqn): recorded at the station with every registration (protocol iscsi needs it). */
  readonly iqn?: string;
  /** How an assignment moved to this host is attached (default nbd). */
  readonly takeoverMode?: TakeoverMode;
}

export class HostAgent {
  readonly #options: AgentOptions;
  #registered = false;
  #beats = 0;
  #stopping = false;
  #timer: NodeJS.Timeout | undefined;
  #tick: Promise<void> = Promise.resolve();
  #wake: (() => void) | undefined;
  readonly #legReports = new Map<string, LegReportState>();
  #stationTakesNoLegReports = false;

  constructor(options: AgentOptions) {
    this.#options = options;
  }

  /** Runs until stop() is called. */
  async run(): Promise<void> {
    await this.#check();
    log.info("agent running", {
      host: this.#options.host,
      station: this.#options.client.baseUrl.origin,
      heartbeatMs: this.#options.heartbeatIntervalMs,
    });
    while (!this.#stopping) {
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        this.#timer = setTimeout(resolve, this.#options.heartbeatIntervalMs);
      });
      if (this.#stopping) break;
      this.#tick = this.#beat();
      await this.#tick;
    }
  }

  async stop(): Promise<void> {
    this.#stopping = true;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#wake?.();
    await this.#tick;
  }

  async #check(): Promise<void> {
    await this.#register();
    if (this.#options.reattach) await this.#checkAttachments();
  }

  /**
   * One look at the station's assignments for this host (undefined while it is
   * away: the records are trusted, out-of-band) serves both the takeover of
   * what a host failover moved here (takeover.ts) and the re-attach pass.
   */
  async #checkAttachments(): Promise<void> {
    const { client, state, host } = this.#options;
    let assignments: Assignment[] | undefined;
    try {
      // Units that speak TLS: the key files are (re)written and the URIs carry them (keys.ts).
      assignments = await localizeAssignments(state, client, host, await client.assignments(host));
    } catch {
      assignments = undefined;
    }
    await takeOverMoved({ client, state, host, mode: this.#options.takeoverMode ?? "nbd", assignments, stopping: () => this.#stopping });
    await this.#reattachAll(assignments);
  }

  async #register(): Promise<void> {
    const { client, host } = this.#options;
    try {
      let address = this.#options.address;
      if (address === undefined && this.#options.spare !== true) {
        // Without --address, a host the station knows keeps the address it has (a heartbeat
        // is enough); an unknown one is registered with the address our connections come from.
        try {
          await client.heartbeat(host, this.#options.iqn);
          if (!this.#registered) log.info("registered (known host, address kept)", { host });
          this.#registered = true;
          return;
        } catch (error) {
          if (!(error instanceof IpsanError && error.code === "NOT_FOUND")) throw error;
        }
      }
      // A spare says so at every registration (the flag is recorded by the station).
      address ??= await sourceAddressToward(client.stations);
      await client.registerHost(host, address, this.#options.spare === true ? true : undefined, this.#options.iqn);
      if (!this.#registered) log.info(this.#options.spare === true ? "registered as a spare host" : "registered", { host, address });
      this.#registered = true;
    } catch (error) {
      this.#registered = false;
      log.limited("register", "cannot register with the station (will retry)", { error: errorMessage(error) });
    }
  }

  async #beat(): Promise<void> {
    this.#beats += 1;
    if (!this.#registered) await this.#register();
    else {
      try {
        await this.#options.client.heartbeat(this.#options.host);
      } catch (error) {
        // 404: the station forgot us (new database): register again on the next beat.
        if (error instanceof IpsanError && error.code === "NOT_FOUND") this.#registered = false;
        log.limited("heartbeat", "heartbeat failed (will retry)", { error: errorMessage(error) });
      }
    }
    if (this.#options.reattach && this.#beats % ATTACHMENT_CHECK_EVERY_BEATS === 0) await this.#checkAttachments();
  }

  async #reattachAll(assignments: readonly Assignment[] | undefined): Promise<void> {
    let records;
    try {
      records = (await this.#options.state.list()).filter((r) => r.host === this.#options.host && r.state === "attached");
    } catch (error) {
      log.limited("state", "cannot read the state dir", { dir: this.#options.state.dir, error: errorMessage(error) });
      return;
    }
    if (records.length === 0) return;
    // undefined: the station is unreachable, so the records are trusted (out-of-band).
    const live =
      assignments === undefined
        ? undefined
        : new Map(
            assignments
              .filter((a) => a.host === this.#options.host && (a.state === undefined || a.state === "active" || a.state === "pending"))
              .map((a) => [String(a.id), a]),
          );
    for (const recorded of records) {
      if (this.#stopping) return;
      let record = recorded;
      try {
        const assignment = live?.get(record.assignmentId);
        if (live !== undefined && assignment === undefined) {
          log.warn("assignment no longer active at the station: detaching", { assignment: record.assignmentId });
          await detach(this.#options.state, record);
          this.#legReports.delete(record.assignmentId);
          continue;
        }
        // The station's legs first: an engine that is restarted below starts with them.
        if (assignment !== undefined) record = (await syncMirrorLegs(this.#options.state, record, assignment)).record;
        if (!(await attachmentAlive(record))) record = await reattach(this.#options.state, record);
        if (live !== undefined) await this.#reportLegs(record);
      } catch (error) {
        log.limited(`reattach:${record.assignmentId}`, "cannot re-attach (will retry)", {
          assignment: record.assignmentId,
          uri: record.uri,
          error: errorMessage(error),
        });
      }
    }
  }

  /**
   * Reports a mirror's legs from its engine's status file (legs the engine
   * knows by unit and volume); logs each leg's state changes and, at most
   * every LEG_PROGRESS_LOG_MS, rebuild progress.
   */
  async #reportLegs(record: AttachmentRecord): Promise<void> {
    const file = record.engine?.statusFile;
    if (file === undefined) return;
    let status;
    try {
      status = await readStatusFile(file);
    } catch (error) {
      log.limited(`status:${record.assignmentId}`, "cannot read the mirror engine's status file", { assignment: record.assignmentId, error: errorMessage(error) });
      return;
    }
    if (status === undefined) return;
    const legs: LegReport["legs"] = status.legs.flatMap((l) => (l.unit === undefined || l.volume === undefined ? [] : [{ unit: l.unit, volume: l.volume, state: l.state, rebuild: l.rebuild, error: l.error }]));
    if (legs.length === 0) return;
    const now = Date.now();
    const id = record.assignmentId;
    const previous = this.#legReports.get(id);
    const entry: LegReportState = previous ?? { stateKey: "", progressKey: "", sentMs: -Infinity, progressLoggedMs: -Infinity, states: new Map() };
    this.#legReports.set(id, entry);
    for (const leg of legs) {
      const was = entry.states.get(leg.volume);
      if (was !== leg.state) log.info("mirror leg state", { assignment: id, unit: leg.unit, volume: leg.volume, state: leg.state, was: was ?? "-", ...(leg.error === null || leg.error === undefined ? {} : { error: leg.error }) });
      entry.states.set(leg.volume, leg.state);
    }
    const rebuilding = legs.filter((l) => l.rebuild !== null && l.rebuild !== undefined);
    if (rebuilding.length > 0 && now - entry.progressLoggedMs >= LEG_PROGRESS_LOG_MS) {
      entry.progressLoggedMs = now;
      for (const leg of rebuilding) {
        const r = leg.rebuild;
        if (r === null || r === undefined) continue;
        log.info("mirror leg rebuild progress", { assignment: id, volume: leg.volume, kind: r.kind, copiedBytes: r.copiedBytes, totalBytes: r.totalBytes, etaSeconds: r.etaSeconds ?? "?" });
      }
    }
    const stateKey = JSON.stringify([status.generation, legs.map((l) => [l.unit, l.volume, l.state, l.error])]);
    const progressKey = JSON.stringify(legs.map((l) => l.rebuild));
    const due = entry.stateKey !== stateKey || (entry.progressKey !== progressKey && now - entry.sentMs >= LEG_PROGRESS_REPORT_MS) || now - entry.sentMs >= LEG_REPORT_INTERVAL_MS;
    if (!due) return;
    try {
      const answer = await this.#options.client.reportLegs(id, { generation: status.generation, legs });
      if (answer.ignored) log.info("leg report ignored by the station (it holds a newer one)", { assignment: id, reason: answer.reason ?? "" });
    } catch (error) {
      if (!(error instanceof IpsanError && error.code === "NOT_FOUND")) {
        log.limited(`report:${id}`, "cannot report the mirror's legs to the station (will retry)", { assignment: id, error: errorMessage(error) });
        return;
      }
      // The assignment is live at the station, so a 404 here is a station without this endpoint: said once, then reported at the slow pace.
      if (!this.#stationTakesNoLegReports) log.warn("the station does not take leg reports (404 on PUT /api/v1/assignments/ID/legs: a station older than leg replacement?); going on without", { assignment: id });
      this.#stationTakesNoLegReports = true;
    }
    entry.stateKey = stateKey;
    entry.progressKey = progressKey;
    entry.sentMs = now;
  }
}
