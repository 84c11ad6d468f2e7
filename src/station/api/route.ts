// What a route module sees of the station API server: the parts of the
// station it calls, and `add` to declare a route (method, path, TypeBox
// schemas, handler). The server does everything else once for every route:
// authentication, authorization (auth/permissions.ts), validation against the
// schemas, the audit line and the error body.

import type { ServerResponse } from "node:http";
import type { FastifyReply, FastifyRequest, FastifySchema } from "fastify";
import type { Station } from "../station.ts";
import type { AuditLog } from "../auth/audit.ts";
import type { Principal, TokenStore } from "../auth/tokens.ts";
import type { LegReports } from "../leg_reports.ts";
import type { StationTasks } from "../tasks/operations.ts";
import type { TaskRecord } from "../tasks/types.ts";
import { IpsanError } from "../../util/errors.ts";
import type { StationStore } from "../store.ts";
import { invalid, show } from "../validate.ts";
import { LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX } from "./limits.ts";

export interface Context {
  readonly request: FastifyRequest;
  readonly reply: FastifyReply;
  /** The path's parameters, in the route's order (decoded). */
  readonly params: readonly string[];
  /** The query string as sent (already checked against the route's querystring schema). */
  readonly query: URLSearchParams;
  /** The parsed JSON body ({} when none), already checked against the route's body schema. */
  readonly body: unknown;
  readonly callerAddress: string;
  /** Who is calling: already authorized for this route. */
  readonly principal: Principal;
}

export interface Answer {
  readonly status: number;
  readonly body?: unknown;
  readonly headers?: Readonly<Record<string, string>>;
}

/** null: the handler answered itself (a stream, or text). */
export type Handler = (ctx: Context) => Promise<Answer | null> | Answer | null;

export interface RouteSpec {
  readonly method: "GET" | "POST" | "PUT" | "DELETE";
  /** e.g. "/api/v1/assignments/:id": the key of the permission table and the audit's action. */
  readonly url: string;
  /** Summary, params, querystring, body, response: TypeBox schemas (the OpenAPI document is made of them). */
  readonly schema: FastifySchema & { summary: string; description?: string; produces?: string[]; hide?: boolean };
  /** Reads a JSON body ({} when there is none). */
  readonly body?: boolean;
  /** Served without a token (the console's static files). */
  readonly public?: boolean;
  readonly handler: Handler;
}

/** Open event streams, each with the credential that opened it (revoking it ends them). */
export type Subscribers = Map<ServerResponse, string>;

export interface Api {
  readonly station: Station;
  readonly tokens: TokenStore;
  readonly audit: AuditLog;
  readonly legReports: LegReports;
  readonly subscribers: Subscribers;
  readonly extraMetrics: (() => string) | undefined;
  readonly consoleDir: string;
  /** The station's tasks (src/station/tasks): every state-changing route runs as one. */
  readonly tasks: StationTasks;
  /** How long a route waits for its task before answering 202 (TASK_WAIT_MS). */
  readonly taskWaitMs: number;
  /** Several stations (issue 11): who leads, for GET /api/v1/health; undefined for a single station. */
  readonly clusterHealth: (() => { leader: boolean; leaderUrl: string | null }) | undefined;
  /** Several stations: resolves once every change committed so far is in etcd (what an event must wait for). */
  readonly clusterDurable: (() => Promise<void>) | undefined;
  add(spec: RouteSpec): void;
  /** A state-changing route's answer: its task's (src/station/tasks/answer.ts), honouring Prefer: respond-async. */
  answerTask(ctx: Context, task: TaskRecord): Promise<Answer>;
}

export function queryFlag(query: URLSearchParams, key: string): boolean {
  const value = query.get(key);
  if (value === null) return false;
  if (value === "true" || value === "1" || value === "") return true;
  if (value === "false" || value === "0") return false;
  throw invalid(key, `expected true or false, got ${show(value)}`);
}

/** A page of a listing: ?offset=N&limit=M (default LIST_LIMIT_DEFAULT, at most LIST_LIMIT_MAX). */
export function page(query: URLSearchParams): { offset: number; limit: number } {
  const read = (key: string, fallback: number, max: number): number => {
    const value = query.get(key);
    if (value === null) return fallback;
    if (!/^[0-9]{1,9}$/.test(value) || Number(value) > max) throw invalid(key, `expected a whole number 0..${max}, got ${show(value)}`);
    return Number(value);
  };
  return { offset: read("offset", 0, 1e9), limit: read("limit", LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX) };
}

/** {items, total, offset, nextOffset}: nextOffset is null on the last page. */
export function paged<T, U>(all: readonly T[], range: { offset: number; limit: number }, view: (item: T) => U) {
  const items = all.slice(range.offset, range.offset + range.limit).map(view);
  const next = range.offset + items.length;
  return { items, total: all.length, offset: range.offset, nextOffset: next < all.length ? next : null };
}

/** An optional body field: absent and null mean the same. */
export function given<T>(value: T | null | undefined): value is T {
  return value !== undefined && value !== null;
}

/** The unit named, or 404 naming the field `unit`. */
export function unitOrNotFound(store: StationStore, name: string) {
  const unit = store.units.get(name);
  if (unit === undefined) throw new IpsanError("NOT_FOUND", `unit ${show(name)} not found`, { field: "unit" });
  return unit;
}

/** The host a volume is assigned to (its first live assignment), or null. */
export function assignedHost(store: StationStore, unit: string, volume: string): string | null {
  return store.liveOnVolume(unit, volume)[0]?.host ?? null;
}
