// Credentials and the audit log (docs/api.md "Authentication"; src/station/auth).

import { Type, type Static } from "@sinclair/typebox";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { parseDuration } from "../../util/duration.ts";
import { AUDIT_LIST_LIMIT_DEFAULT, AUDIT_LIST_LIMIT_MAX, tailEntries, verifyAuditFile } from "../auth/audit.ts";
import { ADMIN_TOKEN_NAME, JOIN_TOKEN_TTL_MS_DEFAULT, JOIN_TOKEN_TTL_MS_MAX, TOKEN_ROLES, tokenView, type TokenRole } from "../auth/tokens.ts";
import { checkName, invalid, show } from "../validate.ts";
import { given, type Api } from "./route.ts";
import { AuditEntry, Enum, Errors, List, Name, NoContent, NoQuery, Optional, Params, Ref, Token } from "./schemas.ts";

export const CreateToken = Type.Object({ name: Name, role: Enum(TOKEN_ROLES) }, { additionalProperties: false });
export const CreateJoinToken = Type.Object(
  {
    host: Optional({ ...Name, description: "only this host may register with it" }),
    expires: Optional(Type.String({ description: "how long it is valid: 30m, 2h (default 1h, at most 7 days)" })),
  },
  { additionalProperties: false },
);
const AuditQuery = Type.Object(
  { limit: Type.Optional(Type.String({ pattern: "^[0-9]{1,6}$", description: `how many (default ${AUDIT_LIST_LIMIT_DEFAULT}, at most ${AUDIT_LIST_LIMIT_MAX})` })) },
  { additionalProperties: false },
);
const WithSecret = Type.Intersect([Ref(Token), Type.Object({ token: Type.String({ description: "the secret: shown this once" }) }, { additionalProperties: true })], {
  description: "created",
});

export function accessRoutes(api: Api): void {
  const { tokens, audit, subscribers } = api;

  api.add({
    method: "GET",
    url: "/api/v1/tokens",
    schema: { summary: "Every credential (named tokens, host credentials, join tokens), never a secret (admin)", querystring: NoQuery, response: { 200: List(Token), ...Errors() } },
    handler: () => ({ status: 200, body: { items: tokens.list().map(tokenView) } }),
  });
  api.add({
    method: "POST",
    url: "/api/v1/tokens",
    body: true,
    schema: { summary: "Create a named token with a role (admin); the answer holds its secret, once", body: CreateToken, response: { 201: WithSecret, ...Errors({ 409: "the name is taken" }) } },
    handler: ({ body }) => {
      const b = body as Static<typeof CreateToken>;
      const name = checkName(b.name, "name");
      if (!(TOKEN_ROLES as readonly unknown[]).includes(b.role)) throw invalid("role", `expected one of ${TOKEN_ROLES.join(", ")}, got ${show(b.role)}`);
      const { record, secret } = tokens.create(name, b.role as TokenRole);
      return { status: 201, body: { ...tokenView(record), token: secret } };
    },
  });
  api.add({
    method: "DELETE",
    url: "/api/v1/tokens/:name",
    schema: {
      summary: "Revoke a credential (admin): refused from the next request on",
      params: Params("name"),
      response: { 204: NoContent("revoked"), ...Errors({ 404: "no such token", 409: "admin: DATA/admin.token is changed by replacing the file" }) },
    },
    handler: ({ params }) => {
      const name = params[0] ?? "";
      if (name === ADMIN_TOKEN_NAME) {
        throw new IpsanError("CONFLICT", "the admin token is DATA/admin.token: replace that file and restart the station to change it", { field: "name" });
      }
      if (!tokens.revoke(name)) throw new IpsanError("NOT_FOUND", `no token named ${show(name)}`, { field: "name" });
      // Its open event streams end too: a revoked credential reads nothing more.
      for (const [stream, opener] of subscribers) if (opener === name) stream.end();
      return { status: 204 };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/join-tokens",
    body: true,
    schema: { summary: "A one-time join token for ipsan host register (admin)", body: CreateJoinToken, response: { 201: WithSecret, ...Errors() } },
    handler: ({ body }) => {
      const b = body as Static<typeof CreateJoinToken>;
      const host = given(b.host) ? checkName(b.host, "host") : null;
      let ttlMs = JOIN_TOKEN_TTL_MS_DEFAULT;
      if (given(b.expires)) {
        try {
          ttlMs = parseDuration(b.expires, "expires");
        } catch (error) {
          throw invalid("expires", errorMessage(error));
        }
        if (ttlMs > JOIN_TOKEN_TTL_MS_MAX) throw invalid("expires", `at most 7 days, got ${show(b.expires)}`);
      }
      const { record, secret } = tokens.createJoin(host, ttlMs);
      return { status: 201, body: { ...tokenView(record), token: secret } };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/audit",
    schema: { summary: "The last entries of DATA/audit.log, oldest first (admin)", querystring: AuditQuery, response: { 200: List(AuditEntry), ...Errors() } },
    handler: async ({ query }) => {
      const text = query.get("limit");
      if (text !== null && (!/^[0-9]{1,6}$/.test(text) || Number(text) < 1 || Number(text) > AUDIT_LIST_LIMIT_MAX)) {
        throw invalid("limit", `expected a whole number 1..${AUDIT_LIST_LIMIT_MAX}, got ${show(text)}`);
      }
      return { status: 200, body: { items: await tailEntries(audit.path, text === null ? AUDIT_LIST_LIMIT_DEFAULT : Number(text)) } };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/audit/verify",
    schema: {
      summary: "Check DATA/audit.log's hash chain (admin)",
      querystring: NoQuery,
      response: {
        200: Type.Object(
          {
            ok: Type.Boolean(),
            entries: Type.Optional(Type.Integer({ description: "entries checked and intact" })),
            line: Type.Optional(Type.Integer({ description: "not ok: the first bad line (1-based)" })),
            seq: Type.Optional(Type.Union([Type.Integer(), Type.Null()])),
            reason: Type.Optional(Type.String()),
            file: Type.String(),
          },
          { additionalProperties: true, description: "verdict" },
        ),
        ...Errors(),
      },
    },
    handler: async () => ({ status: 200, body: { file: audit.path, ...(await verifyAuditFile(audit.path, audit.head)) } }),
  });
}
