// Reads and writes the volume table's two slots at the start of the storage.
//
// A write goes to the slot NOT holding the current table, with the next
// generation number, followed by fdatasync; only then is the change
// acknowledged. A crash mid-write leaves that slot torn (its checksum fails)
// while the other still holds the previous table, so a load finds either the
// previous or the new table, never neither. Load takes the valid slot with
// the highest generation.

import { IpsanError } from "../util/errors.ts";
import { assert } from "../util/assert.ts";
import { SLOT_HEADER_BYTES, TABLE_SLOT_BYTES, TABLE_SLOT_COUNT } from "./layout.ts";
import type { Storage } from "./storage.ts";
import { type SlotDecode, type VolumeTable, decodeSlot, encodeSlot } from "./table.ts";

export type TableLoad =
  | { readonly kind: "empty" }
  | { readonly kind: "loaded"; readonly store: TableStore; readonly table: VolumeTable; readonly slots: readonly SlotDecode[] };

export class TableStore {
  readonly #storage: Storage;
  #generation: number;
  #currentSlot: number;

  private constructor(storage: Storage, generation: number, currentSlot: number) {
    this.#storage = storage;
    this.#generation = generation;
    this.#currentSlot = currentSlot;
  }

  get generation(): number {
    return this.#generation;
  }

  static async readSlots(storage: Storage): Promise<SlotDecode[]> {
    const slots: SlotDecode[] = [];
    for (let slot = 0; slot < TABLE_SLOT_COUNT; slot++) {
      const bytes = Buffer.alloc(TABLE_SLOT_BYTES);
      await storage.read(bytes, 0, TABLE_SLOT_BYTES, slot * TABLE_SLOT_BYTES);
      slots.push(decodeSlot(bytes));
    }
    return slots;
  }

  /** Loads the newest valid table; "empty" only when both slots are all zeroes (fresh storage). */
  static async load(storage: Storage): Promise<TableLoad> {
    const slots = await TableStore.readSlots(storage);
    let best: { slot: number; generation: number; table: VolumeTable } | undefined;
    slots.forEach((decoded, slot) => {
      if (decoded.kind === "valid" && (best === undefined || decoded.generation > best.generation)) {
        best = { slot, generation: decoded.generation, table: decoded.table };
      }
    });
    if (best === undefined) {
      if (slots.every((s) => s.kind === "empty")) return { kind: "empty" };
      const reasons = slots.map((s, i) => `slot ${i}: ${s.kind === "invalid" ? s.reason : s.kind}`).join("; ");
      throw new IpsanError(
        "CORRUPT",
        `no valid volume table on ${storage.path} (${reasons}); refusing to start rather than lose volumes. ` +
          `If this storage holds no ipsan data, zero its first ${TABLE_SLOT_COUNT * TABLE_SLOT_BYTES} bytes to start afresh`,
      );
    }
    const chosen: { slot: number; generation: number; table: VolumeTable } = best;
    return { kind: "loaded", store: new TableStore(storage, chosen.generation, chosen.slot), table: chosen.table, slots };
  }

  /** Writes a first table into both slots (generations 1 and 2). */
  static async format(storage: Storage, table: VolumeTable): Promise<TableStore> {
    const store = new TableStore(storage, 0, TABLE_SLOT_COUNT - 1);
    await store.write(table);
    await store.write(table);
    return store;
  }

  /** Persists `table` durably (returns after fdatasync). Callers serialize writes. */
  async write(table: VolumeTable): Promise<void> {
    const slot = (this.#currentSlot + 1) % TABLE_SLOT_COUNT;
    const generation = this.#generation + 1;
    const image = encodeSlot(table, generation);
    assert(image.length <= TABLE_SLOT_BYTES && image.length >= SLOT_HEADER_BYTES, "slot image fits its slot");
    await this.#storage.write(image, 0, image.length, slot * TABLE_SLOT_BYTES);
    await this.#storage.sync();
    this.#generation = generation;
    this.#currentSlot = slot;
  }
}
