// The host side's client of the station's REST API (/api/v1, docs/api.md).
// Every call carries a bearer token (the admin token, a named token or the
// host's own credential), has a timeout, and reads at most
// RESPONSE_BYTES_MAX of the answer, so a confused or hostile station cannot
// hang or exhaust a host. Station errors ({error:{code,message,field,reasons}})
// become IpsanError with the station's code and a message that names the
// call, the field and, for NO_SPACE, the reasons unit by unit.
// It speaks node:http, or node:https for an https:// station, trusting the
// CA in --ca-file ($IPSAN_CA_FILE) when given, else the system's CAs (Node
// 20's fetch takes no CA of its own).
//
// Several stations (issue 11: `--station URL,URL`, at most STATIONS_MAX): a
// call tries them in order, starting with the one that answered last. It
// moves on after a connection failure or a 503 (no leader, not ready); any
// other answer is final. A call that could change something twice moves on
// only when it surely did not reach the station (refused, no route, name not
// found), unless it is idempotent (GET, HEAD, PUT, DELETE) or carries a
// requestId the station deduplicates; then a reset or a timeout before any
// answer moves on too. Between full passes it pauses as the project's one
// backoff says (src/util/retry.ts, STATION_PASS_BACKOFF); the whole call ends
// within its timeout, and its error names every station and why it failed.

import { readFile } from "node:fs/promises";
import { Agent as HttpAgent } from "node:http";
import { Agent as HttpsAgent } from "node:https";
import { HttpExchangeError, httpExchange, type HttpAnswer } from "../util/http_client.ts";
import { retry, type BackoffPolicy } from "../util/retry.ts";
import { setting } from "../util/config.ts";
import type { Static } from "@sinclair/typebox";
import type {
  Assignment as AssignmentSchema,
  Host as HostSchema,
  Task as TaskSchema,
  Unit as UnitSchema,
  Volume as VolumeSchema,
} from "../station/api/schemas.ts";
import { connect } from "node:net";
import { ERROR_CODES, IpsanError, UsageError, errorMessage, type ErrorCode } from "../util/errors.ts";

export const STATION_REQUEST_TIMEOUT_MS = 10_000;
export const RESPONSE_BYTES_MAX = 8 * 1024 * 1024;
export const TOKEN_FILE_BYTES_MAX = 4096;
/** A task the station answered 202 for is polled at this interval, doubling up to the max. */
export const TASK_POLL_INTERVAL_MS = 250;
export const TASK_POLL_INTERVAL_MS_MAX = 2_000;
/** How long a call follows its task before it gives up (the task goes on at the station). */
export const TASK_FOLLOW_MS_DEFAULT = 30 * 60_000;
/** At most this many URLs in --station URL,URL,... (several stations sharing one state). */
export const STATIONS_MAX = 16;
/** The pause between two passes over the station list (src/util/retry.ts); the call's timeout bounds them all. */
export const STATION_PASS_BACKOFF: BackoffPolicy = { initialMs: 250, maxMs: 2_000, attemptsMax: 8, jitterRatio: 0.2 };
/** An attempt that may move on after a timeout gets the call's remaining time shared among the stations left, but at least this. */
export const STATION_ATTEMPT_TIMEOUT_MS_MIN = 1_000;
/** Socket errors that mean the request never reached the station: any call may go to the next one. */
const NOT_CONNECTED_ERRNOS = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "EAI_NONAME", "EHOSTUNREACH", "ENETUNREACH", "EADDRNOTAVAIL"]);
/** Methods that do the same thing when repeated: a reset or a timeout may move on to the next station. */
const IDEMPOTENT_METHODS = new Set(["GET", "HEAD", "OPTIONS", "PUT", "DELETE"]);

/** A station task (docs/api.md "Tasks"). */

/** One leg of a mirrored assignment (docs/api.md "A mirrored assignment"). */
export interface AssignmentLeg {
  readonly unit: string;
  readonly volume: string;
  /** The mirror's size plus the engine's 1 MiB of metadata. */
  readonly sizeBytes: number;
  /** The leg's own nbd:// URI: for the host's mirror engine only, never for applications. */
  readonly uri: string | null;
  /** "pending" | "in-sync" | "stale" | "rebuilding" | "failed" (docs/api.md). */
  readonly state: string;
  readonly index?: number;
  readonly rebuild?: LegRebuild | null;
  readonly error?: string | null;
}

/** A leg's rebuild in progress (docs/api.md). */
export interface LegRebuild {
  readonly kind: "delta" | "full";
  readonly copiedBytes: number;
  readonly totalBytes: number;
  readonly etaSeconds: number | null;
}

/** What a host's agent reports of a mirror's legs (PUT /api/v1/assignments/ID/legs). */
export interface LegReport {
  /** The engine's metadata generation: the station ignores a report older than one it accepted. */
  readonly generation: number;
  readonly legs: readonly {
    readonly unit: string;
    readonly volume: string;
    readonly state: "in-sync" | "stale" | "rebuilding" | "failed";
    readonly rebuild?: LegRebuild | null;
    readonly error?: string | null;
  }[];
}

// The station's objects, typed from the very schemas its API validates and documents with
// (src/station/api/schemas.ts; type-only imports: no schema code loads on the host).
/** A task (docs/api.md "Tasks"). */
export type StationTask = Static<typeof TaskSchema>;
/** A unit as GET /api/v1/units lists it. */
export type UnitInfo = Static<typeof UnitSchema>;
/** A host as GET /api/v1/hosts lists it. */
export type HostInfo = Static<typeof HostSchema>;
/** A volume as GET /api/v1/volumes lists it. */
export type VolumeInfo = Static<typeof VolumeSchema>;

/** The station's answer to an allocation or a manual assignment (contracts.md). */
export interface Assignment {
  readonly id: string;
  readonly requestId?: string | null;
  readonly host: string;
  readonly hostAddress?: string | null;
  readonly unit: string;
  readonly unitDnsName?: string | null;
  readonly unitAddress?: string | null;
  readonly nbdHost: string;
  readonly nbdPort: number;
  readonly export: string;
  readonly volume: string;
  readonly volumeNumber?: number | null;
  readonly partition?: number | null;
  readonly sizeBytes: number;
  readonly startLba?: number;
  readonly lengthLba?: number;
  readonly endLba?: number;
  /** Where clients read and write the volume (a single copy; see StationAssignment for a mirror's null). */
  readonly uri: string;
  readonly state?: string;
  readonly createdAt?: string;
  /** 1 (absent from older stations) or the number of legs of a mirror. */
  readonly copies?: number;
  /** A mirror's legs; empty (or absent) for a single copy. */
  readonly legs?: readonly AssignmentLeg[];
  /** Host failover: the host it was moved from (null: never moved); movedAt null while that host is being fenced. */
  readonly movedFrom?: string | null;
  readonly movedAt?: string | null;
  /** "nbd" (absent from older stations) or "iscsi": then `uri` is iscsi://PORTAL/TARGET/0 and `iscsi` says where to log in. */
  readonly protocol?: "nbd" | "iscsi";
  readonly iscsi?: AssignmentIscsi | null;
}

/** Where an iSCSI assignment logs in (the station's Assignment schema, `iscsi`). */
export type AssignmentIscsi = NonNullable<Static<typeof AssignmentSchema>["iscsi"]>;

/**
 * An assignment as the station may answer it: a single copy (`uri` set), or
 * a mirror, whose `uri` is null (the host's engine serves it from `legs`).
 */
export type StationAssignment = Omit<Assignment, "uri"> & { readonly uri: string | null };

/** True for a mirrored assignment: the host serves it through its mirror engine. */
export function isMirror(assignment: Pick<Assignment, "legs">): boolean {
  return (assignment.legs?.length ?? 0) > 0;
}




export interface AllocationRequest {
  readonly requestId: string;
  readonly host: string;
  readonly sizeBytes: number;
  readonly address?: string;
  readonly dryRun?: boolean;
  /** 2 or 3: a mirror, one leg per distinct unit (default 1). */
  readonly copies?: number;
  /** "iscsi": served by the unit's iSCSI target to this host's registered IQN (default nbd). */
  readonly protocol?: "nbd" | "iscsi";
}

/** Error answered by the station, with what it said. */
export class StationError extends IpsanError {
  readonly status: number;
  readonly reasons: readonly unknown[];
  constructor(code: ErrorCode, message: string, status: number, field: string | undefined, reasons: readonly unknown[]) {
    super(code, message, field === undefined ? {} : { field });
    this.name = "StationError";
    this.status = status;
    this.reasons = reasons;
  }
}

export function parseStationUrl(text: string, field = "--station"): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new UsageError(`${field}: invalid URL "${text}" (expected http://HOST:PORT)`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new UsageError(`${field}: unsupported scheme in "${text}" (expected http:// or https://)`);
  }
  return url;
}

/**
 * --station URL[,URL...] (also $IPSAN_STATION and "station = ..."): every
 * station's API URL, at most STATIONS_MAX, each checked as one is, none twice.
 */
export function parseStationUrls(text: string, field = "--station"): URL[] {
  const parts = text.split(",").map((part) => part.trim());
  if (parts.length > STATIONS_MAX) throw new UsageError(`${field}: ${parts.length} URLs, more than ${STATIONS_MAX} (give each station once)`);
  const urls: URL[] = [];
  for (const part of parts) {
    if (part === "") throw new UsageError(`${field}: empty URL in "${text}" (expected http://HOST:PORT[,http://HOST:PORT...])`);
    const url = parseStationUrl(part, field);
    if (urls.some((u) => u.href === url.href)) throw new UsageError(`${field}: "${part}" is given twice`);
    urls.push(url);
  }
  return urls;
}

/** The text form of a station list (what parseStationUrls reads back): hrefs joined by commas. */
export function formatStationUrls(urls: readonly URL[]): string {
  return urls.map((url) => url.href).join(",");
}

/** Most bytes of a --ca-file (PEM). */
export const CA_FILE_BYTES_MAX = 1024 * 1024;

/** The CA certificate(s) to trust for an https:// station: --ca-file, else $IPSAN_CA_FILE, else none (the system's CAs). */
export async function readCaFile(path: string | undefined, env: NodeJS.ProcessEnv = process.env): Promise<Buffer | undefined> {
  const file = setting("ca-file", path, env);
  if (file === undefined || file === "") return undefined;
  const field = path !== undefined ? "--ca-file" : env["IPSAN_CA_FILE"] !== undefined && env["IPSAN_CA_FILE"] !== "" ? "$IPSAN_CA_FILE" : "ca-file (config)";
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (error) {
    throw new UsageError(`${field}: cannot read "${file}": ${errorMessage(error)}`);
  }
  if (bytes.length > CA_FILE_BYTES_MAX || !bytes.includes("-----BEGIN CERTIFICATE-----")) throw new UsageError(`${field}: "${file}" is not a PEM certificate file`);
  return bytes;
}

export async function readTokenFile(path: string, field = "--token-file"): Promise<string> {
  let text: string;
  try {
    const bytes = await readFile(path);
    if (bytes.length > TOKEN_FILE_BYTES_MAX) {
      throw new UsageError(`${field}: "${path}" is ${bytes.length} bytes, more than ${TOKEN_FILE_BYTES_MAX}`);
    }
    text = bytes.toString("utf8").trim();
  } catch (error) {
    if (error instanceof UsageError) throw error;
    throw new UsageError(`${field}: cannot read "${path}": ${errorMessage(error)}`);
  }
  if (text === "" || /\s/.test(text)) throw new UsageError(`${field}: "${path}" does not hold one token`);
  return text;
}

function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === "string" && Object.hasOwn(ERROR_CODES, value);
}

function codeForStatus(status: number): ErrorCode {
  if (status === 401) return "UNAUTHENTICATED";
  if (status === 403) return "PERMISSION_DENIED";
  if (status === 404) return "NOT_FOUND";
  if (status === 409) return "CONFLICT";
  if (status === 413) return "TOO_LARGE";
  if (status === 507) return "NO_SPACE";
  if (status === 503) return "UNAVAILABLE";
  if (status >= 400 && status < 500) return "INVALID_ARGUMENT";
  return "IO_ERROR";
}

function describeReasons(reasons: readonly unknown[]): string {
  return reasons
    .map((reason) => {
      if (reason !== null && typeof reason === "object") {
        const { unit, reason: why } = reason as { unit?: unknown; reason?: unknown };
        if (unit !== undefined) return `${String(unit)}: ${String(why)}`;
      }
      return JSON.stringify(reason);
    })
    .join("; ");
}

/** Lists come back as a JSON array or as {items:[...]} (issue 3's contract allows both). */
export function listItems<T>(body: unknown, what: string): T[] {
  if (Array.isArray(body)) return body as T[];
  if (body !== null && typeof body === "object" && Array.isArray((body as { items?: unknown }).items)) {
    return (body as { items: T[] }).items;
  }
  throw new IpsanError("IO_ERROR", `station answered a malformed ${what} list`);
}

/** One of a host's NBD keys: TLS-PSK identity and key (64 hex digits) for one unit. */
export interface HostKey {
  readonly unit: string;
  readonly identity: string;
  readonly key: string;
}

export interface StationClientOptions {
  /** The station's API URL, or every station's (parseStationUrls): tried in order, starting with the last that answered. */
  readonly baseUrl: URL | readonly URL[];
  readonly token: string;
  readonly timeoutMs?: number;
  /** CA certificate(s) (PEM) to trust for an https:// station instead of the system's. */
  readonly ca?: Buffer;
  /** How long a call follows a task the station answered 202 for (TASK_FOLLOW_MS_DEFAULT). */
  readonly taskFollowMs?: number;
  /** Told of each poll of a task a call follows (the CLI shows progress on a TTY). */
  readonly onTask?: (task: StationTask) => void;
}

/** A pass over the station list in which every station failed in a way that lets the call go on. */
class PassFailed extends Error {}

export class StationClient {
  readonly #stations: readonly URL[];
  /** Index of the station that answered last: the next call starts there. */
  #current = 0;
  readonly #token: string;
  readonly #timeoutMs: number;
  /**
   * One connection per call (Connection: close): a kept-alive socket that the
   * station closes after its idle timeout (5 s) just as the agent's next
   * heartbeat reuses it would fail that call with ECONNRESET.
   */
  readonly #agents: readonly (HttpAgent | HttpsAgent)[];
  readonly #taskFollowMs: number;
  readonly #onTask: ((task: StationTask) => void) | undefined;

  constructor(options: StationClientOptions) {
    this.#stations = Array.isArray(options.baseUrl) ? [...(options.baseUrl as readonly URL[])] : [options.baseUrl as URL];
    if (this.#stations.length < 1 || this.#stations.length > STATIONS_MAX) throw new UsageError(`--station: 1 to ${STATIONS_MAX} URLs, not ${this.#stations.length}`);
    this.#taskFollowMs = options.taskFollowMs ?? TASK_FOLLOW_MS_DEFAULT;
    this.#onTask = options.onTask;
    this.#token = options.token;
    this.#timeoutMs = options.timeoutMs ?? STATION_REQUEST_TIMEOUT_MS;
    const https = new HttpsAgent({ keepAlive: false, ...(options.ca === undefined ? {} : { ca: options.ca }) });
    const http = new HttpAgent({ keepAlive: false });
    this.#agents = this.#stations.map((url) => (url.protocol === "https:" ? https : http));
  }

  /** The station that answered last (the first one until a call has been answered). */
  get baseUrl(): URL {
    return this.#stations[this.#current] as URL;
  }

  /** Every station, in the order given. */
  get stations(): readonly URL[] {
    return this.#stations;
  }

  /**
   * One API call; resolves with the parsed JSON body (undefined for 204). A
   * state-changing call the station runs as a task and answers 202 with
   * `Location: /api/v1/tasks/ID` (still running after the station's wait) is
   * followed until the task finishes: its result is returned, or its error
   * thrown, as if the station had answered at once. `respondAsync` asks for
   * the task at once (Prefer: respond-async), for operations known to be long.
   */
  async call(method: string, path: string, body?: unknown, options: { readonly respondAsync?: boolean } = {}): Promise<unknown> {
    const what = `${method} ${new URL(path, this.baseUrl).pathname}`;
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    // Safe to send to another station after a reset or a timeout: it does the same thing twice, or the station deduplicates it.
    const requestId = (body as { requestId?: unknown } | null | undefined)?.requestId;
    const repeatable = IDEMPOTENT_METHODS.has(method.toUpperCase()) || (typeof requestId === "string" && requestId !== "");
    const { status, text, location } = await this.#exchange(path, method, what, payload, options.respondAsync === true, repeatable);
    if (status === 202 && location !== undefined && /^\/api\/v1\/tasks\/t-[0-9a-f]+$/.test(location)) {
      return this.#taskAnswer(what, await this.followTask(location.slice("/api/v1/tasks/".length)));
    }
    const ok = status >= 200 && status < 300;
    let parsed: unknown = undefined;
    if (text !== "") {
      try {
        parsed = JSON.parse(text);
      } catch {
        if (ok) throw new IpsanError("IO_ERROR", `${what}: station answered non-JSON (status ${status})`);
      }
    }
    if (!ok) throw stationError(what, status, parsed, text);
    return parsed;
  }

  /** GET /api/v1/tasks/ID. */
  async task(id: string): Promise<StationTask> {
    const task = (await this.call("GET", `/api/v1/tasks/${encodeURIComponent(id)}`)) as StationTask | undefined;
    if (task === undefined || task === null || typeof task.id !== "string" || typeof task.state !== "string") {
      throw new IpsanError("IO_ERROR", `GET /api/v1/tasks/${id}: station answered something that is not a task`);
    }
    return task;
  }

  /** Polls a task until it is finished (at most taskFollowMs; onTask hears every poll). */
  async followTask(id: string): Promise<StationTask> {
    const deadlineMs = Date.now() + this.#taskFollowMs;
    let intervalMs = TASK_POLL_INTERVAL_MS;
    for (;;) {
      const task = await this.task(id);
      this.#onTask?.(task);
      if (task.finishedAt !== null) return task;
      if (Date.now() + intervalMs > deadlineMs) {
        throw new IpsanError("UNAVAILABLE", `task ${id} (${task.kind}) still ${task.state} after ${this.#taskFollowMs} ms; it goes on at the station (ipsan tasks show ${id})`);
      }
      await new Promise((resolve) => setTimeout(resolve, intervalMs));
      intervalMs = Math.min(intervalMs * 2, TASK_POLL_INTERVAL_MS_MAX);
    }
  }

  /** What a finished task answers, as the synchronous call would have. */
  #taskAnswer(what: string, task: StationTask): unknown {
    if (task.state === "succeeded") return task.result ?? undefined;
    const error = task.error ?? { code: "CONFLICT", message: `task ${task.id} (${task.kind}) ${task.message ?? task.state}` };
    const status = isErrorCode(error.code) ? ERROR_CODES[error.code][1] : 500;
    throw stationError(`${what} (task ${task.id})`, status, { error }, "");
  }

  /**
   * One request and its whole (bounded) answer, within the timeout
   * (src/util/http_client.ts): from the one station, or the first of several
   * that answers (see the top of this file).
   */
  async #exchange(path: string, method: string, what: string, payload: Buffer | undefined, respondAsync: boolean, repeatable: boolean): Promise<{ status: number; text: string; location: string | undefined }> {
    const headers: Record<string, string> = { authorization: `Bearer ${this.#token}`, accept: "application/json" };
    if (respondAsync) headers["prefer"] = "respond-async";
    if (payload !== undefined) headers["content-type"] = "application/json";
    const send = (index: number, timeoutMs: number): Promise<HttpAnswer> =>
      httpExchange({
        url: new URL(path, this.#stations[index]),
        method,
        headers,
        ...(payload === undefined ? {} : { body: payload }),
        timeoutMs,
        maxBytes: RESPONSE_BYTES_MAX,
        agent: this.#agents[index] as HttpAgent | HttpsAgent,
      });
    const shape = (answer: HttpAnswer): { status: number; text: string; location: string | undefined } => {
      const location = answer.headers.location;
      return { status: answer.status, text: answer.text(), location: typeof location === "string" ? location : undefined };
    };
    const tooLarge = (error: HttpExchangeError): IpsanError => new IpsanError("TOO_LARGE", `${what}: station answer exceeds ${RESPONSE_BYTES_MAX} bytes`, { cause: error });
    const reason = (error: HttpExchangeError, timeoutMs: number): string =>
      `${error.errno ?? error.failure}: ${error.failure === "timeout" ? `no answer within ${timeoutMs} ms` : errorMessage(error.cause ?? error)}`;

    if (this.#stations.length === 1) {
      // One station: one attempt, its answer (a 503 too) is the call's, as before issue 11.
      try {
        return shape(await send(0, this.#timeoutMs));
      } catch (error) {
        if (!(error instanceof HttpExchangeError)) throw error;
        if (error.failure === "too-large") throw tooLarge(error);
        throw new IpsanError("UNAVAILABLE", `${what}: station ${this.baseUrl.origin} unreachable (${reason(error, this.#timeoutMs)})`, { cause: error });
      }
    }

    const startedMs = Date.now();
    const deadlineMs = startedMs + this.#timeoutMs;
    /** The last failure of each station, by origin, in the order tried. */
    const failures = new Map<string, string>();
    let passes = 0;
    const pass = async (): Promise<{ status: number; text: string; location: string | undefined }> => {
      passes += 1;
      const count = this.#stations.length;
      const first = this.#current;
      for (let step = 0; step < count; step++) {
        const index = (first + step) % count;
        const origin = (this.#stations[index] as URL).origin;
        const remainingMs = deadlineMs - Date.now();
        if (remainingMs <= 0) break;
        // A call that may move on after a timeout shares the time left among the stations left; one that may not, waits it all.
        const timeoutMs = repeatable ? Math.min(remainingMs, Math.max(STATION_ATTEMPT_TIMEOUT_MS_MIN, Math.floor(remainingMs / (count - step)))) : remainingMs;
        let answer: HttpAnswer;
        try {
          answer = await send(index, timeoutMs);
        } catch (error) {
          if (!(error instanceof HttpExchangeError)) throw error;
          if (error.failure === "too-large") throw tooLarge(error);
          failures.delete(origin);
          failures.set(origin, reason(error, timeoutMs));
          const notConnected = error.failure === "unreachable" && error.errno !== undefined && NOT_CONNECTED_ERRNOS.has(error.errno);
          // An answer already started (a status line) came from a station that acted: final, whatever the method.
          const beforeAnswer = error.status === undefined;
          if (notConnected || (repeatable && beforeAnswer)) continue;
          throw this.#noStation(what, failures, passes, startedMs, error, "it may have reached the station, so it is not sent to another: check before repeating it");
        }
        if (answer.status === 503) {
          failures.delete(origin);
          failures.set(origin, stationError("", 503, parseJson(answer.text()), answer.text()).message.replace(/^: /, ""));
          continue;
        }
        this.#current = index;
        return shape(answer);
      }
      throw new PassFailed();
    };
    try {
      return await retry(pass, {
        policy: STATION_PASS_BACKOFF,
        retryable: (error) => error instanceof PassFailed && Date.now() < deadlineMs,
        sleep: (ms) => new Promise((resolve) => setTimeout(resolve, Math.max(0, Math.min(ms, deadlineMs - Date.now())))),
      });
    } catch (error) {
      if (!(error instanceof PassFailed)) throw error;
      throw this.#noStation(what, failures, passes, startedMs, undefined, undefined);
    }
  }

  /** The error of a call no station answered: every station tried and why it failed. */
  #noStation(what: string, failures: ReadonlyMap<string, string>, passes: number, startedMs: number, cause: unknown, note: string | undefined): IpsanError {
    const tried = [...failures].map(([origin, why]) => `${origin} (${why})`).join("; ");
    const untried = this.#stations.filter((url) => !failures.has(url.origin)).map((url) => url.origin);
    const message =
      `${what}: no station answered: ${tried}` +
      (untried.length > 0 ? `; not tried: ${untried.join(", ")}` : "") +
      ` [${passes} pass${passes === 1 ? "" : "es"} over ${this.#stations.length} stations in ${Date.now() - startedMs} ms]` +
      (note === undefined ? "" : `; ${note}`);
    return new IpsanError("UNAVAILABLE", message, cause === undefined ? {} : { cause });
  }

  /**
   * PUT /api/v1/hosts/NAME; `spare` given: registers (true) or unregisters
   * (false) a spare host; `iqn` given: the host's iSCSI initiator name ("" removes it).
   */
  async registerHost(name: string, address: string | undefined, spare?: boolean, iqn?: string): Promise<HostInfo | undefined> {
    const body = { ...(address === undefined ? {} : { address }), ...(spare === undefined ? {} : { spare }), ...(iqn === undefined ? {} : { iqn }) };
    return (await this.call("PUT", `/api/v1/hosts/${encodeURIComponent(name)}`, body)) as
      | HostInfo
      | undefined;
  }

  /** POST /api/v1/hosts/NAME/heartbeat; `iqn` given: the station records it if it changed (the address stays). */
  async heartbeat(name: string, iqn?: string): Promise<void> {
    await this.call("POST", `/api/v1/hosts/${encodeURIComponent(name)}/heartbeat`, iqn === undefined ? {} : { iqn });
  }

  async allocate(request: AllocationRequest): Promise<StationAssignment> {
    return checkAssignment(await this.call("POST", "/api/v1/allocations", request), "POST /api/v1/allocations");
  }

  /** Live assignments (of one host, when given). */
  async assignments(host?: string): Promise<Assignment[]> {
    const query = host === undefined ? "" : `?host=${encodeURIComponent(host)}`;
    return listItems<Assignment>(await this.call("GET", `/api/v1/assignments${query}`), "assignments");
  }

  /**
   * Reports a mirror's leg states and rebuild progress to the station.
   * Resolves with `ignored` when the station kept a newer report.
   */
  async reportLegs(assignmentId: string, report: LegReport): Promise<{ readonly ignored: boolean; readonly reason?: string }> {
    const body = (await this.call("PUT", `/api/v1/assignments/${encodeURIComponent(assignmentId)}/legs`, report)) as { ignored?: unknown; reason?: unknown } | undefined;
    if (body !== undefined && body !== null && body.ignored === true) return { ignored: true, ...(typeof body.reason === "string" ? { reason: body.reason } : {}) };
    return { ignored: false };
  }

  /** GET /api/v1/hosts/NAME/keys: the host's NBD keys, one per unit it holds a volume on (host_keys.ts on the station). */
  async hostKeys(name: string): Promise<HostKey[]> {
    const items = listItems<HostKey>(await this.call("GET", `/api/v1/hosts/${encodeURIComponent(name)}/keys`), "host keys");
    for (const item of items) {
      if (typeof item?.unit !== "string" || typeof item.identity !== "string" || typeof item.key !== "string" || !/^[0-9a-f]{64}$/i.test(item.key)) {
        throw new IpsanError("IO_ERROR", "station answered a malformed host key");
      }
    }
    return items;
  }

  /** POST /api/v1/hosts/NAME/rotate-key: new NBD keys for that host on every unit. */
  async rotateHostKey(name: string): Promise<{ host: string; keyEpoch: number }> {
    return (await this.call("POST", `/api/v1/hosts/${encodeURIComponent(name)}/rotate-key`, {})) as { host: string; keyEpoch: number };
  }

  async unassign(id: string): Promise<void> {
    await this.call("DELETE", `/api/v1/assignments/${encodeURIComponent(id)}`);
  }

  async units(): Promise<UnitInfo[]> {
    return listItems<UnitInfo>(await this.call("GET", "/api/v1/units"), "units");
  }

  async hosts(): Promise<HostInfo[]> {
    return listItems<HostInfo>(await this.call("GET", "/api/v1/hosts"), "hosts");
  }

  async volumes(): Promise<VolumeInfo[]> {
    return listItems<VolumeInfo>(await this.call("GET", "/api/v1/volumes"), "volumes");
  }
}

function parseJson(text: string): unknown {
  try {
    return text === "" ? undefined : (JSON.parse(text) as unknown);
  } catch {
    return undefined;
  }
}

function stationError(what: string, status: number, parsed: unknown, text: string): StationError {
  const error = (parsed as { error?: { code?: unknown; message?: unknown; field?: unknown; reasons?: unknown } } | undefined)?.error;
  const code = isErrorCode(error?.code) ? error.code : codeForStatus(status);
  const field = typeof error?.field === "string" ? error.field : undefined;
  const reasons = Array.isArray(error?.reasons) ? (error.reasons as unknown[]) : [];
  const message = typeof error?.message === "string" ? error.message : text.slice(0, 200) || `status ${status}`;
  let full = `${what}: ${status} ${code}: ${message}`;
  if (field !== undefined && !message.includes(field)) full += ` (field ${field})`;
  if (reasons.length > 0) full += ` [${describeReasons(reasons)}]`;
  return new StationError(code, full, status, field, reasons);
}

function checkAssignment(body: unknown, what: string): StationAssignment {
  const a = body as Partial<StationAssignment> | undefined;
  if (a === undefined || a === null || typeof a !== "object" || typeof a.unit !== "string" || typeof a.volume !== "string" || typeof a.sizeBytes !== "number") {
    throw new IpsanError("IO_ERROR", `${what}: station answered an assignment without uri/unit/volume/sizeBytes`);
  }
  // A single copy has a URI; a mirror has none of its own but a URI per leg.
  const legs = Array.isArray(a.legs) ? a.legs : [];
  if (legs.length > 0) {
    if (!legs.every((l) => l !== null && typeof l === "object" && typeof l.uri === "string" && typeof l.volume === "string")) {
      throw new IpsanError("IO_ERROR", `${what}: station answered a mirrored assignment whose legs lack a uri or volume`);
    }
  } else if (typeof a.uri !== "string") {
    throw new IpsanError("IO_ERROR", `${what}: station answered an assignment without uri/unit/volume/sizeBytes`);
  }
  return a as StationAssignment;
}

/**
 * The local address this machine uses toward the station: what the station
 * sees as our source address (absent NAT). The agent registers it when no
 * --address is given, so a heartbeat-only host still has a data-path address.
 * Given several stations, the first that accepts a connection (each gets an
 * equal share of the timeout).
 */
export async function sourceAddressToward(target: URL | readonly URL[], timeoutMs = STATION_REQUEST_TIMEOUT_MS): Promise<string> {
  const urls = Array.isArray(target) ? (target as readonly URL[]) : [target as URL];
  const failures: string[] = [];
  for (const url of urls) {
    try {
      return await sourceAddressTowardOne(url, Math.max(STATION_ATTEMPT_TIMEOUT_MS_MIN, Math.floor(timeoutMs / urls.length)));
    } catch (error) {
      if (urls.length === 1) throw error;
      failures.push(errorMessage(error));
    }
  }
  throw new IpsanError("UNAVAILABLE", `no station reachable: ${failures.join("; ")}`);
}

function sourceAddressTowardOne(url: URL, timeoutMs: number): Promise<string> {
  const port = Number(url.port || (url.protocol === "https:" ? 443 : 80));
  const host = url.hostname.replace(/^\[|\]$/g, "");
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new IpsanError("UNAVAILABLE", `station ${url.origin} unreachable (no connection within ${timeoutMs} ms)`));
    }, timeoutMs);
    socket.once("connect", () => {
      clearTimeout(timer);
      const address = socket.localAddress;
      socket.destroy();
      if (address === undefined) reject(new IpsanError("IO_ERROR", `no local address toward ${url.origin}`));
      else resolve(address.replace(/^::ffff:/, ""));
    });
    socket.once("error", (error) => {
      clearTimeout(timer);
      reject(new IpsanError("UNAVAILABLE", `station ${url.origin} unreachable (${errorMessage(error)})`, { cause: error }));
    });
  });
}
