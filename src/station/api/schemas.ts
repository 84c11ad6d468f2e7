// The TypeBox schemas shared by the station API's routes (docs/api.md
// "Objects"). One schema gives the TypeScript type (Static<>), the request
// validation (ajv, in the server's one error path) and the OpenAPI 3.1
// document (@fastify/swagger): nothing here is written twice.
//
// Response schemas document the answers; they never filter them: the server
// serializes with JSON.stringify, and every object allows more properties than
// it lists (additionalProperties true), so a field a client uses cannot be
// stripped by a schema that forgot it. api_test.ts checks every answer against them.

import { Type, type TSchema } from "@sinclair/typebox";
import { COPIES_MAX } from "../station.ts";
import { LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX } from "./limits.ts";
import { TASK_KINDS, TASK_STATES, TASK_TARGET_TYPES } from "../tasks/types.ts";

export const NAME_REGEX = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$";
export const Name = Type.String({ pattern: NAME_REGEX, description: "1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit" });
/** A size: bytes, or a string with a K/M/G/T suffix; the handler checks it is a positive multiple of 512 (validate.ts checkSize). */
export const Size = Type.Union([Type.Integer(), Type.String({ maxLength: 32 })], {
  description: "bytes, or a string with a K/M/G/T suffix (powers of 1024) such as \"80G\"; positive, a multiple of 512",
});
export const RequestId = Type.String({ pattern: "^[A-Za-z0-9_.:-]{1,128}$" });
/** An optional body field: absent and null mean the same (as before the schemas). */
export function Optional<T extends TSchema>(schema: T) {
  return Type.Optional(Type.Union([schema, Type.Null()]));
}
const DateTime = Type.String({ format: "date-time" });
/** A string out of a fixed list (an OpenAPI enum). */
export function Enum<T extends string>(values: readonly T[], options: { description?: string } = {}) {
  return Type.Unsafe<T>({ type: "string", enum: [...values], ...options });
}
const Nullable = <T extends TSchema>(schema: T, options: { description?: string } = {}) => Type.Union([schema, Type.Null()], options);
/** An answer object: lists its fields, allows more (answers are never filtered by their schema). */
const Answer = <T extends Parameters<typeof Type.Object>[0]>(properties: T, options: { $id?: string; description?: string } = {}) =>
  Type.Object(properties, { additionalProperties: true, ...options });

export const ErrorBody = Type.Object(
  {
    error: Type.Object(
      {
        code: Type.String({ description: "INVALID_ARGUMENT, NOT_FOUND, CONFLICT, NO_SPACE, UNAUTHENTICATED, PERMISSION_DENIED, TOO_LARGE, SHUTTING_DOWN, IO_ERROR, ..." }),
        message: Type.String(),
        field: Type.Optional(Type.String({ description: "the request field (body, query, path or header) that was wrong" })),
        reasons: Type.Optional(Type.Array(Answer({ unit: Type.String(), reason: Type.String() }))),
      },
      { additionalProperties: true },
    ),
  },
  { $id: "Error", additionalProperties: true },
);

const HostPort = Nullable(Answer({ host: Type.String(), port: Type.Integer() }));
const Extent = Answer({ startLba: Type.Integer(), lengthLba: Type.Integer(), endLba: Type.Integer({ description: "inclusive" }) });

export const LegRebuild = Type.Object(
  {
    kind: Enum(["delta", "full"]),
    copiedBytes: Type.Integer({ minimum: 0 }),
    totalBytes: Type.Integer({ minimum: 0 }),
    etaSeconds: Type.Optional(Nullable(Type.Integer({ minimum: 0 }))),
  },
  { $id: "LegRebuild", additionalProperties: false },
);

export const Unit = Answer(
  {
    name: Type.String(),
    dnsName: Nullable(Type.String()),
    state: Enum(["online", "suspect", "offline", "down", "unknown"]),
    addresses: Type.Array(Type.String()),
    nbd: HostPort,
    control: HostPort,
    capacityBytes: Type.Integer(),
    freeBytes: Type.Integer({ description: "free space as the unit last reported it, minus carves the station has started there and the unit has not reported yet" }),
    volumeCount: Type.Integer(),
    lastSeenAt: DateTime,
    spare: Type.Boolean({ description: "joined with --spare: left out of ordinary allocation, takes replacement legs" }),
    zone: Nullable(Type.String(), { description: "failure domain (--zone); legs of a mirror go to distinct zones first" }),
    tls: Nullable(Type.String(), { description: "the unit's NBD TLS mode (off, on, require) as it reported it" }),
    iscsi: Nullable(Answer({ portal: Type.String({ description: "HOST:PORT ([v6]:PORT)" }) }), {
      description: "the unit's iSCSI portal (ipsan unit --iscsi) as its info last said; null: it serves no iSCSI",
    }),
  },
  { $id: "Unit" },
);

export const Volume = Answer(
  {
    id: Type.String({ description: "UNIT/VOLUME" }),
    unit: Type.String(),
    name: Type.String(),
    number: Type.Integer(),
    sizeBytes: Type.Integer(),
    extents: Type.Array(Extent, { description: "absolute LBAs on the unit" }),
    partitions: Type.Array(
      Answer({
        index: Type.Integer(),
        name: Type.String(),
        startLba: Type.Integer(),
        lengthLba: Type.Integer(),
        endLba: Type.Integer(),
        sizeBytes: Type.Integer(),
        naa: Nullable(Type.String({ pattern: "^[0-9a-f]{16}$" }), { description: "the partition's NAA designator (VPD 0x83 of its iSCSI target); null: the unit never enrolled" }),
      }),
    ),
    grants: Nullable(Type.Array(Type.String())),
    assignedTo: Nullable(Type.String()),
    naa: Nullable(Type.String({ pattern: "^[0-9a-f]{16}$" }), {
      description: "the volume's NAA designator: stable for its life, the same across unit restarts, what the unit's iSCSI target answers in VPD 0x83 (null: the unit never enrolled with the station)",
    }),
  },
  { $id: "Volume" },
);

export const Host = Answer(
  {
    name: Type.String(),
    address: Type.String(),
    state: Enum(["online", "offline"]),
    spare: Type.Boolean({ description: "a spare host: a failed host's assignments move to it (docs/adr/0010)" }),
    iqn: Nullable(Type.String(), { description: "the host's iSCSI initiator name (null: none; protocol iscsi needs one)" }),
    lastSeenAt: DateTime,
    createdAt: DateTime,
  },
  { $id: "Host" },
);

const Leg = Answer({
  index: Type.Integer({ minimum: 0, description: "the leg's place in the mirror; a replacement leg takes the index of the leg it replaces" }),
  unit: Type.String(),
  volume: Type.String(),
  sizeBytes: Type.Integer({ description: "the mirror's sizeBytes plus 1 MiB of mirror metadata" }),
  uri: Nullable(Type.String(), { description: "nbd://HOST:PORT/VOLUME of the leg, for the mirror engine only" }),
  state: Enum(["pending", "in-sync", "stale", "rebuilding", "failed"]),
  rebuild: Nullable(Type.Ref("LegRebuild")),
  error: Nullable(Type.String(), { description: "why the leg failed, as the host's engine saw it" }),
});

export const Assignment = Answer(
  {
    id: Type.String(),
    requestId: Nullable(Type.String()),
    host: Type.String(),
    hostAddress: Type.String(),
    unit: Type.String(),
    unitDnsName: Nullable(Type.String()),
    unitAddress: Nullable(Type.String()),
    nbdHost: Nullable(Type.String()),
    nbdPort: Nullable(Type.Integer()),
    export: Type.String({ description: "VOLUME, or VOLUME/pN for partition N" }),
    volume: Type.String(),
    volumeNumber: Nullable(Type.Integer()),
    partition: Nullable(Type.Integer()),
    sizeBytes: Type.Integer(),
    startLba: Nullable(Type.Integer()),
    lengthLba: Type.Integer(),
    endLba: Nullable(Type.Integer()),
    extents: Type.Array(Extent),
    uri: Nullable(Type.String(), {
      description:
        "nbd://HOST:PORT/EXPORT (nbds:// with TLS); for protocol iscsi iscsi://PORTAL/TARGET/0 (no secret in it); null for a mirror (copies > 1): the host's mirror engine serves it from the legs",
    }),
    protocol: Enum(["nbd", "iscsi"], { description: "how the host reaches the volume (nbd for assignments made before iSCSI)" }),
    iscsi: Nullable(
      Answer({
        portal: Type.String({ description: "the unit's iSCSI portal, HOST:PORT ([v6]:PORT)" }),
        target: Type.String({ description: "the export's target name, iqn.2026-12.org.ipsan:UNIT.VOLUME[.pN]" }),
        lun: Type.Integer({ description: "always 0" }),
        chapUser: Nullable(Type.String(), {
          description: "the CHAP user name (the host's name); the secret is derived on the host from its key for the unit; null: the unit admits by address, no CHAP",
        }),
        naa: Nullable(Type.String({ pattern: "^[0-9a-f]{16}$" }), {
          description: "the export's NAA designator, as the target answers in VPD 0x83 (null: the unit never enrolled with the station)",
        }),
      }),
      { description: "protocol iscsi: where to log in (null for nbd, or while the unit's portal is unknown)" },
    ),
    copies: Type.Integer({ minimum: 1, maximum: COPIES_MAX }),
    legs: Type.Array(Leg, { description: "a mirror's legs (empty for copies 1); unit, volume, export, nbdHost/nbdPort and extents above are the first leg's" }),
    state: Enum(["pending", "active", "revoking", "released", "failed"]),
    createdAt: DateTime,
    updatedAt: DateTime,
    error: Nullable(Type.String()),
    movedFrom: Nullable(Type.String(), { description: "host failover: the host it was moved from; with movedAt null the old host is being fenced" }),
    movedAt: Nullable(DateTime, { description: "when the host failover finished (the new host granted)" }),
    serving: Nullable(Enum(["ok", "degraded", "down"]), { description: "whether the data can be served now (null: the assignment is over)" }),
    servingReasons: Type.Array(Type.String(), { description: "why serving is not ok" }),
  },
  { $id: "Assignment" },
);

export const Token = Answer(
  {
    name: Type.String({ description: "a token's name; host:HOST for a host credential; join-XXXXXXXX for a join token" }),
    kind: Enum(["token", "host", "join"]),
    role: Enum(["admin", "operator", "viewer", "host", "join"]),
    host: Nullable(Type.String()),
    createdAt: DateTime,
    expiresAt: Nullable(DateTime),
    usedAt: Nullable(DateTime),
  },
  { $id: "Token" },
);

export const Identity = Answer(
  {
    unit: Type.String(),
    unitId: Type.String({ description: "the unit's UUID (its volume table's unitId)" }),
    epoch: Type.Integer({ description: "1 at first join, +1 per rotation" }),
    state: Enum(["pending", "enrolled", "rotating"]),
    enrolledAt: DateTime,
    updatedAt: DateTime,
  },
  { $id: "Identity" },
);

export const AuditEntry = Answer(
  {
    seq: Type.Integer(),
    time: DateTime,
    actor: Type.String({ description: "the credential's name; - when none was accepted" }),
    role: Type.String(),
    action: Type.String({ description: "METHOD /route/:pattern" }),
    ids: Type.Record(Type.String(), Type.String(), { description: "the route's parameters" }),
    from: Type.String({ description: "the caller's address" }),
    status: Type.Integer(),
    prev: Type.String({ description: "hash of the previous entry (64 zeros for the first)" }),
    hash: Type.String({ description: "SHA-256 of this entry's other fields" }),
  },
  { $id: "AuditEntry" },
);

export const Task = Answer(
  {
    id: Type.String({ pattern: "^t-[0-9a-f]+$" }),
    kind: Enum(TASK_KINDS),
    state: Enum(TASK_STATES),
    target: Answer({ type: Enum(TASK_TARGET_TYPES), id: Type.String() }),
    objects: Type.Array(Type.String(), { description: "lock keys it holds while unfinished, e.g. volume:u1/v1" }),
    progress: Nullable(Answer({ done: Type.Integer(), total: Type.Integer(), unit: Enum(["bytes", "steps"]) })),
    startedBy: Type.String({ description: "the token's name" }),
    role: Type.String(),
    createdAt: DateTime,
    startedAt: Nullable(DateTime),
    finishedAt: Nullable(DateTime),
    cancellable: Type.Boolean(),
    resultStatus: Nullable(Type.Integer(), { description: "the status the synchronous answer has (201, 204, ...)" }),
    result: Type.Unknown({ description: "the body the synchronous answer has (null for 204)" }),
    error: Nullable(Answer({ code: Type.String(), message: Type.String(), field: Type.Optional(Type.String()) })),
    message: Nullable(Type.String()),
  },
  { $id: "Task" },
);

/** Every schema referenced by $id (added to the server once; components.schemas of the document). */
export const SHARED_SCHEMAS = [ErrorBody, LegRebuild, Unit, Volume, Host, Assignment, Token, Identity, AuditEntry, Task];


export const Ref = (schema: { $id?: string }, description?: string) => Type.Ref(schema.$id ?? "", description === undefined ? {} : { description });

/** {items} of a list that is not paged. */
export const List = (item: { $id?: string }) => Answer({ items: Type.Array(Ref(item)) });
/** {items, total, offset, nextOffset}: a page of a listing. */
export const Page = (item: { $id?: string }) =>
  Answer({
    items: Type.Array(Ref(item)),
    total: Type.Integer({ description: "how many match" }),
    offset: Type.Integer(),
    nextOffset: Nullable(Type.Integer(), { description: "the next page's offset; null on the last page" }),
  });
export const PageQuery = {
  offset: Type.Optional(Type.String({ pattern: "^[0-9]{1,9}$", description: "skip this many" })),
  limit: Type.Optional(Type.String({ pattern: "^[0-9]{1,9}$", description: `at most this many (default ${LIST_LIMIT_DEFAULT}, at most ${LIST_LIMIT_MAX})` })),
};
export const Flag = (description: string) => Type.Optional(Type.String({ description: `${description}: true, false, 1, 0 or empty (true)` }));

/** The object a route's answers document: status -> schema. Errors share one schema. */
export const Errors = (extra: Record<number, string> = {}) => {
  const out: Record<number, TSchema> = {
    400: Ref(ErrorBody, "a field has a bad value; error.field names it"),
    401: Ref(ErrorBody, "missing, wrong, revoked or (join token) used or expired bearer token"),
    403: Ref(ErrorBody, "PERMISSION_DENIED: the token's role may not do this; the message names the role"),
  };
  for (const [status, description] of Object.entries(extra)) out[Number(status)] = Ref(ErrorBody, description);
  return out;
};
export const NoContent = (description: string) => Type.Null({ description });
/** A route that takes no query parameters (any is a 400 naming it). */
export const NoQuery = Type.Object({}, { additionalProperties: false });
export const NoBody = Type.Object({}, { additionalProperties: false, description: "an empty object (or no body)" });
export const Params = <T extends string>(...names: T[]) =>
  Type.Object(Object.fromEntries(names.map((n) => [n, Type.String()])) as Record<T, ReturnType<typeof Type.String>>);

/** A state-changing route runs as a task (docs/api.md "Tasks"): 202 with the task when it is not done in time. */
export const Accepted = {
  202: Ref(Task, "the task, still running after TASK_WAIT_MS (5 s), or at once with Prefer: respond-async; Location: /api/v1/tasks/ID; every answer of such a route has Ipsan-Task: ID"),
};
