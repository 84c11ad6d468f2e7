// Test harness for a small pool: a real station and real `ipsan unit`
// processes joined to it with --discovery and the station's cluster key, each
// with a control API. Helpers read what the unit itself says (its control API,
// with the unit's own token) so tests can compare the unit's truth with the
// station's.

import { waitFor } from "../testing/process.ts";
import { startUnit, type RunningUnit } from "../testing/unit.ts";
import { controlOk } from "../testing/control.ts";
import type { RunningStation } from "./harness.ts";

export const JOIN_TIMEOUT_MS = 15_000;

export interface UnitVolume {
  name: string;
  number: number;
  sizeBytes: number;
  extents: { startLba: number; lengthLba: number; endLba: number }[];
  partitions: { index: number; name: string; startLba: number; lengthLba: number; endLba: number; sizeBytes: number }[];
  /** Address grants (units started with --insecure-plaintext, or standalone). */
  grants: string[];
  /** Grants by host identity (units that speak TLS): never the key. */
  access?: { host: string; export: string; from: string[] }[];
}

/** A volume's grants in one comparable form: addresses as they are, identity grants as "id:HOST@EXPORT". */
export function grantsOf(volume: UnitVolume): string[] {
  return [...volume.grants, ...(volume.access ?? []).map((a) => `id:${a.host}@${a.export}`)].sort();
}

export interface StationUnit {
  name: string;
  state: string;
  freeBytes: number;
  capacityBytes: number;
  volumeCount: number;
}

export interface Assignment {
  id: string;
  requestId: string | null;
  host: string;
  hostAddress: string;
  unit: string;
  volume: string;
  export: string;
  partition: number | null;
  sizeBytes: number;
  startLba: number;
  lengthLba: number;
  endLba: number;
  extents: { startLba: number; lengthLba: number; endLba: number }[];
  nbdHost: string;
  nbdPort: number;
  uri: string;
  state: string;
  error: string | null;
  /** 1 for a single copy; a mirror's legs (empty for a single copy). */
  copies?: number;
  legs?: {
    index: number;
    unit: string;
    volume: string;
    sizeBytes: number;
    uri: string | null;
    state: string;
    rebuild: { kind: string; copiedBytes: number; totalBytes: number; etaSeconds: number | null } | null;
    error: string | null;
  }[];
}

export interface RecordedEvent {
  seq: number;
  type: string;
  action: string;
  subject: string;
  data: Record<string, unknown>;
}

/** SSE_REPLAY_QUIET_MS without a new event ends a read of the stored events. */
const SSE_REPLAY_QUIET_MS = 300;
const SSE_REPLAY_TIMEOUT_MS = 10_000;

/** The station's stored events after `since` (GET /api/v1/events?since=N, read until it goes quiet). */
export async function recordedEvents(station: RunningStation, since = 0): Promise<RecordedEvent[]> {
  const controller = new AbortController();
  const deadline = setTimeout(() => controller.abort(), SSE_REPLAY_TIMEOUT_MS);
  let text = "";
  try {
    const response = await fetch(`${station.url}/api/v1/events?since=${since}`, {
      headers: { authorization: `Bearer ${station.token()}` },
      signal: controller.signal,
    });
    const reader = response.body?.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      if (reader === undefined) break;
      let quiet: NodeJS.Timeout | undefined;
      const chunk = await Promise.race([
        reader.read(),
        new Promise<null>((resolve) => (quiet = setTimeout(() => resolve(null), SSE_REPLAY_QUIET_MS))),
      ]);
      clearTimeout(quiet);
      if (chunk === null || chunk.done) break;
      text += decoder.decode(chunk.value, { stream: true });
    }
  } finally {
    clearTimeout(deadline);
    controller.abort();
  }
  return [...text.matchAll(/^data: (.*)$/gm)].map((m) => JSON.parse(m[1] ?? "{}") as RecordedEvent);
}

/** The volumes an assignment holds: every leg of a mirror, else its volume. */
export function heldVolumes(a: Assignment): { unit: string; volume: string }[] {
  return a.legs !== undefined && a.legs.length > 0 ? a.legs.map((l) => ({ unit: l.unit, volume: l.volume })) : [{ unit: a.unit, volume: a.volume }];
}

export function joinArgs(station: RunningStation): string[] {
  return ["--discovery", `${station.discovery.host}:${station.discovery.port}`, "--cluster-key-file", station.clusterKeyFile()];
}

/** Starts a unit joined to the station; resolves once the station lists it online with its volumes. */
export async function startJoinedUnit(
  station: RunningStation,
  options: {
    name: string;
    capacity: string;
    volumes?: { name: string; size: string }[];
    dataDir?: string;
    extraArgs?: string[];
    env?: Readonly<Record<string, string>>;
    /**
     * true: the managed default, NBD over TLS with grants by host identity. Default false
     * (--insecure-plaintext): the station tests check placement and grants with address
     * grants, which hosts reach by source address alone; grants by identity are proved
     * end to end (src/e2e/identity_test.ts, host failover and leg replacement e2e tests).
     */
    tls?: boolean;
    /** Default true (--control-listen 127.0.0.1:0); false: no --control-listen flag (a joined unit opens one by itself). */
    control?: boolean;
    /** --listen (default 127.0.0.1:0). */
    listen?: string;
    /** Another bin/ipsan (a canary's patched build). */
    ipsanBin?: string;
  },
): Promise<RunningUnit> {
  const unit = await startUnit({
    name: options.name,
    capacity: options.capacity,
    ...(options.listen === undefined ? {} : { listen: options.listen }),
    control: options.control !== false,
    volumes: options.volumes ?? [],
    extraArgs: [...joinArgs(station), ...(options.tls === true ? [] : ["--insecure-plaintext"]), ...(options.extraArgs ?? [])],
    ...(options.dataDir === undefined ? {} : { dataDir: options.dataDir }),
    ...(options.env === undefined ? {} : { env: options.env }),
    ...(options.ipsanBin === undefined ? {} : { ipsanBin: options.ipsanBin }),
  });
  const expected = (options.volumes ?? []).length;
  await waitFor(
    `unit ${options.name} online in the station's pool`,
    async () => {
      const response = await station.api("GET", `/api/v1/units/${options.name}`);
      const body = response.body as (StationUnit & { volumes: unknown[] }) | undefined;
      return response.status === 200 && body?.state === "online" && body.volumes.length >= expected ? true : undefined;
    },
    { timeoutMs: JOIN_TIMEOUT_MS },
  );
  return unit;
}

/** The unit's NBD TLS mode, as its GET /v1/info says. */
export async function unitTlsMode(unit: RunningUnit): Promise<string> {
  return ((await controlOk(unit, "GET", "/v1/info")) as { tls?: string }).tls ?? "off";
}

export async function unitVolumes(unit: RunningUnit): Promise<UnitVolume[]> {
  return ((await controlOk(unit, "GET", "/v1/volumes")) as { items: UnitVolume[] }).items;
}

export async function unitVolume(unit: RunningUnit, name: string): Promise<UnitVolume> {
  return (await controlOk(unit, "GET", `/v1/volumes/${encodeURIComponent(name)}`)) as UnitVolume;
}

export async function liveAssignments(station: RunningStation, query = ""): Promise<Assignment[]> {
  const response = await station.api("GET", `/api/v1/assignments${query}`);
  if (response.status !== 200) throw new Error(`GET assignments -> ${response.status} ${response.text}`);
  return (response.body as { items: Assignment[] }).items;
}

/** The unit's grants equal, volume by volume, the host addresses of the station's live assignments (every leg of a mirror). */
export async function grantsMatch(station: RunningStation, units: readonly RunningUnit[]): Promise<string[]> {
  const problems: string[] = [];
  const live = await liveAssignments(station);
  for (const unit of units) {
    for (const volume of await unitVolumes(unit)) {
      const holders = live.filter((a) => a.state !== "revoking" && heldVolumes(a).some((h) => h.unit === unit.name && h.volume === volume.name));
      // A unit that speaks TLS grants by identity and export; a plaintext one by address.
      const byIdentity = (volume.access ?? []).length > 0 || (await unitTlsMode(unit)) !== "off";
      const want = [...new Set(holders.map((a) => (byIdentity ? `id:${a.host}@${a.legs !== undefined && a.legs.length > 0 ? volume.name : a.export}` : a.hostAddress)))].sort();
      const have = grantsOf(volume);
      if (JSON.stringify(want) !== JSON.stringify(have)) problems.push(`${unit.name}/${volume.name}: unit grants ${JSON.stringify(have)}, station wants ${JSON.stringify(want)}`);
    }
  }
  return problems;
}
