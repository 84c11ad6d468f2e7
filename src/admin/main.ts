// The admin CLI over the station's REST API (docs/api.md):
//
//   ipsan units|volumes|hosts|assignments [--json]     listings (tables by default)
//   ipsan volume create UNIT NAME SIZE
//   ipsan volume delete UNIT NAME
//   ipsan volume grow UNIT NAME SIZE                    SIZE is the new total
//   ipsan volume partition UNIT NAME SIZE,SIZE...       "none" removes the partitions
//   ipsan volume wipe UNIT NAME                         zero it (a task: progress on a TTY)
//   ipsan tasks [show ID | cancel ID]                   the station's tasks (src/admin/tasks.ts)
//   ipsan assign HOST UNIT VOLUME [--partition N]
//   ipsan unassign ID
//
// Common flags: --station URL (default $IPSAN_STATION), --token-file FILE
// (default $IPSAN_TOKEN_FILE). Exit status 2 for a usage error (the message
// names the flag or argument), 1 when the station refuses (its code, message
// and field are printed).

import { setting, settingSources } from "../util/config.ts";
import { parsePartitionSizes } from "../util/size.ts";
import { reachableNbd } from "../station/views.ts";
import { StationClient, listItems, parseStationUrls, readCaFile, readTokenFile } from "../host/station_client.ts";
import { taskProgress } from "../util/progress.ts";
import { verifyAuditFile } from "../station/auth/audit.ts";
import { parseDuration } from "../util/duration.ts";
import { UsageError } from "../util/errors.ts";
import { parseFlags, type FlagSpec } from "../util/flags.ts";
import { formatSize, parseSize } from "../util/size.ts";
import { printItems } from "../util/output.ts";
import { table } from "../util/table.ts";

const COMMON_FLAGS = {
  station: { type: "string" },
  "token-file": { type: "string" },
  "ca-file": { type: "string" },
  help: { type: "boolean" },
} as const satisfies FlagSpec;

const COMMON_USAGE = `common flags:
  --station URL[,URL...]  the station's API, or every station's (default $IPSAN_STATION), e.g. http://127.0.0.1:8640
  --token-file FILE   a token: STATION_DATA/admin.token, or one from "ipsan tokens create" (default $IPSAN_TOKEN_FILE)
  --ca-file FILE      CA certificate (PEM) of an https:// station (default $IPSAN_CA_FILE; else the system's CAs)
`;

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** Pages a listing follows (10,000 items each by default: a million in all). */
const LIST_PAGES_MAX = 100;

async function client(values: { station?: string | undefined; "token-file"?: string | undefined; "ca-file"?: string | undefined; json?: boolean | undefined }): Promise<StationClient> {
  const station = setting("station", values.station);
  if (station === undefined || station === "") throw new UsageError(`--station URL is required (${settingSources("station")})`);
  const tokenFile = setting("token-file", values["token-file"]);
  if (tokenFile === undefined || tokenFile === "") throw new UsageError(`--token-file FILE is required (${settingSources("token-file")}): the station's DATA/admin.token, or a named token's`);
  const ca = await readCaFile(values["ca-file"]);
  // A change the station runs as a long task is followed until it finishes, with its progress on a TTY (not with --json).
  const onTask = taskProgress({ json: values.json === true });
  return new StationClient({
    baseUrl: parseStationUrls(station),
    token: await readTokenFile(tokenFile),
    ...(ca === undefined ? {} : { ca }),
    ...(onTask === undefined ? {} : { onTask }),
  });
}

function name(value: string | undefined, what: string): string {
  if (value === undefined) throw new UsageError(`missing ${what}`);
  if (!NAME_PATTERN.test(value)) throw new UsageError(`${what}: invalid name "${value}" (1-63 of A-Z a-z 0-9 _ . -, starting with a letter or digit)`);
  return value;
}

function size(value: string | undefined, what: string): number {
  if (value === undefined) throw new UsageError(`missing ${what}`);
  return parseSize(value, what);
}

function noMore(rest: readonly string[], count: number, usage: string): void {
  if (rest.length > count) throw new UsageError(`unexpected argument "${rest[count]}"\nusage: ${usage}`);
}

// For the other admin commands kept in files of their own (unit_identity.ts).
export { COMMON_FLAGS, COMMON_USAGE, client, listItems, name };

// Aligned columns (src/util/table.ts; ipsan host list uses them too).
export { table };

function text(value: unknown): string {
  if (value === null || value === undefined || value === "") return "-";
  return String(value);
}

function bytes(value: unknown): string {
  return typeof value === "number" ? formatSize(value) : "-";
}

function ago(value: unknown): string {
  if (typeof value !== "string") return "-";
  const ms = Date.now() - Date.parse(value);
  if (!Number.isFinite(ms)) return "-";
  if (ms < 1000) return "now";
  if (ms < 120_000) return `${Math.round(ms / 1000)}s ago`;
  if (ms < 7_200_000) return `${Math.round(ms / 60_000)}m ago`;
  return value;
}

type Row = Record<string, unknown>;

interface LegRow {
  readonly unit: string;
  readonly state: string;
  readonly rebuild?: { readonly copiedBytes: number; readonly totalBytes: number } | null;
}

/** One leg in the LEGS column: "u1:in-sync", "u3:rebuilding 42%" while a rebuild reports progress. */
export function legCell(leg: LegRow): string {
  const rebuild = leg.rebuild;
  const percent = rebuild === null || rebuild === undefined || rebuild.totalBytes <= 0 ? "" : ` ${Math.floor((100 * rebuild.copiedBytes) / rebuild.totalBytes)}%`;
  return `${leg.unit}:${leg.state}${percent}`;
}

const LISTINGS = {
  units: {
    path: "/api/v1/units",
    // SPARE and ZONE last: the columns before them keep their places.
    headers: ["NAME", "STATE", "ADDRESS", "NBD", "CAPACITY", "FREE", "VOLUMES", "SEEN", "SPARE", "ZONE"],
    row: (u: Row) => {
      const nbd = u["nbd"] as { host: string; port: number } | null;
      // ADDRESS: where the unit serves (its NBD listener's address unless that is a wildcard), not its packets' source.
      const addresses = (u["addresses"] as string[] | undefined) ?? [];
      const serving = nbd === null || nbd === undefined ? null : reachableNbd(nbd, addresses);
      return [
        text(u["name"]),
        text(u["state"]),
        text(serving?.host ?? addresses[0]),
        nbd === null || nbd === undefined ? "-" : `${nbd.host}:${nbd.port}`,
        bytes(u["capacityBytes"]),
        bytes(u["freeBytes"]),
        text(u["volumeCount"]),
        ago(u["lastSeenAt"]),
        u["spare"] === true ? "spare" : "-",
        text(u["zone"]),
      ];
    },
  },
  volumes: {
    path: "/api/v1/volumes",
    headers: ["UNIT", "NAME", "NUMBER", "SIZE", "EXTENTS", "PARTITIONS", "ASSIGNED-TO"],
    row: (v: Row) => [
      text(v["unit"]),
      text(v["name"]),
      text(v["number"]),
      bytes(v["sizeBytes"]),
      ((v["extents"] as { startLba: number; endLba: number }[] | undefined) ?? []).map((e) => `${e.startLba}-${e.endLba}`).join(",") || "-",
      text(((v["partitions"] as unknown[] | undefined) ?? []).length || null),
      text(v["assignedTo"]),
    ],
  },
  hosts: {
    path: "/api/v1/hosts",
    // SPARE last: the columns before it keep their places (a spare host takes over a failed one's volumes).
    headers: ["NAME", "ADDRESS", "STATE", "SEEN", "SPARE", "IQN"],
    row: (h: Row) => [text(h["name"]), text(h["address"]), text(h["state"]), ago(h["lastSeenAt"]), h["spare"] === true ? "spare" : "-", text(h["iqn"])],
  },
  assignments: {
    path: "/api/v1/assignments",
    // COPIES, then LEGS, then PROTOCOL, last: the columns before them keep their places for whoever reads the table.
    headers: ["ID", "HOST", "ADDRESS", "UNIT", "EXPORT", "SIZE", "STATE", "URI", "COPIES", "LEGS", "PROTOCOL"],
    row: (a: Row) => {
      // A mirror: every leg's unit (leg 0 first); its URI is the host engine's, not the station's.
      const legs = (a["legs"] as LegRow[] | undefined) ?? [];
      return [
        text(a["id"]),
        text(a["host"]),
        text(a["hostAddress"]),
        legs.length > 0 ? legs.map((l) => l.unit).join("+") : text(a["unit"]),
        text(a["export"]),
        bytes(a["sizeBytes"]),
        text(a["state"]),
        legs.length > 0 ? "(mirror:host-engine)" : text(a["uri"]),
        text(a["copies"] ?? 1),
        legs.length > 0 ? legs.map(legCell).join(" ") : "-",
        text(a["protocol"] ?? "nbd"),
      ];
    },
  },
} as const;

type ListingName = keyof typeof LISTINGS;

async function listing(which: ListingName, argv: readonly string[]): Promise<number> {
  const usage = `ipsan ${which} [--json]${which === "assignments" ? " [--all] [--host NAME]" : ""}${which === "volumes" ? " [--unit NAME] [--free]" : ""} [--station URL] [--token-file FILE]`;
  const { values, positionals } = parseFlags(
    argv,
    { ...COMMON_FLAGS, json: { type: "boolean" }, all: { type: "boolean" }, host: { type: "string" }, unit: { type: "string" }, free: { type: "boolean" } },
    true,
  );
  if (values.help === true) {
    process.stdout.write(`usage: ${usage}\n${COMMON_USAGE}`);
    return 0;
  }
  noMore(positionals, 0, usage);
  const query = new URLSearchParams();
  if (which === "assignments") {
    if (values.all === true) query.set("all", "true");
    if (values.host !== undefined) query.set("host", name(values.host, "--host"));
  } else if (values.all !== undefined || values.host !== undefined) {
    throw new UsageError(`--all and --host apply to "ipsan assignments" only\nusage: ${usage}`);
  }
  if (which === "volumes") {
    if (values.unit !== undefined) query.set("unit", name(values.unit, "--unit"));
    if (values.free === true) query.set("free", "true");
  } else if (values.unit !== undefined || values.free !== undefined) {
    throw new UsageError(`--unit and --free apply to "ipsan volumes" only\nusage: ${usage}`);
  }
  const api = await client(values);
  const spec = LISTINGS[which];
  // Volumes and assignments come in pages (nextOffset); follow them, bounded.
  const items: Row[] = [];
  let offset = 0;
  for (let pages = 0; pages < LIST_PAGES_MAX; pages++) {
    if (offset > 0) query.set("offset", String(offset));
    const body = await api.call("GET", `${spec.path}${query.size > 0 ? `?${query}` : ""}`);
    items.push(...listItems<Row>(body, which));
    const next = (body as { nextOffset?: unknown } | undefined)?.nextOffset;
    if (typeof next !== "number" || next <= offset) break;
    offset = next;
  }
  if (values.json === true) {
    printItems(items);
    return 0;
  }
  const rows = items.map((item) => spec.row(item));
  if (which === "units" && items.length > 0) rows.push(poolTotalRow(items));
  process.stdout.write(table(spec.headers, rows));
  return 0;
}

/** The last row of `ipsan units`: the pool's totals (issue 9 item 13); --json stays the API's items. */
function poolTotalRow(units: readonly Row[]): string[] {
  const sum = (field: string): number => units.reduce((total, u) => total + (typeof u[field] === "number" ? (u[field] as number) : 0), 0);
  const online = units.filter((u) => u["state"] === "online").length;
  return ["TOTAL", `${online}/${units.length} online`, "-", "-", bytes(sum("capacityBytes")), bytes(sum("freeBytes")), text(sum("volumeCount")), "-", "-", "-"];
}

export const unitsMain = async (argv: readonly string[]): Promise<number> => {
  // ipsan units identity|rotate-secret|forget NAME: unit identities (issue 7), src/admin/unit_identity.ts
  if (argv[0] === "identity" || argv[0] === "rotate-secret" || argv[0] === "forget") return (await import("./unit_identity.ts")).unitIdentityMain(argv);
  return listing("units", argv);
};
export const volumesMain = (argv: readonly string[]): Promise<number> => listing("volumes", argv);
export const hostsMain = (argv: readonly string[]): Promise<number> =>
  argv[0] === "token"
    ? hostsTokenMain(argv.slice(1))
    : argv[0] === "rotate-key"
      ? hostsRotateKeyMain(argv.slice(1))
      : argv[0] === "register"
        ? hostsRegisterMain(argv.slice(1))
        : listing("hosts", argv);
export const assignmentsMain = (argv: readonly string[]): Promise<number> => listing("assignments", argv);

const VOLUME_USAGE = `usage: ipsan volume create UNIT NAME SIZE
       ipsan volume delete UNIT NAME
       ipsan volume grow UNIT NAME SIZE          (SIZE: the new total size)
       ipsan volume partition UNIT NAME SIZE...       (sizes as arguments or comma-separated; "none": no partitions)
       ipsan volume wipe UNIT NAME               (zero it all; refused while assigned)
  [--json] [--station URL] [--token-file FILE]
`;

function printVolume(volume: unknown, json: boolean): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(volume, null, 2)}\n`);
    return;
  }
  process.stdout.write(table(LISTINGS.volumes.headers, [LISTINGS.volumes.row(volume as Row)]));
}

export async function volumeMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" } }, true);
  if (values.help === true) {
    process.stdout.write(`${VOLUME_USAGE}${COMMON_USAGE}`);
    return 0;
  }
  const [action, ...rest] = positionals;
  const json = values.json === true;
  switch (action) {
    case "create": {
      const unit = name(rest[0], "UNIT");
      const volume = name(rest[1], "NAME");
      const sizeBytes = size(rest[2], "SIZE");
      noMore(rest, 3, "ipsan volume create UNIT NAME SIZE");
      printVolume(await (await client(values)).call("POST", "/api/v1/volumes", { unit, name: volume, sizeBytes }), json);
      return 0;
    }
    case "delete": {
      const unit = name(rest[0], "UNIT");
      const volume = name(rest[1], "NAME");
      noMore(rest, 2, "ipsan volume delete UNIT NAME");
      await (await client(values)).call("DELETE", `/api/v1/volumes/${unit}/${volume}`);
      process.stdout.write(json ? `${JSON.stringify({ unit, name: volume, deleted: true }, null, 2)}\n` : `deleted volume ${unit}/${volume}\n`);
      return 0;
    }
    case "grow": {
      const unit = name(rest[0], "UNIT");
      const volume = name(rest[1], "NAME");
      const sizeBytes = size(rest[2], "SIZE");
      noMore(rest, 3, "ipsan volume grow UNIT NAME SIZE");
      printVolume(await (await client(values)).call("POST", `/api/v1/volumes/${unit}/${volume}/grow`, { sizeBytes }), json);
      return 0;
    }
    case "partition": {
      const unit = name(rest[0], "UNIT");
      const volume = name(rest[1], "NAME");
      if (rest[2] === undefined) throw new UsageError(`missing SIZE... (or "none")\n${VOLUME_USAGE}`);
      // One grammar with ipsan unit volume partition: sizes as separate arguments, comma-separated, or both.
      const sizesBytes = parsePartitionSizes(rest.slice(2));
      const answer = await (await client(values)).call("PUT", `/api/v1/volumes/${unit}/${volume}/partitions`, { sizesBytes });
      if (json) process.stdout.write(`${JSON.stringify(answer, null, 2)}\n`);
      else {
        const partitions = ((answer as Row)["partitions"] as Row[] | undefined) ?? [];
        process.stdout.write(
          partitions.length === 0
            ? `volume ${unit}/${volume} has no partitions\n`
            : table(
                ["EXPORT", "START-LBA", "END-LBA", "SIZE"],
                partitions.map((p) => [text(p["name"]), text(p["startLba"]), text(p["endLba"]), bytes(p["sizeBytes"])]),
              ),
        );
      }
      return 0;
    }
    case "wipe": {
      const unit = name(rest[0], "UNIT");
      const volume = name(rest[1], "NAME");
      noMore(rest, 2, "ipsan volume wipe UNIT NAME");
      // A wipe can take long: ask for its task at once and follow it (progress on a TTY).
      const answer = (await (await client(values)).call("POST", `/api/v1/volumes/${unit}/${volume}/wipe`, {}, { respondAsync: true })) as Row;
      if (json) process.stdout.write(`${JSON.stringify(answer, null, 2)}\n`);
      else process.stdout.write(`wiped volume ${unit}/${volume} (${bytes(answer["wipedBytes"])})\n`);
      return 0;
    }
    case undefined:
      throw new UsageError(`missing action (create, delete, grow, partition, wipe)\n${VOLUME_USAGE}`);
    default:
      throw new UsageError(`unknown action "${action}" (create, delete, grow, partition, wipe)\n${VOLUME_USAGE}`);
  }
}

export async function assignMain(argv: readonly string[]): Promise<number> {
  const usage = "ipsan assign HOST UNIT VOLUME [--partition N] [--protocol nbd|iscsi] [--json] [--station URL] [--token-file FILE]";
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" }, partition: { type: "string" }, protocol: { type: "string" } }, true);
  if (values.help === true) {
    process.stdout.write(`usage: ${usage}\n${COMMON_USAGE}`);
    return 0;
  }
  const host = name(positionals[0], "HOST");
  const unit = name(positionals[1], "UNIT");
  const volume = name(positionals[2], "VOLUME");
  noMore(positionals, 3, usage);
  let partition: number | undefined;
  if (values.partition !== undefined) {
    if (!/^[1-9][0-9]{0,3}$/.test(values.partition)) throw new UsageError(`--partition: invalid partition number "${values.partition}" (1, 2, ...)`);
    partition = Number(values.partition);
  }
  if (values.protocol !== undefined && values.protocol !== "nbd" && values.protocol !== "iscsi") {
    throw new UsageError(`--protocol: invalid "${values.protocol}" (expected nbd or iscsi)`);
  }
  const answer = (await (await client(values)).call("POST", "/api/v1/assignments", {
    host,
    unit,
    volume,
    ...(partition === undefined ? {} : { partition }),
    ...(values.protocol === undefined ? {} : { protocol: values.protocol }),
  })) as Row;
  if (values.json === true) process.stdout.write(`${JSON.stringify(answer, null, 2)}\n`);
  else {
    process.stdout.write(
      `assignment ${text(answer["id"])}: host ${host} (${text(answer["hostAddress"])}) gets ${unit}/${text(answer["export"])}, ` +
        `${bytes(answer["sizeBytes"])}, LBA ${text(answer["startLba"])}-${text(answer["endLba"])}\nuri ${text(answer["uri"])}\n`,
    );
  }
  return 0;
}

export async function unassignMain(argv: readonly string[]): Promise<number> {
  const usage = "ipsan unassign ID [--json] [--station URL] [--token-file FILE]";
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" } }, true);
  if (values.help === true) {
    process.stdout.write(`usage: ${usage}\n${COMMON_USAGE}`);
    return 0;
  }
  const id = positionals[0];
  if (id === undefined) throw new UsageError(`missing ID\nusage: ${usage}`);
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(id)) throw new UsageError(`ID: invalid assignment id "${id}"`);
  noMore(positionals, 1, usage);
  const answer = await (await client(values)).call("DELETE", `/api/v1/assignments/${id}`);
  // --json: {id, state}: "released" (the unit revoked the grant) or the assignment as the station keeps it (revoking).
  if (values.json === true) process.stdout.write(`${JSON.stringify(answer === undefined ? { id, state: "released" } : answer, null, 2)}\n`);
  else process.stdout.write(answer === undefined ? `unassigned ${id}: the unit revoked the grant\n` : `unassign ${id} recorded; the unit is told when it is reachable\n`);
  return 0;
}

// ---------------------------------------------------------------- credentials and audit (docs/security.md)

const TOKENS_USAGE = `usage: ipsan tokens create --name NAME --role admin|operator|viewer [--json]
       ipsan tokens list [--json]
       ipsan tokens revoke NAME [--json]
  [--station URL] [--token-file FILE] [--ca-file FILE]    (an admin token)
`;

const TOKEN_HEADERS = ["NAME", "KIND", "ROLE", "HOST", "CREATED", "EXPIRES", "USED"];
const tokenRow = (t: Row): string[] => [text(t["name"]), text(t["kind"]), text(t["role"]), text(t["host"]), text(t["createdAt"]), text(t["expiresAt"]), text(t["usedAt"])];

/** The secret goes alone to stdout (so `> FILE` keeps it), what it is to stderr: it is shown this once. */
function printSecret(answer: Row, json: boolean, what: string): void {
  if (json) {
    process.stdout.write(`${JSON.stringify(answer, null, 2)}\n`);
    return;
  }
  process.stderr.write(`${what}; its secret follows, shown this once (the station keeps only its SHA-256):\n`);
  process.stdout.write(`${text(answer["token"])}\n`);
}

export async function tokensMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" }, name: { type: "string" }, role: { type: "string" } }, true);
  if (values.help === true) {
    process.stdout.write(`${TOKENS_USAGE}${COMMON_USAGE}`);
    return 0;
  }
  const [action, ...rest] = positionals;
  const json = values.json === true;
  switch (action) {
    case "create": {
      noMore(rest, 0, "ipsan tokens create --name NAME --role ROLE");
      const tokenName = name(values.name, "--name");
      const role = values.role;
      if (role !== "admin" && role !== "operator" && role !== "viewer") throw new UsageError(`--role: expected admin, operator or viewer, got "${role ?? ""}"`);
      const answer = (await (await client(values)).call("POST", "/api/v1/tokens", { name: tokenName, role })) as Row;
      printSecret(answer, json, `token ${tokenName} (role ${role}) created`);
      return 0;
    }
    case "list": {
      noMore(rest, 0, "ipsan tokens list");
      const items = listItems<Row>(await (await client(values)).call("GET", "/api/v1/tokens"), "tokens");
      if (json) printItems(items);
      else process.stdout.write(table(TOKEN_HEADERS, items.map(tokenRow)));
      return 0;
    }
    case "revoke": {
      const tokenName = rest[0];
      if (tokenName === undefined || !/^[A-Za-z0-9][A-Za-z0-9_.:-]{0,80}$/.test(tokenName)) throw new UsageError(`NAME: missing or invalid token name "${tokenName ?? ""}"\n${TOKENS_USAGE}`);
      noMore(rest, 1, "ipsan tokens revoke NAME");
      await (await client(values)).call("DELETE", `/api/v1/tokens/${encodeURIComponent(tokenName)}`);
      process.stdout.write(json ? `${JSON.stringify({ name: tokenName, revoked: true }, null, 2)}\n` : `revoked ${tokenName}: the station refuses it from now on\n`);
      return 0;
    }
    case undefined:
      throw new UsageError(`missing action (create, list, revoke)\n${TOKENS_USAGE}`);
    default:
      throw new UsageError(`unknown action "${action}" (create, list, revoke)\n${TOKENS_USAGE}`);
  }
}

const HOSTS_TOKEN_USAGE = `usage: ipsan hosts token create [--host NAME] [--expires DURATION] [--json] [--station URL] [--token-file FILE] [--ca-file FILE]
  a one-time join token for "ipsan host register"; --host: only that host may use it;
  --expires: how long it stays valid (e.g. 30m, 2h; default 1h, at most 7 days)
`;

async function hostsTokenMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" }, host: { type: "string" }, expires: { type: "string" } }, true);
  if (values.help === true) {
    process.stdout.write(`${HOSTS_TOKEN_USAGE}${COMMON_USAGE}`);
    return 0;
  }
  if (positionals[0] !== "create") throw new UsageError(`expected "ipsan hosts token create"\n${HOSTS_TOKEN_USAGE}`);
  noMore(positionals, 1, "ipsan hosts token create [--host NAME] [--expires DURATION]");
  const host = values.host === undefined ? undefined : name(values.host, "--host");
  if (values.expires !== undefined) parseDuration(values.expires, "--expires");
  const answer = (await (await client(values)).call("POST", "/api/v1/join-tokens", {
    ...(host === undefined ? {} : { host }),
    ...(values.expires === undefined ? {} : { expires: values.expires }),
  })) as Row;
  printSecret(answer, values.json === true, `join token ${text(answer["name"])}${host === undefined ? "" : ` for host ${host}`}, one use, valid until ${text(answer["expiresAt"])}`);
  return 0;
}

const HOSTS_ROTATE_KEY_USAGE = `usage: ipsan hosts rotate-key NAME [--json] [--station URL] [--token-file FILE] [--ca-file FILE]
  new NBD keys (TLS-PSK) for every unit the host holds a volume on: the units get them at once,
  connections made with the old keys stay until they close; the host's agent (or its next
  "ipsan host attach") writes the new key files
`;

const HOSTS_REGISTER_USAGE = `usage: ipsan hosts register NAME --address IP [--spare] [--iqn IQN] [--json]
  records a host (or changes its address) with an admin or operator token: PUT /api/v1/hosts/NAME.
  --iqn: the host's iSCSI initiator name (iscsi assignments need it; "" removes it).
  A host that registers itself uses a join token instead: ipsan hosts token create, then on the host
  ipsan host register (docs/host.md "Identity").
`;

/** `ipsan hosts register NAME --address IP [--spare]` (issue 9 item 6: the error used to say to use curl). */
async function hostsRegisterMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(
    argv,
    { ...COMMON_FLAGS, address: { type: "string" }, spare: { type: "boolean" }, iqn: { type: "string" }, json: { type: "boolean" } },
    true,
  );
  if (values.help === true) {
    process.stdout.write(`${HOSTS_REGISTER_USAGE}${COMMON_USAGE}`);
    return 0;
  }
  if (positionals[0] === undefined) throw new UsageError(`a host NAME is required\n${HOSTS_REGISTER_USAGE}`);
  noMore(positionals, 1, "ipsan hosts register NAME --address IP");
  const host = name(positionals[0], "NAME");
  if (values.address === undefined || values.address === "") throw new UsageError(`--address IP is required (where the host's NBD connections come from)\n${HOSTS_REGISTER_USAGE}`);
  const answer = await (await client(values)).registerHost(host, values.address, values.spare === true ? true : undefined, values.iqn);
  const view = (answer ?? (await (await client(values)).call("GET", `/api/v1/hosts/${encodeURIComponent(host)}`))) as Row;
  if (values.json === true) process.stdout.write(`${JSON.stringify(view, null, 2)}\n`);
  else {
    const iqn = typeof view["iqn"] === "string" ? `, iSCSI initiator ${view["iqn"]}` : "";
    process.stdout.write(`host ${text(view["name"])} registered at ${text(view["address"])}${view["spare"] === true ? " (spare)" : ""}${iqn}\n`);
  }
  return 0;
}

async function hostsRotateKeyMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" } }, true);
  if (values.help === true) {
    process.stdout.write(`${HOSTS_ROTATE_KEY_USAGE}${COMMON_USAGE}`);
    return 0;
  }
  if (positionals[0] === undefined) throw new UsageError(`a host NAME is required\n${HOSTS_ROTATE_KEY_USAGE}`);
  noMore(positionals, 1, "ipsan hosts rotate-key NAME");
  const host = name(positionals[0], "NAME");
  const answer = await (await client(values)).rotateHostKey(host);
  process.stdout.write(values.json === true ? `${JSON.stringify(answer)}\n` : `host ${answer.host}: NBD keys rotated (epoch ${answer.keyEpoch})\n`);
  return 0;
}

const AUDIT_USAGE = `usage: ipsan audit verify [--file PATH] [--json]     (without --file: the station's DATA/audit.log, through its API)
       ipsan audit list [--limit N] [--json]
  [--station URL] [--token-file FILE] [--ca-file FILE]    (an admin token)
  verify exits 1 and names the first bad entry when the chain is broken
`;

export async function auditMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(argv, { ...COMMON_FLAGS, json: { type: "boolean" }, file: { type: "string" }, limit: { type: "string" } }, true);
  if (values.help === true) {
    process.stdout.write(`${AUDIT_USAGE}${COMMON_USAGE}`);
    return 0;
  }
  const [action, ...rest] = positionals;
  const json = values.json === true;
  switch (action) {
    case "verify": {
      noMore(rest, 0, "ipsan audit verify [--file PATH]");
      const verdict = (values.file !== undefined ? await verifyAuditFile(values.file) : await (await client(values)).call("GET", "/api/v1/audit/verify")) as Row;
      const where = values.file ?? text(verdict["file"]);
      if (json) process.stdout.write(`${JSON.stringify(verdict, null, 2)}\n`);
      else if (verdict["ok"] === true) process.stdout.write(`audit log ${where}: ${text(verdict["entries"])} entries, chain intact\n`);
      else {
        process.stdout.write(
          `audit log ${where}: BROKEN at line ${text(verdict["line"])}${verdict["seq"] === null ? "" : ` (seq ${text(verdict["seq"])})`}: ${text(verdict["reason"])}; ` +
            `${text(verdict["entries"])} entries before it are intact\n`,
        );
      }
      return verdict["ok"] === true ? 0 : 1;
    }
    case "list": {
      noMore(rest, 0, "ipsan audit list");
      if (values.limit !== undefined && !/^[1-9][0-9]{0,5}$/.test(values.limit)) throw new UsageError(`--limit: invalid "${values.limit}" (a whole number 1..10000)`);
      const items = listItems<Row>(await (await client(values)).call("GET", `/api/v1/audit${values.limit === undefined ? "" : `?limit=${values.limit}`}`), "audit");
      if (json) printItems(items);
      else {
        process.stdout.write(
          table(
            ["SEQ", "TIME", "ACTOR", "ROLE", "ACTION", "IDS", "FROM", "STATUS"],
            items.map((e) => [
              text(e["seq"]),
              text(e["time"]),
              text(e["actor"]),
              text(e["role"]),
              text(e["action"]),
              Object.entries((e["ids"] as Record<string, string> | undefined) ?? {}).map(([k, v]) => `${k}=${v}`).join(",") || "-",
              text(e["from"]),
              text(e["status"]),
            ]),
          ),
        );
      }
      return 0;
    }
    case undefined:
      throw new UsageError(`missing action (verify, list)\n${AUDIT_USAGE}`);
    default:
      throw new UsageError(`unknown action "${action}" (verify, list)\n${AUDIT_USAGE}`);
  }
}
