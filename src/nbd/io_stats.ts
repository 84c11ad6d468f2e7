// I/O counters of an NBD server, per export (nbdkit's stats filter, kept
// inside the server so it costs plain number increments): requests, bytes,
// flushes, trims, zeroes, errors, latency sums and a small fixed-bucket
// latency histogram, and the connections open on each export. Counters are
// cumulative since the process started (a reader computes rates from two
// snapshots and the monotonic uptime); `bootId` changes with every start, so
// a reader can tell a restart (counters back to zero) from a quiet export.
//
// Clock readings (performance.now(), a few hundred ns on a VM's kvm-clock)
// are the cost that matters: the session reads the clock once per pump (a
// batch of requests decoded together) as the start of all its requests, once
// when an asynchronous request completes, and once at the end of the pump for
// the requests it answered at once from the page cache, which share that time
// equally. So two readings per request at queue depth 1, and fewer than one
// per request when requests come in batches (queue depth 16 from the page cache). A request's
// latency runs from when the server began handling the batch it arrived in to
// when its reply was handed to the socket: the unit's share, not the network's.

import { randomBytes } from "node:crypto";
import { performance } from "node:perf_hooks";
import { NBD_CMD } from "./protocol.ts";

/** Upper bounds of the latency histogram's buckets, in microseconds; one more bucket counts the rest (+Inf). */
export const LATENCY_BUCKETS_US: readonly number[] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];
/** Exports with counters kept at most; idle ones of exports that no longer exist are dropped first (IoStats.prune). */
export const IO_STATS_EXPORTS_MAX = 65_536;

/** The counters of one export (or a sum of exports), as the control API answers them. */
export interface IoCountersView {
  connections: number;
  reads: number;
  writes: number;
  readBytes: number;
  writeBytes: number;
  flushes: number;
  trims: number;
  zeroes: number;
  /** Requests refused by validation or failed by the device. */
  errors: number;
  readLatencyUsSum: number;
  writeLatencyUsSum: number;
  /** Requests per latency bucket (LATENCY_BUCKETS_US, then +Inf): not cumulative. */
  readLatencyBuckets: number[];
  writeLatencyBuckets: number[];
}

function bucketOf(latencyUs: number): number {
  const bounds = LATENCY_BUCKETS_US;
  for (let i = 0; i < bounds.length; i++) if (latencyUs <= (bounds[i] as number)) return i;
  return bounds.length;
}

/** One export's counters. The session increments them directly; nothing here allocates. */
export class ExportCounters {
  readonly name: string;
  connections = 0;
  reads = 0;
  writes = 0;
  readBytes = 0;
  writeBytes = 0;
  flushes = 0;
  trims = 0;
  zeroes = 0;
  errors = 0;
  readLatencyUsSum = 0;
  writeLatencyUsSum = 0;
  readonly readLatencyBuckets: number[] = LATENCY_BUCKETS_US.map(() => 0).concat(0);
  readonly writeLatencyBuckets: number[] = LATENCY_BUCKETS_US.map(() => 0).concat(0);

  constructor(name: string) {
    this.name = name;
  }

  /** A request answered successfully after `latencyMs` (a READ or WRITE of `lengthBytes`; other commands are counted by kind). */
  completed(type: number, lengthBytes: number, latencyMs: number): void {
    const latencyUs = latencyMs * 1000;
    switch (type) {
      case NBD_CMD.READ: {
        this.reads += 1;
        this.readBytes += lengthBytes;
        this.readLatencyUsSum += latencyUs;
        const i = bucketOf(latencyUs);
        this.readLatencyBuckets[i] = (this.readLatencyBuckets[i] as number) + 1;
        return;
      }
      case NBD_CMD.WRITE: {
        this.writes += 1;
        this.writeBytes += lengthBytes;
        this.writeLatencyUsSum += latencyUs;
        const i = bucketOf(latencyUs);
        this.writeLatencyBuckets[i] = (this.writeLatencyBuckets[i] as number) + 1;
        return;
      }
      case NBD_CMD.FLUSH:
        this.flushes += 1;
        return;
      case NBD_CMD.TRIM:
        this.trims += 1;
        return;
      case NBD_CMD.WRITE_ZEROES:
        this.zeroes += 1;
        return;
      default:
        // CACHE and BLOCK_STATUS move no data: not counted.
        return;
    }
  }

  /** `count` READs or WRITEs of `bytes` in all, answered together, each after `latencyMsEach`. */
  completedMany(type: number, count: number, bytes: number, latencyMsEach: number): void {
    const latencyUs = latencyMsEach * 1000;
    const i = bucketOf(latencyUs);
    if (type === NBD_CMD.READ) {
      this.reads += count;
      this.readBytes += bytes;
      this.readLatencyUsSum += latencyUs * count;
      this.readLatencyBuckets[i] = (this.readLatencyBuckets[i] as number) + count;
    } else if (type === NBD_CMD.WRITE) {
      this.writes += count;
      this.writeBytes += bytes;
      this.writeLatencyUsSum += latencyUs * count;
      this.writeLatencyBuckets[i] = (this.writeLatencyBuckets[i] as number) + count;
    }
  }

  view(): IoCountersView {
    return {
      connections: this.connections,
      reads: this.reads,
      writes: this.writes,
      readBytes: this.readBytes,
      writeBytes: this.writeBytes,
      flushes: this.flushes,
      trims: this.trims,
      zeroes: this.zeroes,
      errors: this.errors,
      readLatencyUsSum: Math.round(this.readLatencyUsSum),
      writeLatencyUsSum: Math.round(this.writeLatencyUsSum),
      readLatencyBuckets: [...this.readLatencyBuckets],
      writeLatencyBuckets: [...this.writeLatencyBuckets],
    };
  }
}

/** All zeroes: the start of a sum. */
export function zeroCounters(): IoCountersView {
  return new ExportCounters("").view();
}

/** Adds `b` into `a` (sums of exports: a volume and its partitions, or the whole unit). */
export function addCounters(a: IoCountersView, b: IoCountersView): IoCountersView {
  a.connections += b.connections;
  a.reads += b.reads;
  a.writes += b.writes;
  a.readBytes += b.readBytes;
  a.writeBytes += b.writeBytes;
  a.flushes += b.flushes;
  a.trims += b.trims;
  a.zeroes += b.zeroes;
  a.errors += b.errors;
  a.readLatencyUsSum += b.readLatencyUsSum;
  a.writeLatencyUsSum += b.writeLatencyUsSum;
  b.readLatencyBuckets.forEach((n, i) => (a.readLatencyBuckets[i] = (a.readLatencyBuckets[i] ?? 0) + n));
  b.writeLatencyBuckets.forEach((n, i) => (a.writeLatencyBuckets[i] = (a.writeLatencyBuckets[i] ?? 0) + n));
  return a;
}

/** The server's counters: one ExportCounters per export name opened since the start. */
export class IoStats {
  /** Random per process: a new value means the counters started again from zero. */
  readonly bootId = randomBytes(8).toString("hex");
  readonly #startedAtMs = performance.now();
  readonly #exports = new Map<string, ExportCounters>();
  /** The counters of exports dropped by prune: kept in the totals, so the totals never go back within one boot. */
  readonly #retired = zeroCounters();

  /** Milliseconds since this process started counting (monotonic). */
  uptimeMs(): number {
    return performance.now() - this.#startedAtMs;
  }

  /** The counters of `name`, made on first use. */
  forExport(name: string): ExportCounters {
    let counters = this.#exports.get(name);
    if (counters === undefined) {
      if (this.#exports.size >= IO_STATS_EXPORTS_MAX) this.prune(() => false);
      counters = new ExportCounters(name);
      this.#exports.set(name, counters);
    }
    return counters;
  }

  /** Drops the counters of exports with no connection that `exists` says are gone (a deleted volume, a partition no more). */
  prune(exists: (name: string) => boolean): void {
    for (const [name, counters] of this.#exports) {
      if (counters.connections !== 0 || exists(name)) continue;
      addCounters(this.#retired, counters.view());
      this.#exports.delete(name);
    }
  }

  /** Every export's counters summed, those dropped by prune included: they never go back within one boot. */
  totals(): IoCountersView {
    const sum = addCounters(zeroCounters(), this.#retired);
    for (const counters of this.#exports.values()) addCounters(sum, counters.view());
    return sum;
  }

  exports(): IterableIterator<ExportCounters> {
    return this.#exports.values();
  }
}
