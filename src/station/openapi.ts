// The hand-written OpenAPI 3.1 document served at GET /api/v1/openapi.json.
// It mirrors docs/api.md; openapi_test.ts checks that every path documented
// here answers on a real station (and not with 404/405).

const json = "application/json";

const ref = (name: string) => ({ $ref: `#/components/schemas/${name}` });
const ok = (description: string, schema?: unknown) =>
  schema === undefined ? { description } : { description, content: { [json]: { schema } } };
const list = (name: string) => ({
  type: "object",
  required: ["items"],
  properties: {
    items: { type: "array", items: ref(name) },
    total: { type: "integer", description: "volumes and assignments: how many match" },
    offset: { type: "integer" },
    nextOffset: { type: ["integer", "null"], description: "the next page's offset; null on the last page" },
  },
});
const error = (description: string) => ({ description, content: { [json]: { schema: ref("Error") } } });
const body = (schema: unknown) => ({ required: true, content: { [json]: { schema } } });
const pathParam = (name: string, description: string) => ({ name, in: "path", required: true, description, schema: { type: "string" } });
const queryParam = (name: string, description: string, schema: unknown = { type: "string" }) => ({ name, in: "query", required: false, description, schema });

const errors = {
  "400": error("a field has a bad value; error.field names it"),
  "401": error("missing, wrong, revoked or (join token) used or expired bearer token"),
  "403": error("PERMISSION_DENIED: the token's role may not do this; the message names the role (docs/api.md \"Authentication\")"),
};

const size = {
  oneOf: [
    { type: "integer", minimum: 512, multipleOf: 512 },
    { type: "string", pattern: "^[0-9]+(\\.[0-9]+)?\\s*[KMGTkmgt]?(i?[Bb])?$" },
  ],
  description: "bytes, or a string with a K/M/G/T suffix (powers of 1024); a multiple of 512",
};
const name = { type: "string", pattern: "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$" };
const hostPort = { type: ["object", "null"], properties: { host: { type: "string" }, port: { type: "integer" } } };
const extent = {
  type: "object",
  properties: { startLba: { type: "integer" }, lengthLba: { type: "integer" }, endLba: { type: "integer", description: "inclusive" } },
};

/** GET /api/v1/units/NAME/identity (src/station/unit_identities.ts IdentityView). */
const IDENTITY_SCHEMA = {
  type: "object",
  properties: {
    unit: { type: "string" },
    unitId: { type: "string", description: "the unit's UUID (its volume table's unitId)" },
    epoch: { type: "integer", description: "1 at first join, +1 per rotation" },
    state: { type: "string", enum: ["pending", "enrolled", "rotating"] },
    enrolledAt: { type: "string", format: "date-time" },
    updatedAt: { type: "string", format: "date-time" },
  },
} as const;

export function openApiDocument(version: string): unknown {
  return {
    openapi: "3.1.0",
    info: {
      title: "ipsan station API",
      version,
      description:
        "The control station of ipsan: the pool of SAN units, their volumes, hosts and assignments. " +
        "Every request needs Authorization: Bearer TOKEN: DATA/admin.token (role admin), a named token (ipsan tokens create: " +
        "admin, operator or viewer), a host's own credential (role host: its own records only) or, to register a host, a one-time join token. " +
        "Every change and every refusal is appended to DATA/audit.log. See docs/api.md \"Authentication\".",
    },
    servers: [{ url: "/" }],
    security: [{ bearer: [] }],
    components: {
      securitySchemes: { bearer: { type: "http", scheme: "bearer" } },
      schemas: {
        Error: {
          type: "object",
          required: ["error"],
          properties: {
            error: {
              type: "object",
              required: ["code", "message"],
              properties: {
                code: { type: "string" },
                message: { type: "string" },
                field: { type: "string" },
                reasons: { type: "array", items: { type: "object", properties: { unit: { type: "string" }, reason: { type: "string" } } } },
              },
            },
          },
        },
        LegRebuild: {
          type: "object",
          required: ["kind", "copiedBytes", "totalBytes"],
          additionalProperties: false,
          properties: {
            kind: { enum: ["delta", "full"] },
            copiedBytes: { type: "integer", minimum: 0 },
            totalBytes: { type: "integer", minimum: 0 },
            etaSeconds: { type: ["integer", "null"], minimum: 0 },
          },
        },
        Unit: {
          type: "object",
          required: ["name", "state"],
          properties: {
            name,
            dnsName: { type: ["string", "null"] },
            state: { enum: ["online", "suspect", "offline", "down", "unknown"] },
            addresses: { type: "array", items: { type: "string" } },
            nbd: hostPort,
            control: hostPort,
            capacityBytes: { type: "integer" },
            freeBytes: { type: "integer", description: "free space as the unit last reported it, minus carves the station has started there and the unit has not reported yet" },
            volumeCount: { type: "integer" },
            lastSeenAt: { type: "string", format: "date-time" },
            spare: { type: "boolean", description: "joined with --spare: left out of ordinary allocation, takes replacement legs" },
            zone: { type: ["string", "null"], description: "failure domain (--zone); legs of a mirror go to distinct zones first" },
          },
        },
        Volume: {
          type: "object",
          required: ["id", "unit", "name", "sizeBytes"],
          properties: {
            id: { type: "string", description: "UNIT/VOLUME" },
            unit: name,
            name,
            number: { type: "integer" },
            sizeBytes: { type: "integer" },
            extents: { type: "array", items: extent, description: "absolute LBAs on the unit" },
            partitions: {
              type: "array",
              items: {
                type: "object",
                properties: { index: { type: "integer" }, name: { type: "string" }, startLba: { type: "integer" }, lengthLba: { type: "integer" }, endLba: { type: "integer" }, sizeBytes: { type: "integer" } },
              },
            },
            grants: { type: ["array", "null"], items: { type: "string" } },
            assignedTo: { type: ["string", "null"] },
          },
        },
        Host: {
          type: "object",
          required: ["name", "address", "state"],
          properties: {
            name,
            address: { type: "string" },
            state: { enum: ["online", "offline"] },
            spare: { type: "boolean", description: "a spare host: a failed host's assignments move to it (docs/adr/0010)" },
            lastSeenAt: { type: "string", format: "date-time" },
            createdAt: { type: "string", format: "date-time" },
          },
        },
        Assignment: {
          type: "object",
          required: ["id", "host", "unit", "volume", "export", "uri", "sizeBytes", "state"],
          properties: {
            id: { type: "string" },
            requestId: { type: ["string", "null"] },
            host: name,
            hostAddress: { type: "string" },
            unit: name,
            unitDnsName: { type: ["string", "null"] },
            unitAddress: { type: ["string", "null"] },
            nbdHost: { type: ["string", "null"] },
            nbdPort: { type: ["integer", "null"] },
            export: { type: "string", description: "VOLUME, or VOLUME/pN for partition N" },
            volume: name,
            volumeNumber: { type: ["integer", "null"] },
            partition: { type: ["integer", "null"] },
            sizeBytes: { type: "integer" },
            startLba: { type: ["integer", "null"] },
            lengthLba: { type: "integer" },
            endLba: { type: ["integer", "null"] },
            extents: { type: "array", items: extent },
            uri: { type: ["string", "null"], description: "nbd://HOST:PORT/EXPORT; null for a mirror (copies > 1): the host's mirror engine serves it from the legs" },
            copies: { type: "integer", minimum: 1, maximum: 3, description: "1: one volume, used directly; 2-3: a mirror over `legs`, each on its own unit" },
            legs: {
              type: "array",
              description: "a mirror's legs (empty for copies 1); unit, volume, export, nbdHost/nbdPort and extents above are the first leg's",
              items: {
                type: "object",
                required: ["index", "unit", "volume", "sizeBytes", "uri", "state", "rebuild", "error"],
                properties: {
                  index: { type: "integer", minimum: 0, description: "the leg's place in the mirror; a replacement leg takes the index of the leg it replaces" },
                  unit: name,
                  volume: name,
                  sizeBytes: { type: "integer", description: "the mirror's sizeBytes plus 1 MiB of mirror metadata" },
                  uri: { type: ["string", "null"], description: "nbd://HOST:PORT/VOLUME of the leg, for the mirror engine only" },
                  state: {
                    enum: ["pending", "in-sync", "stale", "rebuilding", "failed"],
                    description: "pending: not made yet; then in-sync (the station's view at creation) until the host reports; a replacement leg starts rebuilding",
                  },
                  rebuild: { oneOf: [{ type: "null" }, ref("LegRebuild")] },
                  error: { type: ["string", "null"], description: "why the leg failed, as the host's engine saw it" },
                },
              },
            },
            state: { enum: ["pending", "active", "revoking", "released", "failed"] },
            createdAt: { type: "string", format: "date-time" },
            updatedAt: { type: "string", format: "date-time" },
            error: { type: ["string", "null"] },
            movedFrom: { type: ["string", "null"], description: "host failover: the host it was moved from; with movedAt null the old host is being fenced (nobody is granted)" },
            movedAt: { type: ["string", "null"], format: "date-time", description: "when the host failover finished (the new host granted)" },
          },
        },
        Token: {
          type: "object",
          required: ["name", "kind", "role"],
          properties: {
            name: { type: "string", description: "a token's name; host:HOST for a host credential; join-XXXXXXXX for a join token" },
            kind: { enum: ["token", "host", "join"] },
            role: { enum: ["admin", "operator", "viewer", "host", "join"] },
            host: { type: ["string", "null"] },
            createdAt: { type: "string", format: "date-time" },
            expiresAt: { type: ["string", "null"], format: "date-time" },
            usedAt: { type: ["string", "null"], format: "date-time" },
          },
        },
        AuditEntry: {
          type: "object",
          required: ["seq", "time", "actor", "role", "action", "ids", "from", "status", "prev", "hash"],
          properties: {
            seq: { type: "integer" },
            time: { type: "string", format: "date-time" },
            actor: { type: "string", description: "the credential's name; - when none was accepted" },
            role: { type: "string" },
            action: { type: "string", description: "METHOD /route/:pattern" },
            ids: { type: "object", additionalProperties: { type: "string" }, description: "the route's parameters" },
            from: { type: "string", description: "the caller's address" },
            status: { type: "integer" },
            prev: { type: "string", description: "hash of the previous entry (64 zeros for the first)" },
            hash: { type: "string", description: "SHA-256 of this entry's other fields" },
          },
        },
        DryRun: {
          type: "object",
          properties: {
            dryRun: { const: true },
            placement: {
              type: "object",
              properties: { kind: { enum: ["reuse", "carve"] }, unit: { type: "string" }, volume: { type: "string" }, sizeBytes: { type: "integer" } },
            },
            copies: { type: "integer", description: "copies > 1 only" },
            legs: { type: "array", description: "copies > 1 only: every leg's placement (placement is the first)", items: { type: "object" } },
            reasons: { type: "array", items: { type: "object" } },
          },
        },
      },
    },
    paths: {
      "/api/v1/health": { get: { summary: "Liveness and counts", responses: { "200": ok("ok", { type: "object" }), ...errors } } },
      "/api/v1/whoami": {
        get: {
          summary: "The caller's credential: name, role and bound host (the console reads its role here)",
          responses: {
            "200": ok("caller", { type: "object", required: ["name", "role", "host"], properties: { name: { type: "string" }, role: { type: "string", enum: ["admin", "operator", "viewer", "host", "join"] }, host: { type: ["string", "null"] } } }),
            ...errors,
          },
        },
      },
      "/api/v1/openapi.json": { get: { summary: "This document", responses: { "200": ok("OpenAPI 3.1", { type: "object" }), ...errors } } },
      "/api/v1/units": {
        get: {
          summary: "Units in the pool",
          parameters: [queryParam("state", "only units in this state")],
          responses: { "200": ok("units", list("Unit")), ...errors },
        },
      },
      "/api/v1/units/{unit}": {
        get: {
          summary: "One unit with its volumes",
          parameters: [pathParam("unit", "unit name")],
          responses: { "200": ok("unit", { allOf: [ref("Unit"), { type: "object", properties: { volumes: { type: "array", items: ref("Volume") } } }] }), "404": error("no such unit"), ...errors },
        },
      },
      "/api/v1/units/{unit}/refresh": {
        post: {
          summary: "Read the unit's info through its control API now",
          parameters: [pathParam("unit", "unit name")],
          responses: { "200": ok("unit", ref("Unit")), "404": error("no such unit"), "503": error("unit unreachable"), ...errors },
        },
      },
      "/api/v1/units/{unit}/identity": {
        get: {
          summary: "The unit's enrolled identity (issue 7): its id, secret epoch and state; never the secret",
          parameters: [pathParam("unit", "unit name")],
          responses: { "200": ok("identity", IDENTITY_SCHEMA), "404": error("not enrolled"), ...errors },
        },
        delete: {
          summary: "Forget the unit's identity: the next unit claiming the name enrols afresh (replacing a unit whose data dir was lost)",
          parameters: [pathParam("unit", "unit name")],
          responses: { "200": ok("forgotten", { type: "object", properties: { unit: { type: "string" }, unitId: { type: "string" }, forgotten: { type: "boolean" } } }), "404": error("not enrolled"), ...errors },
        },
      },
      "/api/v1/units/{unit}/rotate-secret": {
        post: {
          summary: "Rotate the unit's own secret: the next one goes to the unit sealed under the current one; the unit switches at its next datagram",
          parameters: [pathParam("unit", "unit name")],
          responses: { "202": ok("rotation started", IDENTITY_SCHEMA), "404": error("not enrolled"), "409": error("still enrolling"), ...errors },
        },
      },
      "/api/v1/volumes": {
        get: {
          summary: "Volumes of all units",
          parameters: [
            queryParam("unit", "only this unit's"),
            queryParam("free", "only unassigned ones", { type: "boolean" }),
            queryParam("offset", "skip this many", { type: "integer" }),
            queryParam("limit", "at most this many (default 10000, max 100000)", { type: "integer" }),
          ],
          responses: { "200": ok("volumes", list("Volume")), ...errors },
        },
        post: {
          summary: "Create a volume on a unit",
          requestBody: body({ type: "object", required: ["unit", "name", "sizeBytes"], additionalProperties: false, properties: { unit: name, name, sizeBytes: size } }),
          responses: { "201": ok("created", ref("Volume")), "404": error("no such unit"), "409": error("exists"), "503": error("unit unreachable"), "507": error("no space on the unit"), ...errors },
        },
      },
      "/api/v1/volumes/{unit}/{name}": {
        get: {
          summary: "One volume",
          parameters: [pathParam("unit", "unit name"), pathParam("name", "volume name")],
          responses: { "200": ok("volume", ref("Volume")), "404": error("no such unit or volume"), ...errors },
        },
        delete: {
          summary: "Delete a volume (not while assigned)",
          parameters: [pathParam("unit", "unit name"), pathParam("name", "volume name")],
          responses: { "204": ok("deleted"), "404": error("no such unit or volume"), "409": error("assigned"), "503": error("unit unreachable"), ...errors },
        },
      },
      "/api/v1/volumes/{unit}/{name}/grow": {
        post: {
          summary: "Grow a volume to a new total size",
          parameters: [pathParam("unit", "unit name"), pathParam("name", "volume name")],
          requestBody: body({ type: "object", required: ["sizeBytes"], additionalProperties: false, properties: { sizeBytes: size } }),
          responses: { "200": ok("grown", ref("Volume")), "404": error("no such unit or volume"), "409": error("smaller than now"), "507": error("no space"), ...errors },
        },
      },
      "/api/v1/volumes/{unit}/{name}/partitions": {
        put: {
          summary: "Replace a volume's partitions (back to back from its start; [] = none)",
          parameters: [pathParam("unit", "unit name"), pathParam("name", "volume name")],
          requestBody: body({ type: "object", required: ["sizesBytes"], additionalProperties: false, properties: { sizesBytes: { type: "array", items: size } } }),
          responses: { "200": ok("partitioned", ref("Volume")), "404": error("no such unit or volume"), "409": error("a partition is assigned"), ...errors },
        },
      },
      "/api/v1/hosts": {
        get: { summary: "Registered hosts", parameters: [queryParam("state", "online or offline")], responses: { "200": ok("hosts", list("Host")), ...errors } },
      },
      "/api/v1/hosts/{host}": {
        get: { summary: "One host", parameters: [pathParam("host", "host name")], responses: { "200": ok("host", ref("Host")), "404": error("no such host"), ...errors } },
        put: {
          summary: "Register a host or change its data-path address (default: the caller's address); spare: true registers a spare host",
          parameters: [pathParam("host", "host name")],
          requestBody: body({
            type: "object",
            additionalProperties: false,
            properties: {
              address: { type: "string", description: "IP address or DNS name" },
              spare: { type: "boolean", description: "a spare host (failover target); omitted: unchanged (false for a new host)" },
            },
          }),
          responses: { "200": ok("updated", ref("Host")), "201": ok("registered", ref("Host")), ...errors },
        },
      },
      "/api/v1/hosts/{host}/heartbeat": {
        post: {
          summary: "The host is alive",
          parameters: [pathParam("host", "host name")],
          requestBody: body({ type: "object", additionalProperties: false, properties: { address: { type: "string" } } }),
          responses: { "204": ok("noted"), "404": error("no such host"), ...errors },
        },
      },
      "/api/v1/hosts/{host}/keys": {
        get: {
          summary: "The host's NBD TLS-PSK keys: one per unit holding a volume of its live assignments (identity = host name; a file line is IDENTITY:KEY)",
          parameters: [pathParam("host", "host name")],
          responses: {
            "200": ok("keys", {
              type: "object",
              properties: {
                host: { type: "string" },
                keyEpoch: { type: "integer" },
                items: {
                  type: "array",
                  items: {
                    type: "object",
                    properties: {
                      unit: { type: "string" },
                      identity: { type: "string" },
                      key: { type: "string", description: "64 hex digits" },
                      tls: { type: ["string", "null"], enum: ["off", "on", "require", null] },
                    },
                  },
                },
              },
            }),
            "404": error("no such host"),
            ...errors,
          },
        },
      },
      "/api/v1/hosts/{host}/rotate-key": {
        post: {
          summary: "New NBD keys for every unit of this host (the units get them at once; the host's agent fetches them)",
          parameters: [pathParam("host", "host name")],
          responses: { "200": ok("rotated", { type: "object", properties: { host: { type: "string" }, keyEpoch: { type: "integer" } } }), "404": error("no such host"), ...errors },
        },
      },
      "/api/v1/assignments": {
        get: {
          summary: "Assignments (live ones; all=true adds released and failed)",
          parameters: [
            queryParam("host", "only this host's"),
            queryParam("all", "include history", { type: "boolean" }),
            queryParam("state", "only this state"),
            queryParam("offset", "skip this many", { type: "integer" }),
            queryParam("limit", "at most this many (default 10000, max 100000)", { type: "integer" }),
          ],
          responses: { "200": ok("assignments", list("Assignment")), ...errors },
        },
        post: {
          summary: "Assign a chosen volume or partition to a host (semi-automatic path)",
          requestBody: body({
            type: "object",
            required: ["host", "unit", "volume"],
            additionalProperties: false,
            properties: { host: name, unit: name, volume: name, partition: { type: "integer", minimum: 1 }, requestId: { type: "string" } },
          }),
          responses: { "200": ok("retried requestId", ref("Assignment")), "201": ok("assigned", ref("Assignment")), "404": error("no such host, unit, volume or partition"), "409": error("volume taken"), "503": error("unit unreachable"), ...errors },
        },
      },
      "/api/v1/assignments/{id}": {
        get: { summary: "One assignment", parameters: [pathParam("id", "assignment id")], responses: { "200": ok("assignment", ref("Assignment")), "404": error("no such assignment"), ...errors } },
        delete: {
          summary: "Unassign: the unit's grant is revoked",
          parameters: [pathParam("id", "assignment id")],
          responses: { "204": ok("revoked"), "202": ok("recorded; the unit is told when reachable", ref("Assignment")), "404": error("no such assignment"), "409": error("still pending"), ...errors },
        },
      },
      "/api/v1/assignments/{id}/legs": {
        put: {
          summary: "The host reports its mirror's legs (state, rebuild progress, error), ordered by the engine's generation",
          parameters: [pathParam("id", "assignment id")],
          requestBody: body({
            type: "object",
            required: ["generation", "legs"],
            additionalProperties: false,
            properties: {
              generation: { type: "integer", minimum: 0, description: "the engine's metadata generation; a report older than the last accepted one is ignored" },
              legs: {
                type: "array",
                maxItems: 8,
                items: {
                  type: "object",
                  required: ["unit", "volume", "state"],
                  additionalProperties: false,
                  properties: {
                    unit: name,
                    volume: name,
                    state: { enum: ["in-sync", "stale", "rebuilding", "failed"] },
                    rebuild: { oneOf: [{ type: "null" }, ref("LegRebuild")] },
                    error: { type: ["string", "null"], maxLength: 256 },
                  },
                },
              },
            },
          }),
          responses: {
            "200": ok("recorded (the assignment), or ignored: an older generation", {
              oneOf: [ref("Assignment"), { type: "object", required: ["ignored", "reason"], properties: { ignored: { const: true }, reason: { type: "string" } } }],
            }),
            "404": error("no such assignment"),
            "409": error("not a mirror, or not active"),
            ...errors,
          },
        },
      },
      "/api/v1/allocations": {
        post: {
          summary: "A host asks for N bytes: reuse a free volume or carve one, grant the host, answer where it is",
          requestBody: body({
            type: "object",
            required: ["requestId", "host", "sizeBytes"],
            additionalProperties: false,
            properties: {
              requestId: { type: "string", pattern: "^[A-Za-z0-9_.:-]{1,128}$" },
              host: name,
              sizeBytes: size,
              address: { type: "string" },
              dryRun: { type: "boolean" },
              copies: { type: "integer", minimum: 1, maximum: 3, default: 1, description: "2 or 3: a mirror, one leg of sizeBytes + 1 MiB on each of as many distinct units" },
            },
          }),
          responses: {
            "201": ok("allocated", ref("Assignment")),
            "200": ok("retried requestId (the same assignment) or dry run", { oneOf: [ref("Assignment"), ref("DryRun")] }),
            "409": error("requestId reused with other parameters"),
            "503": error("unit unreachable; nothing left half-made"),
            "507": error("no fit; error.reasons says why, unit by unit"),
            ...errors,
          },
        },
      },
      "/api/v1/events": {
        get: {
          summary: "Server-Sent Events of every change (Last-Event-ID replays)",
          parameters: [queryParam("since", "replay events after this number")],
          responses: { "200": { description: "event stream", content: { "text/event-stream": { schema: { type: "string" } } } }, "503": error("too many subscribers"), ...errors },
        },
      },
      "/api/v1/hosts/{name}/register": {
        post: {
          summary: "Enrol a host with a one-time join token (or as the admin): answers the host's own credential, once",
          parameters: [pathParam("name", "host name")],
          requestBody: body({ type: "object", additionalProperties: false, properties: { address: { type: "string", description: "default: the caller's address" }, spare: { type: "boolean" } } }),
          responses: {
            "201": ok("registered", { type: "object", properties: { host: ref("Host"), credential: ref("Token"), token: { type: "string", description: "the host credential's secret: shown this once" } } }),
            "200": ok("registered again: a new credential, the old one stops working"),
            ...errors,
          },
        },
      },
      "/api/v1/tokens": {
        get: { summary: "Every credential (named tokens, host credentials, join tokens), never a secret (admin)", responses: { "200": ok("tokens", list("Token")), ...errors } },
        post: {
          summary: "Create a named token with a role (admin); the answer holds its secret, once",
          requestBody: body({ type: "object", required: ["name", "role"], additionalProperties: false, properties: { name, role: { enum: ["admin", "operator", "viewer"] } } }),
          responses: { "201": ok("created", { allOf: [ref("Token"), { type: "object", properties: { token: { type: "string" } } }] }), "409": error("the name is taken"), ...errors },
        },
      },
      "/api/v1/tokens/{name}": {
        delete: {
          summary: "Revoke a credential (admin): refused from the next request on",
          parameters: [pathParam("name", "token name, host:HOST or join-XXXXXXXX")],
          responses: { "204": ok("revoked"), "404": error("no such token"), "409": error("admin: DATA/admin.token is changed by replacing the file"), ...errors },
        },
      },
      "/api/v1/join-tokens": {
        post: {
          summary: "A one-time join token for ipsan host register (admin)",
          requestBody: body({
            type: "object",
            additionalProperties: false,
            properties: { host: { ...name, description: "only this host may register with it" }, expires: { type: "string", description: "how long it is valid: 30m, 2h (default 1h, at most 7 days)" } },
          }),
          responses: { "201": ok("created", { allOf: [ref("Token"), { type: "object", properties: { token: { type: "string" } } }] }), ...errors },
        },
      },
      "/api/v1/audit": {
        get: {
          summary: "The last entries of DATA/audit.log, oldest first (admin)",
          parameters: [queryParam("limit", "how many (default 100, at most 10000)", { type: "integer" })],
          responses: { "200": ok("entries", list("AuditEntry")), ...errors },
        },
      },
      "/api/v1/audit/verify": {
        get: {
          summary: "Check DATA/audit.log's hash chain (admin)",
          responses: {
            "200": ok("verdict", {
              type: "object",
              properties: {
                ok: { type: "boolean" },
                entries: { type: "integer", description: "entries checked and intact" },
                line: { type: "integer", description: "not ok: the first bad line (1-based)" },
                seq: { type: ["integer", "null"] },
                reason: { type: "string" },
                file: { type: "string" },
              },
            }),
            ...errors,
          },
        },
      },
      "/metrics": {
        get: { summary: "Prometheus metrics", responses: { "200": { description: "text format 0.0.4", content: { "text/plain": { schema: { type: "string" } } } }, ...errors } },
      },
    },
  };
}
