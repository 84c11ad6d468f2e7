// The unit's iSCSI side (`ipsan unit --iscsi HOST:PORT`, issue 10): an
// IscsiTarget (src/iscsi/) over the same ExportProvider, grants and host keys
// as NBD. Every volume and partition is its own target (names.ts), LUN 0,
// with a stable NAA (src/scsi/identity.ts); the SCSI command set is the
// scsi side's shared logical units.

import type { BlockDevice } from "../block/types.ts";
import { IscsiTarget, type LogicalUnitLease } from "../iscsi/target.ts";
import { iscsiTargetName } from "../iscsi/names.ts";
import type { RequiredDigests } from "../iscsi/text.ts";
import { scsiNaa, scsiSerial } from "../scsi/identity.ts";
import type { LogicalUnitIdentity } from "../scsi/types.ts";
import type { UnitExportProvider } from "./provider.ts";
import type { VolumeRecord, VolumeTable } from "./table.ts";
import { type PartitionView, type VolumeManager, type VolumeView, parseExportName, partitionName } from "./volumes.ts";

export interface UnitIscsiOptions {
  readonly unitName: string;
  readonly manager: VolumeManager;
  readonly provider: UnitExportProvider;
  readonly acquireLogicalUnit: (device: BlockDevice, identity: LogicalUnitIdentity) => LogicalUnitLease;
  /** CHAP keys by host identity (host keys, then --tls-psk); absent when the unit has no keys (--tls off). */
  readonly keyFor: ((identity: string) => Buffer | undefined) | undefined;
  /** --tls require: iSCSI requires CHAP too. */
  readonly chapRequired: boolean;
  /** --iscsi-require-digest: digests every session must use. */
  readonly requiredDigests?: RequiredDigests;
}

/** Every export of the unit, oldest volume first, each volume followed by its partitions. */
export function unitExports(manager: VolumeManager): string[] {
  const volumes = [...manager.snapshot().volumes].sort((a, b) => a.number - b.number);
  const out: string[] = [];
  for (const volume of volumes) {
    out.push(volume.name);
    for (const partition of volume.partitions) out.push(partition.name);
  }
  return out;
}

export function exportIdentity(manager: VolumeManager, exportName: string): LogicalUnitIdentity {
  const parsed = parseExportName(exportName);
  const volume = parsed === undefined ? undefined : manager.volume(parsed.volume);
  // exportOf() only maps names of exports that exist; a volume deleted meanwhile fails its open right after.
  const naa = scsiNaa(manager.unitId, volume?.number ?? 0, parsed?.partition);
  return { naa, serial: scsiSerial(naa), exportName };
}

export function newUnitIscsiTarget(options: UnitIscsiOptions): IscsiTarget {
  return new IscsiTarget({
    provider: options.provider,
    unitName: options.unitName,
    exports: () => unitExports(options.manager),
    identityOf: (exportName) => exportIdentity(options.manager, exportName),
    acquireLogicalUnit: options.acquireLogicalUnit,
    ...(options.keyFor === undefined ? {} : { keyFor: options.keyFor }),
    chapRequired: options.chapRequired,
    ...(options.requiredDigests === undefined ? {} : { requiredDigests: options.requiredDigests }),
  });
}

/** What the control API says about an export's iSCSI side: its target name and NAA; null when another export holds the name. */
export interface ExportIscsiView {
  readonly target: string;
  readonly naa: string;
}

/**
 * A volume view with `iscsi: {target, naa}` on the volume and on each
 * partition (docs/unit.md), for a unit serving iSCSI; `iscsi: null` where a
 * name collision leaves the export without a target.
 */
export function withIscsi(view: VolumeView, target: IscsiTarget, manager: VolumeManager): VolumeView & { iscsi: ExportIscsiView | null } {
  const of = (exportName: string, partition: number | undefined): ExportIscsiView | null => {
    const name = iscsiTargetName(target.unitName, exportName);
    if (target.exportOf(name) !== exportName) return null;
    return { target: name, naa: scsiNaa(manager.unitId, view.number, partition) };
  };
  return {
    ...view,
    iscsi: of(view.name, undefined),
    partitions: view.partitions.map((p: PartitionView) => ({ ...p, iscsi: of(partitionName(view.name, p.index), p.index) })),
  };
}

/**
 * The logical units a table change ended (identities as they were): every
 * export of a deleted volume, and each partition whose extent changed or
 * went (a new partition N is a new logical unit). A grown volume or a grant
 * change keeps its logical units.
 */
export function endedLogicalUnits(unitId: string, before: VolumeTable, after: VolumeTable): LogicalUnitIdentity[] {
  const ended: LogicalUnitIdentity[] = [];
  const identity = (volume: VolumeRecord, partition: number | undefined): LogicalUnitIdentity => {
    const naa = scsiNaa(unitId, volume.number, partition);
    return { naa, serial: scsiSerial(naa), exportName: partition === undefined ? volume.name : partitionName(volume.name, partition) };
  };
  for (const old of before.volumes) {
    const now = after.volumes.find((v) => v.number === old.number);
    if (now === undefined) ended.push(identity(old, undefined));
    old.partitions.forEach((range, i) => {
      const same = now?.partitions[i];
      if (same === undefined || same.startLba !== range.startLba || same.lengthLba !== range.lengthLba) ended.push(identity(old, i + 1));
    });
  }
  return ended;
}
