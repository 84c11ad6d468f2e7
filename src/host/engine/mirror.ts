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

import type { BlockCapabilities, BlockDevice, Extent, ZeroOptions } from "../../block/types.ts";
import { IpsanError, errorMessage } from "../../util/errors.ts";
import { logger } from "../../util/log.ts";
import {
  BITMAP_PAGE_BYTES,
  Bitmap,
  HEADER_SLOTS,
  HEADER_SLOT_BYTES,
  INTENT_BITMAP,
  LEGS_MAX,
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
  read(offsetBytes: number, lengthBytes: number): Promise<Buffer>;
  write(offsetBytes: number, data: Buffer, fua: boolean): Promise<void>;
  /** One write from several buffers (no gather copy); optional. */
  writev?(offsetBytes: number, parts: readonly Buffer[], fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void>;
  zero(offsetBytes: number, lengthBytes: number, fua: boolean, mayTrim: boolean): Promise<void>;
  onBroken(listener: (error: Error) => void): void;
  destroy(reason?: string): void;
  close(): Promise<void>;
}

export interface LegSpec {
  readonly id: string;
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
  readonly state: LegState;
  readonly rebuild: RebuildProgress | undefined;
  readonly lastError: string | undefined;
}

export type MirrorEvent =
  | { readonly type: "leg-failed"; readonly leg: string; readonly reason: string; readonly generation: number }
  | { readonly type: "leg-rebuilding"; readonly leg: string; readonly kind: "delta" | "full"; readonly totalBytes: number }
  | { readonly type: "rebuild-progress"; readonly leg: string; readonly progress: RebuildProgress }
  | { readonly type: "leg-in-sync"; readonly leg: string; readonly copiedBytes: number; readonly generation: number };

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
/** Sequential streams recognised at once (the ends of the most recent writes). */
const STREAMS_TRACKED = 16;

const DEFAULTS = {
  reconnectMs: 200,
  reconnectMaxMs: 5_000,
  intentIdleMs: 2_000,
  rebuildBytesPerSecond: 512 * 1024 * 1024,
  rebuildCheckpointMs: 500,
};

class Leg {
  readonly index: number;
  readonly spec: LegSpec;
  io: LegIo | undefined;
  state: LegState;
  readonly missed: Bitmap;
  rebuild: { kind: "delta" | "full"; copiedBytes: number; totalBytes: number; startedMs: number } | undefined;
  /** Holds no mirror metadata: it gets a full copy. */
  blank = false;
  /** The metadata write that records this leg's failure: no request it failed is answered before this settles (and succeeded). */
  recorded: Promise<void> = Promise.resolve();
  reconnectDelayMs = 0;
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

interface RegionUse {
  inFlight: number;
  lastWriteMs: number;
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
    return this.#legs.map((leg) => ({ id: leg.id, state: leg.state, rebuild: leg.rebuild === undefined ? undefined : this.#progress(leg), lastError: leg.lastError }));
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
      // Each reachable leg's newest header.
      const headers = await Promise.all(
        ios.map(async (io, i) => {
          if (io === undefined) return undefined;
          const slots: Buffer[] = [];
          for (let slot = 0; slot < HEADER_SLOTS; slot++) slots.push(await io.read(headerSlotOffset(dataBytes, slot), HEADER_SLOT_BYTES));
          const decoded = newestHeader(slots);
          if (decoded.kind === "invalid") {
            throw new IpsanError("CORRUPT", `leg ${specs[i]?.id} holds mirror metadata that does not decode (${decoded.reason}); refusing to use it. Give the mirror a blank leg instead`);
          }
          if (decoded.kind === "valid" && (decoded.header.mirrorId !== mirrorId || decoded.header.dataBytes !== dataBytes)) {
            throw new IpsanError("CONFLICT", `leg ${specs[i]?.id} belongs to mirror ${decoded.header.mirrorId} (${decoded.header.dataBytes} bytes), not ${mirrorId}; refusing to use it`);
          }
          return decoded.kind === "valid" ? decoded.header : undefined;
        }),
      );
      let best: MirrorHeader | undefined;
      let bestIndex = -1;
      headers.forEach((h, i) => {
        if (h !== undefined && (best === undefined || h.generation > best.generation)) {
          best = h;
          bestIndex = i;
        }
      });
      const regionBytes = best?.regionBytes ?? regionBytesFor(dataBytes);
      const regions = Math.ceil(dataBytes / regionBytes);
      const bitmaps = Array.from({ length: LEGS_MAX + 1 }, () => new Bitmap());
      let header: MirrorHeader;
      const legs: Leg[] = [];
      if (best === undefined && ios.some((io) => io === undefined)) {
        // No reachable leg has a history, but one that cannot be reached may: starting a new mirror would discard it.
        const away = specs.filter((_, i) => ios[i] === undefined).map((s) => s.id);
        throw new IpsanError(
          "UNAVAILABLE",
          `no reachable leg of mirror ${mirrorId} holds its metadata and ${away.join(", ")} cannot be reached; it may hold the mirror's data, so the engine will not start a new mirror without it`,
        );
      }
      if (best === undefined) {
        // A new mirror: every reachable leg is blank (units zero new volumes), so they agree; an unreachable one gets a full copy later.
        header = { mirrorId, generation: 0, dataBytes, regionBytes, legs: specs.map((s, i) => ({ id: s.id, inSync: ios[i] !== undefined })) };
        specs.forEach((spec, i) => {
          if (ios[i] === undefined) for (let r = 0; r < regions; r++) bitmaps[i]?.set(r);
          void spec;
        });
      } else {
        const newest: MirrorHeader = best;
        header = newest;
        const ids = newest.legs.map((l) => l.id);
        if (ids.length !== specs.length || !specs.every((s) => ids.includes(s.id))) {
          throw new IpsanError("INVALID_ARGUMENT", `mirror ${mirrorId} has legs ${ids.join(", ")} on record, not ${specs.map((s) => s.id).join(", ")}`);
        }
        for (const record of newest.legs) {
          const i = specs.findIndex((s) => s.id === record.id);
          if (record.inSync && ios[i] === undefined) {
            const reason = connected[i]?.status === "rejected" ? errorMessage(connected[i].reason) : "unreachable";
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
      }
      // Order legs as the header lists them (bitmap k belongs to header leg k).
      for (const [k, record] of header.legs.entries()) {
        const i = specs.findIndex((s) => s.id === record.id);
        const spec = specs[i] as LegSpec;
        const ownGeneration = headers[i]?.generation;
        const inSync = record.inSync && ios[i] !== undefined && (best === undefined || ownGeneration === header.generation);
        const leg = new Leg(k, spec, inSync ? "in-sync" : ios[i] === undefined ? "failed" : "stale", bitmaps[k] as Bitmap);
        leg.io = ios[i];
        // A blank leg in a mirror that has a history (its volume was replaced) lacks everything.
        leg.blank = best !== undefined && ios[i] !== undefined && headers[i] === undefined;
        if (leg.blank) for (let r = 0; r < regions; r++) leg.missed.set(r);
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
    for (const other of others) await other.io?.flush();
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
    for (let attempt = 0; attempt < LEGS_MAX + 1; attempt++) {
      const inSync = this.#legs.filter((l) => l.state === "in-sync" && l.io !== undefined);
      if (inSync.length === 0) break;
      const leg = inSync[this.#readCursor++ % inSync.length] as Leg;
      try {
        const data = await (leg.io as LegIo).read(offsetBytes, buffer.length);
        data.copy(buffer);
        return;
      } catch (error) {
        await this.#fail(leg, error);
      }
    }
    throw new IpsanError("IO_ERROR", `mirror ${this.mirrorId}: no leg in sync could read offset=${offsetBytes} length=${buffer.length}`);
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
    const legs = this.#legs.filter((l) => (l.state === "in-sync" || l.state === "rebuilding") && l.io !== undefined);
    const results = await Promise.allSettled(legs.map((l) => (l.io as LegIo).flush()));
    await this.#settleLegs(legs, results, "flush");
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
    for (;;) {
      const locked = regions.find((region) => this.#locked.has(region));
      if (locked === undefined) break;
      await new Promise<void>((resolve) => this.#waitUnlock(locked, resolve));
    }
    for (const region of regions) {
      const use = this.#regions.get(region) ?? { inFlight: 0, lastWriteMs: 0 };
      use.inFlight += 1;
      this.#regions.set(region, use);
    }
    try {
      await this.#markIntent(regions, this.#continuesStream(offsetBytes, lengthBytes));
      const legs = this.#legs.filter((l) => (l.state === "in-sync" || l.state === "rebuilding") && l.io !== undefined);
      const results = await Promise.allSettled(legs.map((l) => send(l.io as LegIo)));
      await this.#settleLegs(legs, results, "write");
    } finally {
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

  /** Legs that failed are recorded out of sync (durably) before the caller is answered; fails when no in-sync leg succeeded. */
  async #settleLegs(legs: readonly Leg[], results: readonly PromiseSettledResult<unknown>[], what: string): Promise<void> {
    let inSyncOk = 0;
    const failures: Promise<void>[] = [];
    results.forEach((result, i) => {
      const leg = legs[i] as Leg;
      if (result.status === "fulfilled") {
        if (leg.state === "in-sync") inSyncOk += 1;
      } else failures.push(this.#fail(leg, result.reason));
    });
    await Promise.all(failures);
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

  /** Sets the intent bits of `regions`; resolves once they are durable on every in-sync leg. */
  async #markIntent(regions: readonly number[], sequential: boolean): Promise<void> {
    let wait = false;
    for (const region of regions) {
      if (this.#intent.set(region)) this.#intentPending.add(region);
      if (this.#intentPending.has(region)) wait = true;
    }
    const ahead = sequential && this.#markAhead(regions[regions.length - 1] ?? 0);
    if (wait) await this.#persist(false);
    // Only the regions marked ahead changed: they become durable while the stream goes on (a leg that fails this write is handled by #persist).
    else if (ahead) void this.#persist(false).catch(() => undefined);
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
      if (!this.#regions.has(ahead)) this.#regions.set(ahead, { inFlight: 0, lastWriteMs: now });
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
    if (!this.#closed) this.#scheduleReconnect(leg);
    return was === "in-sync" || was === "rebuilding" || was === "stale";
  }

  /** Regions idle long enough leave the intent bitmap; legs out of service get them as missed first. */
  async #retireIntent(idleOrNot = false): Promise<void> {
    if (this.#closed) return;
    const now = this.#now();
    let changed = false;
    for (const region of this.#intent.setRegions(this.regions)) {
      const use = this.#regions.get(region);
      const busy = use !== undefined && (use.inFlight > 0 || (!idleOrNot && now - use.lastWriteMs < this.#options.intentIdleMs));
      if (this.#intentPending.has(region) || busy) continue;
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
    if (leg.reconnectTimer !== undefined || this.#closed) return;
    leg.reconnectDelayMs = leg.reconnectDelayMs === 0 ? this.#options.reconnectMs : Math.min(leg.reconnectDelayMs * 2, this.#options.reconnectMaxMs);
    leg.reconnectTimer = setTimeout(() => {
      leg.reconnectTimer = undefined;
      void this.#reconnect(leg);
    }, leg.reconnectDelayMs);
  }

  async #reconnect(leg: Leg): Promise<void> {
    if (this.#closed || leg.state !== "failed") return;
    let io: LegIo;
    try {
      io = await leg.spec.connect();
    } catch (error) {
      leg.lastError = errorMessage(error);
      this.#scheduleReconnect(leg);
      return;
    }
    const check = this.#closed ? { refusal: "engine stopping", blank: false } : await this.#checkReturning(io);
    const refusal = check.refusal;
    if (refusal !== undefined) {
      io.destroy(refusal);
      leg.lastError = refusal;
      log.warn("mirror leg refused on return", { mirror: this.mirrorId, leg: leg.id, reason: refusal });
      this.#scheduleReconnect(leg);
      return;
    }
    leg.io = io;
    leg.reconnectDelayMs = 0;
    leg.state = "stale";
    // A blank leg (its volume was replaced) lacks everything.
    if (check.blank) for (let r = 0; r < this.regions; r++) leg.missed.set(r);
    this.#watch(leg, io);
    log.info("mirror leg reachable again", { mirror: this.mirrorId, leg: leg.id, blank: check.blank });
    this.#startRebuild(leg, check.blank);
  }

  /** Why a returning leg may not be used (another size, another mirror's metadata), or undefined. A blank leg gets a full copy. */
  async #checkReturning(io: LegIo): Promise<{ refusal: string | undefined; blank: boolean }> {
    if (io.sizeBytes - METADATA_BYTES !== this.sizeBytes) return { refusal: `leg now has ${io.sizeBytes} bytes, the mirror needs ${this.sizeBytes + METADATA_BYTES}`, blank: false };
    try {
      const slots: Buffer[] = [];
      for (let slot = 0; slot < HEADER_SLOTS; slot++) slots.push(await io.read(headerSlotOffset(this.sizeBytes, slot), HEADER_SLOT_BYTES));
      const decoded = newestHeader(slots);
      if (decoded.kind === "invalid") return { refusal: `its mirror metadata does not decode (${decoded.reason})`, blank: false };
      if (decoded.kind === "valid" && decoded.header.mirrorId !== this.mirrorId) return { refusal: `it belongs to mirror ${decoded.header.mirrorId}`, blank: false };
      return { refusal: undefined, blank: decoded.kind === "empty" };
    } catch (error) {
      return { refusal: errorMessage(error), blank: false };
    }
  }

  #startRebuild(leg: Leg, full = false): void {
    // Writes still in flight (or not yet retired from the intent bitmap) went out without this leg: it lacks their regions too.
    for (const region of this.#intent.setRegions(this.regions)) leg.missed.set(region);
    leg.state = "rebuilding";
    leg.rebuild = { kind: full ? "full" : "delta", copiedBytes: 0, totalBytes: this.#regionsBytes(leg.missed), startedMs: this.#now() };
    this.#options.onEvent?.({ type: "leg-rebuilding", leg: leg.id, kind: leg.rebuild.kind, totalBytes: leg.rebuild.totalBytes });
    log.info("mirror leg rebuild started", { mirror: this.mirrorId, leg: leg.id, kind: leg.rebuild.kind, bytes: leg.rebuild.totalBytes });
    void this.#rebuild(leg).catch((error: unknown) => {
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
    const rate = elapsed > 0 ? r.copiedBytes / elapsed : 0;
    return { kind: r.kind, copiedBytes: r.copiedBytes, totalBytes: r.totalBytes, etaSeconds: rate > 0 ? Math.ceil((r.totalBytes - r.copiedBytes) / rate) : undefined };
  }

  async #rebuild(leg: Leg): Promise<void> {
    const target = leg.io;
    if (target === undefined) return;
    let lastCheckpoint = this.#now();
    const started = this.#now();
    /** Copied since the last checkpoint: their bits are cleared only once the target has flushed them. */
    let copiedRegions: number[] = [];
    const checkpoint = async (): Promise<void> => {
      await target.flush();
      for (const region of copiedRegions) leg.missed.clear(region);
      copiedRegions = [];
      await this.#persist(false);
    };
    for (const region of [...leg.missed.setRegions(this.regions)]) {
      if (this.#closed || leg.state !== "rebuilding" || leg.io !== target) return;
      const [offset, length] = this.#regionRange(region);
      await this.#lock(region);
      try {
        const source = this.#legs.find((l) => l.state === "in-sync" && l.io !== undefined);
        if (source === undefined) throw new IpsanError("IO_ERROR", "no leg in sync to copy from");
        let data: Buffer;
        try {
          data = await (source.io as LegIo).read(offset, length);
        } catch (error) {
          await this.#fail(source, error);
          throw error;
        }
        await target.write(offset, data, false);
      } finally {
        this.#unlock(region);
      }
      copiedRegions.push(region);
      if (leg.rebuild !== undefined) leg.rebuild.copiedBytes += length;
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
    leg.rebuild = undefined;
    log.info("mirror leg in sync", { mirror: this.mirrorId, leg: leg.id, copiedBytes: copied, generation: this.#generation });
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
