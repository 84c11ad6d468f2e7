// Test helpers for several stations on one etcd cluster (issue 11): start a
// station with --etcd on a fixed discovery address (a follower never prints
// its discovery line), ask who leads, start units that know every station,
// and empty etcd between scenarios that share one cluster.

import { join } from "node:path";
import type { EtcdCluster } from "./etcd.ts";
import { freeUdpPort } from "./daemon.ts";
import { waitFor } from "./process.ts";
import type { TempDir } from "./tmp.ts";
import { startUnit, type RunningUnit } from "./unit.ts";
import { startStation, type RunningStation } from "../station/harness.ts";

/** Polls `probe` until it says true (waitFor's "a value" form), every 100 ms. */
export function until(what: string, probe: () => Promise<boolean>, timeoutMs: number): Promise<true> {
  return waitFor(what, async () => ((await probe()) ? true : undefined), { timeoutMs, intervalMs: 100 });
}

export interface StationHealth {
  readonly leader?: boolean;
  readonly leaderUrl?: string | null;
  readonly problem?: string;
  readonly role?: string;
}

/** GET /api/v1/health of a running station (null: no answer or not 200). */
export async function stationHealth(station: RunningStation | null | undefined): Promise<StationHealth | null> {
  if (station === null || station === undefined || !station.running()) return null;
  try {
    const response = await station.api("GET", "/api/v1/health");
    return response.status === 200 ? (response.body as StationHealth) : null;
  } catch {
    return null;
  }
}

/** The station among `candidates` whose health says it leads. */
export async function leaderAmong(candidates: readonly (RunningStation | null | undefined)[]): Promise<RunningStation | undefined> {
  for (const station of candidates) if ((await stationHealth(station))?.leader === true) return station ?? undefined;
  return undefined;
}

/** `ipsan station --data DIRS/NAME --etcd ...` on `discovery` (default: a free UDP port), ready at its ready line. */
export async function startEtcdStation(
  dirs: TempDir,
  name: string,
  etcd: EtcdCluster | string,
  options: { discovery?: string; extraArgs?: readonly string[]; bin?: string } = {},
): Promise<RunningStation> {
  return startStation({
    dataDir: dirs.file(name),
    keepData: true,
    discovery: options.discovery ?? `127.0.0.1:${await freeUdpPort()}`,
    readyWithoutDiscovery: true,
    extraArgs: ["--etcd", typeof etcd === "string" ? etcd : etcd.endpointsFlag, ...(options.extraArgs ?? [])],
    ...(options.bin === undefined ? {} : { bin: options.bin }),
  });
}

/** A unit joined to every station (`--discovery` with all their addresses), plaintext NBD with address grants. */
export function startUnitOfStations(name: string, discovery: readonly string[], clusterKeyStation: RunningStation): Promise<RunningUnit> {
  return startUnit({
    name,
    capacity: "512M",
    control: true,
    volumes: [],
    extraArgs: ["--discovery", discovery.join(","), "--cluster-key-file", join(clusterKeyStation.dataDir, "cluster.key"), "--insecure-plaintext"],
  });
}

/** Every key of the etcd cluster deleted (the next scenario starts from an empty etcd). */
export async function clearEtcd(etcd: EtcdCluster): Promise<void> {
  const { Etcd3 } = await import("etcd3");
  const client = new Etcd3({ hosts: etcd.endpoints });
  try {
    await client.delete().all();
  } finally {
    client.close();
  }
}
