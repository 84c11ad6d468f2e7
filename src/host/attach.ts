// Making an assigned volume a local block device, and undoing it.
//
// Two ways (docs/host.md, docs/adr/0006-host-identity-and-attach.md):
// - "kernel": the Linux NBD client (`nbd-client HOST PORT /dev/nbdN -N EXPORT`)
//   where /dev/nbd* exists and nbd-client is installed. Written, not tested
//   here: these machines have no nbd kernel module.
// - "fuse": nbdfuse, which presents the export as a regular file
//   MOUNTDIR/nbd. nbdfuse runs in the foreground, so we start it detached (its
//   own session, output to a log file) and record its pid: the `ipsan host
//   attach` process exits while nbdfuse keeps serving, and a later `detach`
//   (or the agent after a restart) finds it through the state record.
// - "nbd": an NBD URI for the host's own clients (nbdinfo, qemu, fio). For a
//   mirrored assignment it is served by the host's mirror engine (`ipsan host
//   engine`, started detached like nbdfuse, recorded with everything needed
//   to start it again, its socket under the state dir); for a single copy it
//   is the unit's own URI and nothing is started.
// A mirror in "fuse" mode is nbdfuse on top of the engine's socket; "kernel"
// on a mirror is not built yet.
//
// The NBD connections come from this machine's address toward the unit, so
// the unit admits them only if that address is the one the host registered
// (the grant the station gave the unit).

import { spawn, execFile } from "node:child_process";
import { existsSync, openSync, closeSync, readFileSync, fstatSync } from "node:fs";
import { mkdir, open, readFile, readdir, readlink, rm, rmdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { IpsanError, UsageError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { HostState, RECORD_VERSION, recordKey, type AttachMode, type AttachmentRecord, type EngineLegRecord, type EngineRecord, type IscsiAttachmentRecord } from "./state.ts";
import { isMirror, type StationAssignment, type StationClient } from "./station_client.ts";
import { writeChapSecretFile } from "./keys.ts";
import type { ProgressLine } from "../util/progress.ts";
import { writeFileAtomic } from "./legs.ts";

const log = logger("host");

export const ATTACH_TIMEOUT_MS = 15_000;
export const DETACH_TIMEOUT_MS = 10_000;
export const COMMAND_TIMEOUT_MS = 15_000;
export const POLL_INTERVAL_MS = 50;
const LOG_TAIL_BYTES = 2048;
const FUSE_FILE_NAME = "nbd";
/** bin/ipsan of this installation (dist/host/attach.js -> ../../bin/ipsan): what runs the mirror engine. */
export const IPSAN_BIN = join(dirname(dirname(dirname(fileURLToPath(import.meta.url)))), "bin", "ipsan");
/** How long a mirror engine may take to reach its legs and print its ready line. */
export const ENGINE_READY_TIMEOUT_MS = 30_000;
/** How long a mirror engine may take to flush every leg and exit after SIGTERM (then SIGKILL). */
export const ENGINE_STOP_TIMEOUT_MS = 30_000;
/** Longest Unix socket path (sun_path holds 108 bytes with the NUL); a longer one makes the engine listen on loopback. */
export const SOCKET_PATH_BYTES_MAX = 107;
/** The engine's log read while waiting for its ready line, at most. */
const ENGINE_LOG_READ_BYTES_MAX = 256 * 1024;
const ENGINE_READY = /^ipsan engine (\S+) ready (\S+)$/m;
const MIRROR_ID = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

/** The modes of an NBD attachment (iscsi is attachIscsi's). */
export type NbdAttachMode = Exclude<AttachMode, "iscsi">;
export type ModeChoice = NbdAttachMode | "auto";

/** "kernel" if /dev/nbd0 exists and nbd-client is on PATH, else "fuse". */
export function chooseMode(choice: ModeChoice): NbdAttachMode {
  if (choice !== "auto") return choice;
  return existsSync("/dev/nbd0") && onPath("nbd-client") ? "kernel" : "fuse";
}

function onPath(command: string): boolean {
  return (process.env["PATH"] ?? "").split(":").some((dir) => dir !== "" && existsSync(join(dir, command)));
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function run(command: string, args: readonly string[]): Promise<{ ok: boolean; output: string }> {
  return new Promise((resolve) => {
    execFile(command, [...args], { timeout: COMMAND_TIMEOUT_MS }, (error, stdout, stderr) => {
      resolve({ ok: error === null, output: `${stdout}${stderr}`.trim() || (error === null ? "" : errorMessage(error)) });
    });
  });
}

/** True if `pid` runs (a zombie, exited but not yet reaped by its new parent, does not). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/** True if `pid` is alive and is the program we started (pids are reused after a reboot). */
async function isOurProcess(pid: number, program: string): Promise<boolean> {
  if (!processAlive(pid)) return false;
  try {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, "utf8");
    return cmdline.split("\0").some((arg) => arg.endsWith(program));
  } catch {
    return false;
  }
}

/** Mount points in this mount namespace (octal escapes of /proc/self/mountinfo decoded). */
async function mountPoints(): Promise<Set<string>> {
  const text = await readFile("/proc/self/mountinfo", "utf8");
  const points = new Set<string>();
  for (const line of text.split("\n")) {
    const field = line.split(" ")[4];
    if (field !== undefined) points.add(field.replace(/\\([0-7]{3})/g, (_m, octal: string) => String.fromCharCode(parseInt(octal, 8))));
  }
  return points;
}

export async function isMounted(mountpoint: string): Promise<boolean> {
  return (await mountPoints()).has(mountpoint);
}

/** True if `pid` is alive and is the mirror engine of `mirror` (`ipsan host engine --mirror MIRROR`). */
export async function isEngineProcess(pid: number, mirror: string): Promise<boolean> {
  if (!processAlive(pid)) return false;
  try {
    const args = (await readFile(`/proc/${pid}/cmdline`, "utf8")).split("\0");
    const at = args.indexOf("--mirror");
    return args.includes("engine") && at >= 0 && args[at + 1] === mirror;
  } catch {
    return false;
  }
}

/**
 * Is the attachment still serving? (A mirror's engine alive, and for fuse its
 * nbdfuse alive and mounted; the kernel device connected; a single copy in
 * nbd mode, and an iSCSI attachment, run nothing here.)
 */
export async function attachmentAlive(record: AttachmentRecord): Promise<boolean> {
  const engine = record.engine ?? null;
  if (engine !== null && !(await isEngineProcess(engine.pid, engine.mirror))) return false;
  // nbd (a single copy) and iscsi: nothing runs here (the client or initiator is the user's).
  if (record.mode === "nbd" || record.mode === "iscsi") return true;
  if (record.mode === "fuse") {
    if (record.pid === null || record.mountpoint === null) return false;
    return (await isOurProcess(record.pid, "nbdfuse")) && (await isMounted(record.mountpoint));
  }
  if (record.device === null) return false;
  return existsSync(`/sys/block/${record.device.replace(/^\/dev\//, "")}/pid`);
}

export interface AttachRequest {
  readonly assignment: StationAssignment;
  readonly station: string;
  readonly host: string;
  /** iscsi has its own path, attachIscsi. */
  readonly mode: NbdAttachMode;
}

export async function attach(state: HostState, request: AttachRequest): Promise<AttachmentRecord> {
  await state.ensure();
  const existing = await state.get(String(request.assignment.id));
  if (existing !== undefined && existing.state === "attached" && (await attachmentAlive(existing))) {
    return existing; // idempotent: attaching twice gives the same path
  }
  if (existing !== undefined) await cleanup(existing, true);
  const assignment = request.assignment;
  const base = {
    version: RECORD_VERSION,
    assignmentId: String(assignment.id),
    station: request.station,
    host: request.host,
    unit: assignment.unit,
    volume: assignment.volume,
    export: assignment.export,
    uri: assignment.uri ?? "",
    sizeBytes: assignment.sizeBytes,
    state: "attached",
    attachedAt: new Date().toISOString(),
    engine: null,
  } as const;
  let record: AttachmentRecord;
  if (isMirror(assignment)) record = await attachMirror(state, base, assignment, request.mode);
  else if (assignment.uri === null) throw new IpsanError("UNAVAILABLE", `assignment ${base.assignmentId} has no URI yet (its unit's NBD address is unknown to the station)`);
  else if (request.mode === "nbd") record = { ...base, mode: "nbd", path: assignment.uri, pid: null, mountpoint: null, device: null };
  else if (request.mode === "fuse") record = { ...base, mode: "fuse", ...(await attachFuse(state, base.assignmentId, assignment.uri)), device: null };
  else record = { ...base, mode: "kernel", ...(await attachKernel({ uri: assignment.uri, export: assignment.export })), pid: null, mountpoint: null };
  await state.write(record);
  log.info("attached", { assignment: record.assignmentId, uri: record.uri, mode: record.mode, path: record.path });
  return record;
}

/**
 * An iSCSI assignment (protocol iscsi): nothing is started (the initiator,
 * open-iscsi's, libiscsi's or qemu's, is the user's). The CHAP secret is
 * written to STATE_DIR/keys/UNIT.chap (0600) and the attachment recorded
 * (mode iscsi, path = the iscsi:// URI, with the portal, target and LUN), so
 * that `list` shows it and `detach`, `release` and the agent find it. Written
 * again at every call: a rotated key gives a new secret.
 */
export async function attachIscsi(
  state: HostState,
  client: StationClient,
  request: { readonly assignment: StationAssignment; readonly station: string; readonly host: string },
): Promise<AttachmentRecord & { readonly iscsi: IscsiAttachmentRecord }> {
  const { assignment, host } = request;
  const iscsi = assignment.iscsi ?? null;
  if (assignment.protocol !== "iscsi" || iscsi === null || assignment.uri === null) {
    throw new IpsanError("UNAVAILABLE", `assignment ${assignment.id}: the station does not know unit ${assignment.unit}'s iSCSI portal right now; try again when the unit is online`);
  }
  await state.ensure();
  const chapSecretFile = iscsi.chapUser === null ? null : await writeChapSecretFile(state, client, host, assignment.unit);
  const existing = await state.get(String(assignment.id));
  const record: AttachmentRecord & { readonly iscsi: IscsiAttachmentRecord } = {
    version: RECORD_VERSION,
    assignmentId: String(assignment.id),
    station: request.station,
    host,
    unit: assignment.unit,
    volume: assignment.volume,
    export: assignment.export,
    uri: assignment.uri,
    sizeBytes: assignment.sizeBytes,
    mode: "iscsi",
    path: assignment.uri,
    pid: null,
    mountpoint: null,
    device: null,
    state: "attached",
    attachedAt: existing?.attachedAt ?? new Date().toISOString(),
    engine: null,
    iscsi: { portal: iscsi.portal, target: iscsi.target, lun: iscsi.lun, chapUser: iscsi.chapUser, chapSecretFile },
  };
  await state.write(record);
  if (existing === undefined) log.info("attached", { assignment: record.assignmentId, uri: record.uri, mode: "iscsi", path: record.path });
  return record;
}

/** A mirrored assignment: its engine started, then (fuse) nbdfuse on the engine's socket. */
async function attachMirror(
  state: HostState,
  base: Omit<AttachmentRecord, "mode" | "path" | "pid" | "mountpoint" | "device">,
  assignment: StationAssignment,
  mode: AttachMode,
): Promise<AttachmentRecord> {
  if (mode === "kernel") {
    throw new UsageError(`--mode kernel: assignment ${base.assignmentId} is mirrored (copies ${assignment.copies ?? "?"}); the kernel client on its engine is not built yet: use --mode nbd or --mode fuse`);
  }
  const engine = await startEngine(state, engineSpec(state, assignment));
  if (mode === "nbd") return { ...base, uri: engine.uri, mode: "nbd", path: engine.uri, pid: engine.pid, mountpoint: null, device: null, engine };
  try {
    // Recorded before nbdfuse starts: a crash in between leaves an engine that detach and the agent know.
    await state.write({ ...base, uri: engine.uri, mode: "fuse", path: "", pid: null, mountpoint: null, device: null, engine });
    const fuse = await attachFuse(state, base.assignmentId, engine.uri);
    return { ...base, uri: engine.uri, mode: "fuse", ...fuse, device: null, engine };
  } catch (error) {
    await stopEngine(engine);
    await state.remove(base.assignmentId);
    throw error;
  }
}

/** The engine's legs for the station's legs, by index; throws when a leg has no URI yet. */
function engineLegs(assignment: StationAssignment): EngineLegRecord[] {
  const id = String(assignment.id);
  return (assignment.legs ?? []).map((leg) => {
    if (leg.uri === null) throw new IpsanError("UNAVAILABLE", `leg ${leg.unit}/${leg.volume} of assignment ${id} has no URI yet (its unit's NBD address is unknown to the station)`);
    // The leg's name is its volume's: stable across restarts, so the engine matches it with its metadata; a replaced leg is another volume, so another name.
    return { name: leg.volume, uri: leg.uri, unit: leg.unit, volume: leg.volume };
  });
}

/** How the engine of a mirrored assignment is started: its legs by volume name (in a legs file), its socket and status file under the state dir. */
function engineSpec(state: HostState, assignment: StationAssignment): Omit<EngineRecord, "pid" | "uri"> {
  const id = String(assignment.id);
  if (!MIRROR_ID.test(id)) throw new IpsanError("IO_ERROR", `assignment id ${JSON.stringify(id)} cannot name a mirror (letters, digits, _ . -)`);
  const legs = engineLegs(assignment);
  const socket = state.socketPath(id);
  const listen = Buffer.byteLength(socket) <= SOCKET_PATH_BYTES_MAX ? `unix:${socket}` : "127.0.0.1:0";
  return { mirror: id, export: id, listen, legs, legsFile: state.legsFilePath(id), statusFile: state.statusFilePath(id) };
}

/** The legs file's content for the engine (src/host/legs.ts parseLegsFile). */
function legsFileText(legs: readonly EngineLegRecord[]): string {
  return `${JSON.stringify(legs.map((l) => ({ id: l.name, uri: l.uri, ...(l.unit === undefined ? {} : { unit: l.unit }), ...(l.volume === undefined ? {} : { volume: l.volume }) })), null, 2)}\n`;
}

/** "1: u1/v1 -> u3/v9" for each leg position whose unit, volume or URI differ; empty when none does. */
export function legChanges(recorded: readonly EngineLegRecord[], wanted: readonly EngineLegRecord[]): string[] {
  const changes: string[] = [];
  const name = (l: EngineLegRecord | undefined): string => (l === undefined ? "none" : `${l.unit ?? "?"}/${l.volume ?? l.name}`);
  for (let i = 0; i < Math.max(recorded.length, wanted.length); i++) {
    const was = recorded[i];
    const now = wanted[i];
    if (was?.name === now?.name && was?.uri === now?.uri && (was?.unit === undefined || was.unit === now?.unit)) continue;
    changes.push(was?.name === now?.name ? `${i}: ${name(now)} moved to ${now?.uri ?? "?"}` : `${i}: ${name(was)} -> ${name(now)}`);
  }
  return changes;
}

/**
 * Brings a mirror's engine to the station's legs (by index: same volume =
 * same leg; another volume = a replaced leg the engine rebuilds in full):
 * the legs file is rewritten and the record updated, then the engine gets
 * SIGHUP (a dead one reads the file when the agent starts it again). Returns
 * the record, and what changed (empty: nothing). Records from before legs
 * files are left as they are.
 */
export async function syncMirrorLegs(state: HostState, record: AttachmentRecord, assignment: StationAssignment): Promise<{ record: AttachmentRecord; changes: string[] }> {
  const engine = record.engine ?? null;
  if (engine === null || engine.legsFile === undefined || !isMirror(assignment)) return { record, changes: [] };
  const stationLegs = assignment.legs ?? [];
  // A leg the unit has not made yet (pending, or no URI) is waited for: the next check applies it.
  const notReady = stationLegs.filter((leg, i) => leg.uri === null || (leg.state === "pending" && engine.legs[i]?.name !== leg.volume));
  if (notReady.length > 0) {
    log.limited(`legs:${record.assignmentId}`, "mirror legs changed at the station; waiting for the new leg to be made", { assignment: record.assignmentId, legs: notReady.map((l) => `${l.unit}/${l.volume}`).join(",") });
    return { record, changes: [] };
  }
  const wanted = engineLegs(assignment);
  const changes = legChanges(engine.legs, wanted);
  if (changes.length === 0) return { record, changes };
  await writeFileAtomic(engine.legsFile, legsFileText(wanted));
  const updated: AttachmentRecord = { ...record, engine: { ...engine, legs: wanted } };
  await state.write(updated);
  if (await isEngineProcess(engine.pid, engine.mirror)) process.kill(engine.pid, "SIGHUP");
  log.info("mirror legs changed at the station: engine told", { assignment: record.assignmentId, changes: changes.join("; "), pid: engine.pid });
  return { record: updated, changes };
}

/**
 * Starts `ipsan host engine` detached (its own session; stdout and stderr to
 * STATE/log/ID.engine.log) and waits, bounded, for its ready line there.
 */
async function startEngine(state: HostState, spec: Omit<EngineRecord, "pid" | "uri">): Promise<EngineRecord> {
  await state.ensure();
  const logPath = state.engineLogPath(spec.mirror);
  const args = [IPSAN_BIN, "host", "engine", "--mirror", spec.mirror];
  if (spec.legsFile !== undefined) {
    // The record's legs are the truth: the file is written from them before every start.
    await writeFileAtomic(spec.legsFile, legsFileText(spec.legs));
    args.push("--legs-file", spec.legsFile);
  } else for (const leg of spec.legs) args.push("--leg", `${leg.name}=${leg.uri}`);
  if (spec.statusFile !== undefined) args.push("--status-file", spec.statusFile);
  args.push("--listen", spec.listen, "--export", spec.export);
  const logFd = openSync(logPath, "a", 0o600);
  const from = fstatSync(logFd).size;
  let child;
  try {
    child = spawn(process.execPath, args, { detached: true, stdio: ["ignore", logFd, logFd] });
  } finally {
    closeSync(logFd);
  }
  let exited: { code: number | null; signal: string | null } | undefined;
  const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));
  child.once("exit", (code, signal) => {
    exited = { code, signal };
  });
  const deadline = Date.now() + ENGINE_READY_TIMEOUT_MS;
  let uri: string | undefined;
  let failure: string | undefined;
  for (;;) {
    const error = await Promise.race([spawnError, sleep(POLL_INTERVAL_MS).then(() => undefined)]);
    if (error !== undefined) {
      failure = `cannot run the mirror engine: ${errorMessage(error)}`;
      break;
    }
    const ready = ENGINE_READY.exec(await readFrom(logPath, from));
    if (ready !== null && ready[1] === spec.mirror) {
      uri = ready[2];
      break;
    }
    if (exited !== undefined) {
      failure = `the mirror engine exited (code ${exited.code ?? exited.signal})`;
      break;
    }
    if (Date.now() > deadline) {
      failure = `the mirror engine was not ready after ${ENGINE_READY_TIMEOUT_MS} ms`;
      child.kill("SIGKILL");
      break;
    }
  }
  const pid = child.pid;
  if (failure !== undefined || uri === undefined || pid === undefined) {
    const tail = await logTail(logPath);
    throw new IpsanError("UNAVAILABLE", `mirror ${spec.mirror}: ${failure ?? "no pid"}${tail === "" ? "" : `: ${tail}`}`);
  }
  child.unref();
  log.info("mirror engine started", { mirror: spec.mirror, pid, uri, legs: spec.legs.map((l) => l.name).join(",") });
  return { ...spec, pid, uri };
}

/** The text of a file from byte `from` on (bounded). */
async function readFrom(path: string, from: number): Promise<string> {
  const handle = await open(path, "r");
  try {
    const buffer = Buffer.alloc(ENGINE_LOG_READ_BYTES_MAX);
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, from);
    return buffer.subarray(0, bytesRead).toString("utf8");
  } finally {
    await handle.close();
  }
}

/** SIGTERM (the engine flushes every leg and exits), bounded wait, SIGKILL if it hangs. */
async function stopEngine(engine: EngineRecord, progress?: ProgressLine): Promise<void> {
  if (await isEngineProcess(engine.pid, engine.mirror)) {
    process.kill(engine.pid, "SIGTERM");
    const deadline = Date.now() + ENGINE_STOP_TIMEOUT_MS;
    while (processAlive(engine.pid) && Date.now() < deadline) {
      progress?.update(`waiting for the mirror engine (pid ${engine.pid}) to flush its legs and exit (at most ${ENGINE_STOP_TIMEOUT_MS / 1000}s)`);
      await sleep(POLL_INTERVAL_MS);
    }
    if (processAlive(engine.pid)) {
      log.warn("mirror engine did not exit after SIGTERM; killing it (its legs keep the state it needs to restart)", { mirror: engine.mirror, pid: engine.pid });
      process.kill(engine.pid, "SIGKILL");
      const hardDeadline = Date.now() + DETACH_TIMEOUT_MS;
      while (processAlive(engine.pid) && Date.now() < hardDeadline) await sleep(POLL_INTERVAL_MS);
    } else {
      log.info("mirror engine stopped", { mirror: engine.mirror, pid: engine.pid });
    }
  }
  // A socket a killed engine left behind (a clean exit removes it; the next engine would too).
  if (engine.listen.startsWith("unix:") && !processAlive(engine.pid)) await rm(engine.listen.slice(5), { force: true });
}

/**
 * Brings a mirror's attachment back from its record: a dead engine is started
 * again with the same legs and socket (the legs tell it what it needs), and
 * for fuse nbdfuse is (re)started on it. A live engine is left alone.
 */
async function reattachMirror(state: HostState, record: AttachmentRecord, engine: EngineRecord): Promise<AttachmentRecord> {
  let current = engine;
  const engineAlive = await isEngineProcess(engine.pid, engine.mirror);
  if (!engineAlive) {
    // Whatever used the dead engine lost its connection: take it down before the new engine comes.
    if (record.mode === "fuse") await cleanupFuse(record, true);
    const { pid: _pid, uri: _uri, ...recorded } = engine;
    // A record from before legs files gets them now (the legs it names are the same).
    const spec = { ...recorded, legsFile: recorded.legsFile ?? state.legsFilePath(record.assignmentId), statusFile: recorded.statusFile ?? state.statusFilePath(record.assignmentId) };
    current = await startEngine(state, spec);
    log.info("mirror engine restarted", { assignment: record.assignmentId, was: engine.pid, pid: current.pid });
    const withEngine: AttachmentRecord =
      record.mode === "nbd" ? { ...record, uri: current.uri, path: current.uri, pid: current.pid, engine: current } : { ...record, uri: current.uri, engine: current };
    await state.write(withEngine);
    if (record.mode === "nbd") return withEngine;
  } else if (record.mode === "fuse") {
    await cleanupFuse(record, true);
  }
  const fuse = await attachFuse(state, record.assignmentId, current.uri);
  const fresh: AttachmentRecord = { ...record, uri: current.uri, ...fuse, engine: current, attachedAt: new Date().toISOString() };
  await state.write(fresh);
  return fresh;
}

/** Re-attaches from a record alone (the agent after a restart): no station needed. */
export async function reattach(state: HostState, record: AttachmentRecord): Promise<AttachmentRecord> {
  const engine = record.engine ?? null;
  if (engine !== null) {
    const fresh = await reattachMirror(state, record, engine);
    log.info("re-attached", { assignment: fresh.assignmentId, uri: fresh.uri, mode: fresh.mode, path: fresh.path });
    return fresh;
  }
  if (record.mode === "nbd" || record.mode === "iscsi") return record; // the unit's URI (or iSCSI target): nothing runs here
  await cleanup(record, true);
  const fresh: AttachmentRecord =
    record.mode === "fuse"
      ? { ...record, ...(await attachFuse(state, record.assignmentId, record.uri)), attachedAt: new Date().toISOString() }
      : {
          ...record,
          ...(await attachKernel({ uri: record.uri, export: record.export })),
          attachedAt: new Date().toISOString(),
        };
  await state.write(fresh);
  log.info("re-attached", { assignment: fresh.assignmentId, uri: fresh.uri, mode: fresh.mode, path: fresh.path });
  return fresh;
}

async function attachFuse(
  state: HostState,
  assignmentId: string,
  uri: string,
): Promise<{ path: string; pid: number; mountpoint: string }> {
  const mountpoint = state.mountDir(assignmentId);
  await mkdir(mountpoint, { recursive: true, mode: 0o700 });
  const pidFile = join(state.dir, "mnt", `${recordKey(assignmentId)}.pid`);
  await rm(pidFile, { force: true });
  const logPath = state.logPath(assignmentId);
  const logFd = openSync(logPath, "a", 0o600);
  let exited: { code: number | null; signal: string | null } | undefined;
  let child;
  try {
    // detached: its own session, so neither a Ctrl-C of the caller nor its exit stops it.
    child = spawn("nbdfuse", ["-P", pidFile, mountpoint, ...nbdfuseSource(uri)], { detached: true, stdio: ["ignore", logFd, logFd] });
  } finally {
    closeSync(logFd);
  }
  const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));
  child.once("exit", (code, signal) => {
    exited = { code, signal };
  });
  const deadline = Date.now() + ATTACH_TIMEOUT_MS;
  let failure: string | undefined;
  for (;;) {
    const error = await Promise.race([spawnError, sleep(POLL_INTERVAL_MS).then(() => undefined)]);
    if (error !== undefined) {
      failure = `cannot run nbdfuse: ${errorMessage(error)}`;
      break;
    }
    if (exited !== undefined) {
      failure = `nbdfuse exited (code ${exited.code ?? exited.signal})`;
      break;
    }
    if (existsSync(pidFile)) break;
    if (Date.now() > deadline) {
      failure = `nbdfuse not ready after ${ATTACH_TIMEOUT_MS} ms`;
      child.kill("SIGTERM");
      break;
    }
  }
  await rm(pidFile, { force: true });
  if (failure !== undefined) {
    const tail = await logTail(logPath);
    await run("fusermount3", ["-u", "-z", mountpoint]);
    throw new IpsanError("UNAVAILABLE", `attach ${uri}: ${failure}${tail === "" ? "" : `: ${tail}`}`);
  }
  child.unref();
  const pid = child.pid;
  if (pid === undefined) throw new IpsanError("IO_ERROR", `attach ${uri}: nbdfuse has no pid`);
  return { path: join(mountpoint, FUSE_FILE_NAME), pid, mountpoint };
}

async function logTail(path: string): Promise<string> {
  try {
    const text = await readFile(path, "utf8");
    return text.slice(-LOG_TAIL_BYTES).trim().split("\n").slice(-3).join(" | ");
  } catch {
    return "";
  }
}

/** First /dev/nbdN not connected (no /sys/block/nbdN/pid). */
async function freeNbdDevice(): Promise<string> {
  let names: string[];
  try {
    names = (await readdir("/sys/block")).filter((n) => /^nbd[0-9]+$/.test(n));
  } catch {
    names = [];
  }
  names.sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)));
  for (const name of names) {
    if (!existsSync(`/sys/block/${name}/pid`)) return `/dev/${name}`;
  }
  throw new IpsanError("UNAVAILABLE", "no free /dev/nbd* device (is the nbd module loaded? modprobe nbd)");
}

/** UNTESTED here (no nbd kernel module on the build machines): see docs/host.md. */
/**
 * What nbdfuse serves: the URI itself, or for nbds:// (TLS-PSK) an nbdkit
 * over stdin/stdout that speaks TLS to the unit with the key file. nbdfuse's
 * libnbd refuses a URI's tls-psk-file (local file access is off in nbdfuse);
 * nbdkit's nbd plugin takes the key file as a parameter.
 */
export function nbdfuseSource(uri: string): string[] {
  if (!uri.startsWith("nbds://")) return [uri];
  const url = new URL(uri);
  const keyFile = url.searchParams.get("tls-psk-file");
  if (keyFile === null || url.username === "") throw new IpsanError("INVALID_ARGUMENT", `${uri}: an nbds:// URI needs IDENTITY@ and ?tls-psk-file=PATH`);
  return [
    "--command", "nbdkit", "-s", "--exit-with-parent", "nbd",
    `hostname=${url.hostname.replace(/^\[(.*)\]$/, "$1")}`,
    `port=${url.port === "" ? "10809" : url.port}`,
    `export=${decodeURIComponent(url.pathname.replace(/^\//, ""))}`,
    "tls=require",
    `tls-psk=${keyFile}`,
    `tls-username=${decodeURIComponent(url.username)}`,
  ];
}

async function attachKernel(assignment: { readonly uri: string; readonly export: string }): Promise<{ path: string; device: string }> {
  if (assignment.uri.startsWith("nbds://")) {
    throw new UsageError(
      "--mode kernel: the unit speaks NBD over TLS with pre-shared keys, which nbd-client cannot; use --mode fuse or --mode nbd (or run the unit with --insecure-plaintext)",
    );
  }
  const uri = new URL(assignment.uri);
  const device = await freeNbdDevice();
  const port = uri.port === "" ? "10809" : uri.port;
  const host = uri.hostname.replace(/^\[|\]$/g, "");
  const result = await run("nbd-client", [host, port, device, "-N", assignment.export]);
  if (!result.ok) throw new IpsanError("UNAVAILABLE", `nbd-client ${host} ${port} ${device} -N ${assignment.export}: ${result.output}`);
  return { path: device, device };
}

/** Stops whatever a record points at, ignoring what is already gone (nbdfuse or the device first, then a mirror's engine). */
async function cleanup(record: AttachmentRecord, force: boolean, progress?: ProgressLine): Promise<void> {
  if (record.mode === "kernel") {
    if (record.device !== null && existsSync(`/sys/block/${record.device.replace(/^\/dev\//, "")}/pid`)) {
      const result = await run("nbd-client", ["-d", record.device]);
      if (!result.ok) throw new IpsanError("IO_ERROR", `nbd-client -d ${record.device}: ${result.output}`);
    }
  } else if (record.mode === "fuse") {
    await cleanupFuse(record, force, progress);
  }
  if (record.engine !== undefined && record.engine !== null) await stopEngine(record.engine, progress);
}

/** Unmounts an nbdfuse attachment and waits for its nbdfuse to exit. */
async function cleanupFuse(record: AttachmentRecord, force: boolean, progress?: ProgressLine): Promise<void> {
  if (record.mountpoint !== null && (await isMounted(record.mountpoint))) {
    const result = await run("fusermount3", ["-u", record.mountpoint]);
    if (!result.ok) {
      // Busy: something opened the file after the check (or the check could not see it).
      if (!force) throw busyError(record, `fusermount3 -u ${record.mountpoint}: ${result.output}`);
      log.warn("fusermount3 -u failed; --force: unmounting lazily (whatever still uses the file gets I/O errors)", { mountpoint: record.mountpoint, output: result.output });
      await run("fusermount3", ["-u", "-z", record.mountpoint]);
    }
  }
  if (record.pid !== null && (await isOurProcess(record.pid, "nbdfuse"))) {
    const pid = record.pid;
    const deadline = Date.now() + DETACH_TIMEOUT_MS;
    while (processAlive(pid) && Date.now() < deadline) {
      progress?.update(`waiting for nbdfuse (pid ${pid}) to exit (at most ${DETACH_TIMEOUT_MS / 1000}s, then SIGTERM)`);
      await sleep(POLL_INTERVAL_MS);
    }
    if (processAlive(pid)) {
      log.warn("nbdfuse still running after unmount, terminating", { pid });
      process.kill(pid, "SIGTERM");
      const hardDeadline = Date.now() + DETACH_TIMEOUT_MS;
      while (processAlive(pid) && Date.now() < hardDeadline) {
        progress?.update(`nbdfuse (pid ${pid}) sent SIGTERM; waiting (at most ${DETACH_TIMEOUT_MS / 1000}s, then SIGKILL)`);
        await sleep(POLL_INTERVAL_MS);
      }
      if (processAlive(pid)) process.kill(pid, "SIGKILL");
    }
  }
}

/** The most /proc/PID/fd entries looked at when searching who holds an attachment open. */
const BUSY_SCAN_FDS_MAX = 200_000;

/**
 * Why the attachment's file or device is in use, or null: loop devices backed
 * by it (and where they are mounted), a mount of the device itself, processes
 * holding it open. Like `rbd unmap`, detach refuses a busy device (issue 9
 * item 1): a lazy unmount under a mounted filesystem leaves it failing with
 * I/O errors.
 */
export async function busyReason(record: AttachmentRecord): Promise<string | null> {
  const target = record.mode === "kernel" ? record.device : record.mode === "fuse" ? record.path : null;
  if (target === null || target === undefined || target === "") return null;
  if (record.mode === "fuse" && (record.mountpoint === null || !(await isMounted(record.mountpoint)))) return null;
  const reasons: string[] = [];
  const mounts = await mountTable();
  const loops = record.mode === "fuse" ? await loopDevicesOf(target) : [];
  for (const loop of loops) {
    const where = mounts.filter((m) => m.source === loop).map((m) => m.target);
    reasons.push(`loop device ${loop} is backed by it${where.length > 0 ? ` and mounted on ${where.join(", ")}` : ""} (umount, then losetup -d ${loop})`);
  }
  const devices = [target, ...loops];
  for (const m of mounts) if (m.source === target) reasons.push(`it is mounted on ${m.target} (umount ${m.target})`);
  const holders = await openers(devices, new Set(record.pid === null ? [process.pid] : [process.pid, record.pid]));
  if (holders.length > 0) reasons.push(`open in ${holders.slice(0, 5).join(", ")}${holders.length > 5 ? ` and ${holders.length - 5} more` : ""}`);
  return reasons.length === 0 ? null : reasons.join("; ");
}

function busyError(record: AttachmentRecord, why: string): IpsanError {
  return new IpsanError(
    "CONFLICT",
    `${record.path} (assignment ${record.assignmentId}) is busy: ${why}. Stop using it and run detach again; ` +
      "detach --force detaches anyway (a lazy unmount: a filesystem or program still using it gets I/O errors and may lose unwritten data)",
  );
}

async function mountTable(): Promise<{ source: string; target: string }[]> {
  const text = await readFile("/proc/self/mounts", "utf8").catch(() => "");
  const unescape = (field: string): string => field.replace(/\\([0-7]{3})/g, (_m, octal: string) => String.fromCharCode(parseInt(octal, 8)));
  return text
    .split("\n")
    .filter((line) => line !== "")
    .map((line) => {
      const [source = "", target = ""] = line.split(" ");
      return { source: unescape(source), target: unescape(target) };
    });
}

/** Loop devices whose backing file is `file` (from /sys/block/loopN/loop/backing_file). */
async function loopDevicesOf(file: string): Promise<string[]> {
  const found: string[] = [];
  const names = await readdir("/sys/block").catch(() => [] as string[]);
  for (const name of names) {
    if (!name.startsWith("loop")) continue;
    const backing = await readFile(`/sys/block/${name}/loop/backing_file`, "utf8").catch(() => null);
    if (backing !== null && backing.trim() === file) found.push(`/dev/${name}`);
  }
  return found;
}

/** "comm (pid N)" of the processes (but `except`) with one of `paths` open, bounded. */
async function openers(paths: readonly string[], except: ReadonlySet<number>): Promise<string[]> {
  const wanted = new Set(paths);
  const found: string[] = [];
  let looked = 0;
  for (const entry of await readdir("/proc").catch(() => [] as string[])) {
    if (!/^[0-9]+$/.test(entry) || except.has(Number(entry))) continue;
    const fds = await readdir(`/proc/${entry}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      if (++looked > BUSY_SCAN_FDS_MAX) return found;
      const link = await readlink(`/proc/${entry}/fd/${fd}`).catch(() => null);
      if (link !== null && wanted.has(link)) {
        const comm = (await readFile(`/proc/${entry}/comm`, "utf8").catch(() => "?")).trim();
        found.push(`${comm} (pid ${entry})`);
        break;
      }
    }
  }
  return found;
}

export interface DetachOptions {
  /** Detach a busy attachment anyway (lazy unmount, processes cut off): `ipsan host detach --force`. */
  readonly force?: boolean;
  /** Where to say what detach waits for (a terminal's progress line, src/util/progress.ts). */
  readonly progress?: ProgressLine;
}

export async function detach(state: HostState, record: AttachmentRecord, options: DetachOptions = {}): Promise<void> {
  const force = options.force === true;
  if (!force) {
    const busy = await busyReason(record);
    if (busy !== null) throw busyError(record, busy);
  }
  await state.write({ ...record, state: "detaching" });
  options.progress?.update(`unmounting ${record.path}`);
  try {
    await cleanup(record, force, options.progress);
  } catch (error) {
    // Refused (busy) or failed: the attachment stays as it was, recorded as attached.
    await state.write(record);
    options.progress?.end("failed");
    throw error;
  }
  options.progress?.end("done");
  // rmdir, never a recursive rm: if the unmount somehow failed, this fails too and touches nothing.
  if (record.mountpoint !== null) await rmdir(record.mountpoint).catch(() => undefined);
  for (const file of [record.engine?.legsFile, record.engine?.statusFile]) if (file !== undefined) await rm(file, { force: true });
  await state.remove(record.assignmentId);
  log.info("detached", { assignment: record.assignmentId, path: record.path });
}
