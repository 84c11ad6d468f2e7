// The station's REST API (docs/api.md) on fastify 5, over HTTP or HTTPS.
// Route modules (units.ts, volumes.ts, hosts.ts, assignments.ts, access.ts,
// system.ts, console.ts) declare each route with its TypeBox schemas and a
// thin handler; this file does the rest once for every route:
//   onRequest     the bearer token -> principal (401 otherwise), except the
//                 console's static files;
//   preValidation authorize (auth/permissions.ts: the one table) -> 403;
//   validation    ajv against the route's schemas -> 400 naming the field;
//   handler       the station core; the audit line (auth/audit.ts) for a
//                 change or a refusal is on disk before the answer goes out;
//   errors        one error handler: {error:{code, message, field?, reasons?}}
//                 with the status from the error catalogue.
// Unknown paths answer 404 NOT_FOUND, a known path with another method 405
// with Allow. The OpenAPI 3.1 document is generated from the same schemas
// (@fastify/swagger) and served at /api/v1/openapi.json.
//
// Limits (limits.ts): BODY_BYTES_MAX per body (413 beyond), HTTP_CONNECTIONS_MAX
// sockets, header/request/keep-alive timeouts, SSE_SUBSCRIBERS_MAX event
// streams, each with a bounded send buffer.

import { timingSafeEqual } from "node:crypto";
import { STATUS_CODES, createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifySchemaValidationError } from "fastify";
import swagger from "@fastify/swagger";
import { Ajv, type ValidateFunction } from "ajv";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import type { Station } from "../station.ts";
import { invalid } from "../validate.ts";
import { LegReports } from "../leg_reports.ts";
import type { AuditLog } from "../auth/audit.ts";
import { authorize } from "../auth/permissions.ts";
import type { Principal, TokenStore } from "../auth/tokens.ts";
import { StationTasks } from "../tasks/operations.ts";
import { idleStats, type StationStats } from "../stats/collector.ts";
import { answerTask, TASK_WAIT_MS } from "../tasks/answer.ts";
import { errorReply } from "./errors.ts";
import {
  BODY_BYTES_MAX,
  BODY_DRAIN_BYTES_MAX,
  HTTP_CONNECTIONS_MAX,
  HTTP_HEADERS_TIMEOUT_MS,
  HTTP_KEEP_ALIVE_TIMEOUT_MS,
  HTTP_REQUEST_TIMEOUT_MS,
  VERSION,
} from "./limits.ts";
import type { Api, Context, RouteSpec, Subscribers } from "./route.ts";
import { SHARED_SCHEMAS } from "./schemas.ts";
import { unitRoutes } from "./units.ts";
import { volumeRoutes } from "./volumes.ts";
import { hostRoutes } from "./hosts.ts";
import { assignmentRoutes } from "./assignments.ts";
import { taskRoutes } from "./tasks.ts";
import { statsRoutes } from "./stats.ts";
import { accessRoutes } from "./access.ts";
import { metricsText, systemRoutes } from "./system.ts";
import { consoleRoutes } from "./console.ts";

export * from "./limits.ts";

const log = logger("station-api");

/** The console's files next to the compiled station: dist/station/api/server.js -> dist/console. */
export const CONSOLE_DIR_DEFAULT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "console");
/** The longest path parameter routed (longer ones are still refused by each route's own check, with a 400). */
const PARAM_CHARS_MAX = 1024;
/** A public route's handlers never look at the caller. */
const ANONYMOUS: Principal = { name: "-", role: "viewer", host: null };

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
  /** The web console's built files (index.html, assets/); default CONSOLE_DIR_DEFAULT. */
  readonly consoleDir?: string;
  /** The station's tasks (src/station/tasks); default: a runner of its own on the station's store. */
  readonly tasks?: StationTasks;
  /** How long a state-changing route waits for its task before answering 202 (TASK_WAIT_MS). */
  readonly taskWaitMs?: number;
  /** I/O and capacity series (src/station/stats/); absent: empty series. */
  readonly stats?: StationStats;
  /**
   * Several stations (issue 11, src/station/cluster/): no listening socket of its
   * own (the cluster's front server hands requests to handle()); every answer
   * waits for `durable()` (the changes so far are in etcd); a request forwarded
   * by another station with the cluster's forward secret names its caller in
   * FORWARDED_FOR_HEADER; health says who leads.
   */
  readonly cluster?: {
    readonly durable: () => Promise<void>;
    readonly forwardSecret: Buffer;
    readonly health: () => { leader: boolean; leaderUrl: string | null };
  };
}

/** The header a follower station sets to the caller's address when it forwards a request to the leader. */
export const FORWARDED_FOR_HEADER = "ipsan-forwarded-for";
/** The header carrying the cluster's forward secret (shared through etcd) with a forwarded request. */
export const FORWARD_SECRET_HEADER = "ipsan-forward-secret";

function callerAddressOf(req: IncomingMessage, forwardSecret?: Buffer): string {
  if (forwardSecret !== undefined) {
    const secret = req.headers[FORWARD_SECRET_HEADER];
    const forwarded = req.headers[FORWARDED_FOR_HEADER];
    if (typeof secret === "string" && typeof forwarded === "string" && forwarded.length <= 64) {
      const given = Buffer.from(secret, "utf8");
      if (given.length === forwardSecret.length && timingSafeEqual(given, forwardSecret)) return forwarded.replace(/^::ffff:/, "");
    }
  }
  return (req.socket.remoteAddress ?? "").replace(/^::ffff:/, "");
}

/** "/api/v1/assignments/:id" -> its parameter names and a pattern for a raw path. */
function compile(url: string): { names: string[]; pattern: RegExp } {
  const names = (url.match(/:[A-Za-z]+/g) ?? []).map((p) => p.slice(1));
  const pattern = new RegExp(`^${url.replace(/:[A-Za-z]+/g, "([^/]+)").replace(/\*$/, ".*")}$`);
  return { names, pattern };
}

export class ApiServer {
  private readonly station: Station;
  private readonly tokens: TokenStore;
  private readonly audit: AuditLog;
  private readonly app: FastifyInstance;
  private readonly api: Api;
  /** Open event streams, with the credential that opened each (revoking it ends them). */
  private readonly subscribers: Subscribers = new Map();
  /** Every route: its spec and compiled pattern ("METHOD /url" -> ...), for authorize and 405. */
  private readonly routes = new Map<string, { spec: RouteSpec; names: string[]; pattern: RegExp }>();
  private readonly principals = new WeakMap<FastifyRequest, Principal>();
  private closing = false;
  private readonly cluster: ApiServerOptions["cluster"];

  constructor(options: ApiServerOptions) {
    this.station = options.station;
    this.tokens = options.tokens;
    this.audit = options.audit;
    const app = Fastify({
      logger: false,
      bodyLimit: BODY_BYTES_MAX,
      requestTimeout: HTTP_REQUEST_TIMEOUT_MS,
      keepAliveTimeout: HTTP_KEEP_ALIVE_TIMEOUT_MS,
      return503OnClosing: false,
      exposeHeadRoutes: false,
      routerOptions: { maxParamLength: PARAM_CHARS_MAX },
      // A path fastify cannot route (bad percent-encoding): the same error path as the rest.
      frameworkErrors: (error, request, reply) => {
        void this.fail(error, request, reply);
      },
      clientErrorHandler: (error: Error, socket: Socket) => {
        log.limited("client-error", "bad HTTP request", { error: errorMessage(error) });
        if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        else socket.destroy();
      },
      ...(options.tls === undefined ? {} : { https: { cert: options.tls.cert, key: options.tls.key } }),
      // Several stations: the cluster's front server owns the socket and calls handle().
      ...(options.cluster === undefined ? {} : { serverFactory: (handler: (req: IncomingMessage, res: ServerResponse) => void) => createServer(handler) }),
    }) as unknown as FastifyInstance;
    this.cluster = options.cluster;
    this.app = app;
    app.server.headersTimeout = HTTP_HEADERS_TIMEOUT_MS;
    app.server.maxConnections = HTTP_CONNECTIONS_MAX;

    // Every body is JSON whatever its content type (as before fastify); an empty one is {}.
    app.removeAllContentTypeParsers();
    app.addContentTypeParser("*", { parseAs: "string" }, (_request, text, done) => {
      const trimmed = String(text).trim();
      if (trimmed === "") {
        done(null, {});
        return;
      }
      try {
        done(null, JSON.parse(trimmed));
      } catch (error) {
        done(invalid("body", `not valid JSON (${errorMessage(error)})`), undefined);
      }
    });
    // Answers are JSON.stringify'd: a response schema documents an answer, it never filters it.
    const serialize = (payload: unknown): string => `${JSON.stringify(payload)}\n`;
    app.setReplySerializer(serialize);
    app.setSerializerCompiler(() => serialize);

    app.addHook("onRequest", async (request, reply) => {
      await this.authenticate(request, reply);
      if (reply.sent) return reply;
      return undefined;
    });
    app.addHook("preValidation", async (request) => this.authorize(request));
    app.addHook("onSend", async (_request, reply, payload) => {
      this.station.metrics.httpRequests.inc(String(reply.statusCode));
      if (!reply.hasHeader("cache-control")) reply.header("cache-control", "no-store");
      return payload;
    });
    app.setErrorHandler(async (error, request, reply) => this.fail(error, request, reply));
    app.setNotFoundHandler(async (request, reply) => this.notFound(request, reply));
    for (const schema of SHARED_SCHEMAS) app.addSchema(schema);
    // Validation only checks: it never removes, coerces or defaults a field (the handlers see what
    // was sent). Each route's validators are compiled at its first request, so the start does not
    // wait for some 50 routes' (openapi_test.ts requests every route: a schema ajv cannot compile fails it).
    const ajv = new Ajv({ removeAdditional: false, coerceTypes: false, useDefaults: false, allErrors: false, verbose: true, validateFormats: false, strict: false });
    for (const schema of SHARED_SCHEMAS) ajv.addSchema(schema);
    app.setValidatorCompiler(({ schema }) => {
      let compiled: ValidateFunction | undefined;
      const validate = (data: unknown): boolean => {
        compiled ??= ajv.compile(schema);
        const ok = compiled(data);
        validate.errors = (compiled.errors ?? null) as FastifySchemaValidationError[] | null;
        return ok;
      };
      validate.errors = null as FastifySchemaValidationError[] | null;
      return validate;
    });

    void app.register(swagger, {
      openapi: {
        openapi: "3.1.0",
        info: {
          title: "ipsan station API",
          version: VERSION,
          description:
            "The control station of ipsan: the pool of SAN units, their volumes, hosts and assignments. " +
            "Every request needs Authorization: Bearer TOKEN: DATA/admin.token (role admin), a named token (ipsan tokens create: " +
            "admin, operator or viewer), a host's own credential (role host: its own records only) or, to register a host, a one-time join token. " +
            "Every change and every refusal is appended to DATA/audit.log. See docs/api.md \"Authentication\". " +
            "This document is generated from the routes' schemas (src/station/api/).",
        },
        servers: [{ url: "/" }],
        security: [{ bearer: [] }],
        components: { securitySchemes: { bearer: { type: "http", scheme: "bearer" } } },
      },
      refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => String(json["$id"] ?? `def-${i}`) },
    });
    this.api = {
      station: options.station,
      tokens: options.tokens,
      audit: options.audit,
      legReports: new LegReports(options.station.store),
      subscribers: this.subscribers,
      extraMetrics: options.extraMetrics,
      consoleDir: options.consoleDir ?? CONSOLE_DIR_DEFAULT,
      tasks: options.tasks ?? new StationTasks(options.station),
      taskWaitMs: options.taskWaitMs ?? TASK_WAIT_MS,
      add: (spec) => this.add(spec),
      clusterHealth: options.cluster?.health,
      clusterDurable: options.cluster?.durable,
      answerTask: (ctx, task) => answerTask(this.api.tasks.runner, task, ctx.request.headers.prefer, this.api.taskWaitMs),
    };
    const stats = options.stats ?? idleStats();
    void app.register(async () => {
      systemRoutes(this.api, () => app.swagger());
      unitRoutes(this.api);
      volumeRoutes(this.api);
      hostRoutes(this.api);
      assignmentRoutes(this.api);
      taskRoutes(this.api);
      statsRoutes(this.api, stats);
      accessRoutes(this.api);
      consoleRoutes(this.api);
    });
  }

  async listen(host: string, port: number): Promise<AddressInfo> {
    await this.app.listen({ host, port });
    return this.app.server.address() as AddressInfo;
  }

  /** Several stations: the routes are ready; then handle() answers requests the front server hands over. */
  async ready(): Promise<void> {
    await this.app.ready();
  }

  /** Answers one request (several stations: the cluster's front server owns the socket). */
  handle(req: IncomingMessage, res: ServerResponse): void {
    (this.app as unknown as { routing: (req: IncomingMessage, res: ServerResponse) => void }).routing(req, res);
  }

  async close(): Promise<void> {
    this.closing = true;
    for (const res of this.subscribers.keys()) res.end();
    this.subscribers.clear();
    const force = setTimeout(() => this.app.server.closeAllConnections(), 2_000);
    force.unref();
    try {
      await this.app.close();
    } finally {
      clearTimeout(force);
    }
  }

  /** The station's tasks (the runner the routes use). */
  get tasks(): StationTasks {
    return this.api.tasks;
  }

  get subscriberCount(): number {
    return this.subscribers.size;
  }

  metricsText(): string {
    return metricsText(this.api);
  }

  // ---- plumbing ----------------------------------------------------------------

  private add(spec: RouteSpec): void {
    const key = `${spec.method} ${spec.url}`;
    this.routes.set(key, { spec, ...compile(spec.url) });
    // Every answer in the document says what it is (the status's reason phrase unless the schema says more).
    const response = Object.fromEntries(
      Object.entries((spec.schema.response ?? {}) as Record<string, { description?: string }>).map(([status, schema]) => [
        status,
        schema.description === undefined ? { ...schema, description: STATUS_CODES[Number(status)] ?? status } : schema,
      ]),
    );
    this.app.route({
      method: spec.method,
      url: spec.url,
      schema: { ...spec.schema, response },
      config: { ipsanRoute: key },
      handler: async (request, reply) => {
        const ctx: Context = {
          request,
          reply,
          params: this.paramsOf(request),
          query: this.queryOf(request),
          body: request.body ?? {},
          callerAddress: callerAddressOf(request.raw, this.cluster?.forwardSecret),
          principal: this.principals.get(request) ?? ANONYMOUS,
        };
        const answer = await spec.handler(ctx);
        // Several stations: the answer leaves once every change made so far is in etcd.
        if (this.cluster !== undefined) await this.cluster.durable();
        if (answer === null) return reply;
        await this.record(request, answer.status);
        reply.code(answer.status);
        for (const [name, value] of Object.entries(answer.headers ?? {})) reply.header(name, value);
        return answer.body === undefined ? reply.send() : reply.send(answer.body);
      },
    });
  }

  /** The route a request matched (undefined: none, the 404 handler). */
  private routeOf(request: FastifyRequest) {
    const key = (request.routeOptions.config as { ipsanRoute?: string } | undefined)?.ipsanRoute;
    return key === undefined ? undefined : this.routes.get(key);
  }

  private paramsOf(request: FastifyRequest): string[] {
    const route = this.routeOf(request);
    const values = (request.params ?? {}) as Record<string, string | undefined>;
    return (route?.names ?? []).map((name) => values[name] ?? "");
  }

  private queryOf(request: FastifyRequest): URLSearchParams {
    const at = request.url.indexOf("?");
    return new URLSearchParams(at < 0 ? "" : request.url.slice(at + 1));
  }

  /** The caller, from the bearer token (src/station/auth/tokens.ts); or a 401 (audited). */
  private async authenticate(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    if (this.closing) throw new IpsanError("SHUTTING_DOWN", "the station is stopping");
    if (this.routeOf(request)?.spec.public === true) return;
    const header = request.headers.authorization;
    const match = typeof header === "string" ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
    const result = match === null ? ({ kind: "refused", reason: "missing bearer token" } as const) : this.tokens.authenticate(match[1] ?? "");
    if (result.kind === "ok") {
      this.principals.set(request, result.principal);
      return;
    }
    await this.record(request, 401);
    reply
      .code(401)
      .header("www-authenticate", 'Bearer realm="ipsan"')
      .send({ error: { code: "UNAUTHENTICATED", message: `${result.reason} (Authorization: Bearer TOKEN: DATA/admin.token, a token from ipsan tokens create, or a host credential)` } });
  }

  /** The permission table (auth/permissions.ts), after the body is read and before it is validated (as before fastify). */
  private authorize(request: FastifyRequest): void {
    const route = this.routeOf(request);
    if (route === undefined || route.spec.public === true) return;
    if (route.spec.body === true && request.body === undefined) request.body = {};
    const principal = this.principals.get(request);
    if (principal === undefined) throw new IpsanError("UNAUTHENTICATED", "missing bearer token");
    const store = this.station.store;
    authorize(principal, {
      method: route.spec.method,
      route: route.spec.url,
      params: this.paramsOf(request),
      query: this.queryOf(request),
      body: request.body,
      callerAddress: callerAddressOf(request.raw, this.cluster?.forwardSecret),
      assignmentHost: (id) => store.getAssignment(id)?.host,
      hostAddress: (name) => store.hosts.get(name)?.address,
      taskStarter: (id) => this.api.tasks.runner.get(id)?.startedBy,
    });
  }

  /**
   * Records a change (any method but GET/HEAD) or a refused credential (401/403)
   * in the audit log, durably, before the answer goes out.
   */
  private async record(request: FastifyRequest, status: number): Promise<void> {
    const method = request.method;
    if ((method === "GET" || method === "HEAD") && status !== 401 && status !== 403) return;
    const route = this.routeOf(request);
    const principal = this.principals.get(request);
    const action = route === undefined ? `${method} ${(request.url.split("?")[0] ?? "/").slice(0, 200)}` : `${route.spec.method} ${route.spec.url}`;
    const params = route === undefined ? [] : this.paramsOf(request);
    const ids = Object.fromEntries((route?.names ?? []).map((name, i) => [name, (params[i] ?? "").slice(0, 200)]));
    await this.audit.append({ actor: principal?.name ?? "-", role: principal?.role ?? "-", action, ids, from: callerAddressOf(request.raw, this.cluster?.forwardSecret), status });
  }

  /** The one error path: the status from the catalogue, the audit line, the body. */
  private async fail(error: unknown, request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    const answer = errorReply(error);
    if (answer.internal) log.error("request failed", { error: errorMessage(error), stack: (error as Error).stack?.split("\n")[1]?.trim() });
    if (answer.status === 413) await this.drainOversized(request, reply);
    try {
      await this.record(request, answer.status);
    } catch (auditError) {
      log.error("cannot write the audit log", { error: errorMessage(auditError) });
      return reply.code(500).send({ error: { code: "IO_ERROR", message: `the audit log cannot be written: ${errorMessage(auditError)}` } });
    }
    return reply.code(answer.status).send(answer.body);
  }

  /**
   * Before a 413 goes out, waits until the client has finished sending
   * (discarding up to BODY_DRAIN_BYTES_MAX): answering first and closing makes
   * the client's remaining writes fail with EPIPE/ECONNRESET before it reads
   * the answer. Past the cap the answer goes out and the connection is cut
   * once it is written.
   */
  private async drainOversized(request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const req = request.raw;
    reply.header("connection", "close");
    if (req.complete || req.readableEnded) return;
    const cut = await new Promise<boolean>((resolve) => {
      let drained = 0;
      req.removeAllListeners("data");
      req.on("data", (chunk: Buffer) => {
        drained += chunk.length;
        if (drained > BODY_DRAIN_BYTES_MAX) resolve(true);
      });
      req.once("end", () => resolve(false));
      req.once("error", () => resolve(true));
      req.once("close", () => resolve(true));
      req.resume();
    });
    if (cut) reply.raw.once("finish", () => req.socket.destroy());
  }

  /** 404 NOT_FOUND for an unknown path; 405 with Allow for a known path and another method. */
  private async notFound(request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    const path = request.url.split("?")[0] ?? "/";
    const allowed = [...new Set([...this.routes.values()].filter((r) => r.pattern.test(path)).map((r) => r.spec.method))];
    if (allowed.length > 0) {
      await this.record(request, 405);
      return reply
        .code(405)
        .header("allow", allowed.join(", "))
        .send({ error: { code: "INVALID_ARGUMENT", message: `method ${request.method} not allowed on ${path} (allowed: ${allowed.join(", ")})`, field: "method" } });
    }
    await this.record(request, 404);
    return reply.code(404).send({ error: { code: "NOT_FOUND", message: `no such path: ${request.method} ${path}`, field: "path" } });
  }
}
