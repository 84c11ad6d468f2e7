// The HTTP socket of a station that is one of several (issue 11). It is
// bound at start and stays bound whoever leads:
//   - while this station leads, every request goes to the station proper (the
//     API's fastify handler, src/station/api/server.ts);
//   - otherwise GET /api/v1/health is answered here ({leader: false,
//     leaderUrl, problem}) and every other request is forwarded, as it came,
//     to the leader, with the caller's address in FORWARDED_FOR_HEADER and
//     the cluster's forward secret (shared through etcd) so that the leader
//     believes it; the leader's answer (an event stream included) is relayed;
//   - with no leader known: 503 UNAVAILABLE, saying why, and the client
//     (src/host/station_client.ts) tries another station; a forwarded
//     request that fails after it may have reached the leader answers 502
//     (not tried elsewhere blindly: it may have made its change).

import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createHttpsServer, request as httpsRequest } from "node:https";
import { rootCertificates } from "node:tls";
import type { AddressInfo, Socket } from "node:net";
import { errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import {
  FORWARD_SECRET_HEADER,
  FORWARDED_FOR_HEADER,
  HTTP_CONNECTIONS_MAX,
  HTTP_HEADERS_TIMEOUT_MS,
  HTTP_KEEP_ALIVE_TIMEOUT_MS,
  HTTP_REQUEST_TIMEOUT_MS,
  VERSION,
} from "../api/server.ts";

const log = logger("station-front");

/** How long a forwarded request may wait for the leader to accept the connection and answer its headers. */
export const FORWARD_HEADERS_TIMEOUT_MS = 30_000;
/** Errors that mean the forwarded request never left this station. */
const NOT_CONNECTED = new Set(["ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN"]);
/** Headers not passed on (hop by hop, and the forwarding headers a client might fake). */
const HOP_HEADERS = new Set(["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host", FORWARDED_FOR_HEADER, FORWARD_SECRET_HEADER]);

export interface FrontServerOptions {
  readonly tls: { cert: Buffer; key: Buffer } | undefined;
  readonly forwardSecret: Buffer;
  /** The station proper's handler while this station leads, else null. */
  readonly leaderHandler: () => ((req: IncomingMessage, res: ServerResponse) => void) | null;
  readonly status: () => { leaderUrl: string | null; problem: string | null; role: string };
  readonly ownUrl: () => string;
}

export class FrontServer {
  private readonly server: Server;
  private readonly options: FrontServerOptions;
  private readonly sockets = new Set<Socket>();

  constructor(options: FrontServerOptions) {
    this.options = options;
    const route = (req: IncomingMessage, res: ServerResponse): void => this.route(req, res);
    this.server = options.tls === undefined ? createServer(route) : createHttpsServer({ cert: options.tls.cert, key: options.tls.key }, route);
    this.server.headersTimeout = HTTP_HEADERS_TIMEOUT_MS;
    this.server.requestTimeout = HTTP_REQUEST_TIMEOUT_MS;
    this.server.keepAliveTimeout = HTTP_KEEP_ALIVE_TIMEOUT_MS;
    this.server.maxConnections = HTTP_CONNECTIONS_MAX;
    this.server.on("connection", (socket: Socket) => {
      this.sockets.add(socket);
      socket.once("close", () => this.sockets.delete(socket));
    });
  }

  async listen(host: string, port: number): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen({ host, port, exclusive: true }, () => {
        this.server.off("error", reject);
        resolve();
      });
    });
    return this.server.address() as AddressInfo;
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeIdleConnections();
    const force = setTimeout(() => {
      for (const socket of this.sockets) socket.destroy();
    }, 2_000);
    await closed;
    clearTimeout(force);
  }

  private route(req: IncomingMessage, res: ServerResponse): void {
    const leader = this.options.leaderHandler();
    if (leader !== null) {
      leader(req, res);
      return;
    }
    const status = this.options.status();
    const path = (req.url ?? "/").split("?")[0];
    if (req.method === "GET" && path === "/api/v1/health") {
      answer(res, 200, {
        status: status.leaderUrl === null ? "degraded" : "ok",
        reasons: status.leaderUrl === null ? [`no station leads: ${status.problem ?? "an election is under way"}`] : [],
        reasonsTotal: status.leaderUrl === null ? 1 : 0,
        version: VERSION,
        leader: false,
        leaderUrl: status.leaderUrl,
        role: status.role,
        ...(status.problem === null ? {} : { problem: status.problem }),
      });
      return;
    }
    if (status.leaderUrl === null || status.leaderUrl === this.options.ownUrl()) {
      unavailable(res, `no station leads at the moment (${status.problem ?? "an election is under way"}); retry in a few seconds or call another station`);
      req.resume();
      return;
    }
    this.forward(req, res, status.leaderUrl);
  }

  private forward(req: IncomingMessage, res: ServerResponse, leaderUrl: string): void {
    const target = new URL(req.url ?? "/", leaderUrl);
    const headers: Record<string, string | string[]> = {};
    for (const [name, value] of Object.entries(req.headers)) {
      if (value !== undefined && !HOP_HEADERS.has(name)) headers[name] = value;
    }
    headers[FORWARDED_FOR_HEADER] = (req.socket.remoteAddress ?? "").replace(/^::ffff:/, "");
    headers[FORWARD_SECRET_HEADER] = this.options.forwardSecret.toString("utf8");
    const where = { host: target.hostname.replace(/^\[|\]$/g, ""), port: target.port, path: target.pathname + target.search, method: req.method, headers };
    // An https:// leader is verified against the system's CAs and the certificates in this station's own --tls-cert
    // file (one certificate for every station, or certificates of one CA whose root is in that file).
    const outgoing =
      target.protocol === "https:"
        ? httpsRequest({ ...where, ca: [...rootCertificates, ...(this.options.tls === undefined ? [] : [this.options.tls.cert.toString("utf8")])] })
        : httpRequest(where);
    let connected = false;
    // Connected: the request can have been sent (after the TLS handshake for https; a reused socket is connected).
    outgoing.on("socket", (socket: Socket) => {
      if (!socket.connecting && (target.protocol !== "https:" || (socket as Socket & { encrypted?: boolean; authorized?: boolean }).authorized === true)) connected = true;
      else socket.once(target.protocol === "https:" ? "secureConnect" : "connect", () => (connected = true));
    });
    const timer = setTimeout(() => outgoing.destroy(new Error(`the leader did not answer within ${FORWARD_HEADERS_TIMEOUT_MS} ms`)), FORWARD_HEADERS_TIMEOUT_MS);
    outgoing.on("response", (incoming) => {
      clearTimeout(timer);
      const relayed: Record<string, string | string[]> = {};
      for (const [name, value] of Object.entries(incoming.headers)) {
        if (value !== undefined && !HOP_HEADERS.has(name)) relayed[name] = value;
      }
      res.writeHead(incoming.statusCode ?? 502, relayed);
      incoming.pipe(res);
      res.once("close", () => incoming.destroy());
    });
    outgoing.on("error", (error) => {
      clearTimeout(timer);
      log.limited("forward", "cannot forward a request to the leader", { leader: leaderUrl, error: errorMessage(error) });
      if (res.headersSent) {
        res.destroy();
        return;
      }
      // 503 only when the request surely never reached the leader (clients then try another station);
      // once it may have, 502: a change may have been made (retry with the same request id).
      const code = (error as NodeJS.ErrnoException).code ?? "";
      if (!connected || NOT_CONNECTED.has(code)) unavailable(res, `cannot reach the leading station ${leaderUrl}: ${errorMessage(error)}; retry, or call another station`);
      else answer(res, 502, { error: { code: "UNAVAILABLE", message: `the leading station ${leaderUrl} did not answer (${errorMessage(error)}): the request may have reached it; retry with the same request id, or read back what it changed` } });
    });
    res.once("close", () => {
      if (!outgoing.writableFinished) outgoing.destroy();
    });
    req.pipe(outgoing);
  }
}

function answer(res: ServerResponse, status: number, body: unknown): void {
  const text = `${JSON.stringify(body)}\n`;
  res.writeHead(status, { "content-type": "application/json; charset=utf-8", "content-length": Buffer.byteLength(text), "cache-control": "no-store" });
  res.end(text);
}

function unavailable(res: ServerResponse, message: string): void {
  answer(res, 503, { error: { code: "UNAVAILABLE", message } });
}
