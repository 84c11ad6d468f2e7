// `ipsan unit format --data DIR [--device PATH] [--capacity SIZE] [--from-slot N] [--force]`:
// the one explicit way to write a volume table over storage that is not
// fresh (docs/unit.md, "Formatting and refusing"; ADR 0008).
//
// A unit formats storage by itself only when the storage file is new or the
// whole metadata area (the first METADATA_AREA_BYTES) is zero; anything else
// without a trustworthy table makes it refuse to start. This command holds
// DATA/unit.lock (and the device's flock), so it refuses while a unit uses
// the storage; says what it would destroy; and without --force writes nothing
// unless that is nothing. It rewrites only the metadata area: the data area
// is left as it is (a volume created later zeroes the space it takes).

import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { IpsanError, UsageError } from "../util/errors.ts";
import { parseFlags } from "../util/flags.ts";
import { logger } from "../util/log.ts";
import { formatSize, parseSize } from "../util/size.ts";
import { METADATA_AREA_BYTES, TABLE_SLOT_COUNT } from "./layout.ts";
import { Storage, UnitLock } from "./storage.ts";
import { type VolumeTable, emptyTable, newUnitId } from "./table.ts";
import { type Inspection, TableStore, describeSlot } from "./table_store.ts";
import { growStorage } from "./volume_ops.ts";
import { LOCK_FILE_NAME, STORAGE_FILE_NAME } from "./volumes.ts";

const log = logger("unit");

export const FORMAT_USAGE = `usage: ipsan unit format --data DIR [--device PATH] [--capacity SIZE] [--from-slot 0|1] [--force] [--json]
Writes a new volume table over the unit's metadata area (the first ${METADATA_AREA_BYTES / 1024 / 1024} MiB of its storage):
an empty one, or with --from-slot N the table found in slot N (to accept an older copy).
Without --force it only says what it would destroy, and formats only when that is nothing.
Refused while a unit uses the storage. Volume data in the data area is not touched, but a
volume the new table lacks is gone: a volume created later (create, --volume) zeroes its space.`;

export interface FormatOptions {
  readonly dataDir: string;
  readonly devicePath: string | undefined;
  readonly capacityBytes: number | undefined;
  readonly fromSlot: number | undefined;
  readonly force: boolean;
}

export interface FormatResult {
  readonly storagePath: string;
  readonly storageBytes: number;
  readonly generation: number;
  readonly volumes: number;
  /** What was overwritten, in words ("nothing: ..."). */
  readonly destroyed: string;
}

function volumesText(table: VolumeTable): string {
  if (table.volumes.length === 0) return "no volumes";
  return `${table.volumes.length} volume${table.volumes.length === 1 ? "" : "s"}: ${table.volumes.map((v) => `${v.name} (${formatSize(v.sizeBytes)})`).join(", ")}`;
}

/** What formatting would overwrite, in words; "" when nothing. */
function whatIsThere(inspection: Inspection): string {
  const verdict = inspection.verdict;
  if (verdict.kind === "fresh") return "";
  if (verdict.kind === "use") return `its volume table (generation ${verdict.generation}, ${volumesText(verdict.table)})`;
  const slots = inspection.slots.map((s) => `slot ${s.slot}: ${describeSlot(s)}`).join("; ");
  const foreign = inspection.foreign === undefined ? "" : `; it looks like ${inspection.foreign}`;
  return `its first ${METADATA_AREA_BYTES} bytes, which hold no usable volume table (${slots})${foreign}`;
}

/** Formats the unit storage (see the top of this file). Throws CONFLICT when it would destroy something without `force`. */
export async function formatUnitStorage(options: FormatOptions): Promise<FormatResult> {
  const finalPath = join(options.dataDir, STORAGE_FILE_NAME);
  if (options.devicePath === undefined && !existsSync(finalPath) && options.capacityBytes === undefined) {
    throw new UsageError(`--capacity SIZE is required to create the storage ${finalPath}`);
  }
  mkdirSync(options.dataDir, { recursive: true });
  let lock: UnitLock;
  try {
    lock = UnitLock.acquire(join(options.dataDir, LOCK_FILE_NAME));
  } catch (error) {
    if (error instanceof IpsanError && error.code === "CONFLICT") throw new IpsanError("CONFLICT", `${error.message}; stop that unit before formatting`);
    throw error;
  }
  let storage: Storage | undefined;
  try {
    const opened =
      options.devicePath !== undefined
        ? await Storage.openDevice(options.devicePath, options.capacityBytes)
        : Storage.openFile(finalPath, options.capacityBytes);
    storage = opened.storage;
    const inspection = opened.created ? undefined : await TableStore.inspect(storage);
    // A new identity unless the kept table has one (--from-slot keeps the unit's identity).
    let table: VolumeTable = { ...emptyTable(storage.sizeBytes), unitId: newUnitId() };
    let kept = "";
    if (options.fromSlot !== undefined) {
      const chosen = inspection?.slots[options.fromSlot];
      if (chosen === undefined || chosen.decoded.kind !== "valid") {
        throw new UsageError(`--from-slot ${options.fromSlot}: slot ${options.fromSlot} of ${storage.path} holds no valid volume table (${chosen === undefined ? "new storage" : describeSlot(chosen)})`);
      }
      if (storage.sizeBytes < chosen.decoded.table.storageBytes) {
        throw new UsageError(`--from-slot ${options.fromSlot}: its table was written for ${chosen.decoded.table.storageBytes} bytes but ${storage.path} is ${storage.sizeBytes} bytes`);
      }
      table = storage.sizeBytes > chosen.decoded.table.storageBytes ? growStorage(chosen.decoded.table, storage.sizeBytes).table : chosen.decoded.table;
      if (table.unitId === undefined) table = { ...table, unitId: newUnitId() };
      kept = `slot ${options.fromSlot}'s table (${volumesText(table)})`;
    }
    const there = inspection === undefined ? "" : whatIsThere(inspection);
    const destroyed = there === "" ? "nothing (the metadata area is all zero)" : there;
    if (there !== "" && !options.force) {
      const instead = kept === "" ? "an empty volume table" : kept;
      throw new IpsanError(
        "CONFLICT",
        `not formatting ${storage.path} without --force: it would overwrite ${destroyed}, with ${instead}. ` +
          `Volume data outside the metadata area is not touched, but a volume the new table lacks is gone for good: ` +
          `a volume created later (ipsan unit volume create, --volume) zeroes the space it takes. Run again with --force to format`,
      );
    }
    let store: TableStore;
    if (inspection === undefined || inspection.verdict.kind === "fresh") {
      store = await TableStore.format(storage, table);
    } else {
      // Generations only grow; the slot whose table is kept goes last, so a crash midway leaves it loadable.
      const order = Array.from({ length: TABLE_SLOT_COUNT }, (_, i) => i).sort((a, b) => Number(a === options.fromSlot) - Number(b === options.fromSlot));
      store = await TableStore.rewrite(storage, table, inspection.generationMax + 1, order);
    }
    if (opened.created) storage.commitCreatedFile(finalPath);
    log.info("storage formatted by ipsan unit format", { path: storage.path, sizeBytes: storage.sizeBytes, overwrote: destroyed, generation: store.generation });
    return { storagePath: storage.path, storageBytes: storage.sizeBytes, generation: store.generation, volumes: table.volumes.length, destroyed };
  } finally {
    storage?.closeSync();
    lock.release();
  }
}

export async function formatMain(argv: readonly string[]): Promise<number> {
  const { values, positionals } = parseFlags(
    argv,
    {
      data: { type: "string" },
      device: { type: "string" },
      capacity: { type: "string" },
      "from-slot": { type: "string" },
      force: { type: "boolean" },
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
    true,
  );
  if (values.help === true) {
    process.stdout.write(`${FORMAT_USAGE}\n`);
    return 0;
  }
  if (positionals.length > 0) throw new UsageError(`format: unexpected argument "${positionals[0]}"\n${FORMAT_USAGE}`);
  if (values.data === undefined || values.data === "") throw new UsageError(`--data DIR is required\n${FORMAT_USAGE}`);
  const fromText = values["from-slot"];
  if (fromText !== undefined && !/^[01]$/.test(fromText)) throw new UsageError(`--from-slot: invalid slot "${fromText}" (expected 0 or 1)`);
  let result: FormatResult;
  try {
    result = await formatUnitStorage({
      dataDir: values.data,
      devicePath: values.device,
      capacityBytes: values.capacity === undefined ? undefined : parseSize(values.capacity, "--capacity"),
      fromSlot: fromText === undefined ? undefined : Number(fromText),
      force: values.force === true,
    });
  } catch (error) {
    // A flag value the storage rejects (a smaller --capacity, a bad --device) is a usage error.
    if (error instanceof IpsanError && !(error instanceof UsageError) && error.code === "INVALID_ARGUMENT" && error.field?.startsWith("--")) {
      throw new UsageError(error.message);
    }
    throw error;
  }
  if (values.json === true) {
    process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    return 0;
  }
  process.stdout.write(
    `formatted ${result.storagePath}: ${result.storageBytes} bytes, generation ${result.generation}, ${result.volumes} volume${result.volumes === 1 ? "" : "s"}; overwrote ${result.destroyed}\n`,
  );
  return 0;
}
