// The NBD server a real-client test talks to. Normally a real `ipsan unit`
// with the test's volumes. With IPSAN_REALCLIENTS_SERVER=nbdkit the same tests
// run against nbdkit's file plugin (one file per volume, export name = file
// name, on a Unix socket), with filters that make nbdkit advertise what ipsan
// advertises (fast zero, block sizes 512/4096/32M). That mode exists to prove
// the tests themselves: a test that fails against nbdkit is a wrong test.

import { mkdirSync, truncateSync, writeFileSync } from "node:fs";
import { type Daemon, fileExists, startDaemon } from "./daemon.ts";
import { makeTempDir } from "./tmp.ts";
import { startUnit, type RunningUnit } from "./unit.ts";

export const TARGET_ENV = "IPSAN_REALCLIENTS_SERVER";
export type TargetKind = "ipsan" | "nbdkit";

export function targetKind(): TargetKind {
  const value = process.env[TARGET_ENV] ?? "ipsan";
  if (value !== "ipsan" && value !== "nbdkit") throw new Error(`${TARGET_ENV}: expected ipsan or nbdkit, got "${value}"`);
  return value;
}

export interface VolumeSpec {
  name: string;
  sizeBytes: number;
}

export interface TargetOptions {
  volumes: readonly VolumeSpec[];
  /** Unit capacity; default the sum of the volumes plus 64 MiB. */
  capacityBytes?: number;
  /** Start the unit's control API too (ipsan only). */
  control?: boolean;
}

export interface Target {
  readonly kind: TargetKind;
  /** An NBD URI for the export, usable by every libnbd and qemu client. */
  uri(exportName: string): string;
  /** URI for listing exports (no export name). */
  listUri(): string;
  /** The unit, when kind is "ipsan". */
  readonly unit: RunningUnit | undefined;
  /** The server's recent stderr, for assertion messages. */
  diagnostics(): string;
  close(): Promise<void>;
}

const MIB = 1024 * 1024;

export async function startTarget(options: TargetOptions): Promise<Target> {
  return targetKind() === "nbdkit" ? startNbdkitTarget(options) : startIpsanTarget(options);
}

async function startIpsanTarget(options: TargetOptions): Promise<Target> {
  const totalBytes = options.volumes.reduce((sum, volume) => sum + volume.sizeBytes, 0);
  const unit = await startUnit({
    capacity: options.capacityBytes ?? totalBytes + 64 * MIB,
    volumes: options.volumes.map((volume) => ({ name: volume.name, size: volume.sizeBytes })),
    control: options.control === true,
  });
  return {
    kind: "ipsan",
    uri: (exportName) => unit.uri(exportName),
    listUri: () => unit.listUri(),
    unit,
    diagnostics: () => unit.stderr(),
    close: () => unit.close(),
  };
}

/** nbdkit arguments that advertise ipsan's feature set over a directory of files. */
export function nbdkitDirArgs(dir: string, socketPath: string, pidFile: string): string[] {
  return [
    "-f",
    "--exit-with-parent",
    "-U",
    socketPath,
    "-P",
    pidFile,
    "--filter=blocksize-policy",
    "--filter=nozero",
    "file",
    `dir=${dir}`,
    "zeromode=plugin",
    "fastzeromode=slow",
    "blocksize-minimum=512",
    "blocksize-preferred=4096",
    `blocksize-maximum=${32 * MIB}`,
  ];
}

async function startNbdkitTarget(options: TargetOptions): Promise<Target> {
  const tmp = makeTempDir("nbdkit");
  const exportsDir = tmp.file("exports");
  mkdirSync(exportsDir);
  for (const volume of options.volumes) {
    const path = `${exportsDir}/${volume.name}`;
    writeFileSync(path, "");
    truncateSync(path, volume.sizeBytes);
  }
  const socketPath = tmp.file("nbd.sock");
  const pidFile = tmp.file("nbdkit.pid");
  let daemon: Daemon;
  try {
    daemon = await startDaemon("nbdkit", nbdkitDirArgs(exportsDir, socketPath, pidFile), { ready: fileExists(pidFile) });
  } catch (error) {
    tmp.remove();
    throw error;
  }
  return {
    kind: "nbdkit",
    uri: (exportName) => `nbd+unix:///${exportName}?socket=${socketPath}`,
    listUri: () => `nbd+unix:///?socket=${socketPath}`,
    unit: undefined,
    diagnostics: () => daemon.stderr(),
    async close() {
      await daemon.stop();
      tmp.remove();
    },
  };
}
