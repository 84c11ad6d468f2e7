// The station's REST API over node:http or node:https (docs/api.md). Thin
// handlers: authenticate the bearer token, match the route, read a bounded
// body, authorize (src/station/auth/permissions.ts), validate every field,
// call the station core, write the audit line (src/station/auth/audit.ts) for
// a change or a refusal, answer. Errors become {error:{code, message, field?, reasons?}} with the
// status from the error catalogue, in exactly one place (`sendError`).
//
// Limits: BODY_BYTES_MAX per body (413 beyond), HTTP_CONNECTIONS_MAX sockets,
// header and request timeouts, SSE_SUBSCRIBERS_MAX event streams, each with a
// bounded send buffer.

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { forgetIdentity, identityOf, rotateSecret } from "./unit_identities.ts";
import { openApiDocument } from "./openapi.ts";
import { COPIES_MAX, NoSpaceError, type Station } from "./station.ts";
import { LIVE_ASSIGNMENT_STATES, type StationEvent, UNIT_STATES, HOST_STATES, ASSIGNMENT_STATES, type VolumeRecord } from "./types.ts";
import { Body, checkAddress, checkBoolean, checkIndex, checkName, checkRequestId, checkSize, checkSizes, invalid, show } from "./validate.ts";
import { assignmentView, hostView, unitView, volumeView } from "./views.ts";
import { LegReports, parseLegReport } from "./leg_reports.ts";
import { renderGauge } from "./metrics.ts";
import { AUDIT_LIST_LIMIT_DEFAULT, AUDIT_LIST_LIMIT_MAX, tailEntries, verifyAuditFile, type AuditLog } from "./auth/audit.ts";
import { authorize } from "./auth/permissions.ts";
import { ADMIN_TOKEN_NAME, JOIN_TOKEN_TTL_MS_DEFAULT, JOIN_TOKEN_TTL_MS_MAX, TOKEN_ROLES, tokenView, type Principal, type TokenRole, type TokenStore } from "./auth/tokens.ts";
import { parseDuration } from "../util/duration.ts";
import { CONSOLE_DIR_DEFAULT, consoleFile, isConsolePath } from "./console_static.ts";

export const BODY_BYTES_MAX = 64 * 1024;
/** After a 413, bytes read and discarded before the connection is cut. */
export const BODY_DRAIN_BYTES_MAX = 1024 * 1024;
export const HTTP_CONNECTIONS_MAX = 1024;
export const HTTP_HEADERS_TIMEOUT_MS = 10_000;
export const HTTP_REQUEST_TIMEOUT_MS = 30_000;
export const HTTP_KEEP_ALIVE_TIMEOUT_MS = 5_000;
export const SSE_SUBSCRIBERS_MAX = 64;
export const SSE_HEARTBEAT_MS = 15_000;
/** A subscriber with more than this waiting in its socket buffer is disconnected. */
export const SSE_BUFFER_BYTES_MAX = 1024 * 1024;
export const VERSION = "0.1.0";
/** Items per listing page unless ?limit= says otherwise, and the most it may say. */
export const LIST_LIMIT_DEFAULT = 10_000;
export const LIST_LIMIT_MAX = 100_000;

const log = logger("station-api");

type Query = URLSearchParams;
interface Context {
  readonly req: IncomingMessage;
  readonly res: ServerResponse;
  readonly params: readonly string[];
  readonly query: Query;
  readonly body: unknown;
  readonly callerAddress: string;
  /** Who is calling (src/station/auth): already authorized for this route. */
  readonly principal: Principal;
}
interface Answer {
  readonly status: number;
  readonly body?: unknown;
}
type Handler = (ctx: Context) => Promise<Answer | null> | Answer | null;

interface Route {
  readonly method: string;
  /** The route as declared, e.g. "/api/v1/assignments/:id": the key of the permission table and the audit's action. */
  readonly path: string;
  /** Names of the path's parameters, in order (the audit's ids). */
  readonly paramNames: readonly string[];
  readonly pattern: RegExp;
  readonly handler: Handler;
  /** Reads a JSON body. */
  readonly hasBody: boolean;
}

const SEGMENT = "([^/]+)";

function callerAddressOf(req: IncomingMessage): string {
  return (req.socket.remoteAddress ?? "").replace(/^::ffff:/, "");
}

/** Which query parameters each listing accepts. */
function checkQuery(query: Query, allowed: readonly string[]): void {
  for (const key of query.keys()) {
    if (!allowed.includes(key)) throw invalid(key, `unknown query parameter (allowed: ${allowed.join(", ") || "none"})`);
  }
}

function queryFlag(query: Query, key: string): boolean {
  const value = query.get(key);
  if (value === null) return false;
  if (value === "true" || value === "1" || value === "") return true;
  if (value === "false" || value === "0") return false;
  throw invalid(key, `expected true or false, got ${show(value)}`);
}

/** A page of a listing: ?offset=N&limit=M (default LIST_LIMIT_DEFAULT, at most LIST_LIMIT_MAX). */
function page(query: Query): { offset: number; limit: number } {
  const read = (key: string, fallback: number, max: number): number => {
    const value = query.get(key);
    if (value === null) return fallback;
    if (!/^[0-9]{1,9}$/.test(value) || Number(value) > max) throw invalid(key, `expected a whole number 0..${max}, got ${show(value)}`);
    return Number(value);
  };
  return { offset: read("offset", 0, 1e9), limit: read("limit", LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX) };
}

/** {items, total, offset, nextOffset}: nextOffset is null on the last page. */
function paged<T, U>(all: readonly T[], range: { offset: number; limit: number }, view: (item: T) => U) {
  const items = all.slice(range.offset, range.offset + range.limit).map(view);
  const next = range.offset + items.length;
  return { items, total: all.length, offset: range.offset, nextOffset: next < all.length ? next : null };
}

export interface ApiServerOptions {
  readonly station: Station;
  /** Credentials (DATA/admin.token is the built-in admin among them). */
  readonly tokens: TokenStore;
  /** DATA/audit.log: every change, and every refused credential, before its answer. */
  readonly audit: AuditLog;
  /** HTTPS with this certificate chain and key (PEM); plain HTTP without. */
  readonly tls?: { readonly cert: Buffer; readonly key: Buffer };
  /** Extra Prometheus text appended to /metrics (the discovery listener's counters). */
  readonly extraMetrics?: () => string;
  /** The web console's built files, served at / and /assets/* without a token (default dist/console). */
  readonly consoleDir?: string;
}

export class ApiServer {
  private readonly station: Station;
  private readonly tokens: TokenStore;
  private readonly audit: AuditLog;
  private readonly extraMetrics: (() => string) | undefined;
  private readonly consoleDir: string;
  private readonly server: Server;
  private readonly routes: Route[];
  /** Open event streams, with the credential that opened each (revoking it ends them). */
  private readonly subscribers = new Map<ServerResponse, string>();
  private closing = false;
  /** Host leg reports (PUT /api/v1/assignments/ID/legs). */
  private readonly legReports: LegReports;

  constructor(options: ApiServerOptions) {
    this.station = options.station;
    this.tokens = options.tokens;
    this.audit = options.audit;
    this.extraMetrics = options.extraMetrics;
    this.consoleDir = options.consoleDir ?? CONSOLE_DIR_DEFAULT;
    this.legReports = new LegReports(options.station.store);
    this.routes = this.buildRoutes();
    const serverOptions = { headersTimeout: HTTP_HEADERS_TIMEOUT_MS, requestTimeout: HTTP_REQUEST_TIMEOUT_MS };
    const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
      void this.handle(req, res);
    };
    this.server =
      options.tls === undefined ? createServer(serverOptions, onRequest) : createHttpsServer({ ...serverOptions, cert: options.tls.cert, key: options.tls.key }, onRequest);
    this.server.keepAliveTimeout = HTTP_KEEP_ALIVE_TIMEOUT_MS;
    this.server.maxConnections = HTTP_CONNECTIONS_MAX;
    this.server.on("clientError", (error, socket) => {
      log.limited("client-error", "bad HTTP request", { error: errorMessage(error) });
      if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
      else socket.destroy();
    });
  }

  async listen(host: string, port: number): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(port, host, () => {
        this.server.off("error", reject);
        resolve();
      });
    });
    return this.server.address() as AddressInfo;
  }

  async close(): Promise<void> {
    this.closing = true;
    for (const res of this.subscribers.keys()) res.end();
    this.subscribers.clear();
    await new Promise<void>((resolve) => {
      this.server.close(() => resolve());
      this.server.closeIdleConnections();
      setTimeout(() => this.server.closeAllConnections(), 2_000).unref();
    });
  }

  // ---- plumbing ----------------------------------------------------------------

  /** The caller, from the bearer token (src/station/auth/tokens.ts), or why not. */
  private authenticate(req: IncomingMessage): { principal: Principal } | { reason: string } {
    const header = req.headers.authorization;
    if (typeof header !== "string") return { reason: "missing bearer token" };
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
    if (match === null) return { reason: "missing bearer token" };
    const result = this.tokens.authenticate(match[1] ?? "");
    return result.kind === "ok" ? { principal: result.principal } : { reason: result.reason };
  }

  /**
   * Records a change (any method but GET/HEAD) or a refused credential (401/403)
   * in the audit log, durably, before the answer goes out.
   */
  private async record(req: IncomingMessage, principal: Principal | null, action: string, ids: Record<string, string>, status: number): Promise<void> {
    const method = req.method ?? "";
    if ((method === "GET" || method === "HEAD") && status !== 401 && status !== 403) return;
    await this.audit.append({
      actor: principal?.name ?? "-",
      role: principal?.role ?? "-",
      action,
      ids,
      from: callerAddressOf(req),
      status,
    });
  }

  private send(res: ServerResponse, status: number, body?: unknown, headers: Record<string, string> = {}): void {
    this.station.metrics.httpRequests.inc(String(status));
    if (res.headersSent) {
      res.end();
      return;
    }
    if (body === undefined) {
      res.writeHead(status, headers);
      res.end();
      return;
    }
    const text = `${JSON.stringify(body)}\n`;
    res.writeHead(status, {
      "content-type": "application/json; charset=utf-8",
      "content-length": String(Buffer.byteLength(text)),
      "cache-control": "no-store",
      ...headers,
    });
    res.end(text);
  }

  private sendError(res: ServerResponse, error: unknown, headers: Record<string, string> = {}): void {
    if (error instanceof IpsanError) {
      const body: Record<string, unknown> = { code: error.code, message: error.message };
      if (error.field !== undefined) body["field"] = error.field;
      if (error instanceof NoSpaceError) body["reasons"] = error.reasons;
      this.send(res, error.httpStatus, { error: body }, headers);
      return;
    }
    log.error("request failed", { error: errorMessage(error), stack: (error as Error).stack?.split("\n")[1]?.trim() });
    this.send(res, 500, { error: { code: "IO_ERROR", message: `internal error: ${errorMessage(error)}` } }, headers);
  }

  /**
   * Answers 413 to an oversized body. The answer waits until the client has
   * finished sending (discarding up to BODY_DRAIN_BYTES_MAX): answering first
   * and closing makes the client's remaining writes fail with EPIPE/ECONNRESET
   * before it reads the answer. Past the cap the answer goes out and the
   * connection is cut once it is written.
   */
  private rejectOversized(req: IncomingMessage, res: ServerResponse, recorded: Promise<void>): void {
    let drained = 0;
    let answered = false;
    const answer = (): void => {
      if (answered) return;
      answered = true;
      // The audit entry is on disk before the answer goes out.
      void recorded.catch((error: unknown) => log.error("cannot write the audit log", { error: errorMessage(error) })).finally(() => this.send(res, 413, { error: { code: "TOO_LARGE", message: `request body over ${BODY_BYTES_MAX} bytes`, field: "body" } }, { connection: "close" }));
    };
    req.removeAllListeners("data");
    req.on("data", (chunk: Buffer) => {
      drained += chunk.length;
      if (drained > BODY_DRAIN_BYTES_MAX && !answered) {
        answer();
        res.once("finish", () => req.socket.destroy());
      }
    });
    req.on("end", answer);
    req.resume();
  }

  /** Reads at most BODY_BYTES_MAX bytes; null when the body was over the limit. */
  private readBody(req: IncomingMessage): Promise<Buffer | null> {
    return new Promise((resolve, reject) => {
      const declared = Number(req.headers["content-length"] ?? "0");
      if (declared > BODY_BYTES_MAX) {
        resolve(null);
        return;
      }
      const chunks: Buffer[] = [];
      let total = 0;
      let done = false;
      req.on("data", (chunk: Buffer) => {
        if (done) return;
        total += chunk.length;
        if (total > BODY_BYTES_MAX) {
          done = true;
          resolve(null);
          return;
        }
        chunks.push(chunk);
      });
      req.on("end", () => {
        if (!done) {
          done = true;
          resolve(Buffer.concat(chunks));
        }
      });
      req.on("error", (error) => {
        if (!done) {
          done = true;
          reject(error);
        }
      });
    });
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let principal: Principal | null = null;
    let action = `${req.method ?? "?"} ${(req.url ?? "/").split("?")[0]?.slice(0, 200) ?? "/"}`;
    let ids: Record<string, string> = {};
    try {
      if (this.closing) throw new IpsanError("SHUTTING_DOWN", "the station is stopping");
      const url = new URL(req.url ?? "/", "http://station.invalid");
      if (isConsolePath(req.method, url.pathname)) {
        // The console's static files are public (src/station/console_static.ts); its API calls are not.
        req.resume();
        const file = await consoleFile(this.consoleDir, url.pathname);
        this.station.metrics.httpRequests.inc(String(file.status));
        res.writeHead(file.status, { ...file.headers, "content-length": String(file.body.length) });
        res.end(req.method === "HEAD" ? undefined : file.body);
        return;
      }
      const who = this.authenticate(req);
      if ("reason" in who) {
        req.resume();
        await this.record(req, null, action, {}, 401);
        this.send(res, 401, { error: { code: "UNAUTHENTICATED", message: `${who.reason} (Authorization: Bearer TOKEN: DATA/admin.token, a token from ipsan tokens create, or a host credential)` } }, {
          "www-authenticate": 'Bearer realm="ipsan"',
        });
        return;
      }
      principal = who.principal;
      const path = url.pathname;
      let allowed: string[] = [];
      let matched: { route: Route; params: string[] } | null = null;
      for (const route of this.routes) {
        const m = route.pattern.exec(path);
        if (m === null) continue;
        if (route.method !== req.method) {
          allowed.push(route.method);
          continue;
        }
        const params: string[] = [];
        for (const raw of m.slice(1)) {
          try {
            params.push(decodeURIComponent(raw ?? ""));
          } catch {
            throw invalid("path", `bad percent-encoding in ${show(raw)}`);
          }
        }
        matched = { route, params };
        break;
      }
      if (matched === null) {
        req.resume();
        allowed = [...new Set(allowed)];
        if (allowed.length > 0) {
          await this.record(req, principal, action, {}, 405);
          this.send(res, 405, { error: { code: "INVALID_ARGUMENT", message: `method ${req.method} not allowed on ${path} (allowed: ${allowed.join(", ")})`, field: "method" } }, {
            allow: allowed.join(", "),
          });
        } else {
          await this.record(req, principal, action, {}, 404);
          this.send(res, 404, { error: { code: "NOT_FOUND", message: `no such path: ${req.method} ${path}`, field: "path" } });
        }
        return;
      }
      const { route, params } = matched;
      action = `${route.method} ${route.path}`;
      ids = Object.fromEntries(route.paramNames.map((name, i) => [name, (params[i] ?? "").slice(0, 200)]));
      let body: unknown = undefined;
      if (route.hasBody) {
        const bytes = await this.readBody(req);
        if (bytes === null) {
          this.rejectOversized(req, res, this.record(req, principal, action, ids, 413));
          return;
        }
        const text = bytes.toString("utf8").trim();
        if (text === "") body = {};
        else {
          try {
            body = JSON.parse(text);
          } catch (error) {
            throw invalid("body", `not valid JSON (${errorMessage(error)})`);
          }
        }
      } else {
        req.resume();
      }
      const callerAddress = callerAddressOf(req);
      const store = this.station.store;
      authorize(principal, {
        method: route.method,
        route: route.path,
        params,
        query: url.searchParams,
        body,
        callerAddress,
        assignmentHost: (id) => store.getAssignment(id)?.host,
        hostAddress: (name) => store.hosts.get(name)?.address,
      });
      const answer = await route.handler({ req, res, params, query: url.searchParams, body, callerAddress, principal });
      if (answer !== null) {
        await this.record(req, principal, action, ids, answer.status);
        this.send(res, answer.status, answer.body);
      }
    } catch (error) {
      const status = error instanceof IpsanError ? error.httpStatus : 500;
      try {
        await this.record(req, principal, action, ids, status);
      } catch (auditError) {
        log.error("cannot write the audit log", { error: errorMessage(auditError) });
        this.sendError(res, new IpsanError("IO_ERROR", `the audit log cannot be written: ${errorMessage(auditError)}`));
        return;
      }
      this.sendError(res, error);
    }
  }

  // ---- routes ------------------------------------------------------------------

  private buildRoutes(): Route[] {
    const station = this.station;
    const store = station.store;
    const r = (method: string, path: string, handler: Handler, hasBody = false): Route => ({
      method,
      path,
      paramNames: (path.match(/:[a-z]+/g) ?? []).map((p) => p.slice(1)),
      pattern: new RegExp(`^${path.replace(/:[a-z]+/g, SEGMENT)}$`),
      handler,
      hasBody,
    });
    const assignedTo = (unit: string, volume: string): string | null => store.liveOnVolume(unit, volume)[0]?.host ?? null;
    const unitOr404 = (name: string) => {
      const unit = store.units.get(name);
      if (unit === undefined) throw new IpsanError("NOT_FOUND", `unit ${show(name)} not found`, { field: "unit" });
      return unit;
    };
    return [
      r("GET", "/api/v1/health", ({ query }) => {
        checkQuery(query, []);
        return {
          status: 200,
          body: { status: "ok", version: VERSION, units: store.units.size, volumes: store.volumeCount, assignments: store.live.size },
        };
      }),
      // Who the caller is (the console disables what its role may not do; docs/console.md).
      r("GET", "/api/v1/whoami", ({ query, principal }) => {
        checkQuery(query, []);
        return { status: 200, body: { name: principal.name, role: principal.role, host: principal.host } };
      }),
      r("GET", "/api/v1/openapi.json", ({ query }) => {
        checkQuery(query, []);
        return { status: 200, body: openApiDocument(VERSION) };
      }),
      r("GET", "/api/v1/units", ({ query }) => {
        checkQuery(query, ["state"]);
        const state = query.get("state");
        if (state !== null && !(UNIT_STATES as readonly string[]).includes(state)) throw invalid("state", `unknown unit state ${show(state)}`);
        const items = [...store.units.values()]
          .filter((u) => state === null || u.state === state)
          .sort((a, b) => (a.name < b.name ? -1 : 1))
          .map((u) => unitView(u, store.unitVolumes(u.name).size, station.usableFreeBytes(u.name)));
        return { status: 200, body: { items } };
      }),
      r("GET", "/api/v1/units/:name", ({ params, query }) => {
        checkQuery(query, []);
        const unit = unitOr404(checkName(params[0], "unit"));
        const volumes = [...store.unitVolumes(unit.name).values()].map((v) => volumeView(v, assignedTo(unit.name, v.name)));
        return { status: 200, body: { ...unitView(unit, volumes.length, station.usableFreeBytes(unit.name)), volumes } };
      }),
      r("POST", "/api/v1/units/:name/refresh", async ({ params, body }) => {
        new Body(body, []);
        const unit = unitOr404(checkName(params[0], "unit"));
        await station.refreshUnit(unit.name);
        return { status: 200, body: unitView(store.units.get(unit.name) ?? unit, store.unitVolumes(unit.name).size, station.usableFreeBytes(unit.name)) };
      }, true),
      // Unit identities (issue 7; src/station/unit_identities.ts)
      r("GET", "/api/v1/units/:name/identity", ({ params, query }) => {
        checkQuery(query, []);
        return { status: 200, body: identityOf(station.options.unitIdentities, checkName(params[0], "unit")) };
      }),
      r("POST", "/api/v1/units/:name/rotate-secret", ({ params, body }) => {
        new Body(body, []);
        return { status: 202, body: rotateSecret(station.options.unitIdentities, store, checkName(params[0], "unit")) };
      }, true),
      r("DELETE", "/api/v1/units/:name/identity", ({ params, query }) => {
        checkQuery(query, []);
        return { status: 200, body: forgetIdentity(station.options.unitIdentities, store, checkName(params[0], "unit")) };
      }),
      r("GET", "/api/v1/volumes", ({ query }) => {
        checkQuery(query, ["unit", "free", "offset", "limit"]);
        const unitFilter = query.get("unit");
        if (unitFilter !== null) unitOr404(checkName(unitFilter, "unit"));
        const free = queryFlag(query, "free");
        const range = page(query);
        const matching: { volume: VolumeRecord; holder: string | null }[] = [];
        for (const unit of [...store.units.keys()].sort()) {
          if (unitFilter !== null && unit !== unitFilter) continue;
          for (const volume of store.unitVolumes(unit).values()) {
            const holder = assignedTo(unit, volume.name);
            if (free && holder !== null) continue;
            matching.push({ volume, holder });
          }
        }
        return { status: 200, body: paged(matching, range, (m) => volumeView(m.volume, m.holder)) };
      }),
      r("GET", "/api/v1/volumes/:unit/:name", ({ params, query }) => {
        checkQuery(query, []);
        const unit = unitOr404(checkName(params[0], "unit"));
        const name = checkName(params[1], "name");
        const volume = store.volume(unit.name, name);
        if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${show(name)} not found on unit ${unit.name}`, { field: "name" });
        return { status: 200, body: volumeView(volume, assignedTo(unit.name, name)) };
      }),
      r("POST", "/api/v1/volumes", async ({ body }) => {
        const b = new Body(body, ["unit", "name", "sizeBytes"]);
        const unit = checkName(b.required("unit"), "unit");
        const name = checkName(b.required("name"), "name");
        const sizeBytes = checkSize(b.required("sizeBytes"), "sizeBytes");
        unitOr404(unit);
        const volume = await station.createVolume(unit, name, sizeBytes);
        return { status: 201, body: volumeView(volume, null) };
      }, true),
      r("DELETE", "/api/v1/volumes/:unit/:name", async ({ params }) => {
        const unit = checkName(params[0], "unit");
        const name = checkName(params[1], "name");
        await station.deleteVolume(unit, name);
        return { status: 204 };
      }),
      r("POST", "/api/v1/volumes/:unit/:name/grow", async ({ params, body }) => {
        const b = new Body(body, ["sizeBytes"]);
        const unit = checkName(params[0], "unit");
        const name = checkName(params[1], "name");
        const sizeBytes = checkSize(b.required("sizeBytes"), "sizeBytes");
        const volume = await station.growVolume(unit, name, sizeBytes);
        return { status: 200, body: volumeView(volume, assignedTo(unit, name)) };
      }, true),
      r("PUT", "/api/v1/volumes/:unit/:name/partitions", async ({ params, body }) => {
        const b = new Body(body, ["sizesBytes"]);
        const unit = checkName(params[0], "unit");
        const name = checkName(params[1], "name");
        const sizes = checkSizes(b.required("sizesBytes"), "sizesBytes");
        const volume = await station.partitionVolume(unit, name, sizes);
        return { status: 200, body: volumeView(volume, assignedTo(unit, name)) };
      }, true),
      r("GET", "/api/v1/hosts", ({ query }) => {
        checkQuery(query, ["state"]);
        const state = query.get("state");
        if (state !== null && !(HOST_STATES as readonly string[]).includes(state)) throw invalid("state", `unknown host state ${show(state)}`);
        const items = [...store.hosts.values()]
          .sort((a, b) => (a.name < b.name ? -1 : 1))
          .map((h) => hostView(h, station.hostStateOf(h.name)))
          .filter((h) => state === null || h.state === state);
        return { status: 200, body: { items } };
      }),
      r("GET", "/api/v1/hosts/:name", ({ params, query }) => {
        checkQuery(query, []);
        const name = checkName(params[0], "host");
        const host = store.hosts.get(name);
        if (host === undefined) throw new IpsanError("NOT_FOUND", `host ${show(name)} not found`, { field: "host" });
        return { status: 200, body: hostView(host, station.hostStateOf(name)) };
      }),
      r("PUT", "/api/v1/hosts/:name", async ({ params, body, callerAddress }) => {
        const b = new Body(body, ["address", "spare"]);
        const name = checkName(params[0], "host");
        const address = b.has("address") ? await checkAddress(b.required("address"), "address") : callerAddress;
        const spare = b.has("spare") ? checkBoolean(b.required("spare"), "spare") : undefined;
        const { created } = await station.putHost(name, address, spare);
        const host = store.hosts.get(name);
        return { status: created ? 201 : 200, body: host === undefined ? null : hostView(host, station.hostStateOf(name)) };
      }, true),
      r("POST", "/api/v1/hosts/:name/heartbeat", async ({ params, body }) => {
        const b = new Body(body, ["address"]);
        const name = checkName(params[0], "host");
        const address = b.has("address") ? await checkAddress(b.required("address"), "address") : undefined;
        const host = store.hosts.get(name);
        if (host === undefined) throw new IpsanError("NOT_FOUND", `host ${show(name)} not found: register it first (PUT /api/v1/hosts/${name})`, { field: "host" });
        if (address !== undefined && address !== host.address) await station.putHost(name, address);
        else station.heartbeat(name);
        return { status: 204 };
      }, true),
      // The host's NBD keys (TLS-PSK, one per unit it holds a volume on): for the host itself (or an admin acting for it).
      r("GET", "/api/v1/hosts/:name/keys", ({ params, query }) => {
        checkQuery(query, []);
        const name = checkName(params[0], "host");
        if (!store.hosts.has(name)) throw new IpsanError("NOT_FOUND", `host ${show(name)} not found`, { field: "host" });
        return { status: 200, body: { host: name, keyEpoch: store.hosts.get(name)?.keyEpoch ?? 0, items: station.hostKeys(name) } };
      }),
      r("POST", "/api/v1/hosts/:name/rotate-key", async ({ params, body }) => {
        new Body(body, []);
        const name = checkName(params[0], "host");
        if (!store.hosts.has(name)) throw new IpsanError("NOT_FOUND", `host ${show(name)} not found`, { field: "host" });
        return { status: 200, body: { host: name, ...(await station.rotateHostKey(name)) } };
      }, true),
      r("GET", "/api/v1/assignments", ({ query }) => {
        checkQuery(query, ["host", "all", "state", "offset", "limit"]);
        const range = page(query);
        const host = query.get("host");
        if (host !== null) checkName(host, "host");
        const state = query.get("state");
        if (state !== null && !(ASSIGNMENT_STATES as readonly string[]).includes(state)) throw invalid("state", `unknown assignment state ${show(state)}`);
        const all = queryFlag(query, "all") || (state !== null && !LIVE_ASSIGNMENT_STATES.has(state as never));
        const matching = store.listAssignments({ ...(host === null ? {} : { host }), all }).filter((a) => state === null || a.state === state);
        return { status: 200, body: paged(matching, range, (a) => assignmentView(a, store)) };
      }),
      r("GET", "/api/v1/assignments/:id", ({ params, query }) => {
        checkQuery(query, []);
        const assignment = store.getAssignment(params[0] ?? "");
        if (assignment === undefined) throw new IpsanError("NOT_FOUND", `assignment ${show(params[0])} not found`, { field: "id" });
        return { status: 200, body: assignmentView(assignment, store) };
      }),
      r("POST", "/api/v1/allocations", async ({ body, callerAddress }) => {
        const b = new Body(body, ["requestId", "host", "sizeBytes", "address", "dryRun", "copies"]);
        const requestId = checkRequestId(b.required("requestId"));
        const host = checkName(b.required("host"), "host");
        const sizeBytes = checkSize(b.required("sizeBytes"), "sizeBytes");
        const dryRun = b.has("dryRun") ? checkBoolean(b.required("dryRun"), "dryRun") : false;
        const copies = b.has("copies") ? checkIndex(b.required("copies"), "copies", COPIES_MAX) : 1;
        const address = b.has("address") ? await checkAddress(b.required("address"), "address") : undefined;
        const answer = await station.allocate(
          { requestId, host, sizeBytes, dryRun, copies, ...(address === undefined ? {} : { address }) },
          callerAddress,
        );
        if (answer.kind === "dry_run") {
          const legs = answer.legs === undefined ? {} : { copies: answer.copies, legs: answer.legs };
          return { status: 200, body: { dryRun: true, placement: answer.placement, ...legs, reasons: answer.reasons } };
        }
        return { status: answer.status, body: assignmentView(answer.assignment, store) };
      }, true),
      r("POST", "/api/v1/assignments", async ({ body }) => {
        const b = new Body(body, ["host", "unit", "volume", "partition", "requestId"]);
        const host = checkName(b.required("host"), "host");
        const unit = checkName(b.required("unit"), "unit");
        const volume = checkName(b.required("volume"), "volume");
        const partition = b.has("partition") ? checkIndex(b.required("partition"), "partition", 1024) : undefined;
        const requestId = b.has("requestId") ? checkRequestId(b.required("requestId")) : undefined;
        const answer = await station.assign({
          host,
          unit,
          volume,
          ...(partition === undefined ? {} : { partition }),
          ...(requestId === undefined ? {} : { requestId }),
        });
        return { status: answer.status, body: assignmentView(answer.assignment, store) };
      }, true),
      r("PUT", "/api/v1/assignments/:id/legs", ({ params, body }) => {
        const id = params[0] ?? "";
        if (!/^[A-Za-z0-9_.-]{1,64}$/.test(id)) throw invalid("id", `invalid assignment id ${show(id)}`);
        const report = parseLegReport(body);
        const answer = this.legReports.apply(id, report);
        return { status: 200, body: answer.kind === "ignored" ? { ignored: true, reason: answer.reason } : assignmentView(answer.assignment, store) };
      }, true),
      r("DELETE", "/api/v1/assignments/:id", async ({ params }) => {
        const id = params[0] ?? "";
        if (!/^[A-Za-z0-9_.-]{1,64}$/.test(id)) throw invalid("id", `invalid assignment id ${show(id)}`);
        const answer = await station.unassign(id);
        return answer.status === 204 ? { status: 204 } : { status: 202, body: assignmentView(answer.assignment, store) };
      }),
      // ---- credentials and audit (src/station/auth; docs/api.md "Authentication") ----
      r("POST", "/api/v1/hosts/:name/register", async ({ params, body, callerAddress, principal }) => {
        const b = new Body(body, ["address", "spare"]);
        const name = checkName(params[0], "host");
        const address = b.has("address") ? await checkAddress(b.required("address"), "address") : callerAddress;
        const spare = b.has("spare") ? checkBoolean(b.required("spare"), "spare") : undefined;
        // The join token is checked (unused, unexpired, for this host) and spent before the host is written.
        const issued = principal.role === "join" ? this.tokens.register(principal.name, name) : this.tokens.issueHostCredential(name);
        const { created } = await station.putHost(name, address, spare);
        const host = store.hosts.get(name);
        return {
          status: created ? 201 : 200,
          body: { host: host === undefined ? null : hostView(host, station.hostStateOf(name)), credential: tokenView(issued.record), token: issued.secret },
        };
      }, true),
      r("GET", "/api/v1/tokens", ({ query }) => {
        checkQuery(query, []);
        return { status: 200, body: { items: this.tokens.list().map(tokenView) } };
      }),
      r("POST", "/api/v1/tokens", ({ body }) => {
        const b = new Body(body, ["name", "role"]);
        const name = checkName(b.required("name"), "name");
        const role = b.required("role");
        if (!(TOKEN_ROLES as readonly unknown[]).includes(role)) throw invalid("role", `expected one of ${TOKEN_ROLES.join(", ")}, got ${show(role)}`);
        const { record, secret } = this.tokens.create(name, role as TokenRole);
        return { status: 201, body: { ...tokenView(record), token: secret } };
      }, true),
      r("DELETE", "/api/v1/tokens/:name", ({ params }) => {
        const name = params[0] ?? "";
        if (name === ADMIN_TOKEN_NAME) {
          throw new IpsanError("CONFLICT", "the admin token is DATA/admin.token: replace that file and restart the station to change it", { field: "name" });
        }
        if (!this.tokens.revoke(name)) throw new IpsanError("NOT_FOUND", `no token named ${show(name)}`, { field: "name" });
        // Its open event streams end too: a revoked credential reads nothing more.
        for (const [stream, opener] of this.subscribers) if (opener === name) stream.end();
        return { status: 204 };
      }),
      r("POST", "/api/v1/join-tokens", ({ body }) => {
        const b = new Body(body, ["host", "expires"]);
        const host = b.has("host") ? checkName(b.required("host"), "host") : null;
        let ttlMs = JOIN_TOKEN_TTL_MS_DEFAULT;
        if (b.has("expires")) {
          const text = b.required("expires");
          if (typeof text !== "string") throw invalid("expires", `expected a duration such as "1h" or "30m", got ${show(text)}`);
          try {
            ttlMs = parseDuration(text, "expires");
          } catch (error) {
            throw invalid("expires", errorMessage(error));
          }
          if (ttlMs > JOIN_TOKEN_TTL_MS_MAX) throw invalid("expires", `at most 7 days, got ${show(text)}`);
        }
        const { record, secret } = this.tokens.createJoin(host, ttlMs);
        return { status: 201, body: { ...tokenView(record), token: secret } };
      }, true),
      r("GET", "/api/v1/audit", async ({ query }) => {
        checkQuery(query, ["limit"]);
        const text = query.get("limit");
        if (text !== null && (!/^[0-9]{1,6}$/.test(text) || Number(text) < 1 || Number(text) > AUDIT_LIST_LIMIT_MAX)) {
          throw invalid("limit", `expected a whole number 1..${AUDIT_LIST_LIMIT_MAX}, got ${show(text)}`);
        }
        const items = await tailEntries(this.audit.path, text === null ? AUDIT_LIST_LIMIT_DEFAULT : Number(text));
        return { status: 200, body: { items } };
      }),
      r("GET", "/api/v1/audit/verify", async ({ query }) => {
        checkQuery(query, []);
        const verdict = await verifyAuditFile(this.audit.path, this.audit.head);
        return { status: 200, body: { file: this.audit.path, ...verdict } };
      }),
      r("GET", "/api/v1/events", ({ req, res, query, principal }) => {
        checkQuery(query, ["since"]);
        const since = query.get("since") ?? req.headers["last-event-id"];
        let after: number | null = null;
        if (typeof since === "string") {
          if (!/^[0-9]{1,15}$/.test(since)) throw invalid("Last-Event-ID", `expected an event number, got ${show(since)}`);
          after = Number(since);
        }
        this.subscribe(res, after, principal.name);
        return null;
      }),
      r("GET", "/metrics", ({ res, query }) => {
        checkQuery(query, []);
        const text = this.metricsText();
        this.station.metrics.httpRequests.inc("200");
        res.writeHead(200, { "content-type": "text/plain; version=0.0.4; charset=utf-8", "content-length": String(Buffer.byteLength(text)) });
        res.end(text);
        return null;
      }),
    ];
  }

  // ---- event stream --------------------------------------------------------------

  private subscribe(res: ServerResponse, after: number | null, opener: string): void {
    if (this.subscribers.size >= SSE_SUBSCRIBERS_MAX) {
      throw new IpsanError("SHUTTING_DOWN", `too many event stream subscribers (SSE_SUBSCRIBERS_MAX=${SSE_SUBSCRIBERS_MAX}); try again later`);
    }
    this.station.metrics.httpRequests.inc("200");
    res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-store",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    });
    res.write(`: ipsan station event stream\nretry: 2000\n\n`);
    this.subscribers.set(res, opener);
    const write = (event: StationEvent): void => {
      if (res.writableLength > SSE_BUFFER_BYTES_MAX) {
        log.limited("sse-slow", "event stream subscriber does not read; disconnecting it");
        res.destroy();
        return;
      }
      const data = JSON.stringify({ seq: event.seq, at: new Date(event.atMs).toISOString(), type: event.type, action: event.action, subject: event.subject, data: event.data });
      res.write(`id: ${event.seq}\nevent: ${event.type}\ndata: ${data}\n\n`);
    };
    if (after !== null) for (const event of this.station.store.eventsAfter(after)) write(event);
    const unsubscribe = this.station.store.subscribe(write);
    const heartbeat = setInterval(() => res.write(`: heartbeat ${new Date().toISOString()}\n\n`), SSE_HEARTBEAT_MS);
    const cleanup = (): void => {
      clearInterval(heartbeat);
      unsubscribe();
      this.subscribers.delete(res);
    };
    res.on("close", cleanup);
    res.on("error", cleanup);
  }

  get subscriberCount(): number {
    return this.subscribers.size;
  }

  // ---- metrics -----------------------------------------------------------------------

  metricsText(): string {
    const store = this.station.store;
    const unitsByState = new Map<string, number>(UNIT_STATES.map((s) => [s, 0]));
    for (const unit of store.units.values()) unitsByState.set(unit.state, (unitsByState.get(unit.state) ?? 0) + 1);
    const hostsByState = new Map<string, number>(HOST_STATES.map((s) => [s, 0]));
    for (const host of store.hosts.keys()) {
      const state = this.station.hostStateOf(host);
      hostsByState.set(state, (hostsByState.get(state) ?? 0) + 1);
    }
    const assignmentsByState = new Map<string, number>([...LIVE_ASSIGNMENT_STATES].map((s) => [s, 0]));
    for (const a of store.live.values()) assignmentsByState.set(a.state, (assignmentsByState.get(a.state) ?? 0) + 1);
    let capacity = 0;
    let free = 0;
    let reserved = 0;
    for (const unit of store.units.values()) {
      capacity += unit.capacityBytes;
      free += this.station.usableFreeBytes(unit.name);
      reserved += this.station.carves.reservedBytes(unit.name);
    }
    const m = this.station.metrics;
    const memory = process.memoryUsage();
    return [
      renderGauge("ipsan_station_units", "Units in the pool, by state", [...unitsByState].map(([state, n]) => [{ state }, n] as const)),
      renderGauge("ipsan_station_volumes", "Volumes on all units of the pool", [[{}, store.volumeCount]]),
      renderGauge("ipsan_station_pool_capacity_bytes", "Capacity of all units", [[{}, capacity]]),
      renderGauge("ipsan_station_pool_free_bytes", "Free space on all units (reported, minus carves not yet reported)", [[{}, free]]),
      renderGauge("ipsan_station_pool_reserved_bytes", "Bytes of carves started on units and not yet in their reports", [[{}, reserved]]),
      renderGauge("ipsan_station_hosts", "Registered hosts, by state", [...hostsByState].map(([state, n]) => [{ state }, n] as const)),
      renderGauge("ipsan_station_assignments", "Live assignments, by state", [...assignmentsByState].map(([state, n]) => [{ state }, n] as const)),
      renderGauge("ipsan_station_event_subscribers", "Open event streams", [[{}, this.subscribers.size]]),
      renderGauge("ipsan_station_leg_replacements", "Mirror leg replacements recorded and not yet finished or undone", [[{}, store.replacements.size]]),
      renderGauge("ipsan_station_leg_volumes_to_delete", "Old or undone leg volumes waiting for their unit (and, for an old leg, its replacement in-sync)", [[{}, store.legDeletions.size]]),
      renderGauge("ipsan_station_resident_memory_bytes", "Resident set size of the station process", [[{}, process.memoryUsage.rss()]]),
      renderGauge("ipsan_station_heap_used_bytes", "V8 heap in use", [[{}, memory.heapUsed]]),
      renderGauge("ipsan_station_heap_total_bytes", "V8 heap reserved", [[{}, memory.heapTotal]]),
      renderGauge("ipsan_station_external_bytes", "Memory held by C++ objects bound to JavaScript (buffers, SQLite statements)", [[{}, memory.external]]),
      m.allocationSeconds.render(),
      m.allocations.render(),
      m.unitCalls.render(),
      m.httpRequests.render(),
      this.extraMetrics?.() ?? "",
    ].join("");
  }
}
