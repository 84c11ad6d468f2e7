// Admin volume operations: create, delete, grow, partition. A create or grow is
// counted against the unit's free space like an allocation's carve.

import type { VolumeInfo } from "../../discovery/messages.ts";
import { IpsanError } from "../../util/errors.ts";
import { carveBytes } from "../allocator.ts";
import { canonicalGrant } from "../assignments/grants.ts";
import type { StationContext } from "../context.ts";
import type { UnitPool } from "../pool/unit_pool.ts";
import type { VolumeRecord } from "../types.ts";
import { UnitCallError } from "../unit_client.ts";

export class VolumeOperations {
  private readonly ctx: StationContext;
  private readonly pool: UnitPool;
  private adminCarveSeq = 0;

  constructor(ctx: StationContext, pool: UnitPool) {
    this.ctx = ctx;
    this.pool = pool;
  }

  private requireVolume(unit: string, name: string): VolumeRecord {
    if (!this.ctx.store.units.has(unit)) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(unit)} not found`, { field: "unit" });
    const volume = this.ctx.store.volume(unit, name);
    if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${JSON.stringify(name)} not found on unit ${unit}`, { field: "name" });
    return volume;
  }

  async createVolume(unit: string, name: string, sizeBytes: number): Promise<VolumeRecord> {
    const client = this.pool.clientFor(unit);
    if (this.ctx.store.volume(unit, name) !== undefined) {
      throw new IpsanError("ALREADY_EXISTS", `volume ${JSON.stringify(name)} already exists on unit ${unit}`, { field: "name" });
    }
    return this.ctx.locks.run(`volume:${unit}/${name}`, async () => {
      const created = await this.countedCarve(unit, name, carveBytes(sizeBytes), sizeBytes, () => client.createVolume(name, sizeBytes));
      const volume = { unit, ...created, grants: created.grants.map(canonicalGrant) };
      this.ctx.store.putVolume(volume, "created");
      this.pool.refreshQuietly(unit);
      return volume;
    });
  }

  /**
   * An admin's create or grow, counted against the unit's free space like an
   * allocation's carve: from before the call until the unit's report shows it
   * (released at once if the unit refuses).
   */
  private async countedCarve(unit: string, volume: string, bytes: number, sizeBytes: number, call: () => Promise<VolumeInfo>): Promise<VolumeInfo> {
    const id = `admin-${++this.adminCarveSeq}`;
    this.ctx.carves.reserve({ id, unit, volume, bytes, sizeBytes });
    try {
      const result = await call();
      this.ctx.carves.settle(id, this.ctx.store.clock.nowMs());
      return result;
    } catch (error) {
      if (error instanceof UnitCallError && error.failure === "refused") {
        this.ctx.carves.release(id);
        if (error.unitCode === "NO_SPACE") this.pool.noteNoSpace(unit, bytes);
      } else {
        this.ctx.carves.settle(id, this.ctx.store.clock.nowMs());
      }
      throw error;
    }
  }

  async deleteVolume(unit: string, name: string): Promise<void> {
    this.requireVolume(unit, name);
    const holders = this.ctx.store.liveOnVolume(unit, name);
    if (holders.length > 0) {
      throw new IpsanError("CONFLICT", `volume ${unit}/${name} is assigned to host ${holders[0]?.host} (assignment ${holders[0]?.id}): unassign it first`, {
        field: "name",
      });
    }
    const client = this.pool.clientFor(unit);
    await this.ctx.locks.run(`volume:${unit}/${name}`, async () => {
      try {
        await client.deleteVolume(name);
      } catch (error) {
        if (!(error instanceof UnitCallError && error.unitCode === "NOT_FOUND")) throw error;
      }
      this.ctx.store.removeVolume(unit, name);
      this.ctx.carves.releaseVolume(unit, name);
    });
    this.pool.refreshQuietly(unit);
  }

  async growVolume(unit: string, name: string, sizeBytes: number): Promise<VolumeRecord> {
    this.requireVolume(unit, name);
    const client = this.pool.clientFor(unit);
    return this.ctx.locks.run(`volume:${unit}/${name}`, async () => {
      const before = this.ctx.store.volume(unit, name)?.sizeBytes ?? sizeBytes;
      const extra = Math.max(0, carveBytes(sizeBytes) - carveBytes(before));
      const grown = await this.countedCarve(unit, name, extra, sizeBytes, () => client.growVolume(name, sizeBytes));
      const volume = { unit, ...grown, grants: grown.grants.map(canonicalGrant) };
      this.ctx.store.putVolume(volume, "grown");
      this.pool.refreshQuietly(unit);
      return volume;
    });
  }

  async partitionVolume(unit: string, name: string, sizesBytes: readonly number[]): Promise<VolumeRecord> {
    this.requireVolume(unit, name);
    const onPartition = this.ctx.store.liveOnVolume(unit, name).find((a) => a.partition !== null);
    if (onPartition !== undefined) {
      throw new IpsanError(
        "CONFLICT",
        `partition ${onPartition.partition} of ${unit}/${name} is assigned to host ${onPartition.host} (assignment ${onPartition.id}): unassign it before repartitioning`,
        { field: "sizesBytes" },
      );
    }
    const client = this.pool.clientFor(unit);
    return this.ctx.locks.run(`volume:${unit}/${name}`, async () => {
      const changed = await client.setPartitions(name, sizesBytes);
      const volume = { unit, ...changed, grants: changed.grants.map(canonicalGrant) };
      this.ctx.store.putVolume(volume, "partitioned");
      return volume;
    });
  }
}
