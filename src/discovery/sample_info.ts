// Storage-info reports shaped like a real unit's table (volumes laid out one
// after another from DATA_START_LBA, free space after them), for tests and for
// the simulated units of the control-plane benchmark.

import type { HostPort, LbaExtent, StorageInfo, VolumeInfo } from "./messages.ts";

const SECTOR_BYTES = 512;
const DATA_START_LBA = 2048;

function extent(startLba: number, lengthLba: number): LbaExtent {
  return { startLba, lengthLba, endLba: startLba + lengthLba - 1 };
}

export interface SampleInfoOptions {
  readonly volumeCount: number;
  readonly volumeBytes?: number;
  readonly capacityBytes?: number;
  readonly nbd?: HostPort;
  readonly control?: HostPort | null;
  readonly dnsName?: string | null;
  /** Give every volume this many equal partitions. */
  readonly partitionsPerVolume?: number;
  /** Grant each volume to this host. */
  readonly grant?: string;
}

export function sampleStorageInfo(unitName: string, options: SampleInfoOptions): StorageInfo {
  const volumeBytes = options.volumeBytes ?? 1024 ** 3;
  const volumeLba = volumeBytes / SECTOR_BYTES;
  const capacityBytes = options.capacityBytes ?? Math.max(volumeBytes * options.volumeCount * 2, 1024 ** 4);
  const volumes: VolumeInfo[] = [];
  for (let i = 0; i < options.volumeCount; i++) {
    const parts = options.partitionsPerVolume ?? 0;
    const partLba = parts > 0 ? Math.floor(volumeLba / parts) : 0;
    volumes.push({
      name: `vol${String(i + 1).padStart(4, "0")}`,
      number: i + 1,
      sizeBytes: volumeBytes,
      extents: [extent(DATA_START_LBA + i * volumeLba, volumeLba)],
      partitions: Array.from({ length: parts }, (_, p) => ({
        index: p + 1,
        name: `vol${String(i + 1).padStart(4, "0")}/p${p + 1}`,
        ...extent(p * partLba, partLba),
        sizeBytes: partLba * SECTOR_BYTES,
      })),
      grants: options.grant === undefined ? [] : [options.grant],
    });
  }
  const usedLba = volumeLba * options.volumeCount;
  const totalLba = capacityBytes / SECTOR_BYTES;
  const freeLba = totalLba - usedLba;
  return {
    name: unitName,
    dnsName: options.dnsName ?? null,
    nbd: options.nbd ?? { host: "127.0.0.1", port: 10809 },
    control: options.control === undefined ? { host: "127.0.0.1", port: 10810 } : options.control,
    sectorSize: SECTOR_BYTES,
    capacityBytes,
    freeBytes: freeLba * SECTOR_BYTES,
    freeExtents: freeLba > 0 ? [extent(DATA_START_LBA + usedLba, freeLba)] : [],
    volumes,
  };
}
