// Units of the pool and their identities (docs/api.md "Units").

import { Type, type Static } from "@sinclair/typebox";
import { forgetIdentity, identityOf, rotateSecret } from "../unit_identities.ts";
import { UNIT_STATES } from "../types.ts";
import { checkName } from "../validate.ts";
import { unitView, volumeView } from "../views.ts";
import { assignedHost, unitOrNotFound, type Api } from "./route.ts";
import { Enum, Errors, Identity, List, NoBody, NoQuery, Params, Ref, Unit, Volume } from "./schemas.ts";

const UnitQuery = Type.Object({ state: Type.Optional(Enum(UNIT_STATES, { description: "only units in this state" })) }, { additionalProperties: false });

export function unitRoutes(api: Api): void {
  const { station } = api;
  const store = station.store;
  const unitOr404 = (name: string) => unitOrNotFound(store, name);
  const assignedTo = (unit: string, volume: string) => assignedHost(store, unit, volume);

  api.add({
    method: "GET",
    url: "/api/v1/units",
    schema: { summary: "Units in the pool", querystring: UnitQuery, response: { 200: List(Unit), ...Errors() } },
    handler: ({ query }) => {
      const state = (query.get("state") ?? undefined) as Static<typeof UnitQuery>["state"];
      const items = [...store.units.values()]
        .filter((u) => state === undefined || u.state === state)
        .sort((a, b) => (a.name < b.name ? -1 : 1))
        .map((u) => unitView(u, store.unitVolumes(u.name).size, station.usableFreeBytes(u.name)));
      return { status: 200, body: { items } };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/units/:name",
    schema: {
      summary: "One unit with its volumes",
      params: Params("name"),
      querystring: NoQuery,
      response: { 200: Type.Intersect([Ref(Unit), Type.Object({ volumes: Type.Array(Ref(Volume)) }, { additionalProperties: true })]), ...Errors({ 404: "no such unit" }) },
    },
    handler: ({ params }) => {
      const unit = unitOr404(checkName(params[0], "unit"));
      const volumes = [...store.unitVolumes(unit.name).values()].map((v) => volumeView(v, assignedTo(unit.name, v.name), store.enrolledUnitId(unit.name)));
      return { status: 200, body: { ...unitView(unit, volumes.length, station.usableFreeBytes(unit.name)), volumes } };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/units/:name/refresh",
    body: true,
    schema: {
      summary: "Read the unit's info through its control API now",
      params: Params("name"),
      body: NoBody,
      response: { 200: Ref(Unit), ...Errors({ 404: "no such unit", 503: "unit unreachable" }) },
    },
    handler: async ({ params }) => {
      const unit = unitOr404(checkName(params[0], "unit"));
      await station.refreshUnit(unit.name);
      return { status: 200, body: unitView(store.units.get(unit.name) ?? unit, store.unitVolumes(unit.name).size, station.usableFreeBytes(unit.name)) };
    },
  });
  // Unit identities (issue 7; src/station/unit_identities.ts)
  api.add({
    method: "GET",
    url: "/api/v1/units/:name/identity",
    schema: {
      summary: "The unit's enrolled identity (issue 7): its id, secret epoch and state; never the secret",
      params: Params("name"),
      querystring: NoQuery,
      response: { 200: Ref(Identity), ...Errors({ 404: "not enrolled" }) },
    },
    handler: ({ params }) => ({ status: 200, body: identityOf(station.options.unitIdentities, checkName(params[0], "unit")) }),
  });
  api.add({
    method: "POST",
    url: "/api/v1/units/:name/rotate-secret",
    body: true,
    schema: {
      summary: "Start a rotation of the unit's secret: the unit switches at its next datagram",
      params: Params("name"),
      body: NoBody,
      response: { 202: Ref(Identity, "rotation started"), ...Errors({ 404: "not enrolled", 409: "still enrolling" }) },
    },
    handler: ({ params }) => ({ status: 202, body: rotateSecret(station.options.unitIdentities, store, checkName(params[0], "unit")) }),
  });
  api.add({
    method: "DELETE",
    url: "/api/v1/units/:name/identity",
    schema: {
      summary: "Forget the unit's identity: the next unit claiming the name enrols afresh (replacing a unit whose data dir was lost)",
      params: Params("name"),
      querystring: NoQuery,
      response: {
        200: Type.Object({ unit: Type.String(), unitId: Type.String(), forgotten: Type.Boolean() }, { additionalProperties: true }),
        ...Errors({ 404: "not enrolled" }),
      },
    },
    handler: ({ params }) => ({ status: 200, body: forgetIdentity(station.options.unitIdentities, store, checkName(params[0], "unit")) }),
  });
}
