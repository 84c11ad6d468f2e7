// Assignments: the host's request (allocation), the admin's manual assign,
// unassign, and the host's reports of its mirror's legs (docs/api.md "Assignments").

import { Type, type Static } from "@sinclair/typebox";
import { IpsanError } from "../../util/errors.ts";
import { COPIES_MAX } from "../station.ts";
import { ASSIGNMENT_STATES, LIVE_ASSIGNMENT_STATES, PROTOCOLS, REPORTED_LEG_STATES } from "../types.ts";
import { checkAddress, checkBoolean, checkIndex, checkName, checkRequestId, checkSize, invalid, show } from "../validate.ts";
import { assignmentView } from "../views.ts";
import { GENERATION_MAX, LEG_REPORT_LEGS_MAX, parseLegReport } from "../leg_reports.ts";
import { given, page, paged, queryFlag, type Api } from "./route.ts";
import { Accepted, Assignment, Enum, Errors, Flag, LegRebuild, Name, NoContent, NoQuery, Optional, Page, PageQuery, Params, Ref, RequestId, Size, Task } from "./schemas.ts";

const AssignmentQuery = Type.Object(
  {
    host: Type.Optional(Type.String({ description: "only this host's (a host credential must give its own)" })),
    all: Flag("include history (released and failed)"),
    state: Type.Optional(Enum(ASSIGNMENT_STATES, { description: "only this state" })),
    ...PageQuery,
  },
  { additionalProperties: false },
);
const ProtocolField = Enum(PROTOCOLS, {
  description: "nbd (default) or iscsi: the host logs in to the unit's iSCSI target with its registered IQN (a single copy; units that serve iSCSI only)",
});
export const Allocate = Type.Object(
  {
    requestId: RequestId,
    host: Name,
    sizeBytes: Size,
    address: Optional(Type.String({ description: "the host's data-path address (IP or DNS name); default: as registered, else the caller's" })),
    dryRun: Optional(Type.Boolean({ description: "answer the placement, change nothing" })),
    copies: Optional(Type.Integer({ minimum: 1, maximum: COPIES_MAX, description: "2 or 3: a mirror, one leg of sizeBytes + 1 MiB on each of as many distinct units (default 1)" })),
    protocol: Optional(ProtocolField),
  },
  { additionalProperties: false },
);
export const Assign = Type.Object(
  {
    host: Name,
    unit: Name,
    volume: Name,
    partition: Optional(Type.Integer({ minimum: 1, maximum: 1024 })),
    requestId: Optional(RequestId),
    protocol: Optional(ProtocolField),
  },
  { additionalProperties: false },
);
export const LegReport = Type.Object(
  {
    generation: Type.Integer({ minimum: 0, maximum: GENERATION_MAX, description: "the engine's metadata generation; a report older than the last accepted one is ignored" }),
    legs: Type.Array(
      Type.Object(
        {
          unit: Name,
          volume: Name,
          state: Enum(REPORTED_LEG_STATES),
          rebuild: Optional(Ref(LegRebuild)),
          error: Optional(Type.String({ description: "kept to its first 256 characters" })),
        },
        { additionalProperties: false },
      ),
      { maxItems: LEG_REPORT_LEGS_MAX },
    ),
  },
  { additionalProperties: false },
);
const DryRun = Type.Object(
  {
    dryRun: Type.Literal(true),
    placement: Type.Object(
      { kind: Enum(["reuse", "carve"]), unit: Type.String(), volume: Type.Optional(Type.String({ description: "reuse only" })), sizeBytes: Type.Integer() },
      { additionalProperties: true },
    ),
    copies: Type.Optional(Type.Integer({ description: "copies > 1 only" })),
    legs: Type.Optional(Type.Array(Type.Object({}, { additionalProperties: true }), { description: "copies > 1 only: every leg's placement (placement is the first)" })),
    reasons: Type.Array(Type.Object({}, { additionalProperties: true })),
  },
  { additionalProperties: true },
);
const checkId = (id: string): string => {
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(id)) throw invalid("id", `invalid assignment id ${show(id)}`);
  return id;
};

export function assignmentRoutes(api: Api): void {
  const { station, legReports } = api;
  const store = station.store;

  api.add({
    method: "GET",
    url: "/api/v1/assignments",
    schema: { summary: "Assignments (live ones; all=true adds released and failed), paged", querystring: AssignmentQuery, response: { 200: Page(Assignment), ...Errors() } },
    handler: ({ query }) => {
      const range = page(query);
      const host = query.get("host");
      if (host !== null) checkName(host, "host");
      const state = query.get("state");
      const all = queryFlag(query, "all") || (state !== null && !LIVE_ASSIGNMENT_STATES.has(state as never));
      const matching = store.listAssignments({ ...(host === null ? {} : { host }), all }).filter((a) => state === null || a.state === state);
      return { status: 200, body: paged(matching, range, (a) => assignmentView(a, store)) };
    },
  });
  api.add({
    method: "GET",
    url: "/api/v1/assignments/:id",
    schema: { summary: "One assignment", params: Params("id"), querystring: NoQuery, response: { 200: Ref(Assignment), ...Errors({ 404: "no such assignment" }) } },
    handler: ({ params }) => {
      const assignment = store.getAssignment(params[0] ?? "");
      if (assignment === undefined) throw new IpsanError("NOT_FOUND", `assignment ${show(params[0])} not found`, { field: "id" });
      return { status: 200, body: assignmentView(assignment, store) };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/allocations",
    body: true,
    schema: {
      summary: "A host asks for N bytes: reuse a free volume or carve one, grant the host, answer where it is",
      body: Allocate,
      response: {
        201: Ref(Assignment, "allocated"),
        200: Type.Union([Ref(Assignment), DryRun], { description: "retried requestId (the same assignment) or dry run" }),
        ...Accepted,
        ...Errors({ 400: "bad field; protocol iscsi with copies > 1", 409: "requestId reused with other parameters; protocol iscsi for a host without an IQN, or with no unit serving iSCSI", 503: "unit unreachable; nothing left half-made", 507: "no fit; error.reasons says why, unit by unit" }),
      },
    },
    handler: async (ctx) => {
      const b = ctx.body as Static<typeof Allocate>;
      const requestId = checkRequestId(b.requestId);
      const host = checkName(b.host, "host");
      const sizeBytes = checkSize(b.sizeBytes, "sizeBytes");
      const dryRun = given(b.dryRun) ? checkBoolean(b.dryRun, "dryRun") : false;
      const copies = given(b.copies) ? checkIndex(b.copies, "copies", COPIES_MAX) : 1;
      const address = given(b.address) ? await checkAddress(b.address, "address") : undefined;
      const protocol = given(b.protocol) ? b.protocol : "nbd";
      const input = { requestId, host, sizeBytes, dryRun, copies, ...(address === undefined ? {} : { address }), ...(protocol === "nbd" ? {} : { protocol }) };
      // A dry run changes nothing: no task.
      if (!dryRun) return api.answerTask(ctx, api.tasks.allocate(ctx.principal, input, ctx.callerAddress));
      const answer = await station.allocate(input, ctx.callerAddress);
      if (answer.kind === "dry_run") {
        const legs = answer.legs === undefined ? {} : { copies: answer.copies, legs: answer.legs };
        return { status: 200, body: { dryRun: true, placement: answer.placement, ...legs, reasons: answer.reasons } };
      }
      return { status: answer.status, body: assignmentView(answer.assignment, store) };
    },
  });
  api.add({
    method: "POST",
    url: "/api/v1/assignments",
    body: true,
    schema: {
      summary: "Assign a chosen volume or partition to a host (semi-automatic path)",
      body: Assign,
      response: {
        200: Ref(Assignment, "retried requestId"),
        201: Ref(Assignment, "assigned"),
        ...Accepted,
        ...Errors({ 404: "no such host, unit, volume or partition", 409: "volume taken, or another task holds it; protocol iscsi for a host without an IQN or on a unit that serves no iSCSI", 503: "unit unreachable" }),
      },
    },
    handler: (ctx) => {
      const b = ctx.body as Static<typeof Assign>;
      const host = checkName(b.host, "host");
      const unit = checkName(b.unit, "unit");
      const volume = checkName(b.volume, "volume");
      const partition = given(b.partition) ? checkIndex(b.partition, "partition", 1024) : undefined;
      const requestId = given(b.requestId) ? checkRequestId(b.requestId) : undefined;
      const protocol = given(b.protocol) ? b.protocol : "nbd";
      const input = {
        host,
        unit,
        volume,
        ...(partition === undefined ? {} : { partition }),
        ...(requestId === undefined ? {} : { requestId }),
        ...(protocol === "nbd" ? {} : { protocol }),
      };
      return api.answerTask(ctx, api.tasks.assign(ctx.principal, input));
    },
  });
  api.add({
    method: "PUT",
    url: "/api/v1/assignments/:id/legs",
    body: true,
    schema: {
      summary: "The host reports its mirror's legs (state, rebuild progress, error), ordered by the engine's generation",
      params: Params("id"),
      body: LegReport,
      response: {
        200: Type.Union([Ref(Assignment), Type.Object({ ignored: Type.Literal(true), reason: Type.String() }, { additionalProperties: true })], {
          description: "recorded (the assignment), or ignored: an older generation",
        }),
        ...Errors({ 404: "no such assignment", 409: "not a mirror, or not active" }),
      },
    },
    handler: ({ params, body }) => {
      const id = checkId(params[0] ?? "");
      const answer = legReports.apply(id, parseLegReport(body));
      return { status: 200, body: answer.kind === "ignored" ? { ignored: true, reason: answer.reason } : assignmentView(answer.assignment, store) };
    },
  });
  api.add({
    method: "DELETE",
    url: "/api/v1/assignments/:id",
    schema: {
      summary: "Unassign: the unit's grant is revoked; task assignment.delete",
      params: Params("id"),
      response: {
        204: NoContent("revoked"),
        202: Type.Union([Ref(Assignment), Ref(Task)], {
          description: "recorded, the unit is told when reachable (an Assignment, with Ipsan-Task and no Location); or the task, still running (Location: /api/v1/tasks/ID)",
        }),
        ...Errors({ 404: "no such assignment", 409: "still pending, or another task holds it" }),
      },
    },
    handler: (ctx) => api.answerTask(ctx, api.tasks.unassign(ctx.principal, checkId(ctx.params[0] ?? ""))),
  });
}
