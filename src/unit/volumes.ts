// The unit's volume manager: owns the storage, the lock, the current volume
// table and the open devices. Every change runs through one queue (one
// table writer at a time): compute the new table (volume_ops.ts, pure),
// revoke open devices the change invalidates and wait for their requests,
// zero newly allocated space (durably), then persist the table. Only after
// that does the change become visible.

import { join } from "node:path";
import { mkdirSync } from "node:fs";
import { SECTOR_SIZE } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { IpsanError } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { DATA_START_LBA, dataAreaEndLba } from "./layout.ts";
import { Storage, UnitLock } from "./storage.ts";
import { type LbaRange, type VolumeRecord, type VolumeTable, emptyTable, extentsLengthLba, freeRanges, validateTable } from "./table.ts";
import { TableStore } from "./table_store.ts";
import { type TableChange, checkVolumeName, createVolume, deleteVolume, growStorage, growVolume, setGrants, setPartitions, wipeRanges } from "./volume_ops.ts";
import { VolumeDevice, subSegments, volumeSegments } from "./volume_device.ts";

const log = logger("unit");

export const STORAGE_FILE_NAME = "storage.img";
export const LOCK_FILE_NAME = "unit.lock";

// ---- The API view of the table (also the discovery "storage info") ----

export interface LbaExtentView {
  readonly startLba: number;
  readonly lengthLba: number;
  /** Inclusive, as the seed's storage info reports it: startLba + lengthLba - 1. */
  readonly endLba: number;
}

export interface PartitionView extends LbaExtentView {
  readonly index: number;
  readonly name: string;
  readonly sizeBytes: number;
}

export interface VolumeView {
  readonly name: string;
  readonly number: number;
  readonly sizeBytes: number;
  readonly extents: readonly LbaExtentView[];
  readonly partitions: readonly PartitionView[];
  readonly grants: readonly string[];
}

export interface StorageInfoSnapshot {
  readonly sectorSize: number;
  /** Bytes of the data area (storage minus the metadata area, whole extent units). */
  readonly capacityBytes: number;
  readonly freeBytes: number;
  readonly freeExtents: readonly LbaExtentView[];
  readonly volumes: readonly VolumeView[];
  /** Table generation: changes whenever the table does. */
  readonly generation: number;
}

function extentView(range: LbaRange): LbaExtentView {
  return { startLba: range.startLba, lengthLba: range.lengthLba, endLba: range.startLba + range.lengthLba - 1 };
}

export function partitionName(volumeName: string, index: number): string {
  return `${volumeName}/p${index}`;
}

export function volumeView(volume: VolumeRecord): VolumeView {
  return {
    name: volume.name,
    number: volume.number,
    sizeBytes: volume.sizeBytes,
    extents: volume.extents.map(extentView),
    partitions: volume.partitions.map((p, i) => ({
      index: i + 1,
      name: partitionName(volume.name, i + 1),
      ...extentView(p),
      sizeBytes: p.lengthLba * SECTOR_SIZE,
    })),
    grants: [...volume.grants],
  };
}

/** Parses an export name: "VOL" or "VOL/pN". */
export function parseExportName(exportName: string): { volume: string; partition: number | undefined } | undefined {
  const match = /^([A-Za-z0-9][A-Za-z0-9_.-]{0,62})(?:\/p([1-9][0-9]{0,2}))?$/.exec(exportName);
  if (match === null || match[1] === undefined) return undefined;
  return { volume: match[1], partition: match[2] === undefined ? undefined : Number(match[2]) };
}

// ---- Opening ----

export interface VolumeManagerOptions {
  /** DATA: holds unit.lock, and storage.img unless devicePath is given. */
  readonly dataDir: string;
  readonly capacityBytes?: number | undefined;
  readonly devicePath?: string | undefined;
}

export class VolumeManager {
  readonly storage: Storage;
  readonly #lock: UnitLock;
  readonly #store: TableStore;
  #table: VolumeTable;
  #queue: Promise<unknown> = Promise.resolve();
  readonly #devices = new Set<VolumeDevice>();
  /** Volumes being wiped: not opened until the wipe is done. */
  readonly #wiping = new Set<string>();
  #closed = false;

  private constructor(storage: Storage, lock: UnitLock, store: TableStore, table: VolumeTable) {
    this.storage = storage;
    this.#lock = lock;
    this.#store = store;
    this.#table = table;
  }

  static async open(options: VolumeManagerOptions): Promise<VolumeManager> {
    mkdirSync(options.dataDir, { recursive: true });
    const lock = UnitLock.acquire(join(options.dataDir, LOCK_FILE_NAME));
    let storage: Storage | undefined;
    try {
      const finalPath = join(options.dataDir, STORAGE_FILE_NAME);
      const opened =
        options.devicePath !== undefined
          ? await Storage.openDevice(options.devicePath, options.capacityBytes)
          : Storage.openFile(finalPath, options.capacityBytes);
      storage = opened.storage;
      const loaded = await TableStore.load(storage);
      let store: TableStore;
      let table: VolumeTable;
      if (loaded.kind === "empty") {
        table = emptyTable(storage.sizeBytes);
        store = await TableStore.format(storage, table);
        if (opened.created) storage.commitCreatedFile(finalPath);
        log.info("storage formatted", { path: storage.path, sizeBytes: storage.sizeBytes });
      } else {
        store = loaded.store;
        table = loaded.table;
        for (const [i, slot] of loaded.slots.entries()) {
          if (slot.kind === "invalid") log.warn("volume table slot damaged; the other copy is used", { slot: i, reason: slot.reason });
        }
        if (storage.sizeBytes < table.storageBytes) {
          throw new IpsanError(
            "INVALID_ARGUMENT",
            `storage ${storage.path} is ${storage.sizeBytes} bytes but its volume table was written for ${table.storageBytes} bytes; storage never shrinks`,
            { field: options.devicePath !== undefined ? "--device" : "--capacity" },
          );
        }
        if (storage.sizeBytes > table.storageBytes) {
          table = growStorage(table, storage.sizeBytes).table;
          await store.write(table);
        }
      }
      return new VolumeManager(storage, lock, store, table);
    } catch (error) {
      storage?.closeSync();
      lock.release();
      throw error;
    }
  }

  get table(): VolumeTable {
    return this.#table;
  }

  get generation(): number {
    return this.#store.generation;
  }

  volume(name: string): VolumeRecord | undefined {
    return this.#table.volumes.find((v) => v.name === name);
  }

  /** A read-only snapshot of the table: what `GET /v1/info` and the discovery "storage info" report. */
  snapshot(): StorageInfoSnapshot {
    const table = this.#table;
    const free = freeRanges(table);
    return {
      sectorSize: SECTOR_SIZE,
      capacityBytes: (dataAreaEndLba(table.storageBytes) - DATA_START_LBA) * SECTOR_SIZE,
      freeBytes: extentsLengthLba(free) * SECTOR_SIZE,
      freeExtents: free.map(extentView),
      volumes: table.volumes.map(volumeView),
      generation: this.#store.generation,
    };
  }

  // ---- Changes (serialized) ----

  create(name: unknown, sizeBytes: unknown): Promise<VolumeRecord> {
    return this.#change((table) => createVolume(table, name, sizeBytes), () => []).then(mustHave);
  }

  delete(name: unknown): Promise<void> {
    return this.#change(
      (table) => deleteVolume(table, name),
      () => this.#devicesOf(String(name), () => true).map((d) => [d, new IpsanError("UNAVAILABLE", `volume ${d.volumeName} was deleted`)]),
    ).then(() => undefined);
  }

  grow(name: unknown, sizeBytes: unknown): Promise<VolumeRecord> {
    return this.#change((table) => growVolume(table, name, sizeBytes), () => []).then(mustHave);
  }

  setPartitions(name: unknown, sizesBytes: unknown): Promise<VolumeRecord> {
    return this.#change(
      (table) => setPartitions(table, name, sizesBytes),
      () =>
        this.#devicesOf(String(name), (d) => d.name !== d.volumeName).map((d) => [
          d,
          new IpsanError("UNAVAILABLE", `partitions of volume ${d.volumeName} were changed`),
        ]),
    ).then(mustHave);
  }

  /**
   * Replaces the grants. `stillAdmitted(device, volume)` decides which open
   * devices survive (the provider knows each device's peer).
   */
  setGrants(name: unknown, hosts: unknown, stillAdmitted: (device: VolumeDevice, volume: VolumeRecord) => boolean): Promise<VolumeRecord> {
    return this.#change(
      (table) => setGrants(table, name, hosts),
      (change) => {
        const volume = change.volume;
        assert(volume !== undefined, "grant change keeps the volume");
        return this.#devicesOf(volume.name, (d) => !stillAdmitted(d, volume)).map((d) => [
          d,
          new IpsanError("PERMISSION_DENIED", `grant to volume ${d.volumeName} was revoked`),
        ]);
      },
    ).then(mustHave);
  }

  /**
   * Makes the whole volume read as zeroes (punch hole, or zeroes written where
   * the storage cannot punch) and fdatasyncs, so the next host to get it never
   * reads the last one's data. Refused (CONFLICT) while the volume has grants
   * or an open, unrevoked connection; new connections wait out the wipe by
   * being refused. The table does not change. Repeating it is harmless.
   */
  wipe(name: unknown): Promise<VolumeRecord> {
    return this.#enqueue(async () => {
      const { volume, ranges } = wipeRanges(this.#table, name);
      const open = this.#devicesOf(volume.name, (d) => !d.revoked).length;
      if (open > 0) {
        throw new IpsanError("CONFLICT", `volume ${volume.name} is open by ${open} connection(s); close them before wiping it`, { field: "name" });
      }
      this.#wiping.add(volume.name);
      const startedMs = Date.now();
      try {
        for (const range of ranges) {
          await this.storage.zero(range.startLba * SECTOR_SIZE, range.lengthLba * SECTOR_SIZE, true, false);
        }
        await this.storage.sync();
      } finally {
        this.#wiping.delete(volume.name);
      }
      log.info("volume wiped", { volume: volume.name, bytes: extentsLengthLba(ranges) * SECTOR_SIZE, ms: Date.now() - startedMs });
      return volume;
    });
  }

  /** `--volume NAME:SIZE`: creates the volume unless it exists (a different size is left alone, with a warning). */
  async ensure(name: string, sizeBytes: number): Promise<VolumeRecord> {
    checkVolumeName(name, "--volume");
    const existing = this.volume(name);
    if (existing !== undefined) {
      if (existing.sizeBytes !== sizeBytes) {
        log.warn("volume exists with another size; left as it is", { volume: name, sizeBytes: existing.sizeBytes, requestedBytes: sizeBytes });
      }
      return existing;
    }
    return this.create(name, sizeBytes);
  }

  #devicesOf(volumeName: string, which: (device: VolumeDevice) => boolean): VolumeDevice[] {
    return [...this.#devices].filter((d) => d.volumeName === volumeName && which(d));
  }

  /** Runs `work` after every earlier change (one writer at a time), whatever their outcome. */
  #enqueue<T>(work: () => Promise<T>): Promise<T> {
    const run = (): Promise<T> => {
      if (this.#closed) return Promise.reject(new IpsanError("SHUTTING_DOWN", "the unit is stopping"));
      return work();
    };
    const result = this.#queue.then(run, run);
    this.#queue = result.catch(() => undefined);
    return result;
  }

  #change(compute: (table: VolumeTable) => TableChange, revocations: (change: TableChange) => [VolumeDevice, IpsanError][]): Promise<VolumeRecord | undefined> {
    return this.#enqueue(async (): Promise<VolumeRecord | undefined> => {
      const change = compute(this.#table);
      const problems = validateTable(change.table);
      assert(problems.length === 0, `refusing to write an invalid volume table: ${problems.join("; ")}`);
      await Promise.all(revocations(change).map(([device, error]) => device.revoke(error)));
      if (change.allocated.length > 0) {
        for (const range of change.allocated) {
          await this.storage.zero(range.startLba * SECTOR_SIZE, range.lengthLba * SECTOR_SIZE, true, false);
        }
        await this.storage.sync();
      }
      await this.#store.write(change.table);
      this.#table = change.table;
      return change.volume;
    });
  }

  // ---- Devices ----

  /** Opens export "VOL" or "VOL/pN" (the caller has checked access). */
  openDevice(exportName: string): VolumeDevice {
    if (this.#closed) throw new IpsanError("SHUTTING_DOWN", "the unit is stopping");
    const parsed = parseExportName(exportName);
    const volume = parsed === undefined ? undefined : this.volume(parsed.volume);
    if (parsed === undefined || volume === undefined) throw new IpsanError("NOT_FOUND", `export ${JSON.stringify(exportName)} not found`);
    if (this.#wiping.has(volume.name)) throw new IpsanError("UNAVAILABLE", `volume ${volume.name} is being wiped; try again when it is done`);
    let segments = volumeSegments(volume.extents, volume.sizeBytes);
    let description = `volume ${volume.name} (number ${volume.number})`;
    if (parsed.partition !== undefined) {
      const partition = volume.partitions[parsed.partition - 1];
      if (partition === undefined) throw new IpsanError("NOT_FOUND", `export ${JSON.stringify(exportName)} not found (volume ${volume.name} has ${volume.partitions.length} partitions)`);
      segments = subSegments(segments, partition.startLba * SECTOR_SIZE, partition.lengthLba * SECTOR_SIZE);
      description = `partition ${parsed.partition} of volume ${volume.name}`;
    }
    const device = new VolumeDevice({
      name: exportName,
      description,
      volumeName: volume.name,
      storage: this.storage,
      segments,
      onClose: (d) => this.#devices.delete(d),
    });
    this.#devices.add(device);
    return device;
  }

  get openDeviceCount(): number {
    return this.#devices.size;
  }

  /** Waits for pending table changes, syncs, closes the storage and drops the lock. */
  async close(): Promise<void> {
    if (this.#closed) return;
    await this.#queue;
    this.#closed = true;
    await Promise.all([...this.#devices].map((d) => d.revoke(new IpsanError("SHUTTING_DOWN", "the unit is stopping"))));
    await this.storage.sync();
    this.storage.closeSync();
    this.#lock.release();
  }
}

function mustHave(volume: VolumeRecord | undefined): VolumeRecord {
  assert(volume !== undefined, "the change returns its volume");
  return volume;
}
