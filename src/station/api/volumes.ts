// Volumes: list, read, create, delete, grow, partition (docs/api.md "Volumes").

import { Type, type Static } from "@sinclair/typebox";
import { IpsanError } from "../../util/errors.ts";
import type { VolumeRecord } from "../types.ts";
import { checkName, checkSize, checkSizes, show } from "../validate.ts";
import { volumeView } from "../views.ts";
import { assignedHost, page, paged, queryFlag, unitOrNotFound, type Api } from "./route.ts";
import { Accepted, Errors, Flag, Name, NoBody, NoContent, NoQuery, Page, PageQuery, Params, Ref, Size, Volume } from "./schemas.ts";

const VolumeQuery = Type.Object(
  { unit: Type.Optional(Type.String({ description: "only this unit's" })), free: Flag("only unassigned ones"), ...PageQuery },
  { additionalProperties: false },
);
export const CreateVolume = Type.Object({ unit: Name, name: Name, sizeBytes: Size }, { additionalProperties: false });
export const GrowVolume = Type.Object({ sizeBytes: Size }, { additionalProperties: false, description: "the new total size" });
export const PartitionVolume = Type.Object(
  { sizesBytes: Type.Array(Size, { description: "partition sizes, back to back from the volume's start; [] = none" }) },
  { additionalProperties: false },
);

export function volumeRoutes(api: Api): void {
  const { station } = api;
  const store = station.store;
  const unitOr404 = (name: string) => unitOrNotFound(store, name);
  const assignedTo = (unit: string, volume: string) => assignedHost(store, unit, volume);

  api.add({
    method: "GET",
    url: "/api/v1/volumes",
    schema: { summary: "Volumes of all units, paged", querystring: VolumeQuery, response: { 200: Page(Volume), ...Errors() } },
    handler: ({ query }) => {
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
      // One identity lookup per unit on the page, not one per volume.
      const unitIds = new Map<string, string | null>();
      const unitId = (unit: string): string | null => {
        if (!unitIds.has(unit)) unitIds.set(unit, store.enrolledUnitId(unit));
        return unitIds.get(unit) ?? null;
      };
      return { status: 200, body: paged(matching, range, (m) => volumeView(m.volume, m.holder, unitId(m.volume.unit))) };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/volumes/:unit/:name",
    schema: { summary: "One volume", params: Params("unit", "name"), querystring: NoQuery, response: { 200: Ref(Volume), ...Errors({ 404: "no such unit or volume" }) } },
    handler: ({ params }) => {
      const unit = unitOr404(checkName(params[0], "unit"));
      const name = checkName(params[1], "name");
      const volume = store.volume(unit.name, name);
      if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${show(name)} not found on unit ${unit.name}`, { field: "name" });
      return { status: 200, body: volumeView(volume, assignedTo(unit.name, name), store.enrolledUnitId(unit.name)) };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/volumes",
    body: true,
    schema: {
      summary: "Create a volume on a unit",
      body: CreateVolume,
      response: { 201: Ref(Volume, "created"), ...Accepted, ...Errors({ 404: "no such unit", 409: "exists, or another task holds the volume (error.task names it)", 503: "unit unreachable", 507: "no space on the unit" }) },
    },
    handler: (ctx) => {
      const b = ctx.body as Static<typeof CreateVolume>;
      const unit = checkName(b.unit, "unit");
      const name = checkName(b.name, "name");
      const sizeBytes = checkSize(b.sizeBytes, "sizeBytes");
      unitOr404(unit);
      return api.answerTask(ctx, api.tasks.createVolume(ctx.principal, unit, name, sizeBytes));
    },
  });
  api.add({
    method: "DELETE",
    url: "/api/v1/volumes/:unit/:name",
    schema: {
      summary: "Delete a volume (not while assigned); task volume.delete",
      params: Params("unit", "name"),
      response: { 204: NoContent("deleted"), ...Accepted, ...Errors({ 404: "no such unit or volume", 409: "assigned, or another task holds the volume", 503: "unit unreachable" }) },
    },
    handler: (ctx) => api.answerTask(ctx, api.tasks.deleteVolume(ctx.principal, checkName(ctx.params[0], "unit"), checkName(ctx.params[1], "name"))),
  });
  api.add({
    method: "POST",
    url: "/api/v1/volumes/:unit/:name/grow",
    body: true,
    schema: {
      summary: "Grow a volume to a new total size; task volume.grow",
      params: Params("unit", "name"),
      body: GrowVolume,
      response: { 200: Ref(Volume, "grown"), ...Accepted, ...Errors({ 404: "no such unit or volume", 409: "smaller than now, or another task holds the volume", 507: "no space" }) },
    },
    handler: (ctx) => {
      const unit = checkName(ctx.params[0], "unit");
      const name = checkName(ctx.params[1], "name");
      const sizeBytes = checkSize((ctx.body as Static<typeof GrowVolume>).sizeBytes, "sizeBytes");
      return api.answerTask(ctx, api.tasks.growVolume(ctx.principal, unit, name, sizeBytes));
    },
  });
  api.add({
    method: "PUT",
    url: "/api/v1/volumes/:unit/:name/partitions",
    body: true,
    schema: {
      summary: "Replace a volume's partitions (back to back from its start; [] = none); task volume.partition",
      params: Params("unit", "name"),
      body: PartitionVolume,
      response: { 200: Ref(Volume, "partitioned"), ...Accepted, ...Errors({ 404: "no such unit or volume", 409: "a partition is assigned, or another task holds the volume" }) },
    },
    handler: (ctx) => {
      const unit = checkName(ctx.params[0], "unit");
      const name = checkName(ctx.params[1], "name");
      const sizes = checkSizes((ctx.body as Static<typeof PartitionVolume>).sizesBytes, "sizesBytes");
      return api.answerTask(ctx, api.tasks.partitionVolume(ctx.principal, unit, name, sizes));
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/volumes/:unit/:name/wipe",
    body: true,
    schema: {
      summary: "Zero a volume through its unit, chunk by chunk; task volume.wipe (progress in bytes, cancellable between chunks)",
      params: Params("unit", "name"),
      body: NoBody,
      response: {
        200: Type.Object({ unit: Type.String(), name: Type.String(), wipedBytes: Type.Integer() }, { additionalProperties: true, description: "wiped" }),
        ...Accepted,
        ...Errors({ 404: "no such unit or volume", 409: "assigned or granted, or another task holds the volume (error.task names it)" }),
      },
    },
    handler: (ctx) => api.answerTask(ctx, api.tasks.wipeVolume(ctx.principal, checkName(ctx.params[0], "unit"), checkName(ctx.params[1], "name"))),
  });
}
