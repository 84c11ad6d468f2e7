// The host's mirror engine: one BlockDevice over N legs (NBD exports on
// different units). The NBD server in front of it (engine.ts) serves it to
// the host's own clients; data goes from the host to the units directly.
//
// Rules (docs/adr/0009-host-mirror-engine.md):
// - Writes (and trims, zeroes) go to every attached leg (in sync or
//   rebuilding) and are acknowledged when every one of them answered; a leg
//   that fails is first recorded as out of sync on the surviving legs
//   (durably), then the write is acknowledged. Only when no in-sync leg
//   succeeded does the caller see an error.
// - Before a write is sent, its regions are marked in the intent bitmap on
//   the in-sync legs (durably, once per idle region). An engine that crashed
//   therefore knows which regions may differ between legs.
// - A leg's state lives on the legs (metadata.ts): a leg that missed writes
//   is never read from or promoted until its missed regions were copied to
//   it, after any sequence of failures and restarts. On start, a leg listed
//   in sync that cannot be reached may hold newer data than the others: the
//   engine refuses to start without it.
// - A failed leg is reconnected with backoff; it then gets only the regions
//   it missed (delta), copied region by region under a region lock while
//   the application keeps writing, at a bounded rate, checkpointed in its
//   bitmap so a restart resumes rather than restarts.
// - setLegs() replaces a leg on a running engine (the station moved it to
//   another unit): the new leg must be blank (or already carry this mirror's
//   metadata); the legs in sync record it first, out of sync and lacking
//   every region, and only then is it written to. Its full rebuild first
//   writes a generation-0 marker header on it, so an engine restarted mid-
//   rebuild knows it as this mirror's leg and resumes from the checkpointed
//   bitmap. Regions that read as zeroes on both the source and the target
//   (NBD BLOCK_STATUS, base:allocation) are not copied.

import type { BlockCapabilities, BlockDevice, Extent, ZeroOptions } from "../../block/types.ts";
import type { AllocationExtent } from "../../nbd/client.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import { backoffDelayMs } from "../../util/retry.ts";
import {
  BITMAP_PAGE_BYTES,
  Bitmap,
  HEADER_SLOTS,
  HEADER_SLOT_BYTES,
  INTENT_BITMAP,
  LEGS_MAX,
  type LegRecord,
  type MirrorHeader,
  bitmapOffset,
  dataBytesOf,
  encodeHeader,
  headerSlotOffset,
  newestHeader,
  regionBytesFor,
  BITMAP_BYTES,
  METADATA_BYTES,
} from "./metadata.ts";

const log = logger("engine");

/** What the engine needs of a leg's connection (NbdClient has it). */
export interface LegIo {
  readonly sizeBytes: number;
  /** With `into` (lengthBytes long), the data may land there directly; what resolves is where it is. */
  read(offsetBytes: number, lengthBytes: number, into?: Buffer): Promise<Buffer>;
  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void>;
  /** One write from several buffers (no gather copy); optional. */
  writev?(offsetBytes: number, parts: readonly Buffer[], fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void>;
  zero(offsetBytes: number, lengthBytes: number, fua: boolean, mayTrim: boolean): Promise<void>;
  onBroken(listener: (error: Error) => void): void;
  destroy(reason?: string): void;
  close(): Promise<void>;
  /** Allocation runs from offsetBytes on (NBD BLOCK_STATUS); optional: without it every region is copied. */
  blockStatus?(offsetBytes: number, lengthBytes: number): Promise<readonly AllocationExtent[]>;
}

export interface LegSpec {
  readonly id: string;
  /** Where the leg is (for status and to tell a move from no change); optional. */
  readonly uri?: string;
  connect(): Promise<LegIo>;
}

export type LegState = "in-sync" | "stale" | "rebuilding" | "failed";

export interface RebuildProgress {
  readonly kind: "delta" | "full";
  readonly copiedBytes: number;
  readonly totalBytes: number;
  readonly etaSeconds: number | undefined;
}

export interface LegStatus {
  readonly id: string;
  readonly uri: string | undefined;
  readonly state: LegState;
  readonly rebuild: RebuildProgress | undefined;
  readonly lastError: string | undefined;
}

export type MirrorEvent =
  | { readonly type: "leg-failed"; readonly leg: string; readonly reason: string; readonly generation: number }
  | { readonly type: "leg-rebuilding"; readonly leg: string; readonly kind: "delta" | "full"; readonly totalBytes: number }
  | { readonly type: "rebuild-progress"; readonly leg: string; readonly progress: RebuildProgress }
  | { readonly type: "leg-in-sync"; readonly leg: string; readonly copiedBytes: number; readonly generation: number }
  | { readonly type: "leg-replaced"; readonly leg: string; readonly was: string; readonly generation: number }
  | { readonly type: "leg-moved"; readonly leg: string; readonly uri: string }
  | { readonly type: "leg-refused"; readonly leg: string; readonly reason: string };

export interface MirrorOptions {
  /** First reconnect delay for a failed leg; doubles up to reconnectMaxMs. */
  readonly reconnectMs?: number;
  readonly reconnectMaxMs?: number;
  /** A region whose last write is this old (and none in flight) leaves the intent bitmap. */
  readonly intentIdleMs?: number;
  /** Ceiling on rebuild copy rate (bytes per second), so the application's I/O keeps its share. */
  readonly rebuildBytesPerSecond?: number;
  /** How often a rebuild makes its progress durable (its checkpoint). */
  readonly rebuildCheckpointMs?: number;
  readonly now?: () => number;
  readonly onEvent?: (event: MirrorEvent) => void;
}

/** Regions marked ahead of a sequential stream of writes (see #markAhead). */
export const INTENT_AHEAD_REGIONS = 16;
/** Regions a full rebuild asks BLOCK_STATUS about at once (on the source and the target). */
export const REBUILD_STATUS_WINDOW_REGIONS = 64;
/** Longest a rebuild waits, before each region, for the application's requests in flight to finish (it yields to them). */
export const REBUILD_YIELD_MS_MAX = 4;
/** A rebuild that fell behind its rate ceiling catches up at most this much time (then the ceiling holds again). */
const REBUILD_CATCH_UP_MS_MAX = 1_000;
/** BLOCK_STATUS requests one range may take (a server answers part of a range per request). */
const BLOCK_STATUS_ASKS_MAX = 4096;
/** Sequential streams recognised at once (the ends of the most recent writes). */
const STREAMS_TRACKED = 16;

/** Failed legs retry at jittered times, so legs of many mirrors on one dead unit do not come back in lockstep. */
const RECONNECT_JITTER_RATIO = 0.2;

const DEFAULTS = {
  reconnectMs: 200,
  reconnectMaxMs: 5_000,
  intentIdleMs: 2_000,
  rebuildBytesPerSecond: 512 * 1024 * 1024,
  rebuildCheckpointMs: 500,
};

class Leg {
  readonly index: number;
  spec: LegSpec;
  io: LegIo | undefined;
  state: LegState;
  readonly missed: Bitmap;
  rebuild: { kind: "delta" | "full"; copiedBytes: number; skippedBytes: number; totalBytes: number; startedMs: number } | undefined;
  /** Holds no mirror metadata, or only the marker of a full rebuild: it gets a full copy. */
  blank = false;
  /** Put in by setLegs (or a changed leg set at open): it must prove blank (or this mirror's) before anything is written to it. */
  fresh = false;
  /** Replaced by setLegs: no longer the mirror's; its reconnects stop. */
  removed = false;
  /** The metadata write that records this leg's failure: no request it failed is answered before this settles (and succeeded). */
  recorded: Promise<void> = Promise.resolve();
  /** Reconnect attempts since the leg last came back (the retry policy's attempt number). */
  reconnectAttempts = 0;
  reconnectTimer: NodeJS.Timeout | undefined;
  lastError: string | undefined;

  constructor(index: number, spec: LegSpec, state: LegState, missed: Bitmap) {
    this.index = index;
    this.spec = spec;
    this.state = state;
    this.missed = missed;
  }

  get id(): string {
    return this.spec.id;
  }
}

/** A write in flight; a rebuild may wait for it to finish (waiters are made only then). */
interface WriteTicket {
  waiters: (() => void)[] | undefined;
}

/** A leg reads may go to: in sync (a rebuilding leg may lack the region) and connected. */
function servesReads(leg: Leg): boolean {
  return leg.state === "in-sync" && leg.io !== undefined;
}

interface RegionUse {
  inFlight: number;
  lastWriteMs: number;
  /** The mirror's write count when the last write into the region began (a retire pass sees whether one began since it looked). */
  lastWriteSeq: number;
}

export class Mirror implements BlockDevice {
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly capabilities: BlockCapabilities = {
    readOnly: false,
    canFlush: true,
    canTrim: true,
    canZero: true,
    canFastZero: false,
    canFua: true,
    canCache: false,
    canExtents: false,
    canMultiConn: true,
  };
  readonly mirrorId: string;
  readonly regionBytes: number;
  readonly #legs: Leg[];
  readonly #intent: Bitmap;
  readonly #options: Required<Omit<MirrorOptions, "onEvent" | "now">> & Pick<MirrorOptions, "onEvent">;
  readonly #now: () => number;
  #generation: number;
  /** Metadata writes, one at a time. */
  #metaQueue: Promise<unknown> = Promise.resolve();
  /** Regions whose intent bit is set in memory but not yet durable. */
  readonly #intentPending = new Set<number>();
  readonly #regions = new Map<number, RegionUse>();
  readonly #locked = new Map<number, (() => void)[]>();
  readonly #unlockWaiters = new Map<number, (() => void)[]>();
  #readCursor = 0;
  /** Where the most recent writes ended (oldest first), to recognise sequential streams. */
  readonly #streamEnds: number[] = [];
  #closed = false;
  #intentTimer: NodeJS.Timeout | undefined;
  /** Writes begun so far (RegionUse.lastWriteSeq). */
  #writeSeq = 0;
  /** The retire pass running (one at a time: each takes a FLUSH round trip). */
  #retirePass: Promise<void> | undefined;
  /** Writes in flight (a rebuild waits for those sent before its target joined). */
  readonly #writesInFlight = new Set<WriteTicket>();
  /** Application reads in flight (a rebuild yields to them, and to writes). */
  #readsInFlight = 0;
  /** setLegs calls, one at a time. */
  #legsQueue: Promise<unknown> = Promise.resolve();

  private constructor(mirrorId: string, exportName: string, header: MirrorHeader, legs: Leg[], intent: Bitmap, options: MirrorOptions) {
    this.mirrorId = mirrorId;
    this.name = exportName;
    this.description = `mirror ${mirrorId} over ${legs.length} legs`;
    this.sizeBytes = header.dataBytes;
    this.regionBytes = header.regionBytes;
    this.#generation = header.generation;
    this.#legs = legs;
    this.#intent = intent;
    this.#options = { ...DEFAULTS, ...options };
    this.#now = options.now ?? (() => performance.now());
    this.#intentTimer = setInterval(() => void this.#retireIntent().catch((error: unknown) => log.limited("mirror_intent_failed", "intent bitmap update failed", { error: errorMessage(error) })), Math.max(50, this.#options.intentIdleMs / 2));
    this.#intentTimer.unref();
  }

  get regions(): number {
    return Math.ceil(this.sizeBytes / this.regionBytes);
  }

  get generation(): number {
    return this.#generation;
  }

  status(): LegStatus[] {
    // A replacement not yet connected (and not refused) is out of sync, not failed.
    return this.#legs.map((leg) => ({ id: leg.id, uri: leg.spec.uri, state: leg.fresh && leg.state === "failed" && leg.lastError === undefined ? "stale" : leg.state, rebuild: leg.rebuild === undefined ? undefined : this.#progress(leg), lastError: leg.lastError }));
  }

  /**
   * Changes the legs of the running mirror, by position: the same id with
   * another URI is a move (the leg reconnects there); another id is a
   * replacement. A replacement is recorded first, durably, on the legs in
   * sync (the new id out of sync, lacking every region); then it is
   * connected, checked (blank, or holding this mirror's metadata; anything
   * else is refused and retried with backoff, never written to) and rebuilt
   * in full. Refused: another number of legs, an id moving to another
   * position, or a change that leaves no leg in sync.
   */
  setLegs(specs: readonly LegSpec[]): Promise<void> {
    const run = (): Promise<void> => this.#setLegs(specs);
    const result = this.#legsQueue.then(run, run);
    this.#legsQueue = result.catch(() => undefined);
    return result;
  }

  async #setLegs(specs: readonly LegSpec[]): Promise<void> {
    if (this.#closed) throw new IpsanError("UNAVAILABLE", `mirror ${this.mirrorId} is stopping`);
    if (specs.length !== this.#legs.length) {
      throw new IpsanError("INVALID_ARGUMENT", `mirror ${this.mirrorId} has ${this.#legs.length} legs, not ${specs.length}: a leg can be replaced or moved, not added or removed`);
    }
    if (new Set(specs.map((s) => s.id)).size !== specs.length) throw new IpsanError("INVALID_ARGUMENT", "mirror leg ids must differ");
    const replaced: number[] = [];
    for (const [k, spec] of specs.entries()) {
      const leg = this.#legs[k] as Leg;
      if (spec.id === leg.id) continue;
      const elsewhere = this.#legs.findIndex((l) => l.id === spec.id);
      if (elsewhere >= 0) throw new IpsanError("INVALID_ARGUMENT", `leg ${spec.id} is at position ${elsewhere}, not ${k}: legs keep their positions`);
      replaced.push(k);
    }
    if (replaced.length > 0 && !this.#legs.some((l, k) => l.state === "in-sync" && !replaced.includes(k))) {
      throw new IpsanError("CONFLICT", `replacing ${replaced.map((k) => this.#legs[k]?.id).join(", ")} would leave mirror ${this.mirrorId} without a leg in sync; refused`);
    }
    // Moves: the leg reconnects at its new address (at once if it is out of service).
    for (const [k, spec] of specs.entries()) {
      const leg = this.#legs[k] as Leg;
      if (spec.id !== leg.id || spec.uri === leg.spec.uri) continue;
      leg.spec = spec;
      log.info("mirror leg moved", { mirror: this.mirrorId, leg: leg.id, uri: spec.uri ?? "" });
      this.#options.onEvent?.({ type: "leg-moved", leg: leg.id, uri: spec.uri ?? "" });
      if (leg.state === "failed") {
        if (leg.reconnectTimer !== undefined) clearTimeout(leg.reconnectTimer);
        leg.reconnectTimer = undefined;
        leg.reconnectAttempts = 0;
        void this.#reconnect(leg);
      } else if (leg.state !== "in-sync" || this.#legs.some((l) => l !== leg && l.state === "in-sync")) {
        await this.#fail(leg, new IpsanError("UNAVAILABLE", `moved to ${spec.uri ?? "another address"}`));
      } else {
        log.warn("mirror leg moved but is the only one in sync: it keeps its connection until that breaks", { mirror: this.mirrorId, leg: leg.id });
      }
    }
    if (replaced.length === 0) return;
    const fresh: { leg: Leg; was: string }[] = [];
    for (const k of replaced) {
      const old = this.#legs[k] as Leg;
      // The old leg leaves service first, recorded out of sync on the others.
      if (old.state !== "failed") await this.#fail(old, new IpsanError("UNAVAILABLE", `replaced by ${specs[k]?.id}`));
      old.removed = true;
      if (old.reconnectTimer !== undefined) clearTimeout(old.reconnectTimer);
      old.reconnectTimer = undefined;
      const missed = new Bitmap();
      for (let r = 0; r < this.regions; r++) missed.set(r);
      missed.markAllPagesDirty();
      const leg = new Leg(k, specs[k] as LegSpec, "failed", missed);
      leg.fresh = true;
      this.#legs[k] = leg;
      fresh.push({ leg, was: old.id });
    }
    // The new ids go on record, out of sync and lacking everything, before anything is written to them.
    await this.#persist(true);
    for (const { leg, was } of fresh) {
      log.info("mirror leg replaced", { mirror: this.mirrorId, leg: leg.id, was, index: leg.index, generation: this.#generation });
      this.#options.onEvent?.({ type: "leg-replaced", leg: leg.id, was, generation: this.#generation });
      void this.#reconnect(leg);
    }
  }

  /**
   * Connects the legs, finds the newest state on them and starts serving.
   * Refuses (never guesses) when a leg listed in sync is unreachable, when a
   * leg holds metadata of another mirror or that does not decode, or when
   * the legs differ in size.
   */
  static async open(mirrorId: string, exportName: string, specs: readonly LegSpec[], options: MirrorOptions = {}): Promise<Mirror> {
    if (specs.length === 0 || specs.length > LEGS_MAX) throw new IpsanError("INVALID_ARGUMENT", `a mirror has 1 to ${LEGS_MAX} legs, not ${specs.length}`);
    if (new Set(specs.map((s) => s.id)).size !== specs.length) throw new IpsanError("INVALID_ARGUMENT", "mirror leg ids must differ");
    const connected = await Promise.allSettled(specs.map((spec) => spec.connect()));
    const ios = connected.map((c) => (c.status === "fulfilled" ? c.value : undefined));
    const closeAll = (): void => {
      for (const io of ios) io?.destroy("mirror did not start");
    };
    try {
      const sizes = new Set(ios.filter((io) => io !== undefined).map((io) => io.sizeBytes));
      if (sizes.size === 0) {
        const reasons = connected.map((c, i) => `${specs[i]?.id}: ${c.status === "rejected" ? errorMessage(c.reason) : "?"}`).join("; ");
        throw new IpsanError("UNAVAILABLE", `no leg of mirror ${mirrorId} can be reached (${reasons})`);
      }
      if (sizes.size > 1) throw new IpsanError("INVALID_ARGUMENT", `legs of mirror ${mirrorId} differ in size (${[...sizes].join(", ")} bytes)`);
      const dataBytes = dataBytesOf([...sizes][0] ?? 0);
      // Each reachable leg's newest header. A leg the metadata does not list yet (a replacement) that is not blank is refused, not fatal.
      const headers: (MirrorHeader | undefined)[] = [];
      const refusals = new Map<number, string>();
      for (const [i, io] of ios.entries()) {
        headers.push(undefined);
        if (io === undefined) continue;
        const decoded = await readHeader(io, dataBytes);
        let refusal: string | undefined;
        if (decoded.kind === "invalid") refusal = `leg ${specs[i]?.id} holds mirror metadata that does not decode (${decoded.reason}); refusing to use it. Give the mirror a blank leg instead`;
        else if (decoded.kind === "valid" && (decoded.header.mirrorId !== mirrorId || decoded.header.dataBytes !== dataBytes)) {
          refusal = `leg ${specs[i]?.id} belongs to mirror ${decoded.header.mirrorId} (${decoded.header.dataBytes} bytes), not ${mirrorId}; refusing to use it`;
        }
        if (refusal !== undefined) {
          refusals.set(i, refusal);
          continue;
        }
        headers[i] = decoded.kind === "valid" ? decoded.header : undefined;
      }
      let best: MirrorHeader | undefined;
      let bestIndex = -1;
      headers.forEach((h, i) => {
        if (h !== undefined && (best === undefined || h.generation > best.generation)) {
          best = h;
          bestIndex = i;
        }
      });
      // Legs the newest metadata does not list: replacements, which must be blank (checked below) or refused.
      const listed = new Set<string>((best as MirrorHeader | undefined)?.legs.map((l) => l.id) ?? specs.map((s) => s.id));
      // A leg the metadata lists in sync must be usable; one out of sync on record that is refused stays out of service.
      const recordOf = (id: string): LegRecord | undefined => (best as MirrorHeader | undefined)?.legs.find((l) => l.id === id);
      for (const [i, refusal] of refusals) {
        const id = specs[i]?.id ?? "";
        if (listed.has(id) && (best === undefined || recordOf(id)?.inSync === true)) throw new IpsanError(refusal.includes("belongs to") ? "CONFLICT" : "CORRUPT", refusal);
      }
      if (best !== undefined && (best as MirrorHeader).generation === 0) {
        throw new IpsanError("UNAVAILABLE", `the only reachable legs of mirror ${mirrorId} are being rebuilt (their metadata is a rebuild marker); the engine will not start without a leg in sync`);
      }
      for (const [i, spec] of specs.entries()) {
        const io = ios[i];
        if (best === undefined || listed.has(spec.id) || io === undefined || refusals.has(i) || headers[i] !== undefined) continue;
        if (await holdsData(io, dataBytes)) refusals.set(i, `leg ${spec.id} has no mirror metadata but holds data; refusing to overwrite data the engine does not recognise. Give the mirror a blank leg`);
      }
      for (const i of refusals.keys()) {
        ios[i]?.destroy("refused");
        ios[i] = undefined;
      }
      const regionBytes = best?.regionBytes ?? regionBytesFor(dataBytes);
      const regions = Math.ceil(dataBytes / regionBytes);
      const bitmaps = Array.from({ length: LEGS_MAX + 1 }, () => new Bitmap());
      let header: MirrorHeader;
      const legs: Leg[] = [];
      const added = new Set<string>();
      if (best === undefined && ios.some((io) => io === undefined)) {
        // No reachable leg has a history, but one that cannot be reached may: starting a new mirror would discard it.
        const away = specs.filter((_, i) => ios[i] === undefined).map((s) => s.id);
        throw new IpsanError(
          "UNAVAILABLE",
          `no reachable leg of mirror ${mirrorId} holds its metadata and ${away.join(", ")} cannot be reached; it may hold the mirror's data, so the engine will not start a new mirror without it`,
        );
      }
      if (best === undefined) {
        // A new mirror: every reachable leg is blank (units zero new volumes), so they agree.
        header = { mirrorId, generation: 0, dataBytes, regionBytes, legs: specs.map((s) => ({ id: s.id, inSync: true })) };
      } else {
        const newest: MirrorHeader = best;
        const given = new Set(specs.map((s) => s.id));
        const dropped = newest.legs.filter((l) => !given.has(l.id));
        const newcomers = specs.filter((s) => !listed.has(s.id));
        for (const record of dropped) {
          if (record.inSync) {
            throw new IpsanError(
              "UNAVAILABLE",
              `leg ${record.id} of mirror ${mirrorId} was in sync at generation ${newest.generation} and is not among the legs given (${specs.map((s) => s.id).join(", ")}); it may hold writes the other legs lack, so the engine will not start without it`,
            );
          }
        }
        if (newcomers.length < dropped.length || newest.legs.length - dropped.length + newcomers.length > LEGS_MAX) {
          throw new IpsanError("INVALID_ARGUMENT", `mirror ${mirrorId} has legs ${newest.legs.map((l) => l.id).join(", ")} on record, not ${specs.map((s) => s.id).join(", ")}: a leg out of sync may be replaced, not removed`);
        }
        for (const record of newest.legs) {
          const i = specs.findIndex((s) => s.id === record.id);
          if (i >= 0 && record.inSync && ios[i] === undefined) {
            const reason = refusals.get(i) ?? (connected[i]?.status === "rejected" ? errorMessage(connected[i].reason) : "unreachable");
            throw new IpsanError(
              "UNAVAILABLE",
              `leg ${record.id} of mirror ${mirrorId} was in sync at generation ${newest.generation} and cannot be reached (${reason}); it may hold writes the other legs lack, so the engine will not start without it`,
            );
          }
        }
        // Bitmaps from the leg with the newest header.
        const source = ios[bestIndex] as LegIo;
        for (let b = 0; b <= LEGS_MAX; b++) {
          const bytes = await source.read(bitmapOffset(dataBytes, b), BITMAP_BYTES);
          bytes.copy(bitmaps[b]?.bits ?? Buffer.alloc(0));
        }
        // A replacement takes a dropped leg's place (its bitmap), else the next free one; it lacks every region.
        const records: LegRecord[] = [...newest.legs];
        const queue = [...newcomers];
        for (const [k, record] of records.entries()) {
          if (given.has(record.id)) continue;
          const spec = queue.shift() as LegSpec;
          records[k] = { id: spec.id, inSync: false };
          added.add(spec.id);
        }
        for (const spec of queue) {
          records.push({ id: spec.id, inSync: false });
          added.add(spec.id);
        }
        header = { ...newest, legs: records };
        for (const [k, record] of records.entries()) {
          if (!added.has(record.id)) continue;
          const bitmap = bitmaps[k] as Bitmap;
          bitmap.bits.fill(0);
          for (let r = 0; r < regions; r++) bitmap.set(r);
          bitmap.markAllPagesDirty();
          log.info("mirror leg replaced (at start)", { mirror: mirrorId, leg: record.id, index: k });
        }
      }
      // Order legs as the header lists them (bitmap k belongs to header leg k).
      for (const [k, record] of header.legs.entries()) {
        const i = specs.findIndex((s) => s.id === record.id);
        const spec = specs[i] as LegSpec;
        const own = headers[i];
        const inSync = record.inSync && ios[i] !== undefined && (best === undefined || own?.generation === header.generation);
        const leg = new Leg(k, spec, inSync ? "in-sync" : ios[i] === undefined ? "failed" : "stale", bitmaps[k] as Bitmap);
        leg.io = ios[i];
        leg.fresh = added.has(record.id);
        if (refusals.has(i)) leg.lastError = refusals.get(i);
        if (best !== undefined && leg.io !== undefined && !inSync) {
          // No metadata: nothing of this mirror was ever written to it (a new or replaced volume): it lacks everything.
          if (own === undefined) for (let r = 0; r < regions; r++) leg.missed.set(r);
          // A full copy: a blank leg, or one whose full rebuild was interrupted (its marker); the latter resumes from its bitmap.
          leg.blank = own === undefined || own.generation === 0;
        }
        legs.push(leg);
      }
      const mirror = new Mirror(mirrorId, exportName, header, legs, bitmaps[INTENT_BITMAP] as Bitmap, options);
      await mirror.#start(best === undefined);
      return mirror;
    } catch (error) {
      closeAll();
      throw error;
    }
  }

  /** Reconciles after a crash, records the legs' states durably, and starts rebuilds and reconnects. */
  async #start(fresh: boolean): Promise<void> {
    for (const leg of this.#legs) if (leg.io !== undefined) this.#watch(leg, leg.io);
    const inSync = this.#legs.filter((l) => l.state === "in-sync");
    if (inSync.length === 0) throw new IpsanError("UNAVAILABLE", `mirror ${this.mirrorId} has no leg in sync`);
    // Regions written when the last engine stopped may differ between in-sync legs: make them agree (from the first).
    const intentRegions = [...this.#intent.setRegions(this.regions)];
    if (intentRegions.length > 0) log.info("reconciling regions written before the last stop", { mirror: this.mirrorId, regions: intentRegions.length });
    const [primary, ...others] = inSync;
    for (const region of intentRegions) {
      for (const leg of this.#legs) if (leg.state !== "in-sync") leg.missed.set(region);
      if (others.length > 0 && primary?.io !== undefined) {
        const [offset, length] = this.#regionRange(region);
        const data = await primary.io.read(offset, length);
        for (const other of others) await other.io?.write(offset, data, false);
      }
      this.#intent.clear(region);
    }
    // Every in-sync leg, the one copied from too: the intent bits go once the regions are durable everywhere (a FUA
    // write of the bitmap makes only the bitmap durable; the last engine's writes may still be in a unit's page cache).
    for (const leg of inSync) await leg.io?.flush();
    for (const b of [...this.#legs.map((l) => l.missed), this.#intent]) if (fresh) b.markAllPagesDirty();
    await this.#persist(true);
    for (const leg of this.#legs) {
      if (leg.state === "stale") this.#startRebuild(leg, leg.blank);
      else if (leg.state === "failed") this.#scheduleReconnect(leg);
    }
  }

  // ---------------------------------------------------------------- I/O

  async read(buffer: Buffer, offsetBytes: number): Promise<void> {
    this.#checkRange("read", offsetBytes, buffer.length);
    this.#readsInFlight += 1;
    try {
      for (let attempt = 0; attempt < LEGS_MAX + 1; attempt++) {
        const leg = this.#readLeg();
        if (leg === undefined) break;
        try {
          // Straight into the reply's buffer (NbdClient copies once from the socket's chunks).
          const data = await (leg.io as LegIo).read(offsetBytes, buffer.length, buffer);
          if (data !== buffer) data.copy(buffer);
          return;
        } catch (error) {
          await this.#fail(leg, error);
        }
      }
    } finally {
      this.#readsInFlight -= 1;
    }
    throw new IpsanError("IO_ERROR", `mirror ${this.mirrorId}: no leg in sync could read offset=${offsetBytes} length=${buffer.length}`);
  }

  /** The next in-sync leg in turn (reads alternate between them), or undefined when none is; no array per request. */
  #readLeg(): Leg | undefined {
    let count = 0;
    for (const leg of this.#legs) if (servesReads(leg)) count += 1;
    if (count === 0) return undefined;
    let pick = this.#readCursor++ % count;
    for (const leg of this.#legs) {
      if (!servesReads(leg)) continue;
      if (pick === 0) return leg;
      pick -= 1;
    }
    return undefined;
  }

  /** Legs a write goes to: in sync or rebuilding, and connected. */
  #writeLegs(): Leg[] {
    const out: Leg[] = [];
    for (const leg of this.#legs) if ((leg.state === "in-sync" || leg.state === "rebuilding") && leg.io !== undefined) out.push(leg);
    return out;
  }

  async write(buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void> {
    this.#checkRange("write", offsetBytes, buffer.length);
    await this.#writeLike(offsetBytes, buffer.length, (io) => io.write(offsetBytes, buffer, fua));
  }

  async writev(parts: readonly Buffer[], offsetBytes: number, fua: boolean): Promise<void> {
    if (parts.length === 1) return this.write(parts[0] as Buffer, offsetBytes, fua);
    const lengthBytes = parts.reduce((sum, part) => sum + part.length, 0);
    this.#checkRange("write", offsetBytes, lengthBytes);
    // The received chunks go to every leg as they are: no gather copy of the payload.
    let joined: Buffer | undefined;
    await this.#writeLike(offsetBytes, lengthBytes, (io) => (io.writev !== undefined ? io.writev(offsetBytes, parts, fua) : io.write(offsetBytes, (joined ??= Buffer.concat(parts)), fua)));
  }

  async trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void> {
    this.#checkRange("trim", offsetBytes, lengthBytes);
    await this.#writeLike(offsetBytes, lengthBytes, (io) => io.trim(offsetBytes, lengthBytes, fua));
  }

  async zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void> {
    if (options.fastOnly) throw new IpsanError("NOT_SUPPORTED", "fast zero is not supported by the mirror");
    this.#checkRange("zero", offsetBytes, lengthBytes);
    await this.#writeLike(offsetBytes, lengthBytes, (io) => io.zero(offsetBytes, lengthBytes, options.fua, options.mayTrim));
  }

  /** Every attached leg flushes; a leg that fails is recorded out of sync first. */
  async flush(): Promise<void> {
    await this.#flushLegs("flush");
  }

  async #flushLegs(what: string): Promise<void> {
    const legs = this.#writeLegs();
    await this.#settleLegs(legs, legs.map((l) => (l.io as LegIo).flush()), what);
  }

  async cache(): Promise<void> {}

  async extents(_offsetBytes: number, lengthBytes: number): Promise<readonly Extent[]> {
    return [{ lengthBytes, hole: false, zero: false }];
  }

  async close(): Promise<void> {
    // One device per engine: the engine closes the mirror itself (shutdown()).
  }

  /** Flushes every leg, makes the metadata durable and disconnects. */
  async shutdown(): Promise<void> {
    if (this.#closed) return;
    await this.flush().catch(() => undefined);
    // Nothing is in flight any more: a clean stop leaves no intent regions for the next engine to reconcile.
    await this.#retireIntent(true).catch(() => undefined);
    this.#closed = true;
    if (this.#intentTimer !== undefined) clearInterval(this.#intentTimer);
    for (const leg of this.#legs) if (leg.reconnectTimer !== undefined) clearTimeout(leg.reconnectTimer);
    await this.#metaQueue.catch(() => undefined);
    await Promise.allSettled(this.#legs.map((l) => l.io?.close() ?? Promise.resolve()));
  }

  async #writeLike(offsetBytes: number, lengthBytes: number, send: (io: LegIo) => Promise<void>): Promise<void> {
    if (lengthBytes === 0) return;
    const regions = this.#regionsOf(offsetBytes, lengthBytes);
    // Every region unlocked at one moment, then counted in flight in the same step (a rebuild locks a region only when none is).
    if (this.#locked.size > 0) {
      for (;;) {
        const locked = regions.find((region) => this.#locked.has(region));
        if (locked === undefined) break;
        await new Promise<void>((resolve) => this.#waitUnlock(locked, resolve));
      }
    }
    for (const region of regions) {
      let use = this.#regions.get(region);
      if (use === undefined) {
        use = { inFlight: 0, lastWriteMs: 0, lastWriteSeq: 0 };
        this.#regions.set(region, use);
      }
      use.inFlight += 1;
      use.lastWriteSeq = ++this.#writeSeq;
    }
    const ticket: WriteTicket = { waiters: undefined };
    this.#writesInFlight.add(ticket);
    try {
      const intent = this.#markIntent(regions, this.#continuesStream(offsetBytes, lengthBytes));
      if (intent !== undefined) await intent;
      const legs = this.#writeLegs();
      const sent: Promise<void>[] = [];
      for (const leg of legs) sent.push(send(leg.io as LegIo));
      await this.#settleLegs(legs, sent, "write");
    } finally {
      this.#writesInFlight.delete(ticket);
      if (ticket.waiters !== undefined) for (const wake of ticket.waiters) wake();
      const now = this.#now();
      for (const region of regions) {
        const use = this.#regions.get(region);
        if (use === undefined) continue;
        use.inFlight -= 1;
        use.lastWriteMs = now;
        if (use.inFlight === 0) for (const wake of this.#unlockWaiters.get(region)?.splice(0) ?? []) wake();
      }
    }
  }

  /**
   * Waits for one request on each of `legs` (`sent`, in the same order). Legs that failed are recorded out of
   * sync (durably) before the caller is answered; fails when no in-sync leg succeeded. When every leg
   * succeeds (the common case) no settled-result objects are made.
   */
  async #settleLegs(legs: readonly Leg[], sent: readonly Promise<unknown>[], what: string): Promise<void> {
    let inSyncOk = 0;
    let allOk = true;
    try {
      await (sent.length === 1 ? sent[0] : Promise.all(sent));
    } catch {
      allOk = false;
    }
    if (allOk) {
      for (const leg of legs) if (leg.state === "in-sync") inSyncOk += 1;
    } else {
      const results = await Promise.allSettled(sent);
      const failures: Promise<void>[] = [];
      results.forEach((result, i) => {
        const leg = legs[i] as Leg;
        if (result.status === "fulfilled") {
          if (leg.state === "in-sync") inSyncOk += 1;
        } else failures.push(this.#fail(leg, result.reason));
      });
      await Promise.all(failures);
    }
    if (inSyncOk === 0) throw new IpsanError("IO_ERROR", `mirror ${this.mirrorId}: ${what} failed on every leg in sync`);
    // A leg that failed earlier did not get this request either: its failure must be on record (durably) before the answer.
    for (const leg of this.#legs) if (leg.state === "failed") await leg.recorded;
  }

  #checkRange(what: string, offsetBytes: number, lengthBytes: number): void {
    if (!Number.isSafeInteger(offsetBytes) || !Number.isSafeInteger(lengthBytes) || offsetBytes < 0 || lengthBytes < 0 || offsetBytes + lengthBytes > this.sizeBytes) {
      throw new IpsanError("OUT_OF_RANGE", `${what} out of range: offset=${offsetBytes} length=${lengthBytes} size=${this.sizeBytes}`);
    }
  }

  #regionsOf(offsetBytes: number, lengthBytes: number): number[] {
    const first = Math.floor(offsetBytes / this.regionBytes);
    const last = Math.floor((offsetBytes + lengthBytes - 1) / this.regionBytes);
    const out: number[] = [];
    for (let r = first; r <= last; r++) out.push(r);
    return out;
  }

  #regionRange(region: number): [number, number] {
    const offset = region * this.regionBytes;
    return [offset, Math.min(this.regionBytes, this.sizeBytes - offset)];
  }

  // ---------------------------------------------------------------- metadata

  /**
   * Sets the intent bits of `regions`: a promise that resolves once they are durable on every in-sync leg,
   * or undefined when they already are (most writes: no promise to wait for).
   */
  #markIntent(regions: readonly number[], sequential: boolean): Promise<void> | undefined {
    let wait = false;
    for (const region of regions) {
      if (this.#intent.set(region)) this.#intentPending.add(region);
      if (this.#intentPending.has(region)) wait = true;
    }
    const ahead = sequential && this.#markAhead(regions[regions.length - 1] ?? 0);
    if (wait) return this.#persist(false);
    // Only the regions marked ahead changed: they become durable while the stream goes on (a leg that fails this write is handled by #persist).
    if (ahead) void this.#persist(false).catch(() => undefined);
    return undefined;
  }

  /**
   * A write that continues a sequential stream keeps the next
   * INTENT_AHEAD_REGIONS regions marked as intent (counted as just written, so
   * they stay for intentIdleMs), made durable while the stream writes the
   * regions before them: the stream seldom waits for an intent write, and
   * pays one per INTENT_AHEAD_REGIONS / 2 regions. A region marked but never
   * written costs a needless copy after a crash or for a leg that failed
   * meanwhile (at most INTENT_AHEAD_REGIONS per stream), never a missed one.
   * True if a bit was set.
   */
  #markAhead(region: number): boolean {
    // Extended in batches, when the marked run ahead is down to half: one intent write per INTENT_AHEAD_REGIONS / 2 regions.
    const half = Math.min(region + INTENT_AHEAD_REGIONS / 2, this.regions - 1);
    if (this.#intent.has(half)) return false;
    const now = this.#now();
    const last = Math.min(region + INTENT_AHEAD_REGIONS, this.regions - 1);
    let changed = false;
    for (let ahead = region + 1; ahead <= last; ahead++) {
      if (!this.#intent.set(ahead)) continue;
      changed = true;
      this.#intentPending.add(ahead);
      if (!this.#regions.has(ahead)) this.#regions.set(ahead, { inFlight: 0, lastWriteMs: now, lastWriteSeq: this.#writeSeq });
    }
    return changed;
  }

  /** True when a write at `offsetBytes` continues a recent write (a sequential stream); remembers where this one ends. */
  #continuesStream(offsetBytes: number, lengthBytes: number): boolean {
    const at = this.#streamEnds.indexOf(offsetBytes);
    if (at >= 0) this.#streamEnds.splice(at, 1);
    else if (this.#streamEnds.length >= STREAMS_TRACKED) this.#streamEnds.shift();
    this.#streamEnds.push(offsetBytes + lengthBytes);
    return at >= 0;
  }

  /**
   * Writes what changed in the metadata to every in-sync leg, one writer at
   * a time: the bitmaps' changed pages (legs' bitmaps before the intent
   * bitmap), then, with `header`, a new header generation. A leg that fails
   * a metadata write leaves the in-sync set and the write is repeated for
   * the others.
   */
  #persist(header: boolean): Promise<void> {
    let done: Promise<void> | undefined;
    const run = async (): Promise<void> => {
      const covered = [...this.#intentPending];
      for (;;) {
        const targets = this.#legs.filter((l) => l.state === "in-sync" && l.io !== undefined);
        if (targets.length === 0) throw new IpsanError("IO_ERROR", `mirror ${this.mirrorId}: no leg in sync to record its state on`);
        const writes: { offset: number; data: Buffer }[] = [];
        const bitmaps = [...this.#legs.map((l) => l.missed), this.#intent];
        const indexes = [...this.#legs.map((l) => l.index), INTENT_BITMAP];
        bitmaps.forEach((bitmap, i) => {
          for (const page of bitmap.takeDirtyPages()) {
            writes.push({ offset: bitmapOffset(this.sizeBytes, indexes[i] ?? 0) + page * BITMAP_PAGE_BYTES, data: Buffer.from(bitmap.page(page)) });
          }
        });
        if (header) {
          const next = this.#generation + 1;
          const image = encodeHeader({
            mirrorId: this.mirrorId,
            generation: next,
            dataBytes: this.sizeBytes,
            regionBytes: this.regionBytes,
            legs: this.#legs.map((l) => ({ id: l.id, inSync: l.state === "in-sync" })),
          });
          // Both slots, one after the other: a torn write leaves the other slot whole, and every in-sync leg ends byte-identical.
          for (let k = 0; k < HEADER_SLOTS; k++) writes.push({ offset: headerSlotOffset(this.sizeBytes, (next + k) % HEADER_SLOTS), data: image });
        }
        let failed = false;
        const results = await Promise.allSettled(
          targets.map(async (leg) => {
            for (const write of writes) await (leg.io as LegIo).write(write.offset, write.data, true);
          }),
        );
        results.forEach((result, i) => {
          if (result.status === "rejected") {
            const leg = targets[i] as Leg;
            this.#markFailed(leg, result.reason);
            // This run goes on to record it: requests that failed on the leg wait for this run.
            if (done !== undefined) leg.recorded = done;
            failed = true;
          }
        });
        if (!failed) {
          if (header) this.#generation += 1;
          for (const region of covered) this.#intentPending.delete(region);
          return;
        }
        // Someone left the in-sync set: rewrite everything for those that remain, with a header saying so.
        for (const bitmap of bitmaps) bitmap.markAllPagesDirty();
        header = true;
      }
    };
    const result = this.#metaQueue.then(run, run);
    done = result;
    this.#metaQueue = result.catch(() => undefined);
    return result;
  }

  /** Records `leg` out of sync durably (on the legs that remain); the caller may answer its request after this. */
  async #fail(leg: Leg, error: unknown): Promise<void> {
    if (this.#markFailed(leg, error)) leg.recorded = this.#persist(true);
    // Already failed: its failure is (being) recorded by an earlier write; that one must have succeeded too.
    await leg.recorded;
  }

  /** In memory: the leg leaves service, and may lack every region with a write in flight. True if its state changed. */
  #markFailed(leg: Leg, error: unknown): boolean {
    if (leg.state === "failed") return false;
    const was = leg.state;
    leg.state = "failed";
    leg.lastError = errorMessage(error);
    leg.io?.destroy(`leg failed: ${leg.lastError}`);
    leg.io = undefined;
    for (const region of this.#intent.setRegions(this.regions)) leg.missed.set(region);
    log.warn("mirror leg failed", { mirror: this.mirrorId, leg: leg.id, was, error: leg.lastError });
    this.#options.onEvent?.({ type: "leg-failed", leg: leg.id, reason: leg.lastError, generation: this.#generation + 1 });
    if (!this.#closed && !leg.removed) this.#scheduleReconnect(leg);
    return was === "in-sync" || was === "rebuilding" || was === "stale";
  }

  /**
   * Regions idle long enough leave the intent bitmap; legs out of service get
   * them as missed first. A region's bit may go only once its writes are
   * durable on every leg that took them: a FUA write makes only its own
   * range durable (NBD; an ipsan unit syncs just that range, ADR 0020), so
   * the intent bitmap's FUA page says nothing about the data. The pass
   * therefore FLUSHes the legs first, then clears the regions no write began
   * in meanwhile. A leg whose FLUSH fails is recorded out of sync (lacking
   * every region still in the bitmap) like a leg whose write failed.
   */
  async #retireIntent(idleOrNot = false): Promise<void> {
    // The timer skips a turn while a pass runs; a clean stop (idleOrNot) waits for it and then retires everything.
    while (this.#retirePass !== undefined) {
      if (!idleOrNot) return;
      await this.#retirePass.catch(() => undefined);
    }
    const pass = this.#retireOnce(idleOrNot);
    this.#retirePass = pass;
    try {
      await pass;
    } finally {
      if (this.#retirePass === pass) this.#retirePass = undefined;
    }
  }

  async #retireOnce(idleOrNot: boolean): Promise<void> {
    if (this.#closed) return;
    const now = this.#now();
    const idle = new Map<number, number>();
    for (const region of this.#intent.setRegions(this.regions)) {
      const use = this.#regions.get(region);
      const busy = use !== undefined && (use.inFlight > 0 || (!idleOrNot && now - use.lastWriteMs < this.#options.intentIdleMs));
      if (this.#intentPending.has(region) || busy) continue;
      idle.set(region, use?.lastWriteSeq ?? -1);
    }
    if (idle.size === 0) return;
    await this.#flushLegs("intent retire");
    if (this.#closed) return;
    let changed = false;
    for (const [region, seq] of idle) {
      const use = this.#regions.get(region);
      // A write that began since the region was found idle may not be covered by the FLUSH: the region stays.
      if (use !== undefined && (use.lastWriteSeq !== seq || use.inFlight > 0)) continue;
      if (this.#intentPending.has(region) || !this.#intent.has(region)) continue;
      for (const leg of this.#legs) if (leg.state === "failed" || leg.state === "stale") leg.missed.set(region);
      this.#intent.clear(region);
      this.#regions.delete(region);
      changed = true;
    }
    if (changed) await this.#persist(false);
  }

  // ---------------------------------------------------------------- legs coming back

  #watch(leg: Leg, io: LegIo): void {
    io.onBroken((error) => {
      if (leg.io !== io || this.#closed) return;
      void this.#fail(leg, error).catch((e: unknown) => log.limited("mirror_record_failed", "recording a failed leg failed", { leg: leg.id, error: errorMessage(e) }));
    });
  }

  #scheduleReconnect(leg: Leg): void {
    if (leg.reconnectTimer !== undefined || this.#closed || leg.removed) return;
    // The project's backoff (src/util/retry.ts): reconnectMs doubling up to reconnectMaxMs, jittered; never gives up.
    const policy = { initialMs: this.#options.reconnectMs, maxMs: this.#options.reconnectMaxMs, attemptsMax: Number.MAX_SAFE_INTEGER, jitterRatio: RECONNECT_JITTER_RATIO };
    const delayMs = backoffDelayMs(policy, leg.reconnectAttempts++, Math.random);
    leg.reconnectTimer = setTimeout(() => {
      leg.reconnectTimer = undefined;
      void this.#reconnect(leg);
    }, delayMs);
  }

  async #reconnect(leg: Leg): Promise<void> {
    if (this.#closed || leg.state !== "failed" || leg.removed) return;
    let io: LegIo;
    try {
      io = await leg.spec.connect();
    } catch (error) {
      leg.lastError = errorMessage(error);
      this.#scheduleReconnect(leg);
      return;
    }
    const check = this.#closed ? { refusal: "engine stopping", blank: false, empty: false } : await this.#checkReturning(io, leg);
    const refusal = check.refusal;
    if (leg.removed || leg.state !== "failed") {
      io.destroy("leg replaced meanwhile");
      return;
    }
    if (refusal !== undefined) {
      io.destroy(refusal);
      if (leg.lastError !== refusal) {
        log.warn("mirror leg refused", { mirror: this.mirrorId, leg: leg.id, reason: refusal });
        this.#options.onEvent?.({ type: "leg-refused", leg: leg.id, reason: refusal });
      }
      leg.lastError = refusal;
      this.#scheduleReconnect(leg);
      return;
    }
    leg.io = io;
    leg.reconnectAttempts = 0;
    leg.state = "stale";
    // A leg without metadata (new, or its volume was replaced) lacks everything; one with a rebuild marker lacks what its bitmap says.
    if (check.empty) for (let r = 0; r < this.regions; r++) leg.missed.set(r);
    this.#watch(leg, io);
    log.info("mirror leg reachable again", { mirror: this.mirrorId, leg: leg.id, blank: check.blank });
    this.#startRebuild(leg, check.blank);
  }

  /**
   * Why a leg that connects may not be used (another size, another mirror's
   * metadata, or, for a replacement, data without metadata), or undefined.
   * blank: it gets a full copy (no metadata, or a rebuild marker); empty: no
   * metadata at all.
   */
  async #checkReturning(io: LegIo, leg: Leg): Promise<{ refusal: string | undefined; blank: boolean; empty: boolean }> {
    const no = (refusal: string): { refusal: string; blank: boolean; empty: boolean } => ({ refusal, blank: false, empty: false });
    if (io.sizeBytes - METADATA_BYTES !== this.sizeBytes) return no(`leg has ${io.sizeBytes} bytes, the mirror needs ${this.sizeBytes + METADATA_BYTES}`);
    try {
      const decoded = await readHeader(io, this.sizeBytes);
      if (decoded.kind === "invalid") return no(`its mirror metadata does not decode (${decoded.reason}); refusing to overwrite it`);
      if (decoded.kind === "valid" && (decoded.header.mirrorId !== this.mirrorId || decoded.header.dataBytes !== this.sizeBytes)) {
        return no(`it belongs to mirror ${decoded.header.mirrorId}; refusing to overwrite it`);
      }
      if (decoded.kind === "empty" && leg.fresh && (await holdsData(io, this.sizeBytes))) return no("it has no mirror metadata but holds data; refusing to overwrite data the engine does not recognise");
      // A replacement that already holds this mirror's metadata (an earlier attempt) still gets everything: its bitmap is all set.
      const blank = decoded.kind === "empty" || decoded.header.generation === 0 || leg.fresh;
      return { refusal: undefined, blank, empty: decoded.kind === "empty" };
    } catch (error) {
      return no(errorMessage(error));
    }
  }

  #startRebuild(leg: Leg, full = false): void {
    leg.rebuild = { kind: full ? "full" : "delta", copiedBytes: 0, skippedBytes: 0, totalBytes: this.#regionsBytes(leg.missed), startedMs: this.#now() };
    this.#options.onEvent?.({ type: "leg-rebuilding", leg: leg.id, kind: leg.rebuild.kind, totalBytes: leg.rebuild.totalBytes });
    log.info("mirror leg rebuild started", { mirror: this.mirrorId, leg: leg.id, kind: leg.rebuild.kind, bytes: leg.rebuild.totalBytes });
    const target = leg.io;
    void this.#rebuild(leg).catch((error: unknown) => {
      if (leg.io !== target || leg.state === "failed") return;
      void this.#fail(leg, error).catch(() => undefined);
    });
  }

  #regionsBytes(bitmap: Bitmap): number {
    let bytes = 0;
    for (const region of bitmap.setRegions(this.regions)) bytes += this.#regionRange(region)[1];
    return bytes;
  }

  #progress(leg: Leg): RebuildProgress {
    const r = leg.rebuild;
    if (r === undefined) return { kind: "delta", copiedBytes: 0, totalBytes: 0, etaSeconds: 0 };
    const elapsed = (this.#now() - r.startedMs) / 1000;
    // Progress counts regions skipped (zero on both sides) as done; copiedBytes in the "in sync" log line is what was sent.
    const done = r.copiedBytes + r.skippedBytes;
    const rate = elapsed > 0 ? done / elapsed : 0;
    return { kind: r.kind, copiedBytes: done, totalBytes: r.totalBytes, etaSeconds: rate > 0 ? Math.ceil(Math.max(0, r.totalBytes - done) / rate) : undefined };
  }

  async #rebuild(leg: Leg): Promise<void> {
    const target = leg.io;
    if (target === undefined) return;
    const full = leg.rebuild?.kind === "full";
    if (full) {
      // Before anything is written to it: the record says it lacks every region it lacks (durably), then the leg gets a marker
      // (generation 0) saying it belongs to this mirror, so an engine restarted mid-rebuild resumes from that record.
      await this.#persist(false);
      if (this.#closed || leg.io !== target || leg.state !== "stale") return;
      const marker = encodeHeader({ mirrorId: this.mirrorId, generation: 0, dataBytes: this.sizeBytes, regionBytes: this.regionBytes, legs: this.#legs.map((l) => ({ id: l.id, inSync: l.state === "in-sync" })) });
      for (let slot = 0; slot < HEADER_SLOTS; slot++) await target.write(headerSlotOffset(this.sizeBytes, slot), marker, true);
      leg.fresh = false;
    }
    if (this.#closed || leg.io !== target || leg.state !== "stale") return;
    // Writes still in flight (or not yet retired from the intent bitmap) went out without this leg, also those made while
    // the marker was written: it lacks their regions too. From the next line on, every write goes to it as well.
    for (const region of this.#intent.setRegions(this.regions)) leg.missed.set(region);
    leg.state = "rebuilding";
    if (leg.rebuild !== undefined) leg.rebuild.totalBytes = this.#regionsBytes(leg.missed);
    // Writes sent before the leg joined did not go to it: they finish before any region is judged (BLOCK_STATUS below).
    await Promise.all([...this.#writesInFlight].map((ticket) => new Promise<void>((resolve) => (ticket.waiters ??= []).push(resolve))));
    let lastCheckpoint = this.#now();
    /** When the rate ceiling's clock started (moved forward when the copy falls behind: see below). */
    let started = this.#now();
    /** Copied since the last checkpoint: their bits are cleared only once the target has flushed them. */
    let copiedRegions: number[] = [];
    const checkpoint = async (): Promise<void> => {
      await target.flush();
      for (const region of copiedRegions) leg.missed.clear(region);
      copiedRegions = [];
      await this.#persist(false);
    };
    /** Regions that read as zeroes on the source and on the target (both asked after the target joined): nothing to copy. */
    let zeroWindow: { first: number; zero: boolean[] } | undefined;
    let statusWorks = target.blockStatus !== undefined;
    const bothZero = async (region: number, source: LegIo): Promise<boolean> => {
      if (!statusWorks || source.blockStatus === undefined) return false;
      if (zeroWindow === undefined || region < zeroWindow.first || region >= zeroWindow.first + zeroWindow.zero.length) {
        const count = Math.min(REBUILD_STATUS_WINDOW_REGIONS, this.regions - region);
        const offset = region * this.regionBytes;
        const length = Math.min(count * this.regionBytes, this.sizeBytes - offset);
        try {
          const [a, b] = await Promise.all([zeroRuns(source, offset, length), zeroRuns(target, offset, length)]);
          const zero = Array.from({ length: count }, () => true);
          for (const run of [...a, ...b]) {
            if (run.zero) continue;
            const first = Math.floor(run.offsetBytes / this.regionBytes) - region;
            const last = Math.floor((run.offsetBytes + run.lengthBytes - 1) / this.regionBytes) - region;
            for (let k = Math.max(0, first); k <= Math.min(count - 1, last); k++) zero[k] = false;
          }
          zeroWindow = { first: region, zero };
        } catch (error) {
          statusWorks = false;
          log.limited("mirror_block_status", "BLOCK_STATUS failed; the rebuild copies every region", { mirror: this.mirrorId, leg: leg.id, error: errorMessage(error) });
          return false;
        }
      }
      return zeroWindow.zero[region - zeroWindow.first] === true;
    };
    for (const region of [...leg.missed.setRegions(this.regions)]) {
      if (this.#closed || leg.state !== "rebuilding" || leg.io !== target) return;
      const [offset, length] = this.#regionRange(region);
      const source = this.#legs.find((l) => l.state === "in-sync" && l.io !== undefined);
      if (source === undefined) throw new IpsanError("IO_ERROR", "no leg in sync to copy from");
      if (await bothZero(region, source.io as LegIo)) {
        // Every write since both were asked went to both legs: the region is equal on them without a copy.
        copiedRegions.push(region);
        if (leg.rebuild !== undefined) leg.rebuild.skippedBytes += length;
      } else {
        // Application I/O first: wait (briefly, bounded) while requests are in flight before taking the region.
        for (let waited = 0; waited < REBUILD_YIELD_MS_MAX && this.#readsInFlight + this.#writesInFlight.size > 0; waited++) await new Promise((resolve) => setTimeout(resolve, 1));
        await this.#lock(region);
        try {
          const from = this.#legs.find((l) => l.state === "in-sync" && l.io !== undefined);
          if (from === undefined) throw new IpsanError("IO_ERROR", "no leg in sync to copy from");
          let data: Buffer;
          try {
            data = await (from.io as LegIo).read(offset, length);
          } catch (error) {
            await this.#fail(from, error);
            throw error;
          }
          await target.write(offset, data, false);
        } finally {
          this.#unlock(region);
        }
        copiedRegions.push(region);
        if (leg.rebuild !== undefined) leg.rebuild.copiedBytes += length;
      }
      const now = this.#now();
      if (now - lastCheckpoint >= this.#options.rebuildCheckpointMs) {
        // The checkpoint: what was copied is durable on the target before its bits are cleared on record.
        await checkpoint();
        lastCheckpoint = now;
        this.#options.onEvent?.({ type: "rebuild-progress", leg: leg.id, progress: this.#progress(leg) });
      }
      // Rate ceiling: sleep off any lead over rebuildBytesPerSecond.
      const copied = leg.rebuild?.copiedBytes ?? 0;
      const due = started + (copied / this.#options.rebuildBytesPerSecond) * 1000;
      if (due > now) await new Promise((resolve) => setTimeout(resolve, Math.min(1000, due - now)));
      // Behind by more than a second (stalled, or yielding): that time is not made up in a burst above the ceiling.
      else if (now - due > REBUILD_CATCH_UP_MS_MAX) started += now - due - REBUILD_CATCH_UP_MS_MAX;
    }
    if (this.#closed || leg.state !== "rebuilding" || leg.io !== target) return;
    await checkpoint();
    // Promotion: the leg gets the whole metadata area, then a header naming it in sync goes to every in-sync leg.
    await this.#promote(leg, target);
  }

  async #promote(leg: Leg, target: LegIo): Promise<void> {
    const run = async (): Promise<void> => {
      if (leg.state !== "rebuilding" || leg.io !== target) return;
      for (const other of [...this.#legs.map((l) => l.missed), this.#intent]) {
        await target.write(bitmapOffset(this.sizeBytes, other === this.#intent ? INTENT_BITMAP : this.#legs.findIndex((l) => l.missed === other)), Buffer.from(other.bits), true);
      }
      leg.state = "in-sync";
    };
    const step = this.#metaQueue.then(run, run);
    this.#metaQueue = step.catch(() => undefined);
    await step;
    await this.#persist(true);
    const copied = leg.rebuild?.copiedBytes ?? 0;
    const skipped = leg.rebuild?.skippedBytes ?? 0;
    leg.rebuild = undefined;
    log.info("mirror leg in sync", { mirror: this.mirrorId, leg: leg.id, copiedBytes: copied, skippedBytes: skipped, generation: this.#generation });
    this.#options.onEvent?.({ type: "leg-in-sync", leg: leg.id, copiedBytes: copied, generation: this.#generation });
  }

  async #lock(region: number): Promise<void> {
    while (this.#locked.has(region)) await new Promise<void>((resolve) => this.#waitUnlock(region, resolve));
    this.#locked.set(region, []);
    // Writes already in flight on the region finish first.
    while ((this.#regions.get(region)?.inFlight ?? 0) > 0) {
      await new Promise<void>((resolve) => {
        const list = this.#unlockWaiters.get(region) ?? [];
        list.push(resolve);
        this.#unlockWaiters.set(region, list);
      });
    }
  }

  #unlock(region: number): void {
    const waiters = this.#locked.get(region) ?? [];
    this.#locked.delete(region);
    for (const wake of waiters) wake();
  }

  #waitUnlock(region: number, wake: () => void): void {
    const list = this.#locked.get(region);
    if (list === undefined) wake();
    else list.push(wake);
  }
}

/** The newer of a leg's two header slots. */
async function readHeader(io: LegIo, dataBytes: number): Promise<ReturnType<typeof newestHeader>> {
  const slots: Buffer[] = [];
  for (let slot = 0; slot < HEADER_SLOTS; slot++) slots.push(await io.read(headerSlotOffset(dataBytes, slot), HEADER_SLOT_BYTES));
  return newestHeader(slots);
}

/**
 * True when BLOCK_STATUS shows bytes that do not read as zeroes in the data
 * area of a leg without mirror metadata (someone's data), or when the answer
 * takes more than BLOCK_STATUS_ASKS_MAX requests (so many runs: taken as
 * data). A leg that cannot answer BLOCK_STATUS at all is taken as blank
 * (units zero new volumes).
 */
async function holdsData(io: LegIo, dataBytes: number): Promise<boolean> {
  const status = io.blockStatus;
  if (status === undefined) return false;
  let at = 0;
  try {
    for (let asks = 0; at < dataBytes; asks++) {
      if (asks >= BLOCK_STATUS_ASKS_MAX) return true;
      const runs = await status.call(io, at, dataBytes - at);
      if (runs.length === 0) return true;
      for (const run of runs) {
        if (!run.zero) return true;
        at += Math.max(1, run.lengthBytes);
      }
    }
    return false;
  } catch (error) {
    log.limited("mirror_block_status", "BLOCK_STATUS failed; taking the leg as blank", { error: errorMessage(error) });
    return false;
  }
}

/** BLOCK_STATUS runs covering [offsetBytes, offsetBytes + lengthBytes) exactly (asking again while the answer is short). */
async function zeroRuns(io: LegIo, offsetBytes: number, lengthBytes: number): Promise<{ offsetBytes: number; lengthBytes: number; zero: boolean }[]> {
  const status = io.blockStatus;
  if (status === undefined) throw new IpsanError("NOT_SUPPORTED", "no BLOCK_STATUS");
  const out: { offsetBytes: number; lengthBytes: number; zero: boolean }[] = [];
  const end = offsetBytes + lengthBytes;
  let at = offsetBytes;
  for (let asks = 0; at < end; asks++) {
    if (asks >= BLOCK_STATUS_ASKS_MAX) throw new IpsanError("IO_ERROR", `BLOCK_STATUS did not cover ${lengthBytes} bytes in ${BLOCK_STATUS_ASKS_MAX} requests`);
    const runs = await status.call(io, at, end - at);
    if (runs.length === 0) throw new IpsanError("IO_ERROR", "BLOCK_STATUS answered no extent");
    for (const run of runs) {
      if (run.lengthBytes <= 0) throw new IpsanError("IO_ERROR", "BLOCK_STATUS answered an empty extent");
      const length = Math.min(run.lengthBytes, end - at);
      out.push({ offsetBytes: at, lengthBytes: length, zero: run.zero });
      at += length;
      if (at >= end) break;
    }
  }
  return out;
}
