// Placement accounting (issue 6 section 5, docs/adr/0005 "Placement
// accounting"): the bytes of every carve (or grow) the station has started on
// a unit and not yet seen in that unit's storage report. A unit's report is
// one snapshot: its free space and its volume list agree. So a carve the
// report lists is already in its free space, and a carve it does not list
// must still be subtracted from it. Placement uses
//
//     usable(unit) = reported free - reservedBytes(unit)
//
// An entry is made when the placement is chosen (in the same synchronous step
// as the pending assignment, so concurrent requests see it), and leaves when
//   - a report of the unit lists the volume with at least the entry's size
//     (the report's free space now counts it), or
//   - the station knows the carve did not happen or was undone: the unit
//     refused it, or the volume was deleted (`release`, `releaseVolume`), or
//   - the entry is settled (the unit answered the create, or the station gave
//     up not knowing whether it did) and a report observed after that moment
//     does not list the volume that large (it is not there: nothing to count).
// An entry whose carve is still in flight never leaves for a report's silence:
// the report may predate the carve. Everything errs toward counting a carve
// twice for a moment (a unit looks fuller than it is) rather than not at all.
//
// Pure bookkeeping, no I/O: the station calls it; tests drive it directly.

export interface CarveEntry {
  /** The assignment id for allocation carves; any unique key otherwise. */
  readonly id: string;
  readonly unit: string;
  readonly volume: string;
  /** Free space the carve takes on the unit (whole MiB). */
  readonly bytes: number;
  /** A report listing the volume with at least this size covers the entry. */
  readonly sizeBytes: number;
  /** When the unit's answer came (or the station gave up on it); null while in flight. */
  readonly settledAtMs: number | null;
}

export class CarveLedger {
  private readonly byUnit = new Map<string, Map<string, CarveEntry>>();
  private readonly unitOf = new Map<string, string>();

  /** Counts a carve against the unit's free space until a report shows it (or it is released). */
  reserve(entry: Omit<CarveEntry, "settledAtMs">): void {
    if (entry.bytes <= 0) return;
    this.release(entry.id);
    let entries = this.byUnit.get(entry.unit);
    if (entries === undefined) this.byUnit.set(entry.unit, (entries = new Map()));
    entries.set(entry.id, { ...entry, settledAtMs: null });
    this.unitOf.set(entry.id, entry.unit);
  }

  /** The unit answered the carve (or its outcome is unknown for good): a later report's silence releases it. */
  settle(id: string, nowMs: number): void {
    const entry = this.get(id);
    if (entry === undefined || entry.settledAtMs !== null) return;
    this.byUnit.get(entry.unit)?.set(id, { ...entry, settledAtMs: nowMs });
  }

  /** The carve did not happen, or was undone: stop counting it. */
  release(id: string): boolean {
    const unit = this.unitOf.get(id);
    if (unit === undefined) return false;
    this.unitOf.delete(id);
    const entries = this.byUnit.get(unit);
    entries?.delete(id);
    if (entries?.size === 0) this.byUnit.delete(unit);
    return true;
  }

  /** The volume was deleted: every entry for it goes. */
  releaseVolume(unit: string, volume: string): void {
    for (const entry of [...(this.byUnit.get(unit)?.values() ?? [])]) if (entry.volume === volume) this.release(entry.id);
  }

  /**
   * A report of the unit was applied. `volumes`: its volume sizes by name;
   * `observedAtMs`: no later than the moment the unit took the snapshot
   * (a settled entry is released for its absence only if settled strictly
   * before: an answer in the same millisecond may come after the snapshot).
   * Returns the ids released.
   */
  noteReport(unit: string, volumes: ReadonlyMap<string, number>, observedAtMs: number): string[] {
    const released: string[] = [];
    for (const entry of [...(this.byUnit.get(unit)?.values() ?? [])]) {
      const size = volumes.get(entry.volume);
      const covered = size !== undefined && size >= entry.sizeBytes;
      // Settled and not (fully) there in a snapshot taken after the answer: it did not happen.
      const missing = !covered && entry.settledAtMs !== null && entry.settledAtMs < observedAtMs;
      if (covered || missing) {
        this.release(entry.id);
        released.push(entry.id);
      }
    }
    return released;
  }

  reservedBytes(unit: string): number {
    let sum = 0;
    for (const entry of this.byUnit.get(unit)?.values() ?? []) sum += entry.bytes;
    return sum;
  }

  get(id: string): CarveEntry | undefined {
    const unit = this.unitOf.get(id);
    return unit === undefined ? undefined : this.byUnit.get(unit)?.get(id);
  }

  entries(unit?: string): CarveEntry[] {
    if (unit !== undefined) return [...(this.byUnit.get(unit)?.values() ?? [])];
    return [...this.byUnit.values()].flatMap((m) => [...m.values()]);
  }

  get size(): number {
    return this.unitOf.size;
  }
}
