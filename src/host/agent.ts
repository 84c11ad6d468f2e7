// `ipsan host agent`: keeps a host registered with the station (heartbeats,
// so the station shows it online) and keeps the host's recorded attachments
// attached: after a restart of the host, or when an nbdfuse process or a
// mirror's engine dies, it re-attaches (restarts the engine) from the state dir. It needs the station only to register and
// heartbeat: re-attaching works from the records alone, so a host comes back
// to its volumes even while the station is down (the out-of-band design).
// When the station is reachable, a recorded attachment whose assignment the
// station no longer has (released by an admin) is detached instead.

import { IpsanError, errorMessage } from "../util/errors.ts";
import { takeOverMoved, type TakeoverMode } from "./takeover.ts";
import { logger } from "../util/log.ts";
import { attachmentAlive, detach, reattach } from "./attach.ts";
import type { HostState } from "./state.ts";
import { sourceAddressToward, type StationClient } from "./station_client.ts";

const log = logger("host-agent");

export const HEARTBEAT_INTERVAL_MS_DEFAULT = 5_000;
export const HEARTBEAT_INTERVAL_MS_MIN = 100;
export const HEARTBEAT_INTERVAL_MS_MAX = 600_000;
/** Attachments are checked every this many heartbeats (and at start). */
export const ATTACHMENT_CHECK_EVERY_BEATS = 2;

export interface AgentOptions {
  readonly client: StationClient;
  readonly state: HostState;
  readonly host: string;
  readonly address: string | undefined;
  readonly heartbeatIntervalMs: number;
  readonly reattach: boolean;
  /** Registers the host as a spare (failover target: takeover.ts). */
  readonly spare?: boolean;
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
    if (this.#options.reattach) {
      await this.#takeOver();
      await this.#reattachAll();
    }
  }

  /** Attaches what a host failover moved to this host (takeover.ts). */
  #takeOver(): Promise<void> {
    const { client, state, host } = this.#options;
    return takeOverMoved({ client, state, host, mode: this.#options.takeoverMode ?? "nbd", stopping: () => this.#stopping });
  }

  async #register(): Promise<void> {
    const { client, host } = this.#options;
    try {
      let address = this.#options.address;
      if (address === undefined && this.#options.spare !== true) {
        // Without --address, a host the station knows keeps the address it has (a heartbeat
        // is enough); an unknown one is registered with the address our connections come from.
        try {
          await client.heartbeat(host);
          if (!this.#registered) log.info("registered (known host, address kept)", { host });
          this.#registered = true;
          return;
        } catch (error) {
          if (!(error instanceof IpsanError && error.code === "NOT_FOUND")) throw error;
        }
      }
      // A spare says so at every registration (the flag is recorded by the station).
      address ??= await sourceAddressToward(client.baseUrl);
      await client.registerHost(host, address, this.#options.spare === true ? true : undefined);
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
    if (this.#options.reattach && this.#beats % ATTACHMENT_CHECK_EVERY_BEATS === 0) {
      await this.#takeOver();
      await this.#reattachAll();
    }
  }

  async #reattachAll(): Promise<void> {
    let records;
    try {
      records = (await this.#options.state.list()).filter((r) => r.host === this.#options.host && r.state === "attached");
    } catch (error) {
      log.limited("state", "cannot read the state dir", { dir: this.#options.state.dir, error: errorMessage(error) });
      return;
    }
    if (records.length === 0) return;
    let live: Set<string> | undefined;
    try {
      live = new Set(
        (await this.#options.client.assignments())
          .filter((a) => a.host === this.#options.host && (a.state === undefined || a.state === "active" || a.state === "pending"))
          .map((a) => String(a.id)),
      );
    } catch {
      live = undefined; // station unreachable: trust the records (out-of-band)
    }
    for (const record of records) {
      if (this.#stopping) return;
      try {
        if (live !== undefined && !live.has(record.assignmentId)) {
          log.warn("assignment no longer active at the station: detaching", { assignment: record.assignmentId });
          await detach(this.#options.state, record);
          continue;
        }
        if (await attachmentAlive(record)) continue;
        await reattach(this.#options.state, record);
      } catch (error) {
        log.limited(`reattach:${record.assignmentId}`, "cannot re-attach (will retry)", {
          assignment: record.assignmentId,
          uri: record.uri,
          error: errorMessage(error),
        });
      }
    }
  }
}
