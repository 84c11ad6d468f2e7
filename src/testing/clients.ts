// Thin wrappers over the real NBD clients (nbdinfo, nbdsh, qemu-io, nbdcopy)
// that run them with a timeout, fail with their whole output, and parse what
// they print. Parsers are pure and exported so their own tests can feed them
// captured output.

import { describeResult, run, runOk, type CommandResult } from "./process.ts";

export const CLIENT_TIMEOUT_MS = 60_000;

/** One export as `nbdinfo --json` / `--list --json` reports it (the fields we check). */
export interface NbdinfoExport {
  "export-name": string;
  "export-size": number;
  description?: string;
  contexts?: string[];
  is_read_only?: boolean;
  can_flush?: boolean;
  can_fua?: boolean;
  can_trim?: boolean;
  can_zero?: boolean;
  can_fast_zero?: boolean;
  can_cache?: boolean;
  can_df?: boolean;
  can_multi_conn?: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
  [key: string]: unknown;
}

export interface NbdinfoReport {
  protocol: string;
  structured: boolean;
  exports: NbdinfoExport[];
}

/** One line of `nbdinfo --map --json`: type bit 0 = hole, bit 1 = reads as zero. */
export interface MapExtent {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

function parseJson<T>(result: CommandResult): T {
  try {
    return JSON.parse(result.stdout) as T;
  } catch (error) {
    throw new Error(`unparsable JSON from ${describeResult(result)}`, { cause: error });
  }
}

export async function nbdinfoJson(uri: string): Promise<NbdinfoReport> {
  return parseJson<NbdinfoReport>(await runOk("nbdinfo", ["--json", uri], { timeoutMs: CLIENT_TIMEOUT_MS }));
}

export async function nbdinfoList(uri: string): Promise<NbdinfoReport> {
  return parseJson<NbdinfoReport>(await runOk("nbdinfo", ["--list", "--json", uri], { timeoutMs: CLIENT_TIMEOUT_MS }));
}

/** `nbdinfo --size URI` as a number. */
export async function nbdinfoSize(uri: string): Promise<number> {
  const result = await runOk("nbdinfo", ["--size", uri], { timeoutMs: CLIENT_TIMEOUT_MS });
  const size = Number(result.stdout.trim());
  if (!Number.isSafeInteger(size)) throw new Error(`nbdinfo --size printed ${JSON.stringify(result.stdout)}`);
  return size;
}

export async function nbdinfoMap(uri: string): Promise<MapExtent[]> {
  return parseJson<MapExtent[]>(await runOk("nbdinfo", ["--map", "--json", uri], { timeoutMs: CLIENT_TIMEOUT_MS }));
}

/** Merges adjacent extents of the same type (servers may split them anywhere). */
export function mergeExtents(extents: readonly MapExtent[]): { offset: number; length: number; type: number }[] {
  const merged: { offset: number; length: number; type: number }[] = [];
  for (const extent of extents) {
    const last = merged[merged.length - 1];
    if (last !== undefined && last.type === extent.type && last.offset + last.length === extent.offset) {
      last.length += extent.length;
    } else {
      merged.push({ offset: extent.offset, length: extent.length, type: extent.type });
    }
  }
  return merged;
}

/**
 * Runs a Python script in nbdsh connected to `uri` (the handle is `h`). An
 * nbds:// URI's tls-psk-file is a local file, which libnbd reads only when
 * allowed (nbdinfo and nbdcopy allow it themselves; nbdsh -u does not).
 */
export function nbdsh(uri: string, script: string, timeoutMs = CLIENT_TIMEOUT_MS): Promise<CommandResult> {
  const connect = uri.startsWith("nbds") ? ["-c", "h.set_uri_allow_local_file(True)", "-c", `h.connect_uri(${JSON.stringify(uri)})`] : ["-u", uri];
  return runOk("nbdsh", [...connect, "-c", script], { timeoutMs });
}

/** Runs qemu-io commands on a raw NBD image; qemu-io exits 1 if any command failed (pattern mismatch too). */
export function qemuIo(uri: string, commands: readonly string[], timeoutMs = CLIENT_TIMEOUT_MS): Promise<CommandResult> {
  return run("qemu-io", ["-f", "raw", uri, ...commands.flatMap((command) => ["-c", command])], { timeoutMs });
}

/** Like qemuIo but throws unless every command succeeded and no pattern check failed. */
export async function qemuIoOk(uri: string, commands: readonly string[], timeoutMs = CLIENT_TIMEOUT_MS): Promise<CommandResult> {
  const result = await qemuIo(uri, commands, timeoutMs);
  if (result.code !== 0 || /Pattern verification failed|failed:/i.test(result.stdout + result.stderr)) {
    throw new Error(`qemu-io failed: ${describeResult(result)}`);
  }
  return result;
}

/** Reads `length` bytes at `offset` of an export with nbdsh and returns them. */
export async function nbdRead(uri: string, offset: number, length: number): Promise<Buffer> {
  const result = await nbdsh(
    uri,
    `import sys, base64\nsys.stdout.write(base64.b64encode(h.pread(${length}, ${offset})).decode())`,
  );
  return Buffer.from(result.stdout.trim(), "base64");
}
