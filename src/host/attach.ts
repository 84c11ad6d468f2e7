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
//
// The NBD connections come from this machine's address toward the unit, so
// the unit admits them only if that address is the one the host registered
// (the grant the station gave the unit).

import { spawn, execFile } from "node:child_process";
import { existsSync, openSync, closeSync, readFileSync } from "node:fs";
import { mkdir, readFile, readdir, rm, rmdir } from "node:fs/promises";
import { join } from "node:path";
import { IpsanError, errorMessage } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { HostState, RECORD_VERSION, recordKey, type AttachMode, type AttachmentRecord } from "./state.ts";
import type { Assignment } from "./station_client.ts";

const log = logger("host");

export const ATTACH_TIMEOUT_MS = 15_000;
export const DETACH_TIMEOUT_MS = 10_000;
export const COMMAND_TIMEOUT_MS = 15_000;
export const POLL_INTERVAL_MS = 50;
const LOG_TAIL_BYTES = 2048;
const FUSE_FILE_NAME = "nbd";

export type ModeChoice = AttachMode | "auto";

/** "kernel" if /dev/nbd0 exists and nbd-client is on PATH, else "fuse". */
export function chooseMode(choice: ModeChoice): AttachMode {
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

/** Is the attachment still serving? (nbdfuse alive and mounted; the kernel device connected.) */
export async function attachmentAlive(record: AttachmentRecord): Promise<boolean> {
  if (record.mode === "fuse") {
    if (record.pid === null || record.mountpoint === null) return false;
    return (await isOurProcess(record.pid, "nbdfuse")) && (await isMounted(record.mountpoint));
  }
  if (record.device === null) return false;
  return existsSync(`/sys/block/${record.device.replace(/^\/dev\//, "")}/pid`);
}

export interface AttachRequest {
  readonly assignment: Assignment;
  readonly station: string;
  readonly host: string;
  readonly mode: AttachMode;
}

export async function attach(state: HostState, request: AttachRequest): Promise<AttachmentRecord> {
  await state.ensure();
  const existing = await state.get(String(request.assignment.id));
  if (existing !== undefined && existing.state === "attached" && (await attachmentAlive(existing))) {
    return existing; // idempotent: attaching twice gives the same path
  }
  if (existing !== undefined) await cleanup(existing);
  const base = {
    version: RECORD_VERSION,
    assignmentId: String(request.assignment.id),
    station: request.station,
    host: request.host,
    unit: request.assignment.unit,
    volume: request.assignment.volume,
    export: request.assignment.export,
    uri: request.assignment.uri,
    sizeBytes: request.assignment.sizeBytes,
    state: "attached",
    attachedAt: new Date().toISOString(),
  } as const;
  const record: AttachmentRecord =
    request.mode === "fuse"
      ? { ...base, mode: "fuse", ...(await attachFuse(state, base.assignmentId, base.uri)), device: null }
      : { ...base, mode: "kernel", ...(await attachKernel(request.assignment)), pid: null, mountpoint: null };
  await state.write(record);
  log.info("attached", { assignment: record.assignmentId, uri: record.uri, mode: record.mode, path: record.path });
  return record;
}

/** Re-attaches from a record alone (the agent after a restart): no station needed. */
export async function reattach(state: HostState, record: AttachmentRecord): Promise<AttachmentRecord> {
  await cleanup(record);
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
    child = spawn("nbdfuse", ["-P", pidFile, mountpoint, uri], { detached: true, stdio: ["ignore", logFd, logFd] });
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
async function attachKernel(assignment: Pick<Assignment, "uri" | "export">): Promise<{ path: string; device: string }> {
  const uri = new URL(assignment.uri);
  const device = await freeNbdDevice();
  const port = uri.port === "" ? "10809" : uri.port;
  const host = uri.hostname.replace(/^\[|\]$/g, "");
  const result = await run("nbd-client", [host, port, device, "-N", assignment.export]);
  if (!result.ok) throw new IpsanError("UNAVAILABLE", `nbd-client ${host} ${port} ${device} -N ${assignment.export}: ${result.output}`);
  return { path: device, device };
}

/** Stops whatever a record points at, ignoring what is already gone. */
async function cleanup(record: AttachmentRecord): Promise<void> {
  if (record.mode === "kernel") {
    if (record.device !== null && existsSync(`/sys/block/${record.device.replace(/^\/dev\//, "")}/pid`)) {
      const result = await run("nbd-client", ["-d", record.device]);
      if (!result.ok) throw new IpsanError("IO_ERROR", `nbd-client -d ${record.device}: ${result.output}`);
    }
    return;
  }
  if (record.mountpoint !== null && (await isMounted(record.mountpoint))) {
    const result = await run("fusermount3", ["-u", record.mountpoint]);
    if (!result.ok) {
      // Busy (a process has the file open) or the daemon is gone: lazy unmount as the last resort.
      log.warn("fusermount3 -u failed, unmounting lazily", { mountpoint: record.mountpoint, output: result.output });
      await run("fusermount3", ["-u", "-z", record.mountpoint]);
    }
  }
  if (record.pid !== null && (await isOurProcess(record.pid, "nbdfuse"))) {
    const pid = record.pid;
    const deadline = Date.now() + DETACH_TIMEOUT_MS;
    while (processAlive(pid) && Date.now() < deadline) await sleep(POLL_INTERVAL_MS);
    if (processAlive(pid)) {
      log.warn("nbdfuse still running after unmount, terminating", { pid });
      process.kill(pid, "SIGTERM");
      const hardDeadline = Date.now() + DETACH_TIMEOUT_MS;
      while (processAlive(pid) && Date.now() < hardDeadline) await sleep(POLL_INTERVAL_MS);
      if (processAlive(pid)) process.kill(pid, "SIGKILL");
    }
  }
}

export async function detach(state: HostState, record: AttachmentRecord): Promise<void> {
  await state.write({ ...record, state: "detaching" });
  await cleanup(record);
  // rmdir, never a recursive rm: if the unmount somehow failed, this fails too and touches nothing.
  if (record.mountpoint !== null) await rmdir(record.mountpoint).catch(() => undefined);
  await state.remove(record.assignmentId);
  log.info("detached", { assignment: record.assignmentId, path: record.path });
}
