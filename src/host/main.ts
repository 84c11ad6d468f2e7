// `ipsan host SUBCOMMAND`: the host side of the SAN (seed Fig. 1, modules 9).
//   request  ask the station for a volume; print the assignment (nbd:// URI)
//   attach   make an assigned volume a local block device (kernel NBD or nbdfuse file),
//            or a local NBD URI (--mode nbd: a mirror's engine, started here)
//   detach   undo attach
//   release  detach if attached, then unassign at the station
//   register enrol this host with a one-time join token; store its own credential
//   agent    register, heartbeat, keep recorded volumes attached
//   list     this host's recorded attachments
// docs/host.md is the user's guide; every flag error names the flag and value.

import { CONFIG_SETTINGS, setting, type ConfigKey } from "../util/config.ts";
import { randomUUID } from "node:crypto";
import { resolve } from "node:path";
import { IpsanError, UsageError } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { formatSize, parseSize } from "../util/size.ts";
import {
  HEARTBEAT_INTERVAL_MS_DEFAULT,
  HEARTBEAT_INTERVAL_MS_MAX,
  HEARTBEAT_INTERVAL_MS_MIN,
  HostAgent,
} from "./agent.ts";
import { attach, attachIscsi, attachmentAlive, chooseMode, detach, type ModeChoice, type NbdAttachMode } from "./attach.ts";
import { HostState, defaultStateDir, notAttached, protocolOf, type AttachmentRecord } from "./state.ts";
import {
  StationClient,
  isMirror,
  formatStationUrls,
  parseStationUrls,
  readCaFile,
  readTokenFile,
  type AssignmentIscsi,
  type StationAssignment,
} from "./station_client.ts";
import { localizeAssignment } from "./keys.ts";
import { table } from "../util/table.ts";
import { iscsiNameProblem } from "../iscsi/names.ts";
import { progressLine, taskProgress } from "../util/progress.ts";
import { checkExport, type ExportToCheck } from "./preflight.ts";

const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
const REQUEST_ID_PATTERN = /^[A-Za-z0-9_.:-]{1,128}$/;

export const USAGE = `usage: ipsan host SUBCOMMAND [flags]

  register --station URL --token-file JOIN_TOKEN_FILE --host NAME [--address IP] [--iqn IQN]
          [--state-dir DIR] [--ca-file FILE] [--json]
  request --station URL --token-file FILE --host NAME --size SIZE [--copies 1|2|3]
          [--protocol nbd|iscsi] [--iqn IQN] [--address IP] [--request-id ID] [--dry-run]
          [--state-dir DIR] [--json]
  attach  --station URL --token-file FILE --host NAME (--assignment ID | --volume UNIT/VOLUME)
          [--mode auto|fuse|kernel|nbd|iscsi] [--state-dir DIR] [--json]
  detach  (--assignment ID | --volume UNIT/VOLUME | --path PATH) [--force] [--state-dir DIR]
  release --station URL --token-file FILE --host NAME (--assignment ID | --volume UNIT/VOLUME)
          [--force] [--state-dir DIR] [--json]
  agent   --station URL --token-file FILE --host NAME [--address IP] [--iqn IQN] [--heartbeat-ms N]
          [--state-dir DIR] [--no-reattach] [--spare] [--takeover-mode nbd|fuse]
  list    [--state-dir DIR] [--json]
  engine  --mirror ID (--leg NAME=URI... | --legs-file PATH) --listen ADDRESS ...
          the mirror engine, started by attach (see "ipsan host engine --help" text in docs/host.md)

After "register", request/attach/release/agent read the station URL, the host name and the
host's credential from the state dir: --station, --token-file and --host may be left out
(given, they win). --ca-file FILE (or $IPSAN_CA_FILE): the CA of an https:// station.
--station URL,URL,... (up to 16): several stations sharing one state; a call tries the next
when one does not answer or answers 503 (docs/host.md "Several stations").
--iqn IQN (or $IPSAN_IQN, or "iqn" in the config file): this host's iSCSI initiator name
(on Linux: /etc/iscsi/initiatorname.iscsi), recorded at the station; --protocol iscsi needs it.
`;

const STATION_FLAGS = {
  station: { type: "string" },
  "token-file": { type: "string" },
  host: { type: "string" },
  "ca-file": { type: "string" },
  "state-dir": { type: "string" },
} as const;

const SUBCOMMANDS: Readonly<Record<string, (argv: readonly string[]) => Promise<number>>> = {
  register: registerMain,
  request: requestMain,
  attach: attachMain,
  detach: detachMain,
  release: releaseMain,
  agent: agentMain,
  list: listMain,
  engine: async (argv) => (await import("./engine/engine.ts")).engineMain(argv),
};

export async function hostMain(argv: readonly string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "help" || name === "--help" || name === "-h") {
    process.stdout.write(USAGE);
    return name === undefined ? 2 : 0;
  }
  const sub = SUBCOMMANDS[name];
  if (sub === undefined) throw new UsageError(`unknown subcommand "${name}"\n${USAGE}`);
  return sub(rest);
}

function required(value: string | undefined, flag: string): string {
  if (value === undefined || value === "") throw new UsageError(`--${flag} is required`);
  return value;
}

function hostName(value: string | undefined, hint = ""): string {
  if (value === undefined || value === "") throw new UsageError(`--host is required${hint}`);
  const name = value;
  if (!NAME_PATTERN.test(name)) throw new UsageError(`--host: invalid host name "${name}" (letters, digits, _ . -; at most 63)`);
  return name;
}

interface StationValues {
  station?: string | undefined;
  "token-file"?: string | undefined;
  host?: string | undefined;
  "ca-file"?: string | undefined;
  "state-dir"?: string | undefined;
}

/**
 * The station client and this host's name: from the flags, else from the
 * credential `ipsan host register` stored in the state dir (flags win, so
 * --token-file with the admin token keeps working).
 */
async function connectStation(values: StationValues & { json?: boolean | undefined }): Promise<{ client: StationClient; host: string; address: string | null }> {
  const stored = await stateOf(values["state-dir"]).readCredential();
  const hint = stored === undefined ? " (or register this host first: ipsan host register)" : "";
  // Each: the flag, its environment variable, the host's stored credential, then the config file (src/util/config.ts).
  const env = (key: ConfigKey): string | undefined => {
    const value = process.env[CONFIG_SETTINGS[key].env];
    return value === undefined || value === "" ? undefined : value;
  };
  const station = values.station ?? env("station") ?? stored?.station ?? setting("station", undefined);
  if (station === undefined || station === "") throw new UsageError(`--station is required${hint}`);
  const host = hostName(values.host ?? env("host") ?? stored?.host ?? setting("host", undefined), hint);
  let token: string;
  const tokenFile = values["token-file"] ?? env("token-file");
  if (tokenFile !== undefined) token = await readTokenFile(tokenFile);
  else if (stored !== undefined && stored.host === host) token = stored.token;
  else {
    const fromConfig = setting("token-file", undefined);
    if (fromConfig === undefined) throw new UsageError(`--token-file is required${stored === undefined ? hint : ` (the stored credential is host ${stored.host}'s, not ${host}'s)`}`);
    token = await readTokenFile(fromConfig);
  }
  const ca = await readCaFile(values["ca-file"] ?? stored?.caFile ?? undefined);
  // A task the station answers 202 for (an allocation, an unassign) is followed with its progress on a TTY (not with --json).
  const onTask = taskProgress({ json: values.json === true });
  const client = new StationClient({ baseUrl: parseStationUrls(station), token, ...(ca === undefined ? {} : { ca }), ...(onTask === undefined ? {} : { onTask }) });
  return { client, host, address: stored !== undefined && stored.host === host ? stored.address : null };
}

function stateOf(dir: string | undefined): HostState {
  return new HostState(setting("state-dir", dir) ?? defaultStateDir());
}

function print(json: boolean, value: unknown, text: string): void {
  process.stdout.write(json ? `${JSON.stringify(value)}\n` : text);
}

// ---------------------------------------------------------------- register

async function registerMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, { ...STATION_FLAGS, address: { type: "string" }, iqn: { type: "string" }, json: { type: "boolean" } });
  const stations = parseStationUrls(required(setting("station", values.station), "station"));
  const host = hostName(values.host);
  const iqn = iqnSetting(values.iqn);
  const joinToken = await readTokenFile(required(values["token-file"], "token-file"));
  const caFile = values["ca-file"] ?? process.env["IPSAN_CA_FILE"];
  const ca = await readCaFile(values["ca-file"]);
  const client = new StationClient({ baseUrl: stations, token: joinToken, ...(ca === undefined ? {} : { ca }) });
  const body = { ...(values.address === undefined ? {} : { address: values.address }), ...(iqn === undefined ? {} : { iqn }) };
  const answer = (await client.call("POST", `/api/v1/hosts/${encodeURIComponent(host)}/register`, body)) as {
    host?: { address?: unknown } | null;
    credential?: { name?: unknown };
    token?: unknown;
  };
  if (typeof answer?.token !== "string" || answer.token === "") throw new IpsanError("IO_ERROR", "the station answered a registration without a credential");
  const state = stateOf(values["state-dir"]);
  const address = typeof answer.host?.address === "string" ? answer.host.address : null;
  await state.writeCredential({
    version: 1,
    station: formatStationUrls(stations),
    host,
    token: answer.token,
    address,
    caFile: caFile === undefined || caFile === "" ? null : resolve(caFile),
  });
  const credentialName = typeof answer.credential?.name === "string" ? answer.credential.name : `host:${host}`;
  print(
    values.json === true,
    { host, station: formatStationUrls(stations), address, credential: credentialName, file: state.credentialPath },
    `registered host ${host} (address ${address ?? "-"}) with station ${stations.map((url) => url.origin).join(",")}; credential ${credentialName} in ${state.credentialPath}\n`,
  );
  return 0;
}

// ---------------------------------------------------------------- request

async function requestMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    ...STATION_FLAGS,
    size: { type: "string" },
    copies: { type: "string" },
    protocol: { type: "string" },
    iqn: { type: "string" },
    address: { type: "string" },
    "request-id": { type: "string" },
    "dry-run": { type: "boolean" },
    json: { type: "boolean" },
  });
  // Flags first: a bad --size or --copies is named even when the token file cannot be read.
  const sizeBytes = parseSize(required(values.size, "size"), "--size");
  if (sizeBytes <= 0 || sizeBytes % 512 !== 0) {
    throw new UsageError(`--size: "${values.size}" must be a positive multiple of 512 bytes`);
  }
  const copies = values.copies === undefined ? undefined : parseCopies(values.copies);
  const protocol = parseProtocol(values.protocol);
  const iqn = iqnSetting(values.iqn);
  const requestId = values["request-id"] ?? `req-${randomUUID()}`;
  if (!REQUEST_ID_PATTERN.test(requestId)) {
    throw new UsageError(`--request-id: invalid "${requestId}" (1-128 of A-Z a-z 0-9 _ . : -)`);
  }
  const { client, host } = await connectStation(values);
  // The host's data-path address (and IQN) is registered first, so the grant the unit gets names it.
  if (values.address !== undefined) await client.registerHost(host, values.address, undefined, iqn);
  else if (iqn !== undefined) await recordIqn(client, host, iqn);
  const request = {
    requestId,
    host,
    sizeBytes,
    ...(values.address === undefined ? {} : { address: values.address }),
    ...(values["dry-run"] === true ? { dryRun: true } : {}),
    ...(copies === undefined ? {} : { copies }),
    ...(protocol === undefined ? {} : { protocol }),
  };
  if (values["dry-run"] === true) {
    const answer = await client.call("POST", "/api/v1/allocations", request);
    print(values.json === true, answer, describeDryRun(answer));
    return 0;
  }
  // A unit that speaks TLS: the host's key file is written under the state dir and the URIs carry it.
  const assignment = await localizeAssignment(stateOf(values["state-dir"]), client, host, await client.allocate(request));
  // Before handing out a command: does the unit admit this machine, as the client will connect (issue 9 item 7)?
  // The request may be made for another machine (--host h1 from an admin's desk): a note, not a failure.
  const refusal = await firstRefusal(assignment, host);
  if (refusal !== null) process.stderr.write(`ipsan host request: note: the volume is assigned, but from this machine: ${refusal.message}\n`);
  print(values.json === true, assignment, describeAssignment(assignment, refusal === null));
  return 0;
}

/** The exports a host's client opens for an assignment: its URI, or each leg's for a mirror (the engine's). */
function exportsOf(a: StationAssignment, host: string): ExportToCheck[] {
  // iSCSI: the user's initiator logs in (with the CHAP secret attach writes); this NBD check does not apply.
  if (a.protocol === "iscsi") return [];
  const hostAddress = a.hostAddress ?? null;
  if (isMirror(a)) return (a.legs ?? []).filter((l) => l.uri !== null).map((l) => ({ uri: l.uri ?? "", unit: l.unit, export: l.volume, host, hostAddress }));
  return a.uri === null ? [] : [{ uri: a.uri, unit: a.unit, export: a.export, host, hostAddress }];
}

/** The first refusal, explained, of an export of the assignment opened from this machine (null: none refused). */
async function firstRefusal(a: StationAssignment, host: string): Promise<IpsanError | null> {
  for (const target of exportsOf(a, host)) {
    const refusal = await checkExport(target);
    if (refusal === null) continue;
    // A pending assignment's grant may not have reached the unit yet.
    if (a.state === "pending") return new IpsanError("UNAVAILABLE", `${refusal.message}. The assignment is still pending: the station may not have told the unit yet; try again in a few seconds`);
    return refusal;
  }
  return null;
}

interface Placement {
  readonly kind?: string;
  readonly unit?: string;
  readonly volume?: string | null;
  readonly sizeBytes?: number;
}

/** A dry run's answer as text (docs/api.md: {dryRun, placement, legs?, reasons}), never raw JSON (issue 9 item 11). */
function describeDryRun(answer: unknown): string {
  const plan = answer as { placement?: Placement | null; legs?: Placement[]; reasons?: { unit?: string; reason?: string }[] } | undefined;
  const one = (p: Placement): string =>
    p.kind === "reuse" ? `reuse volume ${p.volume ?? "?"} on unit ${p.unit ?? "?"} (${formatSize(p.sizeBytes ?? 0)})` : `carve ${formatSize(p.sizeBytes ?? 0)} on unit ${p.unit ?? "?"}`;
  const legs = plan?.legs ?? (plan?.placement === undefined || plan.placement === null ? [] : [plan.placement]);
  const reasons = (plan?.reasons ?? []).map((r) => `  ${r.unit ?? "?"}: ${r.reason ?? "?"}\n`).join("");
  if (legs.length === 0) return `dry run (nothing recorded): no placement\n${reasons}`;
  return `dry run (nothing recorded): would ${legs.map(one).join("; ")}\n${reasons === "" ? "" : `units not chosen:\n${reasons}`}`;
}

/** --protocol: nbd or iscsi (undefined: not given, the station's default nbd). */
function parseProtocol(text: string | undefined): "nbd" | "iscsi" | undefined {
  if (text === undefined) return undefined;
  if (text !== "nbd" && text !== "iscsi") throw new UsageError(`--protocol: invalid "${text}" (expected nbd or iscsi)`);
  return text;
}

/** --iqn, $IPSAN_IQN or the config file's "iqn": the host's iSCSI initiator name, checked here so a typo is named before any call. */
function iqnSetting(flag: string | undefined): string | undefined {
  const iqn = setting("iqn", flag);
  if (iqn === undefined || iqn === "") return undefined;
  const problem = iscsiNameProblem(iqn);
  if (problem !== undefined) throw new UsageError(`--iqn: ${problem}`);
  return iqn;
}

/** Records the host's IQN at the station without moving its address: a heartbeat carries it; an unknown host is registered. */
async function recordIqn(client: StationClient, host: string, iqn: string): Promise<void> {
  try {
    await client.heartbeat(host, iqn);
  } catch (error) {
    if (!(error instanceof IpsanError && error.code === "NOT_FOUND")) throw error;
    await client.registerHost(host, undefined, undefined, iqn);
  }
}

/** --copies: 1, 2 or 3 (legs on as many distinct units). */
function parseCopies(text: string): number {
  if (!/^[1-3]$/.test(text)) throw new UsageError(`--copies: invalid "${text}" (expected 1, 2 or 3)`);
  return Number(text);
}

function describeAssignment(a: StationAssignment, usable = true): string {
  if (a.protocol === "iscsi") {
    const where = a.iscsi === undefined || a.iscsi === null ? "(the unit's iSCSI portal is not known yet)" : `target ${a.iscsi.target} at ${a.iscsi.portal}, LUN ${a.iscsi.lun}`;
    return (
      `assignment ${a.id} (request ${a.requestId ?? "-"}): host ${a.host} gets volume ${a.export} on unit ${a.unit} over iSCSI, ` +
      `${formatSize(a.sizeBytes)} (${a.sizeBytes} bytes): ${where}
` +
      `uri ${a.uri ?? "-"}
` +
      `use it: ipsan host attach ... --assignment ${a.id}    (writes the CHAP secret and prints the iscsiadm, iscsi-ls and qemu-img commands)
`
    );
  }
  const lba = a.startLba === undefined ? "" : `, LBA ${a.startLba}-${a.endLba ?? "?"}`;
  const number = a.volumeNumber === undefined || a.volumeNumber === null ? "" : ` (number ${a.volumeNumber})`;
  if (isMirror(a)) {
    const legs = (a.legs ?? []).map((l, i) => `leg ${i}: volume ${l.volume} on unit ${l.unit}, ${formatSize(l.sizeBytes)}, ${l.state}, ${l.uri ?? "-"}\n`).join("");
    return (
      `assignment ${a.id} (request ${a.requestId ?? "-"}): host ${a.host} gets a mirrored volume of ` +
      `${formatSize(a.sizeBytes)} (${a.sizeBytes} bytes), ${a.copies ?? legs.length} copies:\n${legs}` +
      (usable ? `use it through the mirror engine: ipsan host attach ... --assignment ${a.id} --mode nbd\n` : `not usable from this machine (see the note on stderr)\n`)
    );
  }
  return (
    `assignment ${a.id} (request ${a.requestId ?? "-"}): host ${a.host} gets volume ${a.volume}${number} ` +
    `on unit ${a.unit} at ${a.nbdHost}:${a.nbdPort}, ${formatSize(a.sizeBytes)} (${a.sizeBytes} bytes${lba})\n` +
    `uri ${a.uri}\n` +
    (usable ? `use it: nbdinfo ${a.uri}    or: ipsan host attach ... --assignment ${a.id}\n` : `not usable from this machine (see the note on stderr)\n`)
  );
}

// ---------------------------------------------------------------- attach

function parseVolumeSpec(text: string): { unit: string; export: string } {
  const match = /^([A-Za-z0-9][A-Za-z0-9_.-]{0,62})\/([A-Za-z0-9][A-Za-z0-9_.-]{0,62}(?:\/p[0-9]{1,4})?)$/.exec(text);
  if (match === null) throw new UsageError(`--volume: invalid "${text}" (expected UNIT/VOLUME or UNIT/VOLUME/pN)`);
  return { unit: match[1] ?? "", export: match[2] ?? "" };
}

const ACTIVE_STATES = new Set(["active", "pending"]);

async function findAssignment(
  client: StationClient,
  host: string,
  values: { assignment?: string | undefined; volume?: string | undefined },
): Promise<StationAssignment> {
  if ((values.assignment === undefined) === (values.volume === undefined)) {
    throw new UsageError("give exactly one of --assignment ID or --volume UNIT/VOLUME");
  }
  let assignment: StationAssignment | undefined;
  if (values.assignment !== undefined) {
    assignment = (await client.call("GET", `/api/v1/assignments/${encodeURIComponent(values.assignment)}`)) as StationAssignment;
  } else {
    const spec = parseVolumeSpec(values.volume ?? "");
    const all = await client.call("GET", `/api/v1/assignments?host=${encodeURIComponent(host)}`);
    const items = (Array.isArray(all) ? all : ((all as { items?: StationAssignment[] }).items ?? [])) as StationAssignment[];
    assignment = items.find(
      (a) => a.host === host && a.unit === spec.unit && (a.export === spec.export || (a.volume === spec.export && a.partition === null)),
    );
    if (assignment === undefined) {
      throw new IpsanError("NOT_FOUND", `no assignment of volume ${values.volume} to host ${host} at the station`);
    }
  }
  if (assignment.host !== host) {
    throw new IpsanError("PERMISSION_DENIED", `assignment ${assignment.id} belongs to host ${assignment.host}, not ${host}`);
  }
  if (assignment.state !== undefined && !ACTIVE_STATES.has(assignment.state)) {
    throw new IpsanError("CONFLICT", `assignment ${assignment.id} is ${assignment.state}, not active`);
  }
  return assignment;
}

function parseMode(text: string | undefined): ModeChoice | "iscsi" {
  const mode = text ?? "auto";
  if (mode !== "auto" && mode !== "fuse" && mode !== "kernel" && mode !== "nbd" && mode !== "iscsi") {
    throw new UsageError(`--mode: invalid "${mode}" (expected auto, fuse, kernel, nbd or iscsi)`);
  }
  return mode;
}

/**
 * auto: the kernel client where it exists, else nbdfuse; for a mirror (no kernel mode yet) nbdfuse on its
 * engine; for a unit that speaks TLS (nbd-client has no TLS-PSK) nbdfuse, which takes the key file.
 */
function modeFor(choice: ModeChoice, assignment: StationAssignment): NbdAttachMode {
  if (choice === "auto" && (isMirror(assignment) || (assignment.uri ?? "").startsWith("nbds://"))) return "fuse";
  return chooseMode(choice);
}

function recordView(r: AttachmentRecord): Record<string, unknown> {
  return {
    assignment: r.assignmentId,
    assignmentId: r.assignmentId,
    path: r.path,
    mode: r.mode,
    uri: r.uri,
    unit: r.unit,
    volume: r.volume,
    export: r.export,
    sizeBytes: r.sizeBytes,
    pid: r.pid,
    mountpoint: r.mountpoint,
    device: r.device,
    host: r.host,
    station: r.station,
    state: r.state,
    engine: r.engine === undefined || r.engine === null ? null : { pid: r.engine.pid, uri: r.engine.uri, legs: r.engine.legs.map((l) => l.name) },
    protocol: protocolOf(r),
    iscsi: r.iscsi ?? null,
  };
}

async function attachMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    ...STATION_FLAGS,
    assignment: { type: "string" },
    volume: { type: "string" },
    mode: { type: "string" },
    json: { type: "boolean" },
  });
  const choice = parseMode(values.mode);
  const { client, host } = await connectStation(values);
  const state = stateOf(values["state-dir"]);
  const found = await findAssignment(client, host, values);
  if (found.protocol === "iscsi" || choice === "iscsi") return attachIscsiMain(state, client, host, found, values.mode, values.json === true);
  const assignment = await localizeAssignment(state, client, host, found);
  // Refused by a unit? Say why and how to proceed, before starting nbdfuse, nbd-client or an engine (issue 9 item 7).
  const refusal = await firstRefusal(assignment, host);
  if (refusal !== null) throw refusal;
  const mode = modeFor(choice, assignment);
  const record = await attach(state, { assignment, station: client.baseUrl.href, host, mode });
  print(values.json === true, recordView(record), `${record.path}\n`);
  return 0;
}

/**
 * attach for an iSCSI assignment: nothing is started here (the initiator,
 * open-iscsi's or libiscsi's, is the user's). The CHAP secret is written to
 * STATE_DIR/keys/UNIT.chap (0600), the attachment recorded (`list` shows it)
 * and the way to log in printed.
 */
async function attachIscsiMain(
  state: HostState,
  client: StationClient,
  host: string,
  assignment: StationAssignment,
  mode: string | undefined,
  json: boolean,
): Promise<number> {
  if (assignment.protocol !== "iscsi") {
    throw new UsageError(
      `--mode iscsi: assignment ${assignment.id} is served over NBD (protocol ${assignment.protocol ?? "nbd"}): attach it with --mode auto, fuse, kernel or nbd, ` +
        "or ask the station for an iSCSI one (ipsan host request ... --protocol iscsi)",
    );
  }
  if (mode !== undefined && mode !== "iscsi") {
    throw new UsageError(
      `--mode ${mode}: assignment ${assignment.id} is served over iSCSI, which this host's initiator (open-iscsi, libiscsi, qemu) logs in to itself: ` +
        "use --mode iscsi (or leave --mode out) to get the URI and the CHAP secret",
    );
  }
  const record = await attachIscsi(state, client, { assignment, station: client.baseUrl.href, host });
  const { iscsi } = record;
  const { chapSecretFile } = iscsi;
  const answer = { assignment: assignment.id, mode: "iscsi", uri: record.uri, chapUser: iscsi.chapUser, chapSecretFile };
  print(json, answer, describeIscsiLogin(assignment.id, iscsi, record.uri, chapSecretFile));
  return 0;
}

/** The commands that log in to an iSCSI assignment (docs/host.md "Attaching over iSCSI"). */
function describeIscsiLogin(id: string, iscsi: Pick<AssignmentIscsi, "portal" | "target" | "lun" | "chapUser">, uri: string, secretFile: string | null): string {
  const { portal, target, chapUser } = iscsi;
  const lines = [`assignment ${id}: iSCSI target ${target} at ${portal}, LUN ${iscsi.lun}`, `uri ${uri}`];
  if (chapUser === null || secretFile === null) {
    lines.push("no CHAP: the unit admits this host by address", "", `  iscsi-ls -s iscsi://${portal}`, `  iscsi-inq ${uri}`, `  qemu-img info ${uri}`);
  } else {
    const secret = `"$(cat ${secretFile})"`;
    lines.push(
      `CHAP user ${chapUser}, secret in ${secretFile} (0600); log in with this host's registered initiator name (IQN)`,
      "",
      "libiscsi (iscsi-ls, iscsi-inq, iscsi-readcapacity16):",
      `  LIBISCSI_CHAP_PASSWORD=${secret} iscsi-ls -i IQN -s iscsi://${chapUser}@${portal}`,
      `  LIBISCSI_CHAP_PASSWORD=${secret} iscsi-inq -i IQN iscsi://${chapUser}@${portal}/${target}/${iscsi.lun}`,
      "qemu (the secret stays in its file):",
      `  qemu-img info --object secret,id=chap,file=${secretFile} --image-opts driver=iscsi,transport=tcp,portal=${portal},target=${target},lun=${iscsi.lun},user=${chapUser},password-secret=chap,initiator-name=IQN`,
      "open-iscsi (Linux kernel initiator; IQN in /etc/iscsi/initiatorname.iscsi):",
      `  iscsiadm -m discoverydb -t sendtargets -p ${portal} -o new`,
      `  iscsiadm -m discoverydb -t sendtargets -p ${portal} -o update -n discovery.sendtargets.auth.authmethod -v CHAP`,
      `  iscsiadm -m discoverydb -t sendtargets -p ${portal} -o update -n discovery.sendtargets.auth.username -v ${chapUser}`,
      `  iscsiadm -m discoverydb -t sendtargets -p ${portal} -o update -n discovery.sendtargets.auth.password -v ${secret}`,
      `  iscsiadm -m discoverydb -t sendtargets -p ${portal} --discover`,
      `  iscsiadm -m node -T ${target} -p ${portal} -o update -n node.session.auth.authmethod -v CHAP`,
      `  iscsiadm -m node -T ${target} -p ${portal} -o update -n node.session.auth.username -v ${chapUser}`,
      `  iscsiadm -m node -T ${target} -p ${portal} -o update -n node.session.auth.password -v ${secret}`,
      `  iscsiadm -m node -T ${target} -p ${portal} --login`,
    );
  }
  return `${lines.join("\n")}\n`;
}

// ---------------------------------------------------------------- detach / release / list

async function findRecord(
  state: HostState,
  values: { assignment?: string | undefined; volume?: string | undefined; path?: string | undefined },
): Promise<AttachmentRecord | undefined> {
  const given = [values.assignment, values.volume, values.path].filter((v) => v !== undefined).length;
  if (given !== 1) throw new UsageError("give exactly one of --assignment ID, --volume UNIT/VOLUME or --path PATH");
  if (values.assignment !== undefined) return state.get(values.assignment);
  const records = await state.list();
  if (values.path !== undefined) return records.find((r) => r.path === values.path || r.mountpoint === values.path);
  const spec = parseVolumeSpec(values.volume ?? "");
  return records.find((r) => r.unit === spec.unit && (r.export === spec.export || r.volume === spec.export));
}

async function detachMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    ...STATION_FLAGS,
    assignment: { type: "string" },
    volume: { type: "string" },
    path: { type: "string" },
    force: { type: "boolean" },
    json: { type: "boolean" },
  });
  const state = stateOf(values["state-dir"]);
  const record = await findRecord(state, values);
  if (record === undefined) {
    throw notAttached(values.assignment ?? values.volume ?? values.path ?? "?", state.dir);
  }
  await detach(state, record, { force: values.force === true, progress: progressLine(`detach ${record.path}:`, { json: values.json === true }) });
  print(values.json === true, { detached: record.assignmentId, path: record.path }, `detached ${record.path}\n`);
  return 0;
}

async function releaseMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    ...STATION_FLAGS,
    assignment: { type: "string" },
    volume: { type: "string" },
    force: { type: "boolean" },
    json: { type: "boolean" },
  });
  const { client, host } = await connectStation(values);
  const state = stateOf(values["state-dir"]);
  const assignment = await findAssignment(client, host, values);
  const id = String(assignment.id);
  const record = await state.get(id);
  // A busy attachment is refused before the station is told anything: the volume stays assigned and attached.
  if (record !== undefined) await detach(state, record, { force: values.force === true, progress: progressLine(`detach ${record.path}:`, { json: values.json === true }) });
  await client.unassign(id);
  print(
    values.json === true,
    { released: id, unit: assignment.unit, volume: assignment.volume, detached: record?.path ?? null },
    `released assignment ${id} (volume ${assignment.unit}/${assignment.export})${record === undefined ? "" : `, detached ${record.path}`}\n`,
  );
  return 0;
}

async function listMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, { "state-dir": { type: "string" }, json: { type: "boolean" } });
  const state = stateOf(values["state-dir"]);
  const rows: Record<string, unknown>[] = [];
  const lines: string[][] = [];
  for (const r of await state.list()) {
    const alive = await attachmentAlive(r);
    rows.push({ ...recordView(r), alive });
    const iscsi = r.iscsi ?? null;
    lines.push([
      r.assignmentId,
      `${r.unit}/${r.export}`,
      protocolOf(r),
      r.mode,
      alive ? "attached" : "stale",
      iscsi === null ? "-" : iscsi.portal,
      iscsi === null ? "-" : `${iscsi.target} lun ${iscsi.lun}`,
      r.path,
    ]);
  }
  const text = table(["ASSIGNMENT", "VOLUME", "PROTOCOL", "MODE", "STATE", "PORTAL", "TARGET", "PATH"], lines);
  print(values.json === true, { items: rows }, lines.length === 0 ? `no attachments in ${state.dir}\n` : text);
  return 0;
}

// ---------------------------------------------------------------- agent

async function agentMain(argv: readonly string[]): Promise<number> {
  const { values } = parseFlags(argv, {
    ...STATION_FLAGS,
    address: { type: "string" },
    "heartbeat-ms": { type: "string" },
    "no-reattach": { type: "boolean" },
    spare: { type: "boolean" },
    iqn: { type: "string" },
    "takeover-mode": { type: "string" },
  });
  const iqn = iqnSetting(values.iqn);
  // A daemon: logs, never a progress line.
  const { client, host, address: storedAddress } = await connectStation({ ...values, json: true });
  const takeoverMode = values["takeover-mode"] ?? "nbd";
  if (takeoverMode !== "nbd" && takeoverMode !== "fuse") throw new UsageError(`--takeover-mode: invalid "${takeoverMode}" (expected nbd or fuse)`);
  const heartbeatIntervalMs = Number(values["heartbeat-ms"] ?? HEARTBEAT_INTERVAL_MS_DEFAULT);
  if (
    !Number.isSafeInteger(heartbeatIntervalMs) ||
    heartbeatIntervalMs < HEARTBEAT_INTERVAL_MS_MIN ||
    heartbeatIntervalMs > HEARTBEAT_INTERVAL_MS_MAX
  ) {
    throw new UsageError(
      `--heartbeat-ms: invalid "${values["heartbeat-ms"]}" (integer ${HEARTBEAT_INTERVAL_MS_MIN}..${HEARTBEAT_INTERVAL_MS_MAX})`,
    );
  }
  const agent = new HostAgent({
    client,
    state: stateOf(values["state-dir"]),
    host,
    // A registered host keeps the address the station has for it (its credential may not move it).
    address: values.address ?? storedAddress ?? undefined,
    heartbeatIntervalMs,
    reattach: values["no-reattach"] !== true,
    spare: values.spare === true,
    ...(iqn === undefined ? {} : { iqn }),
    takeoverMode,
  });
  const stop = (): void => {
    void agent.stop();
  };
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
  process.stdout.write(`ipsan host agent ${host} running station ${client.baseUrl.origin}${values.spare === true ? " (spare)" : ""}\n`);
  try {
    await agent.run();
  } finally {
    process.off("SIGTERM", stop);
    process.off("SIGINT", stop);
  }
  process.stdout.write(`ipsan host agent ${host} stopped\n`);
  return 0;
}
