// The project's one bounded HTTP client: one request, its whole answer read as
// it streams in and cut off at a byte limit, within a deadline. The station
// client (src/host/station_client.ts), the station's unit client
// (src/station/unit_client.ts), `ipsan unit volume` against a running unit
// and the SNMP join's info fetch all go through it, so a confused or hostile
// peer can neither hang a caller nor make it buffer without bound.
//
// node:http / node:https rather than fetch(): Node 20's fetch cannot take a CA
// of its own (the station's --ca-file), and its AbortSignal.timeout() timer is
// unref'd, so a CLI waiting on an answer could exit early. The deadline here is
// a ref'd timer that covers the whole exchange, connect to last byte.

import { Agent as HttpAgent, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage } from "node:http";
import { Agent as HttpsAgent, request as httpsRequest } from "node:https";
import { errorMessage } from "./errors.ts";

export type HttpFailure = "unreachable" | "timeout" | "too-large" | "aborted";

/** A request that got no complete answer; `failure` says why. */
export class HttpExchangeError extends Error {
  readonly failure: HttpFailure;
  /** The socket error's code (ECONNREFUSED, ...) when there is one. */
  readonly errno: string | undefined;
  /** The status line, when the answer started before it failed (too large, cut mid-answer). */
  readonly status: number | undefined;

  constructor(failure: HttpFailure, message: string, options: { errno?: string | undefined; status?: number | undefined; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? {} : { cause: options.cause });
    this.name = "HttpExchangeError";
    this.failure = failure;
    this.errno = options.errno;
    this.status = options.status;
  }
}

export interface HttpRequest {
  readonly url: URL | string;
  readonly method?: string;
  readonly headers?: Readonly<Record<string, string>>;
  /** A JSON value (sent as application/json), raw bytes, or nothing. */
  readonly json?: unknown;
  readonly body?: Buffer;
  /** Deadline for the whole exchange. */
  readonly timeoutMs: number;
  /** The most answer bytes read; past it the request fails with "too-large". */
  readonly maxBytes: number;
  /** Keep-alive agent, or one trusting a CA of its own (https). */
  readonly agent?: HttpAgent | HttpsAgent;
}

export interface HttpAnswer {
  readonly status: number;
  readonly headers: IncomingHttpHeaders;
  readonly body: Buffer;
  readonly text: () => string;
}

/** One request and its whole bounded answer. Never rejects with anything but HttpExchangeError. */
export function httpExchange(request: HttpRequest): Promise<HttpAnswer> {
  const url = typeof request.url === "string" ? new URL(request.url) : request.url;
  const headers: Record<string, string> = { ...request.headers };
  let payload = request.body;
  if (request.json !== undefined) {
    payload = Buffer.from(JSON.stringify(request.json), "utf8");
    headers["content-type"] ??= "application/json";
  }
  if (payload !== undefined) headers["content-length"] = String(payload.length);
  const where = `${request.method ?? "GET"} ${url.origin}${url.pathname}`;
  return new Promise((resolve, reject) => {
    let settled = false;
    let status: number | undefined;
    const finish = (error: HttpExchangeError | null, answer?: HttpAnswer): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (error === null) resolve(answer as HttpAnswer);
      else {
        req.destroy();
        reject(error);
      }
    };
    const onResponse = (res: IncomingMessage): void => {
      status = res.statusCode ?? 0;
      const declared = Number(res.headers["content-length"] ?? "0");
      if (declared > request.maxBytes) {
        finish(new HttpExchangeError("too-large", `${where}: answer of ${declared} bytes is over ${request.maxBytes}`, { status }));
        return;
      }
      const chunks: Buffer[] = [];
      let total = 0;
      res.on("data", (chunk: Buffer) => {
        total += chunk.length;
        if (total > request.maxBytes) {
          finish(new HttpExchangeError("too-large", `${where}: answer over ${request.maxBytes} bytes`, { status }));
          return;
        }
        chunks.push(chunk);
      });
      res.on("end", () => {
        const body = Buffer.concat(chunks);
        finish(null, { status: status ?? 0, headers: res.headers, body, text: () => body.toString("utf8") });
      });
      res.on("error", (error) => finish(new HttpExchangeError("aborted", `${where}: answer cut off (${errorMessage(error)})`, { status, cause: error })));
      res.on("aborted", () => finish(new HttpExchangeError("aborted", `${where}: the peer closed the connection mid-answer`, { status })));
    };
    const options = { method: request.method ?? "GET", headers, ...(request.agent === undefined ? {} : { agent: request.agent }) };
    const req = url.protocol === "https:" ? httpsRequest(url, options, onResponse) : httpRequest(url, options, onResponse);
    const timer = setTimeout(
      () => finish(new HttpExchangeError("timeout", `${where}: no answer within ${request.timeoutMs} ms`, status === undefined ? {} : { status })),
      request.timeoutMs,
    );
    req.on("error", (error: NodeJS.ErrnoException) => {
      const errno = error.code;
      finish(
        new HttpExchangeError(status === undefined ? "unreachable" : "aborted", `${where}: ${errno ?? ""}${errno === undefined ? "" : ": "}${errorMessage(error)}`, {
          ...(errno === undefined ? {} : { errno }),
          ...(status === undefined ? {} : { status }),
          cause: error,
        }),
      );
    });
    req.end(payload);
  });
}

/** The answer as JSON: undefined for an empty body; throws SyntaxError for a body that is not JSON. */
export function answerJson(answer: HttpAnswer): unknown {
  const text = answer.text();
  return text === "" ? undefined : (JSON.parse(text) as unknown);
}
