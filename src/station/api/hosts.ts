// Hosts: registry, heartbeat, enrolment with a join token, NBD keys (docs/api.md "Hosts").

import { Type, type Static } from "@sinclair/typebox";
import { IpsanError } from "../../util/errors.ts";
import { HOST_STATES } from "../types.ts";
import { ISCSI_NAME_BYTES_MAX } from "../../iscsi/names.ts";
import { checkAddress, checkBoolean, checkIqn, checkName, show } from "../validate.ts";
import { hostView } from "../views.ts";
import { tokenView } from "../auth/tokens.ts";
import { given, type Api } from "./route.ts";
import { Enum, Errors, Host, List, NoBody, NoContent, NoQuery, Optional, Params, Ref, Token } from "./schemas.ts";

const HostQuery = Type.Object({ state: Type.Optional(Enum(HOST_STATES, { description: "online or offline" })) }, { additionalProperties: false });
const Address = Type.String({ description: "IP address or DNS name" });
const IqnField = Type.String({
  maxLength: ISCSI_NAME_BYTES_MAX,
  description: "the host's iSCSI initiator name (iqn., eui. or naa. form, lowercase): needed for protocol iscsi; \"\" removes it; omitted: unchanged",
});
export const PutHost = Type.Object(
  {
    address: Optional({ ...Address, description: "IP address or DNS name (default: the caller's address)" }),
    spare: Optional(Type.Boolean({ description: "a spare host (failover target); omitted: unchanged (false for a new host)" })),
    iqn: Optional(IqnField),
  },
  { additionalProperties: false },
);
export const Heartbeat = Type.Object({ address: Optional(Address), iqn: Optional(IqnField) }, { additionalProperties: false });
const Keys = Type.Object(
  {
    host: Type.String(),
    keyEpoch: Type.Integer(),
    items: Type.Array(
      Type.Object(
        {
          unit: Type.String(),
          identity: Type.String(),
          key: Type.String({ description: "64 hex digits" }),
          tls: Type.Union([Enum(["off", "on", "require"]), Type.Null()]),
        },
        { additionalProperties: true },
      ),
    ),
  },
  { additionalProperties: true },
);

export function hostRoutes(api: Api): void {
  const { station, tokens } = api;
  const store = station.store;
  const hostOr404 = (name: string) => {
    const host = store.hosts.get(name);
    if (host === undefined) throw new IpsanError("NOT_FOUND", `host ${show(name)} not found`, { field: "host" });
    return host;
  };

  api.add({
    method: "GET",
    url: "/api/v1/hosts",
    schema: { summary: "Registered hosts", querystring: HostQuery, response: { 200: List(Host), ...Errors() } },
    handler: ({ query }) => {
      const state = query.get("state");
      const items = [...store.hosts.values()]
        .sort((a, b) => (a.name < b.name ? -1 : 1))
        .map((h) => hostView(h, station.hostStateOf(h.name)))
        .filter((h) => state === null || h.state === state);
      return { status: 200, body: { items } };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/hosts/:name",
    schema: { summary: "One host", params: Params("name"), querystring: NoQuery, response: { 200: Ref(Host), ...Errors({ 404: "no such host" }) } },
    handler: ({ params }) => {
      const name = checkName(params[0], "host");
      return { status: 200, body: hostView(hostOr404(name), station.hostStateOf(name)) };
    },
  });
  api.add({
    method: "PUT",
    url: "/api/v1/hosts/:name",
    body: true,
    schema: {
      summary: "Register a host or change its data-path address (default: the caller's address); spare: true registers a spare host; iqn: its iSCSI initiator name",
      params: Params("name"),
      body: PutHost,
      response: { 200: Ref(Host, "updated"), 201: Ref(Host, "registered"), ...Errors() },
    },
    handler: async ({ params, body, callerAddress }) => {
      const b = body as Static<typeof PutHost>;
      const name = checkName(params[0], "host");
      const address = given(b.address) ? await checkAddress(b.address, "address") : callerAddress;
      const spare = given(b.spare) ? checkBoolean(b.spare, "spare") : undefined;
      const iqn = given(b.iqn) ? checkIqn(b.iqn, "iqn") : undefined;
      const { created } = await station.putHost(name, address, spare, iqn);
      const host = store.hosts.get(name);
      return { status: created ? 201 : 200, body: host === undefined ? null : hostView(host, station.hostStateOf(name)) };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/hosts/:name/heartbeat",
    body: true,
    schema: { summary: "The host is alive", params: Params("name"), body: Heartbeat, response: { 204: NoContent("noted"), ...Errors({ 404: "no such host" }) } },
    handler: async ({ params, body }) => {
      const b = body as Static<typeof Heartbeat>;
      const name = checkName(params[0], "host");
      const address = given(b.address) ? await checkAddress(b.address, "address") : undefined;
      const iqn = given(b.iqn) ? checkIqn(b.iqn, "iqn") : undefined;
      const host = store.hosts.get(name);
      if (host === undefined) throw new IpsanError("NOT_FOUND", `host ${show(name)} not found: register it first (PUT /api/v1/hosts/${name})`, { field: "host" });
      const iqnChanged = iqn !== undefined && iqn !== (host.iqn ?? null);
      if ((address !== undefined && address !== host.address) || iqnChanged) await station.putHost(name, address ?? host.address, undefined, iqn);
      else station.heartbeat(name);
      return { status: 204 };
    },
  });
  // The host's NBD keys (TLS-PSK, one per unit it holds a volume on): for the host itself (or an admin acting for it).
  api.add({
    method: "GET",
    url: "/api/v1/hosts/:name/keys",
    schema: {
      summary: "The host's NBD TLS-PSK keys: one per unit holding a volume of its live assignments (identity = host name; a file line is IDENTITY:KEY)",
      params: Params("name"),
      querystring: NoQuery,
      response: { 200: Keys, ...Errors({ 404: "no such host" }) },
    },
    handler: ({ params }) => {
      const name = checkName(params[0], "host");
      const host = hostOr404(name);
      return { status: 200, body: { host: name, keyEpoch: host.keyEpoch ?? 0, items: station.hostKeys(name) } };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/hosts/:name/rotate-key",
    body: true,
    schema: {
      summary: "New NBD keys for every unit of this host (the units get them at once; the host's agent fetches them)",
      params: Params("name"),
      body: NoBody,
      response: { 200: Type.Object({ host: Type.String(), keyEpoch: Type.Integer() }, { additionalProperties: true }), ...Errors({ 404: "no such host" }) },
    },
    handler: async ({ params }) => {
      const name = checkName(params[0], "host");
      hostOr404(name);
      return { status: 200, body: { host: name, ...(await station.rotateHostKey(name)) } };
    },
  });
  const Registered = Type.Object(
    { host: Type.Union([Ref(Host), Type.Null()]), credential: Ref(Token), token: Type.String({ description: "the host credential's secret: shown this once" }) },
    { additionalProperties: true },
  );
  api.add({
    method: "POST",
    url: "/api/v1/hosts/:name/register",
    body: true,
    schema: {
      summary: "Enrol a host with a one-time join token (or as the admin): answers the host's own credential, once",
      params: Params("name"),
      body: PutHost,
      response: { 201: { ...Registered, description: "registered" }, 200: { ...Registered, description: "registered again: a new credential, the old one stops working" }, ...Errors() },
    },
    handler: async ({ params, body, callerAddress, principal }) => {
      const b = body as Static<typeof PutHost>;
      const name = checkName(params[0], "host");
      const address = given(b.address) ? await checkAddress(b.address, "address") : callerAddress;
      const spare = given(b.spare) ? checkBoolean(b.spare, "spare") : undefined;
      const iqn = given(b.iqn) ? checkIqn(b.iqn, "iqn") : undefined;
      // The join token is checked (unused, unexpired, for this host) and spent before the host is written.
      const issued = principal.role === "join" ? tokens.register(principal.name, name) : tokens.issueHostCredential(name);
      const { created } = await station.putHost(name, address, spare, iqn);
      const host = store.hosts.get(name);
      return {
        status: created ? 201 : 200,
        body: { host: host === undefined ? null : hostView(host, station.hostStateOf(name)), credential: tokenView(issued.record), token: issued.secret },
      };
    },
  });
}
