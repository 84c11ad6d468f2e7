// The unit's control API: HTTP + JSON on --control HOST:PORT (contracts.md).
// Every request needs "Authorization: Bearer TOKEN"; tokens are compared in
// constant time. Bodies are bounded (CONTROL_BODY_BYTES_MAX, 413 past it),
// every field is validated with a message naming it, errors come from the
// catalogue as {error:{code, message, field?}}, and no input crashes the
// daemon. Changes are serialized by the VolumeManager (one table writer).
//
//   GET    /v1/info                     GET    /v1/volumes
//   GET    /v1/volumes/NAME             POST   /v1/volumes            {name, sizeBytes}
//   DELETE /v1/volumes/NAME             POST   /v1/volumes/NAME/grow  {sizeBytes}
//   PUT    /v1/volumes/NAME/partitions  {sizesBytes:[...]}
//   PUT    /v1/volumes/NAME/grants      {hosts:[...]} or {grants:[{host, key, export?, from?, iqn?}]}
//   POST   /v1/volumes/NAME/wipe        (no body, or {}: all of it; or {offset, length}: that part)
//   GET    /v1/stats                    GET    /metrics (Prometheus text)    (io_report.ts)

import { createHash, timingSafeEqual } from "node:crypto";
import * as http from "node:http";
import { AssertionError } from "../util/assert.ts";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { type IoSource, type IscsiMetrics, type UnitStatsView, unitMetricsText, unitStats } from "./io_report.ts";
import type { UnitExportProvider } from "./provider.ts";
import { parseIdentityGrants } from "./volume_ops.ts";
import { type VolumeManager, type VolumeView, volumeView as plainVolumeView } from "./volumes.ts";
import type { TlsMode } from "../nbd/tls.ts";
import { IoStats } from "../nbd/io_stats.ts";
import { TABLE_GENERATION_HEADER } from "../discovery/messages.ts";

const log = logger("control");

/** Counters of a unit whose NBD server is not up (never the case once the unit serves). */
const EMPTY_STATS = new IoStats();

export const CONTROL_BODY_BYTES_MAX = 64 * 1024;
/** Past the body limit, bytes read and discarded before the 413 goes out and the connection is cut. */
export const CONTROL_BODY_DRAIN_BYTES_MAX = 1024 * 1024;
export const CONTROL_CONNECTIONS_MAX = 64;
export const CONTROL_REQUEST_TIMEOUT_MS = 15_000;
export const CONTROL_HEADERS_TIMEOUT_MS = 10_000;
export const CONTROL_URL_CHARS_MAX = 1024;

export interface ControlServerOptions {
  readonly manager: VolumeManager;
  readonly provider: UnitExportProvider;
  readonly unitName: string;
  /** The unit's own token(s). */
  readonly tokens: readonly string[];
  /** More accepted tokens, asked on every request (the station's derived token when joined). */
  readonly extraTokens?: () => readonly string[];
  /** The NBD address reported by GET /v1/info. */
  readonly nbd: () => { host: string; port: number } | { path: string } | undefined;
  /** The NBD server's TLS mode, reported by GET /v1/info (the station gives a unit that is not "off" grants by host identity). */
  readonly tls?: TlsMode;
  /** Tokens that may only read GET /metrics and GET /v1/stats (--metrics-token-file: a Prometheus scrape). */
  readonly readTokens?: readonly string[];
  /** The NBD server's I/O counters, for GET /v1/stats and GET /metrics (absent: zeroes). */
  readonly io?: () => IoSource | undefined;
  /**
   * The iSCSI target (--iscsi): GET /v1/info says `iscsi: {portal: "HOST:PORT"}`
   * (null without one) and volume views gain `iscsi: {target, naa}` on each
   * volume and partition (src/unit/iscsi.ts withIscsi).
   */
  readonly iscsi?: { readonly portal: () => string | undefined; readonly view: (view: VolumeView) => VolumeView; readonly metrics?: () => IscsiMetrics };
}

interface Reply {
  readonly status: number;
  readonly body?: unknown;
  /** A text answer instead of JSON (GET /metrics). */
  readonly text?: { readonly contentType: string; readonly body: string };
}

function digest(token: string): Buffer {
  return createHash("sha256").update(token, "utf8").digest();
}

/** Constant-time token check: compares fixed-length digests, and always compares against every token. */
export function tokenAccepted(presented: string, accepted: readonly string[]): boolean {
  const presentedDigest = digest(presented);
  let ok = false;
  for (const token of accepted) {
    if (token.length === 0) continue;
    if (timingSafeEqual(presentedDigest, digest(token))) ok = true;
  }
  return ok;
}

function errorReply(error: IpsanError): Reply {
  return {
    status: error.httpStatus,
    body: { error: { code: error.code, message: error.message, ...(error.field === undefined ? {} : { field: error.field }) } },
  };
}

function fieldError(field: string, message: string): IpsanError {
  return new IpsanError("INVALID_ARGUMENT", message, { field });
}

/** The body must be a JSON object with exactly the known fields. */
function objectBody(body: unknown, fields: readonly string[]): Record<string, unknown> {
  const expected = fields.length === 0 ? "no fields" : fields.join(", ");
  if (typeof body !== "object" || body === null || Array.isArray(body)) {
    throw fieldError("body", `body: expected a JSON object with ${expected}, got ${describe(body)}`);
  }
  const record = body as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!fields.includes(key)) throw fieldError(key, `${key}: unknown field (expected ${expected})`);
  }
  for (const key of fields) {
    if (!(key in record)) throw fieldError(key, `${key}: required`);
  }
  return record;
}

function describe(value: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

export class ControlServer {
  readonly #options: ControlServerOptions;
  readonly #server: http.Server;

  constructor(options: ControlServerOptions) {
    this.#options = options;
    this.#server = http.createServer(
      { requestTimeout: CONTROL_REQUEST_TIMEOUT_MS, headersTimeout: CONTROL_HEADERS_TIMEOUT_MS, maxHeaderSize: 16 * 1024 },
      (request, response) => {
        this.#handle(request, response).catch((error: unknown) => {
          log.error("control request failed", { error: errorMessage(error) });
          if (!response.headersSent) this.#send(response, errorReply(new IpsanError("IO_ERROR", "internal error")));
          else response.destroy();
        });
      },
    );
    this.#server.maxConnections = CONTROL_CONNECTIONS_MAX;
    this.#server.on("clientError", (_error, socket) => {
      if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
      else socket.destroy();
    });
  }

  async listen(host: string, port: number): Promise<{ host: string; port: number }> {
    await new Promise<void>((resolve, reject) => {
      this.#server.once("error", reject);
      this.#server.listen({ host, port, exclusive: true }, () => {
        this.#server.off("error", reject);
        resolve();
      });
    });
    const address = this.#server.address();
    if (address === null || typeof address === "string") throw new Error("control server bound to a non-TCP address");
    return { host: address.address, port: address.port };
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.#server.close(() => resolve());
      this.#server.closeIdleConnections();
      setTimeout(() => this.#server.closeAllConnections(), 2000).unref();
    });
  }

  async #handle(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    const peer = `${request.socket.remoteAddress ?? "?"}:${request.socket.remotePort ?? 0}`;
    const authorization = request.headers.authorization ?? "";
    const match = /^Bearer ([\x21-\x7e]{1,512})$/.exec(authorization);
    const accepted = [...this.#options.tokens, ...(this.#options.extraTokens?.() ?? [])];
    const presented = match?.[1];
    const readOnly = presented !== undefined && !tokenAccepted(presented, accepted) && tokenAccepted(presented, this.#options.readTokens ?? []);
    if (readOnly) {
      const path = (request.url ?? "/").split("?")[0];
      if (request.method !== "GET" || (path !== "/metrics" && path !== "/v1/stats")) {
        log.limited("control-read-token", "the metrics token may only read GET /metrics and GET /v1/stats", { peer });
        request.resume();
        this.#send(response, errorReply(new IpsanError("PERMISSION_DENIED", "the metrics token may only read GET /metrics and GET /v1/stats")));
        return;
      }
    } else if (presented === undefined || !tokenAccepted(presented, accepted)) {
      log.limited("control-unauthenticated", "control request without a valid token", { peer });
      request.resume();
      response.setHeader("WWW-Authenticate", 'Bearer realm="ipsan-unit"');
      this.#send(response, errorReply(new IpsanError("UNAUTHENTICATED", "missing or wrong bearer token")), true);
      return;
    }
    let reply: Reply;
    try {
      reply = await this.#route(request);
    } catch (error) {
      const errno = (error as NodeJS.ErrnoException | undefined)?.code;
      if (error instanceof IpsanError) {
        reply = errorReply(error);
      } else if (errno === "ENOSPC" || errno === "EDQUOT") {
        // The file system under the unit's storage is full (its storage file is sparse): the same 507 as a full unit,
        // with what to do, never a 500 "internal error" (issue 9 item 10).
        log.warn("storage file system full: a change was refused", { error: errorMessage(error) });
        reply = errorReply(
          new IpsanError(
            "NO_SPACE",
            `the file system under this unit's storage is full (${errno}): free space there, or start the unit with a --capacity the file system can hold; nothing was changed`,
          ),
        );
      } else {
        // Assertion failures and unexpected errors: a bug or a storage failure; the daemon keeps serving.
        log.error(error instanceof AssertionError ? "control request hit an assertion" : "control request failed", {
          error: errorMessage(error),
          stack: error instanceof Error ? error.stack : undefined,
        });
        reply = errorReply(new IpsanError("IO_ERROR", `internal error: ${errorMessage(error)}`));
      }
    }
    this.#send(response, reply, reply.status === 413);
  }

  #send(response: http.ServerResponse, reply: Reply, close = false): void {
    const text = reply.text?.body ?? (reply.body === undefined ? "" : `${JSON.stringify(reply.body)}\n`);
    response.statusCode = reply.status;
    if (text !== "") response.setHeader("Content-Type", reply.text?.contentType ?? "application/json");
    response.setHeader("Content-Length", Buffer.byteLength(text));
    if (close) response.setHeader("Connection", "close");
    // The table generation after this request: the station drops storage reports older than an answer it stored.
    response.setHeader(TABLE_GENERATION_HEADER, String(this.#options.manager.generation));
    response.end(text);
  }

  #stats(): UnitStatsView {
    const io = this.#options.io?.() ?? { stats: EMPTY_STATS, connectionCount: 0 };
    return unitStats(this.#options.unitName, io, this.#options.manager);
  }

  async #readBody(request: http.IncomingMessage): Promise<unknown> {
    const bytes = await readBoundedBody(request);
    if (bytes === null) {
      throw new IpsanError("TOO_LARGE", `body over the limit CONTROL_BODY_BYTES_MAX=${CONTROL_BODY_BYTES_MAX}`, { field: "body" });
    }
    const text = bytes.toString("utf8");
    if (text.trim() === "") throw fieldError("body", "body: expected a JSON object, got an empty body");
    try {
      return JSON.parse(text) as unknown;
    } catch (error) {
      throw fieldError("body", `body: not valid JSON (${errorMessage(error)})`);
    }
  }

  /** A route without fields: no body at all, or the empty object `{}`. */
  /** A body that may be absent (undefined then). */
  async #readOptionalBody(request: http.IncomingMessage): Promise<unknown> {
    const declared = request.headers["content-length"];
    if (request.headers["transfer-encoding"] === undefined && (declared === undefined || declared === "0")) {
      request.resume();
      return undefined;
    }
    return this.#readBody(request);
  }

  async #route(request: http.IncomingMessage): Promise<Reply> {
    const method = request.method ?? "GET";
    const rawUrl = request.url ?? "/";
    if (rawUrl.length > CONTROL_URL_CHARS_MAX) throw new IpsanError("TOO_LARGE", `URL longer than ${CONTROL_URL_CHARS_MAX} characters`, { field: "url" });
    const path = rawUrl.split("?")[0] ?? "/";
    const parts = path.split("/").filter((p) => p !== "");
    const { manager } = this.#options;
    const iscsi = this.#options.iscsi;
    const volumeView = (record: Parameters<typeof plainVolumeView>[0]): VolumeView => (iscsi === undefined ? plainVolumeView(record) : iscsi.view(plainVolumeView(record)));
    const views = (list: readonly VolumeView[]): readonly VolumeView[] => (iscsi === undefined ? list : list.map(iscsi.view));
    const notFound = (): IpsanError => new IpsanError("NOT_FOUND", `no route ${method} ${path}`);
    if (parts.length === 1 && parts[0] === "metrics" && method === "GET") {
      request.resume();
      return { status: 200, text: { contentType: "text/plain; version=0.0.4; charset=utf-8", body: unitMetricsText(this.#stats(), this.#options.provider.refused, iscsi?.metrics?.()) } };
    }
    if (parts[0] !== "v1") throw notFound();
    if (parts.length === 2 && parts[1] === "stats" && method === "GET") {
      request.resume();
      return { status: 200, body: this.#stats() };
    }
    if (parts.length === 2 && parts[1] === "info" && method === "GET") {
      request.resume();
      const snapshot = manager.snapshot();
      return {
        status: 200,
        body: {
          name: this.#options.unitName,
          unitId: manager.unitId,
          capacityBytes: snapshot.capacityBytes,
          freeBytes: snapshot.freeBytes,
          sectorSize: snapshot.sectorSize,
          nbd: this.#options.nbd() ?? null,
          tls: this.#options.tls ?? "off",
          generation: snapshot.generation,
          tableGeneration: snapshot.generation,
          freeExtents: snapshot.freeExtents,
          iscsi: iscsi?.portal() === undefined ? null : { portal: iscsi.portal() },
          volumes: views(snapshot.volumes),
          refused: { ...this.#options.provider.refused },
        },
      };
    }
    if (parts[1] !== "volumes") throw notFound();
    if (parts.length === 2) {
      if (method === "GET") {
        request.resume();
        return { status: 200, body: { items: views(manager.snapshot().volumes) } };
      }
      if (method === "POST") {
        const body = objectBody(await this.#readBody(request), ["name", "sizeBytes"]);
        const volume = await manager.create(body["name"], body["sizeBytes"]);
        return { status: 201, body: volumeView(volume) };
      }
      throw notFound();
    }
    let name: string;
    try {
      name = decodeURIComponent(parts[2] ?? "");
    } catch {
      throw fieldError("name", `name: ${describe(parts[2])} is not a valid URL component`);
    }
    if (parts.length === 3) {
      if (method === "GET") {
        request.resume();
        const volume = manager.volume(name);
        if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${describe(name)} not found`, { field: "name" });
        return { status: 200, body: volumeView(volume) };
      }
      if (method === "DELETE") {
        request.resume();
        await manager.delete(name);
        return { status: 204 };
      }
      throw notFound();
    }
    if (parts.length === 4 && parts[3] === "grow" && method === "POST") {
      const body = objectBody(await this.#readBody(request), ["sizeBytes"]);
      return { status: 200, body: volumeView(await manager.grow(name, body["sizeBytes"])) };
    }
    if (parts.length === 4 && parts[3] === "partitions" && method === "PUT") {
      const body = objectBody(await this.#readBody(request), ["sizesBytes"]);
      return { status: 200, body: volumeView(await manager.setPartitions(name, body["sizesBytes"])) };
    }
    if (parts.length === 4 && parts[3] === "wipe" && method === "POST") {
      // No body or {}: the whole volume. {offset, length}: that part of it (bytes, sector multiples, WIPE_RANGE_BYTES_MAX at most).
      const raw = await this.#readOptionalBody(request);
      if (raw === undefined || (typeof raw === "object" && raw !== null && !Array.isArray(raw) && Object.keys(raw).length === 0)) {
        return { status: 200, body: volumeView(await manager.wipe(name)) };
      }
      if (typeof raw === "object" && raw !== null && !Array.isArray(raw)) {
        const unknown = Object.keys(raw).find((key) => key !== "offset" && key !== "length");
        if (unknown !== undefined) throw fieldError(unknown, `${unknown}: unknown field (expected no fields, or offset and length)`);
      }
      const body = objectBody(raw, ["offset", "length"]);
      return { status: 200, body: volumeView(await manager.wipe(name, { offset: body["offset"], length: body["length"] })) };
    }
    if (parts.length === 4 && parts[3] === "grants" && method === "PUT") {
      // {hosts:[...]} (address grants, as before) or {grants:[{host, key, export, from}]} (identity grants).
      const raw = await this.#readBody(request);
      const identity = typeof raw === "object" && raw !== null && !Array.isArray(raw) && "grants" in raw;
      if (!identity) {
        const body = objectBody(raw, ["hosts"]);
        return { status: 200, body: volumeView(await manager.setGrants(name, body["hosts"])) };
      }
      const body = objectBody(raw, ["grants"]);
      const grants = parseIdentityGrants(name, body["grants"]);
      return { status: 200, body: volumeView(await manager.setIdentityGrants(name, grants)) };
    }
    throw notFound();
  }
}

/**
 * Reads a request body of at most CONTROL_BODY_BYTES_MAX bytes; null when it
 * is larger (announced or streamed). An oversized body is still read and
 * discarded, up to CONTROL_BODY_DRAIN_BYTES_MAX, before the caller answers
 * 413: answering first and closing makes a client that is still sending fail
 * with EPIPE instead of reading the answer.
 */
function readBoundedBody(request: http.IncomingMessage): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let totalBytes = 0;
    let over = Number(request.headers["content-length"] ?? "0") > CONTROL_BODY_BYTES_MAX;
    request.on("data", (chunk: Buffer) => {
      totalBytes += chunk.length;
      if (!over && totalBytes > CONTROL_BODY_BYTES_MAX) {
        over = true;
        chunks.length = 0;
      }
      if (!over) chunks.push(chunk);
      else if (totalBytes > CONTROL_BODY_DRAIN_BYTES_MAX) {
        request.pause();
        resolve(null);
      }
    });
    request.on("end", () => resolve(over ? null : Buffer.concat(chunks)));
    request.on("error", reject);
    // A client gone before the end: nobody to answer; settle so the handler does not wait forever.
    request.on("close", () => resolve(null));
  });
}
