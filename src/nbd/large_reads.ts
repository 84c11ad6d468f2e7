// Larger socket reads. Node reads a TCP socket 64 KiB per read(2) and makes
// a fresh Buffer of each; a 1 MiB NBD write then costs 16 reads, 16 trips
// through the stream machinery, and the kernel sends a window-update ACK
// after most of them (a loopback ACK is processed inline: softirq work on
// the unit's CPU). Measured on fio seqwrite1m, those ACKs and reads were the
// unit's largest cost beyond the two unavoidable copies.
//
// Node's `onread` socket option reads into buffers the caller supplies, of
// any size, but only sockets made with `new net.Socket(...)` take it; a
// server's accepted sockets do not. useLargeReads switches an accepted
// socket to it after the fact: it sets the three internal fields that
// option sets (found by name on a probe socket) and installs the first
// buffer on the handle. Each read lands in the free tail of a per-connection
// arena of READ_ARENA_BYTES; the bytes read are handed on as a subarray (no
// copy) and the tail shrinks; when less than READ_SLICE_BYTES_MIN is left,
// the arena is retired and reading moves to the oldest retired arena that
// `mayReuse` says nothing refers to any more (fresh memory costs a page
// fault per 4 KiB, and a dropped arena lives until a garbage collection
// finds its last subarray gone), else to a new arena. A connection keeps at
// most READ_ARENAS_RETIRED_MAX retired arenas (one with a budget); an older
// one is dropped. So a connection holds at most that many plus one arenas of
// its own, plus what its requests in flight still refer to.
//
// Anything unexpected (another Node version without these fields) leaves the
// socket as it is: the 'data' path works the same, only with 64 KiB reads.
// pause()/resume() and EOF behave as with Node's own onread option.
//
// With a ReadArenaBudget (the iSCSI target's, IscsiLimits.readArenaBytesMax)
// a connection's arenas are bounded across connections: it starts with
// SMALL_READ_BYTES reads (a fresh buffer each, as Node's own reads), and only
// when a read fills one (bulk data is arriving) does it take
// READ_ARENA_RESERVATION_BYTES (its arena and its spare) from the budget and
// move to arenas; the reservation is given back when the socket closes. An
// idle connection pins no arena, and however many connections there are,
// their arenas stay within the budget (the others keep small reads: slower
// for bulk data, never wrong).

import { Socket } from "node:net";

/** Size of one connection's read arena. */
export const READ_ARENA_BYTES = 2 * 1024 * 1024;
/** Smallest buffer offered to a read; below it the arena is replaced. */
export const READ_SLICE_BYTES_MIN = 256 * 1024;
/** With a budget: each read before the connection holds arenas (Node's own read size). */
export const SMALL_READ_BYTES = 64 * 1024;
/**
 * Arenas a connection without a budget (NBD) keeps besides the one it reads
 * into, for reuse once nothing views them: enough for a queue depth of 8
 * 1 MiB writes in flight (each pins the arena its payload is in), so bulk
 * writes go round the same few arenas instead of allocating fresh ones that
 * live on until a garbage collection (measured: RSS under fio seqwrite1m).
 */
export const READ_ARENAS_RETIRED_MAX = 5;
/** What a connection takes from a budget: its arena and one retired arena, the most it holds of its own with a budget. */
export const READ_ARENA_RESERVATION_BYTES = 2 * READ_ARENA_BYTES;

/** A bound on the read arenas of many connections (shared by one server's connections). */
export class ReadArenaBudget {
  readonly bytesMax: number;
  #heldBytes = 0;
  #holders = 0;

  constructor(bytesMax: number) {
    this.bytesMax = bytesMax;
  }

  /** Bytes reserved by connections reading into arenas now. */
  get heldBytes(): number {
    return this.#heldBytes;
  }

  /** Connections reading into arenas now. */
  get holders(): number {
    return this.#holders;
  }

  /** Takes one connection's reservation; false (nothing taken) when it does not fit. */
  tryTake(): boolean {
    if (this.#heldBytes + READ_ARENA_RESERVATION_BYTES > this.bytesMax) return false;
    this.#heldBytes += READ_ARENA_RESERVATION_BYTES;
    this.#holders += 1;
    return true;
  }

  give(): void {
    this.#heldBytes -= READ_ARENA_RESERVATION_BYTES;
    this.#holders -= 1;
  }
}

interface OnreadFields {
  readonly buffer: symbol;
  readonly callback: symbol;
  readonly generator: symbol;
}

let fields: OnreadFields | null | undefined;

/** The internal symbols Node's onread option sets on a socket, or null when this Node has none. */
function onreadFields(): OnreadFields | null {
  if (fields !== undefined) return fields;
  fields = null;
  try {
    // `onread` is a documented net.connect()/new Socket() option that @types/node leaves out of SocketConstructorOpts.
    const options = { onread: { buffer: () => Buffer.alloc(1), callback: () => true } };
    const probe = new Socket(options as ConstructorParameters<typeof Socket>[0]);
    const byName = new Map(Object.getOwnPropertySymbols(probe).map((s) => [s.description, s]));
    const buffer = byName.get("kBuffer");
    const callback = byName.get("kBufferCb");
    const generator = byName.get("kBufferGen");
    const record = probe as unknown as Record<symbol, unknown>;
    if (buffer !== undefined && callback !== undefined && generator !== undefined && record[buffer] === true && typeof record[generator] === "function") {
      fields = { buffer, callback, generator };
    }
    probe.destroy();
  } catch {
    fields = null;
  }
  return fields;
}

interface UserBufferHandle {
  useUserBuffer(buffer: Uint8Array): void;
}

/**
 * Makes `socket` read up to READ_ARENA_BYTES per read(2), handing each read
 * to `onChunk` (instead of 'data' events). `mayReuse(store)` must answer
 * true only when no live Buffer still views `store`. Returns false, changing
 * nothing, where this Node does not allow it.
 */
export function useLargeReads(
  socket: Socket,
  onChunk: (chunk: Buffer) => void,
  mayReuse: (store: ArrayBufferLike) => boolean,
  budget?: ReadArenaBudget,
): boolean {
  const found = onreadFields();
  const handle = (socket as unknown as { _handle?: Partial<UserBufferHandle> | null })._handle;
  if (found === null || handle === undefined || handle === null || typeof handle.useUserBuffer !== "function") return false;
  // Without a budget the arena is there from the start; with one, it comes with the first read that fills a small buffer.
  let arena: Buffer | undefined = budget === undefined ? Buffer.allocUnsafeSlow(READ_ARENA_BYTES) : undefined;
  // Arenas read into before, oldest first: the next arena is the first of them nothing views any more.
  const retired: Buffer[] = [];
  const retiredMax = budget === undefined ? READ_ARENAS_RETIRED_MAX : 1;
  let used = 0;
  const next = (): Buffer => {
    if (arena === undefined) return Buffer.allocUnsafeSlow(SMALL_READ_BYTES);
    if (arena.length - used < READ_SLICE_BYTES_MIN) {
      retired.push(arena);
      const free = retired.findIndex((old) => mayReuse(old.buffer));
      arena = free >= 0 ? (retired.splice(free, 1)[0] as Buffer) : Buffer.allocUnsafeSlow(READ_ARENA_BYTES);
      // Past the bound, the oldest goes to the garbage collector (freed once its last view is dropped).
      if (retired.length > retiredMax) retired.shift();
      used = 0;
    }
    return arena.subarray(used);
  };
  const onRead = (bytes: number, buffer: Buffer): boolean => {
    if (arena !== undefined) used += bytes;
    else if (budget !== undefined && bytes === buffer.length && !socket.destroyed && budget.tryTake()) {
      arena = Buffer.allocUnsafeSlow(READ_ARENA_BYTES);
      used = 0;
      socket.once("close", () => budget.give());
    }
    onChunk(buffer.subarray(0, bytes));
    return true;
  };
  const first = next();
  const record = socket as unknown as Record<symbol, unknown>;
  record[found.buffer] = first;
  record[found.generator] = next;
  record[found.callback] = onRead;
  handle.useUserBuffer(first);
  return true;
}
