// The one seam between frontends (NBD now, iSCSI later) and storage.
//
// A BlockDevice is what a frontend serves: a volume or a partition of one.
// Offsets are relative to the device; the device itself guarantees that no
// request reaches outside it (the frontend validates too: defence in depth).
// Capabilities are fixed when the device is opened, so a frontend can
// advertise them once per connection (nbdkit's can_* probes).

declare const brand: unique symbol;
type Brand<T, B extends string> = T & { readonly [brand]: B };

/** Byte counts and offsets are plain numbers below 2^53 (8 PiB): asserted where they enter. */
export type ByteCount = Brand<number, "ByteCount">;
/** A 512-byte sector address, as the seed's "storage info" reports extents. */
export type Lba = Brand<number, "Lba">;
export type VolumeName = Brand<string, "VolumeName">;

export const SECTOR_SIZE = 512;

export interface BlockCapabilities {
  readonly readOnly: boolean;
  readonly canFlush: boolean;
  readonly canTrim: boolean;
  readonly canZero: boolean;
  readonly canFastZero: boolean;
  readonly canFua: boolean;
  readonly canCache: boolean;
  readonly canExtents: boolean;
  /** True only if a flush on one connection makes writes from all connections durable. */
  readonly canMultiConn: boolean;
}

/** One run of bytes with the same allocation state, for NBD base:allocation. */
export interface Extent {
  readonly lengthBytes: number;
  /** Not allocated on the backing store (a hole). */
  readonly hole: boolean;
  /** Reads as zeroes. */
  readonly zero: boolean;
}

export interface ZeroOptions {
  readonly fua: boolean;
  /** The device may punch a hole instead of writing zeroes (NBD: no NO_HOLE flag). */
  readonly mayTrim: boolean;
  /** Fail with NOT_SUPPORTED rather than zero slowly (NBD FAST_ZERO). */
  readonly fastOnly: boolean;
}

export interface BlockDevice {
  /** Export name: a volume name, or "VOLUME/pN" for partition N. */
  readonly name: string;
  readonly description: string;
  readonly sizeBytes: number;
  readonly capabilities: BlockCapabilities;
  /** Fills `buffer` with the bytes at [offset, offset + buffer.length). */
  read(buffer: Buffer, offsetBytes: number): Promise<void>;
  /**
   * Optional fast path: read() done synchronously if that needs no waiting
   * (the data is in memory). True when `buffer` is filled; false (or a throw)
   * means nothing is promised about `buffer` and the caller uses read().
   */
  readNow?(buffer: Buffer, offsetBytes: number): boolean;
  /**
   * Optional: a READ reply sent from the page cache to a plain (not TLS)
   * socket without copying the data through the process: `header`, then the
   * bytes (sendfile). Returns how many bytes the socket took, header
   * included; fewer than header + length when its buffer filled (the caller
   * sends the rest, before anything else, with readSync). -1: not possible
   * now (not cached, spans storage pieces, revoked...), nothing was sent.
   */
  sendNow?(socketFd: number, header: Buffer, offsetBytes: number, lengthBytes: number): number;
  /**
   * Optional, with sendNow: fills `buffer` before returning (it may wait for
   * the disk if the pages went away meanwhile); throws on an I/O error. Only
   * for the rest of a reply sendNow started, which must leave at once.
   */
  readSync?(buffer: Buffer, offsetBytes: number): void;
  write(buffer: Buffer, offsetBytes: number, fua: boolean): Promise<void>;
  /**
   * Optional: write() of the concatenation of `parts` (a payload that arrived
   * in several socket chunks), so the frontend need not gather it first.
   */
  writev?(parts: readonly Buffer[], offsetBytes: number, fua: boolean): Promise<void>;
  /**
   * Optional fast path: a write (no FUA) of the concatenation of `parts`
   * done synchronously if that needs no waiting (into the page cache). True
   * when written; false (or a throw) means the caller uses write()/writev().
   */
  writeNow?(parts: readonly Buffer[], offsetBytes: number): boolean;
  flush(): Promise<void>;
  trim(offsetBytes: number, lengthBytes: number, fua: boolean): Promise<void>;
  zero(offsetBytes: number, lengthBytes: number, options: ZeroOptions): Promise<void>;
  /** Prefetch hint; may do nothing. */
  cache(offsetBytes: number, lengthBytes: number): Promise<void>;
  /** Allocation state covering at least the first byte of the range, at most the range. */
  extents(offsetBytes: number, lengthBytes: number): Promise<readonly Extent[]>;
  /**
   * Optional: `listener` is called once, synchronously, when the device is
   * revoked (its volume was deleted or changed, or its peer lost the grant):
   * every later request fails, and the frontend should drop the connection.
   * Called at once if the device is already revoked.
   */
  onRevoked?(listener: (error: Error) => void): void;
  /** Called when the last user of this opened device goes away. */
  close(): Promise<void>;
}

/** Who is asking: the frontend passes it to the provider for access control. */
export interface Peer {
  /** Remote IP address ("127.0.0.1", "::1", "10.0.0.5") or "unix" for a Unix socket. */
  readonly address: string;
  readonly port: number;
  /** The TLS-PSK identity the peer proved (NBD_OPT_STARTTLS); undefined in plaintext. */
  readonly identity?: string;
  /** pskKeyId() of the key it proved it holds (tells a rotated key from the one in use). */
  readonly keyId?: string;
  /**
   * iSCSI only: the InitiatorName the peer logged in with (lowercase). An
   * identity grant that names an initiator (AccessGrant.iqn) admits only it.
   */
  readonly initiator?: string;
}

export interface ExportSummary {
  readonly name: string;
  readonly description: string;
}

/**
 * What a frontend serves from. The unit implements it over its volume table;
 * access control (the --allow list, per-volume host grants) lives here, not in
 * the protocol engine.
 */
export interface ExportProvider {
  /** Exports this peer may see (NBD_OPT_LIST). */
  list(peer: Peer): readonly ExportSummary[];
  /**
   * Opens an export for this peer. Throws IpsanError NOT_FOUND (unknown name)
   * or PERMISSION_DENIED (peer not admitted). The size is fixed for the life
   * of the opened device: a grown volume shows its new size to new openings.
   */
  open(name: string, peer: Peer): Promise<BlockDevice>;
  /** The export served to clients that ask for the empty name, if any. */
  readonly defaultExport: string | undefined;
  /**
   * Whether this peer may connect at all (asked once, before the greeting).
   * A peer that could open nothing is refused here, so a stranger never sees
   * a handshake. Optional: without it every peer gets a handshake and access
   * is decided by list/open alone.
   */
  admitsConnection?(peer: Peer): boolean;
}
