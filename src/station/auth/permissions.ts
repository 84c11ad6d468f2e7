// Who may call which route of the station's API: one declarative table
// (route -> roles, plus how a host credential is confined to its own
// records), and one function that applies it to a request. The HTTP layer
// calls `authorize` after it has matched the route and read the body, before
// the handler runs; a fastify preHandler hook can call it the same way.
// docs/api.md "Authentication" lists the same table for users.

import { IpsanError } from "../../util/errors.ts";
import type { Principal, Role } from "./tokens.ts";

type RoleList = readonly Role[];

const ALL: RoleList = ["admin", "operator", "viewer", "host"];
const READERS: RoleList = ["admin", "operator", "viewer"];
const WRITERS: RoleList = ["admin", "operator"];
const ADMIN: RoleList = ["admin"];

/**
 * How a host credential (role host, bound to host H) is confined:
 * - "name": the route's first parameter is a host name, and must be H;
 * - "query": a listing, whose ?host= must be H;
 * - "body": a request whose body's `host` must be H;
 * - "assignment": the route's first parameter is an assignment id, whose host must be H.
 * A route without `host` is refused to every host credential.
 */
export type HostScope = "name" | "query" | "body" | "assignment";

export interface Permission {
  /** Roles allowed (a host credential also needs `host`). */
  readonly roles: RoleList;
  readonly host?: HostScope;
}

/** The table: "METHOD /route/:pattern" as http.ts declares each route. */
export const PERMISSIONS: Readonly<Record<string, Permission>> = {
  "GET /api/v1/health": { roles: ALL },
  "GET /api/v1/openapi.json": { roles: ALL },
  "GET /api/v1/whoami": { roles: ALL },
  "GET /metrics": { roles: READERS },
  "GET /api/v1/events": { roles: READERS },
  "GET /api/v1/units": { roles: READERS },
  "GET /api/v1/units/:name": { roles: READERS },
  "POST /api/v1/units/:name/refresh": { roles: WRITERS },
  // A unit's identity (never its secret) is read like the pool; forgetting it or rotating its secret is the admin's (keys).
  "GET /api/v1/units/:name/identity": { roles: READERS },
  "DELETE /api/v1/units/:name/identity": { roles: ADMIN },
  "POST /api/v1/units/:name/rotate-secret": { roles: ADMIN },
  "GET /api/v1/volumes": { roles: READERS },
  "GET /api/v1/volumes/:unit/:name": { roles: READERS },
  "POST /api/v1/volumes": { roles: WRITERS },
  "DELETE /api/v1/volumes/:unit/:name": { roles: WRITERS },
  "POST /api/v1/volumes/:unit/:name/grow": { roles: WRITERS },
  "PUT /api/v1/volumes/:unit/:name/partitions": { roles: WRITERS },
  "GET /api/v1/hosts": { roles: READERS },
  "GET /api/v1/hosts/:name": { roles: ALL, host: "name" },
  // A host credential may heartbeat and set its spare flag, never move its address (checked below).
  "PUT /api/v1/hosts/:name": { roles: ["admin", "operator", "host"], host: "name" },
  "POST /api/v1/hosts/:name/heartbeat": { roles: ["admin", "operator", "host"], host: "name" },
  // Enrolment: a join token (or an admin acting for a host).
  "POST /api/v1/hosts/:name/register": { roles: ["admin", "join"] },
  // A host's NBD keys (host_keys.ts): the host's own, and the admin's; operators and viewers hold no keys.
  "GET /api/v1/hosts/:name/keys": { roles: ["admin", "host"], host: "name" },
  "POST /api/v1/hosts/:name/rotate-key": { roles: ["admin", "host"], host: "name" },
  "GET /api/v1/assignments": { roles: ALL, host: "query" },
  "GET /api/v1/assignments/:id": { roles: ALL, host: "assignment" },
  "POST /api/v1/allocations": { roles: ["admin", "operator", "host"], host: "body" },
  "POST /api/v1/assignments": { roles: WRITERS },
  "PUT /api/v1/assignments/:id/legs": { roles: ["admin", "operator", "host"], host: "assignment" },
  "DELETE /api/v1/assignments/:id": { roles: ["admin", "operator", "host"], host: "assignment" },
  "GET /api/v1/tokens": { roles: ADMIN },
  "POST /api/v1/tokens": { roles: ADMIN },
  "DELETE /api/v1/tokens/:name": { roles: ADMIN },
  "POST /api/v1/join-tokens": { roles: ADMIN },
  "GET /api/v1/audit": { roles: ADMIN },
  "GET /api/v1/audit/verify": { roles: ADMIN },
};

/**
 * A route not in the table: under /api/v1/hosts/:name/ (a host's own records,
 * e.g. its keys) the admin and that host; anything else the admin only.
 */
export const HOST_SUBTREE: Permission = { roles: ["admin", "host"], host: "name" };
const DEFAULT: Permission = { roles: ADMIN };

export function permissionFor(method: string, route: string): Permission {
  const rule = PERMISSIONS[`${method} ${route}`];
  if (rule !== undefined) return rule;
  if (/^\/api\/v1\/hosts\/:[a-z]+\/./.test(route)) return HOST_SUBTREE;
  return DEFAULT;
}

/** What authorize needs to know of a request and of the station's records. */
export interface AccessRequest {
  readonly method: string;
  /** The route's pattern, e.g. "/api/v1/assignments/:id". */
  readonly route: string;
  readonly params: readonly string[];
  readonly query: URLSearchParams;
  readonly body: unknown;
  readonly callerAddress: string;
  /** The host an assignment belongs to (undefined: no such assignment). */
  assignmentHost(id: string): string | undefined;
  /** A host's registered address (undefined: not registered). */
  hostAddress(name: string): string | undefined;
}

function denied(principal: Principal, what: string): IpsanError {
  const who = principal.role === "host" ? `role host (credential ${principal.name})` : `role ${principal.role} (token ${principal.name})`;
  return new IpsanError("PERMISSION_DENIED", `${who} may not ${what}`);
}

/** Throws PERMISSION_DENIED (naming the role) unless `principal` may make `request`. */
export function authorize(principal: Principal, request: AccessRequest): void {
  const rule = permissionFor(request.method, request.route);
  const action = `${request.method} ${request.route}`;
  if (!rule.roles.includes(principal.role)) {
    throw denied(principal, `${action} (allowed: ${rule.roles.filter((r) => r !== "join").join(", ")})`);
  }
  if (principal.role !== "host") return;
  const own = principal.host;
  if (own === null || rule.host === undefined) throw denied(principal, action);
  switch (rule.host) {
    case "name": {
      const name = request.params[0];
      if (name !== own) throw denied(principal, `${action} for host ${String(name)}: only its own host ${own}`);
      if (request.method === "PUT" || request.method === "POST") checkAddressKept(principal, request, own);
      return;
    }
    case "query": {
      const host = request.query.get("host");
      if (host !== own) throw denied(principal, `list ${host === null ? "every host's" : `host ${host}'s`} assignments: only its own (?host=${own})`);
      return;
    }
    case "body": {
      const host = (request.body as { host?: unknown } | null | undefined)?.host;
      // A body without a string host is the handler's 400, naming the field.
      if (typeof host === "string" && host !== own) throw denied(principal, `${action} for host ${host}: only for its own host ${own}`);
      // An allocation's `address` would move the host's registered address too.
      checkAddressKept(principal, request, own);
      return;
    }
    case "assignment": {
      const id = request.params[0] ?? "";
      const holder = request.assignmentHost(id);
      // No such assignment: the handler answers 404 as to anyone else.
      if (holder !== undefined && holder !== own) throw denied(principal, `${action} on assignment ${id}: it is not host ${own}'s`);
      return;
    }
  }
}

/** A host credential never moves its host's registered address (the data path follows it). */
function checkAddressKept(principal: Principal, request: AccessRequest, host: string): void {
  const registered = request.hostAddress(host);
  if (registered === undefined) return;
  const body = request.body as { address?: unknown } | null | undefined;
  const route = request.route;
  // PUT without an address means "the caller's address" (docs/api.md); a heartbeat or an allocation without one changes nothing.
  const keeps = route.endsWith("/heartbeat") || route === "/api/v1/allocations";
  const wanted = body?.address !== undefined ? body.address : keeps ? registered : request.callerAddress;
  if (wanted !== registered) {
    throw denied(principal, `change host ${host}'s registered address (${registered} -> ${String(wanted)}); an admin or operator can`);
  }
}
