// The unit's volume manager: owns the storage, the lock, the current volume
// table and the open devices. Every change runs through one queue (one
// table writer at a time): compute the new table (volume_ops.ts, pure),
// gate the volumes it changes and revoke the open devices the new table
// does not permit, wait for their requests, zero newly allocated space
// (durably), then persist the table. Only after that does the change become
// visible. How changes and opens are kept apart is described above #change.

import { join } from "node:path";
import { mkdirSync } from "node:fs";
import { SECTOR_SIZE } from "../block/types.ts";
import { assert } from "../util/assert.ts";
import { IpsanError } from "../util/errors.ts";
import { logger } from "../util/log.ts";
import { DATA_START_LBA, dataAreaEndLba } from "./layout.ts";
import { Storage, UnitLock } from "./storage.ts";
import { type LbaRange, type VolumeRecord, type VolumeTable, emptyTable, extentsLengthLba, newUnitId, freeRanges, validateTable } from "./table.ts";
import { TableStore } from "./table_store.ts";
import { HostKeys } from "./host_keys.ts";
import {
  type IdentityGrantInput,
  type TableChange,
  checkVolumeName,
  createVolume,
  deleteVolume,
  growStorage,
  growVolume,
  setGrants,
  setIdentityGrants,
  setPartitions,
  wipeRanges,
  checkWipeRange,
} from "./volume_ops.ts";
import { type Segment, VolumeDevice, mapRange, subSegments, volumeSegments } from "./volume_device.ts";

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
  /** Address grants (legacy `{hosts}` body). */
  readonly grants: readonly string[];
  /** Identity grants: which host may open which export, from where (never the key). */
  readonly access: readonly AccessView[];
}

export interface AccessView {
  readonly host: string;
  /** "VOL" (the volume and its partitions) or "VOL/pN". */
  readonly export: string;
  readonly from: readonly string[];
  /** iSCSI: the one initiator name admitted; absent: any (and NBD). */
  readonly iqn?: string;
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
    access: volume.access.map((a) => ({
      host: a.host,
      export: a.partition === undefined ? volume.name : partitionName(volume.name, a.partition),
      from: [...a.from],
      ...(a.iqn === undefined ? {} : { iqn: a.iqn }),
    })),
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
  /** DATA/host-keys.psk: the keys of the hosts identity grants name (host_keys.ts). */
  readonly hostKeys: HostKeys;
  readonly #lock: UnitLock;
  readonly #store: TableStore;
  #table: VolumeTable;
  #queue: Promise<unknown> = Promise.resolve();
  /** Open devices, and closed ones until their last storage call settles. */
  readonly #devices = new Set<VolumeDevice>();
  /** Volumes being changed or wiped: opens of them wait (or are refused, for a wipe). */
  readonly #gates = new Map<string, Gate>();
  #closed = false;
  /**
   * Told of every change once it is durable, with the tables before and
   * after (the iSCSI side drops the reservations of exports that went:
   * unit/iscsi.ts). It must not throw; the change is answered after it ran.
   */
  onChanged: ((before: VolumeTable, after: VolumeTable) => void) | undefined;

  private constructor(storage: Storage, lock: UnitLock, store: TableStore, table: VolumeTable, hostKeys: HostKeys) {
    this.storage = storage;
    this.hostKeys = hostKeys;
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
      // Fresh only when this start created the file, or the whole metadata
      // area is zero; anything else without a trustworthy table is refused
      // (docs/adr/0008-unit-never-loses-volumes.md), so --volume never runs
      // on storage formatted over something.
      const quote = (word: string): string => (/^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, "'\\''")}'`);
      const formatCommand = `ipsan unit format --data ${quote(options.dataDir)}${options.devicePath === undefined ? "" : ` --device ${quote(options.devicePath)}`}`;
      const loaded = opened.created ? ({ kind: "fresh" } as const) : await TableStore.load(storage, { formatCommand });
      let store: TableStore;
      let table: VolumeTable;
      if (loaded.kind === "fresh") {
        table = { ...emptyTable(storage.sizeBytes), unitId: newUnitId() };
        store = await TableStore.format(storage, table);
        if (opened.created) storage.commitCreatedFile(finalPath);
        log.info("storage formatted", { path: storage.path, sizeBytes: storage.sizeBytes, was: opened.created ? "created now" : "all zero" });
      } else {
        store = loaded.store;
        table = loaded.table;
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
        if (table.unitId === undefined) {
          // A table written before unit identities (issue 7): give it one now,
          // through the ordinary durable write (both slots, fdatasync each; ADR 0008).
          table = { ...table, unitId: newUnitId() };
          await store.write(table);
          log.info("unit identity written into the volume table", { path: storage.path, unitId: table.unitId });
        }
      }
      return new VolumeManager(storage, lock, store, table, HostKeys.load(options.dataDir));
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

  /** The unit's stable identity from its volume table (always set once open). */
  get unitId(): string {
    const id = this.#table.unitId;
    assert(id !== undefined, "an open unit's table has an identity");
    return id;
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
  //
  // The protocol between changes and opens (docs/unit.md, "Changes and open
  // connections"). Invariant: once a change is acknowledged, no device can
  // touch a byte, or serve an export, that the new table does not give it.
  // 1. A change computes its new table and, in the same synchronous step,
  //    closes a gate on every volume whose record differs between the two
  //    tables and revokes every open device of those volumes that the new
  //    table does not permit (permits(), one rule for every kind of change).
  // 2. An open of a gated volume waits for the gate; an open checks the
  //    table and registers its device in one synchronous step. So an open
  //    either ran before step 1 (its device is judged there) or runs after
  //    the table switched (it sees the new table). There is no third case.
  // 3. The change waits for every revoked device to drain (no storage call
  //    of it in flight), zeroes new space, writes the table, switches to it,
  //    and only then opens the gates and answers.

  create(name: unknown, sizeBytes: unknown): Promise<VolumeRecord> {
    return this.#change((table) => createVolume(table, name, sizeBytes)).then(mustHave);
  }

  delete(name: unknown): Promise<void> {
    return this.#change((table) => deleteVolume(table, name)).then(() => undefined);
  }

  grow(name: unknown, sizeBytes: unknown): Promise<VolumeRecord> {
    return this.#change((table) => growVolume(table, name, sizeBytes)).then(mustHave);
  }

  setPartitions(name: unknown, sizesBytes: unknown): Promise<VolumeRecord> {
    return this.#change((table) => setPartitions(table, name, sizesBytes)).then(mustHave);
  }

  /** Replaces the grants; open devices whose peer the new grants do not admit are revoked. */
  setGrants(name: unknown, hosts: unknown): Promise<VolumeRecord> {
    return this.#change((table) => setGrants(table, name, hosts)).then(mustHave);
  }

  /**
   * Replaces every grant of the volume with identity grants (parseIdentityGrants
   * checked them). The hosts' keys are written (durably) before the table that
   * grants them; keys no grant names any more are dropped after it.
   */
  setIdentityGrants(name: unknown, grants: readonly IdentityGrantInput[]): Promise<VolumeRecord> {
    const keys = new Map(grants.map((g) => [g.host, g.key]));
    return this.#change((table) => setIdentityGrants(table, name, grants), keys).then(mustHave);
  }

  /** Keeps in DATA/host-keys.psk exactly the keys of hosts some identity grant names. */
  async #pruneKeys(): Promise<void> {
    const named = new Set(this.#table.volumes.flatMap((v) => v.access.map((a) => a.host)));
    const kept = new Map([...this.hostKeys.entries()].filter(([host]) => named.has(host)));
    try {
      await this.hostKeys.replace(kept);
    } catch (error) {
      log.warn("could not drop unused host keys (retried at the next grant change)", { path: this.hostKeys.path, error: error instanceof Error ? error.message : String(error) });
    }
  }

  /**
   * Makes the whole volume read as zeroes (punch hole, or zeroes written where
   * the storage cannot punch) and fdatasyncs, so the next host to get it never
   * reads the last one's data. Refused (CONFLICT) while the volume has an
   * open, unrevoked connection; opens are refused while it runs (the volume
   * is gated). Closed or revoked devices still draining are waited for first.
   * The table does not change. Repeating it is harmless.
   */
  wipe(name: unknown, range?: { readonly offset: unknown; readonly length: unknown }): Promise<VolumeRecord> {
    return this.#enqueue(async () => {
      const checked = range === undefined ? undefined : checkWipeRange(this.#table, name, range.offset, range.length);
      const { volume, ranges } = wipeRanges(this.#table, name, checked);
      const devices = this.#devicesOf(volume.name);
      // Closed devices and revoked ones are no one's any more; their last calls are waited for below.
      const open = devices.filter((d) => !d.revoked && !d.closed).length;
      if (open > 0) {
        throw new IpsanError("CONFLICT", `volume ${volume.name} is open by ${open} connection(s); close them before wiping it`, { field: "name" });
      }
      const release = this.#closeGates([volume.name], "wiped");
      const startedMs = Date.now();
      try {
        await Promise.all(devices.map((d) => d.drained()));
        for (const range of ranges) {
          await this.storage.zero(range.startLba * SECTOR_SIZE, range.lengthLba * SECTOR_SIZE, true, false);
        }
        await this.storage.sync();
      } finally {
        release();
      }
      log.info(checked === undefined ? "volume wiped" : "volume range wiped", { volume: volume.name, ...(checked === undefined ? {} : checked), bytes: extentsLengthLba(ranges) * SECTOR_SIZE, ms: Date.now() - startedMs });
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

  /** Devices of a volume that are registered: open, or closed with storage calls still in flight. */
  #devicesOf(volumeName: string): VolumeDevice[] {
    return [...this.#devices].filter((d) => d.volumeName === volumeName);
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

  /** Closes the gate of each named volume (opens of it wait); returns the function that opens them again. */
  #closeGates(names: readonly string[], why: Gate["why"]): () => void {
    let open!: () => void;
    const gate: Gate = { why, opened: new Promise<void>((resolve) => (open = resolve)) };
    for (const name of names) {
      assert(!this.#gates.has(name), `volume ${name} gated twice`);
      this.#gates.set(name, gate);
    }
    return () => {
      for (const name of names) if (this.#gates.get(name) === gate) this.#gates.delete(name);
      open();
    };
  }

  /** `keys`: host keys the new table's grants need, written before the table (host_keys.ts). */
  #change(compute: (table: VolumeTable) => TableChange, keys?: ReadonlyMap<string, Buffer>): Promise<VolumeRecord | undefined> {
    return this.#enqueue(async (): Promise<VolumeRecord | undefined> => {
      // Step 1, synchronous from here to the first await: compute, gate, revoke.
      const change = compute(this.#table);
      const problems = validateTable(change.table);
      assert(problems.length === 0, `refusing to write an invalid volume table: ${problems.join("; ")}`);
      const changed = changedVolumes(this.#table, change.table);
      const release = this.#closeGates(changed, "changed");
      try {
        const revoked: Promise<void>[] = [];
        for (const name of changed) {
          const volume = change.table.volumes.find((v) => v.name === name);
          for (const device of this.#devicesOf(name)) {
            const refusal = device.revoked ? undefined : permits(volume, device);
            if (refusal !== undefined) void device.revoke(refusal);
            // A device revoked earlier may still have storage calls in flight: wait for those too.
            if (device.revoked) revoked.push(device.drained());
          }
        }
        // Step 3: nothing of a revoked device is in flight after this.
        await Promise.all(revoked);
        if (change.allocated.length > 0) {
          for (const range of change.allocated) {
            await this.storage.zero(range.startLba * SECTOR_SIZE, range.lengthLba * SECTOR_SIZE, true, false);
          }
          await this.storage.sync();
        }
        if (keys !== undefined) await this.hostKeys.replace(new Map([...this.hostKeys.entries(), ...keys]));
        await this.#store.write(change.table);
        const before = this.#table;
        this.#table = change.table;
        this.onChanged?.(before, change.table);
      } finally {
        release();
      }
      // A delete or a legacy grant may have dropped a host's last identity grant: its key goes too.
      if (this.hostKeys.size > 0) await this.#pruneKeys();
      return change.volume;
    });
  }

  // ---- Devices ----

  /**
   * Opens export "VOL" or "VOL/pN" for a peer that `admits` judges (it is
   * asked now, against the table the device is made from, and again at every
   * later change of the volume). Waits while the volume is being changed.
   */
  async openDevice(exportName: string, admits: (volume: VolumeRecord) => boolean): Promise<VolumeDevice> {
    const parsed = parseExportName(exportName);
    if (parsed === undefined) throw new IpsanError("NOT_FOUND", `export ${JSON.stringify(exportName)} not found`);
    for (let waits = 0; ; waits++) {
      if (this.#closed) throw new IpsanError("SHUTTING_DOWN", "the unit is stopping");
      const gate = this.#gates.get(parsed.volume);
      if (gate === undefined) break;
      if (gate.why === "wiped") throw new IpsanError("UNAVAILABLE", `volume ${parsed.volume} is being wiped; try again when it is done`);
      if (waits >= OPEN_GATE_WAITS_MAX) {
        throw new IpsanError("UNAVAILABLE", `volume ${parsed.volume} is being changed again and again; try again later`);
      }
      await gate.opened;
    }
    // Synchronous from here: check against the current table and register.
    const volume = this.volume(parsed.volume);
    if (volume === undefined) throw new IpsanError("NOT_FOUND", `export ${JSON.stringify(exportName)} not found`);
    if (!admits(volume)) throw new IpsanError("PERMISSION_DENIED", `export ${JSON.stringify(exportName)} is not granted to this peer`);
    const view = exportSegments(volume, parsed.partition);
    if (view === undefined) {
      throw new IpsanError("NOT_FOUND", `export ${JSON.stringify(exportName)} not found (volume ${volume.name} has ${volume.partitions.length} partitions)`);
    }
    const device = new VolumeDevice({
      name: exportName,
      description: parsed.partition === undefined ? `volume ${volume.name} (number ${volume.number})` : `partition ${parsed.partition} of volume ${volume.name}`,
      volumeName: volume.name,
      partition: parsed.partition,
      admits,
      storage: this.storage,
      segments: view,
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
    const stopping = new IpsanError("SHUTTING_DOWN", "the unit is stopping");
    await Promise.all([...this.#devices].map((d) => d.revoke(stopping)));
    await this.storage.sync();
    this.storage.closeSync();
    this.#lock.release();
  }
}

interface Gate {
  readonly why: "changed" | "wiped";
  /** Resolves when the change or wipe is done (whatever its outcome). */
  readonly opened: Promise<void>;
}

/** An open waits out at most this many back-to-back changes of its volume before it is refused. */
export const OPEN_GATE_WAITS_MAX = 64;

/** Names of the volumes whose record differs between two tables (added, removed or changed). */
export function changedVolumes(before: VolumeTable, after: VolumeTable): string[] {
  const out = new Set<string>();
  const afterByName = new Map(after.volumes.map((v) => [v.name, v]));
  for (const v of before.volumes) {
    const next = afterByName.get(v.name);
    if (next === undefined || !sameVolume(v, next)) out.add(v.name);
  }
  const beforeNames = new Set(before.volumes.map((v) => v.name));
  for (const v of after.volumes) if (!beforeNames.has(v.name)) out.add(v.name);
  return [...out];
}

function sameVolume(a: VolumeRecord, b: VolumeRecord): boolean {
  if (a === b) return true;
  return JSON.stringify(a) === JSON.stringify(b);
}

/** The segments export `partition` (undefined: the whole volume) of `volume` maps, or undefined when it does not exist. */
export function exportSegments(volume: VolumeRecord, partition: number | undefined): Segment[] | undefined {
  const segments = volumeSegments(volume.extents, volume.sizeBytes);
  if (partition === undefined) return segments;
  const range = volume.partitions[partition - 1];
  if (range === undefined) return undefined;
  return subSegments(segments, range.startLba * SECTOR_SIZE, range.lengthLba * SECTOR_SIZE);
}

/**
 * The one rule that decides whether an open device survives a change: its
 * export still exists in the new table, every byte it maps is mapped to the
 * same storage bytes there, and its peer is still admitted. Returns the
 * error to revoke it with, or undefined when it may stay.
 */
export function permits(volume: VolumeRecord | undefined, device: VolumeDevice): IpsanError | undefined {
  if (volume === undefined) return new IpsanError("UNAVAILABLE", `volume ${device.volumeName} was deleted`);
  const now = exportSegments(volume, device.partition);
  if (now === undefined || !mapsSameBytes(device.segments, now)) {
    return new IpsanError("UNAVAILABLE", `export ${device.name} was changed (partitions of volume ${volume.name} changed)`);
  }
  if (!device.admits(volume)) return new IpsanError("PERMISSION_DENIED", `grant to volume ${volume.name} was revoked`);
  return undefined;
}

/** True when every device byte of `held` maps to the same storage byte in `now` (a grown volume keeps its prefix). */
function mapsSameBytes(held: readonly Segment[], now: readonly Segment[]): boolean {
  const nowBytes = now.reduce((sum, s) => sum + s.lengthBytes, 0);
  for (const s of held) {
    if (s.deviceStart + s.lengthBytes > nowBytes) return false;
    for (const piece of mapRange(now, s.deviceStart, s.lengthBytes)) {
      if (piece.storageOffset !== s.storageStart + (piece.deviceOffset - s.deviceStart)) return false;
    }
  }
  return true;
}

function mustHave(volume: VolumeRecord | undefined): VolumeRecord {
  assert(volume !== undefined, "the change returns its volume");
  return volume;
}
