// The station's client of a unit's control API (contracts.md, "Unit control
// API"): create, delete, grow and partition volumes, put grants, read info.
// It authenticates with the token the station core gives it: derived from the
// unit's own secret once the unit is enrolled (issue 7, unitControlTokenFor),
// else from the cluster key (controlTokenFor, units that never enrolled).
//
// Every call has a timeout; network failures, timeouts and 5xx answers (but 507, no space) are
// retried a bounded number of times with backoff (every call here is
// idempotent at the unit, or, for create, made idempotent by the caller, who
// treats ALREADY_EXISTS as "look at what is there"). Failures are typed: a
// UnitCallError says which unit, which call, what kind of failure, and the
// unit's own error code when it answered one. Answers are validated before use.

import { validateStorageInfo } from "../discovery/storage_info.ts";
import { TABLE_GENERATION_HEADER, type NbdTlsMode, type StorageInfo, type VolumeInfo, parseIdentityGrant } from "../discovery/messages.ts";
import { ERROR_CODES, IpsanError, errorMessage, type ErrorCode } from "../util/errors.ts";
import type { UnitSample } from "./stats/rates.ts";
import { parseUnitStats } from "./stats/wire.ts";
import type { HostPort } from "./types.ts";
import { HttpExchangeError, httpExchange, type HttpAnswer } from "../util/http_client.ts";
import { retry, type BackoffPolicy } from "../util/retry.ts";

export const UNIT_CALL_TIMEOUT_MS = 5_000;
export const UNIT_CALL_ATTEMPTS_MAX = 3;
export const UNIT_CALL_BACKOFF_MS = 100;
/** Retries of a failed unit call: 100 ms, then 200 ms (jittered), within UNIT_CALL_ATTEMPTS_MAX attempts. */
export const UNIT_CALL_BACKOFF: BackoffPolicy = { initialMs: UNIT_CALL_BACKOFF_MS, maxMs: 2_000, attemptsMax: UNIT_CALL_ATTEMPTS_MAX, jitterRatio: 0.2 };
/**
 * A wipe punches holes (fast) on file storage but may write zeroes over a
 * whole block device (BLKZEROOUT without offload): it gets longer than the
 * other calls.
 */
export const UNIT_WIPE_TIMEOUT_MS = 120_000;
/** A unit's answer larger than this is refused (a unit's info with 4096 volumes fits easily). */
export const UNIT_RESPONSE_BYTES_MAX = 16 * 1024 * 1024;

export type UnitCallFailure =
  /** Connection refused, reset, DNS failure: nobody answered. */
  | "unreachable"
  | "timeout"
  /** The unit answered 4xx or 507 (no space): it refused the request (its code is in unitCode). */
  | "refused"
  /** The unit answered 5xx (other than 507). */
  | "failed"
  /** The unit answered something that is not what the contract says. */
  | "protocol";

export class UnitCallError extends IpsanError {
  readonly unit: string;
  readonly call: string;
  readonly failure: UnitCallFailure;
  readonly status: number | null;
  readonly unitCode: string | null;
  constructor(
    unit: string,
    call: string,
    failure: UnitCallFailure,
    message: string,
    details: { status?: number; unitCode?: string; field?: string; cause?: unknown } = {},
  ) {
    const passOn = failure === "refused" && isErrorCode(details.unitCode) ? details.unitCode : "UNAVAILABLE";
    super(passOn, `unit ${unit}: ${call}: ${message}`, {
      ...(details.cause === undefined ? {} : { cause: details.cause }),
      ...(details.field === undefined ? {} : { field: details.field }),
    });
    this.name = "UnitCallError";
    this.unit = unit;
    this.call = call;
    this.failure = failure;
    this.status = details.status ?? null;
    this.unitCode = details.unitCode ?? null;
  }
  /** Worth trying again later (the unit may come back); a refusal is final. */
  get transient(): boolean {
    return this.failure !== "refused";
  }
}

function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === "string" && Object.hasOwn(ERROR_CODES, value);
}

export interface UnitClientOptions {
  readonly unit: string;
  readonly control: HostPort;
  readonly token: string;
  readonly timeoutMs?: number;
  readonly attemptsMax?: number;
  /** Called once per HTTP exchange with its outcome (metrics). */
  readonly onCall?: (result: "ok" | UnitCallFailure) => void;
  /** The NBD key of a host on this unit (host_keys.ts): sent with grants by identity, never logged. */
  readonly keyFor?: (host: string) => string;
  /** The unit's NBD TLS mode as the station knows it (null: not known yet, taken as the managed default, require). */
  readonly tlsMode?: () => NbdTlsMode | null;
  /** Called with the unit's volume-table generation every answer carries (TABLE_GENERATION_HEADER). */
  readonly onTableGeneration?: (generation: number) => void;
}

/** The body of PUT /v1/volumes/NAME/grants for the station's grant strings (identity grants carry their keys). */
export function grantsBody(grants: readonly string[], tlsMode: NbdTlsMode | null, keyFor: (host: string) => string): unknown {
  const identities = grants.flatMap((grant) => {
    const parsed = parseIdentityGrant(grant);
    return parsed === undefined ? [] : [parsed];
  });
  if (identities.length === 0 && (grants.length > 0 || tlsMode === "off")) return { hosts: grants };
  if (identities.length !== grants.length) throw new Error("a volume's grants mix addresses and host identities");
  return {
    grants: identities.map((g) => ({
      host: g.host,
      key: keyFor(g.host),
      export: g.export,
      ...(g.from.length === 0 ? {} : { from: g.from }),
      ...(g.iqn === undefined ? {} : { iqn: g.iqn }),
    })),
  };
}

function hostForUrl(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/** Validates one Volume of the unit's answer with the discovery validator (one rule set for both paths). */
function parseVolume(unit: string, value: unknown): VolumeInfo | string {
  const wrapped = validateStorageInfo({ name: unit, nbd: { host: "0.0.0.0", port: 0 }, capacityBytes: 0, freeBytes: 0, volumes: [value] });
  if (wrapped.kind === "invalid") return wrapped.detail.replace(/^info\.volumes\[0\]/, "volume");
  const volume = wrapped.value.volumes[0];
  if (volume === undefined) return "volume missing";
  return volume;
}

export class UnitClient {
  readonly unit: string;
  readonly baseUrl: string;
  private readonly token: string;
  private readonly timeoutMs: number;
  private readonly attemptsMax: number;
  private readonly onCall: ((result: "ok" | UnitCallFailure) => void) | undefined;
  private readonly keyFor: (host: string) => string;
  private readonly tlsMode: () => NbdTlsMode | null;
  private readonly onTableGeneration: ((generation: number) => void) | undefined;

  constructor(options: UnitClientOptions) {
    this.unit = options.unit;
    this.baseUrl = `http://${hostForUrl(options.control.host)}:${options.control.port}`;
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? UNIT_CALL_TIMEOUT_MS;
    this.attemptsMax = options.attemptsMax ?? UNIT_CALL_ATTEMPTS_MAX;
    this.onCall = options.onCall;
    this.keyFor =
      options.keyFor ??
      ((host) => {
        throw new Error(`no NBD key for host ${host}: this client was made without keys`);
      });
    this.tlsMode = options.tlsMode ?? (() => null);
    this.onTableGeneration = options.onTableGeneration;
  }

  private async once(method: string, path: string, body: unknown, timeoutMs: number): Promise<{ status: number; json: unknown }> {
    const call = `${method} ${path}`;
    let answer: HttpAnswer;
    try {
      answer = await httpExchange({
        url: `${this.baseUrl}${path}`,
        method,
        headers: { authorization: `Bearer ${this.token}`, accept: "application/json" },
        ...(body === undefined ? {} : { json: body }),
        timeoutMs,
        maxBytes: UNIT_RESPONSE_BYTES_MAX,
      });
    } catch (error) {
      if (!(error instanceof HttpExchangeError)) throw error;
      const details = { cause: error, ...(error.status === undefined ? {} : { status: error.status }) };
      switch (error.failure) {
        case "timeout":
          throw new UnitCallError(this.unit, call, "timeout", `no answer within ${timeoutMs} ms from ${this.baseUrl}`, details);
        case "unreachable":
          throw new UnitCallError(this.unit, call, "unreachable", `${this.baseUrl} unreachable (${error.errno ?? errorMessage(error.cause ?? error)})`, details);
        default:
          throw new UnitCallError(this.unit, call, "protocol", error.message, details);
      }
    }
    const generation = Number(answer.headers[TABLE_GENERATION_HEADER.toLowerCase()]);
    if (Number.isSafeInteger(generation) && generation > 0) this.onTableGeneration?.(generation);
    const text = answer.text();
    let json: unknown = undefined;
    if (text !== "") {
      try {
        json = JSON.parse(text);
      } catch {
        const ok = answer.status >= 200 && answer.status < 300;
        throw new UnitCallError(this.unit, call, ok ? "protocol" : "failed", `answered ${answer.status} with non-JSON`, { status: answer.status });
      }
    }
    if (answer.status < 200 || answer.status >= 300) {
      const error = (json as { error?: { code?: unknown; message?: unknown; field?: unknown } } | undefined)?.error;
      const message = typeof error?.message === "string" ? error.message : `status ${answer.status}`;
      const details = {
        status: answer.status,
        ...(typeof error?.code === "string" ? { unitCode: error.code } : {}),
        ...(typeof error?.field === "string" ? { field: error.field } : {}),
      };
      // 507 Insufficient Storage (NO_SPACE) is the unit's final answer about this request, like a 4xx:
      // the station moves on to another unit instead of retrying or reporting the unit as failing.
      const refused = answer.status < 500 || answer.status === 507;
      throw new UnitCallError(this.unit, call, refused ? "refused" : "failed", message, details);
    }
    return { status: answer.status, json };
  }

  /** One call with bounded retries of transient failures (the project's retry policy, src/util/retry.ts). */
  private async request(
    method: string,
    path: string,
    body?: unknown,
    timeoutMs = this.timeoutMs,
    attemptsMax = this.attemptsMax,
  ): Promise<{ status: number; json: unknown }> {
    return retry(
      async () => {
        try {
          const result = await this.once(method, path, body, timeoutMs);
          this.onCall?.("ok");
          return result;
        } catch (error) {
          if (error instanceof UnitCallError) this.onCall?.(error.failure);
          throw error;
        }
      },
      {
        policy: { ...UNIT_CALL_BACKOFF, attemptsMax },
        // A timeout already cost timeoutMs; "refused" is the unit's final word.
        retryable: (error) => error instanceof UnitCallError && error.transient && error.failure !== "timeout",
      },
    );
  }

  private volumeFrom(call: string, json: unknown): VolumeInfo {
    const volume = parseVolume(this.unit, json);
    if (typeof volume === "string") throw new UnitCallError(this.unit, call, "protocol", `answered an invalid volume: ${volume}`);
    return volume;
  }

  async info(): Promise<StorageInfo> {
    const { json } = await this.request("GET", "/v1/info");
    const result = validateStorageInfo(json);
    if (result.kind === "invalid") throw new UnitCallError(this.unit, "GET /v1/info", "protocol", `answered invalid info: ${result.detail}`);
    if (result.value.name !== this.unit) {
      throw new UnitCallError(this.unit, "GET /v1/info", "protocol", `answered as unit ${JSON.stringify(result.value.name)}`);
    }
    return result.value;
  }

  /** The unit's cumulative I/O counters (GET /v1/stats): one attempt, `timeoutMs` at most (a poller's missed answer is a gap). */
  async stats(timeoutMs = this.timeoutMs): Promise<UnitSample> {
    const { json } = await this.request("GET", "/v1/stats", undefined, timeoutMs, 1);
    const sample = parseUnitStats(json);
    if (typeof sample === "string") throw new UnitCallError(this.unit, "GET /v1/stats", "protocol", `answered invalid stats: ${sample}`);
    return sample;
  }

  async getVolume(name: string): Promise<VolumeInfo> {
    const path = `/v1/volumes/${encodeURIComponent(name)}`;
    return this.volumeFrom(`GET ${path}`, (await this.request("GET", path)).json);
  }

  async createVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    return this.volumeFrom("POST /v1/volumes", (await this.request("POST", "/v1/volumes", { name, sizeBytes })).json);
  }

  async deleteVolume(name: string): Promise<void> {
    await this.request("DELETE", `/v1/volumes/${encodeURIComponent(name)}`);
  }

  async growVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    const path = `/v1/volumes/${encodeURIComponent(name)}/grow`;
    return this.volumeFrom(`POST ${path}`, (await this.request("POST", path, { sizeBytes })).json);
  }

  async setPartitions(name: string, sizesBytes: readonly number[]): Promise<VolumeInfo> {
    const path = `/v1/volumes/${encodeURIComponent(name)}/partitions`;
    return this.volumeFrom(`PUT ${path}`, (await this.request("PUT", path, { sizesBytes })).json);
  }

  /** Makes the whole volume read as zeroes (the unit refuses while it has grants or open connections). */
  async wipeVolume(name: string): Promise<VolumeInfo> {
    const path = `/v1/volumes/${encodeURIComponent(name)}/wipe`;
    return this.volumeFrom(`POST ${path}`, (await this.request("POST", path, undefined, Math.max(this.timeoutMs, UNIT_WIPE_TIMEOUT_MS))).json);
  }

  /** Zeroes part of a volume: `length` bytes from `offset` over its extents (the volume.wipe task's chunks). */
  async wipeVolumeRange(name: string, offset: number, length: number): Promise<VolumeInfo> {
    const path = `/v1/volumes/${encodeURIComponent(name)}/wipe`;
    return this.volumeFrom(`POST ${path}`, (await this.request("POST", path, { offset, length }, Math.max(this.timeoutMs, UNIT_WIPE_TIMEOUT_MS))).json);
  }

  /** Replaces a volume's grants: address grants, or grants by host identity ("id:HOST@EXPORT", sent with the host's key). */
  async setGrants(name: string, grants: readonly string[]): Promise<VolumeInfo> {
    const path = `/v1/volumes/${encodeURIComponent(name)}/grants`;
    return this.volumeFrom(`PUT ${path}`, (await this.request("PUT", path, grantsBody(grants, this.tlsMode(), this.keyFor))).json);
  }
}
