// Table churn for the kill -9 crash test (table_crash_test.ts): a child
// process opens a unit's storage and changes its volume table as fast as it
// can, printing "acked N" after change N is durable. Each change is a pure
// function of (table, seed, step), so the test can replay exactly what the
// child did and know the last acknowledged table and the one being written.
//
//   node dist/unit/table_churn.js DATA_DIR SEED

import { fileURLToPath } from "node:url";
import { SECTOR_SIZE } from "../block/types.ts";
import { IpsanError } from "../util/errors.ts";
import { setLogLevel } from "../util/log.ts";
import { seededRandom } from "../util/random.ts";
import { MIB } from "./layout.ts";
import { type VolumeTable, extentsLengthLba, freeRanges } from "./table.ts";
import { type TableChange, createVolume, deleteVolume, growVolume, setGrants, setPartitions } from "./volume_ops.ts";
import { VolumeManager } from "./volumes.ts";

export const CHURN_CAPACITY_BYTES = 64 * MIB;

export type ChurnAction =
  | { kind: "create"; name: string; sizeBytes: number }
  | { kind: "delete"; name: string }
  | { kind: "grow"; name: string; sizeBytes: number }
  | { kind: "partition"; name: string; sizesBytes: number[] }
  | { kind: "grant"; name: string; hosts: string[] };

function random(seed: number, step: number): () => number {
  return seededRandom((seed ^ Math.imul(step + 1, 0x9e3779b1)) >>> 0);
}

export function churnAction(table: VolumeTable, seed: number, step: number): ChurnAction {
  const next = random(seed, step);
  const pick = table.volumes[Math.floor(next() * table.volumes.length)];
  const freeBytes = extentsLengthLba(freeRanges(table)) * SECTOR_SIZE;
  const roll = next();
  if (pick === undefined || (roll < 0.4 && freeBytes > 8 * MIB)) {
    return { kind: "create", name: `s${seed % 1000}-${step}`, sizeBytes: (1 + Math.floor(next() * 4 * 2048)) * SECTOR_SIZE };
  }
  if (roll < 0.6 || freeBytes <= 8 * MIB) return { kind: "delete", name: pick.name };
  if (roll < 0.75) return { kind: "grow", name: pick.name, sizeBytes: pick.sizeBytes + (1 + Math.floor(next() * 2048)) * SECTOR_SIZE };
  if (roll < 0.9) {
    const each = Math.floor(pick.sizeBytes / SECTOR_SIZE / 3) * SECTOR_SIZE;
    return { kind: "partition", name: pick.name, sizesBytes: each === 0 ? [] : [each, each] };
  }
  return { kind: "grant", name: pick.name, hosts: [`10.0.${step % 256}.1`] };
}

/** The pure table change of an action (for the test's replay). */
export function applyAction(table: VolumeTable, action: ChurnAction): VolumeTable {
  let change: TableChange;
  try {
    switch (action.kind) {
      case "create":
        change = createVolume(table, action.name, action.sizeBytes);
        break;
      case "delete":
        change = deleteVolume(table, action.name);
        break;
      case "grow":
        change = growVolume(table, action.name, action.sizeBytes);
        break;
      case "partition":
        change = setPartitions(table, action.name, action.sizesBytes);
        break;
      case "grant":
        change = setGrants(table, action.name, action.hosts);
        break;
    }
  } catch (error) {
    if (error instanceof IpsanError) return table;
    throw error;
  }
  return change.table;
}

async function perform(manager: VolumeManager, action: ChurnAction): Promise<void> {
  try {
    switch (action.kind) {
      case "create":
        await manager.create(action.name, action.sizeBytes);
        break;
      case "delete":
        await manager.delete(action.name);
        break;
      case "grow":
        await manager.grow(action.name, action.sizeBytes);
        break;
      case "partition":
        await manager.setPartitions(action.name, action.sizesBytes);
        break;
      case "grant":
        await manager.setGrants(action.name, action.hosts);
        break;
    }
  } catch (error) {
    if (!(error instanceof IpsanError)) throw error;
  }
}

async function main(dataDir: string, seed: number): Promise<void> {
  setLogLevel("error");
  const manager = await VolumeManager.open({ dataDir, capacityBytes: CHURN_CAPACITY_BYTES });
  process.stdout.write("ready\n");
  for (let step = 0; ; step++) {
    await perform(manager, churnAction(manager.table, seed, step));
    // Synchronous on a pipe: the line is out before the next change starts.
    process.stdout.write(`acked ${step}\n`);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const [dataDir, seedText] = process.argv.slice(2);
  if (dataDir === undefined || seedText === undefined) {
    process.stderr.write("usage: table_churn.js DATA_DIR SEED\n");
    process.exit(2);
  }
  await main(dataDir, Number(seedText));
}
