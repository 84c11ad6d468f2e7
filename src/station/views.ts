// JSON shapes of the REST API (docs/api.md "Objects"), built from the store's
// records. Pure functions: records in, plain objects out.

import type { NbdTlsMode } from "../discovery/messages.ts";
import { iscsiTargetName } from "../iscsi/names.ts";
import { scsiNaa } from "../scsi/identity.ts";
import type { StationStore } from "./store.ts";
import type { AssignmentRecord, ExtentRecord, HostPort, HostRecord, HostState, LegRecord, UnitRecord, VolumeRecord } from "./types.ts";

export const SECTOR_BYTES = 512;

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

/** `freeBytes`: the unit's reported free space minus carves started there and not yet reported (Station.usableFreeBytes). */
export function unitView(unit: UnitRecord, volumeCount: number, freeBytes: number = unit.freeBytes) {
  return {
    name: unit.name,
    dnsName: unit.dnsName,
    state: unit.state,
    addresses: unit.addresses,
    nbd: unit.nbd,
    control: unit.control,
    capacityBytes: unit.capacityBytes,
    freeBytes,
    volumeCount,
    lastSeenAt: iso(unit.lastSeenAtMs),
    spare: unit.spare === true,
    zone: unit.zone ?? null,
    tls: unit.tls ?? null,
    iscsi: unit.iscsi === undefined || unit.iscsi === null ? null : { portal: portalText(reachableNbd(unit.iscsi, unit.addresses) ?? unit.iscsi) },
  };
}

/** "HOST:PORT" ("[v6]:PORT"): an iSCSI portal as GET /v1/info and the API write it. */
export function portalText(portal: HostPort): string {
  return `${uriHost(portal.host)}:${portal.port}`;
}

/**
 * A volume; `unitId` (the unit's enrolled identity, StationStore.enrolledUnitId)
 * gives its SCSI identifiers: the NAA designator the unit's iSCSI target answers
 * in VPD 0x83 for the volume and each partition (null: the unit never enrolled).
 */
export function volumeView(volume: VolumeRecord, assignedTo: string | null, unitId: string | null = null) {
  return {
    id: `${volume.unit}/${volume.name}`,
    unit: volume.unit,
    name: volume.name,
    number: volume.number,
    sizeBytes: volume.sizeBytes,
    extents: volume.extents,
    partitions: volume.partitions.map((p) => ({ ...p, naa: unitId === null ? null : scsiNaa(unitId, volume.number, p.index) })),
    grants: volume.grants,
    assignedTo,
    naa: unitId === null ? null : scsiNaa(unitId, volume.number, undefined),
  };
}

export function hostState(host: HostRecord, nowMs: number, offlineAfterMs: number): HostState {
  return nowMs - host.lastSeenAtMs <= offlineAfterMs ? "online" : "offline";
}

export function hostView(host: HostRecord, state: HostState) {
  return {
    name: host.name,
    address: host.address,
    state,
    spare: host.spare ?? false,
    iqn: host.iqn ?? null,
    lastSeenAt: iso(host.lastSeenAtMs),
    createdAt: iso(host.createdAtMs),
  };
}

/**
 * The absolute extents (unit LBAs) of the sub-range [startLba, startLba+lengthLba)
 * of a volume made of `extents` (volume-relative LBAs count through the extents in order).
 */
export function mapRange(extents: readonly ExtentRecord[], startLba: number, lengthLba: number): ExtentRecord[] {
  const out: ExtentRecord[] = [];
  let skip = startLba;
  let left = lengthLba;
  for (const extent of extents) {
    if (left <= 0) break;
    if (skip >= extent.lengthLba) {
      skip -= extent.lengthLba;
      continue;
    }
    const start = extent.startLba + skip;
    const length = Math.min(extent.lengthLba - skip, left);
    out.push({ startLba: start, lengthLba: length, endLba: start + length - 1 });
    left -= length;
    skip = 0;
  }
  return out;
}

/** The extents an assignment covers: the whole volume (its size), or one partition. */
export function assignedExtents(volume: VolumeRecord, partition: number | null): { extents: ExtentRecord[]; sizeBytes: number } | null {
  if (partition === null) {
    return { extents: mapRange(volume.extents, 0, Math.ceil(volume.sizeBytes / SECTOR_BYTES)), sizeBytes: volume.sizeBytes };
  }
  const part = volume.partitions.find((p) => p.index === partition);
  if (part === undefined) return null;
  return { extents: mapRange(volume.extents, part.startLba, part.lengthLba), sizeBytes: part.sizeBytes };
}

/** A unit listening on 0.0.0.0 or :: is reached at its first known address. */
export function reachableNbd(nbd: HostPort | null, addresses: readonly string[]): HostPort | null {
  if (nbd === null) return null;
  if ((nbd.host === "0.0.0.0" || nbd.host === "::" || nbd.host === "") && addresses[0] !== undefined) {
    return { host: addresses[0], port: nbd.port };
  }
  return nbd;
}

function uriHost(host: string): string {
  return host.includes(":") ? `[${host}]` : host;
}

/**
 * The URI of an export for host `host`. A unit that speaks TLS (or is not
 * known not to: the managed default is --tls require) gets `nbds://HOST@...`:
 * libnbd takes the user part as the TLS-PSK identity; the host adds
 * `?tls-psk-file=PATH` for its key file (ipsan host request/attach do).
 */
function nbdUri(nbd: HostPort, exportName: string, tls: NbdTlsMode | null | undefined, host: string): string {
  const path = `${uriHost(nbd.host)}:${nbd.port}/${encodeURI(exportName)}`;
  return tls === "off" ? `nbd://${path}` : `nbds://${encodeURIComponent(host)}@${path}`;
}

/** Every ipsan iSCSI target serves its export as LUN 0. */
export const ISCSI_LUN = 0;

/**
 * Where an iSCSI assignment is logged in to: the unit's portal (reachable
 * address), the export's target name, and the CHAP user (the host's name)
 * when the unit grants by identity (tls not "off"; a unit started with
 * --insecure-plaintext admits by address, without CHAP). Null while the
 * unit's portal is not known.
 */
function iscsiView(assignment: AssignmentRecord, unit: UnitRecord | undefined, exportName: string): { portal: string; target: string; uri: string; chapUser: string | null } | null {
  const portal = unit?.iscsi === undefined || unit.iscsi === null ? null : reachableNbd(unit.iscsi, unit.addresses);
  if (portal === null) return null;
  const target = iscsiTargetName(assignment.unit, exportName);
  const text = portalText(portal);
  return { portal: text, target, uri: `iscsi://${text}/${target}/${ISCSI_LUN}`, chapUser: unit?.tls === "off" ? null : assignment.host };
}

/** The export's NAA designator (what VPD 0x83 answers), when the unit enrolled and the volume's number is known. */
function naaOf(store: StationStore, assignment: AssignmentRecord, volumeNumber: number | undefined): string | null {
  const unitId = store.enrolledUnitId(assignment.unit);
  const number = volumeNumber ?? assignment.detail?.volumeNumber;
  return unitId === null || number === undefined || number === null ? null : scsiNaa(unitId, number, assignment.partition ?? undefined);
}

/** One leg of a mirror: where its volume is, and its URI (for the host's mirror engine, not for applications). */
export function legView(leg: LegRecord, store: StationStore, host: string) {
  const unit = store.units.get(leg.unit);
  const nbd = reachableNbd(unit?.nbd ?? leg.detail?.nbd ?? null, unit?.addresses ?? []);
  return {
    index: leg.index,
    unit: leg.unit,
    volume: leg.volume,
    sizeBytes: leg.sizeBytes,
    uri: nbd === null ? null : nbdUri(nbd, leg.volume, unit?.tls, host),
    state: leg.state,
    rebuild: leg.rebuild ?? null,
    error: leg.error ?? null,
  };
}

/**
 * An assignment as the API shows it. For a mirror (copies > 1): unit, volume,
 * export, nbdHost/nbdPort and the extents are the first leg's (the extents
 * only where the mirror's data lies, without the leg's last MiB of metadata),
 * sizeBytes is the mirror's, `uri` is null (a leg's URI is not the volume:
 * writes there would bypass the mirror; the host's engine serves it), and
 * `legs` lists every leg.
 */
export function assignmentView(assignment: AssignmentRecord, store: StationStore) {
  const unit = store.units.get(assignment.unit);
  const volume = store.volume(assignment.unit, assignment.volume);
  const mirror = assignment.legs.length > 0;
  const live =
    volume === undefined
      ? null
      : mirror
        ? { extents: mapRange(volume.extents, 0, Math.ceil(assignment.sizeBytes / SECTOR_BYTES)), sizeBytes: assignment.sizeBytes }
        : assignedExtents(volume, assignment.partition);
  const extents = live?.extents ?? assignment.detail?.extents ?? [];
  const sizeBytes = live?.sizeBytes ?? assignment.detail?.sizeBytes ?? assignment.sizeBytes;
  const nbd = reachableNbd(unit?.nbd ?? assignment.detail?.nbd ?? null, unit?.addresses ?? []);
  const exportName = assignment.partition === null ? assignment.volume : `${assignment.volume}/p${assignment.partition}`;
  const first = extents[0];
  const last = extents[extents.length - 1];
  const lengthLba = extents.reduce((sum, e) => sum + e.lengthLba, 0);
  const protocol = assignment.protocol ?? "nbd";
  const iscsi = protocol === "iscsi" ? iscsiView(assignment, unit, exportName) : null;
  return {
    id: assignment.id,
    requestId: assignment.requestId,
    host: assignment.host,
    hostAddress: assignment.hostAddress,
    unit: assignment.unit,
    unitDnsName: unit?.dnsName ?? null,
    // The address the unit serves on (its NBD listener's, when it names one), not the one its discovery packets came from (issue 9 item 13).
    unitAddress: nbd?.host ?? unit?.addresses[0] ?? null,
    nbdHost: nbd?.host ?? null,
    nbdPort: nbd?.port ?? null,
    export: exportName,
    volume: assignment.volume,
    volumeNumber: volume?.number ?? assignment.detail?.volumeNumber ?? null,
    partition: assignment.partition,
    sizeBytes,
    startLba: first?.startLba ?? null,
    lengthLba,
    endLba: last?.endLba ?? null,
    extents,
    uri: protocol === "iscsi" ? (iscsi?.uri ?? null) : nbd === null || mirror ? null : nbdUri(nbd, exportName, unit?.tls, assignment.host),
    protocol,
    iscsi: iscsi === null ? null : { portal: iscsi.portal, target: iscsi.target, lun: ISCSI_LUN, chapUser: iscsi.chapUser, naa: naaOf(store, assignment, volume?.number) },
    copies: assignment.copies,
    legs: assignment.legs.map((leg) => legView(leg, store, assignment.host)),
    state: assignment.state,
    createdAt: iso(assignment.createdAtMs),
    updatedAt: iso(assignment.updatedAtMs),
    error: assignment.error,
    movedFrom: assignment.movedFrom ?? null,
    movedAt: assignment.movedAtMs === undefined || assignment.movedAtMs === null ? null : iso(assignment.movedAtMs),
    ...servingView(assignment, store),
  };
}

/**
 * Whether the assignment's data can be served now (issue 9 item 14: an
 * assignment on a down unit used to read "active" and nothing else):
 * `serving` "ok" (its unit online; for a mirror every leg in sync on an online
 * unit), "degraded" (a mirror with at least one in-sync leg on an online unit,
 * but not all), "down" (no unit that holds its data in sync is online), or null
 * for an assignment that is over (released, failed); `servingReasons` says why
 * when it is not "ok".
 */
export function servingView(assignment: AssignmentRecord, store: StationStore): { serving: "ok" | "degraded" | "down" | null; servingReasons: string[] } {
  if (assignment.state === "released" || assignment.state === "failed") return { serving: null, servingReasons: [] };
  const unitState = (name: string): string => store.units.get(name)?.state ?? "unknown";
  if (assignment.legs.length === 0) {
    const state = unitState(assignment.unit);
    return state === "online" ? { serving: "ok", servingReasons: [] } : { serving: "down", servingReasons: [`unit ${assignment.unit} is ${state}`] };
  }
  const reasons: string[] = [];
  let good = 0;
  for (const leg of assignment.legs) {
    const state = unitState(leg.unit);
    if (state !== "online") reasons.push(`leg ${leg.index} on unit ${leg.unit}: the unit is ${state}`);
    else if (leg.state !== "in-sync") reasons.push(`leg ${leg.index} on unit ${leg.unit} is ${leg.state}`);
    else good += 1;
  }
  return { serving: good === assignment.legs.length ? "ok" : good > 0 ? "degraded" : "down", servingReasons: reasons };
}

/** The most reasons the health answer lists (`reasonsTotal` counts them all). */
export const HEALTH_REASONS_MAX = 100;

/**
 * The pool's health (GET /api/v1/health): "ok", or "degraded" with reasons
 * (issue 9 item 14): a unit not online, a host offline that holds live
 * assignments, an assignment that cannot be served now or is degraded.
 */
export function poolHealth(store: StationStore, hostStateOf: (host: HostRecord) => HostState): { status: "ok" | "degraded"; reasons: string[]; reasonsTotal: number } {
  const reasons: string[] = [];
  for (const unit of store.units.values()) if (unit.state !== "online") reasons.push(`unit ${unit.name} is ${unit.state}`);
  const liveByHost = new Map<string, number>();
  for (const assignment of store.live.values()) {
    liveByHost.set(assignment.host, (liveByHost.get(assignment.host) ?? 0) + 1);
    const { serving, servingReasons } = servingView(assignment, store);
    if (serving === "down" || serving === "degraded") reasons.push(`assignment ${assignment.id} (host ${assignment.host}) is ${serving === "down" ? "not served" : "degraded"}: ${servingReasons.join("; ")}`);
  }
  for (const host of store.hosts.values()) {
    const count = liveByHost.get(host.name) ?? 0;
    if (count > 0 && hostStateOf(host) !== "online") reasons.push(`host ${host.name} is offline with ${count} assignment${count === 1 ? "" : "s"}`);
  }
  return { status: reasons.length === 0 ? "ok" : "degraded", reasons: reasons.slice(0, HEALTH_REASONS_MAX), reasonsTotal: reasons.length };
}
