// The volume.wipe task: the station zeroes a volume through its unit's
// control API, WIPE_CHUNK_BYTES at a time (POST /v1/volumes/NAME/wipe
// {offset, length}; the unit punches holes or writes zeroes and fdatasyncs
// each chunk before it answers), so the task has real progress (bytes) and
// can be cancelled between chunks. A cancelled wipe leaves the volume
// zeroed up to where it stopped and the rest as it was (docs/api.md "Tasks").
// The unit refuses a chunk while the volume has grants or open connections,
// which fails the task with the unit's 409.

import { IpsanError } from "../../util/errors.ts";
import { parseSize } from "../../util/size.ts";
import type { Station } from "../station.ts";
import { SECTOR_BYTES } from "../views.ts";
import type { TaskAnswer, TaskContext } from "./runner.ts";

/** Bytes zeroed per call to the unit (at most the unit's WIPE_RANGE_BYTES_MAX, 1 GiB). */
export const WIPE_CHUNK_BYTES_DEFAULT = 256 * 1024 * 1024;
export const WIPE_CHUNK_BYTES_MAX = 1024 * 1024 * 1024;
/** The smallest chunk $IPSAN_WIPE_CHUNK_BYTES may set (tests make wipes long with small chunks). */
export const WIPE_CHUNK_BYTES_MIN = 1024 * 1024;

/** The chunk size from $IPSAN_WIPE_CHUNK_BYTES (a size such as "8M"), else the default. */
export function wipeChunkBytesFrom(env: NodeJS.ProcessEnv): number {
  const text = env["IPSAN_WIPE_CHUNK_BYTES"];
  if (text === undefined || text === "") return WIPE_CHUNK_BYTES_DEFAULT;
  const bytes = parseSize(text, "IPSAN_WIPE_CHUNK_BYTES");
  if (bytes < WIPE_CHUNK_BYTES_MIN || bytes > WIPE_CHUNK_BYTES_MAX || bytes % SECTOR_BYTES !== 0) {
    throw new IpsanError("INVALID_ARGUMENT", `IPSAN_WIPE_CHUNK_BYTES: ${text} is not a multiple of 512 between 1 MiB and 1 GiB`, { field: "IPSAN_WIPE_CHUNK_BYTES" });
  }
  return bytes;
}

/** Refuses a wipe of an assigned volume at once (the unit would refuse it too, at its first chunk). */
export function checkWipeAllowed(station: Station, unit: string, name: string): void {
  if (!station.store.units.has(unit)) throw new IpsanError("NOT_FOUND", `unit ${JSON.stringify(unit)} not found`, { field: "unit" });
  if (station.store.volume(unit, name) === undefined) throw new IpsanError("NOT_FOUND", `volume ${JSON.stringify(name)} not found on unit ${unit}`, { field: "name" });
  const holder = station.store.liveOnVolume(unit, name)[0];
  if (holder !== undefined) {
    throw new IpsanError("CONFLICT", `volume ${unit}/${name} is assigned to host ${holder.host} (assignment ${holder.id}): unassign it before wiping it`, { field: "name" });
  }
}

/** Zeroes the whole volume (every extent, slack included), chunk by chunk; stops between chunks when cancelled. */
export async function wipeVolume(station: Station, unit: string, name: string, chunkBytes: number, ctx: TaskContext): Promise<TaskAnswer> {
  const volume = station.store.volume(unit, name);
  if (volume === undefined) throw new IpsanError("NOT_FOUND", `volume ${JSON.stringify(name)} not found on unit ${unit}`, { field: "name" });
  const totalBytes = volume.extents.reduce((sum, e) => sum + e.lengthLba * SECTOR_BYTES, 0);
  const client = station.clientFor(unit);
  let doneBytes = 0;
  ctx.progress(0, totalBytes, "bytes");
  while (doneBytes < totalBytes) {
    if (ctx.signal.aborted) {
      ctx.note(`volume ${unit}/${name} is zeroed up to byte ${doneBytes} of ${totalBytes}; the rest is as it was`);
      throw ctx.signal.reason;
    }
    const length = Math.min(chunkBytes, totalBytes - doneBytes);
    await client.wipeVolumeRange(name, doneBytes, length);
    doneBytes += length;
    ctx.progress(doneBytes, totalBytes, "bytes");
  }
  return { status: 200, body: { unit, name, wipedBytes: totalBytes } };
}
